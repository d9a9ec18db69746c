"""cuSOLVER's batched symmetric eigensolver (``cusolverDnXsyevBatched``) through :mod:`ctypes`.

``torch.linalg.eigh`` solves a batch of CUDA matrices larger than 32 x 32 one matrix after another with ``syevd``,
whose kernels are bound by launch latency at CLIP layer sizes (8 ms per ``768 x 768`` matrix on an H200, in either
dtype; docs/PERFORMANCE.md, "CUDA"). cuSOLVER 11.7.1 (CUDA 12.6.2) added ``cusolverDnXsyevBatched``, which solves a
whole stack of same-sized matrices in one call. PyTorch uses it only up to 32 rows; this module calls it directly, on
the library PyTorch itself loaded, on PyTorch's current stream, with workspace from PyTorch's allocator.

:func:`eigh_batched` returns what ``torch.linalg.eigh`` returns (ascending eigenvalues, eigenvectors as columns,
reading each matrix's lower triangle), or ``None`` where the routine is not there (an older cuSOLVER, no CUDA), so
callers fall back. Nothing here knows about merging.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import threading
import time
from collections import deque
from typing import Callable, Iterable

import torch
from torch import Tensor

__all__ = ["available", "disable", "eigh_batched", "eigh_many", "stats", "Batcher", "CusolverError", "SolveError"]

_EIG_MODE_VECTOR = 1                       # cusolverEigMode_t CUSOLVER_EIG_MODE_VECTOR
_FILL_UPPER = 1                            # cublasFillMode_t CUBLAS_FILL_MODE_UPPER
_DATA_TYPE = {torch.float32: 0, torch.float64: 1}   # cudaDataType CUDA_R_32F, CUDA_R_64F

_lock = threading.Lock()
_lib: "ctypes.CDLL | None | bool" = False  # False: not looked up yet; None: not available


class _Idle:
    """Objects that cost milliseconds to make (cuSOLVER handles, CUDA streams), kept per device for reuse: each
    serves one call at a time, and one is made whenever none is idle. The merge's worker threads live for one merge
    each, so the objects outlive them.

    Example:
        >>> idle = _Idle(lambda key, *args: [key, *args])
        >>> a = idle.take("cuda:0", 1); idle.give("cuda:0", a)
        >>> idle.take("cuda:0", 2) is a, idle.take("cuda:0", 3)
        (True, ['cuda:0', 3])
    """

    def __init__(self, make: Callable):
        self._make, self._idle, self._lock = make, {}, threading.Lock()

    def take(self, key, *args):
        """An idle object for ``key``, else ``make(key, *args)``."""
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if idle:
                return idle.pop()
        return self._make(key, *args)

    def give(self, key, obj) -> None:
        with self._lock:
            self._idle.setdefault(key, []).append(obj)


class CusolverError(RuntimeError):
    """cuSOLVER refused a call (a status other than success): the library, not the matrices. :mod:`studio._lapack`
    then turns the batched solver off for the process (:func:`disable`) and solves elsewhere."""


class SolveError(RuntimeError):
    """Some matrices of a batch did not converge (cuSOLVER's ``info``): ``failed`` holds their indices, ``values``
    and ``vectors`` every matrix's results (valid for the others)."""

    def __init__(self, message: str, failed: list[int], values: Tensor, vectors: Tensor):
        super().__init__(message)
        self.failed, self.values, self.vectors = failed, values, vectors


def _mapped(maps: "Iterable[str]") -> list[str]:
    """Paths of the ``libcusolver`` files in ``/proc/self/maps`` lines (the path is the sixth field and may hold
    spaces; a file replaced on disk since is marked ``(deleted)`` and left out).

    Example:
        >>> _mapped(["7f0-7f1 r-xp 0 08:01 12 /opt/my libs/libcusolver.so.12", "7f1-7f2 r--p 0 00:00 0 [heap]",
        ...          "7f2-7f3 r-xp 0 08:01 13 /old/libcusolver.so.11 (deleted)"])
        ['/opt/my libs/libcusolver.so.12']
    """
    found = []
    for line in maps:
        fields = line.rstrip("\n").split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and "libcusolver.so" in fields[5] \
                and not fields[5].endswith(" (deleted)"):
            found.append(fields[5])
    return list(dict.fromkeys(found))


def _find_library() -> "ctypes.CDLL | None":
    """The cuSOLVER library PyTorch loaded (its path read from ``/proc/self/maps``), else one beside PyTorch's own
    NVIDIA libraries; ``None`` if neither exports ``cusolverDnXsyevBatched``."""
    from ._lapack import load_cuda_solvers

    try:
        load_cuda_solvers("cuda")   # PyTorch loads its CUDA linear algebra, and cuSOLVER with it, lazily
    except RuntimeError:   # no usable CUDA device after all: nothing to batch on
        return None
    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = _mapped(maps)
    except OSError:   # pragma: no cover - not Linux
        pass
    site = os.path.dirname(os.path.dirname(torch.__file__))
    paths += sorted(glob.glob(os.path.join(site, "nvidia", "*", "lib", "libcusolver.so*")))
    paths += sorted(glob.glob(os.path.join(site, "nvidia", "*", "*", "lib", "libcusolver.so*")))
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "cusolverDnXsyevBatched") and hasattr(lib, "cusolverDnXsyevBatched_bufferSize"):
            return _declare(lib)
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32, sz = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
    lib.cusolverDnCreate.argtypes = [ctypes.POINTER(p)]
    lib.cusolverDnSetStream.argtypes = [p, p]
    lib.cusolverDnCreateParams.argtypes = [ctypes.POINTER(p)]
    lib.cusolverDnDestroy.argtypes = [p]
    lib.cusolverDnXsyevBatched_bufferSize.argtypes = [p, p, i32, i32, i64, i32, p, i64, i32, p, i32,
                                                      ctypes.POINTER(sz), ctypes.POINTER(sz), i64]
    lib.cusolverDnXsyevBatched.argtypes = [p, p, i32, i32, i64, i32, p, i64, i32, p, i32, p, sz, p, sz, p, i64]
    for name in ("cusolverDnCreate", "cusolverDnDestroy", "cusolverDnSetStream", "cusolverDnCreateParams",
                 "cusolverDnXsyevBatched_bufferSize", "cusolverDnXsyevBatched"):
        getattr(lib, name).restype = i32
    return lib


