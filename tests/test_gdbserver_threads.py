"""Thread create/exit through ``hwbkpt gdbserver`` (``QThreadEvents``), driven with raw RSP
packets: the replies gdbserver sends (``T05create:;`` stops for the new thread, ``wXX``
for an exited one), all-stop at each, nothing without ``QThreadEvents:1``, and the program
running to its normal end with nothing held. The program, daemon and server are killed at
teardown."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

from tests._daemon import Daemon
from tests._progs import Target
from tests.test_gdbserver_live import Peer, gdbserver
from tests.test_watch import thread_state

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
]

Start = Callable[..., Target]


def _worker_tids(proc: Target, count: int) -> list[int]:
    """The ``tid=N idx=I`` lines the workers of tests/progs/threads.c print."""
    return sorted(int(proc.line().split()[0].partition("=")[2]) for _ in range(count))


def _thread_of(reply: bytes, pid: int) -> int:
    """The thread a stop reply names (``thread:pPID.TID;``, multiprocess)."""
    match = re.search(rb"thread:p([0-9a-f]+)\.([0-9a-f]+);", reply)
    assert match is not None, reply
    assert int(match[1], 16) == pid, reply
    return int(match[2], 16)


@pytest.mark.timeout(120)
def test_thread_events_report_create_and_exit_in_all_stop(target: Start, daemon: Daemon) -> None:
    proc = target("threads", 3, 1000)
    with gdbserver(daemon, proc.pid, "--log-level", "debug") as server:
        assert server.stdin is not None
        assert server.stdout is not None
        peer = Peer(server.stdout.fileno(), server.stdin.fileno())
        assert b"QThreadEvents+" in peer.ask(b"qSupported:multiprocess+")
        for bad in (b"2", b"", b"1x", b"on", b"\xff"):
            assert peer.ask(b"QThreadEvents:" + bad) == b"E01", bad
        assert peer.ask(b"QThreadEvents:1") == b"OK"
        proc.go()
        created: list[int] = []
        exited: list[int] = []
        order: list[tuple[str, int]] = []
        for _ in range(20):
            reply = peer.ask(b"vCont;c")
            if reply.startswith(b"T05") and b"create:;" in reply:
                tid = _thread_of(reply, proc.pid)
                created.append(tid)
                order.append(("new", tid))
                # All-stop: the new thread is held for the debugger, and listed.
                assert thread_state(proc.pid, tid) == "t"
                assert f"p{proc.pid:x}.{tid:x}".encode() in peer.ask(b"qfThreadInfo")
                assert peer.ask(b"qsThreadInfo") == b"l"
            elif reply.startswith(b"w"):
                match = re.fullmatch(rb"w([0-9a-f]+);p([0-9a-f]+)\.([0-9a-f]+)", reply)
                assert match is not None, reply
                assert int(match[1], 16) == 0
                assert int(match[2], 16) == proc.pid
                tid = int(match[3], 16)
                exited.append(tid)
                order.append(("exit", tid))
                assert f"{tid:x}".encode() not in peer.ask(b"qfThreadInfo")
            else:
                assert reply == f"W00;process:{proc.pid:x}".encode(), reply
                break
        else:
            pytest.fail(f"no exit reply after 20 resumes: {order}")
        workers = _worker_tids(proc, 3)
        assert sorted(created) == workers
        assert sorted(exited) == workers
        for tid in workers:
            assert order.index(("new", tid)) < order.index(("exit", tid))
        assert proc.line() == "done var=1000"
        assert proc.wait() == 0


@pytest.mark.timeout(120)
def test_no_thread_events_unless_asked(target: Start, daemon: Daemon) -> None:
    proc = target("threads", 3, 1000)
    with gdbserver(daemon, proc.pid, "--log-level", "debug") as server:
        assert server.stdin is not None
        assert server.stdout is not None
        peer = Peer(server.stdout.fileno(), server.stdin.fileno())
        assert peer.ask(b"qSupported").startswith(b"PacketSize=")
        # Turned on, then off again: the run is reported as without them, its end alone.
        assert peer.ask(b"QThreadEvents:1") == b"OK"
        assert peer.ask(b"QThreadEvents:0") == b"OK"
        proc.go()
        assert peer.ask(b"vCont;c") == b"W00"
        assert len(_worker_tids(proc, 3)) == 3
        assert proc.line() == "done var=1000"
        assert proc.wait() == 0
