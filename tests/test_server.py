"""The server over a real Unix socket: a real daemon subprocess, real clients.

These run without an engine backend being required: they use only what the server itself
answers (``hello``, ``status``, ``ping``) and its error paths.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import trio

import hwbkpt
from hwbkpt_proto import PROTOCOL_VERSION, ProtocolError
from tests._daemon import Daemon

pytestmark = pytest.mark.timeout(60)


def _raw_connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10.0)
    s.connect(path)
    return s


def _read_until_eof(s: socket.socket, limit: float = 10.0) -> list[Any]:
    """Every message the daemon sends until it closes the connection."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        data = s.recv(65536)
        if not data:
            return list(unpacker)
        unpacker.feed(data)
    raise AssertionError("the daemon did not close the connection")


def _request(s: socket.socket, msgid: int, method: str, params: dict[str, Any]) -> Any:
    s.sendall(msgpack.packb([0, msgid, method, [params] if params else []]))
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    while True:
        data = s.recv(65536)
        assert data, "the daemon closed the connection"
        unpacker.feed(data)
        for msg in unpacker:
            if msg[0] == 1 and msg[1] == msgid:
                return msg


def test_hello_and_status(daemon: Daemon) -> None:
    with hwbkpt.Client(daemon.socket, name="first") as a, hwbkpt.Client(
        daemon.socket, name="second"
    ) as b:
        assert a.server_info["version"] == PROTOCOL_VERSION
        assert a.server_info["slots_per_thread"] == 4
        assert isinstance(a.server_info["capabilities"], list)
        assert a.server_info["client_id"] != b.server_info["client_id"]
        status = b.status()
    assert status["pid"] == daemon.pid
    assert status["uptime"] >= 0
    mine = {c["name"]: c for c in status["clients"]}
    assert set(mine) >= {"first", "second"}
    for c in mine.values():
        assert c["uid"] == os.getuid()
        assert c["gid"] == os.getgid()
        assert c["pid"] == os.getpid()
    counters = status["counters"]
    assert counters["clients_total"] >= 2
    assert counters["requests"] >= 3
    for key in ("errors", "events_sent", "events_dropped"):
        assert key in counters


async def test_async_client_status(daemon: Daemon) -> None:
    with trio.fail_after(10):
        async with hwbkpt.AsyncClient(daemon.socket, name="async-one") as c:
            status = await c.status()
            assert await c.call("ping", data=b"\x00\xff") == b"\x00\xff"
    (me,) = [x for x in status["clients"] if x["name"] == "async-one"]
    assert me["uid"] == os.getuid()
    assert me["id"] == c.server_info["client_id"]


