"""The service behind the app: one loaded suite, cached pools, merge / evaluate / diagnostics / optimise / export.

Both the UI handlers and the public API endpoints of ``app.py`` call a single :class:`Studio`, so what a user
sees and what ``gradio_client`` gets are computed by the same code. Heavy objects live here (module-level in the
app, created once): the suite, one :class:`~studio.pool.TaskPool` per expert selection (the engine's spectral
cache), the zero-shot baseline. Nothing here imports Gradio.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import diagnostics as diag
from ..engine import get_pool, merge_pool
from ..evaluate import best_index
from ..io import Recipe, fingerprint, input_fingerprints, save_merged
from ..layers import DEFAULT as DEFAULT_RULE
from ..pool import TaskPool, normalize_preferences
from ..registry import CALIBRATIONS, METHODS, get_calibration, get_method, list_methods
from ..schema import HyperparameterError, StudioError, brief, check_seed, validate_hparams
from .controls import auto_value, fit_to_controls, parse_json_object, post_scale_param

ProgressFn = Callable[[float, str], None]


class RequestError(StudioError):
    """A merge request is incomplete or inconsistent (no expert selected, unknown expert, too few experts...)."""


def _automatic(params: Sequence[Any], hp: Mapping[str, Any], num_tasks: int,
               base_method: str | None = None) -> dict[str, float]:
    """The value each automatic param left automatic in ``hp`` takes for ``num_tasks`` experts (after
    ``base_method``, for a calibration), where its rule is a formula (:func:`studio.ui.controls.auto_value`, which
    the sliders start at too): what the method resolves ``None`` to.

    Example:
        >>> _automatic(get_method("tsv_m").params, {"rank_fraction": None, "alpha": 1.0}, 8)
        {'rank_fraction': 0.125}
        >>> _automatic(get_calibration("svc").params, {"alpha": None}, 4, "tsv_m")
        {'alpha': 1.0}
    """
    out = {}
    for p in params:
        value = auto_value(p.to_dict(), num_tasks, base_method) if p.default is None and hp.get(p.name) is None \
            else None
        if value is not None:
            out[p.name] = value
    return out


def _weights_example(experts: Sequence[str]) -> str:
    """Task weights as a message shows them, in JSON: ``{"digits": 2}``."""
    return json.dumps({experts[0] if experts else "task": 2})


def stored_settings(state: Any, name: str | None, what: str) -> dict[str, Any]:
    """The settings the app's page stored for ``name`` (``state[name]``; the whole ``state`` for ``name`` None), as
    a dict; a state that is not a JSON object of them is refused, naming what is wrong.

    Example:
        >>> stored_settings({"ties": {"k": 0.2}}, "ties", "method"), stored_settings(None, "ties", "method")
        ({'k': 0.2}, {})
        >>> stored_settings({"ties": [0.2]}, "ties", "method")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        studio.ui.backend.RequestError: the method settings stored for 'ties' must be a JSON object ..., got [0.2]
    """
    if state is None:
        return {}
    if not isinstance(state, Mapping):
        raise RequestError(f"the stored {what} settings must be a JSON object, got {brief(state)}")
    if name is None:
        return dict(state)
    part = state.get(name)
    if part is None:
        return {}
    if not isinstance(part, Mapping):
        raise RequestError(f"the {what} settings stored for {name!r} must be a JSON object of param -> value, "
                           f"got {brief(part)}")
    return dict(part)


@dataclass(frozen=True)
class MergeRequest:
    """A validated description of one merge; :meth:`recipe` turns it into a reproducible :class:`Recipe`.

    ``hparams`` and ``calibrate_hparams`` are complete (schema defaults filled in, ``None`` = automatic);
    ``preferences`` is ``None`` for uniform preferences, else a task -> non-negative weight mapping.
    """

    method: str
    hparams: Mapping[str, Any]
    experts: tuple[str, ...]
    calibrate: str | None = None
    calibrate_hparams: Mapping[str, Any] = field(default_factory=dict)
    preferences: Mapping[str, float] | None = None
    seed: int = 0

    def with_hparams(self, **updates: Any) -> "MergeRequest":
        return MergeRequest(self.method, {**self.hparams, **updates}, self.experts, self.calibrate,
                            self.calibrate_hparams, self.preferences, self.seed)

    @property
    def drawn_seed(self) -> int | None:
        """The seed where the method draws from it (DARE's masks), else None: the app's one seed box, set for
        another method, changes nothing merged, so recipes and descriptions of the same merge read the same."""
        return int(self.seed) if self.method in METHODS and get_method(self.method).uses_seed else None

    def recipe(self, suite: str | None = None) -> Recipe:
        from .. import __version__

        seed = self.drawn_seed or 0   # recorded where the method draws from it (drawn_seed)
        return Recipe(method=self.method, hparams=dict(self.hparams), experts=list(self.experts),
                      calibrate=self.calibrate, calibrate_hparams=dict(self.calibrate_hparams),
                      preferences=None if self.preferences is None else dict(self.preferences), seed=seed,
                      # None (not "default"): the engine then lets a calibration apply its own default layer rule
                      # (SVC skips embeddings), exactly as the app's merge did.
                      layer_rule=None, suite=suite, studio_version=__version__)


#: The largest seed the app's seed box holds exactly (the page keeps it as a JavaScript number; the box starts at 0).
SEED_BOX_MAX = 2**53 - 1


@dataclass(frozen=True)
class LoadedSettings:
    """A recipe's settings as the app's page holds them (:meth:`Studio.settings_from_recipe`)."""

    request: MergeRequest
    hp_state: dict[str, Any]     # method -> {param: value | None (automatic)}
    cal_state: dict[str, Any]    # calibration -> {param: value}
    pref_state: dict[str, float]   # task -> weight in [0, 1]
    notes: list[str]             # where the app's merge will differ from the recipe's


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


@dataclass
class Diagnostics:
    """Everything the diagnostics tab shows for one layer and the current settings (numpy, float32)."""

    layer: str
    tasks: list[str]
    spectra: dict[str, np.ndarray]
    merged_spectrum: np.ndarray | None
    energy: dict[str, np.ndarray]
    merged_energy: np.ndarray | None
    metric: str
    interference: np.ndarray
    metric_info: dict[str, Any]
    curves: dict[str, Any]
    seconds: float = 0.0
    #: what the heatmap covers: "" (the layer), or the whole model's matrix layers, or why it stayed on the layer
    heatmap_scope: str = ""


class Studio:
    """One suite plus its caches; thread-safe for concurrent sessions.

    Args:
        suite: a loaded suite (``studio.suite.load_suite``): ``.base``, ``.experts``, ``.tasks``, ``.split``...
        device: compute device for merging/evaluation (``None``: CUDA when available, resolved at call time).
        max_pools: how many expert selections keep their spectral cache.
    """

    def __init__(self, suite: Any, *, device: Any = None, max_pools: int = 3):
        self.suite = suite
        self.device = device
        self.max_pools = max_pools
        self._pools: "OrderedDict[tuple[str, ...], TaskPool]" = OrderedDict()
        self._lock = threading.RLock()
        self._layer_keys: list[str] | None = None
        self._largest_ranks: dict[tuple[str, str], int | None] = {}   # (name, kind) -> largest_rank: one pass each

    # ------------------------------------------------------------------ suite facts
    @functools.cached_property
    def suite_fingerprints(self) -> dict[str, Any]:
        """The fingerprints of the suite's base and experts (:func:`studio.io.input_fingerprints`), which every
        export records: taken once (~1 s for 8 ViT-B/32 experts here, 0.04 s for MiniSuite)."""
        return input_fingerprints(self.suite.base, self.suite.experts)

    @property
    def task_names(self) -> list[str]:
        return list(self.suite.task_names)

    @property
    def suite_name(self) -> str:
        return str(getattr(self.suite, "name", "suite"))

    @property
    def suite_source(self) -> str:
        """What recipes record to load this suite again (``merge-studio recipe`` reads it): its folder's absolute
        path, or ``hf://owner/name@<commit>`` (:attr:`studio.suite.Suite.source`)."""
        return str(getattr(self.suite, "source", self.suite_name))

    def task(self, name: str) -> Any:
        for t in self.suite.tasks:
            if t.name == name:
                return t
        raise RequestError(f"unknown task {brief(name)}; the suite has {self.task_names}")

    def individual_accuracy(self, compute: bool = False) -> dict[str, float]:
        """Each expert's own test accuracy (%) on its task (the normalisation reference).

        Read from the suite's manifest; with ``compute=True`` the tasks it lacks are measured once with
        :func:`studio.evaluate.reference_accuracy` (cached per suite by the evaluation module).
        """
        acc = {k: float(v) for k, v in dict(self.suite.expert_accuracy).items()}
        missing = [t for t in self.task_names if t not in acc]
        if compute and missing:
            from ..evaluate import reference_accuracy

            acc.update(reference_accuracy(self.suite, "expert", tasks=missing, split="test", device=self.device))
        return acc

    def expert_choices(self, compute: bool = False) -> list[tuple[str, str]]:
        """``(label, task)`` pairs for the expert checkboxes: the task and its expert's own accuracy."""
        acc = self.individual_accuracy(compute)
        return [(f"{t}  ·  {acc[t]:.1f}%" if t in acc else t, t) for t in self.task_names]

    def layer_keys(self) -> list[str]:
        """Keys of the matrix layers (2-D tensors the default layer rule selects), in state-dict order (open_clip's
        lists ``visual.proj``, applied last, before the blocks)."""
        if self._layer_keys is None:
            self._layer_keys = [k for k, v in self.suite.base.items()
                                if v.is_floating_point() and DEFAULT_RULE.is_matrix(k, tuple(v.shape))]
        return list(self._layer_keys)

    def largest_rank(self, name: str, kind: str = "merge") -> int | None:
        """The largest rank ``min(m, n)`` of the suite's matrix layers that the method (or, ``kind="calibration"``,
        the calibration) ``name``'s own layer rule selects (the ``R`` of a schema's ``low_rule``), or None if it
        selects none.

        Example:
            >>> from studio.suite import default_suite
            >>> Studio(default_suite()).largest_rank("tsv_m")   # MiniSuite's widest layers are 128 wide
            128
        """
        from ..layers import resolve_rule

        if (name, kind) not in self._largest_ranks:   # asked at every render of the controls and change of experts
            rule = resolve_rule(self.schema(name, kind).get("layer_rule", "default"))
            ranks = [min(v.shape) for k, v in self.suite.base.items()
                     if v.is_floating_point() and v.ndim >= 2 and rule.is_matrix(k, tuple(v.shape))]
            self._largest_ranks[(name, kind)] = max(ranks) if ranks else None
        return self._largest_ranks[(name, kind)]

    def fitted(self, name: str, kind: str, stored: Mapping[str, Any], num_tasks: int | None) -> dict[str, Any]:
        """``stored`` (the values the page holds for the method or calibration ``name``) as its controls show them
        for ``num_tasks`` selected experts: each slider value its range leaves out at its nearest end
        (:func:`~studio.ui.controls.fit_to_controls`): a number typed beyond a slider's end, or a value set for
        another selection (TSV-M's ``rank_fraction`` ends at ``1/T``). The app's renders show these and
        :meth:`request_from_state` merges them, so that a new expert selection needs no write of the stored values
        (one would replace a value set while it travels).

        Example:
            >>> from studio.suite import default_suite
            >>> Studio(default_suite()).fitted("tsv_m", "merge", {"rank_fraction": 0.5, "alpha": 1.2}, 4)
            {'rank_fraction': 0.25, 'alpha': 1.2}
        """
        return fit_to_controls(self.schema(name, kind), stored, num_tasks or None, self.largest_rank(name, kind))

    def default_layer(self) -> str:
        """A representative layer to open the diagnostics on: the middle block's first attention/MLP matrix."""
        keys = self.layer_keys()
        if not keys:
            raise StudioError("the suite's model has no matrix layers to diagnose")
        blocks = [k for k in keys if ".resblocks." in k]
        pool = blocks or keys
        return pool[len(pool) // 2]

    @staticmethod
    def methods() -> list[dict[str, Any]]:
        return [m for m in list_methods() if m["kind"] == "merge"]

    @staticmethod
    def calibrations() -> list[dict[str, Any]]:
        return [m for m in list_methods() if m["kind"] == "calibration"]

    @staticmethod
    def schema(name: str, kind: str = "merge") -> dict[str, Any]:
        """The schema of the merging method ``name`` (``kind="merge"``) or of the calibration ``name``
        (``"calibration"``). Asked by kind, not by name: ``align_merge_b`` is both, with other parameters (the method
        has the scale ``lam``; the app showed the calibration's controls for the method, without it).

        Example:
            >>> [p["name"] for p in Studio.schema("align_merge_b")["params"]]
            ['alpha', 'lam']
            >>> [p["name"] for p in Studio.schema("align_merge_b", "calibration")["params"]]
            ['alpha']
        """
        if kind not in ("merge", "calibration"):
            raise StudioError(f"kind must be 'merge' or 'calibration', got {brief(kind)}")
        return (get_calibration(name) if kind == "calibration" else get_method(name)).to_dict()

    # ------------------------------------------------------------------ requests
    def request(self, method: str, hparams: "Mapping[str, Any] | str | None" = None,
                experts: "Sequence[str] | None" = None, calibrate: str | None = None,
                calibrate_hparams: "Mapping[str, Any] | str | None" = None,
                preferences: "Mapping[str, float] | str | None" = None, seed: int = 0) -> MergeRequest:
        """Validate a merge request from UI or API values and return it complete.

        Raises :class:`StudioError` subclasses with readable messages: unknown method/calibration, no expert or an
        unknown expert, fewer experts than the method needs, out-of-range hyperparameters, bad preferences.
        """
        if method is None or method == "":
            raise RequestError("no merging method given; choose one of " + ", ".join(sorted(METHODS)))
        if not isinstance(method, str):
            raise RequestError(f"the method must be a method's name, got {brief(method)}; choose one of "
                               + ", ".join(sorted(METHODS)))
        spec = get_method(method)
        hp = parse_json_object(hparams, "hyperparameters")
        experts = self.check_expert_names(experts)
        if not experts:
            raise RequestError("no expert selected: pick at least one task expert to merge")
        self._check_known(experts)
        if len(experts) < spec.min_experts:
            raise RequestError(f"{method} needs at least {spec.min_experts} experts, {len(experts)} selected")
        # Keep the suite's order so the same selection is the same pool (and the same recipe) whatever the click order.
        order = {n: i for i, n in enumerate(self.task_names)}
        experts = sorted(experts, key=lambda n: order.get(n, len(order)))
        hp = validate_hparams(method, spec.params, hp)
        cal = None if calibrate in (None, "", "none") else calibrate
        cal_hp = parse_json_object(calibrate_hparams, "calibration hyperparameters")
        if cal is None:
            if cal_hp:
                raise HyperparameterError("calibration hyperparameters were given but no calibration is selected")
        else:
            cspec = get_calibration(cal)
            cal_hp = validate_hparams(cal, cspec.params, cal_hp)
        prefs = (parse_json_object(preferences, "preferences", _weights_example(experts))
                 if isinstance(preferences, str) else preferences)
        prefs = self._preferences(prefs, experts)
        return MergeRequest(method, hp, tuple(experts), cal, cal_hp, prefs, check_seed(seed, RequestError))

    def request_from_state(self, method: str, hp_state: Mapping[str, Any] | None, experts: Sequence[str] | None,
                           calibration: str | None, cal_state: Mapping[str, Any] | None,
                           pref_state: Mapping[str, float] | None, seed: int = 0) -> MergeRequest:
        """Build a request from the app's plain-JSON states (settings remembered per method / calibration).

        ``hp_state`` maps method -> {param: value} (``None`` = automatic), ``cal_state`` calibration -> {param:
        value}, ``pref_state`` task -> weight; weights of deselected tasks are ignored. The method's and the
        calibration's values are taken as their controls show them for the selected experts (:meth:`fitted`).

        Example:
            >>> studio.request_from_state("task_arithmetic", {"task_arithmetic": {"alpha": 0.5}}, ["a"], "none",
            ...                           {}, {}).hparams  # doctest: +SKIP
            {'alpha': 0.5}
        """
        experts = list(experts or [])
        cal = None if calibration in (None, "", "none") else calibration
        hp = stored_settings(hp_state, method, "method")
        cal_hp = stored_settings(cal_state, cal, "calibration")   # with no calibration: the whole state, checked
        if cal is None:   # the page keeps the values set for each calibration; "none" merges none of them
            cal_hp = {}
        # as the controls show them for this selection (a value stored for a wider range, at its end)
        if isinstance(method, str) and method in METHODS:
            hp = self.fitted(method, "merge", hp, len(experts))
        if isinstance(cal, str) and cal in CALIBRATIONS:
            cal_hp = self.fitted(cal, "calibration", cal_hp, len(experts))
        # the page holds the states: each is checked, as a request
        prefs = stored_settings(pref_state, None, "preference")
        prefs = {t: w for t, w in prefs.items() if t in experts} or None
        return self.request(method, hp, experts, cal, cal_hp, prefs, seed)

    def settings_from_recipe(self, recipe: "Recipe | Mapping[str, Any]", hp_state: Mapping[str, Any] | None = None,
                             cal_state: Mapping[str, Any] | None = None,
                             pref_state: Mapping[str, float] | None = None) -> "LoadedSettings":
        """The app's controls set to the merge ``recipe`` describes: a run of the session's leaderboard, or a recipe a
        user loads (a ``.yaml``/``.json`` file, or the one an exported ``.safetensors`` file embeds).

        Returns the validated request and the page's states with the recipe's settings put in: the method's stored
        values are the recipe's (``None`` = automatic), the calibration's likewise, and each merged task's weight the
        recipe's, rescaled so the largest is at most 1 (the sliders' end; only the ratios are merged). The other
        methods' and tasks' stored values are kept. ``notes`` says where the app's merge will differ from the
        recipe's: a value beyond its control's range (shown, and merged, at the nearest end), or a recipe made from
        other weights than this suite's (its recorded fingerprints); and where the weights are shown rescaled.

        A recipe the app cannot merge as written is refused, naming the field: a layer rule, SVD mode, key prefix or
        checkpoint sources other than the app's (``merge-studio recipe FILE`` replays those), an expert this suite
        lacks, a method, calibration or value its schema refuses, DARE's seed beyond the app's seed box (0 to
        :data:`SEED_BOX_MAX`). A library recipe's preferences give the tasks
        they leave out weight 0, as :func:`studio.merge` does (the page's sliders show 0 there).

        Example:
            >>> from studio.suite import default_suite
            >>> s = Studio(default_suite())
            >>> recipe = {"method": "ties", "hparams": {"k": 0.4}, "experts": ["digits", "textures"],
            ...           "preferences": {"digits": 3}}
            >>> got = s.settings_from_recipe(recipe, {"ties": {"k": 0.1}, "dare": {"p": 0.5}})
            >>> got.hp_state
            {'ties': {'k': 0.4, 'topk_scope': 'model', 'merge_func': 'sum', 'alpha': 0.3}, 'dare': {'p': 0.5}}
            >>> got.pref_state, got.notes  # doctest: +ELLIPSIS
            ({'digits': 1.0, 'textures': 0.0}, ["the recipe's task weights are shown divided by 3, as the sliders ..."])
        """
        from ..io import CheckpointError

        from ..layers import resolve_rule

        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_dict(recipe)
        for name, value in (("svd_mode", "auto"), ("prefix", None), ("sources", None)):
            if getattr(recipe, name) != value:
                raise CheckpointError(f"the recipe's {name} is {brief(getattr(recipe, name))}; the app merges the "
                                      f"suite's own experts in SVD mode 'auto' ({name}: {brief(value)}): replay it "
                                      f"with `merge-studio recipe FILE` instead")
        if recipe.layer_rule is not None:   # the app's merge takes each method's and calibration's own rule
            given = resolve_rule(recipe.layer_rule)
            own = [get_method(recipe.method)] + ([get_calibration(recipe.calibrate)] if recipe.calibrate else [])
            differ = [s.name for s in own if resolve_rule(s.extra.get("layer_rule")) != given]
            if differ:
                raise CheckpointError(f"the recipe's layer_rule {brief(recipe.layer_rule)} is not the one the app "
                                      f"merges {' and '.join(differ)} with (its own default): replay it with "
                                      f"`merge-studio recipe FILE` instead")
        experts = self.check_expert_names(recipe.experts, "the recipe's experts")
        prefs = recipe.preferences
        if prefs is not None:   # studio.merge's preferences: a task they leave out has weight 0 (the page's: 1)
            if not isinstance(prefs, Mapping):
                raise RequestError(f"the recipe's preferences must be a mapping task -> weight, got {brief(prefs)}")
            prefs = {e: prefs.get(e, 0.0) for e in experts} | dict(prefs)
        req = self.request(recipe.method, recipe.hparams, experts, recipe.calibrate, recipe.calibrate_hparams,
                           prefs, recipe.seed)
        drawn = req.drawn_seed
        if drawn is not None and not 0 <= drawn <= SEED_BOX_MAX:   # the page holds it as a JavaScript number
            raise RequestError(f"the recipe's seed {drawn} is outside what the app's seed box holds (0 to "
                               f"{SEED_BOX_MAX} = 2^53 - 1): replay it with `merge-studio recipe FILE` instead")
        notes = []
        hp, cal_hp = dict(req.hparams), dict(req.calibrate_hparams)
        for name, kind, given in ((req.method, "merge", hp), (req.calibrate, "calibration", cal_hp)):
            if name is None:
                continue
            shown = self.fitted(name, kind, given, len(req.experts))
            notes += [f"{name}'s {k}={given[k]:g} lies beyond the app's control, which shows and merges {v:g}"
                      for k, v in shown.items() if v != given[k]]
        recorded = recipe.fingerprints or {}
        mine = self.suite_fingerprints
        other = ([] if recorded.get("base") in (None, mine["base"]) else ["the base"]) + [
            f"expert {e!r}" for e in req.experts
            if recorded.get("experts", {}).get(e) not in (None, mine["experts"].get(e))]
        if other:
            notes.append(f"the recipe was made from other weights than this suite's ({', '.join(other)}): the merge "
                         f"here differs from the one it records")
        weights = dict(req.preferences or dict.fromkeys(req.experts, 1.0))
        top = max(weights.values())
        if top > 1:   # the sliders end at 1; the merge takes p_i = w_i / sum(w)
            weights = {t: w / top for t, w in weights.items()}
            notes.append(f"the recipe's task weights are shown divided by {top:g}, as the sliders end at 1: the same "
                         f"merge, which takes only their ratios")
        hp_state = {**stored_settings(hp_state, None, "method"), req.method: hp}
        cal_state = stored_settings(cal_state, None, "calibration")
        if req.calibrate is not None:
            cal_state[req.calibrate] = cal_hp
        prefs = {**stored_settings(pref_state, None, "preference"), **weights}
        return LoadedSettings(req, hp_state, cal_state, prefs, notes)

    @staticmethod
    def describe(req: MergeRequest) -> str:
        """One-line settings summary for the leaderboard; the seed where the method draws from it (DARE's masks):
        two runs that differ by it alone read apart."""
        from .session import describe_settings

        seed = req.drawn_seed
        T = len(req.experts)
        automatic = _automatic(get_method(req.method).params, req.hparams, T) if req.method in METHODS else None
        cal_automatic = (_automatic(get_calibration(req.calibrate).params, req.calibrate_hparams, T, req.method)
                         if req.calibrate in CALIBRATIONS else None)
        return describe_settings(req.hparams, req.calibrate, req.calibrate_hparams, req.preferences, seed,
                                 automatic=automatic, calibrate_automatic=cal_automatic)

    def alpha_grid(self, method: str, lo: float | None, hi: float | None, n: int) -> list[float]:
        """``n`` evenly spaced values of the method's global scale between ``lo`` and ``hi`` (checked vs its range)."""
        scale = post_scale_param(self.schema(method))
        if scale is None:
            raise RequestError(f"{method} has no global scale (alpha) to optimise")
        if lo is None or hi is None or not (float(lo) < float(hi)):
            raise RequestError(f"the sweep needs 'from' < 'to', got from={lo}, to={hi}")
        if not 2 <= int(n) <= 101:
            raise RequestError(f"the sweep needs between 2 and 101 points, got {n}")
        low = scale["low"] if scale["low"] is not None else -np.inf
        high = scale["high"] if scale["high"] is not None else np.inf
        if float(lo) < low or float(hi) > high:
            raise HyperparameterError(f"{method}: '{scale['name']}' sweep [{lo}, {hi}] leaves the allowed range "
                                      f"[{scale['low']}, {scale['high']}]")
        return [round(float(v), 6) for v in np.linspace(float(lo), float(hi), int(n))]

    def metric_names(self) -> list[str]:
        """The interference metrics the diagnostics offer (:data:`studio.diagnostics.METRICS`)."""
        return list(diag.METRICS)

    def default_method(self) -> str:
        """The method the app opens on: the first registered of TSV-M, Iso-C, TIES, Task Arithmetic."""
        names = [m["name"] for m in self.methods()]
        return next((m for m in ("tsv_m", "iso_c", "ties", "task_arithmetic") if m in names), names[0])

    def default_metric(self) -> str:
        """The heatmap metric the app opens on (top-k subspace similarity when available)."""
        return "subspace_similarity" if "subspace_similarity" in diag.METRICS else next(iter(diag.METRICS))

    def warm(self) -> None:
        """Fill the caches the first page load and the first merge need, in the background; never raises.

        The default method's merge and diagnostics of the default layer (task spectra, STI factors, SAR inputs of
        every layer), then the expert and zero-shot reference predictions of the test split.
        """
        import logging

        try:
            req = self.request(self.default_method(), {}, self.task_names)
            self.diagnostics(req, self.default_layer(), self.default_metric())
            from ..evaluate import reference_accuracy

            for kind in ("zeroshot", "expert"):
                reference_accuracy(self.suite, kind, split="test", device=self.device)
        except Exception:  # noqa: BLE001 - warming is an optimisation only
            logging.getLogger(__name__).exception("cache warm-up failed")

    @staticmethod
    def check_expert_names(experts: Any, what: str = "experts") -> list[str]:
        """``experts`` as a list of names: a list (or tuple) of strings, or ``None`` (none)."""
        if experts is None:
            return []
        if isinstance(experts, (str, bytes, Mapping)) or not isinstance(experts, Sequence):
            raise RequestError(f"{what} must be a list of expert names, got {brief(experts)}"
                               + (f" (one expert: [{experts!r}])" if isinstance(experts, str) else ""))
        bad = [e for e in experts if not isinstance(e, str)]
        if bad:
            raise RequestError(f"{what} must be a list of expert names (strings), got {brief(bad[0])} among them")
        return list(experts)

    @staticmethod
    def _preferences(prefs: Mapping[str, float] | None, experts: Sequence[str]) -> dict[str, float] | None:
        """Keep the selected experts' weights; ``None`` when absent or uniform (identical merge, simpler recipe). A
        selected task the mapping leaves out keeps weight 1, the sliders' default."""
        if prefs is None:
            return None
        if not isinstance(prefs, Mapping):   # 0, False and [] too: they are not "no preferences"
            raise RequestError(f"preferences must be a mapping task -> weight (JSON object), e.g. "
                               f"{_weights_example(experts)}, got {brief(prefs)}")
        if not prefs:
            return None
        unknown = sorted(set(prefs) - set(experts), key=str)
        if unknown:
            raise RequestError(f"preferences name task(s) {brief(unknown)} that are not selected; selected: "
                               f"{list(experts)}")
        values = {}
        for n in experts:
            v = prefs.get(n, 1.0)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f"preference for task '{n}' must be a number >= 0, got {brief(v)}")
            try:
                values[n] = float(v)
            except OverflowError:
                raise RequestError(f"preference for task '{n}' is {brief(v)}, beyond a float's range; give a finite "
                                   f"number >= 0 (only the ratios matter)") from None
        normalize_preferences(values, list(experts))  # raises on negative / non-finite / all-zero weights
        if len(set(values.values())) == 1:
            return None
        return values

    def _check_known(self, experts: Sequence[str]) -> None:
        """Each of ``experts`` is one of the suite's, named once."""
        unknown = [e for e in experts if e not in self.suite.experts]
        if unknown:
            raise RequestError(f"unknown expert(s) {brief(unknown)}; the suite has {self.task_names}")
        if len(set(experts)) != len(experts):
            raise RequestError(f"expert list has duplicates: {brief(list(experts))}")

    # ------------------------------------------------------------------ engine
    def pool(self, experts: Sequence[str]) -> TaskPool:
        """The cached pool of this expert selection (its spectral cache is reused by every later call)."""
        key = tuple(experts)
        self._check_known(key)
        with self._lock:
            if key in self._pools:
                self._pools.move_to_end(key)
                return self._pools[key]
            pool = get_pool(self.suite.base, {n: self.suite.experts[n] for n in key}, device=self.device)
            self._pools[key] = pool
            while len(self._pools) > self.max_pools:
                self._pools.popitem(last=False)
            return pool

    def merge(self, req: MergeRequest, progress: ProgressFn | None = None) -> dict[str, Tensor]:
        """Merged state dict of ``req`` through :func:`studio.merge_pool` (cached decompositions are reused)."""
        pool = self.pool(req.experts)
        with self._lock:
            # Through the recipe's own kwargs, so an exported recipe reproduces exactly this call.
            return merge_pool(pool, req.method, progress=progress, **req.recipe().merge_kwargs())

    def evaluate(self, state_dict: Mapping[str, Tensor], tasks: Sequence[str] | None = None,
                 split: str = "test") -> Any:
        """Per-task evaluation of ``state_dict`` (:func:`studio.evaluate.evaluate`; accuracies in %)."""
        from ..evaluate import evaluate

        return evaluate(self.suite, state_dict, tasks=list(tasks) if tasks else None, split=split, device=self.device)

    @staticmethod
    def accuracy_table(result: Any) -> dict[str, dict[str, float | None]]:
        """Per task (in %): merged, zero-shot and individual accuracy on the same split, normalized accuracy
        (merged / individual, TSV eq. 10), NAI (Iso eq. 4) and the KL loss to the expert (nats)."""
        out = {}
        for t in result.tasks:
            out[t] = {
                "merged": _num(result.accuracy[t]),
                "zero_shot": _num(result.zeroshot_accuracy.get(t)),
                "individual": _num(result.expert_accuracy.get(t)),
                "normalized": _num(result.normalized.get(t)),
                "nai": _num(result.nai.get(t)),
                "kl": _num(result.kl.get(t)),
            }
        return out

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self, req: MergeRequest | None, layer: str, metric: str, *, curves: bool = True,
                    pool_experts: Sequence[str] | None = None, heatmap: str = "layer") -> Diagnostics:
        """Spectra, energy, interference and per-layer curves of ``layer`` for the current settings.

        ``heatmap="model"`` draws a task-by-task metric over every matrix layer of the app
        (:func:`studio.diagnostics.model_matrix`: the whole task vectors' cosine, the other metrics' mean over the
        layers); a metric per merged subspace (``"svc"``, ``"sai"``) has no such form and stays on ``layer``.

        ``req`` may be ``None`` (e.g. a method that cannot run on this selection): then the merge-dependent parts
        use the Task Arithmetic sum, as the diagnostics module does. Every task decomposition comes from the
        pool's cache, so after the first call an update costs a merge lookup (a rescale when only alpha moved)
        plus one SVD of the merged delta per layer, and a move of the global scale alone one SVD, of the layer shown
        (the per-layer curves are the merge's at its default scale: :meth:`_merge_at_default_scale`).
        """
        t0 = time.perf_counter()
        experts = tuple(req.experts if req is not None else (pool_experts or self.task_names))
        self._check_layer(layer)
        if metric not in diag.METRICS:
            raise StudioError(f"unknown interference metric {brief(metric)}; expected one of {list(diag.METRICS)}")
        if heatmap not in ("layer", "model"):
            raise StudioError(f"heatmap must be 'layer' or 'model', got {brief(heatmap)}")
        pool = self.pool(experts)
        merged = self.merge(req) if req is not None else None
        at_default = self._merge_at_default_scale(req) if curves else None
        info = metric_info(metric)
        whole = heatmap == "model" and info["shape"] == "TxT"
        # every layer's merged delta where the curves or a whole-model heatmap of the merge read it, else the layer's
        every = (curves and at_default is None) or (whole and info["uses_merged"])
        with self._lock:
            deltas = self._merged_deltas(merged, None if every else [layer]) if merged is not None else None
            lt = pool.layer(layer)
            S = diag.task_spectra(lt)
            spectra = {n: _to_numpy(s) for n, s in zip(lt.names, S)}
            energy = {n: _to_numpy(e) for n, e in zip(lt.names, diag.cumulative_energy(S))}
            merged_s = merged_e = None
            if deltas is not None:
                ms = diag.spectrum(deltas[layer])
                merged_s, merged_e = _to_numpy(ms), _to_numpy(diag.cumulative_energy(ms))
            merged_arg = deltas if (deltas is not None and info["uses_merged"]) else None
            scope = ""
            if whole:
                # the app's layers that an expert changed, as the library's model-level averages take them
                changed = set(diag._matrix_keys(pool, None, None))
                keys = [k for k in self.layer_keys() if k in changed]
                mat = diag.model_matrix(pool, metric, merged_arg, keys=keys, merged_is_delta=True)
                scope = f"whole model, {len(keys)} matrix layers" + (" (task vectors over them)"
                                                                      if metric == "cosine" else " (mean)")
            else:
                mat = diag.interference_matrix(pool, layer, metric,
                                               merged=merged_arg[layer] if merged_arg is not None else None)
                if heatmap == "model":
                    scope = "this layer: per merged subspace, no whole-model form"
            profile = self._profile(pool, merged, at_default, deltas) if curves else {}
        return Diagnostics(layer, list(experts), spectra, merged_s, energy, merged_e, metric, _to_numpy(mat), info,
                           profile, time.perf_counter() - t0, scope)

    def curves(self, req: MergeRequest | None, *, pool_experts: Sequence[str] | None = None) -> dict[str, Any]:
        """The per-layer curves of :meth:`diagnostics` alone (its ``curves``, the same values): after a structural
        change on large experts they take most of an update (every layer's merged delta decomposed again: 6.6-7.2 s
        after a TSV-M rank change on 8 ViT-B/32 experts, where the layer's plots took 2.7-4.0 s with the merge;
        docs/PERFORMANCE.md), so the app draws the layer's plots first (``diagnostics(..., curves=False)``) and
        these when they are ready. ``req=None``: against the Task Arithmetic sum of ``pool_experts``, as
        :meth:`diagnostics`."""
        experts = tuple(req.experts if req is not None else (pool_experts or self.task_names))
        pool = self.pool(experts)
        merged = self.merge(req) if req is not None else None
        at_default = self._merge_at_default_scale(req)
        with self._lock:
            return self._profile(pool, merged, at_default)

    def _profile(self, pool: TaskPool, merged: Mapping[str, Tensor] | None,
                 at_default: Mapping[str, Tensor] | None, deltas: Mapping[str, Tensor] | None = None
                 ) -> dict[str, Any]:
        """:meth:`layer_profile` of the merge (``deltas``: its every layer's merged delta, if already made), or of
        the merge at its method's own scale where it is that merge scaled (:meth:`_merge_at_default_scale`), or of
        the Task Arithmetic sum (``merged=None``)."""
        if at_default is not None:
            return self.layer_profile(pool, self._merged_deltas(at_default))
        if merged is None:
            return self.layer_profile(pool, None)
        return self.layer_profile(pool, deltas if deltas is not None else self._merged_deltas(merged))

    def report(self, req: MergeRequest | None, shown: Diagnostics | None = None, *,
               pool_experts: Sequence[str] | None = None, why: str | None = None,
               progress: ProgressFn | None = None) -> dict[str, Any]:
        """The whole-model report of the current settings, as ``merge-studio diagnose --out`` writes it for the same
        merge (:func:`studio.diagnostics.report` over the layers the method's rule treats as matrices, the merge
        under ``merge.recipe``), plus, under ``shown``, the numbers behind the diagnostics tab's four plots
        (``shown``, a :meth:`diagnostics` result): the layer's spectra and cumulative energy, the heatmap with its
        rows and columns, the per-layer curves. NaN where a value is undefined (:func:`studio.schema.json_safe` writes
        null).

        ``req=None`` (the method cannot merge this selection; ``why`` says why): the Task Arithmetic sum of
        ``pool_experts``, as the plots show it and as ``diagnose`` without ``--method`` reports it. ``progress``: an
        optional ``(fraction, message)`` callback.
        """
        experts = tuple(req.experts if req is not None
                        else (self.check_expert_names(pool_experts, "pool_experts") or self.task_names))
        pool = self.pool(experts)
        merged = self.merge(req) if req is not None else None
        rule = get_method(req.method).extra.get("layer_rule") if req is not None else None
        with self._lock:
            found = diag.report(pool, merged, layer_rule=rule, merged_is_delta=False if merged is not None else None,
                                progress=progress)
        what: dict[str, Any] = ({"recipe": req.recipe(self.suite_source).to_dict()} if req is not None
                                else {"task_arithmetic_sum": True, **({"why": why} if why else {})})
        out = {"merge": what, "suite": self.suite_source, "sources": None, **found}
        if shown is not None:
            info = shown.metric_info
            out["shown"] = {
                "layer": shown.layer, "shape": list(self.suite.base[shown.layer].shape), "tasks": list(shown.tasks),
                "spectra": {n: s.tolist() for n, s in shown.spectra.items()},
                "merged_spectrum": None if shown.merged_spectrum is None else shown.merged_spectrum.tolist(),
                "energy": {n: e.tolist() for n, e in shown.energy.items()},
                "merged_energy": None if shown.merged_energy is None else shown.merged_energy.tolist(),
                "heatmap": {"metric": shown.metric, "description": info["description"], "paper": info["paper"],
                            "k": info["k_help"], "over": shown.heatmap_scope or "this layer",
                            "rows": list(shown.tasks),
                            "columns": ([f"sigma{j + 1}" for j in range(shown.interference.shape[1])]
                                        if info["shape"] == "TxK" else list(shown.tasks)),
                            "values": shown.interference.tolist()},
                "per_layer": dict(shown.curves),
            }
        return out

    def _merge_at_default_scale(self, req: MergeRequest | None) -> dict[str, Tensor] | None:
        """The merge of ``req`` at its method's default global scale (``alpha``, AlignMerge's ``lam``), when ``req``
        is that merge scaled (no calibration, a scale other than the default and 0), else None.

        The per-layer curves (:meth:`layer_profile`: each task's SAR to the merge, the merged delta's spectral
        entropy; STI does not take the merge) do not change with the merge's scale (SAR's ``k_M`` and the entropy
        read the spectrum's shape, SAR's subspace its directions), but they are memoised per merged delta, and the
        merged deltas of every layer are decomposed again for a new one: on 8 ViT-B/32 experts, 15-16 s on 2 cores
        for each move of alpha. Measured on the merge at the default scale, which the engine rescales from its
        cache, an alpha move decomposes nothing again; the curves differ from the merge's own by float32's rounding
        of ``base + alpha * delta`` (a zero scale leaves no merged delta: its curves are its own).
        """
        if req is None or req.calibrate is not None:
            return None
        scale = next((p for p in get_method(req.method).params if p.post_scale), None)
        if scale is None:
            return None
        value = req.hparams.get(scale.name)
        if value is None or float(value) in (0.0, float(scale.default)):
            return None
        return self.merge(req.with_hparams(**{scale.name: scale.default}))

    def _merged_deltas(self, merged: Mapping[str, Tensor], keys: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``merged - base`` (float32) of every matrix layer (or of ``keys``): what the diagnostics call the merged
        delta."""
        base = self.suite.base
        return {k: merged[k].to(torch.float32) - base[k].to(torch.float32)
                for k in (self.layer_keys() if keys is None else keys)}

    def layer_profile(self, pool: TaskPool, deltas: Mapping[str, Tensor] | None) -> dict[str, Any]:
        """Per-layer curves for the app: STI (TSV eq. 7), normalised spectral entropy of each task matrix and of the
        merged delta (Ortho-Merge eq. 9), each task's SAR to the merged delta (Iso eq. 5) and its mean over the
        layers, SAR_avg (Iso sec. 3.3, Fig. 3a).

        ``deltas=None`` measures SAR against the Task Arithmetic sum. Everything comes from
        :mod:`studio.diagnostics` (memoised on the pool); this only gathers per-task values across layers.
        """
        keys = self.layer_keys()
        is_delta = True if deltas is not None else None
        base = diag.layer_curves(pool, deltas, keys, merged_is_delta=is_delta, curves=["sti", "merged_entropy"],
                                 normalized_entropy=True)
        # NaN where an expert left the layer as the base
        per_task = diag.task_curves(pool, deltas, keys, merged_is_delta=is_delta, normalized_entropy=True)
        sar = per_task["sar"]
        # Iso's SAR_avg (sec. 3.3, Fig. 3a): each task's SAR averaged over the layers its expert changed, =
        # diag.sar_avg on these keys
        sar_avg = {n: float(np.nanmean(v, dtype=np.float64)) if not np.isnan(v).all() else float("nan")
                   for n, v in sar.items()}
        return {"keys": keys, "sti": base["sti"], "merged_entropy": base["merged_entropy"],
                "entropy": per_task["entropy"], "sar": sar, "sar_avg": sar_avg,
                "sar_reference": "merge" if deltas is not None else "task arithmetic sum"}

    def _check_layer(self, layer: str) -> None:
        if not isinstance(layer, str) or layer not in self.suite.base:
            raise StudioError(f"unknown layer {brief(layer)}; matrix layers are e.g. {self.layer_keys()[:3]} "
                              f"(see /layers)")
        if layer not in self.layer_keys():
            raise StudioError(f"layer {layer!r} is not a matrix layer (shape {tuple(self.suite.base[layer].shape)}); "
                              f"choose one of e.g. {self.layer_keys()[:3]} (see /layers)")

    def spectrum(self, layer: str, experts: Sequence[str] | None = None,
                 req: MergeRequest | None = None) -> dict[str, Any]:
        """Singular values of each task matrix (and of the merged delta if ``req``) at ``layer`` (API payload)."""
        experts = tuple(req.experts if req is not None else (self.check_expert_names(experts) or self.task_names))
        self._check_layer(layer)
        pool = self.pool(experts)   # names an unknown expert
        merged = self.merge(req) if req is not None else None
        with self._lock:
            lt = pool.layer(layer)
            out: dict[str, Any] = {"layer": layer, "shape": list(lt.shape),
                                   "tasks": {n: _to_numpy(s).tolist() for n, s in zip(lt.names, diag.task_spectra(lt))}}
            if merged is not None:
                delta = merged[layer].to(torch.float32) - self.suite.base[layer].to(torch.float32)
                out["merged"] = _to_numpy(diag.spectrum(delta)).tolist()
        return out

    # ------------------------------------------------------------------ predictions
    def gallery(self, state_dict: Mapping[str, Tensor], tasks: Sequence[str], per_task: int = 4,
                upscale: int = 64) -> list[tuple[np.ndarray, str]]:
        """Sample test images per task with the merged model's prediction: ``(image, caption)`` pairs.

        Samples are evenly spaced over the test split (deterministic). Captions read ``"task ✓ pred"`` when the
        prediction is right and ``"task ✗ pred (true label)"`` when it is wrong. Small images are enlarged by
        pixel repetition so they stay crisp in the gallery.
        """
        from ..evaluate import predict

        items = []
        for t in tasks:
            images, labels = self.suite.split(t, "test")
            images, labels = _to_numpy_int(images), _to_numpy_int(labels)
            n = len(labels)
            if n == 0:
                continue
            idx = np.unique(np.linspace(0, n - 1, num=min(per_task, n)).round().astype(int))
            imgs = np.ascontiguousarray(images[idx])
            preds, _ = predict(self.suite, state_dict, t, imgs, device=self.device)
            preds = _to_numpy_int(preds)
            classes = list(self.task(t).classes)
            for img, pred, true in zip(imgs, preds, labels[idx]):
                pred_name, true_name = classes[int(pred)], classes[int(true)]
                caption = f"{t} ✓ {pred_name}" if int(pred) == int(true) else f"{t} ✗ {pred_name} (true {true_name})"
                items.append((_enlarge(img, upscale), caption))
        return items

    # ------------------------------------------------------------------ optimisation
    def optimise_alpha(self, req: MergeRequest, alphas: Sequence[float], *, split: str = "validation",
                       progress: ProgressFn | None = None) -> dict[str, Any]:
        """Sweep the method's global scale on ``split``; pick the alpha maximising the preference-weighted accuracy.

        The objective is :meth:`studio.evaluate.EvalResult.weighted_normalized`: ``sum_i p_i acc_i / ind_i`` with
        ``p`` the normalised preferences (uniform = the average normalized accuracy of TSV/Iso's validation
        protocol), as in :func:`studio.evaluate.alpha_sweep`. This loop exists because the app merges a *subset*
        of experts with a cached pool, whereas ``alpha_sweep`` merges the whole suite; ties go to the smaller alpha.
        Only the scale changes between merges, so each alpha is an engine rescale plus one evaluation.
        """
        scale = post_scale_param(self.schema(req.method))
        if scale is None:
            raise RequestError(f"{req.method} has no global scale (alpha) to optimise; choose e.g. task_arithmetic")
        name = scale["name"]
        lo = scale["low"] if scale["low"] is not None else -np.inf
        hi = scale["high"] if scale["high"] is not None else np.inf
        alphas = [float(a) for a in alphas if lo <= a <= hi]
        if not alphas:
            raise RequestError(f"no alpha inside {name}'s range [{scale['low']}, {scale['high']}] to sweep")
        prefs = dict(req.preferences) if req.preferences else {n: 1.0 for n in req.experts}
        total = sum(prefs.values())
        weights = {n: prefs.get(n, 0.0) / total for n in req.experts}
        per_task: dict[str, list[float]] = {n: [] for n in req.experts}
        accuracy: dict[str, list[float]] = {n: [] for n in req.experts}
        objective = []
        for i, a in enumerate(alphas):
            if progress is not None:
                progress(i / len(alphas), f"{name} = {a:g}")
            merged = self.merge(req.with_hparams(**{name: a}))
            res = self.evaluate(merged, req.experts, split)
            for n in req.experts:
                per_task[n].append(float(res.normalized[n]))
                accuracy[n].append(float(res.accuracy[n]))
            objective.append(float(res.weighted_normalized(weights)))
        best = best_index(objective)
        if progress is not None:
            progress(1.0, "done")
        return {"param": name, "alphas": alphas, "objective": objective, "per_task": per_task, "accuracy": accuracy,
                "best_alpha": alphas[best], "best_objective": objective[best], "split": split, "weights": weights}

    # ------------------------------------------------------------------ export
    def export(self, state_dict: Mapping[str, Tensor], req: MergeRequest, folder: str | Path,
               stem: str | None = None) -> dict[str, str]:
        """Write the merged weights (safetensors, recipe in the metadata) and the recipe (YAML) under ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        stem = stem or f"merged_{req.method}_{time.strftime('%Y%m%d-%H%M%S')}"
        recipe = req.recipe(self.suite_source)
        # the weights it merged and made, so that a replay refuses a suite whose experts changed and says whether it
        # made the same bits
        suite = self.suite_fingerprints
        inputs = {"base": suite["base"], "experts": {n: suite["experts"][n] for n in req.experts}}
        recipe = recipe.recording(inputs, fingerprint(state_dict))
        recipe_path = folder / f"{stem}.recipe.yaml"
        weights = save_merged(folder / f"{stem}.safetensors", state_dict, recipe, recipe_path=recipe_path)
        return {"weights": str(weights), "recipe": str(recipe_path)}


def _num(x: Any) -> float | None:
    """A JSON-friendly float (``None`` for missing or NaN values)."""
    if x is None:
        return None
    x = float(x)
    return None if x != x else x


def _to_numpy_int(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _enlarge(img: np.ndarray, target: int) -> np.ndarray:
    """Nearest-neighbour upscaling of a small uint8 ``[H, W, 3]`` image to about ``target`` pixels."""
    img = np.asarray(img)
    factor = max(1, int(target // max(img.shape[0], img.shape[1], 1)))
    return np.ascontiguousarray(img.repeat(factor, axis=0).repeat(factor, axis=1)) if factor > 1 else img


def metric_info(metric: str) -> dict[str, Any]:
    """What the heatmap needs from a :data:`studio.diagnostics.METRICS` entry, as plain values.

    Example:
        >>> metric_info("cosine")["signed"], metric_info("cosine")["range"]
        (True, (-1.0, 1.0))
    """
    m = diag.METRICS[metric]
    return {"description": m.description, "range": tuple(m.range), "signed": bool(m.signed), "shape": m.shape,
            "center": m.center, "uses_merged": bool(m.uses_merged), "paper": m.paper, "k_help": m.k_help}
