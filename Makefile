# Two commands a fresh machine needs: `make demo` and `make test`. Each bootstraps .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
SRC := holysheep transports

.PHONY: demo test lint typecheck pytest bench clean

$(VENV)/.base: pyproject.toml setup.py holysheep/_speedups.c
	@$(PYTHON) -c 'import sys; sys.exit("holysheep needs Python 3.10+, found " + sys.version.split()[0] if sys.version_info < (3, 10) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade 'pip>=25.1'
	$(PY) -m pip install -q --disable-pip-version-check -e .
	@touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PY) -m pip install -q --disable-pip-version-check -e . --group dev
	@touch $@

demo: $(VENV)/.base
	$(PY) examples/demo.py

lint: $(VENV)/.dev
	$(BIN)/ruff check $(SRC) tests bench examples
	$(BIN)/ruff format --check $(SRC) tests bench examples

typecheck: $(VENV)/.dev
	$(BIN)/mypy -p holysheep

pytest: $(VENV)/.dev
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

bench: $(VENV)/.dev
	$(PY) bench/sse_decode.py

clean:
	rm -rf $(VENV) build dist holysheep/*.so *.egg-info .mypy_cache .pytest_cache .ruff_cache .hypothesis
