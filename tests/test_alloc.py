"""The slot allocation policy (hwbkptd._alloc.choose): tables, then a brute-force model."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hwbkptd._alloc import CAPACITY, Want, choose
from hwbkptd._model import Access, Spec


def spec(n: int) -> Spec:
    return Spec(0x1000 + 8 * n, 8, Access.WRITE)


A, B, C, D, E, F = (spec(n) for n in range(6))


def w(s: Spec, priority: int, seq: int) -> Want:
    return Want(s, priority, seq)


TABLE = [
    pytest.param([], set(), [], id="nothing wanted"),
    pytest.param([w(A, 0, 1)], set(), [A], id="one"),
    pytest.param(
        [w(A, 0, 1), w(B, 0, 2), w(C, 0, 3), w(D, 0, 4)], set(), [A, B, C, D], id="exactly four"
    ),
    pytest.param(
        [w(A, 0, 1), w(B, 0, 2), w(C, 0, 3), w(D, 0, 4), w(E, 0, 5)],
        set(),
        [A, B, C, D],
        id="fifth of equal priority waits: earliest requests keep the slots",
    ),
    pytest.param(
        [w(E, 0, 5), w(D, 0, 4), w(C, 0, 3), w(B, 0, 2), w(A, 0, 1)],
        set(),
        [A, B, C, D],
        id="input order does not matter",
    ),
    pytest.param(
        [w(A, 0, 1), w(B, 0, 2), w(C, 0, 3), w(D, 0, 4), w(E, 1, 5)],
        set(),
        [E, A, B, C],
        id="higher priority newcomer preempts the latest of the lowest",
    ),
    pytest.param(
        [w(A, -1, 1), w(B, 0, 2), w(C, 0, 3), w(D, 0, 4), w(E, 0, 5)],
        set(),
        [B, C, D, E],
        id="negative priority loses to a later request",
    ),
    pytest.param(
        [w(A, 0, 1), w(B, 0, 2), w(C, 0, 3), w(D, 0, 4), w(E, 0, 5)],
        {B},
        [A, C, D, E],
        id="busy spec skipped: the next one gets the chance",
    ),
    pytest.param(
        [w(A, 5, 1), w(B, 0, 2)],
        {A, B},
        [],
        id="all busy",
    ),
    pytest.param(
        [w(A, 0, 9), w(B, 0, 3), w(C, 2, 10), w(D, 1, 1), w(E, 2, 4), w(F, 0, 2)],
        set(),
        [E, C, D, F],
        id="priority first, then sequence",
    ),
]


@pytest.mark.parametrize(("wants", "busy", "expected"), TABLE)
def test_choose_table(wants: list[Want], busy: set[Spec], expected: list[Spec]) -> None:
    assert choose(wants, busy) == expected


def test_capacity_argument() -> None:
    wants = [w(A, 0, 1), w(B, 0, 2), w(C, 0, 3)]
    assert choose(wants, capacity=2) == [A, B]
    assert choose(wants, capacity=0) == []


def test_capacity_is_four() -> None:
    assert CAPACITY == 4


# ---------------------------------------------------------------------- model


def model_choose(wants: list[Want], busy: set[Spec], capacity: int) -> list[Spec]:
    """Brute force: the best-ranked subset of non-busy wants of the largest possible size.

    Enumerates every subset of admissible size and keeps the one whose sorted rank list is
    lexicographically smallest — no sorting trick shared with the implementation.
    """
    free = [x for x in wants if x.spec not in busy]
    size = min(capacity, len(free))
    best: tuple[tuple[int, int], ...] | None = None
    best_set: tuple[Want, ...] = ()
    for subset in itertools.combinations(free, size):
        ranks = tuple(sorted((-x.priority, x.seq) for x in subset))
        if best is None or ranks < best:
            best, best_set = ranks, subset
    return [x.spec for x in sorted(best_set, key=lambda x: (-x.priority, x.seq))]


@st.composite
def want_sets(draw: st.DrawFn) -> tuple[list[Want], set[Spec], int]:
    n = draw(st.integers(0, 7))
    specs = [spec(i) for i in range(n)]  # distinct specs: the engine gives one want per spec
    seqs = draw(st.lists(st.integers(1, 30), min_size=n, max_size=n, unique=True))
    prios = draw(st.lists(st.integers(-2, 2), min_size=n, max_size=n))
    wants = [Want(s, p, q) for s, p, q in zip(specs, prios, seqs, strict=True)]
    wants = draw(st.permutations(wants))
    busy = set(draw(st.lists(st.sampled_from(specs), unique=True))) if specs else set()
    capacity = draw(st.integers(0, 5))
    return list(wants), busy, capacity


@given(want_sets())
def test_choose_matches_brute_force(case: tuple[list[Want], set[Spec], int]) -> None:
    wants, busy, capacity = case
    chosen = choose(wants, busy, capacity)
    assert chosen == model_choose(wants, busy, capacity)
    assert len(chosen) <= capacity
    assert not set(chosen) & busy


@given(want_sets(), st.integers(-2, 3))
def test_newcomer_of_equal_priority_never_displaces(
    case: tuple[list[Want], set[Spec], int], priority: int
) -> None:
    """Stability: a later request of a priority no higher than the holders' changes nothing."""
    wants, busy, capacity = case
    before = choose(wants, busy, capacity)
    held_min = min((x.priority for x in wants if x.spec in before), default=priority)
    newcomer = Want(Spec(0x9000, 8, Access.WRITE), min(priority, held_min), 10_000)
    after = choose([*wants, newcomer], busy, capacity)
    assert after[: len(before)] == before
