"""Readers for interaction files: MovieLens, generic CSV/TSV and Parquet.

Parsing uses numpy's C ``loadtxt`` on large blocks (ML-25M in seconds). Only
when that fast path fails do we re-read the file line by line, purely to name
the first bad line precisely, so a user sees ``ratings.csv:17: rating 'x' is
not a number`` instead of a numpy traceback. Every failure is a
:class:`~common.errors.DataError`.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from common.errors import DataError
from common.interactions import Interactions, from_raw

__all__ = ["load_movielens", "find_movielens_file", "load_csv", "load_parquet"]

# Read this many bytes per loadtxt call: big enough to amortise per-call cost,
# small enough that one block's temporary structured array stays ~100 MB.
_BLOCK_BYTES = 32 << 20
# Multi-character delimiters ("::") are rewritten to this control character,
# which never occurs in real interaction files, because loadtxt needs one char.
_UNIT_SEP = "\x1f"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_FLOAT32_MAX = float(np.finfo(np.float32).max)

_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark some editors prepend
_INT_RE = re.compile(r"\s*[+-]?\d+\s*\Z")
_FLOAT_RE = re.compile(
    r"\s*[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|nan|inf|infinity)\s*\Z",
    re.IGNORECASE,
)
_DELIM_NAMES = {",": "','", "\t": "tab", ";": "';'", "::": "'::'", "|": "'|'", " ": "space"}

MOVIELENS_FILES = {
    "u.data": "ML-100K",
    "ratings.dat": "ML-1M/ML-10M",
    "ratings.csv": "ML-20M/ML-25M/ml-latest",
}

Kind = Literal["int", "float"]


@dataclass(frozen=True)
class _Field:
    """One column we extract: its role (used in messages), position and type."""

    role: str  # "user id", "item id", "rating", "timestamp"
    index: int
    kind: Kind


def _delim_name(delimiter: str) -> str:
    return _DELIM_NAMES.get(delimiter, repr(delimiter))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError("no such file", path=p)
    if p.is_dir():
        raise DataError("is a directory, expected a file", path=p)
    return p


def _other_delimiter_hint(line: str, delimiter: str, expected: int | None = None) -> str:
    """Suggest the delimiter a line actually uses (for the common mix-ups)."""
    for other in (",", "\t", ";", "::", "|"):
        if other == delimiter:
            continue
        n = len(line.split(other))
        if (expected is None and n > 1) or n == expected:
            return f"; the line looks {_delim_name(other)}-separated (delimiter={other!r})"
    return ""


def _field_count_error(
    line: str, fields: list[str], expected: int, delimiter: str, lineno: int, path: Path
) -> DataError:
    msg = (
        f"line {lineno} has {_plural(len(fields), 'field')}, expected {expected} "
        f"separated by {_delim_name(delimiter)}"
    )
    return DataError(msg + _other_delimiter_hint(line, delimiter, expected), path=path, line=lineno)


def _field_problem(text: str, kind: Kind) -> str | None:
    """Why ``text`` is not a valid value of ``kind`` (None if it is)."""
    shown = repr(text.strip())
    if kind == "int":
        if not _INT_RE.match(text):
            if _FLOAT_RE.match(text) or not text.strip():
                return f"{shown} is not an integer"
            return f"{shown} is not an integer (not numeric)"
        if not _INT64_MIN <= int(text) <= _INT64_MAX:
            return f"{shown} does not fit in 64 bits"
        return None
    if not _FLOAT_RE.match(text):
        return f"{shown} is not a number"
    value = float(text)
    if not math.isfinite(value):
        return f"{shown} is not finite"
    if abs(value) > _FLOAT32_MAX:
        return f"{shown} is out of range"
    return None


ID_ROLES = ("user id", "item id")


def _id_problem(text: str, role: str) -> str | None:
    """Why a parsed integer is no valid id (ids are >= 0: they name devices' users and exported items)."""
    if role in ID_ROLES and int(text) < 0:
        return f"{text.strip()!r} is negative (ids must be integers >= 0)"
    return None


def _scan_for_error(
    path: Path,
    delimiter: str,
    num_fields: int,
    fields: list[_Field],
    fast_path_message: str,
    *,
    offset: int,
    first_line: int,
) -> DataError:
    """Slow path: find the first bad physical line at or after byte ``offset``.

    ``offset`` is the start of the block the fast path rejected and
    ``first_line`` its 1-based line number, so only that block and later
    ones are re-read in Python.
    """
    with open(path, "rb") as raw_fh:
        raw_fh.seek(offset)
        fh = io.TextIOWrapper(raw_fh, encoding="latin-1", newline=None)
        for lineno, raw in enumerate(fh, start=first_line):
            line = raw.rstrip("\n")
            if not line:
                continue  # loadtxt skips empty lines too
            parts = line.split(delimiter)
            if len(parts) != num_fields:
                return _field_count_error(line, parts, num_fields, delimiter, lineno, path)
            for f in fields:
                problem = _field_problem(parts[f.index], f.kind) or _id_problem(parts[f.index], f.role)
                if problem is not None:
                    return DataError(f"{f.role} {problem}", path=path, line=lineno)
    # The fast parser rejected something the line check accepts (should not
    # happen); still report it as a DataError rather than a traceback.
    return DataError(f"could not parse file: {fast_path_message}", path=path)


def _iter_blocks(fh: io.BufferedReader):
    """Yield ``(byte offset, block)`` with each block ending on a line boundary."""
    while True:
        offset = fh.tell()
        block = fh.read(_BLOCK_BYTES)
        if not block:
            return
        if not block.endswith(b"\n"):
            block += fh.readline()
        yield offset, block


def _read_table(
    path: Path,
    *,
    delimiter: str,
    num_fields: int,
    fields: list[_Field],
    header_lines: int,
) -> tuple[dict[str, np.ndarray], int]:
    """Parse the selected columns of a delimited file with a vectorised fast path.

    Unused columns are parsed as 1-byte strings so loadtxt still checks that
    every line has exactly ``num_fields`` fields. Returns (columns by role,
    number of data rows).
    """
    by_index = {f.index: f for f in fields}
    dtype = np.dtype(
        [
            (f"c{j}", (np.int64 if by_index[j].kind == "int" else np.float32) if j in by_index else "S1")
            for j in range(num_fields)
        ]
    )
    fast_delim = delimiter if len(delimiter) == 1 else _UNIT_SEP
    parts: dict[str, list[np.ndarray]] = {f.role: [] for f in fields}
    # (byte offset, first line number, rows) per block, to restart the slow
    # scan near a problem instead of at the top of a 25M-line file.
    blocks: list[tuple[int, int, int]] = []

    def fail(message: str, offset: int, first_line: int) -> DataError:
        return _scan_for_error(
            path, delimiter, num_fields, fields, message, offset=offset, first_line=first_line
        )

    with open(path, "rb") as fh:
        for _ in range(header_lines):
            fh.readline()
        line = header_lines + 1
        for offset, block in _iter_blocks(fh):
            if line == 1 and block.startswith(_BOM):
                block = block[len(_BOM) :]
                offset += len(_BOM)
            text = block.decode("latin-1")
            if fast_delim != delimiter:
                text = text.replace(delimiter, fast_delim)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "input contained no data" on blank blocks
                    table = np.loadtxt(
                        io.StringIO(text),
                        delimiter=fast_delim,
                        dtype=dtype,
                        comments=None,
                        ndmin=1,
                    )
            except (ValueError, OverflowError, TypeError) as exc:
                raise fail(str(exc), offset, line) from None
            for f in fields:
                parts[f.role].append(table[f"c{f.index}"].copy())
            blocks.append((offset, line, len(table)))
            line += block.count(b"\n")
    columns = {
        role: np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int64)
        for role, chunks in parts.items()
    }
    for f in fields:
        if f.kind == "float":
            valid = np.isfinite(columns[f.role])
        elif f.role in ID_ROLES:
            valid = columns[f.role] >= 0
        else:
            continue
        if not valid.all():
            bad_row = int(np.argmin(valid))
            ends = np.cumsum([rows for _, _, rows in blocks])
            offset, first_line, _ = blocks[int(np.searchsorted(ends, bad_row, side="right"))]
            raise fail(f"invalid {f.role}", offset, first_line)
    n = sum(rows for _, _, rows in blocks)
    return columns, n


