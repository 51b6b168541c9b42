"""The shared backend fixture.

On a machine without a GPU the GPU backends run through their frameworks' CPU interpreters:
``TRITON_INTERPRET=1`` and ``NUMBA_ENABLE_CUDASIM=1`` must be set before triton and numba are
imported, which is why this happens here, at the top, before gpuxent is imported.
"""

import os
from dataclasses import dataclass

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
    import interpreters  # noqa: E402

    interpreters.speed_up()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gpuxent import backends  # noqa: E402

# Tolerances per dtype, in one place: (rtol, atol) for losses and gradients against a float64 reference.
TOL = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


@dataclass(frozen=True)
class BackendCase:
    name: str
    device: torch.device
    interpreted: bool  # a CPU interpreter of a GPU framework: slow, keep shapes small

    def __str__(self):
        return self.name

    def tensor(self, a, **kw):
        return torch.as_tensor(a, **kw).to(self.device)


def _cases():
    out = []
    for name, spec in backends.REGISTRY.items():
        gpu = "cuda" in spec.devices
        # the torch backend ("*": any device) runs on the GPU where there is one, else on the CPU
        device = torch.device("cuda" if (gpu or "*" in spec.devices) and HAS_CUDA else "cpu")
        ok, why = backends.status()[name]
        marks = [] if ok else [pytest.mark.skip(reason=f"{name}: {why}")]
        out.append(pytest.param(BackendCase(name, device, gpu and not HAS_CUDA), id=name, marks=marks))
    return out


@pytest.fixture(params=_cases())
def backend(request) -> BackendCase:
    return request.param


@pytest.fixture
def rng():
    """A fresh generator per test, seeded from the OS: every run draws new inputs.

    ``GPUXENT_TEST_SEED=<seed>`` replays a failure with the seed its output printed.
    """
    seed = int(os.environ.get("GPUXENT_TEST_SEED") or np.random.SeedSequence().entropy % (2**32))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


# The modules that take longest, longest first (each about a minute or more: the GPU compile audit, gpu_check's
# dry run of every step, the kernels on the interpreters and numba's first compile of each variant). Under
# ``-n auto --dist loadfile`` a worker takes the next module when it is done with one, so the short modules
# fill the end of the run instead of one worker finishing a long one alone. pytest-xdist would order the
# modules by their number of tests (``loadscopereorder``): the order here replaces it.
LONG_MODULES = (
    "test_gpu_check.py", "test_gpu_audit.py", "test_cross_entropy.py", "test_stats.py", "test_triton.py",
    "test_concurrency.py", "test_distillation.py", "test_vocab_parallel_kernels.py", "test_post_training.py",
    "test_cli.py", "test_linear.py",
)  # fmt: skip


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
