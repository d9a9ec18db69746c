"""Benchmark: seconds cold / warm and peak memory per method on synthetic experts with real CLIP shapes.

    python -m studio.bench                         # ViT-B/32, 8 tasks, every method, CPU (and CUDA if present)
    python -m studio.bench --model ViT-L-14 --tasks 20 --device cuda --methods tsv_m iso_cts
    python -m studio.bench --model ViT-L-14 --tasks 20 --device cpu --experts-dir /tmp/l14x20   # 24 GB on disk
    python -m studio.bench --evaluate              # per-task evaluation of one merged MiniSuite model instead

Experts are synthetic but shaped exactly like open_clip's visual towers (built on the meta device from open_clip's
own model configs), with task matrices = shared low-rank part + task-specific low-rank part with a decaying spectrum
+ small dense noise, the structure fine-tuning deltas show in the TSV/Iso papers.

Before the table every row's merge runs once on one tensor of each shape (:func:`warm_up`; ``--no-warm-up`` leaves
it out), so that one-time costs of the process (the CUDA context, libraries and kernels loaded on first use) fall in
no row. Columns: ``cold`` = first merge on a fresh pool (empty spectral cache, includes every decomposition);
``warm_alpha`` = the same method after changing its global scale; ``warm_struct`` = after changing a structural
hyperparameter (the one listed), reusing the per-expert decompositions; ``peak_MB`` = peak extra memory allocated
during the cold merge, in MiB: on the CPU sampled through glibc's ``mallinfo2`` every 10 ms and once at the merge's
end with its output still held (the resident set size elsewhere; a lower bound), on CUDA the allocator's peak. Where
a slow reference (the official code's loop, ``studio.reference``) exists, ``ref`` times
it on the same experts and ``speedup`` = ref / cold. With ``--peer`` (the ``crosscheck`` extra), ``FusionBench s``
times FusionBench 0.2.33's own functions on the rows it implements (task vectors, merge, base added: its algorithms'
``run`` after loading the models; stdout silenced) and ``vs FB`` = FusionBench / cold. With ``--repeat N`` every row
runs on N fresh pools and each timing is the fastest of the N (background load on a shared machine only adds time),
the reference's and FusionBench's too (they ran once until 2026-12-08).
``steal %`` = share of the machine's CPU time the hypervisor gave to other guests during the reported cold run
(``/proc/stat``): timings taken at high steal are slow for that reason. Under a CUDA table, a line gives each row's
use of cuSOLVER's batched eigensolver in its reported cold merge (:mod:`studio._cusolver`): batches, matrices per
batch, seconds in batches. Under every table, a line gives the pages each reported structural change faulted in
(memory the process grew into, a first touch that is slow on some VMs) and the kernel's time for the process meanwhile.

With ``--experts-dir DIR`` the experts are written to ``DIR`` as safetensors checkpoints (Hugging Face's sharded
layout; reused while ``DIR`` holds the same pool) and merged from there, mapped from their files by ``studio.io`` as a
user's checkpoints are (:func:`synthetic_pool_on_disk`): a pool larger than the machine's memory (20 ViT-L/14
experts in float32, 24 GB) is read from storage again as the merges need it, and a line under the table says how
much each reported cold merge read.

The benchmark process keeps freed memory for reuse (:func:`studio.memory.keep_freed_memory`), as the app and the
CLI do; ``--malloc default`` measures glibc's default policy instead (every merge page-faults its memory in again).
"""

from __future__ import annotations

import argparse
import errno
import gc
import os
import re
import threading
import time
from typing import Any, Callable, Iterator

import torch

from . import _cusolver, _lapack, engine, methods  # noqa: F401  (methods: registers every method)
from .memory import keep_freed_memory, malloc_in_use
from .parallel import cpu_workers
from .registry import CALIBRATIONS, METHODS, get_calibration, get_method
from .schema import StudioError

# (method, calibration, structural change used for warm_struct; a callable value is evaluated on the task count; a
# key "CALIBRATION.NAME" is the calibration's hyperparameter)
DEFAULT_RUNS: list[tuple[str, str | None, dict[str, Any]]] = [
    ("weight_average", None, {}),
    ("task_arithmetic", None, {}),
    ("ties", None, {"k": 0.1}),
    ("dare", None, {"p": 0.5}),
    ("breadcrumbs", None, {"beta": 0.05}),
    ("tsv_m", None, {"rank_fraction": lambda tasks: 0.8 / tasks}),  # 0.1 for 8 tasks; must stay <= 1/T
    ("iso_c", None, {}),
    ("iso_cts", None, {"common_space_fraction": 0.7}),
    ("ortho_merge", None, {"tau": 0.4}),
    ("align_merge_o", None, {"eta": "dominant"}),
    ("align_merge_b", None, {"alpha": lambda tasks: tasks / 4 + 1}),   # the gate, one above its automatic |T|/4
    ("task_arithmetic", "svc", {"svc.alpha": lambda tasks: 2 / tasks}),   # twice its automatic 1/T
    ("ties", "align_merge_b", {"align_merge_b.alpha": lambda tasks: tasks / 4 + 1}),
]


def clip_visual_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of open_clip's ``model`` visual tower, with the ``visual.`` prefix (no weights built).

    ``model`` is any open_clip config name, including the packaged ``MiniCLIP-ViT`` of the embedded MiniSuite.
    """
    import open_clip
    from open_clip.model import _build_vision_tower

    from .suite import register_model_configs

    register_model_configs()

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise StudioError(f"unknown open_clip model {model!r}; e.g. ViT-B-32, ViT-L-14 or the embedded suite's "
                          f"MiniCLIP-ViT (open_clip.list_models() lists them all)")
    with torch.device("meta"):
        tower = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"])
    return {f"visual.{k}": tuple(v.shape) for k, v in tower.state_dict().items()}


def expert_names(tasks: int) -> list[str]:
    """The synthetic experts' names: ``task00``, ``task01``, ..."""
    return [f"task{t:02d}" for t in range(tasks)]


