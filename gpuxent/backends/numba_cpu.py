"""CPU backend: fused softmax-cross-entropy kernels compiled with ``numba.njit``.

Rows run in parallel (``prange``); inside a row the work is split into chunks of ``CHUNK`` classes
that stay in L1. Each chunk is read once from memory: its max, its sum of exponentials and (when a
gradient is asked for) the exponentials themselves, stored in the gradient buffer, come out of the
same visit; a last sweep rescales them by ``exp(chunk_max - lse)`` into the gradient, while the row is
still in L2. So forward+backward reads the logits once and writes the gradient once.

``math.exp`` does not vectorize in numba (no SVML in PyPI's llvmlite), so ``_exp_neg`` is a
branch-free exp for non-positive arguments (Cody-Waite reduction, Taylor polynomial, exponent bits
built by an LLVM intrinsic) that LLVM turns into AVX-512 code; it is within 2 ulp in float32 and
float64.

Byte model, forward+backward, class targets: read N*r logits, write N*r gradient, read N targets,
write N losses and N lse.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import math
import mmap
import os
import sys
import threading

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

NAME = "numba_cpu"
CHUNK = 2048
ROWS_PER_TASK = 16
# Every fast-math flag except nnan/ninf: NaN and inf must propagate as in PyTorch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


# Below this many elements a call runs on one thread: waking the pool costs more than the work, and
# a parallel region stalls whenever another process holds one of the cores.
PARALLEL_MIN_ELEMENTS = 1 << 18

# --------------------------------------------------------------------------- threading layer
#
# numba runs ``prange`` loops on one process-wide threading layer (numba's docs, "The Threading Layers"):
#   tbb        fork-safe and thread-safe; needs the ``tbb`` package (a dependency where wheels exist)
#   omp        thread-safe; on Linux (GNU OpenMP) a forked child that enters a parallel region is killed
#   workqueue  fork-safe; two threads in parallel regions at once abort the process
# gpuxent must work in DataLoader workers and fork pools and from several Python threads, so unless the
# user chose a layer (NUMBA_THREADING_LAYER) or earlier numba code already started one, it asks for
# "forksafe": tbb, else OpenMP where its runtime is fork-safe (not GNU's), else workqueue, whose
# parallel regions ``_launch`` then runs one at a time (see ``_Regions``).

_TBB_LIBRARY = {"linux": "libtbb.so.12", "darwin": "libtbb.12.dylib", "win32": "tbb12.dll"}.get(sys.platform)


def _load_tbb() -> bool:
    """Load the runtime of the ``tbb`` wheel. pip puts it in ``<prefix>/lib``, on no loader path in a
    virtual environment, where numba looks it up by name and misses it; once loaded, that lookup finds it."""
    try:
        files = importlib.metadata.files("tbb") or []
    except importlib.metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name == _TBB_LIBRARY:
            try:
                ctypes.CDLL(str(f.locate()), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                return False
            return True
    return False


def _start_threading_layer() -> str:
    """Choose the layer (unless it is chosen already) and start it, from the importing thread: TBB
    shuts its workers down before a fork only when the thread that started them forks."""
    try:
        return nb.threading_layer()  # started by earlier numba code: it stays
    except ValueError:
        pass
    _load_tbb()
    if str(nb.config.THREADING_LAYER).lower() == "default":
        nb.config.THREADING_LAYER = "forksafe"
    nb.get_num_threads()  # starts the layer
    return nb.threading_layer()


class _Regions:
    """The parallel regions in flight, as a context manager around each launch.

    At most ``limit`` run at once (1 for workqueue, which aborts on a second). A fork waits until none
    runs and holds new ones back, so that no child inherits a half-run region (tasks queued for
    workers it does not have). TBB still says "Unable to join threads to shut down before fork()"
    when another live thread has run a region; its children work all the same (tested).
    """

    def __init__(self, limit: int | None):
        self.limit = limit
        self.cond = threading.Condition()
        self.active = 0
        self.forking = False

    def __enter__(self):
        with self.cond:
            self.cond.wait_for(lambda: not self.forking and (self.limit is None or self.active < self.limit))
            self.active += 1

    def __exit__(self, *exc):
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def before_fork(self):
        with self.cond:
            self.forking = True
            self.cond.wait_for(lambda: self.active == 0)

    def after_fork_in_parent(self):
        with self.cond:
            self.forking = False
            self.cond.notify_all()

    def after_fork_in_child(self):
        self.__init__(self.limit)  # the other threads, and any lock they held, are gone


THREADING_LAYER = _start_threading_layer()
_REGIONS = _Regions(1 if THREADING_LAYER == "workqueue" else None)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_REGIONS.before_fork,
        after_in_parent=_REGIONS.after_fork_in_parent,
        after_in_child=_REGIONS.after_fork_in_child,
    )


def _launch(kernel, n_elements: int, *args) -> None:
    """Run ``kernel(*args)`` on ``torch.get_num_threads()`` threads (one for a small input).

    numba's thread count belongs to the calling thread: it is set for the call and restored after.
    """
    threads = 1 if n_elements < PARALLEL_MIN_ELEMENTS else torch.get_num_threads()
    previous = nb.get_num_threads()
    nb.set_num_threads(max(1, min(threads, nb.config.NUMBA_NUM_THREADS)))
    try:
        with _REGIONS:
            kernel(*args)
    finally:
        nb.set_num_threads(previous)


# Outputs at least this large are backed by transparent huge pages (see ``empty``).
HUGEPAGE_MIN_BYTES = 1 << 22


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor for a kernel's output; a large one is backed by transparent huge pages.

    Faulting a fresh buffer in 4 KiB page by page costs more than the fused kernel itself: at
    4096 x 32768 float32 on 2 cores, kernel + ``torch.empty`` gradient took 260 ms, kernel + a
    ``MADV_HUGEPAGE`` mapping 67 ms, and the kernel alone 35 ms.
    """
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < HUGEPAGE_MIN_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps the mapping alive


