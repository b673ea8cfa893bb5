"""``thread`` events against the real daemon: a client attached to a process is told of
each thread that appears (once seized) and each one that exits; other clients are not."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import trio

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import (
    Conn,
    connect_fixture,  # noqa: F401  (the `connect` fixture)
    info_int,
    thread_state,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]
Connect = Callable[[str], Conn]


def _worker_tids(proc: Target, count: int) -> list[int]:
    """The ``tid=N idx=I`` lines the workers of tests/progs/threads.c print."""
    return sorted(int(proc.line().split()[0].partition("=")[2]) for _ in range(count))


@pytest.mark.timeout(90)
def test_attached_clients_get_thread_new_and_exit(target: Start, connect: Connect) -> None:
    proc = target("threads", 3, 1000)
    a, b, c = connect("a"), connect("b"), connect("c")
    a.attach(proc.pid)
    c.attach(proc.pid)
    # b has an interest in the process (a watch) but is not attached: no thread events.
    b.watch(proc.pid, info_int(proc, "addr"), 8, "w", "count")
    proc.go()
    workers = _worker_tids(proc, 3)
    assert proc.line() == "done var=1000"
    assert proc.wait() == 0
    for conn in (a, c):
        conn.expect("exit", pid=proc.pid)
        events = [e for e in conn.poll() if e.kind == "thread"]
        # expect() kept the events before "exit" in the backlog, poll() returns them.
        told = [(e.tid, e.state) for e in events]
        assert sorted(told) == sorted(
            [(t, "new") for t in workers] + [(t, "exit") for t in workers]
        ), told
        for tid in workers:
            assert told.index((tid, "new")) < told.index((tid, "exit"))
        for event in events:
            assert event.pid == proc.pid
            if event.state == "exit":
                assert event.code == 0
                assert event.signal is None
            else:
                assert "code" not in event.fields
    b.expect("exit", pid=proc.pid)
    assert [e for e in b.poll() if e.kind == "thread"] == []


@pytest.mark.timeout(90)
def test_a_detached_client_is_told_nothing_more(target: Start, connect: Connect) -> None:
    proc = target("threads", 2, 1000)
    a, b = connect("a"), connect("b")
    a.attach(proc.pid)
    b.attach(proc.pid)
    a.detach(proc.pid)
    proc.go()
    workers = _worker_tids(proc, 2)
    assert proc.line() == "done var=1000"
    assert proc.wait() == 0
    b.expect("exit", pid=proc.pid)
    told = sorted((e.tid, e.state) for e in b.poll() if e.kind == "thread")
    assert told == sorted([(t, "new") for t in workers] + [(t, "exit") for t in workers])
    assert [e for e in a.poll() if e.kind == "thread"] == []


@pytest.mark.timeout(90)
def test_the_trio_client_hands_out_thread_events(target: Start, daemon: Daemon) -> None:
    proc = target("threads", 2, 1000)

    async def main() -> list[tuple[int, str]]:
        told: list[tuple[int, str]] = []
        with trio.fail_after(60):
            async with hwbkpt.AsyncClient(daemon.socket) as client:
                await client.call("attach", pid=proc.pid)
                proc.go()
                while (event := await client.next_event()).kind != "exit":
                    if event.kind == "thread":
                        assert event.pid == proc.pid
                        told.append((event.tid, event.state))
        return told

    told = trio.run(main)
    workers = _worker_tids(proc, 2)
    assert proc.line() == "done var=1000"
    assert proc.wait() == 0
    assert sorted(told) == sorted([(t, "new") for t in workers] + [(t, "exit") for t in workers])


@pytest.mark.timeout(90)
def test_hold_threads_holds_each_new_thread_for_that_client(
    target: Start, connect: Connect
) -> None:
    proc = target("threads", 2, 1000)
    a, b = connect("a"), connect("b")
    a.attach(proc.pid, hold_threads=True)
    b.attach(proc.pid)
    proc.go()
    for _ in range(2):
        stop = a.expect("stop", reason="thread")
        tid = stop.tid
        assert stop.pid == proc.pid
        assert stop.watches == []
        new = a.expect("thread", tid=tid)
        assert new.state == "new"
        # Held at its first stop: it has not run (no "tid=" line yet) and stays stopped.
        assert thread_state(proc.pid, tid) == "t"
        assert b.expect("thread", tid=tid).state == "new"
        a.resume(tid)
    workers = _worker_tids(proc, 2)
    assert proc.line() == "done var=1000"
    assert proc.wait() == 0
    for tid in workers:
        a.expect("thread", tid=tid, state="exit")
    b.none_of("stop")


@pytest.mark.timeout(60)
def test_bad_hold_threads_is_refused(target: Start, connect: Connect) -> None:
    proc = target("threads", 1, 1)
    a = connect("a")
    with pytest.raises(hwbkpt.InvalidArgumentError, match="hold_threads must be true or false"):
        a.call("attach", pid=proc.pid, hold_threads=1)
    assert a.attach(proc.pid) == [proc.pid]
    proc.go()
    assert proc.wait() == 0
