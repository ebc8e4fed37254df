"""Many devices' local training at once: the math of :mod:`client.local` on stacked tensors.

A device of the Flower path builds a small model (its user rows, the item rows its round
trains, the dense shared layers), draws its examples and negatives from its own seeds,
shuffles them with its own generator and takes one optimizer step per mini-batch. Here
the devices of a batch keep exactly those parameters, each in its own rows of a stacked
table (a device's item rows are its own copy, so no device sees another's step), and
step ``s`` of every device still training is computed together: one gather, one
closed-form gradient of GMF or biased MF, one Adam or SGD update over the rows of the
devices that take a step. Examples, negatives, batch order, loss, optimizer groups and
their hyper-parameters are those of :func:`client.local.plan_epochs` and
:func:`common.training.make_optimizer`; the results agree with a device's own training
to float rounding (``tests/test_vectorized.py``).

Devices are ordered by their number of steps (most first), so the devices still training
at any step are a prefix of the batch and their rows a prefix of every table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from client.local import EpochPlan, plan_epochs
from common.federation import ClientData
from common.models import ModelConfig
from common.training import TrainConfig

BATCHED_MODELS = ("gmf", "mf")
# A batch of devices holds at most about this many item rows (each a copy per device).
MAX_BATCH_ROWS = 1 << 19

# Per model: user tables, item tables and dense shared parameters, by the model's names.
USER_TABLES = {"gmf": ("user_embedding.weight",), "mf": ("user_embedding.weight", "user_bias.weight")}
ITEM_TABLES = {"gmf": ("item_embedding.weight",), "mf": ("item_embedding.weight", "item_bias.weight")}
DENSE = {"gmf": ("output.weight", "output.bias"), "mf": ("global_bias.weight",)}


@dataclass
class DeviceRound:
    """One device's part of a batched round: its data, its plan and the orders its generator drew."""

    data: ClientData
    plan: EpochPlan
    orders: list[np.ndarray]  # per epoch, the permutation train_epoch would draw
    steps: int
    user_rows: dict[str, np.ndarray]  # the device's user-local parameters before training


@dataclass
class DeviceResult:
    """What one device's training produced: its shared parameters' rows after training, and its loss."""

    item_rows: np.ndarray  # the sorted item ids trained (the plan's rows)
    items_after: dict[str, np.ndarray]  # per item table, the rows ``item_rows`` after training
    dense_after: dict[str, np.ndarray]
    user_after: dict[str, np.ndarray]
    loss: float


def device_round(data: ClientData, config: TrainConfig, seed: list[int], user_rows: dict[str, np.ndarray]) -> DeviceRound:
    """The device's plan (:func:`client.local.plan_epochs`) and its shuffles, drawn as ``train_epoch`` draws them."""
    plan = plan_epochs(data, config, seed)
    orders = [torch.randperm(len(e), generator=plan.generator).numpy() for e in plan.epochs]
    steps = sum(math.ceil(len(e) / config.batch_size) for e in plan.epochs)
    return DeviceRound(data, plan, orders, steps, user_rows)


