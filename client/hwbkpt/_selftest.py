"""``hwbkpt selftest``: measure what this kernel and CPU do, as the daemon relies on it.

Runs the probes of :mod:`hwbkptd._platform` in this process (root, or CAP_SYS_PTRACE and
CAP_PERFMON: each probe traces a child process of its own) and prints one line per
behaviour: what was found and what the daemon does about it. Run it first on a new machine
or kernel, as you would ``perf test``. It needs no daemon and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from hwbkptd._platform import PROBES, Finding, run_all

__all__ = ["configure", "format_finding", "run"]

EXIT_OK = 0
EXIT_FAILED = 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument(
        "--only",
        action="append",
        choices=list(PROBES),
        metavar="PROBE",
        help=f"run only this probe (repeatable): {', '.join(PROBES)}",
    )


def format_finding(finding: Finding) -> str:
    mark = "ok  " if finding.ok else "FAIL"
    return f"{mark} {finding.name:<12} {finding.found}\n{'':17}daemon: {finding.action}\n"


def run(_client: Any, args: argparse.Namespace) -> int:
    """Run the probes; exit 0 when the daemon can work with every finding, else 1."""
    if os.geteuid() != 0:
        sys.stderr.write(
            "hwbkpt selftest: needs root (it traces and watches a child process of its own)\n"
        )
        return EXIT_FAILED
    findings = run_all(args.only)
    if args.json:
        json.dump([f.as_dict() for f in findings], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for finding in findings:
            sys.stdout.write(format_finding(finding))
        bad = [f.name for f in findings if not f.ok]
        sys.stdout.write(
            f"{len(findings) - len(bad)} of {len(findings)} as the daemon expects"
            + (f"; not: {', '.join(bad)}\n" if bad else "\n")
        )
    return EXIT_OK if all(f.ok for f in findings) else EXIT_FAILED
