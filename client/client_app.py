"""fedrec ClientApp: trains on a device's own interactions, keeps user embeddings local.

The user-local parameters live in ``Context.state`` (one ArrayRecord) across rounds and
are never part of a reply. The app speaks Flower's legacy fit/evaluate messages so that
``secaggplus_mod`` can wrap the very same training code when secure aggregation is on.

With the node-config key ``state-dir`` the device's users, interactions, user rows and
record-level DP history live on disk instead (:mod:`client.store`): initialised from the
SuperNode's partition the first time, saved after every fit, loaded on every message, so
they survive a SuperNode restart and reflect the operator's edits (added or forgotten
users) from the next message on. ``Context.state`` then holds none of them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client import store
from client.coldstart import device_rows
from client.fleet import LOCAL_EPOCHS_KEY, fleet_mod
from client.local import RoundResult, evaluate_client, train_round
from client.private_training import History, RecordDPConfig
from client.recommend import DeviceRecommendation, recommend_for_client, recommend_for_state, recommend_on_device
from common.config import FedRecConfig, parse_run_config
from common.errors import DataError, plain_message
from common.evaluation import ListMetrics
from common.federation import ClientData, catalogue_features, slicer_cached
from common.privacy import SecureGaussian
from common.private_eval import EVALUATE_ONLY_KEY, is_private, layout_for, private_lists, private_metrics
from common.secagg import device_clipping_norm, distributed_noise, noise_share_std
from common.threads import use_threads
from common.updates import POPULAR_ITEMS_KEY, decode_item_list, for_transport

LOCAL_STATE_KEY = "fedrec.user-local"
RECORD_DP_HISTORY_KEY = "fedrec.record-dp-history"
STATE_DIR_KEY = "state-dir"  # node-config: directory of the device's persistent state
NUM_THREADS_KEY = "num-threads"  # node-config: torch threads the device may use (a phone shares its cores)
ANSWER_QUERIES_KEY = "answer-queries"  # node-config: opt in to answering recommendation queries
QUERY_KEY = "fedrec.query"  # query message: ConfigRecord {user (global id), k, extra-seen}
QUERY_MODEL_KEY = "fedrec.global-model"  # query message: optional ArrayRecord of the shared arrays to rank with
QUERY_REPLY_KEY = "fedrec.recommendation"  # reply: ConfigRecord {user, items, scores, source, model-round}
# What a device may report when DP is on: nothing computed from its data beyond what the
# mechanisms cover (the loss, the update norm and the touched count are not).
DP_SAFE_METRICS = ("train_seconds", "upload_bytes", "download_bytes", "record_epsilon", "record_dp_declined")


def load_local_state(context: Context) -> dict[str, np.ndarray] | None:
    """User embeddings kept on this device from earlier rounds (None on first contact)."""
    record = context.state.array_records.get(LOCAL_STATE_KEY)
    if record is None:
        return None
    return {name: array.numpy() for name, array in record.items()}


def save_local_state(context: Context, state: dict[str, np.ndarray]) -> None:
    context.state.array_records[LOCAL_STATE_KEY] = ArrayRecord({name: Array(value) for name, value in state.items()})


def load_record_history(context: Context) -> History:
    """The Opacus accountant history of every earlier round this device trained in."""
    record = context.state.config_records.get(RECORD_DP_HISTORY_KEY)
    if record is None:
        return []
    return list(zip(record["noise"], record["rate"], record["steps"], strict=True))  # type: ignore[arg-type]


def save_record_history(context: Context, history: History) -> None:
    context.state.config_records[RECORD_DP_HISTORY_KEY] = ConfigRecord(
        {
            "noise": [float(z) for z, _, _ in history],
            "rate": [float(q) for _, q, _ in history],
            "steps": [int(n) for _, _, n in history],
        }
    )


def record_dp_config(config: FedRecConfig) -> RecordDPConfig | None:
    """Opacus DP-SGD settings from the run-config (None when record-dp is off)."""
    if not config.record_dp:
        return None
    return RecordDPConfig(
        noise_multiplier=config.record_dp_noise_multiplier,
        max_grad_norm=config.record_dp_max_grad_norm,
        delta=config.record_dp_delta,
        epsilon_budget=config.record_dp_epsilon_budget,
        target_epsilon=config.record_dp_target_epsilon,
        planned_epochs=config.num_server_rounds * config.local_epochs,
        grad_sample_mode=config.record_dp_grad_sample_mode,
    )


def client_data_for(config: FedRecConfig, context: Context) -> ClientData:
    """This SuperNode's slice of the data, chosen by its ``partition-id`` node-config."""
    slicer = slicer_cached(config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config.get("num-partitions", len(slicer)))
    if num_partitions != len(slicer):
        raise ValueError(
            f"this federation has {num_partitions} SuperNodes but the data yields {len(slicer)} clients "
            f"(partitioning={config.partitioning!r}); set num-supernodes to {len(slicer)}"
        )
    return slicer.client(partition_id)


