"""The shared suite for cross_entropy and cross_entropy_and_grad: every backend against PyTorch."""

import numpy as np
import pytest
import torch
from reference import KEYWORDS, assert_close, reference_cross_entropy

import gpuxent as gx
from gpuxent import backends


def shape_for(backend, big=False):
    """(N, r): several chunks/blocks per row with a masked tail, small under an interpreter."""
    if backend.interpreted:
        return (5, 300) if big else (4, 37)
    return (33, 5000) if big else (16, 77)


def make_inputs(backend, rng, shape, dtype=torch.float32, prob=False, weight=False, ignore=False, scale=3.0):
    n, r = shape
    x = backend.tensor(rng.standard_normal((n, r)) * scale, dtype=dtype)
    if prob:
        t = torch.softmax(torch.as_tensor(rng.standard_normal((n, r)) * 2), -1).to(dtype).to(backend.device)
    else:
        t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
        if ignore and n:
            t[rng.random(n) < 0.3] = -100
            t[0] = -100
    w = backend.tensor(rng.random(r) + 0.1, dtype=dtype) if weight else None
    return x, t, w


def split_kwargs(spec):
    kw = {k: v for k, v in spec.items() if k not in ("weight", "ignore")}
    return kw, bool(spec.get("weight")), bool(spec.get("ignore"))


# ignore_index does not apply to probability targets
CASES = [(spec, prob) for prob in (False, True) for spec in KEYWORDS if not (prob and KEYWORDS[spec].get("ignore"))]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(("spec", "prob"), CASES, ids=[f"{s}-{'prob' if p else 'index'}" for s, p in CASES])
def test_matches_torch(backend, rng, spec, reduction, prob):
    kw, weighted, ignore = split_kwargs(KEYWORDS[spec])
    x, t, w = make_inputs(
        backend, rng, shape_for(backend, big=spec == "all"), prob=prob, weight=weighted, ignore=ignore
    )
    x.requires_grad_()
    loss = gx.cross_entropy(x, t, w, reduction=reduction, backend=backend.name, **kw)
    go = torch.as_tensor(rng.random(loss.shape) + 0.5, dtype=loss.dtype, device=loss.device)
    loss.backward(go)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction=reduction, grad_output=go, **kw)
    assert loss.dtype == torch.float32 and loss.device == x.device
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(x.grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_and_grad_function(backend, rng, reduction):
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), torch.float64, weight=True, ignore=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3, softcap=5.0)
    loss, grad = gx.cross_entropy_and_grad(x, t, w, reduction=reduction, backend=backend.name, **kw)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction=reduction, **kw)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64 and grad.shape == x.shape
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


def test_prob_target_with_smoothing_and_weight_float64(backend, rng):
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), torch.float64, prob=True, weight=True)
    loss, grad = gx.cross_entropy_and_grad(x, t, w, label_smoothing=0.3, backend=backend.name)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, label_smoothing=0.3)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


def test_one_hot_target_equals_index_target(backend, rng):
    x, t, _ = make_inputs(backend, rng, shape_for(backend), torch.float64)
    one_hot = torch.nn.functional.one_hot(t, x.shape[-1]).double()
    a = gx.cross_entropy_and_grad(x, t, backend=backend.name)
    b = gx.cross_entropy_and_grad(x, one_hot, backend=backend.name)
    assert_close(a[0], b[0], torch.float64, "loss")
    assert_close(a[1], b[1], torch.float64, "grad")


def test_backend_writes_every_gradient_element(backend, rng):
    """The backend contract with a NaN-poisoned gradient buffer: every element must be written."""
    module = backends.get(backend.name)
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), weight=True, ignore=True)
    grad = torch.full_like(x, float("nan"))
    loss, lse = module.cross_entropy(
        x, t, w, ignore_index=-100, label_smoothing=0.1, z_loss=0.0, softcap=None, grad_scale=None, grad=grad
    )
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction="none", label_smoothing=0.1)
    assert not torch.isnan(grad).any()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
    kept = t != -100
    assert_close(lse[kept], torch.logsumexp(x.double(), -1)[kept], torch.float32, "lse")


