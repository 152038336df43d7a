# Agentry — the two commands a newcomer runs: `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# Build outputs and tool caches live outside the clone so fresh clones (and CI) reuse them.
export AGENTRY_CACHE ?= $(HOME)/.cache/agentry
export CARGO_TARGET_DIR ?= $(AGENTRY_CACHE)/target
export AGENTRY_CLUSTER_DIR ?= $(AGENTRY_CACHE)/cluster
KUBECONFIG_LOCAL := $(AGENTRY_CLUSTER_DIR)/kubeconfig
BIN := $(CARGO_TARGET_DIR)/debug/agentry
DEMO_DIR := $(AGENTRY_CACHE)/demo

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: build
build: ## Build the agentry binary (debug)
	cargo build --bin agentry

.PHONY: crds
crds: ## Regenerate crds/, the chart's CRDs and policy, and the OpenAPI document from the Rust types
	cargo build --quiet --bin agentry
	$(BIN) crd > crds/agentry.dev_crds.yaml
	$(BIN) crd --only crds > charts/agentry/crds/agentry.dev_crds.yaml
	$(BIN) crd --only chart-policy > charts/agentry/templates/admission-policy.yaml
	$(BIN) openapi > openapi/agentry-api.json

.PHONY: lint
lint: ## cargo fmt --check and clippy with warnings as errors
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

.PHONY: cluster-up
cluster-up: ## Start the local control plane (etcd, apiserver, controller-manager, scheduler, kwok)
	hack/local-cluster up

.PHONY: cluster-down
cluster-down: ## Stop the local control plane
	hack/local-cluster down

.PHONY: unit
unit: ## Unit tests (no cluster)
	cargo test --lib --bins

# Python for the tests' independent checks (PyJWT + cryptography), in a venv under the cache.
PYTHON_VENV := $(AGENTRY_CACHE)/venv
export AGENTRY_PYTHON ?= $(PYTHON_VENV)/bin/python3

.PHONY: pyenv
pyenv: ## Python venv for the tests' independent checks (PyJWT, a2a-sdk, boto3, blake3) and the example clients (httpx, redis)
	@test -x $(PYTHON_VENV)/bin/python3 || python3 -m venv $(PYTHON_VENV)
	@$(PYTHON_VENV)/bin/python3 -c 'import jwt, cryptography, a2a, httpx, boto3, blake3, redis' 2>/dev/null || \
	  $(PYTHON_VENV)/bin/python3 -m pip install -q 'pyjwt[crypto]==2.15.1' 'a2a-sdk[signing]==1.3.0' \
	    'boto3==1.44.8' 'blake3==1.0.11' 'redis==8.1.0' -r examples/python/requirements.txt

.PHONY: e2e
.PHONY: redis-up
redis-up: ## Start the local Redis servers for messaging: standalone and a 3-master cluster (Debian's redis-server, installed when missing)
	hack/redis install
	hack/redis up

.PHONY: s3-up
s3-up: ## Build (cached) and start the two local S3 stores: versitygw (primary) and SeaweedFS (secondary)
	hack/build-s3
	hack/s3-stores up >/dev/null

# The controller image as an OCI archive (target/image/agentry-<version>.oci.tar), built with
# crane on an empty base from a static release binary; no Docker. tests/image.rs checks it.
.PHONY: image
image: ## Build the controller image: target/image/agentry-<version>.oci.tar (docker/podman load, ctr import)
	hack/build-image

.PHONY: litestream
litestream: ## Build Litestream (cached), for the ledger replication tests and docs/ha.md
	hack/build-litestream >/dev/null

e2e: cluster-up pyenv s3-up redis-up litestream image ## End-to-end tests against the local control plane and S3 stores
	KUBECONFIG=$(KUBECONFIG_LOCAL) cargo test --test '*' -- --test-threads=2

.PHONY: test
test: lint unit e2e ## Everything: fmt, clippy, unit and end-to-end tests

.PHONY: demo
demo: build cluster-up s3-up redis-up litestream ## Local control plane, S3 stores, CRDs, controller, examples, then what to look at
	hack/demo up

.PHONY: demo-down
demo-down: ## Stop the demo controller, the local control plane, the S3 stores and Redis
	hack/demo down
	hack/local-cluster down
	hack/s3-stores down
	hack/redis down

# The backup bench's BLAKE3 baseline, built once into the cache (its own temporary target dir).
B3SUM_VERSION := 1.8.7
B3SUM_DIR := $(AGENTRY_CACHE)/bin/b3sum-$(B3SUM_VERSION)

.PHONY: bench-tools
bench-tools: ## b3sum for the backup bench (cached; without it the bench compares with the blake3 crate)
	@test -x $(B3SUM_DIR)/bin/b3sum || env -u CARGO_TARGET_DIR cargo install b3sum --locked \
	  --version $(B3SUM_VERSION) --root $(B3SUM_DIR) || \
	  echo "b3sum could not be installed: the backup bench compares with the blake3 crate instead"

.PHONY: bench
bench: cluster-up s3-up redis-up bench-tools ## Benchmarks (ratios against a baseline in the same run) -> target/bench/*.json
	mkdir -p target/bench
	AGENTRY_BENCH_OUT=$(CURDIR)/target/bench cargo bench --bench identity
	AGENTRY_BENCH_OUT=$(CURDIR)/target/bench cargo bench --bench api
	AGENTRY_BENCH_OUT=$(CURDIR)/target/bench KUBECONFIG=$(KUBECONFIG_LOCAL) cargo bench --bench controller
	AGENTRY_BENCH_OUT=$(CURDIR)/target/bench cargo bench --bench backup
	eval "$$(hack/redis env)" && AGENTRY_BENCH_OUT=$(CURDIR)/target/bench cargo bench --bench messaging
