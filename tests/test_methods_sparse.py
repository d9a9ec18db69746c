"""TIES, DARE and Model Breadcrumbs: hand-derived cases from the papers, parity with slow references, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import studio
from studio.methods._sparsify import (band_counts, band_mask, band_thresholds, disjoint_merge, elect_sign,
                                      kth_smallest, magnitude_mask, order_statistics, random_drop, row_band_mask,
                                      streamed_order_statistics, ties_blocks)
from studio.methods.breadcrumbs import breadcrumbs
from studio.methods.dare import dare
from studio.methods.ties import model_thresholds, ties
from studio.pool import TaskPool, key_seed
from studio.reference import breadcrumbs_reference, task_vectors_of
from studio.schema import HyperparameterError, StudioError

from .conftest import clip_like_state_dict, make_experts


def _layer(tasks: list[list[float]] | torch.Tensor):
    """A one-key pool whose task vectors are exactly ``tasks`` (base = 0)."""
    tasks = torch.as_tensor(tasks, dtype=torch.float32)
    base = {"w": torch.zeros(tasks.shape[1:])}
    experts = {f"t{i}": {"w": t.clone()} for i, t in enumerate(tasks)}
    return TaskPool(base, experts, device="cpu").layer("w")


def _delta(merged, base):
    return {k: merged[k].float() - base[k].float() for k in base}


# ----------------------------------------------------------------------------------------------------------- TIES
# Three task vectors of six parameters. With k = 0.5 the official rule keeps int(6*0.5)+1 = 4 entries per task
# (every entry >= the 3rd smallest magnitude), so task 1 loses (0.5, -0.1), task 2 loses (-0.3, 0.2) and task 3
# loses (0.4, 0.6). Trimmed (Alg. 1 step 1):
#            p0    p1    p2    p3    p4    p5
#   t1   [   1,    2,    2,   -4,    0,    0 ]
#   t2   [   1,    3,   -2,   -2,    0,    0 ]
#   t3   [  -5,   -1,    0,    0,    3,   -2 ]
# Elect (step 2), sign of the column sums (-3, 4, 0, -6, 3, -2): -, +, ?, -, +, -. Column p2 sums to exactly 0:
# the official resolve_zero_signs gives it the majority of the elected signs, sign(-1+1-1+1-1) = -1.
# (Mass, not count: p0 has two positive votes but the -5 wins.)
# Disjoint merge (step 3) over the agreeing entries:
#   mean: p0 -5 | p1 (2+3)/2 = 2.5 | p2 -2 | p3 (-4-2)/2 = -3 | p4 3 | p5 -2
#   sum:  p0 -5 | p1 5           | p2 -2 | p3 -6            | p4 3 | p5 -2
HAND_TASKS = [[1.0, 2.0, 2.0, -4.0, 0.5, -0.1],
              [1.0, 3.0, -2.0, -2.0, -0.3, 0.2],
              [-5.0, -1.0, 0.4, 0.6, 3.0, -2.0]]
HAND_TRIMMED = [[1.0, 2.0, 2.0, -4.0, 0.0, 0.0],
                [1.0, 3.0, -2.0, -2.0, 0.0, 0.0],
                [-5.0, -1.0, 0.0, 0.0, 3.0, -2.0]]
HAND_SIGNS = [-1.0, 1.0, -1.0, -1.0, 1.0, -1.0]
HAND_MEAN = [-5.0, 2.5, -2.0, -3.0, 3.0, -2.0]
HAND_SUM = [-5.0, 5.0, -2.0, -6.0, 3.0, -2.0]


def test_ties_building_blocks_on_the_hand_example():
    x = torch.tensor(HAND_TASKS)
    trimmed = x * magnitude_mask(x, 0.5)
    assert trimmed.tolist() == HAND_TRIMMED
    sign = elect_sign(trimmed)
    assert sign.tolist() == HAND_SIGNS
    assert disjoint_merge(trimmed, sign, "mean").tolist() == HAND_MEAN
    assert disjoint_merge(trimmed, sign, "sum").tolist() == HAND_SUM


@pytest.mark.parametrize("scope", ["layer", "model"])
def test_ties_method_on_the_hand_example(scope):
    layer = _layer(HAND_TASKS)  # one tensor: model and layer scope coincide
    assert ties(layer, k=0.5, topk_scope=scope, merge_func="mean").tolist() == HAND_MEAN
    assert ties(layer, k=0.5, topk_scope=scope, merge_func="sum").tolist() == HAND_SUM


def test_ties_with_k1_and_agreeing_signs_is_the_mean():
    g = torch.Generator().manual_seed(0)
    sign = torch.where(torch.rand(7, 5, generator=g) > 0.5, 1.0, -1.0)
    tasks = sign * (0.1 + torch.rand(4, 7, 5, generator=g))  # every task shares the column's sign, no zeros
    layer = _layer(tasks)
    torch.testing.assert_close(ties(layer, k=1.0, topk_scope="layer", merge_func="mean"), tasks.mean(0))
    torch.testing.assert_close(ties(layer, k=1.0, topk_scope="model", merge_func="sum"), tasks.sum(0))


def _reference_ties_flat(base, experts, k, merge_func):
    """Slow reference written from the official code: flatten each task vector over all keys, top-k per task with
    k_idx = d - int(d*K) and |x| >= kthvalue, sign = sign(sum) with zeros -> global majority, disjoint merge."""
    keys = [key for key in base if base[key].is_floating_point()]
    flat = torch.stack([torch.cat([(sd[key].float() - base[key].float()).reshape(-1) for key in keys])
                        for sd in experts.values()])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    merged = (trimmed * agree).sum(0)
    if merge_func == "mean":
        merged = merged / agree.sum(0).clamp(min=1)
    out, start = {}, 0
    for key in keys:
        n = base[key].numel()
        out[key] = merged[start:start + n].reshape(base[key].shape)
        start += n
    return out


def _heavy_tailed_pool(seed=0):
    """CLIP-shaped pool whose layers have very different delta scales (so a model-wide top-k is not per-layer)."""
    base = clip_like_state_dict(seed=seed)
    base["visual.num_batches_tracked"] = torch.tensor(3)  # a non-floating tensor must be left alone
    g = torch.Generator().manual_seed(seed + 1)
    scales = {key: 10.0 ** (i % 4 - 2) for i, key in enumerate(base)}
    experts = {}
    for t in range(3):
        sd = {}
        for key, v in base.items():
            if not v.is_floating_point():
                sd[key] = v.clone()
                continue
            sd[key] = v + scales[key] * torch.randn(v.shape, generator=g) * torch.rand(v.shape, generator=g) ** 3
        experts[f"task{t}"] = sd
    return base, experts


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_model_scope_matches_the_flattened_official_reference(merge_func):
    base, experts = _heavy_tailed_pool()
    merged = studio.merge(base, experts, "ties", device="cpu", k=0.2, topk_scope="model", merge_func=merge_func,
                          alpha=1.0)
    ref = _reference_ties_flat(base, experts, 0.2, merge_func)
    delta = _delta(merged, base)
    for key in ref:
        torch.testing.assert_close(delta[key], ref[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(merged["visual.num_batches_tracked"], base["visual.num_batches_tracked"])


@pytest.mark.parametrize("flip", [1.0, -1.0])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
def test_ties_exact_cancellations_take_the_model_wide_majority_sign(flip, merge_func):
    """The official code resolves a zero sign sum with the majority of the elected signs over the *whole* flattened
    model. Tensor "a" (votes +40) and "b" (votes -150) both hold exactly cancelling entries; the model majority is
    "b"'s, so "a"'s cancelled entries take the side opposite to its own majority (a per-tensor rule would not)."""
    a1 = torch.tensor([1.0] * 40 + [1.0] * 10)
    a2 = torch.tensor([1.0] * 40 + [-1.0] * 10)
    b1 = torch.tensor([-1.0] * 150 + [2.0] * 50)
    b2 = torch.tensor([-1.0] * 150 + [-2.0] * 50)
    base = {"a": torch.zeros(50), "b": torch.zeros(200)}
    experts = {"t1": {"a": flip * a1, "b": flip * b1}, "t2": {"a": flip * a2, "b": flip * b2}}
    merged = studio.merge(base, experts, "ties", k=1.0, topk_scope="model", merge_func=merge_func, alpha=1.0)
    ref = _reference_ties_flat(base, experts, 1.0 - 1e-9, merge_func)   # keeps every entry (rank 1)
    for key in base:
        assert torch.equal(merged[key], ref[key]), key
    assert merged["a"][45] == -flip * 1.0 and merged["b"][175] == -flip * 2.0
    # the tensor's own majority (topk_scope="layer", or the per-layer function on its own) gives "a" the other side
    own = studio.merge(base, experts, "ties", k=1.0, topk_scope="layer", merge_func=merge_func, alpha=1.0)
    assert own["a"][45] == flip * 1.0 and torch.equal(own["b"], merged["b"])


def test_ties_a_zero_majority_of_the_elected_signs_keeps_the_negative_values():
    """The official resolve_zero_signs(sign, "majority") with the elected signs summing to exactly 0 leaves a
    cancelled entry's sign 0, and where(sign > 0, x > 0, x < 0) then keeps its negative values. Entry 0 cancels
    (+1 - 1); the elected signs (0, +1, -1) sum to 0. Taking 0 as positive passed every other test, in both scopes."""
    base = {"a": torch.zeros(3)}
    experts = {"t1": {"a": torch.tensor([1.0, 1.0, -1.0])}, "t2": {"a": torch.tensor([-1.0, 1.0, -1.0])}}
    for scope in ("model", "layer"):
        out = studio.merge(base, experts, "ties", k=1.0, topk_scope=scope, merge_func="sum", alpha=1.0)["a"]
        assert out.tolist() == [-1.0, 2.0, -2.0], scope


def test_ties_model_and_layer_scope_differ_where_layer_scales_differ():
    base = {"big": torch.zeros(50), "small": torch.zeros(50)}
    g = torch.Generator().manual_seed(3)
    experts = {f"t{i}": {"big": 10 + torch.rand(50, generator=g), "small": 0.1 * torch.rand(50, generator=g)}
               for i in range(2)}
    pool = TaskPool(base, experts, device="cpu")
    small_model = ties(pool.layer("small"), k=0.4, topk_scope="model", merge_func="sum")
    small_layer = ties(pool.layer("small"), k=0.4, topk_scope="layer", merge_func="sum")
    # Model-wide, the top 40% of each task (41 of 100 entries) are all in "big" (|x| >= 10 > 0.1): "small" is trimmed.
    assert torch.count_nonzero(small_model) == 0
    # Per layer, each task keeps int(50*0.4)+1 = 21 entries of "small".
    assert torch.count_nonzero(small_layer) >= 21
    # ... and "big" keeps the 41 largest of each task (all positive, so the disjoint sum is their plain sum).
    big = torch.stack([experts[n]["big"] for n in experts])
    top41 = big * (big >= big.sort(dim=1, descending=True).values[:, 40:41])
    torch.testing.assert_close(ties(pool.layer("big"), k=0.4, topk_scope="model", merge_func="sum"), top41.sum(0))


@pytest.mark.parametrize("k", [0.01, 0.2, 0.5, 1.0])
def test_model_thresholds_equal_kthvalue_of_the_whole_flattened_model(k):
    """Thresholds over awkward data: exact zeros (frozen tensors), many exact ties, subnormals, a 0-d tensor,
    a non-floating tensor (excluded), and a float16 base."""
    g = torch.Generator().manual_seed(7)
    base = {"a": torch.randn(40, 7, generator=g), "zeros": torch.zeros(100), "ties": torch.zeros(257),
            "tiny": torch.zeros(5), "scalar": torch.tensor(0.5), "steps": torch.tensor(3),
            "half": torch.randn(2, 3, 4, generator=g).half()}
    experts = {}
    for t in range(3):
        experts[f"t{t}"] = {
            "a": base["a"] + 1e-3 * torch.randn(40, 7, generator=g), "zeros": base["zeros"].clone(),
            "ties": torch.randint(-3, 4, (257,), generator=g).float(), "tiny": torch.full((5,), 1e-40),
            "scalar": torch.tensor(0.5 + t), "steps": torch.tensor(3),
            "half": (base["half"].float() + 50 * torch.randn(2, 3, 4, generator=g)).half(),
        }
    keys = [key for key in base if base[key].is_floating_point()]
    flat = torch.stack([torch.cat([(sd[key].float() - base[key].float()).reshape(-1) for key in keys])
                        for sd in experts.values()]).abs()
    d = flat.shape[1]
    rank = d - int(d * k)
    expected = flat.kthvalue(rank, dim=1).values if rank > 0 else torch.zeros(3)
    got = model_thresholds(TaskPool(base, experts, device="cpu"), k)
    assert torch.equal(got, expected), (got, expected)
    # The counting path other devices take, in pieces smaller than some tensors and spanning several others.
    for chunk in (7, 100, 1 << 24):
        streamed = model_thresholds(TaskPool(base, experts, device="cpu"), k, streamed=True, chunk=chunk)
        assert torch.equal(streamed, expected), (chunk, streamed, expected)


@pytest.mark.parametrize("sizes", [[1], [5, 1, 300], [64] * 20])
def test_streamed_order_statistics_equal_sorting(sizes):
    g = torch.Generator().manual_seed(len(sizes))
    pieces = [torch.randint(0, 40, (n,), generator=g).float() * 1e-3 for n in sizes]
    pieces[0][0] = 0.0
    values = torch.cat(pieces)
    ranks = sorted({1, values.numel(), (values.numel() + 1) // 2, max(1, values.numel() - 3)})
    got, below = streamed_order_statistics(lambda: iter(pieces), ranks)
    ordered = values.sort().values
    assert got.tolist() == [ordered[r - 1].item() for r in ranks]
    assert below == [int((values < ordered[r - 1]).sum()) for r in ranks]
    with pytest.raises(ValueError, match="rank must be in"):
        streamed_order_statistics(lambda: iter(pieces), [values.numel() + 1])


@pytest.mark.parametrize("chunk", [7, 1 << 24])
def test_kth_smallest_equals_kthvalue_for_every_rank(chunk):
    g = torch.Generator().manual_seed(5)
    values = torch.cat([torch.zeros(30), torch.full((9,), 1e-40), torch.randint(0, 4, (40,), generator=g).float(),
                        torch.rand(50, generator=g) * 1e-3, torch.tensor([float("inf"), 3e38])])
    values = values[torch.randperm(values.numel(), generator=g)]
    for rank in range(1, values.numel() + 1):
        assert torch.equal(kth_smallest(values, rank, chunk=chunk), values.kthvalue(rank).values), rank
    with pytest.raises(ValueError, match="rank must be in"):
        kth_smallest(values, 0)


def test_ties_masks_ignore_preference_weights():
    """Preferences scale task i by p_i / max p; TIES must equal TIES on experts pre-scaled the same way."""
    base = clip_like_state_dict()
    experts = make_experts(base, 3)
    prefs = [0.5, 0.3, 0.2]
    scaled = {n: {k: base[k] + p / 0.5 * (sd[k] - base[k]) for k in base}
              for (n, sd), p in zip(experts.items(), prefs)}
    for scope in ("model", "layer"):
        a = studio.merge(base, experts, "ties", device="cpu", preferences=prefs, topk_scope=scope)
        b = studio.merge(base, scaled, "ties", device="cpu", topk_scope=scope)
        for key in base:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=f"{scope}: {key}")


def test_ties_model_thresholds_are_computed_once_per_pool_and_k():
    base = clip_like_state_dict()
    pool = TaskPool(base, make_experts(base, 3), device="cpu")
    for merge_func in ("sum", "mean"):
        studio.merge_pool(pool, "ties", k=0.2, merge_func=merge_func)
    studio.merge_pool(pool, "ties", k=0.3)
    tags = [tag for tag in pool._memo if isinstance(tag, tuple) and tag[0] == "ties.model_thresholds"]
    assert sorted(tags) == [("ties.model_thresholds", 0.2), ("ties.model_thresholds", 0.3)]


# ----------------------------------------------------------------------------------------------------------- DARE
def test_dare_with_p0_is_task_arithmetic():
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    a = studio.merge(base, experts, "dare", device="cpu", p=0.0, alpha=0.4, seed=5)
    b = studio.merge(base, experts, "task_arithmetic", device="cpu", alpha=0.4)
    for key in base:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_dare_ties_with_p0_is_ties_with_k1_dis_sum():
    layer = _layer(HAND_TASKS)
    torch.testing.assert_close(dare(layer, p=0.0, ties_consensus=True, seed=1),
                               ties(layer, k=1.0, topk_scope="layer", merge_func="sum"))


def test_dare_is_unbiased_over_200_fixed_seeds():
    """E[DARE] = Task Arithmetic (eq. 3). Entry-wise z-scores against the exact Bernoulli variance
    Var = sum_i x_i^2 * p/(1-p); the same check rejects the un-rescaled variant (mean (1-p)*TA) by a wide margin."""
    p, n_seeds = 0.8, 200
    g = torch.Generator().manual_seed(11)
    tasks = 1 + torch.rand(2, 64, generator=g)
    layer = _layer(tasks)
    draws = torch.stack([dare(layer, p=p, ties_consensus=False, seed=s) for s in range(n_seeds)])
    ta = tasks.sum(0)
    var = (tasks ** 2).sum(0) * p / (1 - p)
    se = (var / n_seeds).sqrt()
    z = (draws.mean(0) - ta) / se
    assert z.abs().max() < 5.0, z.abs().max()
    assert abs(float(z.mean())) < 5.0 / math.sqrt(z.numel())  # the average of 64 z-scores is ~N(0, 1/64)
    assert ((draws.mean(0) - (1 - p) * ta) / se).abs().min() > 5.0  # power: a missing 1/(1-p) would fail
    ratio = draws.var(0) / var
    assert 0.8 < float(ratio.mean()) < 1.25, float(ratio.mean())


@pytest.mark.parametrize("shape", [(), (5,), (3, 7), (300, 700), (40, 3, 32, 32)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dare_cpu_pieces_draw_the_masks_of_one_draw_per_task(shape, weighted, dtype):
    """The CPU path works task by task on 64K-value pieces (300 x 700 and the conv kernel span several); its
    masks must be, to the bit, one ``random_drop`` over each task vector from the task's own generator
    (``key_seed(seed, name)``), as the path for CUDA and DARE-TIES draws them, and its half-precision task values
    those of the stack (float32 of each, then the difference)."""
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.randn(shape, generator=g).to(dtype)}
    experts = {f"t{i}": {"w": (base["w"].float() + torch.randn(shape, generator=g)).to(dtype)} for i in range(3)}
    weights = torch.tensor([0.5, 2.0, 1.25]) if weighted else None
    layer = TaskPool(base, experts, device="cpu").layer("w", weights)
    rows = [random_drop(d, 0.7, torch.Generator().manual_seed(key_seed(11, name)))
            for d, name in zip(layer.deltas.clone(), experts)]
    expected = rows[0]
    for row in rows[1:]:
        expected = expected + row   # in task order, as the path sums
    layer = TaskPool(base, experts, device="cpu").layer("w", weights)   # no stack built: the piecewise path
    assert torch.equal(dare(layer, 0.7, False, seed=11), expected)


def test_dare_masks_do_not_depend_on_the_order_or_on_the_other_experts():
    """Each task draws its mask from its own stream (the merge seed, the layer and the expert's name): the experts
    in another order merge the same, and merging two experts adds exactly what each merged alone adds (mutant: one
    stream in the experts' order, as before 0.2.2). The CPU path and DARE-TIES's path draw the same masks."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(30, 20, generator=g)}
    experts = {n: {"w": base["w"] + torch.randn(30, 20, generator=g)} for n in ("cars", "dtd", "svhn")}
    kw = dict(p=0.6, alpha=1.0, seed=4, device="cpu")
    merged = {order: studio.merge(base, {n: experts[n] for n in order}, "dare", **kw)["w"] - base["w"]
              for order in (("cars", "dtd", "svhn"), ("svhn", "cars", "dtd"), ("cars",), ("dtd",), ("svhn",))}
    torch.testing.assert_close(merged["svhn", "cars", "dtd"], merged["cars", "dtd", "svhn"], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged["cars", "dtd", "svhn"], merged["cars",] + merged["dtd",] + merged["svhn",],
                               rtol=0, atol=1e-5)
    layer = TaskPool(base, experts, device="cpu").layer("w")
    one_sign = torch.ones(3, 30, 20)   # equal signs: DARE-TIES's disjoint sum is the plain sum of the dropped tasks
    signed = TaskPool(base, {n: {"w": base["w"] + s * experts[n]["w"].sub(base["w"]).abs()} for n, s in
                             zip(experts, one_sign)}, device="cpu").layer("w")
    torch.testing.assert_close(dare(signed, 0.6, True, seed=4), dare(signed, 0.6, False, seed=4), rtol=0, atol=1e-6)
    assert not torch.equal(dare(layer, 0.6, False, seed=4), dare(layer, 0.6, False, seed=5))


def test_random_drop_rate_and_values():
    g = torch.Generator().manual_seed(0)
    x = torch.full((4, 10_000), 2.0)
    y = random_drop(x, 0.8, g)
    assert set(torch.unique(y).tolist()) == {0.0, 10.0}
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.8) < 5 * math.sqrt(0.8 * 0.2 / x.numel())


def test_dare_is_deterministic_per_seed_and_differs_across_seeds():
    base = clip_like_state_dict()
    experts = make_experts(base, 3)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    a = studio.merge(base, experts, "dare", device="cpu", seed=1)
    studio.engine._POOLS.clear()
    b = studio.merge(base, experts, "dare", device="cpu", seed=1)
    c = studio.merge(base, experts, "dare", device="cpu", seed=2)
    for k in base:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a[key], c[key])
    # different layers draw different masks from the same merge seed
    la, lb = _layer(torch.ones(2, 100)), _layer(torch.ones(2, 100))
    assert torch.equal(dare(la, 0.5, False, seed=3), dare(lb, 0.5, False, seed=3))
    assert not torch.equal(dare(la, 0.5, False, seed=3), dare(la, 0.5, False, seed=4))


