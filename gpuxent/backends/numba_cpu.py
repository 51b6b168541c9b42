"""CPU backend: fused softmax-cross-entropy kernels compiled with ``numba.njit``.

Rows run in parallel (``prange``); inside a row the work is split into chunks of ``CHUNK`` classes
that stay in L1. Each chunk is read once from memory: its max, its sum of exponentials and (when a
gradient is asked for) the exponentials themselves, stored in the gradient buffer, come out of the
same visit; a last sweep rescales them by ``exp(chunk_max - lse)`` into the gradient, while the row is
still in L2. So forward+backward reads the logits once and writes the gradient once.

The gradient may be the logits themselves (in place): the kernel then passes ONE array as both, so
that LLVM sees one pointer. Given two arrays that are the same memory, the loops it vectorized behind
a runtime overlap check fall back to their scalar versions (the in-place path ran 3.5x slower than
the fresh one).

bfloat16 and float16 arrive as their bits (uint16 / int16 views, no copy), are widened to float32 in
registers, and the gradient is rounded once, on store (round to nearest even). Their exponentials
wait in a float32 row buffer per task instead of the gradient itself.

``math.exp`` does not vectorize in numba (no SVML in PyPI's llvmlite), so ``_exp_neg`` is a
branch-free exp for non-positive arguments (Cody-Waite reduction, Taylor polynomial, exponent bits
built by an LLVM intrinsic) that LLVM turns into AVX-512 code; it is within 2 ulp in float32 and
float64.

A row without a softmax (all -inf, or a NaN or +inf in it) gets a NaN gradient and, when kept, a
NaN loss, as in PyTorch.

Byte model, forward+backward, class targets: read N*r logits, write N*r gradient, read N targets,
write N losses and N lse. With ``stats`` (argmax and entropy of each row, from the same visit of each
chunk: the argmax from the chunk's max, a first-index search only when it beats the earlier chunks',
and the entropy's sum from the same exps) the same bytes plus N argmaxes and N entropies written.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.metadata
import math
import mmap
import os
import sys
import threading
import warnings

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.extending import intrinsic, overload

from . import rowmath

NAME = "numba_cpu"
CHUNK = 2048
# A task holds ROWS_PER_TASK rows, or more short ones: at least TASK_ELEMENTS logits, so that the
# per-task buffers and the scheduling are paid once per 64 K elements, not once per 16 short rows.
ROWS_PER_TASK = 16
TASK_ELEMENTS = 1 << 16
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


def _join_tbb_workers() -> None:
    """At exit, join numba's TBB workers before the C++ runtime tears down.

    numba never shuts its TBB pool down in a normal exit (its extension module is not unloaded), so
    the workers still run while static destructors do; with gloo's threads alive too (a torchrun or
    ``--nproc`` worker after ``destroy_process_group``) that ends in ``std::terminate`` ("terminate
    called without an active exception", SIGABRT) in one exit in five to ten on a busy machine.
    numba's pre-fork hook is the one place that joins them (``tbb::finalize``), and a fork whose child
    leaves at once runs it: measured, 0 aborts in 20 exits, against 2 in 14 without.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "multi-threaded, fork() may deadlock": not here
        try:
            pid = os.fork()
        except OSError:
            return
    if pid == 0:
        os._exit(0)  # nothing else: no Python cleanup, no C++ destructors in the child
    os.waitpid(pid, 0)


if THREADING_LAYER == "tbb" and hasattr(os, "fork"):
    atexit.register(_join_tbb_workers)


_SEEN: set = set()  # (kernel, dtype) pairs this process has run
COMPILE_NOTICE_S = 1.0


def _compile_notice(kernel, dtype) -> threading.Timer:
    """A line on stderr if the first call of ``kernel`` for ``dtype`` takes over ``COMPILE_NOTICE_S``:
    numba is compiling it (30-40 s; once, then it loads from its disk cache in about a second)."""
    cache = nb.config.CACHE_DIR or os.path.join(os.path.dirname(__file__), "__pycache__")
    name = getattr(kernel, "py_func", kernel).__name__.strip("_")
    dtype = {np.dtype(np.int16): "float16", np.dtype(np.uint16): "bfloat16"}.get(np.dtype(dtype), dtype)
    msg = (f"gpuxent: compiling the numba_cpu {name} for {dtype} (about 30 s, once per dtype; "
           f"cached in {cache}; `gpuxent warmup` compiles every variant ahead of time)")  # fmt: skip
    timer = threading.Timer(COMPILE_NOTICE_S, lambda: print(msg, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    return timer


def _launch(kernel, n_elements: int, *args) -> None:
    """Run ``kernel(*args)`` on ``torch.get_num_threads()`` threads (one for a small input).

    numba's thread count belongs to the calling thread: it is set for the call and restored after.
    """
    key = (kernel, args[0].dtype)
    notice = None if key in _SEEN else _compile_notice(kernel, args[0].dtype)
    threads = max(1, min(1 if n_elements < PARALLEL_MIN_ELEMENTS else torch.get_num_threads(),
                         nb.config.NUMBA_NUM_THREADS))  # fmt: skip
    previous = nb.get_num_threads()
    if threads != previous:
        nb.set_num_threads(threads)
    try:
        with _REGIONS:
            kernel(*args)
    finally:
        if threads != previous:
            nb.set_num_threads(previous)
        if notice is not None:
            notice.cancel()
            _SEEN.add(key)


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
    """``llvm.maxnum`` under ``nnan``: the larger of two floats, a plain ``vmaxps``; LLVM vectorizes
    its reductions (a compare-and-select max does not) and ends them with a shuffle tree. Without
    ``nnan`` the NaN handling costs a compare and a blend per vector and the reduction becomes a
    chain of 16 scalar steps (~40 ns, more than the rest of a 128-class row). A NaN may or may not
    come out as the max: either way it reaches the row's sum of exp (``_chunk_sumexp`` or
    ``_empty_chunk_sum``), which is what makes the row NaN."""
    if a != b or not isinstance(a, types.Float):
        return None

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args, fastmath=("nnan",))

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


# --------------------------------------------------------------------------- half precision, in registers
# numpy has no bfloat16 and numba no float16: half tensors reach the kernels as their bits (bfloat16
# as uint16, float16 as int16), are widened to float32 as they are loaded and rounded once on store.

_HALF_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}


@intrinsic
def _half_to_float(typingctx, bits):
    """float32 from the bits of a bfloat16 (uint16: the top half of a float32) or a float16 (int16)."""
    i32 = ir.IntType(32)
    if bits == types.uint16:

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

    elif bits == types.int16:

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    else:
        return None
    return types.float32(bits), codegen


@intrinsic
def _float_to_half(typingctx, like, v):
    """The bits of float32 ``v`` rounded to nearest even: a bfloat16 when ``like`` is a uint16 array,
    a float16 when it is an int16 one. NaN stays a (quiet) NaN."""
    if v != types.float32 or not isinstance(like, types.Array) or like.dtype not in (types.uint16, types.int16):
        return None
    i32 = ir.IntType(32)
    if like.dtype == types.uint16:

        def codegen(context, builder, signature, args):
            value = args[1]
            bits = builder.bitcast(value, i32)
            top = builder.lshr(bits, ir.Constant(i32, 16))
            bias = builder.add(builder.and_(top, ir.Constant(i32, 1)), ir.Constant(i32, 0x7FFF))
            rounded = builder.lshr(builder.add(bits, bias), ir.Constant(i32, 16))
            quiet_nan = builder.or_(top, ir.Constant(i32, 0x40))
            is_nan = builder.fcmp_unordered("uno", value, value)
            return builder.trunc(builder.select(is_nan, quiet_nan, rounded), ir.IntType(16))

    else:

        def codegen(context, builder, signature, args):
            return builder.bitcast(builder.fptrunc(args[1], ir.HalfType()), ir.IntType(16))

    return like.dtype(like, v), codegen


def _widen(v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_widen)
def _widen_overload(v):
    """An element in its compute type: a float as it is, half-precision bits as a float32."""
    if isinstance(v, types.Float):
        return lambda v: v
    if v in (types.uint16, types.int16):
        return lambda v: _half_to_float(v)
    return None


def _narrow(like, v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_narrow)
def _narrow_overload(like, v):
    """``v`` rounded once to the element type of the array ``like`` (half precision as its bits)."""
    if isinstance(like.dtype, types.Float):
        ctor = np.dtype(like.dtype.name).type
        return lambda like, v: ctor(v)
    return lambda like, v: _float_to_half(like, np.float32(v))


def _cast(like, v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_cast)
def _cast_overload(like, v):
    """``v`` in the compute type of the array ``like``: float64 for float64, else float32."""
    ctor = np.float64 if like.dtype == types.float64 else np.float32
    return lambda like, v: ctor(v)


def _compute_buffer(like, n):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_compute_buffer)
def _compute_buffer_overload(like, n):
    """A new (n,) array of the compute type of ``like``."""
    dt = np.float64 if like.dtype == types.float64 else np.float32
    return lambda like, n: np.empty(n, dt)


