"""Item content features: the public catalogue (genres, release year) that hybrid models read.

Features describe items, never users, so the server and every device may load them alike.
Rows follow the interaction data's dense item index (``Interactions.item_ids``); an item
the catalogue file does not describe gets all-zero features, and the count of such items
is reported, never silently assumed zero.

Sources:

- MovieLens: ``u.item`` (ML-100K: 19 genre flags, release date), ``movies.dat`` (ML-1M /
  10M: ``id::Title (Year)::Genre|Genre``) or ``movies.csv`` (ML-20M and later), found beside
  the ratings file. Features: one flag per genre plus a one-hot release period.
- Any CSV with a header (``item-features-path``): an item-id column and feature columns.
  A column whose every value is a number is used as it is; any other column is
  categorical, its values split on ``|`` into one flag per distinct token ("a|b" sets two).
- The synthetic generator: flags drawn from its hidden item factors (so content carries
  the same signal the interactions do, as real genres do).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import DataError

__all__ = [
    "ItemFeatures",
    "catalogue",
    "csv_item_features",
    "movielens_item_features",
    "synthetic_item_features",
]

# Release periods: one flag each (a linear tower gets no use from a raw year).
_PERIODS = ((0, 1940), (1940, 1950), (1950, 1960), (1960, 1970), (1970, 1980), (1980, 1990), (1990, 1995),
            (1995, 1997), (1997, 1999), (1999, 10_000))
_PERIOD_NAMES = tuple(f"year:{lo}-{hi - 1}" if hi < 10_000 else f"year:{lo}+" for lo, hi in _PERIODS) + ("year:unknown",)
_YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")
_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                  "War", "Western")


@dataclass(frozen=True)
class ItemFeatures:
    """A float32 feature row per item of the dataset, and what each column means."""

    values: np.ndarray  # [num_items, num_features]
    names: tuple[str, ...]
    undescribed: int = 0  # items of the dataset the catalogue had no row for (all-zero features)

    @property
    def num_features(self) -> int:
        return int(self.values.shape[1])

    def rows(self, items: np.ndarray) -> np.ndarray:
        return self.values[np.asarray(items, np.int64)]


def _period_flags(years: np.ndarray) -> np.ndarray:
    """One-hot release period per item; year 0 means unknown."""
    flags = np.zeros((len(years), len(_PERIOD_NAMES)), np.float32)
    for column, (lo, hi) in enumerate(_PERIODS):
        flags[(years >= max(lo, 1)) & (years < hi), column] = 1.0
    flags[years == 0, -1] = 1.0
    return flags


def _aligned(raw_ids: list[int], rows: np.ndarray, item_ids: np.ndarray, names: tuple[str, ...]) -> ItemFeatures:
    """Catalogue rows (keyed by raw id) in the dataset's item order."""
    position = {raw: i for i, raw in enumerate(raw_ids)}
    values = np.zeros((len(item_ids), rows.shape[1]), np.float32)
    found = np.array([position.get(int(raw), -1) for raw in item_ids], np.int64)
    values[found >= 0] = rows[found[found >= 0]]
    return ItemFeatures(values, names, undescribed=int((found < 0).sum()))


