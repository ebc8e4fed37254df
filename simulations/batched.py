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
at any step are a prefix of the batch and their rows a prefix of every table. Within a
device, its item rows are ordered by the step that first trains them: a row not yet
trained has zero gradient and zero Adam moments, so its step is exactly none, and Adam
runs over each device's already-trained rows only (:class:`_FirstTouch`).
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
# A batch of devices holds at most about this many item rows (each a copy per device): 2^17 rows of
# 32 floats keep a step's optimizer state (rows, gradients, two moments) near 64 MB, about 8 % less CPU
# per device than 2^19 at MovieLens-1M shape (process time, 1,500 devices, four runs each, load ~3).
MAX_BATCH_ROWS = 1 << 17
# A batch maps its examples' (device, item) pairs to stacked rows through a table of this many entries
# at most (32 MB); a batch of more devices times items searches the sorted keys instead.
_LOOKUP_ENTRIES = 1 << 22

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
    items_after: dict[str, np.ndarray]  # per item table, the rows ``item_rows`` after training (none if frozen)
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
    """The device optimizer's state for one stacked table: a gradient buffer and Adam's moments.

    The update itself is :func:`_optimizer_step`, one call for every table sharing its
    hyper-parameters. The gradient buffer is kept and zeroed per step, not reallocated.
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

    def views(self, rows: int, sizes: list[int] | None) -> list[list[torch.Tensor]]:
        """Parameters, gradients and moments of the rows to step: the first ``rows`` rows, or of
        those the even-numbered runs of ``sizes`` (the odd ones are rows left out)."""
        tensors = [self.table, self.grad] + ([self.m, self.v] if self.adam else [])  # type: ignore[list-item]
        if sizes is None:
            return [[t[:rows]] for t in tensors]
        return [list(t[:rows].split(sizes)[::2]) for t in tensors]


def _optimizer_step(stepped: list[tuple[_Adam, list[list[torch.Tensor]]]], step: int) -> None:
    """One optimizer step of the given views of each table.

    Adam is torch's own fused CPU kernel (``torch._fused_adam_``, what the device's
    ``Adam(fused=True)`` runs), called once per (learning rate, epsilon) over the views of
    the rows of the devices taking this step; SGD is its plain step.
    """
    groups: dict[tuple[float, float], list[list[torch.Tensor]]] = {}
    for optimizer, views in stepped:
        if not optimizer.adam:
            for param, grad in zip(*views, strict=True):
                param.add_(grad, alpha=-optimizer.lr)
            continue
        group = groups.setdefault((optimizer.lr, optimizer.eps), [[], [], [], []])
        for into, part in zip(group, views, strict=True):
            into.extend(part)
    count = torch.tensor(float(step))
    for (lr, eps), (params, grads, ms, vs) in groups.items():
        torch._fused_adam_(params, grads, ms, vs, [], [count] * len(params), amsgrad=False, lr=lr, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=eps, maximize=False, grad_scale=None, found_inf=None)


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
              item_rows: np.ndarray | None) -> _Examples:
    """Every device's passes in the order its batches are taken, as flat arrays sorted by step.

    ``item_rows``: per device (in order) the sorted item ids of its rows in the stacked item
    tables, concatenated, to map item ids to flat rows; None keeps the item ids (frozen items).
    """
    pieces = [(index, epoch == len(d.orders) - 1, examples, order) for index, d in enumerate(devices)
              for epoch, (examples, order) in enumerate(zip(d.plan.epochs, d.orders, strict=True)) if len(order)]
    if not pieces:
        empty = torch.empty(0, dtype=torch.int64)
        return _Examples(empty, empty, empty.float(), empty, empty.float(), empty.bool(), np.zeros(1, np.int64))
    size, bpr = config.batch_size, config.loss == "bpr"
    lengths = np.array([len(p[3]) for p in pieces], dtype=np.int64)
    owner = np.array([p[0] for p in pieces], dtype=np.int64)
    # Steps of a pass start where the device's previous pass ended.
    passes = -(-lengths // size)
    before = np.cumsum(passes) - passes
    first = np.searchsorted(owner, owner)  # the device's first pass
    step0 = before - before[first]
    rank = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    length = np.repeat(lengths, lengths)
    device = np.repeat(owner, lengths)
    step = np.repeat(step0, lengths) + rank // size
    weight = 1.0 / np.minimum(size, length - (rank // size) * size)

    def gathered(field: str) -> np.ndarray:
        return np.concatenate([getattr(p[2], field).numpy()[p[3]] for p in pieces])

    if item_rows is not None:  # (device, item) keys of the stacked rows, sorted: every example's item is among them
        bound = int(item_rows.max()) + 1
        keys = np.repeat(np.arange(len(devices), dtype=np.int64), _row_counts(devices)) * bound + item_rows
        lookup = None
        if len(devices) * bound <= _LOOKUP_ENTRIES:  # each key's row in one table: 1 ms where a search took 11
            lookup = np.full(len(devices) * bound, -1, np.int64)
            lookup[keys] = np.arange(len(keys))

    def rows(items: np.ndarray) -> np.ndarray:
        if item_rows is None:
            return items.astype(np.int64)
        if lookup is not None:
            return lookup[device * bound + items]
        return np.searchsorted(keys, device * bound + items)

    targets = gathered("targets")
    columns = {"u": gathered("users") + user_offsets[device], "i": rows(gathered("items")),
               "t": rows(targets) if bpr else targets, "d": device, "w": weight,
               "last": np.repeat(np.array([p[1] for p in pieces]), lengths)}
    order = np.argsort(step, kind="stable")  # by step; within a step, devices in batch order
    bounds = np.searchsorted(step[order], np.arange(int(step.max()) + 2))

    def column(key: str, dtype) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return torch.from_numpy(np.ascontiguousarray(columns[key][order]).astype(dtype))

    return _Examples(column("u", np.int64), column("i", np.int64), column("t", np.int64 if bpr else np.float32),
                     column("d", np.int64), column("w", np.float32), column("last", bool), bounds)


def _row_counts(devices: list[DeviceRound]) -> list[int]:
    """Per device, how many item rows its round trains."""
    return [len(d.plan.rows) for d in devices]


class _FirstTouch:
    """Each device's item rows ordered by the step that first trains them, and which rows each step updates.

    A row no example has reached yet in this round has zero gradient and zero Adam moments,
    so the device's step leaves it exactly as it is (SGD too): only the rows already trained
    are stepped. Ordered by first touch, those are a prefix of each device's rows.
    """

    def __init__(self, examples: _Examples, item_offsets: np.ndarray, bpr: bool) -> None:
        total, steps = int(item_offsets[-1]), len(examples.bounds) - 1
        step = np.repeat(np.arange(steps), np.diff(examples.bounds))
        rows = examples.items.numpy()
        if bpr:
            rows, step = np.concatenate([rows, examples.targets.numpy()]), np.concatenate([step, step])
        first = np.full(total, steps, np.int64)
        np.minimum.at(first, rows, step)
        owner = np.repeat(np.arange(len(item_offsets) - 1), np.diff(item_offsets))
        self.order = np.lexsort((first, owner))  # old flat row of each new one (stable: ties by item id)
        self.position = np.empty(total, np.int64)  # new flat row of each old one
        self.position[self.order] = np.arange(total)
        examples.items = torch.from_numpy(self.position[examples.items.numpy()])
        if bpr:
            examples.targets = torch.from_numpy(self.position[examples.targets.numpy()])
        # live[d, s]: how many of device d's rows steps 0..s have trained.
        counts = np.zeros((len(item_offsets) - 1, steps + 1), np.int64)
        np.add.at(counts, (owner, first), 1)
        self.live = np.cumsum(counts, axis=1)[:, :steps]
        self.sizes = np.diff(item_offsets)

    def runs(self, step: int, active: int) -> list[int]:
        """Sizes of alternating runs of rows to step and rows left out, over the first ``active`` devices' rows."""
        live = self.live[:active, step]
        return np.stack([live, self.sizes[:active] - live], axis=1).ravel().tolist()


