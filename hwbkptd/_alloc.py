"""Which keys get a thread's four hardware slots.

Theory of operation
-------------------
Every thread has ``CAPACITY`` (4) slots. The engine asks, per thread, for a set of *wants*:
one per distinct :class:`~hwbkptd._model.Spec` (address, length, access) that some watch
applies to that thread. Identical specs from different clients are one want — they share a
slot, reference counted by the engine.

A want's rank is ``(-priority, seq)``: the highest priority of its watches first, and among
equals the earliest request (the smallest sequence number of its watches). Ranking by the
*earliest* sequence number is what makes "ties: the earliest request keeps the slot" hold
without remembering who was installed first: a slot holder never loses to an equal-priority
newcomer, because the newcomer's sequence number is larger.

The kernel may refuse a slot (``ENOSPC``) because something outside the daemon — another
perf user, a ptrace user — holds slots of that thread. Such specs are *busy*: they are
skipped, the next-ranked want gets the chance, and the engine clears the busy mark whenever
capacity may have changed (a slot of that thread closed, or a periodic retry).

:func:`choose` is the whole policy. It is a pure function so that it can be checked against
a brute-force model (tests/test_alloc.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Set
from dataclasses import dataclass

from hwbkptd._model import Spec

__all__ = ["CAPACITY", "Want", "choose"]

CAPACITY = 4


@dataclass(frozen=True, slots=True)
class Want:
    """One distinct spec wanted on a thread, with the rank of its best watch."""

    spec: Spec
    priority: int
    seq: int

    @property
    def rank(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


def choose(
    wants: Iterable[Want], busy: Set[Spec] = frozenset(), capacity: int = CAPACITY
) -> list[Spec]:
    """Return the specs that should hold slots, best first.

    At most ``capacity`` specs, never a busy one; the rest of ``wants`` are pending.
    """
    ranked = sorted(wants, key=lambda w: w.rank)
    chosen: list[Spec] = []
    for want in ranked:
        if len(chosen) == capacity:
            break
        if want.spec not in busy:
            chosen.append(want.spec)
    return chosen