def aggregation_weight(config: FedRecConfig, num_examples: int, declined: bool) -> int:
    """The weight a device reports with its upload."""
    if config.user_dp or declined or config.client_weight == "uniform":
        return 1  # DP-FedAvg and client-weight=uniform: every client counts once; a declined device sends zeros
    if config.secure_aggregation:
        # SecAgg+ quantizes the weight against max-weight and would overflow above it.
        return min(num_examples, int(config.secagg_max_weight))
    return num_examples


def clipping_norm_for(config: FedRecConfig, shared: list[np.ndarray]) -> float | None:
    """The L2 norm this device clips its deltas to (None without user-dp).

    Under SecAgg+ the worst-case quantization error of ``shared``'s coordinates is taken
    off the clip, so what the server dequantizes of the update stays within the clip.
    """
    if not config.user_dp:
        return None
    return device_clipping_norm(config, sum(int(np.size(array)) for array in shared))


def with_noise_share(config: FedRecConfig, upload: list[np.ndarray]) -> list[np.ndarray]:
    """Distributed DP: the clipped deltas plus this device's share of the Gaussian noise, in float64.

    Added before ``secaggplus_mod`` masks the upload, so the sum the server unmasks already
    carries the noise. The touched vector (all ones under user-dp) gets none. float64 keeps
    Flower's quantization exact to well below one step; the float upload never leaves the
    device (SecAgg+ sends masked integers).
    """
    sampler, std = SecureGaussian(), noise_share_std(config)
    deltas = [array.astype(np.float64) + sampler.normal(0.0, std, array.shape) for array in upload[:-1]]
    return [*deltas, upload[-1].astype(np.float64)]


def apply_thread_limit(context: Context) -> None:
    """Honour the node-config ``num-threads`` (unset: the process's choice, ``FEDREC_THREADS``, default 1)."""
    value = context.node_config.get(NUM_THREADS_KEY)
    if value is None:
        use_threads()
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"node-config {NUM_THREADS_KEY} must be an integer >= 1; got {value!r}")
    if torch.get_num_threads() != value:
        torch.set_num_threads(value)


def state_dir_for(context: Context) -> Path | None:
    """The node-config ``state-dir`` (None when unset or empty: state in ``Context`` only)."""
    value = context.node_config.get(STATE_DIR_KEY)
    if value is None or str(value).strip() == "":
        return None
    path = Path(str(value)).expanduser()
    if not path.is_absolute():
        # Under `flower-supernode` the ClientApp may run in another process and directory.
        raise ValueError(f"node-config {STATE_DIR_KEY}={value!r} must be an absolute path")
    return path


def device_state_for(config: FedRecConfig, context: Context, state_dir: Path) -> store.DeviceState:
    """The device state on disk, created from this SuperNode's partition the first time.

    Call with :func:`client.store.locked` held. A state made from another partition is
    refused, so two SuperNodes pointed at one directory do not silently share users.
    """
    partition = context.node_config.get("partition-id")
    if store.exists(state_dir):
        state = store.load(state_dir)
        if partition is not None and state.partition_id >= 0 and state.partition_id != int(partition):
            raise DataError(
                f"device state was initialised from partition-id {state.partition_id} but this SuperNode has "
                f"partition-id {int(partition)}; give each SuperNode its own state-dir",
                store.state_file(state_dir),
            )
        return state
    if partition is None:
        raise DataError(
            "no device state yet and no partition-id to initialise it from; create it with client.store.create",
            store.state_file(state_dir),
        )
    state = store.DeviceState.from_client_data(client_data_for(config, context), int(partition))
    store.save(state_dir, state)
    return state


def forget_context_copies(context: Context) -> None:
    """With a state-dir the disk is the only copy: none of the user rows stay in ``Context``."""
    context.state.array_records.pop(LOCAL_STATE_KEY, None)
    context.state.config_records.pop(RECORD_DP_HISTORY_KEY, None)


