"""Cold start on the device: fold a newly added user in against the frozen global item side.

A user added to a device that has already trained (a kiosk's new customer) starts from a
random embedding. Before that user trains in a round or is shown recommendations, a few
local passes over their handful of interactions fit only their own rows while every
shared parameter stays frozen (the classic fold-in), so their first list is theirs, not
noise. Rows of the device's other users are untouched: they receive no gradient.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from client.local import build_local_model, refit_user_rows, user_seed
from common.federation import ClientData
from common.models import ModelConfig
from common.training import TrainConfig


def fold_in(
    model_config: ModelConfig,
    train_config: TrainConfig,
    data: ClientData,
    shared: list[np.ndarray],
    local_state: dict[str, np.ndarray],
    new_users: np.ndarray,
    *,
    seed: int,
) -> dict[str, np.ndarray]:
    """``local_state`` with the rows of the local users flagged in ``new_users`` fitted.

    Only those users' interactions are used, so only their rows get a gradient; a user
    without interactions keeps the fresh row (a popularity fallback serves them).
    """
    mask = np.asarray(new_users, dtype=bool)[data.train_users]
    if not mask.any():
        return local_state
    own = replace(data, train_users=data.train_users[mask], train_items=data.train_items[mask],
                  train_ratings=data.train_ratings[mask])
    model = build_local_model(model_config, data, shared, local_state, user_seed(seed, data))
    refit_user_rows(model, own, replace(train_config, proximal_mu=0.0), seed=seed)
    return {name: np.asarray(value) for name, value in model.local_state().items()}
