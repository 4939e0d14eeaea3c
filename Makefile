# make run   — set up .venv and run the main job (gprune flow) on the embedded default model
# make test  — set up .venv and run the test suite
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup run test test-all server-up deploy worker server-down

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt "torch==2.13.0" -e ".[test,dask]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/gprune run --model smollm2

test: setup
	$(PY) -m pytest -q -x --durations=15

# Local Prefect server (SQLite, 127.0.0.1, telemetry off), process pool, deployments, worker.
# State (pid files, logs, database) under .gprune/prefect; see docs/PREFECT.md.
PREFECT_LOCAL := GPRUNE_PYTHON=$(abspath $(PY)) scripts/prefect_local.sh

server-up: setup
	$(PREFECT_LOCAL) up

deploy: setup
	$(PREFECT_LOCAL) deploy

worker: setup
	$(PREFECT_LOCAL) worker

server-down:
	$(PREFECT_LOCAL) down