def is_available() -> tuple[bool, str]:
    return True, f"numba {nb.__version__} on {nb.config.NUMBA_NUM_THREADS} CPU threads"


def supports(device: torch.device) -> bool:
    return device.type == "cpu"


# --------------------------------------------------------------------------- vectorizable math


@intrinsic
def _pow2(typingctx, k):
    """``2**k`` for an integral float ``k`` in the normal exponent range, from its exponent bits."""
    if k == types.float32:
        int_t, float_t, bias, shift = ir.IntType(32), ir.FloatType(), 127, 23
    elif k == types.float64:
        int_t, float_t, bias, shift = ir.IntType(64), ir.DoubleType(), 1023, 52
    else:
        return None

    def codegen(context, builder, signature, args):
        k_int = builder.fptosi(args[0], int_t)
        bits = builder.shl(builder.add(k_int, ir.Constant(int_t, bias)), ir.Constant(int_t, shift))
        return builder.bitcast(bits, float_t)

    return k(k), codegen


@intrinsic
def _maxnum(typingctx, a, b):
    """``llvm.maxnum``: the larger of two floats, ignoring a NaN; LLVM vectorizes its reductions
    (a compare-and-select max does not vectorize)."""
    if a != b or not isinstance(a, types.Float):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return a(a, b), codegen


def _exp_neg(x):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


def _make_exp_neg(dtype, lowest, degree):
    """exp(x) for x <= 0 (and NaN), without branches; below ``lowest`` it flushes to 0."""
    f = dtype.type
    lowest = f(lowest)
    log2e, ln2_hi, ln2_lo = f(1.4426950408889634), f(0.693145751953125), f(1.4286068203094172e-06)
    coeffs = tuple(f(1.0 / math.factorial(n)) for n in range(degree - 1, -1, -1))
    top = f(1.0 / math.factorial(degree))

    def impl(x):
        xc = x if x > lowest else lowest
        k = np.floor(xc * log2e + f(0.5))
        r = (xc - k * ln2_hi) - k * ln2_lo  # |r| <= ln2 / 2
        p = top
        for c in coeffs:  # Horner; a constant trip count that LLVM unrolls
            p = p * r + c
        y = p * _pow2(k)
        y = y if x > lowest else f(0)
        return y if x == x else x

    return impl


