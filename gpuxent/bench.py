"""Throughput of the fused cross-entropy against PyTorch, on the present device (``gpuxent bench``).

Byte model (the same for every implementation, so GB/s compare like for like):
    forward:           read N*r logits                      + N targets + N losses (ignored: O(N))
    forward+backward:  read N*r logits + write N*r gradient + O(N)
% of copy: the GB/s above over the bandwidth of a large ``dst.copy_(src)`` measured in the same run
(bytes read + bytes written). Every timing is a median over repeats after a warm-up call.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

CPU_SIZES = [(4096, 32768), (16384, 4096), (65536, 128), (256, 262144)]
CPU_SIZES_QUICK = [(4096, 32768), (65536, 128)]
GPU_SIZES = [(16384, 32768), (16384, 131072), (8192, 262144), (65536, 128)]


def bytes_moved(n_rows: int, n_classes: int, element_size: int, pass_: str) -> int:
    """The byte model of the module docstring (every GB/s figure of gpuxent divides by it):
    ``"fwd"`` reads the logits once, ``"fwd+bwd"`` also writes the gradient once."""
    return n_rows * n_classes * element_size * (1 if pass_ == "fwd" else 2)


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--full", action="store_true", help="every size (slower); the default is a ~1 minute run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sizes", default=None, help="NxR[,NxR...], e.g. 4096x32768,65536x128")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device, repeats: int = 5) -> float:
    """Median wall time of ``fn()`` in ms after one warm-up call."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def copy_bandwidth(device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` on a buffer much larger than the caches (read + write counted)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats)
    return 2 * nbytes / ms / 1e6


def _implementations(device, compile_: bool):
    """name -> (forward(x, t), forward_backward(x, t)); x requires grad for the latter."""
    import gpuxent as gx

    def gx_fwd(x, t):
        return gx.cross_entropy(x, t)

    def torch_fwd(x, t):
        return F.cross_entropy(x, t)

    impls = {
        f"gpuxent ({gx.functional._select(torch.empty(0, device=device), None).NAME})": gx_fwd,
        "torch eager": torch_fwd,
    }
    if compile_:
        impls["torch.compile"] = torch.compile(torch_fwd, dynamic=False)
    if device.type == "cuda":
        try:
            from liger_kernel.transformers.functional import liger_cross_entropy

            impls["liger"] = lambda x, t: liger_cross_entropy(x, t)
        except ImportError:
            pass
    out = {}
    for name, fwd in impls.items():

        def fwd_bwd(x, t, fwd=fwd):
            x.grad = None
            fwd(x, t).backward()

        out[name] = (fwd, fwd_bwd)
    return out


def run(sizes, dtype=torch.float32, repeats=5, compile_=True, device=None, progress=True) -> dict:
    """Benchmark every implementation on every size; returns {"machine", "date", "copy_gbps", "rows"}."""
    from tqdm import tqdm

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy_gbps = copy_bandwidth(device)
    impls = _implementations(device, compile_)
    rows = []
    elt = torch.empty(0, dtype=dtype).element_size()
    bar = tqdm(total=len(sizes) * len(impls) * 2, disable=not progress, desc="bench", leave=False)
    for n, r in sizes:
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = (torch.randn(n, r, generator=gen) * 2).to(device=device, dtype=dtype)
        t = torch.randint(0, r, (n,), generator=gen).to(device)
        xg = x.clone().requires_grad_()
        base = {}
        for name, (fwd, fwd_bwd) in impls.items():
            cases = (("fwd", functools.partial(fwd, x, t)), ("fwd+bwd", functools.partial(fwd_bwd, xg, t)))
            for pass_, fn in cases:
                nbytes = bytes_moved(n, r, elt, pass_)
                bar.set_postfix_str(f"{n}x{r} {name} {pass_}")
                with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                    ms = time_ms(fn, device, repeats)
                bar.update()
                gbps = nbytes / ms / 1e6
                rows.append(
                    {
                        "impl": name, "n_rows": n, "n_classes": r, "dtype": str(dtype).replace("torch.", ""),
                        "pass": pass_, "median_ms": round(ms, 3), "gbps": round(gbps, 2),
                        "pct_copy": round(100 * gbps / copy_gbps, 1),
                    }
                )  # fmt: skip
                if name == "torch eager":
                    base[pass_] = ms
        for row in rows:
            if (row["n_rows"], row["n_classes"]) == (n, r) and row["pass"] in base:
                row["speedup_vs_eager"] = round(base[row["pass"]] / row["median_ms"], 2)
        del x, xg
    bar.close()
    for row in rows:  # the ratio to torch.compile, measured in the same run
        ref = [
            q
            for q in rows
            if q["impl"] == "torch.compile"
            and (q["n_rows"], q["n_classes"], q["pass"]) == (row["n_rows"], row["n_classes"], row["pass"])
        ]
        if ref:
            row["speedup_vs_compile"] = round(ref[0]["median_ms"] / row["median_ms"], 2)
    return {
        "machine": machine(),
        "device": device.type,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gbps": round(copy_gbps, 2),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """The result as a markdown table (the format of benchmarks/RESULTS.md)."""
    lines = [
        f"Machine: {result['machine']} ({result['device']}), {result['date']}, torch {result['torch']}, "
        f"copy bandwidth {result['copy_gbps']} GB/s (read + write).",
        "",
        "| N x r | dtype | pass | impl | median ms | GB/s | % of copy | x eager | x compile |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['n_rows']} x {r['n_classes']} | {r['dtype']} | {r['pass']} | {r['impl']} | {r['median_ms']:.2f} | "
            f"{r['gbps']:.1f} | {r['pct_copy']:.0f}% | {r.get('speedup_vs_eager', float('nan')):.2f} | "
            f"{r.get('speedup_vs_compile', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",")]
    except ValueError:
        raise SystemExit(f"--sizes: expected NxR[,NxR...], got {text!r}") from None


def main(args) -> int:
    gpu = torch.cuda.is_available()
    if args.sizes:
        sizes = parse_sizes(args.sizes)
    elif gpu:
        sizes = GPU_SIZES
    else:
        sizes = CPU_SIZES if args.full else CPU_SIZES_QUICK
    result = run(sizes, getattr(torch, args.dtype), args.repeats, not args.no_compile, progress=not args.json)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0
