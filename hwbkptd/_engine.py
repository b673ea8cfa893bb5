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

*Slots.* Per thread, :func:`hwbkptd._alloc.choose` decides which specs hold the four slots.
Each installed spec is one kernel breakpoint event (a :class:`SlotRec`) shared by every
watch of that spec on that thread, configured for the strongest mode among them
(stop > notify > count); when that changes the event is reopened.

*Counts.* Every event counts every hit. The engine remembers each event's last counter
value; a delta is credited to every watch installed on it. Deltas are taken at every trap,
before a slot closes, and when a client asks for a count, so each watch counts exactly the
hits since it was installed. Routing by counter deltas rather than by the SIGTRAP's
``si_perf_data`` is required: one instruction can fire two events and yield one SIGTRAP
(legacy signals coalesce; DESIGN §4).

*Whose SIGTRAP.* At a SIGTRAP signal-delivery-stop the signal is the daemon's if it is a
``TRAP_PERF`` carrying one of the daemon's tokens (``sig_data``), or the trap of a single
step the daemon requested. Those are suppressed. Anything else — ``kill``, the program's
own ``int3``, a trap flag it set itself — is delivered unchanged when the thread resumes,
even if the same stop also carried hits of ours.

*Holds.* A stop is reported to every client with a stop-mode watch that advanced (and to
a client whose step completed); the thread runs again only when every one of them has
resumed it, stepped it, or gone. A step request makes the next resume a single step; its
trap is reported only to the clients that asked for it.

*Parking.* A thread held in a SIGTRAP signal-delivery-stop would receive that SIGTRAP —
and most programs die of it — if the daemon were killed. Before reporting such a stop the
engine therefore moves the thread to an interrupt stop: ``PTRACE_INTERRUPT`` then
``PTRACE_CONT`` with the signal cancelled; the thread re-enters the kernel's signal loop,
finds the pending trap and stops again in a ``PTRACE_EVENT_STOP``, where a tracer's death
simply lets it run on. Clients are told of the stop once it is parked.

*Detach.* When nothing needs a target any more (no watch, no hold, no virtual debug
register in use) every slot is closed and every thread interrupted; at its next stop a
thread is detached — unless a SIGTRAP of ours is still queued for it, which would kill the
program after the detach: then it is continued once more, the trap swallowed, and
detached at the stop that follows.
"""

from __future__ import annotations

import enum
import itertools
import logging
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from hwbkpt_proto import (
    BusyError,
    InvalidArgumentError,
    NoSpaceError,
    NoSuchProcessError,
    NotFoundError,
    PermissionDeniedError,
)
from hwbkptd._alloc import CAPACITY, Want, choose
from hwbkptd._model import Mode, Spec

__all__ = [
    "TOKEN_MAGIC",
    "Engine",
    "Port",
    "SigInfo",
    "ThreadState",
    "WatchRec",
]

log = logging.getLogger(__name__)

# si_code values of SIGTRAP (include/uapi/asm-generic/siginfo.h).
TRAP_BRKPT = 1
TRAP_TRACE = 2
TRAP_HWBKPT = 4
TRAP_PERF = 6

# ptrace event numbers (include/uapi/linux/ptrace.h).
EVENT_CLONE = 3
EVENT_EXEC = 4
EVENT_EXIT = 6
EVENT_STOP = 128

# Every sig_data the daemon gives a stop-mode event carries this tag in its upper half, so a
# TRAP_PERF SIGTRAP is recognized as ours even after its event was closed or reopened.
TOKEN_MAGIC = 0x68776270 << 32  # "hwbp"
_TOKEN_MASK = 0xFFFFFFFF << 32

SIGTRAP = int(signal.SIGTRAP)
_SIGTRAP_BIT = 1 << (SIGTRAP - 1)


@dataclass(frozen=True, slots=True)
class SigInfo:
    """What the engine needs of a SIGTRAP's siginfo."""

    code: int
    perf_data: int


class Port(Protocol):
    """The kernel operations the engine uses (all errors are hwbkpt_proto errors)."""

    def seize(self, tid: int) -> None: ...
    def threads_of(self, pid: int) -> list[int]: ...
    def tgid_of(self, tid: int) -> int: ...
    def open_slot(self, tid: int, spec: Spec, mode: Mode, token: int) -> object: ...
    def close_slot(self, handle: object) -> None: ...
    def read_count(self, handle: object) -> int: ...
    def drain(self, handle: object, final: bool) -> tuple[list[tuple[int, int, int]], int, int]: ...
    def siginfo(self, tid: int) -> SigInfo: ...
    def eventmsg(self, tid: int) -> int: ...
    def cont(self, tid: int, sig: int) -> None: ...
    def singlestep(self, tid: int, sig: int) -> None: ...
    def interrupt(self, tid: int) -> None: ...
    def listen(self, tid: int) -> None: ...
    def detach(self, tid: int, sig: int) -> None: ...
    def getregs(self, tid: int) -> dict[str, int]: ...
    def setregs(self, tid: int, regs: Mapping[str, int]) -> None: ...
    def pending_signals(self, tid: int) -> int: ...


Emit = Callable[[int, str, dict[str, Any], bool], None]
"""``emit(client_id, kind, fields, droppable)`` queues one event for one client."""


class ThreadState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPED = "stopped"
    PARKING = "parking"
    LISTENING = "listening"


@dataclass(eq=False, slots=True)
class WatchRec:
    """One client's watch (logical breakpoint)."""

    id: int
    client: int
    pid: int
    tid: int | None
    spec: Spec
    mode: Mode
    priority: int
    seq: int
    count: int = 0
    # Per thread: "installed" or "pending", and why a pending one is not installed.
    states: dict[int, str] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    vdr_slot: int | None = None
    exact: bool = True  # False once the kernel throttled an event this watch counted on

    def applies_to(self, tid: int) -> bool:
        return self.tid is None or self.tid == tid

    @property
    def state(self) -> str:
        """ "installed" when installed on every thread it applies to, else "pending"."""
        if self.states and all(s == "installed" for s in self.states.values()):
            return "installed"
        return "pending"

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": self.pid,
            "tid": self.tid,
            "addr": self.spec.addr,
            "length": self.spec.length,
            "access": self.spec.access.value,
            "mode": self.mode.wire,
            "priority": self.priority,
            "state": self.state,
            "threads": dict(self.states),
            "count": self.count,
            "exact": self.exact,
        }


@dataclass(eq=False, slots=True)
class SlotRec:
    """One installed kernel breakpoint event, shared by every watch of its spec on a thread."""

    spec: Spec
    handle: object
    mode: Mode
    token: int
    last: int = 0
    watches: list[WatchRec] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class ThreadRec:
    tid: int
    pid: int
    state: ThreadState
    slots: dict[Spec, SlotRec] = field(default_factory=dict)
    busy: set[Spec] = field(default_factory=set)
    holds: set[int] = field(default_factory=set)
    resume_sig: int = 0
    step_requesters: set[int] = field(default_factory=set)
    stepping: set[int] = field(default_factory=set)
    interrupt_requesters: set[int] = field(default_factory=set)
    interrupt_sent: bool = False
    reopen: bool = False  # slots wait to be reopened in another mode at the next stop
    freed: bool = False  # a slot closed during the current reconcile pass
    parked_events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    detaching: bool = False


@dataclass(eq=False, slots=True)
class TargetRec:
    pid: int
    threads: dict[int, ThreadRec] = field(default_factory=dict)
    watches: dict[int, WatchRec] = field(default_factory=dict)
    detaching: bool = False
    clients: set[int] = field(default_factory=set)  # clients told about this target


@dataclass(eq=False, slots=True)
class ClientRec:
    id: int
    watches: dict[int, WatchRec] = field(default_factory=dict)


