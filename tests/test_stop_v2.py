"""Protocol versions 1 and 2 on one real stop: a version-1 peer (raw msgpack-RPC, maps) and
the client library (version 2: registers as one bin, fixed arrays) hold the same thread."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import msgpack
import pytest

from hwbkpt_proto import REGISTER_NAMES, Connection, Notification, Regs, Request, Response
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import (
    TIMEOUT,
    Conn,
    connect_fixture,  # noqa: F401  (the `connect` fixture)
    info_int,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]


class RawPeer:
    """A client written against the wire alone, speaking protocol ``version``; it keeps the
    raw decoded messages so a test can see their shapes."""

    def __init__(self, path: str, version: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.conn = Connection()
        self.raw = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.messages: list[Any] = []  # decoded by hwbkpt_proto, in order
        self.wire: list[Any] = []  # the same, as plain msgpack values
        self.msgid = 0
        self.result = self.call("hello", version=version, name=f"raw-v{version}")

    def _read(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        data = self.sock.recv(65536)
        assert data, "the daemon closed the connection"
        self.conn.receive_data(data)
        self.raw.feed(data)
        self.wire.extend(self.raw)
        while (message := self.conn.next_message()) is not None:
            self.messages.append(message)

    def call(self, method: str, **params: Any) -> Any:
        self.msgid += 1
        self.sock.sendall(self.conn.send(Request(self.msgid, method, params)))
        deadline = time.monotonic() + TIMEOUT
        while True:
            for m in self.messages:
                if isinstance(m, Response) and m.msgid == self.msgid:
                    self.messages.remove(m)
                    assert m.error is None, m.error
                    return m.result
            assert time.monotonic() < deadline, f"no answer to {method}"
            self._read(deadline)

    def notify(self, method: str, **params: Any) -> None:
        self.sock.sendall(self.conn.send(Notification(method, params)))

    def expect_stop(self) -> tuple[Notification, list[Any]]:
        """The next ``stop`` event, decoded and as it was on the wire."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            stops = [m for m in self.messages if isinstance(m, Notification)]
            wires = [w for w in self.wire if w[0] == 2]
            if stops:
                assert stops[0].method == "stop", stops[0]
                self.messages.remove(stops[0])
                self.wire.remove(wires[0])
                return stops[0], wires[0]
            assert time.monotonic() < deadline, "no stop event"
            self._read(deadline)


@contextmanager
def raw_peer(daemon: Daemon, version: int) -> Iterator[RawPeer]:
    peer = RawPeer(daemon.socket, version)
    with closing(peer.sock):
        yield peer


Start = Callable[..., Target]


@pytest.mark.timeout(90)
def test_v1_and_v2_clients_share_one_stop(
    target: Start, connect: Callable[[str], Conn], daemon: Daemon
) -> None:
    n = 20
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    lib = connect("v2-library")
    assert lib.server_info["version"] == 2
    with raw_peer(daemon, 1) as v1, raw_peer(daemon, 2) as v2:
        assert v1.result["version"] == 1
        assert v2.result["version"] == 2
        protocols = {c["name"]: c["protocol"] for c in lib.status()["clients"]}
        assert protocols == {"raw-v1": 1, "raw-v2": 2, "v2-library": 2}
        w1 = v1.call("watch", pid=proc.pid, addr=addr, mode="stop", access="w")["id"]
        w2 = v2.call("watch", pid=proc.pid, addr=addr, mode="stop", access="w")["id"]
        wl = lib.watch(proc.pid, addr, mode="stop")
        proc.go()
        for i in range(1, n + 1):
            s1, wire1 = v1.expect_stop()
            s2, wire2 = v2.expect_stop()
            ev = lib.expect("stop")
            # Version 1: [{... "regs": {name: int}}]; version 2: the fixed array with a bin.
            assert wire1[2][0]["regs"] == s1.params["regs"]
            assert set(s1.params["regs"]) == set(REGISTER_NAMES)
            assert wire2[2] == [proc.pid, proc.pid, [w2], "watch", s2.params["regs"]]
            assert type(s2.params["regs"]) is bytes
            assert s1.params["watches"] == [w1]
            assert ev.watches == [wl.id]
            assert isinstance(ev.regs, Regs)
            # One stop, one set of registers, whatever the encoding.
            assert Regs(s2.params["regs"]) == s1.params["regs"] == ev.regs
            assert ev.regs["rip"] == s1.params["regs"]["rip"]
            assert int.from_bytes(lib.read_memory(proc.pid, addr, 8), "little") == i
            # Resumes in both shapes: a v1 map, a v2 fixed array (the library's).
            v1.notify("resume", tid=proc.pid)
            v2.conn.positional = True  # what the library does after hello
            v2.notify("resume", tid=proc.pid)
            lib.resume(proc.pid, wait=False)
        assert proc.line() == f"done var={n} pair0=0"
        assert v1.call("count", id=w1) == n
        assert v2.call("count", id=w2) == n
        assert wl.count() == n
        proc.go()
        assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_a_stops_regs_go_back_through_set_regs(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    proc = target("writer", 2, "gate2")
    addr = info_int(proc, "addr")
    c = connect("regs")
    c.watch(proc.pid, addr, mode="stop")
    proc.go()
    ev = c.expect("stop")
    assert isinstance(ev.regs, Regs)
    # A version-2 Regs is a mapping, not a dict: the client sends it as the map set_regs takes.
    c.set_regs(proc.pid, ev.regs)
    assert c.get_regs(proc.pid) == ev.regs
    c.set_regs(proc.pid, {"rax": ev.regs["rax"] ^ 1})
    assert c.get_regs(proc.pid)["rax"] == ev.regs["rax"] ^ 1
    c.set_regs(proc.pid, ev.regs)
    c.resume(proc.pid)
    c.resume(c.expect("stop").tid)
    assert proc.line() == "done var=2 pair0=0"
    proc.go()
    assert proc.wait(TIMEOUT) == 0


def _next_notification(peer: RawPeer) -> Notification:
    deadline = time.monotonic() + TIMEOUT
    while True:
        for m in peer.messages:
            if isinstance(m, Notification):
                peer.messages.remove(m)
                return m
        assert time.monotonic() < deadline, "no event"
        peer._read(deadline)


@pytest.mark.timeout(60)
def test_bad_fixed_shape_calls_get_errors_and_leave_the_daemon_serving(daemon: Daemon) -> None:
    with raw_peer(daemon, 2) as peer:
        # Wrong values in the right shape: an `error` event each, like any bad notification.
        for params in ([True], ["812"], [-1], [2**40]):
            peer.sock.sendall(msgpack.packb([2, "resume", params]))
            event = _next_notification(peer)
            assert event.method == "error", event
            assert event.params["method"] == "resume"
            assert event.params["code"] == "EINVAL", event
        assert peer.call("ping", data=1) == 1
        # Longer than the shape: the stream is not hwbkpt msgpack-RPC.
        peer.sock.sendall(msgpack.packb([2, "step", [1, 2]]))
        event = _next_notification(peer)
        assert event.method == "disconnected"
        assert event.params["code"] == "EPROTO"
        assert "[tid]" in event.params["reason"]
    with raw_peer(daemon, 2) as other:
        assert other.call("ping", data=2) == 2
