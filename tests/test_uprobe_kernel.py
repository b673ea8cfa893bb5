"""Uprobes in the live kernel: what a stop-mode uprobe event does, measured.

These are the facts behind the decision that ``hwbkpt gdbserver`` serves gdb's ``Z0`` with
hardware execute slots (HACKING.md, uprobes): a uprobe event with ``sigtrap`` stops the
thread on every execution, but only *after* the probed instruction ran; the probed byte
reads 0xCC through /proc/PID/mem while it is installed; ``remove_on_exec`` takes it away at
exec; and this kernel's verifier refuses the BPF program that could move the thread back
before the instruction. If a kernel ever stops the thread *at* the address, the first
test fails and says so: then uprobes can serve ``Z0``.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
from collections.abc import Callable

import pytest
from elftools.elf.elffile import ELFFile

from hwbkptd import _kernel as k
from hwbkptd._platform import probe_uprobes
from tests._progs import Target, build
from tests.test_kernel import Tracer, addr, finish, tracer

__all__ = ["tracer"]

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ptrace and perf"),
    pytest.mark.skipif(not os.path.exists(k.UPROBE_PMU), reason="kernel without uprobe PMU"),
]

TOKEN = 0x68776270_00000ABC
Start = Callable[..., Target]
# write_both (tests/progs/writer.c) starts with `mov %rdi, var(%rip)`, 7 bytes, then the
# same store to var2: at a stop after the first instruction var is stored and var2 is not.
FIRST_INSN = 7


def file_offset(path: str, symbol: str) -> int:
    """The offset of ``symbol``'s code in the ELF file ``path`` (through its LOAD segment)."""
    with open(path, "rb") as f:
        elf = ELFFile(f)
        symtab = elf.get_section_by_name(".symtab")
        assert symtab is not None
        value = symtab.get_symbol_by_name(symbol)[0]["st_value"]
        for seg in elf.iter_segments("PT_LOAD"):
            if seg["p_vaddr"] <= value < seg["p_vaddr"] + seg["p_filesz"]:
                return int(value - seg["p_vaddr"] + seg["p_offset"])
    raise AssertionError(f"{symbol} is in no LOAD segment of {path}")


def long_at(proc: Target, key: str) -> int:
    return int.from_bytes(k.read_memory(proc.pid, addr(proc, key), 8), "little")


@pytest.mark.timeout(120)
def test_uprobe_stops_every_call_once_after_the_probed_instruction(
    target: Start, tracer: Tracer
) -> None:
    n = 1000
    proc = target("writer", n)
    func = addr(proc, "func")
    where = k.code_location(proc.pid, func)
    assert where is not None
    path, offset = where
    assert path.startswith(f"/proc/{proc.pid}/map_files/")
    with open(path, "rb") as f:  # the kernel resolves the path to the program's own file
        f.seek(offset)
        assert f.read(16) == k.read_memory(proc.pid, func, 16)
    event = k.UprobeEvent(proc.pid, path, offset, TOKEN)
    try:
        k.seize(proc.pid)
        proc.go()
        offsets = set()
        for i in range(1, n + 1):
            assert tracer.stop(proc.pid) == k.SignalStop(signal.SIGTRAP)
            si = k.getsiginfo(proc.pid)
            assert (si.code, si.perf_data) == (k.TRAP_PERF, TOKEN)
            offsets.add(k.getregs(proc.pid)["rip"] - func)
            # One instruction of write_both(i) has run: var is stored, var2 not yet.
            assert (long_at(proc, "addr"), long_at(proc, "addr2")) == (i, i - 1)
            assert event.read_count() == i  # exactly one stop per call
            k.cont(proc.pid)
        assert finish(proc, tracer) == 0
        assert event.read_count() == n
    finally:
        event.close()
    # Not at the address, as gdb needs: the SIGTRAP raised in the int3 handler is held back
    # (uprobe_deny_signal) until the kernel has stepped the instruction out of line.
    assert offsets == {FIRST_INSN}


@pytest.mark.timeout(60)
def test_probed_byte_reads_int3_until_the_probe_goes(target: Start) -> None:
    proc = target("writer", 1)
    func = addr(proc, "func")
    original = k.read_memory(proc.pid, func, 8)
    where = k.code_location(proc.pid, func)
    assert where is not None
    event = k.UprobeEvent(proc.pid, *where, TOKEN)
    try:
        probed = k.read_memory(proc.pid, func, 8)
    finally:
        event.close()
    assert probed == b"\xcc" + original[1:]  # the kernel's int3, in this process's copy
    assert k.read_memory(proc.pid, func, 8) == original
    with open(where[0], "rb") as f:  # the file itself never changes
        f.seek(where[1])
        assert f.read(8) == original
    proc.go()
    assert proc.wait() == 0


@pytest.mark.timeout(60)
def test_exec_removes_the_probe(target: Start) -> None:
    """The program runs ``main`` again in its new image; a probe that survived the exec
    would kill it (an untraced thread, a SIGTRAP); remove_on_exec takes it away."""
    proc = target("execer", 2)
    exe = str(build("execer"))
    with open(f"/proc/{proc.pid}/maps") as maps:
        base = min(int(ln.split("-")[0], 16) for ln in maps if ln.rstrip().endswith(exe))
    main = base + file_offset(exe, "main")  # the first LOAD segment is at file offset 0
    where = k.code_location(proc.pid, main)
    assert where is not None
    assert where[1] == file_offset(exe, "main")
    event = k.UprobeEvent(proc.pid, *where, TOKEN)
    try:
        proc.go()
        assert proc.line() == "done var=2"
        assert proc.line().startswith("execd ")
        assert proc.wait() == 0
        assert event.read_count() == 0
    finally:
        event.close()


def test_code_location_is_none_for_anonymous_code() -> None:
    """JIT code lives in anonymous memory: no file, no uprobe (hardware slots only)."""
    # MAP_PRIVATE, as JIT compilers map their code (Python's default, MAP_SHARED, is
    # shmem: a file, "/dev/zero (deleted)", as far as the kernel is concerned).
    anon = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = (ctypes.c_char * mmap.PAGESIZE).from_buffer(anon)
    try:
        where = k.code_location(os.getpid(), ctypes.addressof(buf))
    finally:
        del buf
        anon.close()
    assert where is None
    with open("/proc/self/maps") as maps:
        special = [ln for ln in maps if ln.rstrip().endswith(("[stack]", "[vdso]", "[heap]"))]
    assert special
    for line in special:
        assert k.code_location(os.getpid(), int(line.split("-")[0], 16)) is None, line
    libc = ctypes.CDLL(None)
    labs = ctypes.cast(libc.labs, ctypes.c_void_p).value
    assert labs is not None
    where = k.code_location(os.getpid(), labs)
    assert where is not None
    assert where[0].startswith(f"/proc/{os.getpid()}/map_files/")


def test_platform_finding_agrees_with_the_verifier() -> None:
    """``hwbkpt selftest`` reports the same: where a uprobe stops, and whether the verifier
    would let a uprobe program move the thread back (the route to stopping before)."""
    why = k.uprobe_regs_writable()
    finding = probe_uprobes()
    assert finding.ok, finding
    assert finding.value == {"stop": "after", "regs_writable": why is None}, finding
    assert finding.details["byte"][1] == "cc"
    if why is not None:  # the verifier's own words, e.g. "invalid bpf_context access ..."
        assert "bpf_context" in why
        assert why in finding.action
