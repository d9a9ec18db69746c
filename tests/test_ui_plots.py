"""The app's plotly figures: stable task colours, log-safe spectra, fixed colour ranges, float32 payloads."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import pytest

from studio.ui import plots


def _as_array(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)


def test_task_colours_depend_on_the_name_only():
    order = ["digits", "signs", "scenes", "textures"]
    full = plots.TaskColors(order)
    assert len({full[t] for t in order}) == len(order)
    # Spectrum of a subset, in another order: each task keeps its colour.
    spectra = {"scenes": [3.0, 1.0], "digits": [2.0, 1.0]}
    fig = plots.spectrum_figure(spectra, None, full)
    assert {t.name: t.line.color for t in fig.data} == {"scenes": full["scenes"], "digits": full["digits"]}
    # Names outside the suite order still get a deterministic colour.
    assert plots.TaskColors(order)["unknown"] == plots.TaskColors([])["unknown"]


def test_spectrum_is_log_safe_float32_and_keeps_zoom():
    s = np.array([5.0, 2.0, 1e-9, 0.0, -1e-12])  # numerical zeros and a negative rounding error
    fig = plots.spectrum_figure({"a": s}, np.array([4.0, 0.0]), plots.TaskColors(["a"]), layer="w")
    assert fig.layout.yaxis.type == "log"
    assert fig.layout.uirevision == "spectrum" and fig.layout.height == plots.FIG_HEIGHT
    task, merged = fig.data
    assert task.y.dtype == np.float32 and merged.y.dtype == np.float32
    assert _as_array(task.y).tolist() == [5.0, 2.0] and _as_array(merged.y).tolist() == [4.0]
    assert merged.line.color == plots.MERGED_COLOR and merged.line.dash == "dash"
    # A second update with other numbers keeps the same uirevision (plotly keeps the user's zoom).
    again = plots.spectrum_figure({"a": s * 2}, None, plots.TaskColors(["a"]), layer="w")
    assert again.layout.uirevision == fig.layout.uirevision


def test_energy_curves_end_at_one():
    s = np.array([3.0, 2.0, 1.0], dtype=np.float32)
    e = np.cumsum(s**2) / np.sum(s**2)
    fig = plots.energy_figure({"a": e}, e, plots.TaskColors(["a"]))
    assert _as_array(fig.data[0].y)[-1] == pytest.approx(1.0)
    assert tuple(fig.layout.yaxis.range) == (0, 1.02)


@pytest.mark.parametrize("values", [[[1.0, -0.2], [-0.2, 1.0]], [[0.1, 0.05], [0.05, 0.1]]])
def test_signed_heatmap_range_is_fixed_and_symmetric(values):
    fig = plots.heatmap_figure(values, ["a", "b"], metric="cosine", value_range=(-1.0, 1.0), signed=True)
    hm = fig.data[0]
    assert (hm.zmin, hm.zmax) == (-1.0, 1.0)  # independent of the data: 0 is always the neutral colour
    assert hm.z.dtype == np.float32
    assert fig.layout.title.text == "Interference · cosine"
    scoped = plots.heatmap_figure(values, ["a", "b"], metric="cosine", value_range=(-1.0, 1.0), signed=True,
                                  scope="whole model, 3 matrix layers")   # on a line of its own: a long one was cut
    assert scoped.layout.title.text == "Interference · cosine<br><sup>whole model, 3 matrix layers</sup>"


def test_signed_heatmap_without_bounds_is_centred_and_rounded():
    fig = plots.heatmap_figure([[1.3, 0.9], [1.1, 0.6]], ["a", "b"], ["s1", "s2"], value_range=(None, None),
                               signed=True, center=1.0)
    hm = fig.data[0]
    assert hm.zmin + hm.zmax == pytest.approx(2.0)           # symmetric around the centre 1.0
    assert hm.zmax - 1.0 == plots.nice_ceil(0.4)             # max deviation 0.4 rounded up to 0.5
    assert list(hm.x) == ["s1", "s2"]


def test_unsigned_heatmap_uses_the_declared_range():
    fig = plots.heatmap_figure([[1.0, 0.2], [0.2, 1.0]], ["a", "b"], value_range=(0.0, 1.0), signed=False)
    assert (fig.data[0].zmin, fig.data[0].zmax) == (0.0, 1.0)


def test_nice_ceil_is_a_tight_upper_bound():
    for x in [1e-6, 0.003, 0.37, 1.0, 2.01, 7.5, 123.0]:
        y = plots.nice_ceil(x)
        assert x <= y <= 2.5 * x * (1 + 1e-9)


def test_layer_curves_mark_the_selected_layer_and_colour_by_task():
    colors = plots.TaskColors(["a", "b"])
    keys = ["visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.0.mlp.c_fc.weight"]
    fig = plots.layer_curves_figure(keys, [0.1, 0.2], {"a": [0.5, 0.6], "b": [0.4, 0.5]},
                                    {"a": [0.9, 0.8], "b": [0.7, 0.6]}, colors, merged_entropy=[0.3, 0.4],
                                    selected=keys[1])
    names = [t.name for t in fig.data]
    assert names == ["STI", "a", "b", "merged", "a", "b"]
    assert all(t.line.color == colors[t.name] for t in fig.data if t.name in ("a", "b"))
    assert [s.x0 for s in fig.layout.shapes] == [1, 1, 1]
    assert list(fig.data[1].customdata) == ["block 0 · attn.in_proj", "block 0 · mlp.c_fc"]
    assert "SAR_avg" not in fig.layout.annotations[2].text
    with_avg = plots.layer_curves_figure(keys, None, {"a": [0.5, 0.6]}, {"a": [0.9, 0.8]}, colors,
                                         sar_avg={"a": 0.85})
    assert with_avg.layout.annotations[2].text.endswith(" · SAR_avg 0.85")
    assert "SAR_avg 0.850" in with_avg.data[-1].hovertemplate


def test_accuracy_figures_show_percentages_and_skip_missing_values():
    table = {"a": {"merged": 80.0, "zero_shot": 40.0, "individual": 100.0, "normalized": 80.0},
             "b": {"merged": 30.0, "zero_shot": None, "individual": 60.0, "normalized": 50.0}}
    absolute, norm = plots.accuracy_figures(table)
    assert [t.name for t in absolute.data] == ["merged", "zero-shot", "individual"]
    assert _as_array(absolute.data[0].y).tolist() == [80.0, 30.0]
    zs = _as_array(norm.data[1].y)
    assert zs[0] == 40.0 and np.isnan(zs[1])
    assert absolute.layout.barmode == "group"


def test_alpha_curve_marks_the_best_alpha():
    fig = plots.alpha_curve_figure([0.1, 0.2, 0.3], [50.0, 70.0, 60.0], {"a": [40.0, 80.0, 70.0]},
                                   plots.TaskColors(["a"]), best=0.2)
    assert isinstance(fig, go.Figure)
    assert fig.data[-1].name == "preference-weighted"
    assert [s.x0 for s in fig.layout.shapes] == [0.2]


def test_empty_figure_carries_the_message():
    fig = plots.empty_figure("Select at least one expert")
    assert fig.layout.annotations[0].text == "Select at least one expert"


def test_a_heavy_tailed_signed_heatmap_goes_to_a_signed_log_scale():
    """SAI (sigma / c - 1) runs to thousands where a task's component c nears 0 (after TSV-M on MiniSuite: median
    |SAI| 81, largest 6e3), and the colour range followed the largest cell: the rest read as neutral, "no
    interference". The colours now follow a signed log scale over whole decades, nothing is clipped, the colour bar
    is labelled in SAI's own values, hover gives each value, and the title says so and counts the undefined cells."""
    rng = np.random.default_rng(0)
    z = rng.lognormal(np.log(80.0), 1.2, size=(8, 32)) * rng.choice([-1.0, 1.0], size=(8, 32))
    z[2, 5], z[6, 30], z[4, 31] = -6.1e3, 6.0e3, np.nan
    fig = plots.heatmap_figure(z, [f"t{i}" for i in range(8)], [f"σ{j + 1}" for j in range(32)],
                               value_range=(None, None), signed=True, center=0.0)
    hm = fig.data[0]
    shown = np.asarray(hm.z, dtype=np.float64)
    finite = np.isfinite(z)
    assert np.all(np.abs(shown[finite]) <= hm.zmax) and hm.zmax == -hm.zmin          # nothing clipped
    assert np.array_equal(np.sign(shown[finite]), np.sign(z[finite]))               # the sign is the colour's side
    order = np.argsort(z[finite])
    assert np.all(np.diff(shown[finite][order]) >= 0)                                # and the order is kept
    # the bulk spreads over the scale: half the cells reach beyond a fifth of it (on a linear one: 1 cell in 256)
    assert np.mean(np.abs(shown[finite]) > 0.2 * hm.zmax) > 0.5
    assert np.mean(np.abs(z[finite]) > 0.2 * plots.nice_ceil(np.nanmax(np.abs(z)))) < 0.05
    u = plots.nice_ceil(float(np.nanmedian(np.abs(z))) / 10)   # a tenth of the typical deviation, rounded
    labels = dict(zip(hm.colorbar.tickvals, hm.colorbar.ticktext))
    assert len(labels) >= 5
    for at, label in labels.items():   # each tick sits where its own value is drawn
        v = float(label)
        assert at == pytest.approx(np.sign(v) * np.log10(1 + abs(v) / u), abs=1e-9)
    assert np.array_equal(np.asarray(hm.customdata, dtype=np.float32)[finite], z.astype(np.float32)[finite])
    assert "customdata" in hm.hovertemplate
    assert "signed log scale" in fig.layout.title.text and "1 blank" in fig.layout.title.text
    # without a heavy tail the scale is linear over the largest deviation, as before, and the title has no note
    bulk = np.clip(rng.normal(0.0, 0.3, size=(8, 5)), -0.9, 0.9)
    fig = plots.heatmap_figure(bulk, [f"t{i}" for i in range(8)], list("vwxyz"), value_range=(None, None),
                               signed=True)
    assert fig.data[0].zmax == plots.nice_ceil(float(np.abs(bulk).max()))
    assert np.array_equal(np.asarray(fig.data[0].z), bulk.astype(np.float32))
    assert "<br>" not in fig.layout.title.text


