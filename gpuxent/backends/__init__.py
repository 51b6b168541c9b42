"""THE backend registry: one table, the selection rule.

Every backend is one module of this package with the same functions, called only by the registered
ops of ``gpuxent.autograd`` (the one door into a backend) on validated torch tensors (numpy inputs
arrive as zero-copy CPU tensors):

``is_available() -> (bool, reason)``
    Whether the backend can run here, and why (not).
``supports(device) -> bool``
    Whether it runs on tensors of this ``torch.device``.
``cross_entropy(logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad)``
    ``logits``: (N, r) float tensor with unit class stride. ``target``: (N,) int64 class indices,
    checked to lie in ``[0, r)`` or equal ``ignore_index`` (where a check was not allowed, e.g. under
    torch.compile, a bad index gives a NaN row, never an out-of-bounds read), or (N, r) float
    probabilities. ``weight``: (r,) class weights in the compute dtype, or None. ``softcap``: 0.0 for
    none. ``grad_scale``: None, a float, or a tensor on the device of 1 element or of N elements (a
    factor per row): it multiplies every kept row's gradient (1/denominator for a mean, times the
    upstream gradient), applied in the compute dtype before the one rounding to the gradient's dtype.
    ``grad``: None (forward only) or an (N, r) tensor of the logits' dtype that receives ``grad_scale *
    d loss_i / d logits_i`` (ignored rows get 0); it may be ``logits`` itself (in-place gradient), and
    the backend writes it directly, whatever the dtype.
    Returns ``(loss, lse)``: (N,) per-row losses (0 for ignored rows; ``z_loss * lse**2`` included)
    and log-sum-exp of the (soft-capped) logits, in the compute dtype (float32 for half inputs).
    ``stats`` (keyword, default None): None, or ``(argmax, entropy)``, two contiguous (N,) tensors on the
    device (int64 and the compute dtype) that the same pass over the logits fills, per row: the index
    of the largest (soft-capped) logit as ``torch.argmax`` gives it (ties: the lowest index; a NaN
    counts as the largest, the first NaN's index; 0 for a row of -inf), and the entropy
    ``H = lse - sum_j p_j y_j`` of the row's softmax, accumulated stably as ``log s - t / s`` with
    ``s = sum_j exp(y_j - m)`` and ``t = sum_j exp(y_j - m) (y_j - m)`` rescaled online like ``s``
    (NaN where the loss is NaN). Ignored rows are not read: 0 in both, for the caller to mask.
    Without ``stats`` the kernel is its variant without them (a compile-time specialisation: no
    extra work). Byte model with ``stats``: the same as without, plus 16 bytes per row written.
``row_partials(logits, target, weight, *, ignore_index, softcap, class_offset, smoothing, out)``
    One read of ``logits`` (N, r_local), a slice of the classes that starts at global class
    ``class_offset``, writing per row into ``out`` (N, 5) compute dtype: ``m`` the max of ``y`` (the
    soft-capped logits; -inf for an empty slice), ``s = sum_j exp(y_j - m)``, ``a = sum_j w_j q_j (y_j -
    m)``, ``b = sum_j w_j q_j`` (class targets: ``q`` one-hot of the global index ``target - class_offset``
    when it falls in the slice, so ``a = w_t (y_t - m)``, ``b = w_t`` there and 0 elsewhere; probability
    targets: ``target`` is the (N, r_local) slice of ``q``) and, only when ``smoothing``, ``c = sum_j
    w_j y_j`` (else 0). An ignored row is not read: ``(-inf, 0, 0, 0, 0)``. The ranks combine them into
    the loss over the whole vocabulary (``gpuxent.distributed``): with ``M`` the max of the ``m``,
    ``S = sum exp(m - M) s``, ``A = sum a + b (m - M)``, ``lse = M + log S``, ``W = sum_j w_j`` over all
    classes, ``loss = (1 - eps)(B log S - A) + eps / R (W lse - C) + z_loss lse**2``.
``cross_entropy_backward(logits, target, weight, lse, coef, entropy, *, ignore_index, label_smoothing,
n_classes, class_offset, softcap, grad_scale, entropy_scale, grad)``
    The gradient of a slice of the classes (as in ``row_partials``) given each row's ``lse`` over the
    WHOLE vocabulary and its coefficient ``coef`` ((N,), compute dtype). ``entropy``: None or (N,)
    row entropies ``H = lse - E_p[y]``; ``n_classes``: the global vocabulary size R of the eps / R
    smoothing term; ``grad_scale`` as in ``cross_entropy``; ``entropy_scale``: None or a 1- or
    N-element tensor; ``grad``: an (N, r_local) tensor of the logits' dtype, possibly ``logits`` itself.
    Writes, with ``p = exp(y - lse)`` and ``m_j = w_j ((1 - eps) q_j + eps / R)``,
    ``g_j = [grad_scale (coef p_j - m_j) + entropy_scale p_j ((lse - H) - y_j)] dy_j/dx_j``, rounded once
    to ``grad``'s dtype; ignored rows get 0 and are not read. For cross-entropy ``coef = sum_j m_j``
    (whole vocabulary) ``+ 2 z_loss lse``; the entropy term is ``d H / d y``.
``distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, grad_scale, grad)``
    ``student``, ``teacher``: (N, r) float tensors of one dtype with unit class stride. ``target``: None
    (every row kept) or (N,) int64, read only to leave out the rows equal to ``ignore_index``.
    ``divergence``: ``"kl"`` (KL(p_t || p_s)), ``"reverse_kl"`` (KL(p_s || p_t)) or ``"jsd"`` (``beta``
    KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s), of p = softmax(logits /
    ``temperature``). ``grad_scale`` as in ``cross_entropy``. ``grad``: None or an (N, r) tensor of the
    student's dtype that receives ``grad_scale * d loss_i / d student_i`` (left-out rows 0), rounded once.
    Returns (N,) per-row ``temperature**2 * divergence`` (0 for left-out rows) in the compute dtype.
    One pass over both rows gives both lse and the cross terms; the gradient is one more (jsd: two).
``empty(shape, dtype)`` (optional)
    Allocates the gradient buffers the backend writes; ``torch.empty`` on the device otherwise.
``softmax(x, *, log)``
    (N, r) -> (N, r) row softmax or log-softmax, in the compute dtype.
``binary_cross_entropy(probs, target, weight, *, grad)`` and
``binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad)``
    Elementwise losses of same-shape tensors (``weight``/``pos_weight`` already broadcast to that
    shape, or None), returned flat in the compute dtype; ``grad`` (None or a tensor of the input's
    shape) receives the elementwise derivative times ``weight``.

A backend's module is imported on first use (CPU: at the first CPU call; the GPU backends at the
first CUDA tensor or the first call that names them), so ``import gpuxent`` imports no GPU framework
and initialises no CUDA context. An import that fails makes that backend unavailable (``status()``
says why) and nothing else. The probe is a constant to ``torch.compile`` and the backend itself is
called inside the registered ops (``gpuxent.autograd``), so the dispatch stays traceable.

The backends: ``numba_cpu`` (``numba.njit``), ``triton``, ``numba_cuda`` (``numba.cuda.jit``) and
``torch`` (``torch_ops``: the same contract in plain torch operations, on any device; the reference the
tests compare against, and the fallback where no kernel backend runs).

Selection: the ``backend=`` argument, else ``GPUXENT_BACKEND``, else by device: the first backend of
``REGISTRY`` chosen for that device type that can run there (CPU -> ``numba_cpu``; CUDA -> ``triton``,
or ``numba_cuda`` where triton is missing); any other device (MPS, XPU, meta, ...), or a device whose
kernel backends cannot run (CPU with a broken numba, CUDA without triton and numba-cuda) -> ``torch``.
An automatic choice falls back quietly; a backend asked for by name that cannot run raises
``RuntimeError`` saying why.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from types import ModuleType

import torch


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use
    devices: tuple[str, ...]  # device types it is chosen for automatically; "*": any (the fallback, listed last)


REGISTRY: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("numba_cpu", "gpuxent.backends.numba_cpu", ("cpu",)),
        Backend("triton", "gpuxent.backends.triton", ("cuda",)),
        Backend("numba_cuda", "gpuxent.backends.numba_cuda", ("cuda",)),
        Backend("torch", "gpuxent.backends.torch_ops", ("*",)),
    )
}
ENV_VAR = "GPUXENT_BACKEND"


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of every kernel's arithmetic and of the returned losses: float64 stays float64,
    everything else (float32, float16, bfloat16) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_LOADED: dict[str, tuple[ModuleType | None, str]] = {}


_LOAD_LOCK = threading.RLock()  # one import at a time: a thread must not see a half-imported framework


def _load(name: str) -> tuple[ModuleType | None, str]:
    """The backend's module (None if it cannot run here) and the reason."""
    if name in _LOADED:
        return _LOADED[name]
    with _LOAD_LOCK:
        return _load_locked(name)


