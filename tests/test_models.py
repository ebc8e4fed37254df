"""Models: parameter roles by name, scoring consistency, reproducible initialisation."""

import numpy as np
import pytest
import torch

from common.models import MODEL_NAMES, ModelConfig, build_model

CONFIG = dict(embedding_dim=8, mlp_layers=(16, 8))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_local_parameters_are_exactly_the_user_tables(name):
    model = build_model(ModelConfig(name=name, **CONFIG), num_users=5, num_items=7)
    local = model.local_parameter_names()
    assert local, "every model has user-local parameters"
    params = dict(model.named_parameters())
    for pname in local:
        assert params[pname].shape[0] == 5, f"{pname} is not indexed by user"
    assert set(local).isdisjoint(model.shared_parameter_names())
    assert set(local) | set(model.shared_parameter_names()) == set(params)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_item_row_parameters_have_one_row_per_item_and_are_shared(name):
    model = build_model(ModelConfig(name=name, **CONFIG), num_users=5, num_items=7)
    rows = model.item_row_parameter_names()
    params = dict(model.named_parameters())
    assert rows
    assert all(params[r].shape[0] == 7 for r in rows)
    assert set(rows) <= set(model.shared_parameter_names())


def test_shared_and_local_sets_per_model():
    mf = build_model(ModelConfig(name="mf", **CONFIG), 3, 4)
    assert mf.local_parameter_names() == ["user_embedding.weight", "user_bias.weight"]
    assert set(mf.item_row_parameter_names()) == {"item_embedding.weight", "item_bias.weight"}
    neumf = build_model(ModelConfig(name="neumf", **CONFIG), 3, 4)
    assert set(neumf.local_parameter_names()) == {"user_gmf_embedding.weight", "user_mlp_embedding.weight"}
    assert any(n.startswith("tower.") for n in neumf.shared_parameter_names())
    assert "output.weight" in neumf.shared_parameter_names()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_score_all_items_matches_pairwise_forward(name):
    model = build_model(ModelConfig(name=name, **CONFIG), num_users=4, num_items=9, seed=1)
    for p in model.parameters():  # move away from the near-zero init so mistakes show
        torch.nn.init.normal_(p, std=0.5)
    users = torch.tensor([0, 3])
    full = model.score_all_items(users)
    assert full.shape == (2, 9)
    for row, user in enumerate(users.tolist()):
        pairwise = model(torch.full((9,), user), torch.arange(9))
        torch.testing.assert_close(full[row], pairwise.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeded_build_is_reproducible_and_seed_sensitive(name):
    cfg = ModelConfig(name=name, **CONFIG)
    a, b, c = build_model(cfg, 3, 5, seed=7), build_model(cfg, 3, 5, seed=7), build_model(cfg, 3, 5, seed=8)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), n
    if name == "ease":  # nothing random to seed: B starts at zero (every item scores 0 until the first solve)
        assert all(not p.any() for p in c.parameters())
        return
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_shared_state_round_trips_and_rejects_wrong_shapes():
    cfg = ModelConfig(name="neumf", **CONFIG)
    src, dst = build_model(cfg, 2, 6, seed=1), build_model(cfg, 5, 6, seed=2)
    dst.load_arrays(src.shared_state())
    for name, value in src.shared_state().items():
        np.testing.assert_array_equal(dst.shared_state()[name], value)
    # user tables were not touched: different number of users, different values
    assert dst.local_state()["user_gmf_embedding.weight"].shape == (5, 8)
    with pytest.raises(ValueError, match="shape mismatch"):
        dst.load_arrays({"item_gmf_embedding.weight": np.zeros((7, 8), np.float32)})
    with pytest.raises(KeyError):
        dst.load_arrays({"nope": np.zeros(1)})


def test_model_config_validation():
    with pytest.raises(ValueError, match="unknown model"):
        ModelConfig(name="svd")
    with pytest.raises(ValueError, match="embedding_dim"):
        ModelConfig(embedding_dim=0)
