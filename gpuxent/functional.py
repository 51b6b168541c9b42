"""The public functions of gpuxent (``import gpuxent as gx``) and their docstrings.

Each one checks its arguments (``gpuxent.checks``), picks the backend once (``gpuxent.backends.select``)
and calls an autograd Function of ``gpuxent.autograd``, whose registered op calls the backend's
kernel: ``cross_entropy`` -> ``CrossEntropy.forward`` -> ``gpuxent::cross_entropy_rows`` ->
``numba_cpu.cross_entropy`` -> ``_ce_kernel``. numpy inputs become zero-copy CPU tensors and results
go back to numpy.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Union

import numpy as np
import torch

from . import autograd, backends
from .backends import compute_dtype
from .checks import (
    FLOAT_DTYPES,
    check_bool,
    check_device,
    check_float,
    check_options,
    check_reduction,
    check_temperature,
    denominator,
    host_array,
    host_value,
    out,
    prepare_cross_entropy,
    prepare_distillation,
    reduce_rows,
    row_statistics,
    to_tensor,
)

Array = Union[np.ndarray, torch.Tensor]
"""A numpy array or a torch tensor: every function returns the kind it was given."""

# --------------------------------------------------------------------------- cross-entropy


def _cross_entropy_args(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend,
                        want_grad, inplace: bool):  # fmt: skip
    """``(as_numpy, logits, batch_shape, args)``: the checked arguments of :class:`CrossEntropy`
    (``want_grad``: None to decide from the inputs). It returns before the call, so that the public
    function calls the autograd Function itself: public function, Function, op, backend."""
    as_numpy = not isinstance(logits, torch.Tensor)
    x = logits if not as_numpy else to_tensor(logits, "logits")
    t = target if isinstance(target, torch.Tensor) else to_tensor(target, "target")
    w = None if weight is None else to_tensor(weight, "weight")
    p = prepare_cross_entropy(x, t, w, ignore_index, reduction, label_smoothing, z_loss, softcap)
    name = backends.select(x.device, backend)
    if inplace is not False:
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace_grad: expected a bool, got {type(inplace).__name__}")
    if want_grad is None:
        want_grad = torch.is_grad_enabled() and (x.requires_grad or (t.requires_grad and t.is_floating_point()))
    inplace = inplace and want_grad
    if inplace and not x.is_contiguous():  # then p.logits is a view of x
        raise ValueError("inplace_grad: needs contiguous logits to write the gradient into")
    args = (p.logits, p.target, p.weight, p.is_prob, p.opts, name, want_grad, inplace, p.denom)
    return as_numpy, x, p.batch_shape, args


def _unit(temperature) -> bool:
    """Whether ``temperature`` is the number 1 (then it costs nothing)."""
    return isinstance(temperature, numbers.Real) and temperature == 1


def _temperature_logits(x: torch.Tensor, temperature, softcap):
    """``(y, softcap')`` with ``softcap'(y) = softcap(x) / temperature``, differentiable in ``x``.

    One temperature: ``y = x / T`` (one copy, in the compute dtype) and ``softcap' = softcap / T``, since
    ``c tanh(x / c) / T = (c / T) tanh((x / T) / (c / T))``. Per-row temperatures (an (N,) tensor, or the
    batch shape): ``y = softcap(x) / T_i`` in torch ops, no softcap left. ``T = 1``: ``x`` as it is."""
    if isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and temperature == 1:
        return x, softcap
    check_float(x, "logits")
    if x.dim() == 0:
        raise ValueError("logits: expected shape (..., r) with the classes on the last axis, got a scalar")
    cap = check_options(-100, "mean", 0.0, 0.0, softcap).softcap  # the user's softcap, checked as given
    dt = compute_dtype(x.dtype)
    inv, inv_rows = check_temperature(temperature, x.shape[:-1], x, dt)
    if inv_rows is None:
        return (x.to(dt) * inv if inv is not None else x), (cap * inv if cap and inv is not None else softcap)
    y = cap * torch.tanh(x.to(dt) / cap) if cap else x.to(dt)
    return y * inv_rows.reshape(*x.shape[:-1], 1), None


def cross_entropy(
    logits: Array, target: Array, weight: Array | None = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None, backend: str | None = None,
    inplace_grad: bool = False, temperature=1.0,
) -> Array:  # fmt: skip
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
        backend: ``"numba_cpu"``, ``"triton"``, ``"numba_cuda"`` or ``"torch"``; default by device.
        inplace_grad: under autograd, write the gradient into ``logits`` (which is then lost) instead of
            a new buffer. Their version counter moves, so autograd refuses a graph that still needs
            the old values, as after a torch in-place op; second derivatives are then unavailable.
        temperature: a number > 0, or an ``(N,)`` tensor of per-row temperatures (the batch shape also
            works): the logits enter as ``softcap(logits) / temperature``, and the gradient flows to
            ``logits`` only. Any value but 1 costs one scaled copy of the logits (in the compute dtype),
            into which ``inplace_grad`` then writes.

    Returns:
        The loss, as the input's kind: a 0-d tensor / numpy scalar, or per-row values for
        ``reduction="none"``; float32 for half inputs. Differentiable (second order and
        ``torch.func`` included) in the logits, and in probability targets.
    """
    if type(logits) is not torch.Tensor and type(logits).__name__ == "DTensor":  # gpuxent/dtensor.py
        return __import__("gpuxent.dtensor").dtensor.cross_entropy(**locals())
    if not (type(temperature) is float and temperature == 1.0) and not _unit(temperature):
        as_numpy = not isinstance(logits, torch.Tensor)
        y, cap = _temperature_logits(to_tensor(logits, "logits"), temperature, softcap)
        loss = cross_entropy(
            y, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=cap, backend=backend,
            inplace_grad=inplace_grad and y.requires_grad,
        )  # fmt: skip
        return out(loss, as_numpy)
    as_numpy, _, batch_shape, args = _cross_entropy_args(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, None, inplace_grad
    )  # fmt: skip
    loss = autograd.cross_entropy.route(args[0], args[1], args[2])(*args)[0]
    if args[4].reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss if not as_numpy else out(loss, True)


def cross_entropy_and_grad(
    logits: Array, target: Array, weight: Array | None = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None, backend: str | None = None,
    inplace_grad: bool = False, temperature=1.0,
) -> tuple[Array, Array]:  # fmt: skip
    """``(loss, grad)`` of :func:`cross_entropy` in one fused pass, without autograd.

    ``grad`` is d loss / d logits, with the logits' shape and dtype; for ``reduction="none"`` it is
    the gradient of ``loss.sum()``. With ``inplace_grad=True`` it is written into ``logits`` and
    returned as a view of the logits' buffer. ``temperature`` as in :func:`cross_entropy` (then the
    gradient of the scaled copy is carried back to the logits by autograd).
    """
    if not (type(temperature) is float and temperature == 1.0) and not _unit(temperature):
        as_numpy = not isinstance(logits, torch.Tensor)
        x = to_tensor(logits, "logits")
        check_bool(inplace_grad, "inplace_grad")
        with torch.enable_grad():
            x_ = x.detach().requires_grad_()
            loss = cross_entropy(
                x_, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=softcap,
                backend=backend, temperature=temperature,
            )  # fmt: skip
            (grad,) = torch.autograd.grad(loss.sum(), x_)
        grad = x.copy_(grad) if inplace_grad else grad
        return out(loss.detach(), as_numpy), out(grad, as_numpy)
    as_numpy, x, batch_shape, args = _cross_entropy_args(
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend, True, inplace_grad
    )  # fmt: skip
    with torch.no_grad():
        loss, grad, _ = autograd.cross_entropy.route(args[0], args[1], args[2])(*args)
    if args[4].reduction == "none":
        loss = loss.reshape(batch_shape)
    grad = (args[0] if args[7] else grad).view(x.shape)
    return out(loss, as_numpy), out(grad, as_numpy)


# --------------------------------------------------------------------------- softmax


def _softmax_args(x, axis, backend, dim):
    """``(as_numpy, t, moved, axis, x2, backend name)``: the checked arguments of :class:`Softmax` (``x2``
    the (N, r) rows; None when there is nothing to compute). It returns before the call, so that the
    public function calls the autograd Function itself: public function, Function, op, backend."""
    if axis is not None and dim is not None:
        raise TypeError("softmax: got both axis and dim (dim is PyTorch's name for axis); give one")
    what = "axis" if dim is None else "dim"
    axis = -1 if axis is None and dim is None else (axis if dim is None else dim)
    as_numpy = not isinstance(x, torch.Tensor)
    t = to_tensor(x, "x")
    if t.dtype not in FLOAT_DTYPES:
        check_float(t, "x")
    if t.dim() == 0:
        raise ValueError("x: expected at least one axis, got a scalar")
    if type(axis) is not int and (
        isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer))
    ):  # fmt: skip
        raise ValueError(f"{what}: expected an int in [{-t.dim()}, {t.dim()}), got {axis!r}")
    if not -t.dim() <= axis < t.dim():
        raise ValueError(f"{what}: expected an int in [{-t.dim()}, {t.dim()}), got {axis!r}")
    axis = int(axis)
    name = backends.select(t.device, backend)
    moved = t if axis == -1 or axis == t.dim() - 1 else t.movedim(axis, -1)
    if moved.numel() == 0:
        return as_numpy, t, moved, axis, None, name
    x2 = moved if moved.dim() == 2 else moved.reshape(-1, moved.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return as_numpy, t, moved, axis, x2, name


def _softmax_result(y, as_numpy, t, moved, axis):
    """The rows' result in the input's shape (and kind)."""
    if y is None:
        y = torch.empty_like(t)
    else:
        if y.shape != moved.shape:
            y = y.reshape(moved.shape)
        if moved is not t:
            y = y.movedim(-1, axis)
    return y if not as_numpy else out(y, True)


def softmax(x: Array, axis: int | None = None, *, dim: int | None = None, backend: str | None = None) -> Array:
    """Softmax along ``axis`` (default: the last), numerically stable: ``exp(x - max) / sum``; rows sum to 1.
    ``dim`` is the same argument under PyTorch's name; giving both is a TypeError."""
    as_numpy, t, moved, axis, x2, name = _softmax_args(x, axis, backend, dim)
    y = None if x2 is None else autograd.softmax.route(x2)(x2, False, name)
    return _softmax_result(y, as_numpy, t, moved, axis)


def log_softmax(x: Array, axis: int | None = None, *, dim: int | None = None, backend: str | None = None) -> Array:
    """Log-softmax along ``axis`` (default: the last): ``(x - max) - log(sum(exp(x - max)))``, exact for large
    logits. ``dim`` is the same argument under PyTorch's name; giving both is a TypeError."""
    as_numpy, t, moved, axis, x2, name = _softmax_args(x, axis, backend, dim)
    y = None if x2 is None else autograd.softmax.route(x2)(x2, True, name)
    return _softmax_result(y, as_numpy, t, moved, axis)


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


def _bce_args(x, target, weight, pos_weight, reduction, backend, with_logits: bool):
    """``(as_numpy, args)``: the checked arguments of :class:`BinaryCrossEntropy`. It returns before the
    call, so that the public function calls the autograd Function itself: public function, Function,
    op, backend."""
    name = "logits" if with_logits else "probs"
    as_numpy = not isinstance(x, torch.Tensor)
    x = to_tensor(x, name)
    target = to_tensor(target, "target")
    weight = None if weight is None else to_tensor(weight, "weight")
    pos_weight = None if pos_weight is None else to_tensor(pos_weight, "pos_weight")
    check_float(x, name)
    for v, vname in ((target, "target"), (weight, "weight"), (pos_weight, "pos_weight")):
        check_device(x, v, vname)
    reduction = check_reduction(reduction)
    if not target.dtype.is_floating_point and target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.bool):
        raise TypeError(f"target: expected 0/1 or probabilities as floats, got {target.dtype}")
    if target.shape != x.shape:
        raise ValueError(f"target: expected the {name}' shape {tuple(x.shape)}, got {tuple(target.shape)}")
    if weight is not None:
        check_float(weight, "weight")
    if pos_weight is not None:
        check_float(pos_weight, "pos_weight")
        if x.dim() == 0 or (pos_weight.dim() >= 1 and pos_weight.shape[-1] not in (1, x.shape[-1])):
            raise ValueError(
                f"pos_weight: expected a weight per class along the last axis ({x.shape[-1] if x.dim() else 1}), "
                f"got shape {tuple(pos_weight.shape)}"
            )
    w = _broadcast(weight, x.shape, "weight")
    pw = _broadcast(pos_weight, x.shape, "pos_weight")
    if not with_logits and x.numel():
        a = host_array(x) if x.dtype != torch.bfloat16 else None  # numpy has no bfloat16
        if a is not None:  # numpy: one pass, not four torch ops
            if not (a.min() >= 0 and a.max() <= 1):  # False for a NaN too
                bad = (a < 0) | (a > 1) | np.isnan(a)
                raise ValueError(f"probs: values must lie in [0, 1], found {a[bad].flatten()[0].item()}")
        else:
            plain = host_value(x)
            if plain is not None:
                bad = (plain < 0) | (plain > 1) | torch.isnan(plain)
                if bool(bad.any()):
                    raise ValueError(f"probs: values must lie in [0, 1], found {plain[bad].flatten()[0].item()}")
    name = backends.select(x.device, backend)
    want_grad = torch.is_grad_enabled() and (x.requires_grad or (target.requires_grad and target.is_floating_point()))
    return as_numpy, (x, target, w, pw, with_logits, reduction, name, want_grad)


