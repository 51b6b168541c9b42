"""GPU benchmark: fused softmax cross-entropy, forward and forward+backward, against PyTorch and Liger.

    python benchmarks/bench_gpu.py [--sizes 16384x32768,65536x128] [--dtypes bfloat16,float32]
                                   [--json-out bench.json] [--markdown-out bench.md] [--no-compile]
                                   [--budget-s 240] [--sweep [--blocks 2048,4096 --warps 8,16]] [--dry-run]
                                   [--stats]
    python benchmarks/bench_gpu.py --distillation [...]   (distillation rows: see that section)

Implementations, each timed with ``triton.testing.do_bench`` (median, L2 flushed between runs):
  gpuxent-triton      the Triton kernel through the registered op ``gpuxent::cross_entropy_rows`` + the mean
  gpuxent-numba_cuda  the same contract on the Numba CUDA backend, when it is available
  gpuxent-*-api       the public API (``gx.cross_entropy(x, t, backend=...)``, ``.backward()``), host
                      checks and autograd included: what a user gets
  torch-eager         ``F.cross_entropy``; fwd+bwd is ``loss.backward()``
  torch-compile       ``torch.compile`` of ``F.cross_entropy`` (compiled before timing)
  liger               Liger-Kernel's fused cross-entropy, when ``liger_kernel`` is importable (on a copy
                      of the logits: it writes the gradient into its input)

``--sweep`` times the Triton kernel instead under each BLOCK x num_warps of its large-r path (one row
per program) at the first size, then its default configuration at every size (e.g. an aligned and an
odd row length), each against the default configuration.

Byte model: ``gpuxent.bench.bytes_moved``, the project's one (forward reads the N*r logits, forward+
backward also writes the N*r gradient). GB/s = bytes / median time; "% copy" compares it with a
device-to-device ``copy_`` of a 1 GiB buffer measured in the same run (read + write, the same kind of
traffic). The speedup column is ``time(row) / time(gpuxent-triton)``.

``--stats`` times ``gx.cross_entropy_with_stats`` instead (through the public API, without and with a
differentiable entropy) beside plain ``gx.cross_entropy`` and the PyTorch composition that logs the same
numbers, forward+backward, with the peak memory one step allocates.

``--dry-run`` runs the same code on the CPU interpreters (TRITON_INTERPRET=1, NUMBA_ENABLE_CUDASIM=1,
set before the run) with wall-clock medians: a check that the script works, not GPU timings.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import os
import platform
import sys
import time
from unittest import mock

import torch
import torch.nn.functional as F

from gpuxent.bench import bytes_moved, write_json

DEFAULT_SIZES = "16384x32768,16384x131072,8192x262144,65536x128"
# On CUDA unless the interpreters are on (--dry-run): they run the GPU backends on CPU tensors only.
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PASSES = ("fwd", "fwd+bwd")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        n, r = item.lower().split("x")
        sizes.append((int(n), int(r)))
    return sizes


def median_ms(fn, grad_to_none=None) -> float:
    if not ON_GPU:  # --dry-run: one call on the interpreters, by the wall clock
        from gpuxent.bench import time_once_ms

        return time_once_ms(fn)
    from triton.testing import do_bench

    fn()  # compile / autotune / allocate outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth_gbps(nbytes: int = 2**30) -> float:
    """Device-to-device copy of a 1 GiB buffer: read + write, in GB/s (the buffers die on return)."""
    if not ON_GPU:
        from gpuxent.bench import copy_bandwidth

        return copy_bandwidth(torch.device("cpu"), nbytes=2**26, repeats=3)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src)) / 1e6


# --------------------------------------------------------------------------- implementations
# Each maker returns {pass: (fn, grad_to_none)} for logits x and targets t, or raises to be skipped.


def make_gpuxent(backend_name: str):
    from gpuxent import backends
    from gpuxent.autograd import cross_entropy_rows  # the one door into a backend

    backends.get(backend_name)  # raises, to be skipped, when the backend cannot run here

    def make(x, t):
        n_rows = x.shape[0]
        scale = torch.full((1,), 1.0 / n_rows, device=x.device)
        kw = (-100, 0.0, 0.0, 0.0, backend_name)  # ignore_index, label_smoothing, z_loss, softcap, backend

        def fwd():
            loss = cross_entropy_rows(x, t, None, None, *kw, False)[0]
            return loss.mean()  # no ignored rows here: the mean is the public API's reduction

        def fwd_bwd():
            loss, _, grad = cross_entropy_rows(x, t, None, scale, *kw, True)
            return loss.mean(), grad

        return {"fwd": (fwd, None), "fwd+bwd": (fwd_bwd, None)}

    return make


def make_gpuxent_api(backend_name: str):
    """The public API as a user calls it: ``gx.cross_entropy`` and ``.backward()``, including its
    host-side checks (one sync for the class-index check, one for ``grad_output == 1``)."""
    import gpuxent as gx

    def make(x, t):
        xr = x.detach().requires_grad_()

        def fwd():
            with torch.no_grad():
                return gx.cross_entropy(x, t, backend=backend_name)

        def fwd_bwd():
            gx.cross_entropy(xr, t, backend=backend_name).backward()

        return {"fwd": (fwd, None), "fwd+bwd": (fwd_bwd, [xr])}

    return make


def make_eager(x, t):
    xr = x.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return F.cross_entropy(x, t)

    def fwd_bwd():
        F.cross_entropy(xr, t).backward()

    return {"fwd": (fwd, None), "fwd+bwd": (fwd_bwd, [xr])}


_COMPILED = None


def make_compile(x, t):
    global _COMPILED
    if _COMPILED is None:
        # sizes x dtypes x grad modes: more recompiles than the default limit, past which dynamo
        # silently falls back to eager
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
        # dynamic=None: the first shape compiles static, the next one recompiles with dynamic sizes
        _COMPILED = torch.compile(lambda x_, t_: F.cross_entropy(x_, t_))
    xr = x.detach().requires_grad_()

    def fwd():
        with torch.no_grad():
            return _COMPILED(x, t)

    def fwd_bwd():
        _COMPILED(xr, t).backward()

    return {"fwd": (fwd, None), "fwd+bwd": (fwd_bwd, [xr])}


def make_liger(x, t):
    from liger_kernel.transformers.functional import liger_cross_entropy

    xc = x.detach().clone()  # Liger overwrites its input with the gradient
    xr = x.detach().clone().requires_grad_()

    def fwd():
        with torch.no_grad():
            return liger_cross_entropy(xc, t)

    def fwd_bwd():
        liger_cross_entropy(xr, t).backward()

    return {"fwd": (fwd, None), "fwd+bwd": (fwd_bwd, [xr])}


def implementations(args) -> dict:
    from gpuxent import backends

    impls = {}
    status = backends.status()
    for name in ("triton", "numba_cuda"):
        if status[name][0]:
            impls[f"gpuxent-{name}"] = make_gpuxent(name)
            impls[f"gpuxent-{name}-api"] = make_gpuxent_api(name)
        else:
            print(f"# skipping gpuxent-{name}: {status[name][1]}")
    impls["torch-eager"] = make_eager
    if not args.no_compile:
        impls["torch-compile"] = make_compile
    try:
        import liger_kernel.transformers.functional  # noqa: F401

        impls["liger"] = make_liger
    except Exception:
        pass  # Liger-Kernel is optional
    return impls


# --------------------------------------------------------------------------- statistics (--stats)
# cross_entropy_with_stats through the public API, without and with a differentiable entropy, beside
# plain cross_entropy and the PyTorch composition that logs the same numbers (F.cross_entropy, argmax
# accuracy, entropy from log_softmax). Byte model: bytes_moved ("entropy" passes read the logits in
# the forward and again in the backward: 3 N*r).

STATS_PASSES = ("fwd+bwd", "stats fwd+bwd", "entropy fwd+bwd")
ENTROPY_BETA = 0.1  # the objective with entropy: loss - beta * entropy


def peak_extra_mib(fn, grad_to_none=None) -> float | None:
    """Peak memory allocated during one call of ``fn`` above what was allocated before it (MiB; CUDA only)."""
    if not ON_GPU:
        return None
    for v in grad_to_none or ():
        v.grad = None
    free_memory()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)


def _stats_steps(x, t, objective):
    """``{pass: (fn, grad_to_none)}`` of ``objective(logits, entropy) -> scalar`` (``entropy`` None:
    the plain loss) for the three ``STATS_PASSES``."""
    xr = x.detach().requires_grad_()

    def step(entropy):
        return lambda: objective(xr, entropy).backward()

    return {"fwd+bwd": (step(None), [xr]), "stats fwd+bwd": (step(False), [xr]), "entropy fwd+bwd": (step(True), [xr])}


def make_stats_api(backend_name: str):
    import gpuxent as gx

    def objective_of(t):
        def objective(v, entropy):
            if entropy is None:
                return gx.cross_entropy(v, t, backend=backend_name)
            out = gx.cross_entropy_with_stats(v, t, backend=backend_name, entropy=entropy)
            return out.loss - ENTROPY_BETA * out.entropy if entropy else out.loss

        return objective

    return lambda x, t: _stats_steps(x, t, objective_of(t))


def make_stats_eager(x, t):
    def objective(v, entropy):
        if entropy is None:
            return F.cross_entropy(v, t)
        accuracy = (v.detach().argmax(-1) == t).float().mean()  # logged, as gpuxent's
        if not entropy:
            return F.cross_entropy(v, t) + 0 * accuracy
        logp = F.log_softmax(v, -1)
        return F.nll_loss(logp, t) + ENTROPY_BETA * (logp.exp() * logp).sum(-1).mean() + 0 * accuracy

    return _stats_steps(x, t, objective)


def stats_implementations() -> dict:
    from gpuxent import backends

    status = backends.status()
    impls = {f"gpuxent-{name}-api": make_stats_api(name) for name in ("triton", "numba_cuda") if status[name][0]}
    impls["torch-eager"] = make_stats_eager
    return impls


# --------------------------------------------------------------------------- the run


def versions() -> dict:
    import triton

    out = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__}
    try:
        import gpuxent

        out["gpuxent"] = gpuxent.__version__
    except Exception:
        pass
    for mod in ("numba", "numba_cuda", "liger_kernel"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:
            pass
    out["cuda"] = torch.version.cuda
    return out


def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


def free_memory():
    gc.collect()
    if ON_GPU:
        torch.cuda.empty_cache()


def new_result(dry_run: bool) -> dict:
    """The run's header: device, date, versions and the copy bandwidth that every row is compared with."""
    name = torch.cuda.get_device_name() if ON_GPU else "CPU"
    if dry_run:
        name += " (DRY RUN on the CPU interpreters: not GPU timings)"
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "copy_gbps": round(copy_bandwidth_gbps(), 1),
        "rows": [],
        "skipped": [],
    }


