"""Several clients doing different things at once against one live hit loop.

Observers hold fixed watches on a target's variables for the whole run — a ``stop`` watch
whose every stop they resume, a ``count`` watch and a ``notify`` watch — while disturbers,
each a client of its own in a thread of its own, loop over random operations chosen by a
seeded RNG: ``status``, ``count``, adding and removing watches of every mode on the same
addresses and on others (at priorities no higher than the observers', so the observers'
slots are never legitimately preempted: DESIGN.md §5.1), resuming and stepping their own
stops, interrupting threads, attaching, holding every thread and detaching, raw debug
register writes, and leaving abruptly (closing the socket while holding a stop).

What every observer is promised must hold however the others interleave: one stop per
write, a count equal to the writes, every hit either notified or reported lost; the
program finishes and exits 0; the daemon lives and answers; and once every client is gone
the program is no longer traced.

The seed of a failed run is in the failure message; ``HWBKPT_STRESS_SEED=N`` replays its
choices (not the threads' interleaving, which the scheduler decides).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import TIMEOUT, info_int, tracer_pid, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]

#: Observers' priority; disturbers stay at or below it (equal: the observers came first).
OBSERVER_PRIORITY = 5
#: How long the load may take before a run is called stuck (the program's last line).
LOAD_TIMEOUT = 60.0
#: A disturber owns at most this many watches at once.
MAX_OWN = 5
DR7_W8 = 1 | (0b01 << 16) | (0b10 << 18)  # vDR0 enabled: write, 8 bytes (LEN 10)


def base_seed() -> int:
    env = os.environ.get("HWBKPT_STRESS_SEED")
    return int(env) if env else random.randrange(1 << 32)


@pytest.fixture
def seed() -> int:
    value = base_seed()
    print(f"stress seed {value} (replay its choices with HWBKPT_STRESS_SEED={value})")
    return value


# --------------------------------------------------------------------------- observers


@dataclass
class Observer:
    """A client with one watch, read by a thread of its own until ``done`` is set."""

    client: hwbkpt.Client
    watch: hwbkpt.Watch
    stops: int = 0  # stop events naming the watch
    hits: int = 0  # hit events naming the watch
    lost: int = 0  # hits reported lost (a ring or the client's queue overflowed)
    cpu_lost: int = 0  # hits the CPU may not have reported (``lost`` with ``where: "cpu"``)
    other: list[hwbkpt.Event] = field(default_factory=list)  # events it did not expect
    error: BaseException | None = None

    def run(self, done: threading.Event) -> None:
        try:
            while not done.is_set():
                event = self.client.next_event(timeout=0.05)
                if event is None:
                    continue
                if event.kind == "stop":
                    if self.watch.id in event.watches:
                        self.stops += 1
                    else:
                        self.other.append(event)
                    self.client.resume(event.tid, wait=False)
                elif event.kind == "hit" and self.watch.id in event.watches:
                    self.hits += 1
                elif event.kind == "lost" and event.get("where") == "cpu":
                    self.cpu_lost += event.count
                elif event.kind == "lost":
                    self.lost += event.count
                else:
                    self.other.append(event)
        except BaseException as err:  # reported by the test, with the seed
            self.error = err


# --------------------------------------------------------------------------- disturbers


@dataclass
class Plan:
    """What disturbers may do to one target."""

    pid: int
    tids: list[int]  # threads for thread-scope watches, interrupts and raw registers
    addrs: list[int]  # addresses to watch (the observers' and others)
    scoped: bool = False  # watches are thread-scope (else process-scope)
    debugger: bool = False  # also attach/hold_all/detach, interrupt, step, raw DRs


OPS = {
    "status": 4,
    "count": 4,
    "watch": 6,
    "unwatch": 4,
    "resume_later": 2,
    "disconnect": 1,
    "nap": 2,
}
DEBUG_OPS = {"interrupt": 2, "attach": 1, "hold_all": 1, "detach": 1, "raw": 2, "unraw": 1}


class Disturber:
    """One client in one thread doing random things to the target (see the module
    docstring); it resumes (or steps) every stop it is given, sooner or later."""

    def __init__(self, daemon: Daemon, plan: Plan, rng: random.Random, name: str) -> None:
        self.daemon = daemon
        self.plan = plan
        self.rng = rng
        self.name = name
        self.client: hwbkpt.Client | None = None
        self.own: list[hwbkpt.Watch] = []
        self.held: list[hwbkpt.Event] = []
        self.attached = False
        self.raw: set[int] = set()  # threads whose vDR0/vDR7 it set
        self.done_ops: dict[str, int] = {}
        self.history: list[str] = []  # the last things it did and got (for a failure)
        self.errors: list[str] = []
        self.error: BaseException | None = None
        ops = dict(OPS, **DEBUG_OPS) if plan.debugger else OPS
        self.ops, self.weights = list(ops), list(ops.values())

    def note(self, what: str) -> None:
        self.history.append(what)
        del self.history[:-50]

    def connect(self) -> hwbkpt.Client:
        self.client = hwbkpt.Client(socket=self.daemon.socket, name=self.name, timeout=TIMEOUT)
        self.own, self.held, self.attached, self.raw = [], [], False, set()
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def run(self, done: threading.Event) -> None:
        try:
            self.connect()
            while not done.is_set():
                op = self.rng.choices(self.ops, self.weights)[0]
                self.note(op)
                self.do(op)
                self.done_ops[op] = self.done_ops.get(op, 0) + 1
                self.take_events()
            # The load is over: let go of every stop still held.
            self.take_events(keep=False)
            self.release_all()
        except BaseException as err:  # reported by the test, with the seed
            self.error = err
        finally:
            self.close()

    # -- events ------------------------------------------------------------------------

    def take_events(self, keep: bool = True, wait: float = 0.0) -> None:
        """Read what came (waiting up to ``wait`` seconds for a first event); resume stops
        (some kept for a while when ``keep``)."""
        assert self.client is not None
        first = self.client.next_event(timeout=wait) if wait else None
        self.client.read_ready()
        while (event := first or self.client.next_event(timeout=0)) is not None:
            first = None
            self.note(f"<- {event.kind} {event.get('reason')} {event.get('watches')}")
            if event.kind == "stop":
                self.held.append(event)
            elif event.kind == "error":
                self.errors.append(f"{event.fields} after {self.history[-12:]}")
        if not keep or self.rng.random() < 0.8:
            self.release_all()

    def release_all(self) -> None:
        assert self.client is not None
        held, self.held = self.held, []
        for event in held:
            self.note(f"-> continue {event.reason} {event.watches}")
            if self.plan.debugger and event.reason == "watch" and self.rng.random() < 0.2:
                # A step: its trap is a "step" stop for this client only, resumed later.
                self.client.step(event.tid, wait=False)
            else:
                self.client.resume(event.tid, wait=False)

    # -- operations --------------------------------------------------------------------

    def do(self, op: str) -> None:
        c, rng, plan = self.client, self.rng, self.plan
        assert c is not None
        if op == "status":
            c.status()
        elif op == "count" and self.own:
            rng.choice(self.own).count()
        elif op == "watch" and len(self.own) < MAX_OWN:
            tid = rng.choice(plan.tids) if plan.scoped else None
            try:
                self.own.append(
                    c.watch(
                        plan.pid,
                        rng.choice(plan.addrs),
                        length=rng.choice((8, 8, 4)),
                        access=rng.choice(("w", "w", "rw")),
                        mode=rng.choice(("count", "notify", "stop")),
                        tid=tid,
                        priority=rng.randint(0, OBSERVER_PRIORITY),
                    )
                )
            except hwbkpt.NoSuchProcessError:
                assert tid is not None  # a worker that finished its writes is gone
        elif op == "unwatch" and self.own:
            self.own.pop(rng.randrange(len(self.own))).remove()
        elif op == "resume_later":
            time.sleep(rng.uniform(0, 0.003))  # held stops wait a little longer
        elif op == "disconnect":
            # Abruptly, whatever it holds (a stop, raw registers, an attachment): with a
            # stop watch, once a stop has come (if one comes soon), without resuming it.
            if not self.held and any(w.mode == "stop" for w in self.own):
                self.take_events(keep=True, wait=0.02)
            if self.held:
                self.done_ops["disconnect holding"] = self.done_ops.get("disconnect holding", 0) + 1
            self.close()
            self.connect()
        elif op == "nap":
            time.sleep(rng.uniform(0, 0.002))
        elif op == "interrupt":
            self.tolerate_gone(lambda: c.interrupt(rng.choice(plan.tids)))
        elif op == "attach":
            c.attach(plan.pid)
            self.attached = True
        elif op == "hold_all" and self.attached:
            c.hold_all(plan.pid)  # a stop per thread follows, taken by take_events
        elif op == "detach" and self.attached:
            c.detach(plan.pid)
            self.attached = False
            # Detaching released every hold of this client on the process: the stops
            # held, and those that came before the answer (queued), are not to be resumed.
            self.held = []
            while (event := c.next_event(timeout=0)) is not None:
                if event.kind == "error":
                    self.errors.append(f"{event.fields}")
        elif op == "raw":
            tid = rng.choice(plan.tids)

            def poke() -> None:
                c.poke_dr(tid, 0, rng.choice(plan.addrs) & ~7)
                c.poke_dr(tid, 7, DR7_W8)
                self.raw.add(tid)

            try:
                self.tolerate_gone(poke)
            except hwbkpt.NoSpaceError:
                pass  # four slots taken by watches that rank higher: the kernel's ENOSPC
        elif op == "unraw" and self.raw:
            tid = rng.choice(sorted(self.raw))
            self.raw.discard(tid)
            self.tolerate_gone(lambda: c.poke_dr(tid, 7, 0))

    def tolerate_gone(self, call: Callable[[], Any]) -> None:
        """Run ``call``; a thread that ended meanwhile (a worker done writing) is fine."""
        try:
            call()
        except hwbkpt.NoSuchProcessError:
            if not self.plan.scoped:
                raise


# --------------------------------------------------------------------------- the harness


@dataclass
class Load:
    """Observers and disturbers on one target while it runs; checked by :meth:`finish`."""

    daemon: Daemon
    seed: int
    observers: dict[str, Observer] = field(default_factory=dict)
    disturbers: list[Disturber] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)  # disturbers stop
    quiet: threading.Event = field(default_factory=threading.Event)  # observers stop

    def observe(self, name: str, pid: int, addr: int, mode: str) -> Observer:
        client = hwbkpt.Client(socket=self.daemon.socket, name=name, timeout=TIMEOUT)
        watch = client.watch(pid, addr, mode=mode, priority=OBSERVER_PRIORITY)
        self.observers[name] = obs = Observer(client, watch)
        return obs

    def disturb(self, plan: Plan, count: int) -> None:
        for i in range(count):
            rng = random.Random(self.seed * 1000 + i)
            self.disturbers.append(Disturber(self.daemon, plan, rng, f"disturber-{i}"))

    def start(self) -> None:
        for obs in self.observers.values():
            self.threads.append(threading.Thread(target=obs.run, args=(self.quiet,)))
        for d in self.disturbers:
            self.threads.append(threading.Thread(target=d.run, args=(self.done,)))
        for thread in self.threads:
            thread.start()

    def stop_disturbers(self) -> None:
        """End the load: every disturber releases what it holds and leaves (the observers
        read on: notify hits come in batches after the writes)."""
        self.done.set()
        for thread in self.threads[len(self.observers) :]:
            thread.join(TIMEOUT)
        stuck = [t.name for t in self.threads[len(self.observers) :] if t.is_alive()]
        assert not stuck, f"seed {self.seed}: disturbers still running: {stuck}"
        for d in self.disturbers:
            assert d.error is None, f"seed {self.seed}: {d.name}: {d.error!r}"
            assert not d.errors, f"seed {self.seed}: {d.name}: error events {d.errors}"

    def stop_observers(self) -> None:
        """Stop reading; every observer must have read without an error."""
        self.quiet.set()
        for thread in self.threads[: len(self.observers)]:
            thread.join(TIMEOUT)
        for name, obs in self.observers.items():
            assert obs.error is None, f"seed {self.seed}: {name}: {obs.error!r}"

    def close(self) -> None:
        self.done.set()
        self.quiet.set()
        for thread in self.threads:
            thread.join(TIMEOUT)
        for obs in self.observers.values():
            obs.client.close()
        for d in self.disturbers:
            d.close()

    def summary(self) -> str:
        ops: dict[str, int] = {}
        for d in self.disturbers:
            for op, n in d.done_ops.items():
                ops[op] = ops.get(op, 0) + n
        return f"seed {self.seed}, disturbers' operations {ops}"


@pytest.fixture
def load(daemon: Daemon, seed: int) -> Iterator[Load]:
    made = Load(daemon, seed)
    try:
        yield made
    finally:
        made.close()


def check_let_go(daemon: Daemon, pid: int, seed: int) -> None:
    """No client left: the daemon answers, manages nothing and no longer traces ``pid``;
    it logged no error and no traceback on the way."""
    assert daemon.alive(), f"seed {seed}: the daemon died"
    log = daemon.stderr().splitlines()
    bad = [line for line in log if " ERROR " in line or "Traceback" in line]
    assert bad == [], f"seed {seed}: the daemon logged {bad[:5]}"
    with hwbkpt.Client(socket=daemon.socket, name="after", timeout=TIMEOUT) as c:
        status = wait_until(
            lambda: (s := c.status())["targets"] == [] and s,
            what="the daemon to let every target go",
        )
        assert [client["name"] for client in status["clients"]] == ["after"]
    wait_until(lambda: tracer_pid(pid) == 0, what=f"process {pid} to be untraced")


def check(obs: Observer, got: int, n: int, what: str, why: str) -> None:
    """An observer's ``got`` must be the ``n`` writes, short only by hits the CPU did not
    report: a VM loses DR6 now and then (HACKING.md, "empty DR6"), and each ``lost`` event
    with ``where: "cpu"`` says one hit of some watch of that thread may be missing."""
    assert n - obs.cpu_lost <= got <= n, (
        f"{what}: {got} for {n} writes ({obs.cpu_lost} reported lost by the CPU); {why}"
    )


def wait_for_hits(load: Load, obs: Observer, n: int) -> None:
    """Notify hits come in batches after the writes: wait for ``n`` hits (or losses), at
    most ``TIMEOUT`` seconds, and a moment more for any beyond them (the caller checks);
    then stop the observers."""
    deadline = time.monotonic() + TIMEOUT
    while (
        obs.hits + obs.lost + obs.cpu_lost < n
        and time.monotonic() < deadline
        and obs.error is None
    ):
        time.sleep(0.01)
    time.sleep(0.3)
    load.stop_observers()


def churn_and_check(
    load: Load,
    daemon: Daemon,
    proc: Target,
    plan: Plan,
    observers: tuple[Observer, Observer, Observer],
    *,
    done: str,
    writes: int,
    notified: int,
    notify_count: bool = True,
) -> None:
    """Run three disturbers on ``plan`` while the program runs to its ``done`` line; then
    the stop, count and notify ``observers`` must have seen all ``writes`` (the notify one
    ``notified`` hits, and with ``notify_count`` as many in its count), nobody else was told
    anything, and the daemon lets the program go once every client has left."""
    stop, count, notify = observers
    load.disturb(plan, 3)
    load.start()
    proc.go()
    assert proc.line(LOAD_TIMEOUT) == done, load.summary()
    load.stop_disturbers()
    wait_for_hits(load, notify, notified)
    why = load.summary()
    print(why)
    check(stop, stop.stops, writes, "stops", why)
    check(stop, stop.watch.count(), writes, "stop watch's count", why)
    check(count, count.watch.count(), writes, "count watch's count", why)
    check(notify, notify.hits + notify.lost, notified, "hits notified or lost", why)
    if notify_count:
        check(notify, notify.watch.count(), notified, "notify watch's count", why)
    assert [e for o in load.observers.values() for e in o.other] == [], why
    load.close()
    check_let_go(daemon, proc.pid, load.seed)
    proc.go()
    assert proc.wait(TIMEOUT) == 0


# --------------------------------------------------------------------------- scenarios


@pytest.mark.timeout(150)
def test_observers_keep_every_hit_while_disturbers_churn(
    target: Start, daemon: Daemon, load: Load
) -> None:
    n = 3000
    proc = target("writer", n, "gate2")
    addr, addr2, pair = (info_int(proc, k) for k in ("addr", "addr2", "pair"))
    stop = load.observe("obs-stop", proc.pid, addr, "stop")
    count = load.observe("obs-count", proc.pid, addr, "count")
    notify = load.observe("obs-notify", proc.pid, addr2, "notify")
    plan = Plan(proc.pid, [proc.pid], [addr, addr2, pair, pair + 8])
    churn_and_check(
        load, daemon, proc, plan, (stop, count, notify),
        done=f"done var={n} pair0=0", writes=n, notified=n,
    )


@pytest.mark.timeout(150)
@pytest.mark.parametrize("debuggers", [False, True], ids=["watchers", "debuggers"])
def test_process_watches_of_many_threads_under_thread_scoped_churn(
    target: Start, daemon: Daemon, load: Load, debuggers: bool
) -> None:
    """Process-scope observers on a variable every worker writes; disturbers with
    thread-scope watches (and, as debuggers, interrupts, holds and raw registers of single
    threads) while workers finish and exit one by one."""
    t, n = 3, 800
    proc = target("tgate", t, n)
    proc.go()
    tids = [info_int_line(proc.line()) for _ in range(t)]
    assert proc.line() == "ready"
    addr, slots = info_int(proc, "addr"), info_int(proc, "slots")
    stop = load.observe("obs-stop", proc.pid, addr, "stop")
    count = load.observe("obs-count", proc.pid, addr, "count")
    notify = load.observe("obs-notify", proc.pid, slots, "notify")  # worker 0's word
    plan = Plan(
        proc.pid, tids, [addr, slots, slots + 64, slots + 128], scoped=True, debugger=debuggers
    )
    churn_and_check(
        load, daemon, proc, plan, (stop, count, notify),
        done=f"done var={n}", writes=t * n, notified=n, notify_count=False,
    )


@pytest.mark.timeout(150)
def test_debuggers_interrupting_holding_and_poking_registers(
    target: Start, daemon: Daemon, load: Load
) -> None:
    n = 1500
    proc = target("writer", n, "gate2")
    addr, addr2, pair = (info_int(proc, k) for k in ("addr", "addr2", "pair"))
    stop = load.observe("obs-stop", proc.pid, addr, "stop")
    count = load.observe("obs-count", proc.pid, addr, "count")
    # On the stop watch's slot: each hit is a ``hit`` event from the stop (not a ring).
    notify = load.observe("obs-notify", proc.pid, addr, "notify")
    plan = Plan(proc.pid, [proc.pid], [addr, addr2, pair], debugger=True)
    churn_and_check(
        load, daemon, proc, plan, (stop, count, notify),
        done=f"done var={n} pair0=0", writes=n, notified=n,
    )


def info_int_line(line: str) -> int:
    """The ``tid=N`` of a worker's line (tests/progs/tgate.c)."""
    words = dict(w.split("=", 1) for w in line.split())
    return int(words["tid"])
