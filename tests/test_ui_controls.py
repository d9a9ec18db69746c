"""Schema -> UI controls -> hyperparameters: every registered method's default UI submits valid settings."""

from __future__ import annotations

import math

import pytest

import studio
from studio.schema import HyperparameterError, StudioError, validate_hparams
from studio.registry import get_calibration, get_method
from studio.ui.controls import (ControlSpec, auto_rule_value, collect, control_specs, defaults, depends_on_method,
                                depends_on_tasks, fit_to_controls, initial_values, parse_json_object, post_scale_param,
                                shown_info, sweep_defaults)

ALL = studio.list_methods()


def _spec(entry):
    return get_method(entry["name"]) if entry["kind"] == "merge" else get_calibration(entry["name"])


def _ui_defaults(specs: list[ControlSpec]) -> list:
    """What a fresh UI submits: each control's value, and ``True`` for every "auto" checkbox."""
    values = []
    for c in specs:
        values.append(c.value)
        if c.auto_label is not None:
            values.append(True)
    return values


@pytest.mark.parametrize("entry", ALL, ids=[m["name"] + ":" + m["kind"] for m in ALL])
def test_every_schema_renders_valid_controls(entry):
    specs = control_specs(entry, num_tasks=8)
    assert [c.name for c in specs] == [p["name"] for p in entry["params"]]
    for c, p in zip(specs, entry["params"]):
        if p["type"] == "bool":
            assert c.kind == "checkbox"
        elif p["choices"]:
            assert c.kind == "dropdown" and list(c.choices) == p["choices"] and c.value in p["choices"]
        else:
            assert c.kind == "slider"
            assert math.isfinite(c.minimum) and math.isfinite(c.maximum) and c.minimum < c.maximum
            assert c.step > 0 and c.minimum <= c.value <= c.maximum
            # A slider never offers values the schema rejects.
            if p["low"] is not None:
                assert c.minimum >= p["low"]
            if p["high"] is not None:
                assert c.maximum <= p["high"]
            if p.get("ui_step"):
                assert c.step == p["ui_step"]
            assert (c.auto_label is not None) == (p["default"] is None)
            if p["default"] is None:
                assert p["auto"] in c.auto_label
        assert p["help"] in c.info and (p["paper"] or "") in c.info + c.source
        assert p["paper"] not in c.info or not p["help"]   # the source goes below the controls, folded
    # The untouched UI submits exactly the schema defaults (auto -> None), and they validate.
    submitted = collect(specs, _ui_defaults(specs))
    assert submitted == defaults(entry)
    assert initial_values(specs) == _ui_defaults(specs)   # what the app's "Reset to defaults" puts back
    # an integer slider's number box may hold a typed 2.4: it is sent as the slider's position would be
    for i, c in enumerate(specs):
        if c.kind == "slider" and isinstance(c.value, int):
            typed = _ui_defaults(specs)
            typed[sum(1 + (d.auto_label is not None) for d in specs[:i])] = c.value + 0.4
            assert collect(specs, typed)[c.name] == c.value and isinstance(collect(specs, typed)[c.name], int)
    validate_hparams(entry["name"], _spec(entry).params, submitted)


@pytest.mark.parametrize("entry", [m for m in ALL if m["params"]], ids=lambda m: m["name"] + ":" + m["kind"])
def test_slider_extremes_validate(entry):
    """Both ends of every slider are accepted by the engine's validation (no UI value can be out of range)."""
    specs = control_specs(entry, num_tasks=8)
    for which in ("minimum", "maximum"):
        values = []
        for c in specs:
            values.append(getattr(c, which) if c.kind == "slider" else c.value)
            if c.auto_label is not None:
                values.append(False)
        hp = collect(specs, values)
        hp = {k: (int(v) if _spec(entry).params[i].type is int else v) for i, (k, v) in enumerate(hp.items())}
        validate_hparams(entry["name"], _spec(entry).params, hp)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 8, 14, 20])