def _to_interactions(
    path: Path, columns: dict[str, np.ndarray], n: int, header_lines: int
) -> Interactions:
    if n == 0:
        if header_lines:
            raise DataError("file has a header but no data rows", path=path)
        raise DataError("file is empty (no data rows)", path=path)
    return from_raw(
        columns["user id"],
        columns["item id"],
        columns.get("rating"),
        columns.get("timestamp"),
        source=str(path),
    )


def _first_nonempty_line(path: Path) -> tuple[str, int] | None:
    """(line without newline, 1-based line number) of the first non-blank line."""
    with open(path, encoding="utf-8-sig", errors="replace", newline=None) as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.rstrip("\n")
            if line.strip():
                return line, lineno
    return None


# ---------------------------------------------------------------------------
# MovieLens
# ---------------------------------------------------------------------------


def find_movielens_file(path: str | os.PathLike[str]) -> Path:
    """Locate the ratings file of a MovieLens download (folder or file path)."""
    p = Path(path)
    expected = ", ".join(f"{name} ({what})" for name, what in MOVIELENS_FILES.items())
    if not p.exists():
        raise DataError(
            f"no such file or directory; expected a MovieLens folder containing {expected}",
            path=p,
        )
    if p.is_dir():
        for name in MOVIELENS_FILES:
            if (p / name).is_file():
                return p / name
        raise DataError(f"no MovieLens ratings file in this folder; expected one of {expected}", path=p)
    if p.name in MOVIELENS_FILES or p.suffix in (".data", ".dat", ".csv"):
        return p
    raise DataError(f"unrecognised MovieLens file name; expected one of {expected}", path=p)


