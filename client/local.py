"""What a device does in one round, free of Flower so it can be tested and profiled alone.

The device holds its users' embeddings (``local_state``) and raw interactions; it receives
the shared parameters, trains both on its own rows, keeps the new user embeddings and
returns only the encoded shared update.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace

import numpy as np
import torch

from client.als_local import user_factors
from client.ease_local import user_vectors
from client.private_training import History, RecordDPConfig, private_local_epochs
from common.evaluation import (
    ListMetrics,
    evaluate_new_items,
    evaluate_ranking,
    exposure_hits,
    list_sums,
    model_scorers,
    scored_once,
)
from common.federation import ClientData
from common.metrics import sums
from common.models import ModelConfig, RecModel, build_model, empty_model
from common.training import (
    Examples,
    PositiveSet,
    TrainConfig,
    build_examples,
    make_optimizer,
    sorted_unique,
    train_epoch,
)
from common.updates import UpdateLayout, clip_deltas, encode_update, positive_counts


@dataclass
class RoundResult:
    """A client's reply: the upload plus what it keeps and what it may report."""

    upload: list[np.ndarray]
    num_examples: int
    local_state: dict[str, np.ndarray]
    metrics: dict[str, float]
    record_history: History | None = None  # record-level DP: the accountant history to keep
    declined: str = ""  # record-level DP: why the device did not train (empty if it did)


def build_local_model(
    model_config: ModelConfig,
    data: ClientData,
    shared: list[np.ndarray],
    local_state: dict[str, np.ndarray] | None,
    seed: int,
    *,
    item_rows: np.ndarray | None = None,
) -> RecModel:
    """The client's model: its own user rows, the server's shared parameters.

    A new user's embedding is initialised on the device with a seed derived from its
    global index, so it is reproducible without the server ever choosing it.

    With ``item_rows`` (sorted item ids) the model holds only those rows of every item
    table, in that order: what a round that trains only those items needs.
    """
    num_items = data.num_items
    if item_rows is not None:
        if not local_state:  # drawn on the full model, so a new user's rows do not depend on item_rows
            local_state = dict(build_model(model_config, data.num_users, data.num_items, seed=seed).local_state())
        num_items = len(item_rows)
    model = empty_model(model_config, data.num_users, num_items) if local_state else None
    if model is None or set(local_state or {}) != set(model.local_parameter_names()):
        model = build_model(model_config, data.num_users, num_items, seed=seed)  # fresh user rows
    names = model.shared_parameter_names()
    if len(shared) != len(names):
        raise ValueError(f"received {len(shared)} shared arrays, the {model_config.name} model has {len(names)}")
    arrays = dict(zip(names, shared, strict=True))
    if item_rows is not None:
        tables = set(model.item_row_parameter_names())
        for name in tables:
            if len(arrays[name]) != data.num_items:
                raise ValueError(
                    f"shape mismatch for {name}: got {arrays[name].shape[0]} item rows, expected {data.num_items}"
                )
        arrays = {name: value[item_rows] if name in tables else value for name, value in arrays.items()}
    model.load_arrays(arrays)
    if local_state:
        model.load_arrays(local_state)
    if model.content_features:
        if data.item_features is None:
            raise ValueError("the hybrid model (item-features) needs the catalogue's item features; this device has none")
        model.set_item_features(data.item_features if item_rows is None else data.item_features[item_rows])
        model.set_user_keys(data.global_users)
    return model


def client_key(data: ClientData) -> int:
    """A stable number for this client (its first user's index) to derive its seeds from."""
    return int(data.global_users[0]) if len(data.global_users) else 0


def user_seed(seed: int, data: ClientData) -> int:
    """Seed for this client's fresh user embeddings."""
    return (seed * 1_000_003 + client_key(data)) % (2**31)


@dataclass
class EpochPlan:
    """A round's training examples, drawn before any step, and the item rows they train."""

    epochs: list[Examples]
    generator: torch.Generator  # shuffles the batches
    touched: np.ndarray  # every item id trained, with repeats
    rows: np.ndarray  # the sorted distinct ids of ``touched``


def plan_epochs(data: ClientData, config: TrainConfig, seed: list[int]) -> EpochPlan:
    """``config.epochs`` passes of examples with fresh negatives per pass.

    The batches are shuffled by ``generator``, not by the numpy stream the negatives come
    from, so drawing every pass up front gives the negatives pass-by-pass drawing would.
    """
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
    positives = PositiveSet(data.train_users, data.train_items, data.num_items)
    epochs = [build_examples(data.train_users, data.train_items, data.train_ratings, positives, config, rng)
              for _ in range(config.epochs)]
    touched = np.concatenate(
        [e.items.numpy() for e in epochs] + ([e.targets.numpy() for e in epochs] if config.loss == "bpr" else [])
    )
    return EpochPlan(epochs, generator, touched, sorted_unique(touched))


