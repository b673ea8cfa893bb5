"""The engine's records and its view of the kernel (the :class:`Port`).

Plain state shared by :mod:`hwbkptd._engine` (watches, slots, counts) and
:mod:`hwbkptd._stops` (stops, holds, thread life); no behaviour beyond small accessors.
"""

from __future__ import annotations

import enum
import itertools
import signal
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from hwbkptd._bpf import HITS_BASE, WORD_LAST_NEW, WORD_LAST_OLD
from hwbkptd._cond import Condition
from hwbkptd._model import Mode, Spec

__all__ = [
    "EVENT_CLONE",
    "EVENT_EXEC",
    "EVENT_EXIT",
    "EVENT_STOP",
    "FILTER_HITS",
    "FILTER_LAST_NEW",
    "FILTER_LAST_OLD",
    "SIGTRAP",
    "SIGTRAP_BIT",
    "TOKEN_MAGIC",
    "TOKEN_MASK",
    "TRAP_BRKPT",
    "TRAP_HWBKPT",
    "TRAP_PERF",
    "TRAP_TRACE",
    "ClientRec",
    "Emit",
    "Filter",
    "Port",
    "SigInfo",
    "SignalStop",
    "SlotRec",
    "TargetRec",
    "ThreadRec",
    "ThreadState",
    "WatchRec",
]

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
TOKEN_MASK = 0xFFFFFFFF << 32

SIGTRAP = int(signal.SIGTRAP)
SIGTRAP_BIT = 1 << (SIGTRAP - 1)


class SigInfo(NamedTuple):
    """What the engine needs of a SIGTRAP's siginfo (a named tuple: one per stop)."""

    code: int
    perf_data: int
    addr: int = 0  # si_addr: for TRAP_BRKPT, the address after the trapping instruction


# Words of a filter's state (Port.read_filter), as hwbkptd/_bpf.py lays out its map.
FILTER_LAST_NEW = WORD_LAST_NEW
FILTER_LAST_OLD = WORD_LAST_OLD
FILTER_HITS = HITS_BASE  # true hits of condition i at FILTER_HITS + i


class Filter(NamedTuple):
    """What a slot's event is to let through: the conditions of its watches.

    ``conditions`` in counter order; ``always``: deliver every hit anyway (an unconditional
    stop watch shares the slot); ``hits``: each condition's true hits so far on this thread
    (``hits`` in a condition goes on across a reopen); ``deliver[i]``: condition *i* true
    delivers the hit (a stop watch); ``notify``: the conditions of notify watches, whose
    true hits become hit records (``mask`` bit *k* for ``notify[k]``); ``notify_all``: every
    hit becomes a record (an unconditional notify watch shares the slot). Hit records come
    out of :meth:`Port.drain` as ``(tid, ip, time, new, old, mask)``.
    """

    conditions: tuple[Condition, ...]
    always: bool
    hits: tuple[int, ...]
    deliver: tuple[bool, ...] = ()
    notify: tuple[int, ...] = ()
    notify_all: bool = False


class Port(Protocol):
    """The kernel operations the engine uses (all errors are hwbkpt_proto errors)."""

    def seize(self, tid: int) -> None: ...
    def threads_of(self, pid: int) -> list[int]: ...
    def tgid_of(self, tid: int) -> int: ...
    def open_slot(
        self, tid: int, spec: Spec, mode: Mode, token: int, flt: Filter | None = None
    ) -> object: ...
    def close_slot(self, handle: object) -> None: ...
    def read_count(self, handle: object) -> int: ...
    def read_filter(self, handle: object) -> tuple[int, ...]: ...
    def drain(self, handle: object, final: bool) -> tuple[list[tuple[int, ...]], int, int]: ...
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
    def read_memory(self, pid: int, addr: int, size: int) -> bytes: ...
    def send_signal(self, pid: int, tid: int, sig: int) -> None: ...


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
    # Set once the watch has ended: "exit" (its process exited), "exec" (its process
    # called exec) or "thread-exit" (its thread exited); with the exit status or signal.
    # An ended watch keeps its final count until its owner removes it or disconnects.
    ended: str | None = None
    exit_code: int | None = None
    exit_signal: int | None = None
    condition: Condition | None = None
    path: str | None = None  # where its condition is evaluated: "bpf" or "ptrace"
    cond_hits: dict[int, int] = field(default_factory=dict)  # per thread: true hits
    # Its place among its target's watches (TargetRec.add_watch): the order of creation,
    # which orders slots' watch lists and so the events of a hit.
    place: int = 0

    def applies_to(self, tid: int) -> bool:
        return self.tid is None or self.tid == tid

    @property
    def state(self) -> str:
        """ "ended" once ended; "installed" when installed on every thread it applies to;
        else "pending"."""
        if self.ended is not None:
            return "ended"
        if self.states and all(s == "installed" for s in self.states.values()):
            return "installed"
        return "pending"

    def end_info(self) -> dict[str, Any] | None:
        """``{reason, code, signal}`` of an ended watch (PROTOCOL.md, ``watches``), or None."""
        if self.ended is None:
            return None
        return {"reason": self.ended, "code": self.exit_code, "signal": self.exit_signal}

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
            "ended": self.end_info(),
            "condition": self.condition.text if self.condition is not None else None,
            "path": self.path,
        }


