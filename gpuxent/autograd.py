"""The registered ops (the one door into every backend) and the autograd Functions over them.

Every kernel call in gpuxent goes through one of the ``torch.library`` custom ops below, whatever the
caller (the public functions, the in-place path, ``linear_cross_entropy``, the benchmarks): the op
looks the backend module up by name (chosen once, by the caller, with ``backends.select``) and calls
it. ``torch.compile(fullgraph=True)`` sees each op as one opaque node, ``torch.func.vmap`` folds its
batch dimension into rows, and the in-place op declares what it mutates, so autograd sees the
version bump of the logits as after any torch in-place op.

The autograd Functions keep the gradient that the forward already computed; the backward only
scales it by ``grad_output`` (and skips even that when ``grad_output`` is exactly 1 in eager mode).
Half inputs with a non-unit ``grad_output`` run the gradient kernel again with the factor folded into
its scale, so the gradient is rounded once, from float32. When the backward itself is differentiated
(``create_graph=True``, ``torch.func`` transforms), the gradient comes from the same formula written
in torch ops, which autograd differentiates again.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from . import backends
from .backends import compute_dtype, torch_ops
from .checks import denominator, distill_denominator, host_scale, host_sum, mean_scale, reduce_rows

HALF = (torch.float16, torch.bfloat16)

# --------------------------------------------------------------------------- the door


def eager(t: torch.Tensor) -> bool:
    """Whether a call on ``t`` may skip what only tracing and transforms need (the registered op's
    dispatch, a functorch-aware Function): a plain tensor, outside torch.compile, ``torch.func`` and
    forward-mode AD. Those cost 20-80 us a call, several times the kernel on a small batch."""
    return (
        type(t) is torch.Tensor
        and forward_ad._current_level < 0
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
    )


class RegisteredOp:
    """A ``torch.library`` custom op (one opaque node to torch.compile, a vmap rule, a fake) whose
    Python body an eager call runs directly (:func:`eager` on its first argument), then bumping the
    version of what it mutates, as the dispatcher would (the backends write through numpy or raw
    pointers, which torch does not see). ``schema``: None infers it from ``fn``'s annotations."""

    def __init__(self, name: str, mutates_args, fn, schema: str | None = None):
        self.impl = fn
        self.op = torch.library.custom_op(name, fn, mutates_args=mutates_args, schema=schema)
        params = list(inspect.signature(fn).parameters)
        self.mutated = tuple(params.index(a) for a in mutates_args)

    def __call__(self, *args):
        if not eager(args[0]):
            return self.op(*args)
        out = self.impl(*args)
        for i in self.mutated:
            torch.autograd.graph.increment_version(args[i])
        return out

    def __getattr__(self, name):  # register_fake, ...
        return getattr(self.op, name)


def registered_op(name: str, mutates_args=()):
    return lambda fn: RegisteredOp(name, mutates_args, fn)


def registered_pair(name: str, args: str, n_outputs: int, make, fake, want_grad=False, **flags):
    """``(op, op_)``: ``gpuxent::{name}`` and its in-place twin ``gpuxent::{name}_``, which writes the
    gradient over the logits (``mutates_args=("logits",)``) and returns the other outputs, from one body.

    ``args``: both schemas' arguments after the logits (the out-of-place op's end with ``bool want_grad``
    when ``want_grad``); ``n_outputs``: the out-of-place op's tensors, the gradient one of them.
    ``make(inplace, **flags)`` returns an op's Python function: a closure, which the eager path calls with
    no frame or partial between; ``fake(inplace, logits, *args, **flags)`` is the ops' fake.
    """

    def schema(logits, last, n):
        return f"({logits}, {args}{last}) -> " + ("Tensor" if n == 1 else f"({', '.join(['Tensor'] * n)})")

    op = RegisteredOp(
        f"gpuxent::{name}", (), make(False, **flags),
        schema("Tensor logits", ", bool want_grad" if want_grad else "", n_outputs),
    )  # fmt: skip
    op_ = RegisteredOp(
        f"gpuxent::{name}_", ("logits",), make(True, **flags), schema("Tensor(a0!) logits", "", n_outputs - 1)
    )
    op.register_fake(functools.partial(fake, False, **flags))
    op_.register_fake(functools.partial(fake, True, **flags))
    return op, op_


def _dense(v):
    """A per-row vector as a kernel reads it: dense (a reduction's backward hands out expanded, stride-0
    views, and ``.sum().backward()`` hands a stride-0 ``grad_output``); None and floats pass through."""
    return v.contiguous() if isinstance(v, torch.Tensor) else v


