"""CPU fast paths (studio._lapack): partial LAPACK eigensolver and syrk Gram against PyTorch's full solvers, their
use from the merge's worker threads, and the thread limits the parallel engine sets and restores."""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest
import threadpoolctl
import torch

from studio import _lapack, linalg
from studio.parallel import parallel_map, set_workers


def _sym(n: int, spectrum: torch.Tensor, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    return ((Q * spectrum.double()) @ Q.mT).to(dtype)


def _projector(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v @ v.mT


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 40, 199, 200])
def test_eigh_top_matches_the_full_eigensolver(dtype, k):
    spectrum = torch.cat([torch.logspace(1, 0.3, 20), torch.linspace(1, 0.5, 180)])  # strong head, flat tail
    G = _sym(200, spectrum, seed=k, dtype=dtype)
    w, v = _lapack.eigh_top(G, k)
    ref_w, ref_v = torch.linalg.eigh(G.double())
    ref_w, ref_v = ref_w.flip(0)[:k], ref_v.flip(1)[:, :k]
    assert w.dtype == dtype and v.dtype == dtype and w.shape == (k,) and v.shape == (200, k)
    eps = torch.finfo(dtype).eps
    assert float((w.double() - ref_w).abs().max()) <= 10 * eps * float(ref_w[0])
    assert torch.all(w[:-1] >= w[1:])                                  # descending
    # The separated head's eigenvectors match one by one (up to sign); the kept subspace matches as a whole to
    # the accuracy eps * |G| / gap that any solver has (tail gaps are 2.5e-4 of |G|).
    head = min(k, 20)
    align = (v[:, :head].double() * ref_v[:, :head]).sum(0).abs()
    assert float((1 - align).max()) < 1e4 * eps
    err = float((_projector(v) - _projector(ref_v)).abs().max()) if k < 200 else 0.0
    assert err < 1e4 * eps
    torch.testing.assert_close(v.double().mT @ v.double(), torch.eye(k, dtype=torch.float64), atol=100 * eps, rtol=0)


def test_eigh_top_on_a_repeated_eigenvalue_spans_the_same_subspace():
    spectrum = torch.tensor([5.0, 3.0, 3.0, 3.0] + [1.0] * 46)
    G = _sym(50, spectrum, seed=1)
    w, v = _lapack.eigh_top(G, 4)
    torch.testing.assert_close(w, torch.tensor([5.0, 3.0, 3.0, 3.0]), atol=1e-5, rtol=0)
    _, ref_v = torch.linalg.eigh(G.double())
    torch.testing.assert_close(_projector(v), _projector(ref_v[:, -4:]), atol=1e-5, rtol=0)


def test_eigh_top_edge_cases():
    G = _sym(6, torch.arange(6.0, 0, -1), seed=2)
    assert _lapack.eigh_top(G, 0)[0].shape == (0,)
    w_all, _ = _lapack.eigh_top(G, 99)                                 # clipped to n, full solver
    torch.testing.assert_close(w_all, torch.arange(6.0, 0, -1), atol=1e-5, rtol=0)


def test_gram_is_a_transpose_a_for_contiguous_and_strided_inputs():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(300, 40, generator=g)
    for x in (a, a.mT.contiguous().mT, a[::2], a.double()):
        out = _lapack.gram(x)
        assert out.dtype == x.dtype and out.shape == (40, 40)
        torch.testing.assert_close(out, x.mT @ x, rtol=1e-5, atol=1e-4)
        assert torch.equal(out, out.mT)                                  # exactly symmetric


