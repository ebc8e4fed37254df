"""Fitting user rows on the device against the frozen global model, outside any round.

Cold start: a user added to a device that has already trained (a kiosk's new customer)
starts from a random embedding. Before that user trains in a round or is shown
recommendations, a few local passes over their handful of interactions fit only their own
rows while every shared parameter stays frozen (the classic fold-in), so their first list
is theirs, not noise.

Learning between rounds: a user who clicks today should not wait for the next round to
see it in their list. Their rows continue from where the last round left them, fitted the
same way to all their interactions, the new ones included.

Either way, rows of the device's other users are untouched: they receive no gradient.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np

from client import store
from client.local import build_local_model, refit_user_rows, user_seed
from client.recommend import needs_fold_in
from client.store import DeviceState
from common.config import FedRecConfig, parse_run_config
from common.errors import DataError, plain_message
from common.federation import ClientData, catalogue_features
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
    if not needs_fold_in(config, state):
        return local_state
    new_users = state.users_without_rows()
    train_config = replace(config.train_config, epochs=max(config.local_epochs, config.eval_refit_epochs))
    return fold_in(config.model_config, train_config, state.client_data(catalogue_features(config)), shared, local_state, new_users,
                   seed=config.seed)


def learn_between_rounds(config: FedRecConfig, state: DeviceState, shared: list[np.ndarray], user: int) -> DeviceState:
    """``state`` with ``user``'s rows refitted to all of their interactions (``local-epochs`` passes).

    The fit starts from the user's current rows and moves only them; their interactions
    enter the next round's training as every interaction does. Returns ``state`` itself
    (nothing to do) for a user without rows yet, who is folded in from scratch when next
    recommended or trained, and under record-level DP, where rows move only by DP-SGD.
    """
    if config.record_dp or not np.isin(int(user), state.row_users):
        return state
    is_user = state.users == int(user)
    fitted = fold_in(config.model_config, config.train_config, state.client_data(catalogue_features(config)), shared,
                     state.local_state(config.model_config, config.seed), is_user, seed=config.seed)
    local_user = int(np.flatnonzero(is_user)[0])
    return state.with_user_rows(user, {name: array[local_user] for name, array in fitted.items()})


def add_interactions_and_learn(
    state_dir: str,
    user: int,
    items: Sequence[int] | np.ndarray,
    ratings: Sequence[float] | np.ndarray | None = None,
) -> tuple[DeviceState, bool]:
    """Record a user's new interactions and update their rows now, against the device's last global model.

    Returns the saved state and whether the rows were updated (not: no global model on the
    device yet, a user without rows, or record-level DP). One lock covers the edit and the
    fit, so a round cannot interleave; bad input is a one-line :class:`DataError`.
    """
    with store.locked(state_dir):
        state = store.load(state_dir)
        try:
            updated = state.with_interactions(user, items, ratings)
        except (KeyError, ValueError) as err:
            raise DataError(plain_message(err), store.state_file(state_dir)) from None
        learned = updated
        if store.global_model_file(state_dir).is_file():
            model = store.load_global_model(state_dir)
            learned = learn_between_rounds(parse_run_config(model.run_config), updated, list(model.shared), user)
        store.save(state_dir, learned)
        return learned, learned is not updated