def _synthetic_draws(shapes: dict[str, tuple[int, ...]], tasks: int, *, seed: int, dtype: torch.dtype
                     ) -> tuple[dict[str, torch.Tensor], Iterator[tuple[str, list[torch.Tensor]]]]:
    """The base, and each tensor's ``tasks`` expert values one key at a time, in :func:`synthetic_pool`'s draws."""
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}

    def layers() -> Iterator[tuple[str, list[torch.Tensor]]]:
        for key, shape in shapes.items():
            if len(shape) == 2 and min(shape) > 1:
                m, n = shape
                r = min(m, n)
                k = max(1, r // 8)
                shared = (torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g)) / k
            values = []
            for _ in range(tasks):
                if len(shape) == 2 and min(shape) > 1:
                    decay = torch.logspace(0, -2, k)
                    specific = (torch.randn(m, k, generator=g) * decay) @ torch.randn(k, n, generator=g)
                    delta = 0.4 * shared + specific / k
                    delta += 0.02 * torch.randn(m, n, generator=g)
                    delta *= 1e-3
                else:
                    delta = 1e-3 * torch.randn(shape, generator=g)
                values.append((base[key].float() + delta).to(dtype))
            yield key, values

    return base, layers()


def synthetic_pool(shapes: dict[str, tuple[int, ...]], tasks: int, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """A base and ``tasks`` experts whose task matrices have fine-tuning-like low-rank-plus-noise structure."""
    base, layers = _synthetic_draws(shapes, tasks, seed=seed, dtype=dtype)
    experts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in expert_names(tasks)}
    for key, values in layers:
        for name, value in zip(experts, values):
            experts[name][key] = value
    return base, experts


#: The description of the pool an ``--experts-dir`` folder holds (:func:`synthetic_pool_on_disk`). Written first
#: with ``"complete": false``, so that the folder is known as this bench's whatever happens next, and again with
#: ``"complete": true`` once every file is written.
POOL_MANIFEST = "synthetic-pool.json"

#: Largest shard of an on-disk expert, in bytes: the writer holds one pending shard per expert (20 x 100 MB), not
#: the experts.
SHARD_BYTES = 100 * 10**6

#: Version of :func:`_synthetic_draws`' algorithm, recorded in the manifest: a pool drawn otherwise is not reused.
DRAWS = 1


def plan_shards(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, max_bytes: int = SHARD_BYTES
                ) -> dict[str, list[str]]:
    """Shard file name -> its tensors, in Hugging Face's sharded layout (``model-00001-of-00003.safetensors``, or
    ``model.safetensors`` alone): the keys in order, a new shard whenever the next tensor would take the current one
    past ``max_bytes`` (a larger tensor gets a shard of its own). Computed from the shapes alone: every shard's keys
    are consecutive, so the writer holds one pending shard per expert.

    Example:
        >>> plan_shards({"a": (10,), "b": (10,), "c": (30,)}, torch.float32, max_bytes=100)
        {'model-00001-of-00002.safetensors': ['a', 'b'], 'model-00002-of-00002.safetensors': ['c']}
    """
    groups: list[list[str]] = []
    size = 0
    for key, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if not groups or size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    if len(groups) <= 1:
        return {"model.safetensors": groups[0] if groups else []}
    return {f"model-{i:05d}-of-{len(groups):05d}.safetensors": keys for i, keys in enumerate(groups, 1)}


def _written_here(entry) -> bool:
    """Whether an entry of an ``--experts-dir`` folder is one :func:`synthetic_pool_on_disk` writes: ``base``, an
    expert's folder ``taskNN`` or the manifest (or its temporary file), and not a symbolic link."""
    name = entry.name
    if entry.is_symlink():
        return False
    return name == "base" or re.fullmatch(r"task\d{2,}", name) is not None \
        or name == POOL_MANIFEST or re.fullmatch(rf"\.{re.escape(POOL_MANIFEST)}\..*\.tmp", name) is not None


def _write_pool(folder, plan: dict[str, list[str]], shapes: dict[str, tuple[int, ...]], tasks: int, *, seed: int,
                dtype: torch.dtype) -> None:
    """Write :func:`synthetic_pool`'s draws into ``folder`` as :func:`synthetic_pool_on_disk` describes, each shard of
    ``plan`` (:func:`plan_shards`) for every expert as soon as its last tensor is drawn."""
    import json
    from pathlib import Path

    from .io import SHARD_INDEX, atomic_write, save_state_dict

    base, layers = _synthetic_draws(shapes, tasks, seed=seed, dtype=dtype)
    save_state_dict(folder / "base" / "model.safetensors", base)
    names = expert_names(tasks)
    pending: dict[str, dict[str, torch.Tensor]] = {name: {} for name in names}
    waiting = {file: set(keys) for file, keys in plan.items()}
    for key, values in layers:
        for name, value in zip(names, values):
            pending[name][key] = value
        for file, keys in list(waiting.items()):
            keys.discard(key)
            if not keys:
                del waiting[file]
                for name in names:
                    save_state_dict(folder / name / file, {k: pending[name].pop(k) for k in plan[file]})
    if len(plan) > 1:
        total = sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
        index = json.dumps({"metadata": {"total_size": total},
                            "weight_map": {k: file for file, keys in plan.items() for k in keys}}, indent=2)
        for name in names:
            with atomic_write(folder / name / SHARD_INDEX) as tmp:
                Path(tmp).write_text(index)


