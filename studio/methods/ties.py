"""TIES-Merging (Yadav et al., NeurIPS 2023, Alg. 1): trim, elect sign, disjoint merge."""

from __future__ import annotations

import math
import threading
from typing import Iterator

import torch
from torch import Tensor

from ..layers import is_running_statistic
from ..parallel import parallel_map
from ..pool import LayerTasks, TaskPool, float32_delta
from ..registry import register
from ..schema import Param
from ._sparsify import (kth_smallest, restore_cancelled, streamed_order_statistics, ties_blocks, topk_rank,
                        topk_threshold)


def model_thresholds(pool: TaskPool, k: float, *, streamed: bool | None = None, chunk: int = 1 << 24) -> Tensor:
    """Per-task top-``k`` magnitude thresholds over the whole flattened model (all floating tensors), memoised.

    This is the official TIES code's trim scope (``topk_values_mask`` on ``state_dict_to_vector`` of each task
    vector; the CLIP ViT code bases pass ``remove_keys=[]``, so every tensor takes part) over the tensors merged
    here. The CLIP ViT code bases flatten open_clip's whole ``ImageEncoder`` state, which also holds the text
    tower's ``token_embedding``, ``positional_embedding``, ``ln_final``, ``text_projection`` and ``logit_scale``,
    whose task vectors are zero (25.6M entries for ViT-B/32, against 87.8M in ``visual.*``): their ``k = 0.2`` of
    that vector keeps ~25.8 % of each task's visual entries. FusionBench merges the vision tower alone, as this
    library's suites do (``visual.*`` keys), and keeps 20 %; to reproduce the CLIP code bases' runs, pass
    ``k = 0.258`` for ViT-B/32 (or include the zero-delta text keys in the state dicts). Exact: the k-th smallest
    of each task's flattened magnitudes, one task per worker thread. On the CPU each worker writes ``|expert -
    base|`` into one model-sized float32 vector that it reuses for its next task (~0.35 GB for ViT-B/32) and
    selects in place (:func:`~studio.methods._sparsify.kth_smallest`, NumPy's introselect); on other devices the
    magnitudes are counted ``chunk`` entries at a time (:func:`~studio.methods._sparsify.streamed_order_statistics`;
    ``streamed=True`` forces this on the CPU too). Both give the same thresholds.

    Computed on the unweighted task vectors: a preference weight ``w_i >= 0`` multiplies every entry of task ``i``
    by the same factor, which leaves that task's magnitude ranking and hence its mask unchanged, so one
    computation serves every weighting.

    Example:
        >>> import torch
        >>> pool = TaskPool({"a": torch.zeros(2), "b": torch.zeros(2)},
        ...                 {"x": {"a": torch.tensor([4.0, 1.0]), "b": torch.tensor([0.5, 2.0])}})
        >>> model_thresholds(pool, 0.5).tolist()   # 4 entries, rank 4 - int(2) = 2 -> 2nd smallest |x|
        [1.0]
    """
    # BatchNorm's running statistics are no task vector (the engine gives them the experts' mean)
    keys = [key for key in pool.keys if pool.base[key].is_floating_point() and not is_running_statistic(key)]
    total = sum(pool.base[key].numel() for key in keys)
    if pool.device.type != "cpu":   # the in-place selection below works on CPU tensors only
        streamed = True
    elif streamed is None:
        streamed = False

    def task_magnitudes(name: str, out: Tensor) -> Iterator[Tensor]:
        # |expert - base| of one task, up to len(out) entries at a time, written into out.
        at = 0
        for key in keys:
            base = pool.tensor(None, key).reshape(-1)
            expert = pool.tensor(name, key).reshape(-1)
            for start in range(0, base.numel(), chunk):
                stop = min(base.numel(), start + chunk)
                if at + stop - start > out.numel():
                    yield out[:at]
                    at = 0
                # the numbers raw_chunks gives (float64 weights subtracted before rounding)
                float32_delta(expert[start:stop], base[start:stop], out=out[at:at + stop - start]).abs_()
                at += stop - start
        yield out[:at]

    def compute() -> Tensor:
        rank = topk_rank(total, k)
        if rank <= 0:
            return torch.zeros(len(pool.names), device=pool.device, dtype=torch.float32)
        local = threading.local()

        def threshold(name: str) -> Tensor:
            if not streamed:
                if getattr(local, "flat", None) is None:
                    local.flat = torch.empty(total, dtype=torch.float32)
                (flat,) = task_magnitudes(name, local.flat)
                return kth_smallest(flat, rank, overwrite=True)
            buf = torch.empty(min(chunk, total), dtype=torch.float32, device=pool.device)
            values, _ = streamed_order_statistics(lambda: task_magnitudes(name, buf), [rank])
            return values[0]

        # One task per worker thread (studio.parallel).
        return torch.stack(parallel_map(threshold, pool.names, device=pool.device))

    return pool.memo(("ties.model_thresholds", float(k)), compute)


def _prepare(pool: TaskPool, keys: list[str], *, k: float, topk_scope: str, merge_func: str) -> None:
    """Compute the model-scope thresholds before the layer loop, where they can use every worker thread."""
    if topk_scope == "model":
        model_thresholds(pool, k)


