"""Checkpoint and recipe I/O: safetensors only (never unpickle), atomic writes, recipes that reproduce a merge.

A *recipe* is the validated description of one merge (method, hyperparameters, calibration, preferences, experts,
seed, layer rule). It is stored inside every exported safetensors file's metadata and as a standalone YAML/JSON file;
:func:`merge_from_recipe` turns it back into the same weights through the library.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import quote, unquote

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .schema import StudioError, brief, check_seed

RECIPE_METADATA_KEY = "merge_studio_recipe"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class CheckpointError(StudioError):
    """A checkpoint or recipe file is missing, unreadable or of an unsupported format."""


def load_state_dict(path: str | os.PathLike, *, prefix: str | None = None, dtype: torch.dtype | None = None,
                    revision: str | None = None, cache_dir: str | os.PathLike | None = None) -> dict[str, Tensor]:
    """Read a checkpoint tensor by tensor (``safe_open``), optionally keeping only keys under ``prefix`` (a
    :class:`CheckpointError` if none is) and converting floating-point tensors to ``dtype``.

    ``path`` is a safetensors file, a folder in the Hugging Face layout or a shard index (see
    :func:`checkpoint_files`), or, as text, a Hub repository ``"owner/name"`` or one of its files
    ``"owner/name/path/in/repo.safetensors"``, either with an optional ``"@revision"`` (or ``revision=``), fetched
    with ``huggingface_hub`` (``HF_HUB_OFFLINE=1`` serves its local cache; a :class:`~pathlib.Path` is always local).
    Pickle-based checkpoints (``.pt``, ``.bin``, ...) are refused: unpickling runs arbitrary code.

    Example:
        >>> import tempfile, torch
        >>> p = Path(tempfile.mkdtemp()) / "m.safetensors"
        >>> _ = save_state_dict(p, {"visual.w": torch.ones(2), "text.w": torch.zeros(1)})
        >>> list(load_state_dict(p, prefix="visual."))
        ['visual.w']
        >>> list(load_state_dict(p.parent))                 # a folder holding one safetensors file
        ['text.w', 'visual.w']
    """
    return load_checkpoint(path, prefix=prefix, dtype=dtype, revision=revision, cache_dir=cache_dir)[0]


def load_checkpoint(source: str | os.PathLike, *, prefix: str | None = None, dtype: torch.dtype | None = None,
                    revision: str | None = None,
                    cache_dir: str | os.PathLike | None = None) -> tuple[dict[str, Tensor], str]:
    """:func:`load_state_dict`, and the source as a recipe records it so that a replay reads the same files: for a
    local source the absolute path of the file it resolved to (a folder's weights file or shard index), for a Hub
    source ``hf://owner/name@<commit>[/file.safetensors]``, pinned to the commit its files came from (also when a
    branch or tag was given); a dataset repository's ``hf://datasets/owner/name...`` likewise."""
    if prefix is not None and not isinstance(prefix, str):
        raise CheckpointError(f"prefix must be text (the start of the tensor names to keep), got {brief(prefix)}")
    if dtype is not None and dtype not in _LOAD_DTYPES:
        raise CheckpointError(f"dtype must be one of torch.float16, torch.bfloat16, torch.float32 or torch.float64 "
                              f"(floating tensors are converted to it), got {brief(dtype)}")
    files, pinned = _resolve(source, revision, cache_dir)
    out: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for file, listed in files:
        with _readable(file):
            with safe_open(str(file), framework="pt") as f:
                keys = list(f.keys())
                missing = sorted(listed - set(keys)) if listed is not None else []
                if missing:
                    raise CheckpointError(f"{file}: its shard index puts {len(missing)} tensor(s) in this file that it "
                                          f"does not hold, e.g. {missing[0]!r}")
                for key in keys:
                    if key in origin:
                        raise CheckpointError(f"{file}: tensor {key!r} is also in {origin[key].name}; each tensor must "
                                              f"be in one shard")
                    origin[key] = file
                    if prefix is None or key.startswith(prefix):
                        t = f.get_tensor(key)
                        out[key] = _converted(t, dtype, file, key) if dtype is not None and t.is_floating_point() \
                            else t
    if prefix is not None and not out:
        raise CheckpointError(f"{source}: no tensor name starts with the prefix {brief(prefix)}")
    return out, pinned


def _converted(t: Tensor, dtype: torch.dtype, file: Path, key: str) -> Tensor:
    """``t`` in ``dtype``, or a :class:`CheckpointError` where finite values leave its range (1e6 in float16 became
    inf, and a merge then blamed the file for infinite values it does not hold)."""
    out, beyond = in_range(t, dtype)
    if beyond:
        raise CheckpointError(f"{file}: tensor {key!r} {beyond}: converting it (dtype={dtype}) would make them "
                              f"infinite; load it in its own dtype or in float32")
    return out


def in_range(t: Tensor, dtype: torch.dtype) -> tuple[Tensor, str]:
    """``t`` in ``dtype``, and what is wrong with it where finite values of ``t`` became infinite there (else "")."""
    out = t.to(dtype)
    if out.dtype == t.dtype or bool(torch.isfinite(out).all()) or not bool(torch.isfinite(t).all()):
        return out, ""
    return out, (f"holds values up to {float(t.abs().max()):.3g} in magnitude, beyond {dtype}'s range "
                 f"(largest {torch.finfo(dtype).max:.3g})")


#: The prefix that makes a source a Hugging Face Hub reference whatever local folders exist (huggingface_hub's URLs).
HUB_SCHEME = "hf://"

#: The shard index ``transformers`` writes (``save_pretrained``) and reads first for sharded safetensors weights.
SHARD_INDEX = "model.safetensors.index.json"


def checkpoint_files(source: str | os.PathLike, *, revision: str | None = None,
                     cache_dir: str | os.PathLike | None = None) -> list[tuple[Path, frozenset[str] | None]]:
    """The safetensors files a checkpoint source names, each with the tensor names its shard index puts in it
    (``None``: not sharded).

    A folder resolves as ``transformers`` resolves safetensors weights: ``model.safetensors``, else the shards
    ``model.safetensors.index.json`` lists, else the shards of the folder's one ``*.safetensors.index.json``, else its
    only ``.safetensors`` file (such as ``open_clip_model.safetensors``). A shard index may also be given itself. A
    Hub repository is resolved by the first two rules, fetching only ``model.safetensors``, or the index and the
    shards it lists; ``owner/name/file.safetensors`` fetches that one file.
    """
    return _resolve(source, revision, cache_dir)[0]


def _resolve(source: str | os.PathLike, revision: str | None,
             cache_dir: str | os.PathLike | None) -> tuple[list[tuple[Path, frozenset[str] | None]], str]:
    """:func:`checkpoint_files`, and the source pinned as :func:`load_checkpoint` records it: the file a local source
    resolved to (a folder's weights file or shard index; its absolute path, symbolic links kept, so a shard index
    still finds its shards), or ``hf://owner/name@<commit>[/file]``."""
    if not isinstance(source, (str, os.PathLike)) or not str(source).strip():
        raise CheckpointError(f"a checkpoint source is a path or a Hub repository name, got {brief(source)}")
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise CheckpointError(f"{shown_path(source)}: revision must be a branch, tag or commit name (a string), got "
                              f"{brief(revision)}")
    explicit = is_hub_url(source)
    if not explicit:
        try:
            path = Path(source).expanduser()
            if path.is_dir():
                entry, files = _folder_files(path)
                return files, os.path.abspath(entry)
            _refuse_pickle(path)
            if path.is_file():
                files = _shards(path) if path.name.endswith(".safetensors.index.json") else [(path, None)]
                return files, os.path.abspath(path)
        except (OSError, RuntimeError) as exc:   # a name too long for the file system, an unknown ~user, ...
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise CheckpointError(f"{shown_path(source)}: cannot be read ({reason})") from exc
    local = not explicit and is_local_path(source)
    given, (source, repo_type) = source, hub_repo_type(source)   # hf://datasets/...: a dataset repository
    repo_type = repo_type or "model"
    spec = hub_spec(source, revision, shown=given)
    if spec is None or local:
        shown = shown_path(given)
        if explicit:
            raise CheckpointError(f"{shown}: not a Hugging Face Hub reference "
                                  f"{HUB_SCHEME}[datasets/]owner/name[@revision][/file.safetensors]")
        link = _broken_link(given)
        if link is not None:
            raise CheckpointError(f"{shown}: {link}")
        raise CheckpointError(f"{shown}: no such file or folder (from {Path.cwd()})" + (
            local_folder_hint(source, spec) if local else
            ", and not a Hugging Face Hub repository 'owner/name[/file.safetensors][@revision]'"))
    repo_id, filename, revision = spec
    if filename is not None:
        file = hub_fetch(repo_id, filename=filename, revision=revision, repo_type=repo_type, cache_dir=cache_dir,
                         shown=given)
        # huggingface_hub's cache keeps a commit's files under snapshots/<commit>/<path in the repository>
        commit = file.parents[len(Path(filename).parts) - 1].name
        return [(file, None)], hub_url(repo_id, filename, commit, repo_type)
    from huggingface_hub import constants

    where = f"the Hub {'repository' if repo_type == 'model' else repo_type} {repo_id!r} at {revision or 'main'}"
    snapshot = hub_fetch(repo_id, revision=revision, repo_type=repo_type, cache_dir=cache_dir, shown=given,
                         allow_patterns=("model.safetensors", SHARD_INDEX))
    pinned = hub_url(repo_id, None, snapshot.name, repo_type)   # the snapshot folder is named by its commit
    if (snapshot / "model.safetensors").is_file():
        return [(snapshot / "model.safetensors", None)], pinned
    if (snapshot / SHARD_INDEX).is_file():
        shards = sorted({shard for _, shard in _weight_map(snapshot / SHARD_INDEX)})
        # the shards of the same commit (the snapshot folder's name), even if the branch moves meanwhile
        hub_fetch(repo_id, revision=snapshot.name, repo_type=repo_type, cache_dir=cache_dir,
                  allow_patterns=tuple(shards), shown=given)
        missing = [shard for shard in shards if not (snapshot / shard).is_file()]
        if missing and constants.HF_HUB_OFFLINE:
            raise CheckpointError(f"{where}: {len(missing)} of the {len(shards)} shards its index lists (e.g. "
                                  f"{missing[0]!r}) are not in the local cache, and offline mode (HF_HUB_OFFLINE) is "
                                  f"on")
        return _shards(snapshot / SHARD_INDEX), pinned
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{where}: neither model.safetensors nor {SHARD_INDEX} is in the local cache, and "
                              f"offline mode (HF_HUB_OFFLINE) is on; name its weights file, "
                              f"{repo_id}/<file>.safetensors, if it has neither")
    raise CheckpointError(f"{where} has neither model.safetensors nor {SHARD_INDEX} at its root: name its weights "
                          f"file, {repo_id}/<file>.safetensors (pickle weights are never fetched)")


def shown_path(source: str | os.PathLike) -> str:
    """A path or source for an error message: whole (a shortened path cannot be found again) unless absurdly long,
    on one line (control characters escaped)."""
    text = str(source)
    if len(text) > 2000:
        text = f"{text[:1000]}...{text[-1000:]}"
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def local_folder_hint(source: Any, spec: tuple[str, str | None, str | None] | None, repo_type: str = "model") -> str:
    """For text read as a local path only because its first folder exists here (:func:`is_local_path`) and that
    also names a Hub repository (``spec``, from :func:`hub_spec`): how to name the repository instead; else ``""``."""
    if spec is None or not isinstance(source, str) or not Path(Path(source).parts[0]).is_dir():
        return ""
    return (f"; read as a local path because a folder {Path(source).parts[0]!r} exists here: write "
            f"{hub_url(*spec, repo_type)} for the Hub repository of that name")


def is_hub_url(source: Any) -> bool:
    """Whether ``source`` is written as a Hub reference, ``hf://...`` (the scheme in any case, as URL schemes)."""
    return isinstance(source, str) and source[:len(HUB_SCHEME)].lower() == HUB_SCHEME


def hub_url(repo_id: str, filename: str | None = None, revision: str | None = None, repo_type: str = "model") -> str:
    """``hf://owner/name[@revision][/file]``, the form :func:`hub_spec` reads back (a revision with ``/`` encoded);
    a dataset repository as ``hf://datasets/owner/name...`` (huggingface_hub's form, :func:`hub_repo_type`)."""
    rev = "" if revision is None else "@" + (revision if re.fullmatch(r"refs/pr/\d+", revision)
                                             else quote(revision, safe=""))
    kind = "" if repo_type == "model" else f"{repo_type}s/"
    return f"{HUB_SCHEME}{kind}{repo_id}{rev}" + (f"/{filename}" if filename else "")


def hub_repo_type(source: Any) -> tuple[Any, str | None]:
    """``(source without its repository type, that type)`` for ``hf://datasets/owner/name...`` (``"dataset"``), the
    URL form huggingface_hub writes for a dataset repository; ``(source, None)`` for anything else.

    Example:
        >>> hub_repo_type("hf://datasets/owner/suite@v1"), hub_repo_type("hf://owner/suite")
        (('hf://owner/suite@v1', 'dataset'), ('hf://owner/suite', None))
    """
    if is_hub_url(source) and source[len(HUB_SCHEME):].startswith("datasets/"):
        return HUB_SCHEME + source[len(HUB_SCHEME) + len("datasets/"):], "dataset"
    return source, None


def is_local_path(source: str | os.PathLike) -> bool:
    """Whether a source that does not exist is still meant as a local path, not a Hub repository: a
    :class:`~pathlib.Path`, or text whose first folder exists here (``models/cars`` with a ``models/`` folder: a
    mistyped file, never sent to the Hub)."""
    parts = Path(source).expanduser().parts
    return not isinstance(source, str) or (len(parts) > 1 and Path(parts[0]).is_dir())


def hub_spec(text: str, revision: str | None = None, error: type[StudioError] | None = None,
             shown: str | None = None) -> tuple[str, str | None, str | None] | None:
    """``(repo_id, file in the repository or None, revision or None)`` for ``owner/name[/path.safetensors][@rev]``
    or, in huggingface_hub's URL form, ``hf://owner/name[@rev][/path.safetensors]``; ``None`` for text that is not
    such a reference. ``owner/name.safetensors`` is read as a mistyped local path, not a repository. A ``revision``
    given besides ``@rev`` must agree with it (the error names the source as ``shown``, e.g. as the caller wrote
    it before :func:`hub_repo_type`; default ``text``)."""
    if not isinstance(text, str):
        return None
    given = shown or text
    if is_hub_url(text):   # hf://owner/name@rev/path -> owner/name/path@rev
        # as huggingface_hub's HfFileSystem: a revision is one path segment (URL-encoded: refs%2Fpr%2F1), or a
        # pull request's or conversion's refs/pr/N, refs/convert/NAME
        url = re.fullmatch(r"([^/@]+)/([^/@]+)(?:@(refs/pr/\d+|refs/convert/[^/@]+|[^/@]+))?(?:/([^@]+))?",
                           text[len(HUB_SCHEME):])
        if url is None or (url[4] is not None and (url[4].endswith("/") or "//" in url[4])):
            return None
        owner, name, rev, path = url.groups()
        text = "/".join(p for p in (owner, name, path) if p) + (f"@{unquote(rev)}" if rev else "")
    spec, at, rev = text.partition("@")
    parts = spec.split("/")
    if (at and not rev) or "@" in rev or len(parts) < 2 or not all(p for p in parts) \
            or not all(re.fullmatch(r"[A-Za-z0-9][\w.-]*", p) for p in parts[:2]):
        return None
    if len(parts) == 2 and Path(parts[1]).suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        return None
    if any(p in (".", "..") for p in parts[2:]):
        return None
    if rev.lower().endswith(".safetensors") and "/" in rev:   # hf://'s order in the plain form
        good = f"{'/'.join(parts)}/{rev.split('/', 1)[1]}@{rev.split('/', 1)[0]}"
        raise (error or CheckpointError)(
            f"{given}: reads as revision {rev!r}; in this form the file comes before the revision ({good}), in "
            f"the URL form after it (hf://{'/'.join(parts)}@{rev})")
    filename = "/".join(parts[2:]) or None
    if filename is not None and not filename.endswith(".safetensors"):
        return None
    if rev and revision is not None and rev != revision:
        raise (error or CheckpointError)(f"{given}: names revision {rev!r} but revision={revision!r} was also given")
    return "/".join(parts[:2]), filename, rev or revision


def hub_fetch(repo_id: str, *, filename: str | None = None, revision: str | None = None, repo_type: str = "model",
              cache_dir: str | os.PathLike | None = None, allow_patterns: tuple[str, ...] | None = None,
              what: str = "checkpoint", error: type[StudioError] | None = None, shown: str | None = None) -> Path:
    """Fetch a repository snapshot (the files matching ``allow_patterns``; ``None``: every file), or one of its
    files, with ``huggingface_hub``, and return its local path. Any failure (offline and not cached, unknown
    repository or revision, network) becomes one :class:`CheckpointError` (or ``error``) naming the source (as the
    caller was given it: ``shown``), on one line."""
    from huggingface_hub import constants, hf_hub_download, snapshot_download

    cache = str(cache_dir) if cache_dir is not None else None
    try:
        if filename is not None:
            return Path(hf_hub_download(repo_id, filename, revision=revision, repo_type=repo_type, cache_dir=cache))
        return Path(snapshot_download(repo_id=repo_id, revision=revision, repo_type=repo_type, cache_dir=cache,
                                      allow_patterns=list(allow_patterns) if allow_patterns is not None else None))
    except Exception as exc:  # network, offline-and-not-cached, unknown repo: all user-facing
        hint = " (offline mode, HF_HUB_OFFLINE, is on and it is not in the local cache)" \
            if constants.HF_HUB_OFFLINE else ""
        source = shown or repo_id + (f"/{filename}" if filename else "") + (f"@{revision}" if revision else "")
        cached = _cached_revisions(repo_id, repo_type, cache) if constants.HF_HUB_OFFLINE and revision else None
        if cached:   # the repository is cached, only not at this revision: say which ones it is at
            full = [c for c in _cached_commits(repo_id, repo_type, cache) if c.startswith(str(revision).lower())]
            short = (f"; offline, a commit is found by its full hash only: {full[0]}"
                     if len(full) == 1 and len(str(revision)) < 40 else "")
            raise (error or CheckpointError)(
                f"{source!r}: {repo_id} is in the local cache, but not at revision {revision!r} (cached: "
                f"{', '.join(cached)}), and offline mode (HF_HUB_OFFLINE) is on{short}") from exc
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())   # huggingface_hub's messages span lines
        local = "" if is_hub_url(source) else f" is not a local path (from {Path.cwd()}), and"
        raise (error or CheckpointError)(
            f"{source!r}{local} cannot be fetched as a {what} from the Hugging Face Hub{hint}: "
            f"{reason if len(reason) <= 400 else reason[:400] + '...'}") from exc


