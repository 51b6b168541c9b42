"""The scenarios of ``test_concurrency.py``, each run in a Python process of its own:

    python concurrency_scenarios.py SCENARIO BACKEND

runs the scenario (threads, or forked children, that call gpuxent) twice: before the parent process
has called gpuxent, and after. It exits 0 once every result of every thread and child matched
float64 PyTorch (loss and gradient of the cross-entropy and of both BCEs, and the softmax); a
mismatch raises, and a crash or a hang is caught by the caller's time limit.
"""

import contextlib
import multiprocessing
import os
import sys
import threading
import traceback

import numpy as np
import torch
import torch.nn.functional as F

import gpuxent as gx
from gpuxent.backends.numba_cpu import runtime

INTERPRETED = {"triton", "numba_cuda"}  # CPU interpreters of GPU kernels: slow, keep shapes tiny
# numba_cpu takes its parallel path from 4096 elements here (2^18 in production), so that the torch
# references stay cheap: one input below (a one-thread call) and one above, of 3 row tasks
runtime.PARALLEL_MIN_ELEMENTS = 1 << 12
SHAPES = {"numba_cpu": ((8, 100), (48, 300))}
TINY = ((4, 33),)


def _one_torch_thread_in_children() -> None:
    """torch's own OpenMP pool hangs in a forked child once the parent has used it (which is why
    DataLoader workers run torch on one thread): forked children of a parent that ran torch do the same."""
    os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _close(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=2e-6, msg=lambda m: f"{what}: {m}")


def check(backend: str, seed: int) -> int:
    """Cross-entropy (fwd+bwd), softmax and both BCEs (autograd) on fresh inputs of every shape,
    against float64 torch; returns the seed."""
    rng = np.random.default_rng(seed)
    for n, r in SHAPES.get(backend, TINY):
        x = torch.from_numpy(rng.standard_normal((n, r), dtype=np.float32) * 3)
        t = torch.from_numpy(rng.integers(0, r, n))
        loss, grad = gx.cross_entropy_and_grad(x, t, backend=backend)
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, t)
        ref.backward()
        _close(loss, ref.detach(), "cross_entropy loss")
        _close(grad, x64.grad, "cross_entropy grad")
        _close(gx.softmax(x, backend=backend), torch.softmax(x.double(), -1), "softmax")

        y = torch.from_numpy(rng.integers(0, 2, (n, r)).astype(np.float32))
        p = torch.from_numpy(rng.uniform(0.01, 0.99, (n, r)).astype(np.float32)).requires_grad_()
        for fn, ref_fn, v in (
            (gx.binary_cross_entropy, F.binary_cross_entropy, p),
            (gx.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x.clone().requires_grad_()),
        ):
            loss = fn(v, y, backend=backend)
            loss.backward()
            v64 = v.detach().double().requires_grad_()
            ref = ref_fn(v64, y.double())
            ref.backward()
            _close(loss.detach(), ref.detach(), f"{fn.__name__} loss")
            _close(v.grad, v64.grad, f"{fn.__name__} grad")
    return seed


def _in_threads(backend: str, n_threads: int, body) -> None:
    """Run ``body(backend, thread_index)`` in ``n_threads`` threads started together; re-raise a failure."""
    errors = []
    start = threading.Barrier(n_threads)

    def run(i):
        try:
            start.wait()
            body(backend, i)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise AssertionError("a thread failed:\n" + errors[0])


def threads(backend: str) -> None:
    """4 threads call every function at once, 3 times each (an interpreter: once)."""
    n_checks = 1 if backend in INTERPRETED else 3
    _in_threads(backend, 4, lambda b, i: [check(b, 100 * i + k) for k in range(n_checks)])


def _pool_checks(backend: str, seeds) -> None:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.starmap(check, [(backend, s) for s in seeds]) == list(seeds)


def pool(backend: str) -> None:
    """A fork pool of 2 workers runs 4 checks."""
    _pool_checks(backend, range(4))


