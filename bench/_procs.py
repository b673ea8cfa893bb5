"""Processes the harness starts: build the C references, spawn, talk by lines, clean up.

Every process goes through :func:`spawn`, which registers it; :func:`cleanup_all` (run
from the harness's ``finally``, on SIGTERM and at exit) kills whatever is still alive.
Children also get ``PR_SET_PDEATHSIG(SIGKILL)`` so that even a SIGKILLed harness leaves
nothing behind, and their own session so that a Ctrl-C in the terminal reaches only the
harness, which then tears them down in order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REF_DIR = HERE / "ref"
BUILD_DIR = HERE / "_build"
CFLAGS = ["-O2", "-Wall", "-Wextra", "-pthread"]

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)
_live: list[Proc] = []


class BenchError(Exception):
    """A benchmark step failed (a process died, said something unexpected, timed out)."""


def build(name: str) -> Path:
    """Compile bench/ref/<name>.c into bench/_build/<name> unless the binary is newer.

    Raises BenchError with the compiler's output when gcc fails.
    """
    src = REF_DIR / f"{name}.c"
    out = BUILD_DIR / name
    deps = [src, REF_DIR / "common.h"]
    if out.exists() and all(out.stat().st_mtime >= d.stat().st_mtime for d in deps):
        return out
    BUILD_DIR.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    res = subprocess.run(
        ["gcc", *CFLAGS, "-o", str(tmp), str(src)], capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        raise BenchError(f"gcc {src.name} failed:\n{res.stderr}")
    tmp.replace(out)
    return out


def _child_setup() -> None:
    # Runs in the child between fork and exec: die with the harness.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class Proc:
    """One child with line-oriented stdin/stdout; stderr kept for error messages."""

    def __init__(self, argv: list[str], *, name: str, pin: str | None = None,
                 term_first: bool = False, stdin: bool = True) -> None:
        self.name = name
        self.term_first = term_first  # the daemon gets SIGTERM and a grace period
        if pin is not None:
            argv = ["taskset", "-c", pin, *argv]
        self.argv = argv
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_child_setup,  # not thread-safe: the harness spawns from one thread
        )
        self._buf = b""
        self._err = b""
        _live.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def send(self, line: str) -> None:
        """Write one line to the child's stdin (ignored if it is gone)."""
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.popen.stdin.write(line.encode() + b"\n")
            self.popen.stdin.flush()

    def close_stdin(self) -> None:
        if self.popen.stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                self.popen.stdin.close()

    def _pump_stderr(self) -> None:
        assert self.popen.stderr is not None
        fd = self.popen.stderr.fileno()
        os.set_blocking(fd, False)
        with contextlib.suppress(BlockingIOError, ValueError, OSError):
            while chunk := os.read(fd, 65536):
                self._err += chunk

    def stderr_tail(self, n: int = 600) -> str:
        self._pump_stderr()
        return self._err.decode(errors="replace").strip()[-n:]

    def readline(self, timeout: float) -> str:
        """The next stdout line, stripped.

        Raises BenchError if the child closes stdout or nothing comes within `timeout`.
        """
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"{self.name}: no output within {timeout:.0f}s"
                                     f"{self._why()}")
                if sel.select(left):
                    chunk = os.read(fd, 65536)
                    if not chunk:
                        self.popen.poll()
                        time.sleep(0.05)
                        raise BenchError(f"{self.name} ended (status {self.popen.poll()})"
                                         f"{self._why()}")
                    self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").strip()

    def expect(self, prefix: str, timeout: float) -> list[str]:
        """Read lines until one starts with `prefix`; return its words after the prefix."""
        while True:
            line = self.readline(timeout)
            if line.split()[:1] == ["error"]:
                raise BenchError(line[len("error"):].strip())
            if line.split()[:1] == [prefix]:
                return line.split()[1:]

    def _why(self) -> str:
        tail = self.stderr_tail()
        return f": {tail}" if tail else ""

    def wait(self, timeout: float) -> int:
        """Wait for exit; kill on timeout and raise BenchError."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise BenchError(f"{self.name} did not exit within {timeout:.0f}s") from None

    def kill(self) -> None:
        """Stop the child (SIGTERM + grace for the daemon, SIGKILL otherwise) and reap it."""
        p = self.popen
        if p.poll() is None:
            if self.term_first:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                with contextlib.suppress(OSError, BrokenPipeError):
                    f.close()
        if self in _live:
            _live.remove(self)

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def cleanup_all() -> None:
    """Kill every process still registered: tracers and clients first, daemon last."""
    for p in sorted(_live, key=lambda p: p.term_first):
        p.kill()


def set_affinity_all_threads(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` (e.g. the daemon's) to `cpus`."""
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError, OSError):
                os.sched_setaffinity(int(tid), cpus)


def rss_kb(pid: int) -> int:
    """VmRSS of `pid` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")
