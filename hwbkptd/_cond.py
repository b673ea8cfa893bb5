"""Watch conditions: the expression language, its parser, its typing and a Python evaluator.

Theory of operation
-------------------
A condition is a small integer expression over the values of one hit (issue 12)::

    new == 1234            new >= 19990 and tid == 812         changed
    signed(new) < -1       (new ^ old) & 0x80 != 0             hits < 10 or not changed

Names: ``new`` (the watched ``length`` bytes after the access, unsigned), ``old`` (their value
before this access: the previous hit's ``new``, or the value when the slot was armed),
``changed`` (``new != old``), ``tid`` (the thread that hit), ``hits`` (this watch's hits
whose condition was true so far). Operators, loosest first, as in Python: ``or``, ``and``,
``not``, comparisons (``== != < <= > >=``, not chained), ``|``, ``^``, ``&``, ``<< >>``,
``+ -``; ``signed(x)``, parentheses, and integer literals (decimal or ``0x`` hex; ``-N``
is a literal).

The pipeline is parse → :class:`Node` tree → :func:`lower` → :class:`Op` tree. Lowering
settles every question of meaning once, so that the Python evaluator here and the BPF code
generator (:mod:`hwbkptd._bpf`) only execute 64-bit machine operations and cannot disagree
on what an expression means:

* Every value is 64 bits. Arithmetic wraps modulo 2**64.
* A value is *signed* if it comes from ``signed(x)`` (the low ``length`` bytes of ``x``
  sign-extended) or from arithmetic on a signed operand; ``new``, ``old``, ``tid``,
  ``hits`` and every comparison or logical result are unsigned; a literal takes the type of
  what it meets. A comparison is signed if either side is; ``>>`` shifts arithmetically on
  a signed value; shift counts are taken modulo 64 (as the BPF interpreter does).
* A negative literal ``-N`` is the two's complement of N in ``length`` bytes where it meets
  unsigned values (``new == -1`` on a 4-byte watch is ``new == 0xffffffff``), and in 64
  bits where it meets signed ones (``signed(new) < -1``).
* A condition is true when its value is not zero.

Errors are :class:`ConditionError` (wire code ``EINVAL``): the 1-based column, what the
parser expected there, and what it found.

This module is pure: no system call, no kernel.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import NamedTuple

from hwbkpt_proto import InvalidArgumentError

__all__ = [
    "MAX_DEPTH",
    "MAX_HEIGHT",
    "MAX_PENDING",
    "MAX_TEXT",
    "NAMES",
    "Condition",
    "ConditionError",
    "Env",
    "Op",
    "evaluate",
    "parse",
    "pending",
]

MAX_TEXT = 1000  # characters of one condition
MAX_DEPTH = 32  # nesting of parentheses, not and signed()
# Operands waiting for their right-hand side. Each costs the BPF program 8 bytes of its
# 512-byte stack (hwbkptd/_bpf.py spills the left operand of a binary operator there).
MAX_PENDING = 40
MAX_HEIGHT = 200  # of the tree (recursion of the evaluator and the code generator)
NAMES = ("new", "old", "changed", "tid", "hits")
_U64 = (1 << 64) - 1


class ConditionError(InvalidArgumentError):
    """A condition that does not parse or names something unknown (wire code ``EINVAL``)."""

    def __init__(self, text: str, column: int, expected: str, found: str) -> None:
        super().__init__(f"condition {text!r}, column {column}: expected {expected}, found {found}")
        self.column = column
        self.expected = expected
        self.found = found


# --- tokens ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<num>0[xX][0-9a-fA-F_]+|[0-9][0-9_]*)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op><<|>>|==|!=|<=|>=|[<>&|^+\-()]))"
)


class _Tok(NamedTuple):
    kind: str  # "num", "name", "op", "end"
    text: str
    pos: int  # 0-based offset


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while True:
        m = _TOKEN.match(text, pos)
        if m is None or m.lastgroup is None:
            rest = text[pos:].lstrip()
            start = len(text) - len(rest)
            if not rest:
                out.append(_Tok("end", "", start))
                return out
            raise ConditionError(
                text, start + 1, "a number, a name, an operator or a parenthesis", repr(rest[0])
            )
        kind = m.lastgroup
        out.append(_Tok(kind, m.group(kind), m.start(kind)))
        pos = m.end()


# --- syntax tree -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Node:
    """A parsed expression: ``kind`` is "num", "name", "signed", "not" or a binary operator."""

    kind: str
    value: int = 0  # "num": the literal (negative for -N)
    name: str = ""  # "name"
    args: tuple[Node, ...] = ()
    pos: int = 0  # "num": 0-based offset of the literal (of its '-')


_BINARY_LEVELS: tuple[tuple[str, ...], ...] = (
    ("|",),
    ("^",),
    ("&",),
    ("<<", ">>"),
    ("+", "-"),
)
_COMPARE = ("==", "!=", "<", "<=", ">", ">=")
_OPERAND = "an operand (a number, new, old, changed, tid, hits, signed(...), not, or '(')"


class _Parser:
    """Recursive descent, one method per precedence level (Python's order)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, expected: str) -> ConditionError:
        tok = self.peek()
        found = "the end of the condition" if tok.kind == "end" else repr(tok.text)
        return ConditionError(self.text, tok.pos + 1, expected, found)

    def is_op(self, *ops: str) -> bool:
        tok = self.peek()
        return (tok.kind == "op" or tok.kind == "name") and tok.text in ops

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"a shallower expression (at most {MAX_DEPTH} levels of nesting)")

    def parse(self) -> Node:
        node = self.disjunction()
        if self.peek().kind != "end":
            raise self.fail("an operator or the end of the condition")
        return node

    def disjunction(self) -> Node:
        return self._chain(("or",), self.conjunction)

    def conjunction(self) -> Node:
        return self._chain(("and",), self.negation)

    def _chain(self, ops: tuple[str, ...], below: object) -> Node:
        assert callable(below)
        node: Node = below()
        while self.is_op(*ops):
            op = self.take().text
            node = Node(op, args=(node, below()))
        return node

    def negation(self) -> Node:
        if self.is_op("not"):
            self.take()
            self.nest()
            node = Node("not", args=(self.negation(),))
            self.depth -= 1
            return node
        return self.comparison()

    def comparison(self) -> Node:
        node = self.binary(0)
        if self.is_op(*_COMPARE):
            op = self.take().text
            node = Node(op, args=(node, self.binary(0)))
            if self.is_op(*_COMPARE):
                raise self.fail("'and' between two comparisons (comparisons do not chain)")
        return node

    def binary(self, level: int) -> Node:
        if level == len(_BINARY_LEVELS):
            return self.unary()
        ops = _BINARY_LEVELS[level]
        node = self.binary(level + 1)
        while self.is_op(*ops):
            op = self.take().text
            node = Node(op, args=(node, self.binary(level + 1)))
        return node

    def unary(self) -> Node:
        tok = self.peek()
        if tok.kind == "op" and tok.text == "-":
            self.take()
            if self.peek().kind != "num":
                raise self.fail("a number after '-' (only literals can be negative)")
            return Node("num", value=-self.number(self.take()), pos=tok.pos)
        if tok.kind == "num":
            return Node("num", value=self.number(self.take()), pos=tok.pos)
        if tok.kind == "op" and tok.text == "(":
            self.take()
            self.nest()
            node = self.disjunction()
            self.depth -= 1
            if not self.is_op(")"):
                raise self.fail("')'")
            self.take()
            return node
        if tok.kind == "name":
            if tok.text in NAMES:
                self.take()
                return Node("name", name=tok.text)
            if tok.text == "signed":
                self.take()
                if not self.is_op("("):
                    raise self.fail("'(' after signed")
                self.take()
                self.nest()
                node = Node("signed", args=(self.disjunction(),))
                self.depth -= 1
                if not self.is_op(")"):
                    raise self.fail("')' closing signed(")
                self.take()
                return node
            if tok.text in ("and", "or"):
                raise self.fail(_OPERAND)
            raise self.fail(f"one of {', '.join(NAMES)} or signed(...)")
        raise self.fail(_OPERAND)

    def number(self, tok: _Tok) -> int:
        digits = tok.text.replace("_", "")
        value = int(digits, 16 if digits[:2].lower() == "0x" else 10)
        if value > _U64:
            raise ConditionError(self.text, tok.pos + 1, "a number below 2**64", tok.text)
        return value


