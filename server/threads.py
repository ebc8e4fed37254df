"""The server's per-upload array work on more than one core, when fedrec is given more than one.

Checking and summing a round's uploads is array work over every upload (half a megabyte
each at MovieLens-1M shape); numpy does it without holding Python's GIL, so threads share
it. How many: ``FEDREC_THREADS`` (:mod:`common.threads`; 1 unless set, so a deployment's
server uses one core as before). The results are those of one thread bit for bit: checks
are per upload, and a sum is split by element ranges, each element summed in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from common.threads import compute_processes

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


def in_threads(function: Callable[[Item], Outcome], items: Sequence[Item], threads: int | None = None) -> list[Outcome]:
    """``[function(item) for item in items]``, the items in ``threads`` contiguous parts on as many threads
    (default ``FEDREC_THREADS``): one task per thread, not one per item (a task costs tens of microseconds)."""
    threads = compute_processes() if threads is None else threads
    if threads <= 1 or len(items) < 2:
        return [function(item) for item in items]
    parts = [span for span in element_ranges(len(items), threads) if span.start < span.stop]
    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        done = pool.map(lambda span: [function(item) for item in items[span]], parts)
        return [outcome for part in done for outcome in part]


def element_ranges(size: int, parts: int) -> list[slice]:
    """``parts`` contiguous slices covering ``range(size)`` (the last ones may be empty)."""
    step = -(-size // max(1, parts))
    return [slice(min(start, size), min(start + step, size)) for start in range(0, step * parts, max(1, step))]
