"""Fuzz a live daemon: several clients send random mixtures of valid and invalid requests
(random methods, parameters of wrong types, huge and negative numbers, unknown pids, random
bytes) for a bounded time against live targets, while a well-behaved client beside them
counts hits.

It checks that the daemon never crashes, that every reply is a result or an error with a
documented code (``EINTERNAL`` — an unhandled exception in the daemon — is a failure), that
the targets never die, and that the well-behaved client's count is exact.

Requests that could legitimately kill a target (``set_regs`` with real register values,
``write_memory`` into a managed target) are only sent in forms the daemon must refuse.
Never aims at real system processes: the only live pids used are the test's own targets and
the daemon (which must be refused).
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

import hwbkpt
from hwbkpt_proto._errors import _BY_CODE
from tests._daemon import Daemon, log_excerpt
from tests._progs import Target
from tests.test_watch import TIMEOUT, info_int

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]

FUZZ_SECONDS = float(os.environ.get("HWBKPT_FUZZ_SECONDS", "10"))
FUZZERS = 4
DOCUMENTED = set(_BY_CODE) - {"EINTERNAL", "ECONNLOST"}
METHODS = [
    "watch", "watch_region", "unwatch", "watches", "count", "resume", "step", "interrupt",
    "get_regs", "set_regs", "read_memory", "write_memory", "peek_dr", "poke_dr", "peek_user",
    "poke_user", "status", "ping", "hello", "nope", "", "WATCH", "__init__", "_watch",
    "call", "client_disconnected",
]  # fmt: skip
GARBAGE: list[Any] = [
    None, True, False, -1, 0, 1, 2**31, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 1.5,
    float("nan"), float("inf"), "", "x", "w", "8", "\x00", "é" * 100, b"", b"\xff" * 9,
    [], [1, 2], {}, {"a": 1}, {"rip": 0}, [[[[]]]], "A" * 60000,
]  # fmt: skip
NO_SUCH_PID = 4_194_304 + 4242  # above the default and maximal pid_max: never a process


class Fuzzer:
    def __init__(self, seed: int, pids: list[int], addrs: list[int], daemon_pid: int) -> None:
        self.rng = random.Random(seed)
        self.pids = pids
        self.addrs = addrs
        self.daemon_pid = daemon_pid
        self.ids: list[int] = []

    def pick(self, *choices: Any) -> Any:
        if self.rng.random() < 0.15:
            return self.rng.choice(GARBAGE)
        return self.rng.choice(choices)

    def pid(self) -> Any:
        return self.pick(*self.pids, *self.pids, self.daemon_pid, NO_SUCH_PID, 0, -1, 2**31)

    def addr(self) -> Any:
        a = self.rng.choice(self.addrs)
        return self.pick(
            a, a, a + 8, a + 1, a + 4, 0, 0x1000, 0xFFFFFFFF81000000, (1 << 47) - 8,
            (1 << 47) - 4096, 2**64 - 8, -8, self.rng.randrange(2**64),
        )  # fmt: skip

    def params(self, method: str) -> dict[str, Any]:
        p: dict[str, Any] = {}
        r = self.rng
        if method in ("watch", "watch_region"):
            p = {
                "pid": self.pid(),
                "addr": self.addr(),
                "access": self.pick("w", "rw", "x", "r", "W"),
                "mode": self.pick("count", "notify", "stop", "STOP", "break"),
            }
            if method == "watch":
                p["length"] = self.pick(1, 2, 4, 8, 3, 0, 16, -8)
            else:
                p["size"] = self.pick(1, 6, 16, 24, 0, 2**16, 2**16 + 1, 2**40)
            if r.random() < 0.3:
                p["tid"] = self.pid()
            if r.random() < 0.3:
                p["priority"] = self.pick(0, 5, -5, 2**31, -(2**31), 2**31 + 1)
        elif method in ("unwatch", "count"):
            p = {"id": self.pick(*(self.ids or [1]), 0, -1, 2**64 - 1, 10**6)}
        elif method in ("resume", "step", "interrupt", "get_regs"):
            p = {"tid": self.pid()}
        elif method == "set_regs":
            # Never a real register with an int value: that could kill a held target.
            p = {"tid": self.pid(), "regs": self.rng.choice(
                [{"nope": 1}, {"rip": "x"}, {"rip": 1.5}, [], None, {1: 2}, {"": 0}, "rip"])}
        elif method == "read_memory":
            p = {"pid": self.pid(), "addr": self.addr(),
                 "size": self.pick(0, 8, 4096, 1 << 20, (1 << 20) + 1, -1, 2**64)}
        elif method == "write_memory":
            # Only where it must be refused: not a managed target, or data of a wrong type.
            if r.random() < 0.5:
                p = {"pid": self.pick(self.daemon_pid, NO_SUCH_PID, 0, -1), "addr": self.addr(),
                     "data": b"\xcc" * r.randrange(0, 64)}
            else:
                p = {"pid": self.rng.choice(self.pids), "addr": self.addr(),
                     "data": r.choice(["str", 5, None, [1], {"a": b""}])}
        elif method in ("peek_dr", "poke_dr"):
            p = {"tid": self.pid(), "n": self.pick(*range(-1, 9), 2**63, -(2**63))}
            if method == "poke_dr":
                p["value"] = self.pick(0, 1, 0x401, 0x1, self.addr(), 2**64 - 1, -1, 0xFFFF0FF0)
        elif method in ("peek_user", "poke_user"):
            p = {"tid": self.pid(), "offset": self.pick(848, 848 + 8 * r.randrange(8), 0, 1, -8,
                                                          840, 2**64 - 1, 4096)}
            if method == "poke_user":
                p["value"] = self.pick(0, 1, self.addr(), 2**64 - 1, -1)
        elif method == "hello":
            p = {"version": self.pick(1, 2, 0, None), "name": self.pick("x", 5)}
        elif method == "ping":
            p = {"data": self.pick(1, "x", b"y" * 100)}
        # Mutations: drop a parameter, add an unknown one, or replace one with garbage.
        roll = r.random()
        if p and roll < 0.1:
            p.pop(r.choice(list(p)))
        elif roll < 0.2:
            p[r.choice(["bogus", "PID", "", "tid", "x" * 300])] = r.choice(GARBAGE)
        elif p and roll < 0.3:
            p[r.choice(list(p))] = r.choice(GARBAGE)
        return p


def run_fuzzer(
    sock: str, seed: int, pids: list[int], addrs: list[int], daemon_pid: int,
    deadline: float, outcomes: Counter[str], failures: list[str], lock: threading.Lock,
) -> None:  # fmt: skip
    fz = Fuzzer(seed, pids, addrs, daemon_pid)
    client = hwbkpt.Client(socket=sock, name=f"fuzz{seed}", timeout=TIMEOUT)
    try:
        while time.monotonic() < deadline:
            method = fz.rng.choice(METHODS)
            params = fz.params(method)
            try:
                result = client.call(method, **params)
                code = "ok"
                if method in ("watch",) and isinstance(result, dict):
                    fz.ids.append(result["id"])
                elif method == "watch_region" and isinstance(result, dict):
                    fz.ids.extend(result["ids"])
            except hwbkpt.HwbkptError as err:
                code = err.code
                if code not in DOCUMENTED:
                    with lock:
                        failures.append(f"{method}({params!r}) -> {code}: {err}"[:2000])
                if code == "ECONNLOST":
                    client.close()
                    client = hwbkpt.Client(socket=sock, name=f"fuzz{seed}", timeout=TIMEOUT)
            except TimeoutError:
                with lock:
                    failures.append(f"{method}({params!r}) -> no answer in {TIMEOUT} s"[:2000])
                code = "timeout"
            except Exception as err:
                with lock:
                    failures.append(f"{method}({params!r}) -> {type(err).__name__}: {err}"[:2000])
                code = type(err).__name__
            with lock:
                outcomes[f"{method}:{code}"] += 1
            # Never keep a target stopped for long: drop the events, resume what we hold.
            while (ev := client._session.next_event()) is not None:
                if ev.kind == "stop" and fz.rng.random() < 0.9:
                    with contextlib.suppress(hwbkpt.HwbkptError):
                        client.resume(ev.tid)
    finally:
        client.close()


def run_byte_fuzzer(sock: str, seed: int, deadline: float, outcomes: Counter[str],
                    lock: threading.Lock) -> None:  # fmt: skip
    """Raw sockets: a valid hello, then random bytes (or truncated/odd msgpack)."""
    import msgpack

    rng = random.Random(seed)
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2.0)
        try:
            s.connect(sock)
            if rng.random() < 0.7:
                s.sendall(msgpack.packb([0, 0, "hello", [{"version": 1}]]))
            kind = rng.randrange(5)
            if kind == 0:
                data = rng.randbytes(rng.randrange(1, 4096))
            elif kind == 1:
                data = msgpack.packb([0, rng.randrange(2**32), "watch", [{"pid": 1}]])[:-3]
            elif kind == 2:
                data = msgpack.packb([rng.choice([0, 1, 2, 3, -1]), rng.choice([0, -1, 2**40]),
                                      rng.choice(["watch", 5, None]), rng.choice([[], [1], {}])])
            elif kind == 3:
                data = b"\xc1" + rng.randbytes(8)
            else:
                data = b"\xdd\xff\xff\xff\xff" + b"\x90" * 100  # a huge array header
            s.sendall(data)
            with contextlib.suppress(TimeoutError, OSError):
                while s.recv(65536):
                    pass
            with lock:
                outcomes[f"bytes:{kind}"] += 1
        except OSError:
            with lock:
                outcomes["bytes:oserror"] += 1
        finally:
            s.close()


@pytest.mark.timeout(180)
def test_fuzz_live_daemon(daemon: Daemon, target: Start) -> None:
    n = 50000
    spinner = target("spinner", 200)
    writer = target("writer", n, "gate2")
    addrs = [info_int(spinner, "addr"), info_int(writer, "addr"), info_int(writer, "addr2"),
             info_int(writer, "func")]  # fmt: skip
    pids = [spinner.pid, writer.pid]
    good = hwbkpt.Client(socket=daemon.socket, name="well-behaved", timeout=TIMEOUT)
    # The highest priority, requested first: no fuzzer's watch can preempt these.
    top = 2**31
    w = good.watch(writer.pid, info_int(writer, "addr"), mode="count", priority=top)
    w2 = good.watch(spinner.pid, info_int(spinner, "addr"), mode="count", priority=top)
    assert w.state == w2.state == "installed"
    spinner.go()
    writer.go()

    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + FUZZ_SECONDS
    threads = [
        threading.Thread(
            target=run_fuzzer,
            args=(daemon.socket, seed, pids, addrs, daemon.pid, deadline, outcomes, failures,
                  lock),
            daemon=True,
        )
        for seed in range(FUZZERS)
    ] + [threading.Thread(target=run_byte_fuzzer,
                          args=(daemon.socket, 99, deadline, outcomes, lock), daemon=True)]
    for t in threads:
        t.start()
    good_events: Counter[str] = Counter()
    while time.monotonic() < deadline + 60 and any(t.is_alive() for t in threads):
        ev = good.next_event(timeout=0.1)
        if ev is not None:
            good_events[f"{ev.kind}:{ev.get('reason', '')}"] += 1
    for t in threads:
        t.join(1)
    assert not any(t.is_alive() for t in threads), "a fuzzer hung"
    total = sum(outcomes.values())
    print(f"FIGURE fuzz_requests={total} in {FUZZ_SECONDS:g} s")
    print("FIGURE fuzz_outcomes=" + ", ".join(f"{k}={v}" for k, v in sorted(outcomes.items())))

    assert daemon.alive(), "the daemon died"
    counters = good.status()["counters"]
    print(f"FIGURE fuzz_well_behaved_events={dict(good_events)}")
    print(f"FIGURE fuzz_daemon_counters={counters}")
    # The well-behaved client's watches have the highest priority and were there first:
    # they must never have left the hardware.
    assert not [k for k in good_events if k.startswith("uninstalled")], good_events
    assert failures == [], "\n".join(failures[:20])
    log = daemon.stderr()
    assert "crashed" not in log, log_excerpt(log)
    assert "Traceback" not in log, log_excerpt(log)
    # The targets live on, and the well-behaved client's counts are exact.
    assert writer.line(60) == f"done var={n} pair0=0"
    assert w.count() == n
    assert w2.count() > 0
    spinner.go()  # (spinner exits right after its last write: no exact count to compare)
    assert spinner.line().startswith("done var=")
    assert spinner.wait(TIMEOUT) == 0
    writer.go()
    assert writer.wait(TIMEOUT) == 0
    good.status()
    good.close()
