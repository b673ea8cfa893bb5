"""One exception hierarchy for daemon, protocol and clients, each class bound to a wire code.

The daemon raises these; the server turns them into ``[code, message]`` error responses in
exactly one place; the client library turns the pair back into the same class (see
:func:`error_from_wire`). Codes are the kernel's errno names where one fits, so a debugger
that expects ``PTRACE_POKEUSER`` semantics sees the errno it knows (``.errno``).
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar

__all__ = [
    "BusyError",
    "ConnectionLostError",
    "DebugRegisterIOError",
    "HwbkptError",
    "InternalError",
    "InvalidArgumentError",
    "LimitExceededError",
    "NoSpaceError",
    "NoSuchProcessError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "error_from_wire",
]


class HwbkptError(Exception):
    """Base of every error the daemon can answer with.

    ``code`` is the stable wire code (e.g. ``"EPERM"``); ``errno`` is the matching numeric
    errno where the code is a kernel errno name, else ``None``.
    """

    code: ClassVar[str] = "EINTERNAL"
    errno: ClassVar[int | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[type[HwbkptError], tuple[str]]:
        return (type(self), (self.message,))


class PermissionDeniedError(HwbkptError):
    """The peer may not act on that process (the kernel's ptrace access rule)."""

    code = "EPERM"
    errno = _errno.EPERM


class NoSuchProcessError(HwbkptError):
    """The process or thread does not exist (or no longer exists)."""

    code = "ESRCH"
    errno = _errno.ESRCH


class InvalidArgumentError(HwbkptError):
    """A parameter has the wrong type or a value the hardware or kernel refuses."""

    code = "EINVAL"
    errno = _errno.EINVAL


class NoSpaceError(HwbkptError):
    """No hardware slot could be had (raw debug-register writes; the kernel's ENOSPC)."""

    code = "ENOSPC"
    errno = _errno.ENOSPC


class DebugRegisterIOError(HwbkptError):
    """A ``struct user`` offset that does not exist (the kernel's EIO for PEEK/POKEUSER)."""

    code = "EIO"
    errno = _errno.EIO


class BusyError(HwbkptError):
    """The thread is not in a state that allows this now (e.g. not stopped for you)."""

    code = "EBUSY"
    errno = _errno.EBUSY


class NotFoundError(HwbkptError):
    """No such watch id, method or object."""

    code = "ENOENT"
    errno = _errno.ENOENT


class LimitExceededError(HwbkptError):
    """A per-client limit (watches, queued events, clients) would be exceeded."""

    code = "ELIMIT"
    errno = None


class ProtocolError(HwbkptError):
    """The byte stream or a message is not valid hwbkpt msgpack-RPC."""

    code = "EPROTO"
    errno = _errno.EPROTO


class InternalError(HwbkptError):
    """A bug in the daemon; the request failed but the daemon is still running."""

    code = "EINTERNAL"
    errno = None


class ConnectionLostError(HwbkptError):
    """Client side only: the connection to the daemon is gone."""

    code = "ECONNLOST"
    errno = None


_BY_CODE: dict[str, type[HwbkptError]] = {
    cls.code: cls
    for cls in (
        PermissionDeniedError,
        NoSuchProcessError,
        InvalidArgumentError,
        NoSpaceError,
        DebugRegisterIOError,
        BusyError,
        NotFoundError,
        LimitExceededError,
        ProtocolError,
        InternalError,
        ConnectionLostError,
    )
}


def error_from_wire(code: str, message: str) -> HwbkptError:
    """Build the exception the daemon raised from its wire ``code`` and ``message``.

    An unknown code (a newer daemon) becomes a plain :class:`HwbkptError` that keeps it.
    """
    cls = _BY_CODE.get(code)
    if cls is None:
        err = HwbkptError(f"{code}: {message}")
        return err
    return cls(message)
