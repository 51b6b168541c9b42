"""CUDA backend: fused softmax-cross-entropy kernels written with ``numba.cuda.jit``.

A group of ``threads_per_row`` threads (a power of two) owns one row; a block holds one group for
long rows and several for short ones. Each thread walks its row with a stride of
``threads_per_row`` and keeps a running ``(max, sum of exp(x - max))`` pair, merged with the other
threads of its group by a tree reduction in shared memory (``syncthreads`` only: the CUDA simulator
has no warp shuffles). The gradient pass of the same launch reads the row a second time and writes
the gradient, so forward+backward reads the logits twice and writes the gradient once.

Byte model, forward+backward, class targets: read 2*N*r logits, write N*r gradient, read N targets,
write N losses and N lse (probability targets: read N*r probabilities twice more). An ignored row is
not read: its loss and gradient are 0.
With ``stats`` (a kernel specialisation of its own: each row's argmax and entropy, from pass 1 and
reduced with the (max, sum) pair) the same bytes plus 2N written.

Arithmetic runs in the compute dtype (float32, float64 for float64 input): each dtype gets its own
kernels whose constants carry that dtype, so no float64 literal silently widens float32 math.
Row and element offsets are int64. Half inputs are widened to float32 by torch before the launch,
and their gradient comes through a float32 scratch buffer (``_grad_out``).

Data comes as torch tensors: on a GPU they become zero-copy device arrays
(``__cuda_array_interface__``) and kernels run on PyTorch's current stream; under
``NUMBA_ENABLE_CUDASIM=1`` the tensors live on the CPU and are copied into the simulator's arrays.
Tensors on the other device (CPU data on a real GPU, CUDA data under the simulator) are moved there
and the results moved back.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading

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


# --------------------------------------------------------------------------- kernels


@functools.cache
def _kernels(dtype: np.dtype, stats: bool = False):
    """(cross-entropy, softmax, bce, bce-with-logits) kernels computing in ``dtype``; with ``stats``
    the cross-entropy kernel also writes each row's argmax and entropy (a compile-time constant: the
    kernels without it carry none of that code)."""
    STATS = stats
    SM_STATS = MAX_THREADS if stats else 1  # the shared slots of the statistics (none without them)
    BIG = numba.int64(2**62)  # an index past every class: "none yet"
    f = dtype.type
    ZERO, ONE, NEG_INF, NAN = f(0), f(1), f(-math.inf), f(math.nan)
    int64 = numba.int64
    # No builtin max/min in kernels: numba's varargs overload of them does not compile for CUDA.
    acc_t = numba.from_dtype(dtype)  # the numba type of the accumulators and shared slots

    @cuda.jit(device=True)
    def push(m, s, y):
        """Add y to the running pair (m, s = sum exp(x - m)); -inf adds nothing, NaN poisons s."""
        if y > m:  # exp(y - y): 1, or NaN for y = +inf, which makes the row NaN as in PyTorch
            return y, s * math.exp(m - y) + math.exp(y - y)
        if y != NEG_INF:
            s += math.exp(y - m)
        return m, s

    row = rowmath.make(f)  # the row math shared with numba_cpu
    merge = cuda.jit(device=True)(row.merge)
    loss_and_coef = cuda.jit(device=True)(row.loss_and_coef)
    merge_entropy = cuda.jit(device=True)(rowmath.make_entropy(f).merge_entropy)
    entropy = cuda.jit(device=True)(rowmath.make_entropy(f).entropy)
    bce = cuda.jit(device=True)(row.bce)
    bce_logits = cuda.jit(device=True)(row.bce_logits)

    @cuda.jit(device=True)
    def block_reduce(sm_m, sm_s, sm_a, sm_b, sm_st, sm_j, tid, lane, threads_per_row, m, s, a, b, st):
        """Merge (m, s) and sum a, b over the ``threads_per_row`` threads of each row group; with
        ``STATS`` also the statistics ``st = (t, best value, its index, first NaN index)``: ``t`` merged
        with (m, s) by ``merge_entropy``, the argmax by (larger value, then lower index), the first NaN
        by the lower index. (Without ``STATS``, ``sm_st``/``sm_j`` are unused one-slot arrays.)

        Every thread of the block must call it (it holds ``syncthreads``); the group's result comes
        back to all its threads.
        """
        sm_m[tid] = m
        sm_s[tid] = s
        sm_a[tid] = a
        sm_b[tid] = b
        if STATS:
            sm_st[tid, 0] = st[0]
            sm_st[tid, 1] = st[1]
            sm_j[tid, 0] = st[2]
            sm_j[tid, 1] = st[3]
        cuda.syncthreads()
        stride = threads_per_row // 2
        while stride > 0:
            if lane < stride:
                if STATS:
                    o = tid + stride
                    t = merge_entropy(m, s, sm_st[tid, 0], sm_m[o], sm_s[o], sm_st[o, 0])
                    v, j = sm_st[tid, 1], sm_j[tid, 0]
                    if sm_st[o, 1] > v or (sm_st[o, 1] == v and sm_j[o, 0] < j):
                        v, j = sm_st[o, 1], sm_j[o, 0]
                    sm_st[tid, 0] = t
                    sm_st[tid, 1] = v
                    sm_j[tid, 0] = j
                    sm_j[tid, 1] = sm_j[o, 1] if sm_j[o, 1] < sm_j[tid, 1] else sm_j[tid, 1]
                m, s = merge(m, s, sm_m[tid + stride], sm_s[tid + stride])
                a += sm_a[tid + stride]
                b += sm_b[tid + stride]
                sm_m[tid] = m
                sm_s[tid] = s
                sm_a[tid] = a
                sm_b[tid] = b
            cuda.syncthreads()
            stride //= 2
        first = tid - lane
        m, s, a, b = sm_m[first], sm_s[first], sm_a[first], sm_b[first]
        if STATS:
            st = (sm_st[first, 0], sm_st[first, 1], sm_j[first, 0], sm_j[first, 1])
        cuda.syncthreads()  # the slots are rewritten for the next row
        return m, s, a, b, st

    @cuda.jit(device=True)
    def log_sum(m, s):
        # s is 0 only for an all -inf row (no log(0): the simulator's math.log raises on it)
        return NEG_INF if s == ZERO else m + math.log(s)

    @cuda.jit
    def ce_kernel(
        logits, target, probs, weight, grad_scale, grad, loss, lse, argmax, entropy_out,
        ignore_index, smoothing, eps_r, z_loss, softcap, prob, has_weight, want_grad, threads_per_row,
    ):  # fmt: skip
        sm_m = cuda.shared.array(MAX_THREADS, acc_t)
        sm_s = cuda.shared.array(MAX_THREADS, acc_t)
        sm_a = cuda.shared.array(MAX_THREADS, acc_t)
        sm_b = cuda.shared.array(MAX_THREADS, acc_t)
        sm_st = cuda.shared.array((SM_STATS, 2), acc_t)
        sm_j = cuda.shared.array((SM_STATS, 2), int64)
        n_rows = logits.shape[0]
        n_classes = logits.shape[1]
        tid = int64(cuda.threadIdx.x)
        lane = tid % threads_per_row
        rows_per_block = int64(cuda.blockDim.x) // threads_per_row
        keep = ONE - smoothing
        inv_cap = ONE / softcap if softcap > ZERO else ZERO
        per_row_scale = grad_scale.shape[0] > 1
        # Every thread runs the same number of iterations: syncthreads inside must not diverge.
        base = int64(cuda.blockIdx.x) * rows_per_block
        while base < n_rows:
            row = base + tid // threads_per_row
            live = row < n_rows
            kept = live
            t = int64(-1)
            y_t = ZERO
            w_t = ZERO
            if live and not prob:
                t = int64(target[row])
                kept = t != ignore_index
                if kept and (t < 0 or t >= n_classes):  # never read out of bounds: a NaN row instead
                    t = -1
                    y_t = NAN
                    w_t = NAN
                elif kept:  # read before any thread overwrites the row (in-place gradient)
                    y_t = logits[row, t]
                    if softcap > ZERO:
                        y_t = softcap * math.tanh(y_t * inv_cap)
                    w_t = weight[t] if has_weight else ONE

            # pass 1: (max, sum exp) and, for smoothing or probability targets, the weighted sums
            # a = sum_j w_j q'_j y_j and b = sum_j w_j q'_j, with q' = keep * q + eps_r
            # (class targets: a = sum_j w_j y_j, b = sum_j w_j)
            m = NEG_INF
            s = ZERO
            a = ZERO
            b = ZERO
            # statistics: t = sum exp(y - m) (y - m), the best value and its first index, the first NaN
            t_sum, best, best_j, nan_j = ZERO, NEG_INF, BIG, BIG
            if kept:
                for j in range(lane, n_classes, threads_per_row):
                    y = logits[row, j]
                    if softcap > ZERO:
                        y = softcap * math.tanh(y * inv_cap)
                    if STATS:
                        if y != NEG_INF:
                            t_sum = merge_entropy(m, s, t_sum, y, ONE, ZERO)
                        if y != y:
                            nan_j = j if j < nan_j else nan_j
                        elif y > best:  # this thread's j grow: a tie keeps the earlier index
                            best, best_j = y, j
                    m, s = push(m, s, y)
                    w = weight[j] if has_weight else ONE
                    if prob:
                        wq = w * (keep * probs[row, j] + eps_r)
                        a += wq * y
                        b += wq
                    elif smoothing > ZERO:
                        a += w * y
                        b += w
            m, s, a, b, st = block_reduce(
                sm_m, sm_s, sm_a, sm_b, sm_st, sm_j, tid, lane, threads_per_row, m, s, a, b,
                (t_sum, best, best_j, nan_j),
            )  # fmt: skip
            if not live:
                base += int64(cuda.gridDim.x) * rows_per_block
                continue
            # s > 0 unless the row's softmax is NaN in torch: s = 0 for a row of -inf, NaN for a row
            # holding NaN or +inf. There torch's loss is NaN and its gradient NaN on the whole row.
            # An ignored row counts for nothing: loss and gradient 0 (torch's gradient is NaN there
            # too when the row's softmax is, an artefact of multiplying it by 0).
            finite = s > ZERO
            if not kept:
                if lane == 0:
                    loss[row] = ZERO
                    lse[row] = ZERO
                    if STATS:
                        argmax[row] = 0
                        entropy_out[row] = ZERO
                if want_grad:
                    for j in range(lane, n_classes, threads_per_row):
                        grad[row, j] = ZERO
                base += int64(cuda.gridDim.x) * rows_per_block
                continue

            lse_row = log_sum(m, s)
            log_s = math.log(s) if finite else NAN  # (no log(0): the simulator's math.log raises on it)
            # d loss / d y_j = coef_p * p_j - (target mass)_j
            loss_row, coef_p = loss_and_coef(m, log_s, y_t, w_t, a, b, prob, keep, eps_r, smoothing, z_loss)
            if not finite:
                loss_row = NAN
            if lane == 0:
                loss[row] = loss_row
                lse[row] = lse_row
                if STATS:  # torch.argmax: the first NaN, else the first max; 0 for a row of -inf
                    argmax[row] = st[3] if st[3] < BIG else (st[2] if st[2] < BIG else 0)
                    entropy_out[row] = entropy(log_s, s, st[0]) if finite else NAN

            # pass 2: the gradient, scale * (coef_p * p_j - w_j q'_j), times the softcap's tanh'
            if want_grad:
                scale = grad_scale[row] if per_row_scale else grad_scale[0]
                a_p = scale * coef_p
                # p_j = exp((y_j - m) - log s): no rounded lse of the size of m, so p_t - 1 stays
                # accurate when p_t is close to 1
                for j in range(lane, n_classes, threads_per_row):
                    y = logits[row, j]
                    th = ZERO
                    if softcap > ZERO:
                        th = math.tanh(y * inv_cap)
                        y = softcap * th
                    g = ZERO if y == NEG_INF and finite else a_p * math.exp((y - m) - log_s)
                    w = weight[j] if has_weight else ONE
                    if prob:
                        g -= scale * w * (keep * probs[row, j] + eps_r)
                    elif smoothing > ZERO:
                        g -= scale * eps_r * w
                    if j == t:
                        g -= scale * keep * w_t
                    if softcap > ZERO:
                        g *= ONE - th * th
                    grad[row, j] = g
            base += int64(cuda.gridDim.x) * rows_per_block

    @cuda.jit
    def softmax_kernel(x, out, log, threads_per_row):
        sm_m = cuda.shared.array(MAX_THREADS, acc_t)
        sm_s = cuda.shared.array(MAX_THREADS, acc_t)
        sm_a = cuda.shared.array(MAX_THREADS, acc_t)
        sm_b = cuda.shared.array(MAX_THREADS, acc_t)
        n_rows = x.shape[0]
        n_classes = x.shape[1]
        tid = int64(cuda.threadIdx.x)
        lane = tid % threads_per_row
        rows_per_block = int64(cuda.blockDim.x) // threads_per_row
        base = int64(cuda.blockIdx.x) * rows_per_block
        while base < n_rows:
            row = base + tid // threads_per_row
            live = row < n_rows
            m = NEG_INF
            s = ZERO
            if live:
                for j in range(lane, n_classes, threads_per_row):
                    m, s = push(m, s, x[row, j])
            m, s, _, _, _ = block_reduce(
                sm_m, sm_s, sm_a, sm_b, sm_m, sm_m, tid, lane, threads_per_row, m, s, ZERO, ZERO,
                (ZERO, ZERO, int64(0), int64(0)),
            )  # fmt: skip
            if live:
                finite = s > ZERO  # else NaN, as in torch: a row of -inf (s = 0), or holding NaN or +inf
                log_s = math.log(s) if finite else NAN
                for j in range(lane, n_classes, threads_per_row):
                    y = x[row, j]
                    if log:
                        out[row, j] = (y - m) - log_s  # no rounded lse of the size of m
                    else:
                        out[row, j] = ZERO if y == NEG_INF and finite else math.exp((y - m) - log_s)
            base += int64(cuda.gridDim.x) * rows_per_block

    @cuda.jit
    def bce_kernel(p, y, w, loss, grad, has_weight, want_grad):
        start = int64(cuda.blockIdx.x) * int64(cuda.blockDim.x) + int64(cuda.threadIdx.x)
        step = int64(cuda.gridDim.x) * int64(cuda.blockDim.x)
        for i in range(start, p.shape[0], step):
            loss_i, grad_i = bce(p[i], y[i], w[i] if has_weight else ONE)
            loss[i] = loss_i
            if want_grad:
                grad[i] = grad_i

    @cuda.jit
    def bce_logits_kernel(x, y, w, pos_weight, loss, grad, has_weight, has_pos_weight, want_grad):
        start = int64(cuda.blockIdx.x) * int64(cuda.blockDim.x) + int64(cuda.threadIdx.x)
        step = int64(cuda.gridDim.x) * int64(cuda.blockDim.x)
        for i in range(start, x.shape[0], step):
            wi = w[i] if has_weight else ONE
            loss_i, grad_i = bce_logits(x[i], y[i], wi, pos_weight[i] if has_pos_weight else ONE)
            loss[i] = loss_i
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


class _Launch:
    """Kernel arguments made from torch tensors, and the launch on the right device and stream.

    On a GPU a tensor becomes a zero-copy device array. The simulator copies numpy arguments into
    its own arrays anyway (and back after the launch, once per argument, which would break an
    aliased in-place gradient), so there each tensor is copied once here, one array per buffer, and
    ``write_back`` copies the outputs back.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self._arrays: dict[tuple, object] = {}

    def _key(self, t: torch.Tensor) -> tuple:
        return t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype

    def __call__(self, t: torch.Tensor):
        key = self._key(t)
        if key not in self._arrays:
            if SIMULATOR:
                self._arrays[key] = cuda.to_device(np.ascontiguousarray(t.detach().numpy()))
            else:
                with cuda.gpus[self.device.index or 0]:
                    self._arrays[key] = cuda.as_cuda_array(t.detach(), sync=False)
        return self._arrays[key]

    def launch(self, kernel, grid: int, block: int, *args) -> None:
        if SIMULATOR:
            kernel[grid, block](*args)
            return
        with cuda.gpus[self.device.index or 0]:
            stream = cuda.external_stream(torch.cuda.current_stream(self.device).cuda_stream)
            kernel[grid, block, stream](*args)

    def write_back(self, t: torch.Tensor) -> None:
        if SIMULATOR:
            t.copy_(torch.from_numpy(self._arrays[self._key(t)].copy_to_host()).view(t.shape))


