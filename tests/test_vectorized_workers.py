"""backend = "vectorized" in forked workers: the same replies bit for bit, whatever the worker count."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import FitIns, ndarrays_to_parameters

import simulations.vectorized as vectorized
from common.config import fused_run_config, parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from simulations.batched import device_round, planned_size
from simulations.forked import SharedRegions, forked_results
from simulations.vectorized import DeviceProxy, Fleet

FLEET = {"dataset": "synthetic", "synthetic-users": 40, "synthetic-items": 150, "synthetic-mean-interactions": 20,
         "eval-negatives": 20, "model": "gmf", "batch-size": 16, "local-epochs": 2, "dropout-probability": 0.2,
         "local-epochs-min": 1}


@pytest.mark.parametrize("model,loss,epochs", [("gmf", "bce", 2), ("mf", "bpr", 1), ("mf", "mse", 3)])
def test_a_devices_steps_and_rows_are_known_before_it_draws_its_plan(model, loss, epochs):
    config = parse_run_config(fused_run_config({**FLEET, "model": model, "loss": loss, "local-epochs": epochs}))
    slicer = slicer_cached(config)
    for partition in range(len(slicer)):
        data = slicer.client(partition)
        steps, rows = planned_size(data, config.train_config)
        drawn = device_round(data, config.train_config, [1, 2, partition], {})
        assert steps == drawn.steps and len(drawn.plan.rows) <= rows


def _round(threads: str, monkeypatch, model: str, loss: str) -> tuple[list, dict]:
    monkeypatch.setenv("FEDREC_THREADS", threads)
    monkeypatch.setattr(vectorized, "MIN_DEVICES_PER_WORKER", 4)  # a small fleet still splits among workers
    run_config = fused_run_config({**FLEET, "model": model, "loss": loss})
    config = parse_run_config(run_config)
    fleet = Fleet(config, run_config)
    assert vectorized.round_workers(len(fleet)) == int(threads)
    shared = list(build_model(config.model_config, 1, fleet.slicer.prepared.num_items, seed=3).shared_state().values())
    instructions = [(DeviceProxy(p + 1), FitIns(ndarrays_to_parameters(shared), {"server-round": 2}))
                    for p in range(len(fleet))]
    results, failures = fleet.fit(instructions)
    assert results and failures  # some devices dropped out (dropout-probability)
    return results, fleet.user_rows


@pytest.mark.parametrize("model,loss", [("gmf", "bce"), ("mf", "bpr")])
def test_a_round_in_three_forked_workers_gives_the_in_process_replies_bit_for_bit(monkeypatch, model, loss):
    alone, alone_rows = _round("1", monkeypatch, model, loss)
    shared, shared_rows = _round("3", monkeypatch, model, loss)
    assert [proxy.node_id for proxy, _ in shared] == [proxy.node_id for proxy, _ in alone]  # in the order sampled
    for (_, a), (_, b) in zip(alone, shared, strict=True):
        assert a.parameters.tensors == b.parameters.tensors and a.num_examples == b.num_examples
        assert {k: v for k, v in a.metrics.items() if k != "train_seconds"} == \
               {k: v for k, v in b.metrics.items() if k != "train_seconds"}
    assert alone_rows.keys() == shared_rows.keys()  # the workers' user rows came back to the fleet
    for partition, tables in alone_rows.items():
        for name, table in tables.items():
            np.testing.assert_array_equal(shared_rows[partition][name], table)


def _work(share: int):
    for index in range(3):
        yield (share, index), _tensors(share, index)
    if share == 1:
        raise ValueError("share 1 broke")


def _tensors(share: int, index: int) -> list[list]:
    return [[b"head", np.full(4 + 40 * index, share, np.float32)], [np.arange(3.0)]]


def _expected(share: int, index: int) -> list[bytes]:
    return [b"head" + np.full(4 + 40 * index, share, np.float32).tobytes(), np.arange(3.0).tobytes()]


def test_a_failing_worker_raises_in_the_parent_with_its_traceback():
    got = []
    with pytest.raises(RuntimeError, match="(?s)worker 1 failed.*share 1 broke"):
        for small, tensors in forked_results(_work, [3, 3], SharedRegions().claim(6 * 1024), 1024):
            got.append(small)
            assert [bytes(t) for t in tensors] == _expected(*small)
    assert set(got) <= {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)}


@pytest.mark.parametrize("region_bytes", [1024, 200])  # 200: the largest results do not fit and travel pickled
def test_every_result_of_every_share_arrives_with_its_bytes(region_bytes):
    def work(share):
        return (((share, index), _tensors(share, index)) for index in range(40))

    # share 1 has regions for 30 results: its last 10 travel pickled and leave share 2's regions alone
    memory = SharedRegions().claim(110 * region_bytes)
    got = {small: [bytes(t) for t in tensors] for small, tensors in forked_results(work, [40, 30, 40], memory, region_bytes)}
    assert sorted(got) == [(share, index) for share in range(3) for index in range(40)]
    for (share, index), tensors in got.items():
        assert tensors == _expected(share, index)


def test_shared_memory_is_handed_out_again_only_when_no_result_of_it_is_read_any_more():
    def work(share):
        return (((share, index), _tensors(share, index)) for index in range(10))

    regions = SharedRegions()
    first = regions.claim(20 * 1024)
    kept = [(small, tensors) for small, tensors in forked_results(work, [10, 10], first, 1024) if small == (1, 3)]
    second = regions.claim(20 * 1024)
    assert second is not first  # a view of the first round's memory is alive: writing there would change it
    assert [bytes(t) for t in kept[0][1]] == _expected(1, 3)
    got = {small: [bytes(t) for t in tensors] for small, tensors in forked_results(work, [10, 10], second, 1024)}
    assert got == {(share, index): _expected(share, index) for share in range(2) for index in range(10)}
    assert [bytes(t) for t in kept[0][1]] == _expected(1, 3)  # the old result unchanged by the new round
    del got, kept
    assert regions.claim(20 * 1024) is second  # nothing reads it now
    assert regions.claim(40 * 1024) is not second  # too small for the larger round
