"""TSV-Compress (Gargiulo et al., CVPR 2025, sec. 4.1 eq. 8, appx. B.3): store each task vector as the top-``k``
singular triplets of every matrix layer, ``k = r / T`` by default, and every other tensor in full.

Example:
    >>> import torch, studio
    >>> base = {"w": torch.zeros(64, 32), "b": torch.zeros(32)}
    >>> experts = {t: {"w": torch.randn(64, 32), "b": torch.randn(32)} for t in "abcd"}
    >>> packed = studio.compress(base, experts)      # k = int(32 / 4) = 8: 8 * (64 + 32 + 1) numbers, b dense
    >>> packed.tasks["a"]["w"].rank, packed.storage()["per_task"]["a"]["stored"], round(packed.storage_ratio(), 3)
    (8, 808, 0.388)
    >>> sorted(packed.reconstruct("a"))
    ['b', 'w']
"""

from __future__ import annotations

import hashlib
import json
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .io import CheckpointError
from .layers import LayerRule, resolve_rule
from .pool import StateDict, TaskPool, _all_finite, validate_experts
from .schema import HyperparameterError, Param, StudioError, brief, is_finite

__all__ = ["LowRank", "Compressed", "compress", "BaseMismatchError", "base_fingerprint"]


def base_fingerprint(base: StateDict) -> str:
    """:func:`studio.io.fingerprint` of ``base`` with its float16 and bfloat16 tensors in float32, which holds them
    exactly: the same weights give the same value in half precision and in float32 (a suite stores float16 and
    loads float32). :func:`compress` records it and :meth:`Compressed.load` checks it.

    Example:
        >>> w = {"w": torch.tensor([0.1, 2.0])}
        >>> base_fingerprint({"w": w["w"].half()}) == base_fingerprint({"w": w["w"].half().float()})
        True
    """
    from .io import fingerprint

    return fingerprint(_InFloat32(base))


class _InFloat32(Mapping):
    """``base`` with its half-precision tensors in float32, one tensor at a time (a whole upcast copy held 2x a
    half-precision base's size while :func:`studio.io.fingerprint` read it key by key)."""

    def __init__(self, base: StateDict) -> None:
        self._base = base

    def __getitem__(self, key: str) -> Any:
        v = self._base[key]
        return v.float() if _is_half(v) else v

    def __iter__(self):
        return iter(self._base)

    def __len__(self) -> int:
        return len(self._base)


def _is_half(value: Any) -> bool:
    return isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16)


class BaseMismatchError(CheckpointError):
    """:meth:`Compressed.load` was given a base other than the one the experts were compressed against; ``recorded``
    and ``given`` are the two :func:`base_fingerprint` values."""

    def __init__(self, message: str, *, recorded: str = "", given: str = "") -> None:
        super().__init__(message)
        self.recorded, self.given = recorded, given


@dataclass(frozen=True)
class LowRank:
    """A rank-``k`` task matrix ``U diag(S) Vh`` (TSV eq. 5/8): ``U [m, k]``, ``S [k]``, ``Vh [k, n]``.

    Example:
        >>> f = LowRank(torch.eye(3, 1), torch.tensor([2.0]), torch.ones(1, 2))
        >>> f.to_dense().tolist(), f.numel, f.shape
        ([[2.0, 2.0], [0.0, 0.0], [0.0, 0.0]], 6, (3, 2))
    """

    U: Tensor
    S: Tensor
    Vh: Tensor

    @property
    def rank(self) -> int:
        return int(self.S.numel())

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.U.shape[0]), int(self.Vh.shape[1]))

    @property
    def numel(self) -> int:
        """Stored numbers, ``k (m + n + 1)`` as counted in TSV appx. B.3."""
        return self.U.numel() + self.S.numel() + self.Vh.numel()

    @property
    def nbytes(self) -> int:
        """Stored bytes (the factors are float32, whatever the experts' dtype)."""
        return sum(t.numel() * t.element_size() for t in (self.U, self.S, self.Vh))

    def to_dense(self) -> Tensor:
        """The rank-``k`` task matrix ``U diag(S) Vh``."""
        return (self.U * self.S) @ self.Vh


