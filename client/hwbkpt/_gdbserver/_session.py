"""One debugger's RSP session on one process, served through the daemon.

Theory of operation:

* The session is one daemon client (:class:`hwbkpt.Client`). It ``attach``-es to the
  process, so the daemon keeps it while the debugger is there, with or without watches.
* **All-stop for this debugger.** When one of its watches or breakpoints stops a thread,
  or the debugger sends 0x03, the session asks the daemon to ``hold_all`` threads for it
  and waits for each one's ``stop`` before it answers; only then does the debugger get its
  stop reply. ``vCont`` releases its holds (``resume``) or steps one thread (``step``).
  Threads run when no client holds them (the daemon's hold rule), so another debugger's
  all-stop is never undone by this one, and the other debuggers never see this one's stops.
* A second stop that happens while the first is being reported (two threads hitting a
  watch together) is kept and reported at the next ``vCont`` instead of resuming, as
  gdbserver does with its pending statuses.
* Breakpoints and watchpoints (``Z``) are ``stop``-mode watches of the whole process:
  ``Z2``/``Z4`` a region split the gdb way, all pieces or ``E01``; ``Z1`` and ``Z0`` a
  hardware execute slot, so that ``break`` never writes an ``int3`` into code the other
  debuggers and the program share. (Not a uprobe: a uprobe stops the thread only after the
  probed instruction has run, and this kernel's verifier refuses the BPF program that
  could move it back, HACKING.md; gdb needs it stopped at the address.) A ``Z0``/``Z1``
  that gets no slot is ``E01`` plus a line on stderr naming the slots and who holds them
  (``_noslot.py``): gdb's own message for it is "Cannot access memory".
  ``Z3`` gets the empty reply: x86 has no read-only watchpoints, and gdb then emulates
  ``rwatch`` with an access watchpoint, exactly as native gdb does
  (``x86_insert_watchpoint`` refuses ``hw_read``).
* Signals, exec, thread create/exit (``QThreadEvents``) and shared libraries:
  :mod:`._program`.
* ``D`` and ``k`` both mean "this debugger leaves": its watches go, its holds are released
  (``detach``), the process runs on for the others. Nothing is ever killed.

Dispatch is a table keyed by the packet's first byte (pyOCD's ``gdbserver.py``); queries
(``q``/``Q``/``v``) by name.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from hwbkpt._blocking import Client
from hwbkpt._events import Event
from hwbkpt._gdbserver import _regs
from hwbkpt._gdbserver._codec import Ack, Codec, Dropped, Interrupt, Nak, Packet
from hwbkpt._gdbserver._noslot import no_slot_message
from hwbkpt._gdbserver._packets import (
    ALL_THREADS,
    ANY_THREAD,
    PacketError,
    gdb_signal,
    hex_int,
    parse_thread,
    split_args,
    xfer_window,
)
from hwbkpt._gdbserver._program import ProgramPackets
from hwbkpt_proto import HwbkptError, InvalidArgumentError, NoSuchProcessError

__all__ = ["PACKET_SIZE", "GdbSession"]

log = logging.getLogger(__name__)

#: The PacketSize announced in qSupported (the codec accepts a little more).
PACKET_SIZE = 0x4000
#: How long the session waits for the threads of one ``hold_all`` to stop.
HOLD_TIMEOUT = 10.0
# How long a session whose process ended under a request waits for the exit event that
# carries its status (it follows at once: the daemon reaps the process, then tells).
GONE_WAIT = 2.0
_MAX_MEMORY = 0x10000  # bytes per m/M/X (gdb asks for at most PacketSize / 2)
_PAGE = 4096
_SIGTRAP = 5
_SIGINT = 2


_Z_ACCESS = {0: "x", 1: "x", 2: "w", 4: "rw"}
#: The registers every stop reply carries, as (gdb's regnum, the daemon's name).
_EXPEDITED = tuple((n, _regs.REGISTERS[n].daemon or "") for n in (6, 7, 16))
_Z_REASON = {0: "swbreak", 1: "hwbreak", 2: "watch", 4: "awatch"}


@dataclass
class _Point:
    """One ``Z`` the debugger inserted: its daemon watches, and how often it was inserted."""

    kind: int
    addr: int
    ids: list[int]
    pieces: dict[int, int] = field(default_factory=dict)  # watch id -> piece address
    refs: int = 1


@dataclass
class _Stop:
    """A stop to report: the thread, gdb's signal number, and ``reason:value`` pairs."""

    tid: int
    signal: int
    reasons: list[tuple[str, str]] = field(default_factory=list)
    regs: Mapping[str, int] | None = None
    # A thread event (QThreadEvents, _program): the thread was created (reason "create")
    # or exited (then ``signal`` is its exit status and the reply a ``w``).
    thread_event: str | None = None


