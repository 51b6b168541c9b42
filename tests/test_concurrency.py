"""gpuxent from several Python threads at once and in forked children (API.md, Semantics; issue 11),
and the numba thread count following ``torch.get_num_threads()``.

Each scenario of ``concurrency_scenarios.py`` runs in a Python process of its own under a time limit:
the failures it guards against kill the process (workqueue aborts on two threads in parallel regions
at once, GNU OpenMP kills a forked child) or hang it, and must fail the test, not pytest.

The threads scenario runs on numba_cpu and numba_cuda. The CUDA simulator is not thread-safe
itself: during a launch it swaps the ``cuda`` global of the module that defines the kernel for its
fake module, so another thread's host code would find ``FakeCUDAModule`` without ``to_device``;
numba_cuda runs one call at a time under it. The Triton interpreter is not thread-safe either (it
patches ``triton.language`` and keeps the grid in global state: ``Did you forget to add
@triton.jit``, ``x >= grid_dim[0]``), so triton is left out here; on a GPU no interpreter runs.
"""

import importlib.metadata
import os
import signal
import subprocess
import sys
from pathlib import Path

import numba as nb
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gpuxent as gx
from gpuxent import backends
from gpuxent.backends import numba_cpu

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


def test_threading_layer_is_fork_and_thread_safe():
    """tbb where the ``tbb`` wheel (a dependency on x86-64) is installed; else, on Linux, workqueue."""
    assert numba_cpu.THREADING_LAYER == nb.threading_layer()
    if os.environ.get("NUMBA_THREADING_LAYER"):
        pytest.skip("the threading layer was chosen by NUMBA_THREADING_LAYER")
    try:
        importlib.metadata.version("tbb")
    except importlib.metadata.PackageNotFoundError:
        assert numba_cpu.THREADING_LAYER in (("workqueue",) if sys.platform == "linux" else ("omp", "workqueue"))
    else:
        assert numba_cpu.THREADING_LAYER == "tbb"


@nb.njit(parallel=True)
def _thread_probe(out):
    """Each iteration records the thread count in effect and the thread that ran it."""
    for i in nb.prange(out.shape[0]):
        out[i, 0] = nb.get_num_threads()
        out[i, 1] = nb.get_thread_id()


def _probe(n_elements: int) -> np.ndarray:
    out = np.full((4096, 2), -1, np.int64)  # poisoned: an iteration that did not run shows -1
    numba_cpu._launch(_thread_probe, n_elements, out)
    assert (out >= 0).all()
    return out


@pytest.fixture
def torch_threads():
    """Set torch's thread count inside a test; the caller's count and numba's are restored after."""
    torch_before, numba_before = torch.get_num_threads(), nb.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(torch_before)
    nb.set_num_threads(numba_before)


def test_torch_set_num_threads_governs_numba(torch_threads):
    large = numba_cpu.PARALLEL_MIN_ELEMENTS
    torch_threads(1)
    out = _probe(large)
    assert (out[:, 0] == 1).all() and (out[:, 1] == 0).all(), "torch.set_num_threads(1): one numba thread"
    if nb.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: no second thread to ask for")
    torch_threads(2)
    assert (_probe(large)[:, 0] == 2).all(), "torch.set_num_threads(2): two numba threads"
    assert (_probe(large - 1)[:, 0] == 1).all(), "a small input runs on one thread"
    torch_threads(nb.config.NUMBA_NUM_THREADS + 3)
    assert (_probe(large)[:, 0] == nb.config.NUMBA_NUM_THREADS).all(), "capped at numba's pool"


def test_the_caller_keeps_its_numba_thread_count(torch_threads):
    torch_threads(1)
    nb.set_num_threads(nb.config.NUMBA_NUM_THREADS)
    _probe(numba_cpu.PARALLEL_MIN_ELEMENTS)
    assert nb.get_num_threads() == nb.config.NUMBA_NUM_THREADS


@pytest.mark.parametrize("n_rows", [8, 64], ids=["small", "large"])
def test_cross_entropy_runs_on_torchs_thread_count(torch_threads, monkeypatch, n_rows):
    """The real kernel, through the public API: the thread count in effect when it starts."""
    seen = []
    kernel = numba_cpu._ce_kernel

    def spy(*args):
        seen.append(nb.get_num_threads())  # the calling thread's count: the one its parallel region gets
        return kernel(*args)

    monkeypatch.setattr(numba_cpu, "_ce_kernel", spy)
    x = torch.randn(n_rows, 4096)  # 64 x 4096 = PARALLEL_MIN_ELEMENTS
    t = torch.randint(0, 4096, (n_rows,))
    expected_threads = []
    for k in (1, min(2, nb.config.NUMBA_NUM_THREADS)):
        torch_threads(k)
        loss, grad = gx.cross_entropy_and_grad(x, t, backend="numba_cpu")
        expected_threads.append(k if n_rows * 4096 >= numba_cpu.PARALLEL_MIN_ELEMENTS else 1)
        x64 = x.double().requires_grad_()
        ref = F.cross_entropy(x64, t)
        ref.backward()
        torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(grad.double(), x64.grad, rtol=2e-5, atol=2e-6)
    assert seen == expected_threads


EXIT_SCRIPT = """
import os, torch, gpuxent as gx
from gpuxent.backends import numba_cpu as nc
torch.set_num_threads(2)
x = torch.randn(1024, 1024); t = torch.randint(0, 1024, (1024,))
gx.cross_entropy(x, t)  # 1M elements: a parallel region, TBB's workers started
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
nc._join_tbb_workers()  # what runs at exit
after = threads()
loss = gx.cross_entropy(x, t)  # the pool starts again
ref = torch.nn.functional.cross_entropy(x.double(), t)
assert abs(float(loss) - float(ref)) < 1e-5, (float(loss), float(ref))
print(before, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc/self/task")
def test_tbb_workers_are_joined_at_exit():
    """numba never shuts its TBB pool down, and workers still running while the C++ runtime tears down
    aborted about one torchrun worker in five to ten ("terminate called without an active exception",
    with gloo's threads alive too). The exit hook numba_cpu registers joins them; calls after it work."""
    if numba_cpu.THREADING_LAYER != "tbb":
        pytest.skip(f"the threading layer is {numba_cpu.THREADING_LAYER}, not tbb")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(gx.__file__).parents[1]), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = map(int, proc.stdout.split())
    assert after < before, (before, after)