def _contrast_on_white(colour: str) -> float:
    """WCAG's contrast ratio of ``#rrggbb`` against white."""
    channels = [int(colour.lstrip("#")[i:i + 2], 16) / 255 for i in (0, 2, 4)]
    lin = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 1.05 / (0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2] + 0.05)


def test_every_task_line_has_3_to_1_contrast_and_a_dash_pattern_of_its_own():
    """The task lines differed by colour alone (same width, no dash), and D3's orange and pink (2.5 and 2.7:1 on
    the white plot) fell below the 3:1 that graphics need. Each task now has a dash pattern too, kept by name as
    its colour is, in every line plot; the merged model keeps its black dashes."""
    assert all(_contrast_on_white(c) >= 3.0 for c in plots.PALETTE), [
        (c, round(_contrast_on_white(c), 2)) for c in plots.PALETTE if _contrast_on_white(c) < 3.0]
    order = ["digits", "signs", "scenes", "textures", "cars", "flowers", "pets", "planes"]
    colors = plots.TaskColors(order)
    assert len({(colors[t], colors.dash(t)) for t in order}) == len(order)
    assert len({colors.dash(t) for t in order[:len(plots.DASHES)]}) == len(plots.DASHES)
    assert "dash" not in plots.DASHES   # the merged model's
    # a subset, in another order, keeps each task's line
    subset = {"pets": [3.0, 1.0], "digits": [2.0, 1.0]}
    figs = [plots.spectrum_figure(subset, [1.0], colors), plots.energy_figure(subset, [1.0], colors),
            plots.alpha_curve_figure([0.1, 0.2], [50.0, 60.0], subset, colors),
            plots.layer_curves_figure(["l0", "l1"], None, subset, subset, colors)]
    for fig in figs:
        tasks = [t for t in fig.data if t.name in subset]
        assert len(tasks) >= 2
        assert all((t.line.color, t.line.dash) == (colors[t.name], colors.dash(t.name)) for t in tasks)
        assert all(t.opacity in (None, 1) for t in tasks)
    assert [t.line.dash for t in figs[0].data if t.name == "merged"] == ["dash"]
