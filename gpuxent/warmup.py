"""Compile every kernel variant ahead of time (``gpuxent warmup``), for people who build images.

numba compiles a CPU kernel on its first call for each dtype (30-40 s each) and keeps it in its disk
cache, so a later process loads it in about a second. Calling every public function once per dtype on
a tiny input, in every mode that reaches another kernel (gradient or not, in place, probability
targets, statistics, each divergence, the vocab-parallel passes), fills that cache.
"""

from __future__ import annotations

import time

import torch

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _calls(dtype: torch.dtype, backend: str | None):
    import gpuxent as gx
    from gpuxent import autograd, backends

    n, r = 4, 5
    kw = {"backend": backend}

    def x():
        return torch.randn(n, r, dtype=dtype)

    t = torch.tensor([0, 1, -100, 4])
    q = torch.softmax(torch.randn(n, r), -1).to(dtype)
    yield "cross_entropy", lambda: gx.cross_entropy(x(), t, **kw)
    yield "cross_entropy backward", lambda: gx.cross_entropy(x().requires_grad_(), t, **kw).backward()
    yield "cross_entropy in place", lambda: gx.cross_entropy_and_grad(x(), t, inplace_grad=True, **kw)
    yield "probability targets", lambda: gx.cross_entropy_and_grad(x(), q, **kw)
    yield "statistics", lambda: gx.cross_entropy_with_stats(x().requires_grad_(), t, **kw).loss.backward()
    yield "entropy", lambda: gx.cross_entropy_with_stats(x().requires_grad_(), t, entropy=True, **kw).entropy.backward()
    yield "softmax", lambda: (gx.softmax(x(), **kw), gx.log_softmax(x(), **kw))
    for div in ("kl", "reverse_kl", "jsd"):
        yield (
            f"distillation {div}",
            lambda div=div: gx.distillation_loss(x().requires_grad_(), x(), divergence=div, **kw).backward(),
        )

    def probs():
        return torch.rand(n, r, dtype=dtype)

    yield "bce", lambda: gx.binary_cross_entropy(probs().requires_grad_(), probs()).backward()
    yield "bce with logits", lambda: gx.binary_cross_entropy_with_logits(x().requires_grad_(), probs()).backward()
    name = backends.select(torch.device("cpu"), backend)
    yield "vocab-parallel partials", lambda: autograd.row_partials(x(), t, None, -100, 0.0, 0, True, name)
    lse = torch.zeros(n, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    coef = torch.ones_like(lse)
    yield (
        "vocab-parallel backward",
        lambda: autograd.cross_entropy_backward(x(), t, None, lse, coef, None, None, None, -100, 0.0, r, 0, 0.0, name),
    )


def warmup(dtypes=DTYPES, backend: str | None = None, log=print) -> float:
    """Run every kernel variant once per dtype on CPU data; returns the seconds it took."""
    start = time.perf_counter()
    for dtype in dtypes:
        t0 = time.perf_counter()
        for _name, call in _calls(dtype, backend):
            call()
        log(f"{str(dtype).removeprefix('torch.')}: ready in {time.perf_counter() - t0:.1f} s")
    return time.perf_counter() - start
