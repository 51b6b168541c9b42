"""Argument checks and conversions of the public functions: numpy/torch in and out, shapes, dtypes,
devices, keywords, class indices. Every check runs before any kernel reads the data, so a call that
raises leaves its inputs untouched; every error names its argument.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
import torch

from .backends import compute_dtype, torch_ops

REDUCTIONS = ("mean", "sum", "none")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

# --------------------------------------------------------------------------- numpy / torch


def to_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a tensor: tensors as they are, numpy arrays (any strides, either byte order) and
    Python or numpy numbers as CPU tensors, sharing memory where torch can."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (np.ndarray, np.generic, list, tuple, numbers.Number)):
        a = np.asarray(x)
        if a.dtype == object or a.dtype.kind not in "biuf":
            raise TypeError(f"{name}: expected a numeric array, got dtype {a.dtype}")
        if not a.dtype.isnative:  # big-endian data: torch reads native byte order only
            a = a.astype(a.dtype.newbyteorder("="))
        if any(s < 0 for s in a.strides) or not a.flags.writeable:  # torch takes neither
            a = a.copy()
        return torch.from_numpy(a)
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def to_tensors(optional=(), **arrays) -> list:
    """:func:`to_tensor` of each keyword argument, in their order; those named in ``optional`` may be None."""
    return [None if x is None and name in optional else to_tensor(x, name) for name, x in arrays.items()]


def to_numpy(t: torch.Tensor):
    a = t.detach().cpu().numpy()
    return a[()] if a.ndim == 0 else a


def out(t, as_numpy: bool):
    """A result in the caller's kind: numpy in, numpy out."""
    return to_numpy(t) if as_numpy else t


# --------------------------------------------------------------------------- tensors


def check_float(t: torch.Tensor, name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")


def check_device(ref: torch.Tensor, t: torch.Tensor | None, name: str) -> None:
    if t is not None and t.device != ref.device:
        raise ValueError(f"{name}: on {t.device}, but the input is on {ref.device}; put them on one device")


def host_value(t: torch.Tensor) -> torch.Tensor | None:
    """The tensor that value checks may read on the host (``t``, or its data under ``torch.func.grad``),
    or None where they may not: under torch.compile, CUDA-graph capture and vmap (the kernels then turn
    a bad class index into a NaN row, never a bad read)."""
    if torch.compiler.is_compiling():
        return None
    functorch = torch._C._functorch
    while functorch.is_gradtrackingtensor(t):
        t = functorch.get_unwrapped(t)
    if functorch.is_functorch_wrapped_tensor(t):  # batched (vmap)
        return None
    if (t.is_cuda and torch.cuda.is_current_stream_capturing()) or t.is_meta:
        return None
    return t.detach()


def host_array(t: torch.Tensor) -> np.ndarray | None:
    """``t``'s values as a numpy view where value checks may read them and numpy can (a plain CPU
    tensor, see :func:`host_value`): a few us for what costs several torch ops; None elsewhere."""
    if torch.compiler.is_compiling():
        return None
    if type(t) is torch.Tensor and t.is_cpu and not torch._C._are_functorch_transforms_active():
        return t.detach().numpy()  # the common case: a plain CPU tensor outside torch.func, one check each
    plain = host_value(t)
    if plain is None or plain.device.type != "cpu" or torch._C._functorch.is_functorch_wrapped_tensor(plain):
        return None
    return plain.numpy()


# --------------------------------------------------------------------------- scalar keywords


def _real(v, name: str, allow_none: bool = False) -> float | None:
    """A Python or numpy real number (or 0-d array) as a float; TypeError naming ``name`` otherwise."""
    if v is None and allow_none:
        return None
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name}: expected a number, got {type(v).__name__}")
    return float(v)


