#!/usr/bin/env bash
# GPU check, sized to scarce GPU time: ONE call of at most ~10 minutes on an H100/H200, run from the
# repository root (no network there: torch, triton, numba and numba-cuda are preinstalled).
#
#     bash benchmarks/gpu_check.sh              # results under $OUT (default ./gpu_check_out)
#     bash benchmarks/gpu_check.sh --dry-run    # the same steps on the CPU interpreters, tiny sizes
#     GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh                     (CI: tests/test_gpu_check.py)
#
# Steps, in this order, each under its own time limit and all within GPU_CHECK_BUDGET_S (570 s):
#   tests  the GPU backends' share of the suite (triton, numba_cuda) on CUDA tensors   GPU_CHECK_TESTS_S=180
#   bench  benchmarks/bench_gpu.py: gpuxent against PyTorch (and Liger), GB/s, % copy;  GPU_CHECK_BENCH_S=160
#          GPT-2's odd r = 50257 next to the padded 50304
#   sweep  BLOCK x num_warps of the large-r Triton kernel; an aligned and an odd r     GPU_CHECK_SWEEP_S=60
#   extra  further GPU runs in extra_runs below, most wanted first: overhead (the host  what is left
#          cost at small sizes, bench_overhead on cuda), vocab (row_partials and
#          cross_entropy_backward against the fused kernel, r = 131072, 50304, 50257),
#          stats, distill, hf, and with two GPUs nccl and dist
# then $OUT/summary.md, printed at the end to paste into benchmarks/RESULTS.md: card, driver,
# versions, date, each step's status, and every benchmark row with GB/s and % of a device-to-device
# copy measured in the same run. A step that fails or runs out of time does not stop the next one;
# the exit status is the first failure's.
set -uo pipefail

DRY_RUN="${GPU_CHECK_DRY_RUN:-0}"
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
OUT_DIR="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
BUDGET_S="${GPU_CHECK_BUDGET_S:-570}"
SUMMARY_RESERVE_S=15
START_S=$(date +%s)
STEPS="$OUT_DIR/steps.tsv"
: >"$STEPS"

# The repository is used in place. On the GPU the interpreters must be off, so that every backend
# runs on CUDA; the dry run needs them on, set before Python starts.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DRY_RUN OUT_DIR
if [ "$DRY_RUN" = 1 ]; then
    export TRITON_INTERPRET=1 NUMBA_ENABLE_CUDASIM=1
else
    unset TRITON_INTERPRET NUMBA_ENABLE_CUDASIM
fi

# step NAME LIMIT_S COMMAND...: runs COMMAND (a program or an exported function) under the smaller
# of LIMIT_S and the time left, its output to the console and $OUT_DIR/NAME.log, its status and
# seconds to $STEPS. timeout ends the whole process group (pytest's workers too).
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET_S - SUMMARY_RESERVE_S - ($(date +%s) - START_S)))
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left} s of the budget left"
        printf '%s\tskipped (budget)\t0\n' "$name" >>"$STEPS"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    rc=${PIPESTATUS[0]}
    local outcome="ok"
    [ "$rc" -ne 0 ] && outcome="exit $rc"
    [ "$rc" -eq 124 ] && outcome="timed out after ${limit} s"
    echo "== $name: $outcome"
    printf '%s\t%s\t%s\n' "$name" "$outcome" "$(($(date +%s) - t0))" >>"$STEPS"
    [ "$rc" -ne 0 ] && [ "$FIRST_FAILURE" -eq 0 ] && FIRST_FAILURE=$rc
    return 0
}
FIRST_FAILURE=0

machine() {
    echo "== gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) in $PWD$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN)')"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null |
        sed 's/^/card: /' || echo "card: none (nvidia-smi: not found or failed)"
    python - <<'PY'
import platform

import torch
import triton

from gpuxent import backends

versions = [f"python {platform.python_version()}", f"torch {torch.__version__} (CUDA {torch.version.cuda})",
            f"triton {triton.__version__}"]
for mod in ("numba", "numba_cuda", "liger_kernel"):
    try:
        versions.append(f"{mod} {getattr(__import__(mod), '__version__', '?')}")
    except Exception:
        pass
print("versions: " + ", ".join(versions))
print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'}")
for name, (ok, why) in backends.status().items():
    print(f"backend {name:11s} {'yes' if ok else 'no '}  {why}")
PY
}

