"""FedRecStrategy without a federation: validation, row-wise decoding, Flower's server rules."""

from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.common import ndarray_to_bytes, Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

from common.config import parse_run_config
from common.updates import POPULAR_ITEMS_KEY, UpdateLayout, decode_item_list, encode_update
from server.run_dir import RunRecorder
from server.strategy import FedRecStrategy, check_secagg_capacity
from simulations.engine import fused_run_config

GLOBAL = OrderedDict(item_embedding=np.zeros((4, 2), np.float32), output=np.zeros(3, np.float32))
LAYOUT = UpdateLayout.from_state(GLOBAL, ["item_embedding"], num_items=4)


def _result(node_id, after, touched, num_examples=1, metrics=None):
    upload = encode_update(LAYOUT, GLOBAL, after, np.array(touched))
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(upload), num_examples, metrics or {"train_loss": 0.1})
    return SimpleNamespace(node_id=node_id), res


def _strategy(tmp_path, aggregated=False, **overrides):
    config = parse_run_config(fused_run_config({"num-server-rounds": 3, "min-train-clients": 1, **overrides}))
    recorder = RunRecorder(tmp_path / "run", {}, checkpoint_every=10)
    return FedRecStrategy(config, LAYOUT, list(GLOBAL.values()), recorder, uploads_are_aggregated=aggregated)


def _after(item_value, output_value):
    return {"item_embedding": np.full((4, 2), item_value, np.float32), "output": np.full(3, output_value, np.float32)}


def test_fedavg_applies_the_row_wise_mean_times_the_server_learning_rate(tmp_path):
    strategy = _strategy(tmp_path, strategy="fedavg", **{"server-learning-rate": 2.0})
    results = [_result(1, _after(1.0, 1.0), [0]), _result(2, _after(3.0, 3.0), [0, 1])]
    params, summary = strategy.aggregate_fit(1, results, [])
    item, output = parameters_to_ndarrays(params)
    np.testing.assert_allclose(item[:, 0], [2 * 2.0, 2 * 3.0, 0, 0])  # row 0: mean(1,3); row 1: only client 2
    np.testing.assert_allclose(output, 2 * 2.0)
    assert summary["clients_ok"] == 2 and summary["item_rows_updated"] == 2


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_the_inner_flower_strategy_adds_no_warning_to_the_console(tmp_path, caplog, name):
    strategy = _strategy(tmp_path, strategy=name)
    with caplog.at_level("WARNING"):
        strategy.aggregate_fit(1, [_result(1, _after(1.0, 1.0), [0])], [])
    assert "fit_metrics_aggregation_fn" not in caplog.text


def test_the_decayed_server_learning_rate_scales_later_rounds(tmp_path):
    strategy = _strategy(tmp_path, strategy="fedavg", **{
        "server-learning-rate": 2.0, "server-learning-rate-decay": 0.5, "server-learning-rate-decay-from": 1,
    })
    params, _ = strategy.aggregate_fit(2, [_result(1, _after(1.0, 1.0), [0])], [])
    item, output = parameters_to_ndarrays(params)
    assert item[0, 0] == pytest.approx(1.0) and output[0] == pytest.approx(1.0)  # round 2: 2.0 x 0.5 x delta 1


def test_fedadam_takes_an_adam_step_of_size_eta_not_the_raw_mean(tmp_path):
    strategy = _strategy(tmp_path, strategy="fedadam", **{"server-eta": 0.01})
    params, _ = strategy.aggregate_fit(1, [_result(1, _after(1.0, 1.0), [0, 1, 2, 3])], [])
    item, _ = parameters_to_ndarrays(params)
    assert np.all(np.abs(item) <= 0.01 * 1.0001) and np.all(item > 0), "Adam's first step is about eta per coordinate"


def _raw(node_id, arrays, num_examples=1):
    return SimpleNamespace(node_id=node_id), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), num_examples, {})


def _good_arrays(scale=1.0):
    return encode_update(LAYOUT, GLOBAL, _after(scale, scale), np.array([0]))


def _bad_upload(reason):
    arrays = _good_arrays()
    if reason == "arrays":
        return arrays[:-1]
    if reason == "shape":
        return [np.zeros((3, 2), np.float32), *arrays[1:]]
    if reason == "dtype":
        return [arrays[0].astype(np.int32), *arrays[1:]]
    if reason == "non_finite":
        arrays[1][0] = np.nan
        return arrays
    if reason == "touched":
        arrays[-1][2] = 7.0
        return arrays
    raise AssertionError(reason)


@pytest.mark.parametrize("reason", ["arrays", "shape", "dtype", "non_finite", "touched"])
def test_each_malformed_update_is_rejected_with_its_reason_and_the_round_goes_on(tmp_path, reason, caplog):
    strategy = _strategy(tmp_path)
    params, summary = strategy.aggregate_fit(1, [_raw(1, _good_arrays()), _raw(2, _bad_upload(reason))], [])
    assert summary["clients_ok"] == 1 and summary["clients_rejected"] == 1 and summary[f"rejected_{reason}"] == 1
    assert sum(v for k, v in summary.items() if k.startswith("rejected_")) == 1
    item, output = parameters_to_ndarrays(params)
    np.testing.assert_allclose(output, 5.0 * 1.0)  # only the good client's delta, server lr 5
    assert f"node 2 ({reason})" in caplog.text


def test_bytes_that_are_no_array_are_rejected_and_the_round_goes_on(tmp_path, caplog):
    strategy = _strategy(tmp_path)
    good, broken = _raw(1, _good_arrays()), _raw(2, _good_arrays())
    broken[1].parameters.tensors[0] = broken[1].parameters.tensors[0][:-4]  # truncated on the way
    params, summary = strategy.aggregate_fit(1, [good, broken], [])
    assert summary["clients_ok"] == 1 and summary["rejected_arrays"] == 1
    np.testing.assert_allclose(parameters_to_ndarrays(params)[1], 5.0 * 1.0)  # only the good client's delta
    assert "node 2 (arrays): update arrays cannot be read" in caplog.text


def test_no_examples_and_absurd_norms_are_rejected(tmp_path):
    strategy = _strategy(tmp_path, **{"reject-norm-factor": 10.0})
    honest = [_raw(n, _good_arrays(1.0 + 0.1 * n)) for n in range(1, 6)]
    boosted = _raw(9, _good_arrays(1000.0))
    empty = _raw(8, _good_arrays(), num_examples=0)
    params, summary = strategy.aggregate_fit(1, [*honest, boosted, empty], [])
    assert summary["clients_ok"] == 5 and summary["rejected_norm"] == 1 and summary["rejected_no_examples"] == 1
    assert np.abs(parameters_to_ndarrays(params)[1]).max() < 10, "the boosted update never reached the model"
    capped = _strategy(tmp_path / "abs", **{"max-update-norm": 1.5, "reject-norm-factor": 0.0})
    _, summary = capped.aggregate_fit(1, [_raw(1, _good_arrays(0.5)), _raw(2, _good_arrays(1.0))], [])
    assert summary["rejected_norm"] == 1  # |delta| of scale 1 is 2.0 (item row 1 + 3 outputs) > 1.5


def test_a_node_that_keeps_sending_bad_updates_is_excluded_from_sampling(tmp_path):
    strategy = _strategy(tmp_path, **{"exclude-after-rejections": 2})
    for server_round in (1, 2):
        _, summary = strategy.aggregate_fit(server_round, [_raw(1, _good_arrays()), _raw(7, _bad_upload("shape"))], [])
    assert summary["clients_excluded"] == 1 and strategy.excluded == {7}
    proxies = [SimpleNamespace(node_id=n, cid=str(n)) for n in (1, 7, 3)]

    def sample(num_clients, min_num_clients=None, criterion=None):
        eligible = [p for p in proxies if criterion is None or criterion.select(p)]
        return eligible[:num_clients]

    manager = SimpleNamespace(num_available=lambda: 3, sample=sample, wait_for=lambda n, timeout=None: True)
    chosen = [proxy.node_id for proxy, _ in strategy.configure_fit(3, ndarrays_to_parameters([]), manager)]
    assert chosen == [1, 3]
    never = _strategy(tmp_path / "never", **{"exclude-after-rejections": 0})
    for server_round in (1, 2, 3):
        never.aggregate_fit(server_round, [_raw(1, _good_arrays()), _raw(7, _bad_upload("shape"))], [])
    assert never.excluded == set()


def test_robust_aggregation_replaces_the_mean(tmp_path):
    uploads = [_raw(n, _good_arrays(1.0)) for n in range(1, 5)] + [_raw(9, _good_arrays(50.0))]
    mean = _strategy(tmp_path / "m", **{"reject-norm-factor": 0.0})
    mean.aggregate_fit(1, uploads, [])
    median = _strategy(tmp_path / "d", aggregation="median", **{"reject-norm-factor": 0.0})
    median.aggregate_fit(1, uploads, [])
    assert mean.current[1][0] == pytest.approx(5.0 * (4 + 50) / 5)
    assert median.current[1][0] == pytest.approx(5.0 * 1.0), "the median ignores the one outlier"


def test_too_few_usable_updates_leave_the_model_unchanged(tmp_path):
    strategy = _strategy(tmp_path, **{"min-train-clients": 2})
    params, summary = strategy.aggregate_fit(1, [_result(1, _after(1.0, 1.0), [0])], [RuntimeError("boom")])
    assert params is None and summary["clients_failed"] == 1


@pytest.mark.parametrize("server_round, expected", [(1, False), (2, True), (3, True)])
def test_evaluation_schedule_every_n_rounds_and_the_last(tmp_path, server_round, expected):
    strategy = _strategy(tmp_path, **{"evaluate-every": 2})
    manager = SimpleNamespace(num_available=lambda: 4, sample=lambda num_clients, **_: list(range(num_clients)),
                              wait_for=lambda n, timeout=None: True)
    assert bool(strategy.configure_evaluate(server_round, ndarrays_to_parameters([]), manager)) is expected


def test_secagg_capacity_refuses_rounds_that_would_wrap_the_modulus():
    check_secagg_capacity(1023, 2**22)  # 1023 * 2**22 < 2**32
    with pytest.raises(ValueError, match="overflows SecAgg"):
        check_secagg_capacity(1024, 2**22)


def test_a_securely_aggregated_update_is_used_as_the_mean_and_still_checked(tmp_path):
    strategy = _strategy(tmp_path, aggregated=True, strategy="fedavg", **{"server-learning-rate": 1.0})
    # SecAgg+ hands every client's FitRes the same aggregate: the mean, already weighted.
    mean = encode_update(LAYOUT, GLOBAL, _after(0.5, 0.25), np.array([0, 1]))
    mean[-1] = mean[-1] * 0.5  # half the clients touched rows 0 and 1
    results = [(SimpleNamespace(node_id=n), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(mean), 1, {})) for n in (1, 2)]
    params, summary = strategy.aggregate_fit(1, results, [])
    item, output = parameters_to_ndarrays(params)
    np.testing.assert_allclose(item[:, 0], [1.0, 1.0, 0, 0])  # 0.5 summed over the touching half
    np.testing.assert_allclose(output, 0.25)
    broken = [a.copy() for a in mean]
    broken[1][0] = np.inf
    bad = [(SimpleNamespace(node_id=1), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(broken), 1, {}))]
    params, summary = _strategy(tmp_path / "b", aggregated=True).aggregate_fit(1, bad, [])
    assert params is None and summary["clients_rejected"] == 1