def binary_cross_entropy(
    probs: Array, target: Array, weight: Array | None = None, reduction: str = "mean", *, backend: str | None = None
) -> Array:
    """The lecture's BCE, ``-w [y ln p + (1 - y) ln(1 - p)]``, each log clamped at -100 as in PyTorch.

    ``probs`` must lie in [0, 1]; ``weight`` broadcasts against it. The sum over a data set is its
    negative log-likelihood. Differentiable in ``probs`` and in a float ``target``.
    """
    as_numpy, args = _bce_args(probs, target, weight, None, reduction, backend, False)
    loss = autograd.binary_cross_entropy.route(*args[:4])(*args)[0]
    return loss if not as_numpy else out(loss, True)


def binary_cross_entropy_with_logits(
    logits: Array, target: Array, weight: Array | None = None, pos_weight: Array | None = None,
    reduction: str = "mean", *, backend: str | None = None,
) -> Array:  # fmt: skip
    """Sigmoid + BCE, fused and stable for any logit; ``pos_weight`` scales the positive term and
    broadcasts along the last axis, as in PyTorch. Differentiable in ``logits`` and a float ``target``."""
    as_numpy, args = _bce_args(logits, target, weight, pos_weight, reduction, backend, True)
    loss = autograd.binary_cross_entropy.route(*args[:4])(*args)[0]
    return loss if not as_numpy else out(loss, True)


