"""Post-training benchmarks on the CPU (issue 25), forward+backward, time and peak memory:

1. ``gx.linear_cross_entropy`` against PyTorch's own chunked ``F.linear_cross_entropy(...,
   options=nn.LinearCrossEntropyOptions())`` (torch >= 2.13), float32 and bfloat16;
2. ``gx.linear_log_probs(entropy=True)`` (per-token advantages and a mask upstream, an entropy bonus)
   against ``gx.linear_cross_entropy`` on the same head;
3. ``gx.linear_distillation_loss`` (a student head, a teacher head twice as wide) against the same loss
   on both materialised logits (``F.linear`` twice, then ``gx.distillation_loss``);
4. the time ratios of 1. and 2. again, the two steps interleaved in one process (a, b, a, b, ...) on
   the same inputs, so that the shared machine's load changing between rows does not skew them;
5. the bfloat16 weight gradient's error against float64 over 32 and 1024 chunks, with ``accum_dtype``
   None (float32 accumulation) and ``torch.bfloat16``, next to PyTorch's own bfloat16 autograd;
6. where the float32 time goes: the chunk loop of ``linear_cross_entropy`` timed piece by piece
   (the logits matmul, the fused kernel, the two gradient matmuls).

    python benchmarks/bench_post_training.py [--n 4096 --hidden 512 --vocab 32768] [--repeats 2]
                                             [--json-out benchmarks/results_post_training_cpu.json]

Memory method (as ``bench_linear_memory.py``): each row runs in a fresh subprocess that warms up on a
tiny problem, creates its inputs, runs one full step (so the ``.grad`` buffers exist, as in
training), resets the peak resident set (``/proc/self/clear_refs``), runs one step and reports
``VmHWM`` minus the resident set before it: every byte the step adds, temporaries included. The
time is the median of ``--repeats`` further steps. The machine is shared: the load average before
and after is in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from gpuxent.bench import peak_rss_kb, write_json

ROWS = {
    # name: (kind, impl, dtype)
    "lce-gpuxent-float32": ("lce", "gpuxent", "float32"),
    "lce-torch-float32": ("lce", "torch", "float32"),
    "lce-gpuxent-bfloat16": ("lce", "gpuxent", "bfloat16"),
    "lce-torch-bfloat16": ("lce", "torch", "bfloat16"),
    "logprobs-gpuxent-float32": ("logprobs", "gpuxent", "float32"),
    "logprobs-gpuxent-bfloat16": ("logprobs", "gpuxent", "bfloat16"),
    "distill-gpuxent-float32": ("distill", "gpuxent", "float32"),
    "distill-materialised-float32": ("distill", "materialised", "float32"),
}


def _setup(row, dtype_name=None):
    """``(inputs, step)`` of a row: ``inputs(n, d, r)`` builds its tensors, ``step(*inputs)`` runs one
    forward+backward. Every row of one dtype draws the same hidden states, weight and targets."""
    import torch
    import torch.nn.functional as F

    import gpuxent as gx

    kind, impl, dtype_name = ROWS[row]
    dtype = getattr(torch, dtype_name)

    def inputs(n, d, r, seed=0):
        g = torch.Generator().manual_seed(seed)
        h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(r, d, generator=g) / d**0.5).to(dtype).requires_grad_()
        t = torch.randint(0, r, (n,), generator=g)
        extra = {"adv": torch.randn(n, generator=g), "mask": (torch.rand(n, generator=g) < 0.9).float()}
        if kind == "distill":
            extra["th"] = torch.randn(n, 2 * d, generator=g).to(dtype)
            extra["tw"] = (torch.randn(r, 2 * d, generator=g) / (2 * d) ** 0.5).to(dtype)
        return h, w, t, extra

    def step(h, w, t, extra):
        if kind == "lce" and impl == "gpuxent":
            loss = gx.linear_cross_entropy(h, w, t)
        elif kind == "lce":
            loss = F.linear_cross_entropy(h, w, t, options=torch.nn.LinearCrossEntropyOptions())
        elif kind == "logprobs":  # GRPO-like: per-token advantages and a mask, an entropy bonus
            lp, ent = gx.linear_log_probs(h, w, t, temperature=0.7, entropy=True)
            m = extra["mask"]
            loss = -(lp * extra["adv"] * m).sum() / m.sum() - 0.01 * (ent * m).sum() / m.sum()
        elif impl == "gpuxent":
            loss = gx.linear_distillation_loss(h, w, extra["th"], extra["tw"], temperature=2.0)
        else:
            student = F.linear(h, w)
            with torch.no_grad():
                teacher = F.linear(extra["th"], extra["tw"])
            loss = gx.distillation_loss(student, teacher, temperature=2.0)
        loss.backward()
        return loss

    return inputs, step


def _worker(args) -> dict:
    """One row in this (fresh) process: its peak memory, then its time."""
    import torch

    kind, impl, dtype_name = ROWS[args.row]
    inputs, step = _setup(args.row)
    step(*inputs(64, 32, 1000))  # numba compiles its kernels here
    h, w, t, extra = inputs(args.n, args.hidden, args.vocab)
    step(h, w, t, extra)  # the .grad buffers now exist, as in training
    loss, base_kb, peak_kb, exact = peak_rss_kb(lambda: step(h, w, t, extra))
    times = []
    for _ in range(args.repeats):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        step(h, w, t, extra)
        times.append(time.perf_counter() - t0)
    return {
        "row": args.row, "kind": kind, "impl": impl, "dtype": dtype_name,
        "peak_mib": (peak_kb - base_kb) / 1024,
        "memory_method": "VmHWM after clear_refs" if exact else "ru_maxrss (upper bound)",
        "median_s": statistics.median(times), "times_s": times, "loss": float(loss),
        "threads": torch.get_num_threads(),
    }  # fmt: skip


def _pair_worker(args) -> dict:
    """The time ratio of two rows on the same inputs, their steps interleaved (a, b, a, b, ...), so that a
    change of the shared machine's load between them does not skew it: the median of the per-round
    ratios, and each row's median time."""
    a, b = args.pair.split(",")
    (inputs, step_a), (_, step_b) = _setup(a), _setup(b)
    for s in (step_a, step_b):
        s(*inputs(64, 32, 1000))
    h, w, t, extra = inputs(args.n, args.hidden, args.vocab)
    step_a(h, w, t, extra)
    step_b(h, w, t, extra)
    times = {a: [], b: []}
    for _ in range(args.repeats + 1):
        for name, s in ((a, step_a), (b, step_b)):
            h.grad = w.grad = None
            t0 = time.perf_counter()
            s(h, w, t, extra)
            times[name].append(time.perf_counter() - t0)
    ratios = [x / y for x, y in zip(times[a], times[b])]
    return {"pair": [a, b], "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
            "ratio_median": statistics.median(ratios), "ratios": ratios}  # fmt: skip


