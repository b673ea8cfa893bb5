"""Connection.take_request, the daemon's one-piece decoder of a request (issue 13): for the
same bytes it gives the :class:`Request` the general path gives, and for anything else
``None`` with nothing consumed, after which the general path gives what it always gave —
the same message or the same :class:`ProtocolError`. Then the server: requests answered
through it over a real socket, and reads it must leave alone answered in order.
"""

from __future__ import annotations

import socket
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from hwbkpt_proto import (
    MAX_MSGID,
    PROTOCOL_VERSION,
    Connection,
    Limits,
    Message,
    NotFoundError,
    ProtocolError,
    Request,
    encode,
)
from hwbkptd._config import Config
from hwbkptd._server import ClientHandle, Server, serve
from tests._daemon import Daemon

pytestmark = pytest.mark.timeout(90)

#: Absolute limit of any one wait on a socket in these tests.
LIMIT = 30.0


def _general(data: bytes, limits: Limits | None = None) -> tuple[str, Any]:
    """What the general path makes of ``data`` fed whole: its first message, the error it
    raises, or that it needs more bytes."""
    conn = Connection(limits or Limits())
    try:
        conn.receive_data(data)
        msg = conn.next_message()
    except ProtocolError as err:
        return ("error", str(err))
    return ("nothing", None) if msg is None else ("message", msg)


def _fast(data: bytes, limits: Limits | None = None) -> tuple[str, Any, bool]:
    """What a connection that tries take_request first makes of ``data``, and whether
    take_request took it. When it does not, the same connection must go on as if it had
    never been asked (nothing consumed)."""
    conn = Connection(limits or Limits())
    request = conn.take_request(data)
    if request is not None:
        assert conn.idle
        assert conn.next_message() is None
        return ("message", request, True)
    assert conn.idle
    try:
        conn.receive_data(data)
        msg = conn.next_message()
    except ProtocolError as err:
        return ("error", str(err), False)
    return ("nothing", None, False) if msg is None else ("message", msg, False)


def _same(data: bytes, limits: Limits | None = None) -> bool:
    """Assert both paths agree on ``data`` (also the exact types of what they built);
    whether the fast one took it."""
    kind, value, took = _fast(data, limits)
    assert (kind, value) == _general(data, limits)
    if kind == "message":
        general = _general(data, limits)[1]
        assert type(value) is type(general)
        if took:
            assert type(value) is Request
            assert type(value.params) is dict
    return took


def _request(msgid: int, method: str, params: Any) -> bytes:
    return bytes(msgpack.packb([0, msgid, method, params], use_bin_type=True))


# -- requests it takes ------------------------------------------------------------------------

# One of each shape the methods of PROTOCOL.md section 6 take.
GOOD: list[tuple[str, dict[str, Any]]] = [
    ("hello", {"version": PROTOCOL_VERSION, "name": "gdb"}),
    ("status", {}),
    ("ping", {}),
    ("ping", {"data": b"\x00\xff" * 30}),
    ("watch", {"pid": 4321, "addr": 0x5555_5555_8010, "length": 8, "access": "w",
               "mode": "count", "priority": 0, "tid": 4322}),
    ("watch", {"pid": 1, "addr": 8, "length": 4, "access": "rw", "mode": "stop",
               "condition": "new >= 19990 and tid == 812"}),
    ("watch_region", {"pid": 1, "addr": 0x1001, "size": 13, "access": "w", "mode": "notify"}),
    ("unwatch", {"id": 7}),
    ("count", {"id": 2**32}),
    ("resume", {"tid": 5, "signal": None}),
    ("attach", {"pid": 9, "hold_threads": True}),
    ("signals", {"pid": 9, "report": False, "pass": [10, 12, 17]}),
    ("set_regs", {"tid": 5, "regs": {"rip": 2**64 - 1, "rax": 0}}),
    ("write_memory", {"pid": 9, "addr": 0x1000, "data": b"\xcc" * 100}),
    ("poke_dr", {"tid": 5, "n": 7, "value": 0x0D0001}),
    ("x", {"float": 1.5, "neg": -(2**63), "empty": [], "map": {}, "nil": None}),
    ("x", {"nested": {"a": [1, [2, [3, {"k": "v"}]]], 7: "int key", b"b": b"bytes key"}}),
    ("é" * 30, {"text": "ünïcode" * 20}),
]


