"""Shares of a round's work in forked worker processes, their results streamed back as they come.

The vectorized backend trains many devices per tensor operation, but in one process it
uses one core, while Flower's simulation runs one Ray actor per core. A round's devices
are independent (each its own rows, optimizer state and random streams), so the round's
batches split into shares, one per worker. A worker is forked for the round: it starts
with the parent's memory as it is (the global model, the fleet's data and user rows,
copy-on-write), so nothing is shipped to it.

A worker sends its results as it has them, a few dozen per message. A result's small part
(a device's weight, metrics, user rows) is pickled down a pipe; its large part (the upload's
tensor bytes, half a megabyte at MovieLens-1M shape) is written straight into the result's
own region of memory shared with the parent, which reads it there: no copy at all on the
parent's side. Pickled through the pipe it cost the parent more than a millisecond per
upload (reading, buffering, unpickling), and copied out of a ring of shared slots half
a millisecond (a fresh half-megabyte object's page faults), more than the training.

The shared memory is kept from one round to the next (:class:`SharedRegions`) once nothing
reads the last round's results any more: fresh pages must be zeroed by the kernel on the
workers' first write and mapped again on the parent's first read, 3 GB a round at
MovieLens-1M shape.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import multiprocessing
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

# One result: its small part (pickled) and its tensors, each as its buffers.
Result = tuple[Any, Sequence[Sequence[Any]]]

_ITEMS, _DONE, _FAILED = "items", "done", "failed"


def _return_free_memory() -> None:
    """Give the heap's free pages back to the system before forking (glibc's ``malloc_trim``; elsewhere nothing).

    A forked worker allocates out of the free heap it inherits: every page it writes there
    is copied, and the parent's page still counts, so a parent that had freed a gigabyte
    (Flower's messages of an earlier run in the same process) had its workers double it.
    """
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError):  # not glibc
        pass


def _flat(part: Any) -> memoryview:
    """A buffer as flat bytes (a numpy array's data, or bytes as they are)."""
    return memoryview(part).cast("B")


class SharedRegions:
    """Memory shared with forked workers, handed out again while no view of it is alive.

    A view of the memory (a result's tensor, an array over it) makes it unusable for the
    next call: writing there would change a result somebody still reads. So the next
    call gets the same memory only when nothing exports it any more, else new memory (the
    old is freed with its last view).
    """

    def __init__(self) -> None:
        self._memory: mmap.mmap | None = None

    def claim(self, size: int) -> mmap.mmap:
        """At least ``size`` bytes that no view reads: the kept memory if it is large enough and unread, else new."""
        kept = self._memory
        if kept is None or len(kept) < size or not _unread(kept):
            kept = self._memory = mmap.mmap(-1, max(1, size))  # anonymous, shared: the forked workers write these pages
        return kept


def _unread(memory: mmap.mmap) -> bool:
    """Whether no buffer of ``memory`` is alive: only then may it be resized (here to its own size, which changes nothing)."""
    try:
        memory.resize(len(memory))
    except BufferError:
        return False
    return True


def forked_results(work: Callable[[int], Iterable[Result]], sizes: Sequence[int], memory: mmap.mmap,
                   region_bytes: int) -> Iterator[tuple[Any, list[Any]]]:
    """``(small part, tensors)`` of every result ``work(share)`` yields, for each share (``sizes[share]`` results),
    each share in a forked process.

    A result's tensors come as read-only memoryviews of its region of ``memory`` (``region_bytes``
    each, the shares' regions one after the other; from :meth:`SharedRegions.claim`), or as
    bytes when they do not fit. Results arrive interleaved across shares (each share's own
    in order). A failing share raises here with the worker's traceback; the other workers are stopped.
    """
    context = multiprocessing.get_context("fork")
    _return_free_memory()
    view = memoryview(memory).toreadonly()
    workers, pipes = [], []
    starts = list(itertools.accumulate(sizes, initial=0))
    for share, size in enumerate(sizes):
        receive, send = context.Pipe(duplex=False)
        regions = range(starts[share], min(starts[share] + size, len(memory) // max(1, region_bytes)))
        process = context.Process(target=_serve, args=(work, share, send, memory, regions, region_bytes), daemon=True)
        process.start()
        send.close()  # the parent's copy: the worker's end closing is what ends the pipe
        workers.append(process)
        pipes.append(receive)
    finished = False
    try:
        open_pipes = list(pipes)
        while open_pipes:
            for pipe in wait(open_pipes):
                yield from _drain(pipe, open_pipes, pipes.index(pipe), view, region_bytes)  # type: ignore[arg-type]
        finished = True
    finally:
        for process in workers:
            if not finished and process.is_alive():  # a share failed, or the caller stopped reading
                process.terminate()
            process.join()
        for pipe in pipes:
            pipe.close()


def _drain(pipe: Connection, open_pipes: list, share: int, view: memoryview,  # type: ignore[type-arg]
           region_bytes: int) -> Iterator[tuple[Any, list[Any]]]:
    """The next message of one worker: some results, the end of its share, or its failure."""
    try:
        kind, payload = pipe.recv()
    except EOFError:
        raise RuntimeError(f"vectorized worker {share} ended without finishing its share (killed, or out of memory?)") \
            from None
    if kind == _FAILED:
        raise RuntimeError(f"vectorized worker {share} failed:\n{payload}")
    if kind == _DONE:
        open_pipes.remove(pipe)
        return
    for small, where, tensors in payload:
        if where is not None:
            region, lengths = where
            offset, tensors = region * region_bytes, []
            for length in lengths:
                tensors.append(view[offset:offset + length])
                offset += length
        yield small, tensors


# Results a worker sends per message: one message per result cost the worker 0.15 ms in its
# write (the parent woken for each, cProfile of a worker).
_RESULTS_PER_MESSAGE = 32

# Linux's madvise(MADV_POPULATE_WRITE) (5.14 and later): maps a range's pages at once, where
# writing a half-megabyte upload into shared memory took 116 page faults, 0.13 ms.
# Python 3.11's mmap module does not name it; 23 is its value in Linux's headers, and only there.
_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)


def _map_for_writing(memory: mmap.mmap, start: int, stop: int) -> None:
    """Map the pages of ``memory[start:stop]`` into this process in one call (nothing when the kernel cannot)."""
    start -= start % mmap.PAGESIZE
    if stop > start and _POPULATE_WRITE is not None and hasattr(memory, "madvise"):
        try:
            memory.madvise(_POPULATE_WRITE, start, stop - start)
        except (OSError, ValueError):  # an older kernel, or not Linux: the writes fault the pages in
            pass


def _serve(work: Callable[[int], Iterable[Result]], share: int, send: Connection, memory: mmap.mmap,
           regions: range, region_bytes: int) -> None:
    """In the worker: one thread of compute, then the share's results to the parent, their tensors in ``regions``."""
    from common.threads import use_threads

    use_threads({**os.environ, "FEDREC_THREADS": "1"})
    view = memoryview(memory)
    _map_for_writing(memory, regions.start * region_bytes, regions.stop * region_bytes)
    pending: list[tuple[Any, Any, Any]] = []
    try:
        for index, (small, tensors) in enumerate(work(share)):
            flat = [[_flat(part) for part in tensor] for tensor in tensors]
            lengths = [sum(part.nbytes for part in tensor) for tensor in flat]
            region = regions.start + index
            if sum(lengths) <= region_bytes and region in regions:
                offset = region * region_bytes
                for tensor in flat:
                    for part in tensor:
                        view[offset:offset + part.nbytes] = part
                        offset += part.nbytes
                pending.append((small, (region, lengths), None))
            else:
                pending.append((small, None, [b"".join(tensor) for tensor in flat]))
            if len(pending) == _RESULTS_PER_MESSAGE:
                send.send((_ITEMS, pending))
                pending = []
        if pending:
            send.send((_ITEMS, pending))
        send.send((_DONE, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        send.send((_FAILED, traceback.format_exc()))
    finally:
        send.close()
