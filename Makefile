# The README's commands live here. `make run` is the main job, `make test` the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: help install run test unit lint bench chaos fuzz services browser up down clean

$(BIN)/orchestrator: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(BIN)/orchestrator

# The `bench` extra (DBOS Transact) for `make bench` and its end-to-end test.
$(VENV)/.bench: $(BIN)/orchestrator setup.cfg
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

run: install           ## every process plus the emulators, embedded defaults, Ctrl-C stops all
	$(BIN)/orchestrator dev

services:              ## start PostgreSQL, RabbitMQ and Redis if one is down (tests need them)
	bash .ci/services

browser:               ## Debian's chromium for the chat page test, installed only when missing
	bash .ci/browser

# Two pytest workers (pytest-xdist), a test file each at a time: most of the suite waits on
# processes and brokers, so two streams finish in about half the time on 2 cores.
TEST_WORKERS ?= 2
test: install $(VENV)/.bench services browser lint ## the layer contracts, then the whole suite against the real services (TEST_WORKERS=n)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=15

lint: install          ## the import contracts between the layers (.importlinter, docs/architecture.md)
	$(BIN)/lint-imports

FUZZ_EXAMPLES ?= 200
fuzz: install services ## every /openapi.json operation with FUZZ_EXAMPLES generated requests (FUZZ_SEED to vary), and hostile HTTP
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q -s -p no:cacheprovider tests/contracts/test_openapi_fuzz.py tests/contracts/test_hostile_http.py

unit: install          ## the tests with no I/O, in a second
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit tests/engine

bench: install $(VENV)/.bench services ## every figure beside its peer, one table at the end (docs/performance.md)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

SEED ?= 1
chaos: install         ## fault injection over every workflow (docs/reliability.md); private services, SEED=n
	$(BIN)/python -m bench.chaos --seed $(SEED)

help:                  ## this list
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z]+):.*## /  make \1\t/'

up:                    ## the full stack with Docker
	docker compose up --build -d

down:
	docker compose down

clean:
	rm -rf $(VENV) data *.egg-info
