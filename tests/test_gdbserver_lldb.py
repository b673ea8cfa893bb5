"""lldb through ``hwbkpt gdbserver --listen``, alone and beside two gdbs and a Python client.

The debuggers run whole scripts in batch mode, all at once: each holds the program at its
own stops, so their stops come in program order whatever the scheduling, and each script
simply continues from one of its own stops to the next. The program's gate opens once the
daemon shows every debugger's breakpoints inserted.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable, Iterator

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._gdb import GDB, LLDB, Batch, batch_factory, server_command
from tests._progs import Target, build
from tests.test_gdbserver_live import gdbserver, listening_on
from tests.test_watch import info_int

__all__ = ["batch_factory"]

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.skipif(GDB is None, reason="needs gdb (make deps installs it)"),
    pytest.mark.skipif(LLDB is None, reason="needs lldb-19 (make deps installs it)"),
]

Start = Callable[..., Target]
StartBatch = Callable[..., Batch]


@contextlib.contextmanager
def lldb_port(daemon: Daemon, pid: int) -> Iterator[str]:
    """A ``hwbkpt gdbserver --listen`` for one lldb; yields ``gdb-remote``'s argument."""
    with gdbserver(daemon, pid, "--listen", "127.0.0.1:0") as server:
        yield listening_on(server)
        assert server.wait(30) == 0


def wait_running_with(client: hwbkpt.Client, pid: int, keys: dict[tuple[int, str], int]) -> None:
    """Wait until the main thread carries at least ``n`` watches on each ``(addr, access)``
    of ``keys``: each debugger has attached, inserted its breakpoints (gdb and lldb insert
    them only when they resume, and remove them at each stop) and continued. Counting
    watches, not keys, keeps a key another client already watches from passing early."""

    def carried() -> dict[tuple[int, str], int]:
        for t in client.status()["targets"]:
            if t["pid"] == pid:
                for th in t["threads"]:
                    if th["tid"] == pid:
                        return {(s["addr"], s["access"]): len(s["watches"]) for s in th["slots"]}
        return {}

    def missing(now: dict[tuple[int, str], int]) -> list[tuple[str, str, int]]:
        return sorted((hex(a), k, n) for (a, k), n in keys.items() if now.get((a, k), 0) < n)

    # Three debuggers and their servers start in parallel (gdb, lldb and a Python server
    # each): seconds on a busy machine, so this waits longer than the usual TIMEOUT.
    deadline = time.monotonic() + 60
    while missing(now := carried()):
        if time.monotonic() > deadline:
            held = sorted((hex(a), k, n) for (a, k), n in now.items())
            pytest.fail(
                f"the debuggers did not insert (addr, access, watches) {missing(now)} within "
                f"60 s; the thread's slots hold {held}"
            )
        time.sleep(0.01)


@pytest.mark.timeout(120)
def test_lldb_watchpoint_breakpoint_registers_memory_detach(
    target: Start, daemon: Daemon, batch_factory: StartBatch
) -> None:
    proc = target("writer", 3)
    with lldb_port(daemon, proc.pid) as where:
        lldb = batch_factory("lldb", str(build("writer")), f"gdb-remote {where}", [
            "watchpoint set variable var", "continue", "continue", "register read rip",
            "print var", "watchpoint delete 1", "breakpoint set -n write_both", "continue",
            "detach",
        ])
        with hwbkpt.Client(daemon.socket, name="peek") as peek:
            wait_running_with(peek, proc.pid, {(info_int(proc, "addr"), "w"): 1})
        proc.go()
        out = lldb.output()
    assert "stop reason = watchpoint 1" in out, out
    assert re.search(r"old value: 1\nnew value: 2", out), out
    assert re.search(r"rip = 0x[0-9a-f]+ .*write_both", out), out
    assert "(volatile long) 2" in out
    assert "stop reason = breakpoint 1.1" in out, out
    assert "write_both(i=3)" in out
    assert "detached" in out
    assert proc.line() == "done var=3 pair0=0"
    assert proc.wait() == 0


@pytest.mark.timeout(180)
def test_two_gdbs_one_lldb_and_a_counter_each_see_their_own_stops(
    target: Start, daemon: Daemon, batch_factory: StartBatch
) -> None:
    n = 3
    proc = target("writer", n)
    program = str(build("writer"))
    counter = hwbkpt.Client(daemon.socket, name="counter")
    counter.watch(proc.pid, info_int(proc, "addr"), 8, "w", "notify")
    with lldb_port(daemon, proc.pid) as where:
        lldb = batch_factory("lldb", program, f"gdb-remote {where}",
                             ["breakpoint set -n write_both"] + ["continue"] * (n + 1))
        server = server_command(daemon.socket, proc.pid)
        a = batch_factory("gdb", program, server, ["watch var"] + ["continue"] * (n + 1))
        b = batch_factory("gdb", program, server, ["watch var2"] + ["continue"] * (n + 1))
        # The counter's own watch shares var's slot: gdb a's makes it two.
        wait_running_with(counter, proc.pid, {
            (info_int(proc, "addr"), "w"): 2, (info_int(proc, "addr2"), "w"): 1,
            (info_int(proc, "func"), "x"): 1})
        proc.go()
        out_lldb, out_a, out_b = lldb.output(), a.output(), b.output()
    assert proc.wait() == 0
    stops = re.findall(r"stop reason = (.*)\n.*write_both\(i=(\d)\)", out_lldb)
    assert stops == [("breakpoint 1.1", str(i)) for i in range(1, n + 1)], out_lldb
    assert "exited with status = 0" in out_lldb, out_lldb
    for out, name in ((out_a, "var"), (out_b, "var2")):
        hits = re.findall(rf"Hardware watchpoint 1: {name}\n\nOld value = (\d+)\nNew value = (\d+)",
                          out)
        assert hits == [(str(i - 1), str(i)) for i in range(1, n + 1)], out
        assert "SIGTRAP" not in out
        assert "exited normally]" in out, out
    events = []
    while (event := counter.next_event(timeout=5)) is not None and event.kind != "exit":
        events.append(event)
    assert [e.kind for e in events] == ["hit"] * n
    counter.close()
