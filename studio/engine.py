"""The merge engine: validation, the per-layer loop, calibration, preferences, caching and devices.

Methods (``studio/methods``) are pure per-layer functions; this module decides which function each tensor gets,
where it runs and what is reused between calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .layers import LayerRule, is_running_statistic, resolve_rule
from .parallel import parallel_map
from .pool import (StateDict, TaskPool, _all_finite, check_svd_mode, fingerprint, key_seed, normalize_preferences,
                   resolve_device, validate_experts)
from .registry import get_calibration, get_method
from .schema import HyperparameterError, MethodSpec, StudioError, check_progress, check_seed, validate_hparams

ProgressFn = Callable[[float, str], None]

_POOLS: "OrderedDict[Hashable, TaskPool]" = OrderedDict()
#: The pool :func:`merge` just got from :func:`get_pool` (found by the experts' fingerprint), whose
#: :meth:`~studio.pool.TaskPool.check_unchanged` :func:`merge_pool` need not repeat.
_JUST_CHECKED: "contextvars.ContextVar[TaskPool | None]" = contextvars.ContextVar("studio_just_checked", default=None)
_POOLS_LOCK = threading.Lock()
_POOL_KEEP = 2


def clear_pools() -> None:
    """Forget every cached :class:`TaskPool` (and so every cached decomposition and merge): the next merge
    decomposes afresh. Needed only after changing experts in a way :func:`studio.pool.fingerprint` does not see."""
    with _POOLS_LOCK:
        _POOLS.clear()


def get_pool(base: StateDict, experts: Mapping[str, StateDict], *, device: Any = None,
             svd_mode: str = "auto") -> TaskPool:
    """Return the cached :class:`TaskPool` for this exact expert set (and device), creating it if needed."""
    dev = resolve_device(device)
    # Keys, types and shapes first (no pass over the values), so that the fingerprint never meets a non-tensor;
    # a new pool also scans the values for NaN / inf once.
    validate_experts(base, experts, check_finite=False)
    check_svd_mode(svd_mode)
    key = (fingerprint(base, experts), str(dev), svd_mode)
    # one lock over the lookup and the construction: threads asking for one expert set at once share one pool (and
    # its decompositions), and a concurrent eviction or clear_pools() cannot pull a key from under a lookup
    with _POOLS_LOCK:
        if key in _POOLS:
            _POOLS.move_to_end(key)
            return _POOLS[key]
        pool = TaskPool(base, experts, device=dev, svd_mode=svd_mode)
        _POOLS[key] = pool
        while len(_POOLS) > _POOL_KEEP:
            _POOLS.popitem(last=False)
        return pool


def _split_post_scale(spec: MethodSpec, hp: dict[str, Any]) -> tuple[dict[str, Any], float]:
    structural = dict(hp)
    scale = 1.0
    for p in spec.params:
        if p.post_scale:
            scale = float(structural.pop(p.name))
    return structural, scale


def _magnitude(pool: TaskPool, key: str) -> str:
    """The largest |task vector| entry of ``key`` across the experts, for error messages."""
    largest = max(float(pool.raw_delta(key, i).abs().max()) for i in range(len(pool.names)))
    hint = ""
    if largest > 1e15:   # sums of squares of such entries leave float32's range (3.4e38) on a layer's rows
        hint = ("; far beyond fine-tuning deltas: products of such values overflow float32, the precision merges "
                "compute in (check the checkpoints, or scale the task vectors down)")
    return f"max |expert - base| = {largest:.3g}{hint}"


@contextlib.contextmanager
def _linalg_errors(what: str | None, pool: TaskPool, key: str) -> Iterator[None]:
    """A failed eigen- or singular-value solver (LAPACK or cuSOLVER reports no convergence) becomes a
    :class:`StudioError` naming the method, the layer and the inputs' magnitude. (Gram matrices whose float32 entries
    overflowed, task vectors near 1e19 and above, failed so until the Gram-based SVD formed them in float64 instead.)"""
    from ._cusolver import SolveError

    try:
        yield
    except (torch.linalg.LinAlgError, RuntimeError) as exc:
        if not isinstance(exc, (torch.linalg.LinAlgError, SolveError)) and "LAPACK" not in str(exc):
            raise
        raise StudioError(f"{what}: the decomposition of '{key}' failed ({exc}); {_magnitude(pool, key)}: "
                          f"the solver did not converge on this layer's matrices") from exc


def _check_rule_selects(pool: TaskPool, rule: LayerRule, who: str) -> None:
    """Refuse a layer rule that leaves none of the pool's matrices (its floating 2-D tensors of both sizes above 1) a
    matrix: a spectral method would then average every tensor as a vector, and a calibration change nothing, without
    a word (a typed pattern such as ``"weight"`` excludes them all; an audit of the layer rules)."""
    shapes = {key: tuple(pool.base[key].shape) for key in pool.keys}
    candidates = [key for key, shape in shapes.items() if len(shape) == 2 and min(shape) >= 2
                  and pool.base[key].is_floating_point() and not is_running_statistic(key)]
    if candidates and not any(rule.is_matrix(key, shapes[key]) for key in candidates):
        raise HyperparameterError(
            f"{who}: layer rule {rule.name!r} (exclude {list(rule.exclude)}) leaves none of the experts' "
            f"{len(candidates)} 2-D tensors (e.g. {candidates[0]!r}) a matrix, so {who} would treat none spectrally; "
            f"expected a rule that keeps at least one (the presets: 'default', 'skip_embeddings', 'all_matrices')")


def merge_pool(
    pool: TaskPool,
    method: str,
    *,
    calibrate: str | None = None,
    calibrate_hparams: Mapping[str, Any] | None = None,
    preferences: "Mapping[str, float] | Sequence[float] | Tensor | None" = None,
    seed: int = 0,
    layer_rule: "LayerRule | str | None" = None,
    progress: ProgressFn | None = None,
    **hparams: Any,
) -> dict[str, Tensor]:
    """Merge the experts of ``pool`` with ``method``; see :func:`studio.merge` for the arguments, except ``device``
    and ``svd_mode``, which are the pool's (:func:`get_pool`). Raises :class:`~studio.pool.ExpertError` if the
    pool's tensors changed since it was built (:meth:`~studio.pool.TaskPool.check_unchanged`)."""
    if not isinstance(pool, TaskPool):
        raise StudioError(f"merge_pool needs a TaskPool (studio.get_pool), got {type(pool).__name__}")
    of_the_pool = [name for name in ("device", "svd_mode") if name in hparams]
    if of_the_pool:
        one = len(of_the_pool) == 1
        raise StudioError(f"merge_pool: {' and '.join(of_the_pool)} {'is' if one else 'are'} the pool's (this one: "
                          f"device {str(pool.device)!r}, svd_mode {pool.svd_mode!r}); pass {'it' if one else 'them'} "
                          f"to studio.get_pool(base, experts, ...) and merge that pool, or call studio.merge")
    if _JUST_CHECKED.get() is not pool:   # studio.merge's pool was looked up by its fingerprint a moment ago
        pool.check_unchanged()
    check_progress(progress, "merge")
    spec = get_method(method)
    names = pool.names
    if len(names) < spec.min_experts:
        raise StudioError(f"{method} needs at least {spec.min_experts} experts, got {len(names)} ({list(names)})")
    hp = validate_hparams(method, spec.params, hparams)
    seed = check_seed(seed)
    structural, scale = _split_post_scale(spec, hp)
    # A method may declare its own default rule (Ortho-Merge averages embeddings); an explicit layer_rule wins.
    rule = resolve_rule(layer_rule if layer_rule is not None else spec.extra.get("layer_rule"))
    prefs = normalize_preferences(preferences, names)

    cal_spec = cal_hp = None
    if calibrate is not None:
        cal_spec = get_calibration(calibrate)
        cal_hp = validate_hparams(calibrate, cal_spec.params, calibrate_hparams or {})
    elif calibrate_hparams:
        raise HyperparameterError("calibrate_hparams were given but no calibration was chosen (calibrate=None)")
    # A calibration may declare its own default rule (the official SVC code also skips embeddings); an explicit
    # layer_rule from the caller wins.
    cal_rule = rule if (layer_rule is not None or cal_spec is None) else resolve_rule(cal_spec.extra.get("layer_rule"))
    if spec.scope == "matrix":
        _check_rule_selects(pool, rule, method)
    elif layer_rule is not None and cal_spec is None:
        warnings.warn(f"{method} treats every tensor alike: layer_rule {rule.name!r} has no effect on its merge (a "
                      f"rule chooses the matrices of the spectral methods and of a calibration)", stacklevel=3)
    if cal_spec is not None:
        _check_rule_selects(pool, cal_rule, calibrate)

    # Preferences weight the calibration when there is one (SVC / AlignMerge sec. 5.3); otherwise they weight each
    # task matrix in the base merge: w_i = p_i / max_j p_j, the most preferred task at full strength, so uniform
    # preferences leave every method unchanged and one-hot merges the target alone. (w_i = T p_i, which keeps the
    # weights' sum, gave a one-hot target T times its task matrix: TSV-M merged 8 times the target's truncation, and
    # the target task of the embedded pool fell from 74.5 % to 13.0 %, where p / max gives 99.5 %; a preferences
    # audit, docs/ENGINE.md)
    # A method that declares uses_preferences (AlignMerge-B's merge form) takes them itself, like a calibration.
    method_prefs = bool(spec.extra.get("uses_preferences"))
    weights = None
    if (prefs is not None and cal_spec is None and not method_prefs
            and not torch.equal(prefs, torch.full_like(prefs, 1 / len(names)))):
        weights = (prefs / prefs.max()).to(pool.device)
    uniform = torch.full((len(names),), 1 / len(names), dtype=torch.float32)
    cal_prefs = (prefs if prefs is not None else uniform).to(pool.device)

    tag = (method, tuple(sorted(structural.items())), None if weights is None else tuple(weights.tolist()),
           rule, seed if spec.uses_seed else None, tuple(cal_prefs.tolist()) if method_prefs else None)

    kwargs: dict[str, Any] = dict(structural)
    if method_prefs:
        kwargs["preferences"] = cal_prefs
    # A method with a model-wide last step (TIES's majority sign over the whole model) declares `finalize`: its
    # per-layer function then gets a dict `model_state` shared by one merge's layers, and finalize(deltas,
    # model_state, **structural) completes the merged deltas in place once every layer is done.
    finalize = spec.extra.get("finalize")

    def gets_method(key: str) -> bool:
        """Whether ``key`` goes through the method's per-layer function (else its ``vector_rule``)."""
        return spec.scope == "all" or rule.is_matrix(key, pool.base[key].shape)

    def merge_one(key: str, model_state: dict | None) -> Tensor | None:
        base_t = pool.base[key]
        if not base_t.is_floating_point() or is_running_statistic(key):   # finish_one's
            return None
        layer = pool.layer(key, weights)
        if gets_method(key):
            extra: dict[str, Any] = {} if model_state is None else {"model_state": model_state}
            if spec.uses_seed:
                extra["seed"] = key_seed(seed, pool.tied_key(key))   # tied weights draw the same masks
            with _linalg_errors(method, pool, key):
                return spec.fn(layer, **kwargs, **extra)
        d = layer.deltas
        return d.mean(0) if spec.vector_rule == "mean" else d.sum(0)

    def compute_unscaled() -> dict[str, Tensor]:
        keys = pool.keys
        prepare = spec.extra.get("prepare")
        if prepare is not None:  # pool-wide checks and state the per-layer function reads (TIES's model thresholds)
            prepare(pool, [key for key in keys if pool.base[key].is_floating_point() and gets_method(key)
                           and not is_running_statistic(key)], **structural)
        model_state: dict | None = None if finalize is None else {}
        report = None if progress is None else (lambda done, total: progress(0.9 * done / total, f"{method}: layers"))
        deltas = parallel_map(lambda key: merge_one(key, model_state), keys, device=pool.device, on_done=report,
                              host_bound=bool(spec.extra.get("decomposes")))
        out = {key: d for key, d in zip(keys, deltas) if d is not None}
        if finalize is not None:
            finalize(out, model_state, **structural)
        for key, d in out.items():   # finite inputs whose squares or sums leave float32's range (|x| > ~1e19)
            if not _all_finite(d):
                raise StudioError(f"{method}: the merged delta of '{key}' is not finite; the task vectors' "
                                  f"magnitudes ({_magnitude(pool, key)}) are beyond what float32 compute can "
                                  f"represent in this method")
        return out

    unscaled = pool.merged_cache(tag, compute_unscaled)

    def finish_one(key: str) -> Tensor:
        base_t = pool.base[key]
        # The delta is float32; it is added to the base in float32, or in float64 for a float64 base (so alpha = 0
        # gives a float64 base back unrounded).
        acc = torch.promote_types(torch.float32, base_t.dtype)
        statistic = base_t.is_floating_point() and is_running_statistic(key)
        if statistic:
            # A statistic of the activations, not a task vector: the experts' mean, weighted by the preferences,
            # whatever the method and its scale (merged as a task vector, a running variance went negative, and
            # BatchNorm then gave NaN: Task Arithmetic's default did on 5 of 64 channels of experts whose variances
            # were 0.3-1.2 times the base's; an audit)
            delta, factor = torch.einsum("t,t...->...", cal_prefs, pool.layer(key, None).deltas), 1.0
        elif key not in unscaled:   # non-floating buffers: the base's, on the CPU like every result
            return base_t.to("cpu", copy=True, memory_format=torch.contiguous_format)
        else:
            delta, factor = unscaled[key], scale
        if not statistic and cal_spec is not None and cal_rule.is_matrix(key, base_t.shape):
            layer = pool.layer(key, None)
            # the base method's own SVD of its delta (TSV-M's, AlignMerge-O's, AlignMerge-B's factors), where this key
            # got its per-layer function; called with the method's own keyword arguments
            svd_of = spec.extra.get("merged_svd")
            merged_svd = None if svd_of is None or not gets_method(key) \
                else (lambda merged: svd_of(layer, merged, **kwargs))
            with _linalg_errors(calibrate, pool, key):
                delta = cal_spec.fn(layer, delta, scale=scale, preferences=cal_prefs, base_method=method,
                                    merged_tag=(tag, key), merged_svd=merged_svd, **cal_hp)
            out = (pool.tensor(None, key).to(acc) + delta.to(acc)).to("cpu", base_t.dtype)
        else:
            # delta * factor is a fresh tensor: add the base in place (cached deltas are never modified)
            out = (delta.to(acc) * factor).add_(pool.tensor(None, key).to(acc)).to("cpu", base_t.dtype)
        # a calibration's output, and a half-precision result (which can overflow on the cast), are checked here;
        # a plain float32 / float64 result is finite when its delta is (checked once, above)
        if (cal_spec is not None or base_t.dtype in (torch.float16, torch.bfloat16)) and not _all_finite(out):
            why = ("the base plus the scaled delta leaves the dtype's range: lower the scale or merge in float32"
                   if cal_spec is None else f"the calibration overflowed ({_magnitude(pool, key)})")
            raise StudioError(f"{calibrate or method}: the merged '{key}' is not finite in {base_t.dtype}: {why}")
        # contiguous, whatever the strides of the base's and the experts' tensors (a view's): safetensors'
        # save_file refuses a non-contiguous tensor
        return out.contiguous()

    report = None if progress is None else (
        lambda done, total: progress(0.9 + 0.1 * done / total, f"{calibrate or method}: finishing"))
    host_bound = cal_spec is not None and bool(cal_spec.extra.get("decomposes"))
    merged = dict(zip(pool.base, parallel_map(finish_one, list(pool.base), device=pool.device, on_done=report,
                                              host_bound=host_bound)))
    if progress is not None:
        progress(1.0, f"{method}: done")
    return merged


