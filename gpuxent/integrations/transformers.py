"""Hugging Face Transformers causal LMs that train without materialising the (tokens, vocab) logits.

A causal LM's forward ends with ``logits = lm_head(hidden)``, perhaps a transform of those logits, and
``loss = self.loss_function(logits, labels, vocab_size, **kwargs)``, perhaps plus a router's auxiliary
loss: with a vocabulary of 32k to 256k the logits, their log-softmax and their gradient are the largest
tensors of the whole training step. ``apply_gpuxent`` serves any such model, found from the model
itself (no list of classes): the module ``get_output_embeddings()`` returns, its config, and the
``ForCausalLMLoss`` its ``loss_function`` resolves to. The patched forward runs the model's own forward,
``labels`` included, and changes two things, only when it trains on ``labels``:

1. a forward pre-hook on the output embedding takes the final hidden states on their way in and hands
   the head an empty slice of them, so the logits it computes (and any transform the model applies to
   them) have zero rows;
2. the model's ``loss_function`` (while it is Transformers' ``ForCausalLMLoss``) is replaced by one
   that, within such a call, returns ``gx.linear_cross_entropy`` on those hidden states and the head's
   weight and bias, as ``ForCausalLMLoss`` computes it: labels shifted one to the left (or the
   ``shift_labels`` given), ``ignore_index``, and with ``num_items_in_batch`` (the Trainer's gradient
   accumulation) the summed loss divided by it; outside such a call it is ``ForCausalLMLoss`` itself.

Whatever the forward does after its loss (a mixture of experts adding its router's auxiliary loss with
``output_router_logits``) it does as unpatched. The output's ``logits`` are ``None``.

The logit transforms are read from the config and given to the fused loss exactly: ``logit_scale``
multiplies the logits (Cohere), ``logits_scaling`` divides them (Granite), both folded into the hidden
states and the bias before the matmul, ``(s h) W^T + s b = s (h W^T + b)``, so autograd carries ``s`` into
every gradient (folding into the hidden costs a copy of the ``(tokens, hidden)`` states, not of the
``(vocab, hidden)`` weight); ``final_logit_softcapping`` caps them (Gemma2, Gemma3), the fused loss's
``softcap``. The first fused call of each model (and of each new set of transform values) checks this
against the model's own code: the pre-hook hands the head a few rows, rescaled to logits of magnitude
1, 100 and 10^4, instead of none, and the loss compares the logits the model passes it with the
transforms applied to the head's output. A model whose logits differ (an unknown transform), whose head
is not a plain ``nn.Linear`` (LoRA, quantised), whose ``loss_function`` is not ``ForCausalLMLoss``
(a custom loss), or whose forward does not hand its head's logits to its ``loss_function``, runs
unpatched, with a one-line warning naming the reason, or raises ``UnsupportedModelError`` under
``strict=True``; a check that fails during a call reruns that call unpatched.

Under ``torch.autocast`` the hidden states and the head's weights are cast to the autocast dtype, as
the head would be run. Without ``labels``, or in eval mode, the original forward runs unchanged.
``labels`` are found however they are passed (by keyword or by position, bound with the forward's own
signature), and the state of a fused call lives in a ``contextvars.ContextVar``, per thread and per
call: one patched model may train in one thread while another thread generates with it.

Subclasses are served as their base classes are, FSDP2's included: ``fully_shard`` before or after
``apply_gpuxent`` gives the unsharded loss and gradients, as long as the head is sharded with the
model (an output embedding given its own ``fully_shard`` holds its whole weight only within its own
call, and runs unpatched).

Tested with Transformers 5.25.0 on tiny models of Llama, Mistral, Qwen2, Qwen3, Qwen2-MoE, Qwen3-MoE,
Mixtral, Gemma, Gemma2, Gemma3 (text), Phi, Phi-3, GPT-NeoX, OPT, Falcon, StableLM, OLMo2, Granite,
Cohere, SmolLM3, GLM, gpt-oss and GPT-2. The patch before this generic one (Llama, Mistral, Qwen2,
Gemma2 and GPT-2 only) was tested with 4.50.3, 4.57.6 and 5.24.0; versions before 4.50 lack
``shift_labels`` or the ``loss_function`` hook.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import threading
import types
import warnings

import torch
import torch.nn.functional as F
from transformers import Gemma2ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

import gpuxent as gx

# The magnitudes of the logits of the rows the first fused call hands the head to check the transforms.
PROBE_MAGNITUDES = (1.0, 100.0, 10000.0)


class UnsupportedModelError(RuntimeError):
    """Raised under ``strict=True`` where the fused loss could not equal the model's own."""


