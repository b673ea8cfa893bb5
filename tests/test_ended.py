"""The final count after the program ended (issue 10, point 3): the daemon keeps a watch
whose process exited — state ``ended``, its final count and exit status — until the client
removes it or disconnects. Real programs, the blocking and the trio client, and the CLI.

exec and the exit tests with several clients are in tests/test_lifecycle.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
import trio

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import TIMEOUT, info_int

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.timeout(60),
]

Start = Callable[..., Target]
N = 2000
EXITED = {"reason": "exit", "code": 0, "signal": None}


def test_final_count_after_exit_without_reading_events(daemon: Daemon, target: Start) -> None:
    proc = target("writer", N)
    addr = info_int(proc, "addr")
    with hwbkpt.Client(socket=daemon.socket, name="late", timeout=TIMEOUT) as c:
        counted = c.watch(proc.pid, addr, mode="count")
        notified = c.watch(proc.pid, addr, mode="notify")
        proc.go()
        # The program has ended and the daemon has reaped it (its parent can only reap it
        # after its tracer did); the client has read nothing yet.
        assert proc.wait(TIMEOUT) == 0
        assert counted.count() == N  # the `exit` event arrived before this answer ...
        assert counted.state == notified.state == "ended"  # ... and updated the watches
        assert counted.ended == notified.ended == EXITED
        assert notified.count() == N
        described = {w["id"]: w for w in c.watches()}
        assert described[counted.id]["state"] == "ended"
        assert described[counted.id]["ended"] == EXITED
        assert described[counted.id]["count"] == N
        assert c.status()["targets"] == []  # nothing stays traced for an ended watch
        shown = subprocess.run(
            [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, "status"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT * 2,
        ).stdout
        assert "ended watches (2)" in shown, shown
        [line] = [ln for ln in shown.splitlines() if f"watch {counted.id} " in ln]
        assert f"pid {proc.pid}" in line
        assert line.endswith(f"count {N}  process exited (status 0)"), line
        assert "watches 2 (2 ended)" in shown, shown
        counted.remove()
        with pytest.raises(hwbkpt.NotFoundError):
            counted.count()
        assert [w["id"] for w in c.watches()] == [notified.id]


def test_final_count_of_a_killed_program(daemon: Daemon, target: Start) -> None:
    proc = target("writer", N, "gate2")
    with hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c:
        w = c.watch(proc.pid, info_int(proc, "addr"), mode="count")
        proc.go()
        assert proc.line() == f"done var={N} pair0=0"
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(TIMEOUT) == -signal.SIGTERM
        assert w.count() == N
        assert w.ended == {"reason": "exit", "code": None, "signal": signal.SIGTERM}


async def test_trio_client_final_count_after_exit(daemon: Daemon, target: Start) -> None:
    proc = target("writer", N)
    with trio.fail_after(TIMEOUT * 2):
        async with hwbkpt.AsyncClient(daemon.socket, name="trio-late") as c:
            w = await c.watch(proc.pid, info_int(proc, "addr"), mode="count")
            proc.go()
            while (ev := await c.next_event()).kind != "exit":
                pass
            assert (ev.pid, ev.code, ev.signal) == (proc.pid, 0, None)
            assert w.state == "ended"
            assert w.ended == EXITED
            assert await w.count() == N
            [info] = await c.watches()
            assert (info["state"], info["count"], info["ended"]) == ("ended", N, EXITED)
            await w.remove()
            assert await c.watches() == []
    assert proc.wait(TIMEOUT) == 0


def _watch_cli(daemon: Daemon, pid: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, "watch", str(pid),
         "var", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def _slot_installed(daemon: Daemon, pid: int) -> None:
    """Until the daemon reports an installed slot on ``pid`` (the CLI's watch is set)."""
    deadline = time.monotonic() + TIMEOUT
    with hwbkpt.Client(socket=daemon.socket, name="observer", timeout=TIMEOUT) as c:
        while time.monotonic() < deadline:
            for t in c.status()["targets"]:
                if t["pid"] == pid and any(th["slots"] for th in t["threads"]):
                    return
            time.sleep(0.02)
    pytest.fail(f"no slot installed on {pid} within {TIMEOUT} s")


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_watch_prints_the_final_count_when_the_program_exits(
    daemon: Daemon, target: Start, as_json: bool
) -> None:
    proc = target("writer", N)
    cli = _watch_cli(daemon, proc.pid, "--mode", "count", *(["--json"] if as_json else []))
    try:
        _slot_installed(daemon, proc.pid)
        proc.go()
        out, err = cli.communicate(timeout=TIMEOUT * 2)  # ends by itself at the exit
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.communicate()
    assert cli.returncode == 0, err
    assert proc.wait(TIMEOUT) == 0
    if as_json:
        records = [json.loads(line) for line in out.splitlines()]
        assert records[-2]["event"] == "exit"
        assert (records[-2]["pid"], records[-2]["code"], records[-2]["signal"]) == (
            proc.pid,
            0,
            None,
        )
        assert records[-1]["event"] == "summary"
        assert records[-1]["count"] == N
    else:
        lines = out.splitlines()
        assert lines[-2].endswith(f"process {proc.pid} exited with status 0"), out
        assert lines[-1] == f"count: {N}", out


def test_thread_scope_watch_ends_with_its_thread(daemon: Daemon, target: Start) -> None:
    proc = target("tgate", 1, N)
    proc.go()
    tid = int(proc.line().split()[0].split("=")[1])  # "tid=N idx=0"
    assert proc.line() == "ready"
    with hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c:
        w = c.watch(proc.pid, info_int(proc, "slots"), mode="count", tid=tid)
        assert w.state == "installed"
        proc.go()
        assert proc.line() == f"done var={N}"  # the worker has exited; the process waits
        deadline = time.monotonic() + TIMEOUT
        while w.state != "ended":
            assert time.monotonic() < deadline, f"watch still {w.state} after its thread exited"
            c.next_event(timeout=0.1)
        assert w.ended == {"reason": "thread-exit", "code": None, "signal": None}
        [info] = c.watches()
        assert info["ended"] == {"reason": "thread-exit", "code": 0, "signal": None}
        assert w.count() == N
        # Nothing else wanted the process: the daemon let it go.
        deadline = time.monotonic() + TIMEOUT
        while c.status()["targets"]:
            assert time.monotonic() < deadline, "the process stayed traced"
            time.sleep(0.02)
    proc.go()
    assert proc.wait(TIMEOUT) == 0
