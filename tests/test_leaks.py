"""No leak: 10,000 watch/unwatch cycles leave the daemon's open file descriptors and RSS where
they started (DESIGN.md §7: a daemon that runs for months).

Figures are printed as ``FIGURE`` lines (``pytest -s``).
"""

from __future__ import annotations

import os
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
CYCLES = int(os.environ.get("HWBKPT_LEAK_CYCLES", "10000"))
WARMUP = 500
MAX_RSS_GROWTH_KIB = 4096


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(600)
def test_watch_unwatch_cycles_do_not_leak(daemon: Daemon, target: Start) -> None:
    proc = target("spinner", 200)
    addr = info_int(proc, "addr")
    proc.go()
    modes = ("count", "notify", "stop")
    with hwbkpt.Client(socket=daemon.socket, name="leak", timeout=TIMEOUT) as c:
        # A watch kept for the whole test, so the target stays managed and the cycles below
        # measure watches and slots, not attach/detach. Warm-up fills caches and pools.
        keep = c.watch(proc.pid, addr + 8, mode="count")

        def cycle(i: int) -> None:
            w = c.watch(proc.pid, addr, mode=modes[i % 3])
            if modes[i % 3] == "stop":
                # A stop may be reported before the watch goes; take it and resume.
                w.remove()
                while (ev := c.next_event(timeout=0)) is not None:
                    if ev.kind == "stop":
                        try:
                            c.resume(ev.tid)
                        except hwbkpt.BusyError:
                            pass
            else:
                w.remove()

        for i in range(WARMUP):
            cycle(i)
        while c.next_event(timeout=0.2) is not None:
            pass
        fds0, rss0 = open_fds(daemon.pid), rss_kib(daemon.pid)
        for i in range(CYCLES):
            cycle(i)
        while c.next_event(timeout=0.2) is not None:
            pass
        assert c.watches()
        assert c.watches()[0]["id"] == keep.id
        fds1, rss1 = open_fds(daemon.pid), rss_kib(daemon.pid)
        # Detach and reattach cycles too (the target leaves and re-enters management).
        keep.remove()
        for i in range(200):
            c.watch(proc.pid, addr, mode=modes[i % 2]).remove()
        fds2 = open_fds(daemon.pid)
    print(f"FIGURE leak_cycles={CYCLES} (+{WARMUP} warm-up)")
    print(f"FIGURE leak_fds_before={fds0} after={fds1} after_detach_cycles={fds2}")
    print(f"FIGURE leak_rss_kib_before={rss0} after={rss1} growth={rss1 - rss0}")
    assert fds1 == fds0
    assert rss1 - rss0 < MAX_RSS_GROWTH_KIB
    assert fds2 <= fds0
    proc.go()
    assert proc.line().startswith("done var=")
    assert proc.wait(TIMEOUT) == 0
