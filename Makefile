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

.PHONY: install proto native lint breaking test test-tools up status down certs demo load bench $(addprefix bench-,$(SERVICES)) clean

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

test: install test-tools
	$(BIN)/pytest -q $(PYTEST_ARGS)

# PROFILE=secure: mutual TLS and role-based authorization (guardmesh/profiles/secure.toml).
PROFILE ?=
PROFILE_ENV := $(if $(PROFILE),GUARDMESH_CONFIG=guardmesh/profiles/$(PROFILE).toml)

up: install
	$(PROFILE_ENV) $(BIN)/guardmesh mesh up

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

bench-paramserver: install
	$(PY) -m bench.paramserver
	$(PY) -m bench.ps_trainer

bench-scorer: install
	$(PY) -m bench.scorer

bench-abrouter: install
	$(PY) -m bench.abrouter

clean:
	rm -rf build $(VENV) .mesh native/*.c native/*.so $(NATIVE_STAMP) $(GEN_STAMP) guardmesh/v1/*_pb2*
