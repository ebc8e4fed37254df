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
from common import metrics as M
from common.config import parse_run_config
from common.evaluation import GROUP_METRICS, GROUP_PREFIX, RECOMMENDED_ITEMS_KEY
from common.federation import prepare_cached, slicer_cached
from common.models import build_model
from common.private_eval import EVALUATE_ONLY_KEY, layout_for
from common.updates import UpdateLayout, decode_mean_update
from common.user_groups import activity_labels
from server.report import build_report, validate_report
from server.run_dir import load_checkpoint
from simulations.engine import fused_run_config, run_in_process

ALLOWED_FIT_METRICS = {"train_loss", "train_seconds", "upload_bytes", "download_bytes", "items_touched"}


def secagg_stage(msg) -> str:
    """The SecAgg+ stage a request asks for ("" outside SecAgg+); an evaluation round's masked stage is marked."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None:
        return ""
    stage = str(configs.get(Key.STAGE, ""))
    fit_config = msg.content.config_records.get("fitins.config")
    if stage == Stage.COLLECT_MASKED_VECTORS and fit_config is not None and fit_config.get(EVALUATE_ONLY_KEY):
        return stage + " (evaluation)"
    return stage


def recording_mod(out_dir: Path):
    """A Flower mod that pickles each reply and the node's kept state after it."""

    def mod(msg, context, call_next):
        stage = secagg_stage(msg)  # read before SecAgg+ pops it from the request
        reply = call_next(msg, context)
        content = reply.content if reply.has_content() else None
        record = {
            "type": msg.metadata.message_type,
            "stage": stage,
            "metrics": {name: dict(rec) for name, rec in content.metric_records.items()} if content else {},
            "node_config": dict(context.node_config),
            "arrays": (
                {name: [a.numpy() for a in rec.values()] for name, rec in content.array_records.items()} if content else {}
            ),
            "array_keys": {name: list(rec.keys()) for name, rec in content.array_records.items()} if content else {},
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
    # Four SecAgg+ stages per round, two training rounds and the final evaluation (its sums go
    # through SecAgg+ too); only the masked-vector stage carries the update or the sums.
    assert len(train) == 3 * 12 * 4
    assert not [r for r in replies if r["type"] == "evaluate"], "no evaluation reply in the clear"
    assert all(not any(r["arrays"].values()) for r in train), "no update travels as plain arrays"
    masked = [r for r in train if any("masked" in str(k) for rec in r["configs"].values() for k in rec)]
    assert len(masked) == 3 * 12
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
        fit_config = msg.content.config_records.get("fitins.config")
        if msg.metadata.message_type == MessageType.TRAIN and not (fit_config and fit_config.get(EVALUATE_ONLY_KEY)):
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
    for name, value in zip(layout.names, expected, strict=True):
        np.testing.assert_allclose(secure_model[name], value, atol=2e-3, err_msg=name)


# --- what the server receives, per privacy mode ---------------------------------------------------------------
# Real runs in each mode; every reply is recorded as it leaves the device and compared with the
# report's disclosure table, and the reconstruction attacks are run on the recorded replies.

MODES = {
    "plain": {},
    "secagg": {"secure-aggregation": True},
    "user-dp": {"user-dp": True},
    "record-dp": {"record-dp": True},
    "both-dp+secagg": {"secure-aggregation": True, "user-dp": True, "record-dp": True},
}
TINY = {
    "synthetic-users": 10, "synthetic-items": 50, "synthetic-mean-interactions": 6, "eval-negatives": 10,
    "model": "mf", "embedding-dim": 4, "num-server-rounds": 2, "evaluate-every": 2, "fraction-evaluate": 1.0,
    "num-negatives": 1, "local-epochs": 1, "group-min-users": 1, "report": False,
}


def eval_vector_recorder(out_dir: Path):
    """Inside SecAgg+: a device's evaluation vector before masking, which only the test gets to see."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        fit_config = msg.content.config_records.get("fitins.config")
        if msg.metadata.message_type == MessageType.TRAIN and fit_config is not None and fit_config.get(EVALUATE_ONLY_KEY):
            vector = parameters_to_ndarrays(recorddict_to_fitres(reply.content, keep_input=True).parameters)[0]
            (out_dir / f"{context.node_config['partition-id']}.npy").write_bytes(pickle.dumps(vector))
        return reply

    return mod


@pytest.fixture(scope="module")
def mode_runs(tmp_path_factory):
    runs = {}
    for mode, switches in MODES.items():
        tmp = tmp_path_factory.mktemp(mode)
        vectors = tmp / "vectors"
        vectors.mkdir()
        overrides, replies = simulate(tmp, {**TINY, **switches}, inner=[eval_vector_recorder(vectors)])
        runs[mode] = (overrides, replies, vectors)
    return runs


def _type_name(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, list):
        return "list[" + "|".join(sorted({_type_name(v) for v in value})) + "]" if value else "list"
    return type(value).__name__


def received_fields(replies) -> dict[tuple, int]:
    """(message type, SecAgg+ stage, record kind, record, key, type) -> replies carrying it, as sent."""
    counts: dict[tuple, int] = {}
    for r in replies:
        rows = [("arrays", name, key, f"{a.dtype} {list(a.shape)}")
                for name in r["arrays"] for key, a in zip(r["array_keys"][name], r["arrays"][name], strict=True)]
        rows += [("config", name, key, _type_name(v)) for name, rec in r["configs"].items() for key, v in rec.items()]
        rows += [("metrics", name, key, _type_name(v)) for name, rec in r["metrics"].items() for key, v in rec.items()]
        for row in rows:
            counts[(r["type"], r["stage"], *row)] = counts.get((r["type"], r["stage"], *row), 0) + 1
    return counts


def field_table(replies) -> dict[tuple[str, str], set[str]]:
    """Per (message type, stage) the fields sent, group labels and array indices generalised."""
    table: dict[tuple[str, str], set[str]] = {}
    for message_type, stage, _, record, key, _ in received_fields(replies):
        if key.startswith(GROUP_PREFIX):
            key = f"{GROUP_PREFIX}<group>/{key.rsplit('/', 1)[1]}"
        elif record == "fitres.parameters":
            key = "<array>"
        table.setdefault((message_type, stage), set()).add(f"{record}/{key}")
    return table


def _expected_tables() -> dict[str, dict[tuple[str, str], set[str]]]:
    sampled = [f"sampled_{m}" for m in M.sampled_metrics(np.zeros(1), np.zeros((1, 1)), k=10)]
    full = [f"full_{m}" for m in M.full_ranking_metrics(np.zeros((1, 2)), [np.array([0])], k=10)]
    sums = {f"evaluateres.metrics/{p}_{m}" for p in ("test", "val") for m in ("count", *sampled, *full)}
    sums.add("evaluateres.metrics/test_ild@10")
    status = lambda res: {f"{res}.status/code", f"{res}.status/message"}  # noqa: E731
    evaluate = sums | status("evaluateres") | {"evaluateres.loss/loss", "evaluateres.num_examples/num_examples"}
    lists_and_groups = {f"evaluateres.metrics/{RECOMMENDED_ITEMS_KEY}"} | {
        f"evaluateres.metrics/{GROUP_PREFIX}<group>/{m}" for m in ("count", *GROUP_METRICS)}
    train_stats = {f"fitres.metrics/{m}" for m in ALLOWED_FIT_METRICS}
    dp_stats = {f"fitres.metrics/{m}" for m in ("train_seconds", "upload_bytes", "download_bytes")}
    record_stats = {"fitres.metrics/record_epsilon", "fitres.metrics/record_dp_declined"}
    weight = {"fitres.num_examples/num_examples"}
    plain_fit = lambda stats: {"fitres.parameters/<array>"} | stats | weight | status("fitres")  # noqa: E731
    protocol = {
        ("train", "setup"): {"secaggplus_configs/pk1", "secaggplus_configs/pk2"},
        ("train", "share_keys"): {"secaggplus_configs/ctxts", "secaggplus_configs/dsts"},
        ("train", "unmask"): {"secaggplus_configs/nids", "secaggplus_configs/shares"},
        ("train", "collect_masked_vectors (evaluation)"): {"secaggplus_configs/masked_params"} | weight | status("fitres"),
    }
    masked_fit = lambda stats: {"secaggplus_configs/masked_params"} | stats | weight | status("fitres")  # noqa: E731
    return {
        "plain": {("train", ""): plain_fit(train_stats), ("evaluate", ""): evaluate | lists_and_groups},
        "user-dp": {("train", ""): plain_fit(dp_stats), ("evaluate", ""): evaluate},
        "record-dp": {("train", ""): plain_fit(dp_stats | record_stats), ("evaluate", ""): evaluate},
        "secagg": {**protocol, ("train", "collect_masked_vectors"): masked_fit(train_stats)},
        "both-dp+secagg": {**protocol, ("train", "collect_masked_vectors"): masked_fit(dp_stats | record_stats)},
    }


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_sends_exactly_its_documented_fields_and_the_report_lists_them(mode_runs, mode):
    overrides, replies, _ = mode_runs[mode]
    assert field_table(replies) == _expected_tables()[mode]
    report = build_report(overrides["run-dir"])
    validate_report(report)
    assert report["disclosure"]["recorded"]
    listed = {(f["message_type"], f["stage"], f["record_kind"], f["record"], f["key"], f["type"]): f["replies"]
              for f in report["disclosure"]["fields"]}
    assert listed == received_fields(replies), "the report's table is what the devices sent, reply for reply"
    clear = {f["record"] + "/" + f["key"] for f in report["disclosure"]["fields"] if f["visibility"] == "clear"}
    if mode != "plain":
        assert not any(RECOMMENDED_ITEMS_KEY in f or GROUP_PREFIX in f for f in clear), "no list or group label in the clear"
    if MODES[mode].get("secure-aggregation"):
        assert not any(f.startswith(("evaluateres.", "fitres.parameters")) for f in clear)
        assert all(f["reveals"] != "unexplained field: not described by this report" for f in report["disclosure"]["fields"])


def _truth(overrides: dict):
    config = parse_run_config(fused_run_config(overrides))
    slicer = slicer_cached(config)
    return config, [slicer.client(pid) for pid in range(len(slicer))]


def attack_held_out_items(replies) -> dict[int, int]:
    """(a) A phone's held-out item: its top-10 list read at the rank its full NDCG@10 gives (2**(1/ndcg) - 2)."""
    found = {}
    for r in replies:
        metrics = r["configs"].get("evaluateres.metrics", {})
        if RECOMMENDED_ITEMS_KEY in metrics and metrics.get("test_count") == 1 and metrics.get("test_full_ndcg@10", 0) > 0:
            ranked = np.frombuffer(metrics[RECOMMENDED_ITEMS_KEY], "<i4")
            found[r["node_config"]["partition-id"]] = int(ranked[round(2 ** (1 / metrics["test_full_ndcg@10"]) - 2)])
    return found


def attack_interacted_items(replies, num_items: int) -> dict[int, set[int]]:
    """(b) The items a phone trained on: the non-zero item rows of its upload (and its touched vector)."""
    suspects = {}
    for r in replies:
        arrays = r["arrays"].get("fitres.parameters") or []
        if r["type"] != "train" or not arrays:
            continue
        rows = set()
        for array in arrays:
            if array.ndim == 2 and array.shape[0] == num_items:
                rows |= set(np.flatnonzero(np.any(array != 0, axis=1)).tolist())
            elif array.shape == (num_items,) and not np.all(array == 1):
                rows |= set(np.flatnonzero(array).tolist())
        suspects.setdefault(r["node_config"]["partition-id"], set()).update(rows)
    return suspects


def attack_groups(replies) -> dict[int, set[str]]:
    """(c) The groups a phone's user is in: the labels of its group keys."""
    found: dict[int, set[str]] = {}
    for r in replies:
        for key, value in r["configs"].get("evaluateres.metrics", {}).items():
            if key.startswith(GROUP_PREFIX) and key.endswith("/count") and value > 0:
                found.setdefault(r["node_config"]["partition-id"], set()).add(key[len(GROUP_PREFIX):-len("/count")])
    return found


def test_reconstruction_attacks_work_on_plain_replies(mode_runs):
    overrides, replies, _ = mode_runs["plain"]
    config, clients = _truth(overrides)
    held_out = attack_held_out_items(replies)
    assert len(held_out) >= 2, "some phones had their held-out item in the top 10"
    assert all(item == int(clients[pid].test.items[0]) for pid, item in held_out.items()), "every one recovered exactly"
    suspects = attack_interacted_items(replies, config.synthetic_items)
    assert len(suspects) == len(clients), "every phone uploaded in the clear"
    for pid, items in suspects.items():
        trained = set(clients[pid].train_items.tolist())
        assert trained <= items, "every training item is among the changed rows"
        assert len(trained) / len(items) >= 2 * len(trained) / config.synthetic_items, "far better than guessing"
    groups = attack_groups(replies)
    assert len(groups) == len(clients)
    for pid, labels in groups.items():
        count = len(clients[pid].train_items)
        assert labels == {f"activity={activity_labels(np.array([count]), config.list_metrics.activity_bands)[0]}"}


@pytest.mark.parametrize("mode", ["secagg", "user-dp", "record-dp", "both-dp+secagg"])
def test_reconstruction_attacks_fail_where_the_mode_claims_to_stop_them(mode_runs, mode):
    overrides, replies, _ = mode_runs[mode]
    config, clients = _truth(overrides)
    assert attack_held_out_items(replies) == {}, "no list reaches the server"
    assert attack_groups(replies) == {}, "no group label reaches the server"
    suspects = attack_interacted_items(replies, config.synthetic_items)
    if config.secure_aggregation:
        assert suspects == {}, "no update reaches the server in the clear"
    elif config.record_dp:
        # DP-SGD noises every row and the touched vector is all ones: the rows say nothing.
        assert suspects and all(items == set(range(config.synthetic_items)) for items in suspects.values())
    else:
        # Central user-level DP: the server sees each clipped update before adding noise, so the
        # changed rows still name the items (what the report says for this mode).
        assert suspects and all(set(clients[pid].train_items.tolist()) <= items for pid, items in suspects.items())
        assert any(len(items) < config.synthetic_items for items in suspects.values())


def test_secure_evaluation_reports_the_exact_sum_of_the_devices_vectors(mode_runs):
    overrides, _, vectors = mode_runs["secagg"]
    config, clients = _truth(overrides)
    sent = [pickle.loads(p.read_bytes()) for p in vectors.iterdir()]
    assert len(sent) == len(clients), "every device evaluated once (final round, whole population)"
    prepared = prepare_cached(config)
    layout = layout_for(config, has_catalogue=prepared.catalogue is not None, num_items=prepared.num_items)
    sums = layout.decode(np.mean(sent, axis=0), len(sent))
    final = [json.loads(line) for line in (Path(overrides["run-dir"]) / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["phase"] == "evaluate" and final["eval_clients"] == len(clients)
    assert final["test_count"] == sums["test_count"] == len(clients)
    for key in ("test_sampled_hr@10", "test_sampled_ndcg@10", "test_full_ndcg@10", "val_sampled_hr@10"):
        assert final[key] == pytest.approx(sums[key] / sums[key.split("_")[0] + "_count"], abs=1e-4), key
    assert final["coverage@10"] == pytest.approx(np.count_nonzero(sums["catalogue_counts"]) / prepared.num_items)
    bands = config.list_metrics.activity_bands
    labels = activity_labels(np.array([len(c.train_items) for c in clients]), bands)
    for label in set(labels):
        assert final[f"group/activity={label}/count"] == np.sum(labels == label) == sums[f"grp/activity={label}/count"]
