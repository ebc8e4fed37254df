"""The centralized baselines' row-sparse Adam: dense Adam where a batch touches every row, still elsewhere."""

from __future__ import annotations

import torch

from common.models import ModelConfig, build_model
from common.training import (
    LazyAdam,
    TrainConfig,
    batch_loss,
    dense_embedding_gradients,
    make_optimizer,
    make_sparse_row_optimizer,
)


def _steps(model, optimizer, batches) -> None:
    for users, items, labels in batches:
        loss = batch_loss(model, "bce", users, items, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def _batches(num_users: int, num_items: int, steps: int, size: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, num_users, (size,), generator=generator),
             torch.randint(0, num_items, (size,), generator=generator),
             torch.randint(0, 2, (size,), generator=generator).float()) for _ in range(steps)]


def test_lazy_adam_equals_dense_adam_when_every_row_is_in_every_batch():
    config = TrainConfig(learning_rate=0.01, weight_decay=0.001)
    users = torch.tensor([0, 1, 2, 0, 1, 2])
    items = torch.tensor([0, 1, 2, 3, 3, 0])  # all 3 users and 4 items, some twice
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    for name in ("gmf", "neumf", "mf"):
        dense = build_model(ModelConfig(name=name, embedding_dim=4, mlp_layers=(8, 4)), 3, 4, seed=0)
        lazy = build_model(ModelConfig(name=name, embedding_dim=4, mlp_layers=(8, 4)), 3, 4, seed=0)
        _steps(dense, make_optimizer(dense, config), [(users, items, labels)] * 5)
        _steps(lazy, make_sparse_row_optimizer(lazy, config), [(users, items, labels)] * 5)
        for (key, a), b in zip(dense.state_dict().items(), lazy.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_rows_outside_the_batches_do_not_move():
    model = build_model(ModelConfig(name="gmf", embedding_dim=4), 10, 20, seed=0)
    before = model.state_dict()["item_embedding.weight"].clone()
    _steps(model, make_sparse_row_optimizer(model, TrainConfig(learning_rate=0.05)), _batches(5, 10, 4, 16, seed=1))
    after = model.state_dict()["item_embedding.weight"]
    torch.testing.assert_close(after[10:], before[10:], rtol=0, atol=0)  # items 10..19 never sampled
    assert not torch.equal(after[:10], before[:10])


def test_the_switch_back_gives_dense_gradients_and_sgd_is_left_alone():
    model = build_model(ModelConfig(name="gmf", embedding_dim=4), 5, 6, seed=0)
    assert isinstance(make_sparse_row_optimizer(model, TrainConfig(optimizer="sgd")), torch.optim.SGD)
    assert not model.user_embedding.sparse
    optimizer = make_sparse_row_optimizer(model, TrainConfig())
    assert model.user_embedding.sparse and any(isinstance(o, LazyAdam) for o in optimizer.optimizers)
    dense_embedding_gradients(model)
    batch_loss(model, "bce", *_batches(5, 6, 1, 4, seed=2)[0]).backward()
    assert not model.user_embedding.weight.grad.is_sparse


def test_the_lazy_baseline_trains_and_hands_back_a_model_with_dense_gradients():
    from common.config import parse_run_config
    from common.federation import prepare
    from simulations.baselines import run_trained
    from simulations.engine import fused_run_config

    prepared = prepare(parse_run_config(fused_run_config({"synthetic-users": 120, "synthetic-items": 200})))
    seen = []
    result = run_trained(prepared, ModelConfig(name="gmf", embedding_dim=8), TrainConfig(epochs=2, learning_rate=0.01),
                         lazy_adam=True, on_trained=lambda model: seen.append(model.item_embedding.sparse))
    assert seen == [False]
    assert result.history[-1]["loss"] < result.history[0]["loss"]  # it learned
    assert 0.0 <= result.test["sampled_hr@10"] <= 1.0