def time_size(
    result: dict, impls: dict, n_rows: int, n_classes: int, dtype_name: str, deadline: float, passes=PASSES
) -> None:
    """Time every implementation on one (N, r, dtype), none started after ``deadline`` (perf_counter);
    rows go into ``result``. For ``STATS_PASSES`` each row also gets the peak memory one call
    allocates above what was allocated before it."""
    dtype = DTYPES[dtype_name]
    x = torch.randn(n_rows, n_classes, device=device(), dtype=dtype)
    t = torch.randint(0, n_classes, (n_rows,), device=device())
    times, peaks = {}, {}
    for impl, make in impls.items():
        if time.perf_counter() > deadline:
            result["skipped"].append(f"{impl} {n_rows}x{n_classes} {dtype_name}: over the time budget")
            continue
        try:
            fns = make(x, t)
            for pass_ in passes:
                fn, grad_to_none = fns[pass_]
                times[(impl, pass_)] = median_ms(fn, grad_to_none)
                if passes is STATS_PASSES:
                    peaks[(impl, pass_)] = peak_extra_mib(fn, grad_to_none)
        except Exception as exc:  # an optional baseline that fails here is reported, not fatal
            msg = f"{impl} {n_rows}x{n_classes} {dtype_name}: {type(exc).__name__}: {str(exc)[:200]}"
            result["skipped"].append(msg)
            print(f"# skipped {msg}", file=sys.stderr)
        fns = None
        free_memory()
    for (impl, pass_), ms in times.items():
        gbps = bytes_moved(n_rows, n_classes, x.element_size(), pass_) / ms / 1e6
        row = {
            "n_rows": n_rows,
            "n_classes": n_classes,
            "dtype": dtype_name,
            "pass": pass_,
            "impl": impl,
            "ms": round(ms, 4),
            "gbps": round(gbps, 1),
            "pct_copy": round(100 * gbps / result["copy_gbps"], 1),
        }
        ours = times.get(("gpuxent-triton", pass_))
        if ours and impl != "gpuxent-triton":
            row["triton_speedup"] = round(ms / ours, 2)
        if (impl, pass_) in peaks:
            row["peak_extra_mib"] = peaks[(impl, pass_)]
        result["rows"].append(row)
    del x, t
    free_memory()