@dataclass
class Compressed:
    """TSV-C compressed experts: ``tasks[name][key]`` is a :class:`LowRank` for matrix layers (or, where its ``k``
    triplets would take as many numbers as the matrix or more, that rank-``k`` matrix dense), else the dense task
    vector. ``base`` is the pretrained state dict the task vectors apply to (kept by reference)."""

    base: dict[str, Tensor]
    tasks: dict[str, dict[str, "LowRank | Tensor"]]
    rank_fraction: float | None
    layer_rule: LayerRule
    meta: dict[str, Any] = field(default_factory=dict)

    def task_vector(self, task: str) -> dict[str, Tensor]:
        """Dense (approximate) task vector of ``task``: ``U diag(S) Vh`` per matrix layer, else the stored tensor."""
        if not isinstance(task, str) or task not in self.tasks:
            raise StudioError(f"unknown task {brief(task)}; the compressed experts are {sorted(self.tasks)}")
        return {k: (v.to_dense() if isinstance(v, LowRank) else v).clone() for k, v in self.tasks[task].items()}

    def reconstruct(self, task: str, alpha: float = 1.0) -> dict[str, Tensor]:
        """State dict ``base + alpha * task_vector(task)`` (TSV eq. 8 with a known task index), in the base's dtypes.

        Non-floating tensors (e.g. integer buffers) are copied from the base. A :class:`HyperparameterError` names
        a tensor that ``alpha`` takes beyond its dtype's range (or a non-finite base value, with ``check=False``).
        """
        if isinstance(alpha, Tensor) and alpha.numel() == 1 and alpha.dtype != torch.bool and not alpha.is_complex() \
                and not alpha.is_meta:   # (a meta tensor has no value to read)
            alpha = alpha.item()   # a 0-d tensor (float or integer), as the hyperparameter schemas take it
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not is_finite(alpha):
            raise HyperparameterError(f"reconstruct: alpha must be a finite number, got {brief(alpha)}")
        tv = self.task_vector(task)
        out: dict[str, Tensor] = {}
        for key, b in self.base.items():
            if key in tv:
                acc = torch.promote_types(torch.float32, b.dtype)   # float64 bases are not rounded through float32
                out[key] = (b.to(acc) + alpha * tv[key].to(b.device, acc)).to(b.dtype)
                if not _all_finite(out[key]):
                    raise HyperparameterError(f"reconstruct: task {task!r}, '{key}' is not finite in {b.dtype} with "
                                              f"alpha = {alpha:g} (its base value must be finite, and alpha small "
                                              f"enough to stay in the dtype's range)")
            else:
                out[key] = b.clone()
        return out

    to_state_dict = reconstruct

    def storage(self) -> dict[str, Any]:
        """Stored numbers per task and in total, against the dense task vectors and the base model; and the bytes:
        ``stored_bytes`` as stored (float32: a file :meth:`save` writes is that plus its header), against
        ``dense_bytes``, the dense task vectors in the base's dtypes (``bytes_ratio``: twice ``ratio`` for float16 or
        bfloat16 experts, whose factors take float32's 4 bytes a number against their 2)."""
        per_task = {}
        stored_bytes = dense_bytes = 0
        for name, sd in self.tasks.items():
            stored = sum(v.numel if isinstance(v, LowRank) else v.numel() for v in sd.values())
            dense = sum(self.base[k].numel() for k in sd)
            per_task[name] = {"stored": stored, "dense": dense, "ratio": stored / dense if dense else 1.0}
            stored_bytes += sum(v.nbytes if isinstance(v, LowRank) else v.numel() * v.element_size()
                                for v in sd.values())
            dense_bytes += sum(self.base[k].numel() * self.base[k].element_size() for k in sd)
        stored = sum(p["stored"] for p in per_task.values())
        dense = sum(p["dense"] for p in per_task.values())
        base_numel = sum(t.numel() for t in self.base.values())
        return {
            "per_task": per_task,
            "stored": stored,
            "dense": dense,
            "ratio": stored / dense if dense else 1.0,
            "stored_bytes": stored_bytes,
            "dense_bytes": dense_bytes,
            "bytes_ratio": stored_bytes / dense_bytes if dense_bytes else 1.0,
            # base + every compressed task (TSV sec. 5.2 says "approximately twice"; measured on ViT-B/32's visual
            # tower at 1/T: 2.52x for T = 8, 2.85x for T = 20, since non-matrix tensors stay dense per task)
            "model_multiple": (base_numel + stored) / base_numel if base_numel else 1.0,
        }

    def storage_ratio(self) -> float:
        """Stored numbers of all compressed tasks / numbers of their dense task vectors."""
        return self.storage()["ratio"]

    def save(self, path: "str | os.PathLike") -> Path:
        """Write every task's factors and dense tensors to one safetensors file (atomically), the task names, rank
        fraction and layer rule in its metadata, with the tensors' :func:`studio.io.fingerprint`, which :meth:`load`
        checks. The base is not stored: :meth:`load` takes it again.

        Example:
            >>> import tempfile, torch, studio
            >>> base = {"w": torch.zeros(6, 4), "b": torch.zeros(4)}
            >>> experts = {t: {"w": torch.randn(6, 4), "b": torch.randn(4)} for t in "ab"}
            >>> packed = studio.compress(base, experts)
            >>> path = packed.save(Path(tempfile.mkdtemp()) / "packed.safetensors")
            >>> again = Compressed.load(path, base)
            >>> torch.equal(again.task_vector("a")["w"], packed.task_vector("a")["w"]), again.rank_fraction
            (True, None)
        """
        from .io import fingerprint, save_state_dict

        tensors: dict[str, Tensor] = {}
        for i, name in enumerate(self.tasks):
            for key, v in self.tasks[name].items():
                parts = {"U": v.U, "S": v.S, "Vh": v.Vh} if isinstance(v, LowRank) else {"dense": v}
                tensors.update({f"{i}/{key}/{part}": t for part, t in parts.items()})
        meta = {"format": "merge-studio tsv-c 1", "tasks": list(self.tasks), "rank_fraction": self.rank_fraction,
                "layer_rule": self.layer_rule.to_dict(), "meta": self.meta, "fingerprint": fingerprint(tensors)}
        meta = json.loads(json.dumps(meta, default=str))   # as load reads it back
        meta["header_fingerprint"] = _header_fingerprint(meta)
        return save_state_dict(path, tensors, {_PACKED_METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: "str | os.PathLike", base: StateDict, *, check: bool = True) -> "Compressed":
        """Read a file :meth:`save` wrote, against the ``base`` its task vectors apply to: a
        :class:`~studio.io.CheckpointError` names a file that is not one, or an entry whose key or shape does not
        fit the base. With ``check`` (the default) the base must also be the one the experts were compressed
        against (its :func:`base_fingerprint`, recorded by :func:`compress`; files without it are not checked): the
        same values in float16 or bfloat16 as in float32 match, e.g. a suite's half-precision base file and the
        float32 weights the suite loads from it. ``check=False`` applies the task vectors to another base on purpose
        (e.g. the same weights rounded to another dtype). The tensors read must have the fingerprint :meth:`save`
        recorded (files written by 0.2.2 and earlier have none), and the header its own (the task names, rank
        fraction, layer rule and ``meta``: files before 2026-12-08 have none): a changed or damaged byte is a
        ``CheckpointError`` (two task names swapped in the header rebuilt one task's expert under the other's name).
        """
        from .io import fingerprint, load_safetensors

        if not isinstance(base, Mapping):
            raise CheckpointError(f"Compressed.load needs the base state dict the experts were compressed against, "
                                  f"got {type(base).__name__}")
        path = Path(path)
        meta = _header(path)
        try:
            tasks = meta["tasks"]
            if not isinstance(tasks, list) or not all(isinstance(n, str) and n for n in tasks):
                raise ValueError(f"'tasks' must be a list of task names, got {brief(tasks)}")
            names = list(tasks)
            rule = LayerRule.from_dict(meta["layer_rule"])
            fraction = meta.get("rank_fraction")
            if len(set(names)) != len(names) or not isinstance(meta.get("meta") or {}, Mapping) \
                    or not (fraction is None or isinstance(fraction, (int, float)) and not isinstance(fraction, bool)
                            and 0 < fraction <= 1):
                raise ValueError("repeated task names, or a malformed 'meta' or 'rank_fraction' (in (0, 1] or "
                                 "null)")
        except (TypeError, KeyError, ValueError, StudioError) as exc:
            raise CheckpointError(f"{path}: not a TSV-C file written by Compressed.save ({exc})") from None
        written_header = meta.get("header_fingerprint")
        if written_header is not None and written_header != _header_fingerprint(meta):
            raise CheckpointError(f"{path}: its header (task names {names}, rank fraction, layer rule, meta) is not "
                                  f"the one Compressed.save wrote: the file was changed or damaged after it was "
                                  f"written")
        loaded = load_safetensors(path)
        written = meta.get("fingerprint")
        if written is not None:
            read = fingerprint(loaded)
            if not isinstance(written, str) or read != written:
                shown = f"{written[:23]}..." if isinstance(written, str) else brief(written)
                raise CheckpointError(f"{path}: its tensors are not the ones Compressed.save wrote (fingerprint "
                                      f"{shown} recorded, {read[:23]}... read): the file was changed or damaged "
                                      f"after it was written")
        parts: dict[tuple[int, str], dict[str, Tensor]] = {}
        for name, t in loaded.items():
            index, _, rest = name.partition("/")
            key, _, part = rest.rpartition("/")
            # an ASCII number: str.isdigit() also accepts digits such as '²', which int() refuses
            if (not (index.isascii() and index.isdigit()) or int(index) >= len(names)
                    or part not in ("U", "S", "Vh", "dense")):
                raise CheckpointError(f"{path}: unexpected entry {name!r}")
            if not t.is_floating_point() or not _all_finite(t):
                raise CheckpointError(f"{path}: entry {name!r} is not a finite floating-point tensor")
            parts.setdefault((int(index), key), {})[part] = t
        unknown = sorted({key for _, key in parts} - set(base))
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise CheckpointError(f"{path}: the tensor {unknown[0]!r} is not a key of the base{more}")
        # compress stores the same tensors for every task: one a task lacks would silently rebuild the base's value
        # there (this check allows a base with more tensors than the file; the fingerprint check, unless
        # check=False, still requires the base compress recorded)
        stored = {key for _, key in parts}
        for index, name in enumerate(names):
            lacking = [k for k in base if k in stored and (index, k) not in parts]
            if lacking:
                more = f" (and {len(lacking) - 1} more)" if len(lacking) > 1 else ""
                raise CheckpointError(f"{path}: task {name!r} has no entry for {lacking[0]!r}{more}, which the other "
                                      f"tasks have; the file is incomplete")
        tasks: dict[str, dict[str, LowRank | Tensor]] = {n: {} for n in names}
        for index, key in ((i, k) for i in range(len(names)) for k in base if (i, k) in parts):   # the base's order
            p, where = parts[index, key], f"{path}: task {names[index]!r}, {key!r}"
            shape = tuple(base[key].shape)
            if set(p) == {"dense"}:
                if tuple(p["dense"].shape) != shape:
                    raise CheckpointError(f"{where}: shape {tuple(p['dense'].shape)}, the base's is {shape}")
                tasks[names[index]][key] = p["dense"]
            elif set(p) == {"U", "S", "Vh"}:
                f = LowRank(p["U"], p["S"], p["Vh"])
                k = f.rank
                if p["U"].dim() != 2 or p["S"].dim() != 1 or p["Vh"].dim() != 2 or f.shape != shape \
                        or p["U"].shape[1] != k or p["Vh"].shape[0] != k:
                    raise CheckpointError(f"{where}: factors U {tuple(p['U'].shape)}, S ({k},), Vh "
                                          f"{tuple(p['Vh'].shape)} do not make the base's {shape}")
                tasks[names[index]][key] = f
            else:
                raise CheckpointError(f"{where}: expected U, S and Vh or a dense tensor, got {sorted(p)}")
        # after the checks of keys and shapes, which name the entry at fault
        recorded = (meta.get("meta") or {}).get("base_fingerprint")
        if check and recorded is not None:
            given = base_fingerprint(base)
            # files before base_fingerprint recorded the base in its own dtype (the same value without half tensors)
            if recorded != given and not (any(map(_is_half, base.values())) and recorded == fingerprint(base)):
                raise BaseMismatchError(
                    f"{path}: the base given is not the one its experts were compressed against (recorded "
                    f"{str(recorded)[:19]}..., given {given[:19]}...); their task vectors would build other models "
                    f"(check=False applies them anyway)", recorded=str(recorded), given=given)
        return cls(base=dict(base), tasks=tasks, rank_fraction=fraction, layer_rule=rule,
                   meta=dict(meta.get("meta") or {}))

    @staticmethod
    def read_meta(path: "str | os.PathLike") -> dict[str, Any]:
        """The ``meta`` a file :meth:`save` wrote carries (e.g. the CLI's ``prefix`` and ``suite``), without its
        tensors."""
        meta = _header(Path(path)).get("meta")
        return dict(meta) if isinstance(meta, Mapping) else {}


_PACKED_METADATA_KEY = "merge_studio_tsv_c"


def _header_fingerprint(header: Mapping[str, Any]) -> str:
    """``sha256:`` of a TSV-C header's JSON without its own fingerprint (keys sorted), as :meth:`Compressed.save`
    records it and :meth:`Compressed.load` checks it."""
    fields = {k: v for k, v in header.items() if k != "header_fingerprint"}
    text = json.dumps(fields, sort_keys=True, ensure_ascii=True, allow_nan=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _header(path: Path) -> dict[str, Any]:
    """The JSON header :meth:`Compressed.save` writes into the safetensors metadata, or a ``CheckpointError``."""
    from .io import read_metadata

    raw = read_metadata(path).get(_PACKED_METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{path}: not a TSV-C file written by Compressed.save (no '{_PACKED_METADATA_KEY}' "
                              f"metadata)")
    try:
        header = json.loads(raw)
        if not isinstance(header, dict) or not str(header.get("format", "")).startswith("merge-studio tsv-c"):
            raise ValueError("not its format")
    except ValueError as exc:
        raise CheckpointError(f"{path}: not a TSV-C file written by Compressed.save ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not a TSV-C file written by Compressed.save (its header is nested too "
                              f"deeply)") from None
    return header


def compress(
    base: StateDict,
    experts: Mapping[str, StateDict],
    *,
    rank_fraction: float | None = None,
    device: Any = None,
    layer_rule: "LayerRule | str | None" = None,
    svd_mode: str = "auto",
) -> Compressed:
    """TSV-C: per task and matrix layer keep the top ``k = int(r * rank_fraction)`` singular triplets (TSV sec. 4.1).

    Args:
        base: pretrained state dict.
        experts: mapping task name -> fine-tuned state dict (validated with :func:`studio.pool.validate_experts`).
        rank_fraction: fraction of each layer's ``r = min(m, n)`` components kept; ``None`` = ``1/T`` (the paper's and
            the official ``compress_tv(..., 1 / len(DATASETS))`` default). The matrices of all ``T`` tasks then take
            about ``r (m + n) / (m n)`` of the model's matrices whatever ``T`` is (TSV sec. 5.2: the base plus them is
            "approximately twice" the model), but each task keeps its non-matrix tensors dense, so the total grows with
            ``T`` (base + tasks, ViT-B/32 visual tower: 2.52x the model at ``T = 8``, 2.85x at 20, see
            :meth:`Compressed.storage`; counted on ``open_clip.create_model("ViT-B-32")``'s visual shapes,
            ``k (m + n + 1)`` numbers per matrix and task, the rest dense). Must be in ``(0, 1]``. As in the official
            code ``k`` rounds down, so on a layer with ``r < 1 / rank_fraction`` it is 0 and that layer's task matrices
            are dropped (e.g. ``r = 16`` at ``0.05``); CLIP's layers (``r >= 768``) keep at least 38 components at
            ``0.05``. A fraction that keeps nothing on every compressed layer is refused
            (:func:`studio.methods.tsv_m.refuse_keeping_nothing`). Where the ``k`` triplets would take at least the
            ``m n`` numbers of the matrix (``k >= r / 2`` or so on a square layer: one expert at the default, or a
            fraction of 0.5 and above), the same rank-``k`` task matrix is kept dense instead, which takes fewer (one
            expert at ``1/T = 1`` was stored at 1.32 times its dense task vector on MiniSuite).
        device: where the decompositions run (``None``: ``$MERGE_STUDIO_DEVICE`` when set, else CUDA when
            present). Factors are returned on the CPU.
        layer_rule: which 2-D tensors are compressed (default ``"all_matrices"``: every 2-D tensor, ``text_projection``
            included, as the official ``compress_tv``, whose ``text_projection`` exclusion is commented out; unlike
            TSV-M's merge rule); every other floating tensor is kept as its dense task vector.
        svd_mode: ``"auto"`` (Gram-eigendecomposition top-k SVD, :func:`studio.linalg.gram_svd`) or ``"exact"``
            (LAPACK, as the official code); see :func:`studio.merge`.

    The per-task decompositions come from the same cached pool as :func:`studio.merge` (``layer.svd(i, k)``), so
    compressing after a TSV-M merge at the same rank, or at another from ``r / (2 T)`` to ``r / T``, reuses them.

    Example:
        >>> import torch
        >>> base = {"w": torch.zeros(4, 4)}
        >>> experts = {"a": {"w": torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5]))}}
        >>> c = compress(base, experts, rank_fraction=0.5)
        >>> c.task_vector("a")["w"].diagonal().tolist(), c.storage_ratio()   # rank 2 of 4 x 4: 18 numbers, or 16
        ([3.0, 2.0, 0.0, 0.0], 1.0)
        >>> c.tasks["a"]["w"].shape, compress(base, experts, rank_fraction=0.25).tasks["a"]["w"].rank
        (torch.Size([4, 4]), 1)
    """
    from .engine import _check_rule_selects, get_pool
    from .methods.tsv_m import refuse_keeping_nothing, tsv_cover, tsv_rank   # lazy: it registers every method

    validate_experts(base, experts)
    rule = resolve_rule("all_matrices" if layer_rule is None else layer_rule)
    # checked as merge checks TSV-M's (a bool tensor is not 1.0, a meta tensor has no value)
    rank_fraction = Param("rank_fraction", float, None, low=0.0, low_open=True, high=1.0).validate(rank_fraction,
                                                                                                    "compress")
    T = len(experts)
    fraction = 1.0 / T if rank_fraction is None else rank_fraction
    refuse_keeping_nothing("compress", [min(b.shape) for key, b in base.items()
                                        if b.is_floating_point() and rule.is_matrix(key, b.shape)], fraction,
                           rank_fraction is not None, "every task would keep only its other tensors")
    pool: TaskPool = get_pool(base, experts, device=device, svd_mode=svd_mode)
    _check_rule_selects(pool, rule, "compress")   # a rule that keeps no matrix would compress nothing
    tasks: dict[str, dict[str, LowRank | Tensor]] = {name: {} for name in pool.names}
    for key, b in pool.base.items():
        if not b.is_floating_point():
            continue
        layer = pool.layer(key)
        if rule.is_matrix(key, b.shape):
            k = tsv_rank(min(b.shape), 1, fraction, owner="compress", key=key)
            parts = layer.svds(range(T), k, cover=tsv_cover(layer))   # TSV-M's buckets: shared with its merges
            for name, (U, S, Vh) in zip(pool.names, parts):
                factors = LowRank(U.contiguous().cpu().clone(), S.cpu().clone(), Vh.contiguous().cpu().clone())
                # k (m + n + 1) numbers at or above the m n of the matrix (k >= r / 2 on a square layer, e.g. one
                # expert at the default 1/T): the same rank-k task matrix takes fewer numbers dense
                tasks[name][key] = factors.to_dense() if factors.numel >= b.numel() else factors
        else:
            deltas = layer.deltas
            for i, name in enumerate(pool.names):
                tasks[name][key] = deltas[i].cpu().clone()
    # the base's identity, so that Compressed.load refuses another (its task vectors would build other experts)
    return Compressed(base=dict(base), tasks=tasks, rank_fraction=rank_fraction, layer_rule=rule,
                      meta={"num_tasks": T, "svd_mode": svd_mode, "base_fingerprint": base_fingerprint(base)})
