"""The ``hwbkpt`` command line.

Subcommands live in :data:`COMMANDS` (name → :class:`Command`); to add one, write a
``configure(parser)`` that adds its options and a ``run(client, args) -> int``, and add an
entry. Every command gets a connected :class:`hwbkpt.Client`; this module turns the errors
into one line on stderr and an exit status:

* 0 — the request succeeded
* 1 — the daemon refused or failed the request (the message says why)
* 2 — the daemon is unreachable, or the command line is wrong
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from hwbkpt import _demo, _drcmd, _selftest, _top, _watchcmd
from hwbkpt._blocking import Client
from hwbkpt._gdbserver import _serve as _gdbserver
from hwbkpt._session import DEFAULT_SOCKET, SOCKET_ENV, DaemonUnavailableError
from hwbkpt_proto import ConnectionLostError, HwbkptError, PermissionDeniedError

__all__ = ["COMMANDS", "Command", "format_status", "main"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_UNREACHABLE = 2


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, its options, and what it does.

    ``check`` (optional) looks at the parsed arguments before anything is sent and returns
    what is wrong with them, or ``None``: a usage mistake exits 2 with the usage line, as
    argparse's own errors do, whether or not a daemon is running.
    """

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[Client, argparse.Namespace], int]
    needs_daemon: bool = True
    check: Callable[[argparse.Namespace], str | None] | None = None


# -- status ---------------------------------------------------------------------------------


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the raw status as JSON")


def _run_status(client: Client, args: argparse.Namespace) -> int:
    status = client.status()
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True, default=_json_default)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_status(status))
    return EXIT_OK


def _json_default(value: object) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _hex(value: Any) -> str:
    return f"{value:#x}" if isinstance(value, int) else str(value)


def _key_text(key: Any) -> str:
    """``0x4010/8 w`` for a key given as a dict or a list ``[addr, length, access]``."""
    if isinstance(key, dict):
        return f"{_hex(key.get('addr'))}/{key.get('length', '?')} {key.get('access', '?')}"
    if isinstance(key, list | tuple) and len(key) == 3:
        return f"{_hex(key[0])}/{key[1]} {key[2]}"
    return str(key)


def _extra(entry: dict[str, Any], shown: set[str]) -> str:
    rest = {k: v for k, v in entry.items() if k not in shown}
    return "  " + " ".join(f"{k}={v}" for k, v in rest.items()) if rest else ""


def format_status(status: dict[str, Any]) -> str:
    """The human-readable ``hwbkpt status``: daemon, clients, targets, slots, pending.

    Tolerant of what it does not know: unknown fields are printed as ``name=value``.
    """
    out: list[str] = []
    uptime = status.get("uptime")
    out.append(
        f"hwbkptd {status.get('version', '?')} pid {status.get('pid', '?')}"
        + (f", up {_top.format_duration(uptime)}" if isinstance(uptime, int | float) else "")
        + (f", socket {status['socket']}" if status.get("socket") else "")
    )
    counters = status.get("counters") or {}
    if counters:
        out.append("counters: " + " ".join(f"{k}={v}" for k, v in counters.items()))

    clients = status.get("clients") or []
    out.append(f"clients ({len(clients)}):")
    for c in clients:
        line = (
            f"  #{c.get('id')} {c.get('name') or '?'}  pid {c.get('pid')} "
            f"uid {c.get('uid')} gid {c.get('gid')}"
        )
        if "watches" in c:
            watches = c["watches"]
            line += f"  watches {len(watches) if isinstance(watches, list) else watches}"
            if c.get("ended"):
                line += f" ({c['ended']} ended)"
        out.append(line)

    targets = status.get("targets") or []
    out.append(f"targets ({len(targets)}):")
    for t in targets:
        out.append(
            f"  pid {t.get('pid')} {t.get('comm', '')}".rstrip()
            + _extra(t, {"pid", "comm", "threads", "pending"})
        )
        threads = t.get("threads") or []
        if isinstance(threads, dict):
            threads = [{"tid": tid, **(v or {})} for tid, v in threads.items()]
        for th in threads:
            out.append(f"    tid {th.get('tid')}" + _extra(th, {"tid", "slots", "pending"}))
            for index, slot in enumerate(th.get("slots") or []):
                number = slot.get("slot", index) if isinstance(slot, dict) else index
                if not slot or (slot.get("key") is None and slot.get("addr") is None):
                    out.append(f"      slot {number}: free")
                    continue
                key = slot["key"] if slot.get("key") is not None else slot
                line = f"      slot {number}: {_key_text(key)}  mode {slot.get('mode', '?')}"
                if slot.get("watches"):
                    line += f"  watches {','.join(str(w) for w in slot['watches'])}"
                out.append(line + f"  holders {_holders(slot.get('holders') or [])}")
            for p in th.get("pending") or []:
                out.append(f"      pending: {_pending_text(p)}")
        for p in t.get("pending") or []:
            out.append(f"    pending: {_pending_text(p)}")
    for p in status.get("pending") or []:
        out.append(f"pending: {_pending_text(p)}")
    ended = status.get("ended") or []
    if ended:
        out.append(f"ended watches ({len(ended)}), kept until their clients remove them:")
        for w in ended:
            out.append(f"  {_ended_text(w)}")
    return "\n".join(out) + "\n"


