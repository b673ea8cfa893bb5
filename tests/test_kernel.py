"""The kernel layer against the live kernel: real programs, real ptrace, real perf hits.

Each test is also a measurement of a kernel fact the design depends on (hwbkptd/_kernel.py's
module docstring lists them). This process is the tracer, and also the parent of the targets,
so ``wait_all`` reaps their exit statuses here; :class:`Tracer` keeps them by tid.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hwbkpt_proto._errors import (
    DebugRegisterIOError,
    InvalidArgumentError,
    NoSpaceError,
    NoSuchProcessError,
    PermissionDeniedError,
)
from hwbkptd import _kernel as k
from hwbkptd._model import Access, Mode
from hwbkptd._platform import int1_faults
from tests._progs import Target

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

TIMEOUT = 10.0
SIGTRAP_BIT = 1 << (signal.SIGTRAP - 1)
EFLAGS_RF = 1 << 16
DR_OFFSET = 848  # offsetof(struct user, u_debugreg) on x86-64

Start = Callable[..., Target]


def addr(proc: Target, key: str = "addr") -> int:
    value = proc.info[key]
    assert isinstance(value, int)
    return value


class Tracer:
    """Polls ``wait_all`` with absolute deadlines and owns the events a test opens."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, k.WaitEvent]] = []
        self.ended: dict[int, k.WaitEvent] = {}
        self.events: list[k.BreakpointEvent] = []

    def open(self, *args: object, **kwargs: object) -> k.BreakpointEvent:
        ev = k.BreakpointEvent(*args, **kwargs)  # type: ignore[arg-type]
        self.events.append(ev)
        return ev

    def next(self, tid: int | None = None, timeout: float = TIMEOUT) -> tuple[int, k.WaitEvent]:
        """The next wait event (of ``tid`` if given); fails the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for tid_, status in k.wait_all():
                ev = k.decode_status(status)
                if isinstance(ev, k.Exited | k.Killed):
                    self.ended[tid_] = ev
                self.queue.append((tid_, ev))
            for i, (tid_, ev) in enumerate(self.queue):
                if tid is None or tid_ == tid:
                    del self.queue[i]
                    return tid_, ev
            if time.monotonic() > deadline:
                pytest.fail(f"no wait event for {tid} within {timeout} s")
            time.sleep(0.0002)

    def stop(self, tid: int, timeout: float = TIMEOUT) -> k.WaitEvent:
        return self.next(tid, timeout)[1]

    def close(self) -> None:
        for ev in self.events:
            ev.close()


@pytest.fixture
def tracer() -> Iterator[Tracer]:
    t = Tracer()
    try:
        yield t
    finally:
        t.close()


def finish(proc: Target, tracer: Tracer) -> int:
    """Run a traced single-threaded target to its end, resuming every stop unchanged
    (suppressing SIGTRAPs); return its exit code like Popen (``-SIG`` if killed)."""
    while True:
        _, ev = tracer.next(proc.pid)
        if isinstance(ev, k.Exited):
            proc.popen.returncode = ev.code
            return ev.code
        if isinstance(ev, k.Killed):
            proc.popen.returncode = -ev.signal
            return -ev.signal
        sig = ev.signal if isinstance(ev, k.SignalStop) and ev.signal != signal.SIGTRAP else 0
        k.cont(proc.pid, sig)


# --- counting, notify, slots ------------------------------------------------------------------


def test_count_and_notify_without_tracing(target: Start, tracer: Tracer) -> None:
    proc = target("writer", 100)
    count = tracer.open(proc.pid, addr(proc), 8, Access.WRITE, Mode.COUNT, 0)
    notify = tracer.open(proc.pid, addr(proc, "addr2"), 8, Access.WRITE, Mode.NOTIFY, 0)
    rw = tracer.open(proc.pid, addr(proc), 8, Access.READWRITE, Mode.COUNT, 0)
    proc.go()
    assert proc.line().startswith("done var=100")
    assert proc.wait() == 0
    assert count.read_count() == 100
    assert rw.read_count() >= 100  # stores; plus the final printf's read of var
    samples, lost = notify.drain()
    assert lost == 0
    assert len(samples) == 100 == notify.read_count()
    func = addr(proc, "func")
    for tid, ip, _time in samples:
        assert tid == proc.pid
        # a data breakpoint traps after the store: ip is the next instruction (the ret)
        assert func < ip <= func + 16
    times = [s[2] for s in samples]
    assert times == sorted(times)
    assert notify.drain() == ([], 0)


def test_fifth_slot_is_enospc(target: Start, tracer: Tracer) -> None:
    proc = target("writer", 1)
    for i in range(4):
        tracer.open(proc.pid, addr(proc) + 8 * i, 8, Access.WRITE, Mode.COUNT, i)
    with pytest.raises(NoSpaceError) as info:
        tracer.open(proc.pid, addr(proc, "pair"), 8, Access.WRITE, Mode.COUNT, 9)
    assert isinstance(info.value.__cause__, OSError)
    tracer.events.pop().close()
    tracer.open(proc.pid, addr(proc, "pair"), 8, Access.WRITE, Mode.COUNT, 9)


def test_notify_ring_overflow_is_counted(target: Start, tracer: Tracer) -> None:
    """More hits than the 64 KiB ring holds (2047 samples) between drains. The kernel writes
    a LOST record only when room frees and another sample comes; the losses of a thread that
    exits with a full ring show only in the counter (unaccounted())."""
    proc = target("spinner")
    ev = tracer.open(proc.pid, addr(proc), 8, Access.WRITE, Mode.NOTIFY, 0)
    proc.go()
    time.sleep(0.3)  # ~10 µs per hit: far more hits than the ring holds
    first, lost = ev.drain()
    assert len(first) == 2047
    assert lost == 0  # not reported yet
    time.sleep(0.05)
    proc.close_stdin()
    proc.line()
    assert proc.wait() == 0
    second, lost = ev.drain()
    assert lost > 0
    print(f"ring: {len(first)} + {len(second)} samples, lost {lost}, count {ev.read_count()}")
    assert ev.unaccounted() >= 0
    assert ev.sampled + ev.lost + ev.unaccounted() == ev.read_count()
    assert ev.throttled == 0


# --- SIGTRAP stops ------------------------------------------------------------------------------


def test_one_store_two_watches_one_sigtrap(target: Start, tracer: Tracer) -> None:
    """One 16-byte movdqa over two watched words: ONE stop, but both counters advance."""
    n = 20
    proc = target("writer", n, "pair")
    lo = tracer.open(proc.pid, addr(proc, "pair"), 8, Access.WRITE, Mode.STOP, 1)
    hi = tracer.open(proc.pid, addr(proc, "pair") + 8, 8, Access.WRITE, Mode.STOP, 2)
    k.seize(proc.pid)
    proc.go()
    seen_data = set()
    for i in range(1, n + 1):
        ev = tracer.stop(proc.pid)
        assert ev == k.SignalStop(signal.SIGTRAP)
        si = k.getsiginfo(proc.pid)
        assert (si.signo, si.code) == (signal.SIGTRAP, k.TRAP_PERF)
        seen_data.add(si.perf_data)
        assert (lo.read_count(), hi.read_count()) == (i, i)
        k.cont(proc.pid)
    assert len(seen_data) == 1  # only one event's sig_data is ever seen
    assert finish(proc, tracer) == 0
    assert (lo.read_count(), hi.read_count()) == (n, n)


def test_singlestep_trap_and_step_onto_a_watch(target: Start, tracer: Tracer) -> None:
    """Step traps are TRAP_TRACE. A step whose instruction also hits a perf STOP watch stops
    once, still TRAP_TRACE (perf's own SIGTRAP is dropped as a duplicate legacy signal), and
    the watch's counter advances; no second stop follows for that hit."""
    proc = target("writer", 3)
    a = tracer.open(proc.pid, addr(proc), 8, Access.WRITE, Mode.STOP, 1)
    b = tracer.open(proc.pid, addr(proc, "addr2"), 8, Access.WRITE, Mode.STOP, 2)
    k.seize(proc.pid)
    proc.go()
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
    assert k.getsiginfo(proc.pid).perf_data == 1
    assert (a.read_count(), b.read_count()) == (1, 0)
    rip = k.getregs(proc.pid)["rip"]
    # step over `mov %rdi, var2(%rip)` (7 bytes), which hits b
    k.singlestep(proc.pid)
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
    si = k.getsiginfo(proc.pid)
    assert si.code == k.TRAP_TRACE
    assert (a.read_count(), b.read_count()) == (1, 1)
    assert k.getregs(proc.pid)["rip"] == rip + 7
    # step over the `ret`: a pure single-step trap
    k.singlestep(proc.pid)
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
    assert k.getsiginfo(proc.pid).code == k.TRAP_TRACE
    # the next stop is the next iteration's store to var, not a late TRAP_PERF for b
    k.cont(proc.pid)
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
    assert k.getsiginfo(proc.pid).perf_data == 1
    assert (a.read_count(), b.read_count()) == (2, 1)
    k.cont(proc.pid)
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
    assert k.getsiginfo(proc.pid).perf_data == 2
    k.cont(proc.pid)
    assert finish(proc, tracer) == 0
    assert (a.read_count(), b.read_count()) == (3, 3)


def test_execute_breakpoint_stops_before_and_rf_prevents_retrigger(
    target: Start, tracer: Tracer
) -> None:
    n = 5
    proc = target("writer", n)
    func = addr(proc, "func")
    x = tracer.open(proc.pid, func, 1, Access.EXECUTE, Mode.STOP, 7)
    k.seize(proc.pid)
    proc.go()
    for i in range(1, n + 1):
        assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
        si = k.getsiginfo(proc.pid)
        assert (si.code, si.perf_data, si.addr) == (k.TRAP_PERF, 7, func)
        regs = k.getregs(proc.pid)
        assert regs["rip"] == func  # before the instruction runs ...
        assert regs["eflags"] & EFLAGS_RF  # ... with RF set so it runs once resumed
        var = int.from_bytes(k.read_memory(proc.pid, addr(proc), 8), "little")
        assert var == i - 1  # write_both(i) has not stored yet
        assert x.read_count() == i
        k.cont(proc.pid)
    assert finish(proc, tracer) == 0  # exactly n stops: RF kept each from re-triggering
    assert x.read_count() == n


def test_program_own_sigtraps_are_not_perf(target: Start, tracer: Tracer) -> None:
    """int3 arrives as SI_KERNEL, int1 as TRAP_BRKPT, raise() as SI_TKILL; delivered, the
    handler runs. int1's si_addr (= rip) is just after its 0xF1 byte where it traps, at the
    byte where it faults: which one this CPU does is measured by the platform probe."""
    faults = int1_faults()
    proc = target("sigtrap", 2)
    k.seize(proc.pid)
    proc.go()
    codes = []
    while True:
        _, ev = tracer.next(proc.pid)
        if isinstance(ev, k.SignalStop):
            info = k.getsiginfo(proc.pid)
            codes.append(info.code)
            if info.code == k.TRAP_BRKPT:
                assert info.addr == k.getregs(proc.pid)["rip"]
                byte = info.addr if faults else info.addr - 1
                assert k.read_memory(proc.pid, byte, 1) == b"\xf1"
            k.cont(proc.pid, ev.signal)
        elif isinstance(ev, k.EventStop) and ev.event == k.PTRACE_EVENT_EXIT:
            break
        else:
            k.cont(proc.pid)
    assert codes == [k.SI_KERNEL] * 2 + [k.TRAP_BRKPT] * 2 + [-6] * 2  # SI_TKILL == -6
    assert proc.line() == "done handled=6"
    k.cont(proc.pid)
    assert tracer.stop(proc.pid) == k.Exited(0)


# --- ptrace stops, threads, exec --------------------------------------------------------------


def test_interrupt_gives_event_stop_and_detach_leaves_it_running(
    target: Start, tracer: Tracer
) -> None:
    proc = target("spinner", 100)
    k.seize(proc.pid)
    assert k.tracer_of(proc.pid) == os.getpid()
    proc.go()
    k.interrupt(proc.pid)
    assert tracer.stop(proc.pid) == k.EventStop(k.PTRACE_EVENT_STOP, signal.SIGTRAP)
    regs = k.getregs(proc.pid)
    k.setregs(proc.pid, {"r12": regs["r12"]})  # a no-op merge round trip
    assert k.getregs(proc.pid) == regs
    k.detach(proc.pid)
    assert k.tracer_of(proc.pid) == 0
    proc.close_stdin()
    assert proc.line().startswith("done")
    assert proc.wait() == 0


def test_group_stop_and_listen(target: Start, tracer: Tracer) -> None:
    """kill -STOP: signal-delivery-stop, then (delivered) a group-stop that LISTEN keeps
    stopped; kill -CONT wakes it: an EVENT_STOP/SIGTRAP, then SIGCONT's delivery stop."""
    proc = target("spinner", 100)
    k.seize(proc.pid)
    proc.go()
    os.kill(proc.pid, signal.SIGSTOP)
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGSTOP)
    k.cont(proc.pid, signal.SIGSTOP)
    assert tracer.stop(proc.pid) == k.GroupStop(signal.SIGSTOP)
    k.listen(proc.pid)
    time.sleep(0.05)
    with open(f"/proc/{proc.pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    assert state in ("t", "T")
    os.kill(proc.pid, signal.SIGCONT)
    seq = []
    while True:
        ev = tracer.stop(proc.pid)
        seq.append(ev)
        if ev == k.SignalStop(signal.SIGCONT):
            k.cont(proc.pid, signal.SIGCONT)
            break
        k.cont(proc.pid)
    assert seq == [k.EventStop(k.PTRACE_EVENT_STOP, signal.SIGTRAP), k.SignalStop(signal.SIGCONT)]
    proc.close_stdin()
    assert proc.line().startswith("done")
    assert finish(proc, tracer) == 0


def test_clone_event_new_thread_gets_watch_before_it_runs(target: Start, tracer: Tracer) -> None:
    t, n = 3, 50
    proc = target("threads", t, n)
    var = addr(proc)
    k.seize(proc.pid)
    proc.go()
    counters: dict[int, k.BreakpointEvent] = {}
    exited = 0
    while exited == 0:
        tid, ev = tracer.next()
        if isinstance(ev, k.EventStop) and ev.event == k.PTRACE_EVENT_CLONE:
            new = k.geteventmsg(tid)
            assert k.tgid_of(new) == proc.pid
            counters[new] = tracer.open(new, var, 8, Access.WRITE, Mode.COUNT, 0)
            k.cont(tid)
        elif isinstance(ev, k.EventStop) and ev.event == k.PTRACE_EVENT_STOP:
            # the new thread's first stop (SIGTRAP, not a group-stop); may come first
            assert ev.signal == signal.SIGTRAP
            if tid not in counters:
                counters[tid] = tracer.open(tid, var, 8, Access.WRITE, Mode.COUNT, 0)
            k.cont(tid)
        elif isinstance(ev, k.Exited) and tid == proc.pid:
            exited = 1
        elif isinstance(ev, k.Exited | k.Killed):
            pass
        else:
            k.cont(tid)
    assert len(counters) == t
    assert [c.read_count() for c in counters.values()] == [n] * t


def test_exec_event_and_remove_on_exec(target: Start, tracer: Tracer) -> None:
    proc = target("execer", 3)
    ev = tracer.open(proc.pid, addr(proc), 8, Access.WRITE, Mode.STOP, 1)
    k.seize(proc.pid)
    proc.go()
    for _ in range(3):
        assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
        k.read_memory(proc.pid, addr(proc), 8)  # caches the /proc/PID/mem fd
        k.cont(proc.pid)
    assert tracer.stop(proc.pid) == k.EventStop(k.PTRACE_EVENT_EXEC, signal.SIGTRAP)
    assert k.geteventmsg(proc.pid) == proc.pid
    k.forget_memory(proc.pid)  # the old fd still points at the old mm
    k.cont(proc.pid)
    assert proc.line().startswith("done var=3")
    assert proc.line().startswith("execd")
    assert finish(proc, tracer) == 0  # the new image's store did not stop it
    assert ev.read_count() == 3  # removed at exec


# --- detaching, tracer death ------------------------------------------------------------------


def interrupt_until_sigtrap_pending(proc: Target, tracer: Tracer, tries: int = 3000) -> int:
    """Race PTRACE_INTERRUPT against a perf SIGTRAP until the interrupt stop comes with the
    SIGTRAP still pending (queued by the hit, not yet dequeued). The target is a ``spinner 0
    2000`` (a watched store, then ~2 µs of user-mode work) hitting a STOP watch; each try
    resumes it and interrupts after a random 0-60 µs. Measured here: ~13% of tries (256 of
    2000); with no user work between hits only 0.1%. Returns the number of tries it took."""
    assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)  # the first hit
    rng = random.Random(1)
    for attempt in range(1, tries + 1):
        k.cont(proc.pid)
        until = time.perf_counter() + rng.random() * 60e-6
        while time.perf_counter() < until:
            pass
        k.interrupt(proc.pid)
        while True:
            ev = tracer.stop(proc.pid)
            if ev == k.EventStop(k.PTRACE_EVENT_STOP, signal.SIGTRAP):
                break
            assert ev == k.SignalStop(signal.SIGTRAP)
            k.cont(proc.pid)
        if k.pending_signals(proc.pid) & SIGTRAP_BIT:
            return attempt
        k.cont(proc.pid)  # start the next try from a SIGTRAP stop again
        assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
    # A race this test cannot force; losing it says nothing about the code under test.
    pytest.skip(f"no interrupt stop with a pending SIGTRAP in {tries} tries (timing)")


