"""The scalar math of the numba backends, written once: plain Python functions that ``numba_cpu``
compiles with ``numba.njit`` and ``numba_cuda`` with ``cuda.jit(device=True)``.

``make(f)`` builds them around constants of the numpy scalar type ``f`` (``np.float64`` for the CPU
kernels' row sums, the compute dtype on CUDA), so that no float64 literal widens float32 arithmetic.
On the CPU they compile WITHOUT fast-math (``numba_cpu.scalar``): numba hands a caller's fast-math
flags down to every callee that sets none, and reassociation turns ``(m - y_t) + log_s`` into
``lse - y_t``, which is 0 for two logits of 1e20 (torch: log 2). Builtin ``max``/``min`` are avoided:
numba's varargs overload of them does not compile for CUDA.
"""

from __future__ import annotations

import math
from types import SimpleNamespace


def make(f) -> SimpleNamespace:
    """The row functions with their constants of type ``f``; see each function's docstring."""
    zero, one, two, neg_inf = f(0), f(1), f(2), f(-math.inf)
    log_floor, tiny = f(-100), f(1e-12)  # torch's BCE clamps each log at -100 and p(1-p) at 1e-12

    def merge(m_a, s_a, m_b, s_b):
        """(max, sum of exp(x - max)) of two disjoint parts from theirs; a part of max -inf adds its
        s (0, or NaN for a NaN in it) as it is, and the part holding the max costs no exp."""
        if m_b == neg_inf:
            return m_a, s_a + s_b
        if m_a == neg_inf:
            return m_b, s_a + s_b
        if m_b > m_a:
            return m_b, s_a * math.exp(m_a - m_b) + s_b
        return m_a, s_a + s_b * math.exp(m_b - m_a)

    def loss_and_coef(m, log_s, y_t, w_t, a, b, prob, keep, eps_r, smoothing, z_loss):
        """A kept row's loss and the coefficient of ``p_j`` in its gradient, from its max ``m``, the log
        of its sum of ``exp(y - m)``, the (soft-capped) target logit ``y_t`` and weight ``w_t``, and
        ``a = sum_j w_j q'_j y_j``, ``b = sum_j w_j q'_j`` with ``q' = keep q + eps_r`` (probability
        targets) or ``a = sum_j w_j y_j``, ``b = sum_j w_j`` (class targets with ``smoothing``).

        The gradient is then ``coef p_j - (target mass)_j``. ``lse - y_t`` is taken as
        ``(m - y_t) + log_s``: exact where an lse rounded to the logits' size would lose half an ulp.
        """
        lse = m + log_s
        if prob:
            loss = b * lse - a
            coef = b
        else:
            loss = keep * w_t * ((m - y_t) + log_s)
            coef = keep * w_t
            if smoothing > zero:
                loss += eps_r * (b * lse - a)
                coef += eps_r * b
        if z_loss > zero:
            loss += z_loss * lse * lse
            coef += two * z_loss * lse
        return loss, coef

    def bce(p, y, w):
        """``(loss, d loss / d p)`` of BCE on a probability, each log clamped at -100 as in torch."""
        log_p = math.log(p) if p > zero else log_floor
        log_1mp = math.log1p(-p) if p < one else log_floor
        log_p = log_p if log_p > log_floor else log_floor
        log_1mp = log_1mp if log_1mp > log_floor else log_floor
        d = (one - p) * p
        return -w * (y * log_p + (one - y) * log_1mp), w * (p - y) / (d if d > tiny else tiny)

    def bce_logits(x, y, w, pw):
        """``(loss, d loss / d x)`` of sigmoid + BCE on a logit, stable for any ``x``; ``pw`` weighs the
        positive term (``pos_weight``, 1 for none)."""
        lw = (pw - one) * y + one
        e = math.exp(-abs(x))  # never overflows
        softplus_neg = (zero if x > zero else -x) + math.log1p(e)  # log(1 + exp(-x))
        sig = one / (one + e) if x >= zero else e / (one + e)
        return w * ((one - y) * x + lw * softplus_neg), w * (lw * sig - pw * y)

    def merge_cross(m_a, s_a, c_a, m_b, s_b, c_b):
        """:func:`merge` of two parts that also carry a cross term ``c = sum exp(x - max) v``, which
        rescales like the sum (distillation: ``v = lead - other`` of the two rows' logits)."""
        if m_b == neg_inf:
            return m_a, s_a + s_b, c_a + c_b
        if m_a == neg_inf:
            return m_b, s_a + s_b, c_a + c_b
        if m_b > m_a:
            f = math.exp(m_a - m_b)
            return m_b, s_a * f + s_b, c_a * f + c_b
        f = math.exp(m_b - m_a)
        return m_a, s_a + s_b * f, c_a + c_b * f

    def kl_from_sums(mu, m_lead, m_other, log_s_lead, log_s_other):
        """``KL(p_lead || p_other)`` of two rows (in the same temperature-scaled units) from ``mu =
        E_lead[lead - other]``, their maxima and the logs of their sums of ``exp(x - max)``. The maxima
        are subtracted first: two logits of 1e20 differ by 0, not by the rounding of their lse."""
        return mu - (m_lead - m_other) - (log_s_lead - log_s_other)

    return SimpleNamespace(
        merge=merge, loss_and_coef=loss_and_coef, bce=bce, bce_logits=bce_logits, merge_cross=merge_cross,
        kl_from_sums=kl_from_sums,
    )  # fmt: skip


# ---- statistics: the entropy of a row, from sums merged like (max, sum of exp)


def make_entropy(f) -> SimpleNamespace:
    """The entropy's row functions with constants of type ``f`` (as :func:`make`)."""
    neg_inf = f(-math.inf)

    def merge_entropy(m_a, s_a, t_a, m_b, s_b, t_b):
        """The entropy sum ``t = sum exp(y - m) (y - m)`` of two disjoint parts merged, as ``merge``
        merges their ``(m, s)``: each part's ``t`` moves to the larger max ``M`` as
        ``exp(m - M) (t + (m - M) s)``. A part of max -inf adds its ``t`` (0) as it is."""
        if m_b == neg_inf or m_a == neg_inf:
            return t_a + t_b
        if m_b > m_a:
            return (t_a + (m_a - m_b) * s_a) * math.exp(m_a - m_b) + t_b
        return t_a + (t_b + (m_b - m_a) * s_b) * math.exp(m_b - m_a)

    def entropy(log_s, s, t):
        """``H = lse - E_p[y] = log s - t / s`` of a row from its sums ``s = sum exp(y - m)`` and
        ``t = sum exp(y - m) (y - m)``: no cancellation between two numbers of the logits' size."""
        return log_s - t / s

    return SimpleNamespace(merge_entropy=merge_entropy, entropy=entropy)


# ---- the online (max, sum of exp) pair, one element at a time (the GPU kernels' per-thread walk)


def make_online(f) -> SimpleNamespace:
    """The running-pair update with constants of type ``f`` (as :func:`make`)."""
    neg_inf = f(-math.inf)

    def push(m, s, y):
        """Add one element ``y`` to the running pair ``(m, s = sum exp(x - m))``: -inf adds nothing, a NaN
        poisons ``s``, and ``+inf`` makes it NaN (``exp(inf - inf)``), a NaN row as in PyTorch."""
        if y > m:
            return y, s * math.exp(m - y) + math.exp(y - y)
        if y != neg_inf:
            s += math.exp(y - m)
        return m, s

    return SimpleNamespace(push=push)
