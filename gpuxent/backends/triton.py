"""GPU backend: fused softmax-cross-entropy kernels written in Triton.

One program handles ``ROWS`` rows (one for large vocabularies, several for small ones) and walks
each row in chunks of ``BLOCK`` classes, twice:

1. an online softmax: the running max ``m`` and sum ``d = sum exp(y - m)``, rescaled whenever the
   max grows, plus whatever sums the loss needs (``sum_c w_c y_c`` for label smoothing,
   ``sum_c w_c q'_c`` and ``sum_c w_c q'_c y_c`` for probability targets). ``lse = m + log(d)``
   and the row loss come out of it, with the target logit gathered after this loop and before the
   next, so the gradient may overwrite the logits (in-place gradient).
2. when a gradient is asked for, a second read of the row writes
   ``grad_j = scale * (coef * p_j - target_term_j)`` (times the softcap's ``1 - tanh^2``), computed in
   the accumulation dtype before the store, with ``p_j = exp((y_j - m) - log(d))``: so ``p_t - 1``
   stays accurate in bfloat16 even when ``p_t`` is close to 1.

Byte model, forward+backward with class targets: read N*r logits, write N*r gradient, read N
targets, write N losses and N lse; the second read of a row mostly hits L2 for r up to a few 10^4.
Forward only: read N*r logits, write 2N. Probability targets add one read of the (N, r) targets per
loop.
With ``STATS`` (each row's argmax and entropy, from loop 1: a block's max and first index of it,
and the entropy's sum rescaled like ``d``) the same bytes plus 2N written.

Rows whose start the JIT cannot see 16-byte aligned (any r but a multiple of 16: GPT-2's 50257) are
peeled (``PEEL``, see "aligned rows"): a head and a tail of under 16 bytes each go through one small
masked chunk, the rest from a 16-byte-aligned offset, so every row length gets 128-bit loads and
stores in the hot loops (benchmarks/gpu_audit.py checks them at r = 50257 and 50304).

Accumulation is float32 (float64 for float64 inputs). Offsets are 64-bit (the row index is cast to
int64 before it meets a stride), so N*r above 2^31 works. Float arguments reach a compiled kernel
as float32, so every float scalar travels as a (hi, lo) pair of float32s that the kernel adds in
the accumulation dtype: float64 inputs keep 48 bits of ``label_smoothing``, ``z_loss``... .

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors through Triton's interpreter, with small
blocks so that short rows still span several chunks and end in a masked tail.
"""

from __future__ import annotations

import contextlib
import math
import os

import numpy as np
import torch
import triton
import triton.language as tl

from . import compute_dtype

NAME = "triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Chunk and tile sizes. Registers hold the compute dtype (float32 for half inputs); a step of a
# program is (values per thread, warps) of it: 8 float32 values x 16 warps (4096 per chunk), or 4
# float64 values x 8 warps (float64 exp, log and division are long sequences with many temporaries,
# and ptxas keeps a 512-thread block under 64 registers, spilling the rest). Larger steps spill in
# some keyword variant (benchmarks/gpu_audit.py compiles them all). The small-r path packs several
# rows into one step. The interpreter uses tiny blocks: tests with r of a few hundred then cover
# several chunks per row, masked tails and several rows per program.
STEP = {4: (8, 16), 8: (2, 8)}  # by the compute dtype's size
TILE_INTERPRET = 64
MAX_BLOCK_INTERPRET = 64
MAX_ROWS = 4 if INTERPRET else 64

NEG_INF = tl.constexpr(float("-inf"))
NAN = tl.constexpr(float("nan"))


def is_available() -> tuple[bool, str]:
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if INTERPRET:
        return True, f"triton {triton.__version__} interpreter on CPU (TRITON_INTERPRET=1)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"


def supports(device: torch.device) -> bool:
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


# --------------------------------------------------------------------------- host helpers


def _split(v: float) -> tuple[float, float]:
    """``v`` as two float32 values whose sum recovers ~48 bits of it (see the module docstring)."""
    hi = float(np.float32(v))
    return hi, float(np.float32(v - hi)) if math.isfinite(hi) else 0.0


def _launch_config(n_classes: int, element_size: int) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, num_warps)`` for rows of ``n_classes`` elements of ``element_size`` bytes."""
    per_thread, max_warps = STEP[max(4, element_size)]
    chunk = per_thread * 32 * max_warps
    max_block, tile = (MAX_BLOCK_INTERPRET, TILE_INTERPRET) if INTERPRET else (chunk, chunk)
    block = min(triton.next_power_of_2(n_classes), max_block)
    rows = max(1, min(MAX_ROWS, tile // block))
    num_warps = max(1, min(max_warps, rows * block // (32 * per_thread)))
    return block, rows, num_warps


def _device_ctx(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _unit_class_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _class_inputs(logits, target, weight):
    """``(logits, target, weight, prob)`` as the kernels read them: the logits (and probability targets) with
    unit class stride, the weight contiguous; ``prob``: whether the targets are probabilities."""
    prob = target.is_floating_point()
    target = _unit_class_stride(target) if prob else target
    return _unit_class_stride(logits), target, None if weight is None else weight.contiguous(), prob


def _check_grad(grad: torch.Tensor | None, like: torch.Tensor) -> None:
    """A gradient buffer (written in place) must be (N, r) as ``like`` is, with unit class stride."""
    if grad is not None and (grad.shape != like.shape or (grad.stride(1) != 1 and like.shape[1] > 1)):
        raise ValueError(f"grad: expected an (N, r) tensor with unit class stride, got {tuple(grad.shape)}")


def _stride(t: torch.Tensor | None) -> int:
    """The row stride of ``t``; no ``t``: 0 (unused)."""
    return t.stride(0) if t is not None else 0


def _shift(t: torch.Tensor | None, x: torch.Tensor) -> int:
    """The row stride of ``t`` less that of the peeled ``x`` (see "aligned rows")."""
    return _stride(t) - x.stride(0)


def _grad_scale_args(grad_scale, out: torch.Tensor) -> tuple[torch.Tensor, int, float, float, bool]:
    """The gradient's factor as a kernel takes it, ``(pointer, its stride, hi, lo, SCALE_IS_PTR)``: a tensor
    (one factor, or one per row) in ``out``'s dtype and device; or a float (None: 1) as a (hi, lo) pair."""
    if isinstance(grad_scale, torch.Tensor):
        t = grad_scale.to(device=out.device, dtype=out.dtype).reshape(-1)
        return t, int(t.numel() > 1), 1.0, 0.0, True
    return out, 0, *_split(1.0 if grad_scale is None else float(grad_scale)), False


# --------------------------------------------------------------------------- device helpers


@triton.jit
def _scalar(hi, lo, like):
    """The float ``hi + lo`` in ``like``'s dtype and shape (a per-row vector)."""
    return tl.zeros_like(like) + hi + lo


@triton.jit
def _const(value: tl.constexpr, like):
    """``value`` in ``like``'s dtype and shape: a bare float literal would be rounded to float32 first."""
    return tl.full(like.shape, value, like.dtype)


@triton.jit
def _reciprocal_1_2(d):
    """``1 / d`` for ``d`` in [1, 2]. In float64 a linear first guess (relative error 1/17) and four
    Newton steps (each squares the error): a float64 division is a long sequence whose slow-path
    call makes ptxas spill registers around it. In float32 a plain division (a fast one)."""
    if d.dtype == tl.float64:
        r = _const(24 / 17, d) - _const(8 / 17, d) * d
        for _ in tl.static_range(4):
            r = r + r * (1 - d * r)
    else:
        r = 1 / d
    return r


@triton.jit
def _tanh(u):
    """tanh without cancellation: odd Taylor series near 0, (1 - e) / (1 + e) with e = exp(-2|u|) beyond."""
    a = tl.abs(u)
    e = tl.exp(-2.0 * a)
    far = (1 - e) * _reciprocal_1_2(1 + e)
    a2 = tl.minimum(a, 0.125) * tl.minimum(a, 0.125)  # clamped: the series is only used below 0.125
    near = _const(0.021869488536155203, a2)  # 62/2835: the series up to a^9 is exact to 1e-11 for a < 0.125
    near = near * a2 + _const(-0.05396825396825397, a2)
    near = near * a2 + _const(0.13333333333333333, a2)
    near = near * a2 + _const(-0.3333333333333333, a2)
    near = a + a * a2 * near
    t = tl.where(a < 0.125, near, far)
    return tl.where(u < 0, -t, t)


