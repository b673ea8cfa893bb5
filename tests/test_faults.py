"""Faults (DESIGN.md §7, §8): a client killed while it holds a stop, the daemon stopped with
SIGTERM or killed with SIGKILL under load, a slow client beside a fast one, the stop timeout.

Every target is a ``tests/progs`` program run by the ``target`` fixture (SIGKILLed and reaped
at teardown); every daemon comes from ``daemon_factory`` (stopped at teardown); forked
clients are SIGKILLed and reaped in ``finally`` blocks. Measured figures are printed (run
``pytest -s``) as ``FIGURE name=value`` lines.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest

import hwbkpt
from tests._daemon import Daemon
from tests._progs import Target
from tests.test_watch import TIMEOUT, info_int, proc_state, wait_until

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]
Factory = Callable[..., Daemon]


# --------------------------------------------------------------------------- helpers


def figure(name: str, value: Any) -> None:
    print(f"FIGURE {name}={value}")


def tracer_pids(pid: int) -> dict[int, int]:
    """TracerPid of every thread of ``pid``."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{name}/status") as f,
        ):
            for line in f:
                if line.startswith("TracerPid:"):
                    out[int(name)] = int(line.split()[1])
    return out


def read_var(pid: int, addr: int) -> int:
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        return int.from_bytes(os.pread(fd, 8, addr), "little", signed=True)
    finally:
        os.close(fd)


def advances(pid: int, addr: int, within: float = TIMEOUT) -> None:
    """``var`` of the spinner ``pid`` changes within ``within`` seconds (it runs)."""
    first = read_var(pid, addr)
    wait_until(lambda: read_var(pid, addr) != first, within, f"{pid} to make progress")


def untraced(pid: int, within: float = TIMEOUT) -> None:
    wait_until(
        lambda: not any(tracer_pids(pid).values()), within, f"every thread of {pid} untraced"
    )


def stop_spinner(proc: Target) -> None:
    """One line on the spinner's stdin ends its loop; it prints ``done`` and exits 0."""
    proc.go()
    assert proc.line().startswith("done var=")
    assert proc.wait(TIMEOUT) == 0