def _stats_outputs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The (N,) argmax (int64) and entropy (compute dtype) buffers the kernel fills."""
    n_rows = logits.shape[0]
    return (
        logits.new_empty(n_rows, dtype=torch.int64),
        logits.new_empty(n_rows, dtype=compute_dtype(logits.dtype)),
    )


def _cross_entropy_rows(inplace: bool, stats: bool):
    """The body of ``gpuxent::cross_entropy_rows`` (``stats``: ``cross_entropy_stats_rows``), or of its
    in-place twin."""

    def cross_entropy_rows(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
                           backend, want_grad=True):  # fmt: skip
        """``(loss, lse, grad)`` per row of (N, r) logits, with ``stats`` then each row's ``(argmax,
        entropy)`` from the same pass (0 for ignored rows). ``grad`` (the logits' dtype, from the backend's
        allocator) is ``grad_scale * d loss_i / d logits_i``, or an empty tensor unless ``want_grad``; in
        place, it is written over the logits and not returned."""
        if inplace:
            grad = logits
        else:
            grad = backends.empty(backend, logits.shape, logits.dtype, logits.device) if want_grad else None
        extra = _stats_outputs(logits) if stats else None
        # called here, not through a helper: one frame from the op to the backend
        loss, lse = backends.module(backend).cross_entropy(
            logits, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
            softcap=softcap, grad_scale=_dense(grad_scale), grad=grad, stats=extra,
        )  # fmt: skip
        outs = (loss, lse) if inplace else (loss, lse, logits.new_empty(0) if grad is None else grad)
        return outs + extra if stats else outs

    return cross_entropy_rows


def _cross_entropy_rows_fake(inplace, logits, *args, stats):
    dt = compute_dtype(logits.dtype)
    n_rows = logits.shape[0]
    outs = logits.new_empty(n_rows, dtype=dt), logits.new_empty(n_rows, dtype=dt)
    if not inplace:  # args[-1]: want_grad
        outs += (torch.empty_like(logits) if args[-1] else logits.new_empty(0),)
    return outs + _stats_outputs(logits) if stats else outs


_ROWS_ARGS = (
    "Tensor target, Tensor? weight, Tensor? grad_scale, SymInt ignore_index, float label_smoothing, float z_loss, "
    "float softcap, str backend"
)
cross_entropy_rows, cross_entropy_rows_ = registered_pair(
    "cross_entropy_rows", _ROWS_ARGS, 3, _cross_entropy_rows, _cross_entropy_rows_fake, want_grad=True, stats=False
)
cross_entropy_stats_rows, cross_entropy_stats_rows_ = registered_pair(
    "cross_entropy_stats_rows", _ROWS_ARGS, 5, _cross_entropy_rows, _cross_entropy_rows_fake, want_grad=True, stats=True
)


@registered_op("gpuxent::softmax_rows", mutates_args=())
def softmax_rows(x: torch.Tensor, log: bool, backend: str) -> torch.Tensor:
    """Row softmax (or log-softmax) of (N, r) ``x``, in the compute dtype."""
    return backends.module(backend).softmax(x, log=log)


@registered_op("gpuxent::binary_cross_entropy_elements", mutates_args=())
def binary_cross_entropy_elements(
    x: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], pos_weight: Optional[torch.Tensor],
    with_logits: bool, backend: str, want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, grad)`` elementwise, flat, in the compute dtype: BCE on probabilities, or on logits
    (sigmoid fused) when ``with_logits``; ``grad`` (``x``'s shape) is empty unless ``want_grad``."""
    dt = compute_dtype(x.dtype)
    grad = torch.empty(x.shape, dtype=dt, device=x.device) if want_grad else x.new_empty(0, dtype=dt)
    module = backends.module(backend)
    g = grad if want_grad else None
    if with_logits:
        loss = module.binary_cross_entropy_with_logits(x, target, weight, pos_weight, grad=g)
    else:
        loss = module.binary_cross_entropy(x, target, weight, grad=g)
    return loss, grad


@softmax_rows.register_fake
def _(x, log, backend):
    return torch.empty_like(x, dtype=compute_dtype(x.dtype))


@binary_cross_entropy_elements.register_fake
def _(x, target, weight, pos_weight, with_logits, backend, want_grad):
    dt = compute_dtype(x.dtype)
    grad = torch.empty(x.shape, dtype=dt, device=x.device) if want_grad else x.new_empty(0, dtype=dt)
    return x.new_empty(x.numel(), dtype=dt), grad


# vmap: the batch dimension folds into rows (elements); per-example class weights loop.


def _front(t: torch.Tensor | None, bdim: int | None, size: int) -> torch.Tensor | None:
    """``t`` with its batch dimension first (expanded when it has none)."""
    if t is None:
        return None
    return t.movedim(bdim, 0) if bdim is not None else t.expand(size, *t.shape)


def _cross_entropy_vmap(op):
    """The vmap rule of a cross-entropy row op (outputs: per-row vectors, and the (N, r) gradient third):
    the batch dimension folds into rows; per-example class weights loop."""

    def rule(info, in_dims, logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap,
             backend, want_grad):  # fmt: skip
        b = info.batch_size
        ld, td, wd, sd = in_dims[:4]
        x, t = _front(logits, ld, b), _front(target, td, b)
        n_rows, n_classes = x.shape[1], x.shape[2]
        scalars = (ignore_index, label_smoothing, z_loss, softcap, backend, want_grad)
        if wd is not None:  # per-example class weights: one call per example
            w = weight.movedim(wd, 0)
            s = _front(grad_scale, sd, b)
            outs = [op(x[i], t[i], w[i], None if s is None else s[i], *scalars) for i in range(b)]
            outs = tuple(torch.stack(o) for o in zip(*outs))
        else:
            if grad_scale is not None and (sd is not None or grad_scale.numel() > 1):
                grad_scale = _front(grad_scale, sd, b).reshape(b, -1).expand(b, n_rows).reshape(-1)
            outs = op(
                x.reshape(b * n_rows, n_classes), t.reshape(b * n_rows, *t.shape[2:]), weight, grad_scale, *scalars
            )
            outs = tuple(
                (o.view(b, n_rows, n_classes) if want_grad else o) if k == 2 else o.view(b, n_rows)
                for k, o in enumerate(outs)
            )
        return outs, tuple(None if k == 2 and not want_grad else 0 for k in range(len(outs)))

    torch.library.register_vmap(op.op, rule)


_cross_entropy_vmap(cross_entropy_rows)
_cross_entropy_vmap(cross_entropy_stats_rows)


@torch.library.register_vmap("gpuxent::softmax_rows")
def _(info, in_dims, x, log, backend):
    xb = _front(x, in_dims[0], info.batch_size)
    return softmax_rows(xb.reshape(-1, xb.shape[-1]), log, backend).view(xb.shape), 0


@torch.library.register_vmap("gpuxent::binary_cross_entropy_elements")
def _(info, in_dims, x, target, weight, pos_weight, with_logits, backend, want_grad):
    b = info.batch_size
    xb, tb, wb, pb = (_front(v, d, b) for v, d in zip((x, target, weight, pos_weight), in_dims[:4]))
    loss, grad = binary_cross_entropy_elements(
        xb.reshape(-1), tb.reshape(-1), *(None if v is None else v.reshape(-1) for v in (wb, pb)),
        with_logits, backend, want_grad,
    )  # fmt: skip
    return (loss.view(b, -1), grad.view(xb.shape) if want_grad else grad), (0, 0 if want_grad else None)


# --------------------------------------------------------------------------- upstream gradients