def _load_locked(name: str) -> tuple[ModuleType | None, str]:
    if name not in _LOADED:
        try:
            module = importlib.import_module(REGISTRY[name].module)
        except Exception as exc:  # a missing or broken framework makes the backend unavailable
            hint = "" if name == "numba_cpu" else "; pip install 'gpuxent[cuda12]' (or [cuda13]) brings it"
            _LOADED[name] = None, f"cannot import: {type(exc).__name__}: {exc}{hint}"
        else:
            ok, reason = module.is_available()
            _LOADED[name] = (module if ok else None), reason
    return _LOADED[name]


def _why_not(name: str, device_type: str) -> str:
    """Why backend ``name`` cannot run on ``device_type`` data ("" when it can): a constant to dynamo."""
    module, reason = _load(name)
    if module is None:
        return f"backend {name!r} cannot run here: {reason}"
    if not module.supports(torch.device(device_type)):
        return f"backend {name!r} cannot run on {device_type} data"
    return ""


# What ``torch.compiler.assume_constant_result`` does, without importing dynamo (which imports triton)
# when gpuxent is imported: dynamo calls the probe at trace time instead of tracing its import.
_why_not._dynamo_marked_constant = True


def status() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for every registered backend (imports them all)."""
    return {name: (_load(name)[0] is not None, _load(name)[1]) for name in REGISTRY}


def available_backends() -> list[str]:
    """Names of the backends that can run here (imports them all)."""
    return [name for name in REGISTRY if _load(name)[0] is not None]


def module(name: str) -> ModuleType:
    """The module of backend ``name``, already chosen by :func:`select`."""
    return _LOADED[name][0] if name in _LOADED else get(name)


def get(name: str) -> ModuleType:
    """The module of backend ``name``; ``RuntimeError`` saying why when it cannot run here."""
    if name not in REGISTRY:
        raise ValueError(f"backend: unknown backend {name!r}; known: {sorted(REGISTRY)}")
    mod, reason = _load(name)
    if mod is None:
        raise RuntimeError(f"backend {name!r} cannot run here: {reason}")
    return mod


def empty(name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A new output buffer from backend ``name``'s allocator, if it has one."""
    alloc = getattr(module(name), "empty", None)
    return alloc(tuple(shape), dtype) if alloc is not None else torch.empty(tuple(shape), dtype=dtype, device=device)


