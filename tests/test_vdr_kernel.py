"""Differential test: VirtualDebugRegisters against the live kernel's PEEK/POKEUSER.

Random sequences of ``PTRACE_POKEUSER`` writes (fixed seed) go to a real stopped thread
and to the model; after every write the errno and the read-back of all eight debug
registers must agree. A mismatch is shrunk to a minimal sequence and printed.

The machinery is reusable for other subjects (the daemon): a *subject* is anything with
``poke(offset, value) -> errno or 0`` and ``peek(offset) -> (errno, value)``; see
:func:`generate_sequence`, :func:`run_sequence` and :data:`RESET`.

``HWBKPT_VDR_SEQUENCES=N`` runs N sequences instead of the default 5,000.

Reset between sequences: the kernel never frees a slot's ptrace breakpoint before exec or
exit, so "fresh" cannot be restored in place. Writing DR0-3 = 0 (gives every slot a
breakpoint, at 0), then DR7 = 0 (all disabled, latched RW/LEN = 00) and DR6 = 0xFFFF0FF0
(virtual DR6 = 0) always succeeds and reaches one canonical state from any history; the
model is put through the same writes. Sequences from a thread that never had a breakpoint
run in :func:`test_fresh_thread_sequences`, one new process each.
"""

from __future__ import annotations

import errno
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import pytest

from hwbkpt_proto._errors import HwbkptError
from hwbkptd._vdr import TASK_SIZE_MAX, VirtualDebugRegisters, user_offset_to_dr
from tests._ptrace_ref import DEBUGREG_OFFSET, SIZEOF_KERNEL_USER, RefTracee, build_drtarget

pytestmark = pytest.mark.kernel

Op = tuple[int, int]  # (struct user offset, value) of one POKEUSER
# After one write: (errno or 0, then (errno, value) of each of DR0..DR7 read back).
Observation = tuple[int, tuple[tuple[int, int], ...]]

DR_OFFSETS = tuple(DEBUGREG_OFFSET + 8 * n for n in range(8))
MASK64 = (1 << 64) - 1
RESET: tuple[Op, ...] = (
    (DR_OFFSETS[0], 0),
    (DR_OFFSETS[1], 0),
    (DR_OFFSETS[2], 0),
    (DR_OFFSETS[3], 0),
    (DR_OFFSETS[7], 0),
    (DR_OFFSETS[6], 0xFFFF0FF0),
)
# Offsets that are not debug registers and must not disturb the tracee when poked:
# unaligned inside u_debugreg, error_code/fault_address (912, 920), past the kernel's
# struct user, negative, and other struct user fields (u_comm at 816, i387 at 224).
# Offsets below 216 are the general registers: never poked here.
ODD_OFFSETS = (849, 852, 903, 912, 920, SIZEOF_KERNEL_USER, 936, -8, 816, 224, 840, 1 << 40)
KERNEL_ADDRS = (
    TASK_SIZE_MAX,
    TASK_SIZE_MAX + 1,
    1 << 47,
    0xFFFF800000000000,
    0xFFFFFFFFFF600000,  # vsyscall page
    0xFFFFFE0000000000,  # cpu entry area
    MASK64,
    MASK64 - 7,
)


class Subject(Protocol):
    def poke(self, offset: int, value: int) -> int: ...
    def peek(self, offset: int) -> tuple[int, int]: ...


class KernelSubject:
    """The live kernel, through the reference tracer."""

    def __init__(self, tracee: RefTracee) -> None:
        self.tracee = tracee

    def poke(self, offset: int, value: int) -> int:
        try:
            self.tracee.pokeuser(offset, value)
        except OSError as err:
            return err.errno or -1
        return 0

    def peek(self, offset: int) -> tuple[int, int]:
        try:
            return 0, self.tracee.peekuser(offset)
        except OSError as err:
            return err.errno or -1, 0


class ModelSubject:
    """hwbkptd._vdr as a POKEUSER/PEEKUSER target (an engine that always installs)."""

    def __init__(self) -> None:
        self.vdr = VirtualDebugRegisters()

    def poke(self, offset: int, value: int) -> int:
        try:
            n = user_offset_to_dr(offset)
            if n is None:
                return errno.EIO  # other struct user fields refuse POKEUSER
            self.vdr.commit(self.vdr.prepare_poke(n, value))
        except HwbkptError as err:
            return err.errno or -1
        return 0

    def peek(self, offset: int) -> tuple[int, int]:
        try:
            n = user_offset_to_dr(offset)
        except HwbkptError as err:
            return err.errno or -1, 0
        assert n is not None, "only debug register offsets are peeked here"
        return 0, self.vdr.peek(n)


def observe(subject: Subject, op: Op) -> Observation:
    rc = subject.poke(*op)
    return rc, tuple(subject.peek(off) for off in DR_OFFSETS)


def run_sequence(subject: Subject, ops: Sequence[Op]) -> list[Observation]:
    return [observe(subject, op) for op in ops]


# -- generation ------------------------------------------------------------------------


