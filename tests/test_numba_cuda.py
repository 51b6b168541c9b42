"""numba_cuda-specific tests: launch layouts, the kernel-level contract, in-place gradients, bad input,
and every dtype in its own width.

The shared suite runs every backend through the ``backend`` fixture; here the ``numba_cuda`` module is
called directly, with its launch layout forced (threads per row, rows per block, blocks) so that the
grid-stride loops, masked tails and multi-row blocks are all exercised. The kernels read and write
bfloat16, float16, float32 and float64 as they are, in 64-bit words with the unaligned ends of each row
one element at a time: the dtypes run in row layouts that start rows at every offset within a word, and
the half codecs are checked bit for bit. Without a GPU this runs in the CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, set by conftest), where every thread is a Python thread: rows stay few and
short.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, TOL

import gpuxent as gx
from gpuxent import backends

nc = pytest.importorskip("gpuxent.backends.numba_cuda")
if not nc.is_available()[0]:
    pytest.skip(f"numba_cuda: {nc.is_available()[1]}", allow_module_level=True)

DEVICE = torch.device("cpu" if nc.SIMULATOR else "cuda")

# (threads per row, threads per block, max blocks): one row per thread group of 8 with 4 strided
# visits and a masked tail for r=37; two rows per block (the second block half empty for odd N);
# a single block looping over all rows; one thread per row.
LAYOUTS = [(8, 8, 4), (8, 16, 4), (4, 16, 1), (1, 4, 2)]


@pytest.fixture
def layout(monkeypatch):
    def set_layout(tpr, block, blocks):
        monkeypatch.setattr(nc, "MIN_THREADS_PER_ROW", tpr)
        monkeypatch.setattr(nc, "MAX_THREADS_PER_ROW", tpr)
        monkeypatch.setattr(nc, "THREADS_PER_BLOCK", block)
        monkeypatch.setattr(nc, "MAX_BLOCKS", blocks)

    return set_layout


def _t(a, dtype=None):
    return torch.as_tensor(a, dtype=dtype).to(DEVICE)


def _poisoned(shape, dtype):
    return torch.full(shape, math.nan, dtype=dtype, device=DEVICE)


def reference_ce(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, scale=1.0):
    """Float64 PyTorch: per-row loss (z-loss included), lse (0 for ignored rows) and the gradient of
    ``sum_i scale_i * loss_i`` (``scale``: a number, or one per row)."""
    x64 = x.detach().double().cpu().requires_grad_()
    t = target.cpu()
    if t.is_floating_point():
        t = t.double()
    w = None if weight is None else weight.double().cpu()
    y = softcap * torch.tanh(x64 / softcap) if softcap else x64
    loss = F.cross_entropy(y, t, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(y, -1)
    kept = torch.ones_like(lse, dtype=torch.bool) if t.is_floating_point() else t != ignore_index
    loss = loss + torch.where(kept, z_loss * lse**2, 0.0)
    (loss * torch.as_tensor(scale, dtype=torch.float64).cpu()).sum().backward()
    return loss.detach(), torch.where(kept, lse, 0.0).detach(), x64.grad


def run_ce(
    x, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, scale=None, grad=True
):
    g = _poisoned(x.shape, x.dtype) if grad is True else grad
    loss, lse = nc.cross_entropy(
        x, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
        softcap=softcap, grad_scale=scale, grad=g,
    )  # fmt: skip
    return loss, lse, g


def assert_close(actual, expected, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.double(), rtol=rtol, atol=atol)


def class_inputs(rng, n, r, dtype=torch.float32, ignore=()):
    x = _t(rng.standard_normal((n, r)) * 3, dtype)
    t = rng.integers(0, r, n)
    for i in ignore:
        t[i] = -100
    return x, _t(t, torch.int64)


# --------------------------------------------------------------------------- backend basics


def test_available_and_registered():
    ok, why = nc.is_available()
    assert ok, why
    assert nc.NAME == "numba_cuda" and "numba_cuda" in gx.available_backends()
    assert nc.supports(DEVICE)
    assert backends.select(DEVICE, "numba_cuda") == "numba_cuda" and backends.module("numba_cuda") is nc


@pytest.mark.parametrize("n_classes", [1, 3, 5, 33, 200, 5000])
def test_row_layout(n_classes):
    tpr, rows_per_block = nc._row_layout(n_classes)
    assert tpr & (tpr - 1) == 0 and nc.MIN_THREADS_PER_ROW <= tpr <= nc.MAX_THREADS_PER_ROW
    assert tpr * rows_per_block <= nc.MAX_THREADS


# --------------------------------------------------------------------------- cross-entropy, class targets


@pytest.mark.parametrize("layout_args", LAYOUTS, ids=lambda v: "tpr{}-block{}-grid{}".format(*v))
def test_layouts(rng, layout, layout_args):
    layout(*layout_args)
    x, t = class_inputs(rng, 5, 37, ignore=(2,))
    w = _t(rng.random(37) + 0.5, torch.float32)
    kw = dict(weight=w, label_smoothing=0.1, z_loss=1e-3)
    loss, lse, g = run_ce(x, t, scale=0.25, **kw)
    ref_loss, ref_lse, ref_g = reference_ce(x, t, scale=0.25, **kw)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(lse, ref_lse, torch.float32)
    assert_close(g, ref_g, torch.float32)
    assert (g[2] == 0).all() and loss[2] == 0


KEYWORDS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore_index": {"ignore_index": 3},
    "label_smoothing": {"label_smoothing": 0.2},
    "smoothing_weight": {"label_smoothing": 0.3, "weight": True},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 2.5},
    "everything": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "ignore_index": 0},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", KEYWORDS)
def test_keywords(rng, layout, name, dtype):
    layout(8, 16, 4)
    n, r = 6, 45
    kw = dict(KEYWORDS[name])
    if kw.pop("weight", False):
        kw["weight"] = _t(rng.random(r) * 2, dtype)
    x, t = class_inputs(rng, n, r, dtype)
    ignore_index = kw.get("ignore_index", -100)
    t[1] = ignore_index  # one ignored row, in whichever convention
    loss, lse, g = run_ce(x, t, scale=1 / 3, **kw)
    ref_loss, ref_lse, ref_g = reference_ce(x, t, scale=1 / 3, **kw)
    assert loss.dtype == lse.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(lse, ref_lse, dtype)
    assert_close(g, ref_g, dtype)


def test_grad_scale_device_tensor_and_forward_only(rng, layout):
    layout(8, 16, 4)
    x, t = class_inputs(rng, 4, 20)
    scale = _t([0.125], torch.float32).reshape(())  # a 0-d device tensor, as the mean's 1/denominator
    loss, lse, g = run_ce(x, t, scale=scale)
    ref_loss, ref_lse, ref_g = reference_ce(x, t, scale=0.125)
    assert_close(g, ref_g, torch.float32)
    loss2, lse2, _ = run_ce(x, t, grad=None)
    assert_close(loss2, ref_loss, torch.float32)
    assert_close(lse2, ref_lse, torch.float32)


SCALE_FORMS = {
    "float": lambda v, dtype: float(v[0]),
    "0-d": lambda v, dtype: _t(v[0], dtype).reshape(()),
    "(1,)": lambda v, dtype: _t(v[:1], dtype),
    "(N,)": lambda v, dtype: _t(v, dtype),  # row i's gradient times v[i]
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("form", SCALE_FORMS)
@pytest.mark.parametrize("name", ["plain", "everything"])
def test_grad_scale_forms(rng, layout, name, form, dtype):
    """grad_scale: a float, a 0-d or (1,) tensor for every row, or (N,) with one factor per row."""
    layout(8, 16, 4)
    n, r = 5, 29
    kw = dict(KEYWORDS[name])
    if kw.pop("weight", False):
        kw["weight"] = _t(rng.random(r) * 2, dtype)
    x, t = class_inputs(rng, n, r, dtype)
    t[1] = kw.get("ignore_index", -100)
    v = rng.uniform(-2, 2, n)
    v[3] = 0.0
    scale = SCALE_FORMS[form](v, dtype)
    loss, lse, g = run_ce(x, t, scale=scale, **kw)
    ref_loss, _, ref_g = reference_ce(x, t, scale=v if form == "(N,)" else v[0], **kw)
    assert_close(loss, ref_loss, dtype)
    assert_close(g, ref_g, dtype)


@pytest.mark.parametrize("kw", [{}, {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 3.0}], ids=["plain", "all"])
def test_per_row_grad_scale_probability_targets(rng, layout, kw):
    layout(4, 16, 2)
    n, r = 4, 21
    x = _t(rng.standard_normal((n, r)) * 2, torch.float32)
    q = _t(rng.dirichlet(np.ones(r), n), torch.float32)
    v = rng.uniform(0.1, 3, n)
    loss, _, g = run_ce(x, q, scale=_t(v, torch.float32), **kw)
    ref_loss, _, ref_g = reference_ce(x, q, scale=v, **kw)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(g, ref_g, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_row_grad_scale_half_rounds_once(rng, layout, dtype):
    """Half logits: the gradient is computed in float32, scale included, and rounded once on store.

    Rounding a float32 result once lands on the float64 reference rounded to the half dtype except
    where the two straddle a rounding boundary (a few elements in 10^4); rounding twice (store, then
    scale) misses on about a third of them.
    """
    layout(8, 16, 4)
    n, r = 4, 64
    x, t = class_inputs(rng, n, r, dtype)
    v = rng.uniform(0.3, 3, n)
    ref_loss, _, ref_g = reference_ce(x, t, scale=v)
    g = _poisoned(x.shape, dtype)
    loss, _, g = run_ce(x, t, scale=_t(v, torch.float32), grad=g)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(g, ref_g, dtype)
    exact = (g.cpu() == ref_g.to(dtype)).double().mean().item()
    assert exact > 0.9, f"only {exact:.0%} of the gradient is the reference rounded once"


def test_grad_scale_of_the_wrong_length_is_rejected(rng):
    x, t = class_inputs(rng, 4, 10)
    with pytest.raises(ValueError, match="grad_scale"):
        run_ce(x, t, scale=_t([0.5, 1.0], torch.float32))


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_inplace_gradient(rng, layout, softcap):
    """grad is logits itself: the target logit and the row stats must be read before any write."""
    layout(4, 16, 2)  # two row groups per block, so groups write while others still read
    x, t = class_inputs(rng, 5, 30, ignore=(3,))
    ref_loss, _, ref_g = reference_ce(x, t, label_smoothing=0.1, softcap=softcap, scale=0.5)
    loss, _, g = run_ce(x, t, label_smoothing=0.1, softcap=softcap, scale=0.5, grad=x)
    assert g is x
    assert_close(loss, ref_loss, torch.float32)
    assert_close(x, ref_g, torch.float32)


def test_strided_logits(rng, layout):
    """Rows with a stride larger than r (a slice of a wider buffer)."""
    layout(8, 8, 4)
    wide = _t(rng.standard_normal((4, 50)), torch.float32)
    x = wide[:, 5:40]
    t = _t(rng.integers(0, 35, 4), torch.int64)
    loss, lse, g = run_ce(x, t, z_loss=1e-2)
    ref_loss, ref_lse, ref_g = reference_ce(x, t, z_loss=1e-2)
    assert_close(loss, ref_loss, torch.float32)
    assert_close(g, ref_g, torch.float32)


def test_out_of_range_targets_never_read_out_of_bounds(rng, layout):
    """The functional layer rejects them; called directly, the kernel masks them into NaN rows."""
    layout(8, 16, 4)
    x, t = class_inputs(rng, 4, 12)
    t[1] = 12
    t[2] = -7
    loss, lse, g = run_ce(x, t)
    ref_loss, _, ref_g = reference_ce(x[[0, 3]], t[[0, 3]])
    assert torch.isnan(loss[1]) and torch.isnan(loss[2])
    assert torch.isnan(g[1]).all() and torch.isnan(g[2]).all()
    assert_close(loss[[0, 3]], ref_loss, torch.float32)
    assert_close(g[[0, 3]], ref_g, torch.float32)


def test_nonfinite_logits(layout):
    layout(4, 8, 2)
    x = _t([[0.0, -math.inf, 1.0, 2.0, -math.inf], [0.5, math.nan, 1.0, 0.0, 0.0]], torch.float32)
    t = _t([0, 2], torch.int64)
    loss, lse, g = run_ce(x, t)
    ref_loss, ref_lse, ref_g = reference_ce(x[:1], t[:1])
    assert_close(loss[:1], ref_loss, torch.float32)
    assert_close(g[:1], ref_g, torch.float32)
    assert g[0, 1] == 0 and g[0, 4] == 0
    assert torch.isnan(loss[1]) and torch.isnan(lse[1])


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's numpy inf - inf
@pytest.mark.parametrize("tpr", [1, 8])
def test_positive_inf_makes_the_row_nan_in_every_layout(layout, tpr):
    layout(tpr, 8, 2)
    x = _t([[0.0, math.inf, 1.0], [0.0, 1.0, 2.0]], torch.float32)
    t = _t([0, 2], torch.int64)
    loss, lse, g = run_ce(x, t)
    ref_loss, _, ref_g = reference_ce(x, t)
    assert torch.isnan(ref_loss[0]) and torch.isnan(loss[0]) and torch.isnan(lse[0])
    assert_close(loss[1:], ref_loss[1:], torch.float32)
    assert_close(g[1:], ref_g[1:], torch.float32)


NEG_INF_KEYWORDS = {
    "plain": {},
    "weight": {"weight": True},
    "label_smoothing": {"label_smoothing": 0.2},
    "smoothing_weight": {"label_smoothing": 0.3, "weight": True},
    "z_loss": {"z_loss": 1e-2},
    "prob": {"prob": True},
    "prob_all": {"prob": True, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-3},
    "ignored": {"ignored": True},
    "ignored_all": {"ignored": True, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-3},
}


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's numpy -inf - -inf
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tpr", [1, 8])
@pytest.mark.parametrize("name", NEG_INF_KEYWORDS)
def test_row_of_neg_inf_is_nan_like_torch(rng, layout, name, tpr, dtype):
    """A kept row of all -inf: NaN loss and NaN gradient on the whole row, as torch (F.cross_entropy
    and its autograd). An ignored one counts for nothing: loss and gradient 0 (torch's gradient is NaN
    there, log_softmax's backward multiplying its NaN softmax by 0: gpuxent's contract is 0 for every
    ignored row, on every backend). Other rows exact."""
    layout(tpr, 16, 2)
    n, r = 4, 19
    kw = dict(NEG_INF_KEYWORDS[name])
    if kw.pop("weight", False):
        kw["weight"] = _t(rng.random(r) + 0.5, dtype)
    prob, ignored = kw.pop("prob", False), kw.pop("ignored", False)
    x = _t(rng.standard_normal((n, r)) * 2, dtype)
    x[1] = -math.inf
    if prob:
        t = _t(rng.dirichlet(np.ones(r), n), dtype)
    else:
        t = _t(rng.integers(0, r, n), torch.int64)
        t[1] = -100 if ignored else t[1]
    g = torch.full(x.shape, 12345.0, dtype=dtype, device=DEVICE)  # poisoned, but not with NaN
    loss, lse, g = run_ce(x, t, scale=0.5, grad=g, **kw)
    ref_loss, _, ref_g = reference_ce(x, t, scale=0.5, **kw)
    assert ref_g[1].isnan().all() and (ref_loss[1] == 0 if ignored else ref_loss[1].isnan())
    if ignored:
        ref_g[1] = 0
    torch.testing.assert_close(loss.cpu().double(), ref_loss, rtol=TOL[dtype][0], atol=TOL[dtype][1], equal_nan=True)
    torch.testing.assert_close(g.cpu().double(), ref_g, rtol=TOL[dtype][0], atol=TOL[dtype][1], equal_nan=True)
    assert lse[1] == (0 if ignored else -math.inf)  # torch.logsumexp's -inf (0 for an ignored row)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("tpr", [1, 8])
def test_softmax_of_a_row_of_neg_inf_or_nan_is_nan_like_torch(rng, layout, log, tpr):
    layout(tpr, 16, 2)
    x = _t(rng.standard_normal((4, 11)), torch.float32)
    x[1] = -math.inf
    x[2, [0, 5]] = torch.tensor([math.nan, -math.inf])  # NaN anywhere: the whole row, -inf included
    out = nc.softmax(x, log=log)
    x64 = x.double().cpu()
    ref = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
    assert ref[1:3].isnan().all()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=2e-5, atol=2e-6, equal_nan=True)


# --------------------------------------------------------------------------- probability targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kw", [{}, {"weight": True, "label_smoothing": 0.2}, {"z_loss": 1e-2, "softcap": 3.0}], ids=["plain", "ws", "zs"]
)
def test_probability_targets(rng, layout, kw, dtype):
    layout(8, 16, 4)
    n, r = 5, 40
    kw = dict(kw)
    if kw.pop("weight", False):
        kw["weight"] = _t(rng.random(r) + 0.5, dtype)
    x = _t(rng.standard_normal((n, r)) * 2, dtype)
    q = _t(rng.dirichlet(np.ones(r), n), dtype)
    loss, lse, g = run_ce(x, q, scale=0.2, **kw)
    ref_loss, ref_lse, ref_g = reference_ce(x, q, scale=0.2, **kw)
    assert_close(loss, ref_loss, dtype)
    assert_close(lse, ref_lse, dtype)
    assert_close(g, ref_g, dtype)


# --------------------------------------------------------------------------- half inputs, public API


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_inplace(rng, layout, dtype):
    layout(8, 16, 4)
    x, t = class_inputs(rng, 3, 24, dtype)
    ref_loss, _, ref_g = reference_ce(x, t, scale=0.5)
    loss, _, g = run_ce(x, t, scale=0.5, grad=x)
    assert loss.dtype == torch.float32 and g.dtype == dtype
    assert_close(loss, ref_loss, dtype)
    assert_close(x, ref_g, dtype)


def test_public_api_end_to_end(rng):
    """gx.cross_entropy on (..., r) non-contiguous input, backward through autograd, mean reduction."""
    x = _t(rng.standard_normal((7, 2, 3)), torch.float32).transpose(0, 2)  # (3, 2, 7): r = 7, strided
    t = _t(rng.integers(0, 7, (3, 2)), torch.int64)
    t[0, 1] = -100
    xr = x.detach().clone().requires_grad_()
    loss = gx.cross_entropy(xr, t, label_smoothing=0.1, z_loss=1e-3, backend="numba_cuda")
    loss.backward()
    x64 = x.detach().double().cpu().requires_grad_()
    rows = F.cross_entropy(x64.reshape(-1, 7), t.reshape(-1).cpu(), reduction="none", label_smoothing=0.1)
    lse = torch.logsumexp(x64.reshape(-1, 7), -1)
    kept = t.reshape(-1).cpu() != -100
    ref = (rows + torch.where(kept, 1e-3 * lse**2, 0.0)).sum() / kept.sum()
    ref.backward()
    assert_close(loss, ref.detach(), torch.float32)
    assert_close(xr.grad, x64.grad, torch.float32)


def test_public_api_inplace_and_numpy(rng):
    x = rng.standard_normal((4, 9)).astype(np.float32)
    t = rng.integers(0, 9, 4)
    ref_loss = F.cross_entropy(torch.from_numpy(x).double(), torch.from_numpy(t))
    loss, grad = gx.cross_entropy_and_grad(x.copy(), t, backend="numba_cuda")
    loss2, grad2 = gx.cross_entropy_and_grad(x.copy(), t, backend="numba_cuda", inplace_grad=True)
    assert isinstance(loss, (np.ndarray, np.generic)) and abs(float(loss) - ref_loss.item()) < 1e-5
    np.testing.assert_allclose(grad, grad2, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- softmax, BCE


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax(rng, layout, log, dtype):
    layout(8, 16, 2)
    x = _t(rng.standard_normal((5, 30)) * 4, dtype)
    x[2, 3] = -math.inf
    out = nc.softmax(x, log=log)
    x64 = x.double().cpu()
    ref = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
    assert out.dtype == dtype
    if log:
        assert out[2, 3] == -math.inf
        out, ref = out[torch.isfinite(ref)], ref[torch.isfinite(ref)]
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce(rng, layout, dtype):
    layout(1, 8, 2)  # 16 threads for 30 elements: two strided visits, a masked tail
    p = _t(rng.random((3, 10)), dtype)
    p[0, 0], p[0, 1] = 0.0, 1.0  # the clamp of the logs at -100
    y = _t(rng.random((3, 10)), dtype)
    w = _t(rng.random((3, 10)), dtype)
    g = _poisoned(p.shape, dtype)
    loss = nc.binary_cross_entropy(p, y, w, grad=g)
    p64 = p.double().cpu().requires_grad_()
    ref = F.binary_cross_entropy(p64, y.double().cpu(), weight=w.double().cpu(), reduction="none")
    ref.sum().backward()
    assert loss.shape == (30,)
    assert_close(loss, ref.detach().reshape(-1), dtype)
    mask = (p64 > 0) & (p64 < 1)  # torch's gradient at exactly 0 or 1 is its own clamp; skip those
    assert_close(g[mask.to(g.device)], p64.grad[mask], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bce_with_logits_pos_weight(rng, layout, dtype):
    layout(1, 8, 2)
    x = _t(rng.standard_normal((3, 10)) * 30, dtype)  # large |x|: the stable form matters
    y = _t(rng.integers(0, 2, (3, 10)), dtype)
    w = _t(rng.random((3, 10)), dtype)
    pw = _t(rng.random(10) * 3, dtype)
    g = _poisoned(x.shape, dtype)
    loss = nc.binary_cross_entropy_with_logits(x, y, w, torch.broadcast_to(pw, x.shape), grad=g)
    x64 = x.double().cpu().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(
        x64, y.double().cpu(), weight=w.double().cpu(), pos_weight=pw.double().cpu(), reduction="none"
    )
    ref.sum().backward()
    assert_close(loss, ref.detach().reshape(-1), dtype)
    assert_close(g, x64.grad, dtype)
    loss_plain = nc.binary_cross_entropy_with_logits(x, y, None, None, grad=None)
    ref_plain = F.binary_cross_entropy_with_logits(x.double().cpu(), y.double().cpu(), reduction="none")
    assert_close(loss_plain, ref_plain.reshape(-1), dtype)


@pytest.mark.skipif(not HAS_CUDA or nc.SIMULATOR, reason="needs a real GPU: CPU tensors are copied there and back")
def test_cpu_tensors_on_a_gpu(rng):
    x = torch.from_numpy(rng.standard_normal((4, 300)).astype(np.float32))
    t = torch.from_numpy(rng.integers(0, 300, 4))
    g = torch.full_like(x, math.nan)
    ref_loss, _, ref_g = reference_ce(x, t)
    loss, _ = nc.cross_entropy(
        x, t, None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None, grad=g
    )
    assert loss.device.type == "cpu"
    assert_close(loss, ref_loss, torch.float32)
    assert_close(g, ref_g, torch.float32)


# Every kernel compiled for sm_90 without the simulator (typing and lowering of the real CUDA path, no
# float64 math in the float32 kernels, registers, spills): tests/test_gpu_audit.py.


# --------------------------------------------------------------------------- every dtype, in its own width
# The kernels read and write the logits' dtype directly, in 64-bit words of the storage, with the
# elements before a row's first whole word and after its last ("edges") one by one. The layouts below
# put rows at every offset within a word: "aligned" (r a multiple of 4), "odd" (r = 37: each row starts
# one element later in its word), "offset" (a slice 3 elements into its storage) and "strided" (rows of
# a wider buffer). A fresh gradient is laid out as "aligned"/"odd" logits are, not as the other two: there
# the gradient pass writes element by element.

import numba  # noqa: E402
from numba import cuda  # noqa: E402  (the simulator's where conftest set NUMBA_ENABLE_CUDASIM, as the backend's)

from gpuxent.backends import torch_ops  # noqa: E402

ALL_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
ROW_LAYOUTS = ["aligned", "odd", "offset", "strided"]


def _compute_of(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(values, dtype, layout):
    """``values`` (N, r) in ``dtype``, laid out as ``layout`` (the rows' bytes are what they say)."""
    x = torch.as_tensor(values).to(dtype)
    n, r = x.shape
    if layout == "offset":
        buf = torch.full((n * r + 3,), 7.0, dtype=dtype, device=DEVICE)
        out = buf[3:].view(n, r)
    elif layout == "strided":
        buf = torch.full((n, r + 5), 7.0, dtype=dtype, device=DEVICE)
        out = buf[:, 2 : 2 + r]
    else:
        out = torch.empty((n, r), dtype=dtype, device=DEVICE)
    out.copy_(x.to(DEVICE))
    return out


def _r(layout):
    return 37 if layout == "odd" else 40


def assert_half_close(actual, expected, dtype, what):
    """A result in ``dtype`` against float64 (NaN where NaN): within the dtype's tolerance."""
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.cpu().double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}"
    )


