"""The client's sans-I/O core, shared by the blocking and the trio client (as in jeepney).

A :class:`Session` turns calls into bytes and received bytes into results and events; it
never touches a socket. The front ends (:mod:`hwbkpt._blocking`, :mod:`hwbkpt._trio`) own
the socket, write what :meth:`Session.request` returns and feed what they read to
:meth:`Session.receive_data`, then ask for the result of their call or the next event.

* msgids are allocated here, and responses are matched to them; a response to a call whose
  caller gave up (timeout, cancellation) is dropped when it arrives.
* events are queued in the order they arrived, including those that arrived while the
  caller was waiting for a response, so none is lost or reordered.
* when the connection goes away every call still waiting, and every later one, raises
  :class:`ConnectionLostError` with the reason.

The request path (issue 13)
---------------------------
A watch+unwatch loop is two requests and two answers, each a few dozen bytes. Going through
:class:`Request` (its checks), :func:`~hwbkpt_proto.encode` (a new msgpack ``Packer`` per
message) and the :class:`Connection` decoder (feed, parse ahead, container hooks,
:func:`~hwbkpt_proto.from_wire`, a checked :class:`Response`) cost 3 to 3.5 µs to encode
a ``watch`` and 3.5 to 5.5 µs to decode an answer (``time.thread_time``, best of 7), ~16 µs
of the library's ~30 µs of Python per pair; this way it is 1.5 and 1 to 4 µs (~8 µs a
pair; bench "client library CPU/pair", bench/README.md). So :meth:`Session.request` packs a
well-formed call with one reused ``Packer``, and :meth:`Session.receive_data` decodes a
successful answer that arrives alone in one read with one ``unpackb`` and the checks the
connection would make of it (:func:`hwbkpt_proto._connection.plain_value`, shared with the
daemon's :meth:`Connection.take_request`). Both produce exactly what the general path
does; anything else (an error answer, two messages in one read, a value the checks refuse,
an answer nobody waits for) takes the general path, which builds the same bytes or names
the same error.
"""

from __future__ import annotations

import collections
import os
import sys
from typing import Any

import msgpack

from hwbkpt._events import Event, WatchInfo
from hwbkpt_proto import (
    MAX_MSGID,
    PROTOCOL_VERSION,
    Connection,
    ConnectionLostError,
    HwbkptError,
    Limits,
    Notification,
    ProtocolError,
    Regs,
    Request,
    Response,
    error_from_wire,
)
from hwbkpt_proto._connection import FAST_DEPTH, PLAIN_SCALARS, plain_value

__all__ = [
    "DEFAULT_SOCKET",
    "DaemonUnavailableError",
    "Session",
    "default_name",
    "resolve_socket",
]

#: Where the daemon listens unless told otherwise (same as ``hwbkptd --socket``'s default).
DEFAULT_SOCKET = "/run/hwbkptd/hwbkptd.sock"

#: Environment variable that overrides :data:`DEFAULT_SOCKET`.
SOCKET_ENV = "HWBKPT_SOCKET"

# Session._take_response: the bytes a successful response starts with ([1, msgid, nil,
# result]: fixarray 4, then 1). The most one may weigh to be decoded in one piece and the
# checks of its values are the protocol package's, shared with the daemon's
# Connection.take_request.
_RESPONSE_HEAD = b"\x94\x01"
_STR = frozenset({str})
_unpackb = msgpack.unpackb


# How many encoded per-thread notifications a session remembers (Session.thread_notification);
# past that it starts over, so a program with very many threads costs well under 1 MB.
_MAX_THREAD_NOTIFICATIONS = 4096


class DaemonUnavailableError(ConnectionLostError):
    """Could not connect to the daemon at all. ``socket`` is the path tried; the ``OSError``
    is the ``__cause__`` (``FileNotFoundError``/``ConnectionRefusedError``: no daemon;
    ``PermissionError``: the socket's permissions keep you out)."""

    def __init__(self, message: str, *, socket: str = "") -> None:
        super().__init__(message)
        self.socket = socket

    def __reduce__(self) -> Any:
        return (type(self), (self.message,), {"socket": self.socket})


