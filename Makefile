# Every target does its own setup: a virtualenv in .venv, dependencies, generated code.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
PROTOS  := $(shell find protos -name '*.proto')
STAMP   := $(VENV)/.installed

.PHONY: setup proto browser run test lint format bench model clean deploy-config docs up down

setup: $(STAMP) proto

$(STAMP): pyproject.toml requirements.lock
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

# Generated code mirrors the proto packages (loraplex/<svc>/v1/...), so imports need no fixing.
proto: $(STAMP) loraplex/.generated

loraplex/.generated: $(PROTOS)
	rm -rf loraplex
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. $(PROTOS)
	touch loraplex/.generated

run: setup
	$(BIN)/python -m services.stack

# The console's browser tests (marker `browser`) drive Debian's chromium through playwright
# (its own browser download is not reachable here); installed once, when missing.
CHROMIUM ?= /usr/bin/chromium
SUDO    := $(if $(filter 0,$(shell id -u)),,sudo)
browser:
	@test -x $(CHROMIUM) || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium; }

test: setup browser
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmarks (not timed tests): tables on stdout, JSON in bench/results/. BENCH=name runs one.
bench: setup
	$(BIN)/python -m bench $(BENCH)

model: setup
	$(BIN)/python -m models.build_base
	$(BIN)/python -m models.build_adapters

# kustomize reads no file outside deploy/k8s/base: it gets copies of config/*.yaml.
deploy-config:
	rm -f deploy/k8s/base/config/*.yaml
	cp config/*.yaml deploy/k8s/base/config/

# Generated docs and dashboards (tests/deploy fails when the committed ones are stale).
docs: setup
	$(BIN)/python docs/gen_api_reference.py
	$(BIN)/python deploy/grafana/build_dashboards.py

# The compose stack (docs/deploy.md): needs Docker and a .env made from deploy/compose.env.example.
up:
	docker compose up -d --build

down:
	docker compose down

clean:
	rm -rf loraplex .pytest_cache .ruff_cache
