"""The kernel layer: every ptrace, perf_event_open, waitpid and /proc call of the daemon.

Theory of operation
===================

The daemon *seizes* every thread of a target (``PTRACE_SEIZE`` with :data:`TRACE_OPTIONS`, so
new threads arrive already traced and stopped, and exec/exit are reported) and realizes each
physical debug-register slot as one ``perf_event_open(PERF_TYPE_BREAKPOINT)`` event on one
thread (:class:`BreakpointEvent`). perf events are used instead of ``PTRACE_POKEUSER`` on
``u_debugreg`` because they die with their fd: a daemon killed by SIGKILL leaves no armed
debug register behind, whereas POKEUSER breakpoints survive ``PTRACE_DETACH`` and kill the
ex-tracee with SIGTRAP at its next hit (DESIGN.md §4).

An event is opened in one of three configurations (:class:`hwbkptd._model.Mode`):

* ``COUNT``  - counting only (``sample_period = 0``); :meth:`BreakpointEvent.read_count`.
* ``NOTIFY`` - one sample (IP, TID, TIME) per hit into an mmapped ring buffer that
  :meth:`BreakpointEvent.drain` empties; the fd polls readable after ``wakeup`` samples.
* ``STOP``   - ``sigtrap = 1``: the hitting thread gets a SIGTRAP with ``si_code ==
  TRAP_PERF`` and ``si_perf_data == sig_data``; as a tracee it enters a signal-delivery-stop
  that the daemon sees through :func:`wait_all` and may suppress (``cont(tid, 0)``).

Every mode also counts, so the engine routes hits by counter deltas: one instruction that
fires several events yields *one* SIGTRAP (legacy signals coalesce), carrying the
``sig_data`` of only one of them, but every event's counter advances (verified on the live
kernel by ``tests/test_kernel.py::test_one_store_two_watches_one_sigtrap``).

Kernel facts this module relies on, each checked by a test in ``tests/test_kernel.py``:

* A single-step trap is SIGTRAP with ``si_code == TRAP_TRACE (2)``. When the stepped
  instruction also hits a perf STOP event, the thread still stops *once*, with TRAP_TRACE:
  the #DB handler sends the step's SIGTRAP at once, while perf's SIGTRAP is sent later from
  task work and is dropped as a duplicate legacy signal. The perf counter does advance.
* Execute breakpoints stop *before* the instruction runs; perf's handler sets EFLAGS.RF in
  the saved registers, so ``cont`` runs the instruction without re-triggering it.
* ``PTRACE_INTERRUPT`` yields ``PTRACE_EVENT_STOP`` with SIGTRAP. A job-control stop of a
  seized tracee is a signal-delivery-stop for SIGSTOP, then after ``cont(tid, SIGSTOP)`` a
  ``PTRACE_EVENT_STOP`` with WSTOPSIG == SIGSTOP (a group-stop, :class:`GroupStop`) that
  ``PTRACE_LISTEN`` keeps stopped until SIGCONT.
* A perf SIGTRAP can be *pending* (queued, not yet dequeued) at an interrupt stop: the
  kernel's ``get_signal`` takes job-control traps before it dequeues signals. Detaching then
  delivers it to the untraced program, whose default action kills it. Safe detach order:
  close the thread's events, interrupt, and at that stop, while :func:`pending_signals` has
  SIGTRAP, ``cont(tid, 0)`` to swallow it at its signal-delivery-stop; then detach.
* Tracer death (measured with a SIGKILLed tracer process): a thread held in a SIGTRAP
  *signal-delivery-stop* and one held in a ``PTRACE_EVENT_STOP`` both run on after the
  kernel's implicit detach; the SIGTRAP of the delivery-stop is discarded, not delivered.
  Only a SIGTRAP still *pending* (above) would be delivered and kill the program. The
  conversion "SIGTRAP stop → ``interrupt`` + ``cont(tid, 0)`` → EVENT_STOP with the same
  registers" works too (no pending signal remains) and is what the tracer-death test holds.
* A SIGKILLed tracee with PTRACE_O_TRACEEXIT still stops at ``PTRACE_EVENT_EXIT`` and stays
  there (state ``t``) until its tracer resumes it: the daemon must ``cont`` exit stops.
* NOTIFY rings: with 16 data pages the ring holds 2047 samples. A LOST record is written
  only when there is room again and another sample comes, so losses of a thread that filled
  the ring and then exited — or stopped hitting — show only in the counter
  (:meth:`BreakpointEvent.unaccounted`, :meth:`BreakpointEvent.settle`).
* Ring memory is locked kernel memory, charged to the user's ``perf_event_mlock_kb`` and then
  to RLIMIT_MEMLOCK unless the caller has CAP_IPC_LOCK (perf_mmap, kernel/events/core.c);
  past both the mmap fails with EPERM, and a smaller ring is tried.

Errors: every OSError is translated into the project's exception hierarchy in one place,
:func:`_translate_errno` (applied by the ``@_oserrors`` decorator), keeping the cause.

Threading: ptrace requests only work from the OS thread that seized the tracee, and this
module reuses module-level ctypes buffers; call everything from the tracer thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import mmap
import os
import signal
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, ParamSpec, TypeVar

import psutil

from hwbkpt_proto._errors import (
    BusyError,
    DebugRegisterIOError,
    HwbkptError,
    InternalError,
    InvalidArgumentError,
    NoSpaceError,
    NoSuchProcessError,
    PermissionDeniedError,
)
from hwbkptd._bpf import RECORD_SIZE, Program
from hwbkptd._model import Access, Mode

__all__ = [
    "PTRACE_EVENT_CLONE",
    "PTRACE_EVENT_EXEC",
    "PTRACE_EVENT_EXIT",
    "PTRACE_EVENT_STOP",
    "REGISTER_NAMES",
    "SI_KERNEL",
    "TRACE_OPTIONS",
    "TRAP_BRKPT",
    "TRAP_HWBKPT",
    "TRAP_PERF",
    "TRAP_TRACE",
    "BpfFilter",
    "BreakpointEvent",
    "ChildSignals",
    "EventStop",
    "Exited",
    "GroupStop",
    "Killed",
    "ProcCreds",
    "SigInfo",
    "SignalStop",
    "UprobeEvent",
    "WaitEvent",
    "bpf_available",
    "code_location",
    "cont",
    "decode_status",
    "detach",
    "effective_caps",
    "exit_state",
    "forget_memory",
    "geteventmsg",
    "getregs",
    "getsiginfo",
    "gone_message",
    "interrupt",
    "listen",
    "peekuser",
    "pending_signals",
    "pokeuser",
    "proc_creds",
    "process_name",
    "read_memory",
    "seize",
    "setregs",
    "singlestep",
    "start_time",
    "tgid_of",
    "threads_of",
    "tracer_of",
    "uprobe_regs_writable",
    "wait_all",
    "wait_for",
    "write_memory",
]

# --- constants (linux/ptrace.h, asm-generic/siginfo.h, linux/perf_event.h) ------------------

PTRACE_PEEKUSER: Final = 3
PTRACE_POKEUSER: Final = 6
PTRACE_CONT: Final = 7
PTRACE_SINGLESTEP: Final = 9
PTRACE_GETREGS: Final = 12
PTRACE_SETREGS: Final = 13
PTRACE_DETACH: Final = 17
PTRACE_GETEVENTMSG: Final = 0x4201
PTRACE_GETSIGINFO: Final = 0x4202
PTRACE_SEIZE: Final = 0x4206
PTRACE_INTERRUPT: Final = 0x4207
PTRACE_LISTEN: Final = 0x4208

PTRACE_O_TRACECLONE: Final = 0x08
PTRACE_O_TRACEEXEC: Final = 0x10
PTRACE_O_TRACEEXIT: Final = 0x40
# Not TRACESYSGOOD: the daemon never uses PTRACE_SYSCALL, so syscall stops cannot occur.
TRACE_OPTIONS: Final = PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC | PTRACE_O_TRACEEXIT

PTRACE_EVENT_CLONE: Final = 3
PTRACE_EVENT_EXEC: Final = 4
PTRACE_EVENT_EXIT: Final = 6
PTRACE_EVENT_STOP: Final = 128

# si_code values of SIGTRAP
TRAP_BRKPT: Final = 1  # int1 (icebp), a step over a syscall; not int3 (SI_KERNEL, below)
TRAP_TRACE: Final = 2  # single step
TRAP_HWBKPT: Final = 4  # a ptrace (POKEUSER) debug-register hit
TRAP_PERF: Final = 6  # a perf event with sigtrap=1
SI_KERNEL: Final = 0x80  # x86 int3 (do_int3_user sends SIGTRAP with SI_KERNEL)

_WALL: Final = 0x40000000  # __WALL: wait for all children, clone or not (wait(2))

SYS_perf_event_open: Final = 298  # x86-64
SYS_tgkill: Final = 234  # x86-64
PERF_TYPE_BREAKPOINT: Final = 5
PERF_SAMPLE_IP: Final = 1 << 0
PERF_SAMPLE_TID: Final = 1 << 1
PERF_SAMPLE_TIME: Final = 1 << 2
PERF_FLAG_FD_CLOEXEC: Final = 1 << 3
PERF_RECORD_LOST: Final = 2
PERF_RECORD_THROTTLE: Final = 5
PERF_RECORD_UNTHROTTLE: Final = 6
PERF_RECORD_SAMPLE: Final = 9
# perf_event_attr flag bits (the bitfield word at offset 40)
_ATTR_DISABLED: Final = 1 << 0
_ATTR_EXCLUDE_KERNEL: Final = 1 << 5
_ATTR_EXCLUDE_HV: Final = 1 << 6
_ATTR_WATERMARK: Final = 1 << 14
_ATTR_USE_CLOCKID: Final = 1 << 25
_CLOCK_MONOTONIC: Final = 1  # include/uapi/linux/time.h
_ATTR_REMOVE_ON_EXEC: Final = 1 << 36
_ATTR_SIGTRAP: Final = 1 << 37
# PERF_ATTR_SIZE_VER7 (128 bytes) is the first size with sig_data (offset 120).
_ATTR_SIZE: Final = 128

HW_BREAKPOINT_R: Final = 1
HW_BREAKPOINT_W: Final = 2
HW_BREAKPOINT_RW: Final = 3
HW_BREAKPOINT_X: Final = 4
# x86 has no read-only data breakpoint, so "rw" is the only read access the API offers.
_BP_TYPE: Final = {
    Access.EXECUTE: HW_BREAKPOINT_X,
    Access.WRITE: HW_BREAKPOINT_W,
    Access.READWRITE: HW_BREAKPOINT_RW,
}

PAGE_SIZE: Final = mmap.PAGESIZE
# A notify ring's data pages (a power of two). Each sample takes 32 bytes (header, ip,
# pid/tid, time): 2**4 pages = 64 KiB = 2047 samples, the smallest ring :class:`BreakpointEvent`
# falls back to when the kernel refuses a larger one (EPERM past the locked-memory limits).
RING_DATA_PAGES: Final = 16

# struct user_regs_struct (arch/x86/include/asm/user_64.h), in order.
REGISTER_NAMES: Final = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp",
    "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
)  # fmt: skip
_REGISTER_INDEX: Final = {name: i for i, name in enumerate(REGISTER_NAMES)}
_U64: Final = (1 << 64) - 1

# --- errno translation: the one place --------------------------------------------------------

_ERRNO_CLASS: Final[dict[int, type[HwbkptError]]] = {
    errno.ESRCH: NoSuchProcessError,
    errno.ENOENT: NoSuchProcessError,  # /proc/PID/... of a process that is gone
    errno.ENOSPC: NoSpaceError,
    errno.EINVAL: InvalidArgumentError,
    errno.EPERM: PermissionDeniedError,
    errno.EACCES: PermissionDeniedError,
    errno.EIO: DebugRegisterIOError,
    errno.EFAULT: DebugRegisterIOError,
    errno.EBUSY: BusyError,
}

_P = ParamSpec("_P")
_R = TypeVar("_R")


def exit_state(n: int) -> str | None:
    """How process or thread ``n`` has ended, from ``/proc/N/stat`` (field 3, the state):
    ``"missing"`` (no such id: it never existed, or it was reaped), ``"zombie"`` (state
    ``Z``: it exited and its parent has not reaped it yet; ``X``, dead, is treated alike),
    or ``None`` while it lives."""
    try:
        with open(f"/proc/{n}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return "missing"
    # field 2 (comm) may contain spaces and parentheses: the state follows the last ')'.
    end = stat.rfind(b")")
    state = stat[end + 2 : end + 3] if end >= 0 else b""
    return "zombie" if state in (b"Z", b"X") else None


def gone_message(n: int, noun: str = "process") -> str | None:
    """Why process or thread ``n`` (``noun``) cannot be acted on because it is not there,
    in the user's terms; ``None`` if it is alive. A zombie thread that leads its thread
    group is named as the process it is; one whose process has other threads left is the
    main thread that exited before them (it cannot be traced, they still can)."""
    state = exit_state(n)
    if state is None:
        return None
    if state == "missing":
        return f"{noun} {n} does not exist"
    try:
        status = _status_fields(f"/proc/{n}/status")
        leader = int(status["Tgid"]) == n
        others = int(status.get("Threads", "1")) > 1
    except (OSError, KeyError, ValueError):
        leader, others = noun == "process", False
    if leader and others:
        return (
            f"the main thread of process {n} has exited while other threads of it run; "
            "a zombie thread cannot be traced: watch one of the others by tid"
        )
    return f"{'process' if leader else noun} {n} has exited (zombie, not yet reaped by its parent)"


def _translate_errno(
    err: OSError, what: str, *, memory: bool = False, who: tuple[str, int] | None = None
) -> HwbkptError:
    """Map an OSError from a syscall into the project's exception for it, with a message in
    the user's terms: ``what`` says what the daemon was doing ("attach to thread 812");
    ``who`` — ``("process", pid)`` or ``("thread", tid)`` — is what the call was about, so
    that a failure because it does not exist or has exited says exactly that.

    ``PTRACE_SEIZE`` of a zombie (exited, not yet reaped) answers EPERM, not ESRCH
    (kernel/ptrace.c, ``ptrace_attach``: ``retval = -EPERM`` stands when ``task->exit_state``
    is set; measured by tests/test_zombie.py): an EPERM about a process that has exited is
    therefore a NoSuchProcessError.
    """
    code = err.errno if err.errno is not None else 0
    reason = os.strerror(code) if code else str(err)
    if memory and code in (errno.EIO, errno.EFAULT):
        # /proc/PID/mem answers EIO (and the kernel EFAULT) for an address that is not
        # mapped or not accessible: a bad argument from the client, not a register error.
        return InvalidArgumentError(
            f"cannot {what}: the address range is not mapped in the process ({reason})"
        )
    cls = _ERRNO_CLASS.get(code, InternalError)
    if cls in (NoSuchProcessError, PermissionDeniedError) and who is not None:
        gone = gone_message(who[1], who[0])
        if gone is not None:
            return NoSuchProcessError(gone)
    if cls is NoSuchProcessError:
        if who is not None:
            # It exists, but ptrace says ESRCH: it is not (or no longer) stopped under the
            # daemon (man 2 ptrace, ERRORS).
            return cls(f"cannot {what}: {who[0]} {who[1]} is not stopped under the daemon")
        return cls(f"cannot {what}: the process has exited")
    if cls is NoSpaceError:
        return cls(f"cannot {what}: all hardware breakpoint slots of the thread are in use")
    if cls is PermissionDeniedError:
        return cls(
            f"cannot {what}: the kernel refused ({reason}); is it traced by someone else?"
        )
    return cls(f"cannot {what}: {reason}")


def _oserrors(
    what: str, *, who: str | None = None, memory: bool = False
) -> Callable[[Callable[_P, _R]], Callable[_P, _R]]:
    """Decorator: translate OSError raised by the call (``raise … from err``).

    ``what`` is a format string over the call's positional arguments saying in the user's
    terms what was being done (``"attach to thread {0}"``); ``who`` (``"process"`` or
    ``"thread"``) says that the first argument is a pid or a tid (see _translate_errno).
    """

    def decorate(func: Callable[_P, _R]) -> Callable[_P, _R]:
        @functools.wraps(func)
        def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return func(*args, **kwargs)
            except OSError as err:
                doing = what.format(*args)
                about = (who, args[0]) if who is not None and type(args[0]) is int else None
                raise _translate_errno(err, doing, memory=memory, who=about) from err
            except psutil.NoSuchProcess as err:  # also ZombieProcess, its subclass
                doing = what.format(*args)
                gone = None
                if who is not None and type(args[0]) is int:
                    gone = gone_message(args[0], who)
                raise NoSuchProcessError(gone or f"cannot {doing}: it has exited") from err
            except psutil.AccessDenied as err:
                raise PermissionDeniedError(
                    f"cannot {what.format(*args)}: permission denied"
                ) from err

        return wrapper

    return decorate


# --- raw ptrace ------------------------------------------------------------------------------

# libc's ptrace() directly through ctypes. python-ptrace's ptrace.binding.func.ptrace wraps the
# very same libc call (it has no C extension here). Measured with timeit on this VM (kernel
# 6.18, PEEKUSER on a stopped tracee, best of 5): bare ctypes call 1.23 µs, _raw_ptrace 1.40
# µs, python-ptrace ptrace(..., check_errno=True) 1.49 µs, peekuser() with the errno decorator
# 1.68 µs. The syscall itself dominates; ctypes is the cheaper one by ~0.1 µs, and it raises
# OSError rather than PtraceError, so one translation path serves ptrace, perf and /proc.
_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_ulong, ctypes.c_ulong)
_ptrace.restype = ctypes.c_long
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _raw_ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    """One ptrace(2) call; raises OSError on failure. PEEK requests need errno reset first."""
    ctypes.set_errno(0)
    result: int = _ptrace(request, tid, addr, data)
    if result == -1:
        code = ctypes.get_errno()
        if code:
            raise OSError(code, os.strerror(code))
    return result


@_oserrors("attach to thread {0}", who="thread")
def seize(tid: int) -> None:
    """Seize one thread with :data:`TRACE_OPTIONS` (it keeps running).

    Raises NoSuchProcessError, PermissionDeniedError (already traced, or not allowed).
    """
    _raw_ptrace(PTRACE_SEIZE, tid, 0, TRACE_OPTIONS)


@_oserrors("interrupt thread {0}", who="thread")
def interrupt(tid: int) -> None:
    """Ask a seized thread to enter a ``PTRACE_EVENT_STOP``. Raises NoSuchProcessError."""
    _raw_ptrace(PTRACE_INTERRUPT, tid)


@_oserrors("keep thread {0} in its job-control stop", who="thread")
def listen(tid: int) -> None:
    """Leave a thread in its group-stop but let it be woken by SIGCONT (man ptrace).

    Raises NoSuchProcessError (also when the thread is not stopped), InvalidArgumentError
    (not a group-stop).
    """
    _raw_ptrace(PTRACE_LISTEN, tid)


@_oserrors("resume thread {0}", who="thread")
def cont(tid: int, sig: int = 0) -> None:
    """Resume a stopped thread, delivering ``sig`` (0: none). Raises NoSuchProcessError."""
    _raw_ptrace(PTRACE_CONT, tid, 0, sig)


@_oserrors("single-step thread {0}", who="thread")
def singlestep(tid: int, sig: int = 0) -> None:
    """Run one instruction of a stopped thread (then SIGTRAP, TRAP_TRACE). Raises ESRCH."""
    _raw_ptrace(PTRACE_SINGLESTEP, tid, 0, sig)


@_oserrors("detach from thread {0}", who="thread")
def detach(tid: int, sig: int = 0) -> None:
    """Detach a stopped thread, delivering ``sig``; closes a cached /proc/TID/mem fd.

    A SIGTRAP still *pending* on the thread is delivered after this and kills a program
    without a handler: see the module docstring for the safe order. Raises
    NoSuchProcessError (also when the thread is not stopped).
    """
    forget_memory(tid)
    _raw_ptrace(PTRACE_DETACH, tid, 0, sig)


class SigInfo(NamedTuple):
    """The fields of a ``siginfo_t`` the daemon uses (x86-64 layout, verified live).

    A named tuple: one is built at every stop, and that is 4x cheaper than a frozen
    dataclass of nine fields.

    ``pid``/``uid`` (kill-style union, offsets 16/20) and ``addr``/``perf_data``/``perf_type``
    (fault-style union, offsets 16/24/32) overlay the same bytes; which pair is meaningful
    depends on ``code``: TRAP_PERF → ``perf_data`` is the event's ``sig_data``.
    """

    signo: int
    code: int
    errno: int
    pid: int
    uid: int
    addr: int
    perf_data: int
    perf_type: int
    perf_flags: int


_SIGINFO_SIZE: Final = 128
_siginfo_buf = ctypes.create_string_buffer(_SIGINFO_SIZE)
# si_signo, si_errno, si_code, pad, then the union at 16: si_addr, _perf._data, _type, _flags
_SIGINFO_STRUCT: Final = struct.Struct("=iii4xQQII")


@_oserrors("read the signal that stopped thread {0}", who="thread")
def getsiginfo(tid: int) -> SigInfo:
    """The siginfo of the signal that stopped ``tid``. Raises NoSuchProcessError,
    InvalidArgumentError (the stop is not a signal stop)."""
    _raw_ptrace(PTRACE_GETSIGINFO, tid, 0, ctypes.addressof(_siginfo_buf))
    signo, err, code, addr, perf_data, perf_type, perf_flags = _SIGINFO_STRUCT.unpack_from(
        _siginfo_buf
    )
    pid, uid = addr & 0xFFFFFFFF, addr >> 32
    pid -= (pid & 0x80000000) << 1  # si_pid is a signed int
    return SigInfo(signo, code, err, pid, uid, addr, perf_data, perf_type, perf_flags)


_eventmsg = ctypes.c_ulong()


@_oserrors("read the ptrace event of thread {0}", who="thread")
def geteventmsg(tid: int) -> int:
    """The message of the last ptrace event (new tid for CLONE, exit status for EXIT,
    former tid for EXEC)."""
    _raw_ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(_eventmsg))
    return _eventmsg.value


_regs_buf = (ctypes.c_ulong * len(REGISTER_NAMES))()
_REGS_STRUCT: Final = struct.Struct(f"{len(REGISTER_NAMES)}Q")


@_oserrors("read the registers of thread {0}", who="thread")
def getregs(tid: int) -> dict[str, int]:
    """The general registers of a stopped thread by ``user_regs_struct`` name."""
    _raw_ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(_regs_buf))
    # struct.unpack is ~5x faster than iterating the ctypes array (measured: 1.9 vs 6.8 µs).
    return dict(zip(REGISTER_NAMES, _REGS_STRUCT.unpack(_regs_buf), strict=True))


@_oserrors("write the registers of thread {0}", who="thread")
def setregs(tid: int, regs: Mapping[str, int]) -> None:
    """Set the named registers of a stopped thread; the others keep their values.

    Raises InvalidArgumentError for an unknown name, a value out of range, or one the
    kernel refuses (e.g. a bad segment selector).
    """
    unknown = set(regs) - _REGISTER_INDEX.keys()
    if unknown:
        raise InvalidArgumentError(f"unknown register name(s): {', '.join(sorted(unknown))}")
    for name, value in regs.items():
        if not 0 <= value <= _U64:
            raise InvalidArgumentError(f"register {name} value {value} is not a u64")
    _raw_ptrace(PTRACE_GETREGS, tid, 0, ctypes.addressof(_regs_buf))
    for name, value in regs.items():
        _regs_buf[_REGISTER_INDEX[name]] = value
    _raw_ptrace(PTRACE_SETREGS, tid, 0, ctypes.addressof(_regs_buf))


@_oserrors("read offset {1} of struct user of thread {0}", who="thread")
def peekuser(tid: int, offset: int) -> int:
    """``PTRACE_PEEKUSER`` as an unsigned word. Raises DebugRegisterIOError (EIO)."""
    return _raw_ptrace(PTRACE_PEEKUSER, tid, offset) & _U64


@_oserrors("write offset {1} of struct user of thread {0}", who="thread")
def pokeuser(tid: int, offset: int, value: int) -> None:
    """``PTRACE_POKEUSER``. Raises DebugRegisterIOError (EIO), InvalidArgumentError,
    NoSpaceError - exactly the kernel's errno, for reference tests."""
    _raw_ptrace(PTRACE_POKEUSER, tid, offset, value & _U64)


