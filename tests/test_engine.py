"""Engine behaviour: validation errors, caching, preferences, layer rules, dtype and device handling."""

from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest
import torch

import studio
from studio import linalg
from studio.pool import TaskPool

from .conftest import clip_like_state_dict, make_experts


def test_ta_with_alpha_one_over_t_equals_weight_average(clip_pool):
    base, experts = clip_pool
    ta = studio.merge(base, experts, "task_arithmetic", alpha=1 / len(experts))
    wa = studio.merge(base, experts, "weight_average")
    for k in base:
        torch.testing.assert_close(ta[k], wa[k])


def test_weight_average_is_the_mean_of_the_expert_weights(clip_pool):
    base, experts = clip_pool   # independent of the task-matrix sum both merges above are computed from
    wa = studio.merge(base, experts, "weight_average")
    for k, b in base.items():
        if b.is_floating_point():
            mean = torch.stack([e[k].double() for e in experts.values()]).mean(0)
            torch.testing.assert_close(wa[k].double(), mean, rtol=1e-5, atol=1e-6)


def test_layer_sum_uncached_is_fresh_and_leaves_the_memoised_sum_alone(clip_pool):
    base, experts = clip_pool
    key = next(k for k, v in base.items() if v.dim() == 2)
    layer = TaskPool(base, experts).layer(key)
    a, b = layer.sum(cache=False), layer.sum(cache=False)
    assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
    cached = layer.sum()
    assert layer.sum() is cached and torch.equal(a, cached)
    a.zero_()   # the caller owns it
    assert torch.equal(layer.sum(), b)


def test_mismatched_keys_and_shapes_name_the_expert_and_key(clip_pool):
    base, experts = clip_pool
    bad = dict(experts)
    bad["task1"] = {k: v for k, v in experts["task1"].items() if k != "visual.proj"}
    with pytest.raises(studio.ExpertError, match=r"task1.*missing.*visual\.proj"):
        studio.merge(base, bad, "task_arithmetic")
    bad["task1"] = dict(experts["task1"], **{"visual.proj": torch.zeros(3, 3)})
    with pytest.raises(studio.ExpertError, match=r"task1.*visual\.proj.*shape"):
        studio.merge(base, bad, "task_arithmetic")
    bad["task1"] = dict(experts["task1"], extra_key=torch.zeros(1))
    with pytest.raises(studio.ExpertError, match=r"task1.*extra_key"):
        studio.merge(base, bad, "task_arithmetic")
    # a key that every expert lacks, or has, is the base's difference (a first user's audit: it was blamed on the
    # first expert), e.g. a whole model's checkpoint as the base beside vision-tower experts
    with pytest.raises(studio.ExpertError, match=rf"the base has 1 key\(s\) that none of the {len(experts)} experts "
                                                 r"has, e.g. \['logit_scale'\].*prefix"):
        studio.merge(dict(base, logit_scale=torch.ones(())), experts, "task_arithmetic")
    with pytest.raises(studio.ExpertError, match=rf"all {len(experts)} experts have 1 key\(s\) that the base lacks, "
                                                 r"e.g. \['visual.proj'\]"):
        studio.merge({k: v for k, v in base.items() if k != "visual.proj"}, experts, "task_arithmetic")


def test_merge_pool_names_the_options_that_belong_to_the_pool(clip_pool):
    """merge_pool(pool, method, svd_mode=...) blamed the method for an unknown hyperparameter (a first user's
    audit): device and svd_mode are fixed when the pool is built."""
    pool = TaskPool(*clip_pool, device="cpu")
    for kw, named in (({"svd_mode": "exact"}, "svd_mode is"), ({"device": "cpu", "svd_mode": "auto"},
                                                               "device and svd_mode are")):
        with pytest.raises(studio.StudioError, match=rf"merge_pool: {named} the pool's \(this one: device 'cpu', "
                                                     r"svd_mode 'auto'\).*studio.get_pool"):
            studio.merge_pool(pool, "tsv_m", **kw)


def test_non_tensor_and_non_float_values_name_the_expert_and_key(clip_pool):
    # A list where a tensor belongs used to reach the pool cache's fingerprint and fail there with an AttributeError;
    # an integer tensor where the base is floating was merged as if it were a float task vector.
    base, experts = clip_pool
    bad = dict(experts, task1=dict(experts["task1"], **{"visual.proj": [[0.0]]}))
    with pytest.raises(studio.ExpertError, match=r"task1.*visual\.proj.*torch\.Tensor.*list"):
        studio.merge(base, bad, "task_arithmetic")
    proj = experts["task1"]["visual.proj"]
    bad["task1"] = dict(experts["task1"], **{"visual.proj": proj.round().to(torch.int64)})
    with pytest.raises(studio.ExpertError, match=r"task1.*visual\.proj.*int64.*float32.*floating-point"):
        studio.merge(base, bad, "ties")
    bad["task1"] = dict(experts["task1"], **{"visual.proj": proj.to(torch.bfloat16)})   # another float dtype is fine
    assert studio.merge(base, bad, "ties")["visual.proj"].dtype == base["visual.proj"].dtype


def test_non_finite_values_are_rejected(clip_pool):
    base, experts = clip_pool
    bad = dict(experts)
    t = experts["task2"]["visual.ln_pre.bias"].clone()
    t[0] = float("nan")
    bad["task2"] = dict(experts["task2"], **{"visual.ln_pre.bias": t})
    with pytest.raises(studio.ExpertError, match=r"task2.*ln_pre\.bias.*NaN"):
        studio.merge(base, bad, "weight_average")


def test_finite_weights_whose_task_vector_leaves_float32_are_refused_by_every_method():
    """expert 3e38 over a base of -3e38 is finite, but its task vector is not in float32 (and a float64 expert of
    1e300 rounds to an infinite float32 delta): Breadcrumbs dropped the infinity as an outlier and returned a merge,
    the other methods failed later in LAPACK or on the merged delta."""
    base = {"w": torch.full((4, 4), -3e38), "b": torch.zeros(4)}
    experts = {"a": {"w": torch.full((4, 4), 3e38), "b": torch.ones(4)},
               "c": {"w": torch.zeros(4, 4), "b": torch.ones(4)}}
    for method in [m for m in studio.list_methods() if m["kind"] == "merge"]:
        with pytest.raises(studio.ExpertError, match=r"expert 'a', key 'w': expert - base reaches 6e\+38, beyond "
                                                     r"float32's range"):
            studio.merge(base, experts, method["name"])
    wide = {"w": torch.full((2, 2), 1e300, dtype=torch.float64)}
    with pytest.raises(studio.ExpertError, match=r"expert 'x', key 'w': expert - base reaches 1e\+300"):
        studio.merge({"w": torch.zeros(2, 2, dtype=torch.float64)}, {"x": wide, "y": wide}, "breadcrumbs")
    # the bound from the tensors' ranges is loose here (3e38 - -1e38), the task vectors themselves fit: merged
    base = {"w": torch.tensor([[1e38, -1e38]])}
    experts = {"a": {"w": torch.tensor([[3e38, -3e38]])}, "c": {"w": torch.tensor([[1e38, -1e38]])}}
    assert studio.merge(base, experts, "task_arithmetic", alpha=0.5)["w"].tolist() == [[pytest.approx(2e38),
                                                                                       pytest.approx(-2e38)]]


