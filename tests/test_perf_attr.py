"""The perf_event_attr the daemon builds for a breakpoint, field by field at the offsets of
include/uapi/linux/perf_event.h (no kernel needed: the real opens are in test_kernel)."""

from __future__ import annotations

import struct

import pytest

from hwbkptd import _kernel
from hwbkptd._model import Access, Mode


def _field(raw: bytes, fmt: str, offset: int) -> int:
    value: int = struct.unpack_from(fmt, raw, offset)[0]
    return value


@pytest.mark.parametrize("access", list(Access))
@pytest.mark.parametrize("mode", list(Mode))
@pytest.mark.parametrize("filtered", [False, True])
def test_attr_fields_at_their_offsets(access: Access, mode: Mode, filtered: bool) -> None:
    addr = 0x7F00_1234_5000
    length = 1 if access is Access.EXECUTE else 4
    raw = _kernel._perf_attr(addr, length, access, mode, -2, 7, filtered).raw
    assert len(raw) == 128
    assert _field(raw, "I", 0) == 5  # PERF_TYPE_BREAKPOINT
    assert _field(raw, "I", 4) == 128  # size: PERF_ATTR_SIZE_VER7
    assert _field(raw, "Q", 8) == 0  # config
    notify, stop = mode is Mode.NOTIFY, mode is Mode.STOP
    assert _field(raw, "Q", 16) == (1 if notify or stop or filtered else 0)  # sample_period
    assert _field(raw, "Q", 24) == (0b111 if notify else 0)  # sample_type: IP|TID|TIME
    assert _field(raw, "Q", 32) == 0  # read_format
    flags = _field(raw, "Q", 40)
    assert flags & (1 << 5)  # exclude_kernel
    assert flags & (1 << 6)  # exclude_hv
    assert flags & (1 << 36)  # remove_on_exec
    assert bool(flags & (1 << 37)) is stop  # sigtrap
    assert bool(flags & (1 << 25)) is notify  # use_clockid
    assert not flags & 1  # enabled at open
    assert _field(raw, "I", 48) == (7 if notify else 0)  # wakeup_events
    assert _field(raw, "I", 52) == {"x": 4, "w": 2, "rw": 3}[access.value]  # bp_type
    assert _field(raw, "Q", 56) == addr  # bp_addr
    assert _field(raw, "Q", 64) == (8 if access is Access.EXECUTE else length)  # bp_len
    assert _field(raw, "i", 92) == 1  # clockid: CLOCK_MONOTONIC
    assert _field(raw, "Q", 120) == (1 << 64) - 2  # sig_data, as u64
    # Everything else is zero.
    covered = [(0, 72), (92, 96), (120, 128)]
    rest = bytes(b for i, b in enumerate(raw) if not any(lo <= i < hi for lo, hi in covered))
    assert rest == bytes(len(rest))
