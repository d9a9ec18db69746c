"""Per-task evaluation of merged image encoders with the suite's fixed heads, and alpha sweeps.

Metrics (all accuracies in percent):

* absolute accuracy per task and its average;
* normalized accuracy (TSV, Gargiulo et al. 2025, eq. 10): ``acc_merged(t) / acc_expert_t(t)``, in percent;
* NAI, normalized accuracy improvement (Iso-C/CTS, Marczak et al. 2025, eq. 4):
  ``(acc_merged - acc_zeroshot) / (acc_expert - acc_zeroshot)``, in percent; NaN where the expert does not beat
  zero-shot (the official ``nai`` divides anyway, which flips the sign of a negative gain);
* KL information loss (Ortho-Merge, eq. 10-11): ``E_{x ~ D_t} KL(P_t(y|x) || P_merged(y|x))`` in nats, where ``P_t``
  is expert ``t``'s softmax over task ``t``'s classes and ``D_t`` the evaluated split of task ``t`` (the probe set).

The expert and zero-shot references (predictions, probabilities, accuracies) are computed once per suite, split and
device and cached, so evaluating one merged model costs one forward pass over each task's images.

Example:
    >>> from studio.suite import default_suite                      # doctest: +SKIP
    >>> suite = default_suite()                                     # doctest: +SKIP
    >>> res = evaluate(suite, suite.experts["digits"], tasks=["digits"])   # doctest: +SKIP
    >>> res.avg_normalized                                          # doctest: +SKIP
    100.0
"""

from __future__ import annotations

import math
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pool import fingerprint, normalize_preferences, resolve_device
from .schema import StudioError, brief
from .suite.core import EmptySplitError, Suite, SuiteError, UnknownTaskError
from .suite.model import check_architecture, head_logits, preprocess

StateDict = Mapping[str, Tensor]
_DEFAULT_BATCH = 1024


