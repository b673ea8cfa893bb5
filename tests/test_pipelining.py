"""The request path under load (issue 13): many requests in one read, replies in order per
connection, a client that does not read its replies blocking nobody else, and the trio
client writing and reading its socket directly.

A real daemon over a real Unix socket; raw sockets are made through a fixture that closes
them, whatever happens.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import trio

import hwbkpt
from hwbkpt_proto import PROTOCOL_VERSION
from tests._daemon import Daemon

pytestmark = pytest.mark.timeout(90)

#: Absolute limit for any one wait of these tests.
LIMIT = 30.0


class Raw:
    """A hand-made client: packs requests itself, reads whatever comes back."""

    def __init__(self, path: str, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(LIMIT)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    @staticmethod
    def request(msgid: int, method: str, params: dict[str, Any] | None = None) -> bytes:
        return bytes(msgpack.packb([0, msgid, method, [params] if params else []]))

    def hello(self) -> None:
        self.sock.sendall(self.request(0, "hello", {"version": PROTOCOL_VERSION}))
        (reply,) = self.messages(1)
        assert reply[:3] == [1, 0, None], reply

    def messages(self, n: int) -> list[Any]:
        """The next ``n`` messages (responses and events), within :data:`LIMIT` seconds."""
        got: list[Any] = []
        deadline = time.monotonic() + LIMIT
        while len(got) < n:
            got.extend(self.unpacker)
            if len(got) >= n:
                break
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(1 << 20)
            assert data, f"the daemon hung up after {len(got)} of {n} messages"
            assert time.monotonic() < deadline, f"only {len(got)} of {n} messages arrived"
            self.unpacker.feed(data)
        assert len(got) == n, got[n:]
        return got

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw(daemon: Daemon) -> Iterator[Callable[..., Raw]]:
    """``raw(rcvbuf=None)``: a connected :class:`Raw`; all are closed at teardown."""
    made: list[Raw] = []

    def make(rcvbuf: int | None = None) -> Raw:
        made.append(Raw(daemon.socket, rcvbuf))
        return made[-1]

    try:
        yield make
    finally:
        for r in made:
            r.close()


def _mixed_batch(n: int) -> tuple[bytes, list[tuple[int, Any]]]:
    """``n`` requests (pings with their index, every seventh an unknown method, every
    eleventh preceded by a notification, which is never answered) and the answers they
    must get, in order: ``(msgid, data)`` or ``(msgid, error code)``."""
    out = bytearray()
    want: list[tuple[int, Any]] = []
    for i in range(1, n + 1):
        if i % 11 == 0:
            out += msgpack.packb([2, "ping", [{"data": -i}]])
        if i % 7 == 0:
            out += Raw.request(i, "no_such_method")
            want.append((i, "ENOENT"))
        else:
            out += Raw.request(i, "ping", {"data": [i, "x" * (i % 5)]})
            want.append((i, [i, "x" * (i % 5)]))
    return bytes(out), want


def _answers(messages: list[Any]) -> list[tuple[int, Any]]:
    assert all(m[0] == 1 for m in messages), [m for m in messages if m[0] != 1]
    return [(m[1], m[3] if m[2] is None else m[2][0]) for m in messages]


def test_many_requests_in_one_write_are_answered_in_order(raw: Callable[..., Raw]) -> None:
    """A few hundred requests sent at once (read by the daemon in one or a few reads):
    every one answered, errors in their place, in the order sent."""
    c = raw()
    c.hello()
    data, want = _mixed_batch(300)
    assert len(data) < 65536  # one read of the daemon's, if the kernel delivers it so
    c.sock.sendall(data)
    assert _answers(c.messages(len(want))) == want


def test_more_than_one_read_of_requests_in_order(raw: Callable[..., Raw]) -> None:
    """Requests filling several of the daemon's 64 KiB reads, the last message cut by a
    read's end: still all answered, in order."""
    c = raw()
    c.hello()
    data, want = _mixed_batch(15000)
    assert len(data) > 3 * 65536
    c.sock.sendall(data)
    assert _answers(c.messages(len(want))) == want


