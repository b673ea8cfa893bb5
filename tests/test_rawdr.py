"""Raw debug registers through the daemon, against the live kernel (DESIGN §5.6, issue 4).

Every test compares the daemon with what the kernel itself does for a plain ptrace tracer
(the test process, through tests/_ptrace_ref.py's ctypes ``ptrace``), on another instance
of the same program:

1. :func:`test_differential_pokeuser_through_daemon` — random POKEUSER sequences (the
   generator of tests/test_vdr_kernel.py) give the same errno and the same DR0-7 read-backs
   through ``poke_user``/``peek_user`` as through ``PTRACE_POKEUSER``/``PEEKUSER``.
2. :func:`test_hits_in_each_clients_numbering` — two clients, one physical slot, each sees
   DR6 in its own slot numbering, as the kernel shows a tracer using that slot number.
3. :func:`test_differential_hits_and_steps` — the same programming gives the same stops
   (rip) and DR6 values, with a step that hits a watch and one store hitting two slots.
4. :func:`test_dr7_enospc_keeps_previous_value` — a fifth distinct key is ENOSPC.
5. :func:`test_disconnect_drops_only_that_clients_registers` and
   :func:`test_disconnect_at_a_shared_stop` — a client that goes loses its registers and
   watches; nobody else's registers, holds or hits change.

``HWBKPT_VDR_SEQUENCES=N`` runs N differential sequences instead of 2,000 (the daemon side
pipelines each sequence's calls on one connection; about 10-15 ms a sequence).

Addresses. Test 1 writes literally the same values to both processes, so both must have
the same layout: tests/progs/drsleep.c re-executes itself with ``ADDR_NO_RANDOMIZE`` (as
``setarch -R`` would) and the test checks that both instances have identical mappings, so a
generated address is "the same variable" in both (the kernel's checks depend only on the
value, but watching the same thing in both keeps the comparison honest). drsleep sleeps in
``pause()``, so no trap ever changes DR6 on either side. The hit tests (2, 3) run writer.c,
a randomized PIE: there each side programs the addresses its own instance printed, and a
stop's rip is compared as (mapped file, offset from that file's first mapping).

Cleanup: the ``target`` fixture SIGKILLs and reaps every program (resuming stops of a
program this process traces), :class:`RefTracee` kills and reaps its child, the daemon
fixture stops the daemon (which detaches everything), and each client connection is closed
in a ``finally``; every test also has an absolute time limit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import hwbkpt
from hwbkpt_proto import HwbkptError
from tests import _ptrace_ref as ref
from tests._daemon import Daemon
from tests._progs import Target, build
from tests._ptrace_ref import DEBUGREG_OFFSET, RefTracee
from tests.test_vdr_kernel import (
    DR_OFFSETS,
    RESET,
    KernelSubject,
    Observation,
    Op,
    Subject,
    _user_addrs,
    generate_sequence,
    observe,
    run_sequence,
    shrink,
)

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

TIMEOUT = 10.0
QUIET = 0.3
Start = Callable[..., Target]

DR6_FRESH = 0xFFFF0FF0


# DR7 for "slot n: write, 8 bytes, locally enabled" (RW=01, LEN=10).
def dr7_write8(n: int) -> int:
    return (1 << (2 * n)) | (0b1001 << (16 + 4 * n))


def _errno_of(err: HwbkptError) -> int:
    assert err.errno is not None, f"{err!r} has no errno"
    return err.errno


# =========================================================================== 1. differential


class DaemonSubject:
    """One client's virtual registers of one thread, as a Subject of test_vdr_kernel."""

    def __init__(self, client: hwbkpt.Client, tid: int) -> None:
        self.client = client
        self.tid = tid

    def poke(self, offset: int, value: int) -> int:
        try:
            self.client.poke_user(self.tid, offset, value)
        except HwbkptError as err:
            return _errno_of(err)
        return 0

    def peek(self, offset: int) -> tuple[int, int]:
        try:
            return 0, self.client.peek_user(self.tid, offset)
        except HwbkptError as err:
            return _errno_of(err), 0

    def pipelined(self, calls: Sequence[tuple[str, int, int | None]]) -> list[tuple[int, int]]:
        """Send many ``poke_user``/``peek_user`` calls at once; ``(errno, value)`` of each.

        The daemon answers one connection's requests one at a time, in order
        (hwbkptd/_server.py), so this is the same as calling them one by one — minus a
        round trip per call.
        """
        session = self.client._session
        ids, data = [], b""
        for method, offset, value in calls:
            params: dict[str, Any] = {"tid": self.tid, "offset": offset}
            if value is not None:
                params["value"] = value
            msgid, chunk = session.request(method, params)
            ids.append(msgid)
            data += chunk
        self.client._send(data)
        deadline = time.monotonic() + TIMEOUT
        out = []
        for msgid in ids:
            while not session.has_result(msgid):
                session.check_alive()
                assert time.monotonic() < deadline, "the daemon did not answer in time"
                self.client._receive(deadline)
            try:
                result = session.take_result(msgid)
            except HwbkptError as err:
                out.append((_errno_of(err), 0))
            else:
                out.append((0, 0 if result is None else int(result)))
        return out

    def reset_and_run(self, ops: Sequence[Op]) -> tuple[list[int], list[Observation]]:
        """RESET, then every op with its read-back: (reset errnos, observations)."""
        calls: list[tuple[str, int, int | None]] = [("poke_user", o, v) for o, v in RESET]
        for offset, value in ops:
            calls.append(("poke_user", offset, value))
            calls.extend(("peek_user", off, None) for off in DR_OFFSETS)
        results = self.pipelined(calls)
        resets = [rc for rc, _ in results[: len(RESET)]]
        rest = results[len(RESET) :]
        obs = []
        for i in range(len(ops)):
            chunk = rest[i * 9 : (i + 1) * 9]
            obs.append((chunk[0][0], tuple(chunk[1:])))
        return resets, obs


