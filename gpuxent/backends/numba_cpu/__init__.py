"""CPU backend: fused softmax-cross-entropy kernels compiled with ``numba.njit``.

The package, by concern:

    runtime        compilation, the worker threads (``launch``), output buffers, host arrays
    simd           the vectorizable scalar math: exp, tanh, log1p, half precision in registers
    xent           the fused cross-entropy forward (+ gradient), the vocab-parallel partials and gradient pass
    distill        the fused kl / reverse_kl / jsd
    elementwise    softmax, log-softmax, the binary cross-entropies

This module is the backend's one door: the functions of the contract in ``gpuxent.backends``, which
turn tensors into the kernels' arrays and launch the variant a call needs.
"""

from __future__ import annotations

import numpy as np
import torch

from . import distill as _distill
from . import elementwise as _ew
from . import xent as _ce
from .runtime import as_array, check_grad, compute_dtype, empty, grad_array, launch, row_factors, view

__all__ = [
    "NAME", "binary_cross_entropy", "binary_cross_entropy_with_logits", "cross_entropy", "cross_entropy_backward",
    "distillation", "empty", "is_available", "row_partials", "softmax", "supports",
]  # fmt: skip

NAME = "numba_cpu"
N_PARTIALS = _ce.N_PARTIALS
DIVERGENCE_CODES = _distill.DIVERGENCE_CODES


def is_available() -> tuple[bool, str]:
    import numba as nb

    from .runtime import _CPUS

    return True, f"numba {nb.__version__} on up to {_CPUS} CPU threads (torch.set_num_threads)"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


_NO_INDEX = np.zeros(1, np.int64)
_NO_PROBS = {np.float32: np.zeros((1, 0), np.float32), np.float64: np.zeros((1, 0), np.float64)}
_NO_STATS = {dt: (np.zeros(0, np.int64), np.zeros(0, dt)) for dt in (np.float32, np.float64)}
_ONES: dict = {}  # (r, dtype) -> ones, never written: the class weights of a call that gives none


def _ones(n_classes: int, dt) -> np.ndarray:
    w = _ONES.get((n_classes, dt))
    if w is None:
        w = np.ones(n_classes, dt)  # writeable: numba types a read-only array as another signature
        if len(_ONES) < 64:
            _ONES[(n_classes, dt)] = w
    return w


def _targets(logits: torch.Tensor, target: torch.Tensor, weight, dt):
    """(prob, class indices, probabilities, class weights) as the kernels read them."""
    prob = target.is_floating_point()
    if prob:
        t, q = _NO_INDEX, as_array(target, dt)
    else:
        t = target.detach().numpy() if target.dtype == torch.int64 else as_array(target, np.int64)
        if not t.flags.c_contiguous:
            t = np.ascontiguousarray(t)
        q = _NO_PROBS[dt]
    w = _ones(logits.shape[1], dt) if weight is None else as_array(weight, dt)
    return prob, t, q, w


def cross_entropy(
    logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad, stats=None
):  # fmt: skip
    """Per-row loss and lse of a (N, r) float tensor (and with ``stats`` the row's argmax and entropy);
    see ``gpuxent.backends`` for the contract."""
    x = view(logits)
    dt = compute_dtype(logits)
    n_rows, n_classes = x.shape
    prob, t, q, w = _targets(logits, target, weight, dt)
    inplace, g = grad_array(grad, logits, x)
    loss = np.empty(n_rows, dt)
    lse = np.empty(n_rows, dt)
    argmax, ent = _NO_STATS[dt] if stats is None else (o.numpy() for o in stats)
    rows = _ce.rows(prob, bool(softcap), stats is not None, grad is not None, inplace)
    sum_w = float(n_classes) if weight is None else float(w.sum(dtype=np.float64))
    launch(
        rows, n_rows, n_classes, x, t, q, w, sum_w, int(ignore_index), float(label_smoothing), float(z_loss),
        float(softcap or 0.0), row_factors(grad_scale, n_rows), g, loss, lse, argmax, ent,
    )  # fmt: skip
    return torch.from_numpy(loss), torch.from_numpy(lse)


def row_partials(logits, target, weight, *, ignore_index, softcap, class_offset, smoothing, out):
    """Per-row partials of a slice of the classes into ``out`` (N, 5); see ``gpuxent.backends``."""
    x = view(logits)
    prob, t, q, w = _targets(logits, target, weight, compute_dtype(logits))
    launch(
        _ce.partial_rows(prob, bool(softcap)), x.shape[0], x.shape[1], x, t, q, w, int(ignore_index),
        float(softcap or 0.0), int(class_offset), bool(smoothing), out.detach().numpy(),
    )  # fmt: skip


