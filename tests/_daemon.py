"""The ``daemon`` fixture: a real ``hwbkptd`` subprocess on a private socket.

``daemon`` starts one daemon per test; ``daemon_factory`` starts as many as a test asks for
(extra command-line arguments allowed). Each waits, at most ``START_TIMEOUT`` seconds, until
the socket answers. At teardown every daemon started is stopped (SIGTERM, then SIGKILL) and
the part of its debug log that explains a failure is printed (:func:`log_excerpt`: the last
lines plus every warning, error and traceback), which pytest shows when the test failed.

``close_leftover_clients`` (autouse) closes the clients a test left open and then collects
garbage, so that a socket a test leaked is reported at *that* test's teardown, not as a
``ResourceWarning`` failing whichever unrelated test happens to run the garbage collector.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "Daemon",
    "close_leftover_clients",
    "daemon",
    "daemon_factory",
    "log_excerpt",
    "start_daemon",
    "wait_for_socket",
]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
#: Lines of a daemon's log shown from its end when a test fails.
TAIL_LINES = 60
#: At most this many warning/error/traceback lines from before the tail.
MAX_NOTABLE_LINES = 200
# A log line that is worth showing wherever it is (hwbkptd's format: "hwbkptd[PID] LEVEL …").
_NOTABLE = ("WARNING", "ERROR", "CRITICAL", "Traceback")


def log_excerpt(text: str, tail: int = TAIL_LINES) -> str:
    """What of a daemon's debug log explains a failure: every warning, error and traceback
    (whole, with the lines that follow it up to the next log line) from before the last
    ``tail`` lines, then those lines. A fuzz run logs ~170,000 lines; nobody reads them."""
    lines = text.splitlines()
    head, last = lines[:-tail] if len(lines) > tail else [], lines[-tail:]
    notable: list[str] = []
    in_traceback = False
    for number, line in enumerate(head, 1):
        if line.startswith("hwbkptd["):
            in_traceback = False
        if "Traceback" in line:
            in_traceback = True
        if in_traceback or any(word in line for word in _NOTABLE):
            notable.append(f"{number}: {line}")
    parts = [f"({len(lines)} lines in all)"]
    if notable:
        shown = notable[:MAX_NOTABLE_LINES]
        more = len(notable) - len(shown)
        parts.append(f"warnings, errors and tracebacks before the last {len(last)} lines:")
        parts.extend(shown)
        if more:
            parts.append(f"... and {more} more such lines")
    if head:
        parts.append(f"the last {len(last)} lines:")
    parts.extend(last)
    return "\n".join(parts)


def wait_for_socket(path: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> bool:
    """Poll until something accepts connections on ``path``; False if ``proc`` exits first
    or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(path)
            return True
        except OSError:
            time.sleep(0.02)
        finally:
            s.close()
    return False


class Daemon:
    """A running ``python -m hwbkptd._main``; ``.socket``, ``.proc``, ``.pid``, ``.stop()``."""

    def __init__(self, socket_path: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.socket = socket_path
        self.proc = proc
        self.pid = proc.pid
        self.log_path = log_path

    def stderr(self) -> str:
        """Everything the daemon logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout`` seconds, return the exit status (SIGKILL and
        raise ``TimeoutError`` if it does not exit)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"hwbkptd did not exit within {timeout} s of SIGTERM") from None

    def kill(self) -> None:
        """SIGKILL and reap (no-op if it already exited)."""
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(STOP_TIMEOUT)

    def __repr__(self) -> str:
        return f"<Daemon pid {self.pid} on {self.socket}>"


def start_daemon(socket_path: str, *args: str, log_path: Path, wait: bool = True) -> Daemon:
    """Start a daemon on ``socket_path`` and (with ``wait``) wait until it answers.

    Raises ``RuntimeError`` with the daemon's log if it exits or does not answer in time.
    """
    cmd = [
        sys.executable,
        "-m",
        "hwbkptd._main",
        "--socket",
        socket_path,
        "--log-level",
        "debug",
        *args,
    ]
    with open(log_path, "ab") as log:
        # A file, not a pipe: a busy debug log must never block the daemon on a full pipe.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    daemon = Daemon(socket_path, proc, log_path)
    if wait and not wait_for_socket(socket_path, START_TIMEOUT, proc):
        daemon.kill()
        raise RuntimeError(
            f"hwbkptd did not answer on {socket_path} within {START_TIMEOUT} s "
            f"(exit status {proc.returncode}); its log:\n{log_excerpt(daemon.stderr())}"
        )
    return daemon


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """``start(*args, socket=None, wait=True) -> Daemon``; all are stopped at teardown."""
    # Not pytest's tmp_path: a Unix socket path must fit in 108 bytes.
    tmpdir = Path(tempfile.mkdtemp(prefix="hwbkptd-test-"))
    started: list[Daemon] = []
    counter = 0

    def start(*args: str, socket: str | None = None, wait: bool = True) -> Daemon:
        nonlocal counter
        counter += 1
        path = socket or str(tmpdir / "s.sock")
        d = start_daemon(path, *args, log_path=tmpdir / f"daemon{counter}.log", wait=wait)
        started.append(d)
        return d

    start.tmpdir = tmpdir  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for d in started:
            if d.alive():
                with contextlib.suppress(TimeoutError):
                    d.stop(STOP_TIMEOUT)
            d.kill()
            print(f"----- {d!r} exit status {d.proc.returncode}; log:\n{log_excerpt(d.stderr())}")
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """One running daemon on a private socket (``.socket``, ``.proc``, ``.pid``, ``.stop()``)."""
    return daemon_factory()


@pytest.fixture(autouse=True)
def close_leftover_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every ``hwbkpt.Client`` a test opened and did not close (a failed assertion
    skips its ``close()``), so that its socket is not garbage-collected — with a
    ResourceWarning, an error under ``filterwarnings = error`` — during a later test.

    Then free what a failed test still holds and collect garbage: any other socket or file
    the test leaked is finalized now, and pytest reports its ResourceWarning at this test's
    teardown, where it belongs. Two things keep a leak alive past its test: a reference
    cycle (freed only by the collector, at an unpredictable later time), and the locals of
    a *failed* test, which pytest keeps reachable from ``sys.last_traceback`` until the next
    failure replaces it — that is how one failure in test_faults once made test_proto fail.
    """
    import hwbkpt

    opened: list[hwbkpt.Client] = []
    real_init = hwbkpt.Client.__init__

    def tracking_init(self: hwbkpt.Client, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)  # only a client that connected has a socket to close

    monkeypatch.setattr(hwbkpt.Client, "__init__", tracking_init)
    try:
        yield
    finally:
        for client in opened:
            client.close()
        opened.clear()
        # pytest keeps a failed test's exception for post-mortem debugging (--pdb, which has
        # run by now) and deletes it itself when the next test's call starts
        # (_pytest/runner.py, pytest_runtest_call): delete it now instead.
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
        gc.collect()