def test_inplace_grad(backend, rng):
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), weight=True, ignore=True)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3)
    buf = x.clone()
    loss, grad = gx.cross_entropy_and_grad(
        buf, t, w, label_smoothing=0.1, z_loss=1e-3, backend=backend.name, inplace_grad=True
    )
    assert grad.data_ptr() == buf.data_ptr()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_inplace_grad_with_softcap(backend, rng):
    x, t, _ = make_inputs(backend, rng, shape_for(backend))
    ref_loss, ref_grad = reference_cross_entropy(x, t, softcap=2.0)
    buf = x.clone()
    loss, grad = gx.cross_entropy_and_grad(buf, t, softcap=2.0, backend=backend.name, inplace_grad=True)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_inputs_are_not_mutated(backend, rng):
    x, t, w = make_inputs(backend, rng, shape_for(backend), weight=True, ignore=True)
    copies = [x.clone(), t.clone(), w.clone()]
    x.requires_grad_()
    gx.cross_entropy(x, t, w, label_smoothing=0.1, backend=backend.name).backward()
    gx.cross_entropy_and_grad(x.detach(), t, w, backend=backend.name)
    for a, b in zip((x.detach(), t, w), copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(backend, rng, reduction):
    x, _, w = make_inputs(backend, rng, shape_for(backend), weight=True)
    t = torch.full(x.shape[:1], -100, dtype=torch.int64, device=x.device)
    x.requires_grad_()
    loss = gx.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, backend=backend.name)
    loss.sum().backward()
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1)
    assert_close(loss, ref_loss, torch.float32, "loss")  # NaN for the mean, as in torch
    assert_close(x.grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_empty_batch(backend, reduction, prob):
    x = torch.zeros(0, 7, device=backend.device, requires_grad=True)
    t = torch.zeros(0, 7, device=backend.device) if prob else torch.zeros(0, dtype=torch.int64, device=backend.device)
    loss = gx.cross_entropy(x, t, reduction=reduction, backend=backend.name)
    loss.sum().backward()
    ref_loss, ref_grad = reference_cross_entropy(x, t, reduction=reduction)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert x.grad.shape == (0, 7)


def test_single_class(backend, rng):
    x, _, _ = make_inputs(backend, rng, (5, 1))
    t = torch.zeros(5, dtype=torch.int64, device=x.device)
    loss, grad = gx.cross_entropy_and_grad(x, t, label_smoothing=0.3, z_loss=0.1, backend=backend.name)
    ref_loss, ref_grad = reference_cross_entropy(x, t, label_smoothing=0.3, z_loss=0.1)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_extreme_logits_and_neg_inf(backend, rng):
    n, r = shape_for(backend, big=True)
    x64 = rng.standard_normal((n, r)) * 1e4
    t_np = rng.integers(0, r, n)
    x64[rng.random((n, r)) < 0.2] = -np.inf
    x64[np.arange(n), t_np] = rng.standard_normal(n) * 1e4  # the target stays finite
    x64[1, :] = -np.inf  # a row of -inf but for its target
    x64[1, t_np[1]] = 0.0
    x = backend.tensor(x64, dtype=torch.float32)
    t = backend.tensor(t_np, dtype=torch.int64)
    for kw in ({}, {"z_loss": 1e-6}, {"softcap": 50.0}):
        loss, grad = gx.cross_entropy_and_grad(x, t, reduction="none", backend=backend.name, **kw)
        ref_loss, ref_grad = reference_cross_entropy(x, t, reduction="none", **kw)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert_close(loss, ref_loss, torch.float32, f"loss {kw}")
        assert_close(grad, ref_grad, torch.float32, f"grad {kw}")


def test_non_contiguous_inputs(backend, rng):
    n, r = shape_for(backend)
    base = backend.tensor(rng.standard_normal((r, n)) * 2)
    transposed = base.t()  # (n, r) with class stride n
    wide = backend.tensor(rng.standard_normal((n, 2 * r)))
    sliced = wide[:, ::2]  # class stride 2
    rows = backend.tensor(rng.standard_normal((2 * n, r)))[::2]  # row stride 2r
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    for x in (transposed, sliced, rows):
        assert not x.is_contiguous()
        loss, grad = gx.cross_entropy_and_grad(x, t, label_smoothing=0.1, backend=backend.name)
        ref_loss, ref_grad = reference_cross_entropy(x, t, label_smoothing=0.1)
        assert_close(loss, ref_loss, torch.float32, "loss")
        assert_close(grad, ref_grad, torch.float32, "grad")


def test_leading_axes_are_rows(backend, rng):
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((2, n, r))).requires_grad_()
    t = backend.tensor(rng.integers(0, r, (2, n)), dtype=torch.int64)
    loss = gx.cross_entropy(x, t, reduction="none", backend=backend.name)
    assert loss.shape == (2, n)
    go = torch.rand_like(loss)
    loss.backward(go)
    ref_loss, ref_grad = reference_cross_entropy(x, t, reduction="none", grad_output=go)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(x.grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_half_inputs(backend, rng, dtype, prob):
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), dtype, prob=prob, weight=True)
    x.requires_grad_()
    loss = gx.cross_entropy(x, t, w, label_smoothing=0.1, backend=backend.name)
    loss.backward()
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, label_smoothing=0.1)
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(x.grad, ref_grad, dtype, "grad")


