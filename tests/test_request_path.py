"""The client session's request path (issue 13): a call packed with one reused ``Packer``
must be the bytes ``encode(Request(...))`` makes, or fail with the same error; an answer
decoded in one ``unpackb`` (``Session._take_response``) must give the same result, the same
exception, or the same lost connection as the general decoder, which gets everything the
fast path leaves alone."""

from __future__ import annotations

import datetime
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwbkpt._session import Session
from hwbkpt_proto import Connection, Limits, ProtocolError, Request, encode

pytestmark = pytest.mark.timeout(60)


# -- requests -------------------------------------------------------------------------------

PARAMS = [
    {},
    {"id": 7},
    {"pid": 4321, "addr": 0x5555_5555_8010, "length": 8, "access": "w", "mode": "count",
     "priority": 0, "tid": 4322},
    {"data": b"\x00\xff" * 40, "n": -(2**63), "m": 2**64 - 1, "f": 1.5, "b": True, "z": None},
    {"nested": {"a": [1, [2, [3, {"k": "v"}]]], 7: "int key"}},
    {"text": "é" * 300, "big": b"x" * 70_000},
]


@pytest.mark.parametrize("params", PARAMS)
def test_a_request_is_the_bytes_encode_makes(params: dict[str, Any]) -> None:
    s = Session()
    msgid, data = s.request("watch", params)
    assert data == encode(Request(msgid, "watch", params))


def _error_of(call: Any) -> str:
    with pytest.raises(ProtocolError) as info:
        call()
    return str(info.value)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("", {}),
        (5, {}),
        ("watch", {1: "x"}),
        ("watch", [1, 2]),
        ("watch", {"x": object()}),
        ("watch", {"x": 2**64}),
        ("watch", {"x": -(2**63) - 1}),
        ("watch", {"x": datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)}),
    ],
)
def test_a_bad_request_fails_as_the_general_path_fails(method: Any, params: Any) -> None:
    s = Session()
    msgid = s._next_msgid
    expected = _error_of(lambda: Connection().send(Request(msgid, method, params)))
    assert _error_of(lambda: s.request(method, params)) == expected
    # The packer kept nothing of the failed call: the next one is whole and right.
    msgid, data = s.request("count", {"id": 3})
    assert data == encode(Request(msgid, "count", {"id": 3}))


def test_a_request_over_the_message_limit_fails_as_the_general_path_fails() -> None:
    limits = Limits(max_message_size=64)
    s = Session(limits)
    params = {"data": b"x" * 100}
    expected = _error_of(lambda: Connection(limits).send(Request(1, "write", params)))
    assert _error_of(lambda: s.request("write", params)) == expected


# -- answers --------------------------------------------------------------------------------


def _outcome(s: Session, msgid: int) -> tuple[str, Any]:
    """What a caller of ``msgid`` sees: its result, its exception, or a lost connection."""
    if s.lost:
        return ("lost", str(s.lost_error()))
    if not s.has_result(msgid):
        return ("nothing", None)
    try:
        return ("result", s.take_result(msgid))
    except Exception as err:
        return (type(err).__name__, str(err))


def _both(data: bytes, limits: Limits | None = None) -> tuple[Any, Any, bool]:
    """The outcome of ``data`` fed whole (fast path if it takes it) and fed in two pieces
    (the general path: the first byte alone is no answer, and then the connection is not
    idle); and whether the fast path took it."""
    fast, general = Session(limits), Session(limits)
    m1, _ = fast.request("watch", {})
    m2, _ = general.request("watch", {})
    assert m1 == m2 == 1
    took = fast._take_response(data)
    if took:
        fast._responses.clear()
    fast.receive_data(data)
    general.receive_data(data[:1])
    general.receive_data(data[1:])
    return _outcome(fast, m1), _outcome(general, m2), took


def _answer(result: Any, msgid: int = 1) -> bytes:
    return msgpack.packb([1, msgid, None, result], use_bin_type=True)


