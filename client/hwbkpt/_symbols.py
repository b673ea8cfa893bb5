"""ELF symbols of a running process, found without ptrace: names to addresses and back.

Theory of operation
-------------------
``/proc/PID/maps`` lists every file the process has mapped, in address order. For each ELF
file the kernel (``load_elf_binary`` / ``elf_map`` in ``fs/binfmt_elf.c``) and ld.so map
each ``PT_LOAD`` segment at ``bias + PAGESTART(p_vaddr)`` from file offset
``PAGESTART(p_offset)``. So the mapping whose file offset is 0 belongs to the first
``PT_LOAD`` (the one with ``p_offset`` in the first page), and::

    bias = start of the offset-0 mapping - PAGESTART(p_vaddr of that PT_LOAD)

which is 0 for a non-PIE executable and the load address for PIE executables and shared
libraries. A symbol's run-time address is its ``st_value + bias``.

The file is read through ``/proc/PID/map_files/START-END`` — the very inode the process
mapped, even if the path has since been replaced or deleted — and only if that is refused,
through ``/proc/PID/root/PATH`` (which also follows the process into its mount namespace or
chroot).

Names are looked up in ``.symtab`` first (it has static symbols), then ``.dynsym``; in
``.dynsym`` a non-default symbol version (``sym@VER`` as opposed to ``sym@@VER``) is
skipped. Search order is the dynamic linker's: the main executable, then the libraries in
map order. One subtlety: when the executable refers to a library's variable, the linker gives
the executable a *copy* of it (an ``R_X86_64_COPY`` relocation) and the library's own code
then uses that copy too, so ``libfoo:var`` answers with the executable's copy when there is
one — the address that is actually read and written.

Thread-local symbols (``STT_TLS``) have one address per thread and are refused with a
clear error; so are GNU indirect functions, whose symbol is the resolver, not the code
that runs.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

import psutil
from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from hwbkpt_proto._errors import (
    InvalidArgumentError,
    NoSuchProcessError,
    NotFoundError,
    PermissionDeniedError,
)

__all__ = ["Symbol", "Symbolizer", "resolve", "symbolize"]

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# The copy relocation's number per machine (e_machine as pyelftools spells it).
_COPY_RELOC = {"EM_X86_64": 5, "EM_386": 5, "EM_AARCH64": 1024}

_STT_GNU_IFUNC = ("STT_GNU_IFUNC", "STT_LOOS")  # pyelftools names type 10 STT_LOOS
_VERSYM_HIDDEN = 0x8000  # .gnu.version: this entry is not the default version

# "LIB:NAME", but not a C++ "ns::name" (the lookahead refuses a second colon).
_QUALIFIED = re.compile(r"^([^:]+):(?!:)(.+)$")

_BIND_RANK = {"STB_GLOBAL": 0, "STB_WEAK": 1, "STB_GNU_UNIQUE": 1, "STB_LOCAL": 2}


@dataclass(frozen=True)
class Symbol:
    """A resolved symbol: its run-time ``addr`` in the process and its ``size`` in bytes.

    ``kind`` is ``"object"`` or ``"function"``; ``file`` is the path of the mapped file
    where the bytes live (as ``/proc/PID/maps`` shows it, without `` (deleted)``).
    """

    name: str
    addr: int
    size: int
    kind: str
    file: str


# --------------------------------------------------------------------------------------
# /proc parsing (pure)


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    perms: str
    offset: int
    inode: int
    path: str  # as in maps, possibly ending in " (deleted)"

    @property
    def range_name(self) -> str:
        return f"{self.start:x}-{self.end:x}"


def _parse_maps(text: str) -> list[_Mapping]:
    """File-backed mappings of a ``/proc/PID/maps`` text, in address order.

    A path may contain spaces, so each line is split into at most six fields; anonymous
    mappings and pseudo-files (``[heap]``, ``[vdso]``) are dropped.
    """
    out: list[_Mapping] = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 6 or not fields[5].startswith("/"):
            continue
        lo, hi = fields[0].split("-")
        out.append(
            _Mapping(
                start=int(lo, 16),
                end=int(hi, 16),
                perms=fields[1],
                offset=int(fields[2], 16),
                inode=int(fields[4]),
                path=fields[5],
            )
        )
    return out


def _clean_path(path: str) -> str:
    return path.removesuffix(" (deleted)")


def _match_lib(lib: str, paths: list[str]) -> list[str]:
    """The paths a ``LIB`` qualifier names: a full path, a basename, or a basename prefix.

    An exact basename (or path) wins over prefixes. A prefix must end where the basename
    has a ``.`` or ``-``, so ``libc`` names ``libc.so.6`` but not ``libcrypt.so.1``.
    """
    unique = list(dict.fromkeys(paths))
    if "/" in lib:
        return [p for p in unique if _clean_path(p) == lib]
    exact = [p for p in unique if os.path.basename(_clean_path(p)) == lib]
    if exact:
        return exact
    out = []
    for p in unique:
        base = os.path.basename(_clean_path(p))
        if base.startswith(lib) and base[len(lib)] in ".-":
            out.append(p)
    return out


def _read_starttime(pid: int) -> float:
    """When ``pid`` started (psutil's ``create_time``): with the pid, it names the process
    (pids get reused)."""
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.NoSuchProcess as err:
        raise NoSuchProcessError(f"process {pid} does not exist (any more)") from err
    except psutil.AccessDenied as err:
        raise PermissionDeniedError(
            f"may not read the memory map of process {pid}; run as its owner or as root"
        ) from err


@contextlib.contextmanager
def _proc_errors(pid: int) -> Iterator[None]:
    """Translate the OS errors of reading ``/proc/PID/...`` into the project's exceptions."""
    try:
        yield
    except (FileNotFoundError, ProcessLookupError) as err:
        raise NoSuchProcessError(f"process {pid} does not exist (any more)") from err
    except PermissionError as err:
        raise PermissionDeniedError(
            f"may not read the memory map of process {pid}; run as its owner or as root"
        ) from err


# --------------------------------------------------------------------------------------
# one ELF file


@dataclass(frozen=True)
class _Sym:
    name: str
    value: int  # link-time st_value; add the file's bias
    size: int
    type: str  # STT_*
    bind: str  # STB_*


@dataclass
class _ElfFile:
    """What we keep of one mapped ELF file: its symbols, by name and functions by address."""

    path: str  # as in maps
    bias: int
    lo: int  # lowest and highest mapped run-time address of this file
    hi: int
    by_name: dict[str, list[_Sym]]  # .symtab entries before .dynsym entries
    copy_relocs: frozenset[str]
    _tables: dict[str, tuple[list[int], list[_Sym]]] = field(default_factory=dict, repr=False)

    def table(self, sym_type: str) -> tuple[list[int], list[_Sym]]:
        """Start addresses (link-time, sorted) and symbols of one ``STT_*`` type; built once."""
        if sym_type not in self._tables:
            best: dict[int, _Sym] = {}
            for syms in self.by_name.values():
                for s in syms:
                    if s.type != sym_type:
                        continue
                    old = best.get(s.value)
                    # one name per address: global before weak before local, then the
                    # shortest (malloc rather than __libc_malloc), then the bigger size
                    if old is None or _func_rank(s) < _func_rank(old):
                        best[s.value] = s
            starts = sorted(best)
            self._tables[sym_type] = (starts, [best[a] for a in starts])
        return self._tables[sym_type]


def _func_rank(s: _Sym) -> tuple[int, int, str, int]:
    return (_BIND_RANK.get(s.bind, 3), len(s.name), s.name, -s.size)


def _iter_defined(elf: ELFFile, table: SymbolTableSection) -> Iterator[_Sym]:
    versym: bytes | None = None
    if table["sh_type"] == "SHT_DYNSYM":
        for sec in elf.iter_sections("SHT_GNU_versym"):
            versym = sec.data()
    fmt = "<H" if elf.little_endian else ">H"
    for i, sym in enumerate(table.iter_symbols()):
        shndx = sym["st_shndx"]
        if shndx in ("SHN_UNDEF", "SHN_ABS", "SHN_COMMON") or not sym.name:
            continue
        if versym is not None and 2 * i + 2 <= len(versym):
            (ver,) = struct.unpack_from(fmt, versym, 2 * i)
            if ver & _VERSYM_HIDDEN:
                continue
        yield _Sym(
            name=sym.name,
            value=sym["st_value"],
            size=sym["st_size"],
            type=sym["st_info"]["type"],
            bind=sym["st_info"]["bind"],
        )


def _copy_relocs(elf: ELFFile) -> frozenset[str]:
    rtype = _COPY_RELOC.get(elf["e_machine"])
    if rtype is None:
        return frozenset()
    names = set()
    for sec in elf.iter_sections():
        if not isinstance(sec, RelocationSection) or sec["sh_link"] == 0:
            continue
        symtab = elf.get_section(sec["sh_link"])
        if not isinstance(symtab, SymbolTableSection):
            continue
        for rel in sec.iter_relocations():
            if rel["r_info_type"] == rtype:
                names.add(symtab.get_symbol(rel["r_info_sym"]).name)
    return frozenset(names)


def _load_bias(elf: ELFFile, offset0_start: int) -> int:
    loads = list(elf.iter_segments("PT_LOAD"))
    if not loads:
        raise ELFError("no PT_LOAD segment")
    first = next((s for s in loads if s["p_offset"] < _PAGE_SIZE), loads[0])
    return offset0_start - (first["p_vaddr"] & ~(_PAGE_SIZE - 1))


def _load_elf(f: IO[bytes], maps: list[_Mapping], with_copy_relocs: bool) -> _ElfFile:
    """Parse an open ELF file mapped as ``maps`` (all of one file, address order)."""
    elf = ELFFile(f)
    offset0 = next(m for m in maps if m.offset == 0)
    by_name: dict[str, list[_Sym]] = {}
    for kind in ("SHT_SYMTAB", "SHT_DYNSYM"):
        for table in elf.iter_sections(kind):
            if isinstance(table, SymbolTableSection):
                for s in _iter_defined(elf, table):
                    by_name.setdefault(s.name, []).append(s)
    return _ElfFile(
        path=maps[0].path,
        bias=_load_bias(elf, offset0.start),
        lo=min(m.start for m in maps),
        hi=max(m.end for m in maps),
        by_name=by_name,
        copy_relocs=_copy_relocs(elf) if with_copy_relocs else frozenset(),
    )


# --------------------------------------------------------------------------------------
# one process


@dataclass(frozen=True)
class _FileKey:
    path: str
    inode: int
    offset0_start: int  # tells apart two loads of the same file


class Symbolizer:
    """Symbols of one process, with each file's tables parsed once and kept.

    The process is identified by its pid and start time; if the pid is found to name another
    process later, calls raise :class:`NoSuchProcessError`. The memory map is re-read by
    every :meth:`resolve` and by :meth:`symbolize` when an address is outside every file it
    knows (a library loaded since); :meth:`refresh` forces it.

    Raises :class:`NoSuchProcessError` or :class:`PermissionDeniedError` if the process
    cannot be read.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._starttime = _read_starttime(pid)
        self._files: dict[_FileKey, _ElfFile | str] = {}  # loaded, or why it was skipped
        self._order: list[_FileKey] = []  # map order, main executable first
        self._groups: dict[_FileKey, list[_Mapping]] = {}
        self._exe: _FileKey | None = None
        self._starts: list[int] = []  # file mappings, sorted by start, for symbolize
        self._mappings: list[_Mapping] = []
        self.refresh()

    # -- the memory map

    def refresh(self) -> None:
        """Re-read ``/proc/PID/maps``; tables of files still mapped the same way are kept."""
        with _proc_errors(self.pid):
            with open(f"/proc/{self.pid}/maps") as f:
                text = f.read()
            try:
                exe_path = os.readlink(f"/proc/{self.pid}/exe")
            except OSError:
                exe_path = None  # a zombie or a kernel thread; then no exe comes first
        if _read_starttime(self.pid) != self._starttime:
            raise NoSuchProcessError(f"process {self.pid} has exited (its pid was reused)")
        mappings = _parse_maps(text)
        groups: dict[tuple[str, int], list[_Mapping]] = {}
        for m in mappings:
            groups.setdefault((m.path, m.inode), []).append(m)
        order: list[_FileKey] = []
        by_key: dict[_FileKey, list[_Mapping]] = {}
        for (path, inode), maps in groups.items():
            offset0 = [m for m in maps if m.offset == 0]
            if not offset0:
                continue  # a file mapped only from the middle: no load bias to be had
            # A file mapped twice from offset 0 (e.g. dlopen'ed into another namespace, or
            # mmap'ed as data as well) is split at each offset-0 mapping.
            for i, m0 in enumerate(offset0):
                nxt = offset0[i + 1].start if i + 1 < len(offset0) else None
                part = [m for m in maps if m.start >= m0.start and (nxt is None or m.start < nxt)]
                key = _FileKey(path, inode, m0.start)
                order.append(key)
                by_key[key] = part
        self._exe = next((k for k in order if k.path == exe_path), None)
        if self._exe is not None:
            order.remove(self._exe)
            order.insert(0, self._exe)
        self._order = order
        self._groups = by_key
        self._files = {k: v for k, v in self._files.items() if k in by_key}
        self._mappings = mappings
        self._starts = [m.start for m in mappings]

    def _elf(self, key: _FileKey) -> _ElfFile | str:
        """The parsed file, or a short reason it cannot be used (kept, not raised)."""
        got = self._files.get(key)
        if got is None:
            got = self._files[key] = self._open_and_load(key)
        return got

    def _open_and_load(self, key: _FileKey) -> _ElfFile | str:
        maps = self._groups[key]
        first = next(m for m in maps if m.offset == 0)
        candidates = [f"/proc/{self.pid}/map_files/{first.range_name}"]
        if not key.path.endswith(" (deleted)"):
            candidates.append(f"/proc/{self.pid}/root{key.path}")
        errors = []
        for candidate in candidates:
            try:
                with open(candidate, "rb") as f:
                    if f.read(4) != b"\x7fELF":
                        return "not ELF"
                    f.seek(0)
                    return _load_elf(f, maps, with_copy_relocs=key == self._exe)
            except OSError as err:
                errors.append(f"{candidate}: {err.strerror}")
            except (ELFError, StopIteration, struct.error, ValueError) as err:
                return f"unreadable ELF: {err}"
        return "cannot open (" + "; ".join(errors) + ")"

    # -- names to addresses

    def resolve(self, name: str) -> Symbol:
        """Find a function or variable by ``NAME`` or ``LIB:NAME`` in the running process.

        ``LIB`` is a mapped file's basename (``libc.so.6``), a prefix of it ending before
        a ``.`` or ``-`` (``libc``), or its full path. Without ``LIB`` the main executable is
        searched first, then the libraries in map order.

        Raises :class:`NotFoundError` (saying which files were searched) if there is no
        such symbol or library, :class:`InvalidArgumentError` if ``LIB`` matches several
        files, the name is ambiguous within a file, or the symbol is thread-local or an
        indirect function, and :class:`NoSuchProcessError` / :class:`PermissionDeniedError`
        if the process cannot be read.
        """
        self.refresh()
        keys = self._order
        sym_name = name
        m = _QUALIFIED.match(name)
        if m is not None:
            lib, sym_name = m.group(1), m.group(2)
            paths = _match_lib(lib, [k.path for k in self._order])
            if not paths:
                raise NotFoundError(
                    f"process {self.pid} has no file {lib!r} mapped; mapped: "
                    + ", ".join(dict.fromkeys(_clean_path(k.path) for k in self._order))
                )
            if len(paths) > 1:
                raise InvalidArgumentError(
                    f"{lib!r} matches several mapped files: "
                    + ", ".join(_clean_path(p) for p in paths)
                    + "; name one of them in full"
                )
            keys = [k for k in self._order if k.path == paths[0]]
        searched: list[str] = []
        skipped: list[str] = []
        for key in keys:
            elf = self._elf(key)
            if isinstance(elf, str):
                if elf != "not ELF":
                    skipped.append(f"{_clean_path(key.path)} ({elf})")
                continue
            searched.append(_clean_path(key.path))
            sym = self._lookup(elf, sym_name, qualified=m is not None)
            if sym is not None:
                return sym
        where = ", ".join(searched) if searched else "no ELF files"
        msg = f"no function or variable {sym_name!r} in process {self.pid}; searched {where}"
        if skipped:
            msg += "; could not read " + ", ".join(skipped)
        raise NotFoundError(msg)

    def _lookup(self, elf: _ElfFile, name: str, *, qualified: bool) -> Symbol | None:
        syms = elf.by_name.get(name)
        if not syms:
            return None
        path = _clean_path(elf.path)
        for s in syms:
            if s.type == "STT_TLS":
                raise InvalidArgumentError(
                    f"{name!r} in {path} is thread-local: every thread has its own copy at a "
                    "different address; watch one thread's copy by address instead"
                )
            if s.type in _STT_GNU_IFUNC:
                raise InvalidArgumentError(
                    f"{name!r} in {path} is an indirect function: its symbol is the resolver, "
                    "not the code that runs; watch the implementation's name or address"
                )
        usable = [s for s in syms if s.type in ("STT_OBJECT", "STT_FUNC")]
        if not usable:
            return None
        best_rank = min(_BIND_RANK.get(s.bind, 3) for s in usable)
        best = [s for s in usable if _BIND_RANK.get(s.bind, 3) == best_rank]
        addrs = sorted({s.value for s in best})
        if len(addrs) > 1:
            raise InvalidArgumentError(
                f"{len(addrs)} symbols are named {name!r} in {path} (e.g. static variables of "
                "different source files), at "
                + ", ".join(f"{a + elf.bias:#x}" for a in addrs)
                + "; watch by address instead"
            )
        s = max((s for s in best if s.value == addrs[0]), key=lambda s: s.size)
        kind = "function" if s.type == "STT_FUNC" else "object"
        if (
            qualified
            and kind == "object"
            and s.bind != "STB_LOCAL"
            and self._exe is not None
            and elf is not self._files.get(self._exe)
        ):
            copy = self._copy_in_exe(name)
            if copy is not None:
                return copy
        return Symbol(name=name, addr=s.value + elf.bias, size=s.size, kind=kind, file=path)

    def _copy_in_exe(self, name: str) -> Symbol | None:
        """The executable's copy of a library variable (``R_X86_64_COPY``), if it has one."""
        assert self._exe is not None
        exe = self._elf(self._exe)
        if isinstance(exe, str) or name not in exe.copy_relocs:
            return None
        return self._lookup(exe, name, qualified=False)

    # -- addresses to names

    def symbolize(self, addr: int, *, data: bool = False) -> str:
        """Name a code address: ``"function+0x1d (libfoo.so)"``, ``"function (libfoo.so)"``
        at the very start, ``"0x… (libfoo.so)"`` in a file but no function, ``"0x…"`` when
        nothing is mapped there. ``data=True`` names a variable's address the same way
        (``"counter+0x8 (prog)"``), from the file's object symbols.

        Raises :class:`NoSuchProcessError` / :class:`PermissionDeniedError` only if the
        memory map must be re-read and cannot be.
        """
        key = self._key_at(addr)
        if key is None:
            self.refresh()
            key = self._key_at(addr)
            if key is None:
                return f"{addr:#x}"
        base = os.path.basename(_clean_path(key.path))
        elf = self._elf(key)
        if isinstance(elf, str):
            return f"{addr:#x} ({base})"
        starts, syms = elf.table("STT_OBJECT" if data else "STT_FUNC")
        link = addr - elf.bias
        i = bisect.bisect_right(starts, link) - 1
        if i >= 0:
            s = syms[i]
            off = link - s.value
            # a sized function must contain the address; an unsized one (hand-written
            # assembly) is trusted up to the next function
            if off < s.size or (s.size == 0 and (i + 1 == len(starts) or link < starts[i + 1])):
                return f"{s.name}+{off:#x} ({base})" if off else f"{s.name} ({base})"
        return f"{addr:#x} ({base})"

    def _key_at(self, addr: int) -> _FileKey | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0 or addr >= self._mappings[i].end:
            return None
        m = self._mappings[i]
        # the file part that contains it: the last offset-0 load of the file at or below it
        best = None
        for key in self._order:
            if (
                key.path == m.path
                and key.inode == m.inode
                and key.offset0_start <= addr
                and (best is None or key.offset0_start > best.offset0_start)
            ):
                best = key
        return best


# --------------------------------------------------------------------------------------
# module-level conveniences


_CACHE_SIZE = 16
_cache: OrderedDict[tuple[int, float], Symbolizer] = OrderedDict()


def _symbolizer(pid: int) -> Symbolizer:
    key = (pid, _read_starttime(pid))
    s = _cache.get(key)
    if s is None:
        s = _cache[key] = Symbolizer(pid)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return s


def resolve(pid: int, name: str) -> Symbol:
    """Resolve ``NAME`` or ``LIB:NAME`` in process ``pid``; see :meth:`Symbolizer.resolve`.

    Raises :class:`NotFoundError`, :class:`InvalidArgumentError`,
    :class:`NoSuchProcessError` or :class:`PermissionDeniedError`.
    """
    return _symbolizer(pid).resolve(name)


def symbolize(pid: int, addr: int) -> str:
    """Name ``addr`` in process ``pid``; see :meth:`Symbolizer.symbolize`.

    Symbolizers (and their parsed tables) are kept for the last few processes, keyed by pid
    and start time, so repeated calls cost a ``/proc/PID/stat`` read and a bisect.

    Raises :class:`NoSuchProcessError` or :class:`PermissionDeniedError`.
    """
    return _symbolizer(pid).symbolize(addr)
