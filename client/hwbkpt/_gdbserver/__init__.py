"""``hwbkpt gdbserver``: a GDB Remote Serial Protocol server backed by hwbkptd.

Layers, as DESIGN.md §3 asks: :mod:`._codec` frames packets (sans I/O); the session maps
packets onto daemon calls; the serving glue moves bytes between a debugger and both.
"""

from hwbkpt._gdbserver._codec import Codec

__all__ = ["Codec"]