class FedRecClient(NumPyClient):
    """Legacy NumPyClient whose fit/evaluate delegate to :mod:`client.local`."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = parse_run_config(context.run_config)
        apply_thread_limit(context)
        self.state_dir = state_dir_for(context)
        # With a state-dir the data comes from disk (read per message, under the lock).
        self.data = client_data_for(self.config, context) if self.state_dir is None else None

    def _keep_global_model(self, parameters, config) -> None:
        """Save the global model just received, so the device can recommend between rounds."""
        assert self.state_dir is not None
        blob = config.get(POPULAR_ITEMS_KEY)  # absent in round 1 and when the server publishes none
        popular = decode_item_list(blob) if blob is not None else np.empty(0, np.int64)
        model = store.GlobalModel(dict(self.context.run_config), list(parameters), int(config.get("server-round", 0)),
                                  popular)
        store.save_global_model(self.state_dir, model)

    def _train(self, data: ClientData, parameters, local_state, history: History, config) -> RoundResult:
        train_config = self.config.train_config
        if LOCAL_EPOCHS_KEY in config:  # this round's epochs, as the fleet behaviour decided
            train_config = replace(train_config, epochs=int(config[LOCAL_EPOCHS_KEY]))
        return train_round(
            self.config.model_config,
            train_config,
            data,
            parameters,
            local_state,
            seed=self.config.seed,
            server_round=int(config.get("server-round", 0)),
            rowwise=self.config.row_wise_aggregation,
            clipping_norm=clipping_norm_for(self.config, parameters),
            record_dp=record_dp_config(self.config),
            record_history=history,
            count_positives=self.config.popularity == "positives",
        )

    def fit(self, parameters, config):  # type: ignore[override]
        if config.get(EVALUATE_ONLY_KEY):
            if not self.config.secure_aggregation:
                raise RuntimeError("an evaluate-only training request needs secure-aggregation = true")
            return self._evaluate_for_secure_aggregation(parameters, config)
        if self.state_dir is None:
            assert self.data is not None
            local_state, history = load_local_state(self.context), load_record_history(self.context)
            result = self._train(self.data, parameters, local_state, history, config)
            save_local_state(self.context, result.local_state)
            if result.record_history is not None:
                save_record_history(self.context, result.record_history)
        else:
            # Locked from load to save: an operator's erasure waits for this round rather
            # than being overwritten by it.
            with store.locked(self.state_dir):
                state = device_state_for(self.config, self.context, self.state_dir)
                self._keep_global_model(parameters, config)
                local_state = device_rows(self.config, state, parameters)
                result = self._train(state.client_data(catalogue_features(self.config)), parameters, local_state, state.record_history, config)
                store.save(self.state_dir, state.with_local_state(result.local_state, result.record_history))
            forget_context_copies(self.context)
        weight = aggregation_weight(self.config, result.num_examples, bool(result.declined))
        if self.config.popularity == "positives":  # counts over the weight: the server's weighted mean sums them
            result.upload[-2] = result.upload[-2] / weight
        upload = for_transport(result.upload, self.config.transport_dtype)
        metrics = {**result.metrics, "upload_bytes": float(sum(a.nbytes for a in upload))}
        if distributed_noise(self.config):
            upload = with_noise_share(self.config, result.upload)
        if self.config.user_dp or self.config.record_dp:
            metrics = {k: v for k, v in metrics.items() if k in DP_SAFE_METRICS}
        return upload, weight, metrics

    def list_metrics(self) -> ListMetrics:
        """Beyond-accuracy measures; under DP no device sends the items of its lists (nothing accounts for them)."""
        return private_lists(self.config)

    def _evaluation_sums(self, parameters, config) -> tuple[ClientData, dict[str, float | bytes]]:
        """This device's evaluation sums (lists and per-group sums included), computed on the device."""
        if self.state_dir is None:
            data, local_state = self.data, load_local_state(self.context)
        else:
            with store.locked(self.state_dir):
                state = device_state_for(self.config, self.context, self.state_dir)
                self._keep_global_model(parameters, config)
            data, local_state = state.client_data(catalogue_features(self.config)), device_rows(self.config, state, parameters)
            forget_context_copies(self.context)
        assert data is not None
        metrics = evaluate_client(
            self.config.model_config,
            data,
            parameters,
            local_state,
            seed=self.config.seed,
            refit=self.config.refit_config,
            exposure_item=self.config.exposure_item,
            lists=self.list_metrics(),
        )
        return data, metrics

    def evaluate(self, parameters, config):  # type: ignore[override]
        _, metrics = self._evaluation_sums(parameters, config)
        num_users = int(metrics.get("test_count", 0))
        if is_private(self.config):
            metrics = private_metrics(metrics)  # no top-k list, no group label leaves the device
        # The legacy API wants a loss; fedrec's evaluation is the ranking metrics above,
        # so 0.0 is a placeholder the server ignores (FedRecStrategy reads the metrics).
        return 0.0, num_users, metrics

    def _evaluate_for_secure_aggregation(self, parameters, config):
        """The evaluation sums as one vector for SecAgg+ to mask: the server only ever sees their sum.

        Weight 1 (SecAgg+ averages; the server multiplies back by the number of devices) and
        no metrics: nothing of this reply travels in the clear.
        """
        data, metrics = self._evaluation_sums(parameters, config)
        layout = layout_for(self.config, has_catalogue=data.catalogue is not None, num_items=data.num_items)
        return [layout.encode(metrics)], 1, {}


