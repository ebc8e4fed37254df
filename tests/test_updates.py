"""Update codec: per-item-row averaging from a plain weighted mean (what SecAgg+ computes)."""

from collections import OrderedDict

import numpy as np
import pytest

from common.updates import UpdateLayout, decode_mean_update, delta_norm, encode_update, validate_upload


def _layout():
    shared = OrderedDict(item_embedding=np.zeros((4, 2), np.float32), output=np.zeros(3, np.float32))
    return UpdateLayout.from_state(shared, ["item_embedding"], num_items=4), shared


def _mean(uploads, weights):
    w = np.asarray(weights, float) / sum(weights)
    return [sum(wi * u[k] for wi, u in zip(w, uploads, strict=True)) for k in range(len(uploads[0]))]


def test_item_rows_average_only_over_clients_that_touched_them():
    layout, global_state = _layout()
    after_a = {"item_embedding": np.array([[1, 1], [2, 2], [0, 0], [0, 0]], np.float32), "output": np.full(3, 1.0, np.float32)}
    after_b = {"item_embedding": np.array([[3, 3], [0, 0], [0, 0], [0, 0]], np.float32), "output": np.full(3, 3.0, np.float32)}
    up_a = encode_update(layout, global_state, after_a, np.array([0, 1, 1]))
    up_b = encode_update(layout, global_state, after_b, np.array([0]))
    new = decode_mean_update(layout, list(global_state.values()), _mean([up_a, up_b], [1, 3]))
    # row 0: both touched, weights 1:3 -> 0.25*1 + 0.75*3 = 2.5 ; row 1: only a -> 2 (not diluted to 0.5)
    np.testing.assert_allclose(new[0], [[2.5, 2.5], [2.0, 2.0], [0, 0], [0, 0]])
    # dense parameters: plain example-weighted mean
    np.testing.assert_allclose(new[1], np.full(3, 2.5))


def test_rows_nobody_touched_keep_their_value_even_if_a_client_changed_them():
    layout, _ = _layout()
    before = {"item_embedding": np.full((4, 2), 0.5, np.float32), "output": np.zeros(3, np.float32)}
    after = {"item_embedding": np.full((4, 2), 9.0, np.float32), "output": np.zeros(3, np.float32)}
    upload = encode_update(layout, before, after, np.array([2]))
    assert np.all(upload[0][[0, 1, 3]] == 0), "untouched rows must not travel"
    new = decode_mean_update(layout, list(before.values()), upload)
    np.testing.assert_allclose(new[0][[0, 1, 3]], 0.5)
    np.testing.assert_allclose(new[0][2], 9.0)


def test_rowwise_off_is_plain_fedavg_of_whole_tables():
    layout, global_state = _layout()
    after_a = {"item_embedding": np.full((4, 2), 2.0, np.float32), "output": np.ones(3, np.float32)}
    after_b = {"item_embedding": np.zeros((4, 2), np.float32), "output": np.ones(3, np.float32)}
    uploads = [
        encode_update(layout, global_state, after_a, np.array([0]), rowwise=False),
        encode_update(layout, global_state, after_b, np.array([1]), rowwise=False),
    ]
    new = decode_mean_update(layout, list(global_state.values()), _mean(uploads, [1, 1]))
    np.testing.assert_allclose(new[0], np.full((4, 2), 1.0))


def test_server_learning_rate_scales_the_step():
    layout, global_state = _layout()
    after = {"item_embedding": np.ones((4, 2), np.float32), "output": np.ones(3, np.float32)}
    upload = encode_update(layout, global_state, after, np.arange(4))
    new = decode_mean_update(layout, list(global_state.values()), upload, server_learning_rate=2.0)
    np.testing.assert_allclose(new[0], 2.0)
    np.testing.assert_allclose(new[1], 2.0)


def test_validate_upload_rejects_wrong_count_shape_and_nan():
    layout, global_state = _layout()
    good = encode_update(layout, global_state, dict(global_state), np.array([0]))
    validate_upload(layout, good)
    with pytest.raises(ValueError, match="expected 3"):
        validate_upload(layout, good[:2])
    with pytest.raises(ValueError, match="shape"):
        validate_upload(layout, [good[0][:2], good[1], good[2]])
    bad = [a.copy() for a in good]
    bad[1][0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        validate_upload(layout, bad)
    with pytest.raises(ValueError, match="expected 3 arrays"):
        decode_mean_update(layout, list(global_state.values()), good[:2])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_validation_finds_one_nan_or_infinity_and_passes_values_whose_squares_overflow(dtype):
    layout = UpdateLayout.from_state(OrderedDict(item=np.zeros((5001, 1), np.float32)), ["item"], num_items=5001)
    values = np.linspace(-3.0, 3.0, 5001).astype(dtype).reshape(-1, 1)
    touched = np.ones(5001, dtype)
    assert validate_upload(layout, [values, touched]) == pytest.approx(delta_norm([values, touched], layout), rel=1e-6)
    for bad in (np.nan, np.inf, -np.inf):
        broken = values.copy()
        broken[4321, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            validate_upload(layout, [broken, touched])
    huge = (np.linspace(-1.0, 1.0, 5001) * float(np.finfo(dtype).max) / 2).astype(dtype).reshape(-1, 1)
    assert np.all(np.isfinite(huge))
    assert validate_upload(layout, [huge, touched]) == delta_norm([huge, touched], layout)  # finite, norm beyond range



@pytest.mark.parametrize("rowwise", [True, False])
def test_an_update_from_the_trained_rows_alone_is_the_one_from_the_whole_tables(rowwise):
    rng = np.random.default_rng(11)
    before = OrderedDict(item=rng.normal(size=(30, 4)).astype(np.float32), dense=rng.normal(size=3).astype(np.float32))
    layout = UpdateLayout.from_state(before, ["item"], num_items=30)
    rows = np.array([2, 5, 6, 17, 29])
    trained = {"item": rng.normal(size=(5, 4)).astype(np.float32), "dense": rng.normal(size=3).astype(np.float32)}
    whole = {"item": before["item"].copy(), "dense": trained["dense"]}
    whole["item"][rows] = trained["item"]
    from_rows = encode_update(layout, before, trained, rows, rowwise=rowwise, rows=rows)
    from_whole = encode_update(layout, before, whole, rows, rowwise=rowwise)
    for a, b in zip(from_rows, from_whole, strict=True):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()  # the same bits (signed zeros included)
    assert np.count_nonzero(from_rows[0].any(axis=1)) == len(rows)
