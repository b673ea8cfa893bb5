"""The SVR4 library list of a live process (``qXfer:libraries-svr4:read``), from its memory.

gdb learns a process's shared libraries from the dynamic linker's own list: ``struct
r_debug`` (glibc ``<link.h>``), which the program's ``DT_DEBUG`` dynamic entry points to
once ld.so has set it up, and from there the ``struct link_map`` chain. Without this packet
gdb walks that chain itself with one ``m`` packet per field and name; with it the server
does the walk and answers one XML document (gdb's manual, "Library List Format for SVR4
Targets"), as gdbserver does. The way there:

``auxv`` ``AT_PHDR``/``AT_PHNUM`` → the program headers in memory; ``PT_PHDR`` gives the
load bias (a PIE is loaded away from its link address), ``PT_DYNAMIC`` the dynamic section
→ its ``DT_DEBUG`` entry → ``r_debug.r_map`` → each ``link_map``: ``l_addr`` (load bias),
``l_name``, ``l_ld`` (its dynamic section), ``l_next``, ``l_prev``.

The first entry of the chain is the main program (gdb's ``main-lm``), not a library, and is
not listed; nor is an entry with an empty name. An annex ``start=ADDR;prev=ADDR`` (gdb's
incremental update) walks from ``start`` instead. Pure: memory comes through ``read``.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from xml.sax.saxutils import quoteattr

from hwbkpt_proto import HwbkptError

__all__ = ["NoDynamicSection", "library_list", "r_debug_location"]

# <elf.h>
_AT_PHDR = 3
_AT_PHNUM = 5
_PT_DYNAMIC = 2
_PT_PHDR = 6
_DT_NULL = 0
_DT_DEBUG = 21
_PHDR_SIZE = 56  # Elf64_Phdr
_DYN_SIZE = 16  # Elf64_Dyn
_MAX_DYN = 1024  # entries read at most (a real one has a few dozen)
_MAX_LIBRARIES = 4096  # link_map entries followed at most (a cycle must not hang us)
_NAME_CHUNK = 256
_MAX_NAME = 4096  # PATH_MAX
_R_MAP = 8  # offsetof(struct r_debug, r_map) on x86-64
_LINK_MAP = struct.Struct("<5Q")  # l_addr, l_name, l_ld, l_next, l_prev

Read = Callable[[int, int], bytes]


class NoDynamicSection(Exception):
    """The program has no ``PT_DYNAMIC`` (linked statically): there is no list to read,
    and gdb should be told so (an error reply) rather than given an empty one."""


def _auxv(data: bytes) -> dict[int, int]:
    words = struct.unpack(f"<{len(data) // 8}Q", data[: len(data) // 16 * 16])
    return dict(zip(words[0::2], words[1::2], strict=True))


def _dynamic_section(read: Read, auxv: bytes) -> int:
    """The address of the program's dynamic section. Raises NoDynamicSection."""
    entries = _auxv(auxv)
    phdr, phnum = entries.get(_AT_PHDR, 0), entries.get(_AT_PHNUM, 0)
    if not phdr or not phnum:
        raise NoDynamicSection("no program headers in the auxiliary vector")
    table = read(phdr, phnum * _PHDR_SIZE)
    bias, dynamic = 0, None
    for i in range(phnum):
        p_type, _, _, p_vaddr = struct.unpack_from("<IIQQ", table, i * _PHDR_SIZE)
        if p_type == _PT_PHDR:
            bias = phdr - int(p_vaddr)
        elif p_type == _PT_DYNAMIC:
            dynamic = int(p_vaddr)
    if dynamic is None:
        raise NoDynamicSection("the program has no dynamic section (static)")
    return dynamic + bias


def _r_debug(read: Read, dynamic: int) -> int:
    """``DT_DEBUG``'s value: the address of ``struct r_debug``, 0 until ld.so set it."""
    for i in range(_MAX_DYN):
        tag, value = struct.unpack("<qQ", read(dynamic + i * _DYN_SIZE, _DYN_SIZE))
        if tag == _DT_NULL:
            return 0
        if tag == _DT_DEBUG:
            return int(value)
    return 0


