"""The GPU compile audit (benchmarks/gpu_audit.py) in CI, without a GPU.

Every Triton kernel variant and every numba_cuda kernel is compiled for sm_90 as the JIT compiles it
on aligned inputs (one subprocess, without the interpreters), then checked: no spills or local
memory, 128-bit logits and gradient accesses on the large-r path, occupancy of the large-r path,
no float64 math in float32 kernels. The audit's own pieces (PTX data flow, ptxas log, occupancy)
are checked on small known inputs, and on a GPU its view is compared with what the JIT built.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_CUDA

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_audit.py"
spec = importlib.util.spec_from_file_location("gpu_audit", SCRIPT)
audit = sys.modules["gpu_audit"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)

HALF_AND_SINGLE = ("fp32", "bf16", "fp16")


class Rows(list):
    """The audit's rows, and its stderr (which says why numba_cuda was not audited, where it was not)."""

    stderr = ""


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--jobs", jobs], env=env, cwd=ROOT, capture_output=True, text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = Rows(json.loads(line) for line in proc.stdout.splitlines())
    for r in out:
        r["key"] = f"{r['backend']} {r['kernel']} {r['dtype']} {r['variant']}"
    out.stderr = proc.stderr
    return out


@pytest.fixture(scope="module")
def by_key(rows):
    return {r["key"]: r for r in rows}


def _bad(rows, pred):
    return "\n".join(f"{r['key']}: {json.dumps({k: r[k] for k in audit.KEYS[4:]})}" for r in rows if pred(r))


def test_every_variant_is_audited(by_key):
    expected = [v.key for v, _ in audit.triton_calls()]
    assert len(expected) == len(set(expected)) > 100
    for dtype in audit.DTYPES:
        for path in audit.PATHS:
            for name in audit.CE_KEYWORDS:
                assert f"triton cross_entropy {dtype} {path} {name}" in expected
    missing = [k for k in expected if k not in by_key]
    assert not missing, missing
    for row in by_key.values():
        assert set(audit.KEYS) <= set(row)


def test_numba_kernels_are_audited(rows):  # not named for gpu_check's -k numba_cuda: no GPU needed
    numba_rows = [r for r in rows if r["backend"] == "numba_cuda"]
    if not numba_rows:
        pytest.skip(f"numba_cuda was not audited here: {rows.stderr.strip()[-500:]}")
    kernels = {(r["kernel"], r["dtype"]) for r in numba_rows}
    assert kernels == {(k, d) for k in audit.NUMBA_KERNELS for d in audit.NUMBA_DTYPES}


def test_no_variant_spills_or_uses_local_memory(rows):
    bad = _bad(rows, lambda r: r["spill_bytes"] or r["local_bytes"])
    assert not bad, f"register spills or local memory:\n{bad}"


def test_large_r_logits_and_gradient_accesses_are_128_bit(rows):
    """Aligned inputs: 16-byte vector loads of the logits and stores of the gradient in the hot loops."""
    hot = [
        r for r in rows
        if r["backend"] == "triton" and r["kernel"] in ("cross_entropy", "softmax") and r["dtype"] in HALF_AND_SINGLE
        and r["variant"].startswith("large-r") and "r=" not in r["variant"]
    ]  # fmt: skip
    assert len(hot) == len(HALF_AND_SINGLE) * (len(audit.CE_KEYWORDS) + 2)
    bad = _bad(hot, lambda r: r["ld_vector_bits"] != 128 or r["st_vector_bits"] not in (128, None))
    assert not bad, f"narrower than 128-bit accesses:\n{bad}"
    assert all(r["st_vector_bits"] is None for r in hot if "forward" in r["variant"])


def test_unaligned_rows_fall_back_to_narrower_accesses(by_key):
    """An odd row length (GPT-2's 50257) starts rows off 16-byte boundaries: element-wide accesses,
    which the audit must see (an analysis that always said 128 would pass the test above)."""
    for dtype, bits in (("fp32", 32), ("bf16", 16), ("fp16", 16), ("fp64", 64)):
        row = by_key[f"triton cross_entropy {dtype} large-r mean r={audit.UNALIGNED_R}"]
        assert row["ld_vector_bits"] == row["st_vector_bits"] == bits


def test_large_r_occupancy_at_least_half(rows):
    large = [r for r in rows if r["kernel"] == "cross_entropy" and r["variant"].startswith("large-r")]
    large = [r for r in large if r["backend"] == "triton" or r["dtype"] in HALF_AND_SINGLE]
    assert len(large) >= 4 * len(audit.CE_KEYWORDS)
    bad = _bad(large, lambda r: r["occupancy"] < 0.5)
    assert not bad, f"theoretical occupancy below 50%:\n{bad}"


def test_float32_kernels_do_no_float64_math(rows):
    bad = _bad(rows, lambda r: r["dtype"] != "fp64" and r["f64_ops"])
    assert not bad, f"float64 instructions in float32 kernels:\n{bad}"
    assert all(r["f64_ops"] > 0 for r in rows if r["dtype"] == "fp64")  # the count can see them


# --------------------------------------------------------------------------- the audit's pieces


@pytest.mark.parametrize(
    "regs, smem, warps, expected",
    [
        (32, 0, 16, 1.0),  # 32 x 32 = 1024 registers a warp: 64 warps fit
        (64, 0, 16, 0.5),  # 2048 a warp: 32 warps, two blocks of 16
        (65, 0, 16, 0.25),  # 2080 rounds up to 2304: 28 warps, one block of 16
        (40, 0, 8, 0.75),  # 1280 a warp: 51 warps, six blocks of 8
        (32, 100 * 1024, 16, 0.5),  # shared memory: two blocks of 101 KiB fit in 228 KiB
        (255, 0, 4, 0.125),  # 8192 a warp: 8 warps, two blocks of 4
    ],
)
def test_occupancy(regs, smem, warps, expected):
    assert audit.occupancy(regs, smem, warps) == expected