def run_epochs(
    model: RecModel,
    plan: EpochPlan,
    config: TrainConfig,
    reference: dict[str, torch.Tensor] | None = None,
    *,
    rows_only: bool = False,
) -> float:
    """Train ``model`` on the plan's passes; returns the last pass's mean loss.

    ``rows_only``: ``model`` holds only the plan's rows (see :func:`build_local_model`).
    """
    epochs = [remap_items(e, plan.rows, config.loss == "bpr") for e in plan.epochs] if rows_only else plan.epochs
    optimizer = make_optimizer(model, config)
    loss = 0.0
    for examples in epochs:
        loss = train_epoch(model, examples, optimizer, config, plan.generator, reference)
    return loss


def local_epochs(
    model: RecModel,
    data: ClientData,
    config: TrainConfig,
    seed: list[int],
    reference: dict[str, torch.Tensor] | None = None,
) -> tuple[float, np.ndarray]:
    """``config.epochs`` passes with fresh negatives; returns the last loss and every item trained."""
    plan = plan_epochs(data, config, seed)
    return run_epochs(model, plan, config, reference), plan.touched


def remap_items(examples: Examples, rows: np.ndarray, targets_are_items: bool) -> Examples:
    """``examples`` with item ids replaced by their positions in the sorted ``rows``."""
    def position(ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.searchsorted(rows, ids.numpy()))

    targets = position(examples.targets) if targets_are_items else examples.targets
    return Examples(examples.users, position(examples.items), targets)


def train_round(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: ClientData,
    shared: list[np.ndarray],
    local_state: dict[str, np.ndarray] | None,
    *,
    seed: int,
    server_round: int,
    rowwise: bool = True,
    clipping_norm: float | None = None,
    record_dp: RecordDPConfig | None = None,
    record_history: History | None = None,
    count_positives: bool = False,
) -> RoundResult:
    """Train locally for ``train_config.epochs`` and encode the shared update.

    ``count_positives`` (popularity = "positives", never under DP): the upload also carries,
    per item, how many of the device's users have a positive on it (the ClientApp divides it
    by the device's aggregation weight, so the server's weighted mean sums to counts).

    With ``clipping_norm`` (user-level DP) the deltas are clipped to that L2 norm and the
    touched vector is all ones, so nothing in the upload depends on the data beyond the
    clipped deltas the server's noise covers.
    """
    started = time.perf_counter()
    round_seed = [seed, server_round, client_key(data)]
    plan = plan_epochs(data, train_config, round_seed) if record_dp is None else None
    # Without weight decay or a proximal term, rows outside the plan get no gradient, so the
    # round trains a model of the plan's rows only: the same result at a cost per step that
    # does not grow with the catalogue (tests/test_client_local.py). Not for hybrid models,
    # whose content dropout hashes item ids (positions in a subset would pick other pairs).
    item_rows = (
        plan.rows if plan is not None and train_config.weight_decay == 0 and train_config.proximal_mu == 0
        and model_config.content_features == 0 and len(plan.rows) < data.num_items else None
    )
    model = build_local_model(model_config, data, shared, local_state, user_seed(seed, data), item_rows=item_rows)
    before = OrderedDict(
        (name, np.asarray(value, dtype=np.float32)) for name, value in zip(model.shared_parameter_names(), shared, strict=True)
    )
    layout = UpdateLayout.from_state(before, model.item_row_parameter_names(), data.num_items, positives=count_positives)
    reference = (
        {name: torch.from_numpy(value.copy()) for name, value in before.items()} if train_config.proximal_mu > 0 else None
    )
    extra: dict[str, float] = {}
    private = None
    if plan is not None:
        # The distinct rows: encode_update and the metric below need no repeats.
        loss, touched = run_epochs(model, plan, train_config, reference, rows_only=item_rows is not None), plan.rows
    else:
        assert record_dp is not None
        private = private_local_epochs(model, data, train_config, record_dp, record_history or [], round_seed,
                                       reference=reference)
        loss, touched = private.loss, np.arange(data.num_items)
        extra = {"record_epsilon": private.epsilon, "record_dp_declined": float(private.declined)}
    # Under either DP the touched vector is all ones: DP-SGD noise moves every item row, and
    # which rows a device trained is exactly what user-level DP must not reveal.
    upload = encode_update(
        layout, before, model.shared_state(), touched,
        rowwise=rowwise and clipping_norm is None and record_dp is None,
        positives=positive_counts(data.train_users, data.train_items, data.num_items) if count_positives else None,
        rows=item_rows,
    )
    if private is not None and private.declined:
        # Nothing was trained: a zero update that moves no row (touched ones only where the
        # user-level mechanism needs a data-independent vector).
        upload = [np.zeros_like(a) for a in upload[:-1]] + [np.full_like(upload[-1], float(clipping_norm is not None))]
    if clipping_norm is not None:
        extra["update_norm_before_clipping"] = clip_deltas(upload, clipping_norm)
    metrics = {
        "train_loss": loss,
        "train_seconds": time.perf_counter() - started,
        "upload_bytes": float(sum(a.nbytes for a in upload)),
        "download_bytes": float(sum(a.nbytes for a in shared)),
        "items_touched": float(len(touched)),
        **extra,
    }
    return RoundResult(
        upload, len(data.train_items), dict(model.local_state()), metrics,
        record_history=private.history if private is not None else None,
        declined=private.reason if private is not None and private.declined else "",
    )


