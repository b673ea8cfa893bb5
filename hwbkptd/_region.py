"""Splitting a region larger than one slot into pieces the hardware can watch (DESIGN §5.8).

One x86 debug register watches 1, 2, 4 or 8 bytes at an address aligned to that length
(SDM vol. 3, 18.2.4). A longer or misaligned region is covered by several slots, cut the way
gdb cuts it (``x86_handle_nonaligned_watchpoint`` in ``gdb/nat/x86-dregs.c``), because that is
the split users already know: walk from the start and at each step take the largest of
8, 4, 2, 1 bytes that fits in what remains and is naturally aligned at the current address.
So 6 bytes at an odd address become 1 + 4 + 1, and 16 aligned bytes become 8 + 8.

Pure: no I/O, no kernel. Whether every piece can be installed is the engine's business.
"""

from __future__ import annotations

from hwbkpt_proto._errors import InvalidArgumentError

__all__ = ["PIECE_SIZES", "split_region"]

# Largest first: the greedy walk tries them in this order.
PIECE_SIZES: tuple[int, ...] = (8, 4, 2, 1)


def split_region(addr: int, size: int) -> list[tuple[int, int]]:
    """Cut ``[addr, addr + size)`` into ``(addr, length)`` pieces, gdb's way, in address order.

    Every piece has a length of 1, 2, 4 or 8 and an address aligned to it; the pieces are
    contiguous and cover the region exactly. This does not check that the region lies in
    user space (see :func:`hwbkptd._model.check_spec` for each piece).

    Raises :class:`InvalidArgumentError` if ``size`` is not positive or ``addr`` is negative.
    """
    if size <= 0:
        raise InvalidArgumentError(f"a watched region needs a positive size, not {size}")
    if addr < 0:
        raise InvalidArgumentError(f"a watched region cannot start at a negative address {addr}")
    pieces: list[tuple[int, int]] = []
    cur = addr
    end = addr + size
    while cur < end:
        remaining = end - cur
        # 1 always qualifies, so the loop always finds a length.
        length = next(n for n in PIECE_SIZES if n <= remaining and cur % n == 0)
        pieces.append((cur, length))
        cur += length
    return pieces