def test_socket_file_mode(daemon: Daemon) -> None:
    st = os.stat(daemon.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660


def test_request_before_hello_is_eproto_and_connection_stays(daemon: Daemon) -> None:
    with _raw_connect(daemon.socket) as s:
        reply = _request(s, 7, "status", {})
        assert reply[2][0] == "EPROTO"
        assert "hello" in reply[2][1]
        reply = _request(s, 8, "hello", {"version": PROTOCOL_VERSION, "name": "raw"})
        assert reply[2] is None
        assert reply[3]["version"] == PROTOCOL_VERSION
        reply = _request(s, 9, "ping", {"data": 5})
        assert reply[2:] == [None, 5]


def test_wrong_version_is_eproto(daemon: Daemon) -> None:
    with _raw_connect(daemon.socket) as s:
        reply = _request(s, 1, "hello", {"version": 999, "name": "future"})
        assert reply[2][0] == "EPROTO"
        assert "999" in reply[2][1]


def test_unknown_method_raises_not_found(daemon: Daemon) -> None:
    with hwbkpt.Client(daemon.socket) as c:
        with pytest.raises(hwbkpt.NotFoundError):
            c.call("no_such_method", x=1)
        # The connection survives an error.
        assert c.call("ping", data="still here") == "still here"


def test_garbage_disconnects_only_that_client(daemon: Daemon) -> None:
    with hwbkpt.Client(daemon.socket, name="bystander") as good, _raw_connect(
        daemon.socket
    ) as bad:
        bad.sendall(b"\xc1" + b"garbage" * 10)  # 0xc1 is never valid msgpack
        messages = _read_until_eof(bad)
        assert messages[-1][:2] == [2, "disconnected"], messages
        assert messages[-1][2][0]["code"] == "EPROTO"
        assert "protocol error" in messages[-1][2][0]["reason"]
        assert good.call("ping", data=1) == 1
        # (Unnamed entries would be connections that never said hello, e.g. the fixture's
        # readiness probe if the daemon has not yet noticed it hang up.)
        names = [c["name"] for c in good.status()["clients"] if c["name"]]
        assert names == ["bystander"]
    assert daemon.alive()


def test_oversized_message_disconnects(daemon: Daemon) -> None:
    with _raw_connect(daemon.socket) as bad:
        # A bin header announcing 2**31 bytes: refused after the 4 MiB message limit, long
        # before 2 GiB arrive. The daemon may hang up while we still send (EPIPE/ECONNRESET).
        bad.sendall(msgpack.packb([0, 1, "hello", []])[:-1] + b"\xc6\x80\x00\x00\x00")
        try:
            for _ in range(80):
                bad.sendall(b"\0" * 65536)
            _read_until_eof(bad)
        except (BrokenPipeError, ConnectionResetError):
            pass
    assert daemon.alive()
    with hwbkpt.Client(daemon.socket) as c:
        assert c.call("ping") is None
    assert "exceeds the" in daemon.stderr()


async def test_many_concurrent_clients(daemon: Daemon) -> None:
    n_clients, n_calls = 100, 100
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        async with hwbkpt.AsyncClient(daemon.socket, name=f"c{i}") as c:
            for j in range(n_calls):
                assert await c.call("ping", data=[i, j]) == [i, j]
                done += 1

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(n_clients):
                nursery.start_soon(one, i)
    assert done == n_clients * n_calls


async def test_concurrent_calls_on_one_async_client(daemon: Daemon) -> None:
    results: dict[int, Any] = {}
    with trio.fail_after(20):
        async with hwbkpt.AsyncClient(daemon.socket) as c:

            async def one(i: int) -> None:
                results[i] = await c.call("ping", data=i)

            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(one, i)
    assert results == {i: i for i in range(50)}


def test_max_clients_refused_with_elimit(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory("--max-clients", "2")
    first = hwbkpt.Client(d.socket)
    # The fixture's readiness probe was a connection too, and the daemon notices its hangup
    # asynchronously: until it has, a second client would be the third.
    deadline = time.monotonic() + 10
    while len(first.status()["clients"]) > 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with (
        first,
        hwbkpt.Client(d.socket),
        pytest.raises(hwbkpt.LimitExceededError, match="max-clients"),
    ):
        hwbkpt.Client(d.socket)
    # Room again once the daemon has seen the two hang up (it notices asynchronously).
    deadline = time.monotonic() + 10
    while True:
        try:
            with hwbkpt.Client(d.socket) as c:
                assert c.call("ping", data=1) == 1
            break
        except hwbkpt.LimitExceededError:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_sigterm_exits_zero_and_removes_socket(daemon: Daemon) -> None:
    with hwbkpt.Client(daemon.socket) as c:
        c.status()
        assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket)
    assert "SIGTERM" in daemon.stderr()


def test_sigint_exits_zero(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(10) == 0
    assert not os.path.exists(daemon.socket)
    assert "Traceback" not in daemon.stderr()


def test_second_daemon_on_live_socket_refuses(daemon: Daemon) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "hwbkptd._main", "--socket", daemon.socket],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The first daemon is unharmed and still owns the socket.
    with hwbkpt.Client(daemon.socket) as c:
        assert c.status()["pid"] == daemon.pid


def test_stale_socket_is_replaced(daemon_factory: Callable[..., Daemon]) -> None:
    path = str(daemon_factory.tmpdir / "stale.sock")  # type: ignore[attr-defined]
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    assert os.path.exists(path)
    d = daemon_factory(socket=path)
    with hwbkpt.Client(path) as c:
        assert c.status()["pid"] == d.pid


def test_socket_directory_is_created(daemon_factory: Callable[..., Daemon]) -> None:
    path = daemon_factory.tmpdir / "run" / "hwbkptd" / "s.sock"  # type: ignore[attr-defined]
    daemon_factory(socket=str(path))
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755


def test_connection_lost_mid_call(daemon: Daemon) -> None:
    with hwbkpt.Client(daemon.socket, timeout=10) as c:
        c.status()
        os.kill(daemon.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        with pytest.raises(hwbkpt.ConnectionLostError, match="lost the connection"):
            c.status()
        with pytest.raises(hwbkpt.ConnectionLostError):
            c.next_event(timeout=1)


async def test_connection_lost_for_calls_in_flight(daemon: Daemon) -> None:
    """A call already waiting for its answer fails when the daemon dies.

    The daemon is stopped with SIGSTOP first so that the call is certainly in flight (sent,
    unanswered) when the daemon goes away.
    """
    with trio.fail_after(20):
        async with hwbkpt.AsyncClient(daemon.socket) as c:
            await c.status()
            os.kill(daemon.pid, signal.SIGSTOP)
            failures: list[BaseException] = []

            async def waiting_call() -> None:
                try:
                    await c.call("ping")
                except hwbkpt.ConnectionLostError as err:
                    failures.append(err)

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(waiting_call)
                await trio.sleep(0.2)
                os.kill(daemon.pid, signal.SIGKILL)
            assert len(failures) == 3
            with pytest.raises(hwbkpt.ConnectionLostError):
                await c.next_event()


def test_missing_daemon_raises_daemon_unavailable(tmp_path: Any) -> None:
    with pytest.raises(hwbkpt.DaemonUnavailableError, match="make run"):
        hwbkpt.Client(str(tmp_path / "nothing.sock"))


def test_hwbkpt_socket_env(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HWBKPT_SOCKET", daemon.socket)
    with hwbkpt.Client() as c:
        assert c.socket_path == daemon.socket
        assert c.status()["pid"] == daemon.pid


def test_protocol_error_class_is_exported() -> None:
    assert issubclass(hwbkpt.ProtocolError, hwbkpt.HwbkptError)
    assert hwbkpt.ProtocolError is ProtocolError