# --- memory ----------------------------------------------------------------------------------

# /proc/PID/mem binds to the mm at open() time, so a cached fd must be dropped at exec (the
# new image has a new mm) and at detach; the engine calls forget_memory() on exec and exit.
_mem_fds: dict[int, int] = {}


class _IOVec(ctypes.Structure):
    _fields_ = (("base", ctypes.c_void_p), ("len", ctypes.c_size_t))


_process_vm_readv = _libc.process_vm_readv
_process_vm_writev = _libc.process_vm_writev
for _f in (_process_vm_readv, _process_vm_writev):
    _f.restype = ctypes.c_ssize_t
    _f.argtypes = (
        ctypes.c_int, ctypes.POINTER(_IOVec), ctypes.c_ulong,
        ctypes.POINTER(_IOVec), ctypes.c_ulong, ctypes.c_ulong,
    )  # fmt: skip


def _mem_fd(pid: int) -> int:
    """The cached /proc/PID/mem fd of ``pid``, or -1 if opening it is not allowed.

    Opening another user's /proc/PID/mem needs CAP_DAC_OVERRIDE besides the ptrace right,
    which the hardened systemd unit does not grant (measured); process_vm_readv/writev
    need only the ptrace right and are the fallback.
    """
    fd = _mem_fds.get(pid)
    if fd is None:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        except PermissionError:
            fd = -1
        _mem_fds[pid] = fd
    return fd


