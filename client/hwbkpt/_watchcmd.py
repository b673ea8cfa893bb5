"""``hwbkpt watch PID ADDR|SYMBOL``: set a watch and print each hit or stop as it happens.

One line per hit or stop (or one JSON object per line with ``--json``): the time, the
thread, the instruction pointer symbolized as ``function+0x1d (file)``, what is watched,
and for write watches in ``stop`` mode the old and new value. When the watch ends
(``--duration`` elapsed, Ctrl-C, or the program exited or exec'd) the final count is
printed. In ``stop`` mode every stop is resumed right after it is printed.
"""

from __future__ import annotations

import argparse
import json
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hwbkpt._blocking import Client, Watch
from hwbkpt._events import Event
from hwbkpt._symbols import Symbolizer
from hwbkpt_proto import InvalidArgumentError

__all__ = ["configure", "parse_target", "run"]


@dataclass(frozen=True)
class Target:
    """What the user asked to watch, resolved to an address range."""

    addr: int
    size: int
    label: str
    function: bool


def parse_target(pid: int, text: str, symbolizer: Symbolizer | None = None) -> Target:
    """An address (``0x…`` or decimal) or a symbol (``NAME`` or ``LIB:NAME``) of ``pid``.

    Raises NotFoundError / InvalidArgumentError from symbol resolution.
    """
    try:
        addr = int(text, 0)
    except ValueError:
        symbol = (symbolizer or Symbolizer(pid)).resolve(text)
        return Target(symbol.addr, symbol.size, symbol.name, symbol.kind == "function")
    if addr < 0:
        raise InvalidArgumentError(f"address {text} is negative")
    return Target(addr, 0, f"{addr:#x}", False)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pid", type=int, help="the process to watch")
    parser.add_argument("target", help="address (0x...), SYMBOL or LIB:SYMBOL")
    parser.add_argument(
        "--len",
        type=int,
        dest="length",
        default=None,
        metavar="N",
        help="bytes to watch (default: the symbol's size, else 8; 1 for functions); a region "
        "that is not one aligned 1/2/4/8-byte piece takes several slots, as gdb splits it",
    )
    parser.add_argument(
        "--access",
        choices=("w", "rw", "x"),
        default=None,
        help="w (default for data), rw, or x (default for functions)",
    )
    parser.add_argument(
        "--mode",
        choices=("count", "notify", "stop"),
        default=None,
        help="notify (default): print each hit (with old/new values when --if is given); "
        "stop (default with --if): stop the thread at each hit, print old/new values, "
        "resume; count: print only the total",
    )
    parser.add_argument(
        "--if",
        dest="condition",
        default=None,
        metavar="EXPR",
        help="only hits for which EXPR is true, e.g. 'new == 1234', 'changed', "
        "'signed(new) < 0 and tid == 812' (names: new old changed tid hits; evaluated in the "
        "kernel where BPF is available; see PROTOCOL.md, Conditions)",
    )
    parser.add_argument("--tid", type=int, default=None, help="watch only this thread")
    parser.add_argument("--priority", type=int, default=0)
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: until Ctrl-C or the program ends)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


# Why hits were lost, by the ``lost`` event's ``where`` (proto/PROTOCOL.md).
_LOST_WHY = {
    "ring": "the kernel's sample ring overflowed",
    "cpu": "a debug exception came without its cause: DR6 was empty",
}


class _Printer:
    def __init__(self, pid: int, target: Target, length: int, access: str, as_json: bool) -> None:
        self.pid = pid
        self.target = target
        self.length = length
        self.access = access
        self.as_json = as_json
        self.symbolizer = Symbolizer(pid)

    def where(self, ip: int) -> str:
        try:
            return self.symbolizer.symbolize(ip)
        except Exception:  # the program may have exited meanwhile
            return f"{ip:#x}"

    def line(self, record: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(record), flush=True)
            return
        stamp = datetime.fromtimestamp(record["wall"]).strftime("%H:%M:%S.%f")
        kind = record["event"]
        if kind in ("hit", "stop"):
            text = f"{stamp} tid {record['tid']} {kind} {record['what']} at {record['where']}"
            if "old" in record:
                text += f" old={record['old']:#x} new={record['new']:#x}"
        elif kind == "lost":
            why = _LOST_WHY.get(record.get("where", ""), "the watcher did not keep up")
            text = f"{stamp} lost {record['count']} hits ({why})"
        elif kind in ("exit", "exec"):
            text = (
                f"{stamp} process {record['pid']} {'exited' if kind == 'exit' else 'called exec'}"
            )
        elif kind == "summary":
            text = f"count: {record['count']}"
        else:
            text = f"{stamp} {kind} {record}"
        print(text, flush=True)


