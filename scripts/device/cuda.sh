#!/usr/bin/env bash
# Issue 15: run postflow on the lent GPU machine with the CUDA build of ONNX Runtime.
#
#   scripts/device/cuda.sh prepare [PART_MIB]   here: fills .device/ (git-ignored) and prints the calls
#   scripts/device/cuda.sh parts                there: lists the parts carried so far
#   scripts/device/cuda.sh measure              there: assembles the library, takes inventory and
#                                               measures CPU against CUDA into $OUT
#
# Why in parts: onnxruntime-gpu 1.31.1's libonnxruntime_providers_cuda.so is 284 MB (218 MB of it
# GPU code for many architectures), and one device call carries 64 MiB with the working tree.
# prepare compresses the three libraries (xz) and splits them into parts that fit beside the
# tree; each device call carries one part folder, and carried, ignored paths stay on a warm
# machine between calls. The wheel is built for CUDA 13 (libcudart.so.13, libcublas.so.13), the
# CUDA of the machine's PyTorch (torch 2.11+cu130) and of its nvidia-* pip packages, whose
# lib folders measure puts on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/../.."
ORT_GPU_VERSION=1.31.1
DEV=.device

prepare() {
    local tree_mib part_mib
    tree_mib=$(( $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) / 1048576 + 1 ))
    part_mib=${1:-$(( 62 - tree_mib ))}
    if [ "$part_mib" -lt 8 ]; then echo "the tracked tree takes ${tree_mib} MiB: too little room left per call" >&2; exit 1; fi
    mkdir -p "$DEV/wheel" "$DEV/lib" "$DEV/bin"
    if ! ls "$DEV"/wheel/onnxruntime_gpu-"$ORT_GPU_VERSION"-*.whl >/dev/null 2>&1; then
        .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
            -d "$DEV/wheel" "onnxruntime-gpu==$ORT_GPU_VERSION"
    fi
    unzip -o -j -q "$DEV"/wheel/onnxruntime_gpu-"$ORT_GPU_VERSION"-*.whl -d "$DEV/lib" \
        "onnxruntime/capi/libonnxruntime.so.$ORT_GPU_VERSION" \
        'onnxruntime/capi/libonnxruntime_providers_shared.so' 'onnxruntime/capi/libonnxruntime_providers_cuda.so'
    if [ ! -f "$DEV/ort-gpu.tar.xz" ] || [ "$DEV/lib/libonnxruntime_providers_cuda.so" -nt "$DEV/ort-gpu.tar.xz" ]; then
        tar -C "$DEV/lib" -cf - . | xz -9 -T2 > "$DEV/ort-gpu.tar.xz"
    fi
    (cd "$DEV" && sha256sum ort-gpu.tar.xz > ort-gpu.sha256)
    rm -rf "$DEV/parts" && mkdir -p "$DEV/parts"
    split -b "${part_mib}M" -d -a 2 "$DEV/ort-gpu.tar.xz" "$DEV/parts/part-"
    for p in "$DEV"/parts/part-*; do mkdir "$p.d" && mv "$p" "$p.d/" && mv "$p.d" "$DEV/parts/$(basename "$p")"; done
    cp "$DEV/ort-gpu.sha256" "$DEV/bin/"
    CARGO_TARGET_DIR=target/cuda cargo build --release --locked --features cuda --example cuda_check --bin postflow
    cp target/cuda/release/postflow target/cuda/release/examples/cuda_check "$DEV/bin/"
    strip "$DEV/bin/postflow" "$DEV/bin/cuda_check"
    local parts=("$DEV"/parts/part-*) last
    last=${parts[-1]}
    echo "tree ${tree_mib} MiB; ${#parts[@]} parts of <= ${part_mib} MiB; bin $(du -sh "$DEV/bin" | cut -f1)"
    echo "device calls, back to back (a warm machine keeps what earlier calls carried; idle it goes back after 30 s):"
    for p in "${parts[@]}"; do
        [ "$p" = "$last" ] && break
        echo "  run(command='scripts/device/cuda.sh parts', carry=['$p'])"
    done
    echo "  run(command='scripts/device/cuda.sh measure', carry=['$last', '$DEV/bin'], timeout_s=420)"
}

parts() {
    ls -la "$DEV"/parts/*/ 2>/dev/null || echo "no parts here yet"
}

measure() {
    local out=${OUT:-target/device-out} work=/tmp/postflow-cuda
    mkdir -p "$out" "$work/lib"
    {
        echo "## nvidia-smi"; nvidia-smi 2>&1 || true
        echo "## ldconfig (cudart, cublas, cudnn)"; ldconfig -p 2>/dev/null | grep -E 'cudart|cublas|cudnn' || echo "none"
        echo "## CUDA install folders"; ls -d /usr/local/cuda* /opt/cuda* 2>/dev/null || echo "none"
        echo "## Python packages"; python3 -m pip list 2>/dev/null | grep -i -E 'onnx|torch|nvidia|cuda' || echo "none"
        echo "## disk"; df -h / /tmp 2>&1 || true
        echo "## glibc (the carried binaries need >= 2.35)"; ldd --version 2>&1 | head -1 || true
    } > "$out/inventory.txt" 2>&1
    cat "$DEV"/parts/*/part-* > "$work/ort-gpu.tar.xz"
    (cd "$work" && sha256sum -c "$OLDPWD/$DEV/bin/ort-gpu.sha256") > "$out/assembly.txt" 2>&1 || {
        echo "the carried parts do not reassemble (missing or stale part?)"; ls -la "$DEV"/parts/*/; exit 1; }
    xz -dc "$work/ort-gpu.tar.xz" | tar -C "$work/lib" -xf -
    # the CUDA 13 libraries of the machine's pip packages (nvidia-cublas, -cuda-runtime, -cudnn-cu13, ...)
    local site libs
    site=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null || true)
    libs=$( { [ -n "$site" ] && find "$site" -name 'lib*.so*' -printf '%h\n'; } 2>/dev/null | sort -u | paste -sd: || true)
    export LD_LIBRARY_PATH="$work/lib${libs:+:$libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    { echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; ldd "$work/lib/libonnxruntime_providers_cuda.so"; } > "$out/ldd.txt" 2>&1 || true
    export POSTFLOW_ORT_LIB="$work/lib/libonnxruntime.so.$ORT_GPU_VERSION"
    "$DEV/bin/cuda_check" models/digits --n 1024 --batches 64,256,1024 --repeats 3 > "$out/cuda_check.json" 2> "$out/cuda_check.err" || true
    "$DEV/bin/postflow" eval models/digits --cuda 0 -q > "$out/eval_cuda.txt" 2>&1 || true
    "$DEV/bin/postflow" eval models/digits -q > "$out/eval_cpu.txt" 2>&1 || true
    grep -c "not found" "$out/ldd.txt" | sed 's/^/libraries not found: /'
    cat "$out/cuda_check.json" "$out/cuda_check.err"
}

case "${1:-}" in
    prepare) shift; prepare "$@" ;;
    parts) parts ;;
    measure) measure ;;
    *) sed -n '2,8p' "$0"; exit 2 ;;
esac
