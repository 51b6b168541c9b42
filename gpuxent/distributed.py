"""Vocab-parallel cross-entropy: the classes are split across the ranks of a ``torch.distributed`` group.

Rank k holds the logits of a contiguous slice of the classes, ``[offset_k, offset_k + r_k)`` (the
slices may differ in size; their order is the ranks' order in the group), and the loss over all
``r = sum_k r_k`` classes comes from a few all-reduces of per-row numbers, never of the logits:

* one all-gather of each rank's (r_k, N, dtype, ...) gives the offsets, the global ``r`` and a check
  that the ranks agree (every rank raises on a bad input of any rank, so none is left hanging);
* one all-reduce (MAX) of the row max ``m``;
* one all-reduce (SUM) of a packed (k, N) buffer: the sum of ``exp(y - m)``, the target's logit and
  class weight (only the rank that owns the target contributes), the label-smoothing sums
  ``sum_c w_c y_c`` (or, for probability targets, ``sum_c w_c q'_c`` and ``sum_c w_c q'_c y_c``),
  and the summed class weight.

Bytes moved per rank: O(N) in two collectives, against the N*r/world logits it holds.

With ``lse = m + log(sum_c exp(y_c - m))``, a kept row's loss is
``(1 - eps) w_t (lse - y_t) + eps/r (W lse - sum_c w_c y_c) + z_loss lse**2`` (W = sum_c w_c), as in
``gpuxent.cross_entropy``, and the gradient of each rank's slice is local:
``scale * (coef * softmax_c - eps/r w_c - (1 - eps) w_t [c == t])`` with
``coef = (1 - eps) w_t + eps/r W + 2 z_loss lse``; the backward recomputes the softmax from the saved
logits and the global lse, without any communication.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .backends import compute_dtype
from .checks import FLOAT_DTYPES, check_options, check_target, mean_scale, reduce_rows

# Integer codes of the compute dtypes, exchanged so that the ranks can check that they agree.
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
# The fields of the all-gathered per-rank header.
_OK, _N_CLASSES, _N_ROWS, _DTYPE, _PROB, _HAS_WEIGHT, _T_MIN, _T_MAX, _T_SUM = range(9)
_HEADER = 9


def _check_local(local_logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The checks each rank can do alone; raises ``ValueError``/``TypeError`` naming the argument."""
    if not isinstance(local_logits, torch.Tensor):
        raise TypeError(f"local_logits: expected a torch tensor, got {type(local_logits).__name__}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target: expected a torch tensor, got {type(target).__name__}")
    if local_logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"local_logits: expected a floating tensor, got {local_logits.dtype}")
    if local_logits.dim() == 0:
        raise ValueError("local_logits: expected shape (..., r_local) with the classes on the last axis, got a scalar")
    opts = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
    if target.device != local_logits.device:
        raise ValueError(f"target: on {target.device}, but local_logits is on {local_logits.device}")
    check_target(target, local_logits.shape[:-1], local_logits.shape[-1], opts, "this rank's slice, local_logits'")
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"weight: expected a torch tensor, got {type(weight).__name__}")
        if weight.device != local_logits.device:
            raise ValueError(f"weight: on {weight.device}, but local_logits is on {local_logits.device}")
        if weight.dtype not in FLOAT_DTYPES:
            raise TypeError(f"weight: expected a floating tensor, got {weight.dtype}")
        if weight.shape != (local_logits.shape[-1],):
            raise ValueError(
                f"weight: expected this rank's slice of the class weights, shape ({local_logits.shape[-1]},), "
                f"got {tuple(weight.shape)}"
            )


def _header(local_logits, target, weight, ignore_index, error) -> list[int]:
    """This rank's facts for the all-gather; a rank whose checks failed sends OK = 0."""
    h = [0] * _HEADER
    if error is not None:
        return h
    h[_OK] = 1
    h[_N_CLASSES] = local_logits.shape[-1]
    h[_N_ROWS] = math.prod(local_logits.shape[:-1])
    h[_DTYPE] = _DTYPE_CODES[local_logits.dtype]
    h[_PROB] = int(target.dtype.is_floating_point)
    h[_HAS_WEIGHT] = int(weight is not None)
    if not target.dtype.is_floating_point:
        t = target.reshape(-1).long()
        kept = t != ignore_index
        if bool(kept.any()):
            h[_T_MIN] = int(t[kept].min())
            h[_T_MAX] = int(t[kept].max())
        # A cheap fingerprint of the targets (int64 wraps around): every rank must pass the same ones.
        pos = torch.arange(1, t.numel() + 1, device=t.device) % 1009 + 1
        h[_T_SUM] = int((torch.where(kept, t + 1, 0) * pos).sum())
    return h


def _exchange_headers(header, device, group, world) -> torch.Tensor:
    mine = torch.tensor(header, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out).cpu()


