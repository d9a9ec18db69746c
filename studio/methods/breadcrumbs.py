"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): mask each task's outliers and tiny updates, then Task
Arithmetic."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..pool import LayerTasks, TaskPool, float32_delta
from ..registry import register
from ..schema import HyperparameterError, Param
from ._sparsify import (band_blocks, band_counts, band_mask, band_thresholds, generalized_task_arithmetic,
                        row_band_mask)


def _check_keeps_entries(pool: TaskPool, keys: list[str], *, beta: float, gamma: float, scope: str) -> None:
    """Refuse ``beta, gamma`` that keep no entry of any masked tensor (before the layer loop): the counts truncate
    as the official code's (:func:`~studio.methods._sparsify.band_counts`), so a kept fraction below ``1 / d`` keeps
    nothing of a ``d``-entry row or tensor, which is right for short rows beside long ones but on every tensor
    leaves the merge at the base (``beta=0.3, gamma=0.6999999996`` was accepted and merged to zero; a helper's edge
    audit). 0-d tensors, which the official code leaves unmasked, do not count."""
    band_counts(1, beta, gamma)   # validates beta + gamma < 1 first
    sizes = [(shape[-1] if scope == "row" else math.prod(shape)) for shape in (pool.base[key].shape for key in keys)
             if len(shape) > 0]
    sizes = [d for d in sizes if d > 0]
    if not sizes or any(sum(band_counts(d, beta, gamma)) < d for d in sizes):
        return
    longest = max(sizes)
    largest_gamma = math.floor((1 - beta - 1 / longest) * 1e6) / 1e6   # one that keeps an entry, as printed
    while largest_gamma > 0 and sum(band_counts(longest, beta, largest_gamma)) >= longest:
        largest_gamma = round(largest_gamma - 1e-6, 6)
    raise HyperparameterError(
        f"breadcrumbs: beta={beta!r} and gamma={gamma!r} keep int(d * (1 - beta - gamma)) = 0 entries of every "
        f"{'row' if scope == 'row' else 'tensor'} (d = {longest} at the most, scope={scope!r}), so the merge would "
        f"leave every masked tensor at the base; expected 1 - beta - gamma >= 1/{longest}"
        + (f", e.g. gamma <= {largest_gamma:g}" if largest_gamma > 0 else "")
        + (" (or scope='layer', which ranks whole tensors)" if scope == "row" else ""))


