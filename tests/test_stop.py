"""Stops against the real daemon: one instruction with two owners, holds, whose SIGTRAP,
job control, single steps. Helpers come from tests/test_watch.py."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest

import hwbkpt
from hwbkptd._platform import int1_faults
from tests._progs import Target
from tests.test_watch import (
    QUIET,
    TIMEOUT,
    Conn,
    connect_fixture,  # noqa: F401  (the `connect` fixture)
    info_int,
    proc_state,
    slots_of,
    wait_until,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]
Connect = Callable[[str], Conn]


def read_long(conn: Conn, pid: int, addr: int) -> int:
    return int.from_bytes(conn.read_memory(pid, addr, 8), "little", signed=True)


def stays_stopped(tid: int, seconds: float = QUIET) -> None:
    """The thread is in a (tracing) stop for all of ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = proc_state(tid)
        assert state == "t", f"thread {tid} is {state!r}, not stopped"
        time.sleep(0.01)


# ------------------------------------------------------------ 4. one instruction, two owners


@pytest.mark.timeout(90)
def test_one_store_two_owners_one_stop_each(target: Start, connect: Connect) -> None:
    n = 30
    proc = target("writer", n, "pair")
    pair = info_int(proc, "pair")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, pair, mode="stop")
    wb = b.watch(proc.pid, pair + 8, mode="stop")
    assert len(slots_of(a, proc.pid, proc.pid)[0]) == 2
    proc.go()
    for i in range(1, n + 1):
        ea = a.expect("stop")
        eb = b.expect("stop")
        assert ea.watches == [wa.id]
        assert eb.watches == [wb.id]
        assert ea.tid == eb.tid == proc.pid
        assert ea.regs["rip"] == eb.regs["rip"]
        assert read_long(a, proc.pid, pair) == i
        assert read_long(a, proc.pid, pair + 8) == i
        # The order of the two resumes alternates; the thread waits for the second one.
        first, second = (a, b) if i % 2 else (b, a)
        first.resume(proc.pid)
        stays_stopped(proc.pid, 0.05 if i > 3 else QUIET)
        first.none_of("stop", 0.0 if i > 3 else 0.05)
        assert read_long(a, proc.pid, pair) == i
        # Both events' counters advanced at every store (the program exits after the last).
        assert wa.count() == i
        assert wb.count() == i
        second.resume(proc.pid)
    assert proc.line() == f"done var=0 pair0={n}"
    a.none_of("stop")
    b.none_of("stop", 0.05)
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_one_store_two_watches_of_one_client(target: Start, connect: Connect) -> None:
    """Both words watched by one client: one stop naming both watches."""
    n = 10
    proc = target("writer", n, "pair")
    pair = info_int(proc, "pair")
    a = connect("a")
    w0 = a.watch(proc.pid, pair, mode="stop")
    w1 = a.watch(proc.pid, pair + 8, mode="stop")
    proc.go()
    for i in range(1, n + 1):
        ev = a.expect("stop")
        assert sorted(ev.watches) == sorted([w0.id, w1.id])
        assert w0.count() == i
        assert w1.count() == i
        a.resume(proc.pid)
    assert proc.line() == f"done var=0 pair0={n}"
    a.none_of("stop", 0.05)
    assert proc.wait(TIMEOUT) == 0


# --------------------------------------------------------------------------- 5. stop holds


@pytest.mark.timeout(60)
def test_stop_held_until_every_owner_resumes(target: Start, connect: Connect) -> None:
    proc = target("writer", 3)
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, addr, mode="stop")
    proc.go()
    # Stop 1: A resumes, the thread stays stopped until B resumes too.
    assert a.expect("stop").watches == [wa.id]
    assert b.expect("stop").watches == [wb.id]
    a.resume(proc.pid)
    stays_stopped(proc.pid)
    a.none_of("stop", 0.0)
    assert read_long(a, proc.pid, addr) == 1
    b.resume(proc.pid)
    # Stop 2: A disconnects instead of resuming; its hold goes with it.
    a.expect("stop")
    b.expect("stop")
    assert read_long(b, proc.pid, addr) == 2
    b.resume(proc.pid)
    stays_stopped(proc.pid)
    a.close()
    # Stop 3 is B's alone now; B's resume alone lets the program finish.
    ev = b.expect("stop")
    assert ev.watches == [wb.id]
    assert read_long(b, proc.pid, addr) == 3
    b.resume(proc.pid)
    assert proc.line() == "done var=3 pair0=0"
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_disconnect_releases_hold_other_resume_continues(target: Start, connect: Connect) -> None:
    """A disconnects while B still holds; B's resume alone continues the thread."""
    proc = target("writer", 2)
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    a.watch(proc.pid, addr, mode="stop")
    b.watch(proc.pid, addr, mode="stop")
    proc.go()
    a.expect("stop")
    b.expect("stop")
    a.close()
    stays_stopped(proc.pid)
    b.resume(proc.pid)
    b.expect("stop")
    assert read_long(b, proc.pid, addr) == 2
    b.resume(proc.pid)
    assert proc.line() == "done var=2 pair0=0"
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_resume_without_hold_is_busy(target: Start, connect: Connect) -> None:
    proc = target("writer", 1)
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    a.watch(proc.pid, addr, mode="stop")
    b.watch(proc.pid, addr, mode="count")
    proc.go()
    a.expect("stop")
    with pytest.raises(hwbkpt.BusyError):
        b.resume(proc.pid)
    stays_stopped(proc.pid)
    a.resume(proc.pid)
    assert proc.line() == "done var=1 pair0=0"
    assert proc.wait(TIMEOUT) == 0


