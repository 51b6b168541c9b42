"""Autograd corners against PyTorch on every backend: in-place gradients and version counters, second
derivatives, torch.func transforms, target gradients, NaN means, the rounding of half gradients, and
torch.compile(fullgraph=True) for every flag."""

import pytest
import torch
import torch.nn.functional as F
from reference import KEYWORDS, PROB_KEYWORDS, assert_close, torch_cross_entropy
from test_cross_entropy import make_inputs, shape_for, split_kwargs

import gpuxent as gx


def _cpu64(*ts):
    return [None if t is None else (t.detach().cpu().double() if t.is_floating_point() else t.cpu()) for t in ts]


SECOND_ORDER = ["plain", "smoothing+weight+ignore", "z_loss", "softcap", "all", "prob", "prob+all"]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", SECOND_ORDER)
def test_double_backward(backend, rng, spec, reduction):
    """grad(loss, x, create_graph=True), then backward of a function of that gradient: the second
    derivative, as torch gives it (MAML, gradient penalties)."""
    kw, has_w, ignore = split_kwargs({**KEYWORDS, **PROB_KEYWORDS}[spec])
    prob = kw.pop("prob", False)
    x, t, w = make_inputs(backend, rng, shape_for(backend), dtype=torch.float64, prob=prob, weight=has_w, ignore=ignore)
    v = torch.randn(x.shape, dtype=torch.float64)
    x.requires_grad_()
    (g,) = torch.autograd.grad(gx.cross_entropy(x, t, w, reduction=reduction, **kw).sum(), x, create_graph=True)
    (g * v.to(x.device)).sum().backward()
    x64, t64, w64 = _cpu64(x, t, w)
    x64.requires_grad_()
    ref = torch_cross_entropy(x64, t64, w64, reduction=reduction, **kw)
    (g_ref,) = torch.autograd.grad(ref.sum(), x64, create_graph=True)
    (g_ref * v).sum().backward()
    assert_close(g, g_ref, torch.float64, "gradient")
    assert_close(x.grad, x64.grad, torch.float64, "second derivative")


def test_gradgradcheck(rng):
    x = torch.tensor(rng.standard_normal((4, 6)), dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.tensor(rng.standard_normal((4, 6))), -1).requires_grad_()
    t = torch.tensor(rng.integers(0, 6, 4))
    w = torch.rand(6, dtype=torch.float64) + 0.5
    assert torch.autograd.gradgradcheck(lambda x: gx.cross_entropy(x, t, w, label_smoothing=0.2, softcap=2.0), (x,))
    assert torch.autograd.gradgradcheck(lambda x: gx.cross_entropy(x, t, reduction="none", z_loss=0.1), (x,))
    assert torch.autograd.gradgradcheck(lambda x, q: gx.cross_entropy(x, q, label_smoothing=0.1), (x, q))
    p = torch.rand(5, dtype=torch.float64).requires_grad_()
    y = torch.rand(5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda p, y: gx.binary_cross_entropy(p * 0.8 + 0.1, y), (p, y))
    assert torch.autograd.gradgradcheck(
        lambda x, y: gx.binary_cross_entropy_with_logits(x, y, pos_weight=torch.tensor(2.0, dtype=torch.float64)),
        (p, y),
    )
    assert torch.autograd.gradgradcheck(lambda x: gx.log_softmax(x, axis=0), (x,))


def test_torch_func(backend, rng):
    """torch.func.grad, vmap, jacrev (and jacfwd/hessian in eager) work as for F.cross_entropy."""
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float64)
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    xb = backend.tensor(rng.standard_normal((3, n, r)), dtype=torch.float64)
    tb = backend.tensor(rng.integers(0, r, (3, n)), dtype=torch.int64)

    def ours(x, t):
        return gx.cross_entropy(x, t, label_smoothing=0.1, backend=backend.name)

    def theirs(x, t):
        return F.cross_entropy(x, t, label_smoothing=0.1)

    assert_close(torch.func.grad(ours)(x, t), torch.func.grad(theirs)(x, t), torch.float64, "grad")
    assert_close(torch.func.vmap(ours)(xb, tb), torch.func.vmap(theirs)(xb, tb), torch.float64, "vmap")
    vg = torch.func.vmap(torch.func.grad(ours))(xb, tb)
    assert_close(vg, torch.func.vmap(torch.func.grad(theirs))(xb, tb), torch.float64, "vmap(grad)")
    small = x[:2, :5].contiguous()
    ts = t[:2] % 5
    jac = torch.func.jacrev(lambda x: gx.cross_entropy(x, ts, reduction="none", backend=backend.name))(small)
    ref = torch.func.jacrev(lambda x: F.cross_entropy(x, ts, reduction="none"))(small)
    assert_close(jac, ref, torch.float64, "jac")
    hess = torch.func.hessian(lambda x: ours(x, ts))(small)
    assert_close(hess, torch.func.hessian(lambda x: theirs(x, ts))(small), torch.float64, "hessian")
    w = backend.tensor(rng.random((3, r)) + 0.5, dtype=torch.float64)  # per-example class weights
    got = torch.func.vmap(lambda x, t, w: gx.cross_entropy(x, t, w, backend=backend.name))(xb, tb, w)
    assert_close(got, torch.func.vmap(lambda x, t, w: F.cross_entropy(x, t, w))(xb, tb, w), torch.float64, "weights")


