"""Spectral diagnostics: closed forms from the papers, slow references written from the definitions, app contract."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import studio
from studio import diagnostics as D
from studio.methods.tsv_m import tsv_rank
from studio.pool import TaskPool
from studio.schema import StudioError

from .conftest import clip_like_state_dict, make_experts


def _pool(mats: list[torch.Tensor], svd_mode: str = "exact") -> TaskPool:
    base = {"w": torch.zeros_like(mats[0])}
    return TaskPool(base, {f"t{i}": {"w": m} for i, m in enumerate(mats)}, svd_mode=svd_mode)


def _lowrank(T: int, m: int, n: int, rank: int, seed: int, noise: float = 0.01, shared: float = 0.5):
    """Tasks = a shared low-rank part + a task-specific low-rank part + small noise (overlapping subspaces)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
    out = []
    for _ in range(T):
        own = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g)
        out.append(shared * common + own + noise * torch.randn(m, n, generator=g))
    return out


def _block_tasks(T: int, block: int, seed: int) -> list[torch.Tensor]:
    """Task i lives in rows and columns of block i only: disjoint row and column supports."""
    g = torch.Generator().manual_seed(seed)
    mats = []
    for i in range(T):
        M = torch.zeros(T * block, T * block)
        M[i * block:(i + 1) * block, i * block:(i + 1) * block] = torch.randn(block, block, generator=g)
        mats.append(M)
    return mats


def _top_u(M: torch.Tensor, k: int) -> torch.Tensor:
    return torch.linalg.svd(M.double(), full_matrices=False)[0][:, :k]


# ------------------------------------------------------------------------------------------------ closed forms


def test_identical_tasks_have_similarity_and_cosine_one():
    A = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    layer = _pool([A, A.clone(), A.clone()]).layer("w")
    for reduce in ("mean", "frobenius"):
        torch.testing.assert_close(D.subspace_similarity(layer, k=3, reduce=reduce), torch.ones(3, 3), atol=1e-5,
                                   rtol=0)
    torch.testing.assert_close(D.task_cosine(layer), torch.ones(3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(D.pairwise_sar(layer, k=9), torch.ones(3, 3), atol=1e-5, rtol=0)


def test_orthogonal_tasks_have_zero_similarity_cosine_and_sti():
    mats = _block_tasks(T=3, block=4, seed=1)
    layer = _pool(mats).layer("w")
    off = ~torch.eye(3, dtype=torch.bool)
    assert D.subspace_similarity(layer, k=2)[off].abs().max() < 1e-5
    assert D.task_cosine(layer)[off].abs().max() < 1e-6
    assert D.pairwise_sar(layer, k=4)[off].abs().max() < 1e-5
    # TSV sec. 3.3 / App. A: orthogonal singular vectors across tasks give U^T U = V^T V = I, hence STI = 0
    for rank in (None, 1, 4):
        assert D.sti(layer, rank=rank) < 1e-4
    assert D.sti_pairwise(layer, rank=4).abs().max() < 1e-4
    # eq. (2) of Ortho-Merge: no cross term, the TA sum keeps exactly the tasks' energy
    assert D.energy_preservation(layer) == pytest.approx(1.0, abs=1e-6)
    # SVC: each merged subspace belongs to one task (s = 1), the others have no response (s = 0); nothing to fix
    s, gamma = D.svc_coefficients(layer)
    assert torch.allclose(s.sum(0), torch.ones(s.shape[1]), atol=1e-4)
    assert torch.allclose(gamma, torch.ones_like(gamma), atol=1e-4)


def test_collinear_rank_one_tasks_sti_closed_form():
    """TSV App. A case 2: u_1 = u_2, v_1 = v_2 -> off-diagonal Gram entries 1 -> STI = sigma_1 + sigma_2."""
    g = torch.Generator().manual_seed(3)
    u, v = torch.randn(7, 1, generator=g), torch.randn(1, 5, generator=g)
    u, v = u / u.norm(), v / v.norm()
    layer = _pool([2.0 * u @ v, -3.0 * u @ v]).layer("w")
    assert D.sti(layer, rank=1) == pytest.approx(5.0, rel=1e-5)
    assert D.sti_pairwise(layer, rank=1)[0, 1] == pytest.approx(5.0, rel=1e-5)


def test_cumulative_energy_is_monotone_and_ends_at_one():
    s = torch.rand(3, 7, generator=torch.Generator().manual_seed(4)).sort(-1, descending=True).values
    ce = D.cumulative_energy(s)
    assert ce.shape == (3, 7)
    torch.testing.assert_close(ce[:, -1], torch.ones(3))
    assert bool((ce.diff(dim=-1) >= 0).all()) and bool((ce > 0).all())
    assert D.cumulative_energy(torch.zeros(4)).tolist() == [0.0] * 4
    # never above 1: float32 running sums of long spectra end at 1.0000001 of their total on some rows
    long = torch.rand(200, 768, generator=torch.Generator().manual_seed(5)).sort(-1, descending=True).values
    assert float(D.cumulative_energy(long).max()) <= 1.0


def test_spectral_entropy_flat_is_maximal_and_rank_one_is_zero():
    r = 6
    assert float(D.spectral_entropy(torch.full((r,), 2.5))) == pytest.approx(math.log(r), rel=1e-6)
    assert float(D.spectral_entropy(torch.full((r,), 2.5), normalized=True)) == pytest.approx(1.0, rel=1e-6)
    assert float(D.spectral_entropy(torch.tensor([4.0, 0, 0, 0, 0, 0]))) == 0.0
    assert float(D.spectral_entropy(torch.zeros(r))) == 0.0
    # p = (1/2, 1/2, 0): log 2; a random spectrum is strictly below the flat one
    assert float(D.spectral_entropy(torch.tensor([1.0, 1.0, 0.0]))) == pytest.approx(math.log(2), rel=1e-6)
    s = torch.rand(r, generator=torch.Generator().manual_seed(5)) + 0.1
    p = s.double() ** 2 / (s.double() ** 2).sum()
    assert float(D.spectral_entropy(s)) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-5)
    assert float(D.spectral_entropy(s)) < math.log(r)


def test_effective_rank_matches_the_projection_definition():
    """Iso eq. (6): k_M = min{k : ||Delta - Pi_k Delta||_F <= eps ||Delta||_F}, by brute force over k."""
    g = torch.Generator().manual_seed(6)
    M = (torch.randn(20, 15, generator=g) * torch.logspace(0, -2, 15)).double()
    U = torch.linalg.svd(M, full_matrices=False)[0]
    for eps in (0.05, 0.2, 0.5):
        brute = next(k for k in range(1, 16)
                     if (M - U[:, :k] @ U[:, :k].T @ M).norm() <= eps * M.norm())
        assert D.effective_rank(D.spectrum(M), eps, rule="paper") == brute
    assert D.effective_rank(torch.zeros(5)) == 0 and D.effective_rank(torch.zeros(5), rule="paper") == 0
    with pytest.raises(D.DiagnosticsError, match="rule must be one of"):
        D.effective_rank(torch.ones(3), rule="energy")


def test_effective_rank_default_is_the_official_calc_rank():
    """The official SAR scripts (Iso figures, TSV repo): rank = np.argmax(np.sqrt(np.cumsum(S**2 / sum S**2)) > 0.95),
    then U[:, :rank]. Written here literally and compared on decaying, flat and dominated spectra."""
    import numpy as np

    def calc_rank(S, norm_thresh=0.95):
        S = np.asarray(S, dtype=np.float64)
        return int(np.argmax(np.sqrt(np.cumsum(S ** 2 / (S ** 2).sum())) > norm_thresh))

    g = torch.Generator().manual_seed(7)
    spectra = [torch.logspace(0, -3, 50), torch.ones(16), torch.tensor([10.0, 1.0, 0.1]),
               torch.rand(40, generator=g).sort(descending=True).values, torch.linspace(5, 0.1, 100)]
    for S in spectra:
        assert D.effective_rank(S) == calc_rank(S.numpy())
    assert D.effective_rank(torch.linspace(5, 0.1, 100)) < D.effective_rank(torch.linspace(5, 0.1, 100), rule="paper")


def test_subspace_similarity_is_the_mean_cosine_of_principal_angles():
    """Ortho-Merge Fig. 1: avg of the singular values of U_A^T U_B; hand-made 2-D subspaces with angles t1, t2."""
    t1, t2 = 0.3, 1.1
    e = torch.eye(6)
    UA = e[:, :2]
    UB = torch.stack([math.cos(t1) * e[:, 0] + math.sin(t1) * e[:, 2],
                      math.cos(t2) * e[:, 1] + math.sin(t2) * e[:, 3]], 1)
    V = e[:2, :4]
    layer = _pool([UA @ torch.diag(torch.tensor([3.0, 2.0])) @ V, UB @ torch.diag(torch.tensor([5.0, 1.0])) @ V]
                  ).layer("w")
    sim = D.subspace_similarity(layer, k=2)
    assert float(sim[0, 1]) == pytest.approx((math.cos(t1) + math.cos(t2)) / 2, rel=1e-5)
    fro = D.subspace_similarity(layer, k=2, reduce="frobenius")
    assert float(fro[0, 1]) == pytest.approx((math.cos(t1) ** 2 + math.cos(t2) ** 2) / 2, rel=1e-5)
    assert torch.allclose(sim, sim.T)
    # side="right": the same angles between the right singular subspaces, the left ones shared (mutant: U on both
    # sides, which read 1 here)
    transposed = _pool([(UA @ torch.diag(torch.tensor([3.0, 2.0])) @ V).T,
                        (UB @ torch.diag(torch.tensor([5.0, 1.0])) @ V).T]).layer("w")
    right = D.subspace_similarity(transposed, k=2, side="right")
    assert float(right[0, 1]) == pytest.approx((math.cos(t1) + math.cos(t2)) / 2, rel=1e-5)
    assert float(D.subspace_similarity(transposed, k=2, side="left")[0, 1]) == pytest.approx(1.0, rel=1e-5)


def test_subspace_similarity_counts_only_the_directions_a_rank_deficient_task_has():
    """k above a task's rank: its null-space vectors (arbitrary from LAPACK, zero from the Gram route) are left out,
    so both svd modes give the principal angles of the subspaces the tasks span."""
    g = torch.Generator().manual_seed(3)
    low = [torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g) for _ in range(3)]
    zero = torch.zeros(40, 30)
    sub = _top_u(low[0], 2) @ torch.randn(2, 30, generator=g, dtype=torch.float64)   # rank 2, inside task 0's span
    mats = low + [sub.float(), zero]
    exact, auto = (D.subspace_similarity(_pool(mats, mode).layer("w"), k=5) for mode in ("exact", "auto"))
    torch.testing.assert_close(exact, auto, rtol=0, atol=1e-5)
    assert exact.diagonal()[:4].tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert exact[4].abs().max() == 0 and exact[:, 4].abs().max() == 0   # the zero task
    assert float(exact[0, 3]) == pytest.approx(1.0, abs=1e-5)           # a 2-D subspace of task 0's 3-D one
    cos = torch.linalg.svdvals(_top_u(low[1], 3).T @ _top_u(low[2], 3))   # 3 principal angles, not k = 5
    assert float(exact[1, 2]) == pytest.approx(float(cos.mean()), abs=1e-5)
    fro = D.subspace_similarity(_pool(mats, "auto").layer("w"), k=5, reduce="frobenius")
    assert float(fro[1, 2]) == pytest.approx(float(cos.pow(2).mean()), abs=1e-5)


