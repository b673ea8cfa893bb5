"""A fake kernel for driving :class:`hwbkptd._engine.Engine` without ptrace or root.

:class:`FakeKernel` implements every method of :class:`hwbkptd._engine.Port` as a small
model of what Linux does, so that engine tests are stories about a program ("thread 101
writes 8 bytes at 0x1000") rather than lists of expected calls ("prefer fakes over mocks").

What is modelled, and where the rule comes from:

* Processes have threads. ``PTRACE_SEIZE`` marks a thread traced and stops nothing. A
  thread traced by someone else cannot be seized (``EPERM``); seizing a thread already ours
  is what ``KernelPort.seize`` turns into success (an auto-attached clone).
* Per thread at most four breakpoint events may be open (``HBP_NUM``); ``external_slots``
  counts slots that other perf or ptrace users hold on a thread. One more open gives
  ``ENOSPC`` (:class:`~hwbkpt_proto.NoSpaceError`).
* :meth:`FakeKernel.hit` is one access by a running thread: every open event whose range
  overlaps (and whose access type matches) counts one. A ``stop``-mode event (``sigtrap=1``)
  queues a SIGTRAP with ``si_code == TRAP_PERF`` and ``si_perf_data`` its token; several
  in one access coalesce into one SIGTRAP (legacy signals do), with the first one's siginfo.
* A ``notify``-mode event appends a sample ``(tid, ip, time)`` to its ring; ``drain`` empties it.
* ptrace state per thread: running, or in exactly one ptrace-stop (signal-delivery-stop,
  event stop, group-stop) that is reported once to ``waitpid`` (:meth:`FakeKernel.wait`).
  Requests that need a stopped tracee (``CONT``, ``SINGLESTEP``, ``DETACH``, ``GETREGS``,
  ``GETSIGINFO``, ``GETEVENTMSG``, ``LISTEN``) fail with ``ESRCH`` otherwise, as
  ``ptrace_check_attach`` does. A signal given to ``CONT``/``DETACH`` is delivered only from
  a signal-delivery-stop (other stops ignore it, man 2 ptrace "Signal injection").
* When a running traced thread next returns to user mode it handles, in the order of
  ``get_signal()`` in ``kernel/signal.c``: a pending ``PTRACE_INTERRUPT`` (the jobctl trap,
  reported as ``PTRACE_EVENT_STOP``), then pending signals (a signal-delivery-stop), then —
  if it was resumed with ``PTRACE_SINGLESTEP`` — the single-step trap (SIGTRAP
  ``TRAP_TRACE``). A ``PTRACE_INTERRUPT`` sent to a thread that is already stopped stays
  pending until it runs. Any other ptrace-stop entered meanwhile (clone, exec, exit event)
  consumes a pending interrupt: ``ptrace_stop()`` says "any trap clears pending STOP trap".
* *When* a resumed thread gets to that point is a race with the tracer's next request.
  ``eager=False`` (the default) lets it run only when the test calls :meth:`run`
  (:meth:`Harness.settle` does): the tracer's requests in one engine call all land first,
  as on one CPU. ``eager=True`` lets it run at once, inside ``CONT``: the other outcome.
* An untraced thread that takes a SIGTRAP dies of it (no handler): ``killed`` records it.
* Memory is ``memory`` (address → byte) and reads as NOPs (0x90) elsewhere; addresses in
  ``unmapped`` fail with ``EINVAL`` as ``/proc/PID/mem`` does.

:class:`Harness` puts an engine on a fake kernel, records what the engine emits, and feeds
the engine the wait statuses exactly as ``hwbkptd/_tracer.py`` does.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hwbkpt_proto import (
    InvalidArgumentError,
    NoSpaceError,
    NoSuchProcessError,
    PermissionDeniedError,
)
from hwbkptd._alloc import CAPACITY
from hwbkptd._bpf import HITS_BASE, Emulator
from hwbkptd._engine import Engine
from hwbkptd._model import Access, Mode, Spec
from hwbkptd._records import (
    EVENT_CLONE,
    EVENT_EXEC,
    EVENT_EXIT,
    EVENT_STOP,
    TRAP_PERF,
    Filter,
    SigInfo,
)

__all__ = [
    "SIGSTOP",
    "SIGTRAP",
    "Emitted",
    "FakeEvent",
    "FakeKernel",
    "Harness",
    "Livelock",
    "Report",
]

SIGTRAP = int(signal.SIGTRAP)
SIGSTOP = int(signal.SIGSTOP)
SI_USER = 0
SI_KERNEL = 0x80
SI_TKILL = -6  # tgkill(2)
TRAP_TRACE = 2


class Livelock(AssertionError):
    """The engine and the kernel kept stopping and resuming a thread without progress."""


class FakeKernelError(AssertionError):
    """The engine did something no kernel allows a correct tracer to do (e.g. read a closed fd)."""


@dataclass(eq=False)
class FakeEvent:
    """One perf_event_open(2) breakpoint event: the engine's opaque slot handle."""

    tid: int
    spec: Spec
    mode: Mode
    token: int
    count: int = 0
    closed: bool = False
    samples: list[tuple[int, ...]] = field(
        default_factory=list
    )  # notify ring: (tid, ip, time)
    lost: int = 0
    flt: Filter | None = None
    # The filter program's map, as hwbkptd/_bpf.py lays it out (evaluated here in Python).
    words: list[int] = field(default_factory=list)

    def passes(self, tid: int, value: int, ip: int) -> bool:
        """Run the filter for one hit that left ``value`` in the watched bytes: count its
        conditions, write its hit record (notify), say whether the hit is delivered."""
        if self.flt is None:
            return True
        flt = self.flt
        emulator = Emulator(flt.conditions, {})
        emulator.words = self.words
        new = value & ((1 << (8 * self.spec.length)) - 1)
        old = self.words[0]
        before = list(self.words)
        emulator.run(new, tid)
        held = [self.words[w] > before[w] for w in range(HITS_BASE, len(before))]
        mask = sum(1 << k for k, i in enumerate(flt.notify) if held[i])
        if mask or flt.notify_all:
            self.samples.append((tid, ip, 42, new, old, mask))
        return flt.always or any(h and d for h, d in zip(held, flt.deliver, strict=True))

    def matches(self, addr: int, size: int, kind: str) -> bool:
        if self.closed:
            return False
        if addr + size <= self.spec.addr or self.spec.addr + self.spec.length <= addr:
            return False
        if self.spec.access is Access.EXECUTE:
            return kind == "x"
        if self.spec.access is Access.WRITE:
            return kind == "w"
        return kind in ("r", "w")


