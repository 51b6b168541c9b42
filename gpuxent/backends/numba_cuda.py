"""CUDA backend: fused softmax-cross-entropy kernels written with ``numba.cuda.jit``.

A group of ``threads_per_row`` threads (a power of two) owns one row; a block holds one group for
long rows and several for short ones. Each thread walks its part of the row keeping a running
``(max, sum of exp(x - max))`` pair (``rowmath.make_online``), merged with the other threads of its
group by a tree reduction in shared memory (``syncthreads`` only: the CUDA simulator has no warp
shuffles). The gradient pass of the same launch reads the row a second time and writes the
gradient: forward is one pass over the logits, forward+backward two (as Triton's kernels).

Memory: the kernels read and write the logits' own dtype (float64, float32, float16, bfloat16) and
compute in registers, in the compute dtype (float32; float64 for float64). A row is walked in 64-bit
words of an int64 view of the tensor's storage, one word per thread per step, consecutive threads
on consecutive words: 4 half elements or 2 float32 per load and per store (a float64 is a word
already: read one by one). The elements of a row before its first 8-byte-aligned element and after
its last whole word (rows whose byte offset is not a multiple of 8: odd r, slices), at most 3 + 3,
are read and written one by one ("edges"), in the same loop, after the words. numba has no
bfloat16: it arrives as its bits (an int16 view); a bfloat16 is widened by shifting its bits into
the top half of a float32's, a float16 decoded from its bits (a native float16 load at the edges),
and the gradient is rounded once, to nearest even, as it is stored (NaN stays NaN). The gradient
pass walks the gradient's words, each from the logits' word of the same columns: the host gives
the gradient words only where every row of both starts at the same offset within a word (in
place, or a fresh gradient of contiguous logits), else the gradient is written element by element
(``_Rows``). A storage that is not 8-byte aligned gets no words. No copy is made around a launch.
Column arithmetic is int32 (fewer than 2**31 classes per row), row and word offsets int64.

Byte model per element of (N, r) logits of e bytes (2 for half; c = the compute dtype's size),
streams as (what, bytes, read/write):
  cross_entropy forward:        (logits, e, r)
  cross_entropy fwd+bwd:        (logits pass 1, e, r), (logits pass 2, e, r), (gradient, e, w): 1.5x
                                the minimum 2e; probability targets add (probs, c, r) per pass
  softmax:                      (x pass 1, e, r), (x pass 2, e, r), (out, c, w): out in the compute dtype
  row_partials:                 (logits, e, r) [+ (probs, c, r)]
  cross_entropy_backward:       (logits, e, r), (gradient, e, w) [+ (probs, c, r)]
  distillation:                 per pass (student, e, r), (teacher, e, r): forward 1 pass (jsd 2),
                                with the gradient 2 (jsd 3), plus (gradient, e, w)
plus O(N) per row: targets read (8 bytes), losses and lse written (c each); ``stats`` adds 16 bytes
per row written. An ignored row is not read: its loss and gradient are 0.

Arithmetic runs in the compute dtype: each dtype gets its own kernels whose constants carry that
dtype, so no float64 literal silently widens float32 math; each element kind its own specialisation
(``_kernels(dtype, stats, kind)``, ``_vocab_parallel_kernels(dtype, kind)``, ``_distillation_kernel(dtype,
kind)``: kind "bf16" or "fp16" on float32 arithmetic, None for elements of the compute dtype).

Data comes as torch tensors: on a GPU they become zero-copy device arrays
(``__cuda_array_interface__``) and kernels run on PyTorch's current stream; under
``NUMBA_ENABLE_CUDASIM=1`` the tensors live on the CPU and the simulator's arrays wrap zero-copy
numpy views of them (so the views of one storage alias, as on a GPU). Tensors on the other device
(CPU data on a real GPU, CUDA data under the simulator) are moved there and the results moved back.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from types import SimpleNamespace

import numba
import numpy as np
import torch

from . import compute_dtype, rowmath

try:  # a missing or broken numba.cuda makes the backend unavailable, not gpuxent unimportable
    from numba import cuda
except Exception as exc:  # pragma: no cover - depends on the installation
    cuda = None
    _IMPORT_ERROR = f"numba.cuda cannot be imported: {type(exc).__name__}: {exc}"
else:
    _IMPORT_ERROR = ""

NAME = "numba_cuda"
SIMULATOR = bool(numba.config.ENABLE_CUDASIM)
# Shared-memory arrays need a compile-time size: the largest block; the launch picks the real one.
# 512, not 1024: the float64 cross-entropy kernel needs 75 registers per thread (sm_90), and
# 1024 x 75 exceeds the 64K registers of a block.
MAX_THREADS = 512
# The simulator runs every thread as a Python thread: keep blocks tiny there.
MAX_THREADS_PER_ROW = 8 if SIMULATOR else MAX_THREADS
MIN_THREADS_PER_ROW = 1 if SIMULATOR else 32  # a warp
THREADS_PER_BLOCK = 16 if SIMULATOR else 256  # target block size when several rows share a block
ELEMENTS_PER_THREAD = 4  # a row of r classes gets about r / 4 threads, up to MAX_THREADS_PER_ROW
MAX_BLOCKS = 4 if SIMULATOR else 16384  # more rows than that loop (grid-stride over rows)
WORDS = True  # rows walked in 64-bit words (False: every element one by one; for tests)
# The element kind of each dtype, and how many elements fill a 64-bit word.
KINDS = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
PER_WORD = {"fp64": 1, "fp32": 2, "fp16": 4, "bf16": 4}


def is_available() -> tuple[bool, str]:
    if cuda is None:
        return False, _IMPORT_ERROR
    try:
        if not cuda.is_available():
            return False, "numba.cuda finds no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
    except Exception as exc:  # a broken driver or toolkit
        return False, f"numba.cuda: {type(exc).__name__}: {exc}"
    if SIMULATOR:
        return True, f"numba {numba.__version__} CUDA simulator (NUMBA_ENABLE_CUDASIM=1) on CPU tensors"
    return (
        True,
        f"numba {numba.__version__} CUDA on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'GPU'}",
    )


def supports(device: torch.device) -> bool:
    # CUDA tensors natively (under the simulator: copied to the CPU and back); CPU tensors natively
    # under the simulator, else copied to the GPU and back.
    return device.type in ("cuda", "cpu")


# --------------------------------------------------------------------------- elements and words


def _kind(dtype: np.dtype, kind: str | None) -> str:
    """The element kind of a kernel computing in ``dtype`` (None: elements of that dtype)."""
    compute = "fp64" if dtype == np.float64 else "fp32"
    kind = kind or compute
    if kind not in PER_WORD or (kind == "fp64") != (compute == "fp64"):
        raise ValueError(f"no {kind} elements for kernels computing in {dtype}")
    return kind


@functools.cache
def _codec(kind: str) -> SimpleNamespace:
    """Device functions that move elements of ``kind`` between memory and registers (the compute
    dtype). A kernel holds row ``i`` of an (N, r) tensor as ``el = elements[i]`` (bfloat16 as its int16
    bits) and ``w = words[wb:]``, the int64 words of the tensor's storage from the row's first whole
    word on, where element ``(i, j)`` of the tensor is element number ``off + i * rs + j`` of ``words``
    (``off`` < 0: no words, every element one by one). A thread group walks a row in ``r - nb * (P - 1)``
    chunks: chunk ``c < nb`` is word ``w[c]`` (columns ``h + c * P`` on), the others one edge element
    each (the ``h`` leading columns, then those after the words):

    ``load(el, j)`` / ``store(el, j, v)``: one element (the store rounds once, to nearest even);
    ``get(word, q)``: element ``q`` of a word; ``put(acc, q, v)``: ``acc`` with ``v`` as its element ``q``;
    ``span(off, rs, i, r)``: row ``i`` as ``(h, nb, wb)``; ``view(el, words, off, rs, i)``: row ``i`` of the
    kernel arguments of a tensor (``_Launch.rows``) as ``(el[i], words[wb:], h, nb)``, the way ``_walk``
    takes a row; ``edge(e, h, nb)``: the column of edge element ``e``; ``zero``: 0 in the compute dtype.
    Column arithmetic is int32 (a row has fewer than 2**31 classes: ``_Rows`` checks it), word numbers
    int64.
    """
    P = PER_WORD[kind]
    BITS = 64 // P
    MASK = (1 << BITS) - 1 if P > 1 else -1
    TOP, FULL = 1 << (BITS - 1), 1 << BITS
    int64, int32 = numba.int64, numba.int32
    P32 = np.int32(P)
    dev = cuda.jit(device=True)
    TWO_M24 = np.float32(2.0**-24)

    @dev
    def bf16_value(b):
        """float32 from the bits of a bfloat16 (its top half)."""
        return np.uint32((b & 0xFFFF) << 16).view(np.float32)

    @dev
    def bf16_bits(v):
        """The bits of float32 ``v`` rounded to the nearest bfloat16, ties to even; NaN stays a quiet NaN."""
        u = np.int64(np.float32(v).view(np.uint32))
        if v != v:
            return (u >> 16) | 0x40
        return (u + 0x7FFF + ((u >> 16) & 1)) >> 16

    @dev
    def fp16_value(b):
        """float32 from the bits of a float16 (exact: subnormals, infinities and NaN included)."""
        e = (b >> 10) & 0x1F
        m = b & 0x3FF
        if e == 0:
            v = np.float32(m) * TWO_M24
        elif e == 0x1F:
            v = np.uint32(0x7F800000 | (m << 13)).view(np.float32)
        else:
            v = np.uint32(((e + 112) << 23) | (m << 13)).view(np.float32)
        return -v if b & 0x8000 else v

    @dev
    def fp16_bits(v):
        """The bits of float32 ``v`` rounded to the nearest float16 (the conversion's own rounding)."""
        return np.int64(np.float16(v).view(np.int16)) & 0xFFFF

    @dev
    def fp32_value(b):
        return np.uint32(b).view(np.float32)

    @dev
    def fp32_bits(v):
        return np.int64(np.float32(v).view(np.uint32))

    if kind == "bf16":
        value, to_bits = bf16_value, bf16_bits

        @dev
        def load(el, j):
            return bf16_value(np.int64(el[j]))

        @dev
        def store(el, j, v):
            b = bf16_bits(v)
            el[j] = np.int16(b - 0x10000 if b >= 0x8000 else b)

    elif kind == "fp16":
        value, to_bits = fp16_value, fp16_bits

        @dev
        def load(el, j):
            return np.float32(el[j])

        @dev
        def store(el, j, v):
            el[j] = np.float16(v)

    else:
        value, to_bits = fp32_value, fp32_bits

        @dev
        def load(el, j):
            return el[j]

        @dev
        def store(el, j, v):
            el[j] = v

    if P == 1:

        @dev
        def get(word, q):
            return word.view(np.float64)

        @dev
        def put(acc, q, v):
            return np.float64(v).view(np.int64)

    else:

        @dev
        def get(word, q):
            return value((word >> (BITS * q)) & MASK)

        @dev
        def put(acc, q, v):
            b = to_bits(v)
            if q == P - 1 and b >= TOP:  # the top element as a signed field: no int64 overflow
                b -= FULL
            return acc | (b << (BITS * q))

    @dev
    def span(off, rs, i, r):
        if off < 0 or P == 1:  # float64: every element is a word already, read one by one
            return int32(r), int32(0), int64(0)
        start = off + i * rs
        h = (P - start % P) % P
        if h > r:
            h = r
        return int32(h), int32((r - h) // P), (start + h) // P

    @dev
    def view(el, words, off, rs, i):
        h, nb, wb = span(off, rs, i, el.shape[1])
        return el[i], words[wb:], h, nb

    @dev
    def edge(e, h, nb):
        return e if e < h else e + nb * P32

    return SimpleNamespace(
        per_word=P, load=load, store=store, get=get, put=put, span=span, view=view, edge=edge, value=value,
        to_bits=to_bits, zero=np.float64(0) if kind == "fp64" else np.float32(0),
    )  # fmt: skip


@functools.cache
def _softcap(dtype: np.dtype):
    """``cap(y, softcap, inv_cap) -> (softcap * tanh(y / softcap), the tanh)``: the soft-capped logit and
    the tanh its derivative is made of (``1 - tanh**2``); ``y`` and 0 for ``softcap`` 0 (none)."""
    ZERO = dtype.type(0)

    @cuda.jit(device=True)
    def cap(y, softcap, inv_cap):
        if softcap > ZERO:
            th = math.tanh(y * inv_cap)
            return softcap * th, th
        return y, ZERO

    return cap


@functools.cache
def _row_group():
    """``group(threads_per_row) -> (tid, lane, base, step)``: the thread's index in its block and its lane
    in its row group, the block's first row and the grid's stride over rows. The group of a thread holds
    row ``base + tid // threads_per_row``, then ``step`` rows further on: a loop on ``base`` runs the same
    iterations in every thread of a block, so that ``syncthreads`` inside it does not diverge. With
    ``threads_per_row`` 1: a grid-stride loop over elements ``base + tid``."""
    int64 = numba.int64

    @cuda.jit(device=True)
    def group(threads_per_row):
        tid = int64(cuda.threadIdx.x)
        rows = int64(cuda.blockDim.x) // threads_per_row  # per block
        return tid, tid % threads_per_row, int64(cuda.blockIdx.x) * rows, int64(cuda.gridDim.x) * rows

    return group


def _walk(visit, io: SimpleNamespace, out_io: SimpleNamespace | None = None, two: bool = False):
    """The device function of one pass over a row by its row group, every column once (a reading pass
    without ``out_io``, a writing pass in ``out_io``'s elements with it), words first, then the edge
    elements (``_codec``): ``walk(src, src2, dst, lane, threads_per_row, read, same, state, args) -> state``.

    ``src``, ``src2``, ``dst``: rows as ``view`` gives them. The chunks are ``dst``'s (a reading pass: ``dst``
    is ``src``), each thread's ``lane, lane + threads_per_row, ...``. The input rows ``src`` (and with ``two``
    ``src2``, walked in the same words) are elements of ``io``, read in words where ``same`` (their words
    hold ``dst``'s columns: the host lays them out alike; softmax checks it per row), else one by one;
    where not ``read`` (an ignored row) nothing is read and every element is 0.
    ``visit(j, y, y2, state, args) -> (state, g)`` on each column ``j``, ``y``/``y2`` the column's elements (in
    the compute dtype; ``y2`` unused without ``two``): a reading pass folds them into ``state``, a writing
    pass stores ``g`` in ``dst``, packed into its words. ``args``: the visit's own arguments, as a tuple."""
    WRITE, TWO = out_io is not None, two
    out_io = out_io or io
    SAME = out_io is io  # the input's words can hold the chunk's columns
    P = np.int32(out_io.per_word)
    WORDED = P > 1  # float64: every element is a word already (no word code)
    ZERO, int64, int32 = io.zero, numba.int64, numba.int32
    get, load, put, store, edge = io.get, io.load, out_io.put, out_io.store, out_io.edge

    @cuda.jit(device=True)
    def elements(src, src2, j, read):
        y = y2 = ZERO
        if read:
            y = load(src[0], j)
            if TWO:
                y2 = load(src2[0], j)
        return y, y2

    @cuda.jit(device=True)
    def walk(src, src2, dst, lane, threads_per_row, read, same, state, args):
        el, words, h, nb = dst
        in_words = read and SAME and same
        # r from the input row: the kernel holds its length already (the output's would be one more register)
        for c in range(int32(lane), int32(src[0].shape[0]) - nb * (P - 1), int32(threads_per_row)):
            if WORDED and c < nb:
                w = w2 = int64(0)
                if in_words:
                    w = src[1][c]
                    if TWO:
                        w2 = src2[1][c]
                acc = int64(0)
                for q in range(P):
                    j = h + c * P + q
                    y, y2 = (get(w, q), get(w2, q)) if in_words else elements(src, src2, j, read)
                    state, g = visit(j, y, y2, state, args)
                    if WRITE:
                        acc = put(acc, q, g)
                if WRITE:
                    words[c] = acc
            else:
                j = edge(c - nb, h, nb)
                y, y2 = elements(src, src2, j, read)
                state, g = visit(j, y, y2, state, args)
                if WRITE:
                    store(el, j, g)
        return state

    return walk


def _tree_reduce(put, take, combine):
    """The reduction over each row group of a block, by halving strides in shared memory (``syncthreads``
    only: the CUDA simulator has no warp shuffles): ``reduce(sm, tid, lane, threads_per_row, v) -> v``, the
    group's result back to all its threads. ``put(sm, i, v)`` writes a thread's values ``v`` to slot ``i``
    of its shared arrays ``sm``, ``take(sm, i, v)`` reads them back (into ``v``), ``combine(sm, i, v, o)``
    merges slot ``o`` into thread ``i``'s ``v``. Every thread of the block must call it."""

    @cuda.jit(device=True)
    def reduce(sm, tid, lane, threads_per_row, v):
        put(sm, tid, v)
        cuda.syncthreads()
        stride = threads_per_row // 2
        while stride > 0:
            if lane < stride:
                v = combine(sm, tid, v, tid + stride)
                put(sm, tid, v)
            cuda.syncthreads()
            stride //= 2
        v = take(sm, tid - lane, v)
        cuda.syncthreads()  # the slots are rewritten for the next row
        return v

    return reduce


@functools.cache
def _group_reduce(dtype: np.dtype, stats: bool, sums: int):
    """``_tree_reduce`` of ``v = (m, s, a, b, c, st)``: (m, s) merged, the first ``sums`` of the plain sums
    (a, b, c) added (the others come back as they were given) and, with ``stats``, the statistics
    ``st = (t, best value, its index, first NaN index)``: ``t`` merged with (m, s) by ``merge_entropy``,
    the argmax by (larger value, then lower index), the first NaN by the lower index. ``sm`` is
    ``(slots, st_slots, j_slots)``: a (MAX_THREADS, 2 + sums) shared array, and (MAX_THREADS, 2) ones (one
    slot each, unused, without ``stats``)."""
    STATS, SUMS = stats, sums
    merge = cuda.jit(device=True)(rowmath.make(dtype.type).merge)
    merge_entropy = cuda.jit(device=True)(rowmath.make_entropy(dtype.type).merge_entropy)

    @cuda.jit(device=True)
    def put(sm, i, v):
        slots, st_slots, j_slots = sm
        m, s, a, b, c, st = v
        slots[i, 0] = m
        slots[i, 1] = s
        if SUMS > 0:
            slots[i, 2] = a
        if SUMS > 1:
            slots[i, 3] = b
        if SUMS > 2:
            slots[i, 4] = c
        if STATS:
            st_slots[i, 0] = st[0]
            st_slots[i, 1] = st[1]
            j_slots[i, 0] = st[2]
            j_slots[i, 1] = st[3]

    @cuda.jit(device=True)
    def take(sm, i, v):
        slots, st_slots, j_slots = sm
        _, _, a, b, c, st = v
        if SUMS > 0:
            a = slots[i, 2]
        if SUMS > 1:
            b = slots[i, 3]
        if SUMS > 2:
            c = slots[i, 4]
        if STATS:
            st = (st_slots[i, 0], st_slots[i, 1], j_slots[i, 0], j_slots[i, 1])
        return slots[i, 0], slots[i, 1], a, b, c, st

    @cuda.jit(device=True)
    def combine(sm, i, v, o):
        slots, st_slots, j_slots = sm
        m, s, a, b, c, st = v
        if STATS:  # its own statistics from its slot: not held in registers through the loop
            t = merge_entropy(m, s, st_slots[i, 0], slots[o, 0], slots[o, 1], st_slots[o, 0])
            best, j = st_slots[i, 1], j_slots[i, 0]
            if st_slots[o, 1] > best or (st_slots[o, 1] == best and j_slots[o, 0] < j):
                best, j = st_slots[o, 1], j_slots[o, 0]
            st = (t, best, j, j_slots[o, 1] if j_slots[o, 1] < j_slots[i, 1] else j_slots[i, 1])
        m, s = merge(m, s, slots[o, 0], slots[o, 1])
        if SUMS > 0:
            a += slots[o, 2]
        if SUMS > 1:
            b += slots[o, 3]
        if SUMS > 2:
            c += slots[o, 4]
        return m, s, a, b, c, st

    return _tree_reduce(put, take, combine)


# --------------------------------------------------------------------------- kernels


@functools.cache
def _kernels(dtype: np.dtype, stats: bool = False, kind: str | None = None):
    """(cross-entropy, softmax, bce, bce-with-logits) kernels computing in ``dtype``, the first two on
    logits of ``kind`` ("bf16", "fp16"; None: of ``dtype``); with ``stats`` the cross-entropy kernel
    also writes each row's argmax and entropy (a compile-time constant: the kernels without it carry
    none of that code)."""
    STATS = stats
    SM_STATS = MAX_THREADS if stats else 1  # the shared slots of the statistics (none without them)
    BIG = numba.int64(2**62)  # an index past every class: "none yet"
    f = dtype.type
    ZERO, ONE, NEG_INF, NAN = f(0), f(1), f(-math.inf), f(math.nan)
    int64, int32 = numba.int64, numba.int32
    # No builtin max/min in kernels: numba's varargs overload of them does not compile for CUDA.
    acc_t = numba.from_dtype(dtype)  # the numba type of the accumulators and shared slots
    io = _codec(_kind(dtype, kind))  # the logits and the gradient
    out_io = _codec(_kind(dtype, None))  # softmax's output, in the compute dtype
    load, view, out_view = io.load, io.view, out_io.view

    row_math = rowmath.make(f)  # the row math shared with numba_cpu
    push = cuda.jit(device=True)(rowmath.make_online(f).push)
    loss_and_coef = cuda.jit(device=True)(row_math.loss_and_coef)
    merge_entropy = cuda.jit(device=True)(rowmath.make_entropy(f).merge_entropy)
    entropy = cuda.jit(device=True)(rowmath.make_entropy(f).entropy)
    bce = cuda.jit(device=True)(row_math.bce)
    bce_logits = cuda.jit(device=True)(row_math.bce_logits)
    group_reduce = _group_reduce(dtype, stats, 2)  # a, b
    softmax_reduce = _group_reduce(dtype, False, 0)
    cap = _softcap(dtype)
    group = _row_group()

    @cuda.jit(device=True)
    def log_sum(m, s):
        # s is 0 only for an all -inf row (no log(0): the simulator's math.log raises on it)
        return NEG_INF if s == ZERO else m + math.log(s)

    @cuda.jit(device=True)
    def ce_visit(j, y, _, state, args):
        """Pass 1 on column ``j`` (logit ``y``): the (max, sum exp) pair and, for smoothing or
        probability targets (``q_row``), the weighted sums a = sum_j w_j q'_j y_j and b = sum_j w_j q'_j
        with q' = keep * q + eps_r (class targets: a = sum_j w_j y_j, b = sum_j w_j); with STATS the
        statistics st = (t = sum exp(y - m) (y - m), the best value and its index, the first NaN's
        index), whatever the order the columns come in. ``state``: ``(m, s, a, b, c, st)`` as ``group_reduce``
        takes it (c unused)."""
        m, s, a, b, c, st = state
        q_row, weight, prob, has_weight, smoothing, keep, eps_r, softcap, inv_cap = args
        y = cap(y, softcap, inv_cap)[0]
        if STATS:
            t_sum, best, best_j, nan_j = st
            if y != NEG_INF:
                t_sum = merge_entropy(m, s, t_sum, y, ONE, ZERO)
            if y != y:
                nan_j = j if j < nan_j else nan_j
            elif y > best or (y == best and j < best_j):  # a tie: the lowest index
                best, best_j = y, int64(j)
            st = (t_sum, best, best_j, nan_j)
        m, s = push(m, s, y)
        w = weight[j] if has_weight else ONE
        if prob:
            wq = w * (keep * q_row[j] + eps_r)
            a += wq * y
            b += wq
        elif smoothing > ZERO:
            a += w * y
            b += w
        return (m, s, a, b, c, st), ZERO

    @cuda.jit(device=True)
    def ce_grad(j, y, _, state, args):
        """Pass 2 on column ``j``: scale * (coef_p * p_j - w_j q'_j), times the softcap's tanh', with
        ``a_p = scale * coef_p``, ``sk = scale * keep``, ``se = scale * eps_r`` and ``st_ = sk * w_t`` (the
        target ``t``'s term). p_j = exp((y_j - m) - log s): no rounded lse of the size of m, so p_t - 1
        stays accurate when p_t is close to 1."""
        t, a_p, sk, se, st_, m, log_s, finite, q_row, weight, prob, has_weight, smoothing, softcap, inv_cap = args
        y, th = cap(y, softcap, inv_cap)
        g = ZERO if y == NEG_INF and finite else a_p * math.exp((y - m) - log_s)
        w = weight[j] if has_weight else ONE
        if prob:
            g -= w * (sk * q_row[j] + se)
        elif smoothing > ZERO:
            g -= se * w
        if j == t:
            g -= st_
        if softcap > ZERO:
            g *= ONE - th * th
        return state, g

    ce_pass1, ce_pass2 = _walk(ce_visit, io), _walk(ce_grad, io, io)

    @cuda.jit
    def ce_kernel(
        logits, logits_words, logits_off, logits_stride, target, probs, weight, grad_scale,
        grad, grad_words, grad_off, grad_stride, loss, lse, argmax, entropy_out,
        ignore_index, smoothing, eps_r, z_loss, softcap, prob, has_weight, want_grad, threads_per_row,
    ):  # fmt: skip
        # one shared array a line: the simulator tells them apart by their line
        sm = cuda.shared.array((MAX_THREADS, 4), acc_t)
        sm_st = cuda.shared.array((SM_STATS, 2), acc_t)
        sm_j = cuda.shared.array((SM_STATS, 2), int64)
        n_rows, n_classes = logits.shape
        tid, lane, base, step = group(threads_per_row)
        keep = ONE - smoothing
        inv_cap = ONE / softcap if softcap > ZERO else ZERO
        per_row_scale = grad_scale.shape[0] > 1
        while base < n_rows:
            row = base + tid // threads_per_row
            live = row < n_rows
            kept = live
            t = int32(-1)
            y_t = ZERO
            w_t = ZERO
            q_row = probs[row if live and prob else 0]
            if live and not prob:
                t64 = int64(target[row])
                kept = t64 != ignore_index
                if kept and (t64 < 0 or t64 >= n_classes):  # never read out of bounds: a NaN row instead
                    y_t = NAN
                    w_t = NAN
                elif kept:  # read before any thread overwrites the row (in-place gradient)
                    t = int32(t64)
                    y_t = cap(load(logits[row], t), softcap, inv_cap)[0]
                    w_t = weight[t] if has_weight else ONE

            # pass 1: the (max, sum exp) pair, the sums a, b and the statistics
            v = (NEG_INF, ZERO, ZERO, ZERO, ZERO, (ZERO, NEG_INF, BIG, BIG))
            if kept:
                x = view(logits, logits_words, logits_off, logits_stride, row)
                v = ce_pass1(
                    x, x, x, lane, threads_per_row, True, True, v,
                    (q_row, weight, prob, has_weight, smoothing, keep, eps_r, softcap, inv_cap),
                )  # fmt: skip
            m, s, a, b, _, st = group_reduce((sm, sm_st, sm_j), tid, lane, threads_per_row, v)
            if not live:
                base += step
                continue
            # s > 0 unless the row's softmax is NaN in torch: s = 0 for a row of -inf, NaN for a row
            # holding NaN or +inf. There torch's loss is NaN and its gradient NaN on the whole row.
            # An ignored row counts for nothing: loss, lse and gradient 0 (torch's gradient is NaN there
            # too when the row's softmax is, an artefact of multiplying it by 0); its gradient comes
            # from pass 2 with every factor 0, its logits not read.
            finite = s > ZERO
            lse_row = loss_row = coef_p = log_s = ZERO
            if kept:
                lse_row = log_sum(m, s)
                log_s = math.log(s) if finite else NAN  # (no log(0): the simulator's math.log raises on it)
                # d loss / d y_j = coef_p * p_j - (target mass)_j
                loss_row, coef_p = loss_and_coef(m, log_s, y_t, w_t, a, b, prob, keep, eps_r, smoothing, z_loss)
                if not finite:
                    loss_row = NAN
            else:
                m = ZERO
            if lane == 0:
                loss[row] = loss_row
                lse[row] = lse_row
                if STATS:  # torch.argmax: the first NaN, else the first max; 0 for a row of -inf (or ignored)
                    argmax[row] = st[3] if st[3] < BIG else (st[2] if st[2] < BIG else 0)
                    entropy_out[row] = ZERO if not kept else (entropy(log_s, s, st[0]) if finite else NAN)

            # pass 2: the gradient's words, each from the logits' word of the same columns (the host gives
            # the gradient no words where the two are not laid out alike), then its edge elements
            if want_grad:
                scale = ZERO
                if kept:
                    scale = grad_scale[row] if per_row_scale else grad_scale[0]
                sk = scale * keep
                x = view(logits, logits_words, logits_off, logits_stride, row)  # not held through pass 1: registers
                ce_pass2(
                    x, x, view(grad, grad_words, grad_off, grad_stride, row), lane, threads_per_row, kept, True, (),
                    (t, scale * coef_p, sk, scale * eps_r, sk * w_t, m, log_s, finite, q_row, weight, prob,
                     has_weight, smoothing, softcap, inv_cap),
                )  # fmt: skip
            base += step

    @cuda.jit(device=True)
    def softmax_visit(j, y, _, v, args):
        return push(v[0], v[1], y) + v[2:], ZERO

    @cuda.jit(device=True)
    def softmax_value(j, y, _, state, args):
        m, log_s, finite, log = args
        if log:
            return state, (y - m) - log_s  # no rounded lse of the size of m
        return state, ZERO if y == NEG_INF and finite else math.exp((y - m) - log_s)

    softmax_pass1, softmax_pass2 = _walk(softmax_visit, io), _walk(softmax_value, io, out_io)

    @cuda.jit
    def softmax_kernel(x, x_words, x_off, x_stride, out, out_words, out_off, out_stride, log, threads_per_row):
        sm = cuda.shared.array((MAX_THREADS, 2), acc_t)
        sm_st = cuda.shared.array((1, 2), acc_t)
        sm_j = cuda.shared.array((1, 2), int64)
        n_rows = x.shape[0]
        tid, lane, base, step = group(threads_per_row)
        while base < n_rows:
            row = base + tid // threads_per_row
            live = row < n_rows
            src = view(x, x_words, x_off, x_stride, row if live else 0)
            v = (NEG_INF, ZERO, ZERO, ZERO, ZERO, (ZERO, NEG_INF, BIG, BIG))  # (m, s); no sums, no statistics
            if live:
                v = softmax_pass1(src, src, src, lane, threads_per_row, True, True, v, ())
            m, s, _, _, _, _ = softmax_reduce((sm, sm_st, sm_j), tid, lane, threads_per_row, v)
            if live:
                finite = s > ZERO  # else NaN, as in torch: a row of -inf (s = 0), or holding NaN or +inf
                # pass 2 in the output's words; the input from its own word of the same columns where it
                # holds them (a float input laid out as the output), else one by one
                dst = out_view(out, out_words, out_off, out_stride, row)
                softmax_pass2(
                    src, src, dst, lane, threads_per_row, True, src[2] == dst[2], (),
                    (m, math.log(s) if finite else NAN, finite, log),
                )  # fmt: skip
            base += step

    @cuda.jit
    def bce_kernel(p, y, w, loss, grad, has_weight, want_grad):
        tid, _, base, step = group(1)
        for i in range(base + tid, p.shape[0], step):
            loss[i], grad_i = bce(p[i], y[i], w[i] if has_weight else ONE)
            if want_grad:
                grad[i] = grad_i

    @cuda.jit
    def bce_logits_kernel(x, y, w, pos_weight, loss, grad, has_weight, has_pos_weight, want_grad):
        tid, _, base, step = group(1)
        for i in range(base + tid, x.shape[0], step):
            wi = w[i] if has_weight else ONE
            loss[i], grad_i = bce_logits(x[i], y[i], wi, pos_weight[i] if has_pos_weight else ONE)
            if want_grad:
                grad[i] = grad_i

    return ce_kernel, softmax_kernel, bce_kernel, bce_logits_kernel


# --------------------------------------------------------------------------- launch helpers


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float64) if dtype == torch.float64 else np.dtype(np.float32)


def _row_layout(n_classes: int) -> tuple[int, int]:
    """(threads per row, a power of two; rows per block)."""
    want = max(1, -(-n_classes // ELEMENTS_PER_THREAD))
    tpr = 1 << (want - 1).bit_length()
    tpr = max(MIN_THREADS_PER_ROW, min(MAX_THREADS_PER_ROW, MAX_THREADS, tpr))
    return tpr, max(1, min(THREADS_PER_BLOCK, MAX_THREADS) // tpr)


def _grid(n_items: int, per_block: int) -> int:
    return max(1, min(MAX_BLOCKS, -(-n_items // per_block)))


def _kernel_device() -> str:
    return "cpu" if SIMULATOR else "cuda"


if SIMULATOR:  # the simulator's device array: a wrapper of a numpy array, which it does not copy
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _SimulatorArray


class _Rows:
    """How a kernel sees an (N, r) tensor: ``el``, its elements (bfloat16 as its int16 bits);
    ``words``, an int64 view of its whole storage; ``off``, the number of element ``(0, 0)`` counted
    in elements from the start of ``words`` (-1: no words: the storage is not 8-byte aligned, the
    classes are not adjacent, or ``WORDS`` is off; every element is then read one by one); and
    ``stride``, its row stride in elements."""

    def __init__(self, t: torch.Tensor):
        if t.shape[1] >= 2**31:
            raise ValueError(f"numba_cuda: rows of {t.shape[1]} classes; the kernels take fewer than 2**31")
        self.el = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        self.per_word = PER_WORD[KINDS[t.dtype]]
        self.n_rows = t.shape[0]
        self.words, self.off, self.stride = torch.zeros(1, dtype=torch.int64, device=t.device), -1, int(t.stride(0))
        if WORDS and t.numel() and (t.stride(1) == 1 or t.shape[1] == 1):
            storage = t.untyped_storage()
            if storage.data_ptr() % 8 == 0 and storage.nbytes() >= 8:
                self.words = torch.empty(0, dtype=torch.int64, device=t.device)
                self.words.set_(storage, 0, (storage.nbytes() // 8,), (1,))
                self.off = int(t.storage_offset())

    def alike(self, other: _Rows) -> bool:
        """Whether every row of both starts at the same element of a word (so that a word of one
        holds the same columns as the other's): both have words, of as many elements, and their
        offsets (and row strides, for several rows) agree modulo that number."""
        p = self.per_word
        return (
            self.off >= 0 and other.off >= 0 and p == other.per_word and (self.off - other.off) % p == 0
            and (self.n_rows <= 1 or (self.stride - other.stride) % p == 0)
        )  # fmt: skip

    def without_words(self) -> _Rows:
        self.off = -1
        return self


def _rows_alike(first: torch.Tensor, *others: torch.Tensor) -> list[_Rows]:
    """The layouts of ``first`` and ``others``, each of the others with words only where it is laid
    out like ``first`` (the kernels walk both in the same words)."""
    lead = _Rows(first)
    return [lead] + [r if lead.alike(r) else r.without_words() for r in map(_Rows, others)]


class _Launch:
    """Kernel arguments made from torch tensors, and the launch on the right device and stream.

    Every tensor becomes a zero-copy array: on a GPU a device array (``__cuda_array_interface__``),
    under the simulator its wrapper of a numpy view of the CPU tensor (a numpy array given to a
    simulated kernel would be copied in and out, once per argument, which breaks aliased views:
    an in-place gradient, or a tensor's elements and its storage's words).
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, t: torch.Tensor):
        t = t.detach()
        if SIMULATOR:
            return _SimulatorArray(t.numpy())
        with cuda.gpus[self.device.index or 0]:
            return cuda.as_cuda_array(t, sync=False)

    def rows(self, layout: _Rows) -> tuple:
        """The four kernel arguments of an (N, r) tensor (see :class:`_Rows`)."""
        return self(layout.el), self(layout.words), layout.off, layout.stride

    def launch(self, kernel, grid: int, block: int, *args) -> None:
        if SIMULATOR:
            kernel[grid, block](*args)
            return
        with cuda.gpus[self.device.index or 0]:
            stream = cuda.external_stream(torch.cuda.current_stream(self.device).cuda_stream)
            kernel[grid, block, stream](*args)

    def row_kernel(self, kernel, n_rows: int, n_classes: int, *args) -> None:
        """Launch a row kernel: a group of threads per row (``_row_layout``), their number its last argument."""
        tpr, rows_per_block = _row_layout(n_classes)
        self.launch(kernel, _grid(n_rows, rows_per_block), tpr * rows_per_block, *args, tpr)


# During a launch the simulator swaps this module's ``cuda`` global for its fake module, which
# breaks any other thread's host code here: under it, one call at a time.
_SIMULATOR_LOCK = threading.Lock() if SIMULATOR else contextlib.nullcontext()


def _moved(fn):
    """Run ``fn`` on the kernels' device: input tensors elsewhere are moved there, results moved back.

    ``grad`` stays where it is: ``_grad_out`` / ``_row_grad`` write it from the kernels' device.
    """
    here = torch.device(_kernel_device())

    def move(v):
        return v.to(here) if isinstance(v, torch.Tensor) else v

    @functools.wraps(fn)
    def wrapper(first, *args, **kwargs):
        with _SIMULATOR_LOCK:
            if first.device.type == here.type:
                return fn(first, *args, **kwargs)
            home = first.device
            kwargs = {k: v if k == "grad" else move(v) for k, v in kwargs.items()}
            out = fn(move(first), *[move(a) for a in args], **kwargs)
            return tuple(o.to(home) for o in out) if isinstance(out, tuple) else out.to(home)

    return wrapper


def _compute(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.detach() if t.dtype == dt else t.detach().to(dt)


def _targets(target: torch.Tensor, weight, dt: torch.dtype, dev: torch.device) -> tuple:
    """A row kernel's target arguments: (whether the targets are probabilities, the class targets (int64),
    the probabilities and the weight (compute dtype), a one-element stand-in of the compute dtype), with
    the stand-in (or one of int64) for the kind of targets not given and for no weight."""
    prob = target.is_floating_point()
    dummy = torch.zeros(1, dtype=dt, device=dev)
    t = torch.zeros(1, dtype=torch.int64, device=dev) if prob else target.detach().to(torch.int64)
    q = _compute(target, dt) if prob else dummy.view(1, 1)
    w = dummy if weight is None else _compute(weight, dt)
    return prob, t, q, w, dummy


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """An (N, r) kernel input in one of the four dtypes the kernels read, as it is where it can be."""
    t = t.detach()
    if t.dtype not in KINDS:
        t = t.to(compute_dtype(t.dtype))
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


@contextlib.contextmanager
def _row_grad(grad: torch.Tensor | None, like: torch.Tensor):
    """The (N, r) buffer a row kernel writes the gradient into, in ``like``'s (the logits') dtype:
    ``grad`` itself when it is on the kernels' device, of that dtype, with adjacent classes (in place:
    the logits themselves); else a buffer there, copied into ``grad`` after the launch. None: no
    gradient (a one-element stand-in of that dtype, never written)."""
    if grad is None:
        yield torch.zeros((1, 1), dtype=like.dtype, device=like.device)
        return
    direct = (
        grad.device == like.device and grad.dtype == like.dtype and grad.dim() == 2
        and (grad.stride(1) == 1 or grad.shape[1] <= 1)
    )  # fmt: skip
    g = grad if direct else torch.empty(like.shape, dtype=like.dtype, device=like.device)
    yield g
    if not direct:
        grad.copy_(g.view(grad.shape))


@contextlib.contextmanager
def _grad_out(args: _Launch, grad: torch.Tensor | None, shape, dt: torch.dtype):
    """The buffer an elementwise (BCE) kernel writes the gradient into: ``grad`` itself when it is
    contiguous, in the compute dtype and on the kernels' device; else a compute-dtype scratch buffer
    there, copied into ``grad`` after the launch (rounded once to a half dtype, or moved to ``grad``'s
    device)."""
    if grad is None:
        yield torch.zeros((1,) * len(shape), dtype=dt, device=args.device)  # never written
        return
    direct = grad.device == args.device and grad.dtype == dt and grad.is_contiguous()
    g = grad.view(shape) if direct else torch.empty(shape, dtype=dt, device=args.device)
    yield g
    if not direct:
        grad.copy_(g.view(grad.shape))


def _row_scale(grad_scale, n_rows: int, dt: torch.dtype, device: torch.device) -> torch.Tensor:
    """``grad_scale`` as the kernel reads it: (1,) for every row, or (N,) per row, compute dtype."""
    if not isinstance(grad_scale, torch.Tensor):
        return torch.full((1,), 1.0 if grad_scale is None else float(grad_scale), dtype=dt, device=device)
    if grad_scale.numel() not in (1, n_rows):
        raise ValueError(f"grad_scale: {grad_scale.numel()} elements for {n_rows} rows; give 1 or {n_rows}")
    # stays on the device (no host sync); dense: an expanded (stride-0) factor becomes N of them
    return grad_scale.detach().reshape(-1).to(device=device, dtype=dt).contiguous()


# --------------------------------------------------------------------------- the contract


@_moved
def cross_entropy(
    logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad, stats=None
):  # fmt: skip
    """Per-row loss and lse of a (N, r) float tensor (and with ``stats`` the row's argmax and entropy);
    see ``gpuxent.backends`` for the contract."""
    dt = compute_dtype(logits.dtype)
    np_dt = _np_dtype(dt)
    f = np_dt.type
    dev = logits.device
    n_rows, n_classes = logits.shape
    x = _rows_of(logits)  # read in its own dtype
    loss = torch.empty(n_rows, dtype=dt, device=dev)
    lse = torch.empty(n_rows, dtype=dt, device=dev)
    if n_rows == 0:
        return loss, lse
    prob, t, q, w, dummy = _targets(target, weight, dt, dev)
    scale = _row_scale(grad_scale, n_rows, dt, dev)
    args = _Launch(dev)
    stats_out = stats if stats is not None else (t, dummy)  # never written without stats
    with _row_grad(grad, x) as g:
        xr, gr = _rows_alike(x, g)
        args.row_kernel(
            _kernels(np_dt, stats is not None, KINDS[x.dtype])[0], n_rows, n_classes, *args.rows(xr), args(t),
            args(q), args(w), args(scale), *args.rows(gr), args(loss), args(lse), args(stats_out[0]),
            args(stats_out[1]), int(ignore_index), f(label_smoothing), f(label_smoothing / n_classes), f(z_loss),
            f(softcap or 0.0), bool(prob), weight is not None, grad is not None,
        )  # fmt: skip
    return loss, lse


@_moved
def softmax(x, *, log):
    """Row softmax (or log-softmax) of a (N, r) tensor, returned in the compute dtype."""
    dt = compute_dtype(x.dtype)
    np_dt = _np_dtype(dt)
    a = _rows_of(x)
    out = torch.empty(a.shape, dtype=dt, device=a.device)
    n_rows, n_classes = a.shape
    if n_rows == 0:
        return out
    args = _Launch(a.device)
    kernel = _kernels(np_dt, False, KINDS[a.dtype])[1]
    args.row_kernel(kernel, n_rows, n_classes, *args.rows(_Rows(a)), *args.rows(_Rows(out)), bool(log))
    return out


def _elementwise(kernel_index, x, inputs, grad):
    """Launch an elementwise BCE kernel over flat compute-dtype copies; returns the flat loss."""
    dt = compute_dtype(x.dtype)
    np_dt = _np_dtype(dt)
    dev = x.device
    n = x.numel()
    flat = [_compute(x, dt).reshape(-1)]
    dummy = torch.zeros(1, dtype=dt, device=dev)
    flags = []
    for v in inputs:  # target first (always given), then optional weights
        flags.append(v is not None)
        flat.append(dummy if v is None else _compute(v, dt).reshape(-1))
    loss = torch.empty(n, dtype=dt, device=dev)
    if n == 0:
        return loss
    block = THREADS_PER_BLOCK
    args = _Launch(dev)
    with _grad_out(args, grad, (n,), dt) as g:
        args.launch(
            _kernels(np_dt)[kernel_index], _grid(n, block), block,
            *[args(v) for v in flat], args(loss), args(g), *flags[1:], grad is not None,
        )  # fmt: skip
    return loss


@_moved
def binary_cross_entropy(probs, target, weight, *, grad):
    """Elementwise BCE on probabilities, flat, in the compute dtype; ``grad`` gets d loss / d p."""
    return _elementwise(2, probs, (target, weight), grad)


@_moved
def binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad):
    """Elementwise sigmoid + BCE, flat, in the compute dtype; ``grad`` gets d loss / d x."""
    return _elementwise(3, logits, (target, weight, pos_weight), grad)


# ------------------------------------------------------------ vocab-parallel: row partials and the gradient pass
# A rank that holds a slice of the classes reduces it to a few numbers per row (``row_partials``: pass 1
# of ``ce_kernel``); the ranks combine them, and ``cross_entropy_backward`` (pass 2) writes the slice's
# gradient from the global lse and coefficient. Contract: ``gpuxent.backends``.


@functools.cache
def _vocab_parallel_kernels(dtype: np.dtype, kind: str | None = None):
    """(row partials, gradient pass) kernels computing in ``dtype`` on logits of ``kind`` (as ``_kernels``)."""
    f = dtype.type
    ZERO, ONE, NEG_INF = f(0), f(1), f(-math.inf)
    int64, int32 = numba.int64, numba.int32
    acc_t = numba.from_dtype(dtype)
    io = _codec(_kind(dtype, kind))
    load, view = io.load, io.view
    push = cuda.jit(device=True)(rowmath.make_online(f).push)
    group_reduce = _group_reduce(dtype, False, 3)  # a, b, c
    cap = _softcap(dtype)
    group = _row_group()

    @cuda.jit(device=True)
    def partials_visit(j, y, _, state, args):
        """(m, s) of the soft-capped logits; probability targets: a = sum w q y, b = sum w q; c = sum w y.
        ``state``: ``(m, s, a, b, c, st)`` as ``group_reduce`` takes it (st unused)."""
        m, s, a, b, c, st = state
        q_row, weight, prob, has_weight, smoothing, softcap, inv_cap = args
        y = cap(y, softcap, inv_cap)[0]
        m, s = push(m, s, y)
        w = weight[j] if has_weight else ONE
        if prob:
            wq = w * q_row[j]
            a += wq * y
            b += wq
        if smoothing:
            c += w * y
        return (m, s, a, b, c, st), ZERO

    partials_pass = _walk(partials_visit, io)

    @cuda.jit
    def partials_kernel(
        logits, logits_words, logits_off, logits_stride, target, probs, weight, out,
        ignore_index, class_offset, softcap, prob, has_weight, smoothing, threads_per_row,
    ):  # fmt: skip
        sm = cuda.shared.array((MAX_THREADS, 5), acc_t)
        sm_st = cuda.shared.array((1, 2), acc_t)
        sm_j = cuda.shared.array((1, 2), int64)
        n_rows, n_classes = logits.shape
        tid, lane, base, step = group(threads_per_row)
        inv_cap = ONE / softcap if softcap > ZERO else ZERO
        while base < n_rows:  # every thread runs the same iterations: syncthreads must not diverge
            i = base + tid // threads_per_row
            live = i < n_rows
            kept = live
            t = int64(-1)
            if live and not prob:
                t = int64(target[i])
                kept = t != ignore_index
            x = view(logits, logits_words, logits_off, logits_stride, i if live else 0)
            q_row = probs[i if live and prob else 0]
            v = (NEG_INF, ZERO, ZERO, ZERO, ZERO, (ZERO, ZERO, int64(0), int64(0)))
            if kept:
                v = partials_pass(
                    x, x, x, lane, threads_per_row, True, True, v,
                    (q_row, weight, prob, has_weight, smoothing, softcap, inv_cap),
                )  # fmt: skip
            m, s, a, b, c, _ = group_reduce((sm, sm_st, sm_j), tid, lane, threads_per_row, v)
            if live and lane == 0:
                local = t - class_offset
                if not prob and kept and 0 <= local < n_classes:
                    y_t = cap(load(x[0], local), softcap, inv_cap)[0]
                    w_t = weight[local] if has_weight else ONE
                    a = w_t * (y_t - m)
                    b = w_t
                elif prob and m != NEG_INF:
                    a -= b * m
                out[i, 0] = m
                out[i, 1] = s
                out[i, 2] = a
                out[i, 3] = b
                out[i, 4] = c
            base += step

    @cuda.jit(device=True)
    def backward_grad(j, y, _, state, args):
        """[scale (coef p_j - m_j) + es p_j ((lse - H) - y_j)] dy_j/dx_j, with ``a = scale * coef``,
        ``sk = scale * keep``, ``se = scale * eps_r``."""
        local, a, sk, se, lse_i, es, ey, q_row, weight, prob, has_weight, has_entropy, softcap, inv_cap = args
        y, th = cap(y, softcap, inv_cap)
        p = math.exp(y - lse_i)
        g = a * p
        if has_entropy and p > ZERO:  # 0, not 0 * inf, where p = 0
            g += es * p * (ey - y)
        w = weight[j] if has_weight else ONE
        if prob:
            g -= w * (sk * q_row[j] + se)
        else:
            g -= se * w
            if j == local:
                g -= sk * w
        if softcap > ZERO:
            g *= ONE - th * th
        return state, g

    backward_pass = _walk(backward_grad, io, io)

    @cuda.jit
    def backward_kernel(
        logits, logits_words, logits_off, logits_stride, target, probs, weight, lse, coef, entropy, grad_scale,
        entropy_scale, grad, grad_words, grad_off, grad_stride, ignore_index, smoothing, eps_r, class_offset, softcap,
        prob, has_weight, has_entropy, threads_per_row,
    ):  # fmt: skip
        n_rows, n_classes = logits.shape
        tid, lane, base, step = group(threads_per_row)
        inv_cap = ONE / softcap if softcap > ZERO else ZERO
        keep = ONE - smoothing
        per_row = grad_scale.shape[0] > 1
        ent_per_row = entropy_scale.shape[0] > 1
        i = base + tid // threads_per_row
        while i < n_rows:  # no syncthreads here: rows loop independently
            t = int64(-1) if prob else int64(target[i])
            kept = prob or t != ignore_index
            # an ignored row: not read, its gradient 0 from the same pass with every factor 0
            local = int32(t - class_offset) if kept and 0 <= t - class_offset < n_classes else int32(-1)
            scale = a = lse_i = es = ey = ZERO
            if kept:
                scale = grad_scale[i] if per_row else grad_scale[0]
                a = scale * coef[i]
                lse_i = lse[i]
                if has_entropy:
                    es = entropy_scale[i] if ent_per_row else entropy_scale[0]
                    ey = lse_i - entropy[i]
            x = view(logits, logits_words, logits_off, logits_stride, i)
            # the gradient: no words where it is not laid out as the logits
            backward_pass(
                x, x, view(grad, grad_words, grad_off, grad_stride, i), lane, threads_per_row, kept, True, (),
                (local, a, scale * keep, scale * eps_r, lse_i, es, ey, probs[i if prob else 0], weight, prob,
                 has_weight, has_entropy, softcap, inv_cap),
            )  # fmt: skip
            i += step

    return partials_kernel, backward_kernel


@_moved
def row_partials(logits, target, weight, *, ignore_index, softcap, class_offset, smoothing, out):
    """Per-row partials of a slice of the classes into ``out`` (N, 5); see ``gpuxent.backends``."""
    dt = compute_dtype(logits.dtype)
    np_dt = _np_dtype(dt)
    dev = logits.device
    n_rows, n_classes = logits.shape
    if n_rows == 0:
        return
    x = _rows_of(logits)
    prob, t, q, w, _ = _targets(target, weight, dt, dev)
    args = _Launch(dev)
    direct = out.device == dev and out.dtype == dt and out.is_contiguous()
    o = out if direct else torch.empty(out.shape, dtype=dt, device=dev)
    args.row_kernel(
        _vocab_parallel_kernels(np_dt, KINDS[x.dtype])[0], n_rows, n_classes, *args.rows(_Rows(x)), args(t),
        args(q), args(w), args(o), int(ignore_index), int(class_offset), np_dt.type(softcap or 0.0), bool(prob),
        weight is not None, bool(smoothing),
    )  # fmt: skip
    if o is not out:
        out.copy_(o)


@_moved
def cross_entropy_backward(
    logits, target, weight, lse, coef, entropy, *, ignore_index, label_smoothing, n_classes, class_offset, softcap,
    grad_scale, entropy_scale, grad,
):  # fmt: skip
    """The gradient of a slice of the classes from the global lse and coefficient; see ``gpuxent.backends``."""
    dt = compute_dtype(logits.dtype)
    np_dt = _np_dtype(dt)
    f = np_dt.type
    dev = logits.device
    n_rows, n_local = logits.shape
    if grad.shape != logits.shape:
        raise ValueError(f"grad: expected shape {tuple(logits.shape)}, got {tuple(grad.shape)}")
    if n_rows == 0 or n_local == 0:
        return
    x = _rows_of(logits)  # read in its own dtype; an in-place gradient overwrites it word by word
    prob, t, q, w, dummy = _targets(target, weight, dt, dev)
    ent = dummy if entropy is None else _compute(entropy, dt)
    es = _row_scale(entropy_scale, n_rows, dt, dev)
    args = _Launch(dev)
    with _row_grad(grad, x) as g:
        xr, gr = _rows_alike(x, g)
        args.row_kernel(
            _vocab_parallel_kernels(np_dt, KINDS[x.dtype])[1], n_rows, n_local, *args.rows(xr), args(t), args(q),
            args(w), args(_compute(lse, dt)), args(_compute(coef, dt)), args(ent),
            args(_row_scale(grad_scale, n_rows, dt, dev)), args(es), *args.rows(gr), int(ignore_index),
            f(label_smoothing), f(label_smoothing / n_classes), int(class_offset), f(softcap or 0.0), bool(prob),
            weight is not None, entropy is not None,
        )  # fmt: skip


# --------------------------------------------------------------------------- distillation
# Per row, S = student / tau, T = teacher / tau (formulas: ``backends/numba_cpu/distill.py``).
# Pass 1: each thread keeps online (max, sum of exp) of S and T over its elements and, for kl /
# reverse_kl, the cross term sum exp(lead - max) (lead - other), merged like the sum
# (``rowmath.merge_cross``), then across the row's threads in shared memory. jsd: pass 2 reads both rows
# again for log m and sums the loss and K = KL(p_s || m). Last pass: reads them again, writes the gradient.
# Both rows are walked in the student's words and the gradient pass in the gradient's, each word of one
# holding the same columns as the others': the host gives words to all three only where they are laid out
# alike, else all three are read and written element by element.
# Byte model: per pass (student, e, r) and (teacher, e, r); forward 1 pass (jsd 2), forward+backward 2
# (jsd 3), plus (gradient, e, w); per row the target read and the loss written.

DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}


@functools.cache
def _distillation_kernel(dtype: np.dtype, kind: str | None = None):
    """The distillation kernel computing in ``dtype`` on logits of ``kind`` (as ``_kernels``)."""
    f = dtype.type
    ZERO, NEG_INF, NAN = f(0), f(-math.inf), f(math.nan)
    KL, REVERSE_KL = 0, 1
    acc_t = numba.from_dtype(dtype)
    io = _codec(_kind(dtype, kind))
    view = io.view
    row = rowmath.make(f)
    merge = cuda.jit(device=True)(row.merge)
    merge_cross = cuda.jit(device=True)(row.merge_cross)
    kl_from_sums = cuda.jit(device=True)(row.kl_from_sums)
    group = _row_group()

    @cuda.jit(device=True)
    def put(sm, i, v):
        sm[i, 0], sm[i, 1], sm[i, 2], sm[i, 3], sm[i, 4] = v

    @cuda.jit(device=True)
    def take(sm, i, v):
        return sm[i, 0], sm[i, 1], sm[i, 2], sm[i, 3], sm[i, 4]

    @cuda.jit(device=True)
    def combine(sm, i, v, o):
        m1, s1, c1, m2, s2 = v
        m1, s1, c1 = merge_cross(m1, s1, c1, sm[o, 0], sm[o, 1], sm[o, 2])
        m2, s2 = merge(m2, s2, sm[o, 3], sm[o, 4])
        return m1, s1, c1, m2, s2

    # ``merge_cross`` (m1, s1, c1) and ``merge`` (m2, s2) over each row group's threads
    row_reduce = _tree_reduce(put, take, combine)

    @cuda.jit(device=True)
    def log_mixture(log_ps, log_pt, log_beta, log_1mbeta):
        """log(beta p_t + (1 - beta) p_s) from the log-probabilities."""
        u = log_beta + log_pt
        v = log_1mbeta + log_ps
        hi = u if u > v else v
        lo = v if u > v else u
        if hi == NEG_INF:
            return NEG_INF
        return hi + math.log1p(math.exp(lo - hi))

    @cuda.jit(device=True)
    def log_of(s):
        return math.log(s) if s > ZERO else (NEG_INF if s == ZERO else NAN)  # the simulator raises on log(0)

    @cuda.jit(device=True)
    def visit_sums(j, s, t, sums, args):
        """Pass 1 on one element (S = s / tau, T = t / tau): (m1, s1, c1) of the lead row, (m2, s2) of the other."""
        m1, s1, c1, m2, s2 = sums
        inv_tau, lead_is_teacher, divergence = args
        s *= inv_tau
        t *= inv_tau
        lead = t if lead_is_teacher else s
        other = s if lead_is_teacher else t
        if lead != NEG_INF:  # exp(lead - lead): 1, or NaN for +inf (a NaN row, as torch)
            cross = lead - other if divergence != 2 else ZERO
            m1, s1, c1 = merge_cross(m1, s1, c1, lead, math.exp(lead - lead), cross)
        if other != NEG_INF:
            m2, s2 = merge(m2, s2, other, math.exp(other - other))
        return (m1, s1, c1, m2, s2), ZERO

    @cuda.jit(device=True)
    def visit_jsd(j, s, t, kl, args):
        """jsd pass 2 on one element: sum p_t (log p_t - log m) and K = sum p_s (log p_s - log m)."""
        inv_tau, m_s, log_ss, m_t, log_st, log_beta, log_1mbeta = args
        log_ps = (s * inv_tau - m_s) - log_ss
        log_pt = (t * inv_tau - m_t) - log_st
        log_m = log_mixture(log_ps, log_pt, log_beta, log_1mbeta)
        p_s = math.exp(log_ps)
        p_t = math.exp(log_pt)
        kl_t, kl_s = kl
        if p_t > ZERO:
            kl_t += p_t * (log_pt - log_m)
        if p_s > ZERO:
            kl_s += p_s * (log_ps - log_m)
        return (kl_t, kl_s), ZERO

    @cuda.jit(device=True)
    def grad_at(j, s, t, state, args):
        """The gradient scale * tau * d div / d S on one element (``coef`` = scale * tau (* (1 - beta)))."""
        inv_tau, kept, finite, divergence, m_s, log_ss, m_t, log_st, mu, coef, log_beta, log_1mbeta = args
        s *= inv_tau
        t *= inv_tau
        g = ZERO
        if kept and not finite:
            g = NAN
        elif kept:
            log_ps = (s - m_s) - log_ss
            p_s = math.exp(log_ps)
            if divergence == KL:
                g = p_s - math.exp((t - m_t) - log_st)
            elif p_s > ZERO:
                if divergence == REVERSE_KL:
                    r = s - t
                else:
                    r = log_ps - log_mixture(log_ps, (t - m_t) - log_st, log_beta, log_1mbeta)
                g = p_s * (r - mu)
            g *= coef
        return state, g

    # both rows walked in the student's words: the host gives words to both (and the gradient) only where
    # they are laid out alike
    sums_pass = _walk(visit_sums, io, two=True)
    jsd_pass = _walk(visit_jsd, io, two=True)
    grad_pass = _walk(grad_at, io, io, two=True)

    @cuda.jit
    def kernel(
        student, student_words, student_off, student_stride, teacher, teacher_words, teacher_off, teacher_stride,
        target, grad_scale, grad, grad_words, grad_off, grad_stride, loss,
        has_target, ignore_index, divergence, inv_tau, tau, beta, log_beta, log_1mbeta, want_grad, threads_per_row,
    ):  # fmt: skip
        sm = cuda.shared.array((MAX_THREADS, 5), acc_t)
        n_rows = student.shape[0]
        tid, lane, base, step = group(threads_per_row)
        per_row_scale = grad_scale.shape[0] > 1
        lead_is_teacher = divergence == KL
        while base < n_rows:
            row = base + tid // threads_per_row
            live = row < n_rows
            kept = live
            if live and has_target:
                kept = target[row] != ignore_index
            s_row = view(student, student_words, student_off, student_stride, row if live else 0)
            t_row = view(teacher, teacher_words, teacher_off, teacher_stride, row if live else 0)
            # pass 1: (m1, s1, c1) of the lead row (the teacher for kl), (m2, s2) of the other
            sums = (NEG_INF, ZERO, ZERO, NEG_INF, ZERO)
            if kept:
                sums = sums_pass(
                    s_row, t_row, s_row, lane, threads_per_row, True, True, sums, (inv_tau, lead_is_teacher, divergence)
                )
            m1, s1, c1, m2, s2 = row_reduce(sm, tid, lane, threads_per_row, sums)
            m_s, sum_s, m_t, sum_t = (m2, s2, m1, s1) if lead_is_teacher else (m1, s1, m2, s2)
            log_ss = log_of(sum_s)
            log_st = log_of(sum_t)
            finite = kept and NEG_INF < m_s + log_ss < -NEG_INF and NEG_INF < m_t + log_st < -NEG_INF
            div = NAN
            mu = NAN
            if finite:
                if divergence == KL:
                    mu = c1 / sum_t  # sum p_t (T - S)
                    div = kl_from_sums(mu, m_t, m_s, log_st, log_ss)
                elif divergence == REVERSE_KL:
                    mu = c1 / sum_s  # sum p_s (S - T)
                    div = kl_from_sums(mu, m_s, m_t, log_ss, log_st)
            if divergence == 2:  # pass 2: sum p_t (log p_t - log m) and K = sum p_s (log p_s - log m)
                kl = (ZERO, ZERO)
                if finite:
                    kl = jsd_pass(
                        s_row, t_row, s_row, lane, threads_per_row, True, True, kl,
                        (inv_tau, m_s, log_ss, m_t, log_st, log_beta, log_1mbeta),
                    )  # fmt: skip
                _, kl_t, kl_s, _, _ = row_reduce(sm, tid, lane, threads_per_row, (NEG_INF, kl[0], kl[1], NEG_INF, ZERO))
                if finite:
                    div = beta * kl_t + (f(1) - beta) * kl_s
                    mu = kl_s
            if not live:
                base += step
                continue
            if lane == 0:
                loss[row] = tau * tau * div if kept else ZERO
            if want_grad:  # last pass: grad = scale * tau * d div / d S, in the gradient's words
                coef = (grad_scale[row] if per_row_scale else grad_scale[0]) * tau
                if divergence == 2:
                    coef *= f(1) - beta
                grad_pass(
                    s_row, t_row, view(grad, grad_words, grad_off, grad_stride, row), lane, threads_per_row, kept,
                    True, (), (inv_tau, kept, finite, divergence, m_s, log_ss, m_t, log_st, mu, coef, log_beta,
                    log_1mbeta),
                )  # fmt: skip
            base += step

    return kernel


@_moved
def distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, grad_scale, grad):
    """Per-row tau**2 * divergence of (N, r) student and teacher logits; see ``gpuxent.backends``."""
    dt = compute_dtype(student.dtype)
    np_dt = _np_dtype(dt)
    f = np_dt.type
    dev = student.device
    n_rows, n_classes = student.shape
    loss = torch.empty(n_rows, dtype=dt, device=dev)
    if n_rows == 0:
        return loss
    tg = torch.zeros(1, dtype=torch.int64, device=dev) if target is None else target.detach().to(torch.int64)
    scale = _row_scale(grad_scale, n_rows, dt, dev)
    jsd = divergence == "jsd"
    s = _rows_of(student)  # both read in the student's dtype
    t = _rows_of(teacher if teacher.dtype == s.dtype else teacher.to(s.dtype))
    args = _Launch(dev)
    with _row_grad(grad, s) as g:
        rows = _rows_alike(s, t, g) if grad is not None else _rows_alike(s, t) + [_Rows(g)]
        if any(r.off < 0 for r in rows):  # the three rows walked in the same words, or all one by one
            rows = [r.without_words() for r in rows]
        args.row_kernel(
            _distillation_kernel(np_dt, KINDS[s.dtype]), n_rows, n_classes, *args.rows(rows[0]), *args.rows(rows[1]),
            args(tg), args(scale), *args.rows(rows[2]), args(loss), target is not None, int(ignore_index),
            DIVERGENCE_CODES[divergence], f(1 / temperature), f(temperature), f(beta),
            f(math.log(beta) if jsd else 0.0), f(math.log1p(-beta) if jsd else 0.0), grad is not None,
        )  # fmt: skip
    return loss