def test_torch_func_softmax_and_bce(backend, rng):
    x = backend.tensor(rng.standard_normal((3, 4, 7)), dtype=torch.float64)
    y = backend.tensor(rng.random((3, 4, 7)), dtype=torch.float64)
    for ours, theirs in (
        (lambda x: gx.softmax(x, backend=backend.name).pow(2).sum(), lambda x: F.softmax(x, -1).pow(2).sum()),
        (lambda x: gx.log_softmax(x, 0, backend=backend.name).pow(2).sum(), lambda x: F.log_softmax(x, 0).pow(2).sum()),
        (
            lambda x: gx.binary_cross_entropy_with_logits(x, y[0], backend=backend.name),
            lambda x: F.binary_cross_entropy_with_logits(x, y[0]),
        ),
    ):
        got = torch.func.vmap(torch.func.grad(ours))(x)
        assert_close(got, torch.func.vmap(torch.func.grad(theirs))(x), torch.float64)


def test_inplace_grad_bumps_the_version_counter(backend, rng):
    """A graph that still needs the overwritten logits is refused, as after a torch in-place op."""
    n, r = shape_for(backend)
    z = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float32).requires_grad_()
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    y = torch.exp(z)  # exp saves its output for the backward
    loss = gx.cross_entropy(y, t, inplace_grad=True, backend=backend.name)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    x = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float32)
    before = x._version
    gx.cross_entropy_and_grad(x, t, inplace_grad=True, backend=backend.name)
    assert x._version > before


def test_inplace_grad_on_a_leaf(backend, rng):
    """A leaf's .grad does not alias the leaf: later steps see the right gradient and values."""
    n, r = shape_for(backend)
    a = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float32).requires_grad_()
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    x64 = a.detach().cpu().double().requires_grad_()
    gx.cross_entropy(a, t, inplace_grad=True, backend=backend.name).backward()
    F.cross_entropy(x64, t.cpu()).backward()
    assert a.grad.data_ptr() != a.data_ptr()
    assert_close(a.grad, x64.grad, torch.float32, "leaf grad")
    with torch.no_grad():
        a.copy_(torch.ones_like(a))  # a later step refills the logits
    assert_close(a.grad, x64.grad, torch.float32, "leaf grad after the leaf changed")


def test_inplace_grad_refuses_second_order(backend, rng):
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float64)
    logits = (x * 1).requires_grad_()
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    loss = gx.cross_entropy(logits * 1, t, inplace_grad=True, backend=backend.name)
    with pytest.raises(RuntimeError, match="inplace_grad"):
        torch.autograd.grad(loss, logits, create_graph=True)


