"""What a new user stumbles on (issue 14), through ``hwbkpt`` as a user runs it.

Regions are one watch to their user (one line per access, counts per piece, a note that the
request takes several slots); ``--len 0`` is refused; an unmapped address gets gdb's warning
and is watched anyway; usage mistakes exit 2; help texts; ``hwbkpt dr`` says what its
virtual registers are and shows the thread's physical slots; exits name their signal.

tests/progs/oddstore.c has an 8-byte variable ``odd`` at an address 1 mod 8 (four slots:
1 + 2 + 4 + 1 bytes) and stores to it N times, 1 ms apart, after its gate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import hwbkpt
from hwbkpt import _watchcmd
from hwbkpt._events import Event
from tests._daemon import Daemon
from tests._progs import Target

pytestmark = pytest.mark.timeout(90)

Start = Callable[..., Target]
DEADLINE = 30.0  # absolute limit for any one hwbkpt subprocess
DURATION = 4.0  # seconds a watch command runs; the program's stores take well under one
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf")


def _hwbkpt(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hwbkpt._cli", *args],
        capture_output=True, text=True, timeout=DEADLINE, check=False,
    )


def _start(daemon: Daemon, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"hwbkpt still running after {DEADLINE} s:\n{out}\n{err}")
    return proc.returncode, out, err


def _wait_for_slots(daemon: Daemon, pid: int, n: int, timeout: float = 10.0) -> None:
    """Until ``pid``'s thread has ``n`` installed slots (the watch command is ready)."""
    deadline = time.monotonic() + timeout
    with hwbkpt.Client(socket=daemon.socket, name="test-observer", timeout=timeout) as c:
        while time.monotonic() < deadline:
            for t in c.status()["targets"]:
                if t["pid"] == pid and sum(len(th["slots"]) for th in t["threads"]) >= n:
                    return
            time.sleep(0.02)
    pytest.fail(f"{n} slots not installed on {pid} within {timeout} s")


def _watch_odd(daemon: Daemon, target: Start, n: int, *extra: str) -> tuple[int, str, str]:
    """``hwbkpt watch PID ODD ...`` while oddstore makes ``n`` 8-byte stores to ``odd``."""
    prog = target("oddstore", n)
    addr = prog.info["odd"]
    assert isinstance(addr, int)
    assert addr % 8 == 1
    proc = _start(
        daemon, "watch", str(prog.pid), hex(addr), "--duration", str(DURATION), *extra
    )
    try:
        _wait_for_slots(daemon, prog.pid, 4)
        prog.go()
        assert prog.line() == "done"
    finally:
        rc, out, err = _finish(proc)
    prog.go()
    return rc, out, err


# -- regions ----------------------------------------------------------------------------------


@needs_root
@pytest.mark.kernel
def test_region_notify_one_line_per_access_counts_per_piece(
    daemon: Daemon, target: Start
) -> None:
    n = 100
    rc, out, err = _watch_odd(daemon, target, n, "--json")
    assert rc == 0, err
    # The CLI says that the request takes several slots, and how it was split.
    assert "take 4 slots (1 + 2 + 4 + 1 bytes" in err
    records = [json.loads(line) for line in out.splitlines()]
    hits = [r for r in records if r["event"] == "hit"]
    assert len(hits) == n, [len(r["watches"]) for r in hits]
    assert all(len(r["watches"]) == 4 for r in hits)  # one store touched all four pieces
    walls = [r["wall"] for r in hits]  # when each store happened, from its sample time
    assert walls == sorted(walls)
    summary = records[-1]
    assert summary["event"] == "summary"
    assert summary["count"] is None  # never summed: 4 x 100 would count each store 4 times
    assert [p["length"] for p in summary["pieces"]] == [1, 2, 4, 1]
    assert [p["count"] for p in summary["pieces"]] == [n] * 4


