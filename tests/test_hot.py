"""The tracer's hot loop (hwbkptd/_tracer.py): a stop-mode hit loop is served without
trio's scheduler, and everyone else is still served meanwhile."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable

import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import TIMEOUT, info_int

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]


def _resume_loop(client: hwbkpt.Client, stops: list[int], stop: threading.Event) -> None:
    """Resume every stop until told to stop (the hit loop of a monitor)."""
    while not stop.is_set():
        ev = client.next_event(timeout=0.2)
        if ev is not None and ev.kind == "stop":
            client.resume(ev.tid, wait=False)
            stops[0] += 1


@pytest.mark.timeout(60)
def test_hit_loop_runs_hot_and_others_are_served(daemon: Daemon, target: Start) -> None:
    proc = target("spinner")  # stores in a tight loop: a stop at every store
    looper = hwbkpt.Client(socket=daemon.socket, name="looper", timeout=TIMEOUT)
    other = hwbkpt.Client(socket=daemon.socket, name="other", timeout=TIMEOUT)
    stops = [0]
    done = threading.Event()
    thread = threading.Thread(target=_resume_loop, args=(looper, stops, done))
    try:
        looper.watch(proc.pid, info_int(proc, "addr"), mode="stop")
        thread.start()
        proc.go()
        deadline = time.monotonic() + TIMEOUT
        while stops[0] < 300:
            assert time.monotonic() < deadline, f"only {stops[0]} stops"
            time.sleep(0.01)
        # While the loop runs: requests of another client, a new connection, and a
        # client sending garbage are all served; the loop goes on.
        for _ in range(20):
            assert other.call("ping", data=b"x") == b"x"
        with hwbkpt.Client(socket=daemon.socket, name="late", timeout=TIMEOUT) as late:
            assert late.status()["clients"]
        with socket.socket(socket.AF_UNIX) as raw:
            raw.settimeout(TIMEOUT)
            raw.connect(daemon.socket)
            raw.sendall(b"\xc1")  # a reserved msgpack byte: EPROTO, then hang up
            received = b""
            while chunk := raw.recv(4096):
                received += chunk
            assert b"disconnected" in received
            assert b"EPROTO" in received
        before = stops[0]
        time.sleep(0.2)
        assert stops[0] > before  # the hit loop was not disturbed
        # The loop was served hot (how often depends on how fast the looper answers).
        assert other.status()["counters"]["hot_rounds"] > 0
    finally:
        done.set()
        thread.join(TIMEOUT)
        looper.close()
        other.close()
    proc.close_stdin()
    assert proc.wait(TIMEOUT) == 0
