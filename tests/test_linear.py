"""linear_cross_entropy against cross_entropy(F.linear(...)) and PyTorch in float64, on every backend."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import KEYWORDS as CE_KEYWORDS
from reference import PROB_KEYWORDS, assert_close, reference_cross_entropy, torch_cross_entropy

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
    # given the hidden size: at most max(256, d / 2) rows, a chunk within about half the weight's gradient
    assert default_chunk_size(65536, torch.float32, 1024) == 512
    assert default_chunk_size(65536, torch.bfloat16, 1024) == 512
    assert default_chunk_size(32768, torch.float32, 512) == 256
    assert default_chunk_size(32768, torch.float32, 64) == 256
    assert default_chunk_size(128256, torch.bfloat16, 4096) == 523  # the 128 MiB bound
    assert default_chunk_size(10**9, torch.float32, 64) == 1


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


# --------------------------------------------------------------------------- temperature and accum_dtype (issue 25)


def temperatures(kind, backend, rng, batch):
    if kind == "one":
        return 0.65
    return backend.tensor(rng.random(batch) * 1.5 + 0.4, dtype=torch.float64)  # one per row


def scaled_logits(hidden, lin_w, bias, softcap, temperature):
    """``softcap(x) / T`` in float64 torch ops, differentiable."""
    x = F.linear(hidden, lin_w, bias)
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    if isinstance(temperature, torch.Tensor):
        return x / temperature.double().cpu()[..., None]
    return x / temperature


def leaves64(*xs):
    return [None if x is None else x.detach().cpu().double().requires_grad_() for x in xs]


TEMP_KEYWORDS = {"plain": {}, "all": CE_KEYWORDS["all"]}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("spec", list(TEMP_KEYWORDS))
@pytest.mark.parametrize("temp", ["one", "rows"])
def test_temperature(backend, rng, temp, spec, reduction):
    """The logits enter as softcap(x) / T (one T, or one per row): loss and gradients against float64 torch."""
    opts = TEMP_KEYWORDS[spec]
    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, ce_weight = make_inputs(backend, rng, batch, d, r, **opts)
    T = temperatures(temp, backend, rng, batch)
    kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts}
    loss = linear_cross_entropy(hidden, lin_w, target, bias, reduction=reduction, ce_weight=ce_weight,
                                backend=backend.name, chunk_size=chunk, temperature=T, **kw)  # fmt: skip
    h64, w64, b64 = leaves64(hidden, lin_w, bias)
    y = scaled_logits(h64, w64, b64, kw.get("softcap"), T).reshape(-1, r)
    ref = torch_cross_entropy(
        y, target.cpu().reshape(-1), None if ce_weight is None else ce_weight.cpu().double(), reduction=reduction,
        label_smoothing=kw.get("label_smoothing", 0.0), z_loss=kw.get("z_loss", 0.0),
    )  # fmt: skip
    ref = ref.reshape(batch) if reduction == "none" else ref
    assert_close(loss, ref, torch.float64, "loss", scale=10)
    go = torch.as_tensor(rng.random(loss.shape) * 2 + 0.25, dtype=torch.float64)
    grads = torch.autograd.grad(loss, inputs_of(hidden, lin_w, bias), go.to(loss.device))
    ref_grads = torch.autograd.grad(ref, inputs_of(h64, w64, b64), go)
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float64, f"grad {name}", scale=10)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_temperature_statistics(backend, rng, reduction):
    """with_stats at per-row temperatures: the loss, z-loss, accuracy and (differentiable) entropy are all
    of the scaled logits."""
    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, _ = make_inputs(backend, rng, batch, d, r, ignore=True)
    T = temperatures("rows", backend, rng, batch)
    kw = dict(z_loss=1e-2, softcap=5.0)
    res = gx.linear_cross_entropy_with_stats(hidden, lin_w, target, bias, reduction=reduction, entropy=True,
                                             temperature=T, chunk_size=chunk, backend=backend.name, **kw)  # fmt: skip
    h64, w64, b64 = leaves64(hidden, lin_w, bias)
    y = scaled_logits(h64, w64, b64, kw["softcap"], T).reshape(-1, r)
    t = target.cpu().reshape(-1)
    kept = t != -100
    lse = torch.logsumexp(y, -1)
    rows = {
        "loss": torch_cross_entropy(y, t, reduction="none", z_loss=kw["z_loss"]),
        "z_loss": torch.where(kept, kw["z_loss"] * lse**2, 0),
        "accuracy": torch.where(kept, (y.argmax(-1) == t).double(), 0),
        "entropy": torch.where(kept, -(y.softmax(-1) * y.log_softmax(-1)).sum(-1), 0),
    }

    def reduce(v):
        return v.reshape(batch) if reduction == "none" else v.sum() / kept.sum()

    for name, v in rows.items():
        assert_close(getattr(res, name), reduce(v), torch.float64, name, scale=10)
    go = torch.as_tensor(rng.random(res.loss.shape) + 0.5)
    ge = torch.as_tensor(rng.standard_normal(res.loss.shape))
    dev = hidden.device
    grads = torch.autograd.grad((res.loss * go.to(dev) + res.entropy * ge.to(dev)).sum(), (hidden, lin_w, bias))
    ref_grads = torch.autograd.grad((reduce(rows["loss"]) * go + reduce(rows["entropy"]) * ge).sum(), (h64, w64, b64))
    for name, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads, strict=True):
        assert_close(g, rg, torch.float64, f"grad {name}", scale=10)


@pytest.mark.parametrize("temp", ["one", "rows"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_temperature_half(backend, rng, dtype, temp):
    """Half inputs at a temperature (with a softcap): no further from float64 than PyTorch's own half
    computation (half matmul, then float32)."""
    from test_post_training import assert_no_worse_than_torch

    batch, d, r, chunk = sizes_for(backend)
    hidden, lin_w, bias, target, _ = make_inputs(backend, rng, batch, d, r, dtype=dtype, ignore=True)
    T = temperatures(temp, backend, rng, batch)
    kw = dict(softcap=6.0, label_smoothing=0.1)
    loss = linear_cross_entropy(hidden, lin_w, target, bias, temperature=T, chunk_size=chunk, backend=backend.name,
                                **kw)  # fmt: skip
    assert loss.dtype == torch.float32
    own = [x.detach().clone().requires_grad_() for x in (hidden, lin_w, bias)]
    h64, w64, b64 = leaves64(hidden, lin_w, bias)

    def torch_loss(h, w, b, dt):
        x = F.linear(h, w, b).to(dt)
        y = 6.0 * torch.tanh(x / 6.0)
        y = y / (T.to(dt).cpu()[..., None] if isinstance(T, torch.Tensor) else T)
        return F.cross_entropy(y.reshape(-1, r), target.cpu().reshape(-1), label_smoothing=0.1)

    ref, own_loss = torch_loss(h64, w64, b64, torch.float64), torch_loss(*own, torch.float32)
    assert_close(loss, ref, dtype, "loss", scale=4)
    grads = torch.autograd.grad(loss * 3, inputs_of(hidden, lin_w, bias))
    ref_grads = torch.autograd.grad(ref * 3, (h64, w64, b64))
    own_grads = torch.autograd.grad(own_loss * 3, own)
    for name, g, rg, og in zip(("hidden", "weight", "bias"), grads, ref_grads, own_grads, strict=True):
        assert g.dtype == dtype
        assert_no_worse_than_torch(g, og, rg, dtype, f"grad {name}")


def test_temperature_one_is_exactly_the_default(rng):
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), rng, (9,), 6, 11, dtype=torch.float32)
    a = linear_cross_entropy(hidden, lin_w, target, bias, chunk_size=4)
    b = linear_cross_entropy(hidden, lin_w, target, bias, chunk_size=4, temperature=1.0)
    assert torch.equal(a, b)
    for x, y in zip(torch.autograd.grad(a, (hidden, lin_w)), torch.autograd.grad(b, (hidden, lin_w)), strict=True):
        assert torch.equal(x, y)


def test_temperature_numpy_and_no_grad(rng):
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), rng, (9,), 6, 11)
    T = rng.random(9) + 0.5
    with torch.no_grad():
        ref = F.cross_entropy(F.linear(hidden, lin_w, bias) / torch.as_tensor(T)[:, None], target, reduction="none")
    out = linear_cross_entropy(*(x.detach().numpy() for x in (hidden, lin_w, target, bias)), reduction="none",
                               temperature=T)  # fmt: skip
    assert isinstance(out, np.ndarray)
    assert_close(out, ref, torch.float64, "numpy, per-row temperatures")
    with torch.no_grad():
        out = linear_cross_entropy(hidden, lin_w, target, bias, reduction="none", temperature=torch.as_tensor(T))
    assert_close(out, ref, torch.float64, "no_grad")


def _weight_grad_error(accum_dtype, n_chunks, seed=0, n=2048, d=16, r=64):
    """The bf16 weight gradient's largest error against float64, relative to the largest element."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).bfloat16()
    w = (torch.randn(r, d, generator=g, dtype=torch.float64) / d**0.5).bfloat16().requires_grad_()
    t = torch.randint(0, r, (n,), generator=g)
    loss = linear_cross_entropy(h, w, t, reduction="sum", chunk_size=n // n_chunks, accum_dtype=accum_dtype)
    (gw,) = torch.autograd.grad(loss, w)
    w64 = w.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(F.cross_entropy(F.linear(h.double(), w64), t, reduction="sum"), w64)
    return gw, float((gw.double() - ref).abs().max() / ref.abs().max())


def test_accum_dtype():
    """float32 accumulation across chunks by default for half inputs: the bf16 weight gradient over 256
    chunks is within a few roundings of float64; accumulated in bf16 (accum_dtype=torch.bfloat16) its
    error grows with the chunks."""
    gw, err_default = _weight_grad_error(None, 256)
    gw_bf16, err_bf16 = _weight_grad_error(torch.bfloat16, 256)
    _, err_one_chunk = _weight_grad_error(None, 1)
    assert gw.dtype == gw_bf16.dtype == torch.bfloat16
    assert err_default < 2**-7, err_default  # a couple of bf16 roundings (2**-9 each)
    assert err_default <= 2 * err_one_chunk + 2**-9, (err_default, err_one_chunk)
    assert err_bf16 > 2 * err_default, (err_bf16, err_default)
    # float64 accumulation of float32 inputs, and every reduction's path
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), np.random.default_rng(0), (13,), 6, 11, dtype=torch.float32)
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(hidden, lin_w, target, bias, reduction=reduction, chunk_size=3,
                                    accum_dtype=torch.float64)  # fmt: skip
        grads = torch.autograd.grad(loss.sum(), (hidden, lin_w, bias))
        ref = torch.autograd.grad(F.cross_entropy(F.linear(hidden, lin_w, bias), target, reduction=reduction).sum(),
                                  (hidden, lin_w, bias))  # fmt: skip
        for g, rg in zip(grads, ref, strict=True):
            assert g.dtype == torch.float32
            assert_close(g, rg, torch.float32, f"accum float64 {reduction}", scale=10)


