"""The differential matrix: every public differentiable function x backend x dtype x reduction x
upstream gradient x keywords x autograd mode, against float64 PyTorch.

The full product is tens of thousands of cases; the suite runs a pairwise cover of it (every pair of
values of any two axes meets in at least one case), drawn from a seed that the test prints.
``GPUXENT_TEST_SEED=<seed>`` replays a run; ``GPUXENT_MATRIX_CASES=<n>`` asks for more cases than the cover.

Upstream gradients are the ones real code hands a loss: unit (``backward()``), a random dense tensor,
an expanded stride-0 tensor (``torch.ones(()).expand(N)``), a non-contiguous view, ``.sum()`` (whose
backward is an expanded 1) and a mask multiply (``(loss * mask).sum()``, the per-token mask of LM
trainers). Modes: ``backward``, ``create_graph`` (the gradient of a function of the gradient),
``jvp`` (forward mode), ``grad`` (``torch.func.grad``) and ``vmap`` (``torch.func.vmap`` of the loss).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import astuple, dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOL, _cases
from reference import torch_cross_entropy

import gpuxent as gx

BACKENDS = [p.values[0] for p in _cases() if not p.marks]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
UPSTREAMS = ["unit", "dense", "expanded", "strided", "sum", "mask"]
MODES = ["backward", "create_graph", "jvp", "grad", "vmap"]
KEYSETS = [0, 1, 2]  # each function's keyword sets, below: 0 plain, 1 and 2 every keyword between them


# --------------------------------------------------------------------------- the functions


def _entropy_rows(y, kept):
    lp = torch.log_softmax(y, -1)
    return torch.where(kept, -(lp.exp() * lp).sum(-1), 0)


def _reduce_kept(rows, kept, reduction):
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / kept.sum()


@dataclass
class Inputs:
    x: torch.Tensor  # the differentiable input
    extra: dict  # everything else (targets, weights, teacher logits, W)
    kw: dict  # keywords


def _ce_keywords(k, r, rng, dtype, device):
    if k == 0:
        return {}, False
    if k == 1:
        w = torch.as_tensor(rng.random(r) + 0.2, dtype=dtype, device=device)
        return {"weight": w, "label_smoothing": 0.1, "z_loss": 1e-2}, True
    return {"softcap": 3.0, "z_loss": 1e-3, "label_smoothing": 0.05}, True


class CE:
    """cross_entropy, class targets with ignored rows."""

    name = "cross_entropy"
    reductions = ("mean", "sum", "none")

    def make(self, rng, dtype, device, k):
        n, r = 6, 37
        x = torch.as_tensor(rng.standard_normal((n, r)) * 3, dtype=dtype, device=device)
        t = torch.as_tensor(rng.integers(0, r, n), device=device)
        kw, ignore = _ce_keywords(k, r, rng, dtype, device)
        if ignore:
            t[0] = -100
        return Inputs(x, {"target": t}, kw)

    def ours(self, x, inp, reduction, backend):
        return gx.cross_entropy(x, inp.extra["target"], reduction=reduction, backend=backend, **inp.kw)

    def ref(self, x, inp, reduction):
        kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.kw.items()}
        return torch_cross_entropy(x, inp.extra["target"], reduction=reduction, **kw)


class CEProb(CE):
    """cross_entropy with probability targets."""

    name = "cross_entropy[prob]"

    def make(self, rng, dtype, device, k):
        inp = super().make(rng, dtype, device, k)
        n, r = inp.x.shape
        q = torch.softmax(torch.as_tensor(rng.standard_normal((n, r)) * 2), -1)
        inp.extra["target"] = q.to(dtype).to(device)
        return inp

    def ref(self, x, inp, reduction):
        kw = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inp.kw.items()}
        return torch_cross_entropy(x, inp.extra["target"].double(), reduction=reduction, **kw)


class Stats(CE):
    """cross_entropy_with_stats(entropy=True): loss + 0.5 entropy, both differentiable."""

    name = "cross_entropy_with_stats"

    def ours(self, x, inp, reduction, backend):
        o = gx.cross_entropy_with_stats(
            x, inp.extra["target"], reduction=reduction, backend=backend, entropy=True, **inp.kw
        )
        return o.loss + 0.5 * o.entropy

    def ref(self, x, inp, reduction):
        t = inp.extra["target"]
        cap = inp.kw.get("softcap")
        y = cap * torch.tanh(x / cap) if cap else x
        kept = t != -100
        return super().ref(x, inp, reduction) + 0.5 * _reduce_kept(_entropy_rows(y, kept), kept, reduction)


class Distill:
    name = "distillation_loss"
    reductions = ("batchmean", "sum", "mean", "none")

    def make(self, rng, dtype, device, k):
        n, r = 6, 37
        x = torch.as_tensor(rng.standard_normal((n, r)) * 2, dtype=dtype, device=device)
        teacher = torch.as_tensor(rng.standard_normal((n, r)) * 2, dtype=dtype, device=device)
        t = torch.as_tensor(rng.integers(0, r, n), device=device)
        t[1] = -100
        kw = [{}, {"divergence": "reverse_kl", "temperature": 2.0, "target": t},
              {"divergence": "jsd", "beta": 0.3, "temperature": 0.7}][k]  # fmt: skip
        return Inputs(x, {"teacher": teacher}, kw)

    def ours(self, x, inp, reduction, backend):
        return gx.distillation_loss(x, inp.extra["teacher"], reduction=reduction, backend=backend, **inp.kw)

    def ref(self, x, inp, reduction):
        kw = inp.kw
        tau, div, beta = kw.get("temperature", 1.0), kw.get("divergence", "kl"), kw.get("beta", 0.5)
        ls = torch.log_softmax(x / tau, -1)
        lt = torch.log_softmax(inp.extra["teacher"].double() / tau, -1)
        if div == "kl":
            rows = (lt.exp() * (lt - ls)).sum(-1)
        elif div == "reverse_kl":
            rows = (ls.exp() * (ls - lt)).sum(-1)
        else:
            lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log1p(-beta)]), 0)
            rows = beta * (lt.exp() * (lt - lm)).sum(-1) + (1 - beta) * (ls.exp() * (ls - lm)).sum(-1)
        rows = rows * tau**2
        kept = torch.ones(x.shape[0], dtype=torch.bool) if "target" not in kw else kw["target"].cpu() != -100
        rows = torch.where(kept, rows, 0)
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / (kept.sum() * (x.shape[1] if reduction == "mean" else 1))


class Linear:
    """linear_cross_entropy, differentiated in ``hidden`` (the weight's gradient is checked in backward)."""

    name = "linear_cross_entropy"
    reductions = ("mean", "sum", "none")

    def make(self, rng, dtype, device, k):
        n, d, r = 6, 8, 37
        h = torch.as_tensor(rng.standard_normal((n, d)), dtype=dtype, device=device)
        w = torch.as_tensor(rng.standard_normal((r, d)) * 0.5, dtype=dtype, device=device)
        b = torch.as_tensor(rng.standard_normal(r) * 0.1, dtype=dtype, device=device)
        t = torch.as_tensor(rng.integers(0, r, n), device=device)
        kw, ignore = _ce_keywords(k, r, rng, dtype, device)
        if "weight" in kw:
            kw["ce_weight"] = kw.pop("weight")
        if ignore:
            t[0] = -100
        kw["chunk_size"] = 4  # two chunks, the second short
        return Inputs(h, {"weight": w, "bias": b if k == 2 else None, "target": t}, kw)

    def ours(self, x, inp, reduction, backend):
        e = inp.extra
        return gx.linear_cross_entropy(x, e["weight"], e["target"], e["bias"], reduction=reduction, backend=backend,
                                       **inp.kw)  # fmt: skip

    def logits64(self, x, inp):
        e = inp.extra
        return F.linear(x, e["weight"].double(), None if e["bias"] is None else e["bias"].double())

    def ref(self, x, inp, reduction):
        kw = {("weight" if k == "ce_weight" else k): (v.double() if isinstance(v, torch.Tensor) else v)
              for k, v in inp.kw.items() if k != "chunk_size"}  # fmt: skip
        return torch_cross_entropy(self.logits64(x, inp), inp.extra["target"], reduction=reduction, **kw)


class LinearStats(Linear):
    name = "linear_cross_entropy_with_stats"

    def ours(self, x, inp, reduction, backend):
        e = inp.extra
        o = gx.linear_cross_entropy_with_stats(
            x, e["weight"], e["target"], e["bias"], reduction=reduction, backend=backend, entropy=True, **inp.kw
        )
        return o.loss + 0.5 * o.entropy

    def ref(self, x, inp, reduction):
        y = self.logits64(x, inp)
        cap = inp.kw.get("softcap")
        y = cap * torch.tanh(y / cap) if cap else y
        kept = inp.extra["target"] != -100
        return super().ref(x, inp, reduction) + 0.5 * _reduce_kept(_entropy_rows(y, kept), kept, reduction)


class BCELogits:
    name = "binary_cross_entropy_with_logits"
    reductions = ("mean", "sum", "none")

    def make(self, rng, dtype, device, k):
        n, c = 6, 5
        x = torch.as_tensor(rng.standard_normal((n, c)) * 2, dtype=dtype, device=device)
        y = torch.as_tensor(rng.random((n, c)), dtype=dtype, device=device)
        kw = [{}, {"weight": torch.as_tensor(rng.random(c) + 0.5, dtype=dtype, device=device)},
              {"pos_weight": torch.as_tensor(rng.random(c) + 0.5, dtype=dtype, device=device)}][k]  # fmt: skip
        return Inputs(x, {"target": y}, kw)

    def ours(self, x, inp, reduction, backend):
        return gx.binary_cross_entropy_with_logits(x, inp.extra["target"], reduction=reduction, **inp.kw)

    def ref(self, x, inp, reduction):
        kw = {k: v.double() for k, v in inp.kw.items()}
        return F.binary_cross_entropy_with_logits(x, inp.extra["target"].double(), reduction=reduction, **kw)


class BCE(BCELogits):
    name = "binary_cross_entropy"

    def make(self, rng, dtype, device, k):
        inp = super().make(rng, dtype, device, min(k, 1))
        inp.x = torch.sigmoid(inp.x.double()).clamp(0.02, 0.98).to(dtype)
        return inp

    def ours(self, x, inp, reduction, backend):
        return gx.binary_cross_entropy(x, inp.extra["target"], reduction=reduction, **inp.kw)

    def ref(self, x, inp, reduction):
        kw = {k: v.double() for k, v in inp.kw.items()}
        return F.binary_cross_entropy(x, inp.extra["target"].double(), reduction=reduction, **kw)


class Softmax:
    """softmax / log_softmax (the keyword set picks the function and the axis); "reduction" none only."""

    name = "softmax"
    reductions = ("none",)

    def make(self, rng, dtype, device, k):
        x = torch.as_tensor(rng.standard_normal((5, 7)) * 3, dtype=dtype, device=device)
        return Inputs(x, {}, {"log": k != 1, "axis": 0 if k == 2 else -1})

    def ours(self, x, inp, reduction, backend):
        fn = gx.log_softmax if inp.kw["log"] else gx.softmax
        return fn(x, axis=inp.kw["axis"], backend=backend)

    def ref(self, x, inp, reduction):
        fn = torch.log_softmax if inp.kw["log"] else torch.softmax
        return fn(x, inp.kw["axis"])


FUNCTIONS = [CE(), CEProb(), Stats(), Distill(), Linear(), LinearStats(), BCELogits(), BCE(), Softmax()]


# --------------------------------------------------------------------------- the cover


@dataclass(frozen=True)
class Case:
    fn: int
    backend: int
    dtype: int
    reduction: int  # an index into the function's reductions (mod their number)
    upstream: int
    keys: int
    mode: int

    def __str__(self):
        f = FUNCTIONS[self.fn]
        return (f"{f.name}-{BACKENDS[self.backend].name}-{str(DTYPES[self.dtype])[6:]}-"
                f"{f.reductions[self.reduction % len(f.reductions)]}-{UPSTREAMS[self.upstream]}-k{self.keys}-"
                f"{MODES[self.mode]}")  # fmt: skip


AXES = [len(FUNCTIONS), len(BACKENDS), len(DTYPES), 4, len(UPSTREAMS), len(KEYSETS), len(MODES)]


def pairwise_cover(seed: int, extra: int = 0) -> list[Case]:
    """Cases, greedy, until every pair of values of every two axes appears in one (plus ``extra``
    random cases): each step keeps the best of 40 random candidates."""
    rng = np.random.default_rng(seed)
    uncovered = {
        (a, va, b, vb)
        for a, b in itertools.combinations(range(len(AXES)), 2)
        for va in range(AXES[a])
        for vb in range(AXES[b])
    }
    cases = []
    while uncovered:
        best, gain = None, -1
        # start every candidate from an uncovered pair, so each step covers at least one
        pairs = list(uncovered)
        for _ in range(40):
            a, va, b, vb = pairs[rng.integers(len(pairs))]
            c = [int(rng.integers(n)) for n in AXES]
            c[a], c[b] = va, vb
            g = sum((i, c[i], j, c[j]) in uncovered for i, j in itertools.combinations(range(len(AXES)), 2))
            if g > gain:
                best, gain = c, g
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(AXES)), 2)}
        cases.append(Case(*best))
    cases += [Case(*(int(rng.integers(n)) for n in AXES)) for _ in range(extra)]
    return cases


