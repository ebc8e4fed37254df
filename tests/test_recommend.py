"""On-device top-K and its TorchScript export: same answers, seen items excluded, real behaviour."""

import json

import numpy as np
import pytest
import torch

from client.export import METADATA_FILE, export_for_client, export_torchscript
from client.local import refit_user_rows
from client.recommend import device_model, recommend, recommend_for_client, torch_threads
from common.federation import ClientData, EvalData
from common.models import ModelConfig, build_model
from common.training import TrainConfig

NAMES = ["mf", "gmf", "mlp", "neumf"]
NUM_ITEMS = 40
NO_ITEMS = torch.empty(0, dtype=torch.long)

# TorchScript is deprecated upstream but is what the phone runtimes load (see client/export.py).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")


def _config(name: str) -> ModelConfig:
    return ModelConfig(name=name, embedding_dim=8, mlp_layers=(16, 8), init_std=0.5)


def _client(histories: list[list[int]], num_items: int = NUM_ITEMS) -> ClientData:
    users = np.concatenate([np.full(len(h), u, np.int64) for u, h in enumerate(histories)])
    items = np.concatenate([np.asarray(h, np.int64) for h in histories])
    no_eval = EvalData(np.array([], np.int64), np.array([], np.int64), np.empty((0, 5), np.int64))
    return ClientData(
        global_users=np.arange(len(histories)) + 100,
        train_users=users,
        train_items=items,
        train_ratings=np.ones(len(items), np.float32),
        test=no_eval,
        validation=no_eval,
        num_items=num_items,
    )


def _arrays(name: str, num_users: int = 3, seed: int = 1):
    model = build_model(_config(name), num_users, NUM_ITEMS, seed=seed)
    return list(model.shared_state().values()), dict(model.local_state())


