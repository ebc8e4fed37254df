"""Export one user's recommender (shared model + that user's rows) to TorchScript.

A phone runtime (LibTorch, PyTorch Mobile) cannot run this repository's Python, so the
device bakes the latest global parameters and its own user rows into one self-contained
file after a round. The exported module mirrors :meth:`RecModel.score_all_items` operation
for operation and ranks with the same :func:`client.recommend.rank_unseen`, so it gives the
same items (and the same scores up to float rounding) as the Python path; the tests check it.

Calling convention of the saved module (Python ``torch.jit.load`` or C++ ``torch::jit::load``)::

    items, scores = module(extra_seen, k)   # extra_seen: int64 ids (may be empty), k: int >= 1
    all_scores = module.scores()            # float32 [num_items], seen items included

The user's training items are baked in and always excluded; ``extra_seen`` adds items the
user consumed since the export. Fewer than ``k`` items come back only when fewer are unseen.
Errors (``k < 1``, ids out of range) raise ``torch.jit.Error`` carrying the message.

The file holds the user's embedding and history: it is as private as ``local_state`` and
must stay on the device. ONNX is not offered: the legacy exporter cannot export the sort
with a seen mask, and the ``onnx``/``onnxruntime`` packages needed to check a file are not
dependencies. TorchScript is deprecated upstream in favour of ``torch.export``/ExecuTorch,
but it is still what LibTorch and the PyTorch Mobile runtimes load.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from client.recommend import device_model, rank_unseen, seen_mask
from common.federation import ClientData
from common.models import GMF, MLP, BiasedMF, ModelConfig, NeuMF, RecModel

__all__ = ["EXPORT_FORMAT", "export_for_client", "export_torchscript", "scripted_recommender"]

EXPORT_FORMAT = 1  # bump when the calling convention of the saved module changes
METADATA_FILE = "fedrec.json"  # TorchScript "extra file" with what a runtime needs to know


def _frozen(value: torch.Tensor) -> torch.Tensor:
    return value.detach().clone().requires_grad_(False)


def _frozen_module(module: nn.Module) -> nn.Module:
    """A copy without autograd, so the device pays no graph-building cost per call."""
    clone = copy.deepcopy(module)
    for param in clone.parameters():
        param.requires_grad_(False)
    return clone


@torch.no_grad()
def _item_vectors(model: RecModel, table: nn.Embedding, content: nn.Linear | None) -> torch.Tensor:
    """Every item's vector as the model scores it: the collaborative row plus, in a hybrid
    model, the projection of the item's features (baked in: a device ranks known items only)."""
    return _frozen(model.with_content(table.weight, content, None))


class _MFScores(nn.Module):
    """``BiasedMF.score_all_items`` for one user."""

    def __init__(self, model: BiasedMF, user: int) -> None:
        super().__init__()
        self.register_buffer("user", _frozen(model.user_embedding.weight[user : user + 1]))
        self.register_buffer("user_bias", _frozen(model.user_bias.weight[user : user + 1]))
        self.register_buffer("items", _item_vectors(model, model.item_embedding, model.content_embedding))
        self.register_buffer("item_bias", _frozen(model.item_bias.weight))
        self.register_buffer("global_bias", _frozen(model.global_bias.weight))

    def forward(self) -> torch.Tensor:
        scores = self.user @ self.items.T
        scores += self.user_bias + self.item_bias.T
        return (scores + self.global_bias[0, 0])[0]


class _GMFScores(nn.Module):
    """``GMF.score_all_items`` for one user."""

    def __init__(self, model: GMF, user: int) -> None:
        super().__init__()
        self.register_buffer("user", _frozen(model.user_embedding.weight[user : user + 1]))
        self.register_buffer("items", _item_vectors(model, model.item_embedding, model.content_embedding))
        self.register_buffer("weight", _frozen(model.output.weight))
        self.register_buffer("bias", _frozen(model.output.bias))

    def forward(self) -> torch.Tensor:
        return ((self.user * self.weight) @ self.items.T + self.bias)[0]


class _MLPScores(nn.Module):
    """``MLP.forward`` over every item for one user (what ``score_all_items`` batches)."""

    def __init__(self, model: MLP, user: int) -> None:
        super().__init__()
        self.register_buffer("user", _frozen(model.user_embedding.weight[user : user + 1]))
        self.register_buffer("items", _item_vectors(model, model.item_embedding, model.content_embedding))
        self.tower = _frozen_module(model.tower)
        self.output = _frozen_module(model.output)

    def forward(self) -> torch.Tensor:
        joint = torch.cat([self.user.expand(self.items.shape[0], -1), self.items], dim=-1)
        return self.output(self.tower(joint)).squeeze(-1)