def _address(rng: random.Random, user_addrs: Sequence[int]) -> int:
    kind = rng.random()
    if kind < 0.45:
        return rng.choice(user_addrs) + rng.choice((0, 0, 0, 8, 16, 0x1000))
    if kind < 0.65:  # unaligned user addresses
        return rng.choice(user_addrs) + rng.choice((1, 2, 3, 4, 6, 7, 12))
    if kind < 0.80:  # the end of user space
        return TASK_SIZE_MAX - rng.choice((1, 2, 3, 4, 6, 8, 16, 4096))
    if kind < 0.90:
        return rng.choice(KERNEL_ADDRS)
    return rng.choice((0, 1, 2, 4, 8))


def _dr7(rng: random.Random) -> int:
    value = 0
    for n in range(4):
        enable = rng.choice((0, 0, 1, 2, 3))
        value |= enable << (2 * n)
        if rng.random() < 0.2:
            fields = rng.randrange(16)  # anything, RW=10 and execute with LEN != 00 too
        elif enable or rng.random() < 0.5:
            fields = rng.choice((0b0000, 0b0001, 0b0011)) | rng.randrange(4) << 2
            fields &= 0b0011 if fields & 0b11 == 0 else 0b1111  # execute: LEN=00
        else:
            fields = 0
        value |= fields << (16 + 4 * n)
    if rng.random() < 0.3:
        value |= rng.choice((0x100, 0x200, 0x300))  # LE, GE
    if rng.random() < 0.15:
        value |= 1 << 13  # GD
    if rng.random() < 0.15:
        value |= rng.choice((0x400, 0x800, 0x1000, 0x4000, 0x8000, 0xFC00))
    if rng.random() < 0.1:
        value |= rng.getrandbits(32) << 32
    if rng.random() < 0.1:
        value = rng.getrandbits(64)
    return value


def _dr6(rng: random.Random) -> int:
    return rng.choice(
        (0, 0xFFFF0FF0, 0xFFFF0FF1, 0xFFFF4FF0, 0xF, 0x4000, MASK64, rng.getrandbits(64))
    )


def generate_sequence(rng: random.Random, user_addrs: Sequence[int]) -> list[Op]:
    ops: list[Op] = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.40:
            ops.append((DR_OFFSETS[rng.randrange(4)], _address(rng, user_addrs)))
        elif kind < 0.80:
            ops.append((DR_OFFSETS[7], _dr7(rng)))
        elif kind < 0.88:
            ops.append((DR_OFFSETS[6], _dr6(rng)))
        elif kind < 0.93:
            ops.append((DR_OFFSETS[rng.choice((4, 5))], rng.choice((0, 1, MASK64))))
        else:
            ops.append((rng.choice(ODD_OFFSETS), rng.choice((0, 0x1000))))
    return ops


# -- comparison and shrinking ---------------------------------------------------------


Pair = Callable[[], tuple[Subject, Subject]]  # a new (kernel, model) in the same state


def _first_mismatch(new_pair: Pair, ops: Sequence[Op]) -> int | None:
    kernel, model = new_pair()
    for i, op in enumerate(ops):
        if observe(model, op) != observe(kernel, op):
            return i
    return None


def _simpler_values(value: int) -> Iterator[int]:
    yield 0
    for bit in range(64):
        if value >> bit & 1:
            yield value & ~(1 << bit)