def _maps_layout(pid: int) -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [" ".join(line.split()[:2]) for line in f]


def _describe(new_pair: Callable[[], tuple[Subject, Subject]], ops: Sequence[Op]) -> str:
    kernel, daemon = new_pair()
    lines = []
    for op in ops:
        want, got = observe(kernel, op), observe(daemon, op)
        offset, value = op
        n = (offset - DEBUGREG_OFFSET) / 8
        mark = "   " if want == got else ">>>"
        lines.append(f"{mark} POKEUSER {offset} (DR{n:g}) = {value:#x}")
        for who, obs in (("kernel", want), ("daemon", got)):
            regs = " ".join(f"{v:#x}" if e == 0 else errno.errorcode[e] for e, v in obs[1])
            rc = errno.errorcode.get(obs[0], str(obs[0])) if obs[0] else "ok"
            lines.append(f"      {who}: {rc:6} DR0..7: {regs}")
    return "\n".join(lines)


def _differential_count() -> int:
    return int(os.environ.get("HWBKPT_VDR_SEQUENCES", "2000"))


@pytest.mark.timeout(600)
def test_differential_pokeuser_through_daemon(
    daemon_factory: Callable[..., Daemon], target: Start
) -> None:
    """≥ 2,000 random POKEUSER sequences: daemon (poke_user/peek_user) == live kernel."""
    # The debug log would carry a line per refused write (a third of them): info is enough.
    daemon = daemon_factory("--log-level", "info")
    count = _differential_count()
    binary = build("drsleep")
    proc = target("drsleep")
    with (
        RefTracee([str(binary)], info_line=True) as tracee,
        hwbkpt.Client(socket=daemon.socket, name="differential", timeout=TIMEOUT) as client,
    ):
        ref_info = dict(w.split("=") for w in tracee.info.split())
        assert proc.info["norand"] == 1, "ASLR still on for the daemon's instance"
        assert ref_info["norand"] == "1", "ASLR still on for the reference instance"
        assert int(ref_info["var"], 16) == proc.info["var"]
        assert _maps_layout(tracee.pid) == _maps_layout(proc.pid), "layouts differ"
        addrs = _user_addrs(proc.pid)
        kernel = KernelSubject(tracee)
        subject = DaemonSubject(client, proc.pid)
        rng = random.Random(0x4A7D_D1FF)
        deadline = time.monotonic() + max(60.0, count * 0.1)
        started = time.monotonic()

        def reset_pair() -> tuple[Subject, Subject]:
            for op in RESET:
                assert kernel.poke(*op) == 0, f"reset write {op} failed on the kernel"
                assert subject.poke(*op) == 0, f"reset write {op} failed on the daemon"
            return kernel, subject

        for index in range(count):
            assert time.monotonic() < deadline, f"too slow: {index} sequences done"
            ops = generate_sequence(rng, addrs)
            for op in RESET:
                assert kernel.poke(*op) == 0, f"reset write {op} failed on the kernel"
            want = run_sequence(kernel, ops)
            resets, got = subject.reset_and_run(ops)
            assert resets == [0] * len(RESET), f"reset writes failed on the daemon: {resets}"
            if got != want:
                body = shrink(reset_pair, list(ops))
                pytest.fail(
                    f"sequence {index} differs from the kernel; minimal sequence after the "
                    f"reset writes {[(o, hex(v)) for o, v in RESET]}:\n"
                    f"{_describe(reset_pair, body)}"
                )
        print(f"{count} sequences in {time.monotonic() - started:.1f} s")