# --- lowering: the meaning, settled once -----------------------------------------------------


class Op(NamedTuple):
    """A lowered expression: only 64-bit machine operations remain.

    ``kind`` is one of: ``const`` (``value``), ``load`` (``name`` in :data:`NAMES`), ``sext``
    (sign-extend from ``value`` bits), ``not``, ``and``, ``or`` (both sides tested against
    zero), a comparison (``signed`` says how), or ``+ - & | ^ << >>`` (``>>`` arithmetic when
    ``signed``). Results of ``not``/``and``/``or``/comparisons are 0 or 1.
    """

    kind: str
    args: tuple[Op, ...] = ()
    value: int = 0
    name: str = ""
    signed: bool = False


class _Ty(enum.Enum):
    UNSIGNED = 0
    SIGNED = 1
    FLEX = 2  # a literal (or literal arithmetic): takes the type of what it meets


def _type(node: Node) -> _Ty:
    if node.kind == "num":
        return _Ty.FLEX
    if node.kind == "signed":
        return _Ty.SIGNED
    if node.kind in ("name", "not", "and", "or", *_COMPARE):
        return _Ty.UNSIGNED
    left, right = (_type(a) for a in node.args)
    if _Ty.SIGNED in (left, right):
        return _Ty.SIGNED
    if _Ty.UNSIGNED in (left, right):
        return _Ty.UNSIGNED
    return _Ty.FLEX


