"""The vocab-parallel backend functions on every backend, through their registered ops: a slice of the
classes reduced to per-row partials (``row_partials``), and the slice's gradient from the global lse and
coefficient (``cross_entropy_backward``, with the entropy term of ``cross_entropy_with_stats``), against
float64 PyTorch on the full vocabulary."""

import pytest
import torch
from reference import KEYWORDS, PROB_KEYWORDS, assert_close, torch_cross_entropy

from gpuxent.autograd import cross_entropy_backward, cross_entropy_backward_, row_partials
from gpuxent.backends import compute_dtype

CASES = {**KEYWORDS, **PROB_KEYWORDS}
N_ROWS, N_CLASSES = 9, 150
# (lo, hi) of the local slice: inside, at the start, at the end, empty
SLICES = [(40, 117), (0, 61), (97, 150), (70, 70)]
DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# The interpreters (a Python thread per simulated GPU thread) run the keyword sets that cover every
# branch, in float32.
INTERPRETED = ("plain", "smoothing+weight+ignore", "all", "prob+all")


def _skip_interpreted(backend, name, dtype):
    if backend.interpreted and (name not in INTERPRETED or dtype != torch.float32):
        pytest.skip("the interpreters run the keyword sets of INTERPRETED in float32")


def _inputs(rng, opts, dtype):
    x = torch.as_tensor(rng.standard_normal((N_ROWS, N_CLASSES)) * 3).to(dtype).double()
    x[2, 5] = -torch.inf  # a -inf logit is a 0 probability, not a NaN
    if opts.get("prob"):
        target = torch.softmax(torch.as_tensor(rng.standard_normal((N_ROWS, N_CLASSES)) * 2), -1)
    else:
        target = torch.as_tensor(rng.integers(0, N_CLASSES, N_ROWS))
        target[1] = 45  # a target in each slice
        target[3] = 100
        target[4] = 0
        if opts.get("ignore"):
            target[0] = -100
            target[torch.as_tensor(rng.random(N_ROWS) < 0.2)] = -100
    weight = torch.as_tensor(rng.random(N_CLASSES) + 0.1) if opts.get("weight") else None
    return x, target, weight


def _reference(x, target, weight, opts):
    """Per row over the whole vocabulary, float64: y, lse, the coefficient, the entropy, the loss."""
    cap = opts.get("softcap")
    eps, z = opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0)
    y = cap * torch.tanh(x / cap) if cap else x
    lse = torch.logsumexp(y, -1)
    p = torch.exp(y - lse[:, None])
    w = torch.ones(N_CLASSES, dtype=x.dtype) if weight is None else weight
    if target.is_floating_point():
        kept = torch.ones(N_ROWS, dtype=torch.bool)
        mass = w * ((1 - eps) * target + eps / N_CLASSES)
    else:
        kept = target != -100
        one_hot = torch.nn.functional.one_hot(target.clamp(0), N_CLASSES).double()
        mass = kept[:, None] * w * ((1 - eps) * one_hot + eps / N_CLASSES)
    coef = mass.sum(-1) + 2 * z * lse
    entropy = lse - (p * torch.where(torch.isinf(y), 0, y)).sum(-1)  # p = 0 at a -inf logit
    return y, lse, coef, entropy, kept


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cross_entropy_backward(backend, rng, name, dtype):
    """g = grad_scale * d loss / d x + entropy_scale * d H / d x on each slice, per-row scales."""
    _skip_interpreted(backend, name, dtype)
    opts = CASES[name]
    x, target, weight = _inputs(rng, opts, dtype)
    kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts}
    _, lse, coef, entropy, kept = _reference(x, target, weight, opts)
    grad_scale = torch.as_tensor(rng.standard_normal(N_ROWS))
    entropy_scale = torch.as_tensor(rng.standard_normal(N_ROWS))
    xr = x.clone().requires_grad_()
    loss = torch_cross_entropy(xr, target, weight, reduction="none", **kw)
    entropy_r = _reference(xr, target, weight, opts)[3]
    (g_unit,) = torch.autograd.grad(loss.sum(), xr)  # d loss_i / d x_i
    (g_entropy,) = torch.autograd.grad(torch.where(kept, entropy_scale * entropy_r, 0).sum(), xr)
    g_loss = grad_scale[:, None] * g_unit
    dt = compute_dtype(dtype)
    for lo, hi in SLICES:
        local = backend.tensor(x[:, lo:hi].contiguous().to(dtype))
        t = backend.tensor(target[:, lo:hi].contiguous() if target.is_floating_point() else target)
        w = None if weight is None else backend.tensor(weight[lo:hi].contiguous().to(dt))
        args = (local, t, w, backend.tensor(lse.to(dt)), backend.tensor(coef.to(dt)))
        scales = (backend.tensor(grad_scale.to(dt)), backend.tensor(entropy_scale.to(dt)))
        keywords = (-100, kw.get("label_smoothing", 0.0), N_CLASSES, lo, kw.get("softcap", 0.0), backend.name)
        # with and without the entropy term
        g = cross_entropy_backward(*args, backend.tensor(entropy.to(dt)), *scales, *keywords)
        assert g.dtype == dtype and g.shape == local.shape
        assert_close(g, (g_loss + g_entropy)[:, lo:hi], dtype, f"{name} [{lo}:{hi}) gradient", scale=4)
        g_ce = cross_entropy_backward(*args, None, scales[0], None, *keywords)
        assert_close(g_ce, g_loss[:, lo:hi], dtype, f"{name} [{lo}:{hi}) gradient without entropy", scale=4)
        # in place, one scale for all rows; the kernel writes every element (poisoned)
        inplace = local.clone()
        cross_entropy_backward_(inplace, *args[1:], None, scales[0][:1], None, *keywords)
        assert_close(inplace, grad_scale[0] * g_unit[:, lo:hi], dtype,
                     f"{name} [{lo}:{hi}) in-place gradient", scale=4)  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_row_partials(backend, rng, name, dtype):
    """(m, s, a, b, c) of each slice: max, sum of exp(y - m), sum w q (y - m), sum w q, sum w y."""
    _skip_interpreted(backend, name, dtype)
    opts = CASES[name]
    x, target, weight = _inputs(rng, opts, dtype)
    y = _reference(x, target, weight, opts)[0]
    w = torch.ones(N_CLASSES, dtype=x.dtype) if weight is None else weight
    for lo, hi in SLICES:
        ys, ws = y[:, lo:hi], w[lo:hi]
        if target.is_floating_point():
            t = target[:, lo:hi].contiguous()
            mass = ws * t
            kept = torch.ones(N_ROWS, dtype=torch.bool)
        else:
            t = target
            local = target - lo
            hit = (local >= 0) & (local < hi - lo)
            kept = target != -100
            mass = ws * torch.nn.functional.one_hot(torch.where(hit, local, hi - lo), hi - lo + 1)[:, :-1]
        m = ys.amax(-1) if hi > lo else torch.full((N_ROWS,), -torch.inf, dtype=x.dtype)
        s = torch.exp(ys - torch.where(torch.isinf(m), 0, m)[:, None]).sum(-1)
        a = torch.where(mass != 0, mass * (ys - m[:, None]), 0).sum(-1)  # relative to the slice's max
        expected = torch.stack([m, s, a, mass.sum(-1), torch.where(ws > 0, ws * ys, 0).sum(-1)], -1)
        expected[~kept] = torch.tensor([-torch.inf, 0, 0, 0, 0], dtype=x.dtype)
        for smoothing in (True,) if backend.interpreted else (True, False):
            out = row_partials(
                backend.tensor(x[:, lo:hi].contiguous().to(dtype)), backend.tensor(t),
                None if weight is None else backend.tensor(ws.contiguous().to(compute_dtype(dtype))),
                -100, opts.get("softcap", 0.0), lo, smoothing, backend.name,
            )  # fmt: skip
            exp = expected.clone()
            if not smoothing:
                exp[:, 4] = 0
            assert out.dtype == compute_dtype(dtype) and out.shape == (N_ROWS, 5)
            assert_close(out, exp, dtype, f"{name} [{lo}:{hi}) smoothing={smoothing}", scale=4)


