"""Conditions in the engine, on a fake kernel (tests/fakes.py runs the filter in Python):
routing by each condition's counter, shared slots, program regeneration. Fast, no root."""

from __future__ import annotations

import pytest

from hwbkpt_proto import LimitExceededError
from hwbkptd._cond import parse
from hwbkptd._engine import MAX_NOTIFY_CONDITIONS
from hwbkptd._model import Access, Mode, Spec
from tests.fakes import Harness

PID = 100
X = Spec(0x1000, 8, Access.WRITE)


@pytest.mark.parametrize("park", [False, True])
def test_each_client_gets_only_its_true_hits(park: bool) -> None:
    h = Harness(park=park)
    [tid] = h.kernel.spawn(PID, 1)
    for cid in (1, 2, 3):
        h.engine.add_client(cid)
    a = h.engine.watch(1, PID, X, Mode.STOP, condition=parse("new == 3", 8))
    b = h.engine.watch(2, PID, X, Mode.STOP, condition=parse("new >= 4", 8))
    c = h.engine.watch(3, PID, X, Mode.COUNT)
    h.settle()  # the second condition's program replaces the first at an interrupt stop
    for cid in (1, 2, 3):
        h.take(cid)
    [event] = h.kernel.open_events(tid)
    assert event.flt is not None
    assert len(event.flt.conditions) == 2
    assert not event.flt.always  # the unconditional watch only counts
    for value in range(6):
        h.kernel.hit(tid, X.addr, 8, "w", value=value)
        h.settle()
        stops = {cid: [f for kind, f in h.take(cid) if kind == "stop"] for cid in (1, 2, 3)}
        if value == 3:
            assert [s["watches"] for s in stops[1]] == [[a.id]]
            assert (stops[1][0]["new"], stops[1][0]["old"]) == (3, 2)
            assert stops[2] == []
            h.engine.resume(1, tid)
        elif value >= 4:
            assert stops[1] == []
            assert [s["watches"] for s in stops[2]] == [[b.id]]
            assert stops[2][0]["new"] == value
            h.engine.resume(2, tid)
        else:
            assert stops == {1: [], 2: [], 3: []}
        h.settle()
    assert h.engine.count(1, a.id) == 1
    assert h.engine.count(2, b.id) == 2
    assert h.engine.count(3, c.id) == 6


def test_a_new_condition_regenerates_the_program_and_hits_go_on() -> None:
    h = Harness(park=False)
    [tid] = h.kernel.spawn(PID, 1)
    h.engine.add_client(1)
    h.engine.add_client(2)
    a = h.engine.watch(1, PID, X, Mode.COUNT, condition=parse("hits < 3", 8))
    for value in range(2):
        h.kernel.hit(tid, X.addr, 8, "w", value=value)
    h.settle()
    assert h.engine.count(1, a.id) == 2
    # The thread runs: the new program waits for a stop (reopening under a running thread
    # loses hits); the engine interrupts it and reopens then.
    b = h.engine.watch(2, PID, X, Mode.STOP, condition=parse("new == 7", 8))
    h.settle()
    [event] = h.kernel.open_events(tid)
    assert event.flt is not None
    assert len(event.flt.conditions) == 2
    assert event.flt.hits == (2, 0)  # "hits" of watch a goes on from 2
    for value in range(5, 10):
        h.kernel.hit(tid, X.addr, 8, "w", value=value)
        h.settle()
        if value == 7:
            assert [f["watches"] for k, f in h.take(2) if k == "stop"] == [[b.id]]
            h.engine.resume(2, tid)
            h.settle()
    assert h.engine.count(1, a.id) == 3
    assert h.engine.count(2, b.id) == 1
    h.engine.unwatch(2, b.id)
    h.settle()
    [event] = h.kernel.open_events(tid)
    assert event.flt is not None
    assert len(event.flt.conditions) == 1


def test_unconditional_stop_watch_makes_every_hit_delivered() -> None:
    h = Harness(park=False)
    [tid] = h.kernel.spawn(PID, 1)
    h.engine.add_client(1)
    h.engine.add_client(2)
    h.engine.watch(1, PID, X, Mode.COUNT, condition=parse("new == 1", 8))
    h.engine.watch(2, PID, X, Mode.STOP)
    h.settle()  # reopened in stop mode at the interrupt stop that follows
    [event] = h.kernel.open_events(tid)
    assert event.flt is not None
    assert event.flt.always


def test_ptrace_path_opens_filtered_slots_in_stop_mode() -> None:
    h = Harness(park=False)
    h.engine = type(h.engine)(h.kernel, h._emit, park=False, bpf=False)
    [tid] = h.kernel.spawn(PID, 1)
    h.engine.add_client(1)
    w = h.engine.watch(1, PID, X, Mode.COUNT, condition=parse("new == 1", 8))
    assert w.describe()["path"] == "ptrace"
    [event] = h.kernel.open_events(tid)
    assert event.mode is Mode.STOP
    for value in range(3):
        h.kernel.hit(tid, X.addr, 8, "w", value=value)
        h.settle()
        assert [k for k, _ in h.take(1) if k == "stop"] == []
    assert h.engine.count(1, w.id) == 1


def test_notify_records_go_to_the_watches_they_matched() -> None:
    h = Harness(park=False)
    [tid] = h.kernel.spawn(PID, 1)
    for cid in (1, 2, 3):
        h.engine.add_client(cid)
    even = h.engine.watch(1, PID, X, Mode.NOTIFY, condition=parse("new & 1 == 0", 8))
    big = h.engine.watch(2, PID, X, Mode.NOTIFY, condition=parse("new >= 3", 8))
    every = h.engine.watch(3, PID, X, Mode.NOTIFY)
    h.settle()
    [event] = h.kernel.open_events(tid)
    assert event.flt is not None
    assert event.flt.notify == (0, 1)
    assert event.flt.notify_all
    for cid in (1, 2, 3):
        h.take(cid)
    for value in range(5):
        h.kernel.hit(tid, X.addr, 8, "w", value=value)
    h.engine.on_samples(event.token, *h.kernel.drain(event, False)[:2])

    def got(cid: int) -> list[tuple[int, int]]:
        out = []
        for kind, f in h.take(cid):
            if kind == "hit":
                out.append((f["new"], f["old"]))
            elif kind == "hits":
                out += list(zip(f["new"], f["old"], strict=True))
        return out

    assert got(1) == [(0, 0), (2, 1), (4, 3)]
    assert got(2) == [(3, 2), (4, 3)]
    assert got(3) == [(0, 0), (1, 0), (2, 1), (3, 2), (4, 3)]
    assert h.engine.count(1, even.id) == 3
    assert h.engine.count(2, big.id) == 2
    assert h.engine.count(3, every.id) == 5


def test_a_65th_notify_condition_on_one_address_is_elimit() -> None:
    h = Harness(park=False)
    h.kernel.spawn(PID, 1)
    h.engine.add_client(1)
    for _ in range(MAX_NOTIFY_CONDITIONS):
        h.engine.watch(1, PID, X, Mode.NOTIFY, condition=parse("new == 1", 8))
    with pytest.raises(LimitExceededError, match="at most 64"):
        h.engine.watch(1, PID, X, Mode.NOTIFY, condition=parse("new == 1", 8))
    h.engine.watch(1, PID, X, Mode.STOP, condition=parse("new == 1", 8))  # others are fine