def run(args) -> dict:
    started = time.perf_counter()
    result = new_result(args.dry_run)
    free_memory()
    impls, passes = (stats_implementations(), STATS_PASSES) if args.stats else (implementations(args), PASSES)
    for n_rows, n_classes in parse_sizes(args.sizes):
        for dtype_name in args.dtypes.split(","):
            time_size(result, impls, n_rows, n_classes, dtype_name, started + args.budget_s, passes)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def make_triton_config(block: int, num_warps: int):
    """gpuxent-triton with its launch configuration forced to one row per program, ``block`` and ``num_warps``."""
    from gpuxent.backends import triton as tb

    def make(x, t):
        def forced(fn):
            def call():
                with mock.patch.object(tb, "_launch_config", lambda n_classes, element_size: (block, 1, num_warps)):
                    return fn()

            return call

        return {pass_: (forced(fn), grad) for pass_, (fn, grad) in make_gpuxent("triton")(x, t).items()}

    return make


def run_sweep(args) -> dict:
    """BLOCK x num_warps of the large-r Triton kernel at the first size, then the default configuration
    at every size, each row against the default configuration of its size."""
    started = time.perf_counter()
    result = new_result(args.dry_run)
    sizes = parse_sizes(args.sizes)
    configs = list(itertools.product(map(int, args.blocks.split(",")), map(int, args.warps.split(","))))
    for dtype_name in args.dtypes.split(","):
        for i, (n_rows, n_classes) in enumerate(sizes):
            impls = {"gpuxent-triton": make_gpuxent("triton")}
            if i == 0:
                impls |= {f"triton BLOCK={b} warps={w}": make_triton_config(b, w) for b, w in configs}
            time_size(result, impls, n_rows, n_classes, dtype_name, started + args.budget_s)
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


