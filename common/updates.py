"""The wire format of a client update, shared by the ClientApp and the ServerApp.

A user touches a few dozen of thousands of items, so averaging whole item tables dilutes
each item's update by the share of clients that never saw it. Each client therefore
uploads, for every shared parameter, its **delta** (item-indexed tables with untouched
rows zeroed) and one dense **touched-items vector** (1.0 where the client trained that
item row). The server only needs the example-weighted *mean* of uploads, which is exactly
what Flower's FedAvg or SecAgg+ compute, and divides the item rows of the summed delta by
the summed touched vector. Because everything is a plain weighted sum, secure
aggregation never has to reveal which items one client touched.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
from flwr.supercore.differential_privacy import clip_inputs_inplace, get_norm

TOUCHED_KEY = "item_touched"
POSITIVES_KEY = "item_positives"  # popularity = "positives": users with a positive per item, over the device's weight
POPULAR_ITEMS_KEY = "fedrec.popular-items"  # fit/evaluate config: the published fallback list (int32 bytes)


@dataclass(frozen=True)
class UpdateLayout:
    """Names and shapes of the shared parameters, in the order they travel."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    item_rows: frozenset[str]
    num_items: int
    positives: bool = False  # popularity = "positives": a per-item count travels before the touched vector
    statistics: int = 0  # model = als: the upload is one vector of this many sufficient statistics, not deltas
    gram: bool = False  # model = ease: the statistics are a Gram's upper triangle, sent alone (its diagonal is the touched vector)

    @classmethod
    def from_state(
        cls, shared: "OrderedDict[str, np.ndarray]", item_rows: list[str], num_items: int, *, positives: bool = False
    ) -> "UpdateLayout":
        return cls(tuple(shared), tuple(tuple(a.shape) for a in shared.values()), frozenset(item_rows), num_items,
                   positives)

    def upload_shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the uploaded arrays: one per shared parameter, [the positives vector,] then the touched vector.

        ALS (``statistics`` > 0): the statistics vector, then the touched vector. EASE (``gram``): the
        Gram's triangle alone.
        """
        if self.gram:
            return [(self.statistics,)]
        if self.statistics:
            return [(self.statistics,), (self.num_items,)]
        return [*self.shapes, *([(self.num_items,)] if self.positives else []), (self.num_items,)]

    def array_name(self, index: int) -> str:
        """The name of the upload's ``index``-th array, for messages."""
        if self.gram:
            return "ease_gram" if index == 0 else f"array {index}"
        names = [*(["als_statistics"] if self.statistics else self.names), *([POSITIVES_KEY] if self.positives else []),
                 TOUCHED_KEY]
        return names[index] if index < len(names) else f"array {index}"