_SELECTED: dict[tuple, str] = {}


def select(device: torch.device, backend: str | None = None) -> str:
    """The name of the backend for data on ``device``: ``backend``, else $GPUXENT_BACKEND, else by device
    (the first of ``REGISTRY`` chosen for its type that can run there; ``torch`` for any other).
    Remembered per device type, argument and variable: the probes are constants of the process."""
    if torch.compiler.is_compiling():
        return _select(device, backend)
    key = (device.type, backend, os.environ.get(ENV_VAR))
    name = _SELECTED.get(key) if isinstance(backend, (str, type(None))) else None
    if name is None:
        name = _SELECTED[key] = _select(device, backend)
    return name


def _select(device: torch.device, backend: str | None) -> str:
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name (str) or None, got {type(backend).__name__}")
    source, name = "backend", backend
    if name is None and os.environ.get(ENV_VAR):
        source, name = ENV_VAR, os.environ[ENV_VAR]
    if name is not None:
        if name not in REGISTRY:
            raise ValueError(f"{source}: unknown backend {name!r}; known: {sorted(REGISTRY)}")
        why = _why_not(name, device.type)
        if why:
            raise RuntimeError(f"{why} (asked for by {source})")
        return name
    for b in REGISTRY.values():  # in order: the kernel backends of the device type, then the fallback
        if (device.type in b.devices or "*" in b.devices) and not _why_not(b.name, device.type):
            return b.name
    raise RuntimeError(f"no gpuxent backend can run on {device.type} data: {status()}")
