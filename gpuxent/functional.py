"""The public functions: argument checks, numpy/torch in and out, reductions, dispatch.

Everything here works on torch tensors (numpy inputs become zero-copy CPU tensors and results go
back to numpy); the kernels live in ``gpuxent.backends``. Every check runs before any kernel reads
the data, so a call that raises leaves its inputs untouched.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import backends
from .autograd import FusedLoss, Softmax, compute_dtype, cross_entropy_rows, scale_grad

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# --------------------------------------------------------------------------- conversions


def _to_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, np.generic, list, tuple, int, float)):
        a = np.asarray(x)
        if a.dtype == object or a.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a numeric array, got dtype {a.dtype}")
        if not a.flags.writeable:
            a = a.copy()
        return torch.from_numpy(a)
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def _to_numpy(t: torch.Tensor):
    a = t.detach().cpu().numpy()
    return a[()] if a.ndim == 0 else a


def _out(t, as_numpy: bool):
    return _to_numpy(t) if as_numpy else t


def _check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def _check_device(ref: torch.Tensor, t: torch.Tensor | None, name: str) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but the input is on {ref.device}; put them on one device")


def _host_checks_allowed(t: torch.Tensor) -> bool:
    """Value checks need a host sync on GPU: done in eager mode, skipped under compile or capture."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _select(t: torch.Tensor, backend: str | None):
    return backends.select(t.device, backend)


def _backend_name(module) -> str:
    return module.NAME


# --------------------------------------------------------------------------- cross-entropy


def check_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> None:
    """The scalar keywords of every cross-entropy entry point."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not (z_loss >= 0 and math.isfinite(z_loss)):
        raise ValueError(f"z_loss: expected a finite number >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0 or not math.isfinite(softcap)):
        raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index: expected an int, got {type(ignore_index).__name__}")


def _prepare_ce(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Checked, flattened arguments: (x2d, target1d_or_2d, weight, is_prob)."""
    _check_float(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("logits: expected shape (..., r) with the classes on the last axis, got a scalar")
    n_classes = logits.shape[-1]
    if n_classes == 0:
        raise ValueError("logits: the class axis is empty (r = 0)")
    check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    _check_device(logits, target, "target")
    batch_shape = logits.shape[:-1]
    is_prob = target.dtype.is_floating_point
    if target.dtype == torch.bool or target.dtype.is_complex:
        raise TypeError(f"target: expected int64 class indices or float probabilities, got {target.dtype}")
    if is_prob:
        if target.shape != logits.shape:
            if target.shape == batch_shape:
                raise TypeError(
                    f"target: a float tensor of shape {tuple(target.shape)} where class indices are expected; "
                    "pass an integer tensor (or float probabilities of the logits' shape)"
                )
            raise ValueError(
                f"target: probability targets must have the logits' shape {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}"
            )
    else:
        if target.shape != batch_shape:
            if target.shape == logits.shape and n_classes != 1:
                raise TypeError(
                    f"target: an integer tensor of the logits' shape {tuple(logits.shape)}; probability targets "
                    "must be floating, class indices must have shape logits.shape[:-1]"
                )
            raise ValueError(
                f"target: class indices must have shape {tuple(batch_shape)} (logits.shape[:-1]), "
                f"got {tuple(target.shape)}"
            )
    if weight is not None:
        _check_device(logits, weight, "weight")
        _check_float(weight, "weight")
        if weight.dim() != 1 or weight.shape[0] != n_classes:
            raise ValueError(f"weight: expected shape ({n_classes},), one weight per class, got {tuple(weight.shape)}")
    x = logits.reshape(-1, n_classes)
    if x.stride(-1) != 1:
        x = x.contiguous()
    dt = compute_dtype(logits.dtype)
    if is_prob:
        t = target.reshape(-1, n_classes).to(dt)
    else:
        t = target.reshape(-1).long()
        if t.numel() and _host_checks_allowed(t):
            bad = (t != ignore_index) & ((t < 0) | (t >= n_classes))
            if bool(bad.any()):
                v = t[bad][0].item()
                raise ValueError(
                    f"target: class index {v} is outside [0, {n_classes}) and is not ignore_index={ignore_index}"
                )
    w = None if weight is None else weight.detach().to(dt).contiguous()
    return x, t, w, is_prob


def _denominator(t: torch.Tensor, w: torch.Tensor | None, is_prob: bool, ignore_index: int, n_rows: int, dt):
    """The mean's denominator, as a device tensor (no host sync): rows for probability targets,
    else the summed class weight of the kept rows."""
    if is_prob:
        return torch.tensor(float(n_rows), dtype=dt, device=t.device)
    kept = t != ignore_index
    if w is None:
        return kept.sum().to(dt)
    return torch.where(kept, w[t.clamp(0, w.shape[0] - 1)], 0).sum(dtype=dt)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, denom, batch_shape) -> torch.Tensor:
    """Per-row losses reduced: reshaped to the batch shape, summed, or summed over ``denom``."""
    if reduction == "none":
        return loss_rows.reshape(batch_shape)
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / denom


