"""The app in a real browser (Debian's Chromium through Playwright) on the embedded MiniSuite.

Screenshots land in ``artifacts/screenshots/`` (gitignored) for a human look. The tests are one user's session on
one page (the ``page`` fixture is the module's), each step starting where the one before left the page: run the file
as a whole; a selection of its tests (``-k``) may start from a page no step of it expects.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from .conftest import require_or_skip_module

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
# The first singular value of the merged delta as plotly drew it (decoded data, not the JSON payload).
MERGED_TOP_JS = """() => {
    const gd = document.querySelector('#spectrum-plot .js-plotly-plot');
    const full = gd && gd._fullData ? gd._fullData.find(t => t.name === 'merged') : null;
    return full && full.y && full.y.length ? Number(full.y[0]) : null;
}"""

# The page is up: the diagnostics' status line shows the first spectrum's summary.
LOADED_JS = "() => (document.querySelector('#diag-status') || {}).innerText?.includes('σ')"

# Whether the diagnostics' status line starts with the merge `want`, "method (settings", complete: followed by the
# closing ')' or by the ' | ' before a calibration's or the preferences' settings. The plots beside it are that merge's.
SHOWS_JS = """want => {
    const t = (document.querySelector('#diag-status') || {}).innerText?.trim() || '';
    return t.startsWith(want + ')') || t.startsWith(want + ' |');
}"""

# Playwright's sync API (not the pytest plugin) so the browser comes from the system, never from a download.
sync_api = pytest.importorskip("playwright.sync_api")
require_or_skip_module(None if Path(CHROMIUM).exists() else f"{CHROMIUM} is missing", "apt-get install chromium")


@pytest.fixture(scope="module")
def app_url(launched_app):
    return launched_app.demo.local_url


@pytest.fixture(scope="module")
def page(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        context = browser.new_context(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        t0 = time.perf_counter()
        pg.goto(app_url)
        pg.wait_for_function(LOADED_JS)
        for plot in ("spectrum", "energy", "heatmap", "curves"):
            pg.wait_for_selector(f"#{plot}-plot .js-plotly-plot")
        pg.load_seconds = time.perf_counter() - t0
        yield pg
        browser.close()


def _status(pg) -> str:
    return pg.inner_text("#diag-status")


def _merged_trace_top(pg) -> float | None:
    """The first singular value of the merged trace as drawn by plotly in the page (None if not drawn)."""
    return pg.evaluate(MERGED_TOP_JS)


def _select_method(pg, name: str) -> None:
    pg.get_by_label("Merging method").click()
    pg.get_by_role("option", name=name, exact=True).click()


def test_page_loads_with_the_suite(page, app_url):
    import app

    tasks = app.STUDIO.task_names
    assert page.load_seconds < 30
    for t in tasks:
        assert page.get_by_text(t, exact=False).first.is_visible()
    assert page.locator("#spectrum-plot .js-plotly-plot").count() == 1
    assert page.locator("#heatmap-plot .js-plotly-plot").count() == 1
    page.screenshot(path=str(SHOTS / "01_loaded.png"), full_page=True)


def test_changing_the_method_changes_the_controls(page):
    _select_method(page, "ties")
    page.get_by_text("topk_scope").first.wait_for()
    assert page.get_by_text("merge_func").first.is_visible()
    # each control shows its help; where its default comes from is folded below them (the help ran to ten lines)
    source = "reset_thresh=20"   # the official code's setting behind TIES' k = 20 %
    assert "Fraction of each task vector kept" in page.inner_text("body")
    assert not page.get_by_text(source, exact=False).first.is_visible()
    page.get_by_text("ties: where the defaults come from").click()
    page.get_by_text(source, exact=False).first.wait_for()
    page.screenshot(path=str(SHOTS / "02_method_ties_sources.png"), full_page=True)
    # AlignMerge-B is a method (with its scale lam) and a calibration of the same name (without): the method's own
    _select_method(page, "align_merge_b")
    page.get_by_text("lam", exact=True).first.wait_for()
    page.wait_for_function("() => document.body.innerText.includes('Sum the task matrices')")   # its summary
    _select_method(page, "task_arithmetic")
    page.wait_for_function("() => !document.body.innerText.includes('topk_scope')")
    assert page.locator("input[type=range]").count() >= 1
    page.screenshot(path=str(SHOTS / "02_method_task_arithmetic.png"), full_page=True)


def test_releasing_a_slider_updates_the_spectrum(page):
    # the method switch's own diagnostics first: the status names the merge the plots show (a wait of a second for
    # them was too short on a loaded machine, and the spectrum read was the previous method's)
    page.wait_for_function(SHOWS_JS, arg="task_arithmetic (alpha=0.3")
    before_top = _merged_trace_top(page)
    assert before_top is not None
    slider = page.locator("input[type=range]").first  # task_arithmetic's alpha (its only control)
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    t0 = time.perf_counter()
    page.mouse.click(box["x"] + 0.8 * box["width"], box["y"] + box["height"] / 2)  # press + release
    page.wait_for_function(f"prev => ({MERGED_TOP_JS})() > prev * 1.5", arg=before_top)
    latency = time.perf_counter() - t0
    # alpha went from 0.3 to ~4: the merged delta's top singular value scales with alpha.
    assert _merged_trace_top(page) > 5 * before_top
    assert latency < 10
    page.screenshot(path=str(SHOTS / "03_slider_released.png"), full_page=True)


def test_a_task_preference_slider_reweights_the_merge(page):
    before_top = _merged_trace_top(page)
    page.get_by_text("Task preferences").click()
    slider = page.locator("#pref-sliders input[type=range]").first  # the first task's weight (default 1)
    slider.wait_for()
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    page.mouse.click(box["x"] + 0.15 * box["width"], box["y"] + box["height"] / 2)
    page.wait_for_function(f"prev => Math.abs(({MERGED_TOP_JS})() - prev) > 1e-3 * prev", arg=before_top)
    assert float(page.locator("#pref-sliders input[type=number]").first.input_value()) < 0.5
    page.screenshot(path=str(SHOTS / "04_preferences.png"), full_page=True)


def test_merge_shows_results_and_downloads_the_weights(page, tmp_path):
    import app
    from studio.io import RECIPE_METADATA_KEY, Recipe, load_state_dict, read_metadata

    page.get_by_role("button", name="Merge & evaluate").click()
    page.wait_for_function("() => document.querySelector('#run-status')?.innerText.includes('Run #1')")
    page.wait_for_function("() => document.querySelector('#acc-table')?.innerText.includes('average')")
    table = page.inner_text("#acc-table")
    assert all(t in table for t in app.STUDIO.task_names) and "normalized %" in table
    assert page.locator("#pred-gallery img").count() > 0
    assert "✓" in page.inner_text("#pred-gallery") or "✗" in page.inner_text("#pred-gallery")
    # each caption is shown whole (six to a row, Gradio cut them at one line: "house_nu...", "aerial_scen...")
    captions = page.evaluate("() => [...document.querySelectorAll('#pred-gallery .caption-label')]"
                             ".map(e => [e.innerText, e.scrollWidth <= e.clientWidth + 1])")
    assert captions and all(whole for _, whole in captions), captions
    page.screenshot(path=str(SHOTS / "05_results.png"), full_page=True)

    with page.expect_download() as info:
        page.locator("#dl-weights").click()
    target = tmp_path / info.value.suggested_filename
    info.value.save_as(target)
    assert target.suffix == ".safetensors"
    weights = load_state_dict(target)
    assert weights.keys() == app.STUDIO.suite.base.keys()
    recipe = Recipe.from_text(read_metadata(target)[RECIPE_METADATA_KEY])
    assert recipe.method == "task_arithmetic" and recipe.experts == app.STUDIO.task_names
    assert recipe.preferences and recipe.preferences[app.STUDIO.task_names[0]] < 0.5  # the UI's settings


def test_a_double_click_starts_one_merge(page):
    import app

    page.get_by_role("button", name="Merge & evaluate").dblclick()
    page.wait_for_function("() => document.querySelector('#run-status')?.innerText.includes('Run #2')")
    page.wait_for_timeout(6000)  # a second job, if one had been queued, would have finished by now
    assert "Run #3" not in page.inner_text("#run-status")
    runs = [len(s.runs) for s in app.SESSIONS._data.values()]
    assert max(runs) == 2


def test_no_expert_selected_shows_a_readable_error(page):
    first = page.locator("input[type=checkbox]").first  # the "select all" box of the expert pool
    first.uncheck()
    page.wait_for_function(
        "() => document.querySelector('#diag-status').innerText.includes('Select at least one expert')")
    page.get_by_role("button", name="Merge & evaluate").click()
    page.get_by_text("no expert selected").first.wait_for()
    page.screenshot(path=str(SHOTS / "06_no_expert_error.png"), full_page=True)
    first.check()
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('σ')")


def test_the_rank_slider_follows_the_number_of_experts(page):
    """TSV-M keeps ``int(r * rank_fraction)`` components of each of ``T`` tasks in ``r`` dimensions, so its slider
    ends at ``1/T``: unchecking experts widens it; checking them again narrows it and moves a value it now leaves out
    to its end, which the next merge then uses (else the engine would refuse it)."""
    import app

    assert len(app.STUDIO.task_names) == 8
    # the method's first slider, as the page holds it now (each change of the selection renders it again)
    rank = "([max, value]) => { const s = document.querySelector('input[type=range]'); " \
           "return !!s && !s.disabled && s.max == max && (value === null || s.value == value); }"
    _select_method(page, "tsv_m")
    page.get_by_text("auto (1/T)").first.click()   # the slider takes over from the automatic 1/T
    page.wait_for_function(rank, arg=["0.125", None])
    # and starts where some layer keeps a component: MiniSuite's widest layers have rank 128, int(128 * 0.005) = 0
    assert page.evaluate("() => document.querySelector('input[type=range]').min") == "0.01"
    # its help text reads as the schema writes it, its products as products: Gradio shows a control's info through a
    # small Markdown of its own, where the two '*' of "int(r * fraction) ... T * k" made an emphasis and vanished
    shown = page.inner_text("body")
    assert "(k = int(r \u2217 fraction), 0 on a layer of rank below 1/fraction); T \u2217 k must not exceed r" in shown

    def to_the_right_end() -> None:
        slider = page.locator("input[type=range]").first
        slider.scroll_into_view_if_needed()
        box = slider.bounding_box()
        page.mouse.click(box["x"] + box["width"] - 1, box["y"] + box["height"] / 2)

    experts = page.locator("input[type=checkbox]")   # "select all", then one box per expert
    for i in range(1, 5):
        experts.nth(i).uncheck()
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('4 tasks')")
    page.wait_for_function(rank, arg=["0.25", None])
    to_the_right_end()
    page.wait_for_function(rank, arg=["0.25", "0.25"])
    page.screenshot(path=str(SHOTS / "07_rank_slider_four_experts.png"), full_page=True)

    def merged_settings(run: int) -> tuple[str, int, str]:
        page.get_by_role("button", name="Merge & evaluate").click()
        page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{run}')")
        last = max((s.runs[-1] for s in app.SESSIONS._data.values() if s.runs), key=lambda r: r.run)
        return last.method, len(last.experts), last.settings

    method, count, settings = merged_settings(3)
    assert method == "tsv_m" and count == 4 and "rank_fraction=0.25," in settings
    for i in range(1, 5):
        experts.nth(i).check()
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('8 tasks')")
    page.wait_for_function(rank, arg=["0.125", "0.125"])
    # the diagnostics come to the merge at the new end, with no note that it is unavailable
    page.wait_for_function(SHOWS_JS, arg="tsv_m (rank_fraction=0.125, alpha=1")
    assert "unavailable" not in _status(page)
    method, count, settings = merged_settings(4)   # the stored 0.25 was moved to the new end with the slider
    assert method == "tsv_m" and count == 8 and "rank_fraction=0.125," in settings   # set, not "0.125 (auto)"


def test_the_svc_slider_starts_at_its_default_after_the_method(page):
    """SVC's automatic clip is 1/T, but 1.0 after TSV-M; its greyed slider showed 1/T there, and unticking "auto"
    then moved the merge from 1.0 to 1/T unseen. It now starts at the engine's own default for the method shown."""
    _select_method(page, "tsv_m")
    page.get_by_label("Calibration").click()
    page.get_by_role("option", name="svc", exact=True).click()
    svc_alpha = ("v => [...document.querySelectorAll('input[type=range]')]"
                 ".some(s => s.max == '1' && s.step == '0.005' && s.value == v)")   # (the preference sliders: 0.05)
    page.wait_for_function(svc_alpha, arg="1")
    assert page.get_by_text("svc · alpha").first.is_visible()   # not a second "alpha" beside TSV-M's
    # its "auto" box names the rule that holds, and the calibration (TSV-M's own box reads "auto (1/T)")
    page.get_by_role("checkbox", name="svc · auto (1.0 after tsv_m)", exact=True).wait_for()
    _select_method(page, "ties")
    page.wait_for_function(svc_alpha, arg="0.125")
    page.get_by_role("checkbox", name="svc · auto (1/T)", exact=True).wait_for()
    page.screenshot(path=str(SHOTS / "08_svc_after_ties.png"), full_page=True)