def test_gram_svd_partial_and_full_eigensolver_paths_agree():
    """gram_svd uses syevr for rank <= n/4 and the full eigh above: the kept triplets agree either way."""
    g = torch.Generator().manual_seed(4)
    U = torch.linalg.qr(torch.randn(400, 160, generator=g)).Q
    V = torch.linalg.qr(torch.randn(160, 160, generator=g)).Q
    A = (U * torch.cat([torch.logspace(1, 0, 30), torch.linspace(1, 0.4, 130)])) @ V.mT
    Uk, Sk, Vhk = linalg.gram_svd(A, 20)                # partial (20 <= 160 / 4)
    Uf, Sf, Vhf = linalg.gram_svd(A, 160)               # full eigh
    torch.testing.assert_close(Sk, Sf[:20], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((Uk * Sk) @ Vhk, (Uf[:, :20] * Sf[:20]) @ Vhf[:20], rtol=1e-4, atol=1e-4)


def test_eigh_top_is_thread_safe_and_deterministic():
    mats = [_sym(120, torch.linspace(10, 1, 120), seed=s) for s in range(6)]
    sequential = [_lapack.eigh_top(m, 12) for m in mats]
    results: list = [None] * len(mats)

    def work(i):
        for _ in range(3):
            results[i] = _lapack.eigh_top(mats[i], 12)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(mats))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for (w1, v1), (w2, v2) in zip(sequential, results):
        assert torch.equal(w1, w2) and torch.equal(v1, v2)


def _blas_threads() -> list[int]:
    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_parallel_map_limits_blas_to_one_thread_per_worker_and_restores_everything():
    _lapack.have_syevr()                                              # load SciPy's BLAS so it is listed
    torch_before, blas_before = torch.get_num_threads(), _blas_threads()
    set_workers(2)
    try:
        inside = parallel_map(lambda _: (torch.get_num_threads(), _blas_threads()), range(4))
    finally:
        set_workers(None)
    assert all(t == 1 and set(b) == {1} for t, b in inside)
    assert torch.get_num_threads() == torch_before
    assert _blas_threads() == blas_before


def test_parallel_map_limits_blas_when_called_from_another_thread_than_the_first_limiter():
    """The app merges on request threads: the limit must hold there even though another thread set a limit first
    (threadpoolctl >= 3.8 otherwise ignores every thread but the first for OpenBLAS's process-wide pool)."""
    _lapack.have_syevr()
    inside = []
    with threadpoolctl.threadpool_limits(2, user_api="blas"):            # the main thread owns OpenBLAS's limits
        set_workers(2)
        try:
            request = threading.Thread(target=lambda: inside.extend(
                parallel_map(lambda _: _blas_threads(), range(4))))
            request.start()
            request.join()
        finally:
            set_workers(None)
        assert set(_blas_threads()) == {2}
    assert len(inside) == 4 and all(set(b) == {1} for b in inside)


def test_without_scipy_the_torch_eigensolver_gives_the_same_decomposition(monkeypatch):
    """If SciPy's LAPACK is unavailable, eigh_top falls back to torch.linalg.eigh with the same results."""
    G = _sym(80, torch.linspace(9, 1, 80), seed=5)
    w_fast, v_fast = _lapack.eigh_top(G, 10)
    monkeypatch.setattr(_lapack, "_syevr", lambda dtype: None)
    w_slow, v_slow = _lapack.eigh_top(G, 10)
    torch.testing.assert_close(w_fast, w_slow, atol=1e-5, rtol=0)
    torch.testing.assert_close(_projector(v_fast), _projector(v_slow), atol=1e-5, rtol=0)


def test_one_blas_thread_is_shared_by_overlapping_blocks_and_restored_by_the_last():
    """The limit is process-wide and reference-counted: a block that leaves while another thread's block is still
    running must not lift it; the last one out restores the previous thread counts."""
    _lapack.have_syevr()
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        assert set(before) == {2}
        entered, release_first, first_left = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with _lapack.one_blas_thread():
                entered.set()
                release_first.wait(10)
            first_left.set()

        t = threading.Thread(target=first)
        t.start()
        assert entered.wait(10)
        with _lapack.one_blas_thread():
            seen["both"] = _blas_threads()
            release_first.set()
            assert first_left.wait(10)
            seen["after_first_left"] = _blas_threads()
        t.join()
        assert set(seen["both"]) == {1} and set(seen["after_first_left"]) == {1}
        assert _blas_threads() == before