@dataclass(eq=False, slots=True)
class SlotRec:
    """One installed kernel breakpoint event, shared by every watch of its spec on a thread."""

    spec: Spec
    handle: object
    mode: Mode
    token: int
    tid: int = 0
    last: int = 0
    watches: list[WatchRec] = field(default_factory=list)
    # A filtered slot: its conditional watches in counter order, whether every hit is
    # delivered anyway, and the counters as last read (Port.read_filter).
    filtered: tuple[WatchRec, ...] = ()
    flags: tuple[bool, bool] = (False, False)  # Filter.always, Filter.notify_all
    cond_last: list[int] = field(default_factory=list)
    values: tuple[int, int] | None = None  # (new, old) of the last hit the filter saw
    # A stop-mode slot: the watches its counter reads have credited whose stop is still to
    # be routed. A hit counts before its SIGTRAP is taken and handled, so a read in between
    # (``status``, ``count``, another watch joining or leaving the slot) finds the hit
    # first; the trap, reading no delta then, stops for these (_stops._on_sigtrap).
    unrouted: list[WatchRec] = field(default_factory=list)


@dataclass(eq=False, slots=True)
class SignalStop:
    """A thread's signal at one stop, and each client's choice for it (``_signals``)."""

    signal: int  # what the thread would resume with by itself (0: nothing)
    told: frozenset[int]  # the clients told of it with a "signal" stop
    choices: dict[int, int] = field(default_factory=dict)  # client -> its resume's signal


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
    stepping: set[int] = field(default_factory=set)  # clients to tell of the step's trap
    step_in_flight: bool = False  # the last resume was a PTRACE_SINGLESTEP
    # A SIGTRAP of ours may be queued for it: it has had a stop-mode slot or was stepped
    # (count and notify events never raise one), so detaching must check for one first.
    may_trap: bool = False
    had_slots: bool = False  # ever had a breakpoint of ours (see _stops._empty_dr6_trap)
    interrupt_requesters: set[int] = field(default_factory=set)
    interrupt_sent: bool = False
    reopen: bool = False  # slots wait to be reopened in another mode at the next stop
    freed: bool = False  # a slot closed during the current reconcile pass
    parked_events: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    detaching: bool = False
    # Past its PTRACE_EVENT_EXIT: its slots are closed and none is opened again (the
    # kernel may refuse one on the dying thread, or open it for nothing: _stops._on_exit_stop).
    exiting: bool = False
    # Watches a slot closed for good (preempted, or its spec no longer wanted) had counted a
    # hit for whose SIGTRAP was still to come (SlotRec.unrouted): that trap tells them.
    owed: list[WatchRec] = field(default_factory=list)
    # At a stop: the signal it is to resume with and what each client said about it
    # (``hwbkptd._signals``); None while nobody reported or chose a signal.
    signal_stop: SignalStop | None = None
    delivery_stop: bool = False  # the current stop is a signal-delivery-stop
    injected: int = 0  # a signal a client asked for, sent with tgkill: delivered untold


def _place(watch: WatchRec) -> int:
    return watch.place


@dataclass(eq=False, slots=True)
class TargetRec:
    """A managed process. Its live watches are in ``watches`` (by id, in the order they
    were added) and, indexed by scope, in ``wide`` (process-wide) and ``scoped`` (by tid):
    change them only through :meth:`add_watch` and :meth:`discard_watch`, which keep the
    three in step, so a request about one thread looks at that thread's watches only
    (:meth:`watches_of`) instead of every watch of the process (issue 13)."""

    pid: int
    threads: dict[int, ThreadRec] = field(default_factory=dict)
    watches: dict[int, WatchRec] = field(default_factory=dict)
    wide: dict[int, WatchRec] = field(default_factory=dict)
    scoped: dict[int, dict[int, WatchRec]] = field(default_factory=dict)
    _places: itertools.count[int] = field(default_factory=itertools.count)
    detaching: bool = False
    clients: set[int] = field(default_factory=set)  # clients told about this target
    # Clients attached to the whole process (``attach``): it stays seized while any is,
    # even without a watch, as a debugger attached to an idle program expects.
    attached: set[int] = field(default_factory=set)
    # Attached clients that asked to be told of signals (``signals``): the signals each
    # passes without being told (gdb's QPassSignals).
    signal_clients: dict[int, frozenset[int]] = field(default_factory=dict)
    # Attached clients that asked for each new thread to be held for them at its first
    # stop (``attach`` with ``hold_threads``: a debugger's all-stop at a thread-create
    # report). Only those still attached count.
    hold_new: set[int] = field(default_factory=set)

    def add_watch(self, watch: WatchRec) -> None:
        """Add a live watch (a new one, or one restored) after every other."""
        watch.place = next(self._places)
        self.watches[watch.id] = watch
        if watch.tid is None:
            self.wide[watch.id] = watch
        else:
            self.scoped.setdefault(watch.tid, {})[watch.id] = watch

    def discard_watch(self, watch: WatchRec) -> bool:
        """Remove a watch if it is one of this target's; returns whether it was."""
        if self.watches.pop(watch.id, None) is None:
            return False
        if watch.tid is None:
            del self.wide[watch.id]
        else:
            mine = self.scoped[watch.tid]
            del mine[watch.id]
            if not mine:
                del self.scoped[watch.tid]
        return True

    def watches_of(self, tid: int) -> Collection[WatchRec]:
        """The live watches that apply to thread ``tid`` — process-wide ones and its own —
        in the order of :attr:`watches`. A view when only one kind exists: do not change
        the target's watches while iterating it."""
        mine = self.scoped.get(tid)
        if mine is None:
            return self.wide.values()
        if not self.wide:
            return mine.values()
        # Two runs, each already in place order: the sort merges them in linear time.
        return sorted([*self.wide.values(), *mine.values()], key=_place)


@dataclass(eq=False, slots=True)
class ClientRec:
    id: int
    watches: dict[int, WatchRec] = field(default_factory=dict)
