"""DTensor logits (gpuxent.dtensor) and FSDP2 (fully_shard) on 2 gloo processes, against one process on
the full tensors; and the README's two examples, run with torchrun as pasted.

One spawn runs every case (spawning a process that imports torch costs seconds): the test writes the
inputs to ``tmp_path``, each rank computes the losses and gradients (as DTensors: their placements
and full values) and writes them back, and the test compares them here with float64 PyTorch and
one-process gpuxent on the full tensors, and with PyTorch's own ``loss_parallel()``.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from reference import assert_close, reference_cross_entropy
from test_distributed import _Counter, spawn_gloo

import gpuxent as gx

WORLD = 2
ROOT = Path(__file__).resolve().parent.parent
N_ROWS = 11  # rows: 6 and 5 on the two ranks under Shard(0)
N_CLASSES = 13  # classes: 7 and 6 under Shard(-1)
BATCH_3D = (2, 5)  # (B, T) of the Shard(1) cases: T split 3 and 2
TIMEOUT = 600
PLACEMENTS = ("class", "rows", "replicate")
CE_KEYWORDS = {
    "plain": {},
    "weight+ignore": {"weight": True, "ignore": True},
    "smoothing+z+softcap": {"label_smoothing": 0.1, "z_loss": 1e-2, "softcap": 4.0},
    "all": {"label_smoothing": 0.15, "weight": True, "ignore": True, "z_loss": 1e-3, "softcap": 5.0},
    "prob+all": {"prob": True, "label_smoothing": 0.1, "weight": True, "z_loss": 1e-2, "softcap": 3.0},
}


# --------------------------------------------------------------------------- inputs


def _target(gen, opts, shape, n_classes, dtype):
    """Class indices (the last rank's rows mostly ignored: the ranks keep different numbers of rows),
    or probabilities."""
    if opts.get("prob"):
        return torch.softmax(torch.randn(*shape, n_classes, generator=gen, dtype=torch.float64) * 2, -1).to(dtype)
    t = torch.randint(0, n_classes, shape, generator=gen)
    if opts.get("ignore"):
        flat = t.view(-1)
        flat[1] = -100
        flat[-4:-1] = -100  # 3 of the last rank's rows under Shard(0), 1 of the first rank's
    return t


def _case(gen, fn, placement, name, reduction, dtype=torch.float64, batch=(N_ROWS,), **extra):
    opts = CE_KEYWORDS.get(name, {})
    weight = (torch.rand(N_CLASSES, generator=gen, dtype=torch.float64) + 0.1).to(dtype) if opts.get("weight") else None
    logits = torch.randn(*batch, N_CLASSES, generator=gen, dtype=torch.float64) * 3
    case = dict(
        fn=fn, placement=placement, name=name, reduction=reduction, dtype=dtype, logits=logits.to(dtype),
        target=_target(gen, opts, batch, N_CLASSES, dtype),
        weight=weight,
        kw={k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts},
        grad_output=torch.randn(batch if reduction == "none" else (), generator=gen, dtype=torch.float64),
        **({"target_kind": "plain"} | extra),
    )  # fmt: skip
    case["id"] = f"{fn}-{placement}-{name}-{reduction}-{str(dtype)[6:]}-{case['target_kind']}-{len(batch)}d"
    return case


def _make_cases(gen):
    cases = []
    for placement in PLACEMENTS:
        for name in CE_KEYWORDS:
            for reduction in ("mean", "sum", "none"):
                cases.append(_case(gen, "ce", placement, name, reduction))
        cases.append(_case(gen, "ce", placement, "all", "mean", torch.float32))
        # targets as DTensors (replicated for class indices under Shard(-1), placed like the rows under
        # Shard(0)), and as each rank's own rows
        cases.append(_case(gen, "ce", placement, "weight+ignore", "mean", target_kind="dtensor"))
        cases.append(_case(gen, "ce", placement, "prob+all", "mean", target_kind="dtensor"))
        for name in ("weight+ignore", "prob+all"):
            for reduction in ("mean", "none"):
                cases.append(_case(gen, "stats", placement, name, reduction))
        cases.append(_case(gen, "stats", placement, "all", "sum"))
        for divergence in ("kl", "reverse_kl", "jsd"):
            for reduction in ("batchmean", "none"):
                cases.append(_case(gen, "distill", placement, divergence, reduction, divergence=divergence))
        cases.append(_case(gen, "distill", placement, "kl", "mean", divergence="kl"))
        cases.append(_case(gen, "distill", placement, "jsd", "sum", divergence="jsd"))
    for case in cases:
        if case["fn"] == "distill":  # a teacher, and rows left out by their target (mostly the last rank's)
            case["teacher"] = (torch.randn(case["logits"].shape, generator=gen, dtype=torch.float64) * 2).to(
                case["dtype"]
            )
            case["target"] = _target(gen, {"ignore": True}, case["logits"].shape[:-1], N_CLASSES, torch.int64)
    local = _case(gen, "ce", "rows", "weight+ignore", "mean", target_kind="local")
    local["id"] += "-local-target"
    cases.append(local)
    # (B, T, r) logits sharded on T (a batch axis) and on the classes
    for placement in ("rows1", "class"):
        for reduction in ("mean", "none"):
            cases.append(_case(gen, "ce", placement, "weight+ignore", reduction, batch=BATCH_3D))
    return cases


# --------------------------------------------------------------------------- one rank


def _placement(case, ndim):
    from torch.distributed.tensor import Replicate, Shard

    return {"class": Shard(ndim - 1), "rows": Shard(0), "rows1": Shard(1), "replicate": Replicate()}[case["placement"]]


def _run_case(case, mesh):
    from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

    rank = dist.get_rank()
    placement = _placement(case, case["logits"].dim())
    x = distribute_tensor(case["logits"], mesh, [placement]).requires_grad_()
    target = case["target"]
    if case["target_kind"] == "dtensor":
        class_sharded = case["placement"] == "class"
        tp = Replicate() if class_sharded and not target.is_floating_point() else placement
        target = distribute_tensor(target, mesh, [tp])
    elif case["target_kind"] == "local":  # this rank's rows (Shard(0)), as a data loader gives them
        target = target.chunk(WORLD)[rank]
    kw = dict(reduction=case["reduction"], **case["kw"])
    with _Counter() as counter:
        if case["fn"] == "ce":
            out = gx.cross_entropy(x, target, case["weight"], **kw)
            objective = out
        elif case["fn"] == "stats":
            out = gx.cross_entropy_with_stats(x, target, case["weight"], entropy=True, **kw)
            objective = out.loss + 0.3 * out.entropy
        else:
            out = gx.distillation_loss(x, case["teacher"], divergence=case["divergence"], beta=0.3,
                                       temperature=1.5, target=target, reduction=case["reduction"])  # fmt: skip
            objective = out
    calls = [name for name, _ in counter.calls]
    nbytes = counter.bytes
    assert isinstance(objective, DTensor), type(objective)
    go = case["grad_output"].to(objective.dtype)
    if go.dim():
        go = distribute_tensor(go, mesh, list(objective.placements))
        objective.backward(go)
    else:
        (objective * go.item()).backward()
    fields = out if case["fn"] == "stats" else (out,)
    values = [(v.full_tensor().detach(), tuple(v.placements)) for v in fields]
    result = dict(values=values, grad=x.grad.full_tensor(), grad_placements=tuple(x.grad.placements),
                  calls=calls, bytes=nbytes)  # fmt: skip
    # PyTorch's own loss_parallel() on the same DTensor (class indices, no smoothing/z-loss/softcap)
    if case["fn"] == "ce" and case["placement"] == "class" and not case["kw"] and not target.is_floating_point():
        from torch.distributed.tensor.parallel import loss_parallel

        x2 = distribute_tensor(case["logits"], mesh, [placement]).requires_grad_()
        # PyTorch's backward under loss_parallel gathers the class weight at ignore_index (torch 2.13:
        # "index -100 is out of bounds"): its forward only, where both are given
        backward = case["weight"] is None or not bool((case["target"] == -100).any())
        with loss_parallel():
            logits2 = x2 if x2.dim() == 2 else x2.flatten(0, -2)
            t2 = target if target.dim() == 1 else target.reshape(-1)
            loss = F.cross_entropy(logits2, t2, case["weight"], reduction=case["reduction"])
            if case["reduction"] == "none":
                loss = loss.reshape(case["logits"].shape[:-1])
                if backward:
                    loss.backward(distribute_tensor(case["grad_output"].to(loss.dtype), mesh, list(loss.placements)))
            elif backward:
                (loss * case["grad_output"].item()).backward()
        result["loss_parallel"] = (loss.full_tensor().detach(), x2.grad.full_tensor() if backward else None)
    return result


def _more(mesh, cases):
    """In place over class-sharded logits that are a layer's output, and Partial logits (summed over the
    ranks first): ``(gradient in place, gradient, loss of the Partial logits, their gradient)``."""
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    base = next(c for c in cases if c["fn"] == "ce" and c["name"] == "all" and c["placement"] == "class")
    kw = dict(reduction="mean", **base["kw"])
    leaf = distribute_tensor(base["logits"], mesh, [Shard(1)]).requires_grad_()
    y = leaf * 1  # not a leaf: its memory takes the gradient
    (g_inplace,) = torch.autograd.grad(gx.cross_entropy(y, base["target"], base["weight"], inplace_grad=True, **kw), y)
    x = distribute_tensor(base["logits"], mesh, [Shard(1)]).requires_grad_()
    gx.cross_entropy(x, base["target"], base["weight"], **kw).backward()
    half = (base["logits"] / WORLD).requires_grad_()
    partial = DTensor.from_local(half, mesh, [Partial()], run_check=False)
    loss = gx.cross_entropy(partial, base["target"], base["weight"], **kw)
    loss.backward()
    return g_inplace.full_tensor(), x.grad.full_tensor(), loss.full_tensor().detach(), half.grad


def _bad_inputs(mesh, cases):
    """Bad data on ONE rank: every rank raises (none hangs), with the reason."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    rank = dist.get_rank()
    base = next(c for c in cases if c["fn"] == "ce" and c["name"] == "plain")
    errors = {}
    for what, placement in (("class", Shard(1)), ("rows", Shard(0))):
        x = distribute_tensor(base["logits"], mesh, [placement]).requires_grad_()
        bad = base["target"].clone()
        if rank == 1:
            bad[-1] = N_CLASSES + 5  # the last row: the last rank's under Shard(0)
        for label, t in ((f"{what}: out of range on rank 1", bad),):
            try:
                gx.cross_entropy(x, t)
                errors[label] = None
            except (ValueError, TypeError) as exc:
                errors[label] = f"{type(exc).__name__}: {exc}"
    x = distribute_tensor(base["logits"], mesh, [Shard(1)])
    differ = base["target"].clone()
    if rank == 0:
        differ[0] = (differ[0] + 1) % N_CLASSES
    for label, fn in (
        ("class: targets differ", lambda: gx.cross_entropy(x, differ)),
        ("class: weight of a slice", lambda: gx.cross_entropy(x, base["target"], torch.ones(7 - rank))),
        ("replicate: bad reduction", lambda: gx.cross_entropy(distribute_tensor(base["logits"], mesh, [Replicate()]),
                                                              base["target"], reduction="avg")),
    ):  # fmt: skip
        try:
            fn()
            errors[label] = None
        except (ValueError, TypeError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
    from torch.distributed.device_mesh import init_device_mesh

    mesh2 = init_device_mesh("cpu", (1, WORLD))
    try:
        gx.cross_entropy(distribute_tensor(base["logits"], mesh2, [Replicate(), Shard(1)]), base["target"])
        errors["2-D mesh"] = None
    except ValueError as exc:
        errors["2-D mesh"] = f"ValueError: {exc}"
    return errors


# --------------------------------------------------------------------------- FSDP2


class _LM(torch.nn.Module):
    """Embedding, two blocks, a head whose weight feeds gx.linear_cross_entropy inside the forward (as
    the patched Hugging Face models do); ``tied``: the head is the embedding (GPT-2)."""

    def __init__(self, vocab=37, d=8, tied=False):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))
        self.head = torch.nn.Linear(d, vocab, bias=not tied)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, tokens, labels, **kw):
        h = self.embed(tokens)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return gx.linear_cross_entropy(h, self.head.weight, labels, self.head.bias, **kw)


