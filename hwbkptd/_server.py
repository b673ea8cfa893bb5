"""The socket server: accept clients, run their sessions, dispatch requests, push events.

Theory of operation
-------------------
The server is the only layer of the daemon that does socket I/O. It owns the listening Unix
socket and one :class:`ClientHandle` per connection; everything else (watches, slots,
ptrace) lives behind the :class:`Backend` seam, which the server calls with plain method
calls from the trio main thread.

Each connection runs in its own nursery with two tasks: the **reader** feeds bytes to a
sans-I/O :class:`hwbkpt_proto.Connection` and handles the requests it yields *one at a
time, in order*, synchronously (no handler blocks: a client's next request is not read
before the previous one is answered, which keeps the engine free of per-client
concurrency and gives natural back-pressure; different clients run concurrently). While a
stop-mode hit loop runs, the tracer's hot loop reads the socket instead, through the same
:meth:`~hwbkptd._client.ClientHandle.read_some`. The **writer** sends what the client's
:class:`~hwbkptd._client.ClientHandle` could not write at once (see that module for
ordering, batching and the per-client event limit). A request sent as a notification is
run the same way, without a response; only its failure comes back, as an ``error`` event.

Exceptions become error responses in exactly one place (:meth:`Server._answer`):
a :class:`HwbkptError` with its own code, anything else as ``EINTERNAL`` with the traceback
logged. A malformed byte stream closes that one connection after an ``EPROTO`` error.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import importlib
import logging
import os
import signal
import socket
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from hwbkpt_proto import (
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Connection,
    HwbkptError,
    InternalError,
    LimitExceededError,
    Limits,
    Notification,
    ProtocolError,
    Request,
    Response,
    response_for_error,
)
from hwbkptd._client import _RECV_SIZE, ClientHandle, Counters
from hwbkptd._config import Config

__all__ = [
    "Backend",
    "ClientHandle",
    "Counters",
    "Server",
    "StartupError",
    "serve",
]

log = logging.getLogger("hwbkptd.server")

#: Hardware breakpoint slots per x86-64 thread (DR0-DR3).
SLOTS_PER_THREAD = 4


#: How long a client refused for the client limit gets to send the request we refuse.
_REFUSE_GRACE = 2.0


def daemon_version() -> str:
    """The installed version of the hwbkptd distribution."""
    from hwbkptd import __version__

    return __version__


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do. ``main`` exits 1."""