_EXP_NEG32 = _make_exp_neg(np.dtype(np.float32), -87.0, 7)
_EXP_NEG64 = _make_exp_neg(np.dtype(np.float64), -708.0, 12)


@overload(_exp_neg, fastmath=FASTMATH)
def _exp_neg_overload(x):
    if x == types.float32:
        return _EXP_NEG32
    if x == types.float64:
        return _EXP_NEG64
    return None


@nb.njit(fastmath=FASTMATH)
def _tanh(u):
    """tanh through ``_exp_neg`` so that it vectorizes: tanh|u| = (1 - e) / (1 + e), e = exp(-2|u|)."""
    a = abs(u)
    e = _exp_neg(-(a + a))
    t = (1 - e) / (1 + e)
    return t if u >= 0 else -t


# --------------------------------------------------------------------------- fused cross-entropy


def _cast(like, v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_cast)
def _cast_overload(like, v):
    """``v`` converted to the element type of the array ``like``."""
    ctor = np.dtype(like.dtype.name).type

    def impl(like, v):
        return ctor(v)

    return impl


# The chunk helpers take slices and loop from 0: an index that numba cannot prove non-negative gets
# a wraparound select that stops LLVM from vectorizing the loop.


@nb.njit(fastmath=FASTMATH)
def _softcap_chunk(x, softcap, y):
    inv = _cast(x, 1 / softcap)
    cap = _cast(x, softcap)
    for j in range(x.shape[0]):
        y[j] = cap * _tanh(x[j] * inv)


@nb.njit(fastmath=FASTMATH)
def _chunk_max(y):
    """Max of the chunk ignoring NaN; -inf when the chunk holds only -inf and NaN."""
    m = _cast(y, -np.inf)
    for j in range(y.shape[0]):
        m = _maxnum(m, y[j])
    return m


@nb.njit
def _empty_chunk_sum(y):
    """What a chunk whose max is -inf adds to the sum of exp: 0, or NaN if it holds a NaN."""
    for j in range(y.shape[0]):
        if y[j] != y[j]:
            return np.nan
    return 0.0


@nb.njit(fastmath=FASTMATH)
def _chunk_sumexp(y, m, e, store):
    """Sum of exp(y - m) over a chunk, in float64; the terms go to ``e`` when ``store``."""
    s = _cast(y, 0)
    if store:
        for j in range(y.shape[0]):
            v = _exp_neg(y[j] - m)
            e[j] = v
            s += v
    else:
        for j in range(y.shape[0]):
            s += _exp_neg(y[j] - m)
    return np.float64(s)


@nb.njit
def _combine(m_row, s_row, m, s):
    """Merge a chunk's (max, sum of exp) into the row's running pair."""
    if m_row == -np.inf:  # the first chunk (or only -inf so far): no rescaling, no exp call
        return m, s_row + s
    if m > m_row:
        return m, s_row * math.exp(m_row - m) + s
    return m_row, s_row + s * math.exp(m - m_row)