def _process_vm(call: Any, pid: int, addr: int, buf: ctypes.Array[ctypes.c_char]) -> int:
    local = _IOVec(ctypes.addressof(buf), len(buf))
    remote = _IOVec(addr, len(buf))
    done = int(call(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0))
    if done < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return done


def forget_memory(pid: int) -> None:
    """Close the cached /proc/PID/mem fd of ``pid`` (after exec, exit or detach)."""
    fd = _mem_fds.pop(pid, None)
    if fd is not None and fd >= 0:
        os.close(fd)


@_oserrors("read {2} bytes at {1:#x} of process {0}", who="process", memory=True)
def read_memory(pid: int, addr: int, size: int) -> bytes:
    """Read ``size`` bytes at ``addr`` of process ``pid`` (which must be traced by us).

    Raises InvalidArgumentError when (part of) the range is not mapped, NoSuchProcessError.
    """
    if addr < 0 or size < 0 or addr + size > _U64:
        raise InvalidArgumentError(f"bad memory range {addr:#x}+{size}")
    fd = _mem_fd(pid)
    if fd >= 0:
        data = os.pread(fd, size, addr)
    else:
        buf = ctypes.create_string_buffer(size)
        done = _process_vm(_process_vm_readv, pid, addr, buf) if size else 0
        data = buf.raw[:done]
    if len(data) != size:
        raise InvalidArgumentError(
            f"cannot read {size} bytes at {addr:#x} of process {pid}: only {len(data)} of "
            "them are mapped"
        )
    return data


