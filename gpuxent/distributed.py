"""Vocab-parallel cross-entropy: the classes are split across the ranks of a ``torch.distributed`` group.

Rank k holds a contiguous slice of the classes, ``[offset_k, offset_k + r_k)`` (the slices may differ
in size, even be empty; their order is the ranks' order in the group): the logits of that slice
(:func:`vocab_parallel_cross_entropy`), or the rows of the output layer's weight that make them
(:func:`vocab_parallel_linear_cross_entropy`). The loss over all ``r = sum_k r_k`` classes comes from
one pass of a backend kernel over the local slice and ONE collective of a few numbers per row:

1. ``row_partials`` (one read of the slice) gives per row the slice's max ``m``, ``s = sum exp(y - m)``,
   the target sums ``a = sum w q (y - m)``, ``b = sum w q`` (class targets: only the rank that holds
   the target contributes) and, for label smoothing, ``c = sum w y``;
2. one all-gather (``exchange``) of every rank's ``(m, s, a, b[, c])`` per row and its slice's summed
   class weight; every rank merges the W partials of each row online, in rank order (``merge_max``:
   ``M = max m``, ``S = sum s exp(m - M)``, ``A = sum a + b (m - M)``, ``B = sum b``, ``C = sum c``),
   so that all get the same bits. (An all-reduce cannot merge them in one step: the sums need the
   max first. The all-gather sends the same 16 bytes per row as a MAX then a SUM all-reduce did, in
   one collective: one latency and, on GPUs, one launch instead of two.)
3. ``lse = M + log S``, ``loss = (1 - eps)(B log S - A) + eps / r (W lse - C) + z_loss lse**2`` and the
   gradient coefficient ``coef = (1 - eps) B + eps / r W + 2 z_loss lse``, identical on every rank;
4. the backward's ``cross_entropy_backward`` writes the slice's gradient from ``lse`` and ``coef`` (one
   more read of the slice, one write), with ``grad_output`` and the mean's 1/denominator folded into
   its scale: no communication, rounded once, exact for a per-row ``grad_output``.

Communication per row, forward+backward: 16 bytes (20 with label smoothing) in float32 (twice that for
float64 logits), nothing that grows with r. Before it, the public functions all-gather a 9-number
header per rank per call, which gives the offsets and lets every rank check that the others agree
(bad input on any rank raises on every rank, so none is left waiting in a collective); reading it
back is the only host sync. Callers that know every slice without asking (``gpuxent.dtensor``: a
DTensor's sharding is the same on every rank) skip the header and send their checks as status words
in the one collective (``status_words``, ``check_status``): one collective per forward.

Why the gradient is not computed in the forward (as ``gpuxent.cross_entropy`` does): the forward
needs the global lse, known only after the collective, so a fused forward would store each
``exp(y - m)`` in the gradient buffer and rescale it after it: the backward then reads and writes
without an exp. Measured on 2 CPU cores (``benchmarks/bench_distributed.py``, "stored exp
(prototype)"), see RESULTS.md: it needs a kernel that stores ``exp(y - m)`` while it sums (none of the
backends has one), and the recomputed exponentials here keep the gradient rounded once.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.distributed as dist

from . import backends, linear
from .autograd import (
    _row_scale,
    cross_entropy_backward,
    cross_entropy_backward_,
    cross_entropy_stats_rows,
    row_partials,
)
from .backends import compute_dtype, torch_ops
from .checks import (
    FLOAT_DTYPES,
    check_chunk_size,
    check_float,
    check_options,
    check_target,
    check_temperature,
    denominator,
    mean_scale,
    reduce_rows,
    to_tensors,
)
from .functional import _temperature_logits

# Integer codes of the compute dtypes, exchanged so that the ranks can check that they agree.
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}
# The fields of the all-gathered per-rank header.
_OK, _N_CLASSES, _N_ROWS, _DTYPE, _PROB, _HAS_WEIGHT, _T_MIN, _T_MAX, _T_SUM = range(9)
_HEADER = 9


def _require_initialized(name: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{name}: torch.distributed is not initialized; call torch.distributed.init_process_group first "
            "(or use the single-process function on one process)"
        )


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
    return opts


def _target_facts(target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(3,) int64 on the target's device, without a host sync: the smallest and largest kept class
    index and a cheap fingerprint of the indices (every rank must pass the same ones)."""
    t = target.reshape(-1).long()
    if not t.numel():
        return torch.zeros(3, dtype=torch.int64, device=t.device)
    kept = t != ignore_index
    pos = torch.arange(1, t.numel() + 1, device=t.device) % 1009 + 1
    return torch.stack(
        [
            torch.where(kept, t, torch.iinfo(torch.int64).max).amin(),
            torch.where(kept, t, -1).amax(),
            (torch.where(kept, t + 1, 0) * pos).sum(),  # int64 wraps around
        ]
    )


def _header(device, error, n_classes=0, n_rows=0, dtype=None, prob=False, has_weight=False, target=None,
            ignore_index=-100) -> torch.Tensor:  # fmt: skip
    """This rank's facts for the all-gather, on ``device`` without a host sync; a rank whose checks
    failed sends OK = 0."""
    h = torch.zeros(_HEADER, dtype=torch.int64, device=device)
    if error is not None:
        return h
    h[:_T_MIN] = torch.tensor([1, n_classes, n_rows, _DTYPE_CODES[dtype], int(prob), int(has_weight)])
    if target is not None and not target.dtype.is_floating_point:
        h[_T_MIN:] = _target_facts(target, ignore_index)
    return h