def _ended_text(w: dict[str, Any]) -> str:
    """One ended watch of ``status``: whose, what, its final count and how it ended."""
    end = w.get("ended") or {}
    reason = str(end.get("reason", "ended"))
    how = {"exit": "process exited", "exec": "process called exec"}.get(reason, reason)
    if end.get("signal") is not None:
        how += f" (signal {end['signal']})"
    elif end.get("code") is not None:
        how += f" (status {end['code']})"
    addr = w.get("addr")
    where = f"{addr:#x}" if isinstance(addr, int) else "?"
    return (
        f"client {w.get('client')} watch {w.get('id')}  pid {w.get('pid')}  "
        f"{where}/{w.get('length')} {w.get('access')} {w.get('mode')}  "
        f"count {w.get('count')}  {how}"
    )


def _holders(holders: Any) -> str:
    if not holders:
        return "-"
    parts = []
    for h in holders:
        if isinstance(h, dict):
            parts.append(
                f"client {h.get('client')} watch {h.get('watch', h.get('id'))}"
                + (f" prio {h['priority']}" if "priority" in h else "")
            )
        else:
            parts.append(f"client {h}")
    return ", ".join(parts)


def _pending_text(p: Any) -> str:
    if not isinstance(p, dict):
        return f"watch {p}"
    key = _key_text(p.get("key", p))
    return f"{key}  client {p.get('client', '?')} watch {p.get('watch', p.get('id', '?'))}" + (
        f"  ({p['reason']})" if p.get("reason") else ""
    )


#: Subcommand name → what it does.
COMMANDS: dict[str, Command] = {
    "status": Command("show clients, targets, slots and counters", _configure_status, _run_status),
    "watch": Command(
        "watch an address or symbol; print each hit or stop and the final count",
        _watchcmd.configure, _watchcmd.run,
    ),
    "dr": Command(
        "show or write this client's virtual debug registers of a thread, and its slots",
        _drcmd.configure, _drcmd.run, check=_drcmd.check,
    ),
    "top": Command(
        "a refreshing view of targets, threads, slots (holders, hits/s) and clients",
        _top.configure, _top.run, check=_top.check,
    ),
    "gdbserver": Command(
        "serve gdb or lldb (several at once) on a live process: target remote | hwbkpt "
        "gdbserver PID",
        _gdbserver.configure, _gdbserver.run,
    ),
    "demo": Command(
        "a short narrated run: three clients sharing one thread's slots",
        _demo.configure, _demo.run,
    ),
    "selftest": Command(
        "probe what this kernel and CPU do that the daemon relies on (root; no daemon needed)",
        _selftest.configure, _selftest.run, needs_daemon=False,
    ),
}


# -- the entry point ------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hwbkpt",
        description="Talk to hwbkptd, the daemon that shares hardware breakpoint slots.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "exit status:\n"
            "  0  success\n"
            "  1  the daemon refused or failed the request\n"
            "  2  the daemon is unreachable, or bad usage\n"
        ),
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help=f"the daemon's socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for the daemon's answer to each request (default 30)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.configure(p)
        p.set_defaults(subparser=p)
    return parser


def _fail(stream: TextIO, message: str) -> None:
    stream.write(f"hwbkpt: {message}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hwbkpt``; returns the exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    command = COMMANDS[args.command]
    if command.check is not None:
        mistake = command.check(args)
        if mistake is not None:
            args.subparser.error(mistake)  # usage line and message on stderr, exit 2
    if not command.needs_daemon:
        return command.run(None, args)  # type: ignore[arg-type]
    try:
        with Client(args.socket, name="hwbkpt", timeout=args.timeout) as client:
            return command.run(client, args)
    except DaemonUnavailableError as err:
        _fail(sys.stderr, err.message)
        return EXIT_UNREACHABLE
    except ConnectionLostError as err:
        _fail(sys.stderr, err.message)
        return EXIT_UNREACHABLE
    except PermissionDeniedError as err:
        _fail(
            sys.stderr,
            f"permission denied: {err.message} (the daemon lets you act on a process only "
            "if you could ptrace it yourself: same uid and gid, or root/CAP_SYS_PTRACE)",
        )
        return EXIT_FAILED
    except HwbkptError as err:
        _fail(sys.stderr, f"{err.code}: {err.message}")
        return EXIT_FAILED
    except TimeoutError:
        _fail(sys.stderr, f"the daemon did not answer within {args.timeout} s")
        return EXIT_FAILED
    except BrokenPipeError:
        return EXIT_OK  # `hwbkpt status | head`


if __name__ == "__main__":
    sys.exit(main())
