"""fedrec's server strategy: Flower's FedAvg / FedProx / FedAdam / FedYogi over sparse item updates.

``FedRecStrategy`` is a thin wrapper in the style of Flower's DP wrappers. It samples
clients, turns the example-weighted mean of the clients' uploads (computed here, or by
SecAgg+ before it reaches us) into new shared parameters with per-item-row averaging
(:mod:`common.updates`), and hands that to the wrapped Flower strategy, whose own rule
(plain average, or an Adam/Yogi step on the pseudo-gradient) makes the final update.
"""

from __future__ import annotations

import hashlib
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
from flwr.server.criterion import Criterion
from flwr.server.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy
from flwr.supercore.differential_privacy import get_norm

from common.config import FLEET_FAILURE_PREFIX, ROUND_ATTEMPT_KEY, FedRecConfig
from common.metrics import merge_sums
from common.privacy import SecureGaussian, UserLevelDP
from common.private_eval import CATALOGUE_COUNTS_KEY
from common.secagg import distributed_noise, noise_multiplier_present
from common.updates import (
    POPULAR_ITEMS_KEY,
    REJECTION_REASONS,
    UpdateLayout,
    UpdateRejected,
    decode_mean_update,
    delta_norm,
    encode_item_list,
    for_transport,
    popular_items,
    validate_upload,
)
from server.list_metrics import catalogue_summary, counts_from_replies, group_summary
from server.progress import RoundProgress, progress_line  # noqa: F401 - progress_line: re-exported
from server.robust import robust_mean
from server.run_dir import RunRecorder, ServerState, save_server_state
from server.sampling import EVALUATE, FIT, partition_order, seeded_sample


def build_inner_strategy(config: FedRecConfig, initial: Parameters) -> Strategy:
    """The Flower strategy that turns the decoded mean into the next global model."""
    common = dict(initial_parameters=initial, accept_failures=True)
    if config.strategy == "fedavg":
        return FedAvg(**common)
    if config.strategy == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.strategy == "fedadam":
        return FedAdam(eta=config.server_eta, **common)
    return FedYogi(eta=config.server_eta, **common)


def in_content_order(results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, FitRes]]:
    """Results sorted by their uploads' content, not their arrival: aggregates are then the same
    bit for bit however the clients' replies interleave."""
    return sorted(results, key=lambda item: _content_digest(item[1].parameters))


def _content_digest(parameters: Parameters) -> bytes:
    """SHA-256 over the upload's buffers (hardware-accelerated: 1.5 ms for a 2.6 MB upload, blake2b took 5)."""
    digest = hashlib.sha256()
    for tensor in parameters.tensors:
        digest.update(tensor)
    return digest.digest()


def weighted_mean(results: list[tuple[ClientProxy, FitRes]]) -> list[np.ndarray]:
    """Example-weighted mean of the uploads: what SecAgg+ would hand us, computed in the clear.

    Summed in an order fixed by the uploads' content, not by their arrival, so a run with the
    same seed gives the same model bit for bit however the clients' replies interleave.
    """
    total = float(sum(res.num_examples for _, res in results))
    mean: list[np.ndarray] | None = None
    for _, res in in_content_order(results):
        arrays = parameters_to_ndarrays(res.parameters)
        weight = res.num_examples / total
        if mean is None:
            mean = [a.astype(np.float64) * weight for a in arrays]
        else:
            for acc, a in zip(mean, arrays, strict=True):
                acc += a * weight
    assert mean is not None
    return mean


SECAGG_MODULUS = 2**32  # SecAggPlusWorkflow's default modulus_range


def check_secagg_capacity(num_clients: int, quantization_range: int) -> None:
    """SecAgg+ sums quantized uploads modulo 2**32; too many clients would wrap around silently."""
    if num_clients * quantization_range >= SECAGG_MODULUS:
        raise ValueError(
            f"{num_clients} clients per round x secagg-quantization-range {quantization_range} overflows "
            f"SecAgg+'s modulus 2**32; lower secagg-quantization-range to below {SECAGG_MODULUS // num_clients} "
            "or sample fewer clients per round"
        )


def check_clipped(upload: list[np.ndarray], clipping_norm: float, slack: float = 1e-4) -> None:
    """Under user-level DP every client's deltas (all but the touched vector) have norm <= C."""
    norm = get_norm(upload[:-1])
    if norm > clipping_norm * (1 + slack):
        raise UpdateRejected("clipping", f"update norm {norm:.6g} exceeds the user-dp clipping norm {clipping_norm}")
    if not np.all(upload[-1] == 1.0):
        raise UpdateRejected(
            "clipping", "under user-dp the touched vector must be all ones (it would leak which items were trained)"
        )


