"""Property-based cross-checks: hypothesis draws shapes, dtypes, keywords, target patterns, value
ranges and layouts, and every backend must match PyTorch in float64, loss and gradient."""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import assert_close, reference_cross_entropy

import gpuxent as gx

# r values around the block sizes of every backend (Triton/Numba CUDA interpreters use small blocks,
# numba_cpu works in chunks of 2048); the larger ones only where the backend runs natively.
SMALL_R = [1, 2, 3, 5, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 257]
LARGE_R = [2047, 2048, 2049, 4097]


@st.composite
def problems(draw, interpreted):
    n = draw(st.sampled_from([0, 1, 2, 3, 5]) if interpreted else st.integers(0, 9))
    r = draw(st.sampled_from(SMALL_R if interpreted else SMALL_R + LARGE_R))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    prob = draw(st.booleans())
    kw = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 0.0, 1e-3])),
        softcap=draw(st.sampled_from([None, None, 1.0, 30.0])),
    )
    weighted = draw(st.booleans())
    scale = draw(st.sampled_from([1.0, 10.0, 1e4]))
    values = draw(st.sampled_from(["normal", "neg_inf", "equal_rows"]))
    targets = draw(
        st.sampled_from(
            ["random", "all_ignored", "none_ignored"] if not prob else ["one_hot", "uniform", "sparse", "random"]
        )
    )
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"]))
    seed = draw(st.integers(0, 2**32 - 1))
    return n, r, dtype, prob, kw, weighted, scale, values, targets, layout, seed


def build(backend, n, r, dtype, prob, weighted, scale, values, targets, layout, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, r)) * scale
    if values == "equal_rows":
        x[:] = x[:, :1]
    if prob:
        if targets == "one_hot":
            t = np.eye(r)[rng.integers(0, r, n)]
        elif targets == "uniform":
            t = np.full((n, r), 1.0 / r)
        else:
            t = rng.random((n, r)) * (rng.random((n, r)) < (0.3 if targets == "sparse" else 1.0))
            t /= np.maximum(t.sum(-1, keepdims=True), 1e-30)
    else:
        t = rng.integers(0, r, n)
        if targets == "all_ignored":
            t[:] = -100
        elif targets == "random":
            t[rng.random(n) < 0.3] = -100
    if values == "neg_inf" and not prob:  # -inf anywhere but at the target class
        mask = rng.random((n, r)) < 0.2
        mask[np.arange(n), np.clip(t, 0, r - 1)] = False
        x[mask] = -np.inf
    xt = torch.as_tensor(x, dtype=dtype)
    if layout == "transposed":
        xt = xt.t().contiguous().t()
    elif layout == "sliced":
        xt = torch.repeat_interleave(xt, 2, dim=1)[:, ::2]
    elif layout == "expanded" and n:
        xt = xt[:1].expand(n, r)  # row stride 0
    x_dev = xt.to(backend.device)
    t_dev = torch.as_tensor(t, dtype=dtype if prob else torch.int64).to(backend.device)
    w = torch.as_tensor(rng.random(r) + 0.1, dtype=dtype).to(backend.device) if weighted else None
    return x_dev, t_dev, w


def check(backend, problem):
    n, r, dtype, prob, kw, weighted, scale, values, targets, layout, seed = problem
    if layout == "expanded" and values == "neg_inf":
        values = "normal"
    x, t, w = build(backend, n, r, dtype, prob, weighted, scale, values, targets, layout, seed)
    xr = x.detach().requires_grad_()
    loss = gx.cross_entropy(xr, t, w, backend=backend.name, **kw)
    go = torch.rand(loss.shape, dtype=loss.dtype, device=loss.device) + 0.5
    loss.backward(go)
    loss2, grad2 = gx.cross_entropy_and_grad(x, t, w, backend=backend.name, **kw)
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, grad_output=go, **kw)
    _, ref_grad_sum = reference_cross_entropy(x, t, w, **kw)
    # large logits lose absolute precision in the float32 lse; scale the tolerance with them
    tol_scale = max(1.0, scale / 10) if dtype == torch.float32 else max(1.0, scale / 1e3)
    assert_close(loss, ref_loss, dtype, "loss", tol_scale)
    assert_close(loss2, ref_loss, dtype, "loss (and_grad)", tol_scale)
    assert_close(xr.grad, ref_grad, dtype, "grad", tol_scale)
    assert_close(grad2, ref_grad_sum, dtype, "grad (and_grad)", tol_scale)


def test_properties(backend):
    examples = 12 if backend.interpreted else 120
    examples = int(os.environ.get("GPUXENT_PROPERTY_EXAMPLES", examples))  # a deeper run: set it to 2000

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(problem=problems(backend.interpreted))
    def run(problem):
        check(backend, problem)

    run()


@pytest.mark.parametrize("what", ["nan", "pos_inf"])
def test_nan_and_inf_propagate_like_torch(backend, rng, what):
    n, r = 4, 40
    x = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float32)
    x[1, 7] = float("nan") if what == "nan" else float("inf")
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    for kw in ({}, {"label_smoothing": 0.1}, {"softcap": 5.0}):
        loss, grad = gx.cross_entropy_and_grad(x, t, reduction="none", backend=backend.name, **kw)
        ref_loss, ref_grad = reference_cross_entropy(x, t, reduction="none", **kw)
        assert torch.isnan(loss[1]).item() == torch.isnan(ref_loss[1]).item(), kw
        assert_close(loss, ref_loss, torch.float32, f"loss {kw}")  # NaN where torch has NaN
        assert_close(grad, ref_grad, torch.float32, f"grad {kw}")
        mean = gx.cross_entropy(x, t, backend=backend.name, **kw)
        assert torch.isnan(mean).item() == torch.isnan(ref_loss).any().item(), "a NaN row must not vanish from the mean"
