"""Bad input: a clear ValueError/TypeError naming the argument, raised before any kernel runs,
with the inputs left unchanged; and the backend selection rule."""

import os

import numpy as np
import pytest
import torch

import gpuxent as gx
from gpuxent import backends


@pytest.fixture
def no_kernels(backend, monkeypatch):
    """Make every kernel entry point of the backend fail loudly: errors must come before them."""
    module = backends.get(backend.name)
    for name in ("cross_entropy", "softmax", "binary_cross_entropy", "binary_cross_entropy_with_logits"):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("a kernel ran on bad input"))
    return backend


def _inputs(backend, rng, n=4, r=5):
    x = backend.tensor(rng.standard_normal((n, r)), dtype=torch.float32)
    t = backend.tensor(rng.integers(0, r, n), dtype=torch.int64)
    return x, t


CE_CASES = [
    # (description, builder(x, t) -> (args, kwargs), error type, argument named in the message)
    ("target shape", lambda x, t: ((x, t[:-1]), {}), ValueError, "target"),
    ("index out of range", lambda x, t: ((x, torch.where(t == t[0], 5, t)), {}), ValueError, "target"),
    ("negative index", lambda x, t: ((x, torch.where(t == t[0], -1, t)), {}), ValueError, "target"),
    ("float target where indices expected", lambda x, t: ((x, t.float()), {}), TypeError, "target"),
    (
        "int target of logits' shape",
        lambda x, t: ((x, torch.zeros_like(x, dtype=torch.int64)), {}),
        TypeError,
        "target",
    ),
    (
        "prob target wrong shape",
        lambda x, t: ((x, torch.zeros(x.shape[0], 3, device=x.device)), {}),
        ValueError,
        "target",
    ),
    ("unknown reduction", lambda x, t: ((x, t), {"reduction": "avg"}), ValueError, "reduction"),
    ("smoothing < 0", lambda x, t: ((x, t), {"label_smoothing": -0.1}), ValueError, "label_smoothing"),
    ("smoothing > 1", lambda x, t: ((x, t), {"label_smoothing": 1.5}), ValueError, "label_smoothing"),
    ("weight length", lambda x, t: ((x, t, torch.ones(3, device=x.device)), {}), ValueError, "weight"),
    ("softcap 0", lambda x, t: ((x, t), {"softcap": 0.0}), ValueError, "softcap"),
    ("softcap < 0", lambda x, t: ((x, t), {"softcap": -1.0}), ValueError, "softcap"),
    ("z_loss < 0", lambda x, t: ((x, t), {"z_loss": -1.0}), ValueError, "z_loss"),
    ("integer logits", lambda x, t: ((t[:, None].repeat(1, 3), t), {}), TypeError, "logits"),
    ("scalar logits", lambda x, t: ((x[0, 0], t), {}), ValueError, "logits"),
    ("no classes", lambda x, t: ((x[:, :0], t), {}), ValueError, "logits"),
    ("bool target", lambda x, t: ((x, t > 0), {}), TypeError, "target"),
    ("string input", lambda x, t: (("abc", t), {}), TypeError, "logits"),
]


@pytest.mark.parametrize("case", CE_CASES, ids=[c[0] for c in CE_CASES])
@pytest.mark.parametrize("fn", ["cross_entropy", "cross_entropy_and_grad"])
def test_cross_entropy_bad_input(no_kernels, rng, case, fn):
    _, build, exc, arg = case
    x, t = _inputs(no_kernels, rng)
    args, kwargs = build(x, t)
    snapshots = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    with pytest.raises(exc, match=arg):
        getattr(gx, fn)(*args, backend=no_kernels.name, **kwargs)
    for a, s in zip([a for a in args if isinstance(a, torch.Tensor)], snapshots):
        assert torch.equal(a, s)