def _exchange_headers(header: torch.Tensor, group) -> torch.Tensor:
    """Every rank's header, (world, 9) on the host: the one host sync of a call."""
    out = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, header, group=group)
    return torch.stack(out).cpu()


def _check_global(headers: torch.Tensor, error: Exception | None, ignore_index, name: str, data: str) -> None:
    """Every rank runs the same checks on the same headers, so they all raise or none does; ``data``
    names the argument that holds the rows and classes."""
    bad = [k for k in range(headers.shape[0]) if headers[k, _OK] == 0]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"{name}: rank(s) {bad} of the group rejected their inputs")
    for field, what in (
        (_N_ROWS, f"{data}: the ranks hold different numbers of rows"),
        (_DTYPE, f"{data}: the ranks hold different dtypes"),
        (_PROB, "target: some ranks pass class indices and others probabilities"),
        (_HAS_WEIGHT, "weight: some ranks pass class weights and others None"),
    ):
        if bool((headers[:, field] != headers[0, field]).any()):
            raise ValueError(f"{what}: {headers[:, field].tolist()}")
    n_classes = int(headers[:, _N_CLASSES].sum())
    if n_classes == 0:
        raise ValueError(f"{data}: the class axis is empty on every rank (r = 0)")
    if not headers[0, _PROB]:
        if bool((headers[:, _T_SUM] != headers[0, _T_SUM]).any()):
            raise ValueError("target: the ranks pass different class indices; every rank must pass the same ones")
        t_min, t_max = int(headers[0, _T_MIN]), int(headers[0, _T_MAX])
        if t_min < 0 or t_max >= n_classes:
            v = t_min if t_min < 0 else t_max
            raise ValueError(
                f"target: class index {v} is outside [0, {n_classes}) and is not ignore_index={ignore_index}"
            )


def _agree(name, data, device, group, error, ignore_index, **facts) -> tuple[int, int]:
    """(this rank's class offset, r) after every rank checked every other's header (see ``_check_global``)."""
    headers = _exchange_headers(_header(device, error, ignore_index=ignore_index, **facts), group)
    _check_global(headers, error, ignore_index, name, data)
    rank = dist.get_rank(group)
    return int(headers[:rank, _N_CLASSES].sum()), int(headers[:, _N_CLASSES].sum())


def _device_of(tensor, group) -> torch.device:
    if isinstance(tensor, torch.Tensor):
        return tensor.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- the combine


def exchange(rows: torch.Tensor, tail: torch.Tensor, group, words: torch.Tensor | None = None):
    """The one collective of a call: every rank's ``(N, k)`` per-row partials, its ``tail`` (a few
    per-call numbers of the same dtype) and its int64 ``words`` (status, fingerprints; None for none)
    in one all-gather into one tensor of ``k N + len(tail) (+ 2 len(words) for float32)`` numbers.

    Returns ``(rows (W, N, k), tail (W, len(tail)), words (W, len(words)) or None)`` in the group's
    rank order, identical on every rank, so that every rank merges them in the same order and gets
    the same bits."""
    n, k = rows.shape
    dt = rows.dtype
    n_words = 0 if words is None else words.numel() * 8 // dt.itemsize  # the int64 words in dt's slots
    n_tail = tail.numel()
    length = n_words + n_tail + n * k
    buf = torch.empty(length, dtype=dt, device=rows.device)
    if n_words:
        buf[:n_words].view(torch.int64).copy_(words)
    buf[n_words : n_words + n_tail] = tail
    buf[n_words + n_tail :].view(n, k).copy_(rows)
    world = dist.get_world_size(group)
    out = torch.empty(world * length, dtype=dt, device=rows.device)
    # all_gather_single: torch >= 2.13's name (all_gather_into_tensor is deprecated there)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, buf, group=group)
    out = out.view(world, length)
    got_words = None
    if n_words:
        got_words = out[:, :n_words].contiguous().view(torch.int64)
    return out[:, n_words + n_tail :].view(world, n, k), out[:, n_words : n_words + n_tail], got_words


def merge_max(m_all: torch.Tensor):
    """``(M, shift)``: each row's max over the ranks' maxima (0 where it is infinite, as torch.logsumexp)
    and each rank's ``m - M`` (-inf on a rank without a finite logit in the row: its s and b are 0)."""
    m = m_all.amax(0)
    m = torch.where(torch.isinf(m), 0, m)
    return m, m_all - m