@nb.njit(fastmath=FASTMATH, inline="always")
def _ce_row(
    x, t, q, prob, w, sum_w, ignore_index, smoothing, z_loss, softcap, grad_scale, g, want_grad,
    ybuf, chunk_max,
):  # fmt: skip
    """Loss and lse of one row; writes the row's gradient into ``g`` when ``want_grad``.

    ``t`` is the class index, or ``q`` the probability row when ``prob``; ``w`` are the class
    weights (ones when none were given) and ``sum_w`` their sum. ``g`` may be ``x`` itself
    (in-place gradient) unless there is a softcap.
    """
    n_classes = x.shape[0]
    if not prob and t == ignore_index:
        if want_grad:
            for j in range(n_classes):
                g[j] = 0
        return 0.0, 0.0
    y_t = 0.0
    if not prob:  # read before the row is overwritten by an in-place gradient
        y_t = np.float64(x[t])
        if softcap > 0:
            y_t = softcap * math.tanh(y_t / softcap)
    eps_r = smoothing / n_classes
    m_row = -np.inf
    s_row = 0.0
    sum_wy = 0.0  # sum_c w_c y_c (label smoothing) or sum_c w_c q'_c y_c (probability targets)
    sum_wq = 0.0  # sum_c w_c q'_c (probability targets), q' = (1 - smoothing) q + smoothing / r
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    for c in range(n_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n_classes)
        n = hi - lo
        wc = w[lo:hi]
        if softcap > 0:
            y = ybuf[:n]
            _softcap_chunk(x[lo:hi], softcap, y)
        else:
            y = x[lo:hi]
        if prob:
            qc = q[lo:hi]
            keep = _cast(y, 1 - smoothing)
            add = _cast(y, eps_r)
            sq = _cast(y, 0)
            swq = _cast(y, 0)
            for j in range(n):
                wq = wc[j] * (keep * qc[j] + add)
                sq += wq * y[j]
                swq += wq
            sum_wy += sq
            sum_wq += swq
        elif smoothing > 0:
            sy = _cast(y, 0)
            for j in range(n):
                sy += wc[j] * y[j]
            sum_wy += sy
        m = _chunk_max(y)
        chunk_max[c] = m
        if m == -np.inf:  # a chunk of -inf adds nothing (and must not add exp(-inf + inf) = nan)
            s_row += _empty_chunk_sum(y)
            if want_grad:
                g[lo:hi] = 0
            continue
        s = _chunk_sumexp(y, m, g[lo:hi] if want_grad else y, want_grad)
        m_row, s_row = _combine(m_row, s_row, m, s)
    lse = m_row + math.log(s_row)

    if prob:
        loss = sum_wq * lse - sum_wy
        coef_p = sum_wq
        w_t = 0.0
    else:
        w_t = np.float64(w[t])
        loss = (1 - smoothing) * w_t * (lse - y_t)
        coef_p = (1 - smoothing) * w_t
        if smoothing > 0:
            loss += eps_r * (sum_w * lse - sum_wy)
            coef_p += eps_r * sum_w
    if z_loss > 0:
        loss += z_loss * lse * lse
        coef_p += 2 * z_loss * lse
    if not want_grad:
        return loss, lse

    # grad_j = scale * (coef_p * p_j - eps_r * w_j - (1 - eps) * w_t [j == t]), p_j = e_j exp(m_c - lse)
    # probability targets: grad_j = scale * (coef_p * p_j - w_j q'_j)
    for c in range(n_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n_classes)
        if chunk_max[c] == -np.inf and not (prob or smoothing > 0):
            continue  # p_j = 0 and no target mass: the zeros of the first sweep stay
        gc = g[lo:hi]
        wc = w[lo:hi]
        # a chunk of -inf holds p_j = 0 (its g_j are 0), but the smoothing / target terms still apply
        p_scale = math.exp(chunk_max[c] - lse) if chunk_max[c] > -np.inf else 0.0
        a = _cast(g, grad_scale * coef_p * p_scale)
        if prob:
            qc = q[lo:hi]
            b = _cast(g, grad_scale * (1 - smoothing))
            b0 = _cast(g, grad_scale * eps_r)
            for j in range(hi - lo):
                gc[j] = gc[j] * a - wc[j] * (b * qc[j] + b0)
        elif smoothing > 0:
            b = _cast(g, grad_scale * eps_r)
            for j in range(hi - lo):
                gc[j] = gc[j] * a - b * wc[j]
        else:
            for j in range(hi - lo):
                gc[j] = gc[j] * a
        if softcap > 0:
            xc = x[lo:hi]
            inv = _cast(x, 1 / softcap)
            for j in range(hi - lo):
                th = _tanh(xc[j] * inv)
                gc[j] = gc[j] * (1 - th * th)
    if not prob:
        d = grad_scale * (1 - smoothing) * w_t
        if softcap > 0:
            d *= 1 - (y_t / softcap) ** 2
        g[t] -= d
    return loss, lse


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _ce_kernel(
    logits, target, probs, prob, weight, sum_w, ignore_index, smoothing, z_loss, softcap,
    grad_scale, grad, want_grad, loss, lse,
):  # fmt: skip
    n_rows, n_classes = logits.shape
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    for task in prange(n_tasks):
        ybuf = np.empty(min(CHUNK, n_classes), logits.dtype)
        chunk_max = np.empty(n_chunks, np.float64)
        for i in range(task * ROWS_PER_TASK, min((task + 1) * ROWS_PER_TASK, n_rows)):
            loss_i, lse_i = _ce_row(
                logits[i], -1 if prob else target[i], probs[i if prob else 0], prob, weight, sum_w,
                ignore_index, smoothing, z_loss, softcap, grad_scale, grad[i if want_grad else 0],
                want_grad, ybuf, chunk_max,
            )  # fmt: skip
            loss[i] = loss_i
            lse[i] = lse_i