class _NeuMFScores(nn.Module):
    """``NeuMF.forward`` over every item for one user."""

    def __init__(self, model: NeuMF, user: int) -> None:
        super().__init__()
        self.register_buffer("user_gmf", _frozen(model.user_gmf_embedding.weight[user : user + 1]))
        self.register_buffer("items_gmf", _item_vectors(model, model.item_gmf_embedding, model.content_gmf_embedding))
        self.register_buffer("user_mlp", _frozen(model.user_mlp_embedding.weight[user : user + 1]))
        self.register_buffer("items_mlp", _item_vectors(model, model.item_mlp_embedding, model.content_mlp_embedding))
        self.tower = _frozen_module(model.tower)
        self.output = _frozen_module(model.output)

    def forward(self) -> torch.Tensor:
        gmf = self.user_gmf * self.items_gmf
        user_mlp = self.user_mlp.expand(self.items_mlp.shape[0], -1)
        mlp = self.tower(torch.cat([user_mlp, self.items_mlp], dim=-1))
        return self.output(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)


_SCORERS: dict[type[RecModel], type[nn.Module]] = {BiasedMF: _MFScores, GMF: _GMFScores, MLP: _MLPScores, NeuMF: _NeuMFScores}


class UserRecommender(nn.Module):
    """Top-K for one user: baked-in seen items plus ``extra_seen`` are excluded."""

    def __init__(self, scorer: nn.Module, seen: torch.Tensor) -> None:
        super().__init__()
        self.scorer = scorer
        self.register_buffer("seen", seen)
        self.num_items: int = int(seen.shape[0])

    def forward(self, extra_seen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k < 1:
            raise ValueError("k must be >= 1")
        mask = self.seen.clone()
        if extra_seen.numel() > 0:
            if int(extra_seen.min()) < 0 or int(extra_seen.max()) >= self.num_items:
                raise ValueError("extra_seen item ids must be in [0, num_items)")
            mask[extra_seen.to(torch.long)] = True
        return rank_unseen(self.scorer(), mask, k)

    @torch.jit.export
    def scores(self) -> torch.Tensor:
        """Scores of every item (seen ones too), for a runtime that ranks by itself."""
        return self.scorer()


@contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """Silence torch's "TorchScript / Lite Interpreter is deprecated" warnings: see the module doc."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(torch\.jit\.\w+`? is|Lite Interpreter is) deprecated", category=DeprecationWarning)
        yield


def scripted_recommender(
    model: RecModel, local_user: int, seen_items: np.ndarray | Sequence[int] | None = None
) -> torch.jit.ScriptModule:
    """The TorchScript module for ``local_user`` of ``model`` (not yet saved)."""
    if not 0 <= local_user < model.num_users:
        raise IndexError(f"local user {local_user} out of range: this device holds {model.num_users} user(s)")
    scorer_type = _SCORERS.get(type(model))
    if scorer_type is None:
        raise TypeError(f"no TorchScript export for {type(model).__name__}")
    module = UserRecommender(scorer_type(model, local_user), seen_mask(model.num_items, seen_items)).eval()
    with _quiet_torchscript():
        return torch.jit.script(module)


def _atomic_save(write, path: Path) -> None:
    """Call ``write(tmp_path)``, fsync, then ``os.replace``: readers see the old file or the new, never half."""
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def export_torchscript(
    model: RecModel,
    local_user: int,
    path: str | os.PathLike[str],
    *,
    seen_items: np.ndarray | Sequence[int] | None = None,
    lite: bool = False,
) -> Path:
    """Write ``local_user``'s recommender to ``path`` atomically and return the path.

    ``lite=True`` writes the PyTorch Mobile lite-interpreter format (``.ptl``, load with
    ``LiteModuleLoader`` on Android or ``torch.jit.mobile._load_for_lite_interpreter``);
    otherwise a full TorchScript archive for ``torch.jit.load`` / ``torch::jit::load``.
    """
    path = Path(path)
    scripted = scripted_recommender(model, local_user, seen_items)
    metadata = {
        "format": EXPORT_FORMAT,
        "model": type(model).__name__,
        "num_items": model.num_items,
        "call": "forward(extra_seen: int64[n], k: int) -> (items: int64[<=k], scores: float32[<=k]); scores() -> float32[num_items]",
    }
    extra = {METADATA_FILE: json.dumps(metadata)}
    with _quiet_torchscript():
        if lite:
            _atomic_save(lambda tmp: scripted._save_for_lite_interpreter(tmp, _extra_files=extra), path)
        else:
            _atomic_save(lambda tmp: torch.jit.save(scripted, tmp, _extra_files=extra), path)
    return path


def export_for_client(
    model_config: ModelConfig,
    data: ClientData,
    shared: Sequence[np.ndarray],
    local_state: Mapping[str, np.ndarray],
    local_user: int,
    path: str | os.PathLike[str],
    *,
    lite: bool = False,
) -> Path:
    """:func:`export_torchscript` from what a ClientApp holds; bakes in the user's training items."""
    model = device_model(model_config, shared, local_state, data.item_features)
    if not 0 <= local_user < model.num_users:
        raise IndexError(f"local user {local_user} out of range: this device holds {model.num_users} user(s)")
    trained = data.train_items[data.train_users == local_user]
    return export_torchscript(model, local_user, path, seen_items=trained, lite=lite)


# --- from a finished run to one user's file, on the device ------------------------------------
FINAL_CHECKPOINT = Path("checkpoints") / "final.npz"  # written by the server after the last round


def final_global_model(run_dir: str | os.PathLike[str]) -> tuple[dict, list[np.ndarray], int]:
    """A run's run-config, final shared arrays (in the model's order) and last round.

    The final checkpoint holds the global model every device receives anyway and no user
    rows: copying it (and ``config.json``) to a device reveals nothing about any user.
    Bad or missing files are a one-line :class:`DataError`.
    """
    from common.config import parse_run_config
    from common.errors import DataError
    from common.models import build_model

    run_dir = Path(run_dir)
    for path in (run_dir / "config.json", run_dir / FINAL_CHECKPOINT):
        if not path.is_file():
            raise DataError("not found: a finished `fedrec simulate` or deployed run writes it", path)
    try:
        run_config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["run_config"]
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"not a run's config.json ({type(err).__name__}: {err})", run_dir / "config.json") from None
    config = parse_run_config(run_config)
    names = build_model(config.model_config, 1, 1, seed=0).shared_parameter_names()
    try:
        with np.load(run_dir / FINAL_CHECKPOINT, allow_pickle=False) as npz:
            missing = [name for name in names if name not in npz.files]
            if missing:
                raise DataError(f"lacks {', '.join(missing)}: the checkpoint is not of this run's {config.model} model",
                                run_dir / FINAL_CHECKPOINT)
            return run_config, [npz[name] for name in names], int(npz["__round__"])
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - zip and npy-header errors all mean a damaged file
        raise DataError(f"unreadable checkpoint ({type(err).__name__}: {err})", run_dir / FINAL_CHECKPOINT) from None