@dataclass
class Stop:
    """The ptrace-stop a thread is in."""

    kind: str  # "signal" | "event" | "group"
    sig: int
    event: int = 0
    info: SigInfo | None = None
    msg: int = 0
    reported: bool = False


@dataclass(frozen=True)
class Report:
    """One wait status, decoded as hwbkptd._kernel.decode_status would."""

    kind: str  # "signal" | "event" | "group" | "exited"
    tid: int
    sig: int = 0  # the stop signal, or for "exited" the fatal signal (0: exited normally)
    event: int = 0
    code: int | None = None


@dataclass(eq=False)
class FakeThread:
    tid: int
    pid: int
    traced: bool = False
    stop: Stop | None = None
    listening: bool = False
    pending: dict[int, SigInfo] = field(default_factory=dict)  # signo -> siginfo
    interrupt_pending: bool = False
    stepping: bool = False
    exiting: int | None = None  # exit code once it passed PTRACE_EVENT_EXIT
    alive: bool = True
    regs: dict[str, int] = field(default_factory=lambda: {"rip": 0x401000, "rsp": 0x7FFF0000})


class FakeKernel:
    """The kernel as the engine's Port sees it. See the module docstring."""

    def __init__(self, *, eager: bool = False) -> None:
        self.eager = eager
        self.threads: dict[int, FakeThread] = {}
        self.processes: dict[int, list[int]] = {}
        self.events: list[FakeEvent] = []
        self.external_slots: dict[int, int] = {}
        self.refused: list[tuple[int, Spec]] = []  # every ENOSPC given
        self.foreign_traced: set[int] = set()
        self.calls: list[tuple[Any, ...]] = []  # ptrace requests, in order
        self.delivered: list[tuple[int, int]] = []  # (tid, signo) given to the program
        self.killed: dict[int, int] = {}  # pid -> the signal that killed the program
        self.handled: set[int] = set()  # signals the program has handlers for
        self.memory: dict[int, int] = {}  # address -> byte (every process alike)
        self.pending_reads: list[int] = []  # threads whose pending signals were read (/proc)
        self.unmapped: set[int] = set()
        self._waitq: list[Report] = []
        self._tids = itertools.count(1000)

    # ------------------------------------------------------------------ the world

    def spawn(self, pid: int, nthreads: int = 1) -> list[int]:
        """A process ``pid`` with ``nthreads`` running threads (the first is the leader)."""
        tids = [pid] + [next(self._tids) for _ in range(nthreads - 1)]
        self.processes[pid] = list(tids)
        for tid in tids:
            self.threads[tid] = FakeThread(tid, pid)
        return tids

    def open_events(self, tid: int | None = None) -> list[FakeEvent]:
        return [e for e in self.events if not e.closed and (tid is None or e.tid == tid)]

    def traced(self) -> list[int]:
        return [t.tid for t in self.threads.values() if t.alive and t.traced]

    def state(self, tid: int) -> str:
        """ "running", "listening", or the kind of the ptrace-stop the thread is in."""
        t = self.threads[tid]
        if t.stop is None:
            return "running"
        return "listening" if t.listening else t.stop.kind

    def hit(
        self,
        tid: int,
        addr: int,
        size: int = 1,
        kind: str = "w",
        *,
        now: bool = True,
        value: int = 0,
    ) -> bool:
        """Thread ``tid`` accesses ``size`` bytes at ``addr`` (``kind`` "r", "w" or "x").

        ``value``: what the watched bytes hold after the access (for filtered events).

        Every matching open event counts one. Returns whether a stop-mode event was among
        them; then a SIGTRAP (TRAP_PERF, that event's token) is queued and — unless ``now``
        is false, i.e. the thread has not returned to user mode yet — taken at once.
        """
        t = self._live(tid)
        if t.stop is not None:
            raise FakeKernelError(f"thread {tid} is stopped ({t.stop.kind}); it cannot execute")
        stop_event = None
        for event in self.events:
            if event.tid == tid and event.matches(addr, size, kind):
                event.count += 1
                if not event.passes(tid, value, t.regs["rip"]):
                    continue
                if event.mode is Mode.NOTIFY and event.flt is None:
                    event.samples.append((tid, t.regs["rip"], 42))
                if event.mode is Mode.STOP and stop_event is None:
                    stop_event = event
        if stop_event is None:
            return False
        self.queue_signal(tid, SIGTRAP, SigInfo(TRAP_PERF, stop_event.token), now=now)
        return True

    def queue_signal(
        self, tid: int, sig: int, info: SigInfo | None = None, *, now: bool = True
    ) -> None:
        """A signal for one thread (tgkill, or the kernel's own); a second one coalesces."""
        t = self._live(tid)
        t.pending.setdefault(sig, info or SigInfo(SI_USER, 0))
        if now and t.stop is None:
            self._advance(t)

    def clone(self, tid: int, *, child_first: bool = False) -> int:
        """Running thread ``tid`` creates a thread; returns the new tid.

        Traced: the parent stops in PTRACE_EVENT_CLONE and the child, auto-attached, starts
        in a PTRACE_EVENT_STOP; ``waitpid`` may report either first.
        """
        parent = self._live(tid)
        assert parent.stop is None, "a stopped thread cannot clone"
        new = FakeThread(next(self._tids), parent.pid, traced=parent.traced)
        self.threads[new.tid] = new
        self.processes[parent.pid].append(new.tid)
        if parent.traced:
            new.stop = Stop("event", SIGTRAP, EVENT_STOP)
            self._enter(parent, Stop("event", SIGTRAP, EVENT_CLONE, msg=new.tid), report=False)
            order = [new, parent] if child_first else [parent, new]
            for t in order:
                assert t.stop is not None
                t.stop.reported = True
                self._waitq.append(
                    Report("event", t.tid, SIGTRAP, EVENT_STOP if t is new else EVENT_CLONE)
                )
        return new.tid

    def exit_thread(self, tid: int, code: int = 0) -> None:
        """Running thread ``tid`` calls exit(2) (traced: PTRACE_EVENT_EXIT first)."""
        t = self._live(tid)
        assert t.stop is None, "a stopped thread cannot exit by itself"
        t.exiting = code
        if t.traced:
            self._enter(t, Stop("event", SIGTRAP, EVENT_EXIT, msg=code << 8))
        else:
            self._die(t)

    def exit_group(self, pid: int, code: int = 0) -> None:
        """The process calls exit_group(2); every thread must be running."""
        for tid in list(self.processes[pid]):
            self.exit_thread(tid, code)

    def exec(self, tid: int) -> None:
        """Single-threaded process ``tid`` calls execve(2) (traced: PTRACE_EVENT_EXEC)."""
        t = self._live(tid)
        assert t.stop is None
        assert len(self.processes[t.pid]) == 1
        assert t.tid == t.pid
        # remove_on_exec or not, the daemon closes its events itself; nothing flushed here.
        if t.traced:
            self._enter(t, Stop("event", SIGTRAP, EVENT_EXEC, msg=tid))

    def run(self) -> None:
        """Let every running traced thread reach its next return to user mode."""
        for t in list(self.threads.values()):
            if t.alive and t.stop is None:
                self._advance(t)

    def wait(self) -> Report | None:
        """``waitpid(-1, WNOHANG | __WALL)``: the next unreported status, or None."""
        return self._waitq.pop(0) if self._waitq else None

    # ------------------------------------------------------------------ Port

    def seize(self, tid: int) -> None:
        self.calls.append(("seize", tid))
        t = self._live(tid)
        if tid in self.foreign_traced:
            raise PermissionDeniedError(f"ptrace(SEIZE) of {tid}: Operation not permitted")
        t.traced = True  # seizing a thread already ours: KernelPort.seize returns quietly

    def threads_of(self, pid: int) -> list[int]:
        if pid not in self.processes:
            raise NoSuchProcessError(f"no process {pid}")
        return sorted(self.processes[pid])

    def tgid_of(self, tid: int) -> int:
        return self._live(tid).pid

    def open_slot(
        self, tid: int, spec: Spec, mode: Mode, token: int, flt: Filter | None = None
    ) -> object:
        self._live(tid)
        if len(self.open_events(tid)) + self.external_slots.get(tid, 0) >= CAPACITY:
            self.refused.append((tid, spec))
            raise NoSpaceError(f"perf_event_open on {tid}: No space left on device")
        event = FakeEvent(tid, spec, mode, token, flt=flt)
        if flt is not None:
            event.words = [0] * HITS_BASE + list(flt.hits)
        self.events.append(event)
        self.calls.append(("open", tid, spec, mode))
        return event

    def close_slot(self, handle: object) -> None:
        event = self._event(handle)
        event.closed = True
        self.calls.append(("close", event.tid, event.spec, event.mode))

    def read_count(self, handle: object) -> int:
        return self._event(handle).count

    def read_filter(self, handle: object) -> tuple[int, ...]:
        return tuple(self._event(handle).words)

    def drain(self, handle: object, final: bool) -> tuple[list[tuple[int, ...]], int, int]:
        event = self._event(handle)
        samples, event.samples = event.samples, []
        lost, event.lost = event.lost, 0
        return samples, lost, 0

    def siginfo(self, tid: int) -> SigInfo:
        t = self._stopped(tid, "GETSIGINFO")
        assert t.stop is not None
        if t.stop.kind == "group":
            raise InvalidArgumentError(f"ptrace(GETSIGINFO) of {tid}: Invalid argument")
        if t.stop.info is not None:
            return t.stop.info
        return SigInfo(SIGTRAP | (t.stop.event << 8), 0)  # what an event stop's siginfo holds

    def eventmsg(self, tid: int) -> int:
        t = self._stopped(tid, "GETEVENTMSG")
        assert t.stop is not None
        return t.stop.msg

    def cont(self, tid: int, sig: int) -> None:
        self.calls.append(("cont", tid, sig))
        self._resume(self._stopped(tid, "CONT"), sig, step=False)

    def singlestep(self, tid: int, sig: int) -> None:
        self.calls.append(("singlestep", tid, sig))
        self._resume(self._stopped(tid, "SINGLESTEP"), sig, step=True)

    def interrupt(self, tid: int) -> None:
        self.calls.append(("interrupt", tid))
        t = self._live(tid)
        if not t.traced:
            raise NoSuchProcessError(f"ptrace(INTERRUPT) of {tid}: No such process")
        if t.listening:
            # INTERRUPT re-traps a LISTENing tracee into PTRACE_EVENT_STOP at once (man 2 ptrace).
            assert t.stop is not None
            t.listening = False
            t.stop = Stop("group", t.stop.sig, EVENT_STOP)
            self._report(t)
            return
        t.interrupt_pending = True
        if t.stop is None and self.eager:
            self._advance(t)

    def listen(self, tid: int) -> None:
        self.calls.append(("listen", tid))
        t = self._stopped(tid, "LISTEN")
        assert t.stop is not None
        if t.stop.kind != "group":
            raise InvalidArgumentError(f"ptrace(LISTEN) of {tid}: not in a group-stop")
        t.listening = True

    def detach(self, tid: int, sig: int) -> None:
        self.calls.append(("detach", tid, sig))
        t = self._stopped(tid, "DETACH")
        assert t.stop is not None
        kind = t.stop.kind
        t.traced = False
        t.interrupt_pending = False  # __ptrace_unlink clears the jobctl trap bits
        t.stepping = False
        if kind == "group":
            return  # stays in its group-stop, as if never traced
        t.stop = None
        if kind == "signal" and sig:
            self._deliver(t, sig)
        self._advance(t)

    def getregs(self, tid: int) -> dict[str, int]:
        return dict(self._stopped(tid, "GETREGS").regs)

    def setregs(self, tid: int, regs: Mapping[str, int]) -> None:
        self._stopped(tid, "SETREGS").regs.update(regs)

    def pending_signals(self, tid: int) -> int:
        self.pending_reads.append(tid)
        t = self.threads.get(tid)
        if t is None or not t.alive:
            return 0
        mask = 0
        for sig in t.pending:
            mask |= 1 << (sig - 1)
        return mask

    def send_signal(self, pid: int, tid: int, sig: int) -> None:
        self.calls.append(("tgkill", tid, sig))
        self.queue_signal(tid, sig, SigInfo(SI_TKILL, 0), now=False)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        self._live(pid)
        if any(a in self.unmapped for a in range(addr, addr + size)):
            raise InvalidArgumentError(f"read_memory({pid}, {addr:#x}, {size}): not mapped")
        return bytes(self.memory.get(a, 0x90) for a in range(addr, addr + size))

    # ------------------------------------------------------------------ internals

    def _live(self, tid: int) -> FakeThread:
        t = self.threads.get(tid)
        if t is None or not t.alive:
            raise NoSuchProcessError(f"thread {tid}: No such process")
        return t

    def _stopped(self, tid: int, what: str) -> FakeThread:
        t = self.threads.get(tid)
        if t is None or not t.alive or not t.traced or t.stop is None or t.listening:
            raise NoSuchProcessError(
                f"ptrace({what}) of {tid}: No such process (not a stopped tracee)"
            )
        return t

    def _event(self, handle: object) -> FakeEvent:
        if not isinstance(handle, FakeEvent):
            raise FakeKernelError(f"not a slot handle: {handle!r}")
        if handle.closed:
            raise FakeKernelError(f"{handle!r} used after close (EBADF)")
        return handle

    def _enter(self, t: FakeThread, stop: Stop, *, report: bool = True) -> None:
        # "any trap clears pending STOP trap" (kernel/signal.c, ptrace_stop)
        t.interrupt_pending = False
        t.stop = stop
        if report:
            self._report(t)

    def _report(self, t: FakeThread) -> None:
        stop = t.stop
        assert stop is not None
        stop.reported = True
        if stop.kind == "signal":
            self._waitq.append(Report("signal", t.tid, stop.sig))
        elif stop.kind == "group" or (stop.event == EVENT_STOP and stop.sig != SIGTRAP):
            self._waitq.append(Report("group", t.tid, stop.sig))
        else:
            self._waitq.append(Report("event", t.tid, stop.sig, stop.event))

    def _resume(self, t: FakeThread, sig: int, *, step: bool) -> None:
        stop = t.stop
        assert stop is not None
        t.stop = None
        t.stepping = step
        if stop.kind == "event" and stop.event == EVENT_EXIT:
            self._die(t)
            return
        if stop.kind == "signal" and sig:
            self._deliver(t, sig)
            if t.stop is not None:
                return
        if self.eager:
            self._advance(t)

    def _deliver(self, t: FakeThread, sig: int) -> None:
        """The program receives ``sig`` (no handlers: SIGTRAP kills, SIGSTOP stops)."""
        self.delivered.append((t.tid, sig))
        if sig == SIGSTOP:
            for tid in self.processes[t.pid]:
                other = self.threads[tid]
                if other.traced and (other.stop is None or other is t):
                    other.stop = None
                    self._enter(other, Stop("group", SIGSTOP, EVENT_STOP))
        elif sig not in self.handled:
            self.killed[t.pid] = sig
            for tid in list(self.processes[t.pid]):
                self._die(self.threads[tid], code=None, sig=sig)

    def _advance(self, t: FakeThread) -> None:
        """The running thread returns to user mode (get_signal order), then runs on."""
        if not t.alive or t.stop is not None:
            return
        if t.traced and t.interrupt_pending:
            self._enter(t, Stop("event", SIGTRAP, EVENT_STOP))
            return
        if t.pending:
            sig = min(t.pending)
            info = t.pending.pop(sig)
            if t.traced:
                self._enter(t, Stop("signal", sig, info=info))
            else:
                self._deliver(t, sig)
            return
        if t.stepping:
            t.stepping = False
            t.regs["rip"] += 1
            t.pending[SIGTRAP] = SigInfo(TRAP_TRACE, 0)
            self._advance(t)

    def _die(self, t: FakeThread, code: int | None = 0, sig: int = 0) -> None:
        if not t.alive:
            return
        if t.exiting is not None:
            code = t.exiting
        t.alive = False
        t.stop = None
        was_traced = t.traced
        t.traced = False
        members = self.processes[t.pid]
        members.remove(t.tid)
        if not was_traced:
            return
        # The leader's death is reported only once the group is empty (delay_group_leader).
        if t.tid != t.pid:
            self._waitq.append(Report("exited", t.tid, sig, code=code))
        if not members:
            self._waitq.append(Report("exited", t.pid, sig, code=code))


