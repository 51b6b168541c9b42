"""Vocab-parallel benchmark: the classes split over W processes, against a Megatron-style torch reference.

    python benchmarks/bench_distributed.py [--worlds 2,4] [--size 4096x32768] [--linear 1024x256x32768]
                                           [--repeats 7] [--backend gloo|nccl] [--dry-run] [--json-out F]

Cases (float32, class-index targets, mean reduction, forward+backward), each rank holding r / W classes:
    vocab_parallel_cross_entropy   gx.distributed.vocab_parallel_cross_entropy(x_k, t).backward()
    megatron (torch)               Megatron-LM's _VocabParallelCrossEntropy in torch ops: all-reduce MAX
                                   of the row max, x - max, the masked target logit all-reduced (SUM),
                                   exp in place, its sum all-reduced (SUM), softmax saved; the backward
                                   subtracts 1 at the target and scales by grad_output
    gx.cross_entropy, 1 process    the same loss on the full (N, r) logits in ONE process with W threads
                                   (at most the machine's cores) on the same cores (the goal: vocab-parallel
                                   on 2 processes within 1.3x of it), and F.cross_entropy likewise
    vocab_parallel_linear_cross_entropy(h, W_k, t)       each rank: its (r / W, d) rows of the weight
    gather + linear_cross_entropy  each rank all-gathers the full (r, d) weight and runs
                                   gx.linear_cross_entropy on it (its shard's gradient: a slice)
    ..., inplace_grad              the same with the gradient written over the logits (logits that are a
                                   layer's output), against gx.cross_entropy_and_grad(inplace_grad=True)
Reported per case: the median time of a step (the slowest rank's), the peak memory a step adds per
rank (the largest rank's: peak resident set over the resident set before the step, from Linux's
VmHWM reset through /proc/self/clear_refs; on CUDA torch.cuda.max_memory_allocated), and the bytes
each rank sends per row, counted by wrapping torch.distributed's collectives. GB/s follow the byte
model of a fused forward+backward, read N*r logits + write N*r gradient (the same for every
implementation), and % of copy divides them by the bandwidth of a large ``dst.copy_(src)`` on W
threads. gloo processes run one thread each (W processes on W cores). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import gpuxent as gx
from gpuxent import bench
from gpuxent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter")


class ByteCounter:
    """Wraps the collectives of ``torch.distributed``; counts the bytes this rank sends."""

    def __init__(self):
        self.bytes = 0
        self.saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = self.saved[name] = getattr(dist, name)

            def wrapped(first, *args, _fn=fn, _name=name, **kw):
                sent = args[0] if _name == "all_gather" else first  # all_gather(outputs, input)
                self.bytes += sent.numel() * sent.element_size()
                return _fn(first, *args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


# --------------------------------------------------------------------------- the Megatron-style reference


class MegatronCrossEntropy(torch.autograd.Function):
    """Megatron-LM's ``_VocabParallelCrossEntropy`` (tensor_parallel/cross_entropy.py), in torch ops."""

    @staticmethod
    def forward(ctx, logits, target, offset, group):
        logits_max = logits.max(dim=-1)[0]
        dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
        logits = logits - logits_max.unsqueeze(dim=-1)
        target_mask = (target < offset) | (target >= offset + logits.shape[-1])
        masked_target = target.clone() - offset
        masked_target[target_mask] = 0
        arange = torch.arange(logits.shape[0], device=logits.device)
        predicted_logits = logits[arange, masked_target].clone()
        predicted_logits[target_mask] = 0.0
        dist.all_reduce(predicted_logits, op=dist.ReduceOp.SUM, group=group)
        exp_logits = logits
        torch.exp(logits, out=exp_logits)
        sum_exp_logits = exp_logits.sum(dim=-1)
        dist.all_reduce(sum_exp_logits, op=dist.ReduceOp.SUM, group=group)
        loss = torch.log(sum_exp_logits) - predicted_logits
        exp_logits.div_(sum_exp_logits.unsqueeze(dim=-1))
        ctx.save_for_backward(exp_logits, target_mask, masked_target)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        softmax, target_mask, masked_target = ctx.saved_tensors
        grad_input = softmax
        arange = torch.arange(grad_input.shape[0], device=grad_input.device)
        grad_input[arange, masked_target] -= 1.0 - target_mask.to(grad_input.dtype)
        grad_input.mul_(grad_output.unsqueeze(dim=-1))
        return grad_input, None, None, None


# --------------------------------------------------------------------------- memory and time


def _rss() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


