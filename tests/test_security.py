"""Who may ask the daemon for what (DESIGN.md §7): the ptrace access rule per request, the
daemon's own process, kernel-space addresses.

The unprivileged client is a *forked child* of the pytest process that drops to an unused
uid (``os.setuid``) after ``hwbkpt`` has been imported, so it needs no read access to the
venv; it reports its results through a pipe as JSON. Targets of other users are started
with ``subprocess.Popen(user=..., group=...)``. The daemon's private socket and its
directory are opened up (0777/0755) in these tests only, so that the uid can connect.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import build, parse_info

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace, perf and setuid"),
]

ME = 4242  # an unused uid/gid: the unprivileged client and its own targets
OTHER = 4243  # another unused uid/gid
CHILD_TIMEOUT = 20.0
KERNEL_ADDR = 0xFFFFFFFF81000000
USER_END = (1 << 47) - 4096  # TASK_SIZE_MAX on x86-64 (4-level paging)


# --------------------------------------------------------------------------- helpers


def run_as(uid: int, fn: Callable[[], Any], timeout: float = CHILD_TIMEOUT) -> Any:
    """Run ``fn`` in a forked child with uid/gid ``uid`` and no supplementary groups;
    return its (JSON-able) result. Re-raises a failure of the child as AssertionError."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(rfd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            out = {"ok": fn()}
        except BaseException as err:
            out = {"error": f"{type(err).__name__}: {err}"}
            status = 1
        try:
            os.write(wfd, json.dumps(out).encode())
        finally:
            os._exit(status)
    os.close(wfd)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"the uid-{uid} child did not finish in {timeout} s")
            ready, _, _ = select.select([rfd], [], [], left)
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                data += chunk
    finally:
        os.close(rfd)
        with contextlib.suppress(ProcessLookupError):
            if os.waitpid(pid, os.WNOHANG) == (0, 0):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    out = json.loads(data or b'{"error": "no output"}')
    if "error" in out:
        raise AssertionError(f"the uid-{uid} child failed: {out['error']}")
    return out["ok"]


def code_of(call: Callable[[], Any]) -> str:
    """The wire code of the error ``call`` raises, or ``"ok"``."""
    try:
        call()
    except hwbkpt.HwbkptError as err:
        return err.code
    return "ok"


class UserTarget:
    """A target program (tests/progs/NAME.c) started as ``uid``; killed by the fixture."""

    def __init__(self, binary: Path | str, uid: int | None) -> None:
        kw: dict[str, Any] = {}
        if uid is not None:
            kw = {"user": uid, "group": uid, "extra_groups": []}
        self.popen = subprocess.Popen(
            [str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, **kw
        )
        self.pid = self.popen.pid
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], 10.0)
        assert ready, f"{binary} printed no info line"
        self.info = parse_info(self.popen.stdout.readline().decode())
        self.addr = int(self.info["addr"])

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10.0)
        for s in (self.popen.stdin, self.popen.stdout):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()


@pytest.fixture
def user_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., UserTarget]]:
    """``start(uid, binary=None)``: spinner by default, as a world-readable copy (tests/_build
    binaries are 0711, and an executable its user cannot read runs non-dumpable)."""
    made: list[UserTarget] = []
    tmp = tmp_path_factory.mktemp("bin")
    os.chmod(tmp, 0o755)
    spinner = tmp / "spinner"
    shutil.copy(build("spinner"), spinner)
    os.chmod(spinner, 0o755)
    for parent in tmp.parents:
        if str(parent).startswith("/tmp/"):
            os.chmod(parent, 0o755)

    def start(uid: int | None, binary: Path | str | None = None) -> UserTarget:
        t = UserTarget(binary or spinner, uid)
        made.append(t)
        return t

    try:
        yield start
    finally:
        for t in made:
            t.kill()


@pytest.fixture
def open_daemon(daemon: Daemon) -> Daemon:
    """The test's daemon with its socket connectable by any uid (tests only)."""
    os.chmod(os.path.dirname(daemon.socket), 0o755)
    os.chmod(daemon.socket, 0o777)
    return daemon


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
def test_unprivileged_client_follows_the_ptrace_rule(
    open_daemon: Daemon, user_target: Callable[..., UserTarget]
) -> None:
    sock = open_daemon.socket
    root_t = user_target(None)
    mine = user_target(ME)
    other = user_target(OTHER)

    def child() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with hwbkpt.Client(socket=sock, name="unprivileged", timeout=10.0) as c:
            for name, t in (("root", root_t), ("other", other)):
                out[f"{name}.watch"] = code_of(lambda t=t: c.watch(t.pid, t.addr, mode="count"))
                out[f"{name}.read"] = code_of(lambda t=t: c.read_memory(t.pid, t.addr, 8))
                out[f"{name}.resume"] = code_of(lambda t=t: c.resume(t.pid))
                out[f"{name}.peek_dr"] = code_of(lambda t=t: c.peek_dr(t.pid, 7))
            out["daemon.watch"] = code_of(lambda: c.watch(open_daemon.pid, 0x1000, mode="count"))
            w = c.watch(mine.pid, mine.addr, mode="count")
            out["mine.watch"] = w.state
            out["mine.traced_by"] = _tracer_pid(mine.pid)
            out["mine.read"] = len(c.read_memory(mine.pid, mine.addr, 8))
            out["mine.kernel"] = code_of(lambda: c.watch(mine.pid, KERNEL_ADDR, mode="count"))
            clients = c.status()["clients"]
            out["uid_seen"] = [cl["uid"] for cl in clients if cl["name"] == "unprivileged"]
            w.remove()
        return out

    out = run_as(ME, child)
    assert out["uid_seen"] == [ME]
    for name in ("root", "other"):
        for op in ("watch", "read", "resume", "peek_dr"):
            assert out[f"{name}.{op}"] == "EPERM", (name, op, out)
    assert out["daemon.watch"] == "EPERM"
    assert out["mine.watch"] == "installed"
    assert out["mine.read"] == 8
    assert out["mine.traced_by"] == open_daemon.pid
    assert out["mine.kernel"] == "EINVAL"
    # Nothing was seized on behalf of the refused requests.
    for t in (root_t, other):
        assert _tracer_pid(t.pid) == 0


