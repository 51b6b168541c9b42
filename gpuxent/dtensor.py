"""DTensor logits on a 1-D device mesh: ``cross_entropy``, ``cross_entropy_with_stats`` and
``distillation_loss`` of ``torch.distributed.tensor.DTensor`` logits.

``gpuxent.functional`` hands a DTensor here; what runs depends on the logits' placement:

- ``Shard`` on the class axis (``Shard(-1)``, as after a column-parallel ``lm_head`` under torchtitan's
  ``loss_parallel``): vocab-parallel over the mesh's process group (``gpuxent.distributed``), never
  gathering the classes. Each rank reads its slice once in the forward and once in the backward, and
  the ranks exchange ONE all-gather of 16 bytes per row (float32; 20 with label smoothing) per
  forward, with no header: the sharding, the same on every rank, gives every slice's offset, and
  the checks of the data travel as status words in the same collective. The loss equals PyTorch's
  ``F.cross_entropy`` under ``loss_parallel()`` and is replicated; the gradient is a DTensor with
  the logits' placement. Class-index targets are the full batch's (a tensor, or a DTensor of any
  placement), as ``loss_parallel`` takes them; probability targets may also be sharded like the
  logits. Class weights are the full ``(r,)`` (replicated).
- ``Shard`` on a batch axis: each rank computes its rows with the single-process function; a
  ``"mean"`` or ``"sum"`` is over the whole batch (one all-gather of a few numbers per call): a mean
  divides by the kept rows, or the summed weights of the kept rows, of the whole batch, whatever
  each rank keeps. ``"none"`` gives the rows sharded like the logits' (no communication). Targets:
  a DTensor, or a tensor holding this rank's rows or the whole batch's.
- ``Replicate``: every rank computes the whole problem (the same on every rank), no communication.
- ``Partial``: redistributed to ``Replicate`` first, as DTensor does for an op that needs the values.

Results are DTensors on the logits' mesh: replicated scalars (and replicated rows for the first and
third cases under ``"none"``). Bad data on any rank (a class index out of range, ranks passing
different class indices) raises ``ValueError`` on every rank, none is left waiting in a collective.
Meshes of more than one dimension are refused with a ``ValueError``.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from . import backends, distributed, functional
from .backends import compute_dtype
from .checks import (
    check_bool,
    check_class_weight,
    check_distill_options,
    check_float,
    check_options,
    check_reduction,
    check_target,
    denominator,
    mean_scale,
    reduce_kept,
    reduce_rows,
)

_ERRORS = (TypeError, ValueError, RuntimeError)
# Keywords the class-sharded path does not take (added to the single-process functions later): their
# values that change nothing.
_NEUTRAL = {"temperature": 1.0}


class _Sharding:
    """Where a DTensor's data lie on its 1-D mesh: ``kind`` is ``"class"`` (sharded on the last axis),
    ``"rows"`` (on a batch axis ``dim``) or ``"replicate"``; ``lo``/``size``: this rank's slice of
    ``dim`` (``torch.chunk``'s, as ``Shard`` places them)."""

    def __init__(self, x: DTensor, name: str):
        mesh = x.device_mesh
        if mesh.ndim != 1:
            raise ValueError(
                f"{name}: a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)}; gpuxent takes DTensor "
                "logits on a 1-D mesh (for a TP x DP mesh, pass the TP sub-mesh's local tensors to "
                "gpuxent.distributed.vocab_parallel_cross_entropy with its group)"
            )
        if x.dim() == 0:
            raise ValueError(f"{name}: expected shape (..., r) with the classes on the last axis, got a scalar")
        (p,) = x.placements
        if p.is_partial():
            x = x.redistribute(mesh, [Replicate()])
            p = x.placements[0]
        self.x, self.mesh, self.placement = x, mesh, p
        self.group = mesh.get_group()
        self.shape = x.shape
        self.kind, self.dim, self.lo, self.size = "replicate", None, 0, None
        if p.is_replicate():
            return
        if type(p) is not Shard:
            raise ValueError(f"{name}: placement {p} is not supported; use Shard(dim), Replicate() or Partial()")
        d = p.dim % x.dim()
        n, world = x.shape[d], mesh.size()
        chunk = -(-n // world)
        self.lo = min(mesh.get_local_rank() * chunk, n)
        self.size = max(0, min(n, self.lo + chunk) - self.lo)
        if x._local_tensor.shape[d] != self.size:
            raise ValueError(f"{name}: this rank holds {x._local_tensor.shape[d]} of the {n} entries of axis {d}, "
                             f"not torch.chunk's {self.size}: an uneven sharding gpuxent cannot place")  # fmt: skip
        self.kind, self.dim = ("class" if d == x.dim() - 1 else "rows"), d

    def local(self, v, name: str, batch_only: bool = False):
        """A companion of the logits (target, teacher) as this rank's local tensor, placed like the logits'
        data: a DTensor is redistributed to the logits' placement (class indices, ``batch_only``, to
        Replicate when the classes are sharded); a tensor of the global shape is sliced, one of the
        local shape taken as it is."""
        if v is None:
            return None
        class_sharded = self.kind == "class"
        if isinstance(v, DTensor):
            if self.kind == "replicate" or (class_sharded and batch_only):
                return v.full_tensor()
            if v.dim() <= self.dim:
                raise ValueError(f"{name}: a DTensor of shape {tuple(v.shape)} for logits sharded on axis {self.dim}")
            return v.redistribute(self.mesh, [Shard(self.dim)]).to_local()
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{name}: expected a torch tensor or a DTensor with DTensor logits, got {type(v).__name__}")
        if self.kind == "replicate" or (class_sharded and batch_only) or v.dim() <= self.dim:
            return v
        if v.shape[self.dim] == self.shape[self.dim] and v.shape[self.dim] != self.size:
            return v.narrow(self.dim, self.lo, self.size)  # the global tensor: this rank's slice
        return v

    def wrap(self, v: torch.Tensor, rows: bool = False) -> DTensor:
        """A local result as a DTensor on the mesh: per-row values of row-sharded logits sharded like
        them, anything else replicated."""
        if rows and self.kind == "rows":
            shape = self.shape[:-1]
            stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
            return DTensor.from_local(v, self.mesh, [Shard(self.dim)], run_check=False, shape=shape,
                                      stride=tuple(stride))  # fmt: skip
        return DTensor.from_local(v, self.mesh, [Replicate()], run_check=False)


def _neutral_extras(extra: dict, name: str) -> None:
    for key, value in extra.items():
        if key not in _NEUTRAL or value != _NEUTRAL[key]:
            raise NotImplementedError(f"{name}: {key}={value!r} with logits sharded on the class axis")


# --------------------------------------------------------------------------- row-sharded: sums over the ranks


class _Total(torch.autograd.Function):
    """The sum over the ranks of a local value (``total``, already summed): its gradient is the local
    value's, as for a sum over the rows of a batch."""

    @staticmethod
    def forward(ctx, local, total):
        return total.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _sum_over_ranks(values, error, sh: _Sharding, dt, device, name: str):
    """Every rank's 0-d ``values`` summed in rank order, in one all-gather that also carries each
    rank's status (``error``: its own checks failed; then ``values`` is a count of zeros): every rank
    raises if any failed. The differentiable values stay differentiable (``_Total``)."""
    n = values if isinstance(values, int) else len(values)
    local = torch.zeros(n, dtype=dt, device=device)
    if error is None:
        local = torch.stack([v.detach().to(dt).reshape(()) for v in values])
    words = distributed.status_words(device, error)
    _, tail_all, words_all = distributed.exchange(local.new_zeros(0, 1), local, sh.group, words)
    distributed.check_status(words_all, error, name, 0, -100, False)
    totals = tail_all.sum(0)
    return [_Total.apply(v.to(dt), totals[i]) if v.requires_grad else totals[i] for i, v in enumerate(values)]


def _mean(total, denom):
    return total * mean_scale(denom)


# --------------------------------------------------------------------------- the class-sharded checks


def _is_prob(target) -> bool:
    """Probability targets (the same answer on every rank: it decides the collective's size)."""
    return isinstance(target, torch.Tensor) and target.is_floating_point()


def _class_inputs(sh: _Sharding, x_local, target, weight, opts, backend, name):
    """``(error, target, weight, backend)`` of the class-sharded path: class indices full and
    replicated, probabilities and class weights this rank's slice of the classes."""
    try:
        check_float(x_local, name)
        if sh.shape[-1] == 0:
            raise ValueError(f"{name}: the class axis is empty (r = 0)")
        is_prob = _is_prob(target)
        t = sh.local(target, "target", batch_only=not is_prob)
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"target: expected a torch tensor or a DTensor, got {type(t).__name__}")
        if t.device != x_local.device:
            raise ValueError(f"target: on {t.device}, but the logits are on {x_local.device}")
        check_target(t, x_local.shape[:-1], x_local.shape[-1], opts, "this rank's slice of the logits'")
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        check_class_weight(x_local, weight, sh.shape[-1])
        w = None if weight is None else weight.narrow(0, sh.lo, sh.size)
        chosen = backends.select(x_local.device, backend)
        return None, t, w, chosen
    except _ERRORS as exc:
        return exc, None, None, None


def _class_layout(sh, x_local, error, t, is_prob, opts, chosen, name, k):
    """The class-sharded ``distributed._Layout`` (status words checked after the collective), or, when
    this rank's checks failed, its part in the collective and the raise on every rank."""
    check = dict(n_classes=sh.shape[-1], ignore_index=opts.ignore_index, class_targets=not is_prob)
    device, dt = x_local.device, compute_dtype(x_local.dtype)
    if error is not None:
        distributed.fail_together(error, device, dt, math.prod(x_local.shape[:-1]), k, sh.group, name, **check)
    words = lambda: distributed.status_words(device, None, None if is_prob else t, opts.ignore_index)
    check_words = lambda words_all: distributed.check_status(words_all, None, name, **check)
    return distributed._Layout(sh.lo, x_local.shape[-1], sh.shape[-1], opts, chosen, sh.group, words, check_words)


def _local_of(logits, name):
    sh = _Sharding(logits, name)
    return sh, sh.x.to_local()


# --------------------------------------------------------------------------- cross_entropy


def cross_entropy(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *,
                  z_loss=0.0, softcap=None, backend=None, inplace_grad=False, **extra):  # fmt: skip
    """:func:`gpuxent.cross_entropy` of DTensor logits (see the module docstring)."""
    name = "logits"
    sh, x = _local_of(logits, name)
    keywords = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    backend=backend, inplace_grad=inplace_grad, **extra)  # fmt: skip
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if sh.kind == "replicate":
        loss = functional.cross_entropy(x, sh.local(target, "target"), weight, reduction=reduction, **keywords)
        return sh.wrap(loss)
    if sh.kind == "rows":
        return sh.wrap(_rows_cross_entropy(sh, x, target, weight, reduction, keywords), rows=reduction == "none")
    _neutral_extras(extra, "cross_entropy")
    opts = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    inplace = check_bool(inplace_grad, "inplace_grad") and not sh.x.is_leaf  # a leaf's logits are not overwritten
    is_prob = _is_prob(target)
    error, t, w, chosen = _class_inputs(sh, x, target, weight, opts, backend, name)
    layout = _class_layout(sh, x, error, t, is_prob, opts, chosen, "cross_entropy", 5 if opts.label_smoothing else 4)
    return sh.wrap(distributed.run_cross_entropy(x, t, w, layout, inplace))