def _is_one(t: torch.Tensor) -> bool:
    """Whether ``t`` is exactly 1, checked only where a host sync is allowed (eager mode)."""
    if t.numel() != 1 or torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(t):
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return bool(t.item() == 1)


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad * grad_output``: a scalar, an elementwise factor, or a per-row one over the class axis."""
    if grad_output.dim() == 0 or grad_output.numel() == 1:
        return grad if _is_one(grad_output) else grad * grad_output.reshape(()).to(grad.dtype)
    if grad_output.shape == grad.shape:
        return grad * grad_output.to(grad.dtype)
    return grad * grad_output.reshape(*grad_output.shape, 1).to(grad.dtype)


# --------------------------------------------------------------------------- cross-entropy


def _row_scale(grad_output: torch.Tensor, reduction: str, scale: torch.Tensor, n_rows: int, dt) -> torch.Tensor:
    """The factor of each row's gradient: ``grad_output`` (per row for ``"none"``), over the mean's
    denominator (``scale`` = 1/denominator) for ``"mean"``; a tensor of 1 or N elements."""
    go = grad_output.to(dt)
    if reduction == "none":
        return go.reshape(n_rows)
    return (go * scale if reduction == "mean" else go).reshape(1)


def cross_entropy_grad_formula(x, target, weight, is_prob, opts, row_scale, want_target=False, entropy_scale=None):
    """``(d loss / d logits, d loss / d target)`` of (N, r) logits in torch ops: differentiable again.

    Per kept row, with ``y`` the (soft-capped) logits, ``p = softmax(y)`` and the target mass
    ``m_j = w_j ((1 - eps) q_j + eps / r)`` (class targets: ``q`` one-hot): ``d loss / d y =
    (sum_j m_j + 2 z_loss lse) p - m``; the softcap multiplies by ``1 - (y / softcap)**2``. With
    ``entropy_scale`` (1 or N factors) the row's entropy ``H`` joins: ``+ entropy_scale p_j (E_p[y] - y_j)``.
    """
    dt = compute_dtype(x.dtype)
    n_rows, n_classes = x.shape
    eps, cap = opts.label_smoothing, opts.softcap
    y = x.to(dt)
    if cap:
        y = cap * torch.tanh(y / cap)
    lse = torch.logsumexp(y, -1, keepdim=True)
    p = torch.exp(y - lse)
    w = torch.ones(n_classes, dtype=dt, device=x.device) if weight is None else weight.to(dt)
    if is_prob:
        q = target.to(dt)
        kept = torch.ones(n_rows, 1, dtype=dt, device=x.device)
        mass = w * ((1 - eps) * q + eps / n_classes)
    else:
        kept = (target != opts.ignore_index).to(dt)[:, None]
        one_hot = (torch.arange(n_classes, device=x.device) == target[:, None]).to(dt)  # vmap-safe
        mass = kept * (w * ((1 - eps) * one_hot + eps / n_classes))
    coef = mass.sum(-1, keepdim=True) + 2 * opts.z_loss * lse * kept
    # An ignored row's gradient is 0 even when the mean's scale is 1/0 (every row ignored), as in
    # torch; masking the scale (not the product) keeps 0 * NaN out of the derivative of this too.
    rs = torch.where(kept != 0, row_scale.to(dt).reshape(-1, 1), 0)
    g = rs * (coef * p - mass)
    if entropy_scale is not None:
        es = torch.where(kept != 0, entropy_scale.to(dt).reshape(-1, 1), 0)
        g = g + es * p * ((p * y).sum(-1, keepdim=True) - y)
    if cap:
        g = g * (1 - (y / cap) ** 2)
    g = torch.where(kept != 0, g, 0)  # an ignored row is not read (its logits may be anything)
    g_target = None
    if want_target:  # d loss / d q_j = (1 - eps) w_j (lse - y_j)
        g_target = (rs * (1 - eps) * w * (lse - y)).to(target.dtype)
    return g.to(x.dtype), g_target


_TRACED = object()
"""The ``ctx`` of a Function body called as a functorch-aware ``forward``: torch.compile, ``torch.func``,
forward AD. The body then calls its ops through their dispatch; any other ``ctx`` (None: an eager call
without autograd; a ctx: an eager call with autograd) means plain tensors, and it calls their Python
bodies directly (:class:`RegisteredOp`)."""


class _BodyFunction(torch.autograd.Function):
    """A Function whose ``body(ctx, *args)`` is its forward with the setup folded in (see ``_TRACED``): its
    ``forward`` (torch.compile, ``torch.func``, forward AD) is ``body(_TRACED, *args)``, made here for each
    subclass that sets a ``body`` and no ``forward`` (a partial ``body`` needs its own: dynamo does not
    trace a partial held in a closure); :class:`_Applier` calls the body itself on the eager paths."""

    generate_vmap_rule = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "body" in cls.__dict__ and "forward" not in cls.__dict__:
            body = cls.body

            def forward(*args):
                return body(_TRACED, *args)

            cls.forward = staticmethod(forward)


def _cross_entropy_body(ctx, logits, target, weight, is_prob, opts, backend, want_grad, inplace, denom=None,
                        stats=False):  # fmt: skip
    """:class:`CrossEntropy`'s forward (``stats``: :class:`CrossEntropyStats`'s, through the kernel with
    statistics). ``denom``: the mean's denominator read on the host by ``prepare_cross_entropy`` (None:
    computed here)."""
    eager = ctx is not _TRACED
    dt = compute_dtype(logits.dtype)
    ii, reduction, eps, z, cap = opts
    scale = grad_scale = None
    if reduction == "mean":
        if denom is not None and eager:
            grad_scale = host_scale(denom, dt)  # a float: no tensor op for the scale
        else:
            scale = mean_scale(denominator(target, weight, is_prob, ii, logits.shape[0], dt))
            grad_scale = scale.reshape(1)
    if inplace:
        op = cross_entropy_stats_rows_ if stats else cross_entropy_rows_
        if eager:
            outs = op.impl(logits, target, weight, grad_scale, ii, eps, z, cap, backend)
            torch.autograd.graph.increment_version(logits)
        else:
            outs = op(logits, target, weight, grad_scale, ii, eps, z, cap, backend)
        grad = logits.new_empty(0)  # the gradient is the logits: setup_context takes it from there
        extra = outs[1:]  # lse[, argmax, entropy]
    else:
        op = cross_entropy_stats_rows if stats else cross_entropy_rows
        outs = (op.impl if eager else op)(logits, target, weight, grad_scale, ii, eps, z, cap, backend, want_grad)
        grad = outs[2]
        extra = (outs[1], *outs[3:])
    loss_rows = outs[0]
    if reduction == "none":
        loss = loss_rows
    elif not eager:
        loss = loss_rows.sum() * scale if scale is not None else loss_rows.sum()
    elif scale is None and loss_rows.is_cpu:  # a plain CPU vector: numpy sums it, as host_sum does
        a = loss_rows.numpy()
        total = a.sum() if grad_scale is None else a.sum() * a.dtype.type(grad_scale)
        loss = torch.full((), float(total), dtype=dt)
    else:
        loss = host_sum(loss_rows, grad_scale if scale is None else scale)
    if scale is None:
        scale = torch.full((), 1.0 if grad_scale is None else grad_scale, dtype=dt, device=logits.device)
    output = (loss, grad, scale, *extra) if stats else (loss, grad, scale)
    if eager and ctx is not None:
        CrossEntropy.setup_context(
            ctx, (logits, target, weight, is_prob, opts, backend, want_grad, inplace), output, forward_ad=False
        )
    return output


class CrossEntropy(_BodyFunction):
    """Fused cross-entropy of (N, r) logits, reduced; outputs ``(loss, grad, 1/denominator)``.

    ``grad`` is the forward's gradient for a unit ``grad_output`` (empty unless ``want_grad``; the
    logits themselves when ``inplace``). Arguments: ``(logits, target, weight, is_prob, opts, backend,
    want_grad, inplace[, denom])``.
    """

    body = staticmethod(_cross_entropy_body)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_ad=True):
        """``forward_ad=False``: an eager call (no forward-mode AD level was open), which saves nothing for a jvp."""
        logits, target, weight, is_prob, opts, backend, want_grad, inplace = inputs[:8]
        grad, scale = output[1], output[2]
        ctx.mark_non_differentiable(*output[1:])  # the gradient, the scale (and the statistics)
        ctx.set_materialize_grads(False)  # no (N, r) zeros for the gradient output, which gets no gradient
        ctx.opts, ctx.is_prob, ctx.backend, ctx.inplace = opts, is_prob, backend, inplace
        # an in-place gradient of a leaf's logits must not become the leaf's .grad, aliasing the leaf
        base = logits if logits._base is None else logits._base
        ctx.copy_grad = inplace and base.is_leaf
        ctx.save_for_backward(logits, target, weight, logits if inplace else grad, scale)
        if not inplace and forward_ad:
            ctx.save_for_forward(logits, target, weight, grad, scale)

    @staticmethod
    def jvp(ctx, logits_t, target_t, *_):
        """Forward mode: the loss moves by ``<grad, logits_t>`` (+ ``<d loss / d q, target_t>``)."""
        logits, target, weight, grad, scale = ctx.saved_tensors
        dt = compute_dtype(logits.dtype)
        n_rows = logits.shape[0]
        loss_t = torch.zeros(n_rows, dtype=dt, device=logits.device)
        ones = torch.ones(n_rows, dtype=dt, device=logits.device)
        row_scale = ones * scale if ctx.opts.reduction == "mean" else ones
        if logits_t is not None:
            if grad.shape != logits.shape:  # the forward computed none: the logits carry a tangent, not a grad
                grad = cross_entropy_grad_formula(logits, target, weight, ctx.is_prob, ctx.opts, row_scale)[0]
            loss_t = loss_t + (grad.to(dt) * logits_t.to(dt)).sum(-1)
        if target_t is not None and ctx.is_prob:
            g_target = cross_entropy_grad_formula(logits, target, weight, True, ctx.opts, row_scale, True)[1]
            loss_t = loss_t + (g_target.to(dt) * target_t.to(dt)).sum(-1)
        return (loss_t if ctx.opts.reduction == "none" else loss_t.sum()), None, None

    @staticmethod
    def backward(ctx, grad_loss, _grad, _scale, *_stats):  # _stats: CrossEntropyStats's outputs, no gradient
        if grad_loss is None:  # the loss took no part in what was differentiated (grads not materialised)
            return None, None, None, None, None, None, None, None, None
        logits, target, weight, grad, scale = ctx.saved_tensors
        opts = ctx.opts
        n_rows = logits.shape[0]
        dt = compute_dtype(logits.dtype)
        want_target = ctx.is_prob and ctx.needs_input_grad[1]
        unit = not want_target and not torch.is_grad_enabled() and (grad.dtype not in HALF or _is_one(grad_loss))
        row_scale = None if unit else _row_scale(grad_loss, opts.reduction, scale, n_rows, dt)  # not needed below
        if torch.is_grad_enabled():  # the backward is differentiated: the formula in torch ops
            if ctx.inplace:
                raise RuntimeError(
                    "inplace_grad: second derivatives need the logits, which the in-place gradient overwrote; "
                    "call without inplace_grad=True"
                )
            g, g_target = cross_entropy_grad_formula(logits, target, weight, ctx.is_prob, opts, row_scale, want_target)
            return g, g_target, None, None, None, None, None, None, None
        g = None
        if ctx.needs_input_grad[0]:
            if grad.dtype in HALF and not ctx.inplace and not _is_one(grad_loss):
                # fold grad_output into the kernel's float32 scale: one rounding, not two
                ii, eps, z, cap = opts.ignore_index, opts.label_smoothing, opts.z_loss, opts.softcap
                g = cross_entropy_rows(logits, target, weight, row_scale, ii, eps, z, cap, ctx.backend, True)[2]
            else:
                g = scale_grad(grad, grad_loss if opts.reduction != "none" else grad_loss.reshape(n_rows))
            if ctx.copy_grad and g is grad:
                g = g.clone()
        g_target = None
        if want_target:
            g_target = cross_entropy_grad_formula(logits, target, weight, True, opts, row_scale, True)[1]
        return g, g_target, None, None, None, None, None, None, None


# --------------------------------------------------------------------------- binary cross-entropy


def bce_grad_formula(x, target, weight, pos_weight, with_logits):
    """``(d loss / d x, d loss / d target)`` elementwise in torch ops (differentiable again), as torch's
    own backward formulas (the target's: ``-logit(p)``, or ``log_sigmoid(-x) - pos_weight *
    log_sigmoid(x)``)."""
    dt = compute_dtype(x.dtype)
    xc, y = x.to(dt), target.to(dt)
    w = 1.0 if weight is None else weight.to(dt)
    if with_logits:
        pw = 1.0 if pos_weight is None else pos_weight.to(dt)
        g = w * (((pw - 1) * y + 1) * torch.sigmoid(xc) - pw * y)
        gt = w * (F.logsigmoid(-xc) - pw * F.logsigmoid(xc))
    else:
        g = w * (xc - y) / torch.clamp((1 - xc) * xc, min=1e-12)
        gt = -w * torch.logit(xc)
    return g, gt


def _bce_body(ctx, x, target, weight, pos_weight, with_logits, reduction, backend, want_grad):
    """:class:`BinaryCrossEntropy`'s forward (see ``_TRACED`` for ``ctx``)."""
    eager = ctx is not _TRACED
    dt = compute_dtype(x.dtype)
    loss, grad = (binary_cross_entropy_elements.impl if eager else binary_cross_entropy_elements)(
        x, target if target.dtype == dt else target.to(dt), None if weight is None else weight.to(dt),
        None if pos_weight is None else pos_weight.to(dt), with_logits, backend, want_grad,
    )  # fmt: skip
    if reduction == "none":
        loss = loss.reshape(x.shape)
    elif reduction == "sum":
        loss = loss.sum()
    else:
        loss = loss.sum() / loss.numel() if loss.numel() else loss.sum() * math.nan
        if want_grad and x.numel():
            grad = grad / x.numel()
    output = loss, grad
    if eager and ctx is not None:
        BinaryCrossEntropy.setup_context(
            ctx, (x, target, weight, pos_weight, with_logits, reduction, backend, want_grad), output, False
        )
    return output