def test_out_of_range_index_with_grad_leaves_logits_untouched(no_kernels, rng):
    x, t = _inputs(no_kernels, rng)
    t[1] = 99
    before = x.clone()
    with pytest.raises(ValueError, match="target"):
        gx.cross_entropy_and_grad(x, t, backend=no_kernels.name, inplace_grad=True)
    assert torch.equal(x, before)


def test_different_devices(rng):
    if not torch.cuda.is_available():
        pytest.skip("needs a second device type")
    x, t = torch.randn(4, 5, device="cuda"), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="target"):
        gx.cross_entropy(x, t)
    with pytest.raises(ValueError, match="weight"):
        gx.cross_entropy(x, t.cuda(), torch.ones(5))


def test_bce_bad_input(no_kernels, rng):
    name = no_kernels.name
    p = no_kernels.tensor(rng.uniform(0, 1, (4, 3)), dtype=torch.float32)
    y = torch.ones_like(p)
    for bad in (p * 2, p - 1, torch.full_like(p, float("nan"))):
        with pytest.raises(ValueError, match="probs"):
            gx.binary_cross_entropy(bad, y, backend=name)
    with pytest.raises(ValueError, match="target"):
        gx.binary_cross_entropy(p, y[:, :2], backend=name)
    with pytest.raises(ValueError, match="weight"):
        gx.binary_cross_entropy(p, y, torch.ones(2, device=p.device), backend=name)
    with pytest.raises(ValueError, match="pos_weight"):
        gx.binary_cross_entropy_with_logits(p, y, pos_weight=torch.ones(2, device=p.device), backend=name)
    with pytest.raises(ValueError, match="reduction"):
        gx.binary_cross_entropy_with_logits(p, y, reduction="avg", backend=name)


def test_softmax_bad_axis(no_kernels):
    x = torch.zeros(2, 3, device=no_kernels.device)
    with pytest.raises(ValueError, match="axis"):
        gx.softmax(x, axis=2, backend=no_kernels.name)
    with pytest.raises(TypeError, match="x"):
        gx.log_softmax(torch.zeros(2, 3, dtype=torch.int64), backend=no_kernels.name)


