"""gpuxent: fused softmax-cross-entropy on CPU (numba) and GPU (Triton, Numba CUDA), one API."""

from . import distributed, nn
from .functional import (
    CrossEntropyOutput,
    available_backends,
    binary_cross_entropy,
    binary_cross_entropy_with_logits,
    cross_entropy,
    cross_entropy_and_grad,
    cross_entropy_with_stats,
    distillation_loss,
    log_softmax,
    predict,
    predict_binary,
    softmax,
)
from .linear import linear_cross_entropy, linear_cross_entropy_with_stats
from .post_training import LogProbs, linear_distillation_loss, linear_log_probs

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyOutput",
    "available_backends",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "cross_entropy_and_grad",
    "distillation_loss",
    "cross_entropy_with_stats",
    "distributed",
    "linear_cross_entropy",
    "linear_cross_entropy_with_stats",
    "linear_distillation_loss",
    "linear_log_probs",
    "LogProbs",
    "log_softmax",
    "nn",
    "predict",
    "predict_binary",
    "softmax",
]
