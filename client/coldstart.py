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
from client.store import DeviceState
from common.config import FedRecConfig
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


def device_rows(config: FedRecConfig, state: DeviceState, shared: list[np.ndarray]) -> dict[str, np.ndarray]:
    """A device state's user rows, with users added since the device last trained folded in.

    A device that never trained (no rows at all) starts as the default path does, from
    fresh rows; fold-in is for newcomers to a device that already follows the model.
    Under record-level DP there is no fold-in: it would fit rows to the user's records
    outside DP-SGD, and those rows shape every later upload.
    """
    local_state = state.local_state(config.model_config, config.seed)
    new_users = state.users_without_rows()
    if config.record_dp or len(state.row_users) == 0 or not new_users.any():
        return local_state
    train_config = replace(config.train_config, epochs=max(config.local_epochs, config.eval_refit_epochs))
    return fold_in(config.model_config, train_config, state.client_data(), shared, local_state, new_users,
                   seed=config.seed)
