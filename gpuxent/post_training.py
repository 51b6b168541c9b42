"""Post-training on the fused linear head: per-token log-probs and entropy, and distillation between two heads.

``linear_log_probs`` is the RL primitive of PPO/GRPO/DPO trainers (verl, TRL, Liger): per token, the
log-probability of the taken token under ``softmax((hidden @ weight.T + bias) / T)`` and, if asked, the
entropy of that softmax, both differentiable for any upstream gradients (per-token advantages, masks,
both at once), without the (N, r) logits. A token's log-prob is minus its unsmoothed, unweighted
cross-entropy, so it is the chunk loop of :mod:`gpuxent.linear` with ``reduction="none"``: the forward
runs the chunks through the fused kernel (with statistics when the entropy is asked for) and keeps
only per-row numbers (the loss, lse and entropy); the backward runs the chunks again, writing each
chunk's logit gradient ``-grad_logp_i dCE_i + grad_entropy_i dH_i`` over its logits in one pass
(``cross_entropy_backward``), then the gradient matmuls. The gradients cannot be computed in the
forward: ``grad_weight = sum_i (a_i dCE_i + b_i dH_i)^T h_i`` does not factor out the per-row upstream
gradients ``a_i``, ``b_i``.

``linear_distillation_loss`` runs a student head and a teacher head chunk by chunk: per chunk, both
chunks of logits (student and teacher, whose hidden sizes may differ), then the fused distillation
kernel of the backend (``gpuxent.autograd.distillation_rows``), then the student's gradient matmuls.
Neither (N, r) logits exist.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import autograd, backends
from .autograd import distillation_rows
from .backends import compute_dtype
from .checks import (
    check_bool,
    check_chunk_size,
    check_device,
    distill_denominator,
    mean_scale,
    out,
    prepare_distillation,
    reduce_rows,
    to_tensors,
)
from .linear import (
    CHUNK_BYTES,
    MIN_CHUNK_ROWS,
    ChunkGrads,
    _input_grads,
    _LinearCrossEntropy,
    _Problem,
    _StatsProblem,
    _transformed,
    check_accum_dtype,
    check_linear,
)


class LogProbs(NamedTuple):
    """What :func:`linear_log_probs` returns: per-row ``log_probs`` and ``entropy`` (None unless asked)."""

    log_probs: Any
    entropy: Any


# --------------------------------------------------------------------------- log-probs


class _LinearLogProbs(torch.autograd.Function):
    """Per-row log-probs (and entropies) of the fused linear layer, differentiable for any upstream
    gradients: the forward runs the chunks without gradients, the backward runs them again (as
    ``reduction="none"`` and the linear entropy do)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem, with_entropy):
        ctx.problem, ctx.with_entropy = problem, with_entropy
        ctx.shapes = (hidden.shape, weight.dtype)
        ctx.inputs = (hidden, weight, bias)  # for a differentiated backward
        ctx.set_materialize_grads(False)
        log_probs = problem.run()[0].neg_().add_(0.0)  # -CE; + 0.0 turns the ignored rows' -0.0 into 0
        if with_entropy:
            return log_probs, _kept_entropy(problem)
        return log_probs

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy=None):
        problem = ctx.problem
        hidden_shape, dtype = ctx.shapes
        want = tuple(ctx.needs_input_grad[:3])
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None, None, None
        if torch.is_grad_enabled():  # differentiated again: through the (N, r) logits, in torch ops
            outs = _log_probs_composite(problem, *ctx.inputs)
            wanted = [x for x, need in zip(ctx.inputs, want) if need]
            pairs = [(o, g) for o, g in zip(outs, (grad_log_probs, grad_entropy)) if g is not None and o is not None]
            outs, gos = zip(*pairs)
            grads = iter(torch.autograd.grad(outs, wanted, gos, create_graph=True, allow_unused=True))
            return (*(next(grads) if need else None for need in want), None, None)
        dt = problem.dt
        if grad_log_probs is None:
            row_scale = torch.zeros(problem.n_rows, dtype=dt, device=problem.h.device)
        else:
            row_scale = grad_log_probs.reshape(-1).to(dt).neg()  # d logp / dx = -d CE / dx
        entropy_scale = None if grad_entropy is None else grad_entropy.reshape(-1).to(dt)
        _, grad_h, grad_w, grad_b = problem.run(want, row_scale=row_scale, entropy_scale=entropy_scale)
        return (*_input_grads(grad_h, grad_w, grad_b, hidden_shape, dtype)[:3], None, None)


