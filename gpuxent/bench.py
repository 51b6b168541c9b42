"""Throughput of the fused cross-entropy against PyTorch, on the present device (``gpuxent bench``).

Byte model (the same for every implementation, so GB/s compare like for like):
    forward:           read N*r logits                      + N targets + N losses (ignored: O(N))
    forward+backward:  read N*r logits + write N*r gradient + O(N)
% of copy: the GB/s above over the bandwidth of a large ``dst.copy_(src)`` measured in the same run
(bytes read + bytes written). Every timing is ``torch.utils.benchmark.Timer``'s median per call
(CUDA-synchronised, on the caller's thread count), after a warm-up.

Memory: a size is run only if ``PEAK_LOGIT_COPIES`` copies of its logits fit in ``MEMORY_FRACTION`` of
the device's free memory. The default sizes shrink their row count to fit (a 24 GB card runs them all,
with fewer rows); sizes given with ``--sizes`` that do not fit are an error, not an out-of-memory crash.
"""

from __future__ import annotations

import datetime
import functools
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

CPU_SIZES = [(4096, 32768), (16384, 4096), (65536, 128), (256, 262144)]
CPU_SIZES_QUICK = [(4096, 32768), (65536, 128)]
GPU_SIZES = [(16384, 32768), (16384, 131072), (8192, 262144), (65536, 128)]
GPU_SIZES_QUICK = [(16384, 32768), (8192, 262144)]

# The logits x, their grad-requiring copy and its gradient, plus torch eager's fwd+bwd temporaries: the
# log-softmax it saves, the gradient of that, and the gradient of the input, alive at once in its backward.
PEAK_LOGIT_COPIES = 6
MEMORY_FRACTION = 0.8  # of the free memory: leaves room for the allocator's rounding and torch.compile


def bytes_moved(n_rows: int, n_classes: int, element_size: int, pass_: str, op: str = "cross_entropy") -> int:
    """The byte model of the module docstring (every GB/s figure of gpuxent divides by it):
    ``"fwd"`` reads the logits once, ``"fwd+bwd"`` also writes the gradient once; a pass named with
    ``"entropy"`` (``cross_entropy_with_stats(..., entropy=True)`` forward+backward) reads them twice,
    once in the forward and once in the backward, and writes the gradient once. ``op="distillation"``
    reads two (N, r) inputs once each (student and teacher logits) and writes the student's gradient:
    2 and 3 times N*r elements (the O(N) targets and losses are left out)."""
    reads = 2 if op == "distillation" else 1
    if pass_ == "fwd":
        return n_rows * n_classes * element_size * reads
    return n_rows * n_classes * element_size * (reads + 1 + ("entropy" in pass_))


def torch_distillation(s, t, divergence: str, beta: float, temperature: float) -> torch.Tensor:
    """The PyTorch composition that ``gx.distillation_loss`` fuses (the benchmarks' baseline): log_softmax of
    both rows, then ``F.kl_div``, reduction ``"batchmean"``; it materialises several (N, r) tensors."""
    log_ps = F.log_softmax(s / temperature, -1)
    log_pt = F.log_softmax(t / temperature, -1)
    if divergence == "kl":
        loss = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    elif divergence == "reverse_kl":
        loss = F.kl_div(log_pt, log_ps, reduction="batchmean", log_target=True)
    else:
        log_m = torch.log(beta * log_pt.exp() + (1 - beta) * log_ps.exp())
        loss = beta * F.kl_div(log_m, log_pt, reduction="batchmean", log_target=True)
        loss = loss + (1 - beta) * F.kl_div(log_m, log_ps, reduction="batchmean", log_target=True)
    return temperature**2 * loss


def add_arguments(p) -> None:
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--full", action="store_true", help="every size (slower); the default is a ~1 minute run")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, at least (default: 5)")
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


def _sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (a small positive number never rounds to 0)."""
    return float(f"{x:.{digits}g}")


def time_ms(fn, repeats: int = 5) -> float:
    """Median ms per call of ``fn()``, by ``torch.utils.benchmark.Timer``: a first ``timeit(1)`` (two
    warm-up calls: compilation, autotuning, allocation; then one timed call) sizes a
    ``blocked_autorange`` that times at least ``repeats`` calls, in blocks long enough that the
    timer's own cost (a CUDA synchronisation) is negligible."""
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    first = timer.timeit(1)
    return 1e3 * timer.blocked_autorange(min_run_time=repeats * first.median).median


