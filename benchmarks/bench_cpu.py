"""CPU benchmark: the fused cross-entropy against torch eager, torch.compile and JAX, in one run.

    python benchmarks/bench_cpu.py [--repeats 7] [--no-compile] [--no-jax] [--out benchmarks/results_cpu.json]
    python benchmarks/bench_cpu.py --distillation [--repeats 7]     (the distillation rows, see that section)
    python benchmarks/bench_cpu.py --stats     cross_entropy_with_stats rows only (results_stats_cpu.json)

Cases (mean reduction, class-index targets, logits ~ N(0, 2^2)):
    fwd                 gx.cross_entropy(x, t)                                   read N*r logits
    fwd+bwd             x.grad = None; gx.cross_entropy(x, t).backward()         read N*r + write N*r (a fresh gradient)
    in-place fwd+bwd    gx.cross_entropy_and_grad(x, t, inplace_grad=True)       read N*r + write N*r (over the logits)
The baselines run the same loss: ``F.cross_entropy`` eagerly and under ``torch.compile``, and
``jax.jit`` of ``optax.softmax_cross_entropy_with_integer_labels(x, t).mean()`` (``jax.value_and_grad``
of it for the backward) when jax and optax are importable. An in-place row is compared with the
baselines' fresh-gradient forward+backward: they have no in-place form. GB/s follow the byte model
above (the same for every implementation); % of copy divides them by the bandwidth of a large
``dst.copy_(src)`` (read + write) measured before and after the cases (the better of the two). Every
time is a median over repeats after a warm-up call. Run it on a quiet machine: on 2 cores, anything
else running halves the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform

import numpy as np
import torch
import torch.nn.functional as F

import gpuxent as gx
from gpuxent import backends, bench

# (N, r, dtype, pass): the rows of the table, in order
CASES = [
    (4096, 32768, torch.float32, "fwd"),
    (4096, 32768, torch.float32, "fwd+bwd"),
    (4096, 32768, torch.float32, "in-place fwd+bwd"),
    (4096, 32768, torch.bfloat16, "fwd"),
    (4096, 32768, torch.bfloat16, "fwd+bwd"),
    (65536, 128, torch.float32, "fwd"),
    (65536, 128, torch.float32, "fwd+bwd"),
    (16384, 4096, torch.float32, "fwd"),
    (16384, 4096, torch.float32, "fwd+bwd"),
    (256, 262144, torch.float32, "fwd"),
    (256, 262144, torch.float32, "fwd+bwd"),
]


def _torch_loss(x, t):
    return F.cross_entropy(x, t)


def _gpuxent_case(x, t, pass_):
    if pass_ == "fwd":
        return lambda: gx.cross_entropy(x, t)
    if pass_ == "in-place fwd+bwd":
        buf = x.clone()  # overwritten by the gradient at every call: a valid input again (finite logits)
        return lambda: gx.cross_entropy_and_grad(buf, t, inplace_grad=True)
    return _fwd_bwd(gx.cross_entropy, x, t)


def _fwd_bwd(loss_fn, x, t):
    xg = x.clone().requires_grad_()

    def step():
        xg.grad = None
        loss_fn(xg, t).backward()

    return step


def _torch_case(loss_fn, x, t, pass_):
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                return loss_fn(x, t)

        return fwd
    return _fwd_bwd(loss_fn, x, t)


def _jax_case(x, t, pass_):
    """``None`` where jax or optax is missing."""
    try:
        import jax
        import jax.numpy as jnp
        import optax
    except ImportError:
        return None
    dtype = jnp.bfloat16 if x.dtype == torch.bfloat16 else jnp.float32
    xj = jnp.asarray(x.float().numpy(), dtype=dtype)
    tj = jnp.asarray(t.numpy())

    def loss(v):
        return optax.softmax_cross_entropy_with_integer_labels(v, tj).mean()

    fn = jax.jit(loss if pass_ == "fwd" else jax.value_and_grad(loss))
    return lambda: jax.block_until_ready(fn(xj))


def run(repeats: int, compile_: bool, jax_: bool) -> dict:
    cpu = torch.device("cpu")
    copy_start = bench.copy_bandwidth(cpu)
    # one compiled graph per shape, dtype and grad mode: more than dynamo's default 8 recompiles, after
    # which it would silently run the rest eagerly (and the "compile" column would be eager's)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    compiled = torch.compile(_torch_loss, dynamic=False) if compile_ else None
    rows = []
    for n, r, dtype, pass_ in CASES:
        gen = torch.Generator().manual_seed(0)
        x = (torch.randn(n, r, generator=gen) * 2).to(dtype)
        t = torch.randint(0, r, (n,), generator=gen)
        elt = x.element_size()
        nbytes = n * r * elt * (1 if pass_ == "fwd" else 2)
        impls = {
            "gpuxent": _gpuxent_case(x, t, pass_),
            "eager": _torch_case(_torch_loss, x, t, pass_),
            "compile": _torch_case(compiled, x, t, pass_) if compiled else None,
            "jax": _jax_case(x, t, pass_) if jax_ else None,
        }
        ms = {}
        for name, fn in impls.items():
            if fn is not None:
                ms[name] = round(bench.time_ms(fn, repeats), 3)
                print(f"{n} x {r} {dtype} {pass_} {name}: {ms[name]:.2f} ms", flush=True)
        del impls
        gbps = nbytes / ms["gpuxent"] / 1e6
        row = {
            "n_rows": n, "n_classes": r, "dtype": str(dtype).replace("torch.", ""), "pass": pass_,
            "median_ms": ms, "gbps": round(gbps, 2),
            "speedup": {k: round(v / ms["gpuxent"], 2) for k, v in ms.items() if k != "gpuxent"},
        }  # fmt: skip
        rows.append(row)
    copy_end = bench.copy_bandwidth(cpu)
    copy_gbps = max(copy_start, copy_end)  # the better of the two: % of copy errs low, never high
    for row in rows:
        row["pct_copy"] = round(100 * row["gbps"] / copy_gbps, 1)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "machine": bench.machine(),
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_after": load,
        "copy_gbps": round(copy_gbps, 2),
        "copy_gbps_start_end": [round(copy_start, 2), round(copy_end, 2)],
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """The result as the markdown table of benchmarks/RESULTS.md."""

    def cell(row, key, fmt):
        v = row["median_ms"].get(key) if fmt == "ms" else row["speedup"].get(key)
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"Machine: {result['machine']}, {result['date']}, torch {result['torch']}, {result['threads']} threads, "
        f"copy bandwidth {result['copy_gbps']} GB/s (read + write; the better of {result['copy_gbps_start_end']} "
        "measured before and after the cases).",
        "",
        "| N x r | dtype | pass | gpuxent ms | GB/s | % of copy | eager ms | compile ms | JAX ms "
        "| x eager | x compile | x JAX |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['n_rows']} x {r['n_classes']} | {r['dtype']} | {r['pass']} | {r['median_ms']['gpuxent']:.2f} "
            f"| {r['gbps']:.1f} | {r['pct_copy']:.0f}% | {cell(r, 'eager', 'ms')} | {cell(r, 'compile', 'ms')} "
            f"| {cell(r, 'jax', 'ms')} | {cell(r, 'eager', 'x')} | {cell(r, 'compile', 'x')} | {cell(r, 'jax', 'x')} |"
        )
    return "\n".join(lines)


def goals(result: dict) -> list[str]:
    """The CPU goals, each with the number that decides it."""

    def row(n, r, dtype, pass_):
        return next(
            x for x in result["rows"] if (x["n_rows"], x["n_classes"], x["dtype"], x["pass"]) == (n, r, dtype, pass_)
        )

    inplace = row(4096, 32768, "float32", "in-place fwd+bwd")
    fresh = row(4096, 32768, "float32", "fwd+bwd")
    bf16 = row(4096, 32768, "bfloat16", "fwd+bwd")
    small_fwd = row(65536, 128, "float32", "fwd")
    small_bwd = row(65536, 128, "float32", "fwd+bwd")
    out = [
        f"4096 x 32768 in-place fwd+bwd: {inplace['pct_copy']:.0f}% of copy (goal >= 85%)",
        f"4096 x 32768 fresh fwd+bwd: {fresh['pct_copy']:.0f}% of copy (goal >= 60%), "
        f"{fresh['speedup'].get('compile', float('nan')):.2f}x torch.compile (goal >= 5)",
        f"65536 x 128 fwd: {small_fwd['speedup'].get('compile', float('nan')):.2f}x torch.compile (goal >= 1.5); "
        f"fwd+bwd {small_bwd['pct_copy']:.0f}% of copy (goal >= 50%)",
        f"4096 x 32768 bf16 fwd+bwd: {bf16['median_ms']['gpuxent'] / fresh['median_ms']['gpuxent']:.2f}x the "
        "float32 time (goal <= 0.6)",
    ]
    return out


def _calls(x, t, inplace: bool, n_calls=50):
    """``n_calls`` calls of the registered op (the door every public function goes through): the forward
    alone, or forward+backward with the gradient written over the logits (which stay in cache)."""
    from gpuxent import autograd

    args = (t, None, None, -100, 0.0, 0.0, 0.0, "numba_cpu")
    if inplace:
        return lambda: [autograd.cross_entropy_rows_(x, *args) for _ in range(n_calls)]
    return lambda: [autograd.cross_entropy_rows(x, *args, False) for _ in range(n_calls)]


def _empty(shape, dtype):
    """A gradient buffer from the backend's allocator (huge pages for large ones)."""
    return backends.empty("numba_cpu", shape, dtype, torch.device("cpu"))