def _rows_cross_entropy(sh, x, target, weight, reduction, keywords):
    """Row-sharded: this rank's rows with ``functional.cross_entropy``, the mean over the whole batch.

    A mean needs the whole batch's denominator D before the kernel, to fold 1 / D into the gradient
    it writes (else the backward would scale the whole gradient once more): the local losses are
    summed with the class weights (and the z-loss) divided by D, which scales every term of a row's
    loss and gradient by 1 / D, and the ranks' sums are summed. Two all-gathers of a few numbers."""
    dt = compute_dtype(x.dtype)
    if reduction == "none":
        return functional.cross_entropy(x, sh.local(target, "target"), weight, reduction="none", **keywords)
    error = t = denom = None
    try:
        check_reduction(reduction)
        t = sh.local(target, "target")
        if reduction == "mean":
            denom = _ce_denominator(x, t, weight, keywords["ignore_index"], dt)
    except _ERRORS as exc:
        error = exc
    kw = dict(keywords)
    if reduction == "mean":
        (denom,) = _sum_over_ranks([denom] if error is None else 1, error, sh, dt, x.device, "cross_entropy")
        scale = mean_scale(denom)
        weight = (torch.ones(sh.shape[-1], dtype=dt, device=x.device) if weight is None else weight.detach()) * scale
        if kw["z_loss"]:  # a float keyword: one host read of D (only with a z-loss)
            z = float(kw["z_loss"] * scale)
            kw["z_loss"] = z if math.isfinite(z) else 0.0  # D = 0: the NaN comes from the weights and below
    loss = None
    try:
        loss = functional.cross_entropy(x, t, weight, reduction="sum", **kw)
    except _ERRORS as exc:
        error = exc
    total = _sum_over_ranks([loss] if error is None else 1, error, sh, dt, x.device, "cross_entropy")[0]
    return total if denom is None else torch.where(denom == 0, math.nan, total)  # a mean of nothing: NaN