def _int_field(text: str, what: str, path: Path, line: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise DataError(f"{what} {text!r} is not an integer", path, line) from None


def movielens_item_features(ratings_file: str | os.PathLike[str], item_ids: np.ndarray) -> ItemFeatures:
    """Genres and release period of a MovieLens release, from the catalogue beside ``ratings_file``."""
    folder = Path(ratings_file).parent
    for name in ("u.item", "movies.dat", "movies.csv"):
        if (folder / name).is_file():
            path = folder / name
            break
    else:
        raise DataError("no MovieLens catalogue (u.item, movies.dat or movies.csv) beside the ratings file: "
                        "item-features needs it", folder)
    raw_ids: list[int] = []
    years: list[int] = []
    genres: list[list[str]] = []
    with open(path, encoding="latin-1", newline="") as handle:
        if path.name == "u.item":
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                fields = line.rstrip("\r\n").split("|")
                if len(fields) != 5 + len(_ML100K_GENRES):
                    raise DataError(f"expected {5 + len(_ML100K_GENRES)} '|'-separated fields "
                                    f"(id|title|date|video date|url|19 genre flags), found {len(fields)}", path, line_no)
                raw_ids.append(_int_field(fields[0], "item id", path, line_no))
                date = fields[2].strip()
                years.append(_int_field(date[-4:], "release year", path, line_no) if date else 0)
                flags = fields[5:]
                if any(flag not in ("0", "1") for flag in flags):
                    raise DataError("genre flags must be 0 or 1", path, line_no)
                genres.append([g for g, flag in zip(_ML100K_GENRES, flags, strict=True) if flag == "1"])
        else:
            rows = csv.reader(handle) if path.suffix == ".csv" else (line.rstrip("\r\n").split("::") for line in handle)
            for line_no, fields in enumerate(rows, start=1):
                if path.suffix == ".csv" and line_no == 1:
                    continue  # header: movieId,title,genres
                if not fields or fields == [""]:
                    continue
                if len(fields) != 3:
                    raise DataError(f"expected 3 fields (id, title, genres), found {len(fields)}", path, line_no)
                raw_ids.append(_int_field(fields[0], "item id", path, line_no))
                year = _YEAR_IN_TITLE.search(fields[1].strip())
                years.append(int(year.group(1)) if year else 0)
                genres.append([g for g in fields[2].split("|") if g and g != "(no genres listed)"])
    vocabulary = sorted({g for item in genres for g in item})
    column = {g: i for i, g in enumerate(vocabulary)}
    flags = np.zeros((len(raw_ids), len(vocabulary)), np.float32)
    for row, item in enumerate(genres):
        flags[row, [column[g] for g in item]] = 1.0
    rows = np.hstack([flags, _period_flags(np.array(years, np.int64))])
    names = tuple(f"genre:{g}" for g in vocabulary) + _PERIOD_NAMES
    return _aligned(raw_ids, rows, item_ids, names)


def csv_item_features(
    path: str | os.PathLike[str], item_ids: np.ndarray, *, item_col: str, columns: list[str] | None = None
) -> ItemFeatures:
    """Features from a CSV with a header: ``item_col`` holds raw item ids, ``columns`` (default: all others) the features."""
    file = Path(path)
    if not file.is_file():
        raise DataError("no such item-features file", file)
    with open(file, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise DataError("item-features file is empty (expected a header line)", file)
        header = [h.strip() for h in header]
        if item_col not in header:
            raise DataError(f"missing item column {item_col!r}; found columns: {', '.join(map(repr, header))}", file, 1)
        wanted = columns if columns else [h for h in header if h != item_col]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"missing feature column(s) {', '.join(map(repr, missing))}; found: "
                            f"{', '.join(map(repr, header))}", file, 1)
        if not wanted:
            raise DataError(f"no feature columns besides the item column {item_col!r}", file, 1)
        index = [header.index(c) for c in wanted]
        raw_ids: list[int] = []
        cells: list[list[str]] = []
        for line_no, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(header):
                raise DataError(f"expected {len(header)} comma-separated fields as in the header, found {len(fields)}",
                                file, line_no)
            raw_ids.append(_int_field(fields[header.index(item_col)].strip(), "item id", file, line_no))
            cells.append([fields[i].strip() for i in index])
    if len(set(raw_ids)) != len(raw_ids):
        raise DataError("an item id appears on more than one line of the item-features file", file)
    blocks: list[np.ndarray] = []
    names: list[str] = []
    for j, name in enumerate(wanted):
        values = [row[j] for row in cells]
        try:
            blocks.append(np.array([float(v) for v in values], np.float32)[:, None])
            names.append(name)
        except ValueError:  # categorical: one flag per '|'-separated token
            tokens = sorted({t for v in values for t in v.split("|") if t})
            position = {t: i for i, t in enumerate(tokens)}
            flags = np.zeros((len(values), len(tokens)), np.float32)
            for row, value in enumerate(values):
                flags[row, [position[t] for t in value.split("|") if t]] = 1.0
            blocks.append(flags)
            names.extend(f"{name}:{t}" for t in tokens)
    rows = np.hstack(blocks) if blocks else np.zeros((len(raw_ids), 0), np.float32)
    if not np.isfinite(rows).all():
        raise DataError("feature values must be finite numbers", file)
    return _aligned(raw_ids, rows, item_ids, tuple(names))


def synthetic_item_features(item_factors: np.ndarray, *, seed: int, num_features: int = 16) -> ItemFeatures:
    """Noisy 'genre' flags of the synthetic generator's items, about 20 % set per column.

    Each flag thresholds a random projection of the hidden item factors plus as much
    noise again, so content predicts taste only in part, as genres do.
    """
    rng = np.random.default_rng([seed, 0xFEA7])
    factors = np.asarray(item_factors, np.float64)
    projection = rng.standard_normal((factors.shape[1], num_features))
    signal = factors @ projection
    signal /= signal.std(axis=0, keepdims=True) + 1e-12
    noisy = signal + rng.standard_normal(signal.shape)
    flags = (noisy > np.quantile(noisy, 0.8, axis=0, keepdims=True)).astype(np.float32)
    return ItemFeatures(flags, tuple(f"tag:{i}" for i in range(num_features)))


def catalogue(config: Any, item_ids: np.ndarray | None) -> ItemFeatures:
    """The run's catalogue (a :class:`common.config.FedRecConfig`), rows aligned with ``item_ids``.

    ``item_ids=None`` gives no rows but the columns: what a model's width needs, without
    loading or splitting the interactions.
    """
    ids = np.empty(0, np.int64) if item_ids is None else item_ids
    if config.item_features_path:
        columns = [c.strip() for c in config.item_features_columns.split(",") if c.strip()]
        return csv_item_features(config.item_features_path, ids, item_col=config.item_features_item_col,
                                 columns=columns or None)
    if config.dataset == "synthetic":
        from common.synthetic import synthetic_item_factors

        factors = synthetic_item_factors(config.synthetic_users, config.synthetic_items, seed=config.seed)
        return synthetic_item_features(factors, seed=config.seed)  # rows are the generator's items already
    if config.dataset.startswith("movielens"):
        from common.loaders import find_movielens_file

        return movielens_item_features(find_movielens_file(config.data_path), ids)
    raise DataError(f"dataset {config.dataset!r} has no catalogue of its own: set item-features-path")
