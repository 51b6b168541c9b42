"""Float64 PyTorch references the tests compare against, and the comparison helper."""

import torch
import torch.nn.functional as F
from conftest import TOL

# Keyword sets of the cross-entropy tests: "weight" and "ignore" ask for class weights and ignored
# rows, "prob" for probability targets; the rest are the keywords themselves.
KEYWORDS = {
    "plain": {},
    "weight": {"weight": True},
    "ignore": {"ignore": True},
    "smoothing": {"label_smoothing": 0.1},
    "smoothing+weight+ignore": {"label_smoothing": 0.2, "weight": True, "ignore": True},
    "z_loss": {"z_loss": 1e-2},
    "softcap": {"softcap": 3.0},
    "all": {"label_smoothing": 0.15, "weight": True, "ignore": True, "z_loss": 1e-3, "softcap": 4.0},
}
PROB_KEYWORDS = {
    "prob": {"prob": True},
    "prob+all": {"prob": True, "label_smoothing": 0.1, "weight": True, "z_loss": 1e-2, "softcap": 3.0},
}


def torch_cross_entropy(
    x, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None
):  # fmt: skip
    """The contract in torch ops, differentiable to any order: ``F.cross_entropy`` of the (soft-capped)
    (N, r) logits plus ``z_loss * lse**2`` for each kept row, reduced like the cross-entropy (a weighted
    mean divides by the summed weight of the kept rows, probability targets by the number of rows)."""
    y = softcap * torch.tanh(x / softcap) if softcap else x
    prob = target.is_floating_point()
    loss = F.cross_entropy(
        y, target, weight=weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if not z_loss:
        return loss
    kept = torch.ones(y.shape[0], dtype=y.dtype) if prob else (target != ignore_index).to(y.dtype)
    z = torch.where(kept > 0, z_loss * torch.logsumexp(y, -1) ** 2, 0.0)  # 0, not inf * 0, for ignored rows
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss + z.sum()
    if prob:
        return loss + z.sum() / y.shape[0]
    tw = (kept if weight is None else weight[target.clamp(0, y.shape[1] - 1)] * kept).sum()
    # no kept row: the loss is already NaN and the gradient 0, as in torch (z is 0 then)
    return loss + z.sum() / torch.where(tw > 0, tw, 1)


def reference_cross_entropy(
    logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0, softcap=None,
    grad_output=None,
):  # fmt: skip
    """``(loss, grad)`` of :func:`torch_cross_entropy` in float64 on the CPU for ``(..., r)`` logits;
    ``grad`` is d(loss * grad_output)/d logits."""
    x = logits.detach().cpu().double().requires_grad_()
    r = x.shape[-1]
    prob = target.is_floating_point()
    t = target.detach().cpu()
    t2 = t.reshape(-1, r).double() if prob else t.reshape(-1).long()
    w = None if weight is None else weight.detach().cpu().double()
    loss = torch_cross_entropy(x.reshape(-1, r), t2, w, ignore_index, reduction, label_smoothing, z_loss, softcap)
    if reduction == "none":
        loss = loss.reshape(logits.shape[:-1])
    go = torch.ones_like(loss) if grad_output is None else grad_output.detach().cpu().double()
    (loss * go).sum().backward()
    return loss.detach(), x.grad


def assert_close(actual, expected, dtype, what="", scale=1.0):
    """Compare against a float64 reference with the dtype's tolerances (``scale`` loosens them)."""
    rtol, atol = TOL[dtype]
    a = torch.as_tensor(actual).detach().cpu().double()
    e = torch.as_tensor(expected).detach().cpu().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    torch.testing.assert_close(a, e, rtol=rtol * scale, atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")
