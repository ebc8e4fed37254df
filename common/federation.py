"""From a run-config to what each client holds: its users' training rows and eval items.

In simulation every virtual SuperNode derives its own slice from the same seeded
dataset, split and evaluation negatives, so a federated figure is measured on exactly
the split (and the same 99 negatives per user) as the centralized baseline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from common.config import ConfigError, FedRecConfig
from common.datasets import load_dataset
from common.errors import DataError
from common.interactions import Interactions
from common.item_features import ItemFeatures, catalogue
from common.loaders import find_movielens_file
from common.negatives import sample_negatives
from common.partition import ClientPartition, fixed_size_groups, index_rows_by_user, one_user_per_client
from common.splits import Split, hold_out_items, leave_one_out, random_leave_one_out
from common.user_groups import movielens_user_groups


@dataclass(frozen=True)
class EvalData:
    """Leave-one-out evaluation: one held-out item per user plus sampled negatives."""

    users: np.ndarray  # users with a held-out item
    items: np.ndarray  # their held-out item
    negatives: np.ndarray  # [len(users), n] sampled items the user never interacted with


def _no_eval() -> EvalData:
    return EvalData(np.empty(0, np.int64), np.empty(0, np.int64), np.empty((0, 0), np.int64))


@dataclass(frozen=True)
class PreparedData:
    """The full dataset, its split and evaluation negatives (identical for every run with the same seed).

    With ``new-items``, ``data`` holds only the known items (re-indexed) and ``new_items``
    evaluates each user's latest interaction with a held-out item against negatives drawn
    from the other held-out items (indices into ``new_item_features``).
    """

    data: Interactions
    split: Split
    test: EvalData
    validation: EvalData
    item_features: np.ndarray | None = None  # [num_items, F] content features of the known items (hybrid models)
    feature_names: tuple[str, ...] = ()
    new_items: EvalData = field(default_factory=_no_eval)  # global users
    new_item_features: np.ndarray | None = None  # [held-out items, F]
    catalogue: np.ndarray | None = None  # the item features whether or not the model reads them (diversity)
    user_groups: dict[str, np.ndarray] = field(default_factory=dict)  # dimension -> label per user (private)
    split_kind: str = "time"  # "time" or "random": how each user's held-out items were chosen

    @property
    def num_users(self) -> int:
        return self.data.num_users

    @property
    def num_items(self) -> int:
        return self.data.num_items


@dataclass(frozen=True)
class ClientData:
    """One client's private data, with users re-indexed 0..n-1 for its local embedding table."""

    global_users: np.ndarray  # global index of local user j
    train_users: np.ndarray  # local user index per training row
    train_items: np.ndarray
    train_ratings: np.ndarray
    test: EvalData  # users are local indices
    validation: EvalData
    num_items: int
    new_items: EvalData = field(default_factory=_no_eval)  # held-out new items (see PreparedData)
    item_features: np.ndarray | None = None  # public catalogue, shared by every client (not copied)
    new_item_features: np.ndarray | None = None
    catalogue: np.ndarray | None = None  # item features for diversity metrics (also when the model is pure CF)
    user_groups: dict[str, np.ndarray] = field(default_factory=dict)  # dimension -> label per local user

    @property
    def num_users(self) -> int:
        return len(self.global_users)

    def seen_items(self, *, include_validation: bool = False) -> list[np.ndarray]:
        """Items excluded from full ranking per local user (see :func:`seen_items`)."""
        return seen_items(self.train_users, self.train_items, self.num_users, self.validation if include_validation else None)


