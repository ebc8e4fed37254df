"""Real Flower simulations on tiny synthetic fleets: what clients send, what the run leaves.

A client mod records every reply a ClientApp sends (and the device state it keeps) to
disk; the tests then check that nothing user-local or raw ever left a device.
"""

from __future__ import annotations

import json
import pickle
import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import recorddict_to_fitres

from client.client_app import LOCAL_STATE_KEY, MODS, client_fn
from common.config import parse_run_config
from common.federation import slicer_cached
from common.models import build_model
from common.updates import UpdateLayout, decode_mean_update
from server.run_dir import load_checkpoint
from simulations.engine import fused_run_config, run_in_process

ALLOWED_FIT_METRICS = {"train_loss", "train_seconds", "upload_bytes", "download_bytes", "items_touched"}


def recording_mod(out_dir: Path):
    """A Flower mod that pickles each reply and the node's kept state after it."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        content = reply.content if reply.has_content() else None
        record = {
            "type": msg.metadata.message_type,
            "node_config": dict(context.node_config),
            "arrays": (
                {name: [a.numpy() for a in rec.values()] for name, rec in content.array_records.items()} if content else {}
            ),
            "configs": {name: dict(rec) for name, rec in content.config_records.items()} if content else {},
            "kept": (
                {k: v.numpy() for k, v in context.state.array_records[LOCAL_STATE_KEY].items()}
                if LOCAL_STATE_KEY in context.state.array_records
                else {}
            ),
        }
        (out_dir / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(record))
        return reply

    return mod


def simulate(tmp: Path, overrides: dict, *, outer=(), inner=()) -> tuple[dict, list[dict]]:
    """Run fedrec's app; ``outer`` mods act before SecAgg+, ``inner`` ones see the plain reply."""
    replies = tmp / "replies"
    replies.mkdir()
    overrides = {"run-dir": str(tmp / "run"), **overrides}
    config = parse_run_config(fused_run_config(overrides))
    # The recorder sits outermost, so it sees exactly what leaves the device (after SecAgg+).
    app = ClientApp(client_fn=client_fn, mods=[recording_mod(replies), *outer, *MODS, *inner])
    run_in_process(overrides, len(slicer_cached(config)), client_app=app)
    return overrides, [pickle.loads(p.read_bytes()) for p in sorted(replies.iterdir())]


SMALL = {
    "synthetic-users": 12,
    "synthetic-items": 80,
    "eval-negatives": 20,
    "synthetic-mean-interactions": 10,
    "num-server-rounds": 3,
    "evaluate-every": 2,
    "fraction-evaluate": 1.0,
    "checkpoint-every": 2,
    "embedding-dim": 8,
    "mlp-layers": "16,8",
}


@pytest.fixture(scope="module")
def phone_run(tmp_path_factory):
    return simulate(tmp_path_factory.mktemp("phones"), {**SMALL, "model": "neumf"})


def _layout(overrides: dict) -> UpdateLayout:
    config = parse_run_config(fused_run_config(overrides))
    model = build_model(config.model_config, 0, config.synthetic_items)
    return UpdateLayout.from_state(model.shared_state(), model.item_row_parameter_names(), config.synthetic_items)


def _fit_replies(replies):
    return [r for r in replies if r["type"] == "train"]


def test_clients_send_only_shared_deltas_and_the_touched_vector(phone_run):
    overrides, replies = phone_run
    fits = _fit_replies(replies)
    assert len(fits) == 3 * 12, "every client trained every round"
    expected = _layout(overrides).upload_shapes()
    for reply in fits:
        arrays = [a for arrays in reply["arrays"].values() for a in arrays]
        assert [a.shape for a in arrays] == expected
        metrics = reply["configs"]["fitres.metrics"]
        assert set(metrics) <= ALLOWED_FIT_METRICS
        for record in reply["configs"].values():  # only scalars: no item lists, no ids
            assert all(isinstance(v, (int, float, str, bool)) for v in record.values())