def _cross_entropy_core(
    logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, want_grad, inplace
):
    """(loss, grad, lse): the reduced loss, the gradient of logits' shape (or None) and the row lse."""
    x, t, w, is_prob = _prepare_ce(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    module = _select(x, backend)
    dt = compute_dtype(logits.dtype)
    n_rows = x.shape[0]
    denom = _denominator(t, w, is_prob, ignore_index, n_rows, dt) if reduction == "mean" else None
    grad_scale = (1.0 / denom) if denom is not None else None
    kw = dict(ignore_index=int(ignore_index), label_smoothing=float(label_smoothing), z_loss=float(z_loss))
    if inplace and want_grad:
        if not (logits.is_contiguous() and x.data_ptr() == logits.data_ptr()):
            raise ValueError("inplace_grad: needs contiguous logits to write the gradient into")
        loss_rows, lse = module.cross_entropy(x, t, w, softcap=softcap, grad_scale=grad_scale, grad=x, **kw)
        grad = x
    else:
        loss_rows, lse, grad = cross_entropy_rows(
            x.detach(), t, w, grad_scale, kw["ignore_index"], kw["label_smoothing"], kw["z_loss"],
            float(softcap or 0.0), module.NAME, want_grad,
        )  # fmt: skip
    loss = reduce_rows(loss_rows, reduction, denom, logits.shape[:-1])
    grad = grad.view(logits.shape) if want_grad else None
    return loss, grad, lse


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, inplace
    ):
        loss, grad, lse = _cross_entropy_core(
            logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, True, inplace
        )
        ctx.prob_target_grad = target.dtype.is_floating_point and ctx.needs_input_grad[1]
        if ctx.prob_target_grad:  # d loss / d q_c = -w_c (1 - eps) log p_c (times the mean's 1/N)
            ctx.save_for_backward(grad, logits, lse, weight)
        else:
            ctx.save_for_backward(grad)
        ctx.opts = (reduction, label_smoothing, softcap)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad = ctx.saved_tensors[0]
        grad_target = None
        if ctx.prob_target_grad:
            _, logits, lse, weight = ctx.saved_tensors
            reduction, smoothing, softcap = ctx.opts
            y = logits.reshape(-1, logits.shape[-1]).to(lse.dtype)
            if softcap:
                y = softcap * torch.tanh(y / softcap)
            g = -(1 - smoothing) * (y - lse[:, None])
            if weight is not None:
                g = g * weight.to(g.dtype)
            if reduction == "mean":
                g = g / y.shape[0]
            g = scale_grad(g, grad_output.reshape(-1) if reduction == "none" else grad_output)
            grad_target = g.reshape(logits.shape)
        return scale_grad(grad, grad_output), grad_target, *([None] * 8)


def _ce_inputs(logits, target, weight):
    """(as_numpy, logits, target, weight) as tensors; numpy in means numpy out."""
    as_numpy = not isinstance(logits, torch.Tensor)
    w = None if weight is None else _to_tensor(weight, "weight")
    return as_numpy, _to_tensor(logits, "logits"), _to_tensor(target, "target"), w