def test_keys_on_a_slider_reach_the_diagnostics_and_the_merge(page):
    """Gradio stores a slider's value on a pointer's release; a key on its range sends only "input", so the value
    shown was not the one merged until the slider was clicked. The page releases the range when the key comes up."""
    import app

    page.get_by_label("Calibration").click()
    page.get_by_role("option", name="none", exact=True).click()
    _select_method(page, "task_arithmetic")
    alpha = page.locator("input[type=range]").first
    page.wait_for_function("() => { const s = document.querySelector('input[type=range]'); "
                           "return !!s && s.max == '5' && s.step == '0.05'; }")   # the method's alpha, rendered
    page.wait_for_function("() => !document.body.innerText.includes('svc · alpha')")
    shown = float(alpha.input_value())
    # the method switch's own diagnostics first (the status names the merge the plots show)
    page.wait_for_function(SHOWS_JS, arg=f"task_arithmetic (alpha={shown:g}")
    top = _merged_trace_top(page)
    assert shown > 0 and top is not None

    alpha.focus()
    alpha.press("End")              # 5.0
    for _ in range(3):
        alpha.press("ArrowLeft")    # 4.85: one release per key, the last one wins
    assert alpha.input_value() == "4.85"
    # Task Arithmetic's merged delta is alpha times the sum: its top singular value follows the key presses
    page.wait_for_function(f"want => Math.abs(({MERGED_TOP_JS})() - want) < 1e-3 * want", arg=top * 4.85 / shown)

    page.get_by_role("button", name="Merge & evaluate").click()
    before = max((r.run for s in app.SESSIONS._data.values() for r in s.runs), default=0)
    page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{before + 1}')")
    last = max((s.runs[-1] for s in app.SESSIONS._data.values() if s.runs), key=lambda r: r.run)
    assert last.method == "task_arithmetic" and "alpha=4.85" in last.settings, last.settings

    # focus leaving while the key is held (Tab, or a click elsewhere): the key comes up elsewhere, and the range is
    # released as it loses focus
    page.get_by_role("tab", name="Diagnostics").click()
    alpha.focus()
    page.keyboard.down("ArrowLeft")
    page.keyboard.down("ArrowLeft")   # a repeat: 4.75
    page.keyboard.press("Tab")
    page.keyboard.up("ArrowLeft")
    assert alpha.input_value() == "4.75"
    alpha.focus()
    page.keyboard.down("ArrowLeft")   # 4.7
    page.mouse.click(5, 5)
    page.keyboard.up("ArrowLeft")
    assert alpha.input_value() == "4.7"
    page.wait_for_function(f"want => Math.abs(({MERGED_TOP_JS})() - want) < 1e-3 * want", arg=top * 4.7 / shown)
    method, settings = _merge_settings(page)
    assert method == "task_arithmetic" and "alpha=4.7" in settings, settings


def test_a_value_typed_into_a_slider_box_reaches_the_merge_clicked_at_once(page):
    """Typing a value into a slider's number box and clicking Merge at once: the box's blur stores the value (the
    slider's release) before the merge reads the stored controls."""
    import app

    _select_method(page, "task_arithmetic")
    page.wait_for_function("() => { const s = document.querySelector('input[type=range]'); "
                           "return !!s && s.max == '5' && s.step == '0.05'; }")
    box = page.locator("input[type=number]").first
    for value in ("1.35", "0.7"):
        box.fill(value)
        before = max((r.run for s in app.SESSIONS._data.values() for r in s.runs), default=0)
        page.get_by_role("button", name="Merge & evaluate").click()
        page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{before + 1}')")
        last = max((s.runs[-1] for s in app.SESSIONS._data.values() if s.runs), key=lambda r: r.run)
        assert last.method == "task_arithmetic" and f"alpha={value}" in last.settings, (value, last.settings)


def _merge_settings(page) -> tuple[str, str]:
    """Click Merge & evaluate, wait for its run, and return the run's method and settings as recorded."""
    import app

    # numbered on from the last run made, which may have been removed (its status line then names it too)
    before = max((s.made for s in app.SESSIONS._data.values()), default=0)
    page.get_by_role("button", name="Merge & evaluate").click()
    page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{before + 1} · ')")
    last = max((s.runs[-1] for s in app.SESSIONS._data.values() if s.runs), key=lambda r: r.run)
    return last.method, last.settings


def test_reset_to_defaults_after_a_method_switch(page):
    """Gradio's own ↺ on a slider reset it to the value its browser component was first created with, and the browser
    reuses components across renders: after Iso-CTS, Ortho-Merge's integer k reset to 1.5 and the merge was refused.
    The rendered sliders have no ↺; one "Reset ... to defaults" puts every control and the stored values back."""
    _select_method(page, "iso_cts")
    page.get_by_text("common_space_fraction").first.wait_for()
    _select_method(page, "ortho_merge")
    page.get_by_role("button", name="Reset ortho_merge to defaults").wait_for()
    # no ↺ on a slider a render made (nor on the Optimise tab's static one, the number of α values)
    ranges = page.locator("input[type=range]")
    for i in range(ranges.count()):
        block = ranges.nth(i).locator("xpath=ancestor::div[contains(@class,'block')][1]")
        assert block.locator("button.reset-button").count() == 0, block.inner_text()
    k = page.locator("input[type=range][max='512']").first   # Ortho-Merge's k in [1, 512] on MiniSuite
    k.focus()
    k.press("End")
    tau = page.locator("input[type=range]").first
    tau.focus()
    tau.press("Home")
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('σ')")
    method, settings = _merge_settings(page)
    assert method == "ortho_merge" and "k=512" in settings and "tau=0" in settings, settings
    page.get_by_role("button", name="Reset ortho_merge to defaults").click()
    page.wait_for_function("() => document.querySelector(\"input[type=range][max='512']\").value == '5'")
    assert tau.input_value() == "0.3"
    page.screenshot(path=str(SHOTS / "09_reset_to_defaults.png"), full_page=True)
    method, settings = _merge_settings(page)
    assert method == "ortho_merge" and "k=5" in settings and "tau=0.3" in settings, settings


def test_ticking_auto_again_shows_the_automatic_value(page):
    """An "auto" box ticked again greys its slider at the automatic value the merge now uses (it kept the last
    manual one, unlike what it shows after a render)."""
    _select_method(page, "tsv_m")
    auto = page.get_by_role("checkbox", name="auto (1/T)").first
    auto.wait_for()
    auto.uncheck()   # the slider takes over (the rank test above may have left it so)
    rank = page.locator("input[type=range]").first
    page.wait_for_function("() => !document.querySelector('input[type=range]').disabled")
    rank.focus()
    rank.press("Home")
    assert rank.input_value() == "0.01"
    method, settings = _merge_settings(page)
    assert "rank_fraction=0.01" in settings, settings
    auto.check()   # on again
    page.wait_for_function("() => { const s = document.querySelector('input[type=range]'); "
                           "return s.disabled && s.value == '0.125'; }")
    method, settings = _merge_settings(page)
    assert "rank_fraction=0.125 (auto)" in settings, settings   # 1/T, for the 8 experts selected
    page.get_by_role("button", name="Reset tsv_m to defaults").click()   # and leave the default for the next tests


def test_optimise_stops_and_forgets_another_methods_sweep(page):
    """Stop ends a sweep at its next alpha and says so; a sweep's result is dropped when the method changes (its
    "Use best α" then raised an error for the method shown)."""
    _select_method(page, "task_arithmetic")
    page.get_by_role("tab", name="Optimise").click()
    optimise = page.get_by_role("button", name="Optimise alpha")
    optimise.wait_for()
    optimise.click()
    import app

    started = time.perf_counter()
    while not any(s.job for s in app.SESSIONS._data.values()):   # the sweep runs (a fixed wait raced a loaded CPU)
        assert time.perf_counter() - started < 60, "the sweep did not start"
        time.sleep(0.05)
    page.get_by_role("button", name="Stop").click()
    stopped = time.perf_counter()
    page.get_by_text("Optimisation stopped.").first.wait_for()

    # and the sweep itself ends at its next alpha (about a second each here; 9 of them were asked for): Gradio's
    # cancel alone leaves the worker running, holding the queue's slot for the next merge
    while any(s.job for s in app.SESSIONS._data.values()):
        assert time.perf_counter() - stopped < 5, "the sweep went on after Stop"
        time.sleep(0.1)
    use_best = page.get_by_role("button", name="Use best alpha")
    assert use_best.is_disabled()

    points = page.get_by_role("slider", name="range slider for number of α values")
    points.focus()
    points.press("Home")   # 3 points
    optimise.click()
    page.get_by_text("Best for task_arithmetic").first.wait_for()
    assert use_best.is_enabled()
    _select_method(page, "ties")
    page.wait_for_function("() => !document.body.innerText.includes('Best for task_arithmetic')")
    assert use_best.is_disabled()
    page.get_by_role("tab", name="Diagnostics").click()