class BatchTrainer:
    """Trains a batch of devices of one model kind together; see the module docstring.

    With ``train_shared=False`` (the evaluation's re-fit) only the user rows train: the
    item tables are the shared ones, read in place, and the dense layer is not stepped.
    """

    def __init__(self, model_config: ModelConfig, config: TrainConfig, shared: dict[str, np.ndarray],
                 devices: list[DeviceRound], *, train_shared: bool = True) -> None:
        if model_config.name not in BATCHED_MODELS:
            raise ValueError(f"batched training supports {', '.join(BATCHED_MODELS)}, not {model_config.name}")
        self.kind, self.config, self.train_shared = model_config.name, config, train_shared
        self.devices = sorted(devices, key=lambda d: -d.steps)  # stable: ties keep the caller's order
        self.order = sorted(range(len(devices)), key=lambda i: -devices[i].steps)
        users = [d.data.num_users for d in self.devices]
        self.item_offsets = np.concatenate([[0], np.cumsum(_row_counts(self.devices))]).astype(np.int64)
        self.user_offsets = np.concatenate([[0], np.cumsum(users)]).astype(np.int64)
        item_rows = np.concatenate([d.plan.rows for d in self.devices]) if self.devices else np.zeros(0, np.int64)
        self.examples = _examples(self.devices, config, self.user_offsets, item_rows if train_shared else None)
        self.steps = np.array([d.steps for d in self.devices])
        if train_shared:  # each device's own copy of the item rows its round trains, in the order first trained
            self.layout = _FirstTouch(self.examples, self.item_offsets, config.loss == "bpr")
            item_rows = item_rows[self.layout.order]
            rows = torch.from_numpy(item_rows)
            self.items = {name: torch.from_numpy(np.asarray(shared[name], np.float32)).index_select(0, rows)
                          for name in ITEM_TABLES[self.kind]}  # torch's row gather: a third of numpy's time
        else:  # frozen: the shared tables, read in place
            self.items = {name: torch.from_numpy(np.asarray(shared[name], np.float32)) for name in ITEM_TABLES[self.kind]}
        self.users = {name: torch.from_numpy(np.concatenate(
            [d.user_rows[name] for d in self.devices]).astype(np.float32)) for name in USER_TABLES[self.kind]}
        self.dense = {name: torch.from_numpy(np.stack(
            [np.asarray(shared[name], np.float32)] * len(self.devices))) for name in DENSE[self.kind]}
        self.optimizers = self._optimizers()
        # Devices still training at step s: a prefix of the batch, this long.
        self.active = np.searchsorted(-self.steps, -np.arange(int(self.steps.max()) if len(self.steps) else 0),
                                      side="left")
        self.losses = torch.zeros(len(self.examples.users), dtype=torch.float32)

    def _optimizers(self) -> dict[str, _Adam]:
        """Per trained table its optimizer state, with the hyper-parameters of the device's optimizer group."""
        config = self.config
        adam = config.optimizer == "adam"
        user_lr = config.user_learning_rate or config.learning_rate
        dense_lr = config.dense_learning_rate or config.learning_rate
        shared_eps = config.shared_adam_epsilon
        optimizers = {name: _Adam(t, user_lr, 1e-8, adam) for name, t in self.users.items()}
        if self.train_shared:
            optimizers.update({name: _Adam(t, config.learning_rate, shared_eps, adam) for name, t in self.items.items()})
            optimizers.update({name: _Adam(t, dense_lr, shared_eps, adam) for name, t in self.dense.items()})
        return optimizers

    def run(self) -> list[DeviceResult]:
        """Every step of every device; results in the order the devices were given."""
        for step in range(len(self.active)):
            self._step(step)
        return self._results()

    def _step(self, step: int) -> None:
        ex = self.examples
        sl = slice(int(ex.bounds[step]), int(ex.bounds[step + 1]))
        active = int(self.active[step])
        u_idx, dev = ex.users[sl], ex.device[sl]
        gradients, loss = self._gradients(u_idx, ex.items[sl], ex.targets[sl], dev, ex.weight[sl])
        self.losses[sl] = loss
        rows = {**{name: int(self.user_offsets[active]) for name in self.users},
                **{name: int(self.item_offsets[active]) for name in self.items}, **{name: active for name in self.dense}}
        item_runs = self.layout.runs(step, active) if self.train_shared else None
        stepped = []
        for name, parts in gradients.items():
            optimizer = self.optimizers[name]
            optimizer.gradient(rows[name], parts)
            stepped.append((optimizer, optimizer.views(rows[name], item_runs if name in self.items else None)))
        _optimizer_step(stepped, step + 1)
        for name, parts in gradients.items():
            self.optimizers[name].clear(parts)

    def _gradients(self, u_idx, i_idx, t, dev, w):  # type: ignore[no-untyped-def]
        """Per-example loss, and per trained table the gradient of the batch losses' sum: ``(rows, values)`` parts."""
        bpr, shared = self.config.loss == "bpr", self.train_shared
        u = self.users["user_embedding.weight"].index_select(0, u_idx)
        items = self.items["item_embedding.weight"]
        v = items.index_select(0, i_idx)
        vj = items.index_select(0, t) if bpr else None
        other = v - vj if bpr else v  # what the user row multiplies
        if self.kind == "gmf":
            h = self.dense["output.weight"][:, 0].index_select(0, dev)  # [n, dim]
            score = (u * other * h).sum(-1)
            if not bpr:
                score = score + self.dense["output.bias"][:, 0].index_select(0, dev)
        else:
            bias = self.items["item_bias.weight"][:, 0]
            if bpr:
                score = (u * other).sum(-1) + bias.index_select(0, i_idx) - bias.index_select(0, t)
            else:
                score = ((u * other).sum(-1) + self.users["user_bias.weight"][:, 0].index_select(0, u_idx)
                         + bias.index_select(0, i_idx) + self.dense["global_bias.weight"][:, 0, 0].index_select(0, dev))
        loss, g = _loss_and_slope(self.config.loss, score, t)
        g = g * w
        gc = g.unsqueeze(-1)
        out: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if self.kind == "gmf":
            gch = gc * h
            out["user_embedding.weight"] = [(u_idx, gch * other)]
            if shared:
                item = gch * u
                out["item_embedding.weight"] = [(i_idx, item)] + ([(t, -item)] if bpr else [])
                out["output.weight"] = [(dev, gc * u * other)]
                out["output.bias"] = [(dev, g if not bpr else torch.zeros_like(g))]
        else:
            out["user_embedding.weight"] = [(u_idx, gc * other)]
            out["user_bias.weight"] = [(u_idx, gc if not bpr else torch.zeros_like(gc))]
            if shared:
                out["item_embedding.weight"] = [(i_idx, gc * u)] + ([(t, -gc * u)] if bpr else [])
                out["item_bias.weight"] = [(i_idx, gc)] + ([(t, -gc)] if bpr else [])
                out["global_bias.weight"] = [(dev, g if not bpr else torch.zeros_like(g))]
        return out, loss

    def _results(self) -> list[DeviceResult]:
        ex = self.examples
        sums = torch.zeros(len(self.devices), dtype=torch.float64)
        sums.index_add_(0, ex.device[ex.last_epoch], self.losses[ex.last_epoch].double())  # in step order, as trained
        results: list[DeviceResult | None] = [None] * len(self.devices)
        for position, device in enumerate(self.devices):
            a, b = self.item_offsets[position], self.item_offsets[position + 1]
            ua, ub = self.user_offsets[position], self.user_offsets[position + 1]
            last = device.plan.epochs[-1] if device.plan.epochs else None
            count = len(last) if last is not None else 0
            results[self.order[position]] = DeviceResult(
                item_rows=device.plan.rows,
                items_after={name: t.numpy()[self.layout.position[a:b]] for name, t in self.items.items()}
                if self.train_shared else {},
                dense_after={name: t[position].numpy().copy() for name, t in self.dense.items()},
                user_after={name: t[ua:ub].numpy().copy() for name, t in self.users.items()},
                loss=float(sums[position]) / max(count, 1),
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


def planned_size(data: ClientData, config: TrainConfig) -> tuple[int, int]:
    """A device's steps in a round and a bound on its item rows, known before its examples are drawn.

    The example counts per pass follow from its interactions and the loss (negatives are
    drawn, their number is not); its rows are at most its positives' items and every pass's
    negatives, and at most the catalogue. So a round's batches are fixed before any device
    draws its plan, wherever the plans are drawn.
    """
    interactions = len(data.train_items)
    negatives = 0 if config.loss == "mse" else interactions * config.num_negatives  # drawn afresh each pass
    per_pass = {"bce": interactions + negatives, "bpr": negatives}.get(config.loss, interactions)
    steps = config.epochs * math.ceil(per_pass / config.batch_size)
    return steps, min(data.num_items, interactions + config.epochs * negatives)


def batches(steps: list[int], rows: list[int], max_rows: int = MAX_BATCH_ROWS) -> list[list[int]]:
    """Indices of devices in batches of at most about ``max_rows`` item rows, similar step counts together.

    ``steps`` and ``rows``: per device, its steps and (a bound on) its item rows.
    """
    order = sorted(range(len(steps)), key=lambda i: -steps[i])
    groups: list[list[int]] = [[]]
    total = 0
    for index in order:
        size = rows[index]
        if groups[-1] and total + size > max_rows:
            groups.append([])
            total = 0
        groups[-1].append(index)
        total += size
    return [g for g in groups if g]
