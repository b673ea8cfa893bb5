"""hwbkptd benchmarks: the daemon against C programs doing the same work (DESIGN.md §9).

Run with ``make bench`` (= ``python -m bench``); see bench/README.md for each scenario,
its reference and how to read the figures.  Nothing here is imported by the daemon.
"""

__all__: list[str] = []
