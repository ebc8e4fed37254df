"""Device behaviour of a real fleet, played by a simulated one: dropouts, stragglers, late
joiners, leavers and uneven local epochs.

On the Simulation Engine every SuperNode is always there, always answers and is always
fast; a fleet of phones is none of those. ``fleet_mod`` sits in front of the ClientApp
and makes each device behave like one of a real fleet. A device's traits (straggler or
not, the round it joins, the round it leaves) are drawn from the run-config ``seed`` and
its ``partition-id``, and its per-round draws (dropout, epochs) also from the round, so a
scenario replays exactly and one knob never reshuffles another's draws.

Only training requests are affected. Evaluation requests pass untouched: a simulation's
evaluation is the researcher's measurement of the whole population, not something the
fleet takes part in.

Stragglers run on virtual time: a device's time for a round is its measured training time
times its slowdown (``straggler-slowdown`` for stragglers, 1 otherwise), and an update whose
time exceeds ``round-deadline`` is lost, as if it had arrived after the server moved on.
Sleeping for real would only stall the simulation's workers. In a deployment the server
also stops waiting at the deadline (``server.fleet``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from flwr.app import Context, Error, Message
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from common.config import FLEET_FAILURE_PREFIX, ROUND_ATTEMPT_KEY, FedRecConfig, parse_run_config
from common.private_eval import EVALUATE_ONLY_KEY

FIT_CONFIG_KEY = "fitins.config"  # where Flower's legacy FitIns keeps its config (recorddict_compat)
LOCAL_EPOCHS_KEY = "local-epochs"  # per-request override of the run-config's local-epochs

# Independent random streams, one per trait, so that changing one knob never moves another's draws.
_STRAGGLER, _JOIN, _LEAVE, _DROPOUT, _EPOCHS = range(5)


@dataclass(frozen=True)
class DeviceTraits:
    """What kind of device this is, fixed for the whole run."""

    straggler: bool
    joins_at: int  # first round the device is online
    leaves_at: int  # first round it is gone for good (beyond the last round: never)


def simulates_fleet(config: FedRecConfig) -> bool:
    """Whether any fleet behaviour is configured (otherwise the mod is a pass-through)."""
    return bool(
        config.dropout_probability or config.straggler_fraction or config.round_deadline or config.late_join_fraction
        or config.leave_fraction or config.local_epochs_min
    )


def _rng(config: FedRecConfig, stream: int, key: int, *when: int) -> np.random.Generator:
    return np.random.default_rng([config.seed, 0xF1EE7, stream, key, *when])


def device_traits(config: FedRecConfig, key: int) -> DeviceTraits:
    """The traits of the device with stable ``key`` (its partition-id).

    A trait whose fraction is 0 draws nothing (a draw in [0, 1) is never below 0, and every
    trait has a stream of its own): three generators per device per round took 0.4 s of a
    6,040-device round of the vectorized backend.
    """
    last = config.num_server_rounds
    straggler = config.straggler_fraction > 0 and bool(_rng(config, _STRAGGLER, key).random() < config.straggler_fraction)
    joins_at = 1
    if config.late_join_fraction > 0 and last >= 2:
        join = _rng(config, _JOIN, key)
        if join.random() < config.late_join_fraction:
            joins_at = int(join.integers(2, last + 1))
    leaves_at = last + 1
    if config.leave_fraction > 0 and joins_at < last:
        leave = _rng(config, _LEAVE, key)
        if leave.random() < config.leave_fraction:
            leaves_at = int(leave.integers(joins_at + 1, last + 1))
    return DeviceTraits(straggler, joins_at, leaves_at)


def absence(config: FedRecConfig, key: int, server_round: int, attempt: int = 0) -> str:
    """Why the device does not answer a training request this round ('' if it does).

    ``attempt`` > 0 is a retried round: its dropout is drawn anew, its presence is not.
    """
    traits = device_traits(config, key)
    if server_round < traits.joins_at:
        return f"offline until round {traits.joins_at} (joins late)"
    if server_round >= traits.leaves_at:
        return f"left the federation in round {traits.leaves_at}"
    if config.dropout_probability and _rng(config, _DROPOUT, key, server_round, attempt).random() < config.dropout_probability:
        return "dropped out of this round"
    return ""


def round_epochs(config: FedRecConfig, key: int, server_round: int) -> int:
    """Local epochs the device manages this round: local-epochs, or a draw from local-epochs-min.."""
    if not config.local_epochs_min:
        return config.local_epochs
    return int(_rng(config, _EPOCHS, key, server_round).integers(config.local_epochs_min, config.local_epochs + 1))


def device_key(context: Context) -> int:
    """A stable number for the device: its partition-id, else its node id."""
    return int(context.node_config.get("partition-id", context.node_id))


def _refuse(msg: Message, why: str) -> Message:
    return Message(Error(ErrorCode.NODE_UNAVAILABLE, f"{FLEET_FAILURE_PREFIX} {why}"), reply_to=msg)


def fleet_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Play this device's fleet behaviour on training requests; everything else passes through."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    request = msg.content.config_records.get(FIT_CONFIG_KEY)
    if request is None or request.get(EVALUATE_ONLY_KEY):  # a SecAgg+ key exchange, or evaluation: no training
        return call_next(msg, context)
    config = parse_run_config(context.run_config)
    if not simulates_fleet(config):
        return call_next(msg, context)
    key = device_key(context)
    server_round = int(request.get("server-round", 0))  # type: ignore[arg-type]
    why = absence(config, key, server_round, int(request.get(ROUND_ATTEMPT_KEY, 0)))  # type: ignore[arg-type]
    if why:
        return _refuse(msg, why)
    request[LOCAL_EPOCHS_KEY] = round_epochs(config, key, server_round)
    started = time.perf_counter()
    reply = call_next(msg, context)
    slowdown = config.straggler_slowdown if device_traits(config, key).straggler else 1.0
    seconds = (time.perf_counter() - started) * slowdown
    if config.round_deadline and seconds > config.round_deadline and not reply.has_error():
        return _refuse(msg, f"missed the {config.round_deadline:g} s round deadline ({seconds:.2f} s)")
    return reply
