"""hwbkptd: a daemon that shares x86-64 hardware breakpoint slots among many clients.

Run it with ``hwbkptd`` (see ``hwbkptd --help``); talk to it with the ``hwbkpt`` client
library or CLI. The modules are private; HACKING.md says which one holds what.
"""

from __future__ import annotations

from importlib import metadata as _metadata

__all__ = ["__version__"]

try:
    __version__: str = _metadata.version("hwbkptd")
except _metadata.PackageNotFoundError:  # running from a tree that was never installed
    __version__ = "0.0.0+unknown"
