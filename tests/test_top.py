"""``hwbkpt top``: frames from fake statuses, ``--once`` and the curses view in tmux."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import hwbkpt
from hwbkpt._top import Frames
from tests._daemon import Daemon
from tests._progs import Target

pytestmark = pytest.mark.timeout(60)

Start = Callable[..., Target]
DEADLINE = 20.0  # absolute limit for any one hwbkpt subprocess
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf")


# --------------------------------------------------------------------- frames (no I/O)


def _status(hits: int | None, *, uptime: float = 5.0) -> dict[str, object]:
    slot: dict[str, object] = {"addr": 0x4010, "length": 8, "access": "w", "mode": "count",
                               "watches": [1, 2], "clients": [3, 4]}
    if hits is not None:
        slot["hits"] = hits
    return {
        "pid": 99, "version": "0.1.0", "uptime": uptime,
        "counters": {"hits_notified": 10 if hits is None else hits, "errors": 0},
        "clients": [
            {"id": 3, "pid": 40, "uid": 1000, "gid": 1000, "name": "gdb", "watches": 1},
            {"id": 4, "pid": 41, "uid": 0, "gid": 0, "name": "perf", "watches": 2},
        ],
        "targets": [{"pid": 812, "watches": 3, "threads": [
            {"tid": 812, "state": "running", "slots": [slot], "pending": [5], "holders": []},
        ]}],
    }


def test_frame_shows_slots_holders_pending_clients() -> None:
    text = "\n".join(Frames().frame(_status(None), 100.0))
    assert "hwbkptd 0.1.0  pid 99  up 5s  2 clients  1 target" in text
    assert "pid 812" in text
    assert "3 watches" in text
    assert "tid 812  running" in text
    slot0 = next(line for line in text.splitlines() if "0x4010/8 w" in line)
    assert slot0.split()[:5] == ["0", "0x4010/8", "w", "-", "count"]  # "-": no namer
    assert "#3 gdb, #4 perf" in slot0
    assert "(watches 1,2)" in slot0
    assert slot0.split()[5] == "-"  # no per-slot hit counter in this status: no rate
    for n in (1, 2, 3):
        assert f"      {n:<5}-" in text.splitlines()
    assert "pending: watch 5" in text
    assert "hits_notified 10" in text
    assert "errors" not in text  # zero counters are hidden
    clients = text.split("CLIENTS (2)")[1].splitlines()
    assert clients[2].split() == ["3", "40", "1000", "gdb", "1"]
    assert clients[3].split() == ["4", "41", "0", "perf", "2"]


def test_frame_hits_per_second_from_slot_hits() -> None:
    frames = Frames()
    first = frames.frame(_status(1000), 10.0)
    assert next(line for line in first if "0x4010/8" in line).split()[5] == "..."
    second = frames.frame(_status(1500), 10.5)
    assert next(line for line in second if "0x4010/8" in line).split()[5] == "1000"
    assert any("hits_notified 1500 (+1000/s)" in line for line in second)
    # a slot that was reopened (counter went back) has no rate for one frame
    third = frames.frame(_status(3), 11.0)
    assert next(line for line in third if "0x4010/8" in line).split()[5] == "..."


def test_frame_names_slots_with_the_namer() -> None:
    asked: list[tuple[int, int, bool]] = []

    def namer(pid: int, addr: int, code: bool) -> str | None:
        asked.append((pid, addr, code))
        return "counter+0x8"

    text = "\n".join(Frames(namer=namer).frame(_status(None), 1.0))
    slot0 = next(line for line in text.splitlines() if "0x4010/8 w" in line)
    assert slot0.split()[:5] == ["0", "0x4010/8", "w", "counter+0x8", "count"]
    assert asked == [(812, 0x4010, False)]


def test_frame_fits_the_counters_to_the_width() -> None:
    status = _status(None)
    status["counters"] = {f"counter_number_{n}": 1000 + n for n in range(12)}
    lines = Frames().frame(status, 1.0, width=60)
    counter_lines = lines[1 : lines.index("")]
    assert len(counter_lines) > 1
    assert all(len(line) <= 60 for line in counter_lines)
    assert counter_lines[0].startswith("counters: ")
    text = " ".join(counter_lines)
    assert all(f"counter_number_{n} {1000 + n}" in text for n in range(12))
    # without a width they stay on one line
    assert Frames().frame(status, 1.0)[2] == ""


def test_frame_without_targets() -> None:
    text = "\n".join(Frames().frame({"pid": 1, "clients": [], "targets": []}, 0.0))
    assert "TARGETS (0)" in text
    assert "no process is being watched" in text


# --------------------------------------------------------------------- against the daemon


def _hwbkpt(*args: str, columns: int | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "hwbkpt._cli", *args],
        capture_output=True, text=True, timeout=DEADLINE, check=False, env=env,
    )


@pytest.fixture
def watched(daemon: Daemon, target: Start) -> Iterator[tuple[Target, list[hwbkpt.Client]]]:
    """A running spinner with five watches: one slot shared by two clients, three more of
    the first client (the thread's four slots are full), and one pending."""
    spinner = target("spinner", 1000)
    addr = spinner.info["addr"]
    assert isinstance(addr, int)
    clients = [hwbkpt.Client(socket=daemon.socket, name=n, timeout=10.0)
               for n in ("top-alice", "top-bob")]
    try:
        alice, bob = clients
        alice.watch(spinner.pid, addr, 8, "w", "count")
        bob.watch(spinner.pid, addr, 8, "w", "count")
        for k in (1, 2, 3):
            alice.watch(spinner.pid, addr + 8 * k, 8, "rw", "count")
        assert bob.watch(spinner.pid, addr + 32, 8, "w", "count").state == "pending"
        spinner.go()
        yield spinner, clients
    finally:
        for c in clients:
            c.close()


@needs_root
@pytest.mark.kernel
def test_top_once_shows_slot_table(daemon: Daemon, watched: tuple[Target, list[hwbkpt.Client]]
                                   ) -> None:
    spinner, (alice, bob) = watched
    a_id, b_id = (c.server_info["client_id"] for c in (alice, bob))
    proc = _hwbkpt("--socket", daemon.socket, "top", "--once", columns=50)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    counters = lines[1 : lines.index("")]
    assert counters[0].startswith("counters: ")
    assert all(len(line) <= 50 for line in counters), counters
    addr = spinner.info["addr"]
    assert isinstance(addr, int)
    assert f"pid {spinner.pid}" in out
    assert f"tid {spinner.pid}" in out
    shared = next(line for line in out.splitlines() if f"{addr:#x}/8 w " in line)
    assert f"#{a_id} top-alice, #{b_id} top-bob" in shared
    assert shared.split()[3] == "var"  # the spinner's variable, by its ELF symbol
    assert " count " in shared
    for k in (1, 2, 3):
        line = next(line for line in out.splitlines() if f"{addr + 8 * k:#x}/8 rw" in line)
        assert f"#{a_id} top-alice" in line
    assert "pending: watch" in out
    clients = out.split("CLIENTS (")[1]
    assert any(line.split()[:1] == [str(a_id)] and "top-alice" in line and line.split()[-1] == "4"
               for line in clients.splitlines()), clients


def _tmux(server: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tmux", "-L", server, *args], capture_output=True, text=True,
                          timeout=10, check=False)


def _wait_pane(server: str, pred: Callable[[str], bool], timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = _tmux(server, "capture-pane", "-p", "-t", "top").stdout
        if pred(screen):
            return screen
        time.sleep(0.1)
    pytest.fail(f"tmux pane not as expected within {timeout} s; it shows:\n{screen}")


@needs_root
@pytest.mark.kernel
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_top_in_tmux_shows_slots_and_quits_on_q(
    daemon: Daemon, watched: tuple[Target, list[hwbkpt.Client]]
) -> None:
    spinner, _ = watched
    addr = spinner.info["addr"]
    assert isinstance(addr, int)
    # A private tmux server (-L), so the test neither sees nor disturbs anyone else's.
    server = f"hwbkpt-test-{os.getpid()}"
    workdir = Path(tempfile.mkdtemp(prefix="hwbkpt-top-"))
    rc_file = workdir / "rc"
    command = (
        f"{sys.executable} -m hwbkpt._cli --socket {daemon.socket} top --interval 0.2; "
        f"echo $? > {rc_file}; echo top-exited; sleep 60"
    )
    try:
        started = _tmux(server, "new-session", "-d", "-s", "top", "-x", "120", "-y", "40",
                        "sh", "-c", command)
        assert started.returncode == 0, started.stderr
        # A whole frame: the pane may be captured while curses is still drawing one.
        screen = _wait_pane(
            server, lambda s: f"{addr:#x}/8 w" in s and "CLIENTS" in s and "q quit" in s
        )
        assert "pending: watch" in screen
        # resize: the frame is redrawn for the new size, still running
        _tmux(server, "resize-window", "-t", "top", "-x", "70", "-y", "15")
        _wait_pane(server, lambda s: len(s.splitlines()[0]) <= 70 and "q quit" in s)
        _tmux(server, "send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 10
        while not rc_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rc_file.read_text().strip() == "0"
        # The terminal is restored: curses left the alternate screen, the table is gone.
        screen = _wait_pane(server, lambda s: "top-exited" in s)
        assert "CLIENTS" not in screen
    finally:
        _tmux(server, "kill-server")
        shutil.rmtree(workdir, ignore_errors=True)


def test_top_without_daemon_exit_2(tmp_path: Path) -> None:
    proc = _hwbkpt("--socket", str(tmp_path / "none.sock"), "top", "--once")
    assert proc.returncode == 2
    assert len(proc.stderr.splitlines()) == 1