class BinaryCrossEntropy(_BodyFunction):
    """Elementwise BCE (on probabilities, or on logits when ``with_logits``), reduced; outputs
    ``(loss, grad)``, the gradient of a unit ``grad_output`` in the compute dtype."""

    body = staticmethod(_bce_body)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_ad=True):
        x, target, weight, pos_weight, with_logits, reduction, backend, want_grad = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.set_materialize_grads(False)  # no zeros of the input's size for the gradient output
        ctx.with_logits, ctx.reduction = with_logits, reduction
        ctx.save_for_backward(x, target, weight, pos_weight, output[1])
        if forward_ad:
            ctx.save_for_forward(x, target, weight, pos_weight, output[1])

    @staticmethod
    def jvp(ctx, x_t, target_t, *_):
        x, target, weight, pos_weight, grad = ctx.saved_tensors
        dt = compute_dtype(x.dtype)
        loss_t = torch.zeros(x.shape, dtype=dt, device=x.device)
        if x_t is not None:
            if grad.shape != x.shape:  # the forward computed none: the input carries a tangent, not a grad
                n = max(x.numel(), 1) if ctx.reduction == "mean" else 1
                grad = bce_grad_formula(x, target, weight, pos_weight, ctx.with_logits)[0] / n
            loss_t = loss_t + grad * x_t.to(dt)
        if target_t is not None:
            g_target = bce_grad_formula(x, target, weight, pos_weight, ctx.with_logits)[1]
            loss_t = loss_t + g_target / (max(x.numel(), 1) if ctx.reduction == "mean" else 1) * target_t.to(dt)
        return (loss_t.reshape(x.shape) if ctx.reduction == "none" else loss_t.sum()), None

    @staticmethod
    def backward(ctx, grad_loss, _grad):
        if grad_loss is None:
            return None, None, None, None, None, None, None, None
        x, target, weight, pos_weight, grad = ctx.saved_tensors
        go = grad_loss.to(compute_dtype(x.dtype))
        n = max(x.numel(), 1) if ctx.reduction == "mean" else 1
        need_x, need_target = ctx.needs_input_grad[:2]
        differentiable = torch.is_grad_enabled()
        g = g_target = None
        if differentiable or need_target:
            g_formula, g_target = bce_grad_formula(x, target, weight, pos_weight, ctx.with_logits)
        if need_x:
            g = (g_formula * go / n if differentiable else scale_grad(grad, go)).to(x.dtype)
        if need_target:
            g_target = (g_target * go / n).to(target.dtype)
        return g, g_target, None, None, None, None, None, None


