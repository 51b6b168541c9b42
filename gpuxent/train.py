"""Train the tiny MLP with gpuxent's loss: ``gpuxent train`` and the library behind it.

Read top to bottom: the config, the data, one training loop (the same one for 1 process and for K
data-parallel processes), the checkpoint and the plot, then the command line.

    from gpuxent.train import TrainConfig, run
    out = run(TrainConfig(dataset="breast_cancer", epochs=20))
    out["summary"]["test_accuracy"], out["model"], out["history"]["loss"]

With ``nproc=K`` the K processes (torch.multiprocessing, spawn) each hold a replica wrapped in
DistributedDataParallel (gloo on CPU, nccl on GPUs) and take every K-th row of each epoch's
permutation, as ``DistributedSampler`` does, in mini-batches of ``batch_size // K``: the K shards of a
step together are the one-process mini-batch, and DDP's averaged gradient is its gradient, so K
processes follow the one-process run up to rounding. Rank 0 evaluates and reports.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import backends
from .data import DATASETS, Dataset, load_csv, load_dataset
from .mlp import ACTIVATIONS, MLP, loss_fn

LOG_LINE = "epoch {epoch}: loss {loss:.4f}, train_acc {train_acc:.2f}, test_acc {test_acc:.2f}, time {time_ms:.1f}ms"
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@dataclass
class TrainConfig:
    """Every knob of a run; the command line fills one of these."""

    dataset: str = "digits"  # one of data.DATASETS, ignored when csv is set
    csv: str | None = None  # a CSV file with a header row ...
    target: str | None = None  # ... and the name of its label column
    epochs: int | None = None  # None: 20, or 100 for the 4-row AND gate
    hidden: tuple[int, ...] = (64, 64)
    activation: str = "relu"
    lr: float = 3e-3
    batch_size: int = 64  # the global batch; each of nproc processes takes batch_size // nproc rows
    optimizer: str = "adam"
    weight_decay: float = 0.0
    test_size: float = 0.2
    seed: int = 0
    backend: str | None = None  # gpuxent backend, None: chosen by device
    device: str | None = None  # None: cuda if available, else cpu
    loss_impl: str = "gpuxent"  # "torch" trains with torch.nn.functional instead (the tests' reference)
    nproc: int = 1
    threads: int | None = 1  # CPU threads of torch and numba per process; None leaves them alone
    plot: str | None = None  # PNG of loss and accuracy per epoch
    checkpoint: str | None = None  # torch.save'd dict: state_dict + config
    json: bool = False  # machine-readable run: logs go to stderr, no progress bar

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def set_threads(n: int | None) -> None:
    """Use ``n`` CPU threads in torch and numba (process-wide). A 64-wide MLP gains nothing from more,
    and on a shared machine idle OpenMP workers spinning between tiny ops cost more than the ops."""
    if n is None:
        return
    import numba

    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def load_data(cfg: TrainConfig) -> Dataset:
    """The run's data set, split and seeded by ``cfg``."""
    if cfg.csv is not None:
        if not cfg.target:
            raise ValueError("target: --csv needs --target COLUMN, the name of the label column")
        return load_csv(cfg.csv, cfg.target, test_size=cfg.test_size, seed=cfg.seed)
    return load_dataset(cfg.dataset, test_size=cfg.test_size, seed=cfg.seed)


def default_epochs(data: Dataset) -> int:
    """20 epochs, or 100 for the AND gate (4 rows: one optimizer step per epoch)."""
    return 100 if data.name == "and" else 20


