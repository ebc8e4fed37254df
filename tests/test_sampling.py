"""Seeded client sampling: in simulation the same run-config trains the same devices each round."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from client.client_app import MODS, client_fn
from common.config import SIMULATION_PARTITIONS_KEY
from server.sampling import EVALUATE, FIT, partition_order, seeded_sample, simulation_partitions
from simulations.engine import partitions_record, run_in_process


def _clients(node_ids):
    return [SimpleNamespace(node_id=node) for node in node_ids]


def _pairs(partitions):
    return [(partition, SimpleNamespace(node_id=1000 + partition)) for partition in partitions]


def test_the_sample_is_a_function_of_seed_round_stream_and_attempt():
    ordered = _pairs(range(30))
    draw = lambda *key: [c.node_id for c in seeded_sample(ordered, 5, *key)]  # noqa: E731
    assert draw(42, 3, FIT) == draw(42, 3, FIT)
    assert len(set(draw(42, 3, FIT))) == 5
    others = [draw(43, 3, FIT), draw(42, 4, FIT), draw(42, 3, EVALUATE), draw(42, 3, FIT, 1)]
    assert all(other != draw(42, 3, FIT) for other in others)
    assert len(seeded_sample(ordered, 99, 42, 1, FIT)) == 30, "never more than there are"


def test_added_devices_displace_only_as_many_of_the_others_as_they_take():
    honest = _pairs(range(943))
    with_fakes = honest + _pairs(range(943, 991))
    for server_round in range(1, 6):
        clean = {c.node_id for c in seeded_sample(honest, 100, 42, server_round, FIT)}
        attacked = {c.node_id for c in seeded_sample(with_fakes, 100, 42, server_round, FIT)}
        fakes = {node for node in attacked if node >= 1000 + 943}
        assert len(attacked) == 100 and attacked - fakes <= clean
        assert len(clean - attacked) == len(fakes)


def test_every_device_is_equally_likely():
    ordered = _pairs(range(20))
    counts = np.zeros(20)
    for server_round in range(2000):
        for client in seeded_sample(ordered, 5, 1, server_round, FIT):
            counts[client.node_id - 1000] += 1
    assert np.all(np.abs(counts / 2000 - 0.25) < 0.04), counts / 2000


def test_clients_are_ordered_by_partition_not_by_their_random_node_ids():
    mapping = {900: 2, 17: 0, 5000: 1}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    assert simulation_partitions(context) == {}
    context.state.array_records[SIMULATION_PARTITIONS_KEY] = partitions_record(mapping)
    assert simulation_partitions(context) == mapping
    ordered = partition_order(_clients([900, 17, 5000]), lambda: simulation_partitions(context))
    assert [(p, c.node_id) for p, c in ordered] == [(0, 17), (1, 5000), (2, 900)]
    assert partition_order(_clients([900, 4]), lambda: mapping, wait=0.0) is None, "an unknown node: no seeded order"


SMALL = {
    "synthetic-users": 12, "synthetic-items": 60, "eval-negatives": 20, "synthetic-mean-interactions": 10,
    "num-server-rounds": 3, "clients-per-round": 4, "evaluate-every": 100, "final-full-evaluation": True,
    "embedding-dim": 8, "report": False, "checkpoint-every": 100,
}


def _sampled(tmp: Path, name: str, **overrides) -> tuple[dict[int, set[int]], list[dict], dict]:
    """Run a small simulation; which partitions trained in each round, the metric rows, the summary."""
    seen = tmp / f"{name}-seen"
    seen.mkdir()

    def record(msg, context, call_next):
        fit = msg.content.config_records.get("fitins.config")
        if fit is not None:
            (seen / f"{fit['server-round']}-{context.node_config['partition-id']}").touch()
        return call_next(msg, context)

    settings = {**SMALL, **overrides, "run-dir": str(tmp / name)}
    run_in_process(settings, 12, client_app=ClientApp(client_fn=client_fn, mods=[record, *MODS]))
    rounds: dict[int, set[int]] = {}
    for path in seen.iterdir():
        server_round, partition = map(int, path.name.split("-"))
        rounds.setdefault(server_round, set()).add(partition)
    rows = [json.loads(line) for line in (tmp / name / "metrics.jsonl").read_text().splitlines()]
    return rounds, rows, json.loads((tmp / name / "summary.json").read_text())


def test_two_simulations_of_one_run_config_train_the_same_devices_and_agree(tmp_path):
    first, first_rows, first_summary = _sampled(tmp_path, "a")
    second, second_rows, second_summary = _sampled(tmp_path, "b")
    assert sorted(first) == [1, 2, 3] and all(len(p) == 4 for p in first.values())
    assert first == second, "same seed and rounds, same devices"
    assert len({frozenset(p) for p in first.values()}) > 1, "rounds draw different devices"
    losses = [[r["train_loss"] for r in rows if r["phase"] == "fit"] for rows in (first_rows, second_rows)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-9)
    final = [s["final_evaluation"]["test_sampled_hr@10"] for s in (first_summary, second_summary)]
    assert final[0] == pytest.approx(final[1], abs=1e-12), "a repeatable benchmark"
    other, _, _ = _sampled(tmp_path, "seed-7", seed=7)
    assert other != first, "another seed draws other devices"