def test_pairwise_sar_projects_on_the_directions_a_rank_deficient_task_has():
    """Iso eq. 5 with k above the tasks' rank 2: the projection is onto each task's 2-D column space in both modes
    (an exact SVD's three arbitrary null-space vectors would catch other tasks' energy)."""
    g = torch.Generator().manual_seed(1)
    mats = [torch.randn(40, 2, generator=g) @ torch.randn(2, 30, generator=g) for _ in range(4)]
    want = torch.tensor([[float((_top_u(mats[j], 2).T @ mats[i].double()).norm() / mats[i].double().norm())
                          for j in range(4)] for i in range(4)])
    for mode in ("exact", "auto"):
        torch.testing.assert_close(D.pairwise_sar(_pool(mats, mode).layer("w"), k=5), want, rtol=0, atol=1e-5)
    assert want.diagonal().tolist() == pytest.approx([1.0] * 4) and float(want.max()) < 1.0 + 1e-6


def test_model_level_diagnostics_leave_out_layers_no_expert_changed(clip):
    """A frozen layer (or a text tower beside visual experts) has no task matrices: counted, it read as SAR 0."""
    base, experts, pool = clip
    frozen = "visual.transformer.resblocks.0.attn.out_proj.weight"
    touched = {n: {**sd, frozen: base[frozen].clone()} for n, sd in experts.items()}
    p = TaskPool(base, touched)
    keys = D.layer_curves(p, curves=["sar_mean"])["key"]
    assert frozen not in keys and frozen in D.layer_curves(pool, curves=["sar_mean"])["key"]
    torch.testing.assert_close(D.sar_avg(p), D.sar_avg(p, keys=keys))
    # asked for, it is there: with no task changed, its SAR is 0/0
    assert math.isnan(D.layer_curves(p, curves=["sar_mean"], keys=[frozen])["sar_mean"][0])