# ---------------------------------------------------------------------------------------------------- Breadcrumbs
def test_breadcrumbs_keeps_exactly_the_band():
    # magnitudes ascending: 0.2, 0.5, 1, 2, 3, 4, 5, 6, 7, 10 -> gamma=0.3 masks 0.2, 0.5, 1; beta=0.1 masks 10
    t1 = [1.0, -10.0, 3.0, 0.2, -5.0, 7.0, 0.5, 2.0, -4.0, 6.0]
    # magnitudes ascending: 0, 0.1, 0.3, 1, 1.5, 2, 8, 9, 20, 40 -> masks 0, 0.1, 0.3 and 40
    t2 = [9.0, 0.0, -0.3, 1.5, 40.0, -2.0, 0.1, -8.0, 20.0, 1.0]
    keep1 = [0, 0, 1, 0, 1, 1, 0, 1, 1, 1]
    keep2 = [1, 0, 0, 1, 0, 1, 0, 1, 1, 1]
    mask = band_mask(torch.tensor([t1, t2]), beta=0.1, gamma=0.3)
    assert mask.int().tolist() == [keep1, keep2]
    expected = [a * m + b * n for a, m, b, n in zip(t1, keep1, t2, keep2)]
    assert breadcrumbs(_layer([t1, t2]), beta=0.1, gamma=0.3).tolist() == expected


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_breadcrumbs_band_size_is_exact_with_ties(scope):
    """Counts as the official code and mergekit: int(d * beta) removed at the top, int(d * (1 - beta - gamma))
    kept, whatever the ties; per row of the last dimension (official) or per tensor."""
    x = torch.randint(-2, 3, (3, 7, 11), generator=torch.Generator().manual_seed(0)).float()
    mask = band_mask(x, beta=0.05, gamma=0.6, scope=scope)
    if scope == "row":
        assert mask.sum(-1).flatten().tolist() == [int(11 * 0.35)] * 21           # 3 of each row of 11
    else:
        assert mask.reshape(3, -1).sum(1).tolist() == [int(77 * 0.35)] * 3       # 26 of 77


