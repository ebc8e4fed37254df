"""Device state on disk: kiosks add and forget users, state survives restarts.

The ClientApp is driven message by message (Flower's own ``ClientApp.__call__`` with legacy
fit messages, mods included) rather than through a Ray simulation, so each round takes
milliseconds and the test controls exactly what global model every kiosk receives.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import EvaluateIns, FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import ErrorCode
from flwr.compat.common.recorddict_compat import (
    evaluateins_to_recorddict,
    fitins_to_recorddict,
    recorddict_to_evaluateres,
    recorddict_to_fitres,
)
from flwr.supercore.task_identity import TaskIdentity

import client.client_app as client_app
import client.coldstart as coldstart
import client.device_state as device_state
import client.query as query_handler
from client import store
from client.client_app import LOCAL_STATE_KEY, app
from client.local import build_local_model, train_round, user_seed
from client.recommend import device_model, recommend_for_client, recommend_on_device
from common.config import parse_run_config
from common.errors import DataError
from common.federation import slicer_cached
from common.models import build_model
from common.updates import POPULAR_ITEMS_KEY, encode_item_list
from simulations.engine import fused_run_config

KIOSKS = {
    "synthetic-users": 12,
    "synthetic-items": 80,
    "eval-negatives": 20,
    "synthetic-mean-interactions": 10,
    "embedding-dim": 8,
    "mlp-layers": "16,8",
    "partitioning": "group",
    "users-per-client": 4,
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps messages with the running task's ids; outside a run we provide them."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1, raising=False)


def run_config(model: str = "mf", **overrides) -> dict:
    return fused_run_config({**KIOSKS, "model": model, **overrides})


def context(config: dict, state_dir: Path | None, partition: int = 0, partitions: int = 3) -> Context:
    """A fresh Context, as a (re)started SuperNode has."""
    node = {"partition-id": partition, "num-partitions": partitions}
    if state_dir is not None:
        node["state-dir"] = str(state_dir)
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config=config)


def global_model(config: dict, server_round: int) -> list[np.ndarray]:
    """A deterministic 'global model' for a round (round 1: the initial one)."""
    cfg = parse_run_config(config)
    shared = list(build_model(cfg.model_config, 0, cfg.synthetic_items, seed=cfg.seed).shared_state().values())
    rng = np.random.default_rng(server_round)
    return [a + (0.01 * rng.standard_normal(a.shape)).astype(np.float32) * (server_round > 1) for a in shared]


def fit(ctx: Context, server_round: int) -> tuple[list[np.ndarray], int]:
    """One training request through fedrec's ClientApp (and its mods); the plain upload."""
    content = fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(global_model(ctx.run_config, server_round)), {"server-round": server_round}),
        keep_input=True,
    )
    reply = app(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), ctx)
    fitres = recorddict_to_fitres(reply.content, keep_input=True)
    return parameters_to_ndarrays(fitres.parameters), fitres.num_examples


def evaluate(ctx: Context, server_round: int) -> dict:
    content = evaluateins_to_recorddict(
        EvaluateIns(ndarrays_to_parameters(global_model(ctx.run_config, server_round)), {}), keep_input=True
    )
    reply = app(Message(content, dst_node_id=1, message_type=MessageType.EVALUATE), ctx)
    return dict(recorddict_to_evaluateres(reply.content).metrics)