def test_requests_dribbled_byte_by_byte(raw: Callable[..., Raw]) -> None:
    """Each read of the daemon's is short (it takes all there is and then waits): a request
    that arrives in pieces is answered once whole, and the next one after it."""
    c = raw()
    c.hello()
    data, want = _mixed_batch(12)
    for i in range(len(data)):
        c.sock.send(data[i : i + 1])
    assert _answers(c.messages(len(want))) == want


def test_a_client_that_does_not_read_blocks_nobody(raw: Callable[..., Raw]) -> None:
    """One client sends requests with large answers and reads none of them: its socket
    fills and its answers wait in the daemon. Another client is served all the while, and
    the first still gets every answer, in order, once it reads."""
    slow = raw(rcvbuf=4096)
    slow.hello()
    blob = "y" * 60_000
    n = 60  # ~3.6 MB of answers: far more than both socket buffers hold
    slow.sock.sendall(
        b"".join(Raw.request(i, "ping", {"data": [i, blob]}) for i in range(1, n + 1))
    )
    fast = raw()
    fast.hello()
    for i in range(1, 201):
        fast.sock.sendall(Raw.request(i, "ping", {"data": i}))
        assert _answers(fast.messages(1)) == [(i, i)]
    got = slow.messages(n)
    assert [(m[1], m[3][0]) for m in got] == [(i, i) for i in range(1, n + 1)]
    assert all(m[3][1] == blob for m in got)


async def test_trio_client_large_concurrent_calls_do_not_interleave(daemon: Daemon) -> None:
    """Calls whose request is larger than the socket takes at once (the trio client then
    waits for room, holding its send lock) from several tasks on one connection: no bytes
    of one request come between those of another, and each gets its own answer."""
    payloads = {i: bytes([i]) * (1 << 20) for i in range(1, 6)}
    results: dict[int, Any] = {}
    with trio.fail_after(LIMIT):
        async with hwbkpt.AsyncClient(daemon.socket) as c:

            async def one(i: int) -> None:
                results[i] = await c.call("ping", data=payloads[i])

            async def small(i: int) -> None:
                results[100 + i] = await c.call("ping", data=i)

            async with trio.open_nursery() as nursery:
                for i in payloads:
                    nursery.start_soon(one, i)
                    nursery.start_soon(small, i)
    assert results == {**payloads, **{100 + i: i for i in payloads}}


async def test_trio_client_call_in_a_cancelled_scope_is_not_sent(daemon: Daemon) -> None:
    """A call made where trio has cancelled already raises Cancelled before anything is
    sent; the connection stays usable, and a call after it gets its own answer."""
    with trio.fail_after(LIMIT):
        async with hwbkpt.AsyncClient(daemon.socket) as c:
            before = (await c.status())["counters"]["requests"]
            with trio.CancelScope() as scope:
                scope.cancel()
                await c.call("ping", data="never")
            assert scope.cancelled_caught
            assert await c.call("ping", data="after") == "after"
            # status itself and the ping: the cancelled call never reached the daemon.
            assert (await c.status())["counters"]["requests"] == before + 2


async def test_trio_client_yields_even_when_nothing_waits(daemon: Daemon) -> None:
    """Every call is a trio checkpoint: a task looping over calls lets others run."""
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    with trio.fail_after(LIMIT):
        async with hwbkpt.AsyncClient(daemon.socket) as c, trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            start = ticks
            for i in range(20):
                # A notification: nothing to wait for (a ping's answer is not sent).
                await c._send_only(c._session.notification("ping", {"data": i}))
            assert ticks >= start + 10
            assert await c.call("ping", data="after") == "after"
            nursery.cancel_scope.cancel()
