"""Shared linear-algebra building blocks used by the spectral methods, calibrations and diagnostics.

Methods compose these instead of re-implementing them: truncated SVD, whitening (orthogonal Procrustes / polar
factor, TSV eq. 8-9), projections. Everything here is pure: tensors in, tensors out, no device policy.
"""

from __future__ import annotations

import torch
from torch import Tensor


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

    This is the whitening / orthogonal-Procrustes step of TSV-M (TSV eq. 8-9) and Iso-CTS (Iso Alg. 1), written
    as the official code writes it (``u @ v`` of the SVD). Zero columns stay (numerically) irrelevant when the
    result is multiplied by zero singular values, exactly as in the official code.

    Example:
        >>> P = polar(torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
        >>> P.tolist()
        [[1.0, 0.0], [0.0, 1.0]]
    """
    U, _, Vh = svd(matrix)
    return U @ Vh


def reconstruct(U: Tensor, S: Tensor, Vh: Tensor) -> Tensor:
    """``U diag(S) Vh`` without materialising ``diag(S)``."""
    return (U * S.unsqueeze(-2)) @ Vh
