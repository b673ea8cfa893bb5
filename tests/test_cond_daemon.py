"""Conditions through the real daemon, on both paths: evaluated in the kernel by a BPF
program, and (``hwbkptd --no-bpf``) at a ptrace stop of every hit. Same results expected.

The target stores 0, 1, ..., 19,999 to one 8-byte variable (tests/progs/condwriter.c).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import trio

import hwbkpt
from hwbkptd import _kernel
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import TIMEOUT, Conn, info_int, slots_of

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace, perf and bpf"),
]

Start = Callable[..., Target]
N = 20_000


def _paths() -> list[object]:
    why = _kernel.bpf_available() if os.geteuid() == 0 else "not root"
    return [
        pytest.param("bpf", marks=pytest.mark.skipif(why is not None, reason=f"no BPF: {why}")),
        "ptrace",
    ]


@pytest.fixture(params=_paths())
def path(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def connect(daemon_factory: Callable[..., Daemon], path: str) -> Iterator[Callable[[str], Conn]]:
    """Clients of one daemon evaluating conditions on ``path``."""
    daemon = daemon_factory(*(["--no-bpf"] if path == "ptrace" else []))
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


@pytest.mark.timeout(240)
def test_clients_with_different_conditions_share_one_slot(
    target: Start, connect: Callable[[str], Conn], path: str
) -> None:
    proc = target("condwriter", "seq", N)
    addr = info_int(proc, "addr")
    once, last, changes, never, every = (connect(n) for n in ("a", "b", "c", "d", "e"))
    w_once = once.watch(proc.pid, addr, mode="stop", condition="new == 1234")
    w_last = last.watch(proc.pid, addr, mode="stop", condition="new >= 19990")
    w_changes = changes.watch(proc.pid, addr, mode="count", condition="changed")
    w_never = never.watch(proc.pid, addr, mode="stop", condition="new == -1 and not changed")
    w_every = every.watch(proc.pid, addr, mode="count")
    slots, pending = slots_of(once, proc.pid, proc.pid)
    assert pending == []
    assert len(slots) == 1
    assert slots[0]["conditions"] == path
    assert sorted(slots[0]["watches"]) == sorted(
        w.id for w in (w_once, w_last, w_changes, w_never, w_every)
    )
    described = {d["id"]: d for d in once.watches()}
    assert described[w_once.id]["condition"] == "new == 1234"
    assert described[w_once.id]["path"] == path
    assert once.status()["conditions"].startswith(path)

    proc.go()
    stop = once.expect("stop", timeout=60)
    assert stop.watches == [w_once.id]
    assert (stop.get("new"), stop.get("old")) == (1234, 1233)
    assert int.from_bytes(once.read_memory(proc.pid, addr, 8), "little") == 1234
    once.resume(proc.pid)
    for value in range(19_990, N):
        stop = last.expect("stop", timeout=60)
        assert stop.watches == [w_last.id]
        assert (stop.get("new"), stop.get("old")) == (value, value - 1)
        last.resume(proc.pid)
    assert proc.line(timeout=60) == "done"
    once.none_of("stop")
    last.none_of("stop")
    never.none_of("stop")
    assert w_once.count() == 1
    assert w_last.count() == 10
    assert w_changes.count() == N - 1  # the first store, 0 over 0, is not a change
    assert w_never.count() == 0
    assert w_every.count() == N
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_condition_set_changes_while_installed(
    target: Start, connect: Callable[[str], Conn]
) -> None:
    """A watch joining a slot regenerates its program; ``hits`` goes on counting."""
    proc = target("condwriter", "seq", 100)
    addr = info_int(proc, "addr")
    a, b = connect("a"), connect("b")
    wa = a.watch(proc.pid, addr, mode="count", condition="hits < 5 and new >= 10")
    wb = b.watch(proc.pid, addr, mode="stop", condition="new == 50")
    proc.go()
    b.expect("stop", timeout=60)
    wc = b.watch(proc.pid, addr, mode="count", condition="new & 1")  # joins while stopped
    b.resume(proc.pid)
    assert proc.line(timeout=60) == "done"
    assert wa.count() == 5
    assert wb.count() == 1
    assert wc.count() == 25  # odd values 51..99
    proc.go()
    assert proc.wait(TIMEOUT) == 0


def test_bad_conditions_are_einval(target: Start, connect: Callable[[str], Conn]) -> None:
    proc = target("condwriter", "seq", 1)
    addr = info_int(proc, "addr")
    c = connect("c")
    with pytest.raises(hwbkpt.InvalidArgumentError, match=r"column 7: expected .*found '='"):
        c.watch(proc.pid, addr, mode="stop", condition="new === 3")
    with pytest.raises(hwbkpt.InvalidArgumentError, match="one of new, old"):
        c.watch(proc.pid, addr, mode="count", condition="value == 3")
    with pytest.raises(hwbkpt.InvalidArgumentError, match="execute"):
        c.watch(proc.pid, addr, length=1, access="x", mode="stop", condition="new == 3")
    with pytest.raises(hwbkpt.InvalidArgumentError, match="string"):
        c.call("watch", pid=proc.pid, addr=addr, mode="stop", condition=3)
    assert c.watches() == []
    proc.go()
    assert proc.line() == "done"
    proc.go()
    assert proc.wait(TIMEOUT) == 0


def collect(conn: Conn, n: int, timeout: float = 60) -> tuple[list[hwbkpt.Event], int]:
    """``hit`` events (and the count of lost ones) until ``n`` came, then quiet."""
    hits: list[hwbkpt.Event] = []
    lost = 0
    deadline = time.monotonic() + timeout
    while len(hits) + lost < n and time.monotonic() < deadline:
        event = conn.client.next_event(timeout=0.5)
        if event is None:
            continue
        if event.kind == "hit":
            hits.append(event)
        elif event.kind == "lost":
            lost += event.count
    for event in conn.poll():
        if event.kind == "hit":
            hits.append(event)
    return hits, lost


def read_while_writing(
    proc: Target, wanted: dict[str, tuple[Conn, int]]
) -> dict[str, tuple[list[hwbkpt.Event], int]]:
    """Release the program; each client reads its stream in a thread of its own meanwhile
    (a client that does not read loses events once its queue is full, by design)."""
    streams: dict[str, tuple[list[hwbkpt.Event], int]] = {}
    readers = [
        threading.Thread(target=lambda k=k, c=c, n=n: streams.__setitem__(k, collect(c, n)))
        for k, (c, n) in wanted.items()
    ]
    for reader in readers:
        reader.start()
    proc.go()
    assert proc.line(timeout=60) == "done"
    for reader in readers:
        reader.join(90)
    return streams


@pytest.mark.timeout(240)
def test_notify_streams_only_true_hits_with_values(
    target: Start, connect: Callable[[str], Conn], path: str
) -> None:
    proc = target("condwriter", "seq", N)
    addr = info_int(proc, "addr")
    last, sparse = connect("last"), connect("sparse")
    w_last = last.watch(proc.pid, addr, mode="notify", condition="new >= 19990")
    w_sparse = sparse.watch(proc.pid, addr, mode="notify", condition="new & 255 == 0")
    w_count = sparse.watch(proc.pid, addr, mode="count")
    slots, _ = slots_of(last, proc.pid, proc.pid)
    assert len(slots) == 1
    assert slots[0]["conditions"] == path
    streams = read_while_writing(proc, {"last": (last, 10), "sparse": (sparse, 79)})
    hits, lost = streams["last"]
    assert lost == 0
    assert [(e.get("new"), e.get("old")) for e in hits] == [(v, v - 1) for v in range(19990, N)]
    assert all(e.watches == [w_last.id] and e.tid == proc.pid for e in hits)
    hits, lost = streams["sparse"]
    assert lost == 0
    assert [e.get("new") for e in hits] == list(range(0, N, 256))
    assert [e.get("old") for e in hits] == [0] + [v - 1 for v in range(256, N, 256)]
    assert w_last.count() == 10
    assert w_sparse.count() == 79
    assert w_count.count() == N
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(240)
def test_notify_every_change_at_full_speed(
    target: Start, connect: Callable[[str], Conn], path: str
) -> None:
    """19,999 changes, each a hit event with its values or counted as lost: never more,
    never fewer. Losses happen only when the daemon cannot keep up (a busy machine): how
    many is a speed, measured by `make bench` (cond: notify with values), not asserted."""
    proc = target("condwriter", "seq", N)
    addr = info_int(proc, "addr")
    c = connect("changes")
    w = c.watch(proc.pid, addr, mode="notify", condition="changed")
    hits, lost = read_while_writing(proc, {"changes": (c, N - 1)})["changes"]
    assert len(hits) + lost == N - 1
    assert hits
    assert all(e.get("new") == e.get("old") + 1 for e in hits)
    assert [e.get("new") for e in hits] == sorted(e.get("new") for e in hits)
    assert w.count() == N - 1
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
def test_process_scope_each_thread_has_its_own_program(
    target: Start, connect: Callable[[str], Conn], path: str
) -> None:
    """New threads get the condition too, and ``hits`` is per thread: each of 8 threads
    counts exactly its first 5 stores. (Not ``new``: the threads store to one variable at
    once, so the value read at a hit may already be another thread's.) A second condition
    on a thread id joins while the threads exist: every thread's program is replaced."""
    t, n = 8, 1000
    proc = target("tgate", t, n)
    c = connect("threads")
    w = c.watch(proc.pid, info_int(proc, "addr"), mode="count", condition="hits < 5")
    proc.go()
    tids = sorted(int(proc.line().split()[0].split("=")[1]) for _ in range(t))
    assert proc.line() == "ready"
    threads = c.watches()[0]["threads"]
    assert all(threads[tid] == "installed" for tid in tids)
    one = c.watch(proc.pid, info_int(proc, "addr"), mode="count", condition=f"tid == {tids[3]}")
    proc.go()
    assert proc.line(timeout=60) == f"done var={n}"
    assert w.count() == 5 * t
    assert one.count() == n
    proc.go()
    assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(120)
async def test_trio_client_watch_region_with_a_condition(
    target: Start, daemon_factory: Callable[..., Daemon]
) -> None:
    """The trio client's ``watch_region``: a 16-byte region is two 8-byte pieces, each
    evaluating the condition on its own bytes; only the first piece is ever written."""
    d = daemon_factory()
    proc = target("condwriter", "seq", 2000)
    addr = info_int(proc, "addr")
    with trio.fail_after(90):
        async with hwbkpt.AsyncClient(d.socket) as c:
            first, second = await c.watch_region(
                proc.pid, addr, 16, mode="stop", condition="new == 1500 or new == 1999"
            )
            assert first.condition == "new == 1500 or new == 1999"
            proc.go()
            for value in (1500, 1999):
                event = await c.next_event()
                assert event.kind == "stop"
                assert event.watches == [first.id]
                assert (event.get("new"), event.get("old")) == (value, value - 1)
                await c.resume(event.tid)
            assert await trio.to_thread.run_sync(proc.line) == "done"
            assert await first.count() == 2
            assert await second.count() == 0
    proc.go()
    assert proc.wait(TIMEOUT) == 0