# During a launch the simulator swaps this module's ``cuda`` global for its fake module, which
# breaks any other thread's host code here: under it, one call at a time.
_SIMULATOR_LOCK = threading.Lock() if SIMULATOR else contextlib.nullcontext()


def _moved(fn):
    """Run ``fn`` on the kernels' device: input tensors elsewhere are moved there, results moved back.

    ``grad`` stays where it is: ``_grad_out`` writes it from the kernels' device.
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


@contextlib.contextmanager
def _grad_out(args: _Launch, grad: torch.Tensor | None, shape, dt: torch.dtype):
    """The buffer a kernel writes the gradient into, the one place that decides it: ``grad`` itself
    when it is contiguous, in the compute dtype and on the kernels' device; else a compute-dtype
    scratch buffer there, copied into ``grad`` after the launch (rounded once to a half dtype, or
    moved to ``grad``'s device). An in-place gradient of half logits is that case too: the kernel
    reads the widened copy of the logits and writes the scratch buffer."""
    if grad is None:
        yield torch.zeros((1,) * len(shape), dtype=dt, device=args.device)  # never written
        return
    direct = grad.device == args.device and grad.dtype == dt and grad.is_contiguous()
    g = grad.view(shape) if direct else torch.empty(shape, dtype=dt, device=args.device)
    yield g
    args.write_back(g)
    if not direct:
        grad.copy_(g.view(grad.shape))


def _row_scale(grad_scale, n_rows: int, dt: torch.dtype, device: torch.device) -> torch.Tensor:
    """``grad_scale`` as the kernel reads it: (1,) for every row, or (N,) per row, compute dtype."""
    if not isinstance(grad_scale, torch.Tensor):
        return torch.full((1,), 1.0 if grad_scale is None else float(grad_scale), dtype=dt, device=device)
    if grad_scale.numel() not in (1, n_rows):
        raise ValueError(f"grad_scale: {grad_scale.numel()} elements for {n_rows} rows; give 1 or {n_rows}")
    return grad_scale.detach().reshape(-1).to(device=device, dtype=dt)  # stays on the device: no host sync


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
    x = _compute(logits, dt)  # half input: widened copy (numba has no bfloat16)
    prob = target.is_floating_point()
    loss = torch.empty(n_rows, dtype=dt, device=dev)
    lse = torch.empty(n_rows, dtype=dt, device=dev)
    if n_rows == 0:
        return loss, lse
    dummy_f = torch.zeros(1, dtype=dt, device=dev)
    t = torch.zeros(1, dtype=torch.int64, device=dev) if prob else target.detach().to(torch.int64)
    q = _compute(target, dt) if prob else dummy_f.view(1, 1)
    w = dummy_f if weight is None else _compute(weight, dt)
    scale = _row_scale(grad_scale, n_rows, dt, dev)
    tpr, rows_per_block = _row_layout(n_classes)
    args = _Launch(dev)
    stats_out = stats if stats is not None else (t, dummy_f)  # never written without stats
    with _grad_out(args, grad, (n_rows, n_classes), dt) as g:
        args.launch(
            _kernels(np_dt, stats is not None)[0], _grid(n_rows, rows_per_block), tpr * rows_per_block,
            args(x), args(t), args(q), args(w), args(scale), args(g), args(loss), args(lse),
            args(stats_out[0]), args(stats_out[1]),
            int(ignore_index), f(label_smoothing), f(label_smoothing / n_classes), f(z_loss), f(softcap or 0.0),
            bool(prob), weight is not None, grad is not None, tpr,
        )  # fmt: skip
    args.write_back(loss)
    args.write_back(lse)
    if stats is not None:
        args.write_back(stats[0])
        args.write_back(stats[1])
    return loss, lse


@_moved
def softmax(x, *, log):
    """Row softmax (or log-softmax) of a (N, r) tensor, returned in the compute dtype."""
    dt = compute_dtype(x.dtype)
    np_dt = _np_dtype(dt)
    a = _compute(x, dt)
    out = torch.empty(a.shape, dtype=dt, device=a.device)
    n_rows, n_classes = a.shape
    if n_rows == 0:
        return out
    tpr, rows_per_block = _row_layout(n_classes)
    args = _Launch(a.device)
    args.launch(
        _kernels(np_dt)[1], _grid(n_rows, rows_per_block), tpr * rows_per_block, args(a), args(out), bool(log), tpr
    )
    args.write_back(out)
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
    args.write_back(loss)
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
def _vocab_parallel_kernels(dtype: np.dtype):
    """(row partials, gradient pass) kernels computing in ``dtype``."""
    f = dtype.type
    ZERO, ONE, NEG_INF = f(0), f(1), f(-math.inf)
    int64 = numba.int64
    acc_t = numba.from_dtype(dtype)
    row = rowmath.make(f)
    merge = cuda.jit(device=True)(row.merge)

    @cuda.jit(device=True)
    def push(m, s, y):  # as in ``_kernels``
        if y > m:
            return y, s * math.exp(m - y) + math.exp(y - y)
        if y != NEG_INF:
            s += math.exp(y - m)
        return m, s

    @cuda.jit(device=True)
    def group_reduce(sm_m, sm_s, sm_a, tid, lane, threads_per_row, m, s, a):
        """Merge (m, s) and sum a over each row group (every thread of the block calls it)."""
        sm_m[tid] = m
        sm_s[tid] = s
        sm_a[tid] = a
        cuda.syncthreads()
        stride = threads_per_row // 2
        while stride > 0:
            if lane < stride:
                m, s = merge(m, s, sm_m[tid + stride], sm_s[tid + stride])
                a += sm_a[tid + stride]
                sm_m[tid] = m
                sm_s[tid] = s
                sm_a[tid] = a
            cuda.syncthreads()
            stride //= 2
        first = tid - lane
        m, s, a = sm_m[first], sm_s[first], sm_a[first]
        cuda.syncthreads()
        return m, s, a

    @cuda.jit
    def partials_kernel(logits, target, probs, weight, out, ignore_index, class_offset, softcap, prob, has_weight,
                        smoothing, threads_per_row):  # fmt: skip
        sm_m = cuda.shared.array(MAX_THREADS, acc_t)
        sm_s = cuda.shared.array(MAX_THREADS, acc_t)
        sm_a = cuda.shared.array(MAX_THREADS, acc_t)
        n_rows = logits.shape[0]
        n_classes = logits.shape[1]
        tid = int64(cuda.threadIdx.x)
        lane = tid % threads_per_row
        rows_per_block = int64(cuda.blockDim.x) // threads_per_row
        inv_cap = ONE / softcap if softcap > ZERO else ZERO
        base = int64(cuda.blockIdx.x) * rows_per_block
        while base < n_rows:  # every thread runs the same iterations: syncthreads must not diverge
            i = base + tid // threads_per_row
            live = i < n_rows
            kept = live
            t = int64(-1)
            if live and not prob:
                t = int64(target[i])
                kept = t != ignore_index
            m = NEG_INF
            s = a = b = c = ZERO
            if kept:
                for j in range(lane, n_classes, threads_per_row):
                    y = logits[i, j]
                    if softcap > ZERO:
                        y = softcap * math.tanh(y * inv_cap)
                    m, s = push(m, s, y)
                    w = weight[j] if has_weight else ONE
                    if prob:
                        wq = w * probs[i, j]
                        a += wq * y
                        b += wq
                    if smoothing:
                        c += w * y
            m, s, a = group_reduce(sm_m, sm_s, sm_a, tid, lane, threads_per_row, m, s, a)
            _, _, b = group_reduce(sm_m, sm_s, sm_a, tid, lane, threads_per_row, NEG_INF, ZERO, b)
            _, _, c = group_reduce(sm_m, sm_s, sm_a, tid, lane, threads_per_row, NEG_INF, ZERO, c)
            if live and lane == 0:
                local = t - class_offset
                if not prob and kept and 0 <= local < n_classes:
                    y_t = logits[i, local]
                    if softcap > ZERO:
                        y_t = softcap * math.tanh(y_t * inv_cap)
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
            base += int64(cuda.gridDim.x) * rows_per_block

    @cuda.jit
    def backward_kernel(logits, target, probs, weight, lse, coef, entropy, grad_scale, entropy_scale, grad,
                        ignore_index, smoothing, eps_r, class_offset, softcap, prob, has_weight, has_entropy,
                        threads_per_row):  # fmt: skip
        n_rows = logits.shape[0]
        n_classes = logits.shape[1]
        tid = int64(cuda.threadIdx.x)
        lane = tid % threads_per_row
        rows_per_block = int64(cuda.blockDim.x) // threads_per_row
        inv_cap = ONE / softcap if softcap > ZERO else ZERO
        keep = ONE - smoothing
        per_row = grad_scale.shape[0] > 1
        ent_per_row = entropy_scale.shape[0] > 1
        i = int64(cuda.blockIdx.x) * rows_per_block + tid // threads_per_row
        while i < n_rows:  # no syncthreads here: rows loop independently
            t = int64(-1) if prob else int64(target[i])
            if not prob and t == ignore_index:
                for j in range(lane, n_classes, threads_per_row):
                    grad[i, j] = ZERO
            else:
                local = t - class_offset
                scale = grad_scale[i] if per_row else grad_scale[0]
                a = scale * coef[i]
                lse_i = lse[i]
                es = ZERO
                ey = ZERO
                if has_entropy:
                    es = entropy_scale[i] if ent_per_row else entropy_scale[0]
                    ey = lse_i - entropy[i]
                for j in range(lane, n_classes, threads_per_row):
                    y = logits[i, j]
                    th = ZERO
                    if softcap > ZERO:
                        th = math.tanh(y * inv_cap)
                        y = softcap * th
                    p = math.exp(y - lse_i)
                    g = a * p
                    if has_entropy and p > ZERO:  # 0, not 0 * inf, where p = 0
                        g += es * p * (ey - y)
                    w = weight[j] if has_weight else ONE
                    if prob:
                        g -= scale * w * (keep * probs[i, j] + eps_r)
                    else:
                        g -= scale * eps_r * w
                        if j == local:
                            g -= scale * keep * w
                    if softcap > ZERO:
                        g *= ONE - th * th
                    grad[i, j] = g
            i += int64(cuda.gridDim.x) * rows_per_block

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
    x = _compute(logits, dt)
    prob = target.is_floating_point()
    dummy_f = torch.zeros(1, dtype=dt, device=dev)
    t = torch.zeros(1, dtype=torch.int64, device=dev) if prob else target.detach().to(torch.int64)
    q = _compute(target, dt) if prob else dummy_f.view(1, 1)
    w = dummy_f if weight is None else _compute(weight, dt)
    tpr, rows_per_block = _row_layout(max(n_classes, 1))
    args = _Launch(dev)
    o = out if out.device == dev and out.is_contiguous() else torch.empty(out.shape, dtype=dt, device=dev)
    args.launch(
        _vocab_parallel_kernels(np_dt)[0], _grid(n_rows, rows_per_block), tpr * rows_per_block,
        args(x), args(t), args(q), args(w), args(o), int(ignore_index), int(class_offset), np_dt.type(softcap or 0.0),
        bool(prob), weight is not None, bool(smoothing), tpr,
    )  # fmt: skip
    args.write_back(o)
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
    x = _compute(logits, dt)  # half input: widened copy; an in-place gradient goes through the scratch buffer
    prob = target.is_floating_point()
    dummy_f = torch.zeros(1, dtype=dt, device=dev)
    t = torch.zeros(1, dtype=torch.int64, device=dev) if prob else target.detach().to(torch.int64)
    q = _compute(target, dt) if prob else dummy_f.view(1, 1)
    w = dummy_f if weight is None else _compute(weight, dt)
    ent = dummy_f if entropy is None else _compute(entropy, dt)
    es = _row_scale(entropy_scale, n_rows, dt, dev)
    tpr, rows_per_block = _row_layout(n_local)
    args = _Launch(dev)
    with _grad_out(args, grad, (n_rows, n_local), dt) as g:
        args.launch(
            _vocab_parallel_kernels(np_dt)[1], _grid(n_rows, rows_per_block), tpr * rows_per_block,
            args(x), args(t), args(q), args(w), args(_compute(lse, dt)), args(_compute(coef, dt)), args(ent),
            args(_row_scale(grad_scale, n_rows, dt, dev)), args(es), args(g), int(ignore_index), f(label_smoothing),
            f(label_smoothing / n_classes), int(class_offset), f(softcap or 0.0), bool(prob), weight is not None,
            entropy is not None, tpr,
        )  # fmt: skip


# --------------------------------------------------------------------------- distillation
# Per row, S = student / tau, T = teacher / tau (formulas: ``backends/numba_cpu.py``, distillation).
# Pass 1: each thread keeps online (max, sum of exp) of S and T over its strided elements and, for kl /
# reverse_kl, the cross term sum exp(lead - max) (lead - other), merged like the sum
# (``rowmath.merge_cross``), then across the row's threads in shared memory. jsd: pass 2 reads both rows
# again for log m and sums the loss and K = KL(p_s || m). Last pass: reads them again, writes the gradient.
# Byte model, forward+backward: read 2*N*r logits per pass (2 passes, jsd 3), write N*r gradient, read N
# targets, write N losses.

DIVERGENCE_CODES = {"kl": 0, "reverse_kl": 1, "jsd": 2}


@functools.cache
def _distillation_kernel(dtype: np.dtype):
    """The distillation kernel computing in ``dtype``."""
    f = dtype.type
    ZERO, NEG_INF, NAN = f(0), f(-math.inf), f(math.nan)
    KL, REVERSE_KL = 0, 1
    int64 = numba.int64
    acc_t = numba.from_dtype(dtype)
    row = rowmath.make(f)
    merge = cuda.jit(device=True)(row.merge)
    merge_cross = cuda.jit(device=True)(row.merge_cross)
    kl_from_sums = cuda.jit(device=True)(row.kl_from_sums)

    @cuda.jit(device=True)
    def row_reduce(sm_m1, sm_s1, sm_c1, sm_m2, sm_s2, tid, lane, threads_per_row, m1, s1, c1, m2, s2):
        """``merge_cross`` (m1, s1, c1) and ``merge`` (m2, s2) over each row group's threads (every
        thread of the block calls it); the group's result comes back to all its threads."""
        sm_m1[tid] = m1
        sm_s1[tid] = s1
        sm_c1[tid] = c1
        sm_m2[tid] = m2
        sm_s2[tid] = s2
        cuda.syncthreads()
        stride = threads_per_row // 2
        while stride > 0:
            if lane < stride:
                o = tid + stride
                m1, s1, c1 = merge_cross(m1, s1, c1, sm_m1[o], sm_s1[o], sm_c1[o])
                m2, s2 = merge(m2, s2, sm_m2[o], sm_s2[o])
                sm_m1[tid] = m1
                sm_s1[tid] = s1
                sm_c1[tid] = c1
                sm_m2[tid] = m2
                sm_s2[tid] = s2
            cuda.syncthreads()
            stride //= 2
        first = tid - lane
        m1, s1, c1, m2, s2 = sm_m1[first], sm_s1[first], sm_c1[first], sm_m2[first], sm_s2[first]
        cuda.syncthreads()  # the slots are rewritten for the next row
        return m1, s1, c1, m2, s2

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

    @cuda.jit
    def kernel(
        student, teacher, target, grad_scale, grad, loss,
        has_target, ignore_index, divergence, inv_tau, tau, beta, log_beta, log_1mbeta, want_grad, threads_per_row,
    ):  # fmt: skip
        sm_m1 = cuda.shared.array(MAX_THREADS, acc_t)
        sm_s1 = cuda.shared.array(MAX_THREADS, acc_t)
        sm_c1 = cuda.shared.array(MAX_THREADS, acc_t)
        sm_m2 = cuda.shared.array(MAX_THREADS, acc_t)
        sm_s2 = cuda.shared.array(MAX_THREADS, acc_t)
        n_rows = student.shape[0]
        n_classes = student.shape[1]
        tid = int64(cuda.threadIdx.x)
        lane = tid % threads_per_row
        rows_per_block = int64(cuda.blockDim.x) // threads_per_row
        per_row_scale = grad_scale.shape[0] > 1
        lead_is_teacher = divergence == KL
        # Every thread runs the same number of iterations: syncthreads inside must not diverge.
        base = int64(cuda.blockIdx.x) * rows_per_block
        while base < n_rows:
            row = base + tid // threads_per_row
            live = row < n_rows
            kept = live
            if live and has_target:
                kept = target[row] != ignore_index
            # pass 1: (m1, s1, c1) of the lead row (the teacher for kl), (m2, s2) of the other
            m1 = NEG_INF
            s1 = ZERO
            c1 = ZERO
            m2 = NEG_INF
            s2 = ZERO
            if kept:
                for j in range(lane, n_classes, threads_per_row):
                    s = student[row, j] * inv_tau
                    t = teacher[row, j] * inv_tau
                    lead = t if lead_is_teacher else s
                    other = s if lead_is_teacher else t
                    if lead != NEG_INF:  # exp(lead - lead): 1, or NaN for +inf (a NaN row, as torch)
                        cross = lead - other if divergence != 2 else ZERO
                        m1, s1, c1 = merge_cross(m1, s1, c1, lead, math.exp(lead - lead), cross)
                    if other != NEG_INF:
                        m2, s2 = merge(m2, s2, other, math.exp(other - other))
            m1, s1, c1, m2, s2 = row_reduce(
                sm_m1, sm_s1, sm_c1, sm_m2, sm_s2, tid, lane, threads_per_row, m1, s1, c1, m2, s2
            )
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
                kl_t = ZERO
                kl_s = ZERO
                if finite:
                    for j in range(lane, n_classes, threads_per_row):
                        log_ps = (student[row, j] * inv_tau - m_s) - log_ss
                        log_pt = (teacher[row, j] * inv_tau - m_t) - log_st
                        log_m = log_mixture(log_ps, log_pt, log_beta, log_1mbeta)
                        p_s = math.exp(log_ps)
                        p_t = math.exp(log_pt)
                        if p_t > ZERO:
                            kl_t += p_t * (log_pt - log_m)
                        if p_s > ZERO:
                            kl_s += p_s * (log_ps - log_m)
                _, kl_t, kl_s, _, _ = row_reduce(
                    sm_m1, sm_s1, sm_c1, sm_m2, sm_s2, tid, lane, threads_per_row, NEG_INF, kl_t, kl_s, NEG_INF, ZERO
                )
                if finite:
                    div = beta * kl_t + (f(1) - beta) * kl_s
                    mu = kl_s
            if not live:
                base += int64(cuda.gridDim.x) * rows_per_block
                continue
            if lane == 0:
                loss[row] = tau * tau * div if kept else ZERO
            if want_grad:  # last pass: grad = scale * tau * d div / d S
                coef = (grad_scale[row] if per_row_scale else grad_scale[0]) * tau
                if divergence == 2:
                    coef *= f(1) - beta
                for j in range(lane, n_classes, threads_per_row):
                    g = ZERO
                    if kept and not finite:
                        g = NAN
                    elif kept:
                        s = student[row, j] * inv_tau
                        t = teacher[row, j] * inv_tau
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
                    grad[row, j] = g
            base += int64(cuda.gridDim.x) * rows_per_block

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
    # named, not temporaries: _Launch keys its arrays by data pointer, which a freed temporary hands on
    s, t = _compute(student, dt), _compute(teacher, dt)
    tpr, rows_per_block = _row_layout(n_classes)
    args = _Launch(dev)
    with _grad_out(args, grad, (n_rows, n_classes), dt) as g:
        args.launch(
            _distillation_kernel(np_dt), _grid(n_rows, rows_per_block), tpr * rows_per_block,
            args(s), args(t), args(tg), args(scale), args(g), args(loss),
            target is not None, int(ignore_index), DIVERGENCE_CODES[divergence], f(1 / temperature), f(temperature),
            f(beta), f(math.log(beta) if jsd else 0.0), f(math.log1p(-beta) if jsd else 0.0), grad is not None, tpr,
        )  # fmt: skip
    args.write_back(loss)
    return loss
