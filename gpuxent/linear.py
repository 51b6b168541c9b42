"""Fused linear + cross-entropy: the loss of ``hidden @ weight.T + bias`` without the (N, r) logits.

A language model's last layer maps N hidden states of width d to r classes (the vocabulary). The
logits alone are N*r elements (8192 x 65536 float32 = 2 GiB), and PyTorch's ``F.linear`` +
``F.cross_entropy`` keep several tensors of that size alive at once (logits, log-softmax, their
gradients). Here the rows go through in chunks of ``chunk_size``:

1. ``logits_c = h_c @ W.T + b`` into one reusable (chunk_size, r) buffer (torch matmul);
2. the fused backend kernel reduces the chunk to its per-row losses and writes the chunk's logit
   gradient ``g_c``, already scaled for the reduction, back into the same buffer (in place);
3. ``g_c`` goes straight into the parameter gradients: ``grad_hidden[c] = g_c @ W``,
   ``grad_weight += g_c.T @ h_c``, ``grad_bias += g_c.sum(0)`` (accumulated in ``accum_dtype``: by
   default float32, or float64 for float64 inputs, rounded once to a half parameter's dtype at the
   end; ``accum_dtype=torch.bfloat16`` accumulates half inputs in half, as Liger's default does), and
   the buffer is reused by the next chunk.

A ``temperature`` (one, or one per row) scales the chunk's logits before the kernel, ``softcap(x) / T``
(see :class:`_Problem`), and joins each row's gradient factor as ``1/T``: no pass of its own.

So the extra memory is one chunk of logits plus the gradients of the inputs, whatever N is, and the
work is the same three matmuls as the unfused version plus one fused pass over each chunk.

Like Liger-Kernel's fused linear cross-entropy, the forward computes the gradients when an input
requires grad (the chunk's logits exist only there); the backward only scales them by
``grad_output``. For ``reduction="mean"`` the denominator (the summed class weight of the kept rows)
is computed first, on the device, so each chunk's gradient is scaled right away.

``reduction="none"`` is the exception: its ``grad_output`` is a vector, and ``grad_weight =
sum_i grad_output_i g_i^T h_i`` does not factor out of the sum. So its forward stores nothing and
computes the losses only; the backward runs the chunks again (one more matmul per chunk) and scales
each row of ``g_c`` by ``grad_output`` before the gradient matmuls. Every ``grad_output`` is then
exact, uniform or not.
"""

from __future__ import annotations

import torch

from . import autograd, backends
from .autograd import (
    cross_entropy_backward_,
    cross_entropy_rows,
    cross_entropy_rows_,
    cross_entropy_stats_rows,
    cross_entropy_stats_rows_,
    scale_grad,
    stats_coef,
)
from .backends import compute_dtype
from .checks import (
    FLOAT_DTYPES,
    check_bool,
    check_chunk_size,
    check_class_weight,
    check_device,
    check_float,
    check_temperature,
    denominator,
    mean_scale,
    out,
    prepare_cross_entropy,
    reduce_rows,
    row_statistics,
    to_tensors,
)
from .functional import CrossEntropyOutput, cross_entropy_with_stats

# A chunk of logits of about this many bytes: large enough for efficient matmuls, small next to the
# (N, r) logits it replaces.
CHUNK_BYTES = 128 * 2**20
# ... and, given the hidden size d, no more than max(MIN_CHUNK_ROWS, d / 2) rows: the chunk of logits then
# stays within about half the weight's gradient, which the call holds anyway (at d = 512, r = 32768:
# 256 rows, 32 MiB instead of 128), at the cost of a few percent of matmul speed; below
# ``MIN_CHUNK_ROWS`` rows the matmuls lose much more (measured in benchmarks/bench_post_training.py).
MIN_CHUNK_ROWS = 256
# The block of classes whose weight gradient a half chunk adds at a time to a float32 accumulator: the
# half matmul's temporary is (block, d), not (r, d).
ACC_BLOCK_BYTES = 8 * 2**20