def _lower(node: Node, length: int, ctx: _Ty) -> Op:
    """``ctx`` is the type a FLEX node takes here (never FLEX itself)."""
    kind = node.kind
    if kind == "num":
        value = node.value
        if value < 0:
            value &= _U64 if ctx is _Ty.SIGNED else (1 << (8 * length)) - 1
        return Op("const", value=value)
    if kind == "name":
        return Op("load", name=node.name)
    if kind == "signed":
        (arg,) = node.args
        inner = _type(arg)
        return Op("sext", (_lower(arg, length, _own(inner)),), value=8 * length, signed=True)
    if kind == "not":
        (arg,) = node.args
        return Op("not", (_lower(arg, length, _own(_type(arg))),))
    left, right = node.args
    if kind in ("and", "or"):
        return Op(
            kind,
            (_lower(left, length, _own(_type(left))), _lower(right, length, _own(_type(right)))),
        )
    if kind in _COMPARE:
        types = (_type(left), _type(right))
        here = _Ty.SIGNED if _Ty.SIGNED in types else _Ty.UNSIGNED
    else:
        here = _type(node)
        if here is _Ty.FLEX:
            here = ctx
    return Op(
        kind,
        (_lower(left, length, here), _lower(right, length, here)),
        signed=here is _Ty.SIGNED,
    )


def _own(ty: _Ty) -> _Ty:
    return _Ty.UNSIGNED if ty is _Ty.FLEX else ty


# --- the public face -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Condition:
    """A parsed, lowered condition for a watch of ``length`` bytes."""

    text: str
    length: int
    op: Op

    def uses(self, name: str) -> bool:
        """Whether the expression reads ``name`` (``changed`` counts as ``new`` and ``old``)."""
        return _uses(self.op, name)


def _uses(op: Op, name: str) -> bool:
    if op.kind == "load" and (op.name == name or (op.name == "changed" and name in ("new", "old"))):
        return True
    return any(_uses(a, name) for a in op.args)


