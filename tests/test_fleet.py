"""Fleet behaviour: dropouts, stragglers, late joiners, leavers, uneven epochs, short rounds.

The unit tests pin down the draws and the mod; the simulations run fedrec's real apps on a
small synthetic fleet with faults and check that every round is accounted for and that
training still converges.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common.constant import ErrorCode
from flwr.supercore.task_identity import TaskIdentity

from client.fleet import FIT_CONFIG_KEY, LOCAL_EPOCHS_KEY, DeviceTraits, absence, device_traits, fleet_mod, round_epochs
from common.config import ConfigError, parse_run_config
from server.fleet import DeadlineGrid, with_deadline
from server.strategy import progress_line
from simulations.engine import fused_run_config, run_in_process


def _config(**overrides):
    return parse_run_config(fused_run_config(overrides))


def test_traits_follow_the_configured_shares_and_replay_exactly():
    config = _config(**{"straggler-fraction": 0.2, "late-join-fraction": 0.3, "leave-fraction": 0.1,
                        "num-server-rounds": 20})
    traits = [device_traits(config, key) for key in range(4000)]
    assert abs(np.mean([t.straggler for t in traits]) - 0.2) < 0.03
    late = [t.joins_at for t in traits if t.joins_at > 1]
    assert abs(len(late) / 4000 - 0.3) < 0.03 and min(late) >= 2 and max(late) <= 20
    leaving = [t for t in traits if t.leaves_at <= 20]
    assert abs(len(leaving) / 4000 - 0.1) < 0.03
    assert all(t.joins_at < t.leaves_at for t in leaving), "a device leaves only after it joined"
    assert traits == [device_traits(config, key) for key in range(4000)], "same seed, same fleet"
    other_seed = _config(**{"seed": 7, "straggler-fraction": 0.2, "late-join-fraction": 0.3, "leave-fraction": 0.1,
                            "num-server-rounds": 20})
    assert traits != [device_traits(other_seed, key) for key in range(4000)]


def test_each_trait_keeps_its_draws_whatever_the_other_knobs_and_none_is_drawn_at_zero(monkeypatch):
    rounds = {"num-server-rounds": 20}
    alone = [device_traits(_config(**{"straggler-fraction": 0.2, **rounds}), key) for key in range(500)]
    leaving = [device_traits(_config(**{"leave-fraction": 0.3, **rounds}), key) for key in range(500)]
    both = [device_traits(_config(**{"straggler-fraction": 0.2, "leave-fraction": 0.3, **rounds}), key)
            for key in range(500)]
    assert [t.straggler for t in both] == [t.straggler for t in alone] and any(t.straggler for t in both)
    assert [t.leaves_at for t in both] == [t.leaves_at for t in leaving] and any(t.leaves_at <= 20 for t in both)
    plain = _config(**rounds)
    monkeypatch.setattr("client.fleet._rng", lambda *args: pytest.fail("a trait of fraction 0 drew a number"))
    assert {device_traits(plain, key) for key in range(50)} == {DeviceTraits(False, 1, 21)}
    assert absence(plain, 3, 5) == ""


def test_dropout_draws_are_per_round_and_do_not_move_with_other_knobs():
    config = _config(**{"dropout-probability": 0.3})
    absent = np.array([[bool(absence(config, key, r)) for r in range(1, 11)] for key in range(500)])
    assert abs(absent.mean() - 0.3) < 0.03
    mixed = absent.any(axis=1) & ~absent.all(axis=1)
    assert mixed.mean() > 0.9, "dropouts are drawn each round, not once per device"
    with_stragglers = _config(**{"dropout-probability": 0.3, "straggler-fraction": 0.5, "local-epochs-min": 1})
    again = np.array([[bool(absence(with_stragglers, key, r)) for r in range(1, 11)] for key in range(500)])
    np.testing.assert_array_equal(absent, again)
    retried = np.array([[bool(absence(config, key, r, attempt=1)) for r in range(1, 11)] for key in range(500)])
    assert (retried != absent).any(), "a retried round draws its dropouts anew"


def test_uneven_epochs_stay_within_the_configured_range():
    config = _config(**{"local-epochs": 4, "local-epochs-min": 1})
    epochs = [round_epochs(config, key, r) for key in range(200) for r in range(1, 6)]
    assert set(epochs) == {1, 2, 3, 4}
    assert round_epochs(_config(**{"local-epochs": 3}), 5, 1) == 3


@pytest.mark.parametrize("key,value", [("dropout-probability", 1.5), ("straggler-fraction", -0.1),
                                       ("local-epochs-min", 9), ("too-few-clients", "wait"),
                                       ("straggler-slowdown", 0.0), ("round-deadline", -1.0)])
def test_bad_fleet_settings_fail_before_training(key, value):
    with pytest.raises(ConfigError, match=key):
        _config(**{key: value})


@pytest.fixture
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's ids; outside a run we provide them."""
    for name in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, name, 1, raising=False)