def test_model_level_averages_take_the_layers_each_expert_changed(clip):
    """An expert that left some layers as the base (blocks frozen in its fine-tuning) has no direction there: its
    SAR, similarities and cosine on them are 0/0, and averaged in as 0 they read as misalignment (half its blocks
    frozen, half its SAR_avg). Each task's mean (a pair's) now takes the layers its expert (both experts) changed,
    as the plain loops below over the per-layer metrics do; an expert equal to the base everywhere is NaN, and the
    per-layer curves' task means and minima leave it out."""
    base, experts, _ = clip
    names = list(experts)
    keys = [k for k, t in base.items() if t.dim() == 2 and "resblocks" in k]
    frozen = set(keys[: len(keys) // 2])
    touched = {n: dict(sd) for n, sd in experts.items()}
    touched[names[0]].update({k: base[k].clone() for k in frozen})   # half its blocks frozen
    same = {**{k: v.clone() for k, v in base.items()}}               # a fourth expert that changed nothing
    p = TaskPool(base, {**touched, "same": same})
    keys = D.layer_curves(p, curves=["sar_mean"])["key"]
    assert set(frozen) < set(keys)   # the other experts changed them

    def changed(name: str, key: str) -> bool:
        return name != "same" and not (name == names[0] and key in frozen)

    tasks = [*names, "same"]
    sar = D.sar_avg(p)
    for t, task in enumerate(tasks):
        per = [float(D.sar_to_merged(p.layer(k))[t]) for k in keys if changed(task, k)]
        assert (math.isnan(sar[t]) if not per else sar[t].item() == pytest.approx(sum(per) / len(per), rel=1e-6))
    assert math.isnan(sar[-1]) and not math.isnan(sar[0])
    for metric, pairwise in (("sar", D.pairwise_sar), ("subspace_similarity", D.subspace_similarity)):
        got = D.model_matrix(p, metric)
        for i, a in enumerate(tasks):
            for j, b in enumerate(tasks):
                per = [float(pairwise(p.layer(k))[i, j]) for k in keys if changed(a, k) and changed(b, k)]
                want = sum(per) / len(per) if per else float("nan")
                assert got[i, j].item() == pytest.approx(want, rel=1e-5, nan_ok=True), (metric, a, b)
    cosine = D.model_matrix(p, "cosine")
    assert cosine[-1].isnan().all() and cosine[:, -1].isnan().all() and not cosine[:-1, :-1].isnan().any()
    curves = D.layer_curves(p, curves=["sar_min", "sar_mean", "cosine_mean"], keys=sorted(frozen)[:2])
    for n, k in enumerate(sorted(frozen)[:2]):
        live = [float(v) for t, v in enumerate(D.sar_to_merged(p.layer(k))) if changed(tasks[t], k)]
        assert curves["sar_min"][n] == pytest.approx(min(live)) and curves["sar_mean"][n] == pytest.approx(
            sum(live) / len(live))
        cos = D.task_cosine(p.layer(k))
        pairs = [float(cos[i, j]) for i in range(4) for j in range(4)
                 if i != j and changed(tasks[i], k) and changed(tasks[j], k)]
        assert curves["cosine_mean"][n] == pytest.approx(sum(pairs) / len(pairs), rel=1e-6)


def test_energy_preservation_is_eq2_of_ortho_merge():
    mats = _lowrank(3, 10, 8, 2, seed=7)
    layer = _pool(mats).layer("w")
    norms = sum(float((m.double() ** 2).sum()) for m in mats)
    cross = sum(float((mats[i].double() * mats[j].double()).sum()) for i in range(3) for j in range(i + 1, 3))
    assert D.energy_preservation(layer) == pytest.approx(1 + 2 * cross / norms, rel=1e-5)
    assert D.energy_preservation(layer, layer.sum() / 3) == pytest.approx((1 + 2 * cross / norms) / 9, rel=1e-5)
    assert D.energy_preservation(layer.deltas, layer.sum()) == pytest.approx(D.energy_preservation(layer))


# ---------------------------------------------------------------------------------------- slow references: SAR


def test_sar_matches_iso_eq5_with_explicit_projections():
    mats = _lowrank(3, 14, 10, 2, seed=8)
    layer = _pool(mats).layer("w")
    TA = sum(m.double() for m in mats)
    k_ta = D.effective_rank(torch.linalg.svdvals(TA), 0.05)   # float64 singular values, not the Gram route
    # pairwise, Fig. 3b: k_TA directions of task j
    expected = torch.tensor([[float((_top_u(mats[j], k_ta) @ _top_u(mats[j], k_ta).T @ mats[i].double()).norm()
                                    / mats[i].double().norm()) for j in range(3)] for i in range(3)],
                            dtype=torch.float64)
    torch.testing.assert_close(D.pairwise_sar(layer).double(), expected, atol=1e-5, rtol=0)
    # k_rule="paper": eq. 6's k_TA, by brute force over k (min k with ||TA - Pi_k TA|| <= 0.05 ||TA||), here above
    # the official code's
    U_ta = _top_u(TA, 10)
    k_paper = next(k for k in range(1, 11) if (TA - U_ta[:, :k] @ U_ta[:, :k].T @ TA).norm() <= 0.05 * TA.norm())
    assert k_paper != k_ta
    paper = torch.tensor([[float((_top_u(mats[j], k_paper) @ _top_u(mats[j], k_paper).T @ mats[i].double()).norm()
                                 / mats[i].double().norm()) for j in range(3)] for i in range(3)], dtype=torch.float64)
    torch.testing.assert_close(D.pairwise_sar(layer, k_rule="paper").double(), paper, atol=1e-5, rtol=0)
    # to the merged delta, eq. (5) with k_M of eq. (6)
    merged = (0.4 * TA + 0.05 * torch.randn(14, 10, generator=torch.Generator().manual_seed(9))).float()
    kM = D.effective_rank(torch.linalg.svdvals(merged.double()), 0.05)
    P = _top_u(merged, kM) @ _top_u(merged, kM).T
    want = torch.tensor([float((P @ m.double()).norm() / m.double().norm()) for m in mats], dtype=torch.float64)
    torch.testing.assert_close(D.sar_to_merged(layer, merged).double(), want, atol=1e-5, rtol=0)
    Um = _top_u(merged, 10)
    M64 = merged.double()
    kM_paper = next(k for k in range(1, 11) if (M64 - Um[:, :k] @ Um[:, :k].T @ M64).norm() <= 0.05 * M64.norm())
    assert kM_paper != kM
    P = Um[:, :kM_paper] @ Um[:, :kM_paper].T
    want = torch.tensor([float((P @ m.double()).norm() / m.double().norm()) for m in mats], dtype=torch.float64)
    torch.testing.assert_close(D.sar_to_merged(layer, merged, k_rule="paper").double(), want, atol=1e-5, rtol=0)
    # SAR is invariant to the merged scale (alpha)
    torch.testing.assert_close(D.sar_to_merged(layer, 3 * merged), D.sar_to_merged(layer, merged), atol=1e-5, rtol=0)


@pytest.mark.parametrize("svd_mode", ["exact", "auto"])
def test_sar_to_a_flat_merge_takes_the_sums_leading_directions(svd_mode):
    """Iso-C's merged delta has one (numerically) degenerate singular value, so its SVD's "top k_M" directions are
    whatever LAPACK returns. The Iso authors' SAR code takes them in the order of the summed task matrices
    (``U_iso_k = U[:, :k]`` of the sum's SVD, with the flat ``S_iso``); the diagnostics must give that, not a
    near-random k_M-dimensional subspace (0.067 lower for one task here before this was fixed)."""
    mats = _lowrank(4, 40, 30, 3, seed=21, noise=0.2)
    layer = _pool(mats, svd_mode).layer("w")
    TA = sum(m.double() for m in mats)
    U, S, Vh = torch.linalg.svd(TA, full_matrices=False)
    iso = (S.mean() * U @ Vh).float()        # Iso-C (eq. 8), rounded to float32 as a merge is
    k = D.effective_rank(torch.ones(30), 0.05)                                   # 27 of 30 (flat spectrum)
    P = U[:, :k] @ U[:, :k].T
    want = torch.tensor([float((P @ m.double()).norm() / m.double().norm()) for m in mats], dtype=torch.float64)
    torch.testing.assert_close(D.sar_to_merged(layer, iso).double(), want, atol=1e-5, rtol=0)
    # and the same from any other SVD basis of the same flat matrix: the leading columns follow the sum
    Q = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).Q
    rotated = (S.mean() * (U @ Q) @ (Vh.mT @ Q).mT).float()
    torch.testing.assert_close(D.sar_to_merged(layer, rotated).double(), want, atol=1e-5, rtol=0)
    s_iso, _ = D.svc_coefficients(layer, iso, rank=5)
    s_rot, _ = D.svc_coefficients(layer, rotated, rank=5)
    torch.testing.assert_close(s_rot, s_iso, atol=1e-3, rtol=1e-3)


def test_sar_avg_is_the_mean_over_layers_of_eq5():
    """Iso's SAR_avg (sec. 3.3, Fig. 3a/3b): per task, SAR to the merged delta averaged across all layers; pairwise,
    SAR between tasks with k_TA averaged the same way. Checked against explicit projections on a two-layer pool."""
    layers = {"a": _lowrank(3, 14, 10, 2, seed=51), "b": _lowrank(3, 12, 16, 3, seed=52)}
    base = {k: torch.zeros_like(m[0]) for k, m in layers.items()}
    pool = TaskPool(base, {f"t{i}": {k: m[i] for k, m in layers.items()} for i in range(3)}, svd_mode="exact")
    want_ta, want_pair = [], []
    for mats in layers.values():
        TA = sum(m.double() for m in mats)
        k = max(1, D.effective_rank(D.spectrum(TA), 0.05))
        P = _top_u(TA, k) @ _top_u(TA, k).T
        want_ta.append([float((P @ m.double()).norm() / m.double().norm()) for m in mats])
        want_pair.append([[float((_top_u(mats[j], k) @ _top_u(mats[j], k).T @ mats[i].double()).norm()
                                 / mats[i].double().norm()) for j in range(3)] for i in range(3)])
    torch.testing.assert_close(D.sar_avg(pool).double(), torch.tensor(want_ta, dtype=torch.float64).mean(0),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(D.sar_avg(pool, pairwise=True).double(),
                               torch.tensor(want_pair, dtype=torch.float64).mean(0),
                               atol=1e-5, rtol=0)
    # a merged state dict: each layer's SAR is to its own merged delta
    merged = {k: 0.3 * sum(m) for k, m in layers.items()}
    torch.testing.assert_close(D.sar_avg(pool, merged, merged_is_delta=True), D.sar_avg(pool), atol=1e-6, rtol=0)
    with pytest.raises(StudioError, match="unknown key 'nope'"):
        D.sar_avg(pool, keys=["a", "nope"])


def test_sar_of_a_task_onto_itself():
    A = torch.randn(9, 7, generator=torch.Generator().manual_seed(10))
    layer = _pool([A, torch.randn(9, 7, generator=torch.Generator().manual_seed(11))]).layer("w")
    assert float(D.sar_to_merged(layer, A, k=7)[0]) == pytest.approx(1.0, abs=1e-6)  # its full subspace
    assert float(D.pairwise_sar(layer, k=7)[0, 0]) == pytest.approx(1.0, abs=1e-6)
    # with k directions it keeps exactly the top-k energy: SAR^2 = cumulative energy at k
    ce = D.cumulative_energy(D.spectrum(A))
    for k in (1, 3):
        assert float(D.sar_to_merged(layer, A, k=k)[0]) ** 2 == pytest.approx(float(ce[k - 1]), rel=1e-5)


# ---------------------------------------------------------------------------------------- slow references: STI


def _sti_slow(mats: list[torch.Tensor], k: int) -> float:
    """TSV eq. (7) literally: concatenated U, V, block-diagonal Sigma, full product, entry-wise L1 norm."""
    Us, Ss, Vs = [], [], []
    for M in mats:
        U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
        Us.append(U[:, :k]), Ss.append(S[:k]), Vs.append(Vh[:k].T)
    U, V, Sig = torch.cat(Us, 1), torch.cat(Vs, 1), torch.diag(torch.cat(Ss))
    eye = torch.eye(U.shape[1], dtype=torch.float64)
    return float(((U.T @ U - eye) @ Sig @ (V.T @ V - eye)).abs().sum())


def test_sti_matches_eq7_and_pairs_match_two_task_sti():
    mats = _lowrank(4, 16, 12, 2, seed=12, noise=0.1)
    layer = _pool(mats).layer("w")
    assert D.sti(layer) == pytest.approx(_sti_slow(mats, 12 // 4), rel=1e-4)  # default rank r / T
    assert D.sti(layer, rank=12) == pytest.approx(_sti_slow(mats, 12), rel=1e-4)
    # The default rank is TSV-M's int(r * (1/T)), which is not r // T everywhere: 1, not 2, at r = 98, T = 49.
    thin = _pool([torch.zeros(98, 98)] * 49).layer("w")
    assert D._default_sti_rank(thin) == tsv_rank(98, 49, None) == 1
    pair = D.sti_pairwise(layer, rank=3)
    assert torch.allclose(pair, pair.T) and float(pair.diagonal().abs().max()) == 0.0
    for i, j in [(0, 1), (1, 3), (2, 3)]:
        assert float(pair[i, j]) == pytest.approx(_sti_slow([mats[i], mats[j]], 3), rel=1e-4)
    # chunked product = one-shot product
    U, S, Vh = (torch.stack(x) for x in zip(*(layer.svd(i, 3) for i in range(4))))
    assert D.sti_from_factors(U, S, Vh, chunk=5) == pytest.approx(D.sti_from_factors(U, S, Vh), rel=1e-9)


# ---------------------------------------------------------------------------------------- slow references: SVC


def _svc_slow(mats, merged, alpha):
    """SVC Algorithm 1, literally, one subspace at a time."""
    U, S, Vh = torch.linalg.svd(merged.double(), full_matrices=False)
    K, R = len(mats), S.numel()
    s = torch.zeros(K, R, dtype=torch.float64)
    gamma = torch.zeros(R, dtype=torch.float64)
    for r in range(R):
        u = U[:, r]
        a = [u @ m.double() for m in mats]
        a_merge = u @ merged.double()
        for i in range(K):
            s[i, r] = (a_merge @ a[i]) / (a[i] @ a[i])
        gamma[r] = K / sum(max(alpha, float(s[i, r])) for i in range(K))
    return s, gamma


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_svc_coefficients_match_algorithm_1(alpha):
    mats = _lowrank(3, 10, 13, 2, seed=13, noise=0.05)
    g = torch.Generator().manual_seed(14)
    merged = (sum(mats) * (torch.rand(10, 13, generator=g) > 0.3)).float()  # a non-TA (masked) merge
    layer = _pool(mats).layer("w")
    s, gamma = D.svc_coefficients(layer, merged, alpha=alpha)
    s_ref, g_ref = _svc_slow(mats, merged, alpha)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gamma.double(), g_ref, rtol=1e-4, atol=1e-5)
    # uniform preferences are eq. (20); a one-hot preference is the target-task calibration 1 / max(alpha, s_t)
    torch.testing.assert_close(D.svc_coefficients(layer, merged, alpha=alpha, preferences=[1, 1, 1])[1], gamma)
    g1 = D.svc_coefficients(layer, merged, alpha=alpha, preferences=[0, 1, 0])[1]
    pos = s[1] > 0
    torch.testing.assert_close(g1[pos], 1 / s[1][pos].clamp_min(alpha))


def test_svc_lemma_3_2_cross_term_form_for_the_ta_sum():
    mats = _lowrank(4, 9, 11, 2, seed=15, noise=0.05)
    layer = _pool(mats).layer("w")
    s, _ = D.svc_coefficients(layer)  # merged = TA sum
    C = D.svc_cross_terms(layer)  # [i, j, r] = <a_j, a_i> / |a_i|^2
    torch.testing.assert_close(C.sum(1), s, rtol=1e-3, atol=1e-4)
    U = torch.linalg.svd(sum(m.double() for m in mats), full_matrices=False)[0]
    for r in (0, 4):
        a = [U[:, r] @ m.double() for m in mats]
        for i in range(4):
            lemma = 1 + sum(float(a[j] @ a[i] / (a[i] @ a[i])) for j in range(4) if j != i)
            assert float(s[i, r]) == pytest.approx(lemma, rel=1e-3)
    raw = D.svc_cross_terms(layer, normalize=False)
    torch.testing.assert_close(raw, raw.transpose(0, 1), rtol=1e-4, atol=1e-5)
    # pooled heatmap: rows sum to the k-subspace projection coefficient
    k = 3
    Uk = U[:, :k]
    pooled = torch.tensor([float((Uk.T @ sum(m.double() for m in mats) * (Uk.T @ m.double())).sum()
                                 / (Uk.T @ m.double()).pow(2).sum()) for m in mats], dtype=torch.float64)
    torch.testing.assert_close(D.svc_cross_matrix(layer, k=k).sum(1).double(), pooled, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("svd_mode", ["exact", "auto"])
def test_a_copy_of_the_ta_sum_is_diagnosed_as_the_sum_in_one_basis(svd_mode):
    # Task matrices diag(1, 2) and diag(2, 1) sum to 3 I: every basis is singular for the sum. The cross terms and the
    # coefficients of a copy of the sum (a TA merge at scale 1, as the app passes it) must come from one basis, the
    # sum's: before, the cross terms took the copy's own SVD while the coefficients took the sum's, and the raw
    # inner products <a_i, a_j> came out asymmetric ([[1, 0.5], [8, 4]] in exact mode).
    pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.diag(torch.tensor([1.0, 2.0]))},
                                               "b": {"w": torch.diag(torch.tensor([2.0, 1.0]))}}, svd_mode=svd_mode)
    layer = pool.layer("w")
    copy = layer.sum().clone()
    raw = D.svc_cross_terms(layer, copy, normalize=False)
    torch.testing.assert_close(raw, raw.transpose(0, 1))
    torch.testing.assert_close(raw, D.svc_cross_terms(layer, None, normalize=False))
    torch.testing.assert_close(D.svc_cross_terms(layer, copy).sum(1), D.svc_coefficients(layer, copy)[0])


# ---------------------------------------------------------------------------------- slow references: AlignMerge


def test_cross_influence_and_sai_match_the_two_step_projections_of_app_b2():
    mats = _lowrank(3, 8, 6, 2, seed=16, noise=0.1)
    merged = (0.7 * sum(mats) + 0.1 * torch.randn(8, 6, generator=torch.Generator().manual_seed(17))).float()
    layer = _pool(mats).layer("w")
    U, S, Vh = torch.linalg.svd(merged.double(), full_matrices=False)

    def proj(A, B):  # eq. (3): <A, B>_F / ||B||_F^2
        return float((A * B).sum() / (B * B).sum())

    xi = D.cross_influence(layer, merged)
    sai = D.sai(layer, merged)
    eta = D.eta(layer, merged)
    total = sum(m.double() for m in mats)
    for r in range(3):
        Pc, Pr = torch.outer(U[:, r], U[:, r]), torch.outer(Vh[r], Vh[r])
        eta_r = float(S[r] / (U[:, r] @ total @ Vh[r]))
        assert float(eta[r]) == pytest.approx(eta_r, rel=1e-3)
        for i in range(3):
            Ai = Pc @ mats[i].double()
            full = 1.0
            for j in range(3):
                Aj = Pc @ mats[j].double()
                a1 = proj(Aj, Ai)  # eq. (22)
                res = Aj - a1 * Ai
                a2 = proj(res @ Pr, Ai @ Pr)  # eq. (23), W_i^r = P_col Delta_i
                assert float(xi[i, j, r]) == pytest.approx(a1 + a2, rel=1e-3, abs=1e-5)  # eq. (24)
                if j != i:
                    full += a1 + a2
            assert float(sai[i, r]) == pytest.approx(abs(eta_r * full - 1), rel=1e-3, abs=1e-5)  # eq. (8)
    # least-squares pooled heatmap reduces to xi for one subspace
    torch.testing.assert_close(D.cross_influence_matrix(layer, merged, k=1), xi[:, :, 0], rtol=1e-4, atol=1e-5)
    # block tasks: each merged subspace is one task's; xi_{i,j} = c_j / c_i is NaN in the rows of the tasks absent
    # from it and 0 in its owner's row (mutant: the NaN put on column j instead of row i)
    blocks = _block_tasks(3, 2, seed=18)
    xi = D.cross_influence(_pool(blocks).layer("w"))
    U = torch.linalg.svd(sum(blocks))[0]
    for r in range(6):
        owner = int(U[:, r].abs().argmax()) // 2   # task i holds rows 2i and 2i + 1
        others = [i for i in range(3) if i != owner]
        assert bool(xi[others, :, r].isnan().all()), r
        assert float(xi[owner, owner, r]) == 1.0 and not bool(xi[owner, others, r].isnan().any()), r
        assert float(xi[owner, others, r].abs().max()) < 1e-6, r


def test_sti_leaves_out_directions_beyond_a_tasks_numerical_rank_in_both_svd_modes():
    """An exact SVD's null-space vectors of a rank-deficient task are arbitrary, and an entry of eq. (7) does not
    shrink with the singular values of the directions it pairs: they counted at full weight (three rank-3 tasks:
    24.4 at the default rank with "exact", 6.1 with "auto"; tasks on orthogonal subspaces 476 instead of 0)."""
    g = torch.Generator().manual_seed(0)

    def rank3(m: int, n: int) -> torch.Tensor:
        U = torch.linalg.qr(torch.randn(m, 3, generator=g)).Q
        V = torch.linalg.qr(torch.randn(n, 3, generator=g)).Q
        return (U * (torch.rand(3, generator=g) + 0.5)) @ V.T

    low = [rank3(30, 20) for _ in range(3)]
    expected = _sti_slow(low, 3)   # eq. (7) on the directions the tasks have
    for rank in (None, 3, 6, 20):
        for mode in ("exact", "auto"):
            assert D.sti(_pool(low, mode).layer("w"), rank=rank) == pytest.approx(expected, rel=1e-4), (rank, mode)
    pair = D.sti_pairwise(_pool(low, "exact").layer("w"), rank=20)
    torch.testing.assert_close(pair, D.sti_pairwise(_pool(low, "auto").layer("w"), rank=20), rtol=1e-4, atol=1e-4)
    assert float(pair[0, 1]) == pytest.approx(_sti_slow(low[:2], 3), rel=1e-4)
    # rank-8 tasks on disjoint rows: U_i^T U_j = 0, so eq. (7) is 0 at every rank
    rows = []
    for i in range(3):
        M = torch.zeros(24, 18)
        M[8 * i:8 * i + 8] = torch.randn(8, 18, generator=g)
        rows.append(M)
    for mode in ("exact", "auto"):
        layer = _pool(rows, mode).layer("w")
        assert D.sti(layer, rank=18) < 1e-3 and float(D.sti_pairwise(layer, rank=18).max()) < 1e-3


def test_svc_cross_terms_of_a_task_without_response_are_zero_in_both_svd_modes():
    """Lemma 3.2, s_i^r = sum_j C[i, j, r], for a task with no response too: LAPACK's float32 rounding left such a
    task a response of ~1e-14 in "exact" mode, and C[i, i, r] = 1 where svc_coefficients gives s = 0."""
    mats = []
    g = torch.Generator().manual_seed(0)
    for i in range(3):   # block-diagonal tasks, task 2 the largest: the top subspaces are task 2's alone
        M = torch.zeros(24, 18)
        M[8 * i:8 * i + 8, 6 * i:6 * i + 6] = torch.randn(8, 6, generator=g) * (i + 1)
        mats.append(M)
    for mode in ("exact", "auto"):
        layer = _pool(mats, mode).layer("w")
        C = D.svc_cross_terms(layer, rank=3)
        s, _ = D.svc_coefficients(layer, rank=3)
        assert float(C[0].abs().max()) == 0.0 and float(s[0].abs().max()) == 0.0, mode
        torch.testing.assert_close(C.sum(1), s, rtol=1e-5, atol=1e-6)
        # svc_coefficients with a rank is the cut of the full coefficients (one noise floor, the calibration's)
        torch.testing.assert_close(s, D.svc_coefficients(layer)[0][:, :3])
    # the raw inner products <a_i, a_j> stay symmetric: a task below the floor (task 1's 1e-7 response in task 0's
    # subspace) is zero in its row and its column (zeroing its row alone left 2.3e-7 of asymmetry)
    g = torch.Generator().manual_seed(1)
    Q1 = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64)).Q
    Q2 = torch.linalg.qr(torch.randn(10, 10, generator=g, dtype=torch.float64)).Q
    ds = [(Q1[:, 2 * i:2 * i + 2] * (3.0 - i)) @ Q2[:, 2 * i:2 * i + 2].T for i in range(2)]
    ds[1] = ds[1] + 1e-7 * torch.outer(Q1[:, 0], Q2[:, 0])
    raw = D.svc_cross_terms(_pool([d.float() for d in ds], "auto").layer("w"), rank=4, normalize=False)
    assert float((raw - raw.transpose(0, 1)).abs().max()) <= 1e-9 * float(raw.abs().max())   # was 2.5e-8 of it