def load_movielens(path: str | os.PathLike[str]) -> Interactions:
    """Load any MovieLens release from its folder or ratings file.

    Format is chosen by file name: ``u.data`` (ML-100K, tab-separated
    ``user item rating timestamp``), ``ratings.dat`` (ML-1M/10M,
    ``user::item::rating::timestamp``) or ``ratings.csv`` (ML-20M/25M/latest,
    header ``userId,movieId,rating,timestamp``). Duplicate (user, item) rows
    keep the latest one (see :func:`common.interactions.from_raw`).
    """
    file = find_movielens_file(path)
    if file.suffix == ".csv":
        return load_csv(
            file,
            user_col="userId",
            item_col="movieId",
            rating_col="rating",
            timestamp_col="timestamp",
            delimiter=",",
        )
    delimiter = "::" if file.suffix == ".dat" else "\t"
    fields = [
        _Field("user id", 0, "int"),
        _Field("item id", 1, "int"),
        _Field("rating", 2, "float"),
        _Field("timestamp", 3, "int"),
    ]
    if file.stat().st_size == 0:
        raise DataError("file is empty (no data rows)", path=file)
    columns, n = _read_table(file, delimiter=delimiter, num_fields=4, fields=fields, header_lines=0)
    return _to_interactions(file, columns, n, header_lines=0)


# ---------------------------------------------------------------------------
# Generic CSV
# ---------------------------------------------------------------------------


def _resolve_column(
    col: str | int,
    role: str,
    header: list[str] | None,
    num_fields: int,
    path: Path,
    header_line: int,
    header_text: str,
    delimiter: str,
) -> int:
    if isinstance(col, bool) or not isinstance(col, (str, int)):
        raise DataError(f"{role} column must be a name or a 0-based index, got {col!r}", path=path)
    if isinstance(col, int):
        if not 0 <= col < num_fields:
            msg = (
                f"{role} column index {col} is out of range: line {header_line} has "
                f"{_plural(num_fields, 'field')} separated by {_delim_name(delimiter)}"
            )
            raise DataError(msg + _other_delimiter_hint(header_text, delimiter), path, header_line)
        return col
    if header is None:
        raise DataError(
            f"{role} column {col!r} is a name but has_header=False; pass a 0-based index",
            path=path,
        )
    if col in header:
        return header.index(col)
    msg = f"missing column {col!r} ({role}); found columns: {', '.join(map(repr, header))}"
    if len(header) == 1:
        msg += _other_delimiter_hint(header_text, delimiter)
    raise DataError(msg, path=path, line=header_line)


