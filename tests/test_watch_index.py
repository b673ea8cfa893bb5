"""The engine's index of watches by scope (``TargetRec.wide``/``scoped``, issue 13).

A request about one thread looks at that thread's watches only. These tests check, on the
fake kernel, that the index stays equal to a scan of every watch of the process through
every way a watch comes and goes (thread-scope and process-wide watches, removal, client
disconnect, thread exit, clone, exec, detach), and that the engine and the engine as it
was before (``ScanEngine``: every watch scanned, the former ``_reconcile``) do exactly the
same thing: same kernel calls, same slots, same events in the same order, step by step
over random sequences of operations.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hwbkpt_proto import HwbkptError, NoSpaceError
from hwbkptd._alloc import CAPACITY, Want, choose
from hwbkptd._engine import Engine
from hwbkptd._model import Access, Mode, Spec
from hwbkptd._records import TargetRec, ThreadRec, ThreadState, WatchRec
from tests.fakes import Harness

PID = 300
X = Spec(0x1000, 8, Access.WRITE)
Y = Spec(0x2000, 8, Access.WRITE)
Z = Spec(0x3000, 4, Access.READWRITE)


def brute(target: TargetRec, tid: int) -> list[WatchRec]:
    """What the index replaces: every watch of the process, kept if it applies to ``tid``."""
    return [w for w in target.watches.values() if w.applies_to(tid)]


def check_index(engine: Engine) -> None:
    """Every target's index equals a recomputation from its watches, order included."""
    for target in engine.targets.values():
        wide = [w for w in target.watches.values() if w.tid is None]
        assert list(target.wide.values()) == wide
        tids = {w.tid for w in target.watches.values() if w.tid is not None}
        assert set(target.scoped) == tids, "no empty or stale per-thread entry"
        for tid in tids:
            mine = [w for w in target.watches.values() if w.tid == tid]
            assert list(target.scoped[tid].values()) == mine
        for tid in set(target.threads) | tids:
            assert list(target.watches_of(tid)) == brute(target, tid)
        places = [w.place for w in target.watches.values()]
        assert places == sorted(places)
        for w in target.watches.values():
            assert w.ended is None
            assert engine._watches[w.id] is w


def check_slots(engine: Engine) -> None:
    """Each slot's watches are those of its spec that apply to its thread, in creation
    order (the order of a hit's events), as the scan of every watch gave them."""
    for target in engine.targets.values():
        for thread in target.threads.values():
            if thread.state is ThreadState.NEW or thread.detaching:
                continue
            for spec, slot in thread.slots.items():
                assert slot.watches == [w for w in brute(target, thread.tid) if w.spec == spec]


def setup(nthreads: int = 3, clients: int = 3) -> tuple[Harness, list[int]]:
    h = Harness()
    tids = h.kernel.spawn(PID, nthreads)
    for cid in range(1, clients + 1):
        h.engine.add_client(cid)
    return h, tids


def index_of(h: Harness) -> tuple[list[int], dict[int, list[int]]]:
    target = h.engine.targets[PID]
    return list(target.wide), {tid: list(ws) for tid, ws in target.scoped.items()}


# ====================================================================== stories


def test_thread_scope_and_process_wide_watches_are_indexed_apart() -> None:
    h, tids = setup()
    a = h.engine.watch(1, PID, X, Mode.COUNT)
    b = h.engine.watch(2, PID, Y, Mode.COUNT, tid=tids[1])
    c = h.engine.watch(3, PID, Y, Mode.COUNT, tid=tids[1])
    d = h.engine.watch(1, PID, Z, Mode.COUNT, tid=tids[2])
    h.settle()
    assert index_of(h) == ([a.id], {tids[1]: [b.id, c.id], tids[2]: [d.id]})
    target = h.engine.targets[PID]
    assert list(target.watches_of(tids[0])) == [a]
    assert list(target.watches_of(tids[1])) == [a, b, c]
    assert list(target.watches_of(tids[2])) == [a, d]
    check_index(h.engine)
    check_slots(h.engine)


