"""The recommendation query handler mod: one local user's top-K, computed on the device, on opt-in."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from client import store
from client.device_state import client_data_for, device_state_for, load_local_state, state_dir_for
from client.recommend import DeviceRecommendation, recommend_for_client, recommend_for_state, recommend_on_device
from common.config import parse_run_config
from common.errors import plain_message

ANSWER_QUERIES_KEY = "answer-queries"  # node-config: opt in to answering recommendation queries
QUERY_KEY = "fedrec.query"  # query message: ConfigRecord {user (global id), k, extra-seen}
QUERY_MODEL_KEY = "fedrec.global-model"  # query message: optional ArrayRecord of the shared arrays to rank with
QUERY_REPLY_KEY = "fedrec.recommendation"  # reply: ConfigRecord {user, items, scores, source, model-round}


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