def check_int(v, name: str) -> int:
    """A Python or numpy integer within int64 as an int."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if not INT64_MIN <= int(v) <= INT64_MAX:
        raise ValueError(f"{name}: {int(v)} does not fit in int64")
    return int(v)


def check_reduction(reduction) -> str:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


class CEOptions(NamedTuple):
    """The scalar keywords of a cross-entropy call, checked and normalised."""

    ignore_index: int
    reduction: str
    label_smoothing: float
    z_loss: float
    softcap: float  # 0.0: none


_DEFAULT_OPTIONS = {r: CEOptions(-100, r, 0.0, 0.0, 0.0) for r in REDUCTIONS}


def check_options(ignore_index, reduction, label_smoothing, z_loss, softcap) -> CEOptions:
    """The scalar keywords of every cross-entropy entry point."""
    if (  # the defaults, as Python values: a few type checks, not the ABC isinstance of each
        type(ignore_index) is int and ignore_index == -100 and type(reduction) is str and softcap is None
        and type(label_smoothing) is float and label_smoothing == 0.0 and type(z_loss) is float and z_loss == 0.0
    ):  # fmt: skip
        opts = _DEFAULT_OPTIONS.get(reduction)
        if opts is not None:
            return opts
    reduction = check_reduction(reduction)
    eps = _real(label_smoothing, "label_smoothing")
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    z = _real(z_loss, "z_loss")
    if not 0 <= z < math.inf:  # comparisons, not math.isfinite: a symbolic float under dynamic=True
        raise ValueError(f"z_loss: expected a finite number >= 0, got {z_loss!r}")
    cap = _real(softcap, "softcap", allow_none=True)
    if cap is not None and not 0 < cap < math.inf:
        raise ValueError(f"softcap: expected None or a finite number > 0, got {softcap!r}")
    return CEOptions(check_int(ignore_index, "ignore_index"), reduction, eps, z, cap or 0.0)


def check_chunk_size(chunk_size) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, np.ndarray) and chunk_size.ndim == 0:
        chunk_size = chunk_size[()]
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected None or an int >= 1 (rows per chunk), got {chunk_size!r}")
    return int(chunk_size)


def check_temperature(temperature, batch_shape, ref: torch.Tensor, dt: torch.dtype):
    """``(inv, inv_rows)``: 1/T for one temperature (None for T = 1), or (N,) per-row 1/T in ``dt``
    for a tensor of per-row temperatures (shape ``(N,)`` or the batch shape; a 0-d tensor applies to
    every row). ``ValueError`` for a temperature that is not a finite number > 0, or a wrong length."""
    n_rows = math.prod(batch_shape)
    if isinstance(temperature, np.ndarray) and temperature.ndim == 0:
        temperature = temperature[()]
    if isinstance(temperature, (torch.Tensor, np.ndarray)):
        t = to_tensor(temperature, "temperature")
        if t.dtype == torch.bool or t.dtype.is_complex or not (t.dtype.is_floating_point or t.dtype in _INTS):
            raise TypeError(f"temperature: expected a number or a real tensor of per-row temperatures, got {t.dtype}")
        check_device(ref, t, "temperature")
        if t.dim() == 0:
            t = t.expand(n_rows)
        if tuple(t.shape) not in ((n_rows,), tuple(batch_shape)):
            raise ValueError(
                f"temperature: expected a number or one temperature per row, shape ({n_rows},), got {tuple(t.shape)}"
            )
        t = t.detach().reshape(n_rows).to(dt)
        plain = host_value(t) if n_rows else None
        if plain is not None and not bool(((plain > 0) & (plain < math.inf)).all()):
            bad = plain[~((plain > 0) & (plain < math.inf))][0].item()
            raise ValueError(f"temperature: expected finite temperatures > 0, got {bad!r} in the tensor")
        return None, (1.0 / t).contiguous()
    if isinstance(temperature, (bool, np.bool_)) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature: expected a number or a tensor of per-row temperatures, got "
                        f"{type(temperature).__name__}")  # fmt: skip
    tau = float(temperature)
    if not 0 < tau < math.inf:  # comparisons: NaN fails both
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    return (None if tau == 1.0 else 1.0 / tau), None


_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


# --------------------------------------------------------------------------- cross-entropy


class CEProblem(NamedTuple):
    """A checked cross-entropy call: (N, r) logits with unit class stride, (N,) int64 class indices or
    (N, r) probabilities in the compute dtype, class weights in the compute dtype, the options."""

    logits: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor | None
    is_prob: bool
    opts: CEOptions
    batch_shape: torch.Size
    denom: float | None = None  # the mean's denominator, read on the host where that is allowed; else None


def check_target(target: torch.Tensor, batch_shape, n_classes: int, opts: CEOptions, what: str = "the logits'") -> bool:
    """Shape and dtype of a cross-entropy target; returns whether it holds probabilities."""
    if target.shape == batch_shape and target.dtype in _INTS:  # the common case: class indices
        return False
    full = (*batch_shape, n_classes)
    if target.dtype == torch.bool or target.dtype.is_complex or target.dtype == torch.uint64:
        raise TypeError(f"target: expected int64 class indices or float probabilities, got {target.dtype}")
    if target.dtype.is_floating_point:
        if tuple(target.shape) != full:
            if tuple(target.shape) == tuple(batch_shape):
                raise TypeError(
                    f"target: a float tensor of shape {tuple(target.shape)} where class indices are expected; "
                    f"pass an integer tensor (or float probabilities of {what} shape {full})"
                )
            raise ValueError(f"target: probability targets must have {what} shape {full}, got {tuple(target.shape)}")
        if opts.ignore_index != -100:  # as torch: no row of a probability target is ever ignored
            raise ValueError(
                f"ignore_index: not supported for probability (float) targets, got {opts.ignore_index}; leave it -100"
            )
        return True
    if tuple(target.shape) != tuple(batch_shape):
        if tuple(target.shape) == full and n_classes != 1:
            raise TypeError(
                f"target: an integer tensor of {what} shape {full}; probability targets must be floating, "
                "class indices must have the batch shape"
            )
        raise ValueError(
            f"target: class indices must have shape {tuple(batch_shape)} (the batch shape), got {tuple(target.shape)}"
        )
    return False


def check_class_weight(ref: torch.Tensor, weight, n_classes: int, name: str = "weight") -> None:
    if weight is None:
        return
    check_device(ref, weight, name)
    check_float(weight, name)
    if tuple(weight.shape) != (n_classes,):
        raise ValueError(f"{name}: expected shape ({n_classes},), one weight per class, got {tuple(weight.shape)}")


def _scan_py(t, n_classes, ignore_index, w, weighted):
    """One pass over class indices: ``(found, the first bad index, the kept rows' summed weight)``."""
    found = False
    bad = 0
    kept = 0.0
    for i in range(t.shape[0]):
        v = t[i]
        if v == ignore_index:
            continue
        if v < 0 or v >= n_classes:
            if not found:
                found = True
                bad = v
            continue
        kept += w[v] if weighted else 1.0
    return found, bad, kept


_SCAN = []  # [the compiled scan, or None where numba cannot compile it]


def _scan_numpy(t, n_classes, ignore_index, w, weighted):
    kept = t != ignore_index
    bad = kept & ((t < 0) | (t >= n_classes))
    if bad.any():
        return True, int(t[bad][0]), 0.0
    if not weighted:
        return False, 0, float(np.count_nonzero(kept))
    return False, 0, float(w[t[kept]].sum(dtype=np.float64))


def scan_targets(a: np.ndarray, n_classes: int, ignore_index: int, w: np.ndarray | None):
    """``(first bad class index or None, the mean's denominator)`` of host class indices ``a``: the range
    check and the summed weight of the kept rows in one pass (numba, compiled once and cached; numpy
    where numba is missing)."""
    if not _SCAN:
        try:
            import numba

            _SCAN.append(numba.njit(nogil=True, cache=True)(_scan_py))
        except Exception:  # noqa: BLE001 - numba missing or broken: numpy does it in a few ops
            _SCAN.append(None)
    scan = _SCAN[0] or _scan_numpy
    weighted = w is not None
    found, bad, kept = scan(a, n_classes, ignore_index, w if weighted else _NO_WEIGHT, weighted)
    return (int(bad) if found else None), kept


_NO_WEIGHT = np.zeros(1, np.float64)


def flat_target(target: torch.Tensor, is_prob: bool, n_classes: int, opts: CEOptions, dtype, weight=None):
    """``(target, denominator)``: the target flattened to rows, checked: probabilities in ``dtype``; class
    indices as int64 inside ``[0, r)`` or equal to ``ignore_index`` (checked on the host where that is
    allowed); and the mean's denominator (rows, or the kept rows' summed class weight) as a float where
    the host may read it, else None."""
    if is_prob:
        t = target.reshape(-1, n_classes)
        host = not torch.compiler.is_compiling() and type(t) is torch.Tensor and t.is_cpu
        host = host and not torch._C._are_functorch_transforms_active()
        return (t if t.dtype == dtype else t.to(dtype)), (float(t.shape[0]) if host else None)
    t = target if target.dim() == 1 else target.reshape(-1)
    if t.dtype != torch.int64:
        t = t.long()
    if not t.numel():
        return t, 0.0 if t.is_cpu and host_array(t) is not None else None
    a = host_array(t)
    w = None
    if a is not None and weight is not None:
        w = host_array(weight)
        if w is None:
            a = None
    if a is not None:
        v, denom = scan_targets(a, n_classes, opts.ignore_index, w)
    else:
        denom = None
        plain = host_value(t)
        if plain is None:
            return t, None
        bad = (plain != opts.ignore_index) & ((plain < 0) | (plain >= n_classes))
        v = plain[bad][0].item() if bool(bad.any()) else None
    if v is not None:
        raise ValueError(
            f"target: class index {v} is outside [0, {n_classes}) and is not ignore_index={opts.ignore_index}"
        )
    return t, denom


def prepare_cross_entropy(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """Checked, flattened arguments of a cross-entropy call (:class:`CEProblem`)."""
    if logits.dtype not in FLOAT_DTYPES:
        check_float(logits, "logits")
    if logits.dim() == 0:
        raise ValueError("logits: expected shape (..., r) with the classes on the last axis, got a scalar")
    n_classes = logits.shape[-1]
    if n_classes == 0:
        raise ValueError("logits: the class axis is empty (r = 0)")
    opts = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if target.device != logits.device:
        check_device(logits, target, "target")
    batch_shape = logits.shape[:-1]
    is_prob = check_target(target, batch_shape, n_classes, opts)
    check_class_weight(logits, weight, n_classes)
    x = logits if logits.dim() == 2 else logits.reshape(-1, n_classes)
    if x.stride(-1) != 1 and n_classes > 1:
        x = x.contiguous()
    dt = compute_dtype(logits.dtype)
    w = None if weight is None else weight.detach().to(dt).contiguous()
    t, denom = flat_target(target, is_prob, n_classes, opts, dt, w)
    return CEProblem(x, t, w, is_prob, opts, batch_shape, denom)


# --------------------------------------------------------------------------- reductions


def denominator(t: torch.Tensor, w: torch.Tensor | None, is_prob: bool, ignore_index: int, n_rows: int, dt):
    """The mean's denominator, as a device tensor (no host sync): rows for probability targets,
    else the summed class weight of the kept rows (on the host, as ``prepare_cross_entropy`` sums it,
    where the host may read the targets)."""
    if is_prob:
        return torch.full((), float(n_rows), dtype=dt, device=t.device)
    a = host_array(t)
    wa = None if w is None or a is None else host_array(w)
    if a is not None and (w is None or wa is not None):
        n_classes = INT64_MAX if w is None else w.shape[0]
        return torch.tensor(scan_targets(a, n_classes, ignore_index, wa)[1], dtype=dt)
    kept = t != ignore_index
    if w is None:
        return kept.sum().to(dt)
    return torch.where(kept, w[t.clamp(0, w.shape[0] - 1)], 0).sum(dtype=dt)


def mean_scale(denom: torch.Tensor) -> torch.Tensor:
    """1 / denominator, NaN where it is 0: a mean over kept rows whose weights sum to 0 is NaN in loss
    and gradient, as in torch (never inf)."""
    a = host_array(denom)
    if a is not None:
        d = float(a)
        return torch.tensor(1.0 / d if d else math.nan, dtype=denom.dtype)
    return torch.where(denom == 0, math.nan, 1.0 / denom)


def host_scale(denom: float, dt: torch.dtype) -> float:
    """:func:`mean_scale` of a host denominator, as a float of the compute dtype ``dt``."""
    if dt == torch.float64:
        return 1.0 / denom if denom else math.nan
    d = float(np.float32(denom))  # as the float32 tensor that mean_scale reads
    return float(np.float32(1.0 / d)) if d else math.nan


class _HostSum(torch.autograd.Function):
    """The sum of a plain CPU vector in numpy (one call, not a torch reduction's dispatch), differentiable."""

    @staticmethod
    def forward(ctx, rows):
        ctx.n = rows.shape[0]
        a = rows.detach().numpy()
        return torch.full((), float(a.sum()), dtype=rows.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.expand(ctx.n)


def host_sum(rows: torch.Tensor, scale=None) -> torch.Tensor:
    """``rows.sum()`` (times ``scale``, a float or a 0-d tensor) of a 1-D tensor; in numpy for a plain CPU
    tensor (bit for bit the same whichever path asks), in torch ops elsewhere."""
    plain = (
        not torch.compiler.is_compiling() and type(rows) is torch.Tensor and rows.is_cpu
        and not torch._C._are_functorch_transforms_active()
    )  # fmt: skip
    a = rows.detach().numpy() if plain else None
    if a is None or (rows.requires_grad and torch.is_grad_enabled()):
        total = _HostSum.apply(rows) if a is not None else rows.sum()
        if scale is None:
            return total
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(scale, dtype=rows.dtype, device=rows.device)
        return total * scale
    total = a.sum()
    if scale is not None:
        total = total * a.dtype.type(scale if not isinstance(scale, torch.Tensor) else scale.item())
    return torch.full((), float(total), dtype=rows.dtype)


def reduce_rows(loss_rows: torch.Tensor, reduction: str, denom, batch_shape) -> torch.Tensor:
    """Per-row losses reduced: reshaped to the batch shape, summed, or summed over ``denom`` (a device
    tensor or a host float; NaN where it is 0, as in torch)."""
    if reduction == "none":
        return loss_rows.reshape(batch_shape)
    if reduction == "sum":
        return host_sum(loss_rows)
    # as the kernels' gradients scale: bit for bit the same mean
    scale = host_scale(denom, loss_rows.dtype) if isinstance(denom, float) else mean_scale(denom)
    return host_sum(loss_rows, scale)


# --------------------------------------------------------------------------- distillation

DIVERGENCES = tuple(torch_ops.DIVERGENCES)  # the names of the torch formulas, which every backend follows
DISTILL_REDUCTIONS = ("batchmean", "sum", "mean", "none")


class DistillOptions(NamedTuple):
    """The scalar keywords of a distillation call, checked."""

    divergence: str
    beta: float
    temperature: float
    ignore_index: int
    reduction: str


class DistillProblem(NamedTuple):
    """A checked distillation call: (N, r) student and teacher logits of one dtype with unit class
    stride (the teacher detached), (N,) int64 targets or None, the options."""

    student: torch.Tensor
    teacher: torch.Tensor
    target: torch.Tensor | None
    opts: DistillOptions
    batch_shape: torch.Size


def check_distill_options(divergence, beta, temperature, ignore_index, reduction) -> DistillOptions:
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {DIVERGENCES}, got {divergence!r}")
    b = _real(beta, "beta")
    if divergence == "jsd" and not 0.0 < b < 1.0:
        raise ValueError(f"beta: expected a number in (0, 1) for divergence='jsd', got {beta!r}")
    tau = _real(temperature, "temperature")
    if not 0 < tau < math.inf:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if not isinstance(reduction, str) or reduction not in DISTILL_REDUCTIONS:
        raise ValueError(f"reduction: expected one of {DISTILL_REDUCTIONS}, got {reduction!r}")
    return DistillOptions(divergence, b, tau, check_int(ignore_index, "ignore_index"), reduction)


def prepare_distillation(student, teacher, target, divergence, beta, temperature, ignore_index, reduction):
    """Checked, flattened arguments of a distillation call (:class:`DistillProblem`); a teacher of
    another float dtype is cast to the student's."""
    check_float(student, "student_logits")
    check_float(teacher, "teacher_logits")
    if student.dim() == 0:
        raise ValueError("student_logits: expected shape (..., r) with the classes on the last axis, got a scalar")
    if teacher.shape != student.shape:
        raise ValueError(
            f"teacher_logits: expected the student's shape {tuple(student.shape)}, got {tuple(teacher.shape)}"
        )
    n_classes = student.shape[-1]
    if n_classes == 0:
        raise ValueError("student_logits: the class axis is empty (r = 0)")
    check_device(student, teacher, "teacher_logits")
    opts = check_distill_options(divergence, beta, temperature, ignore_index, reduction)
    batch_shape = student.shape[:-1]
    t = None
    if target is not None:
        check_device(student, target, "target")
        if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
            raise TypeError(f"target: expected integer class indices (only ignore_index is read), got {target.dtype}")
        if tuple(target.shape) != tuple(batch_shape):
            raise ValueError(f"target: expected the batch shape {tuple(batch_shape)}, got {tuple(target.shape)}")
        t = target.detach().reshape(-1).long()
    s = student.reshape(-1, n_classes)
    if s.stride(-1) != 1 and n_classes > 1:
        s = s.contiguous()
    tch = teacher.detach().to(student.dtype).reshape(-1, n_classes)
    if tch.stride(-1) != 1 and n_classes > 1:
        tch = tch.contiguous()
    return DistillProblem(s, tch, t, opts, batch_shape)


def distill_denominator(target: torch.Tensor | None, opts: DistillOptions, n_rows: int, n_classes: int, dt, device):
    """The denominator of ``"batchmean"`` (kept rows) and ``"mean"`` (kept rows times r), a device tensor."""
    if target is None:
        kept = torch.full((), float(n_rows), dtype=dt, device=device)
    else:
        kept = (target != opts.ignore_index).sum().to(dt)
    return kept if opts.reduction == "batchmean" else kept * n_classes


# --------------------------------------------------------------------------- statistics (cross_entropy_with_stats)


def check_bool(v, name: str) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return bool(v)


def reduce_kept(rows: torch.Tensor, kept: torch.Tensor, reduction: str, batch_shape) -> torch.Tensor:
    """Per-row values reduced over the kept rows, unweighted: per row with 0 for ignored rows, their
    sum, or their mean (NaN over zero kept rows, as a mean of nothing in torch)."""
    rows = torch.where(kept, rows, 0)
    if reduction == "none":
        return rows.reshape(batch_shape)
    if reduction == "sum":
        return rows.sum()
    n_kept = kept.sum()
    return torch.where(n_kept == 0, math.nan, rows.sum() / n_kept)


def row_statistics(lse, argmax, entropy_rows, target, weight, is_prob: bool, opts: CEOptions, batch_shape):
    """``(z_loss, accuracy, entropy)`` of the statistics API from the kernel's per-row lse, argmax and
    entropy (``entropy_rows`` None: not asked for): the z-loss part reduced like the loss (over the
    mean's weighted denominator), accuracy and entropy over the kept rows, unweighted. Accuracy
    compares the argmax with the class index, or with the target's own argmax for probabilities
    (torch.argmax on the host: one read of the (N, r) targets, not of the logits)."""
    n_rows, dt = lse.shape[0], lse.dtype
    if is_prob:
        kept = torch.ones(n_rows, dtype=torch.bool, device=lse.device)
        cls = target.argmax(-1) if n_rows else argmax
    else:
        kept = target != opts.ignore_index
        cls = target
    denom = denominator(target, weight, is_prob, opts.ignore_index, n_rows, dt) if opts.reduction == "mean" else None
    z_part = reduce_rows(torch.where(kept, opts.z_loss * lse * lse, 0), opts.reduction, denom, batch_shape)
    accuracy = reduce_kept((argmax == cls).to(dt), kept, opts.reduction, batch_shape)
    entropy = None if entropy_rows is None else reduce_kept(entropy_rows, kept, opts.reduction, batch_shape)
    return z_part, accuracy, entropy