def test_parameters_merge_without_autograd_warnings_and_meta_preferences_are_named():
    import warnings

    base = {"w": torch.nn.Parameter(torch.zeros(3, 3))}
    experts = {"a": {"w": torch.nn.Parameter(torch.ones(3, 3))}, "b": {"w": torch.nn.Parameter(torch.eye(3))}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # "Converting a tensor with requires_grad=True to a scalar" was printed
        out = studio.merge(base, experts, "task_arithmetic", device="cpu")
    assert out["w"][0].tolist() == [pytest.approx(0.6), pytest.approx(0.3), pytest.approx(0.3)]
    with pytest.raises(studio.StudioError, match="preferences are a meta tensor"):   # was NotImplementedError
        studio.merge(base, experts, "task_arithmetic", preferences=torch.ones(2, device="meta"))


def test_unknown_method_and_no_experts(clip_pool):
    base, experts = clip_pool
    with pytest.raises(studio.UnknownMethodError, match="known methods"):
        studio.merge(base, experts, "magic")
    with pytest.raises(studio.ExpertError, match="no experts"):
        studio.merge(base, {}, "task_arithmetic")


def test_bad_preferences(clip_pool):
    base, experts = clip_pool
    with pytest.raises(studio.StudioError, match="unknown task"):
        studio.merge(base, experts, "task_arithmetic", preferences={"nope": 1.0})
    with pytest.raises(studio.StudioError, match="task0.*>= 0"):
        studio.merge(base, experts, "task_arithmetic", preferences={"task0": -1.0})
    with pytest.raises(studio.StudioError, match=r"all zero \(tasks \['task0', 'task1', 'task2', 'task3'\]\)"):
        studio.merge(base, experts, "task_arithmetic", preferences=[0, 0, 0, 0])
    with pytest.raises(studio.StudioError, match=r"preferences name no task; give a weight to at least one of the "
                                                  r"experts \['task0'"):   # was "all zero"
        studio.merge(base, experts, "task_arithmetic", preferences={})
    # finite weights whose sum overflows: only their ratios matter (normalised to zeros once, the base came back;
    # then refused as summing to inf)
    huge = studio.merge(base, experts, "task_arithmetic", preferences=[1e308] * 4)
    plain = studio.merge(base, experts, "task_arithmetic")
    assert all(torch.equal(huge[k], plain[k]) for k in plain)
    # a positive weight float32 would compute as 0 is refused, not taken as weight 0 (which drops the task's
    # directions from TSV-M's whitening: another merge); 1e-308 of the largest is that, after the rescale above
    for prefs in ([1e308, 1e308, 1, 1], [1e308, 1e308, 1e-20, 1e308], {"task0": 1, "task1": 1e-50, "task2": 1,
                                                                       "task3": 1}):
        with pytest.raises(studio.StudioError, match=r"for task 'task\d' is [\d.e+-]+, 0 of the weights' sum: below "
                                                      r"float32's smallest normal number .*give it 0, or a weight at "
                                                      r"least 1.18e-38 times the sum"):
            studio.merge(base, experts, "tsv_m", preferences=prefs)
    small = studio.merge(base, experts, "tsv_m", preferences=[1, 1e-37, 1, 1])   # a normal float32 number
    assert all(torch.isfinite(v).all() for v in small.values() if v.is_floating_point())
    with pytest.raises(studio.StudioError, match="task1.*'2'"):
        studio.merge(base, experts, "task_arithmetic", preferences={"task1": "2"})
    # unordered or scalar preferences, or a string, have no per-task order (a set was taken in arbitrary order)
    for prefs in ({2.0, 1.0}, 3, torch.tensor(1.0), "abcd"):
        with pytest.raises(studio.StudioError, match="a mapping task -> weight or a sequence of one weight per task"):
            studio.merge(base, experts, "task_arithmetic", preferences=prefs)
    with pytest.raises(studio.StudioError, match=r"unknown task\(s\) .* and 990 more"):
        studio.merge(base, experts, "task_arithmetic", preferences={f"x{i}": 1.0 for i in range(1000)})
    with pytest.raises(studio.StudioError, match=r"unknown task\(s\) 0"):
        studio.merge(base, experts, "task_arithmetic", preferences={0: 1.0, "task0": 1.0})


def test_inputs_that_are_not_mergeable_state_dicts_name_what_is_wrong(clip_pool):
    base, experts = clip_pool
    key = "visual.proj"
    one = {"task0": experts["task0"], "task1": experts["task1"]}
    cases = [
        (None, one, "the base must be a state dict"),
        (base, [experts["task0"]], r"experts must be a mapping name -> state dict, got list \(give each expert"),
        (base, {"task0": None}, "expert 'task0' must be a state dict"),
        (base, {1: experts["task0"]}, "expert names must be strings"),
        (base, {"": experts["task0"], "task1": experts["task1"]}, "expert names must be non-empty, got ''"),
        (base, {" ": experts["task0"]}, "expert names must be non-empty, got ' '"),
        ({**base, 3: base[key]}, one, r"base: key 3 is a int; state-dict keys must be strings"),
        (base, dict(one, task1=dict(experts["task1"], **{key: torch.empty(base[key].shape, device="meta")})),
         "expert 'task1', key 'visual.proj' is a meta tensor"),
        (base, dict(one, task1=dict(experts["task1"], **{key: experts["task1"][key].to_sparse()})),
         "expert 'task1', key 'visual.proj' has layout torch.sparse_coo"),
        (base, dict(one, task1=dict(experts["task1"], **{key: torch.quantize_per_tensor(
            experts["task1"][key], 0.1, 0, torch.qint8)})),
         r"expert 'task1', key 'visual.proj' is a quantized tensor \(torch.qint8\); .*\.dequantize\(\)"),
        ({k: v.to(torch.float8_e4m3fn) for k, v in base.items()},
         {n: {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()} for n, sd in one.items()},
         r"base, key '.*' has dtype torch.float8_e4m3fn; expected one of"),
        (dict(base, c=torch.zeros(2, dtype=torch.complex64)),
         {n: dict(sd, c=torch.ones(2, dtype=torch.complex64)) for n, sd in one.items()}, "has dtype torch.complex64"),
    ]
    for b, e, message in cases:
        with pytest.raises(studio.ExpertError, match=message):
            studio.merge(b, e, "task_arithmetic")


def test_preferences_take_any_real_scalar(clip_pool):
    base, experts = clip_pool
    want = studio.merge(base, experts, "task_arithmetic", preferences=[1.0, 2.0, 0.0, 1.0])
    for prefs in ({"task0": np.float32(1), "task1": torch.tensor(2.0), "task3": np.int64(1)},
                  np.array([1.0, 2.0, 0.0, 1.0]), torch.tensor([1, 2, 0, 1])):
        got = studio.merge(base, experts, "task_arithmetic", preferences=prefs)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_preferences_weight_task_matrices_without_calibration(clip_pool):
    base, experts = clip_pool
    one_hot = studio.merge(base, experts, "task_arithmetic", alpha=1.0, preferences={"task0": 1.0})
    # w = p / max p: task0 counts once (the expert itself at alpha = 1), the others not at all; w = T p gave T times
    # task0's vector (a preferences audit: the one-hot target's accuracy fell from 74.5 % to 13.0 % under TSV-M)
    k = "visual.proj"
    expected = base[k] + (experts["task0"][k] - base[k])
    torch.testing.assert_close(one_hot[k], expected)
    favoured = studio.merge(base, experts, "task_arithmetic", alpha=1.0, preferences=[3.0, 1.5, 1.5, 0.75])
    expected = base[k] + sum(w * (experts[n][k] - base[k]) for w, n in zip((1.0, 0.5, 0.5, 0.25), experts))
    torch.testing.assert_close(favoured[k], expected)
    plain = studio.merge(base, experts, "task_arithmetic", alpha=1.0)
    for prefs in ([1, 1, 1, 1], torch.full((4,), 0.1), {n: 3.0 for n in experts}):   # uniform: the same bits
        uniform = studio.merge(base, experts, "task_arithmetic", alpha=1.0, preferences=prefs)
        assert all(torch.equal(uniform[key], plain[key]) for key in plain)
    # close to uniform is not uniform: each task matrix counts p_i / max p (within 1e-5 of uniform was snapped to it)
    zero, ones = {"w": torch.zeros(3)}, {f"t{i}": {"w": torch.full((3,), float(i + 1))} for i in range(4)}
    near = studio.merge(zero, ones, "task_arithmetic", alpha=1.0, preferences=[1, 1, 1, 1.000004])["w"]
    w = [x / 1.000004 for x in (1, 1, 1, 1.000004)]
    assert float(near[0]) == pytest.approx(sum((i + 1) * wi for i, wi in enumerate(w)), rel=1e-7, abs=0)


def test_post_scale_change_reuses_the_cached_merge(clip_pool):
    base, experts = clip_pool
    pool = studio.get_pool(base, experts)
    studio.merge_pool(pool, "task_arithmetic", alpha=0.1)
    cached = list(pool._merged)
    studio.merge_pool(pool, "task_arithmetic", alpha=0.7)
    assert list(pool._merged) == cached  # alpha is a rescale of the same unscaled merge


def test_half_precision_inputs_keep_dtype_and_match_float32():
    base32 = clip_like_state_dict()
    experts32 = make_experts(base32, 3)
    base16 = {k: v.half() for k, v in base32.items()}
    experts16 = {n: {k: v.half() for k, v in sd.items()} for n, sd in experts32.items()}
    m16 = studio.merge(base16, experts16, "task_arithmetic")
    assert all(v.dtype == torch.float16 for v in m16.values())
    m32 = studio.merge({k: v.float() for k, v in base16.items()},
                       {n: {k: v.float() for k, v in sd.items()} for n, sd in experts16.items()}, "task_arithmetic")
    for k in m16:
        torch.testing.assert_close(m16[k].float(), m32[k].half().float())


def test_float64_inputs_keep_their_precision_where_the_merge_adds_nothing():
    base = {k: v.double() for k, v in clip_like_state_dict().items()}
    experts = {n: {k: v.double() for k, v in sd.items()} for n, sd in make_experts(base, 3).items()}
    still = studio.merge(base, experts, "tsv_m", alpha=0.0)
    assert all(still[k].dtype == torch.float64 and torch.equal(still[k], base[k]) for k in base)
    # the delta is float32 (documented); the sum with the base is float64
    merged = studio.merge(base, experts, "task_arithmetic", alpha=0.5)
    for k in base:
        exact = base[k] + 0.5 * sum(sd[k] - base[k] for sd in experts.values())
        torch.testing.assert_close(merged[k], exact, rtol=0, atol=1e-6 * float(exact.abs().max()))


def test_layer_rule_selects_matrices():
    rule = studio.DEFAULT_LAYER_RULE
    assert rule.is_matrix("visual.transformer.resblocks.0.mlp.c_fc.weight", (48, 12))
    assert not rule.is_matrix("text_projection", (6, 6))
    assert not rule.is_matrix("visual.conv1.weight", (12, 3, 2, 2))
    assert not studio.SKIP_EMBEDDINGS.is_matrix("visual.positional_embedding", (5, 12))
    # the official SVC code skips `"embedding" in key` only: a Llama-style embed_tokens or timm's patch_embed is
    # calibrated there, so it is a matrix here too
    assert not studio.SKIP_EMBEDDINGS.is_matrix("model.embedding.weight", (10, 12))
    assert studio.SKIP_EMBEDDINGS.is_matrix("model.embed_tokens.weight", (10, 12))
    assert studio.SKIP_EMBEDDINGS.is_matrix("patch_embed.proj.weight", (10, 12))
    with pytest.raises(studio.StudioError, match="unknown layer rule"):
        studio.merge(*_pool(), "task_arithmetic", layer_rule="bogus")


def _pool():
    base = clip_like_state_dict()
    return base, make_experts(base, 2)


def test_cuda_request_without_cuda_is_a_clear_error(clip_pool):
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    base, experts = clip_pool
    with pytest.raises(studio.StudioError, match="CUDA is not available"):
        studio.merge(base, experts, "task_arithmetic", device="cuda")


def _every_merge():
    import studio.methods  # noqa: F401  (registers every method)
    from studio.registry import CALIBRATIONS, METHODS

    return [(m, None) for m in sorted(METHODS)] + [("ties", c) for c in sorted(CALIBRATIONS)]


@pytest.mark.parametrize("method,calibrate", _every_merge())
def test_resident_device_copies_change_nothing(clip_pool, method, calibrate):
    # A resident pool (the CUDA default) reads every tensor through its cache of device copies; on the CPU those
    # copies are the tensors themselves, so the merge must be bit-identical to the streaming pool's.
    base, experts = clip_pool
    experts = {**experts, "task1": {k: v.to(torch.bfloat16) for k, v in experts["task1"].items()}}  # mixed dtypes
    streamed = TaskPool(base, experts, device="cpu", resident=False)
    resident = TaskPool(base, experts, device="cpu", resident=True)
    studio.merge_pool(resident, method, calibrate=calibrate)   # fills the copies
    assert all(resident._on_device[(n, k)] is (base if n is None else experts[n])[k] for n, k in resident._on_device)
    # Every later read must come from the copies: poison the host tensors (kept only for keys, shapes, dtypes).
    for sd in (resident.base, *resident.experts.values()):
        for k, v in sd.items():
            sd[k] = torch.full_like(v, float("nan")) if v.is_floating_point() else v
    a = studio.merge_pool(streamed, method, calibrate=calibrate, preferences=[1, 2, 3, 4])
    b = studio.merge_pool(resident, method, calibrate=calibrate, preferences=[1, 2, 3, 4])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not streamed._on_device
    assert not TaskPool(base, experts, device="cpu").resident   # the CPU default streams


@pytest.fixture
def eigh_route(request, monkeypatch):
    # where CUDA eigensolves run: cuSOLVER's batched solver (the default), the host's LAPACK, torch's cuSOLVER
    from studio import _lapack

    batched, host = {"batched": (1024, 1024), "host": (0, 1024), "torch": (0, 0)}[request.param]
    monkeypatch.setattr(_lapack, "BATCHED_EIGH_MAX", batched)
    monkeypatch.setattr(_lapack, "HOST_EIGH_MAX", host)
    return request.param


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eigh_route", ["batched", "host", "torch"], indirect=True)
@pytest.mark.parametrize("svd_mode", ["exact", "auto"])
@pytest.mark.parametrize("method,calibrate", _every_merge())
def test_cpu_and_cuda_agree(clip_pool, method, calibrate, svd_mode, eigh_route):
    # CUDA eigensolves run on cuSOLVER's batched solver by default (studio._lapack.BATCHED_EIGH_MAX), on the host's
    # LAPACK with that at 0 (studio._lapack.HOST_EIGH_MAX), on torch.linalg.eigh (cuSOLVER) with both at 0
    base, experts = clip_pool
    kw = {"p": 0.0} if method == "dare" else {}   # CPU and CUDA generators draw different DARE masks
    a = studio.merge(base, experts, method, calibrate=calibrate, device="cpu", svd_mode=svd_mode, **kw)
    pool = TaskPool(base, experts, device="cuda", svd_mode=svd_mode)
    assert pool.resident
    b = studio.merge_pool(pool, method, calibrate=calibrate, **kw)
    for k in a:
        assert b[k].device.type == "cpu" and b[k].dtype == a[k].dtype
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ties_consensus", [False, True])
def test_dare_on_cuda_drops_and_rescales(ties_consensus):
    """CUDA's generator draws other masks than the CPU's, so test_cpu_and_cuda_agree merges DARE at p = 0, where
    dropping and rescaling do nothing: here, at p = 0.5, two tasks on disjoint entries each keep about half of
    theirs (within 5 sigma), and a kept entry is its delta / (1 - p) (mutant: the CUDA branch without the rescale)."""
    g = torch.Generator().manual_seed(0)
    delta = torch.rand(64, 64, generator=g) + 0.5
    half = torch.zeros(64, 64, dtype=torch.bool)
    half[:32] = True
    experts = {"a": {"w": torch.where(half, delta, 0.0)}, "b": {"w": torch.where(half, 0.0, delta)}}
    out = studio.merge({"w": torch.zeros(64, 64)}, experts, "dare", p=0.5, alpha=1.0, seed=3, device="cuda",
                       ties_consensus=ties_consensus)["w"]
    kept = out != 0
    torch.testing.assert_close(out[kept], 2 * delta[kept], rtol=1e-6, atol=0)
    for task in (half, ~half):
        assert abs(float(kept[task].float().mean()) - 0.5) < 5 * (0.25 / 2048) ** 0.5


def _decomposing_merges():
    from studio.registry import get_calibration, get_method

    return [(m, c) for m, c in _every_merge()
            if get_method(m).extra.get("decomposes") or (c and get_calibration(c).extra.get("decomposes"))]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("eigh_route", ["batched", "host"], indirect=True)
def test_a_cuda_spectral_merge_solves_from_worker_threads_on_the_callers_stream(clip_pool, monkeypatch, eigh_route):
    import sys
    import threading

    from studio import _cusolver, _lapack
    from studio.parallel import set_workers

    real = "fakecuda" not in sys.modules   # the CPU stand-in has no streams
    seen = []

    def spy(solve):
        def spied(gs, *args, **kwargs):
            for g in gs if isinstance(gs, list) else [gs]:
                if g.device.type == "cuda":
                    stream = torch.cuda.current_stream().cuda_stream if real else None
                    route = "batched" if _lapack._batched(g) else "host" if _lapack._on_host(g) else "torch"
                    seen.append((threading.current_thread().name, route, stream))
            return solve(gs, *args, **kwargs)
        return spied

    for name in ("eigh", "eigh_top", "eigh_many", "eigh_top_many"):
        monkeypatch.setattr(_lapack, name, spy(getattr(_lapack, name)))
    base, experts = clip_pool
    caller = torch.cuda.Stream() if real else contextlib.nullcontext()
    set_workers(4)
    try:
        with torch.cuda.stream(caller) if real else caller:
            studio.merge_pool(TaskPool(base, experts, device="cuda"), "tsv_m")
    finally:
        set_workers(None)
    expected = "batched" if eigh_route == "batched" and _cusolver.available() else "host"
    assert seen and all(route == expected for _, route, _ in seen)
    assert any(name.startswith("studio-layer") for name, _, _ in seen)
    if real:
        assert {stream for _, _, stream in seen} == {caller.cuda_stream}
    # element-wise methods keep their CUDA layers on the calling thread
    recorded = _record_workers(studio.engine.parallel_map)
    monkeypatch.setattr(studio.engine, "parallel_map", recorded)
    studio.merge_pool(TaskPool(base, experts, device="cuda"), "ties")
    studio.merge_pool(TaskPool(base, experts, device="cuda"), "tsv_m", calibrate="svc")
    assert recorded.host_bound == [False, False, True, True]   # layers, then finishing (SVC decomposes)


def _record_workers(parallel_map):
    def recorded(*args, host_bound=False, **kwargs):
        recorded.host_bound.append(host_bound)
        return parallel_map(*args, host_bound=host_bound, **kwargs)
    recorded.host_bound = []
    return recorded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,calibrate", _decomposing_merges())
def test_cuda_worker_threads_change_no_bit(clip_pool, method, calibrate):
    # A decomposing method's CUDA layers run on worker threads sharing the caller's stream (studio.parallel); the
    # merge must be the sequential one's, bit for bit, cached decompositions shared between threads included.
    from studio.parallel import set_workers

    base, experts = clip_pool
    merged, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)   # as each worker's (what runs on the host, e.g. the CUDA stand-in's ops, then agrees)
    try:
        for workers in (1, 4):
            set_workers(workers)
            pool = TaskPool(base, experts, device="cuda")
            merged.append(studio.merge_pool(pool, method, calibrate=calibrate, preferences=[1, 2, 3, 4]))
            merged.append(studio.merge_pool(pool, method, calibrate=calibrate))   # warm: from the shared caches
    finally:
        set_workers(None)
        torch.set_num_threads(threads)
    for k in merged[0]:
        assert torch.equal(merged[0][k], merged[2][k]) and torch.equal(merged[1][k], merged[3][k]), k


