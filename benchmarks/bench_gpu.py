"""GPU benchmark: fused softmax cross-entropy, forward and forward+backward, against PyTorch and Liger.

    python benchmarks/bench_gpu.py [--sizes 16384x32768,65536x128] [--dtypes bfloat16,float32]
                                   [--json-out bench.json] [--no-compile] [--budget-s 240]

Implementations, each timed with ``triton.testing.do_bench`` (median, L2 flushed between runs):
  gpuxent-triton      the Triton backend's kernel (``gpuxent.backends.triton.cross_entropy``) + the mean
  gpuxent-numba_cuda  the same contract on the Numba CUDA backend, when it is available
  gpuxent-*-api       the public API (``gx.cross_entropy(x, t, backend=...)``, ``.backward()``), host
                      checks and autograd included: what a user gets
  torch-eager         ``F.cross_entropy``; fwd+bwd is ``loss.backward()``
  torch-compile       ``torch.compile`` of ``F.cross_entropy`` (compiled before timing)
  liger               Liger-Kernel's fused cross-entropy, when ``liger_kernel`` is importable (on a copy
                      of the logits: it writes the gradient into its input)

Byte model (the minimum traffic of each pass; elt = bytes per logit, targets are int64, loss float32):
  forward:   read N*r*elt logits + read 8N targets + write 4N losses
  fwd+bwd:   read N*r*elt logits + write N*r*elt gradient + read 8N targets + write 4N losses
GB/s = bytes / median time; "% copy" compares it with a device-to-device ``copy_`` of a 1 GiB buffer
measured in the same run (read + write, so the same kind of traffic). The speedup columns are
``time(baseline) / time(gpuxent-triton)``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time

import torch
import torch.nn.functional as F

DEFAULT_SIZES = "16384x32768,16384x131072,8192x262144,65536x128"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PASSES = ("fwd", "fwd+bwd")


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        n, r = item.lower().split("x")
        sizes.append((int(n), int(r)))
    return sizes


def bytes_moved(n_rows: int, n_classes: int, element_size: int, pass_: str) -> int:
    """The byte model of the module docstring."""
    logits = n_rows * n_classes * element_size
    rows = 8 * n_rows + 4 * n_rows  # targets in, losses out
    return (logits if pass_ == "fwd" else 2 * logits) + rows


def median_ms(fn, grad_to_none=None) -> float:
    from triton.testing import do_bench

    fn()  # compile / autotune / allocate outside the timing
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none, return_mode="median")


def copy_bandwidth_gbps(nbytes: int = 2**30) -> float:
    """Device-to-device copy of a 1 GiB buffer: read + write, in GB/s (the buffers die on return)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / median_ms(lambda: dst.copy_(src)) / 1e6


# --------------------------------------------------------------------------- implementations
# Each maker returns {pass: (fn, grad_to_none)} for logits x and targets t, or raises to be skipped.


def make_gpuxent(backend_name: str):
    from gpuxent import backends

    module = backends.get(backend_name)

    def make(x, t):
        n_rows = x.shape[0]
        kw = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None)

        def fwd():
            loss, _ = module.cross_entropy(x, t, None, grad_scale=None, grad=None, **kw)
            return loss.mean()  # no ignored rows here: the mean is the public API's reduction

        def fwd_bwd():
            grad = torch.empty_like(x)
            loss, _ = module.cross_entropy(x, t, None, grad_scale=1.0 / n_rows, grad=grad, **kw)
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


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def run(args) -> dict:
    started = time.perf_counter()
    result = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "copy_gbps": round(copy_bandwidth_gbps(), 1),
        "rows": [],
        "skipped": [],
    }
    free_memory()
    impls = implementations(args)
    for n_rows, n_classes in parse_sizes(args.sizes):
        for dtype_name in args.dtypes.split(","):
            if time.perf_counter() - started > args.budget_s:
                result["skipped"].append(f"{n_rows}x{n_classes} {dtype_name}: over the time budget")
                continue
            dtype = DTYPES[dtype_name]
            x = torch.randn(n_rows, n_classes, device="cuda", dtype=dtype)
            t = torch.randint(0, n_classes, (n_rows,), device="cuda")
            times = {}
            for impl, make in impls.items():
                try:
                    fns = make(x, t)
                    for pass_ in PASSES:
                        fn, grad_to_none = fns[pass_]
                        times[(impl, pass_)] = median_ms(fn, grad_to_none)
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
                result["rows"].append(row)
            del x, t
            free_memory()
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def table(result: dict) -> str:
    v = result["versions"]
    lines = [
        f"{result['device']}  {result['date']}  " + "  ".join(f"{k} {val}" for k, val in v.items()),
        f"device-to-device copy: {result['copy_gbps']} GB/s",
        "",
        f"{'N x r':<16} {'dtype':>8} {'pass':>8} {'impl':>20} {'ms':>9} {'GB/s':>8} {'% copy':>7} {'triton x':>9}",
    ]
    for r in result["rows"]:
        speedup = f"{r['triton_speedup']:.2f}" if "triton_speedup" in r else ""
        lines.append(
            f"{r['n_rows']:>6} x {r['n_classes']:<7} {r['dtype']:>8} {r['pass']:>8} {r['impl']:>20} "
            f"{r['ms']:>9.3f} {r['gbps']:>8.0f} {r['pct_copy']:>6.1f}% {speedup:>9}"
        )
    lines += [f"skipped: {s}" for s in result["skipped"]]
    lines.append(f"({result['seconds']} s; 'triton x' = time of that row / time of gpuxent-triton)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default=DEFAULT_SIZES, help="comma-separated NxR, e.g. 16384x32768,65536x128")
    p.add_argument("--dtypes", default="bfloat16,float32", help=f"comma-separated, from {sorted(DTYPES)}")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--budget-s", type=float, default=240.0, help="start no new size after this many seconds")
    p.add_argument("--json-out", default=None, help="write the results as JSON to this path")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU", file=sys.stderr)
        return 2
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"--dtypes: unknown dtype {name!r}")
    result = run(args)
    print(table(result))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