@torch.no_grad()
def accuracy(model: MLP, X: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of rows whose predicted class is right."""
    return (model.predict(X) == y).double().mean().item()


def backend_name(cfg: TrainConfig, device: torch.device) -> str:
    """The loss's implementation as reported: the gpuxent backend's name, or ``"torch"``."""
    return "torch" if cfg.loss_impl == "torch" else backends.select(device, cfg.backend)


# --------------------------------------------------------------------------- the training loop


def train(cfg: TrainConfig, data: Dataset | None = None, *, rank: int = 0, world_size: int = 1) -> dict:
    """Train an MLP on ``data`` (default: ``load_data(cfg)``) and return ``{"model", "history", ...}``.

    Called once per process; with ``world_size > 1`` the default process group must be initialised
    and the model is wrapped in DistributedDataParallel. Only rank 0 evaluates and logs; its history
    holds per epoch ``loss`` (the mean over all ranks), ``train_acc``, ``test_acc``, ``time_ms``, and
    ``step_losses`` (every step's loss on this rank's shard).
    """
    data = data if data is not None else load_data(cfg)
    device = cfg.resolved_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but CUDA is not available here")
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", rank % torch.cuda.device_count())
    epochs = cfg.epochs if cfg.epochs is not None else default_epochs(data)
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer: expected one of {sorted(OPTIMIZERS)}, got {cfg.optimizer!r}")
    if cfg.batch_size < 1 or epochs < 0:
        raise ValueError(f"batch_size >= 1 and epochs >= 0 expected, got {cfg.batch_size} and {epochs}")
    if device.type == "cpu":
        set_threads(cfg.threads)
    backend = backend_name(cfg, device)  # fails early, with the reason, for a backend that cannot run here

    X_train, y_train = (torch.from_numpy(a).to(device) for a in (data.X_train, data.y_train))
    X_test, y_test = (torch.from_numpy(a).to(device) for a in (data.X_test, data.y_test))
    torch.manual_seed(cfg.seed)
    model = MLP(data.n_features, data.n_classes, cfg.hidden, cfg.activation).to(device)
    model.set_standardization(X_train)
    net = model
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = OPTIMIZERS[cfg.optimizer](net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)  # the same stream on every rank: one permutation per epoch

    n_train = len(y_train)
    per_rank = max(1, cfg.batch_size // world_size)
    history = {"epoch": [], "loss": [], "train_acc": [], "test_acc": [], "time_ms": [], "step_losses": []}
    log = _logger(cfg) if rank == 0 else None
    bar = _progress(epochs, cfg) if rank == 0 else None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        perm = rng.permutation(n_train)
        pad = (-n_train) % world_size  # DistributedSampler pads with the first rows so shards are equal
        perm = np.concatenate([perm, perm[:pad]])[rank::world_size]
        shard = torch.from_numpy(perm).to(device)
        step_losses, loss_sum = [], torch.zeros((), device=device, dtype=torch.float64)
        for start in range(0, len(shard), per_rank):
            idx = shard[start : start + per_rank]
            loss = loss_fn(net(X_train[idx]), y_train[idx], backend=cfg.backend, impl=cfg.loss_impl)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_losses.append(loss.detach())
            loss_sum += loss.detach() * len(idx)
        totals = torch.stack([loss_sum, torch.tensor(float(len(shard)), device=device, dtype=torch.float64)])
        if world_size > 1:
            torch.distributed.all_reduce(totals)
        epoch_loss = (totals[0] / totals[1]).item()  # also waits for the device: the time below is honest
        time_ms = 1e3 * (time.perf_counter() - t0)
        history["step_losses"] += torch.stack(step_losses).tolist() if step_losses else []
        if rank != 0:
            continue
        model.eval()
        train_acc, test_acc = accuracy(model, X_train, y_train), accuracy(model, X_test, y_test)
        row = dict(epoch=epoch, loss=epoch_loss, train_acc=train_acc, test_acc=test_acc, time_ms=time_ms)
        for key, value in row.items():
            history[key].append(value)
        log(LOG_LINE.format(**row))
        bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return {
        "model": model,
        "history": history,
        "data": data,
        "epochs": epochs,
        "backend": backend,
        "device": str(device),
    }


def _logger(cfg: TrainConfig):
    from tqdm import tqdm

    stream = sys.stderr if cfg.json else sys.stdout
    return lambda msg: tqdm.write(msg, file=stream)


def _progress(epochs: int, cfg: TrainConfig):
    from tqdm import tqdm

    return tqdm(total=epochs, desc="train", unit="epoch", leave=False, disable=cfg.json or not sys.stderr.isatty())


# --------------------------------------------------------------------------- data parallel


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, cfg: TrainConfig, data: Dataset, out_path: str) -> None:
    """One data-parallel process: join the group, train, and (rank 0) save the result for the parent."""
    import torch.distributed as dist

    device = cfg.resolved_device()
    use_nccl = device.type == "cuda" and torch.cuda.device_count() >= world_size  # nccl wants a GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(
        "nccl" if use_nccl else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        out = train(cfg, data, rank=rank, world_size=world_size)
        if rank == 0:
            state = {k: v.cpu() for k, v in out["model"].state_dict().items()}
            torch.save({"state_dict": state, "history": out["history"], "epochs": out["epochs"]}, out_path)
    finally:
        dist.destroy_process_group()


def train_parallel(cfg: TrainConfig) -> dict:
    """:func:`train` on ``cfg.nproc`` processes; returns what rank 0's :func:`train` returns."""
    import torch.multiprocessing as mp

    data = load_data(cfg)  # once, in the parent: errors surface here and the workers skip importing sklearn
    device = cfg.resolved_device()
    backend = backend_name(cfg, device)  # as early: a backend that cannot run fails before any spawn
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        mp.spawn(_worker, args=(cfg.nproc, _free_port(), cfg, data, out_path), nprocs=cfg.nproc, join=True)
        saved = torch.load(out_path, weights_only=True)
    model = MLP(data.n_features, data.n_classes, cfg.hidden, cfg.activation)
    model.load_state_dict(saved["state_dict"])
    return {
        "model": model.to(device).eval(),
        "history": saved["history"],
        "data": data,
        "epochs": saved["epochs"],
        "backend": backend,
        "device": str(device),
    }


# --------------------------------------------------------------------------- checkpoint and plot


def save_checkpoint(path, model: MLP, cfg: TrainConfig, data: Dataset) -> None:
    """``torch.save`` a plain dict (loadable with ``weights_only=True``): the model's constructor
    arguments, its ``state_dict`` (standardisation included), the run's config and the class labels."""
    torch.save(
        {
            "model_config": model.config(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "train_config": asdict(cfg),
            "classes": list(data.classes),
            "feature_names": list(data.feature_names),
        },
        path,
    )


def load_checkpoint(path, map_location="cpu") -> tuple[MLP, dict]:
    """The MLP saved by :func:`save_checkpoint`, in eval mode, and the checkpoint dict itself."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = MLP(**ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.to(map_location).eval(), ckpt


def plot_history(history: dict, path=None, title: str = ""):
    """Loss and accuracy per epoch side by side; saved as PNG when ``path`` is given.

    Uses ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot state), so it works headless
    and leaves a notebook's backend alone; the figure is returned (a notebook displays it).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["loss"], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss", yscale="log")
    ax_acc.plot(epochs, history["train_acc"], marker=".", label="train")
    ax_acc.plot(epochs, history["test_acc"], marker=".", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# --------------------------------------------------------------------------- one run, end to end


def run(cfg: TrainConfig) -> dict:
    """Train (on ``cfg.nproc`` processes), then save the plot and the checkpoint if asked.

    Returns the :func:`train` result plus the summary that ``--json`` prints: ``dataset``,
    ``test_accuracy``, ``train_accuracy``, ``final_loss``, ``epochs``, ``backend``, ``device``, ...
    """
    if cfg.nproc < 1:
        raise ValueError(f"nproc: expected >= 1, got {cfg.nproc}")
    t0 = time.perf_counter()
    out = train_parallel(cfg) if cfg.nproc > 1 else train(cfg)
    model, history, data = out["model"], out["history"], out["data"]
    if cfg.plot:
        plot_history(history, cfg.plot, title=f"{data.name}: MLP {list(cfg.hidden)} {cfg.activation}, {out['backend']}")
    if cfg.checkpoint:
        save_checkpoint(cfg.checkpoint, model, cfg, data)
    out["summary"] = {
        "dataset": data.name,
        "task": "binary" if data.binary else "multiclass",
        "n_train": len(data.y_train),
        "n_test": len(data.y_test),
        "n_features": data.n_features,
        "n_classes": data.n_classes,
        "epochs": out["epochs"],
        "final_loss": history["loss"][-1] if history["loss"] else math.nan,
        "train_accuracy": history["train_acc"][-1] if history["train_acc"] else math.nan,
        "test_accuracy": history["test_acc"][-1] if history["test_acc"] else math.nan,
        "backend": out["backend"],
        "device": out["device"],
        "nproc": cfg.nproc,
        "hidden": list(cfg.hidden),
        "activation": cfg.activation,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "time_s": round(time.perf_counter() - t0, 3),
        "plot": cfg.plot,
        "checkpoint": cfg.checkpoint,
        "history": {k: history[k] for k in ("loss", "train_acc", "test_acc")},
    }
    return out


# --------------------------------------------------------------------------- command line


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"hidden: expected comma-separated layer widths such as 64,64, got {text!r}") from None
    if any(s < 1 for s in sizes):
        raise ValueError(f"hidden: layer widths must be >= 1, got {text!r}")
    return sizes


def add_arguments(parser) -> None:
    """The ``gpuxent train`` options, added to an ``argparse`` (sub)parser."""
    d = TrainConfig()
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--dataset", choices=DATASETS, default=d.dataset, help="bundled data set (default: %(default)s)")
    src.add_argument("--csv", metavar="FILE", help="a CSV with a header row; every column but --target is a feature")
    parser.add_argument("--target", metavar="COLUMN", help="the label column of --csv")
    parser.add_argument("--epochs", type=int, help="epochs (default: 20; 100 for the 4-row AND gate)")
    parser.add_argument("--hidden", default="64,64", help="hidden layer widths (default: %(default)s)")
    parser.add_argument("--activation", choices=sorted(ACTIVATIONS), default=d.activation)
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="global mini-batch (default: %(default)s)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default=d.optimizer)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--backend", choices=sorted(backends.REGISTRY), help="gpuxent backend (default: by device)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--plot", metavar="PNG", help="save loss and accuracy per epoch as a PNG")
    parser.add_argument("--checkpoint", metavar="PATH", help="save the trained model (state_dict + config)")
    parser.add_argument("--nproc", type=int, default=1, help="data-parallel processes (DDP; default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object (logs go to stderr)")


