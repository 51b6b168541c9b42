"""softmax / log_softmax on every backend against PyTorch: values, any axis, gradients."""

import numpy as np
import pytest
import torch
from reference import assert_close

import gpuxent as gx


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_with_grad(backend, rng, log, dtype):
    r = 300 if backend.interpreted else 5000
    x = backend.tensor(rng.standard_normal((3, r)) * 4, dtype=dtype).requires_grad_()
    fn = gx.log_softmax if log else gx.softmax
    out = fn(x, backend=backend.name)
    go = torch.rand_like(out)
    out.backward(go)
    x64 = x.detach().cpu().double().requires_grad_()
    ref = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
    ref.backward(go.cpu().double())
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "out")
    assert_close(x.grad, x64.grad, dtype, "grad")


@pytest.mark.parametrize("axis", [0, 1, -1, -3])
def test_any_axis(backend, rng, axis):
    x = backend.tensor(rng.standard_normal((3, 4, 5)))
    for fn, ref in ((gx.softmax, torch.softmax), (gx.log_softmax, torch.log_softmax)):
        assert_close(fn(x, axis=axis, backend=backend.name), ref(x.double().cpu(), axis), torch.float32, str(axis))


def test_rows_sum_to_one_and_extremes(backend, rng):
    r = 130
    x64 = rng.standard_normal((4, r)) * 1e4
    x64[rng.random((4, r)) < 0.3] = -np.inf
    x64[:, 0] = 1.0  # every row keeps one finite entry
    x = backend.tensor(x64, dtype=torch.float32)
    p = gx.softmax(x, backend=backend.name)
    assert torch.isfinite(p).all()
    assert_close(p.sum(-1), torch.ones(4), torch.float32, "row sums")
    assert_close(p, torch.softmax(x.double().cpu(), -1), torch.float32, "softmax")
    assert_close(gx.log_softmax(x, backend=backend.name), torch.log_softmax(x.double().cpu(), -1), torch.float32, "log")


def test_half_and_numpy(backend, rng):
    x = backend.tensor(rng.standard_normal((4, 40)), dtype=torch.bfloat16)
    out = gx.softmax(x, backend=backend.name)
    assert out.dtype == torch.bfloat16
    assert_close(out, torch.softmax(x.double().cpu(), -1), torch.bfloat16, "bf16")
    if backend.device.type == "cpu":
        a = rng.standard_normal((4, 40))
        out = gx.log_softmax(a, backend=backend.name)
        assert isinstance(out, np.ndarray) and out.dtype == np.float64
        assert_close(out, torch.log_softmax(torch.from_numpy(a), -1), torch.float64, "numpy")


def test_nan_propagates(backend):
    x = torch.tensor([[1.0, float("nan"), 2.0], [1.0, 2.0, 3.0]], device=backend.device)
    p = gx.softmax(x, backend=backend.name)
    ref = torch.softmax(x.cpu(), -1)
    assert torch.isnan(p[0]).all() and torch.isnan(ref[0]).all()
    assert_close(p[1], ref[1], torch.float32, "clean row")


def test_log_softmax_of_large_logits(backend, rng):
    """Logits around 1e4 in float32: log p must come from (x - max) - log(sum), not from x minus a
    float32-rounded lse (half an ulp of 1e4 is 5e-4, far above the tolerance)."""
    x = backend.tensor(1e4 + rng.standard_normal((4, 50)), dtype=torch.float32)
    out = gx.log_softmax(x, backend=backend.name)
    assert_close(out, torch.log_softmax(x.double().cpu(), -1), torch.float32, "log_softmax")
    loss = gx.cross_entropy(x, x.argmax(-1), reduction="none", backend=backend.name)
    assert_close(loss, -torch.log_softmax(x.double().cpu(), -1).max(-1).values, torch.float32, "loss at the max")


def test_row_of_neg_inf_is_nan_as_in_torch(backend, rng):
    r = 300 if backend.interpreted else 5000
    x = backend.tensor(rng.standard_normal((3, r)) * 3, dtype=torch.float32)
    x[0] = -float("inf")
    x[2, : r // 2] = -float("inf")  # -inf in some chunks only: a finite softmax
    for fn, ref in ((gx.softmax, torch.softmax), (gx.log_softmax, torch.log_softmax)):
        out = fn(x, backend=backend.name)
        expected = ref(x.double().cpu(), -1)
        assert torch.isnan(expected[0]).all()
        assert_close(out, expected, torch.float32, fn.__name__)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_inputs_every_chunk(backend, rng, dtype):
    r = 300 if backend.interpreted else 5000
    x = backend.tensor(rng.standard_normal((3, r)) * 4, dtype=dtype)
    for fn, ref in ((gx.softmax, torch.softmax), (gx.log_softmax, torch.log_softmax)):
        out = fn(x, backend=backend.name)
        assert out.dtype == dtype
        assert_close(out, ref(x.double().cpu(), -1), dtype, fn.__name__)