@needs_root
@pytest.mark.kernel
def test_region_stop_one_line_per_access_with_values(daemon: Daemon, target: Start) -> None:
    n = 20
    rc, out, err = _watch_odd(daemon, target, n, "--mode", "stop")
    assert rc == 0, err
    lines = out.splitlines()
    stops = [line for line in lines if " stop " in line]
    assert len(stops) == n, out
    for i, line in enumerate(stops, start=1):
        assert re.search(r" stop 0x[0-9a-f]+ at main\+0x[0-9a-f]+ \(oddstore-", line), line
        assert line.endswith(f"old={i - 1:#x} new={i:#x}"), line
    assert lines[-1].startswith("count per piece: ")
    assert lines[-1].count(f" {n}") == 4, lines[-1]


@needs_root
@pytest.mark.kernel
def test_len_0_is_einval(daemon: Daemon, target: Start) -> None:
    prog = target("oddstore", 1)
    proc = _hwbkpt("--socket", daemon.socket, "watch", str(prog.pid), hex(int(prog.info["odd"])),
                   "--len", "0")
    assert proc.returncode == 1
    assert proc.stderr.startswith("hwbkpt: EINVAL: --len 0")
    assert len(proc.stderr.splitlines()) == 1
    with hwbkpt.Client(socket=daemon.socket) as c:
        assert c.status()["targets"] == []  # nothing was watched


@needs_root
@pytest.mark.kernel
@pytest.mark.parametrize(("where", "shown"), [("0x0", "0x0"), ("12345", "0x3039")])
def test_unmapped_address_warns_as_gdb_and_watches(
    daemon: Daemon, target: Start, where: str, shown: str
) -> None:
    prog = target("oddstore", 1)
    proc = _start(daemon, "watch", str(prog.pid), where, "--mode", "count", "--duration", "1")
    try:
        _wait_for_slots(daemon, prog.pid, 1)  # it is watched anyway
    finally:
        rc, out, err = _finish(proc)
    assert rc == 0, err
    assert f"hwbkpt: warning: Cannot access memory at address {shown}" in err
    if where == "0x0":
        assert out.splitlines()[-1] == "count: 0"
    else:  # 8 bytes at 1 mod 8: four pieces, each counted on its own
        assert "take 4 slots" in err
        assert out.splitlines()[-1].startswith("count per piece: 0x3039/1 0, ")


@needs_root
@pytest.mark.kernel
def test_exit_line_names_the_signal(daemon: Daemon, target: Start) -> None:
    prog = target("spinner", 1000)
    proc = _start(daemon, "watch", str(prog.pid), "var", "--mode", "count")
    try:
        _wait_for_slots(daemon, prog.pid, 1)
        prog.go()
        os.kill(prog.pid, signal.SIGTERM)
    finally:
        rc, out, err = _finish(proc)  # the watch ends with the process
    assert rc == 0, err
    assert f"process {prog.pid} was killed by SIGTERM" in out


