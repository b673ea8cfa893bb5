"""``qXfer:libraries-svr4:read``: the link map walk on a fake memory image (fast, no
root), the document a live process gives, and gdb's ``info sharedlibrary`` through the
server compared with gdb attached natively."""

from __future__ import annotations

import os
import re
import struct
import xml.etree.ElementTree as ET
from collections.abc import Callable

import pytest

from hwbkpt._gdbserver._svr4 import NoDynamicSection, library_list, r_debug_location
from tests._daemon import Daemon
from tests._gdb import GDB, Gdb, gdb_factory, server_command
from tests._progs import Target, build
from tests.test_gdbserver_live import Peer, gdbserver

__all__ = ["gdb_factory"]

Start = Callable[..., Target]
StartGdb = Callable[[str, str], Gdb]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf")

# A fake process: a PIE loaded at BIAS, its program headers, dynamic section, r_debug and
# a link map of main program -> vdso (named) -> libc -> ld.so.
BIAS = 0x5555_5555_4000
PHDR, DYNAMIC, R_DEBUG = BIAS + 0x40, BIAS + 0x3000, 0x7FFF_F000_0000
LMS = [0x7FFF_F000_1000 + 0x100 * i for i in range(4)]
NAMES = [
    b"", b"linux-vdso.so.1", b"/lib/x86_64-linux-gnu/libc.so.6", b"/lib64/ld-linux-x86-64.so.2"
]


class Memory:
    def __init__(self) -> None:
        self.bytes: dict[int, int] = {}

    def put(self, addr: int, data: bytes) -> None:
        for i, b in enumerate(data):
            self.bytes[addr + i] = b

    def read(self, addr: int, size: int) -> bytes:
        if any(a not in self.bytes for a in range(addr, addr + size)):
            raise OSError(5, "Input/output error")
        return bytes(self.bytes[a] for a in range(addr, addr + size))


def fake(*, dynamic: bool = True, debug: bool = True) -> tuple[Memory, bytes]:
    mem = Memory()
    phdrs = [(6, 0x40), (2, 0x3000)] if dynamic else [(6, 0x40)]
    for i, (p_type, vaddr) in enumerate(phdrs):
        mem.put(PHDR + 56 * i, struct.pack("<IIQQQQQQ", p_type, 4, vaddr, vaddr, vaddr, 0, 0, 8))
    mem.put(DYNAMIC, struct.pack("<qQqQqQ", 1, 7, 21, R_DEBUG if debug else 0, 0, 0))
    mem.put(R_DEBUG, struct.pack("<iIQQQQ", 1, 0, LMS[0], 0, 0, 0))
    for i, lm in enumerate(LMS):
        name_at = 0x7FFF_F000_8000 + 0x100 * i
        mem.put(name_at, NAMES[i] + b"\0")
        nxt = LMS[i + 1] if i + 1 < len(LMS) else 0
        prev = LMS[i - 1] if i else 0
        mem.put(lm, struct.pack("<5Q", 0x1000 * i, name_at, 0x2000 + i, nxt, prev))
    auxv = struct.pack("<8Q", 3, PHDR, 5, len(phdrs), 4, 56, 0, 0)
    return mem, auxv


def libraries(doc: bytes) -> tuple[ET.Element, list[dict[str, str]]]:
    root = ET.fromstring(doc)
    assert root.tag == "library-list-svr4"
    return root, [dict(lib.attrib) for lib in root]


def test_the_link_map_walk() -> None:
    mem, auxv = fake()
    root, libs = libraries(library_list(mem.read, auxv))
    assert root.get("main-lm") == hex(LMS[0])
    assert [lib["name"] for lib in libs] == [n.decode() for n in NAMES[1:]]
    assert libs[1] == {"name": NAMES[2].decode(), "lm": hex(LMS[2]), "l_addr": "0x2000",
                       "l_ld": "0x2002", "lmid": "0x0"}
    # The vDSO (its l_ld in the hidden range) is left out, as gdb leaves it out.
    _, libs = libraries(library_list(mem.read, auxv, hidden=(0x2001, 0x2002)))
    assert [lib["name"] for lib in libs] == [n.decode() for n in NAMES[2:]]


