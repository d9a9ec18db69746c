"""AlignMerge ("Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging", anonymous
submission under double-blind review): AlignMerge-B (post-merging balancing, sec. 4.1, eq. 9) and AlignMerge-O
(pre-merging orthogonalisation, sec. 4.2, eq. 11-14, App. C Alg. 1).

No official code is public (none found in the code index); this follows the paper. AlignMerge-B is registered
twice: as a calibration (``calibrate="align_merge_b"``, applied after any base merge, App. E.2 Table 15: TIES/DARE
w/ AlignMerge-B) and as a merge method (its paper default: calibrate the task-matrix sum, sec. 4.1 / App. E.2).
The cross-influence / SAI building blocks live in :mod:`studio.methods._align`.
"""

from __future__ import annotations

from typing import Hashable

import torch
from torch import Tensor

from .. import _lapack, linalg
from ..pool import LayerTasks
from ..registry import register
from ..schema import Param, StudioError
from ._align import (MergedSpectrum, MergedSvd, align_b_factors, factored_svd, full_coefficient, merged_spectrum,
                     order_ties_by_sum, partial_polar, partial_polar_range, preference_weights)


def resolve_gate(alpha: float | None, num_tasks: int) -> float:
    """AlignMerge-B's automatic gate ``alpha = |T| / 4`` (sec. 5.3, "a reasonable default for unseen tasks").

    The paper's tuned values (sec. 5.1, App. D) are 0.6 for 2 tasks, 1.8 for 8, 2.8 for 14 and 6.5 for 20, against
    0.5, 2, 3.5 and 5 from ``|T| / 4``: within 0.2 up to 8 tasks, 20-25 % off at 14 and 20. Set ``alpha`` to the
    tuned value to reproduce the paper's tables.

    Example:
        >>> resolve_gate(None, 8), resolve_gate(1.8, 8)
        (2.0, 1.8)
    """
    return num_tasks / 4.0 if alpha is None else float(alpha)


_GATE = Param(
    "alpha", float, None, low=0.0, high=100.0, ui_step=0.1, auto="|T|/4",
    help="Gate: only subspaces whose merged singular value exceeds the tasks' own by more than this factor "
         "(xi~ >= alpha) are divided by xi~; 0 <= xi~ < alpha stay, xi~ <= 0 are dropped. 0 = no gating.",
    paper="AlignMerge eq. 9; sec. 5.3 default alpha ~ |T|/4; tuned 1.8 for 8 tasks (sec. 5.1), 0.6 / 2.8 / 6.5 "
          "for 2 / 14 / 20 tasks (App. D)")


def align_merge_b_delta(layer: LayerTasks, merged: Tensor, alpha: float, *, scale: float = 1.0,
                        preferences: Tensor | None = None, merged_tag: Hashable | None = None,
                        merged_svd: MergedSvd | None = None) -> Tensor:
    """AlignMerge-B (eq. 9) of the merged delta ``M = scale * merged``.

    ``M = U diag(sigma) V^T`` (:func:`~studio.methods._align.merged_spectrum`: memoised under ``merged_tag``, from
    the base method's own factors where ``merged_svd`` gives them); per subspace the task-wise full coefficient
    ``xi~_i^r = eta^r (sum_{j != i} xi_{i,j}^r + 1) = sigma^r / c_i^r`` (eq. 7,
    :func:`~studio.methods._align.full_coefficient`), aggregated as
    ``xi~^r = sum_i p_i xi~_i^r`` (uniform ``p``: the paper's average over tasks; one-hot ``p = e_t``: the
    single-target eq. 9 used for preference optimisation, sec. 5.3), and ``sigma^r <- sigma^r / d(xi~^r)``.
    When a subspace is rescaled its new singular value is the ``p``-weighted *harmonic* mean of the tasks'
    ``c_i^r = u_r^T Delta_i v_r`` (the Prop. 2 optimum for a single task), independent of ``scale``. A task that
    left this layer unchanged takes no part in its average (:func:`_present`).

    Example:
        >>> from studio.pool import TaskPool
        >>> d = torch.diag(torch.tensor([1.0, 0.1]))
        >>> layer = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": d}, "b": {"w": d}}).layer("w")
        >>> align_merge_b_delta(layer, layer.sum(), alpha=1.5).diagonal().tolist()  # xi~ = 2 >= 1.5: divide
        [1.0, 0.10000000149011612]
    """
    spec, factors = _align_b_factors(layer, merged, alpha, scale, preferences, merged_tag, merged_svd)
    return spec.rescale(merged, factors, scale)