# --------------------------------------------------------------------------- aligned rows
# A row of r elements starts at base + i * stride: 16-byte aligned for every row only when the stride
# is a multiple of 16 bytes, which the JIT sees (its divisibility specialisation) only for strides
# and r that are multiples of 16 elements. Any other r (GPT-2's 50257) would compile to element-wide
# loads and stores. So such rows are peeled (``PEEL`` = VEC, the elements in 16 bytes): each row is
# split into a head (up to VEC - 1 columns before its first 16-byte-aligned element), an aligned body
# of a multiple of VEC columns, and a tail (under VEC columns). The body is walked in BLOCK chunks from
# an offset the compiler is told is a multiple of VEC, with a mask that changes only at multiples of
# VEC: 128-bit accesses. The head and the tail, at most 2 VEC - 2 columns, go through one small masked
# "edge" chunk of 2 VEC lanes. Every other (N, r) operand of the same rows (gradient, probability
# targets, softmax output, teacher logits) uses the same columns; its offset is the logits' aligned
# offset plus ``rows * (its stride - the logits' stride)``, a shift the JIT specialises like a stride
# (0, the usual case, is a multiple of 16), so that operand's accesses are 128-bit too when they can be.
# A base pointer off 16 bytes (a sliced view) is not peeled: element-wide accesses, still correct.
#
# So every pass of a row kernel is the same walk, written with the helpers below: ``_row_peel`` lays the
# rows out, ``_row_ptrs`` gives each operand's row starts and body origins; with PEEL the pass's step
# function takes the edge chunk (``_edge_chunk``, columns from the row starts), then, in the loop, the
# BLOCK chunks of the body, or of the whole row without PEEL (``_chunk``, offsets from the origins). The
# edge chunk has its own shape, so it is a call of its own before the loop.
# ptxas's register allocation follows closely the order of the operations, of the kernel parameters, and
# even which inlined helper an operation comes from (its debug scope): a few registers either way can cost
# a block per SM. So the helpers keep the kernels' order of operations (the distillation's loop 1 keeps its
# S/T updates interleaved), and benchmarks/gpu_audit.py, with triton 3.6 and 3.9, shows what a change does.

ALIGN_BYTES = 16  # a 128-bit access


def _peel(x: torch.Tensor, n_classes: int) -> int:
    """``PEEL`` for rows of ``x``: VEC (elements in 16 bytes) where a row does not start on a 16-byte
    boundary that the JIT can see, but a head of under VEC columns would bring it to one; else 0."""
    vec = ALIGN_BYTES // x.element_size()
    if vec < 2 or x.data_ptr() % ALIGN_BYTES:
        return 0
    aligned = n_classes % 16 == 0 and (x.shape[0] <= 1 or x.stride(0) % 16 == 0)  # the JIT's "divisible by 16"
    return 0 if aligned else vec


def _launch_rows(kernel, x: torch.Tensor, *args, jsd: bool = False, **constexprs) -> None:
    """Launches a row kernel with ``args`` and ``constexprs`` on the rows of the (N, r) ``x``, the operand
    whose rows it peels: ROWS, BLOCK and num_warps from ``_launch_config`` (or ``_jsd_config`` for jsd),
    PEEL from ``_peel``, one program per ROWS rows."""
    n_rows, n_classes = x.shape
    block, rows, num_warps = _launch_config(max(n_classes, 1), x.element_size())
    if jsd:
        block, rows, num_warps = _jsd_config(block, rows, num_warps, x.element_size())
    with _device_ctx(x):
        kernel[(triton.cdiv(n_rows, rows),)](
            *args, ROWS=rows, BLOCK=block, PEEL=_peel(x, n_classes), num_warps=num_warps, **constexprs
        )


@triton.jit
def _program_rows(n_rows, acc_ptr, ROWS: tl.constexpr):
    """This program's rows (int32, as ``n_rows`` is; int64 where they meet a stride), which of them exist,
    and a (ROWS,) zero in the accumulation dtype, ``acc_ptr``'s (float32, or float64 for float64 inputs)."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return rows, rows < n_rows, tl.zeros([ROWS], dtype=acc_ptr.dtype.element_ty)


@triton.jit
def _row_peel(rows, stride, n_classes, VEC: tl.constexpr):
    """The rows' layout, for rows ``rows * stride`` elements past a 16-byte-aligned base: ``head``, the
    columns before the first aligned one; ``body``, the largest multiple of VEC columns from there that fits
    in the row; and the offset of that first aligned column, the chunks' origin (a multiple of VEC, and the
    compiler is told). VEC 0 (no peel): the origin is the row's start, ``head`` and ``body`` unused."""
    row_off = rows.to(tl.int64) * stride
    if VEC:
        head = ((-row_off) & (VEC - 1)).to(tl.int32)
        origin = tl.multiple_of(row_off + head, VEC)
        body = tl.multiple_of(tl.maximum(n_classes - head, 0) // VEC * VEC, VEC)
    else:
        head = tl.zeros_like(rows)
        origin = row_off
        body = head
    return head, body, origin


@triton.jit
def _row_ptrs(ptr, rows, stride, origin, PEEL: tl.constexpr):
    """An (N, r) operand's rows as (ROWS, 1) pointers: to each row's start, where the edge chunk's columns
    count from, and to its chunks' origin: with PEEL ``origin`` (the logits' origin, shifted by rows * the
    operand's stride less theirs), else the row's start."""
    row_ptrs = (ptr + rows.to(tl.int64) * stride)[:, None]
    if PEEL:
        body_ptrs = ptr + origin[:, None]
    else:
        body_ptrs = row_ptrs
    return row_ptrs, body_ptrs


@triton.jit
def _chunk(start, head, body, n_classes, BLOCK: tl.constexpr, PEEL: tl.constexpr):
    """The BLOCK columns from ``start`` of each row's aligned body (PEEL) or of the row: (columns, their mask,
    their offsets from the body origins of ``_row_ptrs``). Unpeeled, columns and mask are one (1, BLOCK) row."""
    offs = start + tl.arange(0, BLOCK)
    if PEEL:
        cols = head[:, None] + offs[None, :]
        ok = offs[None, :] < body[:, None]
    else:
        cols = offs[None, :]
        ok = (offs < n_classes)[None, :]
    return cols, ok, offs[None, :]


@triton.jit
def _edge_chunk(head, body, n_classes, VEC: tl.constexpr):
    """The columns outside each row's aligned body, as one (ROWS, 2 VEC) chunk: (columns, their mask); lanes
    below VEC are the head [0, head), the others the tail [head + body, r)."""
    e = tl.arange(0, 2 * VEC)[None, :]
    cols = tl.where(e < VEC, e, (head + body)[:, None] + (e - VEC))
    ok = (cols < n_classes) & ((e >= VEC) | (e < head[:, None]))
    return cols, ok


# --------------------------------------------------------------------------- rows: targets and softmax sums


@triton.jit
def _class_target(target_ptr, stride, rows, row_mask, ignore_index):
    """Each row's class target, and whether the row counts: it exists and its target is not ``ignore_index``."""
    target = tl.load(target_ptr + rows.to(tl.int64) * stride, mask=row_mask, other=ignore_index)
    return target, row_mask & (target != ignore_index)


@triton.jit
def _target_column(target, class_offset, n_classes):
    """The target's column among the ``n_classes`` from ``class_offset`` where it is one of them, else 0 (an
    index that reads nothing out of bounds); and whether it is."""
    col = target - class_offset
    inside = (col >= 0) & (col < n_classes)
    return tl.where(inside, col, 0), inside


@triton.jit
def _target_logit(x_ptr, stride, rows, col, hit, softcap, inv_cap, HAS_SOFTCAP: tl.constexpr):
    """The (soft-capped) logit at each row's column ``col`` where ``hit``, else 0; in ``softcap``'s dtype."""
    y_t = tl.load(x_ptr + rows.to(tl.int64) * stride + col, mask=hit, other=0).to(softcap.dtype)
    if HAS_SOFTCAP:
        y_t = softcap * _tanh(y_t * inv_cap)
    return y_t


@triton.jit
def _target_weight(weight_ptr, col, hit, zero, HAS_WEIGHT: tl.constexpr):
    """The class weight of each row's column ``col`` where ``hit``, else 0; 1 without weights. ``zero``'s dtype."""
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + col, mask=hit, other=0).to(zero.dtype)
    else:
        w_t = zero + 1
    return w_t