# =========================================================================== hit helpers

RIP_OFFSET = 8 * 16  # offsetof(struct user, regs.rip)
# ("stop", where rip is, DR6) or ("exit", exit code, 0).
Stop = tuple[str, Any, int]


def where(pid: int, rip: int) -> tuple[str, int]:
    """``rip`` as (mapped file, offset from that file's lowest mapping): comparable across
    two randomized instances of one program, in its own code and in libc alike."""
    base: dict[str, int] = {}
    found = None
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else f"[anon {fields[0]}]"
            base.setdefault(name, start)
            if start <= rip < end:
                found = name
    assert found is not None, f"rip {rip:#x} is not mapped in {pid}"
    return found, rip - base[found]


def info_int(proc: Target, key: str) -> int:
    value = proc.info[key]
    assert isinstance(value, int), (key, proc.info)
    return value


# Which variable each slot watches: the writer's info keys, plus a byte offset.
Programming = dict[int, tuple[str, int]]


def _dr7_for(programming: Programming) -> int:
    dr7 = 0
    for n in programming:
        dr7 |= dr7_write8(n)
    return dr7


class PtraceWriter:
    """The reference: this test process traces a writer itself with plain ptrace."""

    def __init__(self, proc: Target) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.tracee_done = False
        self._call(ref.PTRACE_SEIZE, "PTRACE_SEIZE")
        self._call(ref.PTRACE_INTERRUPT, "PTRACE_INTERRUPT")
        status = self._wait()
        assert os.WIFSTOPPED(status), hex(status)
        assert status >> 16 == ref.PTRACE_EVENT_STOP, hex(status)

    def _call(self, request: int, what: str, addr: int = 0, data: int = 0) -> int:
        ctypes.set_errno(0)
        rc = int(ref._ptrace(request, self.pid, ctypes.c_void_p(addr), ctypes.c_void_p(data)))
        err = ctypes.get_errno()
        if rc == -1 and err:
            raise OSError(err, f"{what}: {os.strerror(err)}")
        return rc

    def _wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG | ref.WALL)
            if pid == self.pid:
                if not os.WIFSTOPPED(status):
                    self.tracee_done = True
                    self.proc.popen.returncode = os.waitstatus_to_exitcode(status)
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"writer {self.pid} did not stop in {TIMEOUT} s")
            time.sleep(0.0002)

    def poke_dr(self, n: int, value: int) -> None:
        self._call(ref.PTRACE_POKEUSER, "POKEUSER", DEBUGREG_OFFSET + 8 * n, value)

    def peek(self, offset: int) -> int:
        return self._call(ref.PTRACE_PEEKUSER, "PEEKUSER", offset) & ((1 << 64) - 1)

    def resume(self, step: bool) -> int:
        """CONT or SINGLESTEP with no signal; the next wait status."""
        self._call(ref.PTRACE_SINGLESTEP if step else ref.PTRACE_CONT, "CONT/STEP")
        return self._wait()