class _Adam:
    """The device optimizer's update on the first rows of a stacked table.

    Adam is torch's own fused CPU kernel (``torch._fused_adam_``, what the device's
    ``Adam(fused=True)`` runs), on views of the rows of the devices taking this step; SGD
    is its plain step. The gradient buffer is kept and zeroed per step, not reallocated.
    """

    def __init__(self, table: torch.Tensor, lr: float, eps: float, adam: bool) -> None:
        self.table, self.lr, self.eps, self.adam = table, lr, eps, adam
        self.grad = torch.zeros_like(table)
        self.m = torch.zeros_like(table) if adam else None
        self.v = torch.zeros_like(table) if adam else None

    def gradient(self, rows: int, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Sum the per-example gradients ``(rows gathered, values)`` into the (zero) buffer."""
        grad = self.grad[:rows]
        for index, values in parts:
            grad.index_add_(0, index, values.reshape(len(index), *grad.shape[1:]))

    def clear(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Zero the buffer again where this step wrote (a step touches a few rows of a large table)."""
        for index, _ in parts:
            self.grad.index_fill_(0, index, 0.0)

    def step(self, rows: int, step: int) -> None:
        param, grad = self.table[:rows], self.grad[:rows]
        if not self.adam:
            param.add_(grad, alpha=-self.lr)
            return
        torch._fused_adam_([param], [grad], [self.m[:rows]], [self.v[:rows]], [],
                           [torch.tensor(float(step))], amsgrad=False, lr=self.lr, beta1=0.9, beta2=0.999,
                           weight_decay=0.0, eps=self.eps, maximize=False, grad_scale=None, found_inf=None)


@dataclass
class _Examples:
    """A batch's examples in step order (devices in batch order within a step), with flat row indices."""

    users: torch.Tensor
    items: torch.Tensor
    targets: torch.Tensor  # labels / ratings, or the negative item's flat row (bpr)
    device: torch.Tensor
    weight: torch.Tensor  # 1 / the size of the example's mini-batch (the batch loss is a mean)
    last_epoch: torch.Tensor  # the example belongs to the device's last pass (its reported loss)
    bounds: np.ndarray  # examples of step s: bounds[s]:bounds[s + 1]


def _examples(devices: list[DeviceRound], config: TrainConfig, user_offsets: np.ndarray,
              item_offsets: np.ndarray) -> _Examples:
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("u", "i", "t", "d", "w", "last", "step")}
    bpr = config.loss == "bpr"
    for index, device in enumerate(devices):
        step0 = 0
        for epoch, (examples, order) in enumerate(zip(device.plan.epochs, device.orders, strict=True)):
            n = len(order)
            if n == 0:
                continue
            rank = np.arange(n)
            sizes = np.minimum(config.batch_size, n - (rank // config.batch_size) * config.batch_size)
            items = np.searchsorted(device.plan.rows, examples.items.numpy()[order]) + item_offsets[index]
            targets = examples.targets.numpy()[order]
            if bpr:
                targets = np.searchsorted(device.plan.rows, targets) + item_offsets[index]
            parts["u"].append(examples.users.numpy()[order] + user_offsets[index])
            parts["i"].append(items)
            parts["t"].append(targets)
            parts["d"].append(np.full(n, index))
            parts["w"].append(1.0 / sizes)
            parts["last"].append(np.full(n, epoch == len(device.orders) - 1))
            parts["step"].append(step0 + rank // config.batch_size)
            step0 += math.ceil(n / config.batch_size)
    if not parts["step"]:
        empty = torch.empty(0, dtype=torch.int64)
        return _Examples(empty, empty, empty.float(), empty, empty.float(), empty.bool(), np.zeros(1, np.int64))
    step = np.concatenate(parts["step"])
    order = np.argsort(step, kind="stable")  # by step; within a step, devices in batch order
    bounds = np.searchsorted(step[order], np.arange(int(step.max()) + 2))

    def column(key: str, dtype) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts[key])[order]).astype(dtype))

    return _Examples(column("u", np.int64), column("i", np.int64), column("t", np.int64 if bpr else np.float32),
                     column("d", np.int64), column("w", np.float32), column("last", bool), bounds)