def default_chunk_size(n_classes: int, dtype: torch.dtype, hidden_size: int | None = None) -> int:
    """Rows per chunk: a chunk of logits of at most about ``CHUNK_BYTES`` (128 MiB) and, given the hidden
    size, of at most ``max(MIN_CHUNK_ROWS, hidden_size // 2)`` rows."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = max(1, CHUNK_BYTES // max(1, n_classes * itemsize))
    if hidden_size is not None:
        rows = min(rows, max(MIN_CHUNK_ROWS, hidden_size // 2))
    return rows


class ChunkGrads:
    """The per-row losses and the gradients of (hidden, weight, bias) that ``want`` asks for, filled
    chunk by chunk: :meth:`add` takes a chunk's logit gradient ``g``. The weight's and bias's sums
    run in ``acc`` (see ``check_accum_dtype``)."""

    def __init__(self, h, weight, want, dt, acc):
        n_classes, d = weight.shape
        self.weight, self.want, self.dt = weight, want, dt
        self.loss_rows = torch.empty(h.shape[0], dtype=dt, device=h.device)
        self.grad_h = torch.empty_like(h) if want[0] else None
        self.acc_w = torch.zeros((n_classes, d), dtype=acc, device=h.device) if want[1] else None
        self.acc_b = torch.zeros(n_classes, dtype=acc, device=h.device) if want[2] else None

    def add(self, lo: int, hi: int, g: torch.Tensor, h_c: torch.Tensor) -> None:
        """Rows ``[lo, hi)``: ``g`` (their logits' gradient) and ``h_c`` (their hidden rows)."""
        if self.want[0]:
            torch.mm(g, self.weight, out=self.grad_h[lo:hi])
        if self.want[1]:
            self.add_weight(g, h_c)
        if self.want[2]:
            self.acc_b += g.sum(0, dtype=self.dt)  # within the chunk in the compute dtype, across chunks in acc

    def add_weight(self, g: torch.Tensor, h_c: torch.Tensor) -> None:
        """``acc_w += g.T @ h_c``: one ``addmm_`` where the dtypes agree; else (half chunks into a float32
        accumulator) the half matmul, as autograd would do it, block of classes by block, each block added
        in the accumulator's dtype, so the temporary is a block of the gradient, not all of it."""
        acc_w = self.acc_w
        if g.dtype == acc_w.dtype:
            acc_w.addmm_(g.t(), h_c)
            return
        n_classes, d = acc_w.shape
        block = max(1, ACC_BLOCK_BYTES // max(1, d * g.element_size()))
        for lo in range(0, n_classes, block):
            acc_w[lo : lo + block] += torch.mm(g[:, lo : lo + block].t(), h_c)

    def result(self):
        return self.loss_rows, self.grad_h, self.acc_w, self.acc_b


# --------------------------------------------------------------------------- checks


def check_linear(hidden, weight, bias, names=("hidden", "weight", "bias"), classes="r", empty_ok=False) -> None:
    """Shape, dtype and device checks of ``hidden @ weight.T + bias``, the three called ``names`` and the
    class axis ``classes`` in the messages; ``empty_ok``: the class axis may be empty (a rank's
    ``weight_shard`` of ``r_local`` rows)."""
    hn, wn, bn = names
    check_float(hidden, hn)
    check_float(weight, wn)
    if hidden.dim() == 0:
        raise ValueError(f"{hn}: expected shape (..., d) with the features on the last axis, got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"{wn}: expected shape ({classes}, d) (classes x features), got {tuple(weight.shape)}")
    n_classes, d = weight.shape
    if n_classes == 0 and not empty_ok:
        raise ValueError(f"{wn}: the class axis is empty ({classes} = 0)")
    if hidden.shape[-1] != d:
        raise ValueError(
            f"{hn}: last axis has {hidden.shape[-1]} features but {wn} has shape {tuple(weight.shape)} "
            f"({classes}, d); expected {hn} of shape (..., {d})"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{wn}: dtype {weight.dtype} differs from {hn}'s {hidden.dtype}; use one dtype")
    check_device(hidden, weight, wn)
    if bias is not None:
        check_device(hidden, bias, bn)
        check_float(bias, bn)
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{bn}: dtype {bias.dtype} differs from {hn}'s {hidden.dtype}; use one dtype")
        if bias.shape != (n_classes,):
            raise ValueError(f"{bn}: expected shape ({n_classes},), one bias per class, got {tuple(bias.shape)}")


def _check_linear(hidden, weight, bias, ce_weight):
    """:func:`check_linear` and the class weights; the target and the CE keywords
    are checked by ``prepare_cross_entropy``."""
    check_linear(hidden, weight, bias)
    check_class_weight(hidden, ce_weight, weight.shape[0], "ce_weight")


def check_accum_dtype(accum_dtype, dtype: torch.dtype) -> torch.dtype:
    """The dtype the parameter gradients accumulate in across chunks: ``accum_dtype``, or by default the
    compute dtype (float32 for half inputs, then rounded once to the parameter's dtype)."""
    if accum_dtype is None:
        return compute_dtype(dtype)
    if not isinstance(accum_dtype, torch.dtype) or accum_dtype not in FLOAT_DTYPES:
        raise TypeError(
            "accum_dtype: expected None or a floating torch dtype (torch.float32, torch.bfloat16, ...), "
            f"got {accum_dtype!r}"
        )
    return accum_dtype


# --------------------------------------------------------------------------- the chunked core


class _Problem:
    """The checked, flattened arguments of one call, and the chunk loop over them.

    Temperature: the kernel sees ``y = softcap(x) / T``. For one temperature the chunk's matmul writes
    ``x / T`` directly (its ``alpha``, one rounding) and the kernel's softcap is ``softcap / T``, since
    ``c tanh(x / c) / T = (c / T) tanh((x / T) / (c / T))``; per-row temperatures scale the rows after the
    matmul, and with a softcap (a scalar in the kernels) the chunk is soft-capped in torch first, keeping
    ``1 - tanh**2`` for the gradient. The kernel's gradient is then ``d loss / d y``; ``1/T`` joins every
    row's ``grad_scale`` (and ``entropy_scale``), so the gradient written over the chunk is ``d loss / d x``.
    """

    # Defaults for subclasses that set their own attributes (``distributed._LinearProblem``).
    inv_t = None  # 1/T of one temperature, None for T = 1
    inv_rows = None  # (N,) per-row 1/T, or None
    acc_dtype = None  # the dtype of the gradient accumulators (None: the compute dtype)

    def __init__(self, hidden, weight, target, bias, ce_weight, opts, backend, chunk_size, temperature=1.0,
                 accum_dtype=None):  # fmt: skip
        _check_linear(hidden, weight, bias, ce_weight)
        chunk_size = check_chunk_size(chunk_size)
        n_classes, d = weight.shape
        # A stand-in for the logits that costs no memory (stride 0 over the rows): it lets
        # ``prepare_cross_entropy`` check the CE keywords and the targets exactly as ``cross_entropy`` does.
        logits_like = hidden.new_empty(n_classes).expand(*hidden.shape[:-1], n_classes)
        p = prepare_cross_entropy(logits_like, target, ce_weight, *opts)
        self.h = hidden.detach().reshape(-1, d)
        self.weight = weight.detach()
        self.bias = None if bias is None else bias.detach()
        self.t, self.w, self.is_prob, self.opts = p.target, p.weight, p.is_prob, p.opts
        self.n_rows = self.h.shape[0]
        self.batch_shape = hidden.shape[:-1]
        self.dtype = hidden.dtype
        self.dt = compute_dtype(hidden.dtype)
        self.inv_t, self.inv_rows = check_temperature(temperature, self.batch_shape, hidden, self.dt)
        self.acc_dtype = check_accum_dtype(accum_dtype, hidden.dtype)
        self.reduction = p.opts.reduction
        self.backend = backends.select(self.h.device, backend)
        self.chunk_size = chunk_size or default_chunk_size(n_classes, hidden.dtype, d)
        self.denom = self.scale = None
        if self.reduction == "mean":
            self.denom = denominator(self.t, self.w, self.is_prob, p.opts.ignore_index, self.n_rows, self.dt)
            self.scale = mean_scale(self.denom).reshape(1)

    # ------------------------------------------------------------------ one chunk

    def chunk_buffers(self, rows):
        """The compute-dtype buffers of per-row temperatures: ``(y, f)``, the scaled logits the kernel
        reads (half inputs, or a softcap) and ``1 - tanh**2`` of a softcap, each None where not needed."""
        if self.inv_rows is None:
            return None, None
        cap = self.opts.softcap
        shape, kw = (rows, self.weight.shape[0]), dict(dtype=self.dt, device=self.h.device)
        y = torch.empty(shape, **kw) if cap or self.dtype != self.dt else None
        return y, (torch.empty(shape, **kw) if cap else None)

    def chunk_logits(self, h_c, logits, lo, hi, bufs):
        """Write the chunk's logits into ``logits`` and return ``(x, softcap, factor)``: the logits as the
        kernel is to read them (``logits``, or a compute-dtype buffer for per-row temperatures of half
        inputs, whose scaled logits are not rounded to half again), the softcap the kernel applies, and
        the factor its gradient still needs (None, or ``1 - tanh**2`` of a softcap applied here)."""
        wt = self.weight.t()
        cap = self.opts.softcap
        inv = self.inv_t
        if self.inv_rows is None and inv is not None:  # one temperature: 1/T in the matmul's alpha
            if self.bias is None:
                logits.addmm_(h_c, wt, beta=0, alpha=inv)  # beta=0: the buffer's old contents are not read
            else:
                torch.addmm(self.bias, h_c, wt, beta=inv, alpha=inv, out=logits)
            return logits, cap * inv, None
        if self.bias is None:
            torch.mm(h_c, wt, out=logits)
        else:
            torch.addmm(self.bias, h_c, wt, out=logits)
        if self.inv_rows is None:
            return logits, cap, None
        inv_c = self.inv_rows[lo:hi, None]
        y_buf, f_buf = bufs
        if y_buf is None:  # float32/float64 without a softcap: in place
            return logits.mul_(inv_c), 0.0, None
        y = y_buf[: hi - lo]
        if not cap:
            return torch.mul(logits, inv_c, out=y), 0.0, None
        f = f_buf[: hi - lo]
        torch.div(logits, cap, out=f).tanh_()
        torch.mul(f, inv_c * cap, out=y)  # softcap(x) / T
        return y, 0.0, f.mul_(f).neg_().add_(1)  # d softcap(x) / dx = 1 - tanh**2

    def grad_scale(self, lo, hi, row_scale=None):
        """The factor of rows ``[lo, hi)``'s gradients: 1/denominator for a mean, times 1/T, times
        ``row_scale``; None (1), or a tensor of 1 or ``hi - lo`` elements."""
        f = self.scale
        if self.inv_rows is not None:
            f = self.inv_rows[lo:hi] if f is None else self.inv_rows[lo:hi] * f
        elif self.inv_t is not None:
            f = torch.full((1,), self.inv_t, dtype=self.dt, device=self.h.device) if f is None else f * self.inv_t
        if row_scale is not None:
            f = row_scale[lo:hi] if f is None else row_scale[lo:hi] * f
        return f

    def run(self, want=(False, False, False), row_scale=None, entropy_scale=None):
        """Per-row losses, and the gradients asked for by ``want`` = (hidden, weight, bias).

        The logit gradient of each chunk is scaled by 1/denominator for a mean, by 1/T, and row by row by
        ``row_scale`` (a (N,) tensor) when given; ``entropy_scale`` (N,): see :class:`_StatsProblem`.
        The weight's and bias's gradients accumulate across chunks in ``acc_dtype``.
        """
        n_rows, dt = self.n_rows, self.dt
        want_grad = any(want)
        grads = ChunkGrads(self.h, self.weight, want, dt, self.acc_dtype or dt)
        loss_rows = grads.loss_rows
        rows = min(self.chunk_size, max(n_rows, 1))
        buf = torch.empty((rows, self.weight.shape[0]), dtype=self.dtype, device=self.h.device)
        bufs = self.chunk_buffers(rows)
        inv_rows = self.inv_rows
        # the chunk's kernel: chunk_op's op called here (its Python body when eager: public function,
        # run, op, backend), unless a subclass has its own chunk_loss
        direct = type(self).chunk_loss is _Problem.chunk_loss
        eager = not torch.compiler.is_compiling()
        for lo in range(0, n_rows, rows):
            hi = min(lo + rows, n_rows)
            h_c = self.h[lo:hi]
            logits = buf[: hi - lo]
            x, cap, factor = self.chunk_logits(h_c, logits, lo, hi, bufs)
            # the chunk's gradient is written over its logits, scaled per row
            grad_scale = self.grad_scale(lo, hi, row_scale)
            kw = {}
            if entropy_scale is not None:  # d H / dx = (1/T) d H / dy, as the loss's
                es = entropy_scale[lo:hi]
                kw["entropy_scale"] = (
                    es if inv_rows is None and self.inv_t is None
                    else es * (inv_rows[lo:hi] if inv_rows is not None else self.inv_t)
                )  # fmt: skip
            if direct:
                op, args = self.chunk_op(x, lo, hi, grad_scale, want_grad, cap, kw.get("entropy_scale"))
                if eager:
                    outs = op.impl(*args)
                    for i in op.mutated:  # as the dispatcher would (RegisteredOp)
                        torch.autograd.graph.increment_version(args[i])
                else:
                    outs = op(*args)
                loss_rows[lo:hi] = self.chunk_result(lo, hi, op, outs)
            else:
                if cap != self.opts.softcap:
                    kw["softcap"] = cap
                loss_rows[lo:hi] = self.chunk_loss(x, lo, hi, grad_scale, want_grad, **kw)
            if not want_grad:
                continue
            if factor is not None:
                x.mul_(factor)
            if x is not logits:  # the gradient, rounded once to the inputs' dtype for the matmuls
                logits.copy_(x)
            grads.add(lo, hi, logits, h_c)
        return grads.result()

    def chunk_op(self, logits, lo, hi, grad_scale, want_grad, softcap, entropy_scale=None):
        """``(op, args)``: the registered op of rows ``[lo, hi)``'s kernel call and its arguments (``run``
        calls it; ``chunk_result`` reads what it returns). With ``want_grad`` the rows' gradient, times
        ``grad_scale``, is written over ``logits``; ``softcap``: the kernel's."""
        opts = self.opts
        args = (opts.ignore_index, opts.label_smoothing, opts.z_loss, softcap, self.backend)
        if not want_grad:
            return cross_entropy_rows, (logits, self.t[lo:hi], self.w, None, *args, False)
        return cross_entropy_rows_, (logits, self.t[lo:hi], self.w, grad_scale, *args)

    def chunk_result(self, lo, hi, op, outs):
        """The per-row losses of rows ``[lo, hi)`` from what ``op`` (of :meth:`chunk_op`) returned."""
        return outs[0]

    def chunk_loss(self, logits, lo, hi, grad_scale, want_grad, entropy_scale=None, softcap=None):
        """Per-row losses of rows ``[lo, hi)`` from their logits; with ``want_grad`` their gradient,
        times ``grad_scale``, is written over ``logits``. ``softcap``: the kernel's (None: the call's).
        A subclass may replace it (``run`` then calls it for every chunk); the base's is
        :meth:`chunk_op` then :meth:`chunk_result`, which ``run`` calls itself."""
        cap = self.opts.softcap if softcap is None else softcap
        op, args = self.chunk_op(logits, lo, hi, grad_scale, want_grad, cap, entropy_scale)
        return self.chunk_result(lo, hi, op, op(*args))

    def reduce(self, loss_rows):
        return reduce_rows(loss_rows, self.reduction, self.denom, self.batch_shape)

    # ------------------------------------------------------------------ through the (N, r) logits

    def logits_of(self, hidden, weight, bias):
        """The (N, r) logits as the kernel sees them, in torch ops (differentiable to any order), and the
        options that go with them: ``softcap(x) / T``, the softcap folded in where there is a temperature."""
        x = torch.nn.functional.linear(hidden.reshape(self.n_rows, -1), weight, bias)
        if self.inv_t is None and self.inv_rows is None:
            return x, self.opts
        cap = self.opts.softcap
        y = x.to(self.dt)
        if cap:
            y = cap * torch.tanh(y / cap)
        y = y * (self.inv_t if self.inv_rows is None else self.inv_rows[:, None])
        return y, self.opts._replace(softcap=0.0)

    def composite(self, hidden, weight, bias):
        """``(loss, None)``, the reduced loss through the (N, r) logits and cross-entropy's autograd Function
        (differentiable again, and under every ``torch.func`` transform)."""
        logits, opts = self.logits_of(hidden, weight, bias)
        loss = autograd.cross_entropy(logits, self.t, self.w, self.is_prob, opts, self.backend, True, False)[0]
        return (loss.reshape(self.batch_shape) if self.reduction == "none" else loss), None


def _transformed(*tensors) -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) or forward-mode AD holds one of
    ``tensors``: then the loss goes through the (N, r) logits and ``cross_entropy``'s autograd, whose
    formulas those transforms differentiate (the chunked path computes its gradients in the forward)."""
    from torch.autograd import forward_ad

    if torch.compiler.is_compiling():  # the transforms and forward AD are eager-only
        return False
    functorch = torch._C._functorch
    for t in tensors:
        if t is None:
            continue
        if functorch.is_functorch_wrapped_tensor(t):
            return True
        if forward_ad._current_level >= 0 and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def _regrad(outputs, inputs, grad_outputs, needs):
    """The backward of a fused linear Function when it is itself differentiated (``create_graph=True``):
    the gradients of ``outputs`` (recomputed from the (N, r) logits through cross-entropy's autograd,
    which differentiates again) with respect to the ``inputs`` that need one."""
    wanted = [x for x, need in zip(inputs, needs) if need]
    outs, gos = zip(*[(o, g) for o, g in zip(outputs, grad_outputs) if g is not None])
    grads = iter(torch.autograd.grad(outs, wanted, gos, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in needs) + (None,)


def _input_grads(grad_h, grad_w, grad_b, hidden_shape, dtype):
    """The backward's return: ``hidden``'s gradient in its shape, the weight's and bias's in their dtype."""
    grad_h = None if grad_h is None else grad_h.reshape(hidden_shape)
    grad_w = None if grad_w is None else grad_w.to(dtype)
    grad_b = None if grad_b is None else grad_b.to(dtype)
    return grad_h, grad_w, grad_b, None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, problem, ran=None):
        """``ran``: what ``problem.run`` returned, run by the caller (:func:`_eager_apply`), or None: run here."""
        want = tuple(ctx.needs_input_grad[:3])
        ctx.problem = problem
        ctx.shapes = (hidden.shape, weight.dtype)
        ctx.inputs = (hidden, weight, bias)  # for a differentiated backward (their storage is the caller's)
        if problem.reduction == "none":  # grads recomputed in backward, scaled row by row
            loss_rows = (problem.run() if ran is None else ran)[0]
            ctx.save_for_backward(hidden, weight, bias)
        else:
            loss_rows, grad_h, grad_w, grad_b = problem.run(want) if ran is None else ran
            ctx.save_for_backward(grad_h, grad_w, grad_b)
        return problem.reduce(loss_rows)

    @staticmethod
    def backward(ctx, grad_output):
        problem = ctx.problem
        hidden_shape, dtype = ctx.shapes
        want = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # differentiated again: through the logits
            return (*_regrad((problem.composite(*ctx.inputs)[0],), ctx.inputs, (grad_output,), want), None)
        if problem.reduction == "none":
            row_scale = grad_output.reshape(-1).to(problem.dt)
            _, grad_h, grad_w, grad_b = problem.run(want, row_scale=row_scale)
        else:
            grad_h, grad_w, grad_b = (None if g is None else scale_grad(g, grad_output) for g in ctx.saved_tensors)
        return (*_input_grads(grad_h, grad_w, grad_b, hidden_shape, dtype), None)


def _eager_apply(fn):
    """``fn.apply`` less its Python part (functorch checks, argument binding) when the call is eager (no
    torch.compile, no ``torch.func`` transform), whose caller then runs the chunks itself, before the
    Function, and hands it what ``problem.run`` returned (``ran``): public function, ``run``, op,
    backend. None otherwise: ``fn.apply(h, w, b, problem)``, which runs them in its forward."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, fn)


def _route(problem, h, w, b):
    """``(want, finish)`` of a linear cross-entropy: the caller runs ``problem.run(*want)`` under no_grad
    (unless ``want`` is None) and ``finish`` turns what it returned into the loss.

    - No gradient: all chunks, then the reduction.
    - Eager with a gradient: the chunks with the gradients the inputs need (``ctx.needs_input_grad``
      of an eager call; none for ``reduction="none"``, whose backward runs them again), then the
      Function less its Python part (:func:`_eager_apply`).
    - Otherwise (torch.compile, ``torch.func``): nothing; ``fn.apply`` runs them in its forward.
    """
    if not (torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))):
        return (), lambda ran: problem.reduce(ran[0])
    apply = _eager_apply(_LinearCrossEntropy)
    if apply is None:
        return None, lambda ran: _LinearCrossEntropy.apply(h, w, b, problem)
    needs = (h.requires_grad, w.requires_grad, b is not None and b.requires_grad)
    return (() if problem.reduction == "none" else (needs,)), lambda ran: apply(h, w, b, problem, ran)


def linear_cross_entropy(
    hidden, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, *, ce_weight=None, z_loss: float = 0.0, softcap: float | None = None,
    backend: str | None = None, chunk_size: int | None = None, temperature=1.0,
    accum_dtype: torch.dtype | None = None,
):  # fmt: skip
    """Cross-entropy of ``hidden @ weight.T + bias`` without materialising the (N, r) logits.

    Equals ``cross_entropy(F.linear(hidden, weight, bias), target, ...)`` in loss and in the
    gradients of ``hidden``, ``weight`` and ``bias``, while holding only ``chunk_size`` rows of
    logits at a time.

    Args:
        hidden: ``(..., d)`` float array or tensor; leading axes are flattened into N rows.
        weight: ``(r, d)`` the linear layer's weight (as in ``torch.nn.Linear``), same dtype as ``hidden``.
        target: class indices of shape ``hidden.shape[:-1]`` (integers), or probabilities of shape
            ``hidden.shape[:-1] + (r,)`` (floats; they get no gradient).
        bias: ``(r,)`` or None.
        ignore_index, reduction, label_smoothing, z_loss, softcap, backend: as in
            :func:`gpuxent.cross_entropy`.
        ce_weight: ``(r,)`` class weights of the cross-entropy (``cross_entropy``'s ``weight``;
            renamed because ``weight`` is the linear layer's here). A mean divides by the summed
            weight of the kept rows.
        chunk_size: rows per chunk; default: a chunk of logits of at most about 128 MiB and of at most
            ``max(256, d // 2)`` rows.
        temperature: a number > 0, or a tensor of N per-row temperatures (shape ``(N,)`` or
            ``hidden.shape[:-1]``): the logits enter as ``softcap(x) / temperature``; the loss and every
            statistic are of those; the gradient flows to ``hidden``, ``weight`` and ``bias`` only.
        accum_dtype: the dtype the gradients of ``weight`` and ``bias`` accumulate in across chunks;
            None: float32 for half inputs (rounded once to the parameter's dtype at the end), the
            input's dtype otherwise; ``torch.bfloat16`` keeps half inputs' gradients in half throughout.

    Returns:
        The loss as the input's kind: a 0-d tensor / numpy scalar, or per-row values of shape
        ``hidden.shape[:-1]`` for ``reduction="none"``; float32 for half inputs.

    Memory: one ``(chunk_size, r)`` buffer of logits, which receives their gradient in place, besides
    the gradients themselves. When ``hidden``, ``weight`` or ``bias`` requires grad, the
    forward computes their gradients (the backward only scales them), except for ``reduction="none"``,
    whose backward runs the chunks again to weight each row by its ``grad_output``.
    """
    as_numpy = not isinstance(hidden, torch.Tensor)
    h, w, t, b, cw = to_tensors(
        ("bias", "ce_weight"), hidden=hidden, weight=weight, target=target, bias=bias, ce_weight=ce_weight
    )
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    problem = _Problem(h, w, t, b, cw, opts, backend, chunk_size, temperature=temperature, accum_dtype=accum_dtype)
    if _transformed(h, w, b):
        return out(problem.composite(h, w, b)[0], as_numpy)
    want, finish = _route(problem, h, w, b)
    with torch.no_grad():
        ran = None if want is None else problem.run(*want)
    return out(finish(ran), as_numpy)


# --------------------------------------------------------------------------- statistics


class _StatsProblem(_Problem):
    """A :class:`_Problem` whose chunks go through the kernel with statistics: each row's lse, argmax
    and entropy land in ``lse``, ``argmax`` and ``entropy``. With ``entropy_scale`` set (the backward of
    a differentiable entropy), a chunk's logit gradient is ``cross_entropy_backward`` instead,
    ``grad_scale_i dCE_i + entropy_scale_i dH_i``, written over its logits in one pass."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.lse = torch.empty(self.n_rows, dtype=self.dt, device=self.h.device)
        self.argmax = torch.empty(self.n_rows, dtype=torch.int64, device=self.h.device)
        self.entropy = torch.empty(self.n_rows, dtype=self.dt, device=self.h.device)

    def chunk_op(self, logits, lo, hi, grad_scale, want_grad, softcap, entropy_scale=None):
        opts, t = self.opts, self.t[lo:hi]
        args = (opts.ignore_index, opts.label_smoothing, opts.z_loss, softcap, self.backend)
        if want_grad and entropy_scale is not None:  # the backward of loss and entropy: no loss rows
            lse = self.lse[lo:hi]
            coef = stats_coef(t, self.w, self.is_prob, opts, lse, logits.shape[1])
            return cross_entropy_backward_, (
                logits, t, self.w, lse, coef, self.entropy[lo:hi], grad_scale, entropy_scale,
                opts.ignore_index, opts.label_smoothing, logits.shape[1], 0, softcap, self.backend,
            )  # fmt: skip
        if want_grad:
            return cross_entropy_stats_rows_, (logits, t, self.w, grad_scale, *args)
        return cross_entropy_stats_rows, (logits, t, self.w, None, *args, False)

    def chunk_result(self, lo, hi, op, outs):
        if op is cross_entropy_backward_:
            return torch.zeros_like(self.lse[lo:hi])
        if op is cross_entropy_stats_rows_:
            loss, lse, argmax, entropy = outs
        else:
            loss, lse, _, argmax, entropy = outs
        self.lse[lo:hi], self.argmax[lo:hi], self.entropy[lo:hi] = lse, argmax, entropy
        return loss


class _LinearCrossEntropyWithEntropy(torch.autograd.Function):
    """Per-row losses and entropies of the fused linear layer, both differentiable: the forward runs the
    chunks without gradients; the backward runs them again, each chunk's logit gradient for its rows'
    two upstream gradients in one pass, then the gradient matmuls (as ``reduction="none"`` does)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, problem, ran=None):
        """``ran``: what ``problem.run()`` returned, run by the caller, or None: run here."""
        ctx.problem = problem
        ctx.shapes = (hidden.shape, weight.dtype)
        ctx.inputs = (hidden, weight, bias)  # for a differentiated backward
        loss_rows = (problem.run() if ran is None else ran)[0]
        entropy_rows = problem.entropy.clone()
        return loss_rows, entropy_rows

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy):
        problem = ctx.problem
        hidden_shape, dtype = ctx.shapes
        want = tuple(ctx.needs_input_grad[:3])
        if torch.is_grad_enabled():  # differentiated again: through the logits
            logits, opts = problem.logits_of(*ctx.inputs)
            rows = autograd.cross_entropy_with_entropy(logits, problem.t, problem.w, problem.is_prob, opts,
                                                       problem.backend)[:2]  # fmt: skip
            return (*_regrad(rows, ctx.inputs, (grad_loss, grad_entropy), want), None)
        dt = problem.dt
        row_scale = torch.zeros_like(problem.lse) if grad_loss is None else grad_loss.reshape(-1).to(dt)
        entropy_scale = None if grad_entropy is None else grad_entropy.reshape(-1).to(dt)
        _, grad_h, grad_w, grad_b = problem.run(want, row_scale=row_scale, entropy_scale=entropy_scale)
        return (*_input_grads(grad_h, grad_w, grad_b, hidden_shape, dtype), None)


