"""vocab_parallel_cross_entropy and vocab_parallel_linear_cross_entropy over 2 and 4 gloo processes
against float64 PyTorch on the full vocabulary, the bytes they communicate per row and the collectives
of a forward.

Spawning a process that imports torch costs seconds, so each world size is one spawn that runs every
case: the test writes the inputs to ``tmp_path``, each rank computes the losses and the gradients of its
inputs and writes them back, and the test compares them with PyTorch (float64) on the concatenated
classes.
"""

import os
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from reference import KEYWORDS as CE_KEYWORDS
from reference import PROB_KEYWORDS, assert_close, reference_cross_entropy

import gpuxent as gx
from gpuxent.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy

KEYWORDS = {**CE_KEYWORDS, **PROB_KEYWORDS}
REDUCTIONS = ("mean", "sum", "none")
# Class slices per world size: unequal sizes, and an empty slice on one rank of four.
SLICES = {2: [4, 7], 4: [3, 0, 6, 4]}
BATCH = (3, 4)  # leading axes, flattened into 12 rows
D = 5  # hidden features of the linear cases
CHUNK = 5  # rows per chunk of the linear cases: 3 chunks, a short last one
# The GPU backends through their interpreters (TRITON_INTERPRET / NUMBA_ENABLE_CUDASIM, inherited from
# conftest): one case each, float32, every keyword.
GPU_BACKENDS = ("triton", "numba_cuda")
COMM_ROWS = 1024  # rows of the communication count: the per-call header shrinks to < 1 byte per row
MAX_BYTES_PER_ROW = 32


SPAWN_TIMEOUT = 600  # seconds for one spawn of gloo workers (the 2-core CI machine, shared)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_gloo(worker, args, world: int, timeout: float = SPAWN_TIMEOUT) -> None:
    """Runs ``worker(rank, world, port, *args)`` in ``world`` spawned processes that meet on a free
    local port (gloo). A worker that raises fails the test with its traceback; workers still running
    after ``timeout`` seconds (a rank left waiting in a collective) are killed and fail it."""
    ctx = mp.start_processes(worker, args=(world, _free_port(), *args), nprocs=world, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"gloo workers still running after {timeout:.0f} s: killed")


def _target(rng, opts, n_classes, dtype):
    if opts.get("prob"):
        return torch.softmax(torch.as_tensor(rng.standard_normal((*BATCH, n_classes)) * 2), -1).to(dtype)
    target = torch.as_tensor(rng.integers(0, n_classes, BATCH), dtype=torch.int64)
    if opts.get("ignore"):
        target[torch.as_tensor(rng.random(BATCH) < 0.3)] = -100
        target[0, 0] = -100
    return target


def _make_cases(rng, n_classes):
    """Cross-entropy cases: every keyword set x reduction in float64, each GPU backend and a float32 and
    a bfloat16 case, and the zero-weight mean; a non-uniform grad_output for "none"."""
    specs = [(name, reduction, torch.float64, None) for name in KEYWORDS for reduction in REDUCTIONS]
    specs += [("all", "mean", torch.float32, None), ("all", "none", torch.bfloat16, None)]
    specs += [(name, "none", torch.float32, b) for b in GPU_BACKENDS for name in ("all", "prob+all")]
    cases = []
    for name, reduction, dtype, backend in specs:
        opts = KEYWORDS[name]
        cases.append(
            dict(
                name=f"{name}-{reduction}-{str(dtype)[6:]}-{backend}",
                backend=backend,
                reduction=reduction,
                logits=torch.as_tensor(rng.standard_normal((*BATCH, n_classes)) * 3).to(dtype),
                target=_target(rng, opts, n_classes, dtype),
                weight=torch.as_tensor(rng.random(n_classes) + 0.1).to(dtype) if opts.get("weight") else None,
                kw={k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts},
                grad_output=torch.as_tensor(rng.standard_normal(BATCH if reduction == "none" else ())),
            )  # fmt: skip
        )
    # every kept row's class weight 0, with smoothing: a NaN mean (loss and gradient), as in torch
    cases.append(
        dict(
            name="zero-weight-mean",
            backend=None,
            reduction="mean",
            logits=torch.as_tensor(rng.standard_normal((*BATCH, n_classes))),
            target=torch.as_tensor(rng.integers(0, 2, BATCH), dtype=torch.int64),
            weight=torch.cat([torch.zeros(2), torch.ones(n_classes - 2)]).double(),
            kw={"label_smoothing": 0.2},
            grad_output=torch.ones((), dtype=torch.float64),
        )  # fmt: skip
    )
    return cases


