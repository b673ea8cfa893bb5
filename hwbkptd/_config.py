"""The daemon's settings: one frozen value built by the command line, read by everyone else."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DEFAULT_SOCKET", "Config"]

# Also the client library's default (hwbkpt._session.DEFAULT_SOCKET); keep the two equal.
DEFAULT_SOCKET = "/run/hwbkptd/hwbkptd.sock"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the command line of ``hwbkptd`` can set.

    ``max_watches`` and ``stop_timeout`` are enforced by the engine backend, the rest by the
    server.
    """

    socket_path: str = DEFAULT_SOCKET
    log_level: str = "info"
    max_clients: int = 256
    max_watches: int = 1024
    max_queued_events: int = 10000
    stop_timeout: float = 30.0
    park: bool = False
    notify_ring_kib: int = 2048
    notify_ring_budget_mib: int = 256
    bpf: bool = True  # evaluate conditions in the kernel when it can (hwbkptd --no-bpf)