def synthetic_pool_on_disk(folder: str | os.PathLike, shapes: dict[str, tuple[int, ...]], tasks: int, *,
                           seed: int = 0, dtype: torch.dtype = torch.float32, shard_bytes: int = SHARD_BYTES,
                           ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], float | None]:
    """:func:`synthetic_pool`'s base and experts (the same draws) as checkpoints in ``folder``, read back as a user's
    are: ``base/model.safetensors`` and one folder per expert in Hugging Face's sharded layout
    (``model-0000i-of-0000n.safetensors`` and ``model.safetensors.index.json``, :func:`plan_shards`), loaded with
    :func:`studio.io.load_state_dict`.

    Their tensors map the files (safetensors' ``mmap``): file pages, which the kernel reads in when a merge touches
    them and may evict again under memory pressure, so a pool larger than the machine's memory (20 ViT-L/14 experts
    in float32: 24 GB) can be merged, at the cost of reading it again from storage. Writing holds the base and one
    pending shard per expert, never the experts.

    The folder's :data:`POOL_MANIFEST` tells what it holds. A complete pool with the same shapes, task count, seed,
    dtype, shard size and draws is reused. A folder with a manifest holds a pool this bench wrote (another one, or an
    unfinished one): it is emptied and written again. A new or empty folder is written. Any other folder is refused
    untouched, as is one whose file system lacks the space (counting what emptying it frees). Raises
    :class:`~studio.schema.StudioError` naming the folder or file at fault and what to do. Returns ``(base, experts,
    seconds spent writing, or None if reused)``.

    Example:
        >>> import tempfile, shutil
        >>> folder = tempfile.mkdtemp()
        >>> shapes = {"visual.w": (6, 4), "visual.b": (6,)}
        >>> base, experts, _ = synthetic_pool_on_disk(folder, shapes, 2)
        >>> same_base, same = synthetic_pool(shapes, 2)
        >>> all(torch.equal(experts[n][k], same[n][k]) for n in same for k in shapes), sorted(os.listdir(folder))
        (True, ['base', 'synthetic-pool.json', 'task00', 'task01'])
        >>> synthetic_pool_on_disk(folder, shapes, 2)[2] is None   # reused
        True
        >>> shutil.rmtree(folder)
    """
    import json
    import shutil
    from pathlib import Path

    from .io import atomic_write, load_state_dict

    folder = Path(folder)
    wanted = {"format": 1, "draws": DRAWS, "tasks": tasks, "seed": seed, "dtype": str(dtype).removeprefix("torch."),
              "shard_bytes": shard_bytes, "shapes": {k: list(s) for k, s in shapes.items()}, "complete": True}
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"{folder} is a file; give a folder (new, empty, or one this bench wrote)")
    found = None
    if (folder / POOL_MANIFEST).is_file():
        try:
            found = json.loads((folder / POOL_MANIFEST).read_text())
        except (OSError, ValueError):
            found = {}
    seconds = None

    def write_manifest(complete: bool) -> None:
        with atomic_write(folder / POOL_MANIFEST) as tmp:
            Path(tmp).write_text(json.dumps({**wanted, "complete": complete}))

    if found != wanted:
        try:
            entries = list(folder.iterdir()) if folder.is_dir() else []
        except OSError as exc:
            raise StudioError(f"cannot read the folder {folder}: {exc.strerror or exc}") from None
        others = sorted(e.name for e in entries if not _written_here(e))
        if entries and (found is None or others):
            named = others or sorted(e.name for e in entries)
            raise StudioError(
                f"{folder} holds files this bench did not write ({', '.join(named[:3])}"
                f"{f' and {len(named) - 3} more' if len(named) > 3 else ''}); give an empty or new folder, or one "
                f"it wrote (with its {POOL_MANIFEST})")
        nbytes = (tasks + 1) * sum(torch.Size(s).numel() for s in shapes.values()) * dtype.itemsize
        held = sum(f.stat().st_size for e in entries if e.is_dir() for f in e.rglob("*") if f.is_file())
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise StudioError(f"cannot make the folder {folder}: {existing} is a file")
        usage = shutil.disk_usage(existing)
        if usage.total == 0:   # /proc, /sys: no storage behind them
            raise StudioError(f"{folder} is on a file system without storage ({existing}); give a folder on a disk")
        if not os.access(existing, os.W_OK):
            raise StudioError(f"cannot write in {existing} (permission denied); give a folder you can write")
        free = usage.free + held
        if 1.01 * nbytes + 2**20 > free:
            raise StudioError(
                f"{tasks} experts and the base take {nbytes / 2**30:.1f} GiB in {wanted['dtype']}, and the file "
                f"system of {folder} has {free / 2**30:.1f} GiB free{' with the old pool deleted' if held else ''}; "
                f"give a folder on a larger file system, fewer --tasks or --dtype bfloat16")
        start = time.perf_counter()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_manifest(complete=False)   # the folder is this bench's from here on, whatever happens next
            for entry in entries:
                if entry.name == POOL_MANIFEST:
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            _write_pool(folder, plan_shards(shapes, dtype, shard_bytes), shapes, tasks, seed=seed, dtype=dtype)
            write_manifest(complete=True)
        except (OSError, StudioError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            cause = exc if isinstance(exc, OSError) else exc.__cause__
            full = (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)) or any(
                text in why for text in ("No space left", "Disk quota", "File too large"))   # safetensors' words
            raise StudioError(f"writing the pool to {folder} failed: {why}; {'free space or ' if full else ''}give "
                              f"another folder (a rerun writes the pool again; the bench never reuses an unfinished "
                              f"one)") from None
        seconds = time.perf_counter() - start

    def read(name: str) -> dict[str, torch.Tensor]:   # in the tower's order, as synthetic_pool's (files sort keys)
        found = load_state_dict(folder / name)
        missing = [k for k in shapes if k not in found]
        if missing:
            raise StudioError(f"{folder / name} lacks the tensor {missing[0]!r}")
        return {k: found[k] for k in shapes}

    try:
        return read("base"), {name: read(name) for name in expert_names(tasks)}, seconds
    except StudioError as exc:
        raise StudioError(f"{folder} holds a damaged pool ({exc}); empty the folder to write it again") from None


def _cuda_eigh_route() -> str:
    available = _cusolver.available()
    return (f"CUDA eigensolves of <= {_lapack.BATCHED_EIGH_MAX if available else 0} rows in cuSOLVER's batches"
            + ("" if available else " (cusolverDnXsyevBatched not available)")
            + f", else of <= {_lapack.HOST_EIGH_MAX} rows on the host; ")


class PeakMemory:
    """Peak extra memory during a block: the CUDA allocator's peak, or on the CPU the bytes held through ``malloc``
    (:func:`studio.memory.malloc_in_use`), else the resident set size, sampled every 10 ms and wherever
    :meth:`sample` is called: on the CPU a lower bound (a peak shorter than the period can fall between readings), in
    MiB.

    The resident set size cannot measure a block in a process that keeps freed memory
    (:func:`studio.memory.keep_freed_memory`): a second merge reuses the first one's pages and adds none.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _held_mb() -> float:
        held = malloc_in_use()
        if held is not None:
            return held / 2**20
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)   # the device timed, not the current one (--device cuda:N)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._held_mb()
            self._peak = self._start
            self._stop = threading.Event()

            def sample() -> None:
                while not self._stop.wait(0.01):
                    self._peak = max(self._peak, self._held_mb())

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def sample(self) -> None:
        """One reading now, beside the sampler's (the CUDA allocator's peak is exact and needs none)."""
        if self.device.type != "cuda":
            self._peak = max(self._peak, self._held_mb())

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._peak, self._held_mb()) - self._start


class _Change:
    """A block's change in a process or machine counter: ``_read()`` on entry and on exit, ``_changed(start, end)``
    gives the values of ``_fields``; they stay None where the counter cannot be read."""

    _fields: tuple[str, ...] = ()

    def _read(self) -> Any:
        raise NotImplementedError

    def _changed(self, start: Any, end: Any) -> tuple | None:
        raise NotImplementedError

    def __enter__(self):
        for name in self._fields:
            setattr(self, name, None)
        self._start = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        end = self._read()
        values = None if self._start is None or end is None else self._changed(self._start, end)
        if values is not None:
            for name, value in zip(self._fields, values):
                setattr(self, name, value)


class CpuSteal(_Change):
    """Share of the machine's CPU time the hypervisor gave to other guests ("steal", ``/proc/stat``) during a
    block, in percent (``percent``), or None where it is not reported. On a shared VM this explains slow runs: at 50%
    steal a 2-core guest computes at about one core's speed."""

    _fields = ("percent",)
    percent: float | None

    def _read(self) -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        if len(fields) < 8:
            return None
        return fields[7], sum(fields[:8])  # steal, user + nice + system + idle + iowait + irq + softirq + steal

    def _changed(self, start: tuple[int, int], end: tuple[int, int]) -> tuple[float] | None:
        if end[1] <= start[1]:
            return None
        return (100.0 * (end[0] - start[0]) / (end[1] - start[1]),)


