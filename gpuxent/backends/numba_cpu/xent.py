"""Fused softmax cross-entropy on the CPU: the forward with its gradient from the same visit, the
vocab-parallel row partials, and the gradient pass from a global lse.

Inside a row the work is split into chunks of ``CHUNK`` classes that stay in L1. Each chunk is read
once from memory: its max, its sum of exponentials and (when a gradient is asked for) the
exponentials themselves, stored in the gradient buffer, come out of the same visit; a last sweep
rescales them by ``exp(chunk_max - lse)`` into the gradient, while the row is still in L2. So
forward+backward reads the logits once and writes the gradient once.

The gradient may be the logits themselves (in place): the variant for it writes over the logits
through ONE array, so that LLVM sees one pointer. Given two arrays that are the same memory, the
loops it vectorized behind a runtime overlap check fall back to their scalar versions.

bfloat16 and float16 logits keep their exponentials in a float32 row buffer instead of the gradient,
so that each gradient element is rounded once.

A row without a softmax (all -inf, or a NaN or +inf in it) gets a NaN gradient and, when kept, a
NaN loss, as in PyTorch.

Byte model, forward+backward, class targets: read N*r logits, write N*r gradient, read N targets,
write N losses and N lse. With ``stats`` (argmax and entropy of each row, from the same visit of each
chunk: the argmax from the chunk's max, a first-index search only when it beats the earlier chunks',
and the entropy's sum from the same exps) the same bytes plus N argmaxes and N entropies written.
"""

from __future__ import annotations

import functools
import math

import numba as nb
import numpy as np

from .. import rowmath
from .runtime import CHUNK, kernel, strict
from .simd import FASTMATH, cast, compute_buffer, exp_buffer, exp_neg, exps_in, maxnum, narrow, tanh, widen

_ROW = rowmath.make(np.float64)  # the row math shared with numba_cuda, on float64 row sums
_ENTROPY = rowmath.make_entropy(np.float64)
merge, loss_and_coef, merge_entropy, entropy = map(
    strict, (_ROW.merge, _ROW.loss_and_coef, _ENTROPY.merge_entropy, _ENTROPY.entropy)
)

# --------------------------------------------------------------------------- chunk helpers
# They take slices and loop from 0: an index that numba cannot prove non-negative gets a wraparound
# select that stops LLVM from vectorizing the loop. Those that may read and write the same memory (an
# in-place gradient) are inlined by numba, so that LLVM sees one pointer where there is one.


@nb.njit(fastmath=FASTMATH, inline="always")
def softcap_chunk(x, softcap, y):
    """``y = softcap tanh(x / softcap)``: the chunk as the softmax sees it, returned."""
    inv = cast(x, 1 / softcap)
    cap = cast(x, softcap)
    for j in range(x.shape[0]):
        y[j] = cap * tanh(widen(x[j]) * inv)
    return y


@nb.njit(fastmath=FASTMATH, inline="always")
def chunk_max(y):
    """Max of the chunk ignoring NaN; -inf when the chunk holds only -inf and NaN."""
    m = cast(y, -np.inf)
    for j in range(y.shape[0]):
        m = maxnum(m, widen(y[j]))
    return m


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_max_nan(y):
    """``(chunk_max(y), whether the chunk holds a NaN)`` in one vectorized loop (no early exit)."""
    m = cast(y, -np.inf)
    seen = False
    for j in range(y.shape[0]):
        v = widen(y[j])
        m = maxnum(m, v)
        seen |= v != v
    return m, seen


@strict
def empty_chunk_sum(y):
    """What a chunk whose max is -inf adds to the sum of exp: 0, or NaN if it holds a NaN."""
    for j in range(y.shape[0]):
        v = widen(y[j])
        if v != v:
            return np.nan
    return 0.0


