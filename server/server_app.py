"""fedrec ServerApp: coordinates rounds over Flower's legacy workflow.

The server builds the shared part of the model only (no user rows), runs
``DefaultWorkflow`` with :class:`~server.strategy.FedRecStrategy`, and writes the run
directory. Using the legacy workflow is deliberate: it is the one Flower 1.41 offers
SecAgg+ on, so secure aggregation can replace the fit stage without touching training.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import ServerApp

from common.config import FedRecConfig, parse_run_config
from common.federation import prepare_cached
from common.models import build_model
from common.updates import UpdateLayout
from server.run_dir import RunRecorder
from server.strategy import FedRecStrategy

app = ServerApp()


def fit_workflow(config: FedRecConfig) -> SecAggPlusWorkflow | None:
    """Flower's SecAgg+ fit stage when the run asks for it (None: the plain default)."""
    if not config.secure_aggregation:
        return None
    return SecAggPlusWorkflow(
        num_shares=config.secagg_num_shares,
        reconstruction_threshold=config.secagg_reconstruction_threshold,
        max_weight=config.secagg_max_weight,
        clipping_range=config.secagg_clipping_range,
        quantization_range=config.secagg_quantization_range,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-server-rounds`` and leave a complete run directory behind."""
    config = parse_run_config(context.run_config)
    prepared = prepare_cached(config)
    model = build_model(config.model_config, 0, prepared.num_items, seed=config.seed)
    shared = model.shared_state()
    layout = UpdateLayout.from_state(shared, model.item_row_parameter_names(), prepared.num_items)
    recorder = RunRecorder(config.run_dir, context.run_config, config.checkpoint_every)
    strategy = FedRecStrategy(
        config, layout, list(shared.values()), recorder, uploads_are_aggregated=config.secure_aggregation
    )
    log(
        logging.INFO,
        "fedrec: %s on %s (%d users, %d items), %s, secure aggregation %s, run dir %s",
        config.model,
        config.dataset,
        prepared.num_users,
        prepared.num_items,
        strategy,
        "SecAgg+" if config.secure_aggregation else "off",
        recorder.path,
    )
    legacy_context = LegacyContext(
        context=context, config=ServerConfig(num_rounds=config.num_server_rounds), strategy=strategy
    )
    DefaultWorkflow(fit_workflow=fit_workflow(config))(grid, legacy_context)
    summary = recorder.finish()
    final = summary.get("final_evaluation", {})
    log(
        logging.INFO,
        "fedrec: done in %.1fs; test HR@10 %.4f NDCG@10 %.4f (sampled, %s users)",
        summary["wall_seconds"],
        final.get("test_sampled_hr@10", float("nan")),
        final.get("test_sampled_ndcg@10", float("nan")),
        final.get("test_count", 0),
    )