def test_unknown_and_unavailable_backends(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        gx.cross_entropy(np.zeros((2, 3)), np.zeros(2, dtype=np.int64), backend="cuda_magic")
    for name, (ok, _) in backends.status().items():
        if not ok:
            with pytest.raises(RuntimeError, match=name):
                gx.cross_entropy(np.zeros((2, 3)), np.zeros(2, dtype=np.int64), backend=name)


def test_selection_rule(monkeypatch):
    x, t = torch.randn(3, 4), torch.zeros(3, dtype=torch.int64)
    monkeypatch.delenv("GPUXENT_BACKEND", raising=False)
    assert backends.select(x.device) == "numba_cpu"
    monkeypatch.setenv("GPUXENT_BACKEND", "no_such_backend")
    with pytest.raises(ValueError, match="no_such_backend"):
        gx.cross_entropy(x, t)
    assert gx.cross_entropy(x, t, backend="numba_cpu").shape == ()  # the argument beats the variable
    for name in gx.available_backends():
        monkeypatch.setenv("GPUXENT_BACKEND", name)
        if backends.get(name).supports(x.device):
            torch.testing.assert_close(gx.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
    assert "numba_cpu" in gx.available_backends()
    assert os.environ.get("GPUXENT_BACKEND") is not None


# --------------------------------------------------------------------------- inputs a user passes


def test_negative_stride_and_big_endian_numpy(backend, rng):
    x = rng.standard_normal((6, 9))
    t = rng.integers(0, 9, 6)
    ref = torch.nn.functional.cross_entropy(torch.tensor(x[::-1, ::-1].copy()), torch.tensor(t[::-1].copy()))
    got = gx.cross_entropy(x[::-1, ::-1], t[::-1], backend=backend.name)
    assert isinstance(got, np.generic | np.ndarray)
    np.testing.assert_allclose(got, ref.item(), rtol=1e-12)
    big = x.astype(">f4")
    ref32 = torch.nn.functional.cross_entropy(torch.tensor(x, dtype=torch.float32), torch.tensor(t))
    np.testing.assert_allclose(gx.cross_entropy(big, t.astype(">i8"), backend=backend.name), ref32.item(), rtol=1e-5)
    p = gx.softmax(x[:, ::-1], backend=backend.name)
    np.testing.assert_allclose(p, torch.softmax(torch.tensor(x[:, ::-1].copy()), -1).numpy(), rtol=1e-12)


def test_numpy_scalars_as_keywords(backend, rng):
    x = torch.tensor(rng.standard_normal((5, 7)))
    t = torch.tensor(rng.integers(0, 7, 5))
    kw = dict(label_smoothing=np.float32(0.25), z_loss=np.float64(1e-3), softcap=np.float32(4.0))
    got = gx.cross_entropy(x, t, ignore_index=np.int64(-100), backend=backend.name, **kw)
    ref = gx.cross_entropy(x, t, label_smoothing=0.25, z_loss=1e-3, softcap=4.0, backend=backend.name)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    h = torch.tensor(rng.standard_normal((5, 3)))
    w = torch.tensor(rng.standard_normal((7, 3)))
    kw = dict(chunk_size=np.int64(2), label_smoothing=np.float64(0.1), backend=backend.name)
    lin = gx.linear_cross_entropy(h, w, t, **kw)
    torch.testing.assert_close(lin, torch.nn.functional.cross_entropy(h @ w.T, t, label_smoothing=0.1))


def test_zero_dim_pos_weight(backend, rng):
    x = torch.tensor(rng.standard_normal((4, 3)))
    y = torch.tensor(rng.random((4, 3)))
    pw = torch.tensor(2.5, dtype=torch.float64)
    got = gx.binary_cross_entropy_with_logits(x, y, pos_weight=pw, backend=backend.name)
    torch.testing.assert_close(got, torch.nn.functional.binary_cross_entropy_with_logits(x, y, pos_weight=pw))


def test_legacy_size_average_warns_like_torch(rng):
    x = torch.tensor(rng.standard_normal((4, 3)))
    t = torch.tensor(rng.integers(0, 3, 4))
    with pytest.warns(UserWarning, match="size_average"):
        loss = gx.nn.CrossEntropyLoss(size_average=False)
    assert loss.reduction == "sum"
    torch.testing.assert_close(loss(x, t), torch.nn.functional.cross_entropy(x, t, reduction="sum"))
    with pytest.warns(UserWarning):
        assert gx.nn.BCELoss(reduce=False).reduction == "none"


def test_probability_targets_refuse_ignore_index():
    x = torch.randn(3, 4)
    q = torch.softmax(torch.randn(3, 4), -1)
    with pytest.raises(ValueError, match="ignore_index"):
        gx.cross_entropy(x, q, ignore_index=3)
    with pytest.raises(ValueError, match="ignore_index"):
        gx.linear_cross_entropy(torch.randn(3, 5), torch.randn(4, 5), q, ignore_index=0)


def test_errors_name_their_argument(monkeypatch):
    x, t = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="backend"):
        gx.cross_entropy(x, t, backend=["x"])
    with pytest.raises((ValueError, TypeError), match="ignore_index"):
        gx.cross_entropy(x, t, ignore_index=2**70)
    with pytest.raises(TypeError, match="target"):
        gx.cross_entropy(x, torch.tensor([0, 1, 2], dtype=torch.uint64))
    with pytest.raises(TypeError, match="inplace_grad"):
        gx.cross_entropy_and_grad(x, t, inplace_grad="yes")
    monkeypatch.setenv("GPUXENT_BACKEND", "garbage")
    with pytest.raises(ValueError, match="GPUXENT_BACKEND"):
        gx.cross_entropy(x, t)
    with pytest.raises(ValueError, match="GPUXENT_BACKEND"):
        gx.softmax(x)
