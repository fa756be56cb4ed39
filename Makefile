# `make run`: install what is missing, then run the whole DAG on the bundled Fashion-MNIST.
# `make test`: install, then run every test.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt constraints.txt | md5sum | cut -c1-8)
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install venv system-deps test run ui clean

install: venv system-deps

venv: $(STAMP)
$(STAMP): requirements.txt constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	@rm -f $(VENV)/.installed-*; touch $@

system-deps:
	@command -v java >/dev/null || { echo "Java 17+ is required by Spark: install it (Debian: apt-get install -y openjdk-17-jre-headless)"; exit 1; }
	@test -d $(FASHION_MNIST) || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf .pytest_cache build
