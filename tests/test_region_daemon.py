"""Regions larger than one slot through the daemon: gdb's split, all pieces fire, all or nothing.

DESIGN 5.8 and issue "Operations": a 16-byte object is two 8-byte watches that both fire;
an unaligned 6-byte region is split 1 + 4 + 1 and refused cleanly (ENOSPC, nothing left
installed) when the thread has fewer free slots than pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target

pytestmark = pytest.mark.kernel

N = 300
TIMEOUT = 10.0


def slots_of(c: hwbkpt.Client, tid: int) -> list[dict[str, object]]:
    for target in c.status()["targets"]:
        for thread in target["threads"]:
            if thread["tid"] == tid:
                return list(thread["slots"])
    return []


@pytest.mark.timeout(60)
def test_sixteen_bytes_are_two_pieces_and_both_fire(
    daemon: Daemon, target: Callable[..., Target]
) -> None:
    proc = target("regions", N)
    addr = int(proc.info["pair16"])
    with hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c:
        pieces = c.watch_region(proc.pid, addr, 16, access="w", mode="count")
        assert [(w.addr - addr, w.length) for w in pieces] == [(0, 8), (8, 8)]
        assert all(w.state == "installed" for w in pieces)
        proc.go()
        assert proc.line() == "done"
        assert [w.count() for w in pieces] == [N, N]
        proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_odd_six_bytes_split_as_gdb_and_every_piece_fires(
    daemon: Daemon, target: Callable[..., Target]
) -> None:
    proc = target("regions", N)
    addr = int(proc.info["odd6"])
    assert addr % 8 == 3
    with hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c:
        pieces = c.watch_region(proc.pid, addr, 6, access="w", mode="count")
        assert [(w.addr - addr, w.length) for w in pieces] == [(0, 1), (1, 4), (5, 1)]
        proc.go()
        assert proc.line() == "done"
        # One byte store per iteration hits each 1-byte piece; four hit the 4-byte piece.
        assert [w.count() for w in pieces] == [N, 4 * N, N]
        proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_region_needing_more_slots_than_free_is_refused_whole(
    daemon: Daemon, target: Callable[..., Target]
) -> None:
    proc = target("regions", N)
    pair, odd = int(proc.info["pair16"]), int(proc.info["odd6"])
    with (
        hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as other,
        hwbkpt.Client(socket=daemon.socket, timeout=TIMEOUT) as c,
    ):
        # Another client holds two of the four slots, with a higher priority.
        other.watch_region(proc.pid, pair, 16, access="w", mode="count", priority=5)
        before = slots_of(c, proc.pid)
        assert len(before) == 2
        with pytest.raises(hwbkpt.NoSpaceError, match="3 slots"):
            c.watch_region(proc.pid, odd, 6, access="w", mode="count")
        assert c.watches() == []
        assert slots_of(c, proc.pid) == before
        # Once the other client frees one of its slots, the region fits, and every piece counts.
        first, _second = (w["id"] for w in other.watches())
        other.call("unwatch", id=first)
        pieces = c.watch_region(proc.pid, odd, 6, access="w", mode="count")
        assert all(w.state == "installed" for w in pieces)
        proc.go()
        assert proc.line() == "done"
        assert [w.count() for w in pieces] == [N, 4 * N, N]
        proc.go()
    assert proc.wait(TIMEOUT) == 0
