"""The daemon side of each scenario, run as its own process by the harness.

    python -m bench._dclient MODE '{"socket": ..., "pid": ..., ...}'

It is a separate process (not code in the harness) for the same reasons the C clients
are: it can be pinned with taskset like them, it costs the harness nothing while it
runs, and a client library or daemon that hangs is killed by the harness's timeout.

Output, one line each: ``ready [JSON]`` once its watches are in place, ``result JSON``
at the end, or ``error MESSAGE`` (exit 1).  A line on stdin means "the target is done:
report".  Written against the client API of client/hwbkpt (Client, AsyncClient, Watch,
Event); see bench/README.md, "Wiring the daemon side".
"""

from __future__ import annotations

import inspect
import json
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

Params = dict[str, Any]


def _say(word: str, payload: object = None) -> None:
    line = word if payload is None else f"{word} {json.dumps(payload)}"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _stdin_event() -> threading.Event:
    """An Event set when a line (or EOF) arrives on stdin."""
    done = threading.Event()

    def wait() -> None:
        sys.stdin.readline()
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    return done


def _next_event(c: Any, timeout: float) -> Any:
    """c.next_event(timeout) with "nothing came" mapped to None, however it is spelled."""
    try:
        return c.next_event(timeout=timeout)
    except Exception as e:  # a timeout exception of the client library
        if isinstance(e, TimeoutError) or "timeout" in type(e).__name__.lower():
            return None
        raise


def _client(p: Params) -> Any:
    import hwbkpt

    return hwbkpt.Client(socket=p["socket"])


def ping(p: Params) -> None:
    with _client(p):
        pass
    _say("result", {"ok": True})


def count(p: Params) -> None:
    done = _stdin_event()
    with _client(p) as c:
        w = c.watch(p["pid"], p["addr"], length=8, access="w", mode="count")
        _say("ready")
        done.wait()
        _say("result", {"count": int(w.count())})


def notify(p: Params) -> None:
    done = _stdin_event()
    hits = lost = 0
    expected = int(p["expected"])
    with _client(p) as c:
        c.watch(p["pid"], p["addr"], length=8, access="w", mode="notify")
        _say("ready")
        quiet_since = None
        while True:
            ev = _next_event(c, 0.1)
            if ev is None:
                if done.is_set():
                    quiet_since = quiet_since or time.monotonic()
                    if time.monotonic() - quiet_since > 1.0:
                        break
                continue
            quiet_since = None
            if ev.kind == "hit":
                hits += 1
            elif ev.kind == "lost":
                lost += int(ev.count)
            if done.is_set() and hits + lost >= expected:
                break
        _say("result", {"hits": hits, "lost": lost})


def stop(p: Params) -> None:
    done = _stdin_event()
    stops = 0
    with _client(p) as c:
        c.watch(p["pid"], p["addr"], length=8, access="w", mode="stop")
        _say("ready")
        # CPU of this whole process (user + system: the library, the socket calls, the idle
        # stdin thread) while the target runs, per stop.
        cpu0 = time.process_time_ns()
        while not done.is_set():
            ev = _next_event(c, 0.1)
            if ev is not None and ev.kind == "stop":
                c.resume(ev.tid, wait=False)  # no round trip per hit, like the C client
                stops += 1
        cpu = time.process_time_ns() - cpu0
        _say("result", {"stops": stops, "cpu_ns_per_stop": cpu / max(stops, 1)})


