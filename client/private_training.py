"""Record-level differential privacy on the device: local training with DP-SGD (Opacus).

:func:`private_local_epochs` is the private twin of :func:`client.local.local_epochs`:
the same examples (every interaction plus negatives redrawn each epoch from the same
seeded stream), the same optimizers and losses, but every optimizer step is a step of
the sampled Gaussian mechanism: Poisson-sampled batch, per-example gradients clipped to
``max_grad_norm`` (the user rows included, they are part of the model), Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm`` added to the sum, divided by
the expected batch size.

One *record* is one training example (an interaction or a sampled negative); the epsilon
is per example and nothing here accounts a whole interaction. Removing one interaction
removes ``1 + num_negatives`` examples under ``bce`` (``num_negatives`` under ``bpr``), and
since negatives are redrawn every epoch from one seeded stream it also changes the other
examples' negatives, so it is not even a fixed group; group privacy over the examples would
in any case give a vacuous delta (``g e^((g-1) eps) delta``). Under ``mse`` an interaction
is one example. As in Opacus, the number of examples (hence the sample rate and the step
count) is treated as public.

Accounting is cumulative over the whole federation: the caller keeps the Opacus
``RDPAccountant`` history ``[(noise_multiplier, sample_rate, steps), ...]`` between
rounds (e.g. in Flower's ``Context.state``) and passes it back in; the round's
accountant starts from it, so epsilon never resets. Before training, the epsilon the
round would reach is computed; a round that would exceed ``epsilon_budget`` is
declined and the model is not touched.

Design notes (verified against the installed Opacus 1.6):

* **One engine, one loader, one accountant per round.** The number of examples is the
  same every epoch (interactions x (1 + negatives) for bce), so the sample rate is too.
  ``make_private`` is called once over a ``TensorDataset``; later epochs swap the
  dataset's tensors for the freshly drawn negatives, so the same Poisson loader, DP
  optimizer and accountant serve every epoch.
* **Sample rate and steps.** ``q = 1 / ceil(N / batch_size)`` (what ``make_private``
  derives from a ``DataLoader`` with that batch size; equals ``batch_size / N`` when the
  batch size divides N) and exactly ``ceil(N / batch_size)`` steps per epoch, so one
  epoch is one expected pass and as many steps as the non-private loop. Opacus'
  ``DPDataLoader`` uses ``int(1 / q)`` steps, which float rounding makes one short for
  some N (93, 99, 105, ...), and ``make_private`` then accounts ``1 / int(1 / q)``
  instead of q; we set the sampler's step count and re-attach the accountant hook
  with the q actually sampled.
* **Expected batch size.** ``make_private`` averages by ``int(N * q)``, which is 0 for
  some N when q = 1/N (N = 49, 98, 103, ... with batch size 1) and turns every weight
  into inf/NaN. We set the optimizer's denominator to ``N / ceil(N / batch_size)``
  (>= 1 always, and the true expected batch size).
* **Empty Poisson batches** still run the mechanism: the released update is the noise
  alone, and the accountant counts the step (that is what the RDP analysis covers;
  skipping the update would leak whether the batch was empty). Opacus' hooks mode does
  exactly this itself, ghost mode crashes on an empty batch (embedding norm sampler), so
  both modes take that noise-only step explicitly without a forward pass.
* **Losses.** bce and mse use ``BCEWithLogitsLoss`` / ``MSELoss``; bpr scores the positive
  and the negative item in *one* forward pass over ``[B, 2]`` index tensors (the models
  are element-wise over leading dimensions), because ghost clipping rejects a module
  called twice per step ("parameter tying"). The per-example gradient is then the
  gradient of that example's pairwise loss in both modes.
* **Secret randomness.** Batch sampling and noise must not be predictable by the server
  (it knows the run seed, the round and the client key, so noise derived from them
  could be subtracted). They come from OS entropy unless ``secret_seed`` is given
  (tests and benchmarks only). Negatives still follow the public seed, as in
  :func:`client.local.local_epochs`. ``secure_mode`` (torchcsprng, not installed) is
  not used, so the floating-point noise attack is not mitigated.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from common.federation import ClientData
from common.models import RecModel
from common.training import Examples, PositiveSet, TrainConfig, build_examples, make_optimizer

# Opacus is imported where record-level DP uses it, not with this module: the import takes
# about 1.9 s (it loads torch.distributed, sympy and scipy), which every Ray worker of every
# simulation paid, and every ClientApp start, with or without record-level DP.
if TYPE_CHECKING:
    from opacus import PrivacyEngine

GRAD_SAMPLE_MODES = ("ghost", "hooks")
# Ghost clipping never materialises per-example gradients of the embedding tables
# (B x items x dim floats per table in hooks mode). Measured with
# simulations/bench_record_dp.py (dim 32, batch 128): 2x (GMF, 1,682 items) to 23x
# (GMF, 20,000 items) faster per epoch than hooks, and +40-80 MB of training peak
# memory instead of +115 MB-1.1 GB.
DEFAULT_GRAD_SAMPLE_MODE = "ghost"
# Opacus' default RDP orders plus 11 and the large orders dp-accounting also uses, so a
# small epsilon is not stuck at the largest order (and both libraries use one grid).
RDP_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])

History = list[tuple[float, float, int]]

__all__ = [
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "History",
    "PrivateRoundResult",
    "RecordDPConfig",
    "RoundPlan",
    "history_epsilon",
    "num_examples_per_epoch",
    "plan_round",
    "private_local_epochs",
]


@dataclass(frozen=True)
class RecordDPConfig:
    """DP-SGD settings of one device (record = one training example)."""

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    epsilon_budget: float = 0.0  # > 0: decline a round that would exceed it; 0 = no cap
    target_epsilon: float = 0.0  # > 0: noise chosen so planned_epochs epochs reach it
    planned_epochs: int = 1  # the most epochs this device can run: rounds x local epochs
    grad_sample_mode: str = DEFAULT_GRAD_SAMPLE_MODE

    def __post_init__(self) -> None:
        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if finite("noise_multiplier") < 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {self.noise_multiplier}")
        if finite("max_grad_norm") <= 0:
            raise ValueError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < finite("delta") < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if finite("epsilon_budget") < 0:
            raise ValueError(f"epsilon_budget must be >= 0 (0 = no cap), got {self.epsilon_budget}")
        if finite("target_epsilon") < 0:
            raise ValueError(f"target_epsilon must be >= 0 (0 = use noise_multiplier), got {self.target_epsilon}")
        if isinstance(self.planned_epochs, bool) or not isinstance(self.planned_epochs, int) or self.planned_epochs < 1:
            raise ValueError(f"planned_epochs must be an integer >= 1, got {self.planned_epochs!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"unknown grad_sample_mode {self.grad_sample_mode!r}; expected one of {', '.join(GRAD_SAMPLE_MODES)}"
            )


@dataclass
class PrivateRoundResult:
    """Outcome of one private round; ``history`` and ``epsilon`` are cumulative."""

    loss: float  # mean loss of the last epoch (computed on private data: not itself DP)
    history: History  # the full accountant history after this round (unchanged if declined)
    epsilon: float  # cumulative epsilon at ``delta`` after this round
    noise_multiplier: float
    sample_rate: float
    steps: int  # DP-SGD steps taken this round (empty batches included)
    declined: bool
    reason: str
    empty_batches: int = 0  # steps whose Poisson batch was empty (noise-only updates)


@dataclass(frozen=True)
class RoundPlan:
    """What a round would spend, known before any training."""

    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    steps: int
    epsilon_after: float


def history_epsilon(history: History, delta: float) -> float:
    """Cumulative epsilon of an Opacus RDP history at ``delta`` (0.0 when empty).

    The same computation as ``RDPAccountant(history).get_epsilon(delta, alphas=RDP_ORDERS)``
    (Opacus' ``compute_rdp`` summed over the history, then ``get_privacy_spent``), with
    the per-step RDP curve of each (noise, sample rate) cached: it is linear in the
    steps, and Opacus needs ~0.3 s per curve for the fractional orders.
    """
    events = [(z, q, steps) for z, q, steps in _normalise(history) if steps > 0]
    if not events:
        return 0.0
    from opacus.accountants.analysis import rdp as privacy_analysis

    rdp = sum(steps * np.asarray(_rdp_per_step(z, q)) for z, q, steps in events)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")
        eps, _ = privacy_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants.analysis import rdp as privacy_analysis

    curve = privacy_analysis.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS))
    return tuple(float(v) for v in curve)


@lru_cache(maxsize=1024)
def _noise_for_target(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """Opacus' binary search (1-5 s), once per process for each setting."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the")  # probes far from the answer
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant="rdp",
                alphas=list(RDP_ORDERS),
            )
        )