def _exp_buffer(grad, n):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_exp_buffer)
def _exp_buffer_overload(grad, n):
    """The float32 row in which a half-precision gradient keeps its exponentials (see ``_ce_row``);
    an empty one for a float gradient, which keeps them in itself."""
    if isinstance(grad.dtype, types.Float):
        return lambda grad, n: np.empty(0, grad.dtype)
    return lambda grad, n: np.empty(n, np.float32)


def _exps_in(g, buf):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(_exps_in)
def _exps_in_overload(g, buf):
    if isinstance(g.dtype, types.Float):
        return lambda g, buf: g
    return lambda g, buf: buf


# --------------------------------------------------------------------------- fused cross-entropy
# The chunk helpers take slices and loop from 0: an index that numba cannot prove non-negative gets
# a wraparound select that stops LLVM from vectorizing the loop.


@nb.njit(fastmath=FASTMATH)
def _softcap_chunk(x, softcap, y):
    inv = _cast(x, 1 / softcap)
    cap = _cast(x, softcap)
    for j in range(x.shape[0]):
        y[j] = cap * _tanh(_widen(x[j]) * inv)


@nb.njit(fastmath=FASTMATH)
def _chunk_max(y):
    """Max of the chunk ignoring NaN; -inf when the chunk holds only -inf and NaN."""
    m = _cast(y, -np.inf)
    for j in range(y.shape[0]):
        m = _maxnum(m, _widen(y[j]))
    return m


@nb.njit
def _empty_chunk_sum(y):
    """What a chunk whose max is -inf adds to the sum of exp: 0, or NaN if it holds a NaN."""
    for j in range(y.shape[0]):
        v = _widen(y[j])
        if v != v:
            return np.nan
    return 0.0


# Inlined by numba, so that LLVM vectorizes the loop where it can see whether ``e`` is ``y`` (an
# in-place gradient): compiled on its own, the loop is guarded by a runtime check that the two
# arrays do not overlap, which fails for an in-place gradient and runs the scalar loop, 6x slower.
@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_sumexp(y, m, e, store):
    """Sum of exp(y - m) over a chunk, in float64; the terms go to ``e`` when ``store``."""
    s = _cast(y, 0)
    if store:
        for j in range(y.shape[0]):
            v = _exp_neg(_widen(y[j]) - m)
            e[j] = v
            s += v
    else:
        for j in range(y.shape[0]):
            s += _exp_neg(_widen(y[j]) - m)
    return np.float64(s)


@nb.njit(fastmath=FASTMATH)
def _chunk_target_sums(y, w, q, prob, keep, add):
    """(sum_c w_c q'_c y_c, sum_c w_c q'_c) with q' = keep q + add for probability targets;
    (sum_c w_c y_c, 0) for class targets (label smoothing)."""
    swy = _cast(y, 0)
    swq = _cast(y, 0)
    if prob:
        k = _cast(y, keep)
        a = _cast(y, add)
        for j in range(y.shape[0]):
            wq = w[j] * (k * q[j] + a)
            swy += wq * _widen(y[j])
            swq += wq
    else:
        for j in range(y.shape[0]):
            swy += w[j] * _widen(y[j])
    return np.float64(swy), np.float64(swq)


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_reads(y, w, q, prob, smoothing, eps_r):
    """(max, sum w q' y, sum w q') of one chunk, reading it only."""
    swy = swq = 0.0
    if prob or smoothing > 0:
        swy, swq = _chunk_target_sums(y, w, q, prob, 1 - smoothing, eps_r)
    return _chunk_max(y), swy, swq


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_exps(y, m, e, want_grad):
    """Sum of exp(y - m) of a chunk whose max is ``m``; the terms go to ``e`` when ``want_grad``
    (zeros for a chunk of -inf, whose sum is 0, or NaN if it holds a NaN)."""
    if m == -np.inf:
        if want_grad:
            e[:] = 0
        return _empty_chunk_sum(y)
    return _chunk_sumexp(y, m, e, want_grad)


# ---- statistics (argmax and entropy, ``stats=``): the same visit of each chunk, only when asked for


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_sumexp_entropy(y, m, e, store):
    """``(sum exp(y - m), sum exp(y - m) (y - m))`` over a chunk, in float64: ``_chunk_sumexp`` plus
    the entropy's sum, from the same exps. ``y - m`` is clamped at -1e4, where the exp is 0, so that a
    -inf logit adds 0, not 0 * -inf."""
    s = _cast(y, 0)
    t = _cast(y, 0)
    floor = _cast(y, -1e4)
    if store:
        for j in range(y.shape[0]):
            d = _widen(y[j]) - m
            v = _exp_neg(d)
            e[j] = v
            s += v
            t += v * (d if d > floor else floor)
    else:
        for j in range(y.shape[0]):
            d = _widen(y[j]) - m
            v = _exp_neg(d)
            s += v
            t += v * (d if d > floor else floor)
    return np.float64(s), np.float64(t)


@nb.njit(fastmath=FASTMATH)
def _chunk_max_nan(y):
    """``(_chunk_max(y), whether the chunk holds a NaN)`` in one vectorized loop (no early exit)."""
    m = _cast(y, -np.inf)
    seen = False
    for j in range(y.shape[0]):
        v = _widen(y[j])
        m = _maxnum(m, v)
        seen |= v != v
    return m, seen


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_reads_stats(y, w, q, prob, smoothing, eps_r, want_stats):
    """``_chunk_reads`` and, with ``want_stats``, whether the chunk holds a NaN (torch.argmax's max),
    from the same loop as the max."""
    if not want_stats:
        m, swy, swq = _chunk_reads(y, w, q, prob, smoothing, eps_r)
        return m, swy, swq, False
    swy = swq = 0.0
    if prob or smoothing > 0:
        swy, swq = _chunk_target_sums(y, w, q, prob, 1 - smoothing, eps_r)
    m, has_nan = _chunk_max_nan(y)
    return m, swy, swq, has_nan


@nb.njit(fastmath=FASTMATH)
def _first_index(y, v):
    """The first ``j`` with ``y[j] == v``, 0 if there is none: a min-reduction of indices over the whole
    chunk, which vectorizes (a loop that stops at the first hit runs scalar, half a chunk on average)."""
    n = y.shape[0]
    first = n
    for j in range(n):
        hit = _widen(y[j]) == v
        first = min(first, j if hit else n)
    return first if first < n else 0


