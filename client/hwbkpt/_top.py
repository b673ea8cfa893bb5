"""``hwbkpt top``: a refreshing view of the daemon's targets, threads, slots and clients.

Every ``--interval`` seconds the command asks the daemon for its ``status`` and draws one
*frame*: the daemon line, the counters that moved (with their rate), each target with each
thread's slots (key ``addr/len access``, mode, holder clients by id and name, hits per
second) and pending watches, then the clients (id, pid, uid, name, watches).

Hits per second need a per-slot hit counter in the status (``slots[].hits``, the kernel's
count for that slot since it was opened): the rate is the difference between two frames
divided by the time between them. A daemon whose status has no such field gets ``-``
(the per-watch ``count`` calls only cover this client's own watches, and the slots of
``top`` are everybody's).

Slots are named from the target's ELF symbols (``counter+0x8``) by a *namer* given to
:class:`Frames`; the counters line is wrapped to the terminal's width.

Frames are built by :class:`Frames`, which does no I/O itself, so the text is the same on a
terminal (curses, stdlib) and with ``--once`` (plain text on stdout, for scripts). On a
terminal: ``q`` quits, arrows / PgUp / PgDn / Home scroll, a resize redraws at once, and
Ctrl-C quits too; the terminal is restored however it ends (``curses.wrapper``). Only
bold and reverse video are used, so it works on terminals without colours.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from hwbkpt._blocking import Client
from hwbkpt._symbols import Symbolizer
from hwbkpt_proto import HwbkptError

__all__ = ["Frames", "Namer", "check", "configure", "run", "symbol_namer"]

SLOTS_PER_THREAD = 4
_SlotKey = tuple[Any, ...]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time between refreshes (default 1)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one frame as plain text and exit (hits/s needs two samples: with a "
        "per-slot hit counter in the status, the frame is taken over --interval, at most 1 s)",
    )


# -- frames (no I/O) --------------------------------------------------------------------------


def _hex(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


def _rate(delta: float, seconds: float) -> str:
    rate = delta / seconds
    if rate >= 10_000:
        return f"{rate / 1000:.0f}k"
    return f"{rate:.0f}" if rate >= 10 or rate == 0 else f"{rate:.1f}"


def format_duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``: an uptime for people."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s // 60 % 60:02d}m"


def _comm(pid: Any) -> str:
    """The process's name (best effort: ``top`` may run on another host's socket)."""
    try:
        return str(psutil.Process(int(pid)).name())
    except (psutil.Error, ValueError, TypeError):
        return ""


#: Names an address of a process for people: ``(pid, addr, code) -> "counter+0x8"`` or None.
Namer = Callable[[int, int, bool], str | None]


def symbol_namer() -> Namer:
    """A :data:`Namer` reading each process's ELF symbols (one Symbolizer per process, kept
    while it lives). Best effort: a process that is gone or unreadable gets no names."""
    cache: dict[int, Symbolizer | None] = {}

    def name(pid: int, addr: int, code: bool) -> str | None:
        if pid not in cache:
            try:
                cache[pid] = Symbolizer(pid)
            except HwbkptError:
                cache[pid] = None
        symbolizer = cache[pid]
        if symbolizer is None:
            return None
        try:
            text = symbolizer.symbolize(addr, data=not code)
        except HwbkptError:
            cache.pop(pid, None)  # gone, or exec'd: try again next frame
            return None
        # "counter+0x8 (prog)": the file is the target's own more often than not, and the
        # slot line is narrow; an address with no symbol gets no name.
        label = text.split(" (", 1)[0]
        return None if label.startswith("0x") else label

    return name


def _fit(parts: list[str], width: int | None, first: str, indent: str) -> list[str]:
    """``parts`` joined by two spaces after ``first``, wrapped to ``width`` columns."""
    lines = [first]
    for part in parts:
        sep = "" if lines[-1] in (first, indent) else "  "
        if width is not None and len(lines[-1]) + len(sep) + len(part) > width and \
                lines[-1] not in (first, indent):
            lines.append(indent)
            sep = ""
        lines[-1] += sep + part
    return lines


@dataclass
class Frames:
    """Turns successive ``status`` results into frames (lists of lines).

    Keeps the previous sample of each slot's ``hits`` and of the daemon counters, so a
    frame can show rates. ``slots_per_thread`` is what ``hello`` said (4 on x86-64);
    ``namer`` names slot addresses (:func:`symbol_namer`; ``None``: addresses only).
    """

    slots_per_thread: int = SLOTS_PER_THREAD
    namer: Namer | None = None
    _hits: dict[_SlotKey, int] = field(default_factory=dict)
    _counters: dict[str, int] = field(default_factory=dict)
    _when: float | None = None

    def frame(self, status: dict[str, Any], now: float, width: int | None = None) -> list[str]:
        """The lines of one frame for ``status`` sampled at ``now`` (monotonic seconds);
        the counters are wrapped to ``width`` columns (``None``: one line)."""
        elapsed = None if self._when is None else now - self._when
        if elapsed is not None and elapsed <= 0:
            elapsed = None
        clients = status.get("clients") or []
        names = {c.get("id"): c.get("name") or "?" for c in clients if isinstance(c, dict)}
        targets = status.get("targets") or []
        out: list[str] = []

        uptime = status.get("uptime")
        out.append(
            f"hwbkptd {status.get('version', '?')}  pid {status.get('pid', '?')}"
            + (f"  up {format_duration(uptime)}" if isinstance(uptime, int | float) else "")
            + f"  {len(clients)} client{'s' * (len(clients) != 1)}"
            + f"  {len(targets)} target{'s' * (len(targets) != 1)}"
        )
        out.extend(self._counter_lines(status.get("counters") or {}, elapsed, width))
        out.append("")

        hits_now: dict[_SlotKey, int] = {}
        out.append(f"TARGETS ({len(targets)})")
        if not targets:
            out.append("  (none: no process is being watched)")
        for t in targets:
            pid = t.get("pid")
            head = f"  pid {pid}"
            comm = t.get("comm") or _comm(pid)
            if comm:
                head += f" {comm}"
            if isinstance(t.get("watches"), int):
                head += f"  {t['watches']} watch{'es' * (t['watches'] != 1)}"
            if t.get("detaching"):
                head += "  (detaching)"
            out.append(head)
            threads = t.get("threads") or []
            if isinstance(threads, dict):
                threads = [{"tid": tid, **(v or {})} for tid, v in threads.items()]
            for th in threads:
                tid = th.get("tid")
                line = f"    tid {tid}  {th.get('state', '?')}"
                if th.get("held_by"):
                    line += "  held by " + ", ".join(
                        self._client_text(c, names) for c in th["held_by"]
                    )
                out.append(line)
                out.append(
                    f"      {'slot':<5}{'key':<26}{'symbol':<18}{'mode':<8}{'hits/s':>8}  holders"
                )
                slots = [s for s in th.get("slots") or [] if isinstance(s, dict)]
                for index in range(max(self.slots_per_thread, len(slots))):
                    if index >= len(slots):
                        out.append(f"      {index:<5}-")
                        continue
                    slot = slots[index]
                    key = (pid, tid, slot.get("addr"), slot.get("length"), slot.get("access"))
                    text_key = (
                        f"{_hex(slot.get('addr'))}/{slot.get('length', '?')} "
                        f"{slot.get('access', '?')}"
                    )
                    holders = slot.get("holders", slot.get("clients")) or []
                    who = ", ".join(self._client_text(c, names) for c in holders) or "-"
                    if slot.get("watches"):
                        who += "  (watches " + ",".join(str(w) for w in slot["watches"]) + ")"
                    symbol = self._name(pid, slot) or "-"
                    out.append(
                        f"      {index:<5}{text_key:<26}{symbol:<18}{slot.get('mode', '?'):<8}"
                        f"{self._slot_rate(slot, key, elapsed, hits_now):>8}  {who}"
                    )
                pending = th.get("pending") or []
                if pending:
                    out.append(
                        "      pending: "
                        + ", ".join(
                            f"watch {p}" if not isinstance(p, dict) else f"watch {p.get('id')}"
                            for p in pending
                        )
                        + "  (waiting for a free slot)"
                    )
        out.append("")
        out.append(f"CLIENTS ({len(clients)})")
        out.append(f"  {'id':>4}  {'pid':>7}  {'uid':>6}  {'name':<20} {'watches':>7}")
        for c in clients:
            watches = c.get("watches", "-")
            if isinstance(watches, list):
                watches = len(watches)
            out.append(
                f"  {c.get('id', '?'):>4}  {c.get('pid', '?'):>7}  {c.get('uid', '?'):>6}  "
                f"{(c.get('name') or '?')[:20]:<20} {watches:>7}"
            )
        self._hits = hits_now
        self._when = now
        return out

    def _name(self, pid: Any, slot: dict[str, Any]) -> str | None:
        addr = slot.get("addr")
        if self.namer is None or not isinstance(pid, int) or not isinstance(addr, int):
            return None
        return self.namer(pid, addr, slot.get("access") == "x")

    @staticmethod
    def _client_text(cid: Any, names: dict[Any, str]) -> str:
        if isinstance(cid, dict):  # tolerate a richer holder entry
            cid = cid.get("client", cid.get("id"))
        return f"#{cid} {names[cid]}" if cid in names else f"#{cid}"

    def _slot_rate(
        self,
        slot: dict[str, Any],
        key: _SlotKey,
        elapsed: float | None,
        hits_now: dict[_SlotKey, int],
    ) -> str:
        hits = slot.get("hits")
        if not isinstance(hits, int):
            return "-"
        hits_now[key] = hits
        before = self._hits.get(key)
        if elapsed is None or before is None or hits < before:
            return "..."  # the first sample of this slot (or it was reopened): no rate yet
        return _rate(hits - before, elapsed)

    def _counter_lines(
        self, counters: dict[str, Any], elapsed: float | None, width: int | None
    ) -> list[str]:
        parts = []
        for name, value in counters.items():
            if not isinstance(value, int):
                continue
            before = self._counters.get(name)
            if elapsed is not None and before is not None and value > before:
                parts.append(f"{name} {value} (+{_rate(value - before, elapsed)}/s)")
            elif value:
                parts.append(f"{name} {value}")
        self._counters = {k: v for k, v in counters.items() if isinstance(v, int)}
        return _fit(parts or ["-"], width, "counters: ", " " * len("counters: "))


# -- running ------------------------------------------------------------------------------


def check(args: argparse.Namespace) -> str | None:
    """A usage mistake in ``args``, or ``None``."""
    return None if args.interval > 0 else f"--interval must be positive, not {args.interval:g}"


def run(client: Client, args: argparse.Namespace) -> int:
    frames = Frames(
        int(client.server_info.get("slots_per_thread", SLOTS_PER_THREAD)), symbol_namer()
    )
    if args.once or not sys.stdout.isatty():
        # $COLUMNS or the terminal's width, 80 for a pipe (shutil.get_terminal_size)
        width = shutil.get_terminal_size().columns
        lines = _once(client, frames, min(args.interval, 1.0), width)
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        return 0
    try:
        return curses.wrapper(_loop, client, frames, args.interval)
    except KeyboardInterrupt:
        return 0
    except curses.error as err:
        sys.stderr.write(
            f"hwbkpt: top: cannot drive this terminal ({err}); try `hwbkpt top --once`\n"
        )
        return 2


def _once(client: Client, frames: Frames, interval: float, width: int) -> list[str]:
    status = client.status()
    lines = frames.frame(status, time.monotonic(), width)
    if _has_slot_hits(status):
        time.sleep(interval)
        lines = frames.frame(client.status(), time.monotonic(), width)
    return lines


def _has_slot_hits(status: dict[str, Any]) -> bool:
    return any(
        isinstance(slot, dict) and "hits" in slot
        for t in status.get("targets") or []
        for th in (t.get("threads") or [])
        if isinstance(th, dict)
        for slot in th.get("slots") or []
    )


def _loop(screen: Any, client: Client, frames: Frames, interval: float) -> int:
    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    screen.keypad(True)
    lines: list[str] = []
    offset = 0
    next_refresh = 0.0
    while True:
        now = time.monotonic()
        height, width = screen.getmaxyx()
        if now >= next_refresh:
            lines = frames.frame(client.status(), now, width)
            next_refresh = now + interval
        body = max(1, height - 1)
        offset = max(0, min(offset, len(lines) - body))
        _draw(screen, lines, offset, height, width, interval)
        screen.timeout(max(1, int((next_refresh - time.monotonic()) * 1000)))
        key = screen.getch()
        if key in (ord("q"), ord("Q"), 27):  # q or Esc
            return 0
        if key in (curses.KEY_DOWN, ord("j")):
            offset += 1
        elif key in (curses.KEY_UP, ord("k")):
            offset -= 1
        elif key == curses.KEY_NPAGE:
            offset += body
        elif key == curses.KEY_PPAGE:
            offset -= body
        elif key == curses.KEY_HOME:
            offset = 0
        elif key == curses.KEY_RESIZE:
            with contextlib.suppress(curses.error):
                curses.update_lines_cols()
        offset = max(0, offset)


def _draw(screen: Any, lines: list[str], offset: int, height: int, width: int,
          interval: float) -> None:
    screen.erase()
    body = max(1, height - 1)
    for row, line in enumerate(lines[offset : offset + body]):
        heading = row + offset == 0 or line.startswith(("TARGETS", "CLIENTS"))
        attr = curses.A_BOLD if heading else curses.A_NORMAL
        _put(screen, row, line, width, attr)
    more = len(lines) - offset - body
    footer = f" q quit  arrows/PgUp/PgDn scroll  refresh {interval:g}s" + (
        f"  ({more} more lines)" if more > 0 else ""
    )
    _put(screen, height - 1, footer.ljust(width), width, curses.A_REVERSE)
    screen.refresh()


def _put(screen: Any, row: int, text: str, width: int, attr: int) -> None:
    # addnstr into the bottom-right cell raises after writing; the text is shown anyway.
    with contextlib.suppress(curses.error):
        screen.addnstr(row, 0, text, max(0, width), attr)
