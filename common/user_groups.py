"""Groups of users for per-group quality: activity on the device, demographics where a dataset has them.

Group membership is private, as private as the interactions: it stays on the device, which
reports only its sums per group, and the server publishes a group's figures only when
enough users are in it (``group-min-users``). Activity (how many training interactions a
user has) is computed on the device itself. Demographic groups come from the dataset's
user file where there is one (MovieLens-100K ``u.user``, ML-1M ``users.dat``: gender and
age band); in simulation each device holds its own users' labels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common.errors import DataError

__all__ = ["activity_labels", "age_band", "movielens_user_groups"]

_AGE_BANDS = ((25, "<25"), (35, "25-34"), (45, "35-44"))


def age_band(age: int) -> str:
    """Age band of an age in years (ML-1M's age codes fall in the same bands)."""
    for upper, label in _AGE_BANDS:
        if age < upper:
            return label
    return "45+"


def activity_labels(counts: np.ndarray, bands: tuple[int, ...]) -> np.ndarray:
    """``<=50`` / ``51-150`` / ``>150`` style labels from training interactions per user."""
    edges = [0, *bands]
    names = [f"<={bands[0]}"] + [f"{lo + 1}-{hi}" for lo, hi in zip(edges[1:-1], edges[2:], strict=True)] + [f">{bands[-1]}"]
    return np.array(names, dtype=object)[np.searchsorted(np.asarray(bands), np.asarray(counts), side="left")]


def movielens_user_groups(ratings_file: str | os.PathLike[str], user_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Gender and age band per user (aligned with ``user_ids``) from the file beside the ratings; {} if none."""
    folder = Path(ratings_file).parent
    if (folder / "u.user").is_file():
        path, separator, fields = folder / "u.user", "|", {"age": 1, "gender": 2}
    elif (folder / "users.dat").is_file():
        path, separator, fields = folder / "users.dat", "::", {"gender": 1, "age": 2}
    else:
        return {}
    by_id: dict[int, tuple[str, str]] = {}
    with open(path, encoding="latin-1") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parts = line.rstrip("\r\n").split(separator)
            try:
                user, age, gender = int(parts[0]), int(parts[fields["age"]]), parts[fields["gender"]]
            except (IndexError, ValueError):
                raise DataError(f"expected user id, age and gender fields separated by {separator!r}", path, line_no) from None
            by_id[user] = (gender, age_band(age))
    known = [by_id.get(int(u)) for u in user_ids]
    return {
        "gender": np.array([k[0] if k else "unknown" for k in known], dtype=object),
        "age": np.array([k[1] if k else "unknown" for k in known], dtype=object),
    }
