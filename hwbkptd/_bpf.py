"""BPF code generation for watch conditions: one program per breakpoint slot.

Theory of operation
-------------------
A slot (one perf breakpoint event on one thread) may carry the watches of several clients,
each with its own condition. The slot's event gets one ``BPF_PROG_TYPE_PERF_EVENT`` program
(attached with ``PERF_EVENT_IOC_SET_BPF`` by :mod:`hwbkptd._kernel`) that the kernel runs at
every hit, before it would deliver the sample or the SIGTRAP. It

1. reads the watched bytes with ``bpf_probe_read_user`` (the access has completed: data
   breakpoints trap after the instruction) — that is ``new``;
2. takes ``old`` (the previous hit's ``new``) from the slot's map, and ``tid`` from
   ``bpf_get_current_pid_tgid``;
3. evaluates every condition in turn; for each one that is true it adds one to that
   condition's counter in the map (so ``count`` watches count exactly their true hits,
   while the event's own counter keeps counting every hit);
4. stores ``new`` as the next hit's ``old`` and, for the daemon, the last hit's values;
5. returns 1 (deliver the hit: SIGTRAP or sample) if any condition was true, else 0 —
   the kernel then suppresses both (``bpf_overflow_handler`` in kernel/events/core.c).

The daemon routes a delivered hit by the counters' deltas, as it does for the events' own
counters: every watch whose condition counter advanced matched.

The map is one ``BPF_MAP_TYPE_ARRAY`` entry of :func:`value_size` bytes, u64 words:
``[0]`` old (for the next hit), ``[1]`` new of the last hit, ``[2]`` old of the last hit,
``[3]`` hits evaluated, ``[4 + i]`` true hits of condition *i*. One map per slot, and a slot
belongs to one thread, so the program never races with itself.

If the watched bytes cannot be read (never expected: the thread has just accessed them) the
program delivers the hit without counting it, so a condition can never hide a hit it could
not evaluate.

Code generation is a plain tree walk: every node leaves its value in r0; a binary operator
spills its left value to the stack while the right one is computed (at most
:data:`hwbkptd._cond.MAX_PENDING` slots). r6-r9 hold the context, the map value, ``new``
and ``old`` across helper calls. No loops, every stack slot written before it is read, every
map pointer checked against NULL: the verifier accepts every program the language can
produce (``tests/test_bpf_kernel.py`` loads thousands of random ones).

Instruction encoding follows Documentation/bpf/standardization/instruction-set.rst. This
module is pure: it only builds bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from hwbkptd._cond import MAX_PENDING, Condition, Env, Op, evaluate

__all__ = [
    "HITS_BASE",
    "RECORD_FIELDS",
    "RECORD_SIZE",
    "WORD_DROPPED",
    "WORD_LAST_NEW",
    "WORD_LAST_OLD",
    "WORD_OLD",
    "WORD_SEEN",
    "Emulator",
    "Insn",
    "Program",
    "generate",
    "value_size",
]

# --- the map value's words ---
WORD_OLD = 0
WORD_LAST_NEW = 1
WORD_LAST_OLD = 2
WORD_SEEN = 3
WORD_DROPPED = 4  # hit records the ring had no room for
HITS_BASE = 5

# A hit record in the ring (notify): six u64 words.
RECORD_SIZE = 48
RECORD_FIELDS = ("tid", "ip", "time", "new", "old", "mask")

# --- opcodes (instruction-set.rst) ---
_LD, _LDX, _ST, _STX, _ALU64, _JMP = 0x00, 0x01, 0x02, 0x03, 0x07, 0x05
_K, _X = 0x00, 0x08
_W, _DW = 0x00, 0x18
_IMM, _MEM = 0x00, 0x60
_ALU_OPS = {
    "+": 0x00, "-": 0x10, "|": 0x40, "&": 0x50, "<<": 0x60, ">>": 0x70, "^": 0xA0,
}  # fmt: skip
_MOV, _ARSH, _RSH, _LSH = 0xB0, 0xC0, 0x70, 0x60
_JA, _JEQ, _JNE, _CALL, _EXIT = 0x00, 0x10, 0x50, 0x80, 0x90
_JUMPS_UNSIGNED = {"==": 0x10, "!=": 0x50, ">": 0x20, ">=": 0x30, "<": 0xA0, "<=": 0xB0}
_JUMPS_SIGNED = {"==": 0x10, "!=": 0x50, ">": 0x60, ">=": 0x70, "<": 0xC0, "<=": 0xD0}
_PSEUDO_MAP_FD = 1

# --- helpers (include/uapi/linux/bpf.h, enum bpf_func_id) ---
HELPER_MAP_LOOKUP_ELEM = 1
HELPER_KTIME_GET_NS = 5  # CLOCK_MONOTONIC, as the daemon's other hit times
HELPER_GET_CURRENT_PID_TGID = 14
HELPER_PROBE_READ_USER = 112
HELPER_RINGBUF_OUTPUT = 130
_CTX_IP = 16 * 8  # struct bpf_perf_event_data starts with struct pt_regs; ip is its 17th word

R0, R1, R2, R3, R4, R6, R7, R8, R9, FP = 0, 1, 2, 3, 4, 6, 7, 8, 9, 10

# Stack layout below the frame pointer (r10).
_KEY = -4  # u32 map key (0), then reused
_BUF = -8  # the watched bytes, zero-extended
_TID = -16
_ANY = -24  # 1 once a hit is to be delivered
_MASK = -32  # notify record: which notify conditions held
_REC = -80  # the record, RECORD_SIZE bytes (up to -33)
_SPILL = -88  # spill slot k at _SPILL - 8 * k


@dataclass(frozen=True, slots=True)
class Insn:
    """One 8-byte instruction (``ld_imm64`` is two; see :func:`_ld_imm64`)."""

    code: int
    dst: int = 0
    src: int = 0
    off: int = 0
    imm: int = 0

    def encode(self) -> bytes:
        return struct.pack("<BBhi", self.code, (self.src << 4) | self.dst, self.off, self.imm)


def _imm32(value: int) -> int:
    """A u32 bit pattern as the signed 32-bit ``imm`` field."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >> 31 else value


