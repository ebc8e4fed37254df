"""``backend = "vectorized"``: the same run as ``fedrec simulate``, without one Flower message per device.

On Flower's Simulation Engine every device is a ClientApp that gets and answers messages;
at one device per message that costs 12 to 20 ms here (``simulations.bench_fleet``, mode
``noop``), while a device's training at MovieLens-1M size takes a few milliseconds. This
backend keeps everything the server does and replaces only the devices:

- the server is the ServerApp's own: :func:`server.server_app.start_run` builds the same
  strategy, run directory and privacy plan, and each round calls the strategy's
  ``configure_fit`` / ``aggregate_fit`` / ``configure_evaluate`` / ``aggregate_evaluate``
  as Flower's ``DefaultWorkflow`` does (sampling, validation, robust rules, user-level
  clipping and noise, the server step, evaluation, metrics and privacy records), with
  ``FitRes`` / ``EvaluateRes`` built in-process;
- ALS devices run their own closed-form round one after the other (:mod:`simulations.batched_als`);
- the sampled GMF / MF devices train together (:mod:`simulations.batched`), each with its own
  user rows, optimizer state, examples and random streams, and each encodes its own
  upload as the ClientApp does (:mod:`common.updates`, :mod:`client.upload`); a large
  round's batches are shared among ``FEDREC_THREADS`` forked workers
  (:mod:`simulations.forked`), the same model bit for bit for any number of them;
- the simulated fleet (dropouts, late joiners, leavers, uneven epochs) is
  :mod:`client.fleet`'s, drawn from the same seeds;
- evaluation runs :class:`client.numpy_client.FedRecClient`'s own code per device (user
  rows re-fitted in batches first when ``eval-refit-epochs`` > 0).

What cannot be reproduced is refused with one line (:func:`check_supported`): SecAgg+
(the server would get a sum quantized and masked by Flower's protocol, which this backend
does not run), record-level DP (Opacus, per device), models other than GMF, MF and ALS, hybrid
(item-features) models, FedProx's proximal term and the wall-clock ``round-deadline``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import Context, Error, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import (
    Code,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
    parameters_to_ndarrays,
)
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from client.device_state import save_local_state
from client.fleet import absence, round_epochs
from client.local import client_key, user_seed
from client.numpy_client import FedRecClient
from client.upload import clipping_norm_for, finish_reply
from common.config import FLEET_FAILURE_PREFIX, ROUND_ATTEMPT_KEY, ConfigError, FedRecConfig, parse_run_config
from common.federation import ClientData, slicer_cached
from common.models import ModelConfig, build_model
from common.threads import compute_processes, use_threads
from common.training import TrainConfig
from common.updates import UpdateLayout, clip_deltas, encode_update, positive_counts
from common.wire import TENSOR_TYPE, tensor_parts
from server.disclosure import ReceivedFields
from server.fleet import retrying
from server.server_app import ServerRun, finish_run, start_run
from simulations.batched import BATCHED_MODELS, BatchTrainer, batches, device_round, planned_size
from simulations.forked import SharedRegions, forked_results

TRANSPORT = {"grid": "vectorized", "engine": "simulation", "network": False}


def check_supported(config: FedRecConfig) -> None:
    """One line naming the key and the values this backend supports, for what it cannot reproduce."""
    refuse = "backend = 'vectorized' "
    if config.model not in (*BATCHED_MODELS, "als"):
        raise ConfigError(f"{refuse}trains model = 'gmf', 'mf' or 'als', got model = '{config.model}'; use backend = 'flower'")
    if config.secure_aggregation:
        raise ConfigError(f"{refuse}cannot reproduce SecAgg+'s quantized, masked sum: secure-aggregation must be false "
                          "(or use backend = 'flower')")
    if config.record_dp:
        raise ConfigError(f"{refuse}does not run Opacus' per-device DP-SGD: record-dp must be false "
                          "(or use backend = 'flower')")
    if config.item_features:
        raise ConfigError(f"{refuse}trains pure collaborative models: item-features must be false "
                          "(or use backend = 'flower')")
    if config.train_config.proximal_mu > 0:
        raise ConfigError(f"{refuse}has no proximal term: with strategy = 'fedprox' set proximal-mu = 0, or use "
                          "strategy = 'fedavg', 'fedadam' or 'fedyogi' (or backend = 'flower')")
    if config.round_deadline > 0:
        raise ConfigError(f"{refuse}has no per-device wall clock: round-deadline must be 0 (or use backend = 'flower')")


class DeviceProxy(ClientProxy):
    """A simulated device as the strategy sees it: a node id; nothing is ever sent to it."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = node_id

    def get_properties(self, ins, timeout, group_id):  # type: ignore[no-untyped-def]
        raise NotImplementedError("the vectorized backend trains devices in-process")

    get_parameters = fit = evaluate = reconnect = get_properties