# Each diagnostics plot drawn no wider than its box (Plotly's own 700 px where it laid it out in a hidden tab).
PLOTS_FIT_JS = """() => ['spectrum', 'energy', 'heatmap', 'curves'].every(name => {
    const gd = document.querySelector(`#${name}-plot .js-plotly-plot`);
    const svg = gd && gd.querySelector('.main-svg');
    return !!svg && svg.getBoundingClientRect().width > 0
        && svg.getBoundingClientRect().width <= gd.parentElement.getBoundingClientRect().width + 1;
})"""


def test_plots_redrawn_behind_another_tab_fit_and_a_new_selection_drops_the_sweep(page):
    """Diagnostics redrawn while the Results tab showed came back 700 px wide in narrower boxes, their legends, colour
    bar and right ends cut off until the window was resized; a sweep over 8 experts kept "Use best alpha" for a
    selection of 7 (a browser audit)."""
    _select_method(page, "task_arithmetic")
    page.get_by_role("tab", name="Optimise").click()
    points = page.get_by_role("slider", name="range slider for number of α values")
    points.focus()
    points.press("Home")   # 3 points
    page.get_by_role("button", name="Optimise alpha").click()
    page.get_by_text("Best for task_arithmetic").first.wait_for()
    use_best = page.get_by_role("button", name="Use best alpha")
    assert use_best.is_enabled()
    page.get_by_role("tab", name="Results").click()
    status = "() => document.querySelector('#diag-status').textContent"
    page.locator("input[type=checkbox]").nth(1).uncheck()   # the first expert
    page.wait_for_function(f"() => ({status})().includes('7 tasks')")
    page.get_by_role("tab", name="Diagnostics").click()
    page.wait_for_function(PLOTS_FIT_JS, timeout=20_000)
    page.get_by_role("tab", name="Optimise").click()
    page.wait_for_function("() => !document.body.innerText.includes('Best for task_arithmetic')")
    assert use_best.is_disabled()
    page.get_by_role("tab", name="Diagnostics").click()
    page.locator("input[type=checkbox]").nth(1).check()
    page.wait_for_function(f"() => ({status})().includes('8 tasks')")


# Counts the times a job's status line showed Gradio's "Error" badge, from now on.
ERROR_BADGES_JS = """() => { window.__error_badges = 0;
    new MutationObserver(() => { if (document.querySelector('#opt-status .error, #run-status .error'))
        window.__error_badges++; })
      .observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true}); }"""


def test_stop_shows_no_error_and_a_waiting_merge_starts_only_to_stop(page, app_url, monkeypatch):
    """Stop of a running sweep: Gradio's cancel of it made the page mark its status line "Error", for a moment or
    for good (a badge in 5 of 6 sweeps stopped 0.3-2.5 s in); the job is now stopped by the session's flag alone. A
    merge that waits in the queue behind another session's job says at once that it stopped, and starts only to
    stop, with no run and no badge (a Gradio cancel there took it off the queue, and marked it "Error" too)."""
    import app

    def jobs() -> bool:
        return any(s.job for s in app.SESSIONS._data.values())

    page.evaluate(ERROR_BADGES_JS)
    page.get_by_role("tab", name="Optimise").click()
    points = page.get_by_role("slider", name="range slider for number of α values")
    points.focus()
    points.press("Home")
    for _ in range(6):
        points.press("ArrowRight")   # 9 values, about 0.6 s each here: the sweep outlasts the longest wait below
    assert points.input_value() == "9"
    for wait in (0.4, 1.2, 2.0):   # into the sweep, at different points of an alpha's evaluation
        page.get_by_role("button", name="Optimise alpha").click()
        started = time.perf_counter()
        while not jobs():
            assert time.perf_counter() - started < 60, "the sweep did not start"
            time.sleep(0.05)
        time.sleep(wait)
        assert jobs(), "the sweep ended before its Stop"
        page.get_by_role("button", name="Stop").click()
        page.get_by_text("Optimisation stopped.").first.wait_for()
        while jobs():
            time.sleep(0.05)
        page.wait_for_timeout(1000)   # the badge came up to a few hundred milliseconds after the Stop
        assert page.evaluate("() => window.__error_badges") == 0, f"an Error badge after a Stop {wait} s in"

    other = page.context.browser.new_context(viewport={"width": 1500, "height": 1100}).new_page()
    try:
        other.set_default_timeout(60_000)
        other.goto(app_url)
        other.wait_for_function(LOADED_JS)
        other.get_by_role("tab", name="Results").click()
        other.evaluate(ERROR_BADGES_JS)
        runs = sum(len(s.runs) for s in app.SESSIONS._data.values())
        started = []   # every merge or sweep asks as it starts
        check = app._stopped_since_click
        monkeypatch.setattr(app, "_stopped_since_click",
                            lambda sess, kind: started.append(check(sess, kind)) or started[-1])
        page.get_by_role("button", name="Optimise alpha").click()   # this session's sweep holds the queue's slot
        while not jobs():
            time.sleep(0.05)
        other.get_by_role("button", name="Merge & evaluate").click()
        other.wait_for_function("() => /queue/.test(document.querySelector('#run-status').innerText)")
        other.get_by_role("button", name="Stop").click()
        # said at once, while the merge waits (it said nothing until its turn, a sweep's length later)
        other.wait_for_function("() => document.querySelector('#run-status').innerText.includes('Merge stopped.')",
                                timeout=2000)
        assert jobs(), "the sweep ended before the waiting merge's Stop was seen"
        page.get_by_text("Best for").first.wait_for()   # the sweep ends as it would have
        deadline = time.perf_counter() + 30
        while len(started) < 2 or jobs():   # then the merge starts, and stops at once
            assert time.perf_counter() - deadline < 0, f"the waiting merge did not start and stop: {started}"
            time.sleep(0.05)
        assert started == [False, True]
        other.get_by_text("Merge stopped.").first.wait_for()   # its warning
        other.wait_for_timeout(1000)
        assert sum(len(s.runs) for s in app.SESSIONS._data.values()) == runs
        assert other.evaluate("() => window.__error_badges") == 0
        assert "Run #" not in other.inner_text("#run-status")
    finally:
        other.context.close()
    points.focus()
    points.press("Home")   # 3 values again, as the tests before left it
    page.get_by_role("tab", name="Diagnostics").click()


def test_equal_weights_puts_every_preference_back(page):
    """The preference sliders' "Equal weights" (in place of Gradio's own per-slider reset): every slider back at 1 and
    the next merge uniform."""
    import re

    panel = page.locator("#pref-sliders")
    if not panel.locator("input[type=range]").first.is_visible():
        page.get_by_text("Task preferences").click()
    first = panel.locator("input[type=range]").first
    first.focus()
    first.press("Home")   # 0 for the first task
    _select_method(page, "task_arithmetic")
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('σ')")
    method, settings = _merge_settings(page)
    assert re.search(r"prefs \w+:0\b", settings), settings
    panel.get_by_role("button", name="Equal weights").click()
    page.wait_for_function("() => [...document.querySelectorAll('#pref-sliders input[type=range]')]"
                           ".every(s => s.value == '1')")
    assert panel.locator("button.reset-button").count() == 0
    method, settings = _merge_settings(page)
    assert "prefs" not in settings or set(re.findall(r":([\d.]+)", settings.split("prefs", 1)[1])) == {"1"}, settings


def test_the_sai_heatmap_is_drawn_on_a_signed_log_scale(page):
    """After TSV-M, SAI (sigma / c - 1) runs from about -6e3 to 6e3 with a median near 80: on a linear colour range
    set by the largest cell, all but one or two cells looked neutral ("no interference")."""
    _select_method(page, "tsv_m")
    page.get_by_role("tab", name="Diagnostics").click()   # a merge before shows its results
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="sai", exact=True).click()
    title = "() => document.querySelector('#heatmap-plot .js-plotly-plot')?.layout?.title?.text || ''"
    page.wait_for_function(f"() => ({title})().includes('sai') && ({title})().includes('signed log scale')")
    ticks = page.evaluate("() => document.querySelector('#heatmap-plot .js-plotly-plot')._fullData[0]"
                          ".colorbar.ticktext")
    assert "1000" in ticks and "-1000" in ticks
    page.screenshot(path=str(SHOTS / "10_sai_signed_log_scale.png"), full_page=True)
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="subspace_similarity", exact=True).click()


def test_the_heatmap_over_the_whole_model(page):
    """"Heatmap over: whole model" draws the metric over every matrix layer (its title says so); a per-subspace metric
    stays on the layer and says why; "this layer" brings the layer's matrix back."""
    title = "() => document.querySelector('#heatmap-plot .js-plotly-plot')?.layout?.title?.text || ''"
    cells = "() => JSON.stringify(document.querySelector('#heatmap-plot .js-plotly-plot')?._fullData?.[0]?.customdata)"
    page.get_by_role("tab", name="Diagnostics").click()
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="cosine", exact=True).click()
    page.wait_for_function(f"() => ({title})() === 'Interference · cosine'")
    layer_cells = page.evaluate(cells)
    page.locator("#heatmap-scope").get_by_text("whole model").click()
    page.wait_for_function(f"() => ({title})().startsWith('Interference · cosine<br><sup>whole model, ') "
                           f"&& ({title})().includes('matrix layers (task vectors over them)')")
    assert page.evaluate(cells) != layer_cells
    page.screenshot(path=str(SHOTS / "11_whole_model_heatmap.png"), full_page=True)
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="svc", exact=True).click()
    page.wait_for_function(f"() => ({title})().startsWith('Interference · svc<br><sup>this layer: per merged "
                           f"subspace')")
    page.locator("#heatmap-scope").get_by_text("this layer").click()
    page.wait_for_function(f"() => ({title})() === 'Interference · svc'")
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="subspace_similarity", exact=True).click()
    page.wait_for_function(f"() => ({title})() === 'Interference · subspace_similarity'")
    # the k the heatmap takes (the metric's default) is named under it: Fig. 1's 5 here
    page.get_by_text("Shown at the default: k = subspace dimension per task (default 5, as in Fig. 1)").wait_for()


class _HeldRequests:
    """The page's queued requests (``queue/join``), held while :meth:`hold` is on and sent in reverse order by
    :meth:`release`: a network that delivers them late and out of order, as two requests of a loaded page may be."""

    def __init__(self, pg):
        self.held: list = []
        self.holding = False
        pg.route("**/queue/join*", self._on)

    def _on(self, route) -> None:
        if self.holding:
            self.held.append(route)
        else:
            route.continue_()

    def hold(self) -> None:
        self.holding = True

    def release(self) -> int:
        self.holding = False
        held, self.held = self.held, []
        for route in reversed(held):
            route.continue_()
        return len(held)