@nb.njit
def _first_nan(y):
    """The first ``j`` with ``y[j]`` NaN (0 if there is none); only for a chunk known to hold one."""
    for j in range(y.shape[0]):
        u = _widen(y[j])
        if u != u:
            return j
    return 0


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_exps_stats(y, m, has_nan, e, want_grad, lo, best_m, best_j, nan_j):
    """``_chunk_exps`` of a chunk whose classes start at ``lo`` (max ``m``, ``has_nan`` whether it
    holds a NaN), plus its entropy sum and the running argmax ``(best_m, best_j)`` and first NaN
    ``nan_j`` (-1: none yet) of the row, torch.argmax's answer being ``nan_j`` if there is one, else
    ``best_j``. The first-index searches run only when the chunk's max beats every earlier chunk's
    (strictly: ties go to the lowest index), a few times per row, or for a first NaN; they read the
    chunk before ``e`` (which may be ``y``'s memory, in place) is written."""
    if nan_j < 0 and has_nan:
        nan_j = lo + _first_nan(y)
    if m > best_m:
        best_m = m
        best_j = lo + _first_index(y, m)
    if m == -np.inf:
        if want_grad:
            e[:] = 0
        return _empty_chunk_sum(y), 0.0, best_m, best_j, nan_j
    s, t = _chunk_sumexp_entropy(y, m, e, want_grad)
    return s, t, best_m, best_j, nan_j


def scalar(fn):
    """A row function of ``rowmath`` compiled in strict IEEE order: an explicit ``fastmath=False``, as
    numba gives a callee that sets none its caller's flags, and reassociation loses the logits' size
    (``(m - y_t) + log_s`` became ``lse - y_t``: 0 for two logits of 1e20)."""
    return nb.njit(fastmath=False)(fn)


_ROW = rowmath.make(np.float64)  # the row math shared with numba_cuda, on float64 row sums
_ENTROPY = rowmath.make_entropy(np.float64)
_merge, _loss_and_coef, _kl_from_sums = map(scalar, (_ROW.merge, _ROW.loss_and_coef, _ROW.kl_from_sums))
_merge_entropy, _entropy = map(scalar, (_ENTROPY.merge_entropy, _ENTROPY.entropy))
_bce = nb.njit(_ROW.bce)
_bce_logits = nb.njit(_ROW.bce_logits)


@nb.njit
def _chunk_scale(m, m_row, s_row):
    """exp(m - lse): what turns a chunk's exp(y - m) into probabilities; no exp call for the
    chunk that holds the row's max (every chunk of a short row). A chunk of -inf has p = 0 (its e
    are 0), but the smoothing and target terms still apply to it."""
    if m == m_row:
        return 1 / s_row
    return math.exp(m - m_row) / s_row if m > -np.inf else 0.0


@nb.njit(fastmath=FASTMATH, inline="always")
def _grad_chunk(e, g, w, q, y, a, b, b0, prob, inv_cap):
    """g = (a e - w (b q + b0)) (1 - (y / softcap)**2), rounded once to g's type: ``q`` only for
    probability targets (class targets: a e - b0 w), the softcap factor only when ``y`` is not None
    (numba compiles the ``is None`` tests away)."""
    if prob:
        for j in range(g.shape[0]):
            v = a * e[j] - w[j] * (b * q[j] + b0)
            if y is not None:
                v *= 1 - (y[j] * inv_cap) * (y[j] * inv_cap)
            g[j] = _narrow(g, v)
    elif b0 != 0:
        for j in range(g.shape[0]):
            v = a * e[j] - b0 * w[j]
            if y is not None:
                v *= 1 - (y[j] * inv_cap) * (y[j] * inv_cap)
            g[j] = _narrow(g, v)
    else:
        for j in range(g.shape[0]):
            v = a * e[j]
            if y is not None:
                v *= 1 - (y[j] * inv_cap) * (y[j] * inv_cap)
            g[j] = _narrow(g, v)


