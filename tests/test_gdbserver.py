"""Real gdb through ``hwbkpt gdbserver``, compared with the same gdb attached natively.

Each comparison runs one list of gdb commands twice on two runs of the same program:
once with gdb attached by itself (``attach PID``), once through the daemon (``target remote
| hwbkpt gdbserver PID``); the stop lines gdb prints (tests/_gdb.py, ``stop_lines``) must be
identical, addresses and pids aside. Programs, daemon and gdbs are killed at teardown.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Callable

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._gdb import GDB, Gdb, gdb_factory, server_command, stop_lines
from tests._progs import Target, build
from tests.test_watch import info_int, slots_of, thread_state, tracer_pid, wait_until

__all__ = ["gdb_factory"]

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.skipif(GDB is None, reason="needs gdb (make deps installs it)"),
]

Start = Callable[..., Target]
StartGdb = Callable[[str, str], Gdb]

# Each step: a gdb command; "GO" releases the program's gate during the next command.
Script = list[str]


def run_script(
    start_gdb: StartGdb, proc: Target, connect: str, script: Script
) -> tuple[Gdb, str]:
    gdb = start_gdb(str(build(proc.name)), connect)
    go = False
    for step in script:
        if step == "GO":
            go = True
            continue
        mark = gdb.send(step)
        if go:
            proc.go()
            go = False
        gdb.wait(mark)
    return gdb, gdb.output()


def compare(
    target: Start, daemon: Daemon, start_gdb: StartGdb, script: Script, *prog: str | int
) -> tuple[str, Target]:
    """Run ``script`` natively and through the server; assert equal stop lines. Returns
    the server run's output and program."""
    native_proc = target(*prog)
    _, native = run_script(start_gdb, native_proc, f"attach {native_proc.pid}", script)
    server_proc = target(*prog)
    _, served = run_script(
        start_gdb, server_proc, server_command(daemon.socket, server_proc.pid), script
    )
    assert stop_lines(served) == stop_lines(native), f"native:\n{native}\nserver:\n{served}"
    assert stop_lines(native), native
    return served, server_proc


