# Every target sets itself up: `make test` on a fresh clone creates .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv test lint bench demo run pi-check clean

venv: $(STAMP)

# Re-install only when the project definition changes; otherwise this is a no-op. pip compiles the
# installed modules one at a time; compileall does it on every core (~10 s less on 2 cores), and
# skips the packages' own test suites (a quarter of the code), which nothing imports.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --no-compile -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 -x '/tests?/' \
		"$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null
	touch $(STAMP)

# The suite in 4 pytest-xdist workers on a 2-core machine (many tests wait on sockets and child
# processes); loadgroup keeps the modules that share an expensive fixture on one worker
# (tests/conftest.py, XDIST_GROUPS). `pytest -q` alone still runs it in one process.
test: venv
	$(BIN)/ruff check .
	$(BIN)/pytest -q -n 4 --dist loadgroup --durations=30

# The whole pipeline for a minute against the built-in simulator, offline: summary, query, plot.
demo: venv
	$(BIN)/daedalus demo

# The real thing: the supervisor with Coinbase's public channels (no API key needed).
run: venv
	$(BIN)/daedalus run --config config/default.yaml

# The product on a Raspberry Pi 4's CPU, emulated (qemu-aarch64 -cpu cortex-a72); ~1 GB of
# downloads the first time, cached under .cache/. Not part of `make test`.
pi-check:
	bash deploy/pi-check.sh

lint: venv
	$(BIN)/ruff check .

bench: venv
	$(BIN)/python bench/sim.py
	$(BIN)/python bench/capture.py
	$(BIN)/python bench/etl.py
	$(BIN)/python bench/record_writer.py
	$(BIN)/python bench/ccxt_etl.py
	$(BIN)/python bench/sync.py
	$(BIN)/python bench/etl_s3.py
	$(BIN)/python bench/backfill.py --gb 4 --segment-mb 64
	$(BIN)/python bench/databento_capture.py --seconds 10
	$(BIN)/python bench/databento_etl.py --records 2000000
	$(BIN)/python bench/pi_budget.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