def test_every_position_of_the_tsv_m_rank_slider_fits_every_layer(T):
    """TSV-M keeps ``k = int(r * rank_fraction)`` components of each of ``T`` tasks in ``r`` dimensions (``T k <= r``,
    checked per layer by :func:`~studio.methods.tsv_m.tsv_rank`): no slider position may ask for more, on a layer of
    any size up to ViT-L/14's (before the schema's ``high_rule`` the slider ran to 1.0, where 7/8 of it was refused
    for 8 experts). The end is ``1/T`` itself, the automatic default."""
    from studio.methods.tsv_m import tsv_rank

    spec = next(m for m in ALL if m["name"] == "tsv_m")
    slider = next(c for c in control_specs(spec, num_tasks=T) if c.name == "rank_fraction")
    # 1/T, or the last step below it where 1/T is off the step's grid (0.33 for 3 experts)
    assert slider.maximum <= 1.0 / T and 1.0 / T - slider.maximum < slider.step
    assert slider.maximum == 1.0 / T or T in (3, 7, 14)
    positions = [slider.minimum + i * slider.step for i in range(int((slider.maximum - slider.minimum) / slider.step)
                                                                  + 1)] + [slider.maximum]
    for r in range(1, 1025):
        for fraction in positions:
            tsv_rank(r, T, fraction)   # raises where T * k > r


def test_the_tsv_m_rank_slider_starts_where_some_layer_keeps_a_component():
    """Below ``1/R`` (``R``: the largest rank of the layers TSV-M's rule selects) ``k = int(r * rank_fraction)`` is 0
    on every layer, which the engine refuses; the slider starts at the first step that keeps one there, and at no
    later step (0.01 for MiniSuite's rank 128, where its first step 0.005 was refused)."""
    from studio.methods.tsv_m import tsv_rank

    spec = next(m for m in ALL if m["name"] == "tsv_m")
    for R in range(2, 1025):   # (rank 1: only 1.0 keeps a component, a slider of one position)
        slider = next(c for c in control_specs(spec, num_tasks=1, largest_rank=R) if c.name == "rank_fraction")
        assert tsv_rank(R, 1, slider.minimum) >= 1, R
        below = slider.minimum - slider.step
        assert below <= 0 or tsv_rank(R, 1, below) == 0, R
    assert control_specs(spec, num_tasks=8, largest_rank=128)[0].minimum == 0.01
    assert control_specs(spec, num_tasks=8, largest_rank=768)[0].minimum == 0.005


@pytest.mark.parametrize("T", [2, 3, 7, 8, 20])
def test_every_position_of_the_tsv_m_rank_slider_keeps_a_component_where_the_largest_rank_is_near_T(T):
    """With the largest rank ``R`` at ``T`` (a model of tiny layers), ``1/T = 1/R`` alone, of the slider's range,
    keeps a component and fits (``T k <= R``): the slider skipped its floor there and offered 0.005 to 0.33 for
    ``T = R = 3``, every position refused (an edge audit). It ends at ``1/T`` now and starts one step below, as
    Gradio's slider needs two ends (the one refused position); for ``R`` above ``T`` every position is accepted. (At
    ``T = 20, R = 21`` no step of the grid lies between ``1/R`` and ``1/T``: the slider had one end there, which
    Gradio refuses to render; it runs from ``1/R`` at 4 digits now.)"""
    import gradio as gr

    from studio.methods.tsv_m import tsv_rank

    spec = next(m for m in ALL if m["name"] == "tsv_m")
    for R in range(T, 4 * T + 1):
        slider = next(c for c in control_specs(spec, num_tasks=T, largest_rank=R) if c.name == "rank_fraction")
        gr.Slider(slider.minimum, slider.maximum, value=slider.value, step=slider.step)   # renders
        if R == T:
            assert slider.maximum == slider.value == 1 / T and slider.minimum == slider.maximum - slider.step
            assert tsv_rank(R, T, slider.maximum) == 1
            continue
        steps = int((slider.maximum - slider.minimum) / slider.step + 1e-9)
        for fraction in [slider.minimum + i * slider.step for i in range(steps + 1)] + [slider.maximum]:
            assert tsv_rank(R, T, fraction) >= 1, (T, R, fraction)   # tsv_rank raises where T k > R