def test_removal_keeps_the_index_and_drops_empty_entries() -> None:
    h, tids = setup()
    a = h.engine.watch(1, PID, X, Mode.COUNT)
    b = h.engine.watch(2, PID, Y, Mode.COUNT, tid=tids[1])
    c = h.engine.watch(2, PID, Z, Mode.COUNT, tid=tids[1])
    h.settle()
    h.engine.unwatch(2, b.id)
    assert index_of(h) == ([a.id], {tids[1]: [c.id]})
    h.engine.unwatch(2, c.id)
    assert index_of(h) == ([a.id], {})
    assert {e.spec for e in h.kernel.open_events(tids[1])} == {X}
    check_index(h.engine)


def test_order_follows_creation_across_scopes() -> None:
    """A thread's watches come in creation order whatever their scope: the slot's watch
    list, and with it the ``watches`` of a hit's event, are as before the index."""
    h, tids = setup()
    a = h.engine.watch(1, PID, X, Mode.NOTIFY, tid=tids[1])
    b = h.engine.watch(2, PID, X, Mode.NOTIFY)
    c = h.engine.watch(1, PID, X, Mode.NOTIFY, tid=tids[1])
    h.settle()
    assert list(h.engine.targets[PID].watches_of(tids[1])) == [a, b, c]
    assert h.engine._threads[tids[1]].slots[X].watches == [a, b, c]
    h.take()
    h.kernel.hit(tids[1], X.addr, 8, "w")
    for event in h.kernel.open_events(tids[1]):
        h.engine.on_samples(event.token, event.samples, 0)
    assert h.take(1) == [("hit", {"watches": [a.id, c.id], "tid": tids[1], "ip": 0x401000,
                                  "time": 42})]  # fmt: skip
    assert h.take(2) == [("hit", {"watches": [b.id], "tid": tids[1], "ip": 0x401000, "time": 42})]


def test_client_disconnect_removes_its_watches_from_the_index() -> None:
    h, tids = setup()
    a = h.engine.watch(1, PID, X, Mode.COUNT)
    h.engine.watch(2, PID, Y, Mode.COUNT)
    h.engine.watch(2, PID, Z, Mode.COUNT, tid=tids[2])
    c = h.engine.watch(3, PID, Z, Mode.COUNT, tid=tids[2])
    h.settle()
    h.engine.remove_client(2)
    h.settle()
    assert index_of(h) == ([a.id], {tids[2]: [c.id]})
    assert {e.spec for e in h.kernel.open_events(tids[0])} == {X}
    assert {e.spec for e in h.kernel.open_events(tids[2])} == {X, Z}
    check_index(h.engine)
    check_slots(h.engine)


def test_thread_exit_ends_only_that_threads_watches() -> None:
    h, tids = setup()
    a = h.engine.watch(1, PID, X, Mode.COUNT)
    b = h.engine.watch(2, PID, Y, Mode.COUNT, tid=tids[1])
    c = h.engine.watch(2, PID, Y, Mode.COUNT, tid=tids[2])
    h.settle()
    h.take()
    h.kernel.exit_thread(tids[1])
    h.settle()
    assert index_of(h) == ([a.id], {tids[2]: [c.id]})
    assert b.state == "ended"
    assert b.end_info() == {"reason": "thread-exit", "code": 0, "signal": None}
    assert a.states == {tids[0]: "installed", tids[2]: "installed"}
    assert h.take(2) == [("uninstalled", {"watch": b.id, "tid": tids[1], "reason": "thread-exit"})]
    check_index(h.engine)


def test_clone_gives_the_new_thread_process_wide_watches_only() -> None:
    h, tids = setup(2)
    a = h.engine.watch(1, PID, X, Mode.COUNT)
    b = h.engine.watch(2, PID, Y, Mode.COUNT, tid=tids[1])
    h.settle()
    new = h.kernel.clone(tids[1])
    h.settle()
    assert list(h.engine.targets[PID].watches_of(new)) == [a]
    assert a.states[new] == "installed"
    assert new not in b.states
    assert {e.spec for e in h.kernel.open_events(new)} == {X}
    # A thread-scope watch on the new thread enters the index under its tid.
    c = h.engine.watch(3, PID, Z, Mode.COUNT, tid=new)
    assert index_of(h) == ([a.id], {tids[1]: [b.id], new: [c.id]})
    check_index(h.engine)
    check_slots(h.engine)


