"""The compiled stop round (hwbkptd/_fastpath.c, issue 13) on real stops.

Every test here holds in both modes: the suite runs once with the round compiled and once
with ``HWBKPT_PURE=1`` (.ci/run), and the results must be the same. With the round on,
the ``fast_stops`` counter proves it was taken; each hand-back case (a foreign SIGTRAP, a
client that leaves while holding, a step, two clients, a process killed while held) is
checked for the same outcome the pure path gives.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable

import pytest

from hwbkpt_proto import Regs
from hwbkptd._tracer import HOT_WAIT
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_stop_v2 import raw_peer
from tests.test_watch import (
    TIMEOUT,
    Conn,
    connect_fixture,  # noqa: F401  (the `connect` fixture)
    info_int,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]
COMPILED = os.environ.get("HWBKPT_PURE", "") in ("", "0")


def check_mode(status: dict[str, object], *, served: bool = True) -> None:
    """The round is on (and, with ``served``, took stops) unless HWBKPT_PURE is set."""
    counters = status["counters"]
    assert isinstance(counters, dict)
    if COMPILED:
        assert status["fastpath"] == "on"
        if served:
            assert counters.get("fast_stops", 0) > 0, counters
    else:
        assert str(status["fastpath"]).startswith("off")
        assert counters.get("fast_stops", 0) == 0


@pytest.mark.timeout(120)
def test_a_stop_loop_is_served_and_counted_exactly(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    n = 300
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    c = connect("loop")
    w = c.watch(proc.pid, addr, mode="stop")
    before = c.status()["counters"].get("stops_reported", 0)
    proc.go()
    for i in range(1, n + 1):
        ev = c.expect("stop")
        assert (ev.tid, ev.watches, ev.reason) == (proc.pid, [w.id], "watch")
        assert isinstance(ev.regs, Regs)
        if i == n:
            # The thread is held (a stop served compiled is the engine's hold too).
            assert int.from_bytes(c.read_memory(proc.pid, addr, 8), "little") == n
            assert c.get_regs(proc.pid)["rip"] == ev.regs["rip"]
        c.resume(proc.pid, wait=False)
    assert proc.line() == f"done var={n} pair0=0"
    assert w.count() == n
    status = c.status()
    assert status["counters"]["stops_reported"] - before == n
    check_mode(status)
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_no_stop_is_lost_to_counter_reads_between_a_hit_and_its_trap(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    """Another client's ``status`` reads every slot's counter. One that came after a hit
    had counted and before its SIGTRAP was handled took the counter's delta, by which the
    trap is routed, and the stop was lost: the thread ran on and its client never heard
    of the hit (1 stop in 40,000 in the stop bench with a ``status`` every 50 ms)."""
    n = 2000
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    c = connect("loop")
    other = connect("status")
    w = c.watch(proc.pid, addr, mode="stop")
    done = threading.Event()

    def read_counters() -> None:
        while not done.is_set():
            other.status()

    poller = threading.Thread(target=read_counters)
    poller.start()
    stops = 0
    try:
        proc.go()
        while stops < n and (ev := c.client.next_event(timeout=2.0)) is not None:
            if ev.kind == "stop":
                stops += 1
                c.resume(proc.pid, wait=False)
    finally:
        done.set()
        poller.join(TIMEOUT)
    assert proc.line() == f"done var={n} pair0=0"
    assert stops == n, f"{stops} stop events for {n} hits"
    assert w.count() == n
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(90)
def test_the_wire_of_a_stop_is_protocol_2s(target: Start, daemon: Daemon) -> None:
    n = 40
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    with raw_peer(daemon, 2) as peer:
        wid = peer.call("watch", pid=proc.pid, addr=addr, mode="stop", access="w")["id"]
        peer.conn.positional = True  # resumes in the fixed shape, as the library sends them
        proc.go()
        for _ in range(n):
            stop, wire = peer.expect_stop()
            assert wire[2] == [proc.pid, proc.pid, [wid], "watch", stop.params["regs"]]
            assert len(stop.params["regs"]) == 216
            peer.notify("resume", tid=proc.pid)
        assert proc.line() == f"done var={n} pair0=0"
        assert peer.call("count", id=wid) == n
        check_mode(peer.call("status"))
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_foreign_sigtraps_between_served_stops_reach_the_program(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    k = 20
    proc = target("sigtrap", k)
    addr = info_int(proc, "addr")
    c = connect("foreign")
    w = c.watch(proc.pid, addr, mode="stop")
    proc.go()
    for _ in range(3 * k):  # each store before an int3, an int1 and a raise(SIGTRAP)
        c.expect("stop", reason="watch")
        c.resume(proc.pid, wait=False)
    assert proc.line() == f"done handled={3 * k}"
    assert w.count() == 3 * k
    status = c.status()
    assert status["counters"]["sigtraps_delivered"] >= 3 * k
    check_mode(status)
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_two_clients_both_hold_every_stop(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    n = 100
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, addr, mode="stop")
    proc.go()
    for _ in range(n):
        ea, eb = a.expect("stop"), b.expect("stop")
        assert (ea.watches, eb.watches) == ([wa.id], [wb.id])
        assert ea.regs == eb.regs
        a.resume(proc.pid, wait=False)
        b.resume(proc.pid, wait=False)
    assert proc.line() == f"done var={n} pair0=0"
    assert (wa.count(), wb.count()) == (n, n)
    check_mode(a.status())
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_resumes_later_than_the_idle_wait_are_still_read_by_the_round(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    """Two clients that each take longer than the round's idle wait (HOT_WAIT, 1 ms) to
    resume, as clients preempted by other load do. The round keeps waiting for a held
    thread's resumes (up to its budget, HOT_BUDGET) instead of leaving them to the
    connections' trio readers: ``fast_resumes`` counts resumes it read itself (without
    that wait it stays 0 here, every resume coming after the round went idle)."""
    n = 20
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    a, b = connect("slow-a"), connect("slow-b")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, addr, mode="stop")
    before = a.status()["counters"].get("fast_resumes", 0)
    proc.go()
    for _ in range(n):
        a.expect("stop")
        b.expect("stop")
        time.sleep(HOT_WAIT * 1.5)
        a.resume(proc.pid, wait=False)
        b.resume(proc.pid, wait=False)
    assert proc.line() == f"done var={n} pair0=0"
    assert (wa.count(), wb.count()) == (n, n)
    status = a.status()
    check_mode(status)
    fast = status["counters"].get("fast_resumes", 0) - before
    if COMPILED:
        assert 0 < fast <= 2 * n, status["counters"]
    else:
        assert fast == 0
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_a_client_leaving_while_it_holds_releases_its_hold(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    n = 60
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    a, b = connect("stays"), connect("leaves")
    wa = a.watch(proc.pid, addr, mode="stop")
    b.watch(proc.pid, addr, mode="stop")
    proc.go()
    for i in range(1, n + 1):
        a.expect("stop")
        if i < n // 2:
            b.expect("stop")
            b.resume(proc.pid, wait=False)
        elif i == n // 2:
            b.expect("stop")
            b.close()  # holding: its hold goes with it
        a.resume(proc.pid, wait=False)
    assert proc.line() == f"done var={n} pair0=0"
    assert wa.count() == n
    check_mode(a.status())
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_a_step_after_a_served_stop(target: Start, connect: Callable[[str], Conn]) -> None:
    n = 30
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    addr2 = info_int(proc, "addr2")
    c = connect("stepper")
    w = c.watch(proc.pid, addr, mode="stop")
    proc.go()
    for i in range(1, n + 1):
        ev = c.expect("stop", reason="watch")
        assert ev.watches == [w.id]
        if i % 3 == 0:
            # One step: the next instruction stores to var2 (tests/progs/writer.c).
            c.step(proc.pid, wait=False)
            st = c.expect("stop", reason="step")
            assert st.watches == []
            assert st.regs["rip"] != ev.regs["rip"]
            assert int.from_bytes(c.read_memory(proc.pid, addr2, 8), "little") == i
        c.resume(proc.pid, wait=False)
    assert proc.line() == f"done var={n} pair0=0"
    assert w.count() == n
    check_mode(c.status())
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_a_process_killed_while_held(target: Start, connect: Callable[[str], Conn]) -> None:
    n = 50
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    c = connect("killer")
    w = c.watch(proc.pid, addr, mode="stop")
    proc.go()
    for _ in range(10):
        c.expect("stop")
        c.resume(proc.pid, wait=False)
    c.expect("stop")  # held now
    os.kill(proc.pid, signal.SIGKILL)
    # Killed, it stops at PTRACE_EVENT_EXIT and is still held there: it goes on to exit
    # when its holder resumes it (or leaves), as in the pure path.
    with pytest.raises(pytest.fail.Exception):
        c.expect("exit", timeout=0.5)
    c.resume(proc.pid, wait=False)
    ev = c.expect("exit", pid=proc.pid)
    assert ev.signal == signal.SIGKILL
    assert proc.wait(TIMEOUT) == -signal.SIGKILL
    assert w.count() == 11
    status = c.status()
    assert proc.pid not in {t["pid"] for t in status["targets"]}
    check_mode(status)
