"""TSV-M, TSV-C, Iso-C and Iso-CTS: parity with the official-code loops, closed-form properties from the papers,
the fast linear-algebra blocks against their definitions, hyperparameter errors, and end-to-end merges."""

from __future__ import annotations

import pytest
import torch

import studio
from studio import linalg
from studio.compress import Compressed
from studio.methods.iso_c import iso_c
from studio.methods.iso_cts import iso_cts, iso_cts_dims
from studio.methods.tsv_m import tsv_m, tsv_rank
from studio.pool import TaskPool
from studio.registry import get_method
from studio.schema import HyperparameterError

from .conftest import clip_like_state_dict, make_experts
from studio.reference import (iso_c_reference, iso_cts_dims_reference, iso_cts_reference, task_vectors_of,
                                 tsv_c_reference, tsv_m_reference)

RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _layer(tasks: torch.Tensor, svd_mode: str = "exact"):
    """A one-key pool whose task matrices are exactly ``tasks`` ([T, m, n], base = 0)."""
    base = {"w": torch.zeros(tasks.shape[1:])}
    experts = {f"t{i}": {"w": t.clone()} for i, t in enumerate(tasks)}
    return TaskPool(base, experts, device="cpu", svd_mode=svd_mode).layer("w")


def _random_tasks(T: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, m, n, generator=torch.Generator().manual_seed(seed))


def _realistic_tasks(T: int, m: int, n: int, seed: int = 0) -> torch.Tensor:
    """Fine-tuning-like task matrices (as studio.bench): a component shared by all tasks + a task-specific low-rank
    part with a decaying spectrum + dense noise, i.e. a few strong directions over a flat tail."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, min(m, n) // 8)
    shared = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / k
    decay = torch.logspace(0, -2, k)
    return torch.stack([0.4 * shared + (torch.randn(m, k, generator=g) * decay) @ torch.randn(k, n, generator=g) / k
                        + 0.02 * torch.randn(m, n, generator=g) for _ in range(T)])


def _svd_polar(a: torch.Tensor) -> torch.Tensor:
    """The official code's orthogonalisation: ``u @ v`` of the (float64) SVD."""
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    return u @ vh


# ------------------------------------------------------------------------------------------------ linear algebra
def test_polar_gram_equals_svd_polar_for_tall_and_wide():
    for shape in [(12, 8), (8, 12), (40, 40)]:
        a = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        p = linalg.polar_gram(a)
        assert _rel(p, _svd_polar(a)) < RTOL
        small = min(shape)
        gram = p.mT @ p if shape[0] >= shape[1] else p @ p.mT
        torch.testing.assert_close(gram, torch.eye(small), atol=1e-5, rtol=0)


def test_polar_gram_keeps_weak_but_real_directions():
    """TSV-M's square [r, r] concatenations have sigma_min ~1e-4 (measured on ViT-B/32 shapes); they must keep
    their full weight, as in the official SVD."""
    g = torch.Generator().manual_seed(2)
    q1, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    sig = torch.logspace(0, -4, 30, dtype=torch.float64)
    a = ((q1 * sig) @ q2.mT).float()
    assert _rel(linalg.polar_gram(a), _svd_polar(a)) < 1e-3      # the 1e-4 direction is there: else error ~0.2
    assert _rel(linalg.polar_gram(a) @ linalg.polar_gram(a).mT, torch.eye(30)) < 1e-5


def test_polar_gram_is_zero_on_exactly_dependent_directions():
    """Duplicated columns: the polar factor is not unique (LAPACK returns an arbitrary unit completion); we return
    the partial isometry, [u | u] -> [u | u] / sqrt(2), which adds no direction that is not in the data."""
    u = torch.nn.functional.normalize(torch.randn(6, 1, generator=torch.Generator().manual_seed(3)), dim=0)
    p = linalg.polar_gram(torch.cat([u, u], dim=1))
    torch.testing.assert_close(p, torch.cat([u, u], dim=1) / 2 ** 0.5, atol=1e-6, rtol=0)


def test_polar_extend_equals_the_full_polar_factor():
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(20, 9, generator=g))
    for c in [torch.randn(20, 3, generator=g),                             # generic
              q[:, :3] @ torch.randn(3, 3, generator=g) + 0.1 * torch.randn(20, 3, generator=g),   # mostly in span(Q)
              torch.randn(20, 12, generator=g)]:                            # t >= k: falls back to polar_gram
        full = torch.cat([q, c], 1)
        assert _rel(linalg.polar_extend(q, c), _svd_polar(full)) < RTOL


def test_gram_svd_matches_lapack_on_a_flat_tail_where_the_randomized_finder_does_not():
    """Task matrices have a few strong directions over a flat tail (TSV Fig. 2, Iso Fig. 1). At TSV's rank the
    randomized linalg.truncated_svd (niter=3, oversample=10) is ~9% off there; gram_svd is as accurate as LAPACK."""
    g = torch.Generator().manual_seed(5)
    P, _ = torch.linalg.qr(torch.randn(128, 96, generator=g, dtype=torch.float64))
    Q, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    sig = torch.cat([torch.logspace(1, 0, 6, dtype=torch.float64), torch.linspace(0.5, 0.3, 90, dtype=torch.float64)])
    a = ((P * sig) @ Q.mT).float()
    k = 12
    exact = linalg.reconstruct(P[:, :k], sig[:k], Q[:, :k].mT)
    errors = {name: _rel(linalg.reconstruct(*f(a, k)), exact)
              for name, f in [("randomized", linalg.truncated_svd), ("gram", linalg.gram_svd)]}
    assert errors["gram"] < 1e-5, errors
    assert errors["randomized"] > 1e-2, errors       # documents why the pool does not use it for the top-k
    _, s, _ = linalg.gram_svd(a, k)
    torch.testing.assert_close(s.double(), sig[:k], rtol=1e-5, atol=0)


def test_gram_svd_zero_and_rank_deficient_inputs():
    u, s, vh = linalg.gram_svd(torch.zeros(5, 4), 2)
    assert s.tolist() == [0.0, 0.0] and not u.any() and not vh.any()
    a = torch.randn(9, 1, generator=torch.Generator().manual_seed(5)) @ torch.randn(1, 6)
    for m in (a, a.mT.contiguous()):                 # tall and wide (the transpose is decomposed)
        u, s, vh = linalg.gram_svd(m, 3)             # rank 1: the 2 null components come back as exact zeros
        assert s[0] > 0 and s[1:].tolist() == [0.0, 0.0]
        assert not u[:, 1:].any() and not vh[1:].any()   # with zero vectors on both sides (no arbitrary ones)
        torch.testing.assert_close(linalg.reconstruct(u, s, vh), m, atol=1e-5, rtol=1e-5)


def test_auto_mode_rank_deficient_tasks_do_not_depend_on_which_rank_was_cached_first():
    """A lower rank is served from any cached higher one; in "auto" every rank (the full one included) comes from
    the Gram route with exact-zero null components, so the cache order cannot change a result."""
    from studio import diagnostics as D

    g = torch.Generator().manual_seed(3)
    experts = {f"t{i}": {"w": torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g)} for i in range(3)}
    base = {"w": torch.zeros(40, 30)}
    fresh = D.sti(TaskPool(base, experts).layer("w"))
    pool = TaskPool(base, experts)
    D.sti(pool.layer("w"), rank=30)                   # caches the full decompositions first
    assert D.sti(pool.layer("w")) == pytest.approx(fresh, rel=1e-6)
    assert D.sti(TaskPool(base, experts).layer("w"), rank=2) == pytest.approx(fresh, rel=1e-5)   # the true rank


@pytest.mark.parametrize("shape", [(300, 80), (80, 300), (64, 64)])
def test_svd_tall_float64_gram_route_is_more_accurate_than_lapack_float32(shape):
    """svd_tall(exact=False): thin SVD from the float64 Gram matrix where the spectrum spans < 5 decades."""
    g = torch.Generator().manual_seed(5)
    m, n = shape
    r = min(shape)
    U0 = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    S0 = torch.logspace(0, -4, r, dtype=torch.float64)                  # 4 decades, as flat-tailed task sums
    A = ((U0 * S0) @ V0.mT).float()
    exact = torch.linalg.svd(A.double(), full_matrices=False)            # of the float32 input
    for mode_exact, tol_s, tol_orth in ((False, 1e-6, 1e-6), (True, 1e-3, 1e-4)):
        U, S, Vh = linalg.svd_tall(A, exact=mode_exact)
        assert U.dtype == S.dtype == Vh.dtype == torch.float32
        assert float(((S.double() - exact.S).abs() / exact.S).max()) < tol_s, mode_exact
        eye = torch.eye(r, dtype=torch.float64)
        assert float((U.double().mT @ U.double() - eye).abs().max()) < tol_orth, mode_exact
        assert _rel((U * S) @ Vh, A.double()) < 1e-5
    # rank-deficient, zero, or too wide a spectrum: LAPACK
    assert linalg.svd_gram(torch.zeros(5, 3)) is None
    assert linalg.svd_gram(torch.diag(torch.tensor([1.0, 1e-6, 0.5]))) is None
    U, S, Vh = linalg.svd_tall(torch.diag(torch.tensor([1.0, 0.0, 0.5])), exact=False)
    assert S.tolist() == [1.0, 0.5, 0.0] and torch.allclose(U.mT @ U, torch.eye(3))


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (100, 100)])
def test_svd_gram_to_rank_resolves_a_rank_deficient_matrix_up_to_its_numerical_rank(shape):
    """svd_gram_to_rank: the float64 Gram route for a matrix svd_gram leaves to LAPACK (rank deficient), for callers
    that read no direction beyond the numerical rank: the values to float64's within ~sqrt(eps64) of the largest,
    the vectors over the rank orthonormal and spanning the matrix's, none beyond it; the same bits as svd_tall's
    Gram route on a full-rank matrix; None where it cannot tell (float64, zero, under 84 rows and columns)."""
    g = torch.Generator().manual_seed(12)
    m, n = shape
    rank = 70
    U0 = torch.linalg.qr(torch.randn(m, rank, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64)).Q
    A = ((U0 * torch.logspace(0, -3, rank, dtype=torch.float64)) @ V0.mT).float()   # rounding: rank 70 numerically
    assert linalg.svd_gram(A if m >= n else A.mT) is None                            # svd_tall takes LAPACK here
    U, S, Vh = linalg.svd_gram_to_rank(A)
    r = min(shape)
    assert U.shape == (m, r) and S.shape == (r,) and Vh.shape == (r, n)
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    want = torch.linalg.svdvals(A.double())
    assert float((S.double() - want).abs().max()) < 1e-7 * float(want[0])
    live = int((want > want[0] * max(shape) * torch.finfo(torch.float32).eps).sum())
    assert live == rank
    eye = torch.eye(rank, dtype=torch.float64)
    assert float((U[:, :rank].double().mT @ U[:, :rank].double() - eye).abs().max()) < 1e-6
    assert float((Vh[:rank].double() @ Vh[:rank].double().mT - eye).abs().max()) < 1e-6
    assert not U[:, rank:].any() and not Vh[rank:].any()
    assert _rel((U * S) @ Vh, A.double()) < 1e-6
    # its range: the float32 matrix's own (float64's SVD of it)
    U64 = torch.linalg.svd(A.double(), full_matrices=False).U[:, :rank]
    assert float(torch.linalg.matrix_norm(U64 - U[:, :rank].double() @ (U[:, :rank].double().mT @ U64))) < 1e-5
    # ten more directions at 1e-6 of the largest: below the numerical rank's cut (max(m, n) eps32 = 3.6e-5), above
    # what the Gram counts as zero (1.5e-7), and unresolved there (a float64 Gram's error is ~eps64 / 1e-12 of them)
    U1 = torch.linalg.qr(torch.randn(m, rank + 10, generator=g, dtype=torch.float64)).Q
    V1 = torch.linalg.qr(torch.randn(n, rank + 10, generator=g, dtype=torch.float64)).Q
    S1 = torch.cat([torch.logspace(0, -3, rank, dtype=torch.float64), torch.full((10,), 1e-6, dtype=torch.float64)])
    U, S, Vh = linalg.svd_gram_to_rank(((U1 * S1) @ V1.mT).float())
    assert not U[:, rank:].any() and not Vh[rank:].any() and float(S[rank + 9]) > 5e-7
    # full rank: svd_tall's Gram route, bit for bit
    full = A + 0.01 * torch.randn(m, n, generator=g)
    for got, same in zip(linalg.svd_gram_to_rank(full), linalg.svd_tall(full, exact=False)):
        assert torch.equal(got, same)
    assert linalg.svd_gram_to_rank(A.double()) is None and linalg.svd_gram_to_rank(torch.zeros(m, n)) is None
    assert linalg.svd_gram_to_rank(A[:83, :83]) is None and linalg.svd_gram_to_rank(A[:84, :84]) is not None


