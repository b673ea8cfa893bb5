"""Who may connect to ``hwbkpt gdbserver --listen``.

gdbserver's TCP port lets any local user drive the debuggee with the server owner's rights
(issue 11). Ours admits only the same user (or root):

* ``--listen unix:PATH``: the socket is created 0600 and each peer's ``SO_PEERCRED`` uid is
  checked (unix(7)).
* ``--listen [HOST:]PORT``: loopback only unless ``--listen-any``; the uid owning the *peer's*
  socket is looked up in the kernel's socket table (``/proc/net/tcp``, ``/proc/net/tcp6``;
  proc(5): ``local_address rem_address … uid``), where the peer's socket is the row whose
  local address is the peer's and whose remote address is ours.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

__all__ = ["allowed_uid", "is_loopback", "peer_uid_tcp", "peer_uid_unix", "socket_table_uid"]


def allowed_uid(uid: int | None, me: int) -> bool:
    """Whether a peer of ``uid`` may connect to a server run by ``me`` (same uid, or root)."""
    return uid is not None and (uid == me or uid == 0)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is a loopback address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_uid_unix(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _proc_addr(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or the IPv6 form) from /proc/net/tcp* → ``("127.0.0.1", 8080)``.

    The address is the kernel's ``struct in(6)_addr`` printed as 32-bit words in host byte
    order (``net/ipv4/tcp_ipv4.c``, ``get_tcp4_sock``: ``%08X`` of ``__be32``).
    """
    hexaddr, _, hexport = text.partition(":")
    raw = bytes.fromhex(hexaddr)
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]  # little-endian hosts
    packed = b"".join(words)
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), int(hexport, 16)


def _normal(host: str, port: int) -> tuple[str, int]:
    addr = ipaddress.ip_address(host.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr), port


def socket_table_uid(
    table: str, peer: tuple[str, int], ours: tuple[str, int]
) -> int | None:
    """The uid owning the socket whose local end is ``peer`` and remote end ``ours``, in
    the text of a ``/proc/net/tcp``-style table; None if there is no such row."""
    want_local, want_remote = _normal(*peer), _normal(*ours)
    for line in table.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        try:
            local, remote = _proc_addr(fields[1]), _proc_addr(fields[2])
            uid = int(fields[7])
        except ValueError:
            continue
        if local == want_local and remote == want_remote:
            return uid
    return None


def peer_uid_tcp(conn: socket.socket) -> int | None:
    """The uid owning the peer's end of TCP connection ``conn`` if the peer is a local
    socket (None for a remote host, or when the row is not found)."""
    peer = conn.getpeername()[:2]
    ours = conn.getsockname()[:2]
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                table = f.read()
        except OSError:
            continue
        uid = socket_table_uid(table, peer, ours)
        if uid is not None:
            return uid
    return None
