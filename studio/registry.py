"""The method registry: a method registers itself where it is defined, once, with its schema.

Example:
    >>> from studio.registry import get_method
    >>> get_method("tsv_m").paper.startswith("Task Singular Vectors")
    True
"""

from __future__ import annotations

from typing import Any, Callable

from .schema import MethodSpec, Param, StudioError, brief

METHODS: dict[str, MethodSpec] = {}
CALIBRATIONS: dict[str, MethodSpec] = {}


class UnknownMethodError(StudioError):
    """The requested merging method or calibration is not registered."""


def register(
    name: str,
    *,
    params: tuple[Param, ...] = (),
    paper: str,
    summary: str,
    kind: str = "merge",
    scope: str = "matrix",
    vector_rule: str = "mean",
    min_experts: int = 1,
    uses_seed: bool = False,
    **extra: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a per-layer method function under ``name``.

    ``kind="merge"``: ``fn(layer: LayerTasks, **hparams) -> Tensor`` (the unscaled merged delta; a ``post_scale``
    param such as ``alpha`` is applied by the engine, not by ``fn``).
    ``kind="calibration"``: ``fn(layer, merged, *, scale, preferences, base_method, merged_tag, merged_svd,
    **hparams) -> Tensor`` returns the final delta of one layer given the base method's unscaled ``merged`` delta and
    its global ``scale``.
    ``scope``: ``"all"`` (element-wise, every tensor) or ``"matrix"`` (only layers the layer rule selects; other
    tensors get ``vector_rule``: ``"mean"`` of the task vectors, as the TSV/Iso official code does).
    ``extra`` keys the engine reads: ``prepare`` and ``finalize`` (model-wide steps, see
    :func:`studio.engine.merge_pool`; ``prepare(pool, keys, **structural)`` runs before the layer loop, ``keys`` the
    layers the per-layer function will get), ``layer_rule`` (the default rule), ``decomposes=True`` (the per-layer
    function decomposes matrices: on CUDA its layers run on worker threads, whose eigensolves the host solves side by
    side, :mod:`studio.parallel`), ``merged_svd`` (a merge method's
    ``fn(layer, merged, **kwargs) -> (U, S, Vh) | None``, ``kwargs`` the keyword arguments the method's ``fn`` gets
    (its structural hyperparameters; ``preferences`` too for a method that takes them): the thin SVD of its unscaled
    merged delta ``merged`` from its own factors, descending, or ``None``; a calibration after it then takes its
    subspaces from there instead of decomposing the merged delta, :func:`studio.methods._align.merged_spectrum`).
    A calibration's ``fn`` also gets ``merged_tag`` (memoisation key of the merged delta) and ``merged_svd`` (that
    method's ``merged_svd`` bound to the layer and hyperparameters, or ``None``).
    """
    if kind not in ("merge", "calibration"):
        raise ValueError(f"kind must be 'merge' or 'calibration', got {kind!r}")
    if scope not in ("all", "matrix"):
        raise ValueError(f"scope must be 'all' or 'matrix', got {scope!r}")
    if vector_rule not in ("mean", "sum"):
        raise ValueError(f"vector_rule must be 'mean' or 'sum', got {vector_rule!r}")
    if sum(p.post_scale for p in params) > 1:
        raise ValueError(f"{name}: at most one post_scale param")
    table = METHODS if kind == "merge" else CALIBRATIONS

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        if name in table:
            raise ValueError(f"{kind} '{name}' registered twice")
        table[name] = MethodSpec(
            name=name, fn=fn, params=tuple(params), paper=paper, summary=summary, kind=kind, scope=scope,
            vector_rule=vector_rule, min_experts=min_experts, uses_seed=uses_seed, extra=extra,
        )
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    """Look up a merging method; raise :class:`UnknownMethodError` listing the known names."""
    from . import methods  # noqa: F401  (importing the package registers every method)

    if not isinstance(name, str) or name not in METHODS:
        hint = f" ({name!r} is a calibration: apply it after a merging method, calibrate={name!r}, the CLI's " \
               f"--calibrate {name})" if isinstance(name, str) and name in CALIBRATIONS else ""
        raise UnknownMethodError(f"unknown merging method {brief(name)}{hint}; known methods: {sorted(METHODS)}")
    return METHODS[name]


def get_calibration(name: str) -> MethodSpec:
    """Look up a calibration step (applied after any base method)."""
    from . import methods  # noqa: F401

    if not isinstance(name, str) or name not in CALIBRATIONS:
        hint = f" ({name!r} is a merging method, not a calibration)" if isinstance(name, str) and name in METHODS \
            else ""
        raise UnknownMethodError(f"unknown calibration {brief(name)}{hint}; known calibrations: "
                                 f"{sorted(CALIBRATIONS)}")
    return CALIBRATIONS[name]


def list_methods() -> list[dict[str, Any]]:
    """Every registered merging method and calibration with its paper reference and hyperparameter schema.

    Each entry has ``name`` and ``kind`` (``"merge"`` or ``"calibration"``: ``align_merge_b`` is both, so a table of
    them is keyed by the two), ``paper``, ``summary``, ``scope`` (``"all"`` tensors or the ``"matrix"`` layers),
    ``vector_rule`` (what the other tensors get), ``layer_rule`` (its default layer rule's preset name),
    ``min_experts`` and ``params``: per hyperparameter its ``name``, ``type``, ``default`` (``None``: automatic, the
    rule in ``auto``; ``auto_after``: the automatic value after a given base method), ``range`` (the allowed values as
    errors write them, e.g. ``"(0, 1/T]"``; its parts in ``low``, ``low_open``, ``high`` and ``high_rule``),
    ``choices``, ``help`` and ``paper``, and what the app's control needs (``ui_step``, ``ui_high``, ``low_rule``,
    ``post_scale``).

    Example:
        >>> names = [m["name"] for m in list_methods()]
        >>> "tsv_m" in names and "svc" in names
        True
    """
    from . import methods  # noqa: F401

    return [spec.to_dict() for spec in list(METHODS.values()) + list(CALIBRATIONS.values())]
