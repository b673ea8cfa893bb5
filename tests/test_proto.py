"""The wire protocol: round trips fed whole, byte by byte and concatenated; limits; errors."""

from __future__ import annotations

import tracemalloc
from typing import Any

import msgpack
import pytest

import hwbkpt_proto
from hwbkpt_proto import (
    HwbkptError,
    Limits,
    Message,
    Notification,
    ProtocolError,
    Request,
    Response,
    encode,
    error_from_wire,
    response_for_error,
)
from hwbkpt_proto._connection import Connection

MESSAGES: list[Message] = [
    Request(0, "hello", {"version": 1, "name": "gdb"}),
    Request(2**32 - 1, "status", {}),
    Request(7, "write_memory", {"pid": 812, "addr": 0x7FFF_0000_1000, "data": b"\x00\xff" * 50}),
    Response(0, None, {"version": 1, "capabilities": ["watch", "vdr"], "client_id": 3}),
    Response(1, None, None),
    Response(2, None, {"threads": {812: "installed", 813: "pending"}, "neg": -(2**63)}),
    Response(3, ("EPERM", "you may not trace pid 1"), None),
    Response(4, None, [1.5, True, False, None, "", b"", [], {}, [[[{"deep": [b"x"]}]]]]),
    Notification("hit", {"watches": [1, 2], "tid": 812, "ip": 2**64 - 1, "time": 1.25}),
    Notification("exec", {}),
    Notification("stop", {"regs": {"rip": 0x401000, "rsp": 0x7FFC_0000_0000}, "dr6": 0xFFFF0FF1}),
]


def drain(conn: Connection) -> list[Message]:
    out: list[Message] = []
    while (message := conn.next_message()) is not None:
        out.append(message)
    return out


def receive(conn: Connection, data: bytes) -> list[Message]:
    """Feed ``data`` and drain: what a server does with each read."""
    conn.receive_data(data)
    return drain(conn)


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_round_trip_whole(message: Message) -> None:
    conn = Connection()
    conn.receive_data(conn.send(message))
    assert drain(conn) == [message]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_round_trip_byte_by_byte(message: Message) -> None:
    data = encode(message)
    conn = Connection()
    for i in range(len(data) - 1):
        conn.receive_data(data[i : i + 1])
        assert conn.next_message() is None
    conn.receive_data(data[-1:])
    assert drain(conn) == [message]


def test_many_concatenated_in_one_buffer() -> None:
    data = b"".join(encode(m) for m in MESSAGES * 50)
    conn = Connection()
    conn.receive_data(data)
    assert drain(conn) == MESSAGES * 50


def test_concatenated_without_draining_between_receives() -> None:
    conn = Connection()
    for m in MESSAGES:
        conn.receive_data(encode(m))
    assert drain(conn) == MESSAGES


def test_concatenated_total_larger_than_the_message_limit_is_fine() -> None:
    # The limit is per message, not per receive_data call.
    limits = Limits(max_message_size=200)
    conn = Connection(limits)
    message = Request(1, "read_memory", {"pid": 1, "addr": 4096, "size": 8})
    conn.receive_data(encode(message) * 100)
    assert drain(conn) == [message] * 100


def test_values_keep_their_types() -> None:
    params: dict[str, Any] = {"s": "ü", "b": b"\xc3\xbc", "i": -1, "big": 2**64 - 1, "f": 0.5}
    conn = Connection()
    conn.receive_data(encode(Request(1, "m", params)))
    message = conn.next_message()
    assert isinstance(message, Request)
    assert message.params == params
    assert type(message.params["s"]) is str
    assert type(message.params["b"]) is bytes


def test_empty_params_are_an_empty_array_on_the_wire() -> None:
    assert msgpack.unpackb(encode(Request(5, "status", {}))) == [0, 5, "status", []]
    assert msgpack.unpackb(encode(Notification("exec", {"pid": 3}))) == [2, "exec", [{"pid": 3}]]
    assert msgpack.unpackb(encode(Response(5, ("ENOENT", "no watch 9"), None))) == [
        1,
        5,
        ["ENOENT", "no watch 9"],
        None,
    ]


def test_params_array_with_an_empty_map_is_accepted() -> None:
    conn = Connection()
    conn.receive_data(msgpack.packb([0, 1, "status", [{}]]))
    assert conn.next_message() == Request(1, "status", {})


def test_need_more_data() -> None:
    conn = Connection()
    assert conn.next_message() is None
    conn.receive_data(b"")
    assert conn.next_message() is None


# -- malformed input ---------------------------------------------------------------------