def assert_rounded_once(g, ref, dtype, what):
    """A half gradient computed in float32 and rounded once: the float64 reference rounded to ``dtype``
    but where the two straddle a rounding boundary (rare); NaN where NaN."""
    assert_half_close(g, ref, dtype, what)
    if dtype in (torch.bfloat16, torch.float16):
        g, r = g.cpu(), ref.to(dtype)
        same = (g == r) | (g.isnan() & r.isnan())
        assert same.double().mean().item() > 0.9, f"{what}: only {same.double().mean():.0%} rounded once"


def _codec_kernel(kind):
    """A kernel of one codec: per word, its elements as values and the word re-encoded from them; per
    element, the same with ``load``/``store``; and floats encoded into words."""
    io = nc._codec(kind)
    P = io.per_word
    get, put, load, store = io.get, io.put, io.load, io.store

    @cuda.jit
    def kernel(words, values, rewords, el, el_values, el_out, floats, float_words):
        start = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        step = cuda.gridDim.x * cuda.blockDim.x
        for k in range(start, words.shape[0], step):
            acc = numba.int64(0)
            for q in range(P):
                v = get(words[k], q)
                values[k * P + q] = v
                acc = put(acc, q, v)
            rewords[k] = acc
        for j in range(start, el.shape[1], step):
            v = load(el[0], j)
            el_values[j] = v
            store(el_out[0], j, v)
        for k in range(start, float_words.shape[0], step):
            acc = numba.int64(0)
            for q in range(P):
                acc = put(acc, q, floats[k * P + q])
            float_words[k] = acc

    return kernel, P


