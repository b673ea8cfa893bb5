"""The ``hwbkptd`` command line: parse options, pick the backend, run the server."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import trio

from hwbkptd import __version__
from hwbkptd._config import DEFAULT_SOCKET, Config
from hwbkptd._rpc import EngineBackend
from hwbkptd._server import Backend, StartupError, serve

__all__ = ["main", "make_backend", "parse_args"]

log = logging.getLogger("hwbkptd")

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> Config:
    """Build the :class:`Config` from the command line (exits 2 on a usage error)."""
    parser = argparse.ArgumentParser(
        prog="hwbkptd",
        description=(
            "Share x86-64 hardware breakpoint slots (DR0-DR3) among many clients over "
            "msgpack-RPC on a Unix socket. Needs root (or CAP_SYS_PTRACE). Stops cleanly on "
            "SIGTERM or SIGINT, leaving every traced program running."
        ),
        epilog="Exit status: 0 after SIGTERM/SIGINT, 1 if it cannot start, 2 on a usage error.",
    )
    parser.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        metavar="PATH",
        help=f"Unix socket to listen on (default {DEFAULT_SOCKET}); ignored under systemd "
        "socket activation",
    )
    parser.add_argument(
        "--log-level", choices=_LOG_LEVELS, default="info", help="log to stderr from this level"
    )
    parser.add_argument(
        "--max-clients", type=_positive_int, default=256, help="connections served at once"
    )
    parser.add_argument(
        "--max-watches", type=_positive_int, default=1024, help="watches per client"
    )
    parser.add_argument(
        "--max-queued-events",
        type=_positive_int,
        default=10000,
        help="hits queued per client before further hits are dropped (and counted); control "
        "events (exit, stop, installed, ...) have as much room again of their own",
    )
    parser.add_argument(
        "--stop-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long a stop event may wait unread (not written to the client's socket) "
        "before that client is disconnected and its stops released; a client may stay at a "
        "stop as long as it likes once it has read the event",
    )
    parser.add_argument(
        "--notify-ring",
        type=_positive_int,
        default=2048,
        metavar="KIB",
        help="sample ring of each notify-mode breakpoint (default 2048 KiB: 65,535 hits, a "
        "third of a second of a thread hitting at full speed); rounded down to a power of two",
    )
    parser.add_argument(
        "--notify-ring-budget",
        type=_positive_int,
        default=256,
        metavar="MIB",
        help="locked memory for all notify rings together (default 256 MiB); past it, new rings "
        "get 64 KiB",
    )
    # Hidden: park each held thread in an interrupt stop before reporting it (see
    # _engine.py). Measured to buy nothing on 6.x kernels; kept to measure it again.
    parser.add_argument("--park", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-bpf",
        action="store_true",
        help="evaluate watch conditions at a ptrace stop of every hit instead of in the kernel "
        "with BPF (slower; what the daemon does anyway where BPF is not available)",
    )
    parser.add_argument("--version", action="version", version=f"hwbkptd {__version__}")
    args = parser.parse_args(argv)
    return Config(
        socket_path=args.socket,
        log_level=args.log_level,
        max_clients=args.max_clients,
        max_watches=args.max_watches,
        max_queued_events=args.max_queued_events,
        stop_timeout=args.stop_timeout,
        park=args.park,
        notify_ring_kib=args.notify_ring,
        notify_ring_budget_mib=args.notify_ring_budget,
        bpf=not args.no_bpf,
    )


def make_backend(config: Config) -> Backend:
    """The engine backend: watches served with the real kernel."""
    return EngineBackend(config)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the daemon; return its exit status."""
    config = parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=config.log_level.upper(),
        format="hwbkptd[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        backend = make_backend(config)
        trio.run(serve, config, backend)
    except StartupError as err:
        log.error("cannot start: %s", err)
        return 1
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