def num_examples_per_epoch(num_interactions: int, config: TrainConfig) -> int:
    """Training examples in one epoch (what the sample rate is relative to)."""
    if config.loss == "mse":
        return num_interactions
    if config.loss == "bpr":
        return num_interactions * config.num_negatives
    return num_interactions * (1 + config.num_negatives)


def plan_round(dp: RecordDPConfig, num_examples: int, config: TrainConfig, history: History) -> RoundPlan:
    """Noise multiplier, sample rate, steps and the epsilon ``history`` reaches after the round."""
    if num_examples < 1:
        raise ValueError("a private round needs at least one training example")
    steps_per_epoch = -(-num_examples // config.batch_size)
    sample_rate = 1.0 / steps_per_epoch  # the same float make_private derives
    noise = dp.noise_multiplier
    if dp.target_epsilon > 0:
        try:
            noise = _noise_for_target(dp.target_epsilon, dp.delta, sample_rate, dp.planned_epochs * steps_per_epoch)
        except ValueError as err:
            raise ValueError(
                f"no noise multiplier reaches target_epsilon={dp.target_epsilon} in {dp.planned_epochs} epochs "
                f"at sample rate {sample_rate:.4g}: {err}"
            ) from None
    steps = config.epochs * steps_per_epoch
    after = history_epsilon(_append(_normalise(history), float(noise), sample_rate, steps), dp.delta)
    return RoundPlan(float(noise), sample_rate, steps_per_epoch, steps, after)


class _PairwiseBPRLoss(nn.Module):
    """BPR over ``[B, 2]`` scores (positive, negative); ``reduction`` as torch losses."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, scores: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
        per_example = -F.logsigmoid(scores[:, 0] - scores[:, 1])
        if self.reduction == "none":
            return per_example
        return per_example.sum() if self.reduction == "sum" else per_example.mean()


def _criterion(loss: str) -> nn.Module:
    if loss == "bce":
        return nn.BCEWithLogitsLoss()
    if loss == "mse":
        return nn.MSELoss()
    if loss == "bpr":
        return _PairwiseBPRLoss()
    raise ValueError(f"record-level DP supports the losses bce, mse and bpr, not {loss!r}")


def _forward(module: nn.Module, loss: str, users, items, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, criterion target) for one batch; bpr scores both items in one pass."""
    if loss == "bpr":
        pairs = torch.stack([items, targets], dim=1)
        return module(users.unsqueeze(1).repeat(1, 2), pairs), torch.zeros(len(users))
    return module(users, items), targets


def _append(history: History, noise: float, sample_rate: float, steps: int) -> History:
    """``history`` after ``steps`` more steps, merged the way ``RDPAccountant.step`` merges."""
    if history and history[-1][:2] == (noise, sample_rate):
        return history[:-1] + [(noise, sample_rate, history[-1][2] + steps)]
    return history + [(noise, sample_rate, steps)]


def _normalise(history: History) -> History:
    return [(float(z), float(q), int(steps)) for z, q, steps in history]


def _generators(secret_seed: int | None) -> tuple[torch.Generator, torch.Generator]:
    """Sampling and noise generators the server cannot reproduce (unless seeded for tests)."""
    entropy = secrets.randbits(128) if secret_seed is None else secret_seed
    sampling, noise = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint64)
    mask = (1 << 63) - 1
    return torch.Generator().manual_seed(int(sampling) & mask), torch.Generator().manual_seed(int(noise) & mask)


