"""Contract tests run over EVERY registered method and calibration (new methods are covered automatically)."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
import torch

import studio
from studio.registry import CALIBRATIONS, METHODS, get_method
from studio.schema import HyperparameterError

from .conftest import clip_like_state_dict, make_experts

studio.list_methods()  # import every method module
MERGE_NAMES = sorted(METHODS)
CAL_NAMES = sorted(CALIBRATIONS)


def _assert_like_base(merged, base):
    assert list(merged) == list(base)
    for k, v in base.items():
        assert merged[k].shape == v.shape, k
        assert merged[k].dtype == v.dtype, k
        assert torch.isfinite(merged[k].float()).all(), k


def test_all_reference_methods_are_registered():
    expected = {"weight_average", "task_arithmetic", "ties", "dare", "breadcrumbs", "tsv_m", "iso_c", "iso_cts",
                "ortho_merge", "align_merge_b", "align_merge_o"}
    assert expected <= set(METHODS), sorted(expected - set(METHODS))
    assert {"svc", "align_merge_b"} <= set(CALIBRATIONS)


@pytest.mark.parametrize("name", MERGE_NAMES + [f"cal:{c}" for c in CAL_NAMES])
def test_schema_matches_function_signature(name):
    spec = CALIBRATIONS[name[4:]] if name.startswith("cal:") else METHODS[name]
    sig = inspect.signature(spec.fn)
    injected = {"layer", "seed", "merged", "scale", "preferences", "base_method", "merged_tag", "merged_svd",
                "model_state"}
    fn_params = {p for p in sig.parameters if p not in injected}
    schema = {p.name for p in spec.params if not p.post_scale}
    assert fn_params == schema, f"{spec.name}: function takes {sorted(fn_params)}, schema declares {sorted(schema)}"
    svd_of = spec.extra.get("merged_svd")   # the SVD provider a calibration calls with the method's hyperparameters
    if svd_of is not None:
        own = set(inspect.signature(svd_of).parameters) - {"layer", "merged"} \
            - ({"preferences"} if spec.extra.get("uses_preferences") else set())   # given as to the method
        assert own == schema, f"{spec.name}: merged_svd takes {sorted(own)}, schema declares {sorted(schema)}"
    listed = {p["name"]: p for p in spec.to_dict()["params"]}
    for p in spec.params:
        assert p.help and p.paper, f"{spec.name}.{p.name} needs help text and a paper reference"
        p.validate(p.default, spec.name)  # every default is valid
        if p.type in (int, float) and p.choices is None:   # the range list_methods gives is the one errors name
            assert listed[p.name]["range"] == p.range_text()
            with pytest.raises(studio.StudioError, match=re.escape(f"allowed range {listed[p.name]['range']}")):
                p.validate((p.high if p.high is not None else 0.0) + 1e6, spec.name)
        else:
            assert listed[p.name]["range"] is None
    assert spec.paper and spec.summary


#: a setting of each method with a ``merged_svd`` other than its defaults (and, for a method that takes them,
#: preferences other than uniform), under which its merge differs from the default one
OTHER_SETTINGS = {"tsv_m": {"rank_fraction": 0.125}, "align_merge_o": {"eta": "dominant", "align_signs": False},
                  "align_merge_b": {"alpha": 0.5}}


@pytest.mark.parametrize("name", sorted(n for n, s in METHODS.items() if s.extra.get("merged_svd")))
def test_merged_svd_is_an_svd_of_the_merge_at_other_hyperparameters(name):
    """A calibration after these methods rescales the factors their ``merged_svd`` gives for the method's own
    hyperparameters: they must be an SVD of the very merged delta. A provider that dropped TSV-M's ``rank_fraction``
    or AlignMerge-B's preferences gave the factors of the default merge (SVC after them 15 % and 2.7 % off; a test
    audit), which the signature check above cannot see."""
    spec = METHODS[name]
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(24, 16)}
    pool = studio.TaskPool(base, {f"t{i}": {"w": torch.randn(24, 16, generator=g)} for i in range(4)})
    layer = pool.layer("w")
    kw = dict(OTHER_SETTINGS[name])
    if spec.extra.get("uses_preferences"):
        kw["preferences"] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    merged = spec.fn(layer, **kw)
    U, S, Vh = spec.extra["merged_svd"](layer, merged, **kw)
    assert float(((U * S) @ Vh - merged).norm() / merged.norm()) < 1e-5
    default = spec.fn(layer, **{p.name: p.default for p in spec.params if not p.post_scale})
    assert float((default - merged).norm() / merged.norm()) > 1e-2   # the setting changes the merge


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", MERGE_NAMES)
def test_shapes_dtypes_determinism(name, dtype):
    base = clip_like_state_dict(dtype=dtype)
    experts = make_experts(base, 4)
    a = studio.merge(base, experts, name, svd_mode="exact")
    _assert_like_base(a, base)
    studio.engine._POOLS.clear()
    b = studio.merge(base, experts, name, svd_mode="exact")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


#: (svd_mode, calibrate) of the permutation test: each mode alone, and each calibration after the method in each.
PERMUTATION_CASES = [(mode, c) for mode in ("exact", "auto") for c in (None, *CAL_NAMES)]


@pytest.mark.parametrize("svd_mode,calibrate", PERMUTATION_CASES)
@pytest.mark.parametrize("name", MERGE_NAMES)
def test_permuting_experts(name, svd_mode, calibrate):
    """Merges are symmetric in the experts, DARE too (each task's mask has a stream of its own). Two
    orders: the reversal, and a cycle (which is not its own inverse). A calibration after any base method is as
    symmetric as the method. Where the base method's merged spectrum has near-tied pairs (TSV-M, AlignMerge-O: the
    tasks' singular values side by side), decomposing the float32 merged delta turned them with the rounding, and
    the order moved AlignMerge-O + SVC by 2.5e-3; the calibration now takes those methods' own factors (the
    registry's ``merged_svd``)."""
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    a = studio.merge(base, experts, name, svd_mode=svd_mode, calibrate=calibrate)
    names = list(experts)
    for order in (names[::-1], names[1:] + names[:1]):
        b = studio.merge(base, {n: experts[n] for n in order}, name, svd_mode=svd_mode, calibrate=calibrate)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5,
                                       msg=f"{name} + {calibrate}: {k} in the order {order}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", MERGE_NAMES)
