"""The strategy's arrays in a server state, and getting them back when a run resumes.

The shared model is restored in the dtype it was saved in (bit for bit), and FedAdam /
FedYogi's moments with it, so a resumed run takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np
from flwr.server.strategy import Strategy

from server.run_dir import ServerState

MOMENT_SLOTS = ("m_t", "v_t")  # FedAdam / FedYogi's moments (absent for FedAvg / FedProx)


def model_arrays(names: list[str], current: list[np.ndarray], inner: Strategy) -> dict[str, np.ndarray]:
    """The shared model and the wrapped strategy's moments, by their names in the state file."""
    arrays = {f"shared/{name}": value for name, value in zip(names, current, strict=True)}
    for slot in MOMENT_SLOTS:
        for index, value in enumerate(getattr(inner, slot, None) or []):
            arrays[f"inner/{slot}/{index}"] = np.asarray(value)
    return arrays


def restored_model(state: ServerState, names: list[str], current: list[np.ndarray]) -> list[np.ndarray]:
    """The saved shared model, refused if it belongs to another model or run."""
    keys = [f"shared/{name}" for name in names]
    missing = [n for n in keys if n not in state.arrays]
    if missing:
        raise ValueError(f"server state lacks {', '.join(missing)}: it belongs to another model")
    restored = [state.arrays[n] for n in keys]  # dtype as saved: bit for bit
    if [a.shape for a in restored] != [a.shape for a in current]:
        raise ValueError("server state has other shapes than this run's model: it belongs to another run")
    return restored


def restore_inner(inner: Strategy, state: ServerState, current: list[np.ndarray]) -> None:
    """Give a freshly built wrapped strategy the restored model and its saved moments."""
    if hasattr(inner, "current_weights"):
        inner.current_weights = [a.copy() for a in current]
    for slot in MOMENT_SLOTS:
        moments = [state.arrays[f"inner/{slot}/{i}"] for i in range(len(current)) if f"inner/{slot}/{i}" in state.arrays]
        if moments and hasattr(inner, slot):
            setattr(inner, slot, moments)