def load_csv(
    path: str | os.PathLike[str],
    *,
    user_col: str | int,
    item_col: str | int,
    rating_col: str | int | None = None,
    timestamp_col: str | int | None = None,
    delimiter: str = ",",
    has_header: bool = True,
) -> Interactions:
    """Load a delimited interaction file.

    Columns are header names, or 0-based indices (required when
    ``has_header=False``). User/item ids must be integers. Without a rating
    column every rating is 1.0 (implicit feedback); without a timestamp
    column the row order is the time order. Fields must not be quoted and
    every line must have the same number of fields. Duplicate (user, item)
    rows keep the latest (see :func:`common.interactions.from_raw`).
    """
    if not delimiter:
        raise DataError("delimiter must not be empty", path=path)
    file = _check_file(path)
    first = _first_nonempty_line(file)
    if first is None:
        raise DataError("file is empty", path=file)
    first_text, first_lineno = first
    first_fields = first_text.split(delimiter)
    num_fields = len(first_fields)
    header = [h.strip().strip('"').strip() for h in first_fields] if has_header else None

    wanted: list[tuple[str, str | int | None, Kind]] = [
        ("user id", user_col, "int"),
        ("item id", item_col, "int"),
        ("rating", rating_col, "float"),
        ("timestamp", timestamp_col, "int"),
    ]
    fields: list[_Field] = []
    for role, col, kind in wanted:
        if col is None:
            if role in ("user id", "item id"):
                raise DataError(f"{role} column is required", path=file)
            continue
        index = _resolve_column(
            col, role, header, num_fields, file, first_lineno, first_text, delimiter
        )
        if any(f.index == index for f in fields):
            raise DataError(f"{role} column {col!r} is already used for another role", path=file)
        fields.append(_Field(role, index, kind))

    header_lines = first_lineno if has_header else 0
    columns, n = _read_table(
        file, delimiter=delimiter, num_fields=num_fields, fields=fields, header_lines=header_lines
    )
    return _to_interactions(file, columns, n, header_lines)


# ---------------------------------------------------------------------------
# Parquet
# ---------------------------------------------------------------------------


def _parquet_column(table, name: str, role: str, kind: Kind, path: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.compute as pc

    col = table.column(name)
    if col.null_count:
        raise DataError(f"{role} column {name!r} has {col.null_count} missing values", path=path)
    typ = col.type
    if kind == "int" and pa.types.is_timestamp(typ):
        per_second = {"s": 1, "ms": 10**3, "us": 10**6, "ns": 10**9}[typ.unit]
        return pc.cast(col, pa.int64()).to_numpy() // per_second
    if kind == "int" and not pa.types.is_integer(typ):
        raise DataError(f"{role} column {name!r} has type {typ}, expected integers", path=path)
    if kind == "float" and not (pa.types.is_integer(typ) or pa.types.is_floating(typ)):
        raise DataError(f"{role} column {name!r} has type {typ}, expected numbers", path=path)
    values = col.to_numpy()
    if kind == "float":
        values = values.astype(np.float32)
        if not np.all(np.isfinite(values)):
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise DataError(f"{role} in row {bad} is not finite ({values[bad]})", path=path)
    if kind == "int" and role in ID_ROLES and len(values) and values.min() < 0:
        bad = int(np.argmin(values))
        raise DataError(f"{role} in row {bad} is negative ({values[bad]}; ids must be integers >= 0)", path=path)
    return values.astype(np.int64, copy=False) if kind == "int" else values


def load_parquet(
    path: str | os.PathLike[str],
    *,
    user_col: str,
    item_col: str,
    rating_col: str | None = None,
    timestamp_col: str | None = None,
) -> Interactions:
    """Load interactions from a Parquet file (needs the optional pyarrow).

    Same column semantics as :func:`load_csv`; timestamp columns of Arrow
    timestamp type are converted to Unix seconds. Parquet has no lines, so
    errors name the file and the column (or 0-based row).
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'fedrec[parquet]'", path) from None
    file = _check_file(path)
    try:
        schema = pq.read_schema(file)
    except Exception as exc:  # pyarrow raises several types for corrupt files
        raise DataError(f"not a readable Parquet file ({exc})", path=file) from None
    found = list(schema.names)
    wanted = [
        ("user id", user_col, "int"),
        ("item id", item_col, "int"),
        ("rating", rating_col, "float"),
        ("timestamp", timestamp_col, "int"),
    ]
    for role, name, _ in wanted:
        if name is not None and name not in found:
            raise DataError(
                f"missing column {name!r} ({role}); found columns: {', '.join(map(repr, found))}",
                path=file,
            )
    names = [name for _, name, _ in wanted if name is not None]
    table = pq.read_table(file, columns=list(dict.fromkeys(names)))
    if table.num_rows == 0:
        raise DataError("file has no rows", path=file)
    values = {
        role: _parquet_column(table, name, role, kind, file)
        for role, name, kind in wanted
        if name is not None
    }
    return from_raw(
        values["user id"],
        values["item id"],
        values.get("rating"),
        values.get("timestamp"),
        source=str(file),
    )
