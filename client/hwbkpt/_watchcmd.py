"""``hwbkpt watch PID ADDR|SYMBOL``: set a watch and print each hit or stop as it happens.

One line per hit or stop (or one JSON object per line with ``--json``): the time, the
thread, the instruction pointer symbolized as ``function+0x1d (file)``, what is watched,
and for write watches in ``stop`` mode the old and new value (the first old value is read
once the watch is installed). When the watch ends (``--duration`` elapsed, Ctrl-C, or the
program exited or exec'd) the final count is printed — after an exit too: the daemon keeps
an ended watch and its count until it is removed. In ``stop`` mode every stop is resumed
right after it is printed.

A request that is not one aligned 1/2/4/8-byte piece takes several slots (gdb's split; the
command says so on stderr). It is still one watch to its user: each access is shown once,
whichever pieces it touched (``notify`` hits are folded by :mod:`hwbkpt._accesses`; a
``stop`` is one event already), and the count is shown per piece, never summed, because
one access may be counted by several pieces. An address with nothing mapped gets gdb's
warning ("Cannot access memory at address ...") and is watched anyway.

JSON lines follow the project's convention (proto/PROTOCOL.md, "Addresses in JSON"):
addresses (``ip``, ``addr``) are numbers; names are strings, ``null`` when unknown.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ptrace.signames import signalName

from hwbkpt._accesses import Access, Folder
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
    parser.add_argument(
        "--priority",
        type=int,
        default=0,
        help="who gets a slot when more is asked than a thread's four hold: the higher "
        "priority wins, ties go to the earlier watch (default 0)",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop after this long (default: until Ctrl-C or the program ends)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


FOLD_EVERY = 0.05  # seconds between foldings of a region's hits into accesses

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

    def where(self, ip: int) -> str | None:
        """``function+0x1d (file)`` for ``ip``, or ``None`` when no symbol is known."""
        try:
            text = self.symbolizer.symbolize(ip)
        except Exception:  # the program may have exited meanwhile
            return None
        return None if text.startswith("0x") and " (" not in text else text

    def what(self) -> dict[str, Any]:
        """What is watched: ``addr`` and ``length`` as numbers, ``symbol`` or ``None``."""
        symbol = None if self.target.label.startswith("0x") else self.target.label
        return {"addr": self.target.addr, "length": self.length, "symbol": symbol}

    def _what_text(self, record: dict[str, Any]) -> str:
        label = record["symbol"] or f"{record['addr']:#x}"
        return label if self.length == (self.target.size or self.length) else (
            f"{label}[{self.length}]"
        )

    def line(self, record: dict[str, Any]) -> None:
        if self.as_json:
            print(json.dumps(record), flush=True)
            return
        stamp = datetime.fromtimestamp(record["wall"]).strftime("%H:%M:%S.%f")
        kind = record["event"]
        if kind in ("hit", "stop"):
            where = record["where"] or f"{record['ip']:#x}"
            text = f"{stamp} tid {record['tid']} {kind} {self._what_text(record)} at {where}"
            if "old" in record:
                text += f" old={record['old']:#x} new={record['new']:#x}"
        elif kind == "lost":
            why = _LOST_WHY.get(record.get("where", ""), "the watcher did not keep up")
            text = f"{stamp} lost {record['count']} hits ({why})"
        elif kind == "exit":
            how = (
                f"was killed by {record['signal']}" if record.get("signal")
                else f"exited with status {record['code']}" if record.get("code") is not None
                else "exited"
            )
            text = f"{stamp} process {record['pid']} {how}"
        elif kind == "exec":
            text = f"{stamp} process {record['pid']} called exec"
        elif kind == "summary" and "pieces" in record:
            text = "count per piece: " + ", ".join(
                f"{p['addr']:#x}/{p['length']} {p['count']}" for p in record["pieces"]
            )
        elif kind == "summary":
            text = f"count: {record['count']}"
        else:
            text = f"{stamp} {kind} {record}"
        print(text, flush=True)


def run(client: Client, args: argparse.Namespace) -> int:
    if args.length is not None and args.length < 1:
        raise InvalidArgumentError(
            f"--len {args.length}: a watch covers at least 1 byte (as gdb, up to any size)"
        )
    symbolizer = Symbolizer(args.pid)
    target = parse_target(args.pid, args.target, symbolizer)
    access = args.access or ("x" if target.function else "w")
    length = args.length or (1 if access == "x" else (target.size or 8))
    printer = _Printer(args.pid, target, length, access, args.json)
    mode = args.mode or ("stop" if args.condition is not None else "notify")
    show_values = mode == "stop" and access != "x" and length <= 8
    before = _try_read(client, args.pid, target.addr, length) if show_values else None
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
        _warn(
            f"note: {length} bytes at {target.addr:#x} take {len(watches)} slots "
            f"({' + '.join(str(w.length) for w in watches)} bytes, split as gdb does); "
            "each access is shown once, counts per piece"
        )
    # The old value is the one once the watch is in: a value read before misses the writes
    # made while the watch was being installed (the first old= would jump). A write between
    # the installation and this read is caught, though, and its stop comes first: it is
    # told by its new value being this one, and its old value is the one read before.
    old = _try_read(client, args.pid, target.addr, length)
    racing = before if before is not None and before != old else None
    if old is None:
        _warn(f"warning: Cannot access memory at address {target.addr:#x}; watching it anyway")
    ids = {w.id for w in watches}
    folder = Folder() if mode == "notify" and len(watches) > 1 else None
    pending = [w for w in watches if w.state != "installed"]
    if pending and not args.json:
        print(
            f"waiting for a free slot ({len(pending)} piece(s) pending; see `hwbkpt status`)",
            flush=True,
        )
    deadline = None if args.duration is None else time.monotonic() + args.duration
    next_fold = 0.0
    ended = False
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while not ended:
            timeout = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            if deadline is not None and time.monotonic() >= deadline:
                break
            event = client.next_event(timeout=timeout)
            if folder is not None:
                ours = event is not None and event.kind == "hit" and bool(
                    ids.intersection(event.watches)
                )
                if ours:
                    assert event is not None
                    folder.add(event.tid, event.ip, event.time, list(event.watches))
                if time.monotonic() >= next_fold:  # folding sorts: not at every hit
                    next_fold = time.monotonic() + FOLD_EVERY
                    for done in folder.ready():
                        printer.line(_access_record(done, printer))
                if ours:
                    continue
            if event is None:
                continue
            record = _record(event, ids, printer)
            if record is None:
                continue
            if event.kind == "stop":
                if event.get("new") is not None:
                    # Read in the kernel at the hit (a watch with a condition): exact even
                    # when hits in between were not reported.
                    record["old"], record["new"] = event.get("old"), event.get("new")
                    old, racing = record["new"], None
                elif show_values:
                    new = _try_read(client, args.pid, target.addr, length)
                    if racing is not None and new == old:
                        old = racing
                    racing = None
                    if old is not None and new is not None:
                        record["old"], record["new"] = old, new
                    old = new
                client.resume(event.tid)
            if event.kind in ("exit", "exec"):
                ended = True
                if folder is not None:
                    for done in folder.flush():
                        printer.line(_access_record(done, printer))
            printer.line(record)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if folder is not None:
        for done in folder.flush():
            printer.line(_access_record(done, printer))
    summary: dict[str, Any] = {"event": "summary", "count": None, "wall": time.time(),
                               "watches": sorted(ids)}
    # After an exit or exec too: the daemon keeps an ended watch with its final count.
    counts = [watch.count() for watch in watches]
    for watch in watches:
        watch.remove()
    # One piece's count is the watch's; a region's pieces are counted by the kernel one
    # by one, and one access may touch several: shown per piece, never summed.
    if len(watches) == 1:
        summary["count"] = counts[0]
    else:
        summary["pieces"] = [
            {"addr": w.addr, "length": w.length, "count": n}
            for w, n in zip(watches, counts, strict=True)
        ]
    printer.line(summary)
    return 0


def _warn(text: str) -> None:
    sys.stderr.write(f"hwbkpt: {text}\n")
    sys.stderr.flush()


def _try_read(client: Client, pid: int, addr: int, length: int) -> int | None:
    """The value at ``addr``, or ``None`` if nothing readable is mapped there."""
    try:
        return _read_value(client, pid, addr, min(length, 8))
    except InvalidArgumentError:
        return None


def _read_value(client: Client, pid: int, addr: int, length: int) -> int:
    return int.from_bytes(client.read_memory(pid, addr, length), "little")


def _wall_of(sample_time: int) -> float:
    """The wall-clock time of a ``CLOCK_MONOTONIC`` sample time in ns (hits are printed
    later than they happen: a region's are held until their access is complete)."""
    return time.time() - (time.clock_gettime_ns(time.CLOCK_MONOTONIC) - sample_time) / 1e9


def _record(event: Event, ids: set[int], printer: _Printer) -> dict[str, Any] | None:
    wall = time.time()
    if event.kind in ("hit", "stop"):
        if event.kind == "hit" and not ids.intersection(event.watches):
            return None
        if event.kind == "hit" and isinstance(event.get("time"), int):
            wall = _wall_of(event.time)
        ip = event.ip if event.kind == "hit" else event.regs["rip"]
        record = {
            "event": event.kind,
            "wall": wall,
            "tid": event.tid,
            "ip": ip,
            "where": printer.where(ip),
            **printer.what(),
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
    if event.kind == "exit":
        sig = event.get("signal")
        return {
            "event": "exit", "wall": wall, "pid": event.pid, "code": event.get("code"),
            "signal": signalName(sig) if isinstance(sig, int) else None,
        }
    if event.kind == "exec":
        return {"event": "exec", "wall": wall, "pid": event.pid}
    return None


def _access_record(access: Access, printer: _Printer) -> dict[str, Any]:
    """The ``hit`` line of one access to a region, whichever pieces it touched."""
    return {
        "event": "hit",
        "wall": _wall_of(access.time),
        "tid": access.tid,
        "ip": access.ip,
        "where": printer.where(access.ip),
        **printer.what(),
        "watches": sorted(access.watches),
    }
