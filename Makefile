# dylen-jobs: `make run` (everything locally) and `make test` (every test). Needs Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PYTHONPATH := $(CURDIR)

.PHONY: run test lint fmt clean help bench-archive

help:
	@echo "make run    start embedded PostgreSQL and every function locally (Ctrl-C stops)"
	@echo "make test   run the whole test suite (what CI runs)"
	@echo "make lint   ruff + mypy"
	@echo "make bench-archive  archiver vs naive UPDATE on 1M lessons; writes bench/RESULTS.md"

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@touch $@

run: $(STAMP)
	$(BIN)/python -m devtools.run

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .

bench-archive: $(STAMP)
	$(BIN)/python -m bench.archive_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .dev .pytest_cache .mypy_cache .ruff_cache build