class StorageReads(_Change):
    """Bytes this process read from storage during a block (``bytes``: ``read_bytes`` of ``/proc/self/io``,
    page-cache misses, e.g. the pages of memory-mapped experts the kernel had evicted), or None where it is not
    reported."""

    _fields = ("bytes",)
    bytes: int | None

    def _read(self) -> int | None:
        try:
            with open("/proc/self/io") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
        except (OSError, ValueError, StopIteration, IndexError):
            return None

    def _changed(self, start: int, end: int) -> tuple[int]:
        return (end - start,)


class PageFaults(_Change):
    """Pages this process faulted in during a block (``pages``: minor and major faults, ``getrusage``) and the
    kernel's time for the process meanwhile (``system_s``), or None where ``getrusage`` is missing. A merge faults
    when it needs memory the process has not held before (freed memory is reused,
    :func:`studio.memory.keep_freed_memory`); on a VM whose host backs guest memory on first touch each fault costs
    microseconds (docs/PERFORMANCE.md)."""

    _fields = ("pages", "system_s")
    pages: int | None
    system_s: float | None

    def _read(self) -> tuple[int, float] | None:
        try:
            import resource
        except ImportError:   # Windows has no resource module
            return None
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_minflt + use.ru_majflt, use.ru_stime

    def _changed(self, start: tuple[int, float], end: tuple[int, float]) -> tuple[int, float]:
        return end[0] - start[0], end[1] - start[1]


def blas_kernels() -> str:
    """Which kernels the CPU fast paths run: OpenBLAS's (NumPy's and SciPy's, ``studio._lapack``) as picked for this
    processor or forced by ``OPENBLAS_CORETYPE``, and PyTorch's own BLAS for everything else."""
    import threadpoolctl

    from . import _lapack

    _lapack.have_syevr()   # load SciPy's LAPACK so it is listed
    libs = threadpoolctl.threadpool_info()
    arch = sorted({str(i.get("architecture")) for i in libs if i["internal_api"] == "openblas"})
    forced = os.environ.get("OPENBLAS_CORETYPE")
    return (f"OpenBLAS kernel {'/'.join(arch) or 'none'}" + (f" (OPENBLAS_CORETYPE={forced})" if forced else "")
            + f", torch BLAS {'MKL' if torch.backends.mkl.is_available() else 'other'}")


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


def warm_up(base, experts, runs, device: torch.device, svd_mode: str = "auto") -> tuple[int, float]:
    """Every row's merge once, on one tensor of each shape of the tower (and every expert), before the table: the
    process's one-time costs then fall in no row (the CUDA context, loading a library or its kernels on first use,
    cuSOLVER handles, thread pools), as in the app, which pays them once for every merge after. Returns the number
    of tensors and the seconds taken.

    Example:
        >>> base = {"a": torch.zeros(4, 3), "b": torch.zeros(4, 3), "c": torch.zeros(3)}
        >>> experts = {n: {k: v + 0.01 * i for k, v in base.items()} for i, n in enumerate(["x", "y"])}
        >>> warm_up(base, experts, [("task_arithmetic", None, {})], torch.device("cpu"))[0]
        2
    """
    keys = list({tuple(t.shape): k for k, t in reversed(list(base.items()))}.values())[::-1]
    sub_base = {k: base[k] for k in keys}
    sub_experts = {name: {k: sd[k] for k in keys} for name, sd in experts.items()}
    start = time.perf_counter()
    for method, cal, _ in runs:
        engine._POOLS.clear()
        pool = engine.TaskPool(sub_base, sub_experts, device=device, svd_mode=svd_mode, check_finite=False)
        _timed(lambda: engine.merge_pool(pool, method, calibrate=cal), device)
    engine._POOLS.clear()
    return len(keys), time.perf_counter() - start


def _time_or_failed(what: str, fn: Callable[[], Any], device: torch.device) -> float | str:
    """Seconds ``fn`` takes, or ``"failed"`` (reported on a comment line) where it raises a RuntimeError: LAPACK
    failing to converge in the official float32 Iso-CTS loop, which both the reference and FusionBench run."""
    try:
        return _timed(fn, device)[0]
    except RuntimeError as exc:
        print(f"# {what} failed: {str(exc).splitlines()[0]}", flush=True)
        return "failed"


def _best_of(what: str, fn: Callable[[], Any], device: torch.device, repeat: int) -> float | str:
    """The fastest of ``repeat`` runs of :func:`_time_or_failed`, as the rows' own timings are (the reference and
    FusionBench ran once against the rows' best of ``--repeat``: an audit of the bench); ``"failed"`` at the first
    failure."""
    best: float | str = "failed"
    for _ in range(max(1, repeat)):
        seconds = _time_or_failed(what, fn, device)
        if seconds == "failed":
            return seconds
        best = seconds if best == "failed" else min(best, seconds)
        gc.collect()
    return best