@nb.njit(fastmath=FASTMATH, inline="always")
def _ce_row(
    x, t, q, prob, w, sum_w, ignore_index, smoothing, z_loss, softcap, scale, g, want_grad, exp_buf, ybuf,
    chunk_max, want_stats,
):  # fmt: skip
    """``(loss, lse, argmax, entropy)`` of one row; writes the row's gradient (times ``scale``) into ``g``
    when ``want_grad``. With ``want_stats`` the argmax and entropy come from the same chunk visits
    (``_chunk_exps_stats``); without, they cost one test per chunk and come back as 0.

    ``t`` is the class index, or ``q`` the probability row when ``prob``; ``w`` are the class
    weights (ones when none were given) and ``sum_w`` their sum. ``g`` may be ``x`` itself (in-place
    gradient). The first sweep keeps exp(y - chunk max) in ``g`` itself, or in ``exp_buf`` (float32)
    when ``g`` is half precision, so that each gradient element is rounded once; ``ybuf`` holds the
    soft-capped row, which the second sweep needs for the tanh's derivative.
    """
    n_classes = x.shape[0]
    if not prob and t == ignore_index:  # an ignored row counts for nothing: loss and gradient 0, unread
        if want_grad:
            g[:] = _narrow(g, 0)
        return 0.0, 0.0, 0, 0.0
    e = _exps_in(g, exp_buf)
    eps_r = smoothing / n_classes
    y_t = 0.0
    m_row = -np.inf
    s_row = 0.0
    sum_wy = 0.0  # sum_c w_c y_c (label smoothing) or sum_c w_c q'_c y_c (probability targets)
    sum_wq = 0.0  # sum_c w_c q'_c (probability targets), q' = (1 - smoothing) q + smoothing / r
    t_row = 0.0  # sum exp(y - m_row) (y - m_row): the entropy's (stats)
    best_m = -np.inf
    best_j = 0
    nan_j = -1
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    for c in range(n_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n_classes)
        wc = w[lo:hi]
        qc = q[lo:hi]
        if softcap > 0:
            _softcap_chunk(x[lo:hi], softcap, ybuf[lo:hi])
            m, swy, swq, has_nan = _chunk_reads_stats(ybuf[lo:hi], wc, qc, prob, smoothing, eps_r, want_stats)
        else:
            m, swy, swq, has_nan = _chunk_reads_stats(x[lo:hi], wc, qc, prob, smoothing, eps_r, want_stats)
        if not prob and lo <= t < hi:  # read now that the chunk is in L1, before an in-place gradient overwrites it
            y_t = np.float64(_widen(x[t]))
            if softcap > 0:
                y_t = softcap * math.tanh(y_t / softcap)
        if not want_stats:
            if softcap > 0:
                s = _chunk_exps(ybuf[lo:hi], m, e[lo:hi], want_grad)
            else:
                s = _chunk_exps(x[lo:hi], m, e[lo:hi], want_grad)
        else:
            if softcap > 0:
                s, tc, best_m, best_j, nan_j = _chunk_exps_stats(
                    ybuf[lo:hi], m, has_nan, e[lo:hi], want_grad, lo, best_m, best_j, nan_j
                )
            else:
                s, tc, best_m, best_j, nan_j = _chunk_exps_stats(
                    x[lo:hi], m, has_nan, e[lo:hi], want_grad, lo, best_m, best_j, nan_j
                )
            t_row = _merge_entropy(m_row, s_row, t_row, m, s, tc)
        chunk_max[c] = m
        m_row, s_row = _merge(m_row, s_row, m, s)
        sum_wy += swy
        sum_wq += swq
    log_s = math.log(s_row)
    lse = m_row + log_s
    argmax = nan_j if nan_j >= 0 else best_j

    # A row of -inf, or a NaN or +inf in it: no softmax, NaN as in PyTorch. (Not math.isfinite: under
    # reassoc numba's isfinite(x) tests x - x, which folds to 0, so -inf passed as finite.)
    if not -np.inf < lse < np.inf:
        if want_grad:
            g[:] = _narrow(g, np.nan)
        return np.nan, lse, argmax, np.nan
    entropy = _entropy(log_s, s_row, t_row) if want_stats else 0.0
    w_t = 0.0 if prob else np.float64(w[t])
    loss, coef_p = _loss_and_coef(
        m_row, log_s, y_t, w_t, sum_wy, sum_wq if prob else sum_w, prob, 1 - smoothing, eps_r, smoothing, z_loss
    )
    if not want_grad:
        return loss, lse, argmax, entropy

    # grad_j = scale (coef_p p_j - eps_r w_j - (1 - eps) w_t [j == t]) (1 - (y_j / softcap)**2),
    # p_j = e_j exp(m_c - lse); probability targets: grad_j = scale (coef_p p_j - w_j q'_j) (...)
    e_t = np.float64(e[t]) if not prob else 0.0  # before the sweep below overwrites e (= g)
    inv_cap = _cast(e, 1 / softcap if softcap > 0 else 0.0)
    b = _cast(e, scale * (1 - smoothing))
    b0 = _cast(e, scale * eps_r)
    for c in range(n_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n_classes)
        a = _cast(e, scale * coef_p * _chunk_scale(chunk_max[c], m_row, s_row))
        yc = ybuf[lo:hi]
        if softcap > 0:
            _grad_chunk(e[lo:hi], g[lo:hi], w[lo:hi], q[lo:hi], yc, a, b, b0, prob, inv_cap)
        else:
            _grad_chunk(e[lo:hi], g[lo:hi], w[lo:hi], q[lo:hi], None, a, b, b0, prob, inv_cap)
    if not prob:  # the target's term, added before the one rounding of g[t]
        p_t = e_t * _chunk_scale(chunk_max[t // CHUNK], m_row, s_row)
        v = scale * (coef_p * p_t - eps_r * w_t - (1 - smoothing) * w_t)
        if softcap > 0:
            v *= 1 - (y_t / softcap) ** 2
        g[t] = _narrow(g, v)
    return loss, lse, argmax, entropy


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _ce_kernel(
    logits, target, probs, prob, weight, sum_w, ignore_index, smoothing, z_loss, softcap, grad_scale, grad,
    want_grad, inplace, loss, lse, argmax, entropy,
):  # fmt: skip
    """Rows in tasks of ``ROWS_PER_TASK``. ``grad_scale`` holds one factor or one per row. With
    ``inplace`` the gradient goes over ``logits`` and ``grad`` is not used. ``argmax`` and ``entropy``:
    (N,) outputs of the statistics, or empty for none (a test per chunk, outside the vectorized loops:
    one compiled kernel serves both, where a specialisation of its own would cost ~25 s of compilation
    per dtype)."""
    n_rows, n_classes = logits.shape
    rows_per_task = max(ROWS_PER_TASK, TASK_ELEMENTS // n_classes)
    n_tasks = (n_rows + rows_per_task - 1) // rows_per_task
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    per_row = grad_scale.shape[0] > 1
    want_stats = argmax.shape[0] > 0
    for task in prange(n_tasks):
        exp_buf = _exp_buffer(logits, n_classes if want_grad else 0)
        ybuf = _compute_buffer(logits, n_classes if softcap > 0 else 0)
        chunk_max = np.empty(n_chunks, np.float64)
        for i in range(task * rows_per_task, min((task + 1) * rows_per_task, n_rows)):
            t = -1 if prob else target[i]
            q = probs[i if prob else 0]
            scale = grad_scale[i if per_row else 0]
            x = logits[i]
            if inplace:
                # One array read and written: LLVM's runtime alias check between two arguments
                # fails when they are the same memory, and every loop then runs scalar (5x slower).
                loss_i, lse_i, argmax_i, entropy_i = _ce_row(
                    x, t, q, prob, weight, sum_w, ignore_index, smoothing, z_loss, softcap, scale, x, True,
                    exp_buf, ybuf, chunk_max, want_stats,
                )  # fmt: skip
            else:
                loss_i, lse_i, argmax_i, entropy_i = _ce_row(
                    x, t, q, prob, weight, sum_w, ignore_index, smoothing, z_loss, softcap, scale,
                    grad[i if want_grad else 0], want_grad, exp_buf, ybuf, chunk_max, want_stats,
                )  # fmt: skip
            loss[i] = loss_i
            lse[i] = lse_i
            if want_stats:
                argmax[i] = argmax_i
                entropy[i] = entropy_i


_COMPUTE_DTYPE = {torch.float64: np.float64}  # everything else computes in float32


def _view(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; half precision as its bits (see ``_HALF_BITS``)."""
    t = t.detach()
    return (t.view(_HALF_BITS[t.dtype]) if t.dtype in _HALF_BITS else t).numpy()


def _as(t: torch.Tensor, dtype) -> np.ndarray:
    """A contiguous numpy array of ``dtype``: a view when the tensor already is one."""
    if t.dtype in _HALF_BITS:
        t = t.float()
    return np.ascontiguousarray(t.detach().numpy(), dtype)


def _grad_scale(grad_scale, n_rows: int) -> np.ndarray:
    if grad_scale is None:
        return np.ones(1)
    if not isinstance(grad_scale, torch.Tensor):
        return np.full(1, float(grad_scale))
    s = _as(grad_scale.reshape(-1), np.float64)
    if s.shape[0] not in (1, n_rows):
        raise ValueError(f"grad_scale: expected 1 or {n_rows} (one per row) elements, got {s.shape[0]}")
    return s


def cross_entropy(
    logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad, stats=None
):  # fmt: skip
    """Per-row loss and lse of a (N, r) float tensor (and with ``stats`` the row's argmax and entropy);
    see ``gpuxent.backends`` for the contract."""
    x = np.ascontiguousarray(_view(logits))
    dt = _COMPUTE_DTYPE.get(logits.dtype, np.float32)
    n_rows, n_classes = x.shape
    prob = target.is_floating_point()
    t = np.zeros(1, np.int64) if prob else _as(target, np.int64)
    q = _as(target, dt) if prob else np.zeros((1, 0), dt)
    w = np.ones(n_classes, dt) if weight is None else _as(weight, dt)
    inplace = grad is not None and grad.numel() > 0 and grad.data_ptr() == logits.data_ptr()
    if grad is not None and (grad.shape != logits.shape or grad.dtype != logits.dtype or not grad.is_contiguous()):
        raise ValueError(f"grad: expected a contiguous {tuple(logits.shape)} {logits.dtype} tensor")
    if inplace and x.ctypes.data != logits.data_ptr():
        raise ValueError("grad: an in-place gradient needs contiguous logits")
    g = _view(grad) if grad is not None and not inplace else np.zeros((1, 0), x.dtype)
    loss = np.empty(n_rows, dt)
    lse = np.empty(n_rows, dt)
    argmax, entropy = (np.zeros(0, np.int64), np.zeros(0, dt)) if stats is None else (o.numpy() for o in stats)
    if n_rows:
        _launch(
            _ce_kernel, x.size, x, t, q, prob, w, float(w.sum(dtype=np.float64)), int(ignore_index),
            float(label_smoothing), float(z_loss), float(softcap or 0.0), _grad_scale(grad_scale, n_rows), g,
            grad is not None, inplace, loss, lse, argmax, entropy,
        )  # fmt: skip
    return torch.from_numpy(loss), torch.from_numpy(lse)


# --------------------------------------------------------------------------- softmax


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _softmax_kernel(x, out, log, row_max, row_log_sum):
    """Row max and log of the sum of exp(x - max) of every row; for a softmax (not ``log``) also
    ``out = exp(x - lse)``, stored chunk by chunk and rescaled like the cross-entropy gradient (NaN
    for a row without a softmax: all -inf, or a NaN or +inf in it, as in PyTorch)."""
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
            s = _empty_chunk_sum(row[lo:hi]) if m == -np.inf else _chunk_sumexp(row[lo:hi], m, o[lo:hi], not log)
            m_row, s_row = _merge(m_row, s_row, m, s)
        row_max[i] = m_row
        row_log_sum[i] = math.log(s_row)
        if log:
            continue
        lse = m_row + row_log_sum[i]
        if not -np.inf < lse < np.inf:  # as in _ce_row
            o[:] = np.nan
            continue
        for c in range(n_chunks):
            lo = c * CHUNK
            oc = o[lo : min(lo + CHUNK, n_classes)]
            if chunk_max[c] == -np.inf:
                oc[:] = 0
                continue
            a = _cast(o, _chunk_scale(chunk_max[c], m_row, s_row))
            for j in range(oc.shape[0]):
                oc[j] = oc[j] * a


@nb.njit(parallel=True, cache=True)  # no fast-math: reassociation would make it x - (m + log_sum)
def _log_softmax_kernel(x, row_max, row_log_sum, out):
    """out = (x - max) - log_sum: x - max is exact and log_sum small, where x - lse with an lse
    rounded to x's precision would cost up to half an ulp of the logits (5e-4 at |x| ~ 1e4 in float32)."""
    for i in prange(x.shape[0]):
        m = _cast(out, row_max[i])
        log_sum = _cast(out, row_log_sum[i])
        row = x[i]
        o = out[i]
        for j in range(row.shape[0]):
            o[j] = (_widen(row[j]) - m) - log_sum


def softmax(x, *, log):
    """Row softmax (or log-softmax) of a (N, r) tensor, returned in the compute dtype."""
    a = np.ascontiguousarray(_view(x))
    dt = _COMPUTE_DTYPE.get(x.dtype, np.float32)
    out = empty(a.shape, torch.float64 if dt == np.float64 else torch.float32).numpy()
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
        loss_i, grad_i = _bce(np.float64(_widen(p[i])), np.float64(y[i]), np.float64(w[i]))
        loss[i] = loss_i
        if want_grad:
            grad[i] = grad_i


@nb.njit(parallel=True, cache=True)
def _bce_logits_kernel(x, y, w, pos_weight, loss, grad):
    want_grad = grad.shape[0] > 0
    has_pw = pos_weight.shape[0] > 0
    for i in prange(x.shape[0]):
        pw = np.float64(pos_weight[i]) if has_pw else 1.0
        loss_i, grad_i = _bce_logits(np.float64(_widen(x[i])), np.float64(y[i]), np.float64(w[i]), pw)
        loss[i] = loss_i
        if want_grad:
            grad[i] = grad_i


def _flat(t: torch.Tensor, dtype=None) -> np.ndarray:
    """``t`` as a contiguous 1-D numpy array: of ``dtype``, or (None) a view with half precision as bits."""
    if dtype is None:
        return np.ascontiguousarray(_view(t)).reshape(-1)
    return _as(t, dtype).reshape(-1)


def _bce_buffers(x: torch.Tensor, weight, grad):
    """(compute dtype, weights, loss, gradient): the gradient is written straight into ``grad``."""
    dt = _COMPUTE_DTYPE.get(x.dtype, np.float32)
    w = np.ones(x.numel(), dt) if weight is None else _flat(weight, dt)
    g = np.empty(0, dt) if grad is None else grad.detach().view(-1).numpy()
    return dt, w, np.empty(x.numel(), dt), g


def binary_cross_entropy(probs, target, weight, *, grad):
    dt, w, loss, g = _bce_buffers(probs, weight, grad)
    _launch(_bce_kernel, loss.size, _flat(probs), _flat(target, dt), w, loss, g)
    return torch.from_numpy(loss)


def binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad):
    dt, w, loss, g = _bce_buffers(logits, weight, grad)
    pw = np.empty(0, dt) if pos_weight is None else _flat(pos_weight, dt)
    _launch(_bce_logits_kernel, loss.size, _flat(logits), _flat(target, dt), w, pw, loss, g)
    return torch.from_numpy(loss)


# ------------------------------------------------------------ vocab-parallel: row partials and the gradient pass
# A rank that holds a slice of the classes reduces it to a few numbers per row (``row_partials``); the
# ranks combine them into the global lse and gradient coefficient, and ``cross_entropy_backward``
# writes the slice's gradient from those. Contract: ``gpuxent.backends``.

N_PARTIALS = 5  # (m, s, a, b, c) per row, see ``row_partials``


@nb.njit(fastmath=FASTMATH, inline="always")
def _partials_chunk(y, w, q, prob, smoothing, no_exps, sums):
    """``sums`` = (m, s, a, b, c) of the row so far, with one more chunk ``y`` merged in (``a`` not yet
    relative to the max)."""
    m_row, s_row, a, b, c = sums
    m = _chunk_max(y)
    m_row, s_row = _merge(m_row, s_row, m, _chunk_exps(y, m, no_exps, False))
    if prob:
        a_c, b_c = _chunk_target_sums(y, w, q, True, 1.0, 0.0)
        a += a_c
        b += b_c
    if smoothing:
        c += _chunk_target_sums(y, w, q, False, 1.0, 0.0)[0]
    return m_row, s_row, a, b, c


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _partials_kernel(logits, target, probs, prob, weight, ignore_index, softcap, class_offset, smoothing, out):
    n_rows, n_classes = logits.shape
    rows_per_task = max(ROWS_PER_TASK, TASK_ELEMENTS // max(n_classes, 1))
    n_tasks = (n_rows + rows_per_task - 1) // rows_per_task
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    for task in prange(n_tasks):
        ybuf = _compute_buffer(logits, n_classes if softcap > 0 else 0)
        no_exps = _compute_buffer(logits, 0)
        for i in range(task * rows_per_task, min((task + 1) * rows_per_task, n_rows)):
            t = -1 if prob else target[i]
            o = out[i]
            o[0] = -np.inf
            o[1] = o[2] = o[3] = o[4] = 0.0
            if not prob and t == ignore_index:  # unread
                continue
            x = logits[i]
            q = probs[i if prob else 0]
            sums = (-np.inf, 0.0, 0.0, 0.0, 0.0)  # (m, s, a, b, c)
            for ch in range(n_chunks):
                lo = ch * CHUNK
                hi = min(lo + CHUNK, n_classes)
                if softcap > 0:
                    _softcap_chunk(x[lo:hi], softcap, ybuf[lo:hi])
                    sums = _partials_chunk(ybuf[lo:hi], weight[lo:hi], q[lo:hi], prob, smoothing, no_exps, sums)
                else:
                    sums = _partials_chunk(x[lo:hi], weight[lo:hi], q[lo:hi], prob, smoothing, no_exps, sums)
            m_row, s_row, a, b, c = sums
            lt = t - class_offset
            if not prob and 0 <= lt < n_classes:
                y_t = np.float64(_widen(x[lt]))
                if softcap > 0:
                    y_t = softcap * math.tanh(y_t / softcap)
                a = weight[lt] * (y_t - m_row)  # exact: no rounded y_t of the size of the logits
                b = weight[lt]
            elif prob and m_row > -np.inf:
                a -= b * m_row
            o[0] = m_row
            o[1] = s_row
            o[2] = a
            o[3] = b
            o[4] = c


def _prob_and_weight(logits, target, weight, dt):
    """(prob, class indices, probabilities, class weights) as the vocab-parallel kernels read them."""
    prob = target.is_floating_point()
    t = np.zeros(1, np.int64) if prob else _as(target, np.int64)
    q = _as(target, dt) if prob else np.zeros((1, 0), dt)
    w = np.ones(logits.shape[1], dt) if weight is None else _as(weight, dt)
    return prob, t, q, w


def row_partials(logits, target, weight, *, ignore_index, softcap, class_offset, smoothing, out):
    """Per-row partials of a slice of the classes into ``out`` (N, 5); see ``gpuxent.backends``."""
    x = np.ascontiguousarray(_view(logits))
    dt = _COMPUTE_DTYPE.get(logits.dtype, np.float32)
    prob, t, q, w = _prob_and_weight(logits, target, weight, dt)
    o = out.detach().numpy()
    if x.shape[0]:
        _launch(
            _partials_kernel, x.size, x, t, q, prob, w, int(ignore_index), float(softcap or 0.0), int(class_offset),
            bool(smoothing), o,
        )  # fmt: skip


@nb.njit(fastmath=FASTMATH, inline="always")
def _backward_row(x, g, w, q, inv_cap, cap, lse, a, bq, b0, ea, ey):
    """g_j = [a p_j - w_j (bq q_j + b0) + ea p_j (ey - y_j)] dy_j/dx_j with p_j = exp(y_j - lse), rounded
    once to g's type. ``q`` (probability targets), ``inv_cap`` (softcap) and ``ey`` (the entropy term)
    may be None: numba compiles the ``is None`` tests away, and each variant's loop holds only its terms."""
    one = _cast(x, 1)
    zero = _cast(x, 0)
    for j in range(x.shape[0]):
        u = _widen(x[j])
        # every branch defines the same variables: one defined in one branch only comes out wrong in prange code
        if inv_cap is not None:
            th = _tanh(u * inv_cap)
            y = cap * th
            dy = one - th * th
        else:
            y = u
            dy = one
        p = _exp_neg(y - lse)
        if q is not None:
            m = bq * q[j] + b0
        else:
            m = b0
        v = a * p - w[j] * m
        if ey is not None:  # the entropy term, 0 (not 0 * inf) where p = 0
            v += ea * p * (ey - (y if p > zero else zero))
        else:
            v += zero
        g[j] = _narrow(g, v * dy)


@nb.njit(fastmath=FASTMATH, inline="always")
def _backward_one(x, g, w, q, prob, softcap, lse, a, bq, b0, ea, ey):
    """``_backward_row`` with its loop chosen at run time (probability targets, softcap)."""
    if softcap > 0:
        inv_cap = _cast(x, 1 / softcap)
        cap = _cast(x, softcap)
        if prob:
            _backward_row(x, g, w, q, inv_cap, cap, lse, a, bq, b0, ea, ey)
        else:
            _backward_row(x, g, w, None, inv_cap, cap, lse, a, bq, b0, ea, ey)
    elif prob:
        _backward_row(x, g, w, q, None, lse, lse, a, bq, b0, ea, ey)
    else:
        _backward_row(x, g, w, None, None, lse, lse, a, bq, b0, ea, ey)


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _backward_kernel(
    logits, target, probs, prob, weight, lse, coef, entropy, ignore_index, smoothing, n_total, class_offset, softcap,
    grad_scale, entropy_scale, grad, inplace,
):  # fmt: skip
    """``entropy`` may be None: a kernel of its own, whose loops hold no entropy term (compiled per dtype
    and per ``entropy is None``; probability targets and the softcap choose their loop at run time)."""
    n_rows, n_classes = logits.shape
    rows_per_task = max(ROWS_PER_TASK, TASK_ELEMENTS // max(n_classes, 1))
    n_tasks = (n_rows + rows_per_task - 1) // rows_per_task
    per_row = grad_scale.shape[0] > 1
    ent_per_row = entropy_scale.shape[0] > 1
    for task in prange(n_tasks):
        for i in range(task * rows_per_task, min((task + 1) * rows_per_task, n_rows)):
            t = -1 if prob else target[i]
            x = logits[i]
            g = x if inplace else grad[i]
            if not prob and t == ignore_index:  # unread, 0
                g[:] = _narrow(g, 0)
                continue
            lse_i = np.float64(lse[i])
            if not -np.inf < lse_i < np.inf:  # no softmax (a row of -inf, a NaN or +inf in it): NaN as torch
                g[:] = _narrow(g, np.nan)
                continue
            gs = grad_scale[i if per_row else 0]
            es = ey = 0.0
            if entropy is not None:
                es = entropy_scale[i if ent_per_row else 0]
                ey = lse_i - entropy[i]
            coef_i = np.float64(coef[i])
            w_t = y_t = 0.0
            lt = t - class_offset
            hit = not prob and 0 <= lt < n_classes
            if hit:  # read before an in-place sweep overwrites it
                w_t = np.float64(weight[lt])
                y_t = np.float64(_widen(x[lt]))
                if softcap > 0:
                    y_t = softcap * math.tanh(y_t / softcap)
            eps_r = smoothing / n_total
            a, bq, b0 = gs * coef_i, gs * (1 - smoothing), gs * eps_r
            lse_c, a_c, bq_c, b0_c, es_c = _cast(x, lse_i), _cast(x, a), _cast(x, bq), _cast(x, b0), _cast(x, es)
            q = probs[i if prob else 0]
            if entropy is None:
                if inplace:  # one array read and written: see ``_ce_kernel``
                    _backward_one(x, x, weight, q, prob, softcap, lse_c, a_c, bq_c, b0_c, es_c, None)
                else:
                    _backward_one(x, g, weight, q, prob, softcap, lse_c, a_c, bq_c, b0_c, es_c, None)
            elif inplace:
                _backward_one(x, x, weight, q, prob, softcap, lse_c, a_c, bq_c, b0_c, es_c, _cast(x, ey))
            else:
                _backward_one(x, g, weight, q, prob, softcap, lse_c, a_c, bq_c, b0_c, es_c, _cast(x, ey))
            if hit:  # the target's term, added before the one rounding of g[lt]
                p_t = math.exp(y_t - lse_i)
                v = a * p_t - w_t * (bq + b0) + (es * p_t * (ey - y_t) if p_t > 0 else 0.0)
                if softcap > 0:
                    v *= 1 - (y_t / softcap) ** 2
                g[lt] = _narrow(g, v)


def _entropy_scale(v, n_rows: int) -> np.ndarray:
    if v is None:
        return np.ones(1)
    s = _as(v.reshape(-1), np.float64)
    if s.shape[0] not in (1, n_rows):
        raise ValueError(f"entropy_scale: expected 1 or {n_rows} (one per row) elements, got {s.shape[0]}")
    return s


def cross_entropy_backward(
    logits, target, weight, lse, coef, entropy, *, ignore_index, label_smoothing, n_classes, class_offset, softcap,
    grad_scale, entropy_scale, grad,
):  # fmt: skip
    """The gradient of a slice of the classes from the global lse and coefficient; see ``gpuxent.backends``."""
    x = np.ascontiguousarray(_view(logits))
    dt = _COMPUTE_DTYPE.get(logits.dtype, np.float32)
    n_rows = x.shape[0]
    prob, t, q, w = _prob_and_weight(logits, target, weight, dt)
    if grad.shape != logits.shape or grad.dtype != logits.dtype or not grad.is_contiguous():
        raise ValueError(f"grad: expected a contiguous {tuple(logits.shape)} {logits.dtype} tensor")
    inplace = grad.numel() > 0 and grad.data_ptr() == logits.data_ptr()
    if inplace and x.ctypes.data != logits.data_ptr():
        raise ValueError("grad: an in-place gradient needs contiguous logits")
    g = np.zeros((1, 0), x.dtype) if inplace else _view(grad)
    ent = None if entropy is None else _as(entropy, dt)
    if n_rows:
        _launch(
            _backward_kernel, x.size, x, t, q, prob, w, _as(lse, dt),
            _as(coef, dt), ent, int(ignore_index),
            float(label_smoothing), float(n_classes), int(class_offset), float(softcap or 0.0),
            _grad_scale(grad_scale, n_rows), _entropy_scale(entropy_scale, n_rows), g, inplace,
        )  # fmt: skip


# --------------------------------------------------------------------------- distillation
#
# Per row, with S = student / tau, T = teacher / tau, p_s = softmax(S), p_t = softmax(T):
#   kl          KL(p_t || p_s) = sum p_t (T - S) - lse_T + lse_S       d/dS = p_s - p_t
#   reverse_kl  KL(p_s || p_t) = sum p_s (S - T) - lse_S + lse_T       d/dS = p_s (S - T - mu), mu = sum p_s (S - T)
#   jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m)            d/dS = (1 - beta) p_s (R - K)
#               with m = beta p_t + (1 - beta) p_s, R = log p_s - log m, K = sum p_s R = KL(p_s || m)
# times tau**2 (the loss) and tau**2 / tau (the gradient in the logits).
#
# Sweep 1 reads both rows from memory, chunk by chunk: each chunk's maxima, exp((x - chunk max) / tau)
# of both rows kept in two compute-dtype row buffers, their sums and the cross term
# sum exp(lead - max) (lead - other) (lead: the teacher for kl, the student for reverse_kl), merged
# into the row's by online rescaling (``rowmath.merge_cross``). kl and reverse_kl have their loss
# then; a second sweep over the buffers (no exp) writes the gradient. jsd needs log m, hence both lse
# first: its second sweep turns the buffers into p_s and R (log m = logaddexp(log beta + log p_t,
# log(1 - beta) + log p_s): one exp and one vectorised log1p per element, no log of a tiny m) and
# sums the loss and K; a third writes the gradient. The later sweeps touch the row's buffers, still
# in L2 (2 x r x 4 bytes), and the student row for reverse_kl.
#
# Byte model, forward+backward: read 2*N*r logits, write N*r gradient, read N targets, write N losses.

KL, REVERSE_KL, JSD = 0, 1, 2
DIVERGENCE_CODES = {"kl": KL, "reverse_kl": REVERSE_KL, "jsd": JSD}
_merge_cross = scalar(_ROW.merge_cross)


def _log1p_unit(u):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


def _make_log1p_unit(dtype, n_terms):
    """log(1 + u) for u in [0, 1] without branches, so that it vectorises (``math.log1p`` is a libm
    call, and made jsd's in-cache sweep 21x slower): 1 + u = 2**k (1 + z) / (1 - z) with k = 0 or 1 and
    |z| <= 3 - 2 sqrt(2) = 0.172, then 2 atanh(z) = z (2 + 2 z**2 / 3 + 2 z**4 / 5 + ...), ``n_terms``
    terms (error below the dtype's ulp). float64 uses it; float32 the division-free polynomial below."""
    f = dtype.type
    ln2, split, zero, one, two, three = f(math.log(2)), f(math.sqrt(2) - 1), f(0), f(1), f(2), f(3)
    coeffs = tuple(f(2 / (2 * k + 1)) for k in range(n_terms - 2, -1, -1))
    top = f(2 / (2 * n_terms - 1))

    def impl(u):
        big = u > split
        z = (u - one if big else u) / (u + (three if big else two))
        z2 = z * z
        p = top
        for c in coeffs:
            p = p * z2 + c
        return (ln2 if big else zero) + z * p

    return impl


def _make_log1p_unit_poly(dtype, degree):
    """log(1 + u) for u in [0, 1] as one polynomial in t = 2u - 1 (Chebyshev interpolation, no division:
    ``degree`` 9 is within 8e-8 in float32, its rounding; the series above needs a division per call)."""
    from numpy.polynomial import chebyshev

    f = dtype.type
    power = chebyshev.cheb2poly(chebyshev.chebinterpolate(lambda x: np.log1p((x + 1) / 2), degree))
    coeffs = tuple(f(c) for c in power[-2::-1])
    top, one = f(power[-1]), f(1)

    def impl(u):
        t = (u + u) - one
        p = top
        for c in coeffs:
            p = p * t + c
        return p

    return impl


# float32: the polynomial made jsd's in-cache sweep 0.72-0.84 ns/element, the series 1.06 (its division)
_LOG1P32 = _make_log1p_unit_poly(np.dtype(np.float32), 9)
_LOG1P64 = _make_log1p_unit(np.dtype(np.float64), 11)


@overload(_log1p_unit, fastmath=FASTMATH)
def _log1p_unit_overload(u):
    if u == types.float32:
        return _LOG1P32
    if u == types.float64:
        return _LOG1P64
    return None


@nb.njit(fastmath=FASTMATH, inline="always")
def _pair_exps(lead, other, m_lead, m_other, inv_tau, e_lead, e_other, cross):
    """One chunk of both rows: ``e = exp((x - m) / tau)`` of each into ``e_lead`` and ``e_other``;
    returns their sums and, when ``cross``, ``sum e_lead (lead - other)`` (a term with ``e_lead`` = 0
    is 0: a -inf logit there gives no NaN)."""
    zero = _cast(e_lead, 0)
    ml = m_lead if m_lead > -np.inf else zero  # a chunk of -inf: its exps are 0
    mo = m_other if m_other > -np.inf else zero
    s_lead = zero
    s_other = zero
    c = zero
    if cross:
        for j in range(lead.shape[0]):
            x_lead = _widen(lead[j])
            x_other = _widen(other[j])
            el = _exp_neg((x_lead - ml) * inv_tau)
            eo = _exp_neg((x_other - mo) * inv_tau)
            e_lead[j] = el
            e_other[j] = eo
            s_lead += el
            s_other += eo
            v = el * (x_lead - x_other)
            c += v if el > zero else zero
    else:
        for j in range(lead.shape[0]):
            el = _exp_neg((_widen(lead[j]) - ml) * inv_tau)
            eo = _exp_neg((_widen(other[j]) - mo) * inv_tau)
            e_lead[j] = el
            e_other[j] = eo
            s_lead += el
            s_other += eo
    return np.float64(s_lead), np.float64(s_other), np.float64(c)


@nb.njit(fastmath=FASTMATH, inline="always")
def _jsd_chunk(s, t, es, et, shift_s, shift_t, a_s, a_t, k_s, k_t, inv_tau, beta, log_beta, log_1mbeta):
    """jsd's second sweep over a chunk: turns ``es`` into p_s and ``et`` into R = log p_s - log m;
    returns (sum p_t (log p_t - log m), sum p_s R). ``log p = (x - shift) / tau + k``, ``p = a e``."""
    zero = _cast(es, 0)
    sum_t = zero
    sum_s = zero
    for j in range(s.shape[0]):
        ls = (_widen(s[j]) - shift_s) * inv_tau + k_s
        lt = (_widen(t[j]) - shift_t) * inv_tau + k_t
        ps = a_s * es[j]
        pt = a_t * et[j]
        u = log_beta + lt
        v = log_1mbeta + ls
        hi = u if u > v else v
        lo = v if u > v else u
        log_m = hi + _log1p_unit(_exp_neg(lo - hi))
        r = ls - log_m
        vt = pt * (lt - log_m)
        vs = ps * r
        sum_t += vt if pt > zero else zero
        sum_s += vs if ps > zero else zero
        es[j] = ps
        et[j] = r
    return np.float64(sum_t), np.float64(sum_s)


@nb.njit(fastmath=FASTMATH, inline="always")
def _distill_grad_chunk(s, t, es, et, g, divergence, a_s, a_t, inv_tau, mu):
    """The gradient of one chunk from the buffers, rounded once to g's type (see the section comment):
    kl ``a_s e_s - a_t e_t``; reverse_kl ``a_s e_s ((s - t) / tau - mu)``; jsd ``a_s p_s (R - mu)``."""
    zero = _cast(es, 0)
    if divergence == KL:
        for j in range(g.shape[0]):
            g[j] = _narrow(g, a_s * es[j] - a_t * et[j])
    elif divergence == REVERSE_KL:
        for j in range(g.shape[0]):
            e = es[j]
            v = (a_s * e) * ((_widen(s[j]) - _widen(t[j])) * inv_tau - mu)
            g[j] = _narrow(g, v if e > zero else zero)
    else:
        for j in range(g.shape[0]):
            e = es[j]
            v = (a_s * e) * (et[j] - mu)
            g[j] = _narrow(g, v if e > zero else zero)


@nb.njit(fastmath=FASTMATH, inline="always")
def _distill_row(s, t, divergence, inv_tau, tau, beta, scale, g, want_grad, es, et, cms, cmt):
    """tau**2 times the divergence of one kept row; writes ``scale * tau * d div / d S`` into ``g``
    when ``want_grad``. ``cms``/``cmt`` receive the chunk maxima of S and T."""
    n_classes = s.shape[0]
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    inv = _cast(es, inv_tau)
    m_s = -np.inf
    m_t = -np.inf
    sum_s = 0.0
    sum_t = 0.0
    cross = 0.0
    for c in range(n_chunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n_classes)
        ms = _chunk_max(s[lo:hi])
        mt = _chunk_max(t[lo:hi])
        cms[c] = np.float64(ms) * inv_tau
        cmt[c] = np.float64(mt) * inv_tau
        if divergence == KL:
            st_c, ss_c, cr = _pair_exps(t[lo:hi], s[lo:hi], mt, ms, inv, et[lo:hi], es[lo:hi], True)
            m_t, sum_t, cross = _merge_cross(m_t, sum_t, cross, cmt[c], st_c, cr)
            m_s, sum_s = _merge(m_s, sum_s, cms[c], ss_c)
        else:
            ss_c, st_c, cr = _pair_exps(s[lo:hi], t[lo:hi], ms, mt, inv, es[lo:hi], et[lo:hi], divergence == REVERSE_KL)
            m_s, sum_s, cross = _merge_cross(m_s, sum_s, cross, cms[c], ss_c, cr)
            m_t, sum_t = _merge(m_t, sum_t, cmt[c], st_c)
    log_ss = math.log(sum_s)
    log_st = math.log(sum_t)
    if not (-np.inf < m_s + log_ss < np.inf and -np.inf < m_t + log_st < np.inf):  # no softmax: NaN, as torch
        if want_grad:
            g[:] = _narrow(g, np.nan)
        return np.nan
    if divergence == KL:
        mu = inv_tau * cross / sum_t  # sum p_t (T - S)
        div = _kl_from_sums(mu, m_t, m_s, log_st, log_ss)
    elif divergence == REVERSE_KL:
        mu = inv_tau * cross / sum_s  # sum p_s (S - T)
        div = _kl_from_sums(mu, m_s, m_t, log_ss, log_st)
    else:
        log_beta = _cast(es, math.log(beta))
        log_1mbeta = _cast(es, math.log1p(-beta))
        kl_t = 0.0
        kl_s = 0.0
        for c in range(n_chunks):
            lo = c * CHUNK
            hi = min(lo + CHUNK, n_classes)
            shift_s = cms[c] / inv_tau if cms[c] > -np.inf else 0.0  # the shifts of _pair_exps
            shift_t = cmt[c] / inv_tau if cmt[c] > -np.inf else 0.0
            k_s = (shift_s * inv_tau - m_s) - log_ss
            k_t = (shift_t * inv_tau - m_t) - log_st
            d_t, d_s = _jsd_chunk(
                s[lo:hi], t[lo:hi], es[lo:hi], et[lo:hi], _cast(es, shift_s), _cast(es, shift_t),
                _cast(es, _chunk_scale(cms[c], m_s, sum_s)), _cast(es, _chunk_scale(cmt[c], m_t, sum_t)),
                _cast(es, k_s), _cast(es, k_t), inv, _cast(es, beta), log_beta, log_1mbeta,
            )  # fmt: skip
            kl_t += d_t
            kl_s += d_s
        div = beta * kl_t + (1 - beta) * kl_s
        mu = kl_s  # K = KL(p_s || m)
    if want_grad:
        coef = scale * tau * ((1 - beta) if divergence == JSD else 1.0)
        for c in range(n_chunks):
            lo = c * CHUNK
            hi = min(lo + CHUNK, n_classes)
            if divergence == JSD:  # es already holds p_s
                a_s = coef
                a_t = 0.0
            else:
                a_s = coef * _chunk_scale(cms[c], m_s, sum_s)
                a_t = coef * _chunk_scale(cmt[c], m_t, sum_t)
            _distill_grad_chunk(
                s[lo:hi], t[lo:hi], es[lo:hi], et[lo:hi], g[lo:hi], divergence, _cast(es, a_s), _cast(es, a_t),
                inv, _cast(es, mu),
            )  # fmt: skip
    return tau * tau * div


@nb.njit(parallel=True, fastmath=FASTMATH, cache=True)
def _distill_kernel(
    student, teacher, target, has_target, ignore_index, divergence, tau, beta, grad_scale, grad, want_grad, loss
):  # fmt: skip
    """Rows in tasks, as ``_ce_kernel``; ``grad_scale`` holds one factor or one per row."""
    n_rows, n_classes = student.shape
    rows_per_task = max(ROWS_PER_TASK, TASK_ELEMENTS // n_classes)
    n_tasks = (n_rows + rows_per_task - 1) // rows_per_task
    n_chunks = (n_classes + CHUNK - 1) // CHUNK
    per_row = grad_scale.shape[0] > 1
    for task in prange(n_tasks):
        es = _compute_buffer(student, n_classes)
        et = _compute_buffer(student, n_classes)
        cms = np.empty(n_chunks, np.float64)
        cmt = np.empty(n_chunks, np.float64)
        for i in range(task * rows_per_task, min((task + 1) * rows_per_task, n_rows)):
            g = grad[i if want_grad else 0]
            if has_target and target[i] == ignore_index:  # left out: 0, not read
                if want_grad:
                    g[:] = _narrow(g, 0)
                loss[i] = 0.0
                continue
            loss[i] = _distill_row(
                student[i], teacher[i], divergence, 1 / tau, tau, beta, grad_scale[i if per_row else 0], g,
                want_grad, es, et, cms, cmt,
            )  # fmt: skip


def distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, grad_scale, grad):
    """Per-row tau**2 * divergence of (N, r) student and teacher logits; see ``gpuxent.backends``."""
    s = np.ascontiguousarray(_view(student))
    t = np.ascontiguousarray(_view(teacher))
    dt = _COMPUTE_DTYPE.get(student.dtype, np.float32)
    n_rows = s.shape[0]
    if teacher.shape != student.shape or teacher.dtype != student.dtype:
        raise ValueError("teacher: expected the student's shape and dtype")
    if grad is not None and (grad.shape != student.shape or grad.dtype != student.dtype or not grad.is_contiguous()):
        raise ValueError(f"grad: expected a contiguous {tuple(student.shape)} {student.dtype} tensor")
    tg = _as(target, np.int64) if target is not None else np.zeros(1, np.int64)
    g = _view(grad) if grad is not None else np.zeros((1, 0), s.dtype)
    loss = np.empty(n_rows, dt)
    if n_rows:
        _launch(
            _distill_kernel, s.size, s, t, tg, target is not None, int(ignore_index), DIVERGENCE_CODES[divergence],
            float(temperature), float(beta), _grad_scale(grad_scale, n_rows), g, grad is not None, loss,
        )  # fmt: skip
    return torch.from_numpy(loss)
