# make run   — set up .venv and run the main job (gprune flow) on the embedded default model
# make test  — set up .venv and run the test suite
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PYTHON ?= python3
STAMP  := $(VENV)/.installed
SERVE_STAMP := $(VENV)/.installed-serve
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export DO_NOT_TRACK ?= 1
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup setup-serve lock run test test-all server-up deploy worker server-down

# llama-cpp-python (the `serve` extra, llama.cpp for `gprune export gguf` and its tests) is an
# sdist: pip builds it once with cmake and g++ (about 9 min on 2 cores) and keeps the wheel in
# its cache (~/.cache/pip), which later installs of the same hash-locked sdist reuse (seconds).
# Built for the machine's own CPU, without the multimodal library and without AMX: the project's
# VMs advertise AMX, but AMX tile instructions die with SIGILL there (seen on q8_0 matmuls).
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
LLAMA_CPU_FLAGS  ?= -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_BUILD_ENV  := CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CFLAGS="$(LLAMA_CPU_FLAGS)" \
                    CXXFLAGS="$(LLAMA_CPU_FLAGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc)

# The lock (pip-tools, with hashes) installs exactly what the tests saw; scripts/check_lock.py
# stops with one line when pyproject.toml or constraints.txt changed without `make lock`.
$(STAMP): pyproject.toml constraints.txt requirements/cpu.txt requirements/pip.txt
	$(PYTHON) scripts/check_lock.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes -r requirements/pip.txt
	awk -f scripts/lock_without_serve.awk requirements/cpu.txt > $(VENV)/core-lock.txt
	$(PIP) install -q --no-compile --require-hashes -r $(VENV)/core-lock.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The serve extra (llama-cpp-python, the lock's own hash-pinned sdist; its dependencies are in
# the core lock): only `make test` and users of `gprune export gguf` need it, so `make run`
# does not pay its build.
$(SERVE_STAMP): $(STAMP)
	awk -v serve=1 -f scripts/lock_without_serve.awk requirements/cpu.txt > $(VENV)/serve-lock.txt
	$(LLAMA_BUILD_ENV) $(PIP) install -q --no-deps --require-hashes -r $(VENV)/serve-lock.txt
	touch $(SERVE_STAMP)

# Re-resolve the lock from pyproject.toml + constraints.txt (then run `make test`).
LOCKENV := .gprune/lockenv
lock:
	$(PYTHON) -m venv $(LOCKENV)
	$(LOCKENV)/bin/python -m pip install -q --disable-pip-version-check "pip-tools==7.6.2"
	$(LOCKENV)/bin/pip-compile -q pyproject.toml --extra test --extra dask --extra ray --extra serve --generate-hashes \
	    --allow-unsafe --no-strip-extras --no-emit-index-url --no-emit-find-links \
	    -c constraints.txt -o requirements/cpu.txt
	$(PYTHON) scripts/check_lock.py --stamp

setup: $(STAMP)

setup-serve: $(SERVE_STAMP)

run: setup
	$(VENV)/bin/gprune run --model smollm2

test: setup-serve
	$(PY) -m pytest -q -x --durations=15
	$(PY) scripts/test_oldest_transformers.py

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