@_oserrors("write memory at {1:#x} of process {0}", who="process", memory=True)
def write_memory(pid: int, addr: int, data: bytes) -> None:
    """Write ``data`` at ``addr`` of process ``pid``: through /proc/PID/mem even into
    read-only text, like POKEDATA; without access to it (see :func:`_mem_fd`) only into
    writable memory. Raises InvalidArgumentError when the range is not mapped (writable)."""
    if addr < 0 or addr + len(data) > _U64:
        raise InvalidArgumentError(f"bad memory range {addr:#x}+{len(data)}")
    fd = _mem_fd(pid)
    if fd >= 0:
        done = os.pwrite(fd, data, addr)
    elif data:
        done = _process_vm(
            _process_vm_writev, pid, addr, ctypes.create_string_buffer(data, len(data))
        )
    else:
        done = 0
    if done != len(data):
        raise InvalidArgumentError(
            f"cannot write {len(data)} bytes at {addr:#x} of process {pid}: only {done} of "
            "them are mapped (writable)"
        )


# --- waiting ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exited:
    code: int


@dataclass(frozen=True, slots=True)
class Killed:
    signal: int
    core: bool


@dataclass(frozen=True, slots=True)
class SignalStop:
    """Signal-delivery-stop: resume with ``cont(tid, signal)`` to deliver, 0 to suppress."""

    signal: int


@dataclass(frozen=True, slots=True)
class GroupStop:
    """A job-control stop of a seized thread (PTRACE_EVENT_STOP with a stop signal)."""

    signal: int


@dataclass(frozen=True, slots=True)
class EventStop:
    """A ptrace event stop; ``event`` is PTRACE_EVENT_CLONE/EXEC/EXIT/STOP.

    EVENT_STOP with SIGTRAP is an interrupt stop, or the first stop of a new clone child.
    """

    event: int
    signal: int


WaitEvent = Exited | Killed | SignalStop | GroupStop | EventStop

_STOP_SIGNALS: Final = frozenset({signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU})


def decode_status(status: int) -> WaitEvent:
    """Decode one wait status (man 2 ptrace, "Stopped states") into a WaitEvent."""
    if os.WIFEXITED(status):
        return Exited(os.WEXITSTATUS(status))
    if os.WIFSIGNALED(status):
        return Killed(os.WTERMSIG(status), os.WCOREDUMP(status))
    if os.WIFSTOPPED(status):
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if event == 0:
            return SignalStop(sig)
        if event == PTRACE_EVENT_STOP and sig in _STOP_SIGNALS:
            return GroupStop(sig)
        return EventStop(event, sig)
    raise InternalError(f"unexpected wait status {status:#x}")


def wait_all() -> list[tuple[int, int]]:
    """Reap every wait status ready now (``waitpid(-1, WNOHANG | __WALL)``), never blocking.

    Returns ``(tid, raw status)`` pairs in the kernel's order; decode with decode_status.
    """
    out: list[tuple[int, int]] = []
    while True:
        try:
            tid, status = os.waitpid(-1, os.WNOHANG | _WALL)
        except ChildProcessError:
            return out
        if tid == 0:
            return out
        out.append((tid, status))


def wait_for(tid: int, timeout: float) -> WaitEvent | None:
    """One status of one traced child (``waitpid(tid, WNOHANG | __WALL)``), waiting at most
    ``timeout`` seconds (0: just look); None if none came. For probes that trace a process
    of their own; the daemon's loop uses :func:`wait_all`. Raises NoSuchProcessError (not a
    child of this process).
    """
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        try:
            got, status = os.waitpid(tid, os.WNOHANG | _WALL)
        except ChildProcessError as err:
            raise NoSuchProcessError(f"process {tid} is not a child of this one") from err
        if got:
            return decode_status(status)
        if time.monotonic() >= deadline:
            return None
        time.sleep(delay)
        delay = min(delay * 2, 0.005)


