"""The Python floor of the ``stop`` scenario: the C reference's architecture in plain Python.

    python -m bench._floor raw|trio PID ADDR
    python -m bench._floor client FD

Like ``ref/stop_ref.c client``: seize thread PID, open a ``sigtrap`` breakpoint on the
8 bytes at ADDR, print ``ready``; at every stop read the siginfo, the counter and the
registers, send the stop to a separate client process over a Unix socket, and continue
the thread when the client answers; print ``stops S count C`` when the target exits.
The messages are the daemon's own (msgpack, a ``stop`` event with the registers by name,
a ``resume`` notification), so encoding and decoding cost what they cost the daemon.
The tracer uses the daemon's kernel layer (hwbkptd/_kernel.py) and nothing else of it:
no engine, no validation, no client library.

``raw`` waits with ``select.epoll``; ``trio`` waits with trio, as the daemon does, in
two tasks (SIGCHLD, client socket). The difference between the two, and between them and
the daemon, tells how much of the daemon's per-stop cost is the language, the event loop,
and the daemon's own layers (bench/README.md).

``client FD`` is the other floor: the cheapest Python client process there is, run by
``ref/stop_ref.c pyclient|pyclient2`` on its socket FD. It answers the C tracer's binary
stop with the resume (the tid, the message's first 4 bytes) after one blocking read: no
decoding, no poll, no library. The C tracer with it is what a daemon with no cost of its
own would reach with Python clients (bench/README.md, "stop, the floor of the goals").
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
from collections.abc import Callable

import msgpack
import trio  # imported before "ready": the target's timed loop must not wait for it

from hwbkptd import _kernel as k
from hwbkptd._model import Access, Mode

_EVENT_SHIFT = 16  # a ptrace event stop has the event number above the signal
# ref/stop_ref.c's struct stop_msg: tid, pad, count, cookie, 27 registers.
_STOP_MSG_SIZE = 4 + 4 + 8 + 8 + 27 * 8


def _client(sock: socket.socket) -> None:
    """The client process: answer every stop with a resume of its thread."""
    while True:
        data = sock.recv(65536)
        if not data:
            os._exit(0)
        unpacker = msgpack.Unpacker()
        unpacker.feed(data)
        for _, _, params in unpacker:
            sock.sendall(msgpack.packb([2, "resume", [{"tid": params[0]["tid"]}]]))


def bare_client(fd: int) -> None:
    """Answer every stop of stop_ref's tracer on ``fd`` with its resume until it hangs up;
    one byte first, to say the interpreter has started."""
    read, write, size = os.read, os.write, _STOP_MSG_SIZE
    write(fd, b"R")
    while msg := read(fd, size):
        while len(msg) < size:
            more = read(fd, size - len(msg))
            if not more:
                return
            msg += more
        write(fd, msg[:4])


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"] and len(argv) == 2:
        bare_client(int(argv[1]))
        return 0
    mode, pid, addr = argv[0], int(argv[1]), int(argv[2], 0)
    if mode not in ("raw", "trio"):
        print(f"usage: python -m bench._floor raw|trio PID ADDR (not {mode!r})", file=sys.stderr)
        return 2
    ours, theirs = socket.socketpair()
    kid = os.fork()
    if kid == 0:
        ours.close()
        _client(theirs)
    theirs.close()
    signals = k.ChildSignals()
    k.seize(pid)
    event = k.BreakpointEvent(pid, addr, 8, Access.WRITE, Mode.STOP, 0xB0B5)
    stops = count = 0
    exited = False

    def on_sigchld() -> None:
        """Handle every wait status: send stops, continue everything else."""
        nonlocal stops, count, exited
        signals.drain()
        for tid, status in k.wait_all():
            if not os.WIFSTOPPED(status):
                exited = True
                continue
            sig = os.WSTOPSIG(status)
            ours_trap = (
                sig == signal.SIGTRAP
                and status >> _EVENT_SHIFT == 0
                and k.getsiginfo(tid).code == k.TRAP_PERF
            )
            if ours_trap:
                count = event.read_count()
                regs = k.getregs(tid)
                fields = {"pid": pid, "tid": tid, "watches": [1], "reason": "watch",
                          "regs": regs}
                ours.sendall(msgpack.packb([2, "stop", [fields]]))
                stops += 1
                continue  # continued when the client answers
            k.cont(tid, 0 if status >> _EVENT_SHIFT else sig)

    def on_answer(data: bytes) -> None:
        unpacker = msgpack.Unpacker()
        unpacker.feed(data)
        for _, _, params in unpacker:
            k.cont(params[0]["tid"], 0)

    print("ready", flush=True)
    try:
        _run(mode, signals.fd, ours, on_sigchld, on_answer, lambda: exited)
    finally:
        event.close()
        ours.close()
        os.waitpid(kid, 0)
        signals.close()
    print(f"stops {stops} count {count}", flush=True)
    return 0


def _run(
    mode: str,
    sigfd: int,
    sock: socket.socket,
    on_sigchld: Callable[[], None],
    on_answer: Callable[[bytes], None],
    done: Callable[[], bool],
) -> None:
    """Wait for SIGCHLD and for the client until ``done()``: with epoll, or with trio."""
    sock.setblocking(False)
    if mode == "raw":
        epoll = select.epoll()
        epoll.register(sigfd, select.EPOLLIN)
        epoll.register(sock.fileno(), select.EPOLLIN)
        while not done():
            for fd, _ in epoll.poll():
                if fd == sigfd:
                    on_sigchld()
                else:
                    on_answer(sock.recv(65536))
        epoll.close()
        return

    async def tracer(cancel: trio.CancelScope) -> None:
        while not done():
            await trio.lowlevel.wait_readable(sigfd)
            on_sigchld()
        cancel.cancel()

    async def reader() -> None:
        while True:
            await trio.lowlevel.wait_readable(sock)
            on_answer(sock.recv(65536))

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tracer, nursery.cancel_scope)
            nursery.start_soon(reader)

    trio.run(run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