def _kept_entropy(problem):
    """The forward's per-row entropies, 0 for ignored rows (whatever a backend left there)."""
    return torch.where(problem.t != problem.opts.ignore_index, problem.entropy, 0)


def _log_probs_composite(problem, hidden, weight, bias):
    """``(log_probs, entropy)`` per row through the (N, r) logits and cross-entropy's autograd Function
    (differentiable again, and under the ``torch.func`` transforms); ``entropy`` None unless asked."""
    logits, opts = problem.logits_of(hidden, weight, bias)
    loss_rows, entropy_rows = autograd.cross_entropy_with_entropy(
        logits, problem.t, None, False, opts, problem.backend
    )[:2]
    return -loss_rows, (entropy_rows if isinstance(problem, _StatsProblem) else None)


def linear_log_probs(
    hidden, weight, target, bias=None, *, temperature=1.0, entropy: bool = False, ignore_index: int = -100,
    chunk_size: int | None = None, accum_dtype: torch.dtype | None = None, backend: str | None = None,
) -> LogProbs:  # fmt: skip
    """Per-token log-probabilities (and entropies) of ``softmax((hidden @ weight.T + bias) / temperature)``
    without materialising the (N, r) logits.

    Args:
        hidden: ``(..., d)`` hidden states (the last layer's); leading axes are the rows, and are kept.
        weight: ``(r, d)`` the output layer's weight (``lm_head.weight``), ``hidden``'s dtype.
        target: integer token ids of shape ``hidden.shape[:-1]``; rows equal to ``ignore_index`` get 0.
        bias: ``(r,)`` or None.
        temperature: a number > 0, or a tensor of per-row temperatures (shape ``(N,)`` or the batch
            shape); the sampling temperature of the rollout.
        entropy: also return each row's entropy ``H = lse - sum_j p_j y_j`` of that softmax.
        chunk_size, accum_dtype, backend: as in :func:`gpuxent.linear_cross_entropy`.

    Returns:
        ``LogProbs(log_probs, entropy)``, each of shape ``hidden.shape[:-1]`` in the compute dtype
        (float32 for half inputs), ``entropy`` None unless asked. Both are differentiable in
        ``hidden``, ``weight`` and ``bias`` for any upstream gradients: the backward runs the chunks
        again, one pass over each chunk's logits for both upstream gradients.
    """
    as_numpy = not isinstance(hidden, torch.Tensor)
    h, w, t, b = to_tensors(("bias",), hidden=hidden, weight=weight, target=target, bias=bias)
    want_entropy = check_bool(entropy, "entropy")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"target: expected integer token ids (one per row), got {t.dtype}")
    opts = (ignore_index, "none", 0.0, 0.0, None)
    cls = _StatsProblem if want_entropy else _Problem
    problem = cls(h, w, t, b, None, opts, backend, chunk_size, temperature=temperature, accum_dtype=accum_dtype)
    shape = problem.batch_shape
    if _transformed(h, w, b):
        log_probs, entropy_rows = _log_probs_composite(problem, h, w, b)
        return LogProbs(out(log_probs.reshape(shape), as_numpy),
                        None if entropy_rows is None else out(entropy_rows.reshape(shape), as_numpy))  # fmt: skip
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))
    if needs_grad:
        outs = _LinearLogProbs.apply(h, w, b, problem, want_entropy)
        log_probs, entropy_rows = outs if want_entropy else (outs, None)
    else:
        with torch.no_grad():
            log_probs = problem.run()[0].neg_().add_(0.0)
        entropy_rows = _kept_entropy(problem) if want_entropy else None
    return LogProbs(
        out(log_probs.reshape(shape), as_numpy),
        None if entropy_rows is None else out(entropy_rows.reshape(shape), as_numpy),
    )


# --------------------------------------------------------------------------- distillation between two heads


def _check_head(hidden, weight, bias, who: str):
    """Shape, dtype and device checks of one head (``who``: "student" or "teacher")."""
    check_linear(hidden, weight, bias, names=(f"{who}_hidden", f"{who}_weight", f"{who}_bias"))


