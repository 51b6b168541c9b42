"""``torch.nn``-style modules over :mod:`gpuxent.functional`: drop-in for their torch twins."""

from __future__ import annotations

import torch

from . import functional as F


def _reduction(size_average, reduce, reduction: str) -> str:
    """``reduction``, or what torch's deprecated ``size_average``/``reduce`` mean (with torch's warning)."""
    if size_average is not None or reduce is not None:
        return torch.nn._reduction.legacy_get_string(size_average, reduce)
    return reduction


class CrossEntropyLoss(torch.nn.Module):
    """Like ``torch.nn.CrossEntropyLoss``, plus ``z_loss``, ``softcap``, ``backend`` and ``inplace_grad``."""

    def __init__(
        self, weight=None, size_average=None, ignore_index: int = -100, reduce=None, reduction: str = "mean",
        label_smoothing: float = 0.0, *, z_loss: float = 0.0, softcap: float | None = None,
        backend: str | None = None, inplace_grad: bool = False,
    ):  # fmt: skip
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = _reduction(size_average, reduce, reduction)
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.backend = backend
        self.inplace_grad = inplace_grad

    def forward(self, input, target):
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, backend=self.backend, inplace_grad=self.inplace_grad,
        )  # fmt: skip


class BCELoss(torch.nn.Module):
    """Like ``torch.nn.BCELoss`` (the lecture's BCE on probabilities)."""

    def __init__(self, weight=None, size_average=None, reduce=None, reduction: str = "mean", *, backend=None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.reduction = _reduction(size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input, target):
        return F.binary_cross_entropy(input, target, self.weight, self.reduction, backend=self.backend)


class BCEWithLogitsLoss(torch.nn.Module):
    """Like ``torch.nn.BCEWithLogitsLoss``: sigmoid + BCE, fused and stable."""

    def __init__(
        self, weight=None, size_average=None, reduce=None, reduction: str = "mean", pos_weight=None, *, backend=None
    ):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)
        self.reduction = _reduction(size_average, reduce, reduction)
        self.backend = backend

    def forward(self, input, target):
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, self.pos_weight, self.reduction, backend=self.backend
        )


class DistillationLoss(torch.nn.Module):
    """Distillation from teacher logits (:func:`gpuxent.distillation_loss`): ``loss(student_logits,
    teacher_logits, target=None)``."""

    def __init__(
        self, divergence: str = "kl", beta: float = 0.5, temperature: float = 1.0, ignore_index: int = -100,
        reduction: str = "batchmean", *, backend: str | None = None,
    ):  # fmt: skip
        super().__init__()
        self.divergence = divergence
        self.beta = beta
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.backend = backend

    def forward(self, student_logits, teacher_logits, target=None):
        return F.distillation_loss(
            student_logits, teacher_logits, divergence=self.divergence, beta=self.beta,
            temperature=self.temperature, target=target, ignore_index=self.ignore_index,
            reduction=self.reduction, backend=self.backend,
        )  # fmt: skip


class CrossEntropyWithStats(CrossEntropyLoss):
    """:class:`CrossEntropyLoss` returning ``gx.CrossEntropyOutput(loss, z_loss, accuracy, entropy)`` (see
    :func:`gpuxent.cross_entropy_with_stats`); ``entropy=True`` adds the differentiable entropy."""

    def __init__(self, *args, entropy: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.entropy = entropy

    def forward(self, input, target):
        return F.cross_entropy_with_stats(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, backend=self.backend, inplace_grad=self.inplace_grad,
            entropy=self.entropy,
        )  # fmt: skip