def test_the_values_set_are_merged_whatever_order_the_requests_arrive_in(page):
    """Quick key presses on a slider, a value typed and Merge clicked at once (and again while that merge is pending),
    and Stop right after a click: with the page's requests held and then delivered in reverse order, the merge uses
    the values shown, the second click merges nothing more, and Stop merges nothing. The controls' values were stored
    on the server before: four key presses were stored as 4.85 then 4.9 (two requests overtaking each other; the
    merge used 4.9 under the shown 4.85), a click could overtake a store, and a store could reach a function a
    render of the controls had replaced. The page stores them now."""
    import app

    net = _HeldRequests(page)
    try:
        _rerender_task_arithmetic(page)
        alpha = page.locator("input[type=range]").first
        page.wait_for_function("() => { const s = document.querySelector('input[type=range]'); "
                               "return !!s && s.max == '5' && s.step == '0.05'; }")

        def merged_while_held(act, clicks: int = 1) -> str:
            before = max((r.run for s in app.SESSIONS._data.values() for r in s.runs), default=0)
            net.hold()
            act()
            for _ in range(clicks):   # a click while the merge of the one before is pending is dropped
                page.get_by_role("button", name="Merge & evaluate").click()
                page.wait_for_timeout(300)
            page.wait_for_timeout(200)    # every request of the changes and the clicks sent, and held
            assert net.release() >= 1     # the merge's own first step at least
            page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText"
                                   f".includes('Run #{before + 1}')")
            if clicks > 1:
                page.wait_for_timeout(4000)   # a second merge, had a click queued one, would have ended by now
            runs = [r for s in app.SESSIONS._data.values() for r in s.runs]
            last = max(runs, key=lambda r: r.run)
            assert last.run == before + 1 and last.method == "task_arithmetic", [(r.run, r.settings) for r in runs]
            return last.settings

        def keys():
            alpha.focus()
            alpha.press("End")              # 5.0
            for _ in range(3):
                alpha.press("ArrowLeft")    # 4.85
            assert alpha.input_value() == "4.85"

        assert "alpha=4.85" in merged_while_held(keys)
        box = page.locator("input[type=number]").first
        assert "alpha=2.35" in merged_while_held(lambda: box.fill("2.35"), clicks=2)   # the click leaves the box
        page.wait_for_function(SHOWS_JS, arg="task_arithmetic (alpha=2.35")   # the diagnostics follow too
        # Stop right after the click, while its requests are held: nothing is merged
        runs = max(r.run for s in app.SESSIONS._data.values() for r in s.runs)
        net.hold()
        box.fill("1.55")
        page.get_by_role("button", name="Merge & evaluate").click()
        page.wait_for_timeout(300)
        page.get_by_role("button", name="Stop").click()
        page.wait_for_timeout(300)
        net.release()
        page.wait_for_timeout(5000)   # a merge of about 2 s, had one been started
        assert max(r.run for s in app.SESSIONS._data.values() for r in s.runs) == runs
    finally:
        net.release()
        page.unroute("**/queue/join*")


def _rerender_task_arithmetic(pg) -> None:
    """Render Task Arithmetic's controls again (through TIES, whose alpha slider is alike), and wait for them."""
    _select_method(pg, "ties")
    pg.get_by_text("topk_scope").first.wait_for()
    _select_method(pg, "task_arithmetic")
    pg.wait_for_function("() => !document.body.innerText.includes('topk_scope')")
    pg.get_by_role("button", name="Reset task_arithmetic to defaults").wait_for()


def test_the_page_stores_the_controls_as_collect_does(page):
    """The controls' store runs in the page (``collect_js``, ``store_js``): on 400 random settings of every kind of
    control (automatic ones ticked or not, integer sliders at halves of either sign, values typed beyond a slider's
    range, infinities), it stores what the server's ``collect`` gives, next to the other methods' values, which it
    keeps; the preference weights' form (``owner`` None) keeps the other tasks' weights; and the store sets an
    integer slider to the value it stored exactly where the slider held another (``shown_value``), and an emptied box
    to the value stored, within the range for the number of tasks at hand."""
    import random

    from studio.ui.controls import ControlSpec, collect, collect_js, shown_value, store_js

    specs = [ControlSpec("k", "slider", "k", 0.5, auto_label="auto (1/T)", minimum=0.0, maximum=1.0),
             ControlSpec("r", "slider", "r", 4, step=1, auto_label="auto (rank)", minimum=1, maximum=64),
             ControlSpec("n", "slider", "n", 5, step=1, minimum=-50, maximum=50), ControlSpec("a", "slider", "a", 1.0),
             ControlSpec("flag", "checkbox", "flag", False),
             ControlSpec("mode", "dropdown", "mode", "x", choices=("x", "y"))]
    rng = random.Random(0)

    def number() -> float:
        return rng.choice([rng.randint(-40, 40) / 2, rng.uniform(-1e3, 1e3), rng.randint(-9, 9), 1e15 + 0.5,
                           -(1e15 + 0.5), 2.4999999, float("inf"), -0.5, rng.uniform(-0.2, 1.2)])

    cases = []
    for _ in range(400):
        values: list = []
        for spec in specs:
            values.append(number() if spec.kind == "slider" else
                          rng.random() < 0.5 if spec.kind == "checkbox" else rng.choice(["x", "y"]))
            if spec.auto_label is not None:
                values.append(rng.random() < 0.5)
        cases.append(values)
    state = {"ties": {"alpha": 0.7}, "owner": {"k": 0.1}}
    run = "([src, state, cases]) => cases.map(v => eval('(' + src + ')')(state, ...v))"
    stored = page.evaluate(run, [collect_js(specs, "owner"), state, cases])
    assert stored == [{**state, "owner": collect(specs, values)} for values in cases]
    flat = page.evaluate(run, [collect_js(specs, None), {"other": 0.25, "k": 0.3}, cases])
    assert flat == [{"other": 0.25, "k": 0.3, **collect(specs, values)} for values in cases]
    # n (after k, its box, r, its box) at halves, where rounding a half up (as the range input does) and halving to
    # even differ
    halves = [v[4] for v in cases if v[4] % 1 == 0.5]
    assert any(round(v) != math.floor(v + 0.5) for v in halves) and any(v < 0 for v in halves)
    stores = page.evaluate(run, [store_js(specs, "owner"), state, cases])
    for values, (new_state, *updates) in zip(cases, stores):
        assert new_state == {**state, "owner": collect(specs, values)}
        i = 0
        for spec in specs:
            value, automatic = values[i], spec.auto_label is not None and values[i + 1]
            shown = value if automatic else shown_value(spec, value)
            assert updates[i] == ({"__type__": "update"} if shown == value else {"__type__": "update", "value": shown})
            i += 1
            if spec.auto_label is not None:
                assert updates[i] == {"__type__": "update"}
                i += 1
    # a box that holds no number shows the value stored as the range for the selection at hand shows it (the store
    # keeps the value: a number typed beyond the end is merged at the end)
    by_tasks = [[ControlSpec("n", "slider", "n", 5, step=1, minimum=1, maximum=T + 1)] for T in range(3)]
    held = [({"T": 0}, {"owner": {"n": 9}}, None, 1), ({"T": 2}, {"owner": {"n": 9}}, "", 3),
            ({"T": 2}, {"owner": {"n": 2}}, None, 2), ({"T": 1}, {}, None, 2), ({"T": 2}, {"owner": {"n": 9}}, 7, 7)]
    run = "([src, cases]) => cases.map(([tasks, state, v]) => eval('(' + src + ')')(tasks, state, v))"
    stores = page.evaluate(run, [store_js(by_tasks[2], "owner", by_tasks), [c[:3] for c in held]])
    for (_, state, value, shown), (new_state, update) in zip(held, stores):
        assert new_state == {"owner": collect(by_tasks[2], [value], state.get("owner"))}
        assert update == ({"__type__": "update"} if shown == value else {"__type__": "update", "value": shown})


def test_method_switches_while_requests_are_pending_render_the_controls_a_few_times(page, monkeypatch):
    """Two method switches sent while the page's requests are held, then delivered in reverse order: the controls of
    the last method are rendered, a bounded number of times. The page sends an event again to all its listeners
    when one that was busy ends; with four listeners on the method's change, two busy ones took turns without end
    (the controls rendered again every 0.3 s for a minute, and a value typed into them was lost)."""
    import app

    renders: list[str] = []
    real = app._render_params

    def counted(schema, stored, prefix, *args, **kwargs):
        renders.append(prefix)
        return real(schema, stored, prefix, *args, **kwargs)

    monkeypatch.setattr(app, "_render_params", counted)   # looked up by the render when it runs
    net = _HeldRequests(page)
    try:
        for _ in range(3):
            net.hold()
            _select_method(page, "ties")
            page.wait_for_timeout(300)
            _select_method(page, "task_arithmetic")
            page.wait_for_timeout(300)
            net.release()
            page.get_by_role("button", name="Reset task_arithmetic to defaults").wait_for()
            page.wait_for_timeout(3000)   # a render every 0.3 s, had two listeners taken turns
            method_renders = [r for r in renders if r.startswith("hp-")]   # a calibration's are "cal-..."
            assert 1 <= len(method_renders) <= 3 and method_renders[-1] == "hp-task_arithmetic", renders
            renders.clear()
    finally:
        net.release()
        page.unroute("**/queue/join*")


def test_a_number_typed_beyond_a_slider_or_between_its_integers_is_merged_as_shown(page):
    """A slider's number box takes any number; the slider shows it at its range's end (0.97 typed for Breadcrumbs'
    gamma, whose slider ends at 0.94) or, on an integer slider, at the nearest integer (6.5 typed for Ortho-Merge's
    k: the range input rounds a half up). The merge used the number typed (gamma 0.97; k 6, halved to even) under
    the value shown; the box now shows the value stored, which the merge uses. Enter in the box applies it, as
    leaving the box does (it stored nothing until the box lost focus)."""
    _select_method(page, "breadcrumbs")
    gamma = page.get_by_role("spinbutton", name="number input for gamma")
    gamma.wait_for()
    end = page.get_by_role("slider", name="range slider for gamma").get_attribute("max")
    assert float(end) < 0.97
    gamma.fill("0.97")
    gamma.press("Tab")
    page.wait_for_function("([end]) => document.querySelector('[aria-label=\"number input for gamma\"]').value == end",
                           arg=[end])
    method, settings = _merge_settings(page)
    assert method == "breadcrumbs" and f"gamma={float(end):g}," in settings, settings

    _select_method(page, "ortho_merge")
    k = page.get_by_role("spinbutton", name="number input for k")
    k.wait_for()
    k.fill("6.5")
    k.press("Tab")
    page.wait_for_function("() => document.querySelector('[aria-label=\"number input for k\"]').value == '7'")
    assert page.get_by_role("slider", name="range slider for k").input_value() == "7"
    method, settings = _merge_settings(page)
    assert method == "ortho_merge" and "k=7," in settings, settings
    k.fill("8.4")
    k.press("Enter")   # focus stays in the box
    page.wait_for_function(SHOWS_JS.replace("t.startsWith(want + ')') || t.startsWith(want + ' |')",
                                            "t.startsWith(want)"), arg="ortho_merge (tau=0.3, k=8,")
    assert page.evaluate("() => document.activeElement?.getAttribute('aria-label')") == "number input for k"
    page.get_by_role("button", name="Reset ortho_merge to defaults").click()
    _select_method(page, "breadcrumbs")
    page.get_by_role("button", name="Reset breadcrumbs to defaults").click()


