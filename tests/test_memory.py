"""read_memory / write_memory of a real process, through /proc/PID/mem and through the
process_vm_readv/writev fallback the daemon uses where opening /proc/PID/mem is refused (the
hardened systemd unit has no CAP_DAC_OVERRIDE)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from hwbkpt_proto import InvalidArgumentError
from hwbkptd import _kernel
from tests._progs import Target

pytestmark = pytest.mark.kernel


@pytest.fixture(params=["proc-mem", "process_vm"])
def access(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "process_vm":
        real_open = os.open

        def refuse_proc_mem(path: str, *args: int) -> int:
            if str(path).endswith("/mem"):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args)

        monkeypatch.setattr(_kernel.os, "open", refuse_proc_mem)
    yield request.param
    _kernel._mem_fds.clear()  # do not keep either kind of cached access across tests


@pytest.mark.timeout(30)
def test_read_and_write_a_variable(access: str, target: Callable[..., Target]) -> None:
    proc = target("writer", 3, "gate2")
    addr = int(proc.info["addr"])
    try:
        assert _kernel.read_memory(proc.pid, addr, 8) == bytes(8)
        _kernel.write_memory(proc.pid, addr, (0x1122334455667788).to_bytes(8, "little"))
        assert _kernel.read_memory(proc.pid, addr, 8) == bytes.fromhex("8877665544332211")
        assert _kernel.read_memory(proc.pid, addr, 0) == b""
        with pytest.raises(InvalidArgumentError):
            _kernel.read_memory(proc.pid, 0x1000, 8)  # not mapped
    finally:
        _kernel.forget_memory(proc.pid)
    proc.go()
    assert proc.line() == "done var=3 pair0=0"  # the program wrote over our value: alive
    proc.go()
    assert proc.wait(10) == 0


@pytest.mark.timeout(30)
def test_read_only_text(access: str, target: Callable[..., Target]) -> None:
    proc = target("writer", 1, "gate2")
    func = int(proc.info["func"])
    try:
        code = _kernel.read_memory(proc.pid, func, 4)
        if access == "proc-mem":
            _kernel.write_memory(proc.pid, func, code)  # like POKEDATA: text is writable
        else:
            with pytest.raises(InvalidArgumentError):
                _kernel.write_memory(proc.pid, func, code)  # no FOLL_FORCE without /proc
        assert _kernel.read_memory(proc.pid, func, 4) == code
    finally:
        _kernel.forget_memory(proc.pid)
    proc.go()
    assert proc.line() == "done var=1 pair0=0"
    proc.go()
    assert proc.wait(10) == 0
