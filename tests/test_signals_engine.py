"""Signals for debuggers (hwbkptd._signals) on the fake kernel: who is told of a program's
signal and whether it is delivered, with one client and with several. Fast, no root."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hwbkpt_proto import NoSuchProcessError
from hwbkptd._model import Mode
from hwbkptd._records import SigInfo, SignalStop
from hwbkptd._signals import settle
from tests.fakes import SI_USER, SIGTRAP, Harness
from tests.test_engine import PID, X, setup, stops, write

USR1 = int(signal.SIGUSR1)
USR2 = int(signal.SIGUSR2)
ALRM = int(signal.SIGALRM)


def attached(nclients: int = 2, *, catching: tuple[int, ...] = (1,)) -> tuple[Harness, int]:
    """A one-thread process every client attached to; ``catching`` asked for signals."""
    h, [tid] = setup(clients=nclients)
    for cid in range(1, nclients + 1):
        h.engine.attach(cid, PID)
    for cid in catching:
        h.engine.catch_signals(cid, PID, True, ())
    h.settle()
    h.take()
    return h, tid


def signal_arrives(h: Harness, tid: int, sig: int) -> None:
    h.kernel.handled.add(sig)
    h.kernel.queue_signal(tid, sig, SigInfo(SI_USER, 0))
    h.settle()


def test_a_client_that_did_not_ask_sees_nothing_and_the_signal_goes_through() -> None:
    h, tid = attached(catching=())
    signal_arrives(h, tid, USR1)
    assert h.take() == []
    assert h.kernel.delivered == [(tid, USR1)]
    assert h.kernel.state(tid) == "running"


def test_the_signal_is_reported_held_and_passed_on_a_plain_resume() -> None:
    h, tid = attached(catching=(1,))
    signal_arrives(h, tid, USR1)
    [stop] = stops(h, 1)
    assert stop["reason"] == "signal"
    assert stop["signal"] == USR1
    assert stop["watches"] == []
    assert h.take(2) == []  # client 2 did not ask
    assert h.kernel.state(tid) == "signal"  # held for client 1
    assert h.kernel.delivered == []
    h.engine.resume(1, tid)
    h.settle()
    assert h.kernel.delivered == [(tid, USR1)]


def test_signal_0_discards_it() -> None:
    h, tid = attached(catching=(1,))
    signal_arrives(h, tid, USR1)
    h.take()
    h.engine.resume(1, tid, 0)
    h.settle()
    assert h.kernel.delivered == []
    assert h.kernel.state(tid) == "running"


def test_passed_signals_are_not_reported_to_that_client() -> None:
    h, tid = attached(catching=(1, 2))
    h.engine.catch_signals(1, PID, True, [ALRM])
    signal_arrives(h, tid, ALRM)
    assert h.take(1) == []
    [stop] = stops(h, 2)
    assert stop["signal"] == ALRM
    h.engine.resume(2, tid)
    h.settle()
    assert h.kernel.delivered == [(tid, ALRM)]


@pytest.mark.parametrize(
    ("a", "b", "delivered"),
    [
        (0, None, [USR1]),  # b passes by saying nothing
        (0, USR1, [USR1]),  # b names it
        (0, 0, []),  # every client told discarded it
        (0, USR2, [USR2]),  # a discards, b replaces
        (USR2, None, [USR1]),  # a pass wins over a replacement
    ],
)
def test_with_two_clients_it_is_lost_only_if_every_client_told_agrees(
    a: int, b: int | None, delivered: list[int]
) -> None:
    h, tid = attached(catching=(1, 2))
    signal_arrives(h, tid, USR1)
    assert [s["signal"] for s in stops(h, 1)] == [USR1]
    assert [s["signal"] for s in stops(h, 2)] == [USR1]
    h.engine.resume(1, tid, a)
    h.settle()
    assert h.kernel.state(tid) == "signal"  # b still holds it
    h.engine.resume(2, tid, b)
    h.settle()
    assert h.kernel.delivered == [(tid, sig) for sig in delivered]


def test_a_client_that_leaves_passes_the_signal() -> None:
    h, tid = attached(catching=(1, 2))
    signal_arrives(h, tid, USR1)
    h.take()
    h.engine.resume(1, tid, 0)
    h.engine.remove_client(2)  # gone without a word: it must not swallow the signal
    h.settle()
    assert h.kernel.delivered == [(tid, USR1)]


def test_a_client_not_told_cannot_discard_it() -> None:
    h, tid = attached(catching=(1,))
    signal_arrives(h, tid, USR1)
    assert [s["reason"] for s in stops(h, 1)] == ["signal"]
    h.engine.interrupt(2, tid)  # client 2 holds the stopped thread too, for an interrupt
    assert [s["reason"] for s in stops(h, 2)] == ["interrupt"]
    h.engine.resume(2, tid, 0)
    h.engine.resume(1, tid)
    h.settle()
    assert h.kernel.delivered == [(tid, USR1)]


def test_hold_all_at_a_signal_stop_adds_no_second_stop() -> None:
    h, tid = attached(catching=(1,))
    signal_arrives(h, tid, USR1)
    assert [(s["reason"], s.get("signal")) for s in stops(h, 1)] == [("signal", USR1)]
    assert h.engine.hold_all(1, PID) == []
    assert h.take(1) == []
    h.engine.resume(1, tid, 0)
    h.settle()
    assert h.kernel.delivered == []


def test_a_signal_named_at_an_interrupt_stop_is_sent_and_not_reported_again() -> None:
    h, tid = attached(catching=(1,))
    h.kernel.handled.add(USR2)
    h.engine.hold_all(1, PID)
    h.settle()
    assert [s["reason"] for s in stops(h, 1)] == ["interrupt"]
    h.engine.resume(1, tid, USR2)  # gdb: "signal SIGUSR2" after a Ctrl-C
    h.settle()
    assert ("tgkill", tid, USR2) in h.kernel.calls
    assert h.kernel.delivered == [(tid, USR2)]
    assert h.take(1) == []  # this client asked for it: no "Program received signal" again
    assert h.kernel.state(tid) == "running"


def test_a_signal_named_at_a_watch_stop_is_injected() -> None:
    h, [tid] = setup()
    h.engine.watch(1, PID, X, Mode.STOP)
    h.kernel.handled.add(USR2)
    assert write(h, tid, X)
    h.take()
    h.engine.resume(1, tid, USR2)
    h.settle()
    assert h.kernel.delivered == [(tid, USR2)]


def test_a_step_carries_the_choice_too() -> None:
    h, tid = attached(catching=(1,))
    signal_arrives(h, tid, USR1)
    h.take()
    h.engine.step(1, tid, 0)
    h.settle()
    assert h.kernel.delivered == []
    assert [s["reason"] for s in stops(h, 1)] == ["step"]
    h.engine.resume(1, tid)
    h.settle()
    assert h.kernel.delivered == []


def test_sigtrap_and_sigstop_are_never_reported() -> None:
    h, tid = attached(catching=(1,))
    h.kernel.queue_signal(tid, SIGTRAP, SigInfo(SI_USER, 0))  # the program's own: delivered
    h.kernel.handled.add(SIGTRAP)
    h.settle()
    assert h.take(1) == []
    assert h.kernel.delivered == [(tid, SIGTRAP)]
    h.kernel.queue_signal(tid, int(signal.SIGSTOP), SigInfo(SI_USER, 0))
    h.settle()
    assert h.take(1) == []
    assert h.kernel.state(tid) == "listening"  # a group-stop, as if untraced


def test_leaving_or_asking_no_more_ends_the_reports() -> None:
    h, tid = attached(catching=(1, 2))
    h.engine.catch_signals(2, PID, False, ())
    h.engine.leave(1, PID)
    signal_arrives(h, tid, USR1)
    assert h.take() == []
    assert h.kernel.delivered == [(tid, USR1)]


def test_only_attached_clients_may_ask() -> None:
    h, _ = setup()
    with pytest.raises(NoSuchProcessError):
        h.engine.catch_signals(1, PID, True, ())


@given(
    sig=st.sampled_from([0, USR1]),
    told=st.frozensets(st.integers(1, 4)),
    choices=st.dictionaries(st.integers(1, 4), st.sampled_from([0, USR1, USR2, ALRM])),
)
def test_settle_rule(sig: int, told: frozenset[int], choices: dict[int, int]) -> None:
    got = settle(SignalStop(sig, told, dict(choices)))
    passed = sig and told and any(choices.get(c, sig) == sig for c in told)
    if passed:
        assert got == sig
    elif told and all(choices.get(c) == 0 for c in told) and not any(choices.values()):
        assert got == 0  # every client told discarded it, nobody named another
    elif not told and not any(s and s != sig for s in choices.values()):
        assert got == sig  # nobody was told and nobody named one: as the thread would
    else:
        assert got in {s for s in choices.values() if s} | {0}