@pytest.mark.parametrize("shape", [(300, 80), (80, 300), (64, 64), (3, 2, 40, 25)])
def test_svdvals_from_the_float64_gram_is_closer_to_float64_than_lapack_float32(shape):
    """linalg.svdvals (the diagnostics' spectra): float32 in, float32 out, within ~sqrt(eps64) of the largest value
    of float64's singular values of the same float32 matrix, where LAPACK's float32 svdvals is ~eps32 off; in
    descending order, over any batch, wide or tall; rank-deficient, zero and tiny values stay >= 0."""
    g = torch.Generator().manual_seed(11)
    *batch, m, n = shape
    r = min(m, n)
    U0 = torch.linalg.qr(torch.randn(*batch, m, r, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(*batch, n, r, generator=g, dtype=torch.float64)).Q
    S0 = torch.logspace(0, -6, r, dtype=torch.float64)                   # 6 decades: a tail at float32's rounding
    A = ((U0 * S0) @ V0.mT).float()
    want = torch.linalg.svdvals(A.double())
    got = linalg.svdvals(A)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert bool((got[..., :-1] >= got[..., 1:]).all()) and bool((got >= 0).all())
    err = float(((got.double() - want).abs() / want[..., :1]).max())
    lapack = float(((torch.linalg.svdvals(A).double() - want).abs() / want[..., :1]).max())
    assert err < 1e-7 and err < lapack / 3, (err, lapack)
    # the values above 1e-3 of the largest to float32's own precision
    big = want > 1e-3 * want[..., :1]
    assert float(((got.double() - want).abs() / want)[big].max()) < 3e-7
    # rank-deficient, zero, half precision, float64 (LAPACK's float64: this route would not match it)
    low = torch.diag(torch.tensor([2.0, 0.0, 1.0]))
    assert linalg.svdvals(low).tolist() == [2.0, 1.0, 0.0]
    assert linalg.svdvals(torch.zeros(4, 3)).tolist() == [0.0, 0.0, 0.0]
    half = linalg.svdvals(A[..., :20, :10].half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), torch.linalg.svdvals(A[..., :20, :10].half().double()),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(linalg.svdvals(A.double()), want, rtol=0, atol=0)
    # no entries: torch.linalg.svdvals's shapes (a reshape of them failed)
    for empty, shape_out in (((0, 5), (0,)), ((5, 0), (0,)), ((2, 0, 5), (2, 0)), ((0, 3, 4), (0, 3))):
        assert linalg.svdvals(torch.zeros(empty)).shape == torch.linalg.svdvals(torch.zeros(empty)).shape == shape_out


@pytest.mark.parametrize("shape", [(30, 20), (20, 30)])
def test_truncated_svd_deflated_matches_the_formed_residual(shape):
    tasks = _random_tasks(2, *shape, seed=6)
    u_all, _, _ = torch.linalg.svd(tasks.sum(0), full_matrices=False)
    k, s = 14, 3
    basis = u_all[:, :k]
    b64 = basis.double()
    residual = tasks[0].double() - b64 @ (b64.mT @ tasks[0].double())
    ue, se, vhe = torch.linalg.svd(residual, full_matrices=False)
    expected = linalg.reconstruct(ue[:, :s], se[:s], vhe[:s])
    complement = u_all[:, k:] if shape[0] <= shape[1] else None
    for exact in (True, False):
        u, sv, vh = linalg.truncated_svd_deflated(tasks[0], basis, s, complement=complement, exact=exact)
        assert _rel(linalg.reconstruct(u, sv, vh), expected) < RTOL
        assert (basis.mT @ u).abs().max() < 1e-5                      # eq. 10: orthogonal to the common subspace


# ---------------------------------------------------------------------------------------------------------- TSV-M
@pytest.mark.parametrize("T,m,n,fraction", [(4, 12, 8, None), (4, 8, 12, None), (3, 10, 10, None),
                                            (4, 12, 8, 0.125), (2, 9, 12, 0.3)])
def test_tsv_m_matches_the_official_loop(T, m, n, fraction):
    tasks = _random_tasks(T, m, n, seed=T + m)
    ref = tsv_m_reference([{"w": t} for t in tasks], rank_fraction=fraction)["w"]
    assert _rel(tsv_m(_layer(tasks), rank_fraction=fraction), ref) < RTOL


def test_tsv_m_zero_padded_columns_of_the_official_code_change_nothing():
    """Official: polar of the [m, r] zero-padded sum_u (T*k < r); here: polar of the T*k non-zero columns only."""
    T, m, n, k = 3, 12, 10, 2                               # T * k = 6 < r = 10: four zero columns
    tasks = _random_tasks(T, m, n, seed=7).double()
    us, ss, vs = [], [], []
    for t in tasks:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vh[:k].mT)
    U, S, V = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    pad = lambda x: torch.cat([x, x.new_zeros(x.shape[0], 10 - T * k)], 1)   # noqa: E731
    S_pad = torch.cat([S, S.new_zeros(10 - T * k)])
    official = (_svd_polar(pad(U)) * S_pad) @ _svd_polar(pad(V)).mT
    thin = (linalg.polar_gram(U) * S) @ linalg.polar_gram(V).mT
    assert _rel(thin, official) < 1e-12
    assert _rel(thin, tsv_m_reference([{"w": t} for t in tasks], rank_fraction=k / 10)["w"]) < 1e-12


