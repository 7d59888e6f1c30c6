VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

.PHONY: run test test-unit test-integration lint fmt bench bench-bus bench-slow-disk docs docker image images shell clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

run: $(STAMP) docker image images
	$(VENV)/bin/baaaht-orchestrator $(ARGS)

# Every test; test-unit is the pure-logic part (seconds, no engine, no process: tests/conftest.py lists
# its files), test-integration the rest (real processes and the Docker engine). TEST_WORKERS pytest-xdist
# processes share the files (each file whole on one worker: a module's shared host stays one); the
# integration tests mostly wait on processes and containers, so two workers pay even on two cores.
# TEST_WORKERS=0 runs in this process alone.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP) docker images
	$(PY) -m pytest -q $(XDIST) $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -q -m unit $(XDIST) $(PYTEST_ARGS)

test-integration: $(STAMP) docker
	$(PY) -m pytest -q -m integration $(XDIST) $(PYTEST_ARGS)

# The ruff configuration is pyproject's [tool.ruff].
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

fmt: $(STAMP)
	$(PY) -m ruff check --fix-only .
	$(PY) -m ruff format .

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $(BENCH_STAMP)

# The bus against a direct baseline and NATS: 5 alternating rounds (BENCH_ROUNDS), under 10 minutes.
bench-bus: $(BENCH_STAMP) docker
	bash bench/ensure-nats.sh
	$(PY) bench/bus.py

bench: bench-bus
	$(PY) bench/containers.py
	$(PY) bench/sessions.py
	$(PY) bench/scheduler.py
	$(PY) bench/egress.py
	$(PY) bench/tools.py
	$(PY) bench/assistant.py

# The session and scheduler benchmarks as on an ordinary disk: every fsync/fdatasync of their processes
# waits FSYNC_DELAY_US first (bench/slow_disk.py; results in bench/results/<name>-fsync-<delay>us.json).
FSYNC_DELAY_US ?= 1000
bench-slow-disk: $(BENCH_STAMP)
	BENCH_FSYNC_DELAY_US=$(FSYNC_DELAY_US) $(PY) bench/sessions.py
	BENCH_FSYNC_DELAY_US=$(FSYNC_DELAY_US) $(PY) bench/scheduler.py

docs: $(STAMP)
	$(PY) -m baaaht.bus.reference docs/WIRE-TYPES.md

docker:
	bash scripts/ensure-docker.sh

# The local image containers can run offline (baaaht/busybox:<content hash>); prints its tag.
image: $(STAMP) docker
	@$(PY) -m baaaht.host.images

# Every local image, built offline when missing or stale (baaaht/busybox, baaaht/agent and
# baaaht/orchestrator, tagged by content hashes of their inputs); prints their tags. Cached: well under 1 s.
images: $(STAMP) docker
	@$(PY) -m baaaht.host.images all

# A shell with baaaht-ctl and baaaht-orchestrator on PATH.
shell: $(STAMP)
	@echo "baaaht-ctl and baaaht-orchestrator are on PATH here; exit to leave" >&2
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $${SHELL:-/bin/sh}

clean:
	rm -rf $(VENV) build *.egg-info
