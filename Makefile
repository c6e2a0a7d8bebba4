# dropfleet: two commands to start — `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install data test-deps demo test test-slow test-e2e test-all lint proto locks compose bench bench-quick clean

install: $(STAMP) data

# Pinned dependencies (requirements.lock, every file's hash checked) into a project-local
# venv; torch is the CPU wheel (torch==2.13.0), anything else would pull a multi-GB CUDA build.
# The CPU torch wheel: from a local wheel folder when PIP_FIND_LINKS names one, else from
# PyTorch's CPU index (as the images and the edge kit do); PyPI's x86_64 torch is the CUDA build.
TORCH_SOURCE ?= $(if $(PIP_FIND_LINKS),,--extra-index-url https://download.pytorch.org/whl/cpu)

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SOURCE) --require-hashes -r requirements.lock
	@# setuptools' notes on an editable install go to a log (shown if the install fails)
	@$(PY) -m pip install -q --no-deps -e . >$(VENV)/install-editable.log 2>&1 || { cat $(VENV)/install-editable.log; exit 1; }
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist, unless the user points
# DROPFLEET_DATA_DIR at their own copy.
data:
	@if [ -n "$$DROPFLEET_DATA_DIR" ] || [ -f $(FMNIST) ]; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
	  echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST missing: install dataset-fashion-mnist or set DROPFLEET_DATA_DIR" >&2; exit 1; \
	fi

# The main job on its embedded defaults (pyproject's [tool.flwr.app.config]):
# `flwr run .` on Flower's Simulation Engine, a fleet of 12 mixed devices.
demo: install
	$(VENV)/bin/dropfleet simulate --nodes 12 --results results/demo.jsonl

# Debian packages some tests need (a PostgreSQL server for the store, docker-compose to
# validate compose files, Chromium for the status page, nginx for the fleet's published
# port): installed when missing and apt-get can (as root); otherwise this says what to install.
test-deps:
	@need=""; ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need="$$need postgresql"; \
	command -v docker-compose >/dev/null || need="$$need docker-compose"; \
	command -v chromium >/dev/null || need="$$need chromium"; \
	command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need="$$need nginx-light"; \
	if [ -z "$$need" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing for the tests:$$need"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null 2>&1 \
	  || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$need >/dev/null; }; \
	else \
	  echo "some tests will be skipped; to run them: sudo apt-get install$$need" >&2; \
	fi

# The default suite: everything but the tests marked slow; under ~10 minutes.
test: install test-deps
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -m "not slow and not e2e"

# Deployment end to end: the containerized fleet (a private Docker engine, images built from
# deploy/; needs root and Debian's docker.io, docker-compose and mmdebstrap) and the edge kit
# installed into a prefix joining a fleet. About 15 minutes; CI runs it after `make test`.
test-e2e: install
	$(PY) -m pytest -q -s -m e2e

# The tests marked slow (whole simulations, a fleet killed and restarted, the Deployment Engine
# end to end, node auth probed alone): about 12 minutes; CI runs them after `make test`.
test-slow: install test-deps
	$(PY) -m pytest -q -m "slow and not e2e"

test-all: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto proto/sparse_model.proto

# requirements.lock's hashes (every file of each pin on the index, and the local CPU torch
# wheel) and from it the board's locks: requirements-client.lock (a lean board: no torch) and
# requirements-torch.lock (a board's torch runtime; the client image installs both).
locks: install
	$(PY) -m dropfleet.deploy.locks . --hash

# docker-compose.yml from the process fleet's topology (NODES=12 make compose).
NODES ?= 4
compose: install
	$(VENV)/bin/dropfleet compose --nodes $(NODES) > docker-compose.yml

# Benchmarks print ratios measured side by side and write results/bench-*.json.
bench: install
	$(PY) bench/centralized.py
	$(PY) bench/wire.py
	$(PY) bench/aggregation.py
	$(PY) bench/overhead.py
	$(PY) bench/memory.py
	$(PY) bench/race.py
	$(PY) bench/levers.py
	$(PY) bench/fleet_scale.py
	$(PY) bench/server_state.py
	$(PY) bench/board.py

bench-quick: install
	$(PY) bench/centralized.py --quick
	$(PY) bench/wire.py --quick
	$(PY) bench/aggregation.py --quick
	$(PY) bench/overhead.py --quick
	$(PY) bench/memory.py --quick
	$(PY) bench/race.py --quick
	$(PY) bench/levers.py --quick
	$(PY) bench/fleet_scale.py --quick
	$(PY) bench/server_state.py --quick
	$(PY) bench/board.py --quick

clean:
	rm -rf $(VENV) results .pytest_cache .ruff_cache .hypothesis
