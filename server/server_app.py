"""fedrec ServerApp: coordinates rounds over Flower's legacy workflow.

The server builds the shared part of the model only (no user rows), runs
``DefaultWorkflow`` with :class:`~server.strategy.FedRecStrategy`, and writes the run
directory. Using the legacy workflow is deliberate: it is the one Flower 1.41 offers
SecAgg+ on, so secure aggregation can replace the fit stage without touching training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np
from flwr.app import Context
from flwr.common.logger import log
from flwr.server import Grid, LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_evaluate_workflow, default_fit_workflow
from flwr.serverapp import ServerApp

from common import als, ease
from common.config import ConfigError, FedRecConfig, check_against_data, parse_run_config
from common.federation import PreparedData, describe_split, prepare_cached, slicer_cached
from common.models import build_model
from common.privacy import RECORD_NOISE_GENERATOR, UserLevelDP, delta_problem
from common.private_eval import layout_for
from common.secagg import (
    check_distributed_noise,
    device_clipping_norm,
    distributed_noise,
    min_survivors,
    noise_share_std,
    quantization_step,
    rounding_slack,
    secagg_max_weight,
)
from common.threads import use_threads
from common.updates import UpdateLayout
from server.disclosure import DisclosureGrid
from server.fleet import retrying, with_deadline
from server.private_eval import secure_evaluate_workflow
from server.progress import reporting
from server.nodes import NodeCount, check_nodes, refuse_if_short
from server.run_dir import RunRecorder, ServerState, load_server_state
from server.sampling import simulation_partitions
from server.secure_aggregation import check_secagg_capacity, secagg_workflow
from server.strategy import FedRecStrategy

app = ServerApp()


def fit_workflow(config: FedRecConfig) -> SecAggPlusWorkflow | Callable:
    """Flower's SecAgg+ fit stage when the run asks for it, else Flower's plain default."""
    if not config.secure_aggregation:
        return default_fit_workflow
    return secagg_workflow(config)


def check_deployment(config: FedRecConfig, simulated: bool) -> None:
    """The settings a deployment (a real SuperLink) refuses before any device is asked anything.

    In simulation the whole fleet is there (the strategy waits for it) and nobody reads the
    uploads but the researcher. In a deployment the server belongs to someone else: plain
    uploads name each user's items, and a round samples from whoever happens to be connected.
    """
    if simulated:
        return
    if not config.secure_aggregation and not config.allow_plain_uploads:
        raise ConfigError(
            "a deployment runs with secure-aggregation = true: without SecAgg+ the server reads every device's "
            "upload, whose touched-items vector and non-zero rows name the items its user trained on; set "
            "allow-plain-uploads = true to run without it knowingly"
        )
    if not config.user_dp:
        return
    if config.client_sampling != "poisson":
        raise ConfigError(
            "user-dp in a deployment needs client-sampling = 'poisson': fixed-size sampling picks m of the devices "
            "that happen to be connected, so a device's chance exceeds the m/N the accountant assumes"
        )
    if config.user_dp_population <= 0:
        raise ConfigError(
            "user-dp in a deployment needs user-dp-population = N, the number of devices registered with the "
            "SuperLink: the accountant's population and the noisy mean's denominator q N are defined over them"
        )


def dp_population(config: FedRecConfig, simulated: bool, num_partitions: int) -> int:
    """N of the user-level mechanism: the simulated clients, or the registered devices of a deployment."""
    if not simulated:
        return config.user_dp_population
    if config.user_dp and config.user_dp_population not in (0, num_partitions):
        raise ConfigError(
            f"user-dp-population {config.user_dp_population} differs from the {num_partitions} clients this "
            "simulation runs; leave it at 0 in simulation (the population is every simulated client)"
        )
    return num_partitions


def evaluate_workflow(
    config: FedRecConfig, strategy: FedRecStrategy, prepared: PreparedData, num_clients: int
) -> Callable | None:
    """Under secure aggregation, evaluation sums travel through SecAgg+ too; else Flower's default.

    The final evaluation asks every device at once: checked before the first round, not after the last.
    """
    if not config.secure_aggregation:
        return None
    if config.final_full_evaluation:
        check_secagg_capacity(num_clients, config.secagg_quantization_range)
    layout = layout_for(config, has_catalogue=prepared.catalogue is not None, num_items=prepared.num_items)
    return secure_evaluate_workflow(config, strategy, layout)


def user_level_dp(config: FedRecConfig, num_clients: int) -> UserLevelDP | None:
    """The DP-FedAvg mechanism this run will really execute (None when user-dp is off)."""
    if not config.user_dp:
        return None
    if config.user_dp_delta >= 1.0 / num_clients:
        raise ConfigError(delta_problem(config.user_dp_delta, num_clients))
    common = dict(
        noise_multiplier=config.user_dp_noise_multiplier,
        first_round_noise=config.user_dp_first_round_noise,
        clipping_norm=config.user_dp_clipping_norm,
        num_clients=num_clients,
        delta=config.user_dp_delta,
    )
    if config.client_sampling == "poisson":
        rate = config.clients_per_round / num_clients if config.clients_per_round > 0 else config.fraction_train
        return UserLevelDP(sampling="poisson", sampling_rate=min(rate, 1.0), **common)
    size = config.clients_per_round or max(int(num_clients * config.fraction_train), config.min_train_clients)
    return UserLevelDP(sampling="fixed", sample_size=min(size, num_clients), **common)


def plan_rounds(config: FedRecConfig, dp: UserLevelDP | None) -> tuple[int, str]:
    """Rounds to run: all of them, or the most the user-level budget allows (and why)."""
    if dp is None or config.user_dp_epsilon_budget <= 0:
        return config.num_server_rounds, ""
    allowed = dp.max_rounds(config.user_dp_epsilon_budget, config.user_dp_accountant, upper=config.num_server_rounds)
    if allowed >= config.num_server_rounds:
        return config.num_server_rounds, ""
    spent = dp.epsilon(allowed + 1, config.user_dp_accountant)
    return allowed, (
        f"stopped after {allowed} of {config.num_server_rounds} rounds: round {allowed + 1} would spend user-level "
        f"epsilon {spent:.3f} > budget {config.user_dp_epsilon_budget} (delta {dp.target_delta:.3g}, "
        f"{config.user_dp_accountant} accountant)"
    )


def privacy_plan(
    config: FedRecConfig, dp: UserLevelDP | None, rounds: int, stop_reason: str, num_coordinates: int = 0
) -> dict:
    """What ``privacy.json`` states before the first round; epsilons per round go to metrics.

    ``num_coordinates``: the shared deltas a device uploads (sets SecAgg+'s worst-case rounding).
    """
    plan: dict = {"user_level": None, "record_level": None, "secure_aggregation": config.secure_aggregation}
    if config.secure_aggregation:
        plan["secure_aggregation_parameters"] = {
            "protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod)",
            "num_shares": config.secagg_num_shares,
            "reconstruction_threshold": config.secagg_reconstruction_threshold,
            "clipping_range": config.secagg_clipping_range,
            "quantization_range": config.secagg_quantization_range,
            "max_weight": secagg_max_weight(config),
            "quantization_step": quantization_step(config),
            "rounding": "stochastic (flwr quantize): each coordinate moves by less than one step",
        }
        plan["secure_aggregation_limitations"] = (
            "Flower 1.41's SecAgg+ expands each pairwise mask seed, folded to 32 bits, with numpy's "
            "RandomState (Mersenne Twister, not a cryptographic generator; Flower issue 7522, fix proposed "
            "in PR 7570): a server able to search 2**32 seeds per mask could try to strip masks. "
            "Per-client example counts and training metrics are sent in the clear."
        )
    if dp is not None:
        plan["user_level"] = {
            **dp.describe(),
            "accountant": config.user_dp_accountant,
            "epsilon_budget": config.user_dp_epsilon_budget or None,
            "rounds_requested": config.num_server_rounds,
            "rounds_planned": rounds,
            "stop_reason": stop_reason or None,
            **noise_placement(config, num_coordinates),
        }
    if config.record_dp:
        plan["record_level"] = {
            "mechanism": "Opacus DP-SGD on each device (per-example clipping, Gaussian noise, Poisson sampling); "
            "the user embeddings on the device are trained under the same DP-SGD step",
            "noise_multiplier": config.record_dp_noise_multiplier,
            "target_epsilon": config.record_dp_target_epsilon or None,
            "max_grad_norm": config.record_dp_max_grad_norm,
            "delta": config.record_dp_delta,
            "epsilon_budget_per_device": config.record_dp_epsilon_budget or None,
            "accountant": "opacus rdp, history carried across rounds in the device's Context.state",
            "noise_generator": RECORD_NOISE_GENERATOR,
        }
    return plan


def noise_placement(config: FedRecConfig, num_coordinates: int) -> dict:
    """Who adds user-level noise, and under SecAgg+ how the devices' shares and clip are sized."""
    if not distributed_noise(config):
        return {"noise_added_by": "server (central DP: the server sees every clipped update before adding the noise)"}
    return {
        "noise_added_by": "devices (distributed DP: each adds a share before SecAgg+ masks its update)",
        "noise_share_std_per_device": noise_share_std(config, 2),
        "noise_share_std_per_device_round_1": noise_share_std(config, 1),
        "min_survivors": min_survivors(config),
        "server_noise_std": 0.0,
        "secagg_rounding_slack": rounding_slack(config, num_coordinates),
        "device_clipping_norm": device_clipping_norm(config, num_coordinates),
        "quantized_coordinates": num_coordinates,
        "noise_limitations": (
            "the accountant treats the noise as a continuous Gaussian of std z C; each device's noisy coordinates "
            "are rounded by SecAgg+ to a grid of step quantization_step (rounding is accounted in the clip, not in "
            "the noise); devices that omit their share, or collude with the server and reveal it, leave only the "
            "honest survivors' shares: z C sqrt(honest / min_survivors)"
        ),
    }


def dataset_facts(config: FedRecConfig, prepared: PreparedData, num_clients: int) -> dict:
    """Counts only (never an identifier or an interaction) for ``dataset.json`` and reports."""
    return {
        "dataset": config.dataset,
        "users": prepared.num_users,
        "items": prepared.num_items,
        "training_interactions": len(prepared.split.train),
        "validation_users": len(prepared.validation.users),
        "test_users": len(prepared.test.users),
        "sampled_negatives": config.eval_negatives,
        "clients": num_clients,
        "partitioning": config.partitioning,
        "users_per_client": 1 if config.partitioning == "user" else config.users_per_client,
        "model": config.model,
        "embedding_dim": config.embedding_dim,
    }


def transport_facts(grid: Grid) -> dict:
    """How the ServerApp reaches the clients, as far as the ServerApp itself can tell."""
    name = type(grid).__name__
    if name == "InMemoryGrid":
        return {"grid": name, "engine": "simulation", "network": False}
    return {"grid": name, "engine": "superlink", "network": True}


def write_report_safely(run_dir: str) -> None:
    """The end-of-run report; a failure here is logged and never loses the run's results."""
    from server.report import write_report

    try:
        paths = write_report(run_dir)
    except Exception as err:  # noqa: BLE001 - the run is done; the report can be rebuilt with `fedrec report`
        log(logging.ERROR, "fedrec: privacy report failed (%s); rebuild it with `fedrec report %s`", err, run_dir)
        return
    log(logging.INFO, "fedrec: privacy report %s", paths["html"])


@dataclass
class ServerRun:
    """What :func:`start_run` set up and the rounds and :func:`finish_run` need (the Flower grid's or another driver's)."""

    config: FedRecConfig
    prepared: PreparedData
    strategy: FedRecStrategy
    recorder: RunRecorder
    rounds: int
    stop_reason: str
    resumed: ServerState | None
    nodes: NodeCount | None

    @property
    def remaining(self) -> int:
        """Rounds this process still runs (fewer after a resume)."""
        return self.rounds - self.strategy.start_round


def start_run(
    context: Context, transport: dict, grid: Grid | None = None,
    partitions: Callable[[], Mapping[int, int]] | None = None,
) -> ServerRun:
    """Everything before the first round: checks, run directory, privacy plan, the strategy.

    ``grid`` is needed in a deployment only (to check the SuperNodes); ``partitions`` tells a
    simulation's strategy which partition each node holds (default: the engine's record).
    """
    config = parse_run_config(context.run_config)
    simulated = transport["engine"] == "simulation"
    check_deployment(config, simulated)
    prepared = prepare_cached(config)
    model = build_model(config.model_config, 0, prepared.num_items, seed=config.seed)
    shared = model.shared_state()
    layout = UpdateLayout.from_state(shared, model.item_row_parameter_names(), prepared.num_items,
                                     positives=config.popularity == "positives")
    if config.model == "als":  # devices upload item-side statistics, not deltas
        layout = replace(layout, statistics=als.statistics_size(prepared.num_items, config.embedding_dim,
                                                                    private=config.user_dp))
    elif config.model == "ease":  # devices upload their Gram's upper triangle, nothing else
        layout = replace(layout, statistics=ease.gram_size(prepared.num_items), gram=True)
    num_coordinates = layout.statistics or sum(int(np.size(value)) for value in shared.values())
    check_distributed_noise(config, num_coordinates)
    dp = user_level_dp(config, dp_population(config, simulated, len(slicer_cached(config))))
    resumed = load_server_state(config.run_dir) if config.resume else None
    # In simulation every client the data makes is a SuperNode, so a round plan can be checked against them.
    check_against_data(config, prepared.num_items, len(slicer_cached(config)) if simulated else 0)
    if resumed is not None and config.record_dp and simulated:
        # Each device's record-level accountant lives in its Context, which died with the
        # simulation: resuming would restart every device's epsilon at zero.
        raise ConfigError(
            "resume with record-dp in simulation would restart every device's record-level epsilon at zero "
            "(their accountants lived in the killed process); start a new run-dir instead"
        )
    if config.resume and resumed is None:
        log(logging.WARNING, "fedrec: resume = true but %s holds no completed round; starting at round 1", config.run_dir)
    recorder = RunRecorder(
        config.run_dir, context.run_config, config.checkpoint_every, resume_after=resumed.server_round if resumed else 0
    )
    rounds, stop_reason = plan_rounds(config, dp)
    nodes = None if simulated or grid is None else check_nodes(grid, config, len(slicer_cached(config)))
    if nodes is not None:
        transport.update(nodes.facts())
    recorder.write_json("privacy.json", {**privacy_plan(config, dp, rounds, stop_reason, num_coordinates), "transport": transport})
    recorder.write_json("dataset.json", dataset_facts(config, prepared, len(slicer_cached(config))))
    if nodes is not None and nodes.missing:
        log(logging.ERROR, "fedrec: %s", nodes.message())
        refuse_if_short(nodes)
    if stop_reason:
        log(logging.WARNING, "fedrec: %s", stop_reason)
    if simulated and partitions is None:
        partitions = lambda: simulation_partitions(context)  # noqa: E731
    strategy = FedRecStrategy(
        config,
        layout,
        list(shared.values()),
        recorder,
        uploads_are_aggregated=config.secure_aggregation,
        user_dp=dp,
        num_rounds=rounds,
        # In simulation every SuperNode is one of the clients the data yields: wait for all of them.
        expected_clients=len(slicer_cached(config)) if simulated else 0,
        partitions=partitions if simulated else None,
        item_popularity=np.bincount(prepared.split.train.items, minlength=prepared.num_items),
        num_users=prepared.num_users,
    )
    if resumed is not None:
        strategy.restore(resumed)
        log(logging.INFO, "fedrec: resuming %s after round %d of %d", config.run_dir, resumed.server_round, rounds)
    log(
        logging.INFO,
        "fedrec: %s on %s (%d users, %d items; %s), %s, secure aggregation %s, run dir %s",
        config.model,
        config.dataset,
        prepared.num_users,
        prepared.num_items,
        describe_split(prepared.split_kind, config),
        strategy,
        "SecAgg+" if config.secure_aggregation else "off",
        recorder.path,
    )
    return ServerRun(config, prepared, strategy, recorder, rounds, stop_reason, resumed, nodes)


def finish_run(run: ServerRun) -> None:
    """After the last round: ``summary.json``, the report and the closing log line."""
    config, nodes, resumed = run.config, run.nodes, run.resumed
    extra: dict = {"stop_reason": run.stop_reason} if run.stop_reason else {}
    if nodes is not None and nodes.missing:  # missing-nodes = "report": the run went ahead short
        extra.update(nodes.facts())
    if resumed is not None:
        extra.update(resumed_after_round=resumed.server_round, wall_seconds_before_resume=run.strategy.elapsed_before)
    summary = run.recorder.finish(extra)
    if config.report:
        write_report_safely(config.run_dir)
    final = summary.get("final_evaluation", {})
    if nodes is not None and nodes.missing:
        log(logging.ERROR, "fedrec: this run trained without %d of %d partitions (see summary.json)", nodes.missing,
            nodes.required)
    log(
        logging.INFO,
        "fedrec: done in %.1f s; test HR@10 %.4f NDCG@10 %.4f (sampled, %.0f users); results in %s",
        summary["wall_seconds"],
        final.get("test_sampled_hr@10", float("nan")),
        final.get("test_sampled_ndcg@10", float("nan")),
        final.get("test_count", 0),
        config.run_dir,
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Train for ``num-server-rounds`` and leave a complete run directory behind."""
    use_threads()  # under `flwr run` this process was not started by fedrec's CLI
    backend = parse_run_config(context.run_config).backend
    if backend != "flower":
        raise ConfigError(f"backend = '{backend}' runs only under `fedrec simulate`; the Flower ServerApp (flwr run, "
                          "deployments) runs backend = 'flower'")
    transport = transport_facts(grid)
    run = start_run(context, transport, grid)
    config, strategy = run.config, run.strategy
    if run.remaining > 0:
        legacy_context = LegacyContext(
            context=context, config=ServerConfig(num_rounds=run.remaining), strategy=strategy
        )
        retries = config.round_retries if config.too_few_clients == "retry" else 0
        fit = retrying(fit_workflow(config), strategy, retries)
        evaluate = reporting(evaluate_workflow(config, strategy, run.prepared, len(slicer_cached(config)))
                             or default_evaluate_workflow, strategy.finish_round)
        workflow = DefaultWorkflow(fit_workflow=fit, evaluate_workflow=evaluate)
        workflow(DisclosureGrid(with_deadline(grid, config, transport["engine"]), run.recorder.path), legacy_context)
    finish_run(run)
