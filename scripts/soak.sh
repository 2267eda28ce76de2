#!/usr/bin/env bash
# Soak run: repeat sample / log_prob / predict / sample_predict in one process for
# SECONDS (default 120) and report resident memory every few seconds and its growth.
#
#   scripts/soak.sh [SECONDS] [BUNDLE]
#
# Runs at low priority (nice 10) with one ONNX Runtime thread per session. The last
# line is the summary recorded in docs/reliability.md.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-120}"
shift || true
export POSTFLOW_ORT_LIB="${POSTFLOW_ORT_LIB:-$PWD/.ort/libonnxruntime.so}"
cargo build --release --example soak --quiet
exec nice -n 10 target/release/examples/soak "$seconds" "$@"