class _Layout:
    """One call's slice of the classes and options: what the ranks combine the partials with.

    ``words``: None, or a function of nothing that gives this rank's int64 status words for the
    exchange, and ``check_words`` the function every rank runs on every rank's words after it (the
    DTensor path validates its data there: no collective before the one of the call)."""

    def __init__(self, offset, n_local, n_classes, opts, backend, group, words=None, check_words=None):
        self.offset, self.n_local, self.n_classes = offset, n_local, n_classes
        self.opts, self.backend, self.group = opts, backend, group
        self.words, self.check_words = words, check_words

    def gather(self, rows, tail):
        """:func:`exchange` with this call's status words, checked on every rank after it."""
        words = None if self.words is None else self.words()
        rows_all, tail_all, words_all = exchange(rows, tail, self.group, words)
        if self.check_words is not None:
            self.check_words(words_all)
        return rows_all, tail_all

    def combine(self, part, t, is_prob, weight_share, extra=None):
        """``(loss rows, lse, coef, B)`` of every row from this rank's (N, 5) ``part``, in ONE collective:
        each rank sends its rows' ``(m, s, a, b[, c])`` (16 bytes per row in float32, 20 with label
        smoothing) and ``weight_share`` (its slice's summed class weight, a 0-d tensor); every rank
        merges the W partials of each row (``merge_max``: the max of the maxima, then the sums rescaled
        to it) in rank order.

        ``extra``: None, or (N, e) more per-row columns to exchange; then a fifth output ``(g, shift, S)``:
        the gathered (W, N, 4 or 5 + e) rows (``extra``'s columns last), each rank's ``m - M`` and each
        row's ``S``. ``B`` is each row's target weight (the mean's denominator)."""
        eps, z = self.opts.label_smoothing, self.opts.z_loss
        k = 5 if eps > 0 else 4
        rows = part[:, :k]
        if extra is not None:
            rows = torch.cat([rows, extra.to(part.dtype)], 1)
        tail = weight_share.reshape(1).to(part.dtype)
        g, tail_all = self.gather(rows, tail)
        m, shift = merge_max(g[:, :, 0])
        s_all, a_all, b_all = g[:, :, 1], g[:, :, 2], g[:, :, 3]
        sum_s = (s_all * torch.exp(shift)).sum(0)
        a = torch.where(b_all != 0, a_all + b_all * shift, a_all).sum(0)  # relative to M
        b = b_all.sum(0)
        w_total = tail_all[:, 0].sum()
        log_s = torch.log(sum_s)
        lse = m + log_s
        loss = (1 - eps) * (b * log_s - a) + z * lse * lse
        coef = (1 - eps) * b + 2 * z * lse
        if eps > 0:
            eps_r = eps / self.n_classes
            loss = loss + eps_r * (w_total * lse - g[:, :, 4].sum(0))
            coef = coef + eps_r * w_total
        if not is_prob:
            loss = torch.where(t != self.opts.ignore_index, loss, 0)
        if extra is not None:  # every rank's rows, the ranks' m - M and S, for the caller's merge
            return loss, lse, coef, b, (g, shift, sum_s)
        return loss, lse, coef, b

    def weight_share(self, w, like):
        """This rank's part of the summed class weight ``W``: its slice's (r_k without weights)."""
        dt = compute_dtype(like.dtype)
        return torch.full((), float(self.n_local), dtype=dt, device=like.device) if w is None else w.sum()

    def denominator(self, b, is_prob, n_rows, dt):
        """The mean's denominator: the summed target weight of the kept rows (rows for probabilities)."""
        if is_prob:
            return torch.full((), float(n_rows), dtype=dt, device=b.device)
        return b.sum()

    def backward_args(self):
        o = self.opts
        return o.ignore_index, o.label_smoothing, self.n_classes, self.offset, o.softcap, self.backend


# --------------------------------------------------------------------------- vocab_parallel_cross_entropy


class _Problem:
    """One call's flattened tensors and the forward over them."""

    def __init__(self, local_logits, target, weight, opts, layout, inplace):
        self.layout, self.inplace = layout, inplace
        self.shape = local_logits.shape
        self.n_rows = math.prod(local_logits.shape[:-1])
        self.dt = compute_dtype(local_logits.dtype)
        self.is_prob = target.dtype.is_floating_point
        n_local = layout.n_local
        self.t = target.reshape(self.n_rows, n_local) if self.is_prob else target.reshape(-1).long()
        self.w = None if weight is None else weight.detach().to(self.dt).contiguous()
        self.reduction = opts.reduction
        self.x = local_logits.detach().reshape(self.n_rows, n_local)
        if self.x.stride(-1) != 1 and n_local > 1:
            self.x = self.x.contiguous()

    def forward(self):
        """The reduced loss; keeps the rows' lse and coefficient and the mean's 1/denominator."""
        lay, o = self.layout, self.layout.opts
        part = row_partials(self.x, self.t, self.w, o.ignore_index, o.softcap, lay.offset, o.label_smoothing > 0,
                            lay.backend)  # fmt: skip
        loss_rows, self.lse, self.coef, b = lay.combine(part, self.t, self.is_prob, lay.weight_share(self.w, self.x))
        self.denom = self.scale = None
        if self.reduction == "mean":
            self.denom = lay.denominator(b, self.is_prob, self.n_rows, self.dt)
            self.scale = mean_scale(self.denom)
        return reduce_rows(loss_rows, self.reduction, self.denom, self.shape[:-1])

    def grad(self, grad_output):
        """d loss / d local_logits, ``grad_output`` and the mean's scale folded into the kernel's scale;
        written over the logits when ``inplace``."""
        row_scale = _row_scale(grad_output, self.reduction, self.scale, self.n_rows, self.dt)
        args = (self.t, self.w, self.lse, self.coef, None, row_scale, None, *self.layout.backward_args())
        if self.inplace:
            cross_entropy_backward_(self.x, *args)
            return self.x.view(self.shape)
        return cross_entropy_backward(self.x, *args).reshape(self.shape)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_logits, problem):
        ctx.problem = problem
        ctx.save_for_backward(local_logits)  # autograd refuses a backward after an in-place change of them
        # an in-place gradient of a leaf's logits must not become the leaf's .grad, aliasing the leaf
        base = local_logits if local_logits._base is None else local_logits._base
        ctx.copy_grad = problem.inplace and base.is_leaf
        return problem.forward()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        ctx.saved_tensors  # noqa: B018 - the version check
        g = ctx.problem.grad(grad_output)
        return (g.clone() if ctx.copy_grad else g), None