def _ld_imm64(dst: int, value: int, src: int = 0) -> list[Insn]:
    value &= (1 << 64) - 1
    return [
        Insn(_LD | _DW | _IMM, dst, src, 0, _imm32(value)),
        Insn(0, 0, 0, 0, _imm32(value >> 32)),
    ]


def _mov_k(dst: int, imm: int) -> Insn:
    return Insn(_ALU64 | _MOV | _K, dst, 0, 0, imm)


def _mov_x(dst: int, src: int) -> Insn:
    return Insn(_ALU64 | _MOV | _X, dst, src)


def _alu_k(op: int, dst: int, imm: int) -> Insn:
    return Insn(_ALU64 | op | _K, dst, 0, 0, imm)


def _alu_x(op: int, dst: int, src: int) -> Insn:
    return Insn(_ALU64 | op | _X, dst, src)


def _ldx(dst: int, src: int, off: int) -> Insn:
    return Insn(_LDX | _MEM | _DW, dst, src, off)


def _stx(dst: int, off: int, src: int) -> Insn:
    return Insn(_STX | _MEM | _DW, dst, src, off)


def _st(dst: int, off: int, imm: int, size: int = _DW) -> Insn:
    return Insn(_ST | _MEM | size, dst, 0, off, imm)


def _jmp_k(op: int, dst: int, imm: int, off: int) -> Insn:
    return Insn(_JMP | op | _K, dst, 0, off, imm)


def _jmp_x(op: int, dst: int, src: int, off: int) -> Insn:
    return Insn(_JMP | op | _X, dst, src, off)


def _call(helper: int) -> Insn:
    return Insn(_JMP | _CALL, 0, 0, 0, helper)


