"""exec, exit and detach against the real daemon. Helpers come from tests/test_watch.py."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import pytest

import hwbkpt
from tests._progs import Target
from tests.test_watch import (
    TIMEOUT,
    Conn,
    connect_fixture,  # noqa: F401  (the `connect` fixture)
    finish,
    info_int,
    tracer_pid,
    wait_until,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]
Connect = Callable[[str], Conn]


def traced_threads(pid: int) -> dict[int, int]:
    """TracerPid of every thread of ``pid`` that has one."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{name}/status") as f:
                for line in f:
                    if line.startswith("TracerPid:") and int(line.split()[1]):
                        out[int(name)] = int(line.split()[1])
        except FileNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- 8. exec and exit


@pytest.mark.timeout(60)
def test_exec_ends_every_watch(target: Start, connect: Connect) -> None:
    n = 5
    proc = target("execer", n)
    addr = info_int(proc, "addr")
    a, b = connect("counter"), connect("stopper")
    wa = a.watch(proc.pid, addr, mode="count")
    wb = b.watch(proc.pid, addr, mode="stop")
    proc.go()
    for _ in range(n):
        ev = b.expect("stop")
        assert ev.watches == [wb.id]
        b.resume(proc.pid)
    assert proc.line() == f"done var={n}"
    assert a.expect("exec").pid == proc.pid
    assert b.expect("exec").pid == proc.pid
    # Every watch ended at the exec (the daemon ended them before it said so): ended, with
    # its final count, kept until removed (issue 10, point 3; DESIGN §5.5).
    exec_end = {"reason": "exec", "code": None, "signal": None}
    for client, watch in ((a, wa), (b, wb)):
        [info] = client.watches()
        assert (info["id"], info["state"], info["ended"]) == (watch.id, "ended", exec_end)
        assert info["count"] == n
        assert watch.state == "ended"
        assert watch.ended == exec_end
    # The new image runs on unharmed: no stop for its write of var, and it exits 0.
    line = proc.line()
    assert line.startswith("execd addr=")
    assert proc.wait(TIMEOUT) == 0
    b.none_of("stop", 0.05)
    assert wa.count() == n  # the final count: the new image's write is not counted
    assert wb.count() == n
    wa.remove()
    with pytest.raises(hwbkpt.NotFoundError):
        wa.count()
    assert a.watches() == []


@pytest.mark.timeout(60)
def test_exec_then_watch_the_new_image(target: Start, connect: Connect) -> None:
    """After exec the old watches are gone and the new image can be watched afresh."""
    n = 50
    proc = target("execgate", n)
    c = connect("counter")
    old = c.watch(proc.pid, info_int(proc, "addr"), mode="count")
    proc.go()
    assert proc.line() == f"done var={n}"
    c.expect("exec")
    assert [w["state"] for w in c.watches()] == ["ended"]
    assert old.count() == n
    old.remove()
    assert c.watches() == []
    line = proc.line()
    assert line.startswith("execd addr=")
    new_addr = int(line.split()[1].split("=")[1], 16)
    w = c.watch(proc.pid, new_addr, mode="stop")
    assert w.state == "installed"
    proc.go()
    for i in range(1, n + 1):
        ev = c.expect("stop")
        assert ev.watches == [w.id]
        assert w.count() == i
        c.resume(proc.pid)
    assert proc.line() == f"done2 var={n}"
    c.expect("exit")
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_exit_event_ends_watches(target: Start, connect: Connect) -> None:
    proc = target("writer", 3)
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, addr, mode="count")
    wb = b.watch(proc.pid, addr, mode="notify")
    proc.go()
    assert proc.line() == "done var=3 pair0=0"
    ea = a.expect("exit")
    eb = b.expect("exit")
    assert ea.pid == eb.pid == proc.pid
    assert ea.tid == proc.pid
    assert ea.get("code") == 0 or ea.get("status") == 0
    assert proc.wait(TIMEOUT) == 0
    exit_end = {"reason": "exit", "code": 0, "signal": None}
    assert [(w["state"], w["ended"], w["count"]) for w in a.watches()] == [("ended", exit_end, 3)]
    assert [(w["state"], w["ended"], w["count"]) for w in b.watches()] == [("ended", exit_end, 3)]
    assert (wa.state, wa.ended, wa.count()) == ("ended", exit_end, 3)
    assert (wb.state, wb.count()) == ("ended", 3)
    status = a.status()
    assert all(t["pid"] != proc.pid for t in status["targets"])  # let go: nothing traced
    ended = {(w["client"], w["id"]) for w in status["ended"]}
    mine = {c["name"]: c for c in status["clients"]}
    assert ended == {(mine["a"]["id"], wa.id), (mine["b"]["id"], wb.id)}
    assert mine["a"]["ended"] == mine["b"]["ended"] == 1
    wa.remove()
    assert a.watches() == []
    with pytest.raises(hwbkpt.NotFoundError):
        wa.count()
    b.close()  # its ended watch goes with it
    wait_until(lambda: a.status()["ended"] == [], what="b's ended watch to go with b")


