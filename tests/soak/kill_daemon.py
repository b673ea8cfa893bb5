#!/usr/bin/env python3
"""Soak: SIGKILL the daemon while its targets are being hit; count the targets that survive.

    .venv/bin/python tests/soak/kill_daemon.py [N] [--mode count|notify|stop|all]
                                               [--park] [--targets K]

Each of the N runs starts a daemon (tests/_daemon.py), K ``spinner`` targets (tests/progs)
and watches on them in the chosen mode (``all``: count, notify and stop targets side by side;
``stop``: a client thread resumes every stop at once, so hits are always in flight). After a
random 50-300 ms it SIGKILLs the daemon, then tells every target to finish and checks that
it exits 0. A target that dies is reported with its signal and the state of its thread
sampled from /proc just before the kill (state letter, wchan, pending signals).

Prints one line per death and, at the end, ``survived S/T targets (R%)``. Exit status 0 if
every target survived. Needs root. Everything started is killed and reaped, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hwbkpt
from tests._daemon import start_daemon
from tests._progs import build, parse_info

TIMEOUT = 10.0


def snapshot(pid: int) -> str:
    """State letter, wchan and pending-signal masks of the main thread of ``pid``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
        state = raw[raw.rindex(b")") + 2 :].split()[0].decode()
        with open(f"/proc/{pid}/wchan") as f:
            wchan = f.read()
        fields = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("SigPnd", "ShdPnd"):
                    fields[key] = value.strip()
        return f"state={state} wchan={wchan} SigPnd={fields['SigPnd']} ShdPnd={fields['ShdPnd']}"
    except OSError as err:
        return f"({err})"


class Spinner:
    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            [str(build("spinner")), "1"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0
        )
        assert self.popen.stdout is not None
        ready, _, _ = select.select([self.popen.stdout], [], [], TIMEOUT)
        if not ready:
            raise RuntimeError("spinner printed nothing")
        self.info = parse_info(self.popen.stdout.readline().decode())
        self.pid = self.popen.pid
        self.addr = int(self.info["addr"])

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"\n")

    def finish(self) -> int:
        """Tell it to stop; its exit status (-SIG if killed)."""
        with contextlib.suppress(BrokenPipeError):
            self.go()
        try:
            return self.popen.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            return 999  # still running (stuck): reported as a failure

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(TIMEOUT)
        for s in (self.popen.stdin, self.popen.stdout):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()


def resumer(client: hwbkpt.Client, stop: threading.Event) -> None:
    """Resume every stop at once until the daemon is gone."""
    with contextlib.suppress(hwbkpt.HwbkptError, OSError, TimeoutError):
        while not stop.is_set():
            event = client.next_event(timeout=0.5)
            if event is not None and event.kind == "stop":
                with contextlib.suppress(hwbkpt.BusyError, hwbkpt.NoSuchProcessError):
                    client.resume(event.tid)


def one_run(tmp: Path, run: int, modes: list[str], park: bool) -> list[tuple[str, int, str]]:
    """One daemon, one target per entry of ``modes``; returns ``(mode, status, snapshot)``
    per target."""
    sock = str(tmp / f"s{run}.sock")
    args = ["--park"] if park else []
    daemon = start_daemon(sock, *args, log_path=tmp / f"daemon{run}.log")
    targets: list[Spinner] = []
    clients: list[hwbkpt.Client] = []
    threads: list[threading.Thread] = []
    stop = threading.Event()
    results = []
    try:
        for mode in modes:
            t = Spinner()
            targets.append(t)
            c = hwbkpt.Client(socket=sock, name=f"{mode}-{run}", timeout=TIMEOUT)
            clients.append(c)
            c.watch(t.pid, t.addr, mode=mode)
            if mode in ("stop", "notify"):
                th = threading.Thread(target=resumer, args=(c, stop), daemon=True)
                th.start()
                threads.append(th)
        for t in targets:
            t.go()
        time.sleep(random.uniform(0.05, 0.3))
        snaps = [snapshot(t.pid) for t in targets]
        daemon.proc.kill()
        daemon.proc.wait(TIMEOUT)
        stop.set()
        for mode, t, snap in zip(modes, targets, snaps, strict=True):
            results.append((mode, t.finish(), snap))
    finally:
        stop.set()
        daemon.kill()
        for c in clients:
            c.close()
        for th in threads:
            th.join(TIMEOUT)
        for t in targets:
            t.kill()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=100, help="runs (default 100)")
    parser.add_argument("--mode", choices=("count", "notify", "stop", "all"), default="all")
    parser.add_argument("--park", action="store_true", help="run the daemon with --park")
    parser.add_argument("--targets", type=int, default=3, help="targets per run (default 3)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    if args.mode == "all":
        modes = [("count", "notify", "stop")[i % 3] for i in range(max(args.targets, 3))]
    else:
        modes = [args.mode] * args.targets
    total = survived = 0
    deaths: dict[str, int] = {}
    by_state: dict[str, list[int]] = {}  # "mode state wchan" -> [survived, died]
    with tempfile.TemporaryDirectory(prefix="hwbkptd-soak-") as tmpdir:
        tmp = Path(tmpdir)
        for run in range(args.n):
            for mode, status, snap in one_run(tmp, run, modes, args.park):
                total += 1
                key = f"{mode} " + " ".join(snap.split()[:2])
                by_state.setdefault(key, [0, 0])[status != 0] += 1
                if status == 0:
                    survived += 1
                    continue
                what = (
                    f"signal {signal.Signals(-status).name}" if status < 0
                    else "stuck" if status == 999 else f"exit {status}"
                )
                deaths[f"{mode}: {what}"] = deaths.get(f"{mode}: {what}", 0) + 1
                print(f"run {run}: {mode} target {what}; before the kill: {snap}", flush=True)
    park = "on" if args.park else "off"
    print(
        f"mode={args.mode} park={park} runs={args.n}: survived {survived}/{total} targets "
        f"({100.0 * survived / max(total, 1):.1f}%)"
        + (f"; deaths: {deaths}" if deaths else "")
    )
    for key, (ok, died) in sorted(by_state.items()):
        print(f"  before the kill {key}: survived {ok}, died {died}")
    return 0 if survived == total else 1


if __name__ == "__main__":
    sys.exit(main())