def config_from_args(args) -> TrainConfig:
    """A :class:`TrainConfig` from parsed ``gpuxent train`` arguments."""
    return TrainConfig(
        dataset=args.dataset,
        csv=args.csv,
        target=args.target,
        epochs=args.epochs,
        hidden=_hidden(args.hidden),
        activation=args.activation,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        seed=args.seed,
        backend=args.backend,
        device=args.device,
        nproc=args.nproc,
        plot=args.plot,
        checkpoint=args.checkpoint,
        json=args.json,
    )


def main(args) -> int:
    """``gpuxent train``: 0 on success, 2 with a one-line message for bad input (a CSV problem, ...)."""
    try:
        cfg = config_from_args(args)
        out = run(cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as exc:
        print(f"gpuxent train: error: {exc}", file=sys.stderr)
        return 2
    s = out["summary"]
    if cfg.json:
        print(json.dumps(s))
    else:
        print(
            f"{s['dataset']}: test_acc {s['test_accuracy']:.4f}, final loss {s['final_loss']:.4f}, "
            f"{s['epochs']} epochs, backend {s['backend']} on {s['device']}, {s['time_s']:.1f}s"
        )
        for what in ("plot", "checkpoint"):
            if s[what]:
                print(f"{what}: {s[what]}")
    return 0
