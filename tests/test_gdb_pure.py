"""Fast tests without the kernel: the gdbserver's pure helpers, and the engine's
``attach``/``hold_all``/``leave`` driven by the fake kernel (tests/fakes.py)."""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET

import pytest

from hwbkpt._events import Event
from hwbkpt._gdbserver import _regs
from hwbkpt._gdbserver._access import allowed_uid, is_loopback, socket_table_uid
from hwbkpt._gdbserver._codec import Codec, Packet
from hwbkpt._gdbserver._packets import (
    ALL_THREADS,
    PacketError,
    gdb_signal,
    hex_int,
    parse_thread,
    split_args,
    xfer_window,
)
from hwbkpt._gdbserver._session import GdbSession
from hwbkpt_proto import NoSuchProcessError
from hwbkptd._model import Mode
from tests.test_engine import PID, X, setup, stops

# ------------------------------------------------------------------ packet helpers


@pytest.mark.parametrize(
    ("text", "tid"),
    [(b"1a2b", 0x1A2B), (b"-1", ALL_THREADS), (b"0", 0), (b"p10.11", 0x11), (b"p10.-1", -1),
     (b"p10", ALL_THREADS)],
)
def test_parse_thread(text: bytes, tid: int) -> None:
    assert parse_thread(text) == tid


@pytest.mark.parametrize("text", [b"", b"xyz", b"1" * 17, b"p1.zz", b"-2"])
def test_bad_numbers_are_packet_errors(text: bytes) -> None:
    with pytest.raises(PacketError):
        parse_thread(text)


def test_hex_int_and_split_args() -> None:
    assert hex_int(b"ff") == 255
    assert split_args(b"1,2", 2, "m") == [b"1", b"2"]
    with pytest.raises(PacketError, match="expected 2 fields"):
        split_args(b"1,2,3", 2, "m")


def test_xfer_window_says_whether_more_follows() -> None:
    assert xfer_window(b"abcdef", 0, 4) == b"mabcd"
    assert xfer_window(b"abcdef", 4, 4) == b"lef"
    assert xfer_window(b"abcdef", 6, 4) == b"l"
    assert xfer_window(b"abcdef", 0, 6) == b"labcdef"


def test_signals_in_gdbs_numbering() -> None:
    import signal

    assert gdb_signal(0) == 0
    assert gdb_signal(signal.SIGTRAP) == 5
    assert gdb_signal(signal.SIGKILL) == 9
    assert gdb_signal(signal.SIGUSR1) == 30  # Linux 10
    assert gdb_signal(signal.SIGCHLD) == 20  # Linux 17
    assert gdb_signal(signal.SIGRTMIN + 3) == 49  # GDB_SIGNAL_REALTIME_37
    assert gdb_signal(signal.SIGSTKFLT) == 143  # no gdb number: GDB_SIGNAL_UNKNOWN


# ------------------------------------------------------------------ registers


def test_target_description_is_gdbs_amd64_linux_layout() -> None:
    root = ET.fromstring(_regs.TARGET_XML)
    regs = [(r.get("name"), int(r.get("regnum", -1)), int(r.get("bitsize", 0)))
            for f in root.iter("feature") for r in f.iter("reg")]
    assert [n for n, _, _ in regs] == [r.name for r in _regs.REGISTERS]
    assert [i for _, i, _ in regs] == list(range(60))
    named = {n: (i, b) for n, i, b in regs}
    assert named["rip"] == (16, 64)
    assert named["eflags"] == (17, 32)
    assert named["orig_rax"] == (57, 64)
    assert named["fs_base"] == (58, 64)
    assert named["gs_base"] == (59, 64)
    features = [f.get("name") for f in root.iter("feature")]
    assert features == ["org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse",
                        "org.gnu.gdb.i386.linux", "org.gnu.gdb.i386.segments"]


def test_g_packet_packs_served_registers_little_endian_and_the_rest_unavailable() -> None:
    values = {r.daemon: i + 1 for i, r in enumerate(_regs.REGISTERS) if r.daemon}
    values["eflags"] = 0x246
    packed = _regs.pack_all(values)
    assert len(packed) == 2 * sum(r.size for r in _regs.REGISTERS)
    assert packed.startswith(b"0100000000000000")  # rax = 1
    eflags = 17
    offset = 2 * sum(r.size for r in _regs.REGISTERS[:eflags])
    assert packed[offset : offset + 8] == b"46020000"
    st0 = 24
    offset = 2 * sum(r.size for r in _regs.REGISTERS[:st0])
    assert packed[offset : offset + 20] == b"x" * 20