def test_pooled_cross_matrices_keep_a_small_response_as_the_per_subspace_terms_do():
    """The pooled matrices cut a task as absent where its summed squared response was below eps(float32) of the
    largest, i.e. a response below ~3.5e-4: a response of 1e-4 got a NaN row in cross_influence_matrix(k=1), which
    its docstring equates with xi at k = 1, and a zero row (diagonal included) in svc_cross_matrix."""
    u, v = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0])
    a = torch.outer(u, v)
    b = 1e-4 * torch.outer(u, v) + 0.5 * torch.outer(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0]))
    layer = _pool([a, b], "auto").layer("w")
    xi = D.cross_influence(layer, rank=1)[:, :, 0]
    assert torch.isfinite(xi).all() and float(xi[1, 0]) == pytest.approx(1e4, rel=1e-4)
    torch.testing.assert_close(D.cross_influence_matrix(layer, k=1), xi)
    torch.testing.assert_close(D.svc_cross_matrix(layer, k=1), D.svc_cross_terms(layer, rank=1)[:, :, 0])
    assert D.svc_cross_matrix(layer, k=1).diagonal().tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------------- svd_mode exact vs auto


def test_diagnostics_agree_between_exact_and_auto_svd():
    mats = _lowrank(4, 120, 80, 4, seed=18, noise=0.003)
    ex, au = _pool(mats, "exact").layer("w"), _pool(mats, "auto").layer("w")
    # "auto" takes the top components from the Gram matrix's eigendecomposition: float32 accuracy (measured 1.3e-5,
    # 7.5e-6 and 1.1e-4 below); a randomized range finder there was 100 times further off and passed the tolerances
    # this test had for it (2e-2, 1e-2, 3e-2)
    assert D.sti(au) == pytest.approx(D.sti(ex), rel=1e-4)
    torch.testing.assert_close(D.sti_pairwise(au, rank=4), D.sti_pairwise(ex, rank=4), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(D.subspace_similarity(au, 4), D.subspace_similarity(ex, 4), rtol=0, atol=1e-4)
    torch.testing.assert_close(D.pairwise_sar(au, k=8), D.pairwise_sar(ex, k=8), rtol=0, atol=1e-5)
    # k_TA = 20 reaches 16 noise-floor directions per task, resolved to float32 accuracy too
    torch.testing.assert_close(D.pairwise_sar(au), D.pairwise_sar(ex), rtol=0, atol=1e-4)
    torch.testing.assert_close(D.sti_pairwise(au), D.sti_pairwise(ex), rtol=1e-3, atol=0)
    torch.testing.assert_close(D.task_spectra(au, rank=4), D.task_spectra(ex, rank=4), rtol=1e-4, atol=0)
    torch.testing.assert_close(D.task_spectra(au), D.task_spectra(ex))


def _gram64(deltas: torch.Tensor) -> torch.Tensor:
    flat = deltas.reshape(deltas.shape[0], -1).double()
    return flat @ flat.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_task_gram_is_the_float64_gram_of_the_task_matrices_over_blocks(dtype):
    # 350,000 entries: five or six blocks of the CPU's chunk (the last one partial); the third expert is the base, the
    # fourth differs from it by one subnormal
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(700, 500, generator=g).to(dtype)}
    base["w"][3, 4] = 0.0
    experts = {f"t{i}": {"w": (base["w"].double() + 0.01 * torch.randn(700, 500, generator=g, dtype=torch.float64))
                         .to(dtype)} for i in range(2)}
    experts["same"] = {"w": base["w"].clone()}
    if dtype == torch.float32:
        tiny = base["w"].clone()
        tiny[3, 4] = 1e-45   # float32's smallest subnormal: its square is a normal float64
        experts["tiny"] = {"w": tiny}
    pool = TaskPool(base, experts)
    T = len(experts)
    chunks = list(pool.layer("w").raw_chunks())
    assert len(chunks) > 2 and chunks[-1][1] - chunks[-1][0] < chunks[0][1] - chunks[0][0]
    for w in (None, torch.tensor([2.0, 0.3, 1.0, 5.0][:T])):
        layer = pool.layer("w", w)
        want = _gram64(layer.deltas)   # the float32 values the methods see, weighted in float32 as deltas are
        got = D._task_gram(layer)
        assert got.dtype == torch.float64 and got.shape == (T, T)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
        quiet = [False, False, True] + ([False] if dtype == torch.float32 else [])
        assert D.unchanged_tasks(layer).tolist() == quiet
        cos = D.task_cosine(layer)
        unit = layer.deltas.reshape(T, -1).double()
        unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-300)
        torch.testing.assert_close(cos, (unit @ unit.mT).float(), rtol=0, atol=1e-7)
        assert cos[2].eq(0).all() and cos[:, 2].eq(0).all()   # the unchanged expert: cosine 0 with all, itself too
        assert D.energy_preservation(layer) == pytest.approx(
            float(layer.sum().double().pow(2).sum() / layer.deltas.double().pow(2).sum()), rel=1e-6)
    # the whole model's cosine sums the layers' Grams
    torch.testing.assert_close(D.model_matrix(pool, "cosine")[:2, :2], D.task_cosine(pool.layer("w"))[:2, :2],
                               rtol=0, atol=1e-7)


