"""Typed view of the Flower run-config, validated once before any training starts.

The run-config in ``pyproject.toml`` is the single source of defaults; this module only
checks types and ranges and turns strings like ``"64,32,16"`` into Python values, so
both apps fail fast with one clear line instead of deep inside a round.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from common.evaluation import ListMetrics
from common.models import MODEL_NAMES, ModelConfig
from common.training import LOSSES, OPTIMIZERS, TrainConfig

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
PARTITIONINGS = ("user", "group")
GRAD_SAMPLE_MODES = ("ghost", "hooks")
ACCOUNTANTS = ("rdp", "pld")
CLIENT_SAMPLINGS = ("fixed", "poisson")
AGGREGATIONS = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "bulyan")
TOO_FEW_CLIENTS = ("skip", "retry")
POPULARITY_SOURCES = ("touched", "positives")
MISSING_NODES = ("refuse", "report")
TRANSPORT_DTYPES = ("float32", "float16")
CLIENT_WEIGHTS = ("examples", "uniform")
# Replies a simulated fleet device refuses (client.fleet) start with this; the server counts them by kind.
FLEET_FAILURE_PREFIX = "fleet:"
ROUND_ATTEMPT_KEY = "round-attempt"  # fit config of a retried round: 1, 2, ... (absent on the first attempt)
# ServerApp Context.state ArrayRecord, written by simulations.engine: "node-ids" -> "partition-ids".
SIMULATION_PARTITIONS_KEY = "fedrec.simulation-partitions"


class ConfigError(ValueError):
    """A run-config value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class FedRecConfig:
    """Every run-config key, with the type the apps use."""

    dataset: str
    data_path: str
    synthetic_users: int
    synthetic_items: int
    synthetic_mean_interactions: int
    csv_user_col: str
    csv_item_col: str
    csv_rating_col: str
    csv_timestamp_col: str
    csv_delimiter: str
    implicit_threshold: float
    item_features: bool
    item_features_path: str
    item_features_item_col: str
    item_features_columns: str
    content_dropout: float
    content_learning_rate: float
    content_loss_weight: float
    new_items: float
    seed: int
    eval_negatives: int
    partitioning: str
    users_per_client: int
    model: str
    embedding_dim: int
    mlp_layers: str
    local_epochs: int
    batch_size: int
    learning_rate: float
    user_learning_rate: float
    dense_learning_rate: float
    local_optimizer: str
    shared_adam_epsilon: float
    num_negatives: int
    loss: str
    num_server_rounds: int
    strategy: str
    server_learning_rate: float
    server_learning_rate_decay: float
    server_learning_rate_decay_from: int
    server_eta: float
    proximal_mu: float
    row_wise_aggregation: bool
    client_weight: str
    transport_dtype: str
    aggregation: str
    trim_fraction: float
    num_malicious: int
    multi_krum_keep: int
    norm_bound: float
    max_update_norm: float
    reject_norm_factor: float
    exclude_after_rejections: int
    fraction_train: float
    clients_per_round: int
    seeded_sampling: bool
    min_train_clients: int
    min_available_clients: int
    fraction_evaluate: float
    evaluate_every: int
    final_full_evaluation: bool
    eval_refit_epochs: int
    exposure_item: int
    popular_items: int
    popularity: str
    rerank_diversity: float
    catalogue_metrics: bool
    group_min_users: int
    activity_bands: str
    dropout_probability: float
    straggler_fraction: float
    straggler_slowdown: float
    round_deadline: float
    late_join_fraction: float
    leave_fraction: float
    local_epochs_min: int
    too_few_clients: str
    round_retries: int
    missing_nodes: str
    node_wait_seconds: float
    run_dir: str
    checkpoint_every: int
    secure_aggregation: bool
    secagg_num_shares: int
    secagg_reconstruction_threshold: int
    secagg_clipping_range: float
    secagg_quantization_range: int
    secagg_max_weight: float
    record_dp: bool
    record_dp_noise_multiplier: float
    record_dp_max_grad_norm: float
    record_dp_target_epsilon: float
    record_dp_delta: float
    record_dp_epsilon_budget: float
    record_dp_grad_sample_mode: str
    user_dp: bool
    user_dp_noise_multiplier: float
    user_dp_clipping_norm: float
    user_dp_delta: float
    user_dp_epsilon_budget: float
    user_dp_accountant: str
    client_sampling: str
    report: bool
    resume: bool

    @property
    def model_config(self) -> ModelConfig:
        """The architecture; a hybrid model's width of content features is the catalogue's."""
        width = 0
        if self.item_features:
            from common.federation import prepare_cached  # the catalogue decides it; loaded once per process

            width = prepare_cached(self).item_features.shape[1]
        return ModelConfig(name=self.model, embedding_dim=self.embedding_dim, mlp_layers=parse_layers(self.mlp_layers),
                           content_features=width, content_dropout=self.content_dropout if width else 0.0)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.local_epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            user_learning_rate=self.user_learning_rate,
            dense_learning_rate=self.dense_learning_rate,
            content_learning_rate=self.content_learning_rate,
            content_loss_weight=self.content_loss_weight,  # > 0 only with item-features (validated)
            num_negatives=self.num_negatives,
            loss=self.loss,
            optimizer=self.local_optimizer,
            shared_adam_epsilon=self.shared_adam_epsilon,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
        )

    def server_step(self, server_round: int) -> float:
        """FedAvg/FedProx's server learning rate in a round: constant, then decaying geometrically.

        A constant step keeps the item table moving with the noise of each round's sample of
        clients (every constant-step setting drifted after about 100 rounds on MovieLens-100K);
        shrinking it late averages that noise out.
        """
        late = max(0, server_round - self.server_learning_rate_decay_from) if self.server_learning_rate_decay_from else 0
        return self.server_learning_rate * self.server_learning_rate_decay**late

    @property
    def list_metrics(self) -> ListMetrics:
        """What devices measure beyond accuracy on the lists they would show."""
        return ListMetrics(
            rerank_diversity=self.rerank_diversity,
            catalogue_metrics=self.catalogue_metrics,
            groups=self.group_min_users > 0,
            activity_bands=parse_bands(self.activity_bands),
        )

    @property
    def refit_config(self) -> TrainConfig | None:
        """Local training of the user rows alone before evaluation (None: evaluate as kept)."""
        if self.eval_refit_epochs == 0:
            return None
        return replace(self.train_config, epochs=self.eval_refit_epochs, proximal_mu=0.0)