# --------------------------------------------------------------------------- 6. whose SIGTRAP


@pytest.mark.timeout(90)
def test_programs_own_sigtraps_reach_it(target: Start, connect: Connect) -> None:
    """int3, int1 and raise() reach the program's handler beside a stop watch. Whether int1
    traps or faults here, the daemon measured it as this test's probe does, so it does not
    take the program's int1 for a hit whose DR6 came back empty."""
    k = 50
    proc = target("sigtrap", k)
    addr = info_int(proc, "addr")
    c = connect("stopper")
    assert c.status()["platform"]["int1"] == ("fault" if int1_faults() else "trap")
    w = c.watch(proc.pid, addr, mode="stop")
    proc.go()
    for _ in range(3 * k):
        ev = c.expect("stop")
        assert ev.watches == [w.id]
        assert ev.reason == "watch"
        c.resume(proc.pid)
    assert proc.line() == f"done handled={3 * k}"  # int3, int1 (TRAP_BRKPT) and raise()
    c.none_of("lost", 0.01)
    c.none_of("stop", 0.05)
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_kill_trap_reaches_program(target: Start, connect: Connect) -> None:
    """A SIGTRAP sent with kill() is not the daemon's: a program without a handler dies."""
    proc = target("spinner", 1000)
    c = connect("counter")
    w = c.watch(proc.pid, info_int(proc, "addr"), mode="count")
    proc.go()
    wait_until(lambda: w.count() > 10, what="the spinner to write")
    os.kill(proc.pid, signal.SIGTRAP)
    assert proc.wait(TIMEOUT) == -signal.SIGTRAP


def parent_sees(proc: Target, flag: int) -> int | None:
    """One ``waitpid(pid, flag | WNOHANG)`` as the program's real parent (a shell's view).

    Returns the status of a stop (``WUNTRACED``) or continue (``WCONTINUED``) report, None
    if there is none. An exit is recorded on ``proc`` and fails the test.
    """
    pid, status = os.waitpid(proc.pid, flag | os.WNOHANG)
    if not pid:
        return None
    if os.WIFEXITED(status) or os.WIFSIGNALED(status):
        proc.popen.returncode = os.waitstatus_to_exitcode(status)
        pytest.fail(f"the program ended ({proc.popen.returncode}) instead of stopping")
    return status


@pytest.mark.timeout(60)
def test_job_control_as_without_daemon(target: Start, connect: Connect) -> None:
    """kill -STOP / kill -CONT: the parent (a shell) sees the stop and the continue as
    without the daemon, the program does not run while stopped and runs on after CONT.

    /proc shows a traced program in group-stop as 't' (tracing stop), not 'T': the kernel
    parks a traced thread's group-stop in TASK_TRACED (kernel/signal.c do_signal_stop ->
    do_jobctl_trap), with or without PTRACE_LISTEN; measured on this kernel with a bare
    tracer as well. So the state letter may be either; what a shell sees is checked exactly.
    """
    proc = target("spinner", 1000)
    c = connect("counter")
    w = c.watch(proc.pid, info_int(proc, "addr"), mode="count")
    proc.go()
    wait_until(lambda: w.count() > 10, what="the spinner to write")
    for _round in range(2):  # twice: job control still works after the first round
        os.kill(proc.pid, signal.SIGSTOP)
        status = wait_until(
            lambda: parent_sees(proc, os.WUNTRACED), what="the parent to see a stop"
        )
        assert os.WIFSTOPPED(status)
        assert os.WSTOPSIG(status) == signal.SIGSTOP
        assert proc_state(proc.pid) in ("T", "t")
        time.sleep(0.05)
        frozen = w.count()
        deadline = time.monotonic() + QUIET
        while time.monotonic() < deadline:
            assert proc_state(proc.pid) in ("T", "t")
            time.sleep(0.01)
        assert w.count() == frozen, "the program ran while stopped"
        os.kill(proc.pid, signal.SIGCONT)
        status = wait_until(
            lambda: parent_sees(proc, os.WCONTINUED), what="the parent to see a continue"
        )
        assert os.WIFCONTINUED(status)
        wait_until(lambda f=frozen: w.count() > f + 10, what="the program to run on after SIGCONT")
        assert proc_state(proc.pid) in ("R", "S")
    c.none_of("stop", 0.05)
    proc.go()  # another line stops the spinner
    assert proc.line().startswith("done var=")
    assert proc.wait(TIMEOUT) == 0