def _fresh_fill(shape, dtype):
    return lambda: _empty(shape, dtype).fill_(1)


def diagnostics(repeats: int) -> list[str]:
    """Numbers that tell which limit a row hits: the kernel's compute rate with the logits in cache
    (no memory traffic: the compute floor), and the cost of a fresh gradient buffer's first touch
    (the page faults: the kernel zeroes every page)."""
    out = []
    for (n, r), dtype in (((256, 2048), torch.float32), ((256, 2048), torch.bfloat16), ((2048, 128), torch.float32)):
        x = (torch.randn(n, r) * 2).to(dtype)  # 2 MiB or less: stays in L2 + L3 between calls
        t = torch.randint(0, r, (n,))
        fwd, fwd_bwd = (bench.time_ms(_calls(x, t, g), repeats) / 50 / (n * r) * 1e6 for g in (False, True))
        out.append(
            f"compute floor, {str(dtype).replace('torch.', '')} rows of {r} in cache: fwd {fwd:.3f} ns/element, "
            f"fwd+bwd {fwd_bwd:.3f} ns/element"
        )
    sizes = (((4096, 32768), torch.float32), ((4096, 32768), torch.bfloat16), ((65536, 128), torch.float32))
    for shape, dtype in sizes:
        faulted = _empty(shape, dtype)
        faulted.fill_(0)
        fill = bench.time_ms(lambda f=faulted: f.fill_(1), repeats)
        fresh = bench.time_ms(_fresh_fill(shape, dtype), repeats)
        out.append(
            f"fresh gradient buffer {shape[0]} x {shape[1]} {str(dtype).replace('torch.', '')}: fill {fill:.1f} ms "
            f"once faulted, {fresh:.1f} ms fresh (first touch)"
        )
    return out


