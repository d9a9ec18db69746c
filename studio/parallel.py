"""Layer-level parallelism: independent per-layer (or per-task) work on worker threads, on the CPU and, for work bound
by the host, on CUDA.

A merge is a loop over ~150 independent tensors, most of them decomposed with LAPACK or swept element-wise. On a
small CPU, giving each worker thread whole layers with a single BLAS/OpenMP thread each is faster than letting
every small SVD split itself over all cores: on the 2-core development machine two workers run Gram + ``eigh``
of ``768 x 3072`` layers 1.9x faster than one, while one op on two OpenMP threads gains ~1.1x and collapses
(10-100x slower) as soon as another process competes for a core. PyTorch releases the GIL inside its kernels, so
plain Python threads suffice.

The number of workers is :func:`set_workers`'s value, else ``torch.get_num_threads()`` at the call (the caller's CPU
budget; ``torch.set_num_threads`` sets it); inside the parallel region every worker runs with one intra-op thread.
Nested calls from a worker run sequentially on the calling thread.

On CUDA, work runs on the calling thread unless the caller says it is bound by the host (``host_bound``: a spectral
method's layers, whose symmetric eigensolves the host's LAPACK runs, :func:`studio._lapack.eigh`, because cuSOLVER
solves matrices of CLIP layer sizes slowly). Such workers queue their kernels on the caller's current stream, so the
GPU runs them in one order and a tensor one worker made (a cached decomposition) is ready for the kernels another
queues after it, as on a single thread; what runs side by side is the host's part, the solves above all. Work that
is all kernels gains nothing from threads and lost 20-50 % to them on the H200 (docs/PERFORMANCE.md, "CUDA").

The BLAS that NumPy and SciPy bundle (the CPU Gram and partial-eigensolver fast paths of :mod:`studio._lapack`) gets
one thread per worker too (:func:`studio._lapack.one_blas_thread`, which those fast paths also take outside a merge).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

import torch

from . import _lapack

__all__ = ["cpu_workers", "parallel_map", "set_workers"]

T = TypeVar("T")
R = TypeVar("R")

_state = threading.local()
_workers: int | None = None
# PyTorch keeps two intra-op thread counts: each thread's own (its OpenMP and MKL settings) and a process-wide value
# that a thread copies when it first runs an op. torch.set_num_threads writes the calling thread's and the process's.
# A worker needs its own at 1 and must leave every other thread's, and the value threads started later copy, as they
# were: it sets 1, makes its first op, then writes the process value back from a short-lived thread (whose own count
# dies with it), under one lock. Only a thread whose first op falls within a worker's start (0.4 ms median here) copies
# the 1. Earlier the merge's calling thread set 1 for the whole merge: a thread that first ran an op during a merge
# stayed on one thread for good, and so did the first of two overlapping merges' callers.
_threads_lock = threading.Lock()


def _on_a_new_thread(fn: Callable[[], R]) -> R:
    out: list[R] = []
    t = threading.Thread(target=lambda: out.append(fn()), name="studio-threads")
    t.start()
    t.join()
    return out[0]


def set_workers(workers: int | None) -> None:
    """Use ``workers`` threads for CPU merges (and CUDA work bound by the host) from now on (``None``: follow
    ``torch.get_num_threads()``).

    The app sets this to the core count while keeping one intra-op thread for everything else.
    """
    global _workers
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers!r}")
    _workers = None if workers is None else int(workers)


def _mark_worker() -> None:
    """Run this thread's PyTorch (OpenMP, MKL) on one intra-op thread; no other thread's count changes.

    A new thread starts with OpenMP's and MKL's process defaults (one thread per core), not the caller's
    ``torch.set_num_threads(1)``: without this each worker ran MKL on every core (4 threads on 2 cores), and MKL's
    results then varied between identical merges.
    """
    _state.worker = True
    with _threads_lock:   # the process value now, not when the merge began (another thread may have set it since)
        process = _on_a_new_thread(torch.get_num_threads)
        torch.set_num_threads(1)
        torch.get_num_threads()      # this thread's first op: it copies the 1 now, not a later process value
        torch.set_num_threads(1)     # (and keeps 1 if another thread wrote the process value meanwhile)
        _on_a_new_thread(lambda: torch.set_num_threads(process))


def cpu_workers(device: "torch.device | str", host_bound: bool = False) -> int:
    """Worker threads :func:`parallel_map` would use for work on ``device`` from the calling thread (on CUDA, only
    for ``host_bound`` work).

    Example:
        >>> set_workers(4); cpu_workers("cpu"), cpu_workers("cuda"), cpu_workers("cuda", host_bound=True)
        (4, 1, 4)
        >>> set_workers(None)
    """
    kind = torch.device(device).type
    if getattr(_state, "worker", False) or not (kind == "cpu" or (kind == "cuda" and host_bound)):
        return 1
    return max(1, _workers if _workers is not None else torch.get_num_threads())


def _on_stream(fn: Callable[[T], R], device: "torch.device | str") -> Callable[[T], R]:
    """``fn`` run with the calling thread's current CUDA device and stream (a worker thread would otherwise use the
    default stream of device 0); ``fn`` itself off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn
    stream = torch.cuda.current_stream(device)
    _lapack.load_cuda_solvers(stream.device)   # before any worker's first solve (they raced to load it)

    def run(x: T) -> R:
        with torch.cuda.device(stream.device), torch.cuda.stream(stream):
            return fn(x)

    return run


def parallel_map(fn: Callable[[T], R], items: Iterable[T], *, device: "torch.device | str" = "cpu",
                 on_done: Callable[[int, int], None] | None = None, host_bound: bool = False) -> list[R]:
    """``[fn(x) for x in items]``, on :func:`cpu_workers` threads when there is more than one, in input order.
    ``host_bound``: on CUDA, whether the work is mostly the host's (eigensolves), so that threads help.

    ``on_done(done, total)`` is called on the calling thread after each item, in order (progress reports). The
    first exception raised by ``fn`` is re-raised here after the items not yet started are cancelled.

    Example:
        >>> parallel_map(lambda x: x * x, range(5))
        [0, 1, 4, 9, 16]
    """
    items = list(items)
    workers = min(cpu_workers(device, host_bound), len(items))
    results: list[R] = []
    if workers <= 1:
        for i, x in enumerate(items):
            results.append(fn(x))
            if on_done is not None:
                on_done(i + 1, len(items))
        return results
    # one intra-op thread per worker, for PyTorch (_mark_worker) and for the BLAS that NumPy / SciPy bundle
    with _lapack.one_blas_thread():
        ex = ThreadPoolExecutor(workers, thread_name_prefix="studio-layer", initializer=_mark_worker)
        run = _on_stream(fn, device)
        try:
            futures = [ex.submit(run, x) for x in items]
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
