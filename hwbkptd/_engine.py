"""The engine: watches, shared slots, hit routing, stop holds and the SIGTRAP decision.

Theory of operation
-------------------
The engine is pure state. It makes no system call itself: it is told *facts* — a client's
request, or what ``waitpid`` reported for a thread — and acts through a :class:`Port`, a
narrow interface to the kernel layer (``hwbkptd/_tracer.py`` adapts ``_kernel.py`` to it;
tests drive the engine with a fake). Everything it has to tell clients goes through the
``emit`` callback, which only queues.

*Targets and threads.* A target is a process whose threads the daemon has seized
(``PTRACE_SEIZE`` with TRACECLONE/EXEC/EXIT). Seizing does not stop anything; threads run
until they hit something. A thread is ``RUNNING``, ``STOPPED`` (in a ptrace-stop the daemon
still owes a resume for), ``LISTENING`` (group-stop, job control), ``PARKING`` (being moved
from a SIGTRAP signal-delivery-stop to an interrupt stop, see below) or ``NEW`` (created
by a traced thread; it starts in an event stop the engine has not seen yet).

*Slots and counts.* Per thread, the best-ranked specs hold the four slots, each one
kernel breakpoint event shared by every watch of that spec on that thread; every event
counts every hit, and each watch is credited with the counter's deltas since it was
installed (:mod:`hwbkptd._slots`). Hits are routed by those deltas rather than by the
SIGTRAP's ``si_perf_data``: one instruction can fire two events and yield one SIGTRAP
(legacy signals coalesce; DESIGN §4).

The ptrace side — stops, holds, whose SIGTRAP, thread life and detach — is in
:mod:`hwbkptd._stops`; the slots and their counters in :mod:`hwbkptd._slots`; the records
they share in :mod:`hwbkptd._records`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

from hwbkpt_proto import (
    LimitExceededError,
    NoSpaceError,
    NoSuchProcessError,
    NotFoundError,
    PermissionDeniedError,
)
from hwbkptd._alloc import CAPACITY, Want, choose
from hwbkptd._cond import Condition
from hwbkptd._model import Mode, Spec
from hwbkptd._prepared import PreparedStops
from hwbkptd._records import (
    TOKEN_MAGIC,
    ClientRec,
    Emit,
    Port,
    SigInfo,
    SlotRec,
    TargetRec,
    ThreadRec,
    ThreadState,
    WatchRec,
)
from hwbkptd._signals import SignalHandling
from hwbkptd._slots import SlotHandling
from hwbkptd._stops import StopHandling

__all__ = [
    "TOKEN_MAGIC",
    "Engine",
    "Port",
    "SigInfo",
    "ThreadState",
    "WatchRec",
]

log = logging.getLogger(__name__)

# A slot's hit records say which notify conditions held in one 64-bit mask (hwbkptd/_bpf.py).
MAX_NOTIFY_CONDITIONS = 64


class Engine(StopHandling, SignalHandling, PreparedStops, SlotHandling):
    """All daemon state that is not I/O. See the module docstring."""

    def __init__(
        self,
        port: Port,
        emit: Emit,
        *,
        park: bool = False,
        clock: Callable[[], int] = time.monotonic_ns,
        int1_faults: bool = False,
        bpf: bool = True,
    ) -> None:
        """``int1_faults``: this CPU reports the program's own ``int1`` *at* its 0xF1 byte
        rather than after it (:func:`hwbkptd._platform.int1_faults` measures it). ``bpf``:
        the port evaluates conditions in the kernel; else at a ptrace stop of every hit, so
        a slot with conditions is then opened in stop mode."""
        self._port = port
        self._bpf = bpf
        self._emit = emit
        self._park = park
        self._int1_faults = int1_faults
        self._clock = clock
        self._clients: dict[int, ClientRec] = {}
        self.targets: dict[int, TargetRec] = {}
        self._threads: dict[int, ThreadRec] = {}
        self._watches: dict[int, WatchRec] = {}
        self._tokens: dict[int, tuple[ThreadRec, SlotRec]] = {}
        self._ids = itertools.count(1)
        self._seq = itertools.count(1)
        self._token_ids = itertools.count(1)
        self.counters: dict[str, int] = defaultdict(int)
        # Hooks for per-client virtual debug registers (hwbkptd/_rpc.py sets them).
        self.on_trap_hook: Callable[[ThreadRec, set[Spec], set[int]], dict[int, int]] | None = None
        self.interest_hook: Callable[[int], bool] | None = None
        self.forget_hook: Callable[[int, Iterable[int]], None] | None = None
        # Whether on_trap_hook has work at a trap of this thread (the compiled stop round
        # leaves such threads to the engine: hwbkptd/_prepared.py).
        self.trap_hook_wants: Callable[[int], bool] | None = None

    def add_client(self, cid: int) -> None:
        self._clients[cid] = ClientRec(cid)

    def remove_client(self, cid: int) -> None:
        """Drop everything ``cid`` owned: watches, holds, step and interrupt requests."""
        client = self._clients.pop(cid, None)
        if client is None:
            return
        touched: set[TargetRec] = set()
        for watch in list(client.watches.values()):
            if watch.ended is not None:
                continue  # its process is gone (or is another now): nothing to touch
            target = self.targets.get(watch.pid)
            if target is not None:
                touched.add(target)
            self._drop_watch(watch, reason=None)
        for target in list(self.targets.values()):
            target.clients.discard(cid)
            target.signal_clients.pop(cid, None)
            if cid in target.attached:
                target.attached.discard(cid)
                touched.add(target)
            for thread in list(target.threads.values()):
                thread.step_requesters.discard(cid)
                thread.stepping.discard(cid)
                thread.interrupt_requesters.discard(cid)
                thread.parked_events = [(c, f) for c, f in thread.parked_events if c != cid]
                if cid in thread.holds:
                    thread.holds.discard(cid)
                    touched.add(target)
        for target in touched:
            self._reconcile_target(target)
            for thread in list(target.threads.values()):
                self._release(thread)
            self._maybe_detach(target)

    def client_watch_count(self, cid: int) -> int:
        """The client's watches, ended ones included (they count against its limit)."""
        return len(self._clients[cid].watches)

    def client_ended_count(self, cid: int) -> int:
        """How many of the client's watches have ended (kept until it removes them)."""
        return sum(1 for w in self._clients[cid].watches.values() if w.ended is not None)

    def watch(
        self,
        cid: int,
        pid: int,
        spec: Spec,
        mode: Mode,
        *,
        tid: int | None = None,
        priority: int = 0,
        vdr_slot: int | None = None,
        condition: Condition | None = None,
    ) -> WatchRec:
        """Create a watch and try to install it.

        ``condition`` (parsed for ``spec.length``): only hits for which it is true count,
        notify or stop; it is evaluated in the kernel by the slot's filter program.

        Raises NoSuchProcessError (no such process or thread), BusyError (traced by someone
        else), PermissionDeniedError (the kernel refused to seize it), LimitExceededError
        (more than MAX_NOTIFY_CONDITIONS notify watches with conditions on one key).
        """
        if condition is not None and mode is Mode.NOTIFY:
            same = [
                w
                for w in self.targets[pid].watches.values()
                if w.spec == spec and w.mode is Mode.NOTIFY and w.condition is not None
            ] if pid in self.targets else []  # fmt: skip
            if len(same) >= MAX_NOTIFY_CONDITIONS:
                raise LimitExceededError(
                    f"{len(same)} notify watches with conditions share this address already; "
                    f"one slot's program tells at most {MAX_NOTIFY_CONDITIONS} of them apart"
                )
        target = self._ensure_target(pid)
        if tid is not None and tid not in target.threads:
            self._maybe_detach(target)
            raise NoSuchProcessError(f"thread {tid} is not a thread of process {pid}")
        watch = WatchRec(
            id=next(self._ids),
            client=cid,
            pid=pid,
            tid=tid,
            spec=spec,
            mode=mode,
            priority=priority,
            seq=next(self._seq),
            vdr_slot=vdr_slot,
            condition=condition,
            path=None if condition is None else "bpf" if self._bpf else "ptrace",
        )
        self._clients[cid].watches[watch.id] = watch
        self._watches[watch.id] = watch
        target.add_watch(watch)
        target.clients.add(cid)
        self.counters["watches_created"] += 1
        for thread in self._threads_for(target, tid):
            watch.states[thread.tid] = "pending"
            self._reconcile(thread, fresh=(watch,))
        return watch

    def replace_raw(
        self,
        cid: int,
        tid: int,
        remove: Iterable[WatchRec],
        add: Iterable[tuple[Spec, int, int | None]],
    ) -> list[WatchRec]:
        """Swap raw debug-register watches of ``cid`` on ``tid`` all at once, or not at all.

        ``add`` holds ``(spec, virtual slot, seq)``: stop-mode, thread-scope watches (``seq``
        keeps a restored watch's place among equals; ``None`` takes a new one). Raises
        NoSpaceError, changing nothing, when one of them cannot hold a slot now — as the
        kernel refuses a DR7 write it cannot realize.
        """
        thread = self._thread(tid)
        target = self.targets[thread.pid]
        remove = list(remove)
        add = list(add)
        gone = {w.id for w in remove}
        # Dry run: would every added spec be among the chosen ones?
        wants: dict[Spec, Want] = {}
        for watch in target.watches_of(tid):
            if watch.id not in gone:
                wants[watch.spec] = self._merge_want(
                    wants.get(watch.spec), watch.spec, watch.priority, watch.seq
                )
        for spec, _slot, seq in add:
            wants[spec] = self._merge_want(
                wants.get(spec), spec, 0, seq if seq is not None else 1 << 62
            )
        chosen = choose(wants.values(), thread.busy)
        if any(spec not in chosen for spec, _, _ in add):
            raise NoSpaceError(
                f"all {CAPACITY} hardware slots of thread {tid} are in use by watches that rank "
                "higher (see `hwbkpt status`); the kernel would say ENOSPC"
            )
        for watch in remove:
            self._drop_watch(watch, reason=None)
        made = []
        for spec, slot_no, seq in add:
            watch = WatchRec(
                id=next(self._ids),
                client=cid,
                pid=thread.pid,
                tid=tid,
                spec=spec,
                mode=Mode.STOP,
                priority=0,
                seq=seq if seq is not None else next(self._seq),
                vdr_slot=slot_no,
            )
            watch.states[tid] = "pending"
            self._clients[cid].watches[watch.id] = watch
            self._watches[watch.id] = watch
            target.add_watch(watch)
            made.append(watch)
        target.clients.add(cid)
        self._reconcile(thread, fresh=made)
        if any(w.states.get(tid) != "installed" for w in made):
            # The kernel refused (something outside the daemon took a slot): undo.
            for watch in made:
                self._drop_watch(watch, reason=None)
            for watch in remove:
                self._restore(watch)
            self._reconcile(thread)
            raise NoSpaceError(f"the kernel has no free hardware slot on thread {tid} (ENOSPC)")
        return made

    def _restore(self, watch: WatchRec) -> None:
        self._clients[watch.client].watches[watch.id] = watch
        self._watches[watch.id] = watch
        self.targets[watch.pid].add_watch(watch)

    @staticmethod
    def _merge_want(old: Want | None, spec: Spec, priority: int, seq: int) -> Want:
        if old is None:
            return Want(spec, priority, seq)
        return Want(spec, max(old.priority, priority), min(old.seq, seq))

    def ensure_thread(self, tid: int) -> ThreadRec:
        """The managed thread ``tid``, seizing its process first if need be.

        Raises NoSuchProcessError, BusyError (traced by another tracer).
        """
        thread = self._threads.get(tid)
        if thread is not None and not thread.detaching:
            return thread
        target = self._ensure_target(self._port.tgid_of(tid))
        thread = target.threads.get(tid)
        if thread is None:
            self._maybe_detach(target)
            raise NoSuchProcessError(f"there is no thread {tid}")
        return thread

    def release_interest(self, pid: int) -> None:
        """Raw debug registers of ``pid`` were dropped: detach if nothing else needs it."""
        target = self.targets.get(pid)
        if target is not None:
            self._maybe_detach(target)

    def unwatch(self, cid: int, wid: int) -> None:
        """Remove a watch (an ended one too). Raises NotFoundError if ``cid`` has no watch
        ``wid``."""
        watch = self._own_watch(cid, wid)
        if watch.ended is not None:
            self._drop_watch(watch, reason=None)
            return
        target = self.targets.get(watch.pid)
        self._drop_watch(watch, reason=None)
        if target is not None:
            for thread in self._threads_for(target, watch.tid):
                self._reconcile(thread)
            self._maybe_detach(target)

    def list_watches(self, cid: int) -> list[WatchRec]:
        return list(self._clients[cid].watches.values())

    def count(self, cid: int, wid: int) -> int:
        """Hits of this watch since it was installed (counters read now); an ended watch
        answers its final count. Raises NotFoundError if ``cid`` has no watch ``wid``."""
        watch = self._own_watch(cid, wid)
        if watch.ended is not None:
            return watch.count  # final: its slots were read as they closed
        target = self.targets.get(watch.pid)
        if target is not None:
            for thread in self._threads_for(target, watch.tid):
                slot = thread.slots.get(watch.spec)
                if slot is not None:
                    self._refresh(slot)
        return watch.count

    def pid_of(self, tid: int) -> int | None:
        """The process of a managed thread, or ``None`` if the daemon does not manage it."""
        thread = self._threads.get(tid)
        return thread.pid if thread is not None else None

    def on_samples(
        self, token: int, samples: Iterable[tuple[int, ...]], lost: int, throttled: int = 0
    ) -> None:
        """What was drained from a notify-mode slot's ring: hits, losses, and throttling.

        ``throttled`` counts the times the kernel's sample-rate limit
        (kernel.perf_event_max_sample_rate) stopped the event for the rest of a tick: hits
        in that time were neither sampled nor *counted*, so every owner of the slot is told
        (``throttled`` event) and its count is marked inexact.
        """
        entry = self._tokens.get(token)
        if entry is None:
            return
        thread, slot = entry
        if throttled:
            self.counters["throttled"] += throttled
            owners: dict[int, list[int]] = defaultdict(list)
            for watch in slot.watches:
                watch.exact = False
                owners[watch.client].append(watch.id)
            for cid, wids in owners.items():
                self._emit(
                    cid,
                    "throttled",
                    {"watches": wids, "tid": thread.tid, "times": throttled},
                    False,
                )
        by_client: dict[int, list[int]] = defaultdict(list)
        for watch in slot.watches:
            if watch.mode is Mode.NOTIFY:
                by_client[watch.client].append(watch.id)
        if not by_client:
            return
        samples = list(samples)
        if samples and len(samples[0]) == 6:
            self._on_records(thread, slot, samples)
        elif samples:
            self.counters["hits_notified"] += len(samples)
            if len(samples) == 1:
                tid, ip, when = samples[0]
                for cid, wids in by_client.items():
                    self._emit(
                        cid, "hit", {"watches": wids, "tid": tid, "ip": ip, "time": when}, True
                    )
            else:
                # One event for the batch, fields as arrays (PROTOCOL.md, `hits`).
                tids, ips, times = (list(column) for column in zip(*samples, strict=True))
                for cid, wids in by_client.items():
                    self._emit(
                        cid, "hits", {"watches": wids, "tid": tids, "ip": ips, "time": times}, True
                    )
        if lost:
            self.counters["hits_lost_ring"] += lost
            for cid in by_client:
                self._emit(cid, "lost", {"count": lost, "what": "hit", "where": "ring"}, True)

    @staticmethod
    def _records_of(slot: SlotRec) -> bool:
        """Whether the slot's filter writes hit records (it has notify watches)."""
        return bool(slot.filtered) and (
            slot.flags[1] or any(w.mode is Mode.NOTIFY for w in slot.filtered)
        )

    def _on_records(
        self, thread: ThreadRec, slot: SlotRec, records: list[tuple[int, ...]]
    ) -> None:
        """Hit records of a filtered slot: each to the notify watches it matched.

        ``mask`` bit *k* stands for the *k*-th conditional notify watch of the slot's filter
        (hwbkptd/_bpf.py); unconditional notify watches get every record. Runs of records
        for the same watches of a client go out as one ``hits`` event, with the values.
        """
        conditional = [w for w in slot.filtered if w.mode is Mode.NOTIFY]
        plain = [w for w in slot.watches if w.mode is Mode.NOTIFY and w.condition is None]
        # Who gets a record depends on its mask only: route each mask once per batch.
        routes: dict[int, list[tuple[int, list[int]]]] = {}
        runs: dict[int, list[tuple[list[int], list[tuple[int, ...]]]]] = defaultdict(list)
        for record in records:
            mask = record[5]
            route = routes.get(mask)
            if route is None:
                matched = list(plain)
                for k, watch in enumerate(conditional):
                    if mask >> k & 1 and watch in slot.watches:
                        matched.append(watch)
                by_client: dict[int, list[int]] = defaultdict(list)
                for watch in matched:
                    by_client[watch.client].append(watch.id)
                route = routes[mask] = list(by_client.items())
            for cid, wids in route:
                mine = runs[cid]
                if mine and mine[-1][0] is wids:
                    mine[-1][1].append(record)
                else:
                    mine.append((wids, [record]))
        self.counters["hits_notified"] += len(records)
        for cid, mine in runs.items():
            for wids, run in mine:
                if len(run) == 1:
                    tid, ip, when, new, old, _ = run[0]
                    fields = {"watches": wids, "tid": tid, "ip": ip, "time": when}
                    self._emit(cid, "hit", fields | {"new": new, "old": old}, True)
                    continue
                tids, ips, times, news, olds, _ = (list(c) for c in zip(*run, strict=True))
                self._emit(
                    cid,
                    "hits",
                    {"watches": wids, "tid": tids, "ip": ips, "time": times, "new": news,
                     "old": olds},
                    True,
                )  # fmt: skip

    def retry_busy(self) -> None:
        """Try again to install specs the kernel refused with ENOSPC."""
        for thread in list(self._threads.values()):
            if thread.busy and thread.state is not ThreadState.NEW:
                thread.busy.clear()
                self._reconcile(thread)

    def shutdown(self) -> list[int]:
        """Close every slot and start detaching every thread; return the tids still traced.

        The caller keeps feeding wait statuses until :attr:`traced` is empty (or gives up).
        """
        for target in list(self.targets.values()):
            for watch in list(target.watches.values()):
                self._drop_watch(watch, reason=None)
            for thread in target.threads.values():
                thread.holds.clear()
                thread.step_requesters.clear()
                thread.interrupt_requesters.clear()
                thread.parked_events.clear()
            self._begin_detach(target)
        return self.traced()

    def traced(self) -> list[int]:
        return list(self._threads)

    def status(self) -> list[dict[str, Any]]:
        out = []
        for target in self.targets.values():
            threads = []
            for thread in target.threads.values():
                installed = {s for s in thread.slots}
                slots = []
                for slot in thread.slots.values():
                    self._refresh(slot)  # count-mode slots never trap: read them now
                    slots.append(
                        {
                            "addr": slot.spec.addr,
                            "length": slot.spec.length,
                            "access": slot.spec.access.value,
                            "mode": slot.mode.wire,
                            "hits": slot.last,
                            "watches": [w.id for w in slot.watches],
                            "holders": sorted({w.client for w in slot.watches}),
                            # Where the conditions of its watches are evaluated, if any.
                            "conditions": ("bpf" if self._bpf else "ptrace")
                            if slot.filtered
                            else None,
                        }
                    )
                pending = [w.id for w in target.watches_of(thread.tid) if w.spec not in installed]
                threads.append(
                    {
                        "tid": thread.tid,
                        "state": thread.state.value,
                        "slots": slots,
                        "pending": pending,
                        "held_by": sorted(thread.holds),
                    }
                )
            out.append(
                {
                    "pid": target.pid,
                    "detaching": target.detaching,
                    "watches": len(target.watches),
                    "threads": threads,
                }
            )
        return out

    def _own_watch(self, cid: int, wid: int) -> WatchRec:
        watch = self._clients[cid].watches.get(wid)
        if watch is None:
            raise NotFoundError(f"you have no watch with id {wid}")
        return watch

    def _thread(self, tid: int) -> ThreadRec:
        thread = self._threads.get(tid)
        if thread is None or thread.detaching:
            raise NoSuchProcessError(
                f"thread {tid} is not managed by the daemon: set a watch on its process first"
            )
        return thread

    def _known(self, tid: int) -> ThreadRec | None:
        """The thread record for ``tid``, creating it for a new thread of a target."""
        thread = self._threads.get(tid)
        if thread is not None:
            return thread
        try:
            pid = self._port.tgid_of(tid)
        except NoSuchProcessError:
            return None
        target = self.targets.get(pid)
        if target is None:
            return None
        return self._add_thread(target, tid, ThreadState.NEW)

    def _add_thread(self, target: TargetRec, tid: int, state: ThreadState) -> ThreadRec:
        thread = ThreadRec(tid=tid, pid=target.pid, state=state, detaching=target.detaching)
        target.threads[tid] = thread
        self._threads[tid] = thread
        for watch in target.watches_of(tid):
            watch.states[tid] = "pending"
        return thread

    def _ensure_target(self, pid: int) -> TargetRec:
        target = self.targets.get(pid)
        if target is not None and not target.detaching:
            return target
        if target is None:
            target = TargetRec(pid)
            self.targets[pid] = target
        else:
            # Re-used while detaching: keep the threads not yet let go.
            target.detaching = False
            for thread in target.threads.values():
                thread.detaching = False
        try:
            self._seize_all(target)
        except Exception:
            if not target.threads:
                del self.targets[pid]
            else:
                self._maybe_detach(target)
            raise
        return target

    def _seize_all(self, target: TargetRec) -> None:
        """Seize every thread; repeat until no thread appears that is not seized."""
        while True:
            tids = [t for t in self._port.threads_of(target.pid) if t not in target.threads]
            if not tids:
                return
            for tid in tids:
                try:
                    self._port.seize(tid)
                except (NoSuchProcessError, PermissionDeniedError):
                    # Another thread that exited meanwhile (or cannot be had) is skipped;
                    # the process's own main thread is the process: its error says why.
                    if tid == target.pid:
                        raise
                    continue
                self._add_thread(target, tid, ThreadState.RUNNING)
            if target.pid not in target.threads:
                raise NoSuchProcessError(f"process {target.pid} exited while being attached")

    def _threads_for(self, target: TargetRec, tid: int | None) -> list[ThreadRec]:
        """The threads a watch of scope ``tid`` applies to now (not those past their exit
        stop: a watch neither waits for a slot there nor is told it lost one)."""
        if tid is None:
            return [t for t in target.threads.values() if not t.exiting]
        thread = target.threads.get(tid)
        return [thread] if thread is not None and not thread.exiting else []

    def _drop_watch(self, watch: WatchRec, reason: str | None) -> None:
        """Forget a watch everywhere; ``reason`` set means its owner is told it ended."""
        self._watches.pop(watch.id, None)
        client = self._clients.get(watch.client)
        if client is not None:
            client.watches.pop(watch.id, None)
        if watch.ended is not None:
            return  # its target (if the pid has one now) is another story
        target = self.targets.get(watch.pid)
        if target is None:
            return
        target.discard_watch(watch)
        for thread in self._threads_for(target, watch.tid):
            slot = thread.slots.get(watch.spec)
            if slot is not None and watch in slot.watches:
                self._refresh(slot)
                slot.watches.remove(watch)

    def _end_watch(
        self, watch: WatchRec, reason: str, code: int | None = None, sig: int | None = None
    ) -> None:
        """The watch's process exited or called exec, or its thread exited (``reason``
        "exit", "exec", "thread-exit"): it leaves its target and its slots, whose counters
        were read as they closed, and is kept, ended, with its final count and the exit
        status, until its owner removes it (``unwatch``) or disconnects — the final count is
        what a user asks for right then (issue 10, point 3). Watches made by raw
        debug-register writes go with their registers (their owner never saw their id)."""
        self._drop_watch(watch, reason=None)
        client = self._clients.get(watch.client)
        if client is None or watch.vdr_slot is not None:
            return
        watch.ended, watch.exit_code, watch.exit_signal = reason, code, sig
        watch.states.clear()
        watch.reasons.clear()
        client.watches[watch.id] = watch
        self.counters["watches_ended"] += 1

    def _end_thread_watches(
        self, target: TargetRec, tid: int, code: int | None, sig: int | None
    ) -> None:
        """Thread ``tid`` exited while its process lives on: its thread-scope watches end;
        the process is let go if nothing else needs it."""
        for watch in list(target.scoped.get(tid, {}).values()):
            self._end_watch(watch, "thread-exit", code, sig)
        self._maybe_detach(target)

    def ended_watches(self) -> list[dict[str, Any]]:
        """Every client's ended watches, for ``status``."""
        return [
            {"client": client.id, **watch.describe()}
            for client in self._clients.values()
            for watch in client.watches.values()
            if watch.ended is not None
        ]
