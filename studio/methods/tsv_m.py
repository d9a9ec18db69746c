"""TSV-Merge (Gargiulo et al., CVPR 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging").

Per matrix layer: keep each task's top-``k`` singular triplets (TSV eq. 5-6, Alg. 1 lines 1-4), concatenate them
(eq. 4), decorrelate the concatenated left and right singular vectors by whitening / orthogonal Procrustes
(eq. 9, Prop. 4.1, Alg. 1 lines 9-14) and rebuild ``U_perp Sigma V_perp^T`` (Alg. 1 line 16). Non-matrix tensors
get the mean of the task vectors (TSV appx. B.1, official ``compute_and_sum_svd_mem_reduction``), and ``alpha``
scales everything (Alg. 1 line 18; sec. 6.3: alpha = 1.0 needs no tuning).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import linalg
from ..linalg import polar_gram_many, polar_gram_ranks
from ..pool import LayerTasks, TaskPool
from ..registry import register
from ..schema import HyperparameterError, Param

__all__ = ["tsv_m", "tsv_m_svd", "tsv_rank", "tsv_cover", "tsv_factors", "refuse_keeping_nothing", "smallest_fraction"]


def tsv_rank(r: int, num_tasks: int, rank_fraction: float | None, *, owner: str = "tsv_m", key: str = "") -> int:
    """Number of singular triplets kept per task: ``k = int(r * rank_fraction)``, ``rank_fraction = 1/T`` by default.

    The default is the official code's ``int(s.shape[0] * (1 / num_tasks))`` (TSV Alg. 1 line 3, "retain the first
    1/T singular components"). As in the official code, ``k`` may round down to 0 on a small layer (e.g. ``r = 50``,
    ``rank_fraction < 0.02``), which then keeps no component. Raises :class:`HyperparameterError` if
    ``rank_fraction <= 0`` or if the ``T * k`` concatenated directions would not fit in the ``r``-dimensional space
    (``T * k > r``).

    Example:
        >>> tsv_rank(768, 8, None), tsv_rank(768, 8, 0.05), tsv_rank(50, 8, None), tsv_rank(50, 8, 0.01)
        (96, 38, 6, 0)
    """
    fraction = 1.0 / num_tasks if rank_fraction is None else float(rank_fraction)
    if not fraction > 0:
        raise HyperparameterError(
            f"{owner}: rank_fraction = {fraction:g} keeps no singular components; expected a value in (0, 1]"
        )
    k = int(r * fraction)
    if num_tasks * k > r:
        where = f"layer '{key}' of rank {r}" if key else f"rank {r}"
        shown = _shown(fraction, r)
        raise HyperparameterError(
            f"{owner}: rank_fraction = {shown} keeps k = {k} components per task, and {num_tasks} tasks x {k} = "
            f"{num_tasks * k} exceeds the {where}; expected rank_fraction <= 1/{num_tasks} (1/T, the TSV default)"
        )
    return k


def _shown(fraction: float, r: int) -> str:
    """``fraction`` as a message shows it: ``:g``, or the value as given where that would keep another ``k`` of a
    rank-``r`` layer (0.999999999 shows as 1, which would keep ``r``; 0.49999999999999994 as 0.5, which keeps 1 of
    2 where it keeps 0).

    Example:
        >>> _shown(0.125, 768), _shown(0.999999999, 768), _shown(0.49999999999999994, 2)
        ('0.125', '0.999999999', '0.49999999999999994')
    """
    shown = f"{fraction:g}"
    return shown if int(r * float(shown)) == int(r * fraction) else repr(fraction)


def tsv_cover(layer: LayerTasks) -> int:
    """The largest ``k`` :func:`tsv_rank` allows on ``layer`` (``r // T``): the ``cover`` TSV-M and TSV-C ask their
    per-task decompositions with (:meth:`~studio.pool.LayerTasks.svd`), so that they share them across ranks.

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.ones(8, 6)}, "b": {"w": torch.ones(8, 6)}}
        >>> tsv_cover(TaskPool({"w": torch.zeros(8, 6)}, experts).layer("w"))   # r = 6, T = 2
        3
    """
    return min(layer.shape) // layer.num_tasks


def tsv_factors(layer: LayerTasks, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenated top-``k`` task singular vectors ``U [m, T*k]``, ``S [T*k]``, ``V [n, T*k]`` (TSV eq. 4-6).

    Task ``i`` occupies columns ``i*k:(i+1)*k`` as in the official code. Decompositions come from
    ``layer.svds(range(T), k)`` (cached per pool; LAPACK in ``svd_mode="exact"``, else
    :func:`studio.linalg.gram_svd`; on CUDA every task's eigensolve at once, in cuSOLVER's batches),
    one per task for every ``k`` from half of the largest valid one up (``cover = r // T``), so a change of
    ``rank_fraction`` near its default reuses them.

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.diag(torch.tensor([3.0, 1.0, 0.0]))}, "b": {"w": torch.eye(3)}}
        >>> U, S, V = tsv_factors(TaskPool({"w": torch.zeros(3, 3)}, experts).layer("w"), 1)
        >>> U.shape, S.tolist(), V.shape
        (torch.Size([3, 2]), [3.0, 1.0], torch.Size([3, 2]))
    """
    parts = layer.svds(range(layer.num_tasks), k, cover=tsv_cover(layer))
    U = torch.cat([p[0] for p in parts], dim=1)
    S = torch.cat([p[1] for p in parts])
    V = torch.cat([p[2].mT for p in parts], dim=1)
    return U, S, V