def test_exec_empties_the_index() -> None:
    h, [tid] = setup(1)
    a = h.engine.watch(1, PID, X, Mode.COUNT)
    b = h.engine.watch(2, PID, Y, Mode.COUNT, tid=tid)
    h.settle()
    target = h.engine.targets[PID]
    h.kernel.exec(tid)
    h.settle()
    assert (a.state, b.state) == ("ended", "ended")
    assert (target.watches, target.wide, target.scoped) == ({}, {}, {})
    # A new watch on the new program starts a fresh index.
    c = h.engine.watch(1, PID, X, Mode.COUNT, tid=tid)
    h.settle()
    assert index_of(h) == ([], {tid: [c.id]})
    check_index(h.engine)


def test_detach_and_attach_again_start_from_an_empty_index() -> None:
    h, tids = setup()
    a = h.engine.watch(1, PID, X, Mode.COUNT, tid=tids[1])
    h.settle()
    h.engine.unwatch(1, a.id)
    h.settle()
    assert h.engine.targets == {}
    assert h.kernel.traced() == []
    b = h.engine.watch(1, PID, Y, Mode.COUNT)
    h.settle()
    assert index_of(h) == ([b.id], {})
    check_index(h.engine)


def test_a_failed_raw_swap_restores_watches_at_the_end_of_the_order() -> None:
    """``replace_raw`` undoes a swap the kernel refused by adding the removed watches back
    — after the others, as before the index (their place says so)."""
    h, tids = setup()
    tid = tids[1]
    a = h.engine.watch(1, PID, X, Mode.STOP, tid=tid)
    [r] = h.engine.replace_raw(2, tid, [], [(Y, 0, None)])
    b = h.engine.watch(3, PID, Z, Mode.STOP, tid=tid)
    h.settle()
    h.kernel.external_slots[tid] = 2  # others took slots: the kernel refuses the new one
    with pytest.raises(NoSpaceError):
        h.engine.replace_raw(2, tid, [r], [(Spec(0x4000, 8, Access.WRITE), 0, None)])
    target = h.engine.targets[PID]
    assert [w.id for w in target.watches_of(tid)] == [a.id, b.id, r.id]
    check_index(h.engine)
    check_slots(h.engine)


# ====================================================================== differential machine


class ScanTarget(TargetRec):
    """A target answering :meth:`watches_of` by scanning every watch: the engine before
    the index. Its own index is still kept (and checked against the scan)."""

    __slots__ = ()

    def watches_of(self, tid: int) -> list[WatchRec]:
        return brute(self, tid)


