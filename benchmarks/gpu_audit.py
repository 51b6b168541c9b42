"""GPU compile audit: what the compiler makes of every kernel, without a GPU.

    python benchmarks/gpu_audit.py [--json | --markdown] [--jobs N] [--backend triton|numba_cuda] [--only TEXT]
                                   [--cover]

Every kernel of both GPU backends: the fused cross-entropy (with and without row statistics),
softmax, the two BCE kernels, the vocab-parallel row partials and gradient pass
(``row_partials``, ``cross_entropy_backward``) and distillation. Every Triton variant (each dtype,
the large-r and small-r paths, each keyword flag; each kernel also at GPT-2's odd vocabulary 50257
beside the padded 50304, a small odd r, and logits off a 16-byte boundary) and every numba_cuda
kernel is compiled for a Hopper GPU (sm_90) the way the JIT compiles it at run time, and assembled
by ptxas. One row per variant:

    kernel backend dtype variant num_warps regs spill_bytes local_bytes shared_bytes
    ld_vector_bits st_vector_bits occupancy f64_ops

- Triton: the backend's own launcher (``gpuxent.backends.triton``) is called on CPU tensors with the
  kernel replaced by a recorder, so the launch configuration (BLOCK, ROWS, num_warps) and every
  constexpr (the row peel of odd r included) come from the real code. The recorded arguments go
  through Triton's JIT binder, which specialises them as a launch would: 16-byte divisibility of
  pointers, strides and ``n_classes`` (``tt.divisibility``), integers equal to 1 folded into
  constants. Then Triton's real compiler.
- numba_cuda: whatever kernels ``gpuxent.backends.numba_cuda`` has, found through the backend itself
  (see "numba_cuda" below: one call per kernel and input dtype under the CUDA simulator records each
  launch, the builder call that made its kernel and its arguments' numba types); ``cuda.compile_ptx``
  with those types, and the block size of the backend's launch layout. A kernel that changes (its
  parameters, its builder, an argument numba cannot type) makes the audit fail with the reason.
- Registers, spills, the stack frame (local memory) and static shared memory come from ``ptxas -v``:
  for Triton the log of its own ptxas run (its flags change the allocation), for numba_cuda a CUDA
  toolkit's ptxas on the PTX (the driver assembles that PTX at load time). Triton's dynamic shared
  memory comes from the kernel's metadata.
- ``ld_vector_bits`` / ``st_vector_bits``: the narrowest global load of the inputs (logits, x, probs;
  student and teacher) and store of the output (gradient, softmax) inside a loop of the PTX (the hot
  path), or anywhere when the kernel has no loop; a data-flow pass over the PTX ties each access to
  the kernel parameter its address comes from (numba_cuda: the parameter of the input's name and those
  named with it and "_", its storage's words). ``None``: no such access (a forward-only variant stores
  no gradient; row partials write O(N)).
- ``occupancy``: the theoretical sm_90 occupancy from registers, shared memory and warps (64K
  registers per SM allocated per warp in units of 256, 2048 threads, 32 blocks and 228 KiB of
  shared memory per SM, 1 KiB of it reserved per block).
- ``f64_ops``: float64 instructions in the PTX (none belong in a float32 kernel).

``--json`` prints one JSON object a line: the rows (``"kind": "audit"``, numba_cuda's with the builder
call of their kernel, ``numba_kernel``, and the dtype it reads its input in, ``reads``), then the byte
model's entries (``"kind": "byte_model"``: backend, kernel, variant, pass, dtype, DRAM and minimum GB at
16384 x 131072, predicted H100 / H200 ms, streams) for every dtype. ``--markdown`` prints the table and
the byte model of bf16 (bytes per element and passes over the inputs of each kernel, with the time they
imply on an H100 and an H200), for benchmarks/RESULTS.md.
Run it without TRITON_INTERPRET and NUMBA_ENABLE_CUDASIM: the interpreters replace the compilers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import inspect
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
PADDED_R = 50304  # the same padded to a multiple of 64: every row starts on one
SMALL_ODD_R = 127  # odd and small: several rows per program, each starting off 16 bytes
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
    "stats": {"stats": True},  # cross_entropy_with_stats: each row's argmax and entropy too
    "forward stats": {"grad": False, "stats": True},
}
# Vocab-parallel row partials (the first loop of the fused kernel on a slice of the classes)
PARTIALS_KEYWORDS = {
    "plain": {},
    "all": {"weight": True, "smoothing": True, "softcap": 30.0},
    "prob all": {"prob": True, "weight": True, "smoothing": True, "softcap": 30.0},
}
# cross_entropy_backward (the gradient pass from the global lse and coefficient; per-row scales, as the
# autograd door hands them); "entropy": the gradient of cross_entropy_with_stats' entropy too
BACKWARD_KEYWORDS = {
    "plain": {},
    "entropy": {"entropy": True},
    "all": {"weight": True, "label_smoothing": 0.1, "softcap": 30.0, "entropy": True},
    "prob all": {"prob": True, "weight": True, "label_smoothing": 0.1, "softcap": 30.0},
}
DISTILLATION_KEYWORDS = {
    "kl": {"divergence": "kl"},
    "reverse_kl": {"divergence": "reverse_kl"},
    "jsd": {"divergence": "jsd"},
    "kl target": {"divergence": "kl", "target": True},
    "forward kl": {"divergence": "kl", "grad": False},
    "forward jsd": {"divergence": "jsd", "grad": False},
}
# Each kernel beside its first keyword set at the padded and the odd vocabulary (and one misaligned base)
ODD_R_KEYWORDS = {
    "cross_entropy": ("mean", "all", "prob all", "stats", "forward"),
    "softmax": ("softmax",),
    "row_partials": ("plain",),
    "cross_entropy_backward": ("plain",),
    "distillation": ("kl", "jsd"),
}
OFFSET_BASE = "offset base"  # the logits a view one element past a 16-byte boundary: no peel, narrow accesses
# The kernel of each launcher, and the pointers whose access widths are reported: the inputs read in the
# hot loops (the narrowest of them) and the output written there (None: no (N, r) output)
TRITON_IO = {
    "cross_entropy": ("_cross_entropy_kernel", ("logits_ptr",), "grad_ptr"),
    "softmax": ("_softmax_kernel", ("x_ptr",), "out_ptr"),
    "bce": ("_bce_kernel", ("probs_ptr",), "grad_ptr"),
    "bce_with_logits": ("_bce_logits_kernel", ("logits_ptr",), "grad_ptr"),
    "row_partials": ("_row_partials_kernel", ("logits_ptr",), None),
    "cross_entropy_backward": ("_cross_entropy_backward_kernel", ("logits_ptr",), "grad_ptr"),
    "distillation": ("_distillation_kernel", ("student_ptr", "teacher_ptr"), "grad_ptr"),
}
ROW_KERNELS = ("cross_entropy", "softmax", "row_partials", "cross_entropy_backward", "distillation")


def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _logits(dtype, n_classes, device, offset=False):
    """(N_ROWS, n_classes) contiguous logits; ``offset``: a view one element past the allocation's start."""
    if not offset:
        return torch.zeros(N_ROWS, n_classes, dtype=dtype, device=device)
    return torch.zeros(N_ROWS * n_classes + 1, dtype=dtype, device=device)[1:].view(N_ROWS, n_classes)


