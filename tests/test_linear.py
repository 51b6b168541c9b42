"""linear_cross_entropy against cross_entropy(F.linear(...)) and PyTorch in float64, on every backend."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import KEYWORDS as CE_KEYWORDS
from reference import PROB_KEYWORDS, assert_close, reference_cross_entropy

import gpuxent as gx
from gpuxent import backends
from gpuxent.linear import default_chunk_size, linear_cross_entropy

KEYWORDS = {**CE_KEYWORDS, "no-bias": {"no_bias": True}, **PROB_KEYWORDS}


def sizes_for(backend):
    """(batch shape, d, r, chunk_size): several chunks with a short last one; tiny under an interpreter."""
    if backend.interpreted:
        return (2, 3), 8, 40, 4
    return (3, 7), 16, 300, 5


def make_inputs(
    backend, rng, batch, d, r, dtype=torch.float64, *, prob=False, weight=False, ignore=False, no_bias=False, **_
):
    def tensor(a):
        return backend.tensor(a, dtype=dtype).requires_grad_()

    hidden = tensor(rng.standard_normal((*batch, d)))
    lin_w = tensor(rng.standard_normal((r, d)) * (3 / np.sqrt(d)))
    bias = None if no_bias else tensor(rng.standard_normal(r) * 0.5)
    if prob:
        target = torch.softmax(torch.as_tensor(rng.standard_normal((*batch, r)) * 2), -1).to(dtype).to(backend.device)
    else:
        target = backend.tensor(rng.integers(0, r, batch), dtype=torch.int64)
        if ignore:
            target[torch.as_tensor(rng.random(batch) < 0.3)] = -100
            target.view(-1)[0] = -100
    ce_weight = backend.tensor(rng.random(r) + 0.1, dtype=dtype) if weight else None
    return hidden, lin_w, bias, target, ce_weight


def inputs_of(hidden, lin_w, bias):
    return [x for x in (hidden, lin_w, bias) if x is not None]


def torch_reference(hidden, lin_w, bias, target, ce_weight, reduction, grad_output, kw):
    """Loss and the gradients of (hidden, weight[, bias]) in float64: torch's CE, then the chain rule."""
    h = hidden.detach().cpu().double()
    w = lin_w.detach().cpu().double()
    logits = F.linear(h, w, None if bias is None else bias.detach().cpu().double())
    loss, g = reference_cross_entropy(
        logits, target, ce_weight, reduction=reduction, grad_output=grad_output, **kw
    )  # fmt: skip
    g2 = g.reshape(-1, w.shape[0])
    grads = [(g2 @ w).reshape(h.shape), g2.T @ h.reshape(-1, w.shape[1])]
    if bias is not None:
        grads.append(g2.sum(0))
    return loss, grads


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", list(KEYWORDS), ids=list(KEYWORDS))
def test_matches_cross_entropy_of_linear(backend, rng, spec, reduction):
    opts = KEYWORDS[spec]
    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, ce_weight = make_inputs(backend, rng, batch, d, r, **opts)
    kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts}
    params = inputs_of(hidden, lin_w, bias)

    loss = linear_cross_entropy(
        hidden, lin_w, target, bias, reduction=reduction, ce_weight=ce_weight, backend=backend.name,
        chunk_size=chunk, **kw,
    )  # fmt: skip
    # A non-uniform grad_output for "none", a scalar other than 1 otherwise.
    go = torch.as_tensor(rng.random(loss.shape) * 2 + 0.25, dtype=loss.dtype, device=loss.device)
    grads = torch.autograd.grad(loss, params, go)

    fused = gx.cross_entropy(
        F.linear(hidden, lin_w, bias), target, ce_weight, reduction=reduction, backend=backend.name, **kw
    )
    fused_grads = torch.autograd.grad(fused, params, go)
    ref_loss, ref_grads = torch_reference(hidden, lin_w, bias, target, ce_weight, reduction, go, kw)

    assert loss.shape == fused.shape and loss.dtype == torch.float64 and loss.device == hidden.device
    assert_close(loss, fused, torch.float64, "loss vs cross_entropy(F.linear)", scale=10)
    assert_close(loss, ref_loss, torch.float64, "loss vs torch", scale=10)
    for name, g, fg, rg, p in zip(("hidden", "weight", "bias"), grads, fused_grads, ref_grads, params, strict=False):
        assert g.shape == p.shape and g.dtype == p.dtype and g.device == p.device
        assert_close(g, fg, torch.float64, f"grad {name} vs cross_entropy(F.linear)", scale=10)
        assert_close(g, rg, torch.float64, f"grad {name} vs torch", scale=10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_float32_and_half(backend, rng, dtype):
    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, ce_weight = make_inputs(backend, rng, batch, d, r, dtype=dtype, weight=True)
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    params = inputs_of(hidden, lin_w, bias)
    loss = linear_cross_entropy(
        hidden, lin_w, target, bias, ce_weight=ce_weight, backend=backend.name, chunk_size=chunk, **kw
    )
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, params)
    fused = gx.cross_entropy(F.linear(hidden, lin_w, bias), target, ce_weight, backend=backend.name, **kw)
    fused_grads = torch.autograd.grad(fused, params)
    # Both round the logits to ``dtype``; in half precision they may round a few differently.
    scale = 10 if dtype == torch.float32 else 2
    assert_close(loss, fused, dtype, "loss", scale=scale)
    for name, g, fg, p in zip(("hidden", "weight", "bias"), grads, fused_grads, params, strict=False):
        assert g.dtype == dtype and g.shape == p.shape
        assert_close(g, fg, dtype, f"grad {name}", scale=scale)