def test_truncated_svd_matches_exact_on_decaying_spectrum():
    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(300, 100, generator=g)).Q
    V = torch.linalg.qr(torch.randn(200, 100, generator=g)).Q
    s = torch.logspace(0, -3, 100)
    A = (U * s) @ V.T
    from studio.linalg import truncated_svd

    Ue, Se, Vhe = truncated_svd(A, 20, exact=True)
    Ur, Sr, Vhr = truncated_svd(A, 20)
    torch.testing.assert_close(Sr, Se, rtol=1e-4, atol=1e-6)
    err = torch.linalg.matrix_norm((Ur * Sr) @ Vhr - (Ue * Se) @ Vhe) / torch.linalg.matrix_norm((Ue * Se) @ Vhe)
    assert err < 1e-3


def test_pool_layer_svd_is_cached_and_weight_rescaled(clip_pool):
    base, experts = clip_pool
    pool = TaskPool(base, experts)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    U1, S1, _ = pool.layer(key).svd(0, rank=3)
    U2, S2, _ = pool.layer(key, torch.tensor([2.0, 1, 1, 1])).svd(0, rank=3)
    assert len(pool._svd_cache) == 1
    torch.testing.assert_close(S2, 2 * S1)


def test_transient_memo_is_bounded_while_structural_memo_persists(clip_pool):
    base, experts = clip_pool
    pool = TaskPool(base, experts)
    layer = pool.layer("visual.proj")
    calls = []
    layer.memo("persistent", lambda: calls.append("p") or 1)
    for i in range(10 * len(base)):  # many slider positions
        layer.memo(("merged", i), lambda: i, transient=True)
    assert len(pool._transient) == 4 * len(base)
    assert layer.memo(("merged", 10 * len(base) - 1), lambda: -1, transient=True) == 10 * len(base) - 1
    layer.memo("persistent", lambda: calls.append("again") or 2)
    assert calls == ["p"]


@pytest.mark.parametrize("method", ["iso_c", "iso_cts", "tsv_m", "ortho_merge"])
def test_preference_weighted_merges_are_right_and_do_not_grow_the_pool(clip_pool, method):
    """A preference position weights the task matrices (w_i = p_i / max p), so its sum and decompositions are its own:
    they are computed for the merge and freed after it (they used to stay in the pool for its life, +0.9-1.2 GiB
    per slider move for Iso-C on 8 ViT-B/32 experts). The result equals the method on experts pre-scaled by w_i."""
    base, experts = clip_pool
    names = list(experts)
    pool = TaskPool(base, experts)
    studio.merge_pool(pool, method)                                     # unweighted: fills the shared caches
    sizes = (len(pool._memo), len(pool._transient))
    for step in range(3):
        prefs = {n: 1.0 + (step + 1) * (i == 0) + 0.5 * (i == 2) for i, n in enumerate(names)}
        weighted = studio.merge_pool(pool, method, preferences=prefs)
        assert (len(pool._memo), len(pool._transient)) == sizes
    w = torch.tensor([prefs[n] for n in names]) / max(prefs.values())
    scaled = {n: {k: base[k] + wi * (experts[n][k] - base[k]) for k in base} for wi, n in zip(w, names)}
    expected = studio.merge_pool(TaskPool(base, scaled), method)
    for k in base:
        torch.testing.assert_close(weighted[k], expected[k], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------- layer-parallel execution
def _merge_with_threads(threads, base, experts, method, **kw):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return studio.merge_pool(TaskPool(base, experts, device="cpu"), method, **kw)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method,kw", [(m["name"], {}) for m in studio.list_methods() if m["kind"] == "merge"] +
                         [("task_arithmetic", {"calibrate": "svc"}), ("ties", {"calibrate": "align_merge_b"})])
def test_worker_threads_give_bit_identical_merges(clip_pool, method, kw):
    """Layers run on torch.get_num_threads() worker threads (studio.parallel); each layer's arithmetic is the same
    on any thread, so one and three workers agree exactly."""
    base, experts = clip_pool
    one = _merge_with_threads(1, base, experts, method, **kw)
    three = _merge_with_threads(3, base, experts, method, **kw)
    assert one.keys() == three.keys()
    for k in one:
        assert torch.equal(one[k], three[k]), k


def _thread_count_probes():
    """``omp_get_max_threads`` of torch's OpenMP and ``mkl_get_max_threads`` of its MKL, for the calling thread."""
    import ctypes
    import glob
    import os

    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    gomp = glob.glob(os.path.join(lib, "libgomp*.so*"))
    if not gomp or not os.path.exists(os.path.join(lib, "libtorch_cpu.so")):
        pytest.skip("this torch build bundles no libgomp / libtorch_cpu.so to ask")
    omp, cpu = ctypes.CDLL(gomp[0]), ctypes.CDLL(os.path.join(lib, "libtorch_cpu.so"))
    if not hasattr(cpu, "mkl_get_max_threads"):
        pytest.skip("this torch build has no MKL")
    return lambda: (omp.omp_get_max_threads(), cpu.mkl_get_max_threads())


def test_worker_threads_compute_with_one_openmp_and_mkl_thread():
    """Every merge worker runs torch's OpenMP and MKL on one thread. A new thread starts from the process defaults
    (one thread per core), not from the caller's ``torch.set_num_threads(1)``: each of two workers ran MKL on two
    threads, so a 2-core machine ran four, and MKL's results then changed between identical merges (exact-mode
    Ortho-Merge on float16 experts, in 2 of 30 runs)."""
    from studio.parallel import parallel_map

    probe = _thread_count_probes()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert parallel_map(lambda _: probe(), range(4)) == [(1, 1)] * 4
    finally:
        torch.set_num_threads(before)


def test_memo_computes_once_under_concurrent_requests_and_recovers_from_errors(clip_pool):
    import threading

    from studio.parallel import parallel_map

    pool = TaskPool(*clip_pool, device="cpu")
    calls = []
    gate = threading.Barrier(3)

    def slow() -> int:
        calls.append(1)
        return 42

    def request(_):
        gate.wait()
        return pool.memo("tag", slow)

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert parallel_map(request, range(3)) == [42, 42, 42]
        assert len(calls) == 1

        def failing(i):
            if i == 1:
                raise ValueError("boom")
            return pool.memo("other", lambda: i)

        with pytest.raises(ValueError, match="boom"):
            parallel_map(failing, range(4))
    finally:
        torch.set_num_threads(before)
    assert torch.get_num_threads() == before
    assert pool.memo("failed-before", lambda: 7) == 7 and not pool._inflight


