"""GPU compile audit: what the compiler makes of every kernel, without a GPU.

    python benchmarks/gpu_audit.py [--json | --markdown] [--jobs N] [--backend triton|numba_cuda]

Every Triton kernel variant (each dtype, the large-r and small-r paths, each keyword flag) and every
numba_cuda kernel is compiled for a Hopper GPU (sm_90) the way the JIT compiles it at run time on
aligned inputs, and assembled by ptxas. One row per variant:

    kernel backend dtype variant num_warps regs spill_bytes local_bytes shared_bytes
    ld_vector_bits st_vector_bits occupancy f64_ops

- Triton: the backend's own launcher (``gpuxent.backends.triton``) is called on CPU tensors with the
  kernel replaced by a recorder, so the launch configuration (BLOCK, ROWS, num_warps) and every
  constexpr come from the real code. The recorded arguments go through Triton's JIT binder, which
  specialises them as a launch would: 16-byte divisibility of pointers, strides and ``n_classes``
  (``tt.divisibility``), integers equal to 1 folded into constants. Then Triton's real compiler.
- numba_cuda: ``cuda.compile_ptx`` with the argument types a launch on contiguous device arrays
  gets (C layout), and the block size of the backend's launch layout.
- Registers, spills, the stack frame (local memory) and static shared memory come from ``ptxas -v``:
  for Triton the log of its own ptxas run (its flags change the allocation), for numba_cuda a CUDA
  toolkit's ptxas on the PTX (the driver assembles that PTX at load time). Triton's dynamic shared
  memory comes from the kernel's metadata.
- ``ld_vector_bits`` / ``st_vector_bits``: the narrowest global load of the input (logits, x, probs)
  and store of the output (gradient, softmax) inside a loop of the PTX (the hot path), or anywhere
  when the kernel has no loop; a data-flow pass over the PTX ties each access to the kernel
  parameter its address comes from. ``None``: no such access (a forward-only variant stores no
  gradient).
- ``occupancy``: the theoretical sm_90 occupancy from registers, shared memory and warps (64K
  registers per SM allocated per warp in units of 256, 2048 threads, 32 blocks and 228 KiB of
  shared memory per SM, 1 KiB of it reserved per block).
- ``f64_ops``: float64 instructions in the PTX (none belong in a float32 kernel).

``--markdown`` prints the table and the byte model (bytes per logit element and passes over the
logits of each kernel, with the time they imply on an H100 and an H200), for benchmarks/RESULTS.md.
Run it without TRITON_INTERPRET and NUMBA_ENABLE_CUDASIM: the interpreters replace the compilers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import torch

# --------------------------------------------------------------------------- sm_90 (H100 / H200)

ARCH = 90
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, allocated per warp
MAX_WARPS_PER_SM = 64  # 2048 threads
MAX_BLOCKS_PER_SM = 32
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
SMEM_ALLOC_UNIT = 128


def occupancy(regs: int, shared_bytes: int, num_warps: int) -> float:
    """Theoretical occupancy (resident warps / 64) of blocks of ``num_warps`` warps on sm_90."""
    regs_per_warp = math.ceil(regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps if regs_per_warp else MAX_BLOCKS_PER_SM
    smem = math.ceil((shared_bytes + SMEM_RESERVED_PER_BLOCK) / SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
    blocks = min(MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // num_warps, by_regs, SMEM_PER_SM // smem)
    return blocks * num_warps / MAX_WARPS_PER_SM


# --------------------------------------------------------------------------- ptxas and the PTX


def _ptxas_candidates() -> list[str]:
    """A CUDA toolkit's ptxas first (what numba's PTX is made for), then Triton's."""
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    out = [shutil.which("ptxas"), os.path.join(cuda_home, "bin", "ptxas")]
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas

        out.append(get_ptxas(ARCH).path)
    return list(dict.fromkeys(p for p in out if p and os.path.exists(p)))