# --------------------------------------------------------------------------- softmax


def _softmax_body(ctx, x, log, backend):
    """:class:`Softmax`'s forward (see ``_TRACED`` for ``ctx``)."""
    y = (softmax_rows.impl if ctx is not _TRACED else softmax_rows)(x, log, backend)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if ctx is not None and ctx is not _TRACED:
        ctx.log = log
        ctx.save_for_backward(y)
    return y


class Softmax(_BodyFunction):
    """Row softmax / log-softmax of (N, r) ``x`` on the backend; the backward is torch ops on the
    output, so it is differentiable again."""

    body = staticmethod(_softmax_body)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.log = inputs[1]
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def jvp(ctx, x_t, *_):
        (out,) = ctx.saved_tensors
        p = out.exp() if ctx.log else out
        mean_t = (p * x_t).sum(-1, keepdim=True)
        return x_t - mean_t if ctx.log else out * (x_t - mean_t)

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        if ctx.log:
            return grad_out - out.exp() * grad_out.sum(-1, keepdim=True), None, None
        return out * (grad_out - (grad_out * out).sum(-1, keepdim=True)), None, None


class _Applier:
    """``fn.apply``, at the cost each case needs; :meth:`route` picks the callable, ``__call__`` calls it.

    - Under torch.compile, the same Function less its forward-mode rule: dynamo cannot trace a
      Function with a custom jvp (``torch.func.jvp`` and ``jacfwd`` are eager-only anyway).
    - An eager call (:func:`eager` on every tensor) that needs no gradient: the forward alone.
    - An eager call that does: the same forward, setup and backward as a ctx-style Function, which
      autograd applies in ~8 us where a functorch-aware one takes ~25 us.
    - Otherwise (``torch.func`` transforms, forward AD): ``fn.apply``.

    The eager paths call the Function's ``body(ctx, *args)`` (its forward with the setup folded in, see
    ``_TRACED``) with no frame of this class's between the caller and the body: the caller calls what
    :meth:`route` returns.
    """

    def __init__(self, fn: type[_BodyFunction]):
        self.fn = fn
        self.traceable = type(fn.__name__, (fn,), {"jvp": torch.autograd.Function.jvp})
        eager_fn = type(fn.__name__, (torch.autograd.Function,), {
            "forward": staticmethod(fn.body), "backward": staticmethod(fn.backward)
        })  # fmt: skip
        self.plain = functools.partial(fn.body, None)
        # torch._C._FunctionBase.apply itself: Function.apply's Python part (functorch and signature
        # checks) is for what route() already sent elsewhere
        self.eager_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, eager_fn)

    def route(self, *tensors):
        """The callable for a call on ``tensors`` (its tensor arguments; None allowed)."""
        if torch.compiler.is_compiling():
            return self.traceable.apply
        if forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active():
            return self.fn.apply
        grad = False
        for t in tensors:
            if t is None:
                continue
            if type(t) is not torch.Tensor or torch._C._functorch.is_functorch_wrapped_tensor(t):
                return self.fn.apply
            grad = grad or t.requires_grad
        return self.eager_apply if grad and torch.is_grad_enabled() else self.plain

    def __call__(self, *args):
        return self.route(*(a for a in args if isinstance(a, torch.Tensor)))(*args)


