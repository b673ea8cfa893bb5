"""A tiny reference tracer for tests: the live kernel's PEEKUSER/POKEUSER, nothing else.

``RefTracee`` starts a child that sleeps, seizes it with ``PTRACE_SEIZE`` and stops it with
``PTRACE_INTERRUPT``, so the caller can peek and poke its ``struct user`` while it sits in a
ptrace-stop. ``close()`` (or leaving the ``with`` block) kills and reaps the child whatever
happened: SIGKILL works on a ptrace-stopped tracee, and we are both its parent and its
tracer, so one ``waitpid`` collects it. Every wait has an absolute deadline.

This module calls ``ptrace`` through ctypes directly, on purpose: it is the *reference*
the daemon's virtual debug registers are compared with, so it must not share code with
the daemon's own kernel layer.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

__all__ = [
    "DEBUGREG_OFFSET",
    "SIZEOF_KERNEL_USER",
    "RefTracee",
    "build_drtarget",
]

# offsetof(struct user, u_debugreg) on x86-64 (glibc's <sys/user.h> and the kernel agree).
DEBUGREG_OFFSET = 848
# glibc's sizeof(struct user) is 912, but the kernel's struct user (asm/user_64.h) also has
# error_code and fault_address after u_debugreg: PEEK/POKEUSER accept offsets below 928.
SIZEOF_KERNEL_USER = 928

_TESTS_DIR = Path(__file__).resolve().parent

PTRACE_PEEKUSER = 3
PTRACE_POKEUSER = 6
PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: also wait for non-leader threads

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ptrace = _libc.ptrace
_ptrace.restype = ctypes.c_long
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]

_MASK64 = (1 << 64) - 1
_PY_SLEEP = "import time\nwhile True: time.sleep(1000)"


def _to_c_pointer(value: int) -> ctypes.c_void_p:
    """An unsigned 64-bit value as the ``void *`` argument glibc's ptrace() takes."""
    return ctypes.c_void_p(value & _MASK64)


class RefTracee:
    """A sleeping child process, seized and held in a ptrace-stop.

    ``peekuser``/``pokeuser`` return the value (peek) or ``None`` (poke) and raise
    ``OSError`` with the kernel's errno on failure.
    """

    def __init__(
        self, argv: Sequence[str] | None = None, *, info_line: bool = False, timeout: float = 10.0
    ) -> None:
        """Start ``argv`` (default: a sleeping process) and hold it in a ptrace-stop.

        With ``info_line``, first read one line the program prints on stdout (``.info``).
        ``exec`` gives the child a clean thread: no debug registers inherited.
        """
        self._timeout = timeout
        if argv is None:
            sleep = shutil.which("sleep")
            argv = [sleep, "100000"] if sleep else [sys.executable, "-S", "-c", _PY_SLEEP]
        self._proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if info_line else None,
        )
        self.pid = self._proc.pid
        self._reaped = False
        self.info = ""
        try:
            if info_line:
                self.info = self._read_line()
            self._check(_ptrace(PTRACE_SEIZE, self.pid, None, None), "PTRACE_SEIZE")
            self._check(_ptrace(PTRACE_INTERRUPT, self.pid, None, None), "PTRACE_INTERRUPT")
            self._wait_for_stop()
        except BaseException:
            self.close()
            raise

    # -- raw access -------------------------------------------------------------------

    def peekuser(self, offset: int) -> int:
        """PTRACE_PEEKUSER at a ``struct user`` offset; the word as an unsigned int."""
        ctypes.set_errno(0)
        value = int(_ptrace(PTRACE_PEEKUSER, self.pid, _to_c_pointer(offset), None))
        if value == -1:
            err = ctypes.get_errno()
            if err:
                raise OSError(err, f"PTRACE_PEEKUSER {offset:#x}: {os.strerror(err)}")
        return value & _MASK64

    def pokeuser(self, offset: int, value: int) -> None:
        """PTRACE_POKEUSER of one word at a ``struct user`` offset."""
        rc = _ptrace(PTRACE_POKEUSER, self.pid, _to_c_pointer(offset), _to_c_pointer(value))
        self._check(rc, f"PTRACE_POKEUSER {offset:#x}={value & _MASK64:#x}")

    def peek_dr(self, n: int) -> int:
        return self.peekuser(DEBUGREG_OFFSET + 8 * n)

    def poke_dr(self, n: int, value: int) -> None:
        self.pokeuser(DEBUGREG_OFFSET + 8 * n, value)

    def resume(self, *, step: bool = False) -> int:
        """PTRACE_CONT (or PTRACE_SINGLESTEP) with no signal; return the next stop's signal."""
        request = PTRACE_SINGLESTEP if step else PTRACE_CONT
        self._check(_ptrace(request, self.pid, None, None), "PTRACE_CONT/SINGLESTEP")
        deadline = time.monotonic() + self._timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG | WALL)
            if pid == self.pid:
                if not os.WIFSTOPPED(status):
                    self._reaped = True
                    raise ChildProcessError(f"child {self.pid} ended: status {status:#x}")
                return int(os.WSTOPSIG(status))
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {self.pid} did not stop in {self._timeout} s")
            time.sleep(0.0002)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Kill and reap the child; safe to call twice and after any failure."""
        if self._reaped:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                pid, _status = os.waitpid(self.pid, os.WNOHANG | WALL)
            except ChildProcessError:
                break
            if pid == self.pid and (os.WIFEXITED(_status) or os.WIFSIGNALED(_status)):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {self.pid} was not reaped in {self._timeout} s")
            time.sleep(0.001)
        self._reaped = True
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        # Keep subprocess from waiting on (or warning about) a pid it no longer owns.
        self._proc.returncode = -signal.SIGKILL

    def __enter__(self) -> RefTracee:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc == -1:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def _wait_for_stop(self) -> None:
        deadline = time.monotonic() + self._timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG | WALL)
            if pid == self.pid:
                if os.WIFSTOPPED(status) and status >> 16 == PTRACE_EVENT_STOP:
                    return
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    self._reaped = True
                    raise ChildProcessError(f"child {self.pid} died before it stopped")
                raise OSError(errno.EIO, f"unexpected wait status {status:#x}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"child {self.pid} did not stop in {self._timeout} s")
            time.sleep(0.0005)

    def _read_line(self) -> str:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self._timeout
        data = b""
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.pid} printed no line in {self._timeout} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise ChildProcessError(f"child {self.pid} closed stdout: {data!r}")
                data += chunk
        return data.decode().strip()


def build_drtarget() -> Path:
    """Compile ``tests/progs/drtarget.c`` into ``tests/_build`` (cached by source hash).

    Concurrent builders are safe: each compiles to a temporary name and renames it.
    """
    source = _TESTS_DIR / "progs" / "drtarget.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    build_dir = _TESTS_DIR / "_build"
    build_dir.mkdir(exist_ok=True)
    binary = build_dir / f"drtarget-{digest}"
    if binary.exists():
        return binary
    fd, tmp = tempfile.mkstemp(prefix=".drtarget-", dir=build_dir)
    os.close(fd)
    try:
        subprocess.run(
            ["gcc", "-O1", "-Wall", "-Wextra", "-o", tmp, str(source)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, binary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return binary
