"""``hwbkpt dr TID [N VALUE ...]``: this client's virtual debug registers of a thread.

Virtual registers belong to one connection (DESIGN §5.6): what this command writes lasts
while it runs. Without writes it prints the eight registers with DR7 decoded per slot; with
writes it applies them in order (as PTRACE_POKEUSER would), prints the result, and with
``--wait`` keeps them in effect, printing each stop with this client's DR6, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import signal

from hwbkpt._blocking import Client

__all__ = ["configure", "format_registers", "run"]

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


def run(client: Client, args: argparse.Namespace) -> int:
    if len(args.writes) % 2:
        raise SystemExit("hwbkpt dr: writes come in pairs: N VALUE")
    pairs = [
        (int(n, 0), int(v, 0)) for n, v in zip(args.writes[::2], args.writes[1::2], strict=True)
    ]
    for n, value in pairs:
        client.poke_dr(args.tid, n, value)
    print(format_registers([client.peek_dr(args.tid, n) for n in range(8)]), end="", flush=True)
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