@pytest.mark.parametrize(("method", "params"), GOOD)
@pytest.mark.parametrize("msgid", [0, 1, 127, 128, 65536, MAX_MSGID])
def test_a_request_is_taken_as_the_general_path_decodes_it(
    method: str, params: dict[str, Any], msgid: int
) -> None:
    data = encode(Request(msgid, method, params))
    assert _same(data)
    _, request, _ = _fast(data)
    assert request == Request(msgid, method, params)


def test_empty_params_as_an_empty_map_too() -> None:
    # [] and [{}] are the same request; either way a new map each time.
    for data in (_request(3, "status", []), _request(3, "status", [{}])):
        assert _same(data)
    conn = Connection()
    a, b = conn.take_request(_request(3, "status", [])), conn.take_request(
        _request(3, "status", [])
    )
    assert a is not None
    assert b is not None
    assert a.params is not b.params


def test_a_longer_encoding_of_a_value_inside_is_taken_the_same() -> None:
    # msgid 1 as a uint 8 and a uint 32, params as an array 16: the same request.
    for data in (
        b"\x94\x00\xcc\x01\xa4ping\x90",
        b"\x94\x00\xce\x00\x00\x00\x01\xa4ping\xdc\x00\x00",
    ):
        assert _same(data)
        assert Connection().take_request(data) == Request(1, "ping", {})


def test_a_connection_takes_request_after_request_and_then_the_general_path_resumes() -> None:
    conn = Connection()
    for i in range(5):
        assert conn.take_request(_request(i, "ping", [{"data": i}])) == Request(
            i, "ping", {"data": i}
        )
    conn.receive_data(_request(9, "ping", []) + _request(10, "count", [{"id": 1}]))
    assert conn.next_message() == Request(9, "ping", {})
    assert conn.next_message() == Request(10, "count", {"id": 1})
    assert conn.next_message() is None
    assert conn.take_request(_request(11, "ping", [])) == Request(11, "ping", {})


# -- anything else: the general path's message or error -------------------------------------

WATCH = encode(Request(1, "watch", {"pid": 1, "addr": 8, "access": "w", "mode": "count"}))

LEFT: list[bytes] = [
    b"",
    WATCH[:-1],  # not whole
    WATCH[:1],
    WATCH + WATCH,  # two requests in one read
    WATCH + encode(Request(2, "ping", {}))[:3],  # and a piece of the next
    msgpack.packb([2, "resume", [{"tid": 5}]]),  # a notification
    msgpack.packb([2, "resume", [5]]),
    msgpack.packb([1, 1, None, {"id": 3}]),  # a response
    msgpack.packb([1, 1, ["ENOENT", "no such watch"], None]),
    b"\xdc\x00\x04\x00\x01\xa4ping\x90",  # a request in an array 16: the general path's
    b"\x94\xcc\x00\x01\xa4ping\x90",  # msgpack's uint 8 for the type
    b"\x95\x00\x01\xa4ping\x90\xc0",  # five elements
    b"\x93\x00\x01\xa4ping",  # three
    b"\x94\x00\xc3\xa4ping\x90",  # msgid true
    _request(-1, "ping", []),
    _request(2**32, "ping", []),
    _request(2**64 - 1, "ping", []),
    msgpack.packb([0, 1.0, "ping", []]),
    msgpack.packb([0, None, "ping", []]),
    _request(1, "", []),
    msgpack.packb([0, 1, b"ping", []], use_bin_type=True),  # a bin method
    msgpack.packb([0, 1, 7, []]),
    msgpack.packb([0, 1, None, []]),
    _request(1, "ping", None),
    _request(1, "ping", {"data": 1}),  # a map where the array belongs
    _request(1, "ping", [1]),
    _request(1, "ping", ["data"]),
    _request(1, "ping", [{"a": 1}, {"b": 2}]),
    _request(1, "ping", [[{"a": 1}]]),
    _request(1, "ping", [{1: "int name"}]),
    _request(1, "ping", [{b"bin name": 1}]),
    msgpack.packb([0, 1, "ping", [{None: 1}]]),
    msgpack.packb([0, 1, "ping", [{"x": {True: 1}}]]),  # a bool key deeper down
    msgpack.packb([0, 1, "ping", [{"x": {1.5: 1}}]]),
    msgpack.packb([0, 1, "ping", [{"x": {(1, 2): 1}}]]),  # an array key: unhashable
    _request(1, "ping", [{"x": msgpack.ExtType(5, b"x")}]),  # ext values
    _request(1, "ping", [{"x": [msgpack.Timestamp(5, 0)]}]),  # a timestamp
    _request(1, "ping", [{"x": {"y": msgpack.Timestamp(1, 0)}}]),
    msgpack.packb([0, 1, msgpack.ExtType(1, b"m"), []]),
    b"\x94\x00\x01\xa4ping\x91\x81\xa1x\xd6\xff\x00",  # a timestamp whose data is cut
    b"\x94\x00\x01\xa4pi\xffg\x90",  # not UTF-8
    b"\x94\x00\x01\xa4ping\x91\x81\xa1x\xc1",  # not msgpack
    b"\x94\x00\x01\xa4ping" + b"\x91" * 2000 + b"\xc0",  # deeper than the decoder's stack
    _request(1, "ping", [{"data": "x" * 5000}]),  # over the one-piece size
    b"\x94\x00",
]


@pytest.mark.parametrize("data", LEFT)
def test_anything_else_is_left_to_the_general_path(data: bytes) -> None:
    assert not _same(data)


def test_nesting_up_to_the_depth_limit_and_beyond() -> None:
    # The message's array and the params array are 2 of max_depth; the map is the 3rd.
    limits = Limits(max_depth=5)
    fine = _request(1, "x", [{"a": [{"b": 1}]}])
    assert _same(fine, limits)
    too_deep = _request(1, "x", [{"a": [{"b": [1]}]}])
    assert not _same(too_deep, limits)
    kind, error, _ = _fast(too_deep, limits)
    assert kind == "error"
    assert "nested more than 5" in error


@pytest.mark.parametrize("max_depth", [1, 2, 3])
def test_tiny_depth_limits(max_depth: int) -> None:
    limits = Limits(max_depth=max_depth)
    for data in (_request(1, "x", []), _request(1, "x", [{}]), _request(1, "x", [{"a": 1}])):
        _same(data, limits)
    # [0, 1, "x", []] is 2 deep: taken only when that is allowed; [{...}] needs 3.
    assert (Connection(limits).take_request(_request(1, "x", [])) is not None) == (
        max_depth >= 2
    )
    assert (Connection(limits).take_request(_request(1, "x", [{"a": 1}])) is not None) == (
        max_depth >= 3
    )


def test_deeper_than_the_fast_walk_goes_the_general_way() -> None:
    nested: Any = 1
    for _ in range(20):
        nested = [nested]
    data = _request(1, "x", [{"n": nested}])  # 23 deep: within the default 32
    assert not _same(data)
    assert _general(data)[0] == "message"


@pytest.mark.parametrize(
    "limits",
    [
        Limits(max_message_size=40),
        Limits(max_container_len=3),
        Limits(max_str_len=4),
        Limits(max_bin_len=4),
    ],
)
def test_small_limits_hold_on_both_paths(limits: Limits) -> None:
    for data in (
        _request(1, "ping", [{"data": b"12345"}]),
        _request(1, "ping", [{"data": "12345"}]),
        _request(1, "ping", [{"data": [1, 2, 3, 4]}]),
        _request(1, "ping", [{"a": [], "b": [], "c": {}, "d": []}]),
        _request(1, "ping", [{"data": "x" * 40}]),
        _request(1, "ping", []),
        _request(1, "pi", [{"d": 1}]),
    ):
        _same(data, limits)
    # What the one-piece size allows: nothing over the smallest limit.
    assert Connection(limits).one_piece_max == min(
        4096,
        limits.max_message_size,
        limits.max_container_len,
        limits.max_str_len,
        limits.max_bin_len,
    )


def test_a_request_split_across_two_reads_takes_the_general_path() -> None:
    conn = Connection()
    assert conn.take_request(WATCH[:5]) is None
    conn.receive_data(WATCH[:5])
    assert conn.next_message() is None
    # The rest of it is not a request by itself, and the connection is not idle.
    assert not conn.idle
    assert conn.take_request(WATCH[5:]) is None
    conn.receive_data(WATCH[5:])
    assert conn.next_message() == _general(WATCH)[1]
    # A whole request now: the connection is idle again.
    assert conn.take_request(WATCH) == _general(WATCH)[1]


def test_a_whole_request_after_a_partial_one_is_not_taken() -> None:
    conn = Connection()
    conn.receive_data(WATCH[:3])
    assert conn.take_request(WATCH) is None


def test_a_failed_connection_takes_nothing() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError, match="not msgpack"):
        conn.receive_data(b"\xc1")
    assert conn.take_request(WATCH) is None
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive_data(WATCH)


