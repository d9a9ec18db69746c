"""Task Arithmetic (Ilharco et al., ICLR 2023): ``W = W_pre + alpha * sum_i Delta_i``."""

from __future__ import annotations

from torch import Tensor

from ..pool import LayerTasks
from ..registry import register
from ..schema import Param


@register(
    "task_arithmetic",
    params=(Param("alpha", float, 0.3, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
                  help="Scaling coefficient lambda applied to the summed task vectors.",
                  paper="Ilharco et al. 2023; 0.3 as in the TSV/Iso and AdaMerging ViT-B/32 8-task runs "
                        "(also FusionBench 0.2.33's task_arithmetic config)"),),
    paper="Editing Models with Task Arithmetic (Ilharco et al., ICLR 2023), tau_MTL = sum_i tau_i",
    summary="Sum of task vectors, scaled by alpha.",
    scope="all",
    vector_rule="sum",
)
def task_arithmetic(layer: LayerTasks) -> Tensor:
    """Sum of task matrices ``sum_i Delta_i`` (the engine applies ``alpha``).

    The layer's memoised sum (:meth:`~studio.pool.LayerTasks.sum`), which Iso-C, SVC and AlignMerge-B then reuse.

    Example:
        >>> import torch
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"b": torch.zeros(2)}, {"x": {"b": torch.ones(2)}, "y": {"b": torch.ones(2)}})
        >>> task_arithmetic(pool.layer("b")).tolist()
        [2.0, 2.0]
    """
    return layer.sum()