def seen_items(users: np.ndarray, items: np.ndarray, num_users: int, also: EvalData | None = None) -> list[np.ndarray]:
    """Sorted items each user interacted with, to exclude from full ranking.

    The test ranking also excludes the validation item (a known interaction, not a
    candidate); the validation ranking excludes training items only.
    """
    if also is not None and len(also.users):
        users, items = np.concatenate([users, also.users]), np.concatenate([items, also.items])
    order = np.argsort(users, kind="stable")
    bounds = np.searchsorted(users[order], np.arange(num_users + 1))
    sorted_items = items[order]
    return [np.unique(sorted_items[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _eval_data(part: Interactions, known, num_negatives: int, seed: int) -> EvalData:
    users, items = part.users, part.items
    try:
        negatives = sample_negatives(known, users, num_negatives, seed=seed)
    except ValueError as err:
        raise ConfigError(f"eval-negatives={num_negatives} is too many for this dataset: {err}") from None
    return EvalData(users=users, items=items, negatives=negatives)


def has_timestamps(config: FedRecConfig) -> bool:
    """Whether the dataset records when each interaction happened (else row order stands in)."""
    if config.dataset in ("csv", "parquet"):
        return bool(config.csv_timestamp_col)
    return True  # MovieLens ratings files and the synthetic generator carry timestamps


def split_kind(config: FedRecConfig) -> str:
    """The ``split`` run-config resolved: "time" or "random"."""
    if config.split != "auto":
        return config.split
    return "time" if has_timestamps(config) else "random"


def describe_split(kind: str, config: FedRecConfig) -> str:
    """How held-out items were chosen, for the console and reports."""
    if kind == "random":
        return f"leave-one-out split: a random interaction per user (seed {config.seed})"
    if has_timestamps(config):
        return "leave-one-out split: each user's latest interaction"
    return "leave-one-out split: each user's last row in the file (no timestamp column)"


def prepare(config: FedRecConfig) -> PreparedData:
    """Load, split (leave-one-out, see ``split``) and sample evaluation negatives."""
    options: dict = {}
    if config.dataset == "synthetic":
        options["mean_interactions"] = config.synthetic_mean_interactions
    elif config.dataset in ("csv", "parquet"):
        options.update(
            user_col=config.csv_user_col,
            item_col=config.csv_item_col,
            rating_col=config.csv_rating_col or None,
            timestamp_col=config.csv_timestamp_col or None,
        )
        if config.dataset == "csv":
            options["delimiter"] = config.csv_delimiter
    data = load_dataset(
        config.dataset,
        path=config.data_path or None,
        seed=config.seed,
        num_users=config.synthetic_users,
        num_items=config.synthetic_items,
        implicit_threshold=config.implicit_threshold or None,
        **options,
    )
    catalogue = item_features(config, data) if config.item_features else optional_item_features(config, data)
    groups = user_groups(config, data)
    new_items, new_features = _no_eval(), None
    if config.new_items > 0:
        held_out = hold_out_items(data, config.new_items, seed=config.seed)
        data = held_out.known
        if catalogue is not None:  # a pure collaborative model has nothing to rank new items by
            new_features = catalogue.values[held_out.new_items]
            catalogue = ItemFeatures(catalogue.values[held_out.known_items], catalogue.names, catalogue.undescribed)
    kind = split_kind(config)
    split = leave_one_out(data) if kind == "time" else random_leave_one_out(data, seed=config.seed)
    known = data.to_csr()
    if config.new_items > 0:
        new_items = _new_item_eval(held_out.new, split.train, config.eval_negatives, config.seed + 2)
    return PreparedData(
        data=data,
        split=split,
        test=_eval_data(split.test, known, config.eval_negatives, config.seed),
        validation=_eval_data(split.validation, known, config.eval_negatives, config.seed + 1),
        item_features=None if catalogue is None or not config.item_features else catalogue.values,
        feature_names=() if catalogue is None else catalogue.names,
        new_items=new_items,
        new_item_features=new_features if config.item_features else None,
        catalogue=None if catalogue is None else catalogue.values,
        user_groups=groups,
        split_kind=kind,
    )


def optional_item_features(config: FedRecConfig, data: Interactions) -> ItemFeatures | None:
    """The catalogue when the dataset has one, for diversity metrics; None (and a warning) when it has none."""
    try:
        return item_features(config, data)
    except DataError as err:
        logging.getLogger(__name__).warning("fedrec: no intra-list diversity in this run: %s", err)
        return None


def user_groups(config: FedRecConfig, data: Interactions) -> dict[str, np.ndarray]:
    """Demographic groups from the dataset's user file (MovieLens), aligned with its users."""
    if config.dataset.startswith("movielens") and config.data_path:
        return movielens_user_groups(find_movielens_file(config.data_path), data.user_ids)
    return {}


def item_features(config: FedRecConfig, data: Interactions) -> ItemFeatures:
    """The catalogue's content features, rows aligned with ``data``'s items."""
    return catalogue(config, data.item_ids)


def _new_item_eval(new: Interactions, train: Interactions, num_negatives: int, seed: int) -> EvalData:
    """Each user's latest interaction with a held-out item, against other held-out items.

    Only users with training interactions are evaluated (the others have no taste to
    rank by), and only those who left at least ``num_negatives`` held-out items untouched.
    """
    if new.num_items <= num_negatives:
        raise ConfigError(
            f"new-items holds out {new.num_items} items, too few to rank one against eval-negatives={num_negatives} "
            "others; raise new-items or lower eval-negatives"
        )
    order = np.lexsort((new.timestamps, new.users))
    last = np.ones(len(order), bool)
    last[:-1] = new.users[order][1:] != new.users[order][:-1]
    latest = order[last]
    users, items = new.users[latest], new.items[latest]
    seen = new.to_csr()
    room = new.num_items - np.diff(seen.indptr)[users]
    keep = (train.user_counts()[users] > 0) & (room >= num_negatives)
    users, items = users[keep], items[keep]
    return EvalData(users=users, items=items, negatives=sample_negatives(seen, users, num_negatives, seed=seed))


@lru_cache(maxsize=2)
def prepare_cached(config: FedRecConfig) -> PreparedData:
    """Per-process cache: a simulation worker prepares the data once, not once per round."""
    return prepare(config)


def partitions(config: FedRecConfig, num_users: int) -> list[ClientPartition]:
    """Phones (one user each) or kiosks (groups of ``users-per-client`` users)."""
    if config.partitioning == "user":
        return one_user_per_client(num_users)
    return fixed_size_groups(num_users, config.users_per_client, seed=config.seed)


class ClientSlicer:
    """Cuts :class:`PreparedData` into per-client :class:`ClientData` in O(client rows)."""

    def __init__(self, prepared: PreparedData, parts: list[ClientPartition]) -> None:
        self.prepared = prepared
        self.parts = parts
        self._train_index = index_rows_by_user(prepared.split.train)
        self._test_pos = {int(u): i for i, u in enumerate(prepared.test.users)}
        self._val_pos = {int(u): i for i, u in enumerate(prepared.validation.users)}
        self._new_pos = {int(u): i for i, u in enumerate(prepared.new_items.users)}

    def __len__(self) -> int:
        return len(self.parts)

    def client(self, partition_id: int) -> ClientData:
        if not 0 <= partition_id < len(self.parts):
            raise ValueError(f"partition-id {partition_id} out of range: this dataset has {len(self.parts)} clients")
        users = self.parts[partition_id].users
        order, offsets = self._train_index
        rows = np.concatenate([order[offsets[u] : offsets[u + 1]] for u in users]) if len(users) else np.empty(0, np.int64)
        train = self.prepared.split.train
        local_of = np.full(self.prepared.num_users, -1, dtype=np.int64)
        local_of[users] = np.arange(len(users))
        return ClientData(
            global_users=users,
            train_users=local_of[train.users[rows]],
            train_items=train.items[rows],
            train_ratings=train.ratings[rows],
            test=self._pick(self.prepared.test, self._test_pos, users, local_of),
            validation=self._pick(self.prepared.validation, self._val_pos, users, local_of),
            num_items=self.prepared.num_items,
            new_items=self._pick(self.prepared.new_items, self._new_pos, users, local_of),
            item_features=self.prepared.item_features,
            new_item_features=self.prepared.new_item_features,
            catalogue=self.prepared.catalogue,
            user_groups={name: labels[users] for name, labels in self.prepared.user_groups.items()},
        )

    @staticmethod
    def _pick(eval_data: EvalData, position: dict[int, int], users: np.ndarray, local_of: np.ndarray) -> EvalData:
        idx = np.array([position[int(u)] for u in users if int(u) in position], dtype=np.int64)
        return EvalData(users=local_of[eval_data.users[idx]], items=eval_data.items[idx], negatives=eval_data.negatives[idx])


@lru_cache(maxsize=2)
def slicer_cached(config: FedRecConfig) -> ClientSlicer:
    """Per-process cache of the slicer (data, split, negatives and row index)."""
    prepared = prepare_cached(config)
    return ClientSlicer(prepared, partitions(config, prepared.num_users))


def catalogue_features(config: FedRecConfig) -> np.ndarray | None:
    """The item features a hybrid model reads (None for a pure collaborative model)."""
    return prepare_cached(config).item_features if config.item_features else None