def _make_linear_cases(rng, n_classes):
    """Linear cases: every keyword set x reduction in float64 (no bias for a few), one float32 case."""
    specs = [(name, reduction, torch.float64) for name in KEYWORDS for reduction in REDUCTIONS]
    specs.append(("all", "none", torch.float32))
    cases = []
    for i, (name, reduction, dtype) in enumerate(specs):
        opts = KEYWORDS[name]
        cases.append(
            dict(
                name=f"linear-{name}-{reduction}-{str(dtype)[6:]}",
                reduction=reduction,
                hidden=torch.as_tensor(rng.standard_normal((*BATCH, D))).to(dtype),
                weight=torch.as_tensor(rng.standard_normal((n_classes, D)) * 1.5).to(dtype),
                bias=None if i % 4 == 3 else torch.as_tensor(rng.standard_normal(n_classes) * 0.5).to(dtype),
                target=_target(rng, opts, n_classes, dtype),
                ce_weight=torch.as_tensor(rng.random(n_classes) + 0.1).to(dtype) if opts.get("weight") else None,
                kw={k: opts[k] for k in ("label_smoothing", "z_loss", "softcap") if k in opts},
                grad_output=torch.as_tensor(rng.random(BATCH if reduction == "none" else ()) + 0.25),
            )  # fmt: skip
        )
    return cases


class _Counter:
    """Wraps the collectives of ``torch.distributed`` and counts the bytes each rank sends."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "broadcast", "reduce_scatter",
             "all_to_all")  # fmt: skip

    def __init__(self):
        self.bytes = 0
        self.calls = []
        self.saved = {}

    def __enter__(self):
        for name in self.NAMES:
            fn = self.saved[name] = getattr(dist, name)

            def wrapped(tensor, *args, _fn=fn, _name=name, **kw):
                nbytes = tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0
                if _name in ("all_gather", "all_gather_into_tensor", "all_gather_single"):  # (output, input)
                    nbytes = args[0].numel() * args[0].element_size()
                self.bytes += nbytes
                self.calls.append((_name, nbytes))
                return _fn(tensor, *args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _communication(rank, world, lo, hi, n_classes):
    """Bytes per row sent by this rank, forward+backward, float32: both functions, with and without
    label smoothing."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(COMM_ROWS, n_classes, generator=gen)
    t = torch.randint(0, n_classes, (COMM_ROWS,), generator=gen)
    h = torch.randn(COMM_ROWS, D, generator=gen)
    w = torch.randn(n_classes, D, generator=gen)
    out = {}
    for eps in (0.0, 0.1):
        local = x[:, lo:hi].clone().requires_grad_()
        with _Counter() as c:
            loss = vocab_parallel_cross_entropy(local, t, label_smoothing=eps, z_loss=1e-3)
        out[f"ce eps={eps} collectives per forward"] = [name for name, _ in c.calls]
        with _Counter() as c_backward:
            loss.backward()
        out[f"ce eps={eps}"] = (c.bytes + c_backward.bytes) / COMM_ROWS
        hidden = h.clone().requires_grad_()
        shard = w[lo:hi].clone().requires_grad_()
        with _Counter() as c:
            vocab_parallel_linear_cross_entropy(hidden, shard, t, label_smoothing=eps, chunk_size=300).backward()
        # the full hidden gradient on every rank is one all-reduce of (N, d): D floats per row
        out[f"linear eps={eps}"] = c.bytes / COMM_ROWS - D * 4
    return out


