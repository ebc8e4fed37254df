"""fedrec's command line, simulations, benchmarks and audits.

Every entry point here (``fedrec``, ``python -m simulations.<bench>``) runs in a process
whose thread count is chosen before numpy or torch load (:mod:`common.threads`).
"""

from common.threads import use_threads as _use_threads

try:
    _use_threads()
except ValueError:  # a malformed FEDREC_THREADS: `fedrec` reports it as one line (simulations.cli.main)
    pass