class BatchTrainer:
    """Trains a batch of devices of one model kind together; see the module docstring."""

    def __init__(self, model_config: ModelConfig, config: TrainConfig, shared: dict[str, np.ndarray],
                 devices: list[DeviceRound], *, train_shared: bool = True) -> None:
        if model_config.name not in BATCHED_MODELS:
            raise ValueError(f"batched training supports {', '.join(BATCHED_MODELS)}, not {model_config.name}")
        self.kind, self.config, self.train_shared = model_config.name, config, train_shared
        self.devices = sorted(devices, key=lambda d: -d.steps)  # stable: ties keep the caller's order
        self.order = sorted(range(len(devices)), key=lambda i: -devices[i].steps)
        rows = [len(d.plan.rows) for d in self.devices]
        users = [d.data.num_users for d in self.devices]
        self.item_offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self.user_offsets = np.concatenate([[0], np.cumsum(users)]).astype(np.int64)
        self.items = {name: torch.from_numpy(np.concatenate(
            [shared[name][d.plan.rows] for d in self.devices]).astype(np.float32)) for name in ITEM_TABLES[self.kind]}
        self.users = {name: torch.from_numpy(np.concatenate(
            [d.user_rows[name] for d in self.devices]).astype(np.float32)) for name in USER_TABLES[self.kind]}
        self.dense = {name: torch.from_numpy(np.stack(
            [np.asarray(shared[name], np.float32)] * len(self.devices))) for name in DENSE[self.kind]}
        adam = config.optimizer == "adam"
        user_lr = config.user_learning_rate or config.learning_rate
        dense_lr = config.dense_learning_rate or config.learning_rate
        shared_eps = config.shared_adam_epsilon
        self.optimizers = {name: _Adam(t, user_lr, 1e-8, adam) for name, t in self.users.items()}
        if train_shared:
            self.optimizers.update({name: _Adam(t, config.learning_rate, shared_eps, adam) for name, t in self.items.items()})
            self.optimizers.update({name: _Adam(t, dense_lr, shared_eps, adam) for name, t in self.dense.items()})
        self.examples = _examples(self.devices, config, self.user_offsets, self.item_offsets)
        self.steps = np.array([d.steps for d in self.devices])
        self.loss_sums = torch.zeros(len(self.devices), dtype=torch.float64)

    def run(self) -> list[DeviceResult]:
        """Every step of every device; results in the order the devices were given."""
        for step in range(int(self.steps.max()) if len(self.steps) else 0):
            self._step(step)
        return self._results()

    def _step(self, step: int) -> None:
        start, stop = self.examples.bounds[step], self.examples.bounds[step + 1]
        active = int(np.sum(self.steps > step))  # a prefix of the batch
        ex = self.examples
        sl = slice(start, stop)
        u_idx, i_idx, t, dev, w = ex.users[sl], ex.items[sl], ex.targets[sl], ex.device[sl], ex.weight[sl]
        grads_u, grads_i, grads_d, loss = self._gradients(u_idx, i_idx, t, dev, w)
        last = ex.last_epoch[sl]
        self.loss_sums.index_add_(0, dev[last], loss[last].double())
        users, items = int(self.user_offsets[active]), int(self.item_offsets[active])
        updates = [(name, users, [(u_idx, grads_u[name])]) for name in self.users]
        if self.train_shared:
            updates += [(name, items, grads_i[name]) for name in self.items]
            updates += [(name, active, [(dev, grads_d[name])]) for name in self.dense]
        for name, rows, parts in updates:
            optimizer = self.optimizers[name]
            optimizer.gradient(rows, parts)
            optimizer.step(rows, step + 1)
            optimizer.clear(parts)

    def _gradients(self, u_idx, i_idx, t, dev, w):  # type: ignore[no-untyped-def]
        """Per-example loss and the gradient of the batch losses' sum with respect to every gathered row."""
        bpr = self.config.loss == "bpr"
        u = self.users["user_embedding.weight"][u_idx]
        v = self.items["item_embedding.weight"][i_idx]
        vj = self.items["item_embedding.weight"][t] if bpr else None
        if self.kind == "gmf":
            h = self.dense["output.weight"][dev, 0]  # [n, dim]
            b = self.dense["output.bias"][dev, 0]
            score = ((u * v) * h).sum(-1) + b if not bpr else (u * (v - vj) * h).sum(-1)
        else:
            bu = self.users["user_bias.weight"][u_idx, 0]
            bi = self.items["item_bias.weight"][i_idx, 0]
            if bpr:
                score = (u * (v - vj)).sum(-1) + bi - self.items["item_bias.weight"][t, 0]
            else:
                score = (u * v).sum(-1) + bu + bi + self.dense["global_bias.weight"][dev, 0, 0]
        loss, g = _loss_and_slope(self.config.loss, score, t)
        g = g * w
        grads_u: dict[str, torch.Tensor] = {}
        grads_i: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        grads_d: dict[str, torch.Tensor] = {}
        gc = g.unsqueeze(-1)
        if self.kind == "gmf":
            grads_u["user_embedding.weight"] = gc * h * (v - vj if bpr else v)
            grads_i["item_embedding.weight"] = [(i_idx, gc * h * u)] + ([(t, -gc * h * u)] if bpr else [])
            grads_d["output.weight"] = (gc * u * (v - vj if bpr else v)).unsqueeze(1)
            grads_d["output.bias"] = (g if not bpr else torch.zeros_like(g)).unsqueeze(-1)
        else:
            grads_u["user_embedding.weight"] = gc * (v - vj if bpr else v)
            grads_u["user_bias.weight"] = gc if not bpr else torch.zeros_like(gc)
            grads_i["item_embedding.weight"] = [(i_idx, gc * u)] + ([(t, -gc * u)] if bpr else [])
            grads_i["item_bias.weight"] = [(i_idx, gc)] + ([(t, -gc)] if bpr else [])
            grads_d["global_bias.weight"] = (g if not bpr else torch.zeros_like(g)).reshape(-1, 1, 1)
        return grads_u, grads_i, grads_d, loss

    def _results(self) -> list[DeviceResult]:
        results: list[DeviceResult | None] = [None] * len(self.devices)
        for position, device in enumerate(self.devices):
            a, b = self.item_offsets[position], self.item_offsets[position + 1]
            ua, ub = self.user_offsets[position], self.user_offsets[position + 1]
            last = device.plan.epochs[-1] if device.plan.epochs else None
            count = len(last) if last is not None else 0
            results[self.order[position]] = DeviceResult(
                item_rows=device.plan.rows,
                items_after={name: t[a:b].numpy().copy() for name, t in self.items.items()},
                dense_after={name: t[position].numpy().copy() for name, t in self.dense.items()},
                user_after={name: t[ua:ub].numpy().copy() for name, t in self.users.items()},
                loss=float(self.loss_sums[position]) / max(count, 1),
            )
        return results  # type: ignore[return-value]


def _loss_and_slope(loss: str, score: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example loss (unweighted) and its derivative with respect to the score."""
    if loss == "bce":
        value = torch.nn.functional.binary_cross_entropy_with_logits(score, target, reduction="none")
        return value, torch.sigmoid(score) - target
    if loss == "mse":
        diff = score - target
        return diff * diff, 2 * diff
    return -torch.nn.functional.logsigmoid(score), torch.sigmoid(score) - 1


def batches(devices: list[DeviceRound], max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Indices of ``devices`` in batches of at most about ``max_rows`` item rows, similar step counts together."""
    order = sorted(range(len(devices)), key=lambda i: -devices[i].steps)
    groups: list[list[int]] = [[]]
    rows = 0
    for index in order:
        size = len(devices[index].plan.rows)
        if groups[-1] and rows + size > max_rows:
            groups.append([])
            rows = 0
        groups[-1].append(index)
        rows += size
    return [g for g in groups if g]