def test_half_precision_merges_are_the_float32_merge_of_the_same_weights(name, dtype):
    """Half-precision weights are merged in float32 (the differences of their float32 values), and only the result
    is rounded to the inputs' dtype: the same bits as the float32 merge of the same (rounded) weights, cast."""
    base = clip_like_state_dict(dtype=dtype)
    experts = make_experts(base, 3)
    half = studio.merge(base, experts, name, seed=0)
    full = studio.merge({k: v.float() if v.is_floating_point() else v for k, v in base.items()},
                        {n: {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
                         for n, sd in experts.items()}, name, seed=0)
    for k, v in half.items():
        assert v.dtype == base[k].dtype, k
        assert torch.equal(v, full[k].to(v.dtype)), f"{name}: {k}"


@pytest.mark.parametrize("name", MERGE_NAMES)
def test_zero_task_vectors_give_the_base(name):
    base = clip_like_state_dict()
    experts = {f"t{i}": {k: v.clone() for k, v in base.items()} for i in range(3)}
    merged = studio.merge(base, experts, name)
    for k in base:
        torch.testing.assert_close(merged[k], base[k], msg=f"{name}: {k}")


@pytest.mark.parametrize("name", MERGE_NAMES)
def test_float64_checkpoints_merge_their_deltas_not_rounded_weights(name):
    """The merged delta of float64 weights is the merge of their float32 task vectors: the weights are subtracted
    before rounding. Rounding the weights first (the old raw_delta) put ~|base| x 6e-8 of noise on every delta:
    with a base of ~1000 and deltas of ~1e-3, 1-30 % of the merged delta."""
    small = make_experts(clip_like_state_dict(), 3, scale=1e-3)
    zero = {k: torch.zeros_like(v) for k, v in clip_like_state_dict().items()}
    deltas = {n: {k: v - clip_like_state_dict()[k] for k, v in sd.items()} for n, sd in small.items()}
    base64 = {k: 1000.0 + v.double() for k, v in clip_like_state_dict().items()}
    experts64 = {n: {k: base64[k] + d.double() for k, d in sd.items()} for n, sd in deltas.items()}
    a = studio.merge(base64, experts64, name, seed=0, svd_mode="exact")
    b = studio.merge(zero, deltas, name, seed=0, svd_mode="exact")
    for k in base64:
        assert a[k].dtype == torch.float64
        torch.testing.assert_close((a[k] - base64[k]).float(), b[k], rtol=1e-4, atol=1e-4 * float(b[k].abs().max()),
                                   msg=f"{name}: {k}")


#: Methods whose preferences weight an aggregation over the tasks rather than the task matrices (AlignMerge-B's merge
#: form is Task Arithmetic + its calibration), so a task weighted 0 still enters the sum they calibrate.
_AGGREGATION_PREFERENCES = {"align_merge_b"}


@pytest.mark.parametrize("svd_mode", ["auto", "exact"])
@pytest.mark.parametrize("name", sorted(set(MERGE_NAMES) - _AGGREGATION_PREFERENCES))
def test_a_task_weighted_zero_is_an_expert_that_changed_nothing(name, svd_mode):
    """Preferences scale each task matrix by ``p_i / max p``, so ``p_i = 0`` must give the merge in which expert ``i``
    equals the base: its singular vectors (which a zero matrix does not have) must not steer the others' merge.
    AlignMerge-O summed a weighted-out task's top vector into ``u_top`` before the pool zeroed them."""
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    prefs = {"task0": 1.0, "task1": 2.0, "task2": 0.0, "task3": 1.0}
    unchanged = {**experts, "task2": {k: v.clone() for k, v in base.items()}}
    a = studio.merge(base, experts, name, preferences=prefs, svd_mode=svd_mode)
    b = studio.merge(base, unchanged, name, preferences=prefs, svd_mode=svd_mode)
    for k in base:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.parametrize("cal", CAL_NAMES)
@pytest.mark.parametrize("name", ["task_arithmetic", "ties"])
def test_calibrations_compose_after_base_methods(name, cal):
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    merged = studio.merge(base, experts, name, calibrate=cal)
    _assert_like_base(merged, base)
    one_hot = studio.merge(base, experts, name, calibrate=cal, preferences={"task0": 1.0})
    _assert_like_base(one_hot, base)


@pytest.mark.parametrize("cal", CAL_NAMES)
@pytest.mark.parametrize("name", ["iso_c", "iso_cts", "ortho_merge", "task_arithmetic", "ties"])
def test_calibrations_do_not_depend_on_the_svd_basis_of_a_flat_merge(name, cal):
    """Iso-C, Iso-CTS and Ortho-Merge return ``sigma_bar`` times a partial isometry: a flat spectrum, whose SVD basis
    is any rotation LAPACK settles on. The calibrations rescale per singular direction, so they must not take that
    basis as it comes (before ``sum_ordered_svd`` a tensor moved by 0.38-3.2 of its delta between SVD modes or
    expert orders here)."""
    base = clip_like_state_dict(width=16)
    experts = make_experts(base, 3)
    reordered = {n: experts[n] for n in ("task2", "task0", "task1")}
    ref = studio.merge(base, experts, name, calibrate=cal)
    for other in (studio.merge(base, experts, name, calibrate=cal, svd_mode="exact"),
                  studio.merge(base, reordered, name, calibrate=cal)):
        for k in base:
            err = float((other[k] - ref[k]).norm() / (ref[k] - base[k]).norm().clamp_min(1e-30))
            assert err < 1e-4, f"{name} + {cal}, {k}: {err:.1e}"


@pytest.mark.parametrize("name", MERGE_NAMES)
def test_out_of_range_hparams_name_the_value(name):
    base = clip_like_state_dict()
    experts = make_experts(base, 3)
    for p in get_method(name).params:
        if p.high is not None:
            with pytest.raises(HyperparameterError, match=p.name):
                studio.merge(base, experts, name, **{p.name: p.high + 1})
    with pytest.raises(HyperparameterError, match="unknown hyperparameter"):
        studio.merge(base, experts, name, not_a_param=1)


@pytest.mark.parametrize("svd_mode", ["auto", "exact"])
def test_a_float64_default_dtype_changes_no_merge(svd_mode):
    """A caller's ``torch.set_default_dtype(torch.float64)`` (common in research scripts) made TIES + SVC and TIES +
    AlignMerge-B raise a dtype mismatch, and it changes every allocation and random draw that leaves the dtype to
    the default: every method, every calibration after TIES and DARE, and the preference-weighted merge give the same
    bits under either default."""
    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    runs = [(name, {}) for name in MERGE_NAMES]
    runs += [(name, {"calibrate": cal}) for name in ("ties", "dare", "breadcrumbs") for cal in CAL_NAMES]
    runs += [("tsv_m", {"preferences": {"task0": 3, "task1": 1}}), ("dare", {"seed": 3, "p": 0.5})]

    def merge_all():
        studio.engine.clear_pools()
        return [studio.merge(base, experts, name, svd_mode=svd_mode, **kw) for name, kw in runs]

    want = merge_all()
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = merge_all()
    finally:
        torch.set_default_dtype(before)
    for (name, kw), a, b in zip(runs, want, got):
        _assert_like_base(b, base)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=f"{name} {kw} {k}")