def reference_stops(
    proc: Target, programming: Programming, steps: Sequence[int] = ()
) -> list[Stop]:
    """Run the writer under plain ptrace with this programming; every stop until it exits.

    After the ``k``-th stop (counting from 0) for ``k`` in ``steps`` the thread is
    single-stepped; otherwise continued.
    """
    tracer = PtraceWriter(proc)
    for n, (key, delta) in programming.items():
        tracer.poke_dr(n, info_int(proc, key) + delta)
    tracer.poke_dr(7, _dr7_for(programming))
    proc.go()
    stops: list[Stop] = []
    step = False
    for _ in range(100):
        status = tracer.resume(step)
        if tracer.tracee_done:
            stops.append(("exit", os.waitstatus_to_exitcode(status), 0))
            return stops
        assert os.WSTOPSIG(status) == 5, f"stopped by signal {os.WSTOPSIG(status)}, not SIGTRAP"
        rip = tracer.peek(RIP_OFFSET)
        dr6 = tracer.peek(DEBUGREG_OFFSET + 8 * 6)
        step = len(stops) in steps
        stops.append(("stop", where(proc.pid, rip), dr6))
    pytest.fail(f"the reference writer stopped more than 100 times: {stops}")


def _client(daemon: Daemon, name: str) -> hwbkpt.Client:
    return hwbkpt.Client(socket=daemon.socket, name=name, timeout=TIMEOUT)


