"""Stops: whose SIGTRAP it is, holds, steps, interrupts, thread life and detach.

The ptrace half of the engine (:class:`hwbkptd._engine.Engine` inherits it). Like the rest
of the engine it makes no system call: it acts through the :class:`~hwbkptd._records.Port`.

Theory of operation
-------------------
*Whose SIGTRAP.* At a SIGTRAP signal-delivery-stop the signal is the daemon's if it is a
``TRAP_PERF`` carrying one of the daemon's tokens (``sig_data``), or the trap of a single
step the daemon requested. Those are suppressed. Anything else — ``kill``, the program's
own ``int3``, a trap flag it set itself — is delivered unchanged when the thread resumes,
even if the same stop also carried hits of ours. One exception: a ``TRAP_BRKPT`` trap on a
thread that carries (or carried) our breakpoints, with no step of ours in flight and not
the program's own ``int1`` (byte 0xF1), is a debug exception whose DR6 came back empty —
the kernel reports those as ``int1`` — which happens under virtualisation (here: about
once in 20,000 stops while the guest was busy; ``si_addr`` was right after the watched
store). Where the program's ``int1`` is depends on the CPU: on most it is a trap and
``si_addr`` follows the 0xF1 byte; on some (an AMD EPYC under KVM) it is a fault and
``si_addr`` is the byte itself. The daemon measures which at start-up
(:func:`hwbkptd._platform.int1_faults`) and looks at the right byte. Such a trap is our
breakpoint's (nothing else on the thread raises debug exceptions), so it is suppressed;
the kernel did not count it, so with one slot on the thread it is credited to that slot as
a hit, and with several it is reported as lost.

*Holds.* A stop is reported to every client with a stop-mode watch that advanced (and to
a client whose step completed); the thread runs again only when every one of them has
resumed it, stepped it, or gone. A step request makes the next resume a single step; its
trap is reported only to the clients that asked for it.

*Parking* (off by default; the daemon's hidden ``--park``). A held thread can be moved
from its SIGTRAP signal-delivery-stop to an interrupt stop (``PTRACE_INTERRUPT``, then
``PTRACE_CONT`` with the signal cancelled) before the stop is reported. It was meant to keep
a held thread alive if the daemon is killed, but on 6.x kernels a SIGTRAP held in a
signal-delivery-stop is discarded when the tracer dies anyway, and survival measured the
same with and without it (README, Security), while it costs a stop per hit.

*Detach.* When nothing needs a target any more (no watch, no hold, no virtual debug
register in use) every slot is closed and every thread interrupted; at its next stop a
thread is detached — unless a SIGTRAP of ours is still queued for it, which would kill the
program after the detach: then it is continued once more, the trap swallowed, and
detached at the stop that follows.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from hwbkpt_proto import BusyError, HwbkptError, NoSuchProcessError
from hwbkptd._model import Mode, Spec
from hwbkptd._records import (
    EVENT_CLONE,
    EVENT_EXEC,
    EVENT_EXIT,
    EVENT_STOP,
    SIGTRAP,
    SIGTRAP_BIT,
    TOKEN_MAGIC,
    TOKEN_MASK,
    TRAP_BRKPT,
    TRAP_HWBKPT,
    TRAP_PERF,
    TRAP_TRACE,
    ClientRec,
    Emit,
    Port,
    SlotRec,
    TargetRec,
    ThreadRec,
    ThreadState,
    WatchRec,
)

__all__ = ["StopHandling"]

log = logging.getLogger("hwbkptd._engine")


class StopHandling:
    """The engine's handling of ptrace stops; state and allocation come from ``Engine``."""

    # Provided by hwbkptd._engine.Engine.
    _port: Port
    _emit: Emit
    _park: bool
    _int1_faults: bool
    _bpf: bool
    _clock: Callable[[], int]
    _clients: dict[int, ClientRec]
    targets: dict[int, TargetRec]
    _threads: dict[int, ThreadRec]
    _watches: dict[int, WatchRec]
    counters: dict[str, int]
    on_trap_hook: Callable[[ThreadRec, set[Spec], set[int]], dict[int, int]] | None
    interest_hook: Callable[[int], bool] | None
    forget_hook: Callable[[int, Iterable[int]], None] | None

    if TYPE_CHECKING:

        def _known(self, tid: int) -> ThreadRec | None: ...
        def _thread(self, tid: int) -> ThreadRec: ...
        def _threads_for(self, target: TargetRec, tid: int | None) -> list[ThreadRec]: ...
        def _drop_watch(self, watch: WatchRec, reason: str | None) -> None: ...
        def _end_watch(
            self, watch: WatchRec, reason: str, code: int | None = None, sig: int | None = None
        ) -> None: ...
        def _end_thread_watches(
            self, target: TargetRec, tid: int, code: int | None, sig: int | None
        ) -> None: ...
        def _reconcile(
            self, thread: ThreadRec, fresh: Collection[WatchRec] = (), *, again: bool = True
        ) -> None: ...
        def _reconcile_target(self, target: TargetRec) -> None: ...
        def _close_slot(self, thread: ThreadRec, spec: Spec, *, reopen: bool = False) -> None: ...
        def _refresh(self, slot: SlotRec) -> list[WatchRec]: ...
        def _add_thread(self, target: TargetRec, tid: int, state: ThreadState) -> ThreadRec: ...
        def _ensure_target(self, pid: int) -> TargetRec: ...
        def _signal_watchers(self, thread: ThreadRec, sig: int) -> set[int]: ...
        def _report_signal(self, thread: ThreadRec, sig: int, watchers: set[int]) -> None: ...
        def _choose_signal(self, thread: ThreadRec, cid: int, sig: int | None) -> None: ...
        def _settle_signal(self, thread: ThreadRec) -> None: ...

    def resume(self, cid: int, tid: int, signal: int | None = None) -> None:
        """Release ``cid``'s hold on a stopped thread; ``signal``: what it says of the
        thread's signal (``_signals``). Raises BusyError if it holds none."""
        thread = self._held_by(cid, tid)
        self._choose_signal(thread, cid, signal)
        thread.holds.discard(cid)
        # The last hold of a target whose watches are gone: detach now (DESIGN §5.5).
        target = self.targets.get(thread.pid)
        if target is not None:
            self._maybe_detach(target)
        self._release(thread)

    def step(self, cid: int, tid: int, signal: int | None = None) -> None:
        """Release ``cid``'s hold; the thread's next resume is one single step for ``cid``
        (``signal`` as for :meth:`resume`). Raises BusyError if it holds none."""
        thread = self._held_by(cid, tid)
        self._choose_signal(thread, cid, signal)
        thread.holds.discard(cid)
        thread.step_requesters.add(cid)
        self._release(thread)

    def interrupt(self, cid: int, tid: int) -> None:
        """Stop a thread for ``cid``; a ``stop`` event with reason "interrupt" follows,
        unless ``cid`` holds it stopped already (as ``hold_all`` skips such threads): one
        hold, one stop event, so that a client resuming every stop it is told of never
        resumes one it was not told of (a second event made the second resume fail with
        EBUSY, or release the thread's next stop unseen)."""
        thread = self._thread(tid)
        self.targets[thread.pid].clients.add(cid)
        if thread.state is ThreadState.STOPPED and not thread.detaching:
            if cid in thread.holds:
                return
            thread.holds.add(cid)
            self._send_stop(thread, {cid: []}, reason="interrupt")
            return
        thread.interrupt_requesters.add(cid)
        self._interrupt_if_running(thread)

    def attach(self, cid: int, pid: int, *, hold_threads: bool = False) -> list[int]:
        """Keep process ``pid`` seized for ``cid`` until it leaves (:meth:`leave`), with
        or without watches; ``cid`` is told of its exit, and of each thread that appears
        or ends (``thread`` events, :meth:`_tell_thread`). ``hold_threads``: each new
        thread is held for ``cid`` from its first stop (attach again to change it).
        Returns its threads.

        Raises NoSuchProcessError, BusyError (another tracer), PermissionDeniedError.
        """
        target = self._ensure_target(pid)
        target.attached.add(cid)
        target.clients.add(cid)
        if hold_threads:
            target.hold_new.add(cid)
        else:
            target.hold_new.discard(cid)
        return sorted(t.tid for t in target.threads.values() if not t.detaching)

    def leave(self, cid: int, pid: int) -> None:
        """``cid`` leaves process ``pid``: it is no longer attached and every thread it
        holds is released (each runs when no other client holds it). The process is let go
        when nobody needs it any more. Raises NoSuchProcessError if ``cid`` is not attached.
        """
        target = self._attached_target(cid, pid)
        target.attached.discard(cid)
        target.hold_new.discard(cid)
        target.signal_clients.pop(cid, None)
        for thread in list(target.threads.values()):
            thread.interrupt_requesters.discard(cid)
            thread.step_requesters.discard(cid)
            thread.parked_events = [(c, f) for c, f in thread.parked_events if c != cid]
            if cid in thread.holds:
                thread.holds.discard(cid)
                self._release(thread)
        self._maybe_detach(target)

    def hold_all(self, cid: int, pid: int) -> list[int]:
        """Stop every thread of ``pid`` for ``cid`` (a debugger's all-stop). Returns the
        threads that will report a ``stop`` event with reason "interrupt" (a thread already
        stopped for another client reports at once); threads ``cid`` holds already are left
        as they are. Raises NoSuchProcessError if ``cid`` is not attached to ``pid``.
        """
        target = self._attached_target(cid, pid)
        waiting = []
        for thread in list(target.threads.values()):
            if thread.detaching or thread.tid not in self._threads:
                continue
            if thread.state is ThreadState.STOPPED and cid in thread.holds:
                continue
            self.interrupt(cid, thread.tid)
            waiting.append(thread.tid)
        return waiting

    def _attached_target(self, cid: int, pid: int) -> TargetRec:
        target = self.targets.get(pid)
        if target is None or target.detaching or cid not in target.attached:
            raise NoSuchProcessError(f"you are not attached to process {pid}: call attach first")
        return target

    def get_regs(self, cid: int, tid: int) -> dict[str, int]:
        self._held_by(cid, tid)
        return self._port.getregs(tid)

    def set_regs(self, cid: int, tid: int, regs: Mapping[str, int]) -> None:
        self._held_by(cid, tid)
        self._port.setregs(tid, regs)

    def stopped_for(self, cid: int, tid: int) -> bool:
        thread = self._threads.get(tid)
        return thread is not None and thread.state is ThreadState.STOPPED and cid in thread.holds

    def _held_by(self, cid: int, tid: int) -> ThreadRec:
        thread = self._thread(tid)
        if thread.state is not ThreadState.STOPPED or cid not in thread.holds:
            raise BusyError(f"thread {tid} is not stopped for you; wait for a stop event")
        return thread

    def on_exited(self, tid: int, code: int | None, sig: int | None) -> None:
        """A thread is gone (WIFEXITED with ``code`` or WIFSIGNALED with ``sig``)."""
        thread = self._threads.get(tid)
        if thread is None:
            return
        target = self.targets.get(thread.pid)
        self._forget_thread(thread, reason="thread-exit")
        if target is None:
            return
        if tid == target.pid or not target.threads:
            self._end_target(target, code, sig)
        else:
            self._tell_thread(target, tid, "exit", code=code, signal=sig)
            self._end_thread_watches(target, tid, code, sig)

    def on_signal_stop(self, tid: int, sig: int) -> None:
        """Signal-delivery-stop: decide whose the signal is and what happens next."""
        thread = self._known(tid)
        if thread is None:
            self._orphan_stop(tid, sig)
            return
        thread.state = ThreadState.STOPPED
        thread.delivery_stop = True
        if sig == SIGTRAP:
            self._on_sigtrap(thread)
            return
        # Not ours: deliver it unchanged. A stopping signal then brings a group-stop.
        thread.resume_sig = sig
        requesters = self._take_interrupts(thread)
        watchers = self._signal_watchers(thread, sig)
        if watchers:
            # Told with reason "signal"; an interrupt requester among them needs no other.
            self._report_signal(thread, sig, watchers)
            requesters -= watchers
            if requesters:
                thread.holds.update(requesters)
                self._send_stop(thread, {cid: [] for cid in requesters}, reason="interrupt")
            return
        if requesters:
            thread.holds.update(requesters)
            self._send_stop(thread, {cid: [] for cid in requesters}, reason="interrupt")
            return
        self._resume_now(thread)

    def on_group_stop(self, tid: int, sig: int) -> None:
        """Group-stop (job control): stay stopped as an untraced program would."""
        thread = self._known(tid)
        if thread is None:
            self._orphan_stop(tid, 0)
            return
        thread.interrupt_sent = False
        thread.delivery_stop = False
        if thread.detaching or thread.interrupt_requesters:
            thread.state = ThreadState.STOPPED
            self._event_stop(thread)
            return
        thread.state = ThreadState.LISTENING
        self._port.listen(tid)

    def on_event_stop(self, tid: int, event: int, sig: int) -> None:
        """A PTRACE_EVENT stop: clone, exec, exit, or an interrupt / initial stop."""
        thread = self._known(tid)
        if thread is None:
            self._orphan_stop(tid, 0)
            return
        prev = thread.state
        thread.state = ThreadState.STOPPED
        thread.delivery_stop = False
        thread.resume_sig = 0
        if event == EVENT_CLONE:
            self._on_clone(thread)
        elif event == EVENT_EXEC:
            self._on_exec(thread)
            return
        elif event == EVENT_EXIT:
            self._on_exit_stop(thread)
        elif event == EVENT_STOP:
            if prev is ThreadState.NEW:
                self._reconcile(thread)
                target = self.targets.get(thread.pid)
                if target is not None and not thread.detaching:
                    self._new_thread(target, thread)
            self._event_stop(thread)
            return
        requesters = self._take_interrupts(thread)
        if requesters:
            thread.holds.update(requesters)
            self._send_stop(thread, {cid: [] for cid in requesters}, reason="interrupt")
        self._release(thread)

    def _new_thread(self, target: TargetRec, thread: ThreadRec) -> None:
        """A new thread's first stop (it is seized now and has run no instruction): held
        for the attached clients that asked (``hold_threads``; each gets a ``stop`` of
        reason "thread" first), then every attached client gets the ``thread`` event."""
        holders = {
            cid for cid in target.hold_new & target.attached if cid in self._clients
        }
        if holders:
            thread.holds.update(holders)
            self._send_stop(thread, {cid: [] for cid in holders}, reason="thread")
        self._tell_thread(target, thread.tid, "new")

    def _tell_thread(self, target: TargetRec, tid: int, state: str, **extra: Any) -> None:
        """A ``thread`` event for every client attached to ``target`` (a debugger keeps
        its thread list from them). ``state`` "new" is sent at the new thread's first stop:
        only then is it seized, so a ``hold_all`` answered after the event includes it."""
        fields = {"pid": target.pid, "tid": tid, "state": state, **extra}
        for cid in sorted(target.attached):
            if cid in self._clients:
                self._emit(cid, "thread", dict(fields), False)

    def _orphan_stop(self, tid: int, sig: int) -> None:
        """A stop of a thread no target claims (its process was let go): let it go too."""
        try:
            if sig == SIGTRAP and self._port.siginfo(tid).perf_data & TOKEN_MASK == TOKEN_MAGIC:
                sig = 0
            self._port.detach(tid, sig)
        except NoSuchProcessError:
            pass

    def _on_sigtrap(self, thread: ThreadRec) -> None:
        info = self._port.siginfo(thread.tid)
        log.debug(
            "thread %d: SIGTRAP si_code %d perf data %#x (step in flight: %s)",
            thread.tid,
            info.code,
            info.perf_data,
            thread.step_in_flight,
        )
        ours = info.code == TRAP_PERF and info.perf_data & TOKEN_MASK == TOKEN_MAGIC
        # The trap of a step we issued is ours even if every client that asked for it has
        # gone meanwhile (stepping over a syscall reports it as TRAP_BRKPT). A foreign
        # SIGTRAP that comes first leaves the step in flight (it is stepped again).
        step_done = thread.step_in_flight and (
            info.code in (TRAP_TRACE, TRAP_BRKPT, TRAP_HWBKPT) or ours
        )
        stepped = set(thread.stepping) if step_done else set()
        if step_done:
            thread.stepping.clear()
            thread.step_in_flight = False
        hit: set[Spec] = set()
        credited: dict[Spec, list[WatchRec]] = {}  # per slot: the watches that matched
        carried: set[Spec] = set()  # reopened in another mode since this trap's hit
        for spec, slot in thread.slots.items():
            advanced = self._refresh(slot)
            if slot.mode is Mode.STOP or slot.unrouted:
                # This trap's hits, and those a read since the last trap counted already
                # (SlotRec.unrouted) — of the watches still on the slot. A slot reopened
                # in another mode since the hit carries them over (SlotHandling._owed, _slots.py).
                if slot.mode is not Mode.STOP:
                    carried.add(spec)
                advanced = [w for w in slot.unrouted if w in slot.watches]
                slot.unrouted = []
            if advanced:
                hit.add(spec)
                credited[spec] = advanced
        claimed = ours or step_done
        # A hit without DR6 that the kernel neither counted nor sampled: credited here.
        uncounted: Spec | None = None
        if not claimed and info.code == TRAP_BRKPT and thread.had_slots:
            claimed = self._empty_dr6_trap(thread, info.addr)
            if claimed and len(thread.slots) == 1:
                (uncounted,) = thread.slots
                hit.add(uncounted)
                credited[uncounted] = list(thread.slots[uncounted].watches)
                for watch in credited[uncounted]:
                    watch.count += 1
        thread.resume_sig = 0 if claimed else SIGTRAP
        if not claimed:
            self.counters["sigtraps_delivered"] += 1
            log.info(
                "thread %d: SIGTRAP (si_code %d, perf data %#x) is not the daemon's: delivered",
                thread.tid,
                info.code,
                info.perf_data,
            )
        # Hits counted by slots closed since (ThreadRec.owed): told if their watch lives on.
        owed, thread.owed = thread.owed, []
        if thread.detaching:
            self._resume_now(thread)
            return
        stops: dict[int, list[int]] = defaultdict(list)
        notifies: dict[int, list[int]] = defaultdict(list)
        for watch in owed:
            if watch.ended is None and self._watches.get(watch.id) is watch:
                if watch.mode is Mode.STOP:
                    stops[watch.client].append(watch.id)
                elif watch.mode is Mode.NOTIFY:
                    notifies[watch.client].append(watch.id)
        for spec in hit:
            slot = thread.slots[spec]
            for watch in credited[spec]:
                if watch.mode is Mode.STOP:
                    stops[watch.client].append(watch.id)
                elif watch.mode is Mode.NOTIFY and (
                    spec in carried
                    or (
                        (slot.mode is Mode.STOP or spec == uncounted)
                        and not (self._bpf and slot.filtered)  # its filter writes hit records
                    )
                ):
                    notifies[watch.client].append(watch.id)
        for cid in stepped:
            stops.setdefault(cid, [])
        interrupted = self._take_interrupts(thread)
        for cid in interrupted:
            stops.setdefault(cid, [])
        # A filtered slot read the watched bytes at the hit: stop and hit events carry them,
        # when one such slot was hit (two at once would leave "new" ambiguous).
        values = [v for s in hit if thread.slots[s].filtered and (v := thread.slots[s].values)]
        extra = {"new": values[0][0], "old": values[0][1]} if len(values) == 1 else {}
        if hit:
            self.counters["traps"] += 1
        # Registers are read once per trap, for notify hits and every stop event alike.
        regs = self._port.getregs(thread.tid) if (notifies or stops) else {}
        if notifies:
            ip = regs.get("rip", 0)
            now = self._clock()
            self.counters["hits_notified"] += 1
            for cid, wids in notifies.items():
                self._emit(
                    cid,
                    "hit",
                    {"watches": wids, "tid": thread.tid, "ip": ip, "time": now, **extra},
                    True,
                )
        dr6 = self.on_trap_hook(thread, hit, stepped) if self.on_trap_hook is not None else {}
        if not stops:
            self._resume_now(thread)
            return
        thread.holds.update(stops)
        # Per client: a completed step is "step" to its requester even when the same trap
        # is another client's watch hit (one trap, two meanings).
        reasons = {
            cid: "step" if cid in stepped else "watch" if wids else "interrupt"
            for cid, wids in stops.items()
        }
        if self._park and thread.resume_sig == 0:
            # Move the thread to an interrupt stop before telling anyone (module docstring).
            thread.parked_events = [
                (
                    cid,
                    {
                        "watches": wids,
                        "reason": reasons[cid],
                        **({"dr6": dr6[cid]} if cid in dr6 else {}),
                        **(extra if wids else {}),
                    },
                )
                for cid, wids in stops.items()
            ]
            self._port.interrupt(thread.tid)
            self._port.cont(thread.tid, 0)
            thread.interrupt_sent = True
            thread.state = ThreadState.PARKING
            return
        for reason in set(reasons.values()):
            group = {cid: wids for cid, wids in stops.items() if reasons[cid] == reason}
            self._send_stop(thread, group, reason=reason, dr6=dr6, regs=regs, extra=extra)

    def _send_stop(
        self,
        thread: ThreadRec,
        stops: Mapping[int, list[int]],
        *,
        reason: str,
        dr6: Mapping[int, int] | None = None,
        regs: dict[str, int] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if regs is None:
            regs = self._port.getregs(thread.tid)
        self.counters["stops_reported"] += 1
        for cid, wids in stops.items():
            fields: dict[str, Any] = {
                "pid": thread.pid,
                "tid": thread.tid,
                "watches": wids,
                "reason": reason,
                "regs": regs,
            }
            if dr6 and cid in dr6:
                fields["dr6"] = dr6[cid]
            if extra and (wids or reason == "signal"):
                fields.update(extra)
            self._emit(cid, "stop", fields, False)

    def _event_stop(self, thread: ThreadRec) -> None:
        """At an interrupt stop: finish parking, serve interrupt requests, then release."""
        if thread.parked_events:
            events, thread.parked_events = thread.parked_events, []
            regs = self._port.getregs(thread.tid)
            for cid, extra in events:
                if cid in thread.holds:
                    self._emit(
                        cid,
                        "stop",
                        {"pid": thread.pid, "tid": thread.tid, "regs": regs, **extra},
                        False,
                    )
            self.counters["stops_reported"] += 1
        requesters = self._take_interrupts(thread)
        if requesters:
            thread.holds.update(requesters)
            self._send_stop(thread, {cid: [] for cid in requesters}, reason="interrupt")
        self._release(thread)

    def _take_interrupts(self, thread: ThreadRec) -> set[int]:
        """The clients waiting for an interrupt stop, served by this stop, whatever it is.

        Any ptrace-stop consumes a pending PTRACE_INTERRUPT (kernel/signal.c, ptrace_stop:
        "any trap clears pending STOP trap"), so the stop that comes first — a signal, a
        clone, a hit — is the interrupt stop; none other will follow.
        """
        thread.interrupt_sent = False
        if thread.detaching or not thread.interrupt_requesters:
            return set()
        requesters, thread.interrupt_requesters = thread.interrupt_requesters, set()
        return requesters

    def _release(self, thread: ThreadRec) -> None:
        """Resume a stopped thread if nobody holds it any more."""
        if thread.state is not ThreadState.STOPPED or thread.holds:
            return
        self._resume_now(thread)

    def _reopen_later(self, thread: ThreadRec) -> None:
        """Stop a running thread so that its slots can change mode (see _reconcile)."""
        thread.reopen = True
        self._interrupt_if_running(thread)

    def _interrupt_if_running(self, thread: ThreadRec) -> None:
        """PTRACE_INTERRUPT a thread that runs (or sits in a group-stop), once."""
        if (
            thread.state in (ThreadState.RUNNING, ThreadState.LISTENING)
            and not thread.interrupt_sent
        ):
            try:
                self._port.interrupt(thread.tid)
                thread.interrupt_sent = True
            except NoSuchProcessError:
                pass

    def _empty_dr6_trap(self, thread: ThreadRec, after: int) -> bool:
        """Whether a ``TRAP_BRKPT`` with no step of ours in flight is a debug exception of
        our breakpoints whose DR6 came back empty (the kernel's "icebp" case) rather than
        the program's own ``int1`` (ending at ``after``, or starting there where ``int1`` is
        a fault). Without DR6 the kernel neither
        counted nor sampled the hit, nor raised the breakpoint's own SIGTRAP. With one slot
        on the thread the hit can only be that slot's (the caller credits it); with more,
        nobody knows which fired, and every owner of a watch on the thread is told a hit
        may be lost. A thread whose slots were all closed meanwhile (the trap was already
        on its way) still has it suppressed: it had our breakpoints, and nothing else on
        it raises debug exceptions."""
        where = after if self._int1_faults else after - 1
        try:
            own_int1 = self._port.read_memory(thread.pid, where, 1) == b"\xf1"
        except HwbkptError:
            own_int1 = True  # cannot tell: the program's own trap, as before
        if own_int1:
            return False
        self.counters["empty_dr6_traps"] += 1
        single = len(thread.slots) == 1
        log.warning(
            "thread %d: debug exception with an empty DR6 after %#x (a hit of ours the CPU "
            "did not report): suppressed, %s",
            thread.tid,
            after,
            "credited to the thread's only slot" if single else "owners told of a lost hit",
        )
        if single:
            return True
        owners = {w.client for slot in thread.slots.values() for w in slot.watches}
        lost = {"count": 1, "what": "hit", "where": "cpu", "tid": thread.tid}
        for cid in sorted(owners):
            self._emit(cid, "lost", dict(lost), True)
        return True

    def _resume_now(self, thread: ThreadRec) -> None:
        if thread.reopen and not thread.detaching:
            thread.reopen = False
            self._reconcile(thread)  # stopped now: reopen what waits for another mode
        if thread.signal_stop is not None:
            self._settle_signal(thread)
        sig, thread.resume_sig = thread.resume_sig, 0
        tid = thread.tid
        try:
            if thread.detaching:
                self._detach_stopped(thread, sig)
                return
            if thread.step_requesters:
                thread.stepping |= thread.step_requesters
                thread.step_requesters = set()
            # A step not yet completed (a signal came first) is stepped again. A plain CONT
            # does not clear step_in_flight: a step over a syscall queues its trap at the
            # syscall's exit, before an interrupt stop there is taken, so it may still come
            # after its requester left; only that trap clears it.
            stepping = bool(thread.stepping)
            log.debug(
                "thread %d: %s with signal %d (stepping for %s)",
                tid,
                "singlestep" if stepping else "cont",
                sig,
                thread.stepping,
            )
            if stepping:
                thread.step_in_flight = thread.may_trap = True
                self._port.singlestep(tid, sig)
            else:
                self._port.cont(tid, sig)
        except NoSuchProcessError:
            pass  # died meanwhile (SIGKILL); its exit status follows
        thread.state = ThreadState.RUNNING

    def _on_clone(self, parent: ThreadRec) -> None:
        new_tid = self._port.eventmsg(parent.tid)
        if new_tid and new_tid not in self._threads:
            target = self.targets.get(parent.pid)
            if target is not None:
                self._add_thread(target, new_tid, ThreadState.NEW)

    def _on_exit_stop(self, thread: ThreadRec) -> None:
        """PTRACE_EVENT_EXIT: last chance to read the thread's counters. Its slots stay
        closed until its end is reported (``_reconcile`` leaves an exiting thread alone)."""
        thread.exiting = True
        for spec in list(thread.slots):
            self._close_slot(thread, spec)

    def _on_exec(self, thread: ThreadRec) -> None:
        """execve replaced the program: every watch on it ends (the kernel flushed DRs)."""
        target = self.targets[thread.pid]
        for other in list(target.threads.values()):
            if other is not thread:
                self._forget_thread(other, reason=None)
        for spec in list(thread.slots):
            self._close_slot(thread, spec)
        thread.busy.clear()
        owners = set(target.clients)
        for watch in list(target.watches.values()):
            owners.add(watch.client)
            self._end_watch(watch, "exec")  # ended, final count kept (DESIGN §5.5)
        if self.forget_hook is not None:
            self.forget_hook(target.pid, [thread.tid])
        for cid in owners:
            if cid in self._clients:
                self._emit(cid, "exec", {"pid": target.pid}, False)
        # Debuggers stay with the new program (a debugger expects to, PROTOCOL.md attach):
        # the thread is held for each of them at its first instruction, as at a stop.
        attached = {cid for cid in target.attached if cid in self._clients}
        target.clients = set(attached)
        target.attached = set(attached)
        target.signal_clients = {
            cid: passed for cid, passed in target.signal_clients.items() if cid in attached
        }
        thread.holds.clear()
        self.counters["execs"] += 1
        requesters = self._take_interrupts(thread) - attached
        if attached:
            thread.holds.update(attached)
            self._send_stop(thread, {cid: [] for cid in attached}, reason="exec")
        if requesters:
            thread.holds.update(requesters)
            self._send_stop(thread, {cid: [] for cid in requesters}, reason="interrupt")
        self._maybe_detach(target)
        if thread.tid in self._threads:
            self._release(thread)

    def _forget_thread(self, thread: ThreadRec, reason: str | None) -> None:
        """A thread is gone: free its slots and holds."""
        for spec in list(thread.slots):
            self._close_slot(thread, spec)
        self._threads.pop(thread.tid, None)
        target = self.targets.get(thread.pid)
        if target is None:
            return
        target.threads.pop(thread.tid, None)
        for watch in target.watches_of(thread.tid):
            if (
                watch.states.pop(thread.tid, None) is not None
                and reason
                and watch.tid == thread.tid
            ):
                self._emit(
                    watch.client,
                    "uninstalled",
                    {"watch": watch.id, "tid": thread.tid, "reason": reason},
                    False,
                )
        if self.forget_hook is not None:
            self.forget_hook(thread.pid, [thread.tid])

    def _end_target(self, target: TargetRec, code: int | None, sig: int | None) -> None:
        """The process is gone: end every watch on it and tell the owners."""
        for thread in list(target.threads.values()):
            self._forget_thread(thread, reason=None)
        owners = set(target.clients)
        for watch in list(target.watches.values()):
            owners.add(watch.client)
            self._end_watch(watch, "exit", code, sig)  # ended, final count kept
        self.targets.pop(target.pid, None)
        if target.detaching:
            return
        for cid in owners:
            if cid in self._clients:
                self._emit(
                    cid,
                    "exit",
                    {"pid": target.pid, "tid": target.pid, "code": code, "signal": sig},
                    False,
                )

    def _maybe_detach(self, target: TargetRec) -> None:
        if target.detaching or target.pid not in self.targets:
            return
        if target.watches or target.attached:
            return
        for thread in target.threads.values():
            if (
                thread.holds
                or thread.interrupt_requesters
                or thread.parked_events
                or thread.step_requesters
            ):
                return
        if self.interest_hook is not None and self.interest_hook(target.pid):
            return
        self._begin_detach(target)

    def _begin_detach(self, target: TargetRec) -> None:
        target.detaching = True
        self.counters["detaches"] += 1
        for thread in list(target.threads.values()):
            thread.detaching = True
            for spec in list(thread.slots):
                self._close_slot(thread, spec)
            if thread.state is ThreadState.STOPPED:
                self._resume_now(thread)
            else:
                self._interrupt_if_running(thread)
        if not target.threads:
            self.targets.pop(target.pid, None)

    def _detach_stopped(self, thread: ThreadRec, sig: int) -> None:
        """Detach a stopped thread, unless a SIGTRAP of ours is still queued for it."""
        if sig == 0 and thread.may_trap and self._port.pending_signals(thread.tid) & SIGTRAP_BIT:
            # Let it take the queued trap while still traced: it stops at once in its
            # signal-delivery-stop, where _on_sigtrap suppresses it and detaches. (No
            # PTRACE_INTERRUPT as well: a trap stop is checked before signals are dequeued,
            # so it would stop again with the SIGTRAP still queued, for ever.)
            self._port.cont(thread.tid, 0)
            thread.state = ThreadState.RUNNING
            return
        try:
            self._port.detach(thread.tid, sig)
        except NoSuchProcessError:
            pass
        thread.state = ThreadState.RUNNING
        self._threads.pop(thread.tid, None)
        target = self.targets.get(thread.pid)
        if target is not None:
            target.threads.pop(thread.tid, None)
            if not target.threads and target.detaching:
                self.targets.pop(target.pid, None)
