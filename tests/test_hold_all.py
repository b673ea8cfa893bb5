"""``attach`` / ``hold_all`` / ``detach`` against the real daemon: a debugger's all-stop."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

import hwbkpt
from tests._progs import Target
from tests.test_watch import (
    Conn,
    connect_fixture,  # noqa: F401  (the `connect` fixture)
    info_int,
    proc_state,
    thread_state,
    tids_of,
    tracer_pid,
    wait_until,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]
Connect = Callable[[str], Conn]


def threads_started(proc: Target, count: int) -> list[int]:
    return sorted(info_int_line(proc.line()) for _ in range(count))


def info_int_line(line: str) -> int:
    return int(line.split()[0].partition("=")[2])


@pytest.mark.timeout(60)
def test_attach_keeps_an_idle_process_and_reports_its_exit(target: Start, connect: Connect) -> None:
    proc = target("writer", 5)
    a = connect("a")
    assert a.attach(proc.pid) == [proc.pid]
    assert tracer_pid(proc.pid) != 0
    proc.go()
    assert proc.line() == "done var=5 pair0=0"
    exit_event = a.expect("exit", pid=proc.pid)
    assert exit_event.code == 0
    assert proc.wait() == 0


@pytest.mark.timeout(60)
def test_hold_all_stops_every_thread_until_released(target: Start, connect: Connect) -> None:
    proc = target("threads", 3, 200_000_000)
    a, b = connect("a"), connect("b")
    a.attach(proc.pid)
    proc.go()
    workers = threads_started(proc, 3)
    tids = sorted([proc.pid, *workers])
    assert tids_of(proc.pid) == tids
    held = a.hold_all(proc.pid)
    assert sorted(held) == tids
    for tid in tids:
        stop = a.expect("stop", tid=tid)
        assert stop.reason == "interrupt"
        assert stop.watches == []
    for tid in tids:
        wait_until(lambda t=tid: thread_state(proc.pid, t) == "t", what=f"{tid} stopped")
    # A second hold_all holds nothing more; b's hold adds to a's.
    assert a.hold_all(proc.pid) == []
    b.attach(proc.pid)
    assert sorted(b.hold_all(proc.pid)) == tids
    for tid in tids:
        b.expect("stop", tid=tid, reason="interrupt")
    var = info_int(proc, "addr")
    before = a.read_memory(proc.pid, var, 8)
    a.detach(proc.pid)  # a's holds go, b's stay: nothing runs
    with pytest.raises(hwbkpt.NoSuchProcessError):
        a.hold_all(proc.pid)
    assert all(thread_state(proc.pid, t) == "t" for t in tids)
    assert a.read_memory(proc.pid, var, 8) == before
    for tid in tids:
        b.resume(tid)
    wait_until(lambda: a.read_memory(proc.pid, var, 8) != before, what="the program to run")
    # b is still attached: the process stays managed; b leaving lets it go.
    assert tracer_pid(proc.pid) != 0
    b.detach(proc.pid)
    wait_until(lambda: tracer_pid(proc.pid) == 0, what="the daemon to let the process go")
    assert proc_state(proc.pid) in ("R", "S")


@pytest.mark.timeout(60)
def test_a_client_that_goes_away_releases_its_hold_all(target: Start, connect: Connect) -> None:
    proc = target("threads", 2, 200_000_000)
    a = connect("a")
    a.attach(proc.pid)
    proc.go()
    tids = sorted([proc.pid, *threads_started(proc, 2)])
    assert sorted(a.hold_all(proc.pid)) == tids
    for tid in tids:
        a.expect("stop", tid=tid)
    var = info_int(proc, "addr")
    before = a.read_memory(proc.pid, var, 8)
    a.close()
    watcher = connect("w")
    wait_until(
        lambda: watcher.read_memory(proc.pid, var, 8) != before, what="the program to run"
    )
    wait_until(lambda: tracer_pid(proc.pid) == 0, what="the daemon to let the process go")


@pytest.mark.timeout(30)
def test_hold_all_needs_attach(target: Start, connect: Connect) -> None:
    proc = target("writer", 1)
    a = connect("a")
    with pytest.raises(hwbkpt.NoSuchProcessError, match="attach first"):
        a.hold_all(proc.pid)
    with pytest.raises(hwbkpt.NoSuchProcessError):
        a.detach(proc.pid)
    with pytest.raises(hwbkpt.InvalidArgumentError):
        a.call("hold_all", pid=proc.pid, tid=1)
