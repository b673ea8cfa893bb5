"""Protocol version 2: registers as one bin (:class:`hwbkpt_proto.Regs`) and the fixed array
shapes of the hot notifications (``stop``, ``resume``, ``step``). Pure: no daemon, no kernel."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest

import hwbkpt_proto
from hwbkpt._session import Session
from hwbkpt_proto import (
    POSITIONAL,
    REGISTER_NAMES,
    REGS_SIZE,
    Connection,
    Notification,
    ProtocolError,
    Regs,
    Request,
    encode,
    pack_regs,
)
from hwbkptd import _kernel, _model

REGS = {name: 0x7FFC_0000_0000 + 8 * i for i, name in enumerate(REGISTER_NAMES)}
RAW = struct.pack("<27Q", *REGS.values())
STOP = {"pid": 812, "tid": 813, "watches": [3, 4], "reason": "watch"}


def _decode(data: bytes) -> Any:
    conn = Connection()
    conn.receive_data(data)
    message = conn.next_message()
    assert conn.next_message() is None
    return message


def test_register_names_are_the_kernels() -> None:
    # One order everywhere: user_regs_struct's (what PTRACE_GETREGS writes).
    assert REGISTER_NAMES == _kernel.REGISTER_NAMES == _model.REGISTER_NAMES
    assert REGS_SIZE == 27 * 8


def test_regs_is_the_v1_mapping() -> None:
    regs = Regs(RAW)
    assert regs == REGS
    assert REGS.__eq__(regs) is NotImplemented  # so dict == Regs asks Regs
    assert (REGS == regs) is True  # noqa: SIM300  (the reflected comparison is the point)
    assert dict(regs) == REGS
    assert list(regs) == list(REGISTER_NAMES)
    assert len(regs) == 27
    assert regs["rip"] == REGS["rip"]
    assert regs.get("eflags") == REGS["eflags"]
    assert "rsp" in regs
    assert "dr7" not in regs
    assert regs.get("dr7") is None
    with pytest.raises(KeyError):
        regs["dr7"]
    assert regs != {**REGS, "rip": 0}
    assert regs == Regs(RAW)
    assert regs != Regs(bytes(REGS_SIZE))
    assert regs.raw is RAW
    assert "rip=0x7ffc00000080" in repr(regs)


def test_regs_decodes_only_when_read() -> None:
    regs = Regs(RAW)
    assert regs._values is None
    assert regs["r15"] == REGS["r15"]
    assert regs._values is not None


@pytest.mark.parametrize("raw", [b"", RAW[:-1], RAW + b"\0", bytearray(RAW), "x" * 216, None])
def test_regs_of_the_wrong_size_or_type_are_a_protocol_error(raw: Any) -> None:
    with pytest.raises(ProtocolError, match="216 bytes"):
        Regs(raw)


def test_pack_regs() -> None:
    assert pack_regs(REGS) == RAW
    regs = Regs(RAW)
    assert pack_regs(regs) is RAW
    # A partial map (a fake kernel's registers) is sent with zeros for the rest.
    partial = struct.unpack("<27Q", pack_regs({"rip": 5}))
    assert partial[REGISTER_NAMES.index("rip")] == 5
    assert sum(partial) == 5
    with pytest.raises(ProtocolError, match="cannot be encoded"):
        pack_regs({"rip": -1})


def test_stop_positional_round_trip() -> None:
    stop = Notification("stop", {**STOP, "regs": RAW, "dr6": 0xFFFF0FF1})
    data = encode(stop, positional=True)
    assert msgpack.unpackb(data) == [2, "stop", [812, 813, [3, 4], "watch", RAW, 0xFFFF0FF1]]
    assert _decode(data) == stop
    # Byte by byte, as a socket may deliver it.
    conn = Connection()
    got = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        while (message := conn.next_message()) is not None:
            got.append(message)
    assert got == [stop]


def test_absent_params_at_the_end_are_left_out() -> None:
    stop = Notification("stop", {**STOP, "regs": RAW})
    data = encode(stop, positional=True)
    assert msgpack.unpackb(data)[2] == [812, 813, [3, 4], "watch", RAW]
    assert _decode(data) == stop


def test_a_conditions_values_have_their_places() -> None:
    # A watch with a condition adds the watched bytes after and before the access.
    stop = Notification("stop", {**STOP, "regs": RAW, "new": 7, "old": 6})
    data = encode(stop, positional=True)
    assert msgpack.unpackb(data)[2] == [812, 813, [3, 4], "watch", RAW, None, 7, 6]
    assert _decode(data) == stop


def test_nil_stands_for_an_absent_param() -> None:
    data = msgpack.packb([2, "stop", [812, 813, [3], "interrupt", None, 7]], use_bin_type=True)
    assert _decode(data) == Notification(
        "stop", {"pid": 812, "tid": 813, "watches": [3], "reason": "interrupt", "dr6": 7}
    )


def test_resume_and_step_positional() -> None:
    for method in ("resume", "step"):
        data = encode(Notification(method, {"tid": 9}), positional=True)
        assert msgpack.unpackb(data) == [2, method, [9]]
        assert _decode(data) == Notification(method, {"tid": 9})


def test_without_positional_everything_is_version_1() -> None:
    stop = Notification("stop", {**STOP, "regs": REGS})
    assert msgpack.unpackb(encode(stop), strict_map_key=False)[2] == [{**STOP, "regs": REGS}]


def test_params_that_do_not_fit_the_shape_go_as_a_map() -> None:
    # An unknown name, a nil value (it would read back as absent), another method.
    for message in (
        Notification("stop", {**STOP, "extra": 1}),
        Notification("resume", {"tid": None}),
        Notification("hit", {"tid": 1}),
    ):
        data = encode(message, positional=True)
        assert isinstance(msgpack.unpackb(data)[2][0], dict)
        assert _decode(data) == message


def test_requests_are_never_positional() -> None:
    request = Request(1, "resume", {"tid": 9})
    assert msgpack.unpackb(encode(request, positional=True))[3] == [{"tid": 9}]
    with pytest.raises(ProtocolError, match="must be a map of named values, got int 9"):
        _decode(msgpack.packb([0, 1, "resume", [9]]))


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ([1, 2, [3], "watch", RAW, 0, 5, 6, "extra"], r"\[map\] or the array \[pid, tid"),
        ([9, 10], r"\[map\] or the array \[tid\]"),
    ],
)
def test_too_long_a_fixed_array_is_refused(params: list[Any], expected: str) -> None:
    method = "stop" if len(params) > 2 else "resume"
    with pytest.raises(ProtocolError, match=expected):
        _decode(msgpack.packb([2, method, params], use_bin_type=True))


def test_positional_is_only_for_the_listed_methods() -> None:
    assert set(POSITIONAL) == {"stop", "resume", "step"}
    with pytest.raises(ProtocolError, match="must be a map of named values, got int 1"):
        _decode(msgpack.packb([2, "hit", [1]]))


def test_connection_sends_positional_when_told() -> None:
    conn = Connection()
    resume = Notification("resume", {"tid": 4})
    assert msgpack.unpackb(conn.send(resume))[2] == [{"tid": 4}]
    conn.positional = True
    assert msgpack.unpackb(conn.send(resume))[2] == [4]


def _session(version: int) -> Session:
    session = Session()
    session.hello_done({"version": version})
    return session


def test_session_v2_stop_gives_lazy_regs_and_sends_fixed_resume() -> None:
    session = _session(2)
    stop = Notification("stop", {**STOP, "regs": RAW})
    session.receive_data(encode(stop, positional=True))
    event = session.next_event()
    assert event is not None
    assert event.kind == "stop"
    assert event.tid == 813
    assert event.watches == [3, 4]
    assert isinstance(event.regs, Regs)
    assert event.regs["rip"] == REGS["rip"]
    assert event.regs == REGS
    assert msgpack.unpackb(session.thread_notification("resume", 813)) == [2, "resume", [813]]


def test_session_v1_stop_keeps_the_map() -> None:
    session = _session(1)
    session.receive_data(encode(Notification("stop", {**STOP, "regs": REGS})))
    event = session.next_event()
    assert event is not None
    assert type(event.regs) is dict
    assert event.regs == REGS
    assert msgpack.unpackb(session.thread_notification("resume", 813))[2] == [{"tid": 813}]


def test_session_drops_cached_resumes_of_the_old_version() -> None:
    session = Session()
    v1 = session.thread_notification("resume", 5)
    session.hello_done({"version": 2})
    assert session.thread_notification("resume", 5) != v1


def test_session_ends_on_a_bad_regs_bin() -> None:
    session = _session(2)
    session.receive_data(encode(Notification("stop", {**STOP, "regs": b"short"}), positional=True))
    assert session.next_event() is None
    assert session.lost
    with pytest.raises(hwbkpt_proto.ConnectionLostError, match="216 bytes"):
        session.check_alive()


def test_hello_asks_for_the_newest_version() -> None:
    assert Session().hello_params("x")["version"] == hwbkpt_proto.PROTOCOL_VERSION == 2


def test_decoded_messages_are_whole_frozen_messages() -> None:
    # from_wire builds them without re-running their checks: they must still be the same.
    import dataclasses

    for message in (
        Notification("stop", {**STOP, "regs": RAW}),
        Request(7, "watch", {"pid": 1, "addr": 8}),
    ):
        got = _decode(encode(message, positional=True))
        assert type(got) is type(message)
        assert got == message
        assert repr(got) == repr(message)
        with pytest.raises(dataclasses.FrozenInstanceError):
            got.method = "other"  # type: ignore[misc]