def test_fast_paths_run_blas_single_threaded_and_leave_the_callers_setting(monkeypatch):
    """gram / eigh_top outside a merge (the app's diagnostics, on its request threads) run NumPy's / SciPy's BLAS on
    one thread, then leave the caller's setting as it was."""
    _lapack.have_syevr()
    real, seen = _lapack.one_blas_thread, []

    @contextlib.contextmanager
    def recording():
        with real():
            seen.append(_blas_threads())
            yield

    monkeypatch.setattr(_lapack, "one_blas_thread", recording)
    a = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        before = _blas_threads()
        worker = threading.Thread(target=lambda: _lapack.eigh_top(_lapack.gram(a), 8))   # not the main thread
        worker.start()
        worker.join()
        assert _blas_threads() == before
    assert len(seen) == 2 and all(set(threads) == {1} for threads in seen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_eigh_matches_torch_and_may_work_in_the_callers_memory(dtype):
    """_lapack.eigh (SciPy's syevd) against torch.linalg.eigh: ascending eigenvalues to eps * |G|, the same
    eigenvectors up to sign where the spectrum separates them; overwrite=True uses the argument's own memory
    (row- or column-major) and gives the same decomposition for an exactly symmetric G (as gram's are)."""
    spectrum = torch.cat([torch.logspace(2, 0.5, 30), torch.linspace(3, 1e-6, 90)])
    G = _sym(120, spectrum, seed=7, dtype=dtype)
    G = (G + G.mT) / 2                                                # exactly symmetric
    w, v = _lapack.eigh(G)
    ref_w, ref_v = torch.linalg.eigh(G.double())
    eps = torch.finfo(dtype).eps
    assert w.dtype == v.dtype == dtype and v.shape == (120, 120)
    assert float((w.double() - ref_w).abs().max()) <= 20 * eps * float(ref_w[-1])
    assert torch.all(w[1:] >= w[:-1])
    head = (v[:, -30:].double() * ref_v[:, -30:]).sum(0).abs()       # the separated top 30
    assert float((1 - head).max()) < 1e3 * eps
    rebuilt = (v.double() * w.double()) @ v.double().mT
    torch.testing.assert_close(rebuilt, G.double(), atol=100 * eps * float(ref_w[-1]), rtol=0)
    for arg in (G.clone(), G.clone().mT.contiguous().mT):            # row-major, column-major
        w2, v2 = _lapack.eigh(arg, overwrite=True)
        assert torch.equal(w2, w) and torch.equal(v2, v)
        assert v2.data_ptr() == arg.data_ptr()                         # no copy was made
    w3, v3 = _lapack.eigh_top(G.clone(), 10, overwrite=True)
    assert torch.equal(w3, _lapack.eigh_top(G, 10)[0]) and torch.equal(v3, _lapack.eigh_top(G, 10)[1])
    S = _sym(120, spectrum, seed=7, dtype=dtype)
    assert torch.equal(G, (S + S.mT) / 2)                             # without overwrite the input is kept


def test_full_eigh_without_scipy_and_off_the_fast_path_is_torchs(monkeypatch):
    G = _sym(40, torch.linspace(4, 1, 40), seed=8)
    batched = G.unsqueeze(0)                                          # not a 2-D matrix: torch's solver
    assert all(torch.equal(x, y) for x, y in zip(_lapack.eigh(batched), torch.linalg.eigh(batched)))
    fast = _lapack.eigh(G)
    monkeypatch.setattr(_lapack, "_syevd", lambda dtype: None)
    slow = _lapack.eigh(G)
    assert all(torch.equal(x, y) for x, y in zip(slow, torch.linalg.eigh(G)))
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(_projector(fast[1][:, -5:]), _projector(slow[1][:, -5:]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_is_the_product_for_views_and_falls_back_elsewhere(dtype):
    """_lapack.matmul (NumPy's BLAS on the CPU) equals ``a @ b`` to rounding for contiguous, transposed, sliced and
    strided operands, returns a fresh writable tensor, and is ``a @ b`` itself where it does not apply."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(90, 70, generator=g, dtype=dtype)
    b = torch.randn(70, 50, generator=g, dtype=dtype)
    tol = dict(rtol=0, atol=50 * torch.finfo(dtype).eps * 70)
    a0, b0 = a.clone(), b.clone()
    for x, y in ((a, b), (a.mT.contiguous().mT, b), (a[:, :60], b[:60]), (a[::2], b), (b.mT, a.mT), (a, b[:, :1])):
        out = _lapack.matmul(x, y)
        assert out.dtype == dtype and out.shape == (x.shape[0], y.shape[1])
        torch.testing.assert_close(out, (x.double() @ y.double()).to(dtype), **tol)
        out.add_(1.0)                                                   # writable, and no operand's memory
    assert torch.equal(a, a0) and torch.equal(b, b0)
    for x, y in ((a.half(), b.half()), (a.unsqueeze(0), b.unsqueeze(0)), (a.clone().requires_grad_(True), b)):
        assert torch.equal(_lapack.matmul(x, y), x @ y)               # torch's own product
    with pytest.raises(RuntimeError):
        _lapack.matmul(a.float(), b.double())                           # mixed dtypes: torch's own error


def test_matmul_and_full_eigh_are_thread_safe_and_deterministic():
    mats = [_sym(150, torch.linspace(10, 1e-3, 150), seed=s, dtype=torch.float64) for s in range(4)]
    sequential = [(_lapack.eigh(m), _lapack.matmul(m, m)) for m in mats]
    results = parallel_map(lambda m: (_lapack.eigh(m), _lapack.matmul(m, m)), mats + mats)
    for ((w1, v1), p1), ((w2, v2), p2) in zip(sequential + sequential, results):
        assert torch.equal(w1, w2) and torch.equal(v1, v2) and torch.equal(p1, p2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_eigensolves_on_the_host_read_the_lower_triangle_and_stay_on_the_device(dtype, monkeypatch):
    # studio._lapack.HOST_EIGH_MAX: CUDA matrices of up to that many rows are solved by LAPACK on the host (where
    # cuSOLVER's batched solver does not take them: BATCHED_EIGH_MAX = 0). Like torch.linalg.eigh, the solve reads
    # the lower triangle: a matrix symmetric only to rounding (a Gram matrix from a general product) must give the
    # same eigenpairs on either route.
    monkeypatch.setattr(_lapack, "BATCHED_EIGH_MAX", 0)
    g = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 0.25], [0.0, 0.0, 1.0]], dtype=dtype)
    lower = torch.tril(g) + torch.tril(g, -1).mT
    want_w, want_v = torch.linalg.eigh(lower)
    cuda = torch.device("cuda", 0)
    on_cuda = g.to(cuda)
    assert _lapack._on_host(on_cuda) and not _lapack._on_host(g)
    assert not _lapack._on_host(torch.eye(3, device=cuda).expand(2, 3, 3))   # batched: cuSOLVER
    for overwrite in (False, True):
        w, v = _lapack.eigh(on_cuda.clone(), overwrite=overwrite)
        assert w.device == on_cuda.device and v.device == on_cuda.device and w.dtype == v.dtype == dtype
        torch.testing.assert_close(w.cpu(), want_w)
        torch.testing.assert_close((v.cpu() * want_v).sum(0).abs(), torch.ones(3, dtype=dtype))   # same vectors
        wt, vt = _lapack.eigh_top(on_cuda.clone(), 1, overwrite=overwrite)
        torch.testing.assert_close(wt.cpu(), want_w[-1:])
    assert torch.equal(on_cuda.cpu(), g)   # overwrite=False left the caller's matrix alone
    monkeypatch.setattr(_lapack, "HOST_EIGH_MAX", 2)   # above the limit: cuSOLVER, the same eigenvalues
    assert not _lapack._on_host(on_cuda)
    torch.testing.assert_close(_lapack.eigh(on_cuda)[0].cpu(), want_w)
    empty = torch.zeros(0, 0, device=cuda, dtype=dtype)
    assert _lapack.eigh(empty)[0].shape == (0,) and _lapack.eigh_top(empty, 3)[1].shape == (0, 0)


def _lower_triangle_case(dtype):
    g = torch.tensor([[2.0, 1.0, 0.5], [0.0, 3.0, 0.25], [0.0, 0.0, 1.0]], dtype=dtype)
    return g, torch.linalg.eigh(torch.tril(g) + torch.tril(g, -1).mT)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_batched_eigensolves_read_the_lower_triangle_and_give_a_matrix_the_same_bits_in_any_batch(dtype):
    # studio._cusolver: CUDA eigensolves asked for through eigh_many / eigh_top_many go to cuSOLVER's batched solver,
    # in batches of one size padded with identities, from every thread at once. The engine's bits rest on this: a
    # matrix's eigenpairs must not depend on which other matrices share its batch, nor where in it it lands.
    from concurrent.futures import ThreadPoolExecutor

    from studio import _cusolver

    if not _cusolver.available():
        pytest.skip("this cuSOLVER has no cusolverDnXsyevBatched")
    cuda = torch.device("cuda", 0)
    g, (want_w, want_v) = _lower_triangle_case(dtype)
    on_cuda = g.to(cuda)
    assert _lapack._batched(on_cuda) and not _lapack._batched(g)
    assert not _lapack._batched(torch.eye(3, device=cuda).expand(2, 3, 3))   # batched input: torch.linalg.eigh
    (w, v), = _lapack.eigh_many([on_cuda])
    assert w.device == v.device == on_cuda.device and w.dtype == v.dtype == dtype
    torch.testing.assert_close(w.cpu(), want_w)
    torch.testing.assert_close((v.cpu() * want_v).sum(0).abs(), torch.ones(3, dtype=dtype))   # same vectors
    (wt, vt), = _lapack.eigh_top_many([on_cuda], 2)
    torch.testing.assert_close(wt.cpu(), want_w.flip(0)[:2])
    assert vt.shape == (3, 2) and vt.is_contiguous()
    mats = [_sym(96, torch.logspace(0, -4, 96), seed=s, dtype=dtype).to(cuda) for s in range(40)]
    alone = [_lapack.eigh_many([m])[0] for m in mats]
    together = _lapack.eigh_many(mats)
    fake = sys.modules.get("fakecuda")   # the CPU stand-in's device is per thread

    def many(part):
        with fake.FakeCudaMode() if fake else contextlib.nullcontext():
            return _lapack.eigh_many(part)

    with ThreadPoolExecutor(6) as ex:   # 3 at a time from 6 threads: batches of whatever is waiting
        threaded = [r for part in ex.map(many, [mats[i:i + 3] for i in range(0, 40, 3)]) for r in part]
    for (w1, v1), (w2, v2), (w3, v3) in zip(alone, together, threaded):
        assert torch.equal(w1, w2) and torch.equal(v1, v2) and torch.equal(w1, w3) and torch.equal(v1, v3)
    top = _lapack.eigh_top_many(mats[:5], 7)
    for (w1, v1), (w2, v2) in zip(alone, top):
        assert torch.equal(w2, w1.flip(0)[:7]) and torch.equal(v2, v1.flip(1)[:, :7])
    assert _lapack.eigh_many([torch.zeros(0, 0, device=cuda, dtype=dtype)])[0][0].shape == (0,)
    # single solves stay off the batches (a call costs 40 ms whatever its size): the host's LAPACK, the same values
    torch.testing.assert_close(_lapack.eigh(mats[0])[0], alone[0][0], rtol=1e-4, atol=1e-6)


def test_batcher_runs_every_threads_requests_in_batches_of_one_size():
    # studio._cusolver.Batcher with a CPU solver: requests from many threads are grouped into batches of `size`
    # (identity padding), each matrix gets its own result, and a failed batch fails its askers only.
    from concurrent.futures import ThreadPoolExecutor

    from studio._cusolver import Batcher

    stacks = []

    def solve(stack):
        stacks.append(stack.clone())
        if torch.isnan(stack).any():
            raise RuntimeError("cannot solve a matrix with NaN")
        return torch.linalg.eigh(stack)

    batcher = Batcher(solve, size=4, slots=2)
    mats = [_sym(12, torch.linspace(5, 0.1, 12), seed=s, dtype=torch.float64) for s in range(30)]
    with ThreadPoolExecutor(6) as ex:
        results = [r for part in ex.map(batcher.solve, [mats[i:i + 2] for i in range(0, 30, 2)]) for r in part]
    eye = torch.eye(12, dtype=torch.float64)
    assert all(s.shape == (4, 12, 12) for s in stacks) and batcher.batches == len(stacks) < 30
    assert batcher.matrices == 30   # a counter the bench reports
    for m, (w, v) in zip(mats, results):
        found = [s for s in stacks if any(torch.equal(x, m) for x in s)]
        assert len(found) == 1   # solved once
        want_w, want_v = torch.linalg.eigh(m)
        assert torch.equal(w, want_w) and torch.equal(v, want_v)   # LAPACK: a matrix's bits, whatever its batch
    for s in stacks:   # every other slot of a batch is identity padding
        assert all(any(torch.equal(x, m) for m in mats) or torch.equal(x, eye) for x in s)
    bad = mats[0].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="NaN"):
        batcher.solve([bad, mats[1]])
    assert torch.equal(batcher.solve([mats[2]])[0][0], torch.linalg.eigh(mats[2])[0])   # and it keeps working
    assert batcher.solve([]) == []


def test_batcher_fills_batches_while_the_device_is_busy_and_sends_a_part_batch_only_when_idle():
    # Group commit: a call costs the same whatever its size, so matrices asked for while batches run wait for a full
    # batch (or for a free slot); a part-full batch goes only when nothing runs.
    import time

    from studio._cusolver import Batcher

    gate, solved = threading.Event(), []

    def solve(stack):
        gate.wait(30)
        solved.append([int(x[0, 0]) for x in stack])   # matrix i is (i + 2) I; padding is I
        return torch.linalg.eigh(stack)

    batcher = Batcher(solve, size=4, slots=2)
    mats = [(i + 2.0) * torch.eye(3, dtype=torch.float64) for i in range(6)]
    threads = []

    def ask(*idx, waiting):
        t = threading.Thread(target=batcher.solve, args=([mats[i] for i in idx],))
        t.start()
        threads.append(t)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and waiting() is False:
            time.sleep(0.005)

    queued = lambda n: sum(len(q) for q in batcher._pending.values()) == n   # noqa: E731
    ask(0, waiting=lambda: batcher._running == 1)              # the device is idle: a batch of one goes at once
    ask(1, waiting=lambda: queued(1))                          # busy: it waits for company
    ask(2, waiting=lambda: queued(2))
    ask(3, 4, waiting=lambda: batcher._running == 2)           # four waiting: a full batch takes the second slot
    ask(5, waiting=lambda: queued(1))                          # both slots busy: it waits
    gate.set()
    for t in threads:
        t.join(30)
    assert sorted(map(sorted, solved)) == [[1, 1, 1, 2], [1, 1, 1, 7], [3, 4, 5, 6]]


def test_the_many_helpers_give_each_matrix_the_bits_of_a_call_of_its_own_on_the_cpu():
    # gram_svd_many / polar_gram_many / truncated_svd_deflated_many ask for their eigensolves together (on CUDA in
    # cuSOLVER's batches); elsewhere each result must be the single call's, bit for bit: tall and wide matrices, one
    # whose kept spectrum needs the float64 pass, a zero matrix, rank 0.
    g = torch.Generator().manual_seed(3)
    steep = (torch.randn(40, 12, generator=g) * torch.logspace(0, -3, 12)) @ torch.randn(12, 12, generator=g)
    mats = [torch.randn(40, 12, generator=g), torch.randn(12, 30, generator=g), steep, torch.zeros(20, 8)]
    for rank in (0, 3, None):
        for one, many in zip([linalg.gram_svd(m, rank) for m in mats], linalg.gram_svd_many(mats, rank)):
            assert all(torch.equal(a, b) for a, b in zip(one, many))
    shaped = [torch.randn(30, 9, generator=g), torch.randn(9, 30, generator=g), steep]
    for one, many in zip([linalg.polar_gram(m) for m in shaped], linalg.polar_gram_many(shaped)):
        assert torch.equal(one, many)
    basis = torch.linalg.qr(torch.randn(40, 5, generator=g)).Q
    square = torch.linalg.qr(torch.randn(12, 12, generator=g)).Q
    for b, comp, ms in ((basis, None, [mats[0], steep]), (square[:, :4], square[:, 4:], [steep[:12], mats[0][:12]])):
        for exact in (False, True):
            single = [linalg.truncated_svd_deflated(m, b, 3, complement=comp, exact=exact) for m in ms]
            for one, many in zip(single, linalg.truncated_svd_deflated_many(ms, b, 3, complement=comp, exact=exact)):
                assert all(torch.equal(a, c) for a, c in zip(one, many))


def test_a_matrix_that_does_not_converge_fails_its_own_asker_only():
    # cuSOLVER reports non-convergence per matrix (info); the batch's other matrices are valid and go to their askers.
    from studio._cusolver import Batcher, SolveError, _Request

    def solve(stack):
        w, v = torch.linalg.eigh(stack.nan_to_num(0.0))
        bad = [i for i, x in enumerate(stack) if bool(torch.isnan(x).any())]
        if bad:
            raise SolveError("did not converge", bad, w, v)
        return w, v

    batcher = Batcher(solve, size=4)
    good = [_sym(6, torch.linspace(3, 1, 6), seed=s, dtype=torch.float64) for s in range(2)]
    bad = good[0].clone()
    bad[1, 1] = float("nan")
    requests = [_Request(good[0]), _Request(bad), _Request(good[1])]
    batcher._run(requests)
    assert all(r.done for r in requests)
    assert isinstance(requests[1].error, SolveError) and requests[1].result is None
    assert "6 x 6 float64" in str(requests[1].error)
    for r, m in ((requests[0], good[0]), (requests[2], good[1])):
        assert r.error is None and torch.equal(r.result[0], torch.linalg.eigh(m)[0])


def test_a_cusolver_status_error_turns_the_batched_solver_off_and_solves_elsewhere(monkeypatch):
    # A status other than success is the library's refusal, not the matrices': the process falls back to the single
    # solves (the host's LAPACK or torch.linalg.eigh), with a warning, and stops asking cuSOLVER.
    from studio import _cusolver

    def refuse(mats):
        raise _cusolver.CusolverError("cuSOLVER cusolverDnXsyevBatched failed with status 7")

    monkeypatch.setattr(_cusolver, "_lib", object())
    monkeypatch.setattr(_cusolver, "eigh_many", refuse)
    monkeypatch.setattr(_lapack, "_batched", lambda g: _cusolver.available())
    mats = [_sym(8, torch.linspace(4, 1, 8), seed=s, dtype=torch.float64) for s in range(3)]
    with pytest.warns(RuntimeWarning, match="batched eigensolver is off for this process: .*status 7"):
        got = _lapack.eigh_top_many(mats, 2)
    assert not _cusolver.available()
    for (w, v), m in zip(got, mats):
        want_w, want_v = _lapack.eigh_top(m, 2)
        assert torch.equal(w, want_w) and torch.equal(v, want_v)
    assert [w.shape for w, _ in _lapack.eigh_many(mats)] == [(8,)] * 3   # no second warning, no cuSOLVER call


def test_gram_svd_many_takes_functions_that_make_the_matrices_with_the_same_bits():
    # LayerTasks.svds hands gram_svd_many functions that make each task matrix when needed (so that a thread holds
    # one at a time): each is called for the Gram matrix, a float64 second pass where needed and U = A V / S, and the
    # results are those of the matrices themselves, bit for bit.
    g = torch.Generator().manual_seed(5)
    steep = (torch.randn(40, 12, generator=g) * torch.logspace(0, -3, 12)) @ torch.randn(12, 12, generator=g)
    tall = torch.randn(40, 12, generator=g)
    mats = [tall, torch.randn(12, 30, generator=g), steep, torch.zeros(20, 8), steep.mT.contiguous(),
            tall.double(), tall.bfloat16(), tall * 1e-25, tall * 1e25]   # wide + float64 pass, tiny, huge
    calls = [0] * len(mats)

    def maker(j):
        def make():
            calls[j] += 1
            return mats[j].clone()
        return make

    for rank in (0, 3, None):
        calls[:] = [0] * len(mats)
        given = linalg.gram_svd_many(mats, rank)
        made = linalg.gram_svd_many([maker(j) for j in range(len(mats))], rank)
        for one, two in zip(given, made):
            assert all(torch.equal(a, b) for a, b in zip(one, two))
        for m, (U, S, Vh) in zip(mats, given):   # and right: against LAPACK's float64 SVD
            want = torch.linalg.svdvals(m.double())[:S.numel()]
            atol = 1e-6 * float(want.max()) if want.numel() else 0.0
            torch.testing.assert_close(S.double(), want, rtol=1e-5, atol=atol)
        if rank is None:
            assert calls[2] == 3 and calls[0] == 2   # steep: Gram, float64 pass, U; the others: Gram, U
            assert calls[8] == 3   # huge: its float32 Gram overflows, the float64 one is made before any solve, then U


def test_requests_queued_behind_a_refused_batch_fall_back_too(monkeypatch):
    # cuSOLVER refuses a call: the thread that saw it turns the batched solver off, and every request still queued
    # behind that batch, from other threads, falls back to the single solves too instead of failing.
    from concurrent.futures import ThreadPoolExecutor

    from studio import _cusolver

    gate, refused = threading.Event(), []

    def eigh_batched(stack, overwrite=False):
        if _cusolver._lib is None:
            return None
        gate.wait(30)   # the first batch waits until every thread has queued its matrix
        refused.append(1)
        raise _cusolver.CusolverError("cuSOLVER cusolverDnXsyevBatched failed with status 7")

    monkeypatch.setattr(_cusolver, "_lib", object())
    monkeypatch.setattr(_cusolver, "eigh_batched", eigh_batched)
    monkeypatch.setattr(_cusolver, "_batcher", _cusolver.Batcher(_cusolver._solve_stack, size=2, slots=1))
    monkeypatch.setattr(_lapack, "_batched", lambda g: _cusolver.available())
    mats = [_sym(6, torch.linspace(3, 1, 6), seed=s, dtype=torch.float64) for s in range(5)]
    with ThreadPoolExecutor(5) as ex, pytest.warns(RuntimeWarning, match="status 7"):
        futures = [ex.submit(_lapack.eigh_many, [m]) for m in mats]
        import time

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(len(q) for q in _cusolver._batcher._pending.values()) < 4:
            time.sleep(0.005)
        gate.set()
        results = [f.result(30) for f in futures]
    assert len(refused) == 1 and not _cusolver.available()
    for m, [(w, v)] in zip(mats, results):
        assert torch.equal(w, _lapack.eigh(m)[0])


def test_stats_reports_the_process_batchers_counters(monkeypatch):
    from studio import _cusolver

    monkeypatch.setattr(_cusolver, "_batcher", None)
    assert _cusolver.stats() == {"batches": 0, "matrices": 0, "seconds": 0.0, "size": 0}
    batcher = _cusolver.Batcher(torch.linalg.eigh, size=4)
    monkeypatch.setattr(_cusolver, "_batcher", batcher)
    batcher.solve([torch.eye(3, dtype=torch.float64)] * 5)
    found = _cusolver.stats()
    assert found["batches"] == 2 and found["matrices"] == 5 and found["size"] == 4 and found["seconds"] >= 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eigh_without_overwrite_keeps_a_column_major_input(dtype):
    """overwrite=False must copy whatever the layout: a column-major (transposed) argument is the buffer LAPACK would
    work in, and was the caller's memory if _lapack_buffer handed it over without being asked to."""
    G = _sym(60, torch.linspace(5, 1, 60), seed=9, dtype=dtype)
    G = (G + G.mT) / 2
    F = G.clone().mT.contiguous().mT                                  # the same matrix, column-major
    kept = F.clone()
    w, v = _lapack.eigh(F)
    w_top, _ = _lapack.eigh_top(F, 5)                                 # syevr path (k <= n / 4)
    assert torch.equal(F, kept)
    assert torch.equal(w, _lapack.eigh(G)[0]) and torch.equal(w_top, _lapack.eigh_top(G, 5)[0])


def test_eigh_of_an_empty_matrix_and_gram_svd_of_an_empty_layer():
    for dtype in (torch.float32, torch.float64):
        w, v = _lapack.eigh(torch.zeros(0, 0, dtype=dtype))           # LAPACK refuses lda = 0: torch's solver
        assert w.shape == (0,) and v.shape == (0, 0)
    U, S, Vh = linalg.gram_svd(torch.zeros(5, 0))
    assert U.shape == (5, 0) and S.shape == (0,) and Vh.shape == (0, 0)
