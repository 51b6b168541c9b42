"""benchmarks/gpu_check.sh in its dry run: the same steps as on the GPU machine (the GPU tests, the
benchmark table with an aligned and an odd row length, the BLOCK x num_warps sweep, the host overhead,
the vocab-parallel kernels, statistics, distillation, Hugging Face, the summary), on the CPU
interpreters with tiny sizes, so that the one call a GPU grants does not fail on a script error."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("tests", "bench", "sweep", "overhead", "vocab", "stats", "distill", "hf")  # on a machine of one GPU


def gpu_check(out: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env={**os.environ, "OUT": str(out), **env},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path):
    proc = gpu_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [(name, outcome) for name, outcome, _ in steps] == [(name, "ok") for name in STEPS]
    assert "passed" in (tmp_path / "tests.log").read_text()

    bench = json.loads((tmp_path / "bench.json").read_text())
    assert "DRY RUN" in bench["device"] and bench["copy_gbps"] > 0
    rows = {(r["impl"], r["pass"], r["n_classes"]): r for r in bench["rows"]}
    for impl in ("gpuxent-triton", "gpuxent-triton-api", "gpuxent-numba_cuda", "gpuxent-numba_cuda-api", "torch-eager"):
        for pass_ in ("fwd", "fwd+bwd"):
            for r in (64, 61):  # an aligned and an odd row length, next to each other (GPU: 50304 and 50257)
                row = rows[(impl, pass_, r)]
                assert row["ms"] > 0 and row["pct_copy"] >= 0
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    configs = {r["impl"] for r in sweep["rows"] if (r["n_rows"], r["n_classes"]) == (4, 64)}
    assert configs == {"gpuxent-triton"} | {f"triton BLOCK={b} warps={w}" for b in (16, 32) for w in (1, 2)}
    assert {(r["n_classes"], r["impl"]) for r in sweep["rows"] if r["n_classes"] == 61} == {(61, "gpuxent-triton")}

    vocab = json.loads((tmp_path / "vocab.json").read_text())
    kernels = {(r["backend"], r["n_classes"], r["kernel"]) for r in vocab["rows"] if r["ms"] > 0 and r["gbps"] > 0}
    for backend in ("triton", "numba_cuda"):
        for r in (64, 61):
            for kernel in ("cross_entropy (fused)", "row_partials", "cross_entropy_backward"):
                assert (backend, r, kernel) in kernels
    assert (tmp_path / "overhead.md").read_text().strip()  # the host cost at small sizes (cuda on the GPU)

    summary = (tmp_path / "summary.md").read_text()
    assert summary in proc.stdout  # printed, to paste into RESULTS.md
    assert "DRY RUN" in summary and "versions: python" in summary and "| tests | ok |" in summary
    assert "| 4 x 64 | float32 | fwd+bwd | gpuxent-triton |" in summary and "triton BLOCK=32 warps=2" in summary
    assert "| 4 x 61 | float32 | fwd+bwd | gpuxent-triton |" in summary and "#### vocab" in summary
    assert "| triton | 4 x 61 | float32 | row_partials + cross_entropy_backward |" in summary


def test_a_step_out_of_time_sets_the_exit_status_and_the_rest_still_run(tmp_path):
    limits = dict(
        GPU_CHECK_TESTS_S="1",
        GPU_CHECK_BENCH_S="1",
        GPU_CHECK_SWEEP_S="1",
        GPU_CHECK_OVERHEAD_S="1",
        GPU_CHECK_VOCAB_S="1",
        GPU_CHECK_HF_S="1",
        GPU_CHECK_STATS_S="1",
        GPU_CHECK_DISTILL_S="1",
    )
    proc = gpu_check(tmp_path, **limits)
    assert proc.returncode == 124, proc.stdout[-3000:]
    steps = [line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert steps == [[name, "timed out after 1 s"] for name in STEPS]
    assert "| tests | timed out after 1 s |" in (tmp_path / "summary.md").read_text()


def test_steps_past_the_budget_are_skipped(tmp_path):
    proc = gpu_check(tmp_path, GPU_CHECK_BUDGET_S="10")
    assert proc.returncode == 0, proc.stdout[-3000:]
    steps = [line.split("\t")[:2] for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert steps == [[name, "skipped (budget)"] for name in STEPS]
