"""Watches against the real daemon and real programs: exact counts, sharing, overcommit,
threads.

Every test here runs the daemon (``daemon`` fixture) and one or more target programs
(``target`` fixture, tests/progs/*.c); both fixtures kill what they started even when a
test fails. The helpers at the top (:class:`Conn`, :func:`wait_until`, /proc readers) are
shared with tests/test_stop.py and tests/test_lifecycle.py.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

TIMEOUT = 10.0  # seconds for any single expected thing to happen
QUIET = 0.3  # seconds without an event that count as "nothing more is coming"

Start = Callable[..., Target]


# --------------------------------------------------------------------------- helpers


def info_int(proc: Target, key: str) -> int:
    value = proc.info[key]
    assert isinstance(value, int), (key, proc.info)
    return value


def proc_state(tid: int) -> str:
    """The state letter of /proc/TID/stat ('R', 'S', 't', 'T', 'Z', ...); '' if gone."""
    try:
        with open(f"/proc/{tid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def thread_state(pid: int, tid: int) -> str:
    try:
        with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return stat[stat.rindex(b")") + 2 :].split()[0].decode()


def tracer_pid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    raise AssertionError(f"no TracerPid in /proc/{pid}/status")


def tids_of(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def wait_until(pred: Callable[[], Any], timeout: float = TIMEOUT, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


class Conn:
    """A blocking :class:`hwbkpt.Client` plus an event backlog, for tests.

    ``expect(kind, **fields)`` returns the first event of that kind whose fields match,
    keeping every other event it reads in ``backlog`` (in order) for later ``expect`` calls.
    """

    def __init__(self, daemon: Daemon, name: str) -> None:
        self.client = hwbkpt.Client(socket=daemon.socket, name=name, timeout=TIMEOUT)
        self.name = name
        self.backlog: list[hwbkpt.Event] = []
        self.closed = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()

    @staticmethod
    def _matches(event: hwbkpt.Event, kind: str, fields: dict[str, Any]) -> bool:
        return event.kind == kind and all(event.get(k) == v for k, v in fields.items())

    def expect(self, kind: str, timeout: float = TIMEOUT, **fields: Any) -> hwbkpt.Event:
        for i, event in enumerate(self.backlog):
            if self._matches(event, kind, fields):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(
                    f"{self.name}: no {kind!r} event {fields} within {timeout} s; "
                    f"other events: {self.backlog}"
                )
            event = self.client.next_event(timeout=left)
            if event is None:
                continue
            if self._matches(event, kind, fields):
                return event
            self.backlog.append(event)

    def poll(self, timeout: float = QUIET) -> list[hwbkpt.Event]:
        """Read events until none arrives for ``timeout`` seconds; return backlog + those."""
        events, self.backlog = self.backlog, []
        while (event := self.client.next_event(timeout=timeout)) is not None:
            events.append(event)
        return events

    def none_of(self, kind: str, timeout: float = QUIET) -> None:
        """Assert no event of ``kind`` arrives within ``timeout`` seconds (others are kept)."""
        events = self.poll(timeout)
        bad = [e for e in events if e.kind == kind]
        self.backlog = [e for e in events if e.kind != kind]
        assert not bad, f"{self.name}: unexpected {kind} events: {bad}"


@pytest.fixture(name="connect")
def connect_fixture(daemon: Daemon) -> Iterator[Callable[[str], Conn]]:
    """Factory of :class:`Conn` to the test's daemon; every one is closed at teardown."""
    made: list[Conn] = []

    def make(name: str = "test") -> Conn:
        conn = Conn(daemon, name)
        made.append(conn)
        return conn

    try:
        yield make
    finally:
        for conn in made:
            conn.close()


def slots_of(conn: Conn, pid: int, tid: int) -> tuple[list[dict[str, Any]], list[int]]:
    """(slots, pending) of thread ``tid`` of target ``pid`` in the daemon's status."""
    for target in conn.status()["targets"]:
        if target["pid"] == pid:
            for thread in target["threads"]:
                if thread["tid"] == tid:
                    return thread["slots"], thread["pending"]
    raise AssertionError(f"thread {tid} of {pid} not in status")