@pytest.mark.timeout(60)
def test_non_dumpable_target_is_refused_without_cap_sys_ptrace(
    open_daemon: Daemon, user_target: Callable[..., UserTarget]
) -> None:
    # An executable the uid may run but not read makes the process non-dumpable at exec.
    binary = Path(open_daemon.socket).parent / "spinner-xonly"
    shutil.copy(build("spinner"), binary)
    os.chmod(binary, 0o711)
    t = user_target(ME, binary)
    sock = open_daemon.socket

    def child() -> str:
        with hwbkpt.Client(socket=sock, timeout=10.0) as c:
            return code_of(lambda: c.watch(t.pid, t.addr, mode="count"))

    assert run_as(ME, child) == "EPERM"
    # Root (CAP_SYS_PTRACE) may.
    with hwbkpt.Client(socket=sock, timeout=10.0) as c:
        assert c.watch(t.pid, t.addr, mode="count").state == "installed"


@pytest.mark.timeout(60)
def test_nobody_may_target_the_daemon(daemon: Daemon) -> None:
    with hwbkpt.Client(socket=daemon.socket, timeout=10.0) as c:
        tids = [int(t) for t in os.listdir(f"/proc/{daemon.pid}/task")]
        assert code_of(lambda: c.watch(daemon.pid, 0x1000, mode="count")) == "EPERM"
        assert code_of(lambda: c.watch(daemon.pid, 0x1000, mode="stop")) == "EPERM"
        assert code_of(lambda: c.read_memory(daemon.pid, 0x1000, 8)) == "EPERM"
        assert code_of(lambda: c.write_memory(daemon.pid, 0x1000, b"x")) == "EPERM"
        assert code_of(lambda: c.call("watch_region", pid=daemon.pid, addr=0x1000, size=16)) == (
            "EPERM"
        )
        for tid in tids:
            for call in (
                lambda tid=tid: c.resume(tid),
                lambda tid=tid: c.interrupt(tid),
                lambda tid=tid: c.peek_dr(tid, 0),
                lambda tid=tid: c.poke_dr(tid, 0, 0x1000),
                lambda tid=tid: c.get_regs(tid),
            ):
                assert code_of(call) == "EPERM", tid
        # The daemon is untouched: still answering, not traced by anything.
        assert c.status()["pid"] == daemon.pid
    assert _tracer_pid(daemon.pid) == 0


@pytest.mark.timeout(60)
def test_kernel_space_addresses_are_refused(
    daemon: Daemon, user_target: Callable[..., UserTarget]
) -> None:
    t = user_target(None)
    with hwbkpt.Client(socket=daemon.socket, timeout=10.0) as c:
        for addr, length in (
            (KERNEL_ADDR, 8),
            (USER_END, 8),
            (USER_END - 4, 8),  # aligned? no: 4 mod 8; still refused (either reason)
            (USER_END - 8 + 8, 1),
            ((1 << 64) - 8, 8),
        ):
            assert code_of(lambda a=addr, n=length: c.watch(t.pid, a, n, mode="count")) == (
                "EINVAL"
            ), hex(addr)
        assert code_of(lambda: c.watch(t.pid, KERNEL_ADDR, 1, access="x", mode="stop")) == "EINVAL"
        assert code_of(lambda: c.call("watch_region", pid=t.pid, addr=USER_END - 4, size=16)) == (
            "EINVAL"
        )
        # The last user page is fine.
        w = c.watch(t.pid, USER_END - 8, 8, mode="count")
        assert w.state == "installed"
        w.remove()
        # Raw debug registers: the kernel's EINVAL for a kernel-space DR0-3 address.
        assert code_of(lambda: c.poke_dr(t.pid, 0, KERNEL_ADDR)) == "EINVAL"
        assert code_of(lambda: c.poke_user(t.pid, 848 + 8, KERNEL_ADDR)) == "EINVAL"
        assert c.peek_dr(t.pid, 0) == 0


def _tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0
