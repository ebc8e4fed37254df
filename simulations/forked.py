"""Shares of a round's work in forked worker processes, their results streamed back as they come.

The vectorized backend trains many devices per tensor operation, but in one process it
uses one core, while Flower's simulation runs one Ray actor per core. A round's devices
are independent (each its own rows, optimizer state and random streams), so the round's
batches split into shares, one per worker. A worker is forked for the round: it starts
with the parent's memory as it is (the global model, the fleet's data and user rows,
copy-on-write), so nothing is shipped to it.

A worker sends each result as soon as it has it. The result's small part (a device's
weight, metrics, user rows) is pickled down a pipe; its large part (the upload's tensor
bytes, half a megabyte at MovieLens-1M shape) is written straight into the result's own
region of memory shared with the parent, which reads it there: no copy at all on the
parent's side. Pickled through the pipe it cost the parent more than a millisecond per
upload (reading, buffering, unpickling), and copied out of a ring of shared slots half
a millisecond (a fresh half-megabyte object's page faults), more than the training.
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

# One result: its small part (pickled), its region (0..regions-1) and its tensors, each as its buffers.
Result = tuple[Any, int, Sequence[Sequence[Any]]]

_ITEM, _DONE, _FAILED = "item", "done", "failed"


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


def forked_results(work: Callable[[int], Iterable[Result]], shares: int, regions: int,
                   region_bytes: int) -> Iterator[tuple[Any, list[Any]]]:
    """``(small part, tensors)`` of every result ``work(share)`` yields, for ``share`` in 0..shares-1, each share
    in a forked process.

    A result's tensors come as read-only memoryviews of its region (``region_bytes`` each, of
    ``regions``), or as bytes when they do not fit; the regions live as long as a view does.
    Results arrive interleaved across shares (each share's own in order). A failing share
    raises here with the worker's traceback; the other workers are stopped.
    """
    context = multiprocessing.get_context("fork")
    _return_free_memory()
    memory = mmap.mmap(-1, max(1, regions * region_bytes))  # anonymous, shared: the forked workers write these pages
    view = memoryview(memory).toreadonly()
    workers, pipes = [], []
    for share in range(shares):
        receive, send = context.Pipe(duplex=False)
        process = context.Process(target=_serve, args=(work, share, send, memory, region_bytes), daemon=True)
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
    """The next message of one worker: a result, the end of its share, or its failure."""
    try:
        kind, small, where, tensors = pipe.recv()
    except EOFError:
        raise RuntimeError(f"vectorized worker {share} ended without finishing its share (killed, or out of memory?)") \
            from None
    if kind == _FAILED:
        raise RuntimeError(f"vectorized worker {share} failed:\n{small}")
    if kind == _DONE:
        open_pipes.remove(pipe)
        return
    if where is not None:
        region, lengths = where
        offset, tensors = region * region_bytes, []
        for length in lengths:
            tensors.append(view[offset:offset + length])
            offset += length
    yield small, tensors


def _serve(work: Callable[[int], Iterable[Result]], share: int, send: Connection, memory: mmap.mmap,
           region_bytes: int) -> None:
    """In the worker: one thread of compute, then each result of the share to the parent."""
    from common.threads import use_threads

    use_threads({**os.environ, "FEDREC_THREADS": "1"})
    view = memoryview(memory)
    try:
        for small, region, tensors in work(share):
            flat = [[_flat(part) for part in tensor] for tensor in tensors]
            lengths = [sum(part.nbytes for part in tensor) for tensor in flat]
            if sum(lengths) <= region_bytes and 0 <= region < len(memory) // max(1, region_bytes):
                offset = region * region_bytes
                for tensor in flat:
                    for part in tensor:
                        view[offset:offset + part.nbytes] = part
                        offset += part.nbytes
                send.send((_ITEM, small, (region, lengths), None))
            else:
                send.send((_ITEM, small, None, [b"".join(tensor) for tensor in flat]))
        send.send((_DONE, None, None, None))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises it
        send.send((_FAILED, traceback.format_exc(), None, None))
    finally:
        send.close()
