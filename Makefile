# Every target sets itself up: `make test` on a fresh clone creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint bench clean

venv: $(STAMP)

# Re-install only when the project definition changes; otherwise this is a no-op.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python bench/sim.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/etl.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