def test_every_pair_of_breadcrumbs_slider_positions_keeps_entries():
    """Breadcrumbs masks the top ``beta`` and the bottom ``gamma`` of each row and keeps the rest, so ``beta + gamma
    < 1``: the two sliders (``ui_high``) offer no pair it refuses, on rows of 128 entries (MiniSuite's shortest
    masked rows; CLIP's are longer). Before, with ``beta`` up to 0.5 and ``gamma`` up to 0.99, 71 of ``beta``'s 101
    positions were refused at the default ``gamma``. The library still accepts up to ``high`` (``beta = 0.1``)."""
    from studio.methods._sparsify import band_counts

    spec = next(m for m in ALL if m["name"] == "breadcrumbs")
    sliders = {c.name: c for c in control_specs(spec, num_tasks=8) if c.kind == "slider"}

    def positions(c: ControlSpec) -> list[float]:
        return [round(c.minimum + i * c.step, 9) for i in range(round((c.maximum - c.minimum) / c.step) + 1)]

    assert positions(sliders["beta"])[-1] == sliders["beta"].maximum
    assert positions(sliders["gamma"])[-1] == sliders["gamma"].maximum
    for beta in positions(sliders["beta"]):
        for gamma in positions(sliders["gamma"]):
            kept = 128 - sum(band_counts(128, beta, gamma))   # (top, bottom) masked; raises where beta + gamma >= 1
            assert kept >= 1, (beta, gamma)
    validate_hparams("breadcrumbs", _spec(spec).params, {"beta": 0.1, "gamma": 0.5})


@pytest.mark.parametrize("T", [1, 2, 3, 5, 7, 8, 20])
def test_every_float_slider_ends_on_its_step_grid(T):
    """The browser's positions are ``minimum + n step``: an end off the grid (SVC's alpha from 1e-4 in steps of 0.005:
    0.0051, ..., 0.9951, never its paper's 1.0; TSV-M's 1/3) could not be reached, and put every position off the
    round values. Both ends lie on the grid, inside the schema's range."""
    for entry in ALL:
        for c in control_specs(entry, num_tasks=T, largest_rank=768):
            if c.kind != "slider" or isinstance(c.value, int):
                continue
            for end in (c.minimum, c.maximum):
                assert abs(end / c.step - round(end / c.step)) < 1e-6, (entry["name"], c.name, end, c.step)
    svc = next(c for c in control_specs(next(m for m in ALL if m["name"] == "svc"), num_tasks=T))
    assert (svc.minimum, svc.maximum) == (0.005, 1.0)


def test_an_auto_box_names_the_rule_that_holds_after_its_base_method():
    """SVC's automatic alpha is ``1/T``, but 1.0 after TSV-M: its box names the one that holds (it read "auto (1/T
    (1.0 after tsv_m))" after either), and the value it previews is that one."""
    svc = next(m for m in ALL if m["name"] == "svc")
    after_tsv = control_specs(svc, num_tasks=8, base_method="tsv_m")[0]
    assert (after_tsv.auto_label, after_tsv.value) == ("auto (1.0 after tsv_m)", 1.0)
    for base in ("task_arithmetic", "iso_c", None):
        c = control_specs(svc, num_tasks=8, base_method=base)[0]
        assert c.value == 0.125, base
        assert c.auto_label == ("auto (1/T)" if base else "auto (1/T (1.0 after tsv_m))"), (base, c.auto_label)
    # a rule without exceptions shows as it is after any base method
    align_b = next(m for m in ALL if m["name"] == "align_merge_b" and m.get("kind") == "calibration")
    assert [c.auto_label for c in control_specs(align_b, num_tasks=8, base_method="ties") if c.auto_label] == \
        [f"auto ({p['auto']})" for p in align_b["params"] if p["default"] is None]


