"""On-device top-K: rank the catalogue for one local user, never showing what they have seen.

Everything needed is already on the device after a round: the user's own rows (the
``local_state`` kept in ``Context.state``) and the latest global shared parameters. Scores
for all items come from one batched ``score_all_items`` call (closed form for MF/GMF, one
forward pass over every (user, item) pair for MLP/NeuMF); nothing is sent anywhere.

Ordering is deterministic: higher score first, ties broken by the lower item id (a stable
sort over item ids), so the same state always gives the same list on every device.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from client import store
from client.store import DeviceState
from common.config import FedRecConfig, parse_run_config
from common.errors import DataError, plain_message
from common.federation import ClientData, catalogue_features
from common.models import ModelConfig, RecModel, build_model

__all__ = [
    "DeviceRecommendation", "device_model", "rank_unseen", "recommend", "recommend_for_client", "recommend_for_state",
    "recommend_on_device", "seen_mask", "torch_threads",
]


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``, then restore the old value.

    A phone app shares its cores with the UI, so a recommendation should not grab all of
    them. ``torch.set_num_threads`` is process-wide: do not change it concurrently from
    several Python threads. ``None`` leaves the current setting alone.
    """
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def device_model(
    model_config: ModelConfig,
    shared: Sequence[np.ndarray],
    local_state: Mapping[str, np.ndarray],
    item_features: np.ndarray | None = None,
) -> RecModel:
    """The device's model from the global shared arrays and its own user rows.

    Unlike :func:`client.local.build_local_model` it needs no :class:`ClientData` (the
    catalogue size is read from the shared item tables, the number of local users from the
    user tables), and it refuses a missing user table: a freshly initialised embedding
    would give confident-looking but meaningless recommendations.
    """
    probe = build_model(model_config, 1, 1, seed=0)
    shared_names, local_names = probe.shared_parameter_names(), probe.local_parameter_names()
    if len(shared) != len(shared_names):
        raise ValueError(f"received {len(shared)} shared arrays, the {model_config.name} model has {len(shared_names)}")
    missing = sorted(set(local_names) - set(local_state))
    if missing:
        raise ValueError(f"local_state lacks {', '.join(missing)}: this device has no trained user rows yet")
    shared_by_name = dict(zip(shared_names, shared, strict=True))
    num_items = int(shared_by_name[probe.item_row_parameter_names()[0]].shape[0])
    num_users = int(local_state[local_names[0]].shape[0])
    model = build_model(model_config, num_users, num_items, seed=0)  # every value is overwritten below
    model.load_arrays(shared_by_name)
    model.load_arrays({name: local_state[name] for name in local_names})
    if model.content_features:
        if item_features is None:
            raise ValueError("the hybrid model (item-features) needs the catalogue's item features")
        model.set_item_features(item_features)
    return model.eval()


def seen_mask(num_items: int, *seen: np.ndarray | Sequence[int] | None) -> torch.Tensor:
    """Boolean [num_items] mask of every item in any of ``seen``; ids must be in range."""
    mask = torch.zeros(num_items, dtype=torch.bool)
    for items in seen:
        if items is None:
            continue
        ids = torch.as_tensor(np.asarray(items, dtype=np.int64).reshape(-1))
        if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= num_items):
            raise ValueError(f"seen item ids must be in [0, {num_items}), got {int(ids.min())}..{int(ids.max())}")
        mask[ids] = True
    return mask


