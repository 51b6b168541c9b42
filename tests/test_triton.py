"""Tests of the Triton backend itself: its kernel contract, chunking, strides, in-place gradient.

The shared suite (test_cross_entropy.py, ...) runs every backend through the public API; these tests
call ``gpuxent.backends.triton`` directly, on CUDA tensors when there is a GPU and through Triton's
interpreter (``TRITON_INTERPRET=1``, set by conftest) on CPU tensors otherwise. Interpreter shapes
stay small: N <= 8, r <= 600.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, TOL

import gpuxent as gx
from gpuxent import backends

ok, why = backends.status()["triton"]
pytestmark = pytest.mark.skipif(not ok, reason=f"triton: {why}")
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
INTERPRETED = not HAS_CUDA
R_LONG = 300 if INTERPRETED else 70_000  # several chunks per row and a masked tail
ACC = {
    torch.float64: torch.float64,
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}


@pytest.fixture(scope="module")
def tb():
    return backends.get("triton")


def assert_close(actual, expected, dtype, what, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(
        actual.detach().cpu().double(), expected.detach().cpu().double(), rtol=rtol * scale, atol=atol * scale,
        equal_nan=True, msg=lambda m: f"{what}: {m}",
    )  # fmt: skip


def reference_rows(x, target, weight=None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, scale=1.0):
    """The backend contract in float64 PyTorch: per-row loss (z_loss included), lse (0 for ignored
    rows) and ``scale * d loss_i / d logits_i``."""
    x64 = x.detach().cpu().double().requires_grad_()
    y = softcap * torch.tanh(x64 / softcap) if softcap else x64
    prob = target.is_floating_point()
    t = target.detach().cpu()
    t = t.double() if prob else t.long()
    w = None if weight is None else weight.detach().cpu().double()
    loss = F.cross_entropy(y, t, weight=w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    kept = torch.ones(len(t), dtype=torch.bool) if prob else t != ignore_index
    lse = torch.logsumexp(y, -1)
    loss = loss + z_loss * lse**2 * kept
    (loss.sum() * scale).backward()
    return loss.detach(), torch.where(kept, lse, 0).detach(), x64.grad


def make_inputs(rng, n, r, dtype, prob=False, weighted=False, ignore=False, spread=3.0):
    x = torch.as_tensor(rng.standard_normal((n, r)) * spread).to(dtype).to(DEVICE)
    if prob:
        t = torch.softmax(torch.as_tensor(rng.standard_normal((n, r)) * 2), -1).to(ACC[dtype]).to(DEVICE)
    else:
        t = torch.as_tensor(rng.integers(0, r, n)).to(DEVICE)
        if ignore:
            t[rng.random(n) < 0.3] = -100
            t[min(1, n - 1)] = -100
    w = torch.as_tensor(rng.random(r) + 0.1).to(ACC[dtype]).to(DEVICE) if weighted else None
    return x, t, w


def run(tb, x, t, w=None, *, grad=True, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, scale=None):
    """Call the backend with a NaN-poisoned gradient buffer; returns (loss, lse, grad)."""
    g = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device) if grad else None
    loss, lse = tb.cross_entropy(
        x, t, w, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
        grad_scale=scale, grad=g,
    )  # fmt: skip
    return loss, lse, g


KEYWORDS = {
    "plain": {},
    "weight+ignore": {"weighted": True, "ignore": True},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 4.0},
    "all": {"label_smoothing": 0.2, "weighted": True, "ignore": True, "z_loss": 1e-3, "softcap": 5.0},
}
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def test_launch_config_covers_chunks_and_row_groups(tb):
    """The shapes used below exercise several chunks with a masked tail, and several rows per program."""
    block, rows, _ = tb._launch_config(R_LONG, 4)
    assert block < R_LONG and R_LONG % block != 0 and rows == 1
    block, rows, _ = tb._launch_config(5, 4)
    assert block == 8 and rows > 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("spec", list(KEYWORDS))
def test_rows_match_reference(tb, rng, spec, prob, dtype):
    opts = dict(KEYWORDS[spec])
    weighted, ignore = opts.pop("weighted", False), opts.pop("ignore", False) and not prob
    x, t, w = make_inputs(rng, 5, R_LONG, dtype, prob, weighted, ignore)
    scale = float(rng.random() + 0.5)
    loss, lse, g = run(tb, x, t, w, scale=scale, **opts)
    assert loss.dtype == lse.dtype == ACC[dtype] and g.dtype == dtype
    ref_loss, ref_lse, ref_grad = reference_rows(x, t, w, scale=scale, **opts)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(g, ref_grad, dtype, "grad")


@pytest.mark.parametrize("n, r", [(7, 5), (8, 3), (3, 64), (2, 1)])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_small_rows_several_per_program(tb, rng, n, r, prob):
    """Small r: a program holds several rows; the last group is partly past the end."""
    x, t, w = make_inputs(rng, n, r, torch.float32, prob, weighted=True, ignore=not prob)
    loss, lse, g = run(tb, x, t, w, label_smoothing=0.1, z_loss=1e-3)
    ref_loss, ref_lse, ref_grad = reference_rows(x, t, w, label_smoothing=0.1, z_loss=1e-3)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(lse, ref_lse, torch.float32, "lse")
    assert_close(g, ref_grad, torch.float32, "grad")


@pytest.mark.parametrize("kind", ["none", "float", "tensor"])
def test_grad_scale_forms(tb, rng, kind):
    """grad_scale: None (1), a Python float, or a one-element device tensor read by pointer."""
    x, t, _ = make_inputs(rng, 4, R_LONG, torch.float64, ignore=True)
    scale = {"none": None, "float": 1 / 3, "tensor": torch.tensor([1 / 3], dtype=torch.float64, device=DEVICE)}[kind]
    _, _, g = run(tb, x, t, scale=scale)
    _, _, ref_grad = reference_rows(x, t, scale=1.0 if kind == "none" else 1 / 3)
    assert_close(g, ref_grad, torch.float64, "grad")


def test_forward_only_leaves_no_gradient(tb, rng):
    x, t, w = make_inputs(rng, 4, R_LONG, torch.float32, weighted=True)
    x0 = x.clone()
    loss, lse, _ = run(tb, x, t, w, grad=False, label_smoothing=0.1)
    ref_loss, ref_lse, _ = reference_rows(x, t, w, label_smoothing=0.1)
    assert_close(loss, ref_loss, torch.float32, "loss")
    assert_close(lse, ref_lse, torch.float32, "lse")
    assert torch.equal(x, x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("spec", ["plain", "all"])
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_inplace_gradient(tb, rng, spec, prob, dtype):
    """grad is the logits tensor itself: every element is read before it is overwritten."""
    opts = dict(KEYWORDS[spec])
    weighted, ignore = opts.pop("weighted", False), opts.pop("ignore", False) and not prob
    x, t, w = make_inputs(rng, 6, R_LONG, dtype, prob, weighted, ignore)
    ref_loss, ref_lse, ref_grad = reference_rows(x, t, w, scale=0.5, **opts)
    kw = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None, **opts}
    loss, lse = tb.cross_entropy(x, t, w, grad_scale=0.5, grad=x, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(x, ref_grad, dtype, "in-place grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
def test_row_stride_differs_from_r(tb, rng, prob, dtype):
    """A sliced view (stride(0) > r) goes straight to the kernel, and so does a strided gradient
    buffer; the padding around the gradient is left alone. Odd strides and base pointers one element
    past a 16-byte boundary: the unaligned rows that GPU code must not load as 16-byte vectors."""
    n, r, pad = 5, R_LONG, 37
    big = torch.as_tensor(rng.standard_normal((n, r + pad)) * 3, dtype=dtype).to(DEVICE)
    x = big[:, 1 : r + 1]
    assert x.stride(0) == r + pad and x.stride(0) % 2 == 1 and x.data_ptr() % 16 != 0
    _, t, w = make_inputs(rng, n, r, dtype, prob, weighted=True, ignore=not prob)
    if prob:
        t = torch.cat([t, torch.zeros(n, 11, dtype=t.dtype, device=DEVICE)], 1)[:, :r]  # strided targets too
    gbig = torch.full((n, r + 2 * pad), float("nan"), dtype=dtype, device=DEVICE)
    g = gbig[:, pad : pad + r]
    loss, lse = tb.cross_entropy(
        x, t, w, ignore_index=-100, label_smoothing=0.1, z_loss=1e-3, softcap=6.0, grad_scale=0.7, grad=g
    )
    ref_loss, ref_lse, ref_grad = reference_rows(x, t, w, label_smoothing=0.1, z_loss=1e-3, softcap=6.0, scale=0.7)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(g, ref_grad, dtype, "grad")
    assert gbig[:, :pad].isnan().all() and gbig[:, pad + r :].isnan().all()


def test_strided_view_through_public_api(rng):
    """The same through gx.cross_entropy_and_grad, against F.cross_entropy with a mean reduction."""
    n, r = 6, R_LONG
    big = torch.as_tensor(rng.standard_normal((n, 2 * r)), dtype=torch.float32).to(DEVICE)
    x = big[:, r:]
    t = torch.as_tensor(rng.integers(0, r, n)).to(DEVICE)
    t[2] = -100
    loss, grad = gx.cross_entropy_and_grad(x, t, label_smoothing=0.05, backend="triton")
    x64 = x.detach().cpu().double().requires_grad_()
    ref = F.cross_entropy(x64, t.cpu(), label_smoothing=0.05)
    ref.backward()
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, x64.grad, torch.float32, "grad")


def test_bfloat16_true_class_gradient_near_one(tb, rng):
    """p_t close to 1: grad_t = p_t - 1 is tiny and must come from float32 math, not a rounded p_t."""
    n, r = 6, R_LONG
    x = torch.as_tensor(rng.standard_normal((n, r)), dtype=torch.bfloat16).to(DEVICE)
    t = torch.as_tensor(rng.integers(0, r, n)).to(DEVICE)
    rows = torch.arange(n, device=DEVICE)
    # 1 - p_t from about 1e-2 down to 1e-4 (p_t rounds to 1 in bfloat16 below 2^-9); float32 sums of exp
    # keep ~1e-7 of 1 - p_t, so far smaller values would test float32 rather than the kernel
    x[rows, t] = (torch.as_tensor([5.0, 6.0, 7.0, 8.0, 9.0, 9.5]) + np.log(r)).to(torch.bfloat16).to(DEVICE)
    loss, _, g = run(tb, x, t)
    ref_loss, _, ref_grad = reference_rows(x, t)
    g_t, ref_t = g[rows, t].double().cpu(), ref_grad[rows.cpu(), t.cpu()]
    assert (ref_t < -5e-5).all() and (ref_t > -3e-2).all()
    torch.testing.assert_close(g_t, ref_t, rtol=1e-2, atol=0)  # relative: 8 bits of p_t - 1 survive
    torch.testing.assert_close(loss.double().cpu(), ref_loss, rtol=1e-2, atol=0)  # the loss is ~1 - p_t too


def test_masked_lanes_and_neg_inf_chunks(tb, rng):
    """Whole chunks of -inf, -inf in the tail, and a softcap (masked lanes must not become -cap)."""
    n, r = 4, R_LONG
    x, t, w = make_inputs(rng, n, r, torch.float32, weighted=True)
    x[0, : r // 2] = float("-inf")
    x[1, -5:] = float("-inf")
    t[0], t[1] = r - 1, 0
    for softcap in (None, 2.0):
        loss, lse, g = run(tb, x, t, w, softcap=softcap, z_loss=1e-2)
        ref_loss, ref_lse, ref_grad = reference_rows(x, t, w, softcap=softcap, z_loss=1e-2)
        assert torch.isfinite(loss).all() and torch.isfinite(g).all()
        assert_close(loss, ref_loss, torch.float32, f"loss softcap={softcap}")
        assert_close(lse, ref_lse, torch.float32, f"lse softcap={softcap}")
        assert_close(g, ref_grad, torch.float32, f"grad softcap={softcap}")


def test_softcap_float64_small_and_large_logits(tb, rng):
    """The kernel's tanh (series near 0, exponential form beyond) holds float64 accuracy."""
    x = torch.as_tensor(np.concatenate([rng.standard_normal((3, 200)) * 1e-3, rng.standard_normal((3, 200)) * 50], 1))
    x = x.to(DEVICE)
    t = torch.as_tensor(rng.integers(0, 400, 3)).to(DEVICE)
    loss, lse, g = run(tb, x, t, softcap=7.0)
    ref_loss, ref_lse, ref_grad = reference_rows(x, t, softcap=7.0)
    assert_close(loss, ref_loss, torch.float64, "loss")
    assert_close(g, ref_grad, torch.float64, "grad")