def cross_entropy(
    logits,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str | None = None,
    inplace_grad: bool = False,
):
    """Softmax + categorical cross-entropy over the last axis, fused; equals
    ``torch.nn.functional.cross_entropy`` for every shared keyword.

    Args:
        logits: ``(..., r)`` float array or tensor.
        target: class indices of shape ``logits.shape[:-1]`` (integers), or probabilities of the
            logits' shape (floats; the lecture's one-hot ``Y`` is the special case).
        weight: ``(r,)`` class weights; a mean divides by the summed weight of the kept rows.
        ignore_index: rows whose class index equals it count for nothing (class targets only).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses of shape ``logits.shape[:-1]``).
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution.
        z_loss: adds ``z_loss * lse**2`` for every kept row.
        softcap: logits become ``softcap * tanh(logits / softcap)`` first.
        backend: ``"numba_cpu"``, ``"triton"`` or ``"numba_cuda"``; default by device.
        inplace_grad: write the gradient into ``logits`` (which is then lost) instead of a new buffer.

    Returns:
        The loss, as the input's kind: a 0-d tensor / numpy scalar, or per-row values for
        ``reduction="none"``; float32 for half inputs.
    """
    as_numpy, x, t, w = _ce_inputs(logits, target, weight)
    args = (ignore_index, reduction, label_smoothing, z_loss, softcap, backend)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (t.requires_grad and t.is_floating_point()))
    if needs_grad:
        loss = _CrossEntropy.apply(x, t, w, *args, inplace_grad)
    else:
        loss = _cross_entropy_core(x, t, w, *args, False, False)[0]
    return _out(loss, as_numpy)


def cross_entropy_and_grad(
    logits,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    backend: str | None = None,
    inplace_grad: bool = False,
):
    """``(loss, grad)`` of :func:`cross_entropy` in one fused pass, without autograd.

    ``grad`` is d loss / d logits, with the logits' shape and dtype; for ``reduction="none"`` it is
    the gradient of ``loss.sum()``. With ``inplace_grad=True`` it is written into ``logits`` and
    returned as a view of the logits' buffer.
    """
    as_numpy, x, t, w = _ce_inputs(logits, target, weight)
    with torch.no_grad():
        loss, grad, _ = _cross_entropy_core(
            x.detach(), t, w, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, True, inplace_grad
        )
    return _out(loss, as_numpy), _out(grad, as_numpy)


# --------------------------------------------------------------------------- softmax


