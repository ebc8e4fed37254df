# The two commands of the README. Both create the virtual environment on first use.
#   make run   - set up, then run a federated training on the embedded synthetic dataset
#   make test  - set up (also headless Chromium for the report test), lint, then run the whole test suite (CI)
#   make test-fast - lint, then the tests not marked slow, deployment or browser (tests/conftest.py): about a minute
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: run test test-fast lint setup browser clean

$(BIN)/.fedrec-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.fedrec-installed

run: setup
	$(BIN)/fedrec simulate simulations/scenarios/default-run.toml

# The report test renders HTML in headless Chromium (Debian's package; needs root to install).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "make: could not install chromium; the report rendering test will fail (set FEDREC_CHROMIUM)" >&2

lint: setup
	$(BIN)/ruff check .

test: setup browser lint
	$(BIN)/python -m pytest

test-fast: setup lint
	$(BIN)/python -m pytest -m "not slow and not deployment and not browser"

clean:
	rm -rf $(VENV) runs .pytest_cache