def _published(strategy, server_round=2):
    manager = SimpleNamespace(num_available=lambda: 4, sample=lambda num_clients, **_: list(range(num_clients)),
                              wait_for=lambda *_: True, all=lambda: {})
    (_, fit_ins), *_ = strategy.configure_fit(server_round, ndarrays_to_parameters([]), manager)
    blob = fit_ins.config.get(POPULAR_ITEMS_KEY)
    return None if blob is None else decode_item_list(blob).tolist()


def test_the_server_publishes_the_items_most_devices_touched_as_the_popularity_fallback(tmp_path):
    strategy = _strategy(tmp_path, **{"popular-items": 3})
    assert _published(strategy, 1) is None  # nothing is known before the first round
    # Example-weighted: item 2 by weights 3 + 1, item 0 by 2, item 3 by 1, item 1 by nobody.
    strategy.aggregate_fit(1, [_result(1, _after(1.0, 1.0), [2, 0], num_examples=2),
                               _result(2, _after(1.0, 1.0), [2], num_examples=3)], [])
    strategy.aggregate_fit(2, [_result(3, _after(1.0, 1.0), [2, 3], num_examples=1)], [])
    assert _published(strategy, 3) == [2, 0, 3]
    manager = SimpleNamespace(num_available=lambda: 4, sample=lambda num_clients, **_: list(range(num_clients)),
                              wait_for=lambda n, timeout=None: True)
    (_, evaluate_ins), *_ = strategy.configure_evaluate(3, ndarrays_to_parameters([]), manager)
    assert decode_item_list(evaluate_ins.config[POPULAR_ITEMS_KEY]).tolist() == [2, 0, 3]


@pytest.mark.parametrize("overrides", [{"popular-items": 0}, {"row-wise-aggregation": False}, {"record-dp": True}])
def test_no_popularity_is_published_when_the_touched_vectors_carry_none(tmp_path, overrides):
    strategy = _strategy(tmp_path, **overrides)
    strategy.aggregate_fit(1, [_result(1, _after(1.0, 1.0), [2, 0], num_examples=2)], [])
    assert _published(strategy) is None


def test_the_mean_is_the_same_bit_for_bit_whatever_order_replies_arrive_in():
    from server.strategy import weighted_mean

    rng = np.random.default_rng(3)
    results = [
        _result(node, {"item_embedding": rng.normal(scale=10.0 ** rng.integers(-12, 12), size=(4, 2)).astype(np.float32),
                       "output": rng.normal(size=3).astype(np.float32)}, [1, 1, 0, 1], num_examples=int(n))
        for node, n in enumerate(rng.integers(1, 50, size=12))
    ]
    first = weighted_mean(results)
    orders = [list(reversed(results)), [results[i] for i in rng.permutation(len(results))]]
    for order in orders:
        for a, b in zip(first, weighted_mean(order), strict=True):
            np.testing.assert_array_equal(a, b)
    # and summing in arrival order would not have been: the test can tell
    total = sum(res.num_examples for _, res in results)

    def in_arrival_order(order):
        acc = np.zeros((4, 2))
        for _, res in order:
            acc += parameters_to_ndarrays(res.parameters)[0] * (res.num_examples / total)
        return acc

    assert any(not np.array_equal(in_arrival_order(results), in_arrival_order(order)) for order in orders)