def test_a_value_set_right_after_an_expert_selection_changes_is_merged(page):
    """A new expert selection can move a stored value to the end of the range it now has (TSV-M's rank_fraction ends
    at 1/T); the server wrote that fit over the page's values as the change had sent them, so alpha typed right
    after checking an expert, and merged at once, went back to its value before (4 of 4 tries in a browser audit).
    The renders and the request now fit the stored values to the selection, and nothing writes them."""
    experts = page.locator("input[type=checkbox]")   # "select all", then one box per expert
    _select_method(page, "tsv_m")
    page.get_by_role("button", name="Reset tsv_m to defaults").click()
    page.get_by_text("auto (1/T)").first.click()
    for i in range(1, 5):
        experts.nth(i).uncheck()
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('4 tasks')")
    rank = page.get_by_role("slider", name="range slider for rank_fraction")
    page.wait_for_function("() => document.querySelector('[aria-label=\"range slider for rank_fraction\"]')"
                           "?.max == '0.25'")
    rank.focus()
    rank.press("End")   # 0.25, the end for 4 tasks
    page.wait_for_function(SHOWS_JS, arg="tsv_m (rank_fraction=0.25, alpha=1")
    alpha = page.get_by_role("spinbutton", name="number input for alpha")
    for typed in ("1.25", "1.45"):
        experts.nth(1).check()   # 5 tasks: rank_fraction ends at 0.2
        alpha.fill(typed)
        method, settings = _merge_settings(page)
        assert method == "tsv_m" and f"rank_fraction=0.2, alpha={typed}" in settings, (typed, settings)
        assert alpha.input_value() == typed
        page.wait_for_function("() => document.querySelector('[aria-label=\"range slider for rank_fraction\"]')"
                               "?.max == '0.2'")
        assert rank.input_value() == "0.2"
        experts.nth(1).uncheck()
        page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('4 tasks')")
    for i in range(1, 5):
        experts.nth(i).check()
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('8 tasks')")
    page.get_by_role("button", name="Reset tsv_m to defaults").click()


def test_use_best_alpha_after_a_merge(page):
    """A merge cleared the sweep's best value and left "Use best alpha" enabled, which then said to run the
    optimisation first; it now sets the slider to the sweep's value, which the next merge uses."""
    import re

    _select_method(page, "task_arithmetic")
    page.get_by_role("tab", name="Optimise").click()
    page.get_by_role("button", name="Optimise alpha").click()
    page.get_by_text("Best for task_arithmetic").first.wait_for()
    best = re.search(r"alpha = ([\d.]+)", page.inner_text("body")).group(1)
    _merge_settings(page)
    page.get_by_role("tab", name="Optimise").click()
    net = _HeldRequests(page)   # set in the page while its requests are held (the server's write, which put back
    try:                        # a value set within its round trip, is gone)
        net.hold()
        page.get_by_role("button", name="Use best alpha").click()
        page.wait_for_function("want => document.querySelector('[aria-label=\"number input for alpha\"]').value "
                               "== want", arg=best)
        net.release()
    finally:
        net.release()
        page.unroute("**/queue/join*")
    method, settings = _merge_settings(page)
    assert method == "task_arithmetic" and f"alpha={best}" in settings, (best, settings)
    page.get_by_role("tab", name="Diagnostics").click()
    page.get_by_role("button", name="Reset task_arithmetic to defaults").click()


def test_the_seed_reaches_the_diagnostics_and_the_leaderboard(page):
    """DARE's masks follow the seed: the diagnostics showed the merge of seed 0 whatever the seed box held, and two
    runs that differed by the seed alone read alike in the leaderboard."""
    _select_method(page, "dare")
    page.wait_for_function(SHOWS_JS, arg="dare (p=0.8, ties_consensus=False, alpha=0.3 | seed 0")
    seed = page.get_by_label("Seed (stochastic methods)")
    seed.fill("7")
    seed.press("Tab")
    page.wait_for_function(SHOWS_JS, arg="dare (p=0.8, ties_consensus=False, alpha=0.3 | seed 7")
    method, settings = _merge_settings(page)
    assert method == "dare" and settings.endswith("| seed 7"), settings
    # the box shows the seed merged: Gradio rounds it (half to even) for the server alone, and the box kept 2.7
    page.get_by_role("tab", name="Diagnostics").click()
    for typed, merged, how in (("2.7", "3", "Tab"), ("2.5", "2", "Enter"), ("3.5", "4", "Tab")):
        seed.fill(typed)
        seed.press(how)
        page.wait_for_function(SHOWS_JS, arg=f"dare (p=0.8, ties_consensus=False, alpha=0.3 | seed {merged}")
        page.wait_for_function("v => document.querySelector('#seed-box input').value === v", arg=merged)
    method, settings = _merge_settings(page)
    assert settings.endswith("| seed 4"), settings
    page.get_by_role("tab", name="Diagnostics").click()
    seed.fill("0")
    seed.press("Tab")
    _select_method(page, "task_arithmetic")
    page.wait_for_function(SHOWS_JS, arg="task_arithmetic (alpha=0.3")   # no seed for a method that draws none


def test_a_preference_weight_is_kept_while_its_expert_is_not_selected(page):
    """The preference sliders stored only the tasks shown: a weight set for a task, then the task unchecked and
    another weight moved, came back at 1 with the task."""
    panel = page.locator("#pref-sliders")
    if not panel.locator("input[type=range]").first.is_visible():
        page.get_by_text("Task preferences").click()
    experts = page.locator("input[type=checkbox]")
    first_task = panel.locator("input[type=range]").first.get_attribute("aria-label").removeprefix("range slider for ")
    first = panel.get_by_role("slider", name=f"range slider for {first_task}")
    first.focus()
    first.press("Home")   # 0
    experts.nth(1).uncheck()   # the first task
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('7 tasks')")
    page.wait_for_function(f"() => !document.querySelector('[aria-label=\"range slider for {first_task}\"]')")
    other = panel.locator("input[type=range]").first
    other.focus()
    other.press("Home")
    other.press("End")   # released: the store runs
    experts.nth(1).check()
    page.wait_for_function(f"() => document.querySelector('[aria-label=\"range slider for {first_task}\"]')"
                           f"?.value == '0'")
    method, settings = _merge_settings(page)
    assert f"{first_task}:0," in settings, settings
    panel.get_by_role("button", name="Equal weights").click()
    page.wait_for_function("() => [...document.querySelectorAll('#pref-sliders input[type=range]')]"
                           ".every(s => s.value == '1')")


def test_the_method_and_the_calibration_both_follow_the_selection(page):
    """TSV-M's rank_fraction ends at 1/T and AlignMerge-B's automatic gate starts at |T|/4: a new selection sets both
    in the page, with no render (a listener a render adds to an event of a component outside it takes the place of
    the others in Gradio 6.31: with both on the selection's change, only the calibration's followed it)."""
    experts = page.locator("input[type=checkbox]")
    page.get_by_label("Calibration").click()   # first: the method's list of options also has an align_merge_b
    page.get_by_role("option", name="align_merge_b", exact=True).click()
    _select_method(page, "tsv_m")
    page.get_by_role("button", name="Reset tsv_m to defaults").wait_for()
    shows = """want => JSON.stringify(['rank_fraction', 'align_merge_b · alpha'].map(n => {
        const s = document.querySelector(`[aria-label='range slider for ${n}']`);
        return s && [s.max, s.value]; })) == JSON.stringify(want)"""
    page.wait_for_function(shows, arg=[["0.125", "0.125"], ["100", "2"]], polling=100)
    for i in range(1, 5):
        experts.nth(i).uncheck()
    page.wait_for_function(shows, arg=[["0.25", "0.25"], ["100", "1"]], polling=100)
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('4 tasks')")
    # the automatic values as they are for the 4 experts (TSV-M's 1/8 and 1/4 read the same in the leaderboard)
    page.wait_for_function(SHOWS_JS, arg="tsv_m (rank_fraction=0.25 (auto), alpha=1 | align_merge_b(alpha=1 (auto)")
    experts.nth(0).click()   # "select all", with some selected: all
    page.wait_for_function(shows, arg=[["0.125", "0.125"], ["100", "2"]], polling=100)
    experts.nth(0).click()   # and with all selected: none
    page.wait_for_function("() => document.querySelector(`[aria-label='range slider for rank_fraction']`).max == '1'")
    experts.nth(0).click()
    page.wait_for_function(shows, arg=[["0.125", "0.125"], ["100", "2"]], polling=100)
    page.get_by_label("Calibration").click()
    page.get_by_role("option", name="none", exact=True).click()
    page.wait_for_function("() => !document.body.innerText.includes('align_merge_b · alpha')")


