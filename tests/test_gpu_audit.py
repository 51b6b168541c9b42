"""The GPU compile audit (benchmarks/gpu_audit.py) in CI, without a GPU.

A cover of the Triton kernel variants (each keyword set in one dtype, each dtype of every kernel and
path, every odd vocabulary in every dtype: ``gpu_audit.py --cover``; the full audit is the script
without it) and every numba_cuda kernel (cross-entropy with and without statistics, softmax, BCE,
row partials, the vocab-parallel gradient pass, distillation) is compiled for sm_90 as
the JIT compiles it (one subprocess, without the interpreters), then checked: no spills or local
memory, 128-bit input and output accesses in the hot loops of every Triton row kernel at every row
length (GPT-2's odd 50257 as the padded 50304), element-wide ones where the base is off 16 bytes,
occupancy of the large-r path, no float64 math in float32 kernels, a byte-model line per entry. The
audit's own pieces (PTX data flow, ptxas log, occupancy, numba kernels that change) are checked on
small known inputs, and on a GPU its view is compared with what the JIT built.
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
    """The audit's rows, its byte-model entries, and its stderr (which says why numba_cuda was not
    audited, where it was not)."""

    stderr = ""
    byte_model: list = []


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    jobs = str(min(4, os.cpu_count() or 1))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", "--cover", "--jobs", jobs], env=env, cwd=ROOT, capture_output=True,
        text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {line["kind"] for line in lines} <= {"audit", "byte_model"}
    out = Rows(line for line in lines if line["kind"] == "audit")
    for r in out:
        r["key"] = f"{r['backend']} {r['kernel']} {r['dtype']} {r['variant']}"
    out.byte_model = [line for line in lines if line["kind"] == "byte_model"]
    out.stderr = proc.stderr
    return out


@pytest.fixture(scope="module")
def by_key(rows):
    return {r["key"]: r for r in rows}


def _bad(rows, pred):
    return "\n".join(f"{r['key']}: {json.dumps({k: r[k] for k in audit.KEYS[4:]})}" for r in rows if pred(r))


def test_every_variant_is_audited(by_key):
    """The cover (``triton_calls(cover=True)``, 60% of the variants): every keyword set of each kernel and
    path in some dtype, every dtype of each kernel and path, every odd vocabulary in every dtype."""
    full = [v.key for v, _ in audit.triton_calls()]
    expected = [v.key for v, _ in audit.triton_calls(cover=True)]
    assert len(full) == len(set(full)) > 300 and set(expected) < set(full)
    for kernel, (_, keywords) in audit.ROW_CALLS.items():
        for path in audit.PATHS:
            for name in keywords:
                assert any(f"triton {kernel} {dtype} {path} {name}" in expected for dtype in audit.DTYPES)
            for dtype in audit.DTYPES:
                assert any(k.startswith(f"triton {kernel} {dtype} {path} ") for k in expected)
        for dtype in audit.DTYPES:
            for r in (audit.PADDED_R, audit.UNALIGNED_R):  # every kernel at the padded and the odd vocabulary
                for name in audit.ODD_R_KEYWORDS[kernel]:
                    assert f"triton {kernel} {dtype} large-r {name} r={r}" in expected
    missing = [k for k in expected if k not in by_key]
    assert not missing, missing
    for row in by_key.values():
        assert set(audit.KEYS) <= set(row)


def test_numba_kernels_are_audited(rows):  # not named for gpu_check's -k numba_cuda: no GPU needed
    numba_rows = [r for r in rows if r["backend"] == "numba_cuda"]
    if not numba_rows:
        pytest.skip(f"numba_cuda was not audited here: {rows.stderr.strip()[-500:]}")
    kernels = {(r["kernel"], r["dtype"]) for r in numba_rows}
    assert kernels == {(k, d) for k in audit.NUMBA_IO for d in audit.NUMBA_DTYPES}
    variants = {(r["kernel"], r["variant"]) for r in numba_rows}
    for kernel in audit.ROW_KERNELS:
        assert {(kernel, "large-r"), (kernel, "small-r")} <= variants
    assert {("cross_entropy", "large-r stats"), ("bce", "plain"), ("bce_with_logits", "plain")} <= variants
    # each row names the builder call that made its kernel and the dtype the kernel reads its input in
    assert all(r["numba_kernel"] and r["reads"] for r in numba_rows)


LOUD_CHECK = """
import sys
sys.path.insert(0, "benchmarks")
import gpu_audit as audit
try:
    audit._numba_setup()
except RuntimeError as exc:
    print("SKIP", exc)
    sys.exit(0)
first = next(launch for launch in audit.numba_launches() if launch["kernel"] == "cross_entropy")
changed = dict(first, params=first["params"][:-1] + ["renamed"])
try:
    audit._run_numba_task((changed, [("cross_entropy", "fp32", "")], ""))
except RuntimeError as exc:
    print("RAISED", exc)