def test_summing_uploads_in_threads_gives_the_same_model_log_and_counts(tmp_path, caplog):
    rng = np.random.default_rng(8)
    replies = []
    for node in range(1, 31):
        scale = 10.0 ** rng.integers(-6, 6)
        after = {"item_embedding": rng.normal(scale=scale, size=(4, 2)).astype(np.float32),
                 "output": rng.normal(size=3).astype(np.float32)}
        replies.append(_result(node, after, [t for t in range(4) if rng.random() < 0.6], int(rng.integers(1, 40))))
        if node % 7 == 0:
            replies.append(_raw(100 + node, _bad_upload(["shape", "non_finite", "touched", "dtype"][node // 7 - 1])))
    outcomes = []
    for threads in (1, 3):
        strategy = _strategy(tmp_path / str(threads), **{"reject-norm-factor": 1000.0})
        strategy.threads = threads
        caplog.clear()
        params, summary = strategy.aggregate_fit(1, replies, [])
        log = [record.getMessage() for record in caplog.records if "rejecting" in record.getMessage()]
        counts = {k: v for k, v in summary.items() if "seconds" not in k and v == v}  # (NaN: no client reported it)
        outcomes.append((parameters_to_ndarrays(params), counts, log))
    (model, summary, log), (threaded_model, threaded_summary, threaded_log) = outcomes
    assert summary["rejected_norm"] > 0 and sum(v for k, v in summary.items() if k.startswith("rejected_")) > 4
    for a, b in zip(model, threaded_model, strict=True):
        np.testing.assert_array_equal(a, b)
    assert threaded_summary == summary and threaded_log == log and len(log) == summary["clients_rejected"]


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_the_weighted_mean_in_threads_is_the_same_bit_for_bit(threads):
    from server.aggregate import weighted_mean

    rng = np.random.default_rng(4)
    results = [
        _result(node, {"item_embedding": rng.normal(scale=10.0 ** rng.integers(-8, 8), size=(4, 2)).astype(np.float32),
                       "output": rng.normal(size=3).astype(np.float32)}, [0, 1, 3], num_examples=int(n))
        for node, n in enumerate(rng.integers(1, 50, size=25))
    ]
    for a, b in zip(weighted_mean(results), weighted_mean(results, threads), strict=True):
        np.testing.assert_array_equal(a, b)


def test_uploads_alike_in_what_the_fingerprint_reads_are_still_summed_in_content_order():
    """Large uploads are ordered by a sample of their bytes first; a tie falls back to all of them."""
    from server.aggregate import _fingerprint, in_content_order, weighted_mean

    base = np.random.default_rng(5).normal(size=(8192, 4)).astype(np.float32)  # 128 KiB: sampled, not read whole
    unsampled = next(i for i in range(base.size) if all((128 + 4 * i + b) % 1021 for b in range(4)))
    results = []
    for node, scale in enumerate([1.0, 1e-7, 1e7]):
        table = base.copy()
        table.flat[unsampled] = scale  # outside every sampled byte: the fingerprints tie
        parameters = ndarrays_to_parameters([table, np.ones(3, np.float32)])
        assert len(parameters.tensors[0]) > 1 << 16 and len(parameters.tensors[0]) - len(ndarray_to_bytes(table)) == 0
        results.append((SimpleNamespace(node_id=node), FitRes(Status(Code.OK, ""), parameters, 7, {})))
    assert len({_fingerprint(res) for _, res in results}) == 1
    orders = [results, results[::-1], [results[i] for i in (1, 2, 0)]]
    ordered = [[proxy.node_id for proxy, _ in in_content_order(order)] for order in orders]
    assert ordered[0] == ordered[1] == ordered[2]
    means = [weighted_mean(order)[0] for order in orders]
    for mean in means[1:]:
        np.testing.assert_array_equal(means[0], mean)


def test_a_simulated_round_waits_until_every_supernode_has_connected(tmp_path):
    """Flower registers SuperNodes as they start; sampling before all are there would favour the early ones."""
    config = parse_run_config(fused_run_config({"num-server-rounds": 3, "clients-per-round": 2}))
    strategy = FedRecStrategy(config, LAYOUT, list(GLOBAL.values()), RunRecorder(tmp_path / "run", {}, checkpoint_every=10),
                              expected_clients=500)
    waited = []
    manager = SimpleNamespace(num_available=lambda: 500, sample=lambda num_clients, **_: list(range(num_clients)),
                              wait_for=lambda n, timeout=None: waited.append(n) or True)
    assert len(strategy.configure_fit(1, ndarrays_to_parameters(list(GLOBAL.values())), manager)) == 2
    assert waited == [500]