def _fsdp2(rank, folder):
    """Two steps of a model sharded with fully_shard on each rank's half of the batch: the losses and
    the (all-gathered) gradients, for the test to compare with the unsharded model."""
    from torch.distributed.fsdp import fully_shard

    inputs = torch.load(os.path.join(folder, "fsdp_inputs.pt"), weights_only=False)
    out = {}
    for tied in (False, True):
        torch.manual_seed(0)
        model = _LM(tied=tied).double()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        steps = []
        for tokens, labels in inputs:
            mine = slice(rank * tokens.shape[0] // WORLD, (rank + 1) * tokens.shape[0] // WORLD)
            loss = model(tokens[mine], labels[mine], reduction="sum", ignore_index=-100, label_smoothing=0.1)
            loss.backward()
            grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
            steps.append((loss.detach(), grads))
            model.zero_grad()
        out[tied] = steps
    return out


# --------------------------------------------------------------------------- the worker


def _worker(rank, world, port, folder):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        cases = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
        results = {case["id"]: _run_case(case, mesh) for case in cases}
        errors = _bad_inputs(mesh, cases)
        fsdp = _fsdp2(rank, folder)
        more = _more(mesh, cases)
        torch.save((results, errors, fsdp, more), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- the checks


def _expected(case):
    """``(values, grad)`` of one process on the full tensors: float64 PyTorch for the cross-entropy,
    one-process gpuxent (itself checked against PyTorch) for the statistics and distillation."""
    x = case["logits"].double()
    go = case["grad_output"]
    if case["fn"] == "ce":
        loss, grad = reference_cross_entropy(x, case["target"], case["weight"], reduction=case["reduction"],
                                             grad_output=go, **case["kw"])  # fmt: skip
        return [loss], grad
    x = x.clone().requires_grad_()
    weight = None if case["weight"] is None else case["weight"].double()
    target = case["target"].double() if case["target"].is_floating_point() else case["target"]
    if case["fn"] == "stats":
        out = gx.cross_entropy_with_stats(x, target, weight, entropy=True, reduction=case["reduction"], **case["kw"])
        ((out.loss + 0.3 * out.entropy) * go).sum().backward()
        return [v.detach() for v in out], x.grad
    loss = gx.distillation_loss(x, case["teacher"].double(), divergence=case["divergence"], beta=0.3, temperature=1.5,
                                target=case["target"], reduction=case["reduction"])  # fmt: skip
    (loss * go).sum().backward()
    return [loss.detach()], x.grad


def _check_case(case, ranks):
    from torch.distributed.tensor import Replicate, Shard

    cid, dtype = case["id"], case["dtype"]
    values, grad = _expected(case)
    placement = _placement(case, case["logits"].dim())
    for k, rank in enumerate(ranks):
        got = rank[0][cid]
        assert got["grad_placements"] == (placement,), f"{cid}: gradient placements {got['grad_placements']}"
        assert got["grad"].dtype == dtype
        assert_close(got["grad"], grad, dtype, f"{cid} rank {k}: gradient", scale=4)
        for i, ((value, placements), expected) in enumerate(zip(got["values"], values)):
            rows = case["placement"].startswith("rows") and case["reduction"] == "none"
            want = (Shard(placement.dim),) if rows else (Replicate(),)
            assert placements == want, f"{cid} field {i}: placements {placements}, expected {want}"
            assert_close(value, expected, dtype, f"{cid} rank {k}: field {i}", scale=4)
        if "loss_parallel" in got:  # equal to PyTorch's loss_parallel(), loss and gradient
            lp_loss, lp_grad = got["loss_parallel"]
            assert_close(got["values"][0][0], lp_loss, dtype, f"{cid} rank {k}: vs loss_parallel()")
            if lp_grad is not None:
                assert_close(got["grad"], lp_grad, dtype, f"{cid} rank {k}: gradient vs loss_parallel()")
        # communication of the forward: class-sharded, ONE all-gather (16 or 20 bytes per row in
        # float32, twice in float64, and a few per call); replicated, none; row-sharded, one all-gather
        # of a few numbers for a sum (two for a cross-entropy's mean), none for "none"
        calls, nbytes = got["calls"], got["bytes"]
        n_rows = case["logits"].numel() // N_CLASSES
        if case["placement"] == "replicate" or (case["placement"].startswith("rows") and case["reduction"] == "none"):
            assert calls == [], (cid, calls)
        elif case["placement"] == "class" and case["fn"] == "ce":
            assert len(calls) == 1 and calls[0].startswith("all_gather"), (cid, calls)
            per_row = (5 if case["kw"].get("label_smoothing") else 4) * torch.finfo(dtype).bits // 8
            assert nbytes <= per_row * n_rows + 64, (cid, nbytes, per_row)
        elif case["placement"].startswith("rows"):  # a few numbers and 4 status words; a cross-entropy's mean
            n_calls = 2 if case["fn"] == "ce" and case["reduction"] == "mean" else 1  # needs D before the kernel
            assert len(calls) == n_calls and nbytes <= 96 * n_calls, (cid, calls, nbytes)
        elif case["fn"] != "distill" or case["divergence"] != "jsd":
            assert len(calls) == 1, (cid, calls)
        else:
            assert len(calls) == 2, (cid, calls)  # jsd: both lse first, then its terms


def _check_fsdp(inputs, ranks):
    for tied in (False, True):
        torch.manual_seed(0)
        model = _LM(tied=tied).double()
        for step, (tokens, labels) in enumerate(inputs):
            losses = []
            for k in range(WORLD):  # the unsharded model on each rank's half, and its gradient summed
                mine = slice(k * tokens.shape[0] // WORLD, (k + 1) * tokens.shape[0] // WORLD)
                loss = model(tokens[mine], labels[mine], reduction="sum", ignore_index=-100, label_smoothing=0.1)
                loss.backward()
                losses.append(loss.detach())
            expected = {name: p.grad / WORLD for name, p in model.named_parameters()}  # FSDP2 averages
            model.zero_grad()
            for k in range(WORLD):
                loss, grads = ranks[k][2][tied][step]
                assert_close(loss, losses[k], torch.float64, f"FSDP2 tied={tied} step {step} rank {k}: loss")
                assert grads.keys() == expected.keys()
                for name, g in grads.items():
                    assert_close(g, expected[name], torch.float64, f"FSDP2 tied={tied} step {step} rank {k}: {name}")


def test_dtensor_and_fsdp2_on_two_gloo_processes(tmp_path):
    gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    print(f"seed: {gen.initial_seed()}")
    cases = _make_cases(gen)
    torch.save(cases, tmp_path / "inputs.pt")
    fsdp_inputs = [
        (torch.randint(0, 37, (4, 6), generator=gen), torch.randint(0, 37, (4, 6), generator=gen)) for _ in range(2)
    ]
    fsdp_inputs[1][1][3, 2:] = -100  # the second rank's half keeps fewer tokens in step 2
    torch.save(fsdp_inputs, tmp_path / "fsdp_inputs.pt")
    spawn_gloo(_worker, (str(tmp_path),), WORLD, TIMEOUT)
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(WORLD)]
    for case in cases:
        _check_case(case, ranks)
    for k in range(WORLD):
        errors = ranks[k][1]
        assert all(msg is not None for msg in errors.values()), errors
        for what in ("class", "rows"):
            msg = errors[f"{what}: out of range on rank 1"]
            assert ("class index 18" if k == 1 or what == "class" else "rank(s) [1]") in msg, (k, what, msg)
        assert "different class indices" in errors["class: targets differ"]
        assert "weight: expected shape (13,)" in errors["class: weight of a slice"]
        assert "reduction" in errors["replicate: bad reduction"]
        assert "1-D mesh" in errors["2-D mesh"]
    _check_fsdp(fsdp_inputs, ranks)
    base = next(c for c in cases if c["fn"] == "ce" and c["name"] == "all" and c["placement"] == "class")
    loss, grad = reference_cross_entropy(base["logits"], base["target"], base["weight"], **base["kw"])
    for k in range(WORLD):
        g_inplace, g, partial_loss, partial_grad = ranks[k][3]
        assert_close(g_inplace, grad, torch.float64, f"rank {k}: in-place gradient of class-sharded logits")
        assert_close(g, grad, torch.float64, f"rank {k}: gradient")
        assert_close(partial_loss, loss, torch.float64, f"rank {k}: Partial logits' loss")
        # the local part of a Partial DTensor gets the gradient of the sum, as in DTensor
        assert_close(partial_grad, grad, torch.float64, f"rank {k}: Partial logits' gradient")


# --------------------------------------------------------------------------- the README's examples


@pytest.mark.parametrize("example", ["dtensor_loss_parallel.py", "fsdp2_linear.py"])
def test_example_runs_with_torchrun(example, tmp_path):
    """``torchrun --standalone --nproc-per-node 2 examples/<example>`` on CPU, as the README pastes it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "examples" / example)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "OK" in proc.stdout, proc.stdout[-3000:]