_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=12) | st.binary(max_size=12)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5) | st.binary(max_size=3),
                      inner, max_size=4),
    max_leaves=20,
)
_limits = st.builds(
    Limits,
    max_message_size=st.integers(1, 5000),
    max_container_len=st.integers(1, 40),
    max_str_len=st.integers(1, 40),
    max_bin_len=st.integers(1, 40),
    max_depth=st.integers(1, 8),
)


@settings(max_examples=400, deadline=None)
@given(
    st.integers(-2, 2**32 + 1) | st.sampled_from([None, True, 1.0, "1"]),
    st.text(max_size=8) | st.binary(max_size=3) | st.integers(0, 2),
    st.none() | st.lists(st.dictionaries(st.text(max_size=6), _values, max_size=5), max_size=2)
    | st.lists(_values, max_size=2) | _values,
    st.none() | _limits,
)
def test_any_request_shaped_value_gives_what_the_general_path_gives(
    msgid: Any, method: Any, params: Any, limits: Limits | None
) -> None:
    _same(msgpack.packb([0, msgid, method, params], use_bin_type=True), limits)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64), st.none() | _limits)
def test_any_bytes_after_a_request_head_give_what_the_general_path_gives(
    tail: bytes, limits: Limits | None
) -> None:
    _same(b"\x94\x00" + tail, limits)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_cut_or_doubled_request_gives_what_the_general_path_gives(data: st.DataObject) -> None:
    method, params = data.draw(st.sampled_from(GOOD))
    whole = encode(Request(data.draw(st.integers(0, MAX_MSGID)), method, params))
    cut = data.draw(st.integers(0, len(whole)))
    _same(whole[:cut])
    _same(whole + whole[:cut])


# -- the server ---------------------------------------------------------------------------------


class _Backend:
    """The least a server needs: ``echo`` answers its params, anything else is unknown."""

    capabilities: list[str] = []

    def client_connected(self, client: ClientHandle) -> None:
        pass

    def client_disconnected(self, client: ClientHandle) -> None:
        pass

    def call(self, client: ClientHandle, method: str, params: dict[str, Any]) -> Any:
        if method == "echo":
            return params
        raise NotFoundError(f"unknown method {method!r}")

    def status(self) -> dict[str, Any]:
        return {"targets": [], "counters": {}, "clients": {}}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        await trio.sleep_forever()

    def shutdown(self) -> None:
        pass


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[Message]:
    """Every request :meth:`Connection.take_request` took in this test, in order."""
    got: list[Message] = []
    original = Connection.take_request

    def spy(self: Connection, data: bytes) -> Request | None:
        request = original(self, data)
        if request is not None:
            got.append(request)
        return request

    monkeypatch.setattr(Connection, "take_request", spy)
    return got


@pytest.fixture
async def served() -> AsyncIterator[str]:
    """An in-process server on a private socket, with :class:`_Backend`; its path."""
    tmp = Path(tempfile.mkdtemp(prefix="hwbkpt-takereq-"))
    path = str(tmp / "s.sock")
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Config(socket_path=path), _Backend())
        assert server.clients == {}
        yield path
        nursery.cancel_scope.cancel()