tests() {
    if [ "$DRY_RUN" = 1 ]; then  # a few interpreter tests: the full share takes an hour on a CPU
        python -m pytest -q -p no:cacheprovider -ra -k "launch_config or row_layout" tests/test_triton.py \
            tests/test_numba_cuda.py
    else  # numba_cpu, the trainer, gloo and the notebooks run in CI on every push
        local workers=()
        python -c "import xdist" 2>/dev/null && workers=(-n 8)
        python -m pytest -q -p no:cacheprovider -ra "${workers[@]}" -k "triton or numba_cuda" tests
    fi
}

bench() {  # 50304 and GPT-2's odd 50257 next to each other, early: the budget may cut the last sizes
    local args=(--sizes 16384x131072,16384x50304,16384x50257,16384x32768,65536x128,8192x262144
        --dtypes bfloat16,float32 --budget-s $((${GPU_CHECK_BENCH_S:-160} - 40)))
    [ "$DRY_RUN" = 1 ] && args=(--dry-run --sizes 4x64,4x61 --dtypes float32 --budget-s 30)
    python benchmarks/bench_gpu.py "${args[@]}" --json-out "$OUT_DIR/bench.json" --markdown-out "$OUT_DIR/bench.md"
}

sweep() {  # 16384 x 131072: the size of the byte-model predictions; 50304 against GPT-2's odd 50257
    local args=(--sizes 16384x131072,16384x50304,16384x50257 --blocks 4096,8192,2048,16384 --warps 16,8,32,4
        --budget-s $((${GPU_CHECK_SWEEP_S:-60} - 15)))
    [ "$DRY_RUN" = 1 ] && args=(--dry-run --sizes 4x64,4x61 --blocks 16,32 --warps 1,2 --budget-s 20)
    python benchmarks/bench_gpu.py --sweep --dtypes bfloat16 "${args[@]}" \
        --json-out "$OUT_DIR/sweep.json" --markdown-out "$OUT_DIR/sweep.md"
}