def node_of(partition: int) -> int:
    """The node id of a partition's device (never 0, the SuperLink's own id in Flower)."""
    return partition + 1


# A round is split among forked workers only with at least this many devices per worker (a fork
# and its copy-on-write faults cost tens of milliseconds; a device's training about one).
MIN_DEVICES_PER_WORKER = 64


def round_workers(devices: int) -> int:
    """How many forked workers train a round of ``devices`` devices: ``FEDREC_THREADS`` of them (all the
    cores this process may use when it is 0), fewer for a small round, 1 (in this process) for the smallest."""
    wanted = compute_processes()
    return max(1, min(wanted, devices // MIN_DEVICES_PER_WORKER))


# A batch's cost for balancing workers: per device its steps x rows (what the optimizer steps) plus
# this much for its plan, reply and upload (about as long as stepping 5,000 rows at MovieLens-1M
# shape: 0.9 against 0.8 ms per device, cProfile of a worker).
DEVICE_COST = 5000


def balanced_shares(costs: list[int], workers: int) -> list[list[int]]:
    """Batch indices per worker, each batch to the worker with the least cost so far (largest batches first)."""
    shares: list[list[int]] = [[] for _ in range(workers)]
    loads = [0] * workers
    for batch in sorted(range(len(costs)), key=lambda b: -costs[b]):
        least = loads.index(min(loads))
        shares[least].append(batch)
        loads[least] += costs[batch]
    return [sorted(share) for share in shares]


def upload_bytes(layout: UpdateLayout, config: FedRecConfig) -> int:
    """The bytes of one device's upload as it travels (its arrays in the transport dtype, with their headers)."""
    dtype = np.float16 if config.transport_dtype == "float16" else np.float32
    return sum(sum(memoryview(part).nbytes for part in tensor_parts(np.zeros(shape, dtype)))
               for shape in layout.upload_shapes())


def fresh_user_rows(model_config: ModelConfig, num_users: int, seed: int) -> dict[str, np.ndarray]:
    """A new device's user rows, the draws ``build_model(..., seed=seed)`` makes for them.

    The user embedding is the first table of GMF and MF: ``nn.Embedding`` draws it from
    N(0, 1), then ``_embedding`` redraws it with ``init-std``; MF's user bias is drawn with
    std 0 (zeros). A private generator with the same seed gives the same numbers without
    reseeding torch's global generator (which costs milliseconds per call).
    """
    generator = torch.Generator().manual_seed(seed)
    table = torch.empty(num_users, model_config.embedding_dim)
    table.normal_(0.0, 1.0, generator=generator)
    table.normal_(0.0, model_config.init_std, generator=generator)
    rows = {"user_embedding.weight": table.numpy()}
    if model_config.name == "mf":
        rows["user_bias.weight"] = np.zeros((num_users, 1), np.float32)
    return rows


class Fleet:
    """Every simulated device's data and the state it keeps between rounds (its user rows)."""

    def __init__(self, config: FedRecConfig, run_config: Mapping[str, Any]) -> None:
        self.config, self.run_config = config, dict(run_config)
        self.slicer = slicer_cached(config)
        self.user_rows: dict[int, dict[str, np.ndarray]] = {}
        self._data: dict[int, ClientData] = {}
        self._uploads = SharedRegions()  # the forked workers' uploads, one region per device of a round

    def __len__(self) -> int:
        return len(self.slicer)

    def data(self, partition: int) -> ClientData:
        if partition not in self._data:
            self._data[partition] = self.slicer.client(partition)
        return self._data[partition]

    def rows_of(self, partition: int) -> dict[str, np.ndarray]:
        """The device's user rows: kept from its last round, else drawn as :func:`client.local.build_local_model` draws them."""
        if partition not in self.user_rows:
            data = self.data(partition)
            return fresh_user_rows(self.config.model_config, data.num_users, user_seed(self.config.seed, data))
        return self.user_rows[partition]

    # --- training ----------------------------------------------------------------
    def fit(self, instructions: list[tuple[ClientProxy, FitIns]]) -> tuple[list, list]:
        """Every instructed device's reply: a ``FitRes`` as the ClientApp's, or the fleet's refusal."""
        results: list[tuple[ClientProxy, FitRes]] = []
        failures: list[BaseException] = []
        if not instructions:
            return results, failures
        fit_ins = instructions[0][1]
        shared = parameters_to_ndarrays(fit_ins.parameters)
        config = fit_ins.config
        server_round, attempt = int(config.get("server-round", 0)), int(config.get(ROUND_ATTEMPT_KEY, 0))
        present: list[tuple[ClientProxy, int, TrainConfig]] = []
        for proxy, _ in instructions:
            partition = proxy.node_id - 1
            why = absence(self.config, partition, server_round, attempt)
            if why:
                failures.append(Exception(Error(ErrorCode.NODE_UNAVAILABLE, f"{FLEET_FAILURE_PREFIX} {why}")))
                continue
            epochs = round_epochs(self.config, partition, server_round)
            present.append((proxy, partition, replace(self.config.train_config, epochs=epochs)))
        results = self._train(present, shared, server_round)
        return results, failures

    def _train(self, present: list[tuple[ClientProxy, int, TrainConfig]], shared: list[np.ndarray],
               server_round: int) -> list[tuple[ClientProxy, FitRes]]:
        """Every present device's reply, in the order given; batches in forked workers when the round is large.

        The batches are fixed here from the devices' sizes alone (:func:`simulations.batched.planned_size`),
        so a device trains beside the same devices however many workers share the round: the
        model is the same bit for bit for any ``FEDREC_THREADS``.
        """
        model = build_model(self.config.model_config, 1, 1)
        names = model.shared_parameter_names()
        before = {name: np.asarray(value, dtype=np.float32) for name, value in zip(names, shared, strict=True)}
        layout = UpdateLayout.from_state(before, model.item_row_parameter_names(), self.slicer.prepared.num_items,
                                         positives=self.config.popularity == "positives")
        # Devices with the same number of epochs train together (the batch's optimizer steps line up by step).
        by_epochs: dict[int, list[tuple[int, int, TrainConfig]]] = {}
        for position, (_, partition, train_config) in enumerate(present):
            by_epochs.setdefault(train_config.epochs, []).append((position, partition, train_config))
        planned: list[list[tuple[int, int, TrainConfig]]] = []
        costs: list[int] = []
        for group in by_epochs.values():
            sizes = [planned_size(self.data(partition), train_config) for _, partition, train_config in group]
            for batch in batches([s for s, _ in sizes], [r for _, r in sizes]):
                planned.append([group[i] for i in batch])
                costs.append(sum(sizes[i][0] * sizes[i][1] + DEVICE_COST for i in batch))
        workers = round_workers(len(present))
        shares = balanced_shares(costs, workers)

        def share(index: int) -> Iterator[tuple[tuple[int, int, dict, dict[str, np.ndarray]], list[list]]]:
            return self._train_batches([planned[b] for b in shares[index]], layout, before, shared, server_round)

        replies: dict[int, FitRes] = {}
        region = upload_bytes(layout, self.config)
        sizes = [sum(len(planned[b]) for b in batches_of) for batches_of in shares]
        stream = forked_results(share, sizes, self._uploads.claim(len(present) * region), region) if workers > 1 \
            else ((small, [b"".join(parts) for parts in tensors]) for small, tensors in share(0))
        for (position, weight, metrics, user_rows), tensors in stream:
            self.user_rows[present[position][1]] = user_rows
            replies[position] = FitRes(Status(Code.OK, ""), Parameters(tensors, TENSOR_TYPE), weight, metrics)
        return [(present[position][0], replies[position]) for position in sorted(replies)]

    def _train_batches(self, planned: list[list[tuple[int, int, TrainConfig]]], layout: UpdateLayout,
                       before: dict[str, np.ndarray], shared: list[np.ndarray],
                       server_round: int) -> Iterator[tuple[tuple[int, int, dict, dict[str, np.ndarray]], list[list]]]:
        """Each device's ``((position, weight, metrics, user rows after), upload)`` for every batch of
        ``(position, partition, config)``; the upload as each tensor's buffers (:func:`common.wire.tensor_parts`)."""
        for batch in planned:
            train_config = batch[0][2]
            rounds = [device_round(self.data(p), train_config, [self.config.seed, server_round, client_key(self.data(p))],
                                   self.rows_of(p)) for _, p, _ in batch]
            started = time.perf_counter()
            trained = BatchTrainer(self.config.model_config, train_config, before, rounds).run()
            seconds = (time.perf_counter() - started) / len(batch)
            for (position, partition, _), result in zip(batch, trained, strict=True):
                sent, weight, metrics = self._reply(layout, before, shared, partition, result, seconds, server_round)
                yield (position, weight, metrics, result.user_after), [tensor_parts(a) for a in sent]

    def _reply(self, layout: UpdateLayout, before: dict[str, np.ndarray], shared: list[np.ndarray], partition: int,
               result, seconds: float, server_round: int) -> tuple[list[np.ndarray], int, dict]:  # type: ignore[no-untyped-def]
        """The upload, weight and metrics :class:`client.numpy_client.FedRecClient.fit` would send."""
        config, data = self.config, self.data(partition)
        clipping_norm = clipping_norm_for(config, shared)
        trained = {**{name: value.reshape(before[name].shape) for name, value in result.dense_after.items()},
                   **result.items_after}
        upload = encode_update(
            layout, before, trained, result.item_rows,
            rowwise=config.row_wise_aggregation and clipping_norm is None,
            positives=positive_counts(data.train_users, data.train_items, data.num_items) if layout.positives else None,
            rows=result.item_rows,
        )
        metrics: dict[str, float] = {
            "train_loss": result.loss,
            "train_seconds": seconds,
            "upload_bytes": float(sum(a.nbytes for a in upload)),
            "download_bytes": float(sum(a.nbytes for a in shared)),
            "items_touched": float(len(result.item_rows)),
        }
        if clipping_norm is not None:
            metrics["update_norm_before_clipping"] = clip_deltas(upload, clipping_norm)
        return finish_reply(config, upload, len(data.train_items), False, metrics, server_round)

    # --- evaluation ----------------------------------------------------------------
    def evaluate(self, instructions: list) -> tuple[list, list]:  # type: ignore[type-arg]
        """Every instructed device's evaluation, by the ClientApp's own code on the device's rows."""
        if not instructions:
            return [], []
        ins = instructions[0][1]
        shared = parameters_to_ndarrays(ins.parameters)
        partitions = [proxy.node_id - 1 for proxy, _ in instructions]
        rows = self._refitted_rows(partitions, shared) if self.config.refit_config is not None else None
        results = []
        for (proxy, evaluate_ins), partition in zip(instructions, partitions, strict=True):
            client = self._client(partition, None if rows is None else rows[partition])
            loss, count, metrics = client.evaluate(shared, evaluate_ins.config)
            results.append((proxy, EvaluateRes(Status(Code.OK, ""), float(loss), int(count), metrics)))
        return results, []

    def _client(self, partition: int, refitted: dict[str, np.ndarray] | None) -> FedRecClient:
        """The device's ClientApp client on a Context holding its rows (already re-fitted, if given)."""
        context = Context(run_id=0, node_id=node_of(partition), state=RecordDict(), run_config=self.run_config,
                          node_config={"partition-id": partition, "num-partitions": len(self)})
        client = _PlainEvaluation(context, self.data(partition), skip_refit=refitted is not None)
        rows = refitted if refitted is not None else self.user_rows.get(partition)
        if rows is not None:
            save_local_state(context, rows)
        return client

    def _refitted_rows(self, partitions: list[int], shared: list[np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
        """``refit_user_rows`` of every device at once: user rows trained against the frozen shared model."""
        refit = self.config.refit_config
        assert refit is not None
        refit = replace(refit, content_loss_weight=0.0)
        model = build_model(self.config.model_config, 1, 1)
        full = {name: np.asarray(value, np.float32) for name, value in zip(model.shared_parameter_names(), shared,
                                                                           strict=True)}
        rounds = [device_round(self.data(p), refit, [self.config.seed, 7, client_key(self.data(p))], self.rows_of(p))
                  for p in partitions]
        out: dict[int, dict[str, np.ndarray]] = {}
        for indices in batches([r.steps for r in rounds], [len(r.plan.rows) for r in rounds]):
            trained = BatchTrainer(self.config.model_config, refit, full, [rounds[i] for i in indices],
                                   train_shared=False).run()
            for index, result in zip(indices, trained, strict=True):
                out[partitions[index]] = result.user_after
        return out


class Received:
    """The run directory's ``received.json`` (:mod:`server.disclosure`) for replies built in-process.

    A reply here is the ``FitRes`` / ``EvaluateRes`` a ClientApp would send; its fields go to
    the :class:`server.disclosure.ReceivedFields` the Flower path's grid writes, read from the
    record Flower would turn it into, once per kind of reply (same metric keys and arrays) and counted.
    """

    def __init__(self, run_dir: str) -> None:
        self.fields = ReceivedFields(run_dir)

    def note(self, message_type: str, replies: list) -> None:  # type: ignore[type-arg]
        kinds: dict[tuple, tuple[Any, int]] = {}
        for _, res in replies:
            arrays = tuple(len(t) for t in res.parameters.tensors) if isinstance(res, FitRes) else ()
            signature = (tuple(sorted((k, type(v).__name__) for k, v in res.metrics.items())), arrays)
            first, count = kinds.get(signature, (res, 0))
            kinds[signature] = (first, count + 1)
        for res, count in kinds.values():
            if isinstance(res, FitRes):  # Flower's record holds bytes (a forked worker's upload is a view)
                res = replace(res, parameters=replace(res.parameters, tensors=[bytes(t) for t in res.parameters.tensors]))
            content = compat.fitres_to_recorddict(res, True) if isinstance(res, FitRes) else \
                compat.evaluateres_to_recorddict(res)
            reply = SimpleNamespace(has_content=lambda: True, content=content)
            self.fields.add(message_type, "", reply, count)  # type: ignore[arg-type]
        if kinds:
            self.fields.save()


class _PlainEvaluation(FedRecClient):
    """FedRecClient with its data given (not re-sliced), optionally told the rows are already re-fitted."""

    def __init__(self, context: Context, data: ClientData, *, skip_refit: bool) -> None:  # noqa: B903
        # FedRecClient's own attributes, without slicing the data again or touching the thread count.
        self.context, self.state_dir, self.data = context, None, data
        config = parse_run_config(context.run_config)
        self.config = replace(config, eval_refit_epochs=0) if skip_refit else config


def run_vectorized(overrides: Mapping[str, Any] | None) -> Context:
    """The whole run (every round, the evaluations, the run directory); returns the server Context."""
    from common.config import fused_run_config

    use_threads()
    # FEDREC_THREADS here sizes the forked workers (each with one thread), not torch's pool: an
    # OpenMP pool the parent has used can hang a forked child's next parallel region.
    torch.set_num_threads(1)
    run_config = fused_run_config(overrides)
    config = parse_run_config(run_config)
    check_supported(config)
    fleet = _fleet(config, run_config)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    mapping = {node_of(p): p for p in range(len(fleet))}
    run = start_run(context, dict(TRANSPORT), partitions=lambda: mapping)
    manager = SimpleClientManager()
    for node in mapping:
        manager.register(DeviceProxy(node))
    if run.remaining > 0:
        _rounds(run, fleet, manager)
    finish_run(run)
    return context


def _fleet(config: FedRecConfig, run_config: Mapping[str, Any]) -> Fleet:
    """ALS devices solve in closed form (:mod:`simulations.batched_als`); GMF and MF train in batches."""
    if config.model == "als":
        from simulations.batched_als import AlsFleet  # it builds on Fleet

        return AlsFleet(config, run_config)
    return Fleet(config, run_config)


def _rounds(run: ServerRun, fleet: Fleet, manager: SimpleClientManager) -> None:
    """Flower's DefaultWorkflow (fit, then evaluate, per round) with the devices in-process."""
    strategy, config = run.strategy, run.config
    state: dict[str, Any] = {"parameters": strategy.initialize_parameters(manager), "round": 0}
    received = Received(str(run.recorder.path))

    def fit_stage(_grid, _context) -> None:  # type: ignore[no-untyped-def]
        instructions = strategy.configure_fit(state["round"], state["parameters"], manager)
        if not instructions:
            log(logging.INFO, "configure_fit: no clients selected, cancel")
            return
        results, failures = fleet.fit(instructions)
        received.note(MessageType.TRAIN, results)
        parameters, _ = strategy.aggregate_fit(state["round"], results, failures)
        if parameters is not None:
            state["parameters"] = parameters

    retries = config.round_retries if config.too_few_clients == "retry" else 0
    fit = retrying(fit_stage, strategy, retries)
    for current in range(1, run.remaining + 1):
        state["round"] = current
        fit(None, None)
        instructions = strategy.configure_evaluate(current, state["parameters"], manager)
        if instructions:
            results, failures = fleet.evaluate(instructions)
            received.note(MessageType.EVALUATE, results)
            strategy.aggregate_evaluate(current, results, failures)
        strategy.finish_round()
