"""Task pools: a base state dict plus experts, their task matrices per layer, and the spectral cache.

A :class:`TaskPool` is the engine's unit of reuse. Every decomposition a method asks for through
:class:`LayerTasks` (an expert's truncated SVD, the SVD of the task-matrix sum, or any named intermediate) is
computed at most once per pool and reused by every method and every hyperparameter change, while the experts'
factors fit the pool's budget (:func:`svd_cache_budget`, half the experts' size; beyond it the least recently used
ranks are decomposed again, to the same bits, when asked for).
"""

from __future__ import annotations

import math
import os
import threading
import zlib
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import _lapack, linalg
from .schema import StudioError, brief

StateDict = Mapping[str, Tensor]


class ExpertError(StudioError):
    """An expert or the base is unusable: missing/extra keys, wrong shapes, non-finite values."""


def resolve_device(device: "str | torch.device | None") -> torch.device:
    """``None`` or ``"auto"``: CUDA when present, else CPU (``MERGE_STUDIO_DEVICE`` in the environment overrides
    this default; the test suite sets it to ``cpu``). Resolved at call time, never at import."""
    origin = "device"
    if device is None or device == "auto":
        if os.environ.get("MERGE_STUDIO_DEVICE"):
            device, origin = os.environ["MERGE_STUDIO_DEVICE"], "device (MERGE_STUDIO_DEVICE in the environment)"
        else:
            device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StudioError(f"{origin} {brief(device)} is not a valid torch device; expected 'cpu', 'cuda' or "
                          f"'auto'") from exc
    if dev.type not in ("cpu", "cuda"):
        raise StudioError(f"{origin} {brief(device)} is not supported; expected 'cpu', 'cuda' (or 'cuda:N') or "
                          f"'auto'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise StudioError(f"{origin} {device!r} was requested but CUDA is not available on this machine; use 'cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StudioError(f"{origin} {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                          f"device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def _all_finite(tensor: Tensor) -> bool:
    """Whether a tensor has no NaN or infinite entry. A NaN or an infinity makes the float32 sum NaN or
    infinite, so a finite sum proves every entry finite (one read, no boolean temporary: 0.4 ms instead of 11 ms
    for ``isfinite(t).all()`` on a 3072 x 768 float32 tensor, one core); an infinite sum of finite values
    (overflow) falls back to the element-wise test.

    Example:
        >>> _all_finite(torch.tensor([1.0, 3e38, 3e38])), _all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if not tensor.is_floating_point():
        return True
    if tensor.numel() and bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _finite_range(tensor: Tensor) -> tuple[float, float] | None:
    """``(min, max)`` of a floating tensor whose entries are all finite, else None (a NaN propagates into both, an
    infinity into one): one read, no temporary. (Non-floating and empty tensors: ``(0.0, 0.0)``.)"""
    if not tensor.is_floating_point() or not tensor.numel():
        return 0.0, 0.0
    low, high = (float(v) for v in torch.aminmax(tensor.detach()))   # (an nn.Parameter: no autograd warning)
    return (low, high) if math.isfinite(low) and math.isfinite(high) else None


def _check_delta_range(name: str, key: str, expert: Tensor, base: Tensor,
                       expert_range: tuple[float, float], base_range: tuple[float, float]) -> None:
    """Refuse finite weights whose task vector ``expert - base`` leaves float32's range, the precision every merge
    computes in (a method that masks the largest entries, Breadcrumbs or DARE, would otherwise drop the infinity
    silently). The ranges bound ``|expert - base|``; only where that bound exceeds float32's is the delta formed."""
    bound = max(expert_range[1] - base_range[0], base_range[1] - expert_range[0])
    if bound <= _FLOAT32_MAX:
        return
    expert, base = expert.detach(), base.detach()
    if not _all_finite(float32_delta(expert, base)):
        worst = float((expert.double() - base.double()).abs().max())
        raise ExpertError(f"expert '{name}', key '{key}': expert - base reaches {worst:.3g}, beyond float32's range "
                          f"(+-{_FLOAT32_MAX:.3g}), the precision merges compute task vectors in; these weights are "
                          f"not a fine-tuning of the base (check the checkpoint)")


def _fits_on_device(base: StateDict, experts: Mapping[str, StateDict], device: torch.device) -> bool:
    """Whether :class:`TaskPool` keeps device copies of the tensors by default: on CUDA, when the base and the
    experts (in their own dtypes) take at most half the device's free memory, leaving the rest for the merge."""
    if device.type != "cuda":
        return False
    def there(t: Tensor) -> bool:   # cuda:0 is "cuda" on the current device
        index = device.index if device.index is not None else torch.cuda.current_device()
        return t.device.type == device.type and t.device.index == index

    size = sum(t.numel() * t.element_size() for sd in (base, *experts.values()) for t in sd.values() if not there(t))
    try:
        free, _ = torch.cuda.mem_get_info(device)
    except RuntimeError:   # no usable CUDA context: stream from the host as before
        return False
    return 2 * size <= free


def svd_cache_budget(experts: Mapping[str, StateDict], device: torch.device) -> int:
    """The bytes of per-task factors a :class:`TaskPool` keeps by default (beyond them it keeps only the two buckets
    used last of each expert and layer): half the experts' own floating tensors, at most a quarter of the device's
    memory (the host's, or the GPU's). For 8 ViT-B/32 experts 1.4 GB: the factors of the buckets of TSV-M,
    AlignMerge-O and TSV-C (96 of 768: 470 MB), Ortho-Merge's and the diagnostics', and of two more ranks, so that
    switching between methods and ranks decomposes no expert twice.

    Example:
        >>> svd_cache_budget({"a": {"w": torch.zeros(1000)}}, torch.device("cpu"))   # 4000 bytes of weights
        2000
    """
    size = sum(t.numel() * t.element_size() for sd in experts.values() for t in sd.values() if t.is_floating_point())
    try:
        if device.type == "cuda":
            total = torch.cuda.mem_get_info(device)[1]
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (RuntimeError, AssertionError, ValueError, OSError, AttributeError):   # unknown: half the experts
        total = 4 * size
    return min(size // 2, total // 4)


#: Floating dtypes the engine computes in (float32, converted exactly) and returns in; float8 formats have no
#: arithmetic of their own in torch (no promotion, no isfinite), so they are refused up front.
MERGEABLE_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_tensor(owner: str, key: Any, tensor: Any) -> None:
    """One state-dict entry: a string key and a dense tensor with data, of a mergeable dtype if floating."""
    if not isinstance(key, str):
        raise ExpertError(f"{owner}: key {brief(key)} is a {type(key).__name__}; state-dict keys must be strings")
    if not isinstance(tensor, Tensor):
        raise ExpertError(f"{owner}, key '{key}': expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_meta:
        raise ExpertError(f"{owner}, key '{key}' is a meta tensor (no data); load the weights before merging")
    if tensor.layout != torch.strided:
        raise ExpertError(f"{owner}, key '{key}' has layout {tensor.layout}; expected a dense tensor "
                          f"(call .to_dense() first)")
    if tensor.is_quantized:
        raise ExpertError(f"{owner}, key '{key}' is a quantized tensor ({tensor.dtype}); expected a dense "
                          f"floating tensor (call .dequantize() first)")
    if tensor.is_complex() or (tensor.is_floating_point() and tensor.dtype not in MERGEABLE_FLOATS):
        raise ExpertError(f"{owner}, key '{key}' has dtype {tensor.dtype}; expected one of "
                          f"{[str(d).removeprefix('torch.') for d in MERGEABLE_FLOATS]} (or a non-floating buffer, "
                          f"kept from the base)")


def _check_not_nested(owner: str, sd: Mapping) -> None:
    """Refuse a checkpoint's wrapper (``{"state_dict": {...}, "epoch": 3}``, as ``torch.load`` gives some) in place
    of its state dict, naming the entry that holds the mapping (its keys were reported missing)."""
    key = next((k for k, v in sd.items() if isinstance(v, Mapping)), None)
    if key is not None:
        raise ExpertError(f"{owner} holds a mapping under {brief(key)}, not a tensor: a checkpoint's wrapper? Pass "
                          f"its state dict itself (checkpoint[{brief(key)}]), the mapping key -> tensor")


def _merged_keys(sd: Mapping) -> set:
    """The keys of ``sd`` a merge reads: all but its non-floating tensors (buffers such as a Hugging Face CLIP's
    ``position_ids``, which the merge keeps from the base: an expert may lack them or hold others)."""
    return {k for k, v in sd.items() if not (isinstance(v, Tensor) and not v.is_floating_point())}


def _renaming(keys: "set[str]", base_keys: "set[str]", name: str) -> str:
    """A hint where an expert's keys are the base's with one prefix added or removed (``model.visual.proj`` beside
    ``visual.proj``: another checkpoint's naming), else ``""``."""
    sample = next((k for k in sorted(keys, key=str) if isinstance(k, str)), None)
    base_sample = next((k for k in sorted(base_keys, key=str) if isinstance(k, str)), None)
    if sample is None or base_sample is None or len(keys) != len(base_keys):
        return ""
    for longer, shorter, added in ((sample, base_keys, True), (base_sample, keys, False)):
        for i in range(1, len(longer)):
            prefix = longer[:i]
            if longer[i:] in shorter and {prefix + k for k in shorter if isinstance(k, str)} == \
                    (keys if added else base_keys):
                where = f"every key of expert '{name}' is a key of the base with {prefix!r} before it" if added \
                    else f"every key of the base is one of expert '{name}' with {prefix!r} before it"
                return f"; {where} (another checkpoint's naming): give both the same names, e.g. {{k.removeprefix(" \
                       f"{prefix!r}): v for k, v in state_dict.items()}}"
    return ""


def validate_experts(base: StateDict, experts: Mapping[str, StateDict], *, check_finite: bool = True) -> None:
    """Raise :class:`ExpertError` naming the expert and key at fault if the pool is not mergeable."""
    if not isinstance(base, Mapping):
        raise ExpertError(f"the base must be a state dict (a mapping key -> tensor), got {type(base).__name__}")
    if not isinstance(experts, Mapping):
        raise ExpertError(f"experts must be a mapping name -> state dict, got {type(experts).__name__}"
                          + (" (give each expert a name: {name: state_dict})" if isinstance(experts, (list, tuple))
                             else ""))
    if len(experts) == 0:
        raise ExpertError("no experts given: pass a mapping name -> state dict with at least one expert")
    if len(base) == 0:
        raise ExpertError("the base state dict is empty")
    _check_not_nested("the base", base)
    for name, sd in experts.items():
        if isinstance(sd, Mapping):
            _check_not_nested(f"expert {brief(name)}", sd)
    base_keys = set(base)
    base_ranges: dict[str, tuple[float, float]] = {}
    for key, tensor in base.items():
        _check_tensor("base", key, tensor)
        if check_finite:
            found = _finite_range(tensor)
            if found is None:
                raise ExpertError(f"base, key '{key}' contains NaN or infinite values")
            base_ranges[key] = found
    hint = ("; the base and every expert need the same keys (a prefix keeps one tower of each: "
            "studio.io.load_state_dict(..., prefix='visual.'), the CLI's --prefix)")
    if len(experts) > 1 and all(isinstance(sd, Mapping) for sd in experts.values()):
        # a key every expert lacks (or has) is the base's difference, not the first expert's: e.g. a whole model's
        # checkpoint as the base beside experts of its vision tower
        expert_keys = [set(sd) for sd in experts.values()]
        base_only = sorted(_merged_keys(base) - set.union(*expert_keys), key=str)
        experts_only = sorted(set.intersection(*map(_merged_keys, experts.values())) - base_keys, key=str)
        if base_only:
            first = next(iter(experts))
            raise ExpertError(f"the base has {len(base_only)} key(s) that none of the {len(experts)} experts has, "
                              f"e.g. {base_only[:3]}{_renaming(expert_keys[0], base_keys, first) or hint}")
        if experts_only:
            raise ExpertError(f"all {len(experts)} experts have {len(experts_only)} key(s) that the base lacks, e.g. "
                              f"{experts_only[:3]}{hint}")
    for name, sd in experts.items():
        if not isinstance(name, str):
            raise ExpertError(f"expert names must be strings, got {brief(name)}")
        if not name.strip():   # a recipe, a preference and every message name it (the CLI refuses one too)
            raise ExpertError(f"expert names must be non-empty, got {name!r}; name each expert by its task")
        if not isinstance(sd, Mapping):
            raise ExpertError(f"expert '{name}' must be a state dict (a mapping key -> tensor), "
                              f"got {type(sd).__name__}")
        keys = set(sd)
        missing, extra = sorted(_merged_keys(base) - keys, key=str), sorted(_merged_keys(sd) - base_keys, key=str)
        if missing:
            raise ExpertError(f"expert '{name}' is missing {len(missing)} key(s) of the base, e.g. {missing[:3]}"
                              f"{_renaming(keys, base_keys, name) or hint}")
        if extra:
            raise ExpertError(f"expert '{name}' has {len(extra)} key(s) the base lacks, e.g. {extra[:3]}{hint}")
        for key, tensor in sd.items():
            _check_tensor(f"expert '{name}'", key, tensor)
            if key not in base_keys:   # a non-floating buffer the base lacks: not merged
                continue
            if tuple(tensor.shape) != tuple(base[key].shape):
                raise ExpertError(
                    f"expert '{name}', key '{key}': shape {tuple(tensor.shape)} does not match the base's "
                    f"{tuple(base[key].shape)}"
                )
            if tensor.is_floating_point() != base[key].is_floating_point():
                raise ExpertError(
                    f"expert '{name}', key '{key}': dtype {tensor.dtype} where the base has {base[key].dtype}; "
                    f"expected a {'floating-point' if base[key].is_floating_point() else 'non-floating'} tensor "
                    f"like the base's"
                )
            if check_finite:
                found = _finite_range(tensor)
                if found is None:
                    raise ExpertError(f"expert '{name}', key '{key}' contains NaN or infinite values")
                if tensor.is_floating_point():
                    _check_delta_range(name, key, tensor, base[key], found, base_ranges[key])


def _version(t: Tensor) -> int:
    """``t._version`` (bumped by every in-place change); -1 for an inference-mode tensor, which has no counter (it
    can still be changed in place inside ``torch.inference_mode``: :func:`fingerprint` then reads its content)."""
    try:
        return t._version
    except RuntimeError:
        return -1


def _data(t: Tensor) -> Tensor:
    """``t`` itself, or its detached data when it requires grad (an ``nn.Parameter``): same storage, no graph."""
    return t.detach() if t.requires_grad else t


def float32_delta(expert: Tensor, base: Tensor, out: Tensor | None = None) -> Tensor:
    """``expert - base`` in float32 (into ``out`` if given). Half-precision and float32 weights are converted to
    float32 first (exact); float64 weights are subtracted in float64 and only the difference is rounded, so a
    float64 checkpoint's delta keeps float32's relative precision instead of the weights' (a base of ~1 would
    otherwise put ~6e-8 of noise on deltas of ~1e-4).

    Example:
        >>> b = torch.tensor([1.0], dtype=torch.float64)
        >>> float(float32_delta(b + 1e-9, b)) != 0.0, float(float32_delta(b.float() + 1e-9, b.float()))
        (True, 0.0)
    """
    if expert.dtype == torch.float64 or base.dtype == torch.float64:
        diff = torch.sub(expert.double(), base.double())
        return diff.float() if out is None else out.copy_(diff)
    if out is not None:   # in place: no float32 temporaries for half-precision weights
        return out.copy_(expert).sub_(base)
    return torch.sub(expert.float(), base.float())


def fingerprint(base: StateDict, experts: Mapping[str, StateDict]) -> Hashable:
    """Cheap identity of an expert set: storage pointers, versions, shapes and a few sampled values.

    A change the version counter does not see (writing through ``t.numpy()`` or ``t.data``) and that misses the
    sampled values is not noticed: build new tensors, or change them with torch's in-place operations, to merge
    edited experts (or call ``studio.engine.clear_pools()``). Inference-mode tensors have no version counter and can
    be changed in place inside ``torch.inference_mode()``, so their content is summarised instead (the float64 sum
    and sum of squares: one read of each tensor; only an edit that keeps both, e.g. swapping two entries, escapes).
    """

    def one(sd: StateDict) -> tuple:
        items = []
        with torch.no_grad():
            for key, t in sd.items():
                flat = t.reshape(-1)
                sample = tuple(flat[:: max(1, flat.numel() // 4)][:4].float().tolist()) if flat.numel() else ()
                version = _version(t)
                if version == -1 and t.is_floating_point() and flat.numel():
                    x = flat.double()
                    sample += (float(x.sum()), float(x.dot(x)))
                items.append((key, t.data_ptr(), version, tuple(t.shape), str(t.dtype), sample))
        return tuple(items)

    return (one(base), tuple((name, one(sd)) for name, sd in experts.items()))


class LayerTasks:
    """The task matrices of one layer as a method sees them, with cached decompositions.

    ``deltas`` is ``[T, *shape]`` float32 on the compute device, already multiplied by the per-task ``weights``
    (all ones unless preferences weight the base merge). Cached results of the unweighted view are keyed by the
    layer and the request and live in the pool (as long as it, or in its bounded LRU); a weighted view keeps its own
    on itself, for one merge (:meth:`memo`). A weighted view is used by one thread at a time.

    Example:
        >>> base = {"w": torch.zeros(4, 3)}
        >>> experts = {"a": {"w": torch.eye(4, 3)}, "b": {"w": 2 * torch.eye(4, 3)}}
        >>> layer = TaskPool(base, experts).layer("w")
        >>> layer.num_tasks, layer.sum().diagonal().tolist()
        (2, [3.0, 3.0, 3.0])
    """

    def __init__(self, pool: "TaskPool", key: str, weights: Tensor | None):
        self.pool = pool
        self.key = key
        self.names = pool.names
        self.num_tasks = len(pool.names)
        self.shape = tuple(pool.base[key].shape)
        # on the compute device: a CPU weight vector met the CUDA stack in deltas (DARE, cosine, SAR on CUDA)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32).to(pool.device)
        self._deltas: Tensor | None = None
        self._local: dict[Hashable, Any] = {}  # memoised values of a weighted view (see memo)

    @property
    def device(self) -> torch.device:
        return self.pool.device

    @property
    def deltas(self) -> Tensor:
        """Weighted task matrices ``[T, *shape]`` (float32, compute device)."""
        if self._deltas is None:
            raw = self.pool.raw_deltas(self.key)
            self._deltas = raw if self.weights is None else raw * self.weights.view(-1, *([1] * (raw.dim() - 1)))
        return self._deltas

    def task_delta(self, i: int, out: Tensor | None = None) -> Tensor:
        """Task ``i``'s weighted matrix ``[*shape]`` (float32, compute device): a row of :attr:`deltas` if that
        stack is already built, else computed alone (a fresh tensor the caller may modify, or written into ``out``).

        Loops over tasks should use this rather than :attr:`deltas`: on the CPU the ``[T, *shape]`` stack of a
        ``3072 x 768`` layer is a fresh 75 MB allocation each time (too large for the allocator to reuse, so every
        page faults), and stacking then summing 8 of them took 53-56 ms against 14 ms task by task.

        Example:
            >>> pool = TaskPool({"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}, "b": {"w": -torch.ones(2)}})
            >>> pool.layer("w").task_delta(1).tolist()
            [-1.0, -1.0]
        """
        if self._deltas is not None:
            return self._deltas[i]
        d = self.pool.raw_delta(self.key, i, out=out)
        return d if self.weights is None else d.mul_(self.weights[i])

    def task_deltas(self, reuse: bool = False) -> Iterator[Tensor]:
        """:meth:`task_delta` for every task in order (one task matrix in memory at a time).

        ``reuse=True`` writes every task matrix into one buffer, so a task's tensor is overwritten by the next: for
        loops that are done with each before asking for the next (sums, products). On a CPU it saves the page faults
        of a fresh allocation per task (1.6 against 3.0 ms per ``3072 x 768`` task matrix).
        """
        buf = None
        for i in range(self.num_tasks):
            d = self.task_delta(i, out=buf)
            if reuse and self._deltas is None:
                buf = d
            yield d

    def task_chunks(self, chunk: int = 1 << 16) -> Iterator[tuple[int, int, int, Tensor]]:
        """Each task's weighted values of the flattened layer, task by task and ``chunk`` entries at a time.

        Yields ``(i, start, stop, x)`` with ``x`` = task ``i``'s :meth:`task_delta` over entries ``start:stop``
        (float32, compute device): the same numbers in the same order as flattening :meth:`task_deltas`, for steps
        that must see the tasks one after the other (DARE's draws from one generator) but can work on cache-sized
        pieces. ``x`` is a buffer reused for the next piece (the caller may modify it in place).

        Example:
            >>> pool = TaskPool({"w": torch.zeros(3)}, {"a": {"w": torch.ones(3)}, "b": {"w": -torch.ones(3)}})
            >>> [(i, a, b, x.tolist()) for i, a, b, x in pool.layer("w").task_chunks(chunk=2)]
            [(0, 0, 2, [1.0, 1.0]), (0, 2, 3, [1.0]), (1, 0, 2, [-1.0, -1.0]), (1, 2, 3, [-1.0])]
        """
        base = self.pool.tensor(None, self.key).reshape(-1)
        numel = base.numel()
        chunk = max(1, min(chunk, numel))
        buf = torch.empty(chunk, dtype=torch.float32, device=self.pool.device)
        for i, name in enumerate(self.names):
            expert = self.pool.tensor(name, self.key).reshape(-1)
            for start in range(0, numel, chunk):
                stop = min(numel, start + chunk)
                x = buf[:stop - start]
                float32_delta(expert[start:stop], base[start:stop], out=x)   # = raw_delta's numbers
                if self.weights is not None:
                    x.mul_(self.weights[i])
                yield i, start, stop, x

    def raw_chunks(self, chunk: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
        """Unweighted task values of the flattened layer, a block of columns at a time (element-wise methods).

        Yields ``(start, stop, x)`` with ``x = expert_i - base`` over entries ``start:stop`` of the flattened
        tensor, ``[T, stop - start]`` float32 on the device. ``x`` is a buffer reused for the next block (the
        caller may modify it in place). On the CPU a block is ``~256K`` values (``chunk`` per task), small enough to
        stay in the core's cache through a method's whole chain of element-wise steps: on the development machine
        TIES's trim / elect / disjoint-sum runs ~6x faster this way than on the whole ``[T, *shape]`` stack, whose
        every temporary is a fresh, page-faulting allocation. Smaller blocks cost more Python between operations,
        which holds the GIL: with ``64K`` values two worker threads ran TIES's layer loop no faster than one
        (3.7-4.3 s one thread, 3.9-4.0 s two; ``256K``: 3.1-3.6 s and 1.7-2.2 s). On CUDA the whole layer is one
        block.

        Example:
            >>> pool = TaskPool({"w": torch.zeros(2, 3)}, {"a": {"w": torch.ones(2, 3)}, "b": {"w": -torch.ones(2, 3)}})
            >>> [(a, b, x.tolist()) for a, b, x in pool.layer("w").raw_chunks(chunk=4)]
            [(0, 4, [[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]), (4, 6, [[1.0, 1.0], [-1.0, -1.0]])]
        """
        dev, key, T = self.pool.device, self.key, self.num_tasks
        base = self.pool.tensor(None, key).reshape(-1)
        experts = [self.pool.tensor(n, key).reshape(-1) for n in self.names]
        numel = base.numel()
        if chunk is None:
            chunk = numel if dev.type != "cpu" else max(1024, (1 << 18) // max(1, T))
        chunk = max(1, min(chunk, numel))
        buf = torch.empty(T, chunk, dtype=torch.float32, device=dev)
        for start in range(0, numel, chunk):
            stop = min(numel, start + chunk)
            x = buf[:, :stop - start]
            for i, e in enumerate(experts):
                float32_delta(e[start:stop], base[start:stop], out=x[i])
            yield start, stop, x

    def memo(self, tag: Hashable, compute: Callable[[], Any], *, transient: bool = False) -> Any:
        """Return the cached value for ``tag`` on this layer (and these weights), computing it once.

        ``transient=True`` for values tied to one merged delta (a slider position): they live in a bounded LRU
        instead of for the life of the pool, so a long session does not grow without limit.

        A weighted view (one position of the preference sliders) keeps its values on itself, so they are computed
        once per merge and freed with the view: each weighting has its own task-matrix sum and decompositions, and
        keeping them in the pool grew the process by 0.9-1.2 GiB per slider move without bound (Iso-C, 8 ViT-B/32
        experts; now it levels off at 1.3-1.7 GiB above the unweighted merge, mostly the engine's two cached
        merges). A change of the global scale does not need them (the engine caches the weighted merge itself),
        and per-expert decompositions (:meth:`svd`) are shared by every weighting.
        """
        if self.weights is not None:
            if tag not in self._local:
                self._local[tag] = compute()
            return self._local[tag]
        return self.pool.memo((self.key, tag), compute, transient=transient)

    def svd(self, i: int, rank: int | None = None, *, cover: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Top-``rank`` SVD of task ``i`` (all components when ``rank`` is None), cut from the decomposition at
        :func:`rank_bucket` (the smallest of ``ceil(r / 2^(j/4))``, ``j = 0, 1, ...``, that covers it; ``r`` the full
        rank). A rank's factors are therefore the same bits whatever was asked before, so a merge on a warm pool
        equals the same merge on a fresh one bit for bit. Before, a rank was cut from any higher one already cached,
        which differs from its own decomposition in the last bits: TSV-M repeated after two merges at other ranks
        changed by 1e-5, and AlignMerge-O + SVC after an Ortho-Merge at a higher k differed from the fresh merge by
        1.6e-2 (SVC's directions turn at near-tied singular values). Ranks within a bucket share one decomposition.

        ``cover``: the largest rank this caller can ask for on this layer and expert set (TSV-M: ``r // T``, its
        largest valid ``k``). A rank of at least half of it is cut from ``cover``'s bucket, so the ranks a slider
        moves through near the default share one decomposition: TSV-M's rank changes there decompose no task again
        (8 ViT-B/32 experts, ``k`` 96 to 76, whose own bucket is 81: 6.0-6.2 s instead of 17.4-20.5 s on the
        2026-12-04 development machine; docs/PERFORMANCE.md, "Rank changes"). A smaller rank keeps its own bucket:
        covering it too made a TSV-M merge of 2 experts at ``rank_fraction = 0.05`` decompose 384 components for
        38 (0.52-0.76 s against 0.12 s for one ``768 x 3072`` layer, 9x the cached factors). The bucket depends on
        the rank and ``cover`` only, so the bits stay a fresh pool's.

        Cached per expert and layer: every bucket asked for while the pool's factors take at most
        :attr:`TaskPool.svd_cache_bytes`; beyond it the least recently used go, down to the two buckets used last
        of each expert and layer, which are always kept (figures in docs/PERFORMANCE.md, "The per-task SVD cache's
        memory").

        ``svd_mode="exact"``: LAPACK's SVD; ``"auto"``: :func:`studio.linalg.gram_svd` (same accuracy on the kept
        components, several times faster; null components are exact zeros with zero vectors), through
        :func:`studio.linalg.gram_svd_many` as :meth:`svds` computes it (on CUDA its eigensolve goes to cuSOLVER's
        batches, whichever of the two asks, so the cache holds the same bits either way). Either way each pair's
        sign is fixed (:func:`studio.linalg.canonical_signs`), so ranks cut from different buckets (or modes) agree to
        float32 rounding, signs included.

        Weights only rescale singular values, so every weighting shares one decomposition. Components whose singular
        value is exactly zero (a layer the expert left unchanged, a task with weight 0) have zero singular vectors in
        both modes, so they add no direction to any method's concatenation or average of vectors.
        """
        r = min(self.shape)
        rank = r if rank is None else min(rank, r)
        bucket = self._bucket(rank, cover)
        exact = self.pool.svd_mode == "exact"

        def compute() -> tuple[Tensor, Tensor, Tensor]:
            # Only task i's delta (stacking all T per call made a layer's T decompositions cost T^2 subtractions).
            raw = self.pool.raw_delta(self.key, i)
            if exact:
                U, S, Vh = linalg.truncated_svd(raw, bucket, exact=True)
                # LAPACK's vectors for exactly-zero singular values (a layer the expert left unchanged) are
                # arbitrary (the identity's columns on a CPU); like gram_svd's null components they carry no direction.
                nonzero = S != 0
                U, Vh = U * nonzero, Vh * nonzero.unsqueeze(-1)
            else:
                # Gram-matrix eigendecomposition: LAPACK-accurate top-k, unlike a randomized range finder on the flat
                # tails of real task-matrix spectra (see linalg.gram_svd).
                U, S, Vh = linalg.gram_svd_many([raw], bucket)[0]   # as svds() computes it (on CUDA: batched)
            # signs fixed, so that ranks cut from different buckets agree: LAPACK's signs differ between ranks, and
            # AlignMerge-O without sign alignment then merged 8 % differently
            U, Vh = linalg.canonical_signs(U, Vh)
            return U, S, Vh

        buckets = self.pool._svd_slot((self.key, i))   # bucket -> factors, the most recently used last
        val = self.pool._cached(buckets, bucket, compute, None)   # computed once however many threads ask
        with self.pool._lock:
            buckets[bucket] = buckets.pop(bucket, val)   # last: used most recently (back in, if dropped meanwhile)
            self.pool._keep_svd((self.key, i), bucket, val, buckets)   # a dropped bucket comes back, same bits
        U, S, Vh = val
        U, S, Vh = U[:, :rank], S[:rank], Vh[:rank, :]
        if self.weights is not None:
            w = float(self.weights[i])
            if w == 0:   # a task weighted out is a zero matrix: no singular directions (as in gram_svd)
                return torch.zeros_like(U), torch.zeros_like(S), torch.zeros_like(Vh)
            S = S * abs(w)
            if w < 0:
                U = -U
        return U, S, Vh

    def _bucket(self, rank: int, cover: int | None) -> int:
        """The bucket :meth:`svd` decomposes to for ``rank`` (at most the full rank ``r``) and ``cover``."""
        r = min(self.shape)
        covered = None if cover is None else min(cover, r)
        return rank_bucket(covered if covered is not None and rank <= covered <= 2 * rank else rank, r)

    def svds(self, indices: Iterable[int], rank: int | None = None, *,
             cover: int | None = None) -> list[tuple[Tensor, Tensor, Tensor]]:
        """``[self.svd(i, rank, cover=cover) for i in indices]``; on CUDA (``svd_mode="auto"``) the decompositions
        not cached yet are computed together, so that their eigensolves share cuSOLVER's batches
        (:func:`studio.linalg.gram_svd_many`; the same bits as one at a time), each task matrix made again where it
        is needed rather than held where the pool keeps the experts on the device. On the CPU one at a time, holding
        one task matrix at a time."""
        indices = list(indices)
        if self.device.type == "cuda" and self.pool.svd_mode != "exact" and len(indices) > 1:
            r = min(self.shape)
            bucket = self._bucket(r if rank is None else min(rank, r), cover)
            with self.pool._lock:
                missing = [i for i in dict.fromkeys(indices) if bucket not in self.pool._svd_slot((self.key, i))]
            if len(missing) > 1:
                # On a resident pool each task matrix is made again where it is needed, not all held at once (the Gram
                # matrices are): 8 ViT-L/14 experts held every thread's task matrices at a 16.5 GB peak on the H200,
                # against 14.0 before. Elsewhere making one copies its expert and the base to the device: made once.
                make = [lambda i=i: self.pool.raw_delta(self.key, i) for i in missing]
                found = linalg.gram_svd_many(make if self.pool.resident else [f() for f in make], bucket)
                for i, (U, S, Vh) in zip(missing, found):
                    U, Vh = linalg.canonical_signs(U, Vh)
                    with self.pool._lock:   # svd() below makes it the most recently used and trims the slot
                        self.pool._svd_slot((self.key, i)).setdefault(bucket, (U, S, Vh))
        return [self.svd(i, rank, cover=cover) for i in indices]

    def sum(self, cache: bool = True) -> Tensor:
        """Sum of the (weighted) task matrices, the Task Arithmetic direction: memoised (Iso-C, SVC and AlignMerge-B
        reuse it; callers must not modify it), or with ``cache=False`` computed afresh into a tensor the caller owns
        (no memory held after the merge, e.g. for weight averaging's ``sum / T``)."""
        def compute() -> Tensor:
            if self._deltas is not None:
                return self._deltas.sum(0)
            total = self.task_delta(0)  # fresh (the stack is not built), so it can accumulate in place
            buf = None
            for i in range(1, self.num_tasks):
                buf = self.task_delta(i, out=buf)
                total.add_(buf)  # in task order; may round differently from deltas.sum(0) in the last bits
            return total

        return self.memo("sum", compute) if cache else compute()

    def sum_svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD of :meth:`sum` (Iso-C eq. 7, SVC eq. 17, Iso-CTS's common subspace): LAPACK in
        ``svd_mode="exact"``, else the float64 Gram route where it is accurate (:func:`studio.linalg.svd_tall`)."""
        return self._sum_svd()[:3]

    def sum_svd_from_gram(self) -> bool:
        """Whether :meth:`sum_svd` came from the float64 Gram route (factors orthonormal to ~5e-9); ``False`` for
        LAPACK's float32 SVD (~1e-6): in ``"exact"`` mode, and in ``"auto"`` mode where the Gram route declines (a
        sum whose spectrum spans more than five decades, or is rank deficient)."""
        return self._sum_svd()[3]

    def _sum_svd(self) -> tuple[Tensor, Tensor, Tensor, bool]:
        return self.memo("sum_svd", lambda: linalg.svd_tall_route(self.sum(), exact=self.pool.svd_mode == "exact"))

    def sum_rank(self) -> int:
        """How many of :meth:`sum_svd`'s directions the data place: those above the stored weights' rounding
        (:func:`studio.linalg.rounding_rank` with :func:`studio.linalg.rounding_level`), which Iso-C and Iso-CTS
        keep. Decided on float64-accurate singular values: the Gram route's, else ``svdvals`` of the float64 sum
        (LAPACK's float32 values of a rank-deficient sum put its null space at up to ~1e-6 of the largest, where the
        float64 ones are below :func:`~studio.linalg.null_tolerance`). Memoised.

        Example:
            >>> e = torch.eye(3)
            >>> experts = {"a": {"w": e[:, :1] @ e[:1]}, "b": {"w": e[:, 1:2] @ e[1:2]}}   # rank 1 each
            >>> TaskPool({"w": torch.zeros(3, 3)}, experts).layer("w").sum_rank()
            2
        """
        def compute() -> int:
            _, S, _, from_gram = self._sum_svd()
            return self.rank_above_rounding(self.sum(), S, from_gram)

        return self.memo("sum_rank", compute)

    def sum_rounding(self) -> float:
        """The standard deviation of one entry's rounding in the float32 sum of this layer's (weighted) task
        matrices: :func:`studio.linalg.rounding_level` of every stored expert and of the sum itself (:meth:`sum_rank`'s
        level; the error in the sum whose singular vectors Iso-CTS projects the task matrices on). Memoised: Iso-CTS
        reads it beside :meth:`sum_rank`, which took the sum's norm for it already.

        Example:
            >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.ones(2, 2)}, "b": {"w": torch.ones(2, 2)}})
            >>> round(pool.layer("w").sum_rounding() / torch.finfo(torch.float32).eps, 4)   # sqrt((2 + 2 * 4) / 12)
            0.9129
        """
        def compute() -> float:
            stored = [term for terms, _ in self._rounding_terms() for term in terms]
            return linalg.rounding_level(stored, _norm2(self.sum()), math.prod(self.shape), self.num_tasks)

        return self.memo("sum_rounding", compute)

    def rank_above_rounding(self, matrix: Tensor, S: Tensor, from_gram: bool, floor: float = 0.0) -> int:
        """How many of the singular values ``S`` of ``matrix`` -- the sum of this layer's task matrices, or that sum
        less some of their components (Ortho-Merge eq. 16) -- stand above the stored weights' rounding in the sum
        (:meth:`sum_rank`'s rule) and above ``floor`` (the error of what was subtracted). ``from_gram``: whether
        ``S`` came from the float64 Gram route (:func:`studio.linalg.svd_tall_route`); else the float64 singular
        values of ``matrix`` decide, cut at their own error (``max(m, n) eps64`` of the largest) rather than the
        Gram's (:func:`~studio.linalg.null_tolerance`).

        Example:
            >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": torch.diag(torch.tensor([1.0, 1e-3]))}})
            >>> layer = pool.layer("w")
            >>> layer.rank_above_rounding(layer.sum(), *linalg.svd_tall_route(layer.sum(), exact=True)[1::2])
            2
        """
        sigma = self.sum_rounding()
        resolution = float(linalg.null_tolerance(S[0].double(), S.numel())) if S.numel() else 0.0   # the Gram's
        if not from_gram and S.numel():
            eps64, (m, n) = torch.finfo(torch.float64).eps, self.shape[-2:]
            # LAPACK's float32 values lie within rank_tolerance, or max(m, n) eps32, of the largest from the float64
            # ones (the long side's share: a 1 x N layer's error reached 35 times rank_tolerance at N = 2.4M, a
            # helper's audit): where the smallest, less that, clears every cut (the widest noise block's edge, the
            # float64 values' own error, the floor), those could not decide otherwise, and a full-rank sum skips
            # their float64 SVD (2.3x an exact-mode Ortho-Merge of a 3072 x 768 layer)
            slack = max(float(linalg.rank_tolerance(S[0], self.shape)),
                        max(m, n) * torch.finfo(torch.float32).eps * float(S[0]))
            cut = max(linalg.noise_edge(sigma, m, n), max(m, n) * eps64 * (float(S[0]) + slack), floor)
            if float(S[-1]) - slack > cut:
                return S.numel()
            S = torch.linalg.svdvals(matrix.double())
            resolution = max(m, n) * eps64 * float(S[0])
        return linalg.rounding_rank(S, self.shape, sigma, resolution=max(resolution, floor))

    def task_rounding(self, i: int, delta_norm2: float | None = None) -> float:
        """The standard deviation of one entry's rounding in task ``i``'s weighted matrix: :func:`studio.linalg.
        rounding_level` of that expert's stored weights alone and of its float32 delta (Iso-CTS's task-specific
        residuals, eq. 10; the per-task components TSV-M and AlignMerge-O whiten, :meth:`rounding_cut`).

        ``delta_norm2``: ``||w_i Delta_i||_F^2`` where the caller has it (``0`` for a lower bound); else it is bounded
        by ``w_i^2 (||x_i|| + ||base||)^2`` without forming the task matrix (at most ``sqrt(5)`` times the level for
        deltas small against their weights, where the stored weights' term dominates anyway).

        Example:
            >>> third = torch.full((2, 2), 1 / 3)   # float32 values (not on a half-precision grid), |x|^2 = 4/9
            >>> pool = TaskPool({"w": torch.zeros(2, 2)}, {"a": {"w": third}, "b": {"w": torch.zeros(2, 2)}})
            >>> layer, eps = pool.layer("w"), torch.finfo(torch.float32).eps
            >>> [round(x / eps, 4) for x in (layer.task_rounding(0, 4 / 9), layer.task_rounding(0),
            ...                              layer.task_rounding(1))]
            [0.1361, 0.1361, 0.0]
        """
        terms, bound = self._rounding_terms()[i]
        return linalg.rounding_level(terms, bound if delta_norm2 is None else delta_norm2, math.prod(self.shape), 1)

    def task_norm_bound(self, i: int) -> float:
        """An upper bound on ``||w_i Delta_i||_F`` read without forming the task matrix: ``w_i (||x_i|| + ||base||)``
        (the norms :meth:`task_rounding` reads, once per pool and layer; exact for float64 experts or bases).

        Example:
            >>> pool = TaskPool({"w": torch.ones(2, 2)}, {"a": {"w": 3 * torch.ones(2, 2)}})
            >>> pool.layer("w").task_norm_bound(0), float(pool.layer("w").task_delta(0).norm())
            (8.0, 4.0)
        """
        return math.sqrt(self._rounding_terms()[i][1])

    def rounding_cut(self, i: int, S: Tensor, rows: int | None = None, delta: Tensor | None = None) -> float:
        """The singular value at or below which a component of task ``i`` (``S``: its singular values, any order) is
        that expert's stored rounding: :func:`studio.linalg.noise_edge` of :meth:`task_rounding` over the layer, or
        over ``rows`` of its rows (Iso-CTS's residuals, on the complement of the common block): twice the largest
        singular value of that rounding. The task matrix's norm is taken only where a value of ``S`` falls between
        the cuts of its bounds (so the realistic case, every value far above, reads no delta), from ``delta`` (task
        ``i``'s :meth:`task_delta`) if the caller holds it.

        Example:
            >>> pool = TaskPool({"w": torch.zeros(3, 3)}, {"a": {"w": torch.diag(torch.tensor([1.0, 1e-9, 0.0]))}})
            >>> cut = pool.layer("w").rounding_cut(0, torch.tensor([1.0, 1e-9, 0.0]))
            >>> 1e-9 < cut < 1e-6
            True
        """
        m, n = self.shape[-2:]
        m = m if rows is None else rows
        high = linalg.noise_edge(self.task_rounding(i), m, n)
        low = linalg.noise_edge(self.task_rounding(i, 0.0), m, n)
        if bool(((S > low) & (S <= high)).any()):   # the bounds disagree on a value: the exact cut decides
            delta = self.task_delta(i) if delta is None else delta
            return linalg.noise_edge(self.task_rounding(i, _norm2(delta)), m, n)
        return high

    def component_cut(self, i: int, S: Tensor) -> float:
        """The singular value at or below which a component of task ``i`` (``S``: its top singular values,
        descending) carries no direction in either ``svd_mode``: float32's resolution of its largest
        (:func:`studio.linalg.rank_tolerance`, where LAPACK's float32 SVD leaves a rank-deficient task's remaining
        values) or its expert's stored rounding (:meth:`rounding_cut`). AlignMerge-O's components 2..L and the
        components Ortho-Merge tests for interference.

        Example:
            >>> pool = TaskPool({"w": torch.zeros(3, 3)}, {"a": {"w": torch.diag(torch.tensor([1.0, 1e-9, 0.0]))}})
            >>> 1e-9 < pool.layer("w").component_cut(0, torch.tensor([1.0, 1e-9, 0.0])) < 1e-5
            True
        """
        return max(float(linalg.rank_tolerance(S[0], self.shape)), self.rounding_cut(i, S))

    def _rounding_terms(self) -> list[tuple[list[tuple[float, torch.dtype]], float]]:
        """Per task, its rounded terms for :func:`studio.linalg.rounding_level` -- ``(w^2 ||x||_F^2, precision)`` of
        the stored expert ``x`` (weight ``w``; :func:`studio.linalg.stored_precision`: float32 weights upcast to
        float64 are rounded as float32), and for a float64 expert or base its delta's float32 rounding -- and a
        bound on ``||w Delta||_F^2``. The norms are of the unweighted weights, once per pool (the weights scale
        them)."""
        def compute() -> list[tuple[list[tuple[float, torch.dtype]], float]]:
            base = self.pool.tensor(None, self.key)
            base_norm2 = _norm2(base)
            out = []
            for i, name in enumerate(self.names):
                x = self.pool.tensor(name, self.key)
                terms = [(_norm2(x), linalg.stored_precision(x))]
                bound = (math.sqrt(terms[0][0]) + math.sqrt(base_norm2)) ** 2
                if x.dtype == torch.float64 or base.dtype == torch.float64:
                    # its delta is rounded to float32 after the subtraction (float32_delta)
                    bound = _norm2(self.pool.raw_delta(self.key, i))
                    terms.append((bound, torch.float32))
                out.append((terms, bound))
            return out

        raw = self.pool.memo((self.key, "rounding_terms"), compute)
        if self.weights is None:
            return raw
        weights = self.weights.tolist()
        return [([(w * w * norm2, dtype) for norm2, dtype in terms], w * w * bound)
                for w, (terms, bound) in zip(weights, raw)]


def _norm2(x: Tensor) -> float:
    """``||x||_F^2`` as a float64 number: through float32 (no float64 copy of a large tensor), in float64 where that
    overflows (entries beyond ~1e19), where it may underflow (a norm below ``2^-60``: the squares of entries below
    ~1e-19 round at float32's subnormal grid, and those below ~1e-23 to 0) or where ``x`` is float64.

    Example:
        >>> [f"{_norm2(torch.full((2, 2), x)):.4g}" for x in (1e-30, 1e20, 0.0)]   # float32's squares: 0, inf
        ['4e-60', '4e+40', '0']
    """
    if x.dtype != torch.float64:
        norm = float(torch.linalg.vector_norm(x, dtype=torch.float32))
        if math.isfinite(norm) and norm >= 2.0 ** -60:
            return norm * norm
    return float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2


def check_svd_mode(svd_mode: Any) -> None:
    """``svd_mode`` must be ``"auto"`` or ``"exact"`` (see :class:`TaskPool`)."""
    if not isinstance(svd_mode, str) or svd_mode not in ("auto", "exact"):
        raise StudioError(f"svd_mode must be 'auto' or 'exact', got {brief(svd_mode)}")


class TaskPool:
    """A base model, its experts and the per-layer spectral cache.

    Args:
        base: pretrained state dict.
        experts: mapping name -> fine-tuned state dict with the base's keys and shapes.
        device: ``"cpu"``, ``"cuda"`` or ``None``/``"auto"``.
        svd_mode: ``"auto"`` (Gram-eigendecomposition top-k SVD where a method keeps only top components, exact
            otherwise) or ``"exact"`` (always LAPACK's SVD).
        check_finite: scan every tensor for NaN/inf once at construction.
        resident: keep a device copy of each tensor after its first use (:meth:`tensor`); ``None``: on CUDA when
            the base and experts take at most half the free device memory.
        svd_cache_bytes: the bytes of per-task factors (:meth:`LayerTasks.svd`) the pool keeps: beyond them the
            least recently used buckets go, except the two used last of each expert and layer, which are always
            kept (so those alone may exceed it); ``None``: :func:`svd_cache_budget`.
    """

    def __init__(self, base: StateDict, experts: Mapping[str, StateDict], *, device: "str | torch.device | None" = None,
                 svd_mode: str = "auto", check_finite: bool = True, resident: bool | None = None,
                 svd_cache_bytes: int | None = None):
        validate_experts(base, experts, check_finite=check_finite)
        check_svd_mode(svd_mode)
        if svd_cache_bytes is not None and (isinstance(svd_cache_bytes, bool) or not isinstance(svd_cache_bytes, int)
                                            or svd_cache_bytes < 0):
            raise StudioError(f"svd_cache_bytes must be a whole number of bytes >= 0 (or None: half the experts' "
                              f"size), got {brief(svd_cache_bytes)}")
        # the tensors the pool was built from (the caller's objects, in copies of the dicts: replacing a tensor in
        # the caller's dict leaves the pool's own), to notice an in-place edit that would leave its caches stale
        self._sources = (dict(base.items()), {name: dict(sd.items()) for name, sd in experts.items()})
        self._fingerprint = fingerprint(*self._sources)
        # nn.Parameters (e.g. dict(model.named_parameters())) merge as their data: no autograd graph is built
        self.base = {k: _data(v) for k, v in base.items()}
        self.experts = {name: {k: _data(v) for k, v in sd.items()} for name, sd in experts.items()}
        self.names = tuple(experts)
        self.device = resolve_device(device)
        _lapack.load_cuda_solvers(self.device)   # once per process, before threads can race to load it
        self.svd_mode = svd_mode
        self.resident = _fits_on_device(self.base, self.experts, self.device) if resident is None else bool(resident)
        self._on_device: dict[tuple[str | None, str], Tensor] = {}
        self._svd_cache: dict[tuple, dict[int, tuple[Tensor, Tensor, Tensor]]] = {}
        self.svd_cache_bytes = (svd_cache_budget(self.experts, self.device) if svd_cache_bytes is None
                                else svd_cache_bytes)
        self._svd_used: "OrderedDict[tuple, int]" = OrderedDict()   # (slot, bucket) -> bytes, least recent first
        self._svd_counted: dict[tuple, int] = {}   # slot -> its buckets in _svd_used
        self._svd_bytes = 0
        self._svd_beyond_two = 0   # counted buckets beyond the two used last of their slot: those that may go
        self._memo: dict[Hashable, Any] = {}
        # Layers are merged on worker threads (studio.parallel): cache structures are guarded by one lock, and a
        # value requested by two threads at once is computed by the first while the second waits for it.
        self._lock = threading.RLock()
        self._inflight: dict[Hashable, threading.Event] = {}
        self._transient: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._merged: "OrderedDict[Hashable, dict[str, Tensor]]" = OrderedDict()

    @property
    def keys(self) -> list[str]:
        return list(self.base)

    def tensor(self, name: str | None, key: str) -> Tensor:
        """Expert ``name``'s tensor ``key`` (the base's for ``None``) on the compute device, in its own dtype.

        With :attr:`resident` (the default on CUDA when the pool fits in half the free GPU memory) the first
        request copies it to the device and later ones reuse that copy: a merge reads every expert tensor once or
        more, and each read of a host tensor is a host-to-device copy (2.8 GB for 8 ViT-B/32 experts). Otherwise it
        is moved on every request (a CPU tensor on a CPU pool is returned as it is). Callers must not modify the
        result.

        Example:
            >>> pool = TaskPool({"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}}, device="cpu", resident=True)
            >>> pool.tensor("a", "w") is pool.tensor("a", "w"), pool.tensor(None, "w").tolist()
            (True, [0.0, 0.0])
        """
        if name is not None and self._frozen(name, key):   # the base's own tensor (and device copy)
            name = None
        t = self.base[key] if name is None else self.experts[name][key]
        if not self.resident:
            return t.to(self.device)
        found = self._on_device.get((name, key))
        if found is None:   # two threads may both copy; either copy is the same tensor
            found = self._on_device.setdefault((name, key), t.to(self.device))
        return found

    def _frozen(self, name: str, key: str) -> bool:
        """Whether expert ``name`` holds ``key`` as the finer base's rounded to its half-precision dtype, every entry
        (a layer the expert left frozen, saved in bfloat16 from a float32 base): the pool then reads the base's own
        tensor for it (:meth:`tensor`), so that its delta is 0, not the base's rounding (which a merge carried: Task
        Arithmetic at 2.4 times bfloat16's rounding, Iso-C's flat spectrum at 9.7 times; an audit). Decided for the
        whole tensor, once per pool: where an expert changed a tensor, an entry it left as the base's rounding
        may have moved by up to half a step of its dtype, and the base's rounding is that entry's expected delta."""
        t, base = self.experts[name][key], self.base[key]
        if t.dtype not in (torch.float16, torch.bfloat16) or torch.finfo(t.dtype).eps <= torch.finfo(base.dtype).eps:
            return False
        return self.memo(("frozen", name, key), lambda: torch.equal(_data(t), _data(base).to(t.dtype)))

    def tied_key(self, key: str) -> str:
        """The first key, in the base's order, that holds the very tensor ``key`` holds in the base and in every expert
        (``key`` itself unless weights are tied, e.g. a language model's embedding and output head): DARE seeds the
        masks of a tensor with it, so that tied keys merge to the same values (each key drew its own masks, and a
        model reloaded with its weights tied kept only one of them; an audit). Keys tied in the base but not in some
        expert are not tied here: that expert changed them apart.

        Example:
            >>> w, v = torch.zeros(2), torch.ones(2)
            >>> pool = TaskPool({"emb": w, "head": w}, {"a": {"emb": v, "head": v}}, device="cpu")
            >>> untied = TaskPool({"emb": w, "head": w}, {"a": {"emb": v, "head": v + 0}}, device="cpu")
            >>> pool.tied_key("head"), untied.tied_key("head")
            ('emb', 'head')
        """
        def compute() -> dict[str, str]:
            def where(t: Tensor) -> tuple:   # the same tensor: same memory, layout and type
                return t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()

            first: dict[tuple, str] = {}
            ties = {}
            for k in self.base:
                if self.base[k].numel() == 0:   # no memory to share (data_ptr may be 0 for all of them)
                    continue
                sig = (where(self.base[k]),) + tuple(where(sd[k]) for sd in self.experts.values())
                ties[k] = first.setdefault(sig, k)
            return {k: t for k, t in ties.items() if t != k}

        return self.memo("tied keys", compute).get(key, key)

    def raw_delta(self, key: str, i: int, out: Tensor | None = None) -> Tensor:
        """Unweighted task matrix ``expert_i - base`` of ``key`` (float32, compute device): a fresh tensor, or
        written into ``out``. Float64 weights are subtracted before rounding (:func:`float32_delta`)."""
        return float32_delta(self.tensor(self.names[i], key), self.tensor(None, key), out=out)

    def raw_deltas(self, key: str) -> Tensor:
        """Unweighted task matrices ``[T, *shape]`` of ``key`` in float32 on the compute device."""
        # One stacked allocation and an in-place subtraction: fresh large allocations (page faults) dominate this
        # element-wise step on small CPUs, so we avoid the T temporaries of ``[e - base for e in experts]``.
        tensors = [self.tensor(n, key) for n in self.names]
        base = self.tensor(None, key)
        if base.dtype == torch.float64 or any(t.dtype == torch.float64 for t in tensors):
            return torch.stack([float32_delta(t, base) for t in tensors])
        if any(t.dtype != torch.float32 for t in tensors):
            tensors = [t.float() for t in tensors]
        return torch.stack(tensors).sub_(base.float())

    def layer(self, key: str, weights: Tensor | None = None) -> LayerTasks:
        """The :class:`LayerTasks` view of ``key``; ``weights`` (``[T]``, finite and >= 0) rescale each task
        matrix."""
        if key not in self.base:
            raise StudioError(f"unknown key {brief(key)}; the pool has {len(self.base)} keys, e.g. {self.keys[:3]}")
        if not self.base[key].is_floating_point():   # a merge keeps such a buffer as the base has it
            dtype = str(self.base[key].dtype).removeprefix("torch.")
            raise StudioError(f"'{key}' is a buffer of {dtype}, not a weight: it has no task vectors (only "
                              f"floating-point tensors do)")
        if weights is not None:
            T = len(self.names)
            try:
                w = weights if isinstance(weights, Tensor) else torch.as_tensor(weights, dtype=torch.float64)
            except (TypeError, ValueError, RuntimeError):
                w = None
            # values are read only from host memory: a device tensor's check would wait for its stream, per layer
            if w is None or w.shape != (T,) or (w.device.type == "cpu" and (
                    not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or bool((w > _FLOAT32_MAX).any()))):
                raise StudioError(f"weights for '{key}' must be {T} finite numbers >= 0 (at most float32's "
                                  f"{_FLOAT32_MAX:.3g}, the precision the task matrices are weighted in), one per "
                                  f"expert {list(self.names)}; got {brief(weights)}")
        return LayerTasks(self, key, weights)

    def memo(self, tag: Hashable, compute: Callable[[], Any], *, transient: bool = False) -> Any:
        """Cached ``compute()`` for ``tag``: for the pool's life, or (``transient``) in an LRU of
        ``4 * len(keys)`` entries, about four merges' worth of per-layer values. Thread-safe: concurrent requests
        for one tag compute it once."""
        if transient:
            return self._cached(self._transient, tag, compute, 4 * len(self.base))
        return self._cached(self._memo, tag, compute, None)

    def _cached(self, store: "dict | OrderedDict", tag: Hashable, compute: Callable[[], Any],
                limit: int | None) -> Any:
        """``store[tag]``, computed once however many threads ask at the same time (the others wait for it; if it
        fails, the next one computes it). ``limit``: ``store`` is an LRU of that many entries."""
        flight = (id(store), tag)
        while True:
            with self._lock:
                if tag in store:
                    if limit is not None:
                        store.move_to_end(tag)
                    return store[tag]
                pending = self._inflight.get(flight)
                if pending is None:
                    pending = self._inflight[flight] = threading.Event()
                    break
            pending.wait()  # another thread is computing it; if that failed, the loop computes it here
        try:
            value = compute()
            with self._lock:
                store[tag] = value
                while limit is not None and len(store) > limit:
                    store.popitem(last=False)
            return value
        finally:
            with self._lock:
                del self._inflight[flight]
            pending.set()

    def check_unchanged(self) -> None:
        """Raise :class:`ExpertError` naming the expert (or the base) and the key if a tensor this pool merges changed
        in place since the pool was built, as :func:`fingerprint` sees it (a torch in-place operation, or an edit
        that changes one of its sampled values): the pool's cached decompositions and merges would be of the old
        weights. Replacing a tensor in the caller's dict changes nothing here (the pool keeps its own).
        :func:`studio.merge_pool` checks this first; :func:`studio.get_pool` (and :func:`studio.merge`) build a new
        pool for changed weights.

        Example:
            >>> base, experts = {"w": torch.zeros(2)}, {"a": {"w": torch.ones(2)}}
            >>> pool = TaskPool(base, experts)
            >>> _ = experts["a"]["w"].mul_(2)
            >>> pool.check_unchanged()  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            studio.pool.ExpertError: expert 'a': tensor 'w' changed since this pool was built, so its cached ...
        """
        now = fingerprint(*self._sources)
        if now == self._fingerprint:
            return
        (was_base, was_experts), (is_base, is_experts) = self._fingerprint, now
        pairs = [("the base", was_base, is_base)] + [
            (f"expert {a[0]!r}", a[1], b[1]) for a, b in zip(was_experts, is_experts)]
        for who, was, is_ in pairs:   # same keys in the same order (the pool's own dicts): compare entry by entry
            for a, b in zip(was, is_):
                if repr(a) != repr(b):   # repr: a NaN among the sampled values equals itself
                    raise ExpertError(f"{who}: tensor {a[0]!r} changed since this pool was built, so its cached "
                                      f"decompositions are of the old weights; build a new pool with "
                                      f"studio.get_pool(base, experts) (studio.merge does)")

    def _svd_slot(self, layer_task: tuple[str, int]) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
        with self._lock:
            return self._svd_cache.setdefault(layer_task, {})

    def _keep_svd(self, slot: tuple[str, int], bucket: int, factors: tuple[Tensor, Tensor, Tensor],
                  held: dict) -> None:
        """Count the factors of ``bucket`` just used for ``slot`` (an expert's layer), held in the slot's dict
        ``held``, as the most recent, then drop the least recently used buckets while the counted factors exceed
        :attr:`svd_cache_bytes`, never one of the two used last of its slot nor another slot's copy of ``bucket``.
        The caller holds the lock. Factors put in a slot's dict by a :meth:`clear` meanwhile replaced are not
        counted (nor kept)."""
        entry = (slot, bucket)
        if entry in self._svd_used:
            self._svd_used.move_to_end(entry)
        elif self._svd_cache.get(slot) is held:
            self._svd_used[entry] = sum(t.numel() * t.element_size() for t in factors)
            self._svd_bytes += self._svd_used[entry]
            self._svd_counted[slot] = self._svd_counted.get(slot, 0) + 1
            self._svd_beyond_two += self._svd_counted[slot] > 2
        if self._svd_bytes <= self.svd_cache_bytes or not self._svd_beyond_two:
            return
        # the bucket just used is the one the running merge asks every expert and layer for: dropping another's
        # copy of it would only have it decomposed again a moment later (each recompute dropping the next one's)
        for old in list(self._svd_used):
            if self._svd_counted[old[0]] > 2 and old[1] != bucket:
                self._svd_cache.get(old[0], {}).pop(old[1], None)
                self._svd_bytes -= self._svd_used.pop(old)
                self._svd_counted[old[0]] -= 1
                self._svd_beyond_two -= 1
                if self._svd_bytes <= self.svd_cache_bytes or not self._svd_beyond_two:
                    return

    def merged_cache(self, tag: Hashable, compute: Callable[[], dict[str, Tensor]], keep: int = 2) -> dict[str, Tensor]:
        """LRU of whole unscaled merged deltas, so a change of a post-scale param (alpha) is a rescale. Merges that
        differ only in such a param, asked for at once, compute the merge once."""
        return self._cached(self._merged, tag, compute, keep)

    def clear(self) -> None:
        """Drop every cached decomposition, merged delta and device copy (frees memory)."""
        with self._lock:
            self._on_device.clear()
            self._svd_cache.clear()
            self._svd_used.clear()
            self._svd_counted.clear()
            self._svd_bytes = self._svd_beyond_two = 0
            self._memo.clear()
            self._transient.clear()
            self._merged.clear()


def rank_bucket(rank: int, full: int) -> int:
    """The rank :meth:`LayerTasks.svd` decomposes to serve ``rank`` of a ``full``-rank matrix: the smallest of
    ``ceil(full / 2^(j/4))``, ``j = 0, 1, 2, ...``, that is at least ``rank`` (1 for rank 0). Quarter octaves keep
    the decomposition within 19 % of the rank asked (halves held up to 1.78x the factors, e.g. rank 109 of 768, TSV-M's
    default for 7 experts, in 192); every ``full / 2^i``, TSV-M's default for 2, 4, 8 or 16 experts, is a bucket.

    Example:
        >>> [rank_bucket(k, 768) for k in (0, 1, 76, 95, 96, 97, 109, 600)], rank_bucket(6, 50)
        ([1, 1, 81, 96, 96, 115, 115, 646], 6)
    """
    if not 0 <= rank <= full:
        raise StudioError(f"rank must be in [0, {full}], got {rank}")
    bucket, j = full, 1
    while bucket > 1:
        # exact for j a multiple of 4; elsewhere r / 2^(j/4) is irrational, never within rounding of an integer
        lower = -(-full // 2 ** (j // 4)) if j % 4 == 0 else math.ceil(full * 2.0 ** (-j / 4))
        if lower < rank:
            break
        bucket, j = min(bucket, lower), j + 1
    return bucket


def key_seed(seed: int, key: str) -> int:
    """A per-layer seed derived from a global one, stable across runs and platforms."""
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2**63 - 1)


def normalize_preferences(preferences: "Mapping[str, float] | Sequence[float] | Tensor | None",
                          names: Sequence[str], *, what: str = "preferences") -> Tensor | None:
    """Validate per-task preference weights and return them normalised to sum to 1 (``None``: uniform).

    A mapping may name a subset of the tasks; the others get weight 0 (``{"a": 1}`` is the one-hot target-task
    setting). A sequence must give one weight per task, in expert order. ``what``: the argument's name in errors
    (e.g. ``alpha_sweep``'s ``objective_weights``, checked the same way).

    Example:
        >>> normalize_preferences({"a": 1, "b": 3}, ["a", "b"]).tolist()
        [0.25, 0.75]
    """
    if preferences is None:
        return None
    if isinstance(preferences, Mapping):
        unknown = sorted(map(brief, set(preferences) - set(names)))
        if unknown:
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise StudioError(f"{what} name unknown task(s) {', '.join(unknown[:10])}{more}; the experts are "
                              f"{list(names)}")
        if not preferences:
            raise StudioError(f"{what} name no task; give a weight to at least one of the experts {list(names)} "
                              f"(or None: uniform)")
        values = [preferences.get(n, 0.0) for n in names]
    else:
        ordered = isinstance(preferences, (Sequence, Tensor, np.ndarray)) and not isinstance(preferences, (str, bytes))
        if isinstance(preferences, Tensor) and preferences.is_meta:
            raise StudioError(f"{what} are a meta tensor (no data); give the weights' values")
        if not ordered or (isinstance(preferences, (Tensor, np.ndarray)) and preferences.ndim != 1):
            raise StudioError(f"{what} must be a mapping task -> weight or a sequence of one weight per task "
                              f"(in expert order), got {brief(preferences)}")
        values = list(preferences.tolist() if isinstance(preferences, (Tensor, np.ndarray)) else preferences)
        if len(values) != len(names):
            raise StudioError(f"{what} has {len(values)} weights but there are {len(names)} experts {list(names)}")
    weights = []
    for name, v in zip(names, values):
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        try:   # any real scalar: int, float, NumPy's scalars, a one-element tensor
            w = float(v) if not isinstance(v, (bool, np.bool_, str)) else None
        except (TypeError, ValueError, OverflowError, RuntimeError, NotImplementedError):   # e.g. 10**400, meta
            w = None
        if w is None or not math.isfinite(w) or w < 0:
            entry = "preference" if what == "preferences" else f"{what} entry"
            raise StudioError(f"{entry} for task '{name}' is {brief(v)}; expected a finite number >= 0")
        weights.append(w)
    total = sum(weights)
    if total <= 0:
        raise StudioError(f"{what} are all zero (tasks {list(names)}); give at least one task a positive weight")
    given = weights
    if not math.isfinite(total):   # each weight is finite, so their ratios are: e.g. [1e308, 1e308]
        largest = max(weights)
        weights = [w / largest for w in weights]
        total = sum(weights)
    normalized = torch.tensor([w / total for w in weights], dtype=torch.float32)
    tiny = torch.finfo(torch.float32).tiny
    for name, w, n in zip(names, given, normalized.tolist()):
        # a positive weight must stay a positive normal float32 number once normalised: weight 0 means another
        # thing than a small weight (studio.merge's docstring), so rounding one to the other would merge something
        # else (a weight the rescale above took to 0 included)
        if w > 0 and n < tiny:
            entry = "preference" if what == "preferences" else f"{what} entry"
            raise StudioError(f"{entry} for task '{name}' is {brief(w)}, {n:.3g} of the weights' sum: below "
                              f"float32's smallest normal number ({tiny:.3g}), where it would compute as 0 or lose "
                              f"its precision, and a weight of exactly 0 drops the task's directions rather than "
                              f"shrinking them; give it 0, or a weight at least {tiny:.3g} times the sum")
    return normalized
