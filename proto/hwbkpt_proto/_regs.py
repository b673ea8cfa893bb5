"""Registers on the wire: one ``bin`` of 27 little-endian u64 in protocol version 2.

Version 1 sends a stopped thread's registers as a map of 27 names to integers. Decoding that
map was the largest share of a client's CPU per stop (issue 13: ~30 of ~50 µs per ``stop``
event, most of it the 27 keys and values the msgpack decoder builds and the protocol checks
one by one). Version 2 sends the same values as one byte string of 27 x 8 bytes in the order
of the kernel's ``struct user_regs_struct`` (``arch/x86/include/asm/user_64.h``, which is
also what ``PTRACE_GETREGS`` writes), and the client wraps it in a :class:`Regs` that
unpacks it only when a register is first read. Most hit loops only resume; those that read
``rip`` pay one ``struct.unpack`` (~1 µs), not a map of 27 entries per stop.

:class:`Regs` is a read-only :class:`~collections.abc.Mapping`, so code written for
version 1 (``event.regs["rip"]``, ``dict(event.regs)``, ``event.regs == {...}``) keeps
working.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from typing import Final

from hwbkpt_proto._errors import ProtocolError

__all__ = ["REGISTER_NAMES", "REGS_SIZE", "Regs", "pack_regs"]

#: The general registers of x86-64, in ``struct user_regs_struct`` order (the wire order of
#: a version-2 ``regs`` bin, and the names of a version-1 ``regs`` map).
REGISTER_NAMES: Final = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp",
    "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip

_STRUCT: Final = struct.Struct(f"<{len(REGISTER_NAMES)}Q")

#: Bytes of a version-2 ``regs`` bin: 27 x 8 = 216.
REGS_SIZE: Final = _STRUCT.size

_INDEX: Final = {name: i for i, name in enumerate(REGISTER_NAMES)}
_NAMES_SET: Final = frozenset(REGISTER_NAMES)


def pack_regs(regs: Mapping[str, int]) -> bytes:
    """The version-2 ``bin`` of ``regs`` (a register missing from it is sent as 0).

    Raises :class:`ProtocolError` if a value is not a u64 (a bug of the sender).
    """
    if isinstance(regs, Regs):
        return regs.raw
    try:
        try:
            # The daemon's registers are complete (PTRACE_GETREGS): no default per name.
            return _STRUCT.pack(*map(regs.__getitem__, REGISTER_NAMES))
        except KeyError:
            return _STRUCT.pack(*[regs.get(name, 0) for name in REGISTER_NAMES])
    except struct.error as err:
        raise ProtocolError(f"registers cannot be encoded: {err}") from err


class Regs(Mapping[str, int]):
    """A thread's registers from a version-2 ``regs`` bin, decoded on first use.

    Behaves as the version-1 ``{name: int}`` map (it is a read-only mapping of the 27
    names of :data:`REGISTER_NAMES`); :attr:`raw` is the bytes as received.
    Raises :class:`ProtocolError` when built from anything but :data:`REGS_SIZE` bytes.
    """

    __slots__ = ("_values", "raw")

    def __init__(self, raw: bytes) -> None:
        if type(raw) is not bytes or len(raw) != REGS_SIZE:
            size = len(raw) if isinstance(raw, bytes | bytearray) else type(raw).__name__
            raise ProtocolError(
                f"registers must be a bin of {REGS_SIZE} bytes (27 little-endian u64), got {size}"
            )
        self.raw = raw
        self._values: tuple[int, ...] | None = None

    def _decoded(self) -> tuple[int, ...]:
        values = self._values
        if values is None:
            values = self._values = _STRUCT.unpack(self.raw)
        return values

    def __getitem__(self, name: str) -> int:
        return self._decoded()[_INDEX[name]]

    def __contains__(self, name: object) -> bool:
        return name in _NAMES_SET

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTER_NAMES)

    def __len__(self) -> int:
        return len(REGISTER_NAMES)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Regs):
            return self.raw == other.raw
        if isinstance(other, Mapping):
            return dict(zip(REGISTER_NAMES, self._decoded(), strict=True)) == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to dicts, which are unhashable

    def __repr__(self) -> str:
        values = zip(REGISTER_NAMES, self._decoded(), strict=True)
        inner = ", ".join(f"{n}={v:#x}" for n, v in values)
        return f"Regs({inner})"