def test_no_help_text_is_read_as_markup_by_gradio():
    """Gradio 6 shows a control's ``info`` through its own small Markdown (its frontend's six rules, copied below):
    a help text that matches one loses characters (two ``*`` became an emphasis, TSV-M's ``int(r * fraction) ... T *
    k``). Every control's text, as :func:`~studio.ui.controls.shown_info` gives it, must match none."""
    import re

    rules = [r"`([^`]+)`", r"\[([^\]]+)\]\(([^)]+)\)", r"\*\*(.+?)\*\*", r"__(.+?)__", r"\*(.+?)\*",
             r"(?<!\w)_(.+?)_(?!\w)"]
    for entry in ALL:
        for c in control_specs(entry, num_tasks=8):
            shown = shown_info(c.info)
            for rule in rules:
                assert not re.search(rule, shown), (entry["name"], c.name, rule, shown)
    assert re.search(rules[4], next(c.info for c in control_specs(next(m for m in ALL if m["name"] == "tsv_m"))))


@pytest.mark.parametrize("T", [2, 8])
def test_a_calibrations_automatic_start_follows_the_method_it_calibrates(T):
    """SVC's automatic clip is ``1/T``, but 1.0 after TSV-M: its slider, greyed while "auto" is ticked, showed
    ``1/T`` after TSV-M too, and unticking it then moved the merge from 1.0 to ``1/T`` unseen. It starts where the
    engine's own default is, after every merging method."""
    from studio.methods.svc import resolve_alpha

    svc = next(m for m in ALL if m["name"] == "svc")
    for method in (m["name"] for m in ALL if m["kind"] == "merge"):
        alpha = control_specs(svc, num_tasks=T, base_method=method)[0]
        assert alpha.value == resolve_alpha(None, T, method), method
    assert control_specs(svc, num_tasks=T, base_method="tsv_m")[0].value == 1.0


def test_controls_follow_the_number_of_tasks_and_stored_values_fit_them():
    tsv_m = next(m for m in ALL if m["name"] == "tsv_m")
    ties = next(m for m in ALL if m["name"] == "ties")
    svc = next(m for m in ALL if m["name"] == "svc")
    assert depends_on_tasks(tsv_m) and depends_on_tasks(svc) and not depends_on_tasks(ties)
    assert depends_on_method(svc) and not depends_on_method(tsv_m) and not depends_on_method(ties)
    ruled = {"params": [{"name": "x", "type": "float", "default": 0.1, "low": 0.0, "high": 1.0, "high_rule": "1/T"}]}
    assert depends_on_tasks(ruled) and control_specs(ruled, num_tasks=4)[0].maximum == 0.25
    # a value set for 4 experts, then 8: moved to the new end; automatic and in-range values are left as they are
    assert fit_to_controls(tsv_m, {"rank_fraction": 0.25, "alpha": 2.5}, 8) == {"rank_fraction": 0.125, "alpha": 2.5}
    assert fit_to_controls(tsv_m, {"rank_fraction": 0.1}, 8) == {"rank_fraction": 0.1}
    assert fit_to_controls(tsv_m, {"rank_fraction": None}, 8) == {"rank_fraction": None}
    assert fit_to_controls(tsv_m, {"rank_fraction": 0.25}, 4) == {"rank_fraction": 0.25}
    assert fit_to_controls(ties, {"k": 0.2, "merge_func": "mean"}, 8) == {"k": 0.2, "merge_func": "mean"}
    # and what it leaves the merge is accepted by the engine's own check
    validate_hparams("tsv_m", _spec(tsv_m).params, fit_to_controls(tsv_m, {"rank_fraction": 0.9}, 8))


