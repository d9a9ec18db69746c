"""Where one cold merge's time goes, for the device machine (part of tools/device_check.sh; runs on the CPU too).

    python3 tools/device_profile.py                       # TSV-M, 8 synthetic ViT-B/32 experts, CUDA if present
    python3 tools/device_profile.py --method iso_cts --device cpu --model MiniCLIP-ViT --tasks 2

After one merge on another pool (CUDA context, library loads, cuSOLVER handles), on a fresh pool it times the copies
of the experts to the device, then one cold merge under ``torch.profiler``, and prints:

* the eigensolves by route, counted and timed around the calls (seconds summed over the threads that make them):
  cuSOLVER's batches (:mod:`studio._cusolver`: batches, matrices, seconds in batches), the host's LAPACK
  (``studio._lapack.eigh`` / ``eigh_top`` on CUDA matrices), ``torch.linalg.eigh``;
* the profiler's table of operators by self time on the device (CUDA: every stream's kernels) or the host (there
  only the calling thread's operators are recorded, not the merge's worker threads').

The first session measured the solves' rates but not what else a cold TSV-M merge spends (about 1 s of its 2.17 s on
the H200 is not explained by the rates, docs/PERFORMANCE.md, "CUDA"); this is the tool for that.
"""

from __future__ import annotations

import argparse
import collections
import sys
import threading
import time

import torch
from torch.profiler import ProfilerActivity, profile

from studio import _cusolver, _lapack, bench, engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tsv_m")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=25, help="rows of the profiler's table")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    base, experts = bench.synthetic_pool(bench.clip_visual_shapes(args.model), args.tasks)
    engine.merge_pool(engine.TaskPool(base, experts, device=device, check_finite=False), args.method)
    engine._POOLS.clear()
    sync()

    spent: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    lock, inner = threading.Lock(), threading.local()

    def timed(name, fn):
        def run(g, *a, **k):
            if getattr(inner, "busy", False):   # eigh_top calling eigh: counted once, as the outer call
                return fn(g, *a, **k)
            inner.busy, t = True, time.perf_counter()
            try:
                return fn(g, *a, **k)
            finally:
                inner.busy = False
                if g.device.type == "cuda":
                    route = "host LAPACK" if _lapack._on_host(g) else "torch.linalg.eigh"
                    with lock:
                        spent[f"{route} ({name})"][0] += 1
                        spent[f"{route} ({name})"][1] += time.perf_counter() - t
        return run

    _lapack.eigh, _lapack.eigh_top = timed("eigh", _lapack.eigh), timed("eigh_top", _lapack.eigh_top)
    pool = engine.TaskPool(base, experts, device=device, check_finite=False)
    t = time.perf_counter()
    if pool.resident:
        for key in pool.keys:
            for name in (None, *pool.names):
                pool.tensor(name, key)
    sync()
    copy_s = time.perf_counter() - t
    before = _cusolver.stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        engine.merge_pool(pool, args.method)
        sync()
        merge_s = time.perf_counter() - t
    after = _cusolver.stats()
    print(f"# {args.method}, {args.tasks} x {args.model}, {device}: experts to the device {copy_s:.2f} s "
          f"(resident: {pool.resident}); the cold merge {merge_s:.2f} s under the profiler")
    batches = after["batches"] - before["batches"]
    if batches:
        print(f"cuSOLVER batches: {batches} of {after['size']}, {after['matrices'] - before['matrices']} matrices, "
              f"{after['seconds'] - before['seconds']:.2f} s in batches (summed)")
    for route, (calls, seconds) in sorted(spent.items()):
        print(f"{route}: {calls} calls, {seconds:.2f} s (summed over threads)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                    row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