def default_distill_chunk_size(n_classes: int, dtype: torch.dtype, hidden_size: int) -> int:
    """Rows per chunk of the distillation loop: its three chunk-sized buffers (student logits, teacher
    logits, the student's gradient) hold about ``CHUNK_BYTES`` (128 MiB) together, and at most
    ``max(MIN_CHUNK_ROWS, hidden_size // 2)`` rows (the student's hidden size), as in ``linear``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, CHUNK_BYTES // max(1, 3 * n_classes * itemsize))
    return min(rows, max(MIN_CHUNK_ROWS, hidden_size // 2))


class _DistillProblem:
    """The checked, flattened arguments of one ``linear_distillation_loss`` call and its chunk loop."""

    def __init__(self, sh, sw, th, tw, target, sb, tb, opts, backend, chunk_size, accum_dtype):
        _check_head(sh, sw, sb, "student")
        _check_head(th, tw, tb, "teacher")
        check_device(sh, th, "teacher_hidden")
        if tuple(th.shape[:-1]) != tuple(sh.shape[:-1]):
            raise ValueError(
                f"teacher_hidden: expected the student's rows {tuple(sh.shape[:-1])} (leading axes), "
                f"got {tuple(th.shape[:-1])}"
            )
        if tw.shape[0] != sw.shape[0]:
            raise ValueError(
                f"teacher_weight: {tw.shape[0]} classes, but student_weight has {sw.shape[0]}; "
                "the heads must share the vocabulary"
            )
        chunk_size = check_chunk_size(chunk_size)
        n_classes = sw.shape[0]
        like = sh.new_empty(n_classes).expand(*sh.shape[:-1], n_classes)  # stride 0: no memory
        p = prepare_distillation(like, like, target, *opts)
        self.opts, self.t = p.opts, p.target
        self.sh, self.sw = sh.detach().reshape(-1, sw.shape[1]), sw.detach()
        self.th, self.tw = th.detach().reshape(-1, tw.shape[1]), tw.detach()
        self.sb = None if sb is None else sb.detach()
        self.tb = None if tb is None else tb.detach()
        self.n_rows = self.sh.shape[0]
        self.batch_shape = sh.shape[:-1]
        self.dtype, self.dt = sh.dtype, compute_dtype(sh.dtype)
        self.acc_dtype = check_accum_dtype(accum_dtype, sh.dtype)
        self.backend = backends.select(sh.device, backend)
        self.chunk_size = chunk_size or default_distill_chunk_size(n_classes, sh.dtype, sw.shape[1])
        self.denom = self.scale = None
        if self.opts.reduction in ("batchmean", "mean"):
            self.denom = distill_denominator(self.t, self.opts, self.n_rows, n_classes, self.dt, sh.device)
            self.scale = mean_scale(self.denom).reshape(1)

    def run(self, want=(False, False, False), row_scale=None):
        """Per-row losses and the student's gradients asked for by ``want`` = (hidden, weight, bias)."""
        n_rows, o = self.n_rows, self.opts
        n_classes = self.sw.shape[0]
        device = self.sh.device
        want_grad = any(want)
        grads = ChunkGrads(self.sh, self.sw, want, self.dt, self.acc_dtype)
        rows = min(self.chunk_size, max(n_rows, 1))
        s_buf = torch.empty((rows, n_classes), dtype=self.dtype, device=device)
        t_buf = torch.empty((rows, n_classes), dtype=self.tw.dtype, device=device)
        cast = None if self.tw.dtype == self.dtype else torch.empty_like(s_buf)
        swt, twt = self.sw.t(), self.tw.t()
        for lo in range(0, n_rows, rows):
            hi = min(lo + rows, n_rows)
            h_c = self.sh[lo:hi]
            s, t = s_buf[: hi - lo], t_buf[: hi - lo]
            if self.sb is None:
                torch.mm(h_c, swt, out=s)
            else:
                torch.addmm(self.sb, h_c, swt, out=s)
            if self.tb is None:
                torch.mm(self.th[lo:hi], twt, out=t)
            else:
                torch.addmm(self.tb, self.th[lo:hi], twt, out=t)
            if cast is not None:  # a teacher of another dtype: its logits in the student's
                t = cast[: hi - lo].copy_(t)
            grad_scale = self.scale
            if row_scale is not None:
                grad_scale = row_scale[lo:hi] if grad_scale is None else row_scale[lo:hi] * grad_scale
            target = None if self.t is None else self.t[lo:hi]
            loss, g = distillation_rows(
                s, t, target, grad_scale, o.divergence, o.beta, o.temperature, o.ignore_index, self.backend, want_grad
            )  # fmt: skip
            grads.loss_rows[lo:hi] = loss
            if want_grad:
                grads.add(lo, hi, g, h_c)
            del loss, g  # before the next chunk's are allocated
        return grads.result()

    def reduce(self, loss_rows):
        reduction = "mean" if self.denom is not None else self.opts.reduction
        return reduce_rows(loss_rows, reduction, self.denom, self.batch_shape)

    @property
    def reduction(self) -> str:
        return self.opts.reduction

    def composite(self, sh, sw, sb):
        """``(loss, None)``: the loss through both (N, r) logits and ``distillation_loss``'s autograd
        (differentiable again); the contract of ``linear._Problem.composite``."""
        from .functional import distillation_loss

        o = self.opts
        student = torch.nn.functional.linear(sh.reshape(self.n_rows, -1), sw, sb)
        teacher = torch.nn.functional.linear(self.th, self.tw, self.tb).to(student.dtype)
        loss = distillation_loss(
            student, teacher, divergence=o.divergence, beta=o.beta, temperature=o.temperature, target=self.t,
            ignore_index=o.ignore_index, reduction=o.reduction, backend=self.backend,
        )  # fmt: skip
        return (loss.reshape(self.batch_shape) if o.reduction == "none" else loss), None


