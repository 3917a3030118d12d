# guardmesh — the two commands: `make up` (local mesh) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# The CPU build of PyTorch (a bare `torch` requirement pulls a multi-GB CUDA build). Users with GPUs:
#   make install TORCH_REQ='torch==2.13.0' PIP_TORCH_ARGS='--index-url https://download.pytorch.org/whl/cu128'
TORCH_REQ ?= torch==2.13.0
PIP_TORCH_ARGS ?=
BUF_AGAINST ?= .git\#branch=main
STAMP := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
PYX := $(wildcard native/*.pyx)
GEN_STAMP := guardmesh/v1/.generated
NATIVE_STAMP := native/.built
SERVICES := scheduler paramserver scorer abrouter

.PHONY: install proto native lint breaking test test-tools test-postgres bench-scale up status down certs demo load bench $(addprefix bench-,$(SERVICES)) clean

install: $(STAMP) $(GEN_STAMP) $(NATIVE_STAMP)

# The first `make up` installs for a few minutes: each step says what it does (pip shows download progress).
$(STAMP): pyproject.toml setup.py
	@echo "guardmesh install [1/5]: virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	@echo "guardmesh install [2/5]: $(TORCH_REQ) (the largest download)"
	$(BIN)/pip install --progress-bar on "$(TORCH_REQ)" $(PIP_TORCH_ARGS)
	@echo "guardmesh install [3/5]: build tools (Cython, numpy, grpcio-tools)"
	$(BIN)/pip install -q "Cython>=3.0" "numpy>=1.26" "grpcio-tools>=1.62"
	@echo "guardmesh install [4/5]: guardmesh and its dependencies (generates the protobuf code)"
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	@echo "guardmesh install [5/5]: the Open Inference Protocol test peer"
	# tritonclient is only the test peer of the Open Inference Protocol; its metadata pins protobuf<7, which
	# would downgrade the runtime below the generated code, so it comes without its dependency pins.
	$(BIN)/pip install -q --no-deps "tritonclient[grpc]>=2.40" "ml-dtypes>=0.3" "python-rapidjson>=1.10"
	touch $@

proto: $(GEN_STAMP)
$(GEN_STAMP): $(PROTOS) tools/protogen.py | $(STAMP)
	$(PY) tools/protogen.py
	touch $@

native: $(NATIVE_STAMP)
$(NATIVE_STAMP): $(PYX) setup.py | $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	touch $@

lint: install
	$(BIN)/buf lint protos
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy guardmesh services

breaking: install
	$(BIN)/buf breaking protos --against '$(BUF_AGAINST),subdir=protos'

# System tools the suite runs for real: promtool (Debian's `prometheus` package) checks the alerting rules.
# Installed when missing and root with apt-get; otherwise the tests that need them fail saying so.
test-tools:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		echo "installing promtool (apt-get install prometheus)" && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } || \
		echo "promtool missing: install Debian's prometheus package (tests/test_alerts.py needs it)"

# PostgreSQL's server binaries (initdb, pg_ctl, postgres): the store tests start a throwaway server with them.
# Installed when missing and root with apt-get (Debian's postgresql); otherwise make stops saying how.
test-postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		echo "installing PostgreSQL (apt-get install postgresql)" && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; } || \
		{ echo "PostgreSQL server binaries missing: run 'sudo apt-get install postgresql' (Debian/Ubuntu) or put initdb and pg_ctl on PATH"; exit 1; }

test: install test-tools test-postgres
	$(BIN)/pytest -q $(PYTEST_ARGS)

# PROFILE=secure: mutual TLS and role-based authorization (guardmesh/profiles/secure.toml).
PROFILE ?=
PROFILE_ENV := $(if $(PROFILE),GUARDMESH_CONFIG=guardmesh/profiles/$(PROFILE).toml)

# REPLICAS=2: two scheduler replicas (one leads, one stands by); STORE=postgres: a local PostgreSQL server
# under the state folder holds the scheduler's state (started by up, stopped by down).
REPLICAS ?= 1
STORE ?= sqlite

up: install
	GUARDMESH_REPLICAS=$(REPLICAS) GUARDMESH_STORE=$(STORE) $(PROFILE_ENV) $(BIN)/guardmesh mesh up

status: install
	$(PROFILE_ENV) $(BIN)/guardmesh mesh status

down: install
	$(PROFILE_ENV) $(BIN)/guardmesh mesh down

# The whole chain on a local mesh: placement, training, publishing, experiment, drift, audit, traces.
demo: install
	$(BIN)/guardmesh demo

# RECORD=1: `make load` and the benchmarks replace the tracked bench/results/*.json; without it a run writes
# bench/results/local/ (ignored by git), so trying them changes nothing committed.
RECORD ?=
export GUARDMESH_BENCH_RECORD = $(RECORD)

# Every service's main RPCs from a multi-process load generator (bench/results/load.json with RECORD=1).
load: install
	$(PY) -m bench.load

# A local CA, a certificate per service and per role, role tokens and roles.toml in .mesh/certs.
certs: install
	$(BIN)/guardmesh certs

bench: $(addprefix bench-,$(SERVICES))

TRACE ?=
NODES ?=
bench-scheduler: install
	$(PY) -m bench.scheduler $(if $(TRACE),--trace $(TRACE)) $(if $(NODES),--nodes $(NODES))
	# After bench.scheduler (which rewrites scheduler.json): the kube-scheduler extender's latency records.
	$(PY) -m bench.extender

bench-paramserver: install
	$(PY) -m bench.paramserver
	$(PY) -m bench.ps_trainer

# QUICK=1: 1 and 64 clients, 2 s per cell (proves the matrix on a busy machine); BEFORE=DIR: a copy of the
# repository before a change, whose scorer is measured beside this one. Installs the bench extra's
# nvidia-pytriton when missing, without its dependencies: only the tritonserver binary it ships is used.
bench-scorer: install
	$(PY) -c "import importlib.util as u, sys; sys.exit(u.find_spec('pytriton') is None)" || \
		$(BIN)/pip install -q --no-deps "nvidia-pytriton>=0.5"
	$(PY) -m bench.scorer $(if $(QUICK),--quick) $(if $(BEFORE),--before $(BEFORE))

bench-abrouter: install
	$(PY) -m bench.abrouter

# Scheduler failover (kill -9 of the leader -> first acknowledged submit) and SubmitJob on PostgreSQL vs SQLite.
bench-scale: install test-postgres
	$(PY) -m bench.scale

clean:
	rm -rf build $(VENV) .mesh native/*.c native/*.so $(NATIVE_STAMP) $(GEN_STAMP) guardmesh/v1/*_pb2*
