"""Platform probes: what this kernel and CPU actually do, measured rather than assumed.

The daemon depends on a dozen kernel and CPU behaviours (HACKING.md lists them), and they
differ between CPUs and hypervisors: a counted hit costs 5.7 µs on one machine of the
project's kind and 18 µs on another; ``int1`` traps on one (``si_addr`` after the 0xF1 byte)
and faults on another (``si_addr`` at it, so a program that merely returns from its SIGTRAP
handler loops on it); BPF may be missing or locked down. Each probe here runs a small
Python child process, traces it with the daemon's own kernel layer (:mod:`hwbkptd._kernel`)
and reports what it saw as a :class:`Finding`: one line for ``hwbkpt selftest``, a value
for the daemon (``int1``) and for the tests, which choose what to expect from the same
probes.

The child needs no compiler: it stores to a ``ctypes`` word in a loop (data breakpoints),
calls libc's ``labs`` (execute breakpoints), and calls libc's ``abs`` after the probe has
written ``int1; ret`` over its first bytes through ptrace (the write lands in the child's
private copy of libc's text). Every probe kills and reaps its child, whatever happens.

Everything here must run in the thread that will own the traces (ptrace is per thread) and
before the daemon's tracer loop starts reaping children (it waits on every child).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hwbkpt_proto import DebugRegisterIOError, HwbkptError
from hwbkptd import _kernel
from hwbkptd._bpf import HITS_BASE, generate
from hwbkptd._cond import parse
from hwbkptd._model import Access, Mode
from hwbkptd._vdr import SIZEOF_KERNEL_USER

__all__ = ["PROBES", "Finding", "int1_faults", "run_all"]

TIMEOUT = 10.0  # seconds any one step of a probe may take
UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe/type")
_TOKEN = 0x5E1F7E57

# The child: prints its addresses as JSON, then runs one command per stdin line and answers
# "ok" after each. Stores go through a ctypes array (8-byte aligned); `labs` and `abs` are
# libc functions the interpreter itself never calls.
_CHILD = r"""
import ctypes, json, sys
libc = ctypes.CDLL(None)
var = (ctypes.c_long * 2)()
addr = lambda f: ctypes.cast(f, ctypes.c_void_p).value
print(json.dumps({"var": ctypes.addressof(var), "labs": addr(libc.labs),
                  "abs": addr(libc.abs)}), flush=True)
for line in sys.stdin:
    cmd, n = line.split()
    n = int(n)
    if cmd == "write":
        for i in range(n):
            var[0] = i
    elif cmd == "call":
        for i in range(n):
            libc.labs(i)
    elif cmd == "abs":
        libc.abs(n)
    print("ok", flush=True)
"""


@dataclass(frozen=True, slots=True)
class Finding:
    """What one probe found: ``ok`` when the daemon can work with it, ``found`` and
    ``action`` for people (what was seen; what the daemon does about it), ``value`` for
    programs."""

    name: str
    ok: bool
    found: str
    action: str
    value: Any = None
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Child:
    """The probe's child process, seized by this thread. Use as a context manager."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.addrs: dict[str, int] = {}

    def __enter__(self) -> _Child:
        try:
            assert self.proc.stdout is not None
            self.addrs = json.loads(self.proc.stdout.readline())
            _kernel.seize(self.pid)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            self.proc.wait(TIMEOUT)  # reaps it (untraced by its death)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    def send(self, cmd: str, n: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{cmd} {n}\n")
        self.proc.stdin.flush()

    def answer(self) -> None:
        """Read the child's "ok" (the child must be running)."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ok":
            raise HwbkptError(f"probe child answered {line!r}")

    def run(self, cmd: str, n: int, on_trap: Callable[[], None] | None = None) -> float:
        """Run one command to its "ok"; returns the seconds it took. At each SIGTRAP
        signal-delivery-stop of the child ``on_trap()`` looks at it and the trap is
        suppressed; other signals are delivered, other stops resumed."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        start = time.perf_counter()
        self.send(cmd, n)
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            event = _kernel.wait_for(self.pid, 0)
            if event is not None:
                if isinstance(event, _kernel.Exited | _kernel.Killed):
                    raise HwbkptError(f"the probe's child process ended: {event}")
                sig = event.signal if isinstance(event, _kernel.SignalStop) else 0
                if sig == signal.SIGTRAP and on_trap is not None:
                    on_trap()
                    sig = 0
                _kernel.cont(self.pid, sig)
                continue
            if select.select([fd], [], [], 0.0005)[0]:
                self.answer()
                return time.perf_counter() - start
        raise HwbkptError(f"the probe's child process did not finish {cmd!r} in {TIMEOUT} s")