BAD: list[tuple[object, str]] = [
    ({"a": 1}, "must be an array"),
    ([], "empty array"),
    ([7, 1, "m", []], "message type 7 is not 0"),
    ([True, 1, "m", []], "message type True"),
    (["0", 1, "m", []], "message type '0'"),
    ([0, 1, "m"], "request is [0, msgid, method, params] (4 elements), got 3"),
    ([2, "m", [], None], "notification is [2, method, params] (3 elements), got 4"),
    ([0, -1, "m", []], "msgid must be an unsigned integer below 2**32"),
    ([0, 2**32, "m", []], "msgid"),
    ([0, True, "m", []], "msgid"),
    ([0, 1.0, "m", []], "msgid"),
    ([0, 1, "", []], "method must be a non-empty string"),
    ([0, 1, b"m", []], "method must be a non-empty string"),
    ([0, 1, "m", {}], "must be an array holding nothing or one map"),
    ([0, 1, "m", [{}, {}]], "must be an array holding nothing or one map"),
    ([0, 1, "m", [1]], "must be a map of named values"),
    ([0, 1, "m", [{1: 2}]], "names must be strings"),
    ([1, 1, "EPERM", None], "must be nil or [code, message]"),
    ([1, 1, ["EPERM"], None], "must be nil or [code, message]"),
    ([1, 1, ["EPERM", 3], None], "two strings"),
    ([1, 1, ["EPERM", "no"], 5], "both an error and a result"),
    ([2, 5, []], "method must be a non-empty string"),
]


@pytest.mark.parametrize(("obj", "expected"), BAD, ids=repr)
def test_bad_shapes_are_refused_with_a_clear_message(obj: object, expected: str) -> None:
    conn = Connection()
    conn.receive_data(msgpack.packb(obj, use_bin_type=True))
    with pytest.raises(ProtocolError) as info:
        conn.next_message()
    assert expected in info.value.message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\xc1", "not msgpack"),
        (b"\x94\x00\x01\xa2\xff\xfe\x90", "not valid UTF-8"),
        (b"\x94\x00\x01\xa1m\x91\x81\x91\x01\x02", "cannot be a key"),
        (b"\x94\x00\x01\xa1m\x91\x81\xa1x\xd4\x05\x00", "ExtType"),
        (b"\x94\x00\x01\xa1m\x91\x81\xa1x\xd6\xff\x00\x00\x00\x01", "Timestamp"),
        (b"\x94\x00\x01\xa1m\x91\x81\xa1x\xd5\xff\x00\x00", "timestamp"),
        (b"\x94\x00\x01\xa1m\x91\x81\xa1x\x81\xc0\x01", "map keys must be"),
        (b"\x94\x00\x01\xa1m\x91\x81\xa1x\x92\x01\xd4\x05\x00", "ExtType"),  # in an array
        (b"\xd6\xff\x00\x00\x00\x01", "Timestamp"),  # the whole message
    ],
)
def test_malformed_bytes(data: bytes, expected: str) -> None:
    conn = Connection()
    with pytest.raises(ProtocolError) as info:
        receive(conn, data)
    assert expected in info.value.message


def test_msgpack_errors_are_kept_as_the_cause() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError) as info:
        conn.receive_data(b"\xc1")
    assert isinstance(info.value.__cause__, msgpack.FormatError)


def test_messages_before_a_bad_byte_are_still_delivered() -> None:
    good = Request(1, "status", {})
    conn = Connection()
    conn.receive_data(encode(good) + b"\xc1")
    assert conn.next_message() == good
    with pytest.raises(ProtocolError):
        conn.next_message()


def test_connection_is_dead_after_a_protocol_error_but_can_still_send() -> None:
    conn = Connection()
    conn.receive_data(msgpack.packb([9]))
    with pytest.raises(ProtocolError, match="message type 9"):
        conn.next_message()
    with pytest.raises(ProtocolError, match="already failed"):
        conn.next_message()
    with pytest.raises(ProtocolError, match="already failed"):
        conn.receive_data(encode(Request(1, "status", {})))
    reply = response_for_error(0, ProtocolError("message type 9 is not 0, 1 or 2"))
    assert conn.send(reply) == encode(reply)


# -- limits ------------------------------------------------------------------------------


def test_oversize_message_refused_early_without_buffering_it() -> None:
    # A request whose params claim a 1 GiB bin value, streamed in 64 KiB chunks.
    header = b"\x94\x00\x01\xa1m\x91\x81\xa1d\xc6\x40\x00\x00\x00"
    conn = Connection()
    received = 0

    def stream() -> None:
        nonlocal received
        conn.receive_data(header)
        for _ in range(2**30 // 65536):
            conn.receive_data(bytes(65536))
            received += 65536

    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match="exceeds the 4194304-byte limit"):
            stream()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert received <= 4 * 1024 * 1024  # refused at the limit, not at the end
    assert peak < 16 * 1024 * 1024  # far below 1 GiB


def test_oversize_message_refused_by_next_message_too() -> None:
    conn = Connection(Limits(max_message_size=100))
    data = encode(Request(1, "m", {"x": "y" * 200}))
    with pytest.raises(ProtocolError, match="100-byte limit"):
        conn.receive_data(data)


def test_message_exactly_at_the_size_limit_is_accepted() -> None:
    message = Request(1, "m", {"x": b"y" * 100})
    size = len(encode(message))
    conn = Connection(Limits(max_message_size=size))
    conn.receive_data(encode(message) * 3)
    assert drain(conn) == [message] * 3
    with pytest.raises(ProtocolError, match="limit"):
        Connection(Limits(max_message_size=size - 1)).receive_data(encode(message))


