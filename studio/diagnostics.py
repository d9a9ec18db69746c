"""Spectral diagnostics: the numbers behind the app's spectra, heatmaps and per-layer curves.

Every function here is pure math over one layer (:class:`~studio.pool.LayerTasks`) or over plain tensors, plus the
model-level aggregations (:func:`layer_curves`, :func:`interference_matrix`, :func:`sar_avg`, :func:`model_matrix`)
and :func:`report`, which gathers them as ``merge-studio diagnose`` writes them. Decompositions come from the pool's
caches (``layer.svd``, ``layer.sum_svd``) and small results are memoised with ``layer.memo`` so that the app can
redraw a heatmap or switch metric without recomputing. Singular vectors of arbitrary merged deltas are *not* kept
(a ViT-B/32 model would need ~0.6 GB per merge); only the small per-subspace statistics derived from them are.

What comes from where:

* TSV (Gargiulo et al., CVPR 2025): Singular Task Interference, eq. (7), on the rank-``r/T`` task factors of
  eq. (6) (:func:`sti`, :func:`sti_pairwise`).
* Iso-C/CTS (Marczak et al., ICML 2025): Subspace Alignment Ratio, eq. (5), with the effective rank ``k_M`` of
  eq. (6) as the official code computes it (``calc_rank``; eq. 6 itself with ``k_rule="paper"``)
  (:func:`effective_rank`, :func:`sar_to_merged`, :func:`pairwise_sar`).
* Ortho-Merge (sec. 3.1-3.2): spectral entropy eq. (9), energy of the merged update eq. (2), cumulative energy
  (Fig. 3) and the top-k subspace similarity heatmap (Fig. 1) (:func:`spectral_entropy`,
  :func:`energy_preservation`, :func:`cumulative_energy`, :func:`subspace_similarity`).
* SVC: the projection coefficients ``s_i^r`` eq. (19), the calibration factors ``gamma^r`` eq. (20) and the
  cross terms of Lemma 3.2 (:func:`svc_coefficients`, :func:`svc_cross_terms`).
* AlignMerge: Subspace Cross-Influence ``xi_{i,j}^r`` (Prop. 1, eq. 5 and App. B.2) and the Subspace-Alignment
  Index, eq. (8) (:func:`cross_influence`, :func:`sai`).

The task responses along the merged singular directions (``c_i^r``, ``||a_i^r||^2``) and the SVC / AlignMerge
formulas on them are implemented once, in :mod:`studio.methods._align` (shared with the ``svc`` and
``align_merge_b`` methods); SAR-to-merge reuses the same responses.

Example:
    >>> import torch
    >>> from studio.pool import TaskPool
    >>> base = {"w": torch.zeros(4, 4)}
    >>> experts = {"a": {"w": torch.diag(torch.tensor([1.0, 0, 0, 0]))},
    ...            "b": {"w": torch.diag(torch.tensor([0, 1.0, 0, 0]))}}
    >>> layer = TaskPool(base, experts).layer("w")
    >>> task_cosine(layer).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    >>> sti(layer)
    0.0
"""

from __future__ import annotations

import hashlib
import math
import numbers
import re
from typing import Any, Callable, Hashable, Mapping, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from . import linalg
from .methods import _align
from .io import tensor_bytes
from .layers import LayerRule, resolve_rule
from .parallel import parallel_map
from .pool import LayerTasks, TaskPool, _all_finite, float32_delta, normalize_preferences
from .schema import StudioError, brief, check_progress

__all__ = [
    "DiagnosticsError", "task_spectra", "spectrum", "cumulative_energy", "spectral_entropy", "effective_rank",
    "energy_preservation", "subspace_similarity", "task_cosine", "pairwise_sar", "sar_to_merged", "sti",
    "sti_pairwise", "sti_from_factors", "svc_coefficients", "svc_cross_terms", "svc_cross_matrix",
    "cross_influence", "cross_influence_matrix", "eta", "sai", "layer_curves", "interference_matrix", "Metric",
    "sar_avg", "model_matrix", "unchanged_tasks", "task_curves", "report", "report_summary",
    "METRICS", "CURVES", "SAR_AVG_HELP",
]


class DiagnosticsError(StudioError):
    """A diagnostic was asked for something it cannot compute (unknown metric, non-matrix key, bad shape)."""


# --------------------------------------------------------------------------------------------------------------
# Spectra (tensor level)
# --------------------------------------------------------------------------------------------------------------

