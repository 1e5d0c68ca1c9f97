# Quick start (see README): `make pipeline` and `make test` each set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup pipeline test test-all smoke clean

setup: $(VENV)/.installed

# Re-run the install whenever the package metadata or the pins change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

pipeline: setup
	$(BIN)/python -m jobs.pipeline

smoke: setup
	$(BIN)/python -m jobs.pipeline --smoke-test --out runs/smoke

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf runs .pytest_cache
