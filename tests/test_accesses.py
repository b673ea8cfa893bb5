"""Folding a region's notify samples into accesses (hwbkpt._accesses), without the kernel."""

from __future__ import annotations

from hwbkpt._accesses import SAME_EXCEPTION_NS, SETTLE_NS, Folder

US = 1000  # ns


def test_one_store_over_four_pieces_drained_in_two_rounds_is_one_access() -> None:
    f = Folder()
    t = 10**12
    # Ring drains may fall between the pieces: two arrive in one round, two in the next.
    f.add(7, 0x401000, t + 2 * US, [3])
    f.add(7, 0x401000, t + 3 * US, [4])
    assert f.ready(now=t + SETTLE_NS // 2) == []  # too young to fold
    f.add(7, 0x401000, t, [1])
    f.add(7, 0x401000, t + 1 * US, [2])
    (access,) = f.ready(now=t + 2 * SETTLE_NS)
    assert (access.tid, access.ip, access.time, access.watches) == (7, 0x401000, t, [1, 2, 3, 4])
    assert f.flush() == []


def test_a_piece_that_comes_again_is_a_new_access() -> None:
    f = Folder()
    for i in range(100):  # 100 stores of one instruction 1 us apart, each over pieces 1, 2
        f.add(7, 0x401000, i * 2 * US, [1])
        f.add(7, 0x401000, i * 2 * US + 200, [2])
    accesses = f.flush()
    assert len(accesses) == 100
    assert all(a.watches == [1, 2] for a in accesses)


def test_other_ip_other_thread_or_a_long_gap_is_a_new_access() -> None:
    f = Folder()
    f.add(7, 0x401000, 0, [1])
    f.add(7, 0x401004, 100, [2])  # another instruction
    f.add(8, 0x401004, 200, [3])  # another thread: its own stream
    f.add(7, 0x401004, 100 + SAME_EXCEPTION_NS + 1, [3])  # too late for one exception
    accesses = f.flush()
    assert [(a.tid, a.ip, a.watches) for a in accesses] == [
        (7, 0x401000, [1]),
        (7, 0x401004, [2]),
        (8, 0x401004, [3]),
        (7, 0x401004, [3]),
    ]


def test_an_open_access_is_handed_out_once_settled() -> None:
    f = Folder()
    f.add(7, 0x401000, 0, [1])
    assert [a.watches for a in f.ready(now=SETTLE_NS + SAME_EXCEPTION_NS + 1)] == [[1]]
    assert f.flush() == []


def test_an_exception_preempted_for_half_a_millisecond_is_still_one_access() -> None:
    # A vCPU descheduled by its host between the samples of one exception.
    f = Folder()
    f.add(7, 0x401000, 0, [1])
    f.add(7, 0x401000, 1 * US, [2])
    f.add(7, 0x401000, 500 * US, [3])
    f.add(7, 0x401000, 501 * US, [4])
    f.add(7, 0x401000, 520 * US, [1])  # the next store
    assert [a.watches for a in f.flush()] == [[1, 2, 3, 4], [1]]