def private_local_epochs(
    model: RecModel,
    data: ClientData,
    config: TrainConfig,
    dp: RecordDPConfig,
    history: History,
    seed: list[int],
    *,
    reference: dict[str, torch.Tensor] | None = None,
    secret_seed: int | None = None,
) -> PrivateRoundResult:
    """``config.epochs`` DP-SGD passes with fresh negatives, accounted on top of ``history``.

    ``model`` is trained in place (all of it: shared and user rows), unless the round
    would take the cumulative epsilon past ``dp.epsilon_budget``; then nothing is
    trained and ``declined`` is set. ``reference`` adds FedProx's proximal gradient
    ``proximal_mu * (w - w_ref)`` after the noise (data-independent, so post-processing).
    ``secret_seed`` fixes sampling and noise: for tests only, never in deployment.
    """
    previous = _normalise(history)
    spent = history_epsilon(previous, dp.delta)
    rng = np.random.default_rng(seed)
    rng.integers(2**31)  # local_epochs' shuffle seed: drawn so the negatives match the non-private path
    positives = PositiveSet(data.train_users, data.train_items, data.num_items)
    examples = build_examples(data.train_users, data.train_items, data.train_ratings, positives, config, rng)
    num_examples = len(examples)
    criterion = _criterion(config.loss)

    def declined(reason: str, plan: RoundPlan | None = None) -> PrivateRoundResult:
        return PrivateRoundResult(
            0.0, previous, spent, plan.noise_multiplier if plan else dp.noise_multiplier,
            plan.sample_rate if plan else 0.0, 0, True, reason,
        )

    if num_examples == 0:
        return declined("no training examples")
    plan = plan_round(dp, num_examples, config, previous)
    if dp.epsilon_budget > 0 and not plan.epsilon_after <= dp.epsilon_budget:
        return declined(
            f"epsilon budget: this round would take epsilon from {spent:.4g} to {plan.epsilon_after:.4g} "
            f"(delta={dp.delta:g}), over the budget of {dp.epsilon_budget:g}",
            plan,
        )

    sampling_gen, noise_gen = _generators(secret_seed)
    dataset = _EpochDataset(examples.users, examples.items, examples.targets)
    engine = _engine()
    engine.accountant.history = list(previous)
    optimizer = make_optimizer(model, config)
    made = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=DataLoader(dataset, batch_size=config.batch_size, generator=sampling_gen, collate_fn=_as_batch),
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=dp.grad_sample_mode,
        noise_generator=noise_gen,
    )
    if dp.grad_sample_mode == "ghost":
        module, dp_optimizer, criterion, loader = made
    else:
        module, dp_optimizer, loader = made
    loss, steps, empty = 0.0, 0, 0
    try:
        if loader.sample_rate != plan.sample_rate:  # pragma: no cover - guards an Opacus change
            raise RuntimeError(f"Opacus sample rate {loader.sample_rate} != planned {plan.sample_rate}")
        loader.batch_sampler.steps = plan.steps_per_epoch  # not int(1 / q): see the module notes
        dp_optimizer.expected_batch_size = num_examples / plan.steps_per_epoch  # not int(N * q)
        # make_private accounts q = 1 / len(its loader) = 1 / int(1 / q): off for the same N
        dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=plan.sample_rate))
        prox = _proximal_pairs(model, reference, config.proximal_mu)
        module.train()
        with warnings.catch_warnings():
            # Embedding inputs are indices, so torch remarks that the full backward hooks
            # see no input gradients; Opacus only needs the output gradients.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for epoch in range(config.epochs):
                if epoch:
                    examples = build_examples(data.train_users, data.train_items, data.train_ratings, positives, config, rng)
                    _swap(dataset, examples, num_examples)
                total, count = 0.0, 0
                for users, items, targets in loader:
                    dp_optimizer.zero_grad(set_to_none=True)
                    if len(users) == 0:
                        _empty_batch_gradients(dp_optimizer, dp.grad_sample_mode)
                        empty += 1
                    else:
                        scores, target = _forward(module, config.loss, users, items, targets)
                        batch_loss = criterion(scores, target)
                        batch_loss.backward()
                        total += float(batch_loss.detach()) * len(users)
                        count += len(users)
                    _step(dp_optimizer, prox, config.proximal_mu)
                    steps += 1
                loss = total / max(count, 1)
    finally:
        dp_optimizer.zero_grad(set_to_none=True)
        module.cleanup()  # the caller keeps using ``model``: no hooks or per-sample state left
        for param in model.parameters():
            param.grad = None
            if hasattr(param, "summed_grad"):
                del param.summed_grad
    new_history = _normalise(engine.accountant.history)
    planned = _append(previous, plan.noise_multiplier, plan.sample_rate, plan.steps)
    if steps != plan.steps or new_history != planned:  # pragma: no cover - every step as planned
        raise RuntimeError(f"ran {steps} DP-SGD steps accounted as {new_history}, planned {planned}")
    return PrivateRoundResult(
        loss=loss,
        history=new_history,
        epsilon=history_epsilon(new_history, dp.delta),
        noise_multiplier=plan.noise_multiplier,
        sample_rate=plan.sample_rate,
        steps=steps,
        declined=False,
        reason="",
        empty_batches=empty,
    )