def test_tsv_m_single_task_full_rank_reproduces_the_task():
    task = _random_tasks(1, 9, 6, seed=8)
    torch.testing.assert_close(tsv_m(_layer(task), rank_fraction=1.0), task[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tsv_m(_layer(task, "auto"), rank_fraction=1.0), task[0], atol=1e-5, rtol=1e-5)


def test_tsv_m_of_orthogonal_tasks_is_the_sum_of_their_truncations():
    """Orthogonal TSVs need no decorrelation (TSV appx. A, case 1): U, V are already orthonormal, so TSV-M is the
    low-rank TA of eq. 6. Each task has 6 singular values in its own 6-dim block; k = int(12 * 0.25) = 3."""
    g = torch.Generator().manual_seed(9)
    P, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    sig = torch.tensor([5.0, 4.0, 3.0, 0.5, 0.4, 0.3])
    tasks = torch.stack([(P[:, b] * sig) @ Q[:, b].mT for b in (slice(0, 6), slice(6, 12))])
    truncations = sum((P[:, b][:, :3] * sig[:3]) @ Q[:, b][:, :3].mT for b in (slice(0, 6), slice(6, 12)))
    for mode in ("exact", "auto"):
        torch.testing.assert_close(tsv_m(_layer(tasks, mode), rank_fraction=0.25), truncations, atol=1e-5, rtol=1e-5)


def test_tsv_m_duplicated_expert_gives_its_truncation():
    """Two identical experts: U = [U_k | U_k] is rank deficient. With the partial-isometry convention the merge is
    the expert's own rank-k truncation (LAPACK's arbitrary completion would add a random rank-k term)."""
    task = _random_tasks(1, 10, 8, seed=10)[0]
    u, s, vh = torch.linalg.svd(task, full_matrices=False)
    merged = tsv_m(_layer(torch.stack([task, task])))                      # k = 4
    torch.testing.assert_close(merged, linalg.reconstruct(u[:, :4], s[:4], vh[:4]), atol=1e-5, rtol=1e-5)


def test_tsv_m_with_one_hot_preferences_is_that_tasks_truncation():
    """Without a calibration, preferences weight the task matrices by p_i / max p (engine); weight-0 tasks have only
    zero singular values, carry no direction and drop out of the whitening: one-hot TSV-M is the target's own rank-k
    truncation (it was T times that with w = T p_i)."""
    base, experts = _pool_args()
    merged = studio.merge(base, experts, "tsv_m", svd_mode="exact", preferences={"task1": 1.0})
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    u, s, vh = torch.linalg.svd((experts["task1"][key] - base[key]).double(), full_matrices=False)
    expected = linalg.reconstruct(u[:, :3], s[:3], vh[:3])             # r = 12, k = 12 / 4 = 3
    assert _rel(merged[key].double() - base[key].double(), expected) < RTOL


def _flat_tailed_tasks(T, m, n, seed):
    """Task matrices with a few leading singular values (10 to 1) over a flat tail (0.5 to 0.3), as real fine-tuning
    deltas have: a randomized range finder's top-k is off on such spectra, an exact route is not."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(T):
        P = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
        Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
        sigma = torch.cat([torch.logspace(1, 0, 6, dtype=torch.float64),
                           torch.linspace(0.5, 0.3, n - 6, dtype=torch.float64)])
        out.append(((P * sigma) @ Q.mT).float())
    return torch.stack(out)


@pytest.mark.parametrize("tasks", [_realistic_tasks(8, 96, 64, seed=11), _flat_tailed_tasks(8, 128, 96, seed=5)],
                         ids=["gapped", "flat-tailed"])
def test_tsv_m_auto_mode_is_close_to_exact_on_realistic_tasks(tasks):
    """The pool's "auto" top-k route against LAPACK's SVD, through the method; the flat-tailed case is what tells an
    accurate route from a plausible one (a randomized finder at oversampling 10, 3 power iterations: 0.61 there, and
    1.2e-5 on the gapped case)."""
    assert _rel(tsv_m(_layer(tasks, "auto")), tsv_m(_layer(tasks, "exact"))) < 1e-4


def test_tsv_m_rank_fraction_errors_name_the_value():
    tasks = _random_tasks(4, 12, 8, seed=12)
    assert tsv_rank(768, 8, None) == 96
    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0\.5.*4 tasks x 4 = 16 exceeds the layer 'w'"):
        tsv_m(_layer(tasks), rank_fraction=0.5)
    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0 keeps no singular components"):
        tsv_m(_layer(tasks), rank_fraction=0.0)
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0\.9"):
        studio.merge(base, experts, "tsv_m", rank_fraction=0.9)
    # The schema's range is open at 0, and says so wherever it is shown: errors, docs table, app slider.
    with pytest.raises(HyperparameterError, match=r"'rank_fraction' = 0\.0 is outside the allowed range \(0, 1/T\]"):
        studio.merge(base, experts, "tsv_m", rank_fraction=0.0)
    from studio.cli import methods_table
    from studio.ui.controls import control_specs
    assert "`rank_fraction` = 1/T in (0, 1/T]" in methods_table()
    spec = next(m for m in studio.list_methods() if m["name"] == "tsv_m")
    slider = next(c for c in control_specs(spec, num_tasks=8) if c.name == "rank_fraction")
    assert slider.minimum == pytest.approx(0.005) and slider.value == slider.maximum == 0.125   # ends at 1/T
    with pytest.raises(HyperparameterError, match="rank_fraction"):
        studio.merge(base, experts, "tsv_m", rank_fraction=1.5)


def test_tsv_m_and_tsv_c_refuse_a_rank_fraction_that_keeps_nothing_on_every_matrix_layer():
    """k = int(r * rank_fraction) = 0 on a small layer merges it to zero, as officially; on every matrix layer the
    matrices all merged to zero, silently: the app's rank slider at its low end (0.005) on MiniSuite's rank-128
    layers, or more experts than the largest rank (a first user's audit). The fraction the error suggests keeps a
    component (1/r itself can round below one)."""
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    matrices = [k for k, t in base.items() if studio.DEFAULT_LAYER_RULE.is_matrix(k, t.shape)]
    ranks = {k: min(base[k].shape) for k in matrices}
    largest = max(ranks.values())
    low = 0.99 / largest   # k = 0 on every layer
    with pytest.raises(HyperparameterError, match=rf"tsv_m: rank_fraction = {low:g} keeps k = int\(r \* {low:g}\) "
                                                  rf"= 0 components on each of the {len(ranks)} matrix layers the "
                                                  rf"layer rule selects \(rank {largest} at the most\), so they would "
                                                  rf"merge to zero; expected rank_fraction >= 0\.08334$"):
        studio.merge(base, experts, "tsv_m", rank_fraction=low)
    assert largest == 12 and int(12 * float(f"{1 / 12:.6g}")) == 0   # 1/r as printed before kept nothing
    merged = studio.merge(base, experts, "tsv_m", rank_fraction=0.08334)
    small = [k for k in matrices if ranks[k] < largest]
    assert small and all(torch.equal(merged[k], base[k]) for k in small)   # k = 0 there: zero, as officially
    assert all(not torch.equal(merged[k], base[k]) for k in matrices if ranks[k] == largest)
    tiny = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    five = {f"t{i}": {"w": torch.full((3, 3), float(i)), "b": torch.ones(3)} for i in range(5)}
    for kw in ({}, {"rank_fraction": 0.4}):   # the default 1/T keeps k = 0; 0.4 keeps 1, but T * 1 > 3
        with pytest.raises(HyperparameterError, match=r"5 experts need a matrix layer of rank at least 5 .*the "
                                                      r"largest of the 1 matrix layers .* has rank 3; use at most 3"):
            studio.merge(tiny, five, "tsv_m", **kw)
    # TSV-C: the same rule on the layers it compresses (every 2-D tensor), before any decomposition
    compressed = [min(t.shape) for k, t in base.items() if studio.ALL_MATRICES.is_matrix(k, t.shape)]
    low = 0.99 / max(compressed)
    with pytest.raises(HyperparameterError, match=rf"compress: rank_fraction = {low:g} keeps k = int.* = 0 "
                                                  r"components on each .*only its other tensors"):
        studio.compress(base, experts, rank_fraction=low)
    with pytest.raises(HyperparameterError, match=r"compress: rank_fraction = 0\.0769231 \(the default, 1/T\) keeps"):
        studio.compress({"w": torch.zeros(12, 12)}, {f"t{i}": {"w": torch.eye(12) * i} for i in range(13)})
    studio.compress(base, experts, rank_fraction=0.08334)


def test_tsv_m_rank_change_reuses_the_cached_decompositions():
    pool = TaskPool(*_pool_args(), device="cpu")
    studio.merge_pool(pool, "tsv_m", rank_fraction=0.25)
    cached = len(pool._svd_cache)
    studio.merge_pool(pool, "tsv_m", rank_fraction=0.1)           # smaller k: slices of the cached factors
    assert len(pool._svd_cache) == cached


def _pool_args():
    base = clip_like_state_dict()
    return base, make_experts(base, 4)


def _assert_end_to_end(merged, base, ref, alpha, rtol=RTOL):
    for key, b in base.items():
        delta = merged[key].double() - b.double()
        assert _rel(delta, alpha * ref[key]) < rtol, key


def test_tsv_m_end_to_end_equals_the_official_code():
    """studio.merge on a CLIP-like state dict (1-D norms, a 4-D conv, embeddings, text_projection) against
    theta_pre + alpha * official TSV-M; text_projection and non-matrices get the mean of the task vectors."""
    base, experts = _pool_args()
    merged = studio.merge(base, experts, "tsv_m", svd_mode="exact", alpha=0.7)
    ref = tsv_m_reference(task_vectors_of(base, experts))
    _assert_end_to_end(merged, base, ref, 0.7)
    mean_tp = torch.stack([e["text_projection"] - base["text_projection"] for e in experts.values()]).mean(0)
    torch.testing.assert_close(merged["text_projection"], base["text_projection"] + 0.7 * mean_tp)
    assert get_method("tsv_m").params[-1].default == 1.0


def test_tsv_m_merged_spectrum_is_the_kept_task_singular_values():
    """TSV Prop. 4.1: U_perp and V_perp are orthonormal, so the merged delta's nonzero singular values are exactly the
    T * k singular values each task keeps (eq. 4-6 with eq. 9)."""
    g = torch.Generator().manual_seed(1)
    tasks = [torch.randn(24, 16, generator=g) for _ in range(4)]
    out = studio.merge({"w": torch.zeros(24, 16)}, {f"t{i}": {"w": t} for i, t in enumerate(tasks)}, "tsv_m",
                       alpha=1.0)["w"].double()
    kept = torch.cat([torch.linalg.svdvals(t.double())[:4] for t in tasks]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(out)[:16], kept, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- Iso-C
@pytest.mark.parametrize("T,m,n", [(4, 12, 8), (3, 8, 12), (5, 10, 10)])
def test_iso_c_matches_the_official_loop(T, m, n):
    tasks = _random_tasks(T, m, n, seed=20 + T)
    assert _rel(iso_c(_layer(tasks)), iso_c_reference([{"w": t} for t in tasks])["w"]) < RTOL


def test_iso_c_spectrum_is_flat_at_the_mean_singular_value_of_the_sum():
    tasks = _realistic_tasks(4, 24, 16, seed=21)
    mean_sigma = torch.linalg.svdvals(tasks.sum(0).double()).mean()
    base = {"w": torch.zeros(24, 16)}
    experts = {f"t{i}": {"w": t} for i, t in enumerate(tasks)}
    merged = studio.merge(base, experts, "iso_c", alpha=1.3)["w"]
    torch.testing.assert_close(torch.linalg.svdvals(merged.double()), torch.full((16,), 1.3 * float(mean_sigma),
                               dtype=torch.float64), rtol=1e-5, atol=0)


def test_iso_c_end_to_end_with_the_paper_default_alpha():
    base, experts = _pool_args()
    assert get_method("iso_c").params[0].default == 1.3               # Iso Table 5, ViT-B/32, 8 tasks
    merged = studio.merge(base, experts, "iso_c", svd_mode="exact")
    _assert_end_to_end(merged, base, iso_c_reference(task_vectors_of(base, experts)), 1.3)


# -------------------------------------------------------------------------------------------------------- Iso-CTS
def test_iso_cts_dims_follow_the_official_rounding():
    assert iso_cts_dims(768, 8, 0.8) == (616, 19)
    assert iso_cts_dims(1024, 20, 0.8) == (1024 - 20 * 10, 10)        # int(819.2)=819, round(10.25)=10
    assert iso_cts_dims(12, 4, 0.8) == (8, 1)                          # round(0.75) = 1
    assert iso_cts_dims(6, 4, 0.8) == (6, 0)                           # round(0.5) = 0 (half to even)
    for r in range(1, 80):
        for T in range(1, 11):
            for f in [i / 20 for i in range(21)]:
                k, s = iso_cts_dims_reference(r, T, f)
                if k >= 0:                                             # the official sizes where they are valid
                    assert iso_cts_dims(r, T, f) == (k, s), (r, T, f)
                else:                                                  # official slices with a negative index
                    assert iso_cts_dims(r, T, f) == (r - T * (r // T), r // T)


@pytest.mark.parametrize("T,m,n,f", [(4, 12, 8, 0.8), (3, 8, 12, 0.5), (4, 12, 12, 0.0), (2, 10, 14, 0.3),
                                     (4, 16, 10, 0.6)])
def test_iso_cts_matches_the_official_loop(T, m, n, f):
    tasks = _random_tasks(T, m, n, seed=30 + T + m)
    ref = iso_cts_reference([{"w": t} for t in tasks], common_space_fraction=f)["w"]
    for mode in ("exact", "auto"):
        assert _rel(iso_cts(_layer(tasks, mode), f), ref) < RTOL, mode


def test_iso_cts_spectrum_is_flat_at_the_mean_of_the_selected_singular_values():
    """Eq. 12-13 computed independently: common values from the SVD of the sum, task-specific ones from the SVDs of
    the projected task matrices; the merged matrix has all r singular values equal to their mean."""
    T, m, n, f = 4, 20, 16, 0.5
    tasks = _realistic_tasks(T, m, n, seed=31).double()
    k, s = iso_cts_dims(16, T, f)
    u, sig, _ = torch.linalg.svd(tasks.sum(0), full_matrices=False)
    proj = torch.eye(m, dtype=torch.float64) - u[:, :k] @ u[:, :k].mT
    ts = [torch.linalg.svdvals(proj @ t)[:s] for t in tasks]
    sigma_bar = (sig[:k].sum() + sum(x.sum() for x in ts)) / 16
    merged = iso_cts(_layer(tasks.float(), "auto"), f)
    torch.testing.assert_close(torch.linalg.svdvals(merged.double()), sigma_bar.expand(16), rtol=1e-5, atol=0)


def test_iso_cts_with_the_whole_common_space_is_iso_c():
    """k/r = 1 leaves s = round(0 / T) = 0 task-specific directions: U_* = U, V_* = V (Iso sec. 5.4)."""
    for shape in [(12, 8), (8, 12)]:
        tasks = _random_tasks(4, *shape, seed=40)
        assert iso_cts_dims(8, 4, 1.0) == (8, 0)
        for mode in ("exact", "auto"):
            assert _rel(iso_cts(_layer(tasks, mode), 1.0), iso_c(_layer(tasks, mode))) < RTOL
    base, experts = _pool_args()
    a = studio.merge(base, experts, "iso_cts", common_space_fraction=1.0, alpha=1.0)
    b = studio.merge(base, experts, "iso_c", alpha=1.0)
    for key in base:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_iso_cts_is_accurate_where_the_concatenated_basis_is_ill_conditioned(seed):
    """Tall layer, four tasks sharing their row space (rank 3) plus noise, float32 experts: the square
    [Vc | V_ts] of the official pieces has singular values down to ~3e-4, which amplifies any orthogonality defect
    of the common block. Both modes stay within 3e-5 of the float64 official loop; a low-rank update of LAPACK's
    float32 block (the previous code in both modes) was 2e-5 to 8e-5 off."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(40, 26, generator=g, dtype=torch.float64)
    rows = torch.randn(3, 26, generator=g, dtype=torch.float64)
    tasks = [torch.randn(40, 3, generator=g, dtype=torch.float64) @ rows * 0.5
             + 0.05 * torch.randn(40, 26, generator=g, dtype=torch.float64) for _ in range(4)]
    ref = iso_cts_reference([{"w": t} for t in tasks])["w"]
    k, s = iso_cts_dims(26, 4, 0.8)
    u, _, vh = torch.linalg.svd(sum(tasks), full_matrices=False)
    V_star = torch.cat([vh[:k].mT] + [torch.linalg.svd(t - u[:, :k] @ (u[:, :k].mT @ t))[2][:s].mT for t in tasks], 1)
    assert float(torch.linalg.svdvals(V_star)[-1]) < 1e-3            # the case under test
    experts = {f"t{i}": {"w": (base + t).float()} for i, t in enumerate(tasks)}
    for mode in ("exact", "auto"):
        layer = TaskPool({"w": base.float()}, experts, device="cpu", svd_mode=mode).layer("w")
        assert _rel(iso_cts(layer, 0.8), ref) < 3e-5, mode


def test_iso_cts_auto_mode_whitens_fully_where_the_sums_svd_fell_back_to_lapack():
    """A sum whose spectrum spans more than five decades: svd_mode="auto" takes LAPACK's float32 SVD for it (the
    Gram route declines), whose common block is orthonormal to ~1e-6 only. The low-rank whitening update of that
    block spread the flat spectrum by 15 % and was 3.2e-2 from the float64 official loop (the official float32
    loop: 8.4e-3); the whole-concatenation whitening, as in exact mode, keeps it flat. (In exact mode LAPACK's float32
    residuals put one genuine direction at ~1.4e-7 of the largest, at the null tolerance: OpenBLAS's Haswell kernel
    keeps it, its SkylakeX kernel maps it to zero, iso_cts' docstring; either way the rest stays flat.)"""
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(3, 26, generator=g, dtype=torch.float64)
    tasks = []
    for _ in range(4):
        weak = (torch.randn(40, 4, generator=g, dtype=torch.float64) * torch.logspace(0, -4, 4, dtype=torch.float64)
                @ torch.randn(4, 26, generator=g, dtype=torch.float64))
        tasks.append(torch.randn(40, 3, generator=g, dtype=torch.float64) @ rows + 0.1 * weak
                     + 1e-4 * torch.randn(40, 26, generator=g, dtype=torch.float64))
    tasks = torch.stack(tasks).float()
    ref = iso_cts_reference([{"w": t.double()} for t in tasks], 0.8)["w"]
    for mode in ("auto", "exact"):
        layer = _layer(tasks, mode)
        merged = iso_cts(layer, 0.8)
        assert not layer.sum_svd_from_gram(), mode                   # the case under test
        sv = torch.linalg.svdvals(merged.double())
        kept = sv[sv > 1e-3 * sv[0]]
        assert kept.numel() == sv.numel() or (mode == "exact" and kept.numel() == sv.numel() - 1), mode
        assert float((kept[0] - kept[-1]) / kept[0]) < 3e-3, mode     # 0.15 before, in auto mode
        if kept.numel() == sv.numel():
            assert _rel(merged, ref) < 6e-3, mode


def test_iso_cts_auto_mode_is_close_to_exact_on_realistic_tasks():
    for shape in [(96, 64), (64, 96)]:
        tasks = _realistic_tasks(8, *shape, seed=41)
        assert _rel(iso_cts(_layer(tasks, "auto"), 0.8), iso_cts(_layer(tasks, "exact"), 0.8)) < 1e-4


def test_iso_cts_zero_weight_tasks_add_no_arbitrary_directions():
    """One-hot preferences make three task matrices exactly zero: their (empty) task-specific directions are
    dropped in both modes, rather than taking LAPACK's arbitrary singular vectors at weight sigma_bar."""
    base, experts = _pool_args()
    exact, auto = (studio.merge(base, experts, "iso_cts", alpha=1.0, svd_mode=mode, preferences={"task1": 1.0})
                   for mode in ("exact", "auto"))
    key = "visual.transformer.resblocks.1.attn.in_proj_weight"          # r = 12: k = 8, s = 1 per task
    for merged in (exact, auto):
        sv = torch.linalg.svdvals(merged[key].double() - base[key].double())
        # 8 common + 1 from task1, flat; the rest is the float32 rounding of base + delta (1.3e-6 of the delta's
        # largest, now that one-hot weighs task1 once: 4 times, it was a quarter of that)
        assert int((sv > 1e-5 * sv[0]).sum()) == 9
    for k in base:
        torch.testing.assert_close(exact[k], auto[k], atol=1e-5, rtol=1e-4)


def _lora_experts(on_base: bool, T: int = 4, m: int = 96, n: int = 64, rank: int = 3):
    """T rank-3 task matrices (LoRA-like: T * rank < r), stored on a random base of CLIP-like scale (their deltas
    then carry the weights' float32 rounding) or on a zero base (exact deltas)."""
    g = torch.Generator().manual_seed(7)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    W = 0.02 * torch.randn(m, n, generator=g) * on_base   # drawn either way: the same deltas
    deltas = [1e-3 * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) for _ in range(T)]
    return key, {key: W}, {f"t{i}": {key: W + d} for i, d in enumerate(deltas)}, deltas


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_merges_of_low_rank_experts_keep_only_the_sums_directions(method):
    """A rank-deficient sum (LoRA experts) has a null space whose singular vectors the float32 rounding of the
    stored weights sets. The official code puts sigma_bar on them: these 4 rank-3 experts merged 127 % (Iso-C)
    and 134 % (Iso-CTS) apart stored on a random base and on a zero one. Here the merge lies in the span of the
    task matrices and does not depend on where they are stored, in either svd_mode; Iso-C is sigma_bar (the mean
    over all r singular values, as officially) on the sum's 12 directions."""
    key, base0, clean, deltas = _lora_experts(on_base=False)
    ref = studio.merge(base0, clean, method, alpha=1.0, svd_mode="auto")[key].double()
    cols = torch.linalg.svd(torch.cat([d.double() for d in deltas], 1), full_matrices=False)[0][:, :12]
    rows = torch.linalg.svd(torch.cat([d.double() for d in deltas], 0), full_matrices=False)[2][:12]
    assert float((ref - cols @ (cols.T @ ref) @ rows.T @ rows).norm()) < 1e-5 * float(ref.norm())
    if method == "iso_c":
        U, S, Vh = torch.linalg.svd(sum(d.double() for d in deltas), full_matrices=False)
        expected = S.sum() / S.numel() * U[:, :12] @ Vh[:12]
        assert _rel(ref, expected) < 1e-5
    key, base, stored, _ = _lora_experts(on_base=True)
    for mode in ("auto", "exact"):
        out = studio.merge(base, stored, method, alpha=1.0, svd_mode=mode)[key].double() - base[key].double()
        assert _rel(out, ref) < 1e-4, mode


@pytest.mark.parametrize("method, scale", [("iso_c", 1e-2), ("iso_c", 1e-3), ("iso_c", 1e-4), ("iso_cts", 1e-2),
                                           ("iso_cts", 1e-3), ("iso_cts", 1e-4)])
def test_iso_merges_of_low_rank_experts_small_against_their_weights_do_not_depend_on_the_base(method, scale):
    """LoRA-like deltas 1e-2 and 1e-4 of the weights' size: their rounding reaches ~1e-5 of the sum, above a cut on
    the singular values' size alone (~1e-6 of the largest), which then kept tens of rounding directions and merged
    these experts 1.3-2.1 times the merge's size apart on a random and a zero base. The rule looks at the weights'
    rounding (linalg.rounding_level): the sum's T rank directions are found on both, and the merges agree to what
    the rounding moves the kept directions themselves (docs/ACCURACY.md: 4e-6 to 4e-4). So do Iso-CTS's
    task-specific directions (each task's residual past its rank is its expert's rounding, LayerTasks.task_rounding):
    a size cut on them kept rounding directions and merged 1.1 times apart at 1e-3 and 1e-4."""
    g = torch.Generator().manual_seed(7)
    key, m, n, T, rank = "w", 96, 64, 4, 3
    W = 0.02 * torch.randn(m, n, generator=g)
    deltas = []
    for _ in range(T):
        d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
        deltas.append(d * (scale * 0.02 / float(d.std())))
    merges = []
    for B in (W, torch.zeros(m, n)):
        experts = {f"t{i}": {key: B + d} for i, d in enumerate(deltas)}
        pool = TaskPool({key: B}, experts)
        assert pool.layer(key).sum_rank() == T * rank
        merges.append(studio.merge({key: B}, experts, method, alpha=1.0)[key].double() - B.double())
    assert _rel(merges[0], merges[1]) < 20 * scale   # 4e-5 at 1e-3 (docs/ACCURACY.md); 2.1 with the size cut


SUBNORMAL_METHODS = ["weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "tsv_m", "iso_c", "iso_cts",
                     "ortho_merge", "align_merge_b", "align_merge_o"]


@pytest.mark.parametrize("method", SUBNORMAL_METHODS)
@pytest.mark.parametrize("rank", [2, None])
def test_merges_of_experts_in_float32s_subnormal_range_are_the_scaled_merges(method, rank):
    """Every method is homogeneous in the task matrices, so experts (on a zero base) scaled by 2^-130, into float32's
    subnormal range (below 1.2e-38, where rounding is absolute: 2^-149), merge to the merge of the unscaled ones,
    scaled, up to that rounding (2^-19 of entries of size 1). With a relative rounding model only
    (linalg.rounding_level) rank-2 experts there kept rounding directions: TSV-M, Iso-C and Iso-CTS merged 0.53,
    0.94 and 0.71 apart. (TSV-M's ``svd_mode="exact"`` keeps such directions, as the official code does.)"""
    g = torch.Generator().manual_seed(5)
    m, n, T = 24, 16, 4
    tasks = [torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) if rank
             else torch.randn(m, n, generator=g) for _ in range(T)]
    merges = []
    for c in (1.0, 2.0 ** -130):
        experts = {f"t{i}": {"w": x * c} for i, x in enumerate(tasks)}
        merges.append(studio.merge({"w": torch.zeros(m, n)}, experts, method, svd_mode="auto", seed=0)["w"].double()
                      / c)
    assert _rel(merges[1], merges[0]) < 1e-4


@pytest.mark.parametrize("svd_mode", ["auto", "exact"])
def test_iso_cts_of_constant_experts_in_float32s_subnormal_range(svd_mode):
    """A helper's quirks audit: constant (rank-1) deltas ``c (i + 1)`` of 3 experts merge to ``1.5 c`` (alpha 1.5,
    the common direction only) down to ``c = 1e-38``, and merged to 3.3e7 c at 1e-40 and -9.4e6 c at 1e-42: the
    residuals of a subnormal task matrix hold rounding at 1e-5 to 1e-4 of its norm, whitened in as directions. They
    are decomposed scaled by a power of two now (iso_cts._residual_shift), which needs the task's norm bound: the
    pool's float32 norms underflowed to 0 there (pool._norm2)."""
    for c in (1.0, 1e-38, 1e-40, 1e-42):
        experts = {f"t{i}": {"w": torch.full((6, 6), c * (i + 1))} for i in range(3)}
        merged = studio.merge({"w": torch.zeros(6, 6)}, experts, "iso_cts", svd_mode=svd_mode)["w"].double() / c
        torch.testing.assert_close(merged, torch.full((6, 6), 1.5, dtype=torch.float64), rtol=2e-3, atol=0)


def test_task_rounding_bounds_the_stored_experts_rounding():
    """LayerTasks.task_rounding, the per-entry rounding Iso-CTS cuts each task's residual at, against the rounding
    actually in 4 experts made in float64 and stored in float32 on an exactly stored base: an upper bound (float32
    rounds to within half an ulp, eps |x| / 2 at most), and within twice the measured one; the same for each
    task's weighted matrix under preference weights."""
    g = torch.Generator().manual_seed(3)
    m, n, T = 192, 128, 4
    B = (0.02 * torch.randn(m, n, generator=g, dtype=torch.float64)).float().double()
    exact = [B + 1e-4 * torch.randn(m, n, generator=g, dtype=torch.float64) for _ in range(T)]
    experts = {f"t{i}": {"w": x.float()} for i, x in enumerate(exact)}
    for weights in (None, torch.tensor([1.0, 0.5, 2.0, 1e-3])):
        layer = TaskPool({"w": B.float()}, experts).layer("w", weights)
        for i, x in enumerate(exact):
            w = 1.0 if weights is None else float(weights[i])
            measured = float((experts[f"t{i}"]["w"].double() - x).std()) * w
            bound = layer.task_rounding(i, float(layer.task_delta(i).double().square().sum()))
            assert bound <= layer.task_rounding(i) <= 3 * bound   # without the delta: its norm bounded
            assert measured < bound < 2 * measured, (i, w, measured, bound)


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts", "align_merge_o", "ortho_merge"])
def test_low_rank_experts_stored_in_different_precisions_do_not_depend_on_the_base(method):
    """Each task's components are cut at its own expert's stored rounding (``rounding_cut(i, ...)``): one expert in
    float64 (off float32's grid, finer rounding) and three in float32, rank 3, on a zero and a random base. TSV-M cut
    every task at task 0's rounding put the two 0.50 apart (a test audit); the tests above store every expert alike,
    where the task index does not matter."""
    g = torch.Generator().manual_seed(2)
    m, n, T = 64, 48, 4
    deltas = [1e-3 * torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g,
                                                                                      dtype=torch.float64)
              for _ in range(T)]
    merges = []
    for W in (torch.zeros(m, n), 0.05 * torch.randn(m, n, generator=g)):
        W64 = W.double()
        experts = {f"t{i}": {"w": (W64 + d) if i == 0 else (W64 + d).float()} for i, d in enumerate(deltas)}
        merges.append(studio.merge({"w": W}, experts, method, svd_mode="auto")["w"].double() - W64)
    assert _rel(merges[0], merges[1]) < 1e-4


