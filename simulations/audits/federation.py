"""An in-process federated loop for the audits, with the real client and server code.

Why not ``fedrec simulate``: the audits need what a curious server holds (each upload and
each round's aggregate) and ground truth (who trained on what) in one process, and they
change the population (canary clients, held-out interactions). Each device's round is
``client.local.train_round`` (exactly the upload a device sends); the server side is
``server.aggregate.weighted_mean`` (the aggregate SecAgg+ would hand over),
``server.user_dp.privatize`` (user-level DP, what the strategy calls), ``common.updates.decode_mean_update`` and
Flower's own inner strategy, as in ``FedRecStrategy.aggregate_fit``. Sequential, one
thread: the audits run beside other jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from client.local import build_local_model, train_round, user_seed
from client.numpy_client import record_dp_config
from client.private_training import History
from client.upload import aggregation_weight
from common.config import FedRecConfig
from common.federation import ClientData
from common.models import RecModel, build_model
from common.privacy import UserLevelDP
from common.updates import UpdateLayout, decode_mean_update
from server.aggregate import weighted_mean
from server.server_app import user_level_dp
from server.server_step import build_inner_strategy
from server.user_dp import privatize


@dataclass
class RoundView:
    """What the server holds in one round, before and after its DP step."""

    round: int
    participants: list[int]  # client indices
    uploads: list[list[np.ndarray]]  # each device's upload as received without SecAgg+
    weights: list[int]  # aggregation weights (example counts; 1 under user-level DP)
    mean: list[np.ndarray]  # the weighted mean: what SecAgg+ reveals
    released: list[np.ndarray]  # what decoding uses: ``mean`` or its privatized version


@dataclass
class FedResult:
    """The state after the last round."""

    initial: list[np.ndarray]
    shared: list[np.ndarray]
    layout: UpdateLayout
    local_states: dict[int, dict[str, np.ndarray]]
    record_histories: dict[int, History]
    participation: np.ndarray  # rounds each client trained in
    rounds: int
    user_dp: UserLevelDP | None
    seconds: float
    record_epsilons: dict[int, float] = field(default_factory=dict)


def user_dp_facts(dp: UserLevelDP, rounds: int, accountant: str) -> dict[str, float | str]:
    """The user-level guarantee of an audited run, as its results state it."""
    return {"user_epsilon": dp.epsilon(rounds, accountant), "user_delta": dp.target_delta, "accountant": accountant,
            "noise_multiplier": dp.noise_multiplier, "clipping_norm": dp.clipping_norm, "sampling": dp.sampling}


def sample_round(config: FedRecConfig, dp: UserLevelDP | None, num_clients: int, rng: np.random.Generator) -> list[int]:
    """Clients of one round, as ``FedRecStrategy.configure_fit`` picks them."""
    if config.client_sampling == "poisson" and dp is not None:
        return [int(i) for i in np.flatnonzero(rng.random(num_clients) < dp.sampling_rate)]
    size = config.clients_per_round if config.clients_per_round > 0 else max(
        int(num_clients * config.fraction_train), config.min_train_clients)
    size = min(size, num_clients)
    return sorted(int(i) for i in rng.choice(num_clients, size=size, replace=False))


def run_federation(
    config: FedRecConfig,
    clients: list[ClientData],
    rounds: int,
    *,
    observe: Callable[[RoundView], None] | None = None,
    sampling_seed: int = 0,
    noise_seed: int | None = None,
    dp_num_clients: int | None = None,
    progress: str = "",
) -> FedResult:
    """Train ``rounds`` rounds over ``clients`` (user-/record-level DP as ``config`` says).

    ``dp_num_clients`` fixes the population the user-level mechanism is defined for (the
    expected-clients denominator and the sampling rate); a canary audit passes the number
    of *potential* clients so that adding or removing a canary user changes nothing else.
    ``noise_seed`` None draws the server's noise from OS entropy, as the strategy does.
    """
    if config.strategy not in ("fedavg", "fedprox", "fedadam", "fedyogi"):
        raise ValueError(f"unknown strategy {config.strategy!r}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    num_items = clients[0].num_items
    model = build_model(config.model_config, 0, num_items, seed=config.seed)
    state = model.shared_state()
    layout = UpdateLayout.from_state(state, model.item_row_parameter_names(), num_items)
    initial = [a.astype(np.float32) for a in state.values()]
    current = [a.copy() for a in initial]
    inner = build_inner_strategy(config, ndarrays_to_parameters(current))
    dp = user_level_dp(config, dp_num_clients or len(clients))
    record_dp = record_dp_config(config)
    clipping = config.user_dp_clipping_norm if config.user_dp else None
    sampler = np.random.default_rng(sampling_seed)
    noise = np.random.default_rng(noise_seed)
    local_states: dict[int, dict[str, np.ndarray]] = {}
    histories: dict[int, History] = {}
    record_eps: dict[int, float] = {}
    participation = np.zeros(len(clients), dtype=np.int64)
    for rnd in range(1, rounds + 1):
        chosen = sample_round(config, dp, len(clients), sampler)
        if not chosen:
            continue
        uploads, weights = [], []
        for cid in chosen:
            result = train_round(
                config.model_config, config.train_config, clients[cid], current, local_states.get(cid),
                seed=config.seed, server_round=rnd, rowwise=config.row_wise_aggregation,
                clipping_norm=clipping, record_dp=record_dp, record_history=histories.get(cid, []),
            )
            local_states[cid] = result.local_state
            if result.record_history is not None:
                histories[cid] = result.record_history
                record_eps[cid] = float(result.metrics.get("record_epsilon", 0.0))
            uploads.append(result.upload)
            weights.append(aggregation_weight(config, result.num_examples, bool(result.declined)))
            participation[cid] += 1
        fit = [(None, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(u), w, {})) for u, w in zip(uploads, weights, strict=True)]
        mean = weighted_mean(fit)  # type: ignore[arg-type]
        released = privatize(dp, mean, len(chosen), noise, server_round=rnd) if dp is not None else mean
        if observe is not None:
            observe(RoundView(rnd, chosen, uploads, weights, mean, released))
        lr = config.server_step(rnd) if config.strategy in ("fedavg", "fedprox") else 1.0
        decoded = decode_mean_update(layout, current, released, server_learning_rate=lr)
        single = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(decoded), int(sum(weights)), {})
        new_parameters, _ = inner.aggregate_fit(rnd, [(None, single)], [])  # type: ignore[list-item]
        if new_parameters is not None:
            current = parameters_to_ndarrays(new_parameters)
        if progress:
            print(f"[audit] {progress}: round {rnd}/{rounds}, {len(chosen)} clients, "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
    return FedResult(initial, current, layout, local_states, histories, participation, rounds, dp,
                     time.perf_counter() - started, record_eps)


def personal_model(config: FedRecConfig, data: ClientData, shared: list[np.ndarray],
                   local_state: dict[str, np.ndarray] | None) -> RecModel:
    """A device's model after training: the global shared part and its own user rows."""
    return build_local_model(config.model_config, data, shared, local_state, user_seed(config.seed, data))
