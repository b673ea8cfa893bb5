"""The two pieces of the systemd service protocol the daemon speaks, in pure stdlib.

Theory of operation
-------------------
*Socket activation* (sd_listen_fds(3)): the service manager — systemd, or
``systemd-socket-activate`` in the tests — binds and listens on the socket named by
``hwbkptd.socket``, then execs the daemon with the listening sockets as file descriptors
3, 4, … and describes them in three variables::

    LISTEN_PID=<pid the fds are meant for>   LISTEN_FDS=<count>   LISTEN_FDNAMES=<a:b:…>

``LISTEN_PID`` guards against a child inheriting the environment and stealing the
descriptors, so they are only taken when it equals our own pid. Like
``sd_listen_fds(unset_environment=1)`` the variables are always removed, so that nothing
the daemon starts later believes the sockets are meant for it.

*Readiness notification* (sd_notify(3)): with ``Type=notify`` the manager passes
``NOTIFY_SOCKET``, the address of an ``AF_UNIX`` datagram socket; a name starting with
``@`` is in the abstract namespace (the ``@`` stands for the leading NUL byte). The daemon
sends ``READY=1`` once it is really accepting connections and ``STOPPING=1`` when it begins
to shut down. Clients connecting before ``READY=1`` are not lost either way: the socket
exists and queues connections from the moment the manager bound it.

Nothing here depends on python-systemd (libsystemd bindings), so the daemon runs the same
under systemd, under ``systemd-socket-activate`` and stand-alone (where both functions
are harmless no-ops).
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket

__all__ = ["SD_LISTEN_FDS_START", "listen_fds", "notify"]

_log = logging.getLogger(__name__)

#: The first passed file descriptor (``SD_LISTEN_FDS_START`` in sd-daemon.h).
SD_LISTEN_FDS_START = 3

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def _set_cloexec(fd: int) -> None:
    # The manager passes the descriptors without FD_CLOEXEC (they had to survive its
    # execve); set it so targets or helpers we might ever spawn don't inherit the socket.
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def _adopt(fd: int) -> socket.socket:
    """Wrap one passed descriptor, checking it is a listening AF_UNIX stream socket.

    Raises:
        ValueError: the descriptor is not open, or is not a listening ``AF_UNIX``
            ``SOCK_STREAM`` socket. A socket of the wrong kind is closed (it was passed to
            us); a descriptor that is not a socket is left alone (it may not be ours).
    """
    try:
        _set_cloexec(fd)
        # socket(fileno=...) asks the kernel for family, type and protocol (SO_DOMAIN,
        # SO_TYPE, SO_PROTOCOL) and takes ownership of the descriptor.
        sock = socket.socket(fileno=fd)
    except OSError as err:
        raise ValueError(
            f"file descriptor {fd} announced by LISTEN_FDS is not an open socket ({err}); "
            "hwbkptd.socket must contain exactly one ListenStream= line"
        ) from err
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot query the socket passed as fd {fd}: {err}") from err
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
        what = f"family={sock.family!r} type={sock.type!r} listening={bool(listening)}"
        sock.close()
        raise ValueError(
            f"file descriptor {fd} passed by the service manager is not a listening "
            f"AF_UNIX stream socket ({what}); use ListenStream=/path in hwbkptd.socket"
        )
    return sock


def listen_fds() -> list[socket.socket]:
    """Take the listening sockets passed by systemd socket activation.

    Returns the sockets (``AF_UNIX``, ``SOCK_STREAM``, already listening, ``FD_CLOEXEC``
    set) in the order of the ``ListenStream=`` lines, or an empty list when the daemon was
    not socket-activated (``LISTEN_PID`` unset or naming another process). In every case
    ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` are removed from ``os.environ``.

    Raises:
        ValueError: ``LISTEN_PID`` / ``LISTEN_FDS`` are malformed, or a passed descriptor
            is not a listening ``AF_UNIX`` stream socket. The passed sockets are closed
            first, so a misconfigured unit fails loudly instead of half-working.
    """
    env = {name: os.environ.pop(name, None) for name in _LISTEN_VARS}
    pid_s, count_s = env["LISTEN_PID"], env["LISTEN_FDS"]
    if not pid_s:
        return []
    try:
        pid = int(pid_s)
    except ValueError:
        raise ValueError(f"LISTEN_PID={pid_s!r} is not a process id") from None
    if pid != os.getpid():
        # Meant for another process (we inherited a parent's environment): not ours.
        return []
    try:
        count = int(count_s or "0")
    except ValueError:
        raise ValueError(f"LISTEN_FDS={count_s!r} is not a count") from None
    if count < 0:
        raise ValueError(f"LISTEN_FDS={count} is negative")
    sockets: list[socket.socket] = []
    try:
        for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
            sockets.append(_adopt(fd))
    except ValueError:
        # Fail loudly and whole: a misconfigured unit must not half-work.
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _notify_address(raw: str) -> str | bytes:
    if raw.startswith("@"):
        # Abstract namespace: leading NUL, the name is *not* NUL-terminated.
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    raise ValueError(f"NOTIFY_SOCKET={raw!r} is neither an absolute path nor @abstract")


def notify(state: str) -> bool:
    """Send one sd_notify(3) datagram, e.g. ``"READY=1"`` or ``"STOPPING=1"``.

    Several assignments may be joined with newlines. Returns ``True`` when the datagram
    was sent, ``False`` when ``NOTIFY_SOCKET`` is unset (not started by a service manager,
    a no-op) or when sending failed. A failure is logged rather than raised, as
    sd_notify's callers do: the manager, not the daemon, decides what a missing
    notification means (for ``READY=1``: a start timeout).

    Raises:
        nothing.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    try:
        address = _notify_address(raw)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except (OSError, ValueError) as err:
        _log.warning("sd_notify %r to %r failed: %s", state, raw, err)
        return False
    return True