def vocab_parallel_cross_entropy(
    local_logits, target, group=None, weight=None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None, backend: str | None = None,
    inplace_grad: bool = False, temperature=1.0,
):  # fmt: skip
    """Cross-entropy over classes split across the ranks of a ``torch.distributed`` group.

    Rank k passes the logits of its contiguous slice of the classes, ``[offset_k, offset_k + r_k)``
    with ``offset_k = r_0 + ... + r_{k-1}`` in the group's rank order (the slices may differ in
    size, even be empty on some ranks). The result equals ``gpuxent.cross_entropy`` of the logits
    concatenated over the ranks, and is the same on every rank; its gradient (through ``backward()``)
    is each rank's slice of the full gradient. Every rank of the group must call it, with the same
    ``target``, keywords and number of rows. Works with the gloo (CPU) and nccl (CUDA) backends.

    One kernel pass over the local slice and one all-gather of 16-20 bytes per row (float32) in the
    forward, after the per-call header's; the backward is one more kernel pass, without communication
    (see the module docstring).

    Args:
        local_logits: ``(..., r_k)`` float tensor, this rank's slice of the classes.
        target: global class indices in ``[0, r)`` of shape ``local_logits.shape[:-1]``, the same on
            every rank; or probabilities of ``local_logits``' shape: this rank's slice of them (they
            get no gradient).
        group: the process group (default: the world).
        weight: ``(r_k,)`` this rank's slice of the class weights (or None on every rank).
        ignore_index, reduction, label_smoothing, z_loss, softcap, backend: as in
            :func:`gpuxent.cross_entropy`; label smoothing, z-loss and the weighted mean are over the
            global ``r`` classes.
        inplace_grad: the backward writes the gradient over ``local_logits`` (no new (N, r_k) buffer;
            it bumps their version counter, as a torch in-place op). For logits that are not a leaf
            (the output of the layer before); a leaf's gradient is copied, so that it does not alias it.
        temperature: as in :func:`gpuxent.cross_entropy` (a number, or per-row temperatures, the same
            on every rank): the slice enters as ``softcap(x) / temperature``, one scaled copy of it.

    Returns:
        The loss, a 0-d tensor (or per-row values for ``reduction="none"``), float32 for half inputs.

    Bad input on any rank raises ``ValueError``/``TypeError`` on every rank (after one all-gather),
    so that no rank is left waiting in a collective.
    """
    name = "vocab_parallel_cross_entropy"
    _require_initialized(name)
    if not (isinstance(temperature, numbers.Real) and temperature == 1):  # softcap(x) / T, as gx.cross_entropy
        y, cap = _temperature_logits(local_logits, temperature, softcap)
        return vocab_parallel_cross_entropy(
            y, target, group, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, softcap=cap,
            backend=backend, inplace_grad=inplace_grad and y.requires_grad,
        )  # fmt: skip
    error = opts = None
    try:
        opts = _check_local(local_logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
        chosen = backends.select(local_logits.device, backend)
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    facts = {}
    if error is None:
        facts = dict(
            n_classes=local_logits.shape[-1], n_rows=math.prod(local_logits.shape[:-1]), dtype=local_logits.dtype,
            prob=target.dtype.is_floating_point, has_weight=weight is not None, target=target,
        )  # fmt: skip
    device = _device_of(local_logits, group)
    offset, n_classes = _agree(name, "local_logits", device, group, error, ignore_index, **facts)
    layout = _Layout(offset, local_logits.shape[-1], n_classes, opts, chosen, group)
    return run_cross_entropy(local_logits, target, weight, layout, bool(inplace_grad))


def run_cross_entropy(local_logits, target, weight, layout, inplace):
    """The vocab-parallel loss of checked inputs over ``layout`` (offsets known on every rank)."""
    problem = _Problem(local_logits, target, weight, layout.opts, layout, inplace)
    if torch.is_grad_enabled() and local_logits.requires_grad:
        return _VocabParallelCrossEntropy.apply(local_logits, problem)
    with torch.no_grad():
        return problem.forward()


# --------------------------------------------------------------------------- status words (no header)
#
# Callers that know every rank's slice without asking (a DTensor's sharding is the same on every
# rank) skip the header: their data checks travel as int64 words in the call's one collective, and
# every rank checks every rank's words after it, so that all raise or none does.

_W_OK, _W_FACTS = 0, 1  # [ok, t_min, t_max, fingerprint]
N_WORDS = 4


def status_words(device, error, target=None, ignore_index=-100) -> torch.Tensor:
    """This rank's words: OK (0 when its own checks failed), then its class indices' facts (zeros for
    probability targets and None)."""
    words = torch.zeros(N_WORDS, dtype=torch.int64, device=device)
    if error is None:
        words[_W_OK] = 1
        if target is not None and not target.dtype.is_floating_point:
            words[_W_FACTS:] = _target_facts(target, ignore_index)
    return words


def check_status(words_all, error, name: str, n_classes: int, ignore_index: int, class_targets: bool) -> None:
    """Every rank's words, checked alike on every rank (one host read): a failed rank, class indices
    out of ``[0, n_classes)`` or different on some rank raise ``ValueError`` everywhere (the rank at
    fault raises its own error)."""
    w = words_all.cpu()
    bad = [k for k in range(w.shape[0]) if w[k, _W_OK] == 0]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"{name}: rank(s) {bad} of the mesh rejected their inputs")
    if class_targets:
        t_min, t_max = int(w[:, _W_FACTS].min()), int(w[:, _W_FACTS + 1].max())
        if t_min < 0 or t_max >= n_classes:
            v = t_min if t_min < 0 else t_max
            raise ValueError(
                f"target: class index {v} is outside [0, {n_classes}) and is not ignore_index={ignore_index}"
            )
        if bool((w[:, _W_FACTS + 2] != w[0, _W_FACTS + 2]).any()):
            raise ValueError("target: the ranks pass different class indices; every rank must pass the same ones")