def test_auto_checkbox_unchecked_sends_the_slider_value():
    specs = [ControlSpec("k", "slider", "k", 0.5, auto_label="auto (1/T)"), ControlSpec("a", "slider", "a", 1.0)]
    assert collect(specs, [0.25, False, 2.0]) == {"k": 0.25, "a": 2.0}
    assert collect(specs, [0.25, True, 2.0]) == {"k": None, "a": 2.0}


def test_auto_rule_preview_follows_the_documented_formula():
    assert auto_rule_value("1/T", 4) == 0.25
    assert auto_rule_value("|T|/4", 8) == 2.0
    assert auto_rule_value("1/T (1.0 after tsv_m)", 5) == pytest.approx(0.2)
    assert auto_rule_value("__import__('os')", 3) is None
    assert auto_rule_value("", 3) is None
    entry = {"params": [{"name": "alpha", "type": "float", "default": None, "auto": "1/T", "low": 0.0, "high": 1.0,
                         "choices": None, "help": "h", "paper": "", "post_scale": False, "ui_step": None}]}
    assert control_specs(entry, num_tasks=4)[0].value == 0.25


def test_unbounded_params_get_a_finite_range_around_the_default():
    entry = {"params": [{"name": "x", "type": "float", "default": 3.0, "auto": None, "low": 0.0, "high": None,
                         "choices": None, "help": "", "paper": "", "post_scale": False, "ui_step": None}]}
    c = control_specs(entry)[0]
    assert c.minimum == 0.0 and c.maximum >= 30.0 and c.value == 3.0


def test_parse_json_object_errors_are_readable():
    assert parse_json_object('{"alpha": 0.5}', "hyperparameters") == {"alpha": 0.5}
    assert parse_json_object({"alpha": 1}, "hyperparameters") == {"alpha": 1}
    assert parse_json_object("", "x") == {} and parse_json_object(None, "x") == {}
    with pytest.raises(StudioError, match="hyperparameters: not valid JSON"):
        parse_json_object("{alpha: 1", "hyperparameters")
    with pytest.raises(StudioError, match="expected a JSON object"):
        parse_json_object("[1, 2]", "hyperparameters")
    for deep in ("[" * 100000 + "]" * 100000, '{"a":' * 5000 + "1" + "}" * 5000):   # a bare RecursionError before
        with pytest.raises(StudioError, match=r"preferences: nested too deeply to read; expected a flat JSON object"):
            parse_json_object(deep, "preferences")


def test_post_scale_and_sweep_defaults_stay_inside_the_range():
    for entry in ALL:
        p = post_scale_param(entry)
        span = sweep_defaults(entry)
        assert (p is None) == (span is None)
        if span is not None:
            lo, hi = span
            assert lo < hi
            validate_hparams(entry["name"], _spec(entry).params, {p["name"]: lo})
            validate_hparams(entry["name"], _spec(entry).params, {p["name"]: hi})
    with pytest.raises(HyperparameterError):
        validate_hparams("task_arithmetic", get_method("task_arithmetic").params, {"alpha": 99})