# --------------------------------------------------------------------------- distillation
# --distillation: gx.distillation_loss(s, t, divergence=d, temperature=2).backward() on each GPU backend
# against the PyTorch composition (gpuxent.bench.torch_distillation), eagerly and under torch.compile,
# forward+backward. Byte model: bytes_moved(..., op="distillation") (read student + teacher, write the
# gradient; the Triton kernel rereads both rows once more, jsd twice, mostly from L2). Peak extra memory:
# torch.cuda.max_memory_allocated over one step, above what was allocated before it.

DISTILL_SIZES = "8192x32768,4096x131072"
DISTILL_TEMPERATURE = 2.0
DISTILL_BETA = 0.5


def _distill_steps(args, s, t, divergence) -> dict:
    """{impl: a forward+backward step into ``s.grad``}."""
    import gpuxent as gx
    from gpuxent import backends
    from gpuxent.bench import torch_distillation

    def composition(st, tt):
        return torch_distillation(st, tt, divergence, DISTILL_BETA, DISTILL_TEMPERATURE)

    steps = {}
    for name in ("triton", "numba_cuda"):
        if backends.status()[name][0]:
            steps[f"gpuxent-{name}-api"] = lambda name=name: gx.distillation_loss(
                s, t, divergence=divergence, beta=DISTILL_BETA, temperature=DISTILL_TEMPERATURE, backend=name
            ).backward()
    steps["torch-eager"] = lambda: composition(s, t).backward()
    if not args.no_compile:
        compiled = torch.compile(composition, dynamic=False)
        steps["torch-compile"] = lambda: compiled(s, t).backward()
    return steps


def _peak_extra_mib(step) -> float | None:
    if not ON_GPU:
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def run_distillation(args) -> dict:
    started = time.perf_counter()
    result = new_result(args.dry_run)
    sizes = args.sizes if args.sizes != DEFAULT_SIZES else ("4x64" if args.dry_run else DISTILL_SIZES)
    for n_rows, n_classes in parse_sizes(sizes):
        for dtype_name in args.dtypes.split(","):
            dtype = DTYPES[dtype_name]
            s = torch.randn(n_rows, n_classes, device=device(), dtype=dtype).requires_grad_()
            t = torch.randn(n_rows, n_classes, device=device(), dtype=dtype)
            nbytes = bytes_moved(n_rows, n_classes, s.element_size(), "fwd+bwd", op="distillation")
            for divergence in ("kl", "reverse_kl", "jsd"):
                times, peaks = {}, {}
                for impl, step in _distill_steps(args, s, t, divergence).items():
                    if time.perf_counter() > started + args.budget_s:
                        result["skipped"].append(f"{impl} {divergence} {n_rows}x{n_classes}: over the time budget")
                        continue
                    try:
                        times[impl] = median_ms(step, [s])
                        s.grad = None
                        peaks[impl] = _peak_extra_mib(step)
                    except Exception as exc:  # an optional baseline that fails here is reported, not fatal
                        msg = f"{impl} {divergence} {n_rows}x{n_classes}: {type(exc).__name__}: {str(exc)[:200]}"
                        result["skipped"].append(msg)
                    s.grad = None
                    free_memory()
                ours = times.get("gpuxent-triton-api")
                for impl, ms in times.items():
                    gbps = nbytes / ms / 1e6
                    row = {
                        "n_rows": n_rows, "n_classes": n_classes, "dtype": dtype_name,
                        "pass": f"{divergence} fwd+bwd", "impl": impl, "ms": round(ms, 4), "gbps": round(gbps, 1),
                        "pct_copy": round(100 * gbps / result["copy_gbps"], 1), "peak_extra_mib": peaks.get(impl),
                    }  # fmt: skip
                    if ours and impl != "gpuxent-triton-api":
                        row["triton_speedup"] = round(ms / ours, 2)
                    result["rows"].append(row)
            del s, t
            free_memory()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def _header(result: dict) -> list[str]:
    v = result["versions"]
    return [
        f"{result['device']}  {result['date']}  " + "  ".join(f"{k} {val}" for k, val in v.items()),
        f"device-to-device copy: {result['copy_gbps']} GB/s",
    ]


