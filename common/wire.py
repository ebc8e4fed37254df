"""Flower's ``numpy.ndarray`` tensor bytes (``np.save`` format), read and written without per-array parsing.

Flower's ``parameters_to_ndarrays`` parses every tensor's header with ``np.load`` (a
Python-level ``ast.literal_eval``) and copies its data; ``ndarrays_to_parameters`` writes
each through ``np.save`` into a ``BytesIO``. A round of 6,040 MovieLens-1M-shape uploads
decodes about 24,000 arrays twice (validation, then the mean): in the vectorized backend
that was a third of the server's time, more than the training (``cProfile``, see
``results/fast-backend-cores.md``). Every upload of a round has the same few headers, so
here a header is parsed once (by numpy's own ``read_array_header_*``) and cached, and the
data is a read-only view of the bytes the message already holds: nothing is copied, so
decoding twice costs no memory either. Anything unusual (Fortran order, object dtypes,
a size that does not match the header) goes to Flower's own functions, which decode or
refuse it as before.
"""

from __future__ import annotations

import io
import math

import numpy as np
from flwr.common import Parameters, bytes_to_ndarray, ndarray_to_bytes

TENSOR_TYPE = "numpy.ndarray"  # what flwr.common.ndarrays_to_parameters writes
_MAGIC = b"\x93NUMPY"
_HEADERS: dict[bytes, tuple[tuple[int, ...], np.dtype, int] | None] = {}  # header -> (shape, dtype, size); None: not ours
_MAX_HEADERS = 4096  # a run has a handful; a hostile stream of distinct headers cannot grow this without bound


def _header_end(tensor: bytes | memoryview) -> int:
    """Where the ``np.save`` header ends (the data starts), or 0 if this is not one."""
    if len(tensor) < 12 or bytes(tensor[:6]) != _MAGIC:
        return 0
    major = tensor[6]
    if major == 1:
        return 10 + int.from_bytes(tensor[8:10], "little")
    if major in (2, 3):
        return 12 + int.from_bytes(tensor[8:12], "little")
    return 0


def _parse(header: bytes) -> tuple[tuple[int, ...], np.dtype, int] | None:
    """numpy's own reading of a header; None for what a plain view cannot hold (Fortran order, objects)."""
    stream = io.BytesIO(header)
    try:
        major, _ = np.lib.format.read_magic(stream)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(stream)
    except ValueError:
        return None
    if fortran or dtype.hasobject:
        return None
    shape = tuple(int(s) for s in shape)
    return shape, dtype, math.prod(shape)


def tensor_to_array(tensor: bytes | memoryview) -> np.ndarray:
    """The array of one tensor (bytes, or a memoryview of them): a read-only view of its data, or Flower's
    ``bytes_to_ndarray`` for the unusual."""
    end = _header_end(tensor)
    header = bytes(tensor[:end]) if end else b""
    if end and header not in _HEADERS:
        if len(_HEADERS) >= _MAX_HEADERS:
            _HEADERS.clear()
        _HEADERS[header] = _parse(header)
    parsed = _HEADERS.get(header) if end else None
    if parsed is not None:
        shape, dtype, count = parsed
        if len(tensor) - end == count * dtype.itemsize:
            array = np.frombuffer(tensor, dtype=dtype, count=count, offset=end).reshape(shape)
            array.flags.writeable = False  # also over a writable buffer: an upload is never written into
            return array
    return bytes_to_ndarray(bytes(tensor))


def parameters_arrays(parameters: Parameters) -> list[np.ndarray]:
    """``flwr.common.parameters_to_ndarrays``, as read-only views of the tensors' bytes."""
    return [tensor_to_array(tensor) for tensor in parameters.tensors]


_SAVED_HEADERS: dict[tuple[tuple[int, ...], str], bytes] = {}


def tensor_parts(array: np.ndarray) -> list:
    """The buffers whose concatenation is ``flwr.common.ndarray_to_bytes(array)``: its header, then its data.

    The header is written once per shape and dtype. An array a plain buffer cannot give (not
    C-contiguous, objects) comes as Flower's bytes whole.
    """
    if not array.flags.c_contiguous or array.dtype.hasobject:
        return [ndarray_to_bytes(array)]
    key = (array.shape, array.dtype.str)
    header = _SAVED_HEADERS.get(key)
    if header is None:
        if len(_SAVED_HEADERS) >= _MAX_HEADERS:
            _SAVED_HEADERS.clear()
        header = ndarray_to_bytes(np.empty(array.shape, array.dtype))[: -array.nbytes or None]
        _SAVED_HEADERS[key] = header
    return [header, array.reshape(-1).view(np.uint8)]