def test_task_curves_are_each_tasks_entropy_and_sar_per_layer():
    mats = _lowrank(3, 12, 9, 2, seed=23)
    base = {"a": torch.zeros(12, 9), "b": torch.zeros(9, 12), "v": torch.zeros(9)}
    experts = {f"t{i}": {"a": m, "b": m.mT * (i + 1), "v": torch.ones(9)} for i, m in enumerate(mats)}
    experts["t2"]["b"] = torch.zeros(9, 12)   # t2 left b as the base
    pool = TaskPool(base, experts)
    merged = {k: sum(e[k] for e in experts.values()) / 2 for k in ("a", "b")}   # some merged deltas
    for m in (None, merged):
        out = D.task_curves(pool, m, merged_is_delta=None if m is None else True, normalized_entropy=True)
        assert out["key"] == ["a", "b"] and list(out["entropy"]) == list(out["sar"]) == ["t0", "t1", "t2"]
        for j, key in enumerate(out["key"]):
            layer = pool.layer(key)
            h = D.spectral_entropy(D.task_spectra(layer), normalized=True)
            sar = D.sar_to_merged(layer, None if m is None else m[key])
            for t, n in enumerate(pool.names):
                if key == "b" and n == "t2":
                    assert math.isnan(out["entropy"][n][j]) and math.isnan(out["sar"][n][j])
                else:
                    assert out["entropy"][n][j] == pytest.approx(float(h[t]), abs=1e-7)
                    assert out["sar"][n][j] == pytest.approx(float(sar[t]), abs=1e-7)
    # the curves' own mean over the changed tasks is layer_curves'
    lc = D.layer_curves(pool, merged, merged_is_delta=True, curves=["sar_mean", "task_entropy"],
                        normalized_entropy=True)
    tc = D.task_curves(pool, merged, merged_is_delta=True, normalized_entropy=True)
    for j in range(2):
        assert lc["sar_mean"][j] == pytest.approx(np.nanmean([v[j] for v in tc["sar"].values()]), abs=1e-6)
        assert lc["task_entropy"][j] == pytest.approx(np.nanmean([v[j] for v in tc["entropy"].values()]), abs=1e-6)
    with pytest.raises(StudioError, match="task_curves: normalized_entropy must be true or false"):
        D.task_curves(pool, normalized_entropy="yes")


def test_weights_rescale_spectra_and_leave_angles_alone():
    mats = _lowrank(3, 10, 8, 2, seed=19)
    pool = _pool(mats)
    w = torch.tensor([2.0, 0.5, 1.0])
    lw, l1 = pool.layer("w", w), pool.layer("w")
    torch.testing.assert_close(D.task_spectra(lw), D.task_spectra(l1) * w[:, None], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(D.task_cosine(lw), D.task_cosine(l1), rtol=0, atol=1e-6)
    torch.testing.assert_close(D.subspace_similarity(lw, 2), D.subspace_similarity(l1, 2), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- model level / app


@pytest.fixture(scope="module")
def clip():
    base = clip_like_state_dict(width=8, layers=2)
    experts = make_experts(base, 3)
    return base, experts, TaskPool(base, experts, svd_mode="exact")


def test_report_gathers_the_model_level_diagnostics_and_says_them_in_lines(clip):
    """``report`` is layer_curves, sar_avg (per task and pairwise) and every task-by-task model matrix, of the merge
    where they take one, on the layer rule given; its progress runs from 0 to 1 without going back; its summary
    says each task's SAR_avg and the most aligned pair, computed here from the task vectors."""
    base, experts, pool = clip
    merged = studio.merge(base, experts, "tsv_m", device="cpu")
    seen = []
    rep = D.report(pool, merged, merged_is_delta=False, layer_rule="skip_embeddings",
                   progress=lambda f, msg: seen.append(f))
    keys = D.layer_curves(pool, merged, merged_is_delta=False, layer_rule="skip_embeddings")["key"]
    assert rep["layers"]["key"] == keys and "visual.positional_embedding" not in keys
    assert rep["tasks"] == list(pool.names)
    assert list(rep["sar_avg"].values()) == pytest.approx(
        D.sar_avg(pool, merged, keys=keys, merged_is_delta=False).tolist(), rel=1e-6)
    assert rep["sar_avg_pairwise"] == pytest.approx(D.sar_avg(pool, pairwise=True, keys=keys).numpy(), rel=1e-6)
    for m, spec in D.METRICS.items():
        if spec.shape == "TxT":
            want = D.model_matrix(pool, m, merged if spec.uses_merged else None, keys=keys, merged_is_delta=False)
            np.testing.assert_allclose(rep["model_matrices"][m], want.numpy(), rtol=1e-6, err_msg=m)
    assert rep["unchanged_experts"] == [] and seen[0] == 0.0 and seen[-1] == 1.0 and seen == sorted(seen)
    lines = D.report_summary(rep)
    assert lines[0] == "SAR_avg to the merge (Iso sec. 3.3), per task: " + ", ".join(
        f"{t} {v:.3f}" for t, v in rep["sar_avg"].items())
    flat = {n: torch.cat([(experts[n][k] - base[k]).double().flatten() for k in keys]) for n in pool.names}
    cos = {(a, b): float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm()))
           for i, a in enumerate(pool.names) for b in pool.names[:i]}
    (a, b), top = max(cos.items(), key=lambda kv: kv[1])
    assert lines[-1].startswith(f"task-vector cosine over the model's matrix layers: most aligned {a}/{b} {top:.3f}")
    with pytest.raises(StudioError, match="report"):
        D.report(pool, progress="loud")


def test_layer_curves_cover_the_matrix_layers_and_accept_states_or_deltas(clip):
    base, experts, pool = clip
    out = D.layer_curves(pool)
    expected_keys = [k for k, v in base.items() if v.dim() == 2 and k != "text_projection"]
    assert out["key"] == expected_keys
    assert set(out) == {"key", "block"} | set(D.CURVES)
    for name in D.CURVES:
        assert len(out[name]) == len(expected_keys)
        assert all(math.isfinite(v) for v in out[name]), name
    assert out["block"][out["key"].index("visual.transformer.resblocks.1.mlp.c_fc.weight")] == 1
    assert all(0 <= v <= 1 for v in out["sar_mean"] + out["sar_min"] + out["k_merged_frac"])
    # a Task Arithmetic state with alpha = 1 is the default (merged = TA sum); as a state or as deltas
    state = studio.merge(base, experts, "task_arithmetic", alpha=1.0)
    deltas = {k: state[k] - base[k] for k in state}
    for merged in (state, deltas):
        got = D.layer_curves(pool, merged, curves=["sar_mean", "merged_entropy", "energy", "svc_gamma_mean"])
        for name in ("sar_mean", "merged_entropy", "energy", "svc_gamma_mean"):
            assert got[name] == pytest.approx(out[name], rel=1e-4, abs=1e-5), name
    # alpha = 0.3: SAR and entropy are scale-invariant, energy scales by alpha^2
    scaled = studio.merge(base, experts, "task_arithmetic", alpha=0.3)
    got = D.layer_curves(pool, scaled, curves=["sar_mean", "merged_entropy", "energy"])
    assert got["sar_mean"] == pytest.approx(out["sar_mean"], rel=1e-4)
    assert got["merged_entropy"] == pytest.approx(out["merged_entropy"], rel=1e-4)
    assert got["energy"] == pytest.approx([0.09 * e for e in out["energy"]], rel=1e-3)