# pytest-xdist workers collect the same cases: one seed per run, from the run's shared id
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
SEED = int(
    os.environ.get("GPUXENT_TEST_SEED") or (int(_RUN[:8], 16) if _RUN else np.random.SeedSequence().entropy % (2**32))
)
CASES = pairwise_cover(SEED, int(os.environ.get("GPUXENT_MATRIX_CASES", "0")))


# --------------------------------------------------------------------------- one case


def _upstream(kind: str, out: torch.Tensor, rng) -> torch.Tensor:
    """The scalar whose gradient is taken: ``out`` under the upstream gradient ``kind``."""
    if out.dim() == 0 or kind == "sum":
        factor = 1.0 if kind in ("unit", "sum", "expanded") else float(rng.random() + 0.5)
        return out.sum() * factor
    shape, dev = out.shape, out.device
    if kind == "unit":
        go = torch.ones(shape, device=dev)
    elif kind == "dense":
        go = torch.as_tensor(rng.random(shape) + 0.5, device=dev)
    elif kind == "expanded":
        go = torch.tensor(0.75, device=dev).expand(shape)
    elif kind == "strided":
        go = torch.as_tensor(rng.random((*shape[:-1], 2 * shape[-1])) + 0.5, device=dev)[..., ::2]
    else:  # mask
        go = torch.as_tensor(rng.random(shape) < 0.6, device=dev)
    return (out * go.to(out.dtype)).sum()


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matrix(case: Case):
    print(f"matrix seed: {SEED} (GPUXENT_TEST_SEED={SEED} replays it)")
    f = FUNCTIONS[case.fn]
    backend = BACKENDS[case.backend]
    dtype = DTYPES[case.dtype]
    reduction = f.reductions[case.reduction % len(f.reductions)]
    upstream, mode = UPSTREAMS[case.upstream], MODES[case.mode]
    rng = np.random.default_rng([SEED, *case.__dict__.values()])
    inp = f.make(rng, dtype, backend.device, KEYSETS[case.keys])
    rtol, atol = TOL[dtype]
    scale = 4.0 if mode != "backward" else 1.0

    def close(actual, expected, what):
        a, e = actual.detach().cpu().double(), expected.detach().cpu().double()
        torch.testing.assert_close(a, e, rtol=rtol * scale, atol=atol * scale, equal_nan=True,
                                   msg=lambda m: f"{case}: {what}: {m}")  # fmt: skip

    def ours(x):
        return f.ours(x, inp, reduction, backend.name)

    def ref(x):
        return f.ref(x, inp, reduction)

    x64 = inp.x.detach().cpu().double()
    up_rng = lambda: np.random.default_rng([SEED, 7])  # the same upstream for ours and the reference  # noqa: E731
    if mode in ("backward", "create_graph"):
        x = inp.x.detach().requires_grad_()
        xr = x64.clone().requires_grad_()
        out, out_ref = ours(x), ref(xr)
        close(out, out_ref, "value")
        if mode == "backward":
            _upstream(upstream, out, up_rng()).backward()
            _upstream(upstream, out_ref, up_rng()).backward()
            close(x.grad, xr.grad, "gradient")
            return
        (g,) = torch.autograd.grad(_upstream(upstream, out, up_rng()), x, create_graph=True)
        (g_ref,) = torch.autograd.grad(_upstream(upstream, out_ref, up_rng()), xr, create_graph=True)
        close(g, g_ref, "gradient")
        v = torch.as_tensor(rng.standard_normal(x.shape))
        (g.double() * v.to(g.device)).sum().backward()
        (g_ref * v).sum().backward()
        close(x.grad, xr.grad, "second derivative")
    elif mode == "jvp":
        v = torch.as_tensor(rng.standard_normal(x64.shape))
        _, t = torch.func.jvp(ours, (inp.x,), (v.to(dtype).to(backend.device),))
        _, t_ref = torch.func.jvp(ref, (x64,), (v.to(dtype).double(),))
        close(t, t_ref, "tangent")
    elif mode == "grad":
        g = torch.func.grad(lambda x: _upstream(upstream, ours(x), up_rng()))(inp.x)
        g_ref = torch.func.grad(lambda x: _upstream(upstream, ref(x), up_rng()))(x64)
        close(g, g_ref, "torch.func.grad")
    else:  # vmap over a batch of two inputs
        other = f.make(np.random.default_rng([SEED, 1]), dtype, backend.device, 0).x
        xb = torch.stack([inp.x, other.to(inp.x.dtype)])
        close(torch.func.vmap(ours)(xb), torch.func.vmap(ref)(xb.cpu().double()), "vmap")


def test_cover_is_pairwise():
    """The cover meets every pair of values of every two axes (the property the matrix rests on)."""
    cases = pairwise_cover(SEED)
    for a, b in itertools.combinations(range(len(AXES)), 2):
        seen = {(astuple(c)[a], astuple(c)[b]) for c in cases}
        assert len(seen) == AXES[a] * AXES[b], (a, b)