@pytest.mark.timeout(60)
def test_exit_by_signal(target: Start, connect: Connect) -> None:
    proc = target("writer", 3, "gate2")
    c = connect("a")
    c.watch(proc.pid, info_int(proc, "addr"), mode="count")
    proc.go()
    proc.line()
    os.kill(proc.pid, signal.SIGKILL)
    ev = c.expect("exit")
    assert ev.pid == proc.pid
    assert ev.get("signal") == signal.SIGKILL or ev.get("status") == signal.SIGKILL
    assert proc.wait(TIMEOUT) == -signal.SIGKILL
    [info] = c.watches()
    assert info["ended"] == {"reason": "exit", "code": None, "signal": signal.SIGKILL}
    assert info["count"] == 3


# --------------------------------------------------------------------------- 9. detach


@pytest.mark.timeout(60)
def test_last_unwatch_detaches(target: Start, connect: Connect) -> None:
    proc = target("writer", 100, "gate2")
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, info_int(proc, "addr2"), mode="count")
    assert tracer_pid(proc.pid) != 0
    proc.go()
    a.expect("stop")
    wa.remove()  # removing the watch releases nothing: A still holds this stop
    assert tracer_pid(proc.pid) != 0
    a.resume(proc.pid)
    assert proc.line() == "done var=100 pair0=0"
    assert tracer_pid(proc.pid) != 0  # B's watch remains
    assert wb.count() == 100
    wb.remove()
    wait_until(lambda: not traced_threads(proc.pid), what="TracerPid 0 after the last unwatch")
    assert all(t["pid"] != proc.pid for t in a.status()["targets"])
    finish(proc, "gate2")


@pytest.mark.timeout(60)
def test_disconnect_of_owner_detaches(target: Start, connect: Connect) -> None:
    proc = target("writer", 100, "gate2")
    addr = info_int(proc, "addr")
    a = connect("a")
    a.watch(proc.pid, addr, mode="stop")
    a.watch(proc.pid, info_int(proc, "addr2"), mode="count")
    proc.go()
    a.expect("stop")
    a.close()  # while holding the stop: the hold goes, the program runs on
    assert proc.line() == "done var=100 pair0=0"
    wait_until(lambda: not traced_threads(proc.pid), what="TracerPid 0 after the disconnect")
    finish(proc, "gate2")


@pytest.mark.timeout(60)
def test_detach_from_threads_leaves_them_untraced(target: Start, connect: Connect) -> None:
    t, n = 4, 500
    proc = target("tgate", t, n)
    c = connect("a")
    proc.go()
    for _ in range(t):
        proc.line()
    assert proc.line() == "ready"
    w = c.watch(proc.pid, info_int(proc, "addr"), mode="stop")
    assert len(traced_threads(proc.pid)) == t + 1
    w.remove()
    wait_until(lambda: not traced_threads(proc.pid), what="every thread untraced")
    proc.go()
    assert proc.line() == f"done var={n}"
    finish(proc, "gate3")


@pytest.mark.timeout(60)
def test_detach_with_stop_watch_pending_trap(target: Start, connect: Connect) -> None:
    """Unwatching a stop watch of a busy writer never leaves a SIGTRAP for the program."""
    proc = target("spinner")
    c = connect("a")
    for _ in range(20):
        w = c.watch(proc.pid, info_int(proc, "addr"), mode="stop")
        if _ == 0:
            proc.go()
        c.expect("stop")
        c.resume(proc.pid)
        w.remove()
        # A hit between the resume and the unwatch is a stop A still holds: resume it too.

        def untraced() -> bool:
            for event in c.poll(0.01):
                assert event.kind == "stop", event
                c.resume(proc.pid)
            return not traced_threads(proc.pid)

        wait_until(untraced, what="untraced after unwatch")
    proc.go()
    assert proc.line().startswith("done var=")
    assert proc.wait(TIMEOUT) == 0