def assert_same_upload(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


def rows_of(state: store.DeviceState, user: int) -> dict[str, np.ndarray]:
    (i,) = np.flatnonzero(state.row_users == user)
    return {name: array[i] for name, array in state.rows.items()}


def context_arrays(ctx: Context) -> list[np.ndarray]:
    return [a.numpy() for record in ctx.state.array_records.values() for a in record.values()]


# --- erasure -------------------------------------------------------------------


@pytest.mark.parametrize(("model", "position"), [("mf", 1), ("neumf", 0)])
def test_after_forgetting_a_user_the_kiosk_uploads_what_a_kiosk_without_them_uploads(tmp_path, model, position):
    config = run_config(model)
    kiosk = tmp_path / "kiosk"
    ctx = context(config, kiosk)
    fit(ctx, 1)
    trained = store.load(kiosk)
    users = [int(u) for u in trained.users]
    assert len(users) == 4 and set(trained.row_users.tolist()) == set(users)
    gone = users[position]  # position 0 is the user the kiosk's seeds were derived from
    gone_rows = rows_of(trained, gone)

    store.forget_user(kiosk, gone)

    # Gone from the state on disk: no id, no interaction, no held-out item, no row ...
    with np.load(store.state_file(kiosk)) as raw:
        for key in ("users", "train_users", "row_users", "test_users", "val_users"):
            assert gone not in raw[key].tolist(), key
        assert all(len(raw[key]) == 3 for key in raw.files if key.startswith("rows:"))
    # ... and not a byte of their embedding in any file of the state directory.
    for path in kiosk.iterdir():
        blob = path.read_bytes()
        for name, row in gone_rows.items():
            if row.size > 1:
                assert row.tobytes() not in blob, (path.name, name)
    upload_after, examples_after = fit(ctx, 2)
    # The device keeps nothing of its users in Context: the state directory is the only copy.
    assert LOCAL_STATE_KEY not in ctx.state.array_records
    for array in context_arrays(ctx):
        for row in gone_rows.values():
            assert row.tobytes() not in array.tobytes()

    # A kiosk that never held `gone`: the same other users, interactions, rows and seeds,
    # built without client.store's erasure code.
    data = slicer_cached(parse_run_config(config)).client(0)
    others = [u for u in users if u != gone]
    never = store.DeviceState.empty(data.num_items)
    for user in others:
        local = users.index(user)
        mine = data.train_users == local
        never = never.with_user(user, data.train_items[mine], data.train_ratings[mine])
    never = never.with_local_state(
        {name: np.stack([rows_of(trained, u)[name] for u in others]) for name in trained.rows}
    )
    store.save(tmp_path / "never", never)
    upload_never, examples_never = fit(context(config, tmp_path / "never"), 2)

    assert examples_after == examples_never == sum(int((data.train_users == users.index(u)).sum()) for u in others)
    assert_same_upload(upload_after, upload_never)
    after, reference = store.load(kiosk), store.load(tmp_path / "never")
    assert after.users.tolist() == reference.users.tolist() == others
    for name in after.rows:
        assert after.rows[name].tobytes() == reference.rows[name].tobytes()

    # Control: had the kiosk kept the user, its upload would differ (the check can fail).
    store.save(tmp_path / "kept", trained)
    upload_kept, _ = fit(context(config, tmp_path / "kept"), 2)
    assert any(a.tobytes() != b.tobytes() for a, b in zip(upload_kept, upload_never, strict=True))


def test_a_forgotten_users_former_interactions_have_no_influence(tmp_path):
    """Whatever the forgotten user did on the device, the next upload is the same."""
    config = run_config("gmf")
    fit(context(config, tmp_path / "a"), 1)
    trained = store.load(tmp_path / "a")
    gone = int(trained.users[2])
    # A second kiosk, identical except that `gone` had other interactions and other rows.
    mine = trained.train_users == gone
    rng = np.random.default_rng(5)
    other_items = trained.train_items.copy()
    other_items[mine] = rng.integers(0, trained.num_items, int(mine.sum()))
    changed_rows = {name: array.copy() for name, array in trained.rows.items()}
    for array in changed_rows.values():
        array[trained.row_users == gone] = rng.standard_normal(array.shape[1:]).astype(np.float32)
    other = store.DeviceState(**{**trained.__dict__, "train_items": other_items, "rows": changed_rows})
    store.save(tmp_path / "b", other)

    uploads = []
    for name in ("a", "b"):
        store.forget_user(tmp_path / name, gone)
        uploads.append(fit(context(config, tmp_path / name), 2)[0])
    assert_same_upload(*uploads)


def test_an_added_user_trains_from_a_fresh_row_that_depends_only_on_that_user(tmp_path):
    config = run_config("mf")
    cfg = parse_run_config(config)
    fit(context(config, tmp_path / "a"), 1)
    fit(context(config, tmp_path / "b", partition=1), 1)
    for name in ("a", "b"):
        store.add_user(tmp_path / name, 500, items=[1, 2, 3, 5, 8])
    states = [store.load(tmp_path / name) for name in ("a", "b")]
    fresh = [s.local_state(cfg.model_config, cfg.seed) for s in states]
    expected = store.fresh_user_rows(cfg.model_config, cfg.synthetic_items, cfg.seed, 500)
    for state, local in zip(states, fresh, strict=True):
        assert state.users[-1] == 500 and 500 not in state.row_users
        for name, value in expected.items():
            # The same row on two kiosks with different users, and the kept users' rows unchanged.
            assert local[name][-1].tobytes() == value[0].tobytes()
            assert local[name][:-1].tobytes() == state.rows[name].tobytes()
    # A one-user device starts exactly where the default path (Context.state) starts.
    one_user = slicer_cached(parse_run_config(run_config("mf", partitioning="user"))).client(3)
    assert store.fresh_user_seed(cfg.seed, int(one_user.global_users[0])) == user_seed(cfg.seed, one_user)

    store.add_interactions(tmp_path / "a", 500, items=[13])
    _, examples = fit(context(config, tmp_path / "a"), 2)
    after = store.load(tmp_path / "a")
    assert examples == len(states[0].train_items) + 1
    assert 500 in after.row_users.tolist()
    assert not np.array_equal(rows_of(after, 500)["user_embedding.weight"], expected["user_embedding.weight"][0])


# --- persistence -----------------------------------------------------------------


def test_state_survives_a_supernode_restart_and_embeddings_continue(tmp_path, monkeypatch):
    config = run_config("neumf")
    cfg = parse_run_config(config)
    first = context(config, tmp_path)
    fit(first, 1)
    saved = store.load(tmp_path)
    assert saved.partition_id == 0 and len(saved.users) == 4

    # Restart: a new Context (nothing in its state) and no partition to fall back on.
    def no_partition(*_args):
        raise AssertionError("a restarted SuperNode must read its data from the state-dir")

    monkeypatch.setattr(device_state, "client_data_for", no_partition)
    restarted = context(config, tmp_path)
    upload, examples = fit(restarted, 2)

    data = saved.client_data()
    shared = global_model(config, 2)
    kwargs = dict(seed=cfg.seed, server_round=2, rowwise=cfg.row_wise_aggregation)
    continued = train_round(cfg.model_config, cfg.train_config, data, shared, saved.rows, **kwargs)
    reinitialised = train_round(cfg.model_config, cfg.train_config, data, shared, None, **kwargs)
    assert_same_upload(upload, continued.upload)
    assert examples == continued.num_examples
    assert any(a.tobytes() != b.tobytes() for a, b in zip(upload, reinitialised.upload, strict=True))
    after = store.load(tmp_path)
    for name, value in continued.local_state.items():
        assert after.rows[name].tobytes() == value.tobytes()
    metrics = evaluate(context(config, tmp_path), 2)
    assert metrics["test_count"] == 4


def test_without_a_state_dir_nothing_is_written_and_rows_stay_in_context(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = run_config("mf")
    ctx = context(config, None)
    upload, _ = fit(ctx, 1)
    assert list(tmp_path.iterdir()) == []
    kept = {k: v.numpy() for k, v in ctx.state.array_records[LOCAL_STATE_KEY].items()}
    assert kept["user_embedding.weight"].shape == (4, 8)
    # An empty state-dir value means the same as none.
    empty = context(config, None)
    empty.node_config["state-dir"] = ""
    assert_same_upload(fit(empty, 1)[0], upload)


def test_a_phone_with_a_state_dir_trains_exactly_as_without_one(tmp_path):
    """One user per device: the fresh row is the default path's, so every round matches bit for bit."""
    config = run_config("neumf", partitioning="user")
    plain, persisted = (context(config, where, partition=5, partitions=12) for where in (None, tmp_path))
    for server_round in (1, 2):
        assert_same_upload(fit(plain, server_round)[0], fit(persisted, server_round)[0])
        persisted = context(config, tmp_path, partition=5, partitions=12)  # and a restart between rounds


# --- atomicity and locking ----------------------------------------------------


def test_a_failed_write_leaves_the_previous_state(tmp_path, monkeypatch):
    config = run_config("mf")
    fit(context(config, tmp_path), 1)
    before = store.state_file(tmp_path).read_bytes()
    user = int(store.load(tmp_path).users[1])

    def crash(*_args):
        raise OSError("disk pulled out")

    monkeypatch.setattr(store.os, "replace", crash)
    with pytest.raises(OSError, match="disk pulled out"):
        store.forget_user(tmp_path, user)
    with pytest.raises(OSError, match="disk pulled out"):
        fit(context(config, tmp_path), 2)
    monkeypatch.undo()
    assert store.state_file(tmp_path).read_bytes() == before
    assert user in store.load(tmp_path).users.tolist()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", store.STATE_FILE, store.GLOBAL_MODEL_FILE], \
        "no temp file left"


def test_a_process_killed_mid_write_leaves_the_previous_state(tmp_path):
    state = store.DeviceState.empty(50).with_user(7, [1, 2, 3])
    store.save(tmp_path, state)
    before = store.state_file(tmp_path).read_bytes()
    script = f"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {str(REPO)!r})
from client import store

def half_then_die(out, **arrays):
    out.write(b"PK\\x03\\x04 half a zip")
    out.flush()
    os.kill(os.getpid(), signal.SIGKILL)

store.np.savez = half_then_die
store.forget_user({str(tmp_path)!r}, 7)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the kill happened mid-write"
    assert store.state_file(tmp_path).read_bytes() == before
    assert store.load(tmp_path).users.tolist() == [7]
    store.forget_user(tmp_path, 7)
    assert store.load(tmp_path).users.tolist() == []
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "the next write drops stale temp files"


def test_an_erasure_waits_for_a_round_in_progress(tmp_path):
    store.save(tmp_path, store.DeviceState.empty(50).with_user(7, [1]).with_user(8, [2]))
    with store.locked(tmp_path):  # what the ClientApp holds from load to save
        worker = threading.Thread(target=store.forget_user, args=(tmp_path, 7))
        worker.start()
        time.sleep(0.3)
        assert worker.is_alive(), "the erasure must wait for the lock"
        store.save(tmp_path, store.load(tmp_path).with_interactions(8, [3]))  # the round's save
    worker.join(timeout=10)
    after = store.load(tmp_path)
    assert after.users.tolist() == [8] and after.train_items.tolist() == [2, 3], "neither change is lost"


# --- bad input -------------------------------------------------------------------


def _one_line_naming(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    return message


def test_forgetting_an_unknown_user_is_a_clear_error(tmp_path):
    store.save(tmp_path, store.DeviceState.empty(50).with_user(7, [1]))
    before = store.state_file(tmp_path).read_bytes()
    with pytest.raises(DataError) as err:
        store.forget_user(tmp_path, 999)
    assert "user 999 is not on this device" in _one_line_naming(err, store.state_file(tmp_path))
    with pytest.raises(DataError) as err:
        store.add_user(tmp_path, 7, [2])
    assert "user 7 is already on this device" in _one_line_naming(err, store.state_file(tmp_path))
    with pytest.raises(DataError) as err:
        store.add_interactions(tmp_path, 7, [50])
    assert "item 50 is out of range" in _one_line_naming(err, store.state_file(tmp_path))
    with pytest.raises(ValueError, match="non-negative integer"):
        store.add_user(tmp_path, "8", [1])  # type: ignore[arg-type]
    assert store.state_file(tmp_path).read_bytes() == before, "a refused edit changes nothing"
    with pytest.raises(DataError) as err:
        store.forget_user(tmp_path / "nowhere", 7)
    assert "no device state" in _one_line_naming(err, store.state_file(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"not a zip at all", id="garbage"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b[:200] + bytes([b[200] ^ 0xFF]) + b[201:], id="flipped-byte"),
    ],
)
def test_a_corrupted_state_file_is_a_clear_error_naming_it(tmp_path, damage):
    config = run_config("mf")
    fit(context(config, tmp_path), 1)
    path = store.state_file(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError) as err:
        store.load(tmp_path)
    assert "corrupted device state" in _one_line_naming(err, path)
    with pytest.raises(DataError) as err:  # the ClientApp refuses too, rather than starting over
        fit(context(config, tmp_path), 2)
    _one_line_naming(err, path)


def test_an_inconsistent_state_file_is_a_clear_error(tmp_path):
    state = store.DeviceState.empty(50).with_user(7, [1, 2])
    arrays = state.to_arrays()
    path = store.state_file(tmp_path)
    for broken, reason in [
        ({**arrays, "train_users": np.array([7, 9])}, "names user 9"),
        ({k: v for k, v in arrays.items() if k != "users"}, "'users' is missing"),
        ({**arrays, "format": np.array("something-else/3")}, "format"),
        ({**arrays, "train_items": np.array([1, 77])}, "outside 0..49"),
    ]:
        with open(path, "wb") as out:
            np.savez(out, **broken)
        with pytest.raises(DataError) as err:
            store.load(tmp_path)
        assert reason in _one_line_naming(err, path)


def test_two_supernodes_cannot_share_one_state_dir(tmp_path):
    config = run_config("mf")
    fit(context(config, tmp_path, partition=0), 1)
    with pytest.raises(DataError) as err:
        fit(context(config, tmp_path, partition=2), 1)
    assert "initialised from partition-id 0 but this SuperNode has partition-id 2" in _one_line_naming(
        err, store.state_file(tmp_path)
    )


def test_a_relative_state_dir_is_refused(tmp_path):
    with pytest.raises(ValueError, match="state-dir='kiosk' must be an absolute path"):
        fit(context(run_config("mf"), Path("kiosk")), 1)


def test_fedrec_device_edits_the_state_a_supernode_reads(tmp_path, capsys):
    from simulations.cli import main as fedrec

    directory = str(tmp_path / "kiosk")
    assert fedrec(["device", "create", "--state-dir", directory, "--num-items", "40"]) == 0
    assert fedrec(["device", "add-user", "--state-dir", directory, "--user", "7", "--items", "1,2,3"]) == 0
    assert fedrec(["device", "add-user", "--state-dir", directory, "--user", "9", "--items", "4"]) == 0
    assert fedrec(["device", "add-interactions", "--state-dir", directory, "--user", "9", "--items", "5"]) == 0
    assert fedrec(["device", "forget-user", "--state-dir", directory, "--user", "7"]) == 0
    state = store.load(directory)
    assert state.users.tolist() == [9] and sorted(state.train_items.tolist()) == [4, 5]
    capsys.readouterr()
    assert fedrec(["device", "forget-user", "--state-dir", directory, "--user", "7"]) == 2
    assert fedrec(["device", "add-user", "--state-dir", directory, "--user", "3", "--items", "1,x"]) == 2
    assert fedrec(["device", "add-user", "--state-dir", directory, "--user", "3", "--items", "40"]) == 2
    assert fedrec(["device", "create", "--state-dir", str(tmp_path / "other")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(line.startswith("fedrec: error: ") for line in errors)
    assert "user 7 is not on this device" in errors[0] and "out of range" in errors[2]


# --- cold start: fold-in of users added after the device trained ----------------------------
def test_fold_in_fits_only_the_new_users_rows_towards_their_items():
    from client.coldstart import fold_in
    from common.federation import ClientData, EvalData
    from common.models import ModelConfig
    from common.training import TrainConfig

    empty = EvalData(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0), np.int64))
    items = np.array([3, 7, 11, 19, 23])
    data = ClientData(global_users=np.array([5, 6]), train_users=np.array([0, 0, 1, 1, 1, 1, 1]),
                      train_items=np.array([1, 2, *items]), train_ratings=np.ones(7, np.float32),
                      test=empty, validation=empty, num_items=40)
    model_config = ModelConfig(name="gmf", embedding_dim=8)
    shared_model = build_model(model_config, 0, 40, seed=1)
    with torch.no_grad():  # a trained-looking item side: the new user's items form one cluster
        generator = torch.Generator().manual_seed(0)
        weight = shared_model.item_embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
        weight[items] = 2.0 * torch.randn(8, generator=generator) + 0.1 * torch.randn(len(items), 8, generator=generator)
    shared = list(shared_model.shared_state().values())
    fresh = {k: v.copy() for k, v in build_model(model_config, 2, 40, seed=9).local_state().items()}
    folded = fold_in(model_config, TrainConfig(epochs=20, batch_size=8, learning_rate=0.05, num_negatives=4),
                     data, shared, fresh, np.array([False, True]), seed=0)
    for name in fresh:
        assert np.array_equal(folded[name][0], fresh[name][0])  # the other user is untouched
        assert not np.array_equal(folded[name][1], fresh[name][1])

    def own_in_top(rows, k=5):  # how many of the new user's 5 items their rows rank in their top 5 of 40
        model = build_local_model(model_config, data, shared, rows, seed=0)
        with torch.no_grad():
            scores = model.score_all_items(torch.tensor([1]))[0].numpy()
        return len(set(np.argsort(-scores)[:k].tolist()) & set(items.tolist()))

    assert own_in_top(fresh) <= 2 and own_in_top(folded) == 5  # a random row: 0.6 expected


def test_users_added_after_the_device_trained_are_folded_in_before_their_first_round(tmp_path, monkeypatch):
    calls = []
    real = coldstart.fold_in
    monkeypatch.setattr(coldstart, "fold_in", lambda *a, **k: calls.append(a[5].copy()) or real(*a, **k))
    config = run_config("gmf")
    directory = tmp_path / "kiosk"
    ctx = context(config, directory)
    fit(ctx, 1)
    assert calls == []  # a device that never trained starts from fresh rows, as without a store
    store.add_user(directory, 1001, [1, 2, 3, 4, 5])
    fit(ctx, 2)
    users = store.load(directory).users
    assert len(calls) == 1 and users[calls[0]].tolist() == [1001]
    fit(ctx, 3)
    assert len(calls) == 1  # from then on the user has rows of their own


def test_no_fold_in_outside_dp_sgd_under_record_level_dp(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(coldstart, "fold_in", lambda *a, **k: calls.append(1))
    config = run_config("gmf", **{"record-dp": True})
    directory = tmp_path / "kiosk"
    ctx = context(config, directory)
    fit(ctx, 1)
    store.add_user(directory, 1001, [1, 2, 3, 4, 5])
    fit(ctx, 2)
    assert calls == [] and 1001 in store.load(directory).row_users  # trained by DP-SGD, never folded in


# --- learning between rounds: new interactions move the user's rows before the next round --------
def scores_of(config: dict, state: store.DeviceState, shared: list[np.ndarray], user: int) -> np.ndarray:
    cfg = parse_run_config(config)
    local = state.local_state(cfg.model_config, cfg.seed)
    model = device_model(cfg.model_config, shared, local)
    return model.score_all_items(torch.tensor([int(np.flatnonzero(state.users == user)[0])]))[0].numpy()


def test_new_interactions_update_the_users_rows_and_list_before_any_round(tmp_path, capsys):
    from client.coldstart import add_interactions_and_learn
    from simulations.cli import main as fedrec

    config = run_config("gmf")
    learning, recording = tmp_path / "learning", tmp_path / "recording"
    for directory in (learning, recording):
        fit(context(config, directory), 1)
    before = store.load(learning)
    user = int(before.users[1])
    shared = store.load_global_model(learning).shared
    old_scores = scores_of(config, before, shared, user)
    unseen = np.setdiff1d(np.arange(before.num_items), before.train_items[before.train_users == user])
    new_items = unseen[np.argsort(old_scores[unseen])[:3]]  # the three items the user's row liked least

    after, learned = add_interactions_and_learn(str(learning), user, new_items)
    store.add_interactions(recording, user, new_items)  # recorded only: the rows of the last round

    assert learned and after.train_items.tolist() == store.load(recording).train_items.tolist()
    for other in before.row_users:
        same = all(rows_of(after, other)[n].tobytes() == rows_of(before, other)[n].tobytes() for n in before.rows)
        assert same == (other != user), other  # only this user's rows moved
    assert store.load_global_model(learning).shared[0].tobytes() == shared[0].tobytes()
    others = np.setdiff1d(unseen, new_items)

    def places_behind(scores: np.ndarray) -> np.ndarray:  # per new item: how many other unseen items outrank it
        return (scores[others][None, :] > scores[new_items][:, None]).sum(1)

    behind_before, behind_after = places_behind(old_scores), places_behind(scores_of(config, after, shared, user))
    assert (behind_after < behind_before).all(), (behind_before, behind_after)  # the row moved towards them
    # The list on the device changed with no round: not only by dropping the newly seen items.
    learned_top = recommend_on_device(str(learning), user, 10).items
    recorded_top = recommend_on_device(str(recording), user, 10).items
    assert not np.isin(learned_top, new_items).any() and not np.isin(recorded_top, new_items).any()
    assert learned_top.tolist() != recorded_top.tolist()
    # The next round trains on the new interactions too, from the updated rows.
    _, examples = fit(context(config, learning), 2)
    assert examples == len(after.train_items)
    # The operator's command does the same and says so.
    capsys.readouterr()
    assert fedrec(["device", "add-interactions", "--state-dir", str(recording), "--user", str(user),
                   "--items", str(int(unseen[-1]))]) == 0
    assert "rows updated now" in capsys.readouterr().err
    assert rows_of(store.load(recording), user)["user_embedding.weight"].tobytes() != \
        rows_of(before, user)["user_embedding.weight"].tobytes()


def test_between_rounds_nothing_is_fitted_without_a_global_model_or_under_record_dp(tmp_path):
    from client.coldstart import add_interactions_and_learn

    fresh = tmp_path / "fresh"
    store.create(fresh, num_items=80)
    store.add_user(fresh, 7, [1, 2])
    state, learned = add_interactions_and_learn(str(fresh), 7, [3])
    assert not learned and sorted(state.train_items.tolist()) == [1, 2, 3] and len(state.row_users) == 0

    private = tmp_path / "private"
    fit(context(run_config("gmf", **{"record-dp": True}), private), 1)
    before = store.load(private)
    user = int(before.users[0])
    state, learned = add_interactions_and_learn(str(private), user, [int(before.num_items) - 1])
    assert not learned and len(state.train_items) == len(before.train_items) + 1
    assert all(state.rows[n].tobytes() == before.rows[n].tobytes() for n in before.rows)
    with pytest.raises(DataError, match="user 4242 is not on this device"):
        add_interactions_and_learn(str(private), 4242, [1])
    assert len(store.load(private).train_items) == len(state.train_items)  # a refused edit changes nothing


# --- recommending between rounds: the last global model on disk, the query handler ------------
def query(ctx: Context, user: int, k: int = 5, shared: list[np.ndarray] | None = None, **extra) -> Message:
    """A Flower query message through fedrec's whole ClientApp (mods included)."""
    content = RecordDict({client_app.QUERY_KEY: ConfigRecord({"user": user, "k": k, **extra})})
    if shared is not None:
        content[client_app.QUERY_MODEL_KEY] = ArrayRecord(list(shared))
    return app(Message(content, dst_node_id=1, message_type=MessageType.QUERY), ctx)


def expected_top(config: dict, state: store.DeviceState, shared: list[np.ndarray], user: int, k: int = 5) -> list[int]:
    cfg = parse_run_config(config)
    local_user = int(np.flatnonzero(state.users == user)[0])
    items, _ = recommend_for_client(cfg.model_config, state.client_data(), shared,
                                    state.local_state(cfg.model_config, cfg.seed), local_user, k)
    return items.tolist()


@pytest.mark.parametrize("model", ["gmf", "neumf"])
def test_the_device_recommends_from_the_last_global_model_it_received_after_a_restart(tmp_path, model, capsys):
    from simulations.cli import main as fedrec

    config = run_config(model)
    fit(context(config, tmp_path), 1)
    fit(context(config, tmp_path), 2)
    kept = store.load_global_model(tmp_path)
    assert kept.server_round == 2 and kept.run_config == config
    assert_same_upload(kept.shared, global_model(config, 2))
    state = store.load(tmp_path)  # after the round: every user has trained rows
    user = int(state.users[1])
    answer = recommend_on_device(str(tmp_path), user, 5)  # no server, no Context
    items = answer.items
    assert items.tolist() == expected_top(config, state, global_model(config, 2), user)
    assert answer.model_round == 2 and answer.source == "model"
    assert not np.isin(items, state.train_items[state.train_users == user]).any()
    assert np.all(np.diff(answer.scores) <= 0)
    capsys.readouterr()
    assert fedrec(["recommend", "--state-dir", str(tmp_path), "--user", str(user), "--k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split("\t")[1]) for line in lines] == items.tolist()


def test_recommending_on_the_device_explains_what_is_missing(tmp_path, capsys):
    from simulations.cli import main as fedrec

    config = run_config("gmf")
    store.create(tmp_path / "new", num_items=80)
    with pytest.raises(DataError, match="no global model on this device yet"):
        recommend_on_device(str(tmp_path / "new"), 1)
    fit(context(config, tmp_path), 1)
    store.add_user(tmp_path, 5000)  # no interactions yet
    with pytest.raises(DataError, match=r"device-state.npz: user 5000 has no interactions on this device yet, "
                                        "and the server has published no popular items"):
        recommend_on_device(str(tmp_path), 5000)  # round 1 carries no list: none is known before it
    with pytest.raises(DataError, match="user 4242 is not on this device"):
        recommend_on_device(str(tmp_path), 4242)
    capsys.readouterr()
    assert fedrec(["recommend", "--state-dir", str(tmp_path)]) == 2
    assert fedrec(["recommend", "--state-dir", str(tmp_path), "--user", "4242"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and all(line.startswith("fedrec: error: ") for line in errors)
    assert "needs --user" in errors[0] and "user 4242 is not on this device" in errors[1]


def test_a_newcomer_is_folded_in_before_their_first_recommendation(tmp_path, monkeypatch):
    calls = []
    real = coldstart.fold_in
    monkeypatch.setattr(coldstart, "fold_in", lambda *a, **k: calls.append(1) or real(*a, **k))
    fit(context(run_config("gmf"), tmp_path), 1)
    store.add_user(tmp_path, 1001, [1, 2, 3, 4, 5])
    answer = recommend_on_device(str(tmp_path), 1001, 5)
    assert calls == [1] and answer.source == "model" and not np.isin(answer.items, [1, 2, 3, 4, 5]).any()


def test_a_query_is_refused_unless_the_device_owner_opted_in(tmp_path, monkeypatch):
    monkeypatch.setattr(query_handler, "answer_query", lambda *a: pytest.fail("nothing may be computed"))
    ctx = context(run_config("gmf"), tmp_path)
    fit(ctx, 1)
    reply = query(ctx, int(store.load(tmp_path).users[0]))
    assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
    assert "answer-queries" in reply.error.reason


def test_an_opted_in_kiosk_answers_a_query_from_its_own_state(tmp_path):
    config = run_config("mf")
    ctx = context(config, tmp_path)
    ctx.node_config[client_app.ANSWER_QUERIES_KEY] = True
    fit(ctx, 1)
    state = store.load(tmp_path)
    user = int(state.users[2])
    reply = query(ctx, user, k=4)  # no model in the query: the one the device kept
    answer = reply.content.config_records[client_app.QUERY_REPLY_KEY]
    assert answer["user"] == user and answer["model-round"] == 1
    assert answer["items"] == expected_top(config, state, global_model(config, 1), user, k=4)
    # With a model in the query, that model ranks.
    reply = query(ctx, user, k=4, shared=global_model(config, 7), **{"server-round": 7})
    answer = reply.content.config_records[client_app.QUERY_REPLY_KEY]
    assert answer["items"] == expected_top(config, state, global_model(config, 7), user, k=4)
    assert answer["model-round"] == 7
    assert query(ctx, 4242).error.reason.endswith("device-state.npz: user 4242 is not on this device")


def test_an_opted_in_device_without_a_state_dir_answers_from_its_context(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = run_config("gmf")
    ctx = context(config, None)
    ctx.node_config[client_app.ANSWER_QUERIES_KEY] = True
    assert "has not trained yet" in query(ctx, 0, shared=global_model(config, 1)).error.reason
    fit(ctx, 1)
    cfg = parse_run_config(config)
    data = slicer_cached(cfg).client(0)
    user = int(data.global_users[1])
    rows = {k: v.numpy() for k, v in ctx.state.array_records[LOCAL_STATE_KEY].items()}
    expected, _ = recommend_for_client(cfg.model_config, data, global_model(config, 2), rows, 1, 5)
    answer = query(ctx, user, shared=global_model(config, 2)).content.config_records[client_app.QUERY_REPLY_KEY]
    assert answer["items"] == expected.tolist()
    assert "keeps no global model" in query(ctx, user).error.reason
    bad = app(Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), ctx)
    assert "needs a ConfigRecord 'fedrec.query'" in bad.error.reason


def test_a_user_with_no_interactions_gets_the_popular_items_the_server_published(tmp_path, capsys):
    from simulations.cli import main as fedrec

    config = run_config("gmf")
    ctx = context(config, tmp_path)
    fit(ctx, 1)
    published = np.array([5, 9, 2, 40, 7], np.int64)
    content = fitins_to_recorddict(
        FitIns(ndarrays_to_parameters(global_model(config, 2)),
               {"server-round": 2, POPULAR_ITEMS_KEY: encode_item_list(published)}),
        keep_input=True,
    )
    app(Message(content, dst_node_id=1, message_type=MessageType.TRAIN), ctx)
    assert store.load_global_model(tmp_path).popular_items.tolist() == published.tolist()
    store.add_user(tmp_path, 5000)
    answer = recommend_on_device(str(tmp_path), 5000, 3, extra_seen=[9])
    assert answer.source == "popular" and answer.items.tolist() == [5, 2, 40] and np.isnan(answer.scores).all()
    # Users with interactions still get their own model's list.
    assert recommend_on_device(str(tmp_path), int(store.load(tmp_path).users[0]), 3).source == "model"
    ctx.node_config[client_app.ANSWER_QUERIES_KEY] = True
    reply = query(ctx, 5000, k=2).content.config_records[client_app.QUERY_REPLY_KEY]
    assert reply["items"] == [5, 9] and reply["source"] == "popular"
    capsys.readouterr()
    assert fedrec(["recommend", "--state-dir", str(tmp_path), "--user", "5000", "--k", "2"]) == 0
    out = capsys.readouterr()
    assert [line.split("\t")[1] for line in out.out.splitlines()] == ["5", "9"] and "popular items" in out.err
