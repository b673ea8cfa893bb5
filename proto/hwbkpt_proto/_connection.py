"""One end of a hwbkpt msgpack-RPC byte stream, with no I/O: bytes in, messages out, and back.

Theory of operation
===================

The caller owns the socket. It hands every byte it reads to :meth:`Connection.receive_data`
and then calls :meth:`Connection.next_message` until it returns ``None`` ("need more
data"); to send, it writes the bytes :meth:`Connection.send` returns. The same class serves
the daemon and the clients: the stream is symmetric (either side may send any message).

Where the bytes go
------------------
msgpack has no length prefix: the only way to find where a message ends is to parse it. We
let ``msgpack.Unpacker`` (the C extension) parse incrementally, but we never hand it more
than it may keep. Received bytes first land in ``_pending``; they are fed to the unpacker
only while the message being parsed has used fewer than ``max_message_size`` bytes. So:

* memory held for one connection is at most ``max_message_size`` in the unpacker (plus
  the objects it has built so far for that message) plus whatever the caller has handed
  us and not yet drained with ``next_message``;
* a message that is still incomplete after ``max_message_size`` bytes is refused at that
  point — a peer that announces a 1 GiB ``bin`` is stopped after 4 MiB, not after 1 GiB.

``_start`` is the stream offset where the current message began (``Unpacker.tell()`` after
the previous message); ``_fed`` counts the bytes fed to the unpacker. The current message
has used ``_fed - _start`` bytes. (``tell()`` itself is no help mid-message: the unpacker
consumes partial input into its own stack of half-built objects.)

:meth:`receive_data` parses ahead by at most one message (``_ready``), so it can notice an
oversize message as soon as the bytes prove it, even if the caller does not call
:meth:`next_message` in between; a message parsed ahead is returned by the next
:meth:`next_message`, so nothing that arrived before a bad byte is lost.

Limits, and who enforces each
-----------------------------
* ``max_message_size``: us, as above (the unpacker's ``max_buffer_size`` is set to the
  same value as a second fence).
* ``max_container_len``, ``max_str_len``, ``max_bin_len``: the unpacker
  (``max_array_len``/``max_map_len``/``max_str_len``/``max_bin_len``/``max_ext_len``).
  Array and map lengths are checked when their header is read, before the container is
  allocated; str and bin lengths when the value is complete, which is bounded by
  ``max_message_size`` anyway.
* ``max_container_len`` also caps how many arrays and maps one message may hold in all
  (counted by the unpacker's ``list_hook``/``object_hook`` as each completes): an empty
  array is one byte on the wire but ~80 bytes in Python, and a 4 MiB message of them
  took ~300 MB and 5 s to decode before this cap.
* ``max_depth``: us, on the decoded object, in :func:`_check_value`. The unpacker has a
  fixed internal stack (1024 levels in msgpack 1.x) and raises ``StackError`` beyond it;
  that too becomes a :class:`ProtocolError`. Nesting cannot cost more than the bytes
  that spell it (one byte per level), so checking after decoding is safe. A message of
  at most ``max_depth`` arrays and maps cannot nest deeper, so the walk is skipped for
  it: that is every message of a hit loop, where the walk cost more than the decoding.
* value types: msgpack ``ext`` values (including the timestamp extension) and map keys
  that are not str, int or bytes are refused as each container completes (the same
  hooks), and for a message that is not a container, after decoding.

One message in one piece
------------------------
Most reads hold exactly one small message with nothing buffered before it: a request in the
daemon (a client waits for each answer), an answer or a ``stop`` in a client.
:meth:`Connection.take_request` and :meth:`Connection.take_stop` (and the client's
``Session._take_response``) decode such a read with one ``unpackb`` and make the checks the
general path would make of that message: at most :attr:`Connection.one_piece_max` bytes, so
no size limit can be broken; depth and value types by :func:`plain_value`; the shape as
:func:`from_wire`. They return ``None`` having consumed nothing whenever they are not sure,
and the general path then decodes the read or names what is wrong with it (issue 13).

Errors
------
Every exception msgpack raises while decoding is converted into :class:`ProtocolError`
``from`` the cause in exactly one place, :func:`_decoding_error`. After a decoding
failure the unpacker's state is undefined, so the receiving side of the connection is
dead: every later :meth:`receive_data` or :meth:`next_message` raises :class:`ProtocolError`
again. :meth:`send` keeps working, so the daemon can still tell the peer why it is hanging
up (an ``EPROTO`` response or notification), as h11 lets a server answer 400 after a bad
request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import msgpack

from hwbkpt_proto._errors import ProtocolError
from hwbkpt_proto._messages import (
    MAX_MSGID,
    POSITIONAL,
    Limits,
    Message,
    Request,
    _trusted,
    encode,
    encode_result,
    from_wire,
)
from hwbkpt_proto._regs import REGS_SIZE

__all__ = ["FAST_DEPTH", "ONE_PIECE_MAX", "PLAIN_SCALARS", "Connection", "plain_value"]

_DEFAULT_LIMITS = Limits()

_T = TypeVar("_T")


# What msgpack may raise while decoding; OutOfData ("need more bytes") is not among them.
# Connection.take_stop: the bytes a protocol-2 ``stop`` starts with ([2, "stop", [5..8
# values]]: fixarray 3, 2, fixstr "stop"), the most one can weigh (8 values, 4 KiB of
# watches, the 216-byte regs), and the optional values after ``regs``.
_STOP_HEAD = b"\x93\x02\xa4stop"
_STOP_ARRAYS = frozenset(range(0x95, 0x99))  # fixarray of 5 to 8 values
_STOP_MAX = 8192
_STOP_MORE = POSITIONAL["stop"][5:]
_INT = frozenset({int})
_INT_OR_NIL = frozenset({int, type(None)})
# take_stop's memory of stops already decoded: bytes before the registers -> fields.
_REGS_BIN = b"\xc4" + bytes([REGS_SIZE])  # msgpack bin 8 of 216 bytes
_STOP_SEEN_MAX = 64
_unpackb = msgpack.unpackb

_DECODE_FAILURES = (
    msgpack.StackError,
    msgpack.BufferFull,
    msgpack.ExtraData,
    msgpack.FormatError,
    UnicodeDecodeError,
    TypeError,
    ValueError,
    msgpack.UnpackException,
)


def _decoding_error(err: BaseException) -> ProtocolError:
    """The :class:`ProtocolError` for what msgpack raised while decoding (the one place)."""
    if isinstance(err, msgpack.StackError):
        return ProtocolError("message nested too deeply for the decoder (more than 1024 levels)")
    if isinstance(err, msgpack.BufferFull):
        return ProtocolError("message larger than the receive buffer")
    if isinstance(err, msgpack.ExtraData):  # only from unpackb(); kept for completeness
        return ProtocolError("extra bytes after a message")
    if isinstance(err, msgpack.FormatError):
        return ProtocolError("bytes are not msgpack (a reserved type byte 0xc1 or similar)")
    if isinstance(err, UnicodeDecodeError):
        return ProtocolError(f"a string is not valid UTF-8: {err.reason}")
    if isinstance(err, TypeError):
        # With use_list=True a map key that is an array or map cannot be hashed.
        return ProtocolError(f"a map key has a type that cannot be a key: {err}")
    # ValueError: "N exceeds max_array_len(M)" and friends, bad timestamp data.
    return ProtocolError(f"message refused: {err}")


# The exact types the unpacker builds for plain msgpack; anything else (ExtType, Timestamp)
# is an extension type, which the protocol does not use.
_CONTAINERS = frozenset({list, dict})
_VALUE_TYPES = frozenset({type(None), bool, int, float, str, bytes, list, dict})
_KEY_TYPES = frozenset({str, int, bytes})
_VALUE_NAMES = frozenset(t.__name__ for t in _VALUE_TYPES)
_KEY_NAMES = frozenset(t.__name__ for t in _KEY_TYPES)


# One message decoded in one piece, with one ``unpackb`` and the checks of its shape
# (Connection.take_request here, the client's Session._take_response): at most this many
# bytes, so the decoder's work stays small and bounded whatever it is fed.
ONE_PIECE_MAX = 4096
#: The types of plain msgpack values that are not containers (no ``ext`` values).
PLAIN_SCALARS = _VALUE_TYPES - _CONTAINERS
# Deeper values (a request's params and a daemon's results are 3 deep at most) are left to
# the general path, so the recursion of plain_value stays short whatever Limits.max_depth is.
FAST_DEPTH = 16
# take_request: the bytes a request starts with ([0, msgid, method, params]: fixarray 4,
# then 0); another encoding of the same values goes the general way.
_REQUEST_HEAD = b"\x94\x00"
_STR = frozenset({str})


def plain_value(value: Any, depth: int) -> bool:
    """True if ``value`` is plain msgpack (no ``ext`` values, map keys str, int or bytes)
    with containers nested at most ``depth`` deep: what :class:`Connection` checks of a
    decoded message. The types of a container's elements are tested in C (``issuperset``);
    only nested containers recurse, at most ``depth`` (:data:`FAST_DEPTH`) calls deep."""
    t = type(value)
    if t is dict:
        if not _KEY_TYPES.issuperset(map(type, value)):
            return False
        items = value.values()
    elif t is list:
        items = value
    else:
        return t in PLAIN_SCALARS  # not ExtType or Timestamp
    if depth < 1:
        return False
    if PLAIN_SCALARS.issuperset(map(type, items)):
        return True
    return all(type(item) in PLAIN_SCALARS or plain_value(item, depth - 1) for item in items)


def _refuse_values(values: Iterable[object]) -> NoReturn:
    names = ", ".join(sorted({type(v).__name__ for v in values} - _VALUE_NAMES))
    raise ProtocolError(f"msgpack {names} values are not part of the protocol")


def _refuse_keys(keys: Iterable[object]) -> NoReturn:
    names = ", ".join(sorted({type(k).__name__ for k in keys} - _KEY_NAMES))
    raise ProtocolError(f"map keys must be strings, integers or bytes, got {names}")


def _check_value(obj: object, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` and values that are not plain msgpack.

    Iterative, so a deep value cannot exhaust the Python stack; the per-element type test is
    done with ``set(map(type, ...))`` so a container of 65536 scalars costs C time, not a
    Python loop. Raises :class:`ProtocolError`.
    """
    if type(obj) not in _VALUE_TYPES:
        raise ProtocolError(f"msgpack {type(obj).__name__} values are not part of the protocol")
    stack: list[tuple[object, int]] = [(obj, 1)] if type(obj) in _CONTAINERS else []
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            raise ProtocolError(f"message nested more than {max_depth} arrays/maps deep")
        if isinstance(value, dict):
            bad_keys = set(map(type, value)) - _KEY_TYPES
            if bad_keys:
                names = ", ".join(sorted(t.__name__ for t in bad_keys))
                raise ProtocolError(f"map keys must be strings, integers or bytes, got {names}")
            items: Any = value.values()
        else:
            items = value
        types = set(map(type, items))
        if not types <= _VALUE_TYPES:
            names = ", ".join(sorted(t.__name__ for t in types - _VALUE_TYPES))
            raise ProtocolError(f"msgpack {names} values are not part of the protocol")
        if types & _CONTAINERS:
            stack.extend((item, depth + 1) for item in items if type(item) in _CONTAINERS)