def smallest_fraction(r: int) -> float:
    """The smallest ``rank_fraction`` of four significant digits with ``int(r * rank_fraction) >= 1``: the value
    :func:`refuse_keeping_nothing` suggests (``1 / r`` itself can round below one component, e.g. at ``r = 49``).

    Example:
        >>> smallest_fraction(768), smallest_fraction(128), smallest_fraction(49)
        (0.001303, 0.007813, 0.02041)
    """
    step = 10.0 ** (math.floor(math.log10(1.0 / r)) - 3)
    fraction = math.ceil(round(1.0 / r / step, 6)) * step
    while int(r * fraction) < 1:
        fraction += step
    return float(f"{fraction:.4g}")


def refuse_keeping_nothing(owner: str, ranks: "list[int]", fraction: float, given: bool, outcome: str) -> None:
    """Raise :class:`HyperparameterError` where ``k = int(r * fraction)`` is 0 on every one of the matrix layers of
    ranks ``ranks`` (those the layer rule selects), naming the smallest fraction that keeps a component there: as in
    the official code a layer of rank ``r < 1 / fraction`` keeps nothing, which is right for a small layer beside
    large ones (a positional embedding of rank 50 at 0.01), but on every layer ``outcome`` follows, which no one asks
    for on purpose (a rank slider at its low end on a small model: 0.005 on MiniSuite's rank-128 layers).
    ``given``: whether the caller chose ``fraction`` (else it is the default ``1/T``).

    Example:
        >>> refuse_keeping_nothing("tsv_m", [50, 768], 0.01, True, "they would merge to zero")   # k = 7 at 768
        >>> refuse_keeping_nothing("tsv_m", [50, 128], 0.005, True, "they would merge to zero")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        studio.schema.HyperparameterError: tsv_m: rank_fraction = 0.005 keeps ... expected rank_fraction >= 0.007813
    """
    if not ranks or any(int(r * fraction) > 0 for r in ranks):
        return
    largest = max(ranks)
    shown = _shown(fraction, largest)
    raise HyperparameterError(
        f"{owner}: rank_fraction = {shown}{'' if given else ' (the default, 1/T)'} keeps k = int(r * "
        f"{shown}) = 0 components on each of the {len(ranks)} matrix layers the layer rule selects (rank "
        f"{largest} at the most), so {outcome}; expected rank_fraction >= {smallest_fraction(largest):g}")


def _check_rank_fraction(pool: TaskPool, keys: list[str], *, rank_fraction: float | None) -> None:
    """TSV-M's model-wide check before the layer loop: :func:`refuse_keeping_nothing`, and more experts than the
    largest matrix layer's rank (``T * k <= r`` then leaves only ``k = 0``)."""
    ranks = [min(pool.base[key].shape) for key in keys]
    T = len(pool.names)
    if ranks and max(ranks) < T:
        raise HyperparameterError(
            f"tsv_m: {T} experts need a matrix layer of rank at least {T} (T x k <= r with k >= 1 component per "
            f"task), and the largest of the {len(ranks)} matrix layers the layer rule selects has rank {max(ranks)}; "
            f"use at most {max(ranks)} experts")
    refuse_keeping_nothing("tsv_m", ranks, 1.0 / T if rank_fraction is None else float(rank_fraction),
                           rank_fraction is not None, "they would merge to zero")


