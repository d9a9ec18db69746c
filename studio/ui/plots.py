"""Plotly figures of the Merge Studio app: pure functions from numbers to ``go.Figure``.

Conventions shared by every figure (they keep live updates readable):

* one colour and one dash pattern per task, derived from the task's *name* (:class:`TaskColors`), so a task keeps
  its line when the expert selection changes, and the lines differ by more than their colour (which not every reader
  tells apart); every colour has at least 3:1 contrast on the white plot; the merged model is always black, dashed;
* a constant ``uirevision`` per figure, so the user's zoom and hidden traces survive updates;
* an explicit ``height`` (Gradio's plot container otherwise collapses or jumps while updating);
* ``float32`` numpy data (plotly serialises it as compact typed arrays);
* log axes never receive zeros or negative values (numerically-zero singular values are dropped);
* signed heatmaps use a fixed symmetric colour range, so the colour of 0 never moves between updates.
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Sequence

import numpy as np
import plotly.colors
import plotly.graph_objects as go
from plotly.subplots import make_subplots

MERGED_COLOR = "#111111"
# D3's orange, pink, olive and cyan are 2.0-2.7:1 on white, below the 3:1 that graphics need: the same hues darker
_DARKER = {"#FF7F0E": "#C25E00", "#E377C2": "#B5479A", "#BCBD22": "#7C7D00", "#17BECF": "#0E7F8A"}
PALETTE: tuple[str, ...] = tuple(_DARKER.get(c, c) for c in plotly.colors.qualitative.D3
                                 + plotly.colors.qualitative.Dark24[10:])
#: The tasks' dash patterns, in turn with the colours (the merged model's thick black "dash" is none of them).
DASHES: tuple[str, ...] = ("solid", "dot", "longdash", "dashdot", "longdashdot", "8px,3px,2px,3px,2px,3px")
FIG_HEIGHT = 340
_MARGIN = dict(l=55, r=15, t=45, b=45)
# Singular values below this fraction of a matrix's largest one are numerical zeros: a log axis cannot show them.
REL_ZERO = 1e-7


class TaskColors:
    """A stable task-name -> colour (and dash pattern) map.

    Tasks listed in ``order`` (the suite's task order) get consecutive palette colours and dash patterns; any other
    name gets them from a hash of the name, so the same task always has the same line across updates and selections.

    Example:
        >>> colors = TaskColors(["mnist", "svhn"])
        >>> colors["mnist"] == PALETTE[0], colors["svhn"] == PALETTE[1]
        (True, True)
        >>> colors.dash("mnist"), colors.dash("svhn")
        ('solid', 'dot')
        >>> colors["other"] == TaskColors([])["other"], colors.line("other", 1.5) == TaskColors([]).line("other", 1.5)
        (True, True)
    """

    def __init__(self, order: Sequence[str] = ()):
        self._index = {name: i for i, name in enumerate(order)}

    def _idx(self, name: str) -> int:
        idx = self._index.get(name)
        return zlib.crc32(name.encode()) if idx is None else idx

    def __getitem__(self, name: str) -> str:
        return PALETTE[self._idx(name) % len(PALETTE)]

    def dash(self, name: str) -> str:
        return DASHES[self._idx(name) % len(DASHES)]

    def line(self, name: str, width: float) -> dict:
        """The task's line: its colour and dash pattern at ``width``."""
        return dict(color=self[name], dash=self.dash(name), width=width)

    def map(self, names: Sequence[str]) -> dict[str, str]:
        return {name: self[name] for name in names}


def _f32(values: "Sequence[float] | np.ndarray") -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    return arr


def positive_part(s: "Sequence[float] | np.ndarray", rel: float = REL_ZERO) -> np.ndarray:
    """Singular values that a log axis can show: those above ``rel * max`` (and above 0), as float32.

    Example:
        >>> positive_part([3.0, 1.0, 0.0]).tolist()
        [3.0, 1.0]
    """
    arr = _f32(s)
    if arr.size == 0:
        return arr
    top = float(np.max(np.abs(arr)))
    keep = arr > max(top * rel, np.finfo(np.float32).tiny)
    return arr[keep]


def _layout(fig: go.Figure, title: str, revision: str, height: int, **kwargs) -> go.Figure:
    fig.update_layout(
        title=dict(text=title, font=dict(size=14)), height=height, uirevision=revision, margin=_MARGIN,
        template="plotly_white", legend=dict(font=dict(size=11)), **kwargs,
    )
    return fig


def empty_figure(message: str, height: int = FIG_HEIGHT, revision: str = "empty") -> go.Figure:
    """A blank figure carrying a centred message (used when there is nothing to show yet)."""
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#666"))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _layout(fig, "", revision, height)


def spectrum_figure(spectra: Mapping[str, "Sequence[float] | np.ndarray"],
                    merged: "Sequence[float] | np.ndarray | None", colors: TaskColors, *, layer: str = "",
                    height: int = FIG_HEIGHT) -> go.Figure:
    """Singular-value spectra of each task matrix and of the merged delta, log y axis.

    Args:
        spectra: task name -> singular values of its task matrix at this layer (any order, sorted here).
        merged: singular values of the merged delta (``W_merged - W_base``) at this layer, or ``None``.
        colors: the task colour map.
        layer: the layer key, shown in the title.

    Example:
        >>> fig = spectrum_figure({"a": [2.0, 1.0, 0.0]}, [1.5, 0.5], TaskColors(["a"]))
        >>> [t.name for t in fig.data], fig.data[0].y.tolist()
        (['a', 'merged'], [2.0, 1.0])
    """
    fig = go.Figure()
    for name, s in spectra.items():
        y = np.sort(positive_part(s))[::-1]
        fig.add_trace(go.Scatter(x=np.arange(1, y.size + 1, dtype=np.float32), y=y, name=name, mode="lines",
                                 line=colors.line(name, 1.6)))
    if merged is not None:
        y = np.sort(positive_part(merged))[::-1]
        fig.add_trace(go.Scatter(x=np.arange(1, y.size + 1, dtype=np.float32), y=y, name="merged", mode="lines",
                                 line=dict(color=MERGED_COLOR, width=2.6, dash="dash")))
    fig.update_yaxes(type="log", title_text="singular value", dtick=1, exponentformat="power")
    fig.update_xaxes(title_text="index i")
    return _layout(fig, f"Singular values · {_short_key(layer)}" if layer else "Singular values", "spectrum", height)


def energy_figure(energies: Mapping[str, "Sequence[float] | np.ndarray"], merged: "Sequence[float] | np.ndarray | None",
                  colors: TaskColors, *, layer: str = "", height: int = FIG_HEIGHT) -> go.Figure:
    """Cumulative spectral energy ``sum_{j<=k} s_j^2 / sum_j s_j^2`` per task and for the merged delta.

    Example:
        >>> fig = energy_figure({"a": [0.8, 1.0]}, None, TaskColors(["a"]))
        >>> fig.data[0].y.tolist()
        [0.800000011920929, 1.0]
    """
    fig = go.Figure()
    for name, e in energies.items():
        y = _f32(e)
        fig.add_trace(go.Scatter(x=np.arange(1, y.size + 1, dtype=np.float32), y=y, name=name, mode="lines",
                                 line=colors.line(name, 1.6)))
    if merged is not None:
        y = _f32(merged)
        fig.add_trace(go.Scatter(x=np.arange(1, y.size + 1, dtype=np.float32), y=y, name="merged", mode="lines",
                                 line=dict(color=MERGED_COLOR, width=2.6, dash="dash")))
    fig.update_yaxes(range=[0, 1.02], title_text="cumulative energy")
    fig.update_xaxes(title_text="rank k", type="log", dtick=1)
    return _layout(fig, f"Cumulative energy · {_short_key(layer)}" if layer else "Cumulative energy", "energy", height)


def nice_ceil(x: float) -> float:
    """Smallest of 1, 2, 2.5, 5 times a power of ten that is >= ``x`` (stable colour limits for unbounded metrics).

    Example:
        >>> nice_ceil(0.37), nice_ceil(3.2), nice_ceil(0.0)
        (0.5, 5.0, 1.0)
    """
    if not math.isfinite(x) or x <= 0:
        return 1.0
    exp = math.floor(math.log10(x))
    for mult in (1.0, 2.0, 2.5, 5.0, 10.0):
        v = mult * 10.0**exp
        if v >= x * (1 - 1e-9):
            return float(round(v, 12))
    return float(10.0 ** (exp + 1))


#: A signed heatmap without declared bounds goes to a signed log scale where its largest deviation is more than this
#: many times the 95th percentile (a few cells far out would leave the rest one neutral colour on a linear scale).
OUTLIER_FACTOR = 4.0


def heatmap_figure(matrix: "np.ndarray | Sequence[Sequence[float]]", rows: Sequence[str],
                   cols: Sequence[str] | None = None, *, metric: str = "",
                   value_range: "tuple[float | None, float | None] | None" = None, signed: bool = False,
                   center: float | None = None, description: str = "", scope: str = "",
                   height: int = FIG_HEIGHT + 40) -> go.Figure:
    """Task-by-task (or task-by-subspace) interference heatmap with a fixed colour range; ``scope`` (e.g. "whole
    model, 18 matrix layers") opens the title's second line.

    ``signed`` metrics (cosine, SVC coefficients, cross-influence) get a diverging scale symmetric around
    ``center`` (default 0): ``[c - m, c + m]`` with ``m`` the largest distance of the declared range from ``c``, so
    the neutral colour always means "no interference". When the metric declares no finite bound, ``m`` is the
    data's largest deviation rounded up to 1, 2, 2.5 or 5 x 10^k (:func:`nice_ceil`), so small changes do not
    rescale the colours. Where that largest deviation is more than :data:`OUTLIER_FACTOR` times the 95th percentile
    (SAI's ``sigma / c - 1`` runs to thousands as a task's ``c`` nears 0), the colours follow a signed log scale
    instead, ``c + sign(d) log10(1 + |d| / u)`` of the deviation ``d`` with ``u`` a tenth of the median deviation
    rounded as above, over whole decades, with the colour bar labelled in the metric's own values; hover and the
    cell labels always give the values themselves, and the title says the scale is logarithmic. Unsigned metrics get a
    sequential scale over their range. Cells without a value (NaN: not defined there) are blank, and the title
    counts them.

    Example:
        >>> fig = heatmap_figure([[1.0, -0.5], [-0.5, 1.0]], ["a", "b"], metric="cosine", value_range=(-1, 1),
        ...                      signed=True)
        >>> fig.data[0].zmin, fig.data[0].zmax
        (-1.0, 1.0)
        >>> fig = heatmap_figure([[1.3, 0.8]], ["a"], ["s1", "s2"], value_range=(None, None), signed=True, center=1.0)
        >>> fig.data[0].zmin, fig.data[0].zmax
        (0.5, 1.5)
        >>> z = [[0.3, -0.2, 0.1, 0.4] * 5, [0.2, -0.1, 0.3, float("nan")] * 4 + [0.1, 0.2, 0.1, -6000.0]]
        >>> fig = heatmap_figure(z, ["a", "b"], [f"s{i}" for i in range(20)], value_range=(None, None), signed=True)
        >>> fig.data[0].zmin, fig.data[0].zmax, fig.data[0].colorbar.ticktext[:3]
        (-6.0, 6.0, ('-2500', '-250', '-25'))
        >>> fig.layout.title.text.split("<br>")[1]
        '<sup>colours on a signed log scale (hover for values) · 4 blank: not defined there</sup>'
    """
    z = np.asarray(matrix, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D matrix, got shape {z.shape}")
    cols = list(rows) if cols is None else list(cols)
    finite = z[np.isfinite(z)]
    lo, hi = value_range if value_range is not None else (None, None)
    lo = float(lo) if lo is not None and math.isfinite(lo) else None
    hi = float(hi) if hi is not None and math.isfinite(hi) else None
    colours, colorbar, notes = z, dict(thickness=12), []
    if signed:
        c = 0.0 if center is None else float(center)
        if lo is not None and hi is not None:
            m = max(abs(lo - c), abs(hi - c))
        else:
            dev = np.abs(finite - c)
            m = nice_ceil(float(dev.max())) if finite.size else 1.0
            if finite.size and float(dev.max()) > OUTLIER_FACTOR * float(np.quantile(dev, 0.95)) > 0:
                u = nice_ceil(float(np.median(dev)) / 10)   # the typical cell a decade into the log part
                m = float(math.ceil(math.log10(1.0 + float(dev.max()) / u)))
                d = (z - c).astype(np.float64)
                colours = (c + np.sign(d) * np.log10(1.0 + np.abs(d) / u)).astype(np.float32)
                # ticks a decade apart, from u (its ±u crowd the centre's label from 3 decades up)
                steps = [u * 10**k for k in range(1 if m >= 3 else 0, int(m)) if math.log10(1.0 + 10**k) <= m]
                at = [math.log10(1.0 + v / u) for v in steps]
                colorbar.update(tickvals=[c - a for a in reversed(at)] + [c] + [c + a for a in at],
                                ticktext=[f"{c - v:.4g}" for v in reversed(steps)] + [f"{c:.4g}"]
                                + [f"{c + v:.4g}" for v in steps])
                notes.append("colours on a signed log scale (hover for values)")
        zmin, zmax, scale = c - m, c + m, "RdBu_r"
    else:
        zmin = lo if lo is not None else (float(finite.min()) if finite.size else 0.0)
        zmax = hi if hi is not None else (nice_ceil(float(finite.max())) if finite.size and finite.max() > 0 else 1.0)
        if zmax <= zmin:
            zmax = zmin + 1.0
        scale = "Viridis"
    many = z.shape[1] > 12
    text = None if many else [[("" if not np.isfinite(v) else f"{v:.2f}") for v in row] for row in z]
    fig = go.Figure(go.Heatmap(z=colours, customdata=z, x=list(cols), y=list(rows), zmin=float(zmin), zmax=float(zmax),
                               colorscale=scale, text=text, texttemplate=None if many else "%{text}",
                               textfont=dict(size=11), hovertemplate="%{y} × %{x}: %{customdata:.4g}<extra></extra>",
                               colorbar=colorbar))
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(type="category")
    title = f"Interference · {metric}" if metric else "Interference"
    if scope:
        notes.insert(0, scope)
    blank = int(z.size - finite.size)
    if blank:
        notes.append(f"{blank} blank: not defined there")
    if notes:
        title += "<br><sup>" + " · ".join(notes) + "</sup>"
    fig = _layout(fig, title, "heatmap", height)
    if description:
        fig.add_annotation(text=_wrap(description, 75), showarrow=False, x=0, y=-0.2, xref="paper", yref="paper",
                           xanchor="left", yanchor="top", align="left", font=dict(size=10, color="#555"))
        fig.update_layout(margin=dict(_MARGIN, b=95))
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "<br>".join(textwrap.wrap(text, width))


def layer_curves_figure(layers: Sequence[str], sti: "Sequence[float] | None", entropy: Mapping[str, Sequence[float]],
                        sar: Mapping[str, Sequence[float]], colors: TaskColors, *,
                        merged_entropy: "Sequence[float] | None" = None, selected: str | None = None,
                        sar_reference: str = "merge",
                        sar_avg: "Mapping[str, float] | None" = None, height: int = 600) -> go.Figure:
    """Per-layer curves in three stacked panels: STI, spectral entropy (per task and merged), SAR to the merge.

    Args:
        layers: the matrix layer keys (x axis, in state-dict order; shown by index, full key on hover).
        sti: singular task interference per layer (one value per layer), or ``None``.
        entropy: task name -> (normalised) spectral entropy of its task matrix per layer.
        sar: task name -> subspace alignment ratio of that task to the merged delta, per layer.
        merged_entropy: spectral entropy of the merged delta per layer.
        selected: the layer currently shown in the other plots (marked with a vertical line).
        sar_reference: what SAR is measured against (for the panel title).
        sar_avg: task name -> SAR averaged over the layers (Iso's SAR_avg); its range goes in the panel title and
            each task's value in its hover text.

    Example:
        >>> fig = layer_curves_figure(["l0", "l1"], [0.1, 0.2], {"a": [1.0, 2.0]}, {"a": [0.5, 0.6]}, TaskColors(["a"]))
        >>> len(fig.data)
        3
    """
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        subplot_titles=("STI: singular task interference of all tasks (TSV eq. 7)",
                                        "spectral entropy / log r (tasks; merged dashed)",
                                        f"SAR of each task to the {sar_reference} (Iso eq. 5)"
                                        + _sar_avg_title(sar_avg)))
    x = np.arange(len(layers), dtype=np.float32)
    short = [_short_key(k) for k in layers]
    hover = "%{customdata}<br>%{y:.4f}<extra>%{fullData.name}</extra>"
    if sti is not None:
        fig.add_trace(go.Scatter(x=x, y=_f32(sti), customdata=short, name="STI", mode="lines+markers",
                                 line=dict(color=MERGED_COLOR, width=1.6), marker=dict(size=4), hovertemplate=hover,
                                 showlegend=False), row=1, col=1)
    for name, values in entropy.items():
        fig.add_trace(go.Scatter(x=x, y=_f32(values), customdata=short, name=name, legendgroup=name,
                                 mode="lines", line=colors.line(name, 1.3), hovertemplate=hover),
                      row=2, col=1)
    if merged_entropy is not None:
        fig.add_trace(go.Scatter(x=x, y=_f32(merged_entropy), customdata=short, name="merged", legendgroup="merged",
                                 mode="lines", line=dict(color=MERGED_COLOR, width=2.4, dash="dash"),
                                 hovertemplate=hover),
                      row=2, col=1)
    for name, values in sar.items():
        avg = (sar_avg or {}).get(name)
        sar_hover = hover if avg is None else hover.replace("<extra>", f"<br>SAR_avg {avg:.3f}<extra>")
        fig.add_trace(go.Scatter(x=x, y=_f32(values), customdata=short, name=name, legendgroup=name,
                                 showlegend=name not in entropy, mode="lines",
                                 line=colors.line(name, 1.3), hovertemplate=sar_hover), row=3, col=1)
    if selected is not None and selected in layers:
        idx = list(layers).index(selected)
        for row in (1, 2, 3):
            fig.add_vline(x=idx, line=dict(color="#999", dash="dot", width=1), row=row, col=1)
    fig.update_yaxes(range=[0, 1.05], row=3, col=1)
    fig.update_xaxes(range=[-0.5, max(len(layers) - 0.5, 0.5)], tick0=0, dtick=1 if len(layers) <= 12 else None)
    fig.update_xaxes(title_text="matrix layer (state-dict order; hover for the key)", row=3, col=1)
    fig.update_annotations(font=dict(size=12))
    return _layout(fig, "", "layer-curves", height)


def _sar_avg_title(sar_avg: "Mapping[str, float] | None") -> str:
    """`` · SAR_avg 0.76-0.85`` (the tasks' range of Iso's SAR_avg), or nothing without finite values.

    Example:
        >>> _sar_avg_title({"a": 0.8512, "b": 0.7634}), _sar_avg_title({"a": 0.9}), _sar_avg_title(None)
        (' · SAR_avg 0.76-0.85', ' · SAR_avg 0.90', '')
    """
    vals = sorted(v for v in (sar_avg or {}).values() if np.isfinite(v))
    if not vals:
        return ""
    lo, hi = f"{vals[0]:.2f}", f"{vals[-1]:.2f}"
    return f" · SAR_avg {lo}" + ("" if lo == hi else f"-{hi}")


def _short_key(key: str) -> str:
    """``visual.transformer.resblocks.3.mlp.c_fc.weight`` -> ``block 3 · mlp.c_fc``."""
    import re

    m = re.search(r"resblocks\.(\d+)\.(.*?)(?:\.weight|_weight)?$", key)
    if m:
        return f"block {m.group(1)} · {m.group(2)}"
    return key.removeprefix("visual.")


def accuracy_figure(tasks: Sequence[str], series: Mapping[str, Sequence[float | None]], *, normalized: bool = False,
                    height: int = FIG_HEIGHT) -> go.Figure:
    """Grouped bars of per-task accuracy in % for several models (e.g. merged / zero-shot / individual).

    Example:
        >>> fig = accuracy_figure(["a"], {"merged": [50.0], "individual": [None]})
        >>> [t.name for t in fig.data], fig.data[0].y.tolist()
        (['merged', 'individual'], [50.0])
    """
    styles = {"merged": MERGED_COLOR, "zero-shot": "#A0A0A0", "individual": "#4C78A8"}
    fig = go.Figure()
    for i, (name, values) in enumerate(series.items()):
        y = _f32([float(v) if v is not None and math.isfinite(v) else np.nan for v in values])
        fig.add_trace(go.Bar(x=list(tasks), y=y, name=name, marker_color=styles.get(name, PALETTE[i % len(PALETTE)]),
                             hovertemplate="%{x}: %{y:.1f}%<extra>" + name + "</extra>"))
    title = "Normalized accuracy (% of the individual expert)" if normalized else "Test accuracy per task"
    fig.update_yaxes(title_text="%", rangemode="tozero")
    return _layout(fig, title, "accuracy-norm" if normalized else "accuracy", height, barmode="group")


def accuracy_figures(table: Mapping[str, Mapping[str, float | None]]) -> tuple[go.Figure, go.Figure]:
    """Absolute (merged / zero-shot / individual) and normalized (merged and zero-shot over individual) bar charts
    from a :meth:`studio.ui.backend.Studio.accuracy_table` (values in %).

    Example:
        >>> t = {"a": {"merged": 80.0, "zero_shot": 40.0, "individual": 100.0, "normalized": 80.0}}
        >>> absolute, norm = accuracy_figures(t)
        >>> norm.data[1].y.tolist()
        [40.0]
    """
    tasks = list(table)

    def ratio(a: float | None, b: float | None) -> float | None:
        return 100.0 * a / b if a is not None and b else None

    absolute = accuracy_figure(tasks, {
        "merged": [table[t]["merged"] for t in tasks],
        "zero-shot": [table[t]["zero_shot"] for t in tasks],
        "individual": [table[t]["individual"] for t in tasks]})
    norm = accuracy_figure(tasks, {
        "merged": [table[t]["normalized"] for t in tasks],
        "zero-shot": [ratio(table[t]["zero_shot"], table[t]["individual"]) for t in tasks]}, normalized=True)
    return absolute, norm


def alpha_curve_figure(alphas: Sequence[float], objective: Sequence[float], per_task: Mapping[str, Sequence[float]],
                       colors: TaskColors, *, best: float | None = None, height: int = FIG_HEIGHT) -> go.Figure:
    """Validation (normalized) accuracy in % versus the global scale alpha: the preference-weighted objective and
    each task.

    Example:
        >>> fig = alpha_curve_figure([0.1, 0.2], [0.5, 0.6], {"a": [0.4, 0.7]}, TaskColors(["a"]), best=0.2)
        >>> [t.name for t in fig.data]
        ['a', 'preference-weighted']
    """
    fig = go.Figure()
    x = _f32(alphas)
    for name, values in per_task.items():
        fig.add_trace(go.Scatter(x=x, y=_f32(values), name=name, mode="lines",
                                 line=colors.line(name, 1.2)))   # opaque: at 0.7, no colour kept 3:1
    fig.add_trace(go.Scatter(x=x, y=_f32(objective), name="preference-weighted", mode="lines+markers",
                             line=dict(color=MERGED_COLOR, width=3)))
    if best is not None:
        fig.add_vline(x=float(best), line=dict(color="#D62728", dash="dash"),
                      annotation_text=f"best α = {best:g}", annotation_position="top")
    fig.update_xaxes(title_text="alpha")
    fig.update_yaxes(title_text="normalized accuracy (%)")
    return _layout(fig, "Normalized validation accuracy vs alpha", "alpha-curve", height)
