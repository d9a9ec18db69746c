"""Merge Studio: merge fine-tuned experts of one backbone, see why merges fail, evaluate per task.

Public API (stable): :func:`merge`, :func:`list_methods`, :func:`compress` (:class:`Compressed`), :class:`TaskPool`,
:class:`LayerRule`, the error classes, and (from the suite layer) :func:`load_suite`, :func:`evaluate`.

Example:
    >>> import torch, studio
    >>> base = {"w": torch.zeros(2, 2)}
    >>> experts = {"a": {"w": torch.eye(2)}, "b": {"w": torch.eye(2)}}
    >>> studio.merge(base, experts, "weight_average")["w"].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
"""

from .compress import Compressed, compress
from .engine import merge, merge_pool, get_pool
from .layers import ALL_MATRICES, DEFAULT as DEFAULT_LAYER_RULE, LayerRule, SKIP_EMBEDDINGS
from .pool import ExpertError, LayerTasks, TaskPool
from .registry import UnknownMethodError, list_methods
from .schema import HyperparameterError, Param, StudioError
from .suite import Suite, default_suite, load_suite
from .evaluate import EvalResult, alpha_sweep, evaluate, predict

__all__ = [
    "merge", "merge_pool", "get_pool", "list_methods", "compress", "Compressed",
    "TaskPool", "LayerTasks", "LayerRule", "DEFAULT_LAYER_RULE", "SKIP_EMBEDDINGS", "ALL_MATRICES", "Param",
    "StudioError", "ExpertError", "HyperparameterError", "UnknownMethodError",
    "Suite", "load_suite", "default_suite", "evaluate", "alpha_sweep", "predict", "EvalResult",
]
__version__ = "0.2.2"
