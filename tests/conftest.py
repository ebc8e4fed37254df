"""Test processes pick their thread count like every fedrec process (common/threads.py).

Imported by pytest before any test module, so before numpy and torch size their pools.
"""

from common.threads import use_threads

use_threads()