def _exit() -> Insn:
    return Insn(_JMP | _EXIT)


def value_size(conditions: int) -> int:
    """Bytes of the slot map's one value for a program of ``conditions`` conditions."""
    return 8 * (HITS_BASE + conditions)


@dataclass(frozen=True, slots=True)
class Program:
    """A generated program, its map still to be created and patched in (``map_fd_at``)."""

    insns: tuple[Insn, ...]
    map_fd_at: tuple[int, ...]  # indexes of ld_imm64 instructions that take the map's fd
    value_size: int
    ring_fd_at: tuple[int, ...] = ()  # ... that take the record ring's fd (notify)

    def encode(self, map_fd: int, ring_fd: int = -1) -> bytes:
        """The program's bytes with the maps' fds patched into their references."""
        out = []
        for i, insn in enumerate(self.insns):
            if i in self.map_fd_at:
                insn = Insn(insn.code, insn.dst, insn.src, insn.off, map_fd)
            elif i in self.ring_fd_at:
                insn = Insn(insn.code, insn.dst, insn.src, insn.off, ring_fd)
            out.append(insn.encode())
        return b"".join(out)


def generate(
    addr: int,
    length: int,
    conditions: Sequence[Condition],
    always: bool,
    *,
    deliver: Sequence[bool] | None = None,
    notify: Sequence[int] = (),
    notify_all: bool = False,
) -> Program:
    """The program of one slot watching ``length`` bytes at ``addr``.

    ``conditions`` are the slot's conditional watches in counter order; ``always`` says every
    hit is delivered (an unconditional stop watch shares the slot; the conditions are still
    counted). ``deliver[i]`` says whether condition *i* being true delivers the hit (its watch
    stops; default: all do). ``notify`` lists the conditions of notify watches: when one of
    them holds — or at every hit with ``notify_all`` (an unconditional notify watch) — the
    program writes a hit record (:data:`RECORD_FIELDS`; bit *k* of ``mask`` for
    ``notify[k]``) to the slot's ring. Raises ValueError for a length other than 1, 2, 4, 8,
    a condition written for another length, or more than 64 notify conditions.
    """
    if length not in (1, 2, 4, 8):
        raise ValueError(f"length {length}")
    if len(notify) > 64:
        raise ValueError("at most 64 notify conditions per slot (one mask word)")
    if deliver is None:
        deliver = [True] * len(conditions)
    records = bool(notify) or notify_all
    mask_bit = {i: k for k, i in enumerate(notify)}
    for cond in conditions:
        if cond.length != length:
            raise ValueError(f"condition {cond.text!r} was parsed for {cond.length} bytes")
    code: list[Insn] = []
    map_fd_at: list[int] = []
    unevaluated: list[int] = []  # jumps to the "deliver unevaluated" exit, patched at the end
    code += [_mov_x(R6, R1), _st(FP, _KEY, 0, size=_W)]
    map_fd_at.append(len(code))
    code += _ld_imm64(R1, 0, src=_PSEUDO_MAP_FD)
    code += [_mov_x(R2, FP), _alu_k(_ALU_OPS["+"], R2, _KEY), _call(HELPER_MAP_LOOKUP_ELEM)]
    unevaluated.append(len(code))
    code += [_jmp_k(_JEQ, R0, 0, 0), _mov_x(R7, R0)]
    # new: the watched bytes, zero-extended into a zeroed u64 (x86 is little-endian).
    code += [_st(FP, _BUF, 0), _mov_x(R1, FP), _alu_k(_ALU_OPS["+"], R1, _BUF), _mov_k(R2, length)]
    code += _ld_imm64(R3, addr)
    code += [_call(HELPER_PROBE_READ_USER)]
    unevaluated.append(len(code))
    code += [_jmp_k(_JNE, R0, 0, 0), _ldx(R8, FP, _BUF), _ldx(R9, R7, 8 * WORD_OLD)]
    if records or any(cond.uses("tid") for cond in conditions):
        # The low half of pid_tgid is the thread's id (bpf-helpers(7)).
        code += [
            _call(HELPER_GET_CURRENT_PID_TGID),
            _alu_k(_LSH, R0, 32),
            _alu_k(_RSH, R0, 32),
            _stx(FP, _TID, R0),
        ]
    code += [_st(FP, _ANY, 1 if always else 0), _st(FP, _MASK, 0)]
    for i, cond in enumerate(conditions):
        _expr(code, cond.op, 0, HITS_BASE + i)
        word = 8 * (HITS_BASE + i)
        then = [_ldx(R1, R7, word), _alu_k(_ALU_OPS["+"], R1, 1), _stx(R7, word, R1)]
        if deliver[i]:
            then.append(_st(FP, _ANY, 1))
        if i in mask_bit:
            then += [_ldx(R1, FP, _MASK), *_ld_imm64(R2, 1 << mask_bit[i])]
            then += [_alu_x(_ALU_OPS["|"], R1, R2), _stx(FP, _MASK, R1)]
        code += [_jmp_k(_JEQ, R0, 0, len(then)), *then]
    ring_fd_at: list[int] = []
    if records:
        ring_fd_at.append(_record(code, notify_all))
    code += [
        _stx(R7, 8 * WORD_LAST_OLD, R9),
        _stx(R7, 8 * WORD_LAST_NEW, R8),
        _stx(R7, 8 * WORD_OLD, R8),
        _ldx(R1, R7, 8 * WORD_SEEN),
        _alu_k(_ALU_OPS["+"], R1, 1),
        _stx(R7, 8 * WORD_SEEN, R1),
        _ldx(R0, FP, _ANY),
        _exit(),
    ]
    target = len(code)
    code += [_mov_k(R0, 1), _exit()]
    for at in unevaluated:
        old = code[at]
        code[at] = Insn(old.code, old.dst, old.src, target - at - 1, old.imm)
    return Program(tuple(code), tuple(map_fd_at), value_size(len(conditions)), tuple(ring_fd_at))