def r_debug_location(read: Read, auxv: bytes) -> int:
    """The address of the ``DT_DEBUG`` entry's value in the program's dynamic section: the
    word where ld.so stores the address of its ``struct r_debug``. That is what lldb asks
    with ``qShlibInfoAddr`` (lldb-server answers the same: lldb reads the pointer there).
    Unanswered, lldb takes ``main-lm`` of the library list for it, reads a "pointer" from
    the main program's ``link_map`` and puts its rendezvous breakpoint at a word of an ELF
    header (measured: 0x1003e0003), or at ``_start``: one hardware slot wasted. Raises
    NoDynamicSection (a static program, or no ``DT_DEBUG``) and what ``read`` raises."""
    dynamic = _dynamic_section(read, auxv)
    for i in range(_MAX_DYN):
        tag, _ = struct.unpack("<qQ", read(dynamic + i * _DYN_SIZE, _DYN_SIZE))
        if tag == _DT_NULL:
            break
        if tag == _DT_DEBUG:
            return dynamic + i * _DYN_SIZE + 8
    raise NoDynamicSection("the program's dynamic section has no DT_DEBUG entry")


def _string(read: Read, addr: int) -> bytes:
    """The NUL-terminated string at ``addr`` (read a chunk at a time, never across the
    end of its mapping: a chunk that fails is read again byte by byte)."""
    out = b""
    size = _NAME_CHUNK
    while len(out) < _MAX_NAME:
        here = addr + len(out)
        try:
            chunk = read(here, min(size, _NAME_CHUNK - here % _NAME_CHUNK))
        except (OSError, HwbkptError):
            if size == 1:
                break  # not mapped: the name ends here
            size = 1  # the chunk crossed into unreadable memory: go on byte by byte
            continue
        if not chunk:
            break
        end = chunk.find(b"\0")
        if end >= 0:
            return out + chunk[:end]
        out += chunk
    return out


def _parse_annex(annex: bytes) -> tuple[int, int]:
    """``start=HEX;prev=HEX`` → (start, prev); (0, 0) for an empty annex. Unknown keys
    (``lmid``) are ignored. Raises ValueError for anything malformed."""
    start = prev = 0
    for item in annex.split(b";") if annex else []:
        key, sep, value = item.partition(b"=")
        if not sep or not value or value.strip(b"0123456789abcdefABCDEF") or len(value) > 16:
            raise ValueError(f"bad annex item {item[:40]!r}")
        if key == b"start":
            start = int(value, 16)
        elif key == b"prev":
            prev = int(value, 16)
    return start, prev


def library_list(
    read: Read, auxv: bytes, annex: bytes = b"", *, hidden: tuple[int, int] = (0, 0)
) -> bytes:
    """The ``<library-list-svr4>`` document of the process whose memory ``read`` reads
    and whose auxiliary vector is ``auxv``. An entry whose dynamic section (``l_ld``) is in
    ``hidden`` (``[lo, hi)``: the vDSO's mapping) is left out: gdb leaves out the vDSO,
    which has no file, but finds it only by reading ``/proc/PID/maps`` through the remote
    (``vFile``), which this server does not serve; listed, gdb would show it as a library
    without symbols, where native gdb shows nothing.

    Raises NoDynamicSection (a static program), ValueError (a malformed annex), and what
    ``read`` raises when the program headers or dynamic section cannot be read.
    """
    start, prev = _parse_annex(annex)
    if not start:
        debug = _r_debug(read, _dynamic_section(read, auxv))
        start = int(struct.unpack("<Q", read(debug + _R_MAP, 8))[0]) if debug else 0
        prev = 0
    head = '<library-list-svr4 version="1.0"'
    items: list[str] = []
    lm, seen = start, 0
    while lm and seen < _MAX_LIBRARIES:
        seen += 1
        l_addr, l_name, l_ld, l_next, l_prev = _LINK_MAP.unpack(read(lm, _LINK_MAP.size))
        if l_prev != prev:
            break  # the chain is being changed under us (or corrupt): stop, as gdbserver
        if prev == 0:
            head += f' main-lm="{lm:#x}"'  # the main program: not a library
        else:
            name = _string(read, l_name) if l_name else b""
            if name and not hidden[0] <= l_ld < hidden[1]:
                # lmid: gdb 13 requires it; 0 is the base namespace, the only one walked.
                items.append(
                    f"<library name={quoteattr(name.decode(errors='replace'))} lm=\"{lm:#x}\""
                    f' l_addr="{l_addr:#x}" l_ld="{l_ld:#x}" lmid="0x0"/>'
                )
        prev, lm = lm, l_next
    return f"{head}>{''.join(items)}</library-list-svr4>".encode()