@pytest.mark.parametrize("lite", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_exported_model_gives_the_same_top_k_as_pytorch(name, lite, tmp_path):
    model = device_model(_config(name), *_arrays(name))
    trained, extra = [3, 4, 5, 30], [7, 8]
    path = export_torchscript(model, 2, tmp_path / "rec.pt", seen_items=trained, lite=lite)
    if lite:
        from torch.jit.mobile import _load_for_lite_interpreter

        loaded = _load_for_lite_interpreter(str(path))
    else:
        loaded = torch.jit.load(str(path))
    for k in (1, 10, NUM_ITEMS):  # k above the unseen count returns every unseen item
        items, scores = recommend(model, 2, trained + extra, k)
        got_items, got_scores = loaded(torch.tensor(extra), k)
        np.testing.assert_array_equal(got_items.numpy(), items)
        np.testing.assert_allclose(got_scores.numpy(), scores, atol=1e-5, rtol=0)
    expected_all = model.score_all_items(torch.tensor([2]))[0].numpy()
    all_scores = loaded.run_method("scores") if lite else loaded.scores()
    np.testing.assert_allclose(all_scores.numpy(), expected_all, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_seen_items_are_never_recommended_and_lists_are_sorted(name):
    model = device_model(_config(name), *_arrays(name))
    seen = np.random.default_rng(0).choice(NUM_ITEMS, size=15, replace=False)
    items, scores = recommend(model, 0, seen, NUM_ITEMS)
    assert len(items) == NUM_ITEMS - len(seen), "every unseen item, and only those"
    assert not set(items) & set(seen.tolist())
    assert np.all(np.diff(scores) <= 0), "best first"
    top3, _ = recommend(model, 0, seen, 3)
    np.testing.assert_array_equal(top3, items[:3])


@pytest.mark.parametrize("name", ["mf", "gmf"])
def test_ties_are_broken_by_lower_item_id_in_both_paths(name, tmp_path):
    shared, local = _arrays(name)
    model = device_model(_config(name), [np.zeros_like(a) for a in shared], {n: np.zeros_like(a) for n, a in local.items()})
    items, scores = recommend(model, 0, [0, 5], 6)
    np.testing.assert_array_equal(items, [1, 2, 3, 4, 6, 7])
    assert np.all(scores == scores[0])
    loaded = torch.jit.load(str(export_torchscript(model, 0, tmp_path / "tie.pt", seen_items=[0, 5])))
    np.testing.assert_array_equal(loaded(NO_ITEMS, 6)[0].numpy(), items)


def test_recommend_for_client_excludes_training_and_extra_seen_items():
    data = _client([[1, 2, 3], [4, 5]])
    shared, local = _arrays("gmf", num_users=2)
    items, _ = recommend_for_client(_config("gmf"), data, shared, local, 1, NUM_ITEMS, extra_seen=[9])
    assert set(items) == set(range(NUM_ITEMS)) - {4, 5, 9}, "user 1's own items only, plus the extra one"


def test_bad_requests_raise_clear_errors(tmp_path):
    shared, local = _arrays("mf")
    model = device_model(_config("mf"), shared, local)
    with pytest.raises(IndexError, match="local user 3 out of range"):
        recommend(model, 3, [], 5)
    with pytest.raises(IndexError, match="out of range"):
        recommend(model, -1, [], 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        recommend(model, 0, [], 0)
    with pytest.raises(ValueError, match=r"seen item ids must be in \[0, 40\)"):
        recommend(model, 0, [NUM_ITEMS], 5)
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        recommend(model, 0, [], 5, num_threads=0)
    with pytest.raises(ValueError, match="no trained user rows"):
        device_model(_config("mf"), shared, {})
    with pytest.raises(ValueError, match="received 2 shared arrays"):
        device_model(_config("mf"), shared[:2], local)
    with pytest.raises(IndexError, match="out of range"):
        export_torchscript(model, 5, tmp_path / "x.pt")
    loaded = torch.jit.load(str(export_torchscript(model, 0, tmp_path / "x.pt")))
    with pytest.raises(torch.jit.Error, match="k must be >= 1"):
        loaded(NO_ITEMS, 0)
    with pytest.raises(torch.jit.Error, match="extra_seen item ids must be in"):
        loaded(torch.tensor([NUM_ITEMS]), 5)


def test_thread_limit_applies_during_the_call_only():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_export_replaces_the_file_atomically_and_carries_metadata(tmp_path):
    data = _client([[1, 2, 3]])
    shared, local = _arrays("neumf", num_users=1)
    target = tmp_path / "user.pt"
    target.write_bytes(b"old model")
    export_for_client(_config("neumf"), data, shared, local, 0, target)
    assert [p.name for p in tmp_path.iterdir()] == ["user.pt"], "no temporary file left behind"
    extra = {METADATA_FILE: ""}
    loaded = torch.jit.load(str(target), _extra_files=extra)
    meta = json.loads(extra[METADATA_FILE])
    assert meta["model"] == "NeuMF" and meta["num_items"] == NUM_ITEMS
    assert not {1, 2, 3} & set(loaded(NO_ITEMS, NUM_ITEMS)[0].tolist()), "training items are baked in"


@pytest.mark.parametrize("name", ["mf", "gmf"])
def test_device_refit_recommends_the_users_own_taste(name, tmp_path):
    """Two users on one device, two item clusters: after a local refit each is shown its own cluster.

    The shared item side has a planted structure (items 0-19 point one way, 20-39 the
    other); user 0 has trained on 14 items of the first cluster, user 1 on 14 of the
    second. Only the user rows are fitted, on the device. Each user's top 6 must then be
    exactly the 6 unseen items of their own cluster (their held-out candidates); a random
    ranking of the 26 unseen items would do that with probability 1 / C(26, 6) ~ 4e-6.
    Both users start from the same user rows (so they are first shown the same list) and
    share the same item side: the difference comes from their local training alone.
    """
    config = _config(name)
    rng = np.random.default_rng(0)
    direction = rng.normal(size=config.embedding_dim).astype(np.float32)
    half = NUM_ITEMS // 2
    cluster = np.where(np.arange(NUM_ITEMS) < half, 1.0, -1.0).astype(np.float32)
    model = build_model(config, 2, NUM_ITEMS, seed=3)
    with torch.no_grad():
        item_rows = cluster[:, None] * direction + 0.1 * rng.normal(size=(NUM_ITEMS, config.embedding_dim))
        model.item_embedding.weight.copy_(torch.from_numpy(item_rows.astype(np.float32)))
        for layer in (model.user_embedding, getattr(model, "user_bias", None)):
            if layer is not None:
                layer.weight[1] = layer.weight[0]
    data = _client([list(range(0, 14)), list(range(half, half + 14))])
    before = [recommend(model, user, [], 6)[0] for user in (0, 1)]
    np.testing.assert_array_equal(before[0], before[1])
    with torch_threads(1):  # batches of 16: extra threads only add contention
        refit_user_rows(model, data, TrainConfig(epochs=10, batch_size=16, learning_rate=0.1), seed=0)
    shared, local = list(model.shared_state().values()), dict(model.local_state())
    for user, start in ((0, 0), (1, half)):
        items, _ = recommend_for_client(config, data, shared, local, user, 6)
        assert set(items) == set(range(start + 14, start + half)), f"user {user} got {items}"
        loaded = torch.jit.load(str(export_for_client(config, data, shared, local, user, tmp_path / f"u{user}.pt")))
        np.testing.assert_array_equal(loaded(NO_ITEMS, 6)[0].numpy(), items)


def test_fedrec_recommend_prints_the_exported_models_top_k(tmp_path, capsys):
    from simulations.cli import main as fedrec

    model = build_model(ModelConfig(name="gmf", embedding_dim=8), 2, 30, seed=3)
    path = export_torchscript(model, 1, tmp_path / "user.pt", seen_items=[0, 1])
    expected, scores = recommend(model, 1, [0, 1, 5], k=4)
    assert fedrec(["recommend", "--model-file", str(path), "--k", "4", "--extra-seen", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [int(line.split("\t")[1]) for line in lines] == expected.tolist()
    assert [float(line.split("\t")[2]) for line in lines] == pytest.approx(scores.tolist(), abs=1e-5)
    assert fedrec(["recommend", "--model-file", str(path), "--extra-seen", "99"]) == 2
    assert fedrec(["recommend", "--model-file", str(tmp_path / "none.pt")]) == 2
    assert "no such exported model" in capsys.readouterr().err
