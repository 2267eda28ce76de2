# postflow: the two commands for a fresh machine are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY := .venv/bin/python
BIN := target/release/postflow
DEMO_BUNDLE ?= tests/fixtures/bundles/affine_cls
export POSTFLOW_ORT_LIB := $(CURDIR)/.ort/libonnxruntime.so
export POSTFLOW_BIN := $(CURDIR)/$(BIN)

.PHONY: setup build demo test test-rust test-python test-c fixtures

setup:
	./scripts/setup.sh

build: setup
	cargo build --release --locked

# The main job on a shipped bundle.
demo: build
	$(BIN) sample $(DEMO_BUNDLE) -n 1000 --trace hutchinson -o /tmp/postflow-demo-samples.safetensors

# Every test: Rust, C (sanitizers, valgrind), Python (bindings, pipeline).
test: build test-rust test-c test-python

test-rust:
	cargo fmt --all -- --check
	cargo test --release --locked

test-c:
	@if [ -f tests/c/Makefile ]; then $(MAKE) -C tests/c all; fi

PYTEST_DIRS := $(wildcard train/tests bindings/python/tests)
test-python:
	@if [ -n "$(PYTEST_DIRS)" ]; then $(PY) -m pytest -q $(PYTEST_DIRS); fi

# Regenerate the committed closed-form fixture bundles.
fixtures: setup
	$(PY) tests/fixtures/make_fixtures.py