def _record(code: list[Insn], every: bool) -> int:
    """Append: write a hit record to the ring if the mask is set (or ``every``); count a
    record the ring had no room for. Returns the index of the ring's ld_imm64."""
    body: list[Insn] = [
        _ldx(R1, FP, _TID),
        _stx(FP, _REC, R1),
        _ldx(R1, R6, _CTX_IP),
        _stx(FP, _REC + 8, R1),
        _call(HELPER_KTIME_GET_NS),
        _stx(FP, _REC + 16, R0),
        _stx(FP, _REC + 24, R8),
        _stx(FP, _REC + 32, R9),
        _ldx(R1, FP, _MASK),
        _stx(FP, _REC + 40, R1),
    ]
    ring_at = len(body)
    body += _ld_imm64(R1, 0, src=_PSEUDO_MAP_FD)
    body += [
        _mov_x(R2, FP),
        _alu_k(_ALU_OPS["+"], R2, _REC),
        _mov_k(R3, RECORD_SIZE),
        _mov_k(R4, 0),  # flags 0: the kernel wakes the reader when it has caught up
        _call(HELPER_RINGBUF_OUTPUT),
        _jmp_k(_JEQ, R0, 0, 3),
        _ldx(R1, R7, 8 * WORD_DROPPED),
        _alu_k(_ALU_OPS["+"], R1, 1),
        _stx(R7, 8 * WORD_DROPPED, R1),
    ]
    if not every:
        code += [_ldx(R1, FP, _MASK), _jmp_k(_JEQ, R1, 0, len(body))]
    start = len(code)
    code += body
    return start + ring_at


