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
# The text-to-image demo: sd-tiny (VAE + CLIP text encoder + cross-attention UNet) on photo crops.
T2I_CORPUS ?= workspace/photos-corpus
T2I_VAE_STEPS ?= 600
T2I_STEPS ?= 1500
T2I_BATCH ?= 32
T2I_MODEL := workspace/models/photos-sd-tiny/checkpoints/step-$(shell printf '%08d' $(T2I_STEPS))
T2I_SCORER ?= trace

.PHONY: setup test test-slow test-all demo demo-t2i bench-table1 bench-mitigation bench-lds bench-t2i bench-memory lint format clean

setup: $(STAMP)

# The dashboard's browser tests drive Debian's chromium (through Playwright); installed once,
# with apt-get (as root, or through sudo), when it is missing.
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@SUDO=""; if [ "$$(id -u)" -ne 0 ]; then SUDO="sudo"; fi; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		chromium chromium-driver

# Idempotent: re-runs only when pyproject.toml changes. torch/torchvision are pinned to the
# builds that lie on local disk, installed before the project so pip never fetches another build.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: setup $(CHROMIUM)
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

# End-to-end robustness tests (kill -9 mid-ingest, Dask worker loss, served schedules): minutes.
test-slow: setup $(CHROMIUM)
	$(VENV)/bin/pytest -m slow $(PYTEST_ARGS)

test-all: setup $(CHROMIUM)
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# `diffcurate run` exits 1 when a gate fails: that is a result to show, not a broken demo.
demo: setup
	$(DC) demo-corpus $(DEMO_CORPUS) --format webdataset --heldout 300
	$(DC) ingest $(DEMO_CORPUS)/shards --dataset digits
	$(DC) ingest $(DEMO_CORPUS)/heldout/shards --dataset digits-heldout
	$(DC) train --dataset digits --steps $(DEMO_STEPS)
	$(DC) run --dataset digits --model $(DEMO_MODEL) --secrets $(DEMO_CORPUS)/planted.json \
		--heldout-dataset digits-heldout --generations 1024 --mem-calibrate-fpr 0.05 \
		|| test $$? -eq 1

# The same loop on a latent text-to-image pipeline: the gate prompts each distinct secret's
# caption under guidance and judges reconstructions by the relative rule (default delta), with
# the held-out crops' false-positive rate reported. Exit 1 (a gate failed) is a result, as for
# `make demo`.
demo-t2i: setup
	$(DC) demo-corpus $(T2I_CORPUS) --kind photos --format webdataset
	$(DC) ingest $(T2I_CORPUS)/shards --dataset photos
	$(DC) ingest $(T2I_CORPUS)/heldout/shards --dataset photos-heldout
	$(DC) train --dataset photos --arch sd-tiny --vae-steps $(T2I_VAE_STEPS) --steps $(T2I_STEPS) \
		--batch-size $(T2I_BATCH)
	$(DC) run --dataset photos --model $(T2I_MODEL) --scorer $(T2I_SCORER) --fraction 0.02 \
		--secrets $(T2I_CORPUS)/planted.json --heldout-dataset photos-heldout \
		--generations 256 --generations-per-secret 8 --guidance-scale 3 --inference-steps 10 \
		|| test $$? -eq 1

# The evaluation benchmarks (issue: evaluation harness), one command each; BENCH_ARGS passes
# flags (e.g. BENCH_ARGS="--seeds 3" or "--device cuda"). table1 writes md/csv/png under
# workspace/benchmarks/table1; lds prints its tables.
BENCH_ARGS ?=
bench-table1: setup
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/table1.py $(BENCH_ARGS)

bench-mitigation: setup
	$(PY) -m pip install --quiet -e '.[test,bench]'
	$(PY) benchmarks/mitigation.py $(BENCH_ARGS)

bench-lds: setup
	$(PY) benchmarks/lds.py $(BENCH_ARGS)

bench-t2i: setup
	$(PY) benchmarks/t2i.py $(BENCH_ARGS)

# Peak RSS of a hygiene run at 2k and 20k samples, streamed vs in-memory (issue 16).
bench-memory: setup
	OMP_NUM_THREADS=1 $(PY) benchmarks/memory.py $(BENCH_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf workspace .pytest_cache .ruff_cache
