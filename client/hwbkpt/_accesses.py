"""One access, one report: folding the ``hit`` events of a region's pieces back together.

A region that is not one aligned 1/2/4/8-byte piece takes several slots (gdb's split,
DESIGN §5.8), and the kernel has one breakpoint event per piece. In ``notify`` mode each
event writes its own sample into its own ring, so one 8-byte store at an odd address, which
touches four pieces, arrives as four ``hit`` events, possibly in different batches (each ring
is drained on its own). To its user a region is one watch, as in gdb: this module turns
those samples back into one :class:`Access` per access. (In ``stop`` mode there is nothing to
fold: one instruction raises one SIGTRAP, and its ``stop`` event lists every piece it hit.)

Theory of operation
-------------------
All samples of one access are written by one debug exception (``hw_breakpoint_handler`` in
arch/x86/kernel/hw_breakpoint.c walks the DR6 bits and emits one sample per hit breakpoint),
which ends before the thread can make its next access. So in one thread's samples sorted by
``time`` the samples of an access are *contiguous*, and an access has at most one sample per
piece, all at the same ``ip``. The time-sorted stream of a thread is cut into accesses where

* the ``ip`` changes, or a piece already in the current access comes again (exact), or
* the time since the previous sample exceeds :data:`SAME_EXCEPTION_NS` (a heuristic, only
  needed when one instruction makes consecutive accesses to *different* pieces without
  touching a piece twice, e.g. a slow byte loop).

Samples of one exception normally lie 0.15-2.5 us apart, but a guest's vCPU can be
descheduled by its host in the middle of the exception. With a 50 us limit and a 250 ms
settle time a fresh CI machine once split one store of a hundred in two (whether by such a
gap or by a late drain could not be told afterwards). Consecutive
accesses of one thread are at least a debug exception apart (4.2 us measured, usually
9-18 us), so no gap can tell them apart from a preempted exception for certain: the limit is
set at 1 ms, where preemption is rarer than any loop that matters is slow, and the exact
rules above do the rest.

Samples of one access may be drained in two rounds (a drain can fall between two rings), so
a sample is folded only once it is :data:`SETTLE_NS` old (``time`` is ``CLOCK_MONOTONIC``,
the clock of this machine; the CLI runs beside the daemon) or at :meth:`Folder.flush`. An
access is thereby printed at most about a second after it happened, and a daemon starved of
the CPU for less than that still delivers all of its samples in time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

__all__ = ["SAME_EXCEPTION_NS", "SETTLE_NS", "Access", "Folder"]

SAME_EXCEPTION_NS = 1_000_000
SETTLE_NS = 1_000_000_000


@dataclass
class Access:
    """One access to a region: its thread, the ip after it, its first sample's time, and
    the watch ids (pieces) it touched, in the order their samples were taken."""

    tid: int
    ip: int
    time: int
    watches: list[int] = field(default_factory=list)
    last: int = 0  # time of its latest sample


class Folder:
    """Collects ``hit`` samples ``(tid, ip, time, watch ids)`` and hands back accesses.

    :meth:`add` buffers a sample; :meth:`ready` returns the accesses whose samples are all
    settled, oldest first; :meth:`flush` returns all that is left (at the end of a watch).
    """

    def __init__(self, settle_ns: int = SETTLE_NS) -> None:
        self.settle_ns = settle_ns
        self._pending: list[tuple[int, int, int, tuple[int, ...]]] = []  # (time, tid, ip, ids)
        self._open: dict[int, Access] = {}  # per thread: the access being built

    def add(self, tid: int, ip: int, when: int, watches: list[int]) -> None:
        """Buffer one sample of the watches ``watches`` (the pieces it hit)."""
        self._pending.append((when, tid, ip, tuple(watches)))

    def ready(self, now: int | None = None) -> list[Access]:
        """Accesses complete by ``now`` (``CLOCK_MONOTONIC`` ns; default: the clock now)."""
        if now is None:
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        limit = now - self.settle_ns
        self._pending.sort()
        cut = 0
        while cut < len(self._pending) and self._pending[cut][0] <= limit:
            cut += 1
        done = self._fold(self._pending[:cut])
        del self._pending[:cut]
        # An open access may still get samples newer than ``limit``; it is complete once
        # ``limit`` is past its last sample by more than one exception can last.
        for tid, access in list(self._open.items()):
            if access.last + SAME_EXCEPTION_NS < limit:
                done.append(self._open.pop(tid))
        return sorted(done, key=lambda a: a.time)

    def flush(self) -> list[Access]:
        """Every access still buffered, oldest first."""
        self._pending.sort()
        done = self._fold(self._pending)
        self._pending.clear()
        done.extend(self._open.values())
        self._open.clear()
        return sorted(done, key=lambda a: a.time)

    def _fold(self, samples: list[tuple[int, int, int, tuple[int, ...]]]) -> list[Access]:
        done: list[Access] = []
        for when, tid, ip, ids in samples:
            current = self._open.get(tid)
            if (
                current is None
                or current.ip != ip
                or any(w in current.watches for w in ids)
                or when - current.last > SAME_EXCEPTION_NS
            ):
                if current is not None:
                    done.append(current)
                current = self._open[tid] = Access(tid, ip, when, last=when)
            current.watches.extend(ids)
            current.last = when
        return done
