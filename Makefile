# dylen-jobs: `make run` (everything locally) and `make test` (every test). Needs Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# gcloud-tasks-emulator pins an older protobuf than google-cloud-tasks needs: it gets its own venv.
EMU_VENV  := .venv-tasks-emulator
EMU_STAMP := $(EMU_VENV)/.installed-stamp
export PYTHONPATH := $(CURDIR)

.PHONY: run test soak lint fmt clean help bench bench-load bench-archive bench-growth tasks-emulator auth-emulator

help:
	@echo "make run    start embedded PostgreSQL and every function locally (Ctrl-C stops)"
	@echo "make test   run the whole test suite (what CI runs)"
	@echo "make lint   ruff + mypy"
	@echo "make bench  performance against baselines -> bench/RESULTS.md (needs wrk)"
	@echo "make tasks-emulator   install gcloud-tasks-emulator into .venv-tasks-emulator/ (make test does)"
	@echo "make auth-emulator    install the Firebase Auth emulator into .tools/firebase (needs npm; CI does)"
	@echo "make soak   the full fault soak (2,000 jobs while process_job is killed at random)"
	@echo "make bench-load  64 clients creating jobs for 30 s (figures in bench/RESULTS.md)"
	@echo "make bench-archive  archiver vs naive UPDATE on 1M lessons; writes bench/RESULTS.md"
	@echo "make bench-growth  every endpoint at ~10M jobs vs one day of them (~10 GB, minutes); writes bench/RESULTS.md"

# The project itself goes in editable (`pip install -e .`): `common` and `devtools` then import from
# this checkout in any process of the venv, e.g. a bare `.venv/bin/functions-framework`.
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required (set PYTHON=python3.11)")'
	@test -x $(BIN)/python || { echo "Creating $(VENV) ..."; $(PYTHON) -m venv $(VENV); }
	@echo "Installing the dependencies into $(VENV) (requirements-dev.txt; the first time takes a minute or so) ..."
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	@echo "Installing this project into $(VENV) in editable mode (pip install -e .) ..."
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e . 2>$(VENV)/editable-install.log \
	  || { cat $(VENV)/editable-install.log; exit 1; }
	@touch $@
	@echo "$(VENV) is ready."

$(EMU_STAMP): requirements-tasks-emulator.txt
	@test -x $(EMU_VENV)/bin/python || $(PYTHON) -m venv $(EMU_VENV)
	@echo "Installing gcloud-tasks-emulator into $(EMU_VENV) (requirements-tasks-emulator.txt) ..."
	@$(EMU_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-tasks-emulator.txt
	@touch $@

tasks-emulator: $(EMU_STAMP)

# The Firebase Auth emulator (npm firebase-tools; needs Node.js) for the emulator sign-in test and
# for signing in locally; tests/test_auth_emulator.py skips without it.
AUTH_EMU_DIR   := .tools/firebase
AUTH_EMU_STAMP := $(AUTH_EMU_DIR)/.installed-stamp
FIREBASE_TOOLS_VERSION := 15.34.2

$(AUTH_EMU_STAMP):
	@command -v npm >/dev/null || { echo "make auth-emulator needs Node.js and npm (e.g. apt-get install nodejs npm)"; exit 2; }
	@echo "Installing firebase-tools $(FIREBASE_TOOLS_VERSION) into $(AUTH_EMU_DIR) (npm; a minute or two) ..."
	@mkdir -p $(AUTH_EMU_DIR)
	@npm install --prefix $(AUTH_EMU_DIR) --no-audit --no-fund --loglevel=error firebase-tools@$(FIREBASE_TOOLS_VERSION) >/dev/null
	@touch $@

auth-emulator: $(AUTH_EMU_STAMP)

run: $(STAMP)
	@echo "Starting dylen-jobs locally (python -m devtools.run) ..."
	@$(BIN)/python -m devtools.run

test: $(STAMP) $(EMU_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

$(VENV)/.bench-stamp: $(STAMP) bench/requirements.txt
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	@touch $@

bench: $(VENV)/.bench-stamp
	@command -v wrk >/dev/null || { echo "make bench needs wrk: sudo apt-get install wrk (Debian/Ubuntu) or brew install wrk"; exit 2; }
	$(BIN)/python -m bench.perf $(BENCH_ARGS)

# The soak also runs in `make test`, shortened (DYLEN_SOAK_JOBS defaults to 200).
soak: $(STAMP)
	DYLEN_SOAK_JOBS=$${DYLEN_SOAK_JOBS:-2000} $(BIN)/python -m pytest -m soak --timeout 1800 $(PYTEST_ARGS)

bench-load: $(STAMP)
	$(BIN)/python bench/load_bench.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .

bench-archive: $(STAMP)
	$(BIN)/python -m bench.archive_bench $(BENCH_ARGS)

# Builds ~10M jobs (minutes, ~10 GB) on DYLEN_BENCH_ADMIN_URL or BENCH_ARGS="--admin-url ...", else embedded.
bench-growth: $(STAMP)
	$(BIN)/python -m bench.growth_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(EMU_VENV) .tools .dev .pytest_cache .mypy_cache .ruff_cache build
