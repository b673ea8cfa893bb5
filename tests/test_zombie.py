"""A process that has exited, and one that never existed, as every client sees them
(issue 10, point 5): ``ESRCH`` (NoSuchProcessError) with a message in the user's terms —
never ``EPERM``, never an internal function name such as ``tgid_of(…)`` or ``ptrace(SEIZE)``.

The zombie is a child of the test process that has exited and that the test does not reap
until the end; ``PTRACE_SEIZE`` of it answers ``EPERM`` (kernel/ptrace.c, ptrace_attach:
``task->exit_state`` set), which the kernel layer recognises from ``/proc/PID/stat``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

import hwbkpt
from hwbkpt_proto import NoSuchProcessError
from hwbkptd import _kernel
from tests._daemon import Daemon
from tests.test_watch import TIMEOUT

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.timeout(60),
]

NO_SUCH_PID = 4_194_304 + 4242  # above the maximal pid_max: never a process
# What no message a client sees may contain: names of the daemon's internals and syscalls.
INTERNAL = re.compile(r"tgid_of|threads_of|ptrace\(|PTRACE_|SEIZE|perf_event_open|_kernel")


@pytest.fixture
def zombie() -> Iterator[int]:
    """The pid of an exited child of this process, not reaped until teardown."""
    proc = subprocess.Popen(["/bin/true"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while _kernel.exit_state(proc.pid) != "zombie":
            if time.monotonic() > deadline:
                pytest.fail(f"/bin/true [{proc.pid}] did not become a zombie in {TIMEOUT} s")
            time.sleep(0.005)
        yield proc.pid
    finally:
        proc.wait(TIMEOUT)


def _zombie_message(pid: int) -> str:
    return f"process {pid} has exited (zombie, not yet reaped by its parent)"


def test_kernel_layer_says_esrch_for_a_zombie(zombie: int) -> None:
    with pytest.raises(NoSuchProcessError) as info:
        _kernel.seize(zombie)
    assert str(info.value.message) == _zombie_message(zombie)
    assert info.value.__cause__ is not None  # the kernel's own EPERM is kept as the cause
    assert getattr(info.value.__cause__, "errno", None) == 1


def test_kernel_layer_says_a_missing_process_does_not_exist() -> None:
    with pytest.raises(NoSuchProcessError, match=f"^thread {NO_SUCH_PID} does not exist$"):
        _kernel.tgid_of(NO_SUCH_PID)
    with pytest.raises(NoSuchProcessError, match=f"^process {NO_SUCH_PID} does not exist$"):
        _kernel.threads_of(NO_SUCH_PID)
    with pytest.raises(NoSuchProcessError, match=f"^thread {NO_SUCH_PID} does not exist$"):
        _kernel.seize(NO_SUCH_PID)
    assert _kernel.exit_state(NO_SUCH_PID) == "missing"
    assert _kernel.exit_state(os.getpid()) is None


def test_client_gets_esrch_for_a_zombie(daemon: Daemon, zombie: int) -> None:
    with hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c:
        for call in (
            lambda: c.watch(zombie, 0x1000, mode="count"),
            lambda: c.watch(zombie, 0x1000, mode="stop", tid=zombie),
            lambda: c.watch_region(zombie, 0x1000, 16, mode="count"),
            lambda: c.poke_dr(zombie, 0, 0x1000),
            lambda: c.peek_dr(zombie, 7),
            lambda: c.peek_user(zombie, 848),
        ):
            with pytest.raises(NoSuchProcessError) as info:
                call()
            assert info.value.code == "ESRCH"
            assert info.value.message == _zombie_message(zombie)
        # Nothing was left behind: the daemon manages no process, and still answers.
        assert c.status()["targets"] == []


def test_client_gets_esrch_for_a_process_that_does_not_exist(daemon: Daemon) -> None:
    with hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c:
        with pytest.raises(NoSuchProcessError, match=f"^process {NO_SUCH_PID} does not exist$"):
            c.watch(NO_SUCH_PID, 0x1000)
        for call in (
            lambda: c.peek_dr(NO_SUCH_PID, 0),
            lambda: c.poke_dr(NO_SUCH_PID, 7, 1),
            lambda: c.resume(NO_SUCH_PID),
            lambda: c.get_regs(NO_SUCH_PID),
        ):
            with pytest.raises(NoSuchProcessError) as info:
                call()
            assert info.value.message == f"thread {NO_SUCH_PID} does not exist"
            assert not INTERNAL.search(info.value.message)
        with pytest.raises(NoSuchProcessError) as info:
            c.read_memory(NO_SUCH_PID, 0x1000, 8)
        assert not INTERNAL.search(info.value.message), info.value.message
        assert str(NO_SUCH_PID) in info.value.message


def _cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )


def test_cli_says_the_process_has_exited(daemon: Daemon, zombie: int) -> None:
    for args in (("watch", str(zombie), "0x1000"), ("dr", str(zombie))):
        result = _cli(daemon, *args)
        assert result.returncode != 0, result
        assert _zombie_message(zombie) in result.stderr, result.stderr
        assert "EPERM" not in result.stderr
        assert not INTERNAL.search(result.stderr), result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback


def test_cli_says_the_process_does_not_exist(daemon: Daemon) -> None:
    result = _cli(daemon, "watch", str(NO_SUCH_PID), "0x1000")
    assert result.returncode != 0
    assert "does not exist" in result.stderr, result.stderr
    assert not INTERNAL.search(result.stderr), result.stderr