def ptxas_usage(ptx: str, gpu_name: str) -> dict:
    """``ptxas -v`` of one kernel, by the first ptxas that takes the PTX's version."""
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        for ptxas in _ptxas_candidates():
            cmd = [ptxas, "-v", f"--gpu-name={gpu_name}", str(src), "-o", str(Path(tmp, "kernel.cubin"))]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                return parse_ptxas_log(proc.stdout + proc.stderr)
            errors.append(f"{ptxas}: {proc.stderr.strip()[-300:]}")
    raise RuntimeError("no ptxas could assemble the PTX:\n" + "\n".join(errors or ["no ptxas found"]))


def parse_ptxas_log(log: str) -> dict:
    """regs, spill_bytes, local_bytes (stack frame) and static shared bytes from ``ptxas -v`` output."""

    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return {
        "regs": int(regs.group(1)),
        "spill_bytes": num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"),
        "local_bytes": num(r"(\d+) bytes stack frame") + num(r"(\d+) bytes lmem"),
        "static_shared": num(r"(\d+) bytes smem"),
    }


_REG = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"_param_(\d+)\]")
_LABEL = re.compile(r"^(\$?[\w$]+):")
_BITS = {"8": 8, "16": 16, "32": 32, "64": 64, "128": 128}


@dataclass
class Access:
    store: bool
    bits: int  # vector width: lanes x element bits
    params: frozenset  # the kernel parameters its address is computed from
    in_loop: bool


@dataclass
class PtxSummary:
    accesses: list = field(default_factory=list)
    f64_ops: int = 0
    n_params: int = 0


def analyse_ptx(ptx: str) -> PtxSummary:
    """Global loads and stores of the (single) kernel in ``ptx``, each tied to the parameters its
    address derives from, and whether it lies inside a loop (between a label and a branch back)."""
    body = []
    labels = {}
    for raw in ptx.splitlines():
        line = raw.split("//", 1)[0].strip()
        if not line or line.startswith((".loc", ".file", ".reg", ".local", "{", "}")):
            continue
        m = _LABEL.match(line)
        if m:
            labels[m.group(1)] = len(body)
            continue
        body.append(line)
    loops = []
    for i, line in enumerate(body):
        m = re.search(r"\bbra(?:\.uni)?\s+(\$?[\w$]+)\s*;", line)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append((labels[m.group(1)], i))

    # data flow: the parameters every register derives from, to a fixed point (loops carry values)
    origin: dict[str, set] = {}
    insts = []
    for line in body:
        text = re.sub(r"^@!?%p\d+\s+", "", line).rstrip(";")
        parts = text.split(None, 1)
        if len(parts) < 2 or parts[0].startswith("."):
            continue
        opcode, operands = parts
        if opcode.startswith(("st.", "bra", "ret", "bar", "red.", "membar", "fence")):
            dests, srcs = [], operands
        else:
            first = re.match(r"\s*(\{[^}]*\}|[^,]+)", operands)
            dests, srcs = _REG.findall(first.group(1)), operands[first.end() :]
        params = {int(p) for p in _PARAM.findall(srcs)}
        insts.append((dests, _REG.findall(srcs), params))
    changed = True
    while changed:
        changed = False
        for dests, srcs, params in insts:
            derived = set(params).union(*(origin.get(r, ()) for r in srcs))
            for d in dests:
                known = origin.setdefault(d, set())
                if not derived <= known:
                    known |= derived
                    changed = True

    out = PtxSummary(n_params=len(set(re.findall(r"_param_(\d+)[,\s)]", ptx))))
    for i, line in enumerate(body):
        text = re.sub(r"^@!?%p\d+\s+", "", line)
        opcode = text.split(None, 1)[0]
        if ".f64" in opcode:
            out.f64_ops += 1
        if not opcode.startswith(("ld.global", "st.global")):
            continue
        fields = opcode.split(".")
        lanes = next((int(f[1:]) for f in fields if re.fullmatch(r"v\d+", f)), 1)
        elem = next(_BITS[f[1:]] for f in reversed(fields) if f[:1] in "bufs" and f[1:] in _BITS)
        address = re.search(r"\[([^\]]*)\]", text).group(1)
        params = frozenset().union(*(origin.get(r, ()) for r in _REG.findall(address)))
        in_loop = any(lo <= i <= hi for lo, hi in loops)
        out.accesses.append(Access(opcode.startswith("st."), lanes * elem, params, in_loop))
    return out