def test_interference_matrix_follows_the_metric_table(clip):
    base, experts, pool = clip
    T = len(experts)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    merged_state = studio.merge(base, experts, "weight_average")
    for name, metric in D.METRICS.items():
        for merged in (None, merged_state):
            mat = D.interference_matrix(pool, key, name, merged)
            assert mat.device.type == "cpu" and mat.dtype == torch.float32
            if metric.shape == "TxT":
                assert mat.shape == (T, T), name
            else:
                assert metric.shape == "TxK" and mat.shape == (T, min(32, *base[key].shape)), name
            lo, hi = metric.range
            vals = mat[torch.isfinite(mat)]
            assert lo is None or float(vals.min()) >= lo - 1e-5, name
            assert hi is None or float(vals.max()) <= hi + 1e-5, name
            if metric.symmetric:
                torch.testing.assert_close(mat, mat.T, rtol=1e-4, atol=1e-5)
            assert metric.description and metric.paper and metric.k_help
    # k is honoured for the subspace-indexed maps; s_i^r is not scale-invariant: the weight average (TA / T)
    # has the TA sum's directions and 1/T of its s
    assert D.interference_matrix(pool, key, "svc", k=3).shape == (T, 3)
    wa = D.interference_matrix(pool, key, "svc", merged_state, k=3)
    ta = D.interference_matrix(pool, key, "svc", None, k=3)
    torch.testing.assert_close(wa, ta / T, rtol=1e-3, atol=1e-4)


def test_a_heatmap_at_another_k_on_a_warm_pool_is_the_fresh_pools():
    """The app keeps its pool and changes the heatmap's k: each metric's value at a second k is the one a fresh pool
    gives (SAR's and pairwise STI's memo keys once lacked k and rank, so the second k showed the first's matrix; a
    test audit)."""
    base = clip_like_state_dict(width=8, layers=1)
    experts = make_experts(base, 3)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    merged = studio.merge(base, experts, "tsv_m")
    warm = TaskPool(base, experts, svd_mode="exact")
    changed = 0
    for name in D.METRICS:
        first = D.interference_matrix(warm, key, name, merged, k=1)
        second = D.interference_matrix(warm, key, name, merged, k=3)
        fresh = D.interference_matrix(TaskPool(base, experts, svd_mode="exact"), key, name, merged, k=3)
        assert torch.equal(second.nan_to_num(-9.0), fresh.nan_to_num(-9.0)), name
        changed += first.shape == second.shape and not torch.equal(first.nan_to_num(-9.0), second.nan_to_num(-9.0))
    assert changed >= 3   # subspace similarity, SAR, pairwise STI


def test_model_matrix_aggregates_every_task_by_task_metric_over_the_layers(clip):
    """The model-level heatmap: cosine of the whole task vectors (every matrix layer flattened into one vector per
    task, computed here in float64 from the experts), every other TxT metric the mean of the per-layer matrices
    (SAR: Iso's pairwise SAR_avg), on the layers the rule selects; the per-subspace maps are refused."""
    base, experts, pool = clip
    names = list(experts)
    keys = D._matrix_keys(pool, None, None)
    assert 2 < len(keys) < len(base)
    flat = torch.stack([torch.cat([(experts[n][k].double() - base[k].double()).flatten() for k in keys])
                        for n in names])
    unit = flat / flat.norm(dim=1, keepdim=True)
    torch.testing.assert_close(D.model_matrix(pool, "cosine").double(), unit @ unit.T, atol=1e-6, rtol=0)
    # not the mean of the per-layer cosines: a layer counts by its norm
    mean_cos = torch.stack([D.interference_matrix(pool, k, "cosine").double() for k in keys]).mean(0)
    assert (mean_cos - unit @ unit.T).abs().max() > 1e-3
    merged = studio.merge(base, experts, "ties")
    for name, metric in D.METRICS.items():
        if metric.shape == "TxK":
            with pytest.raises(StudioError, match=rf"'{name}' is per merged subspace of one layer.*'cosine'"):
                D.model_matrix(pool, name, merged)
            continue
        if name == "cosine":
            continue
        got = D.model_matrix(pool, name, merged if metric.uses_merged else None)
        want = torch.stack([D.interference_matrix(pool, k, name, merged if metric.uses_merged else None).double()
                            for k in keys]).mean(0)
        assert got.shape == (len(names), len(names)) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0, msg=name)
    torch.testing.assert_close(D.model_matrix(pool, "sar"), D.sar_avg(pool, pairwise=True), atol=1e-6, rtol=0)
    # k and keys are each layer's; the merged deltas of a subset of layers
    two = keys[:2]
    torch.testing.assert_close(
        D.model_matrix(pool, "subspace_similarity", k=3, keys=two),
        (D.interference_matrix(pool, two[0], "subspace_similarity", k=3)
         + D.interference_matrix(pool, two[1], "subspace_similarity", k=3)) / 2, atol=1e-6, rtol=0)
    with pytest.raises(StudioError, match="unknown metric 'nope'"):
        D.model_matrix(pool, "nope")
    with pytest.raises(StudioError, match="merged state/deltas lack"):
        D.model_matrix(pool, "xi", {keys[0]: merged[keys[0]]})


def test_docstring_examples_run():
    import doctest

    assert doctest.testmod(D, raise_on_error=False).failed == 0


def test_bad_requests_raise_clear_studio_errors(clip):
    base, experts, pool = clip
    key = "visual.transformer.resblocks.0.attn.out_proj.weight"
    with pytest.raises(StudioError, match=r"unknown metric 'nope'.*subspace_similarity"):
        D.interference_matrix(pool, key, "nope")
    with pytest.raises(StudioError, match=r"visual\.ln_pre\.bias.*2-D"):
        D.interference_matrix(pool, "visual.ln_pre.bias", "cosine")
    with pytest.raises(StudioError, match=r"unknown key 'missing'"):
        D.interference_matrix(pool, "missing", "cosine")
    with pytest.raises(StudioError, match=r"k must be a positive integer"):
        D.interference_matrix(pool, key, "sar", k=0)
    with pytest.raises(StudioError, match=rf"{key}.*shape \(3, 3\)"):
        D.interference_matrix(pool, key, "svc", torch.zeros(3, 3))
    with pytest.raises(StudioError, match=r"lack.*out_proj"):
        D.interference_matrix(pool, key, "svc", {"visual.proj": base["visual.proj"]})
    with pytest.raises(StudioError, match=r"unknown curve"):
        D.layer_curves(pool, curves=["sti", "bogus"])
    with pytest.raises(StudioError, match=r"preferences has 2 weights but there are 3 experts"):
        D.svc_coefficients(pool.layer(key), preferences=[1.0, 2.0])
    names = list(experts)
    with pytest.raises(StudioError, match=r"preferences name unknown task\(s\) 'nope'"):
        D.svc_coefficients(pool.layer(key), preferences={"nope": 1.0})
    torch.testing.assert_close(D.svc_coefficients(pool.layer(key), preferences={names[1]: 2.0}),
                               D.svc_coefficients(pool.layer(key), preferences=[0.0, 1.0, 0.0]))
    # flags are booleans: a string such as "no" would count as true
    for call in (lambda: D.sar_avg(pool, pairwise="no"), lambda: D.layer_curves(pool, merged_is_delta="no"),
                 lambda: D.spectral_entropy(torch.ones(3), normalized="no"),
                 lambda: D.sai(pool.layer(key), signed="x"), lambda: D.layer_curves(pool, normalized_entropy=1)):
        with pytest.raises(StudioError, match=r"must be true or false"):
            call()
    # one curve's name is that curve, not its letters
    one = D.layer_curves(pool, curves="sti", keys=[key])
    assert one == D.layer_curves(pool, curves=["sti"], keys=[key]) and "s" not in one
    with pytest.raises(StudioError, match=r"progress must be a function"):
        D.layer_curves(pool, progress=3)
    # weights: one finite, non-negative number per expert
    for weights in (torch.ones(5), torch.ones(2), torch.tensor([1.0, float("nan"), 1.0]), [1, -1, 1], "abc",
                    [1.0, 1e40, 1.0]):   # 1e40 is finite, but inf in the float32 the task matrices are weighted in
        with pytest.raises(StudioError, match=rf"weights for '{re.escape(key)}' must be 3 finite numbers >= 0"):
            D.interference_matrix(pool, key, "subspace_similarity", weights=weights)
    assert D.subspace_similarity(pool.layer(key), k=None).shape == (3, 3)   # None: the default k
    with pytest.raises(StudioError, match=r"energy_preservation needs finite values \(the merged delta\)"):
        D.energy_preservation(pool.layer(key), torch.full(tuple(base[key].shape), float("nan")))


def test_subspace_counts_and_svc_alpha_are_checked():
    """k = 0 or -3 was quietly read as 1, '2' and 2.5 raised Python's TypeError; a negative SVC alpha gave
    negative calibration factors."""
    base = clip_like_state_dict(width=8)
    layer = TaskPool(base, make_experts(base, 3)).layer("visual.proj")
    for k in (0, -3, "2", 2.5, True):
        for call in (lambda: D.sar_to_merged(layer, k=k), lambda: D.svc_coefficients(layer, rank=k),
                     lambda: D.cross_influence(layer, rank=k), lambda: D.svc_cross_matrix(layer, k=k)):
            with pytest.raises(D.DiagnosticsError, match="must be a positive integer or None"):
                call()
    assert D.sar_to_merged(layer, k=10**6).shape == (3,)   # more subspaces than there are: all of them
    for call, message in ((lambda: D.svc_coefficients(layer, rank=0), "svc_coefficients on 'visual.proj': rank"),
                          (lambda: D.sar_to_merged(layer, k=0), "sar_to_merged on 'visual.proj': k"),
                          (lambda: D.sti(layer, rank=0), "sti on 'visual.proj': rank")):
        with pytest.raises(D.DiagnosticsError, match=rf"^{message} must be a positive integer or None, got 0$"):
            call()
    # one rule for every count: any integral type (NumPy's, as a slider or an array gives it) reads as that integer
    for call in (lambda k: D.sar_to_merged(layer, k=k), lambda k: D.svc_coefficients(layer, rank=k)[0],
                 lambda k: D.sti(layer, rank=k), lambda k: D.sti_pairwise(layer, rank=k),
                 lambda k: D.pairwise_sar(layer, k=k), lambda k: D.subspace_similarity(layer, k=k),
                 lambda k: D.task_spectra(layer, rank=k), lambda k: D.cross_influence(layer, rank=k)):
        torch.testing.assert_close(torch.as_tensor(call(np.int64(2))), torch.as_tensor(call(2)), rtol=0, atol=0)
    for alpha in (-1, 0, float("nan"), "a"):
        with pytest.raises(D.DiagnosticsError, match="alpha must be a finite number > 0"):
            D.svc_coefficients(layer, alpha=alpha)