def _ce_denominator(x, t, weight, ignore_index, dt):
    """This rank's share of the mean's denominator: its rows for probabilities, else the summed class
    weight of its kept rows (checked by the call that computed the loss)."""
    is_prob = t.is_floating_point()
    n_rows = math.prod(x.shape[:-1])
    w = None if weight is None else weight.detach().to(dt)
    return denominator(t.reshape(-1) if not is_prob else t, w, is_prob, ignore_index, n_rows, dt)


# --------------------------------------------------------------------------- cross_entropy_with_stats


def cross_entropy_with_stats(logits, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                             *, z_loss=0.0, softcap=None, backend=None, inplace_grad=False, entropy=False,
                             **extra):  # fmt: skip
    """:func:`gpuxent.cross_entropy_with_stats` of DTensor logits: every field a DTensor (see the module
    docstring); on class-sharded logits the argmax and entropy are over all the classes."""
    name = "logits"
    sh, x = _local_of(logits, name)
    keywords = dict(ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                    backend=backend, inplace_grad=inplace_grad, entropy=entropy, **extra)  # fmt: skip
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
    if sh.kind == "replicate":
        out = functional.cross_entropy_with_stats(x, sh.local(target, "target"), weight, reduction=reduction,
                                                  **keywords)  # fmt: skip
        return functional.CrossEntropyOutput(*(None if v is None else sh.wrap(v) for v in out))
    if sh.kind == "rows":
        out = _rows_stats(sh, x, target, weight, reduction, keywords)
        return functional.CrossEntropyOutput(*(None if v is None else sh.wrap(v, rows=reduction == "none")
                                               for v in out))  # fmt: skip
    _neutral_extras(extra, "cross_entropy_with_stats")
    opts = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    want_entropy = check_bool(entropy, "entropy")
    check_bool(inplace_grad, "inplace_grad")  # the statistics' gradient is written in the backward
    is_prob = _is_prob(target)
    error, t, w, chosen = _class_inputs(sh, x, target, weight, opts, backend, name)
    k = (5 if opts.label_smoothing else 4) + (4 if is_prob else 2)
    layout = _class_layout(sh, x, error, t, is_prob, opts, chosen, "cross_entropy_with_stats", k)
    loss_rows, entropy_rows, pb = distributed.run_stats(x, t, w, layout)
    batch, dt, red = x.shape[:-1], loss_rows.dtype, opts.reduction
    denom = None
    if red == "mean":
        denom = torch.full((), float(pb.n_rows), dtype=dt, device=x.device) if is_prob else pb.b.sum()
    loss = reduce_rows(loss_rows, red, denom, batch)
    z_part = reduce_rows(torch.where(pb.kept, opts.z_loss * pb.lse * pb.lse, 0), red, denom, batch)
    accuracy = reduce_kept((pb.argmax == pb.cls).to(dt), pb.kept, red, batch)
    ent = reduce_kept(entropy_rows, pb.kept, red, batch) if want_entropy else None
    return functional.CrossEntropyOutput(*(None if v is None else sh.wrap(v) for v in (loss, z_part, accuracy, ent)))