def _engine() -> PrivacyEngine:
    from opacus import PrivacyEngine

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        return PrivacyEngine(accountant="rdp")


class _EpochDataset(TensorDataset):
    """This epoch's (users, items, targets); a batch is gathered with one index per tensor.

    ``DataLoader`` hands ``__getitems__`` the whole Poisson batch of indices (possibly
    empty), which is ~20% of a ghost step faster than 3 x B ``__getitem__`` calls.
    """

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[index] for tensor in self.tensors]


def _as_batch(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    """Collate for :class:`_EpochDataset`: the gathered tensors already are the batch."""
    return batch


def _swap(dataset: TensorDataset, examples: Examples, num_examples: int) -> None:
    """Point the (already private) loader's dataset at this epoch's examples."""
    if len(examples) != num_examples:  # pragma: no cover - fixed by interactions x negatives
        raise RuntimeError(f"epoch has {len(examples)} examples, the sample rate was set for {num_examples}")
    dataset.tensors = (examples.users, examples.items, examples.targets)


def _empty_batch_gradients(optimizer, mode: str) -> None:
    """An empty Poisson batch: the clipped sum is zero, the step adds the noise alone."""
    for param in optimizer.params:
        if mode == "ghost":
            param.grad = torch.zeros_like(param)
        else:
            param.grad_sample = param.new_zeros((0, *param.shape))


def _proximal_pairs(model: RecModel, reference, mu: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if reference is None or mu <= 0:
        return []
    params = dict(model.named_parameters())
    return [(params[name], ref) for name, ref in reference.items()]


def _step(optimizer, prox: list, mu: float) -> None:
    """One DP-SGD step; the proximal gradient is added after clipping and noise."""
    if not prox:
        optimizer.step()
        return
    if optimizer.pre_step():  # clip, noise, average and account
        for param, ref in prox:
            param.grad.add_(param.detach() - ref, alpha=mu)
        optimizer.original_optimizer.step()