@triton.jit
def _grad_scale(scale_ptr, stride_scale, scale_hi, scale_lo, rows, row_mask, zero, SCALE_IS_PTR: tl.constexpr):
    """Each row's gradient factor: read (one factor at stride 0, or one per row) or the float ``hi + lo``."""
    if SCALE_IS_PTR:
        scale = tl.load(scale_ptr + rows * stride_scale, mask=row_mask, other=0).to(zero.dtype)
    else:
        scale = _scalar(scale_hi, scale_lo, zero)
    return scale


@triton.jit
def _store_grad(g_ptrs, g, col_ok, kept, row_mask):
    """Stores a chunk of the gradient in the rows that exist: 0 in ignored rows."""
    g = tl.where(kept[:, None], g, 0)
    tl.store(g_ptrs, g.to(g_ptrs.dtype.element_ty), mask=row_mask[:, None] & col_ok)


@triton.jit
def _load_logits(x_ptrs, mask, softcap, inv_cap, HAS_SOFTCAP: tl.constexpr):
    """A chunk of logits in ``softcap``'s dtype (the accumulation dtype), soft-capped; -inf where masked."""
    if HAS_SOFTCAP:
        y = tl.load(x_ptrs, mask=mask, other=0).to(softcap.dtype)
        y = tl.where(mask, softcap[:, None] * _tanh(y * inv_cap[:, None]), NEG_INF)
    else:
        y = tl.load(x_ptrs, mask=mask, other=NEG_INF).to(softcap.dtype)
    return y


@triton.jit
def _online_max(y, m):
    """A chunk ``y`` (-inf where masked) into each row's running max ``m``: the new max, and the shift of the
    exponents: the max, but 0 for a row of -inf so far, which must not give -inf - -inf. The sums kept so far
    are rescaled by ``exp(m - shift)``: the sum of exp becomes ``d * exp(m - shift) + sum(exp(y - shift))``.
    (The distillation's loop 1 writes the same update for S and T interleaved: see "aligned rows".)"""
    m_new = tl.maximum(m, tl.max(y, axis=1))
    return m_new, tl.where(m_new == NEG_INF, 0, m_new)


# --------------------------------------------------------------------------- fused cross-entropy


@triton.jit
def _ce_loop1_step(
    x_ptrs, q_ptrs, w_ptrs, cols, col_ok, kept, softcap, inv_cap, smoothing, eps_r,
    m, d, sum_w, sum_wy, sum_wq, best, best_j, nan_j, t_sum,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    STATS: tl.constexpr,
):  # fmt: skip
    """One chunk of loop 1 (columns ``cols``, valid where ``col_ok``): the running max and sum of exp, the
    smoothing / probability-target sums and the statistics, updated. The order of chunks is free."""
    acc_dtype = m.dtype
    mask = kept[:, None] & col_ok
    y = _load_logits(x_ptrs, mask, softcap, inv_cap, HAS_SOFTCAP)
    if HAS_WEIGHT:  # (1, BLOCK) unpeeled: the logits' rank, so one row per program loads it in their layout
        w = tl.load(w_ptrs, mask=col_ok, other=0).to(acc_dtype)
    if PROB_TARGET or HAS_SMOOTHING:
        y_in = tl.where(mask, y, 0)  # masked lanes stay out of every sum
    if PROB_TARGET:
        q = tl.load(q_ptrs, mask=mask, other=0).to(acc_dtype)
        wq = tl.where(mask, (1 - smoothing[:, None]) * q + eps_r[:, None], 0)
        if HAS_WEIGHT:
            wq = wq * w
        sum_wq += tl.sum(wq, axis=1)
        sum_wy += tl.sum(wq * y_in, axis=1)
    elif HAS_SMOOTHING:
        if HAS_WEIGHT:
            sum_wy += tl.sum(y_in * w, axis=1)
            sum_w += tl.sum(w, axis=1)
        else:
            sum_wy += tl.sum(y_in, axis=1)
    m_new, shift = _online_max(y, m)
    if STATS:
        y_max = tl.max(y, axis=1)
        j_max = tl.min(tl.where(y == y_max[:, None], cols, 2147483647), axis=1)
        # the first index of the max whatever the order of the chunks (the edge chunk holds the tail)
        best_j = tl.where(y_max > best, j_max, tl.where(y_max == best, tl.minimum(best_j, j_max), best_j))
        best = tl.maximum(best, y_max)
        nan_j = tl.minimum(nan_j, tl.min(tl.where(y != y, cols, 2147483647), axis=1))
        e = tl.exp(y - shift[:, None])
        alpha = tl.exp(m - shift)
        # where() before the products: no -inf * 0 (a row of -inf so far, masked or -inf lanes)
        t_sum = (t_sum + tl.where(m == NEG_INF, 0, m - shift) * d) * alpha
        t_sum += tl.sum(e * tl.where(e > 0, y - shift[:, None], 0), axis=1)
        d = d * alpha + tl.sum(e, axis=1)
    else:
        d = d * tl.exp(m - shift) + tl.sum(tl.exp(y - shift[:, None]), axis=1)
    return m_new, d, sum_w, sum_wy, sum_wq, best, best_j, nan_j, t_sum