def _repo_cache(repo_id: str, repo_type: str, cache_dir: str | None) -> Path:
    """A repository's folder in the local Hugging Face cache (``models--owner--name``)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type)


def _cached_revisions(repo_id: str, repo_type: str, cache_dir: str | None) -> list[str]:
    """The branches or tags (``main -> 1a2b3c4``) and commits a repository has in the local Hugging Face cache."""
    folder = _repo_cache(repo_id, repo_type, cache_dir)
    with contextlib.suppress(OSError, ValueError):
        refs = sorted(f"{p.relative_to(folder / 'refs')} -> {p.read_text().strip()[:7]}"
                      for p in (folder / "refs").rglob("*") if p.is_file())
        named = {line.rsplit(" ", 1)[1] for line in refs}
        commits = sorted(p.name[:7] for p in (folder / "snapshots").iterdir() if p.name[:7] not in named)
        return refs + commits
    return []


def _cached_commits(repo_id: str, repo_type: str, cache_dir: str | None) -> list[str]:
    """The full commit hashes a repository has snapshots of in the local Hugging Face cache."""
    with contextlib.suppress(OSError):
        return sorted(p.name for p in (_repo_cache(repo_id, repo_type, cache_dir) / "snapshots").iterdir())
    return []


def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle checkpoints are not loaded (unsafe); convert it to .safetensors first")


def _folder_choice(names: "set[str] | frozenset[str]") -> str | None:
    """The name of the file a folder holding the files ``names`` resolves to: ``model.safetensors``, else
    ``model.safetensors.index.json``, else its one ``*.safetensors.index.json``, else its one ``*.safetensors``
    file; None where there is none of these, or more than one candidate."""
    if "model.safetensors" in names:
        return "model.safetensors"
    if SHARD_INDEX in names:
        return SHARD_INDEX
    indexes = [n for n in names if n.endswith(".safetensors.index.json")]
    files = [n for n in names if n.endswith(".safetensors")]
    if len(indexes) == 1:
        return indexes[0]
    if not indexes and len(files) == 1:
        return files[0]
    return None


def _file_names(folder: Path) -> set[str]:
    """The names of the entries of ``folder`` that are not folders: its files, and links to nothing (chosen, their
    reading says what they are)."""
    return {p.name for p in folder.iterdir() if not p.is_dir()}


def _folder_files(folder: Path) -> tuple[Path, list[tuple[Path, frozenset[str] | None]]]:
    """The file a folder resolves to (its weights file or its shard index, :func:`_folder_choice`) and the files
    it reads."""
    chosen = _folder_choice(_file_names(folder))
    if chosen is not None and chosen.endswith(".index.json"):
        return folder / chosen, _shards(folder / chosen)
    if chosen is not None:
        return folder / chosen, [(folder / chosen, None)]
    found = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in (".safetensors", ".json", *PICKLE_SUFFIXES))
    pickles = " (pickle files are not loaded: convert them to .safetensors)" \
        if any(Path(n).suffix.lower() in PICKLE_SUFFIXES for n in found) else ""
    raise CheckpointError(f"{folder}: expected model.safetensors, one *.safetensors.index.json or a single "
                          f".safetensors file; found {brief(found) if found else 'none of these'}{pickles}. Give "
                          f"the file's path")


def _weight_map(index: Path) -> list[tuple[str, str]]:
    """The ``(tensor name, shard file)`` pairs of a shard index, checked."""
    class _Object(dict):   # a JSON object that remembers the names it repeats (json keeps the last silently)
        repeated: list[str]

    def pairs(items: list[tuple[str, Any]]) -> _Object:
        obj = _Object(items)
        obj.repeated = sorted(k for k, n in collections.Counter(k for k, _ in items).items() if n > 1)
        return obj

    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"), object_pairs_hook=pairs)["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        why = str(exc)[:200]   # a decode error's repr holds the whole file
        raise CheckpointError(f"{index}: not a readable shard index with a 'weight_map' ({type(exc).__name__}: "
                              f"{why})") from exc
    if isinstance(weight_map, Mapping) and not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' is empty: the index lists no tensor")
    if not isinstance(weight_map, Mapping) \
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: 'weight_map' must map each tensor name to its shard file name")
    if weight_map.repeated:
        raise CheckpointError(f"{index}: 'weight_map' lists {weight_map.repeated[0]!r} more than once")
    return list(weight_map.items())


def _shards(index: Path) -> list[tuple[Path, frozenset[str] | None]]:
    """The shard files of a shard index (Hugging Face's sharded layout), each with the tensors it should hold."""
    by_shard: dict[str, list[str]] = {}
    for key, shard in _weight_map(index):   # one shard named two ways ("s1", "./s1") is one file
        by_shard.setdefault(os.path.normpath(shard), []).append(key)
    out = []
    for shard, keys in by_shard.items():
        what = f"{index}: shard {shard!r} (holding {len(keys)} tensor(s), e.g. {keys[0]!r})"
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{what} is outside the index's folder")
        path = index.parent / shard
        _refuse_pickle(path)
        if not path.is_file():
            raise CheckpointError(f"{what} is missing from {index.parent}")
        out.append((path, frozenset(keys)))
    return out


@contextlib.contextmanager
def path_errors(path: "str | os.PathLike", action: str | None = None) -> Iterator[None]:
    """A path the file system cannot look up (too long a name, a NUL byte, a loop of symbolic links), where
    pathlib's checks raise ``OSError``, ``ValueError`` or ``RuntimeError``, as a :class:`CheckpointError` naming it
    (``cannot <action> <path>: <why>`` with an ``action``).

    Example:
        >>> with path_errors("a" * 300):
        ...     Path("a" * 300).is_file()
        Traceback (most recent call last):
        studio.io.CheckpointError: aaaa...aaaa: not a usable path (File name too long)
    """
    try:
        yield
    except StudioError:
        raise
    except (OSError, ValueError, RuntimeError) as exc:
        why = "a loop of symbolic links" if isinstance(exc, RuntimeError) else getattr(exc, "strerror", None) or exc
        name = str(path) if len(str(path)) <= 80 else f"{str(path)[:4]}...{str(path)[-4:]}"
        raise CheckpointError(f"cannot {action} {name}: {why}" if action else f"{name}: not a usable path ({why})") \
            from None


def _checked_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    _refuse_pickle(path)
    with path_errors(path):
        if path.is_dir():
            raise CheckpointError(f"{path} is a folder; give a safetensors file")
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
    return path


@contextlib.contextmanager
def _readable(path: Path, error: type[StudioError] | None = None) -> Iterator[None]:
    """Turn a failed read of the safetensors file ``path`` (truncated, empty, not safetensors, unreadable) into a
    :class:`CheckpointError` (or ``error``) that names the file. safetensors raises its own ``SafetensorError``,
    which derives from ``Exception`` only."""
    try:
        yield
    except StudioError:   # already names what is wrong
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        if _is_pickle(path):   # e.g. torch.save's output renamed to .safetensors
            raise (error or CheckpointError)(f"{path}: not safetensors but, by its first bytes, a torch.save "
                                             f"checkpoint or a Python pickle; pickles are not loaded (unsafe): "
                                             f"convert it to .safetensors first") from exc
        raise (error or CheckpointError)(f"{path}: not a readable safetensors file ({_why_unreadable(path, exc)})") \
            from exc


def _why_unreadable(path: Path, exc: BaseException) -> str:
    """What is wrong with a file safetensors could not read, where its first 8 bytes (the header's length) tell more
    than its message (a length past the file's end read as "invalid UTF-8 in header"; a file of zeros as "invalid
    JSON ... EOF"); else its message."""
    link = _broken_link(path)
    if link is not None:
        return link
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return f"{exc}"
    if len(head) < 8:
        return f"{exc}"
    length = int.from_bytes(head, "little")
    if length == 0:
        return "its header's length is 0 (a file of zeros?): not a safetensors file"
    if length > size - 8:
        return (f"its first 8 bytes give a header of {length:,} bytes, and the file holds {size - 8:,} after them: "
                f"truncated, or not a safetensors file")
    return f"{exc}"


def _broken_link(path: "str | os.PathLike") -> str | None:
    """What a symbolic link that leads to no file is (a missing target, or a loop of links), else None."""
    with contextlib.suppress(OSError, ValueError, TypeError):
        if Path(path).is_symlink() and not Path(path).exists():
            return (f"a symbolic link to {os.readlink(path)!r}, which leads to no file (a missing target, or a loop "
                    f"of links)")
    return None


def _is_pickle(path: Path) -> bool:
    """Whether ``path`` starts as torch.save's files do, a zip archive (since torch 1.6), or as a pickle of protocol
    2 to 5 does (its PROTO opcode: torch's legacy format, ``pickle.dump``). Asked only of a file safetensors could
    not read."""
    with contextlib.suppress(OSError):
        with open(path, "rb") as f:
            head = f.read(4)
        return head == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)
    return False


