"""Typed view of the Flower run-config: every key defined once, validated once before any training starts.

:class:`FedRecConfig` defines each key (type, default, allowed values, help; see
:mod:`common.config_keys`), so the defaults ship with the code: ``fedrec`` runs from an
installed wheel, and ``pyproject.toml``'s ``[tool.flwr.app.config]`` (what ``flwr run``
reads) repeats them, kept identical by a test. Parsing checks types and ranges and turns
strings like ``"64,32,16"`` into Python values, so both apps fail fast with one clear line
instead of deep inside a round.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping

from common.config_keys import FRACTION, NON_NEGATIVE, POSITIVE, PROBABILITY, ConfigError, Range, fuse, key, keys_of
from common.datasets import DATASET_NAMES
from common.evaluation import ListMetrics
from common.models import MODEL_NAMES, ModelConfig
from common.training import LOSSES, OPTIMIZERS, TrainConfig

__all__ = ["ConfigError", "FedRecConfig", "RUN_CONFIG_KEYS", "default_run_config", "fused_run_config",
           "parse_run_config"]

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
BACKENDS = ("flower", "vectorized")  # fedrec simulate: how the devices run (simulations.vectorized)
# Which interaction of a user is held out: "time" the latest, "random" a seeded random one,
# "auto" by time when the data has timestamps (MovieLens, synthetic, csv-timestamp-col), else random.
SPLITS = ("auto", "time", "random")
# Replies a simulated fleet device refuses (client.fleet) start with this; the server counts them by kind.
FLEET_FAILURE_PREFIX = "fleet:"
ROUND_ATTEMPT_KEY = "round-attempt"  # fit config of a retried round: 1, 2, ... (absent on the first attempt)
# ServerApp Context.state ArrayRecord, written by simulations.engine: "node-ids" -> "partition-ids".
SIMULATION_PARTITIONS_KEY = "fedrec.simulation-partitions"


@dataclass(frozen=True)
class FedRecConfig:
    """Every run-config key: its type (the annotation), default, allowed values and help (:func:`key`).

    This class is the one definition of the keys; ``FedRecConfig()`` is the default run-config,
    ``pyproject.toml``'s ``[tool.flwr.app.config]`` repeats the defaults (a test keeps them
    identical) and ``docs/configuration.md`` is generated from it (``python -m common.config_keys``).
    """

    dataset: str = key("synthetic", "The data: the embedded synthetic generator, a MovieLens release you downloaded, "
                       "or any CSV/Parquet file with the column options below.", choices=DATASET_NAMES,
                       section="Data")
    data_path: str = key("", "File or folder of a downloaded dataset (MovieLens folder or ratings file, CSV, Parquet).")
    synthetic_users: int = key(200, "Synthetic data: number of users.", range=POSITIVE)
    synthetic_items: int = key(400, "Synthetic data: number of items.", range=POSITIVE)
    synthetic_mean_interactions: int = key(30, "Synthetic data: mean interactions per user.", range=POSITIVE)
    csv_user_col: str = key("user", "CSV/Parquet: the column of raw user ids.")
    csv_item_col: str = key("item", "CSV/Parquet: the column of raw item ids.")
    csv_rating_col: str = key("", "CSV/Parquet: the rating column (\"\": every row is a positive).")
    csv_timestamp_col: str = key("", "CSV/Parquet: the timestamp column used for the leave-one-out split "
                                 "(\"\": file order).")
    csv_delimiter: str = key(",", "CSV: the field delimiter.")
    implicit_threshold: float = key(0.0, "A rating >= this is a positive; 0 keeps every rating.", range=NON_NEGATIVE)
    item_features: bool = key(False, "true: hybrid model, item embedding plus a projection of the item's content "
                              "features (public catalogue data).", section="Item content")
    item_features_path: str = key("", "A CSV of item features; \"\": the dataset's own (MovieLens u.item / movies.dat, "
                                  "synthetic tags).")
    item_features_item_col: str = key("item", "item-features-path: the column of raw item ids.")
    item_features_columns: str = key("", "item-features-path: feature columns, comma-separated (\"\": every other column).")
    content_dropout: float = key(0.2, "Hybrid training: share of (user, item) pairs scored from content alone "
                                 "(new items have only that).", range=Range(0, 1, high_open=True))
    content_learning_rate: float = key(0.0, "Hybrid: device learning rate of the content projection "
                                       "(0: learning-rate).", range=NON_NEGATIVE)
    content_loss_weight: float = key(0.0, "Hybrid: weight of an extra loss on the same pairs scored from content alone "
                                     "(0: none; needs item-features, not with record-dp).", range=NON_NEGATIVE)
    new_items: float = key(0.0, "> 0: this share of items is held out of training entirely and evaluated as new items.",
                           range=Range(0, 0.5, high_open=True))
    seed: int = key(42, "Seed of the data, the split, the evaluation negatives, the models and the sampling.",
                    section="Evaluation and partitioning")
    eval_negatives: int = key(99, "Sampled negatives each held-out item is ranked against (HR@10, NDCG@10).",
                              range=POSITIVE)
    split: str = key("auto", "Held-out item per user: time (the latest), random (seeded by seed), auto (time when the "
                     "data has timestamps: MovieLens, synthetic, csv-timestamp-col; else random).", choices=SPLITS)
    partitioning: str = key("user", "user: a phone per user; group: a kiosk serving users-per-client users.",
                            choices=PARTITIONINGS)
    users_per_client: int = key(10, "partitioning = group: users per kiosk.", range=POSITIVE)
    model: str = key("gmf", "The recommender: matrix factorization or NCF (GMF, MLP tower, NeuMF), federated ALS, or "
                     "federated EASE (closed form from the summed item-item Gram).",
                     choices=MODEL_NAMES, section="Model")
    embedding_dim: int = key(32, "Size of the user and item embeddings.", range=POSITIVE)
    mlp_layers: str = key("64,32,16", "MLP / NeuMF tower widths, comma-separated.")
    als_max_items: int = key(100, "model = als with user-dp: a device's statistics cover at most this many of its "
                             "items, drawn on the device (0: all; a bound of the contribution, see docs).",
                             range=NON_NEGATIVE)
    ease_lambda: float = key(500.0, "model = ease: L2 weight added to the Gram's diagonal (500: the centralized "
                             "yardstick's, chosen on MovieLens-100K's validation split).", range=POSITIVE)
    local_epochs: int = key(2, "Epochs each device trains per round.", range=POSITIVE,
                            section="Local training on each device")
    batch_size: int = key(32, "Device mini-batch size.", range=POSITIVE)
    learning_rate: float = key(0.02, "Device learning rate of the shared (item-side) parameters.", range=POSITIVE)
    user_learning_rate: float = key(0.0, "Device learning rate of the user-local rows (0: learning-rate).",
                                    range=NON_NEGATIVE)
    dense_learning_rate: float = key(0.0, "Device learning rate of the dense shared layers (NCF output and MLP tower, "
                                     "MF global bias; 0: learning-rate).", range=NON_NEGATIVE)
    local_optimizer: str = key("adam", "Device optimizer.", choices=OPTIMIZERS)
    shared_adam_epsilon: float = key(1e-8, "Adam epsilon of the shared (item-side) parameters on the device.",
                                     range=POSITIVE)
    num_negatives: int = key(4, "Sampled negatives per positive in device training.", range=NON_NEGATIVE)
    loss: str = key("bce", "Training loss: bce, bpr (implicit; bpr needs num-negatives >= 1) or mse (explicit "
                    "ratings).", choices=LOSSES)
    num_server_rounds: int = key(15, "Federated rounds.", range=POSITIVE, section="Server: rounds, sampling, aggregation")
    strategy: str = key("fedavg", "Flower's server rule applied to the decoded mean update.", choices=STRATEGIES)
    server_learning_rate: float = key(5.0, "fedavg/fedprox: step along the (row-wise) mean delta.", range=POSITIVE)
    server_learning_rate_decay: float = key(1.0, "fedavg/fedprox: the step is multiplied by this every round after "
                                            "server-learning-rate-decay-from (1.0: constant).", range=FRACTION)
    server_learning_rate_decay_from: int = key(0, "> 0: rounds after this one use lr x decay^(round - this); "
                                               "0: no decay.", range=NON_NEGATIVE)
    server_eta: float = key(0.01, "fedadam/fedyogi: the server optimizer's step size (Flower's eta).", range=POSITIVE)
    proximal_mu: float = key(0.01, "fedprox only: weight of the proximal term on the device.", range=NON_NEGATIVE)
    row_wise_aggregation: bool = key(True, "Average each item row over the devices that touched it "
                                     "(false: plain FedAvg, for comparison).")
    client_weight: str = key("examples", "A device's weight in the average: its training interactions, or one per "
                             "device.", choices=CLIENT_WEIGHTS)
    transport_dtype: str = key("float32", "Shared parameters and updates travel in this type (float16 halves the "
                               "bytes; plain uploads only).", choices=TRANSPORT_DTYPES)
    aggregation: str = key("mean", "Robust aggregation rule (Flower's; plain uploads only, not with "
                           "secure-aggregation or user-dp).", choices=AGGREGATIONS, section="Robustness")
    trim_fraction: float = key(0.1, "trimmed-mean: share cut from each end, per coordinate.",
                               range=Range(0, 0.5, high_open=True))
    num_malicious: int = key(1, "krum / multi-krum / bulyan: malicious devices per round assumed.", range=NON_NEGATIVE)
    multi_krum_keep: int = key(0, "multi-krum: uploads averaged (0: devices - num-malicious).", range=NON_NEGATIVE)
    norm_bound: float = key(0.0, "> 0: the server clips every update's deltas to this L2 norm.", range=NON_NEGATIVE)
    max_update_norm: float = key(0.0, "> 0: reject updates whose delta norm exceeds this.", range=NON_NEGATIVE)
    reject_norm_factor: float = key(100.0, "> 0: reject updates with norm > this x the round's median (5+ updates; "
                                    "honest MovieLens-100K users reach 33x).", range=NON_NEGATIVE)
    exclude_after_rejections: int = key(3, "> 0: a device rejected this many times is not sampled again this run.",
                                        range=NON_NEGATIVE)
    fraction_train: float = key(1.0, "Share of the devices sampled per round (client-sampling = poisson: each "
                                "device's probability).", range=FRACTION, section="Device sampling and evaluation")
    clients_per_round: int = key(0, "> 0: devices per round (overrides fraction-train).", range=NON_NEGATIVE)
    seeded_sampling: bool = key(True, "fedrec simulate: each round's devices are drawn from seed and the partition "
                                "ids (same run-config, same devices); flwr run and deployments sample at random.")
    backend: str = key("flower", "fedrec simulate: every device a ClientApp on Flower's Simulation Engine, or "
                       "\"vectorized\": the sampled devices train together in one process with batched tensors "
                       "through the same server code (GMF, MF and ALS; not with secure-aggregation or record-dp).",
                       choices=BACKENDS)
    min_train_clients: int = key(2, "Fewest usable updates a round needs (see too-few-clients).", range=POSITIVE)
    min_available_clients: int = key(2, "Devices that must be connected before a round starts.", range=POSITIVE)
    fraction_evaluate: float = key(0.25, "Share of the devices that evaluate in a federated evaluation.",
                                   range=FRACTION)
    evaluate_every: int = key(5, "Federated evaluation every N rounds (and after the last).", range=POSITIVE)
    final_full_evaluation: bool = key(True, "Evaluate every device once after the last round.")
    eval_refit_epochs: int = key(0, "> 0: devices re-fit their user rows to the new global items before evaluating.",
                                 range=NON_NEGATIVE)
    exposure_item: int = key(-1, ">= 0: every evaluation also reports this item's exposure ratio ER@10 (poisoning "
                             "audits); -1: none.", range=Range(-1))
    popular_items: int = key(100, "The server publishes this many popular items (fallback for users with no "
                             "interactions); 0: none.", range=NON_NEGATIVE)
    popularity: str = key("touched", "What ranks the published popular items: the summed touched vectors, or the "
                          "number of users with a positive per item (sent in the summed upload; not under DP).",
                          choices=POPULARITY_SOURCES)
    rerank_diversity: float = key(0.0, "> 0: devices re-rank their top-10 by MMR with this weight on diversity.",
                                  range=PROBABILITY, section="Beyond accuracy")
    catalogue_metrics: bool = key(True, "Devices send how often each item is in their top-10 (coverage, novelty); "
                                  "reveals a phone's list to the server.")
    group_min_users: int = key(20, "Per-group metrics; a group with fewer users in an evaluation is suppressed "
                               "(0: no group metrics).", range=NON_NEGATIVE)
    activity_bands: str = key("50,150", "Activity groups by training interactions per user, as increasing upper "
                              "bounds (50,150: <=50, 51-150, >150).")
    dropout_probability: float = key(0.0, "A sampled device fails to answer a training request this often (per "
                                     "round).", range=PROBABILITY, section="Simulated fleet behaviour")
    straggler_fraction: float = key(0.0, "Share of devices that compute straggler-slowdown x slower.",
                                    range=PROBABILITY)
    straggler_slowdown: float = key(10.0, "How much slower a straggler computes.", range=POSITIVE)
    round_deadline: float = key(0.0, "> 0: seconds a device has to return its update; later ones are lost.",
                                range=NON_NEGATIVE)
    late_join_fraction: float = key(0.0, "Share of devices offline until a round drawn from 2..num-server-rounds.",
                                    range=PROBABILITY)
    leave_fraction: float = key(0.0, "Share of devices that leave for good at a round drawn from "
                                "2..num-server-rounds.", range=PROBABILITY)
    local_epochs_min: int = key(0, "> 0: a device trains a number of epochs drawn each round from this..local-epochs.",
                                range=NON_NEGATIVE)
    too_few_clients: str = key("skip", "A round with fewer than min-train-clients usable updates is skipped, or run "
                               "again.", choices=TOO_FEW_CLIENTS)
    round_retries: int = key(3, "too-few-clients = retry: a short round is run again up to this many times, then "
                             "skipped.", range=NON_NEGATIVE)
    missing_nodes: str = key("refuse", "Deployments: refuse the round plan, or run and report it, when fewer SuperNodes "
                             "are connected than the data has clients.", choices=MISSING_NODES)
    node_wait_seconds: float = key(120.0, "Deployments: how long the server waits for that many SuperNodes before "
                                   "round 1.", range=NON_NEGATIVE)
    run_dir: str = key("runs/latest", "Where metrics, checkpoints, the summary and the report go.", section="Outputs")
    checkpoint_every: int = key(5, "Write a server checkpoint every N rounds.", range=POSITIVE)
    resume: bool = key(False, "true: continue the run in run-dir after its last completed round (server-state.npz).")
    report: bool = key(True, "Write report.html and report.json (the privacy audit report) when the run ends.")
    secure_aggregation: bool = key(False, "Flower's SecAgg+: the server only ever sees the masked sum of a round.",
                                   section="Secure aggregation")
    allow_plain_uploads: bool = key(False, "Deployments only: true runs without SecAgg+ (the server then reads each "
                                    "upload, which names the items its user trained on); a deployment refuses "
                                    "secure-aggregation = false without it.")
    secagg_num_shares: int = key(3, "Neighbours each device secret-shares its mask keys with (>= 3 with "
                                 "secure-aggregation).", range=POSITIVE)
    secagg_reconstruction_threshold: int = key(2, "Shares needed to unmask a dropped device; tolerates num-shares - "
                                               "threshold dropouts.", range=POSITIVE)
    secagg_clipping_range: float = key(8.0, "Uploads (deltas, touched flags) are clipped to [-r, r] before "
                                       "quantization.", range=POSITIVE)
    secagg_quantization_range: int = key(4194304, "Quantization levels (2**22); devices per round x this must stay "
                                         "below 2**32.", range=POSITIVE)
    secagg_max_weight: float = key(1000.0, "A device's aggregation weight (its example count) is capped at this.",
                                   range=POSITIVE)
    record_dp: bool = key(False, "Record-level DP on each device (Opacus DP-SGD): protects single interactions of a "
                          "user.", section="Record-level differential privacy")
    record_dp_noise_multiplier: float = key(1.0, "DP-SGD noise multiplier.", range=NON_NEGATIVE)
    record_dp_max_grad_norm: float = key(1.0, "Per-example gradient clipping norm.", range=POSITIVE)
    record_dp_target_epsilon: float = key(0.0, "> 0: pick the noise so num-server-rounds x local-epochs reach "
                                          "exactly this epsilon.", range=NON_NEGATIVE)
    record_dp_delta: float = key(1e-5, "Delta of the record-level guarantee.", range=Range(0, 1, True, True))
    record_dp_epsilon_budget: float = key(0.0, "> 0: a device declines to train once its cumulative epsilon would "
                                          "exceed this.", range=NON_NEGATIVE)
    record_dp_grad_sample_mode: str = key("ghost", "Opacus per-sample gradient computation.",
                                          choices=GRAD_SAMPLE_MODES)
    user_dp: bool = key(False, "User-level DP across the federation (DP-FedAvg): protects everything one device "
                        "holds.", section="User-level differential privacy")
    user_dp_noise_multiplier: float = key(1.0, "Gaussian noise std on the sum of clipped updates = this x clipping "
                                          "norm.", range=NON_NEGATIVE)
    user_dp_first_round_noise: float = key(1.0, "Round 1's noise multiplier is this x user-dp-noise-multiplier (the "
                                           "accountant composes it so); > 1 suits a first round that only seeds the "
                                           "model, as Private ALS's does.", range=POSITIVE)
    user_dp_clipping_norm: float = key(0.1, "Every device's update (all shared deltas) is clipped to this L2 norm.",
                                       range=POSITIVE)
    user_dp_delta: float = key(0.0, "Delta of the user-level guarantee; 0: min(1e-5, N^-1.1) for N devices; a delta "
                               ">= 1/N is refused.", range=Range(0, 1, high_open=True))
    user_dp_population: int = key(0, "Deployments: the devices registered with the SuperLink (N); required with "
                                  "user-dp there (0: unknown).", range=NON_NEGATIVE)
    user_dp_epsilon_budget: float = key(0.0, "> 0: the server stops before a round would exceed this epsilon.",
                                        range=NON_NEGATIVE)
    user_dp_accountant: str = key("rdp", "dp-accounting's accountant the budget is checked with (pld: Poisson "
                                  "sampling only).", choices=ACCOUNTANTS)
    client_sampling: str = key("fixed", "fixed: clients-per-round devices without replacement; poisson: each device "
                               "with probability fraction-train.", choices=CLIENT_SAMPLINGS)

    @property
    def model_config(self) -> ModelConfig:
        """The architecture; a hybrid model's width of content features is the catalogue's."""
        width = catalogue_width(self) if self.item_features else 0
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


RUN_CONFIG_KEYS = keys_of(FedRecConfig)


def default_run_config() -> dict[str, Any]:
    """The default run-config (``{key: default}``), as ``[tool.flwr.app.config]`` holds it."""
    return fused_run_config()


def fused_run_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults with ``overrides`` applied, as Flower fuses them; an unknown key is an error."""
    return fuse(RUN_CONFIG_KEYS, dict(overrides or {}))


