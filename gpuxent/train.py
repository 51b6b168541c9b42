"""Train the tiny MLP with gpuxent's loss: ``gpuxent train`` and the library behind it.

Read top to bottom: the config, the data, one training loop (the same one for 1 process and for K
data-parallel processes), the checkpoint and the plot, then the command line.

    from gpuxent.train import TrainConfig, run
    out = run(TrainConfig(dataset="breast_cancer", epochs=20))
    out["summary"]["test_accuracy"], out["model"], out["history"]["loss"]

Data parallel, two ways to start the same K processes:

- ``nproc=K`` (``gpuxent train --nproc K``) spawns them on this machine (torch.multiprocessing) and
  joins them through a file in a temporary directory (a ``file://`` rendezvous: no port to race for);
- ``torchrun --nnodes N --nproc-per-node K -m gpuxent train ...`` starts them on N machines and
  :func:`run` joins them through torchrun's environment (``env://``).

Each process holds a replica wrapped in DistributedDataParallel (nccl on GPUs, gloo on CPUs) and takes
every K-th row of each epoch's permutation, as ``DistributedSampler`` does, in mini-batches of
``batch_size // K``: the K shards of a step together are the one-process mini-batch, and DDP's averaged
gradient is its gradient, so K processes follow the one-process run up to rounding, and the two
launches give the same result for the same seed. Rank 0 alone evaluates, prints and writes files.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import pathlib
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from . import backends
from .data import DATASETS, Dataset, load_csv, load_dataset, require
from .mlp import ACTIVATIONS, MLP, distillation_term, loss_and_stats

LOG_LINE = (
    "epoch {epoch}: loss {loss:.4f}, token_acc {token_acc:.2f}, entropy {entropy:.3f}, train_acc {train_acc:.2f}, "
    "test_acc {test_acc:.2f}, time {time_ms:.1f}ms"
)
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
    distill_from: str | None = None  # a teacher checkpoint: train on alpha * CE + (1 - alpha) * distillation
    temperature: float = 4.0  # of the distillation
    alpha: float = 0.5  # the weight of the CE against the teacher's KL
    entropy_bonus: float = 0.0  # beta of loss - beta * entropy (> 0 rewards, < 0 penalises confident predictions)

    def resolved_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Use ``n`` CPU threads in torch and numba inside the block, then the caller's counts again
    (``None``: leave them alone). A 64-wide MLP gains nothing from more, and on a shared machine idle
    OpenMP workers spinning between tiny ops cost more than the ops."""
    if n is None:
        yield
        return
    import numba

    saved = torch.get_num_threads(), numba.get_num_threads()
    torch.set_num_threads(n)
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        numba.set_num_threads(saved[1])


