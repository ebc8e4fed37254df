"""common.wire: Flower's tensor bytes read as views and written faster, with Flower's exact results."""

import numpy as np
import pytest
from flwr.common import Parameters, bytes_to_ndarray, ndarray_to_bytes, ndarrays_to_parameters

from common.wire import TENSOR_TYPE, parameters_arrays, tensor_parts, tensor_to_array

ARRAYS = [
    np.random.default_rng(0).normal(size=(37, 8)).astype(np.float32),
    np.random.default_rng(1).normal(size=5).astype(np.float16),
    np.array(3.5),
    np.zeros((0, 4), np.float32),
    np.arange(10, dtype=">i4"),
    np.arange(6, dtype=np.int64).reshape(2, 3),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype.str}{a.shape}")
def test_written_bytes_are_flowers_and_read_back_as_flower_reads_them(array):
    tensor = ndarray_to_bytes(array)
    assert b"".join(tensor_parts(array)) == tensor
    flowers = bytes_to_ndarray(tensor)
    for view in (tensor_to_array(tensor), tensor_to_array(memoryview(bytearray(tensor)))):  # bytes, or a view of them
        assert view.dtype == flowers.dtype and view.shape == flowers.shape and not view.flags.writeable
        np.testing.assert_array_equal(view, flowers)


def test_a_read_array_is_a_read_only_view_of_the_message_bytes():
    tensor = ndarray_to_bytes(ARRAYS[0])
    view = tensor_to_array(tensor)
    assert not view.flags.writeable and not view.flags.owndata  # no copy of the data, and no writing into a message
    with pytest.raises(ValueError):
        view[0, 0] = 1.0


def test_what_a_view_cannot_hold_is_read_or_refused_by_flower():
    fortran = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    np.testing.assert_array_equal(tensor_to_array(ndarray_to_bytes(fortran)), fortran)
    truncated = ndarray_to_bytes(ARRAYS[0])[:-4]
    with pytest.raises(ValueError):
        bytes_to_ndarray(truncated)  # Flower refuses it ...
    with pytest.raises(ValueError):
        tensor_to_array(truncated)  # ... and so does the view
    with pytest.raises(ValueError):
        tensor_to_array(b"not a numpy file at all")
    objects = ndarray_to_bytes(np.array(["a", "b"]))  # unicode, not object: a plain view still
    assert tensor_to_array(objects).tolist() == ["a", "b"]


def test_parameters_round_trip():
    parameters = Parameters([b"".join(tensor_parts(a)) for a in ARRAYS], TENSOR_TYPE)
    assert parameters == ndarrays_to_parameters(ARRAYS)  # Flower's own, byte for byte
    for got, want in zip(parameters_arrays(parameters), ARRAYS, strict=True):
        np.testing.assert_array_equal(got, want)
