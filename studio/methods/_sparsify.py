"""Shared building blocks of the sparsifying baselines: sparsify -> optional sign consensus -> aggregate.

TIES, DARE and Model Breadcrumbs are configured instances of one *generalized task arithmetic* pipeline (the
decomposition mergekit's ``generalized_task_arithmetic.py`` + ``sparsify.py`` use):

1. **sparsify** each task vector on its own: keep the top-``k`` magnitudes (TIES), drop entries at random and
   rescale the survivors (DARE), or keep a magnitude band without the outliers (Breadcrumbs);
2. optionally **elect a sign** per parameter and keep only the entries that agree with it (TIES);
3. **aggregate** over tasks (a sum, as Task Arithmetic, or a mean).

Every function here is pure: stacked task tensors ``[T, *shape]`` in (task axis first), tensors out; no devices
are chosen here (results live where the inputs live) and nothing is cached. Methods live in ``ties.py``,
``dare.py`` and ``breadcrumbs.py`` and only say which pieces they use.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..schema import HyperparameterError

__all__ = [
    "topk_rank", "topk_threshold", "kth_smallest", "magnitude_mask", "random_drop", "band_mask", "elect_sign",
    "disjoint_merge", "generalized_task_arithmetic",
]


def topk_rank(numel: int, density: float) -> int:
    """1-based rank (ascending magnitude) of the TIES trim threshold; ``0`` means "keep everything".

    The official TIES code (``topk_values_mask`` in ``prateeky2806/ties-merging/src/utils/merge_utils.py``, also
    used by FusionBench and the TSV/Iso code bases) computes ``k = d - int(d * K)`` and keeps every entry whose
    magnitude is ``>=`` the k-th smallest, i.e. ``int(d * K) + 1`` entries when magnitudes are distinct. We follow
    that rule exactly. For ``K = 1`` the official code would call ``kthvalue(0)`` and fail; we keep everything.

    Example:
        >>> topk_rank(10, 0.2), topk_rank(10, 1.0)
        (8, 0)
    """
    return numel - int(numel * density)


def topk_threshold(magnitudes: Tensor, density: float) -> Tensor:
    """The TIES trim threshold of each row of ``magnitudes`` (``[..., d]``, non-negative): keep ``|x| >= t``.

    ``t`` is the :func:`topk_rank`-th smallest magnitude of the row (``torch.kthvalue``, exact); ``0`` (keep
    everything) when the rank is 0. Returns ``[..., 1]``.

    Example:
        >>> topk_threshold(torch.tensor([[0.1, 3.0, 2.0, 0.5, 1.0]]), 0.4).tolist()   # rank 5 - int(2.0) = 3
        [[1.0]]
    """
    rank = topk_rank(magnitudes.shape[-1], density)
    if rank <= 0:
        return magnitudes.new_zeros(*magnitudes.shape[:-1], 1)
    return magnitudes.kthvalue(rank, dim=-1, keepdim=True).values


def kth_smallest(values: Tensor, rank: int, *, chunk: int = 1 << 24) -> Tensor:
    """Exact ``rank``-th smallest (1-based) entry of a 1-D tensor of non-negative float32 values.

    Same value as ``values.kthvalue(rank)``, with far less memory on model-sized vectors: CPU ``kthvalue`` copies
    its input and allocates int64 indices (16 bytes per entry on top of the vector), while this needs only
    ``chunk``-sized temporaries. Non-negative float32 values order like their int32 bit patterns, so one histogram
    of the top 16 bits (read ``chunk`` entries at a time) finds the bucket holding the answer, and ``kthvalue``
    runs on that bucket's entries only (typically well under 1% of them).

    Example:
        >>> kth_smallest(torch.tensor([5.0, 0.0, 2.0, 2.0, 9.0]), 3), kth_smallest(torch.tensor([5.0, 0.0, 2.0]), 3)
        (tensor(2.), tensor(5.))
    """
    n = values.numel()
    if not 1 <= rank <= n:
        raise ValueError(f"rank must be in [1, {n}], got {rank}")
    bits = values.reshape(-1).view(torch.int32)
    parts = [bits[i:i + chunk] for i in range(0, n, chunk)]
    counts = sum(torch.bincount(part >> 16, minlength=1 << 15) for part in parts)
    cum = counts.cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor([rank], device=cum.device)))
    below = int(cum[bucket - 1]) if bucket > 0 else 0
    inside = torch.cat([part[(part >> 16) == bucket] for part in parts]).view(torch.float32)
    return inside.kthvalue(rank - below).values


def magnitude_mask(x: Tensor, density: float) -> Tensor:
    """TIES Alg. 1 step 1 ("trim") for each task separately: keep the top-``density`` magnitudes of ``x[i]``.

    ``x`` is ``[T, *shape]``; the ranking runs over all entries of one task (one row). Returns a bool mask of the
    same shape. The threshold rule is the official code's (see :func:`topk_rank`).

    Example:
        >>> x = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
        >>> magnitude_mask(x, 0.4).int().tolist()   # int(5*0.4)+1 = 3 largest magnitudes
        [[0, 1, 1, 0, 1]]
    """
    flat = x.reshape(x.shape[0], -1).abs()
    return (flat >= topk_threshold(flat, density)).reshape(x.shape)


def random_drop(x: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE (Yu et al., ICML 2024, Sec. 3): drop each entry with probability ``p``, rescale survivors by ``1/(1-p)``.

    ``E[random_drop(x)] = x`` entry-wise. Draws from ``generator`` (which must live on ``x.device``) so that a
    seed fixes the result; one draw covers all tasks. As in the paper, FusionBench (``param_random_drop_``) and
    mergekit (``bernoulli``), the mask is i.i.d. Bernoulli per entry, not an exact count.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> y = random_drop(torch.ones(2, 1000), 0.8, g)
        >>> sorted(set(y.flatten().tolist())), round(float(y.mean()), 1)
        ([0.0, 5.0], 1.0)
    """
    keep = torch.rand(x.shape, generator=generator, device=x.device) >= p
    return x * keep / (1.0 - p)


