"""Ortho-Merge ("A Unified SVD Perspective: Deconstructing, Evaluating, and Improving Model Merging with
Ortho-Merge", anonymous submission under double-blind review, sec. 4, eq. 12-16): deconflict the task matrices'
leading singular components, then sum and harmonise the spectrum Iso-C style.

No official code is public (none found in the code index) and the paper gives no numeric tau or k; the defaults
below are documented choices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import linalg
from ..pool import LayerTasks
from ..registry import register
from ..schema import Param


def interference_mask(U: Tensor, S: Tensor, tau: float) -> Tensor:
    """Which leading components Ortho-Merge removes (eq. 13-14), ``[T, k]`` bool.

    ``s_ij^mn = <u_{i,m}, u_{j,n}>`` (eq. 13) for tasks ``i != j`` and indices ``m, n <= k``; a pair interferes when
    ``|s| > tau`` (redundant ``> tau`` or oppositional ``< -tau``; the sign only names the case). Of an interfering
    pair the *weaker* component is removed: ``c_{i,m}`` if ``sigma_{i,m} < sigma_{j,n}``, else ``c_{j,n}`` (eq. 14,
    scanning pairs with ``i < j``, so a tie removes the later task's component).

    Interpretation (the paper only says "after scanning all task pairs"): decisions use the original components,
    a component is removed once however many pairs flag it, and a removed component still counts as an interferer
    of the others. This makes the result independent of the scanning order.

    Args:
        U: ``[T, m, k]`` top-``k`` left singular vectors of each task.
        S: ``[T, k]`` the matching singular values.
        tau: threshold in ``[0, inf)``; ``tau >= 1`` never fires (``|s| <= 1`` for unit vectors: the computed
            cosines are clipped to it, since identical experts give ``1 + 1e-7`` in float32), so Ortho-Merge becomes
            Iso-C.

    Example:
        >>> U = torch.tensor([[[1.0], [0.0]], [[0.8], [0.6]]])   # two tasks, cosine 0.8
        >>> interference_mask(U, torch.tensor([[2.0], [1.0]]), tau=0.5).tolist()
        [[False], [True]]
    """
    T, _, k = U.shape
    sim = torch.einsum("imk,jmn->ikjn", U, U)  # [T, k, T, k]: s_ij^{mn}
    hit = sim.abs().clamp_max(1.0) > tau   # eq. 13's s is a cosine; rounding can push it past 1
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool, device=U.device), diagonal=1)  # i < j
    hit = hit & upper[:, None, :, None]
    weaker_i = S[:, :, None, None] < S[None, None, :, :]  # sigma_{i,m} < sigma_{j,n}
    remove_i = (hit & weaker_i).any(dim=(2, 3))  # [T, k]: as the first member i of a pair
    remove_j = (hit & ~weaker_i).any(dim=(0, 1))  # [T, k]: as the second member j of a pair
    return remove_i | remove_j


def isotropic(matrix: Tensor, svd: tuple[Tensor, Tensor, Tensor] | None = None, exact: bool = True,
              rank: int | None = None) -> Tensor:
    """Iso-C-style spectral harmonisation (Ortho-Merge eq. 15-16): ``sigma_bar U_r V_r^T`` over the compact SVD.

    ``r = rank(Delta_sum)`` as eq. 16 states and ``sigma_bar`` is the mean of those ``r`` singular values. In a
    merge ``rank`` is the number of directions above the stored weights' rounding, Iso-C's own rule
    (:meth:`~studio.pool.LayerTasks.rank_above_rounding`, :func:`ortho_merge`); without it (a bare matrix) the
    numerical rank at ``torch.linalg.matrix_rank``'s default tolerance ``max(m, n) * eps * sigma_max``. For a
    full-rank sum this is exactly Iso-C (Iso eq. 7-8 and its official code, ``S.mean()`` over all ``min(m, n)``
    values), so ``tau >= 1`` reproduces Iso-C, whose rank rule keeps a sum's real directions however small against
    the largest: matrix_rank's tolerance (9.2e-5 of the largest at ``768 x 768``) dropped such a direction at 1e-6
    and put ``tau = 1.5`` 8.9 % from Iso-C (``test_ortho_merge_above_tau_1_is_iso_c_with_a_small_direction``). For
    a rank-deficient sum Iso-C's code would also put ``sigma_bar`` on singular vectors of zero singular values,
    which LAPACK picks arbitrarily; the compact form keeps the result well defined (and symmetric in the experts),
    and its mean is over the ``r`` values (Iso-C's over all ``min(m, n)``). Full rank is the common case: on
    MiniSuite at the defaults every deconflicted sum has full rank but block 0's attention output (``128 x 128``),
    whose isolated smallest direction, at 2.3e-5 of the largest, lies under its float16 experts' rounding. ``svd``:
    a precomputed thin SVD of ``matrix``; else :func:`studio.linalg.svd_tall` with ``exact``.

    Example:
        >>> isotropic(torch.diag(torch.tensor([3.0, 1.0]))).tolist()
        [[2.0, 0.0], [0.0, 2.0]]
        >>> isotropic(torch.diag(torch.tensor([3.0, 1e-9]))).tolist()   # rank 1 at 2 eps of 3: none on the null one
        [[3.0, 0.0], [0.0, 0.0]]
    """
    U, S, Vh = linalg.svd_tall(matrix, exact) if svd is None else svd
    if S.numel() == 0 or float(S[0]) <= 0:
        return torch.zeros_like(matrix)
    r = int((S > max(matrix.shape) * torch.finfo(S.dtype).eps * S[0]).sum()) if rank is None else rank
    if r == 0:
        return torch.zeros_like(matrix)
    return linalg.reconstruct(U[:, :r], S[:r].mean().expand(r), Vh[:r])


@register(
    "ortho_merge",
    params=(
        Param("tau", float, 0.3, low=0.0, high=2.0, ui_step=0.01,
              help="Interference threshold on |<u_i,m, u_j,n>| between leading left singular vectors of different "
                   "tasks; at 1 or above nothing is removed and Ortho-Merge equals Iso-C at the same alpha "
                   "(Iso-C's default is 1.3, this one's 1.0) on full-rank layers; embeddings are averaged.",
              paper="Ortho-Merge eq. 13-14 (no value given); 0.3 is our choice, between the top-5 subspace "
                    "similarities the paper calls 'significant' (0.22) and 'high' (0.37) in sec. 3.1 / Fig. 1. "
                    "Those are averaged principal cosines of two subspaces, a related but different quantity "
                    "from the single-vector cosine thresholded here, so tune it on validation data"),
        Param("k", int, 5, low=1, high=512, ui_step=1,
              help="Number of leading singular components per task that are compared (top-k directions).",
              paper="Ortho-Merge eq. 13 (no value given); 5 = the 'leading five singular vectors' of its Fig. 1 "
                    "subspace-similarity analysis"),
        Param("alpha", float, 1.0, low=0.0, high=5.0, post_scale=True, ui_step=0.05,
              help="Global scale on the harmonised delta (the paper adds Delta_new as is).",
              paper="Ortho-Merge eq. 16 (no scale); Iso-C eq. 9's alpha when tuned on validation data"),
    ),
    paper="A Unified SVD Perspective: Deconstructing, Evaluating, and Improving Model Merging with Ortho-Merge, "
          "sec. 4 eq. 12-16",
    summary="Remove the weaker of each pair of strongly aligned or opposed leading singular components across "
            "tasks, sum, then flatten the spectrum to its mean (Iso-C).",
    vector_rule="mean",
    layer_rule="skip_embeddings",
    decomposes=True,
)
def ortho_merge(layer: LayerTasks, tau: float, k: int) -> Tensor:
    """Ortho-Merge of one matrix layer (unscaled).

    1. Top-``k`` SVD of each task matrix, ``c_{t,s} = sigma_{t,s} u_{t,s} v_{t,s}^T`` (eq. 12; cached per pool).
    2. Deconflict (eq. 13-14, :func:`interference_mask`): ``Delta^_t = Delta_t - sum_{removed s} c_{t,s}``.
    3. ``Delta_sum = sum_t Delta^_t = U Sigma V^T`` and ``Delta_new = sigma_bar U V^T`` (eq. 15-16,
       :func:`isotropic`).

    With nothing removed (e.g. ``tau >= 1``) the pool's cached SVD of the plain sum is reused, and the result is
    exactly Iso-C whenever the sum has full rank (see :func:`isotropic`). The paper averages "non-2D tensors (e.g.,
    biases, embeddings, text_projection)" (sec. 4, after eq. 16); embeddings and ``text_projection`` are 2-D in
    CLIP, so the default layer rule is ``"skip_embeddings"``: every tensor it names, and every non-2-D one, gets
    the mean of the task vectors (no official code is public). ``layer_rule="default"`` treats the 2-D positional
    embedding spectrally, as TSV/Iso do. The paper's related-work summary (sec. 2) describes Ortho-Merge as small
    corrections "instead of pruning or discarding singular directions"; its method (sec. 4, eq. 14), abstract and
    conclusion remove the weaker component outright, which is what this implements.

    Example:
        >>> from studio.pool import TaskPool
        >>> e1, e2 = torch.tensor([[1.0, 0.0]]).T, torch.tensor([[0.0, 1.0]]).T
        >>> experts = {"a": {"w": 3 * e1 @ e1.T}, "b": {"w": e1 @ e1.T + 2 * e2 @ e2.T}}
        >>> layer = TaskPool({"w": torch.zeros(2, 2)}, experts, svd_mode="exact").layer("w")
        >>> ortho_merge(layer, tau=0.5, k=2).tolist()   # b's e1 part (weaker than a's) is removed: diag(3, 2)
        [[2.5, 0.0], [0.0, 2.5]]
        >>> ortho_merge(layer, tau=1.5, k=2).tolist()   # nothing removed: Iso-C of diag(4, 2)
        [[3.0, 0.0], [0.0, 3.0]]
    """
    T = layer.num_tasks
    k = max(1, min(int(k), min(layer.shape)))
    svds = layer.svds(range(T), k)
    U = torch.stack([u for u, _, _ in svds])  # [T, m, k]
    S = torch.stack([s for _, s, _ in svds])  # [T, k]
    # A component at its expert's stored rounding or at float32's resolution of its top one (a task of rank below
    # k, e.g. a LoRA expert; as AlignMerge-O's) has no direction: LAPACK's vectors there (svd_mode "exact") are
    # arbitrary and may "interfere" with another task's, and removing one subtracted a direction the sum does not
    # hold (0.41 apart between LoRA experts stored on a zero and on a random base)
    live = torch.stack([S[t] > layer.component_cut(t, S[t]) for t in range(T)])
    remove = interference_mask(U * live[:, None, :], S, tau) if T > 1 else torch.zeros_like(S, dtype=torch.bool)
    if not bool(remove.any()):
        return isotropic(layer.sum(), layer.sum_svd(), rank=layer.sum_rank())
    Vh = torch.stack([vh for _, _, vh in svds])  # [T, k, n]
    w = S * remove.to(S.dtype)  # sigma of removed components, 0 elsewhere
    removed = torch.einsum("tmk,tk,tkn->mn", U, w, Vh)
    deconflicted = layer.sum() - removed
    Ud, Sd, Vhd, from_gram = linalg.svd_tall_route(deconflicted, exact=layer.pool.svd_mode == "exact")
    # The removed components carry their float32 factors' error (a helper's audit: up to 1.6e-5 of sigma on the
    # Gram route, 3.7e-4 with LAPACK's clustered values, mostly inside the task's own span, where it adds no rank):
    # a direction of the deconflicted sum below the floor cannot be told from it (LoRA experts of a 768 x 768 layer
    # on a zero base kept it as a direction, and merged 0.41 apart from the same experts on a random base). The
    # components' errors add up: the floor is of their sigmas' root sum of squares, which one removed component's
    # sigma is (with 89 of 96 removed, at tau = 0, the largest alone left a float32 residue of the subtraction above
    # it, which then took sigma_bar as a direction: 0.35 from the float64 eq. 12-16 merge; an engine audit).
    # (in float64: the float32 norm of sigmas beyond ~1e19 overflowed, the floor was infinite and the merge the base)
    floor = float(linalg.rank_tolerance(w.double().norm(), layer.shape))
    rank = layer.rank_above_rounding(deconflicted, Sd, from_gram, floor=floor)
    return isotropic(deconflicted, (Ud, Sd, Vhd), rank=rank)