@pytest.mark.parametrize("method", ["tsv_m", "align_merge_o", "ortho_merge"])
@pytest.mark.parametrize("scale", [1e-2, 1e-3, 1e-4])
def test_whitening_merges_of_low_rank_experts_do_not_depend_on_the_base(method, scale):
    """LoRA-like experts (rank 3, TSV-M's and AlignMerge-O's k and L above it) stored on a random base of CLIP's
    scale carry their weights' rounding in the components past their rank, above a cut on the size of the task's own
    singular values: TSV-M and AlignMerge-O whitened those vectors in beside the other tasks' directions, and
    Ortho-Merge's rank (matrix_rank's tolerance) kept the deconflicted sum's rounding, which put the merges on a
    random and a zero base 0.5-0.9 times their size apart (docs/ENGINE.md). Cut at each expert's stored rounding
    (LayerTasks.rounding_cut, rank_above_rounding) they agree to what the rounding moves the kept directions."""
    g = torch.Generator().manual_seed(7)
    key, m, n, T = "w", 96, 64, 4
    W = 0.02 * torch.randn(m, n, generator=g)
    u, v = torch.randn(m, 1, generator=g), torch.randn(1, n, generator=g)   # a direction the tasks nearly share
    deltas = []
    for t in range(T):
        near = (u + 0.5 * torch.randn(m, 1, generator=g)) @ (v + 0.5 * torch.randn(1, n, generator=g))
        d = 2 * near + torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)   # rank 3
        deltas.append(d * (scale * 0.02 / float(d.std())))
    hp = {"lam": 1.0} if method == "align_merge_o" else {"alpha": 1.0}
    if method == "ortho_merge":   # the deconflicted sum's path: the shared direction's weaker copies are removed
        from studio.methods.ortho_merge import interference_mask

        svds = TaskPool({key: torch.zeros(m, n)}, {f"t{i}": {key: d} for i, d in enumerate(deltas)}).layer(key).svds(
            range(T), 5)
        assert bool(interference_mask(torch.stack([u for u, _, _ in svds]), torch.stack([v for _, v, _ in svds]),
                                      0.3).any())
    for mode in ("auto",) if method == "tsv_m" else ("auto", "exact"):   # TSV-M's exact mode: the official one's
        merges = []
        for B in (W, torch.zeros(m, n)):
            experts = {f"t{i}": {key: B + d} for i, d in enumerate(deltas)}
            merges.append(studio.merge({key: B}, experts, method, svd_mode=mode, **hp)[key].double() - B.double())
        assert _rel(merges[0], merges[1]) < 20 * scale, mode


@pytest.mark.parametrize("method", ["align_merge_o", "ortho_merge"])
def test_whitening_merges_of_low_rank_experts_on_a_square_layer_in_exact_mode(method):
    """LAPACK's float32 SVD puts a rank-3 expert's remaining singular values at ~5e-7 of its largest on a zero base,
    far above that base's rounding: Ortho-Merge took those components' arbitrary vectors for interfering ones and
    removed them, which merged these experts 0.41 apart on a zero and a random base; a component at float32's
    resolution of its task's largest is no direction either (as AlignMerge-O's components 2..L)."""
    g = torch.Generator().manual_seed(7)
    key, m, n = "w", 768, 768
    W = 0.02 * torch.randn(m, n, generator=g)
    deltas = [1e-4 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) for _ in range(4)]
    hp = {"lam": 1.0} if method == "align_merge_o" else {"alpha": 1.0}
    merges = [studio.merge({key: B}, {f"t{i}": {key: B + d} for i, d in enumerate(deltas)}, method,
                           svd_mode="exact", **hp)[key].double() - B.double() for B in (W, torch.zeros(m, n))]
    assert _rel(merges[0], merges[1]) < 1e-4


def test_stored_precision_is_float64_only_for_values_off_float32s_grid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 200, generator=g)
    assert linalg.stored_precision(w) == torch.float32
    assert linalg.stored_precision(w.double()) == torch.float32
    assert linalg.stored_precision(w.double() / 3) == torch.float64
    assert linalg.stored_precision(w.half()) == linalg.stored_precision(w.half().float()) == torch.float32
    odd = w.double()
    odd[1, 1] += 1e-12   # off the sampled entries (every 14th): the whole tensor decides
    assert linalg.stored_precision(odd) == torch.float64


def test_low_rank_float32_experts_upcast_to_float64_do_not_depend_on_the_base():
    """Float32 weights upcast to float64 carry float32's rounding; rounded as float64 (the tensor's dtype), LoRA-like
    experts stored that way on a random base kept it as directions: 0.60 (TSV-M), 0.90 (Ortho-Merge), 1.83
    (Iso-CTS) and 2.08 (Iso-C) apart from the same experts on a zero base, against Task Arithmetic's 3.1e-6 (a
    helper's audit). linalg.stored_precision rounds them as float32 (layer level: the merged delta before the base)."""
    from studio.methods.align_merge import align_merge_o
    from studio.methods.ortho_merge import ortho_merge

    g = torch.Generator().manual_seed(7)
    m, n = 96, 64
    W = 0.02 * torch.randn(m, n, generator=g)
    deltas = [1e-4 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) for _ in range(4)]
    fns = {"tsv_m": lambda L: tsv_m(L), "iso_c": iso_c, "iso_cts": lambda L: iso_cts(L, 0.8),
           "ortho_merge": lambda L: ortho_merge(L, 0.3, 5), "align_merge_o": lambda L: align_merge_o(L, "sum", True)}
    out = {}
    for name, (B, experts) in {"base": (W, [W + d for d in deltas]), "zero": (torch.zeros(m, n), deltas)}.items():
        pool = TaskPool({"w": B.double()}, {f"t{i}": {"w": e.double()} for i, e in enumerate(experts)})
        out[name] = {method: fn(pool.layer("w")).double() for method, fn in fns.items()}
    for method in fns:
        assert _rel(out["base"][method], out["zero"][method]) < 1e-4, method


def _tasks_with_a_small_direction(m: int = 128, n: int = 128, T: int = 4) -> torch.Tensor:
    """T float64 task matrices whose full-rank sum spans three decades plus one direction at 1e-6 of its largest."""
    g = torch.Generator().manual_seed(11)
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.logspace(0, -3, n, dtype=torch.float64)
    s[-1] = 1e-6
    total = (U * (0.05 * s)) @ V.T
    spread = torch.randn(T, m, n, generator=g, dtype=torch.float64) * float(total.std())
    return total / T + spread - spread.mean(0)


def test_ortho_merge_above_tau_1_is_iso_c_with_a_small_direction():
    """Ortho-Merge with nothing removed (tau >= 1) is Iso-C (Ortho-Merge sec. 4): on a full-rank sum with a real
    direction at 1e-6 of its largest, which Iso-C keeps, matrix_rank's tolerance (max(m, n) eps of the largest)
    dropped it and put the merge 8.9 % from Iso-C's; both now take the sum's rank above the stored rounding."""
    key, m, n, tasks = "w", 128, 128, _tasks_with_a_small_direction()
    B = 0.02 * torch.randn(m, n, generator=torch.Generator().manual_seed(1))
    experts = {f"t{i}": {key: (B.double() + t).float()} for i, t in enumerate(tasks)}
    for mode in ("auto", "exact"):
        iso = studio.merge({key: B}, experts, "iso_c", alpha=1.0, svd_mode=mode)[key]
        ortho = studio.merge({key: B}, experts, "ortho_merge", alpha=1.0, tau=1.5, svd_mode=mode)[key]
        assert torch.equal(ortho, iso), mode


def test_iso_c_keeps_an_isolated_small_direction_that_the_data_place():
    """A full-rank square sum with one direction at 1e-6 of its largest singular value, stored on a random base:
    far above one value of the weights' rounding (~1e-9 per entry here), so the data place it (stored on another
    base the merge moves 3e-5), and the official loop keeps it. A cut at ten times float32's resolution of the
    largest (1.7e-6 at r = 128) dropped it: the merge was 8 % of its size from the official one, as on three
    attention layers of the bench's ViT-B/32 experts (docs/ACCURACY.md)."""
    key, m, n, tasks = "w", 128, 128, _tasks_with_a_small_direction()
    merges = []
    for seed in (1, 2):
        B = 0.02 * torch.randn(m, n, generator=torch.Generator().manual_seed(seed))
        experts = {f"t{i}": {key: (B.double() + t).float()} for i, t in enumerate(tasks)}
        stored = [e[key].double() - B.double() for e in experts.values()]
        S = torch.linalg.svdvals(sum(stored))
        assert 5e-7 < float(S[-1] / S[0]) < float(linalg.rank_tolerance(S[0], (m, n)) / S[0])   # under the size cut
        pool = TaskPool({key: B}, experts)
        assert pool.layer(key).sum_rank() == n
        ours = studio.merge({key: B}, experts, "iso_c", alpha=1.0)[key].double() - B.double()
        official = iso_c_reference([{key: d.float()} for d in stored])[key].double()
        assert _rel(ours, official) < 1e-4
        merges.append(ours)
    assert _rel(merges[0], merges[1]) < 1e-3


def test_rank_above_rounding_skips_the_float64_svd_only_where_it_could_not_decide_otherwise(monkeypatch):
    """Where the sum's SVD is LAPACK's (svd_mode "exact"), the rank rule decides on float64 singular values; a
    full-rank sum whose smallest float32 value clears every cut by more than its error takes r without them (they
    cost 2.3x an exact-mode Ortho-Merge of a 3072 x 768 layer). The rank is the float64 values' rank in every case:
    well conditioned, a LoRA-like sum on a random base, a direction at 1e-6 of the largest, and one at the cut."""
    from studio.linalg import svd_tall_route

    g = torch.Generator().manual_seed(2)
    m, n, T = 96, 64, 4
    W = 0.02 * torch.randn(m, n, generator=g)
    cases = {"full": [0.01 * torch.randn(m, n, generator=g) for _ in range(T)],
             "lora": [1e-4 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) for _ in range(T)]}
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    for name, tail in (("small", 1e-6), ("edge", 2e-9)):
        s = torch.linspace(1, 0.5, n, dtype=torch.float64)
        s[-1] = tail
        cases[name] = [((U * (0.05 * s)) @ V.T / T).float() for _ in range(T)]
    calls = []
    svdvals = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda a, *args, **kw: calls.append(a.dtype) or svdvals(a, *args,
                                                                                                            **kw))
    for name, deltas in cases.items():
        layer = TaskPool({"w": W}, {f"t{i}": {"w": W + d} for i, d in enumerate(deltas)}, svd_mode="exact").layer("w")
        S = svd_tall_route(layer.sum(), exact=True)[1]
        calls.clear()
        got = layer.rank_above_rounding(layer.sum(), S, False)
        S64 = svdvals(layer.sum().double())
        sigma = linalg.rounding_level([t for terms, _ in layer._rounding_terms() for t in terms],
                                      float(layer.sum().double().square().sum()), m * n, T)
        want = linalg.rounding_rank(S64, (m, n), sigma, resolution=max(m, n) * 2.0 ** -52 * float(S64[0]))
        assert got == want, name
        assert bool(calls) == (name != "full"), name   # only the well-conditioned full-rank sum skips the SVD
    lora = {f"t{i}": {"w": W + d} for i, d in enumerate(cases["lora"])}
    assert TaskPool({"w": W}, lora, svd_mode="exact").layer("w").sum_rank() == 12