class ScanEngine(Engine):
    """The engine as it was before issue 13: its targets scan every watch (see
    :class:`ScanTarget`) and :meth:`_reconcile` is the former one (``Want`` objects,
    :func:`choose`, a second sort), the reference the new one must match exactly."""

    def _ensure_target(self, pid: int) -> TargetRec:
        target = super()._ensure_target(pid)
        target.__class__ = ScanTarget
        return target

    def _reconcile(
        self, thread: ThreadRec, fresh: Collection[WatchRec] = (), *, again: bool = True
    ) -> None:
        """main's _reconcile before issue 13, verbatim but for this docstring."""
        if thread.state is ThreadState.NEW or thread.detaching:
            return
        thread.freed = False
        target = self.targets[thread.pid]
        by_spec: dict[Spec, list[WatchRec]] = defaultdict(list)
        for watch in target.watches.values():
            if watch.applies_to(thread.tid):
                by_spec[watch.spec].append(watch)
        wants = [
            Want(spec, max(w.priority for w in ws), min(w.seq for w in ws))
            for spec, ws in by_spec.items()
        ]
        chosen = choose(wants, thread.busy)
        for spec in list(thread.slots):
            if spec not in chosen:
                self._close_slot(thread, spec)
        ranked = sorted(wants, key=lambda w: w.rank)
        rank = {w.spec: w.rank for w in ranked}
        stopped = thread.state is ThreadState.STOPPED
        for want in ranked:
            spec = want.spec
            if len(thread.slots) >= CAPACITY and spec not in thread.slots:
                break
            if spec in thread.busy:
                continue
            watches = by_spec[spec]
            mode = max(w.mode for w in watches)
            filtered, flags = self._filter_of(watches)
            if filtered and not self._bpf:
                mode = Mode.STOP  # the port evaluates the conditions at each hit's stop
            slot = thread.slots.get(spec)
            if slot is not None and any(w not in slot.watches for w in watches):
                self._refresh(slot)  # baseline: earlier hits are not the newcomer's
            if slot is not None and (
                slot.mode != mode or slot.filtered != filtered or slot.flags != flags
            ):
                # A new set of conditions is a new program, and an event's program cannot
                # be replaced (PERF_EVENT_IOC_SET_BPF answers EEXIST): reopen, as for a mode.
                if not stopped:
                    self._reopen_later(thread)
                    slot.watches = watches
                    continue
                self._close_slot(thread, spec)
                slot = None
            if slot is None:
                slot = self._open_slot(thread, spec, mode, filtered, flags)
                if slot is None and spec in thread.busy:
                    # The kernel is out of slots (someone outside the daemon holds some):
                    # our own lower-ranked slot gives way, as priority says (DESIGN 5.1).
                    lower = [s for s in thread.slots if rank.get(s, (0, 0)) > want.rank]
                    if lower:
                        self._close_slot(thread, max(lower, key=lambda s: rank[s]))
                        thread.busy.discard(spec)
                        slot = self._open_slot(thread, spec, mode, filtered, flags)
                if slot is None:
                    continue
            slot.watches = watches
        if thread.freed and thread.busy and again:
            # A slot closed during this pass: what the kernel refused may fit now.
            thread.busy.clear()
            self._reconcile(thread, fresh, again=False)
            return
        # Tell owners about every change of state on this thread.
        for spec, watches in by_spec.items():
            installed = spec in thread.slots
            for watch in watches:
                old = watch.states.get(thread.tid)
                new = "installed" if installed else "pending"
                if not installed:
                    reason = "busy" if spec in thread.busy else "preempted"
                    watch.reasons[thread.tid] = reason
                else:
                    watch.reasons.pop(thread.tid, None)
                watch.states[thread.tid] = new
                if old == new or watch in fresh:
                    continue  # a fresh watch's state is in the reply that created it
                if new == "installed":
                    self._emit(
                        watch.client, "installed", {"watch": watch.id, "tid": thread.tid}, False
                    )
                else:
                    self._emit(
                        watch.client,
                        "uninstalled",
                        {"watch": watch.id, "tid": thread.tid, "reason": watch.reasons[thread.tid]},
                        False,
                    )


SPECS = [X, Y, Z, Spec(0x1000, 4, Access.WRITE), Spec(0x5000, 1, Access.EXECUTE)]
ACCESSES = [(0x1000, 8, "w"), (0x1000, 1, "r"), (0x2000, 8, "w"), (0x3000, 4, "r")]


