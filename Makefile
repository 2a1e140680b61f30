# The two commands of the README:
#   make demo   — set up a virtual environment, install closedloop, run the closed-loop demo
#   make test   — set up (with dev extras), then lint, type-check and run the whole test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PERSONS ?= 5000
OUT    ?= demo-out

.PHONY: demo test venv install install-dev lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/closedloop demo --persons $(PERSONS) --out $(OUT)

lint: install-dev
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: install-dev
	$(BIN)/mypy

pytest: install-dev
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4 --dist worksteal --basetemp=$(CURDIR)/.pytest-tmp --durations=30

test: lint typecheck pytest

clean:
	rm -rf $(VENV) demo-out .pytest_cache .mypy_cache .ruff_cache
