"""Hugging Face Transformers causal LMs that train without materialising the (tokens, vocab) logits.

A causal LM's forward ends with ``logits = lm_head(hidden)`` and ``loss = self.loss_function(logits,
labels, ...)``: with a vocabulary of 32k to 256k the logits, their log-softmax and their gradient are
the largest tensors of the whole training step. The patched forward keeps the model's own forward and
changes two things, only when it trains on ``labels``:

1. a forward pre-hook on ``lm_head`` (the module ``get_output_embeddings()`` returns) takes the final
   hidden states on their way in and hands ``lm_head`` an empty slice of them, so the logits it computes
   (and any final logit softcap the model applies to them) have zero rows;
2. the loss is ``gx.linear_cross_entropy`` on those hidden states and ``lm_head``'s weight and bias,
   computed as ``transformers.loss.loss_utils.ForCausalLMLoss`` does: labels shifted one to the left
   (or the ``shift_labels`` given), ``ignore_index=-100``, and with ``num_items_in_batch`` (the
   Trainer's gradient accumulation) the summed loss divided by it.

The output's ``logits`` are then ``None``. Under ``torch.autocast`` the hidden states and the head's
weights are cast to the autocast dtype, as ``lm_head`` would be run. Without ``labels``, in eval mode,
with a custom ``loss_function``, or with a head that is not a plain ``nn.Linear`` (LoRA, quantised),
the original forward runs unchanged. ``labels`` are found however they are passed (by keyword or by
position, bound with the forward's own signature), and the state of a fused call (the hidden states
the hook takes) lives in a ``contextvars.ContextVar``, per thread and per call: one patched model may
train in one thread while another thread generates with it.

Tested with Transformers 4.50.3, 4.57.6 and 5.24.0 (older versions lack `shift_labels` or the `loss_function` hook).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import inspect
import threading
import types

import torch
import torch.nn.functional as F
from transformers import Gemma2ForCausalLM, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
from transformers.loss.loss_utils import ForCausalLMLoss

import gpuxent as gx

# The supported classes and the config attribute holding each one's final logit softcap (None: none).
FAMILIES = {
    LlamaForCausalLM: None,
    MistralForCausalLM: None,
    Qwen2ForCausalLM: None,
    Gemma2ForCausalLM: "final_logit_softcapping",
    GPT2LMHeadModel: None,
}


def causal_lm_loss(
    hidden, lm_head, labels, softcap, backend, /, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **_
):
    """``ForCausalLMLoss(lm_head(hidden), labels, vocab_size, **kwargs)``, softcap applied, never forming the logits.

    The keywords after ``backend`` are ``ForCausalLMLoss``'s, and receive the same forward kwargs it does.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]  # position t predicts token t + 1
    weight, bias = lm_head.weight, lm_head.bias
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):  # as autocast runs lm_head: inputs and weights cast to its dtype
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
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
        softcap=softcap,
        backend=backend,
    )
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


# The state of the fused call running in this thread (or asyncio task): the head it watches and the hidden
# states it took. Per call, never on the shared model, so one model can train in one thread while it
# generates in another.
_CALL = contextvars.ContextVar("gpuxent_transformers_call", default=None)
_HOOK_LOCK = threading.Lock()


class _Call:
    __slots__ = ("head", "hidden")

    def __init__(self, head):
        self.head, self.hidden = head, []


def _take_hidden(module, inputs):
    """Forward pre-hook on the output embedding: within a fused call, keep its input and hand it an empty slice."""
    call = _CALL.get()
    if call is None or call.head is not module:
        return None  # another thread's call, a call without labels, generation: the head runs as it ships
    call.hidden.append(inputs[0])
    return (inputs[0][..., :0, :], *inputs[1:])


def _hook(head):
    """Register ``_take_hidden`` on ``head`` once; it stays, and does nothing outside a fused call."""
    with _HOOK_LOCK:
        if not any(hook is _take_hidden for hook in head._forward_pre_hooks.values()):
            head.register_forward_pre_hook(_take_hidden)


@functools.lru_cache(maxsize=None)
def _signature(forward):
    """The forward's signature, computed once per class (its forward function)."""
    return inspect.signature(forward)


