"""hwbkpt_proto — the sans-I/O msgpack-RPC wire protocol of hwbkptd.

Bytes in, messages out, and back; no sockets, no trio, no I/O at all. The daemon and the
client libraries each wrap a :class:`Connection` around their own socket. The wire format,
limits, handshake, methods and events are documented in ``proto/PROTOCOL.md``.
"""

from hwbkpt_proto._connection import Connection
from hwbkpt_proto._errors import (
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
    error_from_wire,
)
from hwbkpt_proto._messages import (
    MAX_MSGID,
    POSITIONAL,
    PROTOCOL_VERSION,
    PROTOCOL_VERSIONS,
    Limits,
    Message,
    MessageType,
    Notification,
    Request,
    Response,
    encode,
    response_for_error,
)
from hwbkpt_proto._regs import REGISTER_NAMES, REGS_SIZE, Regs, pack_regs

__all__ = [
    "MAX_MSGID",
    "POSITIONAL",
    "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS",
    "REGISTER_NAMES",
    "REGS_SIZE",
    "BusyError",
    "Connection",
    "ConnectionLostError",
    "DebugRegisterIOError",
    "HwbkptError",
    "InternalError",
    "InvalidArgumentError",
    "LimitExceededError",
    "Limits",
    "Message",
    "MessageType",
    "NoSpaceError",
    "NoSuchProcessError",
    "NotFoundError",
    "Notification",
    "PermissionDeniedError",
    "ProtocolError",
    "Regs",
    "Request",
    "Response",
    "encode",
    "error_from_wire",
    "pack_regs",
    "response_for_error",
]