def load_safetensors(path: str | os.PathLike, error: type[StudioError] | None = None) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, or a :class:`CheckpointError` (or ``error``) naming the file."""
    path = Path(path)
    with _readable(path, error):
        return load_file(str(path))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (a :class:`CheckpointError` naming the file if it is
    missing or unreadable)."""
    path = _checked_path(path)
    with _readable(path):
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})


def _process_umask() -> int:
    """The process's umask, read without changing it (``os.umask`` can only be read by setting it, which would
    briefly give files that other threads create at that moment mode 0666)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _IMPORT_UMASK


_IMPORT_UMASK = os.umask(0)
os.umask(_IMPORT_UMASK)


#: This machine in the names of :func:`atomic_write`'s staged files (a hash of its host name: a folder on a network
#: file system may be shared with processes of other machines, whose process ids say nothing here).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _staging_prefix(path: Path) -> str:
    """How the names of the folders :func:`atomic_write` stages ``path`` in on this machine begin; the process id
    and ``-`` follow, then mkdtemp's random part and ``.tmp``."""
    return f".{path.name}.{_HOST}-"


def _staged_name(path: Path) -> re.Pattern:
    """The names of the folders :func:`atomic_write` stages ``path`` in on this machine; group 1 is the process id."""
    return re.compile(re.escape(_staging_prefix(path)) + r"([0-9]+)-[^/]*\.tmp\Z")