# --------------------------------------------------------------------------- predictions


def predict(probs_or_logits: Array) -> Array:
    """Class predictions: int64 argmax over the last axis (the same for probabilities and logits)."""
    if isinstance(probs_or_logits, torch.Tensor):
        return probs_or_logits.argmax(-1)
    a = np.asarray(probs_or_logits)
    if a.ndim == 0:
        raise ValueError("probs_or_logits: expected at least one axis, got a scalar")
    return a.argmax(-1).astype(np.int64)


def predict_binary(probs: Array, threshold: float = 0.5) -> Array:
    """0/1 predictions as int64: 1 where ``p >= threshold``."""
    if isinstance(probs, torch.Tensor):
        return (probs >= threshold).long()
    return (np.asarray(probs) >= threshold).astype(np.int64)


# --------------------------------------------------------------------------- distillation


def distillation_loss(
    student_logits: Array, teacher_logits: Array, *, divergence: str = "kl", beta: float = 0.5,
    temperature: float = 1.0, target: Array | None = None, ignore_index: int = -100, reduction: str = "batchmean",
    backend: str | None = None,
) -> Array:  # fmt: skip
    """Distillation from teacher logits, fused: no ``(N, r)`` probability tensor is built.

    With ``S = student_logits / temperature``, ``T = teacher_logits / temperature``, ``p_s = softmax(S)``,
    ``p_t = softmax(T)``, each row's value is ``temperature**2`` times:

    - ``"kl"``: ``KL(p_t || p_s)``; ``"reverse_kl"``: ``KL(p_s || p_t)``;
    - ``"jsd"``: ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``.

    Args:
        student_logits: ``(..., r)`` float array or tensor; the gradient flows to it only.
        teacher_logits: the same shape (cast to the student's dtype); never differentiated.
        divergence: ``"kl"``, ``"reverse_kl"`` or ``"jsd"``.
        beta: the JSD's mixture weight, in ``(0, 1)`` (0.5: the symmetric Jensen-Shannon divergence).
        temperature: ``> 0``; divides both logits, and the loss is multiplied by its square.
        target: optional class indices of shape ``student_logits.shape[:-1]``: rows equal to
            ``ignore_index`` are left out (only that is read).
        reduction: ``"batchmean"`` (sum over kept rows / kept rows), ``"sum"``, ``"mean"`` (sum /
            (kept rows * r)) or ``"none"`` (per row, 0 for left-out rows), as ``F.kl_div``.
        backend: ``"numba_cpu"``, ``"triton"`` or ``"numba_cuda"``; default by device.

    Returns:
        The loss as the input's kind; float32 for half inputs.
    """
    if type(student_logits).__name__ == "DTensor":  # a torch.distributed.tensor.DTensor: gpuxent/dtensor.py
        return __import__("gpuxent.dtensor").dtensor.distillation_loss(**locals())
    as_numpy = not isinstance(student_logits, torch.Tensor)
    s = to_tensor(student_logits, "student_logits")
    t = to_tensor(teacher_logits, "teacher_logits")
    tg = None if target is None else to_tensor(target, "target")
    p = prepare_distillation(s, t, tg, divergence, beta, temperature, ignore_index, reduction)
    name = backends.select(s.device, backend)
    want_grad = torch.is_grad_enabled() and s.requires_grad
    loss = autograd.distillation.route(p.student, p.teacher, p.target)(
        p.student, p.teacher, p.target, p.opts, name, want_grad
    )[0]
    if p.opts.reduction == "none":
        loss = loss.reshape(p.batch_shape)
    return loss if not as_numpy else out(loss, True)


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return backends.available_backends()


