"""One client connection as the daemon sees it: identity, and the queue of what it is sent.

Theory of operation
-------------------
Everything a client is sent — responses and events — goes through its
:class:`ClientHandle`, in the order it was produced. When nothing is waiting, a message is
written to the socket at once (the per-hit path: a trio task switch would cost more than
the write); otherwise it is queued, and the connection's writer task sends everything
queued in one ``send_all``. The tracer *corks* every connection while it handles one
wake-up, so all the events of that wake-up leave in one write per client.

Responses are never dropped. Events are bounded per client in two rooms of
``max_queued_events`` each. *Hits* (``hit``, a ``hits`` batch weighing the hits it holds,
and the ``lost`` of a ring overflow) fill the first: one that finds it full is counted and
dropped, and the client gets a ``lost`` event with the count as soon as it reads again (or
before its next control event, whichever comes first). *Control events* — everything that
must not be dropped: ``exit``, ``exec``, ``installed``, ``uninstalled``, ``throttled``,
``stop``, ``error`` and those ``lost`` summaries — have the second room to themselves, so a
client whose hits filled its queue keeps its connection and learns what it lost and how the
process ended (issue 10, point 4). Only a client that lets the control room fill as well
(it has stopped reading altogether) is disconnected, and the backend releases its holds; a
``stop`` it does not take within ``--stop-timeout`` disconnects it sooner (DESIGN.md §7).

Reading is here too (:meth:`ClientHandle.read_some`): one non-blocking read of the socket,
handed to the server's handler. The connection's reader task calls it when trio says the
socket is readable, and so does the tracer's hot loop (hwbkptd/_tracer.py) while a
stop-mode hit loop runs, so a client's ``resume`` is served without a trio task switch.
Both run in the main thread and never hold bytes across a yield, so messages are handled
in the order they were sent, whoever reads them.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from hwbkpt_proto import Connection, Limits, Notification, ProtocolError, Response, pack_regs

__all__ = ["ClientHandle", "Counters"]

log = logging.getLogger("hwbkptd.server")

#: How long a client we are disconnecting gets to take its last message.
_DISCONNECT_GRACE = 1.0
#: Bytes read from a client at a time (also by the server, from a client it refuses).
_RECV_SIZE = 65536


@dataclass
class Counters:
    """The server's counters, reported by ``status``."""

    clients_total: int = 0
    requests: int = 0
    errors: int = 0
    events_sent: int = 0
    events_dropped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "clients_total": self.clients_total,
            "requests": self.requests,
            "errors": self.errors,
            "events_sent": self.events_sent,
            "events_dropped": self.events_dropped,
        }