def _targets(kw, n_classes, acc, device):
    if kw.get("prob", False):
        return torch.zeros(N_ROWS, n_classes, dtype=acc, device=device)
    return torch.zeros(N_ROWS, dtype=torch.int64, device=device)


def _ce_call(tb, dtype, n_classes, kw, device):
    """The backend call for one cross-entropy keyword set on (N_ROWS, n_classes) contiguous inputs."""
    acc = _compute(dtype)
    x = _logits(dtype, n_classes, device, kw.get("offset", False))
    t = _targets(kw, n_classes, acc, device)
    w = torch.ones(n_classes, dtype=acc, device=device) if kw.get("weight") else None
    stats = None
    if kw.get("stats"):
        stats = (torch.empty(N_ROWS, dtype=torch.int64, device=device), torch.empty(N_ROWS, dtype=acc, device=device))
    tb.cross_entropy(
        x, t, w, ignore_index=-100, label_smoothing=kw.get("label_smoothing", 0.0), z_loss=kw.get("z_loss", 0.0),
        softcap=kw.get("softcap"), grad_scale=kw.get("grad_scale", torch.ones((), dtype=acc, device=device)),
        grad=torch.empty(N_ROWS, n_classes, dtype=dtype, device=device) if kw.get("grad", True) else None,
        stats=stats,
    )  # fmt: skip


def _softmax_call(tb, dtype, n_classes, kw, device):
    tb.softmax(_logits(dtype, n_classes, device), log=kw["log"])


def _partials_call(tb, dtype, n_classes, kw, device):
    acc = _compute(dtype)
    w = torch.ones(n_classes, dtype=acc, device=device) if kw.get("weight") else None
    tb.row_partials(
        _logits(dtype, n_classes, device), _targets(kw, n_classes, acc, device), w, ignore_index=-100,
        softcap=kw.get("softcap"), class_offset=0, smoothing=kw.get("smoothing", False),
        out=torch.empty(N_ROWS, 5, dtype=acc, device=device),
    )  # fmt: skip


def _backward_call(tb, dtype, n_classes, kw, device):
    acc = _compute(dtype)
    x = _logits(dtype, n_classes, device)
    w = torch.ones(n_classes, dtype=acc, device=device) if kw.get("weight") else None
    per_row = torch.ones(N_ROWS, dtype=acc, device=device)
    entropy = per_row if kw.get("entropy") else None
    tb.cross_entropy_backward(
        x, _targets(kw, n_classes, acc, device), w, per_row, per_row, entropy, ignore_index=-100,
        label_smoothing=kw.get("label_smoothing", 0.0), n_classes=n_classes, class_offset=0, softcap=kw.get("softcap"),
        grad_scale=per_row, entropy_scale=per_row if entropy is not None else None, grad=torch.empty_like(x),
    )  # fmt: skip


def _distillation_call(tb, dtype, n_classes, kw, device):
    acc = _compute(dtype)
    s = _logits(dtype, n_classes, device)
    target = torch.zeros(N_ROWS, dtype=torch.int64, device=device) if kw.get("target") else None
    tb.distillation(
        s, torch.zeros_like(s), target, divergence=kw["divergence"], beta=0.5, temperature=2.0, ignore_index=-100,
        grad_scale=torch.ones(1, dtype=acc, device=device), grad=torch.empty_like(s) if kw.get("grad", True) else None,
    )  # fmt: skip