def _library() -> "ctypes.CDLL | None":
    global _lib
    if _lib is False:
        with _lock:
            if _lib is False:
                _lib = _find_library() if torch.cuda.is_available() else None
    return _lib  # type: ignore[return-value]


def available() -> bool:
    """Whether :func:`eigh_batched` can run here (CUDA, and a cuSOLVER with ``cusolverDnXsyevBatched``)."""
    return _library() is not None


def disable(reason: str) -> None:
    """Turn the batched solver off for this process (a :class:`CusolverError`: the library refused a call), with a
    warning naming ``reason``; :func:`available` is ``False`` from then on. Later decompositions then take the host's
    LAPACK, whose bits differ from the batches' in the last places: a merge after this may differ so from the same
    merge in a fresh process (the warning is the sign)."""
    global _lib
    import warnings

    with _lock:
        if _lib is None:
            return
        _lib = None
    warnings.warn(f"cuSOLVER's batched eigensolver is off for this process: {reason}; eigensolves take the host's "
                  "LAPACK or torch.linalg.eigh instead", RuntimeWarning, stacklevel=2)


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CusolverError(f"cuSOLVER {what} failed with status {status}")


def _new_handle(index: int, lib: ctypes.CDLL) -> tuple[ctypes.c_void_p, ctypes.c_void_p]:
    """A cuSOLVER handle and parameter object for device ``index``."""
    with torch.cuda.device(index):
        handle, params = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib.cusolverDnCreate(ctypes.byref(handle)), "cusolverDnCreate")
        status = lib.cusolverDnCreateParams(ctypes.byref(params))
        if status != 0:
            lib.cusolverDnDestroy(handle)
            _check(status, "cusolverDnCreateParams")
    return handle, params


_handles = _Idle(_new_handle)   # device index -> idle (handle, params)