def test_the_page_fits_the_stored_values_to_a_selection_as_fit_to_controls_does(page):
    """A new selection's ranges are set in the page (``follow_tasks_js``): for TSV-M (its rank fraction ends at
    1/T) and AlignMerge-B's calibration (an automatic start of |T|/4), on 300 random stored values and numbers of
    tasks, the stored values of the params that depend on T are those :func:`fit_to_controls` gives, the others and
    the other methods' untouched (the request fits those); each slider that depends on T gets that T's range, shown
    at its automatic start when "auto" is ticked and else at the value moved into the range."""
    import random

    import app
    from studio.ui.controls import collect, control_specs, fit_to_controls, follow_tasks_js, initial_values, reset_js

    studio_ = app.STUDIO
    rng = random.Random(1)
    for name, kind in (("tsv_m", "merge"), ("align_merge_b", "calibration")):
        schema, rank = studio_.schema(name, kind), studio_.largest_rank(name, kind)
        src = follow_tasks_js(schema, name, 8, largest_rank=rank, base_method="ties")
        specs = control_specs(schema, num_tasks=8, largest_rank=rank, base_method="ties")
        cases = []
        for _ in range(150):
            stored = {s.name: rng.choice([None, rng.uniform(-1, 3), rng.uniform(0, 0.3), 2, "x"])
                      for s in specs if rng.random() < 0.8}
            values = []
            for s in specs:
                values.append(rng.uniform(-1, 3) if s.kind == "slider" else s.value)
                if s.auto_label is not None:
                    values.append(rng.random() < 0.5)
            cases.append([rng.randint(0, 8), {"other": {"k": 9}, name: stored}, values])
        out = page.evaluate("([src, cases]) => cases.map(([T, state, values]) => "
                            "eval('(' + src + ')')(T, state, ...values))", [src, cases])
        depends = {s.name for T in range(9)
                   for s, s_T in zip(specs, control_specs(schema, num_tasks=T or None, largest_rank=rank,
                                                          base_method="ties"))
                   if s.kind == "slider" and (s.minimum, s.maximum, s.value) != (s_T.minimum, s_T.maximum, s_T.value)}
        assert depends
        for (T, state, values), (new_state, *updates) in zip(cases, out):
            fitted = fit_to_controls(schema, state[name], T or None, rank)
            expected = {k: fitted[k] if k in depends else v for k, v in state[name].items()}
            assert new_state == {"other": {"k": 9}, name: expected}, (T, state, new_state)
            at_T = control_specs(schema, num_tasks=T or None, largest_rank=rank, base_method="ties")
            i = 0
            for s, s_T in zip(specs, at_T):
                value, automatic = values[i], s.auto_label is not None and values[i + 1]
                if (s.minimum, s.maximum) != (s_T.minimum, s_T.maximum) or s.value != s_T.value:
                    shown = s_T.value if automatic else min(max(value, s_T.minimum), s_T.maximum)
                    assert updates[i]["minimum"] == s_T.minimum and updates[i]["maximum"] == s_T.maximum
                    assert updates[i].get("value", value) == shown and updates[i]["interactive"] is not automatic
                i += 1 + (s.auto_label is not None)
        # "Reset to defaults" (reset_js) of controls rendered for T0 experts, pressed with T selected: every control
        # shows T's starting value (an "auto" box ticked, its slider greyed), a slider that depends on T gets T's
        # range, and the stored values are the starting ones for T (the other methods' untouched)
        specs_at = [control_specs(schema, num_tasks=T or None, largest_rank=rank, base_method="ties")
                    for T in range(9)]
        pairs = [(T0, T) for T0 in range(9) for T in range(9)]
        resets = page.evaluate("(cases) => cases.map(([src, T, state]) => eval('(' + src + ')')({T}, state))",
                               [[reset_js(specs_at[T0], name, src), T, {"other": {"k": 9}, name: {"x": 1}}]
                                for T0, T in pairs])
        for (T0, T), (*updates, new_state) in zip(pairs, resets):
            at_T = specs_at[T]
            assert new_state == {"other": {"k": 9}, name: collect(at_T, initial_values(at_T))}, (T0, T)
            i = 0
            for s_T in at_T:   # the layout of T0's controls (the same params)
                u = updates[i]
                if s_T.kind == "slider":
                    assert u["value"] == s_T.value and u["interactive"] is (s_T.auto_label is None), (T0, T, u)
                    if s_T.name in depends:
                        assert (u["minimum"], u["maximum"]) == (s_T.minimum, s_T.maximum), (T0, T, u)
                else:
                    assert u == s_T.value
                if s_T.auto_label is not None:
                    assert updates[i + 1] == {"__type__": "update", "value": True}
                i += 1 + (s_T.auto_label is not None)


def test_a_stop_as_a_merge_ends_records_no_run_the_page_did_not_show(page, monkeypatch):
    """Stop pressed after the merge's last step, before its run was recorded: the run was recorded all the same
    (the job checked Stop only at its steps), while Stop's cancel dropped the results it would have shown. The page
    said nothing, the next run's number skipped one, and the leaderboard and its CSV held a row the user never saw
    (a browser audit hit it 2 times in 8 with Stop about 1.3 s after Merge). The job now records its run only if
    Stop did not come first, and says it stopped."""
    import threading

    import app

    finished = threading.Event()
    original = app.merge_and_evaluate

    def ends_then_waits_for_stop(req, folder, session_hash=None, progress=None, **kwargs):
        out = original(req, folder, session_hash, progress, **kwargs)   # every step done, the files exported
        finished.set()
        sess, deadline = app.SESSIONS.get(session_hash), time.monotonic() + 30
        stops = sess.stops
        while sess.stops == stops and time.monotonic() < deadline:   # Stop lands here
            time.sleep(0.05)
        return out

    def runs() -> list:
        return [r.run for s in app.SESSIONS._data.values() for r in s.runs]

    before = max(runs(), default=0)
    monkeypatch.setattr(app, "merge_and_evaluate", ends_then_waits_for_stop)
    page.get_by_role("tab", name="Results").click()   # where the run's status is
    page.locator("#run-status").wait_for()
    page.get_by_role("button", name="Merge & evaluate").click()
    assert finished.wait(120), "the merge did not end"
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function("() => document.querySelector('#run-status')?.innerText.includes('Merge stopped.')")
    started = time.monotonic()
    while any(s.job for s in app.SESSIONS._data.values()):   # the job's end, at most a few seconds on
        assert time.monotonic() - started < 30, "the job did not end"
        time.sleep(0.05)
    assert max(runs(), default=0) == before, runs()
    go = threading.Event()

    def held(*args, **kwargs):
        assert go.wait(60), "the merge was not let go"
        return original(*args, **kwargs)

    monkeypatch.setattr(app, "merge_and_evaluate", held)
    page.get_by_role("button", name="Merge & evaluate").click()   # the next run is numbered next, and shown
    # while it runs, "Merge stopped." is gone: it stayed under the progress until the run's end
    page.wait_for_function("() => !document.querySelector('#run-status')?.innerText.includes('Merge stopped.')",
                           timeout=10_000)
    go.set()
    page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{before + 1} ')")
    assert max(runs()) == before + 1


def test_a_stop_after_a_merge_recorded_its_run_leaves_its_results_on_the_page(page, monkeypatch):
    """Stop pressed after the merge recorded its run, before its results reached the page: there is no job left to
    stop, and the results come as they would have (a Gradio cancel then would drop them: a run in the leaderboard
    and its CSV that the page never showed, and no word of a stop either)."""
    import threading

    import app
    from studio.ui.session import SessionData

    recorded = threading.Event()
    original = SessionData.leaderboard_csv

    def waits_for_stop(self, *args, **kwargs):   # called by the merge right after it recorded its run
        recorded.set()
        stops, deadline = self.stops, time.monotonic() + 30
        while self.stops == stops and time.monotonic() < deadline:   # Stop lands here
            time.sleep(0.05)
        return original(self, *args, **kwargs)

    before = max((r.run for s in app.SESSIONS._data.values() for r in s.runs), default=0)
    monkeypatch.setattr(SessionData, "leaderboard_csv", waits_for_stop)
    page.get_by_role("tab", name="Results").click()
    page.locator("#run-status").wait_for()
    page.get_by_role("button", name="Merge & evaluate").click()
    assert recorded.wait(120), "the merge did not record its run"
    page.get_by_role("button", name="Stop").click()
    page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText.includes('Run #{before + 1} ')")
    assert "stopped" not in page.inner_text("#run-status")
    assert page.locator("#run-status .error").count() == 0


def _upload_recipe(pg, path: Path) -> None:
    with pg.expect_file_chooser() as chooser:
        pg.get_by_role("button", name="Load a recipe (.yaml, .json, .safetensors)").click()
    chooser.value.set_files(str(path))


