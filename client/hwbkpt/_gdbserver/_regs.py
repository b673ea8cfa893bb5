"""The amd64 register file as gdb numbers it, and its target description.

The numbering and the features are gdb's own for amd64 GNU/Linux (gdb/features/i386/:
``64bit-core``, ``64bit-sse``, ``64bit-linux``, ``64bit-segments``), so that gdb and lldb
take the description as the usual amd64-linux one: regnum 0-39 core (general registers,
then x87), 40-56 SSE, 57 ``orig_rax``, 58-59 ``fs_base``/``gs_base``. gdb's amd64 code
insists on every core register being present (``i386_validate_tdesc_p`` numbers all 40),
and the Linux ABI code looks for ``org.gnu.gdb.i386.linux``/``orig_rax`` (system-call
restarts) — hence x87 and SSE registers appear although the daemon does not serve them:
their values go out as ``xx…`` ("unavailable", gdb's remote protocol manual, packet ``g``),
and a write to them is refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = ["REGISTERS", "TARGET_XML", "Register", "pack_all", "pack_one", "unpack"]


@dataclass(frozen=True, slots=True)
class Register:
    """One register: gdb's name, its size in bytes, and the daemon's name (None: not
    served by the daemon, shown as unavailable)."""

    name: str
    size: int
    gdb_type: str
    daemon: str | None
    group: str | None = None


def _core() -> list[Register]:
    regs = [
        Register(n, 8, "data_ptr" if n in ("rbp", "rsp") else "int64", n)
        for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")
    ]
    regs += [Register(f"r{i}", 8, "int64", f"r{i}") for i in range(8, 16)]
    regs.append(Register("rip", 8, "code_ptr", "rip"))
    regs.append(Register("eflags", 4, "i386_eflags", "eflags"))
    regs += [Register(n, 4, "int32", n) for n in ("cs", "ss", "ds", "es", "fs", "gs")]
    regs += [Register(f"st{i}", 10, "i387_ext", None) for i in range(8)]
    regs += [
        Register(n, 4, "int", None, "float")
        for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
    ]
    return regs


#: Every register in gdb's order (the index is gdb's regnum for ``p``/``P``).
REGISTERS: Final = (
    _core()
    + [Register(f"xmm{i}", 16, "vec128", None) for i in range(16)]
    + [Register("mxcsr", 4, "i386_mxcsr", None, "vector")]
    + [Register("orig_rax", 8, "int", "orig_rax")]
    + [Register("fs_base", 8, "int", "fs_base"), Register("gs_base", 8, "int", "gs_base")]
)

_EFLAGS_FIELDS = (
    ("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
    ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
    ("VIP", 20), ("ID", 21),
)
_MXCSR_FIELDS = (
    "IE", "DE", "ZE", "OE", "UE", "PE", "DAZ", "IM", "DM", "ZM", "OM", "UM", "PM", "FZ",
)


def _flags(name: str, fields: list[tuple[str, int]]) -> str:
    inner = "".join(f'<field name="{f}" start="{b}" end="{b}"/>' for f, b in fields)
    return f'<flags id="{name}" size="4">{inner}</flags>'


def _reg(index: int, reg: Register) -> str:
    group = f' group="{reg.group}"' if reg.group else ""
    return (
        f'<reg name="{reg.name}" bitsize="{reg.size * 8}" type="{reg.gdb_type}" '
        f'regnum="{index}"{group}/>'
    )


def _feature(name: str, prologue: str, first: int, last: int) -> str:
    regs = "".join(_reg(i, REGISTERS[i]) for i in range(first, last))
    return f'<feature name="{name}">{prologue}{regs}</feature>'


_VEC128 = (
    '<vector id="v8bf16" type="bfloat16" count="8"/>'
    '<vector id="v4f" type="ieee_single" count="4"/><vector id="v2d" type="ieee_double" '
    'count="2"/><vector id="v16i8" type="int8" count="16"/><vector id="v8i16" type="int16" '
    'count="8"/><vector id="v4i32" type="int32" count="4"/><vector id="v2i64" type="int64" '
    'count="2"/><union id="vec128"><field name="v8_bfloat16" type="v8bf16"/>'
    '<field name="v4_float" type="v4f"/><field name="v2_double" type="v2d"/>'
    '<field name="v16_int8" type="v16i8"/><field name="v8_int16" type="v8i16"/>'
    '<field name="v4_int32" type="v4i32"/><field name="v2_int64" type="v2i64"/>'
    '<field name="uint128" type="uint128"/></union>'
)

#: The ``target.xml`` annex of ``qXfer:features:read``.
TARGET_XML: Final = (
    '<?xml version="1.0"?><!DOCTYPE target SYSTEM "gdb-target.dtd">'
    "<target><architecture>i386:x86-64</architecture><osabi>GNU/Linux</osabi>"
    + _feature("org.gnu.gdb.i386.core", _flags("i386_eflags", list(_EFLAGS_FIELDS)), 0, 40)
    + _feature(
        "org.gnu.gdb.i386.sse",
        _VEC128 + _flags("i386_mxcsr", [(f, b) for b, f in enumerate(_MXCSR_FIELDS)]),
        40,
        57,
    )
    + _feature("org.gnu.gdb.i386.linux", "", 57, 58)
    + _feature("org.gnu.gdb.i386.segments", "", 58, 60)
    + "</target>"
).encode()


def pack_one(reg: Register, regs: Mapping[str, int]) -> bytes:
    """One register in the target's byte order as hex; ``xx…`` if it is unavailable."""
    if reg.daemon is None or reg.daemon not in regs:
        return b"xx" * reg.size
    value = regs[reg.daemon] & ((1 << (reg.size * 8)) - 1)
    return value.to_bytes(reg.size, "little").hex().encode()


def pack_all(regs: Mapping[str, int]) -> bytes:
    """The reply to ``g``: every register in order."""
    return b"".join(pack_one(reg, regs) for reg in REGISTERS)


def unpack(reg: Register, text: bytes) -> int | None:
    """A register value sent by the debugger (hex, target byte order); ``None`` if it
    is malformed, of the wrong size, or "unavailable" (``xx``)."""
    if len(text) != reg.size * 2:
        return None
    try:
        raw = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    return int.from_bytes(raw, "little")
