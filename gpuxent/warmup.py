"""Compile every CPU kernel variant ahead of time (``gpuxent warmup``), for people who build images.

numba compiles a CPU kernel variant on its first call for each dtype (2-4 s each; a variant is one
combination of the flags a call needs: probability targets, softcap, statistics, gradient, in place,
divergence...) and keeps it in its disk cache, so a later process loads it in milliseconds. This
calls the numba_cpu backend's door once per variant and dtype on a tiny input, which fills that cache;
``jobs`` processes compile in parallel.
"""

from __future__ import annotations

import itertools
import multiprocessing
import time

import torch

from .backends.torch_ops import DIVERGENCES

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _calls(dtype: torch.dtype):
    """``(name, call)`` for every kernel variant of numba_cpu in ``dtype``: each call reaches one."""
    from gpuxent.backends import numba_cpu as nc

    n, r = 4, 5
    dt = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.tensor([0, 1, -100, 4])
    q = torch.softmax(torch.randn(n, r), -1).to(dt)
    kw = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, grad_scale=None)

    def x():
        return torch.randn(n, r).to(dtype)

    flags = itertools.product((False, True), (None, 2.0), (False, True), ("none", "new", "inplace"))
    for prob, cap, stats, grad in flags:

        def ce(prob=prob, cap=cap, stats=stats, grad=grad):
            logits = x()
            g = {"none": None, "new": torch.empty_like(logits), "inplace": logits}[grad]
            s = (torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=dt)) if stats else None
            nc.cross_entropy(logits, q if prob else t, None, softcap=cap, grad=g, stats=s, **kw)

        yield f"cross_entropy prob={prob} softcap={cap} stats={stats} grad={grad}", ce
    for prob, cap in itertools.product((False, True), (None, 2.0)):
        out = torch.empty(n, nc.N_PARTIALS, dtype=dt)
        yield (
            f"row_partials prob={prob} softcap={cap}",
            lambda prob=prob, cap=cap, out=out: nc.row_partials(
                x(), q if prob else t, None, ignore_index=-100, softcap=cap, class_offset=0, smoothing=False, out=out
            ),
        )
    lse, coef, ent = torch.zeros(n, dtype=dt), torch.ones(n, dtype=dt), torch.zeros(n, dtype=dt)
    for prob, cap, entropy, inplace in itertools.product((False, True), (None, 2.0), (False, True), (False, True)):

        def backward(prob=prob, cap=cap, entropy=entropy, inplace=inplace):
            logits = x()
            nc.cross_entropy_backward(
                logits, q if prob else t, None, lse, coef, ent if entropy else None, ignore_index=-100,
                label_smoothing=0.0, n_classes=r, class_offset=0, softcap=cap, grad_scale=None,
                entropy_scale=None, grad=logits if inplace else torch.empty_like(logits),
            )  # fmt: skip

        yield f"cross_entropy_backward prob={prob} softcap={cap} entropy={entropy} inplace={inplace}", backward
    for div, grad in itertools.product(DIVERGENCES, (False, True)):
        yield f"distillation {div} grad={grad}", lambda div=div, grad=grad: nc.distillation(
            x(), x(), t, divergence=div, beta=0.5, temperature=2.0, ignore_index=-100, grad_scale=None,
            grad=torch.empty(n, r, dtype=dtype) if grad else None,
        )  # fmt: skip
    yield "softmax", lambda: (nc.softmax(x(), log=False), nc.softmax(x(), log=True))
    p, y = torch.rand(n, r).to(dtype), torch.rand(n, r).to(dt)
    yield "bce", lambda: nc.binary_cross_entropy(p, y, None, grad=torch.empty(n, r, dtype=dt))
    yield (
        "bce with logits",
        lambda: nc.binary_cross_entropy_with_logits(p, y, None, None, grad=torch.empty(n, r, dtype=dt)),
    )


def _warm(dtype: torch.dtype) -> float:
    from gpuxent.backends.numba_cpu import runtime

    runtime.COMPILE_NOTICE_S = None  # compiling is what was asked for: no notice per variant
    t0 = time.perf_counter()
    for _name, call in _calls(dtype):
        call()
    return time.perf_counter() - t0


def warmup(dtypes=DTYPES, jobs: int = 1, log=print) -> float:
    """Compile every kernel variant for each dtype (``jobs`` dtypes at once, in forked processes);
    returns the seconds it took."""
    start = time.perf_counter()
    if jobs > 1 and len(dtypes) > 1:
        with multiprocessing.get_context("fork").Pool(min(jobs, len(dtypes))) as pool:
            seconds = pool.map(_warm, dtypes)
    else:
        seconds = [_warm(d) for d in dtypes]
    for dtype, s in zip(dtypes, seconds):
        log(f"{str(dtype).removeprefix('torch.')}: ready in {s:.1f} s")
    return time.perf_counter() - start
