"""The ``torch`` backend: the contract of ``gpuxent.backends`` written in plain torch operations.

It runs on any device torch runs on (CPU, CUDA, MPS, XPU, ...): the reference the kernel backends are
held to, and the fallback where none of them runs. Arithmetic is in the compute dtype (float32 for
half inputs, float64 stays float64) and a half gradient is rounded once, from it, when it is copied
into the caller's buffer (which may be the logits themselves: every read of a block of rows is done
before its gradient is written).

Each formula is written once, as a small function of a block of rows: the row's max and log-sum-exp
(``_lse_parts``), the softcap and its derivative, the cross-entropy loss and the coefficient of
``p_j`` in its gradient (``_loss_and_coef``), the gradient sweep ``scale (coef p_j - mass_j) dy_j``
(``_grad_rows``), the entropy, the divergences' terms (``DIVERGENCES``) and the two BCE losses. The
numerics follow the kernels:

- the loss is taken relative to the row's max, ``lse - y_t = (m - y_t) + log s``, so that logits of
  1e20 lose nothing; ``p_j = exp(y_j - m) / s``;
- a row without a softmax (all -inf, or a NaN or +inf in it) gets a NaN loss and a NaN gradient, as
  in PyTorch; its lse is -inf (a row of -inf) or NaN;
- ignored rows (and rows a distillation leaves out) get 0 and never enter the arithmetic: they are
  replaced by zeros with ``torch.where`` first, and their results selected away with ``torch.where``
  again (never multiplied by a mask: their logits may be NaN or inf);
- a class index outside ``[0, r)`` (where no check ran) is clamped for indexing and gives a NaN row:
  nothing is read out of bounds.

Memory: a block holds a few (rows, r) temporaries of the compute dtype; rows are processed in blocks
of at most ``CHUNK_BYTES`` per temporary, so the backend stays usable as a fallback on big inputs.
"""

from __future__ import annotations

import math

import torch

from . import compute_dtype

NAME = "torch"
# Rows are processed in blocks whose (rows, r) compute-dtype temporaries stay under this many bytes
# each (a block holds a handful of them); elementwise functions in blocks of as many bytes.
CHUNK_BYTES = 256 << 20
NEG_INF = -math.inf


def is_available() -> tuple[bool, str]:
    return True, f"torch {torch.__version__} operations, on any device"


def supports(device: torch.device) -> bool:
    return True


# --------------------------------------------------------------------------- plumbing


