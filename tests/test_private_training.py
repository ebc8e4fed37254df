"""Record-level DP-SGD on the device: accounting, budget, clipping, noise, corner cases."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import rdp
from opacus.accountants import RDPAccountant

from client.private_training import (
    RDP_ORDERS,
    RecordDPConfig,
    history_epsilon,
    num_examples_per_epoch,
    plan_round,
    private_local_epochs,
)
from common.federation import ClientData, EvalData
from common.models import MODEL_NAMES, ModelConfig, build_model
from common.synthetic import generate_synthetic
from common.training import PositiveSet, TrainConfig, batch_loss, build_examples

NUM_ITEMS = 40
SEED = [3, 1, 12]
NO_EVAL = EvalData(np.array([], np.int64), np.array([], np.int64), np.empty((0, 5), np.int64))


def _client(num_rows: int, num_users: int = 2, num_items: int = NUM_ITEMS) -> ClientData:
    """``num_rows`` interactions spread over ``num_users`` local users (exact sizes)."""
    users = np.arange(num_rows, dtype=np.int64) % num_users
    items = (np.arange(num_rows, dtype=np.int64) * 7) % num_items
    return ClientData(
        global_users=np.arange(10, 10 + num_users),
        train_users=users,
        train_items=items,
        train_ratings=np.linspace(1, 5, num_rows).astype(np.float32),
        test=NO_EVAL,
        validation=NO_EVAL,
        num_items=num_items,
    )


def _synthetic_client() -> ClientData:
    """A two-user client cut from the synthetic generator (explicit ratings kept for mse)."""
    data = generate_synthetic(num_users=6, num_items=NUM_ITEMS, mean_interactions=8, seed=0)
    rows = np.flatnonzero(data.users < 2)
    return ClientData(
        global_users=np.array([0, 1]),
        train_users=data.users[rows],
        train_items=data.items[rows],
        train_ratings=data.ratings[rows],
        test=NO_EVAL,
        validation=NO_EVAL,
        num_items=NUM_ITEMS,
    )


def _model(name: str = "gmf", num_users: int = 2, num_items: int = NUM_ITEMS, dim: int = 4):
    return build_model(ModelConfig(name=name, embedding_dim=dim, mlp_layers=(8, 4)), num_users, num_items, seed=1)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _finite(model) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def _no_opacus_leftovers(model) -> bool:
    hooks = any(m._forward_hooks or m._backward_hooks for m in model.modules())
    attrs = ("grad_sample", "summed_grad", "_forward_counter", "_norm_sample", "_current_grad_sample")
    return not hooks and not any(hasattr(p, a) for p in model.parameters() for a in attrs) and all(
        p.grad is None for p in model.parameters()
    )


# --- (a) (b) accounting ---------------------------------------------------------------


def test_epsilon_after_rounds_matches_dp_accounting():
    data, train = _client(20), TrainConfig(epochs=2, batch_size=8, num_negatives=1)
    dp = RecordDPConfig(noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5)
    # independently of the module: 40 examples, batches of 8 -> q = 1/5, 5 steps an epoch
    q, steps_per_round = 1 / math.ceil(40 / 8), 2 * math.ceil(40 / 8)
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.1))
    integer_orders = [o for o in RDP_ORDERS if float(o).is_integer()]
    same_orders = rdp.RdpAccountant(orders=list(RDP_ORDERS))
    default_orders = rdp.RdpAccountant()
    integer_only = rdp.RdpAccountant(orders=integer_orders)
    model, history = _model(), []
    for server_round in range(1, 4):
        result = private_local_epochs(model, data, train, dp, history, [3, server_round, 10], secret_seed=server_round)
        history = result.history
        same_orders.compose(event, steps_per_round)
        assert result.sample_rate == q and result.steps == steps_per_round
        # Fractional orders: dp-accounting sums |binomial| terms (an upper bound), Opacus the
        # signed series, so their RDP differs by up to ~2% there and epsilon by ~0.1%.
        assert result.epsilon == pytest.approx(same_orders.get_epsilon(1e-5), rel=1e-2)
    default_orders.compose(event, 3 * steps_per_round)
    assert result.epsilon == pytest.approx(default_orders.get_epsilon(1e-5), rel=1e-2)
    # Integer orders have one closed form: there the two libraries agree exactly.
    integer_only.compose(event, 3 * steps_per_round)
    opacus = RDPAccountant()
    opacus.history = list(history)
    assert opacus.get_epsilon(1e-5, alphas=integer_orders) == pytest.approx(integer_only.get_epsilon(1e-5), rel=1e-9)
    # and the reported value is Opacus' RDPAccountant on that history (its default orders: 1e-2)
    assert result.epsilon == pytest.approx(opacus.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), rel=1e-12)
    assert result.epsilon == pytest.approx(opacus.get_epsilon(1e-5), rel=1e-2)
    assert history == [(1.1, q, 3 * steps_per_round)]


def test_epsilon_is_cumulative_over_rounds_not_reset():
    data, train = _client(12), TrainConfig(epochs=2, batch_size=6, num_negatives=1)
    dp = RecordDPConfig(noise_multiplier=1.0, delta=1e-5)
    model, history, per_round = _model(), [], []
    for server_round in range(1, 4):
        result = private_local_epochs(model, data, train, dp, history, [3, server_round, 10], secret_seed=7)
        history = result.history
        per_round.append(result.epsilon)
    assert per_round[0] < per_round[1] < per_round[2]
    # one accountant over the whole federation: 3 rounds x 2 epochs x 4 steps
    single = RDPAccountant()
    single.history = [(1.0, 0.25, 24)]
    assert history == single.history
    assert per_round[2] == pytest.approx(single.get_epsilon(1e-5, alphas=list(RDP_ORDERS)), rel=1e-12)
    # the same as one 6-epoch round from an empty history
    one_call = private_local_epochs(_model(), data, TrainConfig(epochs=6, batch_size=6, num_negatives=1), dp, [], SEED)
    assert one_call.history == history and one_call.epsilon == pytest.approx(per_round[2], rel=1e-12)
    # a fresh accountant each round would have reported the 1-round value every time
    assert per_round[2] > 1.5 * per_round[0]


def test_history_epsilon_empty_and_no_noise():
    assert history_epsilon([], 1e-5) == 0.0
    assert history_epsilon([(0.0, 0.5, 3)], 1e-5) == math.inf
    assert history_epsilon([[1.0, 0.1, 10]], 1e-5) == history_epsilon([(1.0, 0.1, 10)], 1e-5)  # lists from storage


# --- (c) budget -------------------------------------------------------------------------


def test_exhausted_budget_declines_and_leaves_model_untouched():
    data, train = _client(12), TrainConfig(epochs=1, batch_size=6, num_negatives=1)
    history = [(1.0, 0.25, 400)]
    spent = history_epsilon(history, 1e-5)
    dp = RecordDPConfig(noise_multiplier=1.0, delta=1e-5, epsilon_budget=spent + 1e-3)
    model = _model()
    before = _snapshot(model)
    result = private_local_epochs(model, data, train, dp, history, SEED)
    assert result.declined and "budget" in result.reason
    assert result.history == history and result.epsilon == spent and result.steps == 0
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert _no_opacus_leftovers(model)


def test_budget_is_never_exceeded_over_rounds():
    data, train = _client(12), TrainConfig(epochs=1, batch_size=6, num_negatives=1)
    one_round = history_epsilon([(1.0, 0.25, 4)], 1e-5)
    two_rounds = history_epsilon([(1.0, 0.25, 8)], 1e-5)
    dp = RecordDPConfig(noise_multiplier=1.0, delta=1e-5, epsilon_budget=(one_round + two_rounds) / 2)
    model, history, outcomes = _model(), [], []
    for server_round in range(1, 4):
        result = private_local_epochs(model, data, train, dp, history, [3, server_round, 10])
        history = result.history
        outcomes.append(result.declined)
        assert result.epsilon <= dp.epsilon_budget
    assert outcomes == [False, True, True]
    assert history == [(1.0, 0.25, 4)]


# --- (d) clipping and noise -------------------------------------------------------------


def _epoch_examples(data: ClientData, train: TrainConfig, seed: list[int]):
    """The examples of the first epoch, rebuilt the way local_epochs draws them."""
    rng = np.random.default_rng(seed)
    rng.integers(2**31)
    positives = PositiveSet(data.train_users, data.train_items, data.num_items)
    return build_examples(data.train_users, data.train_items, data.train_ratings, positives, train, rng)


def _clipped_mean_gradient(model, examples, loss: str, clip: float) -> dict[str, torch.Tensor]:
    """(1/N) sum_i clip(g_i), per-example gradients computed one example at a time."""
    params = dict(model.named_parameters())
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for i in range(len(examples)):
        model.zero_grad()
        batch_loss(model, loss, examples.users[i : i + 1], examples.items[i : i + 1], examples.targets[i : i + 1]).backward()
        grads = {name: p.grad.clone() for name, p in params.items()}
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, g in grads.items():
            total[name] += factor * g
    model.zero_grad()
    return {name: g / len(examples) for name, g in total.items()}


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("loss", ["bce", "mse", "bpr"])
def test_one_full_batch_step_is_the_mean_of_per_example_clipped_gradients(mode, loss):
    # N <= batch size -> q = 1: every example is in the single batch of the epoch
    data = _client(6)
    train = TrainConfig(epochs=1, batch_size=64, learning_rate=0.5, optimizer="sgd", loss=loss, num_negatives=2)
    dp = RecordDPConfig(noise_multiplier=0.0, max_grad_norm=0.01, grad_sample_mode=mode)
    model = _model("neumf")
    before = _snapshot(model)
    expected = _clipped_mean_gradient(_model("neumf"), _epoch_examples(data, train, SEED), loss, 0.01)
    result = private_local_epochs(model, data, train, dp, [], SEED, secret_seed=0)
    assert result.sample_rate == 1.0 and result.steps == 1
    change = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for name, grad in expected.items():
        torch.testing.assert_close(change[name], -0.5 * grad, atol=1e-7, rtol=1e-4)
    # the averaged clipped gradient has norm <= max_grad_norm, so the step <= lr * C
    step = math.sqrt(sum(float(c.pow(2).sum()) for c in change.values()))
    assert 0 < step <= 0.5 * 0.01 * (1 + 1e-5)
    assert any(n.startswith("user_") and c.abs().sum() > 0 for n, c in change.items()), "user rows trained under DP"


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_parameter_change_is_bounded_by_lr_times_clip_norm_per_step(mode):
    data = _client(10)
    train = TrainConfig(epochs=3, batch_size=64, learning_rate=2.0, optimizer="sgd", num_negatives=3)
    model = _model("mlp")
    before = _snapshot(model)
    private_local_epochs(model, data, train, RecordDPConfig(noise_multiplier=0.0, max_grad_norm=1e-3, grad_sample_mode=mode), [], SEED)
    change = math.sqrt(sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in model.named_parameters()))
    assert 0 < change <= 3 * 2.0 * 1e-3 * (1 + 1e-5)


def test_proximal_gradient_is_added_after_clipping_and_noise():
    data = _client(6)
    train = TrainConfig(epochs=1, batch_size=64, learning_rate=0.5, optimizer="sgd", num_negatives=1, proximal_mu=0.3)
    dp = RecordDPConfig(noise_multiplier=0.0, max_grad_norm=0.01)
    model = _model()
    before = _snapshot(model)
    reference = {name: torch.zeros_like(p) for name, p in model.named_parameters() if not name.startswith("user_")}
    expected = _clipped_mean_gradient(_model(), _epoch_examples(data, train, SEED), "bce", 0.01)
    private_local_epochs(model, data, train, dp, [], SEED, reference=reference, secret_seed=0)
    for name, p in model.named_parameters():
        prox = 0.3 * before[name] if name in reference else 0.0
        torch.testing.assert_close(p.detach() - before[name], -0.5 * (expected[name] + prox), atol=1e-7, rtol=1e-4)


def test_noise_changes_the_update_with_the_calibrated_scale():
    data = _client(16, num_items=500)
    train = TrainConfig(epochs=1, batch_size=64, learning_rate=1.0, optimizer="sgd", num_negatives=1)
    updates = {}
    for noise in (0.0, 2.0):
        model = _model(num_items=500, dim=8)
        before = model.item_embedding.weight.detach().clone()
        dp = RecordDPConfig(noise_multiplier=noise, max_grad_norm=0.5)
        private_local_epochs(model, data, train, dp, [], SEED, secret_seed=11)
        updates[noise] = model.item_embedding.weight.detach() - before
    difference = updates[2.0] - updates[0.0]
    assert not torch.equal(updates[2.0], updates[0.0])
    # one full-batch SGD step: the difference is lr * N(0, (z C)^2) / expected batch (32)
    assert float(difference.std()) == pytest.approx(1.0 * 2.0 * 0.5 / 32, rel=0.1)
    assert abs(float(difference.mean())) < 0.1 * float(difference.std())


def test_sampling_and_noise_are_secret_by_default():
    data, train = _client(12), TrainConfig(epochs=1, batch_size=6, num_negatives=1)
    a, b = _model(), _model()
    private_local_epochs(a, data, train, RecordDPConfig(), [], SEED)
    private_local_epochs(b, data, train, RecordDPConfig(), [], SEED)
    assert not torch.equal(a.item_embedding.weight, b.item_embedding.weight), "public seed must not fix the noise"
    c, d = _model(), _model()
    private_local_epochs(c, data, train, RecordDPConfig(), [], SEED, secret_seed=5)
    private_local_epochs(d, data, train, RecordDPConfig(), [], SEED, secret_seed=5)
    assert torch.equal(c.item_embedding.weight, d.item_embedding.weight)


# --- (e) corner cases ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
@pytest.mark.parametrize("rows", [49, 93])
def test_batch_size_one_on_awkward_sizes_stays_finite_and_runs_every_step(mode, rows):
    # Opacus' own arithmetic: an expected batch of int(49 * (1/49)) = 0 and int(1 / (1/93)) = 92 steps
    assert int(49 * (1 / 49)) == 0 and int(1 / (1 / 93)) == 92
    data = _client(rows)
    train = TrainConfig(epochs=1, batch_size=1, learning_rate=0.01, num_negatives=0)
    model = _model()
    result = private_local_epochs(model, data, train, RecordDPConfig(grad_sample_mode=mode), [], SEED, secret_seed=1)
    assert _finite(model)
    assert result.sample_rate == 1 / rows and result.steps == rows
    assert result.history == [(1.0, 1 / rows, rows)]


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_poisson_batches_are_noise_only_steps_and_are_accounted(mode):
    data = _client(3, num_users=1)
    train = TrainConfig(epochs=6, batch_size=1, learning_rate=0.05, num_negatives=0)
    model = _model(num_users=1)
    result = private_local_epochs(model, data, train, RecordDPConfig(grad_sample_mode=mode), [], SEED, secret_seed=2)
    assert result.empty_batches > 0  # P(empty) = (2/3)^3 per step, 18 steps
    assert result.steps == 18 and result.history == [(1.0, 1 / 3, 18)]
    assert _finite(model) and math.isfinite(result.loss)
    assert _no_opacus_leftovers(model)


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_empty_batches_still_release_the_noise(mode):
    # Item rows no example touches move by the noise alone: lr * sum_t N(0, (zC)^2) / E[B].
    # Over all 18 steps their spread is sqrt(18) noise draws; skipping the empty batches
    # would leave only sqrt(18 - empty).
    data = _client(3, num_users=1, num_items=2000)
    train = TrainConfig(epochs=6, batch_size=1, learning_rate=0.1, optimizer="sgd", num_negatives=0)
    model = _model(num_users=1, num_items=2000, dim=8)
    before = model.item_embedding.weight.detach().clone()
    dp = RecordDPConfig(noise_multiplier=1.5, max_grad_norm=0.2, grad_sample_mode=mode)
    result = private_local_epochs(model, data, train, dp, [], SEED, secret_seed=2)
    assert result.empty_batches >= 3
    unused = np.setdiff1d(np.arange(2000), data.train_items)
    spread = float((model.item_embedding.weight.detach() - before)[unused].std())
    assert spread == pytest.approx(0.1 * 1.5 * 0.2 * math.sqrt(18), rel=0.03)  # E[B] = 3 / 3 = 1
    assert spread > 0.1 * 1.5 * 0.2 * math.sqrt(18 - result.empty_batches) * 1.05


def test_more_batch_than_examples_and_no_examples():
    model = _model()
    result = private_local_epochs(model, _client(3), TrainConfig(batch_size=256, num_negatives=1), RecordDPConfig(), [], SEED)
    assert result.sample_rate == 1.0 and result.steps == 1 and _finite(model)
    empty = _client(0)
    result = private_local_epochs(model, empty, TrainConfig(), RecordDPConfig(), [(1.0, 0.5, 2)], SEED)
    assert result.declined and result.history == [(1.0, 0.5, 2)] and result.steps == 0


# --- (f) target epsilon -------------------------------------------------------------------


def test_target_epsilon_is_reached_after_the_planned_epochs_and_not_passed():
    data, train = _client(20), TrainConfig(epochs=2, batch_size=4, num_negatives=1)  # 40 examples, q = 0.1
    dp = RecordDPConfig(target_epsilon=1.0, planned_epochs=4, delta=1e-5, epsilon_budget=1.0)
    model, history = _model(), []
    for server_round in (1, 2):
        result = private_local_epochs(model, data, train, dp, history, [3, server_round, 10])
        history = result.history
        assert not result.declined
    assert result.steps == 20 and result.sample_rate == pytest.approx(0.1)
    assert 1.0 - 0.02 <= result.epsilon <= 1.0
    assert history == [(result.noise_multiplier, 0.1, 40)]
    third = private_local_epochs(model, data, train, dp, history, [3, 3, 10])
    assert third.declined and third.epsilon == result.epsilon
    plan = plan_round(dp, num_examples_per_epoch(20, train), train, [])
    assert plan.noise_multiplier == result.noise_multiplier and plan.steps == 20


# --- (g) every model, both modes ----------------------------------------------------------


@pytest.mark.parametrize("loss", ["bce", "mse", "bpr"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_and_ghost_equals_hooks(name, loss):
    data = _synthetic_client()
    train = TrainConfig(epochs=2, batch_size=8, learning_rate=0.01, loss=loss, num_negatives=1)
    results = {}
    for mode in ("ghost", "hooks"):
        model = _model(name)
        before = _snapshot(model)
        dp = RecordDPConfig(noise_multiplier=0.7, max_grad_norm=0.5, grad_sample_mode=mode)
        result = private_local_epochs(model, data, train, dp, [], SEED, secret_seed=4)
        assert not result.declined and math.isfinite(result.loss) and _finite(model)
        assert all(not torch.equal(before[n], p) for n, p in model.named_parameters()), "noise reaches every parameter"
        assert _no_opacus_leftovers(model)
        results[mode] = (result, _snapshot(model))
    # same sampling and noise: the two ways of clipping give the same model
    assert results["ghost"][0].history == results["hooks"][0].history
    for n, value in results["ghost"][1].items():
        torch.testing.assert_close(value, results["hooks"][1][n], atol=1e-5, rtol=1e-4)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("noise_multiplier", -0.1, "noise_multiplier"),
        ("noise_multiplier", float("nan"), "noise_multiplier"),
        ("max_grad_norm", 0.0, "max_grad_norm"),
        ("delta", 1.0, "delta"),
        ("delta", 0.0, "delta"),
        ("epsilon_budget", -1.0, "epsilon_budget"),
        ("target_epsilon", float("inf"), "target_epsilon"),
        ("planned_epochs", 0, "planned_epochs"),
        ("planned_epochs", 2.5, "planned_epochs"),
        ("grad_sample_mode", "functorch", "grad_sample_mode"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message):
        RecordDPConfig(**{field: value})


def test_unreachable_target_epsilon_is_a_clear_error():
    dp = RecordDPConfig(target_epsilon=1e-6, planned_epochs=1000, delta=1e-12)
    with pytest.raises(ValueError, match="target_epsilon"):
        plan_round(dp, 100, TrainConfig(batch_size=100), [])