def test_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    24 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 8192 bytes smem, 24 bytes cumulative stack size
"""
    assert audit.parse_ptxas_log(log) == {"regs": 64, "spill_bytes": 32, "local_bytes": 24, "static_shared": 8192}
    with pytest.raises(RuntimeError, match="unexpected ptxas output"):
        audit.parse_ptxas_log("ptxas fatal : Unsupported .version 9.4")


PTX = """
.visible .entry k(
    .param .u64 .ptr .global .align 1 k_param_0,
    .param .u64 .ptr .global .align 1 k_param_1,
    .param .u32 k_param_2
)
{
    ld.param.b64 %rd1, [k_param_0];
    ld.param.b64 %rd2, [k_param_1];
    ld.param.b32 %r1, [k_param_2];
    ld.global.b16 { %rs1 }, [ %rd1 + 0 ];
    mov.b32 %r2, 0;
$L__BB0_1:
    mul.wide.s32 %rd3, %r2, %r1;
    add.s64 %rd4, %rd1, %rd3;
    @%p1 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd4 + 0 ];
    add.s64 %rd5, %rd2, %rd3;
    st.global.v2.f32 [ %rd5 + 0 ], { %f1, %f2 };
    add.s32 %r2, %r2, 4096;
    setp.lt.s32 %p2, %r2, %r1;
    @%p2 bra $L__BB0_1;
    add.f64 %fd1, %fd2, %fd3;
    st.global.f64 [ %rd2 + 0 ], %fd1;
    ret;
}
"""


def test_ptx_analysis_ties_accesses_to_parameters_and_loops():
    s = audit.analyse_ptx(PTX)
    assert s.n_params == 3 and s.f64_ops == 2
    assert [(a.store, a.bits, a.in_loop) for a in s.accesses] == [
        (False, 16, False), (False, 128, True), (True, 64, True), (True, 64, False),
    ]  # fmt: skip
    assert [a.params for a in s.accesses] == [{0}, {0, 2}, {1, 2}, {1}]
    assert audit.hot_width(s, 0, store=False) == 128  # the scalar load outside the loop is not the hot path
    assert audit.hot_width(s, 1, store=True) == 64
    assert audit.hot_width(s, 2, store=False) == 128 and audit.hot_width(s, 7, store=False) is None


def test_byte_model_uses_the_project_byte_model(rows):
    from gpuxent.bench import bytes_moved

    model = {(m["backend"], m["kernel"], m["pass"]): m for m in audit.byte_model(rows)}
    n, r = 16384, 131072
    ce = model[("triton", "cross_entropy", "fwd+bwd")]
    assert ce["min_bytes"] == bytes_moved(n, r, 2, "fwd+bwd") == 2 * 2 * n * r
    assert (ce["read"], ce["write"], ce["passes"]) == (4, 2, 2)
    assert model[("triton", "cross_entropy", "fwd")]["dram_bytes"] == bytes_moved(n, r, 2, "fwd")
    # numba_cuda has no bfloat16 kernel: widening and narrowing copies around a float32 kernel
    nc = model[("numba_cuda", "cross_entropy", "fwd+bwd")]
    assert (nc["read"], nc["write"], nc["passes"]) == (2 + 4 + 4 + 4, 4 + 4 + 2, 3)
    assert "PREDICTIONS" in audit.byte_model_markdown(list(model.values()))


# --------------------------------------------------------------------------- on a GPU

JIT_CHECKED = (
    "bf16 large-r mean",
    "fp32 large-r mean",
    "bf16 small-r mean",
    f"bf16 large-r mean r={audit.UNALIGNED_R}",
)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: compares the audit with what the JIT built there")
def test_triton_jit_on_this_gpu_builds_what_the_audit_compiled():
    """The kernels a real launch compiles have the audit's registers, spills and access widths."""
    import torch

    from gpuxent.backends import triton as tb

    checked = 0
    for v, call in audit.triton_calls(device="cuda"):
        if v.kernel != "cross_entropy" or f"{v.dtype} {v.variant}" not in JIT_CHECKED:
            continue
        attr = audit.TRITON_IO[v.kernel][0]
        fn = getattr(tb, attr)
        grid, args, kwargs = audit.record_launch(tb, attr, call)
        jit = fn[grid](*args, **kwargs)  # the JIT's own compile and launch: returns the compiled kernel
        torch.cuda.synchronize()
        jit._init_handles()  # loaded on the device: n_regs and n_spills are known
        signature, constexprs, attrs, options = audit.specialize(fn, args, kwargs)
        compiled, log = audit.compile_triton(fn, signature, constexprs, attrs, options)
        aot = audit.audit_triton_kernel(audit.TRITON_IO[v.kernel], signature, compiled, log, options["num_warps"])
        got = audit.analyse_ptx(jit.asm["ptx"])
        names = [k for k, t in signature.items() if t != "constexpr"]
        assert jit.n_regs == aot["regs"] and jit.n_spills == aot["spill_bytes"] == 0, v.key
        assert audit.hot_width(got, names.index("logits_ptr"), store=False) == aot["ld_vector_bits"], v.key
        assert audit.hot_width(got, names.index("grad_ptr"), store=True) == aot["st_vector_bits"], v.key
        checked += 1
    assert checked == len(JIT_CHECKED)
