"""``hwbkpt demo``: a short narrated run that shows what the daemon does, in a few seconds.

It starts a small program of its own, connects three clients (alice, bob, carol) and shows:

1. alice and bob watch the same variable: the daemon realizes both with **one** slot that
   has two holders, and each client still gets its own count;
2. alice fills the thread's other three slots; carol's watch then finds no free slot and is
   **pending**;
3. alice removes one watch: carol's watch gets the freed slot, and carol is told with an
   ``installed`` event.

Then everything is cleaned up: the clients are closed and the program is killed and reaped.

The program is a Python child (``sys.executable``) that writes four 8-byte ``ctypes``
variables in a loop, a few hundred times a second. Python rather than C because it needs no
compiler, headers or writable build directory: the demo runs wherever the ``hwbkpt`` CLI
runs (a hardware watchpoint sees a store from CPython's ``ctypes`` like any other). The
child also exits by itself when its stdin closes, so it cannot outlive the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from hwbkpt._blocking import Client, Watch

__all__ = ["TARGET_SOURCE", "configure", "run"]

VARIABLES = ("counter", "alpha", "beta", "gamma", "delta")

# The demo's target. Prints the address of each variable (one line), then writes them all,
# a few hundred times a second, until stdin reaches EOF or gets a line.
TARGET_SOURCE = r"""
import ctypes, os, select, sys
names = sys.argv[1:]
cells = [(ctypes.c_long * 8)() for _ in names]  # 64 bytes each: malloc'ed, 8-byte aligned
print(" ".join(f"{n}={ctypes.addressof(c):#x}" for n, c in zip(names, cells)), flush=True)
i = 0
while not select.select([0], [], [], 0.002)[0]:
    i += 1
    for c in cells:
        c[0] = i