def _check_global(headers: torch.Tensor, error: Exception | None, ignore_index) -> None:
    """Every rank runs the same checks on the same headers, so they all raise or none does."""
    bad = [k for k in range(headers.shape[0]) if headers[k, _OK] == 0]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"vocab_parallel_cross_entropy: rank(s) {bad} of the group rejected their inputs")
    for field, what in (
        (_N_ROWS, "local_logits: the ranks hold different numbers of rows"),
        (_DTYPE, "local_logits: the ranks hold different dtypes"),
        (_PROB, "target: some ranks pass class indices and others probabilities"),
        (_HAS_WEIGHT, "weight: some ranks pass class weights and others None"),
    ):
        if bool((headers[:, field] != headers[0, field]).any()):
            raise ValueError(f"{what}: {headers[:, field].tolist()}")
    n_classes = int(headers[:, _N_CLASSES].sum())
    if n_classes == 0:
        raise ValueError("local_logits: the class axis is empty on every rank (r = 0)")
    if not headers[0, _PROB]:
        if bool((headers[:, _T_SUM] != headers[0, _T_SUM]).any()):
            raise ValueError("target: the ranks pass different class indices; every rank must pass the same ones")
        t_min, t_max = int(headers[0, _T_MIN]), int(headers[0, _T_MAX])
        if t_min < 0 or t_max >= n_classes:
            v = t_min if t_min < 0 else t_max
            raise ValueError(
                f"target: class index {v} is outside [0, {n_classes}) and is not ignore_index={ignore_index}"
            )


# --------------------------------------------------------------------------- the math


class _Problem:
    """One call's flattened tensors and options, and the forward math over them."""

    def __init__(self, local_logits, target, weight, ignore_index, reduction, smoothing, z_loss, softcap, group):
        self.group = group
        self.shape = local_logits.shape
        self.n_local = local_logits.shape[-1]
        self.n_rows = math.prod(local_logits.shape[:-1])
        self.dt = compute_dtype(local_logits.dtype)
        self.is_prob = target.dtype.is_floating_point
        self.t = target.reshape(self.n_rows, self.n_local).to(self.dt) if self.is_prob else target.reshape(-1).long()
        self.w = None if weight is None else weight.detach().to(self.dt)
        self.ignore_index = int(ignore_index)
        self.reduction = reduction
        self.eps = float(smoothing)
        self.z_loss = float(z_loss)
        self.softcap = float(softcap) if softcap else None

    def capped(self, x2d):
        """The (soft-capped) logits in the compute dtype."""
        y = x2d.detach().to(self.dt)
        return self.softcap * torch.tanh(y / self.softcap) if self.softcap else y

    def local_target(self):
        """(owner, index): whether this rank holds row i's target class, and its local index (clamped)."""
        lt = self.t - self.offset
        owner = (self.t != self.ignore_index) & (lt >= 0) & (lt < self.n_local)
        return owner, lt.clamp(0, max(self.n_local - 1, 0))

    def forward(self, x2d):
        """Per-row losses; keeps what the backward needs (global lse, row coefficients) on ``self``."""
        y = self.capped(x2d)
        n_rows, dt, device = y.shape[0], self.dt, y.device
        n_classes = self.n_classes
        if self.n_local:
            m = y.amax(-1)
        else:
            m = torch.full((n_rows,), -math.inf, dtype=dt, device=device)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # rows of +-inf, as torch.logsumexp
        w = self.w
        sums = torch.zeros(4 * n_rows + 1, dtype=dt, device=device)
        col = sums[: 4 * n_rows].view(4, n_rows)
        col[0] = torch.exp(y - m[:, None]).sum(-1)
        if self.is_prob:
            wq = (1 - self.eps) * self.t + self.eps / n_classes
            if w is not None:
                wq = wq * w
            col[1] = wq.sum(-1)
            col[2] = (wq * y).sum(-1)
        else:
            owner, lt = self.local_target()
            if self.n_local:
                col[1] = torch.where(owner, y.gather(1, lt[:, None])[:, 0], 0)
                w_t = torch.ones_like(col[2]) if w is None else w[lt]
                col[2] = torch.where(owner, w_t, 0)
            if self.eps > 0:
                col[3] = y.sum(-1) if w is None else y @ w
            sums[-1] = self.n_local if w is None else w.sum()
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group)
        lse = m + torch.log(col[0])
        if self.is_prob:
            kept = torch.ones(n_rows, dtype=torch.bool, device=device)
            coef = col[1] + 2 * self.z_loss * lse
            loss = col[1] * lse - col[2] + self.z_loss * lse * lse
            self.denom = torch.tensor(float(n_rows), dtype=dt, device=device)
        else:
            kept = self.t != self.ignore_index
            y_t, w_t, sum_wy, sum_w = col[1], col[2], col[3], sums[-1]
            loss = (1 - self.eps) * w_t * (lse - y_t) + self.z_loss * lse * lse
            coef = (1 - self.eps) * w_t + 2 * self.z_loss * lse
            if self.eps > 0:
                loss = loss + self.eps / n_classes * (sum_w * lse - sum_wy)
                coef = coef + self.eps / n_classes * sum_w
            loss = torch.where(kept, loss, 0)
            self.denom = w_t.sum()  # w_t is 0 on ignored rows
            self.w_t = w_t
        self.lse, self.coef, self.kept = lse, coef, kept
        return loss

    def reduce(self, loss_rows):
        return reduce_rows(loss_rows, self.reduction, self.denom, self.shape[:-1])

    def grad(self, x2d, grad_output):
        """d loss / d local_logits (2-D), from the saved logits and the forward's row numbers."""
        y = self.capped(x2d)
        scale = grad_output.detach().to(self.dt)
        scale = scale.reshape(-1) if self.reduction == "none" else scale.reshape(()).expand(y.shape[0])
        if self.reduction == "mean":
            scale = scale * mean_scale(self.denom)
        scale = torch.where(self.kept, scale, 0)
        g = torch.exp(y - self.lse[:, None]) * (scale * self.coef)[:, None]
        eps_r = self.eps / self.n_classes
        if self.is_prob:
            wq = (1 - self.eps) * self.t + eps_r
            if self.w is not None:
                wq = wq * self.w
            g -= wq * scale[:, None]
        else:
            if self.eps > 0:
                w = torch.ones(self.n_local, dtype=self.dt, device=y.device) if self.w is None else self.w
                g -= (eps_r * scale)[:, None] * w
            owner, lt = self.local_target()
            if self.n_local:
                d = torch.where(owner, (1 - self.eps) * self.w_t * scale, 0)
                g.scatter_add_(1, lt[:, None], -d[:, None])
        if self.softcap:
            g *= 1 - (y / self.softcap) ** 2
        return g


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, problem):
        x2d = local_logits.reshape(problem.n_rows, problem.n_local)
        loss = problem.reduce(problem.forward(x2d))
        ctx.problem = problem
        ctx.save_for_backward(local_logits)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (local_logits,) = ctx.saved_tensors
        problem = ctx.problem
        g = problem.grad(local_logits.reshape(problem.n_rows, problem.n_local), grad_output)
        return g.to(local_logits.dtype).reshape(local_logits.shape), None


