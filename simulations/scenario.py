"""Scenario files: a run written down once, as TOML, instead of a long ``-c '...'`` line.

A scenario holds run-config keys at top level (the keys of ``[tool.flwr.app.config]`` in
``pyproject.toml``), for example::

    # simulations/scenarios/ml100k-gmf.toml
    dataset = "movielens-100k"
    data-path = "../shared/datasets/ml-100k"
    num-server-rounds = 100

``fedrec simulate SCENARIO`` starts from it; ``-c`` and the explicit flags still override
it. A key that is not a run-config key, or a value of the wrong type, is reported with the
file and line before anything runs.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Any

from common.config import ConfigError, fused_run_config, parse_run_config
from common.errors import DataError


def _line_of(text: str, key: str) -> int | None:
    """1-based line where ``key`` is assigned (TOML's parser does not keep positions)."""
    pattern = re.compile(rf'^\s*["\']?{re.escape(key)}["\']?\s*=')
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def load_scenario(path: str | Path) -> dict[str, Any]:
    """The run-config overrides a scenario file sets, validated against the app's keys."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError("no such scenario file", path) from None
    except UnicodeDecodeError:
        raise DataError("not a UTF-8 text file; expected a TOML scenario", path) from None
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        line = re.search(r"line (\d+)", str(err))
        raise DataError(f"not valid TOML: {err}", path, int(line.group(1)) if line else None) from None
    valid = fused_run_config()
    for key, value in values.items():
        if isinstance(value, dict):
            raise DataError(f"table [{key}] is not part of a scenario; write run-config keys at top level",
                            path, _table_line(text, key))
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else "; see [tool.flwr.app.config] in pyproject.toml"
            raise DataError(f"unknown key '{key}'{hint}", path, _line_of(text, key))
    try:
        parse_run_config(fused_run_config(values))
    except ConfigError as err:
        key = next((k for k in values if f"'{k}'" in str(err) or str(err).startswith(k)), None)
        raise DataError(str(err), path, _line_of(text, key) if key else None) from None
    return values


def _table_line(text: str, table: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip() == f"[{table}]":
            return number
    return None