def _bce_call(tb, dtype, kind, weighted, device):
    acc = _compute(dtype)
    x = torch.zeros(N_ROWS, 4096, dtype=dtype, device=device)
    y = torch.zeros(N_ROWS, 4096, dtype=acc, device=device)
    w = torch.ones_like(y) if weighted else None
    if kind == "bce":
        tb.binary_cross_entropy(x, y, w, grad=torch.empty_like(y))
    else:
        tb.binary_cross_entropy_with_logits(x, y, w, w, grad=torch.empty_like(y))


ROW_CALLS = {  # kernel -> (backend call, its keyword sets)
    "cross_entropy": (_ce_call, CE_KEYWORDS),
    "softmax": (_softmax_call, {"softmax": {"log": False}, "log_softmax": {"log": True}}),
    "row_partials": (_partials_call, PARTIALS_KEYWORDS),
    "cross_entropy_backward": (_backward_call, BACKWARD_KEYWORDS),
    "distillation": (_distillation_call, DISTILLATION_KEYWORDS),
}


def triton_calls(device="cpu", cover=False):
    """(Variant, ``call(tb)``: the backend call that launches it on ``device``) for every Triton variant.

    ``cover``: each keyword set of a kernel and path in one dtype only (the first set in every dtype),
    the odd vocabularies, the misaligned base and BCE in every dtype: 60% of the variants, each flag
    and each dtype of every kernel and path still compiled (the CI's audit; the full one runs here
    and on the GPU machine).
    """
    calls = []

    def add(kernel, dtype_name, variant, fn, *args):
        calls.append((Variant("triton", kernel, dtype_name, variant), lambda tb: fn(tb, *args, device)))

    for d, (dt_name, dtype) in enumerate(DTYPES.items()):
        for kernel, (fn, keywords) in ROW_CALLS.items():
            for path, r in PATHS.items():
                for i, (name, kw) in enumerate(keywords.items()):
                    if not cover or i == 0 or (i - 1) % len(DTYPES) == d:
                        add(kernel, dt_name, f"{path} {name}", fn, dtype, r, kw)
            for r in (PADDED_R, UNALIGNED_R):
                for name in ODD_R_KEYWORDS[kernel]:
                    add(kernel, dt_name, f"large-r {name} r={r}", fn, dtype, r, keywords[name])
        add("cross_entropy", dt_name, f"small-r mean r={SMALL_ODD_R}", _ce_call, dtype, SMALL_ODD_R, {})
        add("cross_entropy", dt_name, f"large-r mean r={UNALIGNED_R} {OFFSET_BASE}", _ce_call, dtype, UNALIGNED_R,
            {"offset": True})  # fmt: skip
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
    srcs, dst = kernel_io[1], kernel_io[2]
    loads = [hot_width(summary, runtime.index(p), store=False) for p in srcs if p in runtime]
    shared_bytes = compiled.metadata.shared + usage["static_shared"]
    return {
        "num_warps": num_warps, "regs": usage["regs"], "spill_bytes": usage["spill_bytes"],
        "local_bytes": usage["local_bytes"], "shared_bytes": shared_bytes,
        "ld_vector_bits": min((b for b in loads if b is not None), default=None),
        "st_vector_bits": hot_width(summary, runtime.index(dst), store=True) if dst in runtime else None,
        "occupancy": round(occupancy(usage["regs"], shared_bytes, num_warps), 3), "f64_ops": summary.f64_ops,
    }  # fmt: skip


def triton_tasks(only: str = "", cover: bool = False):
    """One task per distinct compilation: ``(variants, kernel attribute, signature, constexprs, attrs,
    options)``, for the Triton variants (of the cover, see ``triton_calls``) whose key contains ``only``.
    Variants that launch the same kernel with the same specialization (131072 and 50304 classes are
    both multiples of 16) share one compile, as they share one binary on a GPU."""
    from gpuxent.backends import triton as tb

    tasks: dict[str, tuple] = {}
    for v, call in triton_calls(cover=cover):
        if only not in v.key:
            continue
        attr = TRITON_IO[v.kernel][0]
        _, args, kwargs = record_launch(tb, attr, call)
        spec = specialize(getattr(tb, attr), args, kwargs)
        key = repr((attr, *(sorted(part.items()) for part in spec)))
        tasks.setdefault(key, ([], attr, *spec))[0].append(v)
    return list(tasks.values())


def _run_triton_task(task) -> list[dict]:
    from gpuxent.backends import triton as tb

    variants, attr, signature, constexprs, attrs, options = task
    compiled, log = compile_triton(getattr(tb, attr), signature, constexprs, attrs, options)
    metrics = audit_triton_kernel(TRITON_IO[variants[0].kernel], signature, compiled, log, options["num_warps"])
    return [_row(v, metrics) for v in variants]


# --------------------------------------------------------------------------- numba_cuda
# The kernels and their argument types come from the backend itself, whatever its kernels are: a
# subprocess under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1) makes one backend call per kernel and
# input dtype (NUMBA_CALLS) with every kernel launch replaced by a recorder, and every function of
# gpuxent.backends.numba_cuda wrapped so that each kernel is known by the builder call that made it
# (``_kernels(float32, True)[0]``: its name, arguments and position). The numba type of each launch
# argument is what a launch types it as (``numba.typeof``: C-contiguous arrays of the audit's contiguous
# tensors, int64, bool, float32...). Here, without the simulator, the same builder call gives the kernel
# again, ``cuda.compile_ptx`` compiles it for those types and ptxas assembles the PTX. A call that
# launches no kernel or several, a kernel not made by a function of the module, an argument numba
# cannot type, a rebuilt kernel that is not the recorded one (another name or parameters), or a PTX
# whose parameters do not match: the audit fails with the reason.

