# Two commands set up a fresh machine: `make demo` (compress the bundled model and show what it
# cost) and `make test` (the test suite). Each creates its own virtual environment in .venv.
# TORCH_SPEC picks the PyTorch build, e.g. TORCH_SPEC="torch==2.13.0" for a CPU-only machine
# that has that build at hand, or a CUDA build from your usual index.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch>=2.4,<3
EXTRAS ?= dev,triton,plot
BIN := $(VENV)/bin

.PHONY: env demo test test-all lint clean

$(BIN)/.moequant-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

env: $(BIN)/.moequant-installed

demo: env
	$(BIN)/moequant demo

# Tests run in up to four processes (pytest-xdist); PYTEST_ARGS adds to or overrides that.
PYTEST_ARGS ?= -n auto --maxprocesses 4

test: env
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-all: env
	$(BIN)/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: env
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