def test_band_counts_follow_the_official_keep_fraction():
    # official top_k_keep = 1 - beta - gamma, counted as int(d * keep) even where the float sum is just below
    assert band_counts(100, 0.01, 0.85) == (1, 100 - 1 - 14)
    assert band_counts(100, 0.006, 0.844) == (0, 100 - 15)   # keep 0.15: 1 - 0.006 - 0.844 = 0.15000000000000002
    assert band_counts(10, 0.1, 0.7) == (1, 10 - 1 - 2)       # keep 0.2: 1 - 0.1 - 0.7 = 0.20000000000000004
    assert band_counts(5, 0.01, 0.85) == (0, 5)               # int(0.7) = 0: the whole row is masked, as officially
    # the product is truncated like the official int(d * top_k_keep): 100 * 0.29 = 28.999999999999996 -> 28
    assert band_counts(100, 0.01, 0.7) == (1, 100 - 1 - 28)
    assert band_counts(300, 0.01, 0.3) == (3, 300 - 3 - 206)   # int(300 * 0.69) = 206
    with pytest.raises(HyperparameterError, match=r"beta=0\.5.*gamma=0\.5"):
        band_counts(10, 0.5, 0.5)


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("beta,gamma", [(0.0, 0.5), (0.05, 0.6), (0.2, 0.0), (0.01, 0.85)])
def test_band_mask_matches_a_stable_argsort_reference(beta, gamma, scope):
    """The O(d) kthvalue path against the obvious O(d log d) one: rank by (magnitude, position), keep the band."""
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randint(-3, 4, (3, 4, 150), generator=g).float(), torch.randn(3, 4, 90, generator=g)], 2)
    flat = x.abs().reshape(-1, 240) if scope == "row" else x.abs().reshape(3, -1)
    n, d = flat.shape
    ranks = torch.empty_like(flat, dtype=torch.long)
    ranks.scatter_(1, flat.argsort(dim=1, stable=True), torch.arange(d).expand(n, d))
    keep = int(d * round(1 - beta - gamma, 9))
    expected = (ranks >= d - int(beta * d) - keep) & (ranks < d - int(beta * d))
    assert torch.equal(band_mask(x, beta, gamma, scope=scope), expected.reshape(x.shape))
    if scope == "row":   # the fast row path (NumPy introselect on the CPU, kthvalue elsewhere) gives the same mask
        n_top, n_bottom = band_counts(d, beta, gamma)
        for numpy in (True, False):
            got = row_band_mask(x.abs().reshape(-1, d), n_top, n_bottom, numpy=numpy)
            assert torch.equal(got, expected.float()), numpy