def user_rows(config, state, shared: Sequence[np.ndarray], user: int) -> dict[str, np.ndarray]:
    """The device's user rows with ``user``'s trained rows, or fitted now if the device has none for them.

    A simulated device's rows died with the simulation, and a user added to a kiosk since its
    last round has none either: their rows are fitted on the device, against the frozen final
    model, from their own interactions only (the fold-in of :mod:`client.coldstart`). The rows
    go into the exported file and nowhere else.
    """
    from dataclasses import replace

    from client.coldstart import fold_in
    from common.federation import catalogue_features

    local_state = state.local_state(config.model_config, config.seed)
    if np.isin(user, state.row_users):
        return local_state
    if not (state.train_users == user).any():
        raise ValueError(f"user {user} has no interactions on this device: there is nothing to fit their rows to")
    train_config = replace(config.train_config, epochs=max(config.local_epochs, config.eval_refit_epochs))
    return fold_in(config.model_config, train_config, state.client_data(catalogue_features(config)), list(shared),
                   local_state, state.users == user, seed=config.seed)


def device_state_for(config, user: int, state_dir: str | None, partition_id: int | None):
    """The device's state: its ``state-dir``, or the data partition the run gave it (the user's, if not named)."""
    from client import store
    from common.federation import slicer_cached

    if state_dir is not None:
        return store.load(state_dir)
    slicer = slicer_cached(config)
    if partition_id is None:
        holders = [p for p, part in enumerate(slicer.parts) if np.isin(user, part.users)]
        if not holders:
            raise KeyError(f"user {user} is in no partition of this run's data ({config.dataset}, "
                           f"{slicer.prepared.num_users} users)")
        partition_id = holders[0]
    return store.DeviceState.from_client_data(slicer.client(partition_id), partition_id)


def export_from_run(
    run_dir: str | os.PathLike[str],
    user: int,
    path: str | os.PathLike[str],
    *,
    state_dir: str | None = None,
    partition_id: int | None = None,
    lite: bool = False,
) -> tuple[Path, int]:
    """One user's recommender file from a run's final model and the device's own data; returns (path, round).

    Runs on the device: the final global model comes from the run directory, the user's
    interactions and rows from the device (its ``state_dir``, or the partition the run gave
    it). Bad requests are a one-line :class:`DataError`.
    """
    from common.config import parse_run_config
    from common.errors import DataError, plain_message
    from common.federation import catalogue_features

    run_config, shared, server_round = final_global_model(run_dir)
    config = parse_run_config(run_config)
    try:
        state = device_state_for(config, user, state_dir, partition_id)
        if not state.has_user(user):
            raise KeyError(f"user {user} is not on this device")
        local_state = user_rows(config, state, shared, user)
        local_user = int(np.flatnonzero(state.users == user)[0])
        data = state.client_data(catalogue_features(config))
        return export_for_client(config.model_config, data, shared, local_state, local_user, path, lite=lite), server_round
    except (KeyError, ValueError, IndexError) as err:
        raise DataError(plain_message(err), state_dir) from None