class _ContainerCount:
    """The arrays and maps completed in the message being decoded, counted by the
    unpacker's hooks as each is completed (they are on the path of every message, hence
    written out rather than sharing a helper). An empty array costs one byte on the wire
    and ~80 bytes of Python objects; without a cap a 4 MiB message of empty arrays becomes
    ~300 MB and seconds of CPU (measured). Raising here stops the decoder mid-message.

    The hooks are methods of this object and not of the :class:`Connection`: an unpacker
    holding bound methods of its own connection made each connection a reference cycle,
    freed only by the cycle collector's rare full passes, so a daemon serving many short
    connections kept their unpackers' buffers for minutes (its RSS grew by ~5 MiB per 100
    connections, measured)."""

    __slots__ = ("limit", "n")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.n = 0

    def array(self, value: list[Any]) -> list[Any]:
        self.n += 1
        if self.n > self.limit:
            self._too_many()
        # issuperset() of an iterator tests each element without building a set.
        if not _VALUE_TYPES.issuperset(map(type, value)):
            _refuse_values(value)
        return value

    def map(self, value: dict[Any, Any]) -> dict[Any, Any]:
        self.n += 1
        if self.n > self.limit:
            self._too_many()
        if not _KEY_TYPES.issuperset(map(type, value)):
            _refuse_keys(value)
        if not _VALUE_TYPES.issuperset(map(type, value.values())):
            _refuse_values(value.values())
        return value

    def _too_many(self) -> NoReturn:
        raise ProtocolError(f"message holds more than {self.limit} arrays and maps")