PAIRS = (
    ("lce-gpuxent-float32", "lce-torch-float32"),
    ("lce-gpuxent-bfloat16", "lce-torch-bfloat16"),
    ("logprobs-gpuxent-float32", "lce-gpuxent-float32"),
    ("logprobs-gpuxent-bfloat16", "lce-gpuxent-bfloat16"),
)


# --------------------------------------------------------------------------- in-process measurements


def accumulation_errors(n=8192, d=64, r=512, chunk_counts=(32, 1024), seed=0) -> list[dict]:
    """The bf16 weight gradient's error against float64 (relative: max |g - g64| / max |g64|, and the
    Frobenius norm of the difference over that of g64), per accumulation, next to torch's bf16 autograd
    (one (N, r) logits, no chunks) and torch's chunked F.linear_cross_entropy at the same chunk sizes."""
    import torch
    import torch.nn.functional as F

    import gpuxent as gx

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).bfloat16()
    w0 = (torch.randn(r, d, generator=g, dtype=torch.float64) / d**0.5).bfloat16()
    t = torch.randint(0, r, (n,), generator=g)
    w64 = w0.double().requires_grad_()
    F.cross_entropy(F.linear(h.double(), w64), t).backward()
    ref = w64.grad

    def err(gw):
        diff = gw.double() - ref
        return {"max_rel": float(diff.abs().max() / ref.abs().max()), "fro_rel": float(diff.norm() / ref.norm())}

    def grad(fn):
        w = w0.clone().requires_grad_()
        fn(w).backward()
        return w.grad

    rows = [{"impl": "torch bf16 autograd (F.linear + F.cross_entropy)", "chunks": 1,
             **err(grad(lambda w: F.cross_entropy(F.linear(h, w), t)))}]  # fmt: skip
    for chunks in chunk_counts:
        cs = n // chunks
        for accum in (None, torch.bfloat16):
            gw = grad(lambda w, a=accum, c=cs: gx.linear_cross_entropy(h, w, t, chunk_size=c, accum_dtype=a))
            rows.append({"impl": f"gpuxent accum_dtype={'None (float32)' if accum is None else 'bfloat16'}",
                         "chunks": chunks, **err(gw)})  # fmt: skip
        if hasattr(F, "linear_cross_entropy"):
            opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=cs, chunking_method=None)
            gw = grad(lambda w, o=opts: F.linear_cross_entropy(h, w, t, options=o))
            rows.append({"impl": "torch F.linear_cross_entropy, LinearCrossEntropyOptions(batch_chunk_size=N/chunks)",
                         "chunks": chunks, **err(gw)})  # fmt: skip
    return rows