vocab() {  # the vocab-parallel kernels of one rank on one GPU, against the fused kernel of the same backend
    python - <<'PY'
import json
import math
import os
import sys

import torch

from gpuxent import backends
from gpuxent.bench import bytes_moved

sys.path.insert(0, "benchmarks")
from bench_gpu import median_ms  # noqa: E402 - the benchmark table's timer: do_bench, or one call in the dry run

dry = os.environ.get("DRY_RUN") == "1"
out_dir = os.environ["OUT_DIR"]
device = "cpu" if dry else "cuda"  # the dry run: the interpreters on CPU tensors, wall clock
sizes = [(4, 64), (4, 61)] if dry else [(16384, 131072), (16384, 50304), (16384, 50257)]
dtype = torch.float32 if dry else torch.bfloat16

rows = []
for name in ("triton", "numba_cuda"):
    ok, why = backends.status()[name]
    if not ok:
        print(f"{name}: not run ({why})")
        continue
    be = backends.get(name)
    for n, r in sizes:
        x = torch.randn(n, r, device=device, dtype=dtype)
        t = torch.randint(0, r, (n,), device=device)
        g = torch.empty_like(x)
        acc = torch.float32
        out = torch.empty(n, 5, device=device, dtype=acc)
        per_row = torch.full((n,), 1.0 / n, device=device, dtype=acc)
        lse = torch.full((n,), math.log(r), device=device, dtype=acc)
        ce = {"ignore_index": -100, "label_smoothing": 0.0, "softcap": None}

        def fused():
            be.cross_entropy(x, t, None, z_loss=0.0, grad_scale=per_row[:1], grad=g, **ce)

        def partials():
            be.row_partials(x, t, None, ignore_index=-100, softcap=None, class_offset=0, smoothing=False, out=out)

        def backward():
            be.cross_entropy_backward(
                x, t, None, lse, per_row, None, n_classes=r, class_offset=0, grad_scale=per_row,
                entropy_scale=None, grad=g, **ce,
            )

        def step():
            partials()
            backward()

        elt = x.element_size()
        for kernel, fn, nbytes in (
            ("cross_entropy (fused)", fused, bytes_moved(n, r, elt, "fwd+bwd")),
            ("row_partials", partials, bytes_moved(n, r, elt, "fwd")),
            ("cross_entropy_backward", backward, bytes_moved(n, r, elt, "fwd+bwd")),
            ("row_partials + cross_entropy_backward", step, bytes_moved(n, r, elt, "fwd+bwd")),
        ):
            ms = median_ms(fn)
            rows.append({"backend": name, "n_rows": n, "n_classes": r, "dtype": str(dtype).split(".")[-1],
                         "kernel": kernel, "ms": ms, "gbps": nbytes / ms / 1e6})
            print(json.dumps(rows[-1]), flush=True)
        del x, g
with open(os.path.join(out_dir, "vocab.json"), "w") as f:
    json.dump({"device": torch.cuda.get_device_name() if not dry else "DRY RUN (CPU interpreters)", "rows": rows}, f)
lines = ["| backend | N x r | dtype | kernel | ms | GB/s |", "|---|---|---|---|---:|---:|"]
lines += [f"| {w['backend']} | {w['n_rows']} x {w['n_classes']} | {w['dtype']} | {w['kernel']} | {w['ms']:.3f} "
          f"| {w['gbps']:.0f} |" for w in rows]
with open(os.path.join(out_dir, "vocab.md"), "w") as f:
    f.write("GB/s: the project's byte model (gpuxent.bench.bytes_moved): row_partials reads the logits once, "
            "the gradient pass and the fused kernel read them once and write the gradient once.\n\n")
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
}
export -f tests bench sweep vocab