@dataclasses.dataclass(frozen=True)
class LogitTransform:
    """What a causal LM does to its head's logits before the loss: ``softcap(logits * mul / div)``."""

    mul: float | None = None  # config.logit_scale (Cohere)
    div: float | None = None  # config.logits_scaling (Granite)
    softcap: float | None = None  # config.final_logit_softcapping (Gemma2, Gemma3): cap * tanh(logits / cap)

    @classmethod
    def from_config(cls, config):
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        return cls(
            *(getattr(config, name, None) for name in ("logit_scale", "logits_scaling", "final_logit_softcapping"))
        )

    def scale(self, x):
        """``x * mul / div``, in the order and with the operations the models use."""
        if self.mul is not None:
            x = x * self.mul
        if self.div is not None:
            x = x / self.div
        return x

    def __call__(self, logits):
        logits = self.scale(logits)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def causal_lm_loss(
    hidden,
    lm_head,
    labels,
    transform,
    backend,
    /,
    num_items_in_batch=None,
    ignore_index=-100,
    shift_labels=None,
    **_,
):
    """``ForCausalLMLoss(transform(lm_head(hidden)), labels, vocab_size, **kwargs)``, never forming the logits.

    The keywords after ``backend`` are ``ForCausalLMLoss``'s, and receive the same kwargs it does.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts token t + 1
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast runs lm_head: inputs and weights cast to its dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    # A scale of the logits, folded into the hidden states and the bias: exact, its gradient through autograd.
    hidden = transform.scale(hidden)
    bias = None if bias is None else transform.scale(bias)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    target = shift_labels.reshape(-1).to(hidden.device)
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = gx.linear_cross_entropy(
        hidden,
        weight,
        target,
        bias,
        ignore_index=ignore_index,
        reduction=reduction,
        softcap=transform.softcap,
        backend=backend,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# The state of the fused call running in this thread (or asyncio task). Per call, never on the shared
# model, so one model can train in one thread while it generates in another.
_CALL = contextvars.ContextVar("gpuxent_transformers_call", default=None)
_HOOK_LOCK = threading.Lock()


class _Unserved(Exception):
    """Raised inside a fused call that cannot give the model's own loss: the call reruns unpatched."""


class _Call:
    def __init__(self, head, transform, backend, probe):
        self.head, self.transform, self.backend = head, transform, backend
        self.probe = probe  # check the transform on a few rows (the model's first fused call)
        self.hidden = None  # the head's input, taken by the hook
        self.handed = None  # what the hook handed the head instead
        self.logits = None  # the (empty) logits the model passed to its loss_function
        self.done = False


def _take_hidden(module, inputs):
    """Forward pre-hook on the output embedding: within a fused call, keep its input and hand it no rows.

    Registered once per head, it stays; outside a fused call of its own model (another thread's call, a
    call without labels, generation) it does nothing.
    """
    call = _CALL.get()
    if call is None or call.head is not module:
        return None
    if call.hidden is not None:
        raise _Unserved("its forward runs its output embedding more than once")
    hidden = call.hidden = inputs[0]
    if call.probe:
        rows = hidden[..., : len(PROBE_MAGNITUDES), :].detach()
        with torch.no_grad():
            peak = F.linear(rows, module.weight).abs().amax(-1, keepdim=True).float()
            magnitudes = torch.tensor(PROBE_MAGNITUDES[: rows.shape[-2]], device=peak.device)[:, None]
            handed = (rows.float() * torch.where(peak > 0, magnitudes / peak, 1.0)).to(rows.dtype)
    else:
        handed = hidden[..., :0, :]
    call.handed = handed
    return (handed, *inputs[1:])


def _hook(head):
    """Register ``_take_hidden`` on ``head`` once."""
    with _HOOK_LOCK:
        if not any(hook is _take_hidden for hook in head._forward_pre_hooks.values()):
            head.register_forward_pre_hook(_take_hidden)


