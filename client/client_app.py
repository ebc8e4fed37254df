"""fedrec ClientApp: trains on a device's own interactions, keeps user embeddings local.

The app composes the device's Flower client (:mod:`client.numpy_client`, whose state
between messages is :mod:`client.device_state`) with its mods: recommendation queries
(:mod:`client.query`), the simulated fleet's behaviour (:mod:`client.fleet`) and the
SecAgg+ guard (:mod:`client.secagg_guard`).
"""

from __future__ import annotations

from flwr.clientapp import ClientApp

from client.device_state import (
    LOCAL_STATE_KEY,
    RECORD_DP_HISTORY_KEY,
    STATE_DIR_KEY,
    client_data_for,
    device_state_for,
    load_local_state,
    state_dir_for,
)
from client.fleet import fleet_mod
from client.numpy_client import NUM_THREADS_KEY, FedRecClient, apply_thread_limit, client_fn, record_dp_config
from client.query import (
    ANSWER_QUERIES_KEY,
    QUERY_KEY,
    QUERY_MODEL_KEY,
    QUERY_REPLY_KEY,
    answer_query,
    recommendation_query_mod,
)
from client.secagg_guard import secure_aggregation_mod
from client.upload import DP_SAFE_METRICS, aggregation_weight, clipping_norm_for, with_noise_share

# Importers of this module from before it was split (tests, simulations, tools) keep working.
__all__ = [
    "ANSWER_QUERIES_KEY",
    "DP_SAFE_METRICS",
    "LOCAL_STATE_KEY",
    "MODS",
    "NUM_THREADS_KEY",
    "QUERY_KEY",
    "QUERY_MODEL_KEY",
    "QUERY_REPLY_KEY",
    "RECORD_DP_HISTORY_KEY",
    "STATE_DIR_KEY",
    "FedRecClient",
    "aggregation_weight",
    "answer_query",
    "apply_thread_limit",
    "app",
    "client_data_for",
    "client_fn",
    "clipping_norm_for",
    "device_state_for",
    "load_local_state",
    "record_dp_config",
    "secure_aggregation_mod",
    "state_dir_for",
    "with_noise_share",
]

# Outermost first: a fleet device that is absent this round computes nothing, SecAgg+ included.
MODS = [recommendation_query_mod, fleet_mod, secure_aggregation_mod]
app = ClientApp(client_fn=client_fn, mods=MODS)