def parse(text: str, length: int) -> Condition:
    """Parse ``text`` as the condition of a watch of ``length`` bytes (1, 2, 4 or 8).

    Raises ConditionError (an InvalidArgumentError) with the column, what was expected and
    what was found; InvalidArgumentError for a text that is not a string or too long.
    """
    if not isinstance(text, str):
        raise InvalidArgumentError("condition must be a string, e.g. 'new == 1234'")
    if len(text) > MAX_TEXT:
        raise InvalidArgumentError(f"condition is {len(text)} characters long; at most {MAX_TEXT}")
    if length not in (1, 2, 4, 8):
        raise InvalidArgumentError(f"a condition needs a watch of 1, 2, 4 or 8 bytes, not {length}")
    if not text.strip():
        raise ConditionError(text, 1, _OPERAND, "the end of the condition")
    node = _Parser(text).parse()
    if _height(node) > MAX_HEIGHT:
        raise ConditionError(
            text,
            1,
            f"a smaller expression (at most {MAX_HEIGHT} operators deep)",
            f"{_height(node)}",
        )
    _check_literals(text, node, length)
    op = _lower(node, length, _own(_type(node)))
    waiting = _shape(op)[1]
    if waiting > MAX_PENDING:
        raise ConditionError(
            text,
            1,
            f"a simpler expression (at most {MAX_PENDING} operands waiting for "
            "their right-hand side; use fewer parentheses)",
            f"{waiting}",
        )
    return Condition(text, length, op)


def _height(node: Node) -> int:
    return 1 + max((_height(a) for a in node.args), default=0)


def pending(op: Op) -> int:
    """Stack slots the left-operand spills of ``op`` need (see hwbkptd/_bpf.py)."""
    return _shape(op)[1]


def _shape(op: Op) -> tuple[int, int]:
    """(height, spill slots): the right operand is evaluated while the left one waits."""
    if len(op.args) < 2:
        if not op.args:
            return 1, 0
        h, p = _shape(op.args[0])
        return h + 1, p
    (lh, lp), (rh, rp) = _shape(op.args[0]), _shape(op.args[1])
    return max(lh, rh) + 1, max(lp, rp + 1)


def _check_literals(text: str, node: Node, length: int) -> None:
    if node.kind == "num" and node.value < 0:
        low = -(1 << (8 * length - 1)) if length < 8 else -(1 << 63)
        if node.value < low:
            raise ConditionError(
                text,
                node.pos + 1,
                f"a negative literal of at least {low} (a {length}-byte watch)",
                str(node.value),
            )
    for arg in node.args:
        _check_literals(text, arg, length)


class Env(NamedTuple):
    """The values of one hit, as a condition sees them (all unsigned 64-bit)."""

    new: int
    old: int
    tid: int
    hits: int


def evaluate(op: Op, env: Env) -> int:
    """The 64-bit value of a lowered expression for one hit (true when not zero)."""
    kind = op.kind
    if kind == "const":
        return op.value
    if kind == "load":
        if op.name == "changed":
            return int(env.new != env.old)
        value: int = getattr(env, op.name)
        return value & _U64
    if kind == "sext":
        bits = op.value
        v = evaluate(op.args[0], env) & ((1 << bits) - 1)
        if v >> (bits - 1):
            v -= 1 << bits
        return v & _U64
    if kind == "not":
        return int(evaluate(op.args[0], env) == 0)
    a = evaluate(op.args[0], env)
    b = evaluate(op.args[1], env)
    if kind == "and":
        return int(a != 0 and b != 0)
    if kind == "or":
        return int(a != 0 or b != 0)
    if op.signed:
        sa, sb = _as_signed(a), _as_signed(b)
    else:
        sa, sb = a, b
    if kind == "==":
        return int(a == b)
    if kind == "!=":
        return int(a != b)
    if kind == "<":
        return int(sa < sb)
    if kind == "<=":
        return int(sa <= sb)
    if kind == ">":
        return int(sa > sb)
    if kind == ">=":
        return int(sa >= sb)
    if kind == "+":
        return (a + b) & _U64
    if kind == "-":
        return (a - b) & _U64
    if kind == "&":
        return a & b
    if kind == "|":
        return a | b
    if kind == "^":
        return a ^ b
    if kind == "<<":
        return (a << (b & 63)) & _U64
    if kind == ">>":
        return (sa >> (b & 63)) & _U64
    raise AssertionError(f"unknown operation {kind}")


def _as_signed(v: int) -> int:
    return v - (1 << 64) if v >> 63 else v