def test_the_sources_read_as_the_schema_writes_them():
    """The app folds where each default comes from into one Markdown list below the controls; rendered as CommonMark
    (Gradio's Markdown follows it), each item reads exactly as the schema's ``paper`` (``reset_thresh=20``,
    ``state_dict_to_vector``, ``T * k`` are not markup there)."""
    import html
    import re

    markdown_it = pytest.importorskip("markdown_it")
    from studio.ui.controls import sources_markdown

    seen = 0
    for entry in ALL:
        specs = control_specs(entry, num_tasks=8)
        rendered = markdown_it.MarkdownIt("commonmark").render(sources_markdown(specs))
        items = re.findall(r"<li>(.*?)</li>", rendered, flags=re.S)
        want = [(p["name"], p["paper"]) for p in entry["params"] if p["paper"] and p["help"]]
        assert len(items) == len(want), (entry["name"], rendered)
        for item, (name, paper) in zip(items, want):
            assert item.startswith(f"<strong>{name}</strong>: ")
            text = item.split("</strong>: ", 1)[1]
            assert "<" not in text, (entry["name"], name, text)   # no emphasis, code or link
            assert html.unescape(text) == paper
            seen += 1
    assert seen >= 20
    # and what would be markup if a source held it
    made = "Alg. 1 * eq. 2 * 3; `code`, [link](x), _emphasis_, <b>tag</b>, a | b, ~~strike~~, back\\slash"
    rendered = markdown_it.MarkdownIt("commonmark").render(sources_markdown([ControlSpec("k", "slider", "k", 0.1,
                                                                                       source=made)]))
    assert html.unescape(re.findall(r"</strong>: (.*?)</li>", rendered, flags=re.S)[0]) == made, rendered


def test_a_slider_box_holding_no_number_keeps_the_value_stored_before():
    """An emptied slider box (or text typed into it) sends null: it was stored, the diagnostics said "hyperparameter
    'alpha' must not be None" and a merge took 0, the box's display. The value stored before is kept (else the
    slider's starting value); a ticked "auto" box and a dropdown are as before."""
    specs = [ControlSpec("k", "slider", "k", 0.5, auto_label="auto (1/T)"),
             ControlSpec("alpha", "slider", "alpha", 0.3), ControlSpec("n", "slider", "n", 5, step=1),
             ControlSpec("mode", "dropdown", "mode", "x", choices=("x",))]
    before = {"k": 0.2, "alpha": 0.7, "n": 9, "mode": "x"}
    for blank in (None, float("nan"), ""):
        assert collect(specs, [blank, False, blank, blank, "x"]) == {"k": 0.5, "alpha": 0.3, "n": 5, "mode": "x"}
        assert collect(specs, [blank, False, blank, blank, None], before) == {"k": 0.2, "alpha": 0.7, "n": 9,
                                                                              "mode": None}
        assert collect(specs, [blank, True, blank, 2.5, "x"], {"k": None}) == {"k": None, "alpha": 0.3, "n": 3,
                                                                             "mode": "x"}
    assert collect(specs, [0.4, False, 1.5, 6.5, "x"], before) == {"k": 0.4, "alpha": 1.5, "n": 7, "mode": "x"}


def test_rule_formulas_are_parsed_once_per_text_whatever_the_threads(monkeypatch):
    """CPython 3.11's ast.parse is not thread safe (gh-106905: "AST constructor recursion depth mismatch"), and the
    page renders the method's and the calibration's controls on two worker threads at once: a CI run of the browser
    tests lost the method's controls to that SystemError. Each rule text is parsed once, under a lock, and its tree
    reused: from 8 threads of 200 calls each, ast.parse runs once per distinct text, never two at once."""
    import ast
    import threading

    from studio.ui import controls

    controls._rule_tree.cache_clear()
    real, calls, inside, overlap = ast.parse, [], [0], []

    def parse(text, *args, **kwargs):
        inside[0] += 1
        overlap.append(inside[0] > 1)
        calls.append(text)
        try:
            return real(text, *args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(controls.ast, "parse", parse)
    rules = ("1/T (1.0 after tsv_m)", "|T|/4", "1/R", "2 * T + 1", "1/ (")
    results = []

    def work():
        results.append([controls.auto_rule_value(rule, 8, 128) for _ in range(200) for rule in rules])

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == sorted({"1/T", "T/4", "1/R", "2 * T + 1", "1/"}) and not any(overlap)
    assert all(r == results[0] for r in results) and results[0][:5] == [0.125, 2.0, 1 / 128, 17.0, None]
    controls._rule_tree.cache_clear()