def test_iso_c_keeps_a_direction_at_1e_7_of_the_largest_that_a_float64_svd_places():
    """One full-rank expert with a singular value at 1e-7 of its largest, on a zero base: below a float64 Gram's
    resolution (null_tolerance, 1.2e-7 here), but the sum then goes to LAPACK and its float64 singular values place
    it; the official loop keeps it, and dropping it put the merge 12.5 % off (a helper's audit)."""
    g = torch.Generator().manual_seed(0)
    n = 64
    U = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.linspace(1, 0.5, n, dtype=torch.float64)
    s[-1] = 1e-7
    delta = ((U * s) @ V.T).float()
    base, experts = {"w": torch.zeros(n, n)}, {"a": {"w": delta}}
    assert TaskPool(base, experts).layer("w").sum_rank() == n
    ours = studio.merge(base, experts, "iso_c", alpha=1.0)["w"]
    assert _rel(ours, iso_c_reference([{"w": delta}])["w"]) < 1e-5


def test_iso_rank_of_float64_experts_counts_their_deltas_rounding():
    """Float64 experts' deltas are rounded to float32 after the subtraction: two large deltas that cancel (X + a and
    -X + b, a and b of rank 3) leave that rounding in the sum, which the sum's rank must not count as directions (it
    read 64 of 64 and merged 3.2 times the merge's size off; float32 experts gave the true 6)."""
    g = torch.Generator().manual_seed(5)
    m, n = 96, 64
    X = torch.randn(m, n, generator=g, dtype=torch.float64)
    small = [1e-6 * (torch.randn(m, 3, generator=g, dtype=torch.float64) @ torch.randn(3, n, generator=g,
                                                                                       dtype=torch.float64))
             for _ in range(2)]
    for dtype in (torch.float64, torch.float32):
        experts = {"a": {"w": (X + small[0]).to(dtype)}, "b": {"w": (-X + small[1]).to(dtype)}}
        assert TaskPool({"w": torch.zeros(m, n, dtype=dtype)}, experts).layer("w").sum_rank() == 6, dtype


def test_iso_merges_of_an_ill_conditioned_full_rank_sum_keep_every_direction():
    """A full-rank sum whose spectrum spans five decades: every direction is real and gets sigma_bar, as in the
    official loop, so the merge is flat at the mean over all r. torch.linalg.matrix_rank's tolerance (max(m, n) *
    eps: 3.1e-5 of the largest here, 3.7e-4 on a 3072 x 768 layer) cut its weakest directions (Iso-C 38 % off on a
    3072 x 768 sum spanning four decades); the rank rule is float32's resolution."""
    g = torch.Generator().manual_seed(3)
    m, n = 256, 128
    U = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    total = (U * torch.logspace(0, -5, n, dtype=torch.float64)) @ V.T   # singular values 1 .. 1e-5
    half = torch.randn(m, n, generator=g, dtype=torch.float64) * 1e-3
    tasks = torch.stack([(total / 2 + half).float(), (total / 2 - half).float()])
    S = torch.linalg.svdvals(tasks.double().sum(0))
    assert float(S[-1] / S[0]) < m * torch.finfo(torch.float32).eps   # below matrix_rank's cut, above float32's
    for mode in ("exact", "auto"):
        for merged in (iso_c(_layer(tasks, svd_mode=mode)),
                       iso_cts(_layer(tasks, svd_mode=mode), common_space_fraction=1.0)):
            flat = torch.linalg.svdvals(merged.double())
            torch.testing.assert_close(flat, torch.full_like(flat, float(S.mean())), rtol=1e-4, atol=0)


def test_iso_cts_keeps_the_directions_of_a_lightly_fine_tuned_task():
    """A task 1e-4 the size of the others (or weighted 1e-4) has real task-specific directions, which the official
    code whitens in at sigma_bar. A rank cut at matrix_rank's max(m, n) * eps of the sum dropped them (the merge
    moved by 24.8 %); here the merge has every one of its r directions, flat at sigma_bar, in both modes."""
    g = torch.Generator().manual_seed(0)
    T, m, n = 8, 256, 256
    experts = {f"t{i}": {"w": torch.randn(m, n, generator=g) * (1e-4 if i == 0 else 1.0)} for i in range(T)}
    base = {"w": torch.zeros(m, n)}
    runs = [studio.merge(base, experts, "iso_cts", alpha=1.0, svd_mode=mode)["w"] for mode in ("auto", "exact")]
    light = {k: {"w": v["w"] * (1e4 if k == "t0" else 1.0)} for k, v in experts.items()}
    runs.append(studio.merge(base, light, "iso_cts", alpha=1.0, preferences=[1e-4] + [1.0] * (T - 1))["w"])
    for merged in runs:
        S = torch.linalg.svdvals(merged.double())
        assert float(S[-1] / S[0]) > 1 - 1e-3   # r directions, all at sigma_bar
    assert _rel(runs[0], runs[1]) < 1e-4


@pytest.mark.parametrize("seed", range(8))
def test_iso_cts_cuts_what_the_sums_rounding_moves_into_a_residual(seed):
    """In a rank-deficient sum the common block holds every live direction, so a task's exact residual is zero; the
    float32 one holds the sum's rounding too, moved into the complement by the projection on the sum's computed
    basis (``-(I - U U^T) E A^+ Delta_t``). Cut at the expert's own rounding only, one such direction of 4 rank-3
    experts sharing a direction (seed 6; deltas 1e-3 of the weights) was kept at sigma_bar on a random base: the merge
    was 0.35 from the same experts' on a zero base in both modes and at both fractions, against Iso-C's 8e-5."""
    g = torch.Generator().manual_seed(seed)
    key, m, n, T = "w", 96, 64, 4
    W = 0.02 * torch.randn(m, n, generator=g)
    u, v = torch.randn(m, 1, generator=g), torch.randn(1, n, generator=g)
    deltas = []
    for _ in range(T):
        near = (u + 0.5 * torch.randn(m, 1, generator=g)) @ (v + 0.5 * torch.randn(1, n, generator=g))
        d = 2 * near + torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)   # rank 3
        deltas.append(d * (1e-3 * 0.02 / float(d.std())))
    for fraction, mode in ((0.5, "auto"), (0.8, "exact")):
        merges = [studio.merge({key: B}, {f"t{i}": {key: B + d} for i, d in enumerate(deltas)}, "iso_cts",
                               common_space_fraction=fraction, svd_mode=mode)[key].double() - B.double()
                  for B in (W, torch.zeros(m, n))]
        assert _rel(merges[0], merges[1]) < 1e-3, (fraction, mode)


@pytest.mark.parametrize("seed", range(3))
def test_iso_cts_cuts_a_residual_at_its_own_experts_rounding_where_that_is_the_larger(seed):
    """Two roundings reach a residual: the expert's own (on the complement, ``(m - k') x n``) and the sum's, moved by
    the projection (``(m - rank) x k'``). On a wide layer the first is the larger: one rank-3 expert of a ``32 x 256``
    layer, deltas 1e-3 of its weights, cut at the moved rounding alone (mutant rc1) whitened its rounding in on a
    random base, 0.58 from the same expert's merge on a zero base (seeds 0 and 2)."""
    g = torch.Generator().manual_seed(seed)
    key, m, n = "w", 32, 256
    W = 0.02 * torch.randn(m, n, generator=g)
    delta = 1e-3 * 0.02 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) / 3
    merges = [studio.merge({key: B}, {"t": {key: B + delta}}, "iso_cts")[key].double() - B.double()
              for B in (W, torch.zeros(m, n))]
    assert _rel(merges[0], merges[1]) < 2e-2


def _low_rank_tasks(seed: int, m: int, n: int, T: int, scale: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A random base of CLIP's scale and T rank-3 task matrices of deltas ``scale`` of its weights."""
    g = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(m, n, generator=g)
    torch.randn(m + n, generator=g)   # the draws of a shared direction, which these tasks do not use
    deltas = []
    for _ in range(T):
        d = torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
        deltas.append(d * (scale * 0.02 / float(d.std())))
    return W, deltas


@pytest.mark.parametrize("shape, T, fraction, scale, seed", [
    ((64, 96), 8, 0.3, 1e-2, 0), ((96, 64), 8, 0.3, 1e-4, 1),   # k = 16 of the sum's 24 live directions
    ((96, 64), 4, 0.5, 1e-2, 0),                                # a projection error just above rank_tolerance
])
def test_iso_cts_leaves_out_the_dependences_and_the_noise_of_a_rank_deficient_concatenation(shape, T, fraction, scale,
                                                                                            seed):
    """Where the tasks keep more directions than the sum's live ones outside the common block, ``[Uc | U_ts]`` has
    exact dependences, which the float32 directions place at 1e-6 to 6e-6, above null_tolerance: whitened in, 8
    rank-3 experts at fraction 0.3 merged 1.2-1.3 apart on a random and a zero base (auto mode; 1.2 in exact mode at
    1e-2). A residual direction at 1.3e-6 of the sum's largest (4 experts on a zero base, the float32 projection's
    error just above rank_tolerance) was whitened in too, 0.35 apart. Now both are left out (iso_cts' _dependences):
    the merges are as far apart as Iso-C's."""
    (m, n), key = shape, "w"
    W, deltas = _low_rank_tasks(seed, m, n, T, scale)
    for mode in ("auto", "exact"):
        merges = [studio.merge({key: B}, {f"t{i}": {key: B + d} for i, d in enumerate(deltas)}, "iso_cts",
                               common_space_fraction=fraction, svd_mode=mode)[key].double() - B.double()
                  for B in (W, torch.zeros(m, n))]
        assert _rel(merges[0], merges[1]) < 20 * scale, mode


def test_iso_cts_of_tasks_that_cancel_in_a_rank_deficient_sum_does_not_depend_on_rounding():
    """Experts a, -a and c (rank 3 each): the sum is c's, and the common directions past its rank are set by
    rounding. Projecting those out of a's and -a's residuals too (eq. 10 with all k) left them an arbitrary part:
    10 % (auto) and 65 % (exact) between the experts stored on a base and on a zero one."""
    g = torch.Generator().manual_seed(7)
    key, m, n = "visual.transformer.resblocks.0.mlp.c_fc.weight", 96, 64
    W = 0.02 * torch.randn(m, n, generator=g)
    a = 1e-3 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
    c = 1e-3 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g)
    deltas = {"a": a, "neg_a": -a, "c": c}
    for f in (0.8, 0.5):
        ref = studio.merge({key: torch.zeros(m, n)}, {t: {key: d} for t, d in deltas.items()}, "iso_cts", alpha=1.0,
                           common_space_fraction=f)[key].double()
        for mode in ("auto", "exact"):
            out = studio.merge({key: W}, {t: {key: W + d} for t, d in deltas.items()}, "iso_cts", alpha=1.0,
                               svd_mode=mode, common_space_fraction=f)[key].double() - W.double()
            assert _rel(out, ref) < 1e-4, (f, mode)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_merges_of_a_sum_whose_norm_overflows_name_it(method):
    """Entries of 1e38 sum to a finite matrix whose largest singular value is inf: the rank rule keeps every
    direction, so the merge's finiteness check names the layer (a rank of 0 returned the base silently)."""
    g = torch.Generator().manual_seed(0)
    experts = {f"t{i}": {"w": torch.randn(8, 6, generator=g).sign() * 1e38} for i in range(2)}
    with pytest.raises(studio.StudioError, match=f"{method}: the merged delta of 'w' is not finite"):
        studio.merge({"w": torch.zeros(8, 6)}, experts, method)