@pytest.mark.parametrize("with_logits", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bce_target_gradient(backend, rng, with_logits, reduction):
    shape = (5, 7)
    x = backend.tensor(rng.random(shape) * 0.9 + 0.05, dtype=torch.float64).requires_grad_()
    y = backend.tensor(rng.random(shape), dtype=torch.float64).requires_grad_()
    w = backend.tensor(rng.random(7) + 0.5, dtype=torch.float64)
    pw = backend.tensor(rng.random(7) + 0.5, dtype=torch.float64)
    go = torch.randn(shape if reduction == "none" else (), dtype=torch.float64)
    if with_logits:
        loss = gx.binary_cross_entropy_with_logits(x, y, w, pw, reduction, backend=backend.name)
    else:
        loss = gx.binary_cross_entropy(x, y, w, reduction, backend=backend.name)
    loss.backward(go.to(loss.device))
    x64, y64 = (v.detach().cpu().requires_grad_() for v in (x, y))
    if with_logits:
        ref = F.binary_cross_entropy_with_logits(x64, y64, w.cpu(), reduction=reduction, pos_weight=pw.cpu())
    else:
        ref = F.binary_cross_entropy(x64, y64, w.cpu(), reduction=reduction)
    ref.backward(go)
    assert_close(x.grad, x64.grad, torch.float64, "input grad")
    assert_close(y.grad, y64.grad, torch.float64, "target grad")


def test_zero_summed_weight_mean_is_nan(backend, rng):
    """weight=[0,0,1,1], targets of weight 0, smoothing: torch's mean is NaN (loss and gradient), not inf."""
    x = backend.tensor(rng.standard_normal((3, 4)), dtype=torch.float32).requires_grad_()
    t = backend.tensor([0, 1, 0], dtype=torch.int64)
    w = backend.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float32)
    for eps in (0.0, 0.2):
        x.grad = None
        loss = gx.cross_entropy(x, t, w, label_smoothing=eps, backend=backend.name)
        loss.backward()
        x64 = x.detach().cpu().double().requires_grad_()
        ref = F.cross_entropy(x64, t.cpu(), w.cpu().double(), label_smoothing=eps)
        ref.backward()
        assert torch.isnan(loss) and torch.isnan(ref)
        assert torch.isnan(x.grad).all() == torch.isnan(x64.grad).all()
        h = backend.tensor(rng.standard_normal((3, 5)), dtype=torch.float32)
        lin = backend.tensor(rng.standard_normal((4, 5)), dtype=torch.float32)
        assert torch.isnan(gx.linear_cross_entropy(h, lin, t, ce_weight=w, label_smoothing=eps, backend=backend.name))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_gradient_is_rounded_once(backend, rng, dtype, reduction):
    """A non-unit grad_output is applied in float32 before the one rounding to half precision."""
    n, r = (8, 50) if backend.interpreted else (64, 300)
    x = backend.tensor(rng.standard_normal((n, r)) * 2, dtype=dtype).requires_grad_()
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    go = torch.full((), 2.5) if reduction == "mean" else torch.tensor(rng.random(n) * 3 + 0.5, dtype=torch.float32)
    gx.cross_entropy(x, t, reduction=reduction, backend=backend.name).backward(go.to(x.device))
    x64 = x.detach().cpu().double().requires_grad_()
    F.cross_entropy(x64, t.cpu(), reduction=reduction).backward(go.double())
    expected = x64.grad.to(dtype)  # rounded once from the exact value
    if backend.interpreted and backend.name == "triton" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter truncates float32 -> bfloat16 stores (a GPU rounds to nearest even)")
    mismatched = (x.grad.cpu() != expected).float().mean().item()
    assert mismatched < 0.02, f"{mismatched:.1%} of the elements differ from the once-rounded gradient"
    assert_close(x.grad, x64.grad, dtype, "grad")


INPLACE_FLAGS = [
    {},
    {"inplace_grad": True},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0},
    {"inplace_grad": True, "softcap": 5.0, "label_smoothing": 0.1},
    {"reduction": "none"},
    {"reduction": "sum", "weight": True, "ignore_index": 1},
    {"prob": True},
]


@pytest.mark.parametrize("flags", INPLACE_FLAGS, ids=lambda f: "-".join(f) or "plain")
def test_compile_fullgraph_every_flag(backend, rng, flags):
    """torch.compile(fullgraph=True) traces every flag, the in-place gradient included."""
    torch._dynamo.reset()
    flags = dict(flags)
    n, r = shape_for(backend)
    proj = torch.nn.Linear(8, r).to(backend.device)
    h = backend.tensor(rng.standard_normal((n, 8)), dtype=torch.float32)
    if flags.pop("prob", False):
        t = torch.softmax(backend.tensor(rng.standard_normal((n, r)), dtype=torch.float32), -1)
    else:
        t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    w = backend.tensor(rng.random(r) + 0.5, dtype=torch.float32) if flags.pop("weight", False) else None

    def step(h):
        return gx.cross_entropy(proj(h), t, w, backend=backend.name, **flags).sum()

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(h)
    loss.backward()
    got = [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    ref = step(h)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    for g, p in zip(got, proj.parameters()):
        assert_close(g, p.grad, torch.float32, "grad", scale=10)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0}])
def test_double_backward_every_row_ignored(backend, rng, kw):
    """Mean over no kept row: the loss is 0/0 = NaN as in torch, the gradient and the second
    derivative are 0 (torch's nll_loss gives an ignored row a zero gradient whatever the scale)."""
    x, t, _ = make_inputs(backend, rng, shape_for(backend), dtype=torch.float64)
    t = torch.full_like(t, -100)
    x.requires_grad_()
    loss = gx.cross_entropy(x, t, **kw)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    (g * torch.randn_like(g)).sum().backward()
    x64 = x.detach().cpu().double().requires_grad_()
    ref = torch_cross_entropy(x64, t.cpu(), None, **kw)
    (g_ref,) = torch.autograd.grad(ref, x64, create_graph=True)
    assert torch.isnan(loss) and torch.isnan(ref)
    assert_close(g, g_ref, torch.float64, "gradient")
    assert torch.equal(x.grad.cpu(), torch.zeros_like(x64))
