"""Pure helpers of the RSP session: thread ids, numbers, signals, ``qXfer`` windows.

Nothing here talks to the daemon or to the debugger; the session (:mod:`._session`) uses
these to parse what gdb sends and to shape what it answers.
"""

from __future__ import annotations

import signal
from typing import Final

__all__ = [
    "ALL_THREADS",
    "ANY_THREAD",
    "PacketError",
    "gdb_signal",
    "hex_int",
    "host_signal",
    "parse_signal_list",
    "parse_thread",
    "split_args",
    "xfer_window",
]

#: ``-1`` in a thread-id: every thread. ``0``: any thread (the stub picks).
ALL_THREADS: Final = -1
ANY_THREAD: Final = 0


class PacketError(Exception):
    """A packet the session cannot parse; answered ``E01`` (gdb shows the error)."""


def hex_int(text: bytes, what: str = "number") -> int:
    """A non-negative hex number as gdb writes it. Raises PacketError."""
    # Hex digits only: int() would also take "-2", "+1", "0x1" or "1_0".
    if not text or len(text) > 16 or text.strip(b"0123456789abcdefABCDEF"):
        raise PacketError(f"bad {what} {text[:20]!r}")
    return int(text, 16)


def parse_thread(text: bytes) -> int:
    """A thread-id: ``TID``, ``-1``, ``0`` or the multiprocess ``pPID.TID`` (the pid part
    is not checked: the session serves one process). Raises PacketError."""
    if text.startswith(b"p"):
        _, _, text = text[1:].partition(b".")
        if not text:
            return ALL_THREADS
    if text == b"-1":
        return ALL_THREADS
    return hex_int(text, "thread id")


def split_args(text: bytes, count: int, what: str) -> list[bytes]:
    """``a,b,c`` → its ``count`` comma-separated fields. Raises PacketError."""
    parts = text.split(b",")
    if len(parts) != count:
        raise PacketError(f"{what}: expected {count} fields, got {text[:40]!r}")
    return parts


def xfer_window(data: bytes, offset: int, length: int) -> bytes:
    """The reply to ``qXfer:…:read:annex:offset,length``: ``m`` + a chunk when more
    follows, ``l`` + the last chunk (gdb's manual, "qXfer read")."""
    chunk = data[offset : offset + length]
    more = offset + length < len(data)
    return (b"m" if more else b"l") + chunk


# gdb's own signal numbers (gdb/include/gdb/signals.def) for Linux signals: gdb and lldb
# read stop replies and W/X packets in this numbering, not the host's.
_GDB_SIGNALS: Final = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6,
    "SIGFPE": 8, "SIGKILL": 9, "SIGBUS": 10, "SIGSEGV": 11, "SIGSYS": 12, "SIGPIPE": 13,
    "SIGALRM": 14, "SIGTERM": 15, "SIGURG": 16, "SIGSTOP": 17, "SIGTSTP": 18, "SIGCONT": 19,
    "SIGCHLD": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGIO": 23, "SIGXCPU": 24, "SIGXFSZ": 25,
    "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGUSR1": 30, "SIGUSR2": 31,
    "SIGPWR": 32,
}
_HOST_TO_GDB: Final = {
    int(getattr(signal, name)): number
    for name, number in _GDB_SIGNALS.items()
    if hasattr(signal, name)
} | {
    # Real-time signals: GDB_SIGNAL_REALTIME_33 .. _63 are 45 .. 75, _32 is 77, _64 is 78
    # (signals.def; glibc keeps 32 and 33 for itself, but a program can still get them).
    **{host: 45 + host - 33 for host in range(33, 64)},
    32: 77,
    64: 78,
}
_GDB_TO_HOST: Final = {number: host for host, number in _HOST_TO_GDB.items()}
_GDB_UNKNOWN: Final = 143  # GDB_SIGNAL_UNKNOWN
#: Signal numbers in packets are one byte (``T``, ``C``, ``S``, ``QPassSignals`` items).
_MAX_GDB_SIGNAL: Final = 0xFF


def gdb_signal(host: int) -> int:
    """gdb's number for host signal ``host``; signals without one (SIGSTKFLT) come out as
    ``GDB_SIGNAL_UNKNOWN`` (143)."""
    if host == 0:
        return 0
    return _HOST_TO_GDB.get(host, _GDB_UNKNOWN)


def host_signal(number: int) -> int | None:
    """The host signal for gdb's signal ``number`` (0 for 0), or None if it has none."""
    if number == 0:
        return 0
    return _GDB_TO_HOST.get(number)


def parse_signal_list(text: bytes) -> set[int]:
    """The host signals of a ``QPassSignals:`` list (gdb numbers in hex, ``;`` between, or
    nothing); gdb's signals that have no host number are left out, as gdbserver ignores
    them. Raises PacketError for anything that is not such a list."""
    if not text:
        return set()
    hosts = set()
    for item in text.split(b";"):
        number = hex_int(item, "signal number")
        if number > _MAX_GDB_SIGNAL:
            raise PacketError(f"signal number {number:#x} out of range")
        host = host_signal(number)
        if host:
            hosts.add(host)
    return hosts