def bench_one(base, experts, method: str, calibrate: str | None, struct: dict[str, Any], device: torch.device,
              svd_mode: str = "auto", repeat: int = 1, keep: bool = False) -> dict[str, Any]:
    """Cold, warm-alpha and warm-structural timings (and peak memory) for one method.

    With ``repeat > 1`` the whole sequence runs on ``repeat`` fresh pools and each timing is the minimum (the usual
    estimate on a machine shared with other load, which only ever adds time); ``peak_MB`` is the largest seen.
    ``keep``: ``row["merged"]`` is the last pool's merge at the defaults, after the timings (from its cache).
    """
    spec = get_method(method)
    kwargs: dict[str, Any] = {"calibrate": calibrate}
    scale = next((p for p in spec.params if p.post_scale), None)
    row: dict[str, Any] = {"method": method + (f"+{calibrate}" if calibrate else ""), "peak_MB": 0.0}
    if struct:
        row["struct"] = ",".join(f"{k}={v}" for k, v in struct.items())

    def keep_min(name: str, seconds: float) -> None:
        row[name] = min(row.get(name, seconds), seconds)

    for _ in range(max(1, repeat)):
        engine._POOLS.clear()
        gc.collect()
        pool = engine.TaskPool(base, experts, device=device, svd_mode=svd_mode, check_finite=False)
        before = _cusolver.stats()
        with PeakMemory(device) as mem, CpuSteal() as steal, StorageReads() as reads:
            # the result is dropped after one reading of the memory held with it, as the warm runs' are (kept, the
            # warm merge's output needed fresh memory: page faults, which cost 0.2-0.3 s per ViT-B/32 model on the
            # H200's host); that reading counts the merge's end (its output and the pool's cached delta), which the
            # sampler missed where the end was shorter than its period (DARE read 616 MB, under those two's 670)
            timed = _timed(lambda: engine.merge_pool(pool, method, **kwargs), device)
            mem.sample()
            cold, timed = timed[0], None
        if cold <= row.get("cold", cold):
            row["steal"] = steal.percent  # of the run whose cold time is reported
            row["read_bytes"] = reads.bytes
            after = _cusolver.stats()
            row["batched"] = {k: after[k] - before[k] for k in ("batches", "matrices", "seconds")}
            row["batched"]["size"] = after["size"]
        keep_min("cold", cold)
        row["peak_MB"] = max(row["peak_MB"], mem.peak_mb)
        if scale is not None:
            new_alpha = float(scale.default) * 0.9 if scale.default else 0.5
            keep_min("warm_alpha", _timed(
                lambda: engine.merge_pool(pool, method, **kwargs, **{scale.name: new_alpha}), device)[0])
        if struct:
            own = {k: v for k, v in struct.items() if "." not in k}
            cal = {k.split(".", 1)[1]: v for k, v in struct.items() if "." in k}
            with PageFaults() as faults:
                seconds = _timed(lambda: engine.merge_pool(pool, method, **kwargs, **own,
                                                           **({"calibrate_hparams": cal} if cal else {})), device)[0]
            if seconds <= row.get("warm_struct", seconds):
                row["struct_faults"] = (faults.pages, faults.system_s)   # of the run whose time is reported
            keep_min("warm_struct", seconds)
        if keep:
            row["merged"] = engine.merge_pool(pool, method, **kwargs)
        pool = None  # free the caches before the next fresh pool
    return row


def reference_difference(merged: dict[str, torch.Tensor], base: dict[str, torch.Tensor], method: str,
                         reference: dict[str, torch.Tensor]) -> float:
    """The largest ``|ours - reference|`` entry over the largest ``|reference|`` entry, across the tensors the
    reference merges: ``ours = (merged - base) / alpha`` at the method's default ``alpha`` (the reference returns the
    unscaled merged task vector), in float64; it includes the float32 rounding of ``base + alpha * delta``.

    Example:
        >>> merged = {"w": torch.tensor([0.3, 0.6], dtype=torch.float64)}   # task_arithmetic: alpha = 0.3
        >>> reference_difference(merged, {"w": torch.zeros(2)}, "task_arithmetic", {"w": torch.tensor([1.0, 2.5])})
        0.2
    """
    scale = next((float(p.default) for p in get_method(method).params if p.post_scale), 1.0)
    worst = largest = 0.0
    for key, want in reference.items():
        want = want.detach().to("cpu", torch.float64)
        ours = (merged[key].to(torch.float64) - base[key].to(torch.float64)) / scale
        worst = max(worst, float((ours - want).abs().max()))
        largest = max(largest, float(want.abs().max()))
    return worst / largest if largest else worst


#: FusionBench's TIES flattens every task vector into one ``[T, P]`` matrix and holds about 6.7 copies of it at its
#: peak (4.7 GiB beyond the experts for 2 ViT-B/32 experts, 9.2 GiB for 4: docs/PERFORMANCE.md, "FusionBench's TIES
#: memory"); the bench skips it, with the estimate, where that exceeds the memory available (8 ViT-B/32 experts: ~18
#: GiB, which killed the bench by running out of memory on the 24 GiB development machine).
PEER_MEMORY_COPIES = {"ties": 7.0}


def _memory_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or None where it is not reported."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peer_memory_shortfall(row: str, base: dict[str, torch.Tensor], experts: dict, device: torch.device) -> str | None:
    """Why FusionBench's ``row`` would not fit in the memory available (:data:`PEER_MEMORY_COPIES`), or None."""
    copies = PEER_MEMORY_COPIES.get(row)
    available = _memory_available() if device.type == "cpu" else None
    if copies is None or available is None:
        return None
    need = copies * len(experts) * sum(t.numel() * t.element_size() for t in base.values())
    if need <= available:
        return None
    return (f"needs about {need / 2**30:.1f} GiB ({copies:g} copies of the flattened task vectors), "
            f"{available / 2**30:.1f} GiB available")


#: What the bench holds besides the experts, measured on 6 of ViT-L/14's 24 blocks with 20 bfloat16 experts
#: (2026-12-03): building them leaves 0.47x their size to the process (their float32 temporaries), and TSV-M's merge
#: then peaked at 4.6 float32 copies of the model (Iso-C / Iso-CTS on 8 ViT-L/14 experts: 4.2). 20 full ViT-L/14
#: experts in bfloat16 were killed for memory at 23.2 GiB resident on the 24 GiB development machine, as this predicts.
POOL_FACTOR = 1.5
MERGE_MODEL_COPIES = 5.0


def _pool_memory_shortfall(nparams: int, tasks: int, dtype: torch.dtype, on_disk: bool = False) -> str | None:
    """Why a synthetic pool of ``tasks`` experts (and the merges on it) would not fit in the memory available, or
    None: :data:`POOL_FACTOR` times the experts and the base in ``dtype``, plus :data:`MERGE_MODEL_COPIES` float32
    models. Building 20 ViT-L/14 experts in float32 (24 GB) on the 24 GiB development machine would end with the
    kernel killing the process. ``on_disk`` (``--experts-dir``): the experts are file pages the kernel may evict, so
    only the base (held while writing them) counts with the merges' copies."""
    available = _memory_available()
    if available is None:
        return None
    def needed(models: int, itemsize: int) -> float:   # models held in memory, in a dtype of itemsize bytes
        return POOL_FACTOR * models * nparams * itemsize + MERGE_MODEL_COPIES * nparams * 4

    pool = (1 if on_disk else tasks + 1) * nparams * dtype.itemsize
    need = needed(1 if on_disk else tasks + 1, dtype.itemsize)
    if need <= available:
        return None
    half = needed(tasks + 1, 2)
    from_files = needed(1, dtype.itemsize)
    hint = ("use a smaller --model" if on_disk else
            f"--dtype bfloat16 needs about {half / 2**30:.1f} GiB" if dtype.itemsize > 2 and half <= available
            else "give fewer --tasks" + (", or --experts-dir to merge them from files" if from_files <= available
                                         else ""))
    what = "the base (the experts are read from their files) takes" if on_disk else f"{tasks} experts and the base take"
    return (f"{what} {pool / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')} and "
            f"building and merging them about {(need - pool) / 2**30:.1f} GiB more: {need / 2**30:.1f} GiB, with "
            f"{available / 2**30:.1f} GiB available; {hint}")


