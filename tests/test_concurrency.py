"""gpuxent from several Python threads at once and in forked children (API.md, Semantics; issue 11),
and the CPU kernels' thread count following ``torch.get_num_threads()``.

Each scenario of ``concurrency_scenarios.py`` runs in a Python process of its own under a time limit:
the failures it guards against kill the process or hang it (a forked child waiting on the parent's
threads or locks), and must fail the test, not pytest.

The threads scenario runs on numba_cpu and numba_cuda. The CUDA simulator is not thread-safe
itself: during a launch it swaps the ``cuda`` global of the module that defines the kernel for its
fake module, so another thread's host code would find ``FakeCUDAModule`` without ``to_device``;
numba_cuda runs one call at a time under it. The Triton interpreter is not thread-safe either (it
patches ``triton.language`` and keeps the grid in global state: ``Did you forget to add
@triton.jit``, ``x >= grid_dim[0]``), so triton is left out here; on a GPU no interpreter runs.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpuxent as gx
from gpuxent import backends
from gpuxent.backends.numba_cpu import runtime

SCENARIOS = Path(__file__).with_name("concurrency_scenarios.py")
# A scenario takes a few seconds; the limit only catches a hang (a cold numba cache compiles first).
TIMEOUT_S = 240


def _run(scenario: str, backend: str = "numba_cpu") -> None:
    env = dict(os.environ)
    # the gpuxent under test, whichever checkout pytest imported it from
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(gx.__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [sys.executable, str(SCENARIOS), scenario, backend],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group: a hang is ended with its forked children
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{scenario} on {backend}: hung for {TIMEOUT_S} s\n{out[-4000:]}")
    assert proc.returncode == 0, f"{scenario} on {backend}: exit status {proc.returncode}\n{out[-4000:]}"


# Each scenario runs before the parent process has called gpuxent, then after.


def test_threads():
    """4 threads call cross_entropy, softmax and both BCEs at once, on small and large inputs."""
    _run("threads")


def test_threads_numba_cuda():
    if not backends.status()["numba_cuda"][0]:
        pytest.skip(f"numba_cuda: {backends.status()['numba_cuda'][1]}")
    _run("threads", backend="numba_cuda")


def test_fork_pool():
    _run("pool")


def test_os_fork():
    _run("fork")


def test_dataloader_fork_workers():
    _run("dataloader")


def test_fork_from_a_parent_using_threads():
    _run("fork_from_threads")


def test_numbas_threading_layer_is_never_started():
    """numba_cpu runs its kernels on threads of its own: numba's parallel layer (TBB or OpenMP, a second
    pool fighting torch's for the cores, and GNU OpenMP kills forked children) never starts."""
    code = (
        "import torch, numba, gpuxent as gx\n"
        "x = torch.randn(512, 1024, requires_grad=True); t = torch.randint(0, 1024, (512,))\n"
        "gx.cross_entropy(x, t).backward(); gx.softmax(x.detach())\n"
        "try:\n    numba.threading_layer()\nexcept ValueError:\n    print('not started')\n"
        "else:\n    print('started')\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(gx.__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["not", "started"], proc.stdout


def _probe(n_rows: int, n_classes: int) -> set:
    """The threads that ran a launch of ``n_rows`` rows: each task (a thread's range of rows) sleeps,
    releasing the GIL, long enough for a worker to wake on a busy machine and take its own (the caller
    runs a task no worker has taken yet)."""
    seen = np.full(n_rows, -1, np.int64)  # poisoned: a row that did not run shows -1

    def rows(lo, hi, out):
        time.sleep(0.1)
        out[lo:hi] = threading.get_ident()

    runtime.launch(rows, n_rows, n_classes, seen)
    assert (seen >= 0).all()
    return set(seen.tolist())


@pytest.fixture
def torch_threads():
    """Set torch's thread count inside a test; the caller's count is restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_torch_set_num_threads_governs_the_cpu_kernels(torch_threads):
    n_classes = 4096
    n_rows = runtime.PARALLEL_MIN_ELEMENTS // n_classes  # 64 rows: the smallest input run on several threads
    torch_threads(1)
    assert _probe(n_rows, n_classes) == {threading.get_ident()}, "torch.set_num_threads(1): the caller only"
    if runtime._CPUS < 2:
        pytest.skip("one CPU: no second thread to ask for")
    torch_threads(2)
    assert len(_probe(n_rows, n_classes)) == 2, "torch.set_num_threads(2): two threads"
    assert _probe(n_rows - 1, n_classes) == {threading.get_ident()}, "a small input runs on the caller"
    torch_threads(runtime._CPUS + 3)
    assert len(_probe(4 * n_rows, n_classes)) <= runtime._CPUS, "capped at the CPUs"


def test_a_workers_error_reaches_the_caller(torch_threads):
    torch_threads(2)

    def rows(lo, hi, out):
        time.sleep(0.1)
        if lo >= 32:
            raise ZeroDivisionError(f"rows {lo}..{hi}")

    with pytest.raises(ZeroDivisionError, match="rows"):
        runtime.launch(rows, 64, 4096, np.zeros(1))


def test_the_callers_thread_count_is_unchanged(torch_threads):
    torch_threads(2)
    x = torch.randn(64, 4096)
    gx.cross_entropy(x, torch.randint(0, 4096, (64,)), backend="numba_cpu")
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("n_rows", [8, 64], ids=["small", "large"])
def test_cross_entropy_runs_on_torchs_thread_count(torch_threads, monkeypatch, n_rows):
    """The real kernel, through the public API: the thread count each launch chose."""
    seen = []
    threads_for = runtime.threads_for

    def spy(*args):
        seen.append(threads_for(*args))
        return seen[-1]

    monkeypatch.setattr(runtime, "threads_for", spy)
    x = torch.randn(n_rows, 4096)  # 64 x 4096 = PARALLEL_MIN_ELEMENTS
    t = torch.randint(0, 4096, (n_rows,))
    expected_threads = []
    for k in (1, min(2, runtime._CPUS)):
        torch_threads(k)
        loss, grad = gx.cross_entropy_and_grad(x, t, backend="numba_cpu")
        expected_threads.append(k if n_rows * 4096 >= runtime.PARALLEL_MIN_ELEMENTS else 1)
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, t)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.double(), x64.grad, rtol=2e-5, atol=2e-6)
    assert seen == expected_threads