@functools.cache
def int1_faults() -> bool:
    """Whether ``int1`` (0xF1) is a fault here (``si_addr`` and ``rip`` *at* the byte)
    rather than a trap (after it). Cached: the CPU does not change under a process."""
    return bool(probe_int1().value == "fault")


def probe_int1() -> Finding:
    """Execute ``int1`` in the child and see where the kernel says it happened."""
    seen: dict[str, int] = {}
    with _Child() as child:
        at = child.addrs["abs"]
        _kernel.write_memory(child.pid, at, b"\xf1\xc3")  # int1; ret

        def on_trap() -> None:
            info = _kernel.getsiginfo(child.pid)
            regs = _kernel.getregs(child.pid)
            seen.update(code=info.code, addr=info.addr, rip=regs["rip"])
            if regs["rip"] == at:  # a fault: step over the byte, as a handler must
                _kernel.setregs(child.pid, {**regs, "rip": at + 1})

        child.run("abs", 1, on_trap)
    if not seen:
        return Finding("int1", False, "int1 raised no SIGTRAP", "none", None)
    kind = "fault" if seen["rip"] == at else "trap" if seen["rip"] == at + 1 else "other"
    where = {"fault": "at", "trap": "after"}.get(kind, f"{seen['rip'] - at:+d} bytes from")
    return Finding(
        "int1",
        kind != "other" and seen["code"] == _kernel.TRAP_BRKPT and seen["addr"] == seen["rip"],
        f"a {kind}: TRAP_BRKPT (si_code {seen['code']}) with si_addr and rip {where} the 0xF1 byte",
        "a TRAP_BRKPT whose instruction is not 0xF1 "
        f"({'at' if kind == 'fault' else 'before'} si_addr), on a thread with our "
        "breakpoints, is taken as a hit whose DR6 came back empty",
        kind,
        {k: hex(v) if k != "code" else v for k, v in seen.items()},
    )


def probe_breakpoints() -> Finding:
    """Count hits of a write breakpoint; time them against the same loop without it."""
    n = 20_000
    with _Child() as child:
        bare = min(child.run("write", n) for _ in range(2))
        event = _kernel.BreakpointEvent(
            child.pid, child.addrs["var"], 8, Access.WRITE, Mode.COUNT, 0
        )
        try:
            watched = child.run("write", n)
            count = event.read_count()
        finally:
            event.close()
    cost_us = max(0.0, (watched - bare) / n * 1e6)
    rate = n / watched
    return Finding(
        "breakpoints",
        count == n,
        f"perf breakpoint events count {count} of {n} writes; a counted hit costs "
        f"{cost_us:.1f} us, {rate:,.0f} hits/s at full speed",
        "slots are perf breakpoint events (they close with the daemon)",
        {"count": count, "writes": n, "hit_us": round(cost_us, 2), "hits_per_s": round(rate)},
    )


