"""Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind"), Alg. 2: isotropic merging in the common subspace of
the summed task matrices enlarged with task-specific subspaces.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import linalg
from ..linalg import matmul, polar_extend, polar_gram, truncated_svd_deflated, truncated_svd_deflated_many
from ..pool import LayerTasks
from ..registry import register
from ..schema import HyperparameterError, Param

__all__ = ["iso_cts", "iso_cts_dims", "iso_cts_factors"]


def iso_cts_dims(r: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """Sizes ``(k, s)`` of the common subspace and of each task-specific subspace, ``k + T*s = r``.

    Iso eq. 10-13 ask for ``k`` common directions and ``s = (r - k) / T`` per task; the official code makes the
    task-specific total divisible by ``T`` with Python's ``round`` (half to even)::

        common = int(r * f); ts_total = round((r - common) / T) * T; common = r - ts_total; s = ts_total // T

    e.g. ``r = 768, T = 8, f = 0.8``: ``int(614.4) = 614``, ``round(19.25) = 19``, so ``k = 616, s = 19``. Where
    rounding up would leave a negative common size (``f`` near 0 and ``r / T`` rounding up, e.g. ``r = 11, T = 4,
    f = 0``), where the official code slices with a negative index, ``s`` is capped at ``r // T``.

    Example:
        >>> iso_cts_dims(768, 8, 0.8), iso_cts_dims(768, 8, 1.0), iso_cts_dims(11, 4, 0.0)
        ((616, 19), (768, 0), (3, 2))
    """
    if not 0.0 <= common_space_fraction <= 1.0:
        raise HyperparameterError(
            f"iso_cts: common_space_fraction = {common_space_fraction!r} is outside [0, 1]")
    common = int(r * common_space_fraction)
    per_task = min(round((r - common) / num_tasks), r // num_tasks)
    return r - per_task * num_tasks, per_task


def iso_cts_factors(layer: LayerTasks, k: int, s: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Common and task-specific directions of Iso Alg. 2 lines 1-9.

    Returns ``Uc [m, k']``, ``Vc [n, k']``, ``U_ts [m, T*s]``, ``V_ts [n, T*s]`` and all ``r`` selected singular
    values (``k`` of the sum, then ``s`` per task). The task-specific SVDs are of ``Delta_t - U^{1:k'} U^{1:k'}^T
    Delta_t`` (eq. 10; ``k' = k`` for a full-rank sum, see below): LAPACK on the formed residual in
    ``svd_mode="exact"`` (the official code), else
    :func:`studio.linalg.truncated_svd_deflated`'s Gram-based path.

    Directions at the level of float32 rounding carry no direction (as in :func:`~studio.methods.iso_c.iso_c`, a
    deviation from the official code where the sum or a residual is rank deficient, e.g. LoRA experts): the common
    block keeps ``k' = min(k, rank)`` directions of the sum, those above the stored weights' rounding
    (:meth:`~studio.pool.LayerTasks.sum_rank`), only those are projected out of the task matrices, and a task's
    residual direction at the level of its expert's rounding is a zero column: a singular value at or below
    :func:`studio.linalg.noise_edge` of :meth:`~studio.pool.LayerTasks.task_rounding` on the ``(m - k') x n``
    complement (the largest singular value of that rounding there, twice over), or below
    :func:`studio.linalg.rank_tolerance` (``~1e-6`` of the sum's largest singular value, the float32 projection's
    own rounding). A cut on the size alone kept a low-rank task's rounding directions once its deltas fell below
    about 2e-3 of its weights, and merged 4 rank-3 experts 1.1-3.6 times apart on a random and a zero base; they
    are now 1e-5 to 3e-3 apart, as Iso-C's (docs/ENGINE.md). Their singular values (rounding,
    ~0) still count in ``sigma_bar``'s sum, as in the official code.

    A residual also holds the sum's rounding: the computed ``U^{1:k'}`` are the singular vectors of the sum plus its
    rounding ``E``, which tilts them into the sum's left null space (``m - rank`` dimensions, which only rounding
    fills) and so moves part of each task into the complement: ``-P_0 E V Sigma^{-1} U^T Delta_t`` to first order
    (``P_0`` the projector on that null space, ``U Sigma V^T`` the common block). That part is cut too: at most
    :func:`studio.linalg.noise_edge` of :meth:`~studio.pool.LayerTasks.sum_rounding` on an ``(m - rank) x k'``
    block, times ``||Sigma^{-1} U^T Delta_t||_2`` (formed only where a value falls between the cuts of its bound
    ``||Delta_t||_F / sigma_k'``). Four rank-3 experts sharing a direction, deltas 1e-3 of their weights, kept one
    such direction on a random base and merged 0.35 apart from the same experts on a zero one
    (``test_iso_cts_cuts_what_the_sums_rounding_moves_into_a_residual``; now 8e-5, Iso-C's distance).

    Example:
        >>> from studio.pool import TaskPool
        >>> experts = {"a": {"w": torch.diag(torch.tensor([4.0, 0, 0, 1]))},
        ...            "b": {"w": torch.diag(torch.tensor([0.0, 2, 1, 0]))}}
        >>> layer = TaskPool({"w": torch.zeros(4, 4)}, experts).layer("w")
        >>> Uc, Vc, U_ts, V_ts, sigmas = iso_cts_factors(layer, 2, 1)
        >>> Uc.shape, U_ts.shape, sigmas.tolist()
        (torch.Size([4, 2]), torch.Size([4, 2]), [4.0, 2.0, 1.0, 1.0])
    """
    U, S, Vh = layer.sum_svd()
    live = min(k, layer.sum_rank())   # the sum's directions among the k common ones
    # eq. 10 projects the common directions out of each task matrix; those past the sum's rank are set by rounding
    # (and would take an arbitrary part of tasks that cancel in the sum), so only the live ones are projected out
    Uc, Sc = U[:, :live], S[:k]
    exact = layer.pool.svd_mode == "exact"
    # When m <= r the sum's U is square, so its remaining columns span exactly the complement of the common
    # subspace: the residual of eq. 10 is U_rest (U_rest^T Delta_t) and only an (r - k') x n matrix is decomposed.
    complement = U[:, live:] if U.shape[0] == U.shape[1] else None
    m, n = layer.shape
    # ten times float32's resolution of the sum's largest singular value: the float32 projection's own rounding
    resolution = float(linalg.rank_tolerance(S[0], layer.shape)) if S.numel() else 0.0

    null = m - layer.sum_rank()   # the sum's left null space, which its rounding fills
    # the first-order image of the sum's rounding in a residual, per unit of ||Sigma^{-1} U^T Delta_t||_2 (docstring)
    moved = linalg.noise_edge(layer.sum_rounding(), null, live) if null > 0 and live else 0.0

    def cut(i: int, delta: Tensor, sv: Tensor) -> float:
        # a residual's rounding: the stored expert's, projected on the complement of the live common directions
        own = max(resolution, layer.rounding_cut(i, sv, rows=m - live, delta=delta))
        if not moved:
            return own
        # and the sum's rounding the projection moved into it: ||Sigma^{-1} U^T Delta_t||_2 <= ||Delta_t||_F / sigma_k',
        # formed only where a value falls between the cuts of that bound (first with a bound on ||Delta_t||_F read
        # without the task matrix: full fine-tunes' residual values all stand above it)
        def between(norm: float) -> bool:
            return bool(((sv > own) & (sv <= own + moved * norm / float(S[live - 1]))).any())

        if not between(layer.task_norm_bound(i)):
            return own
        norm = float(torch.linalg.vector_norm(delta))
        if not between(norm):
            return own + moved * norm / float(S[live - 1])
        amplified = matmul(Uc.mT, delta).div_(S[:live, None].to(delta.dtype))
        return own + moved * float(torch.linalg.matrix_norm(amplified, ord=2))

    # A task matrix of float32's subnormal range (entries below 1.2e-38, only where the weights are that small too)
    # has absolute, not relative, rounding, so its computed residual held rounding at 1e-5 to 1e-4 of its norm, which
    # passed for directions and was whitened in (constant rank-1 deltas of 1e-40 merged 2e7 times too large, a
    # helper's quirks audit): it is decomposed scaled by a power of two (exact), its values scaled back
    shifts = [_residual_shift(layer.task_norm_bound(i)) for i in range(layer.num_tasks)]

    def unshifted(svd: tuple[Tensor, Tensor, Tensor], shift: int) -> tuple[Tensor, Tensor, Tensor]:
        u, sv, vh = svd
        return (u, _times_pow2(sv, -shift), vh) if shift else svd

    def residual(i: int, delta: Tensor) -> tuple[float, tuple[Tensor, Tensor, Tensor]]:
        svd = truncated_svd_deflated(_times_pow2(delta, shifts[i]), Uc, s, complement=complement, exact=exact)
        svd = unshifted(svd, shifts[i])
        return cut(i, delta, svd[1]), svd   # before the next task overwrites delta

    Us, Ss, Vs = [], [Sc], []
    if s > 0 and layer.device.type == "cuda":   # every task's residual at once: their eigensolves share batches
        deltas = list(layer.deltas)
        svds = truncated_svd_deflated_many([_times_pow2(d, e) for d, e in zip(deltas, shifts)], Uc, s,
                                           complement=complement, exact=exact)
        svds = [unshifted(svd, e) for svd, e in zip(svds, shifts)]
        parts = [(cut(i, delta, svd[1]), svd) for i, (delta, svd) in enumerate(zip(deltas, svds))]
    elif s > 0:   # one task matrix in memory at a time
        parts = (residual(i, delta) for i, delta in enumerate(layer.task_deltas(reuse=True)))
    else:
        parts = ()
    for rounding, (u, sv, vh) in parts:
        # A residual direction at rounding level (a zero residual, e.g. a task weighted 0, a task wholly in the
        # common subspace, or a low-rank task's residual past its rank) has no singular vector; LAPACK's or the
        # rounding's would be whitened in at sigma_bar.
        nonzero = sv > rounding
        Us.append(u * nonzero)
        Ss.append(sv)
        Vs.append(vh.mT * nonzero)
    empty_u, empty_v = Uc.new_zeros(m, 0), Uc.new_zeros(n, 0)
    U_ts = torch.cat(Us, dim=1) if Us else empty_u
    V_ts = torch.cat(Vs, dim=1) if Vs else empty_v
    return Uc, Vh[:live].mT, U_ts, V_ts, torch.cat(Ss)


