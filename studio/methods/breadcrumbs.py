"""Model Breadcrumbs (Davari & Belilovsky, 2023): mask each layer's outliers and tiny updates, then Task Arithmetic."""

from __future__ import annotations

import torch
from torch import Tensor

from ..pool import LayerTasks
from ..registry import register
from ..schema import HyperparameterError, Param
from ._sparsify import band_blocks, band_mask, band_thresholds, generalized_task_arithmetic


@register(
    "breadcrumbs",
    params=(
        Param("beta", float, 0.01, low=0.0, high=0.5, ui_step=0.005,
              help="Fraction of each task's largest-magnitude entries per layer masked as outliers.",
              paper="Breadcrumbs Sec. 3 (top-beta mask); 1% = mergekit's default gamma (its name for this)"),
        Param("gamma", float, 0.85, low=0.0, high=0.99, ui_step=0.01,
              help="Fraction of each task's smallest-magnitude entries per layer masked as negligible.",
              paper="Breadcrumbs Sec. 3 (bottom-gamma mask); 85% as in the paper's suggested setting "
                    "(re-implementations; paper text not verified here)"),
        Param("alpha", float, 0.3, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Scaling coefficient lambda applied to the summed breadcrumbs.",
              paper="Task Arithmetic scaling, 0.3 as for TA/TIES/DARE on ViT-B/32 (project issue)"),
    ),
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2023), Sec. 3",
    summary="Per layer and task, keep the magnitude band between the top-beta outliers and the bottom-gamma, then sum.",
    scope="all",
    vector_rule="sum",
)
def breadcrumbs(layer: LayerTasks, beta: float, gamma: float) -> Tensor:
    """``sum_i M_i(beta, gamma) * Delta_i`` with the per-layer band mask of each task (the engine applies ``alpha``).

    ``M_i`` zeroes the ``int(beta*d)`` largest and the ``int(gamma*d)`` smallest magnitudes of task ``i`` in this
    layer (:func:`~studio.methods._sparsify.band_mask`). A preference weight rescales a task uniformly, so it
    leaves the mask unchanged.

    Example:
        >>> import torch
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.tensor([1.0, 5.0, 3.0, 0.1])}, "b": {"w": torch.tensor([2.0, 2.5, -4.0, 0.2])}}
        >>> layer = TaskPool({"w": torch.zeros(4)}, experts).layer("w")
        >>> breadcrumbs(layer, beta=0.25, gamma=0.25).tolist()   # each task keeps its 2nd and 3rd largest
        [3.0, 2.5, 3.0, 0.0]
    """
    if beta + gamma >= 1.0:
        raise HyperparameterError(
            f"breadcrumbs: beta={beta!r} + gamma={gamma!r} = {beta + gamma!r} masks every entry; "
            f"expected beta + gamma < 1"
        )
    # Each task's band [lo, hi) from one histogram pass over its magnitudes, then one streamed masked sum
    # (band_blocks), then the position rule for exact ties at a cut: of the entries equal to lo the first
    # lo_ties are dropped, of those equal to hi the first hi_ties are kept (band_mask's stable ranking).
    pool, key = layer.pool, layer.key
    base = pool.base[key].to(layer.device, torch.float32).reshape(-1)
    mag = torch.empty_like(base)
    bands, fixes = [], []
    for i, name in enumerate(layer.names):
        torch.sub(pool.experts[name][key].to(layer.device, torch.float32).reshape(-1), base, out=mag).abs_()
        lo, hi, lo_ties, hi_ties = band_thresholds(mag, beta, gamma)
        if lo == hi and (lo_ties or hi_ties):  # one tied value straddles both cuts
            return generalized_task_arithmetic(layer.deltas, lambda d: d * band_mask(d, beta, gamma), aggregate="sum")
        bands.append((lo, hi))
        for value, count, sign in ((lo, lo_ties, -1.0), (hi, hi_ties, 1.0)):
            if count > 0:
                fixes.append((i, sign, _first_equal(mag, value, count)))
    merged = band_blocks(layer.raw_chunks(), base.numel(), torch.tensor(bands, dtype=torch.float32), layer.weights)
    for i, sign, idx in fixes:
        values = pool.experts[layer.names[i]][key].to(layer.device, torch.float32).reshape(-1)[idx] - base[idx]
        if layer.weights is not None:
            values = values * layer.weights[i]
        merged.index_add_(0, idx, sign * values)
    return merged.reshape(layer.shape)


def _first_equal(values: Tensor, value: float, count: int, chunk: int = 1 << 18) -> Tensor:
    """Positions of the first ``count`` entries of the 1-D ``values`` equal to ``value``, scanning ``chunk`` entries
    at a time and stopping once ``count`` are found.

    Example:
        >>> _first_equal(torch.tensor([1.0, 2.0, 1.0, 1.0]), 1.0, 2, chunk=2).tolist()
        [0, 2]
    """
    found, need = [], count
    for start in range(0, values.numel(), chunk):
        idx = torch.nonzero(values[start:start + chunk] == value).flatten()[:need]
        if idx.numel():
            found.append(idx + start)
            need -= idx.numel()
            if need == 0:
                break
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=values.device)