def test_bfloat16_true_class_gradient_near_one(backend, rng):
    """p_target close to 1: the gradient p - 1 must come from float32, not a rounded bf16 p."""
    n, r = shape_for(backend)
    x = torch.zeros(n, r, dtype=torch.bfloat16, device=backend.device)
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    x[torch.arange(n), t] = torch.as_tensor(rng.uniform(8, 14, n), dtype=torch.bfloat16).to(backend.device)
    loss, grad = gx.cross_entropy_and_grad(x, t, reduction="sum", backend=backend.name)
    _, ref_grad = reference_cross_entropy(x, t, reduction="sum")
    got = grad[torch.arange(n), t].double().cpu()
    want = ref_grad[torch.arange(n), t.cpu()]
    torch.testing.assert_close(got, want, rtol=1e-2, atol=0.0)


def test_numpy_in_numpy_out(backend, rng):
    if backend.device.type != "cpu":
        pytest.skip("numpy arrays live on the CPU")
    n, r = shape_for(backend)
    x = rng.standard_normal((n, r)).astype(np.float32)
    t = rng.integers(0, r, n)
    loss = gx.cross_entropy(x, t, backend=backend.name)
    loss2, grad = gx.cross_entropy_and_grad(x, t, backend=backend.name)
    rows = gx.cross_entropy(x, t, reduction="none", backend=backend.name)
    ref_loss, ref_grad = reference_cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
    assert isinstance(loss, np.floating) and isinstance(grad, np.ndarray) and isinstance(rows, np.ndarray)
    assert grad.dtype == np.float32 and rows.shape == (n,)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(loss2, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")
    buf = x.copy()
    loss3, grad3 = gx.cross_entropy_and_grad(buf, t, backend=backend.name, inplace_grad=True)
    assert np.shares_memory(grad3, buf)  # the gradient was written over the caller's array
    assert_close(grad3, ref_grad, torch.float32, "in-place grad")


def test_target_gradient_of_probability_targets(backend, rng):
    """Soft targets are differentiable in torch (distillation): so they are here."""
    x, t, w = make_inputs(backend, rng, shape_for(backend), torch.float64, prob=True, weight=True)
    t.requires_grad_()
    x.requires_grad_()
    loss = gx.cross_entropy(x, t, w, label_smoothing=0.2, softcap=3.0, backend=backend.name)
    loss.backward()
    x2 = x.detach().cpu().clone().requires_grad_()
    t2 = t.detach().cpu().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(3.0 * torch.tanh(x2 / 3.0), t2, w.cpu(), label_smoothing=0.2)
    ref.backward()
    assert_close(t.grad, t2.grad, torch.float64, "target grad")
    assert_close(x.grad, x2.grad, torch.float64, "logits grad")


def test_nn_module(backend, rng):
    x, t, w = make_inputs(backend, rng, shape_for(backend), weight=True, ignore=True)
    x.requires_grad_()
    module = gx.nn.CrossEntropyLoss(weight=w, label_smoothing=0.1, reduction="sum", backend=backend.name)
    module(x, t).backward()
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction="sum", label_smoothing=0.1)
    assert_close(module(x.detach(), t), ref_loss, torch.float32, "loss")
    assert_close(x.grad, ref_grad, torch.float32, "grad")


