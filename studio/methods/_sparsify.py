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

import math
from typing import Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ..schema import HyperparameterError

__all__ = [
    "topk_rank", "topk_threshold", "kth_smallest", "order_statistics", "streamed_order_statistics", "band_blocks",
    "magnitude_mask", "random_drop", "band_counts", "band_mask", "row_band_mask", "elect_sign", "disjoint_merge",
    "generalized_task_arithmetic", "ties_blocks", "restore_cancelled",
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


def kth_smallest(values: Tensor, rank: int, *, chunk: int = 1 << 18, overwrite: bool = False) -> Tensor:
    """Exact ``rank``-th smallest (1-based) entry of a 1-D tensor of non-negative float32 values.

    Same value as ``values.kthvalue(rank)``, with far less time and memory on model-sized vectors (CPU
    ``kthvalue`` copies its input and allocates int64 indices, 16 bytes per entry): :func:`order_statistics`.
    ``overwrite=True`` lets a CPU tensor be reordered in place instead of copied.

    Example:
        >>> kth_smallest(torch.tensor([5.0, 0.0, 2.0, 2.0, 9.0]), 3), kth_smallest(torch.tensor([5.0, 0.0, 2.0]), 3)
        (tensor(2.), tensor(5.))
    """
    values_, _ = order_statistics(values, [rank], chunk=chunk, need_below=False, overwrite=overwrite)
    return values_[0]


def order_statistics(values: Tensor, ranks: list[int], *, chunk: int = 1 << 18, need_below: bool = True,
                     overwrite: bool = False) -> tuple[Tensor, list[int]]:
    """The ``ranks``-th smallest (1-based) entries of a 1-D tensor of non-negative float32 values, and for each the
    number of entries strictly smaller (``[]`` if not ``need_below``).

    On the CPU: NumPy's in-place introselect (``ndarray.partition``, linear time, releases the GIL), smallest rank
    first, each next one within the entries above the last (~2 ns per entry, against ~8 for two counting passes
    of :func:`streamed_order_statistics` and ~20 for ``torch.kthvalue``); on a copy unless ``overwrite``. Elsewhere
    :func:`streamed_order_statistics` over ``chunk``-sized slices.

    Example:
        >>> v, below = order_statistics(torch.tensor([5.0, 0.0, 2.0, 2.0, 9.0]), [1, 4, 5])
        >>> v.tolist(), below
        ([0.0, 5.0, 9.0], [0, 3, 4])
    """
    flat = values.reshape(-1)
    n = flat.numel()
    for rank in ranks:
        if not 1 <= rank <= n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
    if flat.device.type != "cpu":
        out, below = streamed_order_statistics(lambda: (flat[i:i + chunk] for i in range(0, n, chunk)), ranks)
        return out, below if need_below else []
    work = flat.numpy() if overwrite else flat.numpy().copy()
    found: dict[int, tuple[float, int]] = {}
    done = 0   # entries [0, done) are already <= every later rank's value
    for rank in sorted(set(ranks)):
        work[done:].partition(rank - 1 - done)   # entries [0, rank - 1) are now <= the rank-th, at rank - 1
        v = work[rank - 1]
        found[rank] = (float(v), (rank - 1) - int(np.count_nonzero(work[:rank - 1] == v)) if need_below else 0)
        done = rank
    out = torch.tensor([found[r][0] for r in ranks], dtype=values.dtype)
    return out, [found[r][1] for r in ranks] if need_below else []


def streamed_order_statistics(chunks: Callable[[], Iterable[Tensor]], ranks: list[int]) -> tuple[Tensor, list[int]]:
    """Exact order statistics of non-negative float32 values that arrive in pieces, and for each the number of
    values strictly smaller: ``chunks()`` yields 1-D float32 tensors (buffers may be reused between pieces) and is
    called twice.

    Non-negative float32 values order like their int32 bit patterns. The first pass counts the top 16 bits
    (``bincount``), which picks the bucket holding each rank; the second counts the low 16 bits of the entries in
    those buckets (entries outside are clamped into two overflow bins), which gives the exact bit pattern. Only
    integer counting, no sort, no gather and no ``[d]``-sized temporary: the values can be computed piece by piece
    (TIES's model-wide threshold never holds a model-sized vector) and the work splits over threads without
    contending for memory.

    Example:
        >>> pieces = [torch.tensor([5.0, 0.0]), torch.tensor([2.0, 2.0, 9.0])]
        >>> v, below = streamed_order_statistics(lambda: iter(pieces), [3, 5])
        >>> v.tolist(), below
        ([2.0, 9.0], [1, 4])
    """
    high = None
    n = 0
    for part in chunks():
        bits = part.view(torch.int32)
        counts = torch.bincount(torch.bitwise_right_shift(bits, 16), minlength=1 << 15)
        high = counts if high is None else high.add_(counts)
        n += part.numel()
    for rank in ranks:
        if not 1 <= rank <= n:
            raise ValueError(f"rank must be in [1, {n}], got {rank}")
    if not ranks:
        return torch.empty(0, dtype=torch.float32), []
    cum = high.cumsum(0)
    buckets = sorted(set(torch.searchsorted(cum, torch.tensor(ranks, device=cum.device)).tolist()))
    low = {b: None for b in buckets}
    for part in chunks():
        bits = part.view(torch.int32)
        shifted = torch.empty_like(bits)
        for b in buckets:  # bin 0: below the bucket; 1 + low bits inside it; 1 + 65536: above it
            torch.sub(bits, (b << 16) - 1, out=shifted).clamp_(0, (1 << 16) + 1)
            counts = torch.bincount(shifted, minlength=(1 << 16) + 2)
            low[b] = counts if low[b] is None else low[b].add_(counts)
    out, below = [], []
    for rank in ranks:
        b = int(torch.searchsorted(cum, torch.tensor(rank, device=cum.device)))
        before = int(cum[b - 1]) if b > 0 else 0
        inside = low[b][1:-1].cumsum(0)
        j = int(torch.searchsorted(inside, torch.tensor(rank - before, device=inside.device)))
        out.append(torch.tensor((b << 16) | j, dtype=torch.int32).view(torch.float32))
        below.append(before + (int(inside[j - 1]) if j > 0 else 0))
    return torch.stack(out).to(cum.device), below


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
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    torch.ge(keep, p, out=keep)   # a float 0/1 mask in place: ~8x faster than a boolean one on a CPU (ties_blocks)
    return keep.mul_(x).div_(1.0 - p)   # = x * keep / (1 - p), in the mask's memory


def band_counts(d: int, beta: float, gamma: float) -> tuple[int, int]:
    """How many of ``d`` ranked magnitudes Model Breadcrumbs masks: ``(n_top, n_bottom)``.

    The official code (``TaskVectorMiddleKeep`` in ``rezazzr/breadcrumbs``, remove-first) removes the ``int(d * beta)``
    largest, then keeps the ``int(d * (1 - beta - gamma))`` largest of the rest; everything below is masked, so
    ``n_bottom = d - n_top - n_keep`` (mergekit's ``magnitude_outliers`` counts the same way). ``1 - beta - gamma``
    is rounded to 9 decimals first, so that ``keep`` is the float the official user would have typed (``beta = 0.01,
    gamma = 0.85`` gives ``keep = 0.14``, not ``0.13999999999999999``); the product is truncated as the official
    code truncates it, so ``keep = 0.29`` keeps ``int(100 * 0.29) = 28`` of 100, as there.

    Example:
        >>> band_counts(768, 0.01, 0.85), band_counts(10, 0.1, 0.3), band_counts(5, 0.01, 0.85)
        ((7, 654), (1, 3), (0, 5))
    """
    if beta < 0 or gamma < 0 or beta + gamma >= 1:
        raise HyperparameterError(
            f"breadcrumbs: beta={beta!r} (top fraction masked) and gamma={gamma!r} (bottom fraction masked) must be "
            f">= 0 and sum to less than 1, so that some entries are kept"
            + (f" (with beta={beta!r}, gamma below {1 - beta:.6g}; with gamma={gamma!r}, beta below {1 - gamma:.6g})"
               if 0 <= beta < 1 and 0 <= gamma < 1 else "")
        )
    n_top = int(d * beta)
    n_keep = min(d - n_top, int(d * round(1.0 - beta - gamma, 9)))
    return n_top, d - n_top - n_keep


def band_mask(x: Tensor, beta: float, gamma: float, scope: str = "row") -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky, 2023, Sec. 3): per task, mask the top-``beta`` fraction of magnitudes
    (outliers) and the bottom-``gamma`` fraction (negligible perturbations); keep the band in between.

    ``x`` is ``[T, *shape]``. ``scope="row"`` ranks each row of the last dimension on its own, as the official
    code does (``torch.topk`` along ``tensor.shape[-1]``: each output row of a weight matrix, each innermost row of
    a conv kernel, a 1-D tensor as a whole; 0-d tensors are not masked); ``scope="layer"`` ranks each task's whole
    tensor, as the paper's text ("for each layer") and mergekit. Counts: :func:`band_counts` of the ranked length.
    Ties are broken by position (a stable ascending ranking), so the mask is deterministic; the ranking is
    :func:`row_band_mask`'s and the returned mask is boolean.

    Example:
        >>> x = torch.tensor([[1.0, -10.0, 3.0, 0.2, -5.0, 7.0, 0.5, 2.0, -4.0, 6.0]])
        >>> band_mask(x, beta=0.1, gamma=0.3).int().tolist()   # drops |10| and 0.2, 0.5, 1
        [[0, 0, 1, 0, 1, 1, 0, 1, 1, 1]]
        >>> band_mask(torch.tensor([[[1.0, 5.0, 3.0], [9.0, 8.0, 7.0]]]), 0.0, 0.3).int().tolist()   # per row
        [[[0, 1, 1], [1, 1, 0]]]
    """
    if scope not in ("row", "layer"):
        raise HyperparameterError(f"breadcrumbs: scope must be 'row' or 'layer', got {scope!r}")
    band_counts(1, beta, gamma)   # validates
    if scope == "row":
        if x.dim() < 2:   # 0-d tensors: the official code leaves them unmasked
            return torch.ones_like(x, dtype=torch.bool)
        flat = x.abs().reshape(-1, x.shape[-1])
    else:
        flat = x.reshape(x.shape[0], -1).abs()
    n_top, n_bottom = band_counts(flat.shape[1], beta, gamma)
    return row_band_mask(flat, n_top, n_bottom).bool().reshape(x.shape)


def row_band_mask(mag: Tensor, n_top: int, n_bottom: int, *, numpy: bool | None = None) -> Tensor:
    """Float 0/1 mask of the entries of each row of ``mag`` (``[N, d]``, non-negative) whose ascending rank
    (magnitude, then position) lies in ``[n_bottom, d - n_top)``: :func:`band_mask` with ``scope="row"``, fast.

    The two cut values of every row come from in-place selection (NumPy ``partition`` along the rows, on the CPU;
    ``kthvalue`` elsewhere). An entry equal to a cut value is ranked by position: where such a tie straddles a
    cut (counted per row), only those rows are fixed up, with a running count of the tied entries. ``numpy``
    forces (or, ``False``, avoids) the NumPy route; default: on the CPU.

    Example:
        >>> row_band_mask(torch.tensor([[1.0, 5.0, 3.0, 3.0], [9.0, 8.0, 7.0, 6.0]]), 1, 1).tolist()
        [[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]]
    """
    N, d = mag.shape
    if n_top + n_bottom >= d:
        return torch.zeros_like(mag)
    cuts = [r for r in (n_bottom, d - n_top) if 0 < r < d]
    if not cuts:
        return torch.ones_like(mag)
    if mag.device.type == "cpu" and (numpy is None or numpy):   # NumPy's selection only for CPU tensors
        # one in-place selection per cut, the second within the entries above the first: ~2 ns per entry, where
        # np.partition with a list of kth takes ~13 (it leaves NumPy's SIMD single-kth path)
        work = mag.numpy().copy()
        done, found = 0, []
        for r in cuts:
            work[:, done:].partition(r - done, axis=1)
            found.append(work[:, r].copy())
            done = r + 1
        part = torch.from_numpy(np.stack(found, 1))
    else:
        part = torch.stack([mag.kthvalue(r + 1, dim=1).values for r in cuts], 1)
    # float 0/1 masks written in place (comparisons into booleans are ~8x slower on a CPU, see ties_blocks)
    mask = torch.empty_like(mag)
    if n_bottom > 0:   # keep rank >= n_bottom: entries >= lo, minus the first `extra` of those equal to lo
        lo = part[:, :1]
        torch.ge(mag, lo, out=mask)
        _fix_ties(mask, mag, lo, mask.sum(1) - (d - n_bottom), -1.0)
    else:
        mask.fill_(1.0)
    if n_top > 0:      # keep rank < d - n_top: entries < hi, plus the first `missing` of those equal to hi
        hi = part[:, -1:]
        below = torch.empty_like(mag)
        torch.lt(mag, hi, out=below)
        _fix_ties(below, mag, hi, (d - n_top) - below.sum(1), 1.0)
        mask.mul_(below)
    return mask


def _fix_ties(mask: Tensor, mag: Tensor, value: Tensor, count: Tensor, sign: float) -> None:
    """Add ``sign`` to ``mask`` at the first ``count[r]`` entries of row ``r`` equal to ``value[r]`` (rows with
    ``count > 0`` only; usually none)."""
    rows = torch.nonzero(count > 0).flatten()
    if rows.numel() == 0:
        return
    tied = mag[rows] == value[rows]
    first = tied & (tied.cumsum(1) <= count[rows].unsqueeze(1))
    mask[rows] += sign * first.float()


def elect_sign(x: Tensor, zero: str = "majority") -> Tensor:
    """TIES Alg. 1 step 2 ("elect"): the sign of the summed (trimmed) task values, ``sgn(sum_i x_i)``.

    Parameters whose sum is exactly 0 get, with ``zero="majority"``, the majority of the elected signs, as the
    official code's ``resolve_zero_signs(sign, "majority")`` does; with ``zero="positive"`` +1, as mergekit
    (DARE-TIES here follows mergekit's ``dare_ties``). The official code takes that majority over the whole
    flattened model; here it is taken over the tensor at hand (the ``ties`` method takes the model-wide one through
    the engine, see :func:`ties_blocks`). The rules differ only where the surviving values cancel exactly; where
    every task was trimmed the merged value is 0 either way.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 2.0, -3.0], [1.0, -3.0, -2.0, -1.0]])
        >>> elect_sign(x).tolist()   # column 2 sums to 0 -> majority of (+1, -1, -1) = -1
        [1.0, -1.0, -1.0, -1.0]
        >>> elect_sign(x, zero="positive").tolist()
        [1.0, -1.0, 1.0, -1.0]
    """
    if zero not in ("majority", "positive"):
        raise ValueError(f"zero must be 'majority' or 'positive', got {zero!r}")
    sign = torch.sign(x.sum(0))
    resolved = torch.sign(sign.sum()) if zero == "majority" else torch.ones((), dtype=sign.dtype, device=sign.device)
    return torch.where(sign == 0, resolved, sign)


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
                                consensus: bool = False, aggregate: str = "sum", zero_sign: str = "majority") -> Tensor:
    """The shared pipeline: ``sparsify`` each task vector, optionally keep the sign-consensus entries, aggregate.

    ``deltas`` is ``[T, *shape]``; ``sparsify`` maps it to a sparsified tensor of the same shape (or ``None``).
    With ``consensus`` the aggregation is :func:`disjoint_merge` after :func:`elect_sign` (``zero_sign``: its rule
    for an exactly zero sum); without it a plain ``sum`` (Task Arithmetic) or ``mean`` over tasks.

    Example:
        >>> d = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
        >>> generalized_task_arithmetic(d).tolist()
        [4.0, 1.0]
        >>> generalized_task_arithmetic(d, consensus=True, aggregate="sum").tolist()
        [4.0, 2.0]
    """
    x = deltas if sparsify is None else sparsify(deltas)
    if consensus:
        return disjoint_merge(x, elect_sign(x, zero_sign), aggregate)
    if aggregate == "sum":
        return x.sum(0)
    if aggregate == "mean":
        return x.mean(0)
    raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")


def ties_blocks(blocks: Iterable[tuple[int, int, Tensor]], numel: int, thresholds: Tensor,
                weights: Tensor | None = None, aggregate: str = "sum",
                defer_majority: list | None = None) -> Tensor:
    """Trim -> elect -> disjoint merge (TIES Alg. 1) streamed over blocks of columns, equal to
    ``disjoint_merge(y, elect_sign(y), aggregate)`` with ``y = w * x * (|x| >= thresholds)`` on the whole tensor.

    ``blocks`` yields ``(start, stop, x)`` with ``x`` ``[T, stop - start]`` (the unweighted task values of entries
    ``start:stop`` of the flattened tensor; modified in place), as :meth:`studio.pool.LayerTasks.raw_chunks` gives.
    ``thresholds`` ``[T]`` are the trim thresholds (on ``|x|``), ``weights`` ``[T]`` optional per-task weights.

    Per entry only two sums are kept: ``P = sum_i max(y_i, 0)`` and ``N = sum_i min(y_i, 0)``. The elected sign is
    ``sgn(P + N)``, and the disjoint sum is ``P`` where it is positive, ``N`` where it is negative (the mean divides
    by the matching count of non-zero entries), so each block is finished while it is in the cache: working on
    cache-sized blocks instead of ``[T, *shape]`` temporaries makes TIES several times faster on a CPU (see
    ``raw_chunks``). An entry with ``P + N = 0`` takes the tensor's majority sign (:func:`elect_sign`), known only
    at the end: such an entry first gets ``N``, and where ``P = -N != 0`` (the surviving values cancel exactly; rare)
    its position and ``P`` (or its mean) are recorded and ``P`` is put back if the majority is positive. With
    ``defer_majority`` (a list) the majority is left to the caller: ``(votes, cancelled)`` is appended to it, the sum
    of the elected signs and the recorded ``(positions, P)`` pairs, and the cancelled entries keep ``N``. Masks are
    float32 0/1 tensors, not booleans: on a CPU, torch's comparisons into a boolean tensor and products with one take
    ~8x longer than the same float32 operations (dtype promotion), and ``x * 1.0`` / ``x * 0.0`` give the same
    values.

    Example:
        >>> x = torch.tensor([[1.0, 2.0, 2.0, -3.0], [1.0, -3.0, -2.0, -1.0]])
        >>> t = torch.tensor([0.0, 0.0])
        >>> ties_blocks([(0, 4, x.clone())], 4, t).tolist() == disjoint_merge(x, elect_sign(x), "sum").tolist()
        True
    """
    if aggregate not in ("sum", "mean"):
        raise ValueError(f"aggregate must be 'sum' or 'mean', got {aggregate!r}")
    thr = thresholds.reshape(-1, 1)
    w = None if weights is None else weights.reshape(-1, 1).to(thr.device, torch.float32)
    out = scratch = mask = None
    votes = 0.0          # sum of the elected signs (before the majority rule): the majority is its sign
    cancelled = []       # positions with P = -N != 0, holding N until the majority is known
    for start, stop, x in blocks:
        if out is None:
            dev = x.device
            out = torch.empty(numel, device=dev, dtype=torch.float32)
            scratch, mask = torch.empty_like(x), torch.empty_like(x)
            row = torch.empty(6, x.shape[1], device=dev, dtype=x.dtype)        # per-entry P, N, P + N and scratch
            thr = thr.to(dev)
            w = None if w is None else w.to(dev)
        width = x.shape[1]
        part, keep = scratch[:, :width], mask[:, :width]
        pos, neg, total, pick, a, b = row[:, :width]
        torch.ge(torch.abs(x, out=part), thr, out=keep)   # float 0/1 (see above)
        x.mul_(keep)
        if w is not None:
            x.mul_(w)
        torch.sum(torch.clamp(x, min=0, out=part), 0, out=pos)
        torch.sum(torch.clamp(x, max=0, out=part), 0, out=neg)
        torch.add(pos, neg, out=total)
        votes += float(torch.sign(total, out=a).sum())
        torch.eq(total, 0, out=a)
        tied = None
        if float(torch.dot(a, torch.gt(pos, 0, out=b))):      # an exact cancellation in this block
            tied = torch.nonzero(a.mul_(b)).flatten()
        if aggregate == "mean":
            pos.div_(torch.sum(torch.gt(x, 0, out=keep), 0, out=a).clamp_(min=1))
            neg.div_(torch.sum(torch.lt(x, 0, out=keep), 0, out=a).clamp_(min=1))
        if tied is not None:
            cancelled.append((start + tied, pos[tied].clone()))
        torch.gt(total, 0, out=pick)   # P where P + N > 0, else N: P * pick + N * (1 - pick), exact for 0/1
        torch.add(pos.mul_(pick), neg.mul_(pick.neg_().add_(1)), out=out[start:stop])
    if out is None:
        out = torch.zeros(numel, device=thresholds.device, dtype=torch.float32)
    if defer_majority is not None:
        defer_majority.append((votes, cancelled))
    elif votes > 0:   # the majority is positive: cancelled entries take P
        restore_cancelled(out, cancelled)
    return out


def restore_cancelled(out: Tensor, cancelled: list[tuple[Tensor, Tensor]]) -> None:
    """Put the positive aggregate ``P`` back at the exactly cancelled entries :func:`ties_blocks` recorded
    (``(positions, P)`` pairs into the flattened ``out``, in place): their elected sign is positive after all."""
    flat = out.view(-1)
    for idx, values in cancelled:
        flat[idx] = values


def band_thresholds(magnitudes: Tensor, beta: float, gamma: float) -> tuple[float, float, int, int]:
    """The magnitude band of one task's flattened tensor that :func:`band_mask` keeps, from one histogram pass.

    Returns ``(lo, hi, lo_ties, hi_ties)``: entries with ``lo <= |x| < hi`` are kept, except that of the entries
    with ``|x| == lo`` the first ``lo_ties`` (in flat order) are dropped, and of those with ``|x| == hi`` the first
    ``hi_ties`` are kept -- :func:`band_mask`'s position rule where an exact tie straddles a cut (common: deltas of
    float checkpoints are multiples of the base's rounding unit). With ``(n_top, n_bottom)`` from :func:`band_counts`,
    ``lo`` is the magnitude at ascending rank ``n_bottom`` (0-based; ``0`` when nothing is cut at the bottom), ``hi``
    the one at rank ``d - n_top`` (``inf`` when nothing is cut at the top).

    Example:
        >>> band_thresholds(torch.tensor([1.0, 10.0, 3.0, 0.2, 5.0, 7.0, 0.5, 2.0, 4.0, 6.0]), 0.1, 0.3)
        (2.0, 10.0, 0, 0)
        >>> band_thresholds(torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0]), 0.0, 0.4)   # drop 2 of the four 1.0s
        (1.0, inf, 2, 0)
    """
    d = magnitudes.numel()
    n_top, n_bottom = band_counts(d, beta, gamma)
    lo, hi, lo_ties, hi_ties = 0.0, math.inf, 0, 0
    ranks = ([n_bottom + 1] if n_bottom > 0 else []) + ([d - n_top + 1] if n_top > 0 else [])
    if ranks:
        vals, below = order_statistics(magnitudes, ranks)
        if n_bottom > 0:
            lo, lo_ties = float(vals[0]), n_bottom - below[0]
        if n_top > 0:
            hi, hi_ties = float(vals[-1]), (d - n_top) - below[-1]
    return lo, hi, lo_ties, hi_ties


def band_blocks(blocks: Iterable[tuple[int, int, Tensor]], numel: int, bands: Tensor,
                weights: Tensor | None = None) -> Tensor:
    """``sum_i w_i * x_i * (lo_i <= |x_i| < hi_i)`` streamed over blocks of columns (Breadcrumbs' masked sum).

    ``blocks`` as in :func:`ties_blocks`; ``bands`` ``[T, 2]`` holds each task's ``(lo, hi)`` from
    :func:`band_thresholds` (the caller adds the tie corrections, see ``breadcrumbs``).

    Example:
        >>> x = torch.tensor([[1.0, -10.0, 3.0, 0.2, -5.0, 7.0, 0.5, 2.0, -4.0, 6.0]])
        >>> bands = torch.tensor([band_thresholds(x[0].abs(), 0.1, 0.3)[:2]])
        >>> torch.equal(band_blocks([(0, 10, x.clone())], 10, bands), (x * band_mask(x, 0.1, 0.3)).sum(0))
        True
    """
    lo, hi = bands[:, :1], bands[:, 1:]
    out = scratch = keep = upper = None
    for start, stop, x in blocks:
        if out is None:
            dev = x.device
            out = torch.empty(numel, device=dev, dtype=torch.float32)
            # float 0/1 masks: ~8x faster than booleans on a CPU (see ties_blocks)
            scratch, keep, upper = torch.empty_like(x), torch.empty_like(x), torch.empty_like(x)
            lo, hi = lo.to(dev), hi.to(dev)
            weights = None if weights is None else weights.reshape(-1, 1).to(dev, torch.float32)
        width = x.shape[1]
        mag, k, u = scratch[:, :width], keep[:, :width], upper[:, :width]
        torch.abs(x, out=mag)
        torch.ge(mag, lo, out=k)
        torch.lt(mag, hi, out=u)
        x.mul_(k.mul_(u))
        if weights is not None:
            x.mul_(weights)
        torch.sum(x, 0, out=out[start:stop])
    return torch.zeros(numel, dtype=torch.float32) if out is None else out
