"""A client's round without Flower: what it keeps, what it uploads, that it learns."""

import numpy as np
import pytest
import torch

from client.local import (
    build_local_model,
    client_key,
    evaluate_client,
    local_epochs,
    refit_user_rows,
    train_round,
    user_seed,
)
from common.federation import ClientData, EvalData
from common.models import ModelConfig, build_model
from common.training import TrainConfig
from common.updates import UpdateLayout, decode_mean_update, encode_update

NUM_ITEMS = 30


def _client(items=(1, 2, 3, 4, 5, 6), test_item=7) -> ClientData:
    rng = np.random.default_rng(0)
    negatives = rng.choice(np.setdiff1d(np.arange(NUM_ITEMS), [*items, test_item]), size=(1, 10), replace=False)
    return ClientData(
        global_users=np.array([12]),
        train_users=np.zeros(len(items), np.int64),
        train_items=np.array(items, np.int64),
        train_ratings=np.ones(len(items), np.float32),
        test=EvalData(np.array([0]), np.array([test_item]), negatives),
        validation=EvalData(np.array([], np.int64), np.array([], np.int64), np.empty((0, 10), np.int64)),
        num_items=NUM_ITEMS,
    )


@pytest.mark.parametrize("name", ["mf", "gmf", "mlp", "neumf"])
def test_upload_holds_only_shared_deltas_and_touched_vector(name):
    config = ModelConfig(name=name, embedding_dim=4, mlp_layers=(8, 4))
    server_model = build_model(config, 0, NUM_ITEMS, seed=1)
    shared = list(server_model.shared_state().values())
    result = train_round(config, TrainConfig(epochs=2, batch_size=4, learning_rate=0.05), _client(), shared, None, seed=3, server_round=1)
    layout = UpdateLayout.from_state(server_model.shared_state(), server_model.item_row_parameter_names(), NUM_ITEMS)
    assert [a.shape for a in result.upload] == layout.upload_shapes()
    # the device keeps its user tables; none of their values appear in what it uploads
    assert set(result.local_state) == set(build_model(config, 1, NUM_ITEMS).local_parameter_names())
    for name, value in result.local_state.items():
        if value.shape[-1] < 2:  # a scalar bias can coincide with any number by chance
            continue
        for row in value:
            for array in result.upload:
                rows = array.reshape(-1, array.shape[-1]) if array.ndim > 1 else array.reshape(1, -1)
                if rows.shape[-1] == row.size:
                    assert not np.any(np.all(np.isclose(rows, row, atol=1e-7), axis=1)), f"{name} row leaked"
    touched = result.upload[-1]
    assert set(np.flatnonzero(touched)) >= {1, 2, 3, 4, 5, 6}, "positives are touched"
    assert result.num_examples == 6


def test_untouched_item_rows_are_zero_in_the_upload():
    config = ModelConfig(name="gmf", embedding_dim=4)
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    result = train_round(config, TrainConfig(epochs=1, batch_size=4, num_negatives=1), _client(), shared, None, seed=3, server_round=1)
    touched = result.upload[-1].astype(bool)
    assert not touched.all(), "with 1 negative per positive most items stay untouched"
    item_delta = result.upload[0]  # item_embedding.weight comes first in GMF's shared order
    assert item_delta.shape == (NUM_ITEMS, 4)
    assert np.all(item_delta[~touched] == 0)
    assert np.any(item_delta[touched] != 0)


def test_user_embedding_persists_and_improves_across_rounds():
    config = ModelConfig(name="gmf", embedding_dim=8)
    train = TrainConfig(epochs=2, batch_size=4, learning_rate=0.05)
    data = _client(items=tuple(range(10)), test_item=10)
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    model = build_model(config, 0, NUM_ITEMS, seed=1)
    layout = UpdateLayout.from_state(model.shared_state(), model.item_row_parameter_names(), NUM_ITEMS)
    state, losses = None, []
    for server_round in range(1, 6):
        result = train_round(config, train, data, shared, state, seed=3, server_round=server_round)
        if state is not None:  # the embedding it kept is the one it continues from
            assert not np.array_equal(result.local_state["user_embedding.weight"], state["user_embedding.weight"])
        state = result.local_state
        losses.append(result.metrics["train_loss"])
        shared = decode_mean_update(layout, shared, result.upload)
    assert losses[-1] < losses[0] * 0.8, losses
    # the kept embedding is what fits this user: its positives outscore other items by far more
    # than with a freshly initialised embedding under the same global model
    def margin(local_state):
        model = build_local_model(config, data, shared, local_state, seed=99)
        with torch.no_grad():
            scores = model(torch.zeros(NUM_ITEMS, dtype=torch.long), torch.arange(NUM_ITEMS)).numpy()
        return scores[:10].mean() - scores[10:].mean()

    assert margin(state) > margin(None) + 0.5