@pytest.mark.parametrize(
    ("text", "value"),
    [(b"0100000000000000", 1), (b"ffffffffffffffff", (1 << 64) - 1), (b"01", None),
     (b"xxxxxxxxxxxxxxxx", None), (b"zz00000000000000", None)],
)
def test_unpack(text: bytes, value: int | None) -> None:
    assert _regs.unpack(_regs.REGISTERS[0], text) == value


# ------------------------------------------------------------------ who may connect

TCP_TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1
   1: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 2 1
   2: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 3 1
"""

TCP6_TABLE = """\
  sl  local_address                         remote_address                        st uid
   0: 0000000000000000FFFF00000100007F:D432 0000000000000000FFFF00000100007F:1F90 01 00:0 0 0 1001
"""


def test_socket_table_finds_the_peers_socket_owner() -> None:
    # Our listener is 127.0.0.1:8080; the peer connected from port 0xD431 as uid 1000.
    assert socket_table_uid(TCP_TABLE, ("127.0.0.1", 0xD431), ("127.0.0.1", 8080)) == 1000
    assert socket_table_uid(TCP_TABLE, ("127.0.0.1", 0xD499), ("127.0.0.1", 8080)) is None
    assert socket_table_uid("header only\n", ("127.0.0.1", 1), ("127.0.0.1", 2)) is None


def test_socket_table_reads_v4_mapped_v6_rows() -> None:
    fields = TCP6_TABLE.splitlines()[1].split()
    # The uid column is the 8th field of a real row; build one from the sample's pieces.
    row = f"   0: {fields[1]} {fields[2]} 01 00000000:00000000 00:00000000 00000000  1001 0 9 1"
    table = "header\n" + row + "\n"
    assert socket_table_uid(table, ("::ffff:127.0.0.1", 0xD432), ("127.0.0.1", 8080)) == 1001


def test_access_rules() -> None:
    assert allowed_uid(1000, 1000)
    assert allowed_uid(0, 1000)
    assert not allowed_uid(1001, 1000)
    assert not allowed_uid(None, 1000)
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("10.0.0.1")
    assert not is_loopback("example.org")


# ------------------------------------------------------------------ engine: all-stop


def test_attach_keeps_a_process_without_watches_and_hold_all_stops_every_thread() -> None:
    h, tids = setup(3)
    assert h.engine.attach(1, PID) == sorted(tids)
    h.settle()
    assert sorted(h.kernel.traced()) == sorted(tids)
    assert sorted(h.engine.hold_all(1, PID)) == sorted(tids)
    h.settle()
    held = stops(h, 1)
    assert sorted(f["tid"] for f in held) == sorted(tids)
    assert {f["reason"] for f in held} == {"interrupt"}
    assert all(h.kernel.state(t) != "running" for t in tids)
    assert h.engine.hold_all(1, PID) == []  # all held already: nothing more
    # Another client's hold_all reports at once for threads already stopped.
    h.engine.attach(2, PID)
    assert sorted(h.engine.hold_all(2, PID)) == sorted(tids)
    assert sorted(f["tid"] for f in stops(h, 2)) == sorted(tids)
    h.engine.leave(1, PID)
    h.settle()
    assert all(h.kernel.state(t) != "running" for t in tids)  # client 2 still holds them
    for tid in tids:
        h.engine.resume(2, tid)
    h.settle()
    assert all(h.kernel.state(t) == "running" for t in tids)
    assert sorted(h.kernel.traced()) == sorted(tids)  # client 2 is still attached
    h.engine.leave(2, PID)
    h.settle()
    assert h.kernel.traced() == []
    assert h.engine.targets == {}


def test_a_client_that_disconnects_leaves_its_attachment_and_holds() -> None:
    h, tids = setup(2)
    h.engine.attach(1, PID)
    h.engine.hold_all(1, PID)
    h.settle()
    h.engine.remove_client(1)
    h.settle()
    assert h.kernel.traced() == []
    assert all(h.kernel.state(t) == "running" for t in tids)


def test_watches_stay_after_leave_and_hold_all_needs_attach() -> None:
    h, [tid] = setup(1)
    with pytest.raises(NoSuchProcessError, match="attach first"):
        h.engine.hold_all(1, PID)
    with pytest.raises(NoSuchProcessError):
        h.engine.leave(1, PID)
    h.engine.attach(1, PID)
    w = h.engine.watch(1, PID, X, Mode.STOP)
    h.engine.leave(1, PID)
    h.settle()
    assert h.kernel.traced() == [tid]  # its watch still needs the process
    h.engine.unwatch(1, w.id)
    h.settle()
    assert h.kernel.traced() == []


def test_attached_client_is_told_of_the_exit() -> None:
    h, _ = setup(1)
    h.engine.attach(1, PID)
    h.settle()
    h.kernel.exit_group(PID, 7)
    h.settle()
    exits = [f for kind, f in h.take(1) if kind == "exit"]
    assert exits == [{"pid": PID, "tid": PID, "code": 7, "signal": None}]


# ------------------------------------------------------------------ signal numbers


def test_gdb_and_host_signal_numbers_round_trip() -> None:
    import signal as host

    from hwbkpt._gdbserver._packets import host_signal

    assert gdb_signal(int(host.SIGUSR1)) == 30
    assert host_signal(30) == int(host.SIGUSR1)
    assert host_signal(11) == int(host.SIGSEGV)
    assert host_signal(0) == 0
    assert gdb_signal(34) == 46  # GDB_SIGNAL_REALTIME_34
    for sig in range(1, 65):
        number = gdb_signal(sig)
        if number != 143:
            assert host_signal(number) == sig
    assert host_signal(7) is None  # GDB_SIGNAL_EMT: no such signal on Linux
    assert host_signal(143) is None


def test_qpasssignals_lists() -> None:
    import signal as host

    from hwbkpt._gdbserver._packets import parse_signal_list

    assert parse_signal_list(b"") == set()
    assert parse_signal_list(b"e;1e;7") == {int(host.SIGALRM), int(host.SIGUSR1)}
    for bad in (b";", b"e;", b"zz", b"-1", b"100", b"e,f"):
        with pytest.raises(PacketError):
            parse_signal_list(bad)


def test_exec_keeps_attached_clients_and_holds_the_new_program_for_them() -> None:
    h, [tid] = setup()
    h.engine.attach(1, PID)
    h.engine.catch_signals(1, PID, True, ())
    watch = h.engine.watch(2, PID, X, Mode.STOP)  # client 2 only watches: it is told, not held
    h.settle()
    h.take()
    h.kernel.exec(tid)
    h.settle()
    assert [kind for kind, _ in h.take(2)] == ["exec"]
    assert watch.ended == "exec"
    events = h.take(1)
    assert [kind for kind, _ in events] == ["exec", "stop"]
    assert events[1][1]["reason"] == "exec"
    assert h.kernel.state(tid) == "event"  # held at the new program's first instruction
    assert h.engine.hold_all(1, PID) == []  # still attached: nothing more to hold
    h.engine.resume(1, tid)
    h.settle()
    assert h.kernel.state(tid) == "running"
    h.engine.leave(1, PID)
    h.settle()
    assert h.kernel.traced() == []  # nobody needs it any more: let go


# ------------------------------------------------------------------ a process that ends


class _GoneClient:
    """A daemon client whose process ended: every call says so; the exit event follows."""

    def __init__(self, pid: int, exit_event: Event | None) -> None:
        self.pid = pid
        self.events = [exit_event] if exit_event is not None else []

    def attach(self, pid: int) -> list[int]:
        return [pid]

    def signals(self, pid: int, **_: object) -> None:
        pass

    def hold_all(self, pid: int) -> list[int]:
        raise NoSuchProcessError(f"process {pid} has exited")

    def next_event(self, timeout: float | None = None) -> Event | None:
        return self.events.pop(0) if self.events else None

    def call(self, *_: object, **__: object) -> None:
        raise NoSuchProcessError("gone")

    def detach(self, pid: int) -> None:
        raise NoSuchProcessError("gone")


@pytest.mark.parametrize(
    ("fields", "reply"),
    [({"code": 7, "signal": None}, b"W07"), ({"code": None, "signal": 11}, b"X0b"), (None, b"W00")],
)
def test_a_process_gone_under_a_request_gets_its_exit_reply(
    fields: dict[str, int | None] | None, reply: bytes
) -> None:
    pid = os.getpid()  # the session opens /proc/PID/mem: any live pid will do
    exit_event = Event("exit", {"pid": pid, "tid": pid, **fields}) if fields else None
    sent: list[bytes] = []
    session = GdbSession(_GoneClient(pid, exit_event), pid, sent.append)  # type: ignore[arg-type]
    session.running = True  # the debugger sent vCont and waits for a stop reply
    session.process_gone(NoSuchProcessError(f"process {pid} has exited"))
    codec = Codec()
    codec.receive_data(sent[-1])
    packet = codec.next_event()
    assert isinstance(packet, Packet), sent
    assert packet.data == reply, sent
    session.leave()
    assert session.finished
