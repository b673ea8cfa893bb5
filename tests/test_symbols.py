"""Symbols of a live process (client/hwbkpt/_symbols.py) against the addresses it prints.

tests/progs/symtarget.c is built here, as PIE and as non-PIE, linked against
tests/progs/libsymlib.c (rpath $ORIGIN), into tests/_build/symbols/. Each target prints
``name 0xADDR`` lines and ``ready``, then waits on stdin; every one started is killed and
reaped, even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hwbkpt._symbols import (
    Symbol,
    Symbolizer,
    _match_lib,
    _parse_maps,
    resolve,
    symbolize,
)
from hwbkpt_proto._errors import InvalidArgumentError, NoSuchProcessError, NotFoundError
from hwbkptd._region import split_region

ROOT = Path(__file__).resolve().parent
PROGS = ROOT / "progs"
BUILD = ROOT / "_build" / "symbols"
START_TIMEOUT = 10.0  # seconds, absolute, for a target to print its addresses
REAP_TIMEOUT = 10.0
# -O0 keeps every symbol where the source puts it; warnings are errors so a sloppy edit
# of the programs fails loudly here rather than as a wrong address later
CFLAGS = ("-O0", "-g", "-Wall", "-Wextra", "-Werror")

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


def _gcc(*args: str) -> None:
    subprocess.run(["gcc", *args], check=True, timeout=120, capture_output=True)


def _build(variant: str) -> Path:
    """Build libsymlib.so and symtarget into BUILD/variant; return the executable's path."""
    out = BUILD / variant
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        # build beside, then rename: a target still running from an earlier build keeps
        # its file, and a half-written file is never run
        lib = Path(tmp, "libsymlib.so")
        exe = Path(tmp, "symtarget")
        _gcc(*CFLAGS, "-shared", "-fPIC", "-o", str(lib), str(PROGS / "libsymlib.c"))
        pie = ["-fPIE", "-pie"] if variant == "pie" else ["-fno-pie", "-no-pie"]
        _gcc(
            *CFLAGS, "-fno-toplevel-reorder", *pie,
            "-o", str(exe), str(PROGS / "symtarget.c"),
            f"-L{tmp}", "-lsymlib", "-Wl,-rpath,$ORIGIN",
        )  # fmt: skip
        os.replace(lib, out / "libsymlib.so")
        os.replace(exe, out / "symtarget")
    return out / "symtarget"


@pytest.fixture(scope="module", params=["pie", "nopie"])
def target_exe(request: pytest.FixtureRequest) -> Path:
    return _build(request.param)