def fail_together(error, device, dtype, n_rows, k, group, name, **check) -> None:
    """A rank whose own checks failed still takes part in the call's one collective (zeros of the
    right size), then raises with every other rank."""
    words = status_words(device, error)
    _, _, words_all = exchange(torch.zeros(n_rows, k, dtype=dtype, device=device),
                               torch.zeros(1, dtype=dtype, device=device), group, words)  # fmt: skip
    check_status(words_all, error, name, **check)
    raise error  # not reached: check_status raised


# --------------------------------------------------------------------------- statistics over the slices


class _StatsProblem(_Problem):
    """The vocab-parallel pass of ``cross_entropy_with_stats``: the loss as ``_Problem``'s, plus every
    row's argmax over all the classes (ties: the lowest index), its entropy and, for probability
    targets, the target's argmax, from one more collective-free read of the slice (the statistics
    kernel, with a dummy target so that every row is read) and more columns in the same exchange."""

    def forward_rows(self):
        """``(loss rows, entropy rows)``, each (N,) in the compute dtype; keeps lse, coef, entropy and
        the argmaxes for the statistics and the backward."""
        lay, o, dt, n = self.layout, self.layout.opts, self.dt, self.n_rows
        part = row_partials(self.x, self.t, self.w, o.ignore_index, o.softcap, lay.offset, o.label_smoothing > 0,
                            lay.backend)  # fmt: skip
        inf = torch.full((n,), math.inf, dtype=dt, device=self.x.device)
        if lay.n_local:
            dummy = torch.zeros(n, dtype=torch.int64, device=self.x.device)
            _, lse_k, _, amax, ent_k = cross_entropy_stats_rows(self.x, dummy, None, None, -1, 0.0, 0.0, o.softcap,
                                                                lay.backend, False)  # fmt: skip
            cols = [(amax + lay.offset).to(dt), lse_k - ent_k - part[:, 0]]  # argmax, E[y] - m on this slice
        else:
            cols = [inf, torch.zeros_like(inf)]
        if self.is_prob:  # the target's max and its first index on this slice
            if lay.n_local:
                q_idx = self.t.argmax(-1)
                cols += [self.t.gather(1, q_idx[:, None])[:, 0].to(dt), (q_idx + lay.offset).to(dt)]
            else:
                cols += [torch.full_like(inf, -math.inf), inf]
        loss, self.lse, self.coef, b, (g, shift, sum_s) = lay.combine(
            part, self.t, self.is_prob, lay.weight_share(self.w, self.x), extra=torch.stack(cols, 1)
        )
        k = g.shape[2] - len(cols)  # the extra columns follow the loss's
        m_all = g[:, :, 0]
        on_max = m_all == m_all.amax(0)  # the ranks that hold the row's max (all of them for a row of -inf)
        self.argmax = torch.where(on_max, g[:, :, k], math.inf).amin(0).nan_to_num(0, 0, 0).long()
        omega = g[:, :, 1] * torch.exp(shift) / sum_s  # each rank's share of the softmax's mass
        e_rel = torch.where(omega > 0, omega * (g[:, :, k + 1] + shift), 0).sum(0)  # E_p[y] - M
        self.entropy = torch.log(sum_s) - e_rel
        if self.is_prob:
            q_all = g[:, :, k + 2]
            self.cls = torch.where(q_all == q_all.amax(0), g[:, :, k + 3], math.inf).amin(0)
            self.cls = self.cls.nan_to_num(0, 0, 0).long()
            self.kept = torch.ones(n, dtype=torch.bool, device=self.x.device)
        else:
            self.cls, self.kept = self.t, self.t != o.ignore_index
        self.b = b
        return loss, torch.where(self.kept, self.entropy, 0)

    def grad_rows(self, grad_loss, grad_entropy):
        """d (sum grad_loss * loss + grad_entropy * entropy) / d local_logits: one pass, no collective."""
        lay = self.layout
        grad_loss = torch.zeros_like(self.lse) if grad_loss is None else grad_loss.to(self.dt).contiguous()
        ent = None if grad_entropy is None else self.entropy
        ent_scale = None if grad_entropy is None else grad_entropy.to(self.dt).contiguous()
        g = cross_entropy_backward(self.x, self.t, self.w, self.lse, self.coef, ent, grad_loss, ent_scale,
                                   *lay.backward_args())  # fmt: skip
        return g.reshape(self.shape)