def test_detach_with_pending_perf_sigtrap_kills_safe_order_does_not(
    target: Start, tracer: Tracer
) -> None:
    # unsafe: detach at once
    proc = target("spinner", 0, 2000)
    tracer.open(proc.pid, addr(proc), 8, Access.WRITE, Mode.STOP, 1)
    k.seize(proc.pid)
    proc.go()
    tries = interrupt_until_sigtrap_pending(proc, tracer)
    print(f"pending SIGTRAP at an interrupt stop after {tries} tries")
    tracer.close()
    k.detach(proc.pid)
    assert proc.wait() == -signal.SIGTRAP

    # safe: close events, (interrupt,) swallow the pending SIGTRAP, then detach
    proc = target("spinner", 0, 2000)
    tracer.open(proc.pid, addr(proc), 8, Access.WRITE, Mode.STOP, 1)
    k.seize(proc.pid)
    proc.go()
    interrupt_until_sigtrap_pending(proc, tracer)
    tracer.close()
    while k.pending_signals(proc.pid) & SIGTRAP_BIT:
        k.cont(proc.pid)
        assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
        assert k.getsiginfo(proc.pid).code == k.TRAP_PERF
        # detach(tid, 0) at a signal-delivery-stop discards that signal
    k.detach(proc.pid)
    time.sleep(0.05)
    proc.close_stdin()
    assert proc.line().startswith("done")
    assert proc.wait() == 0