class Engine:
    """All daemon state that is not I/O. See the module docstring."""

    def __init__(
        self,
        port: Port,
        emit: Emit,
        *,
        park: bool = False,
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._port = port
        self._emit = emit
        self._park = park
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

    # ------------------------------------------------------------------ clients

    def add_client(self, cid: int) -> None:
        self._clients[cid] = ClientRec(cid)

    def remove_client(self, cid: int) -> None:
        """Drop everything ``cid`` owned: watches, holds, step and interrupt requests."""
        client = self._clients.pop(cid, None)
        if client is None:
            return
        touched: set[TargetRec] = set()
        for watch in list(client.watches.values()):
            target = self.targets.get(watch.pid)
            if target is not None:
                touched.add(target)
            self._drop_watch(watch, reason=None)
        for target in list(self.targets.values()):
            target.clients.discard(cid)
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
        return len(self._clients[cid].watches)

    # ------------------------------------------------------------------ watches

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
    ) -> WatchRec:
        """Create a watch and try to install it.

        Raises NoSuchProcessError (no such process or thread), BusyError (traced by someone
        else), PermissionDeniedError (the kernel refused to seize it).
        """
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
        )
        self._clients[cid].watches[watch.id] = watch
        self._watches[watch.id] = watch
        target.watches[watch.id] = watch
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
        for watch in target.watches.values():
            if watch.applies_to(tid) and watch.id not in gone:
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
            target.watches[watch.id] = watch
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
        self.targets[watch.pid].watches[watch.id] = watch

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
        """Remove a watch. Raises NotFoundError if ``cid`` has no watch ``wid``."""
        watch = self._own_watch(cid, wid)
        target = self.targets.get(watch.pid)
        self._drop_watch(watch, reason=None)
        if target is not None:
            for thread in self._threads_for(target, watch.tid):
                self._reconcile(thread)
            self._maybe_detach(target)

    def get_watch(self, cid: int, wid: int) -> WatchRec:
        return self._own_watch(cid, wid)

    def list_watches(self, cid: int) -> list[WatchRec]:
        return list(self._clients[cid].watches.values())

    def count(self, cid: int, wid: int) -> int:
        """Hits of this watch since it was installed (counters read now)."""
        watch = self._own_watch(cid, wid)
        target = self.targets.get(watch.pid)
        if target is not None:
            for thread in self._threads_for(target, watch.tid):
                slot = thread.slots.get(watch.spec)
                if slot is not None:
                    self._refresh(slot)
        return watch.count

    # ------------------------------------------------------------------ stops

    def resume(self, cid: int, tid: int) -> None:
        """Release ``cid``'s hold on a stopped thread. Raises BusyError if it holds none."""
        thread = self._held_by(cid, tid)
        thread.holds.discard(cid)
        # The last hold of a target whose watches are gone: detach now (DESIGN §5.5).
        target = self.targets.get(thread.pid)
        if target is not None:
            self._maybe_detach(target)
        self._release(thread)

    def step(self, cid: int, tid: int) -> None:
        """Release ``cid``'s hold; the thread's next resume is one single step for ``cid``."""
        thread = self._held_by(cid, tid)
        thread.holds.discard(cid)
        thread.step_requesters.add(cid)
        self._release(thread)

    def interrupt(self, cid: int, tid: int) -> None:
        """Stop a thread for ``cid``; a ``stop`` event with reason "interrupt" follows."""
        thread = self._thread(tid)
        self.targets[thread.pid].clients.add(cid)
        if thread.state is ThreadState.STOPPED and not thread.detaching:
            thread.holds.add(cid)
            self._send_stop(thread, {cid: []}, reason="interrupt")
            return
        thread.interrupt_requesters.add(cid)
        self._interrupt_if_running(thread)

    def get_regs(self, cid: int, tid: int) -> dict[str, int]:
        self._held_by(cid, tid)
        return self._port.getregs(tid)

    def set_regs(self, cid: int, tid: int, regs: Mapping[str, int]) -> None:
        self._held_by(cid, tid)
        self._port.setregs(tid, regs)

    def pid_of(self, tid: int) -> int | None:
        """The process of a managed thread, or ``None`` if the daemon does not manage it."""
        thread = self._threads.get(tid)
        return thread.pid if thread is not None else None

    def stopped_for(self, cid: int, tid: int) -> bool:
        thread = self._threads.get(tid)
        return thread is not None and thread.state is ThreadState.STOPPED and cid in thread.holds

    # ------------------------------------------------------------------ facts from waitpid

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

    def on_signal_stop(self, tid: int, sig: int) -> None:
        """Signal-delivery-stop: decide whose the signal is and what happens next."""
        thread = self._known(tid)
        if thread is None:
            self._orphan_stop(tid, sig)
            return
        thread.state = ThreadState.STOPPED
        if sig == SIGTRAP:
            self._on_sigtrap(thread)
            return
        # Not ours: deliver it unchanged. A stopping signal then brings a group-stop.
        thread.resume_sig = sig
        requesters = self._take_interrupts(thread)
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
            self._event_stop(thread)
            return
        requesters = self._take_interrupts(thread)
        if requesters:
            thread.holds.update(requesters)
            self._send_stop(thread, {cid: [] for cid in requesters}, reason="interrupt")
        self._release(thread)

    def on_samples(
        self, token: int, samples: Iterable[tuple[int, int, int]], lost: int, throttled: int = 0
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
        if samples:
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

    def notify_tokens(self) -> list[int]:
        """Tokens of slots configured for notify mode (their rings need draining)."""
        return [t for t, (_, s) in self._tokens.items() if s.mode is Mode.NOTIFY]

    def retry_busy(self) -> None:
        """Try again to install specs the kernel refused with ENOSPC."""
        for thread in list(self._threads.values()):
            if thread.busy and thread.state is not ThreadState.NEW:
                thread.busy.clear()
                self._reconcile(thread)

    # ------------------------------------------------------------------ shutdown

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

    # ------------------------------------------------------------------ status

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
                        }
                    )
                pending = [
                    w.id
                    for w in target.watches.values()
                    if w.applies_to(thread.tid) and w.spec not in installed
                ]
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

    # ================================================================== internals

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

    def _held_by(self, cid: int, tid: int) -> ThreadRec:
        thread = self._thread(tid)
        if thread.state is not ThreadState.STOPPED or cid not in thread.holds:
            raise BusyError(f"thread {tid} is not stopped for you; wait for a stop event")
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
        for watch in target.watches.values():
            if watch.applies_to(tid):
                watch.states[tid] = "pending"
        return thread

    def _orphan_stop(self, tid: int, sig: int) -> None:
        """A stop of a thread no target claims (its process was let go): let it go too."""
        try:
            if sig == SIGTRAP and self._port.siginfo(tid).perf_data & _TOKEN_MASK == TOKEN_MAGIC:
                sig = 0
            self._port.detach(tid, sig)
        except NoSuchProcessError:
            pass

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
                except NoSuchProcessError:
                    continue  # exited meanwhile
                except PermissionDeniedError:
                    if tid == target.pid:
                        raise
                    continue
                self._add_thread(target, tid, ThreadState.RUNNING)
            if target.pid not in target.threads:
                raise NoSuchProcessError(f"process {target.pid} exited while being attached")

    def _threads_for(self, target: TargetRec, tid: int | None) -> list[ThreadRec]:
        if tid is None:
            return list(target.threads.values())
        thread = target.threads.get(tid)
        return [thread] if thread is not None else []

    def _drop_watch(self, watch: WatchRec, reason: str | None) -> None:
        """Forget a watch everywhere; ``reason`` set means its owner is told it ended."""
        self._watches.pop(watch.id, None)
        client = self._clients.get(watch.client)
        if client is not None:
            client.watches.pop(watch.id, None)
        target = self.targets.get(watch.pid)
        if target is None:
            return
        target.watches.pop(watch.id, None)
        for thread in self._threads_for(target, watch.tid):
            slot = thread.slots.get(watch.spec)
            if slot is not None and watch in slot.watches:
                self._refresh(slot)
                slot.watches.remove(watch)

    # --- allocation -----------------------------------------------------------

    def _reconcile_target(self, target: TargetRec) -> None:
        for thread in list(target.threads.values()):
            self._reconcile(thread)

    def _reconcile(
        self, thread: ThreadRec, fresh: Collection[WatchRec] = (), *, again: bool = True
    ) -> None:
        """Make the thread's slots match the best wants; tell owners what changed.

        A slot whose mode must change is reopened only while the thread is stopped: between
        the close and the open a running thread would hit uncounted (closing a breakpoint
        of a running thread takes IPIs, long enough for a tight loop to slip through —
        measured). A running thread is interrupted instead, and the reopen happens just
        before it runs again (:meth:`_resume_now`).
        """
        if thread.state is ThreadState.NEW or thread.detaching:
            return
        thread.freed = False
        target = self.targets[thread.pid]
        by_spec: dict[Spec, list[WatchRec]] = defaultdict(list)
        for watch in target.watches.values():
            if watch.applies_to(thread.tid):
                by_spec[watch.spec].append(watch)
        wants = [
            Want(spec, max(w.priority for w in ws), min(w.seq for w in ws))
            for spec, ws in by_spec.items()
        ]
        chosen = choose(wants, thread.busy)
        for spec in list(thread.slots):
            if spec not in chosen:
                self._close_slot(thread, spec)
        ranked = sorted(wants, key=lambda w: w.rank)
        rank = {w.spec: w.rank for w in ranked}
        stopped = thread.state is ThreadState.STOPPED
        for want in ranked:
            spec = want.spec
            if len(thread.slots) >= CAPACITY and spec not in thread.slots:
                break
            if spec in thread.busy:
                continue
            watches = by_spec[spec]
            mode = max(w.mode for w in watches)
            slot = thread.slots.get(spec)
            if slot is not None and any(w not in slot.watches for w in watches):
                self._refresh(slot)  # baseline: earlier hits are not the newcomer's
            if slot is not None and slot.mode != mode:
                if not stopped:
                    self._reopen_later(thread)
                    slot.watches = watches
                    continue
                self._close_slot(thread, spec)
                slot = None
            if slot is None:
                slot = self._open_slot(thread, spec, mode)
                if slot is None and spec in thread.busy:
                    # The kernel is out of slots (someone outside the daemon holds some):
                    # our own lower-ranked slot gives way, as priority says (DESIGN 5.1).
                    lower = [s for s in thread.slots if rank.get(s, (0, 0)) > want.rank]
                    if lower:
                        self._close_slot(thread, max(lower, key=lambda s: rank[s]))
                        thread.busy.discard(spec)
                        slot = self._open_slot(thread, spec, mode)
                if slot is None:
                    continue
            slot.watches = watches
        if thread.freed and thread.busy and again:
            # A slot closed during this pass: what the kernel refused may fit now.
            thread.busy.clear()
            self._reconcile(thread, fresh, again=False)
            return
        # Tell owners about every change of state on this thread.
        for spec, watches in by_spec.items():
            installed = spec in thread.slots
            for watch in watches:
                old = watch.states.get(thread.tid)
                new = "installed" if installed else "pending"
                if not installed:
                    reason = "busy" if spec in thread.busy else "preempted"
                    watch.reasons[thread.tid] = reason
                else:
                    watch.reasons.pop(thread.tid, None)
                watch.states[thread.tid] = new
                if old == new or watch in fresh:
                    continue  # a fresh watch's state is in the reply that created it
                if new == "installed":
                    self._emit(
                        watch.client, "installed", {"watch": watch.id, "tid": thread.tid}, False
                    )
                else:
                    self._emit(
                        watch.client,
                        "uninstalled",
                        {"watch": watch.id, "tid": thread.tid, "reason": watch.reasons[thread.tid]},
                        False,
                    )

    def _open_slot(self, thread: ThreadRec, spec: Spec, mode: Mode) -> SlotRec | None:
        token = TOKEN_MAGIC | next(self._token_ids)
        try:
            handle = self._port.open_slot(thread.tid, spec, mode, token)
        except NoSpaceError:
            thread.busy.add(spec)
            self.counters["slots_busy"] += 1
            return None
        except NoSuchProcessError:
            return None  # the thread is exiting; its exit is reported separately
        except InvalidArgumentError as err:
            log.warning("kernel refused %s on %d: %s", spec, thread.tid, err)
            thread.busy.add(spec)
            return None
        slot = SlotRec(spec=spec, handle=handle, mode=mode, token=token)
        thread.slots[spec] = slot
        self._tokens[token] = (thread, slot)
        self.counters["slots_opened"] += 1
        return slot

    def _close_slot(self, thread: ThreadRec, spec: Spec) -> None:
        slot = thread.slots.pop(spec)
        self._refresh(slot)
        if slot.mode is Mode.NOTIFY:
            # Hits still in the ring (and losses the kernel never got to report) belong to
            # the watches of this slot: deliver them before the ring goes.
            try:
                samples, lost, throttled = self._port.drain(slot.handle, True)
            except NoSuchProcessError:
                samples, lost, throttled = [], 0, 0
            self.on_samples(slot.token, samples, lost, throttled)
        self._tokens.pop(slot.token, None)
        try:
            self._port.close_slot(slot.handle)
        finally:
            thread.freed = True  # capacity may have changed for what the kernel refused

    def _refresh(self, slot: SlotRec) -> int:
        """Read the slot's counter; credit the delta to every watch installed on it."""
        try:
            now = self._port.read_count(slot.handle)
        except NoSuchProcessError:
            return 0
        delta = now - slot.last
        if delta > 0:
            slot.last = now
            for watch in slot.watches:
                watch.count += delta
            return delta
        return 0

    # --- traps ------------------------------------------------------------------

    def _on_sigtrap(self, thread: ThreadRec) -> None:
        info = self._port.siginfo(thread.tid)
        ours = info.code == TRAP_PERF and info.perf_data & _TOKEN_MASK == TOKEN_MAGIC
        stepped = (
            set(thread.stepping)
            if (thread.stepping and (info.code in (TRAP_TRACE, TRAP_BRKPT, TRAP_HWBKPT) or ours))
            else set()
        )
        if stepped:
            thread.stepping.clear()  # else a foreign SIGTRAP came first: the step goes on
        hit: set[Spec] = set()
        for spec, slot in thread.slots.items():
            if self._refresh(slot):
                hit.add(spec)
        claimed = ours or bool(stepped)
        thread.resume_sig = 0 if claimed else SIGTRAP
        if not claimed:
            self.counters["sigtraps_delivered"] += 1
            log.info(
                "thread %d: SIGTRAP (si_code %d, perf data %#x) is not the daemon's: delivered",
                thread.tid, info.code, info.perf_data,
            )
        if thread.detaching:
            self._resume_now(thread)
            return
        stops: dict[int, list[int]] = defaultdict(list)
        notifies: dict[int, list[int]] = defaultdict(list)
        for spec in hit:
            slot = thread.slots[spec]
            for watch in slot.watches:
                if watch.mode is Mode.STOP:
                    stops[watch.client].append(watch.id)
                elif watch.mode is Mode.NOTIFY and slot.mode is Mode.STOP:
                    notifies[watch.client].append(watch.id)
        for cid in stepped:
            stops.setdefault(cid, [])
        interrupted = self._take_interrupts(thread)
        for cid in interrupted:
            stops.setdefault(cid, [])
        if hit:
            self.counters["traps"] += 1
        if notifies:
            ip = self._port.getregs(thread.tid).get("rip", 0)
            now = self._clock()
            for cid, wids in notifies.items():
                self.counters["hits_notified"] += 1
                self._emit(
                    cid, "hit", {"watches": wids, "tid": thread.tid, "ip": ip, "time": now}, True
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
            self._send_stop(thread, group, reason=reason, dr6=dr6)

    def _send_stop(
        self,
        thread: ThreadRec,
        stops: Mapping[int, list[int]],
        *,
        reason: str,
        dr6: Mapping[int, int] | None = None,
    ) -> None:
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

    def _resume_now(self, thread: ThreadRec) -> None:
        if thread.reopen and not thread.detaching:
            thread.reopen = False
            self._reconcile(thread)  # stopped now: reopen what waits for another mode
        sig, thread.resume_sig = thread.resume_sig, 0
        tid = thread.tid
        try:
            if thread.detaching:
                self._detach_stopped(thread, sig)
                return
            if thread.step_requesters:
                thread.stepping |= thread.step_requesters
                thread.step_requesters = set()
            if thread.stepping:
                # A step not yet completed (a signal came first) is stepped again.
                self._port.singlestep(tid, sig)
            else:
                self._port.cont(tid, sig)
        except NoSuchProcessError:
            pass  # died meanwhile (SIGKILL); its exit status follows
        thread.state = ThreadState.RUNNING

    # --- thread life ------------------------------------------------------------

    def _on_clone(self, parent: ThreadRec) -> None:
        new_tid = self._port.eventmsg(parent.tid)
        if new_tid and new_tid not in self._threads:
            target = self.targets.get(parent.pid)
            if target is not None:
                self._add_thread(target, new_tid, ThreadState.NEW)

    def _on_exit_stop(self, thread: ThreadRec) -> None:
        """PTRACE_EVENT_EXIT: last chance to read the thread's counters."""
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
            self._drop_watch(watch, reason=None)
            watch.states.clear()
        if self.forget_hook is not None:
            self.forget_hook(target.pid, [thread.tid])
        for cid in owners:
            if cid in self._clients:
                self._emit(cid, "exec", {"pid": target.pid}, False)
        target.clients.clear()
        thread.holds.clear()
        self.counters["execs"] += 1
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
        for watch in target.watches.values():
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
            self._drop_watch(watch, reason=None)
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

    # --- detach -----------------------------------------------------------------

    def _maybe_detach(self, target: TargetRec) -> None:
        if target.detaching or target.pid not in self.targets:
            return
        if target.watches:
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
        if sig == 0 and self._port.pending_signals(thread.tid) & _SIGTRAP_BIT:
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