class GdbSession(ProgramPackets):
    """Serves one debugger on process ``pid`` through ``client``.

    ``write`` is called with the bytes to send to the debugger. Feed what the debugger
    sends to :meth:`receive_data`; call :meth:`pump_events` whenever the daemon's socket
    (``client.fileno()``) is readable. :attr:`finished` turns true when the debugger has
    left or the process is gone and reported.

    Raises what :meth:`hwbkpt.Client.attach` raises when the process cannot be attached
    (``NoSuchProcessError``, ``PermissionDeniedError``, ``BusyError``).
    """

    def __init__(self, client: Client, pid: int, write: Callable[[bytes], None]) -> None:
        self.client = client
        self.pid = pid
        self._write = write
        self.codec = Codec(max_packet=PACKET_SIZE + 0x400)
        self._debug = log.isEnabledFor(logging.DEBUG)  # asked once, not twice per packet
        self.finished = False
        self._last_sent = b""
        self._last_packet = b""
        self._unacked = False  # a reply sent in ack mode and not acknowledged yet
        self.held: set[int] = set()
        self.running = False
        self.exited: str | None = None  # the W/X reply once the process is gone
        self.pending: list[_Stop] = []
        # Registers of each held thread: the stop event's own (read-only, decoded lazily:
        # most stops need only the three the stop reply expedites), a dict once written.
        self.regs: dict[int, Mapping[str, int]] = {}
        # Replies to the m packets of one stop, by packet (gdb reads a watched value three
        # times per stop, the same packet each time); emptied whenever a thread may run or
        # memory is written.
        self.memory: dict[bytes, bytes] = {}
        self.libraries: dict[bytes, bytes] = {}
        self.points: dict[tuple[int, int, int], _Point] = {}
        self.by_watch: dict[int, _Point] = {}
        self.g_thread = pid
        self.multiprocess = False  # thread ids as pPID.TID (the debugger asked for it)
        self.exec_events = False  # exec stops as "exec:" replies (the debugger asked)
        self.last_stop = _Stop(pid, _SIGTRAP)
        self.told: dict[int, tuple[int, int]] = {}  # see _program.ProgramPackets
        self._task_dir = f"/proc/{pid}/task"
        client.attach(pid)
        client.signals(pid)
        self._mem_fd = self._open_mem(pid)
        self._hold_all()
        self._handlers: dict[int, Callable[[bytes], bytes | None]] = {
            ord("?"): self._on_status,
            ord("q"): self._on_query,
            ord("Q"): self._on_set,
            ord("v"): self._on_v,
            ord("H"): self._on_h,
            ord("T"): self._on_thread_alive,
            ord("g"): self._on_g,
            ord("G"): self._on_big_g,
            ord("p"): self._on_p,
            ord("P"): self._on_big_p,
            ord("m"): self._on_m,
            ord("M"): self._on_big_m,
            ord("X"): self._on_big_x,
            ord("c"): lambda _: self._resume([("c", ALL_THREADS, None)]),
            ord("s"): lambda _: self._resume(
                [("s", self.g_thread, None), ("c", ALL_THREADS, None)]
            ),
            ord("C"): self._on_continue_signal,
            ord("S"): self._on_continue_signal,
            ord("Z"): self._on_insert,
            ord("z"): self._on_remove,
            ord("D"): self._on_detach,
            ord("k"): self._on_kill,
        }

    # -- bytes in and out -----------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Handle bytes from the debugger (an empty ``data`` means it went away)."""
        if not data:
            self.leave()
            return
        self.codec.receive_data(data)
        while not self.finished:
            event = self.codec.next_event()
            if isinstance(event, Packet):
                if self._unacked and event.data == self._last_packet and self.codec.ack_mode:
                    # In ack mode gdb acks each reply before it sends its next packet, so
                    # the same packet again while our reply is unacked is gdb resending
                    # it after its ack timeout (remotetimeout, 2 s: a server starting
                    # slowly on a busy machine); answering it twice would make every
                    # later reply the answer to the packet before.
                    log.info("ignored a retransmission of %r", event.data[:40])
                    continue
                self._last_packet = event.data
                self._packet(event.data)
            elif isinstance(event, Interrupt):
                self._interrupt()
            elif isinstance(event, Nak):
                if self._last_sent:
                    self._write(self._last_sent)
            elif isinstance(event, Dropped):
                log.warning("dropped a packet from the debugger: %s", event.reason)
                self._flush()
            elif isinstance(event, Ack):
                self._unacked = False
                continue
            else:
                break
        self._flush()

    def _flush(self) -> None:
        acks = self.codec.data_to_send()
        if acks:
            self._write(acks)

    def _send(self, payload: bytes) -> None:
        if self._debug:
            log.debug("-> %r", payload[:200])
        wire = self.codec.send(payload)
        self._last_sent = wire.lstrip(b"+-")
        self._unacked = self.codec.ack_mode
        self._write(wire)

    def _packet(self, data: bytes) -> None:
        if self._debug:
            log.debug("<- %r", data[:200])
        handler = self._handlers.get(data[0]) if data else None
        if handler is None:
            self._send(b"")
            return
        try:
            reply = handler(data)
        except PacketError as err:
            log.info("bad packet %r: %s", data[:40], err)
            reply = b"E01"
        except HwbkptError as err:
            log.info("packet %r: the daemon said %s", data[:40], err)
            reply = b"E01"
        except OSError as err:  # /proc of a process that just ended, and the like
            log.info("packet %r: %s", data[:40], err)
            reply = b"E01"
        if reply is not None:
            self._send(reply)

    # -- daemon events --------------------------------------------------------------------

    def pump_events(self, wait: float = 0.0, *, readable: bool = False) -> None:
        """Handle every event the daemon has sent. ``wait`` > 0 reads the daemon's socket
        (waiting up to that long); 0 takes only the events already received, without a
        system call. ``readable`` says the caller's ``poll`` found the socket readable:
        it is read at once, without polling it again (once per stop)."""
        if readable:
            self.client.read_ready()
            wait = 0.0
        event = self.client.next_event(timeout=wait)
        while event is not None and not self.finished:
            self._on_event(event)
            if self.running:
                self._report_if_stopped()
            event = self.client.next_event(timeout=0)

    def _on_event(self, event: Event) -> None:
        """Sort one event: stops to report go to :attr:`pending`; holds are recorded."""
        if event.kind == "stop" and event.get("pid") == self.pid:
            tid = int(event.tid)
            self.held.add(tid)
            self.regs[tid] = event.regs
            stop = self._stop_of(event)
            if stop is not None:
                self.pending.append(stop)
        elif event.kind == "exit" and event.get("pid") == self.pid:
            code, sig = event.get("code"), event.get("signal")
            self.exited = f"X{gdb_signal(sig):02x}" if sig else f"W{(code or 0) & 0xFF:02x}"
            self.held.clear()
        elif event.kind == "exec" and event.get("pid") == self.pid:
            self._on_exec()
        elif event.kind == "thread" and event.get("pid") == self.pid:
            self._on_thread(event)
        elif event.kind in ("error", "lost", "disconnected"):
            log.warning("daemon: %s %s", event.kind, event.fields)

    def _stop_of(self, event: Event) -> _Stop | None:
        """The stop reply for a ``stop`` event, or None for an interrupt or a stale hit."""
        reason = event.get("reason")
        if reason in ("interrupt", "thread"):
            return None  # "thread": a new thread held for us; reported from its thread event
        if reason == "exec":
            return _Stop(int(event.tid), _SIGTRAP, self._exec_reasons(), dict(event.regs))
        if reason == "signal":
            host = int(event.get("signal") or 0)
            number = gdb_signal(host)
            self.told[int(event.tid)] = (host, number)
            return _Stop(int(event.tid), number, [], dict(event.regs))
        reasons: list[tuple[str, str]] = []
        for wid in event.get("watches") or []:
            point = self.by_watch.get(wid)
            if point is None:
                continue
            name = _Z_REASON[point.kind]
            value = f"{point.pieces[wid]:x}" if point.kind in (2, 4) else ""
            reasons.append((name, value))
            break
        if reason == "watch" and not reasons:
            return None  # its watch was removed meanwhile: nothing to tell the debugger
        return _Stop(int(event.tid), _SIGTRAP, reasons, event.regs)

    def _report_if_stopped(self) -> None:
        """While the debugger waits: report the process's end, or a stop after holding all."""
        if self.exited is not None and not self._exits_before_end():
            self.running = False
            self._send(self._exit_reply())
            return
        if not self.pending:
            return
        self._hold_all()
        if self.exited is not None and not self._exits_before_end():
            self.running = False
            self._send(self._exit_reply())
            return
        self._report(self.pending.pop(0))

    def _report(self, stop: _Stop) -> None:
        self.running = False
        self.last_stop = stop
        self.g_thread = stop.tid
        self._send(self._stop_reply(stop))

    def _stop_reply(self, stop: _Stop) -> bytes:
        if stop.thread_event == "exit":
            return self._thread_exit_reply(stop)
        parts = [f"T{stop.signal:02x}"]
        regs = stop.regs or self.regs.get(stop.tid)
        if regs:
            # Expedite rbp, rsp, rip (regnums 6, 7, 16) so gdb needs no 'g' for a frame.
            parts.extend(
                f"{regnum:02x}:{regs[name].to_bytes(8, 'little').hex()};"
                for regnum, name in _EXPEDITED
            )
        parts.append(f"thread:{self._tid(stop.tid)};")
        parts.extend(f"{name}:{value};" for name, value in stop.reasons)
        return "".join(parts).encode()

    def _hold_all(self) -> None:
        """Hold every thread for this debugger; returns once each has stopped (or gone)."""
        if self.held and self._all_held():
            return
        try:
            waiting = set(self.client.hold_all(self.pid))
        except NoSuchProcessError:
            self._await_exit()
            return
        deadline = time.monotonic() + HOLD_TIMEOUT
        next_check = time.monotonic() + 0.2
        while waiting - self.held and self.exited is None:
            event = self.client.next_event(timeout=0.2)
            if event is not None:
                self._on_event(event)
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 0.2
                # A thread that exits before it stops sends no stop (PROTOCOL.md hold_all).
                waiting = {t for t in waiting if os.path.exists(f"/proc/{self.pid}/task/{t}")}
            if now > deadline:
                log.warning("threads %s did not stop in time", sorted(waiting - self.held))
                break

    def _all_held(self) -> bool:
        """Whether every thread of the process is held for this debugger already (then no
        thread runs, so none can be created meanwhile: the answer cannot go stale).

        Asked at every stop, so it costs one ``stat``: the link count of /proc/PID/task is
        2 + the number of threads (``proc_task_getattr`` adds ``get_nr_threads``,
        fs/proc/base.c), the same threads its listing shows, zombies included. A thread
        held here is in a ptrace-stop and leaves it only when this debugger resumes it or
        the whole process dies, so as many threads as held ones means these are all."""
        try:
            links = os.stat(self._task_dir).st_nlink
        except OSError:
            return False
        return links - 2 <= len(self.held)

    # -- resuming -------------------------------------------------------------------------

    def _resume(self, actions: list[tuple[str, int, int | None]]) -> bytes | None:
        """Apply ``vCont`` actions (verb, thread, gdb's signal number or None); the stop
        reply follows later (returns no reply)."""
        if self.exited is not None and not self._exits_before_end():
            return self._exit_reply()
        self.pending = [s for s in self.pending if s.tid in self.held or s.thread_event]
        if self.pending:
            if self.pending[0].thread_event and self.exited is None:
                self._hold_all()  # all-stop: a thread created meanwhile is held too
            self._report(self.pending.pop(0))  # report before anything runs (gdbserver)
            return None
        self.running = True
        self.memory.clear()
        for tid in sorted(self.held):
            # The first action that names the thread applies (gdb's manual, vCont).
            verb, number = next(
                ((a, n) for a, t, n in actions if t in (tid, ALL_THREADS, ANY_THREAD)),
                ("t", None),
            )
            if verb == "t":
                continue
            self.held.discard(tid)
            self.regs.pop(tid, None)
            sig = self._signal_for(tid, number)
            try:
                # No answer awaited (a failure comes back as an "error" event, logged):
                # one round trip less per stop.
                if verb == "s":
                    self.client.step(tid, wait=False, signal=sig)
                else:
                    self.client.resume(tid, wait=False, signal=sig)
            except HwbkptError as err:
                log.info("resuming thread %d: %s", tid, err)
        return None

    def _interrupt(self) -> None:
        if not self.running:
            return
        self._hold_all()
        if self.exited is not None:
            self._report_if_stopped()
            return
        if self.pending:
            self._report(self.pending.pop(0))
            return
        tid = self.pid if self.pid in self.held else min(self.held, default=self.pid)
        self._report(_Stop(tid, _SIGINT))

    def process_gone(self, err: HwbkptError) -> None:
        """The daemon said the process has exited while this session was busy with it
        (``err``). Its ``exit`` event, with the real status, follows: wait for it a
        little, then tell the debugger if it is waiting for a stop."""
        log.info("the process has gone: %s", err)
        self._await_exit()
        if self.running:
            self._report_if_stopped()

    def _await_exit(self) -> None:
        """Set :attr:`exited` from the process's ``exit`` event, which follows when the
        daemon has said it is gone (W00 if it does not come within ``GONE_WAIT``)."""
        deadline = time.monotonic() + GONE_WAIT
        while self.exited is None and time.monotonic() < deadline:
            event = self.client.next_event(timeout=0.1)
            if event is not None:
                self._on_event(event)
        self.exited = self.exited or "W00"
        self.held.clear()

    def _drop_points(self) -> None:
        """Remove every breakpoint and watchpoint this debugger inserted (best effort: a
        point of a process that has gone is gone with it)."""
        for point in list(self.points.values()):
            for wid in point.ids:
                try:
                    self.client.call("unwatch", id=wid)
                except HwbkptError:
                    pass
        self.points.clear()
        self.by_watch.clear()

    def leave(self) -> None:
        """The debugger is gone or left: drop its watches and holds, and finish."""
        if self.finished:
            return
        self.finished = True
        self._drop_points()
        try:
            self.client.detach(self.pid)
        except HwbkptError:
            pass
        self.held.clear()
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    # -- packets --------------------------------------------------------------------------

    def _tid(self, tid: int) -> str:
        """A thread-id as the debugger wants it."""
        return f"p{self.pid:x}.{tid:x}" if self.multiprocess else f"{tid:x}"

    def _exit_reply(self) -> bytes:
        assert self.exited is not None
        suffix = f";process:{self.pid:x}" if self.multiprocess else ""
        return (self.exited + suffix).encode()

    def _on_status(self, _: bytes) -> bytes:
        if self.exited is not None:
            return self._exit_reply()
        return self._stop_reply(self.last_stop)

    def _on_query(self, data: bytes) -> bytes:
        name, _, rest = data.partition(b":")
        if name == b"qSupported":
            features = rest.split(b";")
            self.multiprocess = b"multiprocess+" in features
            self.exec_events = b"exec-events+" in features
            return (
                f"PacketSize={PACKET_SIZE:x};QStartNoAckMode+;qXfer:features:read+;"
                + ("multiprocess+;" if self.multiprocess else "")
                + ("exec-events+;" if self.exec_events else "")
                + "qXfer:threads:read+;qXfer:exec-file:read+;qXfer:auxv:read+;"
                "qXfer:libraries-svr4:read+;swbreak+;"
                "hwbreak+;vContSupported+;QThreadEvents+;QPassSignals+"
            ).encode()
        if name == b"qShlibInfoAddr":
            return self._on_shlib_info_addr()
        if name == b"qAttached":
            return b"1"
        if name == b"qC":
            return f"QC{self._tid(self.g_thread)}".encode()
        if name == b"qfThreadInfo":
            return b"m" + ",".join(self._tid(t) for t in self._threads()).encode()
        if name == b"qsThreadInfo":
            return b"l"
        if name == b"qSymbol":
            return b"OK"
        if name == b"qXfer":
            return self._on_xfer(rest)
        return b""

    def _on_xfer(self, rest: bytes) -> bytes:
        obj, op, annex, window = [*rest.split(b":"), b"", b"", b"", b""][:4]
        if op != b"read":
            return b""
        offset, length = (hex_int(x) for x in split_args(window, 2, "qXfer"))
        if obj == b"features" and annex == b"target.xml":
            data = _regs.TARGET_XML
        elif obj == b"threads":
            data = self._threads_xml()
        elif obj == b"exec-file":
            data = os.readlink(f"/proc/{self.pid}/exe").encode()
        elif obj == b"auxv":
            data = self._auxv()
        elif obj == b"libraries-svr4":
            data = self._libraries(annex, offset)
        else:
            return b""
        return xfer_window(data, offset, length)

    def _threads(self) -> list[int]:
        """Threads in the debugger's view: those held for it, the main thread first."""
        threads = sorted(self.held) or [self.pid]
        return sorted(threads, key=lambda t: (t != self.pid, t))

    def _threads_xml(self) -> bytes:
        items = []
        for tid in self._threads():
            try:
                with open(f"/proc/{self.pid}/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                name = ""
            name = name.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
            items.append(f'<thread id="{self._tid(tid)}" name="{name}"/>')
        return f'<?xml version="1.0"?><threads>{"".join(items)}</threads>'.encode()

    def _on_set(self, data: bytes) -> bytes | None:
        if data == b"QStartNoAckMode":
            self._send(b"OK")
            self.codec.start_no_ack()
            return None
        if data.startswith((b"QPassSignals:", b"QProgramSignals:")):
            return self._on_signal_list(data)
        if data.startswith(b"QThreadEvents:"):
            return self._on_thread_events(data)
        return b""

    def _on_v(self, data: bytes) -> bytes | None:
        if data == b"vCont?":
            return b"vCont;c;C;s;S;t"
        if data.startswith(b"vCont;"):
            actions = []
            for item in data[6:].split(b";"):
                verb, _, thread = item.partition(b":")
                if not verb or verb[:1] not in b"cCsSt":
                    raise PacketError(f"bad vCont action {item[:20]!r}")
                # C/S carry gdb's number of the signal to deliver (see _signal_for).
                number = self._packet_signal(verb[1:]) if verb[:1] in b"CS" else None
                if verb[:1] in b"cst" and len(verb) > 1:
                    raise PacketError(f"bad vCont action {item[:20]!r}")
                actions.append((verb[:1].lower().decode(), parse_thread(thread) if thread
                                else ALL_THREADS, number))
            # Its reply is the process's end when that is known already, else a later stop.
            return self._resume(actions)
        if data.startswith(b"vKill"):
            self.leave()
            return b"OK"
        return b""

    def _on_h(self, data: bytes) -> bytes:
        tid = parse_thread(data[2:])
        if data[1:2] == b"g" and tid not in (ALL_THREADS, ANY_THREAD):
            self.g_thread = tid
        return b"OK"

    def _on_thread_alive(self, data: bytes) -> bytes:
        tid = parse_thread(data[1:])
        return b"OK" if os.path.exists(f"/proc/{self.pid}/task/{tid}") else b"E01"

    def _thread_regs(self) -> Mapping[str, int]:
        tid = self.g_thread
        if tid not in self.regs:
            self.regs[tid] = self.client.get_regs(tid)
        return self.regs[tid]

    def _on_g(self, _: bytes) -> bytes:
        return _regs.pack_all(self._thread_regs())

    def _on_big_g(self, data: bytes) -> bytes:
        text, pos, changes = data[1:], 0, {}
        if len(text) != 2 * sum(reg.size for reg in _regs.REGISTERS):
            # All registers or none: a short G would set some and leave the rest to chance.
            raise PacketError(f"G with {len(text)} hex digits, not the register file's size")
        for reg in _regs.REGISTERS:
            chunk = text[pos : pos + reg.size * 2]
            pos += reg.size * 2
            value = _regs.unpack(reg, chunk)
            if reg.daemon is not None and value is not None:
                changes[reg.daemon] = value
        return self._set_regs(changes)

    def _on_p(self, data: bytes) -> bytes:
        regnum = hex_int(data[1:], "register number")
        if regnum >= len(_regs.REGISTERS):
            return b"E01"
        return _regs.pack_one(_regs.REGISTERS[regnum], self._thread_regs())

    def _on_big_p(self, data: bytes) -> bytes:
        number, _, text = data[1:].partition(b"=")
        regnum = hex_int(number, "register number")
        if regnum >= len(_regs.REGISTERS):
            return b"E01"
        reg = _regs.REGISTERS[regnum]
        value = _regs.unpack(reg, text)
        if reg.daemon is None or value is None:
            return b"E01"
        return self._set_regs({reg.daemon: value})

    def _set_regs(self, changes: dict[str, int]) -> bytes:
        current = self._thread_regs()
        changes = {k: v for k, v in changes.items() if current.get(k) != v}
        if changes:
            self.client.set_regs(self.g_thread, changes)
            self.regs[self.g_thread] = {**current, **changes}
        return b"OK"

    def _address(self, text: bytes) -> tuple[int, int]:
        addr, length = (hex_int(x) for x in split_args(text, 2, "address,length"))
        if length > _MAX_MEMORY:
            raise PacketError(f"at most {_MAX_MEMORY:#x} bytes at a time")
        return addr, length

    @staticmethod
    def _open_mem(pid: int) -> int | None:
        """/proc/PID/mem for reading, if this user may (proc(5): ptrace access mode
        ATTACH, the same rule the daemon applies); None sends every read to the daemon."""
        try:
            return os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None

    def _read(self, addr: int, length: int) -> bytes:
        """``length`` bytes at ``addr``: from /proc/PID/mem when it was opened (a system
        call instead of a round trip to the daemon at every stop), else from the daemon.
        Raises InvalidArgumentError (not mapped) and what ``read_memory`` raises."""
        if self._mem_fd is not None and addr + length <= 1 << 63:
            try:
                got = os.pread(self._mem_fd, length, addr)
            except OSError:
                got = b""
            if len(got) == length:
                return got
        return self.client.read_memory(self.pid, addr, length)

    def _on_m(self, data: bytes) -> bytes:
        cached = self.memory.get(data)
        if cached is not None and not self.running:
            return cached
        addr, length = self._address(data[1:])
        try:
            reply = self._read(addr, length).hex().encode()
        except InvalidArgumentError:
            pass
        else:
            if not self.running and len(self.memory) < 256:
                self.memory[data] = reply
            return reply
        # Part of the range is not mapped: answer what can be read up to there, as
        # gdbserver does (gdb reads across the end of a mapping when it scans).
        got = b""
        while len(got) < length:
            here = addr + len(got)
            size = min(length - len(got), _PAGE - here % _PAGE)
            try:
                got += self.client.read_memory(self.pid, here, size)
            except InvalidArgumentError:
                break
        return got.hex().encode() if got else b"E01"

    def _on_big_m(self, data: bytes) -> bytes:
        where, _, text = data[1:].partition(b":")
        addr, length = self._address(where)
        try:
            payload = bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise PacketError("bad hex data") from None
        if len(payload) != length:
            raise PacketError("length does not match the data")
        if payload:
            self.memory.clear()
            self.client.write_memory(self.pid, addr, payload)
        return b"OK"

    def _on_big_x(self, data: bytes) -> bytes:
        where, sep, payload = data[1:].partition(b":")
        if not sep:
            raise PacketError("X without data")
        addr, length = self._address(where)
        if len(payload) != length:
            raise PacketError("length does not match the data")
        if payload:
            self.memory.clear()
            self.client.write_memory(self.pid, addr, payload)
        return b"OK"

    def _z_args(self, data: bytes) -> tuple[int, int, int]:
        head = data[1:].split(b";")[0]  # conditions and commands (";X...") are not served
        kind, addr, size = split_args(head, 3, "Z")
        return hex_int(kind), hex_int(addr), hex_int(size)

    def _on_insert(self, data: bytes) -> bytes:
        kind, addr, size = self._z_args(data)
        if kind not in _Z_ACCESS:
            return b""  # Z3: no read-only watchpoints on x86 (see the module docstring)
        key = (kind, addr, size)
        point = self.points.get(key)
        if point is not None:
            point.refs += 1
            return b"OK"
        try:
            point = self._watch(kind, addr, size)
        except HwbkptError as err:
            # NoSpaceError above all: gdb says "Could not insert hardware watchpoint".
            log.info("Z%d at %#x: %s", kind, addr, err)
            return b"E01"
        if point is None:
            return b"E01"
        self.points[key] = point
        for wid in point.ids:
            self.by_watch[wid] = point
        return b"OK"

    def _watch(self, kind: int, addr: int, size: int) -> _Point | None:
        if kind in (0, 1):
            watch = self.client.watch(self.pid, addr, 1, access="x", mode="stop")
            if watch.state != "installed":
                self._say_no_slot(watch.threads, f"breakpoint at {addr:#x}")
                watch.remove()
                return None
            return _Point(kind, addr, [watch.id], {watch.id: addr})
        if not 1 <= size <= PACKET_SIZE:
            raise PacketError(f"watchpoint of {size} bytes")
        watches = self.client.watch_region(
            self.pid, addr, size, access=_Z_ACCESS[kind], mode="stop"
        )
        return _Point(kind, addr, [w.id for w in watches], {w.id: w.addr for w in watches})

    def _say_no_slot(self, threads: dict[int, str], what: str) -> None:
        """Tell the user, on stderr (gdb shows it), why ``what`` got no slot: gdb itself
        can only say "Cannot access memory" (hwbkpt/_gdbserver/_noslot.py)."""
        try:
            status = self.client.call("status")
        except HwbkptError as err:  # the refusal stands; the explanation is a bonus
            log.warning("%s not inserted: no hardware slot free (%s)", what, err)
            return
        log.warning("%s", no_slot_message(status, self.pid, threads, what, os.getpid()))

    def _on_remove(self, data: bytes) -> bytes:
        kind, addr, size = self._z_args(data)
        if kind not in _Z_ACCESS:
            return b""
        point = self.points.get((kind, addr, size))
        if point is None:
            return b"OK"
        point.refs -= 1
        if point.refs > 0:
            return b"OK"
        del self.points[(kind, addr, size)]
        for wid in point.ids:
            self.by_watch.pop(wid, None)
            try:
                self.client.call("unwatch", id=wid)
            except HwbkptError as err:
                log.info("z%d at %#x: %s", kind, addr, err)
        return b"OK"

    def _on_detach(self, _: bytes) -> bytes | None:
        self._send(b"OK")
        self.leave()
        return None

    def _on_kill(self, _: bytes) -> None:
        # "k" has no reply; it means "this debugger leaves", never "kill the process".
        self.leave()
        return None