_TORCH_DTYPE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}


def _np(t: torch.Tensor, dtype=None) -> np.ndarray:
    """A numpy view of a CPU tensor (half precision is widened to float32: numpy has no bfloat16)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    a = t.detach().numpy()
    return a if dtype is None else a.astype(dtype, copy=False)


def cross_entropy(logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad):
    """Per-row loss and lse of a (N, r) float tensor; see ``gpuxent.backends`` for the contract."""
    x = np.ascontiguousarray(_np(logits))
    dt = x.dtype
    n_rows, n_classes = x.shape
    prob = target.is_floating_point()
    t = np.zeros(1, np.int64) if prob else _np(target, np.int64)
    q = np.ascontiguousarray(_np(target, dt)) if prob else np.zeros((1, 0), dt)
    w = np.ones(n_classes, dt) if weight is None else np.ascontiguousarray(_np(weight, dt))
    direct = grad is not None and grad.dtype == logits.dtype == _TORCH_DTYPE[dt] and grad.is_contiguous()
    direct = direct and not (softcap and grad.data_ptr() == logits.data_ptr())
    if grad is None:
        g = np.zeros((1, 0), dt)
    else:
        g = grad.detach().numpy() if direct else empty((n_rows, n_classes), _TORCH_DTYPE[dt]).numpy()
    loss = np.empty(n_rows, dt)
    lse = np.empty(n_rows, dt)
    row_scale = grad_scale is not None and grad_scale.numel() > 1
    if n_rows:
        _launch(
            _ce_kernel, x.size, x, t, q, prob, w, float(w.sum(dtype=np.float64)), int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap or 0.0),
            1.0 if grad_scale is None or row_scale else float(grad_scale), g, grad is not None, loss, lse,
        )  # fmt: skip
    if row_scale and grad is not None:  # INTERIM: a per-row factor after the kernel (moves into it)
        g *= _np(grad_scale, dt).reshape(-1, 1)
    if grad is not None and not direct:
        grad.copy_(torch.from_numpy(g))
    return torch.from_numpy(loss), torch.from_numpy(lse)


# --------------------------------------------------------------------------- softmax


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _softmax_kernel(x, out, log, row_max, row_log_sum):
    """Row max and log of the sum of exp(x - max) of every row; for a softmax (not ``log``) also
    ``out = exp(x - lse)``, stored chunk by chunk and rescaled like the cross-entropy gradient."""
    n_rows, n_classes = x.shape
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    for i in prange(n_rows):
        row = x[i]
        o = out[i]
        m_row = -np.inf
        s_row = 0.0
        chunk_max = np.empty(n_chunks, np.float64)
        for c in range(n_chunks):
            lo = c * CHUNK
            hi = min(lo + CHUNK, n_classes)
            m = _chunk_max(row[lo:hi])
            chunk_max[c] = m
            if m == -np.inf:
                s_row += _empty_chunk_sum(row[lo:hi])
                continue
            m_row, s_row = _combine(m_row, s_row, m, _chunk_sumexp(row[lo:hi], m, o[lo:hi], not log))
        row_max[i] = m_row
        row_log_sum[i] = math.log(s_row)
        if log:
            continue
        lse = m_row + row_log_sum[i]
        for c in range(n_chunks):
            lo = c * CHUNK
            oc = o[lo : min(lo + CHUNK, n_classes)]
            if chunk_max[c] == -np.inf:
                oc[:] = 0
                continue
            a = _cast(row, math.exp(chunk_max[c] - lse))
            for j in range(oc.shape[0]):
                oc[j] = oc[j] * a


@nb.njit(parallel=True, cache=True)  # no fast-math: reassociation would make it x - (m + log_sum)
def _log_softmax_kernel(x, row_max, row_log_sum, out):
    """out = (x - max) - log_sum: x - max is exact and log_sum small, where x - lse with an lse
    rounded to x's precision would cost up to half an ulp of the logits (5e-4 at |x| ~ 1e4 in float32)."""
    for i in prange(x.shape[0]):
        m = _cast(x, row_max[i])
        log_sum = _cast(x, row_log_sum[i])
        row = x[i]
        o = out[i]
        for j in range(row.shape[0]):
            o[j] = (row[j] - m) - log_sum