def _process_gone(pid: int) -> bool:
    """Whether no process ``pid`` runs on this machine (a process of another user runs; so does a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:   # PermissionError: another user's process
        return False
    return False


def remove_stale_staged_files(path: str | os.PathLike) -> list[str]:
    """Remove the staging folders :func:`atomic_write` made for ``path`` in processes of this machine that are gone,
    and return their paths. A write killed where nothing can clean up after it (SIGKILL, the kernel's out-of-memory
    killer, a lost container) leaves its hidden staged file, as large as the output, beside ``path``; the next write
    of ``path`` removes it (with a warning naming it). Only a folder of this user, named for ``path``, this machine
    (a hash of its host name) and a process id that no longer runs is removed: a write under way in another process,
    or from another machine sharing the folder, keeps its own. POSIX only (elsewhere nothing is removed)."""
    path = Path(path)
    if os.name != "posix":
        return []
    pattern, removed = _staged_name(path), []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or not _process_gone(int(match.group(1))):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                continue
            shutil.rmtree(entry.path)
        except OSError:
            continue
        removed.append(entry.path)
    return removed


@contextlib.contextmanager
def atomic_write(path: Path, before_replace: Callable[[], None] | None = None) -> Iterator[str]:
    """A temporary file beside ``path`` to write into; renamed onto ``path`` when the block ends, removed (with any
    folders made for it) if it raises, so ``path`` is never half-written. OS errors become a
    :class:`CheckpointError` naming ``path`` (not the temporary file), and so do safetensors' write errors (a full
    disk). A symbolic link is written through (its target is replaced, the link stays). A device, FIFO or socket
    is refused: the rename would replace it with a regular file (``/dev/null`` itself, for root).

    The file is flushed to the disk (``fsync``) before the rename, so that after a crash of the system, not only of
    the process, ``path`` holds the old file or the whole new one. A file it replaces keeps its permissions (a
    private ``0600`` export stays private); a new one gets the usual ``0666`` less the umask.
    ``before_replace``: called after the flush, right before the rename (:func:`save_merged` renames the recipe
    there); if it raises, the temporary file is removed as for any error.

    The temporary file is written in a hidden staging folder beside ``path``, named for it, this machine and this
    process (``.NAME.HOST-PID-XXXXXXXX.tmp/``), which also holds safetensors' own temporary file while it writes:
    one that a killed process left is removed by the next write of ``path`` (:func:`remove_stale_staged_files`)."""
    if "\x00" in str(path):   # pathlib's checks answer False for it, and mkdtemp raises ValueError
        raise CheckpointError(f"cannot write {str(path)!r}: a file name cannot hold a NUL byte")
    with path_errors(path, "write"):
        if path.is_symlink():
            path = path.resolve()
        mode = path.stat().st_mode if path.exists() else None
        blocking = file_in_the_way(path)
        made = [p for p in reversed(path.parents) if not p.exists()]
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CheckpointError(f"cannot write {path}: it is a device, FIFO or socket, which writing the file and "
                              f"renaming it into place would replace; give the name of a regular file")
    if blocking is not None:
        raise CheckpointError(f"cannot write {path}: {blocking} is a file, not a folder")
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_staged_files(path):
            warnings.warn(f"removed {stale}, the staged file of an interrupted write of {path} (its process is "
                          f"gone)", stacklevel=3)
        staging = tempfile.mkdtemp(dir=path.parent, prefix=f"{_staging_prefix(path)}{os.getpid()}-", suffix=".tmp")
        tmp = os.path.join(staging, path.name)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        # staged as 0600: a new file gets the usual permissions, a replaced one keeps its own
        os.chmod(tmp, stat.S_IMODE(mode) if mode is not None else 0o666 & ~_process_umask())
        _fsync(tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        staged, staging = staging, None   # written: nothing after this may fail the write
        shutil.rmtree(staged, ignore_errors=True)   # empty now
        with contextlib.suppress(OSError):   # the rename itself, in the folder (where the file system allows it)
            _fsync(path.parent)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(exc, OSError):
            raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
        if isinstance(exc, SafetensorError):   # e.g. "Error while serializing: I/O error: No space left on device"
            raise CheckpointError(f"cannot write {path}: {exc}") from exc
        raise


def _fsync(path: "str | Path") -> None:
    """Flush a file's (or a folder's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_weights_path(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path`, if safetensors weights may be written there: not under a pickle checkpoint's
    suffix (``.pt``, ``.bin``, ...), which loaders refuse or misread (:func:`load_state_dict` among them)."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"the weights' file name must be text or a path, got {brief(path)}")
    if not str(path).strip():
        raise CheckpointError("the weights' file name is empty; give a .safetensors file name")
    path = Path(path)
    with path_errors(path):
        folder = path.is_dir()
    if folder:   # refused before a merge runs, not when its output is renamed into place
        raise CheckpointError(f"cannot write {path}: it is a folder; give a file name (e.g. "
                              f"{path / 'model.safetensors'})")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"cannot write {path}: it would be a safetensors file under a pickle checkpoint's "
                              f"suffix, which loaders refuse or misread (this one among them); name it "
                              f"{path.with_suffix('.safetensors').name}")
    return path


def file_in_the_way(path: Path, *, itself: bool = False) -> Path | None:
    """The nearest of ``path``'s parents (``path`` first, with ``itself``) that exists and is not a folder: a file
    that writing ``path`` (a folder, with ``itself``) would need to be a folder. None if there is none.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     f = Path(d) / "f"
        ...     f.touch()
        ...     file_in_the_way(f / "out.json") == f, file_in_the_way(f), file_in_the_way(f, itself=True) == f
        (True, None, True)
    """
    return next((p for p in ((path,) if itself else ()) + tuple(path.parents) if p.exists() and not p.is_dir()),
                None)


def check_writable(path: str | os.PathLike) -> Path:
    """``path`` as a :class:`Path`, if a file can be written there: not a folder, under a folder that exists or can
    be made (:func:`atomic_write` makes the missing ones), which is probed with a temporary file. For a command to
    refuse an output before minutes of work, not when the output is written."""
    path = Path(path)
    with path_errors(path, "write"):
        if path.is_dir():
            raise CheckpointError(f"cannot write {path}: it is a folder; give a file name")
        folder = next(p for p in path.absolute().parents if p.exists())
        if not folder.is_dir():
            raise CheckpointError(f"cannot write {path}: {folder} is a file, not a folder")
        with tempfile.TemporaryFile(dir=folder):
            pass
    return path


#: The dtypes ``safetensors.torch`` writes.
_SAFETENSORS_DTYPES = frozenset(
    getattr(torch, name) for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32", "uint64",
        "complex64")
    if hasattr(torch, name))


def save_state_dict(path: str | os.PathLike, state_dict: Mapping[str, Tensor],
                    metadata: Mapping[str, str] | None = None, *,
                    before_replace: Callable[[], None] | None = None) -> Path:
    """Write ``state_dict`` to ``path`` atomically (temp file + rename: never a half-written file).

    Keys must be strings and values dense tensors of a dtype safetensors stores, ``metadata`` a mapping of strings
    to strings (a :class:`CheckpointError` names the first that is not); tensors that share memory (tied weights)
    are written as separate copies, which safetensors requires. ``before_replace``: see :func:`atomic_write`.
    """
    path = check_weights_path(path)
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"cannot save {type(state_dict).__name__} to {path}: expected a state dict (a mapping "
                              f"of names to tensors)")
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"cannot save {path} with metadata {brief(metadata)}: safetensors metadata is a "
                              f"mapping of strings to strings")
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise CheckpointError(f"cannot save key {brief(k)} to {path}: safetensors keys must be strings")
        if not isinstance(v, Tensor):
            raise CheckpointError(f"cannot save '{k}' to {path}: expected a tensor, got {type(v).__name__}")
        if v.layout != torch.strided or v.is_meta or v.is_quantized or v.dtype not in _SAFETENSORS_DTYPES:
            kind = ("a meta tensor (no values)" if v.is_meta else f"a {v.layout} tensor"
                    if v.layout != torch.strided else f"dtype {v.dtype}")
            raise CheckpointError(f"cannot save '{k}' to {path}: it is {kind}; safetensors stores dense tensors "
                                  f"of the usual dtypes (convert it first, e.g. .to_dense() or .dequantize())")
        t = v.detach().contiguous().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[k] = t
    with atomic_write(path, before_replace) as tmp:
        # safetensors (0.8) writes an unreadable header for no tensors and empty metadata ('{},"__metadata__":{}}')
        save_file(tensors, tmp, metadata=dict(metadata or {}) if tensors or metadata else None)
        _sort_metadata(tmp)
    return path


def _sort_metadata(path: str | os.PathLike) -> None:
    """Put the metadata entries of a safetensors file's header in sorted order, in place: safetensors writes them in
    its hash map's order, which changes from process to process, so the same weights and recipe gave files whose
    bytes (and checksums) differed. The header keeps its length (same entries, same JSON escapes, padded with spaces
    as safetensors pads it); where it would not, the file is left as it is."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
        header = json.loads(raw, object_pairs_hook=dict)
        meta = header.get("__metadata__")
        if not isinstance(meta, dict) or len(meta) < 2:
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size or text.rstrip() == raw.rstrip():
            return
        f.seek(8)
        f.write(text.ljust(size, b" "))


#: The dtypes ``load_state_dict(dtype=...)`` converts floating tensors to (those a merge computes from).
_LOAD_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

FINGERPRINT_PREFIX = "sha256:"
_FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def tensor_bytes(t: Tensor) -> Any:
    """A tensor's values as a flat NumPy ``uint8`` array (host memory; conjugate and negative views resolved), what
    :func:`fingerprint` and the diagnostics' memo keys hash. Sparse and meta tensors raise PyTorch's error."""
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()


def fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """Content identity of a state dict: ``sha256:`` and the SHA-256 of every tensor's name, dtype, shape and bytes,
    in name order. Equal for the same weights wherever and however they were stored (one file, shards, another
    folder, a Hub commit); any changed bit, name, dtype or shape changes it.

    Example:
        >>> sd = {"w": torch.zeros(2, 2)}
        >>> same, other = {"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}
        >>> fingerprint(sd) == fingerprint(same), fingerprint(sd) == fingerprint(other)
        (True, False)
    """
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"a fingerprint is taken of a state dict (a mapping of names to tensors), got "
                              f"{brief(state_dict)}")
    digest = hashlib.sha256()
    for key in sorted(state_dict, key=str):
        t = state_dict[key]
        if not isinstance(t, Tensor):
            raise CheckpointError(f"key {brief(key)}: a state dict's values must be tensors, got {brief(t)}")
        try:
            data = tensor_bytes(t)
        except (RuntimeError, NotImplementedError, TypeError) as exc:   # sparse, meta, ... tensors have no bytes
            raise CheckpointError(f"key {brief(key)}: a {t.layout} {t.dtype} tensor on {t.device} has no bytes to "
                                  f"fingerprint ({type(exc).__name__}); expected a dense tensor with data") from None
        digest.update(f"{key}\0{str(t.dtype).removeprefix('torch.')}\0{tuple(t.shape)}\0{data.nbytes}\0".encode())
        digest.update(data)   # hashlib releases the GIL here: input_fingerprints hashes state dicts in parallel
    return FINGERPRINT_PREFIX + digest.hexdigest()


def input_fingerprints(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """The fingerprints of a merge's inputs as :attr:`Recipe.fingerprints` records them: ``{"base": ...,
    "experts": {name: ...}}`` (:func:`fingerprint`; one state dict per merge worker, :mod:`studio.parallel`,
    ~1.7 GB/s each here)."""
    from .parallel import parallel_map

    base_digest, *digests = parallel_map(fingerprint, [base, *experts.values()])
    return {"base": base_digest, "experts": dict(zip(experts, digests))}


def check_fingerprints(recorded: Mapping[str, Any] | None, base: Mapping[str, Tensor],
                       experts: Mapping[str, Mapping[str, Tensor]], *, skip: frozenset = frozenset(),
                       sources: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Compare the inputs of a replay with the fingerprints a recipe recorded (``recorded``: its ``base`` and
    ``experts`` entries; None: nothing to compare) and return the inputs' fingerprints. A
    :class:`CheckpointError` names each base or expert whose weights differ (with its source, if ``sources`` says),
    before any merge is computed; so does a recorded expert missing from ``experts`` (a guard for direct callers:
    :func:`recipe_inputs` refuses that first for a recipe). ``skip``: expert names, and None for the base, that the
    caller chose to replace. ``sources``: what each was read from, as
    :attr:`Recipe.sources` (or :attr:`studio.suite.Suite.weight_files`), for the message.
    """
    now = input_fingerprints(base, experts)
    if not recorded:
        return now
    wanted = [(None, recorded.get("base")), *recorded.get("experts", {}).items()]
    changed = []
    for name, want in wanted:
        if want is None or name in skip:
            continue
        source = (sources or {}).get("base") if name is None else (sources or {}).get("experts", {}).get(name)
        what = f"{'the base' if name is None else f'expert {name!r}'}{f' ({shown_path(source)})' if source else ''}"
        if name is not None and name not in now["experts"]:
            changed.append(f"expert {name!r}: recorded {want[:19]}..., not among the experts read "
                           f"{sorted(now['experts'])}")
            continue
        got = now["base"] if name is None else now["experts"][name]
        if got != want:
            changed.append(f"{what}: recorded {want[:19]}..., read {got[:19]}...")
    if changed:
        raise CheckpointError("the weights differ from those the recipe merged, so the merge would not be the same: "
                              + "; ".join(changed))
    return now


#: The :class:`Recipe` fields that decide the merged weights besides the inputs (:meth:`Recipe.settings_fingerprint`).
_SETTINGS = ("method", "hparams", "experts", "calibrate", "calibrate_hparams", "preferences", "seed", "layer_rule",
             "svd_mode", "prefix")


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
    # the merge saw only the tensors whose names start with this (the CLI's --prefix); None: every tensor
    prefix: str | None = None
    # the checkpoints the CLI's --base/--expert merge read, as load_checkpoint records them: {"base": source,
    # "experts": {name: source}}, which ``merge-studio recipe`` reads again; None: a suite's merge, or the library's
    sources: dict[str, Any] | None = None
    # the weights it merged and made, as fingerprint() digests: {"base": ..., "experts": {name: ...}, "merged": ...},
    # and "settings": settings_fingerprint() when it made them (any part may be left out; recorded experts must be
    # among those listed). merge_from_recipe refuses inputs that differ; a replay says if its output is the same bits,
    # and if not, whether the settings were edited since. None: nothing recorded (recipes of versions before this
    # field, or written by hand)
    fingerprints: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        from .layers import LayerRule, RULES

        if isinstance(self.layer_rule, LayerRule):
            preset = RULES.get(self.layer_rule.name)
            self.layer_rule = preset.name if preset == self.layer_rule else self.layer_rule.to_dict()
        self._check_types()
        # NumPy scalars and one-element tensors, which a merge accepts, as the Python values YAML and JSON write
        for name in ("hparams", "calibrate_hparams"):
            setattr(self, name, {k: _plain(v, f"{name}.{k}") for k, v in getattr(self, name).items()})
        if self.preferences is not None:
            self.preferences = {k: _plain(v, f"preferences.{k}") for k, v in self.preferences.items()}

    def _check_types(self) -> None:
        """Each field of the type a merge needs, or a :class:`CheckpointError` naming the field and the value; the seed
        set to the int a merge reads of it (:func:`~studio.schema.check_seed`)."""
        def bad(name: str, expected: str) -> CheckpointError:
            return CheckpointError(f"recipe field '{name}' must be {expected}, got {brief(getattr(self, name))}")

        if not isinstance(self.method, str):
            raise bad("method", "a method name (see studio.list_methods())")
        for name in ("hparams", "calibrate_hparams"):
            if not isinstance(getattr(self, name), Mapping):
                raise bad(name, "a mapping of hyperparameter names to values")
        if isinstance(self.experts, (str, bytes)) or not isinstance(self.experts, (list, tuple)) \
                or not all(isinstance(e, str) for e in self.experts):
            raise bad("experts", "a list of expert names")
        dup = sorted({e for e in self.experts if list(self.experts).count(e) > 1})
        if dup:
            raise CheckpointError(f"recipe lists expert(s) {dup} more than once; each expert can be merged once")
        self.experts = list(self.experts)
        if self.calibrate is not None and not isinstance(self.calibrate, str):
            raise bad("calibrate", "a calibration name or null")
        if not isinstance(self.studio_version, str):
            raise bad("studio_version", "the version text of the merge-studio that wrote the recipe")
        if self.suite is not None and not isinstance(self.suite, str):
            raise bad("suite", "a suite's folder, Hub repository or name, or null")
        if not isinstance(self.svd_mode, str):
            raise bad("svd_mode", "'auto' or 'exact'")
        if self.preferences is not None and not isinstance(self.preferences, Mapping):
            raise bad("preferences", "a mapping of expert names to weights, or null")
        for name in ("hparams", "calibrate_hparams", "preferences"):   # JSON would turn other keys into text
            keys = [k for k in (getattr(self, name) or {}) if not isinstance(k, str)]
            if keys:
                raise CheckpointError(f"recipe field '{name}' must be keyed by names (text), got the key "
                                      f"{brief(keys[0])}")
        try:   # as a merge reads it: a NumPy integer, an integral float (3.0), as the int YAML and JSON write
            self.seed = check_seed(self.seed, CheckpointError)
        except CheckpointError:
            raise bad("seed", "an integer") from None
        if self.layer_rule is not None and not isinstance(self.layer_rule, (str, Mapping)):
            raise bad("layer_rule", "a rule name, a mapping with 'exclude' patterns, or null")
        if isinstance(self.layer_rule, Mapping):   # its patterns and name, checked as a merge would read them
            from .layers import LayerRule

            try:
                LayerRule.from_dict(self.layer_rule)
            except StudioError as exc:
                raise CheckpointError(f"recipe field 'layer_rule': {exc}") from None
        if self.prefix is not None and (not isinstance(self.prefix, str) or not self.prefix):
            raise bad("prefix", "a non-empty tensor-name prefix or null (every tensor)")
        if self.sources is not None:
            given = self.sources
            shape = "a mapping {base: checkpoint source, experts: {expert name: checkpoint source}} or null"
            if not isinstance(given, Mapping) or set(given) != {"base", "experts"}:
                raise bad("sources", shape)
            experts = given["experts"]
            if not isinstance(experts, Mapping):
                raise CheckpointError(f"recipe field 'sources.experts' must map expert names to checkpoint sources, "
                                      f"got {brief(experts)}")
            for where, value in [("sources.base", given["base"]),
                                 *((f"sources.experts.{k if isinstance(k, str) else brief(k)}", v)
                                   for k, v in experts.items())]:
                if not isinstance(value, str) or not value.strip():
                    raise CheckpointError(f"recipe field '{where}' must be a checkpoint source (a path or a Hub "
                                          f"repository), got {brief(value)}")
            named = [k for k in experts if not isinstance(k, str)]
            if named:
                raise CheckpointError(f"recipe field 'sources.experts' must be keyed by expert names (text), got "
                                      f"{brief(named[0])}")
            if not experts:
                raise CheckpointError("recipe field 'sources.experts' names no expert; a merge needs at least one")
            if self.suite is not None:
                raise CheckpointError(f"recipe names both a suite ({brief(self.suite)}) and checkpoint 'sources'; "
                                      f"a merge reads one or the other")
            if not self.experts:   # no list: every expert, i.e. those the sources name
                self.experts = list(experts)
            if set(experts) != set(self.experts):
                raise CheckpointError(f"recipe field 'sources' names the experts {sorted(experts)}, but the recipe "
                                      f"merges {sorted(self.experts)}")
            self.sources = {"base": given["base"], "experts": dict(experts)}
        if self.fingerprints is not None:
            self.fingerprints = self._checked_fingerprints(self.fingerprints)

    def settings_fingerprint(self) -> str:
        """``sha256:`` and the SHA-256 of what decides the merged weights besides the inputs: the method, its
        hyperparameters, the calibration and its hyperparameters, the preferences, seed, layer rule, SVD mode,
        prefix, and the experts in order. :meth:`recording` stores it, so that a replay can tell an edited recipe.

        Example:
            >>> r = Recipe(method="ties", hparams={"k": 0.2})
            >>> r.settings_fingerprint() == Recipe(method="ties", hparams={"k": 0.2}, suite="x").settings_fingerprint()
            True
            >>> r.settings_fingerprint() == Recipe(method="ties", hparams={"k": 0.3}).settings_fingerprint()
            False
        """
        settings = {name: getattr(self, name) for name in _SETTINGS}
        text = json.dumps(settings, sort_keys=True, default=str, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()

    def recording(self, inputs: Mapping[str, Any], merged: str) -> "Recipe":
        """This recipe with :attr:`fingerprints` recording the merge it describes: ``inputs`` (the base's and
        experts' fingerprints, :func:`input_fingerprints`), the ``merged`` weights' fingerprint and its own
        :meth:`settings_fingerprint`."""
        return replace(self, fingerprints={**inputs, "merged": merged, "settings": self.settings_fingerprint()})

    def _checked_fingerprints(self, given: Any) -> dict[str, Any]:
        shape = "a mapping with some of base, experts ({expert name: digest}), merged and settings, each digest " \
                "'sha256:' and 64 hex digits as studio.io.fingerprint writes it (null, or the field left out: none " \
                "recorded)"
        if not isinstance(given, Mapping) or not given:
            raise CheckpointError(f"recipe field 'fingerprints' must be {shape}, got {brief(given)}")
        unknown = sorted(map(str, set(given) - {"base", "experts", "merged", "settings"}))
        if unknown:
            raise CheckpointError(f"recipe field 'fingerprints' has unknown part(s) {unknown}; expected some of base, "
                                  f"experts, merged and settings")
        experts = given.get("experts", {})
        if not isinstance(experts, Mapping):
            raise CheckpointError(f"recipe field 'fingerprints.experts' must map expert names to digests, got "
                                  f"{brief(experts)}")
        for where, value in [*((f"fingerprints.{k}", given[k]) for k in ("base", "merged", "settings") if k in given),
                             *((f"fingerprints.experts.{k if isinstance(k, str) else brief(k)}", v)
                               for k, v in experts.items())]:
            if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
                raise CheckpointError(f"recipe field '{where}' must be a digest, 'sha256:' and 64 lowercase hex "
                                      f"digits, got {brief(value)}")
        if "experts" in given and not experts:
            raise CheckpointError("recipe field 'fingerprints.experts' names no expert; leave it out, or record the "
                                  "experts the recipe merges")
        if experts and not self.experts:   # "every expert" would silently become those recorded
            raise CheckpointError(f"recipe field 'fingerprints.experts' records {sorted(map(str, experts))}, but the "
                                  f"recipe lists no experts to merge; list them in 'experts'")
        stray = [k for k in experts if k not in self.experts]
        if stray:
            raise CheckpointError(f"recipe field 'fingerprints.experts' names {brief(stray[0])}, which the recipe "
                                  f"does not merge; it merges {self.experts} (an expert removed from or renamed in "
                                  f"'experts' must be removed from or renamed in 'fingerprints.experts' too)")
        return {**given, **({"experts": dict(experts)} if "experts" in given else {})}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for name in ("prefix", "sources", "fingerprints"):   # recipes without them stay readable by older versions
            if out[name] is None:
                del out[name]
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=YamlDumper, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Recipe":
        if not isinstance(data, Mapping):
            raise CheckpointError("a recipe must be a mapping with at least a 'method' field")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(map(str, set(data) - known))
        if unknown:   # before a missing 'method', which a misspelt one ('methd') would otherwise be reported as
            raise CheckpointError(f"recipe has unknown field(s) {unknown}; expected a subset of {sorted(known)}"
                                  + ("" if "method" in data else " (and it has no 'method' field)"))
        if "method" not in data:
            raise CheckpointError("a recipe must be a mapping with at least a 'method' field")
        # an explicit null takes the field's default (an empty mapping or list, seed 0, "auto")
        defaults = {"hparams": {}, "experts": [], "calibrate_hparams": {}, "seed": 0, "studio_version": "",
                    "svd_mode": "auto"}
        return cls(**{k: (defaults[k] if v is None and k in defaults else v) for k, v in data.items()})

    @classmethod
    def from_text(cls, text: str, source: str = "recipe") -> "Recipe":
        """Parse YAML or JSON (JSON is valid YAML; a number with an exponent and no dot, such as ``5e-05``, is a number,
        as in JSON and YAML 1.2); ``source`` names the text in errors (e.g. its file)."""
        if not isinstance(text, (str, bytes)):
            raise CheckpointError(f"a recipe is YAML or JSON text, got {brief(text)}")
        try:
            data = yaml.load(text, Loader=YamlLoader)
        except RecursionError as exc:
            raise CheckpointError(f"{source}: not valid YAML/JSON (nested too deeply)") from exc
        except yaml.YAMLError as exc:
            raise CheckpointError(f"{source}: not valid YAML/JSON{_yaml_problem(exc)}") from exc
        if source == "recipe":
            return cls.from_dict(data)
        if not isinstance(data, Mapping):   # name the file, not only what a recipe is
            raise CheckpointError(f"{source}: not a recipe: a recipe is a mapping with at least a 'method' field, "
                                  f"this text is {type(data).__name__ if data is not None else 'empty'}")
        try:
            return cls.from_dict(data)
        except CheckpointError as exc:   # a field at fault, named with the file it is in
            raise CheckpointError(f"{source}: {exc}") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Recipe":
        """Load a ``.yaml``/``.json`` recipe, or the recipe embedded in an exported ``.safetensors`` file."""
        path = Path(path)
        with path_errors(path):
            folder, exists = path.is_dir(), path.is_file()
        if folder:
            raise CheckpointError(f"{path}: a folder, not a recipe; give a .yaml/.json recipe or an exported "
                                  f".safetensors file")
        if not exists:
            raise CheckpointError(f"{path}: no such recipe file")
        if path.suffix.lower() == ".safetensors" or looks_like_safetensors(path):
            recipe = cls.from_metadata(read_metadata(path), path)
            if recipe is None:
                raise CheckpointError(f"{path}: safetensors file carries no '{RECIPE_METADATA_KEY}' metadata")
            return recipe
        if _is_pickle(path):   # torch.save's output, or a pickle: never unpickled, and no recipe
            raise CheckpointError(f"{path}: a torch.save checkpoint or a Python pickle, not a recipe; give a .yaml or "
                                  f".json recipe or an exported .safetensors file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not a readable UTF-8 recipe (YAML or JSON): {exc}") from exc
        return cls.from_text(text, str(path))

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], path: str | os.PathLike) -> "Recipe | None":
        """The recipe embedded in the safetensors metadata ``meta`` of the file ``path`` (which errors name), or
        ``None`` where it carries none; a malformed one is a :class:`CheckpointError`, not ``None``."""
        if RECIPE_METADATA_KEY not in meta:
            return None
        return cls.from_text(meta[RECIPE_METADATA_KEY], f"{path}: its '{RECIPE_METADATA_KEY}' metadata")

    def check_schema(self) -> None:
        """Refuse a method or calibration the registry does not know, and hyperparameters their schemas refuse
        (names the schema does not know, merge's own keywords among them: ``seed``, ``device``, ...; where they
        would otherwise collide with, or silently become, merge's arguments), before any weights are read."""
        from .registry import get_calibration, get_method
        from .schema import validate_hparams

        validate_hparams(self.method, get_method(self.method).params, self.hparams)
        if self.calibrate is not None:
            validate_hparams(self.calibrate, get_calibration(self.calibrate).params, self.calibrate_hparams)

    def merge_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`studio.engine.merge_pool` (besides the pool and the method); add
        ``svd_mode`` for :func:`studio.merge` (a pool has its own), as :func:`merge_from_recipe` does."""
        # calibrate_hparams without a calibration reach the engine, which rejects them (they would be lost)
        return dict(self.hparams, calibrate=self.calibrate,
                    calibrate_hparams=dict(self.calibrate_hparams) or None,
                    preferences=self.preferences, seed=self.seed, layer_rule=self.layer_rule)


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's numbers (those JSON writes too): a number with an exponent and no dot
    (``5e-05``, ``1E3``) is a float, not text, and ``1:30`` is text, not YAML 1.1's base-60 number 90; and YAML
    1.2's booleans: ``yes``, ``no``, ``on`` and ``off`` are text, not YAML 1.1's true and false (an expert named
    ``no`` in a recipe's preferences became the key False).
    ``Recipe.to_json`` writes such exponents (``json.dumps(5e-05)``), and every exported file embeds that JSON; the
    CLI's ``--set`` values are read with it too.

    A key given twice in one mapping is refused (PyYAML keeps the last: a recipe's second ``method:`` line replayed
    another method without a word), as JSON objects are read with it too.

    Example:
        >>> yaml.load("[5e-05, 1:30, 0x1f, 1_000, .inf, 010, 0o10, yes, off, True]", Loader=YamlLoader)
        [5e-05, '1:30', 31, 1000, inf, 10, 8, 'yes', 'off', True]
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":   # "<<: *defaults": its keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:   # an unhashable key: PyYAML's own error names it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found the key {key!r} twice (first at line {first.line + 1}, column {first.column + 1}); "
                        f"give each key once", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_INT, _FLOAT, _BOOL = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"
YamlLoader.yaml_implicit_resolvers = {   # PyYAML's own, less its int, float (they read 1:30 as 90) and bool rules ...
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver(   # ... with YAML 1.2's booleans: YAML 1.1's yes / no / on / off are text (an
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))   # expert named no stayed a name)
YamlLoader.add_implicit_resolver(   # ... and those rules without base 60, nor YAML 1.1's octal 010 (1.2's 0o10)
    _INT, re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0o[0-7_]+|[-+]?[0-9][0-9_]*|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    """An integer as YAML 1.2 reads it: a leading 0 is decimal (``010`` is 10; YAML 1.1, and PyYAML, read 8: a
    ``--set k=010`` merged with 8), ``0o``, ``0x`` and PyYAML's ``0b`` and underscores as their bases."""
    text = str(loader.construct_scalar(node)).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
    for prefix, base in (("0b", 2), ("0o", 8), ("0x", 16)):
        if digits.startswith(prefix):
            return sign * int(digits[2:], base)
    return sign * int(digits, 10)


YamlLoader.add_constructor(_INT, _construct_int)
YamlLoader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
                       r"|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class YamlDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with :class:`YamlLoader`'s rules for what a plain scalar reads as, so that text it would
    read as a number is quoted: an expert named ``1e3`` was written bare, and the recipe read back named 1000.0
    (PyYAML's own rules read ``1e3`` as text).

    Example:
        >>> yaml.dump(["1e3", "010", "1:30", "no", "true"], Dumper=YamlDumper, default_flow_style=True).strip()
        "['1e3', '010', '1:30', 'no', 'true']"
        >>> yaml.load(yaml.dump(["1e3", "010", 1e-05, "1:30", "no"], Dumper=YamlDumper), Loader=YamlLoader)
        ['1e3', '010', 1e-05, '1:30', 'no']
    """


YamlDumper.yaml_implicit_resolvers = {first: list(resolvers)
                                      for first, resolvers in YamlLoader.yaml_implicit_resolvers.items()}
for _first, _resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items():   # and YAML 1.1's booleans quoted, as
    YamlDumper.yaml_implicit_resolvers.setdefault(_first, []).extend(   # other readers take a bare no for false
        (tag, regexp) for tag, regexp in _resolvers if tag == _BOOL)


def _yaml_problem(exc: Exception) -> str:
    """`` at line L, column C: <problem> (<context> at line L')`` from a PyYAML error (its own text spans lines and
    quotes the document)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return ": " + " ".join(str(exc).split())
    context, where = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    note = f" ({context} at line {where.line + 1})" if context and where is not None else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{note}"


def looks_like_safetensors(path: Path) -> bool:
    """Whether ``path`` starts as a safetensors file does (an 8-byte header length, then a JSON object that fits),
    whatever its name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8


def refuse_overwriting(outputs: list[str | None], *, sources: dict | None = None, suite: str | None = None,
                       inputs: dict[str, str | list[str]] | None = None) -> None:
    """Refuse, before any file is written, to write an output over a file the command reads: a checkpoint of
    ``sources`` (an index's shards too), a file of a local ``suite``'s folder, one of ``inputs`` (what -> its path
    or paths), or anything in the Hugging Face cache (a pinned commit must keep its files). A recipe would otherwise
    name the output as its own input, or a packed file lose every other expert. Also weights that would change what
    the folder of a sharded source loads as (a ``model.safetensors`` beside its shard index, :func:`_folder_choice`):
    the same merge from that folder would then merge the merge. A recipe records a folder as the file it resolved
    to, so the CLI's guard of the folders its options name does not see it; a single file's folder is not guarded
    here, since its checkpoint may well have been given as the file (``base.safetensors`` beside the merge)."""
    from huggingface_hub import constants

    def chosen(path: Path) -> Path:
        """The file a checkpoint folder resolves to (its shard index, which checkpoint_files does not list), else
        ``path``: an output written over the index would leave the folder unreadable."""
        if path.is_dir():
            with contextlib.suppress(CheckpointError):   # no checkpoint folder: nothing in it is read
                return _folder_files(path)[0].resolve()
        return path

    read = {}
    for what, paths in (inputs or {}).items():
        for path in ([paths] if isinstance(paths, str) else paths):
            read[Path(path).resolve()] = what
            read.setdefault(chosen(Path(path).resolve()), what)
    folders = {}   # a source's folder -> (the file it resolves to, whose checkpoint that is)
    for name, source in [(None, sources["base"]), *sources["experts"].items()] if sources else []:
        whose = "the base" if name is None else f"expert {name!r}"
        what = "the checkpoint of " + whose
        if not is_hub_url(source):
            for file, _ in checkpoint_files(source):   # an index's shards too
                read[file.resolve()] = what
            resolved = chosen(Path(source).resolve())
            read.setdefault(resolved, what)
            if resolved.name.endswith(".safetensors.index.json"):   # a sharded checkpoint's folder
                folders.setdefault(resolved.parent, (resolved.name, whose))
    cache = Path(constants.HF_HUB_CACHE).resolve()
    suite_folder = None
    if suite is not None and not is_hub_url(suite):   # a Hub suite's files are in the cache
        from .suite import DEFAULT_SUITE_PATH, EMBEDDED_SUITE

        suite_folder = DEFAULT_SUITE_PATH if suite == EMBEDDED_SUITE else Path(suite).resolve()
    for out in filter(None, outputs):
        with path_errors(out):   # e.g. a loop of symbolic links
            path = Path(out).resolve()
        what = read.get(path)
        if what is None and path.is_relative_to(cache):
            what = "in the Hugging Face cache"
        if what is None and any(p.name == "blobs" and p.parent.name.startswith(("models--", "datasets--", "spaces--"))
                                for p in path.parents):   # another cache's file, through a snapshot's link
            raise StudioError(f"{out} is a file of a Hugging Face cache ({path}), shared by every revision of its "
                              f"repository that holds it; write the output to another file")
        if what is None and suite_folder is not None and path.is_relative_to(suite_folder) and path.exists():
            what = f"a file of the suite {suite}"   # a new file beside the suite's is fine
        if what is not None:
            raise StudioError(f"{out} is {what}, which this command reads; write the output to another file")
        if path.parent in folders:   # e.g. a replayed recipe's source, recorded as the file its folder resolved to
            chosen, whose = folders[path.parent]
            names = _file_names(path.parent)
            if _folder_choice(names) == chosen and _folder_choice(names | {path.name}) != chosen:
                raise StudioError(f"{out} would be a weights file in {path.parent}, the checkpoint folder of {whose} "
                                  f"({chosen}), which would then load as other weights; write the output to another "
                                  f"folder")


def _plain(value: Any, where: str) -> Any:
    """A recipe value as YAML and JSON can write it: NumPy scalars and one-element tensors become Python scalars;
    anything else that cannot be written is a :class:`CheckpointError` naming the field."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:   # numpy scalars, 0-d arrays and tensors
        value = value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise CheckpointError(f"recipe field '{where}' must be a number, a string, true/false or null, got {brief(value)}")


def check_recipe_path(recipe_path: str | os.PathLike) -> Path:
    """``recipe_path`` as a :class:`Path`, unless :meth:`Recipe.from_file` would not read back the recipe written
    there: a recipe is YAML (JSON under a ``.json`` name), and a ``.safetensors`` name is read as weights."""
    if not str(recipe_path).strip():
        raise CheckpointError("the recipe's file name is empty; give a .yaml or .json file name")
    if Path(recipe_path).suffix.lower() == ".safetensors":
        raise CheckpointError(f"recipe file {recipe_path}: a recipe is written as YAML (JSON under a .json name), "
                              f"and a .safetensors name is read back as weights; give a .yaml or .json name (the "
                              f"merged .safetensors file carries the recipe in its metadata too)")
    return Path(recipe_path)


def save_merged(path: str | os.PathLike, state_dict: Mapping[str, Tensor], recipe: Recipe,
                recipe_path: str | os.PathLike | None = None) -> Path:
    """Export merged weights as safetensors with the recipe (JSON) in the header metadata, and with ``recipe_path``
    also as a file (JSON for a ``.json`` name, else YAML).

    Both are written in full first (the weights to a staged file, flushed to the disk), then renamed into place,
    the recipe first and the weights right after it. A failure before the weights' rename, an interruption
    included (Ctrl-C, or SIGTERM in the CLI), leaves neither new file: a recipe already renamed is put back as it
    was (or removed where there was none), so that no recipe is left beside weights of another merge. Only the end
    of the process between the two renames (SIGKILL, a power loss) can leave the new recipe beside the old
    weights; the weights always carry their own recipe in their metadata."""
    if not isinstance(recipe, Recipe):
        raise CheckpointError(f"save_merged needs a studio.io.Recipe, got {type(recipe).__name__}")
    meta = {RECIPE_METADATA_KEY: recipe.to_json(), "format": "pt"}
    if recipe_path is None:
        return save_state_dict(path, state_dict, meta)
    # the two renames are not one atomic step: refuse up front what would make the second fail or undo the first
    with path_errors(recipe_path):
        folder = Path(recipe_path).is_dir()
        same = Path(recipe_path).resolve() == Path(path).resolve()
    if folder:
        raise CheckpointError(f"cannot write the recipe to {recipe_path}: it is a folder; give a file name")
    if same:
        raise CheckpointError(f"the recipe and the weights would both be written to {path}; give two file names")
    check_recipe_path(recipe_path)
    recipe_path = Path(recipe_path)
    text = recipe.to_json() if recipe_path.suffix.lower() == ".json" else recipe.to_yaml()   # JSON under .json
    with path_errors(recipe_path, "read"):
        old = recipe_path.read_bytes() if recipe_path.is_file() else None
    renamed = False

    def write_recipe() -> None:   # the weights are staged and flushed: the recipe goes into place, then they do
        nonlocal renamed
        with atomic_write(recipe_path) as tmp:
            Path(tmp).write_text(text)
        renamed = True

    try:
        return save_state_dict(path, state_dict, meta, before_replace=write_recipe)
    except BaseException:
        if renamed:   # the weights were not renamed: the recipe must not describe a merge that is not there
            with contextlib.suppress(OSError, StudioError):
                if old is None:
                    recipe_path.unlink()
                else:
                    with atomic_write(recipe_path) as tmp:
                        Path(tmp).write_bytes(old)
        raise


def recipe_inputs(recipe: Recipe, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]
                  ) -> tuple[Mapping[str, Tensor], dict[str, Mapping[str, Tensor]]]:
    """What a recipe's merge reads of ``base`` and ``experts``: its experts (in its order; none listed: all of them),
    and of each state dict the tensors under its ``prefix``."""
    if not isinstance(experts, Mapping):
        raise CheckpointError(f"experts must be a mapping of expert names to state dicts, got "
                              f"{type(experts).__name__}")
    missing = [name for name in recipe.experts if name not in experts]
    if missing:
        raise CheckpointError(f"recipe needs expert(s) {missing} that are not available; have {sorted(experts)}")
    chosen = {name: experts[name] for name in (recipe.experts or list(experts))}
    if recipe.prefix is None:
        return base, chosen

    def under(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(recipe.prefix)}

    base, chosen = under(base), {name: under(sd) for name, sd in chosen.items()}
    if not base:
        raise CheckpointError(f"recipe merges the tensors under {recipe.prefix!r}, and the base has none")
    return base, chosen


def merge_from_recipe(recipe: Recipe, base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]],
                      *, check: bool = True, **overrides: Any) -> dict[str, Tensor]:
    """Reproduce a merge: select the recipe's experts (in its order), keep the tensors under its ``prefix``, and
    call :func:`studio.merge`. With ``check`` (the default), first refuse a base or expert whose weights differ from
    the :attr:`Recipe.fingerprints` it recorded (``check=False``: merge other weights on purpose). ``overrides``
    are :func:`studio.merge` keywords that replace the recipe's (``device="cuda"``; a hyperparameter such as
    ``alpha=0.5``, which makes another merge than the recipe's)."""
    from .engine import merge

    if not isinstance(recipe, Recipe):
        raise CheckpointError(f"merge_from_recipe needs a studio.io.Recipe (Recipe.from_dict for a mapping), got "
                              f"{type(recipe).__name__}")
    recipe.check_schema()
    base, chosen = recipe_inputs(recipe, base, experts)
    if check and recipe.fingerprints and ("base" in recipe.fingerprints or recipe.fingerprints.get("experts")):
        try:
            check_fingerprints(recipe.fingerprints, base, chosen, sources=recipe.sources)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (merge_from_recipe(..., check=False) merges them anyway)") from exc
    kwargs = dict(recipe.merge_kwargs(), svd_mode=recipe.svd_mode)
    kwargs.update(overrides)
    return merge(base, chosen, recipe.method, **kwargs)
