# taohooks: `make test` sets up its own virtual environment and runs the tests.
# TORCH_SPEC picks the torch build installed first (GPU users: the CUDA build they use).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taohooks-installed

.PHONY: install demo compare-demo test bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	$(VENV)/bin/taocache autoload install
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/taocache demo

compare-demo: $(STAMP)
	$(VENV)/bin/taocache compare configs/compare/testbed.yaml -- examples/sample_testbed.py --model flow --steps 50

# the test files on parallel workers, one per core (pytest-xdist; a file's module fixtures made once)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build *.egg-info
