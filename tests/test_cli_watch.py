"""``hwbkpt watch`` as a user runs it: a subprocess against the real daemon and a real program.

tests/progs/writer.c stores the loop index to ``var`` in ``write_both``; in ``gate2`` mode it
waits on a second gate before exiting, so the watch outlives the writes and prints a count.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.timeout(60),
]

Start = Callable[..., Target]
WRITES = 5
DURATION = 4.0  # seconds the watch command runs; the writes take well under one
DEADLINE = 20.0  # absolute limit for any one hwbkpt subprocess


def _start_watch(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, "watch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"hwbkpt watch still running after {DEADLINE} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _wait_for_slot(daemon: Daemon, pid: int, timeout: float = 10.0) -> None:
    """Until the daemon reports an installed slot on ``pid`` (the watch command is ready)."""
    deadline = time.monotonic() + timeout
    with hwbkpt.Client(socket=daemon.socket, name="test-observer", timeout=timeout) as c:
        while time.monotonic() < deadline:
            for t in c.status().get("targets") or []:
                if t.get("pid") == pid and any(th.get("slots") for th in t.get("threads", [])):
                    return
            time.sleep(0.02)
    pytest.fail(f"no slot installed on {pid} within {timeout} s")


def _run_writer(daemon: Daemon, target: Start, *extra: str) -> tuple[Target, int, str, str]:
    writer = target("writer", WRITES, "gate2")
    proc = _start_watch(
        daemon, str(writer.pid), "var", "--mode", "stop", "--duration", str(DURATION), *extra
    )
    try:
        _wait_for_slot(daemon, writer.pid)
        writer.go()
        assert writer.line().startswith(f"done var={WRITES}")
    finally:
        rc, out, err = _finish(proc)
    return writer, rc, out, err


def test_watch_stop_mode_symbolized_old_new_and_count(daemon: Daemon, target: Start) -> None:
    writer, rc, out, err = _run_writer(daemon, target)
    assert rc == 0, err
    assert err == ""
    lines = out.splitlines()
    stops = [line for line in lines if " stop " in line]
    assert len(stops) == WRITES, out
    binary = Path(writer.popen.args[0]).name  # type: ignore[index]
    for i, line in enumerate(stops, start=1):
        assert f"tid {writer.pid} stop var at " in line, line
        assert re.search(rf"at write_both\+0x[0-9a-f]+ \({re.escape(binary)}\)", line), line
        assert line.endswith(f"old={i - 1:#x} new={i:#x}"), line
    assert lines[-1] == f"count: {WRITES}", out


def test_watch_json_lines(daemon: Daemon, target: Start) -> None:
    writer, rc, out, err = _run_writer(daemon, target, "--json")
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    stops = [r for r in records if r["event"] == "stop"]
    assert [(r["old"], r["new"]) for r in stops] == [(i - 1, i) for i in range(1, WRITES + 1)]
    for r in stops:
        assert r["tid"] == writer.pid
        assert r["where"].startswith("write_both+0x")
        assert r["symbol"] == "var"
        assert r["addr"] == writer.info["addr"]  # addresses are JSON numbers
        assert isinstance(r["ip"], int)
    assert records[-1]["event"] == "summary"
    assert records[-1]["count"] == WRITES


def test_watch_missing_symbol_one_line_exit_1(daemon: Daemon, target: Start) -> None:
    writer = target("writer", 1)
    proc = _start_watch(daemon, str(writer.pid), "no_such_symbol_here", "--duration", "1")
    rc, out, err = _finish(proc)
    assert rc == 1
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("hwbkpt: ")
    assert "no_such_symbol_here" in err
    assert "Traceback" not in err


def test_watch_without_daemon_exit_2(tmp_path: Path, target: Start) -> None:
    writer = target("writer", 1)
    proc = subprocess.run(
        [sys.executable, "-m", "hwbkpt._cli", "--socket", str(tmp_path / "none.sock"),
         "watch", str(writer.pid), "var", "--duration", "1"],
        capture_output=True, text=True, timeout=DEADLINE, check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_watch_if_stops_only_when_true_with_kernel_values(daemon: Daemon, target: Start) -> None:
    """``--if`` defaults to stop mode; old/new come from the hit, not from a later read."""
    writer = target("writer", 40, "gate2")
    proc = _start_watch(
        daemon, str(writer.pid), "var", "--if", "new & 7 == 0", "--duration", str(DURATION)
    )
    try:
        _wait_for_slot(daemon, writer.pid)
        writer.go()
        assert writer.line().startswith("done var=40")
    finally:
        rc, out, err = _finish(proc)
    assert rc == 0, err
    lines = out.splitlines()
    stops = [line for line in lines if " stop " in line]
    assert [line.rsplit(" ", 2)[1:] for line in stops] == [
        [f"old={v - 1:#x}", f"new={v:#x}"] for v in (8, 16, 24, 32, 40)
    ], out
    assert lines[-1] == "count: 5", out


def test_watch_if_bad_condition_one_line_exit_1(daemon: Daemon, target: Start) -> None:
    writer = target("writer", 1)
    proc = _start_watch(daemon, str(writer.pid), "var", "--if", "new ==", "--duration", "1")
    rc, out, err = _finish(proc)
    assert rc == 1, err
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert "column 7" in err
    assert "Traceback" not in err


def test_watch_if_notify_lines_show_values_from_the_hit(daemon: Daemon, target: Start) -> None:
    writer = target("writer", 40, "gate2")
    proc = _start_watch(
        daemon, str(writer.pid), "var", "--mode", "notify", "--if", "new & 7 == 0",
        "--duration", str(DURATION),
    )  # fmt: skip
    try:
        _wait_for_slot(daemon, writer.pid)
        writer.go()
        assert writer.line().startswith("done var=40")
    finally:
        rc, out, err = _finish(proc)
    assert rc == 0, err
    hits = [line for line in out.splitlines() if " hit " in line]
    assert [line.rsplit(" ", 2)[1:] for line in hits] == [
        [f"old={v - 1:#x}", f"new={v:#x}"] for v in (8, 16, 24, 32, 40)
    ], out