def _softmax(x, axis, log, backend):
    as_numpy = not isinstance(x, torch.Tensor)
    t = _to_tensor(x, "x")
    _check_float(t, "x")
    if t.dim() == 0:
        raise ValueError("x: expected at least one axis, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -t.dim() <= axis < t.dim():
        raise ValueError(f"axis: expected an int in [{-t.dim()}, {t.dim()}), got {axis!r}")
    moved = t.movedim(int(axis), -1)
    shape = moved.shape
    if moved.numel() == 0:
        return _out(torch.empty_like(t), as_numpy)
    x2 = moved.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    module = _select(x2, backend)
    if torch.is_grad_enabled() and t.requires_grad:
        out = Softmax.apply(x2, log, module)
    else:
        out = module.softmax(x2.detach(), log=log).to(t.dtype)
    return _out(out.reshape(shape).movedim(-1, int(axis)), as_numpy)


def softmax(x, axis: int = -1, *, backend: str | None = None):
    """Row-wise softmax along ``axis`` (PyTorch's ``dim``), numerically stable: each row sums to 1."""
    return _softmax(x, axis, False, backend)


def log_softmax(x, axis: int = -1, *, backend: str | None = None):
    """Row-wise log-softmax along ``axis``: ``x - logsumexp(x)``, never ``log(softmax(x))``."""
    return _softmax(x, axis, True, backend)


# --------------------------------------------------------------------------- binary cross-entropy


def _broadcast(t: torch.Tensor | None, shape, name: str) -> torch.Tensor | None:
    if t is None:
        return None
    try:
        return torch.broadcast_to(t, shape)
    except RuntimeError:
        raise ValueError(
            f"{name}: shape {tuple(t.shape)} does not broadcast to the input's shape {tuple(shape)}"
        ) from None


def _reduce_elementwise(loss: torch.Tensor, shape, reduction: str):
    if reduction == "none":
        return loss.reshape(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / loss.numel() if loss.numel() else loss.sum() * math.nan


def _bce_common(x, target, weight, reduction, backend, kind, pos_weight=None, want_grad=True):
    """Checks, then ``(loss, grad)`` of an elementwise binary loss (grad None unless ``want_grad``);
    ``kind`` picks the kernel."""
    name = "probs" if kind == "probs" else "logits"
    _check_float(x, name)
    _check_device(x, target, "target")
    _check_device(x, weight, "weight")
    _check_device(x, pos_weight, "pos_weight")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    if not target.dtype.is_floating_point and target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.bool):
        raise TypeError(f"target: expected 0/1 or probabilities as floats, got {target.dtype}")
    if target.shape != x.shape:
        raise ValueError(f"target: expected the {name}' shape {tuple(x.shape)}, got {tuple(target.shape)}")
    dt = compute_dtype(x.dtype)
    if weight is not None:
        _check_float(weight, "weight")
    if pos_weight is not None:
        _check_float(pos_weight, "pos_weight")
        if x.dim() == 0 or (pos_weight.dim() >= 1 and pos_weight.shape[-1] not in (1, x.shape[-1])):
            raise ValueError(
                f"pos_weight: expected a weight per class along the last axis ({x.shape[-1] if x.dim() else 1}), "
                f"got shape {tuple(pos_weight.shape)}"
            )
    w = _broadcast(weight, x.shape, "weight")
    pw = _broadcast(pos_weight, x.shape, "pos_weight")
    if kind == "probs" and x.numel() and _host_checks_allowed(x):
        bad = (x < 0) | (x > 1) | torch.isnan(x)
        if bool(bad.any()):
            raise ValueError(f"probs: values must lie in [0, 1], found {x[bad].flatten()[0].item()}")
    module = _select(x, backend)
    grad = torch.empty(x.shape, dtype=dt, device=x.device) if want_grad else None
    tt = target.to(dt)
    wd = None if w is None else w.to(dt)
    if kind == "probs":
        loss = module.binary_cross_entropy(x.detach(), tt, wd, grad=grad)
    else:
        loss = module.binary_cross_entropy_with_logits(x.detach(), tt, wd, None if pw is None else pw.to(dt), grad=grad)
    loss = _reduce_elementwise(loss, x.shape, reduction)
    if not want_grad:
        return loss, None
    if reduction == "mean" and x.numel():
        grad /= x.numel()
    return loss, grad.to(x.dtype)


def _bce_entry(x, target, weight, reduction, backend, kind, pos_weight=None):
    as_numpy = not isinstance(x, torch.Tensor)
    name = "probs" if kind == "probs" else "logits"
    x = _to_tensor(x, name)
    target = _to_tensor(target, "target")
    weight = None if weight is None else _to_tensor(weight, "weight")
    pos_weight = None if pos_weight is None else _to_tensor(pos_weight, "pos_weight")
    if torch.is_grad_enabled() and x.requires_grad:
        loss = FusedLoss.apply(
            lambda x_: (*_bce_common(x_, target, weight, reduction, backend, kind, pos_weight), None), x
        )
    else:
        loss = _bce_common(x, target, weight, reduction, backend, kind, pos_weight, want_grad=False)[0]
    return _out(loss, as_numpy)


def binary_cross_entropy(probs, target, weight=None, reduction: str = "mean", *, backend: str | None = None):
    """The lecture's BCE, ``-w [y ln p + (1 - y) ln(1 - p)]``, each log clamped at -100 as in PyTorch.

    ``probs`` must lie in [0, 1]; ``weight`` broadcasts against it. The sum over a data set is its
    negative log-likelihood.
    """
    return _bce_entry(probs, target, weight, reduction, backend, "probs")


def binary_cross_entropy_with_logits(
    logits, target, weight=None, pos_weight=None, reduction: str = "mean", *, backend: str | None = None
):
    """Sigmoid + BCE, fused and stable for any logit; ``pos_weight`` scales the positive term and
    broadcasts along the last axis, as in PyTorch."""
    return _bce_entry(logits, target, weight, reduction, backend, "logits", pos_weight)


# --------------------------------------------------------------------------- predictions


def predict(probs_or_logits):
    """Class predictions: int64 argmax over the last axis (the same for probabilities and logits)."""
    if isinstance(probs_or_logits, torch.Tensor):
        return probs_or_logits.argmax(-1)
    a = np.asarray(probs_or_logits)
    if a.ndim == 0:
        raise ValueError("probs_or_logits: expected at least one axis, got a scalar")
    return a.argmax(-1).astype(np.int64)


def predict_binary(probs, threshold: float = 0.5):
    """0/1 predictions as int64: 1 where ``p >= threshold``."""
    if isinstance(probs, torch.Tensor):
        return (probs >= threshold).long()
    return (np.asarray(probs) >= threshold).astype(np.int64)


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return backends.available_backends()