class _VocabParallelStats(torch.autograd.Function):
    """(loss rows, entropy rows) of a slice of the classes, both differentiable; one pass in the backward
    for any pair of upstream gradients."""

    @staticmethod
    def forward(ctx, local_logits, problem):
        ctx.problem = problem
        ctx.save_for_backward(local_logits)
        ctx.set_materialize_grads(False)
        return problem.forward_rows()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_entropy):
        ctx.saved_tensors  # noqa: B018 - the version check
        if grad_loss is None and grad_entropy is None:
            return None, None
        return ctx.problem.grad_rows(grad_loss, grad_entropy), None


def run_stats(local_logits, target, weight, layout):
    """``(loss rows, entropy rows, problem)`` of ``cross_entropy_with_stats`` over ``layout``: the rows
    differentiable (ignored rows 0 in both); ``problem`` holds ``lse``, ``argmax``, ``cls`` (the class
    each argmax is compared with), ``kept`` and ``b`` (each row's target weight) for the reductions."""
    problem = _StatsProblem(local_logits, target, weight, layout.opts, layout, False)
    if torch.is_grad_enabled() and local_logits.requires_grad:
        loss, entropy = _VocabParallelStats.apply(local_logits, problem)
    else:
        with torch.no_grad():
            loss, entropy = problem.forward_rows()
    return loss, entropy, problem


# --------------------------------------------------------------------------- distillation over the slices
#
# Per row, with S = student / tau and T = teacher / tau on this rank's classes: each rank sends its
# (max, sum exp(. - max)) of S and T and, for "kl", u = sum exp(T - mT) (T - S) ("reverse_kl": v = sum
# exp(S - mS) (S - T)); merged as the cross-entropy's partials, KL(p_t || p_s) = U / S_T - lse_T + lse_S
# and KL(p_s || p_t) = V / S_S - lse_S + lse_T: one collective of 20 bytes per row (float32). Any other
# divergence ("jsd") needs both lse first, then a second collective of the slices' sums of its terms
# and of u (``torch_ops.DIVERGENCES``): its gradient is u - p_s sum(u). Written in torch ops on the
# slice (no kernel of the backends reads two sliced rows with a global lse); the backward recomputes
# the probabilities from the saved slices.


def _slice_max_sum(y: torch.Tensor):
    """Per row of the (N, r_k) slice: its max (-inf for an empty slice or a row of -inf) and the sum of
    exp(y - max), and exp(y - max) itself."""
    if y.shape[1] == 0:
        z = y.new_zeros(y.shape[0])
        return z - math.inf, z, y
    m = y.amax(1)
    e = torch.exp(y - torch.where(torch.isinf(m), 0, m)[:, None])
    return m, e.sum(1), e


class _DistillProblem:
    def __init__(self, student, teacher, target, opts, offset, n_classes, group, words=None, check_words=None):
        self.shape = student.shape
        self.n_rows = math.prod(student.shape[:-1])
        self.dt = compute_dtype(student.dtype)
        n_local = student.shape[-1]
        self.x = student.detach().reshape(self.n_rows, n_local)
        self.teacher = teacher.detach().reshape(self.n_rows, n_local)
        self.t = None if target is None else target.reshape(-1).long()
        self.opts, self.group = opts, group
        self.layout = _Layout(offset, n_local, n_classes, None, None, group, words, check_words)

    def scaled(self):
        tau = self.opts.temperature
        return self.x.to(self.dt) / tau, self.teacher.to(self.dt) / tau

    def forward_rows(self):
        """Per-row ``temperature**2 * divergence`` (0 for left-out rows); keeps both lse (and the jsd's K)."""
        o = self.opts
        s, t = self.scaled()
        ms, ss, es = _slice_max_sum(s)
        mt, st, et = _slice_max_sum(t)
        if o.divergence == "kl":
            cross = (et * (t - s)).sum(1) if s.shape[1] else ss
        elif o.divergence == "reverse_kl":
            cross = (es * (s - t)).sum(1) if s.shape[1] else ss
        else:
            cross = torch.zeros_like(ss)
        del es, et
        g, _ = self.layout.gather(torch.stack([ms, ss, mt, st, cross], 1), ss.new_zeros(1))
        big_s, shift_s = merge_max(g[:, :, 0])
        big_t, shift_t = merge_max(g[:, :, 2])
        sum_s = (g[:, :, 1] * torch.exp(shift_s)).sum(0)
        sum_t = (g[:, :, 3] * torch.exp(shift_t)).sum(0)
        self.lse_s, self.lse_t = big_s + torch.log(sum_s), big_t + torch.log(sum_t)
        if o.divergence == "kl":
            u = torch.where(g[:, :, 3] != 0, g[:, :, 4] * torch.exp(shift_t), 0).sum(0)
            rows = u / sum_t - self.lse_t + self.lse_s
        elif o.divergence == "reverse_kl":
            v = torch.where(g[:, :, 1] != 0, g[:, :, 4] * torch.exp(shift_s), 0).sum(0)
            self.mu = v / sum_s
            rows = self.mu - self.lse_s + self.lse_t
        else:  # any other divergence: its terms on the slice (both lse known), summed across the ranks
            term, u = self._terms(s, t)
            terms = torch.stack([term.sum(1), u.sum(1)], 1)
            g2, _, _ = exchange(terms, terms.new_zeros(1), self.group)
            rows, self.k = g2[:, :, 0].sum(0), g2[:, :, 1].sum(0)
        rows = rows * o.temperature**2
        return rows if self.t is None else torch.where(self.t != o.ignore_index, rows, 0)

    def _terms(self, s, t):
        """The divergence's ``(term, u)`` on this slice (``torch_ops.DIVERGENCES``), from the global lse."""
        log_ps, log_pt = s - self.lse_s[:, None], t - self.lse_t[:, None]
        return torch_ops.DIVERGENCES[self.opts.divergence](log_ps, log_pt, self.opts.beta)

    def grad(self, grad_rows):
        """d sum(grad_rows * rows) / d student: ``temperature * grad_row * d divergence / d S`` per row."""
        o = self.opts
        s, t = self.scaled()
        scale = grad_rows.to(self.dt) * o.temperature
        if self.t is not None:
            scale = torch.where(self.t != o.ignore_index, scale, 0)
        ps = torch.exp(s - self.lse_s[:, None])
        if o.divergence == "kl":
            g = ps - torch.exp(t - self.lse_t[:, None])
        elif o.divergence == "reverse_kl":
            g = torch.where(ps > 0, ps * (s - t - self.mu[:, None]), 0)  # 0, not 0 * inf, where p_s = 0
        else:
            g = self._terms(s, t)[1] - ps * self.k[:, None]
        return (g * scale[:, None]).to(self.x.dtype).reshape(self.shape)