class ChildSignals:
    """A signalfd for SIGCHLD: readable whenever a traced thread changed state.

    The tracer loop waits on it with epoll (trio's wait_readable) instead of a Python signal
    handler: no handler, no wake-up socket, no task switch between the signal and the
    waitpid that follows — this is on the path of every stop. SIGCHLD is blocked in the
    calling thread (the only thread of the daemon) so that it is only ever read from here.
    """

    _SFD_NONBLOCK = 0o4000
    _SFD_CLOEXEC = 0o2000000

    def __init__(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        mask = ctypes.create_string_buffer(128)  # sigset_t
        struct.pack_into("Q", mask, 0, 1 << (signal.SIGCHLD - 1))
        fd = _libc.signalfd(-1, mask, self._SFD_NONBLOCK | self._SFD_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            err = OSError(code, os.strerror(code))
            raise _translate_errno(err, "watch for SIGCHLD (signalfd)") from err
        self.fd: int = fd

    def fileno(self) -> int:
        return self.fd

    def drain(self) -> None:
        """Consume every queued SIGCHLD (they carry nothing waitpid does not tell)."""
        size = 128 * 16  # sixteen signalfd_siginfo records
        while True:
            try:
                if len(os.read(self.fd, size)) < size:
                    return  # a short read took everything that was queued
            except BlockingIOError:
                return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})


# --- /proc ----------------------------------------------------------------------------------
# Process identity, thread lists and credentials come from psutil, off the hot path (attach,
# authorization, a new thread). What psutil does not expose -- Tgid, TracerPid, SigPnd,
# CapEff of /proc/PID/status -- is read here by hand; SigPnd is read at every detach of a
# thread that may hold a SIGTRAP, where a psutil.Process would cost a second /proc read.


def _status_fields(path: str) -> dict[str, str]:
    with open(path) as f:
        text = f.read()
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    return fields


@_oserrors("list the threads of process {0}", who="process")
def threads_of(pid: int) -> list[int]:
    """The tids of process ``pid``, sorted. Raises NoSuchProcessError."""
    return sorted(thread.id for thread in psutil.Process(pid).threads())


@_oserrors("find the process of thread {0}", who="thread")
def tgid_of(tid: int) -> int:
    """The process (thread group) id of thread ``tid``. Raises NoSuchProcessError."""
    # psutil has no Tgid: psutil.Process(tid) of a non-leader thread acts as a process.
    return int(_status_fields(f"/proc/{tid}/status")["Tgid"])


@_oserrors("read the start time of process {0}", who="process")
def start_time(pid: int) -> float:
    """When ``pid`` started (psutil's ``create_time``, seconds since the epoch, derived
    from /proc/PID/stat field 22): with the pid, it identifies a process across pid reuse.
    Raises NoSuchProcessError."""
    return float(psutil.Process(pid).create_time())


@_oserrors("read the name of process {0}", who="process")
def process_name(pid: int) -> str:
    """The name of process ``pid`` (its ``comm``). Raises NoSuchProcessError."""
    return str(psutil.Process(pid).name())


@_oserrors("read the capabilities of process {0}", who="process")
def effective_caps(pid: int) -> int:
    """The effective capability set of ``pid`` (CapEff), bit ``cap`` per capability.
    Raises NoSuchProcessError."""
    return int(_status_fields(f"/proc/{pid}/status")["CapEff"], 16)


@_oserrors("find the tracer of thread {0}", who="thread")
def tracer_of(pid: int) -> int:
    """The pid of the process tracing ``pid`` (0 if none). Raises NoSuchProcessError."""
    return int(_status_fields(f"/proc/{pid}/status")["TracerPid"])


@_oserrors("read the pending signals of thread {0}", who="thread")
def pending_signals(tid: int) -> int:
    """Mask of signals pending on thread ``tid`` itself (SigPnd), bit ``sig - 1`` per signal.

    Only the thread's own queue: a perf SIGTRAP is always sent to the thread that hit
    (send_sig_perf), while a process-wide one (ShdPnd, e.g. ``kill -TRAP``) is not the
    daemon's and must reach the program. Raises NoSuchProcessError."""
    fields = _status_fields(f"/proc/{tid}/status")
    return int(fields["SigPnd"], 16)


@_oserrors("send signal {2} to thread {1}", who="thread")
def send_signal(pid: int, tid: int, sig: int) -> None:
    """tgkill(2): queue ``sig`` for thread ``tid`` of ``pid``. A debugger's signal for a
    thread in a ptrace-stop other than a signal-delivery-stop goes this way: restarting
    such a stop with a signal does nothing (ptrace(2), "signal injection"). Raises
    NoSuchProcessError."""
    # Not os.kill (the process: any thread may take it) nor signal.pthread_kill (needs a
    # pthread_t of this process): tgkill, by number.
    args = (ctypes.c_int(pid), ctypes.c_int(tid), ctypes.c_int(sig))
    if _syscall(ctypes.c_long(SYS_tgkill), *args) < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True, slots=True)
class ProcCreds:
    """Credentials of a process, as the kernel's ptrace access check uses them."""

    ruid: int
    euid: int
    suid: int
    rgid: int
    egid: int
    sgid: int
    dumpable: bool


@_oserrors("read the credentials of process {0}", who="process")
def proc_creds(pid: int) -> ProcCreds:
    """Real/effective/saved uid and gid of ``pid`` and whether it is dumpable.

    Dumpability is not in /proc/PID/status and prctl(PR_GET_DUMPABLE) only answers for the
    caller, so it is read from the owner of /proc/PID/stat: the kernel's
    ``task_dump_owner()`` makes a task's /proc files owned by its euid/egid only when
    ``get_dumpable() == SUID_DUMP_USER``, else by root. (The /proc/PID *directory* always
    shows the euid/egid, so it cannot tell.) For a target whose euid is 0 the answer is
    ambiguous and reported as dumpable; the ptrace rule lets only root act on it anyway.
    Raises NoSuchProcessError.
    """
    process = psutil.Process(pid)
    with process.oneshot():  # one read of /proc/PID/status for both
        ruid, euid, suid = process.uids()
        rgid, egid, sgid = process.gids()
    st = os.stat(f"/proc/{pid}/stat")
    dumpable = (st.st_uid, st.st_gid) == (euid, egid)
    return ProcCreds(ruid, euid, suid, rgid, egid, sgid, dumpable)


# --- perf breakpoint events ------------------------------------------------------------------


def _perf_attr(
    addr: int,
    length: int,
    access: Access,
    mode: Mode,
    sig_data: int,
    wakeup: int,
    filtered: bool = False,
) -> ctypes.Array[ctypes.c_char]:
    flags = _ATTR_EXCLUDE_KERNEL | _ATTR_EXCLUDE_HV | _ATTR_REMOVE_ON_EXEC
    sample_type = wakeup_events = 0
    # A BPF program runs only when the event overflows (bpf_overflow_handler, called from
    # __perf_event_overflow): a filtered counting event samples every hit, with nowhere to
    # write the sample (its program returns 0 anyway: it only counts).
    sample_period = 1 if filtered else 0
    if mode is Mode.NOTIFY:
        sample_period, wakeup_events = 1, wakeup
        sample_type = PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_TIME
        # Sample times on CLOCK_MONOTONIC, the clock of stop events and of clients.
        flags |= _ATTR_USE_CLOCKID
    elif mode is Mode.STOP:
        sample_period = 1
        flags |= _ATTR_SIGTRAP
    # The kernel wants bp_len == sizeof(long) for execute breakpoints (it programs LEN=00,
    # arch_build_bp_info in arch/x86/kernel/hw_breakpoint.c); our API says length 1.
    bp_len = 8 if access is Access.EXECUTE else length
    attr = ctypes.create_string_buffer(_ATTR_SIZE)
    struct.pack_into("IIQQQQQ", attr, 0, PERF_TYPE_BREAKPOINT, _ATTR_SIZE, 0,
                     sample_period, sample_type, 0, flags)  # fmt: skip
    struct.pack_into("IIQQ", attr, 48, wakeup_events, _BP_TYPE[access], addr, bp_len)
    struct.pack_into("i", attr, 92, _CLOCK_MONOTONIC)  # clockid, read with use_clockid
    struct.pack_into("Q", attr, 120, sig_data & _U64)
    return attr