def libcpu(p: Params) -> None:
    """The client library's CPU per stop without a socket or a daemon: decode one ``stop``
    event as the daemon sends it in protocol version ``p["version"]``, then make the
    ``resume`` notification, as stop() does per hit. Runs ``p["n"]`` times."""
    from hwbkpt._session import Session
    from hwbkpt_proto import REGISTER_NAMES, Notification, encode, pack_regs

    # Registers of a thread stopped in a small PIE program: small and large values alike.
    values = {"rip": 0x5555_5555_5189, "rsp": 0x7FFF_FFFF_E3D0, "rbp": 0x7FFF_FFFF_E3F0,
              "eflags": 0x246, "cs": 0x33, "ss": 0x2B, "fs_base": 0x7FFF_F7D8_A740,
              "orig_rax": 2**64 - 1, "rax": 0x4D2, "rdi": 0x4D2}
    regs = {name: values.get(name, 0x1000 + i) for i, name in enumerate(REGISTER_NAMES)}
    fields = {"pid": 4321, "tid": 4321, "watches": [1], "reason": "watch"}
    version = int(p["version"])
    if version >= 2:
        data = encode(Notification("stop", {**fields, "regs": pack_regs(regs)}), positional=True)
    else:
        data = encode(Notification("stop", {**fields, "regs": regs}))
    session = Session()
    session.hello_done({"version": version})
    n = int(p["n"])
    cpu0 = time.process_time_ns()
    for _ in range(n):
        session.receive_data(data)
        ev = session.next_event()
        if ev is None or ev.kind != "stop":
            raise RuntimeError(f"decoded {ev!r}, not a stop event")
        session.thread_notification("resume", ev.tid)
    cpu = time.process_time_ns() - cpu0
    _say("result", {"n": n, "cpu_ns_per_stop": cpu / n})


def cond(p: Params) -> None:
    """One watch with ``p["condition"]`` in ``p["mode"]``: count; stop (resumes each stop);
    notify (reads the hits, with their values, until ``p["expected"]`` hits + lost)."""
    done = _stdin_event()
    stops = 0
    new: list[int] = []
    with _client(p) as c:
        w = c.watch(p["pid"], p["addr"], length=8, access="w", mode=p["mode"],
                    condition=p["condition"])
        _say("ready")
        if p["mode"] == "notify":  # read hits as they come, as notify() does
            hits = lost = 0
            quiet_since = None
            while True:
                ev = _next_event(c, 0.1)
                if ev is None:
                    if done.is_set():
                        quiet_since = quiet_since or time.monotonic()
                        if time.monotonic() - quiet_since > 1.0:
                            break
                    continue
                quiet_since = None
                if ev.kind == "hit":
                    hits += 1
                    if len(new) < 10:
                        new.append(ev.get("new"))
                elif ev.kind == "lost":
                    lost += int(ev.count)
                if done.is_set() and hits + lost >= int(p["expected"]):
                    break
            _say("result", {"count": int(w.count()), "hits": hits, "lost": lost, "new": new})
            return
        while not done.is_set() or (p["mode"] == "stop" and stops < int(p.get("stops", 0))):
            ev = _next_event(c, 0.1)
            if ev is not None and ev.kind == "stop":
                new.append(ev.get("new"))
                c.resume(ev.tid, wait=False)
                stops += 1
        _say("result", {"count": int(w.count()), "stops": stops, "new": new[:10]})