TAKEN = [
    None,
    0,
    "x",
    {"id": 16006, "state": "installed", "threads": {3097: "installed"}},
    {"id": 1, "state": "installed", "threads": {t: "installed" for t in range(3094, 3127)}},
    [1, "two", b"three", 4.5, True, None, [], {}],
    {b"raw": 1, 2: [[[[]]]]},
    {"threads": [3097, 3098]},
]


@pytest.mark.parametrize("result", TAKEN)
def test_a_plain_answer_is_taken_in_one_piece_with_the_general_result(result: Any) -> None:
    fast, general, took = _both(_answer(result))
    assert took
    assert fast == general == ("result", result)


LEFT = [
    _answer(msgpack.ExtType(5, b"x")),
    _answer({"t": msgpack.Timestamp(1, 0)}),
    _answer({"deep": [msgpack.ExtType(1, b"")]}),
    msgpack.packb([1, 1, None, {True: 1}]),  # a bool key
    msgpack.packb([1, 1, None, {1.5: 1}]),
    msgpack.packb([1, 1, None, {None: 1}]),
    msgpack.packb([1, 1, ["ENOENT", "no such watch 5"], None]),  # an error answer
    msgpack.packb([1, 1, ["ENOENT"], None]),  # a malformed one
    msgpack.packb([1, 1, None, "x", "extra"]),
    _answer(1) + _answer(2),  # two messages in one read
    _answer(1) + msgpack.packb([2, "exit", [{"pid": 5}]]),
    _answer(1)[:-1],  # not whole
    _answer("x" * 10)[:-3],
    _answer(5, msgid=2),  # nobody waits for msgid 2
    _answer(5, msgid=2**32),  # not a msgid at all
    _answer(5, msgid=-1),
    _answer({"big": "x" * 5000}),  # over the one-piece size
    b"\x94\x01\x01\xc0\xa2\xff\xfe",  # not UTF-8
    b"\x94\x01\x01\xc0\xc1",  # not msgpack
]


@pytest.mark.parametrize("data", LEFT)
def test_anything_else_is_left_to_the_general_path(data: bytes) -> None:
    fast, general, took = _both(data)
    assert not took
    assert fast == general


def test_the_depth_limit_holds_on_both_paths() -> None:
    limits = Limits(max_depth=4)  # the message's array, the result, two more levels
    fine = _answer({"a": [{"b": 1}]})
    fast, general, took = _both(fine, limits)
    assert took
    assert fast == general == ("result", {"a": [{"b": 1}]})
    too_deep = _answer({"a": [{"b": [1]}]})
    fast, general, took = _both(too_deep, limits)
    assert not took
    assert fast == general
    assert fast[0] == "lost"
    assert "nested more than 4" in fast[1]


def test_results_deeper_than_the_fast_walk_go_the_general_way() -> None:
    nested: Any = 1
    for _ in range(20):
        nested = [nested]
    fast, general, took = _both(_answer(nested))
    assert not took  # deeper than FAST_DEPTH, within the default max_depth of 32
    assert fast == general == ("result", nested)


def test_a_taken_answer_leaves_the_stream_where_the_next_message_starts() -> None:
    s = Session()
    m1, _ = s.request("watch", {})
    m2, _ = s.request("unwatch", {"id": 1})
    s.receive_data(_answer({"id": 9}, msgid=m1))
    assert s.take_result(m1) == {"id": 9}
    event = msgpack.packb([2, "installed", [{"watch": 9, "tid": 5}]])
    s.receive_data(event + _answer(None, msgid=m2))
    assert s.take_result(m2) is None
    ev = s.next_event()
    assert ev is not None
    assert ev.kind == "installed"


def test_an_abandoned_call_s_answer_is_dropped_either_way() -> None:
    s = Session()
    msgid, _ = s.request("slow", {})
    s.abandon(msgid)
    s.receive_data(_answer(1, msgid=msgid))
    assert not s.lost
    assert not s.has_result(msgid)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=5) | st.integers(-5, 5) | st.binary(max_size=3),
                      inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_any_result_gives_what_the_general_path_gives(result: Any) -> None:
    fast, general, _ = _both(_answer(result))
    assert fast == general