def resolve_socket(socket: str | os.PathLike[str] | None) -> str:
    """The socket path to use: ``socket``, else ``$HWBKPT_SOCKET``, else the default."""
    if socket is not None:
        return os.fspath(socket)
    return os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def default_name() -> str:
    """The client name sent in ``hello`` by default: the program's name (``argv[0]``)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "python"
    return os.path.basename(argv0) or argv0


def unavailable_error(path: str, err: OSError) -> DaemonUnavailableError:
    """The error for a failed connect to ``path``, saying what to do about it."""
    if isinstance(err, PermissionError):
        message = (
            f"permission denied on {path}: the socket is only for root and the group "
            "'hwbkpt' (mode 0660); add yourself to that group or run as root"
        )
    elif isinstance(err, FileNotFoundError | ConnectionRefusedError):
        message = (
            f"no hwbkptd is listening on {path}; start it with `make run`, "
            f"`hwbkptd --socket {path}` or `systemctl start hwbkptd.socket`"
        )
    else:
        message = f"cannot connect to hwbkptd on {path}: {err}"
    return DaemonUnavailableError(message, socket=path)


class Session:
    """Sans-I/O state of one client connection; see the module docstring."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._conn = Connection(limits or Limits())
        # Containers a response's result may nest: the message's own array counts as 1.
        self._result_depth = min(self._conn.limits.max_depth - 1, FAST_DEPTH)
        self._pack = msgpack.Packer(use_bin_type=True).pack  # what encode() does, reused
        self._next_msgid = 1
        self._waiting: set[int] = set()  # calls whose caller still wants the answer
        # Arrived answers: (error or None, result), as in Response.
        self._responses: dict[int, tuple[tuple[str, str] | None, Any]] = {}
        self._events: collections.deque[Event] = collections.deque()
        self._watches: dict[int, WatchInfo] = {}
        self._lost: str | None = None
        self._disconnect_reason = ""
        self._thread_notifications: dict[tuple[str, int], bytes] = {}
        #: the daemon's ``hello`` result, once :meth:`hello_done` has seen it
        self.server_info: dict[str, Any] = {}

    # -- sending ------------------------------------------------------------------------

    def request(self, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        """Start a call: its msgid and the bytes to send.

        Raises :class:`ConnectionLostError` if the connection is gone and
        :class:`ProtocolError` if the params cannot be encoded.
        """
        self.check_alive()
        msgid = self._next_msgid
        self._next_msgid = 1 if msgid >= MAX_MSGID else msgid + 1
        data = None
        if (
            type(method) is str
            and method
            and type(params) is dict
            and _STR.issuperset(map(type, params))
        ):
            # What Request's checks accept: the bytes encode() would make (module docstring).
            try:
                data = self._pack([0, msgid, method, [params] if params else []])
            except Exception:
                data = None  # not encodable: the general path names the error
            if data is not None and len(data) > self._conn.limits.max_message_size:
                data = None
        if data is None:
            data = self._conn.send(Request(msgid, method, params))
        self._waiting.add(msgid)
        return msgid, data

    def notification(self, method: str, params: dict[str, Any]) -> bytes:
        """The bytes of a call sent as a notification: the daemon runs it and answers only
        if it fails (an ``error`` event). Raises like :meth:`request`."""
        self.check_alive()
        return self._conn.send(Notification(method, params))

    def thread_notification(self, method: str, tid: int) -> bytes:
        """``notification(method, {"tid": tid})``, encoded once per thread and method.

        A hit loop resumes (or steps) the same few threads at every stop; building and
        checking a :class:`Notification` and encoding it each time was a measurable share of
        the client's CPU per stop. The bytes depend on nothing but the two arguments.
        Raises like :meth:`notification`.
        """
        if type(tid) is not int:
            # Only exact ints are remembered: True == 1 (same key) but encodes differently,
            # and an unhashable value must fail the way notification() fails.
            return self.notification(method, {"tid": tid})
        self.check_alive()
        key = (method, tid)
        data = self._thread_notifications.get(key)
        if data is None:
            data = self.notification(method, {"tid": tid})
            if len(self._thread_notifications) >= _MAX_THREAD_NOTIFICATIONS:
                self._thread_notifications.clear()
            self._thread_notifications[key] = data
        return data

    def hello_params(self, name: str | None) -> dict[str, Any]:
        """The params of the ``hello`` every connection starts with."""
        return {"version": PROTOCOL_VERSION, "name": default_name() if name is None else name}

    def hello_done(self, result: dict[str, Any]) -> None:
        """Record the daemon's answer to ``hello``; from version 2 on, send ``resume`` and
        ``step`` in their fixed shape (hwbkpt_proto.POSITIONAL)."""
        self.server_info = dict(result)
        version = result.get("version")
        self._conn.positional = type(version) is int and version >= 2
        self._thread_notifications.clear()  # encoded in the shape of the old version

    # -- receiving ----------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; an empty ``data`` means the daemon hung up.

        Never raises: a malformed stream ends the session (later calls raise
        :class:`ConnectionLostError` saying why).
        """
        if self._lost is not None:
            return
        if not data:
            self.connection_lost("the daemon closed the connection")
            return
        stop = self._conn.take_stop(data)
        if stop is not None:
            # One ``stop`` alone in this read, the hit loop's case (Connection.take_stop).
            stop["regs"] = Regs(stop["regs"])
            self._events.append(Event("stop", stop))
            return
        if data.startswith(_RESPONSE_HEAD) and self._take_response(data):
            return
        try:
            self._conn.receive_data(data)
            while (msg := self._conn.next_message()) is not None:
                if isinstance(msg, Response):
                    if msg.msgid in self._waiting:
                        self._responses[msg.msgid] = (msg.error, msg.result)
                elif isinstance(msg, Notification):
                    self._on_notification(msg)
                # A request from the daemon is not part of the protocol: ignore it.
        except ProtocolError as err:
            self.connection_lost(f"the daemon sent bytes this client cannot read ({err})")

    def _take_response(self, data: bytes) -> bool:
        """Record ``data`` if it is exactly one successful response to a waiting call and
        nothing is buffered (the request path's case, module docstring); else ``False``,
        and nothing was consumed: the general path decodes ``data``."""
        # A response this small cannot break a size limit (Connection.one_piece_max): only
        # its values are checked.
        if len(data) > self._conn.one_piece_max or not self._conn.idle:
            return False
        try:
            obj = _unpackb(data, raw=False, strict_map_key=False)
        except Exception:
            return False  # incomplete, more than one message, malformed: the general path
        if type(obj) is not list or len(obj) != 4 or obj[2] is not None:
            return False
        msgid = obj[1]
        # Only a waiting call's msgid (so a valid one); a stray answer is dropped there.
        if type(msgid) is not int or msgid not in self._waiting:
            return False
        result = obj[3]
        if type(result) not in PLAIN_SCALARS and not plain_value(result, self._result_depth):
            return False
        self._responses[msgid] = (None, result)
        return True

    def _on_notification(self, msg: Notification) -> None:
        """Queue the event(s) of one notification.

        Raises :class:`ProtocolError` for a ``stop`` whose ``regs`` bin is not 216 bytes.
        """
        if msg.method == "stop":
            # The hot event: no watch changes state, so skip the lookups below.
            p = msg.params
            regs = p.get("regs")
            if type(regs) is bytes:  # protocol version 2: one bin, decoded when first read
                p["regs"] = Regs(regs)
            self._events.append(Event("stop", p))
            return
        if msg.method == "hits":
            # A batch of hits of the same watches, sent as arrays to keep the per-hit cost
            # low on both sides; delivered as one ``hit`` event each, in order.
            p = msg.params
            watches = p.get("watches")
            if "new" in p:  # values read in the kernel at each hit (a watch with a condition)
                self._events.extend(
                    Event(
                        "hit",
                        {"watches": watches, "tid": t, "ip": ip, "time": w, "new": n, "old": o},
                    )
                    for t, ip, w, n, o in zip(
                        p.get("tid", ()), p.get("ip", ()), p.get("time", ()),
                        p.get("new", ()), p.get("old", ()), strict=False,
                    )
                )  # fmt: skip
                return
            self._events.extend(
                Event("hit", {"watches": watches, "tid": tid, "ip": ip, "time": when})
                for tid, ip, when in zip(
                    p.get("tid", ()), p.get("ip", ()), p.get("time", ()), strict=False
                )
            )
            return
        event = Event(msg.method, msg.params)
        if msg.method == "disconnected":
            # The daemon is hanging up on us; say why when the socket closes.
            self._disconnect_reason = str(msg.params.get("reason", ""))
        # installed/uninstalled name their watch (``watch``); exec/exit end every watch of
        # the process (PROTOCOL.md section 7).
        watch_id = msg.params.get("watch", msg.params.get("id"))
        if isinstance(watch_id, int) and (watch := self._watches.get(watch_id)) is not None:
            watch._apply(event)
        elif msg.method in ("exec", "exit") and isinstance(msg.params.get("pid"), int):
            for w in self._watches.values():
                if w.pid == msg.params["pid"]:
                    w._apply(event)
        self._events.append(event)

    def connection_lost(self, reason: str) -> None:
        """The socket is gone (EOF or error): fail every waiting and later call."""
        if self._lost is None:
            if self._disconnect_reason:
                reason = f"the daemon disconnected this client: {self._disconnect_reason}"
            self._lost = reason

    @property
    def lost(self) -> bool:
        """True once the connection is gone."""
        return self._lost is not None

    def lost_error(self) -> ConnectionLostError:
        """The exception for a call on (or waiting on) a lost connection."""
        return ConnectionLostError(
            f"lost the connection to hwbkptd: {self._lost}; "
            "the daemon stopped or crashed (check `hwbkpt status` or its log)"
        )

    def check_alive(self) -> None:
        """Raise :class:`ConnectionLostError` if the connection is gone."""
        if self._lost is not None:
            raise self.lost_error()

    # -- results and events -------------------------------------------------------------

    def has_result(self, msgid: int) -> bool:
        """True when the answer to ``msgid`` has arrived."""
        return msgid in self._responses

    def take_result(self, msgid: int) -> Any:
        """The result of call ``msgid``; raises the daemon's error as its own class.

        Raises :class:`ConnectionLostError` if the answer has not arrived and the connection
        is gone, :class:`KeyError` if it simply has not arrived yet.
        """
        response = self._responses.pop(msgid, None)
        if response is None:
            if self._lost is not None:
                self._waiting.discard(msgid)
                raise self.lost_error()
            raise KeyError(msgid)
        self._waiting.discard(msgid)
        error, result = response
        if error is not None:
            raise error_from_wire(*error)
        return result

    def abandon(self, msgid: int) -> None:
        """The caller of ``msgid`` gave up: drop its answer now or when it arrives."""
        self._waiting.discard(msgid)
        self._responses.pop(msgid, None)

    def next_event(self) -> Event | None:
        """The oldest queued event, or ``None``."""
        return self._events.popleft() if self._events else None

    def track_watch(self, watch: WatchInfo) -> None:
        """Keep ``watch`` updated by the events about it."""
        self._watches[watch.id] = watch

    def forget_watch(self, watch_id: int) -> None:
        """Stop tracking a removed watch."""
        self._watches.pop(watch_id, None)


# -- parameters of the wrapped methods (shared by both front ends) --------------------------


def watch_params(
    pid: int,
    addr: int,
    length: int,
    access: str,
    mode: str,
    tid: int | None,
    priority: int,
    condition: str | None = None,
) -> dict[str, Any]:
    """The params of ``watch`` (``tid=None`` means every thread of the process)."""
    params: dict[str, Any] = {
        "pid": pid,
        "addr": addr,
        "length": length,
        "access": access,
        "mode": mode,
        "priority": priority,
    }
    if tid is not None:
        params["tid"] = tid
    if condition is not None:
        params["condition"] = condition
    return params


def region_results(result: Any) -> list[tuple[dict[str, Any], int | None, int | None]]:
    """``(watch result, addr, length)`` per piece of a ``watch_region`` answer
    (``{ids, pieces: [[addr, length]], watches: [watch results]}``, PROTOCOL.md)."""
    if isinstance(result, list):
        result = {"watches": result}
    if not isinstance(result, dict):
        raise HwbkptError(f"watch_region answered {type(result).__name__}, expected a map")
    watches = result.get("watches") or [{"id": i} for i in result.get("ids", [])]
    pieces = result.get("pieces") or []
    out = []
    for i, w in enumerate(watches):
        addr, length = pieces[i] if i < len(pieces) else (w.get("addr"), w.get("length"))
        out.append((w, addr, length))
    return out
