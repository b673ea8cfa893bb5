"""A thread's four slots: which watches get them, the kernel events behind them, and the
counters that credit each watch with its hits.

Theory of operation
-------------------
*Which specs.* Every watch that applies to a thread wants its spec there. The specs are
ranked by their best priority, then by their earliest request (``_alloc.Want.rank``); the
first four the kernel does not refuse hold the thread's slots (:meth:`_reconcile`). A spec
the kernel refused (someone outside the daemon holds slots) is *busy* until retried, and
our own lower-ranked slot gives way to it (DESIGN 5.1). Owners are told ``installed`` and
``uninstalled`` as their watch's state on the thread changes.

*One event per spec.* An installed spec is one kernel breakpoint event (a
:class:`SlotRec`) shared by every watch of that spec on that thread, configured for the
strongest mode among them (stop > notify > count) and, when some of them have conditions,
with their filter program. When that changes the event is reopened — only while the thread
is stopped: between the close and the open a running thread would hit uncounted (closing a
breakpoint of a running thread takes IPIs, long enough for a tight loop to slip through;
measured), so a running thread is interrupted and reopened just before it runs again.

*Counts.* Every event counts every hit. Each slot remembers its counter's last value, and a
delta is credited to every watch installed on it (:meth:`_refresh`): at every trap, before
a slot closes, before a watch joins it (earlier hits are not the newcomer's), and when a
client asks. So each watch counts exactly the hits since it was installed. A stop-mode hit
counts long before its SIGTRAP is handled; a delta taken in between is kept for that trap
(``SlotRec.unrouted``), which routes by counter deltas (``_stops.py``; DESIGN §4).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator
from typing import TYPE_CHECKING

from hwbkpt_proto import InvalidArgumentError, NoSpaceError, NoSuchProcessError
from hwbkptd._alloc import CAPACITY
from hwbkptd._model import Mode, Spec
from hwbkptd._records import (
    FILTER_HITS,
    FILTER_LAST_NEW,
    FILTER_LAST_OLD,
    TOKEN_MAGIC,
    Emit,
    Filter,
    Port,
    SlotRec,
    TargetRec,
    ThreadRec,
    ThreadState,
    WatchRec,
)

__all__ = ["SlotHandling"]

log = logging.getLogger("hwbkptd._engine")


class SlotHandling:
    """The engine's slots and counters; watches and threads come from ``Engine``."""

    # Provided by hwbkptd._engine.Engine.
    _port: Port
    _emit: Emit
    _bpf: bool
    targets: dict[int, TargetRec]
    counters: dict[str, int]
    _tokens: dict[int, tuple[ThreadRec, SlotRec]]
    _token_ids: Iterator[int]

    if TYPE_CHECKING:

        def _reopen_later(self, thread: ThreadRec) -> None: ...
        def _credit(self, slot: SlotRec, now: int) -> list[WatchRec]: ...
        def _records_of(self, slot: SlotRec) -> bool: ...
        def on_samples(
            self, token: int, samples: Iterable[tuple[int, ...]], lost: int, throttled: int = 0
        ) -> None: ...

    def _reconcile_target(self, target: TargetRec) -> None:
        """:meth:`_reconcile` every thread of the target."""
        for thread in list(target.threads.values()):
            self._reconcile(thread)

    def _reconcile(
        self, thread: ThreadRec, fresh: Collection[WatchRec] = (), *, again: bool = True
    ) -> None:
        """Make the thread's slots match the best wants; tell owners what changed (module
        docstring). ``fresh``: watches whose state goes in their ``watch`` reply, not in an
        event. A running thread whose slot must be reopened is interrupted instead, and
        reopened just before it runs again (``_stops._resume_now``)."""
        if thread.state is ThreadState.NEW or thread.detaching or thread.exiting:
            return
        thread.freed = False
        tid = thread.tid
        slots = thread.slots
        busy = thread.busy
        by_spec: dict[Spec, list[WatchRec]] = {}
        for watch in self.targets[thread.pid].watches_of(tid):
            same = by_spec.get(watch.spec)
            if same is None:
                by_spec[watch.spec] = [watch]
            else:
                same.append(watch)
        # Each spec's rank (_alloc.Want.rank: its best priority, then its earliest request)
        # and the specs best first, as _alloc.choose ranks them: done once here, without a
        # Want per spec and a second sort, as this pass walks that order itself (measured:
        # bench/engine_micro.py). tests/test_engine.py checks the slots against choose(),
        # tests/test_watch_index.py the whole pass against the former one.
        rank: dict[Spec, tuple[int, int]] = {}
        for spec, ws in by_spec.items():
            if len(ws) == 1:
                rank[spec] = (-ws[0].priority, ws[0].seq)
            else:
                rank[spec] = (-max(w.priority for w in ws), min(w.seq for w in ws))
        ranked = sorted(rank, key=rank.__getitem__)
        chosen = [s for s in ranked if s not in busy][:CAPACITY] if busy else ranked[:CAPACITY]
        for spec in list(slots):
            if spec not in chosen:
                self._close_slot(thread, spec)
        stopped = thread.state is ThreadState.STOPPED
        for spec in ranked:
            if len(slots) >= CAPACITY and spec not in slots:
                break
            if spec in busy:
                continue
            watches = by_spec[spec]
            mode = watches[0].mode if len(watches) == 1 else max(w.mode for w in watches)
            filtered, flags = self._filter_of(watches)
            if filtered and not self._bpf:
                mode = Mode.STOP  # the port evaluates the conditions at each hit's stop
            slot = slots.get(spec)
            owed: list[WatchRec] = []
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
                self._close_slot(thread, spec, reopen=True)
                owed, slot = self._owed(slot), None
            if slot is None:
                slot = self._open_slot(thread, spec, mode, filtered, flags)
                if slot is None and spec in busy:
                    # The kernel is out of slots (someone outside the daemon holds some):
                    # our own lower-ranked slot gives way, as priority says (DESIGN 5.1).
                    lower = [s for s in slots if rank.get(s, (0, 0)) > rank[spec]]
                    if lower:
                        self._close_slot(thread, max(lower, key=rank.__getitem__))
                        busy.discard(spec)
                        slot = self._open_slot(thread, spec, mode, filtered, flags)
                if slot is None:
                    continue
                slot.unrouted = owed
            slot.watches = watches
        if thread.freed and busy and again:
            # A slot closed during this pass: what the kernel refused may fit now.
            busy.clear()
            self._reconcile(thread, fresh, again=False)
            return
        # Tell owners about every change of state on this thread.
        for spec, watches in by_spec.items():
            if spec in slots:
                for watch in watches:
                    watch.reasons.pop(tid, None)
                    if watch.states.get(tid) == "installed":
                        continue
                    watch.states[tid] = "installed"
                    if watch not in fresh:  # a fresh watch's state is in its `watch` reply
                        fields = {"watch": watch.id, "tid": tid}
                        self._emit(watch.client, "installed", fields, False)
                continue
            reason = "busy" if spec in busy else "preempted"
            for watch in watches:
                watch.reasons[tid] = reason
                if watch.states.get(tid) == "pending":
                    continue
                watch.states[tid] = "pending"
                if watch not in fresh:
                    self._emit(
                        watch.client,
                        "uninstalled",
                        {"watch": watch.id, "tid": tid, "reason": reason},
                        False,
                    )

    def _owed(self, slot: SlotRec) -> list[WatchRec]:
        """The watches a closing slot counted a hit for whose SIGTRAP is still to come (its
        ``unrouted``), but for notify hits its filter program wrote as records (they went
        with its ring). The event that replaces it on a reopen reports them, else the
        thread's next trap (:meth:`_close_slot`). A reopen happens at a stop, and the
        interrupt stop that serves it comes before a SIGTRAP already queued (``get_signal``,
        kernel/signal.c, takes the job-control trap before dequeuing signals), so the old
        event's last hit may be counted and not yet reported."""
        records = self._bpf and bool(slot.filtered)
        return [w for w in slot.unrouted if not (records and w.mode is Mode.NOTIFY)]

    @staticmethod
    def _filter_of(watches: list[WatchRec]) -> tuple[tuple[WatchRec, ...], tuple[bool, bool]]:
        """The conditional watches of a slot, whether every hit must be delivered anyway (an
        unconditional stop watch) and whether every hit must be recorded (an unconditional
        notify watch). Unconditional counts come from the event's own counter, which counts
        every hit whatever the program says."""
        filtered = tuple(w for w in watches if w.condition is not None)
        if not filtered:
            return (), (False, False)
        plain = [w.mode for w in watches if w.condition is None]
        return filtered, (Mode.STOP in plain, Mode.NOTIFY in plain)

    def _open_slot(
        self,
        thread: ThreadRec,
        spec: Spec,
        mode: Mode,
        filtered: tuple[WatchRec, ...] = (),
        flags: tuple[bool, bool] = (False, False),
    ) -> SlotRec | None:
        token = TOKEN_MAGIC | next(self._token_ids)
        flt = None
        if filtered:
            flt = Filter(
                conditions=tuple(w.condition for w in filtered if w.condition is not None),
                always=flags[0],
                hits=tuple(w.cond_hits.get(thread.tid, 0) for w in filtered),
                deliver=tuple(w.mode is Mode.STOP for w in filtered),
                notify=tuple(i for i, w in enumerate(filtered) if w.mode is Mode.NOTIFY),
                notify_all=flags[1],
            )
        try:
            handle = self._port.open_slot(thread.tid, spec, mode, token, flt)
        except NoSpaceError:
            thread.busy.add(spec)
            self.counters["slots_busy"] += 1
            return None
        except NoSuchProcessError:
            return None  # the thread is exiting; its exit is reported separately
        except InvalidArgumentError as err:
            log.warning("kernel refused %s on %d: %s", spec, thread.tid, err)
            thread.busy.add(spec)
            return None
        slot = SlotRec(spec=spec, handle=handle, mode=mode, token=token, tid=thread.tid)
        if flt is not None:
            slot.filtered, slot.flags, slot.cond_last = filtered, flags, list(flt.hits)
        thread.slots[spec] = slot
        thread.had_slots = True
        if mode is Mode.STOP:
            thread.may_trap = True
        self._tokens[token] = (thread, slot)
        self.counters["slots_opened"] += 1
        return slot

    def _close_slot(self, thread: ThreadRec, spec: Spec, *, reopen: bool = False) -> None:
        """Close a slot, its counter read a last time. A hit it counted whose SIGTRAP is
        still to come is owed to its watches: by the event that replaces it (``reopen``,
        see :meth:`_owed`), else by the thread's next trap (``ThreadRec.owed``)."""
        slot = thread.slots.pop(spec)
        self._refresh(slot)
        if not reopen:
            thread.owed.extend(w for w in self._owed(slot) if w not in thread.owed)
        if slot.mode is Mode.NOTIFY or (self._bpf and self._records_of(slot)):
            # Hits still in the ring (and losses the kernel never got to report) belong to
            # the watches of this slot: deliver them before the ring goes.
            try:
                samples, lost, throttled = self._port.drain(slot.handle, True)
            except NoSuchProcessError:
                samples, lost, throttled = [], 0, 0
            self.on_samples(slot.token, samples, lost, throttled)
        self._tokens.pop(slot.token, None)
        try:
            self._port.close_slot(slot.handle)
        finally:
            thread.freed = True  # capacity may have changed for what the kernel refused

    def _refresh(self, slot: SlotRec) -> list[WatchRec]:
        """Read the slot's counters; credit each watch installed on it with its new hits.

        Returns the watches credited. An unconditional watch gets the event counter's
        delta (every hit); a conditional one its own counter's delta in the slot's filter
        (its true hits).
        """
        try:
            now = self._port.read_count(slot.handle)
        except NoSuchProcessError:
            return []
        credited = self._credit(slot, now)
        if slot.filtered:
            # Read even when the event's counter did not move: the kernel counts the hit
            # before the program runs (perf_swevent_event, then the overflow handler), so a
            # read on another CPU in between saw the count but not yet the program's work.
            self._refresh_filter(slot, credited)
        if slot.mode is Mode.STOP:
            # Every hit credited here has a SIGTRAP that stops for it (SlotRec.unrouted).
            slot.unrouted.extend(w for w in credited if w not in slot.unrouted)
        return credited

    def _refresh_filter(self, slot: SlotRec, credited: list[WatchRec]) -> None:
        try:
            words = self._port.read_filter(slot.handle)
        except NoSuchProcessError:
            return
        slot.values = (words[FILTER_LAST_NEW], words[FILTER_LAST_OLD])
        for i, watch in enumerate(slot.filtered):
            now = words[FILTER_HITS + i]
            delta = now - slot.cond_last[i]
            if delta <= 0:
                continue
            slot.cond_last[i] = now
            if watch not in slot.watches:
                continue  # left the slot; its program is replaced at the next stop
            watch.count += delta
            watch.cond_hits[slot.tid] = watch.cond_hits.get(slot.tid, 0) + delta
            credited.append(watch)
