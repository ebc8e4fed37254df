"""Local training shared by the centralized baselines and the ClientApp.

One loop serves both sides so a federated result and its centralized yardstick differ
only in *where* the updates are combined, never in how examples, negatives or losses
are built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from common.models import CONTENT_PREFIX, RecModel

LOSSES = ("bce", "bpr", "mse")
OPTIMIZERS = ("adam", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one local training call (``epochs`` passes over the data)."""

    epochs: int = 1
    batch_size: int = 256
    learning_rate: float = 1e-3
    num_negatives: int = 4
    loss: str = "bce"
    optimizer: str = "adam"
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    # Adam's epsilon for the shared (item-side and dense) parameters; the user rows keep
    # torch's 1e-8. See make_optimizer for why federated training raises it.
    shared_adam_epsilon: float = 1e-8
    # Learning rate of the user-local rows (0: the same as ``learning_rate``).
    user_learning_rate: float = 0.0
    # Learning rate of a hybrid model's content projection (0: the same as ``learning_rate``).
    content_learning_rate: float = 0.0
    # Learning rate of the dense shared layers: NCF's output layer and MLP tower, MF's global
    # bias (0: the same as ``learning_rate``). Item rows keep ``learning_rate``.
    dense_learning_rate: float = 0.0
    # A hybrid model's extra loss on the same pairs scored from content alone (0: none).
    content_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; expected one of {', '.join(LOSSES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {self.num_negatives}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.user_learning_rate < 0:
            raise ValueError(f"user_learning_rate must be >= 0, got {self.user_learning_rate}")
        if self.content_learning_rate < 0:
            raise ValueError(f"content_learning_rate must be >= 0, got {self.content_learning_rate}")
        if self.dense_learning_rate < 0:
            raise ValueError(f"dense_learning_rate must be >= 0, got {self.dense_learning_rate}")
        if self.content_loss_weight < 0:
            raise ValueError(f"content_loss_weight must be >= 0, got {self.content_loss_weight}")
        if self.shared_adam_epsilon <= 0:
            raise ValueError(f"shared_adam_epsilon must be > 0, got {self.shared_adam_epsilon}")
        if self.loss == "bpr" and self.num_negatives < 1:
            raise ValueError("the bpr loss needs num_negatives >= 1")


class PositiveSet:
    """Membership test for (user, item) pairs, used to reject sampled 'negatives'."""

    def __init__(self, users: np.ndarray, items: np.ndarray, num_items: int) -> None:
        self.num_items = num_items
        self._keys = np.unique(users.astype(np.int64) * num_items + items.astype(np.int64))

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.num_items + items.astype(np.int64)
        pos = np.searchsorted(self._keys, keys)
        pos[pos == len(self._keys)] = 0
        return self._keys[pos] == keys if len(self._keys) else np.zeros(len(keys), dtype=bool)


def sample_training_negatives(
    users: np.ndarray, positives: PositiveSet, rng: np.random.Generator, max_rounds: int = 50
) -> np.ndarray:
    """One uniformly sampled unobserved item per entry of ``users`` (rejection sampling).

    Not :func:`common.negatives.sample_negatives`, which draws the fixed, distinct
    evaluation negatives; these are redrawn every epoch and may repeat.

    Uniform sampling over the catalogue is the NCF protocol; a user who has seen almost
    every item keeps a rare observed item after ``max_rounds`` rather than looping forever.
    """
    items = rng.integers(0, positives.num_items, size=len(users))
    for _ in range(max_rounds):
        clash = positives.contains(users, items)
        if not clash.any():
            break
        items[clash] = rng.integers(0, positives.num_items, size=int(clash.sum()))
    return items


@dataclass(frozen=True)
class Examples:
    """One epoch of training examples as tensors."""

    users: torch.Tensor
    items: torch.Tensor
    targets: torch.Tensor  # labels (bce), ratings (mse) or negative items (bpr)

    def __len__(self) -> int:
        return len(self.users)


def build_examples(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    positives: PositiveSet,
    config: TrainConfig,
    rng: np.random.Generator,
) -> Examples:
    """Pair every observed interaction with freshly sampled negatives, per the loss."""
    if config.loss == "mse":
        return Examples(torch.from_numpy(users), torch.from_numpy(items), torch.from_numpy(ratings.astype(np.float32)))
    rep_users = np.repeat(users, config.num_negatives)
    negatives = sample_training_negatives(rep_users, positives, rng)
    if config.loss == "bpr":
        rep_items = np.repeat(items, config.num_negatives)
        return Examples(torch.from_numpy(rep_users), torch.from_numpy(rep_items), torch.from_numpy(negatives))
    all_users = np.concatenate([users, rep_users])
    all_items = np.concatenate([items, negatives])
    labels = np.concatenate([np.ones(len(users), np.float32), np.zeros(len(rep_users), np.float32)])
    return Examples(torch.from_numpy(all_users), torch.from_numpy(all_items), torch.from_numpy(labels))


def batch_loss(
    model: RecModel, loss: str, users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, content_weight: float = 0.0
) -> torch.Tensor:
    """Mean loss of one mini-batch; plus ``content_weight`` times the loss of the content-alone scores.

    The content term trains a hybrid's projection ``W`` to score items as it must score new
    ones, without taking any pair away from the collaborative rows (content dropout does).
    """
    value = _pair_loss(model, loss, users, items, targets)
    if content_weight > 0:
        value = value + content_weight * _pair_loss(model.content_scores, loss, users, items, targets)
    return value


def _pair_loss(
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], loss: str, users: torch.Tensor, items: torch.Tensor,
    targets: torch.Tensor,
) -> torch.Tensor:
    if loss == "bce":
        return F.binary_cross_entropy_with_logits(score(users, items), targets)
    if loss == "mse":
        return F.mse_loss(score(users, items), targets)
    return -F.logsigmoid(score(users, items) - score(users, targets)).mean()


def make_optimizer(model: RecModel, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam (the NCF default) or plain SGD over all trainable parameters.

    The user-local rows and the shared parameters are two parameter groups. The user
    rows take ``user_learning_rate``: a device trains its user's row for several epochs
    every time it is sampled, so a row that follows the shared learning rate overfits
    its few interactions, and the item updates computed against it carry that.

    Under Adam the shared parameters also get their own epsilon (``shared_adam_epsilon``).
    A device's Adam starts afresh every round, and its first steps move every coordinate
    by about the learning rate whatever the gradient's size: an item row touched once as
    a sampled negative moves as far as one the user really interacted with, and the
    server averages that drift into the global model round after round. An epsilon near
    the size of the gradients of truly trained rows keeps their Adam step and scales the
    steps of barely-touched rows down with their gradient. Both are measured in the
    README's results.

    The dense shared layers (``dense_learning_rate``) are in every device's loss, not
    only in the rows of the items it touched: each device fits them to its one user for
    all its local steps, and the server averages those fits. They may want a smaller step
    than the item rows.
    """
    local = set(model.local_parameter_names())
    rows = set(model.item_row_parameter_names())
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    user_lr = config.user_learning_rate or config.learning_rate
    content_lr = config.content_learning_rate or config.learning_rate
    dense_lr = config.dense_learning_rate or config.learning_rate
    adam = config.optimizer == "adam"
    shared_eps = {"eps": config.shared_adam_epsilon} if adam else {}
    content = {name for name, _ in named if name.startswith(CONTENT_PREFIX)}
    dense = {name for name, _ in named if name not in local and name not in rows and name not in content}
    groups = [
        {"params": [p for name, p in named if name in local], "lr": user_lr, **({"eps": 1e-8} if adam else {})},
        {"params": [p for name, p in named if name in rows], **shared_eps},
        {"params": [p for name, p in named if name in dense], "lr": dense_lr, **shared_eps},
        # A hybrid's projection W shifts every item's vector at once: it may want a smaller step.
        {"params": [p for name, p in named if name in content], "lr": content_lr, **shared_eps},
    ]
    groups = [group for group in groups if group["params"]]
    if not adam:
        return torch.optim.SGD(groups, lr=config.learning_rate, weight_decay=config.weight_decay)
    # The fused CPU kernel is ~1.7x faster per step on these small models (measured).
    return torch.optim.Adam(groups, lr=config.learning_rate, weight_decay=config.weight_decay, fused=True)


def proximal_term(model: RecModel, reference: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu / 2) * ||w - w_global||^2 over the shared parameters."""
    params = dict(model.named_parameters())
    total = torch.zeros(())
    for name, ref in reference.items():
        total = total + (params[name] - ref).pow(2).sum()
    return 0.5 * mu * total


def train_epoch(
    model: RecModel,
    examples: Examples,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    reference: dict[str, torch.Tensor] | None = None,
) -> float:
    """One shuffled pass over ``examples``; returns the mean training loss."""
    model.train()
    order = torch.randperm(len(examples), generator=generator)
    total, count = 0.0, 0
    for start in range(0, len(order), config.batch_size):
        idx = order[start : start + config.batch_size]
        loss = batch_loss(model, config.loss, examples.users[idx], examples.items[idx], examples.targets[idx],
                          config.content_loss_weight)
        if reference is not None and config.proximal_mu > 0:
            loss = loss + proximal_term(model, reference, config.proximal_mu)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(idx)
        count += len(idx)
    return total / max(count, 1)
