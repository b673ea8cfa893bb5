"""The GDB Remote Serial Protocol's framing, sans I/O: bytes in, events out, and back.

Theory of operation (h11-style, the model is pyOCD's ``packet_io.py``):

* :meth:`Codec.receive_data` takes whatever the debugger wrote; :meth:`Codec.next_event`
  returns one event at a time — :class:`Packet`, :class:`Ack`, :class:`Nak`,
  :class:`Interrupt` (the lone byte 0x03) or :class:`Dropped` (a packet that was refused:
  bad checksum, too long) — or :data:`NEED_DATA`. Nothing a peer sends raises: the fuzz test
  holds the codec to that.
* A packet is ``$payload#cc``: ``cc`` is two hex digits, the sum of the payload's bytes
  modulo 256 as they are on the wire. In the payload ``}`` escapes the next byte (XOR 0x20)
  and ``*`` repeats the previous byte ``n - 29`` times, ``n`` being the byte after it
  (gdb's "Binary Data" and "run-length encoding" in the manual's Overview of the remote
  protocol). gdb escapes ``$ # } *`` inside binary data (``X``, ``vFile``), so decoding
  both everywhere is safe.
* While acks are on (the start of every connection, until ``QStartNoAckMode``), each
  packet received is answered ``+`` if its checksum is right and ``-`` otherwise (gdb then
  sends it again); the codec queues those bytes and :meth:`Codec.data_to_send` hands them
  out. :meth:`Codec.send` frames a reply (escaping ``$ # } *``).
* Bytes outside a packet that are not ``+``, ``-`` or 0x03 are line noise and are skipped,
  as gdbserver does. A packet longer than ``max_packet`` is dropped whole, its bytes never
  kept beyond the limit; in ack mode it is NAK'd (gdb resends it, and it is dropped again
  after its retries).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "NEED_DATA",
    "Ack",
    "Codec",
    "Dropped",
    "Event",
    "Interrupt",
    "Nak",
    "NeedData",
    "Packet",
    "checksum",
    "escape",
    "unescape",
]

#: Payload bytes that must be escaped on the wire.
_SPECIAL: Final = frozenset(b"$#}*")
_NEEDS_ESCAPE: Final = re.compile(rb"[$#}*]")
_ESCAPE: Final = 0x7D  # '}'
_RUN: Final = 0x2A  # '*'
_START: Final = 0x24  # '$'
_END: Final = 0x23  # '#'
_INTERRUPT: Final = 0x03
#: Default largest payload accepted, in wire bytes (the server announces a little less).
MAX_PACKET: Final = 0x4400


@dataclass(frozen=True, slots=True)
class Packet:
    """A packet received intact: ``data`` is the payload with escapes and runs decoded."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    """``+``: the peer got our last packet."""


@dataclass(frozen=True, slots=True)
class Nak:
    """``-``: the peer asks for our last packet again."""


@dataclass(frozen=True, slots=True)
class Interrupt:
    """The byte 0x03 outside a packet: the user pressed Ctrl-C in the debugger."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """A packet that was refused; ``reason`` says why (for the log)."""

    reason: str


class NeedData:
    """The type of :data:`NEED_DATA`."""

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`Codec.next_event` when more bytes are needed.
NEED_DATA: Final = NeedData()

Event = Packet | Ack | Nak | Interrupt | Dropped


def checksum(data: bytes) -> int:
    """The RSP checksum: the sum of ``data``'s bytes modulo 256."""
    return sum(data) & 0xFF


