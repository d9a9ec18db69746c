"""Checkpoint and recipe I/O: safetensors only (never unpickle), atomic writes, recipes that reproduce a merge.

A *recipe* is the validated description of one merge (method, hyperparameters, calibration, preferences, experts,
seed, layer rule). It is stored inside every exported safetensors file's metadata and as a standalone YAML/JSON file;
:func:`merge_from_recipe` turns it back into the same weights through the library.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .schema import StudioError

RECIPE_METADATA_KEY = "merge_studio_recipe"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class CheckpointError(StudioError):
    """A checkpoint or recipe file is missing, unreadable or of an unsupported format."""


def load_state_dict(path: str | os.PathLike, *, prefix: str | None = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Read a safetensors file tensor by tensor (``safe_open``), optionally keeping only keys under ``prefix``.

    Pickle-based checkpoints (``.pt``, ``.bin``, ...) are refused: unpickling runs arbitrary code.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> _ = save_state_dict(p, {"visual.w": torch.ones(2), "text.w": torch.zeros(1)})
        >>> list(load_state_dict(p, prefix="visual."))
        ['visual.w']
    """
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded (unsafe); convert it to .safetensors first")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if prefix is None or key.startswith(prefix):
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out
    except (OSError, ValueError, RuntimeError) as exc:  # safetensors raises SafetensorError (a subclass) or OSError
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _atomic_target(path: Path) -> tuple[int, str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` to ``path`` atomically (temp file + rename: never a half-written file)."""
    path = Path(path)
    fd, tmp = _atomic_target(path)
    os.close(fd)
    try:
        tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        save_file(tensors, tmp, metadata=dict(metadata or {}))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; exported files get the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass
class Recipe:
    """Everything needed to reproduce one merge through :func:`studio.merge`.

    Example:
        >>> r = Recipe(method="ties", hparams={"k": 0.2, "alpha": 0.3}, experts=["a", "b"])
        >>> Recipe.from_text(r.to_yaml()) == r
        True
    """

    method: str
    hparams: dict[str, Any] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)
    calibrate: str | None = None
    calibrate_hparams: dict[str, Any] = field(default_factory=dict)
    preferences: dict[str, float] | None = None
    seed: int = 0
    # None: each method/calibration uses its own default rule; a preset name, or a custom rule as
    # LayerRule.to_dict() (a LayerRule given here is stored that way, so the recipe serialises)
    layer_rule: str | dict[str, Any] | None = None
    suite: str | None = None
    studio_version: str = ""
    svd_mode: str = "auto"

    def __post_init__(self) -> None:
        from .layers import LayerRule, RULES

        if isinstance(self.layer_rule, LayerRule):
            preset = RULES.get(self.layer_rule.name)
            self.layer_rule = preset.name if preset == self.layer_rule else self.layer_rule.to_dict()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        if not isinstance(data, Mapping) or "method" not in data:
            raise CheckpointError("a recipe must be a mapping with at least a 'method' field")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise CheckpointError(f"recipe has unknown field(s) {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(data))

    @classmethod
    def from_text(cls, text: str) -> "Recipe":
        """Parse YAML or JSON (JSON is valid YAML)."""
        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise CheckpointError(f"recipe is not valid YAML/JSON: {exc}") from exc

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        """Load a ``.yaml``/``.json`` recipe, or the recipe embedded in an exported ``.safetensors`` file."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such recipe file")
        if path.suffix == ".safetensors":
            meta = read_metadata(path)
            if RECIPE_METADATA_KEY not in meta:
                raise CheckpointError(f"{path}: safetensors file carries no '{RECIPE_METADATA_KEY}' metadata")
            return cls.from_text(meta[RECIPE_METADATA_KEY])
        return cls.from_text(path.read_text())

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`studio.engine.merge_pool` (besides the pool and the method); add
        ``svd_mode`` for :func:`studio.merge` (a pool has its own), as :func:`merge_from_recipe` does."""
        return dict(self.hparams, calibrate=self.calibrate,
                    calibrate_hparams=dict(self.calibrate_hparams) if self.calibrate else None,
                    preferences=self.preferences, seed=self.seed, layer_rule=self.layer_rule)


def save_merged(path: str | os.PathLike, state_dict: Mapping[str, Tensor], recipe: Recipe) -> Path:
    """Export merged weights as safetensors with the recipe (JSON) in the header metadata."""
    return save_state_dict(path, state_dict, {RECIPE_METADATA_KEY: recipe.to_json(), "format": "pt"})


def merge_from_recipe(recipe: Recipe, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]],
                      **overrides: Any) -> dict[str, Tensor]:
    """Reproduce a merge: select the recipe's experts (in its order) and call :func:`studio.merge`."""
    from .engine import merge

    missing = [name for name in recipe.experts if name not in experts]
    if missing:
        raise CheckpointError(f"recipe needs expert(s) {missing} that are not available; have {sorted(experts)}")
    chosen = {name: experts[name] for name in (recipe.experts or list(experts))}
    kwargs = dict(recipe.merge_kwargs(), svd_mode=recipe.svd_mode)
    kwargs.update(overrides)
    return merge(base, chosen, recipe.method, **kwargs)