@triton.jit
def _grad_step(
    x_ptrs, q_ptrs, w_ptrs, g_ptrs, cols, col_ok, kept, row_mask, softcap, inv_cap, smoothing, eps_r,
    scale, coef, m, log_d, target_col, w_t, es, ey,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):  # fmt: skip
    """One chunk of a gradient pass (the fused kernel's loop 2, and ``cross_entropy_backward``): reads the
    logits of columns ``cols`` and writes their gradient, with ``p_j = exp((y_j - m) - log_d)``
    (``cross_entropy_backward``: m = lse, log_d = 0):
        grad_j = coef p_j - scale w_j q'_j                                              (probability targets)
        grad_j = coef p_j - scale eps_r w_j - scale (1 - smoothing) w_t [j == target_col]    (class targets)
    plus ``es p_j (ey - y_j)`` (HAS_ENTROPY), times 1 - tanh^2 under a softcap; 0 in ignored rows."""
    acc_dtype = m.dtype
    mask = kept[:, None] & col_ok
    x = tl.load(x_ptrs, mask=mask, other=0).to(acc_dtype)
    if HAS_SOFTCAP:
        th = _tanh(x * inv_cap[:, None])
        y = softcap[:, None] * th
    else:
        y = x
    p = tl.exp((y - m[:, None]) - log_d[:, None])
    g = coef[:, None] * p
    if HAS_ENTROPY:  # 0, not 0 * inf, where p = 0
        g += tl.where(p > 0, es[:, None] * p * (ey[:, None] - y), 0)
    if HAS_WEIGHT:
        w = tl.load(w_ptrs, mask=col_ok, other=0).to(acc_dtype)
    if PROB_TARGET:
        q = tl.load(q_ptrs, mask=mask, other=0).to(acc_dtype)
        q = (1 - smoothing[:, None]) * q + eps_r[:, None]
        if HAS_WEIGHT:
            q = q * w
        g -= scale[:, None] * q
    else:
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                g -= (scale * eps_r)[:, None] * w
            else:
                g -= (scale * eps_r)[:, None]
        g = tl.where(cols == target_col[:, None], g - (scale * (1 - smoothing) * w_t)[:, None], g)
    if HAS_SOFTCAP:
        g = g * (1 - th * th)
    _store_grad(g_ptrs, g, col_ok, kept, row_mask)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr, target_ptr, weight_ptr, grad_scale_ptr, grad_ptr, loss_ptr, lse_ptr, argmax_ptr, entropy_ptr,
    stride_logits, stride_target, stride_grad, stride_scale, shift_target, shift_grad,
    n_rows, n_classes, ignore_index,
    smoothing_hi, smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo, scale_hi, scale_lo,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, WANT_GRAD: tl.constexpr, SCALE_IS_PTR: tl.constexpr, STATS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
):  # fmt: skip
    rows, row_mask, zero = _program_rows(n_rows, loss_ptr, ROWS)
    acc_dtype = zero.dtype
    smoothing = _scalar(smoothing_hi, smoothing_lo, zero)
    softcap = _scalar(softcap_hi, softcap_lo, zero)
    inv_cap = 1 / softcap  # one division per row, a multiplication per element
    eps_r = smoothing / n_classes
    head, body, x0 = _row_peel(rows, stride_logits, n_classes, PEEL)  # the logits' origin, then the others'
    t0 = x0 + rows.to(tl.int64) * shift_target
    g0 = x0 + rows.to(tl.int64) * shift_grad
    if PROB_TARGET:
        kept = row_mask
    else:
        target, kept = _class_target(target_ptr, stride_target, rows, row_mask, ignore_index)
        # functional.py checks the indices on the host; a bad one that slips through (compile mode)
        # reads nothing out of bounds and gives NaN.
        target_safe, valid = _target_column(target, 0, n_classes)
    x_rows, x_body = _row_ptrs(logits_ptr, rows, stride_logits, x0, PEEL)
    t_rows, t_body = _row_ptrs(target_ptr, rows, stride_target, t0, PEEL)

    # loop 1: online max and sum of exp, and the sums of the smoothing / probability-target terms
    m = tl.full([ROWS], NEG_INF, dtype=acc_dtype)
    d = zero
    sum_w = zero  # sum_c w_c (label smoothing)
    sum_wy = zero  # sum_c w_c y_c (label smoothing) or sum_c w_c q'_c y_c (probability targets)
    sum_wq = zero  # sum_c w_c q'_c, q' = (1 - smoothing) q + smoothing / r (probability targets)
    # STATS: the running argmax (first index of the max; first NaN, torch.argmax's max, apart) and the
    # entropy's sum t = sum exp(y - m) (y - m), rescaled with d
    best = tl.full([ROWS], NEG_INF, dtype=acc_dtype)
    best_j = tl.zeros([ROWS], dtype=tl.int32)
    nan_j = tl.full([ROWS], 2147483647, dtype=tl.int32)
    t_sum = zero
    if PEEL:  # named apart: loop variables keep one shape
        e_cols, e_ok = _edge_chunk(head, body, n_classes, PEEL)
        m, d, sum_w, sum_wy, sum_wq, best, best_j, nan_j, t_sum = _ce_loop1_step(
            x_rows + e_cols, t_rows + e_cols, weight_ptr + e_cols, e_cols, e_ok, kept, softcap, inv_cap,
            smoothing, eps_r, m, d, sum_w, sum_wy, sum_wq, best, best_j, nan_j, t_sum,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, STATS,
        )  # fmt: skip
    for start in range(0, n_classes, BLOCK):
        cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
        m, d, sum_w, sum_wy, sum_wq, best, best_j, nan_j, t_sum = _ce_loop1_step(
            x_body + offs, t_body + offs, weight_ptr + cols, cols, ok, kept, softcap, inv_cap,
            smoothing, eps_r, m, d, sum_w, sum_wy, sum_wq, best, best_j, nan_j, t_sum,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, STATS,
        )  # fmt: skip
    # lse = m + log_d; the two parts stay apart where a sum of them would round away p_t - 1 when p_t ~ 1
    m = tl.where(kept, m, 0)
    log_d = tl.log(tl.where(kept, d, 1))  # 0 for ignored rows, not log(0)
    lse = m + log_d

    # loss and the coefficient of p_j in the gradient
    if PROB_TARGET:
        loss = sum_wq * lse - sum_wy
        coef = sum_wq
        target_col = tl.zeros([ROWS], dtype=tl.int32)  # unused
        w_t = zero  # unused
    else:
        # the target's logit and weight: read after loop 1, so that they are not live across it, and
        # before loop 2 overwrites the row (in-place gradient)
        y_t = _target_logit(logits_ptr, stride_logits, rows, target_safe, kept, softcap, inv_cap, HAS_SOFTCAP)
        y_t = tl.where(valid, y_t, NAN)
        w_t = tl.where(valid, _target_weight(weight_ptr, target_safe, kept, zero, HAS_WEIGHT), NAN)
        target_col = target_safe.to(tl.int32)
        loss = (1 - smoothing) * w_t * ((m - y_t) + log_d)
        coef = (1 - smoothing) * w_t
        if HAS_SMOOTHING:
            if not HAS_WEIGHT:
                sum_w = zero + n_classes
            # one use of the loop's sum_w: triton 3.6's thread-locality pass asserts on more
            eps_sum_w = eps_r * sum_w
            loss += eps_sum_w * lse - eps_r * sum_wy
            coef += eps_sum_w
    if HAS_Z_LOSS:
        z_loss = _scalar(z_loss_hi, z_loss_lo, zero)
        loss += z_loss * lse * lse
        coef += 2 * z_loss * lse
    tl.store(loss_ptr + rows, tl.where(kept, loss, 0), mask=row_mask)
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    if STATS:  # H = log d - t / d; ignored rows: 0 (unread)
        tl.store(argmax_ptr + rows, tl.where(nan_j < n_classes, nan_j, best_j).to(tl.int64), mask=row_mask)
        tl.store(entropy_ptr + rows, tl.where(kept, log_d - t_sum / tl.where(kept, d, 1), 0), mask=row_mask)

    # loop 2: grad_j = scale * (coef p_j - w_j q'_j)               (probability targets)
    #         grad_j = scale * (coef p_j - eps_r w_j - (1 - eps) w_t [j == t])   (class targets)
    # times 1 - tanh^2 under a softcap; ignored rows get 0; a bad row is NaN (coef) whatever it hits.
    if WANT_GRAD:
        scale = _grad_scale(grad_scale_ptr, stride_scale, scale_hi, scale_lo, rows, row_mask, zero, SCALE_IS_PTR)
        coef = scale * coef
        g_rows, g_body = _row_ptrs(grad_ptr, rows, stride_grad, g0, PEEL)
        if PEEL:
            _grad_step(
                x_rows + e_cols, t_rows + e_cols, weight_ptr + e_cols, g_rows + e_cols, e_cols, e_ok,
                kept, row_mask, softcap, inv_cap, smoothing, eps_r, scale, coef, m, log_d, target_col, w_t,
                zero, zero, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, False,
            )  # fmt: skip
        for start in range(0, n_classes, BLOCK):
            cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
            _grad_step(
                x_body + offs, t_body + offs, weight_ptr + cols, g_body + offs, cols, ok,
                kept, row_mask, softcap, inv_cap, smoothing, eps_r, scale, coef, m, log_d, target_col, w_t,
                zero, zero, PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, False,
            )  # fmt: skip


def cross_entropy(
    logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad, stats=None
):  # fmt: skip
    """Per-row loss and lse of a (N, r) float tensor (and with ``stats`` the row's argmax and entropy);
    see ``gpuxent.backends`` for the contract."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected a (N, r) tensor, got shape {tuple(logits.shape)}")
    n_rows = logits.shape[0]
    logits, target, weight, prob = _class_inputs(logits, target, weight)
    dt = compute_dtype(logits.dtype)
    loss = torch.empty(n_rows, dtype=dt, device=logits.device)
    lse = torch.empty(n_rows, dtype=dt, device=logits.device)
    _check_grad(grad, logits)
    if n_rows == 0:
        return loss, lse
    scale, stride_scale, scale_hi, scale_lo, scale_is_ptr = _grad_scale_args(grad_scale, loss)
    _launch_rows(
        _cross_entropy_kernel, logits,
        logits, target, weight if weight is not None else loss, scale, grad if grad is not None else loss, loss, lse,
        *(stats if stats is not None else (loss, loss)),
        logits.stride(0), target.stride(0), _stride(grad), stride_scale, _shift(target, logits), _shift(grad, logits),
        n_rows, logits.shape[1], int(ignore_index),
        *_split(label_smoothing), *_split(z_loss), *_split(softcap or 1.0), scale_hi, scale_lo,
        PROB_TARGET=prob, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0, HAS_Z_LOSS=z_loss > 0,
        HAS_SOFTCAP=bool(softcap), WANT_GRAD=grad is not None, SCALE_IS_PTR=scale_is_ptr, STATS=stats is not None,
    )  # fmt: skip
    return loss, lse


# --------------------------------------------------------------------------- softmax


@triton.jit
def _softmax_max_sum(x_ptrs, col_ok, row_mask, m, d):
    """One chunk of the softmax's first loop: the running max and sum of exp, updated."""
    x = tl.load(x_ptrs, mask=row_mask[:, None] & col_ok, other=NEG_INF).to(m.dtype)
    m_new, shift = _online_max(x, m)
    return m_new, d * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)