def fusion_bench_peers() -> dict[str, Callable[..., dict[str, torch.Tensor]]]:
    """FusionBench 0.2.33's implementations of the benchmark's rows, at the rows' hyperparameters (paper defaults),
    keyed like the rows (``method`` or ``method+calibration``); each takes ``(base, experts, device)``.

    Each computes the task vectors, runs FusionBench's merge function and adds the scaled result to the base: its
    algorithms' ``run`` without the model loading; Task Arithmetic's merge is a sum written here (FusionBench's loop
    over the state dicts was slower). ``tests/test_crosscheck_fusionbench.py`` checks the same functions against
    :func:`studio.merge`. Raises ImportError without FusionBench (``pip install -e ".[crosscheck]"``).
    """
    import contextlib
    import io

    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.singular_value_calibration.utils import (
        subspace_consistency_spectral_calibration_accelerated as svc)
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
    from fusion_bench.method.ties_merging.ties_merging_utils import (
        state_dict_to_vector, ties_merging, vector_to_state_dict)

    def task_sum(tvs, device):
        return {k: sum(tv[k] for tv in tvs) for k in tvs[0]}

    def ties(tvs, device):
        flat = torch.vstack([state_dict_to_vector(tv) for tv in tvs])
        return vector_to_state_dict(ties_merging(flat, reset_thresh=20, merge_func="sum"), tvs[0])

    def run(fn: Callable[..., dict[str, torch.Tensor]], scale: float) -> Callable[..., dict[str, torch.Tensor]]:
        def peer(base, experts, device):
            tvs = [{k: e[k].to(device) - base[k].to(device) for k in base} for e in experts.values()]
            with contextlib.redirect_stdout(io.StringIO()):   # FusionBench prints a line per layer
                merged = fn(tvs, device)
            return {k: base[k].to(device) + scale * merged[k].to(device) for k in base}
        return peer

    def ta_svc(base, experts, device):
        merged = run(task_sum, 0.3)(base, experts, device)
        for k, b in base.items():   # SingularValueCalibration.run: every 2-D parameter
            if b.dim() == 2:
                merged[k] = svc(b.to(device), [e[k].to(device) for e in experts.values()], merged[k],
                                alpha=1 / len(experts), accelerator=device)
        return merged

    return {
        "task_arithmetic": run(task_sum, 0.3),
        "ties": run(ties, 0.3),
        "tsv_m": run(lambda tvs, device: compute_and_sum_svd_mem_reduction(tvs, accelerator=device), 1.0),
        "iso_c": run(lambda tvs, device: iso_c(tvs, accelerator=device), 1.3),
        "iso_cts": run(lambda tvs, device: iso_cts(tvs, 0.8, accelerator=device), 1.5),
        "task_arithmetic+svc": ta_svc,
    }


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def time_evaluation(suite_source: str | None, method: str, device: str | None, repeat: int,
                    calibration: str | None = None) -> None:
    """``--evaluate``: merge once, build the reference caches (the first evaluation), then time ``repeat``
    evaluations of the merged model on every task's test set."""
    from .evaluate import evaluate
    from .suite import DEFAULT_SUITE_PATH, load_suite

    suite = load_suite(suite_source or DEFAULT_SUITE_PATH)
    t = time.perf_counter()
    merged = engine.merge(suite.base, suite.experts, method, calibrate=calibration)
    print(f"merge {method}{'+' + calibration if calibration else ''}: {time.perf_counter() - t:.2f} s")
    t = time.perf_counter()
    evaluate(suite, suite.base, device=device)
    print(f"first evaluation (builds the expert and zero-shot caches): {time.perf_counter() - t:.2f} s")
    for _ in range(repeat):
        res = evaluate(suite, merged, device=device)
        print(f"evaluate one merged model on {len(res.tasks)} tasks ({sum(res.num_images.values())} test images): "
              f"{res.seconds:.2f} s; avg acc {res.avg_accuracy:.2f}, avg normalized {res.avg_normalized:.2f}")


def bench_rows(requested: list[str] | None) -> list[tuple[str, str | None, dict[str, Any]]]:
    """The table's rows for ``--methods``, in the order given (default: :data:`DEFAULT_RUNS`): a method, or
    ``method+calibration``; a row of :data:`DEFAULT_RUNS` keeps its structural change, any other has none.

    Example:
        >>> [(m, c) for m, c, _ in bench_rows(["ties+svc", "tsv_m"])]
        [('ties', 'svc'), ('tsv_m', None)]
    """
    if not requested:
        return [r for r in DEFAULT_RUNS if r[0] in METHODS and (r[1] is None or r[1] in CALIBRATIONS)]
    preset = {(m, c): change for m, c, change in DEFAULT_RUNS}
    rows, bad = [], []
    for text in dict.fromkeys(requested):   # a row named twice is one row
        method, plus, calibration = text.partition("+")
        if method not in METHODS or (plus and calibration not in CALIBRATIONS):
            bad.append(text)
            continue
        rows.append((method, calibration or None, preset.get((method, calibration or None), {})))
    if bad:
        raise StudioError(f"unknown row(s) {', '.join(map(repr, bad))}; a row is a method "
                          f"({', '.join(sorted(METHODS))}), or method+calibration ({', '.join(sorted(CALIBRATIONS))})")
    return rows


