# The two commands of the README. Both create the virtual environment on first use.
#   make run   - set up, then run a federated training on the embedded synthetic dataset
#   make test  - set up, then run the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export FLWR_TELEMETRY_ENABLED := 0

.PHONY: run test setup clean

$(BIN)/.fedrec-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(BIN)/.fedrec-installed

run: setup
	$(BIN)/fedrec simulate

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
