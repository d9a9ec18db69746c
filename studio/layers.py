"""Architecture rules: which tensors are "matrices" that get the spectral treatment, declared once.

The default follows the TSV and Iso-C/CTS official code: every 2-D tensor except ``text_projection`` is a matrix
(so ``attn.in_proj_weight``, ``mlp.c_fc.weight``, ``visual.proj`` and ``positional_embedding`` are), every other
tensor (biases, LayerNorm, ``class_embedding``, the 4-D ``conv1.weight``) gets the method's vector rule.
The official SVC code additionally skips embeddings: :data:`SKIP_EMBEDDINGS`; the official TSV-C compression
(``compress_tv``) truncates every 2-D tensor, ``text_projection`` included: :data:`ALL_MATRICES`.

Tensors with a dimension of size 1 (``[n, 1]``, ``[1, n]``) are never matrices here: their single singular triplet
is the tensor itself, and the official loops would give them nothing for TSV-M/TSV-C (``int(1 / T) = 0`` components)
or the plain sum for Iso-C/Iso-CTS; they get the method's vector rule instead. CLIP towers have no such tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence


_DEFAULT_EXCLUDE: tuple[str, ...] = (r"text_projection",)
#: The presets' patterns, by name (:data:`RULES` holds the rules).
_PRESET_EXCLUDES: dict[str, tuple[str, ...]] = {"default": _DEFAULT_EXCLUDE,
                                                "skip_embeddings": (r"text_projection", r"embedding"),
                                                "all_matrices": ()}


@dataclass(frozen=True)
class LayerRule:
    """Decides which 2-D tensors are treated as matrices.

    Args:
        exclude: regular expressions; a 2-D tensor whose key matches any of them (``re.search``) is not a matrix.
        name: a label shown in recipes and the UI; by default ``"default"`` for the default patterns and ``"custom"``
            for others. A preset's name (``"default"``, ``"skip_embeddings"``, ``"all_matrices"``) is the preset's
            alone: given with other patterns it is refused (``LayerRule(exclude=())`` was labelled "default" in
            errors while it selected what ``"all_matrices"`` selects).

    Example:
        >>> DEFAULT.is_matrix("visual.transformer.resblocks.0.attn.in_proj_weight", (384, 128))
        True
        >>> DEFAULT.is_matrix("text_projection", (512, 512)), DEFAULT.is_matrix("visual.ln_post.weight", (128,))
        (False, False)
    """

    exclude: tuple[str, ...] = _DEFAULT_EXCLUDE
    name: str | None = None   # None: "default" or "custom", from the patterns (__post_init__)

    def __post_init__(self) -> None:
        from .schema import StudioError, brief

        if self.name is None:
            given = tuple(self.exclude) if isinstance(self.exclude, (list, tuple)) else (self.exclude,)
            object.__setattr__(self, "name", "default" if given == _DEFAULT_EXCLUDE else "custom")
        if not isinstance(self.name, str):
            raise StudioError(f"a layer rule's name must be text, got {brief(self.name)}")
        if isinstance(self.exclude, str):
            patterns: tuple = (self.exclude,)
        elif isinstance(self.exclude, (list, tuple)):
            patterns = tuple(self.exclude)
        else:
            raise StudioError(f"layer rule {self.name!r}: exclude must be a regular expression or a list of them, "
                              f"got {brief(self.exclude)}")
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise StudioError(f"layer rule {self.name!r}: exclude patterns must be strings, got {brief(pattern)}")
            try:
                re.compile(pattern)
            except (re.error, RecursionError) as exc:   # the parser recurses on deep nesting
                raise StudioError(f"layer rule {brief(self.name)}: {brief(pattern)} is not a regular "
                                  f"expression ({brief(str(exc))[1:-1]})") from exc
        object.__setattr__(self, "exclude", patterns)   # a list (e.g. from a recipe) becomes the hashable tuple
        preset = _PRESET_EXCLUDES.get(self.name)
        if preset is not None and patterns != preset:
            raise StudioError(f"layer rule {self.name!r} is a preset, which excludes {list(preset)}; a rule that "
                              f"excludes {list(patterns)} needs a name of its own")

    def is_matrix(self, key: str, shape: Sequence[int]) -> bool:
        """True if ``key`` (of ``shape``) gets the spectral treatment."""
        if len(shape) != 2 or min(shape) < 2:
            return False
        return not any(re.search(pattern, key) for pattern in self.exclude)

    def to_dict(self) -> dict:
        return {"name": self.name, "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerRule":
        """The inverse of :meth:`to_dict` (recipes store custom rules this way).

        Example:
            >>> rule = LayerRule(exclude=("mlp",), name="no_mlp")
            >>> LayerRule.from_dict(rule.to_dict()) == rule
            True
        """
        from .schema import StudioError, brief

        if not isinstance(data, Mapping) or set(data) - {"name", "exclude"} or "exclude" not in data:
            raise StudioError(f"a layer rule mapping needs 'exclude' (a list of regular expressions) and optionally "
                              f"'name', got {brief(data)}")
        return cls(exclude=data["exclude"], name=str(data.get("name", "custom")))   # a str is one pattern


DEFAULT = LayerRule(exclude=_DEFAULT_EXCLUDE, name="default")
SKIP_EMBEDDINGS = LayerRule(   # the official SVC code: `"text_projection" in key or "embedding" in key`
    exclude=_PRESET_EXCLUDES["skip_embeddings"],
    name="skip_embeddings",
)
ALL_MATRICES = LayerRule(exclude=_PRESET_EXCLUDES["all_matrices"], name="all_matrices")
RULES = {rule.name: rule for rule in (DEFAULT, SKIP_EMBEDDINGS, ALL_MATRICES)}


def resolve_rule(rule: "LayerRule | str | Mapping | None") -> LayerRule:
    """Accept a :class:`LayerRule`, a preset name (``"default"``, ``"skip_embeddings"``, ``"all_matrices"``), a
    mapping as :meth:`LayerRule.to_dict` writes it (a recipe's custom rule) or ``None`` (the default rule)."""
    if rule is None:
        return DEFAULT
    if isinstance(rule, LayerRule):
        return rule
    if isinstance(rule, Mapping):
        return LayerRule.from_dict(rule)
    if isinstance(rule, str) and rule in RULES:
        return RULES[rule]
    from .schema import StudioError, brief

    raise StudioError(f"unknown layer rule {brief(rule)}; expected one of {sorted(RULES)}, a LayerRule or a mapping "
                      f"{{'name': ..., 'exclude': [regular expressions]}}")


#: The names of BatchNorm's running statistics in a state dict (``visual.bn1.running_var``: open_clip's ResNet CLIP
#: models hold 55 of each): :func:`studio.engine.merge_pool` gives each the experts' (preference-weighted) mean.
RUNNING_STATISTICS = ("running_mean", "running_var")


def is_running_statistic(key: str) -> bool:
    """Whether ``key`` names a BatchNorm running statistic (:data:`RUNNING_STATISTICS`).

    Example:
        >>> is_running_statistic("visual.layer1.0.bn1.running_var"), is_running_statistic("visual.bn1.weight")
        (True, False)
    """
    return key.rsplit(".", 1)[-1] in RUNNING_STATISTICS
