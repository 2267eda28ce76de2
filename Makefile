# postflow: the two commands for a fresh machine are `make demo` and `make test` (see README.md).
SHELL := /bin/bash
PY := .venv/bin/python
BIN := target/release/postflow
DEMO_BUNDLE ?= models/digits
export POSTFLOW_ORT_LIB := $(CURDIR)/.ort/libonnxruntime.so
export POSTFLOW_BIN := $(CURDIR)/$(BIN)

.PHONY: setup build demo test test-rust test-python test-c fixtures

setup:
	./scripts/setup.sh

build: setup
	cargo build --release --locked

# The main job on a shipped bundle: flow BMA vs HMC vs MAP on its eval split.
demo: build
	$(BIN) eval $(DEMO_BUNDLE) --plot target/$(notdir $(DEMO_BUNDLE))-reliability.svg

# Every test: Rust, C (sanitizers, valgrind), Python (bindings, pipeline).
test: build test-rust test-c test-python

test-rust:
	cargo fmt --all -- --check
	cargo test --release --locked
	# every criterion bench once, as a test (they must keep building and running)
	cargo test --release --locked --benches
	# The CUDA execution-provider path must keep compiling (it runs only where a CUDA ONNX Runtime exists).
	CARGO_TARGET_DIR=target/cuda-check cargo check --locked --features cuda --lib

test-c:
	@if [ -f tests/c/Makefile ]; then $(MAKE) -C tests/c all; fi

PYTEST_DIRS := $(wildcard train/tests bindings/python/tests)
test-python:
	@if [ -n "$(PYTEST_DIRS)" ]; then $(PY) -m pytest -q $(PYTEST_DIRS); fi

# Regenerate the committed closed-form fixture bundles.
fixtures: setup
	$(PY) tests/fixtures/make_fixtures.py
	$(PY) tests/fixtures/make_refine_fixture.py

# ---- C API (issue 5): header, install, example ------------------------------
.PHONY: header install example-c
PREFIX ?= /usr/local
PF_VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

# Rewrite include/postflow.h from src/ffi/ (cbindgen runs in build.rs).
header:
	POSTFLOW_BLESS_HEADER=1 cargo test --release --locked --test header

# Install lib/libpostflow.{so,a}, include/postflow.h and lib/pkgconfig/postflow.pc under $(PREFIX).
install:
	cargo build --release --locked --lib
	install -d $(DESTDIR)$(PREFIX)/lib/pkgconfig $(DESTDIR)$(PREFIX)/include
	install -m 755 target/release/libpostflow.so $(DESTDIR)$(PREFIX)/lib/libpostflow.so
	install -m 644 target/release/libpostflow.a $(DESTDIR)$(PREFIX)/lib/libpostflow.a
	install -m 644 include/postflow.h $(DESTDIR)$(PREFIX)/include/postflow.h
	printf '%s\n' 'prefix=$(PREFIX)' 'libdir=$${prefix}/lib' 'includedir=$${prefix}/include' '' \
		'Name: postflow' 'Description: Posterior weight samples and Bayesian model averaging from flow bundles (C API)' \
		'Version: $(PF_VERSION)' 'Libs: -L$${libdir} -lpostflow' 'Libs.private: -lpthread -ldl -lm' \
		'Cflags: -I$${includedir}' > $(DESTDIR)$(PREFIX)/lib/pkgconfig/postflow.pc

# Build and run examples/c/minimal.c against a temporary install, through pkg-config.
example-c:
	$(MAKE) -C tests/c example

# ---- Performance (issue 6): criterion benches and the comparison harness -------
# See docs/performance.md. COMPARE_ARGS adds options, e.g. COMPARE_ARGS="models/moons --repeats 8 --rounds 3".
.PHONY: bench compare
SYNTH := target/synthetic
COMPARE_ARGS ?=

# Criterion benches of the runtime (POSTFLOW_BENCH_BUNDLE picks the bundle).
bench:
	cargo bench --bench runtime

$(SYNTH)/synthetic_d100000/postflow.json:
	$(PY) benches/synthetic.py $(SYNTH) 1000 10000 100000

# postflow (Rust API, C ABI) vs the ONNX Runtime floor, the JAX reference and a Python loop;
# writes target/perf/compare.json and docs/figures/perf_*.png.
compare: build $(SYNTH)/synthetic_d100000/postflow.json
	cargo build --release --locked --example time_sample
	$(PY) benches/compare.py --extras --synthetic $(SYNTH) --json target/perf/compare.json $(COMPARE_ARGS)