def _worker(rank, world, port, folder):
    """One rank: every case, the communication count, then the bad-input cases; writes its results."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cases, linear_cases = torch.load(os.path.join(folder, "inputs.pt"), weights_only=False)
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
            kw = dict(weight=weight, reduction=case["reduction"], backend=case["backend"], **case["kw"])
            loss = vocab_parallel_cross_entropy(local, target, **kw)
            (loss * case["grad_output"].to(loss.dtype)).sum().backward()
            with torch.no_grad():  # the forward without autograd gives the same loss
                loss_ng = vocab_parallel_cross_entropy(local, target, **kw)
            # in place: over logits that are not a leaf (then the gradient is their memory), and a leaf's
            leaf = case["logits"][..., lo:hi].clone().requires_grad_()
            logits = leaf * 1
            g_inplace = torch.autograd.grad(
                vocab_parallel_cross_entropy(logits, target, inplace_grad=True, **kw), logits, case["grad_output"]
            )[0]
            assert g_inplace.data_ptr() == logits.data_ptr() or logits.numel() == 0
            leaf_loss = vocab_parallel_cross_entropy(leaf, target, inplace_grad=True, **kw)
            (leaf_loss * case["grad_output"].to(loss.dtype)).sum().backward()
            assert leaf.grad.data_ptr() != leaf.data_ptr() or leaf.numel() == 0
            results.append((loss.detach(), loss_ng, local.grad, g_inplace, leaf.grad))
        linear_results = []
        for case in linear_cases:
            hidden = case["hidden"].clone().requires_grad_()
            shard = case["weight"][lo:hi].clone().requires_grad_()
            bias = None if case["bias"] is None else case["bias"][lo:hi].clone().requires_grad_()
            kw = dict(ce_weight=case["ce_weight"], reduction=case["reduction"], chunk_size=CHUNK, **case["kw"])
            loss = vocab_parallel_linear_cross_entropy(hidden, shard, case["target"], bias, **kw)
            (loss * case["grad_output"].to(loss.dtype)).sum().backward()
            with torch.no_grad():
                loss_ng = vocab_parallel_linear_cross_entropy(hidden, shard, case["target"], bias, **kw)
            grads = (hidden.grad, shard.grad, None if bias is None else bias.grad)
            linear_results.append((loss.detach(), loss_ng, grads))
        comm = _communication(rank, world, lo, hi, sum(sizes))
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
            "unknown backend on one rank": dict(backend="nope" if rank == 0 else None),
        }
        for what, bad in bad_inputs.items():
            kw = dict(local=local, target=base["target"], weight=None, reduction="mean") | bad
            try:
                vocab_parallel_cross_entropy(kw.pop("local"), kw.pop("target"), **kw)
                errors.append((what, None))
            except (ValueError, TypeError) as exc:
                errors.append((what, f"{type(exc).__name__}: {exc}"))
        lin = linear_cases[0]
        bad_linear = {
            "linear: d differs on one rank": dict(shard=torch.zeros(sizes[rank], D + 1) if rank == 1 else None),
            "linear: ce_weight of the slice": dict(ce_weight=torch.ones(sizes[rank]).double()),
        }
        for what, bad in bad_linear.items():
            shard = bad.get("shard")
            shard = lin["weight"][lo:hi] if shard is None else shard.double()
            try:
                vocab_parallel_linear_cross_entropy(lin["hidden"], shard, lin["target"], ce_weight=bad.get("ce_weight"))
                errors.append((what, None))
            except (ValueError, TypeError) as exc:
                errors.append((what, f"{type(exc).__name__}: {exc}"))
        torch.save((results, linear_results, comm, errors), os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _check_cross_entropy(cases, ranks, world):
    for i, case in enumerate(cases):
        name, dtype = case["name"], case["logits"].dtype
        ref_loss, ref_grad = reference_cross_entropy(
            case["logits"], case["target"], case["weight"], reduction=case["reduction"],
            grad_output=case["grad_output"], **case["kw"],
        )  # fmt: skip
        grads = []
        for k in range(world):
            loss, loss_ng, *grad = ranks[k][0][i]
            assert_close(loss, ref_loss, dtype, f"{name} rank {k} loss vs torch")
            assert_close(loss_ng, loss, dtype, f"{name} rank {k} no-grad loss")
            assert all(g.dtype == dtype for g in grad)
            grads.append(grad)
        for j, what in enumerate(("grad", "in-place grad", "in-place grad of a leaf")):
            assert_close(torch.cat([g[j] for g in grads], -1), ref_grad, dtype, f"{name} {what} vs torch")


def _check_linear(cases, ranks, world):
    sizes = SLICES[world]
    for i, case in enumerate(cases):
        name, dtype = case["name"], case["hidden"].dtype
        h, w = case["hidden"].double(), case["weight"].double()
        b = None if case["bias"] is None else case["bias"].double()
        ref_loss, g = reference_cross_entropy(
            F.linear(h, w, b), case["target"], case["ce_weight"], reduction=case["reduction"],
            grad_output=case["grad_output"], **case["kw"],
        )  # fmt: skip
        g2 = g.reshape(-1, w.shape[0])
        ref_gw, ref_gb = g2.T @ h.reshape(-1, D), g2.sum(0)
        shards, bias_shards = [], []
        for k in range(world):
            loss, loss_ng, (g_h, g_w, g_b) = ranks[k][1][i]
            assert_close(loss, ref_loss, dtype, f"{name} rank {k} loss vs torch")
            assert_close(loss_ng, loss, dtype, f"{name} rank {k} no-grad loss")
            assert_close(g_h, (g2 @ w).reshape(h.shape), dtype, f"{name} rank {k}: the full hidden gradient")
            assert g_w.shape == (sizes[k], D)
            shards.append(g_w)
            bias_shards.append(g_b)
        assert_close(torch.cat(shards), ref_gw, dtype, f"{name} weight gradient")
        if b is not None:
            assert_close(torch.cat(bias_shards), ref_gb, dtype, f"{name} bias gradient")
        else:
            assert all(gb is None for gb in bias_shards)


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_matches_torch(world, tmp_path, rng):
    n_classes = sum(SLICES[world])
    cases, linear_cases = _make_cases(rng, n_classes), _make_linear_cases(rng, n_classes)
    torch.save((cases, linear_cases), tmp_path / "inputs.pt")
    spawn_gloo(_worker, (str(tmp_path),), world)
    ranks = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in range(world)]
    _check_cross_entropy(cases, ranks, world)
    _check_linear(linear_cases, ranks, world)

    # Communication per row, forward+backward, float32: a few floats, nothing that grows with r.
    for k in range(world):
        comm = ranks[k][2]
        for what, per_row in comm.items():
            if "collectives" in what:  # the header's all-gather, then ONE all-gather of the partials
                assert len(per_row) == 2 and all(name.startswith("all_gather") for name in per_row), (what, per_row)
                continue
            assert 0 < per_row <= MAX_BYTES_PER_ROW, f"rank {k} {what}: {per_row:.2f} bytes per row"
        # (m, s, a, b): 16 bytes per row, (c) 4 more with smoothing; the header and W < 1 byte per row
        assert comm["ce eps=0.0"] < 17 and comm["ce eps=0.1"] < 21, comm

    # Bad input on any rank: every rank raises, none hangs; the rank at fault gives its own reason.
    for k in range(world):
        errors = dict(ranks[k][3])
        assert all(msg is not None for msg in errors.values()), errors
        assert "target: class index" in errors["target out of range"]
        assert "local_logits: the ranks hold different numbers of rows" in errors["rows differ"]
        assert "local_logits: the ranks hold different dtypes" in errors["dtype differs"]
        assert "weight:" in errors["weight on one rank"]
        assert ("reduction:" if k == 1 else "rank(s) [1]") in errors["bad reduction on one rank"]
        assert ("backend:" if k == 0 else "rank(s) [0]") in errors["unknown backend on one rank"]
        assert ("hidden:" if k == 1 else "rank(s) [1]") in errors["linear: d differs on one rank"]
        assert "ce_weight: expected" in errors["linear: ce_weight of the slice"]


def test_needs_initialized_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_linear_cross_entropy(torch.zeros(2, 3), torch.zeros(4, 3), torch.zeros(2, dtype=torch.int64))


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
