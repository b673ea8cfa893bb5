"""What a debugger learns of the program's life beyond registers and memory: the signals
it receives, its exec, its threads coming and going, its shared libraries. A mixin of
:class:`._session.GdbSession`.

* **Signals.** The session asks the daemon for the program's signals (``signals``), minus
  those gdb passes silently (``QPassSignals``); each comes as a stop reply with gdb's number
  for it. At the next resume ``C``/``vCont;C`` with that signal passes it, ``c`` discards
  it, another signal replaces it; the daemon delivers it unless every debugger told of it
  discarded it (proto/PROTOCOL.md, ``signals``).
* **Exec.** The daemon keeps the session attached through an exec and holds the new
  program for it; the stop reply says ``exec:PATH`` when gdb asked for exec events, and gdb
  loads the new program as native gdb does ("process N is executing new program").
* **Threads.** The daemon tells an attached client of each thread created or ended
  (``thread`` events). When gdb asked for them (``QThreadEvents:1``; ``:0`` stops them; gdb
  13 asks only in non-stop mode), a new thread is a stop reply ``T05create:;...thread:T;``
  for the new thread and an exited one ``wXX;T`` (XX its exit status), as gdbserver sends
  them (gdbserver/remote-utils.cc, prepare_resume_reply). All-stop: each is reported like
  any stop, with every thread (the new one included) held for the debugger until its next
  resume. Otherwise nothing changes: gdb learns of threads at stops (``qXfer:threads``).
* **Libraries.** ``qXfer:libraries-svr4:read`` walks the dynamic linker's list in the
  server (:mod:`._svr4`), so gdb needs no ``m`` packet per link map field.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from hwbkpt._blocking import Client
from hwbkpt._events import Event
from hwbkpt._gdbserver import _svr4
from hwbkpt._gdbserver._packets import (
    ALL_THREADS,
    PacketError,
    hex_int,
    host_signal,
    parse_signal_list,
)
from hwbkpt_proto import HwbkptError

if TYPE_CHECKING:
    from hwbkpt._gdbserver._session import _Point, _Stop

__all__ = ["ProgramPackets"]

log = logging.getLogger(__name__)

_SIGTRAP = 5  # gdb's number for SIGTRAP: the signal of a "create" stop, as gdbserver's
_GDB_UNKNOWN = 143  # GDB_SIGNAL_UNKNOWN: what a signal without a gdb number is reported as


class ProgramPackets:
    """Signals, exec and libraries for :class:`._session.GdbSession` (its state)."""

    client: Client
    pid: int
    running: bool
    exited: str | None
    exec_events: bool
    last_stop: _Stop
    held: set[int]
    regs: dict[int, Mapping[str, int]]
    memory: dict[bytes, bytes]  # m replies of this stop, by packet
    pending: list[_Stop]
    points: dict[tuple[int, int, int], _Point]
    by_watch: dict[int, _Point]
    _mem_fd: int | None
    # Per thread: the signal it stopped with for this debugger (host, gdb's number), until
    # the debugger resumes it and says what becomes of it.
    told: dict[int, tuple[int, int]]
    thread_events = False  # report thread create/exit (the debugger sent QThreadEvents:1)
    libraries: dict[bytes, bytes]  # the last qXfer:libraries-svr4 document, by annex
    _read: Callable[[int, int], bytes]
    _drop_points: Callable[[], None]
    _tid: Callable[[int], str]
    _resume: Callable[[list[tuple[str, int, int | None]]], bytes | None]

    if TYPE_CHECKING:

        @staticmethod
        def _open_mem(pid: int) -> int | None: ...

    # -- signals --------------------------------------------------------------------------

    def _signal_for(self, tid: int, number: int | None) -> int | None:
        """What resuming ``tid`` says of its signal: None (nothing to say: it stopped with
        none for this debugger and gets none), 0 (discard the one it was told of: ``c``),
        or the host signal to deliver (``C``: the same one passes it)."""
        told = self.told.pop(tid, None)
        if number is None:
            return 0 if told is not None else None
        if told is not None and number == told[1]:
            return told[0]  # passed back as reported, even as GDB_SIGNAL_UNKNOWN
        return host_signal(number) or None

    def _on_continue_signal(self, data: bytes) -> bytes | None:
        """``Csig[;addr]`` / ``Ssig[;addr]``: continue (or step the current thread) with a
        signal. Raises PacketError for a signal gdb has no host number for."""
        number = self._packet_signal(data[1:].partition(b";")[0])
        tid = self.last_stop.tid
        if data[:1] == b"S":
            return self._resume([("s", tid, number), ("c", ALL_THREADS, None)])
        return self._resume([("c", tid, number), ("c", ALL_THREADS, None)])

    def _packet_signal(self, text: bytes) -> int:
        """gdb's signal number in a ``C``/``S`` action. Raises PacketError unless it is a
        byte that names a host signal (or GDB_SIGNAL_UNKNOWN, which passes back a signal
        reported as such)."""
        number = hex_int(text, "signal number")
        if number != _GDB_UNKNOWN and host_signal(number) is None:
            raise PacketError(f"signal {number:#x} has no number on this host")
        return number

    def _on_signal_list(self, data: bytes) -> bytes:
        """``QPassSignals:`` and ``QProgramSignals:``. Raises PacketError for garbage."""
        name, _, rest = data.partition(b":")
        signals = parse_signal_list(rest)
        if name == b"QPassSignals":
            # Passed signals are not even reported to this debugger: the daemon lets them
            # through without holding the thread for it.
            self.client.signals(self.pid, passed=signals)
        # QProgramSignals: what the program may get when gdb says nothing: every signal
        # gets through here unless a debugger discards it, so only the syntax is checked.
        return b"OK"

    # -- exec -----------------------------------------------------------------------------

    def _on_exec(self) -> None:
        """The program called exec: every thread but the one that did is gone, with every
        watch (ended by the daemon); this debugger stays attached and is told next with a
        ``stop`` of reason "exec" (a stop reply with ``exec:`` when gdb asked for
        ``exec-events``; gdb then loads the new program, as native gdb does)."""
        self.held.clear()
        self.regs.clear()
        self.memory.clear()
        self.told.clear()
        self.pending.clear()
        # gdb forgets its insertions at an exec (they were in the old program) and inserts
        # them afresh: the old ones must not be counted as inserted still.
        self._drop_points()
        # /proc/PID/mem opened before the exec reads the old program's memory.
        if self._mem_fd is not None:
            os.close(self._mem_fd)
        self._mem_fd = self._open_mem(self.pid)

    def _exec_reasons(self) -> list[tuple[str, str]]:
        """``exec:HEXPATH`` for a debugger that asked for exec events, else nothing (the
        stop is then a plain SIGTRAP stop in the new program, not an end)."""
        if not self.exec_events:
            return []
        try:
            path = os.readlink(f"/proc/{self.pid}/exe")
        except OSError:
            return []
        return [("exec", path.encode().hex())]

    # -- threads -------------------------------------------------------------------------

    def _on_thread_events(self, data: bytes) -> bytes:
        """``QThreadEvents:1`` / ``QThreadEvents:0``: report thread creation and exit, or
        stop doing so. Raises PacketError for any other argument (E01; gdbserver answers
        an error too, server.cc handle_general_set)."""
        arg = data.partition(b":")[2]
        if arg not in (b"0", b"1"):
            raise PacketError(f"QThreadEvents takes 0 or 1, not {arg[:20]!r}")
        self.thread_events = arg == b"1"
        # The daemon holds each new thread for us from its first stop, so that the thread a
        # "create" reply names has run nothing and is still there when gdb looks at it (as
        # with gdbserver, whose new threads start stopped: ptrace's auto-attach).
        self.client.attach(self.pid, hold_threads=self.thread_events)
        return b"OK"

    def _on_thread(self, event: Event) -> None:
        """A ``thread`` event: forget an ended thread; queue a create/exit report when the
        debugger asked for them (sent by the session as any stop: all threads held)."""
        # At runtime only: _session imports this module.
        from hwbkpt._gdbserver._session import _Stop

        tid = int(event.tid)
        state = event.get("state")
        if state == "exit":
            # Not held any more (it is gone): never resumed nor listed again.
            self.held.discard(tid)
            self.regs.pop(tid, None)
            self.told.pop(tid, None)
            self.pending = [s for s in self.pending if s.tid != tid or s.thread_event]
        if state == "new" and tid in self.held and not self.thread_events:
            # Held for us (QThreadEvents:1) but reports were switched off meanwhile.
            if not self.running:
                return  # it runs at the next resume, with the others
            self.held.discard(tid)
            self.regs.pop(tid, None)
            self.client.resume(tid, wait=False)
            return
        if not self.thread_events or state not in ("new", "exit"):
            return
        if state == "new":
            self.pending.append(_Stop(tid, _SIGTRAP, [("create", "")], thread_event="create"))
        else:
            code = int(event.get("code") or 0) & 0xFF
            self.pending.append(_Stop(tid, code, thread_event="exit"))

    def _exits_before_end(self) -> bool:
        """Once the process is gone (``exited``): whether a thread exit is still to be
        reported before its end. The daemon tells each thread's exit before the process's
        (threads end before the leader in an exit_group), and gdbserver reports them in
        that order; every other pending stop is moot now and dropped."""
        self.pending = [s for s in self.pending if s.thread_event == "exit"]
        return bool(self.pending)

    def _thread_exit_reply(self, stop: _Stop) -> bytes:
        """``wXX;THREAD``: thread ``stop.tid`` exited with status XX (remote-utils.cc)."""
        return f"w{stop.signal:x};{self._tid(stop.tid)}".encode()

    # -- libraries ------------------------------------------------------------------------

    def _auxv(self) -> bytes:
        with open(f"/proc/{self.pid}/auxv", "rb") as f:
            return f.read()

    def _libraries(self, annex: bytes, offset: int) -> bytes:
        """The SVR4 library list (``_svr4``), built at the first window of a read and kept
        for the following ones while nothing runs. Raises PacketError for a static program
        (gdb then reads the link map itself) or a malformed annex."""
        cached = self.libraries.get(annex)
        if cached is not None and offset and not self.running:
            return cached
        try:
            data = _svr4.library_list(self._read, self._auxv(), annex, hidden=self._vdso())
        except (_svr4.NoDynamicSection, ValueError, struct.error) as err:
            raise PacketError(f"no SVR4 library list: {err}") from None
        self.libraries = {annex: data}
        return data

    def _on_shlib_info_addr(self) -> bytes:
        """``qShlibInfoAddr`` (lldb): where the address of ``struct r_debug`` is stored
        (``_svr4.r_debug_location``), hex; E01 for a static program."""
        try:
            addr = _svr4.r_debug_location(self._read, self._auxv())
        except (_svr4.NoDynamicSection, struct.error, OSError, HwbkptError) as err:
            log.info("qShlibInfoAddr: %s", err)
            return b"E01"
        return f"{addr:x}".encode()

    def _vdso(self) -> tuple[int, int]:
        """The vDSO's mapping (``[vdso]`` in /proc/PID/maps), or (0, 0)."""
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                for line in f:
                    if line.rstrip().endswith("[vdso]"):
                        lo, _, hi = line.split()[0].partition("-")
                        return int(lo, 16), int(hi, 16)
        except OSError:
            pass
        return 0, 0