def vocab_parallel_cross_entropy(
    local_logits,
    target,
    group=None,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
):
    """Cross-entropy over classes split across the ranks of a ``torch.distributed`` group.

    Rank k passes the logits of its contiguous slice of the classes, ``[offset_k, offset_k + r_k)``
    with ``offset_k = r_0 + ... + r_{k-1}`` in the group's rank order (the slices may differ in
    size, even be empty on some ranks). The result equals ``gpuxent.cross_entropy`` of the logits
    concatenated over the ranks, and is the same on every rank; its gradient (through ``backward()``)
    is each rank's slice of the full gradient. Every rank of the group must call it, with the same
    ``target``, keywords and number of rows. Works with the gloo (CPU) and nccl (CUDA) backends.

    Args:
        local_logits: ``(..., r_k)`` float tensor, this rank's slice of the classes.
        target: global class indices in ``[0, r)`` of shape ``local_logits.shape[:-1]``, the same on
            every rank; or probabilities of ``local_logits``' shape: this rank's slice of them (they
            get no gradient).
        group: the process group (default: the world).
        weight: ``(r_k,)`` this rank's slice of the class weights (or None on every rank).
        ignore_index, reduction, label_smoothing, z_loss, softcap: as in :func:`gpuxent.cross_entropy`;
            label smoothing, z-loss and the weighted mean are over the global ``r`` classes.

    Returns:
        The loss, a 0-d tensor (or per-row values for ``reduction="none"``), float32 for half inputs.

    Bad input on any rank raises ``ValueError``/``TypeError`` on every rank (after one all-gather),
    so that no rank is left waiting in a collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "vocab_parallel_cross_entropy: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first (or use gpuxent.cross_entropy on one process)"
        )
    error = None
    try:
        _check_local(local_logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    except (TypeError, ValueError) as exc:
        error = exc
    if isinstance(local_logits, torch.Tensor):
        device = local_logits.device
    elif dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    header = _header(local_logits, target, weight, ignore_index, error)
    headers = _exchange_headers(header, device, group, world)
    _check_global(headers, error, ignore_index)

    problem = _Problem(local_logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, group)
    problem.offset = int(headers[:rank, _N_CLASSES].sum())
    problem.n_classes = int(headers[:, _N_CLASSES].sum())
    if torch.is_grad_enabled() and local_logits.requires_grad:
        return _VocabParallelCrossEntropy.apply(local_logits, problem)
    with torch.no_grad():
        return problem.reduce(problem.forward(local_logits.reshape(problem.n_rows, problem.n_local)))


__all__ = ["vocab_parallel_cross_entropy"]
