"""The blocking client: :class:`Client`, a context manager around one socket.

Not thread-safe: use one :class:`Client` per thread (connections are cheap).

The socket stays in blocking mode for its whole life: a read with a deadline first waits
for it to become readable with ``poll(2)`` (:meth:`Client._receive`), which is what a timed
``recv`` does inside anyway. Switching with ``socket.settimeout`` instead cost an ``ioctl``
each way on every event taken and every call sent, twice per stop in a hit loop.

Nor is the ``poll`` saved by a blocking ``recv`` bounded with ``SO_RCVTIMEO`` (one system
call per event, as a C client reads): a task asleep in ``recv`` on an AF_UNIX stream socket
is also woken whenever the peer reads what this socket sent — the daemon taking a
``resume`` frees its buffer, and ``unix_write_space`` (net/unix/af_unix.c) wakes the
socket's whole wait queue with ``EPOLLOUT``, which a ``poll`` for ``POLLIN`` filters out and
``recv``'s wait does not. Measured in a hit loop (issue 13): 1.5 voluntary context switches
per stop instead of 0.9, and no CPU saved that the shared test machine's noise let show.
"""

from __future__ import annotations

import os
import select
import socket as _socket
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

from hwbkpt._events import Event, WatchInfo
from hwbkpt._session import (
    Session,
    region_results,
    resolve_socket,
    unavailable_error,
    watch_params,
)

__all__ = ["Client", "Watch"]

_RECV_SIZE = 65536

# Marks "use the client's default timeout" (None means "wait forever").
_DEFAULT: Any = object()


class Watch(WatchInfo):
    """A watch made by :meth:`Client.watch`; ``count()`` and ``remove()`` call the daemon."""

    _client: Client

    def __init__(self, client: Client, result: dict[str, Any], **spec: Any) -> None:
        super().__init__(result, **spec)
        self._client = client

    def count(self) -> int:
        """Hits of this watch since it was installed (any mode); after its process exited
        or called exec (``state == "ended"``), its final count.

        Raises NotFoundError once the watch was removed.
        """
        client = self._client
        return int(client._call("count", {"id": self.id}, client.timeout))

    def remove(self) -> None:
        """Remove the watch (``unwatch``), ended or not; its slots go to pending watches.

        Raises NotFoundError if it was removed already.
        """
        client = self._client
        client._call("unwatch", {"id": self.id}, client.timeout)
        client._session.forget_watch(self.id)
        self.state = "removed"