def _split_labels(forward, self, args, kwargs):
    """``(labels, args, kwargs)``: the labels, however passed, and the call's arguments without them."""
    if "labels" in kwargs or not args:
        kwargs = dict(kwargs)
        return kwargs.pop("labels", None), args, kwargs
    try:
        bound = _signature(forward).bind(self, *args, **kwargs)
    except TypeError:  # the forward itself will say what is wrong with these arguments
        return None, args, kwargs
    labels = bound.arguments.get("labels")
    if labels is None:
        return None, args, kwargs
    bound.arguments["labels"] = None
    return labels, bound.args[1:], bound.kwargs


def fused_forward(forward, softcap_attr, backend):
    """The model's ``forward``, training on ``labels`` through ``causal_lm_loss`` instead of the logits."""

    @functools.wraps(forward)  # keeps the signature: the Trainer looks for **kwargs to pass num_items_in_batch
    def patched(self, *args, **kwargs):
        lm_head = self.get_output_embeddings()
        # Where the fused loss would not be the model's own (a custom loss_function, a LoRA or quantised head),
        # or there is no training loss to compute, the model runs as it ships.
        standard = self.loss_function is ForCausalLMLoss and type(lm_head) is torch.nn.Linear
        if not self.training or not standard:
            return forward(self, *args, **kwargs)
        labels, args, kwargs = _split_labels(forward, self, args, kwargs)
        if labels is None:
            return forward(self, *args, **kwargs)
        _hook(lm_head)
        call = _Call(lm_head)
        token = _CALL.set(call)
        try:
            output = forward(self, *args, **kwargs)
        finally:
            _CALL.reset(token)
        if len(call.hidden) != 1:
            raise RuntimeError(
                f"gpuxent: {type(self).__name__}'s forward ran its output embedding {len(call.hidden)} times, not once"
            )
        softcap = getattr(self.config, softcap_attr) if softcap_attr else None
        loss = causal_lm_loss(call.hidden[0], lm_head, labels, softcap, backend, **kwargs)
        if isinstance(output, tuple):  # return_dict=False: (logits, *rest) becomes (loss, *rest)
            return (loss, *output[1:])
        return dataclasses.replace(output, loss=loss, logits=None)

    patched.gpuxent_original = forward
    return patched


def _family(cls):
    for base in cls.__mro__:  # a subclass of a supported class is served as its base is
        if base in FAMILIES:
            return FAMILIES[base]
    names = ", ".join(family.__name__ for family in FAMILIES)
    raise TypeError(f"model: gpuxent patches {names} and their subclasses, got {cls.__name__}")


def _original_forward(cls):
    return getattr(cls.forward, "gpuxent_original", cls.forward)


def apply_gpuxent(model, backend=None):
    """Make ``model`` (one instance) compute its training loss with ``gx.linear_cross_entropy``.

    Parameters
    ----------
    model : LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Gemma2ForCausalLM or GPT2LMHeadModel
        (or a subclass of one). Patched in place; other instances of its class are left alone. Patching again replaces the patch.
    backend : str, optional
        The gpuxent backend of the loss (``gx.available_backends()``); ``None`` chooses by device.

    Returns
    -------
    The same ``model``. In training mode with ``labels`` its forward returns the loss of the unpatched
    model, and the same gradients, with ``logits=None``; otherwise it returns what it returned before.
    """
    cls = type(model)
    softcap_attr = _family(cls)
    model.forward = types.MethodType(fused_forward(_original_forward(cls), softcap_attr, backend), model)
    return model


def _patch_class(cls, backend):
    cls.forward = fused_forward(_original_forward(cls), _family(cls), backend)


def apply_gpuxent_to_llama(backend=None):
    """Patch ``LlamaForCausalLM``: every instance, present and future, as ``apply_gpuxent`` does one."""
    _patch_class(LlamaForCausalLM, backend)


def apply_gpuxent_to_mistral(backend=None):
    """Patch ``MistralForCausalLM``: every instance, present and future, as ``apply_gpuxent`` does one."""
    _patch_class(MistralForCausalLM, backend)


def apply_gpuxent_to_qwen2(backend=None):
    """Patch ``Qwen2ForCausalLM``: every instance, present and future, as ``apply_gpuxent`` does one."""
    _patch_class(Qwen2ForCausalLM, backend)


def apply_gpuxent_to_gemma2(backend=None):
    """Patch ``Gemma2ForCausalLM`` (its final logit softcap included), as ``apply_gpuxent`` does one model."""
    _patch_class(Gemma2ForCausalLM, backend)


def apply_gpuxent_to_gpt2(backend=None):
    """Patch ``GPT2LMHeadModel`` (its head tied to the embeddings), as ``apply_gpuxent`` does one model."""
    _patch_class(GPT2LMHeadModel, backend)
