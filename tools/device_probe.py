"""Where a CUDA merge's time goes, measured on the device machine: the evidence behind the host eigensolver
(:data:`studio._lapack.HOST_EIGH_MAX`) and the CUDA worker threads (:mod:`studio.parallel`).

Prints, for the symmetric eigensolves the spectral methods make (Gram matrices of CLIP layer sizes):

* seconds per ``torch.linalg.eigh`` on the GPU (cuSOLVER), one after another on one stream;
* the same from 8 threads, each on its own stream (whether cuSOLVER's solves overlap);
* seconds per solve with LAPACK on one host core (``studio._lapack.eigh``, and ``eigh_top`` for the top eighth),
  the copies to and from the GPU included, alone and from 16 threads at once (per solve: wall / solves);

and the host <-> device bandwidth for a ViT-B/32-sized set of tensors (pageable memory, as the engine copies).
Run as ``python3 tools/device_probe.py`` (part of tools/device_check.sh); without CUDA it says so and exits 0.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from studio import _lapack


def per_call(fn, calls: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def threaded(fn, mats: list, workers: int, streams: bool) -> float:
    """Seconds per solve when ``workers`` threads share ``mats`` (each thread on its own stream if ``streams``)."""
    local = threading.local()

    def one(m):
        if streams:
            if not hasattr(local, "stream"):
                local.stream = torch.cuda.Stream()
            with torch.cuda.stream(local.stream):
                out = fn(m)
                local.stream.synchronize()
                return out
        return fn(m)

    with ThreadPoolExecutor(workers) as ex:
        list(ex.map(one, mats[:workers]))   # warm each thread
        torch.cuda.synchronize()
        t = time.perf_counter()
        list(ex.map(one, mats))
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(mats)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: nothing to probe")
        return 0
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; host threads {torch.get_num_threads()}")
    saved = _lapack.HOST_EIGH_MAX
    print("| n | dtype | GPU eigh ms | GPU 8 streams ms/solve | host eigh ms | host eigh 16 threads ms/solve "
          "| host top n/8 ms | host top 16 threads ms/solve |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (768, 1024, 2048):
        for dtype in (torch.float32, torch.float64):
            a = torch.randn(3 * n, n, device=dev, dtype=dtype)
            mats = [(a * (1 + i / 64)).mT @ a for i in range(32)]
            g = mats[0]
            _lapack.HOST_EIGH_MAX = 0
            gpu = per_call(lambda: torch.linalg.eigh(g))
            gpu8 = threaded(torch.linalg.eigh, mats, 8, True)
            _lapack.HOST_EIGH_MAX = 1 << 30
            host = per_call(lambda: _lapack.eigh(g))
            with _lapack.one_blas_thread():
                host16 = threaded(_lapack.eigh, mats, 16, False)
                top = per_call(lambda: _lapack.eigh_top(g, n // 8))
                top16 = threaded(lambda m: _lapack.eigh_top(m, n // 8), mats, 16, False)
            _lapack.HOST_EIGH_MAX = saved
            print(f"| {n} | {str(dtype)[6:]} | {1e3 * gpu:.1f} | {1e3 * gpu8:.1f} | {1e3 * host:.1f} | "
                  f"{1e3 * host16:.2f} | {1e3 * top:.1f} | {1e3 * top16:.2f} |", flush=True)
            del a, mats
    # transfers: ~ViT-B/32's 88M float32 parameters as 8 tensors of 11M
    cpu = [torch.randn(11_000_000) for _ in range(8)]
    size = sum(t.numel() * 4 for t in cpu) / 1e9
    up = per_call(lambda: [t.to(dev) for t in cpu], 3)
    on_gpu = [t.to(dev) for t in cpu]
    down = per_call(lambda: [t.to("cpu") for t in on_gpu], 3)
    pinned = [t.pin_memory() for t in cpu]
    up_pinned = per_call(lambda: [t.to(dev, non_blocking=True) for t in pinned], 3)
    print(f"# host->device {size / up:.1f} GB/s pageable, {size / up_pinned:.1f} GB/s pinned; "
          f"device->host {size / down:.1f} GB/s pageable (fresh host tensors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