NUMBA_IO = {  # kernel -> (the input parameter groups read in the hot loops, the output group written there):
    # a group is the parameter of that name and every parameter named with it and "_" (logits_words)
    "cross_entropy": (("logits",), "grad"),
    "softmax": (("x",), "out"),
    "bce": (("p",), "grad"),
    "bce_with_logits": (("x",), "grad"),
    "row_partials": (("logits",), None),
    "cross_entropy_backward": (("logits",), "grad"),
    "distillation": (("student", "teacher"), "grad"),
}
NUMBA_DTYPES = tuple(DTYPES)  # the input dtypes: each row is the kernel a call on that dtype launches
NUMBA_RECORD_FLAG = "--record-numba-launches"


def numba_calls(nc, dtype: torch.dtype):
    """(kernel, variant, ``call()``): one call of the backend ``nc`` per kernel on small (N, r) CPU
    tensors of input ``dtype``, with the arguments of the Triton variants named alike."""
    acc = _compute(dtype)
    n, r = 4, 64
    t = torch.zeros(n, dtype=torch.int64)
    per_row = torch.ones(n, dtype=acc)
    ce = {"ignore_index": -100, "label_smoothing": 0.0, "z_loss": 0.0, "softcap": None}

    def x():
        return torch.zeros(n, r, dtype=dtype)

    def ce_call(stats):
        out = (torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=acc)) if stats else None
        nc.cross_entropy(x(), t, None, grad_scale=torch.ones((), dtype=acc), grad=x(), stats=out, **ce)

    def bce(kind):
        p, y = torch.zeros(n * r, dtype=dtype), torch.zeros(n * r, dtype=acc)
        if kind == "bce":
            nc.binary_cross_entropy(p, y, None, grad=torch.empty_like(y))
        else:
            nc.binary_cross_entropy_with_logits(p, y, None, None, grad=torch.empty_like(y))

    return [
        ("cross_entropy", "", lambda: ce_call(False)),
        ("cross_entropy", "stats", lambda: ce_call(True)),
        ("softmax", "", lambda: nc.softmax(x(), log=False)),
        ("bce", "", lambda: bce("bce")),
        ("bce_with_logits", "", lambda: bce("bce_with_logits")),
        ("row_partials", "", lambda: nc.row_partials(
            x(), t, None, ignore_index=-100, softcap=None, class_offset=0, smoothing=False,
            out=torch.empty(n, 5, dtype=acc))),
        ("cross_entropy_backward", "", lambda: nc.cross_entropy_backward(
            x(), t, None, per_row, per_row, None, ignore_index=-100, label_smoothing=0.0, n_classes=r,
            class_offset=0, softcap=None, grad_scale=per_row, entropy_scale=None, grad=x())),
        ("distillation", "", lambda: nc.distillation(
            x(), x(), None, divergence="kl", beta=0.5, temperature=2.0, ignore_index=-100,
            grad_scale=torch.ones(1, dtype=acc), grad=x())),
    ]  # fmt: skip


def _encode(v):
    """A builder argument as JSON (numpy dtypes by name)."""
    import numpy as np

    if isinstance(v, np.dtype):
        return {"np_dtype": v.name}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise RuntimeError(f"a numba_cuda kernel builder took {v!r}: the audit cannot rebuild the kernel from it")


def _decode(v):
    import numpy as np

    return np.dtype(v["np_dtype"]) if isinstance(v, dict) else v


def _describe(arg) -> list:
    """A kernel argument's numba type, as a launch types it: ["array", dtype, ndim, layout] or ["scalar", type]."""
    import numba
    import numpy as np

    arg = getattr(arg, "_ary", arg)  # the simulator's device array wraps a numpy array
    ty = numba.typeof(arg)
    if isinstance(arg, np.ndarray):
        return ["array", str(ty.dtype), ty.ndim, ty.layout]
    if isinstance(ty, (numba.types.Integer, numba.types.Float, numba.types.Boolean)):
        return ["scalar", str(ty)]
    raise RuntimeError(f"a numba_cuda kernel argument the audit cannot type: {arg!r} ({ty})")


