"""The test suite's own hygiene (issue 10, point 6): a failing test shows the part of the
daemon's log that explains it, and a socket one test leaks fails that test, not another."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests._daemon import MAX_NOTABLE_LINES, TAIL_LINES, log_excerpt

ROOT = Path(__file__).resolve().parent.parent


def _log(n: int) -> list[str]:
    return [f"hwbkptd[7] DEBUG hwbkptd._engine: line {i}" for i in range(n)]


def test_excerpt_of_a_short_log_is_the_whole_log() -> None:
    lines = _log(10)
    out = log_excerpt("\n".join(lines)).splitlines()
    assert out[0] == "(10 lines in all)"
    assert out[1:] == lines


def test_excerpt_is_the_tail_plus_warnings_errors_and_whole_tracebacks() -> None:
    lines = _log(100_000)
    lines[10] = "hwbkptd[7] WARNING hwbkptd._engine: thread 5: empty DR6"
    lines[20:20] = [
        "hwbkptd[7] ERROR hwbkptd.server: handling failed",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "KeyError: 3",
    ]
    out = log_excerpt("\n".join(lines))
    shown = out.splitlines()
    assert shown[0] == f"({len(lines)} lines in all)"
    assert "11: hwbkptd[7] WARNING hwbkptd._engine: thread 5: empty DR6" in shown
    assert "21: hwbkptd[7] ERROR hwbkptd.server: handling failed" in shown
    assert "24: KeyError: 3" in shown  # the traceback is shown to its end
    assert "25: " + lines[24] not in shown  # ... and no further
    assert shown[-TAIL_LINES:] == lines[-TAIL_LINES:]
    assert len(shown) < TAIL_LINES + 20


def test_excerpt_caps_what_it_shows_before_the_tail() -> None:
    lines = [f"hwbkptd[7] WARNING x: {i}" for i in range(10_000)]
    shown = log_excerpt("\n".join(lines)).splitlines()
    assert len(shown) <= 1 + 1 + MAX_NOTABLE_LINES + 1 + 1 + TAIL_LINES
    assert shown[-1] == lines[-1]
    assert any(line.startswith("... and ") for line in shown)


def test_a_leaked_socket_fails_the_test_that_leaked_it(tmp_path: Path) -> None:
    """A socket kept alive only by a reference cycle is freed whenever the garbage collector
    next runs — in some later test, whose ``filterwarnings = error`` then turns the
    ResourceWarning into its own failure. The autouse fixture collects at each teardown."""
    (tmp_path / "conftest.py").write_text("from tests._daemon import close_leftover_clients\n")
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(
            """
            import socket

            def test_leaks_a_socket():
                s = socket.socket(socket.AF_UNIX)
                cycle = [s]
                cycle.append(cycle)

            def test_fails_holding_a_socket():
                s = socket.socket(socket.AF_UNIX)
                assert s is None  # fails; pytest keeps the frame (and s) for post-mortems

            def test_innocent():
                assert [[0] for _ in range(100_000)]  # allocations: the collector may run

            def test_fails_too():
                assert False  # replaces sys.last_traceback: what still held s would go now
            """
        )
    )
    args = ["-p", "no:randomly", "-p", "no:cacheprovider", "-W", "error", "-q", "-rA"]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", *args, str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout
    assert "ERROR test_leak.py::test_leaks_a_socket" in out, out
    assert "ERROR test_leak.py::test_fails_holding_a_socket" in out, out
    assert "PASSED test_leak.py::test_innocent" in out, out
    assert "ERROR test_leak.py::test_fails_too" not in out, out
    # The leaker passed its call and failed its teardown; the failing holder failed both.
    assert "2 failed, 2 passed, 2 errors" in out, out