def test_temperature_and_accum_dtype_bad_input(rng):
    hidden, lin_w, bias, target, _ = make_inputs(gx_cpu(), rng, (4,), 6, 9)
    keep = [x.detach().clone() for x in (hidden, lin_w, bias)]
    cases = [
        (ValueError, dict(temperature=0.0)),
        (ValueError, dict(temperature=-0.5)),
        (ValueError, dict(temperature=float("inf"))),
        (ValueError, dict(temperature=float("nan"))),
        (ValueError, dict(temperature=torch.tensor([1.0, 0.5, -1.0, 2.0]))),
        (ValueError, dict(temperature=torch.tensor([1.0, 0.5, float("nan"), 2.0]))),
        (ValueError, dict(temperature=torch.ones(5))),
        (ValueError, dict(temperature=torch.ones(2, 2))),
        (TypeError, dict(temperature=True)),
        (TypeError, dict(temperature=None)),
        (TypeError, dict(temperature=torch.ones(4, dtype=torch.bool))),
        (TypeError, dict(accum_dtype="float32")),
        (TypeError, dict(accum_dtype=torch.int64)),
    ]
    for exc, bad in cases:
        name = next(iter(bad))
        for fn in (linear_cross_entropy, gx.linear_cross_entropy_with_stats):
            with pytest.raises(exc, match=name):
                fn(hidden, lin_w, target, bias, **bad)
    for x, k in zip((hidden, lin_w, bias), keep, strict=True):
        assert torch.equal(x.detach(), k)


def test_half_weight_gradient_accumulated_block_by_block(monkeypatch):
    """Half chunks go into the float32 accumulator a block of classes at a time (the temporary is a block
    of the gradient): any block size gives the same gradient."""
    from gpuxent import linear

    g = torch.Generator().manual_seed(1)
    h = torch.randn(40, 16, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(37, 16, generator=g) / 4).bfloat16().requires_grad_()
    b = torch.randn(37, generator=g).bfloat16().requires_grad_()
    t = torch.randint(0, 37, (40,), generator=g)
    whole = torch.autograd.grad(linear_cross_entropy(h, w, t, b, chunk_size=7), (w, b))
    monkeypatch.setattr(linear, "ACC_BLOCK_BYTES", 5 * 16 * 2)  # blocks of 5 classes, a short last one
    blocks = torch.autograd.grad(linear_cross_entropy(h, w, t, b, chunk_size=7), (w, b))
    for x, y in zip(whole, blocks, strict=True):
        torch.testing.assert_close(x.float(), y.float(), rtol=0, atol=0)