def _expr(code: list[Insn], op: Op, depth: int, hits_word: int) -> None:
    """Append code that leaves the 64-bit value of ``op`` in r0 (may clobber r1-r5)."""
    kind = op.kind
    if kind == "const":
        if -(1 << 31) <= op.value < (1 << 31):
            code.append(_mov_k(R0, op.value))
        else:
            code += _ld_imm64(R0, op.value)
        return
    if kind == "load":
        if op.name == "new":
            code.append(_mov_x(R0, R8))
        elif op.name == "old":
            code.append(_mov_x(R0, R9))
        elif op.name == "tid":
            code.append(_ldx(R0, FP, _TID))
        elif op.name == "hits":
            code.append(_ldx(R0, R7, 8 * hits_word))
        elif op.name == "changed":
            code += [_mov_k(R0, 1), _jmp_x(_JNE, R8, R9, 1), _mov_k(R0, 0)]
        else:
            raise AssertionError(op.name)
        return
    if kind == "sext":
        _expr(code, op.args[0], depth, hits_word)
        shift = 64 - op.value
        if shift:
            code += [_alu_k(_LSH, R0, shift), _alu_k(_ARSH, R0, shift)]
        return
    if kind == "not":
        _expr(code, op.args[0], depth, hits_word)
        code += [_mov_x(R1, R0), _mov_k(R0, 1), _jmp_k(_JEQ, R1, 0, 1), _mov_k(R0, 0)]
        return
    if depth >= MAX_PENDING:
        raise ValueError("expression too deep")  # parse() refuses these
    spill = _SPILL - 8 * depth
    _expr(code, op.args[0], depth, hits_word)
    code.append(_stx(FP, spill, R0))
    _expr(code, op.args[1], depth + 1, hits_word)
    # r1 = left, r2 = right
    code += [_mov_x(R2, R0), _ldx(R1, FP, spill)]
    if kind in ("and", "or"):
        # Both sides are plain values: test each against zero.
        if kind == "and":
            code += [
                _mov_k(R0, 0),
                _jmp_k(_JEQ, R1, 0, 2),
                _jmp_k(_JEQ, R2, 0, 1),
                _mov_k(R0, 1),
            ]
        else:
            code += [
                _mov_k(R0, 1),
                _jmp_k(_JNE, R1, 0, 2),
                _jmp_k(_JNE, R2, 0, 1),
                _mov_k(R0, 0),
            ]
        return
    jumps = _JUMPS_SIGNED if op.signed else _JUMPS_UNSIGNED
    if kind in jumps:
        code += [_mov_k(R0, 1), _jmp_x(jumps[kind], R1, R2, 1), _mov_k(R0, 0)]
        return
    alu = _ALU_OPS[kind]
    if kind == ">>" and op.signed:
        alu = _ARSH
    if kind in ("<<", ">>"):
        # Shift counts modulo 64, as the language says (and the interpreter does).
        code.append(_alu_k(_ALU_OPS["&"], R2, 63))
    code += [_alu_x(alu, R1, R2), _mov_x(R0, R1)]


class Emulator:
    """The program of :func:`generate`, run in Python: the ptrace fallback's filter.

    Where BPF cannot be used the daemon stops the thread at every hit of a filtered slot
    and runs this instead, with the same map layout (so the engine reads both alike) and
    the same evaluator semantics (:func:`hwbkptd._cond.evaluate`).
    """

    def __init__(self, conditions: Sequence[Condition], init: dict[int, int]) -> None:
        self.conditions = tuple(conditions)
        self.words = [0] * (value_size(len(self.conditions)) // 8)
        for index, value in init.items():
            self.words[index] = value

    def run(self, new: int, tid: int) -> bool:
        """One hit that left ``new`` in the watched bytes; whether any condition held."""
        words = self.words
        old = words[WORD_OLD]
        matched = False
        for i, cond in enumerate(self.conditions):
            if evaluate(cond.op, Env(new=new, old=old, tid=tid, hits=words[HITS_BASE + i])):
                words[HITS_BASE + i] += 1
                matched = True
        words[WORD_LAST_OLD], words[WORD_LAST_NEW], words[WORD_OLD] = old, new, new
        words[WORD_SEEN] += 1
        return matched
