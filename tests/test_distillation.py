"""gx.distillation_loss and gx.nn.DistillationLoss on every backend against float64 PyTorch autograd on
the unfused formula (log_softmax of both rows and F.kl_div)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close

import gpuxent as gx
from gpuxent import backends

# The interpreters evaluate -inf - -inf or inf - inf (masked lanes, rows without a softmax) with numpy
# scalars, which warn; on a GPU the same NaN comes silently, and the kernels mask or report it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:gpuxent.backends.numba_cuda"),
]

DIVERGENCES = ["kl", "reverse_kl", "jsd"]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def torch_distillation_rows(student, teacher, divergence, beta, temperature):
    """Per-row ``temperature**2 * divergence`` in torch ops (F.kl_div takes probabilities where a
    probability may be 0, so that 0 log 0 = 0)."""
    log_ps = F.log_softmax(student / temperature, -1)
    log_pt = F.log_softmax(teacher / temperature, -1)
    if divergence == "kl":
        rows = F.kl_div(log_ps, log_pt.exp(), reduction="none").sum(-1)
    elif divergence == "reverse_kl":
        rows = F.kl_div(log_pt, log_ps, reduction="none", log_target=True).sum(-1)
    else:
        log_m = torch.log(beta * log_pt.exp() + (1 - beta) * log_ps.exp())
        rows = beta * F.kl_div(log_m, log_pt.exp(), reduction="none").sum(-1)
        rows = rows + (1 - beta) * F.kl_div(log_m, log_ps, reduction="none", log_target=True).sum(-1)
    return temperature**2 * rows


def reference(student, teacher, divergence="kl", beta=0.5, temperature=1.0, target=None, reduction="batchmean",
              grad_output=None):  # fmt: skip
    """``(loss, d(loss * grad_output)/d student)`` in float64 on the CPU, for ``(..., r)`` logits."""
    r = student.shape[-1]
    x = student.detach().cpu().double().requires_grad_()
    rows = torch_distillation_rows(x.reshape(-1, r), teacher.detach().cpu().double().reshape(-1, r), divergence,
                                   beta, temperature)  # fmt: skip
    kept = torch.ones_like(rows, dtype=torch.bool) if target is None else target.cpu().reshape(-1) != -100
    rows = torch.where(kept, rows, 0)
    n_kept = kept.sum().double()
    loss = {
        "none": rows.reshape(student.shape[:-1]),
        "sum": rows.sum(),
        "batchmean": rows.sum() / n_kept,
        "mean": rows.sum() / (n_kept * r),
    }[reduction]
    go = torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().double()
    (loss * go).sum().backward()
    return loss.detach(), x.grad


def make(backend, rng, shape, dtype=torch.float32, scale=3.0, ignore=True):
    s = backend.tensor(rng.standard_normal(shape) * scale, dtype=dtype)
    t = backend.tensor(rng.standard_normal(shape) * scale, dtype=dtype)
    target = None
    if ignore:
        target = backend.tensor(rng.integers(0, shape[-1], shape[:-1]), dtype=torch.int64)
        target.view(-1)[rng.random(target.numel()) < 0.3] = -100
        target.view(-1)[0] = -100
    return s, t, target


def shape_for(backend, big=False):
    """Several chunks (CPU: 2048) / blocks (Triton interpreter: 64) / threads per row with a masked tail."""
    if backend.interpreted:
        return (2, 3, 150) if big else (5, 37)
    return (3, 4, 5000) if big else (16, 77)


def run(backend, s, t, go=None, **kw):
    """(loss, student gradient) through autograd, with grad_output ``go`` (random when None)."""
    x = s.clone().requires_grad_()
    loss = gx.distillation_loss(x, t, backend=backend.name, **kw)
    if go is None:
        go = torch.rand(loss.shape, dtype=loss.dtype, device=loss.device) + 0.5
    loss.backward(go)
    return loss, x.grad, go


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_matches_torch(backend, rng, divergence, reduction):
    s, t, target = make(backend, rng, shape_for(backend, big=True))
    kw = dict(divergence=divergence, beta=0.3, temperature=2.5, target=target, reduction=reduction)
    loss, grad, go = run(backend, s, t, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert loss.dtype == torch.float32 and loss.device == s.device and grad.dtype == s.dtype
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize(("beta", "temperature"), [(1e-3, 1.0), (0.5, 0.5), (0.999, 4.0)])
def test_jsd_beta_and_temperature_float64(backend, rng, beta, temperature):
    s, t, target = make(backend, rng, shape_for(backend), torch.float64)
    kw = dict(divergence="jsd", beta=beta, temperature=temperature, target=target, reduction="sum")
    loss, grad, go = run(backend, s, t, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert loss.dtype == torch.float64
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_dtypes(backend, rng, dtype, divergence):
    """Half inputs computed in float32 from their values, the gradient rounded once; the loss float32."""
    s, t, target = make(backend, rng, shape_for(backend), dtype)
    kw = dict(divergence=divergence, temperature=1.5, target=target, reduction="batchmean")
    loss, grad, go = run(backend, s, t, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_none_with_per_row_grad_output(backend, rng, dtype):
    """reduction='none' with a different upstream gradient per row: exact (half: recomputed with the
    per-row factor in the kernel's float32 scale, one rounding)."""
    s, t, target = make(backend, rng, shape_for(backend, big=True), dtype)
    go = torch.as_tensor(rng.random(s.shape[:-1]) * 10 - 5, dtype=torch.float32, device=s.device)
    kw = dict(divergence="jsd", beta=0.7, temperature=2.0, target=target, reduction="none")
    loss, grad, _ = run(backend, s, t, go=go, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert loss.shape == s.shape[:-1]
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    if dtype == torch.bfloat16:  # one rounding: the same as rounding the float64 reference
        assert (grad.float() - ref_grad.to(dtype).float()).abs().max() <= ref_grad.abs().max() * 2**-7


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_extreme_logits(backend, rng, divergence):
    """Logits of size 1e4 (float64, where a rounded lse would show), and -inf in the teacher where the
    divergence stays finite (kl, jsd: classes the teacher rules out)."""
    s, t, _ = make(backend, rng, shape_for(backend), torch.float64, scale=1e4, ignore=False)
    if divergence != "reverse_kl":
        t[:, ::3] = -float("inf")
    kw = dict(divergence=divergence, beta=0.4, temperature=300.0, reduction="sum")
    loss, grad, go = run(backend, s, t, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, ref_loss, torch.float64, "loss", scale=1e3)
    assert_close(grad, ref_grad, torch.float64, "grad", scale=1e3)
    # float32, sharp softmaxes (temperature 1 on logits of size 30): near one-hot rows
    s, t, _ = make(backend, rng, shape_for(backend), torch.float32, scale=30.0, ignore=False)
    if divergence != "reverse_kl":
        t[:, 1::4] = -float("inf")
    kw["temperature"] = 1.0
    loss, grad, go = run(backend, s, t, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert_close(loss, ref_loss, torch.float32, "loss", scale=10)
    assert_close(grad, ref_grad, torch.float32, "grad", scale=10)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(backend, rng, reduction):
    """No kept row: a mean is NaN (0/0, as torch), a sum 0; the gradient is 0 everywhere, never NaN."""
    s, t, _ = make(backend, rng, shape_for(backend), ignore=False)
    target = torch.full(s.shape[:-1], -100, dtype=torch.int64, device=s.device)
    loss, grad, _ = run(backend, s, t, go=None, divergence="reverse_kl", target=target, reduction=reduction)
    if reduction in ("batchmean", "mean"):
        assert torch.isnan(loss)
    else:
        assert (loss == 0).all()
    assert (grad == 0).all()


@pytest.mark.parametrize("short", [False, True], ids=["long-rows", "short-rows"])
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_backend_writes_every_element(backend, rng, divergence, short):
    """The backend entry point writes every gradient element of a NaN-poisoned buffer (ignored rows 0),
    with a per-row grad_scale; short rows: several rows per program / block, the last one partly empty."""
    s, t, target = make(backend, rng, (7, 10) if short else shape_for(backend, big=True))
    s2, t2, tg = s.reshape(-1, s.shape[-1]), t.reshape(-1, s.shape[-1]), target.reshape(-1)
    scale = torch.as_tensor(rng.random(s2.shape[0]) + 0.5, dtype=torch.float32, device=s.device)
    grad = torch.full_like(s2, float("nan"))
    loss = backends.get(backend.name).distillation(
        s2, t2, tg, divergence=divergence, beta=0.6, temperature=1.7, ignore_index=-100, grad_scale=scale, grad=grad
    )
    ref_loss, ref_grad = reference(s2, t2, divergence, 0.6, 1.7, tg, "none", grad_output=scale)
    assert not torch.isnan(grad).any()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_no_target_numpy_and_module(backend, rng):
    """Without a target every row counts; numpy in, numpy out; the module equals the function."""
    s, t, _ = make(backend, rng, shape_for(backend), torch.float64, ignore=False)
    ref_loss, _ = reference(s, t, "kl", temperature=2.0)
    module = gx.nn.DistillationLoss(temperature=2.0, backend=backend.name)
    assert_close(module(s, t), ref_loss, torch.float64, "module")
    if s.device.type == "cpu":
        got = gx.distillation_loss(s.numpy(), t.numpy(), temperature=2.0, backend=backend.name)
        assert isinstance(got, (np.ndarray, np.floating))
        assert_close(torch.as_tensor(got), ref_loss, torch.float64, "numpy")


def test_teacher_gets_no_gradient_and_other_dtype(backend, rng):
    s, t, _ = make(backend, rng, shape_for(backend), ignore=False)
    teacher = t.double().requires_grad_()
    loss, grad, go = run(backend, s, teacher, divergence="kl")
    ref_loss, ref_grad = reference(s, t.double(), grad_output=go)
    assert teacher.grad is None
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


def test_empty_batch(backend):
    s = torch.zeros(0, 5, device=backend.device, requires_grad=True)
    loss = gx.distillation_loss(s, torch.zeros(0, 5, device=backend.device), backend=backend.name)
    assert torch.isnan(loss)
    loss = gx.distillation_loss(s, torch.zeros(0, 5, device=backend.device), reduction="sum", backend=backend.name)
    loss.backward()
    assert loss.item() == 0 and s.grad.shape == (0, 5)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_second_derivative(rng, divergence):
    """create_graph=True: the backward is torch ops, differentiated again as PyTorch does."""
    s = torch.as_tensor(rng.standard_normal((4, 9)), dtype=torch.float64)
    t = torch.as_tensor(rng.standard_normal((4, 9)), dtype=torch.float64)
    target = torch.tensor([1, -100, 2, 3])
    v = torch.as_tensor(rng.standard_normal((4, 9)), dtype=torch.float64)
    hvps = []
    for fn in (gx.distillation_loss, None):
        x = s.clone().requires_grad_()
        kw = dict(divergence=divergence, beta=0.3, temperature=1.5, target=target)
        if fn is None:
            rows = torch.where(target != -100, torch_distillation_rows(x, t, divergence, 0.3, 1.5), 0)
            loss = rows.sum() / 3
        else:
            loss = fn(x, t, backend="numba_cpu", **kw)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        (hvp,) = torch.autograd.grad((g * v).sum(), x)
        hvps.append((g.detach(), hvp))
    assert_close(hvps[0][0], hvps[1][0], torch.float64, "grad")
    assert_close(hvps[0][1], hvps[1][1], torch.float64, "hvp")


BAD = [
    # (description, kwargs or (student, teacher) builder, error type, argument named)
    ("shapes differ", dict(teacher=lambda s: s[:, :-1]), ValueError, "teacher_logits"),
    ("unknown divergence", dict(divergence="kld"), ValueError, "divergence"),
    ("jsd beta 0", dict(divergence="jsd", beta=0.0), ValueError, "beta"),
    ("jsd beta 1", dict(divergence="jsd", beta=1.0), ValueError, "beta"),
    ("beta not a number", dict(beta="half"), TypeError, "beta"),
    ("temperature 0", dict(temperature=0.0), ValueError, "temperature"),
    ("temperature nan", dict(temperature=float("nan")), ValueError, "temperature"),
    ("unknown reduction", dict(reduction="avg"), ValueError, "reduction"),
    ("float target", dict(target=lambda s: torch.zeros(s.shape[0], device=s.device)), TypeError, "target"),
    ("target shape", dict(target=lambda s: torch.zeros(s.shape[0] + 1, dtype=torch.int64)), ValueError, "target"),
    ("integer student", dict(student=lambda s: s.long()), TypeError, "student_logits"),
    ("scalar student", dict(student=lambda s: s[0, 0], teacher=lambda s: s[0, 0]), ValueError, "student_logits"),
]


@pytest.mark.parametrize(("what", "spec", "error", "name"), BAD, ids=[b[0] for b in BAD])
def test_bad_input(backend, rng, monkeypatch, what, spec, error, name):
    monkeypatch.setattr(backends.get(backend.name), "distillation", lambda *a, **k: pytest.fail("a kernel ran"))
    s = backend.tensor(rng.standard_normal((3, 5)), dtype=torch.float32)
    spec = dict(spec)
    student = spec.pop("student", lambda s: s)(s)
    teacher = spec.pop("teacher", lambda s: s.clone())(s)
    if callable(spec.get("target")):
        spec["target"] = spec["target"](s)
    with pytest.raises(error, match=name):
        gx.distillation_loss(student, teacher, backend=backend.name, **spec)


def test_non_contiguous_inputs(backend, rng):
    """Transposed and strided views give the result of their contiguous copies."""
    base_s = backend.tensor(rng.standard_normal((40, 6)), dtype=torch.float64)
    base_t = backend.tensor(rng.standard_normal((3, 80)), dtype=torch.float64)
    s, t = base_s.T, base_t[:, ::2]  # (6, 40) and (3, 40): classes strided
    s, t = s[:3], t
    loss, grad, go = run(backend, s, t, divergence="reverse_kl", temperature=0.7)
    ref_loss, ref_grad = reference(s, t, "reverse_kl", temperature=0.7, grad_output=go)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(grad, ref_grad, torch.float64, "grad")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_torch_func_vmap_and_compile(rng):
    """torch.func.grad, vmap (batch folded into rows) and torch.compile(fullgraph=True) give PyTorch's values."""
    s = torch.as_tensor(rng.standard_normal((3, 4, 20)))
    t = torch.as_tensor(rng.standard_normal((3, 4, 20)))

    def ours(x, y):
        return gx.distillation_loss(x, y, divergence="jsd", beta=0.3, temperature=2.0, backend="numba_cpu")

    def theirs(x, y):
        return torch_distillation_rows(x.reshape(-1, 20), y.reshape(-1, 20), "jsd", 0.3, 2.0).sum() / (x.numel() // 20)

    assert_close(torch.func.grad(ours)(s, t), torch.func.grad(theirs)(s, t), torch.float64, "func.grad")
    assert_close(torch.vmap(ours)(s, t), torch.vmap(theirs)(s, t), torch.float64, "vmap")
    got = torch.vmap(torch.func.grad(ours))(s, t)
    assert_close(got, torch.vmap(torch.func.grad(theirs))(s, t), torch.float64, "vmap(grad)")
    x = s.clone().requires_grad_()
    loss = torch.compile(ours, fullgraph=True)(x, t)
    loss.backward()
    ref_loss, ref_grad = reference(s, t, "jsd", 0.3, 2.0)
    assert_close(loss, ref_loss, torch.float64, "compiled loss")
    assert_close(x.grad, ref_grad, torch.float64, "compiled grad")


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_rows_without_softmax_are_nan(backend, rng, divergence):
    """A row holding a NaN or +inf, or all -inf, in either input is NaN in loss and gradient, as in torch;
    the other rows are unaffected."""
    s, t, _ = make(backend, rng, (6, 40), ignore=False)
    s[0, 3] = float("nan")
    t[1, 5] = float("nan")
    t[2] = -float("inf")
    s[3] = -float("inf")
    s[4, 7] = float("inf")
    kw = dict(divergence=divergence, temperature=1.3, reduction="none")
    loss, grad, go = run(backend, s, t, **kw)
    ref_loss, ref_grad = reference(s, t, grad_output=go, **kw)
    assert torch.isnan(loss[:5]).all() and torch.isnan(grad[:5]).all()
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad[5], ref_grad[5], torch.float32, "grad")