@dataclass(frozen=True)
class Launch:
    """This process's place among processes started by torchrun (or any launcher that sets the
    ``env://`` variables): global rank and count, and rank and count on this machine."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, env=os.environ) -> Launch | None:
        """The launch described by ``env``, or None when no launcher set RANK, WORLD_SIZE, MASTER_ADDR
        and MASTER_PORT (torchrun sets them, and LOCAL_RANK, LOCAL_WORLD_SIZE)."""
        if not all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
            return None
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        return cls(rank, world_size, int(env.get("LOCAL_RANK", rank)), int(env.get("LOCAL_WORLD_SIZE", world_size)))


def _check_writable(path: str, what: str) -> None:
    """ValueError naming ``what`` unless a file can be written at ``path`` (probed with a temporary file
    in its directory, so a run learns it before training, not after)."""
    target = pathlib.Path(path)
    folder = target.parent
    if target.is_dir():
        raise ValueError(f"{what}: {path} is a directory; expected a file path")
    if not folder.is_dir():
        raise ValueError(f"{what}: cannot write {path}: directory {folder} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise ValueError(f"{what}: cannot write {path}: permission denied")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gpuxent-write-test-"):
            pass
    except OSError as exc:
        raise ValueError(f"{what}: cannot write {path}: {exc.strerror or exc}") from None


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Every check of ``cfg``'s settings that needs no data, for a run on ``world_size`` processes:
    ValueError naming the setting, before anything is loaded, spawned or trained."""
    if cfg.nproc < 1:
        raise ValueError(f"nproc: expected >= 1, got {cfg.nproc}")
    if cfg.batch_size < world_size:
        raise ValueError(
            f"batch_size: expected >= {world_size} (at least one row per process and step), got {cfg.batch_size}"
        )
    if cfg.epochs is not None and cfg.epochs < 0:
        raise ValueError(f"epochs: expected >= 0, got {cfg.epochs}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr: expected a finite number > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"weight_decay: expected a finite number >= 0, got {cfg.weight_decay}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads: expected >= 1 or None, got {cfg.threads}")
    if not cfg.hidden or min(cfg.hidden) < 1:
        raise ValueError(f"hidden: expected layer widths >= 1, got {cfg.hidden}")
    for name, value, choices in (
        ("optimizer", cfg.optimizer, OPTIMIZERS),
        ("activation", cfg.activation, ACTIVATIONS),
        ("loss_impl", cfg.loss_impl, ("gpuxent", "torch")),
    ):
        if value not in choices:
            raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")
    if cfg.csv is not None and not cfg.target:
        raise ValueError("target: --csv needs --target COLUMN, the name of the label column")
    if not (math.isfinite(cfg.temperature) and cfg.temperature > 0):
        raise ValueError(f"temperature: expected a finite number > 0, got {cfg.temperature}")
    if not 0 <= cfg.alpha <= 1:
        raise ValueError(f"alpha: expected a number in [0, 1], got {cfg.alpha}")
    if not math.isfinite(cfg.entropy_bonus):
        raise ValueError(f"entropy_bonus: expected a finite number, got {cfg.entropy_bonus}")
    if cfg.distill_from is not None and not pathlib.Path(cfg.distill_from).is_file():
        raise ValueError(f"distill_from: no checkpoint file at {cfg.distill_from}")
    try:
        device = cfg.resolved_device()
    except RuntimeError as exc:
        raise ValueError(f"device: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device} asked for, but CUDA is not available here")
    backend_name(cfg, device)  # a backend that cannot run here fails now, with the reason


def check_outputs(cfg: TrainConfig) -> None:
    """ValueError (or :class:`~gpuxent.data.MissingDependency`) unless ``cfg.plot`` and
    ``cfg.checkpoint`` can be written: a run learns it before training, not after."""
    if cfg.plot:
        require("matplotlib", "matplotlib", "--plot")
        from matplotlib.figure import Figure

        suffix = pathlib.Path(cfg.plot).suffix.lstrip(".").lower()
        formats = Figure().canvas.get_supported_filetypes()
        if suffix and suffix not in formats:
            raise ValueError(f"plot: cannot save a .{suffix} file; use one of {sorted(formats)}")
        _check_writable(cfg.plot, "plot")
    if cfg.checkpoint:
        _check_writable(cfg.checkpoint, "checkpoint")


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
    (see :func:`process_group`) and the model is wrapped in DistributedDataParallel. Only rank 0
    evaluates and logs; its history holds per epoch ``loss`` (the mean over all ranks), ``train_acc``,
    ``test_acc``, ``time_ms``, and ``step_losses`` (every step's loss on this rank's shard). On CPU it
    runs on ``cfg.threads`` threads and gives the caller's thread counts back on return.
    """
    validate(cfg, world_size)
    data = data if data is not None else load_data(cfg)
    device = cfg.resolved_device()
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device())  # process_group chose this rank's GPU
    epochs = cfg.epochs if cfg.epochs is not None else default_epochs(data)
    backend = backend_name(cfg, device)

    X_train, y_train = (torch.from_numpy(a).to(device) for a in (data.X_train, data.y_train))
    X_test, y_test = (torch.from_numpy(a).to(device) for a in (data.X_test, data.y_test))
    teacher = load_teacher(cfg.distill_from, data, device) if cfg.distill_from else None
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
    per_rank = cfg.batch_size // world_size
    history = {key: [] for key in ("epoch", "loss", "token_acc", "entropy", "train_acc", "test_acc", "time_ms")}
    history["step_losses"] = []
    log = _logger(cfg) if rank == 0 else None
    bar = _progress(epochs, cfg) if rank == 0 else None
    with cpu_threads(cfg.threads if device.type == "cpu" else None):
        for epoch in range(1, epochs + 1):
            t0 = time.perf_counter()
            net.train()
            perm = rng.permutation(n_train)
            pad = (-n_train) % world_size  # DistributedSampler pads with the first rows so shards are equal
            perm = np.concatenate([perm, perm[:pad]])[rank::world_size]
            shard = torch.from_numpy(perm).to(device)
            step_losses, sums = [], torch.zeros(3, device=device, dtype=torch.float64)  # loss, accuracy, entropy
            for start in range(0, len(shard), per_rank):
                idx = shard[start : start + per_rank]
                logits = net(X_train[idx])
                # the token accuracy and the entropy come from the loss's own pass
                loss, acc, entropy = loss_and_stats(logits, y_train[idx], backend=cfg.backend, impl=cfg.loss_impl)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(X_train[idx])
                    kl = distillation_term(
                        logits, teacher_logits, temperature=cfg.temperature, backend=cfg.backend, impl=cfg.loss_impl
                    )
                    loss = cfg.alpha * loss + (1 - cfg.alpha) * kl
                objective = loss - cfg.entropy_bonus * entropy if cfg.entropy_bonus else loss
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                step_losses.append(loss.detach())
                sums += torch.stack([loss.detach(), acc.detach(), entropy.detach()]).double() * len(idx)
            totals = torch.cat([sums, torch.tensor([float(len(shard))], device=device, dtype=torch.float64)])
            if world_size > 1:
                torch.distributed.all_reduce(totals)
            # the means over all ranks; .tolist() also waits for the device: the time below is honest
            epoch_loss, token_acc, epoch_entropy = (totals[:3] / totals[3]).tolist()
            time_ms = 1e3 * (time.perf_counter() - t0)
            history["step_losses"] += torch.stack(step_losses).tolist() if step_losses else []
            if rank != 0:
                continue
            model.eval()
            train_acc, test_acc = accuracy(model, X_train, y_train), accuracy(model, X_test, y_test)
            row = dict(
                epoch=epoch, loss=epoch_loss, token_acc=token_acc, entropy=epoch_entropy, train_acc=train_acc,
                test_acc=test_acc, time_ms=time_ms,
            )  # fmt: skip
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
        "rank": rank,
        "world_size": world_size,
    }


def _logger(cfg: TrainConfig):
    """Rank 0's epoch log: one line per epoch, flushed (a pipe shows each epoch as it ends). A reader that
    goes away (``| head -1``) silences the log and the run goes on: its plot and checkpoint are still written."""
    from tqdm import tqdm

    stream = sys.stderr if cfg.json else sys.stdout

    def log(msg: str) -> None:
        try:
            tqdm.write(msg, file=stream)
            stream.flush()
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())

    return log


def _progress(epochs: int, cfg: TrainConfig):
    from tqdm import tqdm

    return tqdm(total=epochs, desc="train", unit="epoch", leave=False, disable=cfg.json or not sys.stderr.isatty())


# --------------------------------------------------------------------------- data parallel


@contextlib.contextmanager
def process_group(device: torch.device, launch: Launch, init_method: str):
    """The default process group of ``launch``'s process, for the block: nccl when every process on this
    machine has a GPU of its own (that GPU becomes the current device), gloo otherwise."""
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    nccl = device.type == "cuda" and torch.cuda.device_count() >= launch.local_world_size
    dist.init_process_group(
        "nccl" if nccl else "gloo", init_method=init_method, rank=launch.rank, world_size=launch.world_size
    )
    try:
        yield
    finally:
        # DistributedDataParallel sits in reference cycles that hold the group: collected now, while the
        # group and the interpreter are whole, not at exit, where freeing gloo's threads can abort the
        # process ("terminate called without an active exception", seen once in a CI run)
        gc.collect()
        dist.destroy_process_group()


def _worker(rank: int, world_size: int, init_method: str, cfg: TrainConfig, data: Dataset, out_path: str) -> None:
    """One of ``--nproc``'s processes: join the group, train, and (rank 0) save the result for the parent."""
    with process_group(cfg.resolved_device(), Launch(rank, world_size, rank, world_size), init_method):
        out = train(cfg, data, rank=rank, world_size=world_size)
        if rank == 0:
            state = {k: v.cpu() for k, v in out["model"].state_dict().items()}
            torch.save({"state_dict": state, "history": out["history"], "epochs": out["epochs"]}, out_path)


def train_parallel(cfg: TrainConfig, data: Dataset | None = None) -> dict:
    """:func:`train` on ``cfg.nproc`` processes spawned here; returns what rank 0's :func:`train` returns.

    They meet through a file in a temporary directory (``file://``): no port is probed and then raced for.
    """
    import torch.multiprocessing as mp

    validate(cfg, cfg.nproc)  # before any spawn
    data = data if data is not None else load_data(cfg)  # once, here: the workers skip importing sklearn
    device = cfg.resolved_device()
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "rank0.pt")
        init_method = pathlib.Path(tmp, "rendezvous").as_uri()
        mp.spawn(_worker, args=(cfg.nproc, init_method, cfg, data, out_path), nprocs=cfg.nproc, join=True)
        saved = torch.load(out_path, weights_only=True)
    model = MLP(data.n_features, data.n_classes, cfg.hidden, cfg.activation)
    model.load_state_dict(saved["state_dict"])
    return {
        "model": model.to(device).eval(),
        "history": saved["history"],
        "data": data,
        "epochs": saved["epochs"],
        "backend": backend_name(cfg, device),
        "device": str(device),
        "rank": 0,
        "world_size": cfg.nproc,
    }