@pytest.mark.timeout(120)
def test_watch_continue_print_set_var_stepi_detach(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    script = [
        "watch var",
        "GO",
        "continue",
        "continue",
        "print var",
        "set var var2 = 1234",
        "print var2",
        "x/2dg &var2",
        "info registers rip",
        "stepi",
        "stepi",
        "print var2",
        "detach",
    ]
    served, proc = compare(target, daemon, gdb_factory, script, "writer", 5)
    assert "New value = 2" in served
    assert "$2 = 1234" in served
    assert "rip            0x" in served
    assert "[Inferior 1 (process" in served
    assert "detached]" in served
    # After detach the program runs on by itself, untraced, and ends normally.
    assert proc.line() == "done var=5 pair0=0"
    assert proc.wait() == 0


@pytest.mark.timeout(120)
def test_rwatch_awatch_hbreak_to_exit(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    script = [
        "hbreak write_both",
        "rwatch var2",
        "awatch var",
        "GO",
        "continue",
        "continue",
        "continue",
        "delete",
        "continue",
    ]
    served, proc = compare(target, daemon, gdb_factory, script, "writer", 3)
    assert "Breakpoint 1, write_both" in served
    assert "Hardware access (read/write) watchpoint 3: var" in served
    assert "exited normally]" in served
    assert proc.wait() == 0


@pytest.mark.timeout(120)
def test_break_tbreak_next_finish(target: Start, daemon: Daemon, gdb_factory: StartGdb) -> None:
    script = [
        "tbreak write_both",
        "break writer.c:15",
        "GO",
        "continue",
        "next",
        "continue",
        "finish",
        "next",
        "continue",
        "delete",
        "continue",
    ]
    served, proc = compare(target, daemon, gdb_factory, script, "writer", 3)
    assert proc.wait() == 0
    assert "Temporary breakpoint 1, write_both" in served
    assert "Run till exit from" in served
    assert "exited normally]" in served


@pytest.mark.timeout(120)
def test_threads_watch_info_threads_thread_n(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    script = [
        "watch slots[8]",
        "GO",
        "continue",
        "continue",
        "info threads",
        "thread 1",
        "print slots[8]",
        "delete",
        "continue",
    ]
    served, proc = compare(target, daemon, gdb_factory, script, "tbarrier", 2, 3)
    assert proc.wait() == 0
    assert "hit Hardware watchpoint 1: slots[8]" in served
    assert "New value = 2" in served
    assert "exited normally]" in served


@pytest.mark.timeout(120)
def test_kill_leaves_the_program_running(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    proc = target("writer", 3)
    gdb, _ = run_script(
        gdb_factory, proc, server_command(daemon.socket, proc.pid),
        ["watch var", "GO", "continue"],
    )
    out = gdb.cmd("kill")
    assert "killed]" in out
    # "kill" means "this debugger leaves": the program was not killed and runs to its end.
    assert proc.line() == "done var=3 pair0=0"
    assert proc.wait() == 0


# --------------------------------------------------------------- several debuggers at once


def served_gdb(gdb_factory: StartGdb, daemon: Daemon, proc: Target) -> Gdb:
    return gdb_factory(str(build(proc.name)), server_command(daemon.socket, proc.pid))


@pytest.mark.timeout(180)
def test_two_gdbs_each_see_only_their_own_stops(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    n = 4
    proc = target("writer", n)
    a = served_gdb(gdb_factory, daemon, proc)
    b = served_gdb(gdb_factory, daemon, proc)
    assert "Hardware watchpoint 1: var" in a.cmd("watch var")
    assert "Hardware watchpoint 1: var2" in b.cmd("watch var2")
    counter = hwbkpt.Client(daemon.socket, name="counter")
    counted = counter.watch(proc.pid, info_int(proc, "addr"), 8, "w", "count")
    mark_a = a.send("continue")
    mark_b = b.send("continue")
    proc.go()
    for i in range(1, n + 1):
        # The store to var stops the thread for a; var2 is stored after a lets it go.
        out_a = a.wait(mark_a)
        assert f"New value = {i}" in out_a, out_a
        assert "watchpoint 1: var\n" in out_a, out_a
        assert counted.count() == i  # the Python client counts the same stores exactly
        mark_a = a.send("continue")
        out_b = b.wait(mark_b)
        assert f"New value = {i}" in out_b, out_b
        assert "watchpoint 1: var2\n" in out_b, out_b
        # Each stop is this gdb's own: it is reported once and only to it.
        assert out_a.count("Old value") == out_b.count("Old value") == 1
        assert "SIGTRAP" not in out_a + out_b
        mark_b = b.send("continue")
    out_a, out_b = a.wait(mark_a), b.wait(mark_b)
    assert "exited normally]" in out_a, out_a
    assert "exited normally]" in out_b, out_b
    assert proc.wait() == 0
    counter.close()


@pytest.mark.timeout(180)
def test_debugger_killed_in_a_stop_releases_its_holds(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    n = 3
    proc = target("writer", n)
    a = served_gdb(gdb_factory, daemon, proc)
    b = served_gdb(gdb_factory, daemon, proc)
    a.cmd("watch var")
    b.cmd("watch var2")
    mark_a = a.send("continue")
    mark_b = b.send("continue")
    proc.go()
    assert "New value = 1" in a.wait(mark_a)
    # a is in its stop, holding every thread; it dies without a word (its gdbserver sees
    # the end of its pipe and leaves), and b's stop comes.
    os.kill(a.popen.pid, signal.SIGKILL)
    a.popen.wait(10)
    assert "New value = 1" in b.wait(mark_b)
    for i in range(2, n + 1):
        out = b.cmd("continue")
        assert f"New value = {i}" in out, out
    assert "exited normally]" in b.cmd("continue")
    assert proc.wait() == 0


@pytest.mark.timeout(60)
def test_interrupt_stops_every_thread_and_continue_releases_them(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    proc = target("threads", 2, 300_000_000)
    gdb = served_gdb(gdb_factory, daemon, proc)
    mark = gdb.send("continue")
    proc.go()
    tids = sorted(int(proc.line().split()[0].partition("=")[2]) for _ in range(2))
    # Ctrl-C: gdb sends 0x03 to its remote when it gets SIGINT.
    os.kill(gdb.popen.pid, signal.SIGINT)
    out = gdb.wait(mark)
    assert "received signal SIGINT" in out, out
    for tid in [proc.pid, *tids]:
        wait_until(lambda tid=tid: thread_state(proc.pid, tid) == "t", what=f"{tid} held")
    assert gdb.cmd("info threads").count("Thread ") == 3
    peek = hwbkpt.Client(daemon.socket, name="peek")
    var = info_int(proc, "addr")
    held = peek.read_memory(proc.pid, var, 8)
    # continue releases the holds: the workers store to var again.
    mark = gdb.send("continue")
    wait_until(lambda: peek.read_memory(proc.pid, var, 8) != held, what="the threads to run")
    os.kill(gdb.popen.pid, signal.SIGINT)
    assert "received signal SIGINT" in gdb.wait(mark)
    gdb.cmd("detach")
    wait_until(lambda: tracer_pid(proc.pid) == 0, what="the daemon to let the program go")
    peek.close()


@pytest.mark.timeout(180)
def test_slot_beyond_four_fails_at_continue_and_goes_in_once_one_is_deleted(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    # Slots wanted while both gdbs run: gdb's own shared-library event breakpoint in ld.so
    # (one key, shared by both gdbs), a's var and var2, b's pair[0] and pair[1]: five.
    proc = target("writer", 1)
    a = served_gdb(gdb_factory, daemon, proc)
    b = served_gdb(gdb_factory, daemon, proc)
    a.cmd("watch var")
    a.cmd("watch var2")
    b.cmd("watch pair[0]")
    b.cmd("watch pair[1]")
    mark_a = a.send("continue")  # inserted; the program still waits for b's hold
    peek = hwbkpt.Client(daemon.socket, name="peek")
    wait_until(lambda: len(slots_of(peek, proc.pid, proc.pid)[0]) == 3, what="a's 3 slots")
    out_b = b.cmd("continue")
    assert "Could not insert hardware watchpoint 2." in out_b, out_b
    assert "You may have requested too many hardware breakpoints/watchpoints." in out_b
    # a is interrupted, deletes one and goes on; now b's watchpoints go in.
    os.kill(a.popen.pid, signal.SIGINT)
    assert "SIGINT" in a.wait(mark_a)
    a.cmd("delete 2")
    mark_a = a.send("continue")
    mark_b = b.send("continue")
    proc.go()
    out_a = a.wait(mark_a)
    assert "Hardware watchpoint 1: var" in out_a, out_a
    assert "New value = 1" in out_a
    mark_a = a.send("continue")
    out_b = b.wait(mark_b)
    assert "exited normally]" in out_b, out_b
    assert "Could not insert" not in out_b
    assert "exited normally]" in a.wait(mark_a)
    assert proc.wait() == 0
    peek.close()


@pytest.mark.timeout(120)
def test_simultaneous_hits_of_two_threads_are_each_reported_once(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    # Both workers leave their barrier together and store to their own slot at once: a
    # stop that comes while another is being reported waits for the next continue.
    n = 3
    proc = target("tbarrier", 2, n)
    gdb = served_gdb(gdb_factory, daemon, proc)
    gdb.cmd("watch slots[0]")
    gdb.cmd("watch slots[8]")
    mark = gdb.send("continue")
    proc.go()
    out = gdb.wait(mark)
    for _ in range(2 * n):
        out += gdb.cmd("continue")
    seen: dict[str, list[int]] = {"slots[0]": [], "slots[8]": []}
    for name, value in re.findall(
        r"Hardware watchpoint \d: (slots\[\d\])\n\nOld value = \d+\nNew value = (\d+)", out
    ):
        seen[name].append(int(value))
    assert seen == {"slots[0]": [1, 2, 3], "slots[8]": [1, 2, 3]}, out
    assert "exited normally]" in out
    assert proc.wait() == 0
