# diffcurate — the README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
DC     := $(VENV)/bin/diffcurate
STAMP  := $(VENV)/.diffcurate-installed
DEMO_CORPUS ?= workspace/demo-corpus
# Reference-model training steps for the demo (the planted digits are reproduced by ~2,000).
DEMO_STEPS ?= 2000
DEMO_MODEL := workspace/models/digits-digits-8px/checkpoints/step-$(shell printf '%08d' $(DEMO_STEPS))
PYTEST_ARGS ?=

.PHONY: setup test test-all demo bench-table1 bench-lds lint format clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. torch/torchvision are pinned to the
# builds that lie on local disk, installed before the project so pip never fetches another build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: setup
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

test-all: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# `diffcurate run` exits 1 when a gate fails: that is a result to show, not a broken demo.
demo: setup
	$(DC) demo-corpus $(DEMO_CORPUS) --format webdataset --heldout 300
	$(DC) ingest $(DEMO_CORPUS)/shards --dataset digits
	$(DC) ingest $(DEMO_CORPUS)/heldout/shards --dataset digits-heldout
	$(DC) train --dataset digits --steps $(DEMO_STEPS)
	$(DC) run --dataset digits --model $(DEMO_MODEL) --secrets $(DEMO_CORPUS)/planted.json \
		--heldout-dataset digits-heldout --generations 1024 --mem-calibrate-fpr 0.05 \
		--mitigation retrain --retrain-steps $(DEMO_STEPS) || test $$? -eq 1

# The evaluation benchmarks (issue: evaluation harness), one command each; BENCH_ARGS passes
# flags (e.g. BENCH_ARGS="--seeds 3" or "--device cuda"). table1 writes md/csv/png under
# workspace/benchmarks/table1; lds prints its tables.
BENCH_ARGS ?=
bench-table1: setup
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/table1.py $(BENCH_ARGS)

bench-lds: setup
	$(PY) benchmarks/lds.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf workspace .pytest_cache .ruff_cache