def rank_unseen(scores: torch.Tensor, seen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` unseen items of a [num_items] score vector, best first, ties by lower id.

    Seen items are dropped before sorting rather than set to ``-inf``, so an item whose
    own score is ``-inf`` can never tie with a seen one. Returns fewer than ``k`` items
    only when fewer are unseen. The exported TorchScript module runs the same steps.
    """
    candidates = torch.nonzero(~seen).squeeze(1)
    candidate_scores = scores[candidates]
    order = torch.sort(candidate_scores, descending=True, stable=True).indices[:k]
    return candidates[order], candidate_scores[order]


def _check_request(model: RecModel, local_user: int, k: int) -> None:
    if not 0 <= local_user < model.num_users:
        raise IndexError(f"local user {local_user} out of range: this device holds {model.num_users} user(s)")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def recommend(
    model: RecModel,
    local_user: int,
    seen_items: np.ndarray | Sequence[int] | None,
    k: int = 10,
    *,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (item ids int64, scores float32) for ``local_user``, best first.

    ``seen_items`` are excluded (pass the training items plus anything else the user
    consumed). ``num_threads`` caps intra-op threads for this call (see :func:`torch_threads`).
    """
    _check_request(model, local_user, k)
    mask = seen_mask(model.num_items, seen_items)
    model.eval()
    with torch_threads(num_threads), torch.inference_mode():
        scores = model.score_all_items(torch.tensor([local_user]))[0]
        items, top = rank_unseen(scores, mask, k)
    return items.numpy(), top.numpy()


def recommend_for_client(
    model_config: ModelConfig,
    data: ClientData,
    shared: Sequence[np.ndarray],
    local_state: Mapping[str, np.ndarray],
    local_user: int,
    k: int = 10,
    *,
    extra_seen: np.ndarray | Sequence[int] | None = None,
    num_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`recommend` from what a ClientApp holds: its data, the round's shared arrays, its state.

    The user's training items are always excluded; ``extra_seen`` adds items consumed since.
    """
    model = device_model(model_config, shared, local_state, data.item_features)
    if model.num_users != data.num_users or model.num_items != data.num_items:
        raise ValueError(
            f"local_state/shared arrays are for {model.num_users} users x {model.num_items} items, "
            f"the client data for {data.num_users} x {data.num_items}"
        )
    _check_request(model, local_user, k)
    trained = data.train_items[data.train_users == local_user]
    seen = np.concatenate([trained, np.asarray(extra_seen if extra_seen is not None else [], dtype=np.int64).reshape(-1)])
    return recommend(model, local_user, seen, k, num_threads=num_threads)


@dataclass(frozen=True)
class DeviceRecommendation:
    """A top-K list shown on the device, and where it came from."""

    items: np.ndarray  # int64 item ids, best first
    scores: np.ndarray  # float32 model scores; NaN for the popularity fallback (the server publishes a ranking only)
    source: str  # "model": the user's rows and the global model; "popular": the server's popular items
    model_round: int  # the round of the global model (or of the published list) used


def needs_fold_in(config: FedRecConfig, state: DeviceState) -> bool:
    """Whether users added since the device last trained must be fitted before they are served.

    Never under record-level DP (rows move only by DP-SGD) and never on a device that has not
    trained yet (everyone starts from fresh rows, as in a round).
    """
    return not config.record_dp and len(state.row_users) > 0 and bool(state.users_without_rows().any())


def serving_rows(config: FedRecConfig, state: DeviceState, shared: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The user rows to rank with; training code is imported only when a newcomer must be folded in.

    Serving a list from stored rows needs torch and the model, not the training loop, Opacus
    or Flower: keeping those out halves the resident memory of ``fedrec recommend``.
    """
    if not needs_fold_in(config, state):
        return state.local_state(config.model_config, config.seed)
    from client.coldstart import device_rows  # a training step (fold-in): imports training code

    return device_rows(config, state, shared)


def recommend_for_state(
    config: FedRecConfig,
    state: DeviceState,
    model: store.GlobalModel,
    user: int,
    k: int = 10,
    *,
    extra_seen: np.ndarray | Sequence[int] | None = None,
    num_threads: int | None = None,
) -> DeviceRecommendation:
    """Top-``k`` for one of a device state's users (a global id), against ``model``.

    A user added since the device last trained is folded in first (as before a round). A
    user with no interactions has nothing personal to rank by: they get the popular items
    the server published (minus ``extra_seen``), never a list drawn from a random
    embedding. Under record-level DP a newcomer has no rows until their first round (no
    fold-in outside DP-SGD), and that is an error.
    """
    if not state.has_user(user):
        raise KeyError(f"user {user} is not on this device")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not (state.train_users == user).any():
        if len(model.popular_items) == 0:
            raise ValueError(
                f"user {user} has no interactions on this device yet, and the server has published no popular "
                "items to fall back on (it publishes none under differential privacy or with popular-items=0)"
            )
        seen = seen_mask(state.num_items, extra_seen)
        popular = np.asarray(model.popular_items, np.int64)
        items = popular[~seen[torch.as_tensor(popular)].numpy()][:k]
        return DeviceRecommendation(items, np.full(len(items), np.nan, np.float32), "popular", model.server_round)
    if config.record_dp and not np.isin(user, state.row_users):
        raise ValueError(
            f"user {user} has no trained rows yet (no fold-in under record-level DP): they get them in their first round"
        )
    local_user = int(np.flatnonzero(state.users == user)[0])
    local_state = serving_rows(config, state, list(model.shared))
    items, scores = recommend_for_client(config.model_config, state.client_data(catalogue_features(config)), model.shared, local_state,
                                         local_user, k, extra_seen=extra_seen, num_threads=num_threads)
    return DeviceRecommendation(items, scores, "model", model.server_round)


def recommend_on_device(
    state_dir: str,
    user: int,
    k: int = 10,
    *,
    extra_seen: np.ndarray | Sequence[int] | None = None,
    num_threads: int | None = None,
) -> DeviceRecommendation:
    """Top-``k`` from a device's ``state-dir``: its users and rows plus the last global model it received.

    Works between rounds and after a restart, with no server. Bad requests are a one-line
    :class:`DataError` naming the state file.
    """
    with store.locked(state_dir):
        state = store.load(state_dir)
        model = store.load_global_model(state_dir)
    try:
        return recommend_for_state(parse_run_config(model.run_config), state, model, user, k,
                                   extra_seen=extra_seen, num_threads=num_threads)
    except (KeyError, ValueError, IndexError) as err:
        raise DataError(plain_message(err), store.state_file(state_dir)) from None
