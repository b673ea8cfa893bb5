"""Table tests of the virtual debug registers (hwbkptd._vdr); no kernel, fast.

The expectations are the live kernel's, as measured by tests/test_vdr_kernel.py.
"""

from __future__ import annotations

import pytest

from hwbkpt_proto._errors import DebugRegisterIOError, InvalidArgumentError
from hwbkptd._model import Access, Spec
from hwbkptd._vdr import (
    DEBUGREG_OFFSET,
    TASK_SIZE_MAX,
    VirtualDebugRegisters,
    decode_dr7_slot,
    user_offset_to_dr,
)

USER = 0x5555_0000_1000  # 4096-aligned user address


def dr7(slot: int, rw: int, len_bits: int, enable: int = 0b01) -> int:
    return enable << (2 * slot) | ((len_bits << 2) | rw) << (16 + 4 * slot)


def poke(v: VirtualDebugRegisters, n: int, value: int) -> None:
    v.commit(v.prepare_poke(n, value))


# (rw, len_bits) -> Spec length/access, or None when the kernel refuses the pair.
RW_LEN_TABLE = [
    (0b00, 0b00, (1, Access.EXECUTE)),
    (0b00, 0b01, None),
    (0b00, 0b10, None),
    (0b00, 0b11, None),
    (0b01, 0b00, (1, Access.WRITE)),
    (0b01, 0b01, (2, Access.WRITE)),
    (0b01, 0b10, (8, Access.WRITE)),
    (0b01, 0b11, (4, Access.WRITE)),
    (0b10, 0b00, None),
    (0b10, 0b01, None),
    (0b10, 0b10, None),
    (0b10, 0b11, None),
    (0b11, 0b00, (1, Access.READWRITE)),
    (0b11, 0b01, (2, Access.READWRITE)),
    (0b11, 0b10, (8, Access.READWRITE)),
    (0b11, 0b11, (4, Access.READWRITE)),
]


@pytest.mark.parametrize("slot", range(4))
@pytest.mark.parametrize(("rw", "len_bits", "expect"), RW_LEN_TABLE)
def test_dr7_decoding(slot: int, rw: int, len_bits: int, expect: tuple[int, Access] | None) -> None:
    v = VirtualDebugRegisters()
    poke(v, slot, USER)
    value = dr7(slot, rw, len_bits)
    assert decode_dr7_slot(value, slot) == (True, rw, len_bits)
    if expect is None:
        with pytest.raises(InvalidArgumentError):
            v.prepare_poke(7, value)
        assert v.peek(7) == 0
        assert v.enabled() == {}
    else:
        plan = v.prepare_poke(7, value)
        assert plan.enabled == {slot: Spec(USER, *expect)}
        assert v.enabled() == {}  # nothing changes before commit
        v.commit(plan)
        assert v.enabled() == {slot: Spec(USER, *expect)}
        assert v.peek(7) == value


@pytest.mark.parametrize(("rw", "len_bits", "expect"), RW_LEN_TABLE)
@pytest.mark.parametrize("offset", [1, 2, 4])
def test_dr7_alignment(
    rw: int, len_bits: int, expect: tuple[int, Access] | None, offset: int
) -> None:
    v = VirtualDebugRegisters()
    poke(v, 0, USER + offset)
    ok = expect is not None and (USER + offset) % expect[0] == 0
    if ok:
        poke(v, 7, dr7(0, rw, len_bits))
    else:
        with pytest.raises(InvalidArgumentError):
            v.prepare_poke(7, dr7(0, rw, len_bits))


@pytest.mark.parametrize(
    ("enable", "on"), [(0b00, False), (0b01, True), (0b10, True), (0b11, True)]
)
def test_l_or_g_enables_and_extra_bits_are_kept(enable: int, on: bool) -> None:
    v = VirtualDebugRegisters()
    poke(v, 2, USER)
    value = dr7(2, 0b01, 0b11, enable) | 0x300 | 1 << 13 | 0xFC00 | 0xDEAD << 40
    poke(v, 7, value)
    assert v.peek(7) == value  # the raw value, reserved bits and GD included
    assert v.enabled() == ({2: Spec(USER, 4, Access.WRITE)} if on else {})