@triton.jit
def _softmax_out(x_ptrs, o_ptrs, col_ok, row_mask, m, log_d, LOG: tl.constexpr):
    """One chunk of the softmax's second loop: reads x, writes the (log-)softmax."""
    mask = row_mask[:, None] & col_ok
    x = tl.load(x_ptrs, mask=mask, other=0).to(m.dtype)
    y = (x - m[:, None]) - log_d[:, None]  # not x - (m + log d): m + log d rounds at the scale of m
    if not LOG:
        y = tl.exp(y)
    tl.store(o_ptrs, y, mask=mask)


@triton.jit
def _softmax_kernel(
    x_ptr, out_ptr,
    stride_x, stride_out,
    n_rows, n_classes, shift_out,
    LOG: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
):  # fmt: skip
    rows, row_mask, zero = _program_rows(n_rows, out_ptr, ROWS)
    head, body, x0 = _row_peel(rows, stride_x, n_classes, PEEL)
    x_rows, x_body = _row_ptrs(x_ptr, rows, stride_x, x0, PEEL)
    o_rows, o_body = _row_ptrs(out_ptr, rows, stride_out, x0 + rows.to(tl.int64) * shift_out, PEEL)
    m = tl.full([ROWS], NEG_INF, dtype=zero.dtype)
    d = zero
    if PEEL:
        e_cols, e_ok = _edge_chunk(head, body, n_classes, PEEL)
        m, d = _softmax_max_sum(x_rows + e_cols, e_ok, row_mask, m, d)
    for start in range(0, n_classes, BLOCK):
        cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
        m, d = _softmax_max_sum(x_body + offs, ok, row_mask, m, d)
    log_d = tl.log(d)
    if PEEL:
        _softmax_out(x_rows + e_cols, o_rows + e_cols, e_ok, row_mask, m, log_d, LOG)
    for start in range(0, n_classes, BLOCK):
        cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
        _softmax_out(x_body + offs, o_body + offs, ok, row_mask, m, log_d, LOG)


def softmax(x, *, log):
    """Row softmax (or log-softmax) of a (N, r) tensor, returned in the compute dtype."""
    x = _unit_class_stride(x)
    out = torch.empty(x.shape, dtype=compute_dtype(x.dtype), device=x.device)
    if out.numel() > 0:
        _launch_rows(_softmax_kernel, x, x, out, x.stride(0), out.stride(0), *x.shape, _shift(out, x), LOG=log)
    return out


# --------------------------------------------------------------------------- binary cross-entropy
# Elementwise: read the input, target (and weights), write the loss and the gradient.


@triton.jit
def _log1p(v):
    """log(1 + v) accurate for small v (Goldberg's trick: the rounding of 1 + v cancels out)."""
    u = 1 + v
    exact = u == 1
    return tl.where(exact, v, tl.log(u) * (v / tl.where(exact, 1, u - 1)))


@triton.jit
def _bce_inputs(
    x_ptr, x_other: tl.constexpr, target_ptr, weight_ptr, loss_ptr, n_elements,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """This program's elements: offsets, mask, and the input (``x_other`` past the end), target and weight (1
    without) in the accumulation dtype, ``loss_ptr``'s."""
    acc_dtype = loss_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(x_ptr + offs, mask=mask, other=x_other).to(acc_dtype)
    y = tl.load(target_ptr + offs, mask=mask, other=0).to(acc_dtype)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0).to(acc_dtype)
    else:
        w = tl.zeros_like(x) + 1
    return offs, mask, x, y, w