def hot_width(summary: PtxSummary, param: int | None, store: bool) -> int | None:
    """The narrowest access of one pointer parameter on the hot path (in a loop, if any are)."""
    mine = [a for a in summary.accesses if a.store == store and param in a.params]
    hot = [a for a in mine if a.in_loop] or mine
    return min((a.bits for a in hot), default=None)


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    backend: str
    kernel: str  # cross_entropy, softmax, bce, bce_with_logits
    dtype: str  # fp32, bf16, fp16, fp64
    variant: str  # "large-r mean", "small-r softcap", ...

    @property
    def key(self) -> str:
        return f"{self.backend} {self.kernel} {self.dtype} {self.variant}"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
N_ROWS = 16
PATHS = {"large-r": 131072, "small-r": 128}  # classes per row: chunked rows; several rows per program
UNALIGNED_R = 50257  # GPT-2's vocabulary: odd, so every row starts off a 16-byte boundary
# Cross-entropy keyword sets, as the backend contract receives them (gpuxent.backends). "mean" is
# the training path: the mean's 1/denominator arrives as a device tensor.
CE_KEYWORDS = {
    "mean": {},
    "sum": {"grad_scale": None},
    "forward": {"grad": False},
    "weight": {"weight": True},
    "smoothing": {"label_smoothing": 0.1},
    "z_loss": {"z_loss": 1e-4},
    "softcap": {"softcap": 30.0},
    "prob": {"prob": True},
    "all": {"weight": True, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
    "prob all": {"prob": True, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
    "forward all": {"grad": False, "weight": True, "label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0},
}
# The kernel of each launcher, and its (input, output) pointers whose access widths are reported
TRITON_IO = {
    "cross_entropy": ("_cross_entropy_kernel", "logits_ptr", "grad_ptr"),
    "softmax": ("_softmax_kernel", "x_ptr", "out_ptr"),
    "bce": ("_bce_kernel", "probs_ptr", "grad_ptr"),
    "bce_with_logits": ("_bce_logits_kernel", "logits_ptr", "grad_ptr"),
}


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ce_call(tb, dtype, n_classes, kw, device):
    """The backend call for one cross-entropy keyword set on (N_ROWS, n_classes) contiguous inputs."""
    acc = _compute(dtype)
    x = torch.zeros(N_ROWS, n_classes, dtype=dtype, device=device)
    prob = kw.get("prob", False)
    t_shape, t_dtype = ((N_ROWS, n_classes), acc) if prob else ((N_ROWS,), torch.int64)
    t = torch.zeros(t_shape, dtype=t_dtype, device=device)
    w = torch.ones(n_classes, dtype=acc, device=device) if kw.get("weight") else None
    tb.cross_entropy(
        x, t, w, ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0), z_loss=kw.get("z_loss", 0.0),
        softcap=kw.get("softcap"), grad_scale=kw.get("grad_scale", torch.ones((), dtype=acc, device=device)),
        grad=torch.empty_like(x) if kw.get("grad", True) else None,
    )  # fmt: skip


def _softmax_call(tb, dtype, n_classes, log, device):
    tb.softmax(torch.zeros(N_ROWS, n_classes, dtype=dtype, device=device), log=log)


def _bce_call(tb, dtype, kind, weighted, device):
    acc = _compute(dtype)
    x = torch.zeros(N_ROWS, 4096, dtype=dtype, device=device)
    y = torch.zeros(N_ROWS, 4096, dtype=acc, device=device)
    w = torch.ones_like(y) if weighted else None
    if kind == "bce":
        tb.binary_cross_entropy(x, y, w, grad=torch.empty_like(y))
    else:
        tb.binary_cross_entropy_with_logits(x, y, w, w, grad=torch.empty_like(y))


def triton_calls(device="cpu"):
    """(Variant, ``call(tb)``: the backend call that launches it on ``device``) for every Triton variant."""
    calls = []

    def add(kernel, dtype_name, variant, fn, *args):
        calls.append((Variant("triton", kernel, dtype_name, variant), lambda tb: fn(tb, *args, device)))

    for dt_name, dtype in DTYPES.items():
        for path, r in PATHS.items():
            for name, kw in CE_KEYWORDS.items():
                add("cross_entropy", dt_name, f"{path} {name}", _ce_call, dtype, r, kw)
            for log in (False, True):
                add("softmax", dt_name, f"{path} {'log_softmax' if log else 'softmax'}", _softmax_call, dtype, r, log)
        add("cross_entropy", dt_name, f"large-r mean r={UNALIGNED_R}", _ce_call, dtype, UNALIGNED_R, {})
        for kind in ("bce", "bce_with_logits"):
            for weighted in (False, True):
                add(kind, dt_name, "weighted" if weighted else "plain", _bce_call, dtype, kind, weighted)
    return calls


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel inside a launcher: records the launch instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def record_launch(tb, kernel_attr: str, call):
    """``(grid, args, kwargs)`` of the one launch of ``tb.<kernel_attr>`` that ``call(tb)`` makes."""
    recorder = _Recorder()
    with mock.patch.object(tb, kernel_attr, recorder):
        call(tb)
    if len(recorder.launches) != 1:
        raise RuntimeError(f"expected one launch of {kernel_attr}, got {len(recorder.launches)}")
    return recorder.launches[0]


def specialize(fn, args, kwargs):
    """(signature, constexprs, attrs, options) of a launch, as Triton's JIT derives them at run time.

    Uses the JIT's own binder and packer (``triton.runtime.jit``), the same in triton 3.6 and 3.9;
    the target is fixed to sm_90, so no GPU or driver is needed."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", ARCH, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def compile_triton(fn, signature, constexprs, attrs, options):
    """Triton's compiler, front end to cubin, for sm_90: ``(compiled kernel, Triton's ptxas -v log)``.

    The log is Triton's own ptxas run (its flags change the allocation: triton 3.9 passes
    ``--regAllocOptLevel=2``), printed by the compiler when asked; a cached kernel would print none,
    hence ``TRITON_ALWAYS_COMPILE``."""
    import io

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    env = {"TRITON_ALWAYS_COMPILE": "1", "TRITON_DUMP_PTXAS_LOG": "1"}
    with mock.patch.dict(os.environ, env), contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32), options=options)
    return compiled, log.getvalue()


def audit_triton_kernel(kernel_io, signature, compiled, ptxas_log, num_warps) -> dict:
    """One row from a compiled Triton kernel: its ptxas log, PTX and dynamic shared memory."""
    usage = parse_ptxas_log(ptxas_log)
    ptx = compiled.asm["ptx"]
    summary = analyse_ptx(ptx)
    runtime = [name for name, ty in signature.items() if ty != "constexpr"]  # the PTX's parameters, in order
    src, dst = (runtime.index(p) if p in runtime else None for p in kernel_io[1:])
    shared_bytes = compiled.metadata.shared + usage["static_shared"]
    return {
        "num_warps": num_warps, "regs": usage["regs"], "spill_bytes": usage["spill_bytes"],
        "local_bytes": usage["local_bytes"], "shared_bytes": shared_bytes,
        "ld_vector_bits": hot_width(summary, src, store=False), "st_vector_bits": hot_width(summary, dst, store=True),
        "occupancy": round(occupancy(usage["regs"], shared_bytes, num_warps), 3), "f64_ops": summary.f64_ops,
    }  # fmt: skip


def triton_tasks(only: str = ""):
    """(Variant, kernel attribute, signature, constexprs, attrs, options) for every Triton variant
    whose key contains ``only``."""
    from gpuxent.backends import triton as tb

    tasks = []
    for v, call in triton_calls():
        if only not in v.key:
            continue
        attr = TRITON_IO[v.kernel][0]
        _, args, kwargs = record_launch(tb, attr, call)
        tasks.append((v, attr, *specialize(getattr(tb, attr), args, kwargs)))
    return tasks


def _run_triton_task(task) -> dict:
    from gpuxent.backends import triton as tb

    v, attr, signature, constexprs, attrs, options = task
    compiled, log = compile_triton(getattr(tb, attr), signature, constexprs, attrs, options)
    return _row(v, audit_triton_kernel(TRITON_IO[v.kernel], signature, compiled, log, options["num_warps"]))


# --------------------------------------------------------------------------- numba_cuda

# Argument types of each kernel, by name (checked against the kernel's own parameters): a2/a1 are
# C-contiguous float arrays of the compute dtype (what a launch on contiguous device arrays sees),
# i1 an int64 array, f a float of the compute dtype, i an int64, b a bool.
NUMBA_KERNELS = {  # kernel -> (index in numba_cuda._kernels(dtype), arguments, (input, output))
    "cross_entropy": (
        0, "logits:a2 target:i1 probs:a2 weight:a1 grad_scale:a1 grad:a2 loss:a1 lse:a1 argmax:i1 entropy_out:a1 "
        "ignore_index:i smoothing:f "
        "eps_r:f z_loss:f softcap:f prob:b has_weight:b want_grad:b threads_per_row:i", ("logits", "grad"),
    ),
    "softmax": (1, "x:a2 out:a2 log:b threads_per_row:i", ("x", "out")),
    "bce": (2, "p:a1 y:a1 w:a1 loss:a1 grad:a1 has_weight:b want_grad:b", ("p", "grad")),
    "bce_with_logits": (
        3, "x:a1 y:a1 w:a1 pos_weight:a1 loss:a1 grad:a1 has_weight:b has_pos_weight:b want_grad:b", ("x", "grad"),
    ),
}  # fmt: skip
NUMBA_DTYPES = ("fp32", "fp64")  # half inputs are widened to float32 by torch before the launch


def _numba_setup():
    """numba.cuda for compiling without a GPU: device functions compile for the current device, so
    without one a fake sm_90 device is reported. Raises RuntimeError where it cannot compile."""
    import types

    try:
        from numba import cuda
    except Exception as exc:
        raise RuntimeError(f"numba.cuda cannot be imported: {exc}") from exc

    if not cuda.is_available():
        import numba.cuda.dispatcher as dispatcher

        if not hasattr(dispatcher, "get_current_device"):
            raise RuntimeError("this numba.cuda cannot compile without a GPU (no dispatcher.get_current_device)")
        dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(ARCH // 10, ARCH % 10))
    from numba.cuda.cudadrv import nvvm

    if not nvvm.is_available():
        raise RuntimeError("numba.cuda has no NVVM (libnvvm) to compile with")


def _numba_signature(kernel, spec: str, dtype_name: str):
    """(numba argument types, parameter names, {name: first PTX parameter index})."""
    import inspect

    from numba import types as T

    ft = T.float64 if dtype_name == "fp64" else T.float32
    kinds = {"a2": T.Array(ft, 2, "C"), "a1": T.Array(ft, 1, "C"), "i1": T.Array(T.int64, 1, "C")}
    kinds |= {"f": ft, "i": T.int64, "b": T.boolean}
    names, types = zip(*(item.split(":") for item in spec.split()))
    declared = list(inspect.signature(kernel.py_func).parameters)
    if list(names) != declared:
        raise RuntimeError(f"{kernel.py_func.__name__}: parameters {declared}, the audit expects {list(names)}")
    # A numba array is flattened into (meminfo, parent, nitems, itemsize, data, shape..., strides...)
    first, index = {}, 0
    for name, kind in zip(names, types):
        first[name] = index
        index += 5 + 2 * kinds[kind].ndim if kind.startswith(("a", "i1")) else 1
    return tuple(kinds[k] for k in types), names, first, index


def numba_block_threads(kernel: str, path: str | None) -> int:
    """Threads per block of the backend's launch layout."""
    from gpuxent.backends import numba_cuda as nc

    if path is None:
        return nc.THREADS_PER_BLOCK
    tpr, rows_per_block = nc._row_layout(PATHS[path])
    return tpr * rows_per_block


