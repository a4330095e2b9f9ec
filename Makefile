# Two entry points for a fresh machine (see README): `make demo` and `make test`.
# Each creates the virtual environment on first use and installs the pinned stack.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint typecheck

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/cxr-ray demo

lint: setup
	$(BIN)/ruff check .

# The layering contract, cycles, module / function size and import placement are checked by
# tests/test_architecture.py inside the pytest run.
typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest
