"""Softmax, log-softmax and the binary cross-entropies on the CPU, as row-range kernels."""

from __future__ import annotations

import functools

import numpy as np

from .runtime import CHUNK, kernel, strict
from .simd import cast, widen
from .xent import _ROW, _named, chunk_exps, chunk_max, chunk_scale, merge

bce, bce_logits = strict(_ROW.bce), strict(_ROW.bce_logits)


@functools.cache
def softmax_rows(log: bool):
    """Row max and log of the sum of exp(x - max) of every row; for a softmax (not ``log``) also
    ``out = exp(x - lse)``, stored chunk by chunk and rescaled like the cross-entropy gradient (NaN
    for a row without a softmax: all -inf, or a NaN or +inf in it, as in PyTorch)."""

    @kernel
    def rows_(lo_row, hi_row, x, out, row_max, row_log_sum):
        n_classes = x.shape[1]
        n_chunks = (n_classes + CHUNK - 1) // CHUNK
        chunk_maxes = np.empty(n_chunks, np.float64)
        for i in range(lo_row, hi_row):
            row = x[i]
            o = out[i]
            m_row = -np.inf
            s_row = 0.0
            for c in range(n_chunks):
                lo = c * CHUNK
                hi = min(lo + CHUNK, n_classes)
                m = chunk_max(row[lo:hi])
                chunk_maxes[c] = m
                m_row, s_row = merge(m_row, s_row, m, chunk_exps(row[lo:hi], m, o[lo:hi], not log))
            log_sum = np.log(s_row)
            row_max[i] = m_row
            row_log_sum[i] = log_sum
            if log:
                continue
            lse = m_row + log_sum
            if not -np.inf < lse < np.inf:  # as in the cross-entropy kernel
                o[:] = np.nan
                continue
            for c in range(n_chunks):
                lo = c * CHUNK
                oc = o[lo : min(lo + CHUNK, n_classes)]
                if chunk_maxes[c] == -np.inf:
                    oc[:] = 0
                    continue
                a = cast(o, chunk_scale(chunk_maxes[c], m_row, s_row))
                for j in range(oc.shape[0]):
                    oc[j] = oc[j] * a

    return _named(rows_, "softmax", log=log)


@strict  # no fast-math: reassociation would make it x - (m + log_sum)
def log_softmax_rows(lo_row, hi_row, x, row_max, row_log_sum, out):
    """out = (x - max) - log_sum: x - max is exact and log_sum small, where x - lse with an lse
    rounded to x's precision would cost up to half an ulp of the logits (5e-4 at |x| ~ 1e4 in float32)."""
    for i in range(lo_row, hi_row):
        m = cast(out, row_max[i])
        log_sum = cast(out, row_log_sum[i])
        row = x[i]
        o = out[i]
        for j in range(row.shape[0]):
            o[j] = (widen(row[j]) - m) - log_sum


@strict
def bce_rows(lo, hi, p, y, w, loss, grad):
    want_grad = grad.shape[0] > 0
    for i in range(lo, hi):
        loss_i, grad_i = bce(np.float64(widen(p[i])), np.float64(y[i]), np.float64(w[i]))
        loss[i] = loss_i
        if want_grad:
            grad[i] = grad_i


@strict
def bce_logits_rows(lo, hi, x, y, w, pos_weight, loss, grad):
    want_grad = grad.shape[0] > 0
    has_pw = pos_weight.shape[0] > 0
    for i in range(lo, hi):
        pw = np.float64(pos_weight[i]) if has_pw else 1.0
        loss_i, grad_i = bce_logits(np.float64(widen(x[i])), np.float64(y[i]), np.float64(w[i]), pw)
        loss[i] = loss_i
        if want_grad:
            grad[i] = grad_i