def gdb(p: Params) -> None:
    """gdb's own conditional watchpoint on the target: ``watch -l *(long *)ADDR if COND``,
    continued in batch mode. The target is stopped by gdb's attach until ``continue``, so
    saying "ready" before gdb has continued lets no write slip by unwatched."""
    import subprocess

    done = _stdin_event()
    cmd = ["gdb", "-q", "-nx", "-batch", "-p", str(p["pid"]),
           "-ex", "set pagination off",
           "-ex", f"watch -l *(long *){p['addr']:#x} if {p['condition']}",
           "-ex", "echo GDB-READY\\n",
           "-ex", "continue"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    out = []
    for line in proc.stdout:
        out.append(line)
        if "GDB-READY" in line:
            break
    else:
        raise RuntimeError("gdb did not set its watchpoint: " + "".join(out[-5:]))
    _say("ready")
    done.wait()
    rest = proc.stdout.read()
    proc.wait(30)
    _say("result", {"ok": "exited normally" in rest or proc.returncode == 0,
                    "watchpoint": "atchpoint" in "".join(out)})


def threads(p: Params) -> None:
    done = _stdin_event()
    ins: list[int] = []
    rem: list[int] = []
    with _client(p) as c:
        for _ in range(int(p["reps"])):
            t0 = time.perf_counter_ns()
            w = c.watch(p["pid"], p["addr"], length=8, access="w", mode="count")
            t1 = time.perf_counter_ns()
            w.remove()
            # remove() returns once the watch is gone; the daemon then detaches from the
            # 1,000 threads as each reaches a stop. The C reference detaches before it
            # reports, and the next install would wait for this one's detach: time it too.
            while any(t["pid"] == p["pid"] for t in c.status()["targets"]):
                time.sleep(0.001)
            rem.append(time.perf_counter_ns() - t1)
            ins.append(t1 - t0)
        w = c.watch(p["pid"], p["addr"], length=8, access="w", mode="count")
        _say("ready", {"install_ns": ins, "remove_ns": rem})
        done.wait()
        _say("result", {"count": int(w.count())})


def memory(p: Params) -> None:
    import hwbkpt

    done = _stdin_event()
    clients = []
    try:
        for _ in range(int(p["clients"])):
            c = hwbkpt.Client(socket=p["socket"])
            c.__enter__()
            clients.append(c)
            for k in range(int(p["watches"])):
                c.watch(p["pid"], p["addr"] + 8 * k, length=8, access="w", mode="count")
        _say("ready")
        done.wait()
        _say("result", {"watches": len(clients) * int(p["watches"])})
    finally:
        for c in clients:
            c.__exit__(None, None, None)


async def _maybe_await(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


def rpc(p: Params) -> None:
    """``p["clients"]`` trio clients in this process, client i doing ``p["iters"]``
    watch+remove pairs on thread ``p["tids"][i]``. Says ``ready`` once every client is
    connected, starts them all at the line on stdin (the harness starts several such
    processes and opens them together, bench/README.md), and reports every pair's latency
    with the start and end of its loop (``perf_counter_ns``, CLOCK_MONOTONIC: comparable
    between processes) and this process's CPU over it."""
    import trio

    import hwbkpt

    tids: list[int] = p["tids"]
    iters = int(p["iters"])
    lat: list[int] = []

    async def one(i: int, connected: Callable[[], None], start: trio.Event) -> None:
        async with hwbkpt.AsyncClient(socket=p["socket"]) as c:
            connected()
            await start.wait()
            for _ in range(iters):
                t0 = time.perf_counter_ns()
                w = await c.watch(p["pid"], p["addr"], length=8, access="w", mode="count",
                                  tid=tids[i % len(tids)])
                await _maybe_await(w.remove())
                lat.append(time.perf_counter_ns() - t0)

    async def main() -> dict[str, Any]:
        # One anchor watch keeps the target managed, so the loop measures watch+unwatch
        # and not attach+detach of the whole process (DESIGN.md §5.5). Every process
        # holds its own (they share one slot) for as long as its clients run.
        async with hwbkpt.AsyncClient(socket=p["socket"]) as anchor:
            await anchor.watch(p["pid"], p["addr"] + 24, length=8, access="w", mode="count",
                               tid=p["pid"])
            start, all_in = trio.Event(), trio.Event()
            waiting = [int(p["clients"])]

            def connected() -> None:
                waiting[0] -= 1
                if not waiting[0]:
                    all_in.set()

            async with trio.open_nursery() as n:
                for i in range(int(p["clients"])):
                    n.start_soon(one, i, connected, start)
                await all_in.wait()
                _say("ready")
                await trio.to_thread.run_sync(sys.stdin.readline)
                t0 = time.perf_counter_ns()
                cpu0 = time.process_time_ns()
                start.set()
            t1 = time.perf_counter_ns()
            cpu = time.process_time_ns() - cpu0  # this process: the client library's CPU
        return {"pairs": len(lat), "t0_ns": t0, "t1_ns": t1, "client_cpu_ns": cpu,
                "lat_ns": lat}

    _say("result", trio.run(main))


def rpclib(p: Params) -> None:
    """The client library's CPU per watch+remove pair with no daemon: the real client
    (``p["client"]``: ``blocking`` or ``trio``) connected to a socket of this process,
    whose far end writes each answer (as the daemon encodes it) just before the call, so
    a read always finds it: the library's Python and its own system calls (send, poll or
    epoll, recv), none of the waiting or wake-ups of a real round trip. ``p["n"]`` pairs,
    CPU time of this process over the loop (the far end's ``send`` of each answer
    included)."""
    import os
    import socket
    import tempfile

    import msgpack
    import trio

    import hwbkpt

    n, pid, tid, addr = int(p["n"]), 4321, 4322, 0x5555_5555_8010
    answers = []
    for i in range(n):  # msgid 1 was hello
        answers.append(msgpack.packb([1, 2 + 2 * i, None, {
            "id": 1000 + i, "state": "installed", "threads": {tid: "installed"}}]))
        answers.append(msgpack.packb([1, 3 + 2 * i, None, None]))
    with tempfile.TemporaryDirectory(prefix="hwbkpt-rpclib-") as tmp, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        path = os.path.join(tmp, "lib.sock")
        listener.bind(path)
        listener.listen(1)
        hello = msgpack.packb([1, 1, None, {"version": 2}])
        far: list[socket.socket] = []

        def serve_hello() -> None:
            conn, _ = listener.accept()
            far.append(conn)
            conn.recv(65536)
            conn.sendall(hello)

        def check(w: Any, i: int) -> None:
            if w.id != 1000 + i or w.state != "removed":
                raise RuntimeError(f"pair {i}: watch {w.id} in state {w.state!r}")

        def drain(i: int) -> None:
            if i % 64 == 63:  # the requests, so the socket never fills (they are ~100 B)
                far[0].recv(1 << 20, socket.MSG_DONTWAIT)

        if p["client"] == "blocking":
            import threading

            t = threading.Thread(target=serve_hello)
            t.start()
            with hwbkpt.Client(socket=path) as c:
                t.join()
                send = far[0].send
                cpu0 = time.process_time_ns()
                for i in range(n):
                    send(answers[2 * i])
                    w = c.watch(pid, addr, length=8, access="w", mode="count", tid=tid)
                    send(answers[2 * i + 1])
                    w.remove()
                    check(w, i)
                    drain(i)
                cpu = time.process_time_ns() - cpu0
        else:
            async def main() -> int:
                c = hwbkpt.AsyncClient(socket=path)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, serve_hello)
                    await c.connect()
                try:
                    send = far[0].send
                    cpu0 = time.process_time_ns()
                    for i in range(n):
                        send(answers[2 * i])
                        w = await c.watch(pid, addr, length=8, access="w", mode="count",
                                          tid=tid)
                        send(answers[2 * i + 1])
                        await w.remove()
                        check(w, i)
                        drain(i)
                    return time.process_time_ns() - cpu0
                finally:
                    await c.aclose()

            cpu = trio.run(main)
        far[0].close()
    _say("result", {"n": n, "cpu_ns_per_pair": cpu / n})


def gdbcpu(p: Params) -> None:
    """``hwbkpt gdbserver``'s CPU per stop without sockets, pipes, daemon or gdb: the
    packets of one stop of the gdb row (the ``stop`` event as the daemon sends it in
    protocol version 2, decoded by the client library; the T reply; gdb's three reads of
    the watched word; ``vCont;c`` and the ``resume`` notification it makes), through the
    real session and codec, ``p["n"]`` times. The "process" is this one: its
    /proc/PID/mem is read and its /proc/PID/task counted as for a real target."""
    import ctypes
    import os
    from types import SimpleNamespace

    from hwbkpt._gdbserver._codec import checksum
    from hwbkpt._gdbserver._session import GdbSession
    from hwbkpt._session import Session
    from hwbkpt_proto import REGISTER_NAMES, Notification, encode, pack_regs

    pid = os.getpid()
    word = ctypes.c_uint64(0x2A)
    addr = ctypes.addressof(word)
    regs = {name: 0x7FFF_FFFF_E000 + 8 * i for i, name in enumerate(REGISTER_NAMES)}

    def stop_bytes(reason: str, watches: list[int]) -> bytes:
        return encode(Notification("stop", {"pid": pid, "tid": pid, "watches": watches,
                                            "reason": reason, "regs": pack_regs(regs)}),
                      positional=True)

    hit = stop_bytes("watch", [1])

    class Daemon:
        """What the session asks of its daemon client; the stop of the next hit is
        "received" as each resume is sent."""

        def __init__(self) -> None:
            self.session = Session()
            self.session.hello_done({"version": 2})
            self.resumes = 0

        def attach(self, _pid: int) -> list[int]:
            return [pid]

        def signals(self, _pid: int, **_: Any) -> None:
            pass

        def hold_all(self, _pid: int) -> list[int]:
            self.session.receive_data(stop_bytes("interrupt", []))
            return [pid]

        def watch_region(self, *_: Any, **__: Any) -> list[Any]:
            return [SimpleNamespace(id=1, addr=addr, state="installed")]

        def next_event(self, timeout: float | None = None) -> Any:
            return self.session.next_event()

        def read_ready(self) -> None:
            pass

        def resume(self, tid: int, *, wait: bool = True, signal: int | None = None) -> None:
            self.session.thread_notification("resume", tid)
            self.resumes += 1
            self.session.receive_data(hit)

        def call(self, *_: Any, **__: Any) -> None:
            return None

        def detach(self, _pid: int) -> None:
            pass

    def frame(payload: bytes) -> bytes:
        return b"$" + payload + b"#" + b"%02x" % checksum(payload)

    daemon, sent = Daemon(), []
    server = GdbSession(daemon, pid, sent.append)  # type: ignore[arg-type]
    server.receive_data(frame(b"qSupported:multiprocess+;swbreak+;hwbreak+"))
    server.receive_data(b"+" + frame(b"QStartNoAckMode") + b"+")
    server.receive_data(frame(b"Z2,%x,8" % addr))
    read, cont = frame(b"m%x,8" % addr), frame(b"vCont;c:p%x.-1" % pid)
    server.receive_data(cont)
    n = int(p["n"])
    del sent[:]
    cpu0 = time.process_time_ns()
    for _ in range(n):
        server.pump_events(readable=True)
        server.receive_data(read)
        server.receive_data(read)
        server.receive_data(read)
        server.receive_data(cont)
    cpu = time.process_time_ns() - cpu0
    stops = sum(1 for s in sent if s.startswith(b"$T05"))
    if stops != n or daemon.resumes != n + 1:
        raise RuntimeError(f"{stops} stop replies and {daemon.resumes} resumes for {n} stops")
    server.leave()
    _say("result", {"n": n, "cpu_ns_per_stop": cpu / n})


MODES: dict[str, Callable[[Params], None]] = {
    "ping": ping, "count": count, "notify": notify, "stop": stop, "libcpu": libcpu,
    "gdbcpu": gdbcpu,
    "cond": cond, "gdb": gdb,
    "threads": threads, "memory": memory, "rpc": rpc, "rpclib": rpclib,
}


def main() -> int:
    mode, params = sys.argv[1], json.loads(sys.argv[2])
    try:
        MODES[mode](params)
    except BaseException as e:  # report whatever broke, in one line, to the harness
        traceback.print_exc()
        _say("error", f"{type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