def _rows_stats(sh, x, target, weight, reduction, keywords):
    """Row-sharded statistics: this rank's sums, the means over the whole batch (the loss and z-loss
    over the summed weights of the kept rows, accuracy and entropy over the kept rows)."""
    if reduction == "none":
        return functional.cross_entropy_with_stats(x, sh.local(target, "target"), weight, reduction="none",
                                                   **keywords)  # fmt: skip
    dt = compute_dtype(x.dtype)
    want_entropy = keywords["entropy"] is True
    error = values = None
    try:
        check_reduction(reduction)
        t = sh.local(target, "target")
        out = functional.cross_entropy_with_stats(x, t, weight, reduction="sum", **keywords)
        values = [out.loss, out.z_loss, out.accuracy, out.entropy if want_entropy else out.accuracy.new_zeros(())]
        if reduction == "mean":
            ii = keywords["ignore_index"]
            is_prob = t.is_floating_point()
            kept = math.prod(x.shape[:-1]) if is_prob else (t.reshape(-1) != ii).sum()
            values += [_ce_denominator(x, t, weight, ii, dt), torch.as_tensor(kept, dtype=dt, device=x.device)]
    except _ERRORS as exc:
        error = exc
    n = 6 if reduction == "mean" else 4
    totals = _sum_over_ranks(values if error is None else n, error, sh, dt, x.device, "cross_entropy_with_stats")
    loss, z_part, accuracy, ent = totals[:4]
    if reduction == "mean":
        weights, kept = totals[4], totals[5]
        loss, z_part, accuracy, ent = (
            _mean(loss, weights),
            _mean(z_part, weights),
            _mean(accuracy, kept),
            _mean(ent, kept),
        )
    return loss, z_part, accuracy, ent if want_entropy else None


