"""Control events never cost a client its connection because hits filled its queue
(issue 10, point 4; hwbkptd/_client.py, README "Limits").

Hits are dropped and reported as ``lost``; ``exit``, ``exec``, ``installed``,
``uninstalled``, ``throttled``, ``stop``, ``error`` and the ``lost`` summaries have a room of
their own. First the rule on a :class:`ClientHandle` without a socket (everything it is sent
stays queued), then a real client that reads only after a program made 50,000 hits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio

import hwbkpt
from hwbkpt_proto import Connection, Notification
from hwbkptd._client import ClientHandle
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import TIMEOUT, info_int


def _handle(limit: int) -> ClientHandle:
    """A connection that has no socket yet: whatever it is sent stays queued."""
    return ClientHandle(1, 1, 0, 0, max_queued_events=limit, cancel_scope=trio.CancelScope())


def _queued(client: ClientHandle) -> list[tuple[str, dict[str, Any]]]:
    conn = Connection()
    conn.receive_data(b"".join(client._out))
    out = []
    while (msg := conn.next_message()) is not None:
        assert isinstance(msg, Notification)
        out.append((msg.method, msg.params))
    return out


def _hit(i: int) -> dict[str, Any]:
    return {"watches": [1], "tid": 7, "ip": i, "time": i}


async def test_hits_beyond_the_limit_are_dropped_and_control_events_still_fit() -> None:
    client = _handle(5)
    sent = [client.send_event("hit", _hit(i)) for i in range(10)]
    assert sent == [True] * 5 + [False] * 5
    batch = {"watches": [1], "tid": [7] * 5, "ip": [0] * 5, "time": [0] * 5}
    assert not client.send_event("hits", batch)  # a dropped batch loses every hit in it
    assert not client.send_event("lost", {"count": 40, "what": "hit", "where": "ring"})
    for kind, fields in [
        ("uninstalled", {"watch": 1, "tid": 7, "reason": "preempted"}),
        ("installed", {"watch": 1, "tid": 7}),
        ("exit", {"pid": 7, "tid": 7, "code": 0, "signal": None}),
    ]:
        assert client.send_event(kind, fields, droppable=False)
    assert not client.closing
    events = _queued(client)
    assert [kind for kind, _ in events] == ["hit"] * 5 + [
        "lost",
        "uninstalled",
        "installed",
        "exit",
    ]
    # Every hit is either queued or counted as lost, before the first control event.
    assert events[5][1] == {"count": 5 + 5 + 40, "what": "hit"}
    assert client.events_dropped == 7


async def test_a_client_that_lets_the_control_room_fill_is_disconnected() -> None:
    client = _handle(4)
    for i in range(4):
        assert client.send_event("hit", _hit(i))
    for i in range(4):
        assert client.send_event("installed", {"watch": 1, "tid": i}, droppable=False)
    assert not client.closing  # four hits and four control events: each room holds its own
    assert not client.send_event("stop", {"pid": 1, "tid": 1}, droppable=False)
    assert client.closing
    assert client.disconnect_reason is not None
    assert "4 control events are queued" in client.disconnect_reason
    assert "'stop'" in client.disconnect_reason
    assert _queued(client)[-1][0] == "disconnected"


async def test_a_lost_summary_before_a_control_event_is_never_dropped() -> None:
    client = _handle(2)
    for i in range(5):
        client.send_event("hit", _hit(i))
    client.send_event("exec", {"pid": 7}, droppable=False)
    kinds = [kind for kind, _ in _queued(client)]
    assert kinds == ["hit", "hit", "lost", "exec"]


Start = Callable[..., Target]


@pytest.mark.timeout(120)
@pytest.mark.kernel
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf")
def test_a_client_that_reads_after_the_program_ended_keeps_its_connection(
    daemon_factory: Callable[..., Daemon], target: Start
) -> None:
    n = 50_000
    d = daemon_factory("--max-queued-events", "1000")
    proc = target("writer", n)
    with hwbkpt.Client(socket=d.socket, name="reads-late", timeout=TIMEOUT) as c:
        w = c.watch(proc.pid, info_int(proc, "addr"), mode="notify")
        assert w.state == "installed"
        proc.go()
        assert proc.line(60) == f"done var={n} pair0=0"
        assert proc.wait(60) == 0
        # Only now does the client read: everything was queued (or dropped) meanwhile.
        hits = lost = 0
        lost_events = 0
        exit_event = None
        while exit_event is None:
            ev = c.next_event(timeout=TIMEOUT)
            assert ev is not None, f"no exit event: {hits} hits, {lost} lost of {n}"
            if ev.kind == "hit":
                hits += 1
            elif ev.kind == "lost":
                lost += ev.count
                lost_events += 1
            elif ev.kind == "exit":
                exit_event = ev
        print(f"FIGURE late_reader_hits_lost={hits}+{lost} of {n} ({lost_events} lost events)")
        assert (exit_event.pid, exit_event.code, exit_event.signal) == (proc.pid, 0, None)
        assert lost > 0, "the queue never filled: the test did not test anything"
        assert hits + lost == n
        # Still connected: the client and its (ended) watch are there.
        me = next(cl for cl in c.status()["clients"] if cl["name"] == "reads-late")
        assert me["events_dropped"] > 0
        assert "disconnecting" not in d.stderr()
