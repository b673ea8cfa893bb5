"""``hwbkpt selftest``: every probe runs on this machine and finds what the daemon expects.

The probes are also what the rest of the suite reads to choose its expectations (e.g.
whether ``int1`` traps or faults here), so they are checked against the kernel directly.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from hwbkpt import _cli as cli
from hwbkptd import _platform
from tests.test_security import run_as

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

CLI = [sys.executable, "-m", "hwbkpt._cli"]


@pytest.mark.timeout(120)
def test_selftest_json_every_probe_as_the_daemon_expects() -> None:
    out = subprocess.run([*CLI, "selftest", "--json"], capture_output=True, text=True, timeout=100)
    findings = {f["name"]: f for f in json.loads(out.stdout)}
    assert set(findings) == set(_platform.PROBES)
    bad = {name: f["found"] for name, f in findings.items() if not f["ok"]}
    assert not bad, bad
    assert out.returncode == 0
    assert findings["int1"]["value"] == ("fault" if _platform.int1_faults() else "trap")
    assert findings["struct user"]["value"] == 928
    breakpoints = findings["breakpoints"]["value"]
    assert breakpoints["count"] == breakpoints["writes"]
    assert findings["notify ring"]["value"]["lost"] == 0


@pytest.mark.timeout(60)
def test_selftest_prints_one_line_per_probe_and_what_the_daemon_does() -> None:
    out = subprocess.run(
        [*CLI, "selftest", "--only", "int1", "--only", "struct user"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("ok   int1 ")
    assert lines[1].strip().startswith("daemon: ")
    assert lines[2].startswith("ok   struct user ")
    assert lines[-1] == "2 of 2 as the daemon expects"


@pytest.mark.timeout(60)
def test_selftest_needs_root() -> None:
    def as_user() -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["selftest"])
        return code, err.getvalue()

    code, err = run_as(4242, as_user)
    assert code == 1
    assert "needs root" in err


def test_int1_probe_matches_the_kernel() -> None:
    """The probe's own evidence: si_addr equals rip, and sits at or after the 0xF1 byte."""
    finding = _platform.probe_int1()
    assert finding.ok, finding.found
    details = finding.details
    assert details["code"] == 1  # TRAP_BRKPT
    assert details["addr"] == details["rip"]
