"""The vectorizable scalar math of the CPU kernels, as numba intrinsics and overloads.

``math.exp`` does not vectorize in numba (no SVML in PyPI's llvmlite), so ``exp_neg`` is a
branch-free exp for non-positive arguments (Cody-Waite reduction, Taylor polynomial, exponent bits
built by an LLVM intrinsic) that LLVM turns into AVX-512 code; it is within 2 ulp in float32 and
float64. ``tanh`` (the softcap) and ``log1p_unit`` (jsd) are built on the same idea.

numpy has no bfloat16 and numba no float16: half tensors reach the kernels as their bits (bfloat16
as uint16, float16 as int16), are widened to float32 as they are loaded (``widen``) and rounded once on
store (``narrow``, round to nearest even). Everything else computes in float32, float64 in float64
(``cast``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

# Every fast-math flag except nnan/ninf: NaN and inf must propagate as in PyTorch.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@intrinsic
def pow2(typingctx, k):
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
def maxnum(typingctx, a, b):
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


def exp_neg(x):  # pragma: no cover - replaced by the overload below inside njit code
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
        y = p * pow2(k)
        y = y if x > lowest else f(0)
        return y if x == x else x

    return impl


_EXP_NEG32 = _make_exp_neg(np.dtype(np.float32), -87.0, 7)
_EXP_NEG64 = _make_exp_neg(np.dtype(np.float64), -708.0, 12)


def _per_float(impl32, impl64):
    """An overload that picks the float32 or the float64 implementation by the argument's type."""
    return lambda x: {types.float32: impl32, types.float64: impl64}.get(x)


overload(exp_neg, fastmath=FASTMATH)(_per_float(_EXP_NEG32, _EXP_NEG64))


@nb.njit(fastmath=FASTMATH, cache=True)
def tanh(u):
    """tanh through ``exp_neg`` so that it vectorizes: tanh|u| = (1 - e) / (1 + e), e = exp(-2|u|)."""
    a = abs(u)
    e = exp_neg(-(a + a))
    t = (1 - e) / (1 + e)
    return t if u >= 0 else -t


# --------------------------------------------------------------------------- half precision, in registers

HALF_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}


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


def widen(v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(widen)
def _widen_overload(v):
    """An element in its compute type: a float as it is, half-precision bits as a float32."""
    if isinstance(v, types.Float):
        return lambda v: v
    if v in (types.uint16, types.int16):
        return lambda v: _half_to_float(v)
    return None


def narrow(like, v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(narrow)
def _narrow_overload(like, v):
    """``v`` rounded once to the element type of the array ``like`` (half precision as its bits)."""
    if isinstance(like.dtype, types.Float):
        ctor = np.dtype(like.dtype.name).type
        return lambda like, v: ctor(v)
    return lambda like, v: _float_to_half(like, np.float32(v))


def cast(like, v):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(cast)
def _cast_overload(like, v):
    """``v`` in the compute type of the array ``like``: float64 for float64, else float32."""
    ctor = np.float64 if like.dtype == types.float64 else np.float32
    return lambda like, v: ctor(v)


def compute_buffer(like, n):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(compute_buffer)
def _compute_buffer_overload(like, n):
    """A new (n,) array of the compute type of ``like``."""
    dt = np.float64 if like.dtype == types.float64 else np.float32
    return lambda like, n: np.empty(n, dt)


def exp_buffer(grad, n):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(exp_buffer)
def _exp_buffer_overload(grad, n):
    """The float32 row in which a half-precision gradient keeps its exponentials (see ``_ce_row``);
    an empty one for a float gradient, which keeps them in itself."""
    if isinstance(grad.dtype, types.Float):
        return lambda grad, n: np.empty(0, grad.dtype)
    return lambda grad, n: np.empty(n, np.float32)


def exps_in(g, buf):  # pragma: no cover - replaced by the overload below inside njit code
    raise NotImplementedError


@overload(exps_in)
def _exps_in_overload(g, buf):
    if isinstance(g.dtype, types.Float):
        return lambda g, buf: g
    return lambda g, buf: buf


def log1p_unit(x):  # pragma: no cover - replaced by the overload below inside njit code
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

    def impl(x):
        u = x
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

    def impl(x):
        u = x
        t = (u + u) - one
        p = top
        for c in coeffs:
            p = p * t + c
        return p

    return impl


# float32: the polynomial made jsd's in-cache sweep 0.72-0.84 ns/element, the series 1.06 (its division)
_LOG1P32 = _make_log1p_unit_poly(np.dtype(np.float32), 9)
_LOG1P64 = _make_log1p_unit(np.dtype(np.float64), 11)


overload(log1p_unit, fastmath=FASTMATH)(_per_float(_LOG1P32, _LOG1P64))
