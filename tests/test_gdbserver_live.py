"""``hwbkpt gdbserver`` spoken to directly: --listen access rules, and a fuzzed live session.

A small RSP peer (:class:`Peer`, built on the server's own codec) plays the debugger. Every
server and program started is killed at teardown; every read has a deadline.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  (loaded before run_as forks: nobody cannot read the stdlib)
import os
import random
import select
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

import hwbkpt
from hwbkpt._gdbserver._codec import NEED_DATA, Codec, Packet
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_security import run_as
from tests.test_watch import info_int, tracer_pid, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

TIMEOUT = 15.0
NOBODY = 65534

Start = Callable[..., Target]


class Peer:
    """A scripted debugger on a file descriptor pair (a socket or the server's pipes)."""

    def __init__(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.codec = Codec()

    def write(self, data: bytes) -> None:
        os.write(self.wfd, data)

    def packet(self, timeout: float = TIMEOUT) -> bytes:
        """The next packet from the server (acks are skipped); fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.codec.next_event()
            if isinstance(event, Packet):
                self.write(self.codec.data_to_send())
                return event.data
            if event is NEED_DATA:
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no packet from the server within {timeout} s")
                ready, _, _ = select.select([self.rfd], [], [], left)
                if ready:
                    chunk = os.read(self.rfd, 65536)
                    if not chunk:
                        pytest.fail("the server closed the connection")
                    self.codec.receive_data(chunk)

    def ask(self, payload: bytes) -> bytes:
        self.write(self.codec.send(payload))
        return self.packet()


@contextlib.contextmanager
def gdbserver(daemon: Daemon, pid: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``hwbkpt gdbserver PID ARGS`` with pipes; SIGKILLed and reaped at the end."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, "gdbserver",
         str(pid), *args],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(TIMEOUT)
        if proc.stderr is not None:
            print("----- hwbkpt gdbserver stderr:\n" + proc.stderr.read().decode(errors="replace"))
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def listening_on(proc: subprocess.Popen[bytes]) -> str:
    """What the server says it listens on (its first stderr line)."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], TIMEOUT)
    assert ready, "the server said nothing"
    line = proc.stderr.readline().decode()
    assert "listening on" in line, line
    return line.split("listening on ")[1].split()[0]


def connect_tcp_and_read(port: int) -> str:
    """(In a child of another uid) connect, send ``?`` and return what comes back."""
    with socket.create_connection(("127.0.0.1", port), 10) as s:
        s.settimeout(10)
        s.sendall(b"$?#3f")
        try:
            return repr(s.recv(100))
        except ConnectionResetError:
            return "reset"


def connect_unix(path: str) -> str:
    """(In a child of another uid) try to connect to a Unix socket."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(path)
        except PermissionError:
            return "EACCES"
        return "connected"


@pytest.mark.timeout(60)
def test_listen_tcp_admits_only_the_same_user(target: Start, daemon: Daemon) -> None:
    proc = target("writer", 2)
    with gdbserver(daemon, proc.pid, "--listen", "127.0.0.1:0") as server:
        host, port = listening_on(server).rsplit(":", 1)
        # Another user reaches the port, and is closed without a byte.
        assert run_as(NOBODY, lambda: connect_tcp_and_read(int(port))) in ("b''", "reset")
        with socket.create_connection((host, int(port)), TIMEOUT) as conn:
            peer = Peer(conn.fileno(), conn.fileno())
            assert b"PacketSize" in peer.ask(b"qSupported:multiprocess+")
            assert peer.ask(b"?").startswith(b"T05")
            assert peer.ask(b"qAttached") == b"1"
            assert peer.ask(b"D") == b"OK"
        assert server.wait(TIMEOUT) == 0
        assert server.stderr is not None
        assert b"refused a connection" in server.stderr.read()
    wait_until(lambda: tracer_pid(proc.pid) == 0, what="the daemon to let the program go")


@pytest.mark.timeout(60)
def test_listen_refuses_a_public_address_without_listen_any(
    target: Start, daemon: Daemon
) -> None:
    proc = target("writer", 1)
    with gdbserver(daemon, proc.pid, "--listen", "0.0.0.0:0") as server:
        assert server.wait(TIMEOUT) == 2
        assert server.stderr is not None
        assert b"--listen-any" in server.stderr.read()


@pytest.mark.timeout(60)
def test_listen_unix_socket_is_private(target: Start, daemon: Daemon) -> None:
    proc = target("writer", 1)
    with tempfile.TemporaryDirectory(prefix="hwbkpt-gdb-") as tmp:
        os.chmod(tmp, 0o755)
        path = os.path.join(tmp, "gdb.sock")
        with gdbserver(daemon, proc.pid, "--listen", f"unix:{path}") as server:
            assert listening_on(server) == path
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert run_as(NOBODY, lambda: connect_unix(path)) == "EACCES"
            with socket.socket(socket.AF_UNIX) as conn:
                conn.connect(path)
                peer = Peer(conn.fileno(), conn.fileno())
                assert peer.ask(b"qAttached") == b"1"
                peer.write(peer.codec.send(b"k"))  # no reply: the server leaves
                assert server.wait(TIMEOUT) == 0
            assert not os.path.exists(path)


# ------------------------------------------------------------------ a fuzzed live session

_VERBS = [
    b"?", b"g", b"G", b"p", b"P", b"m", b"M", b"x", b"X", b"H", b"T", b"q", b"Q", b"v", b"Z",
    b"z", b"c", b"s", b"C", b"S", b"vCont", b"qXfer", b"qSupported", b"i", b"!", b"A", b"b",
]
_ARGS = [
    b"", b"0", b"-1", b"p1.-1", b"ffffffffffffffffff", b"1,2", b"1,2,3", b"zz,1", b"10=11",
    b":features:read:target.xml:0,ffff", b":threads:read::0,10", b":auxv:read::10,1",
    b":bogus:read::0,1", b";c:1;s", b";t", b";q", b"0,1:", b"0,4:deadbeef", b"2,0,8",
    b"2,1000,3", b"3,0,1", b"0,ffffffffffff,1", b"1,7fffffffffff,1", b"g0", b"c-1",
    b"\x00\xff}", b"e" * 300,
]


@pytest.mark.timeout(120)
def test_fuzzed_session_never_crashes_nor_leaves_a_thread_held(
    target: Start, daemon: Daemon
) -> None:
    rng = random.Random(11)
    proc = target("threads", 2, 20_000_000)
    with gdbserver(daemon, proc.pid) as server:
        assert server.stdin is not None
        assert server.stdout is not None
        peer = Peer(server.stdout.fileno(), server.stdin.fileno())
        assert peer.ask(b"qSupported").startswith(b"PacketSize=")
        proc.go()
        for _ in range(400):
            payload = rng.choice(_VERBS) + rng.choice(_ARGS)
            if payload[:1] in (b"c", b"s", b"C", b"S") or payload.startswith(b"vCont;"):
                # A resume has no reply until a stop: interrupt it to get one.
                peer.write(peer.codec.send(payload))
                peer.write(b"\x03")
                reply = peer.packet()
                assert reply[:1] in (b"T", b"W", b"X", b"E", b"O", b""), reply
                continue
            if payload[:1] in (b"D", b"k") or payload.startswith(b"vKill"):
                continue
            if rng.random() < 0.05:
                peer.write(b"$" + payload + b"#00")  # a bad checksum: NAK'd
                continue
            peer.ask(payload)
        assert server.poll() is None, "the server died"
        # Garbage, an oversized packet, then leave: the program must run on.
        peer.write(b"\x01\x02garbage$" + b"A" * 100_000 + b"#00")
        assert peer.ask(b"D") == b"OK"
        assert server.wait(TIMEOUT) == 0
    # Nothing is left held: the program runs to its normal end.
    lines = [proc.line(TIMEOUT * 4) for _ in range(3)]
    assert lines[-1] == "done var=20000000", lines
    assert proc.wait(TIMEOUT) == 0


def _stop_fields(reply: bytes) -> dict[bytes, bytes]:
    """The ``name:value`` pairs of a ``T`` stop reply."""
    assert reply.startswith(b"T05"), reply
    return dict(part.split(b":", 1) for part in reply[3:].rstrip(b";").split(b";"))


def _le(value: int) -> bytes:
    """An 8-byte register or memory value as RSP hex (target byte order)."""
    return value.to_bytes(8, "little").hex().encode()


@pytest.mark.timeout(90)
def test_each_stop_reports_its_registers_and_reads_its_own_memory(
    target: Start, daemon: Daemon
) -> None:
    # The per-stop path of `watch` + `continue` as gdb drives it (no-ack mode, the watched
    # value read three times per stop): every stop carries rbp/rsp/rip and the watch;
    # repeated reads within a stop agree and a read after the resume sees the new value;
    # a register written at a stop reads back (p, g) and the program runs on unharmed.
    n = 4
    proc = target("writer", n)
    addr, func = info_int(proc, "addr"), info_int(proc, "func")
    with gdbserver(daemon, proc.pid) as server:
        assert server.stdin is not None
        assert server.stdout is not None
        peer = Peer(server.stdout.fileno(), server.stdin.fileno())
        assert peer.ask(b"qSupported:swbreak+").startswith(b"PacketSize=")
        assert peer.ask(b"QStartNoAckMode") == b"OK"
        peer.codec.start_no_ack()
        assert peer.ask(b"Z2,%x,8" % addr) == b"OK"
        peer.write(peer.codec.send(b"vCont;c"))
        proc.go()
        for i in range(1, n + 1):
            fields = _stop_fields(peer.packet())
            assert fields[b"watch"] == b"%x" % addr
            assert fields[b"thread"] == b"%x" % proc.pid
            rip = int.from_bytes(bytes.fromhex(fields[b"10"].decode()), "little")
            assert func <= rip < func + 64, (hex(rip), hex(func))  # inside write_both
            assert peer.ask(b"p10") == fields[b"10"]
            assert peer.ask(b"p7") == fields[b"07"]
            for _ in range(3):
                assert peer.ask(b"m%x,8" % addr) == _le(i)
            if i == 1:
                # r11 (regnum 11) is scratch that write_both never touches.
                assert peer.ask(b"P0b=" + _le(0x1234_5678)) == b"OK"
                assert peer.ask(b"p0b") == _le(0x1234_5678)
                assert peer.ask(b"g")[11 * 16 : 12 * 16] == _le(0x1234_5678)
                assert peer.ask(b"p10") == fields[b"10"]  # the others are unchanged
            peer.write(peer.codec.send(b"vCont;c"))
        assert peer.packet() == b"W00"
        server.stdin.close()  # the debugger leaves
        assert server.wait(TIMEOUT) == 0
    assert proc.line(TIMEOUT) == f"done var={n} pair0=0"
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_read_ready_reads_what_is_there_and_never_waits(target: Start, daemon: Daemon) -> None:
    # The server's loop calls read_ready when its poll said the daemon's socket is
    # readable; a call it made meanwhile may have read the data already, and read_ready
    # must then return rather than block until the daemon says something else.
    proc = target("writer", 1)
    client = hwbkpt.Client(daemon.socket, name="read-ready")
    try:
        client.attach(proc.pid)
        client.read_ready()  # nothing sent: returns at once
        assert client.next_event(timeout=0) is None
        assert client.hold_all(proc.pid) == [proc.pid]
        deadline = time.monotonic() + TIMEOUT
        event = None
        while event is None:
            left = deadline - time.monotonic()
            assert left > 0, "no stop event"
            select.select([client.fileno()], [], [], left)
            client.read_ready()
            event = client.next_event(timeout=0)
        assert (event.kind, event.tid, event.reason) == ("stop", proc.pid, "interrupt")
        # A call answered since: its reply is read by the call, and a read_ready after it
        # (as after a poll that said "readable" before the call) finds nothing, at once.
        assert client.call("ping", data=1) == 1
        client.read_ready()
        assert client.next_event(timeout=0) is None
        client.detach(proc.pid)
    finally:
        client.close()
    proc.go()
    assert proc.line(TIMEOUT).startswith("done var=1")
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_a_packet_resent_before_its_reply_was_acked_is_answered_once(
    target: Start, daemon: Daemon
) -> None:
    # gdb resends a packet whose ack did not come within its remotetimeout (a server that
    # starts slowly): both copies are waiting when the server first reads. One answer.
    proc = target("writer", 1)
    with gdbserver(daemon, proc.pid) as server:
        assert server.stdin is not None
        assert server.stdout is not None
        peer = Peer(server.stdout.fileno(), server.stdin.fileno())
        peer.write(peer.codec.send(b"qSupported") + peer.codec.send(b"qSupported"))
        assert peer.packet().startswith(b"PacketSize=")
        assert peer.ask(b"qAttached") == b"1"  # the answer to this packet, not a stale one
        # The same packet again once its reply was acked is a new request: answered.
        assert peer.ask(b"qAttached") == b"1"
        assert peer.ask(b"D") == b"OK"
        assert server.wait(TIMEOUT) == 0
    proc.go()
    assert proc.line(TIMEOUT).startswith("done var=1")
    assert proc.wait(TIMEOUT) == 0
