"""The fixed cost of a call: gx.cross_entropy against F.cross_entropy eager on small and medium inputs.

For each size, the best of 5 blocks of calls (``--calls`` each), in process CPU time (``time.process_time``:
what a shared, noisy machine lends the process is not counted) on ``--threads`` threads (default 1):
forward (``reduction="mean"``, no gradient) and forward+backward (``.backward()`` included), gpuxent and
torch eager in the same run; the ratio gx / torch is what a user who switches the loss sees.

``--triton-host``: the host side of the Triton path (Python, checks, allocations) with the kernel
launch stubbed out: the backend's kernels are replaced by a no-op, on CPU tensors under
``TRITON_INTERPRET=1`` (set here before triton is imported). On a GPU (``--device cuda``) the same
flag times the real launch: the host cost is then the call's time when the GPU is idle.

    python benchmarks/bench_overhead.py [--json] [--calls 300] [--threads 1] [--triton-host] [--device cpu|cuda]

``--triton-host`` also prints the goal of the Triton path's host side: <= 25 us a call at small sizes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

SIZES = [(64, 2), (256, 10), (1797, 10), (4096, 128), (4096, 1000)]
# the goals (gx / torch eager): forward+backward and forward
GOALS = {
    (64, 2): (2.0, 4.0),
    (256, 10): (1.0, 1.5),
    (1797, 10): (1.0, 1.5),
    (4096, 128): (1.0, 1.0),
    (4096, 1000): (0.8, 1.0),
}


TRITON_HOST_GOAL_US = 25.0  # the Triton path's host side (Python + launch), a call at small sizes


def best_us(fn, calls: int, blocks: int = 5, sync=lambda: None, clock=time.process_time) -> float:
    """The best of ``blocks`` blocks of ``calls`` calls, in microseconds per call (``clock``: process CPU
    time by default; wall clock on a GPU, whose work the process does not spend)."""
    fn()
    sync()
    out = []
    for _ in range(blocks):
        t0 = clock()
        for _ in range(calls):
            fn()
        sync()
        out.append((clock() - t0) / calls * 1e6)
    return min(out)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run(calls: int, device: str, triton_host: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F

    import gpuxent as gx

    backend = None
    if triton_host:
        backend = "triton"
        if device == "cpu":  # stub the launches: what is left is the host side
            from gpuxent.backends import triton as tb

            class NoLaunch:
                def __getitem__(self, grid):
                    return lambda *a, **k: None

            for name in dir(tb):
                if name.startswith("_") and name.endswith("_kernel"):
                    setattr(tb, name, NoLaunch())
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    clock = time.perf_counter if device == "cuda" else time.process_time
    rows = []
    for n, r in SIZES:
        calls_n = max(20, calls * 4096 // max(n * r // 64, 4096))  # fewer calls of the large sizes
        x = torch.randn(n, r, device=device)
        t = torch.randint(0, r, (n,), device=device)
        xg = x.clone().requires_grad_()

        def fwd_gx(x=x, t=t):
            gx.cross_entropy(x, t, backend=backend)

        def fwd_torch(x=x, t=t):
            F.cross_entropy(x, t)

        def step_gx(xg=xg, t=t):
            gx.cross_entropy(xg, t, backend=backend).backward()

        def step_torch(xg=xg, t=t):
            F.cross_entropy(xg, t).backward()

        row = {"n_rows": n, "n_classes": r, "device": device, "backend": backend or gx.backends.select(x.device)}
        for pass_, ours, theirs in (("fwd", fwd_gx, fwd_torch), ("fwd+bwd", step_gx, step_torch)):
            row[f"{pass_}_gx_us"] = best_us(ours, calls_n, sync=sync, clock=clock)
            row[f"{pass_}_torch_us"] = best_us(theirs, calls_n, sync=sync, clock=clock)
            row[f"{pass_}_ratio"] = row[f"{pass_}_gx_us"] / row[f"{pass_}_torch_us"]
        goal_fb, goal_f = GOALS[(n, r)]
        row["goal_fwd+bwd"], row["goal_fwd"] = goal_fb, goal_f
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300, help="calls per block (best of 5 blocks)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (the CPU kernels follow it)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the tensors live")
    p.add_argument("--triton-host", action="store_true", help="the Triton path's host side (launch stubbed on CPU)")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    args = p.parse_args(argv)
    if args.triton_host and args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    torch.set_num_threads(args.threads)
    header = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "calls": args.calls,
    }
    rows = run(args.calls, args.device, args.triton_host)
    if args.json:
        for row in rows:
            print(json.dumps({**header, **row}))
        return 0
    print(f"# {header['date']}, {header['cpu']}, {header['threads']} threads, torch {header['torch']}")
    what = "triton host side (launch stubbed)" if args.triton_host and args.device == "cpu" else rows[0]["backend"]
    clock = "wall clock" if args.device == "cuda" else "process time"
    print(f"# gx ({what}) vs F.cross_entropy eager; best of 5 blocks of up to {args.calls} calls; us per call "
          f"({clock})")  # fmt: skip
    print("| N x r | fwd gx | fwd torch | fwd ratio (goal) | fwd+bwd gx | fwd+bwd torch | fwd+bwd ratio (goal) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['n_rows']} x {row['n_classes']} | {row['fwd_gx_us']:.1f} | {row['fwd_torch_us']:.1f} | "
            f"{row['fwd_ratio']:.2f}x (<= {row['goal_fwd']}) | {row['fwd+bwd_gx_us']:.1f} | "
            f"{row['fwd+bwd_torch_us']:.1f} | {row['fwd+bwd_ratio']:.2f}x (<= {row['goal_fwd+bwd']}) |"
        )
    if args.triton_host:
        small = [row for row in rows if row["n_rows"] * row["n_classes"] <= 4096]
        worst = max(max(row["fwd_gx_us"], row["fwd+bwd_gx_us"]) for row in small)
        goal = f"goal <= {TRITON_HOST_GOAL_US:.0f} us"
        print(f"# triton host side at small sizes: {worst:.1f} us a call, at worst ({goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