def time_once_ms(fn) -> float:
    """ms of one call of ``fn()`` after a warm-up call, by the wall clock: the timer of the GPU scripts'
    dry runs on the CPU interpreters, whose times say only that the script runs."""
    fn()
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def write_json(path: str, result) -> None:
    """A benchmark's results as indented JSON with a final newline (the ``--json-out`` files)."""
    import json

    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def copy_bandwidth(device, nbytes: int = 1 << 29, repeats: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` on a buffer much larger than the caches (read + write counted)."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats)
    return 2 * nbytes / ms / 1e6


def status_kb(field: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``VmHWM``: the peak resident memory, ``VmRSS``: now)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_kb(fn):
    """``(fn(), base_kb, peak_kb, exact)``: the resident memory before ``fn`` and its peak during it
    (``exact``: ``VmHWM`` after a reset; where a reset is not allowed, the process's lifetime peak)."""
    import resource

    exact = reset_peak_rss()
    base_kb = status_kb("VmRSS")
    result = fn()
    peak_kb = status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, base_kb, peak_kb, exact


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (``/proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def free_memory(device) -> int | None:
    """Bytes free for new tensors on ``device``: ``torch.cuda.mem_get_info``, or the kernel's
    MemAvailable on a Linux CPU; None where unknown."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def memory_needed(n: int, r: int, dtype: torch.dtype) -> int:
    """Bytes a size needs at its peak (see ``PEAK_LOGIT_COPIES``)."""
    return PEAK_LOGIT_COPIES * n * r * torch.empty(0, dtype=dtype).element_size()


def fit_sizes(sizes, dtype: torch.dtype, free: int | None) -> list[tuple[int, int]]:
    """``sizes`` with each row count halved until the size fits in ``MEMORY_FRACTION * free`` bytes;
    a size whose single row does not fit is dropped. ``free=None``: unchanged."""
    if free is None:
        return list(sizes)
    out = []
    for n, r in sizes:
        while n > 1 and memory_needed(n, r, dtype) > MEMORY_FRACTION * free:
            n //= 2
        if memory_needed(n, r, dtype) <= MEMORY_FRACTION * free and (n, r) not in out:
            out.append((n, r))
    return out


def check_sizes(sizes, dtype: torch.dtype, repeats: int, free: int | None) -> None:
    """ValueError naming the argument for a non-positive size or repeat count, or a size that does not
    fit in memory."""
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    for n, r in sizes:
        if n < 1 or r < 1:
            raise ValueError(f"sizes: N and R must be >= 1, got {n}x{r}")
        if free is not None and memory_needed(n, r, dtype) > MEMORY_FRACTION * free:
            raise ValueError(
                f"sizes: {n}x{r} in {str(dtype).replace('torch.', '')} needs about "
                f"{memory_needed(n, r, dtype) / 2**30:.1f} GiB ({PEAK_LOGIT_COPIES} copies of the logits), "
                f"more than {MEMORY_FRACTION:.0%} of the {free / 2**30:.1f} GiB free"
            )


def _implementations(device, compile_: bool):
    """name -> (forward(x, t), forward_backward(x, t)); x requires grad for the latter."""
    import gpuxent as gx

    def gx_fwd(x, t):
        return gx.cross_entropy(x, t)

    def torch_fwd(x, t):
        return F.cross_entropy(x, t)

    impls = {
        f"gpuxent ({gx.backends.select(device)})": gx_fwd,
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


def _measure_size(n, r, dtype, device, impls, repeats, copy_gbps, bar) -> list[dict]:
    """The rows of one size: every implementation, forward and forward+backward. The size's tensors
    die on return, before the next size allocates its own."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, r, generator=gen) * 2).to(device=device, dtype=dtype)
    t = torch.randint(0, r, (n,), generator=gen).to(device)
    xg = x.clone().requires_grad_()
    times = {}
    for name, (fwd, fwd_bwd) in impls.items():
        for pass_, fn in (("fwd", functools.partial(fwd, x, t)), ("fwd+bwd", functools.partial(fwd_bwd, xg, t))):
            bar.set_postfix_str(f"{n}x{r} {name} {pass_}")
            with torch.no_grad() if pass_ == "fwd" else torch.enable_grad():
                times[name, pass_] = time_ms(fn, repeats)
            bar.update()
    rows = []
    for (name, pass_), ms in times.items():
        gbps = bytes_moved(n, r, x.element_size(), pass_) / ms / 1e6
        row = {
            "impl": name, "n_rows": n, "n_classes": r, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
            "median_ms": _sig(ms), "gbps": _sig(gbps), "pct_copy": _sig(100 * gbps / copy_gbps),
        }  # fmt: skip
        for baseline, key in (("torch eager", "speedup_vs_eager"), ("torch.compile", "speedup_vs_compile")):
            if (baseline, pass_) in times:  # the ratio to a baseline measured in the same run
                row[key] = _sig(times[baseline, pass_] / ms)
        rows.append(row)
    return rows


def run(sizes, dtype=torch.float32, repeats=5, compile_=True, device=None, progress=True) -> dict:
    """Benchmark every implementation on every size; returns {"machine", "date", "copy_gbps", "rows"}.

    Raises:
        ValueError: ``repeats < 1``, a size with a zero, or a size that does not fit in free memory.
    """
    from tqdm import tqdm

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_sizes(sizes, dtype, repeats, free_memory(device))
    copy_gbps = copy_bandwidth(device)
    impls = _implementations(device, compile_)
    bar = tqdm(total=len(sizes) * len(impls) * 2, disable=not progress, desc="bench", leave=False)
    rows = [row for n, r in sizes for row in _measure_size(n, r, dtype, device, impls, repeats, copy_gbps, bar)]
    bar.close()
    return {
        "machine": machine(),
        "device": device.type,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "copy_gbps": _sig(copy_gbps),
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
    """``"4096x32768,65536x128"`` -> ``[(4096, 32768), (65536, 128)]``; ValueError naming ``sizes``."""
    try:
        sizes = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(len(size) != 2 for size in sizes):
        raise ValueError(f"sizes: expected NxR[,NxR...] such as 4096x32768,65536x128, got {text!r}")
    return sizes


def from_args(args) -> dict:
    """``gpuxent bench``: the sizes asked for, or the default ones shrunk to the free memory, run."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if args.sizes:
        sizes = parse_sizes(args.sizes)  # run() rejects one that does not fit
    else:
        if device.type == "cuda":
            sizes = GPU_SIZES if args.full else GPU_SIZES_QUICK
        else:
            sizes = CPU_SIZES if args.full else CPU_SIZES_QUICK
        sizes = fit_sizes(sizes, dtype, free_memory(device))
    return run(sizes, dtype, args.repeats, not args.no_compile, device=device, progress=not args.json)