def test_qshlibinfoaddr_is_where_the_r_debug_pointer_is_stored() -> None:
    """lldb reads a pointer at the answer (lldb-server answers the same): the DT_DEBUG
    entry's value, the second entry of the fake dynamic section."""
    mem, auxv = fake()
    where = r_debug_location(mem.read, auxv)
    assert where == DYNAMIC + 16 + 8
    assert struct.unpack("<Q", mem.read(where, 8))[0] == R_DEBUG
    mem, auxv = fake(dynamic=False)
    with pytest.raises(NoDynamicSection):
        r_debug_location(mem.read, auxv)


def test_an_incremental_annex_walks_from_start() -> None:
    mem, auxv = fake()
    annex = f"start={LMS[2]:x};prev={LMS[1]:x}".encode()
    root, libs = libraries(library_list(mem.read, auxv, annex))
    assert root.get("main-lm") is None
    assert [lib["lm"] for lib in libs] == [hex(LMS[2]), hex(LMS[3])]
    with pytest.raises(ValueError, match="bad annex"):
        library_list(mem.read, auxv, b"start=zz")


def test_before_ld_so_set_it_up_the_list_is_empty_and_static_programs_have_none() -> None:
    mem, auxv = fake(debug=False)
    assert library_list(mem.read, auxv) == b'<library-list-svr4 version="1.0"></library-list-svr4>'
    mem, auxv = fake(dynamic=False)
    with pytest.raises(NoDynamicSection):
        library_list(mem.read, auxv)


def test_a_broken_chain_stops_the_walk() -> None:
    mem, auxv = fake()
    mem.put(LMS[2] + 32, struct.pack("<Q", 0xDEAD))  # l_prev no longer says where we came from
    _, libs = libraries(library_list(mem.read, auxv))
    assert [lib["lm"] for lib in libs] == [hex(LMS[1])]


@pytest.mark.kernel
@needs_root
@pytest.mark.timeout(60)
def test_the_live_document_names_the_mapped_libraries(target: Start, daemon: Daemon) -> None:
    proc = target("writer", 1)
    with gdbserver(daemon, proc.pid) as server:
        assert server.stdin is not None
        assert server.stdout is not None
        peer = Peer(server.stdout.fileno(), server.stdin.fileno())
        assert b"qXfer:libraries-svr4:read+" in peer.ask(b"qSupported")
        doc = b""
        while True:
            reply = peer.ask(b"qXfer:libraries-svr4:read::%x,200" % len(doc))
            doc += reply[1:]
            if reply[:1] == b"l":
                break
        assert peer.ask(b"qXfer:libraries-svr4:read:start=zz:0,200") == b"E01"
        assert peer.ask(b"D") == b"OK"
    _, libs = libraries(doc)
    with open(f"/proc/{proc.pid}/maps") as f:
        mapped = {os.path.realpath(line.split()[-1]) for line in f if ".so" in line}
    names = {os.path.realpath(lib["name"]) for lib in libs}
    assert names == mapped, (names, mapped)  # every library, nothing else (no vDSO)
    assert any("libc.so" in n for n in names), names
    proc.go()
    assert proc.wait() == 0


@pytest.mark.kernel
@needs_root
@pytest.mark.skipif(GDB is None, reason="needs gdb (make deps installs it)")
@pytest.mark.timeout(120)
def test_info_sharedlibrary_is_the_same_as_native(
    target: Start, daemon: Daemon, gdb_factory: StartGdb
) -> None:
    outputs = []
    for connect in ("native", "server"):
        proc = target("writer", 1)
        gdb = gdb_factory(
            str(build("writer")),
            f"attach {proc.pid}" if connect == "native"
            else server_command(daemon.socket, proc.pid),
        )
        outputs.append(re.sub(r"0x[0-9a-f]+", "0xADDR", gdb.cmd("info sharedlibrary")))
        gdb.cmd("detach")
        proc.go()
        assert proc.wait() == 0
    native, served = outputs
    assert "libc.so.6" in native
    assert served == native
