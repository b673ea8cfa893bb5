"""hwbkpt: the client library of hwbkptd (blocking and trio) and the ``hwbkpt`` CLI.

::

    import hwbkpt

    with hwbkpt.Client() as c:
        print(c.status())
        w = c.watch(pid, addr, length=8, access="w", mode="notify")
        while (event := c.next_event(timeout=1.0)) is not None:
            print(event.kind, event.fields)

``AsyncClient`` is the same for trio (``async with hwbkpt.AsyncClient() as c``). Errors are
the daemon's own classes, re-exported here from :mod:`hwbkpt_proto`.
"""

from hwbkpt._blocking import Client, Watch
from hwbkpt._events import Event, WatchInfo
from hwbkpt._session import DEFAULT_SOCKET, DaemonUnavailableError, Session
from hwbkpt._trio import AsyncClient, AsyncWatch
from hwbkpt_proto import (
    BusyError,
    ConnectionLostError,
    DebugRegisterIOError,
    HwbkptError,
    InternalError,
    InvalidArgumentError,
    LimitExceededError,
    NoSpaceError,
    NoSuchProcessError,
    NotFoundError,
    PermissionDeniedError,
    ProtocolError,
)

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncClient",
    "AsyncWatch",
    "BusyError",
    "Client",
    "ConnectionLostError",
    "DaemonUnavailableError",
    "DebugRegisterIOError",
    "Event",
    "HwbkptError",
    "InternalError",
    "InvalidArgumentError",
    "LimitExceededError",
    "NoSpaceError",
    "NoSuchProcessError",
    "NotFoundError",
    "PermissionDeniedError",
    "ProtocolError",
    "Session",
    "Watch",
    "WatchInfo",
]