@dataclass(frozen=True)
class Emitted:
    cid: int
    kind: str
    fields: dict[str, Any]


class Harness:
    """An engine on a fake kernel; ``settle`` plays the tracer loop of hwbkptd/_tracer.py."""

    def __init__(
        self, *, park: bool = True, eager: bool = False, int1_faults: bool = False
    ) -> None:
        self.kernel = FakeKernel(eager=eager)
        self.emitted: list[Emitted] = []
        self.engine = Engine(
            self.kernel, self._emit, park=park, clock=lambda: 42, int1_faults=int1_faults
        )

    def _emit(self, cid: int, kind: str, fields: dict[str, Any], droppable: bool) -> None:
        self.emitted.append(Emitted(cid, kind, dict(fields)))

    def take(self, cid: int | None = None) -> list[tuple[str, dict[str, Any]]]:
        """The events emitted (for ``cid``, or all) since the last take, oldest first."""
        mine = [e for e in self.emitted if cid is None or e.cid == cid]
        self.emitted = [e for e in self.emitted if not (cid is None or e.cid == cid)]
        return [(e.kind, e.fields) for e in mine]

    def kinds(self, cid: int) -> list[str]:
        return [kind for kind, _ in self.take(cid)]

    def feed(self, report: Report) -> None:
        engine = self.engine
        if report.kind == "signal":
            engine.on_signal_stop(report.tid, report.sig)
        elif report.kind == "event":
            engine.on_event_stop(report.tid, report.event, report.sig)
        elif report.kind == "group":
            engine.on_group_stop(report.tid, report.sig)
        else:
            engine.on_exited(report.tid, report.code, report.sig or None)

    def settle(self, limit: int = 50) -> int:
        """Run threads and feed every wait status until nothing changes; returns how many."""
        n = 0
        while True:
            self.kernel.run()
            report = self.kernel.wait()
            if report is None:
                return n
            n += 1
            if n > limit:
                raise Livelock(
                    f"still reporting stops after {limit}: {report}; calls {self.kernel.calls[-8:]}"
                )
            self.feed(report)
