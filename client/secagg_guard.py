"""The SecAgg+ guard mod: with secure aggregation on, nothing leaves the device unmasked."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from common.config import parse_run_config


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