def test_a_run_and_a_recipe_load_their_settings_back(page, tmp_path):
    """A run of the leaderboard, and a recipe file, load their settings back into the setup panel: the method, the
    experts, the calibration, the hyperparameters and the task weights, which the next merge then merges (the same
    bits as the run's, by the fingerprint its recipe records). A recipe naming an expert the suite lacks is refused,
    naming it, and the page goes on."""
    import app
    from studio.io import Recipe

    def last_run():
        return max((s.runs[-1] for s in app.SESSIONS._data.values() if s.runs), key=lambda r: r.run)

    def same_merge(a, b) -> None:
        assert (b.method, b.settings, b.experts) == (a.method, a.settings, a.experts)
        assert b.recipe["fingerprints"]["merged"] == a.recipe["fingerprints"]["merged"]

    # run A: TIES on five experts, k typed, the first task weighted 0 and SVC after it
    _select_method(page, "ties")
    experts = page.locator("input[type=checkbox]")   # "select all", then one box per expert
    for i in range(6, 9):
        experts.nth(i).uncheck()
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.includes('5 tasks')")
    page.get_by_label("number input for k").fill("0.35")
    page.get_by_label("number input for k").press("Enter")
    page.get_by_label("Calibration").click()
    page.get_by_role("option", name="svc", exact=True).click()
    page.get_by_text("svc · auto (1/T)").click()   # the slider takes over
    page.get_by_label("number input for svc · alpha").fill("0.5")
    page.get_by_label("number input for svc · alpha").press("Enter")
    panel = page.locator("#pref-sliders")
    if not panel.locator("input[type=range]").first.is_visible():
        page.get_by_text("Task preferences").click()
    first = panel.locator("input[type=range]").first
    first.focus()
    first.press("Home")
    page.wait_for_function(SHOWS_JS, arg="ties (k=0.35, topk_scope=model, merge_func=sum, alpha=0.3 | svc(alpha=0.5, "
                                         "target_guard=True)")
    _merge_settings(page)
    run_a = last_run()
    assert "svc(" in run_a.settings and ":0," in run_a.settings and len(run_a.experts) == 5, run_a.settings

    # run B: TSV-M on every expert, equal weights, no calibration (the values set for SVC were merged with it too:
    # "calibration hyperparameters were given but no calibration is selected")
    _select_method(page, "tsv_m")
    experts.first.check()
    page.get_by_label("Calibration").click()
    page.get_by_role("option", name="none", exact=True).click()
    panel.get_by_role("button", name="Equal weights").click()
    page.wait_for_function(SHOWS_JS, arg="tsv_m (rank_fraction=0.125 (auto), alpha=1")
    _merge_settings(page)
    run_b = last_run()

    # run A's settings back, from the list of runs
    page.get_by_role("tab", name="Results").click()
    page.get_by_label("Run of this session").click()
    page.get_by_role("option", name=f"#{run_a.run} · ties").click()
    page.get_by_role("button", name="Load its settings").click()
    page.wait_for_function(f"() => document.querySelector('#load-status')?.innerText"
                           f".startsWith('Loaded run #{run_a.run}')")
    page.wait_for_function(SHOWS_JS, arg=f"ties ({run_a.settings}")   # the diagnostics show it
    assert page.get_by_label("number input for k").input_value() == "0.35"
    assert page.get_by_label("Merging method").input_value() == "ties"
    page.screenshot(path=str(SHOTS / "11_run_settings_loaded.png"), full_page=True)
    _merge_settings(page)
    same_merge(run_a, last_run())

    # run B's recipe, as a file a user keeps
    path = tmp_path / "tsv_m.yaml"
    path.write_text(Recipe.from_dict(run_b.recipe).to_yaml())
    _upload_recipe(page, path)
    page.wait_for_function("() => document.querySelector('#load-status')?.innerText"
                           ".startsWith('Loaded the recipe tsv_m.yaml')")
    page.wait_for_function(SHOWS_JS, arg=f"tsv_m ({run_b.settings}")
    _merge_settings(page)
    same_merge(run_b, last_run())

    bad = tmp_path / "bad.json"
    bad.write_text('{"method": "ties", "experts": ["digits", "stripes"]}')
    _upload_recipe(page, bad)
    page.get_by_text("unknown expert(s) ['stripes']").first.wait_for()
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [")
    _upload_recipe(page, broken)   # named by its name, not the server's upload folder
    message = page.get_by_text("broken.yaml: not valid YAML/JSON").first
    message.wait_for()
    assert "/gradio/" not in message.inner_text()
    page.get_by_role("tab", name="Diagnostics").click()
    assert _status(page).startswith(f"tsv_m ({run_b.settings}")   # nothing changed


# ------------------------------------------------------------------------------------------- accessibility
def test_the_results_of_a_merge_a_sweep_and_a_load_are_announced(page):
    """A screen reader heard nothing of a merge's result ("Run #1 · ... average accuracy ..."), a sweep's best value
    or a load: their lines are polite live regions now (set by the page's HEAD script, as Gradio's Markdown takes no
    ARIA attributes). The diagnostics' status is not one: it changes on every step of a slider."""
    for tab in ("Results", "Optimise", "Diagnostics"):   # a tab's content is built when it is first shown
        page.get_by_role("tab", name=tab).click()
    live = "id => { const e = document.getElementById(id); return !!e && e.getAttribute('role') === 'status' " \
           "&& e.getAttribute('aria-live') === 'polite'; }"
    for region in ("run-status", "opt-status", "load-status"):
        page.wait_for_function(live, arg=region, timeout=10_000)
    assert page.evaluate("() => document.querySelector('#diag-status').closest('[aria-live]')") is None
    import app

    _merge_settings(page)
    run = max(r.run for s in app.SESSIONS._data.values() for r in s.runs)
    assert page.get_by_role("status").filter(has_text=f"Run #{run} ·").count() == 1


# WCAG 2's contrast ratio of an element's text colour on the first opaque background behind it (colours read
# through a canvas, whatever form the computed style gives them in).
CONTRAST_JS = """el => {
    const ctx = Object.assign(document.createElement('canvas'), {width: 1, height: 1}).getContext('2d');
    const rgba = (c) => { ctx.clearRect(0, 0, 1, 1); ctx.fillStyle = c; ctx.fillRect(0, 0, 1, 1);
                          return [...ctx.getImageData(0, 0, 1, 1).data]; };
    const lum = ([r, g, b]) => [r, g, b].map(v => v / 255).map(v => v <= 0.03928 ? v / 12.92
                                                                  : ((v + 0.055) / 1.055) ** 2.4)
                                        .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
    let bg = [255, 255, 255, 255];
    for (let a = el; a; a = a.parentElement) {
        const c = rgba(getComputedStyle(a).backgroundColor);
        if (c[3] > 200) { bg = c; break; }
    }
    const [l1, l2] = [lum(rgba(getComputedStyle(el).color)), lum(bg)].sort((x, y) => y - x);
    return (l1 + 0.05) / (l2 + 0.05);
}"""


def test_text_contrast_meets_wcag_aa(page):
    """The Soft theme's help text (2.5:1), block labels (3.6:1), selected tab (4.3:1) and white on its primary
    fills (4.5:1 at 4.47) were below WCAG AA's 4.5:1: the app's theme sets darker shades."""
    page.get_by_role("tab", name="Diagnostics").click()
    texts = {"help text": page.get_by_text("each expert's own test accuracy on its task").first,
             "block title": page.get_by_text("Merging method", exact=True).first,
             "plot label": page.locator("#spectrum-plot [data-testid=block-label]"),
             "selected tab": page.locator("[role=tab][aria-selected=true]").first,
             "primary button": page.get_by_role("button", name="Merge & evaluate"),
             "selected expert": page.locator("#expert-pool label.selected").first,
             "selected radio": page.locator("#heatmap-scope label.selected").first}
    ratios = {what: round(loc.evaluate(CONTRAST_JS), 2) for what, loc in texts.items()}
    assert all(r >= 4.5 for r in ratios.values()), ratios


def test_keyboard_focus_is_visible_on_checkboxes_radios_and_ranges(page):
    """Focus by keyboard changed no pixel on an expert's checkbox, a radio or a range (Soft: outline none): each
    draws an outline now."""
    outline = "el => { const s = getComputedStyle(el); return [el.matches(':focus-visible'), s.outlineStyle, " \
              "parseFloat(s.outlineWidth)]; }"
    controls = [page.locator("#expert-pool input[type=checkbox]").nth(1),
                page.locator("#heatmap-scope input[type=radio]:checked"),
                page.locator("input[type=range]:not([disabled])").first]
    for control in controls:
        control.scroll_into_view_if_needed()
        page.mouse.click(5, 5)
        assert control.evaluate(outline)[1] == "none"
        control.focus()
        page.keyboard.press("Shift+Tab")
        page.keyboard.press("Tab")   # back to it by keyboard
        focused, style, width = control.evaluate(outline)
        assert focused and style != "none" and width >= 2, (control, focused, style, width)
    page.mouse.click(5, 5)


def test_an_emptied_slider_box_keeps_the_value_stored(page):
    """A slider's box emptied (or text typed into it, which the browser drops) stored null: the diagnostics said
    "hyperparameter 'alpha' must not be None" while the box showed 0. The value stored before is kept, and shown as
    the range shows it: after a number typed beyond the end, the box showed that number again while the merge took
    the end."""
    _select_method(page, "task_arithmetic")
    page.get_by_role("button", name="Reset task_arithmetic to defaults").wait_for()   # its controls, rendered
    box = page.get_by_role("spinbutton", name="number input for alpha")
    box.fill("0.65")
    box.press("Enter")
    page.wait_for_function(SHOWS_JS, arg="task_arithmetic (alpha=0.65")
    box.fill("")
    box.press("Enter")
    page.wait_for_function("() => document.querySelector('[aria-label=\"number input for alpha\"]').value === '0.65'",
                           timeout=15_000)
    box.press("Control+a")
    page.keyboard.type("abc")
    box.press("Tab")
    page.wait_for_function("() => document.querySelector('[aria-label=\"number input for alpha\"]').value === '0.65'",
                           timeout=15_000)
    page.wait_for_timeout(1500)   # a diagnostics run of a null alpha, had one been stored
    assert "must not be None" not in _status(page) and _status(page).startswith("task_arithmetic (alpha=0.65)")
    method, settings = _merge_settings(page)
    assert method == "task_arithmetic" and "alpha=0.65" in settings, settings
    page.get_by_role("tab", name="Diagnostics").click()
    box.fill("9")   # alpha's range ends at 5
    box.press("Enter")
    page.wait_for_function(SHOWS_JS, arg="task_arithmetic (alpha=5")
    box.fill("")
    box.press("Enter")
    page.wait_for_timeout(1500)   # the store's answer
    assert box.input_value() == "5"
    method, settings = _merge_settings(page)
    assert "alpha=5" in settings, settings
    page.get_by_role("tab", name="Diagnostics").click()
    page.get_by_role("button", name="Reset task_arithmetic to defaults").click()
    page.wait_for_function(SHOWS_JS, arg="task_arithmetic (alpha=0.3")


def test_the_sweep_points_select_all_and_the_metric_have_clear_names(page):
    """The Optimise tab's slider read "points" and kept Gradio's ↺ ("Reset to default value", of what?); the expert
    pool's "Select all" box had no accessible name (a title only); "subspace_similarity" was cut in its dropdown."""
    page.get_by_role("checkbox", name="Select all experts").wait_for()
    metric = page.get_by_label("Interference metric")
    assert metric.input_value() == "subspace_similarity"
    assert metric.evaluate("el => el.scrollWidth <= el.clientWidth"), metric.evaluate(
        "el => [el.scrollWidth, el.clientWidth]")
    page.get_by_role("tab", name="Optimise").click()
    points = page.get_by_role("slider", name="range slider for number of α values")
    points.wait_for()
    block = points.locator("xpath=ancestor::div[contains(@class,'block')][1]")
    assert block.locator("button.reset-button").count() == 0
    page.get_by_role("tab", name="Diagnostics").click()


def test_a_narrow_page_shows_one_plot_per_row(page):
    """At 640 px (a 1280 px screen at 200 % zoom) the diagnostics plots were two to a row, 290 px each: labels
    overlapped, titles were cut. They wrap one to a row there, and stay two to a row on a wide page."""
    boxes = "() => ['spectrum', 'energy', 'heatmap', 'curves'].map(p => { " \
            "const r = document.getElementById(p + '-plot').getBoundingClientRect(); " \
            "return [r.left, r.top, r.bottom, r.width]; })"
    page.get_by_role("tab", name="Diagnostics").click()
    (s_left, s_top, _, _), (e_left, e_top, _, _), *_ = page.evaluate(boxes)
    assert e_left > s_left and abs(e_top - s_top) < 2   # wide: side by side
    try:
        page.set_viewport_size({"width": 640, "height": 1100})
        page.wait_for_timeout(1000)
        spectrum, energy, heatmap, curves = page.evaluate(boxes)
        assert energy[1] >= spectrum[2] - 1 and curves[1] >= heatmap[2] - 1, (spectrum, energy, heatmap, curves)
        assert all(b[3] >= 420 for b in (spectrum, energy, heatmap, curves))
        page.screenshot(path=str(SHOTS / "12_narrow_640.png"), full_page=True)
    finally:
        page.set_viewport_size({"width": 1500, "height": 1100})
        page.wait_for_timeout(500)


# Each plot's drawing as the page names it: [its aria-label, role, the figure's title as plotly has it, visible logo
# links].
PLOT_NAME_JS = """id => {
    const gd = document.querySelector('#' + id + ' .js-plotly-plot');
    const svg = gd && gd.querySelector('svg.main-svg');
    const title = String(gd?.layout?.title?.text || '').replace(/<br\\s*\\/?>/gi, ' · ').replace(/<[^>]*>/g, '');
    const logos = [...document.querySelectorAll('#' + id + ' a')].filter(a => getComputedStyle(a).display !== 'none');
    return svg ? [svg.getAttribute('aria-label'), svg.getAttribute('role'), title, logos.length] : null;
}"""


def test_plots_are_named_images_and_their_toolbars_have_no_logo_link(page):
    """The plots had no text alternative (unnamed images and stray SVG text), and each toolbar ended with plotly's
    unnamed logo link, a Tab stop in every plot. Each plot's drawing is an image named by the plot's label, its
    title and its series, kept up to date as the plot changes; the logo is hidden."""
    page.get_by_role("tab", name="Diagnostics").click()
    for plot, label in (("spectrum-plot", "Spectrum"), ("energy-plot", "Cumulative energy"),
                        ("heatmap-plot", "Interference"), ("curves-plot", "Per-layer curves")):
        name, role, title, logos = page.evaluate(PLOT_NAME_JS, plot)
        assert role == "img" and name.startswith(f"{label} plot") and title in name, (plot, name, title)
        assert logos == 0, plot
    assert "Series: " in page.evaluate(PLOT_NAME_JS, "spectrum-plot")[0]
    assert "SAR of each task" in page.evaluate(PLOT_NAME_JS, "curves-plot")[0]   # its panels' titles
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="cosine", exact=True).click()
    page.wait_for_function(f"() => (({PLOT_NAME_JS})('heatmap-plot')?.[0] || '').includes('cosine')")
    page.get_by_role("tab", name="Results").click()
    page.locator("#acc-plot .js-plotly-plot").wait_for()
    name, role, title, logos = page.evaluate(PLOT_NAME_JS, "acc-plot")
    assert role == "img" and name.startswith("Accuracy plot: Test accuracy per task") and logos == 0, name
    page.get_by_role("tab", name="Diagnostics").click()
    page.get_by_label("Interference metric").click()
    page.get_by_role("option", name="subspace_similarity", exact=True).click()