@pytest.mark.parametrize("name", ["align_merge_b", "align_merge_o", "iso_c", "iso_cts", "ortho_merge", "tsv_m"])
def test_an_expert_equal_to_the_base_merges_alike_in_both_svd_modes(name):
    """Without preferences, an expert that left a layer unchanged is a zero task matrix: LAPACK's singular vectors
    for its zero singular values are arbitrary (the identity's columns on a CPU) and must not steer the merge in
    svd_mode="exact" (the auto mode's Gram route has zero vectors there). AlignMerge-O moved by 57 % without it."""
    from .conftest import worst_error

    base = clip_like_state_dict()
    experts = make_experts(base, 4)
    experts["task2"] = {k: v.clone() for k, v in base.items()}
    exact = studio.merge(base, experts, name, svd_mode="exact")
    auto = studio.merge(base, experts, name)
    assert worst_error(base, exact, auto)[0] < 2e-4


def _param(method: str, name: str):
    spec = get_method(method) if method in studio.registry.METHODS else studio.registry.get_calibration(method)
    (p,) = [p for p in spec.params if p.name == name]
    return p


def test_integer_params_refuse_fractions():
    """ortho_merge's k is an int (mutant: the is_integer() check dropped, 2.5 truncated to 2)."""
    k = _param("ortho_merge", "k")
    assert k.validate(3.0, "ortho_merge") == 3 and isinstance(k.validate(np.float32(3.0), "ortho_merge"), int)
    with pytest.raises(HyperparameterError,
                       match=r"ortho_merge: 'k' must be an integer \(int in \[1, 512\]\), got 2\.5"):
        k.validate(2.5, "ortho_merge")


