"""PyTorch autograd over the backends.

The fused kernel runs behind the custom op ``gpuxent::cross_entropy_rows`` so that
``torch.compile(fullgraph=True)`` sees one opaque node instead of breaking the graph. The
``autograd.Function`` around it keeps the gradient that the forward already computed; the backward
only scales it by ``grad_output`` (per row for ``reduction="none"``), and skips even that when
``grad_output`` is exactly 1 in eager mode.
"""

from typing import Optional

import torch

from . import backends


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else is computed (and its loss returned) in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("gpuxent::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    grad_scale: Optional[torch.Tensor],
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
    want_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss, lse and (when ``want_grad``) the scaled gradient of an (N, r) tensor."""
    module = backends.get(backend)
    grad = backends.empty(module, logits.shape, logits.dtype, logits.device) if want_grad else None
    loss, lse = module.cross_entropy(
        logits, target, weight, ignore_index=ignore_index, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap or None, grad_scale=grad_scale, grad=grad,
    )  # fmt: skip
    return loss, lse, grad if want_grad else logits.new_empty(0)


@cross_entropy_rows.register_fake
def _(logits, target, weight, grad_scale, ignore_index, label_smoothing, z_loss, softcap, backend, want_grad):
    n_rows = logits.shape[0]
    dt = compute_dtype(logits.dtype)
    grad = torch.empty_like(logits) if want_grad else logits.new_empty(0)
    return logits.new_empty(n_rows, dtype=dt), logits.new_empty(n_rows, dtype=dt), grad


def _is_one(t: torch.Tensor) -> bool:
    """Whether ``t`` is exactly 1, checked only where a host sync is allowed (eager mode)."""
    if t.numel() != 1 or torch.compiler.is_compiling():
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


class FusedLoss(torch.autograd.Function):
    """A loss whose forward returns ``(loss, grad)`` computed together; ``grad`` is saved and scaled.

    ``forward(ctx, fn, x, *args)``: ``fn(x, *args) -> (loss, grad, extra)``, where ``grad`` has
    ``x``'s shape and ``extra`` is an optional callable giving the gradients of the other tensor
    arguments from ``grad_output`` (or None).
    """

    @staticmethod
    def forward(ctx, fn, x, *args):
        loss, grad, extra = fn(x, *args)
        ctx.save_for_backward(grad)
        ctx.extra = extra
        ctx.n_args = len(args)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        others = ctx.extra(grad_output) if ctx.extra is not None else (None,) * ctx.n_args
        return (None, scale_grad(grad, grad_output), *others)


class Softmax(torch.autograd.Function):
    """Row softmax / log-softmax on the backend; the backward is two torch ops."""

    @staticmethod
    def forward(ctx, x, log, module):
        out = module.softmax(x, log=log).to(x.dtype)
        ctx.save_for_backward(out)
        ctx.log = log
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (out,) = ctx.saved_tensors
        if ctx.log:
            return grad_out - out.exp() * grad_out.sum(-1, keepdim=True), None, None
        return out * (grad_out - (grad_out * out).sum(-1, keepdim=True)), None, None
