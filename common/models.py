"""Recommendation models: biased MF, GMF, MLP and NeuMF (He et al., WWW 2017).

Every model follows one naming rule that the federated code relies on instead of
guessing: parameters of modules named ``user_*`` are **user-local** (they never leave
the device), parameters of modules named ``item_*`` are **shared and item-indexed**
(one row per item, so they are averaged row by row), and everything else (MLP towers,
output layer, global bias, content towers) is **shared and dense**. Only ``nn.Embedding``
and ``nn.Linear`` layers are used so Opacus can compute per-sample gradients for all of
them.

Hybrid models (``content_features`` > 0) add to every item embedding a linear projection
of the item's public content features (genres, year, ...): ``v_i = q_i + W f_i``. The
feature table is a buffer set with :meth:`RecModel.set_item_features`, not a parameter,
so it never travels in an update; ``W`` (``content_*``) is shared and dense. An item no
one has interacted with yet (a new item) is scored from ``W f_i`` alone
(:meth:`RecModel.score_new_items`).
"""

from __future__ import annotations

from collections import OrderedDict
from contextvars import ContextVar
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MODEL_NAMES = ("mf", "gmf", "mlp", "neumf", "als", "ease")
CLOSED_FORM_MODELS = ("als", "ease")  # the server solves the item side from summed statistics, no gradient steps
GRADIENT_MODELS = ("mf", "gmf", "mlp", "neumf")  # trained by gradient steps; each can be a content hybrid
USER_PREFIX = "user_"
ITEM_PREFIX = "item_"
CONTENT_PREFIX = "content_"  # a hybrid model's projection of item features (shared, dense)


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; the same config builds the model on both sides."""

    name: str = "gmf"
    embedding_dim: int = 32
    mlp_layers: tuple[int, ...] = (64, 32, 16)
    init_std: float = 0.01
    content_features: int = 0  # > 0: a hybrid model over this many item content features
    content_dropout: float = 0.0  # hybrid training: share of (user, item) pairs scored from content alone

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; expected one of {', '.join(MODEL_NAMES)}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if any(width < 1 for width in self.mlp_layers):
            raise ValueError(f"mlp_layers must be positive widths, got {self.mlp_layers}")
        if self.content_features < 0:
            raise ValueError(f"content_features must be >= 0, got {self.content_features}")
        if not 0.0 <= self.content_dropout < 1.0:
            raise ValueError(f"content_dropout must be in [0, 1), got {self.content_dropout}")


class RecModel(nn.Module):
    """Base class: scores (user, item) pairs and tells local from shared parameters."""

    def __init__(self, num_users: int, num_items: int) -> None:
        super().__init__()
        self.num_users = num_users
        self.num_items = num_items

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Return one logit (implicit) or predicted rating (explicit) per pair."""
        return self.score_parts(users, self.item_parts(items, self._collaborative_mask(users, items)))

    # --- scoring from item-side parts (what a hybrid model builds from content) ---
    def item_parts(self, items: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The item-side vectors the score needs, per item (collaborative + content).

        ``keep`` ([n, 1], 0 or 1): pairs whose collaborative rows count (see :meth:`_collaborative_mask`).
        """
        raise NotImplementedError

    def new_item_parts(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The same vectors for items with no collaborative row: the content part alone."""
        raise NotImplementedError

    def score_parts(self, users: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """One score per (users[j], parts[.][j]) pair."""
        raise NotImplementedError

    @torch.no_grad()
    def score_new_pairs(self, users: torch.Tensor, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One score per (users[j], features[j]) pair, for items known only by their content features.

        Needs a hybrid model: a pure collaborative model has nothing to score a new item by.
        """
        if self.content_features == 0:
            raise ValueError("a pure collaborative model cannot score new items: set item-features = true (hybrid model)")
        features = torch.as_tensor(np.asarray(features, np.float32))
        if features.ndim != 2 or features.shape[1] != self.content_features or len(features) != len(users):
            raise ValueError(f"new-item features must be [{len(users)}, {self.content_features}], got {tuple(features.shape)}")
        return self.score_parts(users, self.new_item_parts(features))

    def content_scores(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of (known) items from their content alone, as a new item would be scored.

        What ``content-loss-weight`` trains on, next to the full scores of the same pairs.
        """
        if self.content_features == 0:
            raise ValueError("a pure collaborative model has no content scores: set item-features = true (hybrid model)")
        return self.score_parts(users, self.new_item_parts(self.item_features[items]))

    def score_new_items(self, users: torch.Tensor, features: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Scores [len(users), len(features)]: every user against every new item."""
        features = torch.as_tensor(np.asarray(features, np.float32))
        n_users, n_new = len(users), len(features)
        flat = self.score_new_pairs(users.repeat_interleave(n_new), features.repeat(n_users, 1))
        return flat.reshape(n_users, n_new)

    # --- content features (hybrid models) ------------------------------------
    @property
    def content_features(self) -> int:
        features = getattr(self, "item_features", None)
        return 0 if features is None else int(features.shape[1])

    def _init_content(self, num_items: int, num_features: int, dropout: float = 0.0) -> None:
        """Register the (zero) feature buffer of a hybrid model; a pure CF model has none."""
        self.content_dropout = dropout
        self.user_keys: torch.Tensor | None = None  # see set_user_keys
        if num_features > 0:
            self.register_buffer("item_features", torch.zeros(num_items, num_features), persistent=False)
        else:
            self.item_features = None

    def _collaborative_mask(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor | None:
        """Training a hybrid model: which pairs keep their collaborative item rows (None: all).

        A new item has no collaborative row, only ``W f``; trained only as a residual next to
        a free row ``q_i``, ``W f`` learns little on its own. So a ``content_dropout`` share of
        pairs is scored from content alone (DropoutNet's idea). The choice is a hash of the
        pair, not a random draw: no random stream is consumed, so a round stays
        reproducible from its seed, and a pair plays the same role every epoch.
        """
        if not self.training or self.content_features == 0 or self.content_dropout <= 0:
            return None
        keys = users if self.user_keys is None else self.user_keys[users]
        return (_pair_hash(keys, items) % 1000 >= int(self.content_dropout * 1000)).to(torch.float32).unsqueeze(-1)

    def set_user_keys(self, global_users: np.ndarray) -> None:
        """The global id of each local user, for the content-dropout hash.

        A phone's only user is local user 0: hashing the local index would drop the same
        items' rows on every phone, so those rows would never be trained anywhere.
        """
        self.user_keys = torch.as_tensor(np.asarray(global_users, np.int64))

    def set_item_features(self, values: np.ndarray) -> None:
        """Load the item content features (rows aligned with the model's items)."""
        if self.content_features == 0:
            raise ValueError("this model takes no item features (content_features = 0)")
        values = np.asarray(values, np.float32)
        if values.shape != tuple(self.item_features.shape):
            raise ValueError(f"item features must be {tuple(self.item_features.shape)}, got {values.shape}")
        self.item_features.copy_(torch.from_numpy(values))

    def with_content(
        self, vectors: torch.Tensor, content: nn.Linear | None, items: torch.Tensor | None, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``vectors`` (collaborative rows of ``items``; all items when None) plus their content projection."""
        if content is None:
            return vectors
        features = self.item_features if items is None else self.item_features[items]
        return (vectors if keep is None else vectors * keep) + content(features)

    # --- parameter roles -------------------------------------------------------
    def local_parameter_names(self) -> list[str]:
        """User embeddings and biases: trained on the device and never uploaded."""
        return [name for name, _ in self.named_parameters() if name.startswith(USER_PREFIX)]

    def shared_parameter_names(self) -> list[str]:
        """Everything aggregated by the server, in a fixed order."""
        return [name for name, _ in self.named_parameters() if not name.startswith(USER_PREFIX)]

    def item_row_parameter_names(self) -> list[str]:
        """Shared parameters with one row per item (averaged per row, not per table)."""
        return [name for name, _ in self.named_parameters() if name.startswith(ITEM_PREFIX)]

    def shared_state(self) -> OrderedDict[str, np.ndarray]:
        """Copy of the shared parameters as float32 numpy arrays, in shared order."""
        return self._copy_parameters(self.shared_parameter_names())

    def local_state(self) -> OrderedDict[str, np.ndarray]:
        """Copy of the user-local parameters as numpy arrays."""
        return self._copy_parameters(self.local_parameter_names())

    def _copy_parameters(self, names: list[str]) -> OrderedDict[str, np.ndarray]:
        params = dict(self.named_parameters())
        return OrderedDict((name, params[name].detach().cpu().numpy().copy()) for name in names)

    def load_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite the named parameters in place; names and shapes must match exactly."""
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in arrays.items():
                if name not in params:
                    raise KeyError(f"model has no parameter {name!r}")
                target = params[name]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"shape mismatch for {name}: got {tuple(value.shape)}, expected {tuple(target.shape)}"
                    )
                target.copy_(torch.from_numpy(np.asarray(value, dtype=np.float32)))

    @torch.no_grad()
    def score_all_items(self, users: torch.Tensor, batch_pairs: int = 65536) -> torch.Tensor:
        """Scores of every item for each user in ``users``: [len(users), num_items].

        Generic path for models without a closed form: all (user, item) pairs in
        chunks of ``batch_pairs`` through ``forward``.
        """
        n_users, n_items = len(users), self.num_items
        flat_users = users.repeat_interleave(n_items)
        flat_items = torch.arange(n_items).repeat(n_users)
        scores = [self(flat_users[s : s + batch_pairs], flat_items[s : s + batch_pairs]) for s in range(0, len(flat_users), batch_pairs)]
        return torch.cat(scores).reshape(n_users, n_items) if scores else torch.empty(0, n_items)


# Set by empty_model: embedding tables (the bulk of every model) are allocated, not drawn.
_SKIP_EMBEDDING_INIT: ContextVar[bool] = ContextVar("fedrec_skip_embedding_init", default=False)


def _embedding(rows: int, dim: int, std: float) -> nn.Embedding:
    if _SKIP_EMBEDDING_INIT.get():
        return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
    layer = nn.Embedding(rows, dim)
    nn.init.normal_(layer.weight, std=std)
    return layer


def _pair_hash(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """A well-mixed 32-bit hash of (user, item) pairs: neighbouring ids land in unrelated buckets."""
    h = (users * 0x9E3779B1 + items * 0x85EBCA77) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    h = ((h ^ (h >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _content(config: ModelConfig) -> nn.Linear | None:
    """A hybrid model's projection of item features into an embedding space (None: pure CF).

    Starts at zero, so a hybrid model begins exactly where its collaborative twin does.
    """
    if config.content_features == 0:
        return None
    layer = nn.Linear(config.content_features, config.embedding_dim, bias=False)
    nn.init.zeros_(layer.weight)
    return layer


def _tower(in_features: int, widths: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """ReLU tower and its output width (the input width when there are no layers)."""
    layers: list[nn.Module] = []
    for width in widths:
        linear = nn.Linear(in_features, width)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.ReLU()]
        in_features = width
    return nn.Sequential(*layers), in_features


class BiasedMF(RecModel):
    """Dot product of user and item factors plus user, item and global biases."""

    def __init__(self, num_users: int, num_items: int, config: ModelConfig) -> None:
        super().__init__(num_users, num_items)
        dim, std = config.embedding_dim, config.init_std
        self.user_embedding = _embedding(num_users, dim, std)
        self.user_bias = _embedding(num_users, 1, 0.0)
        self.item_embedding = _embedding(num_items, dim, std)
        self.item_bias = _embedding(num_items, 1, 0.0)
        # An Embedding(1, 1) rather than a bare Parameter, because Opacus can only
        # compute per-sample gradients for parameters that live in supported layers.
        self.global_bias = _embedding(1, 1, 0.0)
        self.content_embedding = _content(config)
        self._init_content(num_items, config.content_features, config.content_dropout)

    def item_parts(self, items: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        bias = self.item_bias(items)
        return self.with_content(self.item_embedding(items), self.content_embedding, items, keep), \
            (bias if keep is None else bias * keep)

    def new_item_parts(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.content_embedding(features), torch.zeros(len(features), 1)

    def score_parts(self, users: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        vectors, item_bias = parts
        dot = (self.user_embedding(users) * vectors).sum(-1)
        bias = self.user_bias(users).squeeze(-1) + item_bias.squeeze(-1)
        return dot + bias + self.global_bias(torch.zeros_like(users)).squeeze(-1)

    @torch.no_grad()
    def score_all_items(self, users: torch.Tensor, batch_pairs: int = 65536) -> torch.Tensor:
        scores = self.user_embedding(users) @ self.with_content(self.item_embedding.weight, self.content_embedding, None).T
        scores += self.user_bias(users) + self.item_bias.weight.T
        return scores + self.global_bias.weight[0, 0]


class _OneItemTable(RecModel):
    """Item side of GMF and MLP: one ``item_embedding`` (plus ``content_embedding`` when hybrid)."""

    item_embedding: nn.Embedding
    content_embedding: nn.Linear | None

    def item_parts(self, items: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return (self.with_content(self.item_embedding(items), self.content_embedding, items, keep),)

    def new_item_parts(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (self.content_embedding(features),)


class GMF(_OneItemTable):
    """Generalized MF: element-wise product of embeddings, then a learned linear output."""

    def __init__(self, num_users: int, num_items: int, config: ModelConfig) -> None:
        super().__init__(num_users, num_items)
        dim, std = config.embedding_dim, config.init_std
        self.user_embedding = _embedding(num_users, dim, std)
        self.item_embedding = _embedding(num_items, dim, std)
        self.output = nn.Linear(dim, 1)
        nn.init.normal_(self.output.weight, mean=1.0 / dim**0.5, std=0.01)
        nn.init.zeros_(self.output.bias)
        self.content_embedding = _content(config)
        self._init_content(num_items, config.content_features, config.content_dropout)

    def score_parts(self, users: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.output(self.user_embedding(users) * parts[0]).squeeze(-1)

    @torch.no_grad()
    def score_all_items(self, users: torch.Tensor, batch_pairs: int = 65536) -> torch.Tensor:
        weighted_users = self.user_embedding(users) * self.output.weight
        items = self.with_content(self.item_embedding.weight, self.content_embedding, None)
        return weighted_users @ items.T + self.output.bias


class MLP(_OneItemTable):
    """Concatenated embeddings through a ReLU tower (the MLP branch of NCF)."""

    def __init__(self, num_users: int, num_items: int, config: ModelConfig) -> None:
        super().__init__(num_users, num_items)
        dim, std = config.embedding_dim, config.init_std
        self.user_embedding = _embedding(num_users, dim, std)
        self.item_embedding = _embedding(num_items, dim, std)
        self.tower, tower_out = _tower(2 * dim, config.mlp_layers)
        self.output = nn.Linear(tower_out, 1)
        self.content_embedding = _content(config)
        self._init_content(num_items, config.content_features, config.content_dropout)

    def score_parts(self, users: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        joint = torch.cat([self.user_embedding(users), parts[0]], dim=-1)
        return self.output(self.tower(joint)).squeeze(-1)


class _DotProduct(_OneItemTable):
    """A closed-form model whose score is the plain dot product of the user row and the item row."""

    def score_parts(self, users: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return (self.user_embedding(users) * parts[0]).sum(-1)

    @torch.no_grad()
    def score_all_items(self, users: torch.Tensor, batch_pairs: int = 65536) -> torch.Tensor:
        return self.user_embedding(users) @ self.item_embedding.weight.T


class ALSFactors(_DotProduct):
    """Implicit-feedback ALS's factors: score = user factor . item factor (no bias, no output layer).

    Trained by closed-form solves (:mod:`common.als`), not by gradient steps: a device solves
    its user row from the item factors it received whenever it needs it.
    """

    def __init__(self, num_users: int, num_items: int, config: ModelConfig) -> None:
        super().__init__(num_users, num_items)
        dim, std = config.embedding_dim, config.init_std
        self.user_embedding = _embedding(num_users, dim, std)
        self.item_embedding = _embedding(num_items, dim, std)
        self.content_embedding = None
        self._init_content(num_items, 0)


class EASEWeights(_DotProduct):
    """EASE's item-item weights as a factor model: score(u, i) = x_u . B[:, i] (:mod:`common.ease`).

    The "user embedding" is the user's binary training vector ``x_u`` (it never leaves the
    device and is rebuilt from the device's own interactions), and row ``i`` of
    ``item_embedding`` is column ``i`` of ``B``, so the shared table is ``B^T`` (items x items;
    ``embedding-dim`` does not apply). It starts at zero: before the first solve every item scores 0.
    """

    def __init__(self, num_users: int, num_items: int, config: ModelConfig) -> None:
        super().__init__(num_users, num_items)
        self.user_embedding = _embedding(num_users, num_items, 0.0)
        self.item_embedding = _embedding(num_items, num_items, 0.0)
        if not _SKIP_EMBEDDING_INIT.get():
            nn.init.zeros_(self.user_embedding.weight)
            nn.init.zeros_(self.item_embedding.weight)
        self.content_embedding = None
        self._init_content(num_items, 0)


class NeuMF(RecModel):
    """GMF and MLP branches with separate embeddings, fused by one output layer."""

    def __init__(self, num_users: int, num_items: int, config: ModelConfig) -> None:
        super().__init__(num_users, num_items)
        dim, std = config.embedding_dim, config.init_std
        self.user_gmf_embedding = _embedding(num_users, dim, std)
        self.item_gmf_embedding = _embedding(num_items, dim, std)
        self.user_mlp_embedding = _embedding(num_users, dim, std)
        self.item_mlp_embedding = _embedding(num_items, dim, std)
        self.tower, tower_out = _tower(2 * dim, config.mlp_layers)
        self.output = nn.Linear(dim + tower_out, 1)
        self.content_gmf_embedding = _content(config)
        self.content_mlp_embedding = _content(config)
        self._init_content(num_items, config.content_features, config.content_dropout)

    def item_parts(self, items: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        return (self.with_content(self.item_gmf_embedding(items), self.content_gmf_embedding, items, keep),
                self.with_content(self.item_mlp_embedding(items), self.content_mlp_embedding, items, keep))

    def new_item_parts(self, features: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.content_gmf_embedding(features), self.content_mlp_embedding(features)

    def score_parts(self, users: torch.Tensor, parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
        gmf = self.user_gmf_embedding(users) * parts[0]
        mlp = self.tower(torch.cat([self.user_mlp_embedding(users), parts[1]], dim=-1))
        return self.output(torch.cat([gmf, mlp], dim=-1)).squeeze(-1)


_MODELS: dict[str, type[RecModel]] = {"mf": BiasedMF, "gmf": GMF, "mlp": MLP, "neumf": NeuMF, "als": ALSFactors,
                                 "ease": EASEWeights}


def empty_model(config: ModelConfig, num_users: int, num_items: int) -> RecModel:
    """A model whose embedding tables are allocated but not drawn, for callers that overwrite every weight.

    A device rebuilds its model from the server's shared arrays and its own user rows every
    round; drawing random initial weights only to overwrite them was half of a round's time
    with a 20,000-item table (GMF, 20 interactions, one process: 12.5 ms per update, 6-7 ms
    without the draws).
    """
    token = _SKIP_EMBEDDING_INIT.set(True)
    try:
        return _MODELS[config.name](num_users, num_items, config)
    finally:
        _SKIP_EMBEDDING_INIT.reset(token)


def build_model(config: ModelConfig, num_users: int, num_items: int, *, seed: int | None = None) -> RecModel:
    """Build a model; with ``seed`` the initial weights are reproducible."""
    if seed is None:
        return _MODELS[config.name](num_users, num_items, config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _MODELS[config.name](num_users, num_items, config)
