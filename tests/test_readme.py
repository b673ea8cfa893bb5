"""The README's tour and its Python API section, run verbatim against a real daemon.

Every fenced ``sh`` and ``python`` block of the README, from "A short tour" to "Security",
is run in order in one ``bash`` script from the repository's folder, as a reader would run
them in their second terminal (``python`` blocks through ``python3 -``, after the tour's
``. .venv/bin/activate``). The one thing the test supplies is the daemon: its own, on a
private socket, through ``HWBKPT_SOCKET`` (the tour's ``make run`` is the reader's). The
script runs in its own session, and the whole process group is killed at the end, so the
tour's background program never outlives the test.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests._daemon import Daemon

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.timeout(150),
]

ROOT = Path(__file__).resolve().parent.parent
DEADLINE = 120.0


def tour_blocks() -> list[tuple[str, str]]:
    """The fenced ``(language, code)`` blocks of the README's tour and API section."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A short tour") : text.index("## Security")]
    return re.findall(r"^```(sh|python)\n(.*?)^```$", tour, flags=re.MULTILINE | re.DOTALL)


def tour_script() -> str:
    parts = ["set -e"]
    for n, (language, code) in enumerate(tour_blocks()):
        if language == "sh":
            parts.append(code)
        else:
            parts.append(f"python3 - <<'README_PYTHON_{n}'\n{code}README_PYTHON_{n}")
    return "\n".join(parts) + "\n"


def test_readme_has_the_blocks() -> None:
    kinds = [language for language, _ in tour_blocks()]
    assert kinds == ["sh", "sh", "python", "python", "sh"]


def test_readme_tour_and_api_run_verbatim(daemon: Daemon) -> None:
    tour_file = ROOT / "tour.txt"
    proc = subprocess.Popen(
        ["bash", "-c", tour_script()],
        cwd=ROOT,
        env={**os.environ, "HWBKPT_SOCKET": daemon.socket},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        out, err = "", ""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the tour's program too, if it is left
        except ProcessLookupError:
            pass
        proc.wait()
        tour_file.unlink(missing_ok=True)
    assert proc.returncode == 0, f"{out}\n{err}"
    lines = out.splitlines()
    # hwbkpt status and demo
    assert any(line.startswith("hwbkptd ") for line in lines), out
    # the stop-mode watch: each write with old and new value, then the count
    stops = [line for line in lines if " stop " in line and " old=" in line]
    assert stops, out
    # The first old= is the value once the watch is installed. A write that races the
    # installation (the program writes every 10 ms; installing on a busy machine can take
    # longer) makes the first step larger than one: only the later ones are exact.
    for i, line in enumerate(stops):
        old, new = (int(v, 16) for v in re.findall(r"(?:old|new)=(0x[0-9a-f]+)", line))
        assert new > old if i == 0 else new == old + 1, line
    assert any(re.fullmatch(r"count: [1-9][0-9]*", line) for line in lines), out
    # three JSON hit lines
    assert sum(line.startswith('{"event": "hit"') for line in lines) == 3, out
    # the first Python block
    assert sum(line.startswith("hit ") for line in lines) == 3, out
    assert any(line.startswith("b counted ") for line in lines), out
    # the API section, line by line
    for expected in (
        r"watch \d+ installed",
        r"watches \[\d+\]",
        r"counted True",
        r"state removed",
        r"pieces \[4, 8, 4\]",
        r"stop interrupt",
        r"stop 0xffff0ff1",
        r"stop watch True",
        r"memory 12345",
        r"stop step",
    ):
        assert any(re.fullmatch(expected, line) for line in lines), f"{expected}:\n{out}"
    assert "Traceback" not in err, err