def test_send_refuses_what_the_peer_would_refuse() -> None:
    conn = Connection(Limits(max_message_size=64))
    with pytest.raises(ProtocolError, match="over the 64-byte message limit"):
        conn.send(Response(1, None, b"x" * 100))


@pytest.mark.parametrize("depth", [33, 1000, 1025, 100_000])
def test_absurd_nesting_is_refused(depth: int) -> None:
    data = b"\x91" * depth + b"\xc0"
    conn = Connection()
    with pytest.raises(ProtocolError, match="nested"):
        receive(conn, data)


def test_nesting_up_to_the_limit_is_accepted() -> None:
    result: Any = None
    for _ in range(32 - 1):  # the message array itself is level 1
        result = [result]
    conn = Connection()
    conn.receive_data(encode(Response(1, None, result)))
    assert conn.next_message() == Response(1, None, result)
    conn = Connection()
    conn.receive_data(encode(Response(1, None, [result])))
    with pytest.raises(ProtocolError, match="nested more than 32"):
        conn.next_message()


@pytest.mark.parametrize(
    ("value", "limits", "expected"),
    [
        (list(range(11)), Limits(max_container_len=10), "exceeds max_array_len"),
        ({str(i): i for i in range(11)}, Limits(max_container_len=10), "exceeds max_map_len"),
        ("x" * 11, Limits(max_str_len=10), "exceeds max_str_len"),
        (b"x" * 11, Limits(max_bin_len=10), "exceeds max_bin_len"),
    ],
)
def test_length_limits(value: object, limits: Limits, expected: str) -> None:
    conn = Connection(limits)
    with pytest.raises(ProtocolError, match=expected):
        receive(conn, encode(Response(1, None, value)))


def test_container_length_refused_from_the_header_alone() -> None:
    # An array32 header claiming 2**32-1 entries: refused before a single entry arrives.
    conn = Connection()
    with pytest.raises(ProtocolError, match="exceeds max_array_len"):
        conn.receive_data(b"\x94\x01\x01\xc0\xdd\xff\xff\xff\xff")


def test_total_containers_are_capped() -> None:
    # 4 MiB of empty arrays would be ~300 MB of Python lists; refused at 65536 containers.
    inner = b"\xdc\xff\xff" + b"\x90" * 65535
    data = b"\x94\x01\x01\xc0\xdc\x00\x3f" + inner * 63
    conn = Connection()
    with pytest.raises(ProtocolError, match="more than 65536 arrays and maps"):
        receive(conn, data)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_depth"):
        Limits(max_depth=0)


# -- message classes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: Request(-1, "m", {}),
        lambda: Request(1, "", {}),
        lambda: Request(1, "m", {1: 2}),
        lambda: Response(1, ("EPERM",), None),  # type: ignore[arg-type]
        lambda: Response(1, ("EPERM", "x"), 5),
        lambda: Notification("", {}),
    ],
)
def test_messages_validate_themselves(build: Any) -> None:
    with pytest.raises(ProtocolError):
        build()


def test_encode_refuses_unencodable_values() -> None:
    with pytest.raises(ProtocolError, match="cannot encode") as info:
        encode(Response(1, None, object()))
    assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(Response(1, None, 2**64))


# -- errors ------------------------------------------------------------------------------

ERROR_CLASSES = [
    cls
    for cls in vars(hwbkpt_proto).values()
    if isinstance(cls, type) and issubclass(cls, HwbkptError)
]


@pytest.mark.parametrize("cls", [c for c in ERROR_CLASSES if c is not HwbkptError])
def test_every_error_round_trips(cls: type[HwbkptError]) -> None:
    err = cls("something a person can act on")
    conn = Connection()
    conn.receive_data(conn.send(response_for_error(42, err)))
    response = conn.next_message()
    assert isinstance(response, Response)
    assert response.msgid == 42
    assert response.result is None
    assert response.error is not None
    back = error_from_wire(*response.error)
    assert type(back) is cls
    assert back.message == err.message
    assert back.code == cls.code


def test_error_codes_are_unique() -> None:
    codes = [cls.code for cls in ERROR_CLASSES if cls is not HwbkptError]
    assert len(codes) == len(set(codes))


def test_unknown_error_code_is_kept_in_a_base_error() -> None:
    err = error_from_wire("ENEWTHING", "from a newer daemon")
    assert type(err) is HwbkptError
    assert "ENEWTHING" in err.message


def test_public_api() -> None:
    assert hwbkpt_proto.PROTOCOL_VERSION == 2
    assert hwbkpt_proto.PROTOCOL_VERSIONS == (1, 2)
    assert [int(t) for t in hwbkpt_proto.MessageType] == [0, 1, 2]
    for name in hwbkpt_proto.__all__:
        assert hasattr(hwbkpt_proto, name), name
    assert Connection is hwbkpt_proto.Connection