def encode_update(
    layout: UpdateLayout,
    before: dict[str, np.ndarray],
    after: dict[str, np.ndarray],
    touched_items: np.ndarray,
    *,
    rowwise: bool = True,
    positives: np.ndarray | None = None,
    rows: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Arrays a client uploads: masked deltas, [the positives vector,] then the touched-items vector.

    With ``rowwise=False`` every row counts as touched, which turns the server's decode
    into plain FedAvg over whole tables (kept for comparison). ``positives`` (required when
    the layout carries it): per item, how many of the device's users have a positive on it.
    ``rows`` (sorted item ids): the item tables of ``after`` hold only these rows, the model
    of a round that trained only them; every other row is ``before``'s, so its delta is zero
    and only these rows are subtracted (the same upload as from the whole tables).
    """
    touched = np.zeros(layout.num_items, dtype=np.float32)
    if rowwise:
        touched[np.asarray(touched_items, dtype=np.int64)] = 1.0  # repeats set the same flag
    else:
        touched[:] = 1.0
    upload = []
    for name in layout.names:
        if rows is not None and name in layout.item_rows:
            delta = np.zeros(np.shape(before[name]), np.float32)
            mask = touched[rows].reshape(-1, *([1] * (delta.ndim - 1)))
            delta[rows] = (after[name] - before[name][rows]) * mask
        else:
            delta = (after[name] - before[name]).astype(np.float32, copy=False)  # a new array: masked in place
            if name in layout.item_rows:
                delta *= touched.reshape(-1, *([1] * (delta.ndim - 1)))
        upload.append(delta)
    if layout.positives:
        if positives is None or np.shape(positives) != (layout.num_items,):
            raise ValueError(f"the layout carries {POSITIVES_KEY}: pass one count per item ({layout.num_items})")
        upload.append(np.asarray(positives, dtype=np.float32))
    upload.append(touched)
    return upload


def positive_counts(train_users: np.ndarray, train_items: np.ndarray, num_items: int) -> np.ndarray:
    """Per item, the number of distinct users with a positive (a training interaction) on it."""
    pairs = np.unique(np.asarray(train_users, np.int64) * num_items + np.asarray(train_items, np.int64))
    return np.bincount(pairs % num_items, minlength=num_items).astype(np.float64)


def decode_mean_update(
    layout: UpdateLayout,
    current: list[np.ndarray],
    mean_upload: list[np.ndarray],
    *,
    server_learning_rate: float = 1.0,
) -> list[np.ndarray]:
    """New shared parameters from the example-weighted mean of the clients' uploads.

    Item rows are divided by the (weighted) share of clients that touched them; rows no
    client touched keep their current value. Dense parameters step along the mean delta.
    """
    if len(mean_upload) != len(layout.upload_shapes()):
        raise ValueError(f"expected {len(layout.upload_shapes())} arrays in the aggregate, got {len(mean_upload)}")
    touched = mean_upload[-1].astype(np.float64)
    safe = np.where(touched > 0, touched, 1.0)
    new = []
    deltas = mean_upload[: len(layout.names)]  # the positive counts (if carried) and the touched vector follow
    for name, value, delta in zip(layout.names, current, deltas, strict=True):
        step = delta.astype(np.float64)
        if name in layout.item_rows:
            step = step / safe.reshape(-1, *([1] * (step.ndim - 1)))
        new.append((value + server_learning_rate * step).astype(np.float32))
    return new


REJECTION_REASONS = ("arrays", "shape", "dtype", "non_finite", "touched", "no_examples", "norm", "clipping")


class UpdateRejected(ValueError):
    """An upload the server will not aggregate; ``reason`` is one of :data:`REJECTION_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def validate_upload(
    layout: UpdateLayout, upload: list[np.ndarray], *, one_client: bool = True, positives_per_example: bool = False
) -> None:
    """Reject an upload that does not match the layout: count, shape, dtype, finiteness, touched flags.

    ``one_client=False`` for SecAgg+'s aggregate, whose touched vector is not 0/1 flags.
    ``positives_per_example``: the device's weight is its example count, and each user's
    positive on an item is one of its examples, so its counts over its weight sum to at most 1
    (a device cannot inflate the published popularity beyond its own examples).

    Clients send float32 arrays (the wire format halves the bytes of float64) and a touched
    vector of weighted 0/1 flags in [0, 1]; anything else is a broken or hostile client.
    """
    expected = layout.upload_shapes()
    if len(upload) != len(expected):
        raise UpdateRejected("arrays", f"update has {len(upload)} arrays, expected {len(expected)}")
    deltas = 0.0
    for index, (array, shape) in enumerate(zip(upload, expected, strict=True)):
        name = layout.array_name(index)
        if tuple(array.shape) != shape:
            raise UpdateRejected("shape", f"update array {name} has shape {tuple(array.shape)}, expected {shape}")
        if not np.issubdtype(array.dtype, np.floating):
            raise UpdateRejected("dtype", f"update array {name} has dtype {array.dtype}, expected a float type")
        # A finite sum of squares means finite elements; only when it is not (a NaN, an infinity,
        # or squares beyond the float range) is every element checked.
        squares = sum_of_squares(array)
        if not math.isfinite(squares) and not np.all(np.isfinite(array)):
            raise UpdateRejected("non_finite", f"update array {name} contains NaN or Inf")
        if index < len(layout.names):
            deltas += squares
    norm = math.sqrt(deltas)
    if layout.gram:  # one device's Gram entries count its users with both items: whole numbers >= 0
        gram = upload[0]
        if one_client and gram.size and (gram.min() < 0.0 or not np.array_equal(gram, np.rint(gram))):
            raise UpdateRejected("touched", "ease_gram must hold whole counts >= 0")
        return norm
    touched = upload[-1]
    # One client's flags are 0/1; SecAgg+'s dequantized aggregate is on another scale
    # (deployment runs read outside [0, 1]), so it is checked for shape and finiteness only.
    if one_client and touched.size and (touched.min() < 0.0 or touched.max() > 1.0):
        raise UpdateRejected("touched", f"{TOUCHED_KEY} must lie in [0, 1], got [{touched.min():.3g}, {touched.max():.3g}]")
    if one_client and layout.positives and upload[-2].size and upload[-2].min() < 0.0:
        raise UpdateRejected("touched", f"{POSITIVES_KEY} must be >= 0, got {upload[-2].min():.3g}")
    if one_client and layout.positives and positives_per_example and float(np.sum(upload[-2], dtype=np.float64)) > 1.001:
        raise UpdateRejected("touched", f"{POSITIVES_KEY} sums to {float(np.sum(upload[-2])):.4g} > 1 per example")
    return norm


def sum_of_squares(array: np.ndarray) -> float:
    """The sum of an array's squared elements: one BLAS dot (float16 widened to float32 first).

    A float64 copy of a 20,000-item upload took 7 ms of the server's time per client, this 0.05 ms.
    """
    flat = np.asarray(array, dtype=np.float32 if array.dtype == np.float16 else array.dtype).ravel()
    return float(np.vdot(flat, flat))


def delta_norm(upload: list[np.ndarray], layout: UpdateLayout | None = None) -> float:
    """L2 norm of an upload's deltas (the touched and positives vectors are bookkeeping, not a step)."""
    squares = 0.0
    for array in upload[: len(layout.names)] if layout is not None else upload[:-1]:
        squares += sum_of_squares(array)
    return math.sqrt(squares)


def clip_deltas(upload: list[np.ndarray], clipping_norm: float) -> float:
    """Clip the deltas of an upload (not its touched vector) to L2 norm ``clipping_norm``, in place.

    User-level DP's per-client clipping (Flower's FlatClip helper). Returns the norm before
    clipping (for the tuning loop; a DP run's device does not report it). The touched vector must be data-independent
    (all ones) for the guarantee, so it is left out of the norm.
    """
    deltas = upload[:-1]
    norm = get_norm(deltas)
    if norm > 0:
        clip_inputs_inplace(deltas, clipping_norm)
    return norm


def popular_items(touched_totals: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` items with the largest summed touched vectors, best first, ties by lower id.

    A device touches its positives and, uniformly, some of its other items as sampled
    negatives, so an item's expected touched total grows with the number of devices that
    interacted with it: ranking by it ranks by popularity (MovieLens-100K, 20 rounds of
    100 devices: all of ItemPop's top 20, HR@10 0.433 against ItemPop's 0.412;
    ``python -m simulations.bench_popularity``). It is
    computed from the round sums that the server receives anyway (what SecAgg+ reveals),
    so publishing it reveals nothing more about any one device.
    """
    order = np.lexsort((np.arange(len(touched_totals)), -np.asarray(touched_totals, dtype=np.float64)))
    return order[:count].astype(np.int32)


def encode_item_list(items: np.ndarray) -> bytes:
    """Item ids as little-endian int32 bytes (a legacy config value may be bytes, not a list)."""
    return np.asarray(items, dtype="<i4").tobytes()


def decode_item_list(blob: bytes) -> np.ndarray:
    """Inverse of :func:`encode_item_list`; malformed bytes are a ValueError."""
    if not isinstance(blob, bytes) or len(blob) % 4:
        raise ValueError(f"{POPULAR_ITEMS_KEY} must be int32 bytes, got {type(blob).__name__} of length {len(blob)}")
    return np.frombuffer(blob, dtype="<i4").astype(np.int64)


def for_transport(arrays: list[np.ndarray], dtype: str) -> list[np.ndarray]:
    """The arrays as they travel (``transport-dtype``): float16 halves the bytes of a model or update.

    Both sides keep float32 (the server a float32 master copy): a device trains from the
    rounded model it received and sends its delta against exactly that model, so rounding
    never accumulates in the global model beyond one step's worth.
    """
    if dtype == "float32":
        return arrays
    return [np.asarray(a, dtype=np.float16) for a in arrays]