def _applier(fn: type[_BodyFunction]) -> _Applier:
    return _Applier(fn)


cross_entropy = _applier(CrossEntropy)
binary_cross_entropy = _applier(BinaryCrossEntropy)
softmax = _applier(Softmax)


# ------------------------------------------------------------ vocab-parallel: row partials and the gradient pass
# The ops under ``gpuxent.distributed``: a rank reduces its slice of the classes to ``N_PARTIALS``
# numbers per row, the ranks combine them, and the gradient pass writes the slice's gradient from
# the global lse and coefficient. ``cross_entropy_backward`` also carries the entropy term of
# ``cross_entropy_with_stats``.

N_PARTIALS = 5  # (m, s, a, b, c): see ``backends`` (row_partials)


@registered_op("gpuxent::row_partials", mutates_args=())
def row_partials(
    logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor], ignore_index: int, softcap: float,
    class_offset: int, smoothing: bool, backend: str,
) -> torch.Tensor:  # fmt: skip
    """(N, 5) per-row partials of a (N, r_local) slice of the classes, in the compute dtype."""
    out = torch.empty((logits.shape[0], N_PARTIALS), dtype=compute_dtype(logits.dtype), device=logits.device)
    backends.module(backend).row_partials(
        logits, target, weight, ignore_index=ignore_index, softcap=softcap, class_offset=class_offset,
        smoothing=smoothing, out=out,
    )  # fmt: skip
    return out


@row_partials.register_fake
def _(logits, target, weight, ignore_index, softcap, class_offset, smoothing, backend):
    return logits.new_empty((logits.shape[0], N_PARTIALS), dtype=compute_dtype(logits.dtype))


def _cross_entropy_backward(inplace: bool):
    """The body of ``gpuxent::cross_entropy_backward``, or of its in-place twin."""

    def cross_entropy_backward(logits, target, weight, lse, coef, entropy, grad_scale, entropy_scale, ignore_index,
                               label_smoothing, n_classes, class_offset, softcap, backend):  # fmt: skip
        """The gradient of (N, r_local) logits (their dtype, from the backend's allocator; in place: written
        over the logits) given each row's global ``lse`` and coefficient; see ``backends`` for the formula."""
        grad = logits if inplace else backends.empty(backend, logits.shape, logits.dtype, logits.device)
        lse, coef, entropy, grad_scale, entropy_scale = map(_dense, (lse, coef, entropy, grad_scale, entropy_scale))
        backends.module(backend).cross_entropy_backward(
            logits, target, weight, lse, coef, entropy, ignore_index=ignore_index, label_smoothing=label_smoothing,
            n_classes=n_classes, class_offset=class_offset, softcap=softcap, grad_scale=grad_scale,
            entropy_scale=entropy_scale, grad=grad,
        )  # fmt: skip
        return None if inplace else grad

    return cross_entropy_backward


def _cross_entropy_backward_fake(inplace, logits, *args):
    return None if inplace else torch.empty_like(logits)


cross_entropy_backward, cross_entropy_backward_ = registered_pair(
    "cross_entropy_backward",
    "Tensor target, Tensor? weight, Tensor lse, Tensor coef, Tensor? entropy, Tensor? grad_scale, "
    "Tensor? entropy_scale, SymInt ignore_index, float label_smoothing, SymInt n_classes, SymInt class_offset, "
    "float softcap, str backend",
    1, _cross_entropy_backward, _cross_entropy_backward_fake,
)  # fmt: skip


# --------------------------------------------------------------------------- distillation


@registered_op("gpuxent::distillation_rows", mutates_args=())
def distillation_rows(
    student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor], grad_scale: Optional[torch.Tensor],
    divergence: str, beta: float, temperature: float, ignore_index: int, backend: str, want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, grad)`` per row of (N, r) student and teacher logits: ``temperature**2`` times the
    divergence (0 for rows whose target is ``ignore_index``), and ``grad_scale * d loss_i / d student_i``
    (the student's dtype) or an empty tensor unless ``want_grad``."""
    grad = backends.empty(backend, student.shape, student.dtype, student.device) if want_grad else student.new_empty(0)
    loss = backends.module(backend).distillation(
        student, teacher, target, divergence=divergence, beta=beta, temperature=temperature,
        ignore_index=ignore_index, grad_scale=_dense(grad_scale), grad=grad if want_grad else None,
    )  # fmt: skip
    return loss, grad


@distillation_rows.register_fake
def _(student, teacher, target, grad_scale, divergence, beta, temperature, ignore_index, backend, want_grad):
    grad = torch.empty_like(student) if want_grad else student.new_empty(0)
    return student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype)), grad