def finish(proc: Target, *lines: str, code: int = 0) -> None:
    """Release the program's remaining gate(s) and check it exits with ``code``."""
    for _ in lines:
        proc.go()
    assert proc.wait(TIMEOUT) == code


# --------------------------------------------------------------------------- 1. exact counts


@pytest.mark.timeout(60)
def test_count_mode_counts_exactly(target: Start, connect: Callable[[str], Conn]) -> None:
    n = 2000
    proc = target("writer", n, "gate2")
    c = connect("counter")
    w = c.watch(proc.pid, info_int(proc, "addr"), mode="count")
    assert w.state == "installed"
    proc.go()
    assert proc.line() == f"done var={n} pair0=0"
    assert w.count() == n
    assert w.count() == n  # reading twice does not count twice
    finish(proc, "gate2")


@pytest.mark.timeout(60)
def test_notify_mode_delivers_every_hit(target: Start, connect: Callable[[str], Conn]) -> None:
    n = 2000
    proc = target("writer", n, "gate2")
    c = connect("notifier")
    addr = info_int(proc, "addr")
    w = c.watch(proc.pid, addr, mode="notify")
    assert w.state == "installed"
    proc.go()
    assert proc.line() == f"done var={n} pair0=0"
    hits = lost = 0
    deadline = time.monotonic() + TIMEOUT
    while hits + lost < n and time.monotonic() < deadline:
        event = c.client.next_event(timeout=0.5)
        if event is None:
            continue
        if event.kind == "hit":
            assert event.watches == [w.id]
            assert event.tid == proc.pid
            hits += 1
        elif event.kind == "lost":
            lost += event.count
    # Nothing more may come: never more hits than writes.
    for event in c.poll():
        if event.kind == "hit":
            hits += 1
        elif event.kind == "lost":
            lost += event.count
    assert hits <= n
    assert n - lost >= 0.99 * n, f"{lost} of {n} hits lost"
    assert hits + lost == n, f"{hits} hits + {lost} lost != {n} writes"
    assert w.count() == n
    finish(proc, "gate2")


@pytest.mark.timeout(90)
def test_stop_mode_stops_exactly(target: Start, connect: Callable[[str], Conn]) -> None:
    n = 200
    proc = target("writer", n, "gate2")
    c = connect("stopper")
    addr = info_int(proc, "addr")
    w = c.watch(proc.pid, addr, mode="stop")
    assert w.state == "installed"
    proc.go()
    for i in range(1, n + 1):
        ev = c.expect("stop")
        assert ev.tid == proc.pid
        assert ev.pid == proc.pid
        assert ev.watches == [w.id]
        assert ev.reason == "watch"
        # The store has completed when the thread stops (data breakpoints trap after).
        assert int.from_bytes(c.read_memory(proc.pid, addr, 8), "little") == i
        c.resume(proc.pid)
    assert proc.line() == f"done var={n} pair0=0"
    c.none_of("stop")
    assert w.count() == n
    finish(proc, "gate2")


# --------------------------------------------------------------------------- 2. sharing


@pytest.mark.timeout(60)
def test_equal_keys_share_one_slot(target: Start, connect: Callable[[str], Conn]) -> None:
    n = 2000
    proc = target("writer", n, "gate2")
    addr, addr2 = info_int(proc, "addr"), info_int(proc, "addr2")
    a, b, c = connect("a"), connect("b"), connect("c")
    wa = a.watch(proc.pid, addr, mode="count")
    wb = b.watch(proc.pid, addr, mode="count")
    slots, pending = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 1, slots
    assert sorted(slots[0]["watches"]) == sorted([wa.id, wb.id])
    assert slots[0]["addr"] == addr
    assert slots[0]["length"] == 8
    assert slots[0]["access"] == "w"
    assert pending == []
    wc = c.watch(proc.pid, addr2, mode="count")
    slots, pending = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 2, slots
    by_addr = {s["addr"]: s for s in slots}
    assert sorted(by_addr[addr]["watches"]) == sorted([wa.id, wb.id])
    assert by_addr[addr2]["watches"] == [wc.id]
    assert pending == []
    proc.go()
    assert proc.line() == f"done var={n} pair0=0"
    assert wa.count() == n
    assert wb.count() == n
    assert wc.count() == n
    # A watch that joins a shared slot later counts only its own hits.
    wd = c.watch(proc.pid, addr, mode="count")
    assert wd.count() == 0
    assert len(slots_of(a, proc.pid, proc.pid)[0]) == 2
    finish(proc, "gate2")