def merge(
    base: StateDict,
    experts: Mapping[str, StateDict],
    method: str,
    *,
    device: Any = None,
    calibrate: str | None = None,
    calibrate_hparams: Mapping[str, Any] | None = None,
    preferences: "Mapping[str, float] | Sequence[float] | Tensor | None" = None,
    seed: int = 0,
    layer_rule: "LayerRule | str | None" = None,
    svd_mode: str = "auto",
    progress: ProgressFn | None = None,
    **hparams: Any,
) -> dict[str, Tensor]:
    """Merge fine-tuned experts into one state dict.

    Args:
        base: the pretrained state dict.
        experts: mapping task name -> fine-tuned state dict (the base's keys and shapes).
        method: a registered method name (see :func:`studio.list_methods`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, or ``None`` / ``"auto"`` (``$MERGE_STUDIO_DEVICE`` when set,
            else CUDA when present).
            Compute is float32 for any input dtype.
        calibrate: a calibration applied after the base method on every matrix layer (``"svc"``,
            ``"align_merge_b"``), or ``None``. It calibrates the base method's final delta, the method's scale
            (``alpha``) included, and adds the result as it is (as the official SVC code does after ``0.3 * TA``).
        calibrate_hparams: the calibration's hyperparameters (validated against its schema).
        preferences: non-negative per-task weights (mapping name -> weight, or a sequence in expert order). A task a
            mapping does not name gets weight 0, so ``{"digits": 1}`` is the one-hot target-task setting; name every
            task (or pass a sequence) to keep them all. With a calibration they weight its per-task aggregation (one-hot
            = the papers' target-task calibration); without one they scale each task matrix by ``p_i / max_j p_j`` (the
            most preferred task at full strength; one-hot merges that task alone), except in AlignMerge-B's merge form
            (``align_merge_b``), which takes the p-weighted average of its per-task coefficients as its calibration form
            does. ``align_merge_b`` with a calibration gives the weights to both. Uniform (the default) changes nothing.
        seed: random seed for stochastic methods (DARE). Each of DARE's tasks draws its mask from a stream of its
            own per layer (the seed, the key and the expert's name), so the experts' order, and which other experts
            are merged, leave it as it is.
        layer_rule: which 2-D tensors get the spectral treatment (:mod:`studio.layers`); ``None``: the method's and
            the calibration's own default (the TSV/Iso rule, except Ortho-Merge and SVC: ``"skip_embeddings"``). The
            elementwise methods treat every tensor alike: given to one of them without a calibration, a rule does
            nothing (a warning says so). A rule that leaves none of the experts' 2-D tensors a matrix is refused.
        svd_mode: ``"auto"`` (top-k SVDs from the Gram matrix's eigendecomposition where only top components are kept,
            :func:`studio.linalg.gram_svd`) or ``"exact"`` (LAPACK's SVD, as the official code). They agree to float32
            accuracy on full fine-tunes; where an expert's task matrix is rank-deficient (LoRA-style experts)
            ``"exact"`` reproduces the official code, which then keeps the arbitrary null-space vectors LAPACK returns,
            and ``"auto"`` keeps only directions above float32 resolution (:func:`studio.linalg.null_tolerance`) and
            above each expert's stored rounding (:meth:`~studio.pool.LayerTasks.rounding_cut`). In both modes the engine
            leaves out the null space of a rank-deficient sum (Iso-C, Iso-CTS; the official code gives ``sigma_bar`` to
            it too), a low-rank task's components past its rank (Iso-CTS, AlignMerge-O and Ortho-Merge, which have no
            official code) and dependent columns in TSV-M's and Iso-CTS's whitening (docs/ENGINE.md, "Precision and SVD
            modes"). Singular values that are exactly zero (a layer an expert left unchanged, a task with preference
            weight 0) are left out in both modes: the official TSV-M and Iso-CTS keep LAPACK's arbitrary vectors for
            them (the identity's columns on a CPU) and whiten the other tasks' directions against those. So a preference
            weight of exactly 0 is not the limit of small weights there: any weight above 0 keeps the task's directions
            in the whitening (only its singular values shrink), and 0 takes them out (TSV-M at weights
            ``[1, 1, 1e-6, 1]`` and ``[1, 1, 0, 1]`` differed by 48-49% on small random experts: docs/ACCURACY.md, "A
            preference weight of 0 against a small one"); so in AlignMerge-O's aligned basis (36-40%), and TIES's
            ``merge_func="mean"`` counts a task of weight 1e-6 among those that agree on a sign, not one of weight 0
            (15-17%; the other methods within 1e-4 there). Nor is weight 0 the same as leaving the expert out: ``T``
            still counts it (TSV-M's ``k`` and Iso-CTS's ``s`` are sized for ``T`` tasks and the zero task's share
            stays empty; Task Arithmetic's sum is the same, weight averaging's mean divides by ``T``).
        progress: optional callback ``(fraction, message)``.
        **hparams: the method's hyperparameters (validated against its schema).

    Returns:
        The merged state dict, with the base's keys, shapes and dtypes (on the CPU).

    Example:
        >>> import torch, studio
        >>> base = {"w": torch.zeros(2, 2)}
        >>> experts = {"a": {"w": torch.eye(2)}, "b": {"w": -torch.eye(2)}}
        >>> studio.merge(base, experts, "task_arithmetic", alpha=1.0)["w"].tolist()
        [[0.0, 0.0], [0.0, 0.0]]
    """
    get_method(method)  # fail fast on an unknown name, before any validation work
    pool = get_pool(base, experts, device=device, svd_mode=svd_mode)
    token = _JUST_CHECKED.set(pool)
    try:
        return merge_pool(pool, method, calibrate=calibrate, calibrate_hparams=calibrate_hparams,
                          preferences=preferences, seed=seed, layer_rule=layer_rule, progress=progress, **hparams)
    finally:
        _JUST_CHECKED.reset(token)
