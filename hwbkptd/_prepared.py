"""Prepared stops: the decisions the engine hands to the compiled stop round, and its report.

Part of the engine (:class:`hwbkptd._engine.Engine` inherits it); pure like the rest of it.

Theory of operation
-------------------
Issue 13 lets the per-hit round of a stop-mode hit loop run compiled
(``hwbkptd/_fastpath.c``: waitpid, GETSIGINFO, the slot counters, GETREGS, the ``stop``
events, the clients' ``resume``, CONT), on one condition: the engine keeps deciding. So the
compiled round carries no semantics of its own. Before each call the engine writes down, in
:meth:`fast_table`, what the pure path (:mod:`hwbkptd._stops`) would do in the plain case
only:

* a *running* thread whose next SIGTRAP stop is plain — no step, interrupt, reopen, detach or
  parking pending, no raw debug registers (whose DR6 bookkeeping is the engine's), no filter
  on a slot — with each slot's counter as last credited and the stop watches a hit of that
  slot reports to (``_on_sigtrap``: ``stops[watch.client].append(watch.id)``). A slot is
  *plain* (``ok``) when an advance of it makes no event but those ``stop`` events: no
  condition, and no notify watch on a stop-mode slot (that would be a ``hit`` event);
* a *stopped* thread held in the plain way (a resume of it is ``_resume_now``'s plain
  ``CONT`` with signal 0) with its holders; once resumed, its next SIGTRAP stop is as
  plain as a running thread's.

The table is built again at every call, from the records themselves, so it can never be
stale: nothing in the engine runs while the compiled round does (it holds the GIL and runs
in the tracer thread), and whatever the engine changed since the last call (slots, watches,
holders, modes, clients) is in the next table. Building it costs a few µs per planned thread,
once per entry into the hot loop, not per stop.

The round reports what it did (:meth:`fast_apply`): each thread it stopped or resumed, with
its holders and its slots' counters, and how many stops and traps it served. The engine
credits the counters exactly as :meth:`Engine._refresh` does and records the holds, so
``count``, ``status`` and every later decision see the same state as after the pure path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from hwbkptd._model import Mode, Spec
from hwbkptd._records import SlotRec, TargetRec, ThreadRec, ThreadState, WatchRec

__all__ = ["FastSlot", "FastThread", "PreparedStops"]

#: One slot of a planned thread: (kernel handle, counter as last credited, the (client,
#: watch) pairs its hit stops for, whether an advance of it may be served compiled).
FastSlot = tuple[object, int, tuple[tuple[int, int], ...], bool]
#: One planned thread: (tid, pid, holders if it is stopped and held, slots, whether its
#: next SIGTRAP stop may be served compiled).
FastThread = tuple[int, int, tuple[int, ...], tuple[FastSlot, ...], bool]


class PreparedStops:
    """The engine's side of the compiled stop round (module docstring)."""

    # Provided by hwbkptd._engine.Engine.
    _park: bool
    targets: dict[int, TargetRec]
    _threads: dict[int, ThreadRec]
    counters: dict[str, int]
    on_trap_hook: Callable[[ThreadRec, set[Spec], set[int]], dict[int, int]] | None
    trap_hook_wants: Callable[[int], bool] | None

    def fast_table(self, max_stops: int) -> list[FastThread]:
        """The threads whose plain stop or resume the compiled round may serve now."""
        if self._park:
            return []  # parking moves every stop to an interrupt stop first: the engine's
        table: list[FastThread] = []
        # Only processes with a stop watch can have a thread to plan: the table is built
        # at every wake-up of the tracer, which must stay cheap for 1,000 counting threads.
        threads = [
            thread
            for target in self.targets.values()
            if any(w.mode is Mode.STOP for w in target.watches.values())
            for thread in target.threads.values()
        ]
        for thread in threads:
            if not self._plain(thread):
                continue
            if thread.state is ThreadState.RUNNING and not thread.holds:
                holds: tuple[int, ...] = ()
            elif thread.state is ThreadState.STOPPED and thread.holds:
                holds = tuple(thread.holds)
            else:
                continue
            slots = tuple(self._fast_slot(s, max_stops) for s in thread.slots.values())
            # A held thread resumed by the round runs on as planned: its next stop too —
            # unless a read has counted a hit whose trap is still to come: the round routes
            # by counter deltas, and that one's is gone (SlotRec.unrouted).
            traps = (
                any(s[2] for s in slots)
                and not thread.owed
                and not any(s.unrouted for s in thread.slots.values())
            )
            if traps or holds:
                table.append((thread.tid, thread.pid, holds, slots, traps))
        return table

    def _plain(self, thread: ThreadRec) -> bool:
        """Whether the pure path would handle this thread's next SIGTRAP stop or resume
        with no step, interrupt, reopen, parking, detach or raw-register work."""
        target = self.targets.get(thread.pid)
        return (
            target is not None
            and not target.detaching
            # A resume that leaves the target with nothing to keep it would detach it.
            and bool(target.watches or target.attached)
            and not thread.detaching
            and not thread.reopen
            and not thread.step_requesters
            and not thread.stepping
            and not thread.step_in_flight
            and not thread.interrupt_requesters
            and not thread.interrupt_sent
            and not thread.parked_events
            and thread.resume_sig == 0
            # Held at a signal-delivery-stop: its resume decides the program's signal
            # (_signals.py), which a plain CONT with 0 would drop.
            and thread.signal_stop is None
            and (
                self.on_trap_hook is None
                or (self.trap_hook_wants is not None and not self.trap_hook_wants(thread.tid))
            )
        )

    @staticmethod
    def _fast_slot(slot: SlotRec, max_stops: int) -> FastSlot:
        plain = not slot.filtered and all(w.condition is None for w in slot.watches)
        if slot.mode is Mode.STOP and any(w.mode is Mode.NOTIFY for w in slot.watches):
            plain = False  # its hit is also a ``hit`` event (``notifies`` in _on_sigtrap)
        stops = tuple((w.client, w.id) for w in slot.watches if w.mode is Mode.STOP)
        if len(stops) > max_stops:
            plain = False
        return slot.handle, slot.last, stops, plain

    def fast_apply(
        self,
        threads: Iterable[tuple[int, bool, Sequence[int], Sequence[int]]],
        stops: int,
        traps: int,
        resumes: int = 0,
    ) -> None:
        """Record what the compiled round did: per thread it stopped or resumed, whether it
        is stopped now, its holders and its slots' counters (in :meth:`fast_table` order);
        the stops reported, traps taken and clients' resumes read."""
        for tid, stopped, holds, lasts in threads:
            thread = self._threads[tid]
            for slot, now in zip(thread.slots.values(), lasts, strict=True):
                self._credit(slot, now)
            thread.state = ThreadState.STOPPED if stopped else ThreadState.RUNNING
            thread.holds = set(holds)
            thread.resume_sig = 0
        self.counters["stops_reported"] += stops
        self.counters["traps"] += traps
        self.counters["fast_stops"] += stops
        self.counters["fast_resumes"] += resumes

    @staticmethod
    def _credit(slot: SlotRec, now: int) -> list[WatchRec]:
        """Credit the slot's unconditional watches with the hits up to counter ``now``
        (read by :meth:`Engine._refresh` or by the compiled round); returns them."""
        credited: list[WatchRec] = []
        delta = now - slot.last
        if delta > 0:
            slot.last = now
            for watch in slot.watches:
                if watch.condition is None:
                    watch.count += delta
                    credited.append(watch)
        return credited
