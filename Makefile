# One entry point for every check, the same locally and in CI.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.installed-base
DEV    := $(VENV)/.installed-dev
PYTEST_ARGS ?=
# Most of the suite waits on brokers and deadlines, not on the CPU, so four
# workers pay off even on two cores; more made no difference on a loaded
# two-core machine and starved the timing-sensitive broker tests.
TEST_WORKERS ?= 4

.PHONY: demo test check bench reliability clean schemas

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(BASE): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

$(DEV): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@ $(BASE)

## demo: the kitchen network on the embedded default (sqlite:// in a temp dir)
demo: $(BASE)
	$(BIN)/python examples/kitchen_demo.py

## test: the whole suite, every backend against a real broker process (slowest 25 timed),
## in TEST_WORKERS parallel pytest-xdist workers: each worker runs whole modules or classes
## and starts the brokers it needs; the run fails if any test fails or none was collected
test: $(DEV)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

## check: lint, format and strict typing of the library
check: $(DEV)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## schemas: regenerate docs/schemas/*.schema.json from the wire models (docs/wire.md)
schemas: $(BASE)
	$(BIN)/transport schema --out docs/schemas

## bench: throughput/latency against the raw clients, written to benchmarks/results.json
bench: $(DEV)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info

## reliability: every fault on every backend; rewrites RELIABILITY.md
reliability: $(DEV)
	$(BIN)/python -m tests.reliability.run $(RELIABILITY_ARGS)