def _finalize(deltas: dict[str, Tensor], model_state: dict, *, k: float, topk_scope: str, merge_func: str) -> None:
    """The model-wide majority sign of the official code (``resolve_zero_signs(sign, "majority")`` on the flattened
    model): entries whose trimmed values cancel exactly take the sign of the sum of every elected sign.

    Each layer (``topk_scope="model"``) left such entries at their negative aggregate and recorded its votes and
    the positive aggregate (:func:`~studio.methods._sparsify.ties_blocks`); a positive model majority puts the
    positive one back. A zero majority keeps the negative one, as the official ``where(sign > 0, x > 0, x < 0)``.
    """
    if topk_scope != "model" or not model_state:
        return
    if sum(votes for votes, _ in model_state.values()) > 0:
        for key, (_, cancelled) in model_state.items():
            restore_cancelled(deltas[key], cancelled)


@register(
    "ties",
    params=(
        Param("k", float, 0.2, low=0.01, high=1.0, ui_step=0.01,
              help="Fraction of each task vector kept by magnitude before the sign election (top-k).",
              paper="TIES Alg. 1 step 1; k = 20% as in the paper's experiments and official code (reset_thresh=20)"),
        Param("topk_scope", str, "model", choices=("model", "layer"),
              help="Rank magnitudes over each task's whole model (official TIES code) or within each layer (the "
                   "official steps run on each tensor alone, as the official SVC code's layer-wise TIES).",
              paper="official TIES code flattens the model (state_dict_to_vector); per tensor: SVC's "
                    "layer_wise_TIES (mergekit also trims per tensor, with its own rounding and zero-sign rule)"),
        Param("merge_func", str, "sum", choices=("sum", "mean"),
              help="Aggregate the sign-agreeing entries by their sum (dis-sum) or their mean (dis-mean).",
              paper="TIES Alg. 1 uses the disjoint mean (lambda=1); AdaMerging's CLIP ViT runs "
                    "(main_ties_merging.py) and FusionBench use dis-sum with lambda=0.3; the TALL-masks / TSV / Iso "
                    "code bases' ties baseline uses dis-mean, lambda chosen on validation (src/eval/aggregation.py)"),
        Param("alpha", float, 0.3, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Scaling coefficient lambda applied to the merged task vector.",
              paper="0.3 with dis-sum as in AdaMerging (main_ties_merging.py) for ViT-B/32 8 tasks "
                    "(also FusionBench 0.2.33's ties_merging config)"),
    ),
    paper="TIES-Merging: Resolving Interference When Merging Models (Yadav et al., NeurIPS 2023), Alg. 1",
    summary="Keep each task's top-k magnitudes, elect a sign per parameter, merge only the agreeing entries.",
    scope="all",
    vector_rule="sum",
    prepare=_prepare,
    finalize=_finalize,
)
def ties(layer: LayerTasks, k: float, topk_scope: str, merge_func: str, model_state: dict | None = None) -> Tensor:
    """TIES merge of one tensor: ``tau_m = disjoint_{sum|mean}(trim_k(tau_i))`` (the engine applies ``alpha``).

    Trim (Alg. 1 step 1): each task keeps its top-``k`` magnitudes; with ``topk_scope="model"`` the threshold is
    taken over that task's whole model (official code), with ``"layer"`` over this tensor only. Elect (step 2):
    ``sgn(sum_i trimmed_i)``, zeros resolved by majority. Disjoint merge (step 3): aggregate the entries agreeing
    with the elected sign. The official code runs these steps on the flattened model; since steps 2-3 are
    element-wise, running them per tensor gives the same result, except for the entries whose trimmed values cancel
    exactly: the official code gives them the majority of the elected signs over the whole model. The engine passes
    ``model_state`` (a dict shared by one merge's layers) and finishes those entries once every layer is done
    (:func:`_finalize`); called on its own (``model_state=None``) or with ``topk_scope="layer"`` the majority is the
    tensor's own, as in the official code run on that tensor alone.

    Masks come from the unweighted task matrices (a per-task preference weight does not change a task's ranking);
    the election and the merge use the weighted ones (``p_i / max_j p_j``, as every method without a calibration).
    With ``merge_func="mean"`` the disjoint mean is then of the weighted values, so a one-hot preference gives that
    task's trimmed vector where it wins the election (mergekit's weighted TIES divides by the agreeing weights
    instead).

    Example:
        >>> import torch
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.tensor([1.0, 2.0, -1.0])}, "b": {"w": torch.tensor([3.0, -1.0, -2.0])}}
        >>> layer = TaskPool({"w": torch.zeros(3)}, experts).layer("w")
        >>> ties(layer, k=1.0, topk_scope="layer", merge_func="mean").tolist()
        [2.0, 2.0, -1.5]
    """
    if topk_scope == "model":
        thresholds = model_thresholds(layer.pool, k)
    else:
        thresholds = layer_thresholds(layer, k)
    numel = math.prod(layer.shape)
    deferred: list | None = [] if model_state is not None and topk_scope == "model" else None
    merged = ties_blocks(layer.raw_chunks(), numel, thresholds, layer.weights, merge_func, deferred)
    if deferred is not None:
        model_state[layer.key] = deferred[0]   # (votes, cancelled entries), see _finalize
    return merged.reshape(layer.shape)


def layer_thresholds(layer: LayerTasks, k: float) -> Tensor:
    """Per-task top-``k`` magnitude thresholds within one tensor (``topk_scope="layer"``), ``[T]``.

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.tensor([1.0, -4.0, 2.0])}, "b": {"w": torch.tensor([0.5, 0.1, -3.0])}}
        >>> layer_thresholds(TaskPool({"w": torch.zeros(3)}, experts).layer("w"), 0.4).tolist()
        [2.0, 0.5]
    """
    raw = layer.pool.raw_deltas(layer.key).reshape(layer.num_tasks, -1)
    return topk_threshold(raw.abs(), k).flatten()