def next_of(client: hwbkpt.Client, kinds: tuple[str, ...], timeout: float = TIMEOUT) -> Any:
    """The next event of one of ``kinds`` (others are skipped); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    skipped = []
    while (left := deadline - time.monotonic()) > 0:
        event = client.next_event(timeout=left)
        if event is None:
            break
        if event.kind in kinds:
            return event
        skipped.append(event)
    pytest.fail(f"no {kinds} event within {timeout} s; skipped: {skipped}")


def no_stop(client: hwbkpt.Client, timeout: float = QUIET) -> None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = client.next_event(timeout=left)
        assert event is None or event.kind != "stop", f"unexpected stop: {event}"


def daemon_stops(
    client: hwbkpt.Client, proc: Target, programming: Programming, steps: Sequence[int] = ()
) -> list[Stop]:
    """The same run as :func:`reference_stops`, through the daemon's raw registers.

    At every stop the event's ``dr6`` must equal ``peek_dr(tid, 6)``.
    """
    tid = proc.pid
    for n, (key, delta) in programming.items():
        client.poke_dr(tid, n, info_int(proc, key) + delta)
    client.poke_dr(tid, 7, _dr7_for(programming))
    proc.go()
    stops: list[Stop] = []
    for _ in range(100):
        event = next_of(client, ("stop", "exit"))
        if event.kind == "exit":
            stops.append(("exit", event.code if event.code is not None else -event.signal, 0))
            return stops
        assert event.tid == tid
        assert event.dr6 == client.peek_dr(tid, 6), "stop event's dr6 != peek_dr(tid, 6)"
        assert event.dr6 == client.peek_user(tid, DEBUGREG_OFFSET + 8 * 6)
        stops.append(("stop", where(proc.pid, event.regs["rip"]), event.dr6))
        if len(stops) - 1 in steps:
            client.step(tid)
        else:
            client.resume(tid)
    pytest.fail(f"the writer stopped more than 100 times through the daemon: {stops}")


# =========================================================================== 2. numbering


@pytest.mark.timeout(90)
def test_hits_in_each_clients_numbering(daemon: Daemon, target: Start) -> None:
    """A's slot 0 and B's slot 3 on one address: one physical slot, DR6 in each numbering."""
    n = 3
    # The kernel, one tracer per slot number (two fresh writers).
    want_a = reference_stops(target("writer", n), {0: ("addr", 0)})
    want_b = reference_stops(target("writer", n), {3: ("addr", 0)})
    assert [s[2] for s in want_a[:-1]] == [0xFFFF0FF1] * n, want_a
    assert [s[2] for s in want_b[:-1]] == [0xFFFF0FF8] * n, want_b
    assert [s[:2] for s in want_a] == [s[:2] for s in want_b]

    proc = target("writer", n)
    tid, var = proc.pid, info_int(proc, "addr")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(_client(daemon, "A"))
        b = stack.enter_context(_client(daemon, "B"))
        a.poke_dr(tid, 0, var)
        a.poke_dr(tid, 7, dr7_write8(0))
        b.poke_dr(tid, 3, var)
        b.poke_dr(tid, 7, dr7_write8(3))
        (thread,) = [t for tg in a.status()["targets"] if tg["pid"] == tid for t in tg["threads"]]
        assert len(thread["slots"]) == 1, thread
        (slot,) = thread["slots"]
        assert (slot["addr"], slot["length"], slot["access"]) == (var, 8, "w")
        assert slot["holders"] == sorted([a.server_info["client_id"], b.server_info["client_id"]])
        proc.go()
        for i in range(n):
            ea = next_of(a, ("stop",))
            eb = next_of(b, ("stop",))
            assert (ea.dr6, a.peek_dr(tid, 6)) == (want_a[i][2], want_a[i][2]) == (0xFFFF0FF1,) * 2
            assert (eb.dr6, b.peek_dr(tid, 6)) == (want_b[i][2], want_b[i][2]) == (0xFFFF0FF8,) * 2
            assert where(tid, ea.regs["rip"]) == where(tid, eb.regs["rip"]) == want_a[i][1]
            assert len(ea.watches) == len(eb.watches) == 1
            a.resume(tid)
            b.resume(tid)
        assert next_of(a, ("exit",)).code == 0
        assert proc.wait(TIMEOUT) == 0


# =========================================================================== 3. differential hits


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("mode", "programming", "steps"),
    [
        # Slot 0 on var, slot 2 on var2; step from var's hit onto the var2 store (BS + B2).
        ("", {0: ("addr", 0), 2: ("addr2", 0)}, (0,)),
        # Steps after every stop, and slot numbers in another order.
        ("", {3: ("addr", 0), 1: ("addr2", 0)}, tuple(range(20))),
        # One 16-byte store over pair[0] (slot 1) and pair[1] (slot 3): both bits at once.
        ("pair", {1: ("pair", 0), 3: ("pair", 8)}, ()),
        ("pair", {0: ("pair", 0), 2: ("pair", 8)}, (0, 1)),
    ],
    ids=["step-onto-hit", "step-always", "pair", "pair-step"],
)
def test_differential_hits_and_steps(
    daemon: Daemon, target: Start, mode: str, programming: Programming, steps: tuple[int, ...]
) -> None:
    """Plain ptrace and the daemon: the same stops (rip) with the same DR6 values."""
    n = 3
    args = (n, mode) if mode else (n,)
    want = reference_stops(target("writer", *args), programming, steps)
    with _client(daemon, "raw") as client:
        got = daemon_stops(client, target("writer", *args), programming, steps)
    assert got == want
    if mode == "pair" and not steps:
        bits = sum(1 << s for s in programming)
        assert [s[2] for s in want if s[0] == "stop"] == [0xFFFF0FF0 | bits] * n
    if 0 in steps and not mode:
        assert want[1][2] & 0x4000, "the step onto the var2 store has BS"
        assert want[1][2] & (1 << list(programming)[1])


def thread_status(client: hwbkpt.Client, pid: int, tid: int) -> dict[str, Any]:
    for tg in client.status()["targets"]:
        if tg["pid"] == pid:
            for thread in tg["threads"]:
                if thread["tid"] == tid:
                    return dict(thread)
    raise AssertionError(f"thread {tid} of {pid} is not in the daemon's status")


def slot_table(client: hwbkpt.Client, pid: int, tid: int) -> dict[tuple[int, int, str], list[int]]:
    """(addr, length, access) -> holders of every physical slot of the thread."""
    return {
        (s["addr"], s["length"], s["access"]): s["holders"]
        for s in thread_status(client, pid, tid)["slots"]
    }


# =========================================================================== 4. ENOSPC


@pytest.mark.timeout(60)
def test_dr7_enospc_keeps_previous_value(daemon: Daemon, target: Start) -> None:
    """Four physical slots held by others' watches: a fifth distinct key is ENOSPC."""
    proc = target("writer", 1)
    pid = tid = proc.pid
    var, var2, pair = (info_int(proc, k) for k in ("addr", "addr2", "pair"))
    with contextlib.ExitStack() as stack:
        others = [stack.enter_context(_client(daemon, f"other{i}")) for i in range(2)]
        raw = stack.enter_context(_client(daemon, "raw"))
        watches = []
        for i, addr in enumerate((var, var2, pair, pair + 8)):
            watches.append(others[i % 2].watch(pid, addr, 8, "w", "count", tid=tid))
            assert watches[-1].state == "installed"
        before = slot_table(raw, pid, tid)
        assert len(before) == 4
        # Slot 1 on a key already installed shares its physical slot: that still fits.
        raw.poke_dr(tid, 1, var)
        shared = dr7_write8(1)
        raw.poke_dr(tid, 7, shared)
        assert raw.peek_dr(tid, 7) == shared
        # DR0 = var, 4 bytes: a fifth distinct key. Writing the address alone is fine...
        raw.poke_dr(tid, 0, var)
        fifth = shared | 0b01 | (0b1101 << 16)  # L0, RW=01, LEN=11
        with pytest.raises(HwbkptError) as info:
            raw.poke_dr(tid, 7, fifth)
        assert info.value.errno == errno.ENOSPC == 28
        # ... and through struct user the same.
        with pytest.raises(HwbkptError) as info:
            raw.poke_user(tid, DEBUGREG_OFFSET + 8 * 7, fifth | 0x100)
        assert info.value.errno == errno.ENOSPC
        assert raw.peek_dr(tid, 7) == raw.peek_user(tid, DEBUGREG_OFFSET + 56) == shared
        assert [raw.peek_dr(tid, n) for n in range(4)] == [var, var, 0, 0]
        after = slot_table(raw, pid, tid)
        assert after.keys() == before.keys()
        assert after[(var, 8, "w")] == sorted(
            [others[0].server_info["client_id"], raw.server_info["client_id"]]
        )
        # ENOSPC was about capacity: once a slot frees, the very same write succeeds.
        watches[1].remove()
        raw.poke_dr(tid, 7, fifth)
        assert raw.peek_dr(tid, 7) == fifth
        assert (var, 4, "w") in slot_table(raw, pid, tid)


