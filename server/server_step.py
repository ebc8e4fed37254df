"""The wrapped Flower strategy that turns the decoded mean into the next global model.

FedAvg / FedProx take the decoded mean as it is (scaled by ``server-learning-rate``);
FedAdam / FedYogi take an Adam / Yogi step on the pseudo-gradient, with moments that a
resumed run restores (:mod:`server.resume`).
"""

from __future__ import annotations

from flwr.common import Parameters
from flwr.server.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from common.config import FedRecConfig


def build_inner_strategy(config: FedRecConfig, initial: Parameters) -> Strategy:
    """The Flower strategy that turns the decoded mean into the next global model."""
    common = dict(initial_parameters=initial, accept_failures=True, fit_metrics_aggregation_fn=_no_metrics)
    if config.strategy == "fedavg":
        return FedAvg(**common)
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return FedAdam(eta=config.server_eta, **common)
    return FedYogi(eta=config.server_eta, **common)


def _no_metrics(results: list[tuple[int, dict]]) -> dict:  # type: ignore[type-arg]
    """The inner strategy's metrics: none. It sees one decoded mean without metrics (the clients' are
    summarised by fedrec's strategy); without a function Flower warns about it in every run."""
    return {}


def server_learning_rate(config: FedRecConfig, server_round: int) -> float:
    """The step the decoding applies: scheduled for FedAvg / FedProx, 1 where Adam / Yogi steps instead."""
    return config.server_step(server_round) if config.strategy in ("fedavg", "fedprox") else 1.0