def _check_values(x: Any, what: str, expected: str) -> None:
    """The pure spectral helpers take a finite floating-point tensor; anything else is a :class:`DiagnosticsError`."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = f"a {x.dtype} tensor" if isinstance(x, Tensor) else brief(x)
        raise DiagnosticsError(f"{what} needs {expected} as a floating-point tensor, got {got}")
    if x.device.type == "meta" or not _all_finite(x):
        raise DiagnosticsError(f"{what} needs finite values ({expected}), got NaN, inf or no data")


def spectrum(matrix: Tensor) -> Tensor:
    """Singular values (descending) of any matrix, or of a batch ``[..., m, n]``, in float32 or higher.

    Used for the task matrices and the merged delta of a layer (Ortho-Merge Fig. 4, Iso Fig. 1 plot these spectra).
    A float32 or half matrix goes through :func:`studio.linalg.svdvals` (the float64 Gram's eigenvalues: about half
    LAPACK's float32 time on tall layers, and within 3-5e-8 of the largest value where LAPACK's float32 is 6e-7 to
    1.2e-6 off); a float64 one through LAPACK.

    Example:
        >>> spectrum(torch.diag(torch.tensor([1.0, 3.0, 2.0]))).tolist()
        [3.0, 2.0, 1.0]
    """
    _check_values(matrix, "spectrum", "a matrix")
    if matrix.dim() < 2:
        raise DiagnosticsError(f"spectrum needs a matrix, got a tensor of shape {tuple(matrix.shape)}")
    if matrix.dtype in (torch.float16, torch.bfloat16):
        matrix = matrix.float()
    if matrix.shape[-2] < matrix.shape[-1]:
        # Same values; MKL's gesdd is 3-4x slower on wide than on tall inputs (768 x 3072: 0.5 s vs 0.12 s), and
        # the transposed view of a row-major tensor is already LAPACK's column-major layout (no copy).
        matrix = matrix.mT
    return linalg.svdvals(matrix)   # float32: from the float64 Gram, faster and more accurate than gesdd


def cumulative_energy(s: Tensor) -> Tensor:
    """Fraction of energy captured by the top components: ``cumsum(s^2) / sum(s^2)`` along the last dim.

    Ortho-Merge Fig. 3 ("cumulative energy captured by singular values versus rank"); ``1 - cumulative_energy`` is
    the relative squared approximation error of Iso eq. (6). A zero spectrum has no energy and gives zeros. The
    fraction is at most 1 (a float32 running sum can end at 1.0000001 of its total, which is clamped).

    Example:
        >>> [round(x, 4) for x in cumulative_energy(torch.tensor([3.0, 1.0])).tolist()]
        [0.9, 1.0]
    """
    _check_values(s, "cumulative_energy", "singular values")
    e = _squares(s)
    total = e.sum(-1, keepdim=True)
    frac = (e.cumsum(-1) / total.clamp_min(torch.finfo(e.dtype).tiny)).clamp_(max=1.0)
    return torch.where(total > 0, frac, torch.zeros_like(e)).float()


def _squares(s: Tensor) -> Tensor:
    """``(s / max|s|)^2`` per row in float64: energy fractions do not depend on the spectrum's scale (squared in
    float32, singular values of 1e-22 gave an entropy of 1.5e-4 instead of 0.83, those of 1e19 NaN)."""
    s = s.double()
    top = s.abs().amax(-1, keepdim=True) if s.numel() else s
    return (s / top.clamp_min(torch.finfo(torch.float64).tiny)).pow(2)


def spectral_entropy(s: Tensor, normalized: bool = False) -> Tensor:
    """Spectral entropy ``H = -sum_i p_i log p_i`` with ``p_i = sigma_i^2 / sum_j sigma_j^2`` (Ortho-Merge eq. 9).

    The paper does not normalise (natural log, so a flat spectrum of ``r`` values gives ``log r``); with
    ``normalized=True`` the result is divided by ``log r`` so that layers of different rank share a [0, 1] scale.
    ``0 log 0 = 0``; a rank-1 (or zero) spectrum gives 0. Works on ``[..., r]`` (one entropy per row).

    Example:
        >>> round(float(spectral_entropy(torch.ones(4))), 4) == round(math.log(4), 4)
        True
        >>> float(spectral_entropy(torch.tensor([2.0, 0.0, 0.0]), normalized=True))
        0.0
    """
    _check_values(s, "spectral_entropy", "singular values")
    normalized = _check_flag("spectral_entropy", normalized, "normalized")
    if s.dim() == 0:
        raise DiagnosticsError("spectral_entropy needs singular values [..., r], got a 0-d tensor")
    e = _squares(s)
    total = e.sum(-1, keepdim=True)
    p = e / total.clamp_min(torch.finfo(e.dtype).tiny)
    h = -(p * torch.log(p.clamp_min(torch.finfo(e.dtype).tiny))).sum(-1)
    # clamp: rounding can give -1e-16 for a rank-1 spectrum; "+ 0.0" turns -0.0 into 0.0
    h = torch.where(total.squeeze(-1) > 0, h, torch.zeros_like(h)).clamp_min(0.0) + 0.0
    if normalized:
        r = s.shape[-1]
        h = h / math.log(r) if r > 1 else torch.zeros_like(h)
    return h.float()


K_RULES = ("official", "paper")


def effective_rank(s: Tensor, eps: float = 0.05, rule: str = "official") -> int:
    """Number ``k_M`` of dominant components of a spectrum, for the Subspace Alignment Ratio (Iso eq. 6).

    * ``rule="paper"``, Iso eq. (6): ``k_M = min{k : sum_{i>k} sigma_i^2 / sum_i sigma_i^2 <= eps^2}``, the fewest
      directions whose projection keeps all but ``eps`` of the Frobenius norm (``eps = 0.05``: 99.75% of the
      energy).
    * ``rule="official"`` (default), the official code's ``calc_rank`` (``sar`` scripts of the Iso authors' figures
      and the TSV repository): ``np.argmax(np.sqrt(np.cumsum(S**2 / (S**2).sum())) > 0.95)`` then ``U[:, :rank]``,
      i.e. the number of leading directions whose captured share of the norm,
      ``sqrt(sum_{i<=k} sigma_i^2 / sum_i sigma_i^2)``, stays at or below ``1 - eps`` (``norm_thresh = 0.95``). It
      keeps far fewer directions than eq. (6) and is the rule behind the published SAR values (0.75-0.87 for
      Task Arithmetic in Fig. 3a, ViT-B/16), so it is the default. Where the top direction alone
      captures more than ``1 - eps`` of the norm the official code keeps 0 directions (SAR 0); the callers here
      keep 1.

    A zero spectrum gives 0.

    Example:
        >>> effective_rank(torch.tensor([10.0, 1.0, 0.1]), 0.05, "paper"), effective_rank(torch.ones(8), 0.05, "paper")
        (2, 8)
        >>> effective_rank(torch.tensor([10.0, 1.0, 0.1])), effective_rank(torch.ones(8))   # sqrt(7/8) <= 0.95
        (0, 7)
    """
    _check_values(s, "effective_rank", "a 1-D spectrum")
    if s.dim() != 1:
        raise DiagnosticsError(f"effective_rank expects a 1-D spectrum, got shape {tuple(s.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 <= eps < 1:
        raise DiagnosticsError(f"effective_rank: eps must be a number in [0, 1), got {brief(eps)}")
    if rule not in K_RULES:
        raise DiagnosticsError(f"effective_rank: rule must be one of {K_RULES}, got {brief(rule)}")
    e = s.double().pow(2)
    total = float(e.sum())
    if total <= 0:
        return 0
    captured = e.cumsum(0) / total  # energy kept by the top k = 1..r components
    if rule == "official":
        return int((captured.sqrt() <= 1.0 - eps).sum())
    k = int((1.0 - captured > eps**2).sum()) + 1
    return min(k, s.numel())


# --------------------------------------------------------------------------------------------------------------
# Internal helpers
# --------------------------------------------------------------------------------------------------------------

def _require_pool(pool: Any) -> None:
    if not isinstance(pool, TaskPool):
        raise DiagnosticsError(f"expected a TaskPool (studio.get_pool(base, experts)), got {type(pool).__name__}")


def _require_weights(pool: TaskPool, key: str) -> None:
    """A key the spectral diagnostics read must hold weights (a floating-point tensor), not an integer or bool buffer,
    which has no task vectors (a merge keeps the base's)."""
    dtype = pool.base[key].dtype
    if not dtype.is_floating_point:
        raise DiagnosticsError(f"key '{key}' is a buffer of {str(dtype).removeprefix('torch.')}; spectral "
                               f"diagnostics need a floating-point matrix layer")


def _require_layer(layer: LayerTasks) -> None:
    if not isinstance(layer, LayerTasks):
        raise DiagnosticsError(f"expected a layer, pool.layer(key), got {type(layer).__name__}")


def _require_matrix(layer: LayerTasks) -> None:
    _require_layer(layer)
    if len(layer.shape) != 2 or min(layer.shape) < 1:
        raise DiagnosticsError(
            f"key '{layer.key}' has shape {layer.shape}; spectral diagnostics need a 2-D matrix layer"
        )


def _tensor_tag(t: Tensor) -> Hashable:
    """Content identity of a tensor for memo keys: its shape, dtype and the SHA-256 of its bytes.

    Content-based (not storage-based) so that the same merged delta rebuilt by a later call (e.g. ``merged - base``
    of the same state dict) hits the memo, and exact: two deltas that differ anywhere get their own entries. A CUDA
    tensor is copied to the host to be hashed (one layer at a time).
    """
    return tuple(t.shape), str(t.dtype), hashlib.sha256(tensor_bytes(t)).digest()


def _check_merged(layer: LayerTasks, merged: Any) -> None:
    """``merged`` must be a finite tensor of ``layer``'s shape (``None`` passes: the Task Arithmetic sum)."""
    if merged is None:
        return
    if not isinstance(merged, Tensor):
        raise DiagnosticsError(f"key '{layer.key}': merged must be a tensor or None, got {type(merged).__name__}")
    if tuple(merged.shape) != tuple(layer.shape):
        raise DiagnosticsError(
            f"key '{layer.key}': merged delta has shape {tuple(merged.shape)}, expected the layer's {layer.shape}"
        )
    _check_values(merged, f"key '{layer.key}': the merged delta", "the merged delta")


def _merged_delta(layer: LayerTasks, merged: Tensor | None) -> tuple[Tensor, Hashable]:
    """The merged delta of ``layer`` (``None``: the Task Arithmetic sum, SVC/AlignMerge's default basis) + a tag."""
    if merged is None:
        return layer.sum(), "ta_sum"
    total = layer.sum()
    if merged is total:
        return merged, "ta_sum"
    _check_merged(layer, merged)
    delta = merged.to(layer.device, torch.float32)
    # the sum by content (a copy, a Task Arithmetic merge at scale 1) is the sum, as _align.merged_spectrum decides:
    # every statistic then comes from one basis (the cross terms took the sum-ordered SVD of the copy while the
    # coefficients took the sum's, which differ where the spectrum has ties: C[i, j] != C[j, i])
    if torch.equal(delta, total):
        return total, "ta_sum"
    return delta, _tensor_tag(merged)


def _task_factors(layer: LayerTasks, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked top-``rank`` task SVD factors ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]`` from the pool cache,
    with the components beyond each task's numerical rank (:func:`_live`) zeroed: LAPACK's arbitrary null-space
    vectors (``svd_mode="exact"``) and the Gram route's zero ones then give the same factors."""
    Us, Ss, Vhs = zip(*layer.svds(range(layer.num_tasks), rank))
    U, S, Vh = torch.stack(Us), torch.stack(Ss), torch.stack(Vhs)
    live = torch.stack([_live(s, layer) for s in Ss]).to(S.dtype)   # [T, k]
    return U * live.unsqueeze(1), S * live, Vh * live.unsqueeze(2)


def _check_k(name: str, k: int | None, key: str, param: str = "k") -> int | None:
    """``k`` (a number of components or subspaces, the argument ``param``) as a Python int, any integral type
    accepted as the schemas accept it (NumPy's too), or ``None``; a :class:`DiagnosticsError` naming the function,
    the layer and the argument otherwise."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise DiagnosticsError(f"{name} on '{key}': {param} must be a positive integer or None, got {brief(k)}")
    return int(k)


def _check_flag(name: str, value: Any, param: str, none: bool = False) -> "bool | None":
    """``value`` as a bool (NumPy's too; ``None`` where ``none``), or a :class:`DiagnosticsError` naming the
    function and the argument: a string such as ``"no"`` would otherwise count as true."""
    if isinstance(value, np.bool_):
        value = bool(value)
    if isinstance(value, bool) or (none and value is None):
        return value
    raise DiagnosticsError(f"{name}: {param} must be true or false{' or None' if none else ''}, got {brief(value)}")


# --------------------------------------------------------------------------------------------------------------
# Per-layer spectra and energy
# --------------------------------------------------------------------------------------------------------------

def task_spectra(layer: LayerTasks, rank: int | None = None) -> Tensor:
    """Singular values of every (weighted) task matrix, ``[T, r]`` (``[T, rank]`` when ``rank`` is given).

    With ``rank`` the values come from ``layer.svd(i, rank)`` (the cache TSV-M/Iso-CTS fill, Gram-based in
    ``svd_mode="auto"``). Without it the full spectrum is computed once with :func:`spectrum` and memoised
    on the layer: a spectrum does not need singular vectors, and keeping full ``U``/``V`` factors of every task
    of every layer would cost gigabytes for a ViT-B/32.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(3, 3)}, {"a": {"w": torch.diag(torch.tensor([3.0, 2, 1]))}})
        >>> task_spectra(pool.layer("w")).tolist()
        [[3.0, 2.0, 1.0]]
    """
    _require_matrix(layer)
    if rank is not None:
        rank = _check_k("task_spectra", rank, layer.key, "rank")
        return torch.stack([S for _, S, _ in layer.svds(range(layer.num_tasks), rank)])
    return layer.memo(("diag", "svdvals"), lambda: spectrum(layer.deltas))


def energy_preservation(layer: "LayerTasks | Tensor", merged: Tensor | None = None) -> float:
    """Energy of the merged update relative to the total task energy: ``||Delta_M||_F^2 / sum_i ||Delta_i||_F^2``.

    Ortho-Merge sec. 3.1, eq. (2): the energy of a sum of updates is the sum of their energies plus the
    interference term ``2 sum_{i<j} tr(Delta_i^T Delta_j)``; destructive interference lowers it. For the Task
    Arithmetic sum the ratio is therefore ``1 + 2 sum_{i<j} <Delta_i, Delta_j> / sum_i ||Delta_i||^2`` (exactly 1
    for mutually orthogonal tasks); the plain mean divides it by ``T^2``. The paper names energy preservation as a
    principle without a closed formula; this ratio is its eq. (2) made dimensionless. Note that it is not
    scale-invariant: pass the unscaled merged delta to compare methods, the scaled one to judge a final model.

    ``layer`` is a :class:`LayerTasks` (``merged=None`` means the Task Arithmetic sum) or a ``[T, ...]`` tensor of
    task deltas (then ``merged`` is required).

    Example:
        >>> d = torch.stack([torch.eye(2), -torch.eye(2)])
        >>> energy_preservation(d, d.sum(0))
        0.0
    """
    if isinstance(layer, LayerTasks):
        total = float(_task_norm2(layer).sum())
        if merged is None:
            merged = layer.sum()
        elif tuple(merged.shape) != tuple(layer.shape):
            raise DiagnosticsError(
                f"key '{layer.key}': merged delta has shape {tuple(merged.shape)}, expected the layer's {layer.shape}"
            )
    else:
        _check_values(layer, "energy_preservation", "task deltas [T, ...]")
        deltas = layer
        if merged is None:
            raise DiagnosticsError("energy_preservation on a tensor of task deltas needs the merged delta")
        if deltas.dim() < 1 or (isinstance(merged, Tensor) and tuple(merged.shape) != tuple(deltas.shape[1:])):
            raise DiagnosticsError(f"energy_preservation: the merged delta has shape "
                                   f"{tuple(getattr(merged, 'shape', ()))}, expected that of one task delta "
                                   f"{tuple(deltas.shape[1:])} (task deltas: [T, ...] = {tuple(deltas.shape)})")
        total = float(deltas.double().pow(2).sum())
    _check_values(merged, "energy_preservation", "the merged delta")
    if total <= 0:
        return 0.0
    return float(merged.double().pow(2).sum()) / total


# --------------------------------------------------------------------------------------------------------------
# Pairwise [T, T] task-task metrics
# --------------------------------------------------------------------------------------------------------------

def _live(S: Tensor, layer: LayerTasks) -> Tensor:
    """Which singular values ``S`` of a matrix of ``layer``'s shape are within its numerical rank: above
    ``sigma_max * max(m, n) * eps(float32)``, ``torch.linalg.matrix_rank``'s rule."""
    return S > S.max() * max(layer.shape) * torch.finfo(torch.float32).eps


def _task_bases(layer: LayerTasks, k: int, side: str = "left") -> tuple[Tensor, Tensor]:
    """Every task's top-``k`` singular vectors side by side, ``[m, T*k]`` (``side="right"``: ``[n, T*k]``), and the
    number of directions each task has, ``[T]``: those beyond its numerical rank (singular values at or below
    ``sigma_max * max(m, n) * eps(float32)``, ``torch.linalg.matrix_rank``'s rule) are zero columns, so LAPACK's
    arbitrary null-space vectors (``svd_mode="exact"``) and the Gram route's zero ones give the same subspaces."""
    bases, dims = [], []
    for U, S, Vh in layer.svds(range(layer.num_tasks), k):
        live = _live(S, layer)
        bases.append((U if side == "left" else Vh.mT) * live)
        dims.append(live.sum())
    return torch.cat(bases, dim=1), torch.stack(dims)


