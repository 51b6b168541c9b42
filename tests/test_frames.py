"""Issue #22: an eager call reaches its backend in at most 4 Python frames: the public function, the
autograd Function's body, the registered op's body, the backend's door.

Each function of the numba_cpu door is replaced by a wrapper that counts the frames between it and the
public call (the wrapper standing for the backend's frame), with and without ``requires_grad``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

import gpuxent as gx
from gpuxent import backends

MAX_FRAMES = 4
DOOR = ("cross_entropy", "cross_entropy_backward", "row_partials", "softmax", "binary_cross_entropy",
        "binary_cross_entropy_with_logits", "distillation")  # fmt: skip


def _call(fn, *args):
    """``fn(*args)``, ``fn`` a lambda that calls one public function: the frame the count stops at."""
    return fn(*args)


@pytest.fixture
def depths(monkeypatch):
    """``{backend function: [frames of each call]}`` filled while the test runs."""
    module = backends.module(backends.select(torch.device("cpu"), "numba_cpu"))
    seen: dict[str, list[int]] = {}
    stop = _call.__code__

    def wrap(name, fn):
        def backend_entry(*args, **kw):
            n, f = 1, sys._getframe(1)  # 1: this frame, in place of the backend's
            while f is not None and f.f_code is not stop:
                n, f = n + 1, f.f_back
            assert f is not None, "the backend was not reached from _call"
            seen.setdefault(name, []).append(n - 1)  # less the lambda that binds the arguments
            return fn(*args, **kw)

        return backend_entry

    for name in DOOR:
        monkeypatch.setattr(module, name, wrap(name, getattr(module, name)))
    return seen


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 5, generator=g)
    return {
        "x": x,
        "t": torch.randint(0, 5, (8,), generator=g),
        "p": torch.rand(8, 5, generator=g),
        "y": torch.rand(8, 5, generator=g),
        "h": torch.randn(8, 4, generator=g),
        "w": torch.randn(5, 4, generator=g),
        "q": torch.softmax(torch.randn(8, 5, generator=g), -1),
    }


def _rg(t, grad):
    return t.clone().requires_grad_(grad)


CASES = {
    "cross_entropy": lambda a, g: gx.cross_entropy(_rg(a["x"], g), a["t"]),
    "cross_entropy(sum, probs)": lambda a, g: gx.cross_entropy(_rg(a["x"], g), a["q"], reduction="sum"),
    "cross_entropy(inplace)": lambda a, g: gx.cross_entropy(_rg(a["x"], g) * 1, a["t"], inplace_grad=True),
    "cross_entropy_and_grad": lambda a, g: gx.cross_entropy_and_grad(_rg(a["x"], g), a["t"]),
    "cross_entropy_with_stats": lambda a, g: gx.cross_entropy_with_stats(_rg(a["x"], g), a["t"]),
    "cross_entropy_with_stats(inplace)": lambda a, g: gx.cross_entropy_with_stats(
        _rg(a["x"], g) * 1, a["t"], inplace_grad=True
    ),
    "cross_entropy_with_stats(entropy)": lambda a, g: gx.cross_entropy_with_stats(_rg(a["x"], g), a["t"], entropy=True),
    "binary_cross_entropy": lambda a, g: gx.binary_cross_entropy(_rg(a["p"], g), a["y"]),
    "binary_cross_entropy_with_logits": lambda a, g: gx.binary_cross_entropy_with_logits(_rg(a["x"], g), a["y"]),
    "softmax": lambda a, g: gx.softmax(_rg(a["x"], g)),
    "log_softmax": lambda a, g: gx.log_softmax(_rg(a["x"], g), axis=0),
    "distillation_loss": lambda a, g: gx.distillation_loss(_rg(a["x"], g), a["p"]),
    "distillation_loss(target)": lambda a, g: gx.distillation_loss(_rg(a["x"], g), a["p"], target=a["t"]),
    "linear_cross_entropy": lambda a, g: gx.linear_cross_entropy(_rg(a["h"], g), a["w"], a["t"], chunk_size=3),
    "linear_cross_entropy(none)": lambda a, g: gx.linear_cross_entropy(
        _rg(a["h"], g), a["w"], a["t"], reduction="none", chunk_size=3
    ),
    "linear_cross_entropy_with_stats": lambda a, g: gx.linear_cross_entropy_with_stats(
        _rg(a["h"], g), a["w"], a["t"], chunk_size=3
    ),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "requires_grad"])
@pytest.mark.parametrize("case", list(CASES))
def test_eager_call_reaches_backend_in_four_frames(case, grad, depths):
    a = _inputs()
    _call(CASES[case], a, grad)
    assert depths, f"{case}: no numba_cpu function was called"
    worst = max(max(v) for v in depths.values())
    assert worst <= MAX_FRAMES, f"{case}: {worst} frames from the public call to the backend: {depths}"


def test_count_can_fail(depths):
    """The count sees a frame added between the public call and the backend."""

    def extra(x, t):
        return gx.cross_entropy(x, t)

    a = _inputs()
    _call(lambda x, t: extra(x, t), a["x"], a["t"])
    assert max(depths["cross_entropy"]) == MAX_FRAMES + 1


def test_numpy_call_reaches_backend_in_four_frames(depths):
    a = _inputs()
    _call(lambda x, t: gx.cross_entropy(x, t), a["x"].numpy(), a["t"].numpy())
    _call(lambda x: gx.softmax(x), np.asarray(a["x"]))
    assert max(max(v) for v in depths.values()) <= MAX_FRAMES