def cross_entropy_backward(
    logits, target, weight, lse, coef, entropy, *, ignore_index, label_smoothing, n_classes, class_offset, softcap,
    grad_scale, entropy_scale, grad,
):  # fmt: skip
    """The gradient of a slice of the classes from the global lse and coefficient; see ``gpuxent.backends``."""
    x = view(logits)
    dt = compute_dtype(logits)
    n_rows = x.shape[0]
    prob, t, q, w = _targets(logits, target, weight, dt)
    if grad is None:
        raise ValueError("grad: cross_entropy_backward writes into a gradient buffer")
    inplace, g = grad_array(grad, logits, x)
    ent = np.zeros(0, dt) if entropy is None else as_array(entropy, dt)
    rows = _ce.backward_rows(prob, bool(softcap), entropy is not None, inplace)
    launch(
        rows, n_rows, x.shape[1], x, t, q, w, as_array(lse, dt), as_array(coef, dt), ent, int(ignore_index),
        float(label_smoothing), float(n_classes), int(class_offset), float(softcap or 0.0),
        row_factors(grad_scale, n_rows), row_factors(entropy_scale, n_rows, "entropy_scale"), g,
    )  # fmt: skip


def softmax(x, *, log):
    """Row softmax (or log-softmax) of a (N, r) tensor, returned in the compute dtype."""
    a = view(x)
    dt = compute_dtype(x)
    out = empty(a.shape, torch.float64 if dt == np.float64 else torch.float32).numpy()
    row_max = np.empty(a.shape[0])
    row_log_sum = np.empty(a.shape[0])
    launch(_ew.softmax_rows(log), a.shape[0], a.shape[1], a, out, row_max, row_log_sum)
    if log:
        launch(_ew.log_softmax_rows, a.shape[0], a.shape[1], a, row_max, row_log_sum, out)
    return torch.from_numpy(out)


def _flat(t: torch.Tensor, dtype=None) -> np.ndarray:
    """``t`` as a contiguous 1-D numpy array: of ``dtype``, or (None) a view with half precision as bits."""
    return (view(t) if dtype is None else as_array(t, dtype)).reshape(-1)


def _bce_buffers(x: torch.Tensor, weight, grad):
    """(compute dtype, weights, loss, gradient): the gradient is written straight into ``grad``."""
    dt = compute_dtype(x)
    w = np.ones(x.numel(), dt) if weight is None else _flat(weight, dt)
    g = np.empty(0, dt) if grad is None else grad.detach().view(-1).numpy()
    return dt, w, np.empty(x.numel(), dt), g


def binary_cross_entropy(probs, target, weight, *, grad):
    dt, w, loss, g = _bce_buffers(probs, weight, grad)
    launch(_ew.bce_rows, loss.size, 1, _flat(probs), _flat(target, dt), w, loss, g)
    return torch.from_numpy(loss)


def binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad):
    dt, w, loss, g = _bce_buffers(logits, weight, grad)
    pw = np.empty(0, dt) if pos_weight is None else _flat(pos_weight, dt)
    launch(_ew.bce_logits_rows, loss.size, 1, _flat(logits), _flat(target, dt), w, pw, loss, g)
    return torch.from_numpy(loss)


def distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, grad_scale, grad):
    """Per-row tau**2 * divergence of (N, r) student and teacher logits; see ``gpuxent.backends``."""
    if teacher.shape != student.shape or teacher.dtype != student.dtype:
        raise ValueError("teacher: expected the student's shape and dtype")
    check_grad(grad, student)
    s, t = view(student), view(teacher)
    n_rows = s.shape[0]
    tg = as_array(target, np.int64) if target is not None else np.zeros(1, np.int64)
    g = view(grad) if grad is not None else np.zeros((1, 0), s.dtype)
    loss = np.empty(n_rows, compute_dtype(student))
    launch(
        _distill.rows(DIVERGENCE_CODES[divergence], grad is not None), n_rows, s.shape[1], s, t, tg,
        target is not None, int(ignore_index), float(temperature), float(beta), row_factors(grad_scale, n_rows),
        g, loss,
    )  # fmt: skip
    return torch.from_numpy(loss)
