"""LoRA experts as PEFT saves them: an ``adapter_config.json`` and an ``adapter_model.safetensors`` (``peft``'s
``save_pretrained``), applied to the base to give the expert's full state dict, as ``peft``'s ``merge_and_unload``
would.

The expert is the base with each adapted ``Linear`` weight ``W0 + scaling * B A`` (``lora_B.weight @
lora_A.weight``, transposed for ``fan_in_fan_out``; ``scaling = lora_alpha / r``, ``lora_alpha / sqrt(r)`` with
``use_rslora``; ``rank_pattern`` and ``alpha_pattern`` matched to the module's name as ``peft`` matches them,
``peft.utils.other.get_pattern_key``), ``lora_B.bias`` added the same way (``lora_bias``), and every other tensor the
adapter holds (``modules_to_save``, the biases ``bias="all"`` or ``"lora_only"`` trains) in place of the base's (one
the base does not hold, such as a classification head, is left out with a warning). The sum is formed in float64 and
rounded once to the base's dtype. Other PEFT methods, DoRA (``use_dora``) and LoRA on embeddings or convolutions are
refused by name: merge those into full weights with ``peft``'s ``merge_and_unload`` and pass the weights. So is a
LoRA of ``nn.MultiheadAttention`` (open_clip's attention when ``"attn"`` is targeted): ``peft`` 0.21.2 adds its
``out_proj`` delta twice, in merges and in the forward pass (huggingface/peft#3774, open), so its meaning depends on
the ``peft`` version; ``out_proj`` targeted as the ``Linear`` layer it is is read as any other.

An adapter's module names are those of the model it was trained on, under ``base_model.model.``: relative to the
module PEFT wrapped, which may be a part of the base (a ``CLIPVisionModel``'s under a CLIP checkpoint's
``vision_model.``, open_clip's visual tower's under ``visual.``). They are placed in the base as one: under the one
prefix (``""``, ``"visual."``, ...) at which the base holds every adapted weight with the adapter's shape. Where
several fit (an open_clip model whose towers have one width, where the visual tower's names are the text tower's
under ``visual.``), the adapter is refused, naming them: read the base under the prefix of the part it was trained
on (``prefix=``, the CLI's ``--prefix``). Where none fits every module, each is matched alone: to the base's tensor
of its name, else to the one base tensor whose name ends with it. An adapter initialised by changing the base (PiSSA,
OLoRA, CorDA, LoftQ: ``init_lora_weights``) is relative to that changed base, not to this one, and is refused unless
PEFT converted it to a plain LoRA when it saved it.

Example:
    >>> import json, tempfile, torch
    >>> from safetensors.torch import save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.ones(1, 3),
    ...            "base_model.model.fc.lora_B.weight": torch.ones(2, 1)}, folder / ADAPTER_WEIGHTS)
    >>> expert, _ = load_adapter(folder, {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)})
    >>> expert["fc.weight"].tolist(), expert["fc.bias"].tolist()
    ([[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]], [0.0, 0.0])
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from . import io
from .io import CheckpointError, in_range
from .schema import brief, is_finite

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "adapter_files", "apply_adapter", "load_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: The prefix ``peft`` saves a ``PeftModel``'s tensors under (``base_model.model.<module>...``).
PEFT_PREFIX = "base_model.model."
_LORA = re.compile(r"(.+)\.(lora_A|lora_B)\.(weight|bias)")
#: ``init_lora_weights`` values whose initialisation subtracts the initial factors' product from the base weights
#: (peft's PiSSA, OLoRA, CorDA) or quantises them (LoftQ): what such an adapter saves is relative to that changed base.
#: peft's conversion on saving (``path_initial_model_for_weight_conversion``) writes ``init_lora_weights: true``.
_CHANGES_THE_BASE = ("pissa", "olora", "corda", "loftq")


def adapter_files(source: str | os.PathLike, *, revision: str | None = None,
                  cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path, str] | None:
    """``(config, weights, pinned)`` when ``source`` is a PEFT adapter: a folder holding :data:`ADAPTER_CONFIG`
    (its weights :data:`ADAPTER_WEIGHTS` beside it), that weights file itself, or a Hub repository
    (``owner/name[@revision]``, ``hf://owner/name...``) holding both at its root; ``None`` for any other source.
    ``pinned`` is the source as a recipe records it: the folder's absolute path, or the repository at the commit
    its files came from."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        return None
    if not io.is_hub_url(source):
        try:
            path = Path(source).expanduser()
            folder = path if path.is_dir() else path.parent if path.name == ADAPTER_WEIGHTS else None
            if folder is not None and (folder / ADAPTER_CONFIG).is_file():
                weights = folder / ADAPTER_WEIGHTS
                if not weights.is_file():
                    raise CheckpointError(f"{io.shown_path(folder)}: holds {ADAPTER_CONFIG} but not "
                                          f"{ADAPTER_WEIGHTS}, the adapter's weights (peft's save_pretrained writes "
                                          f"both; pickle weights, adapter_model.bin, are never read)")
                return folder / ADAPTER_CONFIG, weights, os.path.abspath(folder)
            if path.exists() or io.is_local_path(source):
                return None
        except OSError:
            return None   # load_checkpoint names what is wrong with the path
    given, (text, repo_type) = source, io.hub_repo_type(source)
    try:
        spec = io.hub_spec(text, revision, shown=str(given))
    except CheckpointError:
        return None
    if spec is None or spec[1] is not None:   # a file in a repository is a checkpoint, not an adapter
        return None
    repo_id, _, rev = spec
    try:
        snapshot = io.hub_fetch(repo_id, revision=rev, repo_type=repo_type or "model", cache_dir=cache_dir,
                                allow_patterns=(ADAPTER_CONFIG, ADAPTER_WEIGHTS), shown=str(given))
    except CheckpointError:
        return None   # not fetchable: load_checkpoint says why
    if not (snapshot / ADAPTER_CONFIG).is_file():
        return None
    if not (snapshot / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{given}: the Hub repository holds {ADAPTER_CONFIG} but not {ADAPTER_WEIGHTS}")
    return snapshot / ADAPTER_CONFIG, snapshot / ADAPTER_WEIGHTS, io.hub_url(repo_id, None, snapshot.name,
                                                                             repo_type or "model")


def load_adapter(source: str | os.PathLike, base: Mapping[str, Tensor], *, prefix: str | None = None,
                 revision: str | None = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, Tensor], str]:
    """The expert a PEFT LoRA adapter makes of ``base`` (the module's docstring), with the base's keys, shapes and
    dtypes, and the source as a recipe records it (:func:`adapter_files`). ``prefix``: the base was read with only
    the tensors under it (:func:`studio.io.load_checkpoint`), so the adapter's tensors for no base tensor are left
    out (the text tower's of an adapter of a whole CLIP model, for a base of its visual tower); without it they are
    refused. A :class:`~studio.io.CheckpointError` names the adapter's file and the tensor or setting at fault: a
    source that is no adapter, a PEFT method other than LoRA, DoRA, a tensor that matches no base tensor (or
    several), a shape that does not fit, an adapter that changes nothing of the base. The tensors the adapter leaves
    as they are are the base's own, not copies (an expert of a whole model holds no second copy of it): an in-place
    change of one changes the base too (:func:`studio.merge` modifies neither)."""
    found = adapter_files(source, revision=revision, cache_dir=cache_dir)
    if found is None:
        raise CheckpointError(f"{io.shown_path(source)}: not a PEFT adapter (a folder or Hub repository holding "
                              f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    return apply_adapter(found, base, prefix=prefix)


def apply_adapter(files: tuple[Path, Path, str], base: Mapping[str, Tensor], *,
                  prefix: str | None = None) -> tuple[dict[str, Tensor], str]:
    """:func:`load_adapter` of the files :func:`adapter_files` found (a caller that asked it whether a source is an
    adapter reads the adapter without resolving the source again: no second Hub request)."""
    config_file, weights_file, pinned = files
    if not isinstance(base, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in base.items()):
        raise CheckpointError(f"the base an adapter applies to must be a state dict (a mapping of names to tensors), "
                              f"got {brief(base)}")
    if prefix is not None and not isinstance(prefix, str):
        raise CheckpointError(f"prefix must be text (the start of the base's tensor names it was read under), got "
                              f"{brief(prefix)}")
    config = _config(config_file)
    tensors = io.load_safetensors(weights_file, CheckpointError)
    where = io.shown_path(weights_file)
    names = list(base)
    lora: dict[str, dict[str, Tensor]] = {}
    replaced: dict[str, Tensor] = {}
    left_out: list[str] = []
    full: list[tuple[str, str, Tensor]] = []   # the tensors the adapter holds in full: (key, base name, value)
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: tensor {key!r} holds NaN or infinite values")
        inner = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA.fullmatch(inner)
        if m is not None:
            if not value.is_floating_point():
                raise CheckpointError(f"{where}: tensor {key!r} is {value.dtype}; a LoRA factor is floating-point "
                                      f"(peft writes the trained factors' float dtype)")
            lora.setdefault(m[1], {})[f"{m[2]}.{m[3]}"] = value
            continue
        if "lora_" in inner:
            raise CheckpointError(f"{where}: tensor {key!r} is not a LoRA Linear layer's lora_A / lora_B (DoRA's "
                                  f"magnitude, LoRA on an embedding or a convolution): merge the adapter into full "
                                  f"weights with peft's merge_and_unload and pass those")
        full.append((key, inner.replace(".base_layer.", "."), value))
    # An adapter that names modules under the prefix the base was read with (one of the whole model, its text
    # tower's modules too) is read by its names alone: its other parts' modules are left out, not matched by the end
    # of their names to the part read (a text module onto the visual tower's weight of that name: ViT-S-32)
    whole = bool(prefix) and any(module.startswith(prefix) for module in lora)
    place = None if whole else _placement(lora, base, where, bool(config.get("fan_in_fan_out")))
    for key, name, value in full:
        target = _base_key(name, names, where, key, prefix if prefix is not None else "", exact=whole, place=place)
        if target is None:   # a head the adapter trained in full (modules_to_save), outside the merged model
            if prefix is None:
                left_out.append(name)
            continue
        _check_shape(base[target], value.shape, where, key, target)
        if value.is_floating_point() != base[target].is_floating_point():
            raise CheckpointError(f"{where}: tensor {key!r} is {value.dtype}, but the base's {target!r} it replaces is "
                                  f"{base[target].dtype}; the adapter is for another model")
        replaced[target] = value
    out = dict(base)
    applied = len(replaced)
    for module, parts in lora.items():
        if "lora_A.weight" not in parts or "lora_B.weight" not in parts:
            raise CheckpointError(f"{where}: module {module!r} has {sorted(parts)} but LoRA needs both lora_A.weight "
                                  f"and lora_B.weight")
        A, B = parts["lora_A.weight"], parts["lora_B.weight"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise CheckpointError(f"{where}: module {module!r}: lora_A.weight {tuple(A.shape)} and lora_B.weight "
                                  f"{tuple(B.shape)} are not a rank-r pair [r, in] and [out, r] (a LoRA of a "
                                  f"convolution or an embedding is not read)")
        if ".base_layer." in module or (f"{module}.weight" not in names and any(
                n == f"{module}.in_proj_weight" or n.endswith(f".{module}.in_proj_weight") for n in names)):
            raise CheckpointError(
                f"{where}: module {module!r} is part of a LoRA of nn.MultiheadAttention (peft's MultiheadAttention, "
                f"open_clip's attention: its packed in_proj_weight and its out_proj), which is not read: peft 0.21.2 "
                f"adds the out_proj's delta twice, in merges and in the forward pass alike (huggingface/peft#3774, "
                f"open), so what the adapter means depends on the peft it was trained with (this one records "
                f"{config.get('peft_version') or 'none'}). Merge it with that peft (merge_and_unload) and pass the "
                f"weights, or target out_proj as the Linear layer it is")
        scale = _scaling(config, module, A.shape[0], where)
        delta = (B.double() @ A.double()) * scale
        if config.get("fan_in_fan_out"):
            delta = delta.T
        target = _base_key(f"{module}.weight", names, where, f"{PEFT_PREFIX}{module}.lora_A.weight", prefix,
                           exact=whole, place=place)
        if target is None:
            continue
        applied += 1
        _check_shape(base[target], delta.shape, where, f"{PEFT_PREFIX}{module}.lora_B.weight @ lora_A.weight", target)
        out[target] = _rounded(replaced.pop(target, base[target]).double() + delta, base[target], where, target)
        if "lora_B.bias" in parts:
            bias = _base_key(f"{module}.bias", names, where, f"{PEFT_PREFIX}{module}.lora_B.bias", exact=whole,
                             place=place)
            assert bias is not None
            _check_shape(base[bias], parts["lora_B.bias"].shape, where, f"{PEFT_PREFIX}{module}.lora_B.bias", bias)
            out[bias] = _rounded(replaced.pop(bias, base[bias]).double() + parts["lora_B.bias"].double() * scale,
                                 base[bias], where, bias)
    for target, value in replaced.items():
        out[target] = value.to(base[target].dtype)
    if not applied:
        raise CheckpointError(f"{where}: none of the adapter's {len(tensors)} tensors is for a tensor of the base"
                              + (f" (read under the prefix {prefix!r})" if prefix is not None else ""))
    if left_out:
        warnings.warn(f"{where}: left out {len(left_out)} tensor(s) the adapter holds in full that the base does not "
                      f"hold (e.g. {left_out[0]!r}: modules_to_save, such as a classification head, outside the "
                      f"merged model)", stacklevel=2)
    return out, pinned


def _config(path: Path) -> dict[str, Any]:
    """The adapter's settings, checked: LoRA, not DoRA, numbers where numbers belong."""
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{io.shown_path(path)}: cannot be read as JSON ({exc})") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{io.shown_path(path)}: its JSON is nested too deeply to read") from exc
    shown = io.shown_path(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{shown}: holds {brief(config)}, not a PEFT adapter's settings (a JSON object)")
    if config.get("peft_type") != "LORA":
        raise CheckpointError(f"{shown}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are "
                              f"read: merge others into full weights with peft's merge_and_unload")
    for name in ("use_dora", "use_rslora", "fan_in_fan_out"):   # read as flags: "false" is not False
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise CheckpointError(f"{shown}: {name} must be true or false, got {brief(config[name])}")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_CHANGES_THE_BASE):
        raise CheckpointError(f"{shown}: init_lora_weights is {init!r}, which changes the base's weights at the "
                              f"adapter's initialisation: its factors are relative to that changed base, not to this "
                              f"one. Save it from peft converted to a plain LoRA (save_pretrained's "
                              f"path_initial_model_for_weight_conversion) or merge it into full weights with peft's "
                              f"merge_and_unload on the base it was trained from, and pass those")
    if config.get("use_dora"):
        raise CheckpointError(f"{shown}: use_dora is set; a DoRA adapter's weight is rescaled per output, which is "
                              f"not read: merge it into full weights with peft's merge_and_unload")
    _check_setting(shown, "r", config.get("r"))
    _check_setting(shown, "lora_alpha", config.get("lora_alpha"))
    for name, setting in (("rank_pattern", "r"), ("alpha_pattern", "lora_alpha")):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{shown}: {name} must map module names to numbers, got {brief(config[name])}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as exc:   # peft matches each as a regular expression (get_pattern_key)
                raise CheckpointError(f"{shown}: {name} key {pattern!r} is not a regular expression ({exc}); peft "
                                      f"matches each key against the modules' names as one") from None
            _check_setting(shown, f"{name}[{pattern!r}]", value, setting)
    return config


def _check_setting(shown: str, name: str, value: Any, kind: str | None = None) -> None:
    """``r`` (``kind``: what ``name`` sets) must be a positive integer, ``lora_alpha`` a positive finite number."""
    kind = kind or name
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and is_finite(value) and value > 0
    if kind == "r" and not (number and float(value).is_integer()):
        raise CheckpointError(f"{shown}: {name} must be a positive integer (a rank), got {brief(value)}")
    if not number:
        raise CheckpointError(f"{shown}: {name} must be a positive finite number, got {brief(value)}")


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """``peft.utils.other.get_pattern_key``: the first pattern (in the file's order) that matches the module's name
    or its end after a dot, as a regular expression."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _scaling(config: Mapping[str, Any], module: str, rank: int, where: str) -> float:
    """``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``) for ``module``, its own ``r`` and ``lora_alpha`` from
    ``rank_pattern`` and ``alpha_pattern`` (peft's ``LoraLayer.update_layer``); the rank must be the tensors'."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    if r != rank:
        raise CheckpointError(f"{where}: module {module!r} has rank {rank} tensors, but its settings give r = {r}")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else r)


def _placement(lora: Mapping[str, Mapping[str, Tensor]], base: Mapping[str, Tensor], where: str,
               fan_in_fan_out: bool) -> str | None:
    """The one prefix under which ``base`` holds every LoRA module's weight with the adapter's shape (``[out, in]``
    of ``lora_B @ lora_A``, transposed for ``fan_in_fan_out``), the module names being relative to the part of the
    model PEFT wrapped; ``None`` where no prefix fits every module (:func:`_base_key` then places each alone).
    Several are refused, naming them: an adapter of open_clip's visual tower fitted the text tower's names exactly
    where the towers have one width (ViT-S-32), and was applied there, changing the text tower alone (an I/O audit).

    Example:
        >>> lora = {"fc": {"lora_A.weight": torch.ones(1, 3), "lora_B.weight": torch.ones(2, 1)}}
        >>> _placement(lora, {"visual.fc.weight": torch.zeros(2, 3), "fc.weight": torch.zeros(3, 3)}, "a", False)
        'visual.'
    """
    fits: set[str] | None = None
    for module, parts in lora.items():
        A, B = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if A is None or B is None or A.dim() != 2 or B.dim() != 2:
            return None   # refused by name where the module is read
        name, shape = f"{module}.weight", (B.shape[0], A.shape[1])
        shape = shape[::-1] if fan_in_fan_out else shape
        here = {n[:len(n) - len(name)] for n in base
                if (n == name or n.endswith("." + name)) and tuple(base[n].shape) == shape}
        fits = here if fits is None else fits & here
        if not fits:
            return None
    if fits is None:
        return None
    if len(fits) > 1:
        shown = " and ".join(repr(p) for p in sorted(fits))
        raise CheckpointError(
            f"{where}: the adapter's {len(lora)} LoRA modules fit the base under each of {shown} (their names, e.g. "
            f"{next(iter(lora))!r}, are relative to the part of the model PEFT wrapped, and the base holds them with "
            f"the adapter's shapes under each): read the base under the prefix of the part it was trained on "
            f"(prefix=, the CLI's --prefix; 'visual.' for open_clip's visual tower)")
    return next(iter(fits))


def _base_key(name: str, names: list[str], where: str, key: str, prefix: str | None = None,
              exact: bool = False, place: str | None = None) -> str | None:
    """The base tensor ``name`` is: ``place + name`` where the adapter has a placement (:func:`_placement`) and the
    base holds it, else the same name, else (but where ``exact``) the one base name that ends with ``.name``;
    ``None`` for none where the base was read under a ``prefix``."""
    if place is not None and place + name in names:
        return place + name
    if name in names:
        return name
    if exact and prefix is not None:
        return None
    ends = [n for n in names if n.endswith("." + name)]
    if len(ends) == 1:
        return ends[0]
    if not ends and prefix is not None:
        return None
    if not ends:
        raise CheckpointError(f"{where}: tensor {key!r} is for {name!r}, which the base does not hold (nor a tensor "
                              f"whose name ends with it); the adapter is for another model")
    raise CheckpointError(f"{where}: tensor {key!r} is for {name!r}, and several base tensors end with it "
                          f"({', '.join(ends[:3])}); give the base with a prefix that leaves one")


def _check_shape(base: Tensor, shape: torch.Size, where: str, key: str, target: str) -> None:
    if tuple(shape) != tuple(base.shape):
        raise CheckpointError(f"{where}: {key} has shape {tuple(shape)}, but the base's {target!r} is "
                              f"{tuple(base.shape)}; the adapter is for another model")


def _rounded(value: Tensor, like: Tensor, where: str, target: str) -> Tensor:
    """``value`` (float64) in ``like``'s dtype, refused where it leaves that dtype's range."""
    if not like.is_floating_point():
        raise CheckpointError(f"{where}: the adapter changes {target!r}, which the base holds as {like.dtype}")
    out, beyond = in_range(value, like.dtype)
    if beyond:
        raise CheckpointError(f"{where}: the adapted {target!r} {beyond}, the base's dtype")
    return out
