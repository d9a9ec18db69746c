"""Iso-C (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces"), Alg. 1: flatten the spectrum of the summed task matrices to its mean singular value.
"""

from __future__ import annotations

from torch import Tensor

from .. import linalg
from ..pool import LayerTasks
from ..registry import register
from ..schema import Param

__all__ = ["iso_c"]


@register(
    "iso_c",
    params=(
        Param("alpha", float, 1.3, low=0.0, high=3.0, post_scale=True, ui_step=0.05,
              help="Global scaling of the isotropic merged task matrices. 1.3 is the paper's validated value for "
                   "ViT-B/32 with 8 tasks; its Table 5 gives 1.0 / 0.9 for 14 / 20 tasks and 1.5 for ViT-L/14 "
                   "(8 tasks): tune it on validation data.",
              paper="Iso paper eq. 9; Table 5 (appx. D.3): optimal alpha for Iso-C, ViT-B/32, 8 tasks = 1.30"),
    ),
    paper="No Task Left Behind (Marczak et al., ICML 2025), Alg. 1 Iso-C, eq. 7-9",
    summary="SVD of the summed task matrices with every singular value replaced by their mean (isotropic).",
    scope="matrix",
    vector_rule="mean",
    decomposes=True,
)
def iso_c(layer: LayerTasks) -> Tensor:
    """``Delta_Iso-C = sigma_bar U V^T`` with ``U Sigma V^T = sum_t Delta_t`` and ``sigma_bar = mean(sigma)``.

    Iso eq. 7-8 (Alg. 1). As in the official ``iso_c``, the SVD is of the SUM of the task matrices (the code
    averages and then multiplies by ``T``), over all ``r = min(m, n)`` singular values; non-matrix tensors get the
    mean of the task vectors (engine ``vector_rule="mean"``, Iso appx. C.2). The exact SVD of the sum comes from
    ``layer.sum_svd()``, cached per pool and shared with Iso-CTS, SVC and the diagnostics.

    **Deviation from the official code, for a rank-deficient sum** (rank below ``r``, e.g. a few LoRA experts:
    Iso sec. 5 merges rank-16 LoRAs, 8 x 16 = 128 directions of 768): the official code puts ``sigma_bar`` on every
    one of the ``r`` directions, including the sum's null space, whose singular vectors any SVD picks arbitrarily
    and, for experts stored on a base, the float32 rounding of the weights sets (singular values ~1e-7 of the
    largest). The merge then depends on that rounding: 4 rank-3 experts of a ``96 x 64`` layer merged 127 % apart
    stored on a random base and on a zero one. Here only the sum's directions that stand above the stored weights'
    rounding get ``sigma_bar`` (:meth:`~studio.pool.LayerTasks.sum_rank`: the smallest singular values that fit a
    block of that rounding of their number are dropped, :func:`studio.linalg.rounding_rank`), which stays the
    official mean over all ``r`` singular values. So the LoRA null space of float32 (or float64) experts is dropped
    wherever they are stored (1e-5 to 3e-3 apart on a random and a zero base, deltas down to 2.3e-4 of the weights;
    half-precision experts are rounded as float32, their own grid not modelled, :func:`studio.linalg.stored_precision`;
    a cut on the size alone, ten times float32's resolution of the largest, merged those up to 8 times their size
    apart), and a
    full-rank sum keeps every direction above its rounding, however small against the largest: the bench's ViT-B/32
    experts have three ``768 x 768`` sums with one direction at 1.6-4.1e-6 of the largest, which that size cut
    dropped (10 % of one such layer's largest entry from the official merge; docs/ENGINE.md). MiniSuite's weakest
    direction sits at 2.4e-4 of its layer's largest.

    Example:
        >>> import torch
        >>> from studio.pool import TaskPool
        >>> base = {"w": torch.zeros(2, 2)}
        >>> experts = {"a": {"w": torch.diag(torch.tensor([3.0, 0.0]))},
        ...            "b": {"w": torch.diag(torch.tensor([0.0, 1.0]))}}
        >>> iso_c(TaskPool(base, experts).layer("w")).tolist()   # spectrum (3, 1) -> (2, 2)
        [[2.0, 0.0], [0.0, 2.0]]
    """
    U, S, Vh = layer.sum_svd()
    rank = layer.sum_rank()
    return linalg.reconstruct(U[:, :rank], S.mean().expand(rank), Vh[:rank])
