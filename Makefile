# Quick start (see README): `make pipeline` and `make test` each set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: setup browser pipeline lint test test-fast test-all smoke clean

setup: $(VENV)/.installed

# Re-run the install whenever the package metadata or the pins change.
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

# Headless Chromium (Debian's package) for the report test; installed when missing and we may.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and cannot install it: the report's browser test will be skipped (CI fails it)"; fi; }

pipeline: setup
	$(BIN)/python -m jobs.pipeline

smoke: setup
	$(BIN)/python -m jobs.pipeline --smoke-test --out runs/smoke

lint: setup
	$(BIN)/ruff check .

test: setup browser lint
	$(BIN)/python -m pytest -q

# the pure core only (no Ray): the loop to run after every edit; two pytest workers with one
# torch thread each (45 s on 2 cores against 65-80 s for one worker with two threads)
test-fast: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m 'not slow and not gpu and not ray'

test-all: setup browser
	$(BIN)/python -m pytest -q -m ''

clean:
	rm -rf runs .pytest_cache
