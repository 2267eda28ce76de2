#!/usr/bin/env bash
# One-time, idempotent set-up on a fresh machine (Debian, Rust, Python 3 with pip):
#  - .venv/  : Python environment for the offline pipeline, bindings and tests (with Ray)
#  - .ort/   : libonnxruntime.so from the onnxruntime wheel on PyPI (the runtime loads it dynamically)
set -euo pipefail
cd "$(dirname "$0")/.."
ORT_VERSION=1.31.1

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# Ray (train/requirements-ray.txt: posterior.executor = "ray" and the test that compares its draws
# with the local ones) is installed too; POSTFLOW_NO_RAY=1 leaves it out (the test then skips).
stamp=.venv/.requirements.sha
want=$( (cat train/requirements.txt train/requirements-ray.txt; echo "no-ray=${POSTFLOW_NO_RAY:-0}") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -r train/requirements.txt
  if [ "${POSTFLOW_NO_RAY:-0}" != 1 ]; then
    .venv/bin/pip install --quiet -r train/requirements-ray.txt
  fi
  echo "$want" > "$stamp"
fi

lib=.ort/libonnxruntime.so.$ORT_VERSION
if [ ! -f "$lib" ]; then
  mkdir -p .ort/wheel
  .venv/bin/pip download --quiet --no-deps "onnxruntime==$ORT_VERSION" -d .ort/wheel
  whl=$(ls .ort/wheel/onnxruntime-$ORT_VERSION-*.whl | head -n1)
  .venv/bin/python - "$whl" "$lib" <<'PY'
import sys, zipfile, shutil
whl, dst = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.startswith("onnxruntime/capi/libonnxruntime.so."))
    with z.open(name) as src, open(dst, "wb") as out:
        shutil.copyfileobj(src, out)
PY
  ln -sf "libonnxruntime.so.$ORT_VERSION" .ort/libonnxruntime.so
  rm -rf .ort/wheel
fi
echo "setup: .venv ready, ONNX Runtime at $(pwd)/$lib"
