"""CPU benchmark: fused forward and forward+backward against torch eager and torch.compile.

    python benchmarks/bench_cpu.py [--sizes 4096x32768,...] [--out benchmarks/results_cpu.json]

Byte model, GB/s and % of the measured copy bandwidth: see ``gpuxent/bench.py``. Run it on a quiet
machine: on 2 cores, anything else running halves the numbers.
"""

import argparse
import json
import pathlib

import torch

from gpuxent import bench


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(f"{n}x{r}" for n, r in bench.CPU_SIZES))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", default=str(pathlib.Path(__file__).with_name("results_cpu.json")))
    args = p.parse_args()
    result = bench.run(
        bench.parse_sizes(args.sizes), getattr(torch, args.dtype), args.repeats, device=torch.device("cpu")
    )
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(bench.markdown(result))
    goal = [
        r
        for r in result["rows"]
        if (r["n_rows"], r["n_classes"], r["pass"]) == (4096, 32768, "fwd+bwd") and r["impl"].startswith("gpuxent")
    ]
    if goal:
        g = goal[0]
        print(
            f"\ngoal at 4096 x 32768 fwd+bwd: {g.get('speedup_vs_eager')}x eager (>= 6), "
            f"{g.get('speedup_vs_compile')}x torch.compile (>= 3)"
        )


if __name__ == "__main__":
    main()