@nb.njit(fastmath=FASTMATH, inline="always")
def chunk_exps(y, m, e, store):
    """Sum of exp(y - m) of a chunk whose max is ``m``, in float64; the terms go to ``e`` when ``store``
    (zeros for a chunk of -inf, whose sum is 0, or NaN if it holds a NaN)."""
    if m == -np.inf:
        if store:
            e[:] = 0
        return empty_chunk_sum(y)
    s = cast(y, 0)
    if store:
        for j in range(y.shape[0]):
            v = exp_neg(widen(y[j]) - m)
            e[j] = v
            s += v
    else:
        for j in range(y.shape[0]):
            s += exp_neg(widen(y[j]) - m)
    return np.float64(s)


@nb.njit(fastmath=FASTMATH, inline="always")
def chunk_target_sums(y, w, q, prob, keep, add):
    """(sum_c w_c q'_c y_c, sum_c w_c q'_c) with q' = keep q + add for probability targets;
    (sum_c w_c y_c, 0) for class targets (label smoothing)."""
    swy = cast(y, 0)
    swq = cast(y, 0)
    if prob:
        k = cast(y, keep)
        a = cast(y, add)
        for j in range(y.shape[0]):
            wq = w[j] * (k * q[j] + a)
            swy += wq * widen(y[j])
            swq += wq
    else:
        for j in range(y.shape[0]):
            swy += w[j] * widen(y[j])
    return np.float64(swy), np.float64(swq)


@nb.njit(fastmath=FASTMATH, inline="always")
def _chunk_exps_entropy(y, m, e, store):
    """``chunk_exps`` plus the entropy's sum ``sum exp(y - m) (y - m)``, from the same exps. ``y - m`` is
    clamped at -1e4, where the exp is 0, so that a -inf logit adds 0, not 0 * -inf."""
    if m == -np.inf:
        if store:
            e[:] = 0
        return empty_chunk_sum(y), 0.0
    s = cast(y, 0)
    t = cast(y, 0)
    floor = cast(y, -1e4)
    for j in range(y.shape[0]):
        d = widen(y[j]) - m
        v = exp_neg(d)
        if store:
            e[j] = v
        s += v
        t += v * (d if d > floor else floor)
    return np.float64(s), np.float64(t)


@kernel
def _first_index(y, v):
    """The first ``j`` with ``y[j] == v``, 0 if there is none: a min-reduction of indices over the whole
    chunk, which vectorizes (a loop that stops at the first hit runs scalar, half a chunk on average)."""
    n = y.shape[0]
    first = n
    for j in range(n):
        hit = widen(y[j]) == v
        first = min(first, j if hit else n)
    return first if first < n else 0


@strict
def _first_nan(y):
    """The first ``j`` with ``y[j]`` NaN (0 if there is none); only for a chunk known to hold one."""
    for j in range(y.shape[0]):
        u = widen(y[j])
        if u != u:
            return j
    return 0


@strict
def chunk_scale(m, m_row, s_row):
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
            g[j] = narrow(g, v)
    elif b0 != 0:
        for j in range(g.shape[0]):
            v = a * e[j] - b0 * w[j]
            if y is not None:
                v *= 1 - (y[j] * inv_cap) * (y[j] * inv_cap)
            g[j] = narrow(g, v)
    else:
        for j in range(g.shape[0]):
            v = a * e[j]
            if y is not None:
                v *= 1 - (y[j] * inv_cap) * (y[j] * inv_cap)
            g[j] = narrow(g, v)


def _named(fn, family: str, **flags):
    """Tag a variant with what it computes, for the compile notice."""
    on = [k for k, v in flags.items() if v]
    fn.variant = f"{family} kernel ({', '.join(on) or 'plain'})"
    return fn


# --------------------------------------------------------------------------- the fused forward


