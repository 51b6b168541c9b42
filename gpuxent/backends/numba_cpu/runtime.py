"""How the CPU kernels run: compilation, the worker threads, output buffers and the host arrays.

**One owner of the cores.** A kernel is a serial ``nogil`` function over a range of rows,
``rows(lo, hi, *args)``; ``launch`` splits the rows into one contiguous range per thread and runs them
on the calling thread plus ``torch.get_num_threads() - 1`` worker threads of its own (one thread below
``PARALLEL_MIN_ELEMENTS``). numba's parallel threading layer is never started, so there is no second
pool (TBB or OpenMP) to fight torch's for the cores, nothing to join at exit, and a forked child (a
DataLoader worker, a fork pool) starts its own workers on its first large call.

**Compile only what a call needs.** A kernel family is a factory of variants, each a closure over a
few flags (probability targets, softcap, statistics, gradient, in place) that numba compiles as
constants: its dead branches are pruned before typing, so a variant holds only its own loops. Each
compiles in a few seconds on first use per dtype and is then loaded from numba's disk cache (the
index keys a closure by its flags). ``gpuxent warmup`` compiles every variant ahead of time.
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import sys
import threading

import numba as nb
import numpy as np
import torch

from .simd import FASTMATH, HALF_BITS

CHUNK = 2048  # classes per chunk: a chunk of logits and its exps stay in L1 between two loops
# Below this many elements a call runs on the calling thread only: waking a worker costs more than
# the work, and it stalls whenever another process holds the other core.
PARALLEL_MIN_ELEMENTS = 1 << 18


def kernel(fn):
    """A kernel or chunk helper: vectorizing fast-math (no nnan/ninf), GIL released, disk-cached."""
    return nb.njit(fastmath=FASTMATH, nogil=True, cache=True)(fn)


def strict(fn):
    """A function compiled in strict IEEE order: an explicit ``fastmath=False``, as numba gives a callee
    that sets none its caller's flags, and reassociation loses the logits' size (``(m - y_t) + log_s``
    became ``lse - y_t``: 0 for two logits of 1e20)."""
    return nb.njit(fastmath=False, nogil=True, cache=True)(fn)


# --------------------------------------------------------------------------- worker threads


class _Job:
    """The tasks ``0 .. n_tasks - 1`` of one call; every thread that runs it takes the next one left
    (a worker that wakes late finds its task done by the caller)."""

    def __init__(self, fn, n_tasks: int):
        self.fn = fn
        self.n_tasks = n_tasks
        self.next = itertools.count()  # next() is atomic: no lock to take a task
        self.done = 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        for i in iter(self.next.__next__, None):
            if i >= self.n_tasks:
                return
            try:
                self.fn(i)
            except BaseException as e:  # noqa: BLE001 - raised again in the calling thread
                self.error = e
            with self.cond:
                self.done += 1
                if self.done == self.n_tasks:
                    self.cond.notify_all()

    def wait(self) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.done == self.n_tasks)
        if self.error is not None:
            raise self.error


class _Workers:
    """Daemon threads, started on demand, each serving a queue of jobs; new ones after a fork."""

    def __init__(self):
        self.lock = threading.Lock()
        self.queues: list = []

    def get(self, n: int) -> list:
        with self.lock:
            while len(self.queues) < n:
                import queue

                q = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(q,), daemon=True, name="gpuxent-cpu").start()
                self.queues.append(q)
            return self.queues[:n]

    @staticmethod
    def _serve(q) -> None:
        while True:
            q.get().run()


_WORKERS = _Workers()
if hasattr(os, "register_at_fork"):  # the child has none of the parent's threads, nor its lock's owner
    os.register_at_fork(after_in_child=lambda: _WORKERS.__init__())

_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for(n_elements: int, n_rows: int) -> int:
    """Threads for a call: torch's thread count (``torch.set_num_threads`` governs the CPU kernels too),
    at most one per row and per CPU, and one for a small input."""
    if n_elements < PARALLEL_MIN_ELEMENTS:
        return 1
    return max(1, min(torch.get_num_threads(), n_rows, _CPUS))


# --------------------------------------------------------------------------- launch

_SEEN: set = set()  # (kernel, dtype) pairs this process has run
COMPILE_NOTICE_S: float | None = 1.0  # None: no notice (``gpuxent warmup``, which compiles on purpose)


def _compile_notice(fn, dtype) -> threading.Timer:
    """A line on stderr if the first call of ``fn`` for ``dtype`` takes over ``COMPILE_NOTICE_S``:
    numba is compiling it (a few seconds; once, then it loads from its disk cache)."""
    cache = nb.config.CACHE_DIR or os.path.join(os.path.dirname(__file__), "__pycache__")
    name = getattr(fn, "variant", None) or getattr(getattr(fn, "py_func", fn), "__name__", "kernel")
    dtype = {np.dtype(np.int16): "float16", np.dtype(np.uint16): "bfloat16"}.get(np.dtype(dtype), dtype)
    msg = (f"gpuxent: compiling the numba_cpu {name} for {dtype} (a few seconds, once per dtype; "
           f"cached in {cache}; `gpuxent warmup` compiles every variant ahead of time)")  # fmt: skip
    timer = threading.Timer(COMPILE_NOTICE_S, lambda: print(msg, file=sys.stderr, flush=True))
    timer.daemon = True
    timer.start()
    return timer


def launch(rows, n_rows: int, n_classes: int, *args) -> None:
    """Run ``rows(lo, hi, *args)`` over ``[0, n_rows)`` on ``threads_for`` threads (the calling thread and
    workers), one contiguous range of rows each.

    One range per thread, as OpenMP's static schedule and ``at::parallel_for`` split: each thread
    first-touches its own stretch of a fresh output (no huge page faulted by two threads) and the
    dispatch is paid once per thread. Tasks of 16 rows handed out in turn were 10-25% slower on a
    fresh gradient (4096 x 32768 bfloat16 forward+backward, 2 threads: 55-63 against 47-49 ms).
    """
    if n_rows == 0:
        return
    key = (rows, args[0].dtype)
    notice = None if key in _SEEN or COMPILE_NOTICE_S is None else _compile_notice(rows, args[0].dtype)
    try:
        threads = threads_for(n_rows * n_classes, n_rows)
        if threads == 1:
            rows(0, n_rows, *args)
            return
        bounds = [n_rows * i // threads for i in range(threads + 1)]
        job = _Job(lambda i: rows(bounds[i], bounds[i + 1], *args), threads)
        for q in _WORKERS.get(threads - 1):
            q.put(job)
        job.run()
        job.wait()
    finally:
        if notice is not None:
            notice.cancel()
            _SEEN.add(key)


# --------------------------------------------------------------------------- host arrays

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


_COMPUTE_DTYPE = {torch.float64: np.float64}  # everything else computes in float32


def compute_dtype(t: torch.Tensor):
    return _COMPUTE_DTYPE.get(t.dtype, np.float32)


def view(t: torch.Tensor) -> np.ndarray:
    """A contiguous numpy array of a CPU tensor (a view when it is contiguous); half precision as its
    bits (see ``simd.HALF_BITS``)."""
    t = t.detach()
    return np.ascontiguousarray((t.view(HALF_BITS[t.dtype]) if t.dtype in HALF_BITS else t).numpy())


def as_array(t: torch.Tensor, dtype) -> np.ndarray:
    """A contiguous numpy array of ``dtype``: a view when the tensor already is one."""
    if t.dtype in HALF_BITS:
        t = t.float()
    return np.ascontiguousarray(t.detach().numpy(), dtype)


def row_factors(v, n_rows: int, what: str = "grad_scale") -> np.ndarray:
    """A per-call factor as the kernels read it: one float64 value, or one per row."""
    if v is None:
        return np.ones(1)
    if not isinstance(v, torch.Tensor):
        return np.full(1, float(v))
    s = as_array(v.reshape(-1), np.float64)
    if s.shape[0] not in (1, n_rows):
        raise ValueError(f"{what}: expected 1 or {n_rows} (one per row) elements, got {s.shape[0]}")
    return s


def check_grad(grad, like: torch.Tensor) -> None:
    if grad is not None and (grad.shape != like.shape or grad.dtype != like.dtype or not grad.is_contiguous()):
        raise ValueError(f"grad: expected a contiguous {tuple(like.shape)} {like.dtype} tensor")


def grad_array(grad, like: torch.Tensor, x: np.ndarray):
    """``(in place, gradient array)`` of an optional gradient buffer: in place when it is the logits'
    memory (the kernel then writes over ``x`` and gets an empty placeholder)."""
    check_grad(grad, like)
    inplace = grad is not None and grad.numel() > 0 and grad.data_ptr() == like.data_ptr()
    if inplace and x.ctypes.data != like.data_ptr():
        raise ValueError("grad: an in-place gradient needs contiguous logits")
    if grad is None or inplace:
        return inplace, np.zeros((1, 0), x.dtype)
    return False, view(grad)