def record_numba_launches() -> list[dict]:
    """Run under NUMBA_ENABLE_CUDASIM=1: every launch of every call of ``numba_calls``, as JSON-ready
    dicts (kernel, variant, dtype, builder, args, kwargs, index, qualname, params, types)."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    from gpuxent.backends import numba_cuda as nc

    made = {}  # id(kernel's Python function) -> (builder, args, kwargs, index)

    def recording(name, fn):
        def builder(*args, **kwargs):
            out = fn(*args, **kwargs)
            for i, k in enumerate(out if isinstance(out, tuple) else (out,)):
                if isinstance(k, FakeCUDAKernel) and not k._device:
                    made[id(k.fn)] = (name, args, kwargs, i if isinstance(out, tuple) else None)
            return out

        return builder

    launches = []
    device_call = FakeCUDAKernel.__call__

    def launch(self, *args):
        if self._device:  # a device function called from a running kernel: none run here
            return device_call(self, *args)
        launches.append((self.fn, args))

    patches = [mock.patch.object(FakeCUDAKernel, "__call__", launch)]
    for name, fn in vars(nc).items():
        if inspect.isfunction(inspect.unwrap(fn)) and getattr(fn, "__module__", None) == nc.__name__:
            patches.append(mock.patch.object(nc, name, recording(name, fn)))
    out = []
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        for dt_name, dtype in DTYPES.items():
            for kernel, variant, call in numba_calls(nc, dtype):
                launches.clear()
                call()
                what = f"numba_cuda.{kernel} on {dt_name} ({variant or 'plain'})"
                if len(launches) != 1:
                    raise RuntimeError(f"{what}: expected one kernel launch, got {len(launches)}")
                fn, args = launches[0]
                if id(fn) not in made:
                    raise RuntimeError(f"{what}: kernel {fn.__qualname__} was not made by a function of numba_cuda")
                builder, b_args, b_kwargs, index = made[id(fn)]
                params = list(inspect.signature(fn).parameters)
                if len(params) != len(args):
                    raise RuntimeError(f"{what}: {fn.__qualname__} takes {params}, launched with {len(args)} arguments")
                out.append({
                    "kernel": kernel, "variant": variant, "dtype": dt_name, "builder": builder,
                    "args": [_encode(a) for a in b_args], "kwargs": {k: _encode(v) for k, v in b_kwargs.items()},
                    "index": index, "qualname": fn.__qualname__, "params": params,
                    "types": [_describe(a) for a in args],
                })  # fmt: skip
    return out


def numba_launches() -> list[dict]:
    """``record_numba_launches`` in a subprocess under the simulator (this process compiles without it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["NUMBA_ENABLE_CUDASIM"] = "1"
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), NUMBA_RECORD_FLAG], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"recording the numba_cuda launches failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def _numba_type(desc):
    from numba import types as T

    if desc[0] == "array":
        return T.Array(getattr(T, desc[1]), desc[2], desc[3])
    return getattr(T, desc[1])


def numba_block_threads(kernel: str, path: str | None) -> int:
    """Threads per block of the backend's launch layout."""
    from gpuxent.backends import numba_cuda as nc

    if path is None:
        return nc.THREADS_PER_BLOCK
    tpr, rows_per_block = nc._row_layout(PATHS[path])
    return tpr * rows_per_block


def _group(params, names) -> list[str]:
    """The parameters of the groups ``names`` (see NUMBA_IO); a group that matches none is an error."""
    out = []
    for name in names:
        mine = [p for p in params if p == name or p.startswith(name + "_")]
        if not mine:
            raise RuntimeError(f"no parameter {name} (or {name}_*) among {params}: update NUMBA_IO")
        out += mine
    return out