def test_no_user_local_value_appears_in_any_reply(phone_run):
    _, replies = phone_run
    fits = _fit_replies(replies)
    assert all(r["kept"] for r in fits), "each client keeps its user tables in Context.state"
    for reply in fits:
        for name, kept in reply["kept"].items():
            assert name.startswith("user_")
            for row in kept:
                for arrays in reply["arrays"].values():
                    for array in arrays:
                        if array.ndim == 2 and array.shape[1] == row.size:
                            assert not np.any(np.all(np.isclose(array, row, atol=1e-7), axis=1)), name
    evals = [r for r in replies if r["type"] == "evaluate"]
    assert evals and all(not any(r["arrays"].values()) for r in evals), "evaluation replies carry no arrays"


def test_user_embedding_persists_across_rounds_in_context_state(phone_run):
    _, replies = phone_run
    by_node: dict[int, list[np.ndarray]] = {}
    for reply in _fit_replies(replies):
        by_node.setdefault(reply["node_config"]["partition-id"], []).append(reply["kept"]["user_gmf_embedding.weight"])
    assert len(by_node) == 12
    for history in by_node.values():
        assert len(history) == 3
        assert len({h.tobytes() for h in history}) == 3, "the kept embedding changes every round"


def test_run_directory_is_complete(phone_run):
    overrides, _ = phone_run
    run = Path(overrides["run-dir"])
    config = json.loads((run / "config.json").read_text())
    assert config["run_config"]["model"] == "neumf" and len(config["config_sha256"]) == 64
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if r["phase"] == "fit"] == [1, 2, 3]
    assert [r["round"] for r in rows if r["phase"] == "evaluate"] == [2, 3]
    final = rows[-1]
    assert final["eval_population"] == "all" and final["test_count"] == 12
    assert 0.0 <= final["test_sampled_hr@10"] <= 1.0 and "test_full_ndcg@10" in final
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("round,phase")
    traffic = [json.loads(line) for line in (run / "traffic.jsonl").read_text().splitlines()]
    assert len(traffic) == 36 and all(t["upload_bytes"] > 0 and t["download_bytes"] > 0 for t in traffic)
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"round-00002.npz", "final.npz"}
    last_round, arrays = load_checkpoint(run / "checkpoints" / "final.npz")
    assert last_round == 3 and set(arrays) == set(_layout(overrides).names)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["final_evaluation"]["round"] == 3