def run(client: Client, args: argparse.Namespace) -> int:
    symbolizer = Symbolizer(args.pid)
    target = parse_target(args.pid, args.target, symbolizer)
    access = args.access or ("x" if target.function else "w")
    length = args.length or (1 if access == "x" else (target.size or 8))
    printer = _Printer(args.pid, target, length, access, args.json)
    mode = args.mode or ("stop" if args.condition is not None else "notify")
    show_values = mode == "stop" and access != "x" and length <= 8
    old = _read_value(client, args.pid, target.addr, length) if show_values else None
    watches: list[Watch]
    if length in (1, 2, 4, 8) and target.addr % length == 0:
        watches = [
            client.watch(
                args.pid, target.addr, length, access, mode, args.tid, args.priority,
                args.condition,
            )
        ]  # fmt: skip
    else:
        watches = client.watch_region(
            args.pid, target.addr, length, access, mode, args.tid, args.priority, args.condition
        )
    ids = {w.id for w in watches}
    what = target.label if length == (target.size or length) else f"{target.label}[{length}]"
    pending = [w for w in watches if w.state != "installed"]
    if pending and not args.json:
        print(
            f"waiting for a free slot ({len(pending)} piece(s) pending; see `hwbkpt status`)",
            flush=True,
        )
    deadline = None if args.duration is None else time.monotonic() + args.duration
    ended = False
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while not ended:
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                break
            event = client.next_event(timeout=timeout)
            if event is None:
                continue
            record = _record(event, ids, what, printer)
            if record is None:
                continue
            if event.kind == "stop":
                if event.get("new") is not None:
                    # Read in the kernel at the hit (a watch with a condition): exact even
                    # when hits in between were not reported.
                    record["old"], record["new"] = event.get("old"), event.get("new")
                    old = record["new"]
                elif show_values:
                    new = _read_value(client, args.pid, target.addr, length)
                    record["old"], record["new"] = old, new
                    old = new
                client.resume(event.tid)
            if event.kind in ("exit", "exec"):
                ended = True
            printer.line(record)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    total = 0
    if not ended:
        for watch in watches:
            total += watch.count()
            watch.remove()
    printer.line(
        {
            "event": "summary",
            "count": total if not ended else None,
            "wall": time.time(),
            "watches": sorted(ids),
        }
    )
    return 0


def _read_value(client: Client, pid: int, addr: int, length: int) -> int:
    return int.from_bytes(client.read_memory(pid, addr, length), "little")


def _record(event: Event, ids: set[int], what: str, printer: _Printer) -> dict[str, Any] | None:
    wall = time.time()
    if event.kind in ("hit", "stop"):
        if event.kind == "hit" and not ids.intersection(event.watches):
            return None
        ip = event.ip if event.kind == "hit" else event.regs["rip"]
        record = {
            "event": event.kind,
            "wall": wall,
            "tid": event.tid,
            "ip": ip,
            "where": printer.where(ip),
            "what": what,
            "watches": list(event.watches),
        }
        if event.get("new") is not None:  # read in the kernel at the hit (--if)
            record["old"], record["new"] = event.get("old"), event.get("new")
        return record
    if event.kind == "lost":
        record = {"event": "lost", "wall": wall, "count": event.count}
        for name in ("where", "tid"):
            if event.get(name) is not None:
                record[name] = event.get(name)
        return record
    if event.kind in ("exit", "exec"):
        return {"event": event.kind, "wall": wall, "pid": event.pid}
    return None
