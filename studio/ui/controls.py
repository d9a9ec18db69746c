"""From a method's hyperparameter schema to UI controls, and from UI values back to validated hyperparameters.

The schema (:class:`studio.schema.Param`, exposed as dicts by :func:`studio.list_methods`) is the single source of
truth: this module only decides how each declared param is *shown* (slider range and step, dropdown, checkbox,
an "auto" checkbox for automatic defaults) and converts what the user set back into the dict the engine validates.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import operator
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..schema import StudioError


@dataclass(frozen=True)
class ControlSpec:
    """How one hyperparameter is displayed.

    ``kind`` is ``"slider"``, ``"dropdown"`` or ``"checkbox"``. ``auto_label`` is set for params whose default is
    automatic (``default=None``): the UI shows an "auto (rule)" checkbox next to the slider, and ``value`` is then
    only the slider's starting point. ``info`` is the schema's help (shown under the control), ``source`` where its
    default comes from (the schema's ``paper``; the app lists them together, folded, below the controls).
    """

    name: str
    kind: str
    label: str
    value: Any
    info: str = ""
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    choices: tuple[Any, ...] | None = None
    auto_label: str | None = None
    post_scale: bool = False
    source: str = ""


def _slider_range(p: Mapping[str, Any]) -> tuple[float, float]:
    """A finite slider range for a numeric param (the schema may leave a side unbounded)."""
    low, high, default = p.get("low"), p.get("high"), p.get("default")
    ref = abs(float(default)) if isinstance(default, (int, float)) and not isinstance(default, bool) else 1.0
    if low is not None and math.isfinite(low):
        lo = float(low)
    else:
        lo = -max(10 * ref, 1.0) if high is not None and high <= 0 else 0.0
    hi = float(high) if high is not None and math.isfinite(high) else max(lo + 1.0, 10.0 * max(ref, 1.0), lo + 10 * ref)
    return lo, hi


def _slider_step(p: Mapping[str, Any], lo: float, hi: float) -> float:
    if p.get("ui_step"):
        return float(p["ui_step"])
    if p["type"] == "int":
        return 1.0
    span = hi - lo
    # ~100-200 positions over the range, rounded to 1, 2 or 5 times a power of ten.
    raw = span / 150.0
    exp = math.floor(math.log10(raw)) if raw > 0 else -2
    for mult in (1, 2, 5, 10):
        if mult * 10**exp >= raw:
            return float(mult * 10**exp)
    return float(10 ** (exp + 1))


def control_specs(schema: Mapping[str, Any], *, num_tasks: int | None = None, largest_rank: int | None = None,
                  base_method: str | None = None) -> list[ControlSpec]:
    """Control descriptions for every param of a method or calibration (a :func:`studio.list_methods` entry), for
    ``num_tasks`` experts (a ``high_rule``'s and an "auto" formula's ``T``) of a model whose largest matrix layer the
    method selects has rank ``largest_rank`` (a ``low_rule``'s ``R``; :meth:`studio.ui.backend.Studio.largest_rank`);
    a calibration's after the merging method ``base_method`` (its ``auto_after``).

    Example:
        >>> spec = {"params": [{"name": "alpha", "type": "float", "default": 0.3, "auto": None, "low": 0.0,
        ...         "high": 5.0, "choices": None, "help": "scale", "paper": "", "post_scale": True}]}
        >>> c = control_specs(spec)[0]
        >>> (c.kind, c.minimum, c.maximum, c.value, c.post_scale)
        ('slider', 0.0, 5.0, 0.3, True)
    """
    out = []
    for p in schema.get("params", []):
        info, source = (p.get("help") or "", p.get("paper") or "") if p.get("help") else (p.get("paper") or "", "")
        if p["type"] == "bool":
            out.append(ControlSpec(p["name"], "checkbox", p["name"], bool(p.get("default")), info, source=source))
            continue
        if p["type"] == "str" or p.get("choices"):
            choices = tuple(p.get("choices") or ())
            value = p.get("default") if p.get("default") is not None else (choices[0] if choices else None)
            out.append(ControlSpec(p["name"], "dropdown", p["name"], value, info, choices=choices, source=source))
            continue
        lo, hi = _slider_range(p)
        step = _slider_step(p, lo, hi)
        ruled = auto_rule_value(p["high_rule"], num_tasks) if p.get("high_rule") and num_tasks else None
        if ruled is not None and lo < ruled < hi:   # the largest value every layer accepts for T tasks (TSV-M's 1/T)
            hi = ruled
        if p.get("ui_high") is not None and lo < p["ui_high"] < hi:   # a joint limit (Breadcrumbs' beta + gamma < 1)
            hi = float(p["ui_high"])
        if p.get("low_open") and p.get("low") is not None:
            lo = min(lo + step, hi)   # the slider's first position must be an allowed value
        floor = auto_rule_value(p["low_rule"], num_tasks or 1, largest_rank) if p.get("low_rule") and largest_rank \
            else None
        # the first step at or above it (TSV-M: a component kept somewhere); where it is the top (TSV-M with as many
        # experts as the largest rank, R = T: 1/T alone is accepted), the slider ends there (it offered 0.005 to
        # 0.33 for T = R = 3, each position refused; an edge audit)
        if floor is not None and lo < floor <= hi:
            lo = min(_on_grid(floor, step, up=True), hi)
            if floor < lo == hi:   # no step between (TSV-M at T = 20, R = 21): the floor, at 4 significant digits
                lo = min(_up_to_digits(floor, 4), hi)
        if p["type"] != "int":   # both ends on the step's grid, which the browser's positions follow (lo + n step)
            on_lo, on_hi = _on_grid(lo, step, up=True), _on_grid(hi, step, up=False)
            if on_lo < on_hi:   # SVC's alpha in [1e-4, 1]: 0.0051, ... 0.9951 before, and never 1
                lo, hi = on_lo, on_hi
        if not lo < hi:   # one value (TSV-M at R = T): Gradio's slider needs two ends, so it starts a step below
            lo = hi - step
        default = p.get("default")
        auto_label = None
        if default is None:
            after = dict(p.get("auto_after") or {})
            auto_label = f"auto ({auto_rule_shown(p.get('auto') or 'automatic', after, base_method)})"
            default = auto_value(p, num_tasks, base_method)
            if default is None:   # no formula: the slider starts mid-range (an integer's at its low end)
                default = lo if p["type"] == "int" else (lo + hi) / 2
        value = min(max(float(default), lo), hi)
        if p["type"] == "int":
            value = int(round(value))
        out.append(ControlSpec(p["name"], "slider", p["name"], value, info, lo, hi, step, auto_label=auto_label,
                               post_scale=bool(p.get("post_scale")), source=source))
    return out


def auto_rule_shown(rule: str, after: Mapping[str, float], base_method: str | None) -> str:
    """The part of an "auto" rule that holds after ``base_method``: a rule with exceptions for some base methods
    (``after``, a param's ``auto_after``; written in the rule as ``"1/T (1.0 after tsv_m)"``) shows the exception
    that applies, or the rule without its exceptions.

    Example:
        >>> after = {"tsv_m": 1.0}
        >>> rule = "1/T (1.0 after tsv_m)"
        >>> auto_rule_shown(rule, after, "tsv_m"), auto_rule_shown(rule, after, "ties")
        ('1.0 after tsv_m', '1/T')
        >>> auto_rule_shown("1/T (1.0 after tsv_m)", after, None), auto_rule_shown("|T|/4", {}, "ties")
        ('1/T (1.0 after tsv_m)', '|T|/4')
    """
    if base_method is None or not after:
        return rule
    if base_method in after:
        return f"{float(after[base_method])!r} after {base_method}"
    return re.sub(r"\s*\([^()]*\bafter\b[^()]*\)\s*$", "", rule) or rule


def _up_to_digits(x: float, digits: int) -> float:
    """``x > 0`` rounded up at ``digits`` significant digits.

    Example:
        >>> _up_to_digits(1 / 21, 4), _up_to_digits(0.05, 4)
        (0.04762, 0.05)
    """
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    return math.ceil(round(x * scale, 9)) / scale


def _on_grid(x: float, step: float, *, up: bool) -> float:
    """The multiple of ``step`` at or above (``up``) or at or below ``x``, rounded off float noise (``x`` already on
    the grid stays).

    Example:
        >>> _on_grid(0.0001, 0.005, up=True), _on_grid(1 / 3, 0.005, up=False), _on_grid(0.3, 0.05, up=True)
        (0.005, 0.33, 0.3)
    """
    n = round(x / step, 9)
    return round((math.ceil(n) if up else math.floor(n)) * step, 12)


def auto_value(p: Mapping[str, Any], num_tasks: int | None, base_method: str | None = None) -> float | None:
    """The value an automatic param (a schema entry whose ``default`` is None) takes for ``num_tasks`` experts: its
    ``auto_after`` value after the merging method ``base_method`` (SVC's 1.0 after TSV-M), else its documented rule
    evaluated at ``T`` where that is a formula (``"1/T"``, ``"|T|/4"``; :func:`auto_rule_value`). What the method
    resolves ``None`` to: where the slider starts, and what the leaderboard shows. None where the rule is no formula
    or ``num_tasks`` is unknown.

    Example:
        >>> svc = {"name": "alpha", "auto": "1/T (1.0 after tsv_m)", "auto_after": {"tsv_m": 1.0}}
        >>> auto_value(svc, 4), auto_value(svc, 4, "tsv_m"), auto_value({"auto": "see the paper"}, 4)
        (0.25, 1.0, None)
    """
    after = dict(p.get("auto_after") or {})
    if base_method in after:
        return float(after[base_method])
    return auto_rule_value(p.get("auto") or "", num_tasks) if num_tasks else None


def auto_rule_value(rule: str, num_tasks: int, largest_rank: int | None = None) -> float | None:
    """Evaluate the leading arithmetic formula of an ``auto`` description (or a ``high_rule`` / ``low_rule``) at
    ``T = num_tasks`` and ``R = largest_rank`` (None if there is no formula, or it names ``R`` and none is given).

    Only numbers, ``T`` (or ``|T|``), ``R`` and ``+ - * /`` are accepted: the text is parsed with :mod:`ast`, never
    ``eval``-ed.

    Example:
        >>> auto_rule_value("1/T (1.0 after tsv_m)", 8), auto_rule_value("|T|/4", 8), auto_rule_value("see paper", 8)
        (0.125, 2.0, None)
        >>> auto_rule_value("1/R", 8, 128), auto_rule_value("1/R", 8)
        (0.0078125, None)
    """
    head = re.match(r"\s*([0-9TR|.+\-*/ ]+)", rule)
    if not head:
        return None
    tree = _rule_tree(head.group(1).replace("|T|", "T").strip())
    if tree is None:
        return None
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            return ops[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "T":
            return float(num_tasks)
        if isinstance(node, ast.Name) and node.id == "R" and largest_rank is not None:
            return float(largest_rank)
        raise ValueError("unsupported")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError):
        return None
    return value if math.isfinite(value) else None


_RULE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=256)
def _rule_tree(text: str) -> "ast.Expression | None":
    """The parsed formula of a rule text (None if it is not Python syntax): parsed once per text, under a lock.
    CPython 3.11's ``ast.parse`` keeps its recursion depth in state shared by the interpreter's threads and can raise
    ``SystemError: AST constructor recursion depth mismatch`` when two threads parse at once (CPython gh-106905); the
    page renders the method's and the calibration's controls on two worker threads, and a CI run of the browser tests
    lost a render to it."""
    with _RULE_LOCK:
        try:
            return ast.parse(text, mode="eval")
        except SyntaxError:
            return None


def defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema's default values (``None`` for automatic params): what a fresh UI submits.

    Example:
        >>> defaults({"params": [{"name": "k", "type": "float", "default": None}]})
        {'k': None}
    """
    return {p["name"]: p.get("default") for p in schema.get("params", [])}


def collect(specs: Sequence[ControlSpec], values: Sequence[Any],
            previous: "Mapping[str, Any] | None" = None) -> dict[str, Any]:
    """Turn the flat list of UI values back into hyperparameters.

    ``values`` holds one value per control, plus, right after each control with an ``auto_label``, the state of
    its "auto" checkbox (``True`` -> the param is sent as ``None``: automatic). An integer slider's value is the one
    its range shows (:func:`shown_value`), not a number typed into its box. A number beyond a slider's range is kept:
    the range for the selection at hand is the server's to apply (:meth:`studio.ui.backend.Studio.fitted`), as the
    box shows it once it loses focus. A slider whose box holds no number (emptied, or text typed into it: the page
    sends null) keeps its value in ``previous`` (the values stored before), else its starting value: stored as null,
    the merge refused it ("must not be None") while the box showed 0.

    Example:
        >>> specs = [ControlSpec("k", "slider", "k", 0.5, auto_label="auto (1/T)"),
        ...          ControlSpec("a", "slider", "a", 1.0), ControlSpec("n", "slider", "n", 5, step=1)]
        >>> collect(specs, [0.5, True, 2.0, 2.5])
        {'k': None, 'a': 2.0, 'n': 3}
        >>> collect(specs, [None, False, None, float("nan")], {"a": 0.7})
        {'k': 0.5, 'a': 0.7, 'n': 5}
    """
    out: dict[str, Any] = {}
    it = iter(values)
    for spec in specs:
        value = next(it)
        if spec.auto_label is not None and next(it):
            value = None
        elif spec.kind == "slider" and spec.value is not None and _no_number(value):
            kept = (previous or {}).get(spec.name)
            value = spec.value if kept is None else kept
        else:
            value = shown_value(spec, value)
        out[spec.name] = value
    return out


def _no_number(value: Any) -> bool:
    """Whether a slider's value is no number at all: null, empty or NaN (what an emptied box sends)."""
    return value is None or (isinstance(value, str) and not value) or (isinstance(value, float) and math.isnan(value))


def shown_value(spec: ControlSpec, value: Any) -> Any:
    """The value an integer slider's range shows for ``value`` (a number typed into its box): the nearest integer, a
    half up, as the browser rounds a range input's value to its step (6.5 shows 7, -3.5 shows -3); anything else as
    it is.

    Example:
        >>> n = ControlSpec("n", "slider", "n", 5, minimum=1, maximum=512, step=1)
        >>> shown_value(n, 6.5), shown_value(n, -3.5), shown_value(n, 600), shown_value(n, "x")
        (7, -3, 600, 'x')
    """
    if (spec.kind == "slider" and _is_int(spec.value) and isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)):
        return math.floor(value + 0.5)
    return value


def _no_number_js(v: str) -> str:
    """:func:`_no_number` as a browser expression of the variable ``v``."""
    return f"""({v} === null || {v} === undefined || {v} === "" || (typeof {v} === "number" && Number.isNaN({v})))"""


#: :func:`shown_value` as a browser function ``(v, integer) => shown``.
_SHOWN_JS = """(v, integer) => integer && typeof v === "number" && Number.isFinite(v) ? Math.floor(v + 0.5) : v"""


def _js_layout(specs: Sequence[ControlSpec]) -> str:
    """Each control's ``[name, has an auto box, is an integer slider, starting value of a slider (else null)]`` as a
    JSON literal."""
    return json.dumps([[s.name, s.auto_label is not None, s.kind == "slider" and _is_int(s.value),
                        s.value if s.kind == "slider" else None] for s in specs])


def collect_js(specs: Sequence[ControlSpec], owner: "str | None") -> str:
    """:func:`collect` as a browser function ``(state, ...values) => state'``: the page stores ``owner``'s values
    itself, in the order the user set them, with no round trip ("Reset to defaults" runs it), as ``state[owner]``
    (``owner`` None: into ``state`` itself, the preference weights' form), keeping the rest of ``state``; a slider
    whose box holds no number keeps the value stored before (``collect``'s ``previous``). The app's tests check it
    against :func:`collect` in a browser.

    Example:
        >>> print(collect_js([ControlSpec("n", "slider", "n", 5, step=1)], "ties"))  # doctest: +ELLIPSIS
        (state, ...values) => {
          ...
          return {...(state || {}), "ties": out};
        }
    """
    return f"""(state, ...values) => {{
  const shown = {_SHOWN_JS};
  const before = {"(state || {})" if owner is None else f"((state || {{}})[{json.dumps(owner)}] || {{}})"};
  const out = {{}};
  let i = 0;
  for (const [name, auto, integer, start] of {_js_layout(specs)}) {{
    let v = values[i++];
    if (auto && values[i++]) v = null;
    else if (start !== null && {_no_number_js("v")}) v = before[name] ?? start;
    else v = shown(v, integer);
    out[name] = v;
  }}
  return {{...(state || {{}}), {"...out" if owner is None else json.dumps(owner) + ": out"}}};
}}"""


def store_js(specs: Sequence[ControlSpec], owner: "str | None",
             by_tasks: "Sequence[Sequence[ControlSpec]] | None" = None) -> str:
    """The controls' store as a browser function ``(state, ...values) => [state', ...updates]``: the state as
    :func:`collect_js` stores it, and each control's update: an integer slider whose box holds a value its range does
    not show (6.5) is set to the value stored, and a slider whose box holds no number to the value stored as its range
    shows it (a number typed beyond its end is stored as typed, and merged at the end: the box shows the end, not the
    number), so that the box, the range and the merge agree; every other control is left as it is (an empty update).
    ``by_tasks``: the controls for each number of tasks ``T`` (0 to the most), where a slider's range depends on it;
    the function then takes the number first, as ``{"T": n}``: ``(tasks, state, ...values)``.

    Example:
        >>> print(store_js([ControlSpec("n", "slider", "n", 5, step=1)], "ties"))  # doctest: +ELLIPSIS
        (state, ...values) => {
          ...
          return [stored, ...updates];
        }
    """
    def ranges(row: Sequence[ControlSpec]) -> list:
        return [[s.minimum, s.maximum] if s.kind == "slider" and s.minimum is not None else None for s in row]

    table = [ranges(specs)] if by_tasks is None else [ranges(row) for row in by_tasks]
    head, at = ("state", "0") if by_tasks is None else ("tasks, state", "(tasks || {}).T")
    return f"""({head}, ...values) => {{
  const stored = ({collect_js(specs, owner)})(state, ...values);
  const mine = {"stored" if owner is None else f"stored[{json.dumps(owner)}]"};
  const row = {json.dumps(table)}[{at}] || {json.dumps(table[-1])};
  const shown = {_SHOWN_JS};
  const updates = values.map(() => ({{"__type__": "update"}}));
  let i = 0, k = 0;
  for (const [name, auto, integer] of {_js_layout(specs)}) {{
    const j = i++, range = row[k++];
    const automatic = auto && values[i++];
    let v = automatic ? values[j] : mine[name];
    const w = values[j];
    if (!automatic && range && typeof v === "number" && {_no_number_js("w")})
      v = shown(Math.min(Math.max(v, range[0]), range[1]), integer);
    if (v !== values[j]) updates[j] = {{"__type__": "update", "value": v}};
  }}
  return [stored, ...updates];
}}"""


def specs_by_tasks(schema: Mapping[str, Any], max_tasks: int, *, largest_rank: int | None = None,
                   base_method: str | None = None) -> list[list[ControlSpec]]:
    """:func:`control_specs` of ``schema`` for each number of tasks ``T``, 0 (none selected) to ``max_tasks``."""
    return [control_specs(schema, num_tasks=T or None, largest_rank=largest_rank, base_method=base_method)
            for T in range(max_tasks + 1)]


def follow_tasks_js(schema: Mapping[str, Any], owner: str, max_tasks: int, *, largest_rank: int | None = None,
                    base_method: str | None = None) -> "str | None":
    """The controls of ``schema`` following a new expert selection, as a browser function ``(T, state, ...values) =>
    [state', ...updates]`` (``values``: the controls' values in :func:`collect`'s order): each slider whose range or
    "auto" starting point depends on the number of tasks ``T`` (0 to ``max_tasks``; TSV-M's ``rank_fraction`` ends
    at ``1/T``) gets the range for ``T``, and the value shown moved to its nearest end (an "auto" one, the automatic
    start), and its value stored in ``state[owner]`` fitted as :func:`fit_to_controls` fits it. Every other control
    is left as it is (an empty update), a value typed into it too: the page does this itself, with no render of the
    controls. None where nothing depends on ``T``.

    Example:
        >>> schema = {"params": [{"name": "rank_fraction", "type": "float", "default": None, "auto": "1/T",
        ...                       "low": 0.0, "low_open": True, "high": 1.0, "high_rule": "1/T", "ui_step": 0.005}]}
        >>> print(follow_tasks_js(schema, "tsv_m", 8))  # doctest: +ELLIPSIS
        (T, state, ...values) => {
        ...
        >>> follow_tasks_js({"params": [{"name": "a", "type": "float", "default": 0.3, "low": 0.0, "high": 1.0}]},
        ...                 "x", 8) is None
        True
    """
    by_tasks = specs_by_tasks(schema, max_tasks, largest_rank=largest_rank, base_method=base_method)
    specs = by_tasks[0]
    shape = [[(s.minimum, s.maximum, s.value) for s in row] for row in by_tasks]
    dependent = [i for i, spec in enumerate(specs)
                 if spec.kind == "slider" and any(row[i] != shape[0][i] for row in shape)]
    if not dependent:
        return None
    layout = [[s.name, s.auto_label is not None, dependent.index(i) if i in dependent else -1]
              for i, s in enumerate(specs)]
    table = [[list(row[i]) for i in dependent] for row in shape]
    return f"""(T, state, ...values) => {{
  const row = {json.dumps(table)}[T];
  const updates = values.map(() => ({{"__type__": "update"}}));
  if (!row) return [state, ...updates];
  const clamp = (v, lo, hi) => typeof v === "number" ? Math.min(Math.max(v, lo), hi) : v;
  const owner = {json.dumps(owner)};
  const stored = {{...((state || {{}})[owner] || {{}})}};
  let fitted = false, i = 0;
  for (const [name, auto, dep] of {json.dumps(layout)}) {{
    const j = i++;
    const automatic = auto && values[i++];
    if (dep < 0) continue;
    const [lo, hi, start] = row[dep];
    const v = automatic ? start : clamp(values[j], lo, hi);
    updates[j] = {{"__type__": "update", "minimum": lo, "maximum": hi, "interactive": !automatic,
                  ...(v !== values[j] ? {{"value": v}} : {{}})}};
    const kept = clamp(stored[name], lo, hi);
    if (name in stored && kept !== stored[name]) [stored[name], fitted] = [kept, true];
  }}
  return [fitted ? {{...state, [owner]: stored}} : state, ...updates];
}}"""


def slider_update(value: Any, interactive: bool) -> dict:
    """A slider's update as a browser function returns it (Gradio's ``{"__type__": "update", ...}``); ``value``
    None: kept."""
    update = {"__type__": "update", "interactive": interactive}
    return update if value is None else {**update, "value": value}


def js_literal(value: Any) -> str:
    """``value`` as a JavaScript literal (JSON; a NaN or infinity is refused)."""
    return json.dumps(value, allow_nan=False)


def auto_box_js(spec: ControlSpec) -> str:
    """An "auto" box's input as a browser function ``(auto) => update``, for its slider: ticked, the greyed slider
    shows the automatic start again (the merge uses the automatic value: the slider kept the last manual one);
    unticked, the slider is free again at the value it shows.

    Example:
        >>> print(auto_box_js(ControlSpec("k", "slider", "k", 0.125, auto_label="auto (1/T)")))  # doctest: +ELLIPSIS
        (auto) => auto ? {"__type__": "update", "interactive": false, "value": 0.125} : {...}
    """
    return (f"(auto) => auto ? {js_literal(slider_update(spec.value, False))} : "
            f"{js_literal(slider_update(None, True))}")


def reset_updates(specs: Sequence[ControlSpec]) -> list:
    """What "Reset to defaults" sends the controls (as a browser function returns them): each one's starting value,
    every "auto" box ticked again (its slider greyed).

    Example:
        >>> reset_updates([ControlSpec("k", "slider", "k", 0.125, auto_label="auto (1/T)"),
        ...                ControlSpec("f", "dropdown", "f", "sum", choices=("sum", "mean"))])
        [{'__type__': 'update', 'interactive': False, 'value': 0.125}, {'__type__': 'update', 'value': True}, 'sum']
    """
    out: list = []
    for spec in specs:
        if spec.kind != "slider":
            out.append(spec.value)
            continue
        out.append(slider_update(spec.value, spec.auto_label is None))
        if spec.auto_label is not None:
            out.append({"__type__": "update", "value": True})
    return out


def reset_js(specs: Sequence[ControlSpec], owner: "str | None", follow: "str | None" = None) -> str:
    """"Reset to defaults" as a browser function: every control back at :func:`reset_updates`, and the stored values
    as :func:`collect_js` stores the starting values. Without ``follow``, ``(state) => [...updates, state']`` (the
    preference sliders' "Equal weights" calls it with no state: the weights of tasks not shown are dropped too).
    With ``follow`` (:func:`follow_tasks_js` of the same controls), ``(tasks, state) => [...updates, state']``: the
    ranges and "auto" starts are those of the selection at hand, ``tasks.T`` experts, which may be another than at
    the render.

    Example:
        >>> print(reset_js([ControlSpec("a", "slider", "a", 0.3)], "ties"))  # doctest: +ELLIPSIS
        (state) => [...[{"__type__": "update", "interactive": true, "value": 0.3}], (...)(state, ...[0.3])]
    """
    resets, initial = js_literal(reset_updates(specs)), js_literal(initial_values(specs))
    collect = collect_js(specs, owner)
    if follow is None:
        return f"(state) => [...{resets}, ({collect})(state, ...{initial})]"
    return f"""(tasks, state) => {{
  const values = {initial};
  const [stored, ...ranges] = ({follow})(tasks.T, ({collect})(state, ...values), ...values);
  const resets = {resets}.map((u, j) => "minimum" in ranges[j] ?
    {{...(u !== null && typeof u === "object" ? u : {{"__type__": "update", "value": u}}), ...ranges[j]}} : u);
  return [...resets, stored];
}}"""


def use_best_js(owner: str, param: str) -> str:
    """"Use best" as a browser function ``(best, state) => [slider update, state']``: ``best`` (the sweep's result,
    ``{"method", "param", "value"}``) set on ``owner``'s ``param`` slider and stored in ``state[owner]``, in the page,
    as the controls' stores: the slider and the stored values as they are at the click (a server write of the
    values sent with the click put back a slider released within its round trip). A result of another method or
    param changes nothing.

    Example:
        >>> print(use_best_js("ties", "alpha"))  # doctest: +ELLIPSIS
        (best, state) => {
          if (!best || best.method !== "ties" || best.param !== "alpha") return [{"__type__": "update"}, state];
        ...
    """
    who, name = js_literal(owner), js_literal(param)
    return f"""(best, state) => {{
  if (!best || best.method !== {who} || best.param !== {name}) return [{{"__type__": "update"}}, state];
  const mine = {{...((state || {{}})[{who}] || {{}}), [best.param]: best.value}};
  return [best.value, {{...(state || {{}}), [{who}]: mine}}];
}}"""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def initial_values(specs: Sequence[ControlSpec]) -> list[Any]:
    """The flat list of values the controls show before the user sets any (each control's ``value``, and ``True``
    for every "auto" checkbox), in :func:`collect`'s order: what the app's "Reset to defaults" puts back.

    Example:
        >>> specs = [ControlSpec("k", "slider", "k", 0.125, auto_label="auto (1/T)"),
        ...          ControlSpec("a", "slider", "a", 1.0)]
        >>> initial_values(specs), collect(specs, initial_values(specs))
        ([0.125, True, 1.0], {'k': None, 'a': 1.0})
    """
    values: list[Any] = []
    for spec in specs:
        values.append(spec.value)
        if spec.auto_label is not None:
            values.append(True)
    return values


def shown_info(text: str) -> str:
    """``text`` (a control's ``info``: help and source) as Gradio 6 should show it. Gradio shows a component's
    ``info`` through a small Markdown of its own (HTML escaped, then `` `code` ``, links, ``**bold**``,
    ``__bold__``, ``*emphasis*`` and ``_emphasis_`` outside words; no backslash escapes): a help text's ``*`` is a
    product (``int(r * fraction)``, ``T * k``; two of them made an emphasis of the text between them and vanished),
    shown as the asterisk operator ``∗`` (U+2217), which that Markdown leaves alone.

    Example:
        >>> shown_info("k = int(r * fraction); T * k <= r")
        'k = int(r ∗ fraction); T ∗ k <= r'
    """
    return text.replace("*", "\u2217")


def sources_markdown(specs: list[ControlSpec]) -> str:
    """Where each control's default comes from, as one Markdown list (empty if none says): the app folds it below
    the controls, whose help texts ran to ten lines each with their sources. The characters Markdown reads as markup
    within a line are escaped, so that a source reads as the schema writes it (``T * k``, ``[paper]``).

    Example:
        >>> print(sources_markdown([ControlSpec("k", "slider", "k", 0.2, source="Alg. 1; T * k <= r")]))
        - **k**: Alg. 1; T \\* k \\<= r
    """
    return "\n".join(f"- **{s.label}**: {_markdown_escaped(s.source)}" for s in specs if s.source)


def _markdown_escaped(text: str) -> str:
    """``text`` with the characters CommonMark could read as markup within a line backslash-escaped."""
    return "".join("\\" + c if c in "\\`*_[]<>|~" else c for c in text)


def depends_on_tasks(schema: Mapping[str, Any]) -> bool:
    """Whether the controls :func:`control_specs` gives ``schema`` change with the number of tasks: a range that ends
    at a ``high_rule`` (TSV-M's ``1/T``) or an "auto" starting point given by a formula in ``T``.

    Example:
        >>> depends_on_tasks({"params": [{"name": "a", "type": "float", "default": None, "auto": "1/T"}]})
        True
        >>> depends_on_tasks({"params": [{"name": "a", "type": "float", "default": 0.3, "auto": None}]})
        False
    """
    return any(p.get("high_rule") or (p.get("default") is None and auto_rule_value(p.get("auto") or "", 2) is not None)
               for p in schema.get("params", []))


def depends_on_method(schema: Mapping[str, Any]) -> bool:
    """Whether the controls :func:`control_specs` gives a calibration's ``schema`` change with the merging method it
    calibrates: an "auto" start that depends on it (``auto_after``: SVC's ``alpha``, 1.0 after TSV-M).

    Example:
        >>> depends_on_method({"params": [{"name": "alpha", "auto_after": {"tsv_m": 1.0}}]})
        True
    """
    return any(p.get("auto_after") for p in schema.get("params", []))


def fit_to_controls(schema: Mapping[str, Any], stored: Mapping[str, Any], num_tasks: int | None,
                    largest_rank: int | None = None) -> dict[str, Any]:
    """``stored`` (a method's values as the app keeps them: name -> value, ``None`` for "auto") with each slider value
    outside its control's range for ``num_tasks`` tasks moved to the nearest end: the app calls it when the expert
    selection changes, since a range may depend on ``T`` (TSV-M's ``rank_fraction`` ends at ``1/T``).

    Example:
        >>> schema = {"params": [{"name": "rank_fraction", "type": "float", "default": None, "auto": "1/T",
        ...                       "low": 0.0, "low_open": True, "high": 1.0, "high_rule": "1/T", "ui_step": 0.005}]}
        >>> fit_to_controls(schema, {"rank_fraction": 0.25}, 8), fit_to_controls(schema, {"rank_fraction": None}, 8)
        ({'rank_fraction': 0.125}, {'rank_fraction': None})
    """
    out = dict(stored)
    for spec in control_specs(schema, num_tasks=num_tasks, largest_rank=largest_rank):
        value = out.get(spec.name)
        if spec.kind == "slider" and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[spec.name] = min(max(value, spec.minimum), spec.maximum)
    return out


def parse_json_object(text: "str | Mapping[str, Any] | None", what: str,
                      example: str = '{"alpha": 0.3}') -> dict[str, Any]:
    """Parse a JSON object given as text (API calls) or already as a mapping; empty means ``{}``. ``example``: the
    object a message shows (a hyperparameter's, unless the text holds something else, e.g. task weights).

    Example:
        >>> parse_json_object('{"alpha": 0.5}', "hyperparameters")
        {'alpha': 0.5}
    """
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    if not isinstance(text, str):
        raise StudioError(f"{what}: expected a JSON object, got {type(text).__name__}")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StudioError(f"{what}: not valid JSON ({exc.msg} at position {exc.pos}); "
                          f"expected e.g. {example}") from None
    except ValueError:   # Python's limit on the digits of an integer it converts (4300)
        raise StudioError(f"{what}: holds an integer of more than {sys.get_int_max_str_digits()} digits; give "
                          f"numbers in a hyperparameter's range") from None
    except RecursionError:   # arrays or objects nested deeper than Python's recursion limit
        raise StudioError(f"{what}: nested too deeply to read; expected a flat JSON object, e.g. {example}") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudioError(f"{what}: expected a JSON object such as {example}, got {type(value).__name__}")
    return value


def post_scale_param(schema: Mapping[str, Any]) -> dict[str, Any] | None:
    """The method's global scale param (``post_scale``, usually ``alpha``), or ``None`` if it has none."""
    for p in schema.get("params", []):
        if p.get("post_scale"):
            return dict(p)
    return None


def sweep_defaults(schema: Mapping[str, Any]) -> tuple[float, float] | None:
    """A default sweep interval for the method's global scale: ``[0.1, max(1.5, 2 x default)]`` inside its range.

    Example:
        >>> sweep_defaults({"params": [{"name": "alpha", "type": "float", "default": 1.0, "low": 0.0, "high": 3.0,
        ...                             "post_scale": True}]})
        (0.1, 2.0)
    """
    p = post_scale_param(schema)
    if p is None:
        return None
    default = p.get("default") if isinstance(p.get("default"), (int, float)) else 1.0
    lo, hi = 0.1, max(1.5, 2.0 * float(default))
    if p.get("low") is not None:
        lo = max(lo, float(p["low"]))
    if p.get("high") is not None:
        hi = min(hi, float(p["high"]))
    if hi <= lo:
        lo, hi = float(p.get("low") or 0.0), float(p.get("high") or lo + 1.0)
    return lo, hi