def client_fn(context: Context):
    return FedRecClient(context).to_client()


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` when the run has ``secure-aggregation = true``.

    The same ClientApp serves both modes. With SecAgg+ on, a training request that does not
    carry the protocol's stage is refused, and so is a plain evaluation request (evaluation
    runs as a SecAgg+ round too), so a server cannot quietly downgrade a client to sending
    its update or its evaluation sums in the clear.
    """
    if not parse_run_config(context.run_config).secure_aggregation:
        return call_next(msg, context)
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS not in msg.content.config_records:
        raise RuntimeError(
            "this run has secure-aggregation = true but the server sent a plain training request; "
            "refusing to upload an unmasked update"
        )
    if msg.metadata.message_type == MessageType.EVALUATE:
        raise RuntimeError(
            "this run has secure-aggregation = true but the server sent a plain evaluation request; "
            "evaluation sums travel only through SecAgg+"
        )
    return secaggplus_mod(msg, context, call_next)


def answer_query(msg: Message, context: Context) -> DeviceRecommendation:
    """Top-K for the user a query names.

    The model is the one the query carries, else (with a state-dir) the last global model
    the device saved; the user rows are the device's own.
    """
    config = parse_run_config(context.run_config)
    request = msg.content.config_records.get(QUERY_KEY)
    if request is None or "user" not in request:
        raise ValueError(f"a recommendation query needs a ConfigRecord '{QUERY_KEY}' with at least 'user'")
    user, k = int(request["user"]), int(request.get("k", 10))  # type: ignore[arg-type]
    extra_seen = [int(item) for item in request.get("extra-seen", [])]  # type: ignore[union-attr]
    arrays = msg.content.array_records.get(QUERY_MODEL_KEY)
    shared = [array.numpy() for array in arrays.values()] if arrays is not None else None
    model_round = int(request.get("server-round", -1))  # type: ignore[arg-type]
    state_dir = state_dir_for(context)
    if state_dir is not None:
        if shared is None:
            return recommend_on_device(str(state_dir), user, k, extra_seen=extra_seen)
        with store.locked(state_dir):
            state = device_state_for(config, context, state_dir)
            kept = store.load_global_model(state_dir) if store.global_model_file(state_dir).is_file() else None
        popular = kept.popular_items if kept is not None else np.empty(0, np.int64)
        model = store.GlobalModel(dict(context.run_config), shared, model_round, popular)
        return recommend_for_state(config, state, model, user, k, extra_seen=extra_seen)
    if shared is None:
        raise ValueError(f"the query carries no '{QUERY_MODEL_KEY}' and this device keeps no global model (no state-dir)")
    data, local_state = client_data_for(config, context), load_local_state(context)
    if local_state is None:
        raise ValueError("this device has not trained yet: it has no user rows to recommend from")
    local = np.flatnonzero(data.global_users == user)
    if len(local) == 0:
        raise KeyError(f"user {user} is not on this device")
    items, scores = recommend_for_client(config.model_config, data, shared, local_state, int(local[0]), k,
                                         extra_seen=extra_seen)
    return DeviceRecommendation(items, scores, "model", model_round)


def recommendation_query_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Answer Flower ``query`` messages with one local user's top-K, computed on the device.

    The reply goes to whoever sent the query (the ServerApp), and a top-K list reveals what
    the user likes: a device answers only if its owner opted in with the node-config
    ``answer-queries=true``; otherwise the query is refused and nothing is computed. Apps
    on the device itself use :func:`client.recommend.recommend_on_device` (``fedrec
    recommend --state-dir``), which sends nothing anywhere.
    """
    if msg.metadata.message_type.split(".")[0] != MessageType.QUERY:
        return call_next(msg, context)
    if context.node_config.get(ANSWER_QUERIES_KEY) is not True:
        reason = (f"this device does not answer recommendation queries (node-config {ANSWER_QUERIES_KEY} is not "
                  "true): a top-K list reveals its user's preferences to whoever asks")
        return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, reason), reply_to=msg)
    try:
        answer = answer_query(msg, context)
    except (KeyError, ValueError, IndexError) as err:
        return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, plain_message(err)), reply_to=msg)
    request = msg.content.config_records[QUERY_KEY]
    reply = ConfigRecord({
        "user": int(request["user"]),  # type: ignore[arg-type]
        "items": [int(item) for item in answer.items],
        "scores": [float(score) for score in answer.scores],
        "source": answer.source,
        "model-round": int(answer.model_round),
    })
    return Message(RecordDict({QUERY_REPLY_KEY: reply}), reply_to=msg)


# Outermost first: a fleet device that is absent this round computes nothing, SecAgg+ included.
MODS = [recommendation_query_mod, fleet_mod, secure_aggregation_mod]
app = ClientApp(client_fn=client_fn, mods=MODS)
