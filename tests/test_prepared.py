"""The engine's table for the compiled stop round (hwbkptd/_prepared.py), with a fake
kernel: what it plans, what it leaves to the engine, and that its report is credited as
the pure path credits a stop. The round itself runs on real stops in test_fastpath.py."""

from __future__ import annotations

from hwbkptd._model import Access, Mode, Spec
from hwbkptd._records import ThreadState
from tests.fakes import Harness

PID = 100
X = Spec(0x1000, 8, Access.WRITE)
Y = Spec(0x2000, 8, Access.WRITE)


def setup() -> tuple[Harness, int]:
    h = Harness(park=False)  # the daemon's default
    (tid,) = h.kernel.spawn(PID, 1)
    for cid in (1, 2):
        h.engine.add_client(cid)
    return h, tid


def test_a_running_thread_with_a_stop_watch_is_planned_with_its_stops() -> None:
    h, tid = setup()
    a = h.engine.watch(1, PID, X, Mode.STOP)
    b = h.engine.watch(2, PID, X, Mode.STOP)
    c = h.engine.watch(2, PID, Y, Mode.COUNT)
    h.settle()
    ((ttid, pid, holds, slots, trap_ok),) = h.engine.fast_table(32)
    assert (ttid, pid, holds, trap_ok) == (tid, PID, (), True)
    stops = {s[2] for s in slots}
    assert stops == {((1, a.id), (2, b.id)), ()}
    assert all(s[3] for s in slots)  # plain: no filter, no notify watch on a stop slot
    assert c.mode is Mode.COUNT


def test_only_count_watches_leave_nothing_to_plan() -> None:
    h, _ = setup()
    h.engine.watch(1, PID, X, Mode.COUNT)
    h.settle()
    assert h.engine.fast_table(32) == []


def test_a_notify_watch_on_a_stop_slot_makes_it_the_engines() -> None:
    h, _ = setup()
    h.engine.watch(1, PID, X, Mode.STOP)
    h.engine.watch(2, PID, X, Mode.NOTIFY)
    h.settle()
    ((*_, slots, _trap_ok),) = h.engine.fast_table(32)
    assert [s[3] for s in slots] == [False]


def test_too_many_stop_watches_on_a_slot_make_it_the_engines() -> None:
    h, _ = setup()
    h.engine.watch(1, PID, X, Mode.STOP)
    h.engine.watch(2, PID, X, Mode.STOP)
    h.settle()
    ((*_, slots, _trap_ok),) = h.engine.fast_table(1)
    assert [s[3] for s in slots] == [False]


def test_a_held_thread_is_planned_with_its_holders_until_a_step_is_asked() -> None:
    h, tid = setup()
    h.engine.watch(1, PID, X, Mode.STOP)
    h.engine.watch(2, PID, X, Mode.STOP)
    h.settle()
    assert h.kernel.hit(tid, X.addr, 8)
    h.settle()
    ((_, _, holds, _, trap_ok),) = h.engine.fast_table(32)
    assert (sorted(holds), trap_ok) == ([1, 2], True)
    h.engine.step(1, tid)
    assert h.engine.fast_table(32) == []  # its resume is a single step: the engine's


def test_parking_plans_nothing() -> None:
    h = Harness(park=True)
    h.kernel.spawn(PID, 1)
    h.engine.add_client(1)
    h.engine.watch(1, PID, X, Mode.STOP)
    h.settle()
    assert h.engine.fast_table(32) == []


def test_the_report_is_credited_as_a_pure_stop_is() -> None:
    h, tid = setup()
    a = h.engine.watch(1, PID, X, Mode.STOP)
    b = h.engine.watch(2, PID, X, Mode.COUNT)  # shares the slot: credited, not stopped
    h.settle()
    ((_, _, _, slots, _),) = h.engine.fast_table(32)
    last = slots[0][1]
    stops = h.engine.counters["stops_reported"]
    # The round served two stops of the slot: one resumed, the second still held by 1.
    h.engine.fast_apply([(tid, True, (1,), (last + 2,))], stops=2, traps=2)
    assert (a.count, b.count) == (2, 2)
    assert h.engine.counters["stops_reported"] == stops + 2
    assert h.engine.counters["fast_stops"] == 2
    thread = h.engine._threads[tid]
    assert thread.state is ThreadState.STOPPED
    assert thread.holds == {1}
    assert h.engine.stopped_for(1, tid)
    # A report with an older counter credits nothing (as _refresh).
    h.engine.fast_apply([(tid, True, (1,), (last + 1,))], stops=0, traps=0)
    assert (a.count, b.count) == (2, 2)



def test_a_thread_whose_signal_is_being_chosen_is_the_engines() -> None:
    """A client named a signal at a watch stop while another still holds the thread: the
    last resume decides what the thread runs with (hwbkptd/_signals.py), which the round's
    plain CONT with 0 would drop, so the table leaves the thread out meanwhile."""
    from tests.test_engine import write
    from tests.test_signals_engine import USR2

    h, tid = setup()
    h.engine.watch(1, PID, X, Mode.STOP)
    h.engine.watch(2, PID, X, Mode.STOP)
    h.kernel.handled.add(USR2)
    assert write(h, tid, X)
    h.take()
    assert [t[0] for t in h.engine.fast_table(32)] == [tid]  # held, planned
    h.engine.resume(1, tid, USR2)  # client 2 still holds it
    h.settle()
    assert h.engine.fast_table(32) == []
    h.engine.resume(2, tid)
    h.settle()
    assert h.kernel.delivered == [(tid, USR2)]