class Backend(Protocol):
    """The engine as the server sees it (``hwbkptd._rpc.EngineBackend`` implements it).

    All methods are called from the trio main thread. Optional extras the server looks for
    with ``getattr``: ``capabilities: list[str]`` (reported by ``hello``).
    """

    def client_connected(self, client: ClientHandle) -> None:
        """A client connected (before its ``hello``)."""

    def client_disconnected(self, client: ClientHandle) -> None:
        """The client is gone: release what it owns. Called exactly once per client,
        possibly after :meth:`shutdown`."""

    def call(self, client: ClientHandle, method: str, params: dict[str, Any]) -> Any:
        """Run one request; raise a :class:`HwbkptError` subclass to fail it
        (:class:`NotFoundError` for an unknown method). It must not block: it is called
        from the connection's reader task and from the tracer's hot loop alike."""

    def status(self) -> dict[str, Any]:
        """Merged into the ``status`` result. ``counters`` is merged into the server's
        counters; ``clients`` (a map of client id to a dict) into each client's entry."""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background work; started with ``nursery.start`` before the socket listens."""

    def shutdown(self) -> None:
        """SIGTERM/SIGINT: detach from everything, leave every target running."""


def peer_credentials(sock: socket.socket | trio.socket.SocketType) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of a connected Unix socket (``SO_PEERCRED``, unix(7))."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


@dataclass
class Server:
    """Serves one backend on listening sockets; see the module docstring."""

    config: Config
    backend: Backend
    counters: Counters = field(default_factory=Counters)
    clients: dict[int, ClientHandle] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    socket_paths: list[str] = field(default_factory=list)
    _next_client_id: int = 1

    # -- connections --------------------------------------------------------------------

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Run one client's session until it hangs up, misbehaves or is disconnected."""
        try:
            pid, uid, gid = peer_credentials(stream.socket)
        except OSError as err:
            log.warning("cannot read the credentials of a new connection: %s", err)
            await stream.aclose()
            return
        client_id = self._next_client_id
        self._next_client_id += 1
        async with stream:
            if len(self.clients) >= self.config.max_clients:
                await self._refuse(stream, client_id, pid, uid)
                return
            with trio.CancelScope() as scope:
                client = ClientHandle(
                    client_id,
                    pid,
                    uid,
                    gid,
                    max_queued_events=self.config.max_queued_events,
                    cancel_scope=scope,
                )
                client._server_counters = self.counters
                client._fd = stream.socket.fileno()
                client._on_data = self._handle_data
                self.clients[client_id] = client
                self.counters.clients_total += 1
                log.info("%r connected", client)
                try:
                    self.backend.client_connected(client)
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(client._writer, stream)
                        await self._reader(client)
                        # The peer hung up: the writer has no one left to write to.
                        nursery.cancel_scope.cancel()
                except* (trio.BrokenResourceError, trio.ClosedResourceError) as group:
                    log.info("%r: connection broken: %s", client, group.exceptions[0])
                except* Exception:
                    # Never let one connection take the listener (and the daemon) down.
                    log.exception("%r: connection task failed", client)
                finally:
                    client._fd = -1  # the socket closes below; its number may be reused
                    del self.clients[client_id]
                    log.info(
                        "%r disconnected%s",
                        client,
                        f" ({client.disconnect_reason})" if client.disconnect_reason else "",
                    )
                    try:
                        self.backend.client_disconnected(client)
                    except Exception:
                        log.exception("backend.client_disconnected(%r) failed", client)

    async def _refuse(self, stream: trio.SocketStream, client_id: int, pid: int, uid: int) -> None:
        """Answer the first request of a client over the client limit with ELIMIT, hang up."""
        err = LimitExceededError(
            f"the daemon already serves {self.config.max_clients} clients "
            "(its --max-clients); try again later"
        )
        log.warning("refusing client %d (pid %d, uid %d): %s", client_id, pid, uid, err)
        conn = Connection(Limits())
        with trio.move_on_after(_REFUSE_GRACE):
            with contextlib.suppress(trio.BrokenResourceError, ProtocolError):
                while True:
                    data = await stream.receive_some(_RECV_SIZE)
                    if not data:
                        return
                    conn.receive_data(data)
                    msg = conn.next_message()
                    if isinstance(msg, Request):
                        await stream.send_all(conn.send(response_for_error(msg.msgid, err)))
                        return
                    if msg is not None:
                        break
                await stream.send_all(
                    conn.send(
                        Notification("disconnected", {"reason": err.message, "code": err.code})
                    )
                )

    async def _reader(self, client: ClientHandle) -> None:
        """Read and run what the client sends, in order (:meth:`ClientHandle.read_some`).

        Reading the socket directly (it is non-blocking) makes a ``resume`` in a hit loop
        cost one wake-up of this task, where ``receive_some`` added a scheduling round
        after every read. A read that came back short took all the socket held, so the
        next step is to wait, not a read that would only say ``EAGAIN`` (one system call
        and a round of Python per request, issue 13). Fairness: after a read that did not
        have to wait this task yields once, so a client that never stops sending cannot
        starve the others.
        """
        waited = True
        while True:
            got = client.read_some()
            if got is None:
                if client.reading:
                    return  # the peer hung up
                # A protocol error: stop reading; the writer flushes the error and hangs up.
                await trio.sleep_forever()
            if not got or client.drained:
                await trio.lowlevel.wait_readable(client._fd)
                waited = True
                continue
            if not waited:
                await trio.lowlevel.checkpoint()
            waited = False

    def _handle_data(self, client: ClientHandle, data: bytes) -> bool:
        """Run every complete message in ``data`` (and what came before); ``False`` after
        a protocol error, when the connection must not be read any more.

        The client is corked meanwhile, so the answers to every request of one read leave
        in one write, in order (a client that sends several requests at once gets them
        back together; a lone request costs the same one write as before). A connection
        the tracer has corked already stays the tracer's to uncork.
        """
        if client.corked:
            return self._handle_messages(client, data)
        client.cork()
        try:
            return self._handle_messages(client, data)
        finally:
            client.uncork()

    def _handle_messages(self, client: ClientHandle, data: bytes) -> bool:
        """Run the messages of ``data`` in order; ``False`` after a protocol error.

        A read that is one whole request and nothing else (a client waiting for each
        answer: the usual case) is decoded in one piece (:meth:`Connection.take_request`,
        issue 13); a request after a partial message, several in one read, a notification
        or anything the fast decoder is not sure of goes through the general decoder, which
        keeps their order and names what is wrong.
        """
        conn = client._conn
        try:
            request = conn.take_request(data)
            if request is not None:
                self._answer(client, request)
                return True
            conn.receive_data(data)
            while (msg := conn.next_message()) is not None:
                if isinstance(msg, Request):
                    self._answer(client, msg)
                elif isinstance(msg, Notification):
                    self._call_without_reply(client, msg)
                else:
                    log.debug("%r sent a response (msgid %d); ignored", client, msg.msgid)
        except ProtocolError as err:
            self.counters.errors += 1
            log.warning("%r: protocol error, closing: %s", client, err.message)
            client.disconnect(f"protocol error: {err.message}", code=err.code)
            return False
        return True

    async def stop_watchdog(self) -> None:
        """Disconnect every client that has not taken a ``stop`` event within
        ``config.stop_timeout`` seconds (DESIGN.md §7); its holds are then released."""
        timeout = self.config.stop_timeout
        period = min(max(timeout / 4, 0.01), 1.0)
        while True:
            await trio.sleep(period)
            now = trio.current_time()
            for client in list(self.clients.values()):
                since = client.untaken_stop_since()
                if since is not None and now - since >= timeout and not client.closing:
                    client.disconnect(
                        f"a stop event waited {now - since:.1f} s to be written to the socket "
                        f"(the daemon's --stop-timeout is {timeout:g} s): the client does not "
                        "read its events; its stops are released"
                    )

    # -- requests -----------------------------------------------------------------------

    def _answer(self, client: ClientHandle, request: Request) -> None:
        """Run one request and queue its response: the one place errors become responses."""
        response: Response
        try:
            result = self._run(client, request.method, request.params)
        except HwbkptError as err:
            response = response_for_error(request.msgid, err)
        else:
            try:
                client._queue_result(request.msgid, result)
                return
            except ProtocolError as err:
                # The result cannot be encoded: the daemon's bug, not the client's.
                log.error("%r %s: cannot encode the result: %s", client, request.method, err)
                response = response_for_error(
                    request.msgid,
                    InternalError(f"{request.method}: the daemon could not encode its result"),
                )
        self.counters.errors += 1
        client._queue_response(response)

    def _call_without_reply(self, client: ClientHandle, call: Notification) -> None:
        """A notification from a client is a call nobody waits for (e.g. ``resume`` in a
        hit loop): no response is sent, and only a failure comes back, as an ``error``
        event naming the method."""
        try:
            self._run(client, call.method, call.params)
        except HwbkptError as err:
            self.counters.errors += 1
            client.send_event(
                "error",
                {"method": call.method, "code": err.code, "message": err.message},
                droppable=False,
            )

    def _run(self, client: ClientHandle, method: str, params: dict[str, Any]) -> Any:
        """Run one call; the one place where any failure becomes a :class:`HwbkptError`
        (anything else is a daemon bug: ``EINTERNAL``, with the traceback logged)."""
        self.counters.requests += 1
        try:
            return self._dispatch(client, method, params)
        except HwbkptError as err:
            log.debug("%r %s failed: %s %s", client, method, err.code, err.message)
            raise
        except Exception as err:
            log.exception("%r %s(%r) crashed", client, method, params)
            raise InternalError(
                f"{method} failed inside the daemon ({type(err).__name__}: {err}); "
                "this is a bug, the daemon's log has the traceback"
            ) from err

    def _dispatch(self, client: ClientHandle, method: str, params: dict[str, Any]) -> Any:
        if method == "hello":
            return self._hello(client, params)
        if client.name is None:
            raise ProtocolError(f"the first request must be 'hello', not {method!r}")
        if method == "status":
            return self.status()
        if method == "ping":
            # A round trip that touches nothing: liveness checks, latency, tests.
            return params.get("data")
        return self.backend.call(client, method, params)

    def _hello(self, client: ClientHandle, params: dict[str, Any]) -> dict[str, Any]:
        if client.name is not None:
            raise ProtocolError("'hello' was already sent on this connection")
        version = params.get("version")
        # type() rather than ==: True == 1 but is not a version.
        if type(version) is not int or version not in PROTOCOL_VERSIONS:
            spoken = ", ".join(map(str, PROTOCOL_VERSIONS))
            raise ProtocolError(
                f"protocol version {version!r} is not supported; this daemon speaks "
                f"versions {spoken} (upgrade the client or the daemon)"
            )
        name = params.get("name", "")
        if not isinstance(name, str):
            raise ProtocolError(f"hello: name must be a string, got {type(name).__name__}")
        client.name = name or f"pid {client.pid}"
        client.set_protocol_version(version)
        log.info("%r said hello (protocol version %d)", client, version)
        return {
            "version": version,
            "daemon_version": daemon_version(),
            "slots_per_thread": SLOTS_PER_THREAD,
            "capabilities": list(getattr(self.backend, "capabilities", [])),
            "client_id": client.id,
        }

    def status(self) -> dict[str, Any]:
        """The ``status`` result: the server's view merged with ``backend.status()``."""
        extra = dict(self.backend.status())
        per_client = extra.pop("clients", None) or {}
        backend_counters = extra.pop("counters", None) or {}
        clients = []
        for client in self.clients.values():
            entry: dict[str, Any] = {
                "id": client.id,
                "pid": client.pid,
                "uid": client.uid,
                "gid": client.gid,
                "name": client.name,
                "protocol": client.protocol_version,
                "queued_events": client._queued_events,
                "events_dropped": client.events_dropped,
            }
            entry.update(per_client.get(client.id, {}))
            clients.append(entry)
        result: dict[str, Any] = {
            "pid": os.getpid(),
            "version": daemon_version(),
            "protocol_version": PROTOCOL_VERSION,
            "uptime": time.monotonic() - self.started_at,
            "socket": ", ".join(self.socket_paths) or self.config.socket_path,
            "clients": clients,
            "counters": {**self.counters.as_dict(), **backend_counters},
        }
        result.update(extra)
        return result