def _run_numba_task(task) -> list[dict]:
    """Rows of one numba_cuda kernel: compiled once, one row per (kernel, dtype, variant) that launches
    it and per launch layout (the PTX is the same)."""
    _numba_setup()
    from numba import cuda

    from gpuxent.backends import numba_cuda as nc

    first, labels, only = task
    what = f"numba_cuda.{first['builder']}(...)[{first['index']}] ({first['qualname']})"
    kwargs = {k: _decode(v) for k, v in first["kwargs"].items()}
    built = getattr(nc, first["builder"])(*map(_decode, first["args"]), **kwargs)
    kernel = built if first["index"] is None else built[first["index"]]
    params = list(inspect.signature(kernel.py_func).parameters)
    if kernel.py_func.__qualname__ != first["qualname"] or params != first["params"]:
        raise RuntimeError(f"{what}: rebuilt as {kernel.py_func.__qualname__}{params}, recorded {first['params']}")
    sig = tuple(_numba_type(d) for d in first["types"])
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(ARCH // 10, ARCH % 10))
    summary = analyse_ptx(ptx)
    # a numba array is flattened into (meminfo, parent, nitems, itemsize, data, shape..., strides...)
    index, data = 0, {}
    for name, ty in zip(params, sig):
        if hasattr(ty, "ndim"):
            data[name] = index + 4
            index += 5 + 2 * ty.ndim
        else:
            index += 1
    if summary.n_params != index:
        raise RuntimeError(f"{what}: the PTX has {summary.n_params} parameters, the audit counts {index}")
    usage = ptxas_usage(ptx, f"sm_{ARCH}")
    srcs, dst = NUMBA_IO[first["kernel"]]
    arrays = [p for p, ty in zip(params, sig) if hasattr(ty, "ndim")]
    loads = [hot_width(summary, data[p], store=False) for p in _group(arrays, srcs)]
    stores = [hot_width(summary, data[p], store=True) for p in _group(arrays, (dst,))] if dst else []
    ld_bits = min((b for b in loads if b is not None), default=None)
    st_bits = min((b for b in stores if b is not None), default=None)
    reads = first["types"][params.index(_group(arrays, srcs)[0])][1]  # the dtype a kernel reads its input in
    rows = []
    for kernel_name, dtype_name, variant in labels:
        row_kernel = kernel_name in ROW_KERNELS
        for path in ("large-r", "small-r") if row_kernel else (None,):
            warps = numba_block_threads(kernel_name, path) // 32
            row = {
                "num_warps": warps, "regs": usage["regs"], "spill_bytes": usage["spill_bytes"],
                "local_bytes": usage["local_bytes"], "shared_bytes": usage["static_shared"],
                "ld_vector_bits": ld_bits, "st_vector_bits": st_bits,
                "occupancy": round(occupancy(usage["regs"], usage["static_shared"], warps), 3),
                "f64_ops": summary.f64_ops,
            }  # fmt: skip
            name = " ".join(x for x in (path or "plain", variant) if x)
            if only not in Variant("numba_cuda", kernel_name, dtype_name, name).key:
                continue
            out = _row(Variant("numba_cuda", kernel_name, dtype_name, name), row)
            out["numba_kernel"] = f"{first['builder']}({', '.join(map(str, first['args']))})[{first['index']}]"
            out["reads"] = reads
            rows.append(out)
    return rows


def numba_tasks(only: str = ""):
    """One task per distinct numba_cuda kernel: (its first recorded launch, the (kernel, dtype, variant)
    labels of every launch of it) for the launches whose "numba_cuda kernel dtype" contains ``only``."""
    tasks: dict[str, tuple] = {}
    for launch in numba_launches():
        key = json.dumps([launch["builder"], launch["args"], launch["kwargs"], launch["index"]])
        label = (launch["kernel"], launch["dtype"], launch["variant"])
        if not any(only in Variant("numba_cuda", *label[:2], name).key for name in _numba_variant_names(*label)):
            continue
        if key in tasks and tasks[key][0]["types"] != launch["types"]:
            raise RuntimeError(f"{launch['qualname']}: launched with different argument types; the audit compiles one")
        tasks.setdefault(key, (launch, [], only))[1].append(label)
    return list(tasks.values())


def _numba_variant_names(kernel: str, dtype: str, variant: str) -> list[str]:
    paths = ("large-r", "small-r") if kernel in ROW_KERNELS else ("plain",)
    return [f"{path} {variant}".strip() for path in paths]


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


def audit(backends=("triton", "numba_cuda"), jobs: int = 1, only: str = "", cover: bool = False) -> list[dict]:
    """Every row of the audit (those whose "backend kernel dtype variant" contains ``only``; ``cover``:
    the Triton variants of ``triton_calls(cover=True)``)."""
    for var in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM"):
        if os.environ.get(var, "0") not in ("", "0"):
            raise RuntimeError(f"{var} is set: the interpreters replace the compilers; unset it")
    rows = []
    if "triton" in backends:
        order = {v: i for i, (v, _) in enumerate(triton_calls(cover=cover))}  # the rows in the calls' order
        triton_rows = [r for rs in _map(_run_triton_task, triton_tasks(only, cover), jobs) for r in rs]
        rows += sorted(triton_rows, key=lambda r: order[Variant(*(r[k] for k in Variant.__dataclass_fields__))])
    if "numba_cuda" in backends:
        try:
            _numba_setup()
        except RuntimeError as exc:  # no NVVM here: said on stderr, the Triton rows stand
            print(f"# numba_cuda not audited: {exc}", file=sys.stderr)
        else:
            numba_rows = [r for rs in _map(_run_numba_task, numba_tasks(only), jobs) for r in rs]
            order = {k: i for i, k in enumerate(NUMBA_IO)}
            numba_rows.sort(key=lambda r: (NUMBA_DTYPES.index(r["dtype"]), order[r["kernel"]], r["variant"]))
            rows += numba_rows
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
# bytes, "r" or "w"), with the host-side dtype conversions around it. A kernel that walks a row again
# ("pass 2", "pass 3") reads it from L2 only while the rows in flight (programs resident on all SMs x
# the bytes of one pass over their rows, from the audit's occupancy) fit in about half of it, else from
# DRAM. A read by another kernel (the vocab-parallel gradient pass after the row partials) is from DRAM.

GPUS = {  # spec-sheet peak bandwidth; both have 132 SMs and 50 MB of L2
    "H100": {"tbps": 3.35, "sms": 132, "l2_mb": 50},
    "H200": {"tbps": 4.8, "sms": 132, "l2_mb": 50},
}

# (kernel, variant, passes): the byte model's entries. "stats": cross_entropy_with_stats (the same
# streams: its argmax and entropy are O(N)); cross_entropy_backward "fwd+bwd": the vocab-parallel step of
# one rank, row_partials then cross_entropy_backward; distillation "kl" (and reverse_kl: the same) and "jsd".
MODEL_ENTRIES = (
    ("cross_entropy", "", ("fwd", "fwd+bwd")),
    ("cross_entropy", "stats", ("fwd", "fwd+bwd")),
    ("softmax", "", ("fwd",)),
    ("row_partials", "", ("fwd",)),
    ("cross_entropy_backward", "", ("fwd+bwd",)),
    ("distillation", "kl", ("fwd", "fwd+bwd")),
    ("distillation", "jsd", ("fwd", "fwd+bwd")),
)
LOGITS_STREAMS = ("logits", "x", "input", "student", "teacher")  # reads of these are passes over the inputs


def traffic(
    backend: str, kernel: str, pass_: str, elt: int, acc: int, variant: str = "", widens: bool | None = None
) -> list[tuple[str, int, str]]:
    """The streams of one call per element: ``elt`` bytes per input element, ``acc`` per compute value.
    ``widens``: whether the backend's kernels read half inputs in the compute dtype, which torch makes
    before the launch (and the gradient written in it, narrowed after); default: numba_cuda does."""
    widens = (backend == "numba_cuda" if widens is None else widens) and elt != acc
    read = acc if widens else elt
    streams = []

    def widen(what="input"):
        if widens:
            streams.extend([(f"{what} (widening copy)", elt, "r"), (f"widened {what}", acc, "w")])

    def gradient():
        streams.append(("gradient", read, "w"))
        if widens:  # written in the compute dtype, then narrowed
            streams.extend([("gradient (narrowing copy)", acc, "r"), ("gradient in the input dtype", elt, "w")])

    if kernel == "cross_entropy":
        widen()
        streams.append(("logits, pass 1", read, "r"))
        if pass_ == "fwd+bwd":
            streams.append(("logits, pass 2", read, "r"))
            gradient()
    elif kernel == "softmax":  # out in the compute dtype; gpuxent.functional converts it to the input's
        widen()
        streams += [("x, pass 1", read, "r"), ("x, pass 2", read, "r"), ("out", acc, "w")]
        if elt != acc:
            streams += [("out (narrowing copy)", acc, "r"), ("out in the input dtype", elt, "w")]
    elif kernel == "row_partials":
        widen()
        streams.append(("logits, pass 1", read, "r"))
    elif kernel == "cross_entropy_backward":  # the rank's step: row_partials, then this kernel
        widen()
        streams.append(("logits, pass 1 (row_partials)", read, "r"))
        widen()  # each of the two calls widens its own copy
        streams.append(("logits (cross_entropy_backward, another kernel)", read, "r"))
        gradient()
    elif kernel == "distillation":
        widen("student")
        widen("teacher")
        loops = (1 if pass_ == "fwd" else 2) + (variant == "jsd")
        for k in range(1, loops + 1):
            streams += [(f"student, pass {k}", read, "r"), (f"teacher, pass {k}", read, "r")]
        if pass_ == "fwd+bwd":
            gradient()
    else:
        raise ValueError(f"no byte model for {kernel}")
    return streams


def minimum_bytes(kernel: str, pass_: str, n_rows: int, n_classes: int, elt: int) -> int:
    """The least traffic of an entry: the project's byte model (each input read once, the gradient written
    once); softmax: its input read once and its output written once, in the input dtype."""
    from gpuxent.bench import bytes_moved

    if kernel == "softmax":
        return 2 * n_rows * n_classes * elt
    if kernel == "distillation":
        return bytes_moved(n_rows, n_classes, elt, pass_, op="distillation")
    return bytes_moved(n_rows, n_classes, elt, pass_)


MODEL_VARIANTS = {  # the audit row whose occupancy gives the rows in flight of an entry (large-r path)
    ("triton", "cross_entropy", ""): "large-r mean",
    ("triton", "cross_entropy", "stats"): "large-r stats",
    ("triton", "softmax", ""): "large-r softmax",
    ("triton", "row_partials", ""): "large-r plain",
    ("triton", "cross_entropy_backward", ""): "large-r plain",
    ("triton", "distillation", "kl"): "large-r kl",
    ("triton", "distillation", "jsd"): "large-r jsd",
    ("numba_cuda", "cross_entropy", "stats"): "large-r stats",
}


def _audit_row(audit_rows, backend, kernel, dtype, variant) -> dict | None:
    name = MODEL_VARIANTS.get((backend, kernel, variant), "large-r")
    for r in audit_rows:
        if (r["backend"], r["kernel"], r["dtype"], r["variant"]) == (backend, kernel, dtype, name):
            return r
    return None


def _resident_rows(audit_rows, backend, kernel, dtype, variant="") -> int | None:
    """Rows in flight per SM on the large-r path (one row per block), from the audit's occupancy."""
    r = _audit_row(audit_rows, backend, kernel, dtype, variant)
    return None if r is None else round(r["occupancy"] * MAX_WARPS_PER_SM / r["num_warps"])


def numba_widens(audit_rows, dtype: str) -> bool | None:
    """Whether numba_cuda's cross-entropy kernel reads ``dtype`` input in another dtype (a widened copy),
    from the audit's record of its launch; None where numba_cuda was not audited."""
    r = _audit_row(audit_rows, "numba_cuda", "cross_entropy", dtype, "")
    if r is None or "reads" not in r:
        return None
    import numpy as np

    reads = np.dtype(r["reads"]).itemsize
    return reads != DTYPES[dtype].itemsize


def byte_model(audit_rows, n_rows=16384, n_classes=131072, dtype="bf16") -> list[dict]:
    """Predicted traffic and time of each row kernel at one size, on an H100 and an H200 (numba_cuda's
    entries only where the audit has its kernels: whether it widens half inputs comes from them)."""
    elt = DTYPES[dtype].itemsize
    acc = _compute(DTYPES[dtype]).itemsize
    n = n_rows * n_classes
    out = []
    for backend in ("triton", "numba_cuda"):
        widens = False if backend == "triton" else numba_widens(audit_rows, dtype)
        if widens is None:
            continue
        for kernel, variant, passes in MODEL_ENTRIES:
            for pass_ in passes:
                streams = traffic(backend, kernel, pass_, elt, acc, variant, widens)
                row = {
                    "backend": backend, "kernel": kernel, "variant": variant, "pass": pass_, "dtype": dtype,
                    "n_rows": n_rows, "n_classes": n_classes, "streams": streams,
                    "read": sum(b for _, b, rw in streams if rw == "r"),
                    "write": sum(b for _, b, rw in streams if rw == "w"),
                    "passes": sum(1 for what, _, rw in streams if rw == "r" and what.startswith(LOGITS_STREAMS)),
                    "min_bytes": minimum_bytes(kernel, pass_, n_rows, n_classes, elt),
                }  # fmt: skip
                resident = _resident_rows(audit_rows, backend, kernel, dtype, variant)
                one_pass = sum(b for what, b, _ in streams if "pass 1" in what)
                reread = sum(b for what, b, _ in streams if re.search(r"pass [2-9]", what))
                row["in_flight_mb"] = None
                if resident is not None and reread:
                    row["in_flight_mb"] = resident * GPUS["H100"]["sms"] * n_classes * one_pass / 1e6
                from_l2 = row["in_flight_mb"] is not None and row["in_flight_mb"] < GPUS["H100"]["l2_mb"] / 2
                other_kernel = any("another kernel" in what for what, _, _ in streams)
                row["reread_from"] = "DRAM" if other_kernel else "-" if not reread else "L2" if from_l2 else "DRAM"
                row["dram_bytes"] = (row["read"] + row["write"] - (reread if from_l2 else 0)) * n
                for name, gpu in GPUS.items():
                    row[f"ms_{name}"] = row["dram_bytes"] / (gpu["tbps"] * 1e9)
                    row[f"min_ms_{name}"] = row["min_bytes"] / (gpu["tbps"] * 1e9)
                out.append(row)
    return out


def byte_model_json(row: dict) -> dict:
    """One byte-model entry as a JSON line of ``--json``."""
    return {
        "kind": "byte_model", "backend": row["backend"], "kernel": row["kernel"], "variant": row["variant"],
        "pass": row["pass"], "dtype": row["dtype"], "n_rows": row["n_rows"], "n_classes": row["n_classes"],
        "read_bytes_per_element": row["read"], "write_bytes_per_element": row["write"], "passes": row["passes"],
        "reread_from": row["reread_from"], "dram_gb": round(row["dram_bytes"] / 1e9, 4),
        "minimum_gb": round(row["min_bytes"] / 1e9, 4), "ms_H100": round(row["ms_H100"], 4),
        "ms_H200": round(row["ms_H200"], 4), "streams": [list(st) for st in row["streams"]],
    }  # fmt: skip


def byte_model_markdown(model, n_rows=16384, n_classes=131072, dtype="bf16") -> str:
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    lines = [
        f"PREDICTIONS, not measurements: {n_rows} x {n_classes} {dtype}, DRAM bytes over the spec-sheet peak "
        f"bandwidth (H100 {GPUS['H100']['tbps']} TB/s, H200 {GPUS['H200']['tbps']} TB/s); a device copy reaches "
        'about 90% of peak, so measured times should be about 10% longer at best. "minimum" is the project\'s '
        "byte model (`gpuxent.bench.bytes_moved`, what GB/s figures divide by; softmax: read once, written once).",
        "",
        "| backend | kernel | pass | read B/elt | write B/elt | passes over the inputs | rows in flight (MB) "
        "| 2nd read from | DRAM GB | H100 ms | H200 ms | minimum GB | minimum H100 ms | minimum H200 ms |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in model:
        flight = "-" if r["in_flight_mb"] is None else f"{r['in_flight_mb']:.0f}"
        kernel = f"{r['kernel']} {r['variant']}".strip()
        lines.append(
            f"| {r['backend']} | {kernel} | {r['pass']} | {r['read']} | {r['write']} | {r['passes']} | {flight} "
            f"| {r['reread_from']} | {r['dram_bytes'] / 1e9:.2f} | {ms(r['ms_H100'])} | {ms(r['ms_H200'])} "
            f"| {r['min_bytes'] / 1e9:.2f} | {ms(r['min_ms_H100'])} | {ms(r['min_ms_H200'])} |"
        )
    lines += ["", "Streams per element:", ""]
    for r in model:
        desc = ", ".join(f"{'read' if rw == 'r' else 'write'} {what} ({b} B)" for what, b, rw in r["streams"])
        lines.append(f"- {r['backend']} {r['kernel']} {r['variant']} {r['pass']}: {desc}".replace("  ", " "))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per variant and line")
    out.add_argument("--markdown", action="store_true", help="the table and the byte model, for RESULTS.md")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile in N processes")
    p.add_argument("--backend", choices=["triton", "numba_cuda"], action="append", help="only these (repeatable)")
    p.add_argument("--only", default="", help='only variants whose "backend kernel dtype variant" contains this')
    p.add_argument("--cover", action="store_true", help="each Triton keyword set in one dtype (the CI's subset)")
    args = p.parse_args(argv)
    rows = audit(tuple(args.backend or ("triton", "numba_cuda")), args.jobs, args.only, args.cover)
    if args.json:  # the audit's rows ("kind": "audit"), then the byte model's entries for every dtype
        for r in rows:
            print(json.dumps({"kind": "audit", **r}))
        for dtype in DTYPES:
            for entry in byte_model(rows, dtype=dtype):
                print(json.dumps(byte_model_json(entry)))
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
    if sys.argv[1:] == [NUMBA_RECORD_FLAG]:  # the simulator subprocess of numba_launches()
        print(json.dumps(record_numba_launches()))
        sys.exit(0)
    sys.exit(main())