def test_overlapping_merges_restore_the_callers_thread_count():
    """PyTorch's thread count is one process-wide setting, which a thread reads when it first runs an op: each
    parallel region saved it and put it back, so a merge from a thread started during another merge saved the 1 of
    the first region, ended last, and left every later thread on one intra-op thread."""
    import threading

    from studio.parallel import parallel_map, set_workers

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    set_workers(2)   # as the app: two workers whatever the calling thread's own count
    first_in, first_done, second_in, second_go = (threading.Event() for _ in range(4))
    counts = []

    def hold(event_in, event_go):
        def fn(i):
            if i == 0:
                event_in.set()
                event_go.wait(30)
            return i
        return fn

    try:
        one = threading.Thread(target=lambda: (parallel_map(hold(first_in, first_done), range(2)), counts.append(1)))
        one.start()
        assert first_in.wait(30)
        two = threading.Thread(target=lambda: parallel_map(hold(second_in, second_go), range(2)))
        two.start()   # starts, and first runs an op, during the first merge
        assert second_in.wait(30)
        first_done.set()
        one.join(30)
        second_go.set()   # the second merge ends last
        two.join(30)
        later = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
        later.start()
        later.join(30)
        assert counts == [1, 2], counts
    finally:
        first_done.set()
        second_go.set()
        set_workers(None)
        torch.set_num_threads(before)


def test_a_merge_changes_no_other_threads_count():
    """Only the workers run on one thread. Before, the calling thread set PyTorch's count to 1 for the merge, which
    also set the process-wide value a thread copies at its first op: a thread that first ran an op during a merge
    stayed on one thread for good, and so did the caller of the first of two overlapping merges (the last to end
    restored only its own thread's count). A worker now holds the process value at 1 only while it starts (see
    studio.parallel), so the other threads here make their first op once every worker has started."""
    import threading

    from studio.parallel import parallel_map, set_workers

    before = torch.get_num_threads()
    set_workers(2)
    first_in, second_in = [threading.Event(), threading.Event()], [threading.Event(), threading.Event()]
    first_go, second_go, late_go = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def hold(events_in, event_go):
        def fn(i):
            events_in[i].set()
            event_go.wait(30)
            return torch.get_num_threads()
        return fn

    def first():
        torch.set_num_threads(3)
        torch.get_num_threads()   # the thread's first op
        workers = parallel_map(hold(first_in, first_go), range(2),
                               on_done=lambda *_: seen.setdefault("first caller during", torch.get_num_threads()))
        seen["first workers"] = workers
        seen["first caller after"] = torch.get_num_threads()

    def late():
        torch.get_num_threads()   # its first parallel op would ask this: the thread copies its count now
        late_go.wait(30)
        seen["late"] = torch.get_num_threads()

    try:
        torch.set_num_threads(3)
        one = threading.Thread(target=first)
        one.start()
        assert all(e.wait(30) for e in first_in)
        two = threading.Thread(target=lambda: parallel_map(hold(second_in, second_go), range(2)))
        two.start()
        assert all(e.wait(30) for e in second_in)
        three = threading.Thread(target=late)   # starts during both merges
        three.start()
        first_go.set()   # the first merge ends first
        one.join(30)
        second_go.set()
        two.join(30)
        late_go.set()
        three.join(30)
        assert seen == {"first workers": [1, 1], "first caller during": 3, "first caller after": 3, "late": 3}, seen
    finally:
        first_go.set()
        second_go.set()
        late_go.set()
        set_workers(None)
        torch.set_num_threads(before)