def test_only_some_inputs_require_grad(backend, rng):
    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, _ = make_inputs(backend, rng, batch, d, r)
    lin_w.requires_grad_(False)
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(hidden, lin_w, target, bias, reduction=reduction, chunk_size=chunk)
        gh, gb = torch.autograd.grad(loss.sum(), (hidden, bias))
        fused = gx.cross_entropy(F.linear(hidden, lin_w, bias), target, reduction=reduction)
        fh, fb = torch.autograd.grad(fused.sum(), (hidden, bias))
        assert_close(gh, fh, torch.float64, f"{reduction} grad hidden", scale=10)
        assert_close(gb, fb, torch.float64, f"{reduction} grad bias", scale=10)


def test_no_grad_and_numpy(backend, rng):
    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, ce_weight = make_inputs(backend, rng, batch, d, r, weight=True, ignore=True)
    with_grad = linear_cross_entropy(hidden, lin_w, target, bias, ce_weight=ce_weight, chunk_size=chunk)
    with torch.no_grad():
        no_grad = linear_cross_entropy(hidden, lin_w, target, bias, ce_weight=ce_weight, chunk_size=chunk)
    assert not no_grad.requires_grad
    assert_close(no_grad, with_grad, torch.float64, "no_grad loss")
    if backend.device.type != "cpu":
        return
    to_np = [x.detach().numpy() for x in (hidden, lin_w, target, bias, ce_weight)]
    for reduction in ("mean", "none"):
        out = linear_cross_entropy(*to_np[:3], to_np[3], reduction=reduction, ce_weight=to_np[4], backend=backend.name)
        assert isinstance(out, (np.ndarray, np.generic)) and not isinstance(out, torch.Tensor)
        expected = gx.cross_entropy(F.linear(hidden, lin_w, bias), target, ce_weight, reduction=reduction)
        assert_close(out, expected, torch.float64, f"numpy {reduction}")


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 1000])
def test_chunk_sizes_and_leading_axes(rng, chunk_size):
    """Any chunking gives the same result; 3-D hidden states (batch, sequence, d) are flattened."""
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), rng, (2, 5, 3), 12, 50, ignore=True)
    loss = linear_cross_entropy(hidden, lin_w, target, bias, chunk_size=chunk_size, z_loss=1e-2)
    grads = torch.autograd.grad(loss, (hidden, lin_w, bias))
    fused = gx.cross_entropy(F.linear(hidden, lin_w, bias), target, z_loss=1e-2)
    fused_grads = torch.autograd.grad(fused, (hidden, lin_w, bias))
    assert_close(loss, fused, torch.float64, "loss", scale=10)
    for g, fg in zip(grads, fused_grads, strict=True):
        assert_close(g, fg, torch.float64, "grad", scale=10)


