"""``hwbkpt gdbserver PID``: move bytes between one debugger and its session.

On stdin/stdout by default (``target remote | hwbkpt gdbserver PID``), or on one socket
connection with ``--listen`` (see :mod:`._access` for who may connect). One debugger per
run, one daemon client per debugger. Log lines go to stderr, which gdb shows.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import select
import socket
import sys

from hwbkpt._blocking import Client
from hwbkpt._gdbserver._access import (
    allowed_uid,
    is_loopback,
    peer_uid_tcp,
    peer_uid_unix,
)
from hwbkpt._gdbserver._session import GdbSession
from hwbkpt_proto import NoSuchProcessError

__all__ = ["configure", "run", "serve"]

log = logging.getLogger("hwbkpt.gdbserver")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``hwbkpt gdbserver``."""
    parser.add_argument("pid", type=int, help="the process to debug")
    parser.add_argument(
        "--listen",
        metavar="[HOST:]PORT|unix:PATH",
        help="serve one debugger on a TCP port (127.0.0.1 unless HOST) or a Unix socket "
        "(created 0600) instead of stdin/stdout",
    )
    parser.add_argument(
        "--listen-any",
        action="store_true",
        help="allow a HOST that is not loopback, and peers whose uid cannot be checked",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def serve(client: Client, pid: int, rfd: int, wfd: int) -> int:
    """Serve the debugger reading from ``rfd`` and writing to ``wfd`` until it leaves or
    the process is gone. Returns an exit status. Raises what :class:`GdbSession` raises
    when the process cannot be attached."""
    session = GdbSession(client, pid, lambda data: _write_all(wfd, data))
    # Everything imported and set up so far lives as long as the server: keep the cyclic
    # collector from scanning it again and again while a debugger steps through stops.
    gc.freeze()
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    poller.register(client.fileno(), select.POLLIN)
    try:
        while not session.finished:
            try:
                _serve_once(session, poller, rfd)
            except NoSuchProcessError as err:
                # The process ended under a request (its exit event not read yet): the
                # debugger still gets its exit reply, not a closed connection.
                session.process_gone(err)
    finally:
        session.leave()
    return EXIT_OK


def _serve_once(session: GdbSession, poller: select.poll, rfd: int) -> None:
    """One turn: the daemon's events, then whatever the debugger or the daemon sent."""
    session.pump_events()
    if session.finished:
        return
    for fd, _ in poller.poll(1000):
        if fd == rfd:
            try:
                data = os.read(rfd, 65536)
            except OSError:
                data = b""
            try:
                session.receive_data(data)
            except BrokenPipeError:
                session.leave()
        elif not session.finished:
            session.pump_events(readable=True)


def _listen(spec: str, listen_any: bool) -> socket.socket:
    """A listening socket for ``--listen``. Raises ValueError for a bad spec."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ValueError("--listen unix: needs a path")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600 at once, not chmod-ed after a window
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        sock.listen(1)
        return sock
    host, sep, port_text = spec.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--listen: bad port {port_text!r}") from None
    if not is_loopback(host) and not listen_any:
        raise ValueError(
            f"--listen: {host} is not a loopback address; anyone who can reach it could "
            "drive the program with your rights (add --listen-any if that is what you want)"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1)
    return sock


def _accept(listener: socket.socket, listen_any: bool) -> socket.socket:
    """The first connection whose peer may drive the program; others are closed."""
    me = os.getuid()
    while True:
        conn, addr = listener.accept()
        if listener.family == socket.AF_UNIX:
            uid: int | None = peer_uid_unix(conn)
        else:
            uid = peer_uid_tcp(conn)
        if allowed_uid(uid, me) or (listen_any and uid is None):
            log.info("debugger connected from %s (uid %s)", addr or "unix socket", uid)
            return conn
        log.warning(
            "refused a connection from %s: its uid %s is not yours (%d) nor root",
            addr or "unix socket", uid, me,
        )
        conn.close()


def run(client: Client, args: argparse.Namespace) -> int:
    """``hwbkpt gdbserver``: see the module docstring."""
    logging.basicConfig(
        stream=sys.stderr,
        level=getattr(logging, str(args.log_level).upper()),
        format="hwbkpt gdbserver: %(message)s",
    )
    if args.listen is None:
        return serve(client, args.pid, sys.stdin.fileno(), sys.stdout.fileno())
    try:
        listener = _listen(args.listen, args.listen_any)
    except (ValueError, OSError) as err:
        sys.stderr.write(f"hwbkpt gdbserver: {err}\n")
        return EXIT_USAGE
    path = args.listen[5:] if args.listen.startswith("unix:") else None
    try:
        if path is None:
            host, port = listener.getsockname()[:2]
            where = f"{host}:{port}"
        else:
            where = path
        sys.stderr.write(f"hwbkpt gdbserver: listening on {where} for process {args.pid}\n")
        sys.stderr.flush()
        conn = _accept(listener, args.listen_any)
    finally:
        listener.close()
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    with conn:
        return serve(client, args.pid, conn.fileno(), conn.fileno())