def test_iso_cts_end_to_end_with_the_paper_default_alpha():
    base, experts = _pool_args()
    assert {p.name: p.default for p in get_method("iso_cts").params} == {"common_space_fraction": 0.8, "alpha": 1.5}
    merged = studio.merge(base, experts, "iso_cts", svd_mode="exact")
    _assert_end_to_end(merged, base, iso_cts_reference(task_vectors_of(base, experts)), 1.5)


def test_iso_cts_fraction_out_of_range_names_the_value():
    base, experts = _pool_args()
    with pytest.raises(HyperparameterError, match=r"common_space_fraction.*1\.2"):
        studio.merge(base, experts, "iso_cts", common_space_fraction=1.2)


# ---------------------------------------------------------------------------------------------------------- TSV-C
def test_compress_round_trip_matches_the_official_compress_tv():
    base, experts = _pool_args()
    packed = studio.compress(base, experts, svd_mode="exact")
    refs = tsv_c_reference(task_vectors_of(base, experts))
    for (name, expert), ref in zip(experts.items(), refs):
        rec = packed.reconstruct(name)
        assert list(rec) == list(base)
        for key, b in base.items():
            assert rec[key].dtype == b.dtype and rec[key].shape == b.shape
            assert _rel(rec[key].double() - b.double(), ref[key]) < RTOL, (name, key)
        # non-matrices are stored dense and come back exactly
        for key in ("visual.ln_pre.bias", "visual.conv1.weight"):
            torch.testing.assert_close(rec[key], expert[key])
    assert packed.tasks["task0"]["visual.proj"].rank == int(6 * (1 / 4))
    # compress_tv truncates every 2-D tensor: its text_projection exclusion is commented out (unlike TSV-M's merge)
    assert packed.tasks["task0"]["text_projection"].rank == int(6 * (1 / 4))
    assert not torch.equal(packed.reconstruct("task0")["text_projection"], experts["task0"]["text_projection"])
    dense_tp = studio.compress(base, experts, svd_mode="exact", layer_rule="default")
    torch.testing.assert_close(dense_tp.reconstruct("task0")["text_projection"], experts["task0"]["text_projection"])


def test_compress_with_every_component_is_lossless_and_storage_is_counted_as_in_the_paper():
    base, experts = _pool_args()
    full = studio.compress(base, experts, rank_fraction=1.0)
    for name, expert in experts.items():
        for key, value in full.reconstruct(name).items():
            torch.testing.assert_close(value, expert[key], atol=1e-5, rtol=1e-5)
    packed = studio.compress(base, experts)                         # k = r / T = r / 4
    info = packed.storage()
    stored = dense = 0
    for key, b in base.items():
        if b.dim() == 2:                                             # text_projection included (compress_tv)
            m, n = b.shape
            k = min(m, n) // 4
            stored += k * (m + n + 1)                                # TSV appx. B.3: d k' + k' + k' m
        else:
            stored += b.numel()
        dense += b.numel()
    assert info["per_task"]["task2"] == {"stored": stored, "dense": dense, "ratio": stored / dense}
    assert packed.storage_ratio() == pytest.approx(stored / dense)
    assert info["model_multiple"] == pytest.approx(1 + 4 * stored / dense)
    assert (info["stored_bytes"], info["dense_bytes"]) == (4 * 4 * stored, 4 * 4 * dense)   # float32, 4 tasks
    half = studio.compress({k: v.half() for k, v in base.items()},
                           {n: {k: v.half() for k, v in sd.items()} for n, sd in experts.items()}).storage()
    assert half["stored"] == info["stored"] and half["bytes_ratio"] == pytest.approx(2 * info["ratio"])
    assert half["dense_bytes"] == 2 * 4 * dense   # factors stored in float32 against the experts' 2 bytes


def test_compress_keeps_a_layer_dense_where_its_factors_would_take_as_many_numbers(tmp_path):
    """k (m + n + 1) >= m n: the same rank-k task matrix is kept dense, in fewer numbers; a 2 x 3 layer at k = 1 takes
    6 numbers either way and is kept dense (mutants: factors always; dense only above m n)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(2, 3, generator=g), "square": torch.randn(12, 12, generator=g),
            "tall": torch.randn(12, 6, generator=g), "bias": torch.randn(12, generator=g)}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for t in "ab"}
    packed = studio.compress(base, experts, rank_fraction=0.5)          # k = 1, 6 and 3
    refs = tsv_c_reference([{k: e[k].double() - base[k].double() for k in base} for e in experts.values()], 0.5)
    for name, ref in zip(experts, refs):
        kept = packed.tasks[name]
        assert isinstance(kept["w"], torch.Tensor) and isinstance(kept["square"], torch.Tensor)
        assert kept["tall"].rank == 3
        vector = packed.task_vector(name)
        for key in base:
            assert _rel(vector[key].double(), ref[key]) < RTOL, (name, key)
    assert packed.storage()["per_task"]["a"]["stored"] == 6 + 144 + 3 * (12 + 6 + 1) + 12
    again = Compressed.load(packed.save(tmp_path / "packed.safetensors"), base)
    assert again.storage() == packed.storage()
    assert all(torch.equal(again.reconstruct(n)[k], packed.reconstruct(n)[k]) for n in experts for k in base)
    single = studio.compress(base, {"a": experts["a"]})                # one expert: 1/T = 1, every matrix dense
    assert single.storage_ratio() == 1.0
    assert all(_rel(single.task_vector("a")[k].double(), experts["a"][k].double() - base[k].double()) < RTOL
               for k in base)


def test_compress_reconstructs_a_float64_base_without_rounding_it():
    base, experts = _pool_args()
    base64 = {k: 1000.0 + v.double() for k, v in base.items()}
    experts64 = {n: {k: base64[k] + (v.double() - base[k].double()) for k, v in sd.items()}
                 for n, sd in experts.items()}
    rec = studio.compress(base64, experts64).reconstruct("task0", alpha=0.0)
    assert all(rec[k].dtype == torch.float64 and torch.equal(rec[k], base64[k]) for k in base64)


def test_compress_shares_decompositions_with_tsv_m_and_validates_inputs():
    base, experts = _pool_args()
    pool = studio.get_pool(base, experts)
    studio.merge_pool(pool, "tsv_m")
    cached = set(pool._svd_cache)
    studio.compress(base, experts)                                   # same k = r / T: nothing new to decompose ...
    assert {key for key, _ in set(pool._svd_cache) - cached} == {"text_projection"}   # ... but what TSV-M skips
    bad = dict(experts, task1={k: v for k, v in experts["task1"].items() if k != "visual.proj"})
    with pytest.raises(studio.ExpertError, match=r"task1.*visual\.proj"):
        studio.compress(base, bad)
    with pytest.raises(HyperparameterError, match=r"'rank_fraction' = 0\.0 is outside the allowed range \(0, 1\]"):
        studio.compress(base, experts, rank_fraction=0.0)
    with pytest.raises(HyperparameterError, match=r"compress: 'rank_fraction' must be a number \(float in \(0, 1\]\), "
                                                  r"got 'x'"):
        studio.compress(base, experts, rank_fraction="x")
    # as merge checks TSV-M's: a bool tensor is not 1.0 (it was taken as 1.0), a meta tensor has no value
    for value in (torch.tensor(True), torch.tensor(0.5, device="meta")):
        with pytest.raises(HyperparameterError, match=r"compress: 'rank_fraction' must be a number"):
            studio.compress(base, experts, rank_fraction=value)
    with pytest.raises(HyperparameterError, match=r"reconstruct: alpha must be a finite number, got tensor\(\.\.\., "
                                                  r"device='meta'"):
        studio.compress(base, experts).reconstruct("task0", torch.tensor(1.0, device="meta"))
    tiny = studio.compress(base, experts, rank_fraction=0.1)       # int(5 * 0.1) = 0 on the positional embedding
    assert tiny.tasks["task0"]["visual.positional_embedding"].rank == 0
    assert not tiny.task_vector("task0")["visual.positional_embedding"].any()
    with pytest.raises(studio.StudioError, match="unknown task 'nope'"):
        studio.compress(base, experts).reconstruct("nope")


@pytest.mark.parametrize("scale", [1e-25, 1e-20])
def test_auto_svds_agree_with_lapack_on_tiny_task_vectors(scale):
    """The float32 Gram of a task vector with 1e-25 entries underflowed (entries ~1e-50): svd_mode="auto" returned
    the base for every spectral method while LAPACK ("exact") scales internally; such Grams are redone in float64."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(64, 32), "b": torch.zeros(32)}
    experts = {t: {"w": scale * torch.randn(64, 32, generator=g), "b": scale * torch.randn(32, generator=g)}
               for t in "abcd"}
    for method in ("tsv_m", "iso_c", "iso_cts", "ortho_merge", "align_merge_o", "align_merge_b"):
        auto = studio.merge(base, experts, method)["w"].double()
        exact = studio.merge(base, experts, method, svd_mode="exact")["w"].double()
        assert float(exact.norm()) > 0 and float((auto - exact).norm() / exact.norm()) < 1e-4, method


def test_svd_upcasts_half_precision_inputs():
    a = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    for dtype in (torch.float16, torch.bfloat16):
        x = a.to(dtype)
        for U, S, Vh in (linalg.svd(x), linalg.svd_tall(x), linalg.truncated_svd(x, 1, exact=True)):
            assert U.dtype == S.dtype == Vh.dtype == torch.float32, dtype
            assert S[0] == 3.0


