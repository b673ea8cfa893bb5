"""The ``daemon`` fixture: a real ``hwbkptd`` subprocess on a private socket.

``daemon`` starts one daemon per test; ``daemon_factory`` starts as many as a test asks for
(extra command-line arguments allowed). Each waits, at most ``START_TIMEOUT`` seconds, until
the socket answers. At teardown every daemon started is stopped (SIGTERM, then SIGKILL) and
its stderr (the debug log) is printed, which pytest shows when the test failed.
"""

from __future__ import annotations

import contextlib
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
    "start_daemon",
    "wait_for_socket",
]

START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


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
            f"(exit status {proc.returncode}); its log:\n{daemon.stderr()}"
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
            print(f"----- {d!r} exit status {d.proc.returncode}; log:\n{d.stderr()}")
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture
def daemon(daemon_factory: Callable[..., Daemon]) -> Daemon:
    """One running daemon on a private socket (``.socket``, ``.proc``, ``.pid``, ``.stop()``)."""
    return daemon_factory()


@pytest.fixture(autouse=True)
def close_leftover_clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Close every ``hwbkpt.Client`` a test opened and did not close (a failed assertion
    skips its ``close()``), so that its socket is not garbage-collected — with a
    ResourceWarning, an error under ``filterwarnings = error`` — during a later test."""
    import hwbkpt

    opened: list[hwbkpt.Client] = []
    real_init = hwbkpt.Client.__init__

    def tracking_init(self: hwbkpt.Client, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        opened.append(self)  # only a client that connected has a socket to close

    monkeypatch.setattr(hwbkpt.Client, "__init__", tracking_init)
    yield
    for client in opened:
        client.close()