# --------------------------------------------------------------------------- distillation_loss


def distillation_loss(student_logits, teacher_logits, *, divergence="kl", beta=0.5, temperature=1.0, target=None,
                      ignore_index=-100, reduction="batchmean", backend=None, **extra):  # fmt: skip
    """:func:`gpuxent.distillation_loss` of DTensor student logits; the teacher (and ``target``) a DTensor
    or a tensor, placed as the module docstring says."""
    name = "student_logits"
    sh, s = _local_of(student_logits, name)
    keywords = dict(divergence=divergence, beta=beta, temperature=temperature, ignore_index=ignore_index,
                    backend=backend, **extra)  # fmt: skip
    if sh.kind == "replicate":
        loss = functional.distillation_loss(
            s,
            sh.local(teacher_logits, "teacher_logits"),
            target=sh.local(target, "target"),
            reduction=reduction,
            **keywords,
        )
        return sh.wrap(loss)  # fmt: skip
    if sh.kind == "rows":
        return sh.wrap(_rows_distillation(sh, s, teacher_logits, target, reduction, keywords),
                       rows=reduction == "none")  # fmt: skip
    _neutral_extras(extra, "distillation_loss")
    opts = check_distill_options(divergence, beta, temperature, ignore_index, reduction)
    device, dt = s.device, compute_dtype(s.dtype)
    n_rows = math.prod(s.shape[:-1])
    error = t = tg = None
    try:
        check_float(s, name)
        if sh.shape[-1] == 0:
            raise ValueError(f"{name}: the class axis is empty (r = 0)")
        t = sh.local(teacher_logits, "teacher_logits")
        check_float(t, "teacher_logits")
        if t.shape != s.shape or t.device != device:
            raise ValueError(f"teacher_logits: expected the student's shape {tuple(sh.shape)} (this rank's slice "
                             f"{tuple(s.shape)}) on {device}, got {tuple(t.shape)} on {t.device}")  # fmt: skip
        t = t.detach().to(s.dtype)
        tg = sh.local(target, "target", batch_only=True)
        if tg is not None:
            if tg.is_floating_point() or tg.dtype == torch.bool or tuple(tg.shape) != tuple(s.shape[:-1]):
                raise ValueError(f"target: expected integer class indices of the batch shape {tuple(s.shape[:-1])}, "
                                 f"got {tg.dtype} of shape {tuple(tg.shape)}")  # fmt: skip
            tg = tg.reshape(-1).long()
    except _ERRORS as exc:
        error = exc
    check = dict(n_classes=sh.shape[-1], ignore_index=ignore_index, class_targets=False)
    if error is not None:
        distributed.fail_together(error, device, dt, n_rows, 5, sh.group, "distillation_loss", **check)
    words = lambda: distributed.status_words(device, None)
    check_words = lambda words_all: distributed.check_status(words_all, None, "distillation_loss", **check)
    rows = distributed.run_distillation(s, t, tg, opts, sh.lo, sh.shape[-1], sh.group, words, check_words)
    if opts.reduction == "none":
        return sh.wrap(rows.reshape(s.shape[:-1]))
    if opts.reduction == "sum":
        return sh.wrap(rows.sum())
    kept = torch.full((), float(n_rows), dtype=dt, device=device) if tg is None else (tg != ignore_index).sum().to(dt)
    denom = kept if opts.reduction == "batchmean" else kept * sh.shape[-1]
    return sh.wrap(_mean(rows.sum(), denom))


