"""ALS devices for ``backend = "vectorized"``: each device's own closed-form round, without Flower messages.

A device's ALS round is a handful of ``f x f`` solves (:mod:`client.als_local`), so the
backend calls the device's own functions per device, exactly as
:meth:`client.numpy_client.FedRecClient.fit` does (same seeds, float64, the same reply
through :func:`client.upload.finish_reply`); the server side is the ServerApp's strategy,
unchanged.

What differs is only where an upload waits for ``aggregate_fit``: Flower keeps every reply's
serialized bytes until the round is aggregated, and at 100,000 devices a non-private
upload at factors 8 (75,726 float32) would need 30 GB. An ALS upload is mostly zeros (the
statistics of the device's own items), so each one is kept as its non-zero entries and
serialized again, to the very same bytes, whenever the strategy reads it
(:class:`CompactTensors`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
from flwr.server.client_proxy import ClientProxy

from client.als_local import als_round
from client.local import client_key
from client.upload import clipping_norm_for, finish_reply
from common.training import TrainConfig
from common.wire import TENSOR_TYPE
from simulations.vectorized import Fleet

class _Stored:
    """One array as its shape, dtype and non-zero entries (or whole, when that is smaller)."""

    __slots__ = ("dtype", "indices", "shape", "values")

    def __init__(self, array: np.ndarray) -> None:
        self.shape, self.dtype = array.shape, array.dtype
        flat = array.reshape(-1)
        nonzero = np.flatnonzero((flat != 0) | np.signbit(flat))  # a negative zero is kept as a value
        if 2 * len(nonzero) < flat.size:
            self.indices: np.ndarray | None = nonzero.astype(np.int32)
            self.values = flat[nonzero].copy()
        else:
            self.indices, self.values = None, flat.copy()

    def array(self) -> np.ndarray:
        if self.indices is None:
            return self.values.reshape(self.shape)
        dense = np.zeros(int(np.prod(self.shape)), self.dtype)
        dense[self.indices] = self.values
        return dense.reshape(self.shape)


class CompactTensors(Sequence[bytes]):
    """``Parameters.tensors`` for arrays kept by their non-zero entries: each read gives ``ndarray_to_bytes`` of the array.

    Exact: what is left out are positive zeros of the same dtype (a negative zero is kept as
    a value), so the bytes are those :func:`flwr.common.ndarrays_to_parameters` would have written.
    """

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._stored = [_Stored(np.asarray(a)) for a in arrays]

    def __len__(self) -> int:
        return len(self._stored)

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        if isinstance(index, slice):
            return [ndarray_to_bytes(s.array()) for s in self._stored[index]]
        return ndarray_to_bytes(self._stored[index].array())

    def __iter__(self) -> Iterator[bytes]:
        return (ndarray_to_bytes(s.array()) for s in self._stored)


class AlsFleet(Fleet):
    """The vectorized backend's fleet for ``model = "als"``: every device runs its own ALS round."""

    def _train(self, present: list[tuple[ClientProxy, int, TrainConfig]], shared: list[np.ndarray],
               server_round: int) -> list[tuple[ClientProxy, FitRes]]:
        return [(proxy, self._solve(partition, shared, server_round)) for proxy, partition, _ in present]

    def _solve(self, partition: int, shared: list[np.ndarray], server_round: int) -> FitRes:
        """The reply :meth:`client.numpy_client.FedRecClient.fit` sends for ``model = "als"``."""
        config, data = self.config, self.data(partition)
        if len(shared) != 1:
            raise ValueError(f"model 'als' expects one shared array (the item factors), got {len(shared)}")
        upload, metrics = als_round(shared[0], data, clip=clipping_norm_for(config, shared),
                                    max_items=config.als_max_items,
                                    seed=[config.seed, server_round, client_key(data)])
        sent, weight, metrics = finish_reply(config, upload, len(data.train_items), False, metrics, server_round)
        return FitRes(Status(Code.OK, ""), Parameters(CompactTensors(sent), TENSOR_TYPE), weight,  # type: ignore[arg-type]
                      metrics)