def _probe_mismatch(call, logits):
    """Why the logits the model passed to its loss are not ``transform(head(handed))``, or None when they are."""
    with torch.no_grad():
        expected = call.transform(F.linear(call.handed, call.head.weight, call.head.bias))
        got = logits.detach()
        if got.shape != expected.shape:
            return f"shape {tuple(got.shape)}, not {tuple(expected.shape)}"
        eps = max(torch.finfo(got.dtype).eps, torch.finfo(expected.dtype).eps)
        got, expected = got.float(), expected.float()
        row_peak = expected.abs().amax(-1, keepdim=True)
        error = ((got - expected).abs() / (expected.abs() + row_peak).clamp_min(1e-30)).amax()
        if not bool(error <= 16 * eps):
            return f"a relative difference of {float(error):.2g}"
    return None


def _fused_causal_lm_loss(logits, labels, vocab_size, **kwargs):
    """The patched model's ``loss_function``: ``ForCausalLMLoss``, fused within the model's own fused call."""
    call = _CALL.get()
    # The logits of the head this call watches have the rows it was handed: other logits (another model's,
    # reached from within this forward) get ForCausalLMLoss, as without the patch.
    if call is None or call.done or call.handed is None or logits.shape[:-1] != call.handed.shape[:-1]:
        return ForCausalLMLoss(logits, labels, vocab_size, **kwargs)
    call.done, call.logits = True, logits
    if call.head.out_features != vocab_size:
        raise _Unserved(f"its output embedding has {call.head.out_features} outputs, its loss {vocab_size} classes")
    if call.probe:
        mismatch = _probe_mismatch(call, logits)
        if mismatch is not None:
            raise _Unserved(
                f"the logits it passes to its loss_function are not its output embedding's with {call.transform} "
                f"applied ({mismatch}): a logit transform gpuxent does not know"
            )
    return causal_lm_loss(call.hidden, call.head, labels, call.transform, call.backend, **kwargs)


def _plain_linear(head):
    return isinstance(head, torch.nn.Linear) and type(head).forward is torch.nn.Linear.forward


def _sharded_on_its_own(head):
    """Whether FSDP2 shards the head by itself (``fully_shard(lm_head)``): its weight is whole only within its call."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a build without torch.distributed
        return False
    return isinstance(head, FSDPModule)


@functools.cache
def _signature(forward):
    """The forward's signature, computed once per class (its forward function)."""
    return inspect.signature(forward)


@functools.cache
def _may_call_loss_function(forward):
    """Whether the forward's code names ``loss_function`` (or delegates to a base class's forward)."""
    code = getattr(inspect.unwrap(forward), "__code__", None)
    return code is None or "loss_function" in code.co_names or "super" in code.co_names


def _labels(forward, self, args, kwargs):
    """The labels of a call, however they are passed."""
    if "labels" in kwargs or not args:
        return kwargs.get("labels")
    try:
        return _signature(forward).bind(self, *args, **kwargs).arguments.get("labels")
    except TypeError:  # the forward itself will say what is wrong with these arguments
        return None


def _unserved(model, forward):
    """Why the fused loss cannot be ``model``'s own as things stand, or None."""
    reason = model.__dict__.get("_gpuxent_unserved")
    if reason is not None:
        return reason
    head = model.get_output_embeddings()
    if not _plain_linear(head):
        return f"its output embedding is a {type(head).__module__}.{type(head).__qualname__}, not a plain nn.Linear"
    if _sharded_on_its_own(head):
        return "FSDP2 shards its output embedding on its own: shard it with the model (fully_shard(model))"
    loss_function = model.loss_function
    if loss_function is not ForCausalLMLoss and loss_function is not _fused_causal_lm_loss:
        return f"its loss_function is {getattr(loss_function, '__qualname__', loss_function)!r}, not ForCausalLMLoss"
    if not _may_call_loss_function(forward):
        return "its forward does not call self.loss_function"
    return None


def _step_aside(model, reason, strict):
    if strict:
        raise UnsupportedModelError(f"gpuxent cannot give {type(model).__name__} its own loss exactly: {reason}")
    warnings.warn(f"gpuxent: {type(model).__name__} trains unpatched: {reason}", stacklevel=3)


def _without_logits(output, logits):
    if isinstance(output, tuple):  # return_dict=False: the logits leave the tuple, as to_tuple drops a None
        return tuple(item for item in output if item is not logits)
    return dataclasses.replace(output, logits=None)