def _align_b_factors(layer: LayerTasks, merged: Tensor, alpha: float, scale: float, preferences: Tensor | None,
                     merged_tag: Hashable | None, merged_svd: MergedSvd | None) -> "tuple[MergedSpectrum, Tensor]":
    """The spectrum of ``merged`` and eq. 9's factor of each of its singular values: the one route of
    :func:`align_merge_b_delta` and :func:`align_merge_b_svd`, so that the SVD gives the merge's own bits."""
    spec = merged_spectrum(layer, merged, merged_tag, merged_svd)
    if not bool(torch.isfinite(spec.S).all()):   # every direction would read as null below: the base, silently
        raise StudioError(f"align_merge_b: the singular values of the merged delta of '{layer.key}' are not finite "
                          f"(max |merged delta| = {float(merged.abs().max()):.3g}; its products overflow float32)")
    xi_tilde = full_coefficient(scale * spec.S, spec.c)
    factors = align_b_factors(xi_tilde, alpha, _present(spec.c, preferences))
    # A calibration rescales the merge's directions; it must not create any. Numerically zero singular values (a
    # rank-deficient merge, e.g. TSV-M's) have arbitrary vectors, and sigma / xi~ there is the tasks' c in that
    # arbitrary direction: at a low gate it came back at the size of a real update, different per SVD mode.
    null = spec.S <= linalg.null_tolerance(spec.S.abs().max(), spec.S.numel())
    return spec, torch.where(null, torch.zeros_like(factors), factors)