def _compute(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    return t.detach().to(dt)


def _row_blocks(n_rows: int, n_cols: int, dt: torch.dtype):
    """``(lo, hi)`` row ranges whose (rows, n_cols) temporaries of ``dt`` stay under ``CHUNK_BYTES``."""
    itemsize = torch.empty((), dtype=dt).element_size()
    step = max(1, CHUNK_BYTES // max(1, n_cols * itemsize))
    for lo in range(0, n_rows, step):
        yield lo, min(n_rows, lo + step)


def _per_row(v, n_rows: int, dt: torch.dtype, device: torch.device, what: str) -> torch.Tensor:
    """``grad_scale`` / ``entropy_scale`` as (N,) in the compute dtype: None (1), a float, or a tensor of
    1 element (expanded, no copy) or N (a factor per row)."""
    if not isinstance(v, torch.Tensor):
        v = torch.full((1,), 1.0 if v is None else float(v), dtype=dt, device=device)
    v = v.detach().reshape(-1)
    if v.numel() not in (1, n_rows):
        raise ValueError(f"{what}: expected 1 or {n_rows} (one per row) elements, got {v.numel()}")
    return v.to(device=device, dtype=dt).expand(n_rows)


def _weights(weight, n_cols: int, dt: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.ones(n_cols, dtype=dt, device=device) if weight is None else _compute(weight, dt)


def _check_grad(grad, like: torch.Tensor) -> None:
    if grad is not None and grad.shape != like.shape:
        raise ValueError(f"grad: expected shape {tuple(like.shape)}, got {tuple(grad.shape)}")


def _blank(x: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The block with its ignored rows replaced by zeros: they never enter the arithmetic."""
    return torch.where(kept[:, None], x, 0.0)


# --------------------------------------------------------------------------- the row formulas


def _softcap(x: torch.Tensor, cap: float):
    """``(y, dy/dx)``: the soft-capped logits ``cap tanh(x / cap)`` and their derivative (None: no cap)."""
    if not cap:
        return x, None
    th = torch.tanh(x / cap)
    return cap * th, 1 - th * th


def _lse_parts(y: torch.Tensor):
    """``(m, log_s, e, s)`` per row (keepdim): the max ``m`` (-inf for an empty row, NaN for a row holding
    a NaN), ``e = exp(y - m)`` and ``s = sum e``. A row of -inf: ``m = -inf``, ``s = 0``; a row holding
    +inf or NaN: ``s`` NaN. So ``lse = m + log_s`` is finite exactly where the row has a softmax."""
    if y.shape[-1] == 0:
        m = y.new_full((y.shape[0], 1), NEG_INF)
    else:
        m = y.amax(-1, keepdim=True)
    e = torch.exp(y - torch.where(m == NEG_INF, 0.0, m))  # a row of -inf: e = 0, not exp(NaN)
    s = e.sum(-1, keepdim=True)
    return m, torch.log(s), e, s


def _entropy(y, m, log_s, e, s):
    """``H = log s - t / s``, ``t = sum e_j (y_j - m)``: no cancellation between numbers of the logits'
    size; a -inf logit (e = 0) adds 0, not 0 * inf."""
    t = torch.where(e > 0, e * (y - m), 0.0).sum(-1, keepdim=True)
    return log_s - t / s


def _loss_and_coef(y, m, log_s, mass_rest, y_t, w_t, eps, z_loss):
    """A row's loss ``sum_j mass_j (lse - y_j) + z_loss lse**2`` and the coefficient ``coef = sum_j mass_j
    + 2 z_loss lse`` of ``p_j`` in its gradient, every ``lse - y_j`` taken as ``(m - y_j) + log_s``.

    ``mass_rest``: the (rows, r) mass beside the target's (probability targets: ``w ((1 - eps) q + eps /
    r)``; class targets: ``w eps / r``, or None without smoothing); ``y_t``, ``w_t``: the target's
    logit and weight (rows, 1) of the class targets, whose mass ``(1 - eps) w_t`` sits at the target
    (None for probability targets)."""
    loss = torch.zeros_like(m)
    coef = torch.zeros_like(m)
    if y_t is not None:
        loss = (1 - eps) * w_t * ((m - y_t) + log_s)
        coef = (1 - eps) * w_t
    if mass_rest is not None:
        b = mass_rest.sum(-1, keepdim=True)
        loss = loss + b * log_s + (mass_rest * (m - y)).sum(-1, keepdim=True)
        coef = coef + b
    if z_loss:
        lse = m + log_s
        loss = loss + z_loss * lse * lse
        coef = coef + 2 * z_loss * lse
    return loss, coef


def _grad_rows(p, coef, mass_rest, t_index, t_mass, scale, dy, entropy_scale=None, ey=None, y=None):
    """``g_j = [scale (coef p_j - mass_j) + entropy_scale p_j (ey - y_j)] dy_j`` of a block (rows, r);
    ``mass_j`` is ``mass_rest`` (or 0) plus ``t_mass`` at column ``t_index`` (class targets: the
    target's ``(1 - eps) w_t``, 0 where the target is elsewhere). The entropy term (``ey = lse - H``)
    is 0 where ``p = 0``, not 0 * inf."""
    g = coef * p
    if mass_rest is not None:
        g = g - mass_rest
    if t_index is not None:
        g = g.scatter_add(1, t_index, -t_mass)
    g = scale[:, None] * g
    if ey is not None:
        g = g + entropy_scale[:, None] * torch.where(p > 0, p * (ey - y), 0.0)
    return g if dy is None else g * dy


def _bce(p, y, w):
    """``(loss, d loss / d p)`` of BCE on probabilities, each log clamped at -100 and ``p (1 - p)`` at
    1e-12, as in torch."""
    log_p = torch.log(p).clamp_min(-100.0)
    log_1mp = torch.log1p(-p).clamp_min(-100.0)
    loss = -w * (y * log_p + (1 - y) * log_1mp)
    return loss, w * (p - y) / ((1 - p) * p).clamp_min(1e-12)


def _bce_logits(x, y, w, pw):
    """``(loss, d loss / d x)`` of sigmoid + BCE on logits, stable for any ``x``; ``pw`` weighs the
    positive term (``pos_weight``; 1 for none)."""
    lw = (pw - 1) * y + 1
    softplus_neg = torch.clamp_min(-x, 0.0) + torch.log1p(torch.exp(-x.abs()))  # log(1 + exp(-x))
    return w * ((1 - y) * x + lw * softplus_neg), w * (lw * torch.sigmoid(x) - pw * y)


# --------------------------------------------------------------------------- cross-entropy


def _class_target(target, kept, r, class_offset=0):
    """``(index, hit)``: the local column of each row's class target, clamped into ``[0, r)`` for
    indexing, and whether it really is there (kept and inside the slice)."""
    local = target - class_offset
    hit = kept & (local >= 0) & (local < r)
    return local.clamp(0, max(r - 1, 0))[:, None], hit[:, None]


def _ce_block(x, target, w, prob, *, ignore_index, eps, z_loss, softcap, scale, want_grad, want_stats):
    """Cross-entropy of a block of rows ``x`` (compute dtype): ``(loss, lse, grad, argmax, entropy)``,
    (rows,) each but the (rows, r) ``grad`` (None unless ``want_grad``); argmax and entropy None
    unless ``want_stats``."""
    n, r = x.shape
    kept = torch.ones(n, dtype=torch.bool, device=x.device) if prob else target != ignore_index
    y, dy = _softcap(_blank(x, kept), softcap)
    m, log_s, e, s = _lse_parts(y)
    if prob:
        mass_rest = w * ((1 - eps) * target + eps / r)
        t_index = y_t = w_t = None
        ok = kept[:, None]
    else:
        mass_rest = w * (eps / r) if eps else None  # (r,): broadcast over the rows
        t_index, ok = _class_target(target, kept, r)  # an index outside [0, r): a NaN row
        y_t, w_t = y.gather(1, t_index), w[t_index]
    loss, coef = _loss_and_coef(y, m, log_s, mass_rest, y_t, w_t, eps, z_loss)
    lse = m + log_s
    good = ok & torch.isfinite(lse)  # a row without a softmax, or a bad index: NaN
    keep = kept[:, None]
    loss = torch.where(keep, torch.where(good, loss, math.nan), 0.0)[:, 0]
    grad = argmax = entropy = None
    if want_grad:
        t_mass = None if prob else (1 - eps) * w_t
        g = _grad_rows(e / s, coef, mass_rest, t_index, t_mass, scale, dy)
        grad = torch.where(keep, torch.where(good, g, math.nan), 0.0)
    if want_stats:
        argmax = torch.where(kept, y.argmax(-1), 0)
        h = _entropy(y, m, log_s, e, s)
        entropy = torch.where(keep, torch.where(torch.isfinite(lse), h, math.nan), 0.0)[:, 0]
    return loss, torch.where(keep, lse, 0.0)[:, 0], grad, argmax, entropy


def cross_entropy(
    logits, target, weight, *, ignore_index, label_smoothing, z_loss, softcap, grad_scale, grad, stats=None
):  # fmt: skip
    """Per-row loss and lse of a (N, r) float tensor (and with ``stats`` the row's argmax and entropy);
    see ``gpuxent.backends`` for the contract."""
    dt = compute_dtype(logits.dtype)
    dev = logits.device
    n, r = logits.shape
    _check_grad(grad, logits)
    prob = target.is_floating_point()
    w = _weights(weight, r, dt, dev)
    scale = _per_row(grad_scale, n, dt, dev, "grad_scale")
    loss = torch.empty(n, dtype=dt, device=dev)
    lse = torch.empty(n, dtype=dt, device=dev)
    for lo, hi in _row_blocks(n, r, dt):
        t = _compute(target[lo:hi], dt) if prob else target[lo:hi].detach().to(torch.int64)
        out = _ce_block(
            _compute(logits[lo:hi], dt), t, w, prob, ignore_index=ignore_index, eps=float(label_smoothing),
            z_loss=float(z_loss), softcap=float(softcap or 0.0), scale=scale[lo:hi], want_grad=grad is not None,
            want_stats=stats is not None,
        )  # fmt: skip
        loss[lo:hi], lse[lo:hi] = out[0], out[1]
        if grad is not None:
            grad[lo:hi].copy_(out[2])  # every read of these rows is done: ``grad`` may be ``logits``
        if stats is not None:
            stats[0][lo:hi].copy_(out[3])
            stats[1][lo:hi].copy_(out[4])
    return loss, lse


# ------------------------------------------------------------ vocab-parallel: row partials and the gradient pass


def row_partials(logits, target, weight, *, ignore_index, softcap, class_offset, smoothing, out):
    """Per-row partials ``(m, s, a, b, c)`` of a slice of the classes into ``out`` (N, 5); see
    ``gpuxent.backends``."""
    dt = compute_dtype(logits.dtype)
    dev = logits.device
    n, r = logits.shape
    prob = target.is_floating_point()
    w = _weights(weight, r, dt, dev)
    empty_row = torch.tensor([NEG_INF, 0.0, 0.0, 0.0, 0.0], dtype=dt, device=dev)
    for lo, hi in _row_blocks(n, r, dt):
        t = _compute(target[lo:hi], dt) if prob else target[lo:hi].detach().to(torch.int64)
        kept = torch.ones(hi - lo, dtype=torch.bool, device=dev) if prob else t != ignore_index
        y, _ = _softcap(_blank(_compute(logits[lo:hi], dt), kept), float(softcap or 0.0))
        m, log_s, e, s = _lse_parts(y)
        if prob:
            mass = w * t
            a = (mass * (y - torch.where(m == NEG_INF, 0.0, m))).sum(-1, keepdim=True)
            b = mass.sum(-1, keepdim=True)
        elif r == 0:
            a = b = torch.zeros_like(m)
        else:
            t_index, hit = _class_target(t, kept, r, class_offset)
            w_t = w[t_index]
            a = torch.where(hit, w_t * (y.gather(1, t_index) - m), 0.0)
            b = torch.where(hit, w_t, 0.0)
        c = (w * y).sum(-1, keepdim=True) if smoothing else torch.zeros_like(m)
        block = torch.cat([m, s, a, b, c], -1)
        out[lo:hi].copy_(torch.where(kept[:, None], block, empty_row))


def cross_entropy_backward(
    logits, target, weight, lse, coef, entropy, *, ignore_index, label_smoothing, n_classes, class_offset, softcap,
    grad_scale, entropy_scale, grad,
):  # fmt: skip
    """The gradient of a slice of the classes from the global lse and coefficient; see ``gpuxent.backends``."""
    dt = compute_dtype(logits.dtype)
    dev = logits.device
    n, r = logits.shape
    _check_grad(grad, logits)
    if n == 0 or r == 0:
        return
    prob = target.is_floating_point()
    eps = float(label_smoothing)
    w = _weights(weight, r, dt, dev)
    scale = _per_row(grad_scale, n, dt, dev, "grad_scale")
    ent_scale = None if entropy is None else _per_row(entropy_scale, n, dt, dev, "entropy_scale")
    for lo, hi in _row_blocks(n, r, dt):
        t = _compute(target[lo:hi], dt) if prob else target[lo:hi].detach().to(torch.int64)
        kept = torch.ones(hi - lo, dtype=torch.bool, device=dev) if prob else t != ignore_index
        y, dy = _softcap(_blank(_compute(logits[lo:hi], dt), kept), float(softcap or 0.0))
        lse_b = _compute(lse[lo:hi], dt)[:, None]
        if prob:
            mass_rest = w * ((1 - eps) * t + eps / n_classes)
            t_index = t_mass = None
        else:
            mass_rest = w * (eps / n_classes) if eps else None
            t_index, hit = _class_target(t, kept, r, class_offset)
            t_mass = torch.where(hit, (1 - eps) * w[t_index], 0.0)
        ey = None if entropy is None else lse_b - _compute(entropy[lo:hi], dt)[:, None]
        g = _grad_rows(
            torch.exp(y - lse_b), _compute(coef[lo:hi], dt)[:, None], mass_rest, t_index, t_mass, scale[lo:hi], dy,
            None if ent_scale is None else ent_scale[lo:hi], ey, y,
        )  # fmt: skip
        g = torch.where(torch.isfinite(lse_b), g, math.nan)  # no softmax: NaN, as torch
        grad[lo:hi].copy_(torch.where(kept[:, None], g, 0.0))


# --------------------------------------------------------------------------- distillation
# A divergence between the student's and the teacher's softmax (of S and T, the logits over tau) is a
# sum over the classes of a term of (log p_s, log p_t); its derivative in S is the log-softmax's
# Jacobian applied to u = d term / d log p_s: g = u - p_s sum(u). DIVERGENCES maps each name to
# ``terms(log_ps, log_pt, beta) -> (term, u)``: every torch-op form of distillation is built from it
# (this reference, the double-backward formula in ``autograd``, the vocab-parallel slices in
# ``distributed``); the kernels hold their own fused forms. A term whose weight p is 0 is 0 (its log
# ratio may be -inf - -inf).


def _p_log_ratio(log_p, log_q):
    """``p (log p - log q)`` elementwise, 0 where ``p`` is 0 (or underflows to 0)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0)


def _kl_terms(log_ps, log_pt, beta):
    """KL(p_t || p_s): ``u = -p_t``, so ``g = p_s - p_t``."""
    return _p_log_ratio(log_pt, log_ps), -log_pt.exp()


def _reverse_kl_terms(log_ps, log_pt, beta):
    """KL(p_s || p_t): ``u = p_s (log p_s - log p_t)`` (the ``p_s`` the derivative of ``p_s`` adds cancels
    in ``u - p_s sum(u)``), so ``g = p_s (d - KL)``."""
    term = _p_log_ratio(log_ps, log_pt)
    return term, term


def _jsd_terms(log_ps, log_pt, beta):
    """``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``:
    ``u = (1 - beta) p_s (log p_s - log m)`` (m's own derivative cancels)."""
    log_m = torch.logaddexp(math.log(beta) + log_pt, math.log1p(-beta) + log_ps)
    r_s = (1 - beta) * _p_log_ratio(log_ps, log_m)
    return beta * _p_log_ratio(log_pt, log_m) + r_s, r_s


DIVERGENCES = {"kl": _kl_terms, "reverse_kl": _reverse_kl_terms, "jsd": _jsd_terms}


def divergence_rows(log_ps, log_pt, divergence: str, beta: float, want_grad: bool):
    """``(div, d div / d S)`` of (N, r) log-softmaxes: per row (keepdim), and per element (None unless
    ``want_grad``); differentiable again."""
    term, u = DIVERGENCES[divergence](log_ps, log_pt, beta)
    div = term.sum(-1, keepdim=True)
    return div, (u - log_ps.exp() * u.sum(-1, keepdim=True) if want_grad else None)


def _distill_block(s_logits, t_logits, kept, divergence, beta, tau, scale, want_grad):
    """``(loss, grad)`` of a block: ``tau**2`` times the divergence per row, and ``scale * tau * d div / d S``
    (None unless ``want_grad``), with S, T the logits over ``tau``; see ``gpuxent.backends``."""
    s, t = _blank(s_logits, kept) / tau, _blank(t_logits, kept) / tau
    m_s, log_ss, _, _ = _lse_parts(s)
    m_t, log_st, _, _ = _lse_parts(t)
    # log p = (z - m) - log s: the maxima first, so two logits of 1e20 differ by 0, not by an lse's rounding
    div, d_div = divergence_rows((s - m_s) - log_ss, (t - m_t) - log_st, divergence, beta, want_grad)
    good = torch.isfinite(m_s + log_ss) & torch.isfinite(m_t + log_st)  # both rows have a softmax
    keep = kept[:, None]
    loss = torch.where(keep, torch.where(good, tau * tau * div, math.nan), 0.0)[:, 0]
    if not want_grad:
        return loss, None
    g = (scale[:, None] * tau) * d_div
    return loss, torch.where(keep, torch.where(good, g, math.nan), 0.0)


def distillation(student, teacher, target, *, divergence, beta, temperature, ignore_index, grad_scale, grad):
    """Per-row tau**2 * divergence of (N, r) student and teacher logits; see ``gpuxent.backends``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence: expected one of {tuple(DIVERGENCES)}, got {divergence!r}")
    if teacher.shape != student.shape:
        raise ValueError("teacher: expected the student's shape")
    dt = compute_dtype(student.dtype)
    dev = student.device
    n, r = student.shape
    _check_grad(grad, student)
    scale = _per_row(grad_scale, n, dt, dev, "grad_scale")
    loss = torch.empty(n, dtype=dt, device=dev)
    for lo, hi in _row_blocks(n, r, dt):
        if target is None:
            kept = torch.ones(hi - lo, dtype=torch.bool, device=dev)
        else:
            kept = target[lo:hi].detach() != ignore_index
        loss[lo:hi], g = _distill_block(
            _compute(student[lo:hi], dt), _compute(teacher[lo:hi], dt), kept, divergence, float(beta),
            float(temperature), scale[lo:hi], grad is not None,
        )  # fmt: skip
        if grad is not None:
            grad[lo:hi].copy_(g)
    return loss


# --------------------------------------------------------------------------- softmax and BCE


def softmax(x, *, log):
    """(N, r) -> (N, r) row softmax or log-softmax in the compute dtype (NaN rows where there is no
    softmax, as in torch)."""
    dt = compute_dtype(x.dtype)
    n, r = x.shape
    out = torch.empty((n, r), dtype=dt, device=x.device)
    for lo, hi in _row_blocks(n, r, dt):
        y = _compute(x[lo:hi], dt)
        m, log_s, e, s = _lse_parts(y)
        v = (y - m) - log_s if log else e / s  # (y - m) - log s: no lse rounded to the logits' size
        out[lo:hi] = torch.where(torch.isfinite(m + log_s), v, math.nan)
    return out


def _elementwise(fn, x, inputs, grad):
    """``fn`` over flat blocks of ``x`` and its same-shape ``inputs`` (None: 1) in the compute dtype; the
    flat loss, and the derivative into ``grad`` when given."""
    dt = compute_dtype(x.dtype)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    others = [None if v is None else v.detach().reshape(-1) for v in inputs]
    loss = torch.empty(n, dtype=dt, device=x.device)
    g_out = None
    if grad is not None:
        if grad.numel() != n:
            raise ValueError(f"grad: expected {n} elements, got {grad.numel()}")
        g_out = grad.view(-1) if grad.is_contiguous() else torch.empty(n, dtype=grad.dtype, device=grad.device)
    step = max(1, CHUNK_BYTES // torch.empty((), dtype=dt).element_size())
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        args = [1.0 if v is None else _compute(v[lo:hi], dt) for v in others]
        loss[lo:hi], g = fn(_compute(flat[lo:hi], dt), *args)
        if g_out is not None:
            g_out[lo:hi].copy_(g)
    if g_out is not None and not grad.is_contiguous():
        grad.copy_(g_out.view(grad.shape))
    return loss


def binary_cross_entropy(probs, target, weight, *, grad):
    """Elementwise BCE on probabilities, flat, in the compute dtype; ``grad`` gets ``weight * d loss / d p``."""
    return _elementwise(_bce, probs, (target, weight), grad)


def binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, grad):
    """Elementwise sigmoid + BCE, flat, in the compute dtype; ``grad`` gets ``weight * d loss / d x``."""
    return _elementwise(_bce_logits, logits, (target, weight, pos_weight), grad)