class ClientHandle:
    """One client connection, as the backend sees it.

    ``pid``, ``uid`` and ``gid`` are the peer's ``SO_PEERCRED`` credentials, read at accept
    (the credentials of the process that called ``connect``); authorize against them.
    ``name`` is what the client said in ``hello`` (``None`` before).
    """

    def __init__(
        self,
        client_id: int,
        pid: int,
        uid: int,
        gid: int,
        *,
        max_queued_events: int,
        cancel_scope: trio.CancelScope,
    ) -> None:
        self.id = client_id
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.name: str | None = None
        # The version agreed in ``hello``: from 2 on, ``stop`` carries its registers as one
        # bin (hwbkpt_proto._regs); send_event converts.
        self.protocol_version = 1
        self.connected_at = time.time()
        self.disconnect_reason: str | None = None
        self._conn = Connection(Limits())
        self._max_queued_events = max_queued_events
        self._cancel_scope = cancel_scope
        # Encoded messages waiting for the writer, how many of them are events, and how
        # many of those are control events (the room of their own, module docstring).
        self._out: collections.deque[bytes] = collections.deque()
        self._queued_events = 0
        self._queued_control = 0
        self._lost = 0
        self._wakeup = trio.lowlevel.ParkingLot()
        self._fd = -1  # the connection's socket, once the server has it (for direct writes)
        # What to do with bytes read (the server's message handler); False stops reading.
        # Set by the server to its handler, called as ``_on_data(self, data)``: a bound
        # method of the server, not a closure over this handle, so a closed connection's
        # handle is freed at once instead of waiting in a reference cycle for the
        # collector.
        self._on_data: Callable[[ClientHandle, bytes], bool] = lambda client, data: True
        self.reading = True  # False after a protocol error: what follows is not read
        self._writing = False  # the writer task has a batch in flight
        self._corked = False  # hold writes until uncork() (a batch of hits is being made)
        # The last read_some() took everything the socket held (a short read): the reader
        # waits for more instead of reading again only to hear EAGAIN.
        self.drained = False
        self.events_sent = 0
        self.events_dropped = 0
        self._server_counters: Counters | None = None
        # Stop-timeout bookkeeping (trio clock): when the oldest ``stop`` event still in
        # ``_out`` was queued, and the same for the batch the writer is sending now. A stop
        # counts as *taken* once the ``send_all`` of its batch has completed.
        self._stop_queued_at: float | None = None
        self._stop_sending_at: float | None = None

    def __repr__(self) -> str:
        return f"<client {self.id} pid={self.pid} uid={self.uid} gid={self.gid} name={self.name!r}>"

    def set_protocol_version(self, version: int) -> None:
        """Speak protocol ``version`` (agreed in ``hello``) from the next message on."""
        self.protocol_version = version
        self._conn.positional = version >= 2

    @property
    def closing(self) -> bool:
        """True once the client is being disconnected; further events are not queued."""
        return self.disconnect_reason is not None

    def send_event(self, kind: str, fields: dict[str, Any], *, droppable: bool = True) -> bool:
        """Queue the event ``kind`` with ``fields`` for this client; never blocks.

        Call it from any trio task of the main thread. ``droppable`` events (hits) that find
        ``max_queued_events`` hits queued are counted and dropped (the client gets a
        ``lost`` event before the next control event, or when it reads again); the others
        (control events) have a room of the same size of their own, and only one finding
        that full too disconnects the client. Returns ``False`` if the event was not queued.

        Raises :class:`ProtocolError` if ``fields`` cannot be encoded (a backend bug).
        """
        if self.closing:
            return False
        control = not droppable
        if control:
            if self._queued_control >= self._max_queued_events:
                self.disconnect(
                    f"the client did not read its events: {self._queued_control} control "
                    f"events are queued and a {kind!r} event cannot be dropped"
                )
                return False
        elif self._queued_events - self._queued_control >= self._max_queued_events:
            # A dropped ``lost`` event (ring overflow) carries its own count.
            if kind == "lost":
                count = fields.get("count", 1)
            elif kind == "hits":
                count = len(fields.get("tid", ()))  # a batch: every hit in it is lost
            else:
                count = 1
            self._lost += count if type(count) is int and count > 0 else 1
            self.events_dropped += 1
            if self._server_counters is not None:
                self._server_counters.events_dropped += 1
            return False
        if kind == "stop" and self.protocol_version >= 2 and "regs" in fields:
            fields = {**fields, "regs": pack_regs(fields["regs"])}
        data = self._conn.send(Notification(kind, fields))
        if kind == "stop" and self._stop_queued_at is None:
            self._stop_queued_at = trio.current_time()
        if self._lost:
            self._report_lost()
        # A batch of hits weighs what it holds: the limit is on events a client has not
        # read, and a batch may overshoot it by its own size.
        events = len(fields.get("tid", ())) if kind == "hits" else 1
        self._enqueue(data, events=events, control=events if control else 0)
        if not self._out and not self._writing:
            self._stop_queued_at = None  # written at once: taken
        return True

    def untaken_stop_since(self) -> float | None:
        """Trio time at which the oldest ``stop`` event not yet written to the socket was
        queued, or ``None``. Whether the client *resumed* does not matter here."""
        times = [t for t in (self._stop_sending_at, self._stop_queued_at) if t is not None]
        return min(times) if times else None

    def disconnect(self, reason: str, *, code: str | None = None) -> None:
        """Close this connection soon: queue a ``disconnected`` event, then hang up.

        ``code`` (an error code such as ``EPROTO``) is added to the event when given. The
        client gets a short grace period to read what is queued; a client that does not
        read is cut off when it ends. ``Backend.client_disconnected`` follows as for any
        disconnect. Calling it again does nothing.
        """
        if self.closing:
            return
        self.disconnect_reason = reason
        log.info("disconnecting %r: %s", self, reason)
        fields: dict[str, Any] = {"reason": reason}
        if code is not None:
            fields["code"] = code
        with contextlib.suppress(ProtocolError):
            self._enqueue(self._conn.send(Notification("disconnected", fields)))
        self._cancel_scope.deadline = min(
            self._cancel_scope.deadline, trio.current_time() + _DISCONNECT_GRACE
        )
        self._wakeup.unpark_all()

    # -- used by the server -------------------------------------------------------------

    def _enqueue(self, data: bytes, *, events: int = 0, control: int = 0) -> None:
        """Send ``data`` (holding ``events`` events, 0 for a response, ``control`` of them
        control events) in order."""
        if not self._out and not self._writing and not self._corked:
            self._write_now(data, events, control)
            return
        self._out.append(data)
        self._queued_events += events
        self._queued_control += control
        if not self._corked:
            self._wakeup.unpark_all()

    def _write_now(self, data: bytes, events: int, control: int = 0) -> None:
        """Write at once if the socket takes it; the rest goes to the writer task.

        This is the per-hit path (a stop event, a batch of hits, a response), where a
        trio task switch costs more than the write. The socket is non-blocking (trio made
        it so); only called with nothing queued and no batch in flight, so order holds.
        """
        sent = 0
        if self._fd >= 0:
            try:
                sent = os.write(self._fd, data)
            except OSError:
                sent = 0  # full (EAGAIN) or broken: the writer finds out which
        if sent == len(data):
            self.events_sent += events
            if self._server_counters is not None:
                self._server_counters.events_sent += events
            if self._lost and not self.closing and not self._corked:
                self._report_lost()  # the client reads again: tell it what it lost now
            return
        self._out.append(data[sent:])
        self._queued_events += events
        self._queued_control += control
        self._wakeup.unpark_all()

    def read_some(self) -> bool | None:
        """Read what the socket holds now (never blocks) and have it handled.

        Returns ``True`` if bytes were read and handled, ``False`` if there were none yet,
        ``None`` if this connection is not to be read any more: the peer hung up (or the
        socket failed), or reading stopped after a protocol error. A handler that fails
        (a daemon bug) disconnects this client only.
        """
        if not self.reading or self._fd < 0:
            return None
        try:
            data = os.read(self._fd, _RECV_SIZE)
        except BlockingIOError:
            return False
        except OSError:  # ECONNRESET and the like: the peer is gone
            return None
        if not data:
            return None
        self.drained = len(data) < _RECV_SIZE
        self._handle(data)
        return True if self.reading else None

    def _handle(self, data: bytes) -> None:
        """Have bytes read from the socket handled (a failing handler disconnects)."""
        try:
            self.reading = self._on_data(self, data)
        except Exception:
            log.exception("%r: handling what it sent failed", self)
            self.reading = False
            self.disconnect("the daemon failed handling what this client sent (a bug; see its log)")

    # -- the compiled stop round (hwbkptd/_fastpath.c) ----------------------------------

    def fast_fd(self) -> int:
        """The socket the compiled stop round may write ``stop`` events to and read
        ``resume`` notifications from directly, or -1. Only a connection with nothing
        between it and the socket qualifies: protocol 2, nothing queued or being written,
        no hits lost to report, no bytes received and not yet decoded, not closing."""
        if (
            self.protocol_version < 2
            or not self.reading
            or self.closing
            or self._out
            or self._writing
            or self._corked
            or self._lost
            or not self._conn.idle
        ):
            return -1
        return self._fd

    def fast_report(
        self, resumes: int, sent: int, unsent: bytes | None, unread: bytes | None
    ) -> None:
        """What the compiled stop round did on this connection, after the engine took its
        report: ``resumes`` taken (calls, in the server's counters), ``sent`` ``stop``
        events written whole, ``unsent`` the rest of one the socket did not take (queued
        for the writer, as :meth:`_write_now` queues it), ``unread`` bytes it read that
        are not plain resumes (handled now, in order, as :meth:`read_some` would)."""
        if sent:
            self.events_sent += sent
            if self._server_counters is not None:
                self._server_counters.events_sent += sent
        if resumes and self._server_counters is not None:
            self._server_counters.requests += resumes
        if unsent is not None:
            self._out.append(unsent)
            self._queued_events += 1
            self._queued_control += 1
            if self._stop_queued_at is None:
                self._stop_queued_at = trio.current_time()
            self._wakeup.unpark_all()
        if unread is not None:
            self._handle(unread)

    @property
    def corked(self) -> bool:
        """True between :meth:`cork` and :meth:`uncork`."""
        return self._corked

    def cork(self) -> None:
        """Hold what is sent from now on until :meth:`uncork`, to write it as one batch."""
        self._corked = True

    def uncork(self) -> None:
        """Write everything held since :meth:`cork` in one go (or hand it to the writer)."""
        self._corked = False
        if not self._out:
            return
        if self._writing:
            self._wakeup.unpark_all()
            return
        data = b"".join(self._out)
        events, self._queued_events = self._queued_events, 0
        control, self._queued_control = self._queued_control, 0
        self._out.clear()
        self._write_now(data, events, control)
        if not self._out and not self._writing:
            self._stop_queued_at = None

    def _queue_result(self, msgid: int, result: Any) -> None:
        """Queue the successful response to request ``msgid`` (as :meth:`_queue_response`).

        Raises ProtocolError if it cannot be encoded.
        """
        data = self._conn.send_result(msgid, result)
        if not self.closing:
            self._enqueue(data)

    def _queue_response(self, response: Response) -> None:
        """Queue a response; never dropped, except that nothing follows ``disconnected``.

        Raises ProtocolError if it cannot be encoded.
        """
        data = self._conn.send(response)
        if not self.closing:
            self._enqueue(data)

    async def _writer(self, stream: trio.SocketStream) -> None:
        while True:
            if not self._out:
                if self.closing:
                    # Everything, the ``disconnected`` event included, has been sent.
                    self._cancel_scope.cancel()
                    return
                await self._wakeup.park()
                continue
            batch = b"".join(self._out)
            sent_events = self._queued_events
            self._out.clear()
            self._queued_events = self._queued_control = 0
            self._stop_sending_at, self._stop_queued_at = self._stop_queued_at, None
            self._writing = True
            try:
                await stream.send_all(batch)
            finally:
                self._writing = False
            self._stop_sending_at = None
            self.events_sent += sent_events
            if self._server_counters is not None:
                self._server_counters.events_sent += sent_events
            hits_queued = self._queued_events - self._queued_control
            if self._lost and not self.closing and hits_queued < self._max_queued_events:
                # The client is reading again: report what it lost now, not only before
                # the next event (which may never come).
                self._report_lost()

    def _report_lost(self) -> None:
        """Queue the ``lost`` summary of the hits dropped so far: a control event (it is
        what makes the drops visible, so it is never dropped itself)."""
        lost, self._lost = self._lost, 0
        self._enqueue(
            self._conn.send(Notification("lost", {"count": lost, "what": "hit"})),
            events=1,
            control=1,
        )
