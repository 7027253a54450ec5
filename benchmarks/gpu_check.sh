#!/usr/bin/env bash
# GPU check, for whoever has an NVIDIA GPU and TensorRT (or TensorRT-RTX) installed:
# builds the engines of the shipped packages (FP32 package -> fp16 engine, INT8 package -> int8),
# compares TensorRT outputs with ONNX Runtime's on the same inputs (max abs diff per output, at
# every text bucket) and times both alternately in one run (median ms per graph).
#
#   benchmarks/gpu_check.sh                          # models/fiber-nano and models/fiber-nano-int8
#   benchmarks/gpu_check.sh path/to/pkg [more pkgs]  # other packages
#   BACKEND=tensorrt-rtx ITERS=200 benchmarks/gpu_check.sh
#   FIBER_B=1 ITERS=10 benchmarks/gpu_check.sh [pkgs] # FIBER-B (252 M, DyHead) at 512x672 and 800x1344 (+ pkgs):
#                                                    #   random release -> convert -> export (benchmarks.fiber_b
#                                                    #   packages, kept in runs/fiber-b), engines built and timed
#
# Environment: PY (python, default .venv/bin/python or python3), BACKEND (auto|tensorrt|tensorrt-rtx),
# PRECISION (auto|int8|fp16|fp32), ITERS (default 50), OUT (default runs/gpu_check).
# Results: printed, and in $OUT/gpu_check.json. Exit status 2 with one message on a problem.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
BACKEND=${BACKEND:-auto}
PRECISION=${PRECISION:-auto}
ITERS=${ITERS:-50}
OUT=${OUT:-runs/gpu_check}
FIBER_B=${FIBER_B:-0}
FIBER_B_CANVAS=${FIBER_B_CANVAS:-512x672,800x1344}

packages=("$@")
if [ "$FIBER_B" = 1 ]; then
    # FIBER-B packages from a random-valued official release (weights meaningless; shapes, ops and
    # timings are FIBER-B's). Each step is skipped when its output exists.
    while IFS= read -r p; do packages+=("$p"); done < <("$PY" -m benchmarks.fiber_b packages \
        --folder runs/fiber-b --canvas "$FIBER_B_CANVAS") || { echo "gpu_check: FIBER-B packages failed" >&2; exit 2; }
fi
if [ ${#packages[@]} -eq 0 ]; then
    for p in models/fiber-nano models/fiber-nano-int8; do
        [ -f "$p/manifest.json" ] && packages+=("$p")
    done
fi
if [ ${#packages[@]} -eq 0 ]; then
    echo "gpu_check: no packages (models/fiber-nano*/manifest.json missing); pass package folders" >&2
    exit 2
fi

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader || true
"$PY" - <<'PYEOF' || exit 2
import sys
import engines.cuda as c
try:
    i = c.device_info()
except c.CudaError as e:
    sys.exit(f"gpu_check: no usable CUDA GPU: {e}")
print(f"GPU: {i.name}, compute capability {i.sm}, {i.total_memory / 2**30:.1f} GiB")
PYEOF

args=()
for p in "${packages[@]}"; do args+=(--package "$p"); done
exec "$PY" -m engines.gpu_check "${args[@]}" --backend "$BACKEND" --precision "$PRECISION" \
    --iters "$ITERS" --out "$OUT"
