"""Compile every Triton kernel for a Hopper GPU (sm_90) without one: Triton's front end, LLVM and
ptxas run on the CPU. The interpreter accepts programs that the compiler rejects (types, layouts,
unsupported ops); this catches those. Run by tests/test_triton.py in a process without
TRITON_INTERPRET (the interpreter replaces the compiler)."""

import itertools
import os
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "the compiler, not the interpreter"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gpuxent.backends import triton as tb  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOATS = ("smoothing_hi", "smoothing_lo", "z_loss_hi", "z_loss_lo", "softcap_hi", "softcap_lo", "scale_hi", "scale_lo")


def compile_kernel(fn, types, consts, num_warps):
    signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=TARGET,
                          options={"num_warps": num_warps})  # fmt: skip


def main() -> int:
    count = 0
    for elt in ("fp32", "bf16", "fp64"):
        acc = "fp64" if elt == "fp64" else "fp32"
        for prob, smoothing, softcap in itertools.product([False, True], repeat=3):
            weight = smoothing != softcap
            block, rows, warps = (4096, 1, 16) if not smoothing else (64, 16, 4)  # the large- and small-r paths
            types = dict(
                logits_ptr=f"*{elt}", target_ptr=f"*{elt}" if prob else "*i64", weight_ptr=f"*{acc}",
                grad_scale_ptr=f"*{acc}", grad_ptr=f"*{elt}", loss_ptr=f"*{acc}", lse_ptr=f"*{acc}",
                stride_logits="i64", stride_target="i64", stride_grad="i64", stride_scale="i64",
                n_rows="i32", n_classes="i32",
                ignore_index="i32", **dict.fromkeys(FLOATS, "fp32"),
            )  # fmt: skip
            consts = dict(
                PROB_TARGET=prob, HAS_WEIGHT=weight, HAS_SMOOTHING=smoothing, HAS_Z_LOSS=softcap,
                HAS_SOFTCAP=softcap, WANT_GRAD=not (prob and weight), SCALE_IS_PTR=weight, ROWS=rows, BLOCK=block,
            )  # fmt: skip
            compile_kernel(tb._cross_entropy_kernel, types, consts, warps)
            count += 1
        for log in (False, True):
            types = dict(
                x_ptr=f"*{elt}", out_ptr=f"*{acc}", stride_x="i64", stride_out="i64", n_rows="i32", n_classes="i32"
            )
            compile_kernel(tb._softmax_kernel, types, dict(LOG=log, ROWS=1, BLOCK=4096), 16)
            count += 1
        for with_flags in (False, True):
            types = dict(probs_ptr=f"*{elt}", target_ptr=f"*{acc}", weight_ptr=f"*{acc}", loss_ptr=f"*{acc}",
                         grad_ptr=f"*{acc}", n_elements="i64")  # fmt: skip
            compile_kernel(tb._bce_kernel, types, dict(HAS_WEIGHT=with_flags, WANT_GRAD=True, BLOCK=tb.BCE_BLOCK), 4)
            types = dict(logits_ptr=f"*{elt}", target_ptr=f"*{acc}", weight_ptr=f"*{acc}", pos_weight_ptr=f"*{acc}",
                         loss_ptr=f"*{acc}", grad_ptr=f"*{acc}", n_elements="i64")  # fmt: skip
            consts = dict(HAS_WEIGHT=with_flags, HAS_POS_WEIGHT=with_flags, WANT_GRAD=True, BLOCK=tb.BCE_BLOCK)
            compile_kernel(tb._bce_logits_kernel, types, consts, 4)
            count += 2
    print(f"compiled {count} kernel variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