def test_same_seed_same_round_is_bit_for_bit_reproducible():
    config = ModelConfig(name="neumf", embedding_dim=4, mlp_layers=(8, 4))
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    a = train_round(config, TrainConfig(), _client(), shared, None, seed=5, server_round=2)
    b = train_round(config, TrainConfig(), _client(), shared, None, seed=5, server_round=2)
    for x, y in zip(a.upload, b.upload, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["mf", "gmf", "mlp", "neumf"])
def test_a_returning_device_rebuilds_exactly_the_model_it_kept(name):
    """The uninitialised rebuild (no random draws for weights about to be overwritten) changes nothing."""
    config = ModelConfig(name=name, embedding_dim=4, mlp_layers=(8, 4))
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    kept = train_round(config, TrainConfig(), _client(), shared, None, seed=5, server_round=1).local_state
    rebuilt = build_local_model(config, _client(), shared, kept, seed=5)
    reference = build_model(config, 1, NUM_ITEMS, seed=123)
    reference.load_arrays(dict(zip(reference.shared_parameter_names(), shared, strict=True)))
    reference.load_arrays(kept)
    for (name_a, a), (name_b, b) in zip(rebuilt.named_parameters(), reference.named_parameters(), strict=True):
        assert name_a == name_b
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    fresh = build_local_model(config, _client(), shared, None, seed=5)
    assert all(torch.isfinite(p).all() for p in fresh.parameters()), "a new device still gets initialised rows"
    second = train_round(config, TrainConfig(), _client(), shared, kept, seed=5, server_round=2)
    again = train_round(config, TrainConfig(), _client(), shared, kept, seed=5, server_round=2)
    for x, y in zip(second.upload, again.upload, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", ["mf", "gmf", "mlp", "neumf"])
@pytest.mark.parametrize("loss", ["bce", "bpr", "mse"])
def test_training_only_the_rows_a_round_touches_gives_the_full_tables_result(name, loss):
    """train_round trains a model of the touched item rows only; the full model trained alike must agree."""
    config = ModelConfig(name=name, embedding_dim=8, mlp_layers=(8, 4))
    train = TrainConfig(epochs=3, batch_size=4, learning_rate=0.05, loss=loss, num_negatives=2, shared_adam_epsilon=1e-3)
    data = _client()
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    layout = UpdateLayout.from_state(build_model(config, 0, NUM_ITEMS).shared_state(),
                                     build_model(config, 0, NUM_ITEMS).item_row_parameter_names(), NUM_ITEMS)
    state = None
    for server_round in (1, 2):  # a new device, then a returning one
        result = train_round(config, train, data, shared, state, seed=3, server_round=server_round)
        full = build_local_model(config, data, shared, state, user_seed(3, data))
        before = full.shared_state()
        full_loss, touched = local_epochs(full, data, train, [3, server_round, client_key(data)])
        assert len(np.unique(touched)) < NUM_ITEMS, "the round must train a subset of the rows for this to test anything"
        for got, want in zip(result.upload, encode_update(layout, before, full.shared_state(), touched), strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        for key, want in full.local_state().items():
            np.testing.assert_allclose(result.local_state[key], want, rtol=0, atol=1e-6)
        assert result.metrics["train_loss"] == pytest.approx(full_loss, abs=1e-6)
        state, shared = result.local_state, decode_mean_update(layout, shared, result.upload)


def test_a_wrong_item_count_is_refused_when_training_a_subset_of_rows():
    config = ModelConfig(name="gmf", embedding_dim=4)
    shared = list(build_model(config, 0, NUM_ITEMS + 5, seed=1).shared_state().values())
    with pytest.raises(ValueError, match=f"got {NUM_ITEMS + 5} item rows, expected {NUM_ITEMS}"):
        train_round(config, TrainConfig(), _client(), shared, None, seed=1, server_round=1)


def test_evaluate_client_reports_sums_and_counts_per_user():
    config = ModelConfig(name="mf", embedding_dim=4)
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    metrics = evaluate_client(config, _client(), shared, None, seed=1)
    assert metrics["test_count"] == 1
    assert 0.0 <= metrics["test_sampled_hr@10"] <= 1.0
    assert "test_full_ndcg@10" in metrics and "val_count" not in metrics  # no validation item here


def test_wrong_number_of_shared_arrays_is_a_clear_error():
    config = ModelConfig(name="gmf", embedding_dim=4)
    with pytest.raises(ValueError, match="received 1 shared arrays"):
        train_round(config, TrainConfig(), _client(), [np.zeros((NUM_ITEMS, 4), np.float32)], None, seed=1, server_round=1)


def test_refit_moves_only_the_user_rows():
    config = ModelConfig(name="neumf", embedding_dim=4, mlp_layers=(8, 4))
    data = _client()
    shared = list(build_model(config, 0, NUM_ITEMS, seed=1).shared_state().values())
    model = build_local_model(config, data, shared, None, seed=2)
    before_shared, before_local = model.shared_state(), model.local_state()
    refit_user_rows(model, data, TrainConfig(epochs=2, batch_size=4, learning_rate=0.05), seed=1)
    for name, value in model.shared_state().items():
        np.testing.assert_array_equal(value, before_shared[name])
    assert all(not np.array_equal(v, before_local[k]) for k, v in model.local_state().items())
    assert all(p.requires_grad for p in model.parameters()), "training is re-enabled afterwards"


def _first_adam_moves(config: TrainConfig) -> dict[str, torch.Tensor]:
    """How far one Adam step moves every parameter of a GMF whose item 0 gets a normal
    gradient and item 1 a tiny one."""
    from common.training import make_optimizer

    model = build_model(ModelConfig("gmf", embedding_dim=4), 1, 3, seed=0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = make_optimizer(model, config)
    logits = model(torch.tensor([0, 0]), torch.tensor([0, 1]))
    # Item 1's loss is scaled down 1e4 times, like a row touched once as a sampled negative.
    (logits[0] + 1e-4 * logits[1]).backward()
    optimizer.step()
    return {name: (p.detach() - before[name]).abs() for name, p in model.named_parameters()}


def _first_adam_step(shared_adam_epsilon: float, user_learning_rate: float = 0.0) -> tuple[torch.Tensor, ...]:
    """The first step of the trained item row, the barely-touched one and the user row."""
    config = TrainConfig(learning_rate=0.01, shared_adam_epsilon=shared_adam_epsilon, user_learning_rate=user_learning_rate)
    moved = _first_adam_moves(config)
    return moved["item_embedding.weight"][0], moved["item_embedding.weight"][1], moved["user_embedding.weight"][0]


def test_shared_adam_epsilon_scales_down_the_steps_of_barely_touched_item_rows():
    # torch's default: Adam's first step is about the learning rate whatever the gradient.
    trained, barely, user = _first_adam_step(1e-8)
    assert torch.allclose(barely, torch.full_like(barely, 0.01), rtol=0.1)
    assert torch.allclose(trained, torch.full_like(trained, 0.01), rtol=0.1)
    # A larger shared epsilon shrinks the tiny-gradient row's step with its gradient ...
    trained, barely, user_after = _first_adam_step(1e-3)
    assert float(barely.max()) < 1e-3
    assert float(trained.min()) > 1e-3
    # ... and leaves the user-local rows on Adam's usual step.
    assert torch.equal(user, user_after)


def test_dense_learning_rate_sets_the_step_of_the_dense_shared_layers_only():
    moved = _first_adam_moves(TrainConfig(learning_rate=0.01, dense_learning_rate=0.001))
    output, trained, user = moved["output.weight"], moved["item_embedding.weight"][0], moved["user_embedding.weight"][0]
    assert torch.allclose(output, torch.full_like(output, 0.001), rtol=0.1)  # GMF's output layer is dense
    assert torch.allclose(trained, torch.full_like(trained, 0.01), rtol=0.1)
    assert torch.allclose(user, torch.full_like(user, 0.01), rtol=0.1)


def test_user_learning_rate_sets_the_step_of_the_user_rows_only():
    trained, _, user = _first_adam_step(1e-8, user_learning_rate=0.001)
    assert torch.allclose(user, torch.full_like(user, 0.001), rtol=0.1)
    assert torch.allclose(trained, torch.full_like(trained, 0.01), rtol=0.1)


def test_positive_set_dense_table_answers_as_the_binary_search(monkeypatch):
    import common.training as training

    rng = np.random.default_rng(3)
    users, items = rng.integers(0, 4, 60), rng.integers(0, 50, 60)
    dense = training.PositiveSet(users, items, 50)
    monkeypatch.setattr(training, "DENSE_POSITIVES", 0)
    searched = training.PositiveSet(users, items, 50)
    assert dense._table is not None and searched._table is None
    queries_u, queries_i = rng.integers(0, 6, 5000), rng.integers(0, 50, 5000)  # users past the largest too
    expected = {(int(u), int(i)) for u, i in zip(users, items, strict=True)}
    truth = np.array([(int(u), int(i)) in expected for u, i in zip(queries_u, queries_i, strict=True)])
    assert truth.any() and not truth.all()
    np.testing.assert_array_equal(dense.contains(queries_u, queries_i), truth)
    np.testing.assert_array_equal(searched.contains(queries_u, queries_i), truth)
    draws = [training.sample_training_negatives(users, s, np.random.default_rng(9)) for s in (dense, searched)]
    np.testing.assert_array_equal(draws[0], draws[1])  # the same negatives from the same stream
