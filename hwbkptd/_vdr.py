"""One client's virtual debug registers DR0-DR7 for one thread (DESIGN §5.6).

Theory of operation
-------------------
A debugger that speaks raw ``PTRACE_PEEKUSER``/``PTRACE_POKEUSER`` must see, through the
daemon, exactly what the live kernel would show it on a thread with free slots: the same
errno for every write and the same value for every read, for *any* sequence of writes.
So this module is a replica of the kernel's ptrace debug-register state machine
(``arch/x86/kernel/ptrace.c``: ``ptrace_set_debugreg``, ``ptrace_set_breakpoint_addr``,
``ptrace_write_dr7``, ``ptrace_get_debugreg``; ``arch/x86/kernel/hw_breakpoint.c``:
``arch_build_bp_info``, ``hw_breakpoint_arch_parse``, ``arch_check_bp_in_kernelspace``),
checked against the live kernel by ``tests/test_vdr_kernel.py``.

The kernel keeps, per thread:

* ``ptrace_bps[0..3]`` — a perf breakpoint per slot, or none. A slot gets one the first
  time DR*n* is written (a *disabled placeholder*: write, 1 byte, at that address) or the
  first time DR7 enables it (at address 0). It then lives until exec or exit. Each one
  *latches* an RW/LEN pair and the enabled bit from the last DR7 pass that touched it, and
  every change to it is validated with that pair, **enabled or not**: a disabled slot with
  a latched 8-byte write pair refuses an unaligned DR*n* address, and a DR7 write whose
  bits for a *disabled* slot that has a breakpoint say RW=10 fails with ``EINVAL``.
* ``ptrace_dr7`` — the raw value of the last *successful* DR7 write, reserved bits and
  all (the kernel masks them only for decoding). That is what DR7 reads return.
* ``virtual_dr6`` — stored in positive polarity (``written ^ 0xFFFF0FF0``) and read back
  the same way, so a write of any 64-bit value reads back unchanged.

A DR7 write is one pass over slots 0..3 that stops at the first refusal; on refusal the
kernel runs a second pass with DR7 re-encoded from the breakpoints that were *enabled*
before (``ptrace_get_dr7``). That restores every enabled slot exactly, but it is not a
snapshot restore: disabled slots that have a breakpoint re-latch RW=00/LEN=00 (execute),
and slots that gained a breakpoint in the failed pass keep it, as a disabled placeholder
at address 0. Those effects are invisible to reads and to the enabled set, but they
change which later writes succeed, so :meth:`VirtualDebugRegisters.prepare_poke` applies
them when it raises for a refused DR7 write.

Split with the engine: :meth:`~VirtualDebugRegisters.prepare_poke` validates a write and
returns a :class:`PokePlan` carrying the resulting enabled set; the engine diffs it
against :meth:`~VirtualDebugRegisters.enabled`, realizes the difference in physical slots,
and then calls :meth:`~VirtualDebugRegisters.commit` — or, if it could not (``ENOSPC``),
:meth:`~VirtualDebugRegisters.abandon`, which leaves what the kernel leaves after a refused
write. No syscall happens here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from hwbkpt_proto._errors import DebugRegisterIOError, InvalidArgumentError
from hwbkptd._model import Access, Spec

__all__ = [
    "DEBUGREG_OFFSET",
    "DR6_RESERVED",
    "DR6_STEP",
    "SIZEOF_KERNEL_USER",
    "TASK_SIZE_MAX",
    "PokePlan",
    "VirtualDebugRegisters",
    "decode_dr7_slot",
    "user_offset_to_dr",
]

# offsetof(struct user, u_debugreg) on x86-64.
DEBUGREG_OFFSET = 848
# The *kernel's* sizeof(struct user) (arch/x86/include/asm/user_64.h): it has error_code
# and fault_address after u_debugreg, so it is 928, not glibc's 912. PEEK/POKEUSER refuse
# offsets from here on with EIO; 912 and 920 peek as 0 and refuse pokes (measured).
SIZEOF_KERNEL_USER = 928
# x86-64, 4-level paging: the last user page is not usable (arch_check_bp_in_kernelspace).
TASK_SIZE_MAX = (1 << 47) - 4096
# arch/x86/include/uapi/asm/debugreg.h
DR6_RESERVED = 0xFFFF0FF0
DR6_STEP = 0x4000
_DR7_GLOBAL_SLOWDOWN = 0x200  # GE, which the kernel's encode_dr7 always sets
_MASK64 = (1 << 64) - 1
_NSLOTS = 4

# RW field values (SDM vol. 3, 18.2.4).
_RW_EXECUTE = 0b00
_RW_WRITE = 0b01
_RW_IO = 0b10  # needs CR4.DE; the kernel never accepts it
_RW_READWRITE = 0b11
# LEN field -> bytes. 0b10 is 8 bytes in 64-bit mode, hence the odd order.
_LEN_BYTES = {0b00: 1, 0b01: 2, 0b11: 4, 0b10: 8}
_RW_ACCESS = {_RW_EXECUTE: Access.EXECUTE, _RW_WRITE: Access.WRITE, _RW_READWRITE: Access.READWRITE}


@dataclass(frozen=True, slots=True)
class _Slot:
    """One kernel ``ptrace_bps[n]``: absent, or a breakpoint with its latched DR7 fields."""

    exists: bool = False
    addr: int = 0
    rw: int = _RW_WRITE
    len_bits: int = 0b00
    enabled: bool = False

    def spec(self) -> Spec:
        access = _RW_ACCESS[self.rw]
        length = 1 if access is Access.EXECUTE else _LEN_BYTES[self.len_bits]
        return Spec(self.addr, length, access)


_NO_SLOT = _Slot()


def decode_dr7_slot(dr7: int, n: int) -> tuple[bool, int, int]:
    """``(enabled, rw, len_bits)`` of slot ``n`` in a DR7 value (the kernel's decode_dr7).

    A slot is enabled when its L or G bit is set; LE, GE, GD and the reserved bits play
    no part.
    """
    enabled = (dr7 >> (2 * n)) & 0b11 != 0
    bits = (dr7 >> (16 + 4 * n)) & 0xF
    return enabled, bits & 0b11, bits >> 2


def _refusal(addr: int, rw: int, len_bits: int) -> str | None:
    """Why the kernel would refuse a breakpoint with these fields, or ``None``.

    Mirrors arch_bp_generic_fields (RW=10, execute with LEN≠00), hw_breakpoint_arch_parse
    (alignment) and arch_check_bp_in_kernelspace (the range must end below TASK_SIZE_MAX);
    every one of them is EINVAL, so only the reason differs.
    """
    if rw == _RW_IO:
        return "RW=10 (I/O breakpoints) is not supported"
    if rw == _RW_EXECUTE:
        if len_bits != 0b00:
            return "an execute breakpoint needs LEN=00"
        length = 1
    else:
        length = _LEN_BYTES[len_bits]
        if addr % length:
            return f"address {addr:#x} is not aligned to the length {length}"
    if addr + length - 1 >= TASK_SIZE_MAX:
        return f"address {addr:#x} is not a user-space address"
    return None


def _encode_enabled(slots: tuple[_Slot, ...]) -> int:
    """The kernel's ptrace_get_dr7: DR7 rebuilt from the enabled breakpoints only."""
    dr7 = 0
    for n, slot in enumerate(slots):
        if slot.exists and slot.enabled:
            len_bits = 0b00 if slot.rw == _RW_EXECUTE else slot.len_bits
            dr7 |= ((len_bits << 2) | slot.rw) << (16 + 4 * n)
            dr7 |= 0b10 << (2 * n)  # G: encode_dr7 uses DR_GLOBAL_ENABLE
            dr7 |= _DR7_GLOBAL_SLOWDOWN
    return dr7


def _dr7_pass(slots: list[_Slot], data: int) -> str | None:
    """One pass of ptrace_write_dr7 over ``slots`` (mutated); the first refusal, or None."""
    for n in range(_NSLOTS):
        enabled, rw, len_bits = decode_dr7_slot(data, n)
        slot = slots[n]
        if not slot.exists:
            if not enabled:
                continue  # no breakpoint and none wanted: the fields are not even checked
            candidate = _Slot(True, 0, rw, len_bits, True)
        else:
            candidate = replace(slot, rw=rw, len_bits=len_bits, enabled=enabled)
        reason = _refusal(candidate.addr, rw, len_bits)
        if reason is not None:
            return f"DR7 slot {n}: {reason}"
        slots[n] = candidate
    return None


def _enabled_of(slots: tuple[_Slot, ...]) -> dict[int, Spec]:
    return {n: s.spec() for n, s in enumerate(slots) if s.exists and s.enabled}


def _normalize(value: int) -> int:
    if not -(1 << 63) <= value <= _MASK64:
        raise InvalidArgumentError(f"{value:#x} does not fit in a 64-bit register")
    return value & _MASK64


@dataclass(frozen=True)
class PokePlan:
    """What one accepted write would do, for the engine to realize before :meth:`commit`.

    ``enabled`` is the complete enabled set after the write (virtual slot → Spec); the
    engine diffs it against the current :meth:`VirtualDebugRegisters.enabled`.
    """

    n: int
    value: int
    enabled: dict[int, Spec]
    _slots: tuple[_Slot, ...] = field(repr=False, compare=False)
    _dr7: int = field(repr=False, compare=False)
    _vdr6: int = field(repr=False, compare=False)
    _if_refused: tuple[_Slot, ...] = field(repr=False, compare=False)
    _generation: int = field(repr=False, compare=False)


class VirtualDebugRegisters:
    """One client's DR0-DR7 of one thread, with the kernel's PEEK/POKEUSER rules.

    A fresh instance is a thread that has never had a debug register written (after exec,
    or a new thread): DR0-DR5 and DR7 read 0, DR6 reads ``0xFFFF0FF0``.
    """

    def __init__(self) -> None:
        self._slots: tuple[_Slot, ...] = (_NO_SLOT,) * _NSLOTS
        self._dr7 = 0  # ptrace_dr7: the raw last successful DR7 write
        self._vdr6 = 0  # virtual_dr6, positive polarity
        self._generation = 0  # refuses plans made against an older state

    # -- reads ------------------------------------------------------------------------

    def peek(self, n: int) -> int:
        """What PTRACE_PEEKUSER of DR``n`` returns (an unsigned 64-bit value).

        DR4 and DR5 read 0. Raises :class:`DebugRegisterIOError` if ``n`` is not 0..7.
        """
        _check_index(n)
        if n < _NSLOTS:
            return self._slots[n].addr
        if n == 6:
            return self.dr6()
        if n == 7:
            return self._dr7
        return 0  # DR4, DR5

    def dr6(self) -> int:
        """What a DR6 read returns now: ``virtual_dr6 ^ 0xFFFF0FF0`` (architectural polarity)."""
        return self._vdr6 ^ DR6_RESERVED

    def enabled(self) -> dict[int, Spec]:
        """Virtual slot → :class:`Spec` of every slot DR7 currently enables."""
        return _enabled_of(self._slots)

    # -- writes -----------------------------------------------------------------------

    def prepare_poke(self, n: int, value: int) -> PokePlan:
        """Validate a write of ``value`` to DR``n`` as the kernel would; return its plan.

        Nothing visible changes until :meth:`commit`. One exception, to stay faithful:
        when a DR7 write is refused, the kernel's restore pass leaves hidden traces (see the
        module comment) and this method records them before raising; reads and the enabled
        set are unchanged.

        Raises :class:`DebugRegisterIOError` (EIO) for DR4, DR5 or an index outside 0..7,
        and :class:`InvalidArgumentError` (EINVAL) for an address or DR7 value the kernel
        refuses, or a value that does not fit in 64 bits.
        """
        _check_index(n)
        if n in (4, 5):
            raise DebugRegisterIOError(f"DR{n} does not exist; PTRACE_POKEUSER gives EIO")
        value = _normalize(value)
        slots = list(self._slots)
        dr7 = self._dr7
        vdr6 = self._vdr6
        if_refused = self._slots
        if n < _NSLOTS:
            slot = slots[n]
            if not slot.exists:
                # ptrace_set_breakpoint_addr: a disabled 1-byte write placeholder.
                slot = _Slot(exists=True, rw=_RW_WRITE, len_bits=0b00, enabled=False)
            reason = _refusal(value, slot.rw, slot.len_bits)
            if reason is not None:
                raise InvalidArgumentError(f"DR{n} = {value:#x}: {reason}")
            slots[n] = replace(slot, addr=value)
        elif n == 6:
            vdr6 = value ^ DR6_RESERVED
        else:
            reason = _dr7_pass(slots, value)
            restored = list(slots)
            again = _dr7_pass(restored, _encode_enabled(self._slots))
            assert again is None, f"restoring DR7 failed: {again}"
            if reason is not None:
                self._slots = tuple(restored)
                self._generation += 1
                raise InvalidArgumentError(f"DR7 = {value:#x}: {reason}")
            if_refused = tuple(restored)
            dr7 = value
        return PokePlan(
            n=n,
            value=value,
            enabled=_enabled_of(tuple(slots)),
            _slots=tuple(slots),
            _dr7=dr7,
            _vdr6=vdr6,
            _if_refused=if_refused,
            _generation=self._generation,
        )

    def commit(self, plan: PokePlan) -> None:
        """Apply a plan once the engine has installed ``plan.enabled``.

        Raises :class:`ValueError` if the plan was made before another change (a bug in
        the caller: plans must be committed or abandoned in the order they were made).
        """
        self._check_current(plan)
        self._slots = plan._slots
        self._dr7 = plan._dr7
        self._vdr6 = plan._vdr6
        self._generation += 1

    def abandon(self, plan: PokePlan) -> None:
        """The engine could not install ``plan.enabled`` (e.g. ENOSPC): the write failed.

        Leaves what the kernel leaves after a refused write: for DR0-3 nothing; for DR7 the
        traces of its restore pass (as if the last slot had been refused). Raises
        :class:`ValueError` like :meth:`commit`.
        """
        self._check_current(plan)
        self._slots = plan._if_refused
        self._generation += 1

    def record_trap(self, hit_slots: Iterable[int], single_step: bool) -> None:
        """A debug trap of the thread: reset virtual DR6 as the kernel does, then mark hits.

        The kernel (exc_debug_user in arch/x86/kernel/traps.c) sets ``virtual_dr6`` to just
        the single-step bit of the real DR6 at *every* user #DB, then ptrace_triggered ORs
        in one bit per ptrace slot that fired: bits never accumulate across traps.
        ``hit_slots`` are this client's virtual slot numbers. Raises :class:`ValueError`
        for a slot outside 0..3.
        """
        vdr6 = DR6_STEP if single_step else 0
        for n in hit_slots:
            if not 0 <= n < _NSLOTS:
                raise ValueError(f"hit slot {n} is not 0..3")
            vdr6 |= 1 << n
        self._vdr6 = vdr6

    def _check_current(self, plan: PokePlan) -> None:
        if plan._generation != self._generation:
            raise ValueError("stale PokePlan: the registers changed since it was prepared")


def _check_index(n: int) -> None:
    if not 0 <= n <= 7:
        raise DebugRegisterIOError(f"there is no debug register {n}; use 0..7")


def user_offset_to_dr(offset: int) -> int | None:
    """The debug register at a ``struct user`` offset, or ``None`` for any other field.

    ``None`` means the offset is valid but not a debug register: PEEKUSER there reads a
    general register (below 216) or 0, and POKEUSER there is EIO except for the registers.
    Raises :class:`DebugRegisterIOError` (the kernel's EIO) for offsets that are negative,
    not 8-byte aligned, or at or beyond the kernel's ``sizeof(struct user)`` (928).
    """
    if offset < 0 or offset % 8 or offset >= SIZEOF_KERNEL_USER:
        raise DebugRegisterIOError(
            f"struct user offset {offset:#x} is not an aligned offset below "
            f"{SIZEOF_KERNEL_USER}; debug registers are at {DEBUGREG_OFFSET} + 8 * n"
        )
    index = (offset - DEBUGREG_OFFSET) // 8
    if 0 <= index <= 7 and offset >= DEBUGREG_OFFSET:
        return index
    return None