@contextlib.contextmanager
def forked(fn: Callable[[int], None]) -> Iterator[tuple[int, int]]:
    """Run ``fn(write_fd)`` in a forked child; yield ``(pid, read_fd)``; SIGKILL and reap it
    on exit."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(rfd)
            fn(wfd)
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        yield pid, rfd
    finally:
        os.close(rfd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def read_line(fd: int, timeout: float = TIMEOUT) -> str:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            pytest.fail(f"no line from the child within {timeout} s (got {data!r})")
        chunk = os.read(fd, 1)
        if not chunk:
            pytest.fail(f"the child closed its pipe (got {data!r})")
        data += chunk
    return data.decode().strip()


def expect(client: hwbkpt.Client, kind: str, timeout: float = TIMEOUT) -> hwbkpt.Event:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no {kind!r} event within {timeout} s")
        event = client.next_event(timeout=left)
        if event is not None and event.kind == kind:
            return event


class RawClient:
    """A client that writes requests and reads nothing unless asked (a slow client).

    Make it with the ``raw_client`` fixture, which closes it even when the test fails."""

    def __init__(self, path: str, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if rcvbuf is not None:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.connect(path)
            self.unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            self.msgid = 0
            self.events: list[tuple[str, dict[str, Any]]] = []
            self.request("hello", version=1, name="slow")
            self.wait_response(0)
        except BaseException:
            self.sock.close()
            raise

    def request(self, method: str, **params: Any) -> int:
        msgid, self.msgid = self.msgid, self.msgid + 1
        self.sock.sendall(msgpack.packb([0, msgid, method, [params]], use_bin_type=True))
        return msgid

    def read(self, timeout: float) -> list[Any]:
        """Messages that arrive within ``timeout`` seconds; [] on EOF."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, ConnectionResetError):
            return []
        if not data:
            raise EOFError
        self.unpacker.feed(data)
        return list(self.unpacker)

    def wait_response(self, msgid: int, timeout: float = TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for msg in self.read(deadline - time.monotonic()):
                if msg[0] == 1 and msg[1] == msgid:
                    assert msg[2] is None, msg[2]
                    return msg[3]
                if msg[0] == 2:
                    self.events.append((msg[1], msg[2][0] if msg[2] else {}))
        pytest.fail(f"no response to request {msgid}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_client() -> Iterator[Callable[..., RawClient]]:
    """``raw_client(path, rcvbuf=None)`` makes a :class:`RawClient`; all are closed at
    teardown, so a failed assertion cannot leak a socket into a later test."""
    made: list[RawClient] = []

    def make(path: str, rcvbuf: int | None = None) -> RawClient:
        client = RawClient(path, rcvbuf)
        made.append(client)
        return client

    try:
        yield make
    finally:
        for client in made:
            client.close()


# --------------------------------------------------------------------------- 2. client death


@pytest.mark.timeout(60)
def test_client_killed_while_holding_a_stop_releases_it(daemon: Daemon, target: Start) -> None:
    proc = target("spinner")
    addr = info_int(proc, "addr")

    def holder(wfd: int) -> None:
        c = hwbkpt.Client(socket=daemon.socket, name="holder", timeout=TIMEOUT)
        c.watch(proc.pid, addr, mode="stop")
        os.write(wfd, b"watching\n")
        ev = expect(c, "stop")
        os.write(wfd, f"stopped {ev.tid}\n".encode())
        time.sleep(3600)

    with forked(holder) as (child, rfd):
        assert read_line(rfd) == "watching"
        proc.go()
        assert read_line(rfd) == f"stopped {proc.pid}"
        # Held: stays in a tracing stop.
        time.sleep(0.2)
        assert proc_state(proc.pid) == "t"
        value = read_var(proc.pid, addr)
        t0 = time.monotonic()
        os.kill(child, signal.SIGKILL)
        while proc_state(proc.pid) == "t" and time.monotonic() - t0 < 5.0:
            pass
        t_state = time.monotonic() - t0
        while read_var(proc.pid, addr) == value and time.monotonic() - t0 < 5.0:
            pass
        t_progress = time.monotonic() - t0
    figure("client_kill_to_running_ms", f"{t_state * 1000:.1f}")
    figure("client_kill_to_progress_ms", f"{t_progress * 1000:.1f}")
    assert t_progress < 2.0, f"the thread ran again only {t_progress:.3f} s after the kill"
    # Its watch is gone with it: the daemon detaches, the program runs on and exits 0.
    untraced(proc.pid)
    stop_spinner(proc)


# --------------------------------------------------------------------------- 3. SIGTERM


@pytest.mark.timeout(60)
def test_sigterm_resumes_and_detaches_every_target(daemon: Daemon, target: Start) -> None:
    stopped = [target("spinner") for _ in range(2)]
    counted = target("spinner")
    notified = target("spinner", 100)
    holder = hwbkpt.Client(socket=daemon.socket, name="holder", timeout=TIMEOUT)
    counter = hwbkpt.Client(socket=daemon.socket, name="counter", timeout=TIMEOUT)
    for p in stopped:
        holder.watch(p.pid, info_int(p, "addr"), mode="stop")
    w = counter.watch(counted.pid, info_int(counted, "addr"), mode="count")
    counter.watch(notified.pid, info_int(notified, "addr"), mode="notify")
    for p in (*stopped, counted, notified):
        p.go()
    for _ in stopped:
        expect(holder, "stop")
    for p in stopped:
        wait_until(lambda p=p: proc_state(p.pid) == "t", what=f"{p.pid} stopped")
    wait_until(lambda: w.count() > 100, what="counts")
    assert daemon.stop() == 0
    for p in (*stopped, counted, notified):
        untraced(p.pid)
        advances(p.pid, info_int(p, "addr"))
        assert proc_state(p.pid) != "t"
    for p in (*stopped, counted, notified):
        stop_spinner(p)
    holder.close()
    counter.close()


# --------------------------------------------------------------------------- 4. SIGKILL


@pytest.mark.timeout(60)
@pytest.mark.parametrize("run", range(5))
def test_sigkill_under_count_and_notify_load_leaves_targets_running(
    daemon_factory: Factory, target: Start, run: int
) -> None:
    d = daemon_factory()
    procs = [target("spinner") for _ in range(2)] + [target("spinner", 0, 50)]
    c = hwbkpt.Client(socket=d.socket, name="load", timeout=TIMEOUT)
    watches = [
        c.watch(procs[0].pid, info_int(procs[0], "addr"), mode="count"),
        c.watch(procs[1].pid, info_int(procs[1], "addr"), mode="notify"),
        c.watch(procs[2].pid, info_int(procs[2], "addr"), mode="notify"),
        c.watch(procs[2].pid, info_int(procs[2], "addr"), mode="count"),
    ]
    for p in procs:
        p.go()
    wait_until(lambda: watches[0].count() > 50 and watches[3].count() > 50, what="hits")
    expect(c, "hit")
    time.sleep(0.05 * run)  # vary the moment of the kill
    d.proc.kill()
    d.proc.wait(TIMEOUT)
    for p in procs:
        untraced(p.pid)
        advances(p.pid, info_int(p, "addr"))
    for p in procs:
        stop_spinner(p)
    c.close()


@pytest.mark.timeout(60)
def test_sigkill_with_a_parked_stop_leaves_the_target_running(
    daemon_factory: Factory, target: Start
) -> None:
    """A thread held at a stop (parked in an interrupt stop) runs on when the daemon dies.
    tests/soak/kill_daemon.py measures the same with hits in flight, parked or not."""
    d = daemon_factory()
    proc = target("spinner")
    c = hwbkpt.Client(socket=d.socket, name="holder", timeout=TIMEOUT)
    c.watch(proc.pid, info_int(proc, "addr"), mode="stop")
    proc.go()
    expect(c, "stop")
    assert proc_state(proc.pid) == "t"
    d.proc.kill()
    d.proc.wait(TIMEOUT)
    untraced(proc.pid)
    advances(proc.pid, info_int(proc, "addr"))
    stop_spinner(proc)
    c.close()


# --------------------------------------------------------------------------- 6. slow client


@pytest.mark.timeout(90)
def test_slow_client_does_not_change_what_a_fast_client_gets(
    daemon_factory: Factory, target: Start, raw_client: Callable[..., RawClient]
) -> None:
    n = 20000
    d = daemon_factory("--max-queued-events", "500")
    proc = target("writer", n, "gate2")
    addr = info_int(proc, "addr")
    fast = hwbkpt.Client(socket=d.socket, name="fast", timeout=TIMEOUT)
    slow = raw_client(d.socket, rcvbuf=4096)
    slow.wait_response(slow.request("watch", pid=proc.pid, addr=addr, mode="notify"))
    fast.watch(proc.pid, addr, mode="notify")
    proc.go()
    hits = lost = 0
    while hits + lost < n:
        ev = fast.next_event(timeout=TIMEOUT)
        assert ev is not None, f"fast client: {hits} hits, {lost} lost of {n}"
        if ev.kind == "hit":
            hits += 1
        elif ev.kind == "lost":
            lost += ev.fields["count"]
    assert proc.line() == f"done var={n} pair0=0"
    figure("fast_client_hits", f"{hits}/{n}")
    assert (hits, lost) == (n, 0)
    # The slow client now reads: what it got plus what it was told it lost is every hit.
    got = slow_lost = batches = 0
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 1.0:
        msgs = slow.read(0.2)
        if msgs:
            quiet_since = time.monotonic()
        for msg in msgs:
            if msg[0] == 2 and msg[1] == "hit":
                got += 1
                batches += 1
            elif msg[0] == 2 and msg[1] == "hits":
                got += len(msg[2][0]["tid"])  # a batch of hits (PROTOCOL.md)
                batches += 1
            elif msg[0] == 2 and msg[1] == "lost":
                slow_lost += msg[2][0]["count"]
    figure("slow_client_hits_and_lost", f"{got}+{slow_lost} in {batches} batches")
    assert got + slow_lost == n
    # What comes behind a full queue is dropped, and told. (Whether anything is: a batch
    # written when nothing was queued goes whole, overshooting the limit by its own size,
    # so a daemon that drained the burst in one or two large batches drops nothing. Here
    # it usually drops thousands.)
    status = fast.status()
    dropped = next(cl for cl in status["clients"] if cl["name"] == "slow")["events_dropped"]
    assert (slow_lost > 0) == (dropped > 0), (slow_lost, dropped)
    proc.go()
    assert proc.wait(TIMEOUT) == 0
    fast.close()
    slow.close()


# --------------------------------------------------------------------------- 7. stop timeout


@pytest.mark.timeout(60)
def test_stop_timeout_disconnects_a_client_that_does_not_read(
    daemon_factory: Factory, target: Start, raw_client: Callable[..., RawClient]
) -> None:
    d = daemon_factory("--stop-timeout", "1", "--max-queued-events", "1000000")
    proc = target("spinner")
    addr = info_int(proc, "addr")
    other = hwbkpt.Client(socket=d.socket, name="other", timeout=TIMEOUT)
    slow = raw_client(d.socket, rcvbuf=4096)
    slow.wait_response(slow.request("watch", pid=proc.pid, addr=addr, mode="notify"))
    proc.go()
    # Let the flood of hits fill the socket and back the slow client's queue up.
    wait_until(
        lambda: (
            next(c for c in other.status()["clients"] if c["name"] == "slow")["queued_events"]
            > 1000
        ),
        what="the slow client's queue to back up",
    )
    slow.request("watch", pid=proc.pid, addr=addr, mode="stop")  # its reply is never read

    def held_for_slow() -> bool:
        # Not just state "t": the slot's change from notify to stop mode first interrupts
        # the running thread for a moment (_stops.py, _reopen_later), and a loaded machine
        # makes that stop long enough to be seen here.
        st = other.status()
        slow_id = next((c["id"] for c in st["clients"] if c["name"] == "slow"), None)
        return slow_id is not None and any(
            slow_id in t["held_by"]
            for tg in st["targets"]
            if tg["pid"] == proc.pid
            for t in tg["threads"]
            if t["tid"] == proc.pid
        )

    wait_until(
        lambda: proc_state(proc.pid) == "t" and held_for_slow(), what="the stop, held for slow"
    )
    t0 = time.monotonic()
    wait_until(lambda: proc_state(proc.pid) != "t", 10.0, "the stop to be released")
    held = time.monotonic() - t0
    figure("stop_timeout_1s_released_after_s", f"{held:.2f}")
    assert held > 0.5
    names = [c["name"] for c in other.status()["clients"]]
    assert "slow" not in names
    assert "did not read" in d.stderr() or "--stop-timeout" in d.stderr()
    untraced(proc.pid)
    stop_spinner(proc)
    other.close()
    slow.close()


@pytest.mark.timeout(60)
def test_stop_timeout_spares_a_client_that_read_its_stop(
    daemon_factory: Factory, target: Start
) -> None:
    """A person at a debugger prompt may sit on a stop for as long as they like."""
    d = daemon_factory("--stop-timeout", "0.5")
    proc = target("spinner")
    c = hwbkpt.Client(socket=d.socket, name="debugger", timeout=TIMEOUT)
    c.watch(proc.pid, info_int(proc, "addr"), mode="stop")
    proc.go()
    ev = expect(c, "stop")
    time.sleep(2.0)
    assert proc_state(proc.pid) == "t"
    assert "debugger" in [cl["name"] for cl in c.status()["clients"]]
    c.call("unwatch", id=ev.watches[0])
    c.resume(proc.pid)
    untraced(proc.pid)
    stop_spinner(proc)
    c.close()