def train_launched(cfg: TrainConfig, launch: Launch, data: Dataset | None = None) -> dict:
    """:func:`train` in one of the processes a launcher started (torchrun: ``env://`` rendezvous)."""
    data = data if data is not None else load_data(cfg)  # every process loads the same seeded split
    with process_group(cfg.resolved_device(), launch, "env://"):
        return train(cfg, data, rank=launch.rank, world_size=launch.world_size)


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


def load_teacher(path, data: Dataset, device: torch.device) -> MLP:
    """The teacher of a distillation run: a checkpoint of :func:`save_checkpoint` trained on ``data``'s
    features and classes. ValueError naming ``distill_from`` and what differs otherwise: the shape, the
    feature names or the class labels (a teacher of other data with the same shape teaches wrong answers)."""
    try:
        teacher, ckpt = load_checkpoint(path, map_location=device)
    except Exception as exc:  # not a gpuxent checkpoint
        raise ValueError(f"distill_from: cannot load a gpuxent checkpoint from {path}: {exc}") from None
    if (teacher.n_features, teacher.n_classes) != (data.n_features, data.n_classes):
        raise ValueError(
            f"distill_from: the teacher has {teacher.n_features} features and {teacher.n_classes} classes, "
            f"the data {data.n_features} and {data.n_classes}"
        )
    for what, theirs, ours in (
        ("feature names", ckpt.get("feature_names"), data.feature_names),
        ("classes", ckpt.get("classes"), data.classes),
    ):
        difference = _first_difference(theirs, ours)
        if difference:
            raise ValueError(
                f"distill_from: the teacher {path} was trained on other data: its {what} differ: {difference}"
            )
    return teacher