def test_polar_gram_drops_directions_below_the_size_dependent_null_tolerance():
    """null_tolerance is sigma_max * max(eps32, sqrt(size * eps64)): beyond 64 columns the float64 Gram's resolution
    decides (3e-7 of the largest at 400 columns). A direction at 2e-7 is below it and maps to zero; whitened from an
    eigenvalue without correct digits it would make P^T P stray ~1e-2 from a projector."""
    eps64 = torch.finfo(torch.float64).eps
    assert float(linalg.null_tolerance(torch.tensor(1.0), 400)) == pytest.approx((400 * eps64) ** 0.5, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    n = 400
    U = torch.linalg.qr(torch.randn(600, n, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    s = torch.ones(n, dtype=torch.float64)
    s[-1] = 2e-7
    a = ((U * s) @ V.mT).float()
    (p, rank), = linalg.polar_gram_ranks([a])
    assert rank == n - 1
    ev = torch.linalg.eigvalsh(p.double().mT @ p.double())
    assert float(torch.minimum(ev.abs(), (ev - 1).abs()).max()) < 1e-6     # a partial isometry


def test_polar_gram_rtol_is_relative_to_the_largest_singular_value():
    """rtol cuts at rtol * sigma_max, so the partial polar factor does not depend on the matrix's scale."""
    a = torch.randn(40, 12, generator=torch.Generator().manual_seed(7))
    a[:, -1] = a[:, 0]                                                # one exactly dependent direction
    ref = linalg.polar_gram(a, rtol=1e-6)
    for c in (1.0, 1e-9, 1e4):
        assert linalg.polar_gram_ranks([c * a], rtol=1e-6)[0][1] == 11, c
        torch.testing.assert_close(linalg.polar_gram(c * a, rtol=1e-6), ref, atol=1e-6, rtol=0, msg=str(c))


def test_gram_svd_null_cut_does_not_depend_on_the_rank_asked():
    """A component is null by the matrix's size (null_tolerance over min(m, n)), not by how many were asked for:
    the 2e-7 direction of a 500 x 400 matrix (tolerance 3e-7) is an exact zero in gram_svd(a, k) for every k."""
    g = torch.Generator().manual_seed(2)
    U = torch.linalg.qr(torch.randn(500, 8, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(400, 8, generator=g, dtype=torch.float64)).Q
    s = torch.tensor([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 2e-7], dtype=torch.float64)
    a = ((U * s) @ V.mT).float()
    u_all, s_all, vh_all = linalg.gram_svd(a)
    assert s_all[6] > 0 and s_all[7] == 0
    for k in (8, 9, 100):
        u, sv, vh = linalg.gram_svd(a, k)
        assert torch.equal(sv == 0, s_all[:k] == 0), k
        assert not u[:, 7:].any() and not vh[7:].any(), k


def test_gram_svd_is_scale_equivariant_down_to_tiny_matrices():
    """The float32 Gram holds entries ~S^2 only well inside float32's normal range; a matrix whose largest singular
    value is near 1e-20 (Gram entries near the denormals) must go to float64 like one of 1e-25."""
    a = torch.randn(256, 64, generator=torch.Generator().manual_seed(1))
    ref = torch.linalg.svdvals(a.double())[:8]
    for c in (1.0, 1e-13, 1e-17, 1e-19, 1e-21, 1e-25):
        u, s, vh = linalg.gram_svd(a * c, 8)
        assert float(((s.double() / c - ref).abs() / ref).max()) < 2e-6, c
        assert float((u.double().mT @ u.double() - torch.eye(8, dtype=torch.float64)).abs().max()) < 2e-6, c


def test_svd_tall_keeps_float64_inputs_in_float64():
    g = torch.Generator().manual_seed(8)
    U0 = torch.linalg.qr(torch.randn(300, 80, generator=g, dtype=torch.float64)).Q
    V0 = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64)).Q
    a = (U0 * torch.logspace(0, -2, 80, dtype=torch.float64)) @ V0.mT
    for exact in (True, False):
        for x in (a, a.mT):
            U, S, Vh = linalg.svd_tall(x, exact=exact)
            assert U.dtype == S.dtype == Vh.dtype == torch.float64, exact
            assert _rel((U * S) @ Vh, x) < 1e-12, exact
            assert float((U.mT @ U - torch.eye(80, dtype=torch.float64)).abs().max()) < 1e-12, exact


def test_truncated_svd_deflated_stays_orthogonal_to_the_basis_when_the_task_lies_mostly_in_it():
    """Eq. 10: the residual's vectors are orthogonal to the common subspace. Where the task is mostly inside it (the
    residual ~1e-4 of the task), U = R v / sigma carries R's rounding relative to its small norm (~1e-3 off)."""
    g = torch.Generator().manual_seed(6)
    basis = torch.linalg.qr(torch.randn(60, 20, generator=g)).Q
    task = 10 * basis @ torch.randn(20, 40, generator=g) + 1e-3 * torch.randn(60, 40, generator=g)
    both = [linalg.truncated_svd_deflated(task, basis, 3), *linalg.truncated_svd_deflated_many([task], basis, 3)]
    for u, _, _ in both:
        assert float((basis.double().mT @ u.double()).abs().max()) < 1e-5


def test_truncated_svd_deflated_exact_takes_lapack_even_with_a_complement(monkeypatch):
    """exact=True is the official code's route (the formed residual, LAPACK), whether or not a complement is given."""
    tasks = _random_tasks(1, 20, 30, seed=6)
    u_all = torch.linalg.svd(tasks[0], full_matrices=False).U
    calls = []

    def gram_svd(*args, **kwargs):
        calls.append(args)
        raise AssertionError("exact=True took the Gram route")

    monkeypatch.setattr(linalg, "gram_svd", gram_svd)
    U, S, Vh = linalg.truncated_svd_deflated(tasks[0], u_all[:, :14], 3, complement=u_all[:, 14:], exact=True)
    assert not calls and S.shape == (3,)


def test_polar_factors_of_a_matrix_without_columns_are_empty():
    """Every polar route gives an empty factor of the same shape for a matrix with no columns (or rows), as
    linalg.polar does (the Gram routes took the largest of no singular values and raised)."""
    for a in (torch.zeros(5, 0), torch.zeros(0, 5)):
        assert linalg.polar(a).shape == linalg.polar_gram(a).shape == a.shape
        assert [(p.shape, rank) for p, rank in linalg.polar_gram_ranks([a, a])] == [(a.shape, 0)] * 2
    P, Pr, W = linalg.polar_gram_range(torch.zeros(5, 0))
    assert P.shape == Pr.shape == (5, 0) and W.shape == (0, 0)


def test_iso_cts_of_experts_that_cancel_in_the_sum_projects_out_only_the_sums_live_directions():
    """A wide layer (m < n: the sum's U is square, the complement route of eq. 10) whose experts cancel in part:
    X1 + Y1, X2 + Y2, -(X1 + X2) + Y3 sum to rank 9 of 32 while k = 17 common directions are asked for. Eq. 10
    projects only the 9 live common directions out of each task (not the sum's arbitrary null vectors), so the X
    parts are task-specific directions, and sigma_bar (eq. 13) is the mean of the sum's top k singular values and
    each task's top s residual ones, computed here in float64. The tasks keep more directions (9 + 4 + 9) than the
    sum's rank leaves outside the common block, so the X parts' exact dependence is left out at the directions' own
    error: where it fell against the null tolerance was rounding, and the merges depended on the stored base and the
    mode (0.33-0.69 apart under OpenBLAS's SkylakeX kernel: docs/ACCURACY.md)."""
    g = torch.Generator().manual_seed(7)
    m, n, T = 32, 48, 3
    key = "visual.transformer.resblocks.0.mlp.c_proj.weight"

    def lr(r):
        return 1e-3 * torch.randn(m, r, generator=g) @ torch.randn(r, n, generator=g)

    X1, X2, Y1, Y2, Y3 = lr(2), lr(2), lr(3), lr(3), lr(3)
    deltas = [X1 + Y1, X2 + Y2, -(X1 + X2) + Y3]
    experts = {f"t{i}": {key: d} for i, d in enumerate(deltas)}
    merged = studio.merge({key: torch.zeros(m, n)}, experts, "iso_cts", common_space_fraction=0.5, alpha=1.0)
    sv = torch.linalg.svdvals(merged[key].double())
    k, s = iso_cts_dims(m, T, 0.5)
    U, S, _ = torch.linalg.svd(sum(d.double() for d in deltas))
    live = U[:, :9]
    assert float(S[8]) > 1e3 * float(S[9])                          # the sum has rank 9
    residual = [torch.linalg.svdvals(d.double() - live @ (live.T @ d.double()))[:s] for d in deltas]
    sigma_bar = (S[:k].sum() + sum(r.sum() for r in residual)) / m
    assert float(abs(sv[0] - sigma_bar) / sigma_bar) < 1e-4
    assert int((sv > 1e-4 * sv[0]).sum()) == 13          # 9 common + the X parts' 4 task-specific directions
    W = 0.02 * torch.randn(m, n, generator=g)
    for mode in ("auto", "exact"):
        stored = studio.merge({key: W}, {t: {key: W + d[key]} for t, d in experts.items()}, "iso_cts",
                              common_space_fraction=0.5, alpha=1.0, svd_mode=mode)[key].double() - W.double()
        assert _rel(stored, merged[key].double()) < 1e-5, mode

def test_tsv_ranks_refusal_shows_the_fraction_that_gives_its_k():
    """0.999999999 showed as 1 beside "keeps k = 31" on a rank-32 layer, where 1 would keep 32."""
    from studio.methods.tsv_m import tsv_rank

    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0\.999999999 keeps k = 31 components"):
        tsv_rank(32, 3, 0.999999999)
    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0\.5 keeps k = 16 components"):
        tsv_rank(32, 3, 0.5)
    # and where it keeps no component anywhere: 0.49999999999999994 showed as 0.5, which keeps one of rank 2, beside
    # "expected rank_fraction >= 0.5" (an edge audit)
    from studio.methods.tsv_m import refuse_keeping_nothing

    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0\.49999999999999994 keeps k = int\(r \* "
                                                  r"0\.49999999999999994\) = 0 .* expected rank_fraction >= 0\.5$"):
        refuse_keeping_nothing("tsv_m", [2], 0.49999999999999994, True, "they would merge to zero")
    with pytest.raises(HyperparameterError, match=r"rank_fraction = 0\.001 keeps k = int\(r \* 0\.001\) = 0"):
        refuse_keeping_nothing("tsv_m", [128], 0.001, True, "they would merge to zero")


@pytest.mark.parametrize("low_rank", [True, False, "orthogonal", "subnormal"])
def test_the_cuda_branches_taken_on_cpu_tensors_give_the_cpu_paths_bits(low_rank, monkeypatch):
    """The branches a merge takes only on CUDA -- Iso-CTS's residuals of every task at once
    (``truncated_svd_deflated_many``) and ``LayerTasks.svds``' batch of the per-task decompositions (TSV-M,
    AlignMerge-O, Ortho-Merge) -- run in CI here on CPU tensors (``LayerTasks.device`` reads "cuda"; off CUDA
    ``gram_svd_many`` solves one matrix at a time, bit for bit). Their rounding cuts (``rounding_cut``, with and
    without the task matrix it is handed) must give the CPU path's merge: low-rank experts on a random base, whose
    components past their rank sit at the cut, and full-rank ones, preference-weighted. And rank-2 tasks on
    orthogonal subspaces on a zero base, where AlignMerge-O's sign gauge falls back to the factors' canonical signs
    (the batch without them merged 0.097 away; a test audit). And rank-2 tasks in float32's subnormal range, whose
    residuals Iso-CTS decomposes scaled by a power of two (``_residual_shift``), on either branch."""
    from studio.methods.align_merge import align_merge_o
    from studio.methods.ortho_merge import ortho_merge
    from studio.pool import LayerTasks

    g = torch.Generator().manual_seed(3)
    key, m, n, T = "w", 96, 64, 4
    W = 0.02 * torch.randn(m, n, generator=g)
    if low_rank == "orthogonal":
        Q1, Q2 = (torch.linalg.qr(torch.randn(d, d, generator=g)).Q for d in (m, n))
        deltas = [Q1[:, 2 * i:2 * i + 2] @ torch.diag(torch.tensor([3.0 - 0.3 * i, 1.0 + 0.1 * i]))
                  @ Q2[:, 2 * i:2 * i + 2].T for i in range(T)]
        W = torch.zeros(m, n)
    elif low_rank == "subnormal":
        deltas = [(torch.randn(m, 2, generator=g) @ torch.randn(2, n, generator=g)) * 2.0 ** -130 for _ in range(T)]
        W = torch.zeros(m, n)
    elif low_rank:
        deltas = [1e-5 * torch.randn(m, 3, generator=g) @ torch.randn(3, n, generator=g) for _ in range(T)]
    else:
        deltas = [1e-3 * torch.randn(m, n, generator=g) for _ in range(T)]
    experts = {f"t{i}": {key: W + d} for i, d in enumerate(deltas)}
    fns = {"tsv_m": lambda L: tsv_m(L), "iso_cts": lambda L: iso_cts(L, 0.5),
           "ortho_merge": lambda L: ortho_merge(L, 0.3, 5), "align_merge_o": lambda L: align_merge_o(L, "sum", True)}
    weights = torch.tensor([0.1, 0.4, 0.2, 0.3])

    def merges() -> dict[str, torch.Tensor]:
        pool = TaskPool({key: W}, experts, device="cpu")
        return {f"{name} {label}": fn(pool.layer(key, w)) for name, fn in fns.items()
                for label, w in (("uniform", None), ("weighted", weights))}

    on_cpu = merges()
    monkeypatch.setattr(LayerTasks, "device", property(lambda self: torch.device("cuda")))
    on_the_batch_path = merges()
    for name, merged in on_cpu.items():
        assert torch.equal(on_the_batch_path[name], merged), name
