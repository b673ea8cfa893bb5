"""Plain values shared by the engine, the kernel layer and the server.

A *key* ``(tid, addr, length, access)`` is what one physical slot realizes on one thread;
a watch is one client's request for a key (or, with process scope, for one key per thread).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "REGISTER_NAMES",
    "USER_SPACE_END",
    "Access",
    "Mode",
    "Spec",
    "check_spec",
]

# The x86-64 user address space ends below 2**47 with 4-level paging (TASK_SIZE_MAX is one
# page less). The kernel's own check (arch_check_bp_in_kernelspace) refuses any range that
# reaches past TASK_SIZE_MAX, so that is the limit the daemon applies too.
USER_SPACE_END = (1 << 47) - 4096

# struct user_regs_struct (arch/x86/include/asm/user_64.h), in order: PEEKUSER offsets 0..208.
REGISTER_NAMES = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp",
    "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip


class Access(enum.Enum):
    """What a slot fires on. Values are the wire spellings."""

    EXECUTE = "x"
    WRITE = "w"
    READWRITE = "rw"

    # Members are singletons compared by identity, so identity is a valid hash; Enum's own
    # __hash__ is a Python function (hash(self._name_)), and every Spec lookup in the
    # engine's slot tables hashes an Access (issue 13 profile).
    __hash__ = object.__hash__


class Mode(enum.IntEnum):
    """What a hit does, ordered by strength: a shared slot is configured for the maximum."""

    COUNT = 0
    NOTIFY = 1
    STOP = 2

    @property
    def wire(self) -> str:
        return self.name.lower()

    @classmethod
    def from_wire(cls, name: str) -> Mode:
        return cls[name.upper()]


@dataclass(frozen=True, slots=True)
class Spec:
    """The address part of a key: what the hardware is asked to match."""

    addr: int
    length: int
    access: Access


def check_spec(addr: int, length: int, access: Access) -> str | None:
    """Return why the hardware cannot realize this breakpoint, or ``None`` if it can.

    The rules are the x86 debug-register ones (SDM vol. 3, 18.2.4) as the kernel applies
    them in ``arch/x86/kernel/hw_breakpoint.c``: lengths 1, 2, 4, 8; the address aligned to
    the length; execute breakpoints have length 1 (the kernel maps execute to LEN=00); and
    the whole range in user space.
    """
    if length not in (1, 2, 4, 8):
        return f"length {length} is not 1, 2, 4 or 8 bytes"
    if access is Access.EXECUTE and length != 1:
        return "execute breakpoints have length 1"
    if addr < 0 or addr + length > USER_SPACE_END:
        return f"address {addr:#x} is not a user-space address"
    if addr % length:
        return f"address {addr:#x} is not aligned to the length {length}"
    return None