def eigh_batched(g: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor] | None:
    """Eigenvalues (ascending) and eigenvectors of the symmetric CUDA matrices ``g`` ``[..., n, n]`` (float32 or
    float64), from each matrix's lower triangle, like ``torch.linalg.eigh``; all in one ``cusolverDnXsyevBatched``
    call on the current stream. ``None`` where that routine is not available. Raises :class:`CusolverError` if
    cuSOLVER refuses the call, :class:`SolveError` if some matrices did not converge. ``overwrite=True`` lets
    cuSOLVER work in a contiguous ``g``'s own memory (the eigenvectors then share it) instead of a copy."""
    lib = _library()
    if lib is None or g.device.type != "cuda" or g.dtype not in _DATA_TYPE or g.ndim < 2:
        return None
    n = g.shape[-1]
    batch_shape = g.shape[:-2]
    batch = math.prod(batch_shape)
    if n == 0 or batch == 0:
        return torch.linalg.eigh(g)
    # A row-major copy, read as cuSOLVER's column-major matrix, is g^T: its upper triangle is g's lower triangle.
    # The eigenvectors come back in the same memory, column-major, so that buffer read row-major holds V^T.
    a = g.reshape(batch, n, n)
    if not (overwrite and a.is_contiguous()):
        a = a.clone(memory_format=torch.contiguous_format)
    index = g.device.index if g.device.index is not None else torch.cuda.current_device()
    found = _handles.take(index, lib)
    try:
        return _solve(lib, found, a, torch.empty(batch, n, device=g.device, dtype=g.dtype), batch_shape)
    finally:
        _handles.give(index, found)


def _solve(lib: ctypes.CDLL, found: tuple, a: Tensor, w: Tensor, batch_shape: torch.Size) -> tuple[Tensor, Tensor]:
    handle, params = found
    batch, n = a.shape[0], a.shape[-1]
    info = torch.zeros(batch, device=a.device, dtype=torch.int32)
    stream = torch.cuda.current_stream(a.device)
    dtype = _DATA_TYPE[a.dtype]
    _check(lib.cusolverDnSetStream(handle, ctypes.c_void_p(stream.cuda_stream)), "cusolverDnSetStream")
    device_bytes, host_bytes = ctypes.c_size_t(), ctypes.c_size_t()
    _check(lib.cusolverDnXsyevBatched_bufferSize(
        handle, params, _EIG_MODE_VECTOR, _FILL_UPPER, n, dtype, ctypes.c_void_p(a.data_ptr()), n, dtype,
        ctypes.c_void_p(w.data_ptr()), dtype, ctypes.byref(device_bytes), ctypes.byref(host_bytes), batch),
        "cusolverDnXsyevBatched_bufferSize")
    work = torch.empty(max(1, device_bytes.value), device=a.device, dtype=torch.uint8)
    host_work = ctypes.create_string_buffer(max(1, host_bytes.value))
    _check(lib.cusolverDnXsyevBatched(
        handle, params, _EIG_MODE_VECTOR, _FILL_UPPER, n, dtype, ctypes.c_void_p(a.data_ptr()), n, dtype,
        ctypes.c_void_p(w.data_ptr()), dtype, ctypes.c_void_p(work.data_ptr()), device_bytes.value,
        ctypes.cast(host_work, ctypes.c_void_p), host_bytes.value, ctypes.c_void_p(info.data_ptr()), batch),
        "cusolverDnXsyevBatched")
    values, vectors = w.reshape(*batch_shape, n), a.mT.reshape(*batch_shape, n, n)
    failed = info.ne(0)
    if bool(failed.any()):   # one sync per call (the host workspace lives until then); a caller waits anyway
        bad = failed.nonzero().flatten().tolist()
        raise SolveError(f"cusolverDnXsyevBatched: {len(bad)} of {batch} {n} x {n} matrices did not converge "
                         f"(info {int(info[bad[0]])} for matrix {bad[0]})", bad, values, vectors)
    return values, vectors


class _Request:
    __slots__ = ("g", "key", "made", "consumer", "result", "error", "done")

    def __init__(self, g: Tensor):
        self.g = g
        self.key = (g.device, g.shape[-1], g.dtype)
        self.made = self.consumer = None
        self.result: tuple[Tensor, Tensor] | None = None
        self.error: BaseException | None = None
        self.done = False


