"""Shared linear-algebra building blocks used by the spectral methods, calibrations and diagnostics.

Methods compose these instead of re-implementing them: truncated SVD, whitening (orthogonal Procrustes / polar
factor, TSV eq. 9 and Prop. 4.1), projections. Everything here is pure: tensors in, tensors out, no device policy. Large
products go through :func:`matmul` (OpenBLAS on the CPU, :mod:`studio._lapack`; ``@`` elsewhere).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import _lapack
from ._lapack import matmul


def svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``matrix = U diag(S) Vh`` computed in float32 or higher (half inputs are upcast).

    Example:
        >>> U, S, Vh = svd(torch.eye(3))
        >>> S.tolist()
        [1.0, 1.0, 1.0]
    """
    if matrix.dtype in (torch.float16, torch.bfloat16):
        matrix = matrix.float()
    return torch.linalg.svd(matrix, full_matrices=False)


def truncated_svd(matrix: Tensor, rank: int, *, oversample: int = 10, niter: int = 3,
                  exact: bool = False, generator_seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` singular triplets of ``matrix``.

    Uses a randomized range finder (Halko et al. 2011, Alg. 4.4 with ``niter`` power iterations, as in
    ``torch.svd_lowrank``) when ``rank`` is well below ``min(m, n)``, else the exact SVD. The random test matrix
    is drawn from a fixed seed so results are deterministic. ``exact=True`` forces the exact SVD.

    Returns ``U [m, rank]``, ``S [rank]``, ``Vh [rank, n]``.

    Example:
        >>> A = torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5]))
        >>> U, S, Vh = truncated_svd(A, 2)
        >>> [round(s, 4) for s in S.tolist()]
        [5.0, 3.0]
    """
    m, n = matrix.shape[-2:]
    r = min(m, n)
    rank = max(0, min(rank, r))
    if exact or rank + oversample >= r // 2:
        U, S, Vh = svd(matrix)
        return U[:, :rank], S[:rank], Vh[:rank, :]
    A = matrix.float() if matrix.dtype in (torch.float16, torch.bfloat16) else matrix
    q = rank + oversample
    gen = torch.Generator(device=A.device).manual_seed(generator_seed)
    omega = torch.randn(n, q, device=A.device, dtype=A.dtype, generator=gen)
    Y = A @ omega
    Q = torch.linalg.qr(Y).Q
    for _ in range(niter):
        Z = torch.linalg.qr(A.mT @ Q).Q
        Q = torch.linalg.qr(A @ Z).Q
    B = Q.mT @ A  # [q, n]
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub
    return U[:, :rank], S[:rank], Vh[:rank, :]


def polar(matrix: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Q^T`` of ``matrix = P Sigma Q^T``: the closest matrix with orthonormal columns.

    This is the whitening / orthogonal-Procrustes step of TSV-M (TSV eq. 9, Prop. 4.1) and Iso-CTS (Iso Alg. 2
    line 11, eq. 11), written as the official code writes it (``u @ v`` of the SVD). Zero columns stay
    (numerically) irrelevant when the result is multiplied by zero singular values, exactly as in the official code.

    Example:
        >>> P = polar(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        >>> P.tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    U, _, Vh = svd(matrix)
    return U @ Vh


def _sign_direction(m: int) -> Tensor:
    """``w_i = frac(sqrt(p_i)) - 1/2`` over the first ``m`` primes (float64, CPU), :func:`canonical_signs`'s direction.
    The square roots of distinct primes and 1 are linearly independent over the rationals, so no vector whose
    nonzero entries are rational multiples of one value (``+-1/sqrt(k)`` patterns, Hadamard rows, one-hot and
    two-hot vectors) is orthogonal to it; ``frac(i phi)``, the first choice, had ``w_1 - w_2 - w_3 + w_4 = 0``."""
    found = _SIGN_DIRECTIONS.get(m)
    if found is None:
        limit = max(16, int(m * (math.log(m + 1) + math.log(math.log(m + 2)) + 2)))   # > the m-th prime
        sieve = torch.ones(limit + 1, dtype=torch.bool)
        sieve[:2] = False
        for p in range(2, int(limit ** 0.5) + 1):
            if sieve[p]:
                sieve[p * p::p] = False
        primes = sieve.nonzero().flatten()[:m].double()
        assert primes.numel() == m, (m, limit)
        found = _SIGN_DIRECTIONS.setdefault(m, torch.frac(primes.sqrt()) - 0.5)
    return found


_SIGN_DIRECTIONS: dict[int, Tensor] = {}


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """``U``, ``Vh`` with each singular pair's sign fixed: every column of ``U`` has a positive projection on one fixed
    direction ``w`` (:func:`_sign_direction`; its row of ``Vh`` flips with it, so ``U diag(S) Vh`` is unchanged; a
    zero column stays as it is). Batched factors (``[..., m, k]``, ``[..., k, n]``) are fixed per matrix.

    An SVD's sign per component is arbitrary and differs between LAPACK routines, ranks and devices; fixed this way,
    the top-``k`` factors sliced from a higher-rank decomposition match a rank-``k`` one up to rounding (for distinct
    singular values), so results that depend on signs do not depend on which was computed first. The sign of a
    vector's largest entry, a common convention, is decided by rounding wherever two entries have equal magnitude
    (structured or hand-made weights); a projection on ``w`` is zero only for vectors orthogonal to it, which no
    vector of a few entries of equal magnitude is.

    Example:
        >>> U, Vh = torch.tensor([[0.6, 0.8], [-0.8, 0.6]]), torch.eye(2)
        >>> Uc, Vc = canonical_signs(U, Vh)
        >>> Uc.sign().tolist(), torch.equal(Uc @ Vc, U @ Vh)   # w = [-0.086, 0.232]: the first column flips
        ([[-1.0, 1.0], [1.0, 1.0]], True)
    """
    m = U.shape[-2]
    if U.shape[-1] == 0 or m == 0:
        return U, Vh
    score = (_sign_direction(m).to(U.device).unsqueeze(-1) * U.double()).sum(-2)   # [..., k]
    sign = torch.where(score < 0, -1.0, 1.0).to(U.dtype)
    return U * sign.unsqueeze(-2), Vh * sign.unsqueeze(-1)


def reconstruct(U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """``U diag(S) Vh`` without materialising ``diag(S)``."""
    return matmul(U * S.unsqueeze(-2), Vh)


# ---------------------------------------------------------------------------------------------------------------
# Spectral-merging building blocks (TSV-M, Iso-CTS, TSV-C). Appended; the functions above are unchanged.
# ---------------------------------------------------------------------------------------------------------------

#: Iso-C's and Iso-CTS's rounding edge: how many times a noise block's expected largest singular value a direction may
#: reach and still be taken for the stored weights' rounding (:func:`rounding_rank`).
ROUNDING_EDGE = 2.0


def stored_precision(x: Tensor, sample: int = 4096) -> torch.dtype:
    """The precision :func:`rounding_level` rounds ``x`` at: float64 for float64 values off float32's grid, float32
    for everything else -- float32 weights upcast to float64 (whose float64 rounding would be far finer than what
    they carry), float32 tensors, and half-precision ones. Float32's grid is tried on ``sample`` values spread over
    ``x`` first, and on the whole tensor only where they all fit (genuine float64 weights cost one small read).

    Half-precision grids are not modelled: a float16 or bfloat16 checkpoint (or a float32 copy of one) is rounded as
    float32, so it merges as its float32 copy does (the contract). Their own rounding is of the size of realistic
    deltas' spectral tails (float16's eps is 1e-3 of the weights; fine-tunes move them by 1e-3 to 1e-2), and the rank
    rule would take those real, rounding-blurred directions for rounding: a helper's audit measured full-rank float16
    experts' Iso-C 0.08-1.0 from the float64 official merge with a float16 model, against 3e-7 to 8e-5 with this one,
    while LoRA-like float16 experts stay storage dependent (docs/ENGINE.md).

    Example:
        >>> w = torch.randn(64, 64)
        >>> [stored_precision(x) for x in (w, w.double(), w.double() / 3, w.half())]
        [torch.float32, torch.float32, torch.float64, torch.float32]
    """
    if x.dtype != torch.float64:
        return torch.float32
    flat = x.detach().reshape(-1)
    probe = flat[::max(1, flat.numel() // sample)]
    on_grid = torch.equal(probe.float().double(), probe) and torch.equal(flat.float().double(), flat)
    return torch.float32 if on_grid else torch.float64


def rounding_level(stored: "Sequence[tuple[float, torch.dtype]]", total_norm2: float, numel: int,
                   tasks: int) -> float:
    """The standard deviation of one entry's rounding in a float32 sum of task matrices (an upper bound): each expert
    ``x_t`` as a merge reads it carries the rounding of its :func:`stored_precision`, at most ``eps_t |x_t| / 2`` per
    entry, uniform (float32's for float32 and half-precision experts alike, so the two merge the same; float64's for
    float64 values off float32's grid, the delta rounded to float32 after the subtraction), and the float32 sum its
    own: ``sigma_e^2 = (sum_t eps_t^2 mean(x_t^2) + T eps32^2 mean(A^2)) / 12``. Each rounding also has an absolute
    floor, its format's subnormal spacing (``2^-149`` for float32): negligible for any realistic layer (the float64
    sum does not change), it is the whole rounding of weights in float32's subnormal range (below ``1.2e-38``),
    which a relative model put at up to 1e4 times below it (a helper's quirks audit: rank-2 experts of 1e-39 kept
    their rounding in Iso-CTS).

    ``stored``: ``(w_t^2 ||x_t||_F^2, dtype_t)`` per rounded term (``w_t`` the task's weight, ``dtype_t`` its stored
    precision; a float64 expert adds its delta's norm as a float32 term); ``total_norm2``: ``||A||_F^2`` of the sum;
    ``numel``: entries per matrix; ``tasks``: ``T``, the number of task matrices summed.

    Example:
        >>> round(rounding_level([(12.0, torch.float32)], 0.0, 1, 1) / torch.finfo(torch.float32).eps, 6)
        1.0
    """
    eps32 = torch.finfo(torch.float32).eps
    var = sum(norm2 * torch.finfo(dtype).eps ** 2 for norm2, dtype in stored)
    floor = sum(_spacing(dtype) ** 2 for _, dtype in stored) + tasks * _spacing(torch.float32) ** 2   # per entry
    return math.sqrt((var + tasks * eps32 ** 2 * total_norm2 + numel * floor) / (12 * max(1, numel)))


def _spacing(dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s subnormal numbers (its smallest positive value): ``2^-149`` for float32."""
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps


def noise_edge(sigma: float, rows: "int | Tensor", cols: "int | Tensor",
               edge: float = ROUNDING_EDGE) -> "float | Tensor":
    """``edge`` times ``sigma (sqrt(rows) + sqrt(cols))``, the largest singular value of a ``rows x cols`` matrix of
    independent noise of standard deviation ``sigma`` per entry (Marchenko-Pastur's edge): a singular value at or
    below it may be the stored weights' rounding (:func:`rounding_level`). ``rows`` and ``cols`` may be tensors.

    Example:
        >>> noise_edge(0.5, 4, 9, edge=1.0)
        2.5
    """
    return edge * sigma * (rows ** 0.5 + cols ** 0.5)


def rounding_rank(S: Tensor, shape: "tuple[int, ...] | torch.Size", sigma: float,
                  edge: float = ROUNDING_EDGE, resolution: float | None = None) -> int:
    """How many of the descending singular values ``S`` (float64-accurate) of a sum of task matrices of ``shape``
    stand above the stored weights' rounding ``sigma`` (:func:`rounding_level`, per entry): Iso-C's and Iso-CTS's
    live directions of the sum.

    The ``d`` smallest values are rounding when they fit a ``d``-dimensional block of such noise: the ``d``-th
    smallest at most ``edge`` times ``sigma (sqrt(m - r + d) + sqrt(n - r + d))``, the largest singular value of a
    ``(m - r + d) x (n - r + d)`` noise matrix (Marchenko-Pastur's edge); the largest such ``d`` is dropped, with
    every value at or below ``resolution``, the values' own error (default :func:`null_tolerance`, a float64 Gram's;
    a float64 SVD's is ``~max(m, n) eps64`` of the largest). The null space of a sum
    of low-rank experts stored on a base (``r - T rank`` values, filled by the weights' rounding) is such a block; an
    isolated small direction of a full-rank sum, far above one noise value, is not, however small against the
    largest (docs/ACCURACY.md: the bench's experts have ones at 1.6e-6 of it, which the data place). A non-finite
    largest value keeps every direction, for the merge's own finiteness check to name; a zero sum keeps none.

    Example:
        >>> S = torch.tensor([1.0, 1e-3, 1e-5, 1e-9], dtype=torch.float64)   # 1e-9: below null_tolerance
        >>> rounding_rank(S, (4, 4), 1e-5 / 4), rounding_rank(S, (4, 4), 1e-8), rounding_rank(torch.zeros(2), (2, 2), 0)
        (2, 3, 0)
    """
    r = S.numel()
    if r == 0:
        return 0
    top = float(S[0])
    if not math.isfinite(top):
        return r
    if not top > 0:
        return 0
    m, n = shape[-2:]
    ascending = S.detach().to("cpu", torch.float64).flip(0)
    d = torch.arange(1, r + 1, dtype=torch.float64)
    fits = (ascending <= noise_edge(sigma, m - r + d, n - r + d, edge)).nonzero()
    noise = int(fits[-1]) + 1 if fits.numel() else 0
    if resolution is None:
        resolution = float(null_tolerance(S[0].double(), r))
    null = int((ascending <= resolution).sum())
    return r - max(noise, null)


def rank_tolerance(largest: Tensor, shape: "tuple[int, ...] | torch.Size") -> Tensor:
    """The singular value at or below which a direction of a float32 matrix of ``shape`` with largest singular value
    ``largest`` is taken for rounding by its size alone (Iso-CTS's task directions, with their experts' rounding,
    :func:`noise_edge`; AlignMerge-O's components):
    ten times :func:`null_tolerance`, ``~1e-6`` of the largest (4.1e-6 at ``r = 768``).

    Example:
        >>> float(rank_tolerance(torch.tensor(1.0), (4, 4))) == 10 * torch.finfo(torch.float32).eps
        True
    """
    return 10 * null_tolerance(largest, min(shape[-2:]))


def null_tolerance(largest: Tensor, size: int) -> Tensor:
    """Singular values at or below this are numerically zero for a float64 Gram-based computation over ``size``
    columns: ``sigma_max * max(eps(float32), sqrt(size * eps(float64)))``.

    ``sqrt(size * eps64)`` is the resolution of singular values recovered from the eigenvalues of a float64 Gram
    matrix; ``eps32`` is the resolution of the float32 data itself. Directions weaker than this cannot be told
    apart from exactly dependent ones (e.g. two identical experts).

    Example:
        >>> float(null_tolerance(torch.tensor(1.0), 4)) == torch.finfo(torch.float32).eps
        True
    """
    return largest * max(torch.finfo(torch.float32).eps, (size * torch.finfo(torch.float64).eps) ** 0.5)


def _inv_sqrt_psd(gram: Tensor, minus_one: bool = False, rtol: float | None = None) -> Tensor:
    """``gram^{-1/2}`` (or ``gram^{-1/2} - I``) of a symmetric PSD matrix, in float64, zero on its null space:
    singular values ``sqrt(eigenvalue)`` at or below :func:`null_tolerance`, or ``rtol`` times the largest.
    A float64 ``gram`` is overwritten: callers pass a fresh, exactly symmetric one (:func:`studio._lapack.gram`)."""
    return _inv_sqrt_from_eigh(*_lapack.eigh(gram.double(), overwrite=True), minus_one, rtol)


def _inv_sqrt_from_eigh(evals: Tensor, evecs: Tensor, minus_one: bool = False, rtol: float | None = None) -> Tensor:
    """:func:`_inv_sqrt_psd` from the eigenpairs of the (float64) Gram matrix."""
    f, _ = _inv_sqrt_weights(evals, rtol)
    if minus_one:
        return matmul(evecs * (f - 1.0), evecs.mT)
    return _inv_sqrt_from_weights(evecs, f)


def _inv_sqrt_from_weights(evecs: Tensor, f: Tensor) -> Tensor:
    """``Q diag(f) Q^T`` for the weights ``f`` of :func:`_inv_sqrt_weights`."""
    half = evecs * f.sqrt()
    return _lapack.gram(half.mT)   # (Q f^1/2)(Q f^1/2)^T through syrk: half the flops of (Q f) Q^T


def _inv_sqrt_weights(evals: Tensor, rtol: float | None) -> tuple[Tensor, Tensor]:
    """``(f, keep)``: ``f = evals^{-1/2}`` where the singular value ``sqrt(evals)`` is above :func:`null_tolerance`
    (or ``rtol`` times the largest), 0 elsewhere; ``keep`` marks those."""
    sig = evals.clamp_min(0).sqrt()
    largest = sig.max() if sig.numel() else sig.new_zeros(())   # a matrix without columns has no directions
    tol = null_tolerance(largest, evals.shape[-1]) if rtol is None else rtol * largest
    keep = sig > tol
    return torch.where(keep, 1.0 / torch.where(keep, sig, torch.ones_like(sig)), torch.zeros_like(sig)), keep


#: :func:`polar_gram_range` re-orthonormalises ``A Q_+ D_+^{-1}`` beyond this condition number of the kept part of
#: ``A``: its columns are orthonormal to ~``eps64 * cond^2`` (1e-10 here).
_RANGE_QR_COND = 700.0


def polar_gram_range(matrix: Tensor, rtol: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`polar_gram` of a tall (or square) ``matrix`` (the same bits) with a float64 factorisation of that
    polar factor, ``P W^T``: ``P [m, r]`` has orthonormal columns spanning ``matrix``'s range (``r`` the directions
    kept), ``W [c, r]``. For an exact SVD of a product of polar factors (AlignMerge-O's ``U^_perp diag(.)
    V^_perp^T``, :func:`studio.methods.align_merge.align_merge_o_svd`).

    From the Gram eigenpairs ``(Q, D^2)``: ``P = A Q_+ D_+^{-1}``, ``W = Q_+`` (the right singular vectors). Those
    columns are orthonormal only to ~``eps64 cond^2`` (``cond`` of the kept singular values; 2e-4 for nearly
    dependent columns kept at 1e-6 of the largest); beyond a condition number of :data:`_RANGE_QR_COND` they are
    re-orthonormalised by a QR, ``P = Q_qr R``, and ``W = Q_+ R^T``.

    Example:
        >>> P, Pr, W = polar_gram_range(torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))  # e1 twice: rank 1
        >>> Pr.shape, W.shape, torch.allclose(Pr @ W.mT, P.double())
        (torch.Size([3, 1]), torch.Size([2, 1]), True)
    """
    if matrix.shape[-2] < matrix.shape[-1]:
        raise ValueError(f"polar_gram_range needs a tall or square matrix, got {tuple(matrix.shape)}")
    a64 = matrix.double()
    evals, evecs = _lapack.eigh(_lapack.gram(a64), overwrite=True)
    polar, f, keep = _polar_from_eigh(a64, evals, evecs, rtol, matrix.dtype)
    W = evecs[:, keep]
    P = matmul(a64, W * f[keep])
    if keep.any() and float(f[keep].max() / f[keep].min()) > _RANGE_QR_COND:
        P, R = torch.linalg.qr(P)
        W = matmul(W, R.mT)
    return polar, P, W


def polar_gram(matrix: Tensor, rtol: float | None = None) -> Tensor:
    """Orthogonal polar factor ``A (A^T A)^{-1/2}`` via the Gram matrix: the whitening of TSV sec. 4.2 / Prop. 4.1.

    Equal to :func:`polar` (``P Q^T`` of the SVD ``A = P D Q^T``, TSV eq. 9, the official code's ``u @ v``) whenever
    ``A`` has full column rank, but computed from the small ``c x c`` Gram matrix (``c`` = number of columns, or of
    rows for a wide ``A``) with a float64 eigendecomposition: ~1.5x cheaper than LAPACK's float32 SVD of a
    ``[3072, 768]`` matrix on a CPU (more on a GPU, where ``eigh`` is far faster than ``svd``) and closer to the
    exact polar factor of the float32 matrix, since the Gram is formed and inverted in float64. A weak direction's
    weight comes from an eigenvalue ``(sigma / sigma_max)^2`` of the Gram, so its columns are orthonormal only to
    ~``eps64 size / (sigma / sigma_max)^2``. On a ``600 x 400`` matrix with one direction at 1e-6, 1e-5, 1e-4 and 1e-3
    of the largest, the largest entry's distance from the float64 polar factor of the same float32 matrix is 5.8e-6,
    1.2e-7, 7.6e-9 and 7.4e-9 here (``P^T P`` from the identity: 5.5e-4, 1.1e-5, 1.5e-7, 5.8e-8), and 5.6e-3, 6.0e-4,
    4.1e-5 and 4.2e-6 with LAPACK's float32 SVD (:func:`polar`; ``P^T P``: 3.7-5.5e-6 throughout); the script is in
    docs/ACCURACY.md. TSV-M's square ``[r, r]`` concatenations have directions near 1e-4.

    Where ``A`` is rank deficient (e.g. two identical experts, so two identical singular vectors) the polar factor is
    not unique and LAPACK returns an arbitrary completion; here the directions with singular value below
    :func:`null_tolerance` (or ``rtol`` times the largest) are mapped to zero (the partial isometry
    ``A (A^T A)^{+1/2}``), which is deterministic and keeps arbitrary directions out of the merged weights.

    Example:
        >>> A = torch.tensor([[2.0, 0.0], [0.0, 0.5], [0.0, 0.0]])
        >>> polar_gram(A).tolist()
        [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    """
    return _polar_grams([matrix], rtol, lambda gs: [_lapack.eigh(g, overwrite=True) for g in gs])[0][0]


def polar_gram_many(matrices: "list[Tensor]", rtol: float | None = None) -> list[Tensor]:
    """:func:`polar_gram` of each matrix of ``matrices``, with their eigensolves asked for together
    (:func:`studio._lapack.eigh_many`: on CUDA in cuSOLVER's batches; elsewhere :func:`polar_gram`'s bits).

    Example:
        >>> [P.tolist() for P in polar_gram_many([torch.tensor([[2.0], [0.0]]), torch.tensor([[0.0, -3.0]])])]
        [[[1.0], [0.0]], [[0.0, -1.0]]]
    """
    return [p for p, _ in _polar_grams(matrices, rtol, lambda gs: _lapack.eigh_many(gs, overwrite=True))]


def polar_gram_ranks(matrices: "list[Tensor]", rtol: float | None = None) -> list[tuple[Tensor, int]]:
    """:func:`polar_gram_many`, each polar factor with the number of directions it keeps (the rank of the matrix
    above :func:`null_tolerance`): equal to the number of columns (rows, for a wide matrix) exactly when the factor
    has orthonormal columns (rows), i.e. no direction was mapped to zero; the factor's squared norm is the rank.

    Example:
        >>> repeated = torch.tensor([[1.0, 1.0], [0.0, 0.0]])   # one direction twice: a partial isometry of rank 1
        >>> [(rank, round(float(P.square().sum()), 6)) for P, rank in polar_gram_ranks([repeated, torch.eye(2)])]
        [(1, 1.0), (2, 2.0)]
    """
    solved = _polar_grams(matrices, rtol, lambda gs: _lapack.eigh_many(gs, overwrite=True))
    return [(p, int(rank)) for p, rank in solved]


def _polar_grams(matrices: "list[Tensor]", rtol: float | None, solve) -> list[tuple[Tensor, Tensor]]:
    """:func:`polar_gram` of each matrix and its rank (a 0-d tensor on its device: no device sync for the callers
    that do not read it), ``solve(grams)`` giving the eigenpairs of fresh float64 Gram matrices."""
    wide = [m.shape[-2] < m.shape[-1] for m in matrices]
    a64 = [(m.mT if w else m).double() for m, w in zip(matrices, wide)]
    solved = solve([_lapack.gram(a) for a in a64])
    out = []
    for m, w, a, (evals, evecs) in zip(matrices, wide, a64, solved):
        p, _, keep = _polar_from_eigh(a, evals, evecs, rtol, m.dtype)
        out.append((p.mT if w else p, keep.sum()))
    return out


def _polar_from_eigh(a64: Tensor, evals: Tensor, evecs: Tensor, rtol: float | None,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(polar, f, keep)``: the polar factor ``a64 (a64^T a64)^{+1/2}`` in ``dtype`` from the eigenpairs of the
    float64 Gram matrix, with :func:`_inv_sqrt_weights`' ``f`` and ``keep`` (the one route of :func:`polar_gram`,
    :func:`polar_gram_many` and :func:`polar_gram_range`, so they give the same bits)."""
    f, keep = _inv_sqrt_weights(evals, rtol)
    return matmul(a64, _inv_sqrt_from_weights(evecs, f)).to(dtype), f, keep


def polar_extend(basis: Tensor, extra: Tensor, rtol: float | None = None) -> Tensor:
    """Polar factor of ``[basis | extra]`` where ``basis`` already has orthonormal columns (Iso-CTS eq. 11).

    Iso-CTS concatenates ``k`` orthonormal common directions with ``t = T*s`` task-specific ones (``t`` small) and
    orthogonalises the result. Writing ``A = [Q | C]`` with ``Q^T Q = I``, the Gram ``G = A^T A`` differs from the
    identity only on the span of ``B = blockdiag(orth(Q^T C), I_t)`` (``2t`` columns), so
    ``G^{-1/2} = I + B ((B^T G B)^{-1/2} - I) B^T`` exactly, and

        ``polar(A) = A + (A B) ((B^T G B)^{-1/2} - I) B^T``

    needs a ``2t x 2t`` eigendecomposition instead of an SVD of the whole ``n x (k + t)`` matrix. The result equals
    :func:`polar_gram` ``([Q | C])`` (same null-space convention; ``rtol`` as there, relative to the largest singular
    value on that span); when ``t >= k`` it simply calls it, and so it does where a kept singular value on that span
    is below :data:`_EXTEND_MIN_SINGULAR` of the largest there, which would amplify ``Q``'s float32 orthogonality
    defect, left out of the update, by about its inverse (Iso-CTS 2.4e-4 from FusionBench's float64 merge on a layer
    with one at 9e-6, 2.7e-6 with the whole polar factor).

    Example:
        >>> Q = torch.eye(4)[:, :2]
        >>> C = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
        >>> P = polar_extend(Q, C)
        >>> torch.allclose(P, polar_gram(torch.cat([Q, C], 1)), atol=1e-6)
        True
    """
    k, t = basis.shape[-1], extra.shape[-1]
    if t == 0:
        return basis.clone()
    if k == 0 or t >= k:
        return polar_gram(torch.cat([basis, extra], dim=-1), rtol)
    q64, c64 = basis.double(), extra.double()
    qx = torch.linalg.qr(matmul(q64.mT, c64)).Q                # [k, t], spans the coupling Q^T C
    ab = torch.cat([matmul(q64, qx), c64], dim=-1)             # A B, [n, 2t]
    evals, evecs = _lapack.eigh(_lapack.gram(ab), overwrite=True)
    f, keep = _inv_sqrt_weights(evals, rtol)
    sig = evals.clamp_min(0).sqrt()
    if bool((keep & (sig < _EXTEND_MIN_SINGULAR * sig.max())).any()):
        # a kept direction this weak amplifies what the update leaves out, Q's own orthogonality defect (float32
        # columns: ~1e-8), by about its inverse (docstring)
        return polar_gram(torch.cat([basis, extra], dim=-1), rtol)
    m = matmul(ab, matmul(evecs * (f - 1.0), evecs.mT))        # [n, 2t]
    out = torch.cat([q64 + matmul(m[:, :t], qx.mT), c64 + m[:, t:]], dim=-1)
    return out.to(basis.dtype)


#: :func:`polar_extend` takes the whole concatenation's polar factor where a kept singular value on the update's span
#: is below this fraction of the largest there.
_EXTEND_MIN_SINGULAR = 1e-4


#: Largest singular values whose float32 Gram matrix (entries ~ S^2) stays far inside float32's normal range.
_GRAM32_SINGULAR_RANGE = (1e-15, 1e15)


def gram_svd(matrix: Tensor, rank: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD from the eigendecomposition of the smaller Gram matrix (``A^T A`` or ``A A^T``).

    For the layer sizes of CLIP-like models (``r = min(m, n) <= ~4096``) this is as accurate as LAPACK's float32 SVD
    for every kept component and ~3x faster on a CPU, and unlike a randomized range finder it does not depend on a
    gap in the spectrum: on fine-tuning-like task matrices (a few strong directions over a flat tail) the randomized
    :func:`truncated_svd` with its defaults is ~15% off at TSV's rank ``r / 8``, this is ~1e-6 off (tested). The Gram
    is formed in float32 (BLAS ``syrk`` on the CPU, :func:`studio._lapack.gram`) and, when at most a quarter of the
    spectrum is kept, only the top ``rank`` eigenpairs are computed (LAPACK ``syevr``, :func:`studio._lapack.eigh_top`;
    the full ``eigh`` otherwise); if the weakest kept singular value is below 10% of the largest (where float32
    eigenvalues would lose digits) it is redone in float64. Components below :func:`null_tolerance` are returned as
    exact zeros with zero singular vectors (they carry no direction).

    Returns ``U [m, rank]``, ``S [rank]`` (descending), ``Vh [rank, n]``.

    Example:
        >>> A = torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> U, S, Vh = gram_svd(A, 1)
        >>> S.tolist(), (U @ Vh * S).tolist()
        ([3.0], [[3.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    """
    return _gram_svds([matrix], rank, lambda gs, k: [_lapack.eigh_top(g, k, overwrite=True) for g in gs])[0]


def gram_svd_many(matrices: "list[Tensor | Callable[[], Tensor]]",
                  rank: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`gram_svd` of each matrix of ``matrices`` (the same ``rank``), with the eigensolves of all of them asked
    for together (:func:`studio._lapack.eigh_top_many`): on CUDA they go to cuSOLVER's batches, shared with every
    other thread's (a matrix's bits there do not depend on its batch, but differ from :func:`gram_svd`'s host
    solve); elsewhere the results are :func:`gram_svd`'s, bit for bit. A matrix may be given as a function that
    makes it (e.g. a task matrix from its expert and the base), called whenever it is needed, so that only the Gram
    matrices of all of them are held at once.

    Example:
        >>> [S.tolist() for _, S, _ in gram_svd_many([torch.eye(2), 2 * torch.eye(3)], 1)]
        [[1.0], [2.0]]
    """
    return _gram_svds(matrices, rank, lambda gs, k: _lapack.eigh_top_many(gs, k, overwrite=True))


def _gram_svds(matrices: "list[Tensor | Callable[[], Tensor]]", rank: int | None,
               solve) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`gram_svd` of each matrix, ``solve(grams, k)`` giving the top-``k`` eigenpairs of fresh Gram matrices.
    A matrix given as a function returning it is made again each time it is needed (its Gram matrix, a float64
    second pass, ``U = A V / S``) and not held in between: the caller then holds one matrix at a time, not all."""
    def operand(item: dict) -> Tensor:
        if "a" in item:
            return item["a"]
        matrix = item["source"]()
        return (matrix.mT if item["wide"] else matrix).to(item["now"])

    def to_float64(item: dict) -> None:
        item["now"] = torch.float64
        if "a" in item:
            item["a"] = item["a"].double()

    items = []
    for source in matrices:
        matrix = source() if callable(source) else source
        m, n = matrix.shape[-2:]
        wide = m < n
        n = min(m, n)
        dtype = torch.float64 if matrix.dtype == torch.float64 else torch.float32
        item = {"source": source, "k": n if rank is None else max(0, min(int(rank), n)), "wide": wide,
                "dtype": dtype, "now": dtype, "n": n}
        a = (matrix.mT if wide else matrix).to(dtype)
        if not callable(source):
            item["a"] = a
        item["gram"] = _lapack.gram(a)
        items.append(item)
        del matrix, a
    # singular values above ~1.8e19 overflow a float32 Gram matrix (LAPACK then failed): those go to float64 at once
    # (one check for all of them: on CUDA one synchronisation, not one per matrix)
    flags = [torch.isfinite(item["gram"]).all() for item in items]
    finite = torch.stack(flags).tolist() if len({f.device for f in flags}) == 1 else [bool(f) for f in flags]
    for item, ok in zip(items, finite):
        if not ok and item["now"] == torch.float32:
            to_float64(item)
            item["gram"] = _lapack.gram(operand(item))

    todo = list(range(len(items)))
    while todo:   # a float32 pass, then float64 for the matrices whose kept spectrum needs it
        by_rank: dict[int, list[int]] = {}
        for j in todo:
            by_rank.setdefault(items[j]["k"], []).append(j)
        again = []
        for k, js in by_rank.items():
            grams = [items[j].pop("gram") if "gram" in items[j] else _lapack.gram(operand(items[j])) for j in js]
            solved = solve(grams, k)  # descending
            del grams
            for j, (evals, evecs) in zip(js, solved):
                item = items[j]
                S = evals[:k].clamp_min(0).sqrt()
                item["S"], item["V"] = S, evecs[:, :k]
                if item["now"] == torch.float64 or k == 0:
                    continue
                top = float(S[0])
                # float32 Gram entries are S^2: below ~1e-30 they near float32's denormals and underflow (a task
                # vector of 1e-25 entries came back as zero), above ~1e30 they overflow; a truly zero matrix needs
                # no second pass
                in_range = (_GRAM32_SINGULAR_RANGE[0] <= top <= _GRAM32_SINGULAR_RANGE[1]
                            or (top == 0 and not bool(operand(item).any())))
                if not (in_range and bool(S[-1] >= 0.1 * S[0])):
                    to_float64(item)
                    again.append(j)
        todo = again
    out = []
    for item in items:
        S, V, k, n, out_dtype = item["S"], item["V"], item["k"], item["n"], item["dtype"]
        keep = S > null_tolerance(S[0], n) if k else S > 0
        safe = torch.where(keep, S, torch.ones_like(S))
        U = matmul(operand(item), V).div_(safe).mul_(keep)   # in place: a fresh [m, rank] temporary page-faults
        S = S * keep
        V = V * keep   # both factors of a null component are zero (the eigenvectors there are arbitrary)
        U, S, Vh = U.to(out_dtype), S.to(out_dtype), V.mT.to(out_dtype)
        out.append((Vh.mT, S, U.mT) if item["wide"] else (U, S, Vh))
    return out


def svd_tall(matrix: Tensor, exact: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD like :func:`svd`, taking the SVD of the transpose for wide inputs (LAPACK's ``gesdd`` is ~2.5x
    slower on a 768 x 3072 matrix than on its transpose). Same factorisation, possibly different signs.

    ``exact=False`` (the pools' ``svd_mode="auto"``) tries :func:`svd_gram` first for float32 / half inputs: faster
    than ``gesdd`` on tall layers and more accurate for a well-conditioned matrix; it falls back to LAPACK where
    the spectrum spans too many decades for the float64 Gram matrix.

    Example:
        >>> U, S, Vh = svd_tall(torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
        >>> S.tolist(), U.shape, Vh.shape
        ([3.0, 1.0], torch.Size([2, 2]), torch.Size([2, 3]))
    """
    return svd_tall_route(matrix, exact)[:3]


def svd_tall_route(matrix: Tensor, exact: bool = True) -> tuple[Tensor, Tensor, Tensor, bool]:
    """:func:`svd_tall` and whether the factors came from the float64 Gram route (:func:`svd_gram`: orthonormal to
    ~5e-9) rather than LAPACK (float32: ~1e-6). Steps that rely on float64-level orthonormality (Iso-CTS's
    low-rank whitening update) need to know.

    Example:
        >>> svd_tall_route(torch.eye(2), exact=False)[3], svd_tall_route(torch.eye(2))[3]
        (True, False)
    """
    rows, cols = matrix.shape[-2:]
    if rows < cols:
        V, S, Uh, from_gram = svd_tall_route(matrix.mT, exact)
        return Uh.mT, S, V.mT, from_gram
    if not exact and matrix.dtype != torch.float64:
        found = svd_gram(matrix)
        if found is not None:
            return (*found, True)
    return (*svd(matrix), False)


def svd_gram(matrix: Tensor, min_ratio: float = 1e-5) -> tuple[Tensor, Tensor, Tensor] | None:
    """Thin SVD of a tall float32 ``matrix`` (``m >= n``) from the eigendecomposition of its float64 Gram matrix
    (:func:`gram_svd` of the float64 copy: ``A^T A = V diag(S^2) V^T``, ``U = A V / S``), returned in float32;
    ``None`` if ``S_min <= min_ratio * S_max``.

    For a float32 input the float64 Gram keeps every singular value above ``~1e-8 S_max`` to better than float32
    precision (absolute error ``~eps64 S_max^2 / S_i``, against ``~eps32 S_max`` for LAPACK's float32 SVD), and
    ``U``'s columns lose orthogonality only as ``~eps64 (S_max / S_i)^2``: at most ~1e-6 (float32 SVD's own level)
    above the ``min_ratio = 1e-5`` cut. Below it, or for a rank-deficient or zero matrix, the caller takes LAPACK.
    Measured on one core, 8-task sums of ViT-B/32 shapes: 224 vs 280 ms (``3072 x 768``), 172 vs 197 ms
    (``2304 x 768``), about equal for ``768 x 768``; orthogonality ``~5e-9`` vs ``~2e-6``.

    Example:
        >>> U, S, Vh = svd_gram(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        >>> S.tolist(), (U * S @ Vh).tolist()
        ([3.0, 1.0], [[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
        >>> svd_gram(torch.tensor([[1.0, 0.0], [0.0, 0.0]])) is None   # rank deficient
        True
    """
    U, S, Vh = gram_svd(matrix.double())   # float64 Gram, full eigh, U = A V / S
    if S.numel() == 0 or not float(S[-1]) > min_ratio * float(S[0]):
        return None
    return U.float(), S.float(), Vh.float()


def svd_gram_to_rank(matrix: Tensor, min_ratio: float = 1e-5) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`svd_gram` for a caller that reads no direction at or below ``sigma_max * max(m, n) * eps(float32)``
    (``torch.linalg.matrix_rank``'s numerical rank, which the diagnostics keep to), so also of a rank-deficient
    matrix, which :func:`svd_gram` leaves to LAPACK: the singular vectors of the values at or below ``min_ratio *
    sigma_max`` (below that rank's cut) are zero, their values the Gram's (within ~``sqrt(eps64) sigma_max``). The
    same bits as :func:`svd_tall`'s Gram route where that takes the matrix (full rank). The diagnostics' statistics of
    an 8-task TSV-M merge below rank ``1/T`` (this SVD and every task's responses) took 328 instead of 590 ms on a
    ``3072 x 768`` layer, one core (LAPACK's SVD after the float64 Gram that found the rank deficient;
    docs/PERFORMANCE.md).
    ``None`` (the caller takes LAPACK's) for a float64, zero or empty matrix, and where that cut is below
    ``min_ratio`` (``max(m, n)`` under 84: a value between the two would be read unresolved).

    Example:
        >>> U, S, Vh = svd_gram_to_rank(torch.diag(torch.tensor([2.0, 0.0, 1.0] + [0.0] * 97)))
        >>> S[:3].tolist(), U[:, 2].abs().sum().item(), (U * S @ Vh)[:3, :3].diagonal().tolist()
        ([2.0, 1.0, 0.0], 0.0, [2.0, 0.0, 1.0])
    """
    m, n = matrix.shape[-2:]
    if m < n:
        found = svd_gram_to_rank(matrix.mT, min_ratio)
        return None if found is None else (found[2].mT, found[1], found[0].mT)
    if matrix.dtype == torch.float64 or max(m, n) * torch.finfo(torch.float32).eps < min_ratio or n == 0:
        return None
    U, S, Vh = gram_svd(matrix.double())   # as svd_gram
    if not float(S[0]) > 0:
        return None
    resolved = S > min_ratio * S[0]
    return (U * resolved).float(), S.float(), (Vh * resolved[:, None]).float()


def svdvals(matrix: Tensor) -> Tensor:
    """Singular values (descending) of a matrix or a batch ``[..., m, n]``, like ``torch.linalg.svdvals``.

    A float32 (or half) input takes the square roots of the eigenvalues of its float64 Gram matrix on the smaller
    side (:func:`studio._lapack.gram` of the float64 copy, then ``eigvalsh``), one matrix at a time, and returns
    float32: about half the time of LAPACK's float32 ``gesdd`` on the tall layers of CLIP-like models, and more
    accurate. A backward-stable float64 eigensolve moves the eigenvalue ``sigma_i^2`` by ``~eps64 sigma_max^2``, so
    ``sigma_i`` by ``~eps64 sigma_max^2 / sigma_i`` and never by more than ``~sqrt(eps64) sigma_max`` (1.5e-8
    relative to the largest) where LAPACK's float32 SVD is off by ``~eps32 sigma_max`` (1.2e-7; 6e-7 measured). A
    float64 input takes LAPACK's float64 ``svdvals``, which this would not match (its error is ``~eps64
    sigma_max``).

    Measured on one core (8 task matrices of the ViT-B/32 bench shapes, docs/PERFORMANCE.md): 72 against 137 ms
    for ``3072 x 768`` (and its transpose), 64 against 104 ms for ``2304 x 768``, 50 against 60 ms for ``768 x 768``;
    largest error against float64's ``svdvals`` 3-5e-8 of the largest value, against 6e-7 to 1.2e-6.

    Example:
        >>> svdvals(torch.tensor([[3.0, 0.0, 0.0], [0.0, -4.0, 0.0]])).tolist()
        [4.0, 3.0]
    """
    if matrix.dtype == torch.float64 or not matrix.is_floating_point() or matrix.is_complex():
        return torch.linalg.svdvals(matrix)
    m, n = matrix.shape[-2:]
    if matrix.numel() == 0:   # no entries: no values (or zeros of none), as torch.linalg.svdvals
        return torch.zeros(*matrix.shape[:-2], min(m, n), dtype=torch.float32, device=matrix.device)
    flat = matrix.reshape(-1, m, n)
    if m < n:
        flat = flat.mT
    out = torch.empty(flat.shape[0], min(m, n), dtype=torch.float32, device=matrix.device)
    for i, a in enumerate(flat):
        evals = torch.linalg.eigvalsh(_lapack.gram(a.double()))   # ascending; rounding may leave some below 0
        out[i] = evals.flip(-1).clamp_min_(0).sqrt_()
    return out.reshape(*matrix.shape[:-2], min(m, n))


def truncated_svd_deflated(matrix: Tensor, basis: Tensor, rank: int, *, complement: Tensor | None = None,
                           exact: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` SVD of ``(I - basis basis^T) matrix`` (Iso-CTS eq. 10 + Alg. 2 lines 6-8).

    ``basis`` ``[m, k]`` has orthonormal columns (Iso-CTS: the common subspace ``U^{1:k}`` of the summed task
    matrices). ``exact=True`` forms the residual and takes LAPACK's SVD, as the official code does. Otherwise:

    * if ``complement`` ``[m, m - k]`` is given (an orthonormal basis of the orthogonal complement of ``basis``,
      e.g. the remaining left singular vectors when ``U`` is square), the residual is ``complement (complement^T
      matrix)`` exactly, so only the small ``(m - k) x n`` matrix ``complement^T matrix`` is decomposed;
    * else the residual is formed and decomposed with :func:`gram_svd`.

    Returns ``U [m, rank]`` (orthogonal to ``basis``), ``S [rank]``, ``Vh [rank, n]``.

    Example:
        >>> M = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
        >>> U, S, Vh = truncated_svd_deflated(M, torch.eye(4)[:, :1], 2, exact=True)
        >>> S.tolist()
        [3.0, 2.0]
    """
    return _deflated_svds([matrix], basis, rank, complement, exact, lambda ms, r: [gram_svd(m, r) for m in ms])[0]


def truncated_svd_deflated_many(matrices: "list[Tensor]", basis: Tensor, rank: int, *,
                                complement: Tensor | None = None,
                                exact: bool = False) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`truncated_svd_deflated` of each matrix of ``matrices`` (one basis, one rank), with the eigensolves of
    all of them asked for together (:func:`gram_svd_many`: on CUDA in cuSOLVER's batches; elsewhere the results of
    one at a time, bit for bit).

    Example:
        >>> M = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0]))
        >>> [S.tolist() for _, S, _ in truncated_svd_deflated_many([M, 2 * M], torch.eye(4)[:, :1], 1)]
        [[3.0], [6.0]]
    """
    return _deflated_svds(matrices, basis, rank, complement, exact, gram_svd_many)


def _deflated_svds(matrices: "list[Tensor]", basis: Tensor, rank: int, complement: Tensor | None, exact: bool,
                   svds: Callable) -> list[tuple[Tensor, Tensor, Tensor]]:
    """:func:`truncated_svd_deflated` of each matrix, ``svds(matrices, rank)`` giving their :func:`gram_svd`."""
    if complement is not None and not exact:
        found = svds([matmul(complement.mT, m) for m in matrices], rank)
        return [(matmul(complement, Uz), S, Vh) for Uz, S, Vh in found]
    residuals = [matmul(basis, matmul(basis.mT, m)).neg_().add_(m) for m in matrices]   # m - basis basis^T m
    if exact:
        return [truncated_svd(residual, rank, exact=True) for residual in residuals]
    # U = R v / sigma inherits the rounding of R relative to its (small) norm; one more projection restores
    # the orthogonality to the basis that eq. 10 guarantees, at m k rank flops.
    return [(U - matmul(basis, matmul(basis.mT, U)), S, Vh) for U, S, Vh in svds(residuals, rank)]