def refit_user_rows(model: RecModel, data: ClientData, config: TrainConfig, *, seed: int) -> float:
    """Fit only the user-local rows to the current shared model (item side frozen).

    The user embedding was last trained against the previous round's item side; after
    the server's update it is slightly stale. A few local steps re-align it, on the full
    scores only (a hybrid's content-alone loss is for training its shared projection).
    """
    config = replace(config, content_loss_weight=0.0)
    local = set(model.local_parameter_names())
    frozen = [p for name, p in model.named_parameters() if name not in local]
    for param in frozen:
        param.requires_grad_(False)
    loss, _ = local_epochs(model, data, config, [seed, 7, client_key(data)])
    for param in frozen:
        param.requires_grad_(True)
    return loss


def evaluate_client(
    model_config: ModelConfig,
    data: ClientData,
    shared: list[np.ndarray],
    local_state: dict[str, np.ndarray] | None,
    *,
    seed: int,
    k: int = 10,
    refit: TrainConfig | None = None,
    exposure_item: int = -1,
    lists: ListMetrics | None = None,
) -> dict[str, float | bytes]:
    """Sums of per-user metrics (test and validation) for the server to average by users.

    With ``lists``, also what the test users' top-k lists look like beyond accuracy
    (:func:`common.evaluation.list_sums`: diversity, the items shown, sums per group).

    With ``exposure_item`` >= 0, also the sums of that item's exposure ratio ER@k
    (``exposure_*``), the measure of item-promotion attacks.

    With ``refit``, the user rows are first re-fitted on the device against the global
    item side it just received (:func:`refit_user_rows`), as a device would before
    showing recommendations; nothing of it is uploaded.
    """
    model = build_local_model(model_config, data, shared, local_state, user_seed(seed, data))
    if model_config.name == "als":  # the user factors are solved in closed form, never kept between messages
        model.load_arrays({"user_embedding.weight": user_factors(shared[0], data)})
    elif model_config.name == "ease":  # the user's row is its own binary training vector x_u
        model.load_arrays({"user_embedding.weight": user_vectors(data)})
    elif refit is not None and refit.epochs > 0:
        refit_user_rows(model, data, refit, seed=seed)
    result: dict[str, float | bytes] = {}
    score_pairs, score_all = model_scorers(model)
    score_all = scored_once(score_all)
    for prefix, part in (("test", data.test), ("val", data.validation)):
        seen = data.seen_items(include_validation=prefix == "test")
        per_user = evaluate_ranking(score_pairs, score_all, part.users, part.items, part.negatives, seen, k=k)
        if per_user:
            result.update({f"{prefix}_{key}": value for key, value in sums(per_user).items()})
        if per_user and prefix == "test" and lists is not None:
            counts = np.bincount(data.train_users, minlength=data.num_users)
            result.update(list_sums(score_all(part.users), part.users, part.items, seen, per_user, counts,
                                    data.user_groups, data.catalogue, lists, k))
    if len(data.new_items.users) and model.content_features:
        per_user = evaluate_new_items(model, data.new_items.users, data.new_items.items, data.new_items.negatives,
                                      data.new_item_features, k)
        result.update({f"new_{key}": value for key, value in sums(per_user).items()})
    if exposure_item >= 0 and len(data.test.users):
        seen = data.seen_items(include_validation=True)
        interacted = [np.union1d(seen[u], data.test.items[data.test.users == u]) for u in range(len(seen))]
        exposure = exposure_hits(score_all, np.unique(data.test.users), interacted, exposure_item, k=k)
        result.update({f"exposure_{key}": value for key, value in exposure.items()})
    return result
