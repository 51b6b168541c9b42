"""Fused distillation divergences on the CPU.

Per row, with S = student / tau, T = teacher / tau, p_s = softmax(S), p_t = softmax(T):
  kl          KL(p_t || p_s) = sum p_t (T - S) - lse_T + lse_S       d/dS = p_s - p_t
  reverse_kl  KL(p_s || p_t) = sum p_s (S - T) - lse_S + lse_T       d/dS = p_s (S - T - mu), mu = sum p_s (S - T)
  jsd         beta KL(p_t || m) + (1 - beta) KL(p_s || m)            d/dS = (1 - beta) p_s (R - K)
              with m = beta p_t + (1 - beta) p_s, R = log p_s - log m, K = sum p_s R = KL(p_s || m)
times tau**2 (the loss) and tau**2 / tau (the gradient in the logits).

Sweep 1 reads both rows from memory, chunk by chunk: each chunk's maxima, exp((x - chunk max) / tau)
of both rows kept in two compute-dtype row buffers, their sums and the cross term
sum exp(lead - max) (lead - other) (lead: the teacher for kl, the student for reverse_kl), merged
into the row's by online rescaling (``rowmath.merge_cross``). kl and reverse_kl have their loss
then; a second sweep over the buffers (no exp) writes the gradient. jsd needs log m, hence both lse
first: its second sweep turns the buffers into p_s and R (log m = logaddexp(log beta + log p_t,
log(1 - beta) + log p_s): one exp and one vectorised log1p per element, no log of a tiny m) and
sums the loss and K; a third writes the gradient. The later sweeps touch the row's buffers, still
in L2 (2 x r x 4 bytes), and the student row for reverse_kl.

Byte model, forward+backward: read 2*N*r logits, write N*r gradient, read N targets, write N losses.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .runtime import CHUNK, kernel, strict
from .simd import cast, compute_buffer, exp_neg, log1p_unit, narrow, widen
from .xent import _ROW, _named, chunk_max, chunk_scale, merge

KL, REVERSE_KL, JSD = 0, 1, 2
DIVERGENCE_CODES = {"kl": KL, "reverse_kl": REVERSE_KL, "jsd": JSD}
merge_cross, kl_from_sums = strict(_ROW.merge_cross), strict(_ROW.kl_from_sums)


@kernel
def _pair_exps(lead, other, m_lead, m_other, inv_tau, e_lead, e_other, cross):
    """One chunk of both rows: ``e = exp((x - m) / tau)`` of each into ``e_lead`` and ``e_other``;
    returns their sums and, when ``cross``, ``sum e_lead (lead - other)`` (a term with ``e_lead`` = 0
    is 0: a -inf logit there gives no NaN)."""
    zero = cast(e_lead, 0)
    ml = m_lead if m_lead > -np.inf else zero  # a chunk of -inf: its exps are 0
    mo = m_other if m_other > -np.inf else zero
    s_lead = zero
    s_other = zero
    c = zero
    if cross:
        for j in range(lead.shape[0]):
            x_lead = widen(lead[j])
            x_other = widen(other[j])
            el = exp_neg((x_lead - ml) * inv_tau)
            eo = exp_neg((x_other - mo) * inv_tau)
            e_lead[j] = el
            e_other[j] = eo
            s_lead += el
            s_other += eo
            v = el * (x_lead - x_other)
            c += v if el > zero else zero
    else:
        for j in range(lead.shape[0]):
            el = exp_neg((widen(lead[j]) - ml) * inv_tau)
            eo = exp_neg((widen(other[j]) - mo) * inv_tau)
            e_lead[j] = el
            e_other[j] = eo
            s_lead += el
            s_other += eo
    return np.float64(s_lead), np.float64(s_other), np.float64(c)


@kernel
def _jsd_chunk(s, t, es, et, shift_s, shift_t, a_s, a_t, k_s, k_t, inv_tau, beta, log_beta, log_1mbeta):
    """jsd's second sweep over a chunk: turns ``es`` into p_s and ``et`` into R = log p_s - log m;
    returns (sum p_t (log p_t - log m), sum p_s R). ``log p = (x - shift) / tau + k``, ``p = a e``."""
    zero = cast(es, 0)
    sum_t = zero
    sum_s = zero
    for j in range(s.shape[0]):
        ls = (widen(s[j]) - shift_s) * inv_tau + k_s
        lt = (widen(t[j]) - shift_t) * inv_tau + k_t
        ps = a_s * es[j]
        pt = a_t * et[j]
        u = log_beta + lt
        v = log_1mbeta + ls
        hi = u if u > v else v
        lo = v if u > v else u
        log_m = hi + log1p_unit(exp_neg(lo - hi))
        r = ls - log_m
        vt = pt * (lt - log_m)
        vs = ps * r
        sum_t += vt if pt > zero else zero
        sum_s += vs if ps > zero else zero
        es[j] = ps
        et[j] = r
    return np.float64(sum_t), np.float64(sum_s)


@functools.cache
def rows(divergence: int, grad: bool):
    """The distillation kernel of one divergence, with or without the gradient: ``rows(lo, hi, ...)``
    writes tau**2 times the divergence of rows ``lo .. hi - 1`` (0 for a row whose target is
    ``ignore_index``), and ``grad_scale * tau * d div / d S`` into their gradient."""

    is_kl, is_rkl, is_jsd = divergence == KL, divergence == REVERSE_KL, divergence == JSD

    @kernel
    def distill_rows(
        lo_row, hi_row, student, teacher, target, has_target, ignore_index, tau, beta, grad_scale, grad_out, loss
    ):  # fmt: skip
        n_classes = student.shape[1]
        n_chunks = (n_classes + CHUNK - 1) // CHUNK
        per_row = grad_scale.shape[0] > 1
        inv_tau = 1 / tau
        es = compute_buffer(student, n_classes)
        et = compute_buffer(student, n_classes)
        cms = np.empty(n_chunks, np.float64)
        cmt = np.empty(n_chunks, np.float64)
        inv = cast(es, inv_tau)
        for i in range(lo_row, hi_row):
            g = grad_out[i if grad else 0]
            if has_target and target[i] == ignore_index:  # left out: 0, not read
                if grad:
                    g[:] = narrow(g, 0)
                loss[i] = 0.0
                continue
            s = student[i]
            t = teacher[i]
            m_s = -np.inf
            m_t = -np.inf
            sum_s = 0.0
            sum_t = 0.0
            cross = 0.0
            for c in range(n_chunks):
                lo = c * CHUNK
                hi = min(lo + CHUNK, n_classes)
                ms = chunk_max(s[lo:hi])
                mt = chunk_max(t[lo:hi])
                cms[c] = np.float64(ms) * inv_tau
                cmt[c] = np.float64(mt) * inv_tau
                if is_kl:
                    st_c, ss_c, cr = _pair_exps(t[lo:hi], s[lo:hi], mt, ms, inv, et[lo:hi], es[lo:hi], True)
                    m_t, sum_t, cross = merge_cross(m_t, sum_t, cross, cmt[c], st_c, cr)
                    m_s, sum_s = merge(m_s, sum_s, cms[c], ss_c)
                else:
                    ss_c, st_c, cr = _pair_exps(s[lo:hi], t[lo:hi], ms, mt, inv, es[lo:hi], et[lo:hi], is_rkl)
                    m_s, sum_s, cross = merge_cross(m_s, sum_s, cross, cms[c], ss_c, cr)
                    m_t, sum_t = merge(m_t, sum_t, cmt[c], st_c)
            log_ss = math.log(sum_s)
            log_st = math.log(sum_t)
            if not (-np.inf < m_s + log_ss < np.inf and -np.inf < m_t + log_st < np.inf):  # no softmax: NaN
                if grad:
                    g[:] = narrow(g, np.nan)
                loss[i] = np.nan
                continue
            if is_kl:
                mu = inv_tau * cross / sum_t  # sum p_t (T - S)
                div = kl_from_sums(mu, m_t, m_s, log_st, log_ss)
            elif is_rkl:
                mu = inv_tau * cross / sum_s  # sum p_s (S - T)
                div = kl_from_sums(mu, m_s, m_t, log_ss, log_st)
            else:
                log_beta = cast(es, math.log(beta))
                log_1mbeta = cast(es, math.log1p(-beta))
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
                        s[lo:hi], t[lo:hi], es[lo:hi], et[lo:hi], cast(es, shift_s), cast(es, shift_t),
                        cast(es, chunk_scale(cms[c], m_s, sum_s)), cast(es, chunk_scale(cmt[c], m_t, sum_t)),
                        cast(es, k_s), cast(es, k_t), inv, cast(es, beta), log_beta, log_1mbeta,
                    )  # fmt: skip
                    kl_t += d_t
                    kl_s += d_s
                div = beta * kl_t + (1 - beta) * kl_s
                mu = kl_s  # K = KL(p_s || m)
            loss[i] = tau * tau * div
            if not grad:
                continue
            # kl: a_s e_s - a_t e_t; reverse_kl: a_s e_s ((s - t) / tau - mu); jsd: a_s p_s (R - mu),
            # rounded once to g's type
            coef = grad_scale[i if per_row else 0] * tau * ((1 - beta) if is_jsd else 1.0)
            zero = cast(es, 0)
            mu_c = cast(es, mu)
            for c in range(n_chunks):
                lo = c * CHUNK
                hi = min(lo + CHUNK, n_classes)
                if is_jsd:  # es already holds p_s
                    a_s = cast(es, coef)
                else:
                    a_s = cast(es, coef * chunk_scale(cms[c], m_s, sum_s))
                a_t = cast(es, coef * chunk_scale(cmt[c], m_t, sum_t))
                sc, tc, esc, etc, gc = s[lo:hi], t[lo:hi], es[lo:hi], et[lo:hi], g[lo:hi]
                if is_kl:
                    for j in range(gc.shape[0]):
                        gc[j] = narrow(gc, a_s * esc[j] - a_t * etc[j])
                elif is_rkl:
                    for j in range(gc.shape[0]):
                        e = esc[j]
                        v = (a_s * e) * ((widen(sc[j]) - widen(tc[j])) * inv - mu_c)
                        gc[j] = narrow(gc, v if e > zero else zero)
                else:
                    for j in range(gc.shape[0]):
                        e = esc[j]
                        v = (a_s * e) * (etc[j] - mu_c)
                        gc[j] = narrow(gc, v if e > zero else zero)

    name = {KL: "kl", REVERSE_KL: "reverse_kl", JSD: "jsd"}[divergence]
    return _named(distill_rows, f"distillation {name}", gradient=grad)