def _residual_shift(norm_bound: float) -> int:
    """The power of two, ``2^shift``, that brings a task matrix whose Frobenius norm is at most ``norm_bound`` (and so
    each entry) to about 1 before :func:`iso_cts_factors` decomposes its residual, where that bound is below
    ``2^-100`` (the residual's entries would then near float32's subnormal range, ``2^-126``); else 0 (every
    realistic layer, whose bits this leaves as they were).

    Example:
        >>> _residual_shift(1e-40), _residual_shift(1e-3), _residual_shift(0.0)
        (132, 0, 0)
    """
    return -math.frexp(norm_bound)[1] if 0.0 < norm_bound < 2.0 ** -100 else 0


def _times_pow2(x: Tensor, shift: int) -> Tensor:
    """``x * 2^shift``, exact (a power of two beyond float32's range is applied in two halves); ``x`` itself at 0.

    Example:
        >>> _times_pow2(torch.tensor([1e-40]), 132).item() > 0.5, _times_pow2(torch.tensor([3.0]), 0).item()
        (True, 3.0)
    """
    if not shift:
        return x
    half = shift // 2
    return x * 2.0 ** half * 2.0 ** (shift - half)


def _dependences(layer: LayerTasks, Uc: Tensor, U_ts: Tensor, sigmas: Tensor, k: int,
                 s: int) -> tuple[float | None, Tensor | None]:
    """Where the directions kept outnumber the sum's rank (``k' + kept > rank``: a rank-deficient sum whose common
    block leaves fewer live directions than the tasks keep, so the concatenations have exact dependences), the
    whitening's tolerance and the task-specific columns to keep; else ``(None, None)`` (the whitening at
    :func:`~studio.linalg.null_tolerance`, every column as it is).

    The dependences show at the error of the computed task directions, not at a float64 Gram's resolution: a kept
    residual direction of singular value ``sigma`` carries about ``noise / sigma`` of error out of its span, ``noise``
    the residual's own (the largest value its task left out, at least :func:`~studio.linalg.rank_tolerance` of the
    sum's largest). A dependence among the columns then stands at most ``sqrt(sum (noise / sigma)^2)``, and the
    concatenation's singular values at or below that are left out (relative to its largest, which unit columns put at
    1 or more). A kept direction within twice its noise is not determined at all and is left out first (else it would
    make that bound useless). 8 rank-3 experts of a ``64 x 96`` layer at fraction 0.3 (``k = 16`` of the sum's 24
    live directions, each task keeping its 3 in the other 8) have 16 dependences at 1e-6 to 6e-6, above
    ``null_tolerance`` (1.2e-7): whitened in, they put the merges on a random and a zero base 1.2 apart."""
    T, rank = layer.num_tasks, layer.sum_rank()
    kept = (U_ts != 0).any(0)
    if s == 0 or Uc.shape[1] + int(kept.sum()) <= rank:
        return None, None
    values, kept = sigmas[k:].view(T, s).double(), kept.view(T, s)
    floor = float(linalg.rank_tolerance(sigmas[0], layer.shape)) if k else 0.0
    noise = torch.where(kept, 0.0, values).amax(1).clamp_min(floor)   # per task
    error = noise[:, None] / values.clamp_min(torch.finfo(torch.float64).tiny)
    kept = kept & (error < 0.5)
    if Uc.shape[1] + int(kept.sum()) <= rank:
        return None, kept.reshape(-1)
    return float(torch.where(kept, error, 0.0).square().sum().sqrt()), kept.reshape(-1)


