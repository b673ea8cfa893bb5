"""Real gdb for the tests: a :class:`Gdb` driven command by command, natively or through
``hwbkpt gdbserver``, and the stop lines of its output normalized for comparison.

gdb runs with its commands on a pipe (no tty), in a session of its own so that gdb and the
``hwbkpt gdbserver`` it starts are killed together. Every wait has a deadline; at teardown
(``gdb_factory``) each gdb still running is SIGKILLed with its process group and reaped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

__all__ = ["GDB", "LLDB", "Batch", "Gdb", "batch_factory", "gdb_factory", "stop_lines"]

GDB = shutil.which("gdb")
LLDB = shutil.which("lldb-19")
TIMEOUT = 30.0
# gdb retransmits a packet that is not acknowledged within `remotetimeout` (2 s by default;
# putpkt_binary in gdb/remote.c), and a server answers both copies: on a loaded machine the
# server's start (Python, the daemon's attach and hold_all) can take that long, and gdb then
# takes the second qSupported reply for the answer to its next packet ("Remote replied
# unexpectedly to 'vMustReplyEmpty'"). A debugger on a busy machine is not what these tests
# are about.
REMOTE_TIMEOUT = 30

# The lines gdb prints when the program stops or ends: breakpoint and watchpoint hits,
# old/new values, the frame and source line it stopped at, finish, exit and detach.
_STOP_LINE = re.compile(
    r"^(Thread \d+ \"[^\"]*\" hit )?"
    r"((Temporary breakpoint|Breakpoint|Hardware (read |access \(read/write\) )?watchpoint)"
    r" \d+[,:]|Run till exit)"
    r"|^(Old value|New value|Value) = "
    r"|^\[Inferior \d+ \(process \d+\) (exited|detached|killed)"
    r"|^(0x[0-9a-f]+ in )?[\w:]+ \(.*\) at \S+:\d+$"
    r"|^\d+\t"
    r"|^Could not insert|^Could not insert hardware"
    r"|^Program (received|terminated with) signal "
    r"|^process \d+ is executing new program: "
)


def stop_lines(output: str) -> list[str]:
    """The stop lines of ``output`` with addresses and pids replaced."""
    lines = []
    for line in output.splitlines():
        if _STOP_LINE.search(line):
            line = re.sub(r"0x[0-9a-f]+", "0xADDR", line)
            line = re.sub(r"process \d+", "process PID", line)
            # gdb numbers threads in the order it learns of them: natively at each clone,
            # through any remote stub (gdbserver's too) the stopping thread first, then the
            # others from the thread list. Which thread hit is checked by its name and frame.
            line = re.sub(r"^Thread \d+ ", "Thread N ", line)
            lines.append(line)
    return lines


class Gdb:
    """One gdb process; :meth:`cmd` runs a command and returns what gdb printed for it."""

    _marks = itertools.count()

    def __init__(self, program: str) -> None:
        self.popen = subprocess.Popen(
            self.command_line(program),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._buf = b""
        self.transcript: list[str] = []

    @staticmethod
    def command_line(program: str) -> list[str]:
        assert GDB is not None
        return [GDB, "-nx", "-q", "-ex", "set pagination off", "-ex", "set confirm off",
                "-ex", "set width 0", "-ex", f"set remotetimeout {REMOTE_TIMEOUT}", program]

    @staticmethod
    def marker(mark: str) -> str:
        """A command that prints ``mark`` on a line of its own."""
        return f"echo {mark}\\n"

    def send(self, command: str) -> str:
        """Write ``command`` (and a marker after it) without waiting; returns the marker."""
        mark = f"@@mark{next(self._marks)}@@"
        assert self.popen.stdin is not None
        self.popen.stdin.write(f"{command}\n{self.marker(mark)}\n".encode())
        self.popen.stdin.flush()
        return mark

    def wait(self, mark: str, timeout: float = TIMEOUT) -> str:
        """Read gdb's output up to ``mark``; fail the test after ``timeout`` seconds."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        needle = mark.encode() + b"\n"
        while needle not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"gdb printed no {mark} within {timeout} s; output:\n"
                            + "".join(self.transcript) + self._buf.decode(errors="replace"))
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    pytest.fail("gdb exited; output:\n" + "".join(self.transcript)
                                + self._buf.decode(errors="replace"))
                self._buf += chunk
        out, _, self._buf = self._buf.partition(needle)
        text = out.decode(errors="replace").replace("(gdb) ", "")
        self.transcript.append(text)
        return text

    def cmd(self, command: str, timeout: float = TIMEOUT) -> str:
        """Run ``command`` and return its output."""
        return self.wait(self.send(command), timeout)

    def output(self) -> str:
        return "".join(self.transcript)

    def quit(self, timeout: float = TIMEOUT) -> int:
        """``quit`` and wait for gdb to exit; returns its exit status."""
        assert self.popen.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.popen.stdin.write(b"quit\n")
            self.popen.stdin.close()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"gdb did not quit within {timeout} s")

    def kill(self) -> None:
        """SIGKILL gdb and everything it started; reap it (never fails)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(TIMEOUT)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class Batch:
    """A debugger running a whole script in batch mode (``gdb -batch``, ``lldb -b``), in a
    session of its own; :meth:`output` waits for it with a deadline. Several run at once
    when the script of each waits for stops the others' holds order."""

    def __init__(self, argv: list[str]) -> None:
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @classmethod
    def gdb(cls, program: str, connect: str, commands: list[str]) -> Batch:
        assert GDB is not None
        argv = [GDB, "-nx", "-batch", "-ex", "set pagination off", "-ex", "set width 0",
                "-ex", f"set remotetimeout {REMOTE_TIMEOUT}", "-ex", connect]
        for command in commands:
            argv += ["-ex", command]
        return cls([*argv, program])

    @classmethod
    def lldb(cls, program: str, connect: str, commands: list[str]) -> Batch:
        assert LLDB is not None
        argv = [LLDB, "--no-lldbinit", "-b", "-o", connect]
        for command in commands:
            argv += ["-o", command]
        return cls([*argv, program])

    def output(self, timeout: float = TIMEOUT * 2) -> str:
        """Everything it printed once it has exited; fails the test after ``timeout``."""
        try:
            out, _ = self.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            out, _ = self.popen.communicate()
            pytest.fail(f"{self.popen.args[0]} did not finish within {timeout} s:\n"
                        + out.decode(errors="replace"))
        return out.decode(errors="replace")

    def kill(self) -> None:
        """SIGKILL it and everything it started; reap it (never fails)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(TIMEOUT)


@pytest.fixture
def batch_factory() -> Iterator[Callable[..., Batch]]:
    """``start(kind, program, connect, commands)`` with kind ``"gdb"`` or ``"lldb"``;
    every one is killed at teardown."""
    started: list[Batch] = []

    def start(kind: str, program: str, connect: str, commands: list[str]) -> Batch:
        batch = Batch.gdb(program, connect, commands) if kind == "gdb" else Batch.lldb(
            program, connect, commands
        )
        started.append(batch)
        return batch

    try:
        yield start
    finally:
        for batch in started:
            batch.kill()
            for stream in (batch.popen.stdout,):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


def server_command(socket: str, pid: int) -> str:
    """gdb's command to reach ``pid`` through ``hwbkpt gdbserver`` on the stdio pipe."""
    return f"target remote | {sys.executable} -m hwbkpt._cli --socket {socket} gdbserver {pid}"


@pytest.fixture
def gdb_factory() -> Iterator[Callable[[str, str], Gdb]]:
    """``start(program, connect_command) -> Gdb``; every gdb is killed at teardown."""
    started: list[Gdb] = []

    def start(program: str, connect: str) -> Gdb:
        gdb = Gdb(program)
        started.append(gdb)
        gdb.cmd(connect)
        return gdb

    try:
        yield start
    finally:
        for gdb in started:
            gdb.kill()
