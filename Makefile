# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv if missing and installs the package with its extras first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_DIR ?= demo_data

.PHONY: install demo test bench clean

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

clean:
	rm -rf $(DEMO_DIR) spark-warehouse metastore_db derby.log .pytest_cache
