"""THE backend registry: one table, the selection rule.

Every backend is one module of this package with the same functions, called by
``gpuxent.functional`` on validated torch tensors (numpy inputs arrive as zero-copy CPU tensors):

``is_available() -> (bool, reason)``
    Whether the backend can run here, and why (not).
``supports(device) -> bool``
    Whether it runs on tensors of this ``torch.device``.
``cross_entropy(logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad)``
    ``logits``: (N, r) float tensor with unit class stride. ``target``: (N,) int64 class indices,
    already checked to lie in ``[0, r)`` or equal ``ignore_index``, or (N, r) float probabilities.
    ``weight``: (r,) class weights in the compute dtype, or None. ``grad_scale``: None, a float or a
    one-element tensor on the device: the factor of every kept row's gradient (1/denominator for a
    mean). ``grad``: None (forward only) or an (N, r) tensor that receives ``grad_scale * d loss_i /
    d logits_i`` (ignored rows get 0); it may be ``logits`` itself (in-place gradient).
    Returns ``(loss, lse)``: (N,) per-row losses (0 for ignored rows; ``z_loss * lse**2`` included)
    and log-sum-exp of the (soft-capped) logits, in the compute dtype (float32 for half inputs).
``empty(shape, dtype)`` (optional)
    Allocates the gradient buffers the backend writes; ``torch.empty`` on the device otherwise.
``softmax(x, *, log)``
    (N, r) -> (N, r) row softmax or log-softmax, in the compute dtype.
``binary_cross_entropy(probs, target, weight, *, grad)`` and
``binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad)``
    Elementwise losses of same-shape tensors (``weight``/``pos_weight`` already broadcast to that
    shape, or None), returned flat in the compute dtype; ``grad`` (None or a tensor of the input's
    shape) receives the elementwise derivative times ``weight``.

Backends are imported once, when this package is; an import that fails makes that backend
unavailable (``status()`` says why) and nothing else.

Selection: the ``backend=`` argument, else ``GPUXENT_BACKEND``, else by device (CPU -> ``numba_cpu``,
CUDA -> ``triton``, or ``numba_cuda`` where triton is missing). An automatic choice falls back
quietly; a backend asked for by name that cannot run raises ``RuntimeError`` saying why.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use
    devices: tuple[str, ...]  # device types it is chosen for automatically


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("numba_cpu", "gpuxent.backends.numba_cpu", ("cpu",)),
        Backend("triton", "gpuxent.backends.triton", ("cuda",)),
        Backend("numba_cuda", "gpuxent.backends.numba_cuda", ("cuda",)),
    )
}
ENV_VAR = "GPUXENT_BACKEND"


_LOADED: dict[str, tuple[ModuleType | None, str]] = {}


def _load(name: str) -> tuple[ModuleType | None, str]:
    """The backend's module (None if it cannot run here) and the reason."""
    if name not in _LOADED:
        try:
            module = importlib.import_module(REGISTRY[name].module)
        except Exception as exc:  # a missing or broken framework makes the backend unavailable
            _LOADED[name] = None, f"cannot import: {type(exc).__name__}: {exc}"
        else:
            ok, reason = module.is_available()
            _LOADED[name] = (module if ok else None), reason
    return _LOADED[name]


# Loaded now, not on first use: torch.compile traces the dispatch inside a model, and dynamo cannot
# trace an import (a graph break, an error under fullgraph=True); a plain dict lookup it can.
for _name in REGISTRY:
    _load(_name)


def status() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every registered backend."""
    return {name: (_load(name)[0] is not None, _load(name)[1]) for name in REGISTRY}


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [name for name in REGISTRY if _load(name)[0] is not None]


def get(name: str) -> ModuleType:
    """The module of backend ``name``; ``RuntimeError`` saying why when it cannot run here."""
    if name not in REGISTRY:
        raise ValueError(f"backend: unknown backend {name!r}; known: {sorted(REGISTRY)}")
    module, reason = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return module


def empty(module: ModuleType, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new output buffer from the backend's allocator, if it has one."""
    alloc = getattr(module, "empty", None)
    return alloc(tuple(shape), dtype) if alloc is not None else torch.empty(tuple(shape), dtype=dtype, device=device)


def select(device: torch.device, backend: str | None = None) -> ModuleType:
    """The backend for data on ``device``: explicit name, else $GPUXENT_BACKEND, else by device."""
    name = backend or os.environ.get(ENV_VAR) or None
    if name is not None:
        module = get(name)
        if not module.supports(device):
            raise RuntimeError(f"backend {name!r} cannot run on {device.type} data")
        return module
    for b in REGISTRY.values():
        if device.type in b.devices:
            module, _ = _load(b.name)
            if module is not None and module.supports(device):
                return module
    raise RuntimeError(f"no gpuxent backend can run on {device.type} data: {status()}")
