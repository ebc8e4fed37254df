"""Single entry point that turns a dataset name (+ path) into Interactions.

Shared by the CLI and the Flower apps so every process of a federation loads
the same data the same way. Real datasets are never downloaded here: their
licences require the user to fetch them, so a missing path is a clear error.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from common.errors import DataError
from common.interactions import Interactions
from common.loaders import find_movielens_file, load_csv, load_movielens, load_parquet
from common.synthetic import generate_synthetic

__all__ = ["DATASET_NAMES", "load_dataset", "dataset_summary"]

# Expected MovieLens ratings file for each release name.
_MOVIELENS = {
    "movielens-100k": "u.data",
    "movielens-1m": "ratings.dat",
    "movielens-10m": "ratings.dat",
    "movielens-20m": "ratings.csv",
    "movielens-25m": "ratings.csv",
    "movielens-latest": "ratings.csv",
}
DATASET_NAMES: tuple[str, ...] = ("synthetic", *_MOVIELENS, "csv", "parquet")
_SYNTHETIC_OPTIONS = frozenset({"dim", "mean_interactions", "min_interactions", "popularity_exponent"})
_CSV_OPTIONS = frozenset({"user_col", "item_col", "rating_col", "timestamp_col", "delimiter", "has_header"})
_PARQUET_OPTIONS = frozenset({"user_col", "item_col", "rating_col", "timestamp_col"})


def load_dataset(
    name: str,
    *,
    path: str | os.PathLike[str] | None = None,
    seed: int = 0,
    num_users: int = 1000,
    num_items: int = 500,
    implicit_threshold: float | None = None,
    **csv_options: Any,
) -> Interactions:
    """Load dataset ``name`` (one of :data:`DATASET_NAMES`).

    ``synthetic`` needs no path and uses ``num_users``/``num_items``/``seed``
    plus the options dim, mean_interactions, min_interactions,
    popularity_exponent. ``csv``/``parquet`` use the options user_col,
    item_col, rating_col, timestamp_col (CSV also delimiter, has_header).
    MovieLens names need ``path`` to the user's download (folder or ratings
    file). A caller (CLI, Flower app) may pass every option from its config
    whatever the dataset: options that don't apply to ``name`` are ignored,
    but an option name no dataset knows is an error (catches typos).
    ``implicit_threshold`` converts to implicit feedback (rows with
    rating >= threshold, rating 1.0). Nothing is cached.
    """
    if name not in DATASET_NAMES:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    unknown = set(csv_options) - _SYNTHETIC_OPTIONS - _CSV_OPTIONS
    if unknown:
        raise DataError(
            f"unknown dataset option(s): {', '.join(sorted(unknown))}; valid: "
            f"{', '.join(sorted(_SYNTHETIC_OPTIONS | _CSV_OPTIONS))}"
        )

    def options(valid: frozenset[str]) -> dict[str, Any]:
        return {k: v for k, v in csv_options.items() if k in valid}

    if name == "synthetic":
        data = generate_synthetic(num_users, num_items, seed=seed, **options(_SYNTHETIC_OPTIONS))
    else:
        if path is None:
            raise DataError(
                f"dataset {name!r} is not bundled: download it yourself"
                + (" from https://grouplens.org/datasets/movielens/" if name in _MOVIELENS else "")
                + " and pass its location with --data-path"
            )
        if name in _MOVIELENS:
            file = find_movielens_file(path)
            expected = _MOVIELENS[name]
            if file.suffix != os.path.splitext(expected)[1]:
                raise DataError(
                    f"does not look like {name} (expected its {expected}, found {file.name})",
                    path=file,
                )
            data = load_movielens(file)
        else:
            opts = options(_CSV_OPTIONS if name == "csv" else _PARQUET_OPTIONS)
            missing = [k for k in ("user_col", "item_col") if opts.get(k) is None]
            if missing:
                raise DataError(f"dataset {name!r} needs the option(s) {', '.join(missing)}", path=path)
            loader = load_csv if name == "csv" else load_parquet
            data = loader(path, **opts)
    if implicit_threshold is not None:
        data = data.implicit(implicit_threshold)
    return data


def dataset_summary(data: Interactions) -> dict[str, int | float]:
    """Plain counts for reports (JSON-serialisable Python numbers)."""
    per_user = data.user_counts()
    cells = data.num_users * data.num_items
    return {
        "users": int(data.num_users),
        "items": int(data.num_items),
        "interactions": int(len(data)),
        "density": float(len(data) / cells) if cells else 0.0,
        "min_interactions_per_user": int(per_user.min()) if per_user.size else 0,
        "median_interactions_per_user": float(np.median(per_user)) if per_user.size else 0.0,
        "max_interactions_per_user": int(per_user.max()) if per_user.size else 0,
    }