def test_the_spectral_helpers_name_inputs_that_are_not_finite_float_tensors():
    """A list, an integer tensor, NaN or a 0-d tensor raised AttributeError, LAPACK's error or IndexError."""
    for call, message in ((lambda: D.spectrum([[1.0]]), r"spectrum needs a matrix as a floating-point tensor, got"),
                          (lambda: D.spectrum(torch.ones(3, 3, dtype=torch.int64)), "got a torch.int64 tensor"),
                          (lambda: D.spectrum(torch.full((3, 3), float("nan"))), "needs finite values"),
                          (lambda: D.cumulative_energy([1.0]), "cumulative_energy needs singular values"),
                          (lambda: D.spectral_entropy(torch.tensor(2.0), normalized=True), "got a 0-d tensor"),
                          (lambda: D.effective_rank([1.0]), "effective_rank needs a 1-D spectrum"),
                          (lambda: D.effective_rank(torch.ones(3), eps="x"), r"eps must be a number in \[0, 1\)")):
        with pytest.raises(D.DiagnosticsError, match=message):
            call()


def test_diagnostics_of_an_integer_or_bool_buffer_name_the_key_and_its_dtype():
    """From a fuzz audit: on a bool buffer the heatmaps that read the task matrices raised torch's NotImplementedError
    (a bool subtraction), and on an integer one every heatmap returned zeros (xi and SAI: NaN). Such a buffer has no
    task vectors, and a merge keeps the base's."""
    base = {"w": torch.zeros(4, 4), "mask": torch.ones(4, 4, dtype=torch.bool), "idx": torch.arange(16).reshape(4, 4)}
    experts = {n: {"w": torch.randn(4, 4, generator=torch.Generator().manual_seed(i)), "mask": base["mask"].clone(),
                   "idx": base["idx"].clone()} for i, n in enumerate("ab")}
    pool = studio.get_pool(base, experts)
    for key, dtype in (("mask", "bool"), ("idx", "int64")):
        for metric in D.METRICS:
            with pytest.raises(D.DiagnosticsError, match=f"key '{key}' is a buffer of {dtype}; spectral diagnostics"):
                D.interference_matrix(pool, key, metric)
        with pytest.raises(D.DiagnosticsError, match=f"key '{key}' is a buffer of {dtype}"):
            D.layer_curves(pool, keys=[key])
        with pytest.raises(studio.StudioError, match=f"'{key}' is a buffer of {dtype}, not a weight"):
            pool.layer(key)
    assert D.interference_matrix(pool, "w", "cosine").shape == (2, 2)
    assert studio.merge(base, experts, "ties")["idx"].equal(base["idx"])


def test_the_layer_and_pool_diagnostics_name_arguments_of_the_wrong_kind():
    """A mapping where a pool belongs, one string as the key list, a NaN or integer merged delta raised Python's
    AttributeError / TypeError or LAPACK's error."""
    base = clip_like_state_dict(width=8)
    pool = TaskPool(base, make_experts(base, 3))
    layer, key = pool.layer("visual.proj"), "visual.proj"
    nan = torch.full(tuple(base[key].shape), float("nan"))
    for call, message in (
            (lambda: D.interference_matrix(dict(base), key, "cosine"), "expected a TaskPool"),
            (lambda: D.interference_matrix(pool, ["k"], "cosine"), r"unknown key \['k'\]"),
            (lambda: D.interference_matrix(pool, key, ["cosine"]), r"unknown metric \['cosine'\]"),
            (lambda: D.sar_avg(pool, keys=key), "keys must be a list of layer keys or None"),
            (lambda: D.sar_avg(pool, keys=[5]), "unknown key 5"),
            (lambda: D.sar_avg(pool, merged={key: nan}, keys=[key]), f"merged key '{key}' needs finite values"),
            (lambda: D.sar_to_merged(dict(base)), "expected a layer"),
            (lambda: D.task_cosine(None), "expected a layer"),
            (lambda: D.sar_to_merged(layer, nan), "needs finite values"),
            (lambda: D.svc_coefficients(layer, nan.long()), "got a torch.int64 tensor")):
        with pytest.raises(D.DiagnosticsError, match=message):
            call()


def test_merged_deltas_that_share_totals_and_sampled_entries_have_their_own_statistics():
    """The memo key of a merged delta was its totals and 64 strided samples (column 0 of a 64 x 64 matrix): two
    deltas with two other columns swapped shared an entry, and the second got the first's SVC and xi statistics."""
    base = {"blk.weight": torch.zeros(64, 64)}
    # quarter-integer entries: every total is exact, whatever order the columns are summed in
    experts = {f"t{i}": {"blk.weight": torch.randint(-8, 9, (64, 64), generator=torch.Generator().manual_seed(i))
                         / 4.0} for i in range(4)}
    first = sum(sd["blk.weight"] for sd in experts.values()) / 4 + 0.5 * experts["t0"]["blk.weight"]
    second = first.clone()
    second[:, [1, 2]] = first[:, [2, 1]]
    warm = TaskPool(base, experts).layer("blk.weight")
    for merged in (first, second, second.to(torch.bfloat16)):
        fresh = TaskPool(base, experts).layer("blk.weight")
        for call in (lambda layer: D.svc_coefficients(layer, merged)[0],
                     lambda layer: D.cross_influence(layer, merged, rank=5),
                     lambda layer: D.sar_to_merged(layer, merged)):
            torch.testing.assert_close(call(warm), call(fresh), rtol=0, atol=0, equal_nan=True)


def test_layer_curves_run_layers_on_the_merge_workers_and_agree_with_one_worker(clip, monkeypatch):
    """layer_curves spreads its layers over studio.parallel's workers, as a merge does (1.5x on 12 ViT-B/32 layers
    on 2 cores); one worker gives the same numbers to float32 rounding, and progress reaches 1 in order."""
    import threading

    from studio import parallel

    base, experts, _ = clip
    merged = studio.merge(base, experts, "task_arithmetic", device="cpu")
    names = []
    sti = D.sti
    monkeypatch.setattr(D, "sti", lambda layer, *a: (names.append(threading.current_thread().name), sti(layer, *a))[1])
    out = {}
    try:
        for workers in (1, 2):
            parallel.set_workers(workers)
            reports = []
            out[workers] = D.layer_curves(TaskPool(base, experts, device="cpu"), merged, merged_is_delta=False,
                                          progress=lambda f, m: reports.append(f))
            assert reports == sorted(reports) and reports[-1] == 1.0 and len(reports) == len(out[workers]["key"]) + 2
    finally:
        parallel.set_workers(None)
    n = len(out[1]["key"])
    assert all(name.startswith("studio-layer") for name in names[n:]) and len(names) == 2 * n
    assert out[1]["key"] == out[2]["key"] and out[1]["block"] == out[2]["block"]
    for curve in D.CURVES:
        assert out[2][curve] == pytest.approx(out[1][curve], rel=1e-5, abs=1e-7, nan_ok=True), curve


def test_the_merged_delta_s_null_space_is_never_read():
    """A zero merge (experts d and -d) had SAR 0.34 per task, the tasks' share along LAPACK's arbitrary first
    direction of a zero matrix, and a different value with the rows permuted; a k above the merge's rank read
    null directions likewise. SAR counts only the merged delta's numerical-rank directions (Iso eq. 5-6)."""
    g = torch.Generator().manual_seed(3)
    d = torch.randn(6, 4, generator=g)
    perm = torch.randperm(6, generator=g)
    for mats in ([d, -d], [d[perm], -d[perm]]):
        pool = _pool(mats)
        layer = pool.layer("w")
        assert D.sar_to_merged(layer).tolist() == [0.0, 0.0]
        assert D.sar_avg(pool).tolist() == [0.0, 0.0]
        assert D.layer_curves(pool, curves=["k_merged_frac", "sar_mean"]) == {
            "key": ["w"], "block": [None], "k_merged_frac": [0.0], "sar_mean": [0.0]}
        assert D.svc_cross_matrix(layer).tolist() == [[0.0, 0.0], [0.0, 0.0]]
        assert torch.isnan(D.cross_influence_matrix(layer)).all()
        assert torch.isnan(D.cross_influence(layer, rank=2)).all() and torch.isnan(D.sai(layer, rank=2)).all()
    # a merge of rank 2 in a 6 x 4 layer: k = 3 and 4 are the rank-2 values, in both SVD modes
    mats = [torch.randn(6, 1, generator=g) @ torch.randn(1, 4, generator=g) for _ in range(2)]
    for mode in ("exact", "auto"):
        layer = _pool(mats, mode).layer("w")
        merged = layer.sum()
        assert torch.linalg.matrix_rank(merged) == 2
        at_rank = D.sar_to_merged(layer, merged, k=2)
        for k in (3, 4):
            assert torch.equal(D.sar_to_merged(layer, merged, k=k), at_rank)
        assert torch.equal(D.cross_influence_matrix(layer, merged, k=4), D.cross_influence_matrix(layer, merged, k=2))
        xi = D.cross_influence(layer, merged, rank=4)
        assert torch.isnan(xi[:, :, 2:]).all() and not torch.isnan(xi[:, :, :2]).any()
        assert torch.isnan(D.eta(layer, merged, rank=4)[2:]).all()


