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