class SymTarget:
    """A running symtarget: its pid and the addresses it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], addrs: dict[str, int], exe: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.addrs = addrs
        self.exe = exe


def _read_addresses(proc: subprocess.Popen[bytes], deadline: float) -> dict[str, int]:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while not buf.endswith(b"ready\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise TimeoutError(f"target printed only {buf!r} in {START_TIMEOUT}s")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"target exited ({proc.poll()}) after printing {buf!r}")
            buf += chunk
    out = {}
    for line in buf.decode().splitlines()[:-1]:
        name, value = line.split()
        out[name] = int(value, 16)
    return out


@contextlib.contextmanager
def started(exe: Path) -> Iterator[SymTarget]:
    proc = subprocess.Popen(
        [str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=exe.parent
    )
    try:
        addrs = _read_addresses(proc, time.monotonic() + START_TIMEOUT)
        yield SymTarget(proc, addrs, exe)
    finally:
        proc.kill()
        proc.wait(timeout=REAP_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def symtarget(target_exe: Path) -> Iterator[SymTarget]:
    with started(target_exe) as t:
        yield t


# --------------------------------------------------------------------------------------
# names to addresses


def test_main_executable_objects(symtarget: SymTarget) -> None:
    exe = str(symtarget.exe)
    assert resolve(symtarget.pid, "counter") == Symbol(
        "counter", symtarget.addrs["counter"], 8, "object", exe
    )
    assert resolve(symtarget.pid, "pair16") == Symbol(
        "pair16", symtarget.addrs["pair16"], 16, "object", exe
    )
    odd6 = resolve(symtarget.pid, "odd6")
    assert odd6 == Symbol("odd6", symtarget.addrs["odd6"], 6, "object", exe)


def test_odd_array_is_at_an_odd_address_and_splits_1_4_1(symtarget: SymTarget) -> None:
    # the layout symtarget.c asks the compiler for; if it changes, this says so
    odd6 = resolve(symtarget.pid, "odd6")
    assert odd6.addr % 8 == 3
    assert [n for _, n in split_region(odd6.addr, odd6.size)] == [1, 4, 1]


def test_main_executable_function(symtarget: SymTarget) -> None:
    bump = resolve(symtarget.pid, "bump")
    assert (bump.addr, bump.kind, bump.file) == (
        symtarget.addrs["bump"],
        "function",
        str(symtarget.exe),
    )
    assert bump.size > 0


def test_qualified_by_executable_name(symtarget: SymTarget) -> None:
    assert resolve(symtarget.pid, "symtarget:counter").addr == symtarget.addrs["counter"]


def test_library_function(symtarget: SymTarget) -> None:
    lib = str(symtarget.exe.parent / "libsymlib.so")
    for name in ("lib_bump", "libsymlib:lib_bump", "libsymlib.so:lib_bump", f"{lib}:lib_bump"):
        sym = resolve(symtarget.pid, name)
        assert (sym.addr, sym.kind, sym.file) == (symtarget.addrs["lib_bump"], "function", lib), (
            name
        )
        assert sym.name == "lib_bump"


def test_library_variable_is_the_live_copy(symtarget: SymTarget) -> None:
    # The executable refers to lib_counter, so it has a copy relocation: the variable really
    # lives in the executable's .bss and the library's code uses that copy too.
    assert symtarget.addrs["lib_counter"] == symtarget.addrs["lib_counter_in_lib"]
    for name in ("lib_counter", "libsymlib:lib_counter"):
        sym = resolve(symtarget.pid, name)
        assert (sym.addr, sym.size, sym.kind) == (symtarget.addrs["lib_counter"], 8, "object")


def test_missing_symbol_says_where_it_looked(symtarget: SymTarget) -> None:
    with pytest.raises(NotFoundError) as info:
        resolve(symtarget.pid, "no_such_symbol")
    msg = str(info.value)
    assert "no_such_symbol" in msg
    assert str(symtarget.exe) in msg
    assert str(symtarget.exe.parent / "libsymlib.so") in msg
    assert "libc.so.6" in msg


def test_missing_symbol_in_a_library_lists_only_it(symtarget: SymTarget) -> None:
    with pytest.raises(NotFoundError) as info:
        resolve(symtarget.pid, "libsymlib:counter")
    assert "libsymlib.so" in str(info.value)
    assert "libc.so.6" not in str(info.value)


def test_missing_library(symtarget: SymTarget) -> None:
    with pytest.raises(NotFoundError, match=r"no file 'libnope' mapped.*libsymlib\.so"):
        resolve(symtarget.pid, "libnope:counter")


def test_thread_local_is_refused(symtarget: SymTarget) -> None:
    with pytest.raises(InvalidArgumentError, match="thread-local"):
        resolve(symtarget.pid, "tls_counter")


def test_libc_function(symtarget: SymTarget) -> None:
    malloc = resolve(symtarget.pid, "libc:malloc")
    assert malloc.kind == "function"
    assert malloc.file.endswith("libc.so.6")
    text = symbolize(symtarget.pid, malloc.addr)
    assert text.endswith(" (libc.so.6)")
    assert "+" not in text


def test_file_replaced_under_the_process(target_exe: Path, tmp_path: Path) -> None:
    # The library's path now names another file; the mapped inode is still readable through
    # /proc/PID/map_files.
    for name in ("symtarget", "libsymlib.so"):
        shutil.copy2(target_exe.parent / name, tmp_path / name)
    with started(tmp_path / "symtarget") as t:
        (tmp_path / "libsymlib.so").unlink()
        (tmp_path / "libsymlib.so").write_bytes(b"not an ELF file")
        sym = resolve(t.pid, "libsymlib:lib_bump")
        assert (sym.addr, sym.file) == (t.addrs["lib_bump"], str(tmp_path / "libsymlib.so"))


def test_exited_process() -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=REAP_TIMEOUT)
    with pytest.raises(NoSuchProcessError):
        resolve(proc.pid, "main")


def test_pid_reused_or_exited_under_a_symbolizer(target_exe: Path) -> None:
    with started(target_exe) as t:
        s = Symbolizer(t.pid)
        assert s.resolve("counter").addr == t.addrs["counter"]
    with pytest.raises(NoSuchProcessError):
        s.resolve("counter")


# --------------------------------------------------------------------------------------
# addresses to names


def test_symbolize(symtarget: SymTarget) -> None:
    bump = symtarget.addrs["bump"]
    assert symbolize(symtarget.pid, bump + 3) == "bump+0x3 (symtarget)"
    assert symbolize(symtarget.pid, bump) == "bump (symtarget)"
    assert (
        symbolize(symtarget.pid, symtarget.addrs["lib_bump"] + 1) == "lib_bump+0x1 (libsymlib.so)"
    )
    assert symbolize(symtarget.pid, 0x10) == "0x10"


def test_symbolizer_object_is_cached(symtarget: SymTarget) -> None:
    s = Symbolizer(symtarget.pid)
    bump = symtarget.addrs["bump"]
    assert s.symbolize(bump + 3) == "bump+0x3 (symtarget)"
    tables = dict(s._files)
    for off in range(1, 200):
        s.symbolize(bump + off % 8)
    assert s._files == tables  # nothing parsed again
    assert s.resolve("bump").addr == bump


# --------------------------------------------------------------------------------------
# pure helpers


def test_parse_maps_keeps_files_only_and_paths_with_spaces() -> None:
    text = (
        "55d0c0000000-55d0c0001000 r--p 00000000 fe:00 42   /opt/my app/bin x\n"
        "55d0c0001000-55d0c0002000 r-xp 00001000 fe:00 42   /opt/my app/bin x\n"
        "55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0    [heap]\n"
        "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n"
        "7f0000001000-7f0000002000 r--p 00000000 fe:00 7    /lib/libx.so (deleted)\n"
    )
    maps = _parse_maps(text)
    assert [(m.start, m.offset, m.inode, m.path) for m in maps] == [
        (0x55D0C0000000, 0, 42, "/opt/my app/bin x"),
        (0x55D0C0001000, 0x1000, 42, "/opt/my app/bin x"),
        (0x7F0000001000, 0, 7, "/lib/libx.so (deleted)"),
    ]


PATHS = [
    "/usr/bin/prog",
    "/lib/libc.so.6",
    "/lib/libcrypt.so.1",
    "/lib/libfoo.so.1",
    "/lib/libfoo-2.so",
    "/lib/libbar.so (deleted)",
]


@pytest.mark.parametrize(
    ("lib", "expected"),
    [
        ("libc", ["/lib/libc.so.6"]),  # not libcrypt
        ("libc.so.6", ["/lib/libc.so.6"]),
        ("libc.so", ["/lib/libc.so.6"]),
        ("prog", ["/usr/bin/prog"]),
        ("libfoo", ["/lib/libfoo.so.1", "/lib/libfoo-2.so"]),  # ambiguous
        ("libfoo-2", ["/lib/libfoo-2.so"]),
        ("libbar.so", ["/lib/libbar.so (deleted)"]),
        ("/lib/libc.so.6", ["/lib/libc.so.6"]),
        ("/lib/libc", []),
        ("libz", []),
    ],
)
def test_match_lib(lib: str, expected: list[str]) -> None:
    assert _match_lib(lib, PATHS) == expected
