"""Regression tests of the wrong results that users met where paths multiply (half precision x a
non-dense upstream gradient x a backend; forward mode x an input that needs no gradient; huge
logits; the newer paths under torch.func, second order and torch.compile). Each failed before its fix.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, reference_cross_entropy, torch_cross_entropy
from test_cross_entropy import shape_for

import gpuxent as gx

HALF = [torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------- non-dense upstream gradients


@pytest.mark.parametrize("dtype", HALF + [torch.float32])
@pytest.mark.parametrize("upstream", ["sum", "expanded", "strided"])
def test_half_gradient_under_non_dense_upstream(backend, rng, dtype, upstream):
    """reduction="none", then ``.sum().backward()`` (a stride-0 ones), an expanded factor or a strided
    view: every backend, every dtype. Triton read the stride-0 factor of half logits as dense (max error
    163 at 8 x 1024 in bf16; past the tensor on a GPU)."""
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((n, r)) * 3, dtype=dtype).requires_grad_()
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    t[1] = -100
    loss = gx.cross_entropy(x, t, reduction="none", backend=backend.name, label_smoothing=0.1)
    if upstream == "sum":
        go = torch.ones(n, dtype=torch.float64)
        loss.sum().backward()
    elif upstream == "expanded":
        go = torch.full((n,), 0.7, dtype=torch.float64)
        loss.backward(torch.tensor(0.7, device=x.device).expand(n))
    else:
        g = torch.as_tensor(rng.random(2 * n) + 0.5, dtype=torch.float32, device=x.device)[::2]
        go = g.double().cpu()
        loss.backward(g)
    _, ref_grad = reference_cross_entropy(x, t, reduction="none", label_smoothing=0.1, grad_output=go)
    assert_close(x.grad, ref_grad, dtype, "gradient")


@pytest.mark.parametrize("dtype", HALF)
def test_half_distillation_gradient_under_sum(backend, rng, dtype):
    n, r = shape_for(backend)
    s = backend.tensor(rng.standard_normal((n, r)), dtype=dtype).requires_grad_()
    tch = backend.tensor(rng.standard_normal((n, r)), dtype=dtype)
    gx.distillation_loss(s, tch, reduction="none", backend=backend.name).sum().backward()
    s64 = s.detach().cpu().double().requires_grad_()
    lt = torch.log_softmax(tch.cpu().double(), -1)
    (lt.exp() * (lt - torch.log_softmax(s64, -1))).sum().backward()
    assert_close(s.grad, s64.grad, dtype, "gradient")


# --------------------------------------------------------------------------- huge logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_logits(backend, dtype):
    """``(m - y_t) + log s`` in that order: two logits of 1e20 give log 2 (fast-math reassociation made
    it ``lse - y_t`` = 0 on numba_cpu)."""
    x = backend.tensor([[0.0, 1e20, 1e20], [1e20, 0.0, 1e20]], dtype=dtype)
    t = backend.tensor([1, 2])
    loss = gx.cross_entropy(x, t, reduction="none", backend=backend.name)
    assert_close(loss, F.cross_entropy(x.cpu().double(), t.cpu(), reduction="none"), dtype, "loss")
    teacher = backend.tensor([[0.0, 1e20, 0.0], [0.0, 0.0, 1e20]], dtype=dtype)
    kl = gx.distillation_loss(x, teacher, reduction="none", backend=backend.name)
    ref = F.kl_div(F.log_softmax(x.cpu().double(), -1), F.log_softmax(teacher.cpu().double(), -1), log_target=True,
                   reduction="none").sum(-1)  # fmt: skip
    assert_close(kl, ref, dtype, "distillation")


def test_large_offset_precision(backend, rng):
    """float64 logits around 1e8: the loss within float64's rounding of ``m - y_t`` (was 1.9e-9 off)."""
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((n, r)) * 3 + 1e8, dtype=torch.float64)
    t = backend.tensor(rng.integers(0, r, n))
    loss = gx.cross_entropy(x, t, reduction="none", backend=backend.name)
    ref = F.cross_entropy(x.cpu(), t.cpu(), reduction="none")
    torch.testing.assert_close(loss.cpu(), ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- forward mode


def _small(backend, rng, dtype=torch.float64):
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((n, r)), dtype=dtype)
    t = backend.tensor(rng.integers(0, r, n))
    return x, t, backend.tensor(rng.standard_normal((n, r)), dtype=dtype)