def collect_hits(conn: Conn, wid: int, n: int) -> tuple[int, int]:
    """(hits, lost) for watch ``wid`` until ``n`` are accounted for and the stream is quiet."""
    hits = lost = 0
    deadline = time.monotonic() + TIMEOUT
    while hits + lost < n and time.monotonic() < deadline:
        event = conn.client.next_event(timeout=0.5)
        if event is None:
            continue
        if event.kind == "hit":
            assert event.watches == [wid], event
            hits += 1
        elif event.kind == "lost":
            lost += event.count
    for event in conn.poll():
        if event.kind == "hit":
            hits += 1
        elif event.kind == "lost":
            lost += event.count
    return hits, lost


@pytest.mark.timeout(60)
def test_shared_notify_slot_each_sees_every_hit(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    n = 2000
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, addr, mode="notify")
    wb = b.watch(proc.pid, addr, mode="notify")
    slots, _ = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 1
    assert sorted(slots[0]["watches"]) == sorted([wa.id, wb.id])
    proc.go()
    assert proc.line() == f"done var={n} pair0=0"
    for conn, w in ((a, wa), (b, wb)):
        hits, lost = collect_hits(conn, w.id, n)
        assert hits <= n
        assert n - lost >= 0.99 * n, f"{conn.name}: {lost} of {n} hits lost"
        assert hits + lost == n, f"{conn.name}: {hits} hits + {lost} lost != {n} writes"
        assert w.count() == n
    finish(proc, "gate2")


@pytest.mark.timeout(60)
def test_shared_slot_of_mixed_modes(target: Start, connect: Callable[[str], Conn]) -> None:
    """A stop watch and a count watch share a slot: N stops for one, count N for the other."""
    n = 100
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    a, b, c = connect("stopper"), connect("counter"), connect("notifier")
    wa = a.watch(proc.pid, addr, mode="stop")
    wb = b.watch(proc.pid, addr, mode="count")
    wc = c.watch(proc.pid, addr, mode="notify")
    slots, _ = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 1
    assert slots[0]["mode"] == "stop"
    assert sorted(slots[0]["watches"]) == sorted([wa.id, wb.id, wc.id])
    proc.go()
    for _ in range(n):
        ev = a.expect("stop")
        assert ev.watches == [wa.id]
        a.resume(proc.pid)
    assert proc.line() == f"done var={n} pair0=0"
    a.none_of("stop")
    assert not [e for e in b.poll(0.05) if e.kind == "stop"]
    hits, lost = collect_hits(c, wc.id, n)
    assert (hits, lost) == (n, 0)  # a stopping slot reports each hit at its stop
    assert wa.count() == n
    assert wb.count() == n
    assert wc.count() == n
    finish(proc, "gate2")


# --------------------------------------------------------------------------- 3. overcommit


