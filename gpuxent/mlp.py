"""The tiny MLP and its loss: gpuxent's fused kernels in place of ``torch.nn.functional``.

Two classes: one logit per row, ``gx.binary_cross_entropy_with_logits`` (the lecture's BCE on
``sigmoid(z)``); ``k > 2`` classes: ``k`` logits, ``gx.cross_entropy`` (softmax + categorical CE).
"""

from __future__ import annotations

import torch
from torch import nn

import gpuxent as gx

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """``standardise -> [Linear -> activation] * len(hidden) -> Linear``.

    The feature mean and std (fitted on the train split, see :meth:`set_standardization`) are buffers,
    so they travel in the ``state_dict`` and a loaded checkpoint predicts on raw features.
    """

    def __init__(self, n_features: int, n_classes: int, hidden=(64, 64), activation: str = "relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if n_classes < 2:
            raise ValueError(f"n_classes: expected at least 2, got {n_classes}")
        self.n_features, self.n_classes = n_features, n_classes
        self.hidden, self.activation = tuple(hidden), activation
        self.register_buffer("x_mean", torch.zeros(n_features))
        self.register_buffer("x_std", torch.ones(n_features))
        layers, width = [], n_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, 1 if self.binary else n_classes))
        self.net = nn.Sequential(*layers)

    @property
    def binary(self) -> bool:
        return self.n_classes == 2

    def config(self) -> dict:
        """The constructor's arguments, as plain values (what a checkpoint needs to rebuild the model)."""
        return dict(
            n_features=self.n_features, n_classes=self.n_classes, hidden=list(self.hidden), activation=self.activation
        )

    @torch.no_grad()
    def set_standardization(self, X_train: torch.Tensor) -> None:
        """Fit the per-feature mean and std on the train split (constant features keep std 1)."""
        self.x_mean.copy_(X_train.mean(0))
        std = X_train.std(0, unbiased=False)
        self.x_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Logits: ``(N,)`` for a binary task, ``(N, n_classes)`` otherwise."""
        logits = self.net((X - self.x_mean) / self.x_std)
        return logits.squeeze(-1) if self.binary else logits

    @torch.no_grad()
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """int64 class indices in ``[0, n_classes)``."""
        logits = self(X)
        if self.binary:
            return gx.predict_binary(torch.sigmoid(logits))
        return gx.predict(logits)


def loss_fn(logits: torch.Tensor, target: torch.Tensor, *, backend: str | None = None, impl: str = "gpuxent"):
    """Mean loss of a batch: BCE-with-logits for ``(N,)`` logits, softmax cross-entropy for ``(N, k)``.

    ``impl="torch"`` computes the same with ``torch.nn.functional`` (the reference the tests compare to).
    """
    binary = logits.dim() == 1
    if impl == "gpuxent":
        if binary:
            return gx.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), backend=backend)
        return gx.cross_entropy(logits, target, backend=backend)
    if impl == "torch":
        F = torch.nn.functional
        if binary:
            return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
        return F.cross_entropy(logits, target)
    raise ValueError(f"impl: expected 'gpuxent' or 'torch', got {impl!r}")


def class_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(N, k)`` class logits: a binary model's ``(N,)`` logit z becomes ``[0, z]`` (softmax: 1 - p, p)."""
    return torch.stack([torch.zeros_like(logits), logits], -1) if logits.dim() == 1 else logits


def loss_and_stats(logits: torch.Tensor, target: torch.Tensor, *, backend: str | None = None, impl: str = "gpuxent"):
    """``(loss, accuracy, entropy)`` of a batch: :func:`loss_fn`'s mean loss, the token accuracy (no
    gradient) and the mean entropy of the predicted distribution (differentiable: an entropy bonus or
    penalty trains through it).

    For class logits on gpuxent they all come from the loss's own pass
    (``gx.cross_entropy_with_stats(..., entropy=True)``: the backward is one pass for the loss and the
    entropy together); a binary model's ``(N,)`` logit and ``impl="torch"`` compute the statistics with
    torch ops on the side (a binary model's distribution is ``softmax([0, z])``).
    """
    if impl == "gpuxent" and logits.dim() == 2:
        out = gx.cross_entropy_with_stats(logits, target, backend=backend, entropy=True)
        return out.loss, out.accuracy, out.entropy
    loss = loss_fn(logits, target, backend=backend, impl=impl)
    log_p = torch.log_softmax(class_logits(logits).to(torch.float32), -1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    accuracy = (log_p.detach().argmax(-1) == target).to(log_p.dtype).mean()
    return loss, accuracy, entropy


def distillation_term(
    logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float, backend: str | None = None,
    impl: str = "gpuxent",
):  # fmt: skip
    """Hinton's distillation term: ``KL(teacher || student)`` at ``temperature``, scaled by
    ``temperature**2``, averaged over the batch; the gradient flows to the student only.

    ``impl="torch"`` computes it with ``log_softmax`` and ``F.kl_div`` (the unfused composition).
    """
    s, t = class_logits(logits), class_logits(teacher_logits.detach())
    if impl == "gpuxent":
        return gx.distillation_loss(s, t, temperature=temperature, backend=backend)
    F = torch.nn.functional
    log_ps, log_pt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    return temperature**2 * F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