def _run_numba_task(task) -> list[dict]:
    """Rows of one numba_cuda kernel (one per launch layout: the PTX is the same)."""
    import numpy as np

    _numba_setup()
    from numba import cuda

    from gpuxent.backends import numba_cuda as nc

    kernel_name, dtype_name = task
    index, spec, (src, dst) = NUMBA_KERNELS[kernel_name]
    kernel = nc._kernels(np.dtype(np.float64 if dtype_name == "fp64" else np.float32))[index]
    sig, names, first, n_params = _numba_signature(kernel, spec, dtype_name)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(ARCH // 10, ARCH % 10))
    summary = analyse_ptx(ptx)
    if summary.n_params != n_params:
        raise RuntimeError(f"{kernel_name}: the PTX has {summary.n_params} parameters, the audit counts {n_params}")
    usage = ptxas_usage(ptx, f"sm_{ARCH}")
    data = {name: first[name] + 4 for name in (src, dst)}  # the data pointer of an array
    rows = []
    for path in ("large-r", "small-r") if kernel_name in ("cross_entropy", "softmax") else (None,):
        warps = numba_block_threads(kernel_name, path) // 32
        row = {
            "num_warps": warps, "regs": usage["regs"], "spill_bytes": usage["spill_bytes"],
            "local_bytes": usage["local_bytes"], "shared_bytes": usage["static_shared"],
            "ld_vector_bits": hot_width(summary, data[src], store=False),
            "st_vector_bits": hot_width(summary, data[dst], store=True),
            "occupancy": round(occupancy(usage["regs"], usage["static_shared"], warps), 3),
            "f64_ops": summary.f64_ops,
        }  # fmt: skip
        v = Variant("numba_cuda", kernel_name, dtype_name, path or "plain")
        rows.append(_row(v, row))
    return rows


def numba_tasks(only: str = ""):
    return [(k, d) for k in NUMBA_KERNELS for d in NUMBA_DTYPES if only in f"numba_cuda {k} {d}"]


# --------------------------------------------------------------------------- the audit

KEYS = (
    "kernel", "backend", "dtype", "variant", "num_warps", "regs", "spill_bytes", "local_bytes", "shared_bytes",
    "ld_vector_bits", "st_vector_bits", "occupancy", "f64_ops",
)  # fmt: skip


def _row(v: Variant, metrics: dict) -> dict:
    row = {"kernel": v.kernel, "backend": v.backend, "dtype": v.dtype, "variant": v.variant, **metrics}
    return {k: row[k] for k in KEYS}


def _map(fn, tasks, jobs):
    if jobs <= 1:
        return [fn(t) for t in tasks]
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that holds torch's threads
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(fn, tasks))


