"""gpuxent: fused softmax-cross-entropy on CPU (numba) and GPU (Triton, Numba CUDA), one API."""

from . import distributed, functional, nn, post_training
from .functional import *  # noqa: F403 - the functions of the lecture and the losses (functional.__all__)
from .linear import linear_cross_entropy, linear_cross_entropy_with_stats
from .post_training import *  # noqa: F403

__version__ = "0.1.0"

__all__ = [
    *(name for name in functional.__all__ if name != "FLOAT_DTYPES"),
    "linear_cross_entropy",
    "linear_cross_entropy_with_stats",
    *post_training.__all__,
    "distributed",
    "nn",
]
