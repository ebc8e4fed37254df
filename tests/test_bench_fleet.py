"""The fleet benchmark's pieces: its no-op floor sends exactly fedrec's payload, its memory probe reads."""

import os

import numpy as np

from client.local import train_round
from common.config import parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from common.updates import for_transport
from simulations.bench_fleet import NoopClient, _tree_memory_bytes
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