"""

STEP_PAUSE = 1.0  # seconds of live counting between the steps
EVENT_TIMEOUT = 3.0  # seconds to wait for carol's `installed` event


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pause",
        type=float,
        default=STEP_PAUSE,
        metavar="SECONDS",
        help=f"how long to let the program run between steps (default {STEP_PAUSE})",
    )


class _Narrator:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    def step(self, title: str) -> None:
        print(f"\n[{time.monotonic() - self.start:4.1f}s] {title}", flush=True)


@contextlib.contextmanager
def _target() -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int]]]:
    """Start the demo program; kill and reap it however the demo ends."""
    proc = subprocess.Popen(
        [sys.executable, "-c", TARGET_SOURCE, *VARIABLES],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10.0)
        line = proc.stdout.readline().decode() if ready else ""
        addrs = {}
        for word in line.split():
            name, _, value = word.partition("=")
            addrs[name] = int(value, 0)
        if set(addrs) != set(VARIABLES):
            raise RuntimeError(f"the demo program did not start (it printed {line!r})")
        yield proc, addrs
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10.0)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def _thread_of(status: dict[str, Any], pid: int) -> dict[str, Any] | None:
    for t in status.get("targets") or []:
        if t.get("pid") == pid:
            threads = t.get("threads") or []
            return threads[0] if threads else None
    return None


def _holders(slot: dict[str, Any]) -> list[Any]:
    """The client ids holding a slot (``holders`` in PROTOCOL.md, ``clients`` in the daemon)."""
    return list(slot.get("holders", slot.get("clients")) or [])


def _slot_lines(status: dict[str, Any], pid: int, labels: dict[int, str]) -> list[str]:
    """The thread's slots as the daemon reports them, with the variables' names."""
    names = {c.get("id"): c.get("name") for c in status.get("clients") or []}
    thread = _thread_of(status, pid)
    if thread is None:
        return ["    (the daemon reports no thread for the program)"]
    out = []
    slots = thread.get("slots") or []
    for n in range(max(4, len(slots))):
        if n >= len(slots):
            out.append(f"    slot {n}: free")
            continue
        slot = slots[n]
        who = ", ".join(f"{names.get(c, '?')} (client #{c})" for c in _holders(slot))
        var = labels.get(slot.get("addr"), f"{slot.get('addr'):#x}")
        out.append(
            f"    slot {n}: {var:<8} {slot.get('addr'):#x}/{slot.get('length')} "
            f"{slot.get('access')}  holders: {who}"
        )
    for wid in thread.get("pending") or []:
        out.append(f"    pending: watch {wid} (no free slot; it waits)")
    return out


def run(client: Client, args: argparse.Namespace) -> int:
    say = _Narrator()
    pause = max(0.0, args.pause)
    say.say("hwbkpt demo: three clients share one thread's four hardware watchpoint slots.")
    with contextlib.ExitStack() as stack:
        proc, addrs = stack.enter_context(_target())
        labels = {addr: name for name, addr in addrs.items()}
        pid = proc.pid
        say.say(
            f"Started a small program (pid {pid}) that writes the 8-byte variables "
            f"{', '.join(VARIABLES)} a few hundred times a second."
        )

        def connect(name: str) -> Client:
            c = stack.enter_context(Client(client.socket_path, name=name, timeout=client.timeout))
            say.say(f"  {name} connected (client #{c.server_info.get('client_id')})")
            return c

        say.step("Step 1 - two clients watch the same variable")
        alice, bob = connect("alice"), connect("bob")
        a_counter = alice.watch(pid, addrs["counter"], 8, "w", "count")
        say.say(f"  alice watches `counter` for writes: watch {a_counter.id}, {a_counter.state}")
        b_counter = bob.watch(pid, addrs["counter"], 8, "w", "count")
        say.say(f"  bob watches `counter` for writes:   watch {b_counter.id}, {b_counter.state}")
        status = client.status()
        thread = _thread_of(status, pid) or {}
        shared = [
            s for s in thread.get("slots") or []
            if s.get("addr") == addrs["counter"] and len(_holders(s)) == 2
        ]
        say.say("  The daemon's status for the program's thread:")
        for line in _slot_lines(status, pid, labels):
            say.say(line)
        say.say(
            "  => SHARED: one slot, two holders (alice and bob)"
            if len(thread.get("slots") or []) == 1 and shared
            else "  => unexpected: the two watches did not share one slot"
        )
        for _ in range(2):
            time.sleep(pause / 2)
            say.say(
                f"  live counts: alice {a_counter.count():6d}   bob {b_counter.count():6d}"
                "   (each counts from when it started watching)"
            )

        say.step("Step 2 - alice fills the other three slots; carol asks for a fifth")
        fillers: dict[str, Watch] = {}
        for name in ("alpha", "beta", "gamma"):
            fillers[name] = alice.watch(pid, addrs[name], 8, "w", "count")
            say.say(f"  alice watches `{name}`: watch {fillers[name].id}, {fillers[name].state}")
        carol = connect("carol")
        c_delta = carol.watch(pid, addrs["delta"], 8, "w", "count")
        say.say(
            f"  carol watches `delta`: watch {c_delta.id}, {c_delta.state.upper()}"
            + ("  (all four slots are busy)" if c_delta.state == "pending" else "")
        )
        status = client.status()
        for line in _slot_lines(status, pid, labels):
            say.say(line)
        time.sleep(pause / 2)
        say.say(f"  live count: carol {c_delta.count():6d}   (pending: nothing is counted)")

        say.step("Step 3 - alice removes her watch of `gamma`; carol gets the slot")
        fillers["gamma"].remove()
        say.say(f"  alice removed watch {fillers['gamma'].id}")
        event = _wait_installed(carol, c_delta.id, EVENT_TIMEOUT)
        if event is None:
            say.say(f"  carol got NO `installed` event within {EVENT_TIMEOUT:g} s")
        else:
            say.say(
                f"  carol got the event: installed {{watch {event.watch}, tid {event.tid}}} "
                f"-> watch {c_delta.id} is {c_delta.state.upper()}"
            )
        status = client.status()
        for line in _slot_lines(status, pid, labels):
            say.say(line)
        for _ in range(2):
            time.sleep(pause / 2)
            say.say(
                f"  live counts: alice {a_counter.count():6d}   bob {b_counter.count():6d}"
                f"   carol {c_delta.count():6d}"
            )

        say.step("Cleaning up")
        for name in ("carol", "bob", "alice"):
            c = {"alice": alice, "bob": bob, "carol": carol}[name]
            c.close()
        say.say("  closed the three clients (the daemon drops their watches and frees the slots)")
    # The ExitStack killed and reaped the program.
    gone = proc.returncode is not None
    say.say(f"  stopped the program (pid {pid}){'' if gone else ' - it is still running!'}")
    say.say(f"\nDone in {time.monotonic() - say.start:.1f} s. Try `hwbkpt top` "
            "while your own clients run.")
    return 0 if event is not None and gone else 1


def _wait_installed(client: Client, wid: int, timeout: float) -> Any:
    """The ``installed`` event of watch ``wid``, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = client.next_event(timeout=left)
        if event is not None and event.kind == "installed" and event.get("watch") == wid:
            return event
    return None