def chunk_loop_profile(n, d, r, chunk_sizes=(None, 1024, 64)) -> list[dict]:
    """``linear_cross_entropy``'s float32 chunk loop, piece by piece (seconds over the whole batch)."""
    import torch

    from gpuxent.autograd import cross_entropy_rows_
    from gpuxent.linear import default_chunk_size

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g)
    w = torch.randn(r, d, generator=g) / d**0.5
    t = torch.randint(0, r, (n,), generator=g)
    scale = torch.tensor([1.0 / n])
    cross_entropy_rows_(torch.randn(4, r), t[:4], None, scale, -100, 0.0, 0.0, 0.0, "numba_cpu")  # compiled
    out = []
    for cs in chunk_sizes:
        rows = cs or default_chunk_size(r, torch.float32, d)
        buf = torch.empty(rows, r)
        gh = torch.empty(n, d)
        acc = torch.zeros(r, d)
        parts = dict.fromkeys(("logits matmul", "fused kernel", "grad_hidden matmul", "grad_weight matmul"), 0.0)
        keys = list(parts)
        t_all = time.perf_counter()
        for lo in range(0, n, rows):
            hc, b = h[lo : lo + rows], buf[: min(rows, n - lo)]
            ts = [time.perf_counter()]
            torch.mm(hc, w.t(), out=b)
            ts.append(time.perf_counter())
            cross_entropy_rows_(b, t[lo : lo + rows], None, scale, -100, 0.0, 0.0, 0.0, "numba_cpu")
            ts.append(time.perf_counter())
            torch.mm(b, w, out=gh[lo : lo + rows])
            ts.append(time.perf_counter())
            acc.addmm_(b.t(), hc)
            ts.append(time.perf_counter())
            for k, a, z in zip(keys, ts, ts[1:]):
                parts[k] += z - a
        total = time.perf_counter() - t_all
        flop = 2 * n * r * d
        out.append({
            "chunk_rows": rows, "default": cs is None, "total_s": total, **{f"{k}_s": v for k, v in parts.items()},
            "gflops_per_matmul": {k: flop / parts[k] / 1e9 for k in keys if "matmul" in k},
        })  # fmt: skip
    return out