def test_deterministic(backend, rng):
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), weight=True)
    a = gx.cross_entropy_and_grad(x, t, w, label_smoothing=0.1, backend=backend.name)
    b = gx.cross_entropy_and_grad(x, t, w, label_smoothing=0.1, backend=backend.name)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph(backend, rng, reduction):
    """A model using the loss compiles with fullgraph=True (no graph break): dynamo traces the
    dispatch, the custom op's fake kernel gives the shapes, and the gradients stay exact."""
    torch._dynamo.reset()
    n, r = shape_for(backend)
    proj = torch.nn.Linear(8, r).to(backend.device)
    h = backend.tensor(rng.standard_normal((n, 8)), dtype=torch.float32)
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    w = backend.tensor(rng.random(r) + 0.5, dtype=torch.float32)

    def step(h, t):
        loss = gx.cross_entropy(
            proj(h), t, w, label_smoothing=0.1, z_loss=1e-3, reduction=reduction, backend=backend.name
        )
        return loss.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(h, t)
    loss.backward()
    grads = [p.grad.clone() for p in proj.parameters()]
    proj.zero_grad()
    logits = proj(h)
    ref_loss, ref_grad = reference_cross_entropy(logits, t, w, label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
    assert_close(loss, ref_loss.sum(), torch.float32, "loss")
    logits.backward(ref_grad.float().to(backend.device))
    for got, p in zip(grads, proj.parameters()):
        assert_close(got, p.grad, torch.float32, "parameter grad", scale=10)


def test_inplace_grad_through_autograd(backend, rng):
    """With inplace_grad=True the backward gets the gradient that was written over the logits."""
    n, r = shape_for(backend, big=True)
    proj = torch.nn.Linear(6, r).to(backend.device)
    h = backend.tensor(rng.standard_normal((n, 6)), dtype=torch.float32)
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    logits = proj(h)
    ref_loss, ref_grad = reference_cross_entropy(logits, t, label_smoothing=0.1)
    loss = gx.cross_entropy(logits, t, label_smoothing=0.1, backend=backend.name, inplace_grad=True)
    loss.backward()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(logits.detach(), ref_grad, torch.float32, "gradient in the logits buffer")
    assert_close(proj.bias.grad, ref_grad.sum(0), torch.float32, "bias grad", scale=10)


@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_blocks_of_neg_inf_keep_the_smoothing_gradient(backend, rng, prob):
    """Whole chunks/blocks of -inf logits: p = 0 there, but label smoothing and soft targets still
    give those classes a gradient (regression: a skipped all -inf chunk left it at 0)."""
    n, r = shape_for(backend, big=True)
    x, t, w = make_inputs(backend, rng, (n, r), torch.float64, prob=prob, weight=True)
    x[:, r // 2 :] = -float("inf")
    if not prob:
        t = t % (r // 2)
    loss, grad = gx.cross_entropy_and_grad(x, t, w, label_smoothing=0.1, backend=backend.name)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, label_smoothing=0.1)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


# --------------------------------------------------------------------------- the backend contract, in detail


def _backend_call(backend, x, t, w, grad, grad_scale=None, **kw):
    """The backend's own entry point, with targets and weights in the compute dtype as functional passes them."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = t.to(dt) if t.is_floating_point() else t
    w = None if w is None else w.to(dt)
    opts = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None) | kw
    return backends.get(backend.name).cross_entropy(x, t, w, grad_scale=grad_scale, grad=grad, **opts)


def assert_rounded_once(grad, ref, dtype, what):
    """A half-precision gradient within half an ulp (plus float32 noise) of the float64 reference: a
    gradient rounded twice (an exponential stored in half, then rescaled) is off by up to an ulp."""
    mantissa = {torch.bfloat16: 8, torch.float16: 11}[dtype]
    ref = ref.double().cpu()
    got = grad.double().cpu()
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(torch.finfo(dtype).tiny)))
    half_ulp = torch.exp2(exponent - mantissa)
    # float32 noise: relative to the row's terms (coef p_j and the target mass, of the size of the row's
    # largest gradient), not to a small element that is their difference (seed 2900978059: 3e-9 at 6.6e-5)
    row_scale = ref.abs().amax(-1, keepdim=True) if ref.dim() else ref.abs()
    tol = half_ulp + 1e-5 * ref.abs() + 4 * 2.0**-24 * row_scale + 1e-9
    bad = ~((got - ref).abs() <= tol)
    assert not bad.any(), f"{what}: {int(bad.sum())} elements off by over half an ulp: {got[bad][:3]}, {ref[bad][:3]}"


ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
GRAD_SPECS = {
    "plain": {},
    "all": {"label_smoothing": 0.15, "weight": True, "ignore": True, "z_loss": 1e-3, "softcap": 4.0},
    "prob+all": {"prob": True, "label_smoothing": 0.1, "weight": True, "z_loss": 1e-2, "softcap": 3.0},
}


def _grad_cases():
    """dtype x keywords x (a fresh gradient | in place) x (long | short rows), as a pairwise cover: each pair of
    values of any two of them in some case, 12 cases instead of the product's 48 (each (dtype, keywords, in place)
    is a kernel variant that numba compiles, about a second each)."""
    for i, dtype in enumerate(ALL_DTYPES):
        for j, spec in enumerate(GRAD_SPECS):
            inplace, short = (i + j) % 2 == 1, (i // 2 + j) % 2 == 1
            name = f"{str(dtype)[6:]}-{spec}-{'inplace' if inplace else 'fresh'}-{'short' if short else 'long'}-rows"
            yield pytest.param(dtype, spec, inplace, short, id=name)


@pytest.mark.parametrize(("dtype", "spec", "inplace", "short"), list(_grad_cases()))
def test_backend_gradient_in_every_dtype(backend, rng, dtype, spec, inplace, short):
    """The backend writes the gradient itself, in the logits' dtype, rounded once: into a NaN-poisoned
    buffer or over the logits, long rows (several chunks) and short ones; against float64 torch."""
    opts = dict(GRAD_SPECS[spec])
    prob = opts.pop("prob", False)
    weighted, ignore = opts.pop("weight", False), opts.pop("ignore", False)
    n, r = shape_for(backend, big=True)
    if short:
        n, r = (6, 16) if backend.interpreted else (64, 128)
    x, t, w = make_inputs(backend, rng, (n, r), dtype, prob=prob, weight=weighted, ignore=ignore)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction="none", **opts)
    grad = torch.full_like(x, float("nan"))
    if inplace:
        x = x.clone()
        grad = x
    loss, _ = _backend_call(backend, x, t, w, grad, **opts)
    assert not torch.isnan(grad).any(), "an element of the gradient was not written"
    assert_close(loss, ref_loss, torch.float32 if dtype != torch.float64 else dtype, "loss")
    _assert_grad(backend, grad, ref_grad, dtype)


def _assert_grad(backend, grad, ref_grad, dtype):
    """Half gradients rounded once from float64; except bfloat16 under Triton's interpreter, which
    truncates float32 -> bfloat16 stores (a GPU rounds to nearest even): there within the tolerance."""
    if dtype in (torch.bfloat16, torch.float16) and not (backend.interpreted and backend.name == "triton"):
        assert_rounded_once(grad, ref_grad, dtype, "grad")
    else:
        assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh", "inplace"])
def test_backend_per_row_grad_scale(backend, rng, dtype, inplace):
    """grad_scale with one factor per row (a grad_output folded into the gradient, one rounding)."""
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), dtype, weight=True, ignore=True)
    n = x.shape[0]
    scale = backend.tensor(rng.standard_normal(n) * 2, dtype=torch.float32)
    _, ref_grad = reference_cross_entropy(x, t, w, reduction="none", label_smoothing=0.1, grad_output=scale)
    grad = torch.full_like(x, float("nan"))
    if inplace:
        x = x.clone()
        grad = x
    _backend_call(backend, x, t, w, grad, grad_scale=scale, label_smoothing=0.1)
    _assert_grad(backend, grad, ref_grad, dtype)


def test_backend_grad_scale_forms(backend, rng):
    """grad_scale as None, a python float and a 1-element tensor: the same gradient times the factor."""
    x, t, w = make_inputs(backend, rng, shape_for(backend, big=True), weight=True, ignore=True)
    _, ref_grad = reference_cross_entropy(x, t, w, reduction="none", label_smoothing=0.1)
    for scale, factor in ((None, 1.0), (0.25, 0.25), (backend.tensor([-1.5], dtype=torch.float32), -1.5)):
        grad = torch.full_like(x, float("nan"))
        _backend_call(backend, x, t, w, grad, grad_scale=scale, label_smoothing=0.1)
        assert_close(grad, ref_grad * factor, torch.float32, f"grad, grad_scale={scale}")


NEG_INF_CASES = CASES + [("all", True)]
NEG_INF_IDS = [f"{s}-{'prob' if p else 'index'}" for s, p in NEG_INF_CASES]


@pytest.mark.parametrize(("spec", "prob"), NEG_INF_CASES, ids=NEG_INF_IDS)
def test_rows_of_neg_inf_match_torch(backend, rng, spec, prob):
    """A row of -inf has no softmax: torch gives NaN loss and gradient (a softcap makes the row finite).
    -inf in only some chunks keeps a finite row. An ignored row counts for nothing: loss and gradient 0
    (torch's gradient is NaN there, log_softmax's backward multiplying a NaN softmax by 0)."""
    kw, weighted, ignore = split_kwargs(KEYWORDS[spec])
    n, r = shape_for(backend, big=True)
    x, t, w = make_inputs(backend, rng, (n, r), torch.float64, prob=prob, weight=weighted, ignore=ignore and not prob)
    x[0] = -float("inf")  # ignored when the case ignores rows
    x[1] = -float("inf")
    x[2, : r // 2] = -float("inf")
    if not prob:
        t[1] = int(rng.integers(0, r))
        t[2] = r // 2 + int(rng.integers(0, r - r // 2))
    x.requires_grad_()
    loss = gx.cross_entropy(x, t, w, reduction="none", backend=backend.name, **kw)
    go = torch.as_tensor(rng.random(loss.shape) + 0.5, dtype=loss.dtype, device=loss.device)
    loss.backward(go)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, reduction="none", grad_output=go, **kw)
    assert torch.isnan(ref_grad[1]).all() != bool(kw.get("softcap"))  # the reference itself: NaN unless capped
    if not prob:
        ref_grad[t.cpu() == -100] = 0
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(x.grad, ref_grad, torch.float64, "grad")