@register(
    "iso_cts",
    params=(
        Param("common_space_fraction", float, 0.8, low=0.0, high=1.0, ui_step=0.01,
              help="Fraction k/r of the directions taken from the common subspace of the summed task matrices; "
                   "the rest is split equally among the tasks (1.0 = Iso-C).",
              paper="Iso sec. 5.4 / Fig. 6: k/r = 0.8 is the default for all settings; official common_space_fraction"),
        Param("alpha", float, 1.5, low=0.0, high=3.0, post_scale=True, ui_step=0.05,
              help="Global scaling of the isotropic merged task matrices. 1.5 is the paper's validated value for "
                   "ViT-B/32 with 8 tasks; its Table 5 gives 1.2 / 1.1 for 14 / 20 tasks and 1.9 for ViT-L/14 "
                   "(8 tasks): tune it on validation data.",
              paper="Iso paper eq. 14; Table 5 (appx. D.3): optimal alpha for Iso-CTS, ViT-B/32, 8 tasks = 1.50"),
    ),
    paper="No Task Left Behind (Marczak et al., ICML 2025), Alg. 2 Iso-CTS, eq. 10-14",
    summary="Common subspace of the task-matrix sum plus each task's own top directions, orthogonalised, "
            "with a flat (isotropic) spectrum.",
    scope="matrix",
    vector_rule="mean",
    decomposes=True,
)
def iso_cts(layer: LayerTasks, common_space_fraction: float = 0.8) -> Tensor:
    """``Delta_Iso-CTS = sigma_bar U_* V_*^T`` (Iso Alg. 2, eq. 10-13; unscaled).

    ``U_* = polar([U^{1:k} | Ubar_1^{1:s} | ... | Ubar_T^{1:s}])`` (and likewise ``V_*``) with ``Ubar_t`` the left
    singular vectors of the task matrix with the common subspace projected out (eq. 10), and ``sigma_bar`` the mean
    of the ``r`` selected singular values (eq. 13). Sizes follow the official rounding (:func:`iso_cts_dims`). The
    official code stacks the task-specific block before the common one; the column order changes neither the polar
    factors' product nor the flat spectrum.

    On the left, eq. 10 makes the task-specific directions orthogonal to the common block, so
    ``U_* = [U^{1:k} | polar(Ubar)]`` and only the ``[m, T*s]`` block is whitened (14 vs 108 ms for a
    ``3072 x 768`` layer, one core); resolving the rounding-level coupling instead would only amplify it. On the
    right there is no such orthogonality; the common block being orthonormal, the whitening is a low-rank update of
    it (:func:`studio.linalg.polar_extend`), equal to the polar factor of the whole ``[n, r]`` matrix at a fraction
    of the cost. The update's error grows as the block's orthogonality defect over the smallest singular value of
    the concatenation (which is square on the short side, and can be ~1e-5): with the pool's float64-Gram SVD of the
    sum (defect ~5e-9, ``svd_mode="auto"``) it reached 8.9e-5 relative to FusionBench's float64 Iso-CTS on a layer
    of the bench's experts and 2.4e-4 on a small two-tower CLIP (smallest singular value 9e-6 of the largest), so
    below 1e-4 of it the whole concatenation's polar factor is taken (:func:`~studio.linalg.polar_extend`; 3.9e-6
    and 2.7e-6 then, 10 of the 44 right whitenings of the bench's 8 ViT-B/32 experts); with LAPACK's float32 SVD
    (``"exact"``, defect ~1e-6) it would be ~3e-4, so that mode whitens both whole concatenations
    (:func:`studio.linalg.polar_gram`, ~2e-5). So does ``"auto"`` where the sum's SVD fell back to LAPACK
    (:meth:`~studio.pool.LayerTasks.sum_svd_from_gram`: a sum whose spectrum spans more than five decades, or is
    rank deficient); the update there spread the flat spectrum by up to 15 %.

    Where the concatenation has (numerically) dependent columns, e.g. two identical experts' task-specific
    directions, the official SVD completes it with arbitrary orthonormal directions that then carry ``sigma_bar``;
    the polar factors here leave them out (a partial isometry, see :func:`~studio.linalg.polar_gram`): those whose
    singular value in the concatenation is at or below :func:`~studio.linalg.null_tolerance` (1.2e-7 of its
    largest up to 64 columns, 4.1e-7 at 768). Just above it float32 data cannot tell a dependence from a genuine
    direction: a helper's edge audit found rank-2 experts (5 on a ``20 x 12`` layer, the sum of rank 10) whose exact
    dependence rounds to 1.3e-7 and is whitened in (39 % from the partial isometry), where an ill-conditioned
    full-rank case (``test_iso_cts_auto_mode_whitens_fully_where_the_sums_svd_fell_back_to_lapack``) has a direction
    at 1.4e-7 that the official float64 loop keeps; no threshold parts the two, and this one keeps both, as the
    official code does (in ``"exact"`` OpenBLAS's SkylakeX kernel rounds that direction below the tolerance).
    Where the tasks keep more directions than the sum's rank leaves outside the common block (a rank-deficient sum,
    ``k' + kept > rank``), the dependences are certain and the tolerance is the computed directions' own error
    instead, and a kept direction within twice its noise is left out (:func:`_dependences`): 8 rank-3 experts at
    fraction 0.3 merged 1.2-1.3 apart on a random and a zero base, now as far apart as Iso-C's merges.
    Experts ``X1 + Y1, X2 + Y2, -(X1 + X2) + Y3`` of a ``32 x 48`` layer (the ``X`` parts cancel in the sum) are such
    a case: they merged 47 % from ``"auto"`` in ``"exact"``, whose float32 LAPACK residuals left the dependence above
    ``null_tolerance``, 69 % apart between a zero and a random base there and 33 % in ``"auto"`` under OpenBLAS's
    SkylakeX kernel; now within 6.7e-7 of one another in both modes, on both bases and under both kernels (the
    official loop in float64, which also completes the sum's null space, 121 %; docs/ACCURACY.md).
    With ``common_space_fraction = 1`` this is Iso-C.

    Example:
        >>> from studio.pool import TaskPool
        >>> base = {"w": torch.zeros(4, 4)}
        >>> experts = {"a": {"w": torch.diag(torch.tensor([4.0, 0, 0, 1]))},
        ...            "b": {"w": torch.diag(torch.tensor([0.0, 2, 1, 0]))}}
        >>> layer = TaskPool(base, experts, svd_mode="exact").layer("w")
        >>> # common: e1, e2 of the sum diag(4, 2, 1, 1); task-specific: e4 (a), e3 (b); mean of (4, 2, 1, 1) = 2
        >>> [round(x, 4) for x in iso_cts(layer, 0.5).diagonal().tolist()]   # k = 2, s = 1
        [2.0, 2.0, 2.0, 2.0]
    """
    r = min(layer.shape)
    k, s = iso_cts_dims(r, layer.num_tasks, common_space_fraction)
    Uc, Vc, U_ts, V_ts, sigmas = iso_cts_factors(layer, k, s)
    sigma_bar = sigmas.sum() / r
    if Uc.shape[1] + U_ts.shape[1] == 0:   # no direction at all (every task matrix zero)
        return torch.zeros(layer.shape, dtype=torch.float32, device=layer.device)
    rtol, kept = _dependences(layer, Uc, U_ts, sigmas, k, s)
    if kept is not None:
        U_ts, V_ts = U_ts * kept, V_ts * kept
    if not layer.sum_svd_from_gram():   # LAPACK's float32 common block is orthonormal to ~1e-6 only (see above)
        return matmul(polar_gram(torch.cat([Uc, U_ts], 1), rtol) * sigma_bar,
                      polar_gram(torch.cat([Vc, V_ts], 1), rtol).mT)
    # eq. 10: U_ts is orthogonal to Uc (to rounding), so the left polar factor is [Uc | polar(U_ts)]
    U_star = torch.cat([Uc, polar_gram(U_ts, rtol)], 1) if U_ts.shape[1] else Uc
    return matmul(U_star * sigma_bar, polar_extend(Vc, V_ts, rtol).mT)