class IndexVsScan(RuleBasedStateMachine):
    """The same operations on the engine and on the engine as it was (:class:`ScanEngine`):
    every kernel call, every event (per client, in order) and every slot must be equal."""

    def __init__(self) -> None:
        super().__init__()
        self.hs = [Harness(), Harness()]
        self.hs[1].engine = ScanEngine(
            self.hs[1].kernel, self.hs[1]._emit, park=True, clock=lambda: 42
        )
        for h in self.hs:
            h.kernel.spawn(PID, 3)
        self.wids: list[tuple[int, int]] = []  # (client, watch id)

    @initialize()
    def start(self) -> None:
        for h in self.hs:
            for cid in (1, 2, 3):
                h.engine.add_client(cid)

    @property
    def k(self) -> Any:
        return self.hs[0].kernel

    def both(self, name: str, *args: Any, **kw: Any) -> Any:
        """Call an engine method on both; both must answer alike (or fail alike)."""
        results = []
        for h in self.hs:
            try:
                out = getattr(h.engine, name)(*args, **kw)
            except HwbkptError as err:
                out = (type(err), str(err))
            results.append(out)
        return results

    def settle(self) -> None:
        for h in self.hs:
            h.settle()

    def running(self) -> list[int]:
        return [t for t in self.k.processes.get(PID, []) if self.k.state(t) == "running"]

    @rule(
        cid=st.integers(1, 3),
        spec=st.sampled_from(SPECS),
        mode=st.sampled_from(list(Mode)),
        priority=st.integers(0, 2),
        scope=st.integers(0, 4),
    )
    def watch(self, cid: int, spec: Spec, mode: Mode, priority: int, scope: int) -> None:
        tids = self.k.processes.get(PID, [])
        tid = tids[scope] if scope < len(tids) else None
        made = self.both("watch", cid, PID, spec, mode, tid=tid, priority=priority)
        if isinstance(made[0], WatchRec):
            assert isinstance(made[1], WatchRec)
            assert (made[0].id, made[0].states) == (made[1].id, made[1].states)
            self.wids.append((cid, made[0].id))
        else:
            assert made[0] == made[1]
        self.settle()

    @precondition(lambda self: bool(self.wids))
    @rule(which=st.integers(0, 50))
    def unwatch(self, which: int) -> None:
        cid, wid = self.wids.pop(which % len(self.wids))
        self.both("unwatch", cid, wid)
        self.settle()

    @rule(cid=st.integers(1, 3))
    def reconnect(self, cid: int) -> None:
        self.both("remove_client", cid)
        self.wids = [(c, w) for c, w in self.wids if c != cid]
        self.settle()
        self.both("add_client", cid)

    @rule(which=st.integers(0, 3), access=st.sampled_from(ACCESSES))
    def hit(self, which: int, access: tuple[int, int, str]) -> None:
        tids = self.running()
        if tids:
            tid = tids[which % len(tids)]
            for h in self.hs:
                h.kernel.hit(tid, *access)
                for event in h.kernel.open_events(tid):
                    if event.samples:
                        h.engine.on_samples(event.token, list(event.samples), 0)
                        event.samples.clear()
            self.settle()

    @rule()
    def resume_all(self) -> None:
        for h in self.hs:
            for thread in list(h.engine._threads.values()):
                for cid in sorted(thread.holds):
                    h.engine.resume(cid, thread.tid)
        self.settle()

    @precondition(lambda self: len(self.k.processes.get(PID, [])) < 5)
    @rule(which=st.integers(0, 3))
    def clone(self, which: int) -> None:
        tids = self.running()
        if tids:
            for h in self.hs:
                h.kernel.clone(tids[which % len(tids)])
            self.settle()

    @rule(which=st.integers(0, 3))
    def thread_exit(self, which: int) -> None:
        tids = [t for t in self.running() if t != PID]
        if tids:
            for h in self.hs:
                h.kernel.exit_thread(tids[which % len(tids)])
            self.settle()

    @precondition(lambda self: self.k.processes.get(PID) == [PID])
    @rule()
    def exec(self) -> None:
        if self.running() == [PID]:
            for h in self.hs:
                h.kernel.exec(PID)
            self.settle()
            self.wids = [(c, w) for c, w in self.wids if w in self.hs[0].engine._watches]

    @rule(which=st.integers(0, 4), n=st.integers(0, 3))
    def external_users(self, which: int, n: int) -> None:
        """Other perf/ptrace users take free slots: the kernel says ENOSPC (busy specs)."""
        tids = self.k.processes.get(PID, [])
        if tids:
            tid = tids[which % len(tids)]
            for h in self.hs:
                free = CAPACITY - len(h.kernel.open_events(tid))
                h.kernel.external_slots[tid] = min(n, free)
                h.engine.retry_busy()
            self.settle()

    @invariant()
    def alike(self) -> None:
        fast, scan = self.hs
        assert fast.kernel.calls == scan.kernel.calls
        assert [(e.cid, e.kind, e.fields) for e in fast.emitted] == [
            (e.cid, e.kind, e.fields) for e in scan.emitted
        ]
        for engine in (fast.engine, scan.engine):
            check_index(engine)
            check_slots(engine)
        views = [
            {
                tid: {s: (slot.mode, [w.id for w in slot.watches]) for s, slot in t.slots.items()}
                for tid, t in h.engine._threads.items()
            }
            for h in self.hs
        ]
        assert views[0] == views[1]
        for cid in (1, 2, 3):
            if cid in fast.engine._clients:
                mine = [(w.id, w.state, w.states, w.count) for w in fast.engine.list_watches(cid)]
                assert mine == [
                    (w.id, w.state, w.states, w.count) for w in scan.engine.list_watches(cid)
                ]


IndexVsScan.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_index_vs_scan = IndexVsScan.TestCase