TRACER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from hwbkptd import _kernel as k
    from hwbkptd._model import Access, Mode
    pid, var, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # Seize first: a sigtrap event armed on an untraced program kills it at the next hit.
    k.seize(pid)
    ev = k.BreakpointEvent(pid, var, 8, Access.WRITE, Mode.STOP, 1)
    def stop():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for tid, status in k.wait_all():
                return k.decode_status(status)
            time.sleep(0.001)
        sys.exit("timeout")
    assert stop() == k.SignalStop(signal.SIGTRAP)
    if how == "interrupt":  # convert the SIGTRAP stop into an EVENT_STOP and hold that
        k.interrupt(pid)
        k.cont(pid, 0)
        assert stop() == k.EventStop(k.PTRACE_EVENT_STOP, signal.SIGTRAP)
    print("held", k.pending_signals(pid), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("how", ["sigtrap", "interrupt"])
def test_tracer_death_while_holding_a_stop(target: Start, how: str) -> None:
    """Tracer SIGKILLed while the tracee sits in a SIGTRAP signal-delivery-stop, or in an
    interrupt EVENT_STOP: on this kernel (6.18) the program runs on in BOTH cases - the
    SIGTRAP of the signal-delivery-stop is discarded, not delivered (the suspicion that it
    kills the program was wrong). Only a SIGTRAP still *pending* would be delivered (see
    test_detach_with_pending_perf_sigtrap_kills_safe_order_does_not)."""
    proc = target("spinner", 1000)
    proc.go()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    child = subprocess.Popen(
        [sys.executable, "-c", TRACER_SCRIPT, str(proc.pid), str(addr(proc)), how],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()  # the script exits itself after 10 s on failure
        assert line.startswith("held"), line
        assert k.tracer_of(proc.pid) == child.pid
        child.kill()
        child.wait(TIMEOUT)
    finally:
        child.kill()
        child.wait(TIMEOUT)
        if child.stdout is not None:
            child.stdout.close()
    time.sleep(0.1)
    assert k.tracer_of(proc.pid) == 0
    proc.close_stdin()
    assert proc.line().startswith("done")
    assert proc.wait() == 0


# --- raw debug registers, errors, /proc --------------------------------------------------------


def test_pokeuser_reference_behaviour(target: Start, tracer: Tracer) -> None:
    proc = target("writer", 1)
    k.seize(proc.pid)
    k.interrupt(proc.pid)
    assert tracer.stop(proc.pid) == k.EventStop(k.PTRACE_EVENT_STOP, signal.SIGTRAP)
    k.pokeuser(proc.pid, DR_OFFSET, addr(proc))
    assert k.peekuser(proc.pid, DR_OFFSET) == addr(proc)
    dr7 = 0x1 | (0b01 << 16) | (0b11 << 18)  # L0, write, 8 bytes
    k.pokeuser(proc.pid, DR_OFFSET + 7 * 8, dr7)
    assert k.peekuser(proc.pid, DR_OFFSET + 7 * 8) == dr7
    assert k.peekuser(proc.pid, DR_OFFSET + 4 * 8) == 0
    with pytest.raises(DebugRegisterIOError):
        k.pokeuser(proc.pid, DR_OFFSET + 4 * 8, 0)
    with pytest.raises(InvalidArgumentError):  # RW=10 (I/O) is refused
        k.pokeuser(proc.pid, DR_OFFSET + 7 * 8, 0x1 | (0b10 << 16))
    with pytest.raises(DebugRegisterIOError):
        k.peekuser(proc.pid, 3)  # unaligned
    k.pokeuser(proc.pid, DR_OFFSET + 7 * 8, 0)
    k.cont(proc.pid)
    proc.go()
    assert finish(proc, tracer) == 0


def test_errors_are_translated_with_cause(target: Start, tracer: Tracer) -> None:
    proc = target("writer", 1)
    with pytest.raises(NoSuchProcessError) as info:
        k.cont(proc.pid)  # not traced: ESRCH
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(NoSuchProcessError):
        k.threads_of(2**22 + 1)
    with pytest.raises(InvalidArgumentError):
        tracer.open(proc.pid, addr(proc) + 1, 8, Access.WRITE, Mode.COUNT, 0)
    with pytest.raises(InvalidArgumentError):
        tracer.open(proc.pid, 0xFFFF_8000_0000_0000, 8, Access.WRITE, Mode.COUNT, 0)
    k.seize(proc.pid)
    child = subprocess.Popen(
        [sys.executable, "-c", f"from hwbkptd import _kernel as k; k.seize({proc.pid})"],
        stderr=subprocess.PIPE,
        text=True,
    )
    _, err = child.communicate(timeout=TIMEOUT)
    assert "PermissionDeniedError" in err
    k.interrupt(proc.pid)
    assert tracer.stop(proc.pid) == k.EventStop(k.PTRACE_EVENT_STOP, signal.SIGTRAP)
    with pytest.raises(InvalidArgumentError, match="not mapped"):
        k.read_memory(proc.pid, 0x1000, 8)
    with pytest.raises(InvalidArgumentError):
        k.setregs(proc.pid, {"xyz": 1})
    k.write_memory(proc.pid, addr(proc, "addr2"), (77).to_bytes(8, "little"))
    assert k.read_memory(proc.pid, addr(proc, "addr2"), 8) == (77).to_bytes(8, "little")
    k.cont(proc.pid)
    proc.go()
    assert finish(proc, tracer) == 0
    assert PermissionDeniedError.code == "EPERM"


def test_proc_helpers(target: Start) -> None:
    proc = target("threads", 2, 1)
    assert k.threads_of(proc.pid) == [proc.pid]
    assert k.tgid_of(proc.pid) == proc.pid
    assert k.start_time(proc.pid) > 0
    assert k.start_time(proc.pid) == k.start_time(proc.pid)
    assert k.tracer_of(proc.pid) == 0
    assert k.pending_signals(proc.pid) == 0
    creds = k.proc_creds(proc.pid)
    assert (creds.ruid, creds.euid, creds.suid) == (os.getuid(), os.geteuid(), os.geteuid())
    assert creds.dumpable
    assert k.decode_status(0x80 << 16 | 0x57F) == k.EventStop(k.PTRACE_EVENT_STOP, 5)
    assert k.decode_status(0x3 << 16 | 0x57F) == k.EventStop(k.PTRACE_EVENT_CLONE, 5)
    assert k.decode_status(0x80 << 16 | 0x137F) == k.GroupStop(signal.SIGSTOP)
    assert k.decode_status(0x0100) == k.Exited(1)
    assert k.decode_status(0x0085) == k.Killed(5, True)
