# certqueue: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-random test-unit test-integration lint services install bench flower clean mutation

# every dependency pinned with its hash (requirements/dev.txt, made by scripts/lock-requirements
# from pyproject.toml), then certqueue itself, editable, adding nothing unpinned
$(STAMP): pyproject.toml requirements/dev.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --require-hashes -r requirements/dev.txt
	$(PY) -m pip install -q --no-deps -e .
	@touch $(STAMP)

install: $(STAMP)

services:
	scripts/services install
	scripts/services start

## make demo: install, start the embedded stack, issue real certificates from a local Pebble,
## deploy them, renew one, revoke one, show the inventory, stop everything
demo: install
	scripts/services install
	@# `python -m` from the checkout's root: the demo's test servers (devstack/) are not installed
	$(PY) -m certqueue demo

## make test: lint, type-check, then every test (unit, contract, integration on the real servers)
## in TEST_JOBS processes (one test file per process at a time: a module's stack stays in one), then
## the chaos suite alone, at fleet size: 200 certificates per case (a quarter of them wildcards by
## DNS-01); alone, since its cases load every core and the other tests' timeouts are not theirs
CHAOS_CERTS ?= 200
TEST_JOBS ?= 2
TEST_ENV := CERTQUEUE_CHAOS_CERTS=$(CHAOS_CERTS) CERTQUEUE_REQUIRE_SERVICES=1 CERTQUEUE_REQUIRE_POSTGRES=1 \
	CERTQUEUE_REQUIRE_PROMTOOL=1 CERTQUEUE_REQUIRE_BROWSER=1 CERTQUEUE_REQUIRE_DEPLOY_TOOLS=1

test: install services lint
	@# byte-compile once: with PYTHONDONTWRITEBYTECODE set (as on CI machines), every worker, beat and
	@# CLI process the suite starts would otherwise compile certqueue's sources again (~0.3 s each)
	$(PY) -m compileall -q certqueue tests bench
	@# both parts run whatever the first one gave; the exit status is the first failure's
	rc=0; \
	$(TEST_ENV) $(VENV)/bin/pytest -p no:cacheprovider -p no:randomly -q -n $(TEST_JOBS) --dist loadfile \
		--ignore=tests/chaos $(PYTEST_ARGS) || rc=$$?; \
	$(TEST_ENV) $(VENV)/bin/pytest -p no:cacheprovider -p no:randomly -q tests/chaos $(PYTEST_ARGS) || \
		{ r=$$?; [ $$rc -ne 0 ] || rc=$$r; }; \
	exit $$rc

## make test-random: unit and contract tests in random order on two xdist workers (isolation check)
test-random: install
	$(VENV)/bin/pytest -p no:cacheprovider -q -n 2 tests/unit tests/contract $(PYTEST_ARGS)

test-unit: install
	$(VENV)/bin/pytest -q tests/unit tests/contract $(PYTEST_ARGS)

test-integration: install services
	$(VENV)/bin/pytest -q tests/integration tests/chaos $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	@# the layers (pyproject [tool.importlinter]): lifecycle pure, task modules independent, faces
	@# call no task module, plugins import no ACME
	$(VENV)/bin/lint-imports --no-cache

## make mutation: mutmut over the modules that decide (pyproject [tool.mutmut]), each mutant against the
## unit tests that reach it; report in var/mutation/report.txt. MUTANTS='certqueue.http01*' narrows it.
## Slow (hours for all modules on 2 cores); niced, since the machine is shared. docs/testing.md.
mutation: install services
	mkdir -p var/mutation
	nice -n 15 $(VENV)/bin/mutmut run --max-children $${MUTATION_JOBS:-2} $(MUTANTS)
	$(VENV)/bin/mutmut results --all true > var/mutation/results.txt
	$(PY) scripts/mutation_report.py < var/mutation/results.txt | tee var/mutation/report.txt

bench: install services
	$(PY) -m pip install -q 'matplotlib>=3.7' 'py-spy>=0.3' 'yappi>=1.6'  # charts, stack dumps, BENCH_YAPPI (not in the test lock)
	$(PY) -m bench $(BENCH_ARGS)

## make flower: task monitoring. Basic auth is required: Flower reads FLOWER_BASIC_AUTH=user:password
## from the environment (kept off the command line); its /metrics is served without auth, so it
## binds loopback only (docs/operations.md)
flower: install
	@test -n "$$FLOWER_BASIC_AUTH" || { echo "set FLOWER_BASIC_AUTH=user:password (no default password)"; exit 2; }
	$(VENV)/bin/celery -A certqueue.flower_app flower --port=$${FLOWER_PORT:-5555} --address=127.0.0.1

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache
