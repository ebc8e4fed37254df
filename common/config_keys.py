"""How a run-config key is defined: type, default, allowed values and help, in one place.

Every key is a field of :class:`common.config.FedRecConfig` whose default is made by
:func:`key`; the annotation is the type. The defaults therefore live in the installed
code, so a wheel runs without the source tree, and everything else is derived from the
fields: the validation of a run-config, the ``[tool.flwr.app.config]`` table that
``pyproject.toml`` must match (a test checks it) and ``docs/configuration.md``::

    python -m common.config_keys --markdown > docs/configuration.md
    python -m common.config_keys --toml      # the table for pyproject.toml, with short comments

This module imports nothing heavy, so it is safe to use from any process.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
from dataclasses import dataclass
from typing import Any, Iterable

Value = int | float | bool | str
_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


class ConfigError(ValueError):
    """A run-config value that is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; ``None`` is unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        """``> 0``, ``>= 0``, ``in (0, 1]`` ...: the words the error messages and the docs use."""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {_number(self.high)}"
        return f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"


def _number(value: float | None) -> str:
    return f"{value:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
FRACTION = Range(0, 1, low_open=True)  # a share that must not be empty


@dataclass(frozen=True)
class Key:
    """One run-config key as the docs, the validation and ``pyproject.toml`` see it."""

    name: str  # as in the run-config: dashes
    attr: str  # the FedRecConfig field: underscores
    type: type
    default: Value
    help: str
    section: str
    choices: tuple[str, ...] = ()
    range: Range | None = None

    def allowed(self) -> str:
        """The allowed values in words (empty: any value of the type)."""
        if self.choices:
            return " | ".join(self.choices)
        return self.range.describe() if self.range else ""

    def check(self, value: Value) -> None:
        """Refuse a value of the right type that is not among the choices or out of range."""
        if self.choices and value not in self.choices:
            raise ConfigError(f"{self.name} must be one of {', '.join(self.choices)}; got {value!r}")
        if self.range is not None and value not in self.range:
            raise ConfigError(f"{self.name} must be {self.range.describe()}; got {value!r}")


def key(
    default: Value,
    help: str,
    *,
    choices: Iterable[str] = (),
    range: Range | None = None,
    section: str | None = None,
) -> Any:
    """A dataclass field for a run-config key; ``section`` starts a new group of keys (docs only)."""
    metadata = {"help": help, "choices": tuple(choices), "range": range, "section": section}
    return dataclasses.field(default=default, metadata=metadata)


def keys_of(cls: type) -> tuple[Key, ...]:
    """The :class:`Key` of every field of ``cls``, in field order; a key without a section is in the previous one's."""
    found: list[Key] = []
    section = ""
    for spec in dataclasses.fields(cls):
        meta = spec.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{spec.name} is not defined with common.config_keys.key()")
        section = meta["section"] or section
        kind = _TYPES[spec.type if isinstance(spec.type, str) else spec.type.__name__]
        found.append(Key(
            name=spec.name.replace("_", "-"), attr=spec.name, type=kind, default=spec.default, help=meta["help"],
            section=section, choices=meta["choices"], range=meta["range"],
        ))
        _check_default(found[-1])
    return tuple(found)


def _check_default(spec: Key) -> None:
    """A default must be a value its own key accepts (caught at import, not in a user's run)."""
    if type(spec.default) is not spec.type:
        raise TypeError(f"run-config key {spec.name}: default {spec.default!r} is not {spec.type.__name__}")
    if isinstance(spec.default, float) and not math.isfinite(spec.default):
        raise TypeError(f"run-config key {spec.name}: default must be finite (TOML and the docs)")
    spec.check(spec.default)


def defaults(keys: Iterable[Key]) -> dict[str, Value]:
    """``{name: default}``: what ``[tool.flwr.app.config]`` holds."""
    return {spec.name: spec.default for spec in keys}


def fuse(keys: Iterable[Key], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The defaults with ``overrides`` applied; an unknown key is an error (typos fail before anything runs)."""
    fused = defaults(keys)
    unknown = sorted(set(overrides or {}) - set(fused))
    if unknown:
        hints = [f"'{name}'" + "".join(f" (did you mean '{close}'?)" for close in
                                      difflib.get_close_matches(name, list(fused), n=1)) for name in unknown]
        raise ConfigError(f"unknown run-config key(s): {', '.join(hints)}; every key is in docs/configuration.md")
    fused.update(overrides or {})
    return fused


def toml_value(value: Value) -> str:
    """A default as TOML writes it (strings in double quotes, booleans in lower case)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def to_toml(keys: Iterable[Key]) -> str:
    """The ``[tool.flwr.app.config]`` table, one key a line with the first sentence of its help."""
    lines = ["[tool.flwr.app.config]"]
    section = None
    for spec in keys:
        if spec.section != section:
            section = spec.section
            lines.append(f"# {section}")
        lines.append(f"{spec.name} = {toml_value(spec.default)}  # {_first_sentence(spec.help)}")
    return "\n".join(lines) + "\n"


def _first_sentence(text: str) -> str:
    head = text.split(". ")[0].rstrip(".")
    return head if len(head) <= 100 else head[:97] + "..."


def to_markdown(keys: Iterable[Key]) -> str:
    """The configuration reference: a table per section."""
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `python -m common.config_keys --markdown > docs/configuration.md`; do not edit by hand."
        " The keys are defined in common/config.py (FedRecConfig). -->",
        "",
        "Every key is a Flower run-config key: set it with `fedrec ... -c 'key=value'` or",
        "`flwr run . --run-config 'key=value'` (strings in quotes inside the argument: `-c \"model='neumf'\"`).",
        "The defaults below are defined in the code and repeated in `pyproject.toml`'s",
        "`[tool.flwr.app.config]`; a test keeps the two identical.",
    ]
    section = None
    for spec in keys:
        if spec.section != section:
            section = spec.section
            out += ["", f"## {section}", "", "| key | type | default | allowed | description |", "| --- | --- | --- | --- | --- |"]
        cells = (f"`{spec.name}`", spec.type.__name__, f"`{toml_value(spec.default)}`", spec.allowed(), spec.help)
        out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.config_keys", description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--markdown", action="store_true", help="the configuration reference (docs/configuration.md)")
    what.add_argument("--toml", action="store_true", help="the [tool.flwr.app.config] table for pyproject.toml")
    args = parser.parse_args(argv)
    from common.config import RUN_CONFIG_KEYS  # the definitions; imported here, config imports this module

    sys.stdout.write(to_markdown(RUN_CONFIG_KEYS) if args.markdown else to_toml(RUN_CONFIG_KEYS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
