"""Process memory policy for processes that merge repeatedly (the app, the CLI, the benchmark).

A merge allocates model-sized tensors (the merged deltas, the merged model, per-layer temporaries: ~0.7-1.4 GB for 8
ViT-B/32 experts) and frees them when the next merge replaces them. glibc's ``malloc`` serves such blocks with fresh
``mmap`` pages and hands them back to the kernel on ``free``, so every merge page-faults its memory in again
(270-350 thousand faults per DARE or TIES merge of 8 ViT-B/32 experts). :func:`keep_freed_memory` asks it to keep
freed memory for reuse instead. PyTorch's CPU performance guide gets this by swapping in jemalloc or tcmalloc; here
it is three ``mallopt`` settings of the allocator already in the process. The price: the process's resident memory
does not shrink after a merge, it stays at its high-water mark (freed memory is reused, not returned).

Measured with ``python -m studio.bench --device cpu --malloc default`` against ``--malloc keep`` (the default; see
``docs/PERFORMANCE.md``).
"""

from __future__ import annotations

import ctypes
import functools
import threading

__all__ = ["keep_freed_memory", "malloc_in_use"]

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

_lock = threading.Lock()
_kept = False


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


@functools.lru_cache(maxsize=None)
def _libc() -> "ctypes.CDLL | None":
    """The process's C library if it is glibc (musl, macOS and Windows allocators have other knobs), else None."""
    try:
        libc = ctypes.CDLL(None)   # the symbols already loaded into the process, the C library's among them
    except (OSError, TypeError):
        return None
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _Mallinfo2
    return libc


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory for reuse; returns whether it took effect (False off glibc).

    * ``M_MMAP_THRESHOLD`` = 1 GiB: blocks below it come from the heap, whose freed memory is reused, instead of from
      a fresh ``mmap`` each (glibc's own threshold adapts up to 32 MiB only);
    * ``M_TRIM_THRESHOLD`` = 2 GiB - 1: the heap's free top is not handed back to the kernel after every large free;
    * ``M_ARENA_MAX`` = 1: threads share the main heap. Each further arena is a chain of 64 MiB heaps, which serves
      a larger block (TIES's model-sized magnitude vector, ~350 MB per merge worker) with a fresh ``mmap``.

    Call it once, early, in a process that merges repeatedly: threads that have already allocated keep their arena.
    Idempotent and thread-safe. On 8 ViT-B/32 experts and this project's 2-core machine it took TIES's k change from
    2.09 to 1.48 s and DARE's p change from 3.33 to 1.40 s (``docs/PERFORMANCE.md``).

    Example (not run in the tests: the settings are process-wide, ``tests/test_memory.py`` probes them in a fresh
    interpreter):
        >>> from studio.memory import keep_freed_memory
        >>> keep_freed_memory()   # doctest: +SKIP
        True
    """
    global _kept
    with _lock:
        if _kept:
            return True
        libc = _libc()
        if libc is None:
            return False
        ok = all(libc.mallopt(param, value) == 1 for param, value in (
            (_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1)))
        _kept = ok
        return ok


def malloc_in_use() -> int | None:
    """Bytes allocated through ``malloc`` and not yet freed (glibc >= 2.33 ``mallinfo2``: heap blocks in use plus
    ``mmap``-ed blocks), or None where unavailable. Unlike the resident set size it does not count freed memory the
    allocator keeps, so it measures what a computation holds with or without :func:`keep_freed_memory`.

    Example:
        >>> import torch
        >>> before = malloc_in_use()
        >>> x = torch.ones(2**24)   # 64 MiB
        >>> before is None or malloc_in_use() - before >= 2**26
        True
    """
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)