def test_none_is_refused_unless_the_param_is_automatic():
    """None is the automatic default only where the param has one (mutant: None accepted for every param, alpha=None
    reached the merge); describe() names the automatic rule (mutant: ', default 1/T' dropped from the messages)."""
    alpha = _param("task_arithmetic", "alpha")
    with pytest.raises(HyperparameterError, match=r"'alpha' must not be None \(float in \[0, 5\]\)"):
        alpha.validate(None, "task_arithmetic")
    assert _param("tsv_m", "rank_fraction").validate(None, "tsv_m") is None   # automatic: 1/T
    assert _param("tsv_m", "rank_fraction").describe() == "float in (0, 1/T], default 1/T"


def test_seeds_are_int64_and_not_booleans():
    """check_seed: [-2^63, 2^63) (mutant: 2^63 accepted, it overflows int64 in recipes / the API) and no booleans
    (mutant: True taken as seed 1)."""
    from studio.schema import check_seed

    assert check_seed(2 ** 63 - 1) == 2 ** 63 - 1 and check_seed(-2 ** 63) == -2 ** 63
    for bad in (2 ** 63, True, np.True_, 1.5, float("inf")):
        with pytest.raises(HyperparameterError, match=r"seed must be an integer in \[-2\^63, 2\^63\)"):
            check_seed(bad)


def test_registration_refuses_two_post_scales_and_a_name_taken(monkeypatch):
    """A method has at most one post_scale param (mutant: `> 2`), and a name is registered once (mutant: a second
    registration silently replaced the method)."""
    from studio.registry import METHODS, register
    from studio.schema import Param

    two = (Param("a", float, 1.0, post_scale=True), Param("b", float, 1.0, post_scale=True))
    with pytest.raises(ValueError, match="at most one post_scale param"):
        register("gaps_c_two_scales", params=two, paper="", summary="")
    monkeypatch.setitem(METHODS, "task_arithmetic", get_method("task_arithmetic"))   # restored whatever happens
    with pytest.raises(ValueError, match="merge 'task_arithmetic' registered twice"):
        register("task_arithmetic", paper="", summary="")(lambda layer: layer.deltas.sum(0))
