"""`python -m bench --quick` still runs end to end (keeps bench/ from rotting).

Asserts the shape of the JSON only: every scenario is there with a reference figure, and
the daemon side is either figures or an explicit "daemon side failed: ..." record.  No
time is ever asserted (DESIGN.md §9).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ["count", "notify", "stop", "rpc", "threads", "memory", "gdb"]

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc for the C references"),
    pytest.mark.skipif(shutil.which("gdb") is None, reason="needs gdb (make deps installs it)"),
    pytest.mark.timeout(300),
]


def _is_figure(f: Any) -> bool:
    return (isinstance(f, dict) and {"median", "min", "max", "unit", "runs"} <= f.keys()
            and len(f["runs"]) >= 1)


def _daemon_ok(d: Any) -> bool:
    """Figures, or the explicit failure record; never something in between."""
    if isinstance(d, dict) and "error" in d:
        return str(d["error"]).startswith("daemon side failed: ")
    return isinstance(d, dict) and bool(d) and all(
        _is_figure(v) or _daemon_ok(v) for v in d.values())


def test_quick_bench_writes_every_scenario(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=280, check=False,
    )
    assert out.exists(), res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert "interrupted" not in data
    assert "failed" not in data, data["failed"]
    for name in SCENARIOS:
        sc = data["scenarios"].get(name)
        assert sc is not None, f"{name} missing"
        assert "failed" not in sc, f"{name}: {sc.get('failed')}"
        placed = name in ("stop", "gdb")
        ref = sc["placements"]["unpinned"]["reference"] if placed else sc["reference"]
        assert ref, name
        assert all(_is_figure(f) for f in ref.values() if isinstance(f, dict)), name
        if name == "stop":
            for place in ("unpinned", "cpu0"):
                assert _daemon_ok(sc["placements"][place]["daemon"]), (name, place)
                # the C references (with C and with bare Python clients) and the two
                # Python floors (bench/_floor.py)
                assert {"client_per_hit_ns", "pyclient_per_hit_ns", "pyclient2_per_hit_ns",
                        "py_raw_per_hit_ns", "py_trio_per_hit_ns"} <= (
                    sc["placements"][place]["reference"].keys()
                ), place
                # the client's CPU per stop: the library alone (v1 and v2) and the process
                daemon = sc["placements"][place]["daemon"]
                # and the daemon's CPU per stop with one and two clients
                for key in ("client_lib_cpu_v1_ns", "client_lib_cpu_v2_ns",
                            "client_cpu_per_stop_ns", "daemon_cpu1_per_stop_ns",
                            "daemon_cpu2_per_stop_ns"):
                    assert _is_figure(daemon.get(key)), (place, key)
                    assert daemon[key]["median"] > 0, (place, key)
        elif name == "gdb":
            for place in ("unpinned", "cpu0"):
                assert _daemon_ok(sc["placements"][place]["daemon"]), (name, place)
        elif name == "rpc":
            for by in sc["by_clients"].values():
                assert _daemon_ok(by["daemon"]), name
            # the 32 clients spread over processes, and the library's CPU without a daemon
            assert sc["params"]["procs_per_run"]["32"] > 1
            for key in ("blocking_cpu_us", "trio_cpu_us"):
                assert _is_figure(sc["client_lib"].get(key)), key
                assert sc["client_lib"][key]["median"] > 0, key
        else:
            assert _daemon_ok(sc["daemon"]), name
    cond = data["scenarios"]["cond"]  # issue 12: every row measured (figures meaningless)
    assert "failed" not in cond, cond.get("failed")
    for key, row in cond["rows"].items():
        if key == "gdb_false" and row.get("error") == "gdb is not installed":
            continue
        assert _is_figure(row.get("per_hit_ns")), (key, row)
    up = data["scenarios"]["uprobe"]  # uprobe vs hardware execute stop, C tracer both
    assert "failed" not in up, up.get("failed")
    for place in ("unpinned", "cpu0"):
        p = up["placements"][place]
        assert _is_figure(p["hw_per_stop_ns"]), (place, p)
        assert _is_figure(p["uprobe_per_stop_ns"]), (place, p)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "C reference" in res.stdout  # the table was printed
    assert "client library CPU/stop, protocol v2" in res.stdout
    assert "client library CPU/pair, trio, no daemon" in res.stdout