__all__ = [
    "FLOAT_DTYPES",
    "available_backends",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "cross_entropy_and_grad",
    "distillation_loss",
    "log_softmax",
    "predict",
    "predict_binary",
    "softmax",
]


# --------------------------------------------------------------------------- statistics


class CrossEntropyOutput(NamedTuple):
    """What ``cross_entropy_with_stats`` returns: see its docstring."""

    loss: Array
    z_loss: Array
    accuracy: Array
    entropy: Array | None


def cross_entropy_with_stats(
    logits: Array, target: Array, weight: Array | None = None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None, backend: str | None = None,
    inplace_grad: bool = False, entropy: bool = False, temperature=1.0,
) -> CrossEntropyOutput:  # fmt: skip
    """:func:`cross_entropy` and the statistics a trainer logs, all from the one pass over the logits.

    Args:
        logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend:
            as in :func:`cross_entropy`.
        inplace_grad: as in :func:`cross_entropy` (only with ``entropy=False``: with ``entropy=True`` the
            gradient is written in the backward).
        entropy: also return the entropy of each kept row's softmax, differentiable.

    Returns:
        ``CrossEntropyOutput(loss, z_loss, accuracy, entropy)``, each reduced by ``reduction``:

        - ``loss``: exactly :func:`cross_entropy`'s (z-loss included), differentiable.
        - ``z_loss``: the ``z_loss * lse**2`` part alone, reduced like ``loss`` (a mean divides by the
          same summed class weight); no gradient.
        - ``accuracy``: rows whose argmax of the (soft-capped) logits (ties: the lowest index, as
          ``torch.argmax``) is the target class (probability targets: the target's argmax), over the
          kept rows, unweighted: a fraction (``"mean"``; NaN when no row is kept, like the loss), a
          count (``"sum"``), or 0/1 per row (``"none"``, 0 for ignored rows); no gradient.
        - ``entropy``: ``None``, or with ``entropy=True`` the entropy ``lse - sum_j p_j y_j`` of each
          kept row's softmax (after the softcap), reduced like an unweighted loss over the kept rows
          (mean over kept rows, sum, or per row with 0 for ignored rows). Differentiable: with
          ``d H / d y_j = p_j (E_p[y] - y_j)``, ``(a * loss + b * entropy).backward()`` is one fused
          pass over the logits in the backward, for any upstream gradients.

        Half inputs give float32 statistics, as their loss.

    Cost: with ``entropy=False`` the forward is ``cross_entropy``'s one pass (it also writes the
    gradient when one is needed), plus 16 bytes per row; with ``entropy=True`` the forward reads the
    logits once (no gradient) and the backward reads them once more and writes the gradient.
    """
    if type(logits).__name__ == "DTensor":  # a torch.distributed.tensor.DTensor: gpuxent/dtensor.py
        return __import__("gpuxent.dtensor").dtensor.cross_entropy_with_stats(**locals())
    as_numpy = not isinstance(logits, torch.Tensor)
    x = to_tensor(logits, "logits")
    if not (isinstance(temperature, numbers.Real) and temperature == 1):
        y, cap = _temperature_logits(x, temperature, softcap)
        o = cross_entropy_with_stats(
            y, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=cap, backend=backend,
            inplace_grad=inplace_grad and y.requires_grad, entropy=entropy,
        )  # fmt: skip
        return CrossEntropyOutput(*(None if v is None else out(v, as_numpy) for v in o))
    t = to_tensor(target, "target")
    w = None if weight is None else to_tensor(weight, "weight")
    p = prepare_cross_entropy(x, t, w, ignore_index, reduction, label_smoothing, z_loss, softcap)
    name = backends.select(x.device, backend)
    want_entropy = check_bool(entropy, "entropy")
    inplace = check_bool(inplace_grad, "inplace_grad")
    if inplace and want_entropy:
        raise ValueError("inplace_grad: not available with entropy=True, whose gradient is written in the backward")
    want_grad = torch.is_grad_enabled() and (x.requires_grad or (t.requires_grad and t.is_floating_point()))
    inplace = inplace and want_grad
    if inplace and not x.is_contiguous():
        raise ValueError("inplace_grad: needs contiguous logits to write the gradient into")
    opts = p.opts
    if want_entropy:
        loss_rows, entropy_rows, lse, argmax = autograd.cross_entropy_with_entropy.route(p.logits, p.target, p.weight)(
            p.logits, p.target, p.weight, p.is_prob, opts, name
        )
        denom = None
        if opts.reduction == "mean":
            denom = p.denom if p.denom is not None else denominator(
                p.target, p.weight, p.is_prob, opts.ignore_index, loss_rows.shape[0], loss_rows.dtype
            )  # fmt: skip
        loss = reduce_rows(loss_rows, opts.reduction, denom, p.batch_shape)
    else:
        loss, _, _, lse, argmax, entropy_rows = autograd.cross_entropy_stats.route(p.logits, p.target, p.weight)(
            p.logits, p.target, p.weight, p.is_prob, opts, name, want_grad, inplace, p.denom
        )
        entropy_rows = None
        if opts.reduction == "none":
            loss = loss.reshape(p.batch_shape)
    z_part, accuracy, ent = row_statistics(
        lse, argmax, entropy_rows, p.target, p.weight, p.is_prob, opts, p.batch_shape
    )  # fmt: skip
    return CrossEntropyOutput(*(None if v is None else out(v, as_numpy) for v in (loss, z_part, accuracy, ent)))


__all__ += ["CrossEntropyOutput", "cross_entropy_with_stats"]