def test_forward_mode(backend, rng):
    """jvp, jacfwd and forward_ad on inputs that do not require grad (the forward computed no gradient,
    and the jvp multiplied by that empty tensor)."""
    x, t, v = _small(backend, rng)
    xc, tc, vc = x.cpu(), t.cpu(), v.cpu()
    kw = {"backend": backend.name, "label_smoothing": 0.1}

    def ce(z):
        return gx.cross_entropy(z, t, **kw)

    ref = torch.func.jvp(lambda z: F.cross_entropy(z, tc, label_smoothing=0.1), (xc,), (vc,))[1]
    assert_close(torch.func.jvp(ce, (x,), (v,))[1], ref, torch.float64, "jvp")
    stats = torch.func.jvp(lambda z: gx.cross_entropy_with_stats(z, t, **kw).loss, (x,), (v,))[1]
    assert_close(stats, ref, torch.float64, "jvp stats")
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(ce(fwAD.make_dual(x, v))).tangent
    assert_close(tangent, ref, torch.float64, "forward_ad")
    small, ts = x[:2, :5].contiguous(), t[:2] % 5
    jac = torch.func.jacfwd(lambda z: gx.cross_entropy(z, ts, reduction="none", backend=backend.name))(small)
    ref_jac = torch.func.jacfwd(lambda z: F.cross_entropy(z, ts.cpu(), reduction="none"))(small.cpu())
    assert_close(jac, ref_jac, torch.float64, "jacfwd")
    teacher = x.flip(0)

    def kl_ref(z):
        return F.kl_div(F.log_softmax(z, -1), F.log_softmax(teacher.cpu(), -1), log_target=True, reduction="batchmean")

    kl = torch.func.jvp(lambda z: gx.distillation_loss(z, teacher, backend=backend.name), (x,), (v,))[1]
    assert_close(kl, torch.func.jvp(kl_ref, (xc,), (vc,))[1], torch.float64, "jvp distillation")


# --------------------------------------------------------------------------- the entropy and linear paths


def _entropy_ref(z):
    lp = F.log_softmax(z, -1)
    return -(lp.exp() * lp).sum(-1).mean()


def test_entropy_transforms(backend, rng):
    """torch.func.grad, vmap(grad), hessian, jvp and create_graph of the differentiable entropy."""
    x, t, v = _small(backend, rng)
    xc, vc = x.cpu(), v.cpu()

    def ent(z):
        return gx.cross_entropy_with_stats(z, t, entropy=True, backend=backend.name).entropy

    assert_close(torch.func.grad(ent)(x), torch.func.grad(_entropy_ref)(xc), torch.float64, "grad")
    xb = torch.stack([x, x.flip(0)])
    assert_close(torch.func.vmap(torch.func.grad(ent))(xb), torch.func.vmap(torch.func.grad(_entropy_ref))(xb.cpu()),
                 torch.float64, "vmap(grad)")  # fmt: skip
    assert_close(torch.func.jvp(ent, (x,), (v,))[1], torch.func.jvp(_entropy_ref, (xc,), (vc,))[1], torch.float64,
                 "jvp")  # fmt: skip
    small = x[:2, :5].contiguous()
    ts = t[:2] % 5
    h = torch.func.hessian(lambda z: gx.cross_entropy_with_stats(z, ts, entropy=True, backend=backend.name).entropy)
    assert_close(h(small), torch.func.hessian(_entropy_ref)(small.cpu()), torch.float64, "hessian")
    z = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(ent(z) - 0.3 * gx.cross_entropy(z, t, backend=backend.name), z, create_graph=True)
    (g * v).sum().backward()
    zr = xc.clone().requires_grad_()
    (gr,) = torch.autograd.grad(_entropy_ref(zr) - 0.3 * F.cross_entropy(zr, t.cpu()), zr, create_graph=True)
    (gr * vc).sum().backward()
    assert_close(z.grad, zr.grad, torch.float64, "second derivative")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_transforms(backend, rng, reduction):
    """torch.func.grad and jvp of linear_cross_entropy (jvp was silently wrong: the chunked forward's
    gradients were not the jvp's), and create_graph through it and through its entropy."""
    n = shape_for(backend)[0]
    h = backend.tensor(rng.standard_normal((n, 6)), dtype=torch.float64)
    w = backend.tensor(rng.standard_normal((9, 6)), dtype=torch.float64)
    t = backend.tensor(rng.integers(0, 9, n))
    hc, wc, tc = h.cpu(), w.cpu(), t.cpu()

    def ours(w_):
        return gx.linear_cross_entropy(h, w_, t, reduction=reduction, backend=backend.name, chunk_size=3).sum()

    def ref(w_):
        return F.cross_entropy(hc @ w_.T, tc, reduction=reduction).sum()

    assert_close(torch.func.grad(ours)(w), torch.func.grad(ref)(wc), torch.float64, "grad")
    assert_close(torch.func.jvp(ours, (w,), (w,))[1], torch.func.jvp(ref, (wc,), (wc,))[1], torch.float64, "jvp")
    for entropy in (False, True):
        ww = w.clone().requires_grad_()
        o = gx.linear_cross_entropy_with_stats(h, ww, t, reduction=reduction, backend=backend.name, entropy=entropy)
        loss = (o.loss - 0.5 * o.entropy) if entropy else o.loss
        (g,) = torch.autograd.grad(loss.sum(), ww, create_graph=True)
        (g * wc.to(g.device)).sum().backward()
        wr = wc.clone().requires_grad_()
        y = hc @ wr.T
        lr = F.cross_entropy(y, tc, reduction=reduction)
        if entropy:
            lp = F.log_softmax(y, -1)
            e = -(lp.exp() * lp).sum(-1)
            lr = lr - 0.5 * (e if reduction == "none" else e.mean())
        (gr,) = torch.autograd.grad(lr.sum(), wr, create_graph=True)
        (gr * wc).sum().backward()
        assert_close(g, gr, torch.float64, f"gradient (entropy={entropy})")
        assert_close(ww.grad, wr.grad, torch.float64, f"second derivative (entropy={entropy})")


