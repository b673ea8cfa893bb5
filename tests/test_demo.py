"""``hwbkpt demo`` end to end: fast, exit 0, shows sharing and a pending-then-installed watch,
and leaves nothing behind."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

import hwbkpt
from tests._daemon import Daemon

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.timeout(60),
]

LIMIT = 10.0  # seconds the whole demo may take


def test_demo_shows_sharing_and_pending_then_installed(daemon: Daemon) -> None:
    started = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "hwbkpt._cli", "--socket", daemon.socket, "demo"],
            capture_output=True, text=True, timeout=LIMIT, check=False,
        )
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"hwbkpt demo took more than {LIMIT} s; output so far:\n{err.stdout!r}")
    elapsed = time.monotonic() - started
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert proc.stderr == ""
    assert elapsed < LIMIT

    # sharing: one slot with two holders
    assert "=> SHARED: one slot, two holders (alice and bob)" in out
    assert re.search(r"slot 0: counter .*holders: alice \(client #\d+\), bob \(client #\d+\)", out)
    # the fifth watch waits, then is installed when a slot frees
    pending = re.search(r"carol watches `delta`: watch (\d+), PENDING", out)
    assert pending, out
    wid = pending.group(1)
    assert f"pending: watch {wid} (no free slot; it waits)" in out
    assert re.search(rf"carol got the event: installed \{{watch {wid}, tid \d+\}}", out), out
    assert re.search(r"slot \d: delta .*holders: carol", out)
    # live counts that grow
    counts = [int(m) for m in re.findall(r"live counts: alice +(\d+)", out)]
    assert len(counts) >= 2, out
    assert counts == sorted(counts), out
    assert counts[-1] > 0, out
    carol = [int(m) for m in re.findall(r"carol +(\d+)\s*$", out, re.MULTILINE)]
    assert carol, out
    assert carol[-1] > 0, out

    # cleanup: the program is gone, and the daemon has no demo client or target left
    (pid,) = re.findall(r"Started a small program \(pid (\d+)\)", out)
    assert not os.path.exists(f"/proc/{pid}")
    deadline = time.monotonic() + 5
    with hwbkpt.Client(socket=daemon.socket, name="test", timeout=5) as c:
        while True:
            status = c.status()
            names = {cl.get("name") for cl in status["clients"]}
            if not names & {"alice", "bob", "carol"} and not status.get("targets"):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the demo left things behind in the daemon: {status}")
            time.sleep(0.05)
