"""Singular Value Calibration (SVC; Li et al., "When Shared Knowledge Hurts: Spectral Over-Accumulation in Model
Merging", arXiv:2602.05536, Alg. 1): a post-hoc calibration applied after any base merge.

Official code: github.com/lyymuwu/SVC (``merge_func.py``: ``Align`` / ``coef_cal_multi_ranks``; ``main.py``;
``run.sh``). Where it and the paper differ we follow the code and say so below. Two versions of the code's uniform
aggregation are public: the current ``eta = torch.maximum(s, alpha).mean(dim=1)`` (which is the paper's eq. 20,
with the older rule left in a comment as "original behavior"), and the older ``eta = max(mean(s), alpha)`` if
every ``s > 0``, else ``1``. We follow the current one, i.e. eq. 20.
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor

from ..pool import LayerTasks
from ..registry import register
from ..schema import Param
from ._align import MergedSvd, merged_spectrum, svc_gamma, svc_projection_coefficients, svc_unresolved

#: The global scale lambda each base method had in the official SVC runs (main.py / merge_func.py), i.e. the scale
#: the merged delta carried when SVC saw it; after SVC the code adds the result with lambda = 1 (App. A). The values
#: are for this library's form of each method with the settings noted: the official DARE() *averages* the dropped
#: task vectors with lambda = 1, which is this library's (summing) ``dare`` at ``alpha = 1/T``.
PAPER_BASE_SCALES = {
    "task_arithmetic": 0.3,  # TA(): Wm = mean * K * 0.3
    "ties": 1.0,  # layer_wise_TIES: top-20% trim, dis-mean, scaling_coef = 1 (topk_scope="layer", merge_func="mean")
    "dare": "1/T",  # DARE(): drop p = 0.8 with rescale, mean, scaling_coef = 1 (our dare sums: alpha = 1/T)
    "tsv_m": 1.0,
    "iso_c": 1.0,
    "iso_cts": 1.0,
    "weight_average": 1.0,
}


#: SVC's automatic clip after these base methods, instead of ``1/K`` (the ``alpha`` schema's ``auto_after``).
ALPHA_AFTER = (("tsv_m", 1.0),)


def resolve_alpha(alpha: float | None, num_tasks: int, base_method: str) -> float:
    """SVC's automatic clip: ``1/K``, or ``1`` on top of TSV-M (SVC sec. 5.1; official ``run.sh``; :data:`ALPHA_AFTER`).

    Example:
        >>> resolve_alpha(None, 8, "task_arithmetic"), resolve_alpha(None, 8, "tsv_m"), resolve_alpha(0.5, 8, "tsv_m")
        (0.125, 1.0, 0.5)
    """
    if alpha is not None:
        return float(alpha)
    return dict(ALPHA_AFTER).get(base_method, 1.0 / num_tasks)


@register(
    "svc",
    kind="calibration",
    params=(
        Param("alpha", float, None, low=1e-4, high=1.0, ui_step=0.005, auto="1/T (1.0 after tsv_m)",
              auto_after=ALPHA_AFTER,
              help="Clip in gamma = K / sum_i max(alpha, s_i): 1 only suppresses inflated singular values, "
                   "smaller values also amplify under-counted subspaces (up to 1/alpha).",
              paper="SVC eq. 20; sec. 5.1 default alpha = 1/K, alpha = 1 for TSV-M w/ SVC (official run.sh); "
                    "sec. 5.3 / Fig. 5 ablation, alpha in (0, 1]"),
        Param("target_guard", bool, True,
              help="With a one-hot preference (target-task calibration), leave subspaces where the target's "
                   "s_t <= 0 unchanged (official code) instead of scaling them by 1/alpha (paper formula). Only an "
                   "exactly one-hot preference is guarded; any other weight uses the weighted formula.",
              paper="official SVC code coef_cal_multi_ranks(target=t): eta = max(s_t, alpha) if s_t > 0 else 1; "
                    "SVC sec. 5.3 writes gamma = 1/max(alpha, s_t)"),
    ),
    paper="When Shared Knowledge Hurts: Spectral Over-Accumulation in Model Merging (Li et al. 2026), Alg. 1, "
          "eq. 17-23; official code github.com/lyymuwu/SVC",
    summary="Rescale each singular value of the merged delta by how much the tasks over-count that subspace "
            "(directions unchanged).",
    layer_rule="skip_embeddings",
    decomposes=True,
)
def svc(layer: LayerTasks, merged: Tensor, *, scale: float, preferences: Tensor | None, base_method: str,
        merged_tag: Hashable | None = None, merged_svd: MergedSvd | None = None, alpha: float | None,
        target_guard: bool) -> Tensor:
    """SVC (Alg. 1) on one matrix layer; returns the final delta ``Delta W~_merge`` (added with lambda = 1).

    Steps, for the merged delta ``M = scale * merged`` the base method produced:

    1. ``M = U diag(sigma) V^T`` (eq. 17);
    2. ``a_i^r = u_r^T Delta_i``, ``a_merge^r = u_r^T M``, ``s_i^r = <a_merge^r, a_i^r> / ||a_i^r||^2`` (eq. 18-19);
    3. ``gamma^r = sum_i p_i / sum_i p_i max(alpha, s_i^r)`` with normalised preferences ``p`` -- uniform ``p``
       is eq. 20, ``gamma^r = K / sum_i max(alpha, s_i^r)``; one-hot ``p = e_t`` is the target-task calibration
       of sec. 5.3, ``gamma^r = 1 / max(alpha, s_t^r)`` (see :func:`~studio.methods._align.svc_gamma` for the
       official code's ``s_t <= 0`` guard);
    4. ``sigma~^r = gamma^r sigma^r`` and ``Delta W~ = U diag(sigma~) V^T`` (eq. 21-22); ``W = W_pre + Delta W~``
       (eq. 23).

    Where lambda enters (eq. 1 vs eq. 23): SVC calibrates the base method's *final* delta, i.e. after its own
    global scale, and then adds the result with lambda = 1 (App. A: "we keep lambda = 1 throughout"; official
    code: ``TA()`` bakes 0.3 into ``Wm`` before ``layer_wise_Align``, which then sets ``scaling_coef = 1``). So
    ``M = scale * merged`` here, and ``scale`` is not applied again. Because ``s`` scales with ``scale``, the result
    is not linear in it; for subspaces with every ``s_i >= alpha`` the scale cancels (``sigma~ = sigma / mean s``).
    The official runs used TA with lambda = 0.3 and TIES (dis-mean), DARE (the mean of the dropped task vectors),
    TSV-M, Iso-C, Iso-CTS with lambda = 1 (:data:`PAPER_BASE_SCALES`; for this library's summing ``dare`` that is
    ``alpha = 1/T``).

    Layers: the official code calibrates 2-D tensors except ``text_projection`` and any key containing
    ``embedding``; hence ``layer_rule="skip_embeddings"`` (the paper only says "each linear layer", App. A). The
    base method keeps its own rule; the SVC repository's own TSV-M also skips ``embedding`` keys (the TSV
    repository's does not), so ``layer_rule="skip_embeddings"`` on ``tsv_m`` + ``svc`` reproduces that pipeline.
    1-D tensors (biases, LayerNorm) and the skipped matrices are left as the base method merged them. The paper's
    vector form (eq. 24, in the appendix's PEFT experiments on T0: ``gamma = K / sum_i s_i`` with ``s_i =
    <tau_merge, tau_i> / <tau_i, tau_i>``) is for IA3 experts, whose updates are all vectors and leave no matrix
    layer to calibrate; the official code applies it to none of a fully fine-tuned model's tensors, nor does this.

    Memoisation: the SVD of ``merged`` and the per-task ``(c, |a|^2)`` are computed once per ``merged_tag``
    (:func:`~studio.methods._align.merged_spectrum`; the Task Arithmetic sum reuses ``layer.sum_svd()``, TSV-M's
    and AlignMerge-O's deltas their own factors, ``merged_svd``), so changing ``alpha``, ``scale`` or the
    preferences costs O(T R) plus one reconstruction.

    Example:
        >>> import torch
        >>> from studio.pool import TaskPool
        >>> d = torch.diag(torch.tensor([1.0, 0.2]))
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": d}, "b": {"w": d}})
        >>> layer = pool.layer("w")
        >>> out = svc(layer, layer.sum(), scale=1.0, preferences=None, base_method="task_arithmetic",
        ...           alpha=1.0, target_guard=True)
        >>> out.diagonal().tolist()   # two identical tasks: s = 2 everywhere, gamma = 1/2 -> back to one task
        [1.0, 0.20000000298023224]
    """
    spec = merged_spectrum(layer, merged, merged_tag, merged_svd)
    a = resolve_alpha(alpha, layer.num_tasks, base_method)
    s = svc_projection_coefficients(spec.S, spec.c, spec.a2, scale)
    gamma = svc_gamma(s, a, preferences, target_guard, svc_unresolved(spec.c, spec.a2))
    # s = scale * sigma * c / ||a||^2 overflows float32 (inf) for task vectors near 4e18, where gamma would be 0 (or
    # 1 for a target task) and erase (or keep) the subspace unseen: NaN there, which the engine's finiteness check
    # names as the calibration's overflow
    gamma = torch.where(torch.isfinite(s).all(0), gamma, torch.full_like(gamma, float("nan")))
    return spec.rescale(merged, gamma, scale)
