"""Expert suites: one pretrained backbone, its fine-tuned experts, fixed per-task heads and evaluation data.

A suite is a folder (local, or a Hugging Face Hub repository) with this layout::

    manifest.json                  name, model (open_clip name), tasks, logit scale, measured accuracies, provenance
    model_configs/<Model>.json     optional: open_clip configs of non built-in architectures (MiniCLIP-ViT)
    base.safetensors               the pretrained image encoder (``visual.*`` keys only; the part that is merged)
    experts/<task>.safetensors     one fine-tuned image encoder per task (same keys), or
    experts/<task>/                a PEFT LoRA adapter of the base (adapter_config.json, adapter_model.safetensors:
                                   :mod:`studio.adapters`), read as the expert it makes of the base
    heads.safetensors              one fixed ``[C, D]`` head per task (L2-normalised rows, CLIP zero-shot style)
    data/<task>.safetensors        uint8 evaluation images ``{val,test}_images`` [N,H,W,3], ``{val,test}_labels``
    text.safetensors               optional: what produced the heads (MiniCLIP's tiny text tower), not merged

Real CLIP pools plug in with the same layout: ``"model": "ViT-B-32"`` in the manifest, no ``model_configs/``.
Checked when read, each naming the file and field at fault: ``name`` text, ``logit_scale`` a number > 0 within
float32's range, each task an object whose ``classes`` are a list of names, ``model.image_size`` (optional: the
model's own by default) the model's, heads finite floating ``[C, D]`` with L2-normalised rows (to 1e-2) and ``D`` the
model's embedding size, images uint8 ``[N, H, W, 3]`` of the model's size, labels integer ``[N]`` within the classes,
recorded accuracies percentages. open_clip keeps one config
registry per process: a ``model_configs/`` file whose name is already registered with other content (by the
studio, open_clip or a suite loaded before) is refused, so give a new architecture its own name.

Example:
    >>> suite = default_suite()                                   # doctest: +SKIP
    >>> images, labels = suite.split("digits", "test")            # doctest: +SKIP
    >>> model = suite.build_model(suite.experts["digits"])        # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..io import (HUB_SCHEME, hub_fetch, hub_repo_type, hub_spec, hub_url, is_hub_url, is_local_path,
                  load_safetensors, local_folder_hint, shown_path)
from ..adapters import ADAPTER_CONFIG, load_adapter
from ..schema import StudioError, brief
from .model import ArchitectureError, VisualTower, register_model_configs

DEFAULT_SUITE_PATH = Path(__file__).resolve().parents[2] / "assets" / "minisuite"
#: What recipes record for the embedded suite (:attr:`Suite.source`): a name any install resolves, not the folder
#: of the machine that merged (an app on a server would otherwise hand its clients its own paths).
EMBEDDED_SUITE = "MiniSuite"
SPLIT_NAMES = ("validation", "test")
_SPLIT_PREFIX = {"validation": "val", "test": "test"}


class SuiteError(StudioError):
    """A suite folder or repository is missing, incomplete or inconsistent."""


class UnknownTaskError(SuiteError):
    """A task name is not part of the suite."""


class EmptySplitError(SuiteError):
    """A requested evaluation split does not exist or holds no images."""


@dataclass(frozen=True)
class Task:
    """One task of a suite: its class names (head rows, in label order), group and a one-line description."""

    name: str
    classes: tuple[str, ...]
    group: str = ""
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _load_weights(path: Path, what: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise SuiteError(f"{what}: file {path} is missing from the suite")
    # float weights in float32; integer buffers (if any) stay integers, which the engine copies from the base
    try:
        weights = load_safetensors(path, SuiteError)
    except SuiteError as exc:   # the file names itself; which of the suite's weights it is, as above
        raise SuiteError(f"{what}: {exc}") from exc
    return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}


class Suite:
    """A loaded expert suite (see the module docstring for the folder layout).

    Weights and data are read lazily on first access and kept; ``base``/``experts``/``heads`` are float32 CPU
    tensors. Attributes: ``name``, ``root``, ``manifest``, ``tasks``, ``task_names``, ``model_name``,
    ``logit_scale``, ``image_size``, ``source`` (what a recipe records to load it again: the folder's absolute path,
    for a Hub suite ``hf://owner/name@<commit>`` or ``hf://datasets/owner/name@<commit>``, for the embedded suite
    ``"MiniSuite"``).
    """

    def __init__(self, root: "str | Path", manifest: Mapping[str, Any] | None = None):
        self.root = Path(root)
        self.source = EMBEDDED_SUITE if self.root.resolve() == DEFAULT_SUITE_PATH else os.path.abspath(self.root)
        if manifest is None:
            path = self.root / "manifest.json"
            if not path.is_file():
                raise SuiteError(f"{self.root} is not a suite folder: manifest.json is missing")
            try:
                manifest = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise SuiteError(f"{path} is not valid JSON: {exc}") from exc
            except UnicodeDecodeError as exc:
                raise SuiteError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}), as JSON is") from exc
            except RecursionError as exc:
                raise SuiteError(f"{path}: its JSON is nested too deeply to read") from exc
        if not isinstance(manifest, Mapping):
            raise SuiteError(f"{self.root}/manifest.json must hold a JSON object, got {type(manifest).__name__}")
        self.manifest: dict[str, Any] = dict(manifest)
        for key in ("name", "model", "tasks"):
            if key not in self.manifest:
                raise SuiteError(f"{self.root}/manifest.json lacks the required field {key!r}")
        where = f"{self.root}/manifest.json"
        try:
            if not isinstance(self.manifest["name"], str) or not self.manifest["name"].strip():
                raise ValueError(f"'name' must be the suite's name (text), got {brief(self.manifest['name'])}")
            self.name: str = self.manifest["name"]
            model = self.manifest["model"]
            self.model_name: str = model["name"] if isinstance(model, dict) else model
            tasks_field = self.manifest["tasks"]
            if not isinstance(tasks_field, list):
                raise TypeError(f"'tasks' must be a list of task objects, got {type(tasks_field).__name__}")
            for i, t in enumerate(tasks_field):
                if not isinstance(t, dict):
                    raise ValueError(f"'tasks[{i}]' must be an object with 'name' and 'classes', got {brief(t)}")
            self.tasks: list[Task] = [
                Task(t["name"], tuple(t["classes"]), t.get("group", ""), t.get("description", ""))
                for t in tasks_field
            ]
            scale = self.manifest.get("logit_scale", 100.0)
            top = torch.finfo(torch.float32).max   # the logits are float32: a larger scale made them infinite
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= top:
                raise ValueError(f"'logit_scale' must be a number > 0 within float32's range (CLIP's exp(t), e.g. "
                                 f"100), got {brief(scale)}")
            self.logit_scale: float = float(scale)
            for t in tasks_field:
                if not isinstance(t.get("classes"), list) or not all(isinstance(c, str) for c in t["classes"]):
                    raise ValueError(f"task {t.get('name')!r}: 'classes' must be a list of class names, got "
                                     f"{brief(t.get('classes'))}")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            missing = f"lacks the field {exc}" if isinstance(exc, KeyError) else f"is malformed: {exc}"
            raise SuiteError(f"{where} {missing} (see studio.suite's folder layout)") from None
        if not isinstance(self.model_name, str):
            raise SuiteError(f"{where}: 'model' must be a name or an object with a 'name', got {model!r}")
        if not self.tasks:
            raise SuiteError(f"suite {self.name!r} declares no tasks")
        self.task_names: list[str] = [t.name for t in self.tasks]
        bad = [n for n in self.task_names
               if not isinstance(n, str) or not n or "/" in n or "\\" in n or n in (".", "..")]
        if bad:
            raise SuiteError(f"{where}: task names {bad} are not usable as file names (experts/<name>.safetensors)")
        dup = sorted({n for n in self.task_names if self.task_names.count(n) > 1})
        if dup:
            raise SuiteError(f"{where}: task name(s) {dup} appear more than once; each task needs its own name")
        self._lock = threading.RLock()
        self._base: dict[str, Tensor] | None = None
        self._experts: dict[str, dict[str, Tensor]] = {}   # task name -> its state dict, each read when first asked
        self._heads: dict[str, Tensor] | None = None
        self._data: dict[str, dict[str, Tensor]] = {}
        self._tower: VisualTower | None = None

    def __repr__(self) -> str:
        return f"Suite({self.name!r}, model={self.model_name!r}, tasks={self.task_names}, root={str(self.root)!r})"

    # ------------------------------------------------------------------------------------------------ metadata
    def task(self, name: str) -> Task:
        """The :class:`Task` called ``name``; raises :class:`UnknownTaskError` listing the suite's tasks."""
        for t in self.tasks:
            if t.name == name:
                return t
        raise UnknownTaskError(f"unknown task {brief(name)}; suite {self.name!r} has tasks {self.task_names}")

    def check_tasks(self, tasks: "list[str] | tuple[str, ...] | None") -> list[str]:
        """Validate a task selection (``None``: all tasks, in suite order)."""
        if tasks is None:
            return list(self.task_names)
        if isinstance(tasks, str):
            tasks = [tasks]
        if not isinstance(tasks, (list, tuple)):   # a set has no order: the results would follow its iteration
            raise UnknownTaskError(f"tasks must be a task's name or a list of them (of {self.task_names}), got "
                                   f"{brief(tasks)}")
        out = [self.task(t).name for t in tasks]
        if not out:
            raise UnknownTaskError(f"empty task selection; choose among {self.task_names}")
        dup = sorted({t for t in out if out.count(t) > 1})
        if dup:
            raise UnknownTaskError(f"task selection {out} names {dup} more than once")
        return out

    @property
    def expert_accuracy(self) -> dict[str, float]:
        """Each expert's test accuracy (%) on its own task, as measured by the build (from the manifest)."""
        return self._recorded_accuracy("expert_own_task")

    @property
    def zeroshot_accuracy(self) -> dict[str, float]:
        """The pretrained backbone's test accuracy (%) per task with the fixed heads (from the manifest)."""
        return self._recorded_accuracy("zeroshot")

    def _recorded_accuracy(self, kind: str) -> dict[str, float]:
        """The manifest's ``accuracy.<kind>.<task>.test`` values (tasks it leaves out are measured by callers); a
        malformed entry is a :class:`SuiteError` naming it."""
        block = self.manifest.get("accuracy", {})
        acc = block.get(kind, {}) if isinstance(block, Mapping) else None
        if not isinstance(acc, Mapping):
            raise SuiteError(f"{self.root}/manifest.json: 'accuracy' must map {kind!r} to per-task values, got "
                             f"{brief(block)}")
        out = {}
        for t in self.task_names:
            if t in acc:
                if not isinstance(acc[t], Mapping):
                    raise SuiteError(f"{self.root}/manifest.json: 'accuracy.{kind}.{t}' must be an object such as "
                                     f"{{\"test\": 97.3}}, got {brief(acc[t])}")
                value = acc[t].get("test")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                    raise SuiteError(f"{self.root}/manifest.json: 'accuracy.{kind}.{t}.test' must be a percentage "
                                     f"in [0, 100], got {brief(value)}")
                out[t] = float(value)
        return out

    # ------------------------------------------------------------------------------------------------- weights
    @property
    def weight_files(self) -> dict[str, Any]:
        """The files the base and each expert are read from, ``{"base": path, "experts": {task: path}}`` (the shape
        of :attr:`studio.io.Recipe.sources`), e.g. for an error to name the file at fault."""
        return {"base": str(self.root / "base.safetensors"),
                "experts": {t: str(self._expert_path(t)) for t in self.task_names}}

    def _expert_path(self, task: str) -> Path:
        """``experts/<task>.safetensors``, or the adapter folder ``experts/<task>/`` where that file is not."""
        file, folder = self.root / "experts" / f"{task}.safetensors", self.root / "experts" / task
        return folder if not file.is_file() and folder.is_dir() else file

    @property
    def base(self) -> dict[str, Tensor]:
        """Pretrained image-encoder state dict (``visual.*`` keys, float32)."""
        with self._lock:
            if self._base is None:
                self._base = _load_weights(self.root / "base.safetensors", f"suite {self.name!r} base")
            return self._base

    @property
    def experts(self) -> dict[str, dict[str, Tensor]]:
        """Task name -> fine-tuned image-encoder state dict (float32), in suite task order. The suite's own mapping:
        an expert replaced in it is the one every later read (and :meth:`experts_named`) gets."""
        with self._lock:
            self.experts_named(self.task_names)
            if list(self._experts) != self.task_names:   # read in another order by a selection first
                self._experts = {t: self._experts[t] for t in self.task_names}
            return self._experts

    def experts_named(self, names: Sequence[str]) -> dict[str, dict[str, Tensor]]:
        """The state dicts of the experts ``names`` (in that order), reading only those: a selection neither waits
        for nor holds the others, and an unreadable expert it leaves out does not stop it. A
        :class:`SuiteError` names an expert the suite lacks."""
        unknown = [n for n in names if n not in self.task_names]
        if unknown:
            raise SuiteError(f"unknown expert(s) {unknown}; the suite has {self.task_names}")
        with self._lock:
            for t in names:
                if t not in self._experts:
                    path = self._expert_path(t)
                    self._experts[t] = (self._adapter_expert(path, t) if path.is_dir()
                                        else _load_weights(path, f"expert {t!r}"))
            return {t: self._experts[t] for t in names}

    def _adapter_expert(self, folder: Path, task: str) -> dict[str, Tensor]:
        """The expert a suite's adapter folder makes of the base (float32, as every suite expert)."""
        if not (folder / ADAPTER_CONFIG).is_file():   # (reported as experts/<task>.safetensors missing before)
            raise SuiteError(f"expert {task!r}: {folder} is a folder without {ADAPTER_CONFIG}; an expert is the file "
                             f"experts/{task}.safetensors or a PEFT adapter folder experts/{task}/ holding "
                             f"{ADAPTER_CONFIG} and adapter_model.safetensors")
        try:
            weights, _ = load_adapter(folder, self.base)
        except StudioError as exc:
            raise SuiteError(f"expert {task!r}: {exc}") from exc
        return {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in weights.items()}

    @property
    def heads(self) -> dict[str, Tensor]:
        """Task name -> fixed classification head ``[C, D]`` (float32)."""
        with self._lock:
            if self._heads is None:
                heads = _load_weights(self.root / "heads.safetensors", f"suite {self.name!r} heads")
                for t in self.tasks:
                    if t.name not in heads:
                        raise SuiteError(f"heads.safetensors has no head for task {t.name!r}")
                    head = heads[t.name]
                    if head.dim() != 2 or not head.is_floating_point():
                        raise SuiteError(f"{self.root}/heads.safetensors: the head of task {t.name!r} is "
                                         f"{head.dtype} {tuple(head.shape)}; expected a floating-point [classes, "
                                         f"embedding] matrix ([{t.num_classes}, D])")
                    if head.shape[0] != t.num_classes:
                        raise SuiteError(f"head of task {t.name!r} has {head.shape[0]} rows but the task "
                                         f"has {t.num_classes} classes")
                    if not bool(torch.isfinite(head).all()):
                        raise SuiteError(f"{self.root}/heads.safetensors: the head of task {t.name!r} contains NaN "
                                         f"or infinite values")
                    norms = head.double().norm(dim=1)
                    off = (norms - 1).abs() > 1e-2   # (bfloat16 rows: 4e-3) a zero row never predicted its class
                    if bool(off.any()):
                        row = int(off.nonzero()[0])
                        raise SuiteError(f"{self.root}/heads.safetensors: row {row} of task {t.name!r}'s head has "
                                         f"norm {float(norms[row]):.4g}; a head's rows are L2-normalised class "
                                         f"embeddings (CLIP's zero-shot heads), norm 1")
                self._heads = {t: heads[t] for t in self.task_names}
            return self._heads

    # -------------------------------------------------------------------------------------------------- models
    @property
    def tower(self) -> VisualTower:
        """The architecture (an open_clip image encoder factory) of this suite."""
        with self._lock:
            if self._tower is None:
                configs = self.root / "model_configs"
                register_model_configs()   # the studio's own first, so that a suite's differing one is named
                if configs.is_dir():
                    register_model_configs(configs)
                try:
                    tower = VisualTower(self.model_name)
                except ArchitectureError:
                    raise
                except Exception as exc:  # open_clip raises RuntimeError/KeyError for unknown names
                    raise ArchitectureError(f"cannot build open_clip model {self.model_name!r}: {exc}") from exc
                stated = self._stated_image_size()
                if stated is not None and stated != tower.image_size:
                    raise SuiteError(f"{self.root}/manifest.json: 'model.image_size' is {stated}, but the model "
                                     f"{self.model_name!r} takes {tower.image_size} x {tower.image_size} images")
                self._tower = tower
            return self._tower

    def _stated_image_size(self) -> int | None:
        """The manifest's ``model.image_size`` (None where it gives none), checked to be a size."""
        model = self.manifest.get("model")
        size = model.get("image_size") if isinstance(model, Mapping) else None
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise SuiteError(f"{self.root}/manifest.json: 'model.image_size' must be a whole number of pixels, got "
                             f"{brief(size)}")
        return size

    @property
    def image_size(self) -> int:
        return self.tower.image_size

    def build_model(self, state_dict: Mapping[str, Tensor], *, device: "str | torch.device" = "cpu") -> nn.Module:
        """The open_clip visual tower (eval mode) with ``state_dict`` (``visual.*`` keys) loaded.

        Raises :class:`ArchitectureError` naming missing/unexpected keys or the first mismatched shape.

        Example:
            >>> model = default_suite().build_model(default_suite().base)   # doctest: +SKIP
            >>> model(torch.zeros(1, 3, 32, 32)).shape                      # doctest: +SKIP
            torch.Size([1, 64])
        """
        return self.tower.build(state_dict, device=device)

    # ---------------------------------------------------------------------------------------------------- data
    def _task_data(self, task: str) -> dict[str, Tensor]:
        self.task(task)
        with self._lock:
            if task not in self._data:
                path = self.root / "data" / f"{task}.safetensors"
                if not path.is_file():
                    raise EmptySplitError(f"suite {self.name!r} ships no evaluation data for task {task!r} ({path})")
                self._data[task] = load_safetensors(path, SuiteError)
            return self._data[task]

    def split(self, task: str, split: str = "test") -> tuple[Tensor, Tensor]:
        """Evaluation images (uint8 ``[N, H, W, 3]``) and labels (int64 ``[N]``) of ``task``.

        ``split`` is ``"validation"`` (alpha sweeps, preference optimisation) or ``"test"`` (reported numbers).
        """
        if split not in SPLIT_NAMES:
            raise EmptySplitError(f"unknown split {brief(split)}; expected one of {list(SPLIT_NAMES)}")
        data = self._task_data(task)
        prefix = _SPLIT_PREFIX[split]
        if f"{prefix}_images" not in data or f"{prefix}_labels" not in data:
            raise EmptySplitError(f"task {task!r} has no {split!r} split (keys {sorted(data)})")
        images, labels = data[f"{prefix}_images"], data[f"{prefix}_labels"]
        file = self.root / "data" / f"{task}.safetensors"
        if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise SuiteError(f"{file}: '{prefix}_labels' is {labels.dtype} {tuple(labels.shape)}; expected integer "
                             f"class indices [N]")
        labels = labels.to(torch.int64)
        if images.dim() != 4:
            raise SuiteError(f"{file}: '{prefix}_images' is {images.dtype} {tuple(images.shape)}; expected uint8 "
                             f"images [N, H, W, 3]")
        if images.shape[0] == 0:
            raise EmptySplitError(f"the {split!r} split of task {task!r} is empty")
        if images.shape[0] != labels.shape[0]:
            raise SuiteError(f"task {task!r} {split}: {images.shape[0]} images but {labels.shape[0]} labels")
        # the manifest's image size (building the model to ask it would import open_clip just to read data), else
        # the model's own (a manifest that does not give it); where the images do not fit the manifest's, the
        # model decides which of the two is wrong
        size = self._stated_image_size()
        fits = images.dtype == torch.uint8 and tuple(images.shape[1:]) == (size, size, 3)
        if size is None or not fits:
            size = self.image_size   # (the tower refuses a manifest's size that is not the model's)
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != (size, size, 3):
            raise SuiteError(f"task {task!r} {split}: images are {images.dtype} {tuple(images.shape)}; the model "
                             f"{self.model_name!r} expects uint8 [N, {size}, {size}, 3]")
        n = self.task(task).num_classes
        if bool(((labels < 0) | (labels >= n)).any()):
            raise SuiteError(f"task {task!r} {split}: labels {sorted(set(labels.tolist()) - set(range(n)))[:5]} are "
                             f"outside its {n} classes")
        return images, labels

    def samples(self, task: str, per_class: int = 1, split: str = "test") -> list[tuple[Tensor, int, str]]:
        """Gallery samples: the first ``per_class`` images of each class as ``(uint8 [H, W, 3], label, class)``.

        Example:
            >>> [c for _, _, c in default_suite().samples("signs")][:2]   # doctest: +SKIP
            ['stop', 'yield']
        """
        images, labels = self.split(task, split)
        classes = self.task(task).classes
        out = []
        for c in range(len(classes)):
            idx = (labels == c).nonzero().flatten()[:per_class].tolist()
            out.extend((images[i], c, classes[c]) for i in idx)
        return out


