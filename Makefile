# card_megatron: `make setup`, `make test`, `make test-fast`, `make lint`, `make demo`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NPROC ?= 2

.PHONY: setup test test-fast lint demo bench bench-generate clean

setup: $(STAMP) card_megatron/_indexer.stamp

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Rebuild the C++ extension in place whenever csrc/ or setup.py changes.
card_megatron/_indexer.stamp: $(STAMP) setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

# Every test (multi-process, end-to-end and SLURM ones included); prints the 15 slowest.
test: setup
	$(PY) -m pytest -q --durations=15 tests

# The unit tests: everything not marked slow (multi-process, end-to-end) or slurm (see pytest.ini).
test-fast: setup
	$(PY) -m pytest -q -m "not slow and not slurm" --durations=15 tests

# Lint and format check (ruff.toml); `bash tools/lint_fix.sh` applies the fixes.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

demo: setup
	bash tools/demo.sh

# Each benchmark prints ratios measured side by side in one run; results: docs/benchmarks.md.
bench: setup
	$(PY) tools/benchmark_preprocess.py --size-mb 200
	$(PY) tools/benchmark_preprocess.py --size-mb 200 --format parquet
	$(PY) tools/benchmark_index.py
	$(PY) tools/benchmark_objectives.py
	$(PY) tools/benchmark_train.py
	$(PY) tools/benchmark_export.py --config configs/gpt-350m.yaml --tp 2 --pp 2

# Decoding against transformers' generate on the same exported weights (needs runs/demo: make demo);
# writes the table to runs/anchor/table.md (docs/benchmarks.md quotes it).
bench-generate: setup
	$(PY) tools/benchmark_generate.py --anchor --checkpoint runs/demo --random-model configs/gpt-125m.yaml \
		--threads 1 --repeats 3 --max-new-tokens 48 --markdown runs/anchor/table.md --json runs/anchor/table.json

clean:
	rm -rf build *.egg-info card_megatron/*.so card_megatron/_indexer.stamp