def _first_difference(theirs, ours) -> str:
    """Where two label lists first differ (``""`` when they are equal or the checkpoint has none)."""
    if theirs is None:
        return ""
    for i, (a, b) in enumerate(zip(theirs, ours)):
        if a != b:
            return f"at position {i}: {a!r} in the teacher, {b!r} in the data"
    if len(theirs) != len(ours):
        return f"{len(theirs)} in the teacher, {len(ours)} in the data"
    return ""


def plot_history(history: dict, path=None, title: str = ""):
    """Loss, accuracy and the predictions' entropy per epoch side by side; saved as PNG when ``path``
    is given. The accuracy panel has the training batches' token accuracy (as the loss returned it,
    while the model moved) beside the train and test accuracy of the model at the end of each epoch.

    Uses ``matplotlib.figure.Figure`` directly (the Agg canvas, no pyplot state), so it works headless
    and leaves a notebook's backend alone; the figure is returned (a notebook displays it).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    has_stats = bool(history.get("entropy"))
    fig = Figure(figsize=(13 if has_stats else 9, 3.5), layout="constrained")
    axes = fig.subplots(1, 3 if has_stats else 2)
    ax_loss, ax_acc = axes[:2]
    epochs = history["epoch"]
    ax_loss.plot(epochs, history["loss"], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="loss", yscale="log")
    # the three curves often coincide (on AND, at 1.0 from the first epochs): a wide translucent band for
    # train, a thin solid line for the token accuracy and a dashed one for test, so each shows over the others
    every = max(1, len(epochs) // 25)
    ax_acc.plot(epochs, history["train_acc"], marker="o", markevery=every, linewidth=4, alpha=0.45, label="train")
    if has_stats:
        ax_acc.plot(epochs, history["token_acc"], marker=".", markevery=every, label="token (from the loss)")
    ax_acc.plot(epochs, history["test_acc"], marker="x", markevery=every, linestyle="--", label="test")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    ax_acc.legend()
    if has_stats:
        axes[2].plot(epochs, history["entropy"], marker=".", color="tab:purple")
        axes[2].set(xlabel="epoch", ylabel="nats", title="entropy of the predictions")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# --------------------------------------------------------------------------- one run, end to end


def run(cfg: TrainConfig) -> dict:
    """Check everything, train (on ``cfg.nproc`` processes, or those torchrun started), then save the
    plot and the checkpoint if asked (rank 0 only).

    Returns the :func:`train` result plus ``"summary"``, what ``--json`` prints (``dataset``,
    ``test_accuracy``, ``train_accuracy``, ``final_loss``, ``epochs``, ``backend``, ``device``, ...);
    the summary is None on ranks other than 0.
    """
    launch = Launch.from_env()
    if launch is not None and cfg.nproc > 1:
        raise ValueError(f"nproc: the {launch.world_size} processes come from the launcher (torchrun); drop --nproc")
    validate(cfg, launch.world_size if launch else cfg.nproc)
    if launch is None or launch.rank == 0:
        check_outputs(cfg)
    t0 = time.perf_counter()
    data = load_data(cfg)
    # the teacher is checked here, before any process is spawned
    teacher = load_teacher(cfg.distill_from, data, torch.device("cpu")) if cfg.distill_from else None
    if launch is not None:
        out = train_launched(cfg, launch, data)
    elif cfg.nproc > 1:
        out = train_parallel(cfg, data)
    else:
        out = train(cfg, data)
    out["summary"] = None
    if out["rank"] != 0:
        return out
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
        # the last epoch's training-batch statistics, as the loss returned them (the model moved during it)
        "token_accuracy": history["token_acc"][-1] if history["token_acc"] else math.nan,
        "entropy": history["entropy"][-1] if history["entropy"] else math.nan,
        "backend": out["backend"],
        "device": out["device"],
        "nproc": out["world_size"],
        "hidden": list(cfg.hidden),
        "activation": cfg.activation,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "time_s": round(time.perf_counter() - t0, 3),
        "plot": cfg.plot,
        "checkpoint": cfg.checkpoint,
        "entropy_bonus": cfg.entropy_bonus,
        "history": {k: history[k] for k in ("loss", "token_acc", "entropy", "train_acc", "test_acc")},
    }
    if teacher is not None:
        X_test, y_test = (torch.from_numpy(a) for a in (data.X_test, data.y_test))
        out["summary"].update(
            distill_from=cfg.distill_from, temperature=cfg.temperature, alpha=cfg.alpha,
            teacher_test_accuracy=accuracy(teacher, X_test, y_test),
        )  # fmt: skip
    return out


def summary_line(s: dict) -> str:
    """The report of a run's summary (``gpuxent train`` without ``--json``): one line, and a second with
    the teacher's test accuracy for a distillation run."""
    line = (
        f"{s['dataset']}: test_acc {s['test_accuracy']:.4f}, final loss {s['final_loss']:.4f}, "
        f"{s['epochs']} epochs, backend {s['backend']} on {s['device']} x {s['nproc']}, {s['time_s']:.1f}s"
    )
    if "teacher_test_accuracy" in s:
        line += f"\nteacher {s['distill_from']}: test_acc {s['teacher_test_accuracy']:.4f}"
    return line


