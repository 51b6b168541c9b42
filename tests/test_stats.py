"""cross_entropy_with_stats and linear_cross_entropy_with_stats: every backend against float64 PyTorch."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import KEYWORDS, assert_close, torch_cross_entropy
from test_cross_entropy import CASES, make_inputs, shape_for, split_kwargs

import gpuxent as gx
from gpuxent import backends


def reference_stats(x, t, w=None, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None, ignore_index=-100):
    """``(x64, loss, z_loss, accuracy, entropy)`` in float64 torch ops on the CPU, differentiable in
    ``x64`` (a leaf): the statistics as API.md defines them, computed the plain way."""
    x64 = x.detach().cpu().double().requires_grad_()
    r = x.shape[-1]
    prob = t.is_floating_point()
    t2 = t.detach().cpu().reshape(-1, r).double() if prob else t.detach().cpu().reshape(-1)
    w64 = None if w is None else w.detach().cpu().double()
    x2 = x64.reshape(-1, r)
    loss = torch_cross_entropy(x2, t2, w64, ignore_index, reduction, label_smoothing, z_loss, softcap)
    y = softcap * torch.tanh(x2 / softcap) if softcap else x2
    kept = torch.ones(y.shape[0], dtype=torch.bool) if prob else t2 != ignore_index
    cls = t2.argmax(-1) if prob else t2
    lse = torch.logsumexp(y, -1)
    p = torch.softmax(y, -1)
    entropy = lse - torch.where(p > 0, p * y, 0).sum(-1)
    z_rows = torch.where(kept, z_loss * lse.detach() ** 2, 0)
    acc_rows = ((y.detach().argmax(-1) == cls) & kept).double()
    if reduction == "none":
        shape = x.shape[:-1]
        return x64, loss.reshape(shape), z_rows.reshape(shape), acc_rows.reshape(shape), _kept(entropy, kept, shape)
    n_kept = kept.sum()
    if reduction == "sum":
        return x64, loss, z_rows.sum(), acc_rows.sum(), torch.where(kept, entropy, 0).sum()
    if prob:
        denom = torch.tensor(float(y.shape[0]), dtype=torch.float64)
    else:
        denom = (kept.double() if w64 is None else torch.where(kept, w64[t2.clamp(0, r - 1)], 0)).sum()
    mean_entropy = torch.where(kept, entropy, 0).sum() / n_kept
    return x64, loss, z_rows.sum() / denom, acc_rows.sum() / n_kept, mean_entropy


def _kept(v, kept, shape):
    return torch.where(kept, v, 0).reshape(shape)


def _grads(backend, rng, shape):
    return (torch.as_tensor(rng.standard_normal(shape) + 0.5, dtype=torch.float32, device=backend.device) for _ in "ab")


def _check(backend, x, t, w, reduction, a, b, entropy, what="", dtype=torch.float32, **kw):
    """One call of ``cross_entropy_with_stats`` against ``reference_stats``: every field, and the
    gradient of ``a * loss`` (+ ``b * entropy`` with ``entropy``) against float64 autograd."""
    x64, *ref = reference_stats(x, t, w, reduction, **kw)
    torch.autograd.backward(
        [ref[0], ref[3]] if entropy else [ref[0]], [a.double().cpu(), b.double().cpu()][: 1 + entropy]
    )
    xg = x.clone().requires_grad_()
    out = gx.cross_entropy_with_stats(xg, t, w, reduction=reduction, backend=backend.name, entropy=entropy, **kw)
    assert isinstance(out, gx.CrossEntropyOutput)
    with torch.no_grad():  # cross_entropy's loss, bit for bit
        plain = gx.cross_entropy(x, t, w, reduction=reduction, backend=backend.name, **kw)
    torch.testing.assert_close(out.loss.detach(), plain, rtol=0, atol=0, equal_nan=True)
    for name, got, want in zip(("loss", "z_loss", "accuracy", "entropy"), out, ref):
        if name == "entropy" and not entropy:
            assert got is None
            continue
        assert got.dtype == torch.float32 and got.device == x.device and got.shape == want.shape, name
        assert_close(got, want, dtype, f"{what} {name}")
    torch.autograd.backward([out.loss, out.entropy] if entropy else [out.loss], [a, b][: 1 + entropy])
    # the entropy's gradient p_j (lse - H - y_j) carries y_j - lse, rounded to |y_j| eps in the compute dtype
    # (every backend the same: seed 3971200220 gave 2.49e-6 against 2e-6 on numba_cpu and torch alike)
    assert_close(xg.grad, x64.grad, dtype, f"{what} grad", scale=4.0 if entropy else 1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("spec", "prob"), CASES, ids=[f"{s}-{'prob' if p else 'index'}" for s, p in CASES])
def test_matches_torch(backend, rng, spec, reduction, prob):
    """Every keyword and reduction: loss, z-loss part, accuracy and entropy, and the gradient of
    ``a * loss + b * entropy`` for random upstream gradients ``a``, ``b`` (per row for "none")."""
    kw, weighted, ignore = split_kwargs(KEYWORDS[spec])
    x, t, w = make_inputs(backend, rng, shape_for(backend), prob=prob, weight=weighted, ignore=ignore)
    a, b = _grads(backend, rng, () if reduction != "none" else x.shape[:-1])
    for entropy in (False, True):
        _check(backend, x, t, w, reduction, a, b, entropy, f"entropy={entropy}", **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_dtypes(backend, rng, dtype, prob):
    """float64 to the last bit, half precision within its tolerance (statistics in float32)."""
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0}
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), dtype, prob=prob, weight=True, ignore=not prob)
    a, b = _grads(backend, rng, x.shape[:-1])
    x64, *ref = reference_stats(x, t, w, "none", **kw)
    torch.autograd.backward([ref[0], ref[3]], [a.double().cpu(), b.double().cpu()])
    xg = x.clone().requires_grad_()
    out = gx.cross_entropy_with_stats(xg, t, w, reduction="none", backend=backend.name, entropy=True, **kw)
    torch.autograd.backward([out.loss, out.entropy], [a, b])
    stats_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert xg.grad.dtype == dtype
    for name, got, want in zip(("loss", "z_loss", "accuracy", "entropy"), out, ref):
        assert got.dtype == stats_dtype, name
        # the accuracy of a half input compares argmaxes of the same rounded logits: exact
        assert_close(got, want, torch.float64 if name == "accuracy" else dtype, name)
    assert_close(xg.grad, x64.grad, dtype, "grad")


def _poisoned_stats(x):
    n = x.shape[0]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((n,), -7, dtype=torch.int64, device=x.device), torch.full(
        (n,), math.nan, dtype=dt, device=x.device
    )


@pytest.mark.parametrize("softcap", [None, 4.0], ids=["plain", "softcap"])
@pytest.mark.parametrize("grad", ["none", "fresh", "inplace"])
def test_backend_stats_argmax_ties_nan_and_inf(backend, rng, softcap, grad):
    """The backend contract: poisoned stats buffers all written; argmax as torch.argmax on the soft-capped
    logits (ties across chunks -> the first, a NaN -> the first NaN, a row of -inf -> 0), entropy as
    float64 torch (NaN where the loss is NaN), ignored rows 0; loss and gradient as without stats."""
    module = backends.get(backend.name)
    n, r = shape_for(backend, big=True)
    x, t, w = make_inputs(backend, rng, (max(n, 8), r), torch.float64, weight=True, ignore=True)
    j = rng.choice(r, 3, replace=False)
    x[1, j] = x[1].max() + 1  # a three-way tie, usually in different chunks
    x[2, :] = 0.0  # all equal: index 0
    x[3, j[:2]] = math.nan  # torch.argmax: the first NaN
    x[4, :] = -math.inf
    x[5, j[0]] = math.inf
    t[1:6] = torch.as_tensor(j[0]).to(t)  # kept rows
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=softcap, grad_scale=None)
    g_plain = torch.full_like(x, math.nan) if grad != "none" else None
    loss_plain, lse_plain = module.cross_entropy(x.clone(), t, w, grad=g_plain, **kw)
    stats = _poisoned_stats(x)
    xs = x.clone()
    g = {"none": None, "fresh": torch.full_like(x, math.nan), "inplace": xs}[grad]
    loss, lse = module.cross_entropy(xs, t, w, grad=g, stats=stats, **kw)
    for got, want in ((loss, loss_plain), (lse, lse_plain), (g, g_plain)):
        if got is not None:  # bit for bit, NaN included
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    y = x.cpu()
    if softcap:
        y = softcap * torch.tanh(y / softcap)
    kept = (t != -100).cpu()
    argmax, entropy = (s.cpu() for s in stats)
    want = torch.where(kept, y.argmax(-1), 0)
    assert torch.equal(argmax, want), f"argmax {argmax.tolist()} != {want.tolist()}"
    assert argmax[1] == min(j) and argmax[2] == 0 and argmax[3] == min(j[:2]) and argmax[4] == 0
    p = torch.softmax(y, -1)
    lse = torch.logsumexp(y, -1)
    ref_entropy = lse - torch.where(p > 0, p * y, 0).sum(-1)
    # a row without a softmax (a NaN, +inf or only -inf in it) has a NaN entropy, as its loss
    ref_entropy = torch.where(torch.isfinite(lse), ref_entropy, math.nan)
    assert_close(entropy, torch.where(kept, ref_entropy, 0), torch.float64, "entropy")
    assert torch.isnan(entropy[3:6]).tolist() == [True, not softcap, not softcap]  # NaN, +inf, -inf rows


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, rng, reduction):
    """No kept row: NaN means (loss, z-loss, accuracy, entropy), zero sums and rows, zero gradient."""
    x, _, w = make_inputs(backend, rng, shape_for(backend), weight=True)
    t = torch.full(x.shape[:1], -100, dtype=torch.int64, device=x.device)
    a, b = _grads(backend, rng, () if reduction != "none" else x.shape[:-1])
    _check(backend, x, t, w, reduction, a, b, True, label_smoothing=0.1, z_loss=1e-3)
    out = gx.cross_entropy_with_stats(x, t, w, reduction=reduction, backend=backend.name, entropy=True)
    for v in out:
        assert (torch.isnan(v) if reduction == "mean" else v == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("entropy", [False, True], ids=["no-entropy", "entropy"])
def test_linear_with_stats(backend, rng, reduction, entropy):
    """The fused linear layer in several chunks: every field, and the gradients of hidden, weight and bias
    for ``a * loss + b * entropy``, against float64 torch on the materialised logits."""
    n, r = shape_for(backend)
    d = 6
    h = backend.tensor(rng.standard_normal((n, d)), dtype=torch.float32)
    lin_w = backend.tensor(rng.standard_normal((r, d)), dtype=torch.float32)
    bias = backend.tensor(rng.standard_normal(r), dtype=torch.float32)
    _, t, cw = make_inputs(backend, rng, (n, r), weight=True, ignore=True)
    kw = {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    a, b = _grads(backend, rng, () if reduction != "none" else (n,))
    params = [v.double().cpu().requires_grad_() for v in (h, lin_w, bias)]
    logits = F.linear(*params)
    x64, *ref = reference_stats(logits.detach(), t, cw, reduction, **kw)
    outs = [ref[0], ref[3]] if entropy else [ref[0]]
    torch.autograd.backward(outs, [a.double().cpu(), b.double().cpu()][: len(outs)])
    logits.backward(x64.grad)
    got_params = [v.clone().requires_grad_() for v in (h, lin_w, bias)]
    out = gx.linear_cross_entropy_with_stats(
        *got_params[:2], t, got_params[2], reduction=reduction, ce_weight=cw, backend=backend.name, chunk_size=3,
        entropy=entropy, **kw,
    )  # fmt: skip
    plain = gx.linear_cross_entropy(h, lin_w, t, bias, reduction=reduction, ce_weight=cw, backend=backend.name, **kw)
    assert_close(out.loss, plain, torch.float32, "loss as linear_cross_entropy")
    for name, got, want in zip(("loss", "z_loss", "accuracy", "entropy"), out, ref):
        if name == "entropy" and not entropy:
            assert got is None
        else:
            assert_close(got, want, torch.float32, name)
    torch.autograd.backward([out.loss, out.entropy] if entropy else [out.loss], [a, b][: len(outs)])
    for name, got, want in zip(("hidden", "weight", "bias"), got_params, params):
        assert_close(got.grad, want.grad, torch.float32, f"{name} grad", scale=10)


def test_inplace_grad_module_and_numpy(backend, rng):
    """inplace_grad (entropy=False), gx.nn.CrossEntropyWithStats, numpy in and out."""
    x, t, w = make_inputs(backend, rng, shape_for(backend), weight=True, ignore=True)
    _, *ref = reference_stats(x, t, w, "sum", label_smoothing=0.1)
    module = gx.nn.CrossEntropyWithStats(weight=w, reduction="sum", label_smoothing=0.1, backend=backend.name)
    out = module(x, t)
    assert isinstance(out, gx.CrossEntropyOutput) and out.entropy is None
    assert_close(out.accuracy, ref[2], torch.float32, "module accuracy")
    module.entropy = True
    assert_close(module(x, t).entropy, ref[3], torch.float32, "module entropy")
    leaf = torch.nn.Parameter(x.clone())
    logits = leaf * 1.0
    out = gx.cross_entropy_with_stats(logits, t, w, reduction="sum", label_smoothing=0.1, backend=backend.name,
                                      inplace_grad=True)  # fmt: skip
    out.loss.backward()
    x64, *_ = reference_stats(x, t, w, "sum", label_smoothing=0.1)
    _[0].backward()
    assert_close(logits.detach(), x64.grad, torch.float32, "gradient written over the logits")
    assert_close(leaf.grad, x64.grad, torch.float32, "leaf grad")
    with pytest.raises(ValueError, match="inplace_grad"):
        gx.cross_entropy_with_stats(
            x.clone().requires_grad_(), t, inplace_grad=True, entropy=True, backend=backend.name
        )
    with pytest.raises(TypeError, match="entropy"):
        gx.cross_entropy_with_stats(x, t, entropy="yes", backend=backend.name)
    if backend.device.type == "cpu":
        res = gx.cross_entropy_with_stats(x.numpy(), t.numpy(), w.numpy(), reduction="sum", label_smoothing=0.1,
                                          backend=backend.name, entropy=True)  # fmt: skip
        assert all(isinstance(v, np.floating) for v in res)
        assert_close(res.entropy, ref[3], torch.float32, "numpy entropy")


@pytest.mark.parametrize("entropy", [False, True], ids=["no-entropy", "entropy"])
def test_torch_compile_fullgraph(backend, rng, entropy):
    """A training step that logs accuracy (and entropy) compiles without a graph break (aot_eager) and
    keeps exact gradients."""
    if backend.name != "numba_cpu":
        pytest.skip("one backend is enough: the op registration is shared")
    torch._dynamo.reset()
    n, r = shape_for(backend)
    proj = torch.nn.Linear(8, r)
    h = torch.as_tensor(rng.standard_normal((n, 8)), dtype=torch.float32)
    t = torch.as_tensor(rng.integers(0, r, n))

    beta = 0.1 if entropy else 0.0

    def step(h, t):
        out = gx.cross_entropy_with_stats(proj(h), t, z_loss=1e-3, backend=backend.name, entropy=entropy)
        return (out.loss - beta * out.entropy if entropy else out.loss), out.accuracy

    objective, accuracy = torch.compile(step, fullgraph=True, backend="aot_eager")(h, t)
    objective.backward()
    grads = [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    logits = proj(h)
    x64, *ref = reference_stats(logits.detach(), t, z_loss=1e-3)
    (ref[0] - beta * ref[3]).backward()
    logits.backward(x64.grad.float())
    assert_close(objective, ref[0] - beta * ref[3], torch.float32, "objective")
    assert_close(accuracy, ref[2], torch.float32, "accuracy")
    for got, p in zip(grads, proj.parameters()):
        assert_close(got, p.grad, torch.float32, "parameter grad", scale=10)