@pytest.mark.parametrize("shape", [(256, 96), (96, 256)])
def test_a_rank_deficient_merge_is_diagnosed_through_the_gram_to_its_rank(shape):
    """A TSV-M merge below rank 1/T is rank deficient: its SVD was LAPACK's float32 one (the Gram route refuses a
    rank-deficient matrix; its statistics 0.57-0.59 s for a 3072-long layer on one core, now 0.33-0.38 s). The
    diagnostics now take the float64 Gram's to the merge's numerical rank (svd_gram_to_rank): SAR, the merged
    entropy, SVC's and AlignMerge's per-subspace numbers over the rank are float64's SVD's to float32 rounding,
    nothing is read beyond it, and svd_mode="exact" keeps LAPACK's."""
    T, (m, n) = 4, shape
    mats = _lowrank(T, m, n, 6, seed=21, noise=0.02)
    pool = _pool(mats, "auto")
    layer = pool.layer("w")
    merged = studio.merge({"w": torch.zeros(m, n)}, {f"t{i}": {"w": x} for i, x in enumerate(mats)}, "tsv_m",
                          rank_fraction=0.15, device="cpu")["w"]
    R = D._merged_rank(layer, D.spectrum(merged))
    assert R == T * int(0.15 * min(m, n)) < min(m, n)
    assert D._merged_svd(layer, merged) is not None and D._merged_svd(_pool(mats).layer("w"), merged) is None
    # float64 references from the merge's own SVD
    U, S, Vh = torch.linalg.svd(merged.double(), full_matrices=False)
    deltas = torch.stack(mats).double()
    A = U.mT[:R] @ deltas                                     # [T, R, n]: a_i^r over the rank
    c, a2 = (A * Vh[:R]).sum(-1), A.pow(2).sum(-1)
    k = D.effective_rank(S.float())
    sar = (a2[:, :k].sum(1) / deltas.pow(2).sum((1, 2))).sqrt()
    torch.testing.assert_close(D.sar_to_merged(layer, merged).double(), sar, rtol=0, atol=1e-6)
    torch.testing.assert_close(D.spectral_entropy(D._merged_stats(layer, merged).S).double(),
                               D.spectral_entropy(S).double(), rtol=1e-6, atol=0)
    st = D._merged_stats(layer, merged)
    # per subspace, up to the signs a decomposition may choose
    torch.testing.assert_close(st.c[:, :R].double().abs(), c.abs(), rtol=0, atol=2e-5 * float(c.abs().max()))
    torch.testing.assert_close(st.a2[:, :R].double(), a2, rtol=0, atol=2e-5 * float(a2.max()))
    assert not st.a2[:, R:].any() and not st.c[:, R:].any()   # no direction beyond the rank
    s_ref = torch.linalg.svdvals(merged.double())
    assert float((st.S[:R].double() - s_ref[:R]).abs().max()) < 1e-7 * float(s_ref[0])
    # SVC's raw cross terms <a_i^r, a_j^r> are symmetric: their two factors in one basis (the cross terms took
    # LAPACK's basis and the responses the Gram's: 2.5e-6 and 4.6e-6 asymmetric here)
    raw = D.svc_cross_terms(layer, merged, rank=R, normalize=False)
    assert float((raw - raw.transpose(0, 1)).abs().max() / raw.abs().max()) < 2e-7
    ex = _pool(mats).layer("w")   # "exact": LAPACK's, as the official code
    torch.testing.assert_close(D.sar_to_merged(ex, merged), D.sar_to_merged(layer, merged), rtol=0, atol=1e-5)


def test_layers_and_states_given_in_another_dtype_are_diagnosed_as_the_same_values():
    """float16 experts over a float32 base: a frozen layer counted as changed (its zero task matrices halved SAR_avg,
    0.40 for 0.79); a float64 merged state was rounded to float32 before merged - base."""
    g = torch.Generator().manual_seed(0)
    frozen = torch.randn(4, 4, generator=g).half().float()
    base = {"w": torch.zeros(4, 4), "frozen": frozen}
    experts = {n: {"w": torch.randn(4, 4, generator=g).half().float(), "frozen": frozen.clone()} for n in "ab"}
    half = {n: {k: v.half() for k, v in sd.items()} for n, sd in experts.items()}
    want = D.sar_avg(TaskPool(base, experts))
    assert torch.equal(D.sar_avg(TaskPool(base, half)), want)
    assert D.layer_curves(TaskPool(base, half), curves=["energy"])["key"] == ["w"]
    # float64 weights near 1 with deltas near 1e-6: the state and its delta give the same numbers
    base64 = {"w": 1 + torch.rand(5, 4, generator=g, dtype=torch.float64)}
    experts64 = {n: {"w": base64["w"] + 1e-6 * torch.randn(5, 4, generator=g, dtype=torch.float64)} for n in "abc"}
    pool = TaskPool(base64, experts64)
    merged = {"w": base64["w"] + 0.4 * sum(e["w"] - base64["w"] for e in experts64.values())}
    delta = {"w": merged["w"] - base64["w"]}
    for fn in (D.sar_avg, lambda p, m, **kw: torch.tensor(D.layer_curves(p, m, curves=["energy", "merged_entropy"],
                                                                           **kw)["energy"])):
        assert torch.allclose(fn(pool, merged, merged_is_delta=False), fn(pool, delta, merged_is_delta=True),
                              rtol=1e-6, atol=0)


def test_curves_keys_and_energy_arguments_of_the_wrong_form_are_named():
    pool = _pool(_lowrank(2, 5, 4, rank=2, seed=1))
    for curves in (3, [["sti"]], [None]):
        with pytest.raises(D.DiagnosticsError, match="curves must be a curve's name or a list of them"):
            D.layer_curves(pool, curves=curves)
    with pytest.raises(D.DiagnosticsError, match=r"keys lists \['w'\] more than once"):
        D.sar_avg(pool, keys=["w", "w"])
    with pytest.raises(D.DiagnosticsError, match=r"merged delta has shape \(5, 5\), expected that of one task delta "
                                                 r"\(3, 3\)"):
        D.energy_preservation(torch.ones(2, 3, 3), torch.ones(5, 5))
    with pytest.raises(D.DiagnosticsError, match="eps must be a number in"):   # checked where k is given too
        D.sar_to_merged(pool.layer("w"), k=2, eps=5)


@pytest.mark.parametrize("svd_mode", ["auto", "exact"])
def test_svc_coefficients_of_the_top_subspaces_are_a_prefix_of_all(svd_mode):
    """``rank`` only cuts the result: SVC's noise floor is relative to each task's largest response over every
    merged subspace, as in the calibration. Four tasks on orthogonal 2-d subspaces of decreasing size: the top 2
    subspaces are task 0's, where tasks 1-3 respond with float32 rounding only (s = 0, gamma = K / K = 1)."""
    g = torch.Generator().manual_seed(0)
    m, n = 12, 10
    Q = torch.linalg.qr(torch.randn(m, m, generator=g)).Q
    P = torch.linalg.qr(torch.randn(n, n, generator=g)).Q
    experts = {f"t{i}": {"w": (Q[:, 2 * i:2 * i + 2] * torch.tensor([4.0 - i, 3.5 - i])) @ P[:, 2 * i:2 * i + 2].mT}
               for i in range(4)}
    layer = TaskPool({"w": torch.zeros(m, n)}, experts, svd_mode=svd_mode).layer("w")
    s_all, _ = D.svc_coefficients(layer)
    s, gamma = D.svc_coefficients(layer, rank=2)
    torch.testing.assert_close(s, s_all[:, :2])
    assert torch.equal(s[1:], torch.zeros(3, 2))
    torch.testing.assert_close(gamma, torch.ones(2), atol=1e-5, rtol=0)


def test_every_heatmap_metric_refuses_a_bad_merged_delta(clip):
    """The metrics of the tasks alone (cosine, SAR, subspace similarity, pairwise STI) dropped a merged argument
    unread, so a string, a wrong shape or NaN came back with a result; the others refused them. All refuse now."""
    base, experts, pool = clip
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    shape = tuple(base[key].shape)
    nan = torch.zeros(shape)
    nan[0, 0] = float("nan")
    for name in D.METRICS:
        for merged, says in (("not a tensor", "merged must be a tensor or None, got str"),
                             (torch.zeros(3, 3), f"merged delta has shape (3, 3), expected the layer's {shape}"),
                             (nan, "merged delta")):
            with pytest.raises(D.DiagnosticsError, match=re.escape(says)):
                D.interference_matrix(pool, key, name, merged)


def test_no_layer_to_average_over_says_why():
    """A pool with no matrix the rule selects was said to have experts equal to the base; an empty ``keys`` list was
    too. ``report_summary`` of anything but a report raised a bare ``KeyError``."""
    base = {"w": torch.zeros(3, 3), "b": torch.zeros(3)}
    moved = TaskPool(base, {"x": {"w": torch.zeros(3, 3), "b": torch.ones(3)},
                            "y": {"w": torch.eye(3), "b": torch.zeros(3)}})
    only_biases = TaskPool({"b": base["b"]}, {"x": {"b": torch.ones(3)}, "y": {"b": -torch.ones(3)}})
    for run in (lambda: D.sar_avg(only_biases), lambda: D.model_matrix(only_biases, "cosine"),
                lambda: D.report(only_biases)):
        with pytest.raises(D.DiagnosticsError, match=r"the layer rule 'default' selects none of the pool's 1 tensors "
                                                     r"\(b \(3,\)\); the diagnostics measure 2-D weight matrices"):
            run()
    with pytest.raises(D.DiagnosticsError, match=r"sar_avg: keys is empty; give at least one matrix layer"):
        D.sar_avg(moved, keys=[])
    with pytest.raises(D.DiagnosticsError, match=r"every expert \(x, y\) equals the base on each matrix layer"):
        D.sar_avg(TaskPool(base, {"x": dict(base), "y": dict(base)}))
    assert D.sar_avg(moved).shape == (2,)
    for rep in ({}, None, {"layers": {}}):
        with pytest.raises(D.DiagnosticsError, match=r"report_summary takes the dict diagnostics.report returns"):
            D.report_summary(rep)



@pytest.mark.parametrize("scale", [1.0, 1e-22, 1e-25, 1e19, 1e25])
def test_energy_fractions_do_not_depend_on_the_spectrums_scale(scale):
    """Ortho-Merge eq. 9's p_i = sigma_i^2 / sum sigma_j^2 is scale free: squared in float32, a float64 spectrum of
    1e-22 gave an entropy of 1.5e-4 (and 1e-25 zero energy), one of 1e19 NaN (a diagnostics audit)."""
    s = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64) * scale
    p = torch.tensor([9.0, 4.0, 1.0], dtype=torch.float64) / 14
    assert float(D.spectral_entropy(s)) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-6)
    torch.testing.assert_close(D.cumulative_energy(s), p.cumsum(0).float())
    assert D.spectral_entropy(s).dtype == D.cumulative_energy(s).dtype == torch.float32
