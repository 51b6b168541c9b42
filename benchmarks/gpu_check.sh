#!/usr/bin/env bash
# GPU check: the whole test suite on CUDA tensors, then the GPU benchmark. Runs on the GPU machine
# from the repository root (no network: torch, triton, numba and numba-cuda are preinstalled).
#
#     bash benchmarks/gpu_check.sh        # writes $OUT/gpu_check.log and $OUT/bench.json
#
# Time limits keep the whole run under 8 minutes: tests 240 s, benchmark 220 s (and the benchmark
# starts no new size after 170 s). The benchmark runs even when a test fails; the exit status is
# the first failure's.
set -euo pipefail

OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_check.log"

# The repository is used in place; the interpreters must be off so that every backend runs on CUDA.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET NUMBA_ENABLE_CUDASIM

check() {
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD"
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv,noheader ||
        echo "nvidia-smi failed"
    python - <<'PY'
import platform

import torch
import triton

print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})  triton {triton.__version__}")
print(f"cuda available: {torch.cuda.is_available()}  device: {torch.cuda.get_device_name() if torch.cuda.is_available() else '-'}")
from gpuxent import backends

for name, (ok, why) in backends.status().items():
    print(f"backend {name:11s} {'yes' if ok else 'no '}  {why}")
PY

    local status=0 bench_status=0
    echo "== tests"
    # The GPU backends' share of the suite (numba_cpu, the trainer, gloo and the notebooks run in CI
    # on every push); 8 workers compile Triton's kernel variants in parallel on the 16 cores.
    timeout 240 python -m pytest -q -p no:cacheprovider -ra -n 8 -k "triton or numba_cuda" tests || status=$?
    echo "== tests exit status: $status"

    echo "== benchmark"
    timeout 220 python benchmarks/bench_gpu.py --budget-s 170 --json-out "$OUT_DIR/bench.json" || bench_status=$?
    echo "== benchmark exit status: $bench_status"

    if [ "$status" -eq 0 ]; then
        status=$bench_status
    fi
    echo "== gpu_check done $(date -u +%Y-%m-%dT%H:%M:%SZ), status $status"
    return "$status"
}

check 2>&1 | tee "$LOG"