@functools.lru_cache(maxsize=4)
def catalogue_width(config: FedRecConfig) -> int:
    """Content features per item of the run's catalogue: reads the catalogue only, never the interactions."""
    from common.item_features import catalogue  # numpy and file parsing, only for hybrid models

    return catalogue(config, None).num_features


def parse_run_config(run_config: Mapping[str, Any]) -> FedRecConfig:
    """Validate a Flower run-config (keys with dashes) into a :class:`FedRecConfig`.

    A device parses the same run-config in every mod and for every message; the result of
    a valid one is kept (a frozen dataclass, so sharing it is safe).
    """
    try:  # the type is part of the key: 1, 1.0 and True are equal as dict keys but not as config values
        cache_key = tuple(sorted((name, type(value), value) for name, value in run_config.items()))
        hash(cache_key)
    except TypeError:  # an unhashable value: nothing to cache by, and _coerce will refuse it
        return _parse_run_config(run_config)
    return _parse_cached(cache_key)


@functools.lru_cache(maxsize=16)
def _parse_cached(items: tuple[tuple[str, type, Any], ...]) -> FedRecConfig:
    return _parse_run_config({name: value for name, _, value in items})


def _parse_run_config(run_config: Mapping[str, Any]) -> FedRecConfig:
    values: dict[str, Any] = {}
    for spec in RUN_CONFIG_KEYS:
        if spec.name not in run_config:
            raise ConfigError(f"run-config is missing '{spec.name}' (the app's pyproject.toml [tool.flwr.app.config] "
                              "and fedrec's FedRecConfig define every key: are they the same version?)")
        values[spec.attr] = _coerce(spec.name, run_config[spec.name], spec.type.__name__)
    for spec in RUN_CONFIG_KEYS:  # choices and ranges of single keys; the rules across keys follow
        spec.check(values[spec.attr])
    if values["data_path"] and values["dataset"] == "synthetic":
        raise ConfigError(
            f"data-path {values['data_path']!r} is set but dataset is 'synthetic', which reads no file; "
            "name the dataset too (--dataset / dataset = movielens-100k, movielens-1m, ..., csv or parquet)"
        )
    if values["user_dp"] and values["too_few_clients"] == "retry":
        raise ConfigError(
            "too-few-clients = 'retry' with user-dp: a short round would be sampled again, so a device drawn in a "
            "discarded attempt could be drawn again and its chance per round would exceed the rate the accountant "
            "assumes; use too-few-clients = 'skip'"
        )
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
    if values["content_loss_weight"] > 0 and not values["item_features"]:
        raise ConfigError("content-loss-weight trains a hybrid model's content projection: set item-features = true")
    if values["content_loss_weight"] > 0 and values["record_dp"]:
        raise ConfigError(
            "content-loss-weight is not supported with record-dp (Opacus clips one loss per example); "
            "use content-dropout for a private hybrid model"
        )
    if values["item_features"] and values["dataset"] in ("csv", "parquet") and not values["item_features_path"]:
        raise ConfigError(f"item-features with dataset {values['dataset']!r} needs item-features-path (a CSV of item features)")
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
    check_als(values)
    check_ease(values)
    if values["record_dp"] and values["record_dp_noise_multiplier"] <= 0 and values["record_dp_target_epsilon"] <= 0:
        raise ConfigError("record-dp needs record-dp-noise-multiplier > 0 or record-dp-target-epsilon > 0")
    return FedRecConfig(**values)


