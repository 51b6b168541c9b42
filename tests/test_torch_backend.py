"""What is specific to the ``torch`` backend (``gpuxent.backends.torch_ops``): the selection rule that
falls back to it, its row blocks on big inputs, and the numerics at the edges (huge logits, poisoned
output buffers, rows without a softmax, unchecked class indices), against float64 PyTorch. The rest
of the contract runs on it through the ``backend`` fixture of the whole suite."""

import math

import pytest
import torch
import torch.nn.functional as F
from reference import assert_close, reference_cross_entropy

import gpuxent as gx
from gpuxent import backends
from gpuxent.backends import torch_ops

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CE_KW = dict(ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None)


def _tensor(a, **kw):
    return torch.as_tensor(a, **kw).to(DEVICE)


def _inputs(rng, n, r, dtype=torch.float32, ignore=True):
    x = _tensor(rng.standard_normal((n, r)) * 3, dtype=dtype)
    t = _tensor(rng.integers(0, r, n))
    if ignore:
        t[_tensor(rng.random(n) < 0.25)] = -100
    w = _tensor(rng.random(r) + 0.1, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return x, t, w


# --------------------------------------------------------------------------- selection


def test_torch_is_registered_and_available():
    assert backends.REGISTRY["torch"].module == "gpuxent.backends.torch_ops"
    assert list(backends.REGISTRY)[-1] == "torch"  # the fallback comes after every kernel backend
    assert "torch" in gx.available_backends()
    assert backends.status()["torch"][0]
    assert backends.get("torch") is torch_ops


def test_selection_falls_back_to_torch(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    for device in ("meta", "mps", "xpu"):  # no kernel backend is chosen for these
        assert backends.select(torch.device(device)) == "torch"
    assert backends.select(torch.device("cpu"), "torch") == "torch"  # asked for by name
    # a device whose kernel backends cannot run: CPU with a broken numba, CUDA without triton and numba-cuda
    monkeypatch.setattr(backends, "_SELECTED", {})  # what select() remembered of the healthy process
    monkeypatch.setitem(backends._LOADED, "numba_cpu", (None, "numba is broken"))
    assert backends.select(torch.device("cpu")) == "torch"
    monkeypatch.setitem(backends._LOADED, "triton", (None, "no triton"))
    monkeypatch.setitem(backends._LOADED, "numba_cuda", (None, "no numba-cuda"))
    assert backends.select(torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="numba_cpu"):  # by name it still raises, saying why
        backends.select(torch.device("cpu"), "numba_cpu")


def test_meta_device_runs_on_torch(monkeypatch):
    """Every backend function on meta tensors (shapes only): the backend uses nothing but torch ops."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    x = torch.empty(4, 7, device="meta")
    t = torch.zeros(4, dtype=torch.int64, device="meta")
    grad = torch.empty_like(x)
    stats = (torch.empty(4, dtype=torch.int64, device="meta"), torch.empty(4, device="meta"))
    loss, lse = torch_ops.cross_entropy(x, t, None, **CE_KW, grad=grad, stats=stats)
    assert loss.device.type == lse.device.type == "meta" and loss.shape == lse.shape == (4,)
    assert torch_ops.distillation(x, x, None, divergence="jsd", beta=0.5, temperature=2.0, ignore_index=-100,
                                  grad_scale=None, grad=grad).shape == (4,)  # fmt: skip
    out = torch.empty(4, 5, device="meta")
    torch_ops.row_partials(x, t, None, ignore_index=-100, softcap=0.0, class_offset=3, smoothing=True, out=out)
    # the public functions whose checks need no values choose it by themselves
    assert gx.softmax(x).device.type == "meta" and gx.log_softmax(x).shape == x.shape
    assert gx.binary_cross_entropy_with_logits(x, torch.empty_like(x), reduction="none").shape == x.shape


def test_environment_variable_selects_torch(monkeypatch, rng):
    calls = []
    real = torch_ops.cross_entropy
    monkeypatch.setattr(torch_ops, "cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    x, t, w = _inputs(rng, 16, 33)
    assert backends.select(x.device) == "torch"
    loss, grad = gx.cross_entropy_and_grad(x, t, w, label_smoothing=0.1)
    assert calls, "GPUXENT_BACKEND=torch did not reach the torch backend"
    ref_loss, ref_grad = reference_cross_entropy(x, t, w, label_smoothing=0.1)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "grad")


# --------------------------------------------------------------------------- row blocks


def _scales(n, dt):
    return torch.linspace(-1, 2, n, dtype=torch.float64).to(device=DEVICE, dtype=dt)


def _every_function(x, t, w, q, teacher, wb):
    """Every backend function's outputs on one problem (fresh buffers each call)."""
    n, r = x.shape
    dt = torch.float32 if x.dtype != torch.float64 else torch.float64
    out = {}
    scale = _scales(n, dt)
    grad = torch.full_like(x, math.nan)
    stats = (torch.full((n,), -1, dtype=torch.int64, device=x.device), torch.full((n,), math.nan, dtype=dt,
                                                                                  device=x.device))  # fmt: skip
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    out["ce"] = (*torch_ops.cross_entropy(x, t, w, **kw, grad_scale=scale, grad=grad, stats=stats), grad, *stats)
    inplace = x.clone()
    out["ce_inplace"] = (*torch_ops.cross_entropy(inplace, t, w, **kw, grad_scale=0.5, grad=inplace), inplace)
    g_prob = torch.full_like(x, math.nan)
    out["ce_prob"] = (*torch_ops.cross_entropy(x, q, w, **kw, grad_scale=None, grad=g_prob), g_prob)
    parts = torch.full((n, 5), math.nan, dtype=dt, device=x.device)
    torch_ops.row_partials(x, t, w, ignore_index=-100, softcap=4.0, class_offset=0, smoothing=True, out=parts)
    out["partials"] = (parts,)
    lse, entropy = out["ce"][1], out["ce"][4]
    g_back = torch.full_like(x, math.nan)
    torch_ops.cross_entropy_backward(
        x, t, w, lse, torch.ones_like(lse), entropy, ignore_index=-100, label_smoothing=0.1, n_classes=r,
        class_offset=0, softcap=4.0, grad_scale=scale, entropy_scale=scale.flip(0), grad=g_back,
    )  # fmt: skip
    out["backward"] = (g_back,)
    for div in ("kl", "reverse_kl", "jsd"):
        g = torch.full_like(x, math.nan)
        loss = torch_ops.distillation(x, teacher, t, divergence=div, beta=0.3, temperature=1.5, ignore_index=-100,
                                      grad_scale=scale, grad=g)  # fmt: skip
        out[div] = (loss, g)
    out["softmax"] = (torch_ops.softmax(x, log=False), torch_ops.softmax(x, log=True))
    p, y = torch.sigmoid(x), torch.sigmoid(teacher)
    g1, g2 = torch.full(x.shape, math.nan, dtype=dt, device=x.device), torch.full(x.shape, math.nan, dtype=dt,
                                                                                  device=x.device)  # fmt: skip
    out["bce"] = (torch_ops.binary_cross_entropy(p, y, wb, grad=g1), g1)
    out["bce_logits"] = (torch_ops.binary_cross_entropy_with_logits(x, y, wb, wb.flip(0), grad=g2), g2)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_row_blocks_give_the_unblocked_result(monkeypatch, rng, dtype):
    """With a tiny ``CHUNK_BYTES`` every function runs in many uneven blocks of rows (and elements):
    the same result as in one block, every output element written."""
    n, r = 23, 301
    x, t, w = _inputs(rng, n, r, dtype)
    x[t == -100] = math.nan  # ignored rows are never read
    t[0] = -100
    q = torch.softmax(_tensor(rng.standard_normal((n, r))), -1).to(w.dtype)
    teacher = _tensor(rng.standard_normal((n, r)) * 2, dtype=dtype)
    wb = _tensor(rng.random((n, r)), dtype=w.dtype)  # BCE weights
    whole = _every_function(x, t, w, q, teacher, wb)
    itemsize = 8 if dtype == torch.float64 else 4
    monkeypatch.setattr(torch_ops, "CHUNK_BYTES", 3 * r * itemsize + 5)  # 3 rows a block, 7 elements short
    dt = w.dtype
    assert len(list(torch_ops._row_blocks(n, r, dt))) == 8
    blocked = _every_function(x, t, w, q, teacher, wb)
    for name, outs in whole.items():
        for i, (a, b) in enumerate(zip(outs, blocked[name])):
            assert not (b.isnan() & ~a.isnan()).any(), f"{name}[{i}]: an element not written in blocks"
            what = f"{name}[{i}]"
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, equal_nan=True, msg=lambda m, w=what: f"{w}: {m}")
    # and the blocked cross-entropy of the kept rows against float64 torch (whose gradient of a NaN row is NaN)
    kept = t != -100
    ref_loss, ref_grad = reference_cross_entropy(
        x[kept], t[kept], w, reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=4.0,
        grad_output=_scales(n, w.dtype)[kept],
    )  # fmt: skip
    assert_close(blocked["ce"][0][kept], ref_loss, torch.float32 if dtype != torch.float64 else dtype, "blocked loss")
    assert_close(blocked["ce"][2][kept], ref_grad, dtype, "blocked grad")


# --------------------------------------------------------------------------- numerics at the edges


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_huge_logits_exact(dtype):
    """Logits of 1e20 lose nothing: the loss is taken relative to the row's max, as float64 torch."""
    big = 1e20
    x = _tensor([[big, big, -big, 0.0], [big, big - big / 1e3, 1.0, big], [-big, 3.0, -big, 2.0]], dtype=dtype)
    t = _tensor([0, 1, 3])
    grad = torch.full_like(x, math.nan)
    stats = (torch.empty(3, dtype=torch.int64, device=DEVICE), torch.empty(3, dtype=dtype, device=DEVICE))
    loss, lse = torch_ops.cross_entropy(x, t, None, **CE_KW, grad=grad, stats=stats)
    ref_loss, ref_grad = reference_cross_entropy(x, t, reduction="none")
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    assert loss[0].item() == pytest.approx(math.log(2), rel=1e-6)
    x64 = x.double().cpu()
    ent = -(torch.softmax(x64, -1) * torch.log_softmax(x64, -1).nan_to_num(neginf=0)).sum(-1)
    assert_close(stats[1], ent, dtype, "entropy")
    assert stats[0].tolist() == torch.argmax(x64, -1).tolist()
    # label smoothing: sum_j w_j (lse - y_j), every term relative to the max (inf at -1e20 logits: none here)
    xs = x[1:2]
    loss_s, _ = torch_ops.cross_entropy(xs, t[1:2], None, **(CE_KW | {"label_smoothing": 0.2}), grad=None)
    assert_close(loss_s, F.cross_entropy(xs.double().cpu(), t[1:2].cpu(), reduction="none", label_smoothing=0.2),
                 dtype, "smoothed loss")  # fmt: skip
    assert_close(torch_ops.softmax(x, log=True), torch.log_softmax(x64, -1), dtype, "log_softmax")
    assert_close(torch_ops.softmax(x, log=False), torch.softmax(x64, -1), dtype, "softmax")
    for div in ("kl", "reverse_kl", "jsd"):  # a student equal to its teacher: exactly 0, gradient 0
        g = torch.full_like(x, math.nan)
        d = torch_ops.distillation(x, x.clone(), None, divergence=div, beta=0.5, temperature=1.0, ignore_index=-100,
                                   grad_scale=None, grad=g)  # fmt: skip
        tol = 1e-6 if div == "jsd" else 0.0  # jsd's log of the mixture: log(p / 2) + log 2 may be an ulp off
        assert d.abs().max().item() <= tol and g.abs().max().item() <= tol, div
    out = torch.full((3, 5), math.nan, dtype=dtype, device=DEVICE)
    torch_ops.row_partials(x, t, None, ignore_index=-100, softcap=0.0, class_offset=0, smoothing=False, out=out)
    assert out[0].tolist() == [x[0, 0].item(), 2.0, 0.0, 1.0, 0.0]  # m, s, w_t (y_t - m), w_t, c


def test_poisoned_buffers_are_overwritten(rng):
    """NaN-filled gradient, statistics and partials buffers are written whole; ignored rows whose logits
    are NaN and inf give 0 (never a NaN through a mask); kept rows without a softmax give NaN, as torch."""
    n, r = 12, 40
    x, t, w = _inputs(rng, n, r, ignore=False)
    t[[0, 5]] = -100
    x[0] = math.nan
    x[5, :3] = torch.tensor([math.inf, -math.inf, math.nan])
    x[7] = -math.inf  # kept rows without a softmax
    x[8, 4] = math.inf
    x[9, 6] = math.nan
    x[10, 2] = -math.inf  # a -inf logit in a kept row: probability 0
    kw = CE_KW | {"label_smoothing": 0.1, "z_loss": 1e-3}
    grad = torch.full_like(x, math.nan)
    stats = (torch.full((n,), -5, dtype=torch.int64, device=DEVICE), torch.full((n,), math.nan, device=DEVICE))
    loss, lse = torch_ops.cross_entropy(x, t, w, **kw, grad=grad, stats=stats)
    kept = t != -100
    bad = torch.zeros(n, dtype=torch.bool, device=DEVICE)
    bad[[7, 8, 9]] = True
    ref = F.cross_entropy(x.double(), t, w.double(), reduction="none", label_smoothing=0.1)  # NaN rows as torch
    assert torch.equal(ref[bad].isnan(), loss[bad].isnan()) and loss[bad].isnan().all()
    assert (loss[~kept] == 0).all() and (lse[~kept] == 0).all() and (grad[~kept] == 0).all()
    assert (stats[0][~kept] == 0).all() and (stats[1][~kept] == 0).all()
    assert grad[bad].isnan().all() and stats[1][bad].isnan().all()
    good = kept & ~bad
    assert not grad[good].isnan().any() and not stats[1][good].isnan().any() and (stats[0] >= 0).all()
    ref_loss, ref_grad = reference_cross_entropy(x[good], t[good], w, reduction="none", label_smoothing=0.1,
                                                 z_loss=1e-3)  # fmt: skip
    assert_close(loss[good], ref_loss, torch.float32, "loss")
    assert_close(grad[good], ref_grad, torch.float32, "grad")
    assert stats[0][8].item() == 4 and stats[0][9].item() == 6 and stats[0][7].item() == 0  # torch.argmax
    # the gradient pass of a slice, distillation and BCE: every element written
    g = torch.full_like(x, math.nan)
    torch_ops.cross_entropy_backward(x, t, w, lse, torch.ones_like(lse), None, ignore_index=-100, label_smoothing=0.1,
                                     n_classes=r, class_offset=0, softcap=0.0, grad_scale=None, entropy_scale=None,
                                     grad=g)  # fmt: skip
    assert (g[~kept] == 0).all() and g[bad].isnan().all() and not g[good].isnan().any()
    out = torch.full((n, 5), math.nan, device=DEVICE)
    torch_ops.row_partials(x, t, w, ignore_index=-100, softcap=0.0, class_offset=0, smoothing=True, out=out)
    assert out[0].tolist() == [-math.inf, 0, 0, 0, 0] and not out[good].isnan().any()
    teacher = _tensor(rng.standard_normal((n, r)))
    for div in ("kl", "reverse_kl", "jsd"):
        g = torch.full_like(x, math.nan)
        d = torch_ops.distillation(x, teacher, t, divergence=div, beta=0.5, temperature=1.0, ignore_index=-100,
                                   grad_scale=None, grad=g)  # fmt: skip
        assert (d[~kept] == 0).all() and (g[~kept] == 0).all() and d[bad].isnan().all(), div
        assert not g[good].isnan().any() and not d[good].isnan().any(), div
    g = torch.full_like(x, math.nan)
    torch_ops.binary_cross_entropy_with_logits(teacher, torch.rand_like(teacher), None, None, grad=g)
    assert not g.isnan().any()


def test_out_of_range_index_is_a_nan_row(rng):
    """A class index outside [0, r) that no check caught (e.g. under torch.compile) gives a NaN row, never
    an out-of-bounds read; the other rows are untouched."""
    x, t, w = _inputs(rng, 6, 9, ignore=False)
    t[1], t[4] = 9, -3
    grad = torch.full_like(x, math.nan)
    loss, lse = torch_ops.cross_entropy(x, t, w, **CE_KW, grad=grad)
    assert loss[[1, 4]].isnan().all() and grad[[1, 4]].isnan().all()
    ok = torch.tensor([0, 2, 3, 5], device=DEVICE)
    ref_loss, ref_grad = reference_cross_entropy(x[ok], t[ok], w, reduction="none")
    assert_close(loss[ok], ref_loss, torch.float32, "loss")
    assert_close(grad[ok], ref_grad, torch.float32, "grad")
    assert_close(lse, torch.logsumexp(x.double(), -1), torch.float32, "lse")