def table(result: dict) -> str:
    lines = _header(result) + [
        "",
        f"{'N x r':<16} {'dtype':>8} {'pass':>8} {'impl':>26} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'triton x':>9}",
    ]
    for r in result["rows"]:
        speedup = f"{r['triton_speedup']:.2f}" if "triton_speedup" in r else ""
        lines.append(
            f"{r['n_rows']:>6} x {r['n_classes']:<7} {r['dtype']:>8} {r['pass']:>8} {r['impl']:>26} "
            f"{r['ms']:>9.3f} {r['gbps']:>8.0f} {r['pct_copy']:>6.1f}% {speedup:>9}"
        )
    lines += [f"skipped: {s}" for s in result["skipped"]]
    lines.append(f"({result['seconds']} s; 'triton x' = time of that row / time of gpuxent-triton)")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """The result as a markdown table, for benchmarks/RESULTS.md."""
    lines = [line + "  " for line in _header(result)] + [
        "",
        "| N x r | dtype | pass | impl | median ms | GB/s | % of copy | x gpuxent-triton |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        speedup = f"{r['triton_speedup']:.2f}" if "triton_speedup" in r else ""
        lines.append(
            f"| {r['n_rows']} x {r['n_classes']} | {r['dtype']} | {r['pass']} | {r['impl']} | {r['ms']:.3f} "
            f"| {r['gbps']:.0f} | {r['pct_copy']:.1f}% | {speedup} |"
            + (f" peak extra {r['peak_extra_mib']} MiB |" if r.get("peak_extra_mib") is not None else "")
        )
    lines += [f"\nskipped: {s}" for s in result["skipped"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxR, e.g. 16384x32768,65536x128")
    p.add_argument("--dtypes", default="bfloat16,float32", help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new timing after this many seconds")
    p.add_argument("--json-out", default=None, help="write the results as JSON to this path")
    p.add_argument("--markdown-out", default=None, help="write the results as a markdown table to this path")
    p.add_argument("--sweep", action="store_true", help="BLOCK x num_warps of the large-r Triton kernel instead")
    p.add_argument("--stats", action="store_true", help="cross_entropy_with_stats rows instead (see STATS_PASSES)")
    p.add_argument("--blocks", default="4096,8192,2048,16384", help="--sweep: BLOCK values, most wanted first")
    p.add_argument("--warps", default="16,8,32,4", help="--sweep: num_warps values, most wanted first")
    p.add_argument(
        "--distillation", action="store_true", help=f"gx.distillation_loss rows instead (default sizes {DISTILL_SIZES})"
    )
    p.add_argument("--dry-run", action="store_true", help="on the CPU interpreters: checks the script, times nothing")
    args = p.parse_args(argv)
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"--dtypes: unknown dtype {name!r}")
    if args.dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            p.error("--dry-run: set TRITON_INTERPRET=1 and NUMBA_ENABLE_CUDASIM=1 (before Python starts)")
        args.no_compile = True
    elif not ON_GPU:
        print("bench_gpu.py needs a CUDA GPU and the interpreters off (or --dry-run)", file=sys.stderr)
        return 2
    if args.distillation:
        result = run_distillation(args)
    else:
        result = run_sweep(args) if args.sweep else run(args)
    print(table(result))
    if args.json_out:
        write_json(args.json_out, result)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(markdown(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
