"""The fleet benchmark's pieces: its no-op floor sends exactly fedrec's payload, its memory probe reads."""

import os

import numpy as np
import pytest

from client.local import train_round
from common.config import parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from common.updates import for_transport
from simulations.bench_fleet import NoopClient, _tree_memory_bytes, in_own_process
from simulations.engine import fused_run_config


def test_the_noop_client_answers_with_fedrecs_exact_payload():
    for dtype in ("float32", "float16"):
        config = parse_run_config(fused_run_config({"synthetic-users": 20, "synthetic-items": 50, "eval-negatives": 10,
                                                    "transport-dtype": dtype}))
        model = build_model(config.model_config, 0, 50, seed=1)
        sent = for_transport(list(model.shared_state().values()), dtype)
        real = train_round(config.model_config, config.train_config, slicer_cached(config).client(0), sent, None,
                           seed=1, server_round=1)
        fedrec = for_transport(real.upload, dtype)
        noop, weight, _ = NoopClient(50).fit(sent, {})
        assert [(a.shape, a.dtype) for a in noop] == [(a.shape, a.dtype) for a in fedrec]
        assert weight == 1 and not any(a.any() for a in noop)


def test_memory_probe_counts_this_process():
    own = _tree_memory_bytes(os.getpid())
    ballast = np.ones(50_000_000 // 8)  # 50 MB touched
    assert _tree_memory_bytes(os.getpid()) > own + 40_000_000
    del ballast


def _allocate(megabytes: int) -> dict[str, float]:
    before = _tree_memory_bytes(os.getpid())
    ballast = np.ones(megabytes * 1_000_000 // 8)
    return {"pid": os.getpid(), "grown": _tree_memory_bytes(os.getpid()) - before, "sum": float(ballast.sum())}


def _divide(by: int) -> dict[str, float]:
    return {"value": 1 / by}


def test_each_mode_runs_in_a_process_of_its_own_and_its_failure_reaches_the_benchmark():
    before = _tree_memory_bytes(os.getpid())
    result = in_own_process(_allocate, 80)
    assert result["pid"] != os.getpid() and result["sum"] == 10_000_000
    assert result["grown"] > 70_000_000  # the child's ballast, measured in the child
    assert _tree_memory_bytes(os.getpid()) < before + 40_000_000  # and never in the benchmark's own process
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        in_own_process(_divide, 0)
