"""fedrec's server strategy: Flower's FedAvg / FedProx / FedAdam / FedYogi over sparse item updates.

``FedRecStrategy`` is a thin wrapper in the style of Flower's DP wrappers. It samples
clients (:mod:`server.sampling`), drops bad uploads (:mod:`server.validation`), turns the
example-weighted mean of the clients' uploads (:mod:`server.aggregate`, or SecAgg+ before
it reaches us), noised under user-level DP (:mod:`server.user_dp`), into new shared
parameters with per-item-row averaging (:mod:`common.updates`), and hands that to the
wrapped Flower strategy (:mod:`server.server_step`), whose own rule (plain average, or an
Adam/Yogi step on the pseudo-gradient) makes the final update. Each round's record
(:mod:`server.summaries`), progress line (:mod:`server.progress`) and server state
(:mod:`server.resume`, :mod:`server.run_dir`) are written here; the jobs themselves live
in those modules and this class only composes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from logging import ERROR, INFO, WARNING

import numpy as np
from flwr.common import (
    Code,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from common import ease
from common.config import FedRecConfig
from common.privacy import SecureGaussian, UserLevelDP
from common.private_eval import CATALOGUE_COUNTS_KEY
from common.secagg import distributed_noise
from common.threads import compute_processes
from common.updates import UpdateLayout, decode_mean_update
from server import popularity
from server.aggregate import in_content_order, mean_upload, weighted_mean
from server.list_metrics import counts_from_replies
from server.progress import RoundProgress, progress_line
from server.resume import model_arrays, restore_inner, restored_model
from server.round_config import for_transport_parameters, round_config
from server.run_dir import RunRecorder, ServerState, save_server_state
from server.sampling import EVALUATE, FIT, partition_order, poisson_sample, sample_size, seeded_sample
from server.secure_aggregation import SECAGG_MODULUS, check_secagg_capacity
from server.server_step import build_inner_strategy, server_learning_rate
from server.summaries import (
    describe_failure,
    evaluation_summary,
    failure_kinds,
    fit_counts,
    fit_summary,
    record_dp_summary,
    split_prefixed,
)
from server.user_dp import noise_record, privatize, solve_item_factors, user_privacy
from server.validation import Exclusions, NotExcluded, check_clipped, check_norms, validate_aggregate, validate_uploads

# Importers of this module from before it was split (tests, audits) keep working; the
# strategy calls ``privatize`` and ``SecureGaussian`` through this module's namespace.
__all__ = [
    "SECAGG_MODULUS",
    "FedRecStrategy",
    "NotExcluded",
    "SecureGaussian",
    "build_inner_strategy",
    "check_clipped",
    "check_norms",
    "check_secagg_capacity",
    "describe_failure",
    "failure_kinds",
    "in_content_order",
    "privatize",
    "progress_line",
    "split_prefixed",
    "weighted_mean",
]


class FedRecStrategy(Strategy):
    """Sampling, evaluation schedule, row-wise decoding and recording around a Flower strategy."""

    def __init__(
        self,
        config: FedRecConfig,
        layout: UpdateLayout,
        initial: list[np.ndarray],
        recorder: RunRecorder,
        *,
        uploads_are_aggregated: bool = False,
        user_dp: UserLevelDP | None = None,
        num_rounds: int | None = None,
        expected_clients: int = 0,
        partitions: Callable[[], Mapping[int, int]] | None = None,
        item_popularity: np.ndarray | None = None,
        num_users: int = 0,
    ) -> None:
        """``expected_clients`` > 0: every round waits until that many devices are connected (simulation).

        ``partitions``: node id -> partition id of the simulated devices; with it (and
        ``seeded-sampling``, no user-level DP) each round's sample is drawn from ``seed``.
        ``item_popularity`` (of ``num_users`` users): users per item in training, the
        reference of the novelty metric.
        """
        super().__init__()
        self.item_popularity = item_popularity if num_users > 0 else None
        self.num_users = num_users
        self.expected_clients = expected_clients
        self.partitions = partitions if config.seeded_sampling and user_dp is None else None
        self.config = config
        self.num_rounds = config.num_server_rounds if num_rounds is None else num_rounds
        self.user_dp = user_dp
        # Noise comes from the OS's CSPRNG and Poisson sampling from OS entropy: a seed anyone
        # can read from the run-config would let them subtract the noise again.
        self.noise_rng = SecureGaussian()
        # Under SecAgg+ the devices add the noise (distributed DP); the server adds none.
        self.noise_on_devices = user_dp is not None and distributed_noise(config)
        self.sampling_rng = np.random.default_rng()
        self.layout = layout
        self.current = [a.astype(np.float32) for a in initial]
        self.inner = build_inner_strategy(config, ndarrays_to_parameters(self.current))
        self.recorder = recorder
        self.uploads_are_aggregated = uploads_are_aggregated
        self.threads = compute_processes()  # summing uploads (FEDREC_THREADS; the mean does not depend on it)
        self._round_started = time.perf_counter()
        self._created = time.perf_counter()
        self.progress = RoundProgress(self.num_rounds)
        # Example-weighted sum of every round's touched vector: the popularity fallback.
        self.publishes_popularity = popularity.publishes_popularity(config, user_dp)
        self.touched_totals = np.zeros(layout.num_items, dtype=np.float64)
        # popularity = "positives": users with a positive per item, summed over rounds (SecAgg+: only the sum).
        self.positives_totals = np.zeros(layout.num_items, dtype=np.float64)
        self.exclusions = Exclusions(config.exclude_after_rejections)
        # EASE: the Gram is a sum over users, so rounds add up. The server keeps the running sum and
        # samples only devices that have not contributed yet: each device once, the fleet in
        # ceil(N / devices per round) rounds, after which B is exactly the centralized EASE.
        self.gram_total = np.zeros(layout.statistics, np.float64) if layout.gram else None
        self.contributed: set[int] = set()
        # Rounds an interrupted run already completed: Flower's workflow counts from 1 again,
        # fedrec's rounds (records, accounting, schedules) go on from here.
        self.start_round = 0
        self.elapsed_before = 0.0
        # Short rounds (server.fleet.retrying): the attempt, attempts left after it, whether
        # the current round has been recorded, and what was asked of it.
        self.attempt = 0
        self.attempts_left = 0
        self.round_complete = True
        self._configured_round = 0
        self._sampled = 0

    @property
    def rejections(self) -> dict[int, int]:
        """Rejected updates per node id in this run."""
        return self.exclusions.rejections

    @property
    def excluded(self) -> set[int]:
        """Node ids no longer sampled in this run."""
        return self.exclusions.excluded

    def __repr__(self) -> str:
        return f"FedRecStrategy(inner={self.inner!r}, rowwise={self.config.row_wise_aggregation})"

    # --- resuming ------------------------------------------------------------------
    def server_state(self, server_round: int) -> ServerState:
        """Everything :meth:`restore` needs to go on after ``server_round``."""
        arrays = model_arrays(self.layout.names, self.current, self.inner)
        arrays["touched_totals"] = self.touched_totals
        arrays["positives_totals"] = self.positives_totals
        facts = {
            "rejections": {str(k): v for k, v in self.rejections.items()},
            "excluded": sorted(self.excluded),
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - self._created,
            "user_dp_rounds_accounted": server_round if self.user_dp is not None else 0,
        }
        return ServerState(server_round, arrays, facts)

    def restore(self, state: ServerState) -> None:
        """Continue after ``state.server_round``: model, server optimizer, popularity sums, exclusions."""
        self.current = restored_model(state, self.layout.names, self.current)
        self.inner = build_inner_strategy(self.config, ndarrays_to_parameters(self.current))
        restore_inner(self.inner, state, self.current)
        self.touched_totals = state.arrays.get("touched_totals", self.touched_totals).astype(np.float64)
        self.positives_totals = state.arrays.get("positives_totals", self.positives_totals).astype(np.float64)
        self.exclusions.rejections = {int(k): int(v) for k, v in state.facts.get("rejections", {}).items()}
        self.exclusions.excluded = {int(n) for n in state.facts.get("excluded", [])}
        self.elapsed_before = float(state.facts.get("elapsed_seconds", 0.0))
        self.start_round = state.server_round
        self.progress.elapsed_before = self.elapsed_before

    # --- setup ---------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return ndarrays_to_parameters(self.current)

    def _sample_poisson(self, client_manager: ClientManager) -> list[ClientProxy]:
        """Each available client independently with the accountant's probability q."""
        assert self.user_dp is not None
        self._wait_for_fleet(client_manager)
        clients = list(client_manager.all().values())
        return poisson_sample(clients, self.sampling_rng, self.user_dp.sampling_rate, self.excluded)

    def _wait_for_fleet(self, client_manager: ClientManager) -> None:
        """Wait until the devices a round may sample from have connected.

        In simulation that is every SuperNode (``expected_clients``): Flower registers them
        as they start, and with 100,000 of them only a few thousand were there for round 1,
        so rounds sampled from those alone (and Poisson sampling would not have had the
        probability the accountant assumes). In a deployment, ``min-available-clients``.
        """
        client_manager.wait_for(max(self.config.min_available_clients, self.expected_clients))

    def _sample(
        self, client_manager: ClientManager, fraction: float, count: int, minimum: int, server_round: int, stream: int,
        skip: set[int] | None = None,
    ) -> list[ClientProxy]:
        """``skip``: node ids not to sample (default: the excluded ones)."""
        self._wait_for_fleet(client_manager)
        skip = self.excluded if skip is None else skip
        available = client_manager.num_available() - len(skip)
        size = sample_size(available, fraction, count, minimum, self.config.min_available_clients)
        if self.gram_total is not None:  # EASE's last devices may be fewer than a round asks for
            size = min(size, max(available, 0))
        if self.partitions is not None:
            clients = [c for c in client_manager.all().values() if c.node_id not in skip]
            ordered = partition_order(clients, self.partitions)
            if ordered is not None:
                return seeded_sample(ordered, size, self.config.seed, server_round, stream, self.attempt)
            log(WARNING, "seeded-sampling: the simulation did not say which partition every node holds; "
                "sampling at random")
            self.partitions = None
        criterion = NotExcluded(skip) if skip else None
        if size <= 0:
            return []
        return client_manager.sample(
            num_clients=size, min_num_clients=self.config.min_available_clients, criterion=criterion
        )

    # --- training ------------------------------------------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        server_round += self.start_round
        self._round_started = time.perf_counter()
        self.progress.round_started()
        if self.config.client_sampling == "poisson" and self.user_dp is not None:
            clients = self._sample_poisson(client_manager)
        else:
            skip = self.excluded | self.contributed if self.gram_total is not None else None
            clients = self._sample(
                client_manager, self.config.fraction_train, self.config.clients_per_round, self.config.min_train_clients,
                server_round, FIT, skip,
            )
            if not clients and self.gram_total is not None and self.contributed:
                log(INFO, "round %s: every device has added its Gram; EASE's weights are final", server_round)
        if self.uploads_are_aggregated:
            check_secagg_capacity(len(clients), self.config.secagg_quantization_range)
        self.round_complete, self._configured_round, self._sampled = False, server_round, len(clients)
        fit_ins = FitIns(self._for_transport(parameters), self._round_config(server_round))
        return [(client, fit_ins) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        server_round += self.start_round
        valid, rejected = self._validated(results)
        summary = fit_counts(self._sampled, len(valid), len(results), failures, rejected, len(self.excluded))
        if len(valid) < self.config.min_train_clients:
            if failures:
                log(ERROR, "round %s: first client failure: %s", server_round, describe_failure(failures[0]))
            if self.attempts_left > 0:
                log(WARNING, "round %s: %s usable updates < min-train-clients %s; running the round again (%s retries left)",
                    server_round, len(valid), self.config.min_train_clients, self.attempts_left - 1)
                return None, summary
            log(WARNING, "round %s: %s usable updates < min-train-clients; round skipped, model unchanged",
                server_round, len(valid))
            self._record_round(server_round, summary, [])
            return None, summary
        upload = mean_upload(self.config, valid, uploads_are_aggregated=self.uploads_are_aggregated,
                             threads=self.threads)
        if self.gram_total is not None:  # EASE: the touched vector (users per item) is the Gram's diagonal
            upload = [upload[0], ease.gram_diagonal(upload[0], self.layout.num_items)]
        if self.user_dp is not None:
            upload = self._privatize(upload, len(valid), server_round)
        total = sum(res.num_examples for _, res in valid)
        decoded = self._decode(upload, server_round, total)
        single = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(decoded), total, {})
        new_parameters, _ = self.inner.aggregate_fit(server_round, [(valid[0][0], single)], [])
        if new_parameters is None:
            save_server_state(self.recorder.path, self.server_state(server_round))
            return None, summary
        self.current = parameters_to_ndarrays(new_parameters)
        if self.gram_total is not None:
            self.contributed.update(proxy.node_id for proxy, _ in valid)
        if self.publishes_popularity:
            popularity.accumulate(self.touched_totals, self.positives_totals, upload, total,
                                  count_positives=self.layout.positives)
        client_metrics = [{**res.metrics, "node_id": proxy.node_id} for proxy, res in valid]
        summary.update(fit_summary(client_metrics, upload[-1]))
        summary.update(self._privacy_summary(server_round, client_metrics))
        self._record_round(server_round, summary, client_metrics)
        return new_parameters, summary

    def _decode(self, upload: list[np.ndarray], server_round: int, total: int) -> list[np.ndarray]:
        """The next shared parameters from the round's mean upload (row-wise deltas, or ALS's or EASE's solve)."""
        if not self.layout.statistics:
            lr = server_learning_rate(self.config, server_round)
            return decode_mean_update(self.layout, self.current, upload, server_learning_rate=lr)
        # ALS and EASE: every weight is 1, so the sum is the mean times the devices that made it, or
        # times the fixed denominator that privatize divided the noisy sum by.
        count = self.user_dp.expected_clients if self.user_dp is not None else total
        if self.gram_total is not None:
            self.gram_total += np.rint(upload[0] * float(count))  # whole counts (see common.ease.solve_from_sum)
            return [ease.solve_from_sum(self.gram_total, self.layout.num_items, self.config.ease_lambda)]
        return [solve_item_factors(upload[0].astype(np.float64) * count, self.layout.num_items, self.config,
                                   self.user_dp, server_round)]

    def _record_round(self, server_round: int, summary: dict[str, Scalar], client_metrics: list[dict[str, Scalar]]) -> None:
        """A finished round (trained or skipped): metrics, checkpoint, server state, progress line."""
        seconds = time.perf_counter() - self._round_started
        if self.user_dp is not None and "user_epsilon" not in summary:
            # A skipped round sampled devices as well: the accountant counts it, and so does its record.
            summary.update(self._user_privacy(server_round))
        self.recorder.round_trained(server_round, summary, client_metrics, seconds)
        self.recorder.maybe_checkpoint(server_round, self.layout.names, self.current, final=self._is_last(server_round))
        save_server_state(self.recorder.path, self.server_state(server_round))
        self.round_complete = True
        self.progress.trained(server_round, summary, seconds)

    def finish_round(self) -> None:
        """The round is over (trained and, if due, evaluated): its progress line goes to the log."""
        line = self.progress.round_finished()
        if line is not None:
            log(INFO, "%s", line)

    def record_skipped_round(self) -> None:
        """The configured round never reached aggregation (no clients, or SecAgg+ gave up): record it as skipped."""
        if self.round_complete:
            return
        log(WARNING, "round %s: no aggregate after every attempt; round skipped, model unchanged", self._configured_round)
        self._record_round(self._configured_round, {"clients_sampled": self._sampled, "clients_ok": 0}, [])

    def _for_transport(self, parameters: Parameters) -> Parameters:
        """The global model as it travels to devices (``transport-dtype``); the server keeps float32."""
        return for_transport_parameters(parameters, self.config.transport_dtype)

    def _round_config(self, server_round: int) -> dict[str, Scalar]:
        """What every request of a round carries: its number and, once known, the popular items."""
        totals = self.positives_totals if self.layout.positives else self.touched_totals
        popular = popularity.published_items(totals, self.config.popular_items) if self.publishes_popularity else None
        return round_config(server_round, self.attempt, popular)

    def _validated(
        self, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[tuple[ClientProxy, FitRes]], dict[str, int]]:
        """Drop bad uploads with a logged reason per client; count them by reason (:mod:`server.validation`)."""
        if self.uploads_are_aggregated:
            return validate_aggregate(self.layout, results)
        return validate_uploads(self.config, self.layout, self.user_dp, results, self.exclusions)

    def _privatize(self, mean: list[np.ndarray], num_clients: int, server_round: int) -> list[np.ndarray]:
        assert self.user_dp is not None
        return privatize(self.user_dp, mean, num_clients, self.noise_rng, server_round=server_round,
                         noise_on_devices=self.noise_on_devices)

    def _privacy_summary(self, server_round: int, client_metrics: list[dict[str, Scalar]]) -> dict[str, Scalar]:
        """Per-round privacy spend: user-level from the accountant, record-level from the devices."""
        summary: dict[str, Scalar] = self._user_privacy(server_round) if self.user_dp is not None else {}
        if self.user_dp is not None:
            summary.update(noise_record(self.config, self.user_dp, len(client_metrics), server_round,
                                        noise_on_devices=self.noise_on_devices))
        if self.config.record_dp:
            summary.update(record_dp_summary(self.config, client_metrics))
        return summary

    def _user_privacy(self, server_round: int) -> dict[str, Scalar]:
        """User-level epsilon after ``server_round`` rounds, with its delta and accountant."""
        assert self.user_dp is not None
        return user_privacy(self.config, self.user_dp, server_round)

    # --- evaluation ----------------------------------------------------------------
    def _is_last(self, server_round: int) -> bool:
        return server_round == self.num_rounds

    def evaluates(self, server_round: int) -> bool:
        """Whether Flower's round ``server_round`` of this process has an evaluation."""
        server_round += self.start_round
        return self._is_last(server_round) or server_round % self.config.evaluate_every == 0

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        if not self.evaluates(server_round):
            return []
        server_round += self.start_round
        last = self._is_last(server_round)
        if last and self.config.final_full_evaluation:
            self._wait_for_fleet(client_manager)
            clients = client_manager.sample(num_clients=client_manager.num_available())
        else:
            clients = self._sample(client_manager, self.config.fraction_evaluate, 0, 1, server_round, EVALUATE)
        ins = EvaluateIns(self._for_transport(parameters), self._round_config(server_round))
        return [(client, ins) for client in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        server_round += self.start_round
        if failures:
            log(WARNING, "round %s: %s evaluation failures, first: %s", server_round, len(failures), describe_failure(failures[0]))
        metrics_list = [dict(res.metrics) for _, res in results]
        counts = counts_from_replies(metrics_list, self.layout.num_items)
        return self._evaluation_summary(server_round, metrics_list, counts, len(results), len(failures))

    def aggregate_secure_evaluate(
        self, server_round: int, sums: dict[str, float | np.ndarray] | None, devices: int, failures: int
    ) -> dict[str, Scalar]:
        """A round's evaluation from SecAgg+'s sum of the devices' evaluation vectors (None: no sum came).

        The sum has the keys of one device's reply, so it goes the same way as the plain
        replies; the catalogue counts arrive already summed.
        """
        server_round += self.start_round
        sums = dict(sums or {})
        counts = sums.pop(CATALOGUE_COUNTS_KEY, None)
        metrics_list = [sums] if sums else []
        _, summary = self._evaluation_summary(server_round, metrics_list, counts, devices, failures)  # type: ignore[arg-type]
        return summary

    def _evaluation_summary(
        self, server_round: int, metrics_list: list[dict[str, Scalar]], counts: np.ndarray | None, devices: int,
        failures: int,
    ) -> tuple[float | None, dict[str, Scalar]]:
        summary = evaluation_summary(
            self.config, metrics_list, counts, devices, failures, item_popularity=self.item_popularity,
            num_users=self.num_users, whole_population=self._is_last(server_round) and self.config.final_full_evaluation,
        )
        self.recorder.round_evaluated(server_round, summary)
        self.progress.evaluated(summary)
        loss = summary.get("test_loss")
        return (float(loss) if loss is not None else None), summary

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation: the server has no user embeddings to score with."""
        return None