@pytest.mark.timeout(60)
def test_overcommit_pending_and_preemption(target: Start, connect: Callable[[str], Conn]) -> None:
    proc = target("writer", 10, "gate2")
    var, var2, pair = info_int(proc, "addr"), info_int(proc, "addr2"), info_int(proc, "pair")
    a, b, c = connect("a"), connect("b"), connect("c")
    # Five distinct keys on the one thread: four from A, the latest (from B) is pending.
    wa = [
        a.watch(proc.pid, var, mode="count"),
        a.watch(proc.pid, var2, mode="count"),
        a.watch(proc.pid, pair, mode="count"),
        a.watch(proc.pid, pair + 8, mode="count"),
    ]
    assert [w.state for w in wa] == ["installed"] * 4
    wb = b.watch(proc.pid, var, access="rw", mode="count")
    assert wb.state == "pending"
    slots, pending = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 4
    assert pending == [wb.id]
    # Removing one installs the pending one; its owner is told.
    wa[1].remove()
    ev = b.expect("installed", watch=wb.id)
    assert ev.tid == proc.pid
    slots, pending = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 4
    assert pending == []
    assert any(s["watches"] == [wb.id] and s["access"] == "rw" for s in slots)
    # A higher-priority key preempts the lowest (equal priorities: the latest request, B's).
    wc = c.watch(proc.pid, var2, mode="count", priority=10)
    assert wc.state == "installed"
    ev = b.expect("uninstalled", watch=wb.id)
    assert ev.reason == "preempted"
    assert ev.tid == proc.pid
    a.none_of("uninstalled")
    slots, pending = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 4
    assert pending == [wb.id]
    assert [w["state"] for w in b.watches()] == ["pending"]
    # B gets the slot back when it frees.
    wc.remove()
    b.expect("installed", watch=wb.id)
    slots, pending = slots_of(a, proc.pid, proc.pid)
    assert len(slots) == 4
    assert pending == []
    # And the pending-then-installed watch really counts: 10 writes of var (rw sees them).
    proc.go()
    assert proc.line() == "done var=10 pair0=0"
    assert wa[0].count() == 10
    assert wb.count() == 11  # rw: the 10 writes and the one read by the final printf
    finish(proc, "gate2")


# --------------------------------------------------------------------------- 7. threads


@pytest.mark.timeout(60)
def test_process_scope_counts_every_thread(target: Start, connect: Callable[[str], Conn]) -> None:
    t, n = 8, 1000
    proc = target("tgate", t, n)
    c = connect("threads")
    w = c.watch(proc.pid, info_int(proc, "addr"), mode="count")
    assert w.state == "installed"
    proc.go()
    tids = sorted(int(proc.line().split()[0].split("=")[1]) for _ in range(t))
    assert proc.line() == "ready"
    # Every new thread got the process-scope watch before it ran.
    threads = {tid: state for tid, state in c.watches()[0]["threads"].items()}
    assert set(tids) <= set(threads)
    assert all(threads[tid] == "installed" for tid in tids)
    proc.go()
    assert proc.line() == f"done var={n}"
    # The worker threads have exited: their hits were credited when they went.
    assert w.count() == t * n
    finish(proc, "gate3")


@pytest.mark.timeout(60)
def test_thread_scope_counts_only_its_thread(target: Start, connect: Callable[[str], Conn]) -> None:
    t, n = 8, 1000
    proc = target("tgate", t, n)
    addr = info_int(proc, "addr")
    c = connect("threads")
    proc.go()
    lines = [proc.line() for _ in range(t)]
    words = [dict(w.split("=") for w in line.split()) for line in lines]
    tids = {int(w["idx"]): int(w["tid"]) for w in words}
    assert proc.line() == "ready"
    one = tids[3]
    w_one = c.watch(proc.pid, addr, mode="count", tid=one)
    assert w_one.state == "installed"
    assert set(w_one.threads) == {one}
    w_main = c.watch(proc.pid, addr, mode="count", tid=proc.pid)  # main never writes var
    w_all = c.watch(proc.pid, addr, mode="count")
    proc.go()
    assert proc.line() == f"done var={n}"
    assert w_one.count() == n
    assert w_main.count() == 0
    assert w_all.count() == t * n
    finish(proc, "gate3")


@pytest.mark.timeout(90)
def test_process_scope_stops_on_every_thread(target: Start, connect: Callable[[str], Conn]) -> None:
    """Stops of several threads at once: every write of every thread is one stop."""
    t, n = 4, 25
    proc = target("tgate", t, n)
    addr = info_int(proc, "addr")
    c = connect("stopper")
    w = c.watch(proc.pid, addr, mode="stop")
    proc.go()
    tids = {int(dict(x.split("=") for x in proc.line().split())["tid"]) for _ in range(t)}
    assert proc.line() == "ready"
    proc.go()
    per_thread = dict.fromkeys(tids, 0)
    for _ in range(t * n):
        ev = c.expect("stop")
        assert ev.watches == [w.id]
        per_thread[ev.tid] += 1
        c.resume(ev.tid)
    assert proc.line() == f"done var={n}"
    c.none_of("stop")
    assert per_thread == dict.fromkeys(tids, n)
    assert w.count() == t * n
    finish(proc, "gate3")