def test_bad_index_reads_nothing_out_of_bounds(tb, rng):
    """Indices outside [0, r) that bypass the host check (compile mode) give NaN rows, nothing else."""
    x, t, _ = make_inputs(rng, 5, R_LONG, torch.float32)
    t[1], t[3] = R_LONG + 1000, -7
    loss, lse, g = run(tb, x, t)
    ref_loss, _, ref_grad = reference_rows(x, t.clamp(0, R_LONG - 1))
    good = torch.tensor([0, 2, 4])
    assert loss[[1, 3]].isnan().all() and g[[1, 3]].isnan().all()
    assert_close(loss[good], ref_loss[good], torch.float32, "loss of good rows")
    assert_close(g[good], ref_grad[good], torch.float32, "grad of good rows")


def test_empty_batch(tb):
    x = torch.empty(0, 10, device=DEVICE)
    loss, lse, g = run(tb, x, torch.empty(0, dtype=torch.int64, device=DEVICE))
    assert loss.shape == lse.shape == (0,) and g.shape == (0, 10)


# --------------------------------------------------------------------------- softmax and BCE


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("r", [5, R_LONG])
def test_softmax_rows(tb, rng, r, log, dtype):
    big = torch.as_tensor(rng.standard_normal((7, r + 3)) * 4).to(dtype).to(DEVICE)
    x = big[:, 1 : r + 1]  # row stride != r
    out = tb.softmax(x, log=log)
    assert out.dtype == ACC[dtype]
    ref = (torch.log_softmax if log else torch.softmax)(x.cpu().double(), -1)
    assert_close(out, ref, dtype, "softmax")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_bce_elementwise(tb, rng, dtype):
    shape = (5, 301)
    p = torch.as_tensor(rng.random(shape)).to(dtype)
    p[0, :3] = torch.tensor([0.0, 1.0, 1e-30]).to(dtype)
    y = torch.as_tensor(rng.random(shape)).to(ACC[dtype])
    w = torch.as_tensor(rng.random(shape) + 0.1).to(ACC[dtype])
    g = torch.full(shape, float("nan"), dtype=ACC[dtype], device=DEVICE)
    loss = tb.binary_cross_entropy(p.to(DEVICE), y.to(DEVICE), w.to(DEVICE), grad=g)
    p64 = p.double().requires_grad_()
    ref = F.binary_cross_entropy(p64, y.double(), w.double(), reduction="none")
    ref.sum().backward()
    assert_close(loss.reshape(shape), ref, dtype, "loss")
    finite = torch.isfinite(p64.grad) & (p64 > 0) & (p64 < 1)
    assert_close(g.cpu()[finite], p64.grad[finite], dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pos_weight", [False, True])
def test_bce_with_logits_elementwise(tb, rng, dtype, pos_weight):
    shape = (6, 257)
    x = torch.as_tensor(rng.standard_normal(shape) * 5).to(dtype)
    x[0, :4] = torch.tensor([-80.0, 80.0, -1e-4, 30.0]).to(dtype)
    y = torch.as_tensor(rng.random(shape)).to(ACC[dtype])
    w = torch.as_tensor(rng.random(shape) + 0.1).to(ACC[dtype])
    pw = torch.as_tensor(rng.random(shape[-1]) * 3).to(ACC[dtype]).expand(shape) if pos_weight else None
    g = torch.full(shape, float("nan"), dtype=ACC[dtype], device=DEVICE)
    loss = tb.binary_cross_entropy_with_logits(
        x.to(DEVICE), y.to(DEVICE), w.to(DEVICE), None if pw is None else pw.to(DEVICE), grad=g
    )
    x64 = x.double().requires_grad_()
    ref = F.binary_cross_entropy_with_logits(
        x64, y.double(), w.double(), reduction="none", pos_weight=None if pw is None else pw[0].double()
    )
    ref.sum().backward()
    assert_close(loss.reshape(shape), ref, dtype, "loss")
    assert_close(g, x64.grad, dtype, "grad")


# --------------------------------------------------------------------------- odd row lengths (peeled rows)
# A row length the JIT cannot see 16-byte aligned (odd r: GPT-2's 50257) is peeled: a masked edge chunk
# (the head before the row's first 16-byte-aligned element, the tail after its last whole 16 bytes) and
# an aligned body in BLOCK chunks. Shapes: r = 2 and 5 (several rows per program, heads longer than the
# row), 37 (one chunk, r < BLOCK), 1001 (many chunks); the references are the torch backend in float64.
ODD_R = [(4, 2), (5, 5), (3, 37), (3, 1001)]
ODD_IDS = [f"{n}x{r}" for n, r in ODD_R]


def torch_ops():
    return backends.get("torch")


def wide(t):
    """A float64 CPU copy (of the rounded half values, for half tensors); other tensors as they are."""
    return t.detach().cpu().double() if t is not None and t.is_floating_point() else t if t is None else t.cpu()


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def test_odd_rows_are_peeled(tb):
    """The peel is on for odd r on an aligned base, off where the JIT already sees aligned rows and where
    the base itself is off 16 bytes (nothing to align to)."""
    for dtype in DTYPES:
        vec = 16 // torch.empty((), dtype=dtype).element_size()
        for n, r in ODD_R:
            assert tb._peel(torch.zeros(n, r, dtype=dtype, device=DEVICE), r) == vec
        assert tb._peel(torch.zeros(3, 64, dtype=dtype, device=DEVICE), 64) == 0
        assert tb._peel(torch.zeros(3 * 37 + 1, dtype=dtype, device=DEVICE)[1:].view(3, 37), 37) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("prob", [False, True], ids=["index", "prob"])
@pytest.mark.parametrize("spec", ["plain", "all"])
@pytest.mark.parametrize("n, r", ODD_R, ids=ODD_IDS)
def test_odd_rows_match_reference(tb, rng, n, r, spec, prob, dtype):
    """Every keyword on peeled rows, with a per-row grad_scale and the row statistics."""
    opts = dict(KEYWORDS[spec])
    weighted, ignore = opts.pop("weighted", False), opts.pop("ignore", False) and not prob
    x, t, w = make_inputs(rng, n, r, dtype, prob, weighted, ignore)
    assert tb._peel(x, r)
    scale = torch.as_tensor(rng.random(n) + 0.5, dtype=ACC[dtype]).to(DEVICE)
    stats = (torch.full((n,), -7, dtype=torch.int64, device=DEVICE), poisoned((n,), ACC[dtype]))
    g = poisoned((n, r), dtype)
    kw = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None, **opts}
    loss, lse = tb.cross_entropy(x, t, w, grad_scale=scale, grad=g, stats=stats, **kw)
    ref_stats = (torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float64))
    ref_g = torch.empty(n, r, dtype=torch.float64)
    ref_loss, ref_lse = torch_ops().cross_entropy(
        wide(x), wide(t), wide(w), grad_scale=wide(scale), grad=ref_g, stats=ref_stats, **kw
    )
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(g, ref_g, dtype, "grad")
    kept = ref_lse != 0 if not prob else torch.ones(n, dtype=torch.bool)
    assert torch.equal(stats[0].cpu()[kept], ref_stats[0][kept]), "argmax"
    assert_close(stats[1].cpu()[kept], ref_stats[1][kept], dtype, "entropy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_odd_rows_argmax_first_of_ties_in_head_body_and_tail(tb, dtype):
    """The edge chunk (head and tail) runs before the body: ties between a tail, a body and a head
    column still give the first index, as torch.argmax."""
    n, r = 4, 1001
    x = torch.zeros(n, r, dtype=dtype, device=DEVICE)
    x[0, [1, 500, r - 1]] = 3.0  # head (row 0 starts aligned: no head; column 1 is in the body), body, tail
    x[1, [2, 700, r - 2]] = 3.0
    x[2, [r - 1, 600]] = 3.0
    x[3, [r - 1]] = 3.0
    t = torch.zeros(n, dtype=torch.int64, device=DEVICE)
    stats = (torch.full((n,), -7, dtype=torch.int64, device=DEVICE), poisoned((n,), ACC[dtype]))
    tb.cross_entropy(
        x, t, None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None, grad=None,
        stats=stats,
    )  # fmt: skip
    assert stats[0].cpu().tolist() == [1, 2, 600, r - 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n, r", ODD_R, ids=ODD_IDS)
def test_odd_rows_inplace_and_shifted_gradient(tb, rng, n, r, dtype):
    """In place (the gradient is the logits) and into a buffer whose rows lie differently from the
    logits' (another row stride: its accesses cannot share the logits' alignment); the padding stays."""
    x, t, w = make_inputs(rng, n, r, dtype, weighted=True, ignore=True)
    kw = {"ignore_index": -100, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0}
    ref_g = torch.empty(n, r, dtype=torch.float64)
    ref_loss, _ = torch_ops().cross_entropy(wide(x), wide(t), wide(w), grad_scale=0.5, grad=ref_g, **kw)
    gbig = poisoned((n, r + 3), dtype)
    g = gbig[:, :r]
    loss, _ = tb.cross_entropy(x.clone(), t, w, grad_scale=0.5, grad=g, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(g, ref_g, dtype, "shifted grad")
    assert gbig[:, r:].isnan().all()
    loss, _ = tb.cross_entropy(x, t, w, grad_scale=0.5, grad=x, **kw)
    assert_close(loss, ref_loss, dtype, "loss in place")
    assert_close(x, ref_g, dtype, "in-place grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("n, r", ODD_R, ids=ODD_IDS)
def test_odd_rows_softmax(tb, rng, n, r, log, dtype):
    x = torch.as_tensor(rng.standard_normal((n, r)) * 4).to(dtype).to(DEVICE)
    assert tb._peel(x, r)
    out = tb.softmax(x, log=log)
    assert_close(out, torch_ops().softmax(wide(x), log=log), dtype, "softmax")


PARTIALS_SPECS = {
    "plain": {},
    "all": {"weight": True, "smoothing": True, "softcap": 4.0},
    "prob all": {"prob": True, "weight": True, "smoothing": True, "softcap": 4.0},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("spec", list(PARTIALS_SPECS))
@pytest.mark.parametrize("n, r", ODD_R, ids=ODD_IDS)
def test_odd_rows_vocab_parallel_kernels(tb, rng, n, r, spec, dtype):
    """row_partials and cross_entropy_backward on a peeled slice of the classes (class_offset: some
    targets fall outside it), per-row scales and the entropy's gradient."""
    opts = PARTIALS_SPECS[spec]
    prob = opts.get("prob", False)
    x, t, w = make_inputs(rng, n, r, dtype, prob, opts.get("weight", False), ignore=not prob)
    offset = 0 if prob else 3
    if not prob:
        t = torch.where(t >= 0, t + offset - 1, t)  # column offset - 1 lies before this slice
    kw = {"ignore_index": -100, "softcap": opts.get("softcap"), "class_offset": offset}
    out = poisoned((n, 5), ACC[dtype])
    tb.row_partials(x, t, w, smoothing=opts.get("smoothing", False), out=out, **kw)
    ref = torch.empty(n, 5, dtype=torch.float64)
    torch_ops().row_partials(wide(x), wide(t), wide(w), smoothing=opts.get("smoothing", False), out=ref, **kw)
    assert_close(out, ref, dtype, "partials", scale=10 if dtype == torch.bfloat16 else 1)

    lse = torch.as_tensor(rng.random(n) + np.log(r), dtype=ACC[dtype]).to(DEVICE)
    coef = torch.as_tensor(rng.random(n) + 0.5, dtype=ACC[dtype]).to(DEVICE)
    entropy = torch.as_tensor(rng.random(n), dtype=ACC[dtype]).to(DEVICE)
    scale = torch.as_tensor(rng.random(n) + 0.5, dtype=ACC[dtype]).to(DEVICE)
    eps = 0.1 if opts.get("smoothing") else 0.0
    bkw = dict(kw, label_smoothing=eps, n_classes=r + 7, grad_scale=scale, entropy_scale=scale)
    g = poisoned((n, r), dtype)
    tb.cross_entropy_backward(x, t, w, lse, coef, entropy, grad=g, **bkw)
    ref_g = torch.empty(n, r, dtype=torch.float64)
    bkw_ref = dict(bkw, grad_scale=wide(scale), entropy_scale=wide(scale))
    torch_ops().cross_entropy_backward(
        wide(x), wide(t), wide(w), wide(lse), wide(coef), wide(entropy), grad=ref_g, **bkw_ref
    )
    assert_close(g, ref_g, dtype, "vocab-parallel grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("n, r", ODD_R, ids=ODD_IDS)
def test_odd_rows_distillation(tb, rng, n, r, divergence, dtype):
    s = torch.as_tensor(rng.standard_normal((n, r)) * 3).to(dtype).to(DEVICE)
    te = torch.as_tensor(rng.standard_normal((n, r)) * 3).to(dtype).to(DEVICE)
    target = torch.as_tensor(rng.integers(0, r, n)).to(DEVICE)
    target[min(1, n - 1)] = -100
    scale = torch.as_tensor(rng.random(n) + 0.5, dtype=ACC[dtype]).to(DEVICE)
    kw = {"divergence": divergence, "beta": 0.3, "temperature": 1.5, "ignore_index": -100}
    g = poisoned((n, r), dtype)
    loss = tb.distillation(s, te, target, grad_scale=scale, grad=g, **kw)
    ref_g = torch.empty(n, r, dtype=torch.float64)
    ref_loss = torch_ops().distillation(wide(s), wide(te), target.cpu(), grad_scale=wide(scale), grad=ref_g, **kw)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(g, ref_g, dtype, "grad")
    forward = tb.distillation(s, te, target, grad_scale=None, grad=None, **kw)
    assert_close(forward, ref_loss, dtype, "forward-only loss")


# --------------------------------------------------------------------------- torch.compile and large inputs


class TinyModel(torch.nn.Module):
    def __init__(self, d, r):
        super().__init__()
        self.proj = torch.nn.Linear(d, r)

    def forward(self, h, target):
        return gx.cross_entropy(self.proj(h), target, label_smoothing=0.1, z_loss=1e-4, backend="triton")


def _compiled_step(compile_backend):
    torch._dynamo.reset()
    model = TinyModel(16, 300).to(DEVICE)
    h = torch.randn(8, 16, device=DEVICE)
    target = torch.randint(0, 300, (8,), device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    loss = compiled(h, target)  # fullgraph=True raises on any graph break
    loss.backward()
    ref = F.cross_entropy(model.proj(h), target, label_smoothing=0.1)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-3)
    assert model.proj.weight.grad is not None and torch.isfinite(model.proj.weight.grad).all()


def test_torch_compile_fullgraph_traces_without_break():
    """Dynamo traces gx.cross_entropy in one graph (the "eager" compiler runs it, so the interpreter works)."""
    _compiled_step("eager")


@pytest.mark.skipif(not HAS_CUDA, reason="inductor-compiled Triton needs a CUDA GPU")
def test_torch_compile_fullgraph_inductor():
    _compiled_step("inductor")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU with ~10 GB free")
def test_more_than_2_31_elements(tb):
    """N * r > 2^31: the last rows sit beyond any 32-bit offset."""
    n, r = 16_390, 131_072
    assert (n - 1) * r > 2**31
    x = torch.randn(n, r, device=DEVICE, dtype=torch.bfloat16)
    t = torch.randint(0, r, (n,), device=DEVICE)
    g = torch.full_like(x, float("nan"))
    loss, lse = tb.cross_entropy(
        x, t, None, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, softcap=None, grad_scale=None, grad=g
    )
    for rows in (slice(0, 2), slice(n - 3, n)):
        ref_loss, ref_lse, ref_grad = reference_rows(x[rows], t[rows])
        assert_close(loss[rows], ref_loss, torch.bfloat16, "loss")
        assert_close(lse[rows], ref_lse, torch.bfloat16, "lse")
        assert_close(g[rows], ref_grad, torch.bfloat16, "grad")
    assert not g.isnan().any()


# Every kernel variant compiled for sm_90 by the real compiler and ptxas, as the JIT would on aligned
# inputs (registers, spills, vector widths, occupancy): tests/test_gpu_audit.py.
