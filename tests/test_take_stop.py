"""Connection.take_stop, the client's one-message decoder of a protocol-2 ``stop``: the same
params as the general path for every good ``stop``, and ``None`` (the general path) for
anything else, with nothing consumed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from hwbkpt._session import Session
from hwbkpt_proto import REGISTER_NAMES, Connection, Notification, Regs, encode, pack_regs

REGS = pack_regs({name: 0x1000 + i for i, name in enumerate(REGISTER_NAMES)})


def stop(**more: Any) -> bytes:
    fields = {"pid": 4321, "tid": 4322, "watches": [1, 300], "reason": "watch", "regs": REGS}
    return encode(Notification("stop", {**fields, **more}), positional=True)


def general(data: bytes) -> dict[str, Any]:
    conn = Connection()
    conn.receive_data(data)
    msg = conn.next_message()
    assert isinstance(msg, Notification)
    assert msg.method == "stop"
    return msg.params


@pytest.mark.parametrize(
    "more",
    [
        {},
        {"dr6": 0xFFFF0FF1},
        {"new": 2**64 - 1, "old": 0},
        {"dr6": 1, "new": 5, "old": 4},
        {"watches": []},
        {"watches": list(range(40)), "pid": 2**31 - 1},
        {"reason": "step"},
    ],
)
def test_a_good_stop_decodes_as_the_general_path_decodes_it(more: dict[str, Any]) -> None:
    data = stop(**more)
    conn = Connection()
    assert conn.take_stop(data) == general(data)
    assert conn.idle


def _raw(params: list[Any]) -> bytes:
    return msgpack.packb([2, "stop", params], use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        stop() + stop(),  # two messages: one at a time, by the general path
        stop()[:-1],  # not whole
        stop()[:7],  # the head alone
        stop()[:8],
        encode(Notification("stop", {"pid": 1, "tid": 1, "watches": [], "reason": "watch",
                                     "regs": REGS})),  # version 1: a map
        _raw([1, 1, [True], "watch", REGS]),  # a bool is not a watch id
        _raw([1, 1, [1], "watch", REGS[:-8]]),  # regs of 26 words
        _raw([1, 1, [1], b"watch", REGS]),
        _raw([1, 1, [1], "watch", REGS, 1.5]),
        _raw([1, 1, [1], "watch", REGS, msgpack.ExtType(1, b"x")]),
        _raw([1, 1, [1], "watch"]),
        _raw([1, 1, [1], "watch", REGS, 1, 2, 3, 4]),
        msgpack.packb([2, "stop", [1, 1, [1], "watch", REGS], 0], use_bin_type=True),
        b"\x93\x02\xa4stop\xc1",  # malformed msgpack
    ],
)
def test_anything_else_is_left_to_the_general_path(data: bytes) -> None:
    conn = Connection()
    assert conn.take_stop(data) is None
    assert conn.idle


def test_nothing_is_taken_while_a_message_is_half_received() -> None:
    conn = Connection()
    other = encode(Notification("exit", {"pid": 1}), positional=True)
    conn.receive_data(other[:3])
    assert conn.take_stop(stop()) is None


def test_the_session_queues_a_taken_stop_as_the_general_path_does() -> None:
    fast, slow = Session(), Session()
    fast.hello_done({"version": 2})
    slow.hello_done({"version": 2})
    fast.receive_data(stop(dr6=3))
    # The same stop, then two more in one read: those take the general path.
    slow.receive_data(stop(dr6=3) + stop() + stop())
    a, b = fast.next_event(), slow.next_event()
    assert a is not None
    assert a == b
    assert isinstance(a.regs, Regs)
    assert a.regs["rip"] == 0x1000 + REGISTER_NAMES.index("rip")
    more = [slow.next_event(), slow.next_event()]
    assert [e.kind if e else None for e in more] == ["stop", "stop"]
    assert slow.next_event() is None


def _regs(seed: int) -> bytes:
    return pack_regs({name: (seed * 0x9E3779B97F4A7C15 + i) % 2**64
                      for i, name in enumerate(REGISTER_NAMES)})


def test_a_repeated_stop_decodes_as_the_general_path_with_its_own_registers() -> None:
    """The second and later stops of a thread repeat the bytes before the registers: they
    are taken from take_stop's memory, and must still equal the general path's decoding,
    registers included, with a watches list of their own."""
    conn = Connection()
    taken = []
    for seed in range(5):
        data = stop(regs=_regs(seed))
        params = conn.take_stop(data)
        assert params == general(data)
        assert conn.idle
        assert params is not None
        taken.append(params)
    taken[1]["watches"].append(99)  # a caller's change reaches no other stop
    assert [p["watches"] for p in taken] == [[1, 300], [1, 300, 99], [1, 300], [1, 300],
                                             [1, 300]]
    assert len({p["regs"] for p in taken}) == 5
    # Another thread, then the first again: each has its own remembered head.
    for tid in (4323, 4322):
        data = stop(tid=tid, regs=_regs(tid))
        assert conn.take_stop(data) == general(data)


@pytest.mark.parametrize(
    "cut",
    [
        lambda first: first[:-1],  # the registers cut short: not one whole message
        lambda first: first + b"\x00",  # a byte after the message
        lambda first: first + stop(),  # two messages
        lambda first: first[:-216] + first[-215:],  # a bin 8 of 216 bytes, 215 given
    ],
)
def test_a_remembered_head_with_other_bytes_after_it_is_left_to_the_general_path(
    cut: Callable[[bytes], bytes],
) -> None:
    conn = Connection()
    first = stop()
    assert conn.take_stop(first) is not None
    assert conn.take_stop(cut(first)) is None
    assert conn.idle


def test_a_remembered_stop_is_not_taken_while_a_message_is_half_received() -> None:
    conn = Connection()
    assert conn.take_stop(stop()) is not None
    other = encode(Notification("exit", {"pid": 1}), positional=True)
    conn.receive_data(other[:3])
    assert conn.take_stop(stop(regs=_regs(7))) is None


def test_stops_with_trailing_values_are_decoded_each_time() -> None:
    """A stop whose registers are not last (dr6, new, old follow) is never remembered."""
    conn = Connection()
    for seed in range(3):
        data = stop(dr6=seed + 1, regs=_regs(seed))
        assert conn.take_stop(data) == general(data)
    assert not conn._stops_seen
