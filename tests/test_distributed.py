"""vocab_parallel_cross_entropy over 2 and 4 gloo processes against the single-process loss.

Spawning a process that imports torch costs seconds, so each world size is one spawn that runs every
case: the test writes the inputs to ``tmp_path``, each rank computes the loss and the gradient of its
slice of the classes and writes them back, and the test compares them with ``gx.cross_entropy`` and
PyTorch (float64) on the concatenated logits.
"""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import KEYWORDS as CE_KEYWORDS
from reference import PROB_KEYWORDS, assert_close, reference_cross_entropy

import gpuxent as gx
from gpuxent.distributed import vocab_parallel_cross_entropy

KEYWORDS = {**CE_KEYWORDS, **PROB_KEYWORDS}
REDUCTIONS = ("mean", "sum", "none")
# Class slices per world size: unequal sizes, and an empty slice on one rank of four.
SLICES = {2: [4, 7], 4: [3, 0, 6, 4]}
BATCH = (3, 4)  # leading axes, flattened into 12 rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_cases(rng, n_classes, dtype=torch.float64):
    cases = []
    for name, opts in KEYWORDS.items():
        for reduction in REDUCTIONS:
            logits = torch.as_tensor(rng.standard_normal((*BATCH, n_classes)) * 3, dtype=dtype)
            if opts.get("prob"):
                target = torch.softmax(torch.as_tensor(rng.standard_normal((*BATCH, n_classes)) * 2), -1).to(dtype)
            else:
                target = torch.as_tensor(rng.integers(0, n_classes, BATCH), dtype=torch.int64)
                if opts.get("ignore"):
                    target[torch.as_tensor(rng.random(BATCH) < 0.3)] = -100
                    target[0, 0] = -100
            weight = torch.as_tensor(rng.random(n_classes) + 0.1, dtype=dtype) if opts.get("weight") else None
            kw = {k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts}
            shape = BATCH if reduction == "none" else ()
            grad_output = torch.as_tensor(rng.standard_normal(shape), dtype=dtype)
            cases.append(
                dict(
                    name=f"{name}-{reduction}",
                    logits=logits,
                    target=target,
                    weight=weight,
                    kw=kw,
                    reduction=reduction,
                    grad_output=grad_output,
                )  # fmt: skip
            )
    # every kept row's class weight 0, with smoothing: a NaN mean (loss and gradient), as in torch
    logits = torch.as_tensor(rng.standard_normal((*BATCH, n_classes)), dtype=dtype)
    target = torch.as_tensor(rng.integers(0, 2, BATCH), dtype=torch.int64)
    weight = torch.cat([torch.zeros(2, dtype=dtype), torch.ones(n_classes - 2, dtype=dtype)])
    cases.append(
        dict(
            name="zero-weight-mean", logits=logits, target=target, weight=weight, kw={"label_smoothing": 0.2},
            reduction="mean", grad_output=torch.ones((), dtype=dtype),
        )  # fmt: skip
    )
    return cases


def _worker(rank, world, port, folder):
    """One rank: every case, then the bad-input cases; writes its results to ``folder``."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cases = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
        sizes = SLICES[world]
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        results = []
        for case in cases:
            local = case["logits"][..., lo:hi].clone().requires_grad_()
            target = case["target"]
            if target.is_floating_point():
                target = target[..., lo:hi]
            weight = None if case["weight"] is None else case["weight"][lo:hi]
            loss = vocab_parallel_cross_entropy(local, target, weight=weight, reduction=case["reduction"], **case["kw"])
            (loss * case["grad_output"]).sum().backward()
            with torch.no_grad():  # the forward without autograd gives the same loss
                loss_ng = vocab_parallel_cross_entropy(
                    local, target, weight=weight, reduction=case["reduction"], **case["kw"]
                )
            results.append((loss.detach(), loss_ng, local.grad))
        errors = []
        base = cases[0]
        local = base["logits"][..., lo:hi]
        bad_inputs = {
            "target out of range": dict(target=torch.full(BATCH, sum(sizes))),
            "rows differ": dict(
                local=local[:2] if rank == world - 1 else local,
                target=base["target"][:2] if rank == world - 1 else base["target"],
            ),
            "dtype differs": dict(local=local.float() if rank == 0 else local),
            "weight on one rank": dict(weight=torch.ones(sizes[rank]) if rank == 0 else None),
            "bad reduction on one rank": dict(reduction="avg" if rank == 1 else "mean"),
        }
        for what, bad in bad_inputs.items():
            kw = dict(local=local, target=base["target"], weight=None, reduction="mean") | bad
            try:
                vocab_parallel_cross_entropy(kw.pop("local"), kw.pop("target"), **kw)
                errors.append((what, None))
            except (ValueError, TypeError) as exc:
                errors.append((what, f"{type(exc).__name__}: {exc}"))
        torch.save((results, errors), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_single_process(world, tmp_path, rng):
    n_classes = sum(SLICES[world])
    cases = _make_cases(rng, n_classes)
    torch.save(cases, tmp_path / "inputs.pt")
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(world)]

    for i, case in enumerate(cases):
        name = case["name"]
        w = case["weight"]
        logits = case["logits"].clone().requires_grad_()
        expected = gx.cross_entropy(logits, case["target"], w, reduction=case["reduction"], **case["kw"])
        (expected * case["grad_output"]).sum().backward()
        ref_loss, ref_grad = reference_cross_entropy(
            case["logits"], case["target"], w, reduction=case["reduction"], grad_output=case["grad_output"],
            **case["kw"],
        )  # fmt: skip
        grads = []
        for k in range(world):
            loss, loss_ng, grad = ranks[k][0][i]
            assert_close(loss, ref_loss, torch.float64, f"{name} rank {k} loss vs torch")
            assert_close(loss, expected.detach(), torch.float64, f"{name} rank {k} loss vs gx.cross_entropy")
            assert_close(loss_ng, loss, torch.float64, f"{name} rank {k} no-grad loss")
            grads.append(grad)
        grad = torch.cat(grads, -1)
        assert_close(grad, ref_grad, torch.float64, f"{name} grad vs torch")
        assert_close(grad, logits.grad, torch.float64, f"{name} grad vs gx.cross_entropy")

    # Bad input on any rank: every rank raises, none hangs; the rank at fault gives its own reason.
    for k in range(world):
        errors = dict(ranks[k][1])
        assert all(msg is not None for msg in errors.values()), errors
        assert "target: class index" in errors["target out of range"]
        assert "local_logits: the ranks hold different numbers of rows" in errors["rows differ"]
        assert "local_logits: the ranks hold different dtypes" in errors["dtype differs"]
        assert "weight:" in errors["weight on one rank"]
        assert ("reduction:" if k == 1 else "rank(s) [1]") in errors["bad reduction on one rank"]


def test_needs_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))


def test_numpy_inputs_are_rejected_without_hanging(tmp_path):
    """A type error is found by each rank alone, before any collective (one process world)."""
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="local_logits"):
            vocab_parallel_cross_entropy(np.zeros((2, 3)), torch.zeros(2, dtype=torch.int64))
        # A world of one equals cross_entropy.
        x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
        t = torch.randint(0, 7, (5,))
        loss = vocab_parallel_cross_entropy(x, t, label_smoothing=0.1)
        loss.backward()
        x2 = x.detach().clone().requires_grad_()
        expected = gx.cross_entropy(x2, t, label_smoothing=0.1)
        expected.backward()
        assert_close(loss, expected.detach(), torch.float64, "loss")
        assert_close(x.grad, x2.grad, torch.float64, "grad")
    finally:
        dist.destroy_process_group()