def probe_notify_ring(ring_kib: int = 2048) -> Finding:
    """Drain a notify ring in Python while the child writes at full speed."""
    n = 50_000
    pages = max(_kernel.RING_DATA_PAGES, ring_kib * 1024 // _kernel.PAGE_SIZE)
    with _Child() as child:
        event = _kernel.BreakpointEvent(
            child.pid,
            child.addrs["var"],
            8,
            Access.WRITE,
            Mode.NOTIFY,
            0,
            wakeup=512,
            ring_pages=pages,
        )
        got = lost = 0
        try:
            assert child.proc.stdout is not None
            fd = child.proc.stdout.fileno()
            start = time.perf_counter()
            child.send("write", n)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                samples, dropped = event.drain()
                got, lost = got + len(samples), lost + dropped
                if select.select([fd], [], [], 0.002)[0]:
                    child.answer()
                    break
            elapsed = time.perf_counter() - start
            samples, dropped = event.drain()
            got, lost = got + len(samples), lost + dropped + max(0, event.unaccounted())
            ring_pages = event.ring_pages
        finally:
            event.close()
    capacity = ring_pages * _kernel.PAGE_SIZE // 32 - 1
    rate = n / elapsed
    return Finding(
        "notify ring",
        lost == 0 and got == n,
        f"{ring_pages * _kernel.PAGE_SIZE // 1024} KiB ring ({capacity:,} samples, "
        f"{capacity / rate:.2f} s at {rate:,.0f} hits/s): {got} of {n} sampled, {lost} lost",
        "notify rings are sized for a pause of the daemon at full speed (hwbkptd "
        "--notify-ring); losses are counted and reported as `lost` events",
        {
            "sampled": got,
            "lost": lost,
            "ring_kib": ring_pages * _kernel.PAGE_SIZE // 1024,
            "seconds_covered": round(capacity / rate, 3),
        },
    )


def probe_sigtrap() -> Finding:
    """Stop-mode events: every hit a SIGTRAP with TRAP_PERF and our sig_data."""
    n = 200
    codes: dict[int, int] = {}
    data_ok = 0
    with _Child() as child:
        event = _kernel.BreakpointEvent(
            child.pid, child.addrs["var"], 8, Access.WRITE, Mode.STOP, _TOKEN
        )

        def on_trap() -> None:
            nonlocal data_ok
            info = _kernel.getsiginfo(child.pid)
            codes[info.code] = codes.get(info.code, 0) + 1
            data_ok += info.perf_data == _TOKEN

        try:
            child.run("write", n, on_trap)
            count = event.read_count()
        finally:
            event.close()
    perf = codes.get(_kernel.TRAP_PERF, 0)
    empty = codes.get(_kernel.TRAP_BRKPT, 0)
    return Finding(
        "sigtrap",
        perf == data_ok == count == n - empty,
        f"{perf} of {n} hits stopped with TRAP_PERF and our sig_data; counter {count}; "
        f"{empty} empty-DR6 traps",
        "stop-mode hits are SIGTRAPs the daemon suppresses; routed by counter deltas",
        {
            "stops": perf,
            "sig_data_ok": data_ok,
            "count": count,
            "empty_dr6": empty,
            "si_codes": codes,
        },
    )


def probe_execute() -> Finding:
    """Execute breakpoints stop before the instruction, and RF keeps CONT from re-stopping."""
    n = 100
    stops = at_entry = 0
    with _Child() as child:
        entry = child.addrs["labs"]
        event = _kernel.BreakpointEvent(child.pid, entry, 1, Access.EXECUTE, Mode.STOP, _TOKEN)

        def on_trap() -> None:
            nonlocal stops, at_entry
            stops += 1
            at_entry += _kernel.getregs(child.pid)["rip"] == entry

        try:
            child.run("call", n, on_trap)
            count = event.read_count()
        finally:
            event.close()
    return Finding(
        "execute",
        stops == at_entry == count == n,
        f"{stops} stops for {n} calls, {at_entry} before the instruction; counter {count}",
        "execute breakpoints stop before the instruction; resuming does not re-trigger (RF)",
        {"stops": stops, "before": at_entry, "count": count, "calls": n},
    )


def probe_struct_user() -> Finding:
    """The size of the kernel's ``struct user`` as PEEKUSER sees it (glibc says 912)."""
    with _Child() as child:
        _kernel.interrupt(child.pid)
        ev = _kernel.wait_for(child.pid, TIMEOUT)
        if ev is None:
            raise HwbkptError("the probe's child process did not stop")
        size = 0
        for offset in range(848, 4096, 8):
            try:
                _kernel.peekuser(child.pid, offset)
            except DebugRegisterIOError:
                size = offset
                break
    return Finding(
        "struct user",
        size == SIZEOF_KERNEL_USER,
        f"PEEKUSER answers up to offset {size - 8}: struct user is {size} bytes "
        "(u_debugreg at 848)",
        f"virtual debug registers answer PEEK/POKEUSER as a {SIZEOF_KERNEL_USER}-byte "
        "struct user does (EIO at and beyond its end)",
        size,
    )


def probe_uprobes() -> Finding:
    """Stop the child at every call of libc's ``labs`` with a uprobe (the ``uprobe`` PMU:
    software breakpoints without writing int3 into shared memory) and see where the thread
    stands at each SIGTRAP, what the probed byte reads meanwhile, and whether a BPF program
    could move the thread back before the instruction (hwbkptd/_kernel.py, uprobe events).
    """
    try:
        pmu = int(UPROBE_PMU.read_text())
    except (OSError, ValueError):
        return Finding(
            "uprobes",
            False,
            f"no uprobe PMU ({UPROBE_PMU} missing: kernel without CONFIG_UPROBE_EVENTS)",
            "software breakpoints take hardware execute slots",
        )
    n = 5
    seen: list[tuple[int, int, int]] = []
    with _Child() as child:
        at = child.addrs["labs"]
        where = _kernel.code_location(child.pid, at)
        if where is None:
            return Finding("uprobes", False, "libc's labs is not in a file mapping", "none")
        before = _kernel.read_memory(child.pid, at, 1)
        event = _kernel.UprobeEvent(child.pid, where[0], where[1], _TOKEN)
        try:
            during = _kernel.read_memory(child.pid, at, 1)

            def on_trap() -> None:
                info = _kernel.getsiginfo(child.pid)
                seen.append((info.code, info.perf_data, _kernel.getregs(child.pid)["rip"]))

            child.run("call", n, on_trap)
            count = event.read_count()
        finally:
            event.close()
        after = _kernel.read_memory(child.pid, at, 1)
    offsets = sorted({rip - at for _, _, rip in seen})
    ours = all(code == _kernel.TRAP_PERF and data == _TOKEN for code, data, _ in seen)
    stop = "at" if offsets == [0] else "after"
    refused = _kernel.uprobe_regs_writable()
    details = {
        "pmu": pmu,
        "stops": len(seen),
        "count": count,
        "rip_minus_address": offsets,
        "byte": [before.hex(), during.hex(), after.hex()],
        "regs_writable": refused is None,
        "verifier": refused,
    }
    if stop == "at":
        action = "a uprobe stops before its instruction here: it could serve software breakpoints"
    elif refused is None:
        action = (
            "the verifier lets a uprobe program move ip (the route to stopping before the "
            "instruction), not used yet: software breakpoints take hardware execute slots"
        )
    else:
        action = (
            "software breakpoints take hardware execute slots: a uprobe stops after its "
            f"instruction and the verifier refuses to let a uprobe program move ip ({refused})"
        )
    return Finding(
        "uprobes",
        ours and len(seen) == count == n,
        f"uprobe PMU (perf type {pmu}): {len(seen)} SIGTRAP(s) for {n} calls, rip "
        f"{', '.join(f'{o:+d}' for o in offsets)} from the probe (the instruction has run); "
        f"the byte reads {during.hex()} while probed, {before.hex()} before and after",
        action,
        {"stop": stop, "regs_writable": refused is None},
        details,
    )


def probe_bpf() -> Finding:
    """A condition program on a stop-mode breakpoint: only true hits stop the thread, the
    event still counts every hit, the program counts the true ones."""
    why = _kernel.bpf_available()
    if why is not None:
        return Finding(
            "bpf",
            True,
            f"no condition programs: {why}",
            "conditions are evaluated at a ptrace stop of every hit (same results, slower)",
            None,
        )
    n, wanted = 100, 37
    stops = 0
    with _Child() as child:
        addr = child.addrs["var"]
        cond = parse(f"new == {wanted}", 8)
        program = generate(addr, 8, [cond], False)
        event = _kernel.BreakpointEvent(
            child.pid, addr, 8, Access.WRITE, Mode.STOP, _TOKEN, bpf=_kernel.BpfFilter(program, {})
        )

        def on_trap() -> None:
            nonlocal stops
            stops += 1

        try:
            child.run("write", n, on_trap)
            count = event.read_count()
            assert event.bpf is not None
            true_hits = event.bpf.words()[HITS_BASE]
        finally:
            event.close()
    return Finding(
        "bpf",
        (stops, count, true_hits) == (1, n, 1),
        f"condition 'new == {wanted}' over {n} writes: {stops} stop(s), event counter {count}, "
        f"program counted {true_hits} true",
        "conditions are BPF programs on the breakpoint events: a false hit costs a counted hit",
        {"stops": stops, "count": count, "true": true_hits},
    )


PROBES: dict[str, Callable[[], Finding]] = {
    "breakpoints": probe_breakpoints,
    "sigtrap": probe_sigtrap,
    "execute": probe_execute,
    "int1": probe_int1,
    "notify ring": probe_notify_ring,
    "struct user": probe_struct_user,
    "uprobes": probe_uprobes,
    "bpf": probe_bpf,
}


def run_all(names: Iterable[str] | None = None) -> list[Finding]:
    """Run the probes (all, or those named); a probe that fails says why in its Finding."""
    out = []
    for name in names if names is not None else PROBES:
        try:
            out.append(PROBES[name]())
        except (HwbkptError, OSError) as err:
            out.append(Finding(name, False, f"probe failed: {err}", "see the message"))
    return out
