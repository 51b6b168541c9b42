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