def subspace_similarity(layer: LayerTasks, k: int = 5, side: str = "left", reduce: str = "mean") -> Tensor:
    """Top-``k`` subspace similarity between every pair of tasks, ``[T, T]`` in [0, 1] (Ortho-Merge sec. 3.1, Fig. 1).

    For tasks ``A, B`` take the top-``k`` left singular vectors ``U_A, U_B`` (``side="right"``: right singular
    vectors) and the overlap matrix ``S = U_A^T U_B``. The paper's ``avg_sim`` is the average of the singular values
    of ``S`` (``reduce="mean"``), i.e. the mean cosine of the principal angles between the two subspaces. With
    ``reduce="frobenius"`` it is ``||S||_F^2 / k``, the mean squared cosine (projection-metric similarity). Both
    are 1 for identical subspaces and 0 for orthogonal ones. Fig. 1 uses ``k = 5``.

    A task matrix of numerical rank below ``k`` has fewer than ``k`` directions: singular values at or below
    ``sigma_max * max(m, n) * eps(float32)`` (the rule of ``torch.linalg.matrix_rank``) are left out, and a pair
    averages over the ``min(k_A, k_B)`` principal angles its subspaces have (the paper's ``1/k`` where both have
    ``k``). Without this, the null-space vectors an exact SVD returns (arbitrary) or the Gram route's zero vectors
    would enter the average, and the two ``svd_mode`` would disagree (a rank-3 task's similarity to itself at
    ``k = 5`` was 0.6 with one, 1.0 with the other). A zero task has similarity 0 to every task, itself included.

    Example:
        >>> from studio.pool import TaskPool
        >>> e = torch.eye(4)
        >>> pool = TaskPool({"w": torch.zeros(4, 4)}, {"a": {"w": e[:, :1] @ e[:1]}, "b": {"w": e[:, 1:2] @ e[:1]}})
        >>> subspace_similarity(pool.layer("w"), k=1).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    _require_matrix(layer)
    k = _check_k("subspace_similarity", k, layer.key) or 5   # None: Fig. 1's 5
    if side not in ("left", "right"):
        raise DiagnosticsError(f"subspace_similarity: side must be 'left' or 'right', got {brief(side)}")
    if reduce not in ("mean", "frobenius"):
        raise DiagnosticsError(f"subspace_similarity: reduce must be 'mean' or 'frobenius', got {brief(reduce)}")
    k = min(k, min(layer.shape))

    def compute() -> Tensor:
        T = layer.num_tasks
        cat, dims = _task_bases(layer, k, side)  # [m, T*k], [T]
        kk = cat.shape[1] // T
        overlap = (cat.mT @ cat).view(T, kk, T, kk).permute(0, 2, 1, 3)  # [T, T, k, k] blocks U_i^T U_j
        angles = torch.minimum(dims[:, None], dims[None, :]).to(overlap.dtype)   # principal angles per pair
        # left-out directions are zero columns: they add only zero singular values and zero entries
        total = torch.linalg.svdvals(overlap).sum(-1) if reduce == "mean" else overlap.pow(2).sum((-1, -2))
        return torch.where(angles > 0, total / angles.clamp(min=1), 0.0).clamp(0.0, 1.0)

    return layer.memo(("diag", "subspace_similarity", k, side, reduce), compute)


def task_cosine(layer: LayerTasks) -> Tensor:
    """Cosine similarity of the flattened task matrices, ``[T, T]`` in [-1, 1] (Ilharco et al. 2023; Iso Fig. 2a).

    A zero task has cosine 0 with everything (including itself).

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": -2 * torch.eye(2)}})
        >>> task_cosine(pool.layer("w")).tolist()
        [[1.0, -1.0], [-1.0, 1.0]]
    """

    def compute() -> Tensor:
        gram = _task_gram(layer)
        norms = gram.diagonal().clamp_min(0).sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        return (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0).float()

    _require_layer(layer)
    return layer.memo(("diag", "cosine"), compute)


def _task_gram(layer: LayerTasks) -> Tensor:
    """``[T, T]`` float64 (compute device): the inner products ``<Delta_i, Delta_j>`` of the (weighted) task
    matrices, memoised on the layer; its diagonal is each task's squared Frobenius norm (:func:`_task_norm2`).

    Accumulated in float64 over cache-sized blocks of the flattened layer (:meth:`~studio.pool.LayerTasks.raw_chunks`,
    weighted as :attr:`~studio.pool.LayerTasks.deltas` is: the same float32 values), not over a float64 copy of the
    ``[T, *shape]`` stack on the CPU: on one core, 41-46 ms for a ``3072 x 768`` layer of 8 tasks against 190-270 ms
    for the stack's float64 Gram, or its norms alone, through fresh memory (75 and 151 MB) that this VM backs slowly
    (docs/PERFORMANCE.md). On CUDA the layer is one block (:meth:`~studio.pool.LayerTasks.raw_chunks`).
    """
    def compute() -> Tensor:
        T = layer.num_tasks
        gram = torch.zeros(T, T, dtype=torch.float64, device=layer.device)
        w = None if layer.weights is None else layer.weights.view(-1, 1)
        for _, _, x in layer.raw_chunks():
            x = (x if w is None else x.mul_(w)).double()
            gram.addmm_(x, x.mT)
        return gram

    return layer.memo(("diag", "gram"), compute)


def pairwise_sar(layer: LayerTasks, k: int | None = None, eps: float = 0.05, k_rule: str = "official") -> Tensor:
    """Subspace Alignment Ratio between task pairs, ``[T, T]`` in [0, 1] (Iso eq. 5, Fig. 3b).

    Entry ``[i, j] = SAR(Delta_i, Delta_j; k) = ||U_{j,k} U_{j,k}^T Delta_i||_F / ||Delta_i||_F``: how much of task
    ``i`` lies in the top-``k`` left singular subspace of task ``j`` (not symmetric). As in Iso Fig. 3b the number
    of directions is ``k_TA``, the effective rank (:func:`effective_rank` with ``eps`` and ``k_rule``: the official
    code's rule by default, eq. 6 with ``"paper"``) of the Task Arithmetic matrix, unless ``k`` is given; ``k = r``
    on a full-rank task gives ``SAR(Delta_i, Delta_i) = 1``. A task of numerical rank below ``k`` contributes only
    the directions it has (see :func:`subspace_similarity`), so both ``svd_mode`` agree and ``SAR(Delta_i,
    Delta_i) = 1`` whenever ``k`` reaches its rank; an exact SVD's arbitrary null-space vectors would otherwise
    count other tasks' energy that falls on them by chance.

    Cost ``T^2 k m n`` multiply-adds (the projections are computed from the task matrices directly, no full SVDs).

    Example:
        >>> from studio.pool import TaskPool
        >>> e = torch.eye(3)
        >>> pool = TaskPool({"w": torch.zeros(3, 3)}, {"a": {"w": e[:, :1] @ e[:1]}, "b": {"w": e[:, 1:2] @ e[:1]}})
        >>> pairwise_sar(pool.layer("w"), k=1).tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    _require_matrix(layer)
    k = _check_k("pairwise_sar", k, layer.key)
    if k is None:
        k = max(1, effective_rank(layer.sum_svd()[1], eps, k_rule))
    k = min(k, min(layer.shape))

    def compute() -> Tensor:
        T = layer.num_tasks
        deltas = layer.deltas
        bases = _task_bases(layer, k)[0]  # [m, T*k]
        kk = bases.shape[1] // T
        norms2 = _task_norm2(layer)
        out = torch.zeros(T, T, dtype=torch.float64, device=deltas.device)
        for i in range(T):  # one task at a time bounds memory to [T*k, n]
            proj = (bases.mT @ deltas[i]).double().pow(2).sum(-1).view(T, kk).sum(-1)
            out[i] = proj / norms2[i].clamp_min(torch.finfo(torch.float64).tiny)
        return out.sqrt().clamp(0.0, 1.0).float()

    return layer.memo(("diag", "pairwise_sar", k), compute)


# --------------------------------------------------------------------------------------------------------------
# Singular Task Interference (TSV eq. 7)
# --------------------------------------------------------------------------------------------------------------

def _default_sti_rank(layer: LayerTasks) -> int:
    # TSV-M keeps the top r/T components of each task (official code: sv_reduction = 1/T); STI is measured on the
    # same low-rank factors (eq. 6), which also keeps U^T U at r x r instead of (T r) x (T r).
    # int(r * (1/T)) as TSV-M rounds it, not r // T: they differ for some (r, T), e.g. 1 vs 2 at r = 98, T = 49.
    from .methods.tsv_m import tsv_rank

    return max(1, tsv_rank(min(layer.shape), layer.num_tasks, None, key=layer.key))


def _sti_grams(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """``U^T U - I`` and ``V^T V - I`` of the concatenated factors with the (exactly zero) diagonal blocks zeroed.

    ``U_i^T U_i = I`` holds for each task's own singular vectors, so the diagonal blocks of eq. (7) vanish
    mathematically; zeroing them avoids summing ~1e-7 rounding over ``(T k)^2`` entries in the L1 norm.
    """
    T, m, k = U.shape
    Ucat = U.permute(1, 0, 2).reshape(m, T * k)
    Vcat = Vh.permute(2, 0, 1).reshape(Vh.shape[2], T * k)
    mask = ~torch.block_diag(*[torch.ones(k, k, dtype=torch.bool, device=U.device)] * T)
    return (Ucat.mT @ Ucat) * mask, (Vcat.mT @ Vcat) * mask


def sti_from_factors(U: Tensor, S: Tensor, Vh: Tensor, chunk: int = 2048) -> float:
    """TSV eq. (7) from stacked per-task factors ``U [T, m, k]``, ``S [T, k]``, ``Vh [T, k, n]``.

    ``STI = ||(U^T U - I) Sigma (V^T V - I)||_1`` with ``U = [U_1 ... U_T]``, ``V = [V_1 ... V_T]`` and ``Sigma``
    block-diagonal; ``||.||_1`` is the entry-wise L1 norm (sum of absolute values, a scalar per layer as in
    TSV Fig. 6). The ``(T k) x (T k)`` product is formed ``chunk`` rows at a time, so memory stays at the two Gram
    matrices plus one ``chunk x T k`` slab.

    Example:
        >>> U = torch.eye(2).expand(2, 2, 2)[:, :, :1]   # both tasks share the direction e1
        >>> S = torch.ones(2, 1); Vh = U.mT
        >>> sti_from_factors(U, S, Vh)                 # [[0, 1], [1, 0]] @ I @ [[0, 1], [1, 0]] = I
        2.0
    """
    GU, GV = _sti_grams(U.double(), Vh.double())
    sig = S.double().reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=U.device)
    for start in range(0, GU.shape[0], chunk):
        total += ((GU[start:start + chunk] * sig) @ GV).abs().sum()
    return float(total)


def sti(layer: LayerTasks, rank: int | None = None) -> float:
    """Singular Task Interference of one layer (TSV eq. 7) on the top-``rank`` factors of each task.

    ``rank=None`` uses TSV-M's ``k = int(r * (1/T))`` components per task (at least 1), its low-rank truncation
    (eq. 6; the official code keeps a fraction ``1/T`` of each spectrum, :func:`studio.methods.tsv_m.tsv_rank`);
    the factors are the ones TSV-M caches. STI vanishes when the singular
    vectors of different tasks are orthogonal and grows with their overlap weighted by singular values.

    Two choices are ours (the paper leaves them open and the official repository has no STI code; FusionBench
    0.2.33's ``compute_task_singular_interference`` stacks the factors along rows and fails on any input with a
    ``multi_dot`` shape error, so there is no independent STI to compare with): the rank, where
    sec. 3.1 concatenates full SVDs (``rank=r`` gives that) and ``r / T`` measures the factors TSV-M actually
    merges; and the norm, the entry-wise L1 norm of :func:`sti_from_factors` (the induced matrix 1-norm would be
    a column maximum, far smaller).

    Components beyond a task's numerical rank (singular values at or below ``sigma_max * max(m, n) * eps(float32)``,
    ``torch.linalg.matrix_rank``'s rule, as :func:`subspace_similarity` leaves them out) add nothing, in both
    ``svd_mode``. An entry of eq. (7) does not shrink with the singular values of the directions it pairs, so an
    exact SVD's arbitrary null-space vectors counted at full weight: three rank-3 tasks gave 24.4 at the default
    rank with ``"exact"`` and 6.1 with ``"auto"``, and tasks on orthogonal subspaces 476 instead of 0. For the same
    reason eq. (7) itself jumps when a rank-deficient task gains tiny components (noise of 1e-7 took those three
    tasks from 6.1 to 25): compare STI at ranks within the tasks' numerical rank.

    Example:
        >>> from studio.pool import TaskPool
        >>> base = {"w": torch.zeros(2, 2)}
        >>> pool = TaskPool(base, {"a": {"w": torch.eye(2)[:, :1] @ torch.eye(2)[:1]},
        ...                        "b": {"w": 3 * torch.eye(2)[:, :1] @ torch.eye(2)[:1]}})
        >>> sti(pool.layer("w"), rank=1)   # collinear tasks: |1 * 3| + |1 * 1|
        4.0
    """
    _require_matrix(layer)
    rank = _check_k("sti", rank, layer.key, "rank")
    rank = _default_sti_rank(layer) if rank is None else min(rank, min(layer.shape))
    return layer.memo(("diag", "sti", rank), lambda: sti_from_factors(*_task_factors(layer, rank)))


def sti_pairwise(layer: LayerTasks, rank: int | None = None) -> Tensor:
    """STI of every pair of tasks, ``[T, T]`` (TSV eq. 7 applied to ``{Delta_i, Delta_j}``), zero diagonal.

    For two tasks the Gram matrices of eq. (7) are off-diagonal ``[[0, A], [A^T, 0]]`` with ``A = U_i^T U_j`` (and
    ``B = V_i^T V_j``), so the product is block-diagonal and
    ``STI_ij = ||U_i^T U_j Sigma_j V_j^T V_i||_1 + ||U_j^T U_i Sigma_i V_i^T V_j||_1``: all pairs come from one
    Gram matrix of the concatenated factors. ``rank`` as in :func:`sti`.

    Example:
        >>> from studio.pool import TaskPool
        >>> e = torch.eye(2)
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": e[:, :1] @ e[:1]}, "b": {"w": 3 * e[:, :1] @ e[:1]}})
        >>> sti_pairwise(pool.layer("w"), rank=1).tolist()
        [[0.0, 4.0], [4.0, 0.0]]
    """
    _require_matrix(layer)
    rank = _check_k("sti_pairwise", rank, layer.key, "rank")
    rank = _default_sti_rank(layer) if rank is None else min(rank, min(layer.shape))

    def compute() -> Tensor:
        U, S, Vh = _task_factors(layer, rank)
        T, _, k = U.shape
        GU, GV = _sti_grams(U.double(), Vh.double())
        A = GU.view(T, k, T, k).permute(0, 2, 1, 3)  # A[i, j] = U_i^T U_j
        B = GV.view(T, k, T, k).permute(2, 0, 1, 3)  # B[i, j] = V_j^T V_i  (block (j, i) of V^T V)
        M = (A * S.double()[None, :, None, :]) @ B   # M[i, j] = U_i^T U_j Sigma_j V_j^T V_i
        l1 = M.abs().sum((-1, -2))
        out = l1 + l1.mT
        out.fill_diagonal_(0.0)
        return out.float()

    return layer.memo(("diag", "sti_pairwise", rank), compute)


# --------------------------------------------------------------------------------------------------------------
# Responses along the merged singular directions: SAR-to-merge, SVC, AlignMerge
# --------------------------------------------------------------------------------------------------------------
# The per-subspace statistics c_i^r = u_r^T Delta_i v_r and ||a_i^r||^2 = ||u_r^T Delta_i||^2 and the SVC /
# AlignMerge formulas on them are implemented once, in studio.methods._align (shared with the svc and
# align_merge_b methods); this section only selects the merged delta, memoises small results and adds the
# plotting reductions.

class _MergedStats(NamedTuple):
    S: Tensor           # [R] singular values of the merged delta
    c: Tensor           # [T, R] u_r^T Delta_i v_r
    a2: Tensor          # [T, R] ||u_r^T Delta_i||^2
    task_norm2: Tensor  # [T] ||Delta_i||_F^2


def _task_norm2(layer: LayerTasks) -> Tensor:
    """``[T]`` float64: each task matrix's squared Frobenius norm, the diagonal of the memoised :func:`_task_gram`."""
    return _task_gram(layer).diagonal()


def _merged_svd(layer: LayerTasks, delta: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """The merged delta's sum-ordered SVD (:func:`~studio.methods._align.sum_ordered_svd`) with ``to_rank``: a
    rank-deficient merge (TSV-M below rank ``1/T``; ``svd_mode="auto"``) through the float64 Gram to the numerical
    rank the diagnostics read (:func:`studio.linalg.svd_gram_to_rank`), not LAPACK's float32 SVD; the same bits
    where the merge has full rank or a flat spectrum. ``None`` (the caller takes
    :func:`~studio.methods._align.merged_spectrum`'s) for the Task Arithmetic sum (its memo) and in
    ``svd_mode="exact"`` (LAPACK's, as the official code)."""
    total = layer.sum()
    if layer.pool.svd_mode == "exact" or delta is total or (delta.shape == total.shape and torch.equal(delta, total)):
        return None
    return _align.sum_ordered_svd(delta, total, exact=False, to_rank=True)


def _merged_stats(layer: LayerTasks, merged: Tensor | None) -> _MergedStats:
    """``(sigma, c, |a|^2)`` of the merged delta, memoised per layer and merged tensor.

    The Task Arithmetic sum goes through :func:`~studio.methods._align.merged_spectrum` (memoised there and shared
    with the SVC / AlignMerge-B calibrations of a TA merge). Any other merged delta is decomposed by
    :func:`~studio.methods._align.sum_ordered_svd` (ties in its spectrum resolved by the sum), and only the small
    ``[T, R]`` statistics are memoised, not the singular-vector basis (``R^2`` floats per layer and merge).
    """
    _require_matrix(layer)
    delta, tag = _merged_delta(layer, merged)

    def compute() -> _MergedStats:
        svd = _merged_svd(layer, delta)
        spec = (_align.merged_spectrum(layer, delta) if svd is None   # the sum's memo, or the sum-ordered SVD
                else _align.merged_spectrum_of(layer.task_deltas(reuse=True), delta, svd, held=False))
        return _MergedStats(spec.S, spec.c, spec.a2, _task_norm2(layer).float())

    return layer.memo(("diag", "merged_stats", tag), compute, transient=(tag != "ta_sum"))


def _top(R: int, k: int | None, name: str, key: str, param: str) -> int:
    """The number of leading merged subspaces ``name`` uses: ``k`` clipped to the ``R`` there are (``None``: all)."""
    k = _check_k(name, k, key, param)
    return R if k is None else max(1, min(k, R))


def _merged_rank(layer: LayerTasks, S: Tensor) -> int:
    """Numerical rank of the merged delta: its singular values above ``sigma_max * max(m, n) * eps(float32)``
    (``torch.linalg.matrix_rank``'s rule, as :func:`_task_bases` for the tasks). The singular vectors beyond it span
    the merged delta's null space: LAPACK returns arbitrary ones there (a zero merge: any direction), which no
    diagnostic may read."""
    return int(_live(S, layer).sum()) if S.numel() else 0


def _k_merged(layer: LayerTasks, st: "_MergedStats", k: int | None, name: str, eps: float = 0.05,
              k_rule: str = "official") -> int:
    """The ``k_M`` leading merged directions SAR and the pooled heatmaps use: ``k``, else the effective rank
    (:func:`effective_rank`, at least 1), never more than the merged delta's numerical rank (0 for a zero merge)."""
    k = _check_k(name, k, layer.key)
    default = max(1, effective_rank(st.S, eps, k_rule))   # checks eps and k_rule even where k is given
    return min(default if k is None else k, _merged_rank(layer, st.S))


def _beyond_rank(layer: LayerTasks, st: "_MergedStats", R: int) -> Tensor:
    """``[R]``: which of the top ``R`` merged subspaces lie beyond the merged delta's numerical rank."""
    return torch.arange(R, device=st.S.device) >= _merged_rank(layer, st.S)


def _absent(c: Tensor) -> Tensor:
    """Where a task has (numerically) no component ``c_i^r`` in a merged subspace."""
    return c.abs() <= torch.finfo(torch.float32).eps * c.abs().max().clamp_min(torch.finfo(torch.float32).tiny)


def sar_to_merged(layer: LayerTasks, merged: Tensor | None = None, k: int | None = None,
                  eps: float = 0.05, k_rule: str = "official") -> Tensor:
    """Subspace Alignment Ratio of each task to the merged delta, ``[T]`` in [0, 1] (Iso eq. 5).

    ``SAR(Delta_t, Delta_M; k_M) = ||U_{k_M} U_{k_M}^T Delta_t||_F / ||Delta_t||_F`` with ``U_{k_M}`` the top
    left singular vectors of the merged delta and ``k_M`` its effective rank (:func:`effective_rank`, ``eps =
    0.05``, the official code's rule unless ``k_rule="paper"``) unless ``k`` is given.
    ``||U_k^T Delta_t||_F^2 = sum_{r<=k} ||a_t^r||^2`` reuses SVC's subspace responses (eq. 18).
    ``merged=None`` uses the Task Arithmetic sum (``SAR(Delta_t, Delta_TA; k_TA)`` of Fig. 3a). SAR is invariant
    to the scale of the merged delta. ``k_M`` never exceeds the merged delta's numerical rank (:func:`_merged_rank`):
    a zero merge has SAR 0 for every task, not the tasks' share along an arbitrary null direction. Where the merged
    spectrum is flat (Iso-C, Iso-CTS, Ortho-Merge) its top ``k_M`` directions are taken in the order of the sum
    (:func:`~studio.methods._align.sum_ordered_svd`), as the Iso authors' SAR code does for Iso-C; LAPACK's own
    order there is set by rounding.

    Example:
        >>> from studio.pool import TaskPool
        >>> e = torch.eye(3)
        >>> pool = TaskPool({"w": torch.zeros(3, 3)}, {"a": {"w": e[:, :1] @ e[:1]}, "b": {"w": e[:, 1:2] @ e[:1]}})
        >>> layer = pool.layer("w")
        >>> sar_to_merged(layer, merged=layer.deltas[0], k=1).tolist()
        [1.0, 0.0]
    """
    st = _merged_stats(layer, merged)
    k = _k_merged(layer, st, k, "sar_to_merged", eps, k_rule)
    captured = st.a2[:, :k].double().sum(1)
    return (captured / st.task_norm2.double().clamp_min(torch.finfo(torch.float64).tiny)).sqrt().clamp(0, 1).float()


def _preferences(layer: LayerTasks, preferences: "Mapping[str, float] | Sequence[float] | Tensor | None"
                 ) -> Tensor | None:
    """``preferences`` as :func:`studio.merge` takes them (a mapping name -> weight, or one weight per expert),
    normalised to sum to 1, on the layer's device (:func:`studio.pool.normalize_preferences` checks them)."""
    p = normalize_preferences(preferences, layer.names)
    return None if p is None else p.to(layer.device)


def svc_coefficients(layer: LayerTasks, merged: Tensor | None = None, *, alpha: float = 1.0,
                     preferences: Tensor | Sequence[float] | None = None,
                     rank: int | None = None) -> tuple[Tensor, Tensor]:
    """SVC projection coefficients ``s [T, R]`` (eq. 19) and calibration factors ``gamma [R]`` (eq. 20).

    With the SVD ``Delta_merge = sum_r sigma^r u^r (v^r)^T`` (eq. 17), ``a_i^r = (u^r)^T Delta_i`` and
    ``a_merge^r = sigma^r (v^r)^T`` (eq. 18): ``s_i^r = <a_merge^r, a_i^r> / ||a_i^r||^2`` and
    ``gamma^r = K / sum_i max(alpha, s_i^r)``; with ``preferences`` the weighted form of the SVC calibration
    (one-hot = the target-task calibration of sec. 5.3, ``gamma^r = 1 / max(alpha, s_t^r)``, except that, as in the
    official code, a subspace where the target task's ``s_t^r <= 0`` keeps ``gamma^r = 1``: sec. 5.3's formula
    would give ``1 / alpha`` there; see :func:`~studio.methods._align.svc_gamma`). A task's response at or below
    :data:`~studio.methods._align.SVC_NOISE_RTOL` of its own largest counts as none (``s = 0``), and the target guard
    keeps a subspace whose projection ``|c_t^r|`` is at or below :data:`~studio.methods._align.SVC_PROJECTION_RTOL`
    of it (:func:`~studio.methods._align.svc_unresolved`). Both come from
    :func:`studio.methods._align.svc_projection_coefficients` / :func:`~studio.methods._align.svc_gamma`, the code
    the ``svc`` calibration runs. ``merged=None``: the Task Arithmetic sum, where Lemma 3.2 gives
    ``s_i^r = 1 + sum_{j != i} <a_j^r, a_i^r> / ||a_i^r||^2`` (see :func:`svc_cross_terms`). ``rank``: only the top
    ``rank`` subspaces. ``s`` is not scale-invariant: it is computed for the merged delta as passed. The official
    code's absolute clamp of ``||a_i^r||^2`` at ``1e-12`` is kept (the calibration's own), so where responses
    ``||a_i^r||`` near ``1e-6`` ``s`` and ``gamma`` drift from eq. 19-20: MiniSuite's ``c_fc`` tasks all scaled by
    ``1e-5`` read 18 % off, by ``1e-6`` no over-counting at all (a helper's blind re-implementation); at their own
    size (``||Delta||_F ~ 1.4``) they are within 7e-7.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": torch.eye(2)}})
        >>> s, gamma = svc_coefficients(pool.layer("w"))   # two identical tasks: every subspace counted twice
        >>> s.tolist(), gamma.tolist()
        ([[2.0, 2.0], [2.0, 2.0]], [0.5, 0.5])
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not alpha > 0 or not math.isfinite(alpha):
        raise DiagnosticsError(f"svc_coefficients: alpha must be a finite number > 0 (SVC's clip, eq. 20), got "
                               f"{brief(alpha)}")
    st = _merged_stats(layer, merged)
    R = _top(st.S.numel(), rank, "svc_coefficients", layer.key, "rank")
    # over every subspace, then cut: the noise floor is relative to each task's largest response, as in the svc
    # calibration
    s = _align.svc_projection_coefficients(st.S, st.c, st.a2)[:, :R]
    unresolved = _align.svc_unresolved(st.c, st.a2)[:, :R]
    return s, _align.svc_gamma(s, alpha, _preferences(layer, preferences), unresolved=unresolved)


def _cross_terms(layer: LayerTasks, merged: Tensor | None) -> Tensor:
    """``alpha_1[i, j, r] = <a_j^r, a_i^r> / ||a_i^r||^2`` (0 where task ``i`` has no response), memoised."""
    delta, tag = _merged_delta(layer, merged)

    def compute() -> Tensor:
        # the basis of _merged_stats: its a2 multiplies these in svc_cross_terms (two bases there made the raw inner
        # products asymmetric, 3.5e-5 on rank-deficient merges)
        svd = layer.sum_svd() if tag == "ta_sum" else _merged_svd(layer, delta)
        if svd is None:
            svd = _align.sum_ordered_svd(delta, layer.sum(), layer.pool.svd_mode == "exact")
        U, _, Vh = svd
        alpha1, _ = _align.cross_influence_terms(layer.deltas, U, Vh)
        return torch.nan_to_num(alpha1, nan=0.0, posinf=0.0, neginf=0.0)

    return layer.memo(("diag", "svc_cross", tag), compute, transient=(tag != "ta_sum"))


def svc_cross_terms(layer: LayerTasks, merged: Tensor | None = None, rank: int | None = None,
                    normalize: bool = True) -> Tensor:
    """SVC Lemma 3.2 / Fig. 3 cross terms along the merged directions, ``[T, T, R]`` (``[i, j, r]``).

    ``normalize=True``: ``C[i, j, r] = <a_j^r, a_i^r> / ||a_i^r||^2`` (the diagonal is 1), so that for the Task
    Arithmetic sum ``s_i^r = sum_j C[i, j, r]`` (Lemma 3.2). This is also AlignMerge's column step ``alpha_1``
    (App. B.2, eq. 22; :func:`studio.methods._align.cross_influence_terms`). ``False``: the raw inner products
    ``<a_i^r, a_j^r>`` that SVC Fig. 3 visualises. Entries of a task without response (at or below
    :data:`~studio.methods._align.SVC_NOISE_RTOL` of its own largest, as for ``s``) are 0; subspaces beyond the
    merged delta's numerical rank (its null space, where LAPACK's directions are arbitrary) are NaN.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": 2 * torch.eye(2)}})
        >>> svc_cross_terms(pool.layer("w"), rank=1)[:, :, 0].tolist()
        [[1.0, 2.0], [0.5, 1.0]]
    """
    st = _merged_stats(layer, merged)
    R = _top(st.S.numel(), rank, "svc_cross_terms", layer.key, "rank")
    C = _cross_terms(layer, merged)[:, :, :R]
    # a task with no response by SVC's noise floor (s = 0 in svc_coefficients) has a zero row, so that Lemma 3.2's
    # s_i^r = sum_j C[i, j, r] holds for it too
    silent = _align.svc_no_response(st.a2)[:, :R]
    C = C.masked_fill(silent.unsqueeze(1), 0.0)
    if not normalize:   # the raw inner products are symmetric: a silent task's column is zero too
        C = (C * st.a2[:, :R].unsqueeze(1)).masked_fill(silent.unsqueeze(0), 0.0)
    return torch.where(_beyond_rank(layer, st, R), torch.full_like(C, float("nan")), C)


def cross_influence(layer: LayerTasks, merged: Tensor | None = None, rank: int | None = None) -> Tensor:
    """AlignMerge Subspace Cross-Influence ``xi[i, j, r]`` of task ``j`` on task ``i`` in merged subspace ``r``.

    Prop. 1 / eq. (5), App. B.2: ``xi = alpha_1 + alpha_2`` (column projection, then row projection of the
    residual). This reads the paper's task component in subspace ``r`` (its ``W_i^r``) as ``Delta_i`` projected on
    both sides, ``u^r (u^r)^T Delta_i v^r (v^r)^T = c_i^r u^r (v^r)^T``: both projected matrices are then multiples
    of the rank-one ``u^r (v^r)^T``, so the two steps telescope to ``xi_{i,j}^r = c_j^r / c_i^r`` with ``c^r =
    (u^r)^T Delta v^r`` (:func:`studio.methods._align.subspace_cross_influence`; the literal two steps are
    :func:`~studio.methods._align.cross_influence_terms`). It is a reading, not the only one: with ``W_i^r`` the
    task matrix projected on the row side alone (``Delta_i v^r (v^r)^T``), the two steps do not telescope, leave the
    noise term of eq. (23), and give other values (a blind re-implementation that way differed by up to 88 % in
    AlignMerge-B's merge). This one is taken because under it the calibrated singular value of Prop. 2 is the
    optimum ``c_i^r`` the paper derives. ``xi_{i,i}^r = 1``; entries where ``c_i^r = 0`` (task
    ``i`` absent from subspace ``r``) are NaN, as are subspaces beyond the merged delta's numerical rank (its null
    space, where LAPACK's directions are arbitrary). ``merged=None``: the Task Arithmetic sum (the paper's shared
    basis). ``rank``: the top ``rank`` subspaces.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": 3 * torch.eye(2)}})
        >>> cross_influence(pool.layer("w"), rank=1)[:, :, 0].tolist()
        [[1.0, 3.0], [0.3333333432674408, 1.0]]
    """
    st = _merged_stats(layer, merged)
    R = _top(st.S.numel(), rank, "cross_influence", layer.key, "rank")
    c = st.c[:, :R]
    xi = _align.subspace_cross_influence(c)
    return torch.where(_absent(c).unsqueeze(1) | _beyond_rank(layer, st, R), torch.full_like(xi, float("nan")), xi)


def eta(layer: LayerTasks, merged: Tensor | None = None, rank: int | None = None) -> Tensor:
    """AlignMerge eq. (4) scale ``eta^r = sigma_merge^r / ((u^r)^T (sum_i Delta_i) v^r)``, ``[R]`` (1 for TA).

    From :func:`studio.methods._align.subspace_scaling_eta`; NaN where the summed coefficient vanishes, and beyond
    the merged delta's numerical rank.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": torch.eye(2)}})
        >>> layer = pool.layer("w")
        >>> eta(layer, merged=layer.sum() / 2).tolist()
        [0.5, 0.5]
    """
    st = _merged_stats(layer, merged)
    R = _top(st.S.numel(), rank, "eta", layer.key, "rank")
    total = st.c[:, :R].sum(0, keepdim=True)
    return torch.where(_absent(total)[0] | _beyond_rank(layer, st, R),
                       torch.full((R,), float("nan"), device=total.device, dtype=st.S.dtype),
                       _align.subspace_scaling_eta(st.S[:R], st.c[:, :R]))


def sai(layer: LayerTasks, merged: Tensor | None = None, rank: int | None = None, signed: bool = False) -> Tensor:
    """AlignMerge Subspace-Alignment Index ``SAI_i^r = |eta^r (sum_{j != i} xi_{i,j}^r + 1) - 1|``, ``[T, R]`` (eq. 8).

    The full coefficient simplifies to ``sigma^r / c_i^r``: how much the merged model scales task ``i``'s own
    component in subspace ``r`` (0 = no interference); computed by
    :func:`studio.methods._align.subspace_alignment_index`. ``signed=True`` drops the absolute value, as the
    paper's Fig. 3 plots it. NaN where task ``i`` is absent from the subspace (``c_i^r = 0``), and beyond the merged
    delta's numerical rank. Unlike ``xi``, SAI
    depends on the scale of the merged delta (``sigma^r`` does): pass the delta the model actually adds (the app
    passes its scaled merge); ``merged=None`` is the unscaled sum, ``lambda = 1``, where the AlignMerge and SVC
    reference setups scale Task Arithmetic by 0.3 (a subspace with ``sigma^r / c_i^r = 5.19`` in the sum has SAI 4.19
    there and ``|0.3 * 5.19 - 1| = 0.56`` at 0.3).

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": torch.eye(2)}})
        >>> sai(pool.layer("w"), rank=1).tolist()   # TA of two identical tasks doubles each: |2 - 1|
        [[1.0], [1.0]]
    """
    signed = _check_flag("sai", signed, "signed")
    st = _merged_stats(layer, merged)
    R = _top(st.S.numel(), rank, "sai", layer.key, "rank")
    c = st.c[:, :R]
    out = _align.subspace_alignment_index(st.S[:R], c, signed=signed)
    return torch.where(_absent(c) | _beyond_rank(layer, st, R), torch.full_like(out, float("nan")), out)


# --------------------------------------------------------------------------------------------------------------
# Heatmap reductions of the per-subspace metrics
# --------------------------------------------------------------------------------------------------------------

def _default_k_merged(layer: LayerTasks, merged: Tensor | None, k: int | None, name: str, eps: float = 0.05,
                      k_rule: str = "official") -> int:
    return _k_merged(layer, _merged_stats(layer, merged), k, name, eps, k_rule)


def _row_normalise(G: Tensor, empty: float) -> Tensor:
    """``G[i, j] / G[i, i]``, with ``empty`` in the rows of tasks absent from every pooled subspace. ``G``'s diagonal
    holds squared responses, so the cut is ``eps(float32)^2`` of the largest: a response of ``eps(float32)`` of the
    largest, as :func:`_absent` cuts each subspace's (the pooled matrices equal the per-subspace ones at ``k = 1``)."""
    d = torch.diagonal(G)
    ok = (d > torch.finfo(torch.float32).eps ** 2 * d.max().clamp_min(1e-300)).unsqueeze(1)
    return torch.where(ok, G / d.clamp_min(1e-300).unsqueeze(1), torch.full_like(G, empty)).float()


def svc_cross_matrix(layer: LayerTasks, merged: Tensor | None = None, k: int | None = None) -> Tensor:
    """Pooled SVC Lemma 3.2 cross terms over the top-``k`` merged subspaces, ``[T, T]`` (diagonal 1; a zero row
    for a task with no response in any of them).

    ``C[i, j] = sum_{r<=k} <a_j^r, a_i^r> / sum_{r<=k} ||a_i^r||^2``: the share of task ``j`` in the merged response
    along task ``i``'s directions. For the Task Arithmetic sum each row sums to the pooled projection coefficient
    ``<U_k^T Delta_TA, U_k^T Delta_i>_F / ||U_k^T Delta_i||_F^2`` (SVC eq. 19 over ``k`` subspaces at once).
    ``k=None``: the merged effective rank ``k_M`` (:func:`effective_rank`, the official ``calc_rank`` rule).

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": torch.eye(2)}})
        >>> svc_cross_matrix(pool.layer("w")).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    k = _default_k_merged(layer, merged, k, "svc_cross_matrix")
    if k == 0:   # a zero merge: no direction, no response
        return torch.zeros(layer.num_tasks, layer.num_tasks, device=layer.device)
    return _row_normalise(svc_cross_terms(layer, merged, rank=k, normalize=False).double().sum(-1), 0.0)


def cross_influence_matrix(layer: LayerTasks, merged: Tensor | None = None, k: int | None = None) -> Tensor:
    """AlignMerge cross-influence pooled over the top-``k`` merged subspaces, ``[T, T]`` (diagonal 1).

    ``X[i, j] = sum_{r<=k} c_i^r c_j^r / sum_{r<=k} (c_i^r)^2``: the least-squares ``xi`` with
    ``sum_r P^r Delta_j P^r ~= xi sum_r P^r Delta_i P^r`` over the ``k`` subspaces, i.e. eq. (3)'s Frobenius
    projection applied to the per-subspace components of eq. (6) at once. It equals ``xi_{i,j}^r`` when ``k = 1``
    and, unlike a mean of per-subspace ratios, is not dominated by subspaces where ``c_i^r ~ 0``.
    ``k=None``: the merged effective rank ``k_M`` (:func:`effective_rank`, official rule). NaN rows for a task
    absent from all ``k``.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": -torch.eye(2)}})
        >>> cross_influence_matrix(pool.layer("w"), merged=torch.eye(2)).tolist()
        [[1.0, -1.0], [-1.0, 1.0]]
    """
    k = _default_k_merged(layer, merged, k, "cross_influence_matrix")
    c = _merged_stats(layer, merged).c[:, :k].double()
    return _row_normalise(c @ c.mT, float("nan"))


# --------------------------------------------------------------------------------------------------------------
# Metric table for the app's heatmap selector
# --------------------------------------------------------------------------------------------------------------

class Metric(NamedTuple):
    """One heatmap metric: ``fn(layer, merged, k) -> Tensor`` and what the UI needs to draw it.

    ``range``: (low, high) of the values, ``None`` = unbounded on that side. ``signed``: use a diverging colour
    scale centred at ``center``. ``shape``: ``"TxT"`` (rows and columns are tasks) or ``"TxK"`` (rows are tasks,
    columns the top-``k`` merged singular subspaces, index 1 = largest). ``symmetric``: the ``TxT`` matrix is
    symmetric. ``k_help``: what ``k`` means for this metric and its default. ``uses_merged``: depends on the merged
    delta (``None`` = the Task Arithmetic sum).
    """

    fn: Callable[[LayerTasks, "Tensor | None", "int | None"], Tensor]
    description: str
    range: tuple[float | None, float | None]
    signed: bool
    shape: str
    symmetric: bool
    center: float | None
    k_help: str
    uses_merged: bool
    paper: str


_TXK_DEFAULT = 32


def _txk(k: int | None) -> int:
    return _TXK_DEFAULT if k is None else k


METRICS: dict[str, Metric] = {
    "subspace_similarity": Metric(
        lambda layer, merged, k: subspace_similarity(layer, 5 if k is None else k),
        "Top-k subspace similarity: mean singular value of U_i,k^T U_j,k (mean cosine of principal angles).",
        (0.0, 1.0), False, "TxT", True, None, "k = subspace dimension per task (default 5, as in Fig. 1)", False,
        "Ortho-Merge sec. 3.1, Fig. 1"),
    "cosine": Metric(
        lambda layer, merged, k: task_cosine(layer),
        "Cosine similarity of the flattened task matrices.",
        (-1.0, 1.0), True, "TxT", True, 0.0, "k is not used", False, "Ilharco et al. 2023; Iso Fig. 2a"),
    "sar": Metric(
        lambda layer, merged, k: pairwise_sar(layer, k),
        "Subspace Alignment Ratio: share of task i (row) inside the top-k left singular subspace of task j "
        "(column).",
        (0.0, 1.0), False, "TxT", False, None,
        "k = directions of task j (default k_TA, the effective rank of the TA sum by the official code's rule)",
        False,
        "Iso eq. 5-6, Fig. 3b"),
    "sti_pairwise": Metric(
        lambda layer, merged, k: sti_pairwise(layer, k),
        "Singular Task Interference of each pair of tasks (TSV eq. 7 on {Delta_i, Delta_j}); the per-layer STI "
        "curve takes all T tasks at once, so its values are larger.",
        (0.0, None), False, "TxT", True, None, "k = components kept per task (default r / T, as TSV-M)", False,
        "TSV eq. 6-7"),
    "svc": Metric(
        lambda layer, merged, k: svc_coefficients(layer, merged, rank=_txk(k))[0],
        "SVC projection coefficient s_i^r: how the merged delta scales task i (row) along merged subspace r "
        "(column); > 1 over-counting, < 1 attenuation.",
        (None, None), True, "TxK", False, 1.0, f"k = top merged subspaces shown (default {_TXK_DEFAULT})", True,
        "SVC eq. 18-19"),
    "svc_cross": Metric(
        svc_cross_matrix,
        "SVC cross terms pooled over the top-k merged subspaces: share of task j (column) in the merged response "
        "along task i's directions (row); rows sum to s_i for the TA sum.",
        (None, None), True, "TxT", False, 0.0, "k = top merged subspaces pooled (default k_M, the official rule)", True,
        "SVC Lemma 3.2, Fig. 3"),
    "xi": Metric(
        cross_influence_matrix,
        "AlignMerge cross-influence of task j (column) on task i (row), least-squares over the top-k merged "
        "subspaces; > 0 aligned (double counting), < 0 conflicting.",
        (None, None), True, "TxT", False, 0.0, "k = top merged subspaces pooled (default k_M, the official rule)", True,
        "AlignMerge Prop. 1, eq. 5-6"),
    "sai": Metric(
        lambda layer, merged, k: sai(layer, merged, rank=_txk(k), signed=True),
        "Signed Subspace-Alignment Index sigma^r / c_i^r - 1 per task (row) and merged subspace (column); "
        "0 = no interference, > 0 amplified, < 0 suppressed; large where a task's c_i^r is small, undefined "
        "(blank) where it is 0 or the subspace lies beyond the merge's rank.",
        (None, None), True, "TxK", False, 0.0, f"k = top merged subspaces shown (default {_TXK_DEFAULT})", True,
        "AlignMerge eq. 8, Fig. 3"),
}


# --------------------------------------------------------------------------------------------------------------
# Model level
# --------------------------------------------------------------------------------------------------------------

CURVES: dict[str, str] = {
    "sti": "Singular Task Interference at rank r/T (TSV eq. 7, Fig. 6)",
    "task_entropy": "Mean spectral entropy of the task matrices (Ortho-Merge eq. 9)",
    "merged_entropy": "Spectral entropy of the merged delta (Ortho-Merge eq. 9)",
    "sar_mean": "Mean SAR of the tasks to the merged delta at k_M (Iso eq. 5)",
    "sar_min": "Worst-task SAR to the merged delta at k_M (Iso eq. 5)",
    "k_merged_frac": "Effective rank k_M of the merged delta over r (Iso eq. 6, the official code's rule)",
    "energy": "||Delta_M||^2 / sum_i ||Delta_i||^2 (Ortho-Merge eq. 2)",
    "cosine_mean": "Mean pairwise cosine of the task matrices (NaN, null in JSON, for fewer than two tasks)",
    "subspace_sim_mean": "Mean pairwise top-5 subspace similarity (Ortho-Merge Fig. 1; NaN for fewer than two tasks)",
    "svc_gamma_mean": "Mean SVC calibration factor gamma^r over the top k_M merged subspaces (SVC eq. 20, alpha=1)",
}

_BLOCK = re.compile(r"resblocks\.(\d+)\.")


def _detect_is_delta(pool: TaskPool, merged: Mapping[str, Tensor], keys: Sequence[str]) -> bool:
    """A merged *state* is close to the base, a merged *delta* is small: compare the two distances over ``keys``."""
    to_base = to_zero = 0.0
    for key in keys:
        b = pool.base[key].double()
        x = merged[key].to(b.device, torch.float64)
        to_base += float((x - b).pow(2).sum())
        to_zero += float(x.pow(2).sum())
    return to_zero <= to_base


def _delta_for_key(pool: TaskPool, key: str, merged: Mapping[str, Tensor], is_delta: bool) -> Tensor:
    if key not in merged:
        raise DiagnosticsError(f"the merged state/deltas lack key '{key}' (it has {len(merged)} keys)")
    x = merged[key]
    if not isinstance(x, Tensor) or tuple(x.shape) != tuple(pool.base[key].shape):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise DiagnosticsError(f"merged key '{key}' has shape {got}, expected {tuple(pool.base[key].shape)}")
    if is_delta:
        return x.to(pool.device, torch.float32)
    # float64 weights are subtracted in float64 and only the difference is rounded, as the pool's task vectors
    return float32_delta(x.to(pool.device), pool.tensor(None, key))


def _resolve_merged_mapping(pool: TaskPool, merged: "Mapping[str, Tensor] | None", keys: Sequence[str],
                            merged_is_delta: bool | None) -> "Callable[[str], Tensor | None]":
    merged_is_delta = _check_flag("diagnostics", merged_is_delta, "merged_is_delta", none=True)
    if merged is None:
        return lambda key: None
    if not isinstance(merged, Mapping):
        raise DiagnosticsError(f"merged must be a state dict / delta dict or None, got {type(merged).__name__}")
    missing = [k for k in keys if k not in merged]
    if missing:
        raise DiagnosticsError(f"the merged state/deltas lack {len(missing)} key(s), e.g. {missing[:3]}")
    for key in keys:   # before the state-or-delta test reads them
        x = merged[key]
        if not isinstance(x, Tensor) or tuple(x.shape) != tuple(pool.base[key].shape):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DiagnosticsError(f"merged key '{key}' has shape {got}, expected {tuple(pool.base[key].shape)}")
        _check_values(x, f"merged key '{key}'", "merged weights")
    is_delta = _detect_is_delta(pool, merged, keys) if merged_is_delta is None else bool(merged_is_delta)
    return lambda key: _delta_for_key(pool, key, merged, is_delta)


def _changed(expert: Tensor, base: Tensor) -> bool:
    """Whether an expert's tensor differs from the base's, compared where both are held (no copy to the compute
    device; another device counts as changed). Of two dtypes, the more precise tensor is rounded to the other's: a
    frozen layer of a float32 base that its fine-tuned checkpoint stores in float16 is unchanged."""
    if expert.device != base.device:
        return True
    if expert.dtype != base.dtype:
        if torch.finfo(expert.dtype).eps >= torch.finfo(base.dtype).eps:
            base = base.to(expert.dtype)
        else:
            expert = expert.to(base.dtype)
    return not torch.equal(expert, base)


def unchanged_tasks(layer: LayerTasks) -> Tensor:
    """``[T]`` bool (CPU): the tasks whose matrix is exactly zero on this layer, an expert that left it as the base has
    it (a block frozen in its fine-tuning). Their SAR, similarities and cosines there are 0/0: the per-layer metrics
    give 0 (their docstrings say so), and the averages over layers and tasks leave them out.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": torch.zeros(2, 2)}})
        >>> unchanged_tasks(pool.layer("w")).tolist()
        [False, True]
    """
    # a float32 value's square is a normal float64 (the smallest subnormal's is 2e-90): a norm is 0 only if all are
    return layer.memo(("diag", "silent"), lambda: (_task_norm2(layer) == 0).cpu())


def _per_layer(pool: TaskPool, fn: Callable[[LayerTasks], Any], keys: Sequence[str]) -> list[Any]:
    """``[fn(pool.layer(key)) for key in keys]`` on the merge's worker threads (:func:`studio.parallel.parallel_map`;
    the pool's caches are thread-safe, and each worker makes its own layer view), as :func:`layer_curves`' layers."""
    return parallel_map(lambda key: fn(pool.layer(key)), keys, device=pool.device, host_bound=True)


def _mean_over_layers(values: Sequence[Tensor], silent: Sequence[Tensor]) -> Tensor:
    """The mean over layers of per-layer ``[T]`` or ``[T, T]`` values, each entry over the layers where its task (a
    pair's two tasks) changed, as float32 on the CPU; NaN where there is none (an expert equal to the base on every
    layer). A NaN a layer's value holds (``"xi"`` of a task it does not align with) stays NaN.

    Example:
        >>> _mean_over_layers([torch.tensor([0.5, 0.0]), torch.tensor([1.0, 0.5])],   # b: silent on the first
        ...                   [torch.tensor([False, True]), torch.tensor([False, False])]).tolist()
        [0.75, 0.5]
    """
    x = torch.stack([v.detach().to("cpu", torch.float64) for v in values])
    quiet = torch.stack(list(silent))
    defined = ~quiet if x.dim() == 2 else ~(quiet[:, :, None] | quiet[:, None, :])
    return (torch.where(defined, x, 0.0).sum(0) / defined.sum(0)).float()   # 0 / 0: NaN


def _nothing_changed(pool: TaskPool, what: str, keys: Sequence[str] | None,
                     layer_rule: "LayerRule | str | None") -> DiagnosticsError:
    """Why there is no layer to average over: none given, none the rule selects, or none an expert changed."""
    if keys is not None:
        return DiagnosticsError(f"{what}: keys is empty; give at least one matrix layer, or None for every one")
    rule = resolve_rule(layer_rule)
    if not any(t.is_floating_point() and rule.is_matrix(k, t.shape) for k, t in pool.base.items()):
        shapes = ", ".join(f"{k} {tuple(t.shape)}" for k, t in list(pool.base.items())[:3])
        more = ", ..." if len(pool.base) > 3 else ""
        return DiagnosticsError(f"{what}: no matrix layer to average over: the layer rule {rule.name!r} selects none "
                                f"of the pool's {len(pool.base)} tensors ({shapes}{more}); the diagnostics measure 2-D "
                                f"weight matrices")
    return DiagnosticsError(f"{what}: no matrix layer to average over: every expert ({', '.join(pool.names)}) equals "
                            f"the base on each matrix layer the layer rule selects, so no task has a direction there")


def _check_metric(metric: Any) -> None:
    """``metric`` must name a :data:`METRICS` entry (the heatmaps' and :func:`model_matrix`'s argument)."""
    if not isinstance(metric, str) or metric not in METRICS:
        raise DiagnosticsError(f"unknown metric {brief(metric)}; available metrics: {list(METRICS)}")


def _matrix_keys(pool: TaskPool, keys: Sequence[str] | None, layer_rule: "LayerRule | str | None") -> list[str]:
    """``keys`` checked to be 2-D layers of ``pool``, or by default every matrix ``layer_rule`` selects that an
    expert changed: a layer no expert changed (a frozen block, or a text tower beside the experts' visual ones) has
    no task matrices, and counted in model-level averages it read as SAR 0 (SAR_avg 0.58 instead of 0.90)."""
    _require_pool(pool)
    if isinstance(keys, str) or (keys is not None and not isinstance(keys, (Sequence, set, frozenset))):
        raise DiagnosticsError(f"keys must be a list of layer keys or None, got {brief(keys)}")
    if keys is None:   # reading every expert's tensors: once per pool and rule (the app asks on every update)
        rule = resolve_rule(layer_rule)
        return list(pool.memo(("diag", "changed_matrix_keys", rule), lambda: tuple(
            k for k, t in pool.base.items() if t.is_floating_point() and rule.is_matrix(k, t.shape)
            and any(_changed(pool.experts[name][k], t) for name in pool.names))))
    keys = list(keys)
    twice = sorted({k for k in keys if isinstance(k, str) and keys.count(k) > 1})
    if twice:   # a model-level average would count the layer twice
        raise DiagnosticsError(f"keys lists {twice} more than once; give each layer once")
    for key in keys:
        if not isinstance(key, str) or key not in pool.base:
            raise DiagnosticsError(f"unknown key {brief(key)}; the pool has {len(pool.base)} keys, e.g. "
                                   f"{pool.keys[:3]}")
        if pool.base[key].dim() != 2:
            raise DiagnosticsError(f"key '{key}' has shape {tuple(pool.base[key].shape)}; expected a 2-D matrix")
        _require_weights(pool, key)
    return keys


def sar_avg(pool: TaskPool, merged: "Mapping[str, Tensor] | None" = None, *, pairwise: bool = False,
            keys: Sequence[str] | None = None, merged_is_delta: bool | None = None,
            layer_rule: "LayerRule | str | None" = None, eps: float = 0.05, k_rule: str = "official") -> Tensor:
    """Iso's *Average Subspace Alignment Ratio* across all layers (sec. 3.3, "SAR_avg ... across all layers").

    ``pairwise=False``: ``SAR_avg(Delta_t, Delta_M; k_M)`` per task, ``[T]`` (Fig. 3a; ``merged=None`` is the Task
    Arithmetic sum, ``k_TA``), the mean over layers of :func:`sar_to_merged`. ``pairwise=True``:
    ``SAR_avg(Delta_i, Delta_j; k_TA)``, ``[T, T]`` (Fig. 3b), the mean over layers of :func:`pairwise_sar`. Layers:
    ``keys`` or every matrix the ``layer_rule`` selects that an expert changed, each weighted equally; a task's
    mean (a pair's) takes the layers its expert changed (both experts): on a layer an expert left as the base (a
    frozen block) its SAR is 0/0, and counted as 0 it read as misalignment (an expert with half its blocks frozen
    scored half its SAR_avg). NaN for an expert equal to the base on every layer. ``merged`` as in
    :func:`layer_curves`.
    Pass the merged deltas, or a float32 merged state: a float16 state's ``merged - base`` carries the weights'
    rounding (~1e-3 of each weight, often more than the delta's own entries), which moves SAR_avg (MiniSuite, Iso-C:
    0.88-0.92 per task with float16 experts and merged state, 0.90-0.94 in float32).

    Example:
        >>> base = {"w": torch.zeros(2, 2), "v": torch.zeros(2, 2)}
        >>> e1, e2 = torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))
        >>> pool = TaskPool(base, {"a": {"w": e1, "v": e1}, "b": {"w": 2 * e2, "v": e1}})
        >>> sar_avg(pool).tolist()   # w: k_TA = 1 keeps b's direction only; v: both share it
        [0.5, 1.0]
    """
    pairwise = _check_flag("sar_avg", pairwise, "pairwise")
    given, keys = keys, _matrix_keys(pool, keys, layer_rule)
    if not keys:
        raise _nothing_changed(pool, "sar_avg", given, layer_rule)
    delta_of = _resolve_merged_mapping(pool, merged, keys, merged_is_delta)
    per_layer = _per_layer(pool, lambda layer: (
        pairwise_sar(layer, eps=eps, k_rule=k_rule) if pairwise else
        sar_to_merged(layer, delta_of(layer.key), eps=eps, k_rule=k_rule), unchanged_tasks(layer)), keys)
    return _mean_over_layers(*zip(*per_layer))


def model_matrix(pool: TaskPool, metric: str, merged: "Mapping[str, Tensor] | None" = None, k: int | None = None, *,
                 keys: Sequence[str] | None = None, merged_is_delta: bool | None = None,
                 layer_rule: "LayerRule | str | None" = None) -> Tensor:
    """A task-by-task :data:`METRICS` entry over the whole model, ``[T, T]`` (float32, CPU): the heatmap of
    :func:`interference_matrix` aggregated over the layers.

    ``"cosine"`` is the cosine of the task vectors over the matrix layers, each task's matrices flattened into one
    vector (Ilharco et al. 2023 take every parameter; the vectors and norms outside the matrices are left out here):
    ``sum_l <Delta_i^l, Delta_j^l> / sqrt(sum_l |Delta_i^l|^2 sum_l |Delta_j^l|^2)``, so a layer counts by its size
    and norm. Every other ``"TxT"`` metric is the mean of its per-layer matrices, each layer weighted equally, as
    Iso's ``SAR_avg`` (sec. 3.3): ``model_matrix(pool, "sar")`` is :func:`sar_avg` with ``pairwise=True``. A cell
    takes the layers both its experts changed (on a layer one left as the base, its similarities are 0/0; counted as
    0 they read as misalignment), and is NaN where there is none (an expert equal to the base on every layer, whose
    cosine is NaN too); a NaN of ``"xi"`` on a layer both changed makes the cell NaN. ``"TxK"`` metrics (``"svc"``,
    ``"sai"``) index the merged subspaces of one layer, which have no counterpart across layers, and are refused.
    Layers, ``merged`` and ``k``: as in :func:`sar_avg` and :func:`interference_matrix` (``k`` is each layer's, e.g.
    the subspace dimension).

    Example:
        >>> base = {"w": torch.zeros(2, 2), "v": torch.zeros(4, 4)}
        >>> a = {"w": torch.eye(2), "v": torch.zeros(4, 4)}
        >>> b = {"w": torch.eye(2), "v": torch.eye(4)}
        >>> pool = TaskPool(base, {"a": a, "b": b})
        >>> model_matrix(pool, "cosine").tolist()   # <a, b> = 2, |a|^2 = 2, |b|^2 = 6: 2 / sqrt(12)
        [[1.0, 0.5773502588272095], [0.5773502588272095, 1.0]]
    """
    _require_pool(pool)
    _check_metric(metric)
    if METRICS[metric].shape != "TxT":
        raise DiagnosticsError(f"'{metric}' is per merged subspace of one layer, which have no counterpart across "
                               f"layers; the model-level metrics are "
                               f"{[m for m, v in METRICS.items() if v.shape == 'TxT']}")
    given, keys = keys, _matrix_keys(pool, keys, layer_rule)
    if not keys:
        raise _nothing_changed(pool, f"model_matrix '{metric}'", given, layer_rule)
    delta_of = _resolve_merged_mapping(pool, merged, keys, merged_is_delta)
    k = _check_k(metric, k, keys[0])
    if metric == "cosine":
        gram = torch.zeros(len(pool.names), len(pool.names), dtype=torch.float64)
        for layer_gram in _per_layer(pool, lambda layer: _task_gram(layer).cpu(), keys):
            gram += layer_gram   # <Delta_i, Delta_j> of one layer, float64
        norms = gram.diagonal().clamp_min(0).sqrt()   # 0 for an expert equal to the base: its row is NaN
        return (gram / norms[:, None] / norms[None, :]).clamp(-1.0, 1.0).float()
    per_layer = _per_layer(pool, lambda layer: (
        interference_matrix(pool, layer.key, metric, delta_of(layer.key), k), unchanged_tasks(layer)), keys)
    return _mean_over_layers(*zip(*per_layer))


def layer_curves(pool: TaskPool, merged: "Mapping[str, Tensor] | None" = None, keys: Sequence[str] | None = None,
                 *, merged_is_delta: bool | None = None, layer_rule: "LayerRule | str | None" = None,
                 curves: Sequence[str] | None = None, normalized_entropy: bool = False, eps: float = 0.05,
                 k_rule: str = "official", progress: Callable[[float, str], None] | None = None) -> dict[str, list]:
    """Per-layer diagnostics across the model, for line plots (TSV Fig. 6/14, Iso Fig. 13, Ortho-Merge sec. 3.2).

    Args:
        pool: the task pool.
        merged: the merged model as a full state dict *or* as per-key merged deltas (``merged - base``), or
            ``None`` for the Task Arithmetic sum. Which one is detected by comparing its distance to the base and to
            zero, unless ``merged_is_delta`` says so. Scale-dependent curves (``energy``, ``svc_gamma_mean``) see
            whatever scale is passed (a merged state includes alpha).
        keys: layers to include; default: every matrix the ``layer_rule`` selects (TSV/Iso default: all 2-D
            tensors except ``text_projection``) that an expert changed, in state-dict order.
        curves: which of :data:`CURVES` to compute (default: all).
        normalized_entropy: divide spectral entropies by ``log r`` (see :func:`spectral_entropy`).
        eps, k_rule: the threshold and rule of ``k_M`` (:func:`effective_rank`; the official code's by default).
        progress: optional ``(fraction, message)`` callback.

    Returns:
        ``{"key": [...], "block": [int | None, ...], <curve>: [float, ...], ...}``, one entry per layer; ``block`` is
        the transformer block index (for grouping layers as in TSV Fig. 6). A curve's mean or minimum over the tasks
        (or their pairs) takes the tasks whose experts changed the layer: another's SAR, similarity and cosine there
        are 0/0 (a frozen block), and NaN where none is left.

    Example:
        >>> base = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
        >>> experts = {"a": {"w": torch.eye(3), "b": torch.ones(3)}, "c": {"w": -torch.eye(3), "b": torch.ones(3)}}
        >>> out = layer_curves(TaskPool(base, experts), curves=["cosine_mean", "energy"])
        >>> out["key"], out["cosine_mean"], out["energy"]
        (['w'], [-1.0], [0.0])
    """
    keys = _matrix_keys(pool, keys, layer_rule)
    normalized_entropy = _check_flag("layer_curves", normalized_entropy, "normalized_entropy")
    if isinstance(curves, str):   # one curve's name, not its letters
        curves = [curves]
    check_progress(progress, "layer_curves")
    if curves is not None and (not isinstance(curves, (Sequence, set, frozenset))
                               or not all(isinstance(c, str) for c in curves)):
        raise DiagnosticsError(f"curves must be a curve's name or a list of them (of {list(CURVES)}), or None; got "
                               f"{brief(curves)}")
    names = list(CURVES) if curves is None else list(dict.fromkeys(curves))   # a curve named twice is one curve
    unknown = sorted(map(str, set(names) - set(CURVES)))
    if unknown:
        raise DiagnosticsError(f"unknown curve(s) {unknown}; available: {list(CURVES)}")
    delta_of = _resolve_merged_mapping(pool, merged, keys, merged_is_delta)

    def row(key: str) -> list[float]:
        layer = pool.layer(key)
        mdelta = delta_of(key)
        T = layer.num_tasks
        # the means and pairs take the tasks whose experts changed this layer (unchanged_tasks); NaN if none is left
        live = ~unchanged_tasks(layer)
        off = ~torch.eye(T, dtype=torch.bool) & live[:, None] & live[None, :]
        nan = float("nan")
        values = []
        for name in names:
            if name == "sti":
                v = sti(layer)
            elif name == "task_entropy":
                v = float(spectral_entropy(task_spectra(layer), normalized_entropy).cpu()[live].mean())
            elif name == "merged_entropy":
                v = float(spectral_entropy(_merged_stats(layer, mdelta).S, normalized_entropy))
            elif name in ("sar_mean", "sar_min"):
                sar = sar_to_merged(layer, mdelta, eps=eps, k_rule=k_rule).cpu()[live]
                v = nan if not len(sar) else float(sar.mean() if name == "sar_mean" else sar.min())
            elif name == "k_merged_frac":   # as SAR uses it
                v = (_default_k_merged(layer, mdelta, None, "layer_curves", eps, k_rule)
                     / _merged_stats(layer, mdelta).S.numel())
            elif name == "energy":
                total = float(_merged_stats(layer, mdelta).task_norm2.double().sum())
                v = float(_merged_stats(layer, mdelta).S.double().pow(2).sum()) / total if total > 0 else 0.0
            elif name == "cosine_mean":
                v = float(task_cosine(layer).cpu()[off].mean()) if off.any() else nan
            elif name == "subspace_sim_mean":
                v = float(subspace_similarity(layer, 5).cpu()[off].mean()) if off.any() else nan
            else:  # svc_gamma_mean
                # (a zero merge: gamma = 1 / alpha along any direction, s being 0)
                k = max(1, _default_k_merged(layer, mdelta, None, "layer_curves", eps, k_rule))
                v = float(svc_coefficients(layer, mdelta, rank=k)[1].mean())
            values.append(float(v))
        return values

    def done(count: int, total: int) -> None:
        progress(count / total, f"diagnostics: {keys[count - 1]}")

    if progress is not None and keys:
        progress(0.0, f"diagnostics: {keys[0]}")
    # layers on the merge's worker threads (studio.parallel; the pool's caches are thread-safe), as a merge's: one
    # worker, on the caller's intra-op threads, gives the same numbers to float32 rounding (2e-7 on MiniSuite). On
    # CUDA too (host_bound: the per-task top-k eigensolves run on the host): the smoke test's curves of 4 MiniSuite
    # experts took 1.48 s on one thread with cuSOLVER and 1.03 s so on the H200 (tools/device_smoke.py, 2026-12-04)
    rows = parallel_map(row, keys, device=pool.device, on_done=None if progress is None else done, host_bound=True)
    blocks = [_BLOCK.search(key) for key in keys]
    out: dict[str, list] = {"key": list(keys), "block": [int(b.group(1)) if b else None for b in blocks]}
    for j, name in enumerate(names):
        out[name] = [values[j] for values in rows]
    if progress is not None:
        progress(1.0, "diagnostics: done")
    return out


def task_curves(pool: TaskPool, merged: "Mapping[str, Tensor] | None" = None, keys: Sequence[str] | None = None, *,
                merged_is_delta: bool | None = None, layer_rule: "LayerRule | str | None" = None,
                normalized_entropy: bool = False, eps: float = 0.05, k_rule: str = "official") -> dict[str, Any]:
    """Each task's own per-layer values, for a line per task (the app's entropy and SAR plots): the spectral entropy
    of its task matrix (Ortho-Merge eq. 9) and its SAR to the merged delta at ``k_M`` (Iso eq. 5), NaN on a layer
    its expert left as the base (:func:`unchanged_tasks`: 0/0 there). :func:`layer_curves` gives their means over
    the tasks (and SAR's minimum); the arguments are its own (``merged=None``: the Task Arithmetic sum).

    The layers run on the merge's worker threads, as :func:`layer_curves`' do: every task's full spectrum of every
    layer is computed here the first time (:func:`task_spectra`, memoised), 17-22 s of one core's time for 8
    ViT-B/32-sized experts (docs/PERFORMANCE.md).

    Returns:
        ``{"key": [...], "entropy": {task: [float, ...]}, "sar": {task: [float, ...]}}``, one value per layer of
        ``keys`` (default: as :func:`layer_curves`), the tasks in the pool's order.

    Example:
        >>> base = {"w": torch.zeros(2, 2), "v": torch.zeros(2, 2)}
        >>> e = torch.diag(torch.tensor([1.0, 0.0]))   # rank 1: entropy 0, and all of it in the sum's direction
        >>> experts = {"a": {"w": e, "v": torch.zeros(2, 2)}, "b": {"w": e, "v": torch.eye(2)}}
        >>> out = task_curves(TaskPool(base, experts), keys=["w", "v"], normalized_entropy=True)
        >>> out["entropy"], out["sar"]   # a left v as the base: nothing to measure there
        ({'a': [0.0, nan], 'b': [0.0, 1.0]}, {'a': [1.0, nan], 'b': [1.0, 0.7071067690849304]})
    """
    keys = _matrix_keys(pool, keys, layer_rule)
    normalized_entropy = _check_flag("task_curves", normalized_entropy, "normalized_entropy")
    delta_of = _resolve_merged_mapping(pool, merged, keys, merged_is_delta)

    def row(layer: LayerTasks) -> tuple[list[float], list[float]]:
        quiet = unchanged_tasks(layer)
        entropy = spectral_entropy(task_spectra(layer), normalized_entropy).cpu().double().masked_fill(quiet, math.nan)
        sar = sar_to_merged(layer, delta_of(layer.key), eps=eps, k_rule=k_rule).cpu().double()
        return entropy.tolist(), sar.masked_fill(quiet, math.nan).tolist()

    rows = _per_layer(pool, row, keys)
    return {"key": list(keys),
            "entropy": {n: [r[0][t] for r in rows] for t, n in enumerate(pool.names)},
            "sar": {n: [r[1][t] for r in rows] for t, n in enumerate(pool.names)}}


def interference_matrix(pool: TaskPool, key: str, metric: str, merged: "Tensor | Mapping[str, Tensor] | None" = None,
                        k: int | None = None, *, merged_is_delta: bool | None = None,
                        weights: Tensor | None = None) -> Tensor:
    """The app's heatmap: one :data:`METRICS` entry evaluated on layer ``key``, as a float32 CPU tensor.

    ``"TxT"`` metrics return ``[T, T]`` (row = task i, column = task j); ``"TxK"`` metrics (``"svc"``, ``"sai"``)
    return ``[T, k]`` (row = task, column = merged singular subspace, largest first), see ``METRICS[m].shape``.
    ``merged``: ``None`` (Task Arithmetic sum), this layer's merged delta, or a whole merged state dict / delta dict
    (detected as in :func:`layer_curves`). ``k``: see ``METRICS[metric].k_help``. ``weights``: optional per-task
    scaling of the task matrices (``pool.layer(key, weights)``).

    Example:
        >>> base = {"w": torch.zeros(3, 3)}
        >>> experts = {"a": {"w": torch.eye(3)}, "b": {"w": torch.eye(3)}}
        >>> interference_matrix(TaskPool(base, experts), "w", "cosine").tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    _require_pool(pool)
    _check_metric(metric)
    if not isinstance(key, str) or key not in pool.base:
        raise DiagnosticsError(f"unknown key {brief(key)}; the pool has {len(pool.base)} keys, e.g. {pool.keys[:3]}")
    shape = tuple(pool.base[key].shape)
    if len(shape) != 2 or min(shape) < 1:
        raise DiagnosticsError(f"key '{key}' has shape {shape}; the '{metric}' heatmap needs a 2-D matrix layer")
    _require_weights(pool, key)
    layer = pool.layer(key, weights)
    if isinstance(merged, Mapping):
        merged = _resolve_merged_mapping(pool, merged, [key], merged_is_delta)(key)
    if not METRICS[metric].uses_merged:
        _check_merged(layer, merged)   # all the same: a metric of the tasks alone never hides a bad argument
    k = _check_k(metric, k, key)
    return METRICS[metric].fn(layer, merged, k).detach().to("cpu", torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The whole-model report (the CLI's ``diagnose`` and the app's report)
# --------------------------------------------------------------------------------------------------------------

#: What :func:`report` writes under ``sar_avg_help``.
SAR_AVG_HELP = {
    "sar_avg": "Iso's SAR_avg (sec. 3.3, Fig. 3a) per task: its SAR to the merged delta at k_M (eq. 5, the "
               "official code's effective-rank rule, eps 0.05) averaged over the matrix layers its expert changed; "
               "null for an expert equal to the base on every one ('unchanged_experts')",
    "sar_avg_pairwise": "SAR_avg(Delta_i, Delta_j; k_TA) (Fig. 3b), row i's task in the subspace of column j's, "
                        "averaged over the layers both experts changed; the same as model_matrices['sar']",
}


def report(pool: TaskPool, merged: "Mapping[str, Tensor] | None" = None, *, merged_is_delta: bool | None = None,
           layer_rule: "LayerRule | str | None" = None, curves: Sequence[str] | None = None,
           progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Every whole-model diagnostic of a merge, as one JSON-ready dict (NaN where a value is undefined; write it
    through :func:`studio.schema.json_safe`): what ``merge-studio diagnose --out`` writes (with the merge it describes)
    and the app's "Whole-model report".

    ``tasks`` (the pool's order, which every list and matrix follows); ``layers``: :func:`layer_curves` (``curves``
    picks some, default all) with ``curve_help``; ``sar_avg``: Iso's SAR_avg of each task to the merge
    (:func:`sar_avg`) and ``sar_avg_pairwise`` between tasks (Fig. 3b), with ``sar_avg_help``; ``model_matrices``:
    every task-by-task heatmap over the model (:func:`model_matrix`; those of the merge take ``merged``) with
    ``model_matrix_help``; ``unchanged_experts``: those equal to the base on every matrix layer diagnosed (their
    SAR_avg is NaN). ``merged``, ``merged_is_delta``, ``layer_rule`` and ``progress`` (an optional ``(fraction,
    message)`` callback) as in :func:`layer_curves` (``merged=None``: the Task Arithmetic sum).

    Example:
        >>> base = {"w": torch.zeros(3, 3)}
        >>> experts = {"a": {"w": torch.eye(3)}, "b": {"w": -torch.eye(3)}}
        >>> r = report(TaskPool(base, experts), curves=["cosine_mean"])
        >>> r["tasks"], r["layers"]["cosine_mean"], r["model_matrices"]["cosine"]
        (['a', 'b'], [-1.0], [[1.0, -1.0], [-1.0, 1.0]])
    """
    _require_pool(pool)
    check_progress(progress, "report")
    tasks = list(pool.names)
    square = [m for m, spec in METRICS.items() if spec.shape == "TxT"]
    # the per-layer curves take most of the time: 70 % of the progress, then a step per model matrix
    layers = layer_curves(pool, merged, layer_rule=layer_rule, curves=curves, merged_is_delta=merged_is_delta,
                          progress=None if progress is None else lambda f, msg: progress(0.7 * f, msg))
    sar = sar_avg(pool, merged, layer_rule=layer_rule, merged_is_delta=merged_is_delta)
    pairwise = sar_avg(pool, pairwise=True, layer_rule=layer_rule)
    # every task-by-task heatmap over the whole model (rows and columns in the order of "tasks")
    matrices = {}
    for i, m in enumerate(square):
        if progress is not None:
            progress(0.7 + 0.3 * i / len(square), f"diagnostics: {m} over the model")
        matrices[m] = model_matrix(pool, m, merged if METRICS[m].uses_merged else None, layer_rule=layer_rule,
                                   merged_is_delta=merged_is_delta).tolist()
    if progress is not None:
        progress(1.0, "diagnostics: done")
    return {"tasks": tasks, "curve_help": {c: CURVES[c] for c in layers if c in CURVES}, "layers": layers,
            "sar_avg": dict(zip(tasks, sar.tolist())), "sar_avg_pairwise": pairwise.tolist(),
            "sar_avg_help": SAR_AVG_HELP, "model_matrices": matrices,
            "model_matrix_help": {m: f"{METRICS[m].description} Over the layers: "
                                     f"{'the whole task vectors' if m == 'cosine' else 'the mean'}; its k per layer: "
                                     f"{METRICS[m].k_help}." for m in matrices},
            # an expert equal to the base on every matrix layer has no direction to measure: its SAR_avg is NaN
            "unchanged_experts": [t for t, v in zip(tasks, sar.tolist()) if v != v]}


def report_summary(rep: Mapping[str, Any]) -> list[str]:
    """A :func:`report` in a few lines of text: each task's SAR_avg to the merge, each curve's mean over the layers,
    the layers whose worst task keeps least of itself (``sar_min``, when computed) and the most aligned task
    vectors (the whole model's cosine). What ``diagnose`` prints and the app shows under its report.

    Example:
        >>> base = {"w": torch.zeros(3, 3)}
        >>> experts = {"a": {"w": torch.eye(3)}, "b": {"w": torch.eye(3) + 1}}   # cosine 6 / sqrt(3 * 18)
        >>> print("\\n".join(report_summary(report(TaskPool(base, experts), curves=["cosine_mean"]))))
        SAR_avg to the merge (Iso sec. 3.3), per task: a 0.816, b 0.972
        mean over layers: cosine_mean 0.8165
        task-vector cosine over the model's matrix layers: most aligned b/a 0.816; mean of the 1 pair 0.816
    """
    if not isinstance(rep, Mapping) or not {"layers", "tasks", "sar_avg", "model_matrices"} <= set(rep):
        raise DiagnosticsError(f"report_summary takes the dict diagnostics.report returns (its 'layers', 'tasks', "
                               f"'sar_avg' and 'model_matrices'), got {brief(rep)}")
    layers, tasks = rep["layers"], list(rep["tasks"])
    lines = ["SAR_avg to the merge (Iso sec. 3.3), per task: "
             + ", ".join(f"{t} {'n/a' if v != v else f'{v:.3f}'}" for t, v in rep["sar_avg"].items())]
    means = {c: [v for v in layers[c] if v == v] for c in layers if c in CURVES}
    lines.append("mean over layers: " + ", ".join(f"{c} {sum(v) / len(v):.4g}" for c, v in means.items() if v))
    if "sar_min" in layers:
        worst = sorted((v, key) for v, key in zip(layers["sar_min"], layers["key"]) if v == v)[:3]
        if worst:
            lines.append("lowest worst-task SAR: " + ", ".join(f"{key} {v:.3f}" for v, key in worst))
    cosine = rep["model_matrices"]["cosine"]
    pairs = sorted(((cosine[i][j], tasks[i], tasks[j]) for i in range(len(tasks)) for j in range(i)
                    if cosine[i][j] == cosine[i][j]), reverse=True)
    if pairs:
        mean = sum(v for v, _, _ in pairs) / len(pairs)
        lines.append("task-vector cosine over the model's matrix layers: most aligned "
                     + ", ".join(f"{a}/{b} {v:.3f}" for v, a, b in pairs[:3])
                     + f"; mean of the {len(pairs)} pair{'s' * (len(pairs) != 1)} {mean:.3f}")
    return lines