# =========================================================================== 5. disconnect


@pytest.mark.timeout(60)
def test_disconnect_drops_only_that_clients_registers(daemon: Daemon, target: Start) -> None:
    """A client that goes loses its registers and watches; B's registers and hits stay."""
    n = 3
    proc = target("writer", n)
    pid = tid = proc.pid
    var, var2 = info_int(proc, "addr"), info_int(proc, "addr2")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(_client(daemon, "A"))
        b = stack.enter_context(_client(daemon, "B"))
        c = stack.enter_context(_client(daemon, "C"))
        a_id, b_id, c_id = (x.server_info["client_id"] for x in (a, b, c))
        # A: slot 0 on var (shared with C's count watch), DR1 an address, DR6 junk.
        a.poke_dr(tid, 0, var)
        a.poke_dr(tid, 1, var2 + 0x1000)
        a.poke_dr(tid, 6, 0xFFFF0FF3)
        a.poke_dr(tid, 7, dr7_write8(0))
        # B: slot 2 on var2, its own DR6 value.
        b.poke_dr(tid, 2, var2)
        b.poke_dr(tid, 6, 0xFFFF4FF0)
        b_dr7 = dr7_write8(2) | 0x200
        b.poke_dr(tid, 7, b_dr7)
        b_regs = [b.peek_dr(tid, k) for k in range(8)]
        assert b_regs == [0, 0, var2, 0, 0, 0, 0xFFFF4FF0, b_dr7]
        count = c.watch(pid, var, 8, "w", "count")
        assert slot_table(c, pid, tid) == {
            (var, 8, "w"): sorted([a_id, c_id]),
            (var2, 8, "w"): [b_id],
        }
        a.close()
        deadline = time.monotonic() + TIMEOUT
        while a_id in [x["id"] for x in c.status()["clients"]]:
            assert time.monotonic() < deadline, "the daemon did not notice A leave"
            time.sleep(0.01)
        assert slot_table(c, pid, tid) == {(var, 8, "w"): [c_id], (var2, 8, "w"): [b_id]}
        # A new connection (A again, as far as a debugger can tell) reads fresh registers.
        a2 = stack.enter_context(_client(daemon, "A"))
        assert [a2.peek_dr(tid, k) for k in range(8)] == [0, 0, 0, 0, 0, 0, DR6_FRESH, 0]
        assert [b.peek_dr(tid, k) for k in range(8)] == b_regs
        # B's hits are intact, in B's numbering; nobody else stops; C counts every store.
        proc.go()
        for i in range(1, n + 1):
            event = next_of(b, ("stop",))
            assert event.dr6 == b.peek_dr(tid, 6) == 0xFFFF0FF4
            assert count.count() == i  # C's watch on A's old key still counts every store
            b.resume(tid)
        assert next_of(b, ("exit",)).code == 0
        no_stop(a2)
        no_stop(c)
        assert proc.wait(TIMEOUT) == 0


