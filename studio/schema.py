"""Hyperparameter schemas: the single source of truth for validation, UI controls, recipes and docs.

Every merging method and calibration declares a tuple of :class:`Param`. The engine validates user values
against it (:func:`validate_hparams`), the app renders one control per param from it, recipe files store the
validated dict, and ``python -m studio methods`` prints the docs table from it.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    import torch


class StudioError(ValueError):
    """Base class for user-facing errors: the message names what was wrong and what was expected."""


class HyperparameterError(StudioError):
    """A hyperparameter is unknown, of the wrong type or outside its declared range."""


_BRIEF = reprlib.Repr()   # keyword arguments need Python 3.12
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 2, 60, 60
_BRIEF.maxlist = _BRIEF.maxtuple = _BRIEF.maxdict = _BRIEF.maxset = 6


def is_finite(value: "int | float") -> bool:
    """Whether a real number is finite as a float: an int beyond float's range (``10**400``) is not, where
    ``math.isfinite`` raises ``OverflowError``.

    Example:
        >>> is_finite(1e308), is_finite(10**400), is_finite(float("nan"))
        (True, False, False)
    """
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def brief(value: Any) -> str:
    """``repr(value)`` on one line, shortened for an error message (a mistaken 10 MB string is echoed as its first
    and last characters, a tensor's multi-line repr as one line).

    Example:
        >>> brief("x" * 500)
        "'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx'"
        >>> brief([0.5, 2]), brief(np.ones((2, 2)))
        ('[0.5, 2]', 'array([[1., 1.], [1., 1.]])')
    """
    return " ".join(_BRIEF.repr(value).split())


def check_seed(seed: Any, error: type[StudioError] = HyperparameterError) -> int:
    """``seed`` as an int: Python or NumPy integers, a one-element integer tensor, or an integral float (``3.0``, as a
    UI number box sends it), within int64 (recipes and the app's API carry it); else ``error`` naming it.

    Example:
        >>> check_seed(3), check_seed(np.int64(7)), check_seed(4.0), check_seed(np.float32(5.0))
        (3, 7, 4, 5)
    """
    value = seed
    if type(value).__module__ == "torch" and value.numel() == 1 and not value.is_floating_point():   # a tensor
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)) \
            and math.isfinite(value) and float(value).is_integer():   # 3.0, np.float32(3.0)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not -2**63 <= int(value) < 2**63:
        raise error(f"seed must be an integer in [-2^63, 2^63) (it fixes DARE's random masks), got {brief(seed)}")
    return int(value)


def check_progress(progress: Any, owner: str) -> None:
    """``progress`` must be None or a function that takes ``(fraction, message)``; a :class:`StudioError` naming
    ``owner`` otherwise (it would fail only at the first call, deep in the merge)."""
    import inspect

    if progress is None:
        return
    ok = callable(progress)
    if ok:
        try:
            inspect.signature(progress).bind(0.0, "")
        except TypeError:
            ok = False
        except ValueError:   # a builtin without a signature: trust it
            pass
    if not ok:
        raise StudioError(f"{owner}: progress must be a function taking (fraction, message), or None; got "
                          f"{brief(progress)}")


def _narrow_float(value: Any) -> "torch.dtype | None":
    """The floating dtype of a NumPy scalar or 0-d tensor narrower than Python's float (float32, float16,
    bfloat16), else None."""
    import torch

    if isinstance(value, np.floating) and value.dtype.itemsize < 8:
        return {2: torch.float16, 4: torch.float32}[value.dtype.itemsize]
    if isinstance(value, torch.Tensor) and value.dtype.is_floating_point and value.dtype.itemsize < 8:
        return value.dtype
    return None


def _rounded(x: float, dtype: "torch.dtype") -> float:
    """``x`` rounded to ``dtype`` (nearest, as a float32 literal is)."""
    import torch

    return float(torch.tensor(x, dtype=torch.float64).to(dtype))


@dataclass(frozen=True)
class Param:
    """One declared hyperparameter.

    Args:
        name: keyword name passed to the method function.
        type: ``float``, ``int``, ``str`` or ``bool``.
        default: default value; ``None`` means "automatic", resolved by the method from the number of tasks
            (the rule is written in ``auto``).
        low, high: inclusive numeric range (``None``: unbounded on that side).
        low_open: ``low`` itself is not allowed (the range is ``(low, high]``), e.g. a fraction of components
            that must keep at least some.
        high_rule: the largest value every layer accepts for ``T`` tasks, as a formula in ``T`` (``"1/T"``), where
            it is below ``high``: TSV-M keeps ``k = int(r * rank_fraction)`` components of each of ``T`` tasks in
            ``r`` dimensions, so ``T * k <= r`` (checked per layer by the method: a value a little above ``1/T`` may
            still fit every layer's rounding). The app's slider ends there and the docs table shows it; ``high``
            stays the bound :meth:`validate` checks without ``T``.
        auto_after: ``(base method, value)`` pairs where a calibration's automatic default depends on the method it
            calibrates (SVC's ``alpha``: ``1/T``, but 1.0 after ``tsv_m``); ``auto`` says so in words, the app starts
            the slider there.
        low_rule: the smallest value that keeps something on the model, as a formula in ``R``, the largest rank of
            the matrix layers the method's layer rule selects (TSV-M's ``rank_fraction``: ``"1/R"``; below it
            ``int(r * fraction) = 0`` on every layer, which the method refuses). The app's slider starts at the first
            step at or above it (0.01 on MiniSuite's rank-128 layers, 0.005 on ViT-B/32's 768).
        ui_high: where the app's slider ends, below ``high``, where the method limits this param jointly with
            another: Breadcrumbs keeps ``1 - beta - gamma`` of each row, so ``beta + gamma < 1``, and sliders of
            ``beta`` up to 0.5 and ``gamma`` up to 0.99 offered pairs it refuses (70 % of ``beta``'s slider at the
            default ``gamma``); their ``ui_high`` add up to less than 1. The library still accepts up to ``high``.
        choices: allowed values for ``str`` params.
        help: one sentence for tooltips and docs.
        paper: where the value or its default comes from (paper, equation, table, official code).
        auto: human description of the automatic default when ``default is None`` (e.g. ``"1/T"``).
        post_scale: the method's output is linear in this param (a global scale ``alpha``); the engine then
            caches the unscaled delta so that changing it is a rescale, not a re-merge.
        ui_step: slider step for the app.

    Example:
        >>> p = Param("alpha", float, 0.3, low=0.0, high=3.0, help="scaling", post_scale=True)
        >>> p.validate(0.5, "task_arithmetic")
        0.5
    """

    name: str
    type: type
    default: Any
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    help: str = ""
    paper: str = ""
    auto: str | None = None
    post_scale: bool = False
    ui_step: float | None = None
    low_open: bool = False
    high_rule: str | None = None
    ui_high: float | None = None
    low_rule: str | None = None
    auto_after: tuple[tuple[str, float], ...] = ()

    def validate(self, value: Any, owner: str) -> Any:
        """Return ``value`` coerced to the declared type, or raise :class:`HyperparameterError`."""
        if value is None:
            if self.default is None:
                return None
            raise HyperparameterError(f"{owner}: hyperparameter '{self.name}' must not be None ({self.describe()})")
        if isinstance(value, np.bool_):   # NumPy's booleans are booleans, not numbers
            value = bool(value)
        if self.type is bool:
            if not isinstance(value, bool):
                raise HyperparameterError(f"{owner}: '{self.name}' must be true or false, got {brief(value)}")
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                raise HyperparameterError(
                    f"{owner}: '{self.name}' = {brief(value)} is not allowed; expected one of "
                    f"{list(self.choices or [])}"
                )
            return value
        narrow = _narrow_float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            try:  # numpy scalars and 0-d tensors
                value = value.item()
            except (AttributeError, RuntimeError, ValueError):   # not a scalar (e.g. a tensor of several values)
                raise HyperparameterError(
                    f"{owner}: '{self.name}' must be a number ({self.describe()}), got {brief(value)}"
                ) from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):   # e.g. a complex NumPy scalar
            raise HyperparameterError(
                f"{owner}: '{self.name}' must be a number ({self.describe()}), got {brief(value)}")
        if not is_finite(value):
            raise HyperparameterError(f"{owner}: '{self.name}' must be finite ({self.describe()}), got {brief(value)}")
        if self.type is int:
            if isinstance(value, float) and not value.is_integer():   # (an int is whole however large)
                raise HyperparameterError(f"{owner}: '{self.name}' must be an integer ({self.describe()}), got "
                                          f"{brief(value)}")
            value = int(value)
        else:
            value = float(value)
            if narrow is not None:   # np.float32(0.99) is 0.9900000095...: a bound given in that precision is the bound
                for bound in (self.low, self.high):
                    if bound is not None and _rounded(value, narrow) == _rounded(bound, narrow):
                        value = float(bound)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high):
            raise HyperparameterError(
                f"{owner}: '{self.name}' = {brief(value)} is outside the allowed range {self.range_text()}"
            )
        return value

    def range_text(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = self.high_rule or ("inf" if self.high is None else f"{self.high:g}")
        return f"{'(' if self.low_open else '['}{lo}, {hi}]"

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        if self.type in (int, float):
            text = f"{self.type.__name__} in {self.range_text()}"
            return text + (f", default {self.auto}" if self.default is None and self.auto else "")
        return self.type.__name__

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description, used by ``list_methods()``, the app and the docs table."""
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "auto": self.auto,
            "low": self.low,
            "low_open": self.low_open,
            "high": self.high,
            # the allowed values as the docs table and the errors write them, e.g. "(0, 1/T]" (None: a bool, choices)
            "range": self.range_text() if self.type in (int, float) and self.choices is None else None,
            "high_rule": self.high_rule,
            "ui_high": self.ui_high,
            "low_rule": self.low_rule,
            "auto_after": dict(self.auto_after),
            "choices": list(self.choices) if self.choices is not None else None,
            "help": self.help,
            "paper": self.paper,
            "post_scale": self.post_scale,
            "ui_step": self.ui_step,
        }


def json_safe(value: Any) -> Any:
    """``value`` with every float NaN / inf replaced by ``None`` (strict JSON has no NaN token), recursively.

    Example:
        >>> json_safe({"a": float("nan"), "b": [1.0, float("inf")]})
        {'a': None, 'b': [1.0, None]}
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def validate_hparams(owner: str, params: tuple[Param, ...], given: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``given`` against ``params``: unknown names and out-of-range values raise, defaults fill in.

    Example:
        >>> validate_hparams("ties", (Param("k", float, 0.2, low=0, high=1),), {})
        {'k': 0.2}
    """
    if not isinstance(given, Mapping):
        raise HyperparameterError(f"{owner}: hyperparameters must be a mapping of names to values, got {brief(given)}")
    known = {p.name: p for p in params}
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise HyperparameterError(
            f"{owner}: unknown hyperparameter(s) {brief(unknown)}; {owner} accepts {sorted(known) or 'none'}"
        )
    return {p.name: p.validate(given.get(p.name, p.default), owner) for p in params}


@dataclass(frozen=True)
class MethodSpec:
    """A registered merging method or calibration: its function plus everything derived from the schema.

    ``kind`` is ``"merge"`` (task matrices in, merged delta out) or ``"calibration"`` (a merged delta and the task
    matrices in, a calibrated delta out). ``scope`` says which tensors the function handles: ``"all"`` for
    element-wise methods that apply to every tensor, ``"matrix"`` for spectral methods that see only the layers the
    :class:`~studio.layers.LayerRule` selects (every other tensor gets ``vector_rule``).
    """

    name: str
    fn: Any
    params: tuple[Param, ...]
    paper: str
    summary: str
    kind: str = "merge"
    scope: str = "matrix"
    vector_rule: str = "mean"
    min_experts: int = 1
    uses_seed: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "paper": self.paper,
            "summary": self.summary,
            "scope": self.scope,
            "vector_rule": self.vector_rule,
            "layer_rule": self.extra.get("layer_rule") or "default",
            "min_experts": self.min_experts,
            "params": [p.to_dict() for p in self.params],
        }
