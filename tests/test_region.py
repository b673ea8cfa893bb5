"""gdb's region split (DESIGN §5.8): table tests and a Hypothesis property."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hwbkpt_proto._errors import InvalidArgumentError
from hwbkptd._region import split_region


@pytest.mark.parametrize(
    ("addr", "size", "expected"),
    [
        # one piece when the region already is a slot
        (0x1000, 1, [(0x1000, 1)]),
        (0x1000, 2, [(0x1000, 2)]),
        (0x1000, 4, [(0x1000, 4)]),
        (0x1000, 8, [(0x1000, 8)]),
        (0x1001, 1, [(0x1001, 1)]),
        # the design's example: 6 bytes at an odd address
        (0x1001, 6, [(0x1001, 1), (0x1002, 2), (0x1004, 2), (0x1006, 1)]),
        # 16 aligned bytes
        (0x1000, 16, [(0x1000, 8), (0x1008, 8)]),
        # odd sizes at aligned addresses: largest first, then shrink for the tail
        (0x1000, 3, [(0x1000, 2), (0x1002, 1)]),
        (0x1000, 7, [(0x1000, 4), (0x1004, 2), (0x1006, 1)]),
        (0x1000, 12, [(0x1000, 8), (0x1008, 4)]),
        (0x1000, 15, [(0x1000, 8), (0x1008, 4), (0x100C, 2), (0x100E, 1)]),
        # misaligned starts climb to alignment
        (0x1002, 8, [(0x1002, 2), (0x1004, 4), (0x1008, 2)]),
        (0x1004, 8, [(0x1004, 4), (0x1008, 4)]),
        (0x1003, 2, [(0x1003, 1), (0x1004, 1)]),
        (0x1007, 10, [(0x1007, 1), (0x1008, 8), (0x1010, 1)]),
        (0x1006, 4, [(0x1006, 2), (0x1008, 2)]),
        (0x1005, 6, [(0x1005, 1), (0x1006, 2), (0x1008, 2), (0x100A, 1)]),
        # address 0 is aligned to everything
        (0, 9, [(0, 8), (8, 1)]),
    ],
)
def test_split_table(addr: int, size: int, expected: list[tuple[int, int]]) -> None:
    assert split_region(addr, size) == expected


def test_design_example_is_1_4_1_when_the_middle_is_aligned() -> None:
    # DESIGN §5.8 writes "6 bytes at an odd address → 1 + 4 + 1": that holds when the
    # address is 3 mod 4 (the 4-byte middle piece is then aligned).
    assert split_region(0x1003, 6) == [(0x1003, 1), (0x1004, 4), (0x1008, 1)]


@pytest.mark.parametrize("size", [0, -1, -8])
def test_nonpositive_size_is_refused(size: int) -> None:
    with pytest.raises(InvalidArgumentError, match="positive size"):
        split_region(0x1000, size)


def test_negative_address_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="negative address"):
        split_region(-1, 4)


@given(
    addr=st.integers(min_value=0, max_value=(1 << 47) - 1),
    size=st.integers(min_value=1, max_value=256),
)
def test_split_properties(addr: int, size: int) -> None:
    pieces = split_region(addr, size)
    assert pieces, "a non-empty region has at least one piece"
    assert pieces[0][0] == addr
    cur = addr
    for start, length in pieces:
        assert start == cur, "pieces are contiguous and in order"
        assert length in (1, 2, 4, 8)
        assert start % length == 0, "each piece is naturally aligned"
        # greedy-maximal: no larger slot length would have fitted and been aligned here
        remaining = addr + size - start
        for bigger in (2, 4, 8):
            if bigger > length:
                assert bigger > remaining or start % bigger != 0
        cur = start + length
    assert cur == addr + size, "the pieces cover exactly the region"
    # never more pieces than the obvious bound: at most 3 to reach 8-alignment,
    # size // 8 full words, and at most 3 for the tail
    assert len(pieces) <= size // 8 + 6
