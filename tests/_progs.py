"""Target programs for the tests: build ``tests/progs/NAME.c`` and run it under a fixture.

Every program prints one info line (``key=0xHEX key=N ...``), then waits on a *gate* (one line
on stdin) before it does its work, so a test can attach and install watches first. The
``target`` fixture starts programs with pipes, parses that line, and at teardown SIGKILLs and
reaps every program it started, even when the test failed. It detaches nothing: a traced
process still dies of SIGKILL, and the tracer (the daemon, or the test itself) notices.

Programs are killed through a pidfd taken right after spawn, so a pid that was already reaped
(e.g. by a test that traced the program and drained ``waitpid(-1, __WALL)`` itself) and then
reused can never be hit by mistake.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

__all__ = ["PROGS_DIR", "Target", "build", "target"]

PROGS_DIR = Path(__file__).resolve().parent / "progs"
BUILD_DIR = Path(__file__).resolve().parent / "_build"
CFLAGS = ("-O1", "-g", "-pthread", "-Wall", "-Wextra")
LINE_TIMEOUT = 10.0
_WALL = 0x40000000  # __WALL: also reap a child that is being ptraced (wait(2))


def build(name: str) -> Path:
    """Compile ``tests/progs/NAME.c`` (PIE, ``-O1 -g -pthread``) and return the binary's path.

    The binary is cached under ``tests/_build`` by a hash of the sources, headers and flags.
    Safe when several pytest processes build at once: each compiles to its own temporary
    name and ``os.replace``-s it into place (an atomic rename).
    """
    source = PROGS_DIR / f"{name}.c"
    if not source.is_file():
        raise FileNotFoundError(f"no target program {source}")
    digest = hashlib.sha256()
    digest.update(" ".join(CFLAGS).encode())
    for path in [source, *sorted(PROGS_DIR.glob("*.h"))]:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    BUILD_DIR.mkdir(exist_ok=True)
    binary = BUILD_DIR / f"{name}-{digest.hexdigest()[:16]}"
    if binary.exists():
        return binary
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=BUILD_DIR)
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", *CFLAGS, "-o", tmp, str(source)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        os.replace(tmp, binary)
    except subprocess.CalledProcessError as err:
        raise RuntimeError(f"compiling {source} failed:\n{err.stderr}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return binary


def parse_info(line: str) -> dict[str, int | str]:
    """``"addr=0x55d0 n=3 x=abc"`` → ``{"addr": 0x55d0, "n": 3, "x": "abc"}``."""
    info: dict[str, int | str] = {}
    for word in line.split():
        key, sep, value = word.partition("=")
        if not sep:
            continue
        try:
            info[key] = int(value, 0)
        except ValueError:
            info[key] = value
    return info


def _resume_if_ours(tid: int) -> None:
    """PTRACE_CONT a stopped thread this process traces (errors ignored: it may be gone)."""
    from hwbkptd import _kernel  # only kernel tests trace from the test process

    with contextlib.suppress(Exception):
        _kernel.cont(tid)


class Target:
    """One running target program (see the module docstring)."""

    def __init__(self, name: str, args: tuple[str, ...]) -> None:
        self.name = name
        self.popen = subprocess.Popen(
            [str(build(name)), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            bufsize=0,
        )
        self.pid = self.popen.pid
        self.pidfd: int | None = os.pidfd_open(self.pid)
        self._buf = b""
        self.first_line = ""
        self.info: dict[str, int | str] = {}

    def read_info(self) -> None:
        """Read and parse the program's first line (its info line)."""
        self.first_line = self.line()
        self.info = parse_info(self.first_line)

    def line(self, timeout: float = LINE_TIMEOUT) -> str:
        """Read one line of the program's stdout; fail the test after ``timeout`` seconds."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{self.name} [{self.pid}]: no output line within {timeout} s")
            ready, _, _ = select.select([self.popen.stdout], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.popen.stdout.fileno(), 4096)
            if not chunk:
                pytest.fail(f"{self.name} [{self.pid}]: stdout closed (got {self._buf!r})")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    def go(self) -> None:
        """Release the program's gate (write one newline to its stdin)."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"\n")
        self.popen.stdin.flush()

    def close_stdin(self) -> None:
        """EOF on the program's stdin (stops ``spinner``; makes a waiting gate exit 3)."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def wait(self, timeout: float = LINE_TIMEOUT) -> int:
        """Wait for the program to end; return its exit code (``-SIG`` if killed).

        Polls ``waitpid(pid, WNOHANG | __WALL)`` with an absolute deadline and skips stop
        reports (a program traced by this very process reports its ptrace stops here too).
        Fails the test on timeout.
        """
        if self.popen.returncode is not None:
            return self.popen.returncode
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG | _WALL)
            except ChildProcessError:
                pytest.fail(f"{self.name} [{self.pid}] was reaped by someone else")
            if pid and not os.WIFSTOPPED(status):
                self.popen.returncode = os.waitstatus_to_exitcode(status)
                return self.popen.returncode
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name} [{self.pid}] still running after {timeout} s")
            time.sleep(0.002)

    def kill(self) -> None:
        """SIGKILL the program (through its pidfd) and reap it; never fails.

        If this very process traces the program (kernel tests do), each thread that was
        killed stops once more at PTRACE_EVENT_EXIT (PTRACE_O_TRACEEXIT reports even a
        SIGKILL) and stays there until its tracer resumes it, so stops are resumed here.
        """
        if self.pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        deadline = time.monotonic() + LINE_TIMEOUT
        while self.popen.returncode is None and time.monotonic() < deadline:
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
            except OSError:
                tids = []
            for tid in [*sorted(set(tids) - {self.pid}), self.pid]:
                try:
                    pid, status = os.waitpid(tid, os.WNOHANG | _WALL)
                except ChildProcessError:
                    if tid == self.pid:
                        self.popen.returncode = -signal.SIGKILL  # reaped elsewhere already
                    continue
                if pid and os.WIFSTOPPED(status):
                    _resume_if_ours(tid)
                elif pid and tid == self.pid:
                    self.popen.returncode = os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def __repr__(self) -> str:
        return f"<Target {self.name} pid={self.pid} info={self.info}>"


@pytest.fixture
def target() -> Iterator[Callable[..., Target]]:
    """Factory: ``proc = target("writer", "10")`` starts a program and reads its info line."""
    started: list[Target] = []

    def start(name: str, *args: str | int) -> Target:
        proc = Target(name, tuple(str(a) for a in args))
        started.append(proc)
        proc.read_info()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            try:
                proc.kill()
            except OSError as err:  # pragma: no cover - teardown must go on
                if err.errno != errno.ESRCH:
                    raise