class Batcher:
    """Symmetric eigensolves asked for by many threads, run in batches of a fixed ``size``.

    ``solve`` takes a stack ``[size, n, n]`` and returns its eigenvalues ``[size, n]`` and eigenvectors
    ``[size, n, n]`` (:func:`eigh_batched` on CUDA). A batch is padded with identity matrices to ``size``, so every
    matrix is solved in a batch of that one size whatever else is asked at the same time: on the H200,
    ``cusolverDnXsyevBatched`` gave a matrix the same bits at any position, with any other matrices or identity
    padding in the batch, but other bits in a batch of another size (tools/device_probe_batched.py). A merge's
    results then do not depend on its worker threads' timing, nor on what the cache held before.

    Group commit: a thread asking for solves runs a batch itself when one of ``slots`` is free and ``size``
    matrices of one shape and dtype are waiting, or, with fewer waiting, when no batch runs at all; otherwise it
    waits while other threads' batches run, which may take its matrices along. A call takes 40 ms or more on the
    H200 whatever its size, so matrices wait for a full batch while the GPU is busy rather than go in part-empty
    ones (an earlier version, which batched every solve and sent whatever had waited 2 ms, made Iso-CTS, whose solves
    then came one at a time, 2.3x slower than the host's LAPACK). On
    CUDA each slot runs on a stream of its own, after the events of the streams that made its matrices, and the
    asking thread's stream waits for the batch before it uses the results: on the H200, batches of 16 from 16
    streams took 1.1 ms per ``768 x 768`` float32 solve, one batch of 16 on one stream 2.6 ms, and
    ``torch.linalg.eigh`` 8 ms per matrix (docs/PERFORMANCE.md, "CUDA"). ``streams=False`` runs every batch on the
    current stream of whichever thread runs it (a device without streams, such as tools/fakecuda's stand-in; the
    merge's workers share one stream).

    A part-full batch runs only while no batch runs at all, whatever its kind: the TSV-M whitening's float64
    matrices wait while the per-task float32 batches run, and gather into fuller batches meanwhile (the measured
    behaviour). A matrix that does not converge fails its own asker only (:class:`SolveError`); any other error fails
    every asker of that batch.
    """

    def __init__(self, solve: Callable[[Tensor], tuple[Tensor, Tensor]], *, size: int = 16, slots: int = 8,
                 streams: bool = True):
        self._solve = solve
        self.size, self.slots, self.streams = int(size), int(slots), bool(streams)
        self._cond = threading.Condition()
        self._pending: dict[tuple, deque[_Request]] = {}
        self._running = 0
        self._streams = _Idle(torch.cuda.Stream)   # device -> idle streams, one per batch in flight
        # run so far (tests and the bench read them): batches, the matrices asked for in them (padding not counted),
        # and the wall seconds from each batch's start to its end (waiting for the askers' streams, the stacking and
        # the solve), summed over batches (which run side by side); failed batches count too
        self.batches, self.matrices, self.seconds = 0, 0, 0.0

    def solve(self, mats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """Eigenvalues (ascending) and eigenvectors of each symmetric matrix of ``mats`` (each ``[n, n]``, read
        from its lower triangle), as ``torch.linalg.eigh``; the results are views of the batch's tensors."""
        requests = [_Request(g) for g in mats]
        if not requests:
            return []
        cuda = {r.g.device for r in requests if r.g.device.type == "cuda"} if self.streams else set()
        for device in cuda:   # where the matrices were made, and where the results will be used
            stream = torch.cuda.current_stream(device)
            event = torch.cuda.Event()
            event.record(stream)
            for r in requests:
                if r.g.device == device:
                    r.made, r.consumer = event, stream
        with self._cond:
            for r in requests:
                self._pending.setdefault(r.key, deque()).append(r)
            self._cond.notify_all()
            try:
                while not all(r.done for r in requests):
                    batch = self._take(requests)
                    if batch is None:
                        self._cond.wait()
                        continue
                    self._running += 1
                    start = time.perf_counter()
                    self._cond.release()
                    try:
                        self._run(batch)
                    finally:
                        self._cond.acquire()
                        self._running -= 1
                        self.batches += 1
                        self.matrices += len(batch)
                        self.seconds += time.perf_counter() - start
                        self._cond.notify_all()
            except BaseException:   # interrupted: take back what no batch has taken yet
                for r in requests:
                    queue = self._pending.get(r.key)
                    if queue is not None and r in queue:
                        queue.remove(r)
                        if not queue:
                            del self._pending[r.key]
                raise
        for r in requests:
            if r.error is not None:
                raise r.error
        return [r.result for r in requests]  # type: ignore[misc]

    def _take(self, mine: list[_Request]) -> list[_Request] | None:
        """Under the lock: the batch this thread should run now (its own matrices' kind first), or ``None``."""
        if self._running >= self.slots:
            return None
        for key in dict.fromkeys([r.key for r in mine if not r.done] + list(self._pending)):
            queue = self._pending.get(key)
            if queue and (len(queue) >= self.size or self._running == 0):
                batch = [queue.popleft() for _ in range(min(self.size, len(queue)))]
                if not queue:
                    del self._pending[key]
                return batch
        return None

    def _run(self, batch: list[_Request]) -> None:
        first = batch[0].g
        n, device = first.shape[-1], first.device
        try:
            if device.type == "cuda" and self.streams:
                stream = self._streams.take(device)
                try:
                    with torch.cuda.device(device), torch.cuda.stream(stream):
                        for event in dict.fromkeys(r.made for r in batch):
                            stream.wait_event(event)
                        for r in batch:   # read on this stream: not reused before that read, whatever follows
                            r.g.record_stream(stream)
                        w, v, failed = self._solve_checked(self._stack(batch, n))
                        for consumer in dict.fromkeys(r.consumer for r in batch):
                            w.record_stream(consumer)   # freed later by the askers' streams, not this one
                            v.record_stream(consumer)
                            consumer.wait_stream(stream)
                finally:
                    self._streams.give(device, stream)
            else:
                w, v, failed = self._solve_checked(self._stack(batch, n))
            for i, r in enumerate(batch):
                if i in failed:
                    r.error = SolveError(f"cusolverDnXsyevBatched did not converge for a {n} x {n} "
                                         f"{str(r.g.dtype).removeprefix('torch.')} matrix", [0], w[i:i + 1],
                                         v[i:i + 1])
                else:
                    r.result = (w[i], v[i])
        except Exception as exc:   # every asker of this batch sees the failure
            for r in batch:
                r.error = exc
        except BaseException:   # an interrupt of the thread running it: its askers fail, the interrupt goes on
            for r in batch:
                r.error = RuntimeError("the eigensolve batch was interrupted")
            raise
        finally:
            for r in batch:
                r.done = True

    def _solve_checked(self, stack: Tensor) -> tuple[Tensor, Tensor, set[int]]:
        """``solve(stack)`` and the indices of the matrices that did not converge."""
        try:
            w, v = self._solve(stack)
            return w, v, set()
        except SolveError as exc:
            return exc.values, exc.vectors, set(exc.failed)

    def _stack(self, batch: list[_Request], n: int) -> Tensor:
        first = batch[0].g
        stack = torch.empty(self.size, n, n, device=first.device, dtype=first.dtype)
        for i, r in enumerate(batch):
            stack[i].copy_(r.g)
        if len(batch) < self.size:
            pad = stack[len(batch):]
            pad.zero_()
            pad.diagonal(dim1=-2, dim2=-1).fill_(1)
        return stack


_batcher: Batcher | None = None


def _solve_stack(stack: Tensor) -> tuple[Tensor, Tensor]:
    found = eigh_batched(stack, overwrite=True)
    if found is None:   # turned off (disable()) while this batch waited: its askers fall back like the first one
        raise CusolverError("cusolverDnXsyevBatched was turned off for this process")
    return found


def stats() -> dict[str, float]:
    """The process's :class:`Batcher` counters: ``batches``, ``matrices`` (without padding), ``seconds`` (each batch's
    wall time, summed over batches that ran side by side); zeros before the first batch.

    Example:
        >>> sorted(stats())
        ['batches', 'matrices', 'seconds', 'size']
    """
    batcher = _batcher
    if batcher is None:
        return {"batches": 0, "matrices": 0, "seconds": 0.0, "size": 0}
    with batcher._cond:
        return {"batches": batcher.batches, "matrices": batcher.matrices, "seconds": batcher.seconds,
                "size": batcher.size}


def eigh_many(mats: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``torch.linalg.eigh`` of each symmetric CUDA matrix of ``mats``, through the process's :class:`Batcher`
    of ``cusolverDnXsyevBatched`` calls (requests from every thread share batches)."""
    global _batcher
    if _batcher is None:
        with _lock:
            if _batcher is None:
                _batcher = Batcher(_solve_stack)
    return _batcher.solve(mats)