class _VocabParallelDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, problem):
        ctx.problem = problem
        ctx.save_for_backward(student)
        return problem.forward_rows()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows):
        ctx.saved_tensors  # noqa: B018 - the version check
        return ctx.problem.grad(grad_rows), None


def run_distillation(student, teacher, target, opts, offset, n_classes, group, words=None, check_words=None):
    """Per-row distillation values (``temperature**2`` times the divergence, 0 for left-out rows) of
    logits whose classes are split across ``group`` (this rank's ``[offset, offset + r_k)``), the
    gradient flowing to ``student`` only."""
    problem = _DistillProblem(student, teacher, target, opts, offset, n_classes, group, words, check_words)
    if torch.is_grad_enabled() and student.requires_grad:
        return _VocabParallelDistillation.apply(student, problem)
    with torch.no_grad():
        return problem.forward_rows()


# --------------------------------------------------------------------------- vocab_parallel_linear_cross_entropy


class _LinearProblem(linear._Problem):
    """``linear._Problem`` (its chunk loop, gradients and autograd Function) over this rank's rows of the
    weight: each chunk's logits are a slice of the classes, reduced with the others' by ``_Layout``;
    the hidden gradient is summed over the ranks."""

    def __init__(self, hidden, weight, target, bias, ce_weight, opts, layout, chunk_size, is_prob,
                 temperature=(None, None), acc_dtype=None):  # fmt: skip
        n_local, d = weight.shape
        self.layout = layout
        self.inv_t, self.inv_rows = temperature  # from checks.check_temperature
        self.acc_dtype = acc_dtype
        self.h = hidden.detach().reshape(-1, d)
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.n_rows = self.h.shape[0]
        self.batch_shape = hidden.shape[:-1]
        self.dtype = hidden.dtype
        self.dt = compute_dtype(hidden.dtype)
        self.opts, self.reduction, self.is_prob = opts, opts.reduction, is_prob
        self.backend = layout.backend
        self.chunk_size = chunk_size or linear.default_chunk_size(max(n_local, 1), hidden.dtype)
        lo, hi = layout.offset, layout.offset + n_local
        # class indices stay global; probabilities (full rows, as ce_weight) are sliced to this rank's classes
        self.t = target.reshape(self.n_rows, -1)[:, lo:hi].to(self.dt) if is_prob else target.reshape(-1).long()
        w_full = None if ce_weight is None else ce_weight.detach().to(self.dt)
        self.w = None if w_full is None else w_full[lo:hi].contiguous()
        self.weight_share = layout.weight_share(self.w, self.h)
        self.denom = self.scale = None
        if self.reduction == "mean":
            self.denom = denominator(self.t, w_full, is_prob, opts.ignore_index, self.n_rows, self.dt)
            self.scale = mean_scale(self.denom).reshape(1)

    def chunk_loss(self, logits, lo, hi, grad_scale, want_grad, softcap=None):
        """As ``linear._Problem.chunk_loss``; ``softcap``: the kernel's where a temperature folds it
        (None: the call's)."""
        lay, o = self.layout, self.opts
        t = self.t[lo:hi]
        cap = o.softcap if softcap is None else softcap
        part = row_partials(logits, t, self.w, o.ignore_index, cap, lay.offset, o.label_smoothing > 0, self.backend)
        loss, lse, coef, _ = lay.combine(part, t, self.is_prob, self.weight_share)
        if want_grad:
            ii, eps, n_classes, offset, _, backend = lay.backward_args()
            cross_entropy_backward_(
                logits, t, self.w, lse, coef, None, grad_scale, None, ii, eps, n_classes, offset, cap, backend
            )
        return loss

    def run(self, want=(False, False, False), row_scale=None):
        loss_rows, grad_h, acc_w, acc_b = super().run(want, row_scale)
        if grad_h is not None:  # every rank's classes contribute to every row: the full gradient everywhere
            summed = grad_h if grad_h.dtype == self.dt else grad_h.to(self.dt)
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.layout.group)
            if summed is not grad_h:
                grad_h.copy_(summed)
        return loss_rows, grad_h, acc_w, acc_b