# -- usage, help ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dr", "1", "0"), "writes come in pairs"),
        (("dr", "1", "9", "1"), "there is no debug register 9"),
        (("dr", "1", "0", "zero"), "N and VALUE are numbers"),
        (("top", "--interval", "0"), "--interval must be positive"),
    ],
)
def test_usage_mistakes_exit_2(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    # Checked before anything is sent: the same answer with or without a daemon.
    proc = _hwbkpt("--socket", str(tmp_path / "none.sock"), *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("usage: hwbkpt ")
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_documents_priority_and_timeout_default() -> None:
    top = _hwbkpt("--help")
    assert top.returncode == 0
    assert "--timeout SECONDS" in top.stdout
    assert "(default 30)" in " ".join(top.stdout.split())
    watch = " ".join(_hwbkpt("watch", "--help").stdout.split())
    assert "the higher priority wins" in watch
    assert "(default 0)" in watch


# -- hwbkpt dr --------------------------------------------------------------------------------


def test_dr_on_the_daemon_says_why_for_a_read(daemon: Daemon) -> None:
    proc = _hwbkpt("--socket", daemon.socket, "dr", str(daemon.pid))
    assert proc.returncode == 1
    assert "hwbkptd itself" in proc.stderr
    assert "set watches" not in proc.stderr  # a read is not setting a watch
    assert len(proc.stderr.splitlines()) == 1


@needs_root
@pytest.mark.kernel
def test_dr_says_registers_are_per_connection_and_shows_physical_slots(
    daemon: Daemon, target: Start
) -> None:
    prog = target("spinner", 1000)
    addr = prog.info["addr"]
    assert isinstance(addr, int)
    with hwbkpt.Client(socket=daemon.socket, name="dr-owner") as owner:
        watch = owner.watch(prog.pid, addr, 8, "w", "count")
        proc = _hwbkpt("--socket", daemon.socket, "dr", str(prog.pid))
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        # The program waits on its gate: a read of stdin, named from python-ptrace's table.
        assert out.splitlines()[0].startswith(f"thread {prog.pid} (spinner-")
        assert out.splitlines()[0].endswith(", in system call read")
        assert "DR7 = 0x0000000000000000" in out  # this new connection wrote nothing
        assert "each `hwbkpt dr` is a new" in " ".join(out.split())
        assert f"physical slots of thread {prog.pid} (every client's): 1 of 4 in use" in out
        slot = next(line for line in out.splitlines() if f"{addr:#x}/8 w" in line)
        assert f"watches {watch.id}" in slot
        assert f"#{owner.server_info['client_id']} dr-owner" in slot


# -- hwbkpt watch --mode stop: the first old value ----------------------------------------------


class _FakeWatch:
    def __init__(self, addr: int, length: int) -> None:
        self.id, self.state, self.addr, self.length = 1, "installed", addr, length

    def count(self) -> int:
        return 1

    def remove(self) -> None:
        self.state = "removed"


class _InstallRacingClient:
    """A daemon stand-in whose program writes 7 while the watch is being installed, then
    8 at the one stop: the first ``old=`` must be 7, the value once the watch is in.
    With ``caught``, the write of 7 itself lands after the installation and stops."""

    def __init__(self, caught: bool = False) -> None:
        self.value = 5
        self.caught = caught
        self.events: list[Event] = []

    def watch(self, pid: int, addr: int, length: int, *args: object) -> _FakeWatch:
        self.value = 7
        self.events.append(Event("stop", {"pid": pid, "tid": pid, "watches": [1],
                                          "reason": "watch", "regs": {"rip": 0}}))
        return _FakeWatch(addr, length)

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        return self.value.to_bytes(size, "little")

    def next_event(self, timeout: float | None = None) -> Event | None:
        if not self.events:
            return None
        if not self.caught:
            self.value = 8  # the store that stopped the thread
        return self.events.pop(0)

    def resume(self, tid: int) -> None:
        pass


@pytest.mark.parametrize(("caught", "old_new"), [(False, (7, 8)), (True, (5, 7))])
def test_stop_mode_first_old_value_is_the_one_when_installed(
    capsys: pytest.CaptureFixture[str], caught: bool, old_new: tuple[int, int]
) -> None:
    args = argparse.Namespace(
        pid=os.getpid(), target="0x1000", length=8, access=None, mode="stop", tid=None,
        priority=0, duration=0.2, json=True, condition=None,
    )
    assert _watchcmd.run(_InstallRacingClient(caught), args) == 0  # type: ignore[arg-type]
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    (stop,) = [r for r in records if r["event"] == "stop"]
    assert (stop["old"], stop["new"]) == old_new
    assert (stop["addr"], stop["length"]) == (0x1000, 8)  # addresses are JSON numbers


@needs_root
@pytest.mark.kernel
def test_status_json_addresses_are_numbers(daemon: Daemon, target: Start) -> None:
    prog = target("spinner", 1000)
    addr = prog.info["addr"]
    assert isinstance(addr, int)
    with hwbkpt.Client(socket=daemon.socket) as c:
        c.watch(prog.pid, addr, 8, "w", "count")
        proc = _hwbkpt("--socket", daemon.socket, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    (t,) = json.loads(proc.stdout)["targets"]
    (slot,) = t["threads"][0]["slots"]
    assert slot["addr"] == addr  # a JSON number, as in `hwbkpt watch --json`