# -- the listening socket -----------------------------------------------------------------


def _systemd() -> Any:
    """``hwbkptd._systemd`` (socket activation, sd_notify) if it is installed, else None."""
    try:
        return importlib.import_module("hwbkptd._systemd")
    except ImportError:
        return None


def _notify(state: str) -> None:
    sd = _systemd()
    if sd is not None:
        try:
            sd.notify(state)
        except Exception:
            log.exception("sd_notify(%r) failed", state)


def _check_not_running(path: str) -> None:
    """Refuse to start over a live daemon; remove a stale socket file.

    Raises :class:`StartupError` if a daemon answers on ``path`` or the path is not a socket.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"{path} exists and is not a socket; remove it or pick another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as err:
        raise StartupError(f"cannot check whether a daemon runs on {path}: {err}") from err
    finally:
        probe.close()
    raise StartupError(
        f"another hwbkptd is already running on {path}; stop it first "
        "(systemctl stop hwbkptd, or kill the process) or pick another --socket"
    )


def bind_socket(path: str) -> socket.socket:
    """Create the listening socket at ``path``: parent directory 0755, socket 0660.

    The socket's group is ``hwbkpt`` when that group exists (DESIGN.md §7). Raises
    :class:`StartupError` when a daemon already runs there or the path cannot be used.
    """
    _check_not_running(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            os.chmod(parent, 0o755)
        except OSError as err:
            raise StartupError(f"cannot create the socket directory {parent}: {err}") from err
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bind with a umask that never lets the socket be more open than 0660, even briefly.
        old_umask = os.umask(0o117)
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o660)
        with contextlib.suppress(KeyError, PermissionError):
            os.chown(path, -1, grp.getgrnam("hwbkpt").gr_gid)
        sock.listen(128)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise StartupError(f"{path} is in use by another process") from err
        raise StartupError(f"cannot listen on {path}: {err}") from err
    return sock


@contextlib.contextmanager
def _listening_sockets(config: Config) -> Iterator[list[socket.socket]]:
    """The sockets to serve on; removes the socket file at the end if we made it."""
    sd = _systemd()
    inherited: list[socket.socket] = list(sd.listen_fds()) if sd is not None else []
    if inherited:
        log.info("serving on %d socket(s) passed by systemd", len(inherited))
        try:
            yield inherited
        finally:
            for s in inherited:
                s.close()
        return
    sock = bind_socket(config.socket_path)
    ino = os.stat(config.socket_path).st_ino
    try:
        yield [sock]
    finally:
        sock.close()
        # Remove the file only if it is still ours (not a successor's socket).
        with contextlib.suppress(FileNotFoundError):
            if os.stat(config.socket_path).st_ino == ino:
                os.unlink(config.socket_path)


def _sockname(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, bytes):  # abstract namespace
        return "@" + name[1:].decode(errors="replace")
    return str(name)


async def _signals(cancel_scope: trio.CancelScope, shutdown: Callable[[], None]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s: shutting down", signal.Signals(signum).name)
            shutdown()
            cancel_scope.cancel()
            return


async def serve(
    config: Config,
    backend: Backend,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM or SIGINT; then shut the backend down and return.

    Raises :class:`StartupError` when the socket cannot be used (another daemon runs there,
    no permission, ...).
    """
    server = Server(config, backend)
    shut_down = False

    def shutdown() -> None:
        nonlocal shut_down
        if shut_down:
            return
        shut_down = True
        _notify("STOPPING=1")
        try:
            backend.shutdown()
        except Exception:
            log.exception("backend.shutdown() failed")

    with _listening_sockets(config) as socks:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signals, nursery.cancel_scope, shutdown)
                nursery.start_soon(server.stop_watchdog)
                await nursery.start(backend.run)
                listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
                await nursery.start(trio.serve_listeners, server.handle_connection, listeners)
                server.socket_paths = [_sockname(s) for s in socks]
                log.info(
                    "hwbkptd %s listening on %s (pid %d)",
                    daemon_version(),
                    ", ".join(server.socket_paths),
                    os.getpid(),
                )
                _notify("READY=1")
                task_status.started(server)
        finally:
            shutdown()