def _breadcrumbs_pool(seed=0):
    """Tie-free float64-exact deltas on CLIP-like tensors: 2-D weights with uneven row scales (as real deltas), a
    4-D conv kernel, 1-D and 0-d tensors."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (40, 64), "conv": (6, 3, 8, 16), "b": (64,), "scale": ()}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = {}
    for t in range(3):
        experts[f"t{t}"] = {}
        for k, s in shapes.items():
            rows = torch.rand(s[:1] + (1,) * (len(s) - 1), generator=g) * 5 if len(s) > 1 else 1.0
            experts[f"t{t}"][k] = base[k] + torch.randn(s, generator=g) * rows
    return base, experts


@pytest.mark.parametrize("keep,remove", [(0.14, 0.01), (0.2, 0.1), (0.15, 0.006), (0.5, 0.0)])
def test_breadcrumbs_matches_the_official_middle_keep_loop(keep, remove):
    """studio.merge against the official TaskVectorMiddleKeep loop (per row of the last dimension, topk remove then
    topk keep), with the official hyperparameters mapped to beta = remove, gamma = 1 - keep - remove."""
    base, experts = _breadcrumbs_pool()
    merged = studio.merge(base, experts, "breadcrumbs", device="cpu", beta=remove, gamma=1 - keep - remove, alpha=0.4)
    ref = breadcrumbs_reference(task_vectors_of(base, experts), top_k_keep=keep, top_k_remove=remove)
    for key, b in base.items():
        torch.testing.assert_close(merged[key].double() - b.double(), 0.4 * ref[key], rtol=1e-6, atol=1e-6)
    # the whole-tensor ranking of the paper's text is a different mask on weights whose rows differ in scale
    layer_scope = studio.merge(base, experts, "breadcrumbs", device="cpu", beta=remove, gamma=1 - keep - remove,
                               alpha=0.4, scope="layer")
    assert not torch.allclose(layer_scope["w"], merged["w"])
    torch.testing.assert_close(layer_scope["b"], merged["b"])      # a 1-D tensor is one row


def test_breadcrumbs_matches_the_official_loop_on_ties_when_it_ranks_them_by_position():
    """Deltas on a coarse grid (every row has many exact ties, some on the cuts): the official loop's topk orders
    them arbitrarily, and with ties_by_position it ranks them as studio.merge does, so the two agree on every entry;
    the bench's parity line uses it (float32 checkpoints' deltas have ties)."""
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.zeros(30, 64), "b": torch.zeros(64)}
    experts = {f"t{t}": {k: torch.randint(-6, 7, v.shape, generator=g).float() / 8 for k, v in base.items()}
               for t in range(3)}
    tvs = task_vectors_of(base, experts)
    on_a_cut = 0
    for tv in tvs:   # the grid puts ties on the cuts (int(64 * 0.1) = 6 removed, int(64 * 0.3) = 19 kept)
        top = tv["w"].abs().sort(dim=-1, descending=True).values
        on_a_cut += int(((top[:, 5] == top[:, 6]) | (top[:, 24] == top[:, 25])).sum())
    assert on_a_cut > 10
    merged = studio.merge(base, experts, "breadcrumbs", device="cpu", beta=0.1, gamma=0.6, alpha=1.0)
    ref = breadcrumbs_reference(tvs, top_k_keep=0.3, top_k_remove=0.1, ties_by_position=True)
    for key in base:
        torch.testing.assert_close(merged[key].double(), ref[key], rtol=0, atol=0)


def test_breadcrumbs_rejects_a_band_that_masks_everything():
    base = clip_like_state_dict()
    with pytest.raises(HyperparameterError, match=r"beta=0\.3.*gamma=0\.7"):
        studio.merge(base, make_experts(base, 2), "breadcrumbs", beta=0.3, gamma=0.7)
    # beta + gamma < 1, but the kept fraction truncates to no entry of any row (tensor): every masked tensor
    # merged to the base (a helper's edge audit); the suggested gamma keeps one entry of the longest
    longest_row = max(t.shape[-1] for t in base.values() if t.ndim)
    gamma = 0.7 - 0.5 / longest_row
    message = rf"keep int\(d \* \(1 - beta - gamma\)\) = 0 entries of every row \(d = {longest_row} at the most"
    with pytest.raises(HyperparameterError, match=message + r", scope='row'\).*gamma <= ") as caught:
        studio.merge(base, make_experts(base, 2), "breadcrumbs", beta=0.3, gamma=gamma)
    suggested = float(str(caught.value).split("gamma <= ")[1].split(" ")[0])
    merged = studio.merge(base, make_experts(base, 2), "breadcrumbs", beta=0.3, gamma=suggested)
    assert any(not torch.equal(merged[k], base[k]) for k in base if base[k].ndim)
    numel = max(t.numel() for t in base.values())
    with pytest.raises(HyperparameterError, match=r"entries of every tensor .*scope='layer'"):
        studio.merge(base, make_experts(base, 2), "breadcrumbs", beta=0.3, gamma=0.7 - 0.5 / numel, scope="layer")


# ------------------------------------------------------------------------------------------------------ end to end
CONFIGS = [
    ("ties", {}), ("ties", {"topk_scope": "layer", "merge_func": "mean"}),
    ("dare", {}), ("dare", {"ties_consensus": True}),
    ("breadcrumbs", {}), ("breadcrumbs", {"scope": "layer"}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("method,hp", CONFIGS)
def test_merge_end_to_end_keeps_keys_shapes_dtypes(method, hp, dtype):
    base = clip_like_state_dict(dtype=dtype)
    base["visual.num_batches_tracked"] = torch.tensor(7)
    experts = make_experts({k: v for k, v in base.items() if v.is_floating_point()}, 3)
    for sd in experts.values():
        sd["visual.num_batches_tracked"] = torch.tensor(7)
    merged = studio.merge(base, experts, method, device="cpu", **hp)
    assert list(merged) == list(base)
    for key, v in base.items():
        assert merged[key].shape == v.shape and merged[key].dtype == v.dtype, key
        assert torch.isfinite(merged[key].float()).all(), key
    moved = [key for key in base if not torch.equal(merged[key], base[key])]
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" in moved
    assert "visual.num_batches_tracked" not in moved


@pytest.mark.parametrize("method,hp,pattern", [
    ("ties", {"k": 1.5}, r"'k' = 1\.5 is outside the allowed range \[0\.01, 1\]"),
    ("ties", {"k": 0.0}, r"'k' = 0\.0 is outside the allowed range \[0\.01, 1\]"),
    ("ties", {"topk_scope": "global"}, r"'topk_scope' = 'global'.*\['model', 'layer'\]"),
    ("ties", {"merge_func": "max"}, r"'merge_func' = 'max'.*\['sum', 'mean'\]"),
    ("dare", {"p": 1.0}, r"'p' = 1\.0 is outside the allowed range \[0, 0\.99\]"),
    ("dare", {"ties_consensus": 1}, r"'ties_consensus' must be true or false"),
    ("breadcrumbs", {"beta": -0.1}, r"'beta' = -0\.1 is outside the allowed range \[0, 0\.5\]"),
    ("breadcrumbs", {"gamma": 1.0}, r"'gamma' = 1\.0 is outside the allowed range \[0, 0\.99\]"),
    ("dare", {"alpha": 9.0}, r"'alpha' = 9\.0 is outside the allowed range \[0, 5\]"),
    ("ortho_merge", {"k": float("inf")}, r"'k' must be finite \(int in \[1, 512\]\), got inf"),
    ("ortho_merge", {"k": float("nan")}, r"'k' must be finite \(int in \[1, 512\]\), got nan"),
    ("task_arithmetic", {"alpha": np.True_}, r"'alpha' must be a number \(float in \[0, 5\]\), got True"),
    ("dare", {"seed": 1.7}, r"seed must be an integer .*got 1\.7"),
    ("dare", {"seed": None}, r"seed must be an integer .*got None"),
    ("dare", {"seed": 2**64}, r"seed must be an integer in \[-2\^63, 2\^63\)"),   # recipes and the API carry it
])
def test_out_of_range_hyperparameters_name_value_and_range(method, hp, pattern):
    base = clip_like_state_dict()
    with pytest.raises(HyperparameterError, match=pattern):
        studio.merge(base, make_experts(base, 2), method, **hp)


def test_numpy_and_tensor_scalars_are_accepted_where_they_mean_the_same_value():
    base = clip_like_state_dict()
    experts = make_experts(base, 2)
    a = studio.merge(base, experts, "dare", ties_consensus=np.True_, seed=np.int64(3))
    b = studio.merge(base, experts, "dare", ties_consensus=True, seed=3)
    c = studio.merge(base, experts, "dare", ties_consensus=True, seed=torch.tensor(3))
    d = studio.merge(base, experts, "dare", ties_consensus=True, seed=3.0)   # as the app's number box sends it
    e = studio.merge(base, experts, "dare", ties_consensus=True, seed=np.float32(3.0))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) and torch.equal(a[k], d[k])
               and torch.equal(a[k], e[k]) for k in base)


def test_a_bound_given_in_single_precision_is_the_bound():
    """np.float32(0.99) is 0.99000000953...: it was refused as outside [0, 0.99]. A value that rounds to a bound in
    its own precision is that bound; one that does not is still refused."""
    base = clip_like_state_dict()
    experts = make_experts(base, 2)
    for method, hp, value in [("dare", "p", 0.99), ("ties", "k", 0.01)]:
        want = studio.merge(base, experts, method, **{hp: value})
        for given in (np.float32(value), torch.tensor(value), torch.tensor(value, dtype=torch.bfloat16)):
            got = studio.merge(base, experts, method, **{hp: given})
            assert all(torch.equal(want[k], got[k]) for k in base), (method, given)
    want, got = (studio.merge(base, experts, "task_arithmetic", calibrate="svc", calibrate_hparams={"alpha": a})
                 for a in (1e-4, np.float32(1e-4)))
    assert all(torch.equal(want[k], got[k]) for k in base)
    with pytest.raises(HyperparameterError, match=r"'p' = 0\.99500000476\d* is outside the allowed range"):
        studio.merge(base, experts, "dare", p=np.float32(0.995))


@pytest.mark.parametrize("kwargs,pattern", [
    ({"method": ["ties"]}, r"unknown merging method \['ties'\]; known methods"),
    ({"calibrate": ["svc"]}, r"unknown calibration \['svc'\]; known calibrations"),
    ({"calibrate": {"svc": 1}}, r"unknown calibration \{'svc': 1\}"),
    ({"svd_mode": ["auto"]}, r"svd_mode must be 'auto' or 'exact', got \['auto'\]"),
    ({"calibrate": "svc", "calibrate_hparams": [1]}, r"svc: hyperparameters must be a mapping .* got \[1\]"),
    ({"x" * 300: 1}, r"unknown hyperparameter\(s\) \['x{27}\.\.\.x{28}'\]; ties accepts"),
    ({"k": "x" * 10**6}, r"'k' must be a number \(float in \[0\.01, 1\]\), got 'x{27}\.\.\.x{28}'$"),
    ({"method": "x" * 10**6}, r"unknown merging method 'x{27}\.\.\.x{28}'; known"),
    ({"layer_rule": list(range(100))}, r"unknown layer rule \[0, 1, 2, 3, 4, 5, \.\.\.\];"),
    ({"preferences": "y" * 10**6}, r"preferences must be a mapping .* got 'y{27}\.\.\.y{28}'$"),
    ({"k": torch.ones(3, 3)}, r"'k' must be a number .* got tensor\(\[\[1\., 1\., 1\.\], "),   # on one line
    ({"seed": np.float32(2.5)}, r"seed must be an integer .* got (np\.float32\()?2\.5\)?$"),
    ({"device": "meta"}, r"device 'meta' is not supported; expected 'cpu', 'cuda'"),
    ({"device": "mps"}, r"device 'mps' is not supported"),
    ({"alpha": 10**400}, r"'alpha' must be finite"),
    ({"preferences": [10**400, 1]}, r"preference for task 'task0' is 1000.*; expected a finite number >= 0"),
    ({"progress": 5}, r"merge: progress must be a function taking \(fraction, message\), or None; got 5"),
    ({"progress": lambda: None}, r"merge: progress must be a function taking \(fraction, message\)"),
    ({"layer_rule": {"exclude": ["(" * 100000]}}, r"is not a regular expression"),
])
def test_wrongly_typed_or_huge_arguments_are_short_studio_errors(kwargs, pattern):
    """A list where a name belongs raised Python's "unhashable type"; a mistaken megabyte of text was echoed whole."""
    base = clip_like_state_dict()
    kwargs = dict(kwargs)
    with pytest.raises(StudioError, match=pattern) as err:
        studio.merge(base, make_experts(base, 2), kwargs.pop("method", "ties"), **kwargs)
    assert len(str(err.value)) < 300 and "\n" not in str(err.value)


