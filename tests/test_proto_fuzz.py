"""Property tests: arbitrary bytes never break the decoder; arbitrary messages round-trip."""

from __future__ import annotations

import itertools
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from hwbkpt_proto import (
    Connection,
    Limits,
    Message,
    Notification,
    ProtocolError,
    Request,
    Response,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SMALL = Limits(max_message_size=4096, max_container_len=64, max_str_len=256, max_bin_len=256)


def feed_in_chunks(conn: Connection, data: bytes, cuts: list[int]) -> list[Message]:
    out: list[Message] = []
    pieces = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(pieces):
        conn.receive_data(data[start:end])
        while (message := conn.next_message()) is not None:
            out.append(message)
    return out


@FAST
@given(
    data=st.binary(max_size=2048),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    small=st.booleans(),
)
def test_arbitrary_bytes_give_messages_or_a_protocol_error(
    data: bytes, cuts: list[int], small: bool
) -> None:
    conn = Connection(SMALL if small else Limits())
    try:
        messages = feed_in_chunks(conn, data, cuts)
    except ProtocolError:
        return
    for message in messages:
        assert isinstance(message, Request | Response | Notification)


# Bytes that look like the start of a message make the fuzzer reach past the envelope.
PREFIXES = [b"\x94\x00\x01\xa1m\x91", b"\x94\x01\x01\xc0", b"\x93\x02\xa1m\x91", b""]


@FAST
@given(
    prefix=st.sampled_from(PREFIXES),
    data=st.binary(max_size=512),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_arbitrary_message_bodies(prefix: bytes, data: bytes, cuts: list[int]) -> None:
    conn = Connection(SMALL)
    try:
        feed_in_chunks(conn, prefix + data, cuts)
    except ProtocolError:
        pass


keys = st.one_of(st.text(max_size=8), st.integers(min_value=-(2**63), max_value=2**64 - 1))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
)
values: st.SearchStrategy[Any] = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(keys, inner, max_size=5)),
    max_leaves=20,
)
params = st.dictionaries(st.text(max_size=10), values, max_size=5)
msgids = st.integers(min_value=0, max_value=2**32 - 1)
methods = st.text(min_size=1, max_size=20)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Request, msgids, methods, params),
    st.builds(Response, msgids, st.none(), values),
    st.builds(Response, msgids, st.tuples(st.text(), st.text()), st.none()),
    st.builds(Notification, methods, params),
)


@FAST
@given(batch=st.lists(messages, min_size=1, max_size=5), cuts=st.lists(st.integers(), max_size=8))
def test_arbitrary_messages_round_trip(batch: list[Message], cuts: list[int]) -> None:
    sender = Connection()
    data = b"".join(sender.send(m) for m in batch)
    assert feed_in_chunks(Connection(), data, cuts) == batch