def test_kernel_only_sees_chunks(rng, monkeypatch):
    """The (N, r) logits never exist: every kernel call gets at most chunk_size rows."""
    seen = []
    module = backends.module("numba_cpu")
    real = module.cross_entropy

    def spy(logits, *args, **kw):
        seen.append(tuple(logits.shape))
        return real(logits, *args, **kw)

    monkeypatch.setattr(module, "cross_entropy", spy)
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), rng, (23,), 8, 30)
    loss = linear_cross_entropy(hidden, lin_w, target, bias, chunk_size=5)
    loss.backward()
    assert seen == [(5, 30)] * 4 + [(3, 30)]
    seen.clear()
    loss = linear_cross_entropy(hidden, lin_w, target, bias, reduction="none", chunk_size=10)
    loss.backward(torch.rand(23, dtype=torch.float64))
    assert seen == [(10, 30), (10, 30), (3, 30)] * 2  # "none": the chunks run again in backward


def test_default_chunk_size():
    assert default_chunk_size(65536, torch.float32) == 512  # 128 MiB of float32 logits
    assert default_chunk_size(65536, torch.bfloat16) == 1024
    assert default_chunk_size(10**9, torch.float32) == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored_and_empty_batch(rng, reduction):
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), rng, (4,), 6, 9)
    target = torch.full((4,), -100)
    loss = linear_cross_entropy(hidden, lin_w, target, bias, reduction=reduction, chunk_size=3)
    expected = gx.cross_entropy(F.linear(hidden, lin_w, bias), target, reduction=reduction)
    assert_close(loss, expected, torch.float64, "all ignored")
    grads = torch.autograd.grad(loss.sum(), (hidden, lin_w, bias))
    assert all(bool((g == 0).all()) for g in grads)

    empty = hidden[:0].detach().requires_grad_()
    loss = linear_cross_entropy(empty, lin_w, target[:0], bias, reduction=reduction)
    expected = F.cross_entropy(F.linear(empty, lin_w, bias), target[:0], reduction=reduction)
    assert loss.shape == expected.shape
    assert_close(loss, expected, torch.float64, "empty batch")
    gh, gw = torch.autograd.grad(loss.sum(), (empty, lin_w))
    assert gh.shape == (0, 6) and bool((gw == 0).all())


def test_bad_input_raises_and_mutates_nothing(rng):
    hidden, lin_w, bias, target, ce_weight = make_inputs(gx_cpu(), rng, (4,), 6, 9, weight=True)
    keep = [x.detach().clone() for x in (hidden, lin_w, bias, target, ce_weight)]
    h, w, b, t = hidden, lin_w, bias, target
    cases = [
        (ValueError, "hidden", dict(hidden=h[:, :5])),
        (ValueError, "weight", dict(weight=w[0])),
        (ValueError, "bias", dict(bias=b[:5])),
        (ValueError, "ce_weight", dict(ce_weight=ce_weight[:3])),
        (ValueError, "target", dict(target=t[:3])),
        (TypeError, "target", dict(target=t.double())),
        (ValueError, "target", dict(target=torch.tensor([0, 1, 9, 2]))),
        (TypeError, "weight", dict(weight=w.float())),
        (TypeError, "bias", dict(bias=b.float())),
        (TypeError, "hidden", dict(hidden=h.long())),
        (ValueError, "reduction", dict(reduction="avg")),
        (ValueError, "label_smoothing", dict(label_smoothing=1.5)),
        (ValueError, "softcap", dict(softcap=0.0)),
        (ValueError, "chunk_size", dict(chunk_size=0)),
        (ValueError, "weight", dict(weight=w.to("meta"))),
    ]
    for exc, name, bad in cases:
        kw = dict(hidden=h, weight=w, target=t, bias=b, ce_weight=ce_weight) | bad
        with pytest.raises(exc, match=name):
            linear_cross_entropy(**kw)
    for x, k in zip((hidden, lin_w, bias, target, ce_weight), keep, strict=True):
        assert torch.equal(x.detach(), k)


def gx_cpu():
    """A CPU BackendCase for the backend-independent tests."""
    from conftest import BackendCase

    return BackendCase("numba_cpu", torch.device("cpu"), False)
