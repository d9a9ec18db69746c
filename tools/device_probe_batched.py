"""Probe of cuSOLVER's batched eigensolver (:mod:`studio._cusolver`, ``cusolverDnXsyevBatched``) on the device
machine: whether it is there, whether it agrees with ``torch.linalg.eigh``, whether a matrix's result depends on the
batch it is solved in (its size, its other matrices, its position, identity padding), milliseconds per solve by batch
size for the Gram matrices of CLIP layers, and from many threads with a stream each. The evidence behind
:class:`studio._cusolver.Batcher`; its first two tables are in docs/PERFORMANCE.md, "CUDA".

Run as ``python3 tools/device_probe_batched.py`` (part of tools/device_check.sh); without CUDA it says so, exits 0.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from studio import _cusolver

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from device_probe import per_call as timed  # noqa: E402  (tools/ is not a package)


def grams(batch: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gram matrices of fine-tuning-like ``[3n, n]`` task matrices (a decaying spectrum), formed by a general GPU
    product as the engine forms them (symmetric only to rounding)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = torch.randn(batch, 3 * n, n, device="cuda", dtype=dtype, generator=g)
    a = a * torch.logspace(0, -3, n, device="cuda", dtype=dtype)
    return a.mT @ a


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA: nothing to probe")
        return 0
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; cusolverDnXsyevBatched available: "
          f"{_cusolver.available()}")
    if not _cusolver.available():
        return 0
    for dtype in (torch.float32, torch.float64):
        g = grams(8, 768, dtype)
        w, v = _cusolver.eigh_batched(g)
        wt, vt = torch.linalg.eigh(g)
        scale = wt.abs().amax(-1, keepdim=True)
        eye = torch.eye(768, device="cuda", dtype=dtype)
        resid = (g @ v - v * w.unsqueeze(-2)).norm(dim=(-2, -1)) / g.norm(dim=(-2, -1))
        resid_t = (g @ vt - vt * wt.unsqueeze(-2)).norm(dim=(-2, -1)) / g.norm(dim=(-2, -1))
        print(f"{dtype}: max |w - w_torch| / max|w| = {float(((w - wt).abs() / scale).max()):.2e}; residual "
              f"{float(resid.max()):.2e} (torch {float(resid_t.max()):.2e}); orthogonality "
              f"{float((v.mT @ v - eye).abs().max()):.2e} (torch {float((vt.mT @ vt - eye).abs().max()):.2e}); "
              f"smallest cosine between the top-96 subspaces and torch's "
              f"{float(torch.linalg.svdvals(v[..., -96:].mT @ vt[..., -96:]).min()):.8f}")
        one = _cusolver.eigh_batched(g[:1])
        big = _cusolver.eigh_batched(torch.cat([grams(5, 768, dtype, seed=1), g[:1], grams(26, 768, dtype, seed=2)]))
        print(f"{dtype}: matrix 0 alone == in a batch of 8: {torch.equal(one[0][0], w[0])}, "
              f"{torch.equal(one[1][0], v[0])}; == at position 5 of 32: {torch.equal(big[0][5], w[0])}, "
              f"{torch.equal(big[1][5], v[0])}")
        skew = g + torch.triu(torch.randn_like(g), 1) * 1e-3 * g.abs().max()   # its lower triangle is g's
        print(f"{dtype}: reads the lower triangle: {torch.equal(_cusolver.eigh_batched(skew)[0], w)}")
    # worker threads (a handle each) queueing batches on one shared stream, as the engine's workers do
    stacks = [grams(8, 768, torch.float32, seed=10 + i) for i in range(16)]
    alone = [_cusolver.eigh_batched(s) for s in stacks]
    stream = torch.cuda.current_stream()

    def on_shared(s):
        with torch.cuda.stream(stream):
            out = _cusolver.eigh_batched(s)
        return out

    with ThreadPoolExecutor(8) as ex:
        list(ex.map(on_shared, stacks[:8]))
        torch.cuda.synchronize()
        t = time.perf_counter()
        threaded = list(ex.map(on_shared, stacks))
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, threaded))
    print(f"8 threads, 16 batches of 8 (768, float32) on one stream: {wall / 128 * 1e3:.3f} ms/solve; "
          f"bits equal to one thread: {same}")
    print("| n | dtype | batch | XsyevBatched ms/solve | torch.linalg.eigh ms/solve |")
    print("|---|---|---|---|---|")
    plan = [(768, torch.float32, (1, 8, 16, 48, 128, 392)), (768, torch.float64, (1, 8, 16, 98)),
            (1024, torch.float32, (1, 8, 64)), (1024, torch.float64, (8, 48)), (512, torch.float32, (8,)),
            (152, torch.float64, (8, 48))]
    for n, dtype, batches in plan:
        for b in batches:
            g = grams(b, n, dtype)
            batched = timed(lambda: _cusolver.eigh_batched(g)) / b
            loop = timed(lambda: torch.linalg.eigh(g[: min(b, 8)]), calls=2) / min(b, 8)
            print(f"| {n} | {str(dtype).removeprefix('torch.')} | {b} | {batched * 1e3:.3f} | {loop * 1e3:.3f} |",
                  flush=True)
    batches_and_streams()
    free, total = torch.cuda.mem_get_info()
    print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB; free {free / 2**30:.1f} GiB")
    return 0


def same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def batches_and_streams() -> None:
    """Which batches give a matrix the same bits, and whether batched calls on separate streams overlap."""
    n, f32 = 768, torch.float32
    x = grams(1, n, f32, seed=99)
    for B in (2, 8, 9, 16, 17, 32, 64):
        c1, c2 = grams(B - 1, n, f32, seed=1), grams(B - 1, n, f32, seed=2)
        first = _cusolver.eigh_batched(torch.cat([x, c1]))
        last = _cusolver.eigh_batched(torch.cat([c2, x]))
        pad = _cusolver.eigh_batched(torch.cat([x, torch.eye(n, device="cuda").expand(B - 1, n, n)]))
        print(f"B={B}: pos 0 vs pos {B - 1} (other companions) equal: "
              f"{same((first[0][0], first[1][0]), (last[0][-1], last[1][-1]))}; vs identity padding: "
              f"{same((first[0][0], first[1][0]), (pad[0][0], pad[1][0]))}", flush=True)
    ref = {}
    for B in (2, 8, 9, 16, 17, 32, 64):
        out = _cusolver.eigh_batched(torch.cat([x, grams(B - 1, n, f32, seed=3)]))
        ref[B] = (out[0][0], out[1][0])
    print("same bits across sizes:", {f"{a}-{b}": same(ref[a], ref[b]) for a, b in
                                      [(2, 8), (8, 9), (8, 16), (16, 17), (16, 32), (32, 64)]})
    for f in (torch.float32, torch.float64):
        a = grams(1, n, f, seed=5)
        ones = [_cusolver.eigh_batched(torch.cat([a, grams(7, n, f, seed=s)])) for s in (6, 7)]
        equal = same((ones[0][0][0], ones[0][1][0]), (ones[1][0][0], ones[1][1][0]))
        print(f"{f} B=8 two companion sets equal: {equal}")

    real8, real16 = grams(8, n, f32, seed=11), grams(16, n, f32, seed=12)
    pad16 = torch.cat([real8, torch.eye(n, device="cuda").expand(8, n, n)])
    print(f"batch 8 real {timed(lambda: _cusolver.eigh_batched(real8)) * 1e3:.1f} ms; 8 real + 8 identity "
          f"{timed(lambda: _cusolver.eigh_batched(pad16)) * 1e3:.1f} ms; 16 real "
          f"{timed(lambda: _cusolver.eigh_batched(real16)) * 1e3:.1f} ms")
    for dtype in (torch.float32, torch.float64):
        for B, threads in ((8, 8), (8, 16), (16, 16), (2, 16)):
            stacks = [grams(B, n, dtype, seed=20 + i) for i in range(threads * 3)]
            local = threading.local()

            def one(s):
                if not hasattr(local, "stream"):
                    local.stream = torch.cuda.Stream()
                with torch.cuda.stream(local.stream):
                    out = _cusolver.eigh_batched(s)
                    local.stream.synchronize()
                return out

            with ThreadPoolExecutor(threads) as ex:
                list(ex.map(one, stacks[:threads]))
                torch.cuda.synchronize()
                t = time.perf_counter()
                list(ex.map(one, stacks))
                torch.cuda.synchronize()
                wall = time.perf_counter() - t
            print(f"{dtype} {threads} threads, own streams, batches of {B}: {wall / (B * len(stacks)) * 1e3:.3f} "
                  f"ms/solve", flush=True)
    # host top-k route timings for comparison, from 16 threads (the current engine path)
    from studio import _lapack
    mats = [g for g in grams(64, n, f32, seed=40)]
    with ThreadPoolExecutor(16) as ex:
        list(ex.map(lambda g: _lapack.eigh_top(g, 96), mats[:16]))
        t = time.perf_counter()
        list(ex.map(lambda g: _lapack.eigh_top(g, 96), mats))
        torch.cuda.synchronize()
        print(f"host syevr top-96 from 16 threads: {(time.perf_counter() - t) / 64 * 1e3:.3f} ms/solve")


if __name__ == "__main__":
    sys.exit(main())
