"""The line ``hwbkpt gdbserver`` writes when a breakpoint gets no hardware slot (pure)."""

from __future__ import annotations

from typing import Any

from hwbkpt._gdbserver._noslot import SLOTS_PER_THREAD, no_slot_message

ME = 4242


def status(slots: list[dict[str, Any]], tid: int = 100) -> dict[str, Any]:
    return {
        "clients": [
            {"id": 1, "pid": ME, "name": "hwbkpt-gdbserver"},
            {"id": 2, "pid": 777, "name": "hwbkpt-gdbserver"},
            {"id": 3, "pid": 888, "name": "monitor"},
        ],
        "targets": [
            {"pid": 99, "threads": [{"tid": 99, "slots": []}]},
            {"pid": 100, "threads": [{"tid": tid, "slots": slots}, {"tid": tid + 1, "slots": []}]},
        ],
    }


def slot(addr: int, access: str, holders: list[int], length: int = 1) -> dict[str, Any]:
    return {"addr": addr, "length": length, "access": access, "holders": holders}


FULL = [
    slot(0x401000, "x", [1]),
    slot(0x401010, "x", [1, 2]),
    slot(0x404040, "w", [3], 8),
    slot(0x404048, "rw", [9], 4),
]


def test_full_thread_names_every_slot_and_its_holders() -> None:
    line = no_slot_message(status(FULL), 100, {100: "pending", 101: "installed"},
                           "breakpoint at 0x401020", ME)  # fmt: skip
    assert line.startswith("breakpoint at 0x401020 not inserted: all 4 hardware slots of "
                           "thread 100 are in use")  # fmt: skip
    assert "breakpoint 0x401000 by this debugger;" in line
    assert "breakpoint 0x401010 by this debugger, hwbkpt-gdbserver (pid 777);" in line
    assert "watchpoint 0x404040/8 by monitor (pid 888);" in line
    assert "access watchpoint 0x404048/4 by client 9)" in line  # gone since: its id
    assert "delete a breakpoint or watchpoint" in line


def test_first_thread_not_installed_is_the_one_described() -> None:
    line = no_slot_message(status(FULL, tid=101), 100, {100: "installed", 101: "pending"},
                           "breakpoint at 0x1", ME)  # fmt: skip
    assert "slots of thread 101 are in use" in line


def test_free_slots_and_still_refused_means_someone_outside_the_daemon() -> None:
    line = no_slot_message(status(FULL[:2]), 100, {100: "pending"}, "breakpoint at 0x2", ME)
    assert "the kernel refused a hardware slot of thread 100" in line
    assert f"only 2 of its {SLOTS_PER_THREAD}" in line
    assert "outside the daemon" in line


def test_unknown_thread_or_empty_status_still_gives_a_line() -> None:
    line = no_slot_message({}, 100, {}, "breakpoint at 0x3", ME)
    assert line.startswith("breakpoint at 0x3 not inserted:")
    assert "process 100" in line