def linear_distillation_loss(
    student_hidden, student_weight, teacher_hidden, teacher_weight, target=None, *, student_bias=None,
    teacher_bias=None, divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
    reduction: str = "batchmean", chunk_size: int | None = None, accum_dtype: torch.dtype | None = None,
    backend: str | None = None,
):  # fmt: skip
    """:func:`gpuxent.distillation_loss` of ``student_hidden @ student_weight.T + student_bias`` against
    ``teacher_hidden @ teacher_weight.T + teacher_bias`` without materialising either (N, r) logits.

    The rows go through in chunks: both heads' logits of a chunk, the backend's fused distillation
    kernel, the student's gradient matmuls. The two hidden sizes may differ (a half-width student);
    the heads share the vocabulary ``r`` and the rows. Gradients flow to the student's hidden, weight
    and bias only. The teacher may have another float dtype (its logits are cast to the student's).

    Args:
        divergence, beta, temperature, ignore_index, reduction: as in :func:`gpuxent.distillation_loss`
            (``target``: integer ids of the batch shape, read only to leave out ``ignore_index`` rows).
        chunk_size: rows per chunk; default: the three chunk buffers (student and teacher logits, the
            gradient) hold about 128 MiB together, of at most ``max(256, d_student // 2)`` rows.
        accum_dtype, backend: as in :func:`gpuxent.linear_cross_entropy`.

    Returns:
        The loss as the input's kind (per row, shape ``student_hidden.shape[:-1]``, for ``"none"``);
        float32 for half inputs.
    """
    as_numpy = not isinstance(student_hidden, torch.Tensor)
    sh, sw, th, tw, sb, tb, t = to_tensors(
        ("student_bias", "teacher_bias", "target"), student_hidden=student_hidden, student_weight=student_weight,
        teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, student_bias=student_bias,
        teacher_bias=teacher_bias, target=target,
    )  # fmt: skip
    opts = (divergence, beta, temperature, ignore_index, reduction)
    problem = _DistillProblem(sh, sw, th, tw, t, sb, tb, opts, backend, chunk_size, accum_dtype)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (sh, sw, sb))
    if _transformed(sh, sw, sb):
        loss = problem.composite(sh, sw, sb)[0]
    elif needs_grad:
        loss = _LinearCrossEntropy.apply(sh, sw, sb, problem)  # the chunked-linear Function, any problem
    else:
        with torch.no_grad():
            loss = problem.reduce(problem.run()[0])
    return out(loss, as_numpy)


__all__ = ["LogProbs", "linear_distillation_loss", "linear_log_probs"]