def load_suite(source: "str | Path" = DEFAULT_SUITE_PATH, *, revision: str | None = None,
               repo_type: str | None = None, cache_dir: "str | Path | None" = None) -> Suite:
    """Load a suite from a local folder or a Hugging Face Hub repository id (``"owner/name"``, optionally
    ``"owner/name@revision"``, or ``"hf://owner/name[@revision]"``, the Hub whatever local folders exist), or the
    embedded suite by name, ``"MiniSuite"`` (unless a folder of that name exists here). A dataset repository is
    ``"hf://datasets/owner/name[@revision]"``, or ``repo_type="dataset"`` (``None``: a model repository unless the
    source says otherwise). :attr:`Suite.source` records a Hub suite pinned to the commit it read, in that form.

    Hub repositories are fetched with ``huggingface_hub.snapshot_download`` (so ``HF_HUB_OFFLINE=1`` serves them
    from the local cache and never touches the network).

    Example:
        >>> load_suite("assets/minisuite").task_names[:3]     # doctest: +SKIP
        ['digits', 'house_numbers', 'signs']
    """
    if isinstance(source, str) and not source.strip():   # Path("") is the current folder
        raise SuiteError("the suite source is empty; give a suite folder, a Hub repo id or 'MiniSuite'")
    explicit, given = is_hub_url(source), source
    source, named_type = hub_repo_type(source)
    if repo_type is not None and named_type is not None and repo_type != named_type:
        raise SuiteError(f"suite source {brief(given)} is a {named_type} repository, but repo_type={repo_type!r} "
                         f"was also given")
    repo_type = named_type or repo_type or "model"
    if repo_type not in ("model", "dataset"):
        raise SuiteError(f"repo_type must be 'model' or 'dataset' (a suite's Hub repository), got {brief(repo_type)}")
    if not explicit:
        try:
            path = Path(source).expanduser()
        except (TypeError, RuntimeError) as exc:   # not a path, an unknown ~user
            raise SuiteError(f"suite source {brief(source)} cannot be read as a path ({exc})") from exc
        if path.is_dir():
            return Suite(path)
        if source == EMBEDDED_SUITE:   # the name recipes record for the embedded suite, wherever it is installed
            return Suite(DEFAULT_SUITE_PATH)
    local = not explicit and is_local_path(source)
    spec = hub_spec(source, revision, SuiteError, shown=given)
    if spec is None or spec[1] is not None or local:
        hint = local_folder_hint(source, spec, repo_type) if local and spec and not spec[1] else ""
        if isinstance(source, str) and source.strip().lower() == EMBEDDED_SUITE.lower():
            hint += f"; the embedded suite is named '{EMBEDDED_SUITE}'"
        raise SuiteError(f"suite source '{shown_path(given)}' is neither an existing folder nor a Hub repo id "
                         f"'owner/name[@revision]' or '{HUB_SCHEME}owner/name[@revision]' ('{HUB_SCHEME}datasets/...' "
                         f"for a dataset repository) (from {Path.cwd()}){hint}")
    snapshot = hub_fetch(spec[0], revision=spec[2], repo_type=repo_type, cache_dir=cache_dir,
                         what="suite", error=SuiteError, shown=str(given))
    suite = Suite(snapshot)
    suite.source = hub_url(spec[0], None, snapshot.name, repo_type)   # the snapshot folder is named by its commit
    return suite


@functools.lru_cache(maxsize=1)
def default_suite() -> Suite:
    """The embedded MiniSuite (``assets/minisuite``), loaded once per process."""
    return load_suite(DEFAULT_SUITE_PATH)