# --------------------------------------------------------------------------- distillation
# gx.distillation_loss(s, t, divergence=d, temperature=2).backward() against the PyTorch composition
# (log_softmax of both rows, then F.kl_div), forward+backward with a fresh student gradient.
# Byte model: bench.bytes_moved(..., op="distillation"): read N*r student + N*r teacher, write N*r gradient.
# Peak extra memory: VmHWM - VmRSS around one step (after a warm-up step, ``/proc/self/clear_refs``
# resets the high-water mark), every buffer the step allocates, the gradient included.

DISTILL_SIZE = (4096, 32768)
DISTILL_TEMPERATURE = 2.0
DISTILL_BETA = 0.5


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def peak_extra_mib(step, before) -> float | None:
    """Resident memory one call of ``step`` adds at its peak, from the state ``before()`` leaves (None where
    /proc cannot say)."""
    step()  # warm-up: compilation, and the allocator's first touch
    before()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to VmRSS
    except OSError:
        return None
    base = _status_kb("VmRSS")
    step()
    peak = _status_kb("VmHWM")
    return None if base is None or peak is None else round((peak - base) / 1024, 1)


def _distill_steps(xg, teacher, divergence) -> dict:
    """One forward+backward each of gpuxent and the composition, into a fresh ``xg.grad``."""

    def ours():
        xg.grad = None
        gx.distillation_loss(
            xg, teacher, divergence=divergence, beta=DISTILL_BETA, temperature=DISTILL_TEMPERATURE
        ).backward()

    def eager():
        xg.grad = None
        bench.torch_distillation(xg, teacher, divergence, DISTILL_BETA, DISTILL_TEMPERATURE).backward()

    return {"gpuxent": ours, "eager": eager}