def band_mask(x: Tensor, beta: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2023, Sec. 3): per task, mask the top-``beta`` fraction of magnitudes
    (outliers) and the bottom-``gamma`` fraction (negligible perturbations); keep the band in between.

    Counts are exact: ``int(beta * d)`` largest and ``int(gamma * d)`` smallest entries of each task are masked
    (ties broken by position, so the mask is deterministic). ``x`` is ``[T, *shape]``, the ranking runs over each
    task's entries of this one layer, as in the paper.

    Example:
        >>> x = torch.tensor([[1.0, -10.0, 3.0, 0.2, -5.0, 7.0, 0.5, 2.0, -4.0, 6.0]])
        >>> band_mask(x, beta=0.1, gamma=0.3).int().tolist()   # drops |10| and 0.2, 0.5, 1
        [[0, 0, 1, 0, 1, 1, 0, 1, 1, 1]]
    """
    if beta < 0 or gamma < 0 or beta + gamma >= 1:
        raise HyperparameterError(
            f"beta={beta!r} (top fraction masked) and gamma={gamma!r} (bottom fraction masked) must be >= 0 and "
            f"sum to less than 1, so that some entries are kept"
        )
    flat = x.reshape(x.shape[0], -1).abs()
    d = flat.shape[1]
    n_top, n_bottom = int(beta * d), int(gamma * d)
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_bottom > 0:
        keep &= _rank_at_least(flat, n_bottom)
    if n_top > 0:
        keep &= ~_rank_at_least(flat, d - n_top)
    return keep.reshape(x.shape)


def _rank_at_least(flat: Tensor, r: int) -> Tensor:
    """Entries of each row whose ascending rank (magnitude, then position) is ``>= r``, for ``0 < r < d``.

    Same result as ranking by a stable ``argsort`` but in O(d): one ``kthvalue`` finds the value ``v`` at rank
    ``r``; entries above ``v`` qualify, entries equal to ``v`` qualify from the ``(r - #{< v})``-th one on.
    """
    v = flat.kthvalue(r + 1, dim=1, keepdim=True).values
    at_least = flat >= v
    surplus = r - (flat.shape[1] - at_least.sum(1, keepdim=True))  # entries equal to v that still rank below r
    if not bool((surplus > 0).any()):  # the usual case for real-valued deltas: no tie straddles rank r
        return at_least
    tie = flat == v
    return at_least & ~(tie & (tie.cumsum(1) <= surplus))


def elect_sign(x: Tensor) -> Tensor:
    """TIES Alg. 1 step 2 ("elect"): the sign of the summed (trimmed) task values, ``sgn(sum_i x_i)``.

    Parameters whose sum is exactly 0 get the majority of the elected signs, as the official code's
    ``resolve_zero_signs(sign, "majority")`` does (mergekit instead picks +1). The official code takes that
    majority over the whole flattened model; here it is taken over the tensor at hand. The two differ only where
    the surviving values cancel exactly; where every task was trimmed the merged value is 0 either way.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 2.0, -3.0], [1.0, -3.0, -2.0, -1.0]])
        >>> elect_sign(x).tolist()   # column 2 sums to 0 -> majority of (+1, -1, -1) = -1
        [1.0, -1.0, -1.0, -1.0]
    """
    sign = torch.sign(x.sum(0))
    majority = torch.sign(sign.sum())
    return torch.where(sign == 0, majority, sign)


def disjoint_merge(x: Tensor, sign: Tensor, aggregate: str = "mean") -> Tensor:
    """TIES Alg. 1 step 3 ("disjoint merge"): aggregate only the entries whose sign agrees with the elected one.

    ``aggregate="mean"`` divides by the number of agreeing non-zero entries (the paper's disjoint mean,
    ``dis-mean`` in the official code); ``"sum"`` is the official ``dis-sum`` used by the CLIP ViT benchmarks.

    Example:
        >>> x = torch.tensor([[2.0, 1.0], [4.0, -3.0], [-1.0, 0.0]])
        >>> s = elect_sign(x)
        >>> disjoint_merge(x, s, "mean").tolist(), disjoint_merge(x, s, "sum").tolist()
        ([3.0, -3.0], [6.0, -3.0])
    """
    agree = torch.where(sign > 0, x > 0, x < 0)
    selected = x * agree
    total = selected.sum(0)
    if aggregate == "sum":
        return total
    if aggregate == "mean":
        return total / agree.sum(0).clamp(min=1).to(x.dtype)
    raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")


def generalized_task_arithmetic(deltas: Tensor, sparsify: Callable[[Tensor], Tensor] | None = None, *,
                                consensus: bool = False, aggregate: str = "sum") -> Tensor:
    """The shared pipeline: ``sparsify`` each task vector, optionally keep the sign-consensus entries, aggregate.

    ``deltas`` is ``[T, *shape]``; ``sparsify`` maps it to a sparsified tensor of the same shape (or ``None``).
    With ``consensus`` the aggregation is :func:`disjoint_merge` after :func:`elect_sign`; without it a plain
    ``sum`` (Task Arithmetic) or ``mean`` over tasks.

    Example:
        >>> d = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
        >>> generalized_task_arithmetic(d).tolist()
        [4.0, 1.0]
        >>> generalized_task_arithmetic(d, consensus=True, aggregate="sum").tolist()
        [4.0, 2.0]
    """
    x = deltas if sparsify is None else sparsify(deltas)
    if consensus:
        return disjoint_merge(x, elect_sign(x), aggregate)
    if aggregate == "sum":
        return x.sum(0)
    if aggregate == "mean":
        return x.mean(0)
    raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")
