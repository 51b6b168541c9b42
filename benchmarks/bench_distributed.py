"""Vocab-parallel benchmark: the classes split over W processes, against one process on the same cores.

    python benchmarks/bench_distributed.py [--worlds 2,4] [--size 4096x32768] [--linear 1024x256x32768]
                                           [--repeats 7] [--rounds 5] [--backend gloo|nccl] [--dry-run]
                                           [--json-out F] [--markdown-out F]

Cases (float32, class-index targets, mean reduction, forward+backward), each rank holding r / W classes:
    vocab_parallel_cross_entropy   gx.distributed.vocab_parallel_cross_entropy(x_k, t).backward()
    gx.cross_entropy(DTensor)      gx.cross_entropy(logits, t).backward() of Shard(-1) DTensor logits:
                                   the same kernels without the per-call header (ONE collective a forward)
    stored exp (prototype)         the idea of keeping exp(y - m) from the forward for the backward,
                                   timed with the production kernels: the forward is the one-process
                                   fused kernel over the slice in place (one read, one exp, one write:
                                   what a kernel storing exp(y - m) costs), one all-gather of 12 bytes a
                                   row, and the backward rescales the stored values in place (a row
                                   scale and the target fix-up: one read and one write, no exp). Its
                                   gradient is not exact (see the report): a timing only.
    megatron (torch)               Megatron-LM's _VocabParallelCrossEntropy in torch ops: all-reduce MAX
                                   of the row max, x - max, the masked target logit all-reduced (SUM),
                                   exp in place, its sum all-reduced (SUM), softmax saved; the backward
                                   subtracts 1 at the target and scales by grad_output
    gx.cross_entropy, 1 process    the same loss on the full (N, r) logits in ONE process with W threads
                                   (at most the machine's cores) on the same cores: rank 0 runs it while
                                   the other ranks wait in a barrier, interleaved with the rounds of the
                                   cases above, so that both see the same machine; and F.cross_entropy
    vocab_parallel_linear_cross_entropy(h, W_k, t)       each rank: its (r / W, d) rows of the weight
    gather + linear_cross_entropy  each rank all-gathers the full (r, d) weight and runs
                                   gx.linear_cross_entropy on it (its shard's gradient: a slice)
    ..., inplace_grad              the same with the gradient written over the logits (logits that are a
                                   layer's output), against gx.cross_entropy_and_grad(inplace_grad=True)
Reported per case: the median over ``--rounds`` rounds of each round's median step time (the slowest
rank's), with the rounds' min and max; the ratio to one process's in-place gx.cross_entropy (the goal:
<= 1.3x) per round, its median and spread; the peak memory a step adds per rank (the largest rank's:
peak resident set over the resident set before the step, from Linux's VmHWM reset through
/proc/self/clear_refs; on CUDA torch.cuda.max_memory_allocated); the bytes each rank sends per row and
the collectives of one forward, counted by wrapping torch.distributed's collectives. GB/s follow the
byte model of a fused forward+backward, read N*r logits + write N*r gradient (the same for every
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
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import gpuxent as gx
from gpuxent import autograd, backends, bench
from gpuxent.distributed import exchange, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "reduce_scatter")


class ByteCounter:
    """Wraps the collectives of ``torch.distributed``; counts the calls and the bytes this rank sends."""

    def __init__(self):
        self.bytes = 0
        self.calls = []
        self.saved = {}

    def __enter__(self):
        for name in COLLECTIVES:
            fn = self.saved[name] = getattr(dist, name)

            def wrapped(first, *args, _fn=fn, _name=name, **kw):
                sent = args[0] if _name in ("all_gather", "all_gather_into_tensor", "all_gather_single") else first
                self.bytes += sent.numel() * sent.element_size()
                self.calls.append(_name)
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


DTYPE = torch.float32  # the logits of every vocab-parallel step (the byte model reads its size)


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


def _profile(step, reset, forward, device, group) -> dict:
    """Warm-up (and compilation), then the bytes a step sends, the collectives of one forward (None: not
    counted) and the peak memory a step adds (the largest rank's)."""
    reset()
    step()
    reset()
    with ByteCounter() as counter:
        step()
    reset()
    calls = None
    if forward is not None:
        with ByteCounter() as fwd:
            forward()
        calls = fwd.calls
        reset()
    with PeakMemory(device) as mem:
        step()
    reset()
    peak = torch.tensor([mem.peak / 2**20], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    return dict(peak_mib=peak.item(), bytes_sent=counter.bytes, collectives_per_forward=calls)


def _time_steps(step, reset, device, group, repeats) -> float:
    """The median time of ``repeats`` steps in ms, the slowest rank's (the ranks start each step together)."""
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
    ms = torch.tensor([statistics.median(times) * 1e3], dtype=torch.float64, device=device)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX, group=group)
    return ms.item()


def _time_alone(step, device, repeats) -> float:
    """The median time of ``repeats`` steps of this process alone, in ms."""
    step()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Shard

        mesh = init_device_mesh(device.type, (world,))
        n, r = args.size
        chunk = -(-r // world)  # torch.chunk's slices, as Shard(-1) places them
        lo, hi = min(rank * chunk, r), min((rank + 1) * chunk, r)
        target = torch.randint(0, r, (n,), generator=torch.Generator().manual_seed(0)).to(device)  # the same everywhere
        full = (torch.randn(n, r, generator=torch.Generator().manual_seed(1)) * 2).to(DTYPE)
        x = full[:, lo:hi].contiguous().to(device).requires_grad_()
        if rank != 0:
            full = None
        # logits that are not a leaf (as a layer's output): their memory takes the gradient
        x_inplace = x.detach().clone().requires_grad_() * 1
        dx = DTensor.from_local(x.detach().clone(), mesh, [Shard(1)], run_check=False).requires_grad_()
        dx_inplace = DTensor.from_local(x.detach().clone().requires_grad_() * 1, mesh, [Shard(1)], run_check=False)
        proto = x.detach().clone()
        backend = backends.select(device, None)

        def clear():
            x.grad = dx.grad = None

        def vp_step():
            vocab_parallel_cross_entropy(x, target).backward()

        def vp_inplace_step():  # the gradient is x_inplace's memory: a finite input again for the next step
            torch.autograd.grad(vocab_parallel_cross_entropy(x_inplace, target, inplace_grad=True), x_inplace)

        def dtensor_step():
            gx.cross_entropy(dx, target).backward()

        def dtensor_inplace_step():
            torch.autograd.grad(gx.cross_entropy(dx_inplace, target, inplace_grad=True), dx_inplace)

        def stored_forward():
            """The stored-exp prototype's forward: exp(y - lse_k) kept in ``proto`` (minus 1 at a column)."""
            in_slice = (target >= lo) & (target < hi)
            t_loc = torch.where(in_slice, target - lo, 0)
            rows = torch.arange(n, device=device)
            y_t = proto[rows, t_loc]
            _, lse_k = autograd.cross_entropy_rows_(proto, t_loc, None, None, -100, 0.0, 0.0, 0.0, backend)
            part = torch.stack([lse_k, torch.where(in_slice, y_t - lse_k, 0), in_slice.float()], 1)
            g, _, _ = exchange(part, part.new_zeros(1), None)
            big = g[:, :, 0].amax(0)
            lse = big + torch.log(torch.exp(g[:, :, 0] - big).sum(0))
            y_target = (g[:, :, 1] + g[:, :, 2] * g[:, :, 0]).sum(0)
            return (lse - y_target).mean(), lse_k, lse, in_slice, t_loc, rows

        def stored_step():
            _, lse_k, lse, in_slice, t_loc, rows = stored_forward()
            alpha = torch.exp(lse_k - lse) / n
            proto[rows, t_loc] += 1  # the kernel's one-hot subtraction undone
            proto.mul_(alpha[:, None])  # the backward: one read and one write, no exp
            proto[rows[in_slice], t_loc[in_slice]] -= 1.0 / n

        def megatron_step():
            MegatronCrossEntropy.apply(x, target, lo, None).mean().backward()

        cases = {
            "vocab_parallel_cross_entropy": (vp_step, lambda: vocab_parallel_cross_entropy(x.detach(), target)),
            "vocab_parallel_cross_entropy, inplace_grad": (vp_inplace_step, None),
            "gx.cross_entropy(DTensor Shard(-1))": (dtensor_step, lambda: gx.cross_entropy(dx.detach(), target)),
            "gx.cross_entropy(DTensor Shard(-1)), inplace_grad": (dtensor_inplace_step, None),
            "stored exp (prototype), inplace_grad": (stored_step, stored_forward),
            "megatron (torch)": (megatron_step, None),
        }
        rows = {name: _profile(step, clear, fwd, device, None) for name, (step, fwd) in cases.items()}
        for row in rows.values():
            row["ms_rounds"] = []
        single = {"gx.cross_entropy, 1 process, inplace_grad": [], "gx.cross_entropy, 1 process": [],
                  "F.cross_entropy, 1 process": []}  # fmt: skip
        threads = min(world, os.cpu_count() or 1)
        if rank == 0:
            full = full.to(device)
            buf = full.clone()
            leaf = full.requires_grad_()

        def single_inplace():  # overwritten by the gradient at every call: a valid input again
            gx.cross_entropy_and_grad(buf, target, inplace_grad=True)

        def single_fresh(loss_fn=gx.cross_entropy):
            leaf.grad = None
            loss_fn(leaf, target).backward()

        for i in range(args.rounds):
            for name, (step, _) in cases.items():
                rows[name]["ms_rounds"].append(_time_steps(step, clear, device, None, args.repeats))
            # one process on the W cores while the other ranks wait: the same machine as the round's cases
            if rank == 0:
                torch.set_num_threads(threads)
                single["gx.cross_entropy, 1 process, inplace_grad"].append(
                    _time_alone(single_inplace, device, args.repeats)
                )
                single["gx.cross_entropy, 1 process"].append(_time_alone(single_fresh, device, args.repeats))
                if i == 0:
                    single["F.cross_entropy, 1 process"].append(
                        _time_alone(lambda: single_fresh(F.cross_entropy), device, max(1, args.repeats // 2))
                    )
                leaf.grad = None
                torch.set_num_threads(1 if device.type == "cpu" else torch.get_num_threads())
            dist.barrier()
        x = x_inplace = dx = dx_inplace = proto = full = buf = leaf = None  # frees the logits before the linear cases
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
                full_w = torch.cat(parts).requires_grad_()
                del parts
                gx.linear_cross_entropy(hidden, full_w, t_l).backward()
                shard.grad = full_w.grad[lo:hi].clone()

            for name, step in (("vocab_parallel_linear_cross_entropy", vp_linear_step),
                               ("gather + linear_cross_entropy", gather_linear_step)):  # fmt: skip
                row = rows[name] = _profile(step, clear_linear, None, device, None)
                row["ms_rounds"] = [_time_steps(step, clear_linear, device, None, args.repeats)]
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(dict(rows=rows, single=single), f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spread(values: list[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), max=max(values))


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def run(args) -> dict:
    n, r = args.size
    now = datetime.datetime.now(datetime.timezone.utc)
    machine = f"{_cpu_model()}, {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.backend}"
    result = dict(
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine,
        load_before=os.getloadavg()[0], size=list(args.size), linear=list(args.linear) if args.linear else None,
        repeats=args.repeats, rounds=args.rounds, worlds={},
    )  # fmt: skip
    for world in args.worlds:
        device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
        previous = torch.get_num_threads()
        torch.set_num_threads(min(world, os.cpu_count() or 1))
        copy_gbps = bench.copy_bandwidth(device, nbytes=1 << 26 if args.dry_run else 1 << 29)
        torch.set_num_threads(previous)
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rank0.json")
            mp.spawn(_rank, args=(world, _free_port(), args, out_file), nprocs=world, join=True)
            with open(out_file) as f:
                got = json.load(f)
        rows = got["rows"]
        for name, times in got["single"].items():
            rows[name] = dict(ms_rounds=times)
        single_inplace = got["single"]["gx.cross_entropy, 1 process, inplace_grad"]
        nbytes = bench.bytes_moved(n, r, DTYPE.itemsize, "fwd+bwd")  # the project's byte model
        for name, row in rows.items():
            row.update(_spread(row["ms_rounds"]))
            row["ms"] = row["median"]
            if "linear" not in name:
                row["gbps"] = nbytes / row["ms"] / 1e6
                row["pct_copy"] = 100 * row["gbps"] / copy_gbps
                if "1 process" not in name:  # per round, against the same round's one-process in-place step
                    ratios = [a / b for a, b in zip(row["ms_rounds"], single_inplace)]
                    row["vs_single_inplace"] = _spread(ratios)
            if "bytes_sent" in row:
                row["bytes_per_row"] = row["bytes_sent"] / (args.linear[0] if "linear" in name else n)
        result["worlds"][str(world)] = dict(copy_gbps=copy_gbps, rows=rows)
    result["load_after"] = os.getloadavg()[0]
    return result


def markdown(result: dict) -> str:
    n, r = result["size"]
    lines = [
        f"{result['date']}, {result['machine']}; load average {result['load_before']:.1f} before, "
        f"{result['load_after']:.1f} after. Each time: the median over {result['rounds']} rounds of the round's "
        f"median of {result['repeats']} forward+backward steps (the slowest rank's), with the rounds' min-max; "
        "float32, class-index targets, mean. vs 1 process: the ratio to the same round's one-process in-place "
        "gx.cross_entropy on the same cores, median [min, max] over the rounds. Peak: memory a step adds on the "
        "largest rank. Bytes/row: sent per rank, forward+backward; collectives: those of one forward "
        "(collectives wrapped).",
        "",
        f"Cross-entropy, {n} x {r}:",
        "",
        "| W | implementation | ms | min-max | GB/s | % of copy | peak MiB/rank | bytes/row | collectives/forward "
        "| vs 1 process in place |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for world, res in result["worlds"].items():
        for name, row in res["rows"].items():
            if "linear" in name:
                continue
            peak = f"{row['peak_mib']:.0f}" if "peak_mib" in row else "-"
            bpr = f"{row['bytes_per_row']:.1f}" if "bytes_per_row" in row else "-"
            calls = row.get("collectives_per_forward")
            calls = "-" if calls is None else f"{len(calls)} ({', '.join(calls)})"
            vs = row.get("vs_single_inplace")
            vs = f"{vs['median']:.2f}x [{vs['min']:.2f}, {vs['max']:.2f}]" if vs else "-"
            cells = (f"{row['ms']:.1f} | {row['min']:.1f}-{row['max']:.1f} | {row['gbps']:.1f} | "
                     f"{row['pct_copy']:.0f}% | {peak} | {bpr} | {calls} | {vs}")  # fmt: skip
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
    p.add_argument("--repeats", type=int, default=7, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5, help="rounds, each timing every case and one process")
    p.add_argument("--backend", default="gloo", choices=("gloo", "nccl"))
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, one repeat: a check of the script")
    p.add_argument("--json-out")
    p.add_argument("--markdown-out")
    args = p.parse_args()
    args.worlds = [int(w) for w in args.worlds.split(",")]
    args.size = _dims(args.size)
    args.linear = _dims(args.linear) if args.linear else None
    if args.dry_run:
        args.size, args.linear, args.repeats, args.rounds = [64, 256], [16, 8, 256], 1, 2
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