def escape(payload: bytes) -> bytes:
    """``payload`` with ``$ # } *`` escaped as ``}`` + byte XOR 0x20."""
    if _NEEDS_ESCAPE.search(payload) is None:  # nearly every reply: one C-level scan
        return payload
    out = bytearray()
    for b in payload:
        if b in _SPECIAL:
            out += bytes((_ESCAPE, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(raw: bytes) -> bytes | None:
    """Decode escapes and run-length encoding of a payload as it was on the wire.

    Returns ``None`` if the payload is malformed: an escape or a run at its very end, a
    run with nothing before it, or a run count below 3 (``n - 29`` must be positive; gdb's
    ``remote.c`` never sends one, and the byte after ``*`` must be printable).
    """
    if _ESCAPE not in raw and _RUN not in raw:
        return raw
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        b = raw[i]
        if b == _ESCAPE:
            if i + 1 >= n:
                return None
            out.append(raw[i + 1] ^ 0x20)
            i += 2
        elif b == _RUN:
            if i + 1 >= n or not out:
                return None
            count = raw[i + 1] - 29
            if count < 1 or raw[i + 1] > 126:
                return None
            out += bytes((out[-1],)) * count
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class Codec:
    """One end of an RSP connection (see the module docstring)."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        if max_packet < 16:
            raise ValueError("max_packet must be at least 16 bytes")
        self.max_packet = max_packet
        self.ack_mode = True
        self._buf = bytearray()
        self._out = bytearray()
        self._skipping = False  # inside an oversized packet, waiting for its '#cc'
        self._skip_tail = -1  # checksum digits still to skip after the '#' of one

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the debugger (an empty ``data`` changes nothing)."""
        self._buf += data

    def next_event(self) -> Event | NeedData:
        """The next event, or :data:`NEED_DATA`. Never raises on any input."""
        buf = self._buf
        while buf:
            if self._skipping:
                if not self._skip_oversized():
                    return NEED_DATA
                continue
            b = buf[0]
            if b == _START:
                return self._packet()
            del buf[0]
            if b == ord("+"):
                return Ack()
            if b == ord("-"):
                return Nak()
            if b == _INTERRUPT:
                return Interrupt()
            # Anything else between packets is noise (e.g. a stray ack after no-ack mode).
        return NEED_DATA

    def _packet(self) -> Event | NeedData:
        buf = self._buf
        end = buf.find(_END, 1, self.max_packet + 2)
        if end < 0:
            if len(buf) > self.max_packet + 1:
                # Too long: forget what we have, skip up to and including '#cc'.
                del buf[:]
                self._skipping = True
                self._skip_tail = -1
                return self._refuse(f"packet longer than {self.max_packet} bytes")
            return NEED_DATA
        if len(buf) < end + 3:
            return NEED_DATA
        raw = bytes(buf[1:end])
        digits = bytes(buf[end + 1 : end + 3])
        del buf[: end + 3]
        try:
            expected = int(digits, 16)
        except ValueError:
            expected = -1
        # No-ack mode: the transport is reliable; the checksum is not checked (gdb's
        # manual: "the checksum ... should be ignored"), but the payload must decode.
        if self.ack_mode and expected != checksum(raw):
            return self._refuse(f"bad checksum {digits!r} for a {len(raw)}-byte packet")
        data = unescape(raw)
        if data is None:
            return self._refuse("malformed escape or run-length sequence")
        if len(data) > self.max_packet * 4:
            return self._refuse("packet decodes to too many bytes")
        if self.ack_mode:
            self._out += b"+"
        return Packet(data)

    def _skip_oversized(self) -> bool:
        """Discard the rest of an oversized packet; True once its end has been passed."""
        buf = self._buf
        if self._skip_tail < 0:
            end = buf.find(_END)
            if end < 0:
                del buf[:]
                return False
            del buf[: end + 1]
            self._skip_tail = 2
        take = min(self._skip_tail, len(buf))
        del buf[:take]
        self._skip_tail -= take
        if self._skip_tail == 0:
            self._skipping = False
            self._skip_tail = -1
            return True
        return False

    def _refuse(self, reason: str) -> Dropped:
        if self.ack_mode:
            self._out += b"-"
        return Dropped(reason)

    # -- sending --------------------------------------------------------------------------

    def send(self, payload: bytes) -> bytes:
        """Frame ``payload`` as one packet (escaped, with its checksum) and return the bytes
        to write; also returns, first, any acks queued by :meth:`next_event`."""
        body = escape(payload)
        frame = b"$" + body + b"#" + b"%02x" % checksum(body)
        return self.data_to_send() + frame

    def data_to_send(self) -> bytes:
        """Acks and NAKs queued by :meth:`next_event` (and forgets them)."""
        if not self._out:
            return b""
        out = bytes(self._out)
        self._out.clear()
        return out

    def start_no_ack(self) -> None:
        """Stop sending and expecting acks (after the ``OK`` to ``QStartNoAckMode`` has been
        acknowledged; gdb acks that one reply, then neither side acks again)."""
        self.ack_mode = False