def test_ops_pass_opcheck(rng):
    """The registered ops' schemas, fake (meta) implementations and declared mutation hold, so that
    torch.compile can trace them (torch.library.opcheck)."""
    x = torch.as_tensor(rng.standard_normal((6, 20)))
    t = torch.as_tensor(rng.integers(0, 50, 6))
    w = torch.as_tensor(rng.random(20))
    lse, coef = torch.full((6,), 5.0, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    scale = torch.ones(1, dtype=torch.float64)
    keywords = (-100, 0.1, 50, 10, 0.0, "numba_cpu")
    torch.library.opcheck(row_partials.op, (x, t, w, -100, 0.0, 10, True, "numba_cpu"))
    torch.library.opcheck(cross_entropy_backward.op, (x, t, w, lse, coef, lse - 1, scale, scale, *keywords))
    torch.library.opcheck(cross_entropy_backward_.op, (x.clone(), t, w, lse, coef, None, scale, None, *keywords))


def test_eager_calls_equal_the_dispatched_ops(rng):
    """An eager call runs a registered op's body directly: the same outputs as through the dispatcher,
    and the same version bump of what the op mutates (autograd's check of an in-place gradient)."""
    from gpuxent import autograd

    x = torch.as_tensor(rng.standard_normal((6, 20)), dtype=torch.float32)
    t = torch.as_tensor(rng.integers(0, 20, 6))
    scale = torch.full((1,), 0.5)
    rows_args = (t, None, scale, -100, 0.1, 1e-3, 3.0, "numba_cpu")
    ops = [autograd.cross_entropy_rows, autograd.cross_entropy_stats_rows]
    for op in ops:
        eager, dispatched = op(x, *rows_args, True), op.op(x, *rows_args, True)
        for a, b in zip(eager, dispatched):
            torch.testing.assert_close(a, b)
    for op in (autograd.cross_entropy_rows_, autograd.cross_entropy_stats_rows_):
        y, z = x.clone(), x.clone()
        version = y._version
        for a, b in zip(op(y, *rows_args), op.op(z, *rows_args)):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(y, z)
        assert y._version > version, "an eager in-place call must bump the version counter"
    torch.library.opcheck(autograd.cross_entropy_rows.op, (x, *rows_args, True))
    torch.library.opcheck(autograd.cross_entropy_rows_.op, (x.clone(), *rows_args))
