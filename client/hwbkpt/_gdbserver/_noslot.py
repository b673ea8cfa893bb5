"""Why a debugger's breakpoint or watchpoint got no hardware slot, in words.

gdb has no way to show a stub's reason for a refused ``Z`` packet: for ``Z0``/``Z1`` it
prints "Cannot insert breakpoint N. Cannot access memory at address ...", which sends the
user looking for a memory problem, and for ``Z2``/``Z4`` "Could not insert hardware
watchpoint N". The server therefore also writes one line to its stderr (which gdb shows
when it runs the server through ``target remote | hwbkpt gdbserver PID``) saying what is
actually the matter: the thread's four slots, who holds each, and what to do.

Software breakpoints (``Z0``) take hardware execute slots on this kernel: a uprobe would
stop the thread only after the probed instruction has run, and the kernel's verifier does
not let a uprobe program move the thread back before it (HACKING.md, ``hwbkpt selftest``
"uprobes"). That is why a fifth breakpoint fails at all, so the line says it.

Pure: it only reads a ``status`` result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["SLOTS_PER_THREAD", "no_slot_message"]

SLOTS_PER_THREAD = 4  # DR0-DR3


def _holders(slot: Mapping[str, Any], clients: Mapping[int, Mapping[str, Any]], me: int) -> str:
    names = []
    for cid in slot.get("holders") or []:
        client = clients.get(cid)
        if client is None:
            names.append(f"client {cid}")
        elif client.get("pid") == me:
            names.append("this debugger")
        else:
            names.append(f"{client.get('name') or 'client'} (pid {client.get('pid')})")
    return ", ".join(names) or "nobody"


def _describe(slot: Mapping[str, Any]) -> str:
    access = slot.get("access")
    addr = int(slot.get("addr", 0))
    if access == "x":
        return f"breakpoint {addr:#x}"
    kind = "watchpoint" if access == "w" else "access watchpoint"
    return f"{kind} {addr:#x}/{slot.get('length')}"


def no_slot_message(
    status: Mapping[str, Any], pid: int, threads: Mapping[int, str], what: str, me: int
) -> str:
    """The line that says why ``what`` ("breakpoint at 0x401136") is not inserted in
    process ``pid``: ``threads`` is the refused watch's per-thread state (tid → "installed"
    or "pending"), ``status`` the daemon's ``status`` result, ``me`` this server's pid (its
    own holds are "this debugger").

    Names the first thread it could not get, the slots that thread has and who holds each;
    when the thread has free slots and still none was given, the kernel refused (something
    outside the daemon, a perf user or a ptrace debugger, holds that thread's slots).
    """
    tid = next((int(t) for t, state in threads.items() if state != "installed"), None)
    clients = {int(c["id"]): c for c in status.get("clients") or [] if "id" in c}
    slots: list[Mapping[str, Any]] = []
    for target in status.get("targets") or []:
        if target.get("pid") != pid:
            continue
        for thread in target.get("threads") or []:
            if thread.get("tid") == tid:
                slots = list(thread.get("slots") or [])
    where = f"thread {tid}" if tid is not None else f"process {pid}"
    advice = (
        "gdb's software breakpoints take these slots too (why: hwbkpt selftest, uprobes); "
        "delete a breakpoint or watchpoint, here or in another debugger of the process, "
        "and continue again"
    )
    if len(slots) < SLOTS_PER_THREAD:
        return (
            f"{what} not inserted: the kernel refused a hardware slot of {where} although "
            f"the daemon holds only {len(slots)} of its {SLOTS_PER_THREAD}: something outside "
            "the daemon (a perf user, a ptrace debugger) holds the others; "
            f"{advice}"
        )
    held = "; ".join(f"{_describe(s)} by {_holders(s, clients, me)}" for s in slots)
    return (
        f"{what} not inserted: all {SLOTS_PER_THREAD} hardware slots of {where} are in use, "
        f"shared by every debugger and client of process {pid} ({held}); {advice}"
    )