def cpu_name() -> str:
    """The processor's model name and whether it has AVX-512 (which OpenBLAS's fastest kernels use), from
    ``/proc/cpuinfo``; "unknown CPU" elsewhere."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    avx512 = flags is not None and "avx512f" in flags[1].split()
    return f"{name[1].strip() if name else 'unknown CPU'}, {'with' if avx512 else 'without'} AVX-512"


def main(argv: list[str] | None = None, prog: str = "python -m studio.bench") -> None:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model name whose visual-tower shapes are used")
    ap.add_argument("--tasks", type=int, default=8, help="number of synthetic experts (default 8)")
    ap.add_argument("--device", default="all", help="cpu, cuda, or all (cpu and cuda when present)")
    ap.add_argument("--methods", nargs="+",
                    help="the rows, in this order: method names, or 'method+calibration' for a calibrated row "
                         "(e.g. ties+svc); default: the README table's rows")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                    help="dtype the synthetic base and experts are stored in (compute is float32)")
    ap.add_argument("--experts-dir", default=None, metavar="DIR",
                    help="write the experts to DIR as sharded safetensors checkpoints (reused when DIR already holds "
                         "them) and merge them from there, mapped from the files as a user's checkpoints are: a pool "
                         "larger than this machine's memory is read from storage again as the merges need it")
    ap.add_argument("--svd-mode", default="auto", choices=["auto", "exact"], help="studio.merge's svd_mode")
    ap.add_argument("--reference", action="store_true", help="also time the slow official-code-style references")
    ap.add_argument("--peer", action="store_true",
                    help="also time FusionBench 0.2.33's implementations (pip install -e '.[crosscheck]')")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each row on N fresh pools and report the fastest of each timing (shared machines)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU budget: torch.set_num_threads(N), which is also the number of worker threads a CPU "
                         "merge (or a spectral method's CUDA merge) spreads its layers over, one BLAS thread each "
                         "(studio.parallel). 0: torch's "
                         "default (the number of cores); 1: everything sequential on one core")
    ap.add_argument("--host-eigh-max", type=int, default=None, metavar="N",
                    help="CUDA: solve the symmetric eigenproblems of at most N rows with the host's LAPACK "
                         f"(studio._lapack.HOST_EIGH_MAX, default {_lapack.HOST_EIGH_MAX}) where cuSOLVER's batched "
                         "solver does not take them; 0: none on the host")
    ap.add_argument("--batched-eigh-max", type=int, default=None, metavar="N",
                    help="CUDA: solve the symmetric eigenproblems of at most N rows in batches with cuSOLVER's "
                         f"batched solver (studio._lapack.BATCHED_EIGH_MAX, default {_lapack.BATCHED_EIGH_MAX}); "
                         "0: none")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false",
                    help="leave out the warm-up before the table (bench.warm_up): the first row to use a library "
                         "or kernel then pays its one-time loading, as in the tables before the second session of "
                         "2026-12-04")
    ap.add_argument("--malloc", default="keep", choices=["keep", "default"],
                    help="keep: glibc keeps freed memory for reuse, as the app and the CLI (studio.memory); "
                         "default: glibc's own policy, which returns large freed blocks to the kernel")
    ap.add_argument("--evaluate", action="store_true",
                    help="instead: time the evaluation of one merged model (the first of --methods, default "
                         "task_arithmetic) on every task's test set of --suite, --repeat times")
    ap.add_argument("--suite", default=None, help="with --evaluate: a suite folder or Hub repo (default MiniSuite)")
    args = ap.parse_args(argv)
    try:
        runs = bench_rows(args.methods)
    except StudioError as exc:
        ap.error(f"--methods: {exc}")
    args.device = args.device.strip().lower()
    if args.device not in ("all", "cpu") and not re.fullmatch(r"cuda(:\d+)?", args.device):
        ap.error(f"--device must be cpu, cuda, cuda:N or all, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine (use cpu, or all)")
    if args.device.startswith("cuda:") and int(args.device[5:]) >= torch.cuda.device_count():
        ap.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.threads < 0:
        ap.error(f"--threads must be 0 (torch's default) or a number of threads, got {args.threads}")
    if args.suite is not None and not args.evaluate:
        ap.error("--suite is read only with --evaluate")
    if args.evaluate:   # options of the merge table, which --evaluate does not build (they were ignored: an audit)
        table_only = [flag for flag, dest in (
            ("--model", "model"), ("--tasks", "tasks"), ("--dtype", "dtype"), ("--experts-dir", "experts_dir"),
            ("--svd-mode", "svd_mode"), ("--reference", "reference"), ("--peer", "peer"), ("--no-warm-up", "warm_up"),
            ("--malloc", "malloc"), ("--host-eigh-max", "host_eigh_max"), ("--batched-eigh-max", "batched_eigh_max"))
            if getattr(args, dest) != ap.get_default(dest)]
        if table_only:
            ap.error(f"--evaluate times the evaluation of one merged model on a suite (--suite, --methods, --device, "
                     f"--repeat, --threads); {', '.join(table_only)} {'is' if len(table_only) == 1 else 'are'} read "
                     f"only by the merge table")
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.tasks < 1:
        ap.error(f"--tasks must be at least 1, got {args.tasks}")
    if args.host_eigh_max is not None and args.host_eigh_max < 0:
        ap.error(f"--host-eigh-max must be 0 (every eigensolve on the GPU) or more, got {args.host_eigh_max}")
    if args.batched_eigh_max is not None and args.batched_eigh_max < 0:
        ap.error(f"--batched-eigh-max must be 0 (no batched eigensolves) or more, got {args.batched_eigh_max}")
    try:
        shapes = clip_visual_shapes(args.model)
    except StudioError as exc:
        ap.error(f"--model: {exc}")
    if args.threads:   # --evaluate's too
        torch.set_num_threads(args.threads)
    if args.evaluate:
        method, calibration = runs[0][:2] if args.methods else ("task_arithmetic", None)
        try:
            return time_evaluation(args.suite, method, None if args.device == "all" else args.device, args.repeat,
                                   calibration=calibration)
        except StudioError as exc:
            raise SystemExit(f"--evaluate: {exc}") from None
    peers = {}
    if args.peer:   # before the pool is built
        try:
            peers = fusion_bench_peers()
        except ImportError as exc:
            raise SystemExit(f"--peer needs FusionBench ({exc}): pip install -e '.[crosscheck]'") from exc
    if args.host_eigh_max is not None:
        _lapack.HOST_EIGH_MAX = args.host_eigh_max
    if args.batched_eigh_max is not None:
        _lapack.BATCHED_EIGH_MAX = args.batched_eigh_max
    kept = args.malloc == "keep" and keep_freed_memory()

    torch.manual_seed(0)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    nparams = sum(torch.Size(s).numel() for s in shapes.values())
    dtype = getattr(torch, args.dtype)
    short = _pool_memory_shortfall(nparams, args.tasks, dtype, on_disk=args.experts_dir is not None)
    if short:
        raise SystemExit(f"{args.model} x {args.tasks} experts do not fit in this machine's memory: {short}")
    t0 = time.perf_counter()
    if args.experts_dir is None:
        base, experts = synthetic_pool(shapes, args.tasks, dtype=dtype)
        built = f"built in {time.perf_counter() - t0:.1f}s"
    else:
        try:
            base, experts, wrote = synthetic_pool_on_disk(args.experts_dir, shapes, args.tasks, dtype=dtype)
        except StudioError as exc:
            raise SystemExit(f"--experts-dir: {exc}") from None
        built = (f"{'written to' if wrote is not None else 'reused from'} {args.experts_dir} as safetensors "
                 f"checkpoints" + (f" in {wrote:.1f}s" if wrote is not None else "")
                 + ", merged from their memory-mapped files")
    workers = cpu_workers("cpu")
    print(f"# {args.model} visual tower: {len(shapes)} tensors, {nparams / 1e6:.1f}M params, {args.tasks} "
          f"expert{'s' if args.tasks != 1 else ''} ({args.dtype}); {built}; torch {torch.__version__}, "
          f"{workers} merge worker{'s' if workers != 1 else ''}; {blas_kernels()}; "
          + ("" if devices == ["cpu"] else _cuda_eigh_route())
          + f"malloc {'keeps freed memory' if kept else 'default'}"
          + ("; svd_mode exact" if args.svd_mode == "exact" else "")
          + (f"; timings: fastest of {args.repeat} runs" if args.repeat > 1 else ""))
    refs = {}
    if args.reference:
        try:
            from . import reference

            refs = dict(reference.REFERENCES)
        except ImportError:
            print("# no studio.reference module: reference timings skipped")
    for dev_name in devices:
        device = torch.device(dev_name)
        notes, read_notes, parity, fault_notes = [], [], [], []
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
        print(f"\n## device: {dev_name} ({name})\n")
        if args.warm_up:
            tensors, seconds = warm_up(base, experts, runs, device, args.svd_mode)
            print(f"Warm-up before the table: every row's merge once on {tensors} tensors (one of each shape), "
                  f"{seconds:.1f} s, so that the process's one-time costs (CUDA context, libraries and kernels "
                  f"loaded on first use, solver handles, thread pools) fall in no row.\n")
        engine._POOLS.clear()
        gc.collect()
        built = _timed(lambda: engine.get_pool(base, experts, device=device, svd_mode=args.svd_mode), device)[0]
        engine._POOLS.clear()
        gc.collect()
        print(f"Building the pool, which every row's cold merge starts from and a first studio.merge of these experts "
              f"does before its merge (their keys and shapes checked, every value scanned for NaN / inf, the tensors "
              f"fingerprinted to find the pool again; the app does it once when the experts are loaded): "
              f"{built:.2f} s.\n")
        print("| method | cold s | warm alpha s | warm struct s | struct change | peak MB | ref s | speedup "
              "| FusionBench s | vs FB | steal % |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for method, cal, struct in runs:
            names = {p.name for p in get_method(method).params}
            if cal:
                names |= {f"{cal}.{p.name}" for p in get_calibration(cal).params}
            struct = {k: (round(v(len(experts)), 4) if callable(v) else v) for k, v in struct.items() if k in names}
            checked = cal is None and method in refs
            row = bench_one(base, experts, method, cal, struct, device, args.svd_mode, args.repeat, keep=checked)
            if checked:
                made: dict[str, Any] = {}

                def reference_merge() -> None:
                    made.clear()   # the previous run's delta is not held during the next
                    made["delta"] = refs[method](base, experts, device=device)

                row["ref"] = _best_of(f"reference {method}", reference_merge, device, args.repeat)
                if "delta" in made:
                    parity.append(f"{method} {reference_difference(row['merged'], base, method, made['delta']):.1e}")
                row.pop("merged"), made.clear()
            if row["method"] in peers:
                gc.collect()
                short = _peer_memory_shortfall(row["method"], base, experts, device)
                if short:
                    row["peer"] = "skipped"
                    print(f"# FusionBench {row['method']} skipped: {short}", flush=True)
                else:
                    row["peer"] = _best_of(f"FusionBench {row['method']}",
                                           lambda: peers[row["method"]](base, experts, device), device, args.repeat)
            for timed, ratio in (("ref", "speedup"), ("peer", "vs_peer")):
                if isinstance(row.get(timed), float):
                    row[ratio] = row[timed] / row["cold"]
            print(f"| {row['method']} | {_fmt(row['cold'])} | {_fmt(row.get('warm_alpha'))} | "
                  f"{_fmt(row.get('warm_struct'))} | {row.get('struct', '-')} | {row['peak_MB']:.0f} | "
                  f"{_fmt(row.get('ref'))} | {_fmt(row.get('speedup'))} | "
                  f"{_fmt(row.get('peer'))} | {_fmt(row.get('vs_peer'))} | "
                  f"{'-' if row.get('steal') is None else format(row['steal'], '.0f')} |", flush=True)
            batched = row.get("batched") or {}
            if batched.get("batches"):
                fill = batched["matrices"] / batched["batches"]
                notes.append(f"{row['method']} {batched['batches']} batches of {batched['size']} "
                             f"({batched['matrices']} matrices, {fill:.1f} a batch; "
                             f"{batched['seconds']:.2f} s of batches' wall time, summed over those side by side)")
            pages, system_s = row.get("struct_faults") or (None, None)
            if pages is not None:
                fault_notes.append(f"{row['method']} {pages / 1000:.1f} thousand ({system_s:.2f} s)")
            if args.experts_dir is not None and row.get("read_bytes") is not None:
                read_notes.append(f"{row['method']} {row['read_bytes'] / 2**30:.1f} GiB")
        if notes:
            print("\n# cuSOLVER's batched eigensolves in the reported cold merges: " + "; ".join(notes), flush=True)
        if parity:
            print("\n# largest difference to the reference's merge (|ours - ref|, over the largest |ref| entry; ours "
                  "is (merged - base) / alpha, so it includes float32's rounding of base + alpha delta): "
                  + "; ".join(parity), flush=True)
        if fault_notes:
            print("\n# pages faulted in during the reported structural changes (memory the process had not held "
                  "before; the kernel's time for the process meanwhile): " + "; ".join(fault_notes), flush=True)
        if read_notes:
            print("\n# read from storage during the reported cold merges (the experts' file pages the kernel had "
                  "evicted or not yet read): " + "; ".join(read_notes), flush=True)


if __name__ == "__main__":
    main()
