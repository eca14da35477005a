# Two commands for a fresh machine: `make up` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch is installed first and pinned: on this project's machines pip takes the CPU build from
# local disk; a bare `torch` would pull the multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install up test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test,nixl]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(VENV)/bin/slaq model pull
	$(VENV)/bin/slaq up

lint: $(STAMP)
	$(VENV)/bin/ruff check slaq tests

test: $(STAMP) lint
	$(VENV)/bin/pytest -q --durations=15

clean:
	rm -rf $(VENV) .pytest_cache