class _Raw:
    """A hand-made client over a trio socket: writes bytes, reads whole messages."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)

    async def messages(self, n: int) -> list[Any]:
        got: list[Any] = []
        while len(got) < n:
            got.extend(self.unpacker)
            if len(got) >= n:
                break
            data = await self.sock.recv(65536)
            assert data, f"the server hung up after {len(got)} of {n} messages"
            self.unpacker.feed(data)
        assert len(got) == n, got[n:]
        return got


async def _connect(path: str) -> _Raw:
    """A raw connection to the server at ``path``, through its ``hello`` (msgid 1)."""
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    await sock.connect(path)
    c = _Raw(sock)
    await c.sock.send(_request(1, "hello", [{"version": PROTOCOL_VERSION}]))
    (hello,) = await c.messages(1)
    assert hello[:3] == [1, 1, None]
    return c


async def test_the_server_answers_lone_requests_through_take_request(
    served: str, taken: list[Message]
) -> None:
    with trio.fail_after(LIMIT):
        c = await _connect(served)
        with c.sock:
            want: list[Any] = []
            for i in range(2, 40):
                # One request per write, each answer awaited: each read is one request.
                params = {"i": i, "pad": "x" * (i % 7), "m": {i: [b"\x00" * i]}}
                method = "echo" if i % 5 else "nope"
                await c.sock.send(_request(i, method, [params]))
                (answer,) = await c.messages(1)
                want.append(Request(i, method, params))
                if method == "echo":
                    assert answer == [1, i, None, params]
                else:
                    assert answer[:2] == [1, i]
                    assert answer[2][0] == "ENOENT"
            # A request the fast decoder leaves alone is refused as before, and hangs up.
            await c.sock.send(_request(40, "echo", [{"x": msgpack.ExtType(3, b"")}]))
            (refused,) = await c.messages(1)
            assert refused[0] == 2
            assert refused[1] == "disconnected"
            assert "ext" in refused[2][0]["reason"].lower()
            assert await c.sock.recv(100) == b""
    assert taken[0] == Request(1, "hello", {"version": PROTOCOL_VERSION})
    assert taken[1:] == want


async def test_reads_the_fast_path_leaves_are_answered_in_order(
    served: str, taken: list[Message]
) -> None:
    with trio.fail_after(LIMIT):
        c = await _connect(served)
        with c.sock:
            del taken[:]
            # Two requests in one write, a notification before a request, a response the
            # server ignores before one: all general, answered in order.
            await c.sock.send(
                _request(2, "echo", [{"n": 2}])
                + msgpack.packb([2, "echo", [{"n": "note"}]])
                + msgpack.packb([1, 99, None, "a stray answer"])
                + _request(3, "echo", [{"n": 3}])
            )
            assert await c.messages(2) == [[1, 2, None, {"n": 2}], [1, 3, None, {"n": 3}]]
            # A request in two writes: read in two pieces (neither is a request by itself)
            # or in one, it gets the same answer (Connection-level tests pin both cases).
            whole = _request(4, "echo", [{"n": 4, "pad": "y" * 50}])
            await c.sock.send(whole[:7])
            await c.sock.send(whole[7:])
            assert await c.messages(1) == [[1, 4, None, {"n": 4, "pad": "y" * 50}]]
            # Then a lone request is taken again.
            await c.sock.send(_request(5, "echo", [{"n": 5}]))
            assert await c.messages(1) == [[1, 5, None, {"n": 5}]]
    assert Request(2, "echo", {"n": 2}) not in taken
    assert Request(3, "echo", {"n": 3}) not in taken
    assert taken[-1] == Request(5, "echo", {"n": 5})


# -- the real daemon -------------------------------------------------------------------------


@pytest.fixture
def raw_socket(daemon: Daemon) -> Iterator[socket.socket]:
    """A raw socket connected to the daemon, closed at teardown."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(LIMIT)
        s.connect(daemon.socket)
        yield s
    finally:
        s.close()


def _read(s: socket.socket, unpacker: msgpack.Unpacker, n: int) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + LIMIT
    while len(got) < n:
        got.extend(unpacker)
        if len(got) >= n:
            break
        assert time.monotonic() < deadline, f"only {len(got)} of {n} messages arrived"
        data = s.recv(65536)
        assert data, f"the daemon hung up after {len(got)} of {n} messages"
        unpacker.feed(data)
    return got


def test_the_daemon_answers_lone_and_batched_requests_alike(raw_socket: socket.socket) -> None:
    s = raw_socket
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    s.sendall(_request(1, "hello", [{"version": PROTOCOL_VERSION, "name": "takereq"}]))
    (hello,) = _read(s, unpacker, 1)
    assert hello[:3] == [1, 1, None]
    lone = []
    for i in range(2, 30):
        s.sendall(_request(i, "ping", [{"data": [i, "x" * i, {"k": b"v"}]}]))
        lone.extend(_read(s, unpacker, 1))
    batch = b"".join(_request(i, "ping", [{"data": [i, "x" * i, {"k": b"v"}]}])
                     for i in range(2, 30))
    s.sendall(batch)
    batched = _read(s, unpacker, 28)
    assert lone == batched == [[1, i, None, [i, "x" * i, {"k": b"v"}]] for i in range(2, 30)]
    s.sendall(_request(30, "count", [{"id": 12345}]))
    (missing,) = _read(s, unpacker, 1)
    assert missing[:2] == [1, 30]
    assert missing[2][0] == "ENOENT"
    # A request either decoder refuses ends the connection with the general path's words.
    s.sendall(_request(31, "ping", [{"data": "x"}, {"data": "y"}]))
    (bye,) = _read(s, unpacker, 1)
    assert bye[:2] == [2, "disconnected"]
    assert bye[2][0]["code"] == "EPROTO"
    assert "nothing or one map" in bye[2][0]["reason"]