def test_float16_transport_halves_the_payload_and_tracks_the_float32_model(tmp_path, phone_run):
    base, _ = phone_run
    overrides, replies = simulate(tmp_path, {**SMALL, "model": "neumf", "transport-dtype": "float16"})
    fits = _fit_replies(replies)
    assert len(fits) == 3 * 12
    for reply in fits:
        assert all(a.dtype == np.float16 for arrays in reply["arrays"].values() for a in arrays)
    half = [json.loads(line) for line in (Path(overrides["run-dir"]) / "traffic.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (Path(base["run-dir"]) / "traffic.jsonl").read_text().splitlines()]
    for key in ("upload_bytes", "download_bytes"):
        assert np.mean([t[key] for t in half]) == pytest.approx(np.mean([t[key] for t in full]) / 2, rel=1e-6)
    _, model16 = load_checkpoint(Path(overrides["run-dir"]) / "checkpoints" / "final.npz")
    _, model32 = load_checkpoint(Path(base["run-dir"]) / "checkpoints" / "final.npz")
    assert all(a.dtype == np.float32 for a in model16.values()), "the server keeps a float32 master copy"
    config = parse_run_config(fused_run_config(overrides))
    initial = build_model(config.model_config, 0, config.synthetic_items, seed=config.seed).shared_state()
    for name, value in model32.items():  # same seeds, same clients: only float16 rounding differs
        learned = np.linalg.norm(value - initial[name])
        gap = np.linalg.norm(model16[name] - value) / learned
        assert gap < 0.1, f"{name}: float16 transport changed what training learned by {gap:.1%}"
        assert not np.array_equal(model16[name], value) or not value.any(), "the float16 path really ran"


def test_kiosks_hold_several_users_and_sampling_by_count(tmp_path):
    overrides, replies = simulate(
        tmp_path,
        {**SMALL, "model": "mf", "partitioning": "group", "users-per-client": 4, "clients-per-round": 2, "min-train-clients": 2},
    )
    fits = _fit_replies(replies)
    assert len(fits) == 3 * 2, "two of three kiosks per round"
    assert all(r["kept"]["user_embedding.weight"].shape == (4, 8) for r in fits)
    final = [json.loads(line) for line in (Path(overrides["run-dir"]) / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["eval_clients"] == 3 and final["test_count"] == 12


def test_secure_aggregation_hides_updates_and_matches_the_plain_mean(tmp_path):
    plain_dir, secure_dir = tmp_path / "plain", tmp_path / "secure"
    plain_dir.mkdir()
    secure_dir.mkdir()
    base = {**SMALL, "num-server-rounds": 2, "evaluate-every": 5}
    plain, _ = simulate(plain_dir, base)
    secure, replies = simulate(secure_dir, {**base, "secure-aggregation": True})
    train = _fit_replies(replies)
    # Four SecAgg+ stages per round; only the masked-vector stage carries the update.
    assert len(train) == 2 * 12 * 4
    assert all(not any(r["arrays"].values()) for r in train), "no update travels as plain arrays"
    masked = [r for r in train if any("masked" in str(k) for rec in r["configs"].values() for k in rec)]
    assert len(masked) == 2 * 12
    _, plain_model = load_checkpoint(Path(plain["run-dir"]) / "checkpoints" / "final.npz")
    _, secure_model = load_checkpoint(Path(secure["run-dir"]) / "checkpoints" / "final.npz")
    for name, value in plain_model.items():
        # Same seeds, same clients: only SecAgg+'s quantization (2**22 levels over [-8, 8]) differs.
        np.testing.assert_allclose(secure_model[name], value, atol=2e-3, err_msg=name)


DROPPED = {3, 7}  # partition ids that vanish after sharing their keys


def dropout_mod(msg, context, call_next):
    """The device disappears right before it would send its masked update."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.metadata.message_type == MessageType.TRAIN else None
    if configs and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS and context.node_config["partition-id"] in DROPPED:
        raise ConnectionError("device went offline")
    return call_next(msg, context)


def plain_upload_recorder(out_dir: Path):
    """Inside SecAgg+: the update before masking, which only the test gets to see."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            fitres = recorddict_to_fitres(reply.content, keep_input=True)
            record = (fitres.num_examples, parameters_to_ndarrays(fitres.parameters))
            (out_dir / f"{context.node_config['partition-id']}.pkl").write_bytes(pickle.dumps(record))
        return reply

    return mod


def test_secure_aggregation_survives_dropouts_and_aggregates_the_survivors(tmp_path):
    plain_dir = tmp_path / "plain-uploads"
    plain_dir.mkdir()
    overrides = {**SMALL, "num-server-rounds": 1, "evaluate-every": 5, "secure-aggregation": True,
                 "secagg-num-shares": 5, "secagg-reconstruction-threshold": 3}
    overrides, _ = simulate(tmp_path, overrides, outer=[dropout_mod], inner=[plain_upload_recorder(plain_dir)])
    run = Path(overrides["run-dir"])
    fit = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    # Flower's SecAgg+ workflow may list a dropped node once per stage it missed.
    assert fit["phase"] == "fit" and fit["clients_ok"] == 12 - len(DROPPED) and fit["clients_failed"] >= len(DROPPED)
    uploads = {int(p.stem): pickle.loads(p.read_bytes()) for p in plain_dir.iterdir()}
    survivors = [uploads[pid] for pid in sorted(uploads) if pid not in DROPPED]
    assert len(survivors) == 12 - len(DROPPED)
    total = sum(n for n, _ in survivors)
    mean = [sum(n / total * arrays[i].astype(np.float64) for n, arrays in survivors) for i in range(len(survivors[0][1]))]
    config = parse_run_config(fused_run_config(overrides))
    model = build_model(config.model_config, 0, config.synthetic_items, seed=config.seed)
    layout = _layout(overrides)
    expected = decode_mean_update(layout, list(model.shared_state().values()), mean,
                                  server_learning_rate=config.server_learning_rate)
    _, secure_model = load_checkpoint(run / "checkpoints" / "final.npz")
    for name, value in zip(layout.names, expected):
        np.testing.assert_allclose(secure_model[name], value, atol=2e-3, err_msg=name)