def softmax(x, *, log):
    """Row softmax (or log-softmax) of a (N, r) tensor, returned in the compute dtype."""
    a = np.ascontiguousarray(_np(x))
    out = empty(a.shape, _TORCH_DTYPE[a.dtype]).numpy()
    row_max = np.empty(a.shape[0])
    row_log_sum = np.empty(a.shape[0])
    if a.shape[0]:
        _launch(_softmax_kernel, a.size, a, out, log, row_max, row_log_sum)
        if log:
            _launch(_log_softmax_kernel, a.size, a, row_max, row_log_sum, out)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- binary cross-entropy


@nb.njit(parallel=True, cache=True)
def _bce_kernel(p, y, w, loss, grad):
    want_grad = grad.shape[0] > 0
    for i in prange(p.shape[0]):
        pi = p[i]
        yi = y[i]
        log_p = max(math.log(pi), -100.0) if pi > 0 else -100.0
        log_1mp = max(math.log1p(-pi), -100.0) if pi < 1 else -100.0
        loss[i] = -w[i] * (yi * log_p + (1 - yi) * log_1mp)
        if want_grad:
            grad[i] = w[i] * (pi - yi) / max((1 - pi) * pi, 1e-12)


@nb.njit(parallel=True, cache=True)
def _bce_logits_kernel(x, y, w, pos_weight, loss, grad):
    want_grad = grad.shape[0] > 0
    has_pw = pos_weight.shape[0] > 0
    for i in prange(x.shape[0]):
        xi = x[i]
        yi = y[i]
        lw = (pos_weight[i] - 1) * yi + 1 if has_pw else 1.0
        softplus_neg = max(-xi, 0.0) + math.log1p(math.exp(-abs(xi)))  # log(1 + exp(-x))
        loss[i] = w[i] * ((1 - yi) * xi + lw * softplus_neg)
        if want_grad:
            e = math.exp(-abs(xi))
            sig = 1 / (1 + e) if xi >= 0 else e / (1 + e)
            pw_y = pos_weight[i] * yi if has_pw else yi
            grad[i] = w[i] * (lw * sig - pw_y)


def _flat(t, dt):
    return np.ascontiguousarray(_np(t, dt)).reshape(-1)


def binary_cross_entropy(probs, target, weight, *, grad):
    p = _flat(probs, None)
    dt = p.dtype
    w = np.ones_like(p) if weight is None else _flat(weight, dt)
    loss = np.empty_like(p)
    g = np.empty_like(p) if grad is not None else np.empty(0, dt)
    _launch(_bce_kernel, p.size, p, _flat(target, dt), w, loss, g)
    if grad is not None:
        grad.copy_(torch.from_numpy(g).view(grad.shape))
    return torch.from_numpy(loss)


def binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad):
    x = _flat(logits, None)
    dt = x.dtype
    w = np.ones_like(x) if weight is None else _flat(weight, dt)
    pw = np.empty(0, dt) if pos_weight is None else _flat(pos_weight, dt)
    loss = np.empty_like(x)
    g = np.empty_like(x) if grad is not None else np.empty(0, dt)
    _launch(_bce_logits_kernel, x.size, x, _flat(target, dt), w, pw, loss, g)
    if grad is not None:
        grad.copy_(torch.from_numpy(g).view(grad.shape))
    return torch.from_numpy(loss)
