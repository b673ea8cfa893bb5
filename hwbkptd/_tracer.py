"""The tracer loop: feeds wait statuses and perf sample rings to the engine.

Theory of operation
-------------------
ptrace attachments belong to the OS thread that made them, so every ptrace request is made
from the trio main thread — here and in the engine, which this module drives. Nothing is
polled: the loop sleeps until

* ``SIGCHLD`` arrives (read from a signalfd, :class:`hwbkptd._kernel.ChildSignals`): a
  traced thread changed state. :func:`hwbkptd._kernel.wait_all` drains every pending
  status (signals coalesce, so one SIGCHLD can stand for many) and each is handed to the
  engine in order;
* the epoll set of notify-mode events becomes readable: their rings are drained in batches;
* a periodic tick: rings below their wake-up mark are flushed, losses that the kernel has
  not reported yet are settled (:meth:`hwbkptd._kernel.BreakpointEvent.settle`), and specs
  the kernel refused with ENOSPC are retried (capacity held by other perf or ptrace users may
  have come back).

*Hot loop.* trio's scheduler is a large share of the path of a stop: a stop-mode hit loop
is two wake-ups per hit (SIGCHLD, then the client's ``resume``), and the two cost ~30 µs
per stop here (bench/_floor.py measures it: its trio floor against its epoll floor). So
after a round that reported a stop the tracer keeps going in :meth:`Tracer._hot_loop`: it
waits on its own epoll set — SIGCHLD, the notify rings and every client socket — and
handles whatever is ready in place: statuses, ring samples, and client messages through the same
``ClientHandle.read_some`` the connection's reader task uses (so order holds: all of it
runs in this one thread and no bytes are held across a yield). It gives trio back its turn
when nothing came within ``HOT_WAIT`` or after ``HOT_BUDGET``, so new connections, timers
and writers of full sockets wait at most that long. It waits in ``epoll_wait``; it never
spins.

*Compiled stop round* (issue 13). Where the extension ``hwbkptd._fastpath`` is built and
``HWBKPT_PURE`` is not set, the hot loop's waiting and its plain rounds run compiled
(:meth:`Tracer._fast_loop`): before each call the engine writes down what it would do
(:meth:`hwbkptd._prepared.PreparedStops.fast_table`), the extension executes that and
reports back, and whatever it did not serve — a status of another kind, a message that is
not a plain ``resume``, a ring, another socket — is handled here as before, after the engine
has taken the report. With ``HWBKPT_PURE=1`` everything runs the Python path below.

:class:`KernelPort` is the engine's view of the kernel layer; it adds what is policy rather
than syscall (e.g. explaining an ``EPERM`` from ``PTRACE_SEIZE`` as "already traced by …").
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from types import ModuleType

import trio

from hwbkpt_proto import BusyError, HwbkptError, NoSuchProcessError, PermissionDeniedError
from hwbkptd import _kernel
from hwbkptd._bpf import WORD_DROPPED, WORD_OLD, Emulator, generate
from hwbkptd._client import ClientHandle
from hwbkptd._engine import Engine, SigInfo
from hwbkptd._model import Mode, Spec
from hwbkptd._records import FILTER_HITS, Filter

__all__ = ["KernelPort", "Tracer"]

log = logging.getLogger(__name__)

TICK = 0.02  # seconds between ring flushes while notify slots exist
SETTLE = 0.25  # seconds between checks for losses no LOST record reported (settle())
# Notify rings. A thread writing a watched word in a loop makes up to 1/(cost of a counted
# hit) samples per second: 175,000/s (5.7 us) on the fastest machine measured (Intel Xeon,
# KVM), 100,000/s on an AMD EPYC. 2 MiB (65,535 samples) covers 0.37 s of that: long enough
# for any pause of the daemon (a garbage collection, a burst of requests, a busy CPU) where
# 64 KiB (12 ms) lost hits. The budget bounds the locked memory of many notify threads.
NOTIFY_RING_KIB = 2048
NOTIFY_RING_BUDGET_MIB = 256
RETRY_BUSY = 1.0  # seconds between retries of specs the kernel refused
# Notify rings wake the loop every this many samples (a quarter of the 2047 a ring holds);
# fewer are flushed by the TICK, so a lone hit is reported within TICK seconds.
NOTIFY_WAKEUP = 512
# The hot loop (module docstring): how long it waits for the next event before handing
# back to trio (the compiled round waits up to HOT_BUDGET while a thread it serves is held:
# its holders' resumes are on the way), and the longest it keeps trio's other tasks (new
# connections, timers, the writers of full sockets) waiting — the compiled round goes on
# past it until no thread it serves is held, up to twice HOT_BUDGET (_fastpath.c, run).
HOT_WAIT = 0.001
HOT_BUDGET = 0.005


def load_fastpath() -> tuple[ModuleType | None, str]:
    """The compiled stop round, or ``None`` and why not (``HWBKPT_PURE=1``, or the
    extension was not built: then the daemon logs a warning and runs the pure path)."""
    if os.environ.get("HWBKPT_PURE", "") not in ("", "0"):
        return None, "off (HWBKPT_PURE is set)"
    try:
        from hwbkptd import _fastpath  # type: ignore[attr-defined]
    except ImportError as err:
        log.warning("the compiled stop round is not built (%s): running the pure path", err)
        return None, f"off (not built: {err})"
    return _fastpath, "on"


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _comm(pid: int) -> str:
    try:
        return _kernel.process_name(pid)
    except HwbkptError:
        return "?"


class KernelPort:
    """The engine's :class:`~hwbkptd._engine.Port`, realized with :mod:`hwbkptd._kernel`."""

    def __init__(
        self,
        ring_kib: int = NOTIFY_RING_KIB,
        ring_budget_mib: int = NOTIFY_RING_BUDGET_MIB,
        *,
        bpf: bool = True,
    ) -> None:
        """``ring_kib``: the ring of each notify event; ``ring_budget_mib``: the rings of all
        of them together. Past the budget new rings get the smallest size. ``bpf``: filters
        are BPF programs in the kernel; else :class:`Emulator` runs them here, at the stop of
        every hit (the engine opens such slots in stop mode)."""
        self.bpf = bpf
        self.emulators: dict[int, tuple[Emulator, int]] = {}  # fd -> (filter, hits seen)
        self.epoll = select.epoll()
        self.notify: dict[int, _kernel.BreakpointEvent] = {}  # fd -> event
        self.tokens: dict[int, int] = {}  # fd -> token
        self._self = os.getpid()
        page_kib = _kernel.PAGE_SIZE // 1024
        self.ring_pages = _pow2_floor(max(ring_kib // page_kib, _kernel.RING_DATA_PAGES))
        self.ring_budget_pages = ring_budget_mib * 1024 // page_kib
        self.ring_pages_used = 0

    def seize(self, tid: int) -> None:
        try:
            _kernel.seize(tid)
        except PermissionDeniedError as err:
            try:
                tracer = _kernel.tracer_of(tid)
            except HwbkptError:
                tracer = 0
            if tracer == self._self:
                return  # auto-attached already (a clone of a seized thread)
            if tracer:
                raise BusyError(
                    f"thread {tid} is already traced by pid {tracer} ({_comm(tracer)}); the kernel "
                    "allows one tracer per thread: detach that debugger, or reach the process "
                    "through hwbkptd"
                ) from err
            raise

    def threads_of(self, pid: int) -> list[int]:
        return _kernel.threads_of(pid)

    def tgid_of(self, tid: int) -> int:
        return _kernel.tgid_of(tid)

    def open_slot(
        self, tid: int, spec: Spec, mode: Mode, token: int, flt: Filter | None = None
    ) -> object:
        bpf = None
        if flt is not None:
            # "old" of the first hit is the value now (the watched bytes as installed).
            try:
                old = int.from_bytes(_kernel.read_memory(tid, spec.addr, spec.length), "little")
            except HwbkptError:
                old = 0
            init = {WORD_OLD: old, **{FILTER_HITS + i: n for i, n in enumerate(flt.hits)}}
            if self.bpf:
                program = generate(
                    spec.addr,
                    spec.length,
                    flt.conditions,
                    flt.always,
                    deliver=flt.deliver,
                    notify=flt.notify,
                    notify_all=flt.notify_all,
                )
                bpf = _kernel.BpfFilter(program, init)
        # A filter with notify watches writes its own hit records (with the values) to a BPF
        # ring; the event then needs no perf ring of its own: it only has to run the program.
        records = bpf is not None and bpf.ring_fd >= 0
        pages = self.ring_pages
        while pages > _kernel.RING_DATA_PAGES and self.ring_pages_used + pages > (
            self.ring_budget_pages
        ):
            pages //= 2
        event = _kernel.BreakpointEvent(
            tid,
            spec.addr,
            spec.length,
            spec.access,
            Mode.COUNT if records and mode is Mode.NOTIFY else mode,
            token,
            wakeup=NOTIFY_WAKEUP,
            ring_pages=pages,
            bpf=bpf,
        )
        if flt is not None and bpf is None:
            self.emulators[event.fd] = (Emulator(flt.conditions, init), 0)
        if bpf is not None and records:
            self.notify[bpf.ring_fd] = event
            self.tokens[bpf.ring_fd] = token
            self.epoll.register(bpf.ring_fd, select.EPOLLIN)
            return event
        if mode is Mode.NOTIFY:
            self.ring_pages_used += event.ring_pages
            self.notify[event.fd] = event
            self.tokens[event.fd] = token
            self.epoll.register(event.fd, select.EPOLLIN)
        return event

    def close_slot(self, handle: object) -> None:
        assert isinstance(handle, _kernel.BreakpointEvent)
        self.emulators.pop(handle.fd, None)
        if handle.bpf is not None and handle.bpf.ring_fd in self.notify:
            self.epoll.unregister(handle.bpf.ring_fd)
            del self.notify[handle.bpf.ring_fd]
            del self.tokens[handle.bpf.ring_fd]
        if handle.fd in self.notify:
            self.ring_pages_used -= handle.ring_pages
            self.epoll.unregister(handle.fd)
            del self.notify[handle.fd]
            del self.tokens[handle.fd]
        handle.close()

    def read_count(self, handle: object) -> int:
        assert isinstance(handle, _kernel.BreakpointEvent)
        return handle.read_count()

    @staticmethod
    def fd_of(handle: object) -> int:
        """The counter's fd, which the compiled stop round reads (not an engine call)."""
        assert isinstance(handle, _kernel.BreakpointEvent)
        return handle.fd

    def read_filter(self, handle: object) -> tuple[int, ...]:
        assert isinstance(handle, _kernel.BreakpointEvent)
        if handle.bpf is not None:
            return handle.bpf.words()
        # The ptrace fallback: the thread is at the stop of its hit (a stop-mode event traps
        # at every hit, before the next instruction), so the watched bytes are the hit's.
        emulator, seen = self.emulators[handle.fd]
        count = handle.read_count()
        if count > seen:
            data = _kernel.read_memory(handle.tid, handle.addr, handle.length)
            for _ in range(count - seen):
                emulator.run(int.from_bytes(data, "little"), handle.tid)
            self.emulators[handle.fd] = (emulator, count)
        return tuple(emulator.words)

    def drain(self, handle: object, final: bool) -> tuple[list[tuple[int, ...]], int, int]:
        assert isinstance(handle, _kernel.BreakpointEvent)
        bpf = handle.bpf
        if bpf is not None and bpf.ring_fd >= 0:
            # Hit records of the filter: (tid, ip, time, new, old, mask); records the ring
            # had no room for are counted by the program.
            records = bpf.hit_records()
            dropped = bpf.words()[WORD_DROPPED]
            lost, bpf.dropped_seen = dropped - bpf.dropped_seen, dropped
            return records, lost, 0
        throttled = handle.throttled
        samples, lost = handle.drain()
        if final:
            # Losses the kernel had no chance to report as a PERF_RECORD_LOST.
            lost += max(0, handle.unaccounted())
        return samples, lost, handle.throttled - throttled

    def settle(self, handle: object) -> int:
        """Losses of a quiet notify event that no LOST record reports yet (``settle``).
        A filter's records come from its BPF ring, whose losses the program counts."""
        assert isinstance(handle, _kernel.BreakpointEvent)
        if handle.bpf is not None and handle.bpf.ring_fd >= 0:
            return 0
        return handle.settle()

    def siginfo(self, tid: int) -> SigInfo:
        info = _kernel.getsiginfo(tid)
        return SigInfo(info.code, info.perf_data, info.addr)

    def eventmsg(self, tid: int) -> int:
        return _kernel.geteventmsg(tid)

    def cont(self, tid: int, sig: int) -> None:
        _kernel.cont(tid, sig)

    def singlestep(self, tid: int, sig: int) -> None:
        _kernel.singlestep(tid, sig)

    def interrupt(self, tid: int) -> None:
        _kernel.interrupt(tid)

    def listen(self, tid: int) -> None:
        _kernel.listen(tid)

    def detach(self, tid: int, sig: int) -> None:
        _kernel.detach(tid, sig)

    def getregs(self, tid: int) -> dict[str, int]:
        return _kernel.getregs(tid)

    def setregs(self, tid: int, regs: Mapping[str, int]) -> None:
        _kernel.setregs(tid, regs)

    def pending_signals(self, tid: int) -> int:
        try:
            return _kernel.pending_signals(tid)
        except NoSuchProcessError:
            return 0

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return _kernel.read_memory(pid, addr, size)

    def send_signal(self, pid: int, tid: int, sig: int) -> None:
        _kernel.send_signal(pid, tid, sig)


class Tracer:
    """Runs the loop of the module docstring for one engine."""

    def __init__(
        self,
        engine: Engine,
        port: KernelPort,
        batch: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
        clients: Mapping[int, ClientHandle] | None = None,
        fastpath: ModuleType | None = None,
    ) -> None:
        """``batch()`` wraps each round of work, so that the events one wake-up produces
        reach each client in one write (the server corks its connections). ``clients``:
        the connections by client id, and ``fastpath`` the compiled stop round
        (:func:`load_fastpath`), used only with both."""
        self.engine = engine
        self.port = port
        self.batch = batch
        self.clients: Mapping[int, ClientHandle] = clients if clients is not None else {}
        self.fastpath = fastpath if clients is not None else None
        self.wakeups = 0
        self.hot_rounds = 0  # rounds served by the hot loop, without trio (status counter)
        self.fast_rounds = 0  # of which compiled (status counter)
        # The hot loop's own epoll set: SIGCHLD, the notify rings, every client socket.
        self._hot = select.epoll()
        self._hot.register(port.epoll.fileno(), select.EPOLLIN)
        self._readers: dict[int, Callable[[], bool | None]] = {}

    def add_reader(self, fd: int, read: Callable[[], bool | None]) -> None:
        """Let the hot loop serve client socket ``fd``: ``read()`` reads and handles what
        it holds (``ClientHandle.read_some``: ``None`` means "do not read it again")."""
        self._readers[fd] = read
        try:
            self._hot.register(fd, select.EPOLLIN)
        except FileExistsError:  # a closed socket's number, reused before it was removed
            self._hot.modify(fd, select.EPOLLIN)

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            with contextlib.suppress(OSError):
                self._hot.unregister(fd)

    def drain_waits(self, first: Iterable[tuple[int, int]] = ()) -> None:
        """Hand every pending wait status to the engine, after those in ``first`` (taken
        from the kernel already, by the compiled round)."""
        engine = self.engine
        for tid, status in itertools.chain(first, _kernel.wait_all()):
            event = _kernel.decode_status(status)
            if isinstance(event, _kernel.Exited | _kernel.Killed) or (
                isinstance(event, _kernel.EventStop) and event.event == _kernel.PTRACE_EVENT_EXEC
            ):
                _kernel.forget_memory(tid)  # the cached /proc/PID/mem is of the old image
            try:
                if isinstance(event, _kernel.SignalStop):
                    engine.on_signal_stop(tid, event.signal)
                elif isinstance(event, _kernel.EventStop):
                    engine.on_event_stop(tid, event.event, event.signal)
                elif isinstance(event, _kernel.GroupStop):
                    engine.on_group_stop(tid, event.signal)
                elif isinstance(event, _kernel.Exited):
                    engine.on_exited(tid, event.code, None)
                elif isinstance(event, _kernel.Killed):
                    engine.on_exited(tid, None, event.signal)
            except Exception:
                # A bug must not leave a thread stopped: log it, let the thread go on.
                log.exception("engine failed on %s of thread %d", event, tid)
                if not isinstance(event, _kernel.Exited | _kernel.Killed):
                    try:
                        _kernel.cont(
                            tid,
                            event.signal
                            if isinstance(event, _kernel.SignalStop)
                            and event.signal != signal.SIGTRAP
                            else 0,
                        )
                    except HwbkptError:
                        pass

    def drain_rings(self, fds: list[int] | None = None) -> None:
        """Drain the rings of the given notify fds (default: all)."""
        port = self.port
        for fd in fds if fds is not None else list(port.notify):
            event = port.notify.get(fd)
            if event is None:
                continue
            samples, lost, throttled = port.drain(event, False)
            if samples or lost or throttled:
                self.engine.on_samples(port.tokens[fd], samples, lost, throttled)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        signals = _kernel.ChildSignals()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._rings)
                nursery.start_soon(self._ticks)
                task_status.started()
                self._hot.register(signals.fd, select.EPOLLIN)
                fast = self.fastpath is not None
                while True:
                    stops = self.engine.counters["stops_reported"]
                    # The compiled round, when it has something to serve, takes the SIGCHLD
                    # and the stop that woke us (it drains the signalfd itself) and waits
                    # no longer. Otherwise: drain the signals first, then waitpid: a
                    # SIGCHLD that comes after makes the fd readable again, so no status
                    # is ever left waiting.
                    if not (fast and self._fast_loop(signals, 0.0)):
                        signals.drain()
                    with self.batch():
                        self.drain_waits()
                    if self.engine.counters["stops_reported"] != stops:
                        self._hot_loop(signals)
                    await trio.lowlevel.wait_readable(signals.fd)
                    self.wakeups += 1
        finally:
            signals.close()

    def _hot_loop(self, signals: _kernel.ChildSignals) -> None:
        """Serve a stop-mode hit loop without trio's scheduler (module docstring, "Hot loop").

        Waits on the hot epoll set (SIGCHLD, rings, client sockets) and handles whatever
        is ready in place, for as long as something comes within HOT_WAIT, but no longer
        than HOT_BUDGET in all; then trio's other tasks get their turn.
        """
        if self.fastpath is not None and self._fast_loop(signals, HOT_WAIT):
            return
        poll = self._hot.poll
        deadline = time.monotonic() + HOT_BUDGET
        while True:
            ready = poll(HOT_WAIT)
            if not ready:
                return
            with self.batch():
                for fd, _ in ready:
                    self._serve_fd(fd, signals)
            self.hot_rounds += 1
            if time.monotonic() >= deadline:
                return

    def _serve_fd(self, fd: int, signals: _kernel.ChildSignals) -> None:
        """Handle one ready fd of the hot epoll set (inside a batch)."""
        if fd == signals.fd:
            signals.drain()
            self.drain_waits()
        elif fd == self.port.epoll.fileno():
            self.drain_rings([f for f, _ in self.port.epoll.poll(0)])
        else:
            read = self._readers.get(fd)
            if read is not None and read() is None:
                # Hung up or not to be read: its reader task finds out.
                self.remove_reader(fd)

    def _fast_loop(self, signals: _kernel.ChildSignals, wait: float) -> bool:
        """The hot loop with its plain rounds compiled (module docstring): each call of the
        extension serves what the engine's table allows, waiting up to ``wait`` seconds
        for each next event, and returns what it did and what it left; the engine takes
        the report, then the rest is handled here; until nothing came, or HOT_BUDGET.
        Returns False, having done nothing, when the table is empty from the start (no
        stop watch anywhere: the Python loop serves that as well, with no table to build
        per wake-up)."""
        assert self.fastpath is not None
        run = self.fastpath.run
        max_stops = self.fastpath.MAX_STOPS
        fd_of = self.port.fd_of
        engine = self.engine
        epfd = self._hot.fileno()
        wait_ms = round(wait * 1000)
        deadline = time.monotonic_ns() + int(HOT_BUDGET * 1e9)
        first = True
        while True:
            budget = deadline - time.monotonic_ns()
            if budget <= 0:
                return True
            threads = [
                (tid, pid, holds, tuple((fd_of(h), *rest) for h, *rest in slots), trap_ok)
                for tid, pid, holds, slots, trap_ok in engine.fast_table(max_stops)
            ]
            if first and not threads:
                return False
            first = False
            clients = [
                (cid, fd) for cid, client in self.clients.items() if (fd := client.fast_fd()) >= 0
            ]
            handed, changed, served, ready_fd, stops, traps, rounds, why = run(
                threads, clients, epfd, signals.fd, wait_ms, budget
            )
            with self.batch():
                engine.fast_apply(changed, stops, traps, sum(s[1] for s in served))
                for cid, resumes, sent, unsent, unread in served:
                    client = self.clients.get(cid)
                    if client is not None:
                        client.fast_report(resumes, sent, unsent, unread)
                if handed:
                    self.drain_waits(handed)
                if ready_fd >= 0:
                    self._serve_fd(ready_fd, signals)
            self.hot_rounds += rounds
            self.fast_rounds += rounds
            if handed or ready_fd >= 0 or why == "message":
                log.debug(
                    "compiled round: %d stops, left %s to the engine (%s, fd %d)",
                    stops, why, handed, ready_fd,
                )
            if why in ("idle", "budget"):
                return True

    async def _rings(self) -> None:
        epoll = self.port.epoll
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            ready = [fd for fd, _ in epoll.poll(0)]
            with self.batch():
                self.drain_rings(ready)

    def settle_rings(self) -> None:
        """Report losses of quiet notify rings that the kernel has not reported yet."""
        port = self.port
        for fd, event in list(port.notify.items()):
            lost = port.settle(event)
            if lost:
                self.engine.on_samples(port.tokens[fd], (), lost)

    async def _ticks(self) -> None:
        last_retry = last_settle = time.monotonic()
        while True:
            await trio.sleep(TICK)
            now = time.monotonic()
            if self.port.notify:
                with self.batch():
                    self.drain_rings()
                    if now - last_settle >= SETTLE:
                        last_settle = now
                        self.settle_rings()
            if now - last_retry >= RETRY_BUSY:
                last_retry = now
                self.engine.retry_busy()

    def shutdown(self, timeout: float = 3.0) -> None:
        """Detach every thread, waiting (blocking) for each to reach a stop to detach at."""
        self.drain_waits()
        self.engine.shutdown()
        deadline = time.monotonic() + timeout
        while self.engine.traced() and time.monotonic() < deadline:
            self.drain_waits()
            if self.engine.traced():
                time.sleep(0.001)
        left = self.engine.traced()
        if left:
            log.warning("threads still traced at exit (the kernel detaches them): %s", left)