@register(
    "breadcrumbs",
    params=(
        Param("beta", float, 0.01, low=0.0, high=0.5, ui_high=0.05, ui_step=0.005,
              help="Fraction of each task's largest-magnitude entries masked as outliers (per row or layer); "
                   "beta + gamma must be below 1.",
              paper="Breadcrumbs Sec. 3 (top-beta mask; official code: top_k_remove, searched in [0.001, 0.01]); "
                    "1% = mergekit's default gamma (its name for this)"),
        Param("gamma", float, 0.85, low=0.0, high=0.99, ui_high=0.94, ui_step=0.01,
              help="Fraction of each task's smallest-magnitude entries masked as negligible; 1 - beta - gamma "
                   "is the fraction kept.",
              paper="Breadcrumbs Sec. 3 (bottom mask); official code: top_k_keep = 1 - beta - gamma, searched in "
                    "[0.05, 0.20]; 0.85 keeps 14%"),
        Param("scope", str, "row", choices=("row", "layer"),
              help="Rank magnitudes within each row of the last dimension (official code) or over the whole "
                   "tensor (the paper's text, mergekit).",
              paper="official TaskVectorMiddleKeep: torch.topk along tensor.shape[-1]; paper Sec. 3: 'for each "
                    "layer'"),
        Param("alpha", float, 0.3, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Scaling coefficient lambda applied to the summed breadcrumbs.",
              paper="Task Arithmetic scaling, 0.3 as for TA/TIES/DARE on ViT-B/32 (project issue)"),
    ),
    paper="Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, ECCV 2024), "
          "Sec. 3; official code rezazzr/breadcrumbs (TaskVectorMiddleKeep)",
    summary="Per task, keep the magnitude band between the top-beta outliers and the bottom-gamma (per row, as the "
            "official code), then sum.",
    scope="all",
    vector_rule="sum",
    prepare=_check_keeps_entries,
)
def breadcrumbs(layer: LayerTasks, beta: float, gamma: float, scope: str = "row") -> Tensor:
    """``sum_i M_i(beta, gamma) * Delta_i`` with the band mask of each task (the engine applies ``alpha``).

    ``M_i`` zeroes task ``i``'s largest-magnitude entries (outliers) and its smallest ones, keeping the band in
    between (:func:`~studio.methods._sparsify.band_mask`; counts :func:`~studio.methods._sparsify.band_counts`:
    ``int(beta * d)`` removed at the top, ``int((1 - beta - gamma) * d)`` kept). The paper says the ranking runs
    "for each layer"; the official code (``TaskVectorMiddleKeep``, remove-first) ranks along the last dimension with
    ``torch.topk``, i.e. within each output row of a weight matrix (each innermost row of a conv kernel; a 1-D
    tensor as a whole; 0-d tensors unmasked). We follow the official code by default (``scope="row"``);
    ``scope="layer"`` ranks the whole tensor, as the paper's text and mergekit. The official hyperparameters map as
    ``top_k_remove = beta`` and ``top_k_keep = 1 - beta - gamma``; as there a row (or tensor) shorter than
    ``1 / top_k_keep`` keeps nothing (a ``3 x 3`` kernel's rows at the default 14 %), and settings under which no
    row (tensor) keeps an entry are refused. Exact ties are ranked by position (``topk``
    leaves their order unspecified). A preference weight rescales a task uniformly, so it leaves the mask unchanged.

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.tensor([[1.0, 9.0, 3.0, 4.0], [50.0, 60.0, 5.0, 80.0]])}}
        >>> layer = TaskPool({"w": torch.zeros(2, 4)}, experts).layer("w")
        >>> breadcrumbs(layer, beta=0.25, gamma=0.25).tolist()              # per row: drop its top and bottom
        [[0.0, 0.0, 3.0, 4.0], [50.0, 60.0, 0.0, 0.0]]
        >>> breadcrumbs(layer, beta=0.25, gamma=0.25, scope="layer").tolist()  # whole tensor: top 2, bottom 2
        [[0.0, 9.0, 0.0, 4.0], [50.0, 0.0, 5.0, 0.0]]
    """
    band_counts(1, beta, gamma)   # validates beta + gamma < 1
    if scope == "row":
        return _breadcrumbs_rows(layer, beta, gamma)
    if scope != "layer":
        raise HyperparameterError(f"breadcrumbs: scope must be 'row' or 'layer', got {scope!r}")
    # Each task's band [lo, hi) from one selection pass over its magnitudes, then one streamed masked sum
    # (band_blocks), then the position rule for exact ties at a cut: of the entries equal to lo the first
    # lo_ties are dropped, of those equal to hi the first hi_ties are kept (band_mask's stable ranking).
    pool, key = layer.pool, layer.key
    numel = math.prod(layer.shape)
    n_top, n_bottom = band_counts(numel, beta, gamma)
    if n_top + n_bottom >= numel:   # nothing kept (a tiny tensor)
        return torch.zeros(layer.shape, device=layer.device, dtype=torch.float32)
    base = pool.tensor(None, key).reshape(-1)
    mag = torch.empty(base.shape, device=base.device, dtype=torch.float32)
    bands, fixes = [], []
    for i, name in enumerate(layer.names):
        float32_delta(pool.tensor(name, key).reshape(-1), base, out=mag).abs_()   # raw_chunks' numbers
        lo, hi, lo_ties, hi_ties = band_thresholds(mag, beta, gamma)
        if lo == hi and (lo_ties or hi_ties):  # one tied value straddles both cuts
            return generalized_task_arithmetic(
                layer.deltas, lambda d: d * band_mask(d, beta, gamma, scope="layer"), aggregate="sum")
        bands.append((lo, hi))
        for value, count, sign in ((lo, lo_ties, -1.0), (hi, hi_ties, 1.0)):
            if count > 0:
                fixes.append((i, sign, _first_equal(mag, value, count)))
    merged = band_blocks(layer.raw_chunks(), base.numel(), torch.tensor(bands, dtype=torch.float32), layer.weights)
    for i, sign, idx in fixes:
        values = float32_delta(pool.tensor(layer.names[i], key).reshape(-1)[idx], base[idx])
        if layer.weights is not None:
            values = values * layer.weights[i]
        merged.index_add_(0, idx, sign * values)
    return merged.reshape(layer.shape)


def _breadcrumbs_rows(layer: LayerTasks, beta: float, gamma: float) -> Tensor:
    """``scope="row"``: the band of every row of the last dimension, a cache-sized block of whole rows at a time
    (:meth:`~studio.pool.LayerTasks.raw_chunks`), each task's rows ranked by
    :func:`~studio.methods._sparsify.row_band_mask`."""
    shape = layer.shape
    T = layer.num_tasks
    if len(shape) == 0:   # the official code leaves 0-d tensors unmasked
        return layer.sum()
    d = shape[-1]
    n_top, n_bottom = band_counts(d, beta, gamma)
    numel = math.prod(shape)
    if n_top + n_bottom >= d or numel == 0:   # rows too short to keep anything
        return torch.zeros(shape, device=layer.device, dtype=torch.float32)
    rows = numel // d
    block_rows = rows if layer.device.type != "cpu" else max(1, min(rows, (1 << 18) // max(1, T * d)))
    weights = None if layer.weights is None else layer.weights.reshape(-1, 1).to(layer.device, torch.float32)
    out = torch.empty(numel, device=layer.device, dtype=torch.float32)
    for start, stop, x in layer.raw_chunks(chunk=block_rows * d):
        width = stop - start
        mask = row_band_mask(x.abs().reshape(-1, d), n_top, n_bottom)
        x.mul_(mask.reshape(T, width))
        if weights is not None:
            x.mul_(weights)
        torch.sum(x, 0, out=out[start:stop])
    return out.reshape(shape)


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
