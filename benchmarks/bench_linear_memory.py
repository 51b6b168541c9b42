"""Peak memory and time of a language-model head's loss, forward+backward, on the CPU:
``gpuxent.linear_cross_entropy`` (chunked, the (N, r) logits never exist) against PyTorch's
``F.linear`` + ``F.cross_entropy``.

    python benchmarks/bench_linear_memory.py [--n 8192 --hidden 1024 --vocab 65536] [--json-out FILE]

Method, per implementation, in a fresh subprocess (so that neither sees the other's allocator
state or numba's compile-time memory):

1. import, warm up on a tiny problem (numba compiles its kernel here), create the inputs
   (hidden (N, d), weight (r, d), bias (r,), targets), then run forward+backward once at full size
   so the gradient buffers (``.grad``) exist, as in a training loop;
2. reset the process's peak resident set (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM``) and
   read the baseline ``VmRSS``;
3. forward+backward once; the peak is ``VmHWM - baseline``: every byte the step adds on top of the
   inputs and their gradient buffers, including temporary buffers freed before it ends (the
   kernel's exact high-water mark, not a sampled one). Where ``clear_refs`` cannot be written the
   fallback is ``ru_maxrss - baseline`` of ``getrusage``, which can only over-count (the warm-up's
   peak is included), and the JSON says so;
4. the median time of ``--repeats`` more forward+backward steps.

Work: 3 matmuls of 2*N*r*d FLOP each (logits, grad_hidden, grad_weight), the same for both; the
(N, r) float32 logits that PyTorch materialises are 4*N*r bytes (2 GiB at the default size), and it
keeps several tensors of that size alive (logits, log-softmax, their gradients).

Goal at the default size: gpuxent's peak at most a quarter of PyTorch's, at no more than 1.5x its
time. The default size needs ~10 GB of free memory and minutes of CPU time: run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from gpuxent.bench import peak_rss_kb, write_json

IMPLS = ("torch", "gpuxent")


def _worker(args) -> dict:
    """One implementation in this (fresh) process; returns its row."""
    import torch
    import torch.nn.functional as F

    from gpuxent.linear import linear_cross_entropy

    dtype = getattr(torch, args.dtype)

    def step(h, w, b, t):
        if args.impl == "torch":
            loss = F.cross_entropy(F.linear(h, w, b), t)
        else:
            loss = linear_cross_entropy(h, w, t, b, chunk_size=args.chunk_size)
        loss.backward()
        return loss

    def inputs(n, d, r):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, d, generator=g, dtype=dtype).requires_grad_()
        w = (torch.randn(r, d, generator=g, dtype=dtype) / d**0.5).requires_grad_()
        b = torch.zeros(r, dtype=dtype).requires_grad_()
        t = torch.randint(0, r, (n,), generator=g)
        return h, w, b, t

    step(*inputs(64, 32, 1000))  # compile and warm up
    h, w, b, t = inputs(args.n, args.hidden, args.vocab)
    step(h, w, b, t)  # the .grad buffers now exist, as in training
    loss, base_kb, peak_kb, exact = peak_rss_kb(lambda: step(h, w, b, t))
    times = []
    for _ in range(args.repeats):
        for p in (h, w, b):
            p.grad = None
        t0 = time.perf_counter()
        step(h, w, b, t)
        times.append(time.perf_counter() - t0)
    flop = 3 * 2 * args.n * args.vocab * args.hidden
    med = statistics.median(times)
    return {
        "impl": args.impl,
        "peak_mib": (peak_kb - base_kb) / 1024,
        "baseline_mib": base_kb / 1024,
        "memory_method": "VmHWM after clear_refs" if exact else "ru_maxrss (upper bound)",
        "median_s": med,
        "times_s": times,
        "gflops": flop / med / 1e9,
        "loss": float(loss),
        "threads": torch.get_num_threads(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=8192, help="rows (tokens)")
    p.add_argument("--hidden", type=int, default=1024, help="d, the hidden width")
    p.add_argument("--vocab", type=int, default=65536, help="r, the number of classes")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk-size", type=int, default=None, help="gpuxent rows per chunk (default: ~128 MiB)")
    p.add_argument("--json-out", default=None, help="write the results here as JSON")
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # set in the worker subprocesses
    args = p.parse_args()

    if args.impl:
        print(json.dumps(_worker(args)))
        return

    rows = []
    for impl in IMPLS:
        cmd = [sys.executable, os.path.abspath(__file__), "--impl", impl, "--dtype", args.dtype]
        for flag in ("n", "hidden", "vocab", "repeats"):
            cmd += [f"--{flag}", str(getattr(args, flag))]
        if args.chunk_size:
            cmd += ["--chunk-size", str(args.chunk_size)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref, ours = rows
    mem_ratio = ours["peak_mib"] / ref["peak_mib"]
    time_ratio = ours["median_s"] / ref["median_s"]
    logits_mib = args.n * args.vocab * {"float32": 4, "float64": 8}.get(args.dtype, 2) / 2**20
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "sizes": {"n": args.n, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype},
        "logits_mib": logits_mib,
        "rows": rows,
        "memory_ratio": mem_ratio,
        "time_ratio": time_ratio,
        "goal_met": mem_ratio <= 0.25 and time_ratio <= 1.5,
    }
    print(f"# {result['machine']}")
    print(f"# N={args.n} d={args.hidden} r={args.vocab} {args.dtype}: the (N, r) logits are {logits_mib:.0f} MiB")
    print(f"# peak = extra resident memory of one forward+backward ({ref['memory_method']})")
    print(f"| {'impl':<30} | {'peak MiB':>9} | {'median s':>9} | {'GFLOP/s':>8} |")
    print(f"|{'-' * 32}|{'-' * 11}|{'-' * 11}|{'-' * 10}|")
    names = {"torch": "torch F.linear+F.cross_entropy", "gpuxent": "gpuxent linear_cross_entropy"}
    for r in rows:
        print(f"| {names[r['impl']]:<30} | {r['peak_mib']:>9.1f} | {r['median_s']:>9.3f} | {r['gflops']:>8.1f} |")
    print(
        f"\ngpuxent / torch: memory {mem_ratio:.3f} (goal <= 0.25), time {time_ratio:.2f}x (goal <= 1.5): "
        f"{'met' if result['goal_met'] else 'NOT met'}"
    )
    if args.json_out:
        write_json(args.json_out, result)


if __name__ == "__main__":
    main()