@pytest.mark.timeout(60)
def test_disconnect_at_a_shared_stop(daemon: Daemon, target: Start) -> None:
    """A leaves while both A and B hold a stop: B's registers, DR6 and hits carry on."""
    n = 3
    proc = target("writer", n)
    tid, var = proc.pid, info_int(proc, "addr")
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(_client(daemon, "A"))
        b = stack.enter_context(_client(daemon, "B"))
        a.poke_dr(tid, 0, var)
        a.poke_dr(tid, 7, dr7_write8(0))
        b.poke_dr(tid, 3, var)
        b.poke_dr(tid, 7, dr7_write8(3))
        proc.go()
        assert next_of(a, ("stop",)).dr6 == 0xFFFF0FF1
        first = next_of(b, ("stop",))
        assert first.dr6 == 0xFFFF0FF8
        a.close()  # without resuming: its hold goes with it
        assert [b.peek_dr(tid, k) for k in (3, 6, 7)] == [var, 0xFFFF0FF8, dr7_write8(3)]
        b.resume(tid)
        for _ in range(n - 1):
            event = next_of(b, ("stop",))
            assert event.dr6 == b.peek_dr(tid, 6) == 0xFFFF0FF8
            assert event.regs["rip"] == first.regs["rip"]
            b.resume(tid)
        assert next_of(b, ("exit",)).code == 0
        assert proc.wait(TIMEOUT) == 0
