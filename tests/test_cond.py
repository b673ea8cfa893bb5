"""The condition language without the kernel: parsing, errors, meaning (hwbkptd/_cond.py)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hwbkpt_proto import InvalidArgumentError
from hwbkptd._bpf import generate
from hwbkptd._cond import MAX_DEPTH, MAX_TEXT, ConditionError, Env, evaluate, parse
from tests.strategies import conditions


def ev(text: str, new: int = 0, old: int = 0, tid: int = 7, hits: int = 0, length: int = 8) -> int:
    return evaluate(parse(text, length).op, Env(new=new, old=old, tid=tid, hits=hits))


@pytest.mark.parametrize(
    ("text", "env", "value"),
    [
        ("new == 1234", {"new": 1234}, 1),
        ("new == 1234", {"new": 1235}, 0),
        ("new >= 19990", {"new": 19990}, 1),
        ("changed", {"new": 1, "old": 1}, 0),
        ("changed", {"new": 2, "old": 1}, 1),
        ("not changed", {"new": 1, "old": 1}, 1),
        ("tid == 7 and hits < 3", {"hits": 2}, 1),
        ("tid == 7 and hits < 3", {"hits": 3}, 0),
        ("new - old", {"new": 1, "old": 2}, (1 << 64) - 1),
        ("new + 1", {"new": (1 << 64) - 1}, 0),
        ("0x10 | 1", {}, 0x11),
        ("6 ^ 3", {}, 5),
        ("1 << 65", {}, 2),  # shift counts modulo 64
        ("new >> 1", {"new": 1 << 63}, 1 << 62),  # unsigned: logical shift
        ("signed(new) >> 1 == -1", {"new": (1 << 64) - 1}, 1),  # signed: arithmetic
        # precedence as in Python: | ^ & bind tighter than comparisons; + tighter than <<
        ("new & 1 == 1", {"new": 3}, 1),
        ("1 | 2 ^ 3 & 1", {}, 1 | (2 ^ (3 & 1))),
        ("1 << 1 + 1", {}, 4),
        ("not new == 1 or old == 2", {"new": 1, "old": 2}, 1),
        ("not (new == 1 or old == 2)", {"new": 1, "old": 2}, 0),
        ("new == 1 or new == 2 and old == 3", {"new": 1}, 1),
        ("1_000 == 1000", {}, 1),
    ],
)
def test_meaning(text: str, env: dict[str, int], value: int) -> None:
    assert ev(text, **env) == value


@pytest.mark.parametrize(
    ("text", "length", "new", "value"),
    [
        ("new == -1", 4, 0xFFFFFFFF, 1),  # two's complement in the watch's length
        ("new == -1", 1, 0xFF, 1),
        ("new == -1", 8, (1 << 64) - 1, 1),
        ("new > -2", 2, 0xFFFF, 1),  # unsigned comparison with 0xfffe
        ("signed(new) < 0", 4, 0x80000000, 1),
        ("signed(new) < -1", 4, 0xFFFFFFFE, 1),  # -2 < -1, in 64 bits
        ("signed(new) < -1", 4, 0xFFFFFFFF, 0),
        ("signed(new) == -128", 1, 0x80, 1),
        ("signed(new) + 1 == 0", 2, 0xFFFF, 1),
        ("signed(new) > 5", 4, 0x7FFFFFFF, 1),
        ("signed(new)", 8, 0, 0),
    ],
)
def test_signed_and_negative(text: str, length: int, new: int, value: int) -> None:
    assert ev(text, new=new, length=length) == value


@pytest.mark.parametrize(
    ("text", "column", "expected", "found"),
    [
        ("", 1, "an operand", "the end of the condition"),
        ("new ==", 7, "an operand", "the end of the condition"),
        ("new === 3", 7, "a number, a name", "'='"),
        ("value == 3", 1, "one of new, old, changed, tid, hits", "'value'"),
        ("new == 3 and", 13, "an operand", "the end"),
        ("new == 3 3", 10, "an operator or the end", "'3'"),
        ("1 < new < 3", 9, "'and' between two comparisons", "'<'"),
        ("-new", 2, "a number after '-'", "'new'"),
        ("signed new", 8, "'(' after signed", "'new'"),
        ("signed(new", 11, "')' closing signed(", "the end"),
        ("(new == 1", 10, "')'", "the end"),
        ("new $ 1", 5, "a number, a name", "'$'"),
        ("new == 0x10000000000000000", 8, "a number below 2**64", "0x1"),
        ("new == -129", 8, "a negative literal of at least -128", "-129"),
        ("new and or old", 9, "an operand", "'or'"),
    ],
)
def test_errors_say_where_and_what(text: str, column: int, expected: str, found: str) -> None:
    with pytest.raises(ConditionError) as info:
        parse(text, 1 if "-129" in text else 8)
    err = info.value
    assert isinstance(err, InvalidArgumentError)  # wire code EINVAL
    assert err.code == "EINVAL"
    assert err.column == column
    assert err.expected.startswith(expected)
    assert err.found.startswith(found)
    assert f"column {column}" in err.message


def test_limits() -> None:
    with pytest.raises(InvalidArgumentError, match="at most 1000"):
        parse("new" + " " * MAX_TEXT, 8)
    with pytest.raises(ConditionError, match="levels of nesting"):
        parse("(" * (MAX_DEPTH + 1) + "new" + ")" * (MAX_DEPTH + 1), 8)
    parse("(" * MAX_DEPTH + "new" + ")" * MAX_DEPTH, 8)
    with pytest.raises(ConditionError, match="operands waiting"):
        parse("new or new and new == new | new ^ new & new << new + (" * 6 + "1" + ")" * 6, 8)
    with pytest.raises(InvalidArgumentError, match="must be a string"):
        parse(3, 8)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="1, 2, 4 or 8"):
        parse("new", 3)


def test_uses() -> None:
    assert parse("changed", 8).uses("new")
    assert parse("tid == 3", 8).uses("tid")
    assert not parse("new == 3", 8).uses("tid")


@given(data=st.data())
def test_every_generated_text_parses_and_compiles(data: st.DataObject) -> None:
    """The strategy the kernel tests use makes only valid conditions, and every one of them
    is compiled (the kernel tests load and run them)."""
    length = data.draw(st.sampled_from([1, 2, 4, 8]))
    text = data.draw(conditions(length))
    cond = parse(text, length)
    value = evaluate(cond.op, Env(new=1, old=2, tid=3, hits=4))
    assert 0 <= value < 1 << 64
    program = generate(0x1000, length, [cond], False)
    assert len(program.encode(3)) == 8 * len(program.insns)


@given(text=st.text(max_size=40))
def test_arbitrary_text_parses_or_says_why(text: str) -> None:
    column = 0
    try:
        parse(text, 4)
    except ConditionError as err:
        column = err.column
    else:
        return
    assert 1 <= column <= len(text) + 1
