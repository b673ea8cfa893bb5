"""The engine's own CPU per ``watch`` + ``unwatch`` pair, on the fake kernel (no I/O).

Not part of ``python -m bench`` (it measures no daemon): a micro benchmark of the request
path's pure part, to compare trees (``python bench/engine_micro.py`` in each worktree,
same machine, same minute). The kernel calls of a pair (open, close, counter read) cost
nothing here (:class:`NullPort`), so what is measured is the engine's Python alone.

Scenarios: a 100-thread target with one process-wide anchor watch, and either no other
watch or 400 thread-scoped ones (4 on each thread, sharing one address: four clients
watching one variable of their thread); and the rpc bench's shape, 32 threads with one
thread-scoped watch each besides the anchor. Each pair watches an address on one thread (the
threads in turn) and removes the watch again. Prints µs of thread CPU per pair, the best
of 7 batches and all of them.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hwbkptd._model import Access, Mode, Spec
from tests.fakes import FakeKernel, Harness

PID = 4242
THREADS = 100
PAIRS = 4000
BATCHES = 7


class NullPort:
    """The fake kernel, but a slot's open, close and counter read cost nothing."""

    def __init__(self, real: FakeKernel) -> None:
        self.real = real
        self.n = 0

    def open_slot(self, tid: int, spec: Spec, mode: Mode, token: int, flt: Any = None) -> int:
        self.n += 1
        return self.n

    def close_slot(self, handle: object) -> None:
        pass

    def read_count(self, handle: object) -> int:
        return 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def measure(
    background: int, threads: int = THREADS, per_thread: int = 4
) -> tuple[float, list[float]]:
    """µs of CPU per pair with ``background`` thread-scoped watches on the target, spread
    ``per_thread`` to a thread over its ``threads`` threads."""
    h = Harness(park=False)
    tids = h.kernel.spawn(PID, threads)
    engine = h.engine
    for cid in range(1, per_thread + 2):
        engine.add_client(cid)
    engine.watch(1, PID, Spec(0x10018, 8, Access.WRITE), Mode.COUNT)  # the anchor
    for i in range(background):
        engine.watch(2 + i % per_thread, PID, Spec(0x20000, 8, Access.WRITE), Mode.COUNT,
                     tid=tids[i // per_thread % threads])  # fmt: skip
    h.settle()
    engine._port = NullPort(h.kernel)  # type: ignore[assignment]
    spec = Spec(0x10000, 8, Access.WRITE)
    batches = []
    for _ in range(BATCHES):
        t0 = time.thread_time_ns()
        for i in range(PAIRS):
            watch = engine.watch(1, PID, spec, Mode.COUNT, tid=tids[i % threads])
            engine.unwatch(1, watch.id)
        batches.append((time.thread_time_ns() - t0) / PAIRS / 1e3)
        h.emitted.clear()
    return min(batches), batches


def main() -> None:
    for background in (0, 400):
        best, batches = measure(background)
        print(
            f"engine watch+unwatch, {background + 1} watches on the target before the pair: "
            f"{best:.2f} µs/pair (batches {[round(b, 1) for b in batches]})"
        )
    # The shape of `python -m bench --only rpc`: 32 threads, one client's watch on each.
    best, batches = measure(32, threads=32, per_thread=1)
    print(
        f"engine watch+unwatch, rpc bench's shape (32 threads, 33 watches): {best:.2f} µs/pair "
        f"(batches {[round(b, 1) for b in batches]})"
    )


if __name__ == "__main__":
    main()