@triton.jit
def _bce_kernel(
    probs_ptr, target_ptr, weight_ptr, loss_ptr, grad_ptr,
    n_elements,
    HAS_WEIGHT: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, p, y, w = _bce_inputs(probs_ptr, 0.5, target_ptr, weight_ptr, loss_ptr, n_elements, HAS_WEIGHT, BLOCK)
    log_p = tl.maximum(tl.log(p), -100.0)  # torch clamps each log at -100
    log_1mp = tl.maximum(_log1p(-p), -100.0)
    tl.store(loss_ptr + offs, -w * (y * log_p + (1 - y) * log_1mp), mask=mask)
    if WANT_GRAD:
        # torch clamps the denominator at its float32 EPSILON = 1e-12, whatever the dtype
        g = w * (p - y) / tl.maximum((1 - p) * p, _const(9.999999960041972e-13, p))
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bce_logits_kernel(
    logits_ptr, target_ptr, weight_ptr, pos_weight_ptr, loss_ptr, grad_ptr,
    n_elements,
    HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, x, y, w = _bce_inputs(logits_ptr, 0, target_ptr, weight_ptr, loss_ptr, n_elements, HAS_WEIGHT, BLOCK)
    if HAS_POS_WEIGHT:
        pw = tl.load(pos_weight_ptr + offs, mask=mask, other=1).to(x.dtype)
        lw = (pw - 1) * y + 1
        pw_y = pw * y
    else:
        lw = tl.zeros_like(x) + 1
        pw_y = y
    e = tl.exp(-tl.abs(x))
    softplus_neg = tl.maximum(-x, 0) + _log1p(e)  # log(1 + exp(-x)), stable for any x
    tl.store(loss_ptr + offs, w * ((1 - y) * x + lw * softplus_neg), mask=mask)
    if WANT_GRAD:
        sig = tl.where(x >= 0, 1 / (1 + e), e / (1 + e))
        g = w * (lw * sig - pw_y)
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


BCE_BLOCK = 1024 if INTERPRET else 2048
BCE_WARPS = 8  # 8 values per thread: 4 warps (16 each) spilled float64 registers


def _flat(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).contiguous()


def _bce_launch(kernel, x, tensors, grad, **flags):
    """Flatten, allocate the loss, launch; ``grad`` (contiguous, from the op) is written directly."""
    xf = _flat(x)
    n = xf.numel()
    loss = torch.empty(n, dtype=compute_dtype(x.dtype), device=x.device)
    args = [t if t is not None else loss for t in map(_flat, tensors)]
    if n:
        with _device_ctx(x):
            kernel[(triton.cdiv(n, BCE_BLOCK),)](
                xf, *args, loss, grad if grad is not None else loss, n,
                WANT_GRAD=grad is not None, BLOCK=BCE_BLOCK, num_warps=BCE_WARPS, **flags,
            )  # fmt: skip
    return loss


def binary_cross_entropy(probs, target, weight, *, grad):
    """Elementwise BCE on probabilities; see ``gpuxent.backends`` for the contract."""
    return _bce_launch(_bce_kernel, probs, (target, weight), grad, HAS_WEIGHT=weight is not None)


def binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad):
    """Elementwise sigmoid + BCE; see ``gpuxent.backends`` for the contract."""
    return _bce_launch(
        _bce_logits_kernel, logits, (target, weight, pos_weight), grad,
        HAS_WEIGHT=weight is not None, HAS_POS_WEIGHT=pos_weight is not None,
    )  # fmt: skip


# ------------------------------------------------------------ vocab-parallel: row partials and the gradient pass
# A rank that holds a slice of the classes reduces it to a few numbers per row (``row_partials``, the
# first loop of the fused kernel); the ranks combine them, and ``cross_entropy_backward`` (its second
# loop, ``_grad_step``) writes the slice's gradient from the global lse and coefficient. Contract:
# ``gpuxent.backends``.


@triton.jit
def _partials_step(
    x_ptrs, q_ptrs, w_ptrs, col_ok, kept, softcap, inv_cap, m, d, a, b, c,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):  # fmt: skip
    """One chunk of the row partials: the running max and sum of exp and the target / smoothing sums."""
    acc_dtype = m.dtype
    mask = kept[:, None] & col_ok
    y = _load_logits(x_ptrs, mask, softcap, inv_cap, HAS_SOFTCAP)
    if PROB_TARGET or SMOOTHING:
        y_in = tl.where(mask, y, 0)
        if HAS_WEIGHT:
            w = tl.load(w_ptrs, mask=col_ok, other=0).to(acc_dtype)
            wy = y_in * w
        else:
            wy = y_in
        if SMOOTHING:
            c += tl.sum(wy, axis=1)
        if PROB_TARGET:
            q = tl.load(q_ptrs, mask=mask, other=0).to(acc_dtype)
            wq = q * w if HAS_WEIGHT else q
            a += tl.sum(q * wy, axis=1)
            b += tl.sum(wq, axis=1)
    m_new, shift = _online_max(y, m)
    return m_new, d * tl.exp(m - shift) + tl.sum(tl.exp(y - shift[:, None]), axis=1), a, b, c


@triton.jit
def _row_partials_kernel(
    logits_ptr, target_ptr, weight_ptr, out_ptr,
    stride_logits, stride_target, stride_out,
    n_rows, n_classes, ignore_index, class_offset, softcap_hi, softcap_lo, shift_target,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
):  # fmt: skip
    rows, row_mask, zero = _program_rows(n_rows, out_ptr, ROWS)
    softcap = _scalar(softcap_hi, softcap_lo, zero)
    inv_cap = 1 / softcap
    head, body, x0 = _row_peel(rows, stride_logits, n_classes, PEEL)
    x_rows, x_body = _row_ptrs(logits_ptr, rows, stride_logits, x0, PEEL)
    t_rows, t_body = _row_ptrs(target_ptr, rows, stride_target, x0 + rows.to(tl.int64) * shift_target, PEEL)
    if PROB_TARGET:
        kept = row_mask
    else:
        target, kept = _class_target(target_ptr, stride_target, rows, row_mask, ignore_index)
        col_t, inside = _target_column(target, class_offset, n_classes)
        hit = kept & inside
    m = tl.full([ROWS], NEG_INF, dtype=zero.dtype)
    d = zero
    a = zero  # sum_j w_j q_j y_j (probability targets)
    b = zero  # sum_j w_j q_j (probability targets)
    c = zero  # sum_j w_j y_j (label smoothing)
    if PEEL:  # named apart: loop variables keep one shape
        e_cols, e_ok = _edge_chunk(head, body, n_classes, PEEL)
        m, d, a, b, c = _partials_step(
            x_rows + e_cols, t_rows + e_cols, weight_ptr + e_cols, e_ok, kept, softcap, inv_cap,
            m, d, a, b, c, PROB_TARGET, HAS_WEIGHT, SMOOTHING, HAS_SOFTCAP,
        )  # fmt: skip
    for start in range(0, n_classes, BLOCK):
        cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
        m, d, a, b, c = _partials_step(
            x_body + offs, t_body + offs, weight_ptr + cols, ok, kept, softcap, inv_cap,
            m, d, a, b, c, PROB_TARGET, HAS_WEIGHT, SMOOTHING, HAS_SOFTCAP,
        )  # fmt: skip
    if PROB_TARGET:
        a = tl.where(m != NEG_INF, a - b * m, a)
    else:
        y_t = _target_logit(logits_ptr, stride_logits, rows, col_t, hit, softcap, inv_cap, HAS_SOFTCAP)
        w_t = _target_weight(weight_ptr, col_t, hit, zero, HAS_WEIGHT)
        a = tl.where(hit, w_t * (y_t - m), 0)
        b = tl.where(hit, w_t, 0)
    o_rows = out_ptr + rows.to(tl.int64) * stride_out
    tl.store(o_rows, tl.where(kept, m, NEG_INF), mask=row_mask)
    tl.store(o_rows + 1, tl.where(kept, d, 0), mask=row_mask)
    tl.store(o_rows + 2, a, mask=row_mask)
    tl.store(o_rows + 3, b, mask=row_mask)
    tl.store(o_rows + 4, c, mask=row_mask)


def row_partials(logits, target, weight, *, ignore_index, softcap, class_offset, smoothing, out):
    """Per-row partials of a slice of the classes into ``out`` (N, 5); see ``gpuxent.backends``."""
    logits, target, weight, prob = _class_inputs(logits, target, weight)
    if logits.shape[0] == 0:
        return
    _launch_rows(
        _row_partials_kernel, logits,
        logits, target, weight if weight is not None else out, out,
        logits.stride(0), target.stride(0), out.stride(0),
        *logits.shape, int(ignore_index), int(class_offset), *_split(softcap or 1.0), _shift(target, logits),
        PROB_TARGET=prob, HAS_WEIGHT=weight is not None, SMOOTHING=bool(smoothing), HAS_SOFTCAP=bool(softcap),
    )  # fmt: skip


@triton.jit
def _cross_entropy_backward_kernel(
    logits_ptr, target_ptr, weight_ptr, lse_ptr, coef_ptr, entropy_ptr, grad_scale_ptr, entropy_scale_ptr, grad_ptr,
    stride_logits, stride_target, stride_grad, stride_scale, stride_entropy_scale,
    n_rows, n_classes, ignore_index, class_offset,
    eps_hi, eps_lo, eps_r_hi, eps_r_lo, softcap_hi, softcap_lo, shift_target, shift_grad,
    PROB_TARGET: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ENTROPY: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
):  # fmt: skip
    rows, row_mask, zero = _program_rows(n_rows, lse_ptr, ROWS)
    acc_dtype = zero.dtype
    smoothing = _scalar(eps_hi, eps_lo, zero)
    eps_r = _scalar(eps_r_hi, eps_r_lo, zero)
    softcap = _scalar(softcap_hi, softcap_lo, zero)
    inv_cap = 1 / softcap
    head, body, x0 = _row_peel(rows, stride_logits, n_classes, PEEL)
    x_rows, x_body = _row_ptrs(logits_ptr, rows, stride_logits, x0, PEEL)
    t_rows, t_body = _row_ptrs(target_ptr, rows, stride_target, x0 + rows.to(tl.int64) * shift_target, PEEL)
    g_rows, g_body = _row_ptrs(grad_ptr, rows, stride_grad, x0 + rows.to(tl.int64) * shift_grad, PEEL)
    if PROB_TARGET:
        kept = row_mask
        col_t = tl.zeros([ROWS], dtype=tl.int32)  # unused
        w_t = zero  # unused
    else:
        target, kept = _class_target(target_ptr, stride_target, rows, row_mask, ignore_index)
        local, inside = _target_column(target, class_offset, n_classes)
        w_t = _target_weight(weight_ptr, local, kept & inside, zero, HAS_WEIGHT)
        col_t = target - class_offset  # the target's column here, or outside [0, n_classes): no column matches
    lse = tl.load(lse_ptr + rows, mask=kept, other=0).to(acc_dtype)
    scale = tl.load(grad_scale_ptr + rows * stride_scale, mask=kept, other=0).to(acc_dtype)
    coef = scale * tl.load(coef_ptr + rows, mask=kept, other=0).to(acc_dtype)
    if HAS_ENTROPY:
        es = tl.load(entropy_scale_ptr + rows * stride_entropy_scale, mask=kept, other=0).to(acc_dtype)
        ey = lse - tl.load(entropy_ptr + rows, mask=kept, other=0).to(acc_dtype)  # E_p[y]
    else:
        es = zero  # unused
        ey = zero
    if PEEL:  # named apart: loop variables keep one shape
        e_cols, e_ok = _edge_chunk(head, body, n_classes, PEEL)
        _grad_step(
            x_rows + e_cols, t_rows + e_cols, weight_ptr + e_cols, g_rows + e_cols, e_cols, e_ok, kept,
            row_mask, softcap, inv_cap, smoothing, eps_r, scale, coef, lse, zero, col_t, w_t, es, ey,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_ENTROPY,
        )  # fmt: skip
    for start in range(0, n_classes, BLOCK):
        cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
        _grad_step(
            x_body + offs, t_body + offs, weight_ptr + cols, g_body + offs, cols, ok, kept,
            row_mask, softcap, inv_cap, smoothing, eps_r, scale, coef, lse, zero, col_t, w_t, es, ey,
            PROB_TARGET, HAS_WEIGHT, HAS_SMOOTHING, HAS_SOFTCAP, HAS_ENTROPY,
        )  # fmt: skip


def cross_entropy_backward(
    logits, target, weight, lse, coef, entropy, *, ignore_index, label_smoothing, n_classes, class_offset, softcap,
    grad_scale, entropy_scale, grad,
):  # fmt: skip
    """The gradient of a slice of the classes from the global lse and coefficient; see ``gpuxent.backends``."""
    n_rows, n_local = logits.shape
    logits, target, weight, prob = _class_inputs(logits, target, weight)
    dt = compute_dtype(logits.dtype)
    _check_grad(grad, logits)
    lse, coef = lse.to(dt).contiguous(), coef.to(dt).contiguous()
    scales = []
    for name, s in (("grad_scale", grad_scale), ("entropy_scale", entropy_scale)):
        s = torch.ones(1, dtype=dt, device=logits.device) if s is None else s
        s = torch.as_tensor(s, dtype=dt, device=logits.device).reshape(-1)
        if s.numel() not in (1, n_rows):
            raise ValueError(f"{name}: expected 1 or {n_rows} (one per row) elements, got {s.numel()}")
        scales.append(s)
    if n_rows == 0 or n_local == 0:
        return
    _launch_rows(
        _cross_entropy_backward_kernel, logits,
        logits, target, weight if weight is not None else lse, lse, coef,
        entropy.to(dt).contiguous() if entropy is not None else lse, scales[0], scales[1], grad,
        logits.stride(0), target.stride(0), grad.stride(0), int(scales[0].numel() > 1), int(scales[1].numel() > 1),
        n_rows, n_local, int(ignore_index), int(class_offset),
        *_split(label_smoothing), *_split(label_smoothing / n_classes), *_split(softcap or 1.0),
        _shift(target, logits), _shift(grad, logits),
        PROB_TARGET=prob, HAS_WEIGHT=weight is not None, HAS_SMOOTHING=label_smoothing > 0,
        HAS_SOFTCAP=bool(softcap), HAS_ENTROPY=entropy is not None,
    )  # fmt: skip


# --------------------------------------------------------------------------- distillation
# Per row, S = student / tau, T = teacher / tau (formulas: ``backends/numba_cpu/distill.py``).
# Loop 1: online max and sum of exp of both rows and, for kl / reverse_kl, the cross term
#   sum exp(lead - m_lead) (lead - other) (lead: T for kl, S for reverse_kl), rescaled like the sum;
#   the loss follows. jsd: loop 2 reads both rows again for log m = logaddexp(log beta + log p_t,
#   log(1 - beta) + log p_s) and sums the loss and K = KL(p_s || m).
# Last loop: reads both rows again and writes the student gradient.
# Byte model, forward+backward: read 2*N*r logits per loop (2 loops, jsd 3; the rereads of a row
# mostly hit L2 for r up to a few 10^4), write N*r gradient, read N targets, write N losses.

# jsd (the log of a mixture per element, in loops 2 and 3) spills at 16 warps of 8 values a thread, where
# ptxas keeps a thread under 64 registers: it runs at most 8 warps, each thread holding one 16-byte access
# of the input per step (4 float32, 8 half or 2 float64 values: still 128-bit loads and stores).
JSD_MAX_WARPS = 8


def _jsd_config(block: int, rows: int, num_warps: int, element_size: int) -> tuple[int, int, int]:
    """``(BLOCK, ROWS, num_warps)`` of a jsd launch from the common ones (``_launch_config``)."""
    num_warps = min(num_warps, JSD_MAX_WARPS)
    per_program = ALIGN_BYTES // element_size * 32 * num_warps
    if rows > 1:
        rows = max(1, min(rows, per_program // block))
    else:
        block = max(1, min(block, per_program))
    return block, rows, num_warps


# constexpr globals: the kernel's helpers compare DIVERGENCE with them (a helper may read no other global)
KL, REVERSE_KL, JSD = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)
DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}


@triton.jit
def _log_mixture(log_ps, log_pt, log_beta, log_1mbeta):
    """log(beta p_t + (1 - beta) p_s) from the log-probabilities, without the log of a tiny sum."""
    u = log_beta[:, None] + log_pt
    v = log_1mbeta[:, None] + log_ps
    hi = tl.maximum(u, v)
    lo = tl.minimum(u, v)
    return hi + _log1p(tl.exp(lo - hi))


@triton.jit
def _load_tempered(s_ptrs, t_ptrs, mask, inv_tau):
    """A chunk of S and T (the logits over tau) in ``inv_tau``'s dtype, the accumulation dtype; -inf where masked."""
    s = tl.load(s_ptrs, mask=mask, other=NEG_INF).to(inv_tau.dtype) * inv_tau[:, None]
    t = tl.load(t_ptrs, mask=mask, other=NEG_INF).to(inv_tau.dtype) * inv_tau[:, None]
    return s, t


@triton.jit
def _distill_sums_step(
    s_ptrs, t_ptrs, col_ok, kept, inv_tau, m_s, m_t, d_s, d_t, cross, DIVERGENCE: tl.constexpr,
):  # fmt: skip
    """One chunk of loop 1: online (max, sum of exp) of S and T, and the cross term of kl / reverse_kl."""
    s, t = _load_tempered(s_ptrs, t_ptrs, kept[:, None] & col_ok, inv_tau)
    m_s_new = tl.maximum(m_s, tl.max(s, axis=1))
    m_t_new = tl.maximum(m_t, tl.max(t, axis=1))
    shift_s = tl.where(m_s_new == NEG_INF, 0, m_s_new)  # a row of -inf so far must not give -inf - -inf
    shift_t = tl.where(m_t_new == NEG_INF, 0, m_t_new)
    alpha_s = tl.exp(m_s - shift_s)
    alpha_t = tl.exp(m_t - shift_t)
    e_s = tl.exp(s - shift_s[:, None])
    e_t = tl.exp(t - shift_t[:, None])
    d_s = d_s * alpha_s + tl.sum(e_s, axis=1)
    d_t = d_t * alpha_t + tl.sum(e_t, axis=1)
    if DIVERGENCE == KL:  # a term whose weight is 0 is 0 (its difference may be -inf - -inf)
        cross = cross * alpha_t + tl.sum(tl.where(e_t > 0, e_t * (t - s), 0), axis=1)
    elif DIVERGENCE == REVERSE_KL:
        cross = cross * alpha_s + tl.sum(tl.where(e_s > 0, e_s * (s - t), 0), axis=1)
    return m_s_new, m_t_new, d_s, d_t, cross


@triton.jit
def _jsd_step(s_ptrs, t_ptrs, col_ok, kept, inv_tau, m_s, m_t, log_ds, log_dt, log_beta, log_1mbeta, kl_t, kl_s):
    """One chunk of jsd's loop 2: sum p_t (log p_t - log m) and K = sum p_s (log p_s - log m)."""
    s, t = _load_tempered(s_ptrs, t_ptrs, kept[:, None] & col_ok, inv_tau)
    log_ps = (s - m_s[:, None]) - log_ds[:, None]
    log_pt = (t - m_t[:, None]) - log_dt[:, None]
    p_s = tl.exp(log_ps)
    p_t = tl.exp(log_pt)
    log_m = _log_mixture(log_ps, log_pt, log_beta, log_1mbeta)
    kl_t += tl.sum(tl.where(p_t > 0, p_t * (log_pt - log_m), 0), axis=1)
    kl_s += tl.sum(tl.where(p_s > 0, p_s * (log_ps - log_m), 0), axis=1)
    return kl_t, kl_s


@triton.jit
def _distill_grad_step(
    s_ptrs, t_ptrs, g_ptrs, col_ok, kept, row_mask, no_softmax, inv_tau, m_s, m_t, log_ds, log_dt, log_beta,
    log_1mbeta, mu, coef, DIVERGENCE: tl.constexpr,
):  # fmt: skip
    """One chunk of the last loop: reads both rows, writes the student's gradient."""
    s, t = _load_tempered(s_ptrs, t_ptrs, kept[:, None] & col_ok, inv_tau)
    log_ps = (s - m_s[:, None]) - log_ds[:, None]
    p_s = tl.exp(log_ps)
    if DIVERGENCE == KL:
        g = p_s - tl.exp((t - m_t[:, None]) - log_dt[:, None])
    elif DIVERGENCE == REVERSE_KL:
        g = tl.where(p_s > 0, p_s * ((s - t) - mu[:, None]), 0)
    else:
        log_pt = (t - m_t[:, None]) - log_dt[:, None]
        log_m = _log_mixture(log_ps, log_pt, log_beta, log_1mbeta)
        g = tl.where(p_s > 0, p_s * ((log_ps - log_m) - mu[:, None]), 0)
    # float("nan"), not the global NAN: the JIT checks that a helper sees a global's value unchanged, NaN != NaN
    g = tl.where(no_softmax[:, None], float("nan"), coef[:, None] * g)
    _store_grad(g_ptrs, g, col_ok, kept, row_mask)


@triton.jit
def _distillation_kernel(
    student_ptr, teacher_ptr, target_ptr, grad_scale_ptr, grad_ptr, loss_ptr,
    stride_student, stride_teacher, stride_grad, stride_scale,
    n_rows, n_classes, ignore_index,
    inv_tau_hi, inv_tau_lo, tau_hi, tau_lo, beta_hi, beta_lo, scale_hi, scale_lo, shift_teacher, shift_grad,
    DIVERGENCE: tl.constexpr, HAS_TARGET: tl.constexpr, WANT_GRAD: tl.constexpr, SCALE_IS_PTR: tl.constexpr,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, PEEL: tl.constexpr,
):  # fmt: skip
    rows, row_mask, zero = _program_rows(n_rows, loss_ptr, ROWS)
    inv_tau = _scalar(inv_tau_hi, inv_tau_lo, zero)
    tau = _scalar(tau_hi, tau_lo, zero)
    beta = _scalar(beta_hi, beta_lo, zero)
    if HAS_TARGET:
        _, kept = _class_target(target_ptr, 1, rows, row_mask, ignore_index)
    else:
        kept = row_mask
    head, body, s0 = _row_peel(rows, stride_student, n_classes, PEEL)  # the student's origin, then the others'
    s_rows, s_body = _row_ptrs(student_ptr, rows, stride_student, s0, PEEL)
    t_rows, t_body = _row_ptrs(teacher_ptr, rows, stride_teacher, s0 + rows.to(tl.int64) * shift_teacher, PEEL)
    if PEEL:  # named apart: loop variables keep one shape
        e_cols, e_ok = _edge_chunk(head, body, n_classes, PEEL)

    # loop 1: online (max, sum of exp) of S and T, and the cross term of kl / reverse_kl
    m_s = tl.full([ROWS], NEG_INF, dtype=zero.dtype)
    m_t = tl.full([ROWS], NEG_INF, dtype=zero.dtype)
    d_s = zero
    d_t = zero
    cross = zero
    if PEEL:
        m_s, m_t, d_s, d_t, cross = _distill_sums_step(
            s_rows + e_cols, t_rows + e_cols, e_ok, kept, inv_tau, m_s, m_t, d_s, d_t, cross, DIVERGENCE
        )
    for start in range(0, n_classes, BLOCK):
        cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
        m_s, m_t, d_s, d_t, cross = _distill_sums_step(
            s_body + offs, t_body + offs, ok, kept, inv_tau, m_s, m_t, d_s, d_t, cross, DIVERGENCE
        )
    m_s = tl.where(kept, m_s, 0)
    m_t = tl.where(kept, m_t, 0)
    log_ds = tl.log(tl.where(kept, d_s, 1))
    log_dt = tl.log(tl.where(kept, d_t, 1))
    log_beta = tl.log(beta)
    log_1mbeta = tl.log(1 - beta)
    # a row without a softmax (all -inf, or a NaN or +inf in it) is NaN, as in torch; checked here because
    # the sums below leave out the terms of zero probability, NaN ones included
    no_softmax = ~((tl.abs(m_s + log_ds) < float("inf")) & (tl.abs(m_t + log_dt) < float("inf")))

    if DIVERGENCE == KL:
        mu = cross / tl.where(kept, d_t, 1)  # sum p_t (T - S)
        div = mu - (m_t - m_s) - (log_dt - log_ds)
    elif DIVERGENCE == REVERSE_KL:
        mu = cross / tl.where(kept, d_s, 1)  # sum p_s (S - T)
        div = mu - (m_s - m_t) - (log_ds - log_dt)
    else:  # loop 2: sum p_t (log p_t - log m) and K = sum p_s (log p_s - log m)
        kl_t = zero
        kl_s = zero
        if PEEL:
            kl_t, kl_s = _jsd_step(
                s_rows + e_cols, t_rows + e_cols, e_ok, kept, inv_tau, m_s, m_t, log_ds, log_dt,
                log_beta, log_1mbeta, kl_t, kl_s,
            )  # fmt: skip
        for start in range(0, n_classes, BLOCK):
            cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
            kl_t, kl_s = _jsd_step(
                s_body + offs, t_body + offs, ok, kept, inv_tau, m_s, m_t, log_ds, log_dt,
                log_beta, log_1mbeta, kl_t, kl_s,
            )  # fmt: skip
        div = beta * kl_t + (1 - beta) * kl_s
        mu = kl_s
    div = tl.where(no_softmax, NAN, div)
    tl.store(loss_ptr + rows, tl.where(kept, tau * tau * div, 0), mask=row_mask)

    # last loop: grad = scale * tau * d div / d S
    if WANT_GRAD:
        coef = _grad_scale(grad_scale_ptr, stride_scale, scale_hi, scale_lo, rows, row_mask, zero, SCALE_IS_PTR) * tau
        if DIVERGENCE == JSD:
            coef = coef * (1 - beta)
        g_rows, g_body = _row_ptrs(grad_ptr, rows, stride_grad, s0 + rows.to(tl.int64) * shift_grad, PEEL)
        if PEEL:
            _distill_grad_step(
                s_rows + e_cols, t_rows + e_cols, g_rows + e_cols, e_ok, kept, row_mask,
                no_softmax, inv_tau, m_s, m_t, log_ds, log_dt, log_beta, log_1mbeta, mu, coef, DIVERGENCE,
            )  # fmt: skip
        for start in range(0, n_classes, BLOCK):
            cols, ok, offs = _chunk(start, head, body, n_classes, BLOCK, PEEL)
            _distill_grad_step(
                s_body + offs, t_body + offs, g_body + offs, ok, kept, row_mask,
                no_softmax, inv_tau, m_s, m_t, log_ds, log_dt, log_beta, log_1mbeta, mu, coef, DIVERGENCE,
            )  # fmt: skip


def distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, grad_scale, grad):
    """Per-row tau**2 * divergence of (N, r) student and teacher logits; see ``gpuxent.backends``."""
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student, teacher: expected two (N, r) tensors of one shape, got {tuple(student.shape)}")
    student = _unit_class_stride(student)
    teacher = _unit_class_stride(teacher)
    loss = torch.empty(student.shape[0], dtype=compute_dtype(student.dtype), device=student.device)
    _check_grad(grad, student)
    if loss.numel() == 0:
        return loss
    scale, stride_scale, scale_hi, scale_lo, scale_is_ptr = _grad_scale_args(grad_scale, loss)
    _launch_rows(
        _distillation_kernel, student,
        student, teacher, target.contiguous() if target is not None else loss, scale,
        grad if grad is not None else loss, loss,
        student.stride(0), teacher.stride(0), _stride(grad), stride_scale,
        *student.shape, int(ignore_index),
        *_split(1 / temperature), *_split(temperature), *_split(beta), scale_hi, scale_lo,
        _shift(teacher, student), _shift(grad, student),
        DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_TARGET=target is not None, WANT_GRAD=grad is not None,
        SCALE_IS_PTR=scale_is_ptr, jsd=divergence == "jsd",
    )  # fmt: skip
    return loss