class PeakMemory:
    """Bytes a block adds at its peak: VmHWM reset to the current RSS on entry (Linux), or CUDA's peak."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss()[0]
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _rss()[1] - self.base


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step, reset, device, group, repeats) -> dict:
    """Median time (the slowest rank's, per repeat), peak memory and bytes per call of ``step``."""
    reset()
    step()  # warm-up (and compilation)
    reset()
    with ByteCounter() as counter:
        step()
    reset()
    with PeakMemory(device) as mem:
        step()
    times = []
    for _ in range(repeats):
        reset()
        dist.barrier(group)
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    reset()
    ms = torch.tensor([statistics.median(times) * 1e3, mem.peak / 2**20], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
    return dict(ms=ms[0].item(), peak_mib=ms[1].item(), bytes_sent=counter.bytes)


# --------------------------------------------------------------------------- one rank


def _rank(rank, world, port, args, out_file):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(args.backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n, r = args.size
        slices = [r // world + (k < r % world) for k in range(world)]
        lo = sum(slices[:rank])
        hi = lo + slices[rank]
        target = torch.randint(0, r, (n,), generator=torch.Generator().manual_seed(0)).to(device)  # the same everywhere
        gen = torch.Generator(device).manual_seed(rank + 1)
        x = (torch.randn(n, hi - lo, generator=gen, device=device) * 2).requires_grad_()
        # logits that are not a leaf (as a layer's output): their memory takes the gradient
        x_inplace = x.detach().clone().requires_grad_() * 1
        rows = {}

        def clear_x():
            x.grad = None

        def gx_step():
            vocab_parallel_cross_entropy(x, target).backward()

        def gx_inplace_step():  # the gradient is x_inplace's memory: a finite input again for the next step
            torch.autograd.grad(vocab_parallel_cross_entropy(x_inplace, target, inplace_grad=True), x_inplace)

        def megatron_step():
            MegatronCrossEntropy.apply(x, target, lo, None).mean().backward()

        rows["vocab_parallel_cross_entropy"] = _measure(gx_step, clear_x, device, None, args.repeats)
        rows["megatron (torch)"] = _measure(megatron_step, clear_x, device, None, args.repeats)
        rows["vocab_parallel_cross_entropy, inplace_grad"] = _measure(
            gx_inplace_step, clear_x, device, None, args.repeats
        )
        x = x_inplace = None  # frees the logits before the linear cases
        if args.linear:
            n_l, d, r_l = args.linear
            slices = [r_l // world + (k < r_l % world) for k in range(world)]
            lo = sum(slices[:rank])
            hi = lo + slices[rank]
            gen = torch.Generator().manual_seed(1)
            t_l = torch.randint(0, r_l, (n_l,), generator=gen).to(device)
            hidden = torch.randn(n_l, d, generator=gen).to(device).requires_grad_()
            shard = (torch.randn(r_l, d, generator=gen)[lo:hi] / d**0.5).contiguous().to(device).requires_grad_()

            def clear_linear():
                hidden.grad = shard.grad = None

            def vp_linear_step():
                vocab_parallel_linear_cross_entropy(hidden, shard, t_l).backward()

            def gather_linear_step():
                parts = [torch.empty(s, d, device=device) for s in slices]
                dist.all_gather(parts, shard.detach())
                full = torch.cat(parts).requires_grad_()
                del parts
                gx.linear_cross_entropy(hidden, full, t_l).backward()
                shard.grad = full.grad[lo:hi].clone()

            rows["vocab_parallel_linear_cross_entropy"] = _measure(
                vp_linear_step, clear_linear, device, None, args.repeats
            )
            rows["gather + linear_cross_entropy"] = _measure(
                gather_linear_step, clear_linear, device, None, args.repeats
            )
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(rows, f)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- one process, all the threads


def _single_process(args, threads: int) -> dict:
    """gx.cross_entropy and F.cross_entropy on the full logits, in this process on ``threads`` threads."""
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n, r = args.size
        target = torch.randint(0, r, (n,), generator=torch.Generator().manual_seed(0)).to(device)
        x = (torch.randn(n, r, generator=torch.Generator(device).manual_seed(1), device=device) * 2).requires_grad_()
        buf = x.detach().clone()
        rows = {}

        def inplace_step():  # overwritten by the gradient at every call: a valid input again
            gx.cross_entropy_and_grad(buf, target, inplace_grad=True)
            _sync(device)

        for name, step in (("gx.cross_entropy, 1 process, inplace_grad", inplace_step),):
            step()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            rows[name] = dict(ms=statistics.median(times) * 1e3)
        buf = None
        for name, loss_fn in (
            ("gx.cross_entropy, 1 process", gx.cross_entropy),
            ("F.cross_entropy, 1 process", F.cross_entropy),
        ):

            def step(loss_fn=loss_fn):
                x.grad = None
                loss_fn(x, target).backward()
                _sync(device)

            step()
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            rows[name] = dict(ms=statistics.median(times) * 1e3)
        copy = bench.copy_bandwidth(device, nbytes=1 << 26 if args.dry_run else 1 << 29)
        return rows, copy
    finally:
        torch.set_num_threads(previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    n, r = args.size
    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        machine=f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.backend}",
        size=list(args.size), linear=list(args.linear) if args.linear else None, repeats=args.repeats, worlds={},
    )  # fmt: skip
    for world in args.worlds:
        single, copy_gbps = _single_process(args, min(world, os.cpu_count() or 1))
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rank0.json")
            mp.spawn(_rank, args=(world, _free_port(), args, out_file), nprocs=world, join=True)
            with open(out_file) as f:
                rows = json.load(f)
        rows.update(single)
        nbytes = 2 * n * r * 4  # read the logits, write the gradient
        for name, row in rows.items():
            if "linear" not in name:
                row["gbps"] = nbytes / row["ms"] / 1e6
                row["pct_copy"] = 100 * row["gbps"] / copy_gbps
            if "bytes_sent" in row:
                row["bytes_per_row"] = row["bytes_sent"] / (args.linear[0] if "linear" in name else n)
        base = rows["gx.cross_entropy, 1 process"]["ms"]
        for name in ("vocab_parallel_cross_entropy", "megatron (torch)"):
            rows[name]["vs_single_gx"] = rows[name]["ms"] / base
        name = "vocab_parallel_cross_entropy, inplace_grad"
        rows[name]["vs_single_gx"] = rows[name]["ms"] / rows["gx.cross_entropy, 1 process, inplace_grad"]["ms"]
        rows["megatron (torch)"]["vs_vocab_parallel"] = (
            rows["megatron (torch)"]["ms"] / rows["vocab_parallel_cross_entropy"]["ms"]
        )
        result["worlds"][str(world)] = dict(copy_gbps=copy_gbps, rows=rows)
    return result


def markdown(result: dict) -> str:
    n, r = result["size"]
    lines = [
        f"{result['date']}, {result['machine']}; median of {result['repeats']} forward+backward steps, float32, "
        "class-index targets, mean. Peak: memory a step adds on the largest rank. Bytes/row: sent per rank "
        "(collectives wrapped).",
        "",
        f"Cross-entropy, {n} x {r}:",
        "",
        "| W | implementation | ms | GB/s | % of copy | peak MiB/rank | bytes/row | vs gx.cross_entropy, 1 process |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for world, res in result["worlds"].items():
        for name, row in res["rows"].items():
            if "linear" in name:
                continue
            peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
            bpr = f"{row['bytes_per_row']:.1f}" if "bytes_per_row" in row else "-"
            vs = f"{row['vs_single_gx']:.2f}x" if "vs_single_gx" in row else "-"
            cells = f"{row['ms']:.1f} | {row['gbps']:.1f} | {row['pct_copy']:.0f}% | {peak} | {bpr} | {vs}"
            lines.append(f"| {world} | {name} | {cells} |")
    if result["linear"]:
        n_l, d, r_l = result["linear"]
        lines += [
            "",
            f"Linear cross-entropy, hidden {n_l} x {d}, weight {r_l} x {d} (the rows split over the ranks):",
            "",
            "| W | implementation | ms | peak MiB/rank | bytes/row |",
            "|---:|---|---:|---:|---:|",
        ]
        for world, res in result["worlds"].items():
            for name, row in res["rows"].items():
                if "linear" in name:
                    lines.append(
                        f"| {world} | {name} | {row['ms']:.1f} | {row['peak_mib']:.0f} | {row['bytes_per_row']:.0f} |"
                    )
    return "\n".join(lines)


def _dims(text: str) -> list[int]:
    return [int(v) for v in text.lower().split("x")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="2,4")
    p.add_argument("--size", default="4096x32768", help="N x r of the cross-entropy cases")
    p.add_argument("--linear", default="1024x256x32768", help="N x d x r of the linear cases ('' to skip)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one repeat: a check of the script")
    p.add_argument("--json-out")
    p.add_argument("--markdown-out")
    args = p.parse_args()
    args.worlds = [int(w) for w in args.worlds.split(",")]
    args.size = _dims(args.size)
    args.linear = _dims(args.linear) if args.linear else None
    if args.dry_run:
        args.size, args.linear, args.repeats = [64, 256], [16, 8, 256], 1
    result = run(args)
    text = markdown(result)
    print(text)
    if args.markdown_out:
        with open(args.markdown_out, "w") as f:
            f.write(text + "\n")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
