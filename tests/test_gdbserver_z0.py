"""gdb's software breakpoints (``Z0``) through ``hwbkpt gdbserver`` when the slots run out.

``Z0`` takes a hardware execute slot (a uprobe stops only after the instruction on this
kernel: tests/test_uprobe_kernel.py), so a thread holds at most four breakpoints and
watchpoints of all debuggers together, gdb's own shared-library event breakpoint included.
gdb can only say "Cannot access memory" for a refused ``Z0``; the server's line on stderr
(which gdb shows) says what is the matter. After deleting breakpoints the session goes on
exactly as usual.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

from tests._daemon import Daemon
from tests._gdb import GDB, Gdb, gdb_factory, server_command, stop_lines
from tests._progs import Target, build
from tests.test_gdbserver import run_script

__all__ = ["gdb_factory"]

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.skipif(GDB is None, reason="needs gdb (make deps installs it)"),
]

# Six places in tests/progs/writer.c: write_both's three lines, store_pair, main's loop call
# of store_pair and main's last printf.
BREAKS = [
    "write_both",
    "writer.c:14",
    "writer.c:15",
    "store_pair",
    "writer.c:21",
    "writer.c:40",
]


@pytest.mark.timeout(180)
def test_fifth_breakpoint_is_refused_with_a_reason_and_the_session_goes_on(
    target: Callable[..., Target], daemon: Daemon, gdb_factory: Callable[[str, str], Gdb]
) -> None:
    proc = target("writer", 2)
    gdb = gdb_factory(str(build("writer")), server_command(daemon.socket, proc.pid))
    where = {}
    for n, place in enumerate(BREAKS, 1):
        out = gdb.cmd(f"break {place}")
        found = re.search(rf"Breakpoint {n} at (0x[0-9a-f]+)", out)
        assert found, out
        where[n] = found.group(1)
    mark = gdb.send("continue")
    proc.go()
    out = gdb.wait(mark)
    # gdb inserts them in address order and stops at the first refusal; three of its four
    # breakpoints in write_both and main went in, with its ld.so event breakpoint.
    refused = re.findall(
        r"hwbkpt gdbserver: breakpoint at (0x[0-9a-f]+) not inserted: ([^\n]*)", out
    )
    assert refused, out
    for _addr, why in refused:
        assert f"all 4 hardware slots of thread {proc.pid} are in use" in why, why
        assert "by this debugger" in why
        assert "delete a breakpoint or watchpoint" in why
    assert {a for a, _ in refused} >= {where[6]}, out
    assert "Cannot insert breakpoint 6." in out
    assert "Command aborted." in out
    for n in (4, 5, 6):
        gdb.cmd(f"delete {n}")
    served = "".join(gdb.cmd(c) for c in ["continue"] * 3 + ["delete", "continue"])
    assert "not inserted" not in served
    assert proc.wait() == 0
    # The same three breakpoints with gdb attached natively print the same stops.
    native_proc = target("writer", 2)
    native = run_script(
        gdb_factory,
        native_proc,
        f"attach {native_proc.pid}",
        [f"break {b}" for b in BREAKS[:3]] + ["GO"] + ["continue"] * 3 + ["delete", "continue"],
    )[1]
    assert native_proc.wait() == 0
    # (From the first breakpoint on: the native attach prints where the program waited.)
    native_stops = stop_lines(native)
    first = next(i for i, ln in enumerate(native_stops) if ln.startswith("Breakpoint 1,"))
    assert stop_lines(served) == native_stops[first:], f"native:\n{native}\nserver:\n{served}"
    heads = [
        re.sub(r" at /\S+$", "", line)
        for line in stop_lines(served)
        if line.startswith(("Breakpoint", "[Inferior"))
    ]
    assert heads == [
        "Breakpoint 1, write_both (i=i@entry=1)",
        "Breakpoint 2, write_both (i=i@entry=1)",
        "Breakpoint 3, write_both (i=i@entry=1)",
        "[Inferior 1 (process PID) exited normally]",
    ], served
