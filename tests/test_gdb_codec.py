"""The RSP packet codec (client/hwbkpt/_gdbserver/_codec.py): tables, byte-by-byte, fuzz."""

from __future__ import annotations

import itertools

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

from hwbkpt._gdbserver._codec import (
    NEED_DATA,
    Ack,
    Codec,
    Dropped,
    Event,
    Interrupt,
    Nak,
    Packet,
    checksum,
    escape,
    unescape,
)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(payload: bytes, *, cc: bytes | None = None) -> bytes:
    return b"$" + payload + b"#" + (cc if cc is not None else b"%02x" % checksum(payload))


def events(codec: Codec, data: bytes, step: int | None = None) -> list[Event]:
    out: list[Event] = []
    chunks = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        codec.receive_data(chunk)
        while (event := codec.next_event()) is not NEED_DATA:
            assert not isinstance(event, type(NEED_DATA))
            out.append(event)
    return out


TABLE: list[tuple[bytes, list[Event], bytes]] = [
    # wire bytes, events, acks the codec queues
    (frame(b"qSupported:multiprocess+"), [Packet(b"qSupported:multiprocess+")], b"+"),
    (frame(b"?"), [Packet(b"?")], b"+"),
    (frame(b""), [Packet(b"")], b"+"),
    (b"+", [Ack()], b""),
    (b"-", [Nak()], b""),
    (b"\x03", [Interrupt()], b""),
    (b"+" + frame(b"g") + b"\x03", [Ack(), Packet(b"g"), Interrupt()], b"+"),
    (frame(b"m0,4", cc=b"00"), [Dropped("bad checksum b'00' for a 4-byte packet")], b"-"),
    (frame(b"m0,4", cc=b"zz"), [Dropped("bad checksum b'zz' for a 4-byte packet")], b"-"),
    # escapes: '}' + (byte ^ 0x20); binary X data carries them
    (frame(b"X0,1:}\x03"), [Packet(b"X0,1:#")], b"+"),
    (frame(b"X0,2:}]}\n"), [Packet(b"X0,2:}*")], b"+"),
    # run-length: '*' + chr(n + 29) repeats the previous byte n times
    (frame(b"0* "), [Packet(b"0000")], b"+"),
    (frame(b"ab*!c"), [Packet(b"abbbbbc")], b"+"),
    # malformed runs/escapes are refused, never crash
    (frame(b"*!"), [Dropped("malformed escape or run-length sequence")], b"-"),
    (frame(b"a}"), [Dropped("malformed escape or run-length sequence")], b"-"),
    (frame(b"a*\x01"), [Dropped("malformed escape or run-length sequence")], b"-"),
    # line noise between packets is skipped
    (b"garbage" + frame(b"c"), [Packet(b"c")], b"+"),
    (frame(b"s") + frame(b"c"), [Packet(b"s"), Packet(b"c")], b"++"),
]


@pytest.mark.parametrize(("wire", "expected", "acks"), TABLE)
@pytest.mark.parametrize("step", [None, 1, 2, 3])
def test_table(wire: bytes, expected: list[Event], acks: bytes, step: int | None) -> None:
    codec = Codec()
    assert events(codec, wire, step) == expected
    assert codec.data_to_send() == acks
    assert codec.data_to_send() == b""


def test_incomplete_packet_needs_data() -> None:
    codec = Codec()
    codec.receive_data(b"$m10,")
    assert codec.next_event() is NEED_DATA
    codec.receive_data(b"4#")
    assert codec.next_event() is NEED_DATA
    digits = b"%02x" % checksum(b"m10,4")
    codec.receive_data(digits[:1])
    assert codec.next_event() is NEED_DATA
    assert codec.data_to_send() == b""
    assert events(codec, digits[1:]) == [Packet(b"m10,4")]
    assert codec.data_to_send() == b"+"


def test_no_ack_mode_sends_no_acks_and_ignores_checksums() -> None:
    codec = Codec()
    assert events(codec, frame(b"QStartNoAckMode")) == [Packet(b"QStartNoAckMode")]
    assert codec.data_to_send() == b"+"
    codec.start_no_ack()
    assert events(codec, frame(b"g", cc=b"00") + frame(b"?")) == [Packet(b"g"), Packet(b"?")]
    assert codec.data_to_send() == b""
    assert codec.send(b"OK") == b"$OK#9a"


def test_oversized_packet_is_dropped_without_being_kept() -> None:
    codec = Codec(max_packet=64)
    codec.receive_data(b"$" + b"A" * 100)
    assert codec.next_event() == Dropped("packet longer than 64 bytes")
    assert codec.data_to_send() == b"-"
    # The rest of it streams by without being buffered; the next packet is fine.
    for _ in range(100):
        codec.receive_data(b"B" * 1000)
        assert codec.next_event() is NEED_DATA
        assert len(codec._buf) == 0
    assert events(codec, b"#00" + frame(b"?"), step=1) == [Packet(b"?")]


def test_packet_of_exactly_the_limit_is_accepted() -> None:
    codec = Codec(max_packet=64)
    assert events(codec, frame(b"m" * 64)) == [Packet(b"m" * 64)]


def test_send_escapes_and_checksums() -> None:
    codec = Codec()
    wire = codec.send(b"l<a>$#}*</a>")
    assert wire.startswith(b"$l<a>}\x04}\x03}]}\n</a>#")
    body = wire[1:-3]
    assert int(wire[-2:], 16) == checksum(body)
    assert unescape(body) == b"l<a>$#}*</a>"


def test_send_returns_queued_acks_first() -> None:
    codec = Codec()
    events(codec, frame(b"?"))
    assert codec.send(b"S05") == b"+$S05#b8"


@FAST
@given(payload=st.binary(max_size=300))
def test_escape_round_trips(payload: bytes) -> None:
    assert unescape(escape(payload)) == payload
    codec = Codec()
    assert events(codec, Codec().send(payload)) == [Packet(payload)]


@FAST
@given(
    data=st.binary(max_size=2048),
    cuts=st.lists(st.integers(min_value=0), max_size=20),
    small=st.booleans(),
    no_ack=st.booleans(),
)
def test_arbitrary_bytes_give_events_and_nothing_else(
    data: bytes, cuts: list[int], small: bool, no_ack: bool
) -> None:
    codec = Codec(max_packet=32 if small else 4096)
    if no_ack:
        codec.start_no_ack()
    out: list[Event] = []
    pieces = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    for start, end in itertools.pairwise(pieces):
        out += events(codec, data[start:end])
        assert len(codec._buf) <= codec.max_packet + 4
    for event in out:
        assert isinstance(event, Packet | Ack | Nak | Interrupt | Dropped)
        if isinstance(event, Packet):
            assert len(event.data) <= codec.max_packet * 4
    acks = codec.data_to_send()
    assert set(acks) <= set(b"+-")
    if no_ack:
        assert acks == b""
    else:
        assert acks.count(b"+") == sum(isinstance(e, Packet) for e in out)


@FAST
@given(
    payloads=st.lists(st.binary(max_size=200), max_size=8),
    noise=st.lists(st.sampled_from([b"+", b"-", b"\x03", b"x"]), max_size=8),
    step=st.integers(min_value=1, max_value=64),
)
def test_framed_packets_survive_any_split(
    payloads: list[bytes], noise: list[bytes], step: int
) -> None:
    sender = Codec()
    wire = b"".join(
        sender.send(p) + (noise[i] if i < len(noise) else b"") for i, p in enumerate(payloads)
    )
    got = [e for e in events(Codec(), wire, step) if isinstance(e, Packet)]
    assert got == [Packet(p) for p in payloads]