def align_merge_b_svd(layer: LayerTasks, merged: Tensor, alpha: float | None = None,
                      preferences: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
    """The thin SVD of the :func:`align_merge_b` merge ``merged`` from its own factors: the task-matrix sum's
    singular vectors with the rescaled singular values ``f_r sigma_r`` (descending, stable, so ties keep the sum's
    order; its nonzero ones only), or ``None`` where every subspace was dropped. ``merged`` (the ``merged_svd``
    protocol's argument) is not read: :func:`_align_b_factors` rebuilds the factors the merge was made from, from the
    pool's memoised spectrum of the sum (a few length-``R`` vectors per layer).

    A calibration after AlignMerge-B takes its subspaces from here, as after TSV-M and AlignMerge-O: eq. 9 can bring
    two rescaled singular values within rounding of each other, and an SVD of the float32 merged delta then turns
    their pair by its rounding. SVC after AlignMerge-B in ``svd_mode="exact"`` moved by 1.4e-4 (9e-4 of the largest
    delta entry) with the experts' order so, on the tests' 4-expert CLIP-like state dict with OpenBLAS's Haswell
    kernel (found when the permutation test first ran the calibrations in both SVD modes, 2026-12-06).

    Example:
        >>> from studio.pool import TaskPool
        >>> g = torch.Generator().manual_seed(0)
        >>> experts = {f"t{i}": {"w": torch.randn(9, 7, generator=g)} for i in range(3)}
        >>> layer = TaskPool({"w": torch.zeros(9, 7)}, experts).layer("w")
        >>> merged = align_merge_b(layer, alpha=None)
        >>> U, S, Vh = align_merge_b_svd(layer, merged)
        >>> bool((S[:-1] >= S[1:]).all()), torch.allclose(U * S @ Vh, merged, atol=1e-5)
        (True, True)
    """
    spec, factors = _align_b_factors(layer, layer.sum(), resolve_gate(alpha, layer.num_tasks), 1.0, preferences,
                                     None, None)
    U, Vh = (spec.basis, spec.other) if spec.side == "left" else (spec.other, spec.basis.mT)
    S = factors.to(spec.S.dtype) * spec.S
    keep = S > 0
    if not bool(keep.any()):
        return None
    order = torch.sort(S[keep], descending=True, stable=True).indices
    return U[:, keep][:, order], S[keep][order], Vh[keep][order]


#: A task's response ``|c_i^r|`` at or below this fraction of the largest task's in subspace ``r`` is absent there.
_ABSENT_RTOL = 1e-6


def _present(c: Tensor, preferences: Tensor | None) -> Tensor | None:
    """Preferences per subspace, ``[T, R]``, restricted to the tasks present in each (paper silent; our rule).

    A task with no response in subspace ``r`` (``c_i^r = 0``: the expert left the layer unchanged, or updated
    other directions only) has ``xi~_i^r = sigma^r / 0 = +-inf``, and the paper's average would then drop the
    subspace (or, with ``+inf`` and ``-inf`` from zeros of both signs, keep it unchanged): one expert that did not
    touch a direction would erase the others' update of it. Such a task is left out of that subspace's average, as
    a task with preference weight 0 is. "No response" includes rounding: ``|c_i^r| <= 1e-6 max_j |c_j^r|`` (an
    expert that froze the layer but was stored in another precision differs from the base by rounding, whose
    ``xi~`` of ~1e9 divided the layer away). A subspace that no weighted task touches keeps the preferences (a
    one-hot target absent from it then gets it dropped, the Prop. 2 optimum ``c_t = 0``). ``None`` when every
    task is present everywhere (the paper's plain average).

    Example:
        >>> _present(torch.tensor([[1.0, 2.0], [0.0, 1.0], [3.0, 0.0]]), None).tolist()
        [[0.5, 0.5], [0.0, 0.5], [0.5, 0.0]]
    """
    present = c.abs() > _ABSENT_RTOL * c.abs().amax(0, keepdim=True)
    if bool(present.all()):
        return preferences
    p = preference_weights(preferences, c).unsqueeze(-1)
    kept = p * present
    total = kept.sum(0, keepdim=True)
    return torch.where(total > 0, kept / total.clamp_min(torch.finfo(kept.dtype).tiny), p.expand_as(kept))


@register(
    "align_merge_b",
    kind="calibration",
    decomposes=True,
    params=(_GATE,),
    paper="AlignMerge (Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging), sec. 4.1 eq. 9; "
          "App. E.2 Table 15 (TIES / DARE w/ AlignMerge-B)",
    summary="Divide each singular value of the merged delta by the tasks' average full coefficient xi~ "
            "(gated by alpha); directions unchanged.",
)
def align_merge_b_calibration(layer: LayerTasks, merged: Tensor, *, scale: float, preferences: Tensor | None,
                              base_method: str, merged_tag: Hashable | None = None,
                              merged_svd: MergedSvd | None = None, alpha: float | None) -> Tensor:
    """AlignMerge-B applied after any base method (App. E.2, Table 15); returns the final delta.

    Like SVC (same group; its official code descends from this step) the calibration sees the base method's final
    delta ``scale * merged`` and the result is added with lambda = 1 (eq. 9: ``W = W_pre + Delta W~``). Preferences
    weight the per-task coefficients, ``xi~^r = sum_i p_i xi~_i^r`` (one-hot = target task, sec. 5.3). The layer rule
    is the default one: the paper calibrates "each singular subspace of the merged model" and names no exclusions.
    Equals the ``align_merge_b`` merge method on matrix layers when the base is Task Arithmetic with ``alpha=1``.

    Example:
        >>> from studio.pool import TaskPool
        >>> d = torch.diag(torch.tensor([1.0, 0.1]))
        >>> layer = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": d}, "b": {"w": 3 * d}}).layer("w")
        >>> out = align_merge_b_calibration(layer, layer.sum(), scale=1.0, preferences=None,
        ...                                 base_method="task_arithmetic", alpha=0.0)
        >>> [round(x, 4) for x in out.diagonal().tolist()]   # harmonic mean of 1 and 3 per subspace: 1.5
        [1.5, 0.15]
    """
    return align_merge_b_delta(layer, merged, resolve_gate(alpha, layer.num_tasks), scale=scale,
                               preferences=preferences, merged_tag=merged_tag, merged_svd=merged_svd)


@register(
    "align_merge_b",
    params=(
        _GATE,
        Param("lam", float, 1.0, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Global scale lambda on the calibrated delta (the paper adds it with lambda = 1).",
              paper="AlignMerge eq. 1 / sec. 4.1: W_merge = W_pre + Delta W~_merge"),
    ),
    paper="AlignMerge (Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging), sec. 4.1 eq. 9 "
          "on the task-matrix sum (App. E.2: 'applies singular vector subspace correction after summing all "
          "weights')",
    summary="Sum the task matrices, then divide each singular value by the tasks' average full coefficient xi~ "
            "(gated by alpha).",
    vector_rule="mean",
    decomposes=True,
    uses_preferences=True,
    merged_svd=lambda layer, merged, alpha=None, preferences=None: align_merge_b_svd(layer, merged, alpha, preferences),
)
def align_merge_b(layer: LayerTasks, alpha: float | None, preferences: Tensor | None = None) -> Tensor:
    """AlignMerge-B as a merge: eq. 9 on ``sum_i Delta_i``; unscaled (lambda: ``lam``).

    Non-matrix tensors get the mean of the task vectors (``vector_rule="mean"``, the TSV/Iso convention; the paper
    does not say). ``preferences`` (normalised, from the engine) weight the tasks' average full coefficient exactly
    as in the calibration form (sec. 5.3: uniform = the paper's average, one-hot = target-task optimisation), so
    on matrix layers this equals ``task_arithmetic`` with ``alpha=1`` + ``calibrate="align_merge_b"`` with the same
    preferences (the other tensors differ: the mean here, Task Arithmetic's sum there).

    Example:
        >>> from studio.pool import TaskPool
        >>> d = torch.diag(torch.tensor([2.0, 0.5]))
        >>> layer = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": d}, "b": {"w": d}}).layer("w")
        >>> align_merge_b(layer, alpha=None).diagonal().tolist()   # gate 2/4 = 0.5, xi~ = 2: back to one task
        [2.0, 0.5]
    """
    return align_merge_b_delta(layer, layer.sum(), resolve_gate(alpha, layer.num_tasks), preferences=preferences)


# ------------------------------------------------------------------------------------------------- AlignMerge-O

#: Eq. 12 residuals at or below this fraction of their own task's top singular value ``sigma_i`` are rounding: the
#: residual of ``M_i = sigma_i u_i v_i^T`` is ``sigma_i`` times a difference of float32 unit vectors (~1e-7 each),
#: measured at 4.5e-8 of ``sigma_i`` for a lone task, where a real one is ``sigma_i sin(angle to u_top)``. (Relative
#: to the largest task's ``sigma`` instead, it dropped a 1e-6-scaled expert's real residual: 30 % off Alg. 1.)
_RESIDUAL_RTOL = 1e-5


#: :func:`_align_top_signs`: an alignment score (a sum of two cosines of unit vectors) at or below this is rounding.
_SIGN_TIE_ATOL = 1e-5


def _align_top_signs(U1: Tensor, S1: Tensor, V1: Tensor) -> tuple[Tensor, Tensor]:
    """Fix the SVD sign gauge of each task's top pair ``(u_i^1, v_i^1)`` before eq. 11 sums them.

    ``sigma u v^T`` is invariant under ``(u, v) -> (-u, -v)`` but ``sum_i u_i^1`` is not, and the paper does not
    say which sign to take. We flip each pair jointly (leaving ``M_i^1`` unchanged) so that
    ``<u_i, u_ref> + <v_i, v_ref> >= 0``, where ``(u_ref, v_ref)`` is the top singular pair of
    ``sum_i sigma_i^1 u_i^1 (v_i^1)^T``, its own sign fixed by :func:`studio.linalg.canonical_signs`: an
    order-free reference, so the merge is symmetric in the experts. A pair whose score is rounding
    (``|score| <= 1e-5``, :data:`_SIGN_TIE_ATOL`: its top pair is orthogonal to the reference, e.g. tasks on
    orthogonal subspaces) keeps the pool's canonical sign; the sign of ~1e-8 of noise changed the merge by 10 %
    with the experts' order and with ``svd_mode`` before. Where two tasks' top singular values are equal the
    reference pair itself is any mix of theirs (the SVD's choice), and the result still depends on it (12 % across
    the orders of 4 orthogonal tasks of equal top sigma).
    """
    Ur, _, Vhr = factored_svd(U1, torch.diag(S1), V1)
    u_ref, vh_ref = linalg.canonical_signs(Ur[:, :1], Vhr[:1])
    score = U1.mT @ u_ref[:, 0] + V1.mT @ vh_ref[0]
    sign = torch.where(score < -_SIGN_TIE_ATOL, -1.0, 1.0).to(U1.dtype)
    return U1 * sign, V1 * sign


def align_merge_o_delta(layer: LayerTasks, eta: str = "sum", align_signs: bool = True) -> Tensor:
    """AlignMerge-O (App. C, Alg. 1) of one layer, unscaled.

    1. Per task, the top ``L = floor((R - 1) / K)`` singular triplets (Alg. 1 line 3; cached truncated SVD).
    2. Aligned subspace (eq. 11): ``u_top = sum_i u_i^1 / ||.||``, ``v_top`` likewise,
       ``sigma_top = mean_i sigma_i^1``; ``M_top = sigma_top u_top v_top^T``.
    3. Residuals (eq. 12): ``M_res,i = M_i^1 - Proj_{M_top}(M_i^1) M_top`` with the Frobenius projection of eq. 3;
       keep its top triplet (Alg. 1 line 11-12; a rank-two SVD, :func:`~studio.methods._align.factored_svd`).
    4. ``U^ = [u_top, {u_res,i}, {u_i^{2:L}}]``, same for ``V^``, ``Sigma^`` (eq. 13; column order is immaterial);
       whitening ``U^_perp = P Q^T`` of ``U^ = P D Q^T`` (TSV-M's orthogonalisation), restricted to the nonzero
       ``D``: ``u_top`` and the ``K`` residual directions all lie in the span of the ``K`` top vectors, so ``U^``
       always has a zero singular value and ``P Q^T`` is not unique; we take the partial polar factor
       (:func:`~studio.methods._align.partial_polar`), which drops that null direction deterministically.
    5. ``eta^r = sigma^^r / (u^_perp^r^T (sum_i Delta_i) v^_perp^r)`` (Alg. 1 line 24; ``eta="sum"``) or, with
       ``eta="dominant"``, the denominator of the single task ``i* = argmax_i |u^T Delta_i v|`` (eq. 10, App. E.2
       "Effectiveness of eta"). The paper states both; Alg. 1 is the default.
    6. ``Delta W~ = c sum_r (sigma^^r / eta^r) u^_perp^r v^_perp^r^T`` (eq. 14): the singular values become the
       projections ``sigma^/eta = u^T (sum Delta) v``, and ``c`` gives the result the Frobenius norm of ``Sigma^``
       (App. B.4: "the overall Frobenius norm ... remains consistent"). Eq. 14 writes ``c = sqrt(sum sigma^^2 /
       sum (sigma^/eta)^2)``, which is that norm only for orthonormal ``U^_perp``, ``V^_perp``; with the partial
       polar factors (step 4) it can fall well short (0.3-0.6 of the target on layers whose tasks share their top
       direction), so ``c`` is taken from the reconstruction's measured norm. Both agree for full-rank bases.

    Interpretations (paper silent): the partial polar factor above; the top pairs' SVD signs are aligned before
    summing (``align_signs``, see :func:`_align_top_signs`); a residual of eq. 12 at rounding level (a task whose
    top pair is ``u_top, v_top``: a lone task, twins, one-hot preferences), any column with ``sigma^ = 0`` (a task
    weighted 0) and a task's components 2..L at float32's resolution of its ``sigma_i^1`` (a task of rank below
    ``L``, e.g. a LoRA expert; :func:`studio.linalg.rank_tolerance`), or at its expert's stored rounding
    (:meth:`~studio.pool.LayerTasks.rounding_cut`) carry no direction and are left out of ``U^``,
    ``V^``, as TSV-M leaves out its zero columns, so both ``svd_mode`` values agree on such tasks; when
    ``1 + K L`` exceeds ``R`` (tiny layers, ``R <= K``) only the ``R`` columns with the largest ``sigma^`` are kept;
    an all-zero layer returns zeros.

    Example:
        >>> from studio.pool import TaskPool
        >>> g = torch.Generator().manual_seed(0)
        >>> experts = {f"t{i}": {"w": torch.randn(6, 5, generator=g)} for i in range(2)}
        >>> layer = TaskPool({"w": torch.zeros(6, 5)}, experts, svd_mode="exact").layer("w")
        >>> out = align_merge_o_delta(layer)
        >>> out.shape, bool(torch.isfinite(out).all())
        (torch.Size([6, 5]), True)
    """
    return _align_o(layer, eta, align_signs)


def align_merge_o_svd(layer: LayerTasks, merged: Tensor, eta: str = "sum",
                      align_signs: bool = True) -> tuple[Tensor, Tensor, Tensor] | None:
    """The thin SVD of :func:`align_merge_o_delta`'s result ``merged`` from AlignMerge-O's own factors (descending,
    its nonzero singular values only), or ``None`` for a layer that merges to zero.

    The merged delta is ``c U^_perp diag(proj) V^_perp^T`` with partial polar factors ``U^_perp = P_u W_u^T``
    (``P_u`` orthonormal, :func:`studio.linalg.polar_gram_range`), so ``M = c P_u (W_u^T diag(proj) W_v) P_v^T``
    and the SVD of the small float64 core gives ``M``'s: float64-accurate, where an SVD of the float32 merged
    delta turns its near-tied pairs (the tasks' singular values side by side, as in TSV-M) by its rounding. A
    calibration after AlignMerge-O moved by 2.5e-3 (SVC) and 7.6e-4 (AlignMerge-B) with the experts' order so
    (4 experts of the tests' CLIP-like state dict). ``c`` is taken as ``||merged||_F / ||core||_F``, the merged
    delta's own norm. Exactly tied clusters (different tasks' equal singular values) are ordered by the task-matrix
    sum (:func:`~studio.methods._align.order_ties_by_sum`), as a decomposed merged delta's are.

    Example:
        >>> from studio.pool import TaskPool
        >>> g = torch.Generator().manual_seed(0)
        >>> experts = {f"t{i}": {"w": torch.randn(9, 7, generator=g)} for i in range(3)}
        >>> layer = TaskPool({"w": torch.zeros(9, 7)}, experts, svd_mode="exact").layer("w")
        >>> merged = align_merge_o_delta(layer)
        >>> U, S, Vh = align_merge_o_svd(layer, merged)
        >>> S.shape, torch.allclose(U * S @ Vh, merged, atol=1e-5)
        (torch.Size([6]), True)
    """
    svd = _align_o(layer, eta, align_signs, merged=merged)
    # ties (tasks on orthogonal subspaces with equal spectra) ordered by the sum, as for a decomposed merged delta:
    # the eigensolver's basis there moved SVC after this merge by 0.52 with the experts' order (a helper's review)
    return None if svd is None else order_ties_by_sum(*svd, layer.sum())


def _align_o(layer: LayerTasks, eta: str, align_signs: bool,
             merged: Tensor | None = None) -> "Tensor | tuple[Tensor, Tensor, Tensor] | None":
    """:func:`align_merge_o_delta` (``merged`` None) or the SVD of ``merged`` from the factors, before
    :func:`align_merge_o_svd` orders its ties: one pipeline, so the factors are those of the merge, bit for bit."""
    if eta not in ("sum", "dominant"):
        raise StudioError(f"align_merge_o: eta must be 'sum' or 'dominant', got {eta!r}")

    def nothing() -> Tensor | None:   # a layer that merges to zero: zeros, and no SVD
        return None if merged is not None else torch.zeros(layer.shape, dtype=torch.float32, device=layer.device)

    K = layer.num_tasks
    m, n = layer.shape
    R = min(m, n)
    L = max(1, (R - 1) // K)
    svds = layer.svds(range(K), L)
    U1 = torch.stack([U[:, 0] for U, _, _ in svds], 1)  # [m, K]
    V1 = torch.stack([Vh[0] for _, _, Vh in svds], 1)  # [n, K]
    S1 = torch.stack([S[0] for _, S, _ in svds])  # [K]
    if align_signs:
        U1, V1 = _align_top_signs(U1, S1, V1)

    # eq. 11: the aligned (top-1) subspace
    u_top = U1.sum(1)
    u_top = u_top / u_top.norm().clamp_min(1e-30)
    v_top = V1.sum(1)
    v_top = v_top / v_top.norm().clamp_min(1e-30)
    s_top = S1.mean()

    # eq. 12: residual of each M_i^1 after its Frobenius projection onto M_top; top triplet of the rank-2 result.
    # Proj_{M_top}(M_i) = sigma_i (u_i.u_top)(v_i.v_top) / sigma_top  (App. B.1, ||u_top|| = ||v_top|| = 1)
    coef = S1 * (U1.mT @ u_top) * (V1.mT @ v_top) / s_top if float(s_top) > 0 else torch.zeros_like(S1)
    u_res, s_res, v_res = [], [], []
    for i in range(K):
        left = torch.stack([U1[:, i], u_top], 1)
        right = torch.stack([V1[:, i], v_top], 1)
        core = torch.diag(torch.stack([S1[i], -coef[i] * s_top]))
        Ur, Sr, Vhr = factored_svd(left, core, right)
        u_res.append(Ur[:, 0])
        s_res.append(Sr[0])
        v_res.append(Vhr[0])

    # eq. 13: concatenate [top, residuals, each task's components 2..L]
    cols_u = [u_top.unsqueeze(1), torch.stack(u_res, 1)] + [U[:, 1:L] for U, _, _ in svds]
    cols_v = [v_top.unsqueeze(1), torch.stack(v_res, 1)] + [Vh[1:L].mT for _, _, Vh in svds]
    sig = [s_top.reshape(1), torch.stack(s_res)] + [S[1:L] for _, S, _ in svds]
    U_hat, V_hat, S_hat = torch.cat(cols_u, 1), torch.cat(cols_v, 1), torch.cat(sig)
    # A residual of eq. 12 at rounding level (a task whose top pair is u_top, v_top: a single task, twins, one-hot
    # preferences) has no direction -- its top vector is noise -- and neither has a column of a task weighted 0;
    # like TSV-M's zero columns they are left out rather than whitened in as unit vectors.
    keep = S_hat > 0
    keep[1:K + 1] &= S_hat[1:K + 1] > _RESIDUAL_RTOL * S1
    # A task of rank below L has components 2..L at its float32 rounding, whose vectors are arbitrary: zero in
    # svd_mode "auto" (the Gram route), LAPACK's ~1e-7 of sigma_i with noise vectors in "exact", where whitening
    # them in moved every direction (rank-6 experts: exact 0.25-0.41 from auto, and 0.29-0.49 between a zero and a
    # random base under the same task vectors; a helper's blind re-implementation). Both modes keep a task's
    # components above float32's resolution of its own sigma_i (linalg.rank_tolerance) and above its expert's
    # stored rounding (LayerTasks.component_cut, as Iso-C's and Iso-CTS's rank rules): a LoRA expert stored on a
    # base of CLIP's scale has them above the first (4 rank-3 experts, deltas 2e-4 of the weights: 0.54-0.68
    # between a random and a zero base with it alone, 5e-5 to 6e-5 with both).
    keep[K + 1:] &= S_hat[K + 1:] > torch.cat([torch.full_like(S[1:L], layer.component_cut(i, S[:L]))
                                               for i, (_, S, _) in enumerate(svds)])
    if not bool(keep.all()):
        U_hat, V_hat, S_hat = U_hat[:, keep], V_hat[:, keep], S_hat[keep]
    if S_hat.numel() == 0:   # every task left this layer unchanged (or is weighted 0)
        return nothing()
    if U_hat.shape[1] > R:  # only when R <= K (tiny layers): keep the R strongest columns
        keep = torch.argsort(S_hat, descending=True)[:R]
        U_hat, V_hat, S_hat = U_hat[:, keep], V_hat[:, keep], S_hat[keep]

    # whitening (Alg. 1 lines 17-22); U^ and V^ are rank-deficient by construction (u_top and the K residuals
    # span at most K dimensions), so the unique partial polar factor replaces LAPACK's arbitrary completion.
    if merged is None:
        U_perp, V_perp = partial_polar(U_hat), partial_polar(V_hat)
    elif U_hat.dtype != torch.float32:   # defensive: the pools compute in float32; partial_polar takes an SVD else
        return None
    else:   # the same polar factors (partial_polar's float32 route), with their range factorisations
        (U_perp, Pu, Wu), (V_perp, Pv, Wv) = partial_polar_range(U_hat), partial_polar_range(V_hat)

    # Alg. 1 line 24 / eq. 14: sigma^ / eta^r is the projection of sum_i Delta_i (or of Delta_{i*}) on u^ v^T
    if eta == "sum":
        proj = torch.linalg.vecdot(linalg.matmul(U_perp.mT, layer.sum()), V_perp.mT)
    else:
        per_task = torch.stack([torch.linalg.vecdot(linalg.matmul(U_perp.mT, d), V_perp.mT)
                                for d in layer.task_deltas(reuse=True)])  # [K, R']
        star = per_task.abs().argmax(0)
        proj = per_task.gather(0, star.unsqueeze(0)).squeeze(0)
    # eq. 14 rescales by sqrt(sum sigma^^2 / sum (sigma^/eta)^2) so that ||Delta W~||_F = sqrt(sum sigma^^2) (App.
    # B.4). That ratio is the norm only for orthonormal U^_perp, V^_perp; the partial polar factors are not (their
    # columns overlap once the null direction is dropped), so the norm is measured on the reconstruction instead.
    if merged is not None:
        return _core_svd(merged, Pu, linalg.matmul(Wu.mT, proj.double().unsqueeze(-1) * Wv), Pv)
    out = linalg.reconstruct(U_perp, proj, V_perp.mT)
    # (norms in float64: squares of float32 entries beyond ~1e19 would overflow)
    actual = torch.linalg.vector_norm(out, dtype=torch.float64)
    target = torch.linalg.vector_norm(S_hat, dtype=torch.float64)
    # Tasks that cancel (sum ~ 0) leave a projection at rounding level; scaled up to the tasks' energy it would be
    # float32 noise at full size (auto and exact mode 1.96 / 3.37 apart for two experts +-D), so, as for an exact
    # zero, the layer keeps the base.
    if not float(actual) > _RESIDUAL_RTOL * float(target):
        return nothing()
    return out.mul_(float(target / actual))


#: :func:`_core_svd` takes LAPACK's SVD of the core where its smallest live singular value is below this fraction
#: of the largest (the Gram route's singular vectors are accurate to ~``eps64 / ratio^2``: 2e-8 here).
_CORE_GRAM_RTOL = 1e-4


def _core_svd(merged: Tensor, left: Tensor, core: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """Thin SVD of ``merged = c left core right^T`` (``left``, ``right`` float64 with orthonormal columns, ``core``
    float64), ``c = ||merged||_F / ||core||_F``: the core's SVD from its float64 Gram matrix (LAPACK's below
    :data:`_CORE_GRAM_RTOL`), its singular values above :func:`studio.linalg.null_tolerance` only, in ``merged``'s
    dtype; ``None`` if ``merged`` is zero."""
    norm = float(torch.linalg.vector_norm(merged, dtype=torch.float64))
    core_norm = float(torch.linalg.vector_norm(core))
    if not (norm > 0 and core_norm > 0):
        return None
    evals, Y = _lapack.eigh(_lapack.gram(core), overwrite=True)       # ascending
    sig = evals.flip(0).clamp_min(0).sqrt()
    Y = Y.flip(-1)
    live = int((sig > linalg.null_tolerance(sig[0], sig.numel())).sum())
    if live and float(sig[live - 1]) < _CORE_GRAM_RTOL * float(sig[0]):
        # the Gram route's vectors are accurate to ~eps64 (sigma_1 / sigma)^2: LAPACK's SVD below this
        Xf, sig, Yh = torch.linalg.svd(core, full_matrices=False)
        live = int((sig > linalg.null_tolerance(sig[0], sig.numel())).sum())
        sig, Y, X = sig[:live], Yh[:live].mT, Xf[:, :live]
    else:
        sig, Y = sig[:live], Y[:, :live]
        X = linalg.matmul(core, Y) / sig
    dtype = merged.dtype
    return (linalg.matmul(left, X).to(dtype), (sig * (norm / core_norm)).to(dtype),
            linalg.matmul(right, Y).mT.to(dtype))


@register(
    "align_merge_o",
    params=(
        Param("eta", str, "sum", choices=("sum", "dominant"),
              help="Reference of eta^r: the task-matrix sum (Alg. 1 line 24) or the single most-contributing task "
                   "(eq. 10 / App. E.2).",
              paper="AlignMerge App. C Alg. 1 line 24 (sum); sec. 4.2 eq. 10 and App. E.2 'Effectiveness of eta' "
                    "(i* = argmax_i ||P_col Delta_i P_row||_F)"),
        Param("align_signs", bool, True,
              help="Fix the sign ambiguity of each task's top singular pair before summing them into u_top, v_top "
                   "(the paper sums raw SVD vectors; off, the result follows the pool's sign convention, "
                   "studio.linalg.canonical_signs, and changed with it on 2026-12-03: before, it followed the "
                   "solver's, and differed between svd_mode auto and exact).",
              paper="interpretation of AlignMerge eq. 11 (SVD signs are arbitrary); joint flips keep M_i^1"),
        Param("lam", float, 1.0, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Global scale lambda on the merged delta (the paper adds it with lambda = 1).",
              paper="AlignMerge Alg. 1 line 28: W_merge = W_pre + Delta W~_merge"),
    ),
    paper="AlignMerge (Beyond Conflict: Subspace-Alignment as the Missing Piece of Model Merging), sec. 4.2 "
          "eq. 10-14, App. C Alg. 1",
    summary="TSV-style orthogonalised task subspaces plus one extracted aligned subspace, with singular values "
            "set by eta and renormalised to the original energy.",
    vector_rule="mean",
    decomposes=True,
    merged_svd=lambda layer, merged, eta="sum", align_signs=True: align_merge_o_svd(layer, merged, eta, align_signs),
)
def align_merge_o(layer: LayerTasks, eta: str, align_signs: bool) -> Tensor:
    """AlignMerge-O merge of one matrix layer (unscaled; see :func:`align_merge_o_delta`).

    Non-matrix tensors get the mean of the task vectors (``vector_rule="mean"``), as TSV-M's official code which
    AlignMerge-O follows for its orthogonalisation.

    Example:
        >>> from studio.pool import TaskPool
        >>> g = torch.Generator().manual_seed(0)
        >>> experts = {f"t{i}": {"w": torch.randn(9, 7, generator=g)} for i in range(3)}
        >>> layer = TaskPool({"w": torch.zeros(9, 7)}, experts, svd_mode="exact").layer("w")
        >>> out = align_merge_o(layer, "sum", True)   # L = (7 - 1) // 3 = 2: 1 + K L = 7 columns, one null
        >>> int(torch.linalg.matrix_rank(out))
        6
    """
    return align_merge_o_delta(layer, eta=eta, align_signs=align_signs)
