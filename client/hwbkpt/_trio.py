"""The trio client: ``async with AsyncClient() as c: ...``.

There is no background task: whichever task is waiting (for a response or an event) reads
the socket on behalf of all, and the others wait until what they need has arrived. So a
client never owns a nursery (an exception in your ``async with`` body stays itself, not an
exception group), and events are read only while someone waits, as with the blocking
client. Reading is cancel-safe (bytes are taken from the socket only once it is readable,
in one synchronous ``read``), so cancelling the reading task (``trio.fail_after`` around a
call) loses no bytes: another waiter takes over the reading.

The socket is read and written with plain non-blocking ``os.read``/``os.write`` on its
file descriptor; trio is asked only to wait: ``wait_readable`` before each read (a task
reads because what it needs has not arrived yet), ``wait_writable`` when a write meets
``EAGAIN``. ``SocketStream.send_all`` and ``receive_some`` cost three scheduler rounds
per call (a checkpoint before, the wait, a checkpoint after); a request whose answer has
to be waited for needs exactly one, and the rpc bench (issue 13) measured the difference
as ~40 % of the client's CPU per request. Every call still checkpoints at least once, as
trio's rules ask.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import Any, NoReturn

import trio

from hwbkpt._events import Event, WatchInfo
from hwbkpt._session import (
    Session,
    region_results,
    resolve_socket,
    unavailable_error,
    watch_params,
)

__all__ = ["AsyncClient", "AsyncWatch"]

_RECV_SIZE = 65536


class AsyncWatch(WatchInfo):
    """A watch made by :meth:`AsyncClient.watch`; ``await count()``, ``await remove()``."""

    _client: AsyncClient

    def __init__(self, client: AsyncClient, result: dict[str, Any], **spec: Any) -> None:
        super().__init__(result, **spec)
        self._client = client

    async def count(self) -> int:
        """Hits of this watch since it was installed (any mode); after its process exited
        or called exec (``state == "ended"``), its final count.

        Raises NotFoundError once the watch was removed.
        """
        return int(await self._client._call("count", {"id": self.id}))

    async def remove(self) -> None:
        """Remove the watch (``unwatch``), ended or not; its slots go to pending watches.

        Raises NotFoundError if it was removed already.
        """
        await self._client._call("unwatch", {"id": self.id})
        self._client._session.forget_watch(self.id)
        self.state = "removed"


class AsyncClient:
    """A trio connection to hwbkptd; use ``async with AsyncClient(...) as client``.

    ``socket`` defaults to ``$HWBKPT_SOCKET`` or ``/run/hwbkptd/hwbkptd.sock``; ``name``
    (sent in ``hello``) to the program's name. There are no timeouts: wrap calls in
    ``trio.fail_after``. Calls raise the daemon's exception class, and
    :class:`ConnectionLostError` when the daemon goes away (also for calls in flight);
    entering raises :class:`DaemonUnavailableError` if no daemon answers.

    Several tasks may call concurrently on one client; the daemon answers one client's
    requests in order.
    """

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, name: str | None = None
    ) -> None:
        self.socket_path = resolve_socket(socket)
        self._name = name
        self._session = Session()
        self._stream: trio.SocketStream | None = None
        self._fd = -1  # the stream's socket, read and written directly (module docstring)
        self._send_lock = trio.Lock()
        self._reading = False
        self._arrived = trio.lowlevel.ParkingLot()
        self.server_info: dict[str, Any] = {}

    # -- plumbing -----------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect and say ``hello`` (``async with`` does this for you)."""
        try:
            self._stream = await trio.open_unix_socket(self.socket_path)
        except OSError as err:
            raise unavailable_error(self.socket_path, err) from err
        self._fd = self._stream.socket.fileno()
        try:
            self.server_info = await self.call("hello", **self._session.hello_params(self._name))
        except BaseException:
            await self.aclose()
            raise
        self._session.hello_done(self.server_info)

    async def aclose(self) -> None:
        """Close the connection; the daemon releases everything this client held."""
        if self._stream is not None:
            stream, self._stream = self._stream, None
            self._fd = -1
            self._session.connection_lost("the client closed the connection")
            self._arrived.unpark_all()
            await stream.aclose()

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _receive(self) -> None:
        """Read once into the session, or wait while another task reads; always a
        checkpoint (it yields to trio at least once)."""
        if self._reading:
            await self._arrived.park()
            return
        self._session.check_alive()  # also after aclose(), which closed self._fd
        fd = self._fd
        self._reading = True
        try:
            while True:
                # Wait first: we read because what we need has not arrived, so a read now
                # would mostly say EAGAIN; bytes already there make this return at once.
                # notify_closing() (our aclose) wakes it with ClosedResourceError.
                await trio.lowlevel.wait_readable(fd)
                try:
                    data = os.read(fd, _RECV_SIZE)
                except BlockingIOError:
                    continue
                except OSError as err:  # ECONNRESET and the like
                    self._session.connection_lost(f"reading from the socket failed: {err}")
                else:
                    self._session.receive_data(data)
                break
        except trio.ClosedResourceError as err:
            self._session.connection_lost(f"reading from the socket failed: {err}")
        finally:
            self._reading = False
            if self._arrived:  # tasks parked in _receive while this one read
                self._arrived.unpark_all()

    async def call(self, method: str, /, **params: Any) -> Any:
        """Call ``method`` with named ``params`` and return its result.

        Raises the daemon's error class or :class:`ConnectionLostError`.
        """
        return await self._call(method, params)

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        """:meth:`call` with the params as one map (the wrapped methods build it once)."""
        await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled call is not sent
        session = self._session
        msgid, data = session.request(method, params)
        try:
            await self._send_only(data, checkpoint=False)  # _receive is one
            while not session.has_result(msgid) and not session.lost:
                await self._receive()
        except BaseException:
            session.abandon(msgid)
            raise
        return session.take_result(msgid)

    async def next_event(self) -> Event:
        """The next event, in arrival order; waits as long as it takes.

        Raises :class:`ConnectionLostError` once queued events are consumed and the daemon
        is gone.
        """
        while True:
            event = self._session.next_event()
            if event is not None:
                return event
            self._session.check_alive()
            await self._receive()

    async def events(self) -> AsyncIterator[Event]:
        """``async for event in client.events()``: every event, in order, until the
        connection is lost (then :class:`ConnectionLostError`)."""
        while True:
            yield await self.next_event()

    # -- the daemon's methods -----------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        """The daemon's state: clients, targets, slots, counters (see PROTOCOL.md)."""
        result: dict[str, Any] = await self.call("status")
        return result

    async def watch(
        self,
        pid: int,
        addr: int,
        length: int = 8,
        access: str = "w",
        mode: str = "count",
        tid: int | None = None,
        priority: int = 0,
        condition: str | None = None,
    ) -> AsyncWatch:
        """Watch ``length`` bytes at ``addr`` in ``pid``; see :meth:`hwbkpt.Client.watch`."""
        params = watch_params(pid, addr, length, access, mode, tid, priority, condition)
        result = await self._call("watch", params)
        watch = AsyncWatch._made(self, result, pid, addr, length, access, mode, tid, priority,
                                 condition)
        self._session.track_watch(watch)
        return watch

    async def watch_region(
        self,
        pid: int,
        addr: int,
        size: int,
        access: str = "w",
        mode: str = "count",
        tid: int | None = None,
        priority: int = 0,
        condition: str | None = None,
    ) -> list[AsyncWatch]:
        """Watch ``size`` bytes at ``addr``; see :meth:`hwbkpt.Client.watch_region`."""
        params = watch_params(pid, addr, size, access, mode, tid, priority, condition)
        params["size"] = params.pop("length")
        watches = []
        for result, piece_addr, piece_length in region_results(
            await self.call("watch_region", **params)
        ):
            spec = {"pid": pid, "addr": piece_addr if piece_addr is not None else addr,
                    "length": piece_length or size, "access": access, "mode": mode,
                    "tid": tid, "priority": priority, "condition": condition}
            watch = AsyncWatch(self, result, **spec)
            self._session.track_watch(watch)
            watches.append(watch)
        return watches

    async def watches(self) -> list[dict[str, Any]]:
        """This client's watches as the daemon sees them."""
        result: list[dict[str, Any]] = await self.call("watches")
        return result

    async def resume(self, tid: int, *, wait: bool = True, signal: int | None = None) -> None:
        """Release this client's hold on stopped thread ``tid``.

        ``wait=False`` sends it without waiting for the daemon's answer; a failure then
        arrives as an ``error`` event. ``signal`` as for the blocking client's ``resume``.
        """
        params: dict[str, Any] = {"tid": tid} if signal is None else {"tid": tid, "signal": signal}
        if wait:
            await self.call("resume", **params)
        else:
            await self._send_only(self._session.notification("resume", params))

    async def step(self, tid: int, *, wait: bool = True, signal: int | None = None) -> None:
        """Single-step stopped thread ``tid``; ``wait=False`` and ``signal`` as for
        :meth:`resume`."""
        params: dict[str, Any] = {"tid": tid} if signal is None else {"tid": tid, "signal": signal}
        if wait:
            await self.call("step", **params)
        else:
            await self._send_only(self._session.notification("step", params))

    async def signals(
        self, pid: int, *, report: bool = True, passed: Iterable[int] = ()
    ) -> None:
        """As the blocking client's ``signals``: be told of ``pid``'s signals but ``passed``."""
        await self.call("signals", pid=pid, report=report, **{"pass": sorted(set(passed))})

    async def _send_only(self, data: bytes, *, checkpoint: bool = True) -> None:
        """Send ``data`` whole, after what other tasks are sending.

        A checkpoint unless ``checkpoint`` is false (:meth:`call`, which waits for the
        answer next anyway). Raises :class:`ConnectionLostError`.
        """
        self._session.check_alive()  # also after aclose(), which closed self._fd
        if self._send_lock.locked():
            # Another task is still writing: queue behind it (trio's Lock is fair).
            async with self._send_lock:
                await self._write_all(data)
            return
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as err:  # EPIPE, ECONNRESET: the daemon is gone
            self._lost_writing(err)
        if sent == len(data):
            if checkpoint:
                await trio.lowlevel.checkpoint()
            return
        # The socket took part of it: hold the lock before yielding, so that no other
        # task's bytes come between the two parts.
        self._send_lock.acquire_nowait()
        try:
            await self._write_all(data[sent:])
        finally:
            self._send_lock.release()

    async def _write_all(self, data: bytes) -> None:
        """Write ``data``, waiting whenever the socket is full; hold the send lock."""
        view = memoryview(data)
        while view:
            self._session.check_alive()
            fd = self._fd
            try:
                sent = os.write(fd, view)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_writable(fd)
                except trio.ClosedResourceError as err:
                    self._lost_writing(err)
                continue
            except OSError as err:
                self._lost_writing(err)
            view = view[sent:]

    def _lost_writing(self, err: BaseException) -> NoReturn:
        self._session.connection_lost(f"writing to the socket failed: {err}")
        raise self._session.lost_error() from err

    async def interrupt(self, tid: int) -> None:
        """Stop thread ``tid``; a ``stop`` event follows."""
        await self.call("interrupt", tid=tid)

    async def get_regs(self, tid: int) -> dict[str, int]:
        """The registers of stopped thread ``tid``."""
        result: dict[str, int] = await self.call("get_regs", tid=tid)
        return result

    async def set_regs(self, tid: int, regs: Mapping[str, int]) -> None:
        """Change registers of stopped thread ``tid`` (only the names given);
        ``regs`` may be a ``stop`` event's :class:`~hwbkpt_proto.Regs`."""
        await self.call("set_regs", tid=tid, regs=dict(regs))

    async def read_memory(self, pid: int, addr: int, size: int) -> bytes:
        """``size`` bytes at ``addr`` in process ``pid``."""
        return bytes(await self.call("read_memory", pid=pid, addr=addr, size=size))

    async def write_memory(self, pid: int, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr`` in process ``pid``."""
        await self.call("write_memory", pid=pid, addr=addr, data=bytes(data))

    async def peek_dr(self, tid: int, n: int) -> int:
        """This client's virtual debug register ``n`` (0-7) of thread ``tid``."""
        return int(await self.call("peek_dr", tid=tid, n=n))

    async def poke_dr(self, tid: int, n: int, value: int) -> None:
        """Write this client's virtual debug register ``n`` of thread ``tid``."""
        await self.call("poke_dr", tid=tid, n=n, value=value)

    async def peek_user(self, tid: int, offset: int) -> int:
        """``PTRACE_PEEKUSER`` on this client's view of thread ``tid``."""
        return int(await self.call("peek_user", tid=tid, offset=offset))

    async def poke_user(self, tid: int, offset: int, value: int) -> None:
        """``PTRACE_POKEUSER`` on this client's view of thread ``tid``."""
        await self.call("poke_user", tid=tid, offset=offset, value=value)
