"""The app's service layer on the real embedded MiniSuite: requests, merge/export reproducibility, diagnostics,
optimisation and the prediction gallery, each checked against an independent computation."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import studio
from studio.evaluate import evaluate, predict
from studio.io import Recipe, load_state_dict, merge_from_recipe, read_metadata, RECIPE_METADATA_KEY
from studio.registry import get_calibration, get_method
from studio.schema import HyperparameterError, StudioError
from studio.ui.backend import RequestError, Studio


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    """Every test here runs with one torch thread (see ``conftest.one_torch_thread``)."""


@pytest.fixture(scope="module")
def st() -> Studio:
    from studio.suite import default_suite

    return Studio(default_suite(), device="cpu")


@pytest.fixture(scope="module")
def two(st: Studio) -> list[str]:
    return st.task_names[:2]


def test_layer_keys_are_the_default_rule_matrices(st: Studio):
    keys = st.layer_keys()
    assert keys and all(st.suite.base[k].dim() == 2 for k in keys)
    assert st.default_layer() in keys
    assert any(".resblocks." in k for k in keys) and "visual.proj" in keys


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(method="task_arithmetic", experts=[]), RequestError, "no expert selected"),
    (dict(method="task_arithmetic", experts=["nope"]), RequestError, "unknown expert"),
    (dict(method="no_such_method", experts=None), StudioError, "unknown merging method 'no_such_method'"),
    (dict(method="task_arithmetic", experts=None, hparams={"alpha": 7.5}), HyperparameterError,
     r"outside the allowed range \[0, 5\]"),
    (dict(method="task_arithmetic", experts=None, hparams={"alhpa": 1}), HyperparameterError, "unknown hyperparameter"),
    (dict(method="task_arithmetic", experts=None, hparams="{oops"), StudioError, "not valid JSON"),
    (dict(method="task_arithmetic", experts=None, calibrate="none", calibrate_hparams={"alpha": 1}),
     HyperparameterError, "no calibration"),
    (dict(method="task_arithmetic", experts=None, calibrate="nope"), StudioError, "unknown calibration"),
    (dict(method="task_arithmetic", experts=None, preferences={"zzz": 1.0}), RequestError, "not selected"),
    (dict(method="task_arithmetic", experts=None, preferences={"@0": -1.0}), StudioError, "finite number >= 0"),
    (dict(method="dare", experts=None, seed=2**64), RequestError, r"seed must be an integer in \[-2\^63"),
    (dict(method="dare", experts=None, seed=1.7), RequestError, "seed must be an integer"),
    # values of the wrong kind through the API were TypeErrors, letters of a name or the wrong message
    (dict(method=5, experts=None), RequestError, "the method must be a method's name, got 5; choose one of"),
    (dict(method="task_arithmetic", experts="digits"), RequestError,
     r"experts must be a list of expert names, got 'digits' \(one expert: \['digits'\]\)"),
    (dict(method="task_arithmetic", experts={"digits": 1}), RequestError, "experts must be a list of expert names"),
    (dict(method="task_arithmetic", experts=[["digits"]]), RequestError, r"\(strings\), got \['digits'\] among"),
    (dict(method="task_arithmetic", experts=None, preferences=5), RequestError,
     "preferences must be a mapping task -> weight"),
    (dict(method="task_arithmetic", experts=None, preferences=[1, 2]), RequestError,
     "preferences must be a mapping task -> weight"),
    # 0, False and [] were taken as "no preferences" (equal weights, none in the recipe): an API audit
    *[(dict(method="task_arithmetic", experts=None, preferences=bad), RequestError,
       r'preferences must be a mapping task -> weight \(JSON object\), e\.g\. \{"@0": 2\}, got ')
      for bad in (0, False, [], 0.0)],
    (dict(method="task_arithmetic", experts=None, preferences="[1"), StudioError,
     r'preferences: not valid JSON .*; expected e\.g\. \{"@0": 2\}$'),
    (dict(method="task_arithmetic", experts=None, preferences={"@0": 10**400}), RequestError,
     "beyond a float's range"),
    (dict(method="task_arithmetic", experts=None, hparams='{"alpha": ' + "9" * 5000 + "}"), StudioError,
     "hyperparameters: holds an integer of more than 4300 digits"),
    (dict(method="ortho_merge", experts=None, hparams={"k": 10**30}), HyperparameterError,
     r"'k' = 1000000000000000000000000000000 is outside the allowed range \[1, 512\]"),
    (dict(method="ortho_merge", experts=None, hparams={"k": 2.5}), HyperparameterError,
     r"'k' must be an integer \(.*\[1, 512\]"),
])
def test_invalid_requests_raise_readable_errors(st: Studio, two, kwargs, error, match):
    kwargs = dict(kwargs)
    if kwargs["experts"] is None:
        kwargs["experts"] = two
    if isinstance(kwargs.get("preferences"), dict) and "@0" in kwargs["preferences"]:
        kwargs["preferences"] = {two[0]: kwargs["preferences"]["@0"]}
    with pytest.raises(error, match=match.replace("@0", two[0])):
        st.request(**kwargs)


def test_too_few_experts_for_a_method(st: Studio, two, monkeypatch):
    # No registered method may need more experts than the suite has; emulate one that needs 3.
    from studio.registry import METHODS

    spec = METHODS["task_arithmetic"]
    monkeypatch.setitem(METHODS, "task_arithmetic", spec.__class__(**{**spec.__dict__, "min_experts": 3}))
    with pytest.raises(RequestError, match="needs at least 3 experts, 2 selected"):
        st.request("task_arithmetic", {}, two)


def test_request_normalises_order_defaults_and_uniform_preferences(st: Studio, two):
    req = st.request("task_arithmetic", {}, list(reversed(two)), "none", "{}", {two[0]: 2.0, two[1]: 2.0})
    assert req.experts == tuple(two)                 # suite order: same pool, same recipe whatever the click order
    assert req.hparams == {"alpha": 0.3}             # schema default filled in
    assert req.calibrate is None and req.preferences is None  # uniform preferences = no preferences
    req = st.request("task_arithmetic", '{"alpha": 1}', two, preferences={two[0]: 3.0})
    assert req.preferences == {two[0]: 3.0, two[1]: 1.0}  # unspecified selected tasks default to weight 1


def test_request_from_state_ignores_deselected_preferences(st: Studio, two):
    req = st.request_from_state("task_arithmetic", {"task_arithmetic": {"alpha": 0.5}}, two, "none", {},
                                {two[0]: 1.0, two[1]: 0.5, st.task_names[-1]: 9.0})
    assert req.hparams == {"alpha": 0.5} and req.preferences == {two[0]: 1.0, two[1]: 0.5}


def test_request_from_state_takes_the_values_as_the_controls_show_them(st: Studio):
    """The page holds what was set: a rank fraction set for 4 experts (0.25) is shown at the end of the range for
    5 (0.2) and merged so; a number typed beyond a slider's end (Breadcrumbs' gamma 0.97, shown at 0.94) is merged
    at the end; a calibration's values too. A request of the API (``Studio.request``) is not fitted: it is checked
    against the schema alone, which allows that gamma."""
    five = st.task_names[:5]
    req = st.request_from_state("tsv_m", {"tsv_m": {"rank_fraction": 0.25, "alpha": 1.25}}, five, "none", {}, {})
    assert req.hparams == {"rank_fraction": 0.2, "alpha": 1.25}
    req = st.request_from_state("tsv_m", {"tsv_m": {"rank_fraction": 0.25}}, st.task_names[:4], "none", {}, {})
    assert req.hparams["rank_fraction"] == 0.25
    req = st.request_from_state("breadcrumbs", {"breadcrumbs": {"gamma": 0.97}}, five, "none", {}, {})
    assert req.hparams["gamma"] == 0.94
    req = st.request_from_state("task_arithmetic", {}, five, "svc", {"svc": {"alpha": 3.0}}, {})
    assert req.calibrate_hparams["alpha"] == 1.0
    assert st.request("breadcrumbs", {"gamma": 0.97}, five).hparams["gamma"] == 0.97


def test_no_calibration_merges_none_of_the_values_stored_for_one(st: Studio, two):
    """The page keeps the values set for each calibration (SVC's alpha moved, then the calibration set back to
    "none"): the merge refused them all ("calibration hyperparameters were given but no calibration is selected"),
    and the diagnostics showed no merged delta."""
    req = st.request_from_state("tsv_m", {}, two, "none", {"svc": {"alpha": 0.5}}, {})
    assert req.calibrate is None and req.calibrate_hparams == {}
    with pytest.raises(StudioError, match=re.escape("the stored calibration settings must be a JSON object")):
        st.request_from_state("tsv_m", {}, two, "none", [0.5], {})


@pytest.mark.parametrize("method, hp, calibrate, cal_hp, prefs, seed", [
    ("tsv_m", {}, None, {}, None, 0),
    ("ties", {"k": 0.35}, "svc", {"target_guard": False}, {0: 0.0, 1: 0.5}, 0),
    ("dare", {"p": 0.6}, "align_merge_b", {}, None, 7),
])
def test_a_recipe_loads_back_as_the_states_of_its_request(st: Studio, method, hp, calibrate, cal_hp, prefs, seed):
    """A run's recipe loaded back (the app's "Load its settings"): the page's states it gives make the same request
    again; the other methods' and calibrations' stored values are kept, and a method without draws leaves the seed
    box alone."""
    five = st.task_names[:5]
    prefs = None if prefs is None else {five[i]: w for i, w in prefs.items()}
    req = st.request(method, hp, five, calibrate, cal_hp, prefs, seed)
    got = st.settings_from_recipe(req.recipe(st.suite_source).to_dict(), {"iso_c": {"alpha": 1.1}},
                                  {"svc": {"alpha": 0.5}}, {st.task_names[-1]: 0.25})
    assert got.request == req and got.notes == []
    assert got.hp_state["iso_c"] == {"alpha": 1.1} and got.pref_state[st.task_names[-1]] == 0.25
    again = st.request_from_state(req.method, got.hp_state, five, req.calibrate or "none", got.cal_state,
                                  got.pref_state, got.request.seed)
    assert again == req
    if calibrate != "svc":
        assert got.cal_state["svc"] == {"alpha": 0.5}


def test_a_recipe_loads_back_with_notes_where_the_app_merges_otherwise(st: Studio, two):
    """Where the app's merge of a recipe will differ, the load says so: a value beyond its control's range (shown and
    merged at the end), weights other than the suite's (the recorded fingerprints). Weights above the sliders' end
    are scaled to it (only their ratios are merged), with a note; a library recipe's preferences give a task left out
    0."""
    recipe = st.request("breadcrumbs", {"gamma": 0.97}, two).recipe(st.suite_source).to_dict()
    recipe["fingerprints"] = {"base": "sha256:" + "0" * 64, "experts": {two[1]: "sha256:" + "f" * 64}}
    got = st.settings_from_recipe(recipe)
    assert got.hp_state["breadcrumbs"]["gamma"] == 0.97   # stored as given; the controls show and merge the end
    assert st.request_from_state("breadcrumbs", got.hp_state, two, "none", {}, {}).hparams["gamma"] == 0.94
    assert got.notes[0].startswith("breadcrumbs's gamma=0.97 lies beyond the app's control, which shows and merges "
                                   "0.94")
    assert got.notes[1].startswith(f"the recipe was made from other weights than this suite's (the base, expert "
                                   f"{two[1]!r})")
    recipe.pop("fingerprints")
    recipe["hparams"]["gamma"] = 0.5
    recipe["preferences"] = {two[0]: 4.0}
    got = st.settings_from_recipe(recipe)
    assert got.pref_state == {two[0]: 1.0, two[1]: 0.0}
    # said: the sliders showed a quarter of the recipe's weights with no word (an audit in the browser)
    assert got.notes == ["the recipe's task weights are shown divided by 4, as the sliders end at 1: the same merge, "
                         "which takes only their ratios"]
    recipe["preferences"] = {two[0]: 1.0, two[1]: 0.5}
    assert st.settings_from_recipe(recipe).notes == []


@pytest.mark.parametrize("change, message", [
    ({"layer_rule": "all_matrices"}, "the recipe's layer_rule 'all_matrices' is not the one the app merges "
                                     "task_arithmetic with"),
    ({"method": "ortho_merge", "layer_rule": "default"}, "not the one the app merges ortho_merge with"),
    ({"calibrate": "svc", "layer_rule": "default"}, "not the one the app merges svc with"),
    ({"svd_mode": "exact"}, "the recipe's svd_mode is 'exact'"),
    ({"prefix": "visual."}, "the recipe's prefix is 'visual.'"),
    ({"sources": {"base": "b.safetensors", "experts": {"digits": "d.safetensors", "textures": "t.safetensors"}}},
     "the recipe's sources is"),
    ({"experts": ["digits", "stripes"]}, "unknown expert(s) ['stripes']"),
    ({"method": "tsv"}, "tsv"),
    ({"hparams": {"alpha": -1}}, "alpha"),
    ({"preferences": {"digits": -1}}, "digits"),
    ({"favourite": 1}, "unknown field(s) ['favourite']"),
    ({"method": "dare", "seed": -5}, "the recipe's seed -5 is outside what the app's seed box holds"),
    ({"method": "dare", "seed": 2**53}, "the recipe's seed 9007199254740992 is outside"),
])
def test_a_recipe_the_app_cannot_merge_as_written_is_refused(st: Studio, change, message):
    recipe = {"method": "task_arithmetic", "experts": ["digits", "textures"], **change}
    with pytest.raises(StudioError, match=re.escape(message)):
        st.settings_from_recipe(recipe)


def test_a_recipe_naming_the_layer_rule_the_app_merges_with_loads(st: Studio):
    """``layer_rule: default`` is what the app merges TSV-M with (None: each method's own), so such a recipe loads;
    Ortho-Merge's and SVC's own rule skips the embeddings, so there it is refused (above)."""
    got = st.settings_from_recipe({"method": "tsv_m", "experts": ["digits", "textures"], "layer_rule": "default"})
    assert got.request.method == "tsv_m" and got.notes == []


def test_describe_names_the_seed_of_a_method_that_draws_from_it(st: Studio, two):
    """Two DARE runs that differ by the seed alone read apart in the leaderboard; a method without draws names none."""
    assert st.describe(st.request("dare", {}, two, seed=7)).endswith(" | seed 7")
    assert "seed" not in st.describe(st.request("task_arithmetic", {}, two, seed=7))


def test_a_recipe_records_the_seed_of_a_method_that_draws_from_it(st: Studio, two):
    """The app's one seed box set for DARE and left so: a TSV-M merge's recipe recorded it (and its settings'
    fingerprint with it), though nothing merged depends on it; two recipes of the same merge now read the same."""
    assert st.request("dare", {}, two, seed=7).recipe().seed == 7
    plain, seeded = (st.request("tsv_m", {}, two, seed=seed).recipe() for seed in (0, 7))
    assert seeded.seed == 0 and seeded.to_dict() == plain.to_dict()


@pytest.mark.parametrize("states, message", [
    (([0.5], {}, {}), "the stored method settings must be a JSON object, got [0.5]"),
    (({"task_arithmetic": 0.5}, {}, {}), "method settings stored for 'task_arithmetic' must be a JSON object"),
    (({}, {"svc": "alpha=1"}, {}), "calibration settings stored for 'svc' must be a JSON object"),
    (({}, {}, "heavy"), "the stored preference settings must be a JSON object, got 'heavy'"),
    (({}, {}, {0: "heavy"}), "must be a number >= 0, got 'heavy'"),   # 0: the first selected task
    (({"task_arithmetic": {"alpha": "big"}}, {}, {}), "'alpha'"),
])
def test_request_from_state_refuses_states_that_are_not_settings(st: Studio, two, states, message):
    """The app's page holds the stored settings and sends them with each event: a state of another shape, or a
    value of another type, is refused, naming it."""
    hp, cal, prefs = states
    if isinstance(prefs, dict) and 0 in prefs:
        prefs = {two[0]: prefs[0]}
    with pytest.raises(StudioError, match=re.escape(message)):
        st.request_from_state("task_arithmetic", hp, two, "svc" if cal else "none", cal, prefs)


@pytest.mark.parametrize("method, calibrate", [("task_arithmetic", None), ("task_arithmetic", "svc")])
def test_merge_export_and_recipe_reproduce_the_same_weights(st: Studio, tmp_path, method, calibrate):
    experts = st.task_names[:2]
    prefs = {experts[0]: 2.0, experts[1]: 1.0}
    req = st.request(method, {"alpha": 0.7}, experts, calibrate, {}, prefs)
    merged = st.merge(req)
    # The library call a user would write gives the same weights.
    direct = studio.merge(st.suite.base, {n: st.suite.experts[n] for n in experts}, method, alpha=0.7,
                          calibrate=calibrate, preferences=prefs)
    assert merged.keys() == direct.keys() and all(torch.equal(merged[k], direct[k]) for k in merged)

    files = st.export(merged, req, tmp_path, stem="run")
    loaded = load_state_dict(files["weights"])
    assert all(torch.equal(loaded[k], merged[k]) for k in merged)
    from_yaml = Recipe.from_file(files["recipe"])
    from_meta = Recipe.from_text(read_metadata(files["weights"])[RECIPE_METADATA_KEY])
    assert from_yaml == from_meta and from_yaml.method == method and from_yaml.experts == experts
    again = merge_from_recipe(from_yaml, st.suite.base, st.suite.experts)
    assert all(torch.equal(again[k], merged[k]) for k in merged)
    # the export records the suite, so the command line replays it with no other option
    from studio.cli import main

    assert from_yaml.suite == "MiniSuite"   # the embedded suite by name: no server path, and any install has it
    assert main(["recipe", files["weights"], "--out", str(tmp_path / "cli.safetensors")]) == 0
    cli = load_state_dict(tmp_path / "cli.safetensors")
    assert cli.keys() == merged.keys() and all(torch.equal(cli[k], merged[k]) for k in merged)


def test_diagnostics_match_an_independent_svd(st: Studio, two):
    layer = st.default_layer()
    req = st.request("task_arithmetic", {"alpha": 0.5}, two)
    d = st.diagnostics(req, layer, "cosine")
    base = st.suite.base[layer].double()
    for name in two:
        ref = torch.linalg.svdvals(st.suite.experts[name][layer].double() - base).numpy()
        np.testing.assert_allclose(d.spectra[name], ref, rtol=1e-4, atol=1e-6)
        assert d.energy[name][-1] == pytest.approx(1.0, abs=1e-5)
    expected_merged = 0.5 * sum(st.suite.experts[n][layer].double() - base for n in two)
    np.testing.assert_allclose(d.merged_spectrum, torch.linalg.svdvals(expected_merged).numpy(), rtol=1e-4, atol=1e-6)
    # Cosine of the flattened task matrices, computed here from scratch.
    a, b = (st.suite.experts[n][layer].double() - base for n in two)
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    np.testing.assert_allclose(d.interference, [[1.0, cos], [cos, 1.0]], atol=1e-5)
    assert d.metric_info["signed"] and d.metric_info["range"] == (-1.0, 1.0)
    curves = d.curves
    n = len(st.layer_keys())
    assert len(curves["keys"]) == len(curves["sti"]) == len(curves["merged_entropy"]) == n
    assert set(curves["sar"]) == set(two) and all(0.0 <= v <= 1.0 + 1e-6 for v in curves["sar"]["%s" % two[0]])


def test_the_whole_model_heatmap_is_the_model_matrix_of_the_apps_layers(st: Studio, two):
    """"whole model": the whole task vectors' cosine over the app's matrix layers (computed here from the experts),
    a merge-dependent metric of the merge shown, and a per-subspace metric staying on the layer, saying so."""
    layer, keys = st.default_layer(), st.layer_keys()
    req = st.request("ties", {"alpha": 0.5}, two)   # not the default: the curves take the default's merge
    d = st.diagnostics(req, layer, "cosine", heatmap="model")
    flat = [torch.cat([(st.suite.experts[n][k].double() - st.suite.base[k].double()).flatten() for k in keys])
            for n in two]
    cos = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    np.testing.assert_allclose(d.interference, [[1.0, cos], [cos, 1.0]], atol=1e-5)
    assert d.heatmap_scope == f"whole model, {len(keys)} matrix layers (task vectors over them)"
    assert abs(cos - float(st.diagnostics(req, layer, "cosine").interference[0, 1])) > 1e-3   # not the layer's
    merged = st.merge(req)
    deltas = {k: merged[k].float() - st.suite.base[k].float() for k in keys}
    d = st.diagnostics(req, layer, "xi", heatmap="model")
    want = studio.diagnostics.model_matrix(st.pool(two), "xi", deltas, keys=keys, merged_is_delta=True)
    np.testing.assert_allclose(d.interference, want.numpy(), atol=1e-6)
    assert d.heatmap_scope.endswith("matrix layers (mean)")
    d = st.diagnostics(req, layer, "svc", heatmap="model")
    np.testing.assert_array_equal(d.interference, st.diagnostics(req, layer, "svc").interference)
    assert d.heatmap_scope == "this layer: per merged subspace, no whole-model form"
    with pytest.raises(StudioError, match="heatmap must be 'layer' or 'model', got 'all'"):
        st.diagnostics(req, layer, "cosine", heatmap="all")


def test_a_move_of_the_global_scale_decomposes_no_layer_again(st: Studio, two):
    """The per-layer curves (SAR to the merge, the merged delta's entropy) do not change with the merge's scale,
    but every layer's merged delta was decomposed again for each alpha (15-16 s on 8 ViT-B/32 experts): they are now
    measured on the merge at the method's default scale, so an alpha move adds no merged decomposition, and they
    still equal the library's on the merge's own deltas to float32 rounding. A calibrated merge is no rescale of
    one merge: its curves are its own."""
    layer, keys = st.default_layer(), st.layer_keys()
    pool = st.pool(two)
    pool._transient.clear()   # an LRU of 4 entries per key: what earlier tests left could push this test's out

    def decomposed() -> int:   # the merged deltas' statistics memoised so far (one per layer and merged delta)
        return sum(1 for tag in pool._transient if tag[1][:2] == ("diag", "merged_stats"))

    st.diagnostics(st.request("tsv_m", {"alpha": 0.7}, two), layer, "cosine")
    # alpha 0.45: no layer decomposed again; with SVC after it, or at alpha 0 (no merged delta): each its own
    moves = ((st.request("tsv_m", {"alpha": 0.45}, two), 0),
             (st.request("tsv_m", {"alpha": 0.45}, two, calibrate="svc"), len(keys)),
             (st.request("tsv_m", {"alpha": 0.0}, two), len(keys)))
    shown = []
    for req, new in moves:
        before = decomposed()
        shown.append(st.diagnostics(req, layer, "cosine"))
        assert decomposed() == before + new, req
    assert all(v == 0 for v in shown[-1].curves["sar"][two[0]])
    for (req, _), d in zip(moves, shown):   # the library's, on the merge's own deltas
        deltas = {k: v.float() - st.suite.base[k].float() for k, v in st.merge(req).items() if k in keys}
        want = studio.diagnostics.layer_curves(pool, deltas, keys, merged_is_delta=True, curves=["merged_entropy"],
                                               normalized_entropy=True)
        np.testing.assert_allclose(d.curves["merged_entropy"], want["merged_entropy"], rtol=1e-5)
        sar = np.array([studio.diagnostics.sar_to_merged(pool.layer(k), deltas[k]).numpy() for k in keys]).T
        np.testing.assert_allclose([d.curves["sar"][n] for n in two], sar, atol=1e-5)
        np.testing.assert_allclose(d.merged_spectrum, torch.linalg.svdvals(deltas[layer].double()).numpy(),
                                   rtol=1e-4, atol=1e-7)


def test_the_curves_alone_are_the_diagnostics_curves(st: Studio, two):
    """The app draws the layer's plots (``diagnostics(..., curves=False)``: no curves, no layer but the shown one's
    merged delta decomposed) before the per-layer curves (:meth:`Studio.curves`), which equal those of one
    ``diagnostics`` call: of the merge itself, at an alpha moved (the default scale's merge), calibrated, and of the
    Task Arithmetic sum where there is no merge."""
    layer = st.default_layer()
    pool = st.pool(two)
    pool._transient.clear()

    def decomposed() -> int:
        return sum(1 for tag in pool._transient if tag[1][:2] == ("diag", "merged_stats"))

    req = st.request("ties", {"k": 0.31}, two)
    d = st.diagnostics(req, layer, "cosine", curves=False)
    assert d.curves == {} and decomposed() == 0 and d.merged_spectrum is not None
    studio.engine.clear_pools()   # pools are shared by expert set: the fresh Studio's is a new one, nothing read back
    fresh = Studio(st.suite, device="cpu")
    assert fresh.pool(two) is not pool
    for r in (req, st.request("ties", {"k": 0.31, "alpha": 0.55}, two),
              st.request("tsv_m", {"alpha": 0.6}, two, calibrate="svc"), None):
        got = st.curves(r, pool_experts=two)
        want = fresh.diagnostics(r, layer, "cosine", pool_experts=two).curves
        assert got == want and got["keys"] == st.layer_keys(), r
    assert got["sar_reference"] == "task arithmetic sum"


def test_diagnostics_without_a_valid_merge_still_show_the_tasks(st: Studio, two):
    d = st.diagnostics(None, st.default_layer(), "subspace_similarity", pool_experts=two)
    assert d.merged_spectrum is None and set(d.spectra) == set(two)
    assert d.curves["sar_reference"] == "task arithmetic sum"
    # The SAR_avg the app shows is Iso's, as studio.diagnostics.sar_avg computes it on the same layers.
    expected = studio.diagnostics.sar_avg(st.pool(two), keys=st.layer_keys())
    np.testing.assert_allclose([d.curves["sar_avg"][n] for n in two], expected.numpy(), atol=1e-6)
    with pytest.raises(StudioError, match="not a matrix layer"):
        st.spectrum("visual.ln_post.weight")
    with pytest.raises(StudioError, match="unknown layer"):
        st.spectrum("visual.nope")
    with pytest.raises(StudioError, match="unknown interference metric"):
        st.diagnostics(None, st.default_layer(), "nope", pool_experts=two)


def _close(got, want, path="report"):
    """``got`` equals ``want`` (nested JSON values), numbers to float32 rounding, NaN (null) where the other is."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), (path, list(got), list(want))
        for k in want:
            _close(got[k], want[k], f"{path}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float) or isinstance(got, float):
        assert (got is None and want is None) or got == pytest.approx(want, rel=1e-5, abs=1e-7), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_the_report_is_what_diagnose_writes_for_the_merge_with_the_plots_data(st: Studio, two, tmp_path, capsys):
    """The app's whole-model report of a merge (here DARE with its seed, calibrated by SVC, with task weights) is the
    JSON ``merge-studio diagnose --out`` writes for the same merge, recipe included, plus under ``shown`` the numbers
    the diagnostics tab plots, each equal to what the plots were drawn from."""
    import json

    from studio.cli import main
    from studio.schema import json_safe

    task3 = st.task_names[:3]
    prefs = {task3[0]: 1.0, task3[1]: 0.5, task3[2]: 0.25}
    req = st.request("dare", {"p": 0.7}, task3, calibrate="svc", preferences=prefs, seed=5)
    layer = st.layer_keys()[3]
    shown = st.diagnostics(req, layer, "svc")
    got = json.loads(json.dumps(json_safe(st.report(req, shown)), allow_nan=False))
    out = tmp_path / "diag.json"
    assert main(["diagnose", "--suite", "MiniSuite", "--experts", ",".join(task3), "--method", "dare", "--set",
                 "p=0.7", "--calibrate", "svc", "--preferences", json.dumps(prefs), "--seed", "5", "--device", "cpu",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    want = json.loads(out.read_text())
    assert got["merge"]["recipe"]["seed"] == 5 and got["merge"]["recipe"]["preferences"] == prefs
    _close({k: v for k, v in got.items() if k != "shown"}, want)
    plotted = got["shown"]
    assert plotted["layer"] == layer and plotted["tasks"] == task3
    assert plotted["shape"] == list(st.suite.base[layer].shape)
    for name in task3:
        np.testing.assert_array_equal(plotted["spectra"][name], shown.spectra[name])
        np.testing.assert_array_equal(plotted["energy"][name], shown.energy[name])
    np.testing.assert_array_equal(plotted["merged_spectrum"], shown.merged_spectrum)
    np.testing.assert_array_equal(plotted["merged_energy"], shown.merged_energy)
    heat = plotted["heatmap"]   # SVC's coefficients: a task by the merged subspaces
    assert heat["metric"] == "svc" and heat["rows"] == task3 and heat["over"] == "this layer"
    assert heat["columns"] == [f"sigma{j + 1}" for j in range(shown.interference.shape[1])]
    np.testing.assert_array_equal(heat["values"], shown.interference)
    assert plotted["per_layer"]["keys"] == st.layer_keys()
    _close(plotted["per_layer"]["sar"], {n: [float(v) for v in shown.curves["sar"][n]] for n in task3})
    # the whole model's heatmap is said to be so
    d = st.diagnostics(req, layer, "cosine", heatmap="model")
    assert st.report(req, d)["shown"]["heatmap"]["over"] == d.heatmap_scope != ""


def test_the_report_without_a_merge_is_of_the_task_arithmetic_sum(st: Studio, two, tmp_path, capsys):
    """Settings the method refuses (a value out of its range, as a box may hold): the report, as the plots, is then
    of the Task Arithmetic sum, and says why; it is what ``diagnose`` without ``--method`` writes."""
    import json

    from studio.cli import main
    from studio.schema import json_safe

    with pytest.raises(StudioError) as refused:
        st.request("ties", {"k": 5.0}, two)
    got = json_safe(st.report(None, st.diagnostics(None, st.default_layer(), "cosine", pool_experts=two),
                              pool_experts=two, why=str(refused.value)))
    assert got["merge"] == {"task_arithmetic_sum": True, "why": str(refused.value)}
    assert got["shown"]["merged_spectrum"] is None and got["tasks"] == two
    out = tmp_path / "d.json"
    assert main(["diagnose", "--suite", "MiniSuite", "--experts", ",".join(two), "--device", "cpu",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    want = json.loads(out.read_text())
    assert want["merge"] == {"task_arithmetic_sum": True}
    _close({k: v for k, v in got.items() if k not in ("shown", "merge")},
           {k: v for k, v in want.items() if k != "merge"})
    with pytest.raises(StudioError, match="unknown expert"):
        st.report(None, pool_experts=["nope"])


def test_schemas_are_looked_up_by_kind(st: Studio, two):
    """``align_merge_b`` is a merging method (with its scale ``lam``) and a calibration (without): looked up by name,
    the app showed the calibration's controls for the method, without ``lam``, and could not sweep its scale."""
    from studio.ui.controls import post_scale_param

    for entry in studio.list_methods():
        assert st.schema(entry["name"], entry["kind"]) == entry
    assert post_scale_param(st.schema("align_merge_b"))["name"] == "lam"
    assert post_scale_param(st.schema("align_merge_b", "calibration")) is None
    assert st.alpha_grid("align_merge_b", 0.5, 1.0, 2) == [0.5, 1.0]   # refused before: "no global scale"
    st.request("align_merge_b", {"lam": 0.5}, experts=two)
    with pytest.raises(StudioError, match="kind must be 'merge' or 'calibration'"):
        st.schema("align_merge_b", "method")


@pytest.mark.parametrize("T", [2, 8])
def test_every_slider_end_the_app_offers_merges_on_the_suite(st: Studio, T):
    """The app's controls (:func:`~studio.ui.controls.control_specs` at the selection's ``T`` and the suite's
    :meth:`~studio.ui.backend.Studio.largest_rank`) offer no value the engine refuses: every slider of every method
    and calibration at its first and last position (the others at their defaults), and all of a method's sliders at
    their first, then their last positions at once, merge on MiniSuite. A helper's audit of every position found two
    refused: Breadcrumbs' ``beta`` above 0.15 at the default ``gamma`` (``beta + gamma < 1``) and TSV-M's 0.005,
    which keeps ``int(128 * 0.005) = 0`` components on every layer of rank 128."""
    from studio.ui.controls import control_specs

    experts = {name: st.suite.experts[name] for name in st.task_names[:T]}
    for entry in studio.list_methods():
        R = st.largest_rank(entry["name"], entry["kind"])
        sliders = [c for c in control_specs(entry, num_tasks=T, largest_rank=R) if c.kind == "slider"]
        settings = [{c.name: getattr(c, end)} for c in sliders for end in ("minimum", "maximum")]
        settings += [{c.name: getattr(c, end) for c in sliders} for end in ("minimum", "maximum")]
        for hp in settings:
            if entry["kind"] == "merge":
                merged = studio.merge(st.suite.base, experts, entry["name"], device="cpu", **hp)
            else:
                merged = studio.merge(st.suite.base, experts, "task_arithmetic", device="cpu",
                                      calibrate=entry["name"], calibrate_hparams=hp)
            assert merged.keys() == st.suite.base.keys(), (entry["name"], hp)


def test_alpha_grid_checks_the_schema_range(st: Studio):
    assert st.alpha_grid("task_arithmetic", 0.2, 1.0, 5) == [0.2, 0.4, 0.6, 0.8, 1.0]
    with pytest.raises(HyperparameterError, match="leaves the allowed range"):
        st.alpha_grid("task_arithmetic", 0.5, 9.0, 3)
    with pytest.raises(RequestError, match="'from' < 'to'"):
        st.alpha_grid("task_arithmetic", 1.0, 0.5, 3)
    with pytest.raises(RequestError, match="no global scale"):
        st.alpha_grid("weight_average", 0.1, 1.0, 3)


def test_optimise_alpha_picks_the_best_preference_weighted_value(st: Studio, two):
    req = st.request("task_arithmetic", {}, two, preferences={two[0]: 3.0, two[1]: 1.0})
    res = st.optimise_alpha(req, [0.3, 1.0])
    assert res["weights"] == {two[0]: 0.75, two[1]: 0.25}
    best = int(np.argmax(res["objective"]))
    assert res["best_alpha"] == res["alphas"][best] and res["best_objective"] == max(res["objective"])
    # Independent check of one point: merge at the best alpha, evaluate on validation, weight by hand.
    merged = studio.merge(st.suite.base, {n: st.suite.experts[n] for n in two}, "task_arithmetic",
                          alpha=res["best_alpha"], preferences=req.preferences)
    ev = evaluate(st.suite, merged, tasks=two, split="validation", device="cpu")
    by_hand = 0.75 * ev.normalized[two[0]] + 0.25 * ev.normalized[two[1]]
    assert res["best_objective"] == pytest.approx(by_hand, abs=1e-6)


def test_gallery_captions_say_whether_the_prediction_is_right(st: Studio, two):
    merged = st.merge(st.request("task_arithmetic", {}, two))
    items = st.gallery(merged, two, per_task=3, upscale=64)
    assert len(items) == 6
    for task in two:
        images, labels = st.suite.split(task, "test")
        n = len(labels)
        idx = np.unique(np.linspace(0, n - 1, num=3).round().astype(int))
        preds, _ = predict(st.suite, merged, task, images[idx], device="cpu")
        classes = st.suite.task(task).classes
        caps = [c for _, c in items if c.startswith(task + " ")]
        for cap, p, y in zip(caps, preds.tolist(), labels[idx].tolist()):
            assert ("✓" in cap) == (p == y) and classes[p] in cap
    img = items[0][0]
    assert img.dtype == np.uint8 and img.shape[0] >= 64 and img.shape[2] == 3


def test_accuracy_table_uses_one_split_for_every_reference(st: Studio, two):
    merged = st.merge(st.request("task_arithmetic", {}, two))
    result = st.evaluate(merged, two, "test")
    table = st.accuracy_table(result)
    for t in two:
        row = table[t]
        assert row["merged"] == result.accuracy[t] and row["individual"] == result.expert_accuracy[t]
        assert row["normalized"] == pytest.approx(100 * row["merged"] / row["individual"])


def test_spectrum_requests_of_the_wrong_kind_are_named(st: Studio, two):
    """A list as the layer, or an expert list of the wrong kind, was a TypeError or was read letter by letter."""
    layer = st.default_layer()
    with pytest.raises(StudioError, match=r"unknown layer \['visual.proj'\]"):
        st.spectrum(["visual.proj"])
    with pytest.raises(RequestError, match="expert list has duplicates"):
        st.spectrum(layer, experts=[two[0], two[0]])
    with pytest.raises(RequestError, match="experts must be a list of expert names, got 'digits'"):
        st.spectrum(layer, experts="digits")
    assert list(st.spectrum(layer, experts=two)["tasks"]) == two


@pytest.mark.parametrize("method, calibration", [("tsv_m", None), ("task_arithmetic", "svc"), ("tsv_m", "svc"),
                                                 ("ties", "align_merge_b"), ("align_merge_b", None)])
def test_describe_shows_the_value_an_automatic_param_took(st: Studio, method, calibration):
    """An automatic value reads as the value it took for the experts selected (TSV-M's 1/T on 8 and on 4 experts
    read the same, "auto", in the leaderboard): merged with those values given, the merge has the same bits."""
    from studio.ui.backend import _automatic

    for experts in (st.task_names, st.task_names[:3]):
        req = st.request(method, {}, experts, calibration, {})
        auto = _automatic(get_method(method).params, req.hparams, len(experts))
        cal_auto = _automatic(get_calibration(calibration).params, req.calibrate_hparams, len(experts), method) \
            if calibration else {}
        assert auto or cal_auto
        text = st.describe(req)
        for name, value in [*auto.items(), *cal_auto.items()]:
            assert f"{name}={value:g} (auto)" in text, text
        given = st.request(method, {**req.hparams, **auto}, experts, calibration,
                           {**req.calibrate_hparams, **cal_auto})
        merged, explicit = st.merge(req), st.merge(given)
        assert all(torch.equal(merged[k], explicit[k]) for k in merged), (method, calibration, len(experts))


def test_the_apps_sar_avg_is_the_librarys_with_an_expert_that_froze_layers(st: Studio):
    """The app's per-layer curves hold each task's SAR and entropy per layer and its SAR_avg: an expert that left
    layers as the base (frozen blocks) has none there (NaN, a gap in the plot), and its SAR_avg is
    :func:`studio.diagnostics.sar_avg` over the layers it changed (a plain mean counted those layers as SAR 0)."""
    from studio import diagnostics as diag
    from studio.pool import TaskPool

    keys = st.layer_keys()
    frozen = set(keys[::2])
    names = st.task_names[:3]
    experts = {n: dict(st.suite.experts[n]) for n in names}
    experts[names[0]].update({k: st.suite.base[k] for k in frozen})
    pool = TaskPool(st.suite.base, experts)
    got = st.layer_profile(pool, None)
    want = diag.sar_avg(pool, keys=keys)
    assert [got["sar_avg"][n] for n in names] == pytest.approx(want.tolist(), rel=1e-6)
    for i, key in enumerate(keys):
        assert np.isnan(got["sar"][names[0]][i]) == (key in frozen) and not np.isnan(got["sar"][names[1]][i])
        assert np.isnan(got["entropy"][names[0]][i]) == (key in frozen)
        # each task's normalised spectral entropy (Ortho-Merge eq. 9) where its expert changed the layer
        entropy = diag.spectral_entropy(diag.task_spectra(pool.layer(key)), normalized=True).tolist()
        for t, n in enumerate(names):
            if not (t == 0 and key in frozen):
                assert got["entropy"][n][i] == pytest.approx(entropy[t], abs=1e-7)
