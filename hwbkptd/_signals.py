"""Signals for debuggers: who is told of a program's signal, and whether it is delivered.

The engine inherits :class:`SignalHandling` (as it inherits ``_stops.StopHandling``); like
the rest of the engine it makes no system call.

Theory of operation
-------------------
A debugger sees the signals its program receives: native gdb stops with "Program received
signal SIGUSR1", then ``continue`` delivers it and ``signal 0`` discards it. Here several
debuggers share one program, so:

*Who is told.* A client attached to the process (``attach``) asks for its signals with
``signals``, naming the signals it lets pass untold (gdb's ``QPassSignals``). At a
signal-delivery-stop of any other signal the thread is held for every such client and
each gets a ``stop`` with reason ``"signal"`` and the signal's number. Clients that did not
ask see nothing, and with nobody to tell the signal is delivered at once, as before.
Never reported: ``SIGTRAP`` (the daemon decides whose it is, ``_stops``), ``SIGKILL`` (no
stop: the kernel kills at once) and ``SIGSTOP`` (it brings a group-stop, which the daemon
lets happen as if the program were not traced, DESIGN.md §5.4).

*Whether it is delivered.* Each client's ``resume``/``step`` may carry ``signal``: 0
discards, another number replaces, and none (or a client that leaves) passes the signal it
was told of. The thread runs when the last hold is released, with:

1. the signal it stopped with, if any client told of it passed it (by saying nothing, by
   naming it, or by leaving): a debugger that does not care must never swallow the
   program's signals, so the signal is lost only if *every* client that saw it agreed;
2. otherwise the last replacement any client named (gdb's ``signal SIGUSR2`` at a stop,
   or ``C``/``vCont;C`` at a stop that was no signal: it injects one);
3. otherwise nothing when clients were told (each of them discarded it), or what the
   thread would resume with untold (an unclaimed ``SIGTRAP``, or nothing).

A client that was not told of a signal cannot discard it: only clients told count in 1.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from hwbkpt_proto import NoSuchProcessError
from hwbkptd._records import SIGTRAP, Port, SignalStop, TargetRec, ThreadRec

__all__ = ["MAX_SIGNAL", "NEVER_REPORTED", "SignalHandling", "settle"]

#: The highest signal number (SIGRTMAX on x86-64 Linux, signal(7)).
MAX_SIGNAL = 64
#: Signals a debugger is never told of (module docstring).
NEVER_REPORTED = frozenset({SIGTRAP, int(signal.SIGKILL), int(signal.SIGSTOP)})


def settle(stop: SignalStop) -> int:
    """The signal a thread resumes with, from what its clients chose (module docstring)."""
    if stop.signal and stop.told and any(
        stop.choices.get(cid, stop.signal) == stop.signal for cid in stop.told
    ):
        return stop.signal
    replacements = [sig for sig in stop.choices.values() if sig and sig != stop.signal]
    if replacements:
        return replacements[-1]
    return 0 if stop.told else stop.signal


class SignalHandling:
    """The engine's handling of signals for debuggers; state comes from ``Engine``."""

    _port: Port
    targets: dict[int, TargetRec]
    counters: dict[str, int]

    if TYPE_CHECKING:

        def _attached_target(self, cid: int, pid: int) -> TargetRec: ...
        def _send_stop(
            self,
            thread: ThreadRec,
            stops: dict[int, list[int]],
            *,
            reason: str,
            extra: dict[str, Any] | None = None,
        ) -> None: ...

    def catch_signals(self, cid: int, pid: int, report: bool, passed: Iterable[int]) -> None:
        """Tell ``cid`` of ``pid``'s signals from now on (``report``), except ``passed``;
        or no more. Raises NoSuchProcessError if ``cid`` is not attached to ``pid``."""
        target = self._attached_target(cid, pid)
        if report:
            target.signal_clients[cid] = frozenset(passed)
        else:
            target.signal_clients.pop(cid, None)

    def _signal_watchers(self, thread: ThreadRec, sig: int) -> set[int]:
        """The clients to tell of ``sig`` at a signal-delivery-stop of ``thread``."""
        target = self.targets.get(thread.pid)
        if thread.injected == sig:
            thread.injected = 0  # what a client asked to deliver: it knows of it already
            return set()
        if target is None or not target.signal_clients or sig in NEVER_REPORTED:
            return set()
        if thread.detaching:
            return set()
        return {cid for cid, passed in target.signal_clients.items() if sig not in passed}

    def _report_signal(self, thread: ThreadRec, sig: int, watchers: set[int]) -> None:
        """Hold ``thread`` for ``watchers`` and send each a ``stop`` with reason "signal"."""
        thread.signal_stop = SignalStop(sig, frozenset(watchers))
        thread.holds.update(watchers)
        self.counters["signals_reported"] += 1
        self._send_stop(
            thread, {cid: [] for cid in watchers}, reason="signal", extra={"signal": sig}
        )

    def _choose_signal(self, thread: ThreadRec, cid: int, sig: int | None) -> None:
        """Record what ``cid``'s resume or step says about the thread's signal."""
        stop = thread.signal_stop
        if sig is None:
            if stop is not None and cid in stop.told:
                stop.choices[cid] = stop.signal  # says nothing: passes what it was told
            return
        if stop is None:
            stop = thread.signal_stop = SignalStop(thread.resume_sig, frozenset())
        stop.choices[cid] = sig

    def _settle_signal(self, thread: ThreadRec) -> None:
        """The thread is about to run: fix the signal it runs with."""
        stop, thread.signal_stop = thread.signal_stop, None
        if stop is None:
            return
        sig = settle(stop)
        if sig and not thread.delivery_stop:
            # Restarting an interrupt or event stop with a signal does nothing (ptrace(2),
            # "signal injection"; kernel/signal.c: only ptrace_signal() reads exit_code back).
            # Queue it instead: the thread stops with it at once, and it goes through untold.
            try:
                self._port.send_signal(thread.pid, thread.tid, sig)
                thread.injected = 0 if sig in NEVER_REPORTED else sig
            except NoSuchProcessError:
                pass
            sig = 0
        thread.resume_sig = sig