def run_distillation(repeats: int) -> dict:
    n, r = DISTILL_SIZE
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(n, r, generator=gen) * 2
    teacher = torch.randn(n, r, generator=gen) * 2
    copy_start = bench.copy_bandwidth(torch.device("cpu"))
    nbytes = bench.bytes_moved(n, r, student.element_size(), "fwd+bwd", op="distillation")
    divergences = ("kl", "reverse_kl", "jsd")
    xg = student.clone().requires_grad_()
    ms = {d: {} for d in divergences}
    peak = {d: {} for d in divergences}
    # gpuxent's rows first: the composition's GiB of temporaries fragment memory, after which a fresh
    # gradient buffer may fault in 4 KiB pages instead of huge ones (3-4x slower to first touch)
    for name in ("gpuxent", "eager"):
        for d in divergences:
            step = _distill_steps(xg, teacher, d)[name]
            peak[d][name] = peak_extra_mib(step, lambda: setattr(xg, "grad", None))  # the gradient counts
            ms[d][name] = round(bench.time_ms(step, repeats), 3)
            print(f"distillation {d} {n} x {r} {name}: {ms[d][name]:.2f} ms, peak +{peak[d][name]} MiB", flush=True)
    rows = [
        {
            "divergence": d, "n_rows": n, "n_classes": r, "dtype": "float32", "pass": "fwd+bwd", "bytes": nbytes,
            "median_ms": ms[d], "gbps": round(nbytes / ms[d]["gpuxent"] / 1e6, 2),
            "speedup_vs_eager": round(ms[d]["eager"] / ms[d]["gpuxent"], 2), "peak_extra_mib": peak[d],
        }
        for d in divergences
    ]  # fmt: skip
    copy_gbps = max(copy_start, bench.copy_bandwidth(torch.device("cpu")))
    for row in rows:
        row["pct_copy"] = round(100 * row["gbps"] / copy_gbps, 1)
        # the time of one pass over N*r elements at copy speed (read + write counted): bytes / copy bandwidth
        row["passes_at_copy_speed"] = round(row["median_ms"]["gpuxent"] * copy_gbps * 1e6 / (n * r * 4), 2)
    return {
        "machine": bench.machine(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "temperature": DISTILL_TEMPERATURE,
        "beta": DISTILL_BETA,
        "copy_gbps": round(copy_gbps, 2),
        "rows": rows,
    }


def distillation_markdown(result: dict) -> str:
    lines = [
        f"Machine: {result['machine']}, {result['date']}, torch {result['torch']}, {result['threads']} threads, "
        f"copy bandwidth {result['copy_gbps']} GB/s (read + write). fwd+bwd, temperature {result['temperature']}, "
        f"jsd beta {result['beta']}; bytes = read student + read teacher + write gradient.",
        "",
        "| N x r | divergence | gpuxent ms | GB/s | % of copy | N*r passes at copy speed | eager ms | x eager "
        "| peak extra MiB gpuxent | peak extra MiB eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['n_rows']} x {r['n_classes']} | {r['divergence']} | {r['median_ms']['gpuxent']:.1f} "
            f"| {r['gbps']:.1f} | {r['pct_copy']:.0f}% | {r['passes_at_copy_speed']:.2f} "
            f"| {r['median_ms']['eager']:.1f} | {r['speedup_vs_eager']:.2f} "
            f"| {r['peak_extra_mib']['gpuxent']} | {r['peak_extra_mib']['eager']} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- statistics (--stats)
# cross_entropy_with_stats against plain cross_entropy and the PyTorch composition that logs the same
# numbers (F.cross_entropy + argmax accuracy + the entropy from log_softmax), 4096 x 32768 float32, mean,
# class targets. Byte model (gpuxent.bench.bytes_moved): fwd reads the logits once; fwd+bwd reads them
# and writes the gradient; with a differentiable entropy the backward reads them once more (3 N*r).

STATS_SIZE = (4096, 32768)
ENTROPY_BETA = 0.1  # the objective with entropy: loss - beta * entropy (an RL entropy bonus)


def _torch_stats(x, t, entropy: bool):
    """The PyTorch composition: ``(objective, accuracy)``."""
    if not entropy:
        return F.cross_entropy(x, t), (x.detach().argmax(-1) == t).float().mean()
    logp = F.log_softmax(x, -1)
    ent = -(logp.exp() * logp).sum(-1).mean()
    return F.nll_loss(logp, t) - ENTROPY_BETA * ent, (x.detach().argmax(-1) == t).float().mean()


def _gx_stats(x, t, entropy: bool):
    out = gx.cross_entropy_with_stats(x, t, entropy=entropy)
    return (out.loss - ENTROPY_BETA * out.entropy if entropy else out.loss), out.accuracy


def _stats_case(fn, x, t, pass_):
    """``(step, reset)``: a step of ``fn(x, t) -> (objective, accuracy)`` (``fn`` None: plain
    ``gx.cross_entropy``), and what frees the previous step's gradient."""
    entropy = "entropy" in pass_
    call = (lambda v: (gx.cross_entropy(v, t), None)) if fn is None else (lambda v: fn(v, t, entropy))
    if pass_ == "fwd":

        def fwd():
            with torch.no_grad():
                return call(x)

        return fwd, lambda: None
    xg = x.clone().requires_grad_()

    def step():
        xg.grad = None
        objective, accuracy = call(xg)
        objective.backward()
        return accuracy

    def reset():
        xg.grad = None

    return step, reset


def run_stats(repeats: int) -> dict:
    n, r = STATS_SIZE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, r, generator=gen) * 2
    t = torch.randint(0, r, (n,), generator=gen)
    cases = [
        ("fwd", "gpuxent cross_entropy", None),
        ("fwd", "gpuxent with_stats", _gx_stats),
        ("fwd", "torch composition", _torch_stats),
        ("fwd+bwd", "gpuxent cross_entropy", None),
        ("fwd+bwd", "gpuxent with_stats", _gx_stats),
        ("fwd+bwd", "torch composition", _torch_stats),
        ("fwd+bwd entropy", "gpuxent with_stats", _gx_stats),
        ("fwd+bwd entropy", "torch composition", _torch_stats),
    ]
    cpu = torch.device("cpu")
    copy_gbps = bench.copy_bandwidth(cpu)
    rows = []
    for pass_, impl, fn in cases:
        step, reset = _stats_case(fn, x, t, pass_)
        ms = bench.time_ms(step, repeats)
        peak = peak_extra_mib(step, reset)
        gbps = bench.bytes_moved(n, r, x.element_size(), pass_) / ms / 1e6
        rows.append({
            "pass": pass_, "impl": impl, "median_ms": round(ms, 2), "gbps": round(gbps, 2),
            "pct_copy": round(100 * gbps / copy_gbps, 1), "peak_extra_mib": peak,
        })  # fmt: skip
        print(rows[-1], flush=True)
        del step, reset
        gc.collect()
    for row in rows:
        same = [o for o in rows if o["pass"] == row["pass"]]
        plain_pass = row["pass"].replace(" entropy", "")  # the entropy row against plain fwd+bwd
        base = next(o for o in rows if o["impl"] == "gpuxent cross_entropy" and o["pass"] == plain_pass)
        torch_row = next(o for o in same if o["impl"] == "torch composition")
        row["x_cross_entropy"] = round(row["median_ms"] / base["median_ms"], 2)
        row["torch_speedup"] = round(torch_row["median_ms"] / row["median_ms"], 2)
    return {
        "machine": bench.machine(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": [n, r],
        "dtype": "float32",
        "copy_gbps": round(copy_gbps, 2),
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "rows": rows,
    }


def stats_markdown(result: dict) -> str:
    n, r = result["size"]
    lines = [
        f"Machine: {result['machine']}, {result['date']}, torch {result['torch']}, {result['threads']} threads, "
        f"{n} x {r} {result['dtype']}, mean, class targets; copy bandwidth {result['copy_gbps']} GB/s.",
        "",
        "| pass | implementation | median ms | GB/s | % of copy | peak extra MiB | x cross_entropy "
        "| torch composition x |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['pass']} | {row['impl']} | {row['median_ms']:.2f} | {row['gbps']:.1f} | {row['pct_copy']:.0f}% "
            f"| {row['peak_extra_mib']} | {row['x_cross_entropy']:.2f} | {row['torch_speedup']:.2f} |"
        )
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--no-jax", action="store_true", help="skip the JAX baseline")
    p.add_argument("--out", default=str(pathlib.Path(__file__).with_name("results_cpu.json")))
    p.add_argument(
        "--distillation", action="store_true", help="the distillation rows only (to results_distillation_cpu.json)"
    )
    p.add_argument(
        "--stats", action="store_true", help="only the cross_entropy_with_stats rows (results_stats_cpu.json)"
    )
    args = p.parse_args()
    if args.stats:
        result = run_stats(args.repeats)
        pathlib.Path(args.out).with_name("results_stats_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
        print(stats_markdown(result))
        return
    if args.distillation:
        result = run_distillation(args.repeats)
        path = pathlib.Path(__file__).with_name("results_distillation_cpu.json")
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(distillation_markdown(result))
        return
    result = run(args.repeats, not args.no_compile, not args.no_jax)
    result["goals"] = goals(result)
    result["diagnostics"] = diagnostics(args.repeats)
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print("\n" + "\n".join(result["goals"]))
    print("\n" + "\n".join(result["diagnostics"]))


if __name__ == "__main__":
    main()
