"""The three msgpack-RPC messages, the limits a receiver enforces, and their wire encoding.

Messages are small frozen classes that check themselves when built (as h11's events do), so
an invalid message cannot be constructed, whether by the code that sends it or by the
decoder in :mod:`hwbkpt_proto._connection`, which builds them with :func:`from_wire`.

Wire shapes (``proto/PROTOCOL.md`` has the whole story)::

    request       [0, msgid, method, params]
    response      [1, msgid, error, result]
    notification  [2, method, params]

``params`` is an array of zero or one element; the one element is a map of named
parameters with string keys. ``error`` is ``nil`` or ``[code, message]``. The hot
notifications of a hit loop (:data:`POSITIONAL`: ``stop``, ``resume``, ``step``) may instead
carry their params as a fixed array of positional values (protocol version 2).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import msgpack

from hwbkpt_proto._errors import HwbkptError, ProtocolError

__all__ = [
    "MAX_MSGID",
    "POSITIONAL",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "Limits",
    "Message",
    "MessageType",
    "Notification",
    "Request",
    "Response",
    "encode",
    "encode_result",
    "from_wire",
    "response_for_error",
]

#: The newest version: what the client libraries send in ``hello``.
PROTOCOL_VERSION: int = 2

#: Every version the daemon speaks; it answers ``hello`` with the one the client asked for.
#: Version 2 differs from 1 only in the hot messages (``stop`` carries its registers as one
#: ``bin``, :mod:`hwbkpt_proto._regs`); PROTOCOL.md section 5.
PROTOCOL_VERSIONS: tuple[int, ...] = (1, 2)

#: The fixed shapes of protocol version 2 (PROTOCOL.md section 1): a notification of one of
#: these methods may carry its params as an array of these values, in this order, instead of
#: ``[map]``; ``nil`` stands for an absent parameter, and absent parameters at the end may be
#: left out (a ``stop`` without ``dr6`` has 5). A map of 6 names costs the decoder 6 strings
#: and the receiver a map check per message; a hit loop sends two of these per stop.
POSITIONAL: dict[str, tuple[str, ...]] = {
    "stop": ("pid", "tid", "watches", "reason", "regs", "dr6", "new", "old"),
    "resume": ("tid",),
    "step": ("tid",),
}

#: msgids are unsigned 32-bit integers (msgpack-RPC's convention): ``0 <= msgid <= MAX_MSGID``.
MAX_MSGID: int = 2**32 - 1


class MessageType(enum.IntEnum):
    """The first element of every message array."""

    REQUEST = 0
    RESPONSE = 1
    NOTIFICATION = 2


def _check_msgid(msgid: object) -> None:
    # bool is an int subclass and msgpack has a separate bool type: refuse it explicitly.
    if type(msgid) is not int or not 0 <= msgid <= MAX_MSGID:
        raise ProtocolError(
            f"msgid must be an unsigned integer below 2**32, got {_describe(msgid)}"
        )


def _check_method(method: object, what: str) -> None:
    if type(method) is not str or not method:
        raise ProtocolError(f"{what} must be a non-empty string, got {_describe(method)}")


def _check_params(params: object, kind: str, method: object) -> None:
    # The description is built only for an error: this runs for every message sent.
    if not isinstance(params, dict):
        raise ProtocolError(
            f"the params of {kind} {method!r} must be a map of named values, "
            f"got {_describe(params)}"
        )
    if not _STR.issuperset(map(type, params)):
        bad = next(key for key in params if type(key) is not str)
        raise ProtocolError(
            f"the params of {kind} {method!r}: names must be strings, got {_describe(bad)}"
        )


_STR = frozenset({str})


def _describe(value: object) -> str:
    """A short description of a wrong value for an error message (never the whole value)."""
    if isinstance(value, list | dict | tuple):
        # repr() of a 4 MiB container would cost more than the message is worth.
        return f"{type(value).__name__} of {len(value)} elements"
    if isinstance(value, str | bytes) and len(value) > 60:
        value = value[:57]
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


@dataclass(frozen=True, slots=True)
class Request:
    """A call: ``[0, msgid, method, [params]]``. The answer carries the same ``msgid``.

    Raises :class:`ProtocolError` when built with a msgid outside ``0..2**32-1``, an empty
    or non-string method, or params that are not a map with string keys.
    """

    msgid: int
    method: str
    params: dict[str, Any]

    def __post_init__(self) -> None:
        _check_msgid(self.msgid)
        _check_method(self.method, "a request's method")
        _check_params(self.params, "request", self.method)


@dataclass(frozen=True, slots=True)
class Response:
    """The answer to request ``msgid``: ``[1, msgid, error, result]``.

    ``error`` is ``None`` on success, else ``(code, message)`` (see
    :func:`hwbkpt_proto.error_from_wire`); ``result`` is then ``None``.

    Raises :class:`ProtocolError` when built with a bad msgid, an error that is not a pair of
    strings, or both an error and a result.
    """

    msgid: int
    error: tuple[str, str] | None
    result: Any

    def __post_init__(self) -> None:
        _check_msgid(self.msgid)
        if self.error is not None:
            error = self.error
            if (
                not isinstance(error, tuple)
                or len(error) != 2
                or type(error[0]) is not str
                or type(error[1]) is not str
            ):
                raise ProtocolError(
                    f"a response's error must be nil or [code, message] (two strings), "
                    f"got {_describe(error)}"
                )
            if self.result is not None:
                raise ProtocolError(
                    f"response {self.msgid} has both an error and a result; "
                    "the result must be nil when there is an error"
                )


@dataclass(frozen=True, slots=True)
class Notification:
    """A one-way message, ``[2, method, [params]]``; the daemon's events are notifications.

    Raises :class:`ProtocolError` when built with an empty or non-string method or params
    that are not a map with string keys.
    """

    method: str
    params: dict[str, Any]

    def __post_init__(self) -> None:
        _check_method(self.method, "a notification's method")
        _check_params(self.params, "notification", self.method)


Message: TypeAlias = Request | Response | Notification
_M = TypeVar("_M", Request, Notification)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a receiver accepts; enforced while decoding, before the allocation they prevent.

    Raises :class:`ValueError` if a limit is not a positive integer.
    """

    #: bytes of one encoded message; also the most a partial message may buffer
    max_message_size: int = 4 * 1024 * 1024
    #: entries of one array or map
    max_container_len: int = 65536
    #: bytes of one string
    max_str_len: int = 65536
    #: bytes of one bin value
    max_bin_len: int = 4 * 1024 * 1024
    #: nesting of arrays and maps, the message's own array counting as 1
    max_depth: int = 32

    def __post_init__(self) -> None:
        for name in (
            "max_message_size",
            "max_container_len",
            "max_str_len",
            "max_bin_len",
            "max_depth",
        ):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