@torch.library.register_vmap("gpuxent::distillation_rows")
def _(info, in_dims, student, teacher, target, grad_scale, divergence, beta, temperature, ignore_index, backend,
      want_grad):  # fmt: skip
    b = info.batch_size
    sd, td, gd, scd = in_dims[:4]
    s, t = _front(student, sd, b), _front(teacher, td, b)
    n_rows, n_classes = s.shape[1], s.shape[2]
    tg = None if target is None else _front(target, gd, b).reshape(-1)
    if grad_scale is not None and (scd is not None or grad_scale.numel() > 1):
        grad_scale = _front(grad_scale, scd, b).reshape(b, -1).expand(b, n_rows).reshape(-1)
    loss, grad = distillation_rows(
        s.reshape(-1, n_classes), t.reshape(-1, n_classes), tg, grad_scale, divergence, beta, temperature,
        ignore_index, backend, want_grad,
    )  # fmt: skip
    grad = grad.view(b, n_rows, n_classes) if want_grad else grad
    return (loss.view(b, n_rows), grad), (0, 0 if want_grad else None)


def distillation_grad_formula(student, teacher, target, opts, row_scale):
    """``d loss / d student`` of (N, r) logits in torch ops, differentiable again (the divergence's terms
    are ``torch_ops.DIVERGENCES``): ``row_scale * temperature * d div / d S``."""
    dt = compute_dtype(student.dtype)
    tau = opts.temperature
    log_ps = torch.log_softmax(student.to(dt) / tau, -1)
    log_pt = torch.log_softmax(teacher.to(dt) / tau, -1)
    g = torch_ops.divergence_rows(log_ps, log_pt, opts.divergence, opts.beta, True)[1]
    n_rows = student.shape[0]
    kept = torch.ones(n_rows, 1, dtype=torch.bool, device=student.device)
    if target is not None:
        kept = (target != opts.ignore_index)[:, None]
    rs = torch.where(kept, row_scale.to(dt).reshape(-1, 1), 0)
    return torch.where(kept, rs * tau * g, 0).to(student.dtype)


def _distillation_body(ctx, student, teacher, target, opts, backend, want_grad):
    """:class:`Distillation`'s forward (see ``_TRACED`` for ``ctx``)."""
    eager = ctx is not _TRACED
    n_rows, n_classes = student.shape
    dt = compute_dtype(student.dtype)
    denom = scale = grad_scale = None
    if opts.reduction in ("batchmean", "mean"):
        if eager and target is None:  # the denominator is known on the host: no tensor op for the scale
            denom = float(n_rows) if opts.reduction == "batchmean" else float(n_rows) * n_classes
            grad_scale = host_scale(denom, dt)
        else:
            denom = distill_denominator(target, opts, n_rows, n_classes, dt, student.device)
            scale = mean_scale(denom)
            grad_scale = scale.reshape(1)
    loss_rows, grad = (distillation_rows.impl if eager else distillation_rows)(
        student, teacher, target, grad_scale, opts.divergence, opts.beta, opts.temperature, opts.ignore_index,
        backend, want_grad,
    )  # fmt: skip
    loss = reduce_rows(loss_rows, "mean" if denom is not None else opts.reduction, denom, (n_rows,))
    if scale is None:
        scale = torch.full((), 1.0 if grad_scale is None else grad_scale, dtype=dt, device=student.device)
    output = loss, grad, scale
    if eager and ctx is not None:
        Distillation.setup_context(ctx, (student, teacher, target, opts, backend, want_grad), output, False)
    return output


class Distillation(_BodyFunction):
    """Fused distillation loss of (N, r) student logits against a teacher's, reduced; outputs
    ``(loss, grad, 1/denominator)``, ``grad`` the forward's gradient for a unit ``grad_output``."""

    body = staticmethod(_distillation_body)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_ad=True):
        student, teacher, target, opts, backend, want_grad = inputs
        _, grad, scale = output
        ctx.mark_non_differentiable(grad, scale)
        ctx.set_materialize_grads(False)  # else autograd fills an (N, r) zeros for the unused grad output
        ctx.opts, ctx.backend = opts, backend
        ctx.save_for_backward(student, teacher, target, grad, scale)
        if forward_ad:
            ctx.save_for_forward(student, teacher, target, grad, scale)

    @staticmethod
    def jvp(ctx, student_t, *_):
        """Forward mode: the loss moves by ``<d loss / d student, student_t>`` (the teacher is a constant)."""
        student, teacher, target, grad, scale = ctx.saved_tensors
        opts, dt = ctx.opts, compute_dtype(student.dtype)
        n_rows = student.shape[0]
        loss_t = torch.zeros(n_rows, dtype=dt, device=student.device)
        if student_t is not None:
            if grad.shape != student.shape:  # the forward computed none
                ones = torch.ones(n_rows, dtype=dt, device=student.device)
                row_scale = ones * scale if opts.reduction in ("batchmean", "mean") else ones
                grad = distillation_grad_formula(student, teacher, target, opts, row_scale)
            loss_t = (grad.to(dt) * student_t.to(dt)).sum(-1)
        return (loss_t if opts.reduction == "none" else loss_t.sum()), None, None

    @staticmethod
    def backward(ctx, grad_loss, _grad, _scale):
        student, teacher, target, grad, scale = ctx.saved_tensors
        opts = ctx.opts
        n_rows = student.shape[0]
        dt = compute_dtype(student.dtype)
        if not ctx.needs_input_grad[0] or grad_loss is None:
            return None, None, None, None, None, None
        go = grad_loss.to(dt)
        if opts.reduction == "none":
            row_scale = go.reshape(n_rows)
        else:
            row_scale = (go * scale if opts.reduction != "sum" else go).reshape(1)
        if torch.is_grad_enabled():  # the backward is differentiated: the formula in torch ops
            g = distillation_grad_formula(student, teacher, target, opts, row_scale)
        elif grad.dtype in HALF and not _is_one(grad_loss):
            # fold grad_output into the kernel's float32 scale: one rounding, not two
            g = distillation_rows(
                student, teacher, target, row_scale, opts.divergence, opts.beta, opts.temperature,
                opts.ignore_index, ctx.backend, True,
            )[1]  # fmt: skip
        else:
            g = scale_grad(grad, grad_loss if opts.reduction != "none" else grad_loss.reshape(n_rows))
        return g, None, None, None, None, None


distillation = _applier(Distillation)

# --------------------------------------------------------------------------- statistics (cross_entropy_with_stats)
# The fused kernel with ``stats=``: each row's argmax and entropy come from the pass that computes the
# loss. Without a differentiable entropy the gradient is still computed in the forward
# (``CrossEntropyStats``, the ``CrossEntropy`` path); with one (``CrossEntropyWithEntropy``) the
# forward computes none, and the backward is one pass over the logits, the backend's
# ``cross_entropy_backward``, writing ``grad_loss_i dCE_i + grad_entropy_i dH_i`` for any pair of
# upstream gradients.


