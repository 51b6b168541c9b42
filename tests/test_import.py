"""``import gpuxent`` (and a CPU call) imports no GPU framework and initialises no CUDA context, so a
parent that imports gpuxent can fork CUDA-using workers."""

import subprocess
import sys

PROBE = """
import sys, torch
import gpuxent as gx
after_import = sorted(m for m in ("triton", "numba.cuda", "numba_cuda", "torch._dynamo") if m in sys.modules)
assert not after_import, f"import gpuxent imported {after_import}"
assert not torch.cuda.is_initialized()
x = torch.randn(4, 5, requires_grad=True)
gx.cross_entropy(x, torch.tensor([0, 1, 2, 3])).backward()
gx.softmax(x.detach()); gx.binary_cross_entropy_with_logits(x.detach(), torch.rand(4, 5))
# (torch's own custom-op machinery imports dynamo, and with it triton, on the first op call: that is
# torch's choice and initialises nothing; gpuxent's GPU backends stay unimported)
gpu = ("gpuxent.backends.triton", "numba.cuda", "gpuxent.backends.numba_cuda")
after_call = sorted(m for m in gpu if m in sys.modules)
assert not after_call, f"a CPU call imported {after_call}"
assert not torch.cuda.is_initialized()
print("ok")
"""


def test_import_touches_no_gpu_framework():
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