class Client:
    """A blocking connection to hwbkptd.

    ``socket`` defaults to ``$HWBKPT_SOCKET`` or ``/run/hwbkptd/hwbkptd.sock``; ``name``
    (sent in ``hello``) to the program's name; ``timeout`` is the default limit in seconds
    for each call (``None``: wait forever). Connects and says ``hello`` on construction.

    Every call raises the exception class the daemon raised (from :mod:`hwbkpt_proto`),
    :class:`ConnectionLostError` when the daemon goes away (also for a call in flight),
    and :class:`TimeoutError` when its timeout passes (the connection stays usable).
    Constructing raises :class:`DaemonUnavailableError` if no daemon answers.
    """

    def __init__(
        self,
        socket: str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.socket_path = resolve_socket(socket)
        self.timeout = timeout
        self._session = Session()
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
        except OSError as err:
            sock.close()
            raise unavailable_error(self.socket_path, err) from err
        # Blocking from now on; _receive waits for a deadline with poll (module docstring).
        sock.settimeout(None)
        self._sock: _socket.socket | None = sock
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)
        try:
            hello = self._session.hello_params(name)
            self.server_info: dict[str, Any] = self.call("hello", **hello)
        except BaseException:
            self.close()
            raise
        self._session.hello_done(self.server_info)

    # -- plumbing -----------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection; the daemon releases everything this client held."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._session.connection_lost("the client closed the connection")

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _deadline(self, timeout: float | None) -> float | None:
        return None if timeout is None else time.monotonic() + timeout

    def _receive(self, deadline: float | None, *, now: bool = False) -> bool:
        """Read once from the socket into the session; False if the deadline passed
        (``now``: if nothing could be read without waiting)."""
        if self._sock is None:
            self._session.check_alive()
            return False
        if not now and deadline is not None:
            remaining = deadline - time.monotonic()
            # poll() takes milliseconds and rounds a fraction up, so it never wakes early;
            # a hangup or an error counts as readable, and recv() then reports it.
            if remaining <= 0 or not self._readable.poll(remaining * 1000):
                return False
        try:
            data = self._sock.recv(_RECV_SIZE, _socket.MSG_DONTWAIT if now else 0)
        except BlockingIOError:
            return False  # ``now``: a call since the caller's poll took the data already
        except OSError as err:
            self._session.connection_lost(f"reading from the socket failed: {err}")
        else:
            self._session.receive_data(data)
        if self._session.lost:
            self._drop_socket()
        return True

    def _drop_socket(self) -> None:
        """The connection is gone (EOF, error, a stream it cannot read): close the socket at
        once rather than when the caller remembers ``close()`` (or the garbage collector,
        with a ResourceWarning, does). Queued events stay readable."""
        if self._sock is not None:
            self._readable.unregister(self._sock)
            self._sock.close()
            self._sock = None

    def _send(self, data: bytes) -> None:
        self._session.check_alive()
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as err:
            self._session.connection_lost(f"writing to the socket failed: {err}")
            self._drop_socket()
            raise self._session.lost_error() from err

    def call(self, method: str, /, *, timeout: float | None = _DEFAULT, **params: Any) -> Any:
        """Call ``method`` with named ``params`` and return its result.

        ``timeout`` (seconds, ``None`` for no limit) defaults to the client's. Raises the
        daemon's error class, :class:`ConnectionLostError` or :class:`TimeoutError`.
        """
        return self._call(method, params, self.timeout if timeout is _DEFAULT else timeout)

    def _call(self, method: str, params: dict[str, Any], timeout: float | None) -> Any:
        """:meth:`call` with the params as one map (the wrapped methods build it once)."""
        session = self._session
        msgid, data = session.request(method, params)
        self._send(data)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not session.has_result(msgid) and not session.lost:
            if not self._receive(deadline):
                session.abandon(msgid)
                raise TimeoutError(f"hwbkptd did not answer {method!r} in time")
        return session.take_result(msgid)

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to ``timeout`` seconds (``None``: forever).

        Returns ``None`` when the timeout passes. Events that arrived while a call waited
        for its answer come first, in order. Raises :class:`ConnectionLostError` once the
        queued events are consumed and the daemon is gone.
        """
        event = self._session.next_event()
        if event is not None:
            return event  # queued (e.g. the rest of a batch of hits): no clock, no syscall
        deadline = self._deadline(timeout)
        while True:
            self._session.check_alive()
            if not self._receive(deadline):
                return None
            event = self._session.next_event()
            if event is not None:
                return event

    def read_ready(self) -> None:
        """Read what the daemon's socket holds, without waiting and without polling it
        first: for a caller whose own ``poll`` just said it is readable (one system call
        instead of ``next_event(timeout=…)``'s two). Reads nothing if a call made since
        that ``poll`` has taken the data already. What arrived is then returned by
        ``next_event(0)``. Raises :class:`ConnectionLostError` if the connection was lost
        before; losing it now only marks it lost, as in ``next_event``."""
        self._receive(None, now=True)

    # -- the daemon's methods -----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The daemon's state: clients, targets, slots, counters (see PROTOCOL.md)."""
        result: dict[str, Any] = self.call("status")
        return result

    def watch(
        self,
        pid: int,
        addr: int,
        length: int = 8,
        access: str = "w",
        mode: str = "count",
        tid: int | None = None,
        priority: int = 0,
        condition: str | None = None,
    ) -> Watch:
        """Watch ``length`` bytes at ``addr`` in process ``pid`` (every thread unless
        ``tid``) for ``access`` (``x``, ``w``, ``rw``) in ``mode`` (``count``, ``notify``,
        ``stop``). A watch that gets no slot now is pending and installed when one frees.

        ``condition`` (e.g. ``"new == 1234"``, PROTOCOL.md "Conditions"): only hits for
        which it is true count, notify or stop. Raises InvalidArgumentError (with the
        column and what was expected) for one that does not parse."""
        params = watch_params(pid, addr, length, access, mode, tid, priority, condition)
        result = self._call("watch", params, self.timeout)
        watch = Watch._made(self, result, pid, addr, length, access, mode, tid, priority,
                            condition)
        self._session.track_watch(watch)
        return watch

    def watch_region(
        self,
        pid: int,
        addr: int,
        size: int,
        access: str = "w",
        mode: str = "count",
        tid: int | None = None,
        priority: int = 0,
        condition: str | None = None,
    ) -> list[Watch]:
        """Watch ``size`` bytes at ``addr`` with as many slots as it takes (gdb's split);
        all pieces or none. A ``condition`` applies to each piece, on that piece's bytes."""
        params = watch_params(pid, addr, size, access, mode, tid, priority, condition)
        params["size"] = params.pop("length")
        watches = []
        for result, piece_addr, piece_length in region_results(
            self.call("watch_region", **params)
        ):
            spec = {"pid": pid, "addr": piece_addr if piece_addr is not None else addr,
                    "length": piece_length or size, "access": access, "mode": mode,
                    "tid": tid, "priority": priority, "condition": condition}
            watch = Watch(self, result, **spec)
            self._session.track_watch(watch)
            watches.append(watch)
        return watches

    def watches(self) -> list[dict[str, Any]]:
        """This client's watches as the daemon sees them."""
        result: list[dict[str, Any]] = self.call("watches")
        return result

    def resume(self, tid: int, *, wait: bool = True, signal: int | None = None) -> None:
        """Release this client's hold on stopped thread ``tid``.

        ``wait=False`` sends it without waiting for the daemon's answer (a hit loop saves a
        round trip); a failure then arrives as an ``error`` event. ``signal``: 0 discards
        the signal this client was told of (a ``stop`` with reason ``signal``), another
        number delivers that one instead (proto/PROTOCOL.md, ``signals``).
        """
        if not wait and signal is None:  # a hit loop's path: bytes encoded once per thread
            self._send(self._session.thread_notification("resume", tid))
        else:
            self._continue("resume", tid, wait, signal)

    def step(self, tid: int, *, wait: bool = True, signal: int | None = None) -> None:
        """Single-step stopped thread ``tid``; the step trap comes back as a ``stop`` event.
        ``wait=False`` and ``signal`` as for :meth:`resume`."""
        self._continue("step", tid, wait, signal)

    def _continue(self, method: str, tid: int, wait: bool, signal: int | None) -> None:
        if wait:
            self.call(method, tid=tid, **({} if signal is None else {"signal": signal}))
        elif signal is None:
            self._send(self._session.thread_notification(method, tid))
        else:  # not the fixed [tid] shape (PROTOCOL.md 1.1): the named form
            self._send(self._session.notification(method, {"tid": tid, "signal": signal}))

    def interrupt(self, tid: int) -> None:
        """Stop thread ``tid``; a ``stop`` event follows."""
        self.call("interrupt", tid=tid)

    def attach(self, pid: int, *, hold_threads: bool = False) -> list[int]:
        """Keep process ``pid`` managed for this client, with or without watches, until
        :meth:`detach`; returns its threads. A ``thread`` event (``state`` "new" or
        "exit") follows each thread that appears or ends, an ``exit`` event its end.
        ``hold_threads``: each new thread is held for this client from its first stop (a
        ``stop`` event with reason "thread" comes first); attach again to change it."""
        params: dict[str, Any] = {"pid": pid}
        if hold_threads:
            params["hold_threads"] = True
        return list(self.call("attach", **params)["threads"])

    def detach(self, pid: int) -> None:
        """Leave process ``pid``: release every thread this client holds in it."""
        self.call("detach", pid=pid)

    def hold_all(self, pid: int) -> list[int]:
        """Stop every thread of ``pid`` for this client (attach first); returns the threads
        whose ``stop`` event (reason ``interrupt``) will follow."""
        return list(self.call("hold_all", pid=pid)["threads"])

    def signals(self, pid: int, *, report: bool = True, passed: Iterable[int] = ()) -> None:
        """Be told of the signals process ``pid`` receives (attach first), except those in
        ``passed``: each comes as a ``stop`` event with reason ``signal``, and the thread
        waits for this client's :meth:`resume`. ``report=False`` ends that."""
        params: dict[str, Any] = {"pid": pid, "report": report, "pass": sorted(set(passed))}
        self.call("signals", **params)

    def fileno(self) -> int:
        """The socket's file descriptor, to wait for events with ``select``/``poll``
        alongside other files (then call :meth:`next_event`). Raises
        :class:`ConnectionLostError` once closed."""
        if self._sock is None:
            self._session.check_alive()
            raise self._session.lost_error()
        return self._sock.fileno()

    def get_regs(self, tid: int) -> dict[str, int]:
        """The registers of stopped thread ``tid`` (``struct user_regs_struct`` names)."""
        result: dict[str, int] = self.call("get_regs", tid=tid)
        return result

    def set_regs(self, tid: int, regs: Mapping[str, int]) -> None:
        """Change registers of stopped thread ``tid`` (only the names given);
        ``regs`` may be a ``stop`` event's :class:`~hwbkpt_proto.Regs`."""
        self.call("set_regs", tid=tid, regs=dict(regs))

    def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr`` in process ``pid``."""
        return bytes(self.call("read_memory", pid=pid, addr=addr, size=size))

    def write_memory(self, pid: int, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` in process ``pid``."""
        self.call("write_memory", pid=pid, addr=addr, data=bytes(data))

    def peek_dr(self, tid: int, n: int) -> int:
        """This client's virtual debug register ``n`` (0-7) of thread ``tid``."""
        return int(self.call("peek_dr", tid=tid, n=n))

    def poke_dr(self, tid: int, n: int, value: int) -> None:
        """Write this client's virtual debug register ``n`` of thread ``tid``."""
        self.call("poke_dr", tid=tid, n=n, value=value)

    def peek_user(self, tid: int, offset: int) -> int:
        """``PTRACE_PEEKUSER`` on this client's view of thread ``tid``."""
        return int(self.call("peek_user", tid=tid, offset=offset))

    def poke_user(self, tid: int, offset: int, value: int) -> None:
        """``PTRACE_POKEUSER`` on this client's view of thread ``tid``."""
        self.call("poke_user", tid=tid, offset=offset, value=value)