def fused_forward(forward, backend, strict=False):
    """The model's ``forward``, training on ``labels`` through ``causal_lm_loss`` instead of the logits."""

    @functools.wraps(forward)  # keeps the signature: the Trainer looks for **kwargs to pass num_items_in_batch
    def patched(self, *args, **kwargs):
        if not self.training or _labels(forward, self, args, kwargs) is None:
            return forward(self, *args, **kwargs)
        reason = _unserved(self, forward)
        if reason is not None:
            _step_aside(self, reason, strict)
            return forward(self, *args, **kwargs)
        head = self.get_output_embeddings()
        if self.loss_function is ForCausalLMLoss:
            self.loss_function = _fused_causal_lm_loss  # ForCausalLMLoss itself outside a fused call
        _hook(head)
        transform = LogitTransform.from_config(self.config)
        probe = self.__dict__.get("_gpuxent_checked") != transform
        call = _Call(head, transform, backend, probe)
        token = _CALL.set(call)
        try:
            output = forward(self, *args, **kwargs)
            if not call.done:
                raise _Unserved("its forward does not pass its output embedding's logits to self.loss_function")
        except _Unserved as unserved:
            reason = str(unserved)
        except Exception as error:
            if call.handed is not None and not call.done and hasattr(error, "add_note"):  # Python 3.11+
                error.add_note("(gpuxent had handed the model's output embedding a slice of the hidden states)")
            raise
        finally:
            _CALL.reset(token)
        if reason is not None:  # this class cannot be served: this call, and the next, run unpatched
            self.__dict__["_gpuxent_unserved"] = reason
            _step_aside(self, reason, strict)
            return forward(self, *args, **kwargs)
        if probe:
            self.__dict__["_gpuxent_checked"] = transform
        return _without_logits(output, call.logits)

    patched.gpuxent_original = forward
    return patched


def _original_forward(cls):
    return getattr(cls.forward, "gpuxent_original", cls.forward)


def apply_gpuxent(model, backend=None, strict=False):
    """Make ``model`` (one instance) compute its training loss with ``gx.linear_cross_entropy``.

    Parameters
    ----------
    model : a Transformers causal LM (``PreTrainedModel`` with an output embedding and a ``loss_function``)
        Patched in place; other instances of its class are left alone. Patching again replaces the patch.
    backend : str, optional
        The gpuxent backend of the loss (``gx.available_backends()``); ``None`` chooses by device.
    strict : bool
        Where the fused loss could not equal the model's own (see the module's docstring), raise
        ``UnsupportedModelError`` (now, or at the call that finds it) instead of warning and running
        the model unpatched.

    Returns
    -------
    The same ``model``. In training mode with ``labels`` its forward returns the loss of the unpatched
    model, and the same gradients, with ``logits=None``; otherwise it returns what it returned before.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    if not isinstance(model, torch.nn.Module) or get_head is None or get_head() is None:
        raise TypeError(
            "model: gpuxent patches Transformers causal LMs (a model with an output embedding and a loss_function), "
            f"got {type(model).__name__}"
        )
    forward = _original_forward(type(model))
    for finding in ("_gpuxent_unserved", "_gpuxent_checked"):  # what the last patch's calls found is found again
        model.__dict__.pop(finding, None)
    reason = _unserved(model, forward)
    if reason is not None:
        _step_aside(model, reason, strict)
    model.forward = types.MethodType(fused_forward(forward, backend, strict), model)
    return model


def _patch_class(cls, backend, strict=False):
    cls.forward = fused_forward(_original_forward(cls), backend, strict)


def apply_gpuxent_to_llama(backend=None, strict=False):
    """Patch ``LlamaForCausalLM``: every instance, present and future, as ``apply_gpuxent`` does one."""
    _patch_class(LlamaForCausalLM, backend, strict)


def apply_gpuxent_to_mistral(backend=None, strict=False):
    """Patch ``MistralForCausalLM``: every instance, present and future, as ``apply_gpuxent`` does one."""
    _patch_class(MistralForCausalLM, backend, strict)


def apply_gpuxent_to_qwen2(backend=None, strict=False):
    """Patch ``Qwen2ForCausalLM``: every instance, present and future, as ``apply_gpuxent`` does one."""
    _patch_class(Qwen2ForCausalLM, backend, strict)


def apply_gpuxent_to_gemma2(backend=None, strict=False):
    """Patch ``Gemma2ForCausalLM`` (its final logit softcap included), as ``apply_gpuxent`` does one model."""
    _patch_class(Gemma2ForCausalLM, backend, strict)


def apply_gpuxent_to_gpt2(backend=None, strict=False):
    """Patch ``GPT2LMHeadModel`` (its head tied to the embeddings), as ``apply_gpuxent`` does one model."""
    _patch_class(GPT2LMHeadModel, backend, strict)