@register(
    "tsv_m",
    params=(
        Param("rank_fraction", float, None, low=0.0, low_open=True, high=1.0, high_rule="1/T", low_rule="1/R",
              ui_step=0.005, auto="1/T",
              help="Fraction of each task matrix's singular components kept (k = int(r * fraction), 0 on a layer "
                   "of rank below 1/fraction); T * k must not exceed r (so at most 1/T), and some matrix layer "
                   "must keep k >= 1.",
              paper="TSV Alg. 1 line 3 (first 1/T components); official code int(s.shape[0] * (1/num_tasks))"),
        Param("alpha", float, 1.0, low=0.0, high=3.0, post_scale=True, ui_step=0.05,
              help="Global scaling of the merged task matrices.",
              paper="TSV Alg. 1 line 18; sec. 6.3 / Fig. 7: alpha = 1.0 is best, no tuning needed"),
    ),
    paper="Task Singular Vectors (Gargiulo et al., CVPR 2025), Alg. 1 TSV-Merge, eq. 4-9",
    summary="Keep each task's top 1/T singular directions, decorrelate them across tasks (Procrustes), rebuild.",
    scope="matrix",
    vector_rule="mean",
    decomposes=True,
    merged_svd=lambda layer, merged, rank_fraction=None: tsv_m_svd(layer, rank_fraction),
    prepare=_check_rank_fraction,
)
def tsv_m(layer: LayerTasks, rank_fraction: float | None = None) -> Tensor:
    """TSV-M merged delta of one matrix layer, ``U_perp Sigma V_perp^T`` (TSV Alg. 1, eq. 9; unscaled).

    ``U_perp = polar(U)`` and ``V_perp = polar(V)`` are the orthogonal Procrustes / whitening solutions for the
    concatenated top-``k`` singular vectors of every task. The official code places the ``T*k`` vectors in an
    ``r``-column zero-padded matrix and takes its SVD; the zero columns meet zero singular values, so the polar
    factor of the ``T*k`` non-zero columns gives the same matrix (tested), which is what is computed here, via the
    ``(T k) x (T k)`` Gram matrix (:func:`studio.linalg.polar_gram`). Columns whose singular value is exactly zero
    (a zero task matrix, or a task with preference weight 0), and in ``svd_mode="auto"`` those at their expert's
    stored rounding (a task of rank below ``k``: :func:`_kept_factors`), carry no direction and are left out of the
    orthogonalisation (an SVD would give them arbitrary vectors).

    Example:
        >>> from studio.pool import TaskPool
        >>> base = {"w": torch.zeros(4, 4)}
        >>> experts = {"a": {"w": torch.diag(torch.tensor([3.0, 0, 0.5, 0.1]))},
        ...            "b": {"w": torch.diag(torch.tensor([0.0, 2, 0, 0]))}}
        >>> delta = tsv_m(TaskPool(base, experts, svd_mode="exact").layer("w"))  # k = 2: a loses its 0.1
        >>> [round(x, 4) for x in delta.diagonal().tolist()]
        [3.0, 2.0, 0.5, 0.0]
    """
    factors = _kept_factors(layer, rank_fraction)
    if factors is None:
        return torch.zeros(layer.shape, device=layer.device, dtype=torch.float32)
    U, S, V = factors
    U_perp, V_perp = polar_gram_many([U, V])   # one request: on CUDA their eigensolves share a batch
    return linalg.reconstruct(U_perp, S, V_perp.mT)