def test_enabling_a_slot_without_address_watches_address_zero() -> None:
    v = VirtualDebugRegisters()
    poke(v, 7, dr7(1, 0b11, 0b10))
    assert v.enabled() == {1: Spec(0, 8, Access.READWRITE)}
    assert v.peek(1) == 0


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        (0, True),
        (USER + 1, True),
        (TASK_SIZE_MAX - 1, True),
        (TASK_SIZE_MAX, False),
        (1 << 47, False),
        (0xFFFF_8000_0000_0000, False),
        ((1 << 64) - 1, False),
        (-1, False),  # two's complement: 0xffff...
    ],
)
def test_address_writes(addr: int, ok: bool) -> None:
    v = VirtualDebugRegisters()
    if ok:
        poke(v, 3, addr)
        assert v.peek(3) == addr
    else:
        with pytest.raises(InvalidArgumentError):
            v.prepare_poke(3, addr)
        assert v.peek(3) == 0


def test_address_write_to_enabled_slot_changes_spec_and_is_checked() -> None:
    v = VirtualDebugRegisters()
    poke(v, 0, USER)
    poke(v, 7, dr7(0, 0b01, 0b10))  # write, 8 bytes
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(0, USER + 4)
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(0, TASK_SIZE_MAX - 4)
    plan = v.prepare_poke(0, USER + 8)
    assert plan.enabled == {0: Spec(USER + 8, 8, Access.WRITE)}
    v.commit(plan)
    assert v.peek(0) == USER + 8
    assert v.prepare_poke(0, TASK_SIZE_MAX - 8).enabled == {
        0: Spec(TASK_SIZE_MAX - 8, 8, Access.WRITE)
    }


def test_disabled_slot_keeps_latched_fields() -> None:
    """Measured: a disabled breakpoint is still validated with its last RW/LEN."""
    v = VirtualDebugRegisters()
    poke(v, 0, USER)
    poke(v, 7, dr7(0, 0b01, 0b10, enable=0))  # disabled, but latches write/8
    assert v.enabled() == {}
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(0, USER + 4)
    poke(v, 7, 0)  # latches execute/1
    poke(v, 0, USER + 4)


def test_disabled_fields_checked_only_where_a_breakpoint_exists() -> None:
    v = VirtualDebugRegisters()
    poke(v, 7, dr7(0, 0b10, 0b00, enable=0))  # no breakpoint in slot 0: fine
    assert v.peek(7) == 0x20000
    poke(v, 0, USER)
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(7, dr7(0, 0b10, 0b00, enable=0))
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(7, dr7(0, 0b00, 0b01, enable=0))


def test_refused_dr7_restores_enabled_set_and_reads() -> None:
    v = VirtualDebugRegisters()
    poke(v, 1, USER)
    good = dr7(1, 0b11, 0b11) | 0x100
    poke(v, 7, good)
    before = v.enabled()
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(7, dr7(1, 0b01, 0b00) | dr7(2, 0b10, 0b00))
    assert v.enabled() == before
    assert [v.peek(n) for n in range(8)] == [0, USER, 0, 0, 0, 0, 0xFFFF0FF0, good]


def test_refused_dr7_leaves_the_kernels_traces() -> None:
    """Measured: the restore pass re-latches disabled slots as execute and keeps new ones."""
    v = VirtualDebugRegisters()
    poke(v, 0, USER)
    poke(v, 7, dr7(0, 0b01, 0b10, enable=0))  # slot 0 latched write/8, disabled
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(7, dr7(2, 0b01, 0b00) | dr7(3, 0b10, 0b00))
    assert v.peek(7) == dr7(0, 0b01, 0b10, enable=0)  # the read still says write/8 ...
    poke(v, 0, USER + 4)  # ... but slot 0 now takes an unaligned address
    # slot 2 got a breakpoint in the refused pass: its disabled fields are checked now
    with pytest.raises(InvalidArgumentError):
        v.prepare_poke(7, dr7(2, 0b10, 0b00, enable=0))
    poke(v, 7, dr7(3, 0b10, 0b00, enable=0))  # slot 3 never got one


