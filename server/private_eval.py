"""Evaluation through Flower's SecAgg+: the server learns the sum of the devices' evaluation sums only.

Flower 1.41 offers SecAgg+ on training rounds alone (``SecAggPlusWorkflow`` drives
``configure_fit`` / ``aggregate_fit``). Under secure aggregation fedrec therefore runs each
evaluation as one more SecAgg+ round: :class:`EvaluationAsFit` presents the strategy's
evaluation to the workflow as a training round whose requests carry
:data:`~common.private_eval.EVALUATE_ONLY_KEY`, every device answers with its evaluation
vector (:mod:`common.private_eval`) at weight 1, and the masked vectors are unmasked as their
mean, which this module turns back into sums. Nothing is masked here: all cryptography is
Flower's.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import WARNING

from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, Key

from common.config import FedRecConfig
from common.private_eval import EVALUATE_ONLY_KEY, EvalVectorLayout
from server.secure_aggregation import check_secagg_capacity
from server.strategy import FedRecStrategy

__all__ = ["EvaluationAsFit", "secure_evaluate_workflow"]


class EvaluationAsFit(Strategy):
    """The strategy's evaluation, shaped as the training round SecAggPlusWorkflow knows how to run."""

    def __init__(self, strategy: FedRecStrategy, layout: EvalVectorLayout, quantization_range: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.layout = layout
        self.quantization_range = quantization_range
        self.summary: dict[str, Scalar] | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """The strategy's evaluation sample and model; the flag tells devices to evaluate, not train."""
        pairs = self.strategy.configure_evaluate(server_round, parameters, client_manager)
        if pairs:
            check_secagg_capacity(len(pairs), self.quantization_range)
        return [(client, FitIns(ins.parameters, {**ins.config, EVALUATE_ONLY_KEY: True})) for client, ins in pairs]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Sums from SecAgg+'s mean; the model is left as it is (None)."""
        sums = None
        if results:
            arrays = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the one aggregate
            try:
                sums = self.layout.decode(arrays[0], len(results))
            except (ValueError, IndexError) as err:
                log(WARNING, "round %s: the securely aggregated evaluation is unusable: %s", server_round, err)
        self.summary = self.strategy.aggregate_secure_evaluate(server_round, sums, len(results), len(failures))
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
        return None, {}

    def evaluate(self, server_round, parameters):  # type: ignore[no-untyped-def]
        return None


def secure_evaluate_workflow(
    config: FedRecConfig, strategy: FedRecStrategy, layout: EvalVectorLayout
) -> Callable[..., None]:
    """The evaluation stage of a SecAgg+ run: a SecAgg+ round over the evaluation vectors.

    ``max_weight`` is 1 because every device's weight is 1: the weight scales the vector
    before quantization, so a larger range would only cost precision.
    """
    workflow = SecAggPlusWorkflow(
        num_shares=config.secagg_num_shares,
        reconstruction_threshold=config.secagg_reconstruction_threshold,
        max_weight=1.0,
        clipping_range=config.secagg_clipping_range,
        quantization_range=config.secagg_quantization_range,
    )
    adapter = EvaluationAsFit(strategy, layout, config.secagg_quantization_range)

    def run(grid, context: LegacyContext) -> None:  # type: ignore[no-untyped-def]
        server_round = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])  # type: ignore[arg-type]
        if not strategy.evaluates(server_round):
            return  # no SecAgg+ round (and no log of one halting) when nothing is evaluated
        evaluation = LegacyContext(context, config=context.config, strategy=adapter,
                                   client_manager=context.client_manager)
        workflow(grid, evaluation)

    return run
