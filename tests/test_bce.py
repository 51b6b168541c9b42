"""binary_cross_entropy(_with_logits) on every backend against PyTorch, loss and gradient."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close

import gpuxent as gx


def _shape(backend):
    return (4, 9) if backend.interpreted else (64, 33)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weight"])
def test_bce_matches_torch(backend, rng, reduction, weighted):
    shape = _shape(backend)
    p = rng.uniform(0, 1, shape)
    p[0, :3] = [0.0, 1.0, 1e-30]  # the clamp of each log at -100
    probs = backend.tensor(p).requires_grad_()
    y = backend.tensor(rng.integers(0, 2, shape), dtype=torch.float32)
    y[1] = backend.tensor(rng.uniform(0, 1, shape[1]), dtype=torch.float32)  # soft labels too
    w = backend.tensor(rng.uniform(0.5, 2, shape[1]), dtype=torch.float32) if weighted else None  # broadcast
    loss = gx.binary_cross_entropy(probs, y, w, reduction, backend=backend.name)
    go = torch.rand_like(loss) + 0.5
    loss.backward(go)
    p64 = probs.detach().cpu().double().requires_grad_()
    ref = F.binary_cross_entropy(p64, y.cpu().double(), None if w is None else w.cpu().double(), reduction=reduction)
    ref.backward(go.cpu().double())
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(probs.grad, p64.grad, torch.float32, "grad")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("keywords", ["plain", "weight", "pos_weight", "both"])
def test_bce_with_logits_matches_torch(backend, rng, reduction, keywords):
    shape = _shape(backend)
    x_np = rng.standard_normal(shape) * 5
    x_np[0, :4] = [100.0, -100.0, 1e4, -1e4]
    x = backend.tensor(x_np).requires_grad_()
    y = backend.tensor(rng.integers(0, 2, shape), dtype=torch.float32)
    w = (
        backend.tensor(rng.uniform(0.5, 2, (shape[0], 1)), dtype=torch.float32)
        if keywords in ("weight", "both")
        else None
    )
    pw = (
        backend.tensor(rng.uniform(0.5, 3, shape[1]), dtype=torch.float32)
        if keywords in ("pos_weight", "both")
        else None
    )
    loss = gx.binary_cross_entropy_with_logits(x, y, w, pw, reduction, backend=backend.name)
    go = torch.rand_like(loss) + 0.5
    loss.backward(go)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(
        x64, y.cpu().double(), None if w is None else w.cpu().double(), reduction=reduction,
        pos_weight=None if pw is None else pw.cpu().double(),
    )  # fmt: skip
    ref.backward(go.cpu().double())
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(x.grad, x64.grad, torch.float32, "grad")


def test_modules_and_numpy(backend, rng):
    shape = _shape(backend)
    x = backend.tensor(rng.standard_normal(shape), dtype=torch.float32)
    y = backend.tensor(rng.integers(0, 2, shape), dtype=torch.float32)
    pw = backend.tensor(rng.uniform(0.5, 3, shape[1]), dtype=torch.float32)
    got = gx.nn.BCEWithLogitsLoss(pos_weight=pw, backend=backend.name)(x, y)
    assert_close(got, torch.nn.BCEWithLogitsLoss(pos_weight=pw.cpu())(x.cpu(), y.cpu()), torch.float32, "with logits")
    p = torch.sigmoid(x)
    got = gx.nn.BCELoss(reduction="sum", backend=backend.name)(p, y)
    assert_close(got, torch.nn.BCELoss(reduction="sum")(p.cpu(), y.cpu()), torch.float32, "bce")
    if backend.device.type == "cpu":
        loss = gx.binary_cross_entropy(p.numpy().astype(np.float64), y.numpy().astype(np.float64), backend=backend.name)
        assert isinstance(loss, np.floating) and loss.dtype == np.float64


def test_half_inputs(backend, rng):
    shape = _shape(backend)
    x = backend.tensor(rng.standard_normal(shape), dtype=torch.bfloat16).requires_grad_()
    y = backend.tensor(rng.integers(0, 2, shape), dtype=torch.bfloat16)
    loss = gx.binary_cross_entropy_with_logits(x, y, backend=backend.name)
    loss.backward()
    x64 = x.detach().cpu().double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(x64, y.cpu().double())
    ref.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    assert_close(loss, ref, torch.bfloat16, "loss")
    assert_close(x.grad, x64.grad, torch.bfloat16, "grad")


def test_empty(backend):
    x = torch.zeros(0, 3, device=backend.device)
    for red in ("mean", "sum", "none"):
        got = gx.binary_cross_entropy_with_logits(x, x, reduction=red, backend=backend.name)
        ref = F.binary_cross_entropy_with_logits(x.cpu(), x.cpu(), reduction=red)
        assert_close(got, ref, torch.float32, red)
