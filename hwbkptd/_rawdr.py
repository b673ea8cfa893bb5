"""Raw debug registers: each client's virtual DR0-7 per thread, realized as engine watches.

A client peeks and pokes its own :class:`~hwbkptd._vdr.VirtualDebugRegisters` of a thread,
with the kernel's ``PTRACE_PEEKUSER``/``PTRACE_POKEUSER`` rules (the model lives in
``_vdr.py``). Every enabled virtual slot is a stop-mode, thread-scope watch of that client,
sharing physical slots with everyone's identical keys. A write whose new enabled set cannot
be installed now fails with ``ENOSPC`` and changes nothing, as the kernel's does.

At each debug trap the engine reports, the virtual DR6 of every client with registers on
that thread is reset and marked in that client's own slot numbering (``record_trap``), and
its value travels in that client's ``stop`` event.
"""

from __future__ import annotations

from collections.abc import Iterable

from hwbkpt_proto import BusyError, DebugRegisterIOError, NoSuchProcessError
from hwbkptd._engine import Engine
from hwbkptd._model import REGISTER_NAMES, Spec
from hwbkptd._records import ThreadRec, WatchRec
from hwbkptd._vdr import VirtualDebugRegisters, user_offset_to_dr

__all__ = ["RawDebugRegisters"]

_REGS_END = 8 * len(REGISTER_NAMES)


class RawDebugRegisters:
    """Virtual debug registers of every (client, thread), kept consistent with the engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._vdrs: dict[tuple[int, int], VirtualDebugRegisters] = {}
        self._watches: dict[
            tuple[int, int], dict[int, WatchRec]
        ] = {}  # (cid, tid) -> slot -> watch
        engine.on_trap_hook = self._on_trap
        engine.interest_hook = self._interested
        engine.forget_hook = self._forget
        engine.trap_hook_wants = self._wants_trap

    # --- requests ---------------------------------------------------------------------

    def peek(self, cid: int, tid: int, n: int) -> int:
        """PEEKUSER of DR``n``. Raises DebugRegisterIOError, NoSuchProcessError."""
        vdr = self._vdrs.get((cid, tid))
        if vdr is None:
            self._engine.ensure_thread(tid)
            vdr = self._vdrs.setdefault((cid, tid), VirtualDebugRegisters())
        return vdr.peek(n)

    def poke(self, cid: int, tid: int, n: int, value: int) -> None:
        """POKEUSER of DR``n``; realizes the new enabled set in physical slots.

        Raises DebugRegisterIOError (EIO), InvalidArgumentError (EINVAL), NoSpaceError
        (ENOSPC), NoSuchProcessError, BusyError (another tracer owns the thread).
        """
        self._engine.ensure_thread(tid)
        vdr = self._vdrs.setdefault((cid, tid), VirtualDebugRegisters())
        plan = vdr.prepare_poke(n, value)
        old = vdr.enabled()
        new = plan.enabled
        changed = [slot for slot in range(4) if old.get(slot) != new.get(slot)]
        if not changed:
            vdr.commit(plan)
            return
        watches = self._watches.setdefault((cid, tid), {})
        remove = [watches[slot] for slot in changed if slot in watches]
        add = [(new[slot], slot, None) for slot in changed if slot in new]
        try:
            made = self._engine.replace_raw(cid, tid, remove, add)
        except BaseException:
            vdr.abandon(plan)
            raise
        for slot in changed:
            watches.pop(slot, None)
        for watch in made:
            assert watch.vdr_slot is not None
            watches[watch.vdr_slot] = watch
        vdr.commit(plan)

    def peek_user(self, cid: int, tid: int, offset: int) -> int:
        """PEEKUSER at a ``struct user`` offset: registers, debug registers, or 0."""
        n = user_offset_to_dr(offset)
        if n is not None:
            return self.peek(cid, tid, n)
        if offset < _REGS_END:
            return self._stopped_regs(cid, tid)[REGISTER_NAMES[offset // 8]]
        self._engine.ensure_thread(tid)
        return 0  # the rest of struct user reads as zeros (measured)

    def poke_user(self, cid: int, tid: int, offset: int, value: int) -> None:
        """POKEUSER at a ``struct user`` offset (registers need the thread stopped for you)."""
        n = user_offset_to_dr(offset)
        if n is not None:
            self.poke(cid, tid, n, value)
            return
        if offset < _REGS_END:
            self._stopped_regs(cid, tid)
            self._engine.set_regs(cid, tid, {REGISTER_NAMES[offset // 8]: value & ((1 << 64) - 1)})
            return
        self._engine.ensure_thread(tid)
        raise DebugRegisterIOError(
            f"struct user offset {offset} cannot be written (the kernel says EIO)"
        )

    def remove_client(self, cid: int) -> None:
        """Drop the client's registers (its watches go with the client in the engine)."""
        pids = set()
        for key in [k for k in self._vdrs if k[0] == cid]:
            del self._vdrs[key]
            self._watches.pop(key, None)
            pids.add(self._engine.pid_of(key[1]))
        for pid in pids:
            if pid is not None:
                self._engine.release_interest(pid)

    # --- engine hooks -----------------------------------------------------------------

    def _stopped_regs(self, cid: int, tid: int) -> dict[str, int]:
        # ptrace reads registers only of a tracee stopped for its tracer: ESRCH otherwise.
        if not self._engine.stopped_for(cid, tid):
            self._engine.ensure_thread(tid)
            raise NoSuchProcessError(
                f"thread {tid} is not stopped for you; registers can be read only at a stop"
            )
        try:
            return self._engine.get_regs(cid, tid)
        except BusyError as err:
            raise NoSuchProcessError(str(err)) from err

    def _on_trap(self, thread: ThreadRec, hit: set[Spec], stepped: set[int]) -> dict[int, int]:
        out: dict[int, int] = {}
        for (cid, tid), vdr in self._vdrs.items():
            if tid != thread.tid:
                continue
            slots = [slot for slot, spec in vdr.enabled().items() if spec in hit]
            vdr.record_trap(slots, cid in stepped)
            out[cid] = vdr.dr6()
        return out

    def _wants_trap(self, tid: int) -> bool:
        # Any client's virtual registers on the thread: its DR6 is updated at every trap.
        return any(t == tid for _, t in self._vdrs)

    def _interested(self, pid: int) -> bool:
        # Registers a client has touched keep their process managed until the client goes
        # (a debugger expects its DR0-3 values to read back, enabled or not).
        return any(self._engine.pid_of(tid) == pid for _, tid in self._vdrs)


    def _forget(self, pid: int, tids: Iterable[int]) -> None:
        gone = set(tids)
        for key in [k for k in self._vdrs if k[1] in gone]:
            del self._vdrs[key]
            self._watches.pop(key, None)