def audit(backends=("triton", "numba_cuda"), jobs: int = 1, only: str = "") -> list[dict]:
    """Every row of the audit (those whose "backend kernel dtype variant" contains ``only``)."""
    for var in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM"):
        if os.environ.get(var, "0") not in ("", "0"):
            raise RuntimeError(f"{var} is set: the interpreters replace the compilers; unset it")
    rows = []
    if "triton" in backends:
        rows += _map(_run_triton_task, triton_tasks(only), jobs)
    if "numba_cuda" in backends:
        try:
            _numba_setup()
        except RuntimeError as exc:  # no NVVM here: said on stderr, the Triton rows stand
            print(f"# numba_cuda not audited: {exc}", file=sys.stderr)
        else:
            rows += [r for rs in _map(_run_numba_task, numba_tasks(only), jobs) for r in rs]
    return rows


def _fmt(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%" if isinstance(v, float) else str(v)


def table(rows: list[dict], markdown: bool = False) -> str:
    heads = ["kernel", "backend", "dtype", "variant", "warps", "regs", "spill", "local", "smem", "ld bits", "st bits",
             "occupancy", "f64 ops"]  # fmt: skip
    cells = [[_fmt(r[k]) for k in KEYS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * 4 + "---:|" * (len(heads) - 4)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    out = ["  ".join(h.ljust(w) if i < 4 else h.rjust(w) for i, (h, w) in enumerate(zip(heads, widths)))]
    for c in cells:
        out.append("  ".join(s.ljust(w) if i < 4 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths))))
    return "\n".join(out)


def _ptxas_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def toolchain() -> str:
    """The compilers this audit runs with."""
    parts = []
    with contextlib.suppress(Exception):
        import triton
        from triton.backends.nvidia.compiler import get_ptxas

        parts.append(f"triton {triton.__version__} (its ptxas {_ptxas_version(get_ptxas(ARCH).path)})")
    with contextlib.suppress(Exception):
        import numba

        ptxas = _ptxas_candidates()
        parts.append(f"numba {numba.__version__} (ptxas {_ptxas_version(ptxas[0]) if ptxas else '-'})")
    return ", ".join(parts)


# --------------------------------------------------------------------------- byte model
# Beside the project's byte model (gpuxent.bench.bytes_moved: the minimum traffic, which every GB/s
# figure divides by), the traffic each kernel really makes, per logit element, as streams (what,
# bytes, "r" or "w"), with the host-side dtype conversions around it. The gradient pass reads each
# row a second time; that read comes from L2 only while the rows in flight (programs resident on all
# SMs x row bytes, from the audit's occupancy) fit in about half of it, else from DRAM.

GPUS = {  # spec-sheet peak bandwidth; both have 132 SMs and 50 MB of L2
    "H100": {"tbps": 3.35, "sms": 132, "l2_mb": 50},
    "H200": {"tbps": 4.8, "sms": 132, "l2_mb": 50},
}


LOGITS_STREAMS = ("logits", "x", "input")  # reads of these are passes over the logits (or their copy)


def traffic(backend: str, kernel: str, pass_: str, elt: int, acc: int) -> list[tuple[str, int, str]]:
    """The streams of one call per element: ``elt`` bytes per input element, ``acc`` per compute value."""
    widen = elt != acc
    streams = []
    if backend == "numba_cuda" and widen:  # no half kernels: torch widens the input first
        streams += [("input (widening copy)", elt, "r"), ("widened input", acc, "w")]
    read = elt if backend == "triton" else acc
    if kernel == "cross_entropy":
        streams.append(("logits, pass 1", read, "r"))
        if pass_ == "fwd+bwd":
            streams += [("logits, pass 2", read, "r"), ("gradient", read, "w")]
            if backend == "numba_cuda" and widen:  # the gradient is written in float32, then narrowed
                streams += [("gradient (narrowing copy)", acc, "r"), ("gradient in the input dtype", elt, "w")]
    elif kernel == "softmax":  # out in the compute dtype; gpuxent.functional converts it to the input's
        streams += [("x, pass 1", read, "r"), ("x, pass 2", read, "r"), ("out", acc, "w")]
        if widen:
            streams += [("out (narrowing copy)", acc, "r"), ("out in the input dtype", elt, "w")]
    else:
        raise ValueError(f"no byte model for {kernel}")
    return streams


def _resident_rows(audit_rows, backend, kernel, dtype) -> int | None:
    """Rows in flight per SM on the large-r path (one row per block), from the audit's occupancy."""
    variant = {"cross_entropy": "large-r mean", "softmax": "large-r softmax"}[kernel]
    if backend == "numba_cuda":
        variant, dtype = "large-r", "fp64" if dtype == "fp64" else "fp32"
    for r in audit_rows:
        if (r["backend"], r["kernel"], r["dtype"], r["variant"]) == (backend, kernel, dtype, variant):
            return round(r["occupancy"] * MAX_WARPS_PER_SM / r["num_warps"])
    return None


def byte_model(audit_rows, n_rows=16384, n_classes=131072, dtype="bf16") -> list[dict]:
    """Predicted traffic and time of each logits kernel at one size, on an H100 and an H200."""
    from gpuxent.bench import bytes_moved

    elt = DTYPES[dtype].itemsize
    acc = _compute(DTYPES[dtype]).itemsize
    n = n_rows * n_classes
    out = []
    for backend in ("triton", "numba_cuda"):
        for kernel, passes in (("cross_entropy", ("fwd", "fwd+bwd")), ("softmax", ("fwd",))):
            for pass_ in passes:
                streams = traffic(backend, kernel, pass_, elt, acc)
                row = {
                    "backend": backend, "kernel": kernel, "pass": pass_, "streams": streams,
                    "read": sum(b for _, b, rw in streams if rw == "r"),
                    "write": sum(b for _, b, rw in streams if rw == "w"),
                    "passes": sum(1 for what, _, rw in streams if rw == "r" and what.startswith(LOGITS_STREAMS)),
                    "min_bytes": bytes_moved(n_rows, n_classes, elt, pass_) if kernel == "cross_entropy" else None,
                }  # fmt: skip
                resident = _resident_rows(audit_rows, backend, kernel, dtype)
                reread = sum(b for what, b, _ in streams if "pass 2" in what)
                row["in_flight_mb"] = None
                if resident is not None and reread:
                    row["in_flight_mb"] = resident * GPUS["H100"]["sms"] * n_classes * reread / 1e6
                from_l2 = row["in_flight_mb"] is not None and row["in_flight_mb"] < GPUS["H100"]["l2_mb"] / 2
                row["reread_from"] = "-" if not reread else "L2" if from_l2 else "DRAM"
                row["dram_bytes"] = (row["read"] + row["write"] - (reread if from_l2 else 0)) * n
                for name, gpu in GPUS.items():
                    row[f"ms_{name}"] = row["dram_bytes"] / (gpu["tbps"] * 1e9)
                    row[f"min_ms_{name}"] = row["min_bytes"] / (gpu["tbps"] * 1e9) if row["min_bytes"] else None
                out.append(row)
    return out


def byte_model_markdown(model, n_rows=16384, n_classes=131072, dtype="bf16") -> str:
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"PREDICTIONS, not measurements: {n_rows} x {n_classes} {dtype}, DRAM bytes over the spec-sheet peak "
        f"bandwidth (H100 {GPUS['H100']['tbps']} TB/s, H200 {GPUS['H200']['tbps']} TB/s); a device copy reaches "
        'about 90% of peak, so measured times should be about 10% longer at best. "minimum" is the project\'s '
        "byte model (`gpuxent.bench.bytes_moved`, what GB/s figures divide by).",
        "",
        "| backend | kernel | pass | read B/elt | write B/elt | passes over the logits | rows in flight (MB) "
        "| 2nd read from | DRAM GB | H100 ms | H200 ms | minimum GB | minimum H100 ms | minimum H200 ms |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in model:
        flight = "-" if r["in_flight_mb"] is None else f"{r['in_flight_mb']:.0f}"
        mn = "-" if r["min_bytes"] is None else f"{r['min_bytes'] / 1e9:.2f}"
        lines.append(
            f"| {r['backend']} | {r['kernel']} | {r['pass']} | {r['read']} | {r['write']} | {r['passes']} | {flight} "
            f"| {r['reread_from']} | {r['dram_bytes'] / 1e9:.2f} | {ms(r['ms_H100'])} | {ms(r['ms_H200'])} | {mn} "
            f"| {ms(r['min_ms_H100'])} | {ms(r['min_ms_H200'])} |"
        )
    lines += ["", "Streams per element:", ""]
    for r in model:
        desc = ", ".join(f"{'read' if rw == 'r' else 'write'} {what} ({b} B)" for what, b, rw in r["streams"])
        lines.append(f"- {r['backend']} {r['kernel']} {r['pass']}: {desc}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per variant and line")
    out.add_argument("--markdown", action="store_true", help="the table and the byte model, for RESULTS.md")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile in N processes")
    p.add_argument("--backend", choices=["triton", "numba_cuda"], action="append", help="only these (repeatable)")
    p.add_argument("--only", default="", help='only variants whose "backend kernel dtype variant" contains this')
    args = p.parse_args(argv)
    rows = audit(tuple(args.backend or ("triton", "numba_cuda")), args.jobs, args.only)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    elif args.markdown:
        print(f"Toolchain: {toolchain()}\n")
        print(table(rows, markdown=True))
        print()
        print(byte_model_markdown(byte_model(rows)))
    else:
        print(f"# {toolchain()}")
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # gpuxent from this checkout
    sys.exit(main())