def parse_layers(text: str) -> tuple[int, ...]:
    """``"64,32,16"`` -> ``(64, 32, 16)``."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"mlp-layers must be comma-separated integers like '64,32,16', got {text!r}") from None


def parse_bands(text: str) -> tuple[int, ...]:
    """``"50,150"`` -> (50, 150): upper bounds of the activity groups (training interactions per user)."""
    try:
        bands = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        bands = ()
    if not bands or any(b < 1 for b in bands) or list(bands) != sorted(set(bands)):
        raise ConfigError(f"activity-bands must be increasing positive integers like '50,150', got {text!r}")
    return bands


_CHOICES = {
    "model": MODEL_NAMES,
    "loss": LOSSES,
    "local_optimizer": OPTIMIZERS,
    "strategy": STRATEGIES,
    "partitioning": PARTITIONINGS,
    "record_dp_grad_sample_mode": GRAD_SAMPLE_MODES,
    "user_dp_accountant": ACCOUNTANTS,
    "client_sampling": CLIENT_SAMPLINGS,
    "aggregation": AGGREGATIONS,
    "too_few_clients": TOO_FEW_CLIENTS,
    "missing_nodes": MISSING_NODES,
    "popularity": POPULARITY_SOURCES,
    "transport_dtype": TRANSPORT_DTYPES,
    "client_weight": CLIENT_WEIGHTS,
}
_POSITIVE = {
    "synthetic_users", "synthetic_items", "synthetic_mean_interactions", "users_per_client", "embedding_dim",
    "local_epochs", "batch_size", "num_server_rounds", "evaluate_every", "checkpoint_every", "eval_negatives",
    "learning_rate", "server_learning_rate", "server_eta", "min_train_clients", "min_available_clients",
    "secagg_num_shares", "secagg_reconstruction_threshold", "secagg_clipping_range", "secagg_quantization_range",
    "secagg_max_weight", "record_dp_max_grad_norm", "record_dp_delta", "user_dp_clipping_norm", "shared_adam_epsilon",
    "straggler_slowdown",
}
_NON_NEGATIVE = {
    "eval_refit_epochs", "popular_items", "user_learning_rate", "dense_learning_rate", "content_learning_rate", "content_loss_weight", "group_min_users", "num_negatives", "clients_per_round", "proximal_mu",
    "implicit_threshold", "server_learning_rate_decay_from",
    "num_malicious", "multi_krum_keep", "norm_bound", "max_update_norm", "reject_norm_factor", "exclude_after_rejections",
    "record_dp_noise_multiplier", "record_dp_target_epsilon", "record_dp_epsilon_budget",
    "user_dp_noise_multiplier", "user_dp_delta", "user_dp_epsilon_budget",
    "round_deadline", "local_epochs_min", "round_retries", "node_wait_seconds",
}
_PROBABILITIES = {"dropout_probability", "straggler_fraction", "late_join_fraction", "leave_fraction", "rerank_diversity"}
_FRACTIONS = {"fraction_train", "fraction_evaluate", "server_learning_rate_decay"}


def parse_run_config(run_config: Mapping[str, Any]) -> FedRecConfig:
    """Validate a Flower run-config (keys with dashes) into a :class:`FedRecConfig`.

    A device parses the same run-config in every mod and for every message; the result of
    a valid one is kept (a frozen dataclass, so sharing it is safe).
    """
    try:  # the type is part of the key: 1, 1.0 and True are equal as dict keys but not as config values
        key = tuple(sorted((name, type(value), value) for name, value in run_config.items()))
        hash(key)
    except TypeError:  # an unhashable value: nothing to cache by, and _coerce will refuse it
        return _parse_run_config(run_config)
    return _parse_cached(key)


@functools.lru_cache(maxsize=16)
def _parse_cached(items: tuple[tuple[str, type, Any], ...]) -> FedRecConfig:
    return _parse_run_config({name: value for name, _, value in items})


def _parse_run_config(run_config: Mapping[str, Any]) -> FedRecConfig:
    values: dict[str, Any] = {}
    for spec in fields(FedRecConfig):
        key = spec.name.replace("_", "-")
        if key not in run_config:
            raise ConfigError(f"run-config is missing '{key}' (see [tool.flwr.app.config] in pyproject.toml)")
        values[spec.name] = _coerce(key, run_config[key], spec.type)
    for name, choices in _CHOICES.items():
        if values[name] not in choices:
            raise ConfigError(f"{name.replace('_', '-')} must be one of {', '.join(choices)}; got {values[name]!r}")
    for name in _POSITIVE:
        if values[name] <= 0:
            raise ConfigError(f"{name.replace('_', '-')} must be > 0; got {values[name]!r}")
    for name in _NON_NEGATIVE:
        if values[name] < 0:
            raise ConfigError(f"{name.replace('_', '-')} must be >= 0; got {values[name]!r}")
    for name in _FRACTIONS:
        if not 0.0 < values[name] <= 1.0:
            raise ConfigError(f"{name.replace('_', '-')} must be in (0, 1]; got {values[name]!r}")
    for name in _PROBABILITIES:
        if not 0.0 <= values[name] <= 1.0:
            raise ConfigError(f"{name.replace('_', '-')} must be in [0, 1]; got {values[name]!r}")
    if values["local_epochs_min"] > values["local_epochs"]:
        raise ConfigError(
            f"local-epochs-min ({values['local_epochs_min']}) must not exceed local-epochs ({values['local_epochs']})"
        )
    if values["loss"] == "bpr" and values["num_negatives"] < 1:
        raise ConfigError("loss 'bpr' needs num-negatives >= 1")
    parse_layers(values["mlp_layers"])
    if values["secagg_reconstruction_threshold"] > values["secagg_num_shares"]:
        raise ConfigError(
            f"secagg-reconstruction-threshold ({values['secagg_reconstruction_threshold']}) must not exceed "
            f"secagg-num-shares ({values['secagg_num_shares']})"
        )
    if values["secure_aggregation"] and values["secagg_num_shares"] < 3:
        raise ConfigError("secure-aggregation needs secagg-num-shares >= 3 (SecAgg+ shares each secret among neighbours)")
    for name in ("record_dp_delta", "user_dp_delta"):
        if values[name] >= 1.0:
            raise ConfigError(f"{name.replace('_', '-')} must be < 1; got {values[name]!r}")
    if values["user_dp"]:
        if values["user_dp_noise_multiplier"] <= 0:
            raise ConfigError("user-dp needs user-dp-noise-multiplier > 0 (no noise, no guarantee)")
        if values["user_dp_accountant"] == "pld" and values["client_sampling"] != "poisson":
            raise ConfigError(
                "user-dp-accountant 'pld' accounts for Poisson sampling only; set client-sampling = 'poisson' "
                "or use the 'rdp' accountant, which also covers fixed-size sampling without replacement"
            )
    if values["transport_dtype"] != "float32" and (values["secure_aggregation"] or values["user_dp"]):
        raise ConfigError(
            f"transport-dtype {values['transport_dtype']!r} is for plain uploads: SecAgg+ quantizes uploads itself, "
            "and user-dp's clipping bound must hold exactly for what is sent; use transport-dtype = 'float32'"
        )
    parse_bands(values["activity_bands"])
    if not 0.0 <= values["content_dropout"] < 1.0:
        raise ConfigError(f"content-dropout must be in [0, 1); got {values['content_dropout']!r}")
    if values["content_loss_weight"] > 0 and not values["item_features"]:
        raise ConfigError("content-loss-weight trains a hybrid model's content projection: set item-features = true")
    if values["content_loss_weight"] > 0 and values["record_dp"]:
        raise ConfigError(
            "content-loss-weight is not supported with record-dp (Opacus clips one loss per example); "
            "use content-dropout for a private hybrid model"
        )
    if not 0.0 <= values["new_items"] < 0.5:
        raise ConfigError(f"new-items must be in [0, 0.5) (the share of items held out as new); got {values['new_items']!r}")
    if values["item_features"] and values["dataset"] in ("csv", "parquet") and not values["item_features_path"]:
        raise ConfigError(f"item-features with dataset {values['dataset']!r} needs item-features-path (a CSV of item features)")
    if values["exposure_item"] < -1:
        raise ConfigError(f"exposure-item must be an item id >= 0, or -1 for none; got {values['exposure_item']!r}")
    if not 0.0 <= values["trim_fraction"] < 0.5:
        raise ConfigError(f"trim-fraction must be in [0, 0.5); got {values['trim_fraction']!r}")
    robust = values["aggregation"] != "mean" or values["norm_bound"] > 0
    if robust and values["secure_aggregation"]:
        raise ConfigError(
            f"aggregation '{values['aggregation']}' / norm-bound need every client's update, but SecAgg+ only "
            "reveals their sum; use aggregation = 'mean' and norm-bound = 0 with secure-aggregation"
        )
    if values["aggregation"] != "mean" and values["user_dp"]:
        raise ConfigError(
            f"aggregation '{values['aggregation']}' has a different sensitivity than the clipped sum that "
            "user-dp's accountant assumes; use aggregation = 'mean' with user-dp"
        )
    if values["popularity"] == "positives" and (values["user_dp"] or values["record_dp"]):
        raise ConfigError(
            "popularity 'positives' is not available under user-dp or record-dp: per-item counts of users would need "
            "their own noise and a share of the privacy budget, which fedrec does not account; under DP no popular "
            "list is published"
        )
    if values["record_dp"] and values["record_dp_noise_multiplier"] <= 0 and values["record_dp_target_epsilon"] <= 0:
        raise ConfigError("record-dp needs record-dp-noise-multiplier > 0 or record-dp-target-epsilon > 0")
    return FedRecConfig(**values)


def check_against_data(config: FedRecConfig, num_items: int) -> None:
    """The checks that need the loaded dataset (run before the first round)."""
    if config.exposure_item >= num_items:
        raise ConfigError(f"exposure-item {config.exposure_item} is not an item of this dataset (0..{num_items - 1})")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    expected = {"int": int, "float": float, "bool": bool, "str": str}[str(annotation)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"run-config '{key}' must be {expected.__name__}; got {value!r} ({type(value).__name__})")
    return value