def _load():
    try:
        return os.getloadavg()
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=4096, help="rows (tokens)")
    p.add_argument("--hidden", type=int, default=512, help="d, the (student's) hidden width")
    p.add_argument("--vocab", type=int, default=32768, help="r, the number of classes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run (default: all)")
    p.add_argument("--no-accum", action="store_true", help="skip the accumulation-error measurement")
    p.add_argument("--no-profile", action="store_true", help="skip the chunk-loop profile")
    p.add_argument("--json-out", default=None)
    p.add_argument("--no-pairs", action="store_true", help="skip the interleaved time ratios")
    p.add_argument("--row", choices=list(ROWS), help=argparse.SUPPRESS)  # set in the worker subprocesses
    p.add_argument("--pair", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.row:
        print(json.dumps(_worker(args)))
        return
    if args.pair:
        print(json.dumps(_pair_worker(args)))
        return

    import torch

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": _load(),
        "sizes": {"n": args.n, "hidden": args.hidden, "vocab": args.vocab, "teacher_hidden": 2 * args.hidden},
        "logits_mib": {"float32": 4 * args.n * args.vocab / 2**20, "bfloat16": 2 * args.n * args.vocab / 2**20},
        "rows": [],
    }  # fmt: skip

    def sub(*extra_args):
        cmd = [sys.executable, os.path.abspath(__file__), *extra_args]
        for flag in ("n", "hidden", "vocab", "repeats"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"{extra_args}: failed\n{res.stderr[-2000:]}", file=sys.stderr)
            return {"error": res.stderr[-500:]}
        return json.loads(res.stdout.strip().splitlines()[-1])

    for row in [r for r in args.rows.split(",") if r]:
        out = sub("--row", row)
        result["rows"].append({"row": row, **out})
        if "error" not in out:
            print(f"{row:32s} {out['median_s']:8.2f} s  peak {out['peak_mib']:8.1f} MiB", flush=True)
    by = {r["row"]: r for r in result["rows"] if "error" not in r}
    result["pairs"] = []
    if not args.no_pairs:
        for a, b in PAIRS:
            out = sub("--pair", f"{a},{b}")
            result["pairs"].append(out)
            if "error" not in out:
                print(f"time {a} / {b}: {out['ratio_median']:.3f}x (interleaved; medians "
                      f"{out['median_s'][a]:.2f} / {out['median_s'][b]:.2f} s)", flush=True)  # fmt: skip

    def ratio(a, b, key):
        return by[a][key] / by[b][key] if a in by and b in by and by[b][key] else None

    result["ratios"] = {  # times from the separate processes of the rows; see the interleaved ones below
        "lce float32 time vs torch": ratio("lce-gpuxent-float32", "lce-torch-float32", "median_s"),
        "lce float32 memory vs torch": ratio("lce-gpuxent-float32", "lce-torch-float32", "peak_mib"),
        "lce bfloat16 time vs torch": ratio("lce-gpuxent-bfloat16", "lce-torch-bfloat16", "median_s"),
        "lce bfloat16 memory vs torch": ratio("lce-gpuxent-bfloat16", "lce-torch-bfloat16", "peak_mib"),
        "logprobs+entropy float32 time vs lce": ratio("logprobs-gpuxent-float32", "lce-gpuxent-float32", "median_s"),
        "logprobs+entropy bfloat16 time vs lce": ratio("logprobs-gpuxent-bfloat16", "lce-gpuxent-bfloat16",
                                                       "median_s"),
        "distill memory vs materialised": ratio("distill-gpuxent-float32", "distill-materialised-float32", "peak_mib"),
        "distill time vs materialised": ratio("distill-gpuxent-float32", "distill-materialised-float32", "median_s"),
    }  # fmt: skip
    for out in result["pairs"]:  # the interleaved ratio, where measured, is the one to quote
        if "error" not in out:
            a, b = out["pair"]
            result["ratios"][f"time {a} / {b} (interleaved)"] = out["ratio_median"]
    for dt in ("float32", "bfloat16"):
        if f"logprobs-gpuxent-{dt}" in by:
            lp = by[f"logprobs-gpuxent-{dt}"]
            result["ratios"][f"logprobs+entropy {dt} peak vs logits"] = lp["peak_mib"] / result["logits_mib"][dt]
    for k, v in result["ratios"].items():
        if v is not None:
            print(f"{k:45s} {v:6.3f}x")
    if not args.no_accum:
        result["accumulation"] = accumulation_errors()
        for r in result["accumulation"]:
            print(f"{r['impl']:75s} {r['chunks']:5d} chunks  max rel {r['max_rel']:.3e}  fro rel {r['fro_rel']:.3e}")
    if not args.no_profile:
        result["chunk_loop_profile"] = chunk_loop_profile(args.n, args.hidden, args.vocab)
        for r in result["chunk_loop_profile"]:
            parts = {k: round(v, 3) for k, v in r.items() if k.endswith("_s")}
            print(f"chunk {r['chunk_rows']:5d} rows: {parts}")
    result["load_after"] = _load()
    if args.json_out:
        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
