"""The device's Flower client: fit and evaluate delegate to :mod:`client.local`.

A legacy ``NumPyClient``, so that ``secaggplus_mod`` can wrap the very same training code
when secure aggregation is on. Its state between messages is :mod:`client.device_state`;
what its reply carries besides the deltas is :mod:`client.upload`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from flwr.app import Context
from flwr.client import NumPyClient

from client import store
from client.coldstart import device_rows
from client.device_state import (
    client_data_for,
    device_state_for,
    forget_context_copies,
    load_local_state,
    load_record_history,
    save_local_state,
    save_record_history,
    state_dir_for,
)
from client.fleet import LOCAL_EPOCHS_KEY
from client.als_local import als_round
from client.ease_local import ease_round
from client.local import RoundResult, client_key, evaluate_client, train_round
from client.private_training import History, RecordDPConfig
from client.upload import clipping_norm_for, finish_reply
from common.config import FedRecConfig, parse_run_config
from common.evaluation import ListMetrics
from common.federation import ClientData, catalogue_features
from common.models import CLOSED_FORM_MODELS
from common.private_eval import EVALUATE_ONLY_KEY, is_private, layout_for, private_lists, private_metrics
from common.threads import use_threads
from common.updates import POPULAR_ITEMS_KEY, decode_item_list

NUM_THREADS_KEY = "num-threads"  # node-config: torch threads the device may use (a phone shares its cores)


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


class FedRecClient(NumPyClient):
    """Legacy NumPyClient whose fit/evaluate delegate to :mod:`client.local`."""

    def __init__(self, context: Context) -> None:
        self.context = context
        self.config = parse_run_config(context.run_config)
        apply_thread_limit(context)
        self.state_dir = state_dir_for(context)
        if self.config.model in CLOSED_FORM_MODELS and self.state_dir is not None:
            # The device store keeps trained user rows and folds in newcomers by gradient steps;
            # ALS and EASE keep no rows (they rebuild them), which that store does not know yet.
            raise ValueError(f"model '{self.config.model}' runs without a device state-dir (node-config state-dir): "
                             "not supported yet")
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
        if self.config.model == "als":
            return self._solve(data, parameters, config)
        if self.config.model == "ease":
            upload, metrics = ease_round(data, parameters)
            return RoundResult(upload, len(data.train_items), {}, metrics)
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

    def _solve(self, data: ClientData, parameters, config) -> RoundResult:
        """ALS: the closed-form user step and its item-side statistics; nothing is kept on the device."""
        if len(parameters) != 1:
            raise ValueError(f"model 'als' expects one shared array (the item factors), got {len(parameters)}")
        upload, metrics = als_round(
            parameters[0], data, clip=clipping_norm_for(self.config, parameters),
            max_items=self.config.als_max_items,
            seed=[self.config.seed, int(config.get("server-round", 0)), client_key(data)],
        )
        return RoundResult(upload, len(data.train_items), {}, metrics)

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
        return finish_reply(self.config, result.upload, result.num_examples, bool(result.declined), result.metrics,
                            int(config.get("server-round", 0)))

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
    """One message's client: Flower builds it anew for every message, from the same Context."""
    return FedRecClient(context).to_client()

