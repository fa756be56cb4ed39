# `make run`: install what is missing, then run the whole DAG on the bundled Fashion-MNIST.
# `make test`: install, then run every test. `make test-unit`: the unit tier (no subprocess, Spark or
# Airflow; about a minute). `make test-fast`: all but the end-to-end modules (Airflow scheduler,
# make run, clusters, browser). Tiers: the `unit` and `e2e` markers (tests/conftest.py).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt constraints.txt pyproject.toml | md5sum | cut -c1-8)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: docs-img install venv system-deps test test-unit test-fast run ui clean cluster-up cluster-down

install: venv system-deps

# Python 3.11 or newer (pyproject.toml's requires-python; constraints.txt was frozen on 3.11).
# PYTHON=python3.12 chooses the interpreter of a new .venv; an existing .venv keeps its own.
PYTHON_MIN := 3.11

venv: $(STAMP)
$(STAMP): requirements.txt constraints.txt pyproject.toml
	@py=$(BIN)/python; test -x $$py || py="$(PYTHON)"; \
	 command -v "$$py" >/dev/null || { echo "make install: $$py not found: install Python $(PYTHON_MIN) or newer, or name it with PYTHON=python3.X" >&2; exit 1; }; \
	 "$$py" -c 'import sys; sys.exit(sys.version_info < tuple(map(int, "$(PYTHON_MIN)".split("."))))' || { \
	   echo "make install: Python $(PYTHON_MIN) or newer is required, $$py is $$("$$py" -V 2>&1)." >&2; \
	   echo "  Name another interpreter with PYTHON=python3.X$$(test -x $(BIN)/python && echo ' after rm -rf $(VENV)')." >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip wheel
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	@# The Spark provider pulls in pyspark-client 4.2.0, which overwrites pyspark 4.3.0's Python files
	@# (no 4.3.0 client exists): put pyspark's own files back so both sides are 4.3.0.
	$(BIN)/python -m pip install -q --no-deps --force-reinstall pyspark==4.3.0
	@# The project itself, editable: `import lottery` and the `lottery` command work from any directory.
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*; touch $@

system-deps:
	@command -v java >/dev/null || { echo "Java 17+ is required by Spark: install it (Debian: apt-get install -y openjdk-17-jre-headless)"; exit 1; }
	@test -d $(FASHION_MNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }
	@# The browser tests (tests/test_ui_browser.py) drive Debian's Chromium with Playwright (never `playwright install`).
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

# pytest's exit status 5 (no test selected, e.g. a marker filter that matches nothing) is not a failure.
test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS) || [ $$? = 5 ]

test-unit: install
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS) || [ $$? = 5 ]

test-fast: install
	$(BIN)/python -m pytest -m "not e2e" $(PYTEST_ARGS) || [ $$? = 5 ]

# docs/img/report-tab.png, the README's picture of the report tab: the newest run of the `make ui`
# running on $(LOTTERY_AIRFLOW_HOME) (after `make run`, the default experiment).
docs-img: install
	$(BIN)/python scripts/report_tab_screenshot.py --home "$(LOTTERY_AIRFLOW_HOME)"

clean:
	rm -rf .pytest_cache build

# ---- make run / make ui (lottery/deploy/run.py, ui.py; see docs/dag.md) ------------------------
# make run [CONF='{"model": "conv4"}']: one DAG run on a project-local Airflow (scheduler +
#   LocalExecutor on SQLite in $(LOTTERY_AIRFLOW_HOME)), progress, accuracy table, report path;
#   exit status 0 only when the run succeeded.
# make ui [UI_PORT=8080]: api-server + scheduler + dag-processor + triggerer until Ctrl-C.
# PARALLELISM=N: LocalExecutor slots (default: the number of cores, at least 2).
CONF ?=
UI_PORT ?= 8080
PARALLELISM ?=
LOTTERY_AIRFLOW_HOME ?= $(CURDIR)/.airflow

run: export LOTTERY_CONF = $(CONF)
run: install
	$(BIN)/python -m lottery.deploy.run --home "$(LOTTERY_AIRFLOW_HOME)" --conf "$$LOTTERY_CONF" $(if $(PARALLELISM),--parallelism $(PARALLELISM))

ui: install
	$(BIN)/python -m lottery.deploy.ui --home "$(LOTTERY_AIRFLOW_HOME)" --port $(UI_PORT) $(if $(PARALLELISM),--parallelism $(PARALLELISM))

# ---- the cluster topology as local processes on loopback (lottery/deploy/cluster.py; docs/cluster.md)
cluster-up: install
	$(BIN)/python -m lottery.deploy.cluster up

cluster-down:
	$(BIN)/python -m lottery.deploy.cluster down