def check_norms(norms: list[float], max_norm: float, factor: float) -> list[str | None]:
    """Per update, why its delta norm is absurd (None: fine).

    Two rules: an absolute ceiling, and a multiple of the round's median norm, which adapts
    to the dataset and model (a heavy user's honest update is tens of times the median, a
    boosted poisoning update is orders of magnitude above it; on MovieLens-100K the heaviest
    honest user's first update is 33x the median, 3.5x by round 100, hence the default of 100). The rule needs at
    least 5 updates for the median to mean anything.
    """
    median = float(np.median(norms)) if len(norms) >= 5 else 0.0
    reasons: list[str | None] = []
    for norm in norms:
        if max_norm > 0 and norm > max_norm:
            reasons.append(f"update norm {norm:.4g} exceeds max-update-norm {max_norm:g}")
        elif factor > 0 and median > 0 and norm > factor * median:
            reasons.append(f"update norm {norm:.4g} exceeds {factor:g} x the round's median norm {median:.4g}")
        else:
            reasons.append(None)
    return reasons


class NotExcluded(Criterion):
    """Sampling criterion: nodes the strategy has excluded for repeated bad updates are skipped."""

    def __init__(self, excluded: set[int]) -> None:
        self.excluded = excluded

    def select(self, client: ClientProxy) -> bool:
        return client.node_id not in self.excluded


def privatize(
    dp: UserLevelDP,
    mean_upload: list[np.ndarray],
    num_clients: int,
    rng: np.random.Generator | SecureGaussian,
    *,
    noise_on_devices: bool = False,
) -> list[np.ndarray]:
    """DP-FedAvg on the aggregate: noise on the sum of clipped deltas, fixed denominator.

    The sum is recovered from the mean over the ``num_clients`` clients that made it (all
    weights are 1 under user-level DP), gets Gaussian noise of std ``z * C`` from ``rng``
    (central DP), and is divided by the *expected* number of clients, which does not depend
    on who took part. With ``noise_on_devices`` (distributed DP under SecAgg+) the sum
    already carries the devices' noise shares and the server adds none. The touched
    vector is all ones by construction and is not data: it is reset, not noised.
    """
    noisy = []
    for delta in mean_upload[:-1]:
        total = delta.astype(np.float64) * num_clients
        if not noise_on_devices:
            total += rng.normal(0.0, dp.noise_std, size=total.shape)
        noisy.append(total / dp.expected_clients)
    return [*noisy, np.ones_like(mean_upload[-1], dtype=np.float64)]


def describe_failure(failure: tuple[ClientProxy, FitRes | EvaluateRes] | BaseException) -> str:
    """One line on why a client failed, for the server log."""
    if isinstance(failure, BaseException):
        text = str(failure)
        if "Message:" in text:  # Ray wraps the ClientApp's exception in a long traceback
            text = text.rsplit("Message:", 1)[1]
        text = text.replace("\\n", "\n").strip().split("\n")[0]
        return text.strip(" '\"<>") or repr(failure)
    return f"node {failure[0].node_id}: {failure[1].status.message}"