def _fork_child(body) -> None:
    """os.fork a child that runs ``body()``; fail unless it exits 0."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            body()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"forked child: exit status {os.waitstatus_to_exitcode(status)}"


def fork(backend: str) -> None:
    """Two os.fork children, one after the other, each run a check."""
    _fork_child(lambda: check(backend, 1))
    _fork_child(lambda: check(backend, 2))


class _Checks(torch.utils.data.Dataset):
    def __init__(self, backend):
        self.backend = backend

    def __len__(self):
        return 6

    def __getitem__(self, i):
        return check(self.backend, i)


def dataloader(backend: str) -> None:
    """DataLoader(num_workers=2) with forked workers, each item a check."""
    loader = torch.utils.data.DataLoader(
        _Checks(backend), batch_size=None, num_workers=2, multiprocessing_context="fork", timeout=120
    )
    assert sorted(int(s) for s in loader) == list(range(6))


def _ce_case(backend: str, seed: int):
    """The largest inputs and their float64 torch cross-entropy (loss, grad) and softmax, as numpy
    arrays, computed on one torch thread."""
    rng = np.random.default_rng(seed)
    n, r = SHAPES.get(backend, TINY)[-1]
    x = torch.from_numpy(rng.standard_normal((n, r), dtype=np.float32) * 3)
    t = torch.from_numpy(rng.integers(0, r, n))
    with _torch_threads(1):
        x64 = x.double().requires_grad_()
        loss = F.cross_entropy(x64, t)
        loss.backward()
        return x, t, (loss.item(), x64.grad.numpy(), torch.softmax(x64.detach(), -1).numpy())


def _check_ce_case(backend: str, case) -> None:
    """gpuxent against a ``_ce_case``, compared in numpy: no torch kernel runs (see ``fork_from_threads``)."""
    x, t, (loss, grad, probs) = case
    got_loss, got_grad = gx.cross_entropy_and_grad(x, t, backend=backend)
    np.testing.assert_allclose(got_loss.item(), loss, rtol=2e-5, atol=2e-6, err_msg="cross_entropy loss")
    np.testing.assert_allclose(got_grad.numpy(), grad, rtol=2e-5, atol=2e-6, err_msg="cross_entropy grad")
    np.testing.assert_allclose(gx.softmax(x, backend=backend).numpy(), probs, rtol=2e-5, atol=2e-6, err_msg="softmax")


def fork_from_threads(backend: str) -> None:
    """While 2 threads keep calling, the main thread forks a child and a pool that call too. Before
    the parent's own first call, the children keep torch's thread count, so gpuxent runs its
    worker threads in them as in the threads.

    Only gpuxent computes on several threads (the references run on one torch thread, the
    comparisons in numpy): torch's own OpenMP pool, once used, hangs a forked child. The forks wait
    for each thread's first call: a fork in the middle of a first call copies locks held by the
    other thread (CPython's import of ``torch._dynamo``, numba's compiler) into the child, which
    then hangs, as it would with any library.
    """
    cases = [_ce_case(backend, seed) for seed in range(3)]
    stop = threading.Event()
    warm = threading.Barrier(3)
    errors = []

    def busy(i):
        try:
            _check_ce_case(backend, cases[i])
            warm.wait()
            while not stop.is_set():
                _check_ce_case(backend, cases[i])
        except BaseException:
            errors.append(traceback.format_exc())
            warm.abort()

    workers = [threading.Thread(target=busy, args=(i,)) for i in range(2)]
    for w in workers:
        w.start()
    try:
        warm.wait()
        _fork_child(lambda: _check_ce_case(backend, cases[2]))  # on the main thread, as DataLoader and Pool do
        with multiprocessing.get_context("fork").Pool(2) as pool:  # seeds, not tensors: see _check_seed
            pool.starmap(_check_seed, [(backend, 10), (backend, 11)])
    finally:
        stop.set()
        for w in workers:
            w.join()
    if errors:
        raise AssertionError("a thread failed:\n" + errors[0])


def _check_seed(backend: str, seed: int) -> None:
    # A tensor sent to a pool moves to shared memory, freeing the buffer that another thread may be
    # reading: the child builds its own case.
    _check_ce_case(backend, _ce_case(backend, seed))


SCENARIOS = {f.__name__: f for f in (threads, pool, fork, dataloader, fork_from_threads)}


if __name__ == "__main__":
    name, backend = sys.argv[1:]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":  # the simulator's own costs, as in the test process
        import interpreters

        interpreters.speed_up()
    SCENARIOS[name](backend)  # before the parent has called gpuxent
    _one_torch_thread_in_children()
    check(backend, 12345)
    SCENARIOS[name](backend)  # after