def shrink(new_pair: Pair, ops: list[Op]) -> list[Op]:
    """Greedy delta debugging: drop ops, then clear bits of values, while it still fails."""

    def fails(candidate: list[Op]) -> bool:
        return _first_mismatch(new_pair, candidate) is not None

    mismatch = _first_mismatch(new_pair, ops)
    assert mismatch is not None
    ops = ops[: mismatch + 1]
    changed = True
    while changed:
        changed = False
        chunk = max(1, len(ops) // 2)
        while chunk >= 1:
            i = 0
            while i < len(ops):
                candidate = ops[:i] + ops[i + chunk :]
                if candidate and fails(candidate):
                    ops, changed = candidate, True
                else:
                    i += chunk
            chunk //= 2
        for i, (offset, value) in enumerate(ops):
            for simpler in _simpler_values(value):
                if simpler != value and fails([*ops[:i], (offset, simpler), *ops[i + 1 :]]):
                    ops[i] = (offset, simpler)
                    changed = True
                    break
    return ops


def _describe(new_pair: Pair, ops: Sequence[Op]) -> str:
    kernel, model = new_pair()
    lines = []
    for offset, value in ops:
        want, got = observe(kernel, (offset, value)), observe(model, (offset, value))
        n = (offset - DEBUGREG_OFFSET) / 8
        mark = "   " if want == got else ">>>"
        lines.append(f"{mark} POKEUSER {offset} (DR{n:g}) = {value:#x}")
        for who, obs in (("kernel", want), ("model ", got)):
            regs = " ".join(f"{v:#x}" if e == 0 else errno.errorcode[e] for e, v in obs[1])
            rc = errno.errorcode.get(obs[0], "ok") if obs[0] else "ok"
            lines.append(f"      {who}: {rc:6} DR0..7: {regs}")
    return "\n".join(lines)


def _user_addrs(pid: int) -> list[int]:
    """Start addresses of the target's mappings, plus its stack: real user addresses."""
    addrs = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            start = int(line.split("-", 1)[0], 16)
            if start < TASK_SIZE_MAX:
                addrs.append(start)
    return addrs


def _sequence_count() -> int:
    return int(os.environ.get("HWBKPT_VDR_SEQUENCES", "5000"))


# -- tests ------------------------------------------------------------------------------


@pytest.fixture
def tracee() -> Iterator[RefTracee]:
    with RefTracee() as t:
        yield t


def test_reset_reaches_one_state(tracee: RefTracee) -> None:
    """The reset writes succeed from a messy state and read back as a fresh model does."""
    kernel = KernelSubject(tracee)
    for op in [(DR_OFFSETS[1], 0x1004), (DR_OFFSETS[7], 0x90004 | 0x2000), *RESET]:
        kernel.poke(*op)
    model = ModelSubject()
    assert [o[0] for o in run_sequence(model, RESET)] == [0] * len(RESET)
    assert [kernel.peek(off) for off in DR_OFFSETS] == [model.peek(off) for off in DR_OFFSETS]


def test_differential_sequences(tracee: RefTracee) -> None:
    """5,000 random write sequences on one reused thread agree with the model."""
    kernel = KernelSubject(tracee)
    addrs = _user_addrs(tracee.pid)
    rng = random.Random(0x5EED_D7)
    count = _sequence_count()
    deadline = time.monotonic() + max(120.0, count * 0.05)

    def reset_pair() -> tuple[Subject, Subject]:
        model = ModelSubject()
        for op in RESET:
            assert kernel.poke(*op) == 0, f"reset write {op} failed on the kernel"
            assert model.poke(*op) == 0, f"reset write {op} failed on the model"
        return kernel, model

    for index in range(count):
        assert time.monotonic() < deadline, f"too slow: {index} sequences done"
        ops = generate_sequence(rng, addrs)
        if _first_mismatch(reset_pair, ops) is not None:
            body = shrink(reset_pair, ops)
            pytest.fail(
                f"sequence {index} differs from the kernel; minimal sequence after the "
                f"reset writes {[(o, hex(v)) for o, v in RESET]}:\n{_describe(reset_pair, body)}"
            )


def test_fresh_thread_sequences() -> None:
    """Sequences on threads that never had a breakpoint (one new process each)."""
    rng = random.Random(0xF2E5)
    count = max(50, _sequence_count() // 20)
    tracees: list[RefTracee] = []

    def fresh_pair() -> tuple[Subject, Subject]:
        while tracees:  # one live child at a time
            tracees.pop().close()
        t = RefTracee()
        tracees.append(t)
        return KernelSubject(t), ModelSubject()

    try:
        with RefTracee() as probe:
            addrs = _user_addrs(probe.pid)
        for index in range(count):
            ops = generate_sequence(rng, addrs)
            if _first_mismatch(fresh_pair, ops) is not None:
                body = shrink(fresh_pair, ops)
                pytest.fail(
                    f"sequence {index} differs on a fresh thread:\n{_describe(fresh_pair, body)}"
                )
    finally:
        while tracees:
            tracees.pop().close()


def test_odd_offsets_peek(tracee: RefTracee) -> None:
    """PEEKUSER outside u_debugreg: the model's offset rule matches the kernel's."""
    for offset in (*ODD_OFFSETS, 905, 848 + 64, 216, 0):
        try:
            tracee.peekuser(offset)
            kernel_errno = 0
        except OSError as err:
            kernel_errno = err.errno or -1
        try:
            user_offset_to_dr(offset)
            model_errno = 0
        except HwbkptError as err:
            model_errno = err.errno or -1
        assert model_errno == kernel_errno, offset


def test_dr6_lifetime_with_real_traps() -> None:
    """Real hits and steps: the kernel's virtual DR6 matches record_trap's model."""
    binary = build_drtarget()
    with RefTracee([str(binary)], info_line=True) as t:
        info = dict(word.split("=") for word in t.info.split())
        a, b = int(info["a"], 16), int(info["b"], 16)
        model = VirtualDebugRegisters()

        def poke(n: int, value: int) -> None:
            t.poke_dr(n, value)
            model.commit(model.prepare_poke(n, value))

        poke(6, 0xFFFF0FFF)  # junk that the first trap must wipe
        poke(0, a)
        poke(1, b)
        poke(7, 0x90001)  # slot 0: write, 8 bytes
        assert t.resume() == 5  # SIGTRAP
        model.record_trap([0], single_step=False)
        assert t.peek_dr(6) == model.dr6() == 0xFFFF0FF1
        poke(7, 0x900004)  # slot 1 only
        assert t.resume() == 5
        model.record_trap([1], single_step=False)
        assert t.peek_dr(6) == model.dr6() == 0xFFFF0FF2  # slot 0's bit did not stay
        poke(7, 0)
        assert t.resume(step=True) == 5
        model.record_trap([], single_step=True)
        assert t.peek_dr(6) == model.dr6() == 0xFFFF4FF0
