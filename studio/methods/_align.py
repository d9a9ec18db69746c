"""Shared spectral-alignment building blocks of SVC and AlignMerge (and the diagnostics that plot them).

Both papers (SVC, Li et al. 2026, arXiv:2602.05536; AlignMerge, anonymous submission under double-blind review --
closely related: same tables and checkpoints, and the SVC code's calibration function is still named ``Align``) look at
the task matrices ``Delta_i`` through the SVD of a merged delta ``M = U diag(sigma) V^T`` (SVC eq. 17, AlignMerge
eq. 4). Everything they need per subspace ``r`` reduces to two numbers per task:

* ``c_i^r = u_r^T Delta_i v_r``  -- the task's singular value in the merged basis (AlignMerge eq. 4 denominator,
  Prop. 2 / App. B.3 optimum),
* ``|a_i^r|^2 = ||u_r^T Delta_i||^2`` -- the energy of the task's column-space response ``a_i^r`` (SVC eq. 4/18).

Because ``a_merge^r = u_r^T M = sigma_r v_r^T`` (SVC eq. 10), ``<a_merge^r, a_i^r> = sigma_r c_i^r``, so the SVC
projection coefficient is ``s_i^r = sigma_r c_i^r / |a_i^r|^2`` (eq. 19) and the AlignMerge full coefficient is
``xi~_i^r = sigma_r / c_i^r`` (eq. 7, shown in :func:`full_coefficient`). :func:`merged_spectrum` computes and
memoises ``(sigma, c, |a|^2)`` once per merged delta, so a change of any calibration hyperparameter, of the global
scale or of the preferences costs O(T R) plus one reconstruction.

Public helpers (used by ``svc.py``, ``align_merge.py`` and the diagnostics):
:func:`subspace_responses`, :func:`merged_spectrum_of`, :func:`merged_spectrum`, :func:`svc_projection_coefficients`,
:func:`svc_unresolved`, :func:`svc_gamma`, :func:`subspace_scaling_eta`, :func:`subspace_cross_influence`,
:func:`cross_influence_terms`, :func:`full_coefficient`, :func:`subspace_alignment_index`, :func:`align_b_factors`,
:func:`preference_weights`, :func:`factored_svd`, :func:`partial_polar`.

Diagnostics example (one layer)::

    spec = merged_spectrum_of(deltas, merged)                       # deltas [T, m, n], merged [m, n]
    xi = subspace_cross_influence(spec.c)                           # [T, T, R], AlignMerge Fig. 2
    sai = subspace_alignment_index(spec.S, spec.c, signed=True)     # [T, R],    AlignMerge Fig. 3
    s = svc_projection_coefficients(spec.S, spec.c, spec.a2)        # [T, R],    SVC eq. 19 / Fig. 3
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import torch
from torch import Tensor

from .. import _lapack, linalg
from ..pool import LayerTasks

#: SVC official code: ``denom = (ai * ai).sum(-1).clamp_min(1e-12)`` (merge_func.py, ``coef_cal_multi_ranks``).
SVC_EPS = 1e-12

#: A task's response ``|a_i^r|`` at or below this fraction of its largest ``max_r |a_i^r|`` is float32 rounding of
#: the merged basis, not a response: ``s_i^r = 0`` there (:func:`svc_projection_coefficients`; our rule).
SVC_NOISE_RTOL = 1e-5

#: A task's projection ``|c_i^r| = |u_r^T Delta_i v_r|`` at or below this fraction of its largest response
#: ``max_r |a_i^r|`` is not resolved in float32 (its computed error reached 4.5 eps32 of that response): its sign does
#: not decide the one-hot target guard (:func:`svc_unresolved`, :func:`svc_gamma`; our rule).
SVC_PROJECTION_RTOL = 1e-6


#: A provider of the thin SVD ``(U, S, Vh)`` of the merged delta it is given, from the base method's own factors
#: (descending ``S``), or ``None`` where it has none (the registry's ``merged_svd``, bound by the engine to a layer
#: and hyperparameters).
MergedSvd = Callable[[Tensor], "tuple[Tensor, Tensor, Tensor] | None"]


@dataclass(frozen=True)
class MergedSpectrum:
    """The SVD of a merged delta ``M = U diag(S) V^T`` together with each task's responses in that basis.

    Attributes:
        S: singular values ``sigma_r`` of ``M`` ``[R]`` (``R = min(m, n)``; fewer, the nonzero ones, when the
            SVD came from the base method's own factors, :func:`merged_spectrum`).
        c: ``c_i^r = u_r^T Delta_i v_r`` ``[T, R]``.
        a2: ``||u_r^T Delta_i||^2`` ``[T, R]``.
        basis: the SVD factor of the smaller side: ``U [m, R]`` when ``m <= n`` (``side="left"``), else
            ``V [n, R]`` (``side="right"``); square, or spanning ``M``'s column (row) space, so that
            ``M = U U^T M`` (``M V V^T``).
        side: ``"left"`` or ``"right"``.
        other: the other factor (``Vh [R, n]`` for ``side="left"``, ``U [m, R]`` for ``"right"``) when it is held
            anyway -- the pool's cached SVD of the task-matrix sum -- else ``None``: a memoised spectrum of any other
            merged delta keeps only ``basis`` (4x less memory than ``U`` and ``V`` for a ``3072 x 768`` layer).
    """

    S: Tensor
    c: Tensor
    a2: Tensor
    basis: Tensor
    side: str
    other: Tensor | None = None

    def rescale(self, merged: Tensor, factors: Tensor, scale: float = 1.0) -> Tensor:
        """``U diag(scale * factors * sigma) V^T``: ``scale * merged`` with each singular value multiplied by its
        factor (SVC eq. 21-22, AlignMerge eq. 9), for ``merged = U diag(sigma) V^T`` (the matrix this spectrum is of).

        With :attr:`other` this is one product ``U diag(.) V^T``; without it ``M = U U^T M`` or ``M = M V V^T``
        (:attr:`basis` spans ``M``'s column or row space) give the same matrix from ``merged`` and it in two (a warm
        change of the scale or the calibration's hyperparameters costs one or two ``m x n x R`` products per layer).

        Example:
            >>> M = torch.diag(torch.tensor([3.0, 1.0]))
            >>> spec = merged_spectrum_of(M.unsqueeze(0), M)
            >>> spec.rescale(M, torch.tensor([0.5, 2.0])).diagonal().tolist()
            [1.5, 2.0]
            >>> with_other = merged_spectrum_of(M.unsqueeze(0), M, linalg.svd_tall(M))
            >>> with_other.rescale(M, torch.tensor([0.5, 2.0]), scale=2.0).diagonal().tolist()
            [3.0, 4.0]
        """
        f = factors.to(merged.dtype) * scale
        Q = self.basis
        if self.other is not None:
            if self.side == "left":
                return linalg.reconstruct(Q, f * self.S, self.other)
            return linalg.reconstruct(self.other, f * self.S, Q.mT)
        if self.side == "left":
            return linalg.matmul(Q, f.unsqueeze(-1) * linalg.matmul(Q.mT, merged))
        return linalg.matmul(linalg.matmul(merged, Q) * f.unsqueeze(0), Q.mT)


def subspace_responses(deltas: "Tensor | Iterable[Tensor]", U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task responses in the merged basis: ``c_i^r = u_r^T Delta_i v_r`` and ``|a_i^r|^2 = ||u_r^T Delta_i||^2``.

    ``a_i^r = (u^r)^T Delta_i`` is SVC eq. 4 / eq. 18 (the subspace response); ``c_i^r`` is the diagonal of
    ``U^T Delta_i V`` (AlignMerge App. B.3, eq. 32; the denominator of eta in eq. 4). Loops over tasks so the peak
    memory is one ``[R, n]`` block; each delta is used before the next is asked for (so ``deltas`` may reuse one
    buffer, :meth:`LayerTasks.task_deltas`).

    Args:
        deltas: task matrices ``[T, m, n]``, or an iterable of ``[m, n]`` (e.g. :meth:`LayerTasks.task_deltas`).
        U: left singular vectors of the merged delta ``[m, R]``.
        Vh: right singular vectors (rows) ``[R, n]``.

    Returns:
        ``(c, a2)``, both ``[T, R]``.

    Example:
        >>> d = torch.stack([torch.eye(2), 2 * torch.eye(2)])
        >>> c, a2 = subspace_responses(d, torch.eye(2), torch.eye(2))
        >>> c.tolist(), a2.tolist()
        ([[1.0, 1.0], [2.0, 2.0]], [[1.0, 1.0], [4.0, 4.0]])
    """
    cs, a2s = [], []
    for d in deltas:
        A = linalg.matmul(U.mT, d)  # rows are a_i^r
        # no [R, n] temporaries: 2.8 vs 3.9 ms for the two at [768, 3072] on one core
        a2s.append(torch.linalg.vector_norm(A, dim=-1).square())
        cs.append(torch.linalg.vecdot(A, Vh))
    return torch.stack(cs), torch.stack(a2s)


#: Adjacent singular values of a merged delta closer than this (relative to the largest) are tied for
#: :func:`sum_ordered_svd`: at such gaps the SVD's basis is set by float32 rounding (a perturbation ``e`` turns it by
#: ~``e / gap``). Wider gaps are real: TSV-M's spectrum (the tasks' own singular values) has pairs ~1e-5 apart
#: whose basis FusionBench's float64 run fixes, and rotating those moved TSV-M + SVC by 1.4e-2 on MiniSuite.
TIE_RTOL = 1e-6
#: A merged spectrum whose nonzero singular values all lie within this of the largest is flat by construction (Iso-C,
#: Iso-CTS, Ortho-Merge: ``sigma_bar`` times a partial isometry) and is one tied cluster. Their float32 results are
#: flat to ~1e-5 (Iso-CTS's right whitening, :func:`studio.linalg.polar_extend`), a spread no other method has.
FLAT_RTOL = 1e-3


def _order_by_sum(C: Tensor) -> Tensor:
    """Orthogonal ``R`` diagonalising the symmetric part of ``C = U_c^T total V_c`` (float64), columns ordered by
    descending share of the sum: the rotation :func:`sum_ordered_svd` applies inside a tied cluster."""
    C = C.double()
    return torch.linalg.eigh((C + C.mT) / 2).eigenvectors.flip(-1)


def _flat_svd(merged: Tensor, total: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`sum_ordered_svd` of a merged delta of full rank whose singular values are all equal within
    :data:`FLAT_RTOL` (Iso-C, Iso-CTS; ``None`` for any other), without an SVD of it.

    With ``A`` the merged delta oriented tall (``[big, r]``) and ``A = sigma_bar P``, ``P`` orthonormal, every
    orthogonal ``W [r, r]`` gives an SVD ``(A W / sigma_bar) sigma_bar W^T``, and the one ordered by the sum is ``W``
    = the eigenvectors of the symmetric part of ``A^T total`` (descending). A few random probes ``||A x|| / ||x||``
    first rule out the spectra that are not flat (almost all), then the Gram matrix ``A^T A ~ sigma_bar^2 I``
    confirms it. One ``[big, r, r]`` product, a Gram and an ``r x r`` eigendecomposition instead of the SVD of ``A``
    plus the cluster's rotation (SVC after Iso-C on 8 ViT-B/32 experts: see docs/PERFORMANCE.md).
    """
    tall = merged.shape[-2] >= merged.shape[-1]
    A = merged if tall else merged.mT
    T = total if tall else total.mT
    r = A.shape[-1]
    if r < 2 or A.dtype not in (torch.float32, torch.float64):
        return None
    probe = torch.randn(r, 4, generator=torch.Generator(device=A.device).manual_seed(0), device=A.device,
                        dtype=A.dtype)
    gains = torch.linalg.vector_norm(linalg.matmul(A, probe), dim=0) / torch.linalg.vector_norm(probe, dim=0)
    # each test is written so that a NaN or an infinity (float32 products of entries near 1e18 and above overflow)
    # fails it: such a spectrum is not known to be flat, and goes to the SVD
    top = float(gains.max())
    if not 0 < top < math.inf or not float(gains.max() - gains.min()) <= FLAT_RTOL * top:
        return None
    G = _lapack.gram(A).double()
    s2 = float(G.diagonal().mean())
    if not 0 < s2 < math.inf or not float(torch.linalg.matrix_norm(
            G - s2 * torch.eye(r, dtype=G.dtype, device=G.device))) <= FLAT_RTOL * s2:
        return None   # (Frobenius >= spectral: every squared singular value within FLAT_RTOL of s2)
    W = _order_by_sum(linalg.matmul(A.mT, T.to(A.dtype))).to(A.dtype)
    AW = linalg.matmul(A, W)
    S = torch.linalg.vector_norm(AW, dim=0)
    Ub = AW / S
    return (Ub, S, W.mT) if tall else (W, S, Ub.mT)


def sum_ordered_svd(merged: Tensor, total: Tensor, exact: bool = True,
                    to_rank: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of a merged delta (:func:`studio.linalg.svd_tall`) with the basis of each (numerically) degenerate
    cluster of singular values fixed by the task-matrix sum ``total``.

    Inside a cluster of equal singular values (adjacent gaps within :data:`TIE_RTOL`, or the whole nonzero spectrum
    when it is flat within :data:`FLAT_RTOL`) any rotation ``R`` applied to the left and the right singular vectors
    together is an SVD of the same matrix, so its per-direction quantities (SVC's ``s_i^r`` and ``gamma^r``,
    AlignMerge's ``xi``, SAR's top ``k_M`` directions) are whatever LAPACK returns: for the flat spectra of Iso-C,
    Iso-CTS and Ortho-Merge a rotation set by rounding, which differs between CPU and GPU, SVD modes and the order
    of the experts. The official SVC code takes that rotation as it comes, so its SVC on Iso-C is not reproducible
    at all; here each cluster is rotated to diagonalise the symmetric part of ``U_c^T total V_c``, directions
    ordered by the share of the sum they carry. For Iso-C this recovers the sum's own basis (the one the Iso
    authors' SAR code uses, ``U[:, :k]`` of the sum's SVD); where nothing is tied, or the merge is a multiple of the
    sum, nothing moves. Singular values inside a cluster become the diagonal of ``R^T diag(S_c) R`` (equal to
    ``S_c`` up to the cluster's spread).

    ``to_rank=True`` (not ``exact``), for a caller that reads no direction beyond the merge's numerical rank (the
    diagnostics): a rank-deficient merge is decomposed through its float64 Gram to that rank
    (:func:`studio.linalg.svd_gram_to_rank`) where :func:`studio.linalg.svd_tall` would take LAPACK's float32 SVD;
    a full-rank one gets the same bits either way.

    Example:
        >>> total = torch.diag(torch.tensor([1.0, 3.0]))
        >>> U, S, Vh = sum_ordered_svd(2 * torch.eye(2), total)   # any rotation is an SVD; LAPACK returns e1 first
        >>> S.tolist(), U[:, 0].abs().tolist()                    # led by the sum's strongest direction, e2
        ([2.0, 2.0], [0.0, 1.0])
    """
    flat = _flat_svd(merged, total)
    if flat is not None:
        return flat
    found = linalg.svd_gram_to_rank(merged) if to_rank and not exact else None
    return order_ties_by_sum(*(found if found is not None else linalg.svd_tall(merged, exact)), total)


def order_ties_by_sum(U: Tensor, S: Tensor, Vh: Tensor, total: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A thin SVD ``(U, S, Vh)`` (``S`` descending) with each tied cluster rotated by the task-matrix sum ``total``
    as :func:`sum_ordered_svd` describes (unchanged where nothing is tied; new tensors where something is).

    Example:
        >>> total = torch.diag(torch.tensor([1.0, 3.0]))
        >>> U, S, Vh = order_ties_by_sum(torch.eye(2), torch.tensor([2.0, 2.0]), torch.eye(2), total)
        >>> U[:, 0].abs().tolist()   # a tie: led by the sum's strongest direction, e2
        [0.0, 1.0]
    """
    if S.numel() < 2 or not float(S[0]) > 0:
        return U, S, Vh
    # a float32 merge's rounding directions (its null space: an expert equal to the base, Iso-CTS at fraction 0)
    # stand at up to a few eps32 of the largest, past null_tolerance's one: counted live, they made a flat spectrum
    # look graded, and its rotation then followed the experts' order (an engine audit: SVC after such an Iso-CTS
    # 0.87 apart in two orders); rank_tolerance, ten eps32, leaves them out
    live = S > linalg.rank_tolerance(S[0], (S.numel(), S.numel()))
    flat = bool(S[0] - S[int(live.sum()) - 1] <= FLAT_RTOL * S[0])
    tied = (flat | (S[:-1] - S[1:] <= TIE_RTOL * S[0])) & live[1:]
    if not bool(tied.any()):
        return U, S, Vh
    U, S, Vh = U.clone(), S.clone(), Vh.clone()
    pad = torch.zeros(1, dtype=torch.int8, device=S.device)
    edges = torch.nonzero(torch.diff(tied.to(torch.int8), prepend=pad, append=pad)).flatten().tolist()
    for start, stop in zip(edges[0::2], edges[1::2]):   # tied[start:stop]: singular values start..stop
        sl = slice(start, stop + 1)
        Uc, Vc = U[:, sl], Vh[sl].mT
        R = _order_by_sum(linalg.matmul(Uc.mT, linalg.matmul(total.to(Uc.dtype), Vc))).to(U.dtype)
        U[:, sl], Vh[sl] = linalg.matmul(Uc, R), linalg.matmul(Vc, R).mT
        S[sl] = (R * (S[sl].unsqueeze(-1) * R)).sum(0)
    return U, S, Vh


def merged_spectrum_of(deltas: "Tensor | Iterable[Tensor]", merged: Tensor,
                       svd: tuple[Tensor, Tensor, Tensor] | None = None, exact: bool = True,
                       total: Tensor | None = None, held: bool = True) -> MergedSpectrum:
    """Un-memoised :class:`MergedSpectrum` of ``merged`` against ``deltas`` (``svd`` = a precomputed thin SVD of it,
    which the spectrum then references whole if the caller holds it anyway, ``held``:
    :attr:`MergedSpectrum.other`, else keeps its smaller side's factor only; without ``svd``,
    :func:`studio.linalg.svd_tall` with ``exact``, or with ``total`` given, :func:`sum_ordered_svd`).

    Example:
        >>> M = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> merged_spectrum_of(torch.stack([M / 2, M / 2]), M).c.tolist()
        [[1.0, 0.5], [1.0, 0.5]]
    """
    if svd is not None:
        U, S, Vh = svd
    else:
        U, S, Vh = linalg.svd_tall(merged, exact) if total is None else sum_ordered_svd(merged, total, exact)
    c, a2 = subspace_responses(deltas, U, Vh)
    m, n = merged.shape
    side = "left" if m <= n else "right"
    basis = U if side == "left" else Vh.mT
    other = None if svd is None or not held else (Vh if side == "left" else U)
    return MergedSpectrum(S=S, c=c, a2=a2, basis=basis, side=side, other=other)


def merged_spectrum(layer: LayerTasks, merged: Tensor, merged_tag: Hashable | None = None,
                    merged_svd: MergedSvd | None = None) -> MergedSpectrum:
    """:class:`MergedSpectrum` of ``merged`` against the layer's task matrices, computed once per merged delta.

    When ``merged`` is exactly the task-matrix sum (Task Arithmetic, AlignMerge-B's base merge) the pool's cached
    :meth:`~studio.pool.LayerTasks.sum_svd` is reused (shared with Iso-C and the diagnostics). Where the base method
    knows the SVD of its delta from its own factors (``merged_svd``: TSV-M's :func:`~studio.methods.tsv_m.tsv_m_svd`,
    AlignMerge-O's :func:`~studio.methods.align_merge.align_merge_o_svd`, AlignMerge-B's
    :func:`~studio.methods.align_merge.align_merge_b_svd`) that SVD is used: exact where an SVD of
    the float32 delta turns near-tied pairs by its rounding (our choice; the official code decomposes the merged
    delta, the same SVD up to that rounding). Otherwise the delta is decomposed. Either is memoised under
    ``merged_tag`` (``None``: not memoised). Ties in a decomposed spectrum (the flat
    spectra of Iso-C, Iso-CTS, Ortho-Merge) are resolved by the sum (:func:`sum_ordered_svd`), so a calibration
    after them does not depend on the rotation LAPACK happens to return; AlignMerge-O's own SVD is ordered the same
    way (:func:`~studio.methods.align_merge.align_merge_o_svd`). TSV-M's keeps each task's own vectors in a tie,
    which do not depend on the experts' order either: rotating its near-tied clusters by the sum was discontinuous
    (on 8 experts with equal task spectra, where float32 rounding decides which gaps count as ties, AlignMerge-B
    after TSV-M then differed by 0.40 between the SVD modes). The spectrum is of the *unscaled*
    ``merged``: a global scale ``lambda`` multiplies ``S`` only, which the calibrations apply themselves.

    Example:
        >>> from studio.pool import TaskPool
        >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.eye(2)}, "b": {"w": torch.eye(2)}})
        >>> layer = pool.layer("w")
        >>> merged_spectrum(layer, layer.sum()).S.tolist()
        [2.0, 2.0]
    """
    total = layer.sum()
    if merged is total or (merged.shape == total.shape and torch.equal(merged, total)):  # `is`: TA's own memo
        return layer.memo(("align.spectrum", "sum"),
                          lambda: merged_spectrum_of(layer.task_deltas(reuse=True), merged, layer.sum_svd()))
    exact = layer.pool.svd_mode == "exact"

    def compute() -> MergedSpectrum:
        svd = None if merged_svd is None else merged_svd(merged)
        if svd is not None:
            return merged_spectrum_of(layer.task_deltas(reuse=True), merged, svd, held=False)
        return merged_spectrum_of(layer.task_deltas(reuse=True), merged, exact=exact, total=total)

    return compute() if merged_tag is None else layer.memo(("align.spectrum", merged_tag), compute, transient=True)


def preference_weights(preferences: Tensor | None, per_task: Tensor) -> Tensor:
    """The per-task weights ``p [T]`` for a ``[T, ...]`` tensor ``per_task``, in its dtype and on its device:
    ``preferences`` (already normalised by the engine), or uniform ``1/T`` when ``None``.

    Example:
        >>> preference_weights(None, torch.zeros(4, 2)).tolist()
        [0.25, 0.25, 0.25, 0.25]
    """
    T = per_task.shape[0]
    if preferences is None:
        return torch.full((T,), 1.0 / T, dtype=per_task.dtype, device=per_task.device)
    return preferences.to(per_task.device, per_task.dtype)


# ---------------------------------------------------------------------------------------------------------- SVC


def svc_projection_coefficients(S: Tensor, c: Tensor, a2: Tensor, scale: float = 1.0) -> Tensor:
    """SVC projection coefficients ``s_i^r = <a_merge^r, a_i^r> / ||a_i^r||^2`` (SVC eq. 8 / eq. 19), ``[T, R]``.

    With ``a_merge^r = scale * sigma_r v_r^T`` (eq. 10 for the scaled merge) the numerator is
    ``scale * sigma_r * c_i^r``. The denominator is clamped at ``1e-12`` as in the official code, so a task with no
    response in subspace ``r`` gets ``s = 0`` (then clipped to ``alpha`` by eq. 20). The clamp is absolute, so ``s``
    (scale-free in eq. 19) is pulled towards 0 where ``||a_i^r||^2`` nears ``1e-12``: task vectors scaled down
    by 1e-6 (responses ~1e-14 to 1e-11) calibrated 126% away from eq. 19 exactly; CLIP fine-tuning deltas
    respond far above it in the subspaces that carry their energy.

    **Deviation from the official code**: a response of at most :data:`SVC_NOISE_RTOL` (1e-5) of the task's own
    largest, ``|a_i^r| <= 1e-5 max_r |a_i^r|``, also gets ``s = 0``. In float32 a task with no response in ``r``
    (e.g. tasks on orthogonal subspaces) still has one of ~1e-6 of its largest, the rounding of the merged
    singular vectors; eq. 19 then divides that noise by its square, ``s ~ sigma_r / |a_i^r|`` (1e6 for tasks of
    unit size), and eq. 20 all but erases the subspace. The official clamp hides this only while the noise is
    below 1e-6 in absolute terms, so the result depended on the task vectors' size: on 4 orthogonal tasks of a
    ``12 x 10`` layer, SVC on Task Arithmetic gave 2.29x the sum (eq. 20's ``K / (1 + (K - 1) alpha)``, as in
    exact arithmetic) at scale 1e-3 and 0.0047x at scale 1. A genuine response that small would make ``s`` of
    1e5 times ``sigma_r`` over the task's norm; CLIP fine-tuning deltas respond 1e-2 and more of their largest.

    Example:
        >>> S, c, a2 = torch.tensor([4.0]), torch.tensor([[2.0], [2.0]]), torch.tensor([[4.0], [4.0]])
        >>> svc_projection_coefficients(S, c, a2).tolist()   # two identical tasks: s = 2 (double counting)
        [[2.0], [2.0]]
        >>> S, c = torch.tensor([3.0, 2.0]), torch.tensor([[3.0, 1e-6], [1e-6, 2.0]])
        >>> a2 = torch.tensor([[9.0, 2e-12], [2e-12, 4.0]])
        >>> svc_projection_coefficients(S, c, a2).tolist()   # orthogonal tasks: rounding is no response
        [[1.0, 0.0], [0.0, 1.0]]
    """
    s = (scale * S).unsqueeze(0) * c / a2.clamp_min(SVC_EPS)
    return s.masked_fill(svc_no_response(a2), 0.0)


def svc_unresolved(c: Tensor, a2: Tensor) -> Tensor:
    """``[T, R]``: where task ``i``'s projection ``|c_i^r|`` is at or below :data:`SVC_PROJECTION_RTOL` (1e-6) of its
    largest response ``max_r |a_i^r|``, below what float32 resolves of it, so that its sign is rounding's.

    **Deviation (ours), the target guard** (:func:`svc_gamma`): with a one-hot target the official guard's ``gamma``
    is 1 at ``s_t <= 0`` and ``1 / max(alpha, s_t)``, up to ``1/alpha``, at ``s_t > 0``, a step at ``s_t = 0``. A
    low-rank target (a LoRA-like expert; one that differs from another by noise) leaves the merge directions outside
    its span, where ``c_t^r`` is second order in the basis' tilt (~1e-8 of the largest response) and its computed
    value is float32's error, of either sign: that rounding decided each such subspace. A rank-1 target and its near
    copy, SVC at ``alpha = 1e-4``, merged up to 2.4 apart (relative) stored on a zero and on a random base (an audit,
    2026-12); the guard now keeps such a subspace (``gamma = 1``) on both. The computed projection's error against
    float64 reached 4.5 float32 eps of the largest response (5.4e-7 in ``svd_mode="exact"``, over 270 merges of a
    rank-1 target and a copy with noise, ``4 x 3`` to ``128 x 96``; docs/ACCURACY.md, "SVC's projection rule").
    Only the guard reads this: eq. 20's ``max(alpha, s)`` is continuous in ``s``, and ``s`` keeps every projection.
    Zeroing these ``s`` as well turned SVC after AlignMerge-O of tasks with tied spectra (where a task's share of a
    direction is arbitrary and its projection second order in it) 0.12 apart between two orders of the experts under
    OpenBLAS's SkylakeX kernel, against 6.6e-4 with them kept.

    Example:
        >>> svc_unresolved(torch.tensor([[2.0, 1e-7, -3e-6]]), torch.tensor([[4.0, 1e-6, 1e-6]])).tolist()
        [[False, True, False]]
    """
    floor = SVC_PROJECTION_RTOL * a2.amax(-1, keepdim=True).sqrt()
    return (c.abs() <= floor) & torch.isfinite(floor)   # an overflow is named by the merge's own check


def svc_no_response(a2: Tensor) -> Tensor:
    """``[T, R]``: where task ``i`` has no response in subspace ``r`` by SVC's noise floor,
    ``||a_i^r|| <= SVC_NOISE_RTOL * max_r ||a_i^r||`` (see :func:`svc_projection_coefficients`), from
    ``a2 = ||a_i^r||^2`` over all the merged subspaces.

    Example:
        >>> svc_no_response(torch.tensor([[4.0, 1e-12, 0.0], [0.0, 0.0, 0.0]])).tolist()
        [[False, True, True], [True, True, True]]
    """
    floor = SVC_NOISE_RTOL ** 2 * a2.amax(-1, keepdim=True)
    # an overflowed response (inf) is no scale for a floor: the merge's own finiteness check then names it
    return (a2 <= floor) & torch.isfinite(floor)


def svc_gamma(s: Tensor, alpha: float, preferences: Tensor | None = None, target_guard: bool = True,
              unresolved: Tensor | None = None) -> Tensor:
    """SVC calibration factor per subspace, ``gamma [R]`` (SVC eq. 20, sec. 5.3 preference optimisation).

    Weighted harmonic aggregation of the clipped task-wise scalings ``1 / max(alpha, s_i^r)`` with normalised
    preferences ``p`` (``sum_i p_i = 1``)::

        gamma^r = sum_i p_i / sum_i p_i max(alpha, s_i^r)

    * uniform ``p_i = 1/K`` gives eq. 20 exactly: ``gamma^r = K / sum_i max(alpha, s_i^r)`` (official code:
      ``eta = torch.maximum(s, alpha).mean(1)``, ``S / eta``);
    * one-hot ``p = e_t`` gives the target-task calibration of sec. 5.3, ``gamma^r = 1 / max(alpha, s_t^r)``.
      The official code's target mode (``args.target``) additionally leaves a subspace unchanged
      (``gamma^r = 1``) when ``s_t^r <= 0``; ``target_guard=True`` (default) follows the code, ``False`` the
      paper's formula (which would amplify such a subspace by ``1/alpha``). The guard applies only to an exactly
      one-hot ``p``: a weight of ``1e-6`` on a second task gives the weighted rule, so such a subspace jumps from
      ``gamma = 1`` to ``~1/alpha`` (``False`` makes the result continuous in ``p``).

    Args:
        s: projection coefficients ``[T, R]`` (:func:`svc_projection_coefficients`).
        alpha: the clip ``alpha in (0, 1]``; ``alpha = 1`` is suppression-only (``gamma <= 1``).
        preferences: ``[T]`` non-negative weights summing to 1, or ``None`` (uniform).
        target_guard: see above; only used when ``preferences`` is one-hot.
        unresolved: ``[T, R]`` projections whose sign is rounding's (:func:`svc_unresolved`): the guard keeps those
            subspaces (``gamma = 1``) whatever that sign.

    Example:
        >>> s = torch.tensor([[2.0, 0.5], [4.0, -1.0]])
        >>> svc_gamma(s, 1.0).tolist()            # K / sum max(1, s): [2/6, 2/2]
        [0.3333333432674408, 1.0]
        >>> svc_gamma(s, 0.5, torch.tensor([0.0, 1.0])).tolist()   # target task 2; s = -1 <= 0 keeps gamma = 1
        [0.25, 1.0]
        >>> svc_gamma(s, 0.5, torch.tensor([0.0, 1.0]), unresolved=torch.tensor([[False] * 2, [True, False]])).tolist()
        [1.0, 1.0]
    """
    p = preference_weights(preferences, s)
    clipped = s.clamp_min(alpha)
    active = p > 0
    if target_guard and int(active.sum()) == 1:
        t = int(torch.nonzero(active)[0])
        st = s[t]
        raised = st > 0 if unresolved is None else (st > 0) & ~unresolved[t]
        return torch.where(raised, 1.0 / clipped[t], torch.ones_like(st))
    weighted = torch.where(active.unsqueeze(-1), p.unsqueeze(-1) * clipped, torch.zeros_like(clipped))
    return p.sum() / weighted.sum(0)


# ---------------------------------------------------------------------------------------------------- AlignMerge


def subspace_scaling_eta(S: Tensor, c: Tensor) -> Tensor:
    """AlignMerge eta^r = sigma^r / (u_r^T (sum_i Delta_i) v_r) (eq. 4), ``[R]``; 1 for Task Arithmetic.

    Example:
        >>> subspace_scaling_eta(torch.tensor([3.0]), torch.tensor([[1.0], [2.0]])).tolist()
        [1.0]
    """
    return S / c.sum(0)


def subspace_cross_influence(c: Tensor) -> Tensor:
    """Subspace Cross-Influence ``xi[i, j, r] = xi_{i,j}^r`` (AlignMerge Prop. 1, eq. 5 / App. B.2), ``[T, T, R]``.

    App. B.2 defines ``xi_{i,j}^r = alpha_1 + alpha_2``: ``alpha_1`` projects ``P_col Delta_j`` onto
    ``P_col Delta_i`` (Frobenius, eq. 3) and ``alpha_2`` projects the row-space part of the residual onto
    ``P_col Delta_i P_row``. Both ``P_col^r Delta P_row^r`` are multiples of the rank-one ``u_r v_r^T``
    (``c_j^r u_r v_r^T`` and ``c_i^r u_r v_r^T``), so the sum collapses exactly to ``c_j^r / c_i^r``
    (:func:`cross_influence_terms` computes the two steps literally; the tests check they agree). This is why the
    paper finds eq. 6 tight and the column/row order immaterial (App. E.2, Fig. 7). ``xi[i, i] = 1``.

    This reads eq. 5's ``W_i^r`` as task ``i``'s component in subspace ``r``, ``P_col Delta_i`` (App. B.2's
    ``alpha_1`` projects onto ``P_col Delta_i``), the reading under which eq. 7 holds with equality, so that
    Prop. 2's optimum ``xi^r = 1`` is the calibration that reproduces task ``i``'s own component (``c_i^r``).
    (Dividing ``sigma`` by ``xi~`` sets ``SAI`` to 0 under either reading: ``xi~`` is proportional to ``sigma``
    in a fixed basis.) Read as the whole ``Delta_i``, the projections no longer collapse, the column-first and
    row-first orders differ slightly (the "very similar" of App. E.2), and on random low-rank experts the lower
    subspaces' ``xi~`` and AlignMerge-B's result differ by tens of percent (an independent float64 reference of
    both readings, 2026-12-04).

    Example:
        >>> subspace_cross_influence(torch.tensor([[1.0], [3.0]]))[:, :, 0].tolist()
        [[1.0, 3.0], [0.3333333432674408, 1.0]]
    """
    return c.unsqueeze(0) / c.unsqueeze(1)


def cross_influence_terms(deltas: Tensor, U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """The two projection steps of AlignMerge App. B.2 (eq. 22-24), literally: ``(alpha_1, alpha_2)``, ``[T, T, R]``.

    ``alpha_1[i, j, r] = Proj_{u_r a_i^T}(u_r a_j^T) = <a_j, a_i> / ||a_i||^2`` with ``a_k = Delta_k^T u_r``
    (column step; this is SVC's cross term, Lemma 3.2); ``alpha_2`` projects the residual
    ``W_res P_row = ((a_j - alpha_1 a_i) . v_r) u_r v_r^T`` onto ``P_col Delta_i P_row = c_i u_r v_r^T`` (row step).
    ``xi = alpha_1 + alpha_2`` (eq. 24). For plotting the two contributions separately (Fig. 7) and for testing
    :func:`subspace_cross_influence`. Cost ``O(T^2 R n)``: diagnostics only.

    Example:
        >>> d = torch.stack([torch.eye(2), 2 * torch.eye(2)])
        >>> a1, a2 = cross_influence_terms(d, torch.eye(2), torch.eye(2))
        >>> (a1 + a2)[0, 1].tolist()
        [2.0, 2.0]
    """
    A = torch.einsum("mr,tmn->trn", U, deltas)  # a_t^r as rows: [T, R, n]
    norms = (A * A).sum(-1)  # [T, R]
    dots = torch.einsum("irn,jrn->ijr", A, A)  # <a_i, a_j>
    alpha1 = dots / norms.unsqueeze(1)  # [i, j, r] = <a_j, a_i> / ||a_i||^2
    proj_v = (A * Vh.unsqueeze(0)).sum(-1)  # c_t^r = a_t . v_r   [T, R]
    resid_v = proj_v.unsqueeze(0) - alpha1 * proj_v.unsqueeze(1)  # (a_j - alpha1 a_i) . v
    alpha2 = resid_v / proj_v.unsqueeze(1)
    return alpha1, alpha2


def full_coefficient(S: Tensor, c: Tensor) -> Tensor:
    """AlignMerge full coefficient ``xi~_i^r = eta^r (sum_{j != i} xi_{i,j}^r + 1)`` (eq. 7, sec. 4.1), ``[T, R]``.

    Substituting eq. 4 and Prop. 1: ``eta^r (sum_j c_j^r) / c_i^r = sigma^r / c_i^r`` -- the factor by which the
    merged singular value exceeds task ``i``'s own singular value in that subspace (so dividing by it makes
    ``SAI_i^r = 0``, and the calibrated value is ``c_i^r``, the Prop. 2 optimum). ``+-inf`` where ``c_i^r = 0``.

    Example:
        >>> full_coefficient(torch.tensor([4.0]), torch.tensor([[1.0], [3.0]])).tolist()
        [[4.0], [1.3333333730697632]]
    """
    return S.unsqueeze(0) / c


def subspace_alignment_index(S: Tensor, c: Tensor, signed: bool = False) -> Tensor:
    """Subspace-Alignment Index ``SAI_i^r = |xi~_i^r - 1|`` (AlignMerge eq. 8), ``[T, R]``.

    ``signed=True`` gives ``xi~_i^r - 1`` as plotted in AlignMerge Fig. 3 (``> 0``: task ``i`` is over-amplified
    in subspace ``r``; ``< 0``: over-suppressed). Lower is less interference.

    Example:
        >>> subspace_alignment_index(torch.tensor([4.0]), torch.tensor([[1.0], [8.0]]), signed=True).tolist()
        [[3.0], [-0.5]]
    """
    dev = full_coefficient(S, c) - 1.0
    return dev if signed else dev.abs()


def align_b_factors(xi_tilde: Tensor, alpha: float, preferences: Tensor | None = None) -> Tensor:
    """AlignMerge-B per-subspace factors ``1 / d(xi~^r)`` (eq. 9), ``[R]``, for ``xi_tilde [T, R]``.

    ``xi~^r`` is the preference-weighted average of the task-wise full coefficients,
    ``xi~^r = sum_i p_i xi~_i^r`` (sec. 4.1: "the average of xi~_i^r across tasks" for uniform ``p``; one-hot ``p``
    is the single-target form of eq. 9, sec. 5.3 preference optimisation). Then ``d = xi~`` if ``xi~ >= alpha``
    (rescale), ``d = 1`` if ``0 < xi~ < alpha`` (the gate ``alpha`` leaves mildly amplified subspaces alone) and
    ``d = inf`` (drop the subspace) if ``xi~ <= 0`` (task ``i`` non-contributory). At ``xi~ = 0`` the paper's cases
    overlap; we drop (the ``<= 0`` case). Tasks with ``p_i = 0`` do not enter the average (so an infinite
    ``xi~_i`` of an excluded task cannot leak in). ``preferences`` may also be ``[T, R]``: weights per subspace
    (each column normalised), as AlignMerge-B's rule for tasks absent from a subspace gives.

    Example:
        >>> xt = torch.tensor([[4.0, 1.5, -2.0], [2.0, 1.5, 1.0]])
        >>> align_b_factors(xt, alpha=2.0).tolist()   # means 3, 1.5, -0.5 -> 1/3, kept, dropped
        [0.3333333432674408, 1.0, 0.0]
    """
    p = preference_weights(preferences, xi_tilde)
    p = p.unsqueeze(-1) if p.dim() == 1 else p
    xi = torch.where(p > 0, p * xi_tilde, torch.zeros_like(xi_tilde)).sum(0) / p.sum(0)
    ones = torch.ones_like(xi)
    f = torch.where(xi >= alpha, 1.0 / xi, ones)
    f = torch.where(xi <= 0, torch.zeros_like(xi), f)
    # NaN arises only for 0/0 (sigma = 0 and c = 0): that component is zero anyway.
    return torch.where(torch.isnan(xi), ones, f)


# -------------------------------------------------------------------------------------------- low-rank helpers


def factored_svd(left: Tensor, core: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``left @ core @ right^T`` for thin ``left [m, k]``, ``right [n, k]`` (``k`` small) in O((m+n)k^2).

    QR of both factors, then the SVD of the ``k x k`` core. Used for the rank-two residuals of AlignMerge-O
    (eq. 12) and the rank-``K`` reference direction of its sign alignment, which never need an ``m x n`` matrix.

    Example:
        >>> u = torch.tensor([[1.0], [0.0], [0.0]]); v = torch.tensor([[0.0], [2.0]])
        >>> U, S, Vh = factored_svd(u, torch.tensor([[3.0]]), v)
        >>> S.tolist()
        [6.0]
    """
    Ql, Rl = torch.linalg.qr(left)
    Qr, Rr = torch.linalg.qr(right)
    Uc, S, Vhc = torch.linalg.svd(Rl @ core @ Rr.mT)
    return Ql @ Uc, S, Vhc @ Qr.mT


#: :func:`partial_polar`'s default ``rtol`` for float32 (and half-precision) inputs.
_PARTIAL_POLAR_RTOL32 = 1e-6


def partial_polar_range(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`partial_polar` of a tall float32 (or half-precision) ``matrix`` at the default ``rtol`` (the same
    bits), with its factorisation ``P W^T`` (:func:`studio.linalg.polar_gram_range`).

    Example:
        >>> P, Pr, W = partial_polar_range(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        >>> torch.equal(P, partial_polar(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))), Pr.shape
        (True, torch.Size([3, 1]))
    """
    polar, P, W = linalg.polar_gram_range(matrix.float(), rtol=_PARTIAL_POLAR_RTOL32)
    return polar.to(matrix.dtype), P, W


def partial_polar(matrix: Tensor, rtol: float | None = None) -> Tensor:
    """Polar factor restricted to the numerical range: ``P_+ Q_+^T`` over singular values ``> rtol * sigma_max``.

    Equals :func:`studio.linalg.polar` (TSV-M's whitening ``P Q^T``) when ``matrix`` has full column rank. When it
    does not, ``P Q^T`` is not unique -- the columns of ``P`` for zero singular values are whatever LAPACK returns --
    and this returns the unique closest partial isometry instead (the null direction is dropped, not filled with an
    arbitrary vector). AlignMerge-O needs this: its ``U^`` always holds ``K + 1`` vectors (``u_top`` and the ``K``
    residual directions) inside the ``K``-dimensional span of the tasks' top vectors. Default ``rtol``: ``1e-6``
    for float32 (structural zeros measured at ~1e-8, genuine small values of 768-wide bases at ~3e-5), ``1e-12``
    for float64.

    Float32 (and half-precision) inputs go through the float64 Gram matrix (:func:`studio.linalg.polar_gram`, which
    resolves singular values down to ~3e-7 of the largest, so ``rtol`` should not go below ~1e-6): 100 vs 117
    ms for LAPACK's float32 SVD at ``768 x 761``, 167 vs 237 ms at ``2304 x 761``, 185 vs 274 ms at ``3072 x 761``
    (one core, AlignMerge-O's bases; results within 1e-5), and closer to the exact partial isometry where columns are
    nearly dependent (1.4e-4 vs 3.3e-3 max error in the tests). Float64 inputs take the SVD, which honours any ``rtol``.

    Example:
        >>> A = torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])   # rank one: two copies of e1
        >>> [[round(x, 6) for x in row] for row in partial_polar(A).tolist()]
        [[0.707107, 0.707107], [0.0, 0.0], [0.0, 0.0]]
    """
    if matrix.dtype != torch.float64:
        return linalg.polar_gram(matrix.float(), rtol=_PARTIAL_POLAR_RTOL32 if rtol is None else rtol).to(matrix.dtype)
    U, S, Vh = linalg.svd(matrix)
    if rtol is None:
        rtol = 1e-12
    keep = S > rtol * S[0] if S.numel() and float(S[0]) > 0 else torch.zeros_like(S, dtype=torch.bool)
    return U[:, keep] @ Vh[keep]
