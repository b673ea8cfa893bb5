"""The client library: the sans-I/O session, and both clients against an in-process server.

The in-process tests run :func:`hwbkptd._server.serve` in the test's own trio loop with a
scripted backend, so they can make the daemon push events, fail, or crash on demand.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import hwbkpt
from hwbkpt._session import Session
from hwbkpt_proto import Connection, NotFoundError, Notification, Request, Response, encode
from hwbkptd._config import Config
from hwbkptd._server import ClientHandle, Server, serve

pytestmark = pytest.mark.timeout(30)

# -- the session, without I/O ---------------------------------------------------------------


def _daemon_bytes(*messages: Any) -> bytes:
    return b"".join(encode(m) for m in messages)


def test_session_matches_responses_and_queues_events_in_order() -> None:
    s = Session()
    m1, data = s.request("a", {"x": 1})
    m2, _ = s.request("b", {})
    assert m1 != m2
    probe = Connection()
    probe.receive_data(data)
    assert probe.next_message() == Request(m1, "a", {"x": 1})
    s.receive_data(
        _daemon_bytes(
            Notification("hit", {"n": 1}),
            Response(m2, None, "two"),
            Notification("hit", {"n": 2}),
            Response(m1, ("ESRCH", "no such process 99"), None),
        )
    )
    assert s.take_result(m2) == "two"
    with pytest.raises(hwbkpt.NoSuchProcessError, match="no such process 99"):
        s.take_result(m1)
    events = [s.next_event(), s.next_event(), s.next_event()]
    assert [e.n if e else None for e in events] == [1, 2, None]


def test_session_fed_byte_by_byte() -> None:
    s = Session()
    msgid, _ = s.request("x", {})
    for b in _daemon_bytes(Notification("stop", {"tid": 5}), Response(msgid, None, [1, 2])):
        assert not s.has_result(msgid)
        s.receive_data(bytes([b]))
    assert s.take_result(msgid) == [1, 2]
    event = s.next_event()
    assert event is not None
    assert event.kind == "stop"
    assert event.tid == 5
    assert event.fields == {"tid": 5}
    with pytest.raises(AttributeError, match="no field 'ip'"):
        _ = event.ip


def test_session_drops_abandoned_answers() -> None:
    s = Session()
    msgid, _ = s.request("slow", {})
    s.abandon(msgid)
    s.receive_data(_daemon_bytes(Response(msgid, None, 1)))
    assert not s.has_result(msgid)


def test_session_connection_lost_fails_waiting_and_later_calls() -> None:
    s = Session()
    msgid, _ = s.request("x", {})
    s.receive_data(_daemon_bytes(Notification("disconnected", {"reason": "too slow"})))
    s.receive_data(b"")
    with pytest.raises(hwbkpt.ConnectionLostError, match="too slow"):
        s.take_result(msgid)
    with pytest.raises(hwbkpt.ConnectionLostError):
        s.request("y", {})
    # Events that arrived before the loss are still delivered.
    event = s.next_event()
    assert event is not None
    assert event.kind == "disconnected"


def test_session_garbage_from_daemon_ends_session() -> None:
    s = Session()
    msgid, _ = s.request("x", {})
    s.receive_data(b"\xc1")
    with pytest.raises(hwbkpt.ConnectionLostError, match="cannot read"):
        s.take_result(msgid)


def test_watch_state_follows_events() -> None:
    s = Session()
    w = hwbkpt.WatchInfo(
        {"id": 3, "state": "pending", "threads": {10: "pending"}},
        pid=10, addr=0x1000, length=8, access="w", mode="count", tid=None, priority=0,
    )
    s.track_watch(w)
    s.receive_data(_daemon_bytes(Notification("installed", {"watch": 3, "tid": 10})))
    assert w.state == "installed"
    assert w.threads == {10: "installed"}
    s.receive_data(
        _daemon_bytes(Notification("uninstalled", {"watch": 3, "tid": 10, "reason": "preempted"}))
    )
    assert (w.state, w.reason) == ("pending", "preempted")
    s.receive_data(_daemon_bytes(Notification("installed", {"watch": 4})))  # someone else's
    assert w.state == "pending"
    assert "0x1000" in repr(w)
    s.receive_data(_daemon_bytes(Notification("exit", {"pid": 10, "tid": 10, "code": 0})))
    assert w.state == "ended"


# -- against an in-process server with a scripted backend -----------------------------------


class ScriptedBackend:
    """Methods: ``emit`` (push events), ``boom`` (crash), ``watch``/``count``/``unwatch``."""

    capabilities = ["scripted"]

    def __init__(self) -> None:
        self.connected: list[int] = []
        self.disconnected: list[int] = []
        self.changed = trio.Event()  # set (and replaced) at every disconnect
        self.shut_down = False
        self.counts: dict[int, int] = {}

    def client_connected(self, client: ClientHandle) -> None:
        self.connected.append(client.id)

    def client_disconnected(self, client: ClientHandle) -> None:
        self.disconnected.append(client.id)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for_disconnects(self, client_ids: list[int]) -> None:
        while not set(client_ids) <= set(self.disconnected):
            await self.changed.wait()

    def call(self, client: ClientHandle, method: str, params: dict[str, Any]) -> Any:
        if method == "emit":
            # As the engine backend does for what one wake-up produces: cork, queue, uncork.
            sent = 0
            client.cork()
            try:
                for i in range(params.get("n", 1)):
                    fields = {"i": i, **params.get("fields", {})}
                    ok = client.send_event(
                        params.get("kind", "hit"), fields, droppable=params.get("droppable", True)
                    )
                    sent += ok
            finally:
                client.uncork()
            return sent
        if method == "boom":
            raise RuntimeError("scripted crash")
        if method == "watch":
            wid = len(self.counts) + 1
            self.counts[wid] = 0
            # Events sent before the answer are older than it: the answer's state wins.
            client.send_event("uninstalled", {"watch": wid, "reason": "busy"}, droppable=False)
            return {"id": wid, "state": "pending", "threads": {}}
        if method == "count":
            return self.counts[params["id"]]
        if method == "unwatch":
            del self.counts[params["id"]]
            return None
        raise NotFoundError(f"unknown method {method!r}")

    def status(self) -> dict[str, Any]:
        return {
            "targets": [],
            "counters": {"hits": 7},
            "clients": {cid: {"watches": len(self.counts)} for cid in self.connected},
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def shutdown(self) -> None:
        self.shut_down = True


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, ScriptedBackend, Server]]:
    tmp = Path(tempfile.mkdtemp(prefix="hwbkpt-client-"))
    path = str(tmp / "s.sock")
    backend = ScriptedBackend()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, Config(socket_path=path, max_queued_events=5), backend)
        yield path, backend, server
        nursery.cancel_scope.cancel()


async def test_events_before_response_arrive_in_order(served: Any) -> None:
    path, _, _ = served
    with trio.fail_after(10):
        async with hwbkpt.AsyncClient(path) as c:
            assert c.server_info["capabilities"] == ["scripted"]
            assert await c.call("emit", n=3) == 3
            got = [await c.next_event() for _ in range(3)]
            assert [(e.kind, e.i) for e in got] == [("hit", 0), ("hit", 1), ("hit", 2)]


async def test_blocking_client_queues_events_seen_while_calling(served: Any) -> None:
    path, _, _ = served

    def use() -> list[Any]:
        with hwbkpt.Client(path, timeout=10) as c:
            assert c.call("emit", n=2, kind="stop", fields={"tid": 9}) == 2
            first = c.next_event(timeout=5)
            second = c.next_event(timeout=5)
            assert c.next_event(timeout=0.05) is None
            return [first, second]

    with trio.fail_after(20):
        events = await trio.to_thread.run_sync(use)
    assert [(e.kind, e.i, e.tid) for e in events] == [("stop", 0, 9), ("stop", 1, 9)]


async def test_dropped_hits_are_reported_as_lost(served: Any) -> None:
    path, _, server = served
    with trio.fail_after(10):
        async with hwbkpt.AsyncClient(path) as c:
            # All 20 are queued in one go, before the writer runs: 5 fit (max_queued_events).
            assert await c.call("emit", n=20) == 5
            assert await c.call("emit", n=1, fields={"late": True}) == 1
            kinds = [await c.next_event() for _ in range(7)]
            assert [e.kind for e in kinds[:5]] == ["hit"] * 5
            assert (kinds[5].kind, kinds[5].count, kinds[5].what) == ("lost", 15, "hit")
            assert kinds[6].late is True
            status = await c.status()
    assert status["counters"]["events_dropped"] == 15
    assert server.counters.events_dropped == 15


async def test_undroppable_event_on_full_queue_disconnects(served: Any) -> None:
    path, backend, _ = served
    with trio.fail_after(10):
        async with hwbkpt.AsyncClient(path) as c:
            with pytest.raises(hwbkpt.ConnectionLostError, match="cannot be dropped"):
                await c.call("emit", n=10, kind="stop", droppable=False)
        # Released exactly once.
        await backend.wait_for_disconnects([c.server_info["client_id"]])
    assert backend.disconnected.count(c.server_info["client_id"]) == 1


async def test_backend_crash_is_internal_error_and_daemon_stays(served: Any) -> None:
    path, _, _ = served
    with trio.fail_after(10):
        async with hwbkpt.AsyncClient(path) as c:
            with pytest.raises(hwbkpt.InternalError, match="RuntimeError: scripted crash"):
                await c.call("boom")
            with pytest.raises(hwbkpt.NotFoundError):
                await c.call("nothing")
            status = await c.status()
    assert status["counters"]["hits"] == 7
    assert status["counters"]["errors"] == 2
    (me,) = status["clients"]
    assert me["watches"] == 0


async def test_watch_wrappers(served: Any) -> None:
    path, _, _ = served
    with trio.fail_after(10):
        async with hwbkpt.AsyncClient(path) as c:
            w = await c.watch(1234, 0x4000, length=4, access="rw", mode="notify")
            assert (w.id, w.pid, w.addr, w.length, w.access, w.mode) == (
                1, 1234, 0x4000, 4, "rw", "notify"
            )
            assert w.state == "pending"
            assert (await c.next_event()).kind == "uninstalled"
            await c.call("emit", kind="installed", fields={"watch": w.id, "tid": 1235})
            event = await c.next_event()
            assert event.kind == "installed"
            assert w.state == "installed"  # updated as the event was read
            assert w.threads == {1235: "installed"}
            assert await w.count() == 0
            await w.remove()
            assert w.state == "removed"


async def test_blocking_watch_wrappers(served: Any) -> None:
    path, _, _ = served

    def use() -> tuple[str, int]:
        with hwbkpt.Client(path) as c:
            w = c.watch(77, 0x1000)
            c.next_event(timeout=5)
            count = w.count()
            w.remove()
            return w.state, count

    with trio.fail_after(20):
        assert await trio.to_thread.run_sync(use) == ("removed", 0)


async def test_client_disconnected_called_once_per_client(served: Any) -> None:
    path, backend, _ = served
    with trio.fail_after(10):
        for _ in range(3):
            async with hwbkpt.AsyncClient(path) as c:
                await c.status()
        await backend.wait_for_disconnects(backend.connected)
    assert sorted(backend.disconnected) == sorted(backend.connected)
    assert len(set(backend.disconnected)) == len(backend.disconnected)


async def test_raw_request_object_roundtrip(served: Any) -> None:
    """A hand-built request through the protocol package reaches the backend."""
    path, _, _ = served
    with trio.fail_after(10):
        stream = await trio.open_unix_socket(path)
        conn = Connection()
        async with stream:
            await stream.send_all(conn.send(Request(1, "hello", {"version": 1, "name": "r"})))
            await stream.send_all(conn.send(Request(2, "emit", {"n": 1})))
            seen: list[Any] = []
            while len([m for m in seen if isinstance(m, Response)]) < 2:
                conn.receive_data(await stream.receive_some(65536))
                while (m := conn.next_message()) is not None:
                    seen.append(m)
    assert [type(m).__name__ for m in seen] == ["Response", "Notification", "Response"]