"""


def test_numba_audit_fails_loudly_when_a_kernel_changes():
    """A kernel whose parameters differ from the recorded launch's, or an input no parameter matches:
    errors with the reason, not rows that silently leave a kernel out. (In a subprocess: this one runs
    numba's simulator, which cannot compile.)"""
    with pytest.raises(RuntimeError, match="no parameter logits"):
        audit._group(["x", "x_words", "grad"], ("logits",))
    assert audit._group(["logits", "logits_words", "logits_off", "lse"], ("logits",)) == [
        "logits", "logits_words", "logits_off",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", LOUD_CHECK], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP"):
        pytest.skip(f"numba_cuda cannot compile here: {proc.stdout}")
    assert proc.stdout.startswith("RAISED") and "rebuilt as" in proc.stdout, proc.stdout


def _row_kernel_rows(rows, backend="triton"):
    return [r for r in rows if r["backend"] == backend and r["kernel"] in audit.ROW_KERNELS]


def test_row_kernel_accesses_are_128_bit(rows):
    """Aligned inputs, every row length (odd ones peeled): 16-byte vector loads of the inputs and stores
    of the gradient (or softmax) in the hot loops of every Triton row kernel, every dtype and variant."""
    hot = [r for r in _row_kernel_rows(rows) if audit.OFFSET_BASE not in r["variant"]]
    expected = [v for v, _ in audit.triton_calls(cover=True) if v.kernel in audit.ROW_KERNELS]
    assert len(hot) == len([v for v in expected if audit.OFFSET_BASE not in v.variant])
    bad = _bad(hot, lambda r: r["ld_vector_bits"] != 128 or r["st_vector_bits"] not in (128, None))
    assert not bad, f"narrower than 128-bit accesses:\n{bad}"
    no_output = [r for r in hot if "forward" in r["variant"] or r["kernel"] == "row_partials"]
    assert no_output and all(r["st_vector_bits"] is None for r in no_output)
    assert all(r["st_vector_bits"] == 128 for r in hot if r not in no_output)


@pytest.mark.parametrize("dtype", HALF_AND_SINGLE + ("fp64",))
def test_odd_vocabulary_is_as_wide_as_the_padded_one(by_key, dtype):
    """GPT-2's 50257 (every row off 16 bytes) against 50304: the same 128-bit accesses, no spill."""
    for kernel, names in audit.ODD_R_KEYWORDS.items():
        for name in names:
            odd = by_key[f"triton {kernel} {dtype} large-r {name} r={audit.UNALIGNED_R}"]
            padded = by_key[f"triton {kernel} {dtype} large-r {name} r={audit.PADDED_R}"]
            for row in (odd, padded):
                assert row["ld_vector_bits"] == 128 and row["st_vector_bits"] in (128, None), row["key"]
                assert row["spill_bytes"] == row["local_bytes"] == 0, row["key"]
            assert odd["st_vector_bits"] == padded["st_vector_bits"]


def test_unaligned_base_falls_back_to_narrower_accesses(by_key):
    """Logits one element past a 16-byte boundary cannot be peeled to alignment: element-wide accesses,
    which the audit must see (an analysis that always said 128 would pass the tests above)."""
    for dtype, bits in (("fp32", 32), ("bf16", 16), ("fp16", 16), ("fp64", 64)):
        row = by_key[f"triton cross_entropy {dtype} large-r mean r={audit.UNALIGNED_R} {audit.OFFSET_BASE}"]
        assert row["ld_vector_bits"] == row["st_vector_bits"] == bits


def test_large_r_occupancy_at_least_half(rows):
    """The large-r path of every Triton row kernel at >= 50% (the training path of fp32 and half at 100%),
    but for jsd (the log of a mixture per element at 8 warps: down to 37.5% on odd rows) and float64
    distillation; numba_cuda's cross-entropy in fp32 and half."""
    large = [r for r in _row_kernel_rows(rows) if r["variant"].startswith("large-r")]
    large = [
        r for r in large if not (r["kernel"] == "distillation" and ("jsd" in r["variant"] or r["dtype"] == "fp64"))
    ]
    large += [
        r for r in rows if r["backend"] == "numba_cuda" and r["kernel"] == "cross_entropy" and r["variant"] == "large-r"
        and r["dtype"] in HALF_AND_SINGLE
    ]  # fmt: skip
    assert len(large) >= 4 * len(audit.CE_KEYWORDS)
    bad = _bad(large, lambda r: r["occupancy"] < 0.5 or r["spill_bytes"])
    assert not bad, f"theoretical occupancy below 50%:\n{bad}"
    for dtype in HALF_AND_SINGLE:
        for r in (audit.PATHS["large-r"], audit.PADDED_R, audit.UNALIGNED_R):
            name = "large-r mean" + ("" if r == audit.PATHS["large-r"] else f" r={r}")
            assert next(x for x in large if x["key"] == f"triton cross_entropy {dtype} {name}")["occupancy"] == 1.0


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

    model = {(m["backend"], m["kernel"], m["variant"], m["pass"]): m for m in audit.byte_model(rows)}
    n, r = 16384, 131072
    ce = model[("triton", "cross_entropy", "", "fwd+bwd")]
    assert ce["min_bytes"] == bytes_moved(n, r, 2, "fwd+bwd") == 2 * 2 * n * r
    assert (ce["read"], ce["write"], ce["passes"]) == (4, 2, 2)
    assert model[("triton", "cross_entropy", "", "fwd")]["dram_bytes"] == bytes_moved(n, r, 2, "fwd")
    assert model[("triton", "row_partials", "", "fwd")]["dram_bytes"] == bytes_moved(n, r, 2, "fwd")
    vp = model[("triton", "cross_entropy_backward", "", "fwd+bwd")]  # two kernels: the second read is DRAM's
    assert (vp["read"], vp["write"], vp["passes"], vp["reread_from"]) == (4, 2, 2, "DRAM")
    kl, jsd = model[("triton", "distillation", "kl", "fwd+bwd")], model[("triton", "distillation", "jsd", "fwd+bwd")]
    assert kl["min_bytes"] == jsd["min_bytes"] == bytes_moved(n, r, 2, "fwd+bwd", op="distillation")
    assert (kl["passes"], jsd["passes"], kl["read"], jsd["read"]) == (4, 6, 8, 12)
    assert "PREDICTIONS" in audit.byte_model_markdown(list(model.values()))
    # numba_cuda: the dtype its kernel reads a bfloat16 input in decides widening copies around it
    widens = audit.numba_widens(rows, "bf16")
    if widens is None:
        assert not any(k[0] == "numba_cuda" for k in model)
        return
    nc = model[("numba_cuda", "cross_entropy", "", "fwd+bwd")]
    expected = (2 + 4 + 4 + 4, 4 + 4 + 2, 3) if widens else (4, 2, 2)
    assert (nc["read"], nc["write"], nc["passes"]) == expected


def test_json_has_a_byte_model_row_per_entry(rows):
    """``--json``: one line per byte-model entry and dtype, at 16384 x 131072, after the audit's rows."""
    from gpuxent.bench import bytes_moved

    entries = {(m["backend"], m["kernel"], m["variant"], m["pass"], m["dtype"]): m for m in rows.byte_model}
    assert len(entries) == len(rows.byte_model)
    backends = {"triton"} | ({"numba_cuda"} if any(r["backend"] == "numba_cuda" for r in rows) else set())
    for backend in backends:
        for kernel, variant, passes in audit.MODEL_ENTRIES:
            for pass_ in passes:
                for dtype in audit.DTYPES:
                    m = entries[(backend, kernel, variant, pass_, dtype)]
                    assert (m["n_rows"], m["n_classes"]) == (16384, 131072)
                    assert m["dram_gb"] >= m["minimum_gb"] > 0
    elt = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
    for dtype, size in elt.items():
        m = entries[("triton", "cross_entropy", "", "fwd+bwd", dtype)]
        assert m["minimum_gb"] == round(bytes_moved(16384, 131072, size, "fwd+bwd") / 1e9, 4)


# --------------------------------------------------------------------------- on a GPU

JIT_CHECKED = (
    "cross_entropy bf16 large-r mean",
    "cross_entropy fp32 large-r mean",
    "cross_entropy bf16 small-r mean",
    f"cross_entropy bf16 large-r mean r={audit.UNALIGNED_R}",
    f"cross_entropy fp32 large-r mean r={audit.UNALIGNED_R}",
    f"cross_entropy bf16 large-r stats r={audit.UNALIGNED_R}",
    f"cross_entropy bf16 small-r mean r={audit.SMALL_ODD_R}",
    f"softmax bf16 large-r softmax r={audit.UNALIGNED_R}",
    f"row_partials bf16 large-r plain r={audit.UNALIGNED_R}",
    f"cross_entropy_backward bf16 large-r plain r={audit.UNALIGNED_R}",
    f"distillation bf16 large-r jsd r={audit.UNALIGNED_R}",
)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: compares the audit with what the JIT built there")
def test_triton_jit_on_this_gpu_builds_what_the_audit_compiled():
    """The kernels a real launch compiles have the audit's registers, spills and access widths."""
    import torch

    from gpuxent.backends import triton as tb

    checked = 0
    for v, call in audit.triton_calls(device="cuda"):
        if f"{v.kernel} {v.dtype} {v.variant}" not in JIT_CHECKED:
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
        _, srcs, dst = audit.TRITON_IO[v.kernel]
        assert jit.n_regs == aot["regs"] and jit.n_spills == aot["spill_bytes"] == 0, v.key
        assert min(audit.hot_width(got, names.index(p), store=False) for p in srcs) == aot["ld_vector_bits"], v.key
        if dst is not None:
            assert audit.hot_width(got, names.index(dst), store=True) == aot["st_vector_bits"], v.key
        checked += 1
    assert checked == len(JIT_CHECKED)