# --------------------------------------------------------------------------- command line


def _hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ValueError(f"hidden: expected comma-separated layer widths such as 64,64, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
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
    parser.add_argument(
        "--activation", choices=sorted(ACTIVATIONS), default=d.activation,
        help="activation of the hidden layers (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="global mini-batch (default: %(default)s)")
    parser.add_argument(
        "--optimizer", choices=sorted(OPTIMIZERS), default=d.optimizer, help="torch optimizer (default: %(default)s)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seed of the split, the initial weights and the batches (default: %(default)s)",
    )
    parser.add_argument("--backend", choices=sorted(backends.REGISTRY), help="gpuxent backend (default: by device)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--plot", metavar="PNG", help="save loss and accuracy per epoch as a PNG")
    parser.add_argument("--checkpoint", metavar="PATH", help="save the trained model (state_dict + config)")
    parser.add_argument(
        "--nproc", type=int, default=1, help="data-parallel processes on this machine (DDP; default: 1; see torchrun)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (logs go to stderr)")
    parser.add_argument(
        "--distill-from", metavar="CHECKPOINT",
        help="a teacher checkpoint (--checkpoint of an earlier run): train on alpha * CE + (1 - alpha) * distillation",
    )  # fmt: skip
    # default None: given without --distill-from, they are an error (see config_from_args), not ignored
    parser.add_argument(
        "--temperature", type=float, help=f"distillation temperature, with --distill-from (default: {d.temperature})"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        help=f"weight of the CE against the distillation, with --distill-from (default: {d.alpha})",
    )
    parser.add_argument(
        "--entropy-bonus", type=float, default=d.entropy_bonus, metavar="BETA",
        help="train on loss - BETA * entropy of the predictions (default: %(default)s)",
    )  # fmt: skip


def config_from_args(args) -> TrainConfig:
    """A :class:`TrainConfig` from parsed ``gpuxent train`` arguments.

    Raises:
        ValueError: ``--temperature`` or ``--alpha`` without ``--distill-from`` (they would do nothing).
    """
    d = TrainConfig()
    for flag in ("temperature", "alpha"):
        if getattr(args, flag) is not None and args.distill_from is None:
            raise ValueError(f"{flag}: --{flag} sets the distillation and needs --distill-from CHECKPOINT")
    # every field with a flag of the same name (weight_decay, test_size, loss_impl, threads have none)
    same = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**{
        **same,
        "hidden": _hidden(args.hidden),
        "temperature": d.temperature if args.temperature is None else args.temperature,
        "alpha": d.alpha if args.alpha is None else args.alpha,
    })  # fmt: skip