class BreakpointEvent:
    """One physical slot: a perf breakpoint event on one thread, owned by the daemon.

    Opening it arms the breakpoint; :meth:`close` (or the daemon's death) disarms it. Every
    event counts hits (:meth:`read_count`); NOTIFY events also keep a sample ring
    (:meth:`drain`); STOP events make the hitting thread take a SIGTRAP (TRAP_PERF,
    ``si_perf_data == sig_data``). Not thread-safe; call from the tracer thread.
    """

    def __init__(
        self,
        tid: int,
        addr: int,
        length: int,
        access: Access,
        mode: Mode,
        sig_data: int,
        *,
        wakeup: int = 1,
        ring_pages: int = RING_DATA_PAGES,
        bpf: BpfFilter | None = None,
    ) -> None:
        """Open (arm) the event. ``wakeup``: NOTIFY samples per poll wake-up.

        ``ring_pages``: NOTIFY ring data pages wanted (a power of two); when the kernel
        refuses that much locked memory the ring is halved down to :data:`RING_DATA_PAGES`
        (``self.ring_pages`` says what it got).

        ``bpf``: a filter program attached before the event is enabled (the event is opened
        disabled, so no hit escapes the program); its counters then hold the true hits of
        each condition while :meth:`read_count` still counts every hit. The event owns it
        from here on: it is closed with the event, or at once if the open fails.

        ``wakeup = 1`` wakes the poller at every sample; the daemon still drains in batches,
        since everything that accumulated while it was busy is read at once. A larger value
        batches wake-ups but delays a lone hit until ``wakeup`` more arrive.

        Raises NoSpaceError (the thread's four slots are taken), InvalidArgumentError
        (address/length/alignment the kernel refuses), NoSuchProcessError,
        PermissionDeniedError.
        """
        self.tid = tid
        self.addr = addr
        self.length = length
        self.access = access
        self.mode = mode
        self.sig_data = sig_data
        self.lost = 0  # total of losses reported: LOST records and settle()'s
        self.sampled = 0  # total of samples returned by drain()
        self.throttled = 0
        self.ring_pages = 0
        self._ring: mmap.mmap | None = None
        self._presumed = 0  # losses settle() reported that no LOST record has matched yet
        self._settle_count = -1
        what = f"set a {length}-byte {access.value} breakpoint at {addr:#x} on thread {tid}"
        attr = _perf_attr(addr, length, access, mode, sig_data, max(1, wakeup), bpf is not None)
        if bpf is not None:
            struct.pack_into("Q", attr, 40, struct.unpack_from("Q", attr, 40)[0] | _ATTR_DISABLED)
        fd = _syscall(
            ctypes.c_long(SYS_perf_event_open),
            attr,
            ctypes.c_int(tid),
            ctypes.c_int(-1),
            ctypes.c_int(-1),
            ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
        )
        if fd < 0:
            code = ctypes.get_errno()
            err = OSError(code, os.strerror(code))
            if bpf is not None:
                bpf.close()
            raise _translate_errno(err, what, who=("thread", tid)) from err
        self.fd: int = fd
        self.bpf = bpf
        if mode is Mode.NOTIFY:
            pages = max(RING_DATA_PAGES, ring_pages)
            while True:
                try:
                    self._ring = mmap.mmap(fd, (1 + pages) * PAGE_SIZE)
                    break
                except OSError as err:
                    if err.errno in (errno.EPERM, errno.ENOMEM) and pages > RING_DATA_PAGES:
                        pages //= 2
                        continue
                    self.close()
                    raise _translate_errno(
                        err, f"{what} (its sample ring could not be mapped)"
                    ) from err
            self.ring_pages = pages
        if bpf is not None:
            try:
                fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, bpf.prog_fd)
                fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
            except OSError as err:
                self.close()
                raise _translate_errno(
                    err, f"{what} (its condition program could not be attached)"
                ) from err

    def fileno(self) -> int:
        return self.fd

    @_oserrors("read the hit counter of a breakpoint")
    def read_count(self) -> int:
        """The absolute hit counter of this event."""
        data = os.read(self.fd, 8)
        return int.from_bytes(data, "little")

    def drain(self) -> tuple[list[tuple[int, ...]], int]:
        """NOTIFY only: take every sample out of the ring.

        Returns ``([(tid, ip, time_ns), ...], lost)`` where ``lost`` counts samples the
        kernel dropped because the ring was full (PERF_RECORD_LOST). The kernel writes that
        record only once there is room again *and* another sample comes (perf_output_begin,
        kernel/events/ring_buffer.c): losses of a thread that filled the ring and then exited
        are never reported by a record; :meth:`unaccounted` finds them from the counter.
        THROTTLE records (the kernel's sample-rate limit) are counted in ``self.throttled``.
        """
        ring = self._ring
        if ring is None:
            raise InvalidArgumentError("drain() needs a notify-mode event")
        # struct perf_event_mmap_page: data_head at 1024, data_tail at 1032. x86 is TSO,
        # so reading head before the data needs no explicit barrier (perf_event.h's
        # "rmb() after reading data_head" is a compiler barrier there).
        head, tail = struct.unpack_from("QQ", ring, 1024)
        size = self.ring_pages * PAGE_SIZE
        samples: list[tuple[int, ...]] = []
        lost = 0
        while tail < head:
            off = PAGE_SIZE + tail % size
            rtype, _misc, rsize = struct.unpack_from("IHH", ring, off)
            if off + rsize <= PAGE_SIZE + size:
                rec = ring[off : off + rsize]
            else:  # the record wraps around the end of the ring
                first = PAGE_SIZE + size - off
                rec = ring[off : off + first] + ring[PAGE_SIZE : PAGE_SIZE + rsize - first]
            if rtype == PERF_RECORD_SAMPLE:
                ip, _pid, tid, time = struct.unpack_from("QIIQ", rec, 8)
                samples.append((tid, ip, time))
            elif rtype == PERF_RECORD_LOST:
                # Losses settle() already reported are not reported twice.
                n = struct.unpack_from("Q", rec, 16)[0]
                absorbed = min(n, self._presumed)
                self._presumed -= absorbed
                lost += n - absorbed
            elif rtype == PERF_RECORD_THROTTLE:
                self.throttled += 1
            if rsize == 0:  # never expected; do not spin on a corrupt ring
                tail = head
                break
            tail += rsize
        struct.pack_into("Q", ring, 1032, tail)
        self.lost += lost
        self.sampled += len(samples)
        return samples, lost

    def unaccounted(self) -> int:
        """NOTIFY: hits counted but neither returned as samples nor reported lost yet.

        Exact once the thread cannot hit any more (it exited, or is stopped) and the ring
        was drained; while it runs, samples still being written make it transiently > 0.
        """
        return self.read_count() - self.sampled - self.lost

    def settle(self) -> int:
        """NOTIFY, right after :meth:`drain`: losses no LOST record will report soon.

        The kernel writes a LOST record only when the next sample comes, so a thread that
        overflowed the ring and then stopped hitting would hide its losses until it hits
        again. Called periodically: when the counter has not moved since the previous call,
        every sample has been written, and whatever is neither sampled nor reported is
        lost; it is returned (and added to ``self.lost``). A LOST record that comes later
        for the same samples is not counted again.
        """
        count = self.read_count()
        quiet = count == self._settle_count
        self._settle_count = count
        missing = count - self.sampled - self.lost
        if not quiet or missing <= 0:
            return 0
        self._presumed += missing
        self.lost += missing
        return missing

    def close(self) -> None:
        """Disarm: unmap the ring, close the fd and the filter. Idempotent."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.bpf is not None:
            self.bpf.close()

    def __repr__(self) -> str:
        return (
            f"<BreakpointEvent fd={self.fd} tid={self.tid} {self.addr:#x}/{self.length}"
            f"/{self.access.value} {self.mode.wire}>"
        )


# --- BPF filters on breakpoint events --------------------------------------------------------
#
# The program is generated by hwbkptd/_bpf.py (pure); here it is loaded (bpf(2)
# BPF_PROG_LOAD, type BPF_PROG_TYPE_PERF_EVENT) with its map (BPF_MAP_CREATE, one
# BPF_MAP_TYPE_ARRAY entry) and attached to an event (PERF_EVENT_IOC_SET_BPF, in
# BreakpointEvent). Offsets of union bpf_attr are those of include/uapi/linux/bpf.h.

SYS_bpf: Final = 321  # x86-64
BPF_MAP_CREATE: Final = 0
BPF_MAP_LOOKUP_ELEM: Final = 1
BPF_MAP_UPDATE_ELEM: Final = 2
BPF_PROG_LOAD: Final = 5
BPF_MAP_TYPE_ARRAY: Final = 2
BPF_MAP_TYPE_RINGBUF: Final = 27
# The ring of hit records of a filtered notify slot (Documentation/bpf/ringbuf.rst): a power
# of two of pages; 4 MiB hold 74,898 records of 48 bytes plus their 8-byte headers, 0.44 s
# of a thread hitting at full speed (as the perf rings, _tracer.NOTIFY_RING_KIB: 256 KiB
# lost hits at full speed). Charged to the memory cgroup, not to RLIMIT_MEMLOCK.
BPF_RING_BYTES: Final = 1 << 22
_RINGBUF_BUSY: Final = 1 << 31
_RINGBUF_DISCARD: Final = 1 << 30
_HIT_CHUNK: Final = struct.Struct(f"II{RECORD_SIZE // 8}Q")  # header + one hit record
BPF_PROG_TYPE_PERF_EVENT: Final = 7
PERF_EVENT_IOC_ENABLE: Final = 0x2400  # _IO('$', 0)
PERF_EVENT_IOC_SET_BPF: Final = 0x40042408  # _IOW('$', 8, __u32)
_BPF_ATTR_SIZE: Final = 128
# bpf_probe_read_user is a GPL-only helper (kernel/trace/bpf_trace.c): the program must say
# its license is GPL-compatible or the verifier refuses the call.
_LICENSE: Final = ctypes.create_string_buffer(b"GPL")
_VERIFIER_LOG_SIZE: Final = 1 << 16


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    result: int = _syscall(
        ctypes.c_long(SYS_bpf), ctypes.c_int(cmd), attr, ctypes.c_uint(_BPF_ATTR_SIZE)
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


class BpfFilter:
    """A loaded condition program and its map; attach it with ``BreakpointEvent(bpf=...)``.

    One per breakpoint event (the map's counters are that event's), which then owns it.
    """

    def __init__(self, program: Program, init: Mapping[int, int]) -> None:
        """Create the map (and the record ring if the program writes records), store
        ``init`` (word index → value), load the program.

        Raises PermissionDeniedError (BPF not permitted: no CAP_BPF/CAP_PERFMON, lockdown),
        InvalidArgumentError (the verifier refused the program: its log is in the message),
        InternalError (no BPF in this kernel).
        """
        self.value_size = program.value_size
        self.map_fd = -1
        self.prog_fd = -1
        self.ring_fd = -1
        self.dropped_seen = 0  # records lost for want of room, as last reported
        self._consumer: mmap.mmap | None = None
        self._producer: mmap.mmap | None = None
        try:
            if program.ring_fd_at:
                self._create_ring()
            self._create_map()
            words = [0] * (self.value_size // 8)
            for index, value in init.items():
                words[index] = value & _U64
            self.write(words)
            self._load(program)
        except BaseException:
            self.close()
            raise

    def _create_map(self) -> None:
        attr = ctypes.create_string_buffer(_BPF_ATTR_SIZE)
        struct.pack_into("IIII", attr, 0, BPF_MAP_TYPE_ARRAY, 4, self.value_size, 1)
        struct.pack_into("16s", attr, 28, b"hwbkpt_cond")
        try:
            self.map_fd = _bpf(BPF_MAP_CREATE, attr, "bpf(MAP_CREATE)")
        except OSError as err:
            raise _translate_errno(err, "bpf(MAP_CREATE) for a condition") from err

    def _create_ring(self) -> None:
        attr = ctypes.create_string_buffer(_BPF_ATTR_SIZE)
        struct.pack_into("IIII", attr, 0, BPF_MAP_TYPE_RINGBUF, 0, 0, BPF_RING_BYTES)
        struct.pack_into("16s", attr, 28, b"hwbkpt_hits")
        try:
            self.ring_fd = _bpf(BPF_MAP_CREATE, attr, "bpf(MAP_CREATE)")
            # The consumer page is ours to write; the producer page and the data (mapped
            # twice in a row, so a record that wraps reads contiguously) are read-only.
            self._consumer = mmap.mmap(self.ring_fd, PAGE_SIZE)
            self._producer = mmap.mmap(
                self.ring_fd,
                PAGE_SIZE + 2 * BPF_RING_BYTES,
                prot=mmap.PROT_READ,
                offset=PAGE_SIZE,
            )
        except OSError as err:
            raise _translate_errno(err, "bpf(MAP_CREATE) of a hit ring") from err

    def hit_records(self) -> list[tuple[int, ...]]:
        """Take every committed hit record out of the ring, oldest first, as the six u64
        words of hwbkptd/_bpf.py's RECORD_FIELDS.

        Every record the program writes has the same size, and the data pages are mapped
        twice in a row, so the committed ones are one contiguous run of fixed-size chunks
        (8-byte header, then the record): one ``iter_unpack`` instead of a slice each.
        """
        consumer, producer = self._consumer, self._producer
        if consumer is None or producer is None:
            return []
        cons = struct.unpack_from("Q", consumer, 0)[0]
        prod = struct.unpack_from("Q", producer, 0)[0]
        if cons >= prod:
            return []
        off = PAGE_SIZE + (cons & (BPF_RING_BYTES - 1))
        chunk = _HIT_CHUNK.size
        out: list[tuple[int, ...]] = []
        for header, _pg_off, *words in _HIT_CHUNK.iter_unpack(producer[off : off + prod - cons]):
            if header & _RINGBUF_BUSY or header & ~_RINGBUF_DISCARD != RECORD_SIZE:
                break  # still being written (or not a hit record): take it next time
            cons += chunk
            if not header & _RINGBUF_DISCARD:
                out.append(tuple(words))
        struct.pack_into("Q", consumer, 0, cons)
        return out

    def _load(self, program: Program) -> None:
        code = program.encode(self.map_fd, self.ring_fd)
        insns = ctypes.create_string_buffer(code, len(code))
        log = ctypes.create_string_buffer(_VERIFIER_LOG_SIZE)
        attr = ctypes.create_string_buffer(_BPF_ATTR_SIZE)
        struct.pack_into(
            "IIQQIIQ",
            attr,
            0,
            BPF_PROG_TYPE_PERF_EVENT,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(_LICENSE),
            0,
            0,
            0,
        )
        struct.pack_into("16s", attr, 48, b"hwbkpt_cond")
        try:
            self.prog_fd = _bpf(BPF_PROG_LOAD, attr, "bpf(PROG_LOAD)")
            return
        except OSError as err:
            if err.errno != errno.EACCES and err.errno != errno.EINVAL:
                raise _translate_errno(err, "bpf(PROG_LOAD) of a condition") from err
        # Load again with the verifier's log, to say why (only on failure: logging is slow).
        struct.pack_into("IIQ", attr, 24, 1, _VERIFIER_LOG_SIZE, ctypes.addressof(log))
        try:
            self.prog_fd = _bpf(BPF_PROG_LOAD, attr, "bpf(PROG_LOAD)")
        except OSError as err:
            text = log.value.decode(errors="replace").strip().splitlines()[-3:]
            raise InvalidArgumentError(
                f"the kernel's verifier refused a condition program ({os.strerror(err.errno or 0)}"
                f"): {' | '.join(text)}"
            ) from err

    def _elem(self, cmd: int, buf: ctypes.Array[ctypes.c_char], what: str) -> None:
        key = ctypes.c_uint32(0)
        attr = ctypes.create_string_buffer(_BPF_ATTR_SIZE)
        struct.pack_into("IIQQQ", attr, 0, self.map_fd, 0, ctypes.addressof(key),
                         ctypes.addressof(buf), 0)  # fmt: skip
        try:
            _bpf(cmd, attr, what)
        except OSError as err:
            raise _translate_errno(err, what) from err

    def words(self) -> tuple[int, ...]:
        """The map's value now, as u64 words (layout: hwbkptd/_bpf.py)."""
        buf = ctypes.create_string_buffer(self.value_size)
        self._elem(BPF_MAP_LOOKUP_ELEM, buf, "bpf(MAP_LOOKUP_ELEM)")
        return struct.unpack(f"{self.value_size // 8}Q", buf.raw)

    def write(self, words: list[int]) -> None:
        """Replace the map's value (``value_size // 8`` words)."""
        buf = ctypes.create_string_buffer(struct.pack(f"{len(words)}Q", *words), self.value_size)
        self._elem(BPF_MAP_UPDATE_ELEM, buf, "bpf(MAP_UPDATE_ELEM)")

    def close(self) -> None:
        """Close the program and map fds (the kernel frees them with the last user). Idempotent."""
        for ring in (self._consumer, self._producer):
            if ring is not None:
                ring.close()
        self._consumer = self._producer = None
        for name in ("prog_fd", "map_fd", "ring_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def bpf_available() -> str | None:
    """Why condition programs cannot be used here, or ``None`` if they can.

    Loads the smallest program the daemon generates (an unconditional filter) and attaches
    it to nothing: enough to learn whether bpf(2) exists and is permitted (lockdown,
    CAP_BPF/CAP_PERFMON, kernel.unprivileged_bpf_disabled) and the helpers are there.
    """
    from hwbkptd._bpf import generate  # pure; imported here to keep the probe self-contained

    try:
        BpfFilter(generate(0x1000, 8, (), True), {}).close()
    except HwbkptError as err:
        return err.message
    return None


# --- uprobe events -----------------------------------------------------------------------
#
# A uprobe is the kernel's own software breakpoint: perf_event_open with the `uprobe` PMU
# (its type in /sys/bus/event_source/devices/uprobe/type; config1 = pointer to the path of
# the mapped file, config2 = the offset in that file; Documentation/trace/uprobetracer.rst,
# perf_uprobe_init in kernel/trace/trace_event_perf.c). The kernel writes an int3 into the
# process's private copy of the page and single-steps (or emulates) the original
# instruction out of line at every hit (handle_swbp, kernel/events/uprobes.c). Measured here
# (hwbkptd/_platform.py, probe_uprobes): a stop-mode event's SIGTRAP arrives only *after*
# the probed instruction ran, because uprobe_deny_signal holds back every signal raised
# while the out-of-line step is pending. The only way round it (a BPF program that moves
# the saved ip so that handle_swbp skips the step, "bpf: Allow uprobe program to change
# context registers", 6.18-era) needs a verifier that lets a BPF_PROG_TYPE_KPROBE program
# write its pt_regs context: :func:`uprobe_regs_writable` asks this kernel.

UPROBE_PMU: Final = "/sys/bus/event_source/devices/uprobe/type"
BPF_PROG_TYPE_KPROBE: Final = 2
_PT_REGS_IP: Final = 16 * 8  # struct pt_regs (arch/x86/include/asm/ptrace.h): ip is word 16


def code_location(pid: int, addr: int) -> tuple[str, int] | None:
    """Where the code at ``addr`` of process ``pid`` comes from: ``(path, file offset)``,
    or ``None`` when the address is not in a file mapping (anonymous memory, JIT code, the
    heap, the stack, the vDSO).

    The path is ``/proc/PID/map_files/START-END``: the kernel resolves it to the mapped
    file itself, even one deleted or in another mount namespace, where the name shown in
    ``/proc/PID/maps`` would not (or would name another file). Raises NoSuchProcessError.
    """
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= addr < end:
                    name = fields[5].strip() if len(fields) > 5 else ""
                    if not name.startswith("/") or fields[4] == "0":  # no inode: anonymous
                        return None
                    offset = int(fields[2], 16) + addr - start
                    return f"/proc/{pid}/map_files/{start:x}-{end:x}", offset
    except OSError as err:
        what = f"read the memory map of process {pid}"
        raise _translate_errno(err, what, who=("process", pid)) from err
    return None


class UprobeEvent:
    """A stop-mode uprobe on one thread: every execution of the instruction at ``offset`` of
    ``path`` (see :func:`code_location`) makes the thread take a SIGTRAP (TRAP_PERF,
    ``si_perf_data == sig_data``) once the kernel has stepped the instruction. Closing it
    (or the daemon's death) removes the probe; so does an exec (``remove_on_exec``)."""

    def __init__(self, tid: int, path: str, offset: int, sig_data: int) -> None:
        """Open (arm) the probe. Raises InvalidArgumentError (no uprobe PMU, an offset that
        is not an instruction the kernel can probe), NoSuchProcessError,
        PermissionDeniedError."""
        what = f"set a uprobe at offset {offset:#x} of {path} on thread {tid}"
        try:
            with open(UPROBE_PMU) as f:
                pmu = int(f.read())
        except (OSError, ValueError) as err:
            raise InvalidArgumentError(f"cannot {what}: this kernel has no uprobe PMU") from err
        self._path = ctypes.create_string_buffer(path.encode())  # read at open only
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        flags = _ATTR_EXCLUDE_HV | _ATTR_REMOVE_ON_EXEC | _ATTR_SIGTRAP
        struct.pack_into("IIQQQQQ", attr, 0, pmu, _ATTR_SIZE, 0, 1, 0, 0, flags)
        struct.pack_into("QQ", attr, 56, ctypes.addressof(self._path), offset)
        struct.pack_into("Q", attr, 120, sig_data & _U64)
        fd = _syscall(
            ctypes.c_long(SYS_perf_event_open),
            attr,
            ctypes.c_int(tid),
            ctypes.c_int(-1),
            ctypes.c_int(-1),
            ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC),
        )
        if fd < 0:
            code = ctypes.get_errno()
            failure = OSError(code, os.strerror(code))
            raise _translate_errno(failure, what, who=("thread", tid)) from failure
        self.fd: int = fd
        self.tid = tid

    @_oserrors("read the hit counter of a uprobe")
    def read_count(self) -> int:
        """Executions of the probed instruction so far."""
        return int.from_bytes(os.read(self.fd, 8), "little")

    def close(self) -> None:
        """Remove the probe. Idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def uprobe_regs_writable() -> str | None:
    """``None`` if this kernel's verifier lets a uprobe program (BPF_PROG_TYPE_KPROBE)
    write its ``pt_regs`` context, else why not (the verifier's words).

    The program tried is the smallest that would move a stopped thread's ip:
    ``ctx->ip = 0; return 0``. Loading is enough to ask: the verifier checks context writes
    at load (kprobe_prog_is_valid_access, kernel/trace/bpf_trace.c), the attach only checks
    that such a program goes on a uprobe. Raises PermissionDeniedError (no BPF here).
    """
    from hwbkptd._bpf import R0, R1, R2, Insn  # pure; as in bpf_available

    code = [
        Insn(0xB7, R2),  # r2 = 0
        Insn(0x7B, R1, R2, _PT_REGS_IP),  # *(u64 *)(r1 + ip) = r2
        Insn(0xB7, R0),  # r0 = 0
        Insn(0x95),  # exit
    ]
    raw = b"".join(insn.encode() for insn in code)
    insns = ctypes.create_string_buffer(raw, len(raw))
    log = ctypes.create_string_buffer(_VERIFIER_LOG_SIZE)
    attr = ctypes.create_string_buffer(_BPF_ATTR_SIZE)
    struct.pack_into("IIQQIIQ", attr, 0, BPF_PROG_TYPE_KPROBE, len(code),
                     ctypes.addressof(insns), ctypes.addressof(_LICENSE), 1,
                     _VERIFIER_LOG_SIZE, ctypes.addressof(log))  # fmt: skip
    try:
        os.close(_bpf(BPF_PROG_LOAD, attr, "bpf(PROG_LOAD)"))
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EINVAL):
            raise _translate_errno(err, "load a uprobe program") from err
        text = log.value.decode(errors="replace").strip().splitlines()
        return text[-2] if len(text) >= 2 else os.strerror(err.errno or 0)
    return None