def stats_coef(target, weight, is_prob: bool, opts, lse: torch.Tensor, n_classes: int) -> torch.Tensor:
    """The coefficient of ``p`` in each row's gradient (``cross_entropy_backward``'s ``coef``): the target
    mass ``sum_j w_j ((1 - eps) q_ij + eps / r)`` (class targets: ``q`` one-hot) plus ``2 z_loss lse``.
    Ignored rows get anything: they are not read."""
    eps, dt = opts.label_smoothing, lse.dtype
    smoothing = eps / n_classes * (n_classes if weight is None else weight.sum(dtype=dt))
    if is_prob:
        mass = target.sum(-1) if weight is None else target @ weight
    else:
        mass = torch.ones_like(lse) if weight is None else weight[target.clamp(0, n_classes - 1)]
    return (1 - eps) * mass.to(dt) + smoothing + 2 * opts.z_loss * lse


class CrossEntropyStats(CrossEntropy):
    """:class:`CrossEntropy` through the kernel with statistics: outputs ``(loss, grad, 1/denominator,
    lse, argmax, entropy)``, the last three per row and without gradient. The loss and its gradient
    (computed in the forward, in place when asked) are exactly ``CrossEntropy``'s: the same body."""

    body = staticmethod(functools.partial(_cross_entropy_body, stats=True))

    @staticmethod
    def forward(*args):
        return _cross_entropy_body(_TRACED, *args, stats=True)

    @staticmethod
    def jvp(ctx, *tangents):
        return *CrossEntropy.jvp(ctx, *tangents), None, None, None


def _cross_entropy_entropy_body(ctx, logits, target, weight, is_prob, opts, backend):
    """:class:`CrossEntropyWithEntropy`'s forward (see ``_TRACED`` for ``ctx``)."""
    eager = ctx is not _TRACED
    ii, _, eps, z, cap = opts
    loss_rows, lse, _, argmax, entropy = (cross_entropy_stats_rows.impl if eager else cross_entropy_stats_rows)(
        logits, target, weight, None, ii, eps, z, cap, backend, False
    )
    output = loss_rows, entropy, lse, argmax
    if eager and ctx is not None:
        CrossEntropyWithEntropy.setup_context(ctx, (logits, target, weight, is_prob, opts, backend), output, False)
    return output


class CrossEntropyWithEntropy(_BodyFunction):
    """Per-row cross-entropy and entropy of (N, r) logits, both differentiable: outputs ``(loss_rows,
    entropy_rows, lse, argmax)``. The forward computes no gradient; the backward is one pass over the
    logits for any pair of upstream gradients (``cross_entropy_backward``), or, when the backward is
    itself differentiated, the same formula in torch ops."""

    body = staticmethod(_cross_entropy_entropy_body)

    @staticmethod
    def setup_context(ctx, inputs, output, forward_ad=True):
        logits, target, weight, is_prob, opts, backend = inputs
        _, entropy, lse, argmax = output
        ctx.mark_non_differentiable(lse, argmax)
        ctx.set_materialize_grads(False)
        ctx.opts, ctx.is_prob, ctx.backend = opts, is_prob, backend
        ctx.save_for_backward(logits, target, weight, lse, entropy)
        if forward_ad:
            ctx.save_for_forward(logits, target, weight)

    @staticmethod
    def jvp(ctx, logits_t, target_t, *_):
        """Forward mode: each row's loss and entropy move by their gradients dotted with the tangents."""
        logits, target, weight = ctx.saved_tensors
        dt = compute_dtype(logits.dtype)
        ones = torch.ones(logits.shape[0], dtype=dt, device=logits.device)
        loss_t, entropy_t = torch.zeros_like(ones), torch.zeros_like(ones)
        if logits_t is not None:
            x_t = logits_t.to(dt)
            g_loss = cross_entropy_grad_formula(logits, target, weight, ctx.is_prob, ctx.opts, ones)[0]
            g_entropy = cross_entropy_grad_formula(logits, target, weight, ctx.is_prob, ctx.opts, 0 * ones,
                                                   entropy_scale=ones)[0]  # fmt: skip
            loss_t, entropy_t = (g_loss.to(dt) * x_t).sum(-1), (g_entropy.to(dt) * x_t).sum(-1)
        if target_t is not None and ctx.is_prob:
            g_target = cross_entropy_grad_formula(logits, target, weight, True, ctx.opts, ones, True)[1]
            loss_t = loss_t + (g_target.to(dt) * target_t.to(dt)).sum(-1)
        return loss_t, entropy_t, None, None

    @staticmethod
    def backward(ctx, grad_loss, grad_entropy, _lse, _argmax):
        if grad_loss is None and grad_entropy is None:
            return None, None, None, None, None, None
        logits, target, weight, lse, entropy = ctx.saved_tensors
        opts, dt = ctx.opts, lse.dtype
        grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(dt)
        grad_entropy = None if grad_entropy is None else grad_entropy.to(dt)
        want_target = ctx.is_prob and ctx.needs_input_grad[1]
        if torch.is_grad_enabled():  # the backward is differentiated: the formula in torch ops
            g, g_target = cross_entropy_grad_formula(
                logits, target, weight, ctx.is_prob, opts, grad_loss, want_target, grad_entropy
            )
            return g, g_target, None, None, None, None
        g = g_target = None
        if ctx.needs_input_grad[0]:  # per-row factors: the door to the backend makes them dense
            coef = stats_coef(target, weight, ctx.is_prob, opts, lse, logits.shape[1])
            g = cross_entropy_backward(
                logits, target, weight, lse, coef, None if grad_entropy is None else entropy, grad_loss,
                grad_entropy, opts.ignore_index, opts.label_smoothing, logits.shape[1], 0, opts.softcap, ctx.backend,
            )  # fmt: skip
        if want_target:
            g_target = cross_entropy_grad_formula(logits, target, weight, True, opts, grad_loss, True)[1]
        return g, g_target, None, None, None, None


cross_entropy_with_entropy = _applier(CrossEntropyWithEntropy)
cross_entropy_stats = _applier(CrossEntropyStats)
