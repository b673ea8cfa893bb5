"""Condition programs in the real kernel: loaded by the real verifier, run by real hits.

``BPF_PROG_TEST_RUN`` does not run ``BPF_PROG_TYPE_PERF_EVENT`` programs (the kernel has no
``test_run`` for that type), so the programs are run the way the daemon runs them: attached
to a perf breakpoint event on a real program (``tests/progs/condwriter.c``) that stores a
list of values to the watched variable. Each condition's counter in the program's map must
then equal the number of stores for which the Python evaluator (:mod:`hwbkptd._cond`) says
the condition is true, with ``new``, ``old``, ``tid`` and ``hits`` as the program saw them.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hwbkptd import _kernel as k
from hwbkptd._bpf import (
    HITS_BASE,
    WORD_DROPPED,
    WORD_LAST_NEW,
    WORD_LAST_OLD,
    WORD_OLD,
    WORD_SEEN,
    generate,
)
from hwbkptd._cond import Condition, Env, evaluate, parse
from hwbkptd._model import Access, Mode
from tests._progs import Target
from tests.strategies import conditions

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bpf and perf"),
    pytest.mark.skipif(
        os.geteuid() == 0 and k.bpf_available() is not None,
        reason=f"BPF unavailable: {k.bpf_available() if os.geteuid() == 0 else ''}",
    ),
]

TOKEN = 0x68776270_0000BEEF


def expected(conds: list[Condition], values: list[int], length: int, tid: int) -> list[int]:
    """The true hits of each condition when ``values`` are stored in turn over 0."""
    mask = (1 << (8 * length)) - 1
    old = 0
    hits = [0] * len(conds)
    for value in values:
        new = value & mask
        for i, cond in enumerate(conds):
            if evaluate(cond.op, Env(new=new, old=old, tid=tid, hits=hits[i])):
                hits[i] += 1
        old = new
    return hits


def run(
    conds: list[Condition], values: list[int], length: int, **kw: Any
) -> tuple[tuple[int, ...], int, list[tuple[int, ...]]]:
    """Store ``values`` in a real program under a filtered count event.

    Returns the map's words, the program's pid (its only thread's tid) and the hit records
    the program wrote (``kw`` goes to :func:`generate`).
    """
    proc = Target("condwriter", (str(length), *(f"{v:x}" for v in values)))
    event = None
    try:
        proc.read_info()
        addr = proc.info["addr"]
        assert isinstance(addr, int)
        bpf = k.BpfFilter(generate(addr, length, conds, False, **kw), {WORD_OLD: 0})
        event = k.BreakpointEvent(proc.pid, addr, length, Access.WRITE, Mode.COUNT, TOKEN, bpf=bpf)
        proc.go()
        assert proc.line() == "done"
        assert proc.wait() == 0
        assert event.read_count() == len(values)  # the event still counts every hit
        records = bpf.hit_records()
        return bpf.words(), proc.pid, records
    finally:
        if event is not None:
            event.close()
        proc.kill()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_programs_agree_with_the_evaluator_on_real_hits(data: st.DataObject) -> None:
    length = data.draw(st.sampled_from([1, 2, 4, 8]), label="length")
    texts = data.draw(st.lists(conditions(length), min_size=1, max_size=6), label="conditions")
    conds = [parse(t, length) for t in texts]
    top = (1 << (8 * length)) - 1
    pool = st.one_of(
        st.integers(0, 20),
        st.sampled_from([top, top >> 1, (top >> 1) + 1, 0x1234 & top]),
        st.integers(0, top),
    )
    values = data.draw(st.lists(pool, min_size=1, max_size=40), label="values")
    words, tid, _ = run(conds, values, length)
    assert words[WORD_SEEN] == len(values)
    assert words[WORD_LAST_NEW] == values[-1] & top
    assert words[WORD_OLD] == values[-1] & top
    assert words[WORD_LAST_OLD] == (values[-2] & top if len(values) > 1 else 0)
    assert list(words[HITS_BASE:]) == expected(conds, values, length, tid)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_hit_records_agree_with_the_evaluator(data: st.DataObject) -> None:
    """Notify records: one per hit where a notify condition held (or every hit with
    ``notify_all``), with the thread, the values, which notify conditions held, an
    instruction pointer and increasing times."""
    length = data.draw(st.sampled_from([1, 2, 4, 8]), label="length")
    texts = data.draw(st.lists(conditions(length), min_size=1, max_size=5), label="conditions")
    conds = [parse(t, length) for t in texts]
    notify = data.draw(st.lists(st.sampled_from(range(len(conds))), unique=True), label="notify")
    notify_all = data.draw(st.booleans(), label="notify_all")
    values = data.draw(st.lists(st.integers(0, 40), min_size=1, max_size=30), label="values")
    words, tid, records = run(conds, values, length, notify=notify, notify_all=notify_all)
    old, hits, want = 0, [0] * len(conds), []
    for new in values:
        mask = 0
        for i, cond in enumerate(conds):
            if evaluate(cond.op, Env(new=new, old=old, tid=tid, hits=hits[i])):
                hits[i] += 1
                if i in notify:
                    mask |= 1 << notify.index(i)
        if mask or notify_all:
            want.append((tid, new, old, mask))
        old = new
    assert [(r[0], r[3], r[4], r[5]) for r in records] == want
    assert all(r[1] != 0 for r in records)  # ip
    assert [r[2] for r in records] == sorted(r[2] for r in records)  # time
    assert words[WORD_DROPPED] == 0


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_verifier_accepts_every_program(data: st.DataObject) -> None:
    """Many conditions per program, of every shape the strategy makes (load only)."""
    length = data.draw(st.sampled_from([1, 2, 4, 8]))
    texts = data.draw(st.lists(conditions(length, leaves=24), min_size=1, max_size=8))
    always = data.draw(st.booleans())
    conds = [parse(t, length) for t in texts]
    notify = data.draw(st.lists(st.sampled_from(range(len(conds))), unique=True))
    deliver = data.draw(st.lists(st.booleans(), min_size=len(conds), max_size=len(conds)))
    notify_all = data.draw(st.booleans())
    program = generate(
        0x7F0000001000, length, conds, always, deliver=deliver, notify=notify,
        notify_all=notify_all,
    )  # fmt: skip
    k.BpfFilter(program, {}).close()


def test_deepest_condition_loads() -> None:
    """The most stack a condition may take (MAX_PENDING spills) passes the verifier."""
    from hwbkptd._cond import MAX_PENDING, pending

    # Each level leaves 8 operands waiting (one per precedence level), in one parenthesis.
    level = "new or new and new == new | new ^ new & new << new + ("
    text = level * (MAX_PENDING // 8) + "new" + ")" * (MAX_PENDING // 8)
    cond = parse(text, 8)
    assert pending(cond.op) == MAX_PENDING
    k.BpfFilter(generate(0x1000, 8, [cond], False), {}).close()


def test_a_hit_whose_condition_is_false_is_counted_but_not_delivered(target) -> None:
    """Stop-mode event with a filter: the perf counter counts all, SIGTRAPs only true ones.

    The program is not traced, so a delivered SIGTRAP would kill it: it must exit 0 when the
    condition is never true, and die of SIGTRAP when it is.
    """
    for cond, code in (("new == 0x7fffffff", 0), ("new == 3", -5)):
        proc = target("condwriter", "8", "1", "2", "3", "4")
        addr = proc.info["addr"]
        bpf = k.BpfFilter(generate(addr, 8, [parse(cond, 8)], False), {})
        event = k.BreakpointEvent(proc.pid, addr, 8, Access.WRITE, Mode.STOP, TOKEN, bpf=bpf)
        try:
            proc.go()
            assert proc.wait() == code
            assert event.read_count() == (4 if code == 0 else 3)
        finally:
            event.close()