def test_abandon_is_a_refused_write() -> None:
    v = VirtualDebugRegisters()
    plan = v.prepare_poke(7, dr7(0, 0b01, 0b00))
    v.abandon(plan)
    assert v.peek(7) == 0
    assert v.enabled() == {}
    with pytest.raises(InvalidArgumentError):  # slot 0 has a placeholder now
        v.prepare_poke(7, dr7(0, 0b10, 0b00, enable=0))


def test_stale_plan_is_refused() -> None:
    v = VirtualDebugRegisters()
    plan = v.prepare_poke(0, USER)
    poke(v, 1, USER)
    with pytest.raises(ValueError, match="stale"):
        v.commit(plan)


@pytest.mark.parametrize("n", [4, 5])
def test_dr4_dr5(n: int) -> None:
    v = VirtualDebugRegisters()
    assert v.peek(n) == 0
    with pytest.raises(DebugRegisterIOError):
        v.prepare_poke(n, 0)


@pytest.mark.parametrize("n", [-1, 8, 100])
def test_bad_index(n: int) -> None:
    v = VirtualDebugRegisters()
    with pytest.raises(DebugRegisterIOError):
        v.peek(n)
    with pytest.raises(DebugRegisterIOError):
        v.prepare_poke(n, 0)


def test_value_must_fit_64_bits() -> None:
    with pytest.raises(InvalidArgumentError):
        VirtualDebugRegisters().prepare_poke(6, 1 << 64)


@pytest.mark.parametrize(
    ("offset", "expect"),
    [
        (DEBUGREG_OFFSET, 0),
        (DEBUGREG_OFFSET + 8 * 7, 7),
        (DEBUGREG_OFFSET + 32, 4),
        (0, None),
        (216, None),
        (840, None),
        (912, None),  # error_code: in the kernel's struct user, not glibc's
        (920, None),
        (DEBUGREG_OFFSET + 1, DebugRegisterIOError),
        (DEBUGREG_OFFSET + 4, DebugRegisterIOError),
        (928, DebugRegisterIOError),
        (-8, DebugRegisterIOError),
        (1 << 63, DebugRegisterIOError),
    ],
)
def test_user_offset_to_dr(offset: int, expect: int | type[Exception] | None) -> None:
    if isinstance(expect, type):
        with pytest.raises(expect):
            user_offset_to_dr(offset)
    else:
        assert user_offset_to_dr(offset) == expect


@pytest.mark.parametrize(
    ("written", "read"),
    [(0xFFFF0FF0, 0xFFFF0FF0), (0, 0), (0xFFFF0FF1, 0xFFFF0FF1), ((1 << 64) - 1, (1 << 64) - 1)],
)
def test_dr6_round_trip(written: int, read: int) -> None:
    v = VirtualDebugRegisters()
    assert v.dr6() == v.peek(6) == 0xFFFF0FF0
    poke(v, 6, written)
    assert v.peek(6) == read


@pytest.mark.parametrize(
    ("hits", "step", "dr6"),
    [
        ([0], False, 0xFFFF0FF1),
        ([3], False, 0xFFFF0FF8),
        ([0, 2], False, 0xFFFF0FF5),
        ([], True, 0xFFFF4FF0),
        ([1], True, 0xFFFF4FF2),
        ([], False, 0xFFFF0FF0),
    ],
)
def test_dr6_after_trap(hits: list[int], step: bool, dr6: int) -> None:
    v = VirtualDebugRegisters()
    poke(v, 6, 0xFFFF4FFF)  # whatever was there is wiped by the trap
    v.record_trap(hits, single_step=step)
    assert v.dr6() == v.peek(6) == dr6


def test_dr6_bits_do_not_accumulate() -> None:
    v = VirtualDebugRegisters()
    v.record_trap([0], single_step=False)
    v.record_trap([1], single_step=False)
    assert v.dr6() == 0xFFFF0FF2
    with pytest.raises(ValueError, match=r"0\.\.3"):
        v.record_trap([4], single_step=False)
