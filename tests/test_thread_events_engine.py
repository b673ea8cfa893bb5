"""``thread`` events from the engine driven by the fake kernel (tests/fakes.py): fast, no
root. Which clients are told, in which order, with which fields (PROTOCOL.md section 7)."""

from __future__ import annotations

from typing import Any

import pytest

from hwbkptd._model import Access, Mode, Spec
from tests.fakes import Harness

PID = 100
X = Spec(0x1000, 8, Access.WRITE)


def thread_events(h: Harness, cid: int) -> list[dict[str, Any]]:
    return [f for kind, f in h.take(cid) if kind == "thread"]


@pytest.mark.parametrize("child_first", [False, True])
def test_attached_clients_are_told_of_new_and_exited_threads(child_first: bool) -> None:
    h = Harness()
    [main] = h.kernel.spawn(PID, 1)
    for cid in (1, 2, 3):
        h.engine.add_client(cid)
    h.engine.attach(1, PID)
    h.engine.attach(3, PID)
    h.engine.watch(2, PID, X, Mode.COUNT)  # an interest in the process, not attached
    new = h.kernel.clone(main, child_first=child_first)
    h.settle()
    for cid in (1, 3):
        assert thread_events(h, cid) == [{"pid": PID, "tid": new, "state": "new"}]
    assert h.kernel.state(new) == "running"  # told, not held
    h.kernel.exit_thread(new, code=7)
    h.settle()
    for cid in (1, 3):
        assert thread_events(h, cid) == [
            {"pid": PID, "tid": new, "state": "exit", "code": 7, "signal": None}
        ]
    assert thread_events(h, 2) == []


def test_no_thread_events_after_detach_nor_for_the_process_end() -> None:
    h = Harness()
    [main] = h.kernel.spawn(PID, 1)
    for cid in (1, 2):
        h.engine.add_client(cid)
    h.engine.attach(1, PID)
    h.engine.attach(2, PID)
    h.engine.leave(1, PID)
    new = h.kernel.clone(main)
    h.settle()
    assert thread_events(h, 1) == []
    assert [e["tid"] for e in thread_events(h, 2)] == [new]
    h.kernel.exit_group(PID, 3)
    h.settle()
    events = h.take(2)
    # The leader's end is the process's end: one exit event, after the other threads'.
    assert [k for k, _ in events if k == "exit"] == ["exit"]
    assert all(f["tid"] != main for k, f in events if k == "thread")