def _train_message(server_round: int, **extra) -> Message:
    content = RecordDict({FIT_CONFIG_KEY: ConfigRecord({"server-round": server_round, **extra})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


class _Context:
    def __init__(self, run_config: dict, partition: int) -> None:
        self.run_config = run_config
        self.node_config = {"partition-id": partition}
        self.node_id = 99


def _reply(msg, context):
    return Message(RecordDict({"answer": ConfigRecord({"epochs": msg.content.config_records[FIT_CONFIG_KEY].get(
        LOCAL_EPOCHS_KEY, -1)})}), reply_to=msg)


def _first_key(config, wanted) -> int:
    return next(key for key in range(10_000) if wanted(key))


def test_mod_refuses_for_absent_devices_and_sets_epochs_for_present_ones(task_identity):
    run_config = fused_run_config({"dropout-probability": 0.5, "local-epochs": 3, "local-epochs-min": 1})
    config = parse_run_config(run_config)
    gone = _first_key(config, lambda k: absence(config, k, 4) != "")
    here = _first_key(config, lambda k: absence(config, k, 4) == "")
    refused = fleet_mod(_train_message(4), _Context(run_config, gone), _reply)
    assert refused.has_error() and refused.error.code == ErrorCode.NODE_UNAVAILABLE
    assert refused.error.reason.startswith("fleet:") and "dropped" in refused.error.reason
    answered = fleet_mod(_train_message(4), _Context(run_config, here), _reply)
    assert answered.content.config_records["answer"]["epochs"] == round_epochs(config, here, 4)


def test_mod_drops_stragglers_past_the_deadline_on_virtual_time_only(task_identity):
    run_config = fused_run_config({"straggler-fraction": 0.5, "straggler-slowdown": 1e12, "round-deadline": 60.0})
    config = parse_run_config(run_config)
    slow = _first_key(config, lambda k: device_traits(config, k).straggler)
    fast = _first_key(config, lambda k: not device_traits(config, k).straggler)
    late = fleet_mod(_train_message(1), _Context(run_config, slow), _reply)
    assert late.has_error() and "deadline" in late.error.reason
    assert not fleet_mod(_train_message(1), _Context(run_config, fast), _reply).has_error()


def test_mod_leaves_evaluation_and_key_exchange_alone(task_identity):
    run_config = fused_run_config({"dropout-probability": 1.0})
    evaluate = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.EVALUATE)
    assert fleet_mod(evaluate, _Context(run_config, 0), lambda m, c: "passed") == "passed"
    key_exchange = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)
    assert fleet_mod(key_exchange, _Context(run_config, 0), lambda m, c: "passed") == "passed"
    assert fleet_mod(_train_message(1), _Context(run_config, 0), _reply).has_error()


def test_late_joiners_and_leavers_are_absent_exactly_outside_their_rounds():
    config = _config(**{"late-join-fraction": 1.0, "leave-fraction": 1.0, "num-server-rounds": 30})
    traits = device_traits(config, 3)
    for server_round in range(1, 31):
        present = traits.joins_at <= server_round < traits.leaves_at
        assert (absence(config, 3, server_round) == "") == present


class _Grid:
    def __init__(self) -> None:
        self.timeouts: list = []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return []


def test_deployments_stop_waiting_at_the_deadline_simulations_do_not():
    config = _config(**{"round-deadline": 30.0})
    inner = _Grid()
    grid = with_deadline(inner, config, "superlink")
    assert isinstance(grid, DeadlineGrid)
    grid.send_and_receive([])
    grid.send_and_receive([], timeout=5.0)  # a workflow's own timeout wins (SecAgg+ sets one per stage)
    assert inner.timeouts == [30.0, 5.0]
    assert with_deadline(inner, config, "simulation") is inner
    assert with_deadline(inner, _config(), "superlink") is inner


def test_progress_line_shows_round_updates_problems_and_eta():
    line = progress_line(14, 100, {"clients_sampled": 100, "clients_ok": 68, "clients_failed": 30,
                                   "clients_rejected": 2, "train_loss": 0.07612}, 4.3, 5.0)
    assert line.startswith("fedrec: round 14/100 | 68/100 updates (30 failed, 2 rejected)")
    assert "loss 0.0761" in line and "ETA 7 min 10 s" in line
    assert "ETA" not in progress_line(100, 100, {"clients_ok": 1}, 1.0, 5.0)
    assert "loss" not in progress_line(3, 9, {"clients_ok": 1, "train_loss": float("nan")}, 1.0, 5.0)