def failure_kinds(failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> dict[str, int]:
    """Failed replies by kind: devices a simulated fleet made absent or late (``client.fleet``)."""
    texts = [describe_failure(failure) for failure in failures]
    late = sum(FLEET_FAILURE_PREFIX in text and "deadline" in text for text in texts)
    absent = sum(FLEET_FAILURE_PREFIX in text for text in texts) - late
    return {"clients_unavailable": absent, "clients_late": late} if failures else {}


def split_prefixed(metrics: list[dict[str, Scalar]], prefix: str) -> list[dict[str, float]]:
    """Per-client sums under ``prefix_`` with the prefix removed (for :func:`merge_sums`)."""
    parts = []
    for m in metrics:
        part = {k[len(prefix) + 1 :]: float(v) for k, v in m.items() if k.startswith(prefix + "_")}
        if part.get("count", 0) > 0:
            parts.append(part)
    return parts


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
        self._round_started = time.perf_counter()
        self._created = time.perf_counter()
        self.progress = RoundProgress(self.num_rounds)
        # Example-weighted sum of every round's touched vector: the popularity fallback.
        # Under either DP (or whole-table averaging) the touched vector is all ones and
        # says nothing, so nothing is published.
        self.publishes_popularity = (
            config.popular_items > 0 and config.row_wise_aggregation and user_dp is None and not config.record_dp
        )
        self.touched_totals = np.zeros(layout.num_items, dtype=np.float64)
        # popularity = "positives": users with a positive per item, summed over rounds (SecAgg+: only the sum).
        self.positives_totals = np.zeros(layout.num_items, dtype=np.float64)
        self.rejections: dict[int, int] = {}
        self.excluded: set[int] = set()
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

    def __repr__(self) -> str:
        return f"FedRecStrategy(inner={self.inner!r}, rowwise={self.config.row_wise_aggregation})"

    # --- resuming ------------------------------------------------------------------
    def server_state(self, server_round: int) -> ServerState:
        """Everything :meth:`restore` needs to go on after ``server_round``."""
        arrays = {f"shared/{name}": value for name, value in zip(self.layout.names, self.current, strict=True)}
        for slot in ("m_t", "v_t"):  # FedAdam / FedYogi's moments (absent for FedAvg / FedProx)
            for index, value in enumerate(getattr(self.inner, slot, None) or []):
                arrays[f"inner/{slot}/{index}"] = np.asarray(value)
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
        names = [f"shared/{name}" for name in self.layout.names]
        missing = [n for n in names if n not in state.arrays]
        if missing:
            raise ValueError(f"server state lacks {', '.join(missing)}: it belongs to another model")
        restored = [state.arrays[n] for n in names]  # dtype as saved: bit for bit
        if [a.shape for a in restored] != [a.shape for a in self.current]:
            raise ValueError("server state has other shapes than this run's model: it belongs to another run")
        self.current = restored
        self.inner = build_inner_strategy(self.config, ndarrays_to_parameters(self.current))
        if hasattr(self.inner, "current_weights"):
            self.inner.current_weights = [a.copy() for a in self.current]
        for slot in ("m_t", "v_t"):
            moments = [state.arrays[f"inner/{slot}/{i}"] for i in range(len(names)) if f"inner/{slot}/{i}" in state.arrays]
            if moments and hasattr(self.inner, slot):
                setattr(self.inner, slot, moments)
        self.touched_totals = state.arrays.get("touched_totals", self.touched_totals).astype(np.float64)
        self.positives_totals = state.arrays.get("positives_totals", self.positives_totals).astype(np.float64)
        self.rejections = {int(k): int(v) for k, v in state.facts.get("rejections", {}).items()}
        self.excluded = {int(n) for n in state.facts.get("excluded", [])}
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
        clients = sorted(client_manager.all().values(), key=lambda proxy: proxy.cid)
        chosen = self.sampling_rng.random(len(clients)) < self.user_dp.sampling_rate
        return [client for client, keep in zip(clients, chosen, strict=True) if keep and client.node_id not in self.excluded]

    def _wait_for_fleet(self, client_manager: ClientManager) -> None:
        """Wait until the devices a round may sample from have connected.

        In simulation that is every SuperNode (``expected_clients``): Flower registers them
        as they start, and with 100,000 of them only a few thousand were there for round 1,
        so rounds sampled from those alone (and Poisson sampling would not have had the
        probability the accountant assumes). In a deployment, ``min-available-clients``.
        """
        client_manager.wait_for(max(self.config.min_available_clients, self.expected_clients))

    def _sample(
        self, client_manager: ClientManager, fraction: float, count: int, minimum: int, server_round: int, stream: int
    ) -> list[ClientProxy]:
        self._wait_for_fleet(client_manager)
        available = client_manager.num_available() - len(self.excluded)
        size = count if count > 0 else max(int(available * fraction), minimum)
        # Never ask for more clients than will be there: Flower's sampler returns none then.
        size = min(size, max(available, self.config.min_available_clients))
        if self.partitions is not None:
            clients = [c for c in client_manager.all().values() if c.node_id not in self.excluded]
            ordered = partition_order(clients, self.partitions)
            if ordered is not None:
                return seeded_sample(ordered, size, self.config.seed, server_round, stream, self.attempt)
            log(WARNING, "seeded-sampling: the simulation did not say which partition every node holds; "
                "sampling at random")
            self.partitions = None
        criterion = NotExcluded(self.excluded) if self.excluded else None
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
            clients = self._sample(
                client_manager, self.config.fraction_train, self.config.clients_per_round, self.config.min_train_clients,
                server_round, FIT,
            )
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
        summary: dict[str, Scalar] = {
            "clients_sampled": self._sampled,
            "clients_ok": len(valid),
            "clients_failed": len(failures),
            **failure_kinds(failures),
            # Sampled devices whose reply never came (a deployment's round-deadline passed).
            "clients_no_reply": max(0, self._sampled - len(results) - len(failures)),
            "clients_rejected": sum(rejected.values()),
            **{f"rejected_{reason}": count for reason, count in rejected.items()},
            "clients_excluded": len(self.excluded),
        }
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
        mean_upload = self._aggregate(valid)
        if self.user_dp is not None:
            mean_upload = self._privatize(mean_upload, len(valid))
        lr = self.config.server_step(server_round) if self.config.strategy in ("fedavg", "fedprox") else 1.0
        decoded = decode_mean_update(self.layout, self.current, mean_upload, server_learning_rate=lr)
        total = sum(res.num_examples for _, res in valid)
        single = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(decoded), total, {})
        new_parameters, _ = self.inner.aggregate_fit(server_round, [(valid[0][0], single)], [])
        if new_parameters is None:
            save_server_state(self.recorder.path, self.server_state(server_round))
            return None, summary
        self.current = parameters_to_ndarrays(new_parameters)
        if self.publishes_popularity:
            self.touched_totals += mean_upload[-1].astype(np.float64) * total
            if self.layout.positives:
                self.positives_totals += mean_upload[-2].astype(np.float64) * total
        client_metrics = [{**res.metrics, "node_id": proxy.node_id} for proxy, res in valid]
        summary.update(self._fit_summary(client_metrics, mean_upload[-1]))
        summary.update(self._privacy_summary(server_round, client_metrics))
        self._record_round(server_round, summary, client_metrics)
        return new_parameters, summary

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
        if self.config.transport_dtype == "float32":
            return parameters
        return ndarrays_to_parameters(for_transport(parameters_to_ndarrays(parameters), self.config.transport_dtype))

    def _round_config(self, server_round: int) -> dict[str, Scalar]:
        """What every request of a round carries: its number and, once known, the popular items."""
        config: dict[str, Scalar] = {"server-round": server_round}
        if self.attempt:  # a retried round: devices know it is another try (client.fleet draws anew)
            config[ROUND_ATTEMPT_KEY] = self.attempt
        totals = self.positives_totals if self.layout.positives else self.touched_totals
        if self.publishes_popularity and totals.any():
            config[POPULAR_ITEMS_KEY] = encode_item_list(popular_items(totals, self.config.popular_items))
        return config

    def _aggregate(self, valid: list[tuple[ClientProxy, FitRes]]) -> list[np.ndarray]:
        """The round's mean upload: SecAgg+'s sum, the weighted mean, or a robust rule's stand-in."""
        if self.uploads_are_aggregated:
            return parameters_to_ndarrays(valid[0][1].parameters)
        if self.config.aggregation == "mean" and self.config.norm_bound == 0:
            return weighted_mean(valid)
        ordered = in_content_order(valid)
        # float16 uploads (transport-dtype) are widened: Flower's rules compute in the input's dtype.
        uploads = [[a.astype(np.float32) for a in parameters_to_ndarrays(res.parameters)] for _, res in ordered]
        return robust_mean(self.config, uploads, [res.num_examples for _, res in ordered])

    def _validated(
        self, results: list[tuple[ClientProxy, FitRes]]
    ) -> tuple[list[tuple[ClientProxy, FitRes]], dict[str, int]]:
        """Drop bad uploads with a logged reason per client; count them by reason.

        Structure first (arrays, shapes, dtypes, NaN/Inf, touched flags, example count, the
        user-dp clipping), then the norm rules over the structurally sound ones. A node
        rejected ``exclude-after-rejections`` times is not sampled again in this run.
        """
        rejected = dict.fromkeys(REJECTION_REASONS, 0)
        if self.uploads_are_aggregated:
            # One masked sum for all clients: only the aggregate itself can be checked.
            try:
                if results:
                    validate_upload(self.layout, parameters_to_ndarrays(results[0][1].parameters), one_client=False)
            except UpdateRejected as err:
                log(ERROR, "rejecting the securely aggregated update: %s", err)
                rejected[err.reason] = len(results)
                return [], rejected
            return results, rejected
        sound, norms = [], []
        for proxy, res in results:
            try:
                if res.num_examples <= 0:
                    raise UpdateRejected("no_examples", "reported no training examples")
                upload = parameters_to_ndarrays(res.parameters)
                validate_upload(self.layout, upload, positives_per_example=self.config.client_weight == "examples")
                if self.user_dp is not None:
                    check_clipped(upload, self.user_dp.clipping_norm)
            except UpdateRejected as err:
                self._reject(proxy, err.reason, str(err), rejected)
                continue
            sound.append((proxy, res))
            norms.append(delta_norm(upload, self.layout))
        valid = []
        for (proxy, res), why in zip(sound, check_norms(norms, self.config.max_update_norm, self.config.reject_norm_factor), strict=True):
            if why is None:
                valid.append((proxy, res))
            else:
                self._reject(proxy, "norm", why, rejected)
        return valid, rejected

    def _reject(self, proxy: ClientProxy, reason: str, message: str, counts: dict[str, int]) -> None:
        counts[reason] += 1
        strikes = self.rejections.get(proxy.node_id, 0) + 1
        self.rejections[proxy.node_id] = strikes
        limit = self.config.exclude_after_rejections
        log(WARNING, "rejecting update from node %s (%s): %s", proxy.node_id, reason, message)
        if limit > 0 and strikes >= limit and proxy.node_id not in self.excluded:
            self.excluded.add(proxy.node_id)
            log(WARNING, "node %s excluded for the rest of the run after %s rejected updates", proxy.node_id, strikes)

    def _privatize(self, mean_upload: list[np.ndarray], num_clients: int) -> list[np.ndarray]:
        assert self.user_dp is not None
        return privatize(self.user_dp, mean_upload, num_clients, self.noise_rng, noise_on_devices=self.noise_on_devices)

    def _privacy_summary(self, server_round: int, client_metrics: list[dict[str, Scalar]]) -> dict[str, Scalar]:
        """Per-round privacy spend: user-level from the accountant, record-level from the devices."""
        summary: dict[str, Scalar] = self._user_privacy(server_round) if self.user_dp is not None else {}
        if self.user_dp is not None:
            summary.update(self._noise_record(len(client_metrics)))
        if self.config.record_dp:
            spent = [float(m["record_epsilon"]) for m in client_metrics if "record_epsilon" in m]
            summary["record_epsilon_max"] = max(spent) if spent else 0.0
            summary["record_epsilon_mean"] = float(np.mean(spent)) if spent else 0.0
            summary["record_delta"] = self.config.record_dp_delta
            summary["record_dp_declined"] = int(sum(float(m.get("record_dp_declined", 0)) for m in client_metrics))
        return summary

    def _noise_record(self, survivors: int) -> dict[str, Scalar]:
        """The user-level noise this round's release really carries, and who added it.

        Distributed: ``survivors`` devices' shares, multiplier ``z sqrt(k / t)`` (the
        accountant keeps ``z``, a lower bound since ``k >= t``). Central: ``z`` from the server.
        """
        assert self.user_dp is not None
        if self.noise_on_devices:
            return {"user_noise_added_by": "devices", "server_noise_std": 0.0,
                    "noise_multiplier_present": noise_multiplier_present(self.config, survivors)}
        return {"user_noise_added_by": "server", "server_noise_std": self.user_dp.noise_std,
                "noise_multiplier_present": self.user_dp.noise_multiplier}

    def _user_privacy(self, server_round: int) -> dict[str, Scalar]:
        """User-level epsilon after ``server_round`` rounds, with its delta and accountant."""
        assert self.user_dp is not None
        return {
            "user_epsilon": self.user_dp.epsilon(server_round, self.config.user_dp_accountant),
            "user_delta": self.user_dp.target_delta,
            "user_accountant": self.config.user_dp_accountant,
        }

    @staticmethod
    def _fit_summary(client_metrics: list[dict[str, Scalar]], mean_touched: np.ndarray) -> dict[str, Scalar]:
        def mean(key: str) -> float:
            values = [float(m[key]) for m in client_metrics if key in m]
            return float(np.mean(values)) if values else float("nan")

        return {
            "train_loss": mean("train_loss"),
            "client_train_seconds": mean("train_seconds"),
            "upload_bytes_per_client": mean("upload_bytes"),
            "download_bytes_per_client": mean("download_bytes"),
            "items_touched_per_client": mean("items_touched"),
            "item_rows_updated": int(np.count_nonzero(mean_touched)),
        }

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
        summary: dict[str, Scalar] = {"eval_clients": devices, "eval_failures": failures}
        for prefix in ("test", "val", "new", "exposure"):
            merged = merge_sums(split_prefixed(metrics_list, prefix))
            summary.update({f"{prefix}_{k}": v for k, v in merged.items()})
        if counts is not None:
            summary.update(catalogue_summary(counts, self.item_popularity, self.num_users))
        if self.config.group_min_users > 0:
            summary.update(group_summary(metrics_list, self.config.group_min_users))
        if self._is_last(server_round) and self.config.final_full_evaluation:
            summary["eval_population"] = "all"
        self.recorder.round_evaluated(server_round, summary)
        self.progress.evaluated(summary)
        loss = summary.get("test_loss")
        return (float(loss) if loss is not None else None), summary

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation: the server has no user embeddings to score with."""
        return None
