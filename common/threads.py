"""How many CPU threads a fedrec process computes with: chosen once, on purpose.

torch's intra-op pool defaults to one thread per core, and OpenMP/MKL/OpenBLAS do the
same. On a machine where anything else runs (the Ray workers of a simulation, a test
beside a benchmark, another user) those threads spin against each other: the centralized
GMF baseline on MovieLens-100K took 77 s with the defaults and 6.7 s with one thread on
a busy 2-core machine, with the same result. The models here are small (batches of a
few hundred rows of 32 floats), so one thread loses little even on an idle machine.

So every process fedrec starts (the ``fedrec`` CLI and what it runs in-process, the
ServerApp, each ClientApp, the benchmarks and the tests) uses ``FEDREC_THREADS`` threads:

- ``FEDREC_THREADS`` unset: ``OMP_NUM_THREADS`` if that is set, else 1;
- ``FEDREC_THREADS=N`` (N >= 1): N, for torch and for the OpenMP/MKL/OpenBLAS pools;
- ``FEDREC_THREADS=0``: fedrec sets nothing; every library keeps its own default.

The vectorized backend takes the same number of forked training workers
(:func:`compute_processes`; every core the process may use when it is 0), each with one
thread, and the server sums a round's uploads in that many threads; no result depends on
the number.

The pool sizes of the native libraries are read from the environment when they load,
so :func:`use_threads` must run before numpy or torch is imported to cover them; torch's
own count is also set directly when torch is already loaded. Child processes (Ray
workers) inherit the environment.
"""

from __future__ import annotations

import os
import sys
from typing import MutableMapping

THREADS_ENV = "FEDREC_THREADS"
DEFAULT_THREADS = 1
# Environment variables the native thread pools (OpenMP, MKL, OpenBLAS) size themselves from.
POOL_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def _count(name: str, text: str, minimum: int) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ValueError(f"environment variable {name}={text!r}: expected an integer >= {minimum}")
    return value


def chosen_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
    """The thread count this process should use; None when ``FEDREC_THREADS=0`` (library defaults)."""
    env = os.environ if environ is None else environ
    if env.get(THREADS_ENV, "").strip():
        value = _count(THREADS_ENV, env[THREADS_ENV], 0)
        return value or None
    if env.get("OMP_NUM_THREADS", "").strip():
        return _count("OMP_NUM_THREADS", env["OMP_NUM_THREADS"], 1)
    return DEFAULT_THREADS


def use_threads(environ: MutableMapping[str, str] | None = None) -> int | None:
    """Apply :func:`chosen_threads` to the environment and to torch (if loaded); return the count.

    An explicit ``FEDREC_THREADS`` overrides the pool variables; otherwise a pool variable
    that is already set keeps its value. Raises ValueError for a malformed setting.
    """
    env = os.environ if environ is None else environ
    count = chosen_threads(env)
    if count is None:
        return None
    explicit = bool(env.get(THREADS_ENV, "").strip())
    for name in POOL_VARIABLES:
        if explicit or not env.get(name, "").strip():
            env[name] = str(count)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads") and torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def compute_processes() -> int:
    """How many processes fedrec's own parallel work uses (the vectorized backend's workers):
    ``FEDREC_THREADS`` (1 unless set), or every core this process may run on when it is 0."""
    return chosen_threads() or available_cores()
