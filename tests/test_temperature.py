"""``temperature=`` on the plain cross-entropy functions (``cross_entropy``, ``cross_entropy_and_grad``,
``cross_entropy_with_stats``) and on ``vocab_parallel_cross_entropy``: the logits enter as
``softcap(x) / T``, one T or one per row, every statistic of the scaled logits, the gradient to ``x``;
against float64 torch on every backend, with random upstream gradients and half inputs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import assert_close
from test_cross_entropy import shape_for
from test_distributed import spawn_gloo

import gpuxent as gx


def _temperature(kind, n, rng, device):
    if kind == "scalar":
        return 1.7
    return torch.as_tensor(rng.random(n) * 1.5 + 0.3, dtype=torch.float32, device=device)


def _scaled64(x, temperature, softcap):
    y = x.detach().cpu().double()
    y = softcap * torch.tanh(y / softcap) if softcap else y
    if isinstance(temperature, torch.Tensor):
        return y / temperature.cpu().double().reshape(*x.shape[:-1], 1)
    return y / temperature


def _entropy_rows(y):
    lp = torch.log_softmax(y, -1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["scalar", "per-row"])
@pytest.mark.parametrize("softcap", [None, 4.0])
def test_cross_entropy_with_temperature(backend, rng, dtype, kind, softcap):
    n, r = shape_for(backend)
    x = backend.tensor(rng.standard_normal((n, r)) * 3, dtype=dtype)
    t = backend.tensor(rng.integers(0, r, n))
    t[0] = -100
    temp = _temperature(kind, n, rng, x.device)
    kw = {"softcap": softcap, "temperature": temp, "backend": backend.name, "label_smoothing": 0.1}
    go = torch.as_tensor(rng.random(n) + 0.5, dtype=torch.float32, device=x.device)

    xr = x.detach().cpu().double().requires_grad_()
    yr = (softcap * torch.tanh(xr / softcap) if softcap else xr) / (
        temp.cpu().double()[:, None] if isinstance(temp, torch.Tensor) else temp
    )
    ref = F.cross_entropy(yr, t.cpu(), reduction="none", label_smoothing=0.1)
    (ref * go.cpu().double()).sum().backward(retain_graph=True)

    xg = x.clone().requires_grad_()
    loss = gx.cross_entropy(xg, t, reduction="none", **kw)
    (loss * go).sum().backward()
    assert_close(loss, ref, dtype, "loss")
    assert_close(xg.grad, xr.grad, dtype, "gradient")

    loss2, grad2 = gx.cross_entropy_and_grad(x, t, reduction="none", **kw)
    assert_close(loss2, ref, dtype, "and_grad loss")
    assert grad2.dtype == x.dtype and grad2.shape == x.shape
    xr.grad = None
    ref.sum().backward()
    assert_close(grad2, xr.grad, dtype, "and_grad gradient (of loss.sum())")

    o = gx.cross_entropy_with_stats(x.clone().requires_grad_(), t, entropy=True, **kw)
    y64 = _scaled64(x, temp, softcap)
    kept = t.cpu() != -100
    assert_close(o.entropy, _entropy_rows(y64)[kept].mean(), dtype, "entropy of the scaled logits")
    assert_close(o.accuracy, (y64.argmax(-1) == t.cpu())[kept].double().mean(), torch.float32, "accuracy")


def test_leading_axes_numpy_and_in_place(rng):
    x = rng.standard_normal((2, 3, 7)).astype(np.float32)
    t = rng.integers(0, 7, (2, 3))
    temp = torch.as_tensor(rng.random((2, 3)) + 0.5)  # the batch shape works as (N,)
    loss = gx.cross_entropy(x, t, temperature=temp.numpy())
    ref = F.cross_entropy(
        torch.tensor(x).double().reshape(6, 7) / temp.reshape(6, 1).double(), torch.tensor(t).reshape(6)
    )
    np.testing.assert_allclose(loss, ref.item(), rtol=2e-6)
    xt = torch.tensor(x)
    loss2, grad = gx.cross_entropy_and_grad(xt, torch.tensor(t), temperature=2.0, inplace_grad=True)
    assert grad.data_ptr() == xt.data_ptr()
    x64 = torch.tensor(x).double().requires_grad_()
    F.cross_entropy(x64.reshape(6, 7) / 2.0, torch.tensor(t).reshape(6)).backward()
    torch.testing.assert_close(grad.double(), x64.grad, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    ("temperature", "error"),
    [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
     (torch.ones(5), ValueError), (torch.tensor([1.0, 0.0, 1.0, 1.0]), ValueError), ("hot", TypeError)],
)  # fmt: skip
def test_bad_temperature(temperature, error):
    x = torch.randn(4, 3)
    x0 = x.clone()
    with pytest.raises(error, match="temperature"):
        gx.cross_entropy(x, torch.tensor([0, 1, 2, 0]), temperature=temperature)
    assert torch.equal(x, x0)


def _vp_worker(rank, world, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x, t, temp = torch.load(f"{path}/in.pt")
        lo, hi = (0, 4) if rank == 0 else (4, x.shape[-1])
        local = x[:, lo:hi].clone().requires_grad_()
        out = {}
        for name, tau in (("scalar", 1.5), ("per-row", temp)):
            loss = gx.distributed.vocab_parallel_cross_entropy(local, t, softcap=3.0, temperature=tau)
            loss.backward()
            out[name] = (loss.detach(), local.grad.clone())
            local.grad = None
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_temperature(tmp_path, rng):
    x = torch.as_tensor(rng.standard_normal((5, 9)) * 3)
    t = torch.as_tensor(rng.integers(0, 9, 5))
    temp = torch.as_tensor(rng.random(5) + 0.5)
    torch.save((x, t, temp), tmp_path / "in.pt")
    spawn_gloo(_vp_worker, (str(tmp_path),), 2)
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    for name, tau in (("scalar", 1.5), ("per-row", temp)):
        xr = x.clone().requires_grad_()
        y = 3.0 * torch.tanh(xr / 3.0) / (tau[:, None] if isinstance(tau, torch.Tensor) else tau)
        ref = F.cross_entropy(y, t)
        ref.backward()
        grad = torch.cat([ranks[0][name][1], ranks[1][name][1]], -1)
        for k in range(2):
            assert_close(ranks[k][name][0], ref, torch.float64, f"{name} loss, rank {k}")
        assert_close(grad, xr.grad, torch.float64, f"{name} gradient")


def _vp_linear_worker(rank, world, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        h, w, b, t, temp = torch.load(f"{path}/in.pt")
        lo, hi = (0, 4) if rank == 0 else (4, w.shape[0])
        out = {}
        for name, tau, acc in (("scalar", 1.5, None), ("per-row", temp, torch.float64)):
            hh = h.clone().requires_grad_()
            ws, bs = w[lo:hi].clone().requires_grad_(), b[lo:hi].clone().requires_grad_()
            loss = gx.distributed.vocab_parallel_linear_cross_entropy(
                hh, ws, t, bs, softcap=3.0, temperature=tau, accum_dtype=acc, chunk_size=2, label_smoothing=0.1
            )
            loss.backward()
            out[name] = (loss.detach(), hh.grad, ws.grad, bs.grad)
        torch.save(out, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_linear_temperature(tmp_path, rng):
    """vocab_parallel_linear_cross_entropy with one and per-row temperatures (and accum_dtype): the loss and
    every gradient of softcap(h W^T + b) / T, against float64 torch, over 2 gloo processes."""
    h = torch.as_tensor(rng.standard_normal((5, 6)))
    w = torch.as_tensor(rng.standard_normal((9, 6)))
    b = torch.as_tensor(rng.standard_normal(9) * 0.1)
    t = torch.as_tensor(rng.integers(0, 9, 5))
    t[1] = -100
    temp = torch.as_tensor(rng.random(5) + 0.5)
    torch.save((h, w, b, t, temp), tmp_path / "in.pt")
    spawn_gloo(_vp_linear_worker, (str(tmp_path),), 2)
    ranks = [torch.load(tmp_path / f"rank{k}.pt") for k in range(2)]
    for name, tau in (("scalar", 1.5), ("per-row", temp)):
        hr, wr, br = (v.clone().requires_grad_() for v in (h, w, b))
        y = 3.0 * torch.tanh((hr @ wr.T + br) / 3.0) / (tau[:, None] if isinstance(tau, torch.Tensor) else tau)
        ref = F.cross_entropy(y, t, label_smoothing=0.1)
        ref.backward()
        for k in range(2):
            assert_close(ranks[k][name][0], ref, torch.float64, f"{name} loss, rank {k}")
            assert_close(ranks[k][name][1], hr.grad, torch.float64, f"{name} hidden gradient, rank {k}")
        assert_close(torch.cat([ranks[0][name][2], ranks[1][name][2]]), wr.grad, torch.float64, f"{name} weight grad")
        assert_close(torch.cat([ranks[0][name][3], ranks[1][name][3]]), br.grad, torch.float64, f"{name} bias grad")
