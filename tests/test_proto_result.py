"""``Connection.send_result``: the server's shortcut for a successful response encodes
exactly what ``send(Response(...))`` does, and fails the same ways (no kernel needed)."""

from __future__ import annotations

from typing import Any

import pytest

from hwbkpt_proto import Connection, Limits, ProtocolError, Response

RESULTS: list[Any] = [
    None,
    0,
    -1,
    (1 << 64) - 1,
    "installed",
    b"\x00\xff" * 40,
    [1, [2, [3]]],
    {"id": 7, "state": "installed", "threads": {812: "installed", 813: "pending"}},
    {"threads": [812, 813], "ok": True, "ratio": 0.5},
]


@pytest.mark.parametrize("result", RESULTS)
@pytest.mark.parametrize("msgid", [0, 1, 127, 128, 65535, (1 << 32) - 1])
def test_send_result_is_send_of_a_response(msgid: int, result: Any) -> None:
    conn = Connection()
    assert conn.send_result(msgid, result) == conn.send(Response(msgid, None, result))
    # And the peer reads it back as that response.
    peer = Connection()
    peer.receive_data(conn.send_result(msgid, result))
    got = peer.next_message()
    assert isinstance(got, Response)
    assert (got.msgid, got.error) == (msgid, None)
    assert got.result == (list(result) if isinstance(result, tuple) else result)


def test_send_result_refuses_what_cannot_be_encoded() -> None:
    conn = Connection()
    with pytest.raises(ProtocolError, match="cannot encode Response") as direct:
        conn.send_result(1, {"x": object()})
    with pytest.raises(ProtocolError) as via_send:
        conn.send(Response(1, None, {"x": object()}))
    assert direct.value.message == via_send.value.message


def test_send_result_refuses_a_result_over_the_message_limit() -> None:
    conn = Connection(Limits(max_message_size=1024))
    assert len(conn.send_result(1, b"x" * 1000)) <= 1024
    with pytest.raises(ProtocolError, match=r"Response encodes to .* over the 1024-byte") as r:
        conn.send_result(1, b"x" * 1024)
    with pytest.raises(ProtocolError) as via_send:
        conn.send(Response(1, None, b"x" * 1024))
    assert r.value.message == via_send.value.message