def vocab_parallel_linear_cross_entropy(
    hidden, weight_shard, target, bias_shard=None, group=None, *, ce_weight=None, ignore_index: int = -100,
    reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0, softcap: float | None = None,
    backend: str | None = None, chunk_size: int | None = None, temperature=1.0, accum_dtype=None,
):  # fmt: skip
    """Cross-entropy of ``hidden @ weight.T + bias`` with the rows of ``weight`` (the classes) split
    across the ranks of a ``torch.distributed`` group, without any rank holding (N, r_local) logits.

    Rank k holds ``weight_shard = weight[offset_k : offset_k + r_k]`` (and ``bias_shard`` likewise),
    in the group's rank order; the slices may differ in size or be empty. ``hidden`` and ``target``
    are the same on every rank. The loss equals :func:`gpuxent.linear_cross_entropy` with the full
    weight, on every rank. Gradients: ``hidden`` gets the full gradient on every rank (one all-reduce of
    (N, d) in the backward's place), ``weight_shard`` and ``bias_shard`` their own slices.

    The rows go through in chunks of ``chunk_size`` as in :func:`gpuxent.linear_cross_entropy`: a
    (chunk, r_k) buffer of logits, one kernel pass, the one all-gather of a few numbers per row, the
    gradient written over the buffer, the three gradient matmuls. For ``reduction="none"`` the
    gradients wait for ``grad_output`` (the backward runs the chunks again).

    Args:
        hidden: ``(..., d)`` float tensor, replicated.
        weight_shard: ``(r_k, d)`` this rank's rows of the output layer's weight, ``hidden``'s dtype.
        target: global class indices of shape ``hidden.shape[:-1]``, or probabilities of shape
            ``hidden.shape[:-1] + (r,)`` (full rows, as ``ce_weight``).
        bias_shard: ``(r_k,)`` or None (on every rank).
        group: the process group (default: the world).
        ce_weight: ``(r,)`` the FULL class weights of the cross-entropy, or None.
        ignore_index, reduction, label_smoothing, z_loss, softcap, backend, chunk_size, temperature,
            accum_dtype: as in :func:`gpuxent.linear_cross_entropy`; smoothing, z-loss and the weighted
            mean over all r classes (the same temperature on every rank).

    Every rank must call it with the same ``requires_grad`` on ``hidden``; bad input on any rank raises
    on every rank.
    """
    name = "vocab_parallel_linear_cross_entropy"
    _require_initialized(name)
    error = opts = None
    facts = {}
    try:
        h, w, t, b, cw = to_tensors(
            ("bias_shard", "ce_weight"), hidden=hidden, weight_shard=weight_shard, target=target, bias_shard=bias_shard,
            ce_weight=ce_weight,
        )  # fmt: skip
        linear.check_linear(h, w, b, names=("hidden", "weight_shard", "bias_shard"), classes="r_local", empty_ok=True)
        opts = check_options(ignore_index, reduction, label_smoothing, z_loss, softcap)
        chunk_size = check_chunk_size(chunk_size)
        temp = check_temperature(temperature, h.shape[:-1], h, compute_dtype(h.dtype))
        acc_dtype = linear.check_accum_dtype(accum_dtype, h.dtype)
        chosen = backends.select(h.device, backend)
        is_prob = t.dtype.is_floating_point
        if t.device != h.device or (cw is not None and cw.device != h.device):
            raise ValueError("target, ce_weight: expected on hidden's device")
        if is_prob:  # the width is checked against r below, on every rank alike
            check_target(t, h.shape[:-1], t.shape[-1] if t.dim() else 0, opts)
        else:
            check_target(t, h.shape[:-1], 0, opts)
        if cw is not None:
            check_float(cw, "ce_weight")
            if cw.dim() != 1:
                raise ValueError(f"ce_weight: expected shape (r,), the full class weights, got {tuple(cw.shape)}")
        widths = (t.shape[-1] if is_prob and t.dim() else -1, -1 if cw is None else cw.shape[0])
        facts = dict(
            n_classes=w.shape[0], n_rows=math.prod(h.shape[:-1]), dtype=h.dtype, prob=is_prob,
            has_weight=cw is not None, target=t,
        )  # fmt: skip
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    offset, n_classes = _agree(name, "weight_shard", _device_of(hidden, group), group, error, ignore_index, **facts)
    for what, width in zip(("target", "ce_weight"), widths):  # the same on every rank: all raise or none
        if width not in (-1, n_classes):
            raise ValueError(f"{what}: expected {n_classes} classes (the sum of the shards' rows), got {width}")
    layout = _Layout(offset, w.shape[0], n_classes, opts, chosen, group)
    problem = _LinearProblem(h, w, t, b, cw, opts, layout, chunk_size, is_prob, temp, acc_dtype)
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))
    if needs_grad:
        return linear._LinearCrossEntropy.apply(h, w, b, problem)
    with torch.no_grad():
        return problem.reduce(problem.run()[0])


__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