def check_als(values: dict[str, Any]) -> None:
    """model = als solves the items in closed form from summed statistics: no other server rule applies."""
    if values["model"] != "als":
        return
    conflicts = [
        ("strategy", values["strategy"] != "fedavg", "'fedavg' (the server solves the items, no optimizer step)"),
        ("record-dp", values["record_dp"], "false (no gradient steps to clip)"),
        ("item-features", values["item_features"], "false (no content tower)"),
        ("aggregation", values["aggregation"] != "mean" or values["norm_bound"] > 0,
         "'mean' with norm-bound = 0 (the statistics must be summed)"),
        ("popularity", values["popularity"] != "touched", "'touched'"),
        ("transport-dtype", values["transport_dtype"] != "float32", "'float32' (the solve needs the exact sums)"),
        ("secure-aggregation", values["secure_aggregation"] and not values["user_dp"],
         "false without user-dp (only user-dp's bounded statistics fit SecAgg+'s clipping range)"),
    ]
    for name, conflict, expected in conflicts:
        if conflict:
            raise ConfigError(f"model 'als' needs {name} = {expected}")


def check_ease(values: dict[str, Any]) -> None:
    """model = ease solves its weights in closed form from the exact sum of the devices' Grams."""
    if values["model"] != "ease":
        return
    per_device = values["users_per_client"] if values["partitioning"] == "group" else 1
    conflicts = [
        ("user-dp", values["user_dp"], "false (a private EASE is not built: see the privacy guide, docs/privacy.md)"),
        ("record-dp", values["record_dp"], "false (no gradient steps to clip)"),
        ("strategy", values["strategy"] != "fedavg", "'fedavg' (the server solves the weights, no optimizer step)"),
        ("item-features", values["item_features"], "false (no content tower)"),
        ("aggregation", values["aggregation"] != "mean" or values["norm_bound"] > 0,
         "'mean' with norm-bound = 0 (the Grams must be summed)"),
        ("popularity", values["popularity"] != "touched", "'touched' (read from the Gram's diagonal)"),
        ("transport-dtype", values["transport_dtype"] != "float32", "'float32' (the solve needs the exact sums)"),
        ("resume", values["resume"], "false (the running Gram sum and who added to it are not saved)"),
        ("secagg-clipping-range", values["secure_aggregation"] and values["secagg_clipping_range"] < per_device,
         f">= {per_device} with secure-aggregation (a device's Gram entries reach {per_device})"),
        ("secagg-quantization-range", values["secure_aggregation"]
         and values["secagg_quantization_range"] ** 2 <= 2**34 * values["secagg_clipping_range"],
         f"> {math.sqrt(2**34 * values['secagg_clipping_range']):.0f} with secure-aggregation (SecAgg+'s rounding "
         "over as many devices as its 2**32 modulus allows must stay below half a count)"),
    ]
    for name, conflict, expected in conflicts:
        if conflict:
            raise ConfigError(f"model 'ease' needs {name} = {expected}")


def check_against_data(config: FedRecConfig, num_items: int, num_clients: int = 0) -> None:
    """The checks that need the loaded dataset (run before the first round); ``num_clients`` 0: unknown."""
    if config.exposure_item >= num_items:
        raise ConfigError(f"exposure-item {config.exposure_item} is not an item of this dataset (0..{num_items - 1})")
    if num_clients <= 0:
        return
    for name in ("clients_per_round", "min_train_clients", "min_available_clients"):
        if getattr(config, name) > num_clients:
            raise ConfigError(
                f"{name.replace('_', '-')} = {getattr(config, name)} but this dataset makes only {num_clients} clients "
                f"({config.partitioning} partitioning); use at most {num_clients}"
            )


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    expected = {"int": int, "float": float, "bool": bool, "str": str}[str(annotation)]
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool) or not isinstance(value, expected):
        raise ConfigError(f"run-config '{key}' must be {expected.__name__}; got {value!r} ({type(value).__name__})")
    return value