def test_a_run_removed_leaves_the_leaderboard_and_its_csv(page, tmp_path):
    """A run could not be taken off the session's leaderboard: a mistaken one stayed in it and in its CSV. "Remove it"
    takes the run picked off both, and the next run is numbered on (a number names one run for the session)."""
    import csv

    import app

    def session():
        return max((s for s in app.SESSIONS._data.values() if s.runs), key=lambda s: s.made)

    page.get_by_role("tab", name="Results").click()
    sess = session()
    gone, made = sess.runs[0].run, sess.made
    # each column's name on one line: Gradio sized a column by its cells, and cut "house_numbers" into four lines
    lines = page.evaluate("""() => [...document.querySelectorAll('#leaderboard thead th')].map((th) => {
        const walk = document.createTreeWalker(th, NodeFilter.SHOW_TEXT), tops = new Set();
        for (let node = walk.nextNode(); node; node = walk.nextNode()) {
            if (!node.textContent.trim()) continue;
            const range = document.createRange(); range.selectNodeContents(node);
            for (const r of range.getClientRects()) if (r.width > 0) tops.add(Math.round(r.top));
        }
        return [th.innerText.trim(), tops.size];
    })""")
    assert "house_numbers" in dict(lines) and all(n == 1 for _, n in lines), lines
    page.get_by_label("Run of this session").click()
    page.get_by_role("option", name=f"#{gone} · ").click()
    page.get_by_role("button", name="Remove it").click()
    page.wait_for_function(f"() => document.querySelector('#load-status')?.innerText"
                           f".startsWith('Removed run #{gone} ')")
    assert gone not in [r.run for r in sess.runs]
    page.get_by_label("Run of this session").click()
    assert page.get_by_role("option", name=f"#{gone} · ").count() == 0
    page.keyboard.press("Escape")
    with page.expect_download() as info:
        page.locator("#dl-csv").click()
    target = tmp_path / "leaderboard.csv"
    info.value.save_as(target)
    with target.open() as f:
        numbers = [int(row["run"]) for row in csv.DictReader(f)]
    assert gone not in numbers and sorted(numbers) == sorted(r.run for r in sess.runs)
    page.get_by_role("tab", name="Diagnostics").click()
    shown = sess.files["weights"], sess.files["recipe"]
    _merge_settings(page)
    assert sess.runs[-1].run == made + 1
    # the page offers the last run's weights and recipe only: the run before's are gone
    assert not any(Path(f).exists() for f in shown) and all(Path(sess.files[k]).exists() for k in ("weights", "recipe"))
    # the run shown removed: its results, downloads and files go with it
    shown = sess.files["weights"], sess.files["recipe"]
    page.get_by_label("Run of this session").click()
    page.get_by_role("option", name=f"#{made + 1} · ").click()
    page.get_by_role("button", name="Remove it").click()
    page.wait_for_function(f"() => document.querySelector('#run-status')?.innerText"
                           f".startsWith('Run #{made + 1} was removed.')")
    assert page.locator("#acc-table tbody tr").count() == 0
    assert page.locator("#dl-weights").is_disabled() and page.locator("#dl-recipe").is_disabled()
    assert not any(Path(f).exists() for f in shown) and "weights" not in sess.files
    assert page.locator("#dl-csv").is_enabled() == bool(sess.runs)


def test_the_whole_model_report_is_the_merge_shown_in_numbers(page, tmp_path):
    """The plots' numbers could not be had from the page, nor the whole-model diagnostics ``diagnose`` writes.
    "Whole-model report" gives both for the settings shown: a JSON file whose merge is the last run's (its recipe,
    as the run recorded it), whose numbers are the library's on that merge computed here from the suite's files, and
    whose ``shown`` holds what the plots drew (the merged spectrum plotly holds); its summary is said in words, in a
    live region."""
    import json

    import app
    from studio import diagnostics as diag
    from studio.engine import get_pool
    from studio.io import Recipe, merge_from_recipe
    from studio.registry import get_method
    from studio.schema import json_safe

    from .test_ui_backend import _close

    page.get_by_role("tab", name="Diagnostics").click()
    _merge_settings(page)   # the settings shown are a run's: its recorded recipe is the merge to report on
    run = max((s.runs[-1] for s in app.SESSIONS._data.values() if s.runs), key=lambda r: r.run)
    page.get_by_role("tab", name="Diagnostics").click()
    page.wait_for_function(SHOWS_JS, arg=f"{run.method} ({run.settings}")
    page.get_by_role("button", name="Whole-model report").click()
    page.wait_for_function("() => document.querySelector('#report-status')?.innerText.includes(' made in ')")
    said = page.inner_text("#report-status")
    assert said.startswith(f"Report of {run.method} ({run.settings}) on {len(run.experts)} experts, "), said
    assert page.get_by_role("status").filter(has_text="Report of ").count() == 1
    with page.expect_download() as info:
        page.locator("#dl-report").click()
    target = tmp_path / "report.json"
    info.value.save_as(target)
    rep = json.loads(target.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in strict JSON"))
    assert rep["merge"]["recipe"] == {k: v for k, v in run.recipe.items() if k != "fingerprints"}
    assert rep["tasks"] == list(run.experts)
    # the numbers, from the suite's files: the recipe merged, the library's report on it
    suite = app.STUDIO.suite
    experts = {n: suite.experts[n] for n in run.experts}
    merged = merge_from_recipe(Recipe.from_dict(rep["merge"]["recipe"]), suite.base, experts, device="cpu")
    want = diag.report(get_pool(suite.base, experts, device="cpu"), merged, merged_is_delta=False,
                       layer_rule=get_method(run.method).extra.get("layer_rule"))
    _close({k: rep[k] for k in want}, json_safe(want))
    shown = rep["shown"]
    assert shown["layer"] == page.locator("#diag-status code").first.inner_text()
    assert shown["merged_spectrum"][0] == pytest.approx(_merged_trace_top(page), rel=1e-6)
    for line in diag.report_summary(want):
        assert line in said, (line, said)
    page.screenshot(path=str(SHOTS / "13_report.png"), full_page=True)
    # a report that fails (no expert) says why and leaves no other settings' report up (the last one stayed)
    select_all = page.get_by_role("checkbox", name="Select all experts")
    select_all.uncheck()
    page.get_by_role("button", name="Whole-model report").click()
    page.get_by_text("no expert selected: pick at least one task expert to report on").first.wait_for()
    assert "Report of" not in page.inner_text("#report-status") and page.locator("#dl-report").is_disabled()
    select_all.check()
    page.wait_for_function(SHOWS_JS, arg=f"{run.method} ({run.settings}")


# The per-layer curves plot's SAR panel (its third row) and merged entropy as plotly holds them: {name: [y, ...]}.
CURVES_JS = """() => {
    const gd = document.querySelector('#curves-plot .js-plotly-plot');
    const out = {};
    for (const t of (gd && gd._fullData) || []) {
        if (t.yaxis === 'y3') out['sar ' + t.name] = Array.from(t.y, Number);
        if (t.name === 'merged') out['merged entropy'] = Array.from(t.y, Number);
    }
    return out;
}"""


def test_slow_per_layer_curves_follow_the_layers_plots(page, monkeypatch):
    """On large experts the per-layer curves take most of a diagnostics update after a structural change (every
    layer's merged delta decomposed again: 7 s on 8 ViT-B/32 experts, 16 s before), and the layer's three plots waited
    for them. Curves not ready within ``CURVES_WAIT_S`` now follow: the layer's plots are drawn first, the status
    line says the curves are in progress (and does not start with the merge, which the other steps wait for), the
    curves plot keeps the last ones until the new ones come, and then shows the library's for the settings."""
    import threading

    import app

    page.get_by_role("tab", name="Diagnostics").click()
    _select_method(page, "task_arithmetic")
    page.wait_for_function("() => document.querySelector('#diag-status').innerText.startsWith('task_arithmetic (')")
    before_top, before_curves = _merged_trace_top(page), page.evaluate(CURVES_JS)
    assert before_curves and all(before_curves.values())
    held, asked = threading.Event(), []
    real = app.STUDIO.curves

    def held_curves(req, **kw):   # the real curves, once the test has seen the page without them
        asked.append(req)
        assert held.wait(60)
        out = real(req, **kw)
        asked.append(out)
        return out

    monkeypatch.setattr(app, "CURVES_WAIT_S", 0.05)
    monkeypatch.setattr(app.STUDIO, "curves", held_curves)
    try:
        _select_method(page, "ties")
        page.wait_for_function("() => document.querySelector('#diag-status').innerText"
                               ".startsWith('Per-layer curves of ties (')")
        page.wait_for_function(f"prev => ({MERGED_TOP_JS})() !== prev", arg=before_top)   # the layer's: drawn
        assert page.evaluate(CURVES_JS) == before_curves                                  # the curves: the last
        assert "σ" not in _status(page)
        page.screenshot(path=str(SHOTS / "14_curves_in_progress.png"), full_page=True)
    finally:
        held.set()
    req = asked[0]
    assert req.method == "ties"
    page.wait_for_function(SHOWS_JS, arg=f"ties ({app.STUDIO.describe(req)}")
    want, drawn = asked[1], page.evaluate(CURVES_JS)
    assert want == app.STUDIO.diagnostics(req, app.STUDIO.default_layer(), "cosine").curves   # as one call's
    assert sorted(drawn) == sorted([f"sar {n}" for n in want["sar"]] + ["merged entropy"])
    for name, values in want["sar"].items():
        assert drawn[f"sar {name}"] == pytest.approx(values, rel=1e-6, nan_ok=True)
    assert drawn["merged entropy"] == pytest.approx(want["merged_entropy"], rel=1e-6, nan_ok=True)
    assert drawn != before_curves
    assert "merged σ₁ = " in _status(page) and " · updated in " in _status(page)
    # curves that fail say why, in the status line and their plot; the layer's plots stay drawn
    top = _merged_trace_top(page)

    def failing(req, **kw):
        raise RuntimeError("the curves' test failure")

    monkeypatch.setattr(app.STUDIO, "curves", failing)
    _select_method(page, "task_arithmetic")
    page.wait_for_function("() => document.querySelector('#diag-status').innerText"
                           ".includes('⚠️ per-layer curves failed: the curves\\' test failure')")
    assert _merged_trace_top(page) not in (None, top)   # task_arithmetic's layer, drawn
    assert page.evaluate(CURVES_JS) == {}
    monkeypatch.setattr(app.STUDIO, "curves", real)
    _select_method(page, "ties")
    page.wait_for_function(SHOWS_JS, arg=f"ties ({app.STUDIO.describe(req)}")
    assert page.evaluate(CURVES_JS) == drawn
