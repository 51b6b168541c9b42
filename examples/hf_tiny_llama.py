"""Fine-tune a tiny Llama with and without gpuxent: peak memory and time of a training step.

    python examples/hf_tiny_llama.py                  # CPU: hidden 256, 2 layers, vocab 32000, 4 x 512 tokens, float32
    python examples/hf_tiny_llama.py --device cuda    # GPU: hidden 2048, 2 layers, vocab 128256, 8 x 2048, bfloat16

The model is a ``LlamaForCausalLM`` built from its config (random weights, nothing downloaded); it
trains with AdamW on this repository's README, one token per byte. Turning gpuxent on is one line::

    from gpuxent.integrations.transformers import apply_gpuxent
    apply_gpuxent(model)  # the training loss never materialises the (tokens, vocab) logits

Both variants, the model as Transformers ships it and the same model patched, run in their own
subprocess with the same seed and the same batches (so they print the same losses, up to rounding):
``--warmup`` steps (numba compiles its kernels, AdamW allocates its state), ``--steps`` timed steps
(median reported), then one step whose peak memory is measured: on the CPU the resident set's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``, Linux only) above the resident
set before the step, after ``malloc_trim`` has handed freed memory back; on CUDA
``torch.cuda.max_memory_allocated`` above ``torch.cuda.memory_allocated`` before the step. Either
way: every byte the step adds on top of the model and the optimizer state (activations, gradients,
logits), temporary buffers included.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TEXT = Path(__file__).resolve().parents[1] / "README.md"
SIZES = {
    "cpu": {"hidden": 256, "layers": 2, "vocab": 32000, "batch": 4, "seq": 512, "dtype": "float32"},
    "cuda": {"hidden": 2048, "layers": 2, "vocab": 128256, "batch": 8, "seq": 2048, "dtype": "bfloat16"},
}
VARIANTS = ("unpatched", "gpuxent")


def build_model(args, device):
    # imported here: the parent process, which only runs the two variants, does without it
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(getattr(torch, args.dtype)).train()


def batches(args, device):
    """Random windows of ``seq`` bytes of the README: the same sequence in every run."""
    tokens = torch.tensor(list(TEXT.read_bytes()))
    tokens = tokens.repeat(args.seq // len(tokens) + 2)  # at least seq + 1 tokens at any size
    generator = torch.Generator().manual_seed(1)
    while True:
        starts = torch.randint(0, len(tokens) - args.seq, (args.batch,), generator=generator).tolist()
        yield torch.stack([tokens[s : s + args.seq] for s in starts]).to(device)


def train_step(model, optimizer, input_ids):
    loss = model(input_ids=input_ids, labels=input_ids).loss  # the model shifts the labels
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(device, step):
    """``(step's result, peak bytes above those in use before it, bytes in use before it)``."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before, before
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap pages back to the OS: VmRSS counts live memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the present VmRSS
    before = _status_bytes("VmRSS")
    result = step()
    return result, _status_bytes("VmHWM") - before, before


def run_variant(args):
    """One variant in this process: a JSON-able row."""
    device = torch.device(args.device)
    model = build_model(args, device)
    if args.variant == "gpuxent":
        from gpuxent.integrations.transformers import apply_gpuxent

        apply_gpuxent(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    data = batches(args, device)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        input_ids = next(data)
        synchronize(device)
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, input_ids))
        synchronize(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        print(f"{args.variant} step {i}: loss {losses[-1]:.4f}, time {1e3 * (time.perf_counter() - start):.1f} ms",
              file=sys.stderr)  # fmt: skip
    input_ids = next(data)
    loss, peak, resident = peak_memory(device, lambda: train_step(model, optimizer, input_ids))
    losses.append(loss)
    return {
        "variant": args.variant,
        "peak_step_mib": peak / 2**20,
        "resident_mib": resident / 2**20,
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=tuple(SIZES), default="cpu")
    for name in ("hidden", "layers", "vocab", "batch", "seq"):
        p.add_argument(f"--{name}", type=int, help="default: the device's size in SIZES")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # set in the subprocesses
    args = p.parse_args(argv)
    for name, value in SIZES[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    flags = [f"--{k}={v}" for k, v in vars(args).items() if k not in ("json", "variant")]
    rows = []
    for variant in VARIANTS:
        cmd = [sys.executable, os.path.abspath(__file__), f"--variant={variant}", *flags]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref, ours = rows
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "sizes": {k: getattr(args, k) for k in ("hidden", "layers", "vocab", "batch", "seq", "dtype")},
        "logits_mib": args.batch * args.seq * args.vocab * torch.finfo(getattr(torch, args.dtype)).bits / 8 / 2**20,
        "rows": rows,
        "memory_ratio": ours["peak_step_mib"] / ref["peak_step_mib"],
        "time_ratio": ours["median_step_s"] / ref["median_step_s"],
        "max_loss_difference": max(abs(a - b) for a, b in zip(ours["losses"], ref["losses"])),
    }
    if args.json:
        print(json.dumps(result))
        return
    s = result["sizes"]
    print(f"# {result['machine']}, {result['device']}")
    print(f"# tiny Llama: hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab']}, batch {s['batch']} x "
          f"{s['seq']} tokens, {s['dtype']}; the logits alone are {result['logits_mib']:.0f} MiB")  # fmt: skip
    print(f"| {'variant':<10} | {'step peak MiB':>13} | {'resident MiB':>12} | {'median step s':>13} |")
    print(f"|{'-' * 12}|{'-' * 15}|{'-' * 14}|{'-' * 15}|")
    for r in rows:
        print(f"| {r['variant']:<10} | {r['peak_step_mib']:>13.1f} | {r['resident_mib']:>12.1f} "
              f"| {r['median_step_s']:>13.3f} |")  # fmt: skip
    print(f"gpuxent / unpatched: peak memory {result['memory_ratio']:.3f}x, step time {result['time_ratio']:.3f}x; "
          f"losses differ by at most {result['max_loss_difference']:.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