def _params_to_wire(params: dict[str, Any]) -> list[dict[str, Any]]:
    return [params] if params else []


_POSITIONAL_SETS = {method: frozenset(names) for method, names in POSITIONAL.items()}


def _positional(method: str, params: dict[str, Any]) -> list[Any] | None:
    """The fixed array of a :data:`POSITIONAL` notification, or ``None`` if ``params`` do
    not fit it (another method, a name it has no place for, or a nil value that would read
    back as absent)."""
    names = POSITIONAL.get(method)
    if names is None or not params.keys() <= _POSITIONAL_SETS[method] or None in params.values():
        return None
    values = [params.get(name) for name in names]
    while values and values[-1] is None:
        values.pop()
    return values


def encode(message: Message, *, positional: bool = False) -> bytes:
    """Encode one message to msgpack bytes (strings as str, bytes as bin).

    With ``positional`` (protocol version 2), a notification of a :data:`POSITIONAL` method
    is sent as its fixed array; everything else is encoded as in version 1.

    Raises :class:`ProtocolError` (from the packer's error) if a value cannot be encoded: an
    object msgpack has no type for, an integer outside -2**63..2**64-1, or a value nested
    too deeply for the packer.
    """
    wire: list[Any]
    if isinstance(message, Request):
        wire = [
            _REQUEST,
            message.msgid,
            message.method,
            _params_to_wire(message.params),
        ]
    elif isinstance(message, Response):
        error = None if message.error is None else list(message.error)
        wire = [_RESPONSE, message.msgid, error, message.result]
    elif isinstance(message, Notification):
        fixed = _positional(message.method, message.params) if positional else None
        wire = [
            _NOTIFICATION,
            message.method,
            _params_to_wire(message.params) if fixed is None else fixed,
        ]
    else:
        raise ProtocolError(f"cannot encode {_describe(message)}: not a hwbkpt_proto message")
    try:
        data: bytes = msgpack.packb(wire, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as err:
        raise ProtocolError(f"cannot encode {type(message).__name__}: {err}") from err
    return data


def encode_result(msgid: int, result: Any) -> bytes:
    """The bytes of ``Response(msgid, None, result)``, for a ``msgid`` that came from a
    decoded request (so already checked): a server answers every request, and building
    and checking the message object first cost as much as encoding it (issue 13).

    Raises :class:`ProtocolError` if ``result`` cannot be encoded.
    """
    try:
        data: bytes = msgpack.packb([_RESPONSE, msgid, None, result], use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as err:
        raise ProtocolError(f"cannot encode Response: {err}") from err
    return data


def response_for_error(msgid: int, err: HwbkptError) -> Response:
    """The error response that reports ``err`` to the caller of request ``msgid``.

    The client rebuilds the same exception class with
    :func:`hwbkpt_proto.error_from_wire`. Raises :class:`ProtocolError` for a bad msgid.
    """
    return Response(msgid=msgid, error=(err.code, err.message), result=None)


def _params_from_wire(params: object, method: str, fixed: bool = False) -> dict[str, Any]:
    """The named params of a message of ``method`` (named in errors only: no string is
    built for a good message); with ``fixed`` (notifications), also a :data:`POSITIONAL`
    array."""
    if fixed and isinstance(params, list) and params and not isinstance(params[0], dict):
        names = POSITIONAL.get(method)
        if names is not None and len(params) <= len(names):
            if None in params:  # nil: the parameter is absent
                return {n: v for n, v in zip(names, params, strict=False) if v is not None}
            return dict(zip(names, params, strict=False))  # may be shorter
        if names is not None:
            raise ProtocolError(
                f"the params of {method!r} must be [map] or the array "
                f"[{', '.join(names)}], got {_describe(params)}"
            )
    if not isinstance(params, list) or len(params) > 1:
        raise ProtocolError(
            f"the params of {method!r} must be an array holding nothing or one map of named "
            f"values, got {_describe(params)}"
        )
    if not params:
        return {}
    (named,) = params
    if not isinstance(named, dict):
        raise ProtocolError(
            f"the element of the params of {method!r} must be a map of named values, "
            f"got {_describe(named)}"
        )
    _check_params(named, "notification" if fixed else "request", method)
    return named


_new = object.__new__
_set = object.__setattr__


def _trusted(cls: type[_M], **fields: Any) -> _M:
    """``cls(**fields)`` without its ``__post_init__`` checks, for :func:`from_wire`, which
    has made them already: they cost ~1 µs per message (measured), and a hit loop decodes
    two messages per stop."""
    message = _new(cls)
    for name, value in fields.items():
        _set(message, name, value)
    return message


_SHAPES = {
    MessageType.REQUEST: "[0, msgid, method, params]",
    MessageType.RESPONSE: "[1, msgid, error, result]",
    MessageType.NOTIFICATION: "[2, method, params]",
}


_REQUEST, _RESPONSE, _NOTIFICATION = (int(t) for t in MessageType)


def from_wire(obj: object) -> Message:
    """Build a message from one decoded msgpack object, checking its shape.

    Raises :class:`ProtocolError` naming what is wrong if ``obj`` is not a request, response
    or notification. Nesting and the types of nested values are checked by the connection.
    """
    if not isinstance(obj, list):
        raise ProtocolError(f"a message must be an array [type, ...], got {_describe(obj)}")
    if not obj:
        raise ProtocolError("a message must be an array [type, ...], got an empty array")
    kind = obj[0]
    if type(kind) is not int or kind not in _SHAPES:
        raise ProtocolError(
            f"message type {kind!r} is not 0 (request), 1 (response) or 2 (notification)"
        )
    # Plain int comparisons: this runs for every message, and MessageType(kind) (or even
    # the attribute MessageType.NOTIFICATION) costs more than the rest of the checks.
    expected = 3 if kind == _NOTIFICATION else 4
    if len(obj) != expected:
        mtype = MessageType(kind)
        raise ProtocolError(
            f"a {mtype.name.lower()} is {_SHAPES[mtype]} ({expected} elements), "
            f"got {len(obj)} elements"
        )
    if kind == _REQUEST:
        _, msgid, method, params = obj
        _check_msgid(msgid)
        _check_method(method, "a request's method")
        return _trusted(
            Request, msgid=msgid, method=method, params=_params_from_wire(params, method)
        )
    if kind == _RESPONSE:
        _, msgid, error, result = obj
        if error is not None:
            if not isinstance(error, list) or len(error) != 2:
                raise ProtocolError(
                    f"the error of response {msgid!r} must be nil or [code, message], "
                    f"got {_describe(error)}"
                )
            error = (error[0], error[1])
        return Response(msgid, error, result)
    _, method, params = obj
    _check_method(method, "a notification's method")
    return _trusted(Notification, method=method, params=_params_from_wire(params, method, True))