# --------------------------------------------------------------------------- torch.compile


def test_compile_linear_entropy_fullgraph(rng):
    """The linear entropy Function mutated ``problem.entropy_scale``: HOP "Unsafe side effect"."""
    h = torch.tensor(rng.standard_normal((6, 4)), dtype=torch.float32, requires_grad=True)
    w = torch.tensor(rng.standard_normal((7, 4)), dtype=torch.float32, requires_grad=True)
    t = torch.tensor(rng.integers(0, 7, 6))
    f = torch.compile(lambda h, w: gx.linear_cross_entropy_with_stats(h, w, t, entropy=True).entropy, fullgraph=True)
    f(h, w).backward()
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    _entropy_ref(hr @ wr.T).backward()
    assert_close(h.grad, hr.grad, torch.float32, "hidden grad")
    assert_close(w.grad, wr.grad, torch.float32, "weight grad")


@pytest.mark.parametrize("fn", ["cross_entropy", "stats", "distillation"])
def test_compile_dynamic(rng, fn):
    """``dynamic=True`` makes float keywords symbolic: ``math.isfinite`` on one broke the trace."""
    t = torch.tensor(rng.integers(0, 7, 6))
    teacher = torch.tensor(rng.standard_normal((6, 7)), dtype=torch.float32)
    calls = {
        "cross_entropy": (lambda z: gx.cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0),
                          lambda z: torch_cross_entropy(z, t, label_smoothing=0.1, z_loss=1e-3, softcap=5.0)),
        "stats": (lambda z: gx.cross_entropy_with_stats(z, t, z_loss=1e-3).loss,
                  lambda z: torch_cross_entropy(z, t, z_loss=1e-3)),
        "distillation": (lambda z: gx.distillation_loss(z, teacher, temperature=2.0),
                         lambda z: 4 * F.kl_div(F.log_softmax(z / 2, -1), F.log_softmax(teacher.double() / 2, -1),
                                                log_target=True, reduction="batchmean")),
    }  # fmt: skip
    ours, ref = calls[fn]
    x = torch.tensor(rng.standard_normal((6, 7)), dtype=torch.float32, requires_grad=True)
    loss = torch.compile(ours, fullgraph=True, dynamic=True)(x)
    loss.backward()
    xr = x.detach().double().requires_grad_()
    lr = ref(xr)
    lr.backward()
    assert_close(loss, lr, torch.float32, "loss")
    assert_close(x.grad, xr.grad, torch.float32, "grad")


def test_numpy_huge_logits_as_in_issue():
    """The report's exact call: numpy in, numpy out."""
    loss = gx.cross_entropy(np.array([[0, 1e20, 1e20]], dtype=np.float32), np.array([1]))
    assert abs(float(loss) - np.log(2)) < 1e-6
