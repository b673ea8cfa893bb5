"""The protocol package does no I/O: importing it pulls in neither trio nor socket."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_in_no_io_modules() -> None:
    code = (
        "import sys, hwbkpt_proto\n"
        "bad = sorted(m for m in ('trio', 'socket', 'asyncio', 'selectors') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout.strip() == ""