def _special_floats(rng, n):
    """float32 values around every rounding case of the half dtypes: ties (even and odd), the largest
    finite halves and past them, half subnormals, zeros of both signs, infinities, NaN."""
    bits = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    bits[: n // 4] = (bits[: n // 4] & 0xFFFF0000) | 0x8000  # bfloat16 ties
    bits[n // 4 : n // 2] = (bits[n // 4 : n // 2] & 0xFFFFE000) | 0x1000  # float16 ties (10-bit mantissa)
    v = bits.view(np.float32).copy()
    scales = (10.0 ** rng.integers(-9, 6, n // 4)).astype(np.float32)
    v[n // 2 : 3 * n // 4] = rng.standard_normal(n // 4).astype(np.float32) * scales
    extra = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, -65520.0, 6e-8, 3e-8, 2.9e-8, 1e-40,
             3.3895314e38, 3.3961775e38, -3.4e38, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11]  # fmt: skip
    v[: len(extra)] = np.array(extra, dtype=np.float32)
    return v


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow in the simulator's float16 casts
@pytest.mark.parametrize("kind", ["bf16", "fp16", "fp32"])
def test_codec_bit_exact(rng, kind):
    """Every bfloat16 / float16 bit pattern (a sample of float32's) widened exactly, as torch widens it,
    from a word and from an element, and stored back unchanged (NaN: a NaN); float32 values rounded
    once to nearest even, as torch rounds them (NaN stays NaN)."""
    kernel, P = _codec_kernel(kind)
    half = kind != "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]
    if half:
        patterns = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)  # all 65536
    else:
        patterns = torch.from_numpy(_special_floats(rng, 4096)).view(torch.int32)
    as_dtype = patterns.view(dtype)
    el = (patterns.view(torch.int16) if kind == "bf16" else as_dtype).reshape(1, -1)[:, :4099]
    floats = torch.from_numpy(_special_floats(rng, 4096))
    out = {
        "values": torch.empty(patterns.numel(), dtype=torch.float32),
        "rewords": torch.empty(patterns.numel() // P, dtype=torch.int64),
        "el_values": torch.empty(el.shape[1], dtype=torch.float32),
        "el_out": torch.empty_like(el),
        "float_words": torch.empty(floats.numel() // P, dtype=torch.int64),
    }
    args = [patterns.view(torch.int64), out["values"], out["rewords"], el, out["el_values"], out["el_out"], floats,
            out["float_words"]]  # fmt: skip
    args = [a.to(DEVICE) for a in args]
    a = nc._Launch(DEVICE)
    kernel[4, 32](*(a(v) for v in args))
    values, rewords, el_values, el_out, float_words = (args[i].cpu() for i in (1, 2, 4, 5, 7))
    wide = as_dtype.float()
    nan = wide.isnan()
    torch.testing.assert_close(values, wide, rtol=0, atol=0, equal_nan=True)  # bit for bit, signs of 0 too
    assert (values.view(torch.int32)[~nan] == wide.view(torch.int32)[~nan]).all()
    back = rewords.view(dtype)
    assert (rewords.view(patterns.dtype)[~nan] == patterns[~nan]).all() and back[nan].isnan().all()
    n_el = el.shape[1]
    assert (el_values.view(torch.int32)[~nan[:n_el]] == wide[:n_el].view(torch.int32)[~nan[:n_el]]).all()
    assert (el_out.reshape(-1)[~nan[:n_el]] == el.reshape(-1)[~nan[:n_el]]).all()
    rounded = floats.to(dtype)
    got = float_words.view(dtype)
    fnan = floats.isnan()
    assert got[fnan].isnan().all()
    bits = torch.int16 if half else torch.int32
    mismatch = got.view(bits) != rounded.view(bits)
    assert not mismatch[~fnan].any(), f"rounded otherwise than torch: {floats[~fnan][mismatch[~fnan]][:8]}"


CE_HALF_KEYWORDS = {
    "plain": {},
    "everything": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0, "ignore_index": 0},
    "prob": {"prob": True, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 3.0},
}


def _ce_case(rng, n, r, dtype, layout, kw):
    kw = dict(kw)
    cdt = _compute_of(dtype)
    if kw.pop("weight", False):
        kw["weight"] = _t(rng.random(r) + 0.5, cdt)
    x = _rows(rng.standard_normal((n, r)) * 3, dtype, layout)
    if kw.pop("prob", False):
        t = _t(rng.dirichlet(np.ones(r), n), cdt)
    else:
        t = _t(rng.integers(0, r, n), torch.int64)
        t[1] = kw.get("ignore_index", -100)  # an ignored row
    return x, t, kw


@pytest.mark.parametrize("name", CE_HALF_KEYWORDS)
@pytest.mark.parametrize("layout", ROW_LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_cross_entropy_every_dtype_and_layout(rng, layout, name, dtype, monkeypatch):
    """Forward+backward on logits of each dtype and layout, against float64 PyTorch: the loss and lse
    to float32 accuracy (computed in float32 from the exact half inputs), the gradient written in the
    logits' dtype (poisoned before), rounded once; per-row scales; several thread visits per row."""
    monkeypatch.setattr(nc, "MIN_THREADS_PER_ROW", 4)
    monkeypatch.setattr(nc, "MAX_THREADS_PER_ROW", 4)
    monkeypatch.setattr(nc, "THREADS_PER_BLOCK", 8)  # two rows per block
    monkeypatch.setattr(nc, "MAX_BLOCKS", 2)  # blocks loop over the rows
    n, r = 5, _r(layout)
    x, t, kw = _ce_case(rng, n, r, dtype, layout, CE_HALF_KEYWORDS[name])
    v = rng.uniform(0.2, 2, n)
    g = _poisoned(x.shape, dtype)
    loss, lse, g = run_ce(x, t, scale=_t(v, _compute_of(dtype)), grad=g, **kw)
    ref_loss, ref_lse, ref_g = reference_ce(x, t, scale=v, **kw)
    assert loss.dtype == lse.dtype == _compute_of(dtype) and g.dtype == dtype
    assert_close(loss, ref_loss, _compute_of(dtype))
    assert_close(lse, ref_lse, _compute_of(dtype))
    assert_rounded_once(g, ref_g, dtype, f"{name} {layout} gradient")
    if not t.is_floating_point():
        assert (g[1] == 0).all() and loss[1] == 0 and lse[1] == 0  # the ignored row


@pytest.mark.parametrize("layout_name", ROW_LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_inplace_gradient_every_dtype_and_layout(rng, layout_name, dtype, layout):
    """grad is the logits themselves, in any layout: each word read before it is overwritten, the
    target logit before the row's first write; one thread per row and several."""
    n, r = 4, _r(layout_name)
    kw = {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-3}
    x = _rows(rng.standard_normal((n, r)) * 2, dtype, layout_name)
    t = _t(rng.integers(0, r, n), torch.int64)
    t[2] = -100
    ref_loss, _, ref_g = reference_ce(x, t, scale=0.5, **kw)
    for tpr in (1, 4):
        layout(tpr, 8, 2)
        y = _rows(x.cpu(), dtype, layout_name)
        loss, _, g = run_ce(y, t, scale=0.5, grad=y, **kw)
        assert g is y
        assert_close(loss, ref_loss, _compute_of(dtype))
        assert_rounded_once(y, ref_g, dtype, f"in place, {tpr} threads per row")


@pytest.mark.parametrize("form", ["(N,)", "expanded", "(1,)"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_half_grad_scale_forms(rng, layout, form, dtype):
    """Per-row factors (dense, stride-0 expanded, one for all) multiply the float32 gradient before its
    one rounding to the half dtype."""
    layout(4, 8, 2)
    n, r = 5, 23
    x = _rows(rng.standard_normal((n, r)) * 2, dtype, "odd")
    t = _t(rng.integers(0, r, n), torch.int64)
    v = rng.uniform(0.3, 3, n)
    scale = {
        "(N,)": _t(v, torch.float32),
        "expanded": _t(v[:1], torch.float32).expand(n),
        "(1,)": _t(v[:1], torch.float32),
    }[form]
    loss, _, g = run_ce(x, t, scale=scale, grad=_poisoned(x.shape, dtype), label_smoothing=0.05)
    ref_loss, _, ref_g = reference_ce(x, t, scale=v if form == "(N,)" else v[0], label_smoothing=0.05)
    assert_close(loss, ref_loss, torch.float32)
    assert_rounded_once(g, ref_g, dtype, form)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=DTYPE_IDS.get)
def test_half_nonfinite_logits(layout, dtype):
    """-inf in a half row: probability 0 and gradient exactly 0 there; NaN or +inf: the row's loss and
    gradient NaN, stored as a half NaN."""
    layout(4, 8, 2)
    inf, nan = math.inf, math.nan
    x = _rows([[0.5, -inf, 1.0, 2.0, -inf, 0.25, 1.0], [0.5, nan, 1.0, 0.0, 0.0, 1.0, 2.0],
               [0.0, 1.0, inf, 0.0, 1.0, 0.0, 0.0]], dtype, "odd")  # fmt: skip
    t = _t([0, 2, 1], torch.int64)
    loss, lse, g = run_ce(x, t, grad=_poisoned(x.shape, dtype))
    ref_loss, _, ref_g = reference_ce(x[:1], t[:1])
    assert_close(loss[:1], ref_loss, torch.float32)
    assert_rounded_once(g[:1], ref_g, dtype, "row 0")
    assert g[0, 1] == 0 and g[0, 4] == 0
    assert loss[1:].isnan().all() and g[1:].isnan().all()


@pytest.mark.parametrize("layout_name", ["odd", "offset"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_stats_every_dtype(rng, layout, layout_name, dtype):
    """argmax and entropy from the same pass, on logits of each dtype (a tie and a NaN row included),
    against the torch backend on float64 copies; the loss and gradient unchanged by them."""
    layout(4, 8, 2)
    n, r = 5, _r(layout_name)
    vals = rng.standard_normal((n, r)) * 2
    vals[0, [3, 30]] = 9.0  # a tie: the lower index
    vals[3, 7] = math.nan
    x = _rows(vals, dtype, layout_name)
    t = _t(rng.integers(0, r, n), torch.int64)
    t[2] = -100
    cdt = _compute_of(dtype)
    kw = dict(ignore_index=-100, label_smoothing=0.1, z_loss=0.0, softcap=5.0, grad_scale=0.5)
    stats = (torch.full((n,), -7, dtype=torch.int64, device=DEVICE), _poisoned((n,), cdt))
    g = _poisoned(x.shape, dtype)
    loss, lse = nc.cross_entropy(x, t, None, grad=g, stats=stats, **kw)
    x64 = x.cpu().double()
    ref_stats = (torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float64))
    ref_g = torch.empty_like(x64)
    ref_loss, ref_lse = torch_ops.cross_entropy(x64, t.cpu(), None, grad=ref_g, stats=ref_stats, **kw)
    assert stats[0].tolist() == ref_stats[0].tolist()
    assert_half_close(stats[1], ref_stats[1], cdt, "entropy")
    assert_half_close(loss, ref_loss, cdt, "loss")
    assert_rounded_once(g, ref_g, dtype, "gradient with stats")


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("layout_name", ROW_LAYOUTS)
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_softmax_every_dtype_and_layout(rng, layout, layout_name, dtype, log):
    """Softmax and log-softmax read in the input's dtype, written in the compute dtype."""
    layout(4, 8, 2)
    x = _rows(rng.standard_normal((3, _r(layout_name))) * 3, dtype, layout_name)
    out = nc.softmax(x, log=log)
    x64 = x.cpu().double()
    ref = torch.log_softmax(x64, -1) if log else torch.softmax(x64, -1)
    assert out.dtype == _compute_of(dtype)
    assert_close(out, ref, _compute_of(dtype))


VP_KEYWORDS = {
    "plain": {},
    "all": {"weight": True, "label_smoothing": 0.2, "softcap": 4.0, "ignore": True, "entropy": True},
    "prob": {"prob": True, "weight": True, "label_smoothing": 0.1, "softcap": 3.0, "entropy": True},
}


@pytest.mark.parametrize("name", VP_KEYWORDS)
@pytest.mark.parametrize("layout_name", ["odd", "strided"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_vocab_parallel_every_dtype(rng, layout, layout_name, name, dtype):
    """row_partials and cross_entropy_backward on a slice of the classes in each dtype, against the
    torch backend on float64 copies (per-row scales; the gradient poisoned, then in place)."""
    layout(4, 8, 2)
    opts = VP_KEYWORDS[name]
    n, r, offset, n_global = 5, _r(layout_name), 30, 100
    cdt = _compute_of(dtype)
    x = _rows(rng.standard_normal((n, r)) * 3, dtype, layout_name)
    if opts.get("prob"):
        t = _t(rng.dirichlet(np.ones(r), n), cdt)
    else:
        t = _t(rng.integers(0, n_global, n), torch.int64)
        t[0] = offset + 3  # in the slice
        if opts.get("ignore"):
            t[1] = -100
    w = _t(rng.random(r) + 0.5, cdt) if opts.get("weight") else None
    cap, eps = opts.get("softcap", 0.0), opts.get("label_smoothing", 0.0)
    x64, t64 = x.cpu().double(), (t.cpu().double() if t.is_floating_point() else t.cpu())
    w64 = None if w is None else w.cpu().double()
    out = _poisoned((n, 5), cdt)
    nc.row_partials(x, t, w, ignore_index=-100, softcap=cap, class_offset=offset, smoothing=eps > 0, out=out)
    ref = torch.empty(n, 5, dtype=torch.float64)
    torch_ops.row_partials(x64, t64, w64, ignore_index=-100, softcap=cap, class_offset=offset, smoothing=eps > 0,
                           out=ref)  # fmt: skip
    assert_close(out, ref, cdt)
    lse = rng.standard_normal(n) + 5
    coef = rng.uniform(0.5, 1.5, n)
    ent = rng.uniform(0.5, 2, n) if opts.get("entropy") else None
    gs, es = rng.uniform(-2, 2, n), rng.uniform(-2, 2, n)
    common = dict(ignore_index=-100, label_smoothing=eps, n_classes=n_global, class_offset=offset, softcap=cap)
    args = [_t(lse, cdt), _t(coef, cdt), None if ent is None else _t(ent, cdt)]
    ref_args = [torch.as_tensor(lse), torch.as_tensor(coef), None if ent is None else torch.as_tensor(ent)]
    ref_g = torch.empty_like(x64)
    torch_ops.cross_entropy_backward(x64, t64, w64, *ref_args, grad_scale=torch.as_tensor(gs),
                                     entropy_scale=None if ent is None else torch.as_tensor(es), grad=ref_g,
                                     **common)  # fmt: skip
    scales = dict(grad_scale=_t(gs, cdt), entropy_scale=None if ent is None else _t(es, cdt))
    g = _poisoned(x.shape, dtype)
    nc.cross_entropy_backward(x, t, w, *args, grad=g, **scales, **common)
    assert_rounded_once(g, ref_g, dtype, f"{name} gradient")
    if not t.is_floating_point() and opts.get("ignore"):
        assert (g[1] == 0).all()
    nc.cross_entropy_backward(x, t, w, *args, grad=x, **scales, **common)
    assert_rounded_once(x, ref_g, dtype, f"{name} gradient in place")


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("teacher_layout", ["alike", "offset"])
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=DTYPE_IDS.get)
def test_distillation_every_dtype(rng, layout, dtype, teacher_layout, divergence):
    """Distillation of student and teacher logits in each dtype (the teacher laid out as the student,
    so that both are walked in words, or not, so that all three rows are read one by one), a left-out
    row, per-row scales: against the torch backend on float64 copies."""
    layout(4, 8, 2)
    n, r = 5, 37
    cdt = _compute_of(dtype)
    s = _rows(rng.standard_normal((n, r)) * 2, dtype, "odd")
    tch = _rows(rng.standard_normal((n, r)) * 2, dtype, "odd" if teacher_layout == "alike" else "offset")
    target = _t(rng.integers(0, r, n), torch.int64)
    target[3] = -100
    v = rng.uniform(0.2, 2, n)
    kw = dict(divergence=divergence, beta=0.3, temperature=1.7, ignore_index=-100)
    ref_g = torch.empty(n, r, dtype=torch.float64)
    ref = torch_ops.distillation(s.cpu().double(), tch.cpu().double(), target.cpu(), grad_scale=torch.as_tensor(v),
                                 grad=ref_g, **kw)  # fmt: skip
    g = _poisoned(s.shape, dtype)
    loss = nc.distillation(s, tch, target, grad_scale=_t(v, cdt), grad=g, **kw)
    assert loss.dtype == cdt and g.dtype == dtype
    assert_close(loss, ref, cdt)
    assert_rounded_once(g, ref_g, dtype, f"{divergence} gradient")
    assert (g[3] == 0).all() and loss[3] == 0
    fwd = nc.distillation(s, tch, target, grad_scale=None, grad=None, **kw)
    assert_close(fwd, ref, cdt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DTYPE_IDS.get)
def test_element_by_element_without_words(rng, layout, dtype, monkeypatch):
    """Where a storage gives no words (``WORDS`` off stands for an unaligned one), every kernel reads and
    writes element by element, with the same results."""
    layout(4, 8, 2)
    monkeypatch.setattr(nc, "WORDS", False)
    x, t, kw = _ce_case(rng, 4, 40, dtype, "aligned", CE_HALF_KEYWORDS["everything"])
    loss, _, g = run_ce(x, t, scale=0.5, grad=_poisoned(x.shape, dtype), **kw)
    ref_loss, _, ref_g = reference_ce(x, t, scale=0.5, **kw)
    assert_close(loss, ref_loss, torch.float32)
    assert_rounded_once(g, ref_g, dtype, "without words")
    assert_close(nc.softmax(x, log=False), torch.softmax(x.cpu().double(), -1), torch.float32)


def test_layout_decisions():
    """Words where the storage allows them; the gradient (or teacher) gets them only when laid out as the
    logits, row by row."""
    x = torch.zeros(4, 37, dtype=torch.bfloat16, device=DEVICE)
    same = nc._rows_alike(x, x)
    assert same[0].off == 0 and same[1].off == 0
    fresh = nc._rows_alike(x, torch.zeros(4, 37, dtype=torch.bfloat16, device=DEVICE))
    assert fresh[1].off == 0  # the same offsets in every row
    sliced = torch.zeros(4 * 37 + 1, dtype=torch.bfloat16, device=DEVICE)[1:].view(4, 37)
    assert nc._rows_alike(x, sliced)[1].off == -1
    wide = torch.zeros(4, 38, dtype=torch.bfloat16, device=DEVICE)[:, :37]
    assert nc._rows_alike(x, wide)[1].off == -1  # row strides 37 and 38: alike in row 0 only
    assert nc._rows_alike(x[:1], wide[:1])[1].off == 0
    wider = torch.zeros(4, 41, dtype=torch.bfloat16, device=DEVICE)[:, :37]
    assert nc._rows_alike(x, wider)[1].off == 0  # strides 37 and 41: 4 apart, a word of bfloat16
    assert nc._Rows(torch.zeros(3, 5, dtype=torch.float64, device=DEVICE)).per_word == 1