def test_concurrent_callers_share_one_pool_and_one_merge(clip_pool, monkeypatch):
    """``get_pool`` built one pool per thread asking at once (each with its own decompositions) and could raise
    KeyError while another thread evicted; merges that differ only in alpha, asked at once, each computed the
    unscaled merge."""
    from concurrent.futures import ThreadPoolExecutor

    from studio import engine

    import time

    base, experts = clip_pool
    engine.clear_pools()
    built = []

    class Slow(TaskPool):   # a pool that takes a while to build, as a real model's does (it scans every value)
        def __init__(self, *args, **kwargs):
            built.append(1)
            time.sleep(0.2)
            super().__init__(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(engine, "TaskPool", Slow)
        with ThreadPoolExecutor(6) as ex:
            pools = list(ex.map(lambda _: engine.get_pool(base, experts, device="cpu"), range(6)))
    assert len(built) == 1 and all(p is pools[0] for p in pools)

    pool, computed = pools[0], []
    unscaled = pool.merged_cache

    def counting(tag, compute, keep=2):
        return unscaled(tag, lambda: computed.append(tag) or compute(), keep)

    monkeypatch.setattr(pool, "merged_cache", counting)
    alphas = [0.5, 0.7, 0.9, 1.1]
    with ThreadPoolExecutor(4) as ex:
        merged = list(ex.map(lambda a: studio.merge_pool(pool, "iso_c", alpha=a), alphas))
    assert len(computed) == 1
    for a, m in zip(alphas, merged):
        want = studio.merge_pool(TaskPool(base, experts, device="cpu"), "iso_c", alpha=a)
        assert all(torch.equal(m[k], want[k]) for k in want)


def test_a_merge_repeated_on_its_pool_is_unchanged_by_a_higher_rank_asked_for_between(clip_pool):
    """A rank, once decomposed, stays cached: keeping only the highest rank asked for made the repeat slice its
    vectors from the full-rank SVD (same values up to rounding, other signs), and AlignMerge-O without sign
    alignment then merged 8 % differently the second time."""
    pool = TaskPool(*clip_pool, device="cpu")
    hp = {"eta": "dominant", "align_signs": False}
    first = studio.merge_pool(pool, "align_merge_o", **hp)
    for key in pool.keys:   # e.g. the app's full spectra of every layer
        if pool.base[key].ndim == 2 and min(pool.base[key].shape) > 1:
            for i in range(len(pool.names)):
                pool.layer(key).svd(i, None)
    pool._merged.clear()   # as if two other merges had pushed it out of the merge cache
    again = studio.merge_pool(pool, "align_merge_o", **hp)
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("svd_mode", ["auto", "exact"])
def test_ranks_cut_from_different_buckets_have_the_same_vectors_and_signs(clip_pool, svd_mode):
    """Each SVD pair's sign is fixed (linalg.canonical_signs), so the top-k factors of a higher-rank decomposition
    match a rank-k one to rounding, signs included, where LAPACK's own signs differ between the two."""
    pool = TaskPool(*clip_pool, device="cpu", svd_mode=svd_mode)
    flipped = 0
    for key in [k for k in pool.keys if pool.base[k].ndim == 2 and min(pool.base[k].shape) > 4]:
        for i in range(len(pool.names)):
            full = pool.layer(key).svd(i, None)
            assert min(pool.base[key].shape) > 3   # so rank 3 has a bucket of its own, below the full rank
            U, S, Vh = pool.layer(key).svd(i, 3)
            torch.testing.assert_close((full[0][:, :3], full[1][:3], full[2][:3]), (U, S, Vh), rtol=1e-3,
                                       atol=2e-4)   # a flip: ~0.1
            U0, _, _ = torch.linalg.svd(pool.raw_delta(key, i), full_matrices=False)
            flipped += int((U0[:, :3] * full[0][:, :3]).sum(0).lt(0).sum())   # LAPACK's own signs vary
    assert flipped > 0


def _warm_up(pool):
    """What an app session does before a merge: merges at other ranks, the diagnostics' spectra and subspaces."""
    studio.merge_pool(pool, "tsv_m", rank_fraction=0.1)   # k = 1 on the rank-12 layers
    studio.merge_pool(pool, "ortho_merge", k=11)
    studio.merge_pool(pool, "tsv_m", rank_fraction=0.2, calibrate="svc")
    for key in pool.keys:
        if pool.base[key].ndim == 2 and min(pool.base[key].shape) > 1:
            for i in range(len(pool.names)):
                pool.layer(key).svd(i, None)
                pool.layer(key).svd(i, 4)
    pool._merged.clear()   # as if other merges had pushed them out of the merge cache


@pytest.mark.parametrize("method,kw", [(m["name"], {}) for m in studio.list_methods() if m["kind"] == "merge"] +
                         [("tsv_m", {"calibrate": "svc"}), ("align_merge_o", {"calibrate": "svc"}),
                          ("align_merge_o", {"eta": "dominant", "align_signs": False}),
                          ("ortho_merge", {"calibrate": "align_merge_b"})])
def test_a_merge_on_a_warm_pool_is_the_fresh_merge_bit_for_bit(clip_pool, method, kw):
    """Every rank is cut from its own bucket's decomposition (pool.rank_bucket), so what ran on a pool before does
    not change a merge's bits. Before, a rank was cut from any higher one cached: the same TSV-M changed by 1e-5
    after merges at other ranks, and AlignMerge-O + SVC after an Ortho-Merge at a higher k by 1.6e-2 (SVC's directions
    turn at near-tied singular values), so an app export did not replay to the same bits."""
    fresh = studio.merge_pool(TaskPool(*clip_pool, device="cpu"), method, **kw)
    warm = TaskPool(*clip_pool, device="cpu")
    _warm_up(warm)
    again = studio.merge_pool(warm, method, **kw)
    assert [k for k in fresh if not torch.equal(fresh[k], again[k])] == []


@pytest.mark.parametrize("pattern", [[1, -1], [1, -1, -1, 1], [1, 1, 1, 1, -1, -1, -1, -1], [1, -1, 1, -1, 1, -1]])
def test_signs_are_fixed_where_a_singular_vector_has_entries_of_equal_magnitude(pattern):
    """The sign of a vector's largest entry, the first convention, left two entries of equal magnitude and opposite
    sign to rounding: a fresh rank-1 SVD and one sliced from the full rank came out with opposite signs for 3 of these
    40 tasks, and AlignMerge-O without sign alignment then differed by 55 %. The projection on frac(i phi) - 1/2, the
    second, was exactly zero for the four-entry pattern (6 of 80 flipped). Batched factors are fixed per matrix."""
    from studio.linalg import canonical_signs

    m, n = 16, 12
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        u1 = torch.zeros(m)
        u1[:len(pattern)] = torch.tensor(pattern, dtype=torch.float32) / len(pattern) ** 0.5
        U, _ = torch.linalg.qr(torch.cat([u1[:, None], torch.randn(m, n - 1, generator=g)], 1))
        U[:, 0] = u1
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        delta = (U * torch.linspace(1.0, 0.1, n)) @ V.T
        base, experts = {"w": torch.zeros(m, n)}, {"a": {"w": delta}, "b": {"w": delta.roll(1, 0)}}
        layer = TaskPool(base, experts, device="cpu").layer("w")
        assert float(layer.svd(0, 1)[0][:, 0] @ layer.svd(0, None)[0][:, 0]) > 0.99, seed
    U, S, Vh = torch.linalg.svd(torch.randn(3, 5, 4, generator=g), full_matrices=False)
    Uc, Vc = canonical_signs(U, Vh)
    for b in range(3):
        assert torch.equal(canonical_signs(U[b], Vh[b])[0], Uc[b])
    torch.testing.assert_close((Uc * S.unsqueeze(-2)) @ Vc, (U * S.unsqueeze(-2)) @ Vh)


def test_ranks_of_one_bucket_asked_at_once_share_one_decomposition(clip_pool, monkeypatch):
    """Three threads ask ranks 7, 8 and 8 of a [48, 12] layer (bucket 8) at once: the first decomposes (once every
    thread has asked), the others wait for it and cut their ranks from it."""
    import threading
    import time

    from studio import linalg

    pool = TaskPool(*clip_pool, device="cpu")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    computed, asked, lock = [], [], threading.Lock()
    gram_svd_many, cached = linalg.gram_svd_many, pool._cached

    def counted(store, tag, compute, limit):
        with lock:
            asked.append(tag)
        return cached(store, tag, compute, limit)

    def held(raw, rank):
        deadline = time.monotonic() + 30
        while len(asked) < 3 and time.monotonic() < deadline:   # every thread inside the cache's lookup
            time.sleep(0.01)
        computed.append(rank)
        return gram_svd_many(raw, rank)

    monkeypatch.setattr(pool, "_cached", counted)
    monkeypatch.setattr(linalg, "gram_svd_many", held)
    got = [None] * 3

    def ask(i, rank):
        got[i] = pool.layer(key).svd(0, rank)

    threads = [threading.Thread(target=ask, args=(i, rank)) for i, rank in enumerate((7, 8, 8))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert asked == [8, 8, 8] and computed == [8] and list(pool._svd_slot((key, 0))) == [8]
    assert [g[0].shape[1] for g in got] == [7, 8, 8]
    assert torch.equal(got[0][0], got[1][0][:, :7]) and torch.equal(got[1][2], got[2][2])


def test_the_svd_cache_keeps_the_two_buckets_used_last(clip_pool):
    """A rank slider swept up used to keep every rank it passed (1.5 GB for 8 ViT-B/32 experts after six TSV-M
    steps); beyond the pool's budget (none here) each expert and layer keeps the decompositions of the two buckets
    used last, and one dropped comes back with the same bits."""
    from studio.pool import rank_bucket

    pool = TaskPool(*clip_pool, device="cpu", svd_cache_bytes=0)
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    layer = pool.layer(key)
    assert [rank_bucket(k, 12) for k in range(0, 13)] == [1, 1, 2, 3, 4, 5, 6, 8, 8, 9, 11, 11, 12]
    first = layer.svd(0, 2)
    for rank in (1, 2, 3, 7, 8):
        layer.svd(0, rank)
    assert list(pool._svd_slot((key, 0))) == [3, 8]
    again = layer.svd(0, 2)   # decomposed again
    assert list(pool._svd_slot((key, 0))) == [8, 2] and all(torch.equal(a, b) for a, b in zip(first, again))
    layer.svd(0, None)   # 8 goes: the least recently used
    assert list(pool._svd_slot((key, 0))) == [2, 12]
    assert [f.shape[1] for f in (pool._svd_slot((key, 0))[b][0] for b in (2, 12))] == [2, 12]


def test_within_its_budget_the_svd_cache_decomposes_no_expert_twice(clip_pool, monkeypatch):
    """Switching between methods and ranks (four buckets per expert and layer here) decomposes each expert's layer
    once per bucket while the factors fit the pool's budget (by default half the experts' size: these tiny layers'
    factors outgrow it, so it is raised here); over it, the least recently used buckets go first, down to the two
    used last of each expert and layer, and the bytes counted are the bytes held."""
    base, experts = clip_pool
    assert TaskPool(base, experts, device="cpu").svd_cache_bytes == sum(
        t.numel() * t.element_size() for sd in experts.values() for t in sd.values() if t.is_floating_point()) // 2
    for bad in (-1, 1.5, "1 GB", True):
        with pytest.raises(studio.StudioError, match=r"svd_cache_bytes must be a whole number of bytes >= 0"):
            TaskPool(base, experts, device="cpu", svd_cache_bytes=bad)
    pool = TaskPool(base, experts, device="cpu", svd_cache_bytes=1 << 40)
    made = []
    real = linalg.gram_svd_many
    monkeypatch.setattr(linalg, "gram_svd_many", lambda ms, rank=None: made.append(rank) or real(ms, rank))
    steps = [("tsv_m", {}), ("ortho_merge", {}), ("tsv_m", {"rank_fraction": 0.1}), ("ortho_merge", {"k": 2}),
             ("align_merge_o", {}), ("tsv_m", {}), ("ortho_merge", {}), ("tsv_m", {"rank_fraction": 0.1})]
    counts = []
    for method, hp in steps:
        made.clear()
        studio.merge_pool(pool, method, **hp)
        counts.append(len(made))
    assert all(counts[:4]) and counts[4:] == [0, 0, 0, 0]   # a bucket decomposes at its first use only (AlignMerge-O
    # shares TSV-M's)

    def held_bytes():
        return sum(t.numel() * t.element_size() for slot in pool._svd_cache.values() for f in slot.values()
                   for t in f)

    assert held_bytes() == pool._svd_bytes and max(len(s) for s in pool._svd_cache.values()) > 2
    pool.svd_cache_bytes = held_bytes() // 2   # a smaller budget: the least recently used go at the next use
    studio.merge_pool(pool, "ortho_merge", k=3)
    assert held_bytes() == pool._svd_bytes
    assert held_bytes() <= pool.svd_cache_bytes or all(len(s) <= 2 for s in pool._svd_cache.values())
    key = next(k for k in pool._svd_cache if k[0].endswith("c_fc.weight"))
    assert list(pool._svd_cache[key])[-1] == 3 and len(pool._svd_cache[key]) >= 2   # the bucket just used stays


def test_the_svd_cache_does_not_drop_the_bucket_a_merge_is_using(monkeypatch):
    """Just over the budget, going back to a rank whose bucket only expert 0 lost used to decompose all four experts
    again: each recompute dropped the next expert's copy, the least recently used. Another slot's copy of the bucket
    in use is now never the one dropped."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(24, 20)}
    experts = {f"t{i}": {"w": torch.randn(24, 20, generator=g)} for i in range(4)}
    probe = TaskPool(base, experts, device="cpu", svd_cache_bytes=1 << 30)
    for rank in (10, 3, 4):
        probe.layer("w").svds(range(4), rank)
    pool = TaskPool(base, experts, device="cpu", svd_cache_bytes=probe._svd_bytes - 1)
    for rank in (10, 3, 4):
        pool.layer("w").svds(range(4), rank)
    assert sum(10 in slot for slot in pool._svd_cache.values()) == 3   # one expert's bucket 10 went
    made = []
    real = linalg.gram_svd_many
    monkeypatch.setattr(linalg, "gram_svd_many", lambda ms, rank=None: made.append(rank) or real(ms, rank))
    pool.layer("w").svds(range(4), 10)
    assert len(made) == 1 and pool._svd_bytes <= pool.svd_cache_bytes


def test_the_svd_cache_accounting_holds_on_the_batched_path_across_threads_and_a_clear(clip_pool, monkeypatch):
    """What the budget counts is what the slots hold: with the CUDA batch path (which puts buckets in the slots
    itself; taken here on CPU tensors), with merges on worker threads and with a clear() while a decomposition runs,
    every slot keeps at most its two last buckets under a budget of 0, and nothing counted is missing (a count that
    drifted below the truth kept 3 buckets, and a clear() mid-way left a counted bucket that raised KeyError)."""
    from studio.pool import LayerTasks

    base, experts = clip_pool
    pool = TaskPool(base, experts, device="cpu", svd_cache_bytes=0)

    def check():
        held = sum(t.numel() * t.element_size() for slot in pool._svd_cache.values() for f in slot.values()
                   for t in f)
        assert held == pool._svd_bytes and all(len(slot) <= 2 for slot in pool._svd_cache.values())

    steps = (("tsv_m", {}), ("ortho_merge", {}), ("ortho_merge", {"k": 2}), ("tsv_m", {"rank_fraction": 0.1}))
    for method, hp in steps:
        studio.merge_pool(pool, method, **hp)   # layers on 2 worker threads
        check()
    with monkeypatch.context() as mp:
        mp.setattr(LayerTasks, "device", property(lambda self: torch.device("cuda")))   # the batch path's branch
        layer = pool.layer("visual.transformer.resblocks.0.mlp.c_fc.weight")
        for rank in (1, 5, 8, 3, 4, 6):
            layer.svds(range(layer.num_tasks), rank)
            check()
    real = linalg.gram_svd_many

    def clearing(matrices, rank=None):
        out = real(matrices, rank)
        pool.clear()   # another thread clears the pool while this decomposition runs
        return out

    layer = pool.layer("visual.transformer.resblocks.1.mlp.c_fc.weight")
    monkeypatch.setattr(linalg, "gram_svd_many", clearing)
    layer.svd(0, 3)
    monkeypatch.setattr(linalg, "gram_svd_many", real)
    check()
    for rank in (1, 2, 3, 5):
        layer.svd(0, rank)
        check()


def test_a_held_pool_refuses_to_merge_experts_changed_since_it_was_built(clip_pool):
    """A pool from get_pool keeps references to the caller's tensors: after an in-place edit its cached
    decompositions and merges were of the old weights (TSV-M at another rank came out 0.07 off a fresh pool, an alpha
    change gave the old merge rescaled). merge_pool now names the changed tensor; studio.merge builds a new pool."""
    base, experts = clip_pool
    pool = studio.get_pool(base, experts, device="cpu")
    studio.merge_pool(pool, "tsv_m")
    key = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    experts["task1"][key].mul_(1.5)
    for hp in ({"rank_fraction": 0.2}, {"alpha": 0.5}):
        with pytest.raises(studio.StudioError, match=r"expert 'task1': tensor '" + key.replace(".", r"\.") +
                           r"' changed since this pool was built.*studio\.get_pool"):
            studio.merge_pool(pool, "tsv_m", **hp)
    fresh = TaskPool(base, experts, device="cpu")
    merged = studio.merge(base, experts, "tsv_m", alpha=0.5)
    torch.testing.assert_close(merged[key], studio.merge_pool(fresh, "tsv_m", alpha=0.5)[key], rtol=0, atol=0)
    # the caller's dicts changed, not the tensors the pool holds (it keeps its own dicts): nothing is stale
    experts["renamed"] = experts.pop("task0")
    base.pop("visual.proj")
    experts["task2"][key] = experts["task2"][key] * 2
    assert studio.merge_pool(fresh, "task_arithmetic").keys() == pool.base.keys()
    nan = TaskPool({"w": torch.tensor([float("nan"), 1.0])}, {"a": {"w": torch.ones(2)}}, check_finite=False)
    nan.check_unchanged()   # a NaN among the sampled values equals itself


def test_an_in_place_edit_of_an_entry_the_fingerprint_does_not_sample_is_seen():
    """The fingerprint samples 4 values per tensor; an in-place torch op elsewhere is seen by the version counter
    (without it, the old pool and its merge were reused: 3.0 where 13.0 was right; a test audit)."""
    experts = {"a": {"w": torch.ones(8, 8)}, "b": {"w": torch.ones(8, 8)}}
    base = {"w": torch.zeros(8, 8)}
    assert float(studio.merge(base, experts, "task_arithmetic", alpha=1.0)["w"][1, 3]) == 2.0
    pool = studio.get_pool(base, experts)
    experts["a"]["w"][1, 3] += 10   # flat index 11: the samples are at 0, 16, 32 and 48
    assert float(studio.merge(base, experts, "task_arithmetic", alpha=1.0)["w"][1, 3]) == 12.0
    with pytest.raises(studio.StudioError, match=r"expert 'a': tensor 'w' changed since this pool was built"):
        studio.merge_pool(pool, "task_arithmetic")


def test_a_failing_layer_leaves_the_pool_usable(clip_pool):
    base, experts = clip_pool
    pool = TaskPool(base, experts, device="cpu")
    with pytest.raises(studio.HyperparameterError):
        studio.merge_pool(pool, "tsv_m", rank_fraction=0.9)     # T * k > r on every layer
    merged = studio.merge_pool(pool, "tsv_m")
    assert merged.keys() == base.keys()


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "tsv_m", "iso_c"])
def test_parameters_and_inference_tensors_merge_like_plain_tensors(method):
    """``dict(model.named_parameters())`` and state dicts made under ``torch.inference_mode()`` are common inputs.
    Parameters failed in several methods (or came back with an autograd graph); inference tensors failed in the
    pool's fingerprint (they have no version counter)."""
    base = clip_like_state_dict()
    experts = make_experts(base, 3)
    want = studio.merge(base, experts, method, device="cpu")
    params = studio.merge({k: torch.nn.Parameter(v.clone()) for k, v in base.items()},
                          {n: {k: torch.nn.Parameter(v.clone()) for k, v in sd.items()} for n, sd in experts.items()},
                          method, device="cpu")
    with torch.inference_mode():
        inf_base = {k: v.clone() for k, v in base.items()}
        inf_experts = {n: {k: v.clone() for k, v in sd.items()} for n, sd in experts.items()}
    inference = studio.merge(inf_base, inf_experts, method, device="cpu")
    for k in base:
        assert not params[k].requires_grad and params[k].grad_fn is None, k
        torch.testing.assert_close(params[k], want[k], rtol=0, atol=0)
        torch.testing.assert_close(inference[k], want[k], rtol=0, atol=0)


def test_an_inference_tensor_edited_in_place_is_not_served_from_the_cache():
    """Inference tensors have no version counter, and inside ``torch.inference_mode()`` they can be changed in
    place; an edit away from the fingerprint's sampled entries returned the previous merge."""
    base = clip_like_state_dict()
    with torch.inference_mode():
        inf_base = {k: v.clone() for k, v in base.items()}
        inf_experts = {n: {k: v.clone() for k, v in sd.items()} for n, sd in make_experts(base, 2).items()}
    key = "visual.transformer.resblocks.0.attn.out_proj.weight"
    first = studio.merge(inf_base, inf_experts, "task_arithmetic", alpha=1.0)
    with torch.inference_mode():
        inf_experts["task0"][key][2, 3] += 1.0          # not one of the sampled entries (every numel/4-th)
    second = studio.merge(inf_base, inf_experts, "task_arithmetic", alpha=1.0)
    assert float(second[key][2, 3] - first[key][2, 3]) == pytest.approx(1.0)


def test_clear_pools_forgets_an_untracked_change():
    base = clip_like_state_dict()
    experts = make_experts(base, 2)
    before = studio.merge(base, experts, "task_arithmetic", device="cpu")
    w = experts["task0"]["visual.proj"]
    w.numpy()[1, 1] += 1.0   # no version bump, and not among the sampled values
    studio.engine.clear_pools()
    after = studio.merge(base, experts, "task_arithmetic", device="cpu")
    assert float((after["visual.proj"] - before["visual.proj"]).abs().max()) == pytest.approx(0.3, rel=1e-5)


def test_a_hyperparameter_that_is_not_a_scalar_is_a_clear_error(clip_pool):
    base, experts = clip_pool
    for value in (torch.tensor([0.3, 0.4]), [0.3], "0.3"):
        with pytest.raises(studio.HyperparameterError, match="'alpha' must be a number"):
            studio.merge(base, experts, "task_arithmetic", alpha=value)
    studio.merge(base, experts, "task_arithmetic", alpha=torch.tensor(0.3))   # a 0-d tensor is a number


def test_results_beyond_the_compute_or_output_range_are_errors_naming_the_layer():
    """Finite inputs whose merge cannot be represented came back as inf / NaN, or failed inside LAPACK with
    'ssyevd failed (info = 4)' naming nothing: float32 Gram matrices overflowed for task vectors near 1e19-1e20 (now
    formed again in float64, so TSV-M merges them, as LAPACK's SVD does), and a float16 base plus the summed deltas
    can leave float16's range. Ortho-Merge gave the base back at 1e19 (its rank floor overflowed; an audit)."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.zeros(6, 5)}
    huge = {f"t{i}": {"w": torch.randn(6, 5, generator=g) * 1e20} for i in range(2)}
    auto, exact = (studio.merge(base, huge, "tsv_m", svd_mode=mode)["w"] for mode in ("auto", "exact"))
    assert bool(torch.isfinite(auto).all()) and float(auto.abs().max()) > 1e19
    torch.testing.assert_close(auto, exact, rtol=1e-4, atol=1e-4 * float(exact.abs().max()))
    from studio import _cusolver, _lapack

    for failure in (RuntimeError("LAPACK ssyevr failed (info = 4)"),   # a solver that does not converge
                    _cusolver.SolveError("cusolverDnXsyevBatched: 1 of 16 5 x 5 matrices did not converge", [0],
                                         None, None)):
        def fail(*args, failure=failure, **kwargs):
            raise failure
        studio.engine.clear_pools()   # nothing cached: the merge decomposes again
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_lapack, "eigh_top", fail)
            with pytest.raises(studio.StudioError, match=r"tsv_m: the decomposition of 'w' failed \(.*(LAPACK|cusolver)"
                                                         r".*max \|expert - base\| = 2.*e\+20"):
                studio.merge(base, huge, "tsv_m")
    with pytest.raises(studio.StudioError, match=r"svc: the merged 'w' is not finite in torch.float32: .*; far beyond "
                                                 r"fine-tuning deltas: products of such values overflow float32"):
        studio.merge(base, huge, "task_arithmetic", calibrate="svc")
    out = studio.merge(base, huge, "align_merge_o", svd_mode="exact")["w"]    # its norms: float64, not 0 / inf
    assert bool(torch.isfinite(out).all()) and float(out.abs().max()) > 1e19
    # Ortho-Merge's rank floor overflowed in float32 (the removed sigmas' norm): rank 0, the base, with no word
    three = {f"t{i}": {"w": torch.randn(24, 16, generator=g)} for i in range(3)}
    small = studio.merge({"w": torch.zeros(24, 16)}, three, "ortho_merge")["w"]
    big = studio.merge({"w": torch.zeros(24, 16)}, {n: {"w": e["w"] * 1e19} for n, e in three.items()},
                       "ortho_merge")["w"]
    torch.testing.assert_close(big / 1e19, small, rtol=1e-4, atol=1e-4 * float(small.abs().max()))
    half = {"w": torch.full((2,), 30000.0, dtype=torch.float16)}
    experts = {n: {"w": torch.full((2,), 60000.0, dtype=torch.float16)} for n in "ab"}
    with pytest.raises(studio.StudioError, match=r"merged 'w' is not finite in torch.float16: .*lower the scale"):
        studio.merge(half, experts, "task_arithmetic", alpha=1.0)
    assert studio.merge(half, experts, "task_arithmetic", alpha=0.5)["w"].tolist() == [60000.0, 60000.0]


def test_default_device_follows_the_environment_and_weights_live_on_the_pools_device(monkeypatch, clip_pool):
    from studio.pool import resolve_device

    monkeypatch.setenv("MERGE_STUDIO_DEVICE", "cpu")
    assert resolve_device(None) == torch.device("cpu") == resolve_device("auto")
    if not torch.cuda.is_available():
        monkeypatch.setenv("MERGE_STUDIO_DEVICE", "cuda")
        with pytest.raises(studio.StudioError, match="CUDA is not available"):
            resolve_device(None)
    base, experts = clip_pool
    pool = studio.get_pool(base, experts, device="cpu")
    layer = pool.layer("visual.proj", [1.0, 2.0, 0.0, 1.0])   # a list, converted to a tensor on the pool's device
    assert layer.weights.device == pool.device and layer.weights.dtype == torch.float32
    torch.testing.assert_close(layer.deltas[1], 2 * pool.raw_delta("visual.proj", 1))


def test_a_tsv_m_rank_change_decomposes_no_task_again_and_gives_a_fresh_pools_bits(clip_pool, monkeypatch):
    # TSV-M's per-task decompositions cover every k from half the largest valid one (LayerTasks.svd's cover = r // T),
    # so the rank slider near the default reuses them; each rank is still cut from the same bucket on a fresh pool
    from studio import linalg

    base, experts = clip_pool
    studio.engine.clear_pools()
    pool = studio.get_pool(base, experts)   # the pool studio.compress finds
    studio.merge_pool(pool, "tsv_m")
    solved = []
    gram_svd_many = linalg.gram_svd_many
    monkeypatch.setattr(linalg, "gram_svd_many",
                        lambda *a, **k: solved.extend(m.shape for m in a[0]) or gram_svd_many(*a, **k))
    warm = {f: studio.merge_pool(pool, "tsv_m", rank_fraction=f) for f in (0.2, 0.22)}   # k >= half the default's
    assert not solved
    # TSV-C at a TSV-M rank, on TSV-M's layers (it compresses every matrix by default): the same buckets
    packed = studio.compress(base, experts, rank_fraction=0.2, layer_rule=studio.DEFAULT_LAYER_RULE)
    assert not solved and packed.tasks
    # a rank below half of the largest keeps a smaller bucket of its own: decomposed, not cut from the large one
    warm[0.1] = studio.merge_pool(pool, "tsv_m", rank_fraction=0.1)
    assert solved and all(min(shape) == 12 for shape in solved)   # k = 1 of r = 12, cover 3: bucket 1
    monkeypatch.setattr(linalg, "gram_svd_many", gram_svd_many)
    for f, merged in warm.items():
        fresh = studio.merge_pool(TaskPool(base, experts), "tsv_m", rank_fraction=f)
        assert all(torch.equal(fresh[k], merged[k]) for k in merged), f


def test_a_float64_expert_over_a_float32_base_keeps_its_small_delta():
    """Mixed precision: the difference is taken in float64 and only then rounded (float32_delta), whichever side is
    float64; rounding the float64 side first loses a delta of 1e-9 on weights of 1 entirely."""
    from studio.pool import float32_delta

    base32 = torch.ones(4, 3)
    delta = 1e-9 * torch.arange(1, 13, dtype=torch.float64).view(4, 3)
    for base, expert in ((base32, base32.double() + delta), (base32.double() - delta, base32)):
        torch.testing.assert_close(float32_delta(expert, base).double(), delta, rtol=1e-6, atol=0)
        layer = TaskPool({"w": base}, {"a": {"w": expert}, "b": {"w": expert}}, device="cpu").layer("w")
        torch.testing.assert_close(layer.task_delta(0).double(), delta, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.deltas[1].double(), delta, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare", "iso_c", "iso_cts", "tsv_m", "ties"])
def test_a_frozen_layer_of_half_precision_experts_over_a_float32_base_stays_the_base(method):
    """Experts saved in bfloat16 (or float16) from a float32 base hold a frozen layer as the base rounded: its delta
    was that rounding, which the merge carried (Task Arithmetic 2.4 times bfloat16's rounding, Iso-C 9.7 times; an
    audit of real checkpoints' quirks). A tensor equal to the base rounded to the expert's dtype is unchanged. A
    layer the experts changed merges as their float32 copies do, every entry (one left at the base's rounding may
    have moved by up to half a step: zeroing those entries took 6 experts changed by 1e-2 of the weights from 0.166
    to 0.222 of Task Arithmetic's delta away from their float32 merge), and as without the frozen layer (TIES ranks
    within each layer here: its whole-model ranking counts a frozen layer's zeros, as the official code does)."""
    hparams = {"topk_scope": "layer"} if method == "ties" else {}
    g = torch.Generator().manual_seed(0)
    base = {"vis.w": 0.02 * torch.randn(64, 32, generator=g), "txt.w": 0.02 * torch.randn(64, 32, generator=g)}
    for half in (torch.bfloat16, torch.float16):
        experts = {f"t{i}": {"vis.w": (base["vis.w"] + 1e-3 * torch.randn(64, 32, generator=g)).to(half),
                             "txt.w": base["txt.w"].to(half)} for i in range(4)}
        out = studio.merge(base, experts, method, **hparams)
        assert torch.equal(out["txt.w"], base["txt.w"]), half
        alone = studio.merge({"vis.w": base["vis.w"]}, {n: {"vis.w": e["vis.w"]} for n, e in experts.items()},
                             method, **hparams)
        torch.testing.assert_close(out["vis.w"], alone["vis.w"], rtol=0, atol=0)
        copies = studio.merge({"vis.w": base["vis.w"]}, {n: {"vis.w": e["vis.w"].float()} for n, e in experts.items()},
                              method, **hparams)
        torch.testing.assert_close(out["vis.w"], copies["vis.w"], rtol=0, atol=0)
        changed = studio.merge(base, {n: {"vis.w": e["vis.w"].float(), "txt.w": e["txt.w"].float()}
                                      for n, e in experts.items()}, method, **hparams)
        assert not torch.equal(changed["txt.w"], base["txt.w"])   # as float32 weights, the rounding is a change


def test_exact_mode_takes_lapacks_svd_of_the_sum():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(30, 20)}
    experts = {f"t{i}": {"w": torch.randn(30, 20, generator=g)} for i in range(3)}
    assert TaskPool(base, experts, svd_mode="auto").layer("w").sum_svd_from_gram() is True
    assert TaskPool(base, experts, svd_mode="exact").layer("w").sum_svd_from_gram() is False


def test_rank_buckets_of_a_size_that_is_not_a_power_of_two():
    """ceil(full / 2^(j/4)): at whole octaves too (50 / 4 -> 13, 50 / 8 -> 7), so a rank's bucket is the same on
    every release."""
    from studio.pool import rank_bucket

    assert [rank_bucket(k, 50) for k in range(0, 51)] == [
        1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 11, 13, 13, 15, 15, 18, 18, 18, 22, 22, 22, 22, 25, 25, 25, 30, 30, 30, 30,
        30, 36, 36, 36, 36, 36, 36, 43, 43, 43, 43, 43, 43, 43, 50, 50, 50, 50, 50, 50, 50]


def test_a_pool_is_per_svd_mode():
    """get_pool's cache key includes svd_mode (mutant: key without it gives the 'auto' pool to an 'exact' request)."""
    base = clip_like_state_dict()
    experts = make_experts(base, 2)
    studio.engine.clear_pools()
    auto = studio.get_pool(base, experts, svd_mode="auto")
    exact = studio.get_pool(base, experts, svd_mode="exact")
    assert auto.svd_mode == "auto" and exact.svd_mode == "exact" and exact is not auto


def test_the_pool_cache_evicts_the_least_recently_used_pool():
    """_POOLS keeps the two pools used last (mutant: popitem(last=True) drops the pool just built)."""
    base = clip_like_state_dict()
    sets = [make_experts(base, 2, seed=s) for s in (1, 2, 3)]
    studio.engine.clear_pools()
    first, second, third = (studio.get_pool(base, e) for e in sets)
    assert studio.get_pool(base, sets[2]) is third and studio.get_pool(base, sets[1]) is second
    assert studio.get_pool(base, sets[0]) is not first   # the least recently used went


def test_non_floating_buffers_are_fresh_copies_of_the_base():
    """An integer buffer comes back as the base's values in a tensor of its own (mutant: the base tensor itself,
    so editing the merge edits the base)."""
    base = clip_like_state_dict()
    base["visual.num_batches_tracked"] = torch.tensor([7])
    experts = make_experts({k: v for k, v in base.items() if k != "visual.num_batches_tracked"}, 2)
    for sd in experts.values():
        sd["visual.num_batches_tracked"] = torch.tensor([9])
    out = studio.merge(base, experts, "task_arithmetic")
    assert out["visual.num_batches_tracked"].tolist() == [7]
    assert out["visual.num_batches_tracked"].data_ptr() != base["visual.num_batches_tracked"].data_ptr()


@pytest.mark.parametrize("method", ["task_arithmetic", "tsv_m", "ties"])
def test_an_expert_may_lack_a_non_floating_buffer_or_hold_another(method):
    """Hugging Face CLIP checkpoints saved before transformers 4.31 hold ``position_ids`` (int64), those saved after
    do not: a base of the first kind and experts of the second were refused as missing keys, with a hint about
    prefixes, though such a buffer is the base's in every merge (an audit of real checkpoints' quirks). A missing
    floating tensor is still refused, and a floating tensor where the base has a buffer still names the dtype."""
    base = clip_like_state_dict()
    base["text.position_ids"] = torch.arange(8).unsqueeze(0)
    experts = make_experts({k: v for k, v in base.items() if k != "text.position_ids"}, 3)
    experts["task1"]["text.position_ids"] = torch.arange(8).unsqueeze(0) + 1   # kept: not merged
    experts["task2"]["text.other_ids"] = torch.arange(3)                        # ignored: the base has none
    out = studio.merge(base, experts, method)
    assert list(out) == list(base) and torch.equal(out["text.position_ids"], base["text.position_ids"])
    without = {k: v for k, v in experts["task0"].items() if k != "visual.proj"}
    with pytest.raises(studio.ExpertError, match=r"expert 'task0' is missing 1 key\(s\) of the base, e\.g\. "
                                                 r"\['visual\.proj'\]"):
        studio.merge(base, {**experts, "task0": without}, method)
    floating = {**experts["task0"], "text.position_ids": torch.zeros(1, 8)}
    with pytest.raises(studio.ExpertError, match=r"expert 'task0', key 'text.position_ids': dtype torch.float32 "
                                                 r"where the base has torch.int64"):
        studio.merge(base, {**experts, "task0": floating}, method)


def test_calibrate_hparams_without_a_calibration_are_refused(clip_pool):
    base, experts = clip_pool
    with pytest.raises(studio.HyperparameterError, match=r"calibrate_hparams were given but no calibration"):
        studio.merge(base, experts, "task_arithmetic", calibrate_hparams={"target_guard": False})


def test_the_engine_refuses_too_few_experts_for_a_method(clip_pool, monkeypatch):
    """merge_pool's own min_experts check (the UI's is tested separately; mutant: the engine's check dropped)."""
    from studio.registry import METHODS

    base, experts = clip_pool
    spec = METHODS["task_arithmetic"]
    need = len(experts) + 1
    monkeypatch.setitem(METHODS, "task_arithmetic", spec.__class__(**{**spec.__dict__, "min_experts": need}))
    with pytest.raises(studio.StudioError, match=rf"task_arithmetic needs at least {need} experts, got {len(experts)}"):
        studio.merge(base, experts, "task_arithmetic")


def test_progress_ends_at_one(clip_pool):
    base, experts = clip_pool
    seen: list[tuple[float, str]] = []
    studio.merge(base, experts, "tsv_m", progress=lambda f, m: seen.append((f, m)))
    assert seen[-1] == (1.0, "tsv_m: done")
    assert all(0.0 <= f <= 1.0 for f, _ in seen) and [f for f, _ in seen] == sorted(f for f, _ in seen)


def test_dare_draws_each_layer_from_its_own_stream():
    """Two layers with equal task vectors get different masks (key_seed(seed, key); mutant: the global seed for
    every layer, the same mask on every layer of a shape)."""
    g = torch.Generator().manual_seed(0)
    base = {"a": torch.zeros(8, 6), "b": torch.zeros(8, 6)}
    experts = {}
    for n in ("x", "y"):
        d = torch.randn(8, 6, generator=g)
        experts[n] = {"a": d.clone(), "b": d.clone()}
    out = studio.merge(base, experts, "dare", p=0.5, seed=3)
    assert not torch.equal(out["a"], out["b"])


@pytest.mark.parametrize("ties_consensus", [False, True])
def test_dare_merges_tied_weights_to_the_same_values(ties_consensus):
    """Keys that hold one tensor in the base and in every expert (a tied embedding and head) draw the same masks, so
    they merge equal, as with every other method; keys that an expert holds apart, or equal copies, draw their own
    (mutant: the key's own seed for tied keys; a tie read from the base alone)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(30, 16, generator=g)
    base = {"emb": w, "mid": torch.randn(5, generator=g), "head": w, "copy": w.clone()}
    experts = {}
    for n in ("x", "y", "z"):
        e = w + 0.01 * torch.randn(30, 16, generator=g)
        experts[n] = {"emb": e, "mid": base["mid"] + 1, "head": e, "copy": e.clone()}
    out = studio.merge(base, experts, "dare", p=0.5, seed=3, ties_consensus=ties_consensus, device="cpu")
    assert torch.equal(out["emb"], out["head"]) and not torch.equal(out["emb"], out["copy"])
    experts["z"] = dict(experts["z"], head=experts["z"]["head"].clone())   # z holds them apart: no longer tied
    out = studio.merge(base, experts, "dare", p=0.5, seed=3, ties_consensus=ties_consensus, device="cpu")
    assert not torch.equal(out["emb"], out["head"])
    assert TaskPool(base, experts).tied_key("head") == "head"


def test_a_bfloat16_result_beyond_its_range_is_an_error():
    """bfloat16 has float32's exponent but a smaller maximum: a float32 sum just under float32's max rounds to inf in
    bfloat16 (mutant: only float16 results re-checked)."""
    base = {"w": torch.full((2,), 3.0e38, dtype=torch.bfloat16)}
    experts = {n: {"w": torch.full((2,), 3.2e38, dtype=torch.bfloat16)} for n in "ab"}
    with pytest.raises(studio.StudioError, match=r"merged 'w' is not finite in torch.bfloat16"):
        studio.merge(base, experts, "task_arithmetic", alpha=1.0)   # 3.4027e38 in float32, inf in bfloat16


@pytest.mark.parametrize("shape", [(6, 1), (1, 6)])
def test_tensors_with_a_dimension_of_one_are_not_matrices_and_get_the_vector_rule(shape):
    """[n, 1] and [1, n] tensors are never matrices (mutants: `min(shape) < 1`, `shape[0] < 2`): TSV-M gives them the
    mean of the task vectors, as every vector."""
    for rule in (studio.DEFAULT_LAYER_RULE, studio.SKIP_EMBEDDINGS, studio.ALL_MATRICES):
        assert not rule.is_matrix("visual.transformer.resblocks.0.mlp.c_fc.weight", shape)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(shape, generator=g), "m": torch.randn(6, 5, generator=g)}
    experts = {f"t{i}": {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(3)}
    out = studio.merge(base, experts, "tsv_m", alpha=1.0)
    mean = torch.stack([sd["w"] - base["w"] for sd in experts.values()]).mean(0)
    torch.testing.assert_close(out["w"], base["w"] + mean)


def test_a_preference_sequence_longer_than_the_experts_is_refused(clip_pool):
    """One weight per task: an extra weight is an error, not dropped (mutant: only too few weights refused)."""
    base, experts = clip_pool
    with pytest.raises(studio.StudioError, match=rf"preferences has {len(experts) + 1} weights but there are "
                                                 rf"{len(experts)} experts"):
        studio.merge(base, experts, "task_arithmetic", preferences=[1.0] * (len(experts) + 1))


def test_a_boolean_preference_is_refused_naming_the_task(clip_pool):
    """True is not a weight (mutant: booleans taken as 1 / 0), nor NumPy's True (it was taken as 1.0)."""
    base, experts = clip_pool
    for prefs in ({"task1": True}, [1.0, True] + [1.0] * (len(experts) - 2), {"task1": np.True_}):
        with pytest.raises(studio.StudioError, match=r"preference for task 'task1' is (True|np\.True_); "
                                                     r"expected a finite number"):
            studio.merge(base, experts, "task_arithmetic", preferences=prefs)


def test_a_non_finite_base_is_refused_naming_the_key():
    """The base is scanned too (mutant: only the experts were; the NaN then reached the merge)."""
    base = {"w": torch.tensor([float("nan"), 0.0]), "v": torch.zeros(2)}
    experts = {n: {"w": torch.ones(2), "v": torch.ones(2)} for n in "ab"}
    studio.engine.clear_pools()
    with pytest.raises(studio.ExpertError, match=r"base, key 'w' contains NaN or infinite values"):
        studio.merge(base, experts, "task_arithmetic")
    base["w"] = torch.tensor([float("inf"), 0.0])
    with pytest.raises(studio.ExpertError, match=r"base, key 'w' contains NaN or infinite values"):
        studio.merge(base, experts, "task_arithmetic")


def test_an_expert_tensor_of_another_shape_with_as_many_entries_is_refused(clip_pool):
    """A transposed (or reshaped) tensor has the base's number of entries but not its shape (mutant: numel
    compared instead of the shape)."""
    base, experts = clip_pool
    key = "visual.proj"
    bad = dict(experts, task1=dict(experts["task1"], **{key: experts["task1"][key].t().contiguous()}))
    rows, cols = base[key].shape
    with pytest.raises(studio.ExpertError, match=rf"expert 'task1', key '{key}': shape \({cols}, {rows}\) does not "
                                                 rf"match the base's \({rows}, {cols}\)"):
        studio.merge(base, bad, "task_arithmetic")


def test_experts_named_with_another_prefix_are_told_so():
    """Experts saved under another checkpoint's naming (``model.visual.proj`` beside ``visual.proj``) were refused as
    missing every key, with a hint about keeping one tower; the message now names the prefix that differs (from an
    I/O audit), for one expert, for all of them, and for a prefixed base. Another difference keeps the old hint. A
    checkpoint's wrapper (``{"state_dict": ..., "epoch": 3}``) is named as such."""
    base = {"visual.a": torch.zeros(2, 2), "visual.b": torch.zeros(2)}
    one = {k: v + 1 for k, v in base.items()}
    prefixed = {"model." + k: v for k, v in one.items()}
    said = "every key of expert 'x' is a key of the base with 'model.' before it (another checkpoint's naming)"
    for experts in ({"x": prefixed}, {"x": prefixed, "y": prefixed}, {"y": one, "x": prefixed}):
        with pytest.raises(studio.ExpertError, match=re.escape(said)):
            studio.merge(base, experts, "task_arithmetic")
    with pytest.raises(studio.ExpertError, match=re.escape("every key of the base is one of expert 'x' with 'model.' "
                                                           "before it")):
        studio.merge({"model." + k: v for k, v in base.items()}, {"x": one}, "task_arithmetic")
    with pytest.raises(studio.ExpertError, match=r"is missing 1 key\(s\) of the base, e.g. \['visual.b'\]; the base "
                                                 r"and every expert need the same keys"):
        studio.merge(base, {"x": {"visual.a": one["visual.a"], "visual.c": one["visual.b"]}}, "task_arithmetic")
    # a checkpoint's wrapper in place of its state dict: its keys were reported missing, with the prefix hint
    wrapped = {"state_dict": one, "epoch": 3}
    with pytest.raises(studio.ExpertError, match=re.escape("expert 'x' holds a mapping under 'state_dict', not a "
                                                           "tensor: a checkpoint's wrapper? Pass its state dict itself "
                                                           "(checkpoint['state_dict'])")):
        studio.merge(base, {"y": one, "x": wrapped}, "task_arithmetic")
    with pytest.raises(studio.ExpertError, match=re.escape("the base holds a mapping under 'state_dict'")):
        studio.merge(wrapped, {"x": one}, "task_arithmetic")


@pytest.mark.parametrize("method, calibrate", [("task_arithmetic", None), ("weight_average", None),
                                               ("tsv_m", "align_merge_b"), ("ties", "svc")])
def test_a_merge_of_views_is_contiguous_and_saves_with_safetensors(tmp_path, method, calibrate):
    """Transposed views as the base and the experts (and a non-floating buffer): the merge followed their strides, and
    safetensors' save_file refused it (an audit of real checkpoints' quirks)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 24, generator=g)
    base = {"w": w.t(), "ids": torch.arange(6).reshape(2, 3).t()}
    experts = {t: {"w": (w + 0.01 * torch.randn(16, 24, generator=g)).t(), "ids": base["ids"]} for t in "ab"}
    out = studio.merge(base, experts, method, calibrate=calibrate)
    assert all(t.is_contiguous() for t in out.values())
    assert torch.equal(out["ids"], base["ids"])
    save_file(out, str(tmp_path / "m.safetensors"))


@pytest.mark.parametrize("method", [m["name"] for m in studio.list_methods() if m["kind"] == "merge"])
def test_batchnorm_running_statistics_are_the_experts_mean(method):
    """open_clip's ResNet CLIP models hold BatchNorm running statistics: merged as task vectors, a running variance
    went negative (Task Arithmetic's default on 5 of 64 channels of experts whose variances were 0.3-1.2 times the
    base's, DARE's on 13), which makes BatchNorm give NaN (an audit of real checkpoints' quirks). Each is the experts'
    mean, weighted by the preferences, whatever the method, its scale and a calibration; the other tensors merge as
    without them (TIES's whole-model ranking leaves them out)."""
    g = torch.Generator().manual_seed(0)
    weights = {"conv.weight": torch.randn(8, 8, generator=g), "fc.weight": torch.randn(6, 8, generator=g)}
    stats = {"bn.running_mean": torch.randn(64, generator=g), "bn.running_var": torch.ones(64)}
    base = {**weights, **stats, "bn.num_batches_tracked": torch.tensor(0)}
    experts = {f"t{i}": {**{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
                         "bn.running_mean": stats["bn.running_mean"] + torch.randn(64, generator=g),
                         "bn.running_var": 0.3 + 0.9 * torch.rand(64, generator=g),
                         "bn.num_batches_tracked": torch.tensor(1000)} for i in range(4)}
    prefs = [0.1, 0.2, 0.3, 0.4]
    for kwargs in ({}, {"preferences": prefs}, {"calibrate": "svc"}, {"calibrate": "svc", "preferences": prefs}):
        out = studio.merge(base, experts, method, **kwargs)
        p = torch.tensor(kwargs.get("preferences", [0.25] * 4))
        for key in stats:
            want = base[key] + sum(pi * (e[key] - base[key]) for pi, e in zip(p.tolist(), experts.values()))
            torch.testing.assert_close(out[key], want, rtol=1e-6, atol=1e-6)
        assert bool((out["bn.running_var"] > 0).all()) and int(out["bn.num_batches_tracked"]) == 0
        alone = studio.merge(weights, {n: {k: e[k] for k in weights} for n, e in experts.items()}, method, **kwargs)
        for key in weights:
            assert torch.equal(out[key], alone[key]), (method, kwargs, key)


def test_a_layer_rule_that_leaves_no_matrix_is_refused_and_one_without_effect_is_said():
    """A rule excluding every 2-D tensor (a pattern such as ``.``) turned a spectral method into the scaled mean and a
    calibration into nothing, without a word; a rule given to an elementwise method is said to do nothing; a rule
    built with other patterns is not labelled with a preset's name (an audit of the layer rules)."""
    from studio.layers import LayerRule
    from studio.schema import HyperparameterError, StudioError

    base = clip_like_state_dict()
    experts = make_experts(base, 3)
    dot = {"exclude": ["."]}
    for method, kwargs, who in (("tsv_m", {}, "tsv_m"), ("iso_cts", {}, "iso_cts"),
                                ("task_arithmetic", {"calibrate": "svc"}, "svc"),
                                ("ties", {"calibrate": "align_merge_b"}, "align_merge_b")):
        with pytest.raises(HyperparameterError, match=rf"^{who}: layer rule 'custom' \(exclude \['\.'\]\) leaves "
                                                      rf"none of the experts' \d+ 2-D tensors \(e\.g\. '"):
            studio.merge(base, experts, method, layer_rule=dot, **kwargs)
    with pytest.raises(HyperparameterError, match=r"^compress: layer rule 'custom' \(exclude \['\.'\]\) leaves"):
        studio.compress(base, experts, layer_rule=dot)
    keep_one = [k for k in base if base[k].dim() == 2][0]   # a rule that keeps one matrix merges
    studio.merge(base, experts, "tsv_m", layer_rule={"exclude": [f"^(?!{re.escape(keep_one)}$)"]})
    with pytest.warns(UserWarning, match="task_arithmetic treats every tensor alike: layer_rule 'skip_embeddings' "
                                         "has no effect"):
        studio.merge(base, experts, "task_arithmetic", layer_rule="skip_embeddings")
    assert LayerRule().name == "default" and LayerRule() == studio.DEFAULT_LAYER_RULE
    assert LayerRule(exclude=()).name == "custom" and LayerRule(exclude=["text_projection"]).name == "default"
    with pytest.raises(StudioError, match=r"layer rule 'default' is a preset, which excludes \['text_projection'\]; "
                                          r"a rule that excludes \[\] needs a name of its own"):
        LayerRule(exclude=(), name="default")