@functools.cache
def rows(prob: bool, capped: bool, stats: bool, grad: bool, inplace: bool):
    """The cross-entropy kernel for one combination of: probability targets (else class indices), a
    softcap, the statistics (argmax and entropy), a gradient, written in place over the logits.

    ``rows(lo, hi, ...)`` computes rows ``lo .. hi - 1``: their loss and lse (and argmax and entropy),
    and the gradient times ``grad_scale`` (one factor, or one per row). ``weight`` are the class weights
    (ones when none were given) and ``sum_w`` their sum. The first sweep keeps exp(y - chunk max) in the
    gradient itself, or in a float32 row buffer when the gradient is half precision; ``ybuf`` holds the
    soft-capped row, which the second sweep needs for the tanh's derivative.
    """

    @kernel
    def ce_rows(
        lo_row, hi_row, logits, target, probs, weight, sum_w, ignore_index, smoothing, z_loss, softcap, grad_scale,
        grad_out, loss, lse, argmax, entropy_out,
    ):  # fmt: skip
        n_classes = logits.shape[1]
        n_chunks = (n_classes + CHUNK - 1) // CHUNK
        per_row = grad_scale.shape[0] > 1
        e_buf = exp_buffer(logits, n_classes if grad else 0)
        ybuf = compute_buffer(logits, n_classes if capped else 0)
        chunk_maxes = np.empty(n_chunks, np.float64)
        eps_r = smoothing / n_classes
        keep = 1 - smoothing
        for i in range(lo_row, hi_row):
            x = logits[i]
            if inplace:
                g = x
            else:
                g = grad_out[i if grad else 0]
            t = -1
            if not prob:
                t = target[i]
                if t == ignore_index:  # an ignored row counts for nothing: loss and gradient 0, unread
                    if grad:
                        g[:] = narrow(g, 0)
                    loss[i] = 0
                    lse[i] = 0
                    if stats:
                        argmax[i] = 0
                        entropy_out[i] = 0
                    continue
            q = probs[i if prob else 0]
            e = exps_in(g, e_buf)
            y_t = 0.0
            m_row = -np.inf
            s_row = 0.0
            sum_wy = 0.0  # sum_c w_c y_c (label smoothing) or sum_c w_c q'_c y_c (probability targets)
            sum_wq = 0.0  # sum_c w_c q'_c (probability targets), q' = (1 - smoothing) q + smoothing / r
            t_row = 0.0  # sum exp(y - m_row) (y - m_row): the entropy's (stats)
            best_m = -np.inf
            best_j = 0
            nan_j = -1
            for c in range(n_chunks):
                lo = c * CHUNK
                hi = min(lo + CHUNK, n_classes)
                yc = softcap_chunk(x[lo:hi], softcap, ybuf[lo:hi]) if capped else x[lo:hi]
                if prob or smoothing > 0:
                    swy, swq = chunk_target_sums(yc, weight[lo:hi], q[lo:hi], prob, keep, eps_r)
                    sum_wy += swy
                    sum_wq += swq
                if not prob and lo <= t < hi:  # read now, before an in-place gradient overwrites it
                    y_t = np.float64(widen(x[t]))
                    if capped:
                        y_t = softcap * math.tanh(y_t / softcap)
                if stats:
                    # torch.argmax: the first NaN if there is one, else the first max. The searches
                    # read the chunk before ``e`` (maybe its memory) is written, and run only when
                    # the chunk's max beats the earlier ones' (ties go to the lowest index).
                    m, has_nan = _chunk_max_nan(yc)
                    if nan_j < 0 and has_nan:
                        nan_j = lo + _first_nan(yc)
                    if m > best_m:
                        best_m = m
                        best_j = lo + _first_index(yc, m)
                    s, tc = _chunk_exps_entropy(yc, m, e[lo:hi], grad)
                    t_row = merge_entropy(m_row, s_row, t_row, m, s, tc)
                else:
                    m = chunk_max(yc)
                    s = chunk_exps(yc, m, e[lo:hi], grad)
                chunk_maxes[c] = m
                m_row, s_row = merge(m_row, s_row, m, s)
            log_s = math.log(s_row)
            lse_i = m_row + log_s
            lse[i] = lse_i
            if stats:
                argmax[i] = nan_j if nan_j >= 0 else best_j
            # A row of -inf, or a NaN or +inf in it: no softmax, NaN as in PyTorch. (Not math.isfinite:
            # under reassoc numba's isfinite(x) tests x - x, which folds to 0, so -inf passed as finite.)
            if not -np.inf < lse_i < np.inf:
                if grad:
                    g[:] = narrow(g, np.nan)
                loss[i] = np.nan
                if stats:
                    entropy_out[i] = np.nan
                continue
            if stats:
                entropy_out[i] = entropy(log_s, s_row, t_row)
            w_t = 0.0 if prob else np.float64(weight[t])
            loss_i, coef_p = loss_and_coef(
                m_row, log_s, y_t, w_t, sum_wy, sum_wq if prob else sum_w, prob, keep, eps_r, smoothing, z_loss
            )
            loss[i] = loss_i
            if not grad:
                continue
            # grad_j = scale (coef_p p_j - eps_r w_j - (1 - eps) w_t [j == t]) (1 - (y_j / softcap)**2),
            # p_j = e_j exp(m_c - lse); probability targets: grad_j = scale (coef_p p_j - w_j q'_j) (...)
            scale = grad_scale[i if per_row else 0]
            e_t = 0.0 if prob else np.float64(e[t])  # before the sweep below overwrites e (= g)
            inv_cap = cast(e, 1 / softcap if capped else 0.0)
            b = cast(e, scale * keep)
            b0 = cast(e, scale * eps_r)
            for c in range(n_chunks):
                lo = c * CHUNK
                hi = min(lo + CHUNK, n_classes)
                a = cast(e, scale * coef_p * chunk_scale(chunk_maxes[c], m_row, s_row))
                if capped:
                    _grad_chunk(e[lo:hi], g[lo:hi], weight[lo:hi], q[lo:hi], ybuf[lo:hi], a, b, b0, prob, inv_cap)
                else:
                    _grad_chunk(e[lo:hi], g[lo:hi], weight[lo:hi], q[lo:hi], None, a, b, b0, prob, inv_cap)
            if not prob:  # the target's term, added before the one rounding of g[t]
                p_t = e_t * chunk_scale(chunk_maxes[t // CHUNK], m_row, s_row)
                v = scale * (coef_p * p_t - eps_r * w_t - keep * w_t)
                if capped:
                    v *= 1 - (y_t / softcap) ** 2
                g[t] = narrow(g, v)

    return _named(
        ce_rows,
        "cross-entropy",
        **{
            "probability targets": prob,
            "softcap": capped,
            "statistics": stats,
            "gradient": grad,
            "in place": inplace,
        },  # fmt: skip
    )


# ------------------------------------------------------------ vocab-parallel: row partials and the gradient pass
# A rank that holds a slice of the classes reduces it to a few numbers per row (``partial_rows``); the
# ranks combine them into the global lse and gradient coefficient, and ``backward_rows`` writes the
# slice's gradient from those. Contract: ``gpuxent.backends``.

N_PARTIALS = 5  # (m, s, a, b, c) per row


@functools.cache
def partial_rows(prob: bool, capped: bool):
    """Per row of a slice of the classes: (m, s, a, b, c) = the max, the sum of exp(y - m), and the
    target terms: class targets ``w_t (y_t - m)`` and ``w_t`` where the target falls in the slice,
    probability targets ``sum w q (y - m)`` and ``sum w q``, and ``c = sum w y`` for label smoothing."""

    @kernel
    def rows_(lo_row, hi_row, logits, target, probs, weight, ignore_index, softcap, class_offset, smoothing, out):
        n_classes = logits.shape[1]
        n_chunks = (n_classes + CHUNK - 1) // CHUNK
        ybuf = compute_buffer(logits, n_classes if capped else 0)
        no_exps = compute_buffer(logits, 0)
        for i in range(lo_row, hi_row):
            o = out[i]
            o[0] = -np.inf
            o[1] = o[2] = o[3] = o[4] = 0.0
            t = -1
            if not prob:
                t = target[i]
                if t == ignore_index:  # unread
                    continue
            x = logits[i]
            q = probs[i if prob else 0]
            m_row = -np.inf
            s_row = a = b = c = 0.0
            for ch in range(n_chunks):
                lo = ch * CHUNK
                hi = min(lo + CHUNK, n_classes)
                yc = softcap_chunk(x[lo:hi], softcap, ybuf[lo:hi]) if capped else x[lo:hi]
                m = chunk_max(yc)
                m_row, s_row = merge(m_row, s_row, m, chunk_exps(yc, m, no_exps, False))
                if prob:
                    a_c, b_c = chunk_target_sums(yc, weight[lo:hi], q[lo:hi], True, 1.0, 0.0)
                    a += a_c
                    b += b_c
                if smoothing:
                    c += chunk_target_sums(yc, weight[lo:hi], q[lo:hi], False, 1.0, 0.0)[0]
            lt = t - class_offset
            if not prob and 0 <= lt < n_classes:
                y_t = np.float64(widen(x[lt]))
                if capped:
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

    return _named(rows_, "row-partials", **{"probability targets": prob, "softcap": capped})


@functools.cache
def backward_rows(prob: bool, capped: bool, with_entropy: bool, inplace: bool):
    """The gradient of a slice of the classes from the global lse and coefficient:
    g_j = [a p_j - w_j (bq q_j + b0) + ea p_j (ey - y_j)] dy_j/dx_j with p_j = exp(y_j - lse), rounded
    once to g's type; the entropy term (``with_entropy``) is 0, not 0 * inf, where p = 0."""

    @kernel
    def rows_(
        lo_row, hi_row, logits, target, probs, weight, lse, coef, entropy_in, ignore_index, smoothing, n_total,
        class_offset, softcap, grad_scale, entropy_scale, grad_out,
    ):  # fmt: skip
        n_classes = logits.shape[1]
        per_row = grad_scale.shape[0] > 1
        ent_per_row = entropy_scale.shape[0] > 1
        eps_r = smoothing / n_total
        for i in range(lo_row, hi_row):
            x = logits[i]
            if inplace:
                g = x
            else:
                g = grad_out[i]
            t = -1
            if not prob:
                t = target[i]
                if t == ignore_index:  # unread, 0
                    g[:] = narrow(g, 0)
                    continue
            lse_i = np.float64(lse[i])
            if not -np.inf < lse_i < np.inf:  # no softmax (a row of -inf, a NaN or +inf in it): NaN as torch
                g[:] = narrow(g, np.nan)
                continue
            gs = grad_scale[i if per_row else 0]
            es = ey = 0.0
            if with_entropy:
                es = entropy_scale[i if ent_per_row else 0]
                ey = lse_i - entropy_in[i]
            w_t = y_t = 0.0
            lt = t - class_offset
            hit = not prob and 0 <= lt < n_classes
            if hit:  # read before an in-place sweep overwrites it
                w_t = np.float64(weight[lt])
                y_t = np.float64(widen(x[lt]))
                if capped:
                    y_t = softcap * math.tanh(y_t / softcap)
            a, bq, b0 = gs * np.float64(coef[i]), gs * (1 - smoothing), gs * eps_r
            lse_c, a_c, bq_c, b0_c = cast(x, lse_i), cast(x, a), cast(x, bq), cast(x, b0)
            es_c, ey_c = cast(x, es), cast(x, ey)
            inv_cap = cast(x, 1 / softcap if capped else 0.0)
            cap = cast(x, softcap)
            one = cast(x, 1)
            zero = cast(x, 0)
            q = probs[i if prob else 0]
            for j in range(n_classes):
                u = widen(x[j])
                if capped:
                    th = tanh(u * inv_cap)
                    y = cap * th
                    dy = one - th * th
                else:
                    y = u
                    dy = one
                p = exp_neg(y - lse_c)
                if prob:
                    m = bq_c * q[j] + b0_c
                else:
                    m = b0_c
                v = a_c * p - weight[j] * m
                if with_entropy:
                    v += es_c * p * (ey_c - (y if p > zero else zero))
                g[j] = narrow(g, v * dy)
            if hit:  # the target's term, added before the one rounding of g[lt]
                p_t = math.exp(y_t - lse_i)
                v = a * p_t - w_t * (bq + b0) + (es * p_t * (ey - y_t) if p_t > 0 else 0.0)
                if capped:
                    v *= 1 - (y_t / softcap) ** 2
                g[lt] = narrow(g, v)

    return _named(
        rows_, "cross-entropy backward",
        **{"probability targets": prob, "softcap": capped, "entropy": with_entropy, "in place": inplace},
    )  # fmt: skip