def linear_cross_entropy_with_stats(
    hidden, weight, target, bias=None, ignore_index: int = -100, reduction: str = "mean",
    label_smoothing: float = 0.0, *, ce_weight=None, z_loss: float = 0.0, softcap: float | None = None,
    backend: str | None = None, chunk_size: int | None = None, entropy: bool = False, temperature=1.0,
    accum_dtype: torch.dtype | None = None,
):  # fmt: skip
    """:func:`linear_cross_entropy` and the statistics of :func:`gpuxent.cross_entropy_with_stats`
    (``CrossEntropyOutput(loss, z_loss, accuracy, entropy)``), chunk by chunk, never holding the
    (N, r) logits.

    Arguments as :func:`linear_cross_entropy` (``temperature``: the statistics are of the scaled
    logits), plus ``entropy``: also return the entropy of each kept row's softmax, differentiable in
    ``hidden``, ``weight`` and ``bias``. Then the forward computes no gradient and the backward runs the
    chunks again (one more matmul per chunk), each chunk's
    logit gradient ``grad_loss_i dCE_i + grad_entropy_i dH_i`` in one pass over it; without it, the
    gradients are computed in the forward as in :func:`linear_cross_entropy`.
    """
    as_numpy = not isinstance(hidden, torch.Tensor)
    h, w, t, b, cw = to_tensors(
        ("bias", "ce_weight"), hidden=hidden, weight=weight, target=target, bias=bias, ce_weight=ce_weight
    )
    want_entropy = check_bool(entropy, "entropy")
    opts = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    problem = _StatsProblem(h, w, t, b, cw, opts, backend, chunk_size, temperature=temperature, accum_dtype=accum_dtype)
    if _transformed(h, w, b):  # through the logits, whose statistics' autograd the transforms differentiate
        logits, kernel_opts = problem.logits_of(h, w, b)
        return cross_entropy_with_stats(
            logits.reshape(*problem.batch_shape, -1), t, cw, ignore_index, reduction, label_smoothing,
            z_loss=z_loss, softcap=kernel_opts.softcap or None, backend=problem.backend, entropy=want_entropy,
        )  # fmt: skip
    needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (h, w, b))
    entropy_rows = None
    if want_entropy:
        problem.scale = None  # the mean's 1/denominator reaches the rows through the reduction below
        if needs_grad:
            apply = _eager_apply(_LinearCrossEntropyWithEntropy)
            if apply is None:
                loss_rows, entropy_rows = _LinearCrossEntropyWithEntropy.apply(h, w, b, problem)
            else:
                with torch.no_grad():
                    ran = problem.run()
                loss_rows, entropy_rows = apply(h, w, b, problem, ran)
        else:
            with torch.no_grad():
                loss_rows = problem.run()[0]
            entropy_rows = problem.entropy
        loss = problem.reduce(loss_rows)
    else:
        want, finish = _route(problem, h, w, b)
        with torch.no_grad():
            ran = None if want is None else problem.run(*want)
        loss = finish(ran)
    stats = row_statistics(
        problem.lse, problem.argmax, entropy_rows, problem.t, problem.w, problem.is_prob, problem.opts,
        problem.batch_shape,
    )  # fmt: skip
    return CrossEntropyOutput(*(None if v is None else out(v, as_numpy) for v in (loss, *stats)))
