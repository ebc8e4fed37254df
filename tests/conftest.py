"""Test markers, so a developer can run the quick part of the suite (``make test-fast``).

``make test`` (what CI runs) runs everything. The markers:

- ``slow``: takes more than a few seconds on a quiet 2-core machine (federated simulations,
  training to a quality bar, subprocesses that import torch);
- ``deployment``: real SuperLink and SuperNode processes on loopback;
- ``browser``: renders in headless Chromium;
- ``packaging``: builds the wheel and runs it from a fresh virtual environment.

Tests are marked here by name (``MARKED``) rather than in each file, so one list says what
``test-fast`` leaves out; a name that no longer exists is an error, not a silently fast test.
"""

from __future__ import annotations

import pytest

MARKERS = {
    "slow": "takes more than a few seconds (deselected by make test-fast)",
    "deployment": "starts real SuperLink/SuperNode processes on loopback (deselected by make test-fast)",
    "browser": "renders in headless Chromium (deselected by make test-fast)",
    "packaging": "builds the wheel and runs it from a fresh virtual environment (also slow)",
}

# file -> {test name (without parameters) or "*" for every test of the file: markers}
MARKED: dict[str, dict[str, tuple[str, ...]]] = {}


def pytest_configure(config: pytest.Config) -> None:
    for name, help_text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {help_text}")


@pytest.hookimpl(tryfirst=True)  # before -m / -k deselect, so every test of a collected file is seen
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, set[str]] = {}
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        name = item.nodeid.split("::")[-1].split("[", 1)[0]
        seen.setdefault(path, set()).add(name)
        marks = MARKED.get(path, {})
        for marker in (*marks.get("*", ()), *marks.get(name, ())):
            item.add_marker(getattr(pytest.mark, marker))
    stale = [f"{path}::{name}" for path, names in MARKED.items() if path in seen
             for name in names if name != "*" and name not in seen[path]]
    if stale:
        raise pytest.UsageError(f"tests/conftest.py MARKED names tests that do not exist: {', '.join(stale)}")
