"""``hwbkpt dr TID [N VALUE ...]``: this client's virtual debug registers of a thread.

Virtual registers belong to one connection (DESIGN §5.6): what this command writes lasts
while it runs, and each call is a new connection, so without writes they read empty. The
command names the thread's state and the system call it is blocked in, applies the writes
in order (as PTRACE_POKEUSER would), prints the eight registers
with DR7 decoded per slot, and then what is useful beyond this connection: the thread's
*physical* slots, every client's, with their owners (from ``status``). With ``--wait`` it
keeps the writes in effect, printing each stop with this client's DR6, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

import psutil

from hwbkpt._blocking import Client

__all__ = ["check", "configure", "describe_thread", "format_registers", "format_slots", "run"]

_RW = {0b00: "x", 0b01: "w", 0b10: "io", 0b11: "rw"}
_LEN = {0b00: 1, 0b01: 2, 0b11: 4, 0b10: 8}


def format_registers(values: list[int]) -> str:
    """The eight registers as text, DR7 decoded per slot and DR6's hit bits named."""
    lines = [f"DR{n} = {values[n]:#018x}" for n in range(8)]
    dr7, dr6 = values[7], values[6]
    for n in range(4):
        enabled = [name for name, bit in (("L", 2 * n), ("G", 2 * n + 1)) if dr7 >> bit & 1]
        rw = dr7 >> (16 + 4 * n) & 0b11
        length = _LEN[dr7 >> (18 + 4 * n) & 0b11]
        state = "+".join(enabled) if enabled else "off"
        lines.append(f"  slot {n}: {state:4} {_RW[rw]:2} len {length} at {values[n]:#x}")
    hits = [f"B{n}" for n in range(4) if dr6 >> n & 1] + (["BS"] if dr6 >> 14 & 1 else [])
    lines.append(f"  DR6 hits: {' '.join(hits) if hits else 'none'}")
    return "\n".join(lines) + "\n"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tid", type=int, help="the thread")
    parser.add_argument(
        "writes",
        nargs="*",
        metavar="N VALUE",
        help="register index 0-7 and value (0x... or decimal), repeated",
    )
    parser.add_argument(
        "--wait", action="store_true", help="keep the writes in effect and print stops until Ctrl-C"
    )


def _pairs(writes: list[str]) -> list[tuple[int, int]]:
    """``N VALUE`` pairs; raises ValueError saying what is wrong (a usage mistake)."""
    if len(writes) % 2:
        raise ValueError(f"writes come in pairs: N VALUE (got {len(writes)} words)")
    pairs = []
    for n_text, value_text in zip(writes[::2], writes[1::2], strict=True):
        try:
            n, value = int(n_text, 0), int(value_text, 0)
        except ValueError:
            raise ValueError(f"{n_text} {value_text}: N and VALUE are numbers") from None
        if not 0 <= n <= 7:
            raise ValueError(f"there is no debug register {n}; use 0..7")
        pairs.append((n, value))
    return pairs


def check(args: argparse.Namespace) -> str | None:
    """A usage mistake in ``args``, or ``None``."""
    try:
        _pairs(args.writes)
    except ValueError as err:
        return str(err)
    return None


def format_slots(status: dict[str, Any], tid: int) -> str:
    """The physical slots of thread ``tid`` in a ``status`` result, with their owners."""
    names = {c.get("id"): c.get("name") or "?" for c in status.get("clients") or []}
    for target in status.get("targets") or []:
        for thread in target.get("threads") or []:
            if thread.get("tid") != tid:
                continue
            slots = thread.get("slots") or []
            lines = [f"physical slots of thread {tid} (every client's): {len(slots)} of 4 in use"]
            for slot in slots:
                owners = ", ".join(f"#{c} {names.get(c, '?')}" for c in slot.get("holders") or [])
                lines.append(
                    f"  {slot['addr']:#x}/{slot['length']} {slot['access']}  mode {slot['mode']}"
                    f"  watches {','.join(str(w) for w in slot.get('watches') or [])}"
                    f"  owners {owners or '-'}"
                )
            if thread.get("pending"):
                lines.append(
                    "  pending: watches " + ",".join(str(w) for w in thread["pending"])
                )
            return "\n".join(lines) + "\n"
    return f"physical slots of thread {tid}: none (the daemon does not manage it now)\n"


def describe_thread(tid: int) -> str:
    """``thread 812 (prog): sleeping, in system call read``: the thread's state (psutil) and
    the system call it is blocked in (/proc/TID/syscall, named by python-ptrace), as far as
    this machine shows them (best effort: the daemon may serve another host's socket)."""
    try:
        process = psutil.Process(tid)  # a thread id is a psutil.Process too
        text = f"thread {tid} ({process.name()}): {process.status()}"
    except (psutil.Error, ValueError):
        return f"thread {tid}: not found on this machine"
    try:
        with open(f"/proc/{tid}/syscall") as f:
            first = f.read().split(maxsplit=1)[0]  # "running", "-1 ..." (user mode) or "NR ..."
    except (OSError, IndexError):
        return text
    if first.isdigit():
        # python-ptrace's table is imported only here: it takes ~35 ms to load.
        from ptrace.syscall.names import SYSCALL_NAMES

        text += f", in system call {SYSCALL_NAMES.get(int(first), f'#{first}')}"
    return text


def run(client: Client, args: argparse.Namespace) -> int:
    print(describe_thread(args.tid), flush=True)
    for n, value in _pairs(args.writes):
        client.poke_dr(args.tid, n, value)
    print(format_registers([client.peek_dr(args.tid, n) for n in range(8)]), end="", flush=True)
    if not args.writes:
        print(
            "  (these are this connection's virtual registers: each `hwbkpt dr` is a new\n"
            "   connection, so they show only what one call writes; see --wait)"
        )
    print(format_slots(client.status(), args.tid), end="", flush=True)
    if not args.wait:
        return 0
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            event = client.next_event(timeout=1.0)
            if event is None or event.kind != "stop":
                continue
            print(
                f"stop tid {event.tid} rip {event.regs['rip']:#x} dr6 {event.get('dr6', 0):#x}",
                flush=True,
            )
            client.resume(event.tid)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, previous)
