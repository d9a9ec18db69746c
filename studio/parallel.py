"""Layer-level parallelism on the CPU: independent per-layer (or per-task) work on worker threads.

A merge is a loop over ~150 independent tensors, most of them decomposed with LAPACK or swept element-wise. On a
small CPU, giving each worker thread whole layers with a single BLAS/OpenMP thread each is faster than letting
every small SVD split itself over all cores: on the 2-core development machine two workers run Gram + ``eigh``
of ``768 x 3072`` layers 1.9x faster than one, while one op on two OpenMP threads gains ~1.1x and collapses
(10-100x slower) as soon as another process competes for a core. PyTorch releases the GIL inside its kernels, so
plain Python threads suffice.

The number of workers is :func:`set_workers`'s value, else ``torch.get_num_threads()`` at the call (the caller's CPU
budget; ``torch.set_num_threads`` sets it); inside the parallel region every worker runs with one intra-op thread.
On CUDA, and for nested calls from a worker, work runs sequentially on the calling thread. The BLAS that NumPy and
SciPy bundle (the CPU Gram and partial-eigensolver fast paths of :mod:`studio._lapack`) gets one thread per worker too
(:func:`studio._lapack.one_blas_thread`, which those fast paths also take outside a merge).
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import torch

from . import _lapack

__all__ = ["cpu_workers", "parallel_map", "set_workers"]

T = TypeVar("T")
R = TypeVar("R")

_state = threading.local()
_workers: int | None = None
# PyTorch's intra-op thread count is one setting for the whole process. Parallel regions of concurrent merges share
# it: the first to start keeps the caller's value and sets 1, the last to end puts it back (saved and restored per
# region, two overlapping merges could leave the process on one thread for good).
_regions_lock = threading.Lock()
_regions = 0
_outside_threads = 1


def set_workers(workers: int | None) -> None:
    """Use ``workers`` threads for CPU merges from now on (``None``: follow ``torch.get_num_threads()``).

    The app sets this to the core count while keeping one intra-op thread for everything else.
    """
    global _workers
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers!r}")
    _workers = None if workers is None else int(workers)


def _mark_worker() -> None:
    _state.worker = True
    # A new thread starts with OpenMP's and MKL's process defaults (one thread per core), not the caller's
    # torch.set_num_threads(1): without this each worker ran MKL on every core (4 threads on 2 cores), and MKL's
    # results then varied between identical merges.
    torch.set_num_threads(1)


def cpu_workers(device: "torch.device | str") -> int:
    """Worker threads :func:`parallel_map` would use for work on ``device`` from the calling thread.

    Example:
        >>> cpu_workers("cuda")
        1
    """
    if torch.device(device).type != "cpu" or getattr(_state, "worker", False):
        return 1
    with _regions_lock:   # during another merge's region, the caller's own budget, not the region's 1
        budget = _outside_threads if _regions else torch.get_num_threads()
    return max(1, _workers if _workers is not None else budget)


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """PyTorch on one intra-op thread for the duration (see ``_regions``), nested and concurrent uses included."""
    global _regions, _outside_threads
    with _regions_lock:
        if _regions == 0:
            _outside_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _regions += 1
    try:
        yield
    finally:
        with _regions_lock:
            _regions -= 1
            if _regions == 0:
                torch.set_num_threads(_outside_threads)


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, device: "torch.device | str" = "cpu",
                 on_done: Callable[[int, int], None] | None = None) -> list[R]:
    """``[fn(x) for x in items]``, on :func:`cpu_workers` threads when there is more than one, in input order.

    ``on_done(done, total)`` is called on the calling thread after each item, in order (progress reports). The
    first exception raised by ``fn`` is re-raised here after the items not yet started are cancelled.

    Example:
        >>> parallel_map(lambda x: x * x, range(5))
        [0, 1, 4, 9, 16]
    """
    items = list(items)
    workers = min(cpu_workers(device), len(items))
    results: list[R] = []
    if workers <= 1:
        for i, x in enumerate(items):
            results.append(fn(x))
            if on_done is not None:
                on_done(i + 1, len(items))
        return results
    # one intra-op thread per worker, for PyTorch and for the BLAS that NumPy / SciPy bundle (studio._lapack)
    with _lapack.one_blas_thread(), _one_intra_op_thread():
        ex = ThreadPoolExecutor(workers, thread_name_prefix="studio-layer", initializer=_mark_worker)
        try:
            futures = [ex.submit(fn, x) for x in items]
            for i, fut in enumerate(futures):
                results.append(fut.result())
                if on_done is not None:
                    on_done(i + 1, len(items))
        except BaseException:
            ex.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            ex.shutdown(wait=True)
    return results