# --------------------------------------------------------------------------- 10. step


@pytest.mark.timeout(60)
def test_step_goes_to_requester_only(target: Start, connect: Connect) -> None:
    proc = target("writer", 3)
    addr, addr2 = info_int(proc, "addr"), info_int(proc, "addr2")
    a, b = connect("stepper"), connect("other")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, addr, mode="stop")
    proc.go()
    ea = a.expect("stop")
    eb = b.expect("stop")
    assert ea.watches == [wa.id]
    assert eb.watches == [wb.id]
    rip = ea.regs["rip"]
    assert a.get_regs(proc.pid)["rip"] == rip
    # var was stored, var2 not yet: the next instruction stores var2.
    assert read_long(a, proc.pid, addr) == 1
    assert read_long(a, proc.pid, addr2) == 0
    a.step(proc.pid)
    stays_stopped(proc.pid, 0.1)  # B still holds it
    b.resume(proc.pid)
    step = a.expect("stop", reason="step")
    assert step.tid == proc.pid
    assert step.watches == []
    assert rip < step.regs["rip"] <= rip + 15  # exactly one instruction on
    assert read_long(a, proc.pid, addr2) == 1
    assert a.get_regs(proc.pid)["rip"] == step.regs["rip"]
    b.none_of("stop")  # B neither gets the step stop nor holds the thread
    with pytest.raises(hwbkpt.BusyError):
        b.get_regs(proc.pid)
    a.resume(proc.pid)
    # The next iteration stops for both again.
    ea = a.expect("stop", reason="watch")
    eb = b.expect("stop", reason="watch")
    assert read_long(a, proc.pid, addr) == 2
    a.resume(proc.pid)
    b.resume(proc.pid)
    a.expect("stop", reason="watch")
    b.expect("stop", reason="watch")
    a.resume(proc.pid)
    b.resume(proc.pid)
    assert proc.line() == "done var=3 pair0=0"
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_step_onto_another_clients_hit(target: Start, connect: Connect) -> None:
    """A steps from its stop on var; the stepped instruction stores var2, which B watches:
    one trap, reported to A as its step and to B as its watch hit."""
    proc = target("writer", 2)
    addr, addr2 = info_int(proc, "addr"), info_int(proc, "addr2")
    a, b = connect("stepper"), connect("var2")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, addr2, mode="stop")
    proc.go()
    ea = a.expect("stop", reason="watch")
    assert ea.watches == [wa.id]
    a.step(proc.pid)
    step = a.expect("stop")
    hit = b.expect("stop")
    assert step.reason == "step"
    assert step.watches == []
    assert hit.reason == "watch"
    assert hit.watches == [wb.id]
    assert step.regs["rip"] == hit.regs["rip"] > ea.regs["rip"]
    assert read_long(b, proc.pid, addr2) == 1
    a.resume(proc.pid)
    stays_stopped(proc.pid, 0.1)
    b.resume(proc.pid)
    # Second iteration: A's var stop, then B's var2 stop; no step any more.
    assert a.expect("stop").reason == "watch"
    a.resume(proc.pid)
    assert b.expect("stop").reason == "watch"
    b.resume(proc.pid)
    assert proc.line() == "done var=2 pair0=0"
    a.none_of("stop", 0.05)
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_sigstop_while_held_then_resume(target: Start, connect: Connect) -> None:
    """kill -STOP while a client holds a stop: resuming it enters the job-control stop, and
    kill -CONT lets it run on; the parent sees both, as without the daemon."""
    proc = target("writer", 3)
    addr = info_int(proc, "addr")
    c = connect("a")
    w = c.watch(proc.pid, addr, mode="stop")
    proc.go()
    c.expect("stop")
    os.kill(proc.pid, signal.SIGSTOP)
    stays_stopped(proc.pid, 0.1)
    c.resume(proc.pid)
    status = wait_until(lambda: parent_sees(proc, os.WUNTRACED), what="the parent to see a stop")
    assert os.WIFSTOPPED(status)
    assert os.WSTOPSIG(status) == signal.SIGSTOP
    time.sleep(QUIET)
    assert w.count() == 1, "the program ran while stopped"
    c.none_of("stop", 0.0)
    os.kill(proc.pid, signal.SIGCONT)
    for i in (2, 3):
        ev = c.expect("stop")
        assert ev.watches == [w.id]
        assert read_long(c, proc.pid, addr) == i
        c.resume(proc.pid)
    assert proc.line() == "done var=3 pair0=0"
    assert proc.wait(TIMEOUT) == 0
