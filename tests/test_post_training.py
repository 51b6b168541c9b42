"""Post-training on the fused linear head (issue 25): gx.linear_log_probs (temperature, entropy, any
upstream gradients), gx.linear_distillation_loss (two heads of different widths), and the GRPO and
DPO examples, against float64 PyTorch on materialised logits, on every backend."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from test_distillation import torch_distillation_rows

import gpuxent as gx
from gpuxent import backends

pytestmark = [
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:triton.runtime.interpreter"),
    pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning:gpuxent.backends.numba_cuda"),
]

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def sizes_for(backend):
    """(batch shape, d, r, chunk_size): several chunks with a short last one; tiny under an interpreter."""
    if backend.interpreted:
        return (2, 3), 8, 37, 4
    return (3, 5), 12, 97, 4


def make(backend, rng, batch, d, r, dtype=torch.float64, bias=True, ignore=True):
    def tensor(a):
        return backend.tensor(a, dtype=dtype).requires_grad_()

    hidden = tensor(rng.standard_normal((*batch, d)))
    weight = tensor(rng.standard_normal((r, d)) * (3 / np.sqrt(d)))
    b = tensor(rng.standard_normal(r) * 0.5) if bias else None
    target = backend.tensor(rng.integers(0, r, batch), dtype=torch.int64)
    if ignore:
        target.view(-1)[1] = -100
    return hidden, weight, b, target


def params(hidden, weight, bias):
    return [x for x in (hidden, weight, bias) if x is not None]


def temperature_of(kind, backend, rng, batch):
    if kind == "one":
        return 0.6
    if kind == "unit":
        return 1.0
    return backend.tensor(rng.random(batch) * 1.5 + 0.3, dtype=torch.float64)  # per row


def torch_log_probs(hidden, weight, bias, target, temperature, ignore_index=-100):
    """``(log_probs, entropy)`` per row in float64 torch ops on the (N, r) logits (differentiable)."""
    h, w = hidden.double().cpu(), weight.double().cpu()
    b = None if bias is None else bias.double().cpu()
    t = target.cpu()
    y = F.linear(h, w, b)
    if isinstance(temperature, torch.Tensor):
        y = y / temperature.double().cpu()[..., None]
    else:
        y = y / temperature
    logp = torch.log_softmax(y, -1)
    kept = t != ignore_index
    lp = torch.where(kept, logp.gather(-1, t.clamp(min=0)[..., None])[..., 0], 0)
    ent = torch.where(kept, -(logp.exp() * logp).sum(-1), 0)
    return lp, ent


def leaves64(*xs):
    return [None if x is None else x.detach().cpu().double().requires_grad_() for x in xs]


# --------------------------------------------------------------------------- linear_log_probs


@pytest.mark.parametrize("temp", ["unit", "one", "rows"])
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "logp+entropy"])
def test_log_probs_match_torch(backend, rng, temp, entropy):
    """Values and the gradients of hidden, weight and bias for random per-token upstream gradients
    (advantages times a mask) on both outputs, against float64 torch; leading axes kept."""
    batch, d, r, chunk = sizes_for(backend)
    hidden, weight, bias, target = make(backend, rng, batch, d, r)
    T = temperature_of(temp, backend, rng, batch)
    out = gx.linear_log_probs(hidden, weight, target, bias, temperature=T, entropy=entropy, chunk_size=chunk,
                              backend=backend.name)  # fmt: skip
    assert isinstance(out, gx.LogProbs)
    assert out.log_probs.shape == batch and out.log_probs.dtype == torch.float64
    assert out.log_probs.device == hidden.device
    assert (out.entropy is not None) == entropy
    h64, w64, b64 = leaves64(hidden, weight, bias)
    ref_lp, ref_ent = torch_log_probs(h64, w64, b64, target, T)
    assert_close(out.log_probs, ref_lp, torch.float64, "log_probs", scale=10)
    assert float(out.log_probs.detach().reshape(-1)[1]) == 0.0  # the ignored row
    advantages = torch.as_tensor(rng.standard_normal(batch))
    mask = torch.as_tensor(rng.random(batch) < 0.7)
    objective = (out.log_probs * (advantages * mask).to(hidden.device)).sum()
    ref_objective = (ref_lp * advantages * mask).sum()
    if entropy:
        assert out.entropy.shape == batch
        assert_close(out.entropy, ref_ent, torch.float64, "entropy", scale=10)
        bonus = torch.as_tensor(rng.standard_normal(batch))
        objective = objective + (out.entropy * bonus.to(hidden.device)).sum()
        ref_objective = ref_objective + (ref_ent * bonus).sum()
    grads = torch.autograd.grad(objective, params(hidden, weight, bias))
    ref_grads = torch.autograd.grad(ref_objective, params(h64, w64, b64))
    for name, g, rg, p in zip(("hidden", "weight", "bias"), grads, ref_grads, params(hidden, weight, bias)):
        assert g.shape == p.shape and g.dtype == p.dtype and g.device == p.device
        assert_close(g, rg, torch.float64, f"grad {name}", scale=10)


@pytest.mark.parametrize("which", ["log_probs", "entropy"])
def test_log_probs_one_output_differentiated(backend, rng, which):
    """Only one of the two outputs takes part in the loss (the other's gradient is None)."""
    batch, d, r, chunk = sizes_for(backend)
    hidden, weight, bias, target = make(backend, rng, batch, d, r, bias=False)
    out = gx.linear_log_probs(hidden, weight, target, temperature=0.8, entropy=True, chunk_size=chunk,
                              backend=backend.name)  # fmt: skip
    h64, w64 = leaves64(hidden, weight)
    ref = dict(zip(("log_probs", "entropy"), torch_log_probs(h64, w64, None, target, 0.8)))
    go = torch.as_tensor(rng.standard_normal(batch))
    grads = torch.autograd.grad((getattr(out, which) * go.to(hidden.device)).sum(), (hidden, weight))
    ref_grads = torch.autograd.grad((ref[which] * go).sum(), (h64, w64))
    for g, rg in zip(grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float64, which, scale=10)


def assert_no_worse_than_torch(actual, torch_same_dtype, reference, dtype, what, factor=3.0):
    """``actual``'s mean absolute error against the float64 ``reference`` is at most ``factor`` times that
    of PyTorch's own computation in the same dtype (plus the dtype's absolute tolerance): half precision
    is judged against half precision, whose rounding of the logits sets the error. (The mean, not the
    largest: two different roundings of a few hundred elements differ a lot in their largest error.)"""
    ref = reference.detach().cpu().double()
    err = (actual.detach().cpu().double() - ref).abs().mean().item()
    torch_err = (torch_same_dtype.detach().cpu().double() - ref).abs().mean().item()
    atol = __import__("conftest").TOL[dtype][1]
    assert err <= factor * torch_err + atol, f"{what}: mean error {err:.3g}, torch's own {dtype}: {torch_err:.3g}"


def torch_half_log_probs(hidden, weight, bias, target, temperature):
    """PyTorch's own computation on half inputs: the half matmul (logits rounded to half), then float32,
    as autocast runs log_softmax."""
    y = F.linear(hidden, weight, bias).float()
    y = y / (temperature.float().to(y.device)[..., None] if isinstance(temperature, torch.Tensor) else temperature)
    logp = torch.log_softmax(y, -1)
    kept = target != -100
    lp = torch.where(kept, logp.gather(-1, target.clamp(min=0)[..., None])[..., 0], 0)
    return lp, torch.where(kept, -(logp.exp() * logp).sum(-1), 0)


@pytest.mark.parametrize("temp", ["one", "rows"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_log_probs_float32_and_half(backend, rng, dtype, temp):
    """float32 outputs for half inputs, gradients in the parameters' dtype; against float64 torch on the
    same (rounded) inputs, no further from it than PyTorch's own computation in that dtype."""
    batch, d, r, chunk = sizes_for(backend)
    hidden, weight, bias, target = make(backend, rng, batch, d, r, dtype=dtype)
    T = temperature_of(temp, backend, rng, batch)
    out = gx.linear_log_probs(hidden, weight, target, bias, temperature=T, entropy=True, chunk_size=chunk,
                              backend=backend.name)  # fmt: skip
    assert out.log_probs.dtype == torch.float32 and out.entropy.dtype == torch.float32
    h64, w64, b64 = leaves64(hidden, weight, bias)
    ref_lp, ref_ent = torch_log_probs(h64, w64, b64, target, T)
    own = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    own_lp, own_ent = torch_half_log_probs(*own, target, T)
    scale = 10 if dtype == torch.float32 else 4
    assert_close(out.log_probs, ref_lp, dtype, "log_probs", scale=scale)
    assert_close(out.entropy, ref_ent, dtype, "entropy", scale=scale)
    go, ge = (torch.as_tensor(rng.standard_normal(batch)) for _ in range(2))
    dev = hidden.device

    def objective(lp, ent):
        return (lp * go.to(lp.device, lp.dtype)).sum() + (ent * ge.to(lp.device, lp.dtype)).sum()

    grads = torch.autograd.grad(objective(*out), params(hidden, weight, bias))
    ref_grads = torch.autograd.grad(objective(ref_lp, ref_ent), params(h64, w64, b64))
    own_grads = torch.autograd.grad(objective(own_lp, own_ent), own)
    named = zip(("hidden", "weight", "bias"), grads, ref_grads, own_grads, params(hidden, weight, bias))
    for name, g, rg, og, p in named:
        assert g.dtype == dtype and g.shape == p.shape and g.device == dev
        if dtype == torch.float32:
            assert_close(g, rg, dtype, f"grad {name}", scale=10)
        else:
            assert_no_worse_than_torch(g, og, rg, dtype, f"grad {name}")


def test_log_probs_no_grad_numpy_and_ignore_index(rng):
    hidden, weight, bias, target = make(cpu(), rng, (9,), 6, 11, ignore=False)
    target[3] = 5
    with torch.no_grad():
        out = gx.linear_log_probs(hidden, weight, target, bias, entropy=True, ignore_index=5, chunk_size=2)
    assert not out.log_probs.requires_grad and not out.entropy.requires_grad
    ref_lp, ref_ent = torch_log_probs(hidden.detach(), weight.detach(), bias.detach(), target, 1.0, ignore_index=5)
    assert_close(out.log_probs, ref_lp, torch.float64, "no_grad log_probs")
    assert_close(out.entropy, ref_ent, torch.float64, "no_grad entropy")
    assert out.log_probs[3] == 0 and out.entropy[3] == 0
    np_out = gx.linear_log_probs(*(x.detach().numpy() for x in (hidden, weight, target, bias)), ignore_index=5)
    assert isinstance(np_out.log_probs, np.ndarray) and np_out.entropy is None
    assert_close(np_out.log_probs, ref_lp, torch.float64, "numpy log_probs")


def test_log_probs_second_order_and_func(rng):
    """Differentiated twice (create_graph=True), and under torch.func.grad: through the logits."""
    hidden, weight, bias, target = make(cpu(), rng, (7,), 5, 13)
    T = torch.as_tensor(rng.random(7) + 0.5)
    h64, w64, b64 = leaves64(hidden, weight, bias)
    out = gx.linear_log_probs(hidden, weight, target, bias, temperature=T, entropy=True, chunk_size=3)
    ref_lp, ref_ent = torch_log_probs(h64, w64, b64, target, T)
    (gh,) = torch.autograd.grad((out.log_probs * 2 + out.entropy).sum(), hidden, create_graph=True)
    (rgh,) = torch.autograd.grad((ref_lp * 2 + ref_ent).sum(), h64, create_graph=True)
    assert_close(gh, rgh, torch.float64, "first derivative")
    assert_close(torch.autograd.grad(gh.square().sum(), weight)[0], torch.autograd.grad(rgh.square().sum(), w64)[0],
                 torch.float64, "second derivative", scale=10)  # fmt: skip

    def ours(w):
        o = gx.linear_log_probs(hidden.detach(), w, target, temperature=T, entropy=True)
        return (o.log_probs + 0.5 * o.entropy).sum()

    def theirs(w):
        lp, ent = torch_log_probs(hidden.detach(), w, None, target, T)
        return (lp + 0.5 * ent).sum()

    assert_close(torch.func.grad(ours)(weight.detach()), torch.func.grad(theirs)(w64.detach()), torch.float64, "func")


def test_log_probs_kernel_only_sees_chunks(rng, monkeypatch):
    """No (N, r) logits: the forward's kernel and the backward's get chunks of at most chunk_size rows."""
    seen = []
    module = backends.module("numba_cpu")
    for name in ("cross_entropy", "cross_entropy_backward"):
        real = getattr(module, name)

        def spy(logits, *args, _real=real, _name=name, **kw):
            seen.append((_name, tuple(logits.shape)))
            return _real(logits, *args, **kw)

        monkeypatch.setattr(module, name, spy)
    hidden, weight, bias, target = make(cpu(), rng, (2, 5), 8, 30)
    out = gx.linear_log_probs(hidden, weight, target, bias, entropy=True, chunk_size=4)
    (out.log_probs.sum() - out.entropy.sum()).backward()
    shapes = [(4, 30), (4, 30), (2, 30)]
    assert seen == [("cross_entropy", s) for s in shapes] + [("cross_entropy_backward", s) for s in shapes]


def test_log_probs_bad_input(rng):
    hidden, weight, bias, target = make(cpu(), rng, (4,), 6, 9)
    cases = [
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "temperature", dict(temperature=-1.0)),
        (ValueError, "temperature", dict(temperature=float("nan"))),
        (ValueError, "temperature", dict(temperature=torch.tensor([1.0, 2.0, 0.0, 1.0]))),
        (ValueError, "temperature", dict(temperature=torch.ones(3))),
        (TypeError, "temperature", dict(temperature="hot")),
        (TypeError, "target", dict(target=target.double())),
        (TypeError, "accum_dtype", dict(accum_dtype=torch.int32)),
        (TypeError, "entropy", dict(entropy=1)),
        (ValueError, "target", dict(target=torch.tensor([0, 1, 9, 2]))),
        (ValueError, "chunk_size", dict(chunk_size=0)),
    ]
    for exc, name, bad in cases:
        kw = dict(hidden=hidden, weight=weight, target=target, bias=bias) | bad
        with pytest.raises(exc, match=name):
            gx.linear_log_probs(**kw)


# --------------------------------------------------------------------------- linear_distillation_loss


def torch_linear_distillation(sh, sw, sb, th, tw, tb, target, divergence, beta, temperature, reduction):
    """The loss in float64 torch ops on both materialised logits (differentiable in the student's)."""
    s = F.linear(sh, sw, sb).reshape(-1, sw.shape[0])
    t = F.linear(th, tw, tb).reshape(-1, sw.shape[0])
    rows = torch_distillation_rows(s, t, divergence, beta, temperature)
    kept = torch.ones_like(rows, dtype=torch.bool) if target is None else target.cpu().reshape(-1) != -100
    rows = torch.where(kept, rows, 0)
    n_kept = kept.sum().double()
    return {
        "none": rows.reshape(sh.shape[:-1]),
        "sum": rows.sum(),
        "batchmean": rows.sum() / n_kept,
        "mean": rows.sum() / (n_kept * sw.shape[0]),
    }[reduction]


def make_heads(backend, rng, batch, d_student, d_teacher, r, dtype=torch.float64, teacher_dtype=None):
    sh, sw, sb, target = make(backend, rng, batch, d_student, r, dtype=dtype)
    th, tw, tb, _ = make(backend, rng, batch, d_teacher, r, dtype=teacher_dtype or dtype)
    return sh, sw, sb, th, tw, tb, target


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
def test_distillation_matches_torch(backend, rng, divergence, reduction):
    """Student and teacher heads of different widths; the loss and the student's gradients against float64
    torch on both materialised logits; the teacher gets no gradient."""
    batch, d, r, chunk = sizes_for(backend)
    sh, sw, sb, th, tw, tb, target = make_heads(backend, rng, batch, d, d + 3, r)
    kw = dict(divergence=divergence, beta=0.3, temperature=1.7, reduction=reduction)
    loss = gx.linear_distillation_loss(sh, sw, th, tw, target, student_bias=sb, teacher_bias=tb, chunk_size=chunk,
                                       backend=backend.name, **kw)  # fmt: skip
    s64 = leaves64(sh, sw, sb)
    t64 = [x.detach().cpu().double() for x in (th, tw, tb)]
    ref = torch_linear_distillation(*s64, *t64, target, **kw)
    assert loss.shape == ref.shape and loss.dtype == torch.float64
    assert_close(loss, ref, torch.float64, "loss", scale=10)
    go = torch.as_tensor(rng.random(loss.shape) * 2 + 0.25)
    grads = torch.autograd.grad(loss, [sh, sw, sb], go.to(sh.device))
    ref_grads = torch.autograd.grad(ref, s64, go)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float64, f"grad student {name}", scale=10)
    assert th.grad is None and tw.grad is None and tb.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_distillation_float32_and_half(backend, rng, dtype):
    """A half student against a float32 teacher (its logits cast to the student's dtype), no target."""
    batch, d, r, chunk = sizes_for(backend)
    sh, sw, sb, th, tw, tb, _ = make_heads(backend, rng, batch, d, d - 3, r, dtype=dtype, teacher_dtype=torch.float32)
    loss = gx.linear_distillation_loss(sh, sw, th, tw, student_bias=sb, teacher_bias=tb, divergence="jsd",
                                       temperature=2.0, chunk_size=chunk, backend=backend.name)  # fmt: skip
    assert loss.dtype == torch.float32
    s64 = leaves64(sh, sw, sb)
    t64 = [x.detach().cpu().double() for x in (th, tw, tb)]
    ref = torch_linear_distillation(*s64, *t64, None, "jsd", 0.5, 2.0, "batchmean")
    scale = 10 if dtype == torch.float32 else 2
    assert_close(loss, ref, dtype, "loss", scale=scale)
    grads = torch.autograd.grad(loss * 3, [sh, sw, sb])
    ref_grads = torch.autograd.grad(ref * 3, s64)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert g.dtype == dtype
        assert_close(g, rg, dtype, f"grad {name}", scale=scale * 2)


def test_distillation_kernel_only_sees_chunks_and_second_order(rng, monkeypatch):
    sh, sw, sb, th, tw, tb, target = make_heads(cpu(), rng, (11,), 6, 4, 20)
    s64 = leaves64(sh, sw, sb)
    t64 = [x.detach().double() for x in (th, tw, tb)]
    loss = gx.linear_distillation_loss(sh, sw, th, tw, target, student_bias=sb, teacher_bias=tb, chunk_size=4)
    (gh,) = torch.autograd.grad(loss, sh, create_graph=True)
    (rgh,) = torch.autograd.grad(torch_linear_distillation(*s64, *t64, target, "kl", 0.5, 1.0, "batchmean"), s64[0],
                                 create_graph=True)  # fmt: skip
    assert_close(gh, rgh, torch.float64, "first derivative")
    assert_close(torch.autograd.grad(gh.square().sum(), sw)[0], torch.autograd.grad(rgh.square().sum(), s64[1])[0],
                 torch.float64, "second derivative", scale=10)  # fmt: skip
    seen = []
    module = backends.module("numba_cpu")
    real = module.distillation

    def spy(student, teacher, *args, **kw):
        seen.append((tuple(student.shape), tuple(teacher.shape)))
        return real(student, teacher, *args, **kw)

    monkeypatch.setattr(module, "distillation", spy)
    gx.linear_distillation_loss(sh, sw, th, tw, target, reduction="none", chunk_size=4).sum().backward()
    assert seen == [((4, 20), (4, 20)), ((4, 20), (4, 20)), ((3, 20), (3, 20))] * 2  # "none": again in backward


def test_distillation_bad_input(rng):
    sh, sw, sb, th, tw, tb, target = make_heads(cpu(), rng, (4,), 6, 5, 9)
    cases = [
        (ValueError, "teacher_hidden", dict(teacher_hidden=th[:3])),
        (ValueError, "teacher_weight", dict(teacher_weight=tw[:8], teacher_bias=tb[:8])),
        (ValueError, "student_hidden", dict(student_hidden=sh[:, :5])),
        (ValueError, "teacher_hidden", dict(teacher_hidden=th[:, :4])),
        (ValueError, "student_bias", dict(student_bias=sb[:3])),
        (TypeError, "teacher_weight", dict(teacher_weight=tw.float())),
        (ValueError, "divergence", dict(divergence="l2")),
        (ValueError, "beta", dict(divergence="jsd", beta=1.0)),
        (ValueError, "temperature", dict(temperature=0.0)),
        (ValueError, "reduction", dict(reduction="avg")),
        (ValueError, "target", dict(target=target[:2])),
        (TypeError, "accum_dtype", dict(accum_dtype="float32")),
    ]
    for exc, name, bad in cases:
        kw = dict(student_hidden=sh, student_weight=sw, teacher_hidden=th, teacher_weight=tw, target=target,
                  student_bias=sb, teacher_bias=tb) | bad  # fmt: skip
        with pytest.raises(exc, match=name):
            gx.linear_distillation_loss(**kw)


# --------------------------------------------------------------------------- the examples


def load_example(name):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grads_of(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("temperature", ["one", "per-sequence"])
def test_grpo_step_matches_materialised_logits(temperature):
    """The GRPO step through linear_log_probs (float64, and float32) against the same step from the model's
    materialised logits in float64: the loss and every parameter gradient."""
    ex = load_example("grpo_step")
    batch = ex.make_batch()
    n, length = batch["mask"].shape
    T = 0.7 if temperature == "one" else torch.linspace(0.5, 1.3, n, dtype=torch.float64)[:, None].expand(n, length)
    reference = ex.tiny_model(dtype=torch.float64)
    old = ex.old_log_probs(reference, batch, T)
    ref_loss = ex.grpo_step(reference, batch, old, T, use_gpuxent=False)
    ref_grads = grads_of(reference)
    assert len(ref_grads) == len(list(reference.parameters()))
    for dtype in (torch.float64, torch.float32):
        model = ex.tiny_model(dtype=dtype)
        loss = ex.grpo_step(model, batch, old, T if dtype == torch.float64 or temperature == "one" else T.float(),
                            chunk_size=16)  # fmt: skip
        assert_close(loss, ref_loss, dtype, f"{dtype} GRPO loss", scale=10)
        grads = grads_of(model)
        for name, g in ref_grads.items():
            assert_close(grads[name], g, dtype, f"{dtype} grad {name}", scale=10 if dtype == torch.float64 else 50)


def test_dpo_step_matches_materialised_logits():
    ex = load_example("dpo_step")
    batch = ex.make_batch()
    reference_policy = ex.tiny_model(dtype=torch.float64)
    frozen = ex.reference_of(reference_policy)
    ref_loss = ex.dpo_step(reference_policy, frozen, batch, use_gpuxent=False)
    ref_grads = grads_of(reference_policy)
    for dtype in (torch.float64, torch.float32):
        policy = ex.tiny_model(dtype=dtype)
        loss = ex.dpo_step(policy, frozen.to(dtype), batch, chunk_size=8)
        frozen.double()
        assert_close(loss, ref_loss, dtype, f"{dtype} DPO loss", scale=10)
        grads = grads_of(policy)
        for name, g in ref_grads.items():
            assert_close(grads[name], g, dtype, f"{dtype} grad {name}", scale=10 if dtype == torch.float64 else 50)


@pytest.mark.parametrize("name", ["grpo_step", "dpo_step"])
def test_examples_run_as_scripts(name):
    pytest.importorskip("transformers")
    script = os.path.join(ROOT, "examples", f"{name}.py")
    res = subprocess.run([sys.executable, script, "--steps", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2 and all(np.isfinite(float(line.split()[-1])) for line in lines)


def cpu():
    from conftest import BackendCase

    return BackendCase("numba_cpu", torch.device("cpu"), False)