class Connection:
    """Sans-I/O codec for one msgpack-RPC stream (see the theory of operation above)."""

    def __init__(self, limits: Limits = _DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._count = _ContainerCount(limits.max_container_len)
        self._unpacker = msgpack.Unpacker(
            raw=False,
            use_list=True,
            strict_map_key=False,  # results map tids (ints) to states
            max_buffer_size=limits.max_message_size,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_bin_len,
            max_ext_len=limits.max_bin_len,
            list_hook=self._count.array,
            object_hook=self._count.map,
        )
        self._pending = bytearray()  # received, not yet fed to the unpacker
        self._fed = 0  # bytes fed to the unpacker so far
        self._start = 0  # stream offset where the current message begins
        # At most one decoded object parsed ahead, with the number of arrays and maps in it.
        self._ready: list[tuple[object, int]] = []
        self._failure: ProtocolError | None = None
        # Stops decoded by take_stop whose registers come last: the bytes before them ->
        # (pid, tid, watches, reason).
        self._stops_seen: dict[bytes, tuple[int, int, tuple[int, ...], str]] = {}
        #: Send the hot notifications in their fixed array shape (``encode(positional=)``):
        #: set by the owner once ``hello`` agreed on protocol version 2 or later.
        self.positional = False
        #: The most bytes a message decoded in one piece may weigh (:meth:`take_request`,
        #: the client's answers): one this small cannot break a size limit (no array, map,
        #: string or bin in it can be as long as the message, nor can it hold as many
        #: arrays and maps), so only its values are checked.
        self.one_piece_max = min(
            ONE_PIECE_MAX,
            limits.max_message_size,
            limits.max_container_len,
            limits.max_str_len,
            limits.max_bin_len,
        )
        # Containers a request's params map may nest: the message's array and the params
        # array around it count as 2 of max_depth. Below 0 even ``[]`` params are too deep.
        self._params_depth = min(limits.max_depth - 2, FAST_DEPTH)

    # -- receiving ---------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        """True when every byte received has been decoded and taken (no partial message,
        none parsed ahead) and receiving has not failed: the next byte starts a message."""
        return (
            not self._pending
            and self._fed == self._start
            and not self._ready
            and self._failure is None
        )

    def take_stop(self, data: bytes) -> dict[str, Any] | None:
        """The params of ``data`` if it is exactly one protocol-2 ``stop`` notification
        (``[2, "stop", [pid, tid, watches, reason, regs, ...]]``) and nothing is buffered;
        else ``None``, and nothing was consumed: feed ``data`` to :meth:`receive_data`.

        The client's hit loop reads one ``stop`` per wake-up; decoding it here in one
        ``unpackb`` with the checks of this one shape costs a fraction of the general path
        (issue 13: the library's CPU per stop). Anything unusual — another message, more
        than one, a wrong type anywhere — takes the general path, which names the error.

        In a hit loop every stop of a thread is the same bytes up to its registers (same
        pid, tid, watches, reason; the registers last). Those bytes are remembered with
        their decoded fields, so a stop that repeats them byte for byte and ends with the
        216-byte ``regs`` bin is taken without ``unpackb``: the same bytes decode the same
        way. With one CPU shared by the daemon, two clients and the target, each client
        runs with cold caches, and decoding was ~half of its CPU per stop.
        """
        n = len(data)
        head = data[: n - REGS_SIZE]
        seen = self._stops_seen.get(head) if n > REGS_SIZE else None
        if seen is not None and self.idle:
            pid, tid, watches, reason = seen
            regs = data[n - REGS_SIZE :]
            return {"pid": pid, "tid": tid, "watches": list(watches), "reason": reason,
                    "regs": regs}
        if (
            not data.startswith(_STOP_HEAD)
            or not 8 <= n <= _STOP_MAX
            or data[7] not in _STOP_ARRAYS  # version 1's [map] would be decoded twice
            or not self.idle
        ):
            return None
        try:
            obj = _unpackb(data, raw=False)
        except _DECODE_FAILURES:
            return None  # not one whole message, or malformed: the general path says which
        params = obj[2] if type(obj) is list and len(obj) == 3 else None
        if type(params) is not list or not 5 <= len(params) <= 8:
            return None
        pid, tid, watches, reason, regs = params[:5]
        if (
            type(pid) is not int
            or type(tid) is not int
            or type(watches) is not list
            or type(reason) is not str
            or type(regs) is not bytes
            or len(regs) != REGS_SIZE
            or not _INT.issuperset(map(type, watches))
            or not _INT_OR_NIL.issuperset(map(type, params[5:]))
        ):
            return None
        fields = {"pid": pid, "tid": tid, "watches": watches, "reason": reason, "regs": regs}
        for name, value in zip(_STOP_MORE, params[5:], strict=False):
            if value is not None:
                fields[name] = value
        if len(params) == 5 and head.endswith(_REGS_BIN):
            # One whole message (unpackb took every byte) whose last value is this bin 8:
            # the registers are its last REGS_SIZE bytes, everything else is ``head``.
            if len(self._stops_seen) >= _STOP_SEEN_MAX:
                self._stops_seen.clear()
            self._stops_seen[head] = (pid, tid, tuple(watches), reason)
        return fields

    def take_request(self, data: bytes) -> Request | None:
        """The :class:`Request` of ``data`` if it is exactly one request
        (``[0, msgid, method, params]``) of at most :attr:`one_piece_max` bytes and nothing
        is buffered; else ``None``, and nothing was consumed: feed ``data`` to
        :meth:`receive_data`, which decodes it or names what is wrong with it.

        A client doing ``watch`` + ``unwatch`` in a loop sends one small request per read;
        the general path (feed, parse ahead, the container hooks, :func:`from_wire`) was
        ~15 % of the daemon's CPU for it (issue 13). This is one ``unpackb`` and the checks
        the general path makes of such a message: the limits hold by size (see
        :attr:`one_piece_max`), depth and value types by :func:`plain_value`, the shape as
        in :func:`from_wire`. Anything it is not sure of — another encoding of the header,
        a notification, more than one message, a value either path would refuse — returns
        ``None``. Never raises.
        """
        if (
            not data.startswith(_REQUEST_HEAD)
            or len(data) > self.one_piece_max
            or not self.idle
        ):
            return None
        try:
            obj = _unpackb(data, raw=False, strict_map_key=False)
        except _DECODE_FAILURES:
            return None  # not one whole message, or malformed: the general path says which
        # unpackb took every byte (else ExtraData), and they begin with a fixarray of 4 whose
        # first element is the positive fixint 0: obj is [0, msgid, method, params].
        _, msgid, method, params = obj
        if (
            type(msgid) is not int
            or not 0 <= msgid <= MAX_MSGID
            or type(method) is not str
            or not method
            or type(params) is not list
        ):
            return None
        if not params:
            if self._params_depth < 0:
                return None
            named: dict[str, Any] = {}  # as _params_from_wire: a new map per request
        elif len(params) == 1 and type(params[0]) is dict:
            named = params[0]
            if not _STR.issuperset(map(type, named)) or not plain_value(
                named, self._params_depth
            ):
                return None
        else:
            return None
        # Every check of Request.__post_init__ is made above.
        return _trusted(Request, msgid=msgid, method=method, params=named)

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes read from the peer.

        Raises :class:`ProtocolError` if the bytes already prove the stream bad: the
        message being received is over ``max_message_size`` and still not complete, or the
        bytes are malformed; also if the connection failed before.
        """
        self._check_alive()
        if not data:
            return
        self._pending += data
        if not self._ready:
            self._guarded(self._parse_ahead)

    def next_message(self) -> Message | None:
        """The next complete message, or ``None`` if more bytes are needed.

        Raises :class:`ProtocolError` on anything malformed: bad msgpack, a limit of
        :class:`Limits` exceeded, or a value that is not a request, response or
        notification. After that the connection is unusable for receiving.
        """
        self._check_alive()
        if not self._ready:
            if not self._pending and self._fed == self._start:
                return None  # every byte received is decoded (after each message of a loop)
            self._guarded(self._parse_ahead)
            if not self._ready:
                return None
        obj, containers = self._ready.pop()
        try:
            return self._to_message(obj, containers)
        except ProtocolError as err:
            self._fail(err)
            raise

    def _to_message(self, obj: object, containers: int) -> Message:
        # Container contents were type-checked as each completed (_ContainerCount).
        if containers > self.limits.max_depth:
            _check_value(obj, self.limits.max_depth)
        elif type(obj) not in _VALUE_TYPES:
            _refuse_values((obj,))
        return from_wire(obj)

    def _parse_ahead(self) -> None:
        """Decode at most one object into ``_ready``, feeding only what the limit allows."""
        if not self._pending and self._fed == self._start:
            return  # every byte fed so far is decoded: no OutOfData round (per message)
        unpacker = self._unpacker
        while True:
            if self._pending:
                # Feed first (the common case: a whole message arrived), so that decoding
                # does not start with an OutOfData round; never past the message limit.
                room = self.limits.max_message_size - (self._fed - self._start)
                if room > 0:
                    if len(self._pending) <= room:  # all of it (no slice copy)
                        chunk, self._pending = self._pending, bytearray()
                    else:
                        chunk = self._pending[:room]
                        del self._pending[:room]
                    try:
                        unpacker.feed(chunk)
                    except _DECODE_FAILURES as err:
                        raise _decoding_error(err) from err
                    self._fed += len(chunk)
            try:
                obj = unpacker.unpack()
            except msgpack.OutOfData:
                used = self._fed - self._start
                if used >= self.limits.max_message_size:
                    raise ProtocolError(
                        f"message exceeds the {self.limits.max_message_size}-byte limit "
                        f"(received {used} bytes and it is not complete)"
                    ) from None
                if not self._pending:
                    return
                continue
            except _DECODE_FAILURES as err:
                raise _decoding_error(err) from err
            self._start = unpacker.tell()
            self._ready.append((obj, self._count.n))
            self._count.n = 0
            return

    def _guarded(self, action: Callable[[], _T]) -> _T:
        """Run ``action``; if it raises :class:`ProtocolError`, the receiving side is dead."""
        try:
            return action()
        except ProtocolError as err:
            self._fail(err)
            raise

    def _fail(self, err: ProtocolError) -> None:
        self._failure = err
        self._pending.clear()
        self._ready.clear()

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise ProtocolError(
                f"connection already failed ({self._failure.message}); close it"
            ) from self._failure

    # -- sending -----------------------------------------------------------------------

    def send(self, message: Message) -> bytes:
        """The bytes to write to the peer for ``message``.

        Raises :class:`ProtocolError` if the message cannot be encoded or its encoding is
        larger than ``max_message_size`` (the peer would refuse it). Works even after a
        receive failure, so an ``EPROTO`` answer can still be sent before closing.
        """
        return self._within_limit(encode(message, positional=self.positional), message)

    def send_result(self, msgid: int, result: Any) -> bytes:
        """The bytes of the successful response ``Response(msgid, None, result)`` to a
        request received on this connection (its ``msgid`` is checked already); what
        :meth:`send` would return for it, without building the message first.

        Raises :class:`ProtocolError` as :meth:`send` does.
        """
        return self._within_limit(encode_result(msgid, result), "Response")

    def _within_limit(self, data: bytes, message: Message | str) -> bytes:
        if len(data) > self.limits.max_message_size:
            kind = message if isinstance(message, str) else type(message).__name__
            raise ProtocolError(
                f"{kind} encodes to {len(data)} bytes, over the "
                f"{self.limits.max_message_size}-byte message limit; ask for less at a time"
            )
        return data