def tsv_m_svd(layer: LayerTasks, rank_fraction: float | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The thin SVD of :func:`tsv_m`'s merged delta from its own factors, ``(U_perp, S, V_perp^T)`` with ``S``
    descending (stable: ties keep the tasks' order), or ``None`` where they are not one.

    ``U_perp`` and ``V_perp`` have orthonormal columns whenever the concatenated bases have full column rank, and
    then ``U_perp diag(S) V_perp^T`` *is* an SVD: the merged delta's singular values are the kept task singular
    values (TSV Prop. 4.1). (Orthonormal to the whitening's accuracy, ~``eps64 cond^2`` of the concatenated basis:
    2.5e-4 for near-twin experts, where TSV-M's own merge is as far from the float64 one; re-orthonormalising would
    no longer give the merge's own bits.) A calibration after TSV-M (SVC, AlignMerge-B) takes its subspaces from
    here instead of from an SVD of the float32 merged delta: TSV-M's spectrum has pairs of different tasks' singular
    values ~1e-5 apart, whose singular vectors the float32 rounding of the merged delta turns by ~rounding / gap,
    mixing the two tasks' directions; AlignMerge-B's factors ``sigma / c_i`` then moved by up to 9.3e-3 with the
    experts' order (docs/ACCURACY.md). These are the factors :func:`tsv_m` builds its delta from (the same bits),
    the SVD of the merge before its float32 rounding, which an SVD in float64 of a float64 TSV-M merge
    (FusionBench's float64 runs) approaches. Both sides are whitened: taking one side from the merged delta (``M
    V_perp / S``) instead failed for a singular value near zero (an expert of rank below ``k``, whose LAPACK
    singular values there are ~5e-8 of the largest, or an expert 1e-6 the size of another), where ``M``'s rounding
    over ``S`` is of order one. Where the tasks share a singular value exactly, each keeps its own vectors, which do
    not depend on the experts' order (the sum's rotation of :func:`~studio.methods._align.sum_ordered_svd` was
    discontinuous here: :func:`~studio.methods._align.merged_spectrum`).
    ``None`` (the caller decomposes the merged delta itself) when a concatenated basis is rank deficient (e.g. two
    identical experts: the whitening maps a direction to zero) or nothing is kept.

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.diag(torch.tensor([3.0, 0, 0.5]))},
        ...            "b": {"w": torch.diag(torch.tensor([0.0, 4, 0]))}}
        >>> U, S, Vh = tsv_m_svd(TaskPool({"w": torch.zeros(3, 3)}, experts, svd_mode="exact").layer("w"))
        >>> S.tolist(), torch.allclose(U * S @ Vh, torch.diag(torch.tensor([3.0, 4, 0])))
        ([4.0, 3.0], True)
    """
    factors = _kept_factors(layer, rank_fraction)
    if factors is None:
        return None
    U, S, V = factors
    (U_perp, rank_u), (V_perp, rank_v) = polar_gram_ranks([U, V])
    if not rank_u == rank_v == S.numel():
        return None
    order = torch.sort(S, descending=True, stable=True).indices
    return U_perp[:, order], S[order], V_perp[:, order].mT


def _kept_factors(layer: LayerTasks, rank_fraction: float | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`tsv_factors` at TSV-M's ``k`` without the columns that carry no direction, or ``None`` when nothing is
    kept (TSV Alg. 1 lines 1-8).

    Those are the columns of zero singular value and, in ``svd_mode="auto"``, those at or below their expert's
    stored rounding (:meth:`~studio.pool.LayerTasks.rounding_cut`): a task of rank below ``k`` (a LoRA expert) has
    its remaining components there, vectors the rounding sets, which the official code whitens in beside the other
    tasks' directions, turning those. 4 rank-3 experts of a ``96 x 64`` layer stored on a random base of CLIP's
    scale and on a zero one merged 0.6 times the merge's size apart with them (deltas 7e-3 of the weights; the zero
    base's own are below the Gram route's null tolerance already), and 1.8e-6 apart without (docs/ENGINE.md).
    ``svd_mode="exact"`` keeps them, as the official code does."""
    r = min(layer.shape)
    k = tsv_rank(r, layer.num_tasks, rank_fraction, key=layer.key)
    if k == 0:
        return None
    U, S, V = tsv_factors(layer, k)
    keep = S > 0
    if layer.pool.svd_mode != "exact":
        keep &= torch.cat([S[i * k:(i + 1) * k] > layer.rounding_cut(i, S[i * k:(i + 1) * k])
                           for i in range(layer.num_tasks)])
    if not bool(keep.all()):
        U, S, V = U[:, keep], S[keep], V[:, keep]
    return None if S.numel() == 0 else (U, S, V)