# --------------------------------------------------------------------------- other GPU runs
# Append further GPU runs here, one `step NAME LIMIT_S COMMAND...` each: they share what is left of
# the budget after the steps above (about 155 s by default: overhead, vocab and stats fit, distill gets
# what remains, hf runs only where the first steps end early; raise GPU_CHECK_BUDGET_S only if the
# device grant allows), log to $OUT_DIR/NAME.log, and should honour $DRY_RUN (tiny and on the CPU).
# A shell function as COMMAND must be exported first (export -f), as tests, bench, sweep and vocab are.
extra_runs() {
    # The fixed cost of a call at small sizes (64 x 2 ... 4096 x 1000): the Triton path against
    # F.cross_entropy eager, synchronised, so its time on an idle GPU is the host side plus the launch.
    if [ "$DRY_RUN" = 1 ]; then
        step overhead "${GPU_CHECK_OVERHEAD_S:-60}" bash -c 'python benchmarks/bench_overhead.py --triton-host --calls 20 | tee "$OUT_DIR/overhead.md"'
    else
        step overhead "${GPU_CHECK_OVERHEAD_S:-45}" bash -c 'python benchmarks/bench_overhead.py --device cuda --triton-host | tee "$OUT_DIR/overhead.md"'
    fi
    # The vocab-parallel kernels of one rank (row_partials, then cross_entropy_backward from the global
    # lse) against the fused kernel, bfloat16, r = 131072, 50304 and GPT-2's odd 50257, on one GPU.
    step vocab "${GPU_CHECK_VOCAB_S:-40}" vocab
    # Statistics and distillation: cross_entropy_with_stats (plain, with statistics, with
    # the entropy's gradient) and gx.distillation_loss (kl, reverse_kl, jsd) at one LLM size each,
    # against the PyTorch compositions, with the peak memory of a step.
    local one=(--sizes 8192x131072 --dtypes bfloat16 --no-compile --budget-s 25)
    [ "$DRY_RUN" = 1 ] && one=(--dry-run --sizes 4x64 --dtypes float32 --no-compile --budget-s 20)
    step stats "${GPU_CHECK_STATS_S:-40}" python benchmarks/bench_gpu.py --stats "${one[@]}" \
        --json-out "$OUT_DIR/stats.json" --markdown-out "$OUT_DIR/stats.md"
    step distill "${GPU_CHECK_DISTILL_S:-40}" python benchmarks/bench_gpu.py --distillation "${one[@]}" \
        --json-out "$OUT_DIR/distill.json" --markdown-out "$OUT_DIR/distill.md"
    # Hugging Face: a Llama-shaped model at GPU sizes (hidden 2048, vocabulary 128256,
    # 8 x 2048 tokens, bfloat16), one training step patched against unpatched: peak memory and time.
    if [ "$DRY_RUN" = 1 ]; then  # the patched model only: tests/test_transformers.py runs the whole example
        step hf "${GPU_CHECK_HF_S:-120}" python examples/hf_tiny_llama.py --hidden=32 --layers=1 --vocab=300 --batch=2 --seq=16 \
            --warmup=1 --steps=1 --variant=gpuxent
    else
        step hf "${GPU_CHECK_HF_S:-150}" python examples/hf_tiny_llama.py --device cuda --json
    fi
    # Data-parallel training over nccl, on a machine with two GPUs or more; then the
    # vocab-parallel benchmark over nccl, one process per GPU (2, and all of them when more), against
    # the Megatron-style reference and one GPU's gx.cross_entropy, with the linear cases.
    local n_gpus
    n_gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$DRY_RUN" != 1 ] && [ "${n_gpus:-0}" -ge 2 ]; then
        step nccl 90 torchrun --standalone --nproc-per-node "$n_gpus" -m gpuxent train --dataset digits --json
        local worlds=2
        [ "$n_gpus" -gt 2 ] && worlds="2,$n_gpus"
        step dist "${GPU_CHECK_DIST_S:-150}" python benchmarks/bench_distributed.py --backend nccl --worlds "$worlds" \
            --size 16384x131072 --linear 16384x4096x131072 --repeats 5 --json-out "$OUT_DIR/dist.json" \
            --markdown-out "$OUT_DIR/dist.md"
    fi
}

summary() {
    {
        echo "### GPU check, $(date -u +%Y-%m-%d)$([ "$DRY_RUN" = 1 ] && echo ' (DRY RUN on the CPU interpreters: not GPU timings)')"
        echo
        echo '```'
        grep -E '^(card|versions|device|backend)' "$OUT_DIR/machine.log"
        echo '```'
        echo
        echo "| step | outcome | seconds |"
        echo "|---|---|---:|"
        awk -F'\t' '{printf "| %s | %s | %s |\n", $1, $2, $3}' "$STEPS"
        echo
        tail -n 1 "$OUT_DIR/tests.log" 2>/dev/null | sed 's/^/tests: /'
        for table in bench sweep overhead vocab stats distill dist; do
            if [ -f "$OUT_DIR/$table.md" ]; then
                echo
                echo "#### $table"
                echo
                cat "$OUT_DIR/$table.md"
            fi
        done
    } >"$OUT_DIR/summary.md"
    echo
    echo "== summary (paste into benchmarks/RESULTS.md; also $OUT_DIR/summary.md)"
    cat "$OUT_DIR/summary.md"
}

main() {
    machine 2>&1 | tee "$OUT_DIR/machine.log"
    step tests "${GPU_CHECK_TESTS_S:-180}" tests
    step bench "${GPU_CHECK_BENCH_S:-160}" bench
    step sweep "${GPU_CHECK_SWEEP_S:-60}" sweep
    extra_runs
    summary
    echo "== gpu_check done $(date -u +%Y-%m-%dT%H:%M:%SZ), $(($(date +%s) - START_S)) s, status $FIRST_FAILURE"
    return "$FIRST_FAILURE"
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