def _rows_distillation(sh, s, teacher_logits, target, reduction, keywords):
    """Row-sharded distillation: this rank's rows, ``"batchmean"``/``"mean"`` over the whole batch's kept rows."""
    if reduction == "none":
        return functional.distillation_loss(
            s,
            sh.local(teacher_logits, "teacher_logits"),
            target=sh.local(target, "target"),
            reduction="none",
            **keywords,
        )
    dt = compute_dtype(s.dtype)
    error = values = None
    try:
        k = keywords
        check_distill_options(k["divergence"], k["beta"], k["temperature"], k["ignore_index"], reduction)
        tg = sh.local(target, "target")
        loss = functional.distillation_loss(s, sh.local(teacher_logits, "teacher_logits"), target=tg,
                                            reduction="sum", **keywords)  # fmt: skip
        values = [loss]
        if reduction != "sum":
            n_rows = math.prod(s.shape[:-1])
            kept = n_rows if tg is None else (tg.reshape(-1) != keywords["ignore_index"]).sum()
            values.append(torch.as_tensor(kept, dtype=dt, device=s.device))
    except _ERRORS as exc:
        error = exc
    n = 1 if reduction == "sum" else 2
    totals = _sum_over_ranks(values if error is None else n, error, sh, dt, s.device, "distillation_loss")
    if reduction == "sum":
        return totals[0]
    kept = totals[1] if reduction == "batchmean" else totals[1] * sh.shape[-1]
    return _mean(totals[0], kept)


__all__ = ["cross_entropy", "cross_entropy_with_stats", "distillation_loss"]