@dataclass
class EvalResult:
    """Evaluation of one model on some tasks of a suite (accuracies in percent, KL in nats).

    ``accuracy``, ``normalized``, ``nai``, ``kl`` map task -> value; ``avg_*`` are unweighted means over ``tasks``
    (NaN entries, e.g. NAI where an expert does not beat zero-shot, are skipped). ``expert_accuracy`` and
    ``zeroshot_accuracy`` are the references on the same split; ``predictions`` holds the predicted labels.
    """

    tasks: list[str]
    split: str
    accuracy: dict[str, float]
    normalized: dict[str, float]
    nai: dict[str, float]
    kl: dict[str, float]
    expert_accuracy: dict[str, float]
    zeroshot_accuracy: dict[str, float]
    num_images: dict[str, int]
    predictions: dict[str, Tensor] = field(default_factory=dict, repr=False)
    seconds: float = 0.0

    @staticmethod
    def _mean(values: Mapping[str, float]) -> float:
        vals = [v for v in values.values() if not math.isnan(v)]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    @property
    def avg_accuracy(self) -> float:
        return self._mean(self.accuracy)

    @property
    def avg_normalized(self) -> float:
        return self._mean(self.normalized)

    @property
    def avg_nai(self) -> float:
        return self._mean(self.nai)

    @property
    def avg_kl(self) -> float:
        return self._mean(self.kl)

    def weighted_normalized(self, weights: Mapping[str, float] | None = None) -> float:
        """Preference-weighted average normalized accuracy (weights renormalised over the evaluated tasks)."""
        if not weights:
            return self.avg_normalized
        total = sum(float(weights.get(t, 0.0)) for t in self.tasks)
        if total <= 0:
            raise StudioError(f"objective weights {dict(weights)} give no positive weight to the evaluated tasks "
                              f"{self.tasks}")
        # a task without a normalized accuracy (an expert at 0 %) is left out, as in avg_normalized
        kept = [t for t in self.tasks if not math.isnan(self.normalized[t])]
        total = sum(float(weights.get(t, 0.0)) for t in kept)
        if total <= 0:
            return float("nan")
        return float(sum(float(weights.get(t, 0.0)) * self.normalized[t] for t in kept) / total)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no predictions)."""
        return {
            "tasks": list(self.tasks), "split": self.split,
            "accuracy": dict(self.accuracy), "normalized": dict(self.normalized), "nai": dict(self.nai),
            "kl": dict(self.kl), "expert_accuracy": dict(self.expert_accuracy),
            "zeroshot_accuracy": dict(self.zeroshot_accuracy), "num_images": dict(self.num_images),
            "avg_accuracy": self.avg_accuracy, "avg_normalized": self.avg_normalized, "avg_nai": self.avg_nai,
            "avg_kl": self.avg_kl, "seconds": self.seconds,
        }


@dataclass
class _Reference:
    probs: Tensor         # [N, C] softmax of the reference model
    log_probs: Tensor     # [N, C]
    accuracy: float
    correct: int          # images it classifies right (normalized accuracy is a ratio of counts)


class _SuiteEvaluator:
    """Per-suite cache: preprocessed images, a reusable model per device, expert and zero-shot references."""

    def __init__(self, suite: Suite):
        # a weak reference: _EVALUATORS is keyed weakly by the suite, and a strong one here kept every evaluated
        # suite (its images, models and references) alive for the life of the process
        self._suite = weakref.ref(suite)
        self.lock = threading.RLock()
        self.inputs: dict[tuple[str, str, str], tuple[Tensor, Tensor]] = {}
        self.models: dict[str, nn.Module] = {}
        self.refs: dict[tuple[str, str, str, str], tuple[Any, _Reference]] = {}

    @property
    def suite(self) -> Suite:
        suite = self._suite()
        assert suite is not None, "the evaluator outlived its suite"   # callers hold the suite
        return suite

    def data(self, task: str, split: str, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (task, split, str(device))
        if key not in self.inputs:
            images, labels = self.suite.split(task, split)
            self.inputs[key] = (preprocess(images, device), labels.to(device))
        return self.inputs[key]

    def model(self, state_dict: StateDict, device: torch.device) -> nn.Module:
        key = str(device)
        if key not in self.models:
            self.models[key] = self.suite.build_model(state_dict, device=device)
        else:
            self.suite.tower.load(self.models[key], state_dict)
        return self.models[key]

    @torch.inference_mode()
    def log_probs(self, state_dict: StateDict, tasks: Sequence[str], split: str, device: torch.device,
                  batch_size: int) -> dict[str, Tensor]:
        """Log-softmax outputs per task: one forward pass over each task's images."""
        model = self.model(state_dict, device)
        out = {}
        for task in tasks:
            x, _ = self.data(task, split, device)
            emb = torch.cat([model(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
            head = _task_head(self.suite, task, emb.shape[-1]).to(device)
            out[task] = F.log_softmax(head_logits(emb.float(), head, self.suite.logit_scale), dim=-1)
        return out

    def reference(self, kind: str, task: str, split: str, device: torch.device, batch_size: int) -> _Reference:
        # the task's expert alone: a suite expert that is not evaluated is not read (nor its file's fault an error)
        sd = self.suite.base if kind == "zeroshot" else self.suite.experts_named([task])[task]
        # keyed by the identity of the weights and of the task's head (storage, version counter, samples:
        # studio.pool.fingerprint) and the logit scale, so a suite whose base, experts or heads are replaced or
        # edited in place gets fresh references, not stale ones
        key = (kind, task, split, str(device))
        scale = self.suite.logit_scale
        tag = (fingerprint(sd, {}), fingerprint({"head": self.suite.heads[task]}, {}),
               float(scale) if not isinstance(scale, Tensor) else fingerprint({"scale": scale}, {}))
        found = self.refs.get(key)
        if found is None or found[0] != tag:
            files = self.suite.weight_files
            what = (f"the suite's base ({files['base']})" if kind == "zeroshot" else
                    f"expert {task!r} ({files['experts'][task]})")
            check_architecture(self.suite.tower.reference, sd, what=what)   # named, not as the evaluated weights
            lp = self.log_probs(sd, [task], split, device, batch_size)[task]
            _, labels = self.data(task, split, device)
            _check_outputs(lp, kind if kind == "zeroshot" else f"expert '{task}'", task, sd)
            correct = _correct(lp.argmax(-1), labels)
            self.refs[key] = (tag, _Reference(lp.exp(), lp, _percent(correct, labels), correct))
        return self.refs[key][1]


def _task_head(suite: Suite, task: str, dim: int) -> Tensor:
    """The head ``[C, D]`` of ``task``, whose ``D`` must be the model's embedding size ``dim``."""
    head = suite.heads[task]
    if head.shape[-1] != dim:
        raise SuiteError(f"{suite.root}/heads.safetensors: the head of task {task!r} is {tuple(head.shape)}; the "
                         f"model {suite.model_name!r} embeds images in {dim} dimensions ([{head.shape[0]}, {dim}])")
    return head


def _correct(pred: Tensor, labels: Tensor) -> int:
    """The number of correct predictions."""
    return int((pred == labels).sum())


def _percent(correct: int, labels: Tensor) -> float:
    """Percent of correct predictions, from the exact count (not a float32 mean)."""
    return 100.0 * correct / max(1, labels.numel())


def _check_outputs(log_probs: Tensor, what: str, task: str, state_dict: StateDict) -> None:
    """A model whose outputs are not finite (NaN/inf weights, an overflowing merge) has no accuracy: argmax would
    pick class 0 and score chance level as if it were a result."""
    if bool(torch.isfinite(log_probs).all()):
        return
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    where = f"; non-finite weights in {bad[:3]}{' ...' if len(bad) > 3 else ''}" if bad else ""
    raise StudioError(f"the {what} model's outputs on task '{task}' are not finite (NaN or inf){where}; "
                      f"nothing to evaluate")


_EVALUATORS: "weakref.WeakKeyDictionary[Suite, _SuiteEvaluator]" = weakref.WeakKeyDictionary()
_EVAL_LOCK = threading.Lock()


def _evaluator(suite: Suite) -> _SuiteEvaluator:
    with _EVAL_LOCK:
        ev = _EVALUATORS.get(suite)
        if ev is None:
            ev = _EVALUATORS[suite] = _SuiteEvaluator(suite)
        return ev


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StudioError(f"batch_size must be an integer >= 1, got {brief(batch_size)}")


def _check_split(split: str) -> None:
    if split not in ("validation", "test"):
        raise EmptySplitError(f"unknown split {brief(split)}; expected 'validation' or 'test'")


def evaluate(suite: Suite, state_dict: StateDict, *, tasks: Sequence[str] | None = None, split: str = "test",
             device: "str | torch.device | None" = None, batch_size: int = _DEFAULT_BATCH) -> EvalResult:
    """Evaluate an image-encoder state dict on the suite's tasks with the fixed heads.

    Computes absolute accuracy, normalized accuracy (TSV eq. 10), NAI (Iso eq. 4) and the KL information loss
    against each task's expert (Ortho-Merge eq. 10), all per task and averaged. Expert and zero-shot references are
    cached per suite, split and device.

    Args:
        suite: a loaded :class:`~studio.suite.Suite`.
        state_dict: ``visual.*`` state dict of the suite's architecture (e.g. the output of :func:`studio.merge`).
        tasks: subset of task names (default: all, in suite order).
        split: ``"test"`` (reported numbers) or ``"validation"`` (model selection).
        device: ``"cpu"``, ``"cuda"`` or ``None`` (``$MERGE_STUDIO_DEVICE`` if set, else CUDA when present).
        batch_size: images per forward pass.

    Raises:
        UnknownTaskError, EmptySplitError, ArchitectureError (wrong keys/shapes), StudioError (bad device).

    Example:
        >>> suite = default_suite()                                              # doctest: +SKIP
        >>> evaluate(suite, suite.base, tasks=["digits"]).accuracy["digits"]     # doctest: +SKIP
        18.333333333333332
    """
    t0 = time.perf_counter()
    _check_split(split)
    names = suite.check_tasks(tasks)
    dev = resolve_device(device)
    _check_batch_size(batch_size)
    check_architecture(suite.tower.reference, state_dict)  # fail fast, before any reference is computed
    ev = _evaluator(suite)
    with ev.lock:
        refs = {t: (ev.reference("expert", t, split, dev, batch_size), ev.reference("zeroshot", t, split, dev,
                                                                                  batch_size)) for t in names}
        log_probs = ev.log_probs(state_dict, names, split, dev, batch_size)
        acc, norm, nai, kl, count, preds = {}, {}, {}, {}, {}, {}
        for t in names:
            lp = log_probs[t]
            _check_outputs(lp, "evaluated", t, state_dict)
            _, labels = ev.data(t, split, dev)
            pred = lp.argmax(-1)
            correct = _correct(pred, labels)
            a = _percent(correct, labels)
            expert, zs = refs[t]
            acc[t] = a
            # TSV eq. 10 as a ratio of counts on the same images (an expert on its own task: exactly 100)
            norm[t] = 100.0 * correct / expert.correct if expert.correct > 0 else float("nan")
            gain = expert.accuracy - zs.accuracy
            nai[t] = 100.0 * (a - zs.accuracy) / gain if gain > 0 else float("nan")
            # KL(P_expert || P_merged) averaged over the probe images (Ortho-Merge eq. 10-11)
            kl[t] = float((expert.probs * (expert.log_probs - lp)).sum(-1).clamp_min(0).mean())
            count[t] = int(labels.numel())
            preds[t] = pred.cpu()
        return EvalResult(
            tasks=names, split=split, accuracy=acc, normalized=norm, nai=nai, kl=kl,
            expert_accuracy={t: refs[t][0].accuracy for t in names},
            zeroshot_accuracy={t: refs[t][1].accuracy for t in names},
            num_images=count, predictions=preds, seconds=time.perf_counter() - t0,
        )


def reference_accuracy(suite: Suite, kind: str, *, tasks: Sequence[str] | None = None, split: str = "test",
                       device: "str | torch.device | None" = None) -> dict[str, float]:
    """Cached accuracy (%) of the ``"expert"`` (each on its own task) or ``"zeroshot"`` references per task."""
    if kind not in ("expert", "zeroshot"):
        raise StudioError(f"reference kind must be 'expert' or 'zeroshot', got {brief(kind)}")
    _check_split(split)
    names = suite.check_tasks(tasks)
    dev = resolve_device(device)
    ev = _evaluator(suite)
    with ev.lock:
        return {t: ev.reference(kind, t, split, dev, _DEFAULT_BATCH).accuracy for t in names}


def predict(suite: Suite, state_dict: StateDict, task: str, images: Tensor,
            *, device: "str | torch.device | None" = None) -> tuple[Tensor, Tensor]:
    """Predicted labels ``[N]`` and class probabilities ``[N, C]`` of a model on ``images`` of ``task``.

    ``images``: uint8 ``[N, H, W, 3]`` or one ``[H, W, 3]`` image (tensor or numpy array).

    Example:
        >>> suite = default_suite()                                          # doctest: +SKIP
        >>> imgs, labels = suite.split("signs", "test")                      # doctest: +SKIP
        >>> pred, prob = predict(suite, suite.experts["signs"], "signs", imgs[:4])   # doctest: +SKIP
    """
    suite.task(task)
    dev = resolve_device(device)
    try:
        x = torch.as_tensor(images)
    except (TypeError, ValueError, RuntimeError):
        raise StudioError(f"images must be a uint8 tensor or array [N, H, W, 3], got {brief(images)}") from None
    if x.dim() == 3:
        x = x.unsqueeze(0)
    size = suite.image_size
    if x.dim() != 4 or x.shape[-1] != 3 or x.shape[1] != size or x.shape[2] != size:
        raise StudioError(f"images must be uint8 [N, {size}, {size}, 3] (or one [{size}, {size}, 3]), "
                          f"got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise StudioError(f"images must be uint8 (0..255), got {x.dtype}")
    if x.shape[0] == 0:
        raise EmptySplitError("predict() got an empty batch of images")
    ev = _evaluator(suite)
    with ev.lock, torch.inference_mode():
        model = ev.model(state_dict, dev)
        emb = model(preprocess(x, dev))
        logits = head_logits(emb.float(), _task_head(suite, task, emb.shape[-1]).to(dev), suite.logit_scale)
        _check_outputs(logits, "given", task, state_dict)
        probs = F.softmax(logits, dim=-1)
    # clones made outside inference mode: callers may edit them in place (an inference tensor refuses that)
    return probs.argmax(-1).cpu().clone(), probs.cpu().clone()


@dataclass
class SweepResult:
    """An alpha sweep: one :class:`EvalResult` per alpha, the objective curve and the best alpha."""

    method: str
    param: str
    alphas: list[float]
    results: list[EvalResult]
    objective: list[float]
    best_alpha: float
    best: EvalResult
    split: str
    weights: dict[str, float] | None = None

    @property
    def curve(self) -> list[dict[str, float]]:
        """Rows ``{alpha, objective, avg_accuracy, avg_normalized}`` in sweep order."""
        return [{"alpha": a, "objective": o, "avg_accuracy": r.avg_accuracy, "avg_normalized": r.avg_normalized}
                for a, r, o in zip(self.alphas, self.results, self.objective)]

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "param": self.param, "split": self.split, "best_alpha": self.best_alpha,
                "weights": self.weights, "curve": self.curve}


def post_scale_param(method: str) -> str | None:
    """Name of ``method``'s global-scale hyperparameter (``post_scale=True``, usually ``alpha``), or ``None``."""
    from .registry import get_method

    for p in get_method(method).params:
        if p.post_scale:
            return p.name
    return None


def best_index(objective: Sequence[float]) -> int:
    """Index of the largest objective, the first among equals; NaN ranks below every number.

    Example:
        >>> best_index([float("nan"), 0.5, 0.7, 0.7])
        2
    """
    return max(range(len(objective)), key=lambda i: (-math.inf if math.isnan(objective[i]) else objective[i], -i))


def alpha_sweep(suite: Suite, method: str, alphas: Sequence[float], *, split: str = "validation",
                tasks: Sequence[str] | None = None, preferences: Mapping[str, float] | None = None,
                objective_weights: Mapping[str, float] | None = None, device: "str | torch.device | None" = None,
                batch_size: int = _DEFAULT_BATCH, **merge_kwargs: Any) -> SweepResult:
    """Merge the suite's experts with ``method`` for each global scale in ``alphas`` and pick the best one.

    The objective is the average normalized accuracy on ``split`` (validation by default, as in the TSV/Iso
    protocol), or its preference-weighted version. Only the global scale changes between merges, so the engine's
    unscaled-delta cache makes every alpha after the first a rescale.

    Args:
        method: a registered method with a ``post_scale`` parameter (e.g. ``task_arithmetic``'s ``alpha``).
        alphas: candidate values (e.g. ``[0.1, 0.2, ..., 1.0]``).
        tasks: tasks to evaluate (default all); the merge always uses every expert of the suite.
        preferences: per-task weights passed to the merge (see :func:`studio.merge`) and used as objective weights.
        objective_weights: per-task objective weights overriding ``preferences`` for the selection only.
        **merge_kwargs: other hyperparameters of ``method`` / :func:`studio.merge` (``calibrate=...``).

    Ties are broken towards the first best in ``alphas`` order (the smaller alpha for a sorted grid); an alpha
    whose objective is NaN is never chosen over one that has a value.

    Example:
        >>> sweep = alpha_sweep(default_suite(), "task_arithmetic", [0.2, 0.3, 0.4])   # doctest: +SKIP
        >>> sweep.best_alpha                                                          # doctest: +SKIP
        0.2
    """
    from .engine import merge

    param = post_scale_param(method)
    if param is None:
        raise StudioError(f"method {brief(method)} has no global scale (post_scale) hyperparameter to sweep")
    if param in merge_kwargs:
        raise StudioError(f"pass the values of {param!r} through alphas, not as a keyword")
    try:
        values = [float(a) for a in alphas]
    except (TypeError, ValueError, OverflowError):
        raise StudioError(f"alphas must be a sequence of numbers, got {brief(alphas)}") from None
    if not values:
        raise StudioError("alpha_sweep needs at least one alpha value")
    if not all(math.isfinite(a) for a in values):
        raise StudioError(f"alphas must be finite, got {brief(values)}")
    _check_split(split)
    _check_batch_size(batch_size)   # before any merge
    if split == "test":
        warnings.warn("alpha_sweep on the test split chooses alpha on the numbers it then reports (an oracle "
                      "upper bound); the papers and the leaderboard choose it on 'validation'", stacklevel=2)
    names = suite.check_tasks(tasks)
    weights = None
    if objective_weights is not None or preferences is not None:
        # the same forms as the merge's preferences (a mapping, or one weight per expert in order), checked the same
        # way; the objective uses them as given (a task the mapping leaves out counts 0)
        given = objective_weights if objective_weights is not None else preferences
        what = "objective_weights" if objective_weights is not None else "preferences"
        if isinstance(given, Mapping):
            unknown = sorted(set(map(str, given)) - set(suite.task_names))
            if unknown:
                raise UnknownTaskError(f"{what} name unknown task(s) {brief(unknown)}; tasks: {suite.task_names}")
        normalize_preferences(given, list(suite.experts), what=what)   # raises on anything a merge would refuse
        raw = given.tolist() if isinstance(given, (Tensor, np.ndarray)) else given
        weights = {str(k): float(v) for k, v in (raw.items() if isinstance(raw, Mapping) else zip(suite.experts, raw))}
        if not any(weights.get(t, 0.0) > 0 for t in names):   # the objective would be NaN at every alpha
            raise StudioError(f"{what} give every evaluated task ({names}) weight 0; the objective needs one")
    results, objective = [], []
    for a in values:
        merged = merge(suite.base, suite.experts, method, preferences=preferences, **{param: a}, **merge_kwargs)
        res = evaluate(suite, merged, tasks=names, split=split, device=device, batch_size=batch_size)
        results.append(res)
        objective.append(res.weighted_normalized(weights))
    best_i = best_index(objective)
    return SweepResult(method=method, param=param, alphas=values, results=results, objective=objective,
                       best_alpha=values[best_i], best=results[best_i], split=split, weights=weights)