# ------------------------------------------------------------------------------- streamed kernels vs whole tensors
def _quantized_pool(T=5, shape=(300, 70), seed=0):
    """Deltas that are integer multiples of 1e-6 in [-5e-6, 5e-6]: exact magnitude ties straddle every cut, as
    in real checkpoints (differences of floats are multiples of the base's rounding unit)."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(*shape, generator=g) * 0.02}
    experts = {f"t{i}": {"w": base["w"] + 1e-6 * torch.randint(-5, 6, shape, generator=g).float()} for i in range(T)}
    return TaskPool(base, experts, device="cpu")


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 0.0, 1.5]])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("scope", ["layer", "model"])
def test_streamed_ties_equals_the_whole_tensor_pipeline(weights, merge_func, scope):
    """ties() streams cache-sized blocks (ties_blocks); the reference is trim -> elect -> disjoint merge on the
    whole [T, *shape] stack. The layer (21000 entries) spans two blocks."""
    pool = _quantized_pool()
    layer = pool.layer("w", None if weights is None else torch.tensor(weights))
    raw = pool.raw_deltas("w")
    flat = raw.reshape(raw.shape[0], -1).abs()   # the pool's only tensor: the model is this layer
    model_cut = flat.kthvalue(flat.shape[1] - int(flat.shape[1] * 0.2), dim=1).values   # not model_thresholds
    mask = magnitude_mask(raw, 0.2) if scope == "layer" else raw.abs() >= model_cut.view(-1, 1, 1)
    trimmed = layer.deltas * mask
    expected = disjoint_merge(trimmed, elect_sign(trimmed), merge_func)
    assert torch.equal(ties(layer, k=0.2, topk_scope=scope, merge_func=merge_func), expected)


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_ties_blocks_does_not_depend_on_the_block_size(chunk):
    layer = _quantized_pool(T=3, shape=(40, 9), seed=2).layer("w")
    t = torch.tensor([2e-6, 3e-6, 0.0])
    got = ties_blocks(layer.raw_chunks(chunk=chunk), 360, t, aggregate="mean")
    raw = layer.pool.raw_deltas("w").reshape(3, -1)
    trimmed = raw * (raw.abs() >= t.view(-1, 1))
    assert torch.equal(got, disjoint_merge(trimmed, elect_sign(trimmed), "mean"))


@pytest.mark.parametrize("flip", [1.0, -1.0])
@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_ties_blocks_gives_exact_cancellations_the_majority_sign(flip, merge_func, chunk):
    """Entries whose surviving values cancel exactly (P = -N != 0) take the tensor's majority sign, known only after
    the last block: +1 here (two positive sums against none), -1 for the negated tensor."""
    x = flip * torch.tensor([[2.0, -1.0, 1.0, 3.0, 4.0, -0.5, 0.0, 1.0],
                             [-2.0, 1.0, 0.5, 1.0, -1.0, 0.25, 0.0, -1.0],
                             [0.0, 0.0, 0.0, 0.0, -3.0, 0.25, 0.0, 0.0]])
    blocks = [(i, min(8, i + chunk), x[:, i:i + chunk].clone()) for i in range(0, 8, chunk)]
    got = ties_blocks(blocks, 8, torch.zeros(3), aggregate=merge_func)
    expected = disjoint_merge(x, elect_sign(x), merge_func)
    assert torch.equal(got, expected)
    assert got[0] == flip * 2.0 and got[1] == flip * 1.0   # cancelled columns took the majority's side


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 0.0, 1.5]])
@pytest.mark.parametrize("beta,gamma", [(0.01, 0.85), (0.1, 0.3), (0.0, 0.5), (0.2, 0.0), (0.0, 0.0)])
def test_streamed_breadcrumbs_equals_band_mask_with_straddling_ties(weights, beta, gamma):
    """breadcrumbs(scope="layer") finds each task's band by selection and fixes the ties at the cuts by position;
    the reference is band_mask (a stable-argsort-equivalent ranking) on the whole stack."""
    pool = _quantized_pool()
    layer = pool.layer("w", None if weights is None else torch.tensor(weights))
    mags = pool.raw_deltas("w")[0].abs().flatten()
    lo, hi, lo_ties, hi_ties = band_thresholds(mags, beta, gamma)
    if gamma > 0:
        assert lo_ties > 0 and lo_ties < int((mags == lo).sum())      # the case under test: a tie straddles the cut
    expected = (layer.deltas * band_mask(pool.raw_deltas("w"), beta, gamma, scope="layer")).sum(0)
    torch.testing.assert_close(breadcrumbs(layer, beta, gamma, scope="layer"), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 2.0, 0.0, 1.5]])
@pytest.mark.parametrize("beta,gamma", [(0.01, 0.85), (0.1, 0.3), (0.0, 0.5), (0.2, 0.0), (0.0, 0.0)])
def test_row_breadcrumbs_equals_band_mask_with_straddling_ties(weights, beta, gamma):
    """breadcrumbs(scope="row") ranks each row by selection in blocks of whole rows (here 748 of the 1200 rows of
    70, so two blocks) and fixes ties straddling a cut row by row; the reference ranks every row of the whole
    stack by a stable argsort (magnitude, then position)."""
    pool = _quantized_pool(shape=(1200, 70))
    layer = pool.layer("w", None if weights is None else torch.tensor(weights))
    raw = pool.raw_deltas("w")
    n_top, n_bottom = band_counts(70, beta, gamma)
    if n_bottom > 0:   # the case under test: in most rows a tie straddles the bottom cut
        mags = raw[0].abs()
        lo = mags.kthvalue(n_bottom + 1, dim=1, keepdim=True).values
        assert float(((mags < lo).sum(1) < n_bottom).float().mean()) > 0.5
    flat = raw.abs().reshape(-1, 70)
    ranks = torch.empty_like(flat, dtype=torch.long)
    ranks.scatter_(1, flat.argsort(dim=1, stable=True), torch.arange(70).expand_as(flat))
    keep = (ranks >= n_bottom) & (ranks < 70 - n_top)
    expected = (layer.deltas * keep.reshape(raw.shape)).sum(0)
    torch.testing.assert_close(breadcrumbs(layer, beta, gamma), expected, rtol=0, atol=1e-12)


def test_order_statistics_equal_sorting():
    g = torch.Generator().manual_seed(3)
    values = torch.randint(0, 50, (5000,), generator=g).float() * 1e-3
    ranks = [1, 17, 2500, 4999, 5000]
    got, below = order_statistics(values, ranks, chunk=999)
    ordered = values.sort().values
    assert got.tolist() == [ordered[r - 1].item() for r in ranks]
    assert below == [int((values < ordered[r - 1]).sum()) for r in ranks]


def test_layer_rules_and_pools_of_the_wrong_type_are_studio_errors():
    from studio.layers import LayerRule

    with pytest.raises(StudioError, match=r"a layer rule's name must be text, got \[1\]"):
        LayerRule(name=[1])
    with pytest.raises(StudioError, match="merge_pool needs a TaskPool"):
        studio.merge_pool({"w": torch.zeros(2)}, "ties")


def test_dare_cpu_path_keeps_an_entry_drawn_exactly_at_p():
    """m ~ Bernoulli(1 - p) means keep where u >= p (random_drop's rule), so P(keep) = 1 - p exactly on the float32
    grid of the draws. With p set to a value the generator draws, one entry sits exactly on the cut: the CPU
    path must keep it as the stacked draw does (u > p differs on ~1 entry in 2^24 otherwise, which no random test
    reaches)."""
    g = torch.Generator().manual_seed(7)
    base = {"w": torch.zeros(40, 30)}
    experts = {f"t{i}": {"w": torch.randn(40, 30, generator=g)} for i in range(3)}
    draws = torch.rand(40, 30, generator=torch.Generator().manual_seed(key_seed(11, "t0")))   # task t0's mask
    p = float(draws.flatten()[(draws.flatten() < 0.9).nonzero()[5]])   # an exactly drawn value
    layer = TaskPool(base, experts, device="cpu").layer("w")
    rows = [random_drop(d, p, torch.Generator().manual_seed(key_seed(11, name)))
            for d, name in zip(layer.deltas.clone(), experts)]
    expected = rows[0] + rows[1] + rows[2]
    layer = TaskPool(base, experts, device="cpu").layer("w")
    assert torch.equal(dare(layer, p, False, seed=11), expected)