# --- real simulations on a small synthetic fleet --------------------------------------------
FLEET = {
    "synthetic-users": 60, "synthetic-items": 100, "synthetic-mean-interactions": 20, "eval-negatives": 49,
    "embedding-dim": 8, "local-epochs": 2, "batch-size": 16, "learning-rate": 0.05, "server-learning-rate": 2.0,
    "clients-per-round": 60, "num-server-rounds": 12, "evaluate-every": 100, "final-full-evaluation": True,
    "report": False, "checkpoint-every": 100,
}


def _run(tmp: Path, name: str, **overrides) -> tuple[list[dict], dict]:
    run_dir = tmp / name
    settings = {**FLEET, **overrides, "run-dir": str(run_dir)}
    run_in_process(settings, settings["synthetic-users"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fleet"), "fault-free")


def test_training_converges_with_30_percent_dropout(tmp_path, fault_free):
    _, clean = fault_free
    rows, faulty = _run(tmp_path, "dropout", **{"dropout-probability": 0.3})
    fits = [r for r in rows if r["phase"] == "fit"]
    assert [r["round"] for r in fits] == list(range(1, 13)), "every round is run and recorded once"
    sampled = sum(r["clients_sampled"] for r in fits)
    dropped = sum(r["clients_unavailable"] for r in fits)
    assert abs(dropped / sampled - 0.3) < 0.08
    assert all(r["clients_ok"] + r["clients_failed"] == r["clients_sampled"] for r in fits)
    hr, clean_hr = (s["final_evaluation"]["test_sampled_hr@10"] for s in (faulty, clean))
    # Every device is asked every round, so the two runs differ only by the seeded dropouts
    # (with 20 of 60 per round and Flower's random sampling, two runs read HR@10 0.35 and 0.50).
    late_loss = np.mean([r["train_loss"] for r in fits[-4:]])
    assert late_loss < 0.9 * fits[0]["train_loss"], "training still converges"
    assert abs(hr - clean_hr) <= 0.1, f"HR@10 {hr:.3f} with 30% dropout against {clean_hr:.3f} without"


def test_short_rounds_are_skipped_or_retried_never_crash(tmp_path):
    short = {"synthetic-users": 10, "clients-per-round": 10, "min-train-clients": 9, "min-available-clients": 9,
             "dropout-probability": 0.25, "num-server-rounds": 8}
    skip_rows, skip = _run(tmp_path, "skip", **short)
    retry_rows, retry = _run(tmp_path, "retry", **short, **{"too-few-clients": "retry", "round-retries": 3})
    for rows, summary in ((skip_rows, skip), (retry_rows, retry)):
        fits = [r for r in rows if r["phase"] == "fit"]
        assert [r["round"] for r in fits] == list(range(1, 9)) and summary["rounds"] == 8
    skipped = sum(r["clients_ok"] < 9 for r in skip_rows if r["phase"] == "fit")
    still_skipped = sum(r["clients_ok"] < 9 for r in retry_rows if r["phase"] == "fit")
    assert skipped >= 3, "the scenario must produce short rounds for this test to mean anything"
    assert still_skipped < skipped


def test_the_engine_delivers_each_nodes_next_message_once_in_one_pass():
    """simulations.engine's replacement for flwr 1.41's per-node polling of the message store."""
    import threading
    from types import SimpleNamespace

    from simulations.engine import undelivered_one_per_node

    def message(node):
        return SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, delivered_at=""))

    store = {f"m{i}": message(node) for i, node in enumerate([1, 2, 1, 3, 99])}
    checked = []
    state = SimpleNamespace(lock=threading.RLock(), message_ins_store=store,
                            _check_stored_messages=lambda ids: checked.append(set(ids)))
    nodes = {1: 0, 2: 1, 3: 2}  # node 99 is not a simulated SuperNode
    first = undelivered_one_per_node(state, nodes)
    assert [m is store[k] for m, k in zip(first, ["m0", "m1", "m3"], strict=True)] == [True, True, True]
    assert all(m.metadata.delivered_at for m in first) and checked == [set(store)]
    second = undelivered_one_per_node(state, nodes)
    assert second == [store["m2"]], "a node's second message waits for the next cycle"
    assert undelivered_one_per_node(state, nodes) == [] and store["m4"].metadata.delivered_at == ""
