"""CPU fast paths for the kernels that dominate the spectral methods: Gram matrices, eigensolves and products.

PyTorch's CPU backend forms ``A^T A`` with a general matrix product (twice the work of BLAS ``syrk``) and offers
only the full symmetric eigensolver (LAPACK ``syevd``), although TSV-M keeps 1/T of the spectrum and Ortho-Merge 5
components. Here:

* :func:`gram` forms ``A^T A`` with NumPy's matmul, which calls BLAS ``syrk`` for a product of a matrix with its
  own transpose (measured 12-22 ms vs 30 ms for ``[3072, 768]`` float32 on one core);
* :func:`eigh_top` computes only the top ``k`` eigenpairs with LAPACK's ``syevr`` (MRRR, as accurate as ``syevd``;
  measured 23-30 ms vs 31-45 ms for ``k = 96`` of ``768``, 19 ms vs 31-54 ms for ``k = 5``), calling SciPy's
  exported LAPACK (``scipy.linalg.cython_lapack``) through :mod:`ctypes` so the GIL is released and the merge's
  worker threads run in parallel (SciPy's own ``scipy.linalg.eigh`` holds the GIL, which would serialise them);
* :func:`eigh` (all eigenpairs, ``syevd``, the same way) and :func:`matmul` (NumPy's matmul) run on OpenBLAS
  because PyTorch's CPU wheels use MKL, which takes its AVX2 code path on AMD processors, where OpenBLAS picks the
  kernel for the processor (float64 ``768 x 768`` eigensolve 76 vs 53 ms, float32 ``3072 x 768 x 768`` product 40
  vs 17 ms on the development machine's AVX-512 cores).

All fall back to PyTorch (same results to rounding) for non-CPU tensors or when SciPy is missing, except CUDA
eigensolves of up to :data:`HOST_EIGH_MAX` rows, which LAPACK solves on the host (:func:`_on_host`). Nothing here
knows about merging.

All run NumPy's and SciPy's bundled OpenBLAS on one thread (:func:`one_blas_thread`). The two wheels bundle
separate OpenBLAS builds, each with a pool of one thread per core whose threads spin after every call; alternating
``gram`` (NumPy's) and ``eigh_top`` (SciPy's) then starves each call of its core: TSV-M's merge with one PyTorch
thread took 63.9 s instead of 31.1 s on the 2-core machine (``bench --threads 1``), and eight ``gram_svd`` of
``[3072, 768]`` on the main thread 0.72-1.07 s instead of 0.47-0.50 s.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading
from typing import Callable, Iterator

import numpy as np
import threadpoolctl
import torch
from torch import Tensor

__all__ = ["gram", "matmul", "eigh", "eigh_many", "eigh_top", "eigh_top_many", "have_syevr", "load_cuda_solvers",
           "one_blas_thread"]

_CHAR, _INT = ctypes.c_char_p, ctypes.POINTER(ctypes.c_int)


def _scipy_lapack(name: str, *args: type) -> Callable | None:
    """ctypes handle on SciPy's exported LAPACK routine ``name`` (``scipy.linalg.cython_lapack``) taking the
    argument types ``args``, or None where SciPy is missing."""
    try:
        from scipy.linalg import cython_lapack

        capsule = cython_lapack.__pyx_capi__[name]
    except (ImportError, AttributeError, KeyError):  # pragma: no cover - SciPy is a dependency; degrade to torch
        return None
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return ctypes.CFUNCTYPE(None, *args)(get_pointer(capsule, get_name(capsule)))


def _real(dtype: str) -> type:
    return ctypes.POINTER(ctypes.c_float if dtype == "float32" else ctypes.c_double)


@functools.lru_cache(maxsize=None)
def _syevr(dtype: str) -> Callable | None:
    """ctypes handle on SciPy's ``ssyevr`` / ``dsyevr`` (``dtype`` ``"float32"`` / ``"float64"``), or None."""
    real = _real(dtype)
    # jobz, range, uplo, n, a, lda, vl, vu, il, iu, abstol, m, w, z, ldz, isuppz, work, lwork, iwork, liwork, info
    return _scipy_lapack({"float32": "ssyevr", "float64": "dsyevr"}[dtype], _CHAR, _CHAR, _CHAR, _INT, real, _INT,
                         real, real, _INT, _INT, real, _INT, real, real, _INT, _INT, real, _INT, _INT, _INT, _INT)


@functools.lru_cache(maxsize=None)
def _syevd(dtype: str) -> Callable | None:
    """ctypes handle on SciPy's ``ssyevd`` / ``dsyevd`` (the full divide-and-conquer eigensolver), or None."""
    real = _real(dtype)
    # jobz, uplo, n, a, lda, w, work, lwork, iwork, liwork, info
    return _scipy_lapack({"float32": "ssyevd", "float64": "dsyevd"}[dtype], _CHAR, _CHAR, _INT, real, _INT, real,
                         real, _INT, _INT, _INT, _INT)


def have_syevr() -> bool:
    """Whether the partial LAPACK eigensolver is available (SciPy importable)."""
    return _syevr("float32") is not None


@functools.lru_cache(maxsize=None)
def _blas_controller() -> threadpoolctl.ThreadpoolController:
    """The BLAS libraries loaded in this process, SciPy's LAPACK loaded first (threadpoolctl lists only libraries
    already loaded); built once, since scanning them costs ~1 ms and setting their thread count ~10 us."""
    have_syevr()
    return threadpoolctl.ThreadpoolController().select(user_api="blas")


_limit_lock = threading.Lock()
_limit_depth = 0
_limit = None  # the active threadpoolctl limiter while _limit_depth > 0


def _release_control() -> None:
    """Let any thread set OpenBLAS's limits next. threadpoolctl >= 3.8 lets only one thread (the first to set a
    limit, until its ``with`` block ends) change a process-wide OpenBLAS pool and silently ignores the others; our
    reference-counted limit is set and lifted by whichever thread enters first and leaves last (e.g. two different
    app request threads), so it releases that ownership around each change. Older threadpoolctl has no ownership."""
    openblas = getattr(threadpoolctl, "OpenBLASController", None)
    clear = getattr(openblas, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """NumPy's and SciPy's BLAS run on one thread inside this block, then get their previous thread counts back.

    The limit is process-wide (OpenBLAS's pthreads pool has no per-thread setting), so it is reference-counted:
    blocks entered from several threads at once (the merge's workers, the app's request threads) share one limit,
    set by the first to enter and lifted by the last to leave. PyTorch's own thread count is not touched.

    Example:
        >>> with one_blas_thread():
        ...     {lib["num_threads"] for lib in _blas_controller().info()}
        {1}
    """
    global _limit_depth, _limit
    with _limit_lock:
        if _limit_depth == 0:
            _release_control()
            _limit = _blas_controller().limit(limits=1)
            _release_control()
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0 and _limit is not None:
                _release_control()
                _limit.restore_original_limits()
                _release_control()
                _limit = None


def gram(a: Tensor) -> Tensor:
    """``a^T a`` for a 2-D float32/float64 tensor; BLAS ``syrk`` via NumPy on the CPU, ``a.mT @ a`` elsewhere. An entry
    beyond the dtype's range is ``inf`` without a warning, as on other devices (:func:`studio.linalg.gram_svd`
    checks and redoes it in float64).

    Example:
        >>> gram(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).tolist()
        [[10.0, 14.0], [14.0, 20.0]]
    """
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64) or a.requires_grad:
        return a.mT @ a
    x = a.detach().numpy()
    with one_blas_thread(), np.errstate(over="ignore"):
        return torch.from_numpy(x.T @ x)


def _lapack_buffer(g: Tensor, overwrite: bool) -> np.ndarray:
    """A column-major array holding ``g`` for LAPACK to overwrite (it reads the lower triangle): ``g``'s own memory
    when ``overwrite`` and it is contiguous, else a copy. Row-major memory read column-major is ``g^T``, so LAPACK
    then reads ``g``'s upper triangle: the same numbers for an exactly symmetric ``g`` such as :func:`gram`'s
    (BLAS ``syrk`` computes one triangle and NumPy mirrors it), so the result is the same to the bit."""
    x = g.detach().numpy()
    if overwrite and x.flags.writeable and x.flags.f_contiguous:
        return x
    if overwrite and x.flags.writeable and x.flags.c_contiguous:
        return x.T
    return np.array(x, order="F", copy=True)


def _run_with_workspace(call: Callable[[np.ndarray, np.ndarray], None], ints: dict[str, ctypes.c_int],
                        np_dtype: type, routine: str, n: int) -> None:
    """A LAPACK call with its workspace query first (``lwork = liwork = -1``), then the real call on one BLAS
    thread; raises naming ``routine`` if LAPACK reports an error (``info != 0``)."""
    def checked(work: np.ndarray, iwork: np.ndarray) -> None:
        call(work, iwork)
        if ints["info"].value != 0:
            raise RuntimeError(f"LAPACK {'s' if np_dtype is np.float32 else 'd'}{routine} failed (info = "
                               f"{ints['info'].value}) on a {n} x {n} matrix")

    work, iwork = np.empty(1, dtype=np_dtype), np.empty(1, dtype=np.intc)
    checked(work, iwork)
    ints["lwork"].value, ints["liwork"].value = int(work[0]), int(iwork[0])
    with one_blas_thread():
        checked(np.empty(ints["lwork"].value, dtype=np_dtype), np.empty(ints["liwork"].value, dtype=np.intc))


#: Largest CUDA matrix whose eigendecomposition :func:`eigh` and :func:`eigh_top` hand to the host's LAPACK (see
#: :func:`_on_host`); 0 keeps every CUDA eigensolve on the GPU (``torch.linalg.eigh``, cuSOLVER).
HOST_EIGH_MAX = 1024


def _on_host(g: Tensor) -> bool:
    """Whether a CUDA eigensolve of ``g`` runs on the host instead: a non-empty 2-D float32/float64 matrix of at most
    :data:`HOST_EIGH_MAX` rows, where SciPy's LAPACK is there.

    cuSOLVER's ``syevd`` is bound by its kernels' launch latency at the sizes of CLIP layers: on an H200 one
    ``768 x 768`` eigensolve took 8 ms in either dtype, and a merge needs hundreds of them, independent. The
    merge's worker threads solve them on as many host cores at once (:mod:`studio.parallel`) while the GPU forms
    every Gram matrix and product: 16 host cores solved the top eighth of a ``768 x 768`` float32 Gram matrix in
    5.9 ms per solve, of a ``1024 x 1024`` one in 10.0 against cuSOLVER's 10.5; at 2048 rows cuSOLVER was 2-4x
    faster (docs/PERFORMANCE.md, "CUDA"). The copies of the matrix and its eigenvectors are included in those
    figures.
    """
    return (g.device.type == "cuda" and g.ndim == 2 and 0 < g.shape[-1] <= HOST_EIGH_MAX
            and g.dtype in (torch.float32, torch.float64) and not g.requires_grad
            and _syevd(str(g.dtype).removeprefix("torch.")) is not None)


#: Largest CUDA matrix whose eigendecomposition :func:`eigh_many` and :func:`eigh_top_many` hand to cuSOLVER's
#: batched solver (:func:`_batched`); 0 sends none there.
BATCHED_EIGH_MAX = 1024


def _batched(g: Tensor) -> bool:
    """Whether a CUDA eigensolve of ``g`` asked for through :func:`eigh_many` or :func:`eigh_top_many` goes to
    cuSOLVER's batched solver (:mod:`studio._cusolver`): a non-empty 2-D float32/float64 matrix of at most
    :data:`BATCHED_EIGH_MAX` rows, where that solver is there.

    The batched solver takes the matrices asked for at the same time, from every worker thread, into batches of one
    size (:class:`studio._cusolver.Batcher`); a matrix's bits do not depend on the batch it lands in. It pays where
    a thread asks for several matrices at once (a layer's per-task decompositions): on the H200, batches of 16 from
    16 streams took 1.1 ms per ``768 x 768`` float32 solve, against 8 ms for ``torch.linalg.eigh`` and 5.9 ms for
    the top eighth on 16 host cores; a call takes 40 ms or more whatever its size, so the single solves of
    :func:`eigh` and :func:`eigh_top`, asked for one after another, stay on the host: Iso-CTS, when all its solves
    were batched, took 5.2 s, and 2.3 s on the host (docs/PERFORMANCE.md, "CUDA"); only its per-task residuals,
    asked for 8 at a time since, go to the batches now (not yet measured on a GPU).
    """
    if not (g.device.type == "cuda" and g.ndim == 2 and 0 < g.shape[-1] <= BATCHED_EIGH_MAX
            and g.dtype in (torch.float32, torch.float64) and not g.requires_grad):
        return False
    from . import _cusolver

    return _cusolver.available()


def _batched_many(gs: "list[Tensor]") -> "list[tuple[Tensor, Tensor]] | None":
    """cuSOLVER's batched eigenpairs of every matrix of ``gs`` if all are for it (:func:`_batched`; callers pass
    matrices of one kind, so a matrix's route does not depend on its neighbours), else ``None``. If cuSOLVER refuses
    a call (a status, not a matrix that failed to converge), the batched solver is turned off for the process and
    ``None`` returned: the matrices are then solved as single ones."""
    if not (gs and all(_batched(g) for g in gs)):
        return None
    from . import _cusolver

    try:
        return _cusolver.eigh_many(list(gs))
    except _cusolver.CusolverError as exc:
        _cusolver.disable(str(exc))
        return None


def eigh_many(gs: "list[Tensor]", *, overwrite: bool = False) -> list[tuple[Tensor, Tensor]]:
    """:func:`eigh` of each matrix of ``gs``, except that CUDA matrices go to cuSOLVER's batched solver together
    (:func:`_batched`), even one alone: a matrix decomposed through this function gets the same bits wherever it is
    asked for."""
    found = _batched_many(gs)
    if found is not None:
        return [(w.clone(), v.contiguous()) for w, v in found]
    return [eigh(g, overwrite=overwrite) for g in gs]


def eigh_top_many(gs: "list[Tensor]", k: int, *, overwrite: bool = False) -> list[tuple[Tensor, Tensor]]:
    """:func:`eigh_top` of each matrix of ``gs`` (the same ``k``), asked for together as in :func:`eigh_many`."""
    found = _batched_many(gs)
    if found is not None:
        out = []
        for g, (w, v) in zip(gs, found):
            kk = max(0, min(int(k), g.shape[-1]))
            out.append((w.flip(-1)[:kk].clone(), v.flip(-1)[:, :kk].contiguous()))
        return out
    return [eigh_top(g, k, overwrite=overwrite) for g in gs]


def _host_copy(g: Tensor) -> Tensor:
    """A host copy of the CUDA matrix ``g`` in column-major order (transposed on the GPU first), which LAPACK reads
    in place: its lower triangle is ``g``'s, as for ``torch.linalg.eigh``. A row-major copy would make LAPACK read
    ``g``'s upper triangle, which differs where ``g`` is symmetric only to rounding (a Gram matrix from a general
    product, as on CUDA)."""
    return g.mT.contiguous().mT.cpu()


_solvers_loaded = False
_solvers_lock = threading.Lock()


def load_cuda_solvers(device: "torch.device | str") -> None:
    """Load PyTorch's CUDA linear-algebra library now, once per process, under a lock.

    PyTorch loads it at the first CUDA linear-algebra call; two threads making that call at once failed ("lazy
    wrapper should be called at most once", torch 2.11 on the H200, when the merge's worker threads met it). CUDA
    pools call this on creation and :func:`studio.parallel.parallel_map` before it starts CUDA workers.
    """
    global _solvers_loaded
    device = torch.device(device)
    if _solvers_loaded or device.type != "cuda":
        return
    with _solvers_lock:
        if not _solvers_loaded:
            torch.linalg.eigh(torch.ones(1, 1, device=device))
            _solvers_loaded = True


def eigh_top(g: Tensor, k: int, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of the symmetric matrix ``g``: eigenvalues descending ``[k]``, eigenvectors ``[n, k]``.

    CPU float32/float64 with ``k <= n / 4``: LAPACK ``syevr`` restricted to the index range ``n-k+1..n`` (only
    those ``k`` eigenvectors are computed); a CUDA matrix of at most :data:`HOST_EIGH_MAX` rows is solved so on the
    host (:func:`_on_host`). Otherwise (other devices, larger ``k`` -- where ``syevr`` is slower than
    the full ``syevd``: measured 43 vs 44 ms at k = 192 of 768, 68 vs 43 ms at k = 384 -- or SciPy missing) the full
    :func:`eigh`, sliced. Eigenvector signs are arbitrary, as for any eigensolver. ``overwrite=True``
    lets LAPACK work in ``g``'s own memory (a fresh Gram matrix the caller does not need again, exactly
    symmetric) instead of a copy.

    Example:
        >>> w, v = eigh_top(torch.diag(torch.tensor([1.0, 5.0, 3.0])), 2)
        >>> w.tolist(), v.abs().tolist()
        ([5.0, 3.0], [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    """
    n = g.shape[-1]
    k = max(0, min(int(k), n))
    if _on_host(g):
        evals, evecs = eigh_top(_host_copy(g), k, overwrite=True)   # the copy is ours to overwrite
        return evals.to(g.device), evecs.to(g.device)
    dtype = str(g.dtype).removeprefix("torch.")
    fn = _syevr(dtype) if g.dtype in (torch.float32, torch.float64) else None
    if g.device.type != "cpu" or 4 * k > n or k == 0 or fn is None or g.ndim != 2:
        evals, evecs = eigh(g, overwrite=overwrite)
        return evals.flip(-1)[..., :k], evecs.flip(-1)[..., :k]
    np_dtype = np.float32 if g.dtype == torch.float32 else np.float64
    real = _real(dtype)
    a = _lapack_buffer(g, overwrite)
    w = np.empty(n, dtype=np_dtype)
    z = np.empty((k, n), dtype=np_dtype)  # Fortran n x k, column j = eigenvector j
    isuppz = np.empty(2 * k, dtype=np.intc)
    zero = np.zeros(1, dtype=np_dtype)
    ints = {name: ctypes.c_int(v) for name, v in
            (("n", n), ("lda", n), ("il", n - k + 1), ("iu", n), ("ldz", n), ("m", 0), ("lwork", -1),
             ("liwork", -1), ("info", 0))}

    def call(work: np.ndarray, iwork: np.ndarray) -> None:
        p = lambda arr: arr.ctypes.data_as(real)  # noqa: E731
        fn(b"V", b"I", b"L", ctypes.byref(ints["n"]), p(a), ctypes.byref(ints["lda"]), p(zero), p(zero),
           ctypes.byref(ints["il"]), ctypes.byref(ints["iu"]), p(zero), ctypes.byref(ints["m"]), p(w), p(z),
           ctypes.byref(ints["ldz"]), isuppz.ctypes.data_as(_INT), p(work), ctypes.byref(ints["lwork"]),
           iwork.ctypes.data_as(_INT), ctypes.byref(ints["liwork"]), ctypes.byref(ints["info"]))

    _run_with_workspace(call, ints, np_dtype, "syevr", n)
    if ints["m"].value != k:
        raise RuntimeError(f"LAPACK syevr returned {ints['m'].value} eigenpairs, expected {k}")
    evals = torch.from_numpy(w[:k][::-1].copy())
    evecs = torch.from_numpy(z[::-1].T.copy())
    return evals, evecs


def _blas_operand(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and t.ndim == 2 and not t.requires_grad


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; for 2-D float32/float64 CPU tensors through NumPy's BLAS (OpenBLAS) on one thread.

    PyTorch's CPU wheels multiply with MKL, which takes its AVX2 code path on AMD processors; OpenBLAS picks its
    kernel for the processor it runs on (AVX-512 on the development machine). Elsewhere (other devices, dtypes,
    batched or autograd tensors) this is ``a @ b``.

    Example:
        >>> matmul(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])).tolist()
        [[11.0]]
    """
    if not (_blas_operand(a) and _blas_operand(b) and a.dtype == b.dtype):
        return a @ b
    x, y = a.detach().numpy(), b.detach().numpy()
    # overflow gives inf as torch's product does, without NumPy's RuntimeWarning (callers check what they need)
    with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
        return torch.from_numpy(x @ y)


def eigh(g: Tensor, *, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """All eigenpairs of the symmetric matrix ``g`` (its lower triangle), ascending, like ``torch.linalg.eigh``.

    On the CPU (2-D float32/float64) LAPACK's divide-and-conquer ``syevd`` from SciPy's OpenBLAS through
    :mod:`ctypes` (the GIL is released, so worker threads run in parallel), also for a CUDA matrix of at most
    :data:`HOST_EIGH_MAX` rows (:func:`_on_host`); elsewhere ``torch.linalg.eigh``.
    ``overwrite=True`` lets LAPACK work in ``g``'s memory (the eigenvectors then share it) instead of a copy; ``g``
    must then be exactly symmetric, as :func:`gram`'s results are.

    Example:
        >>> w, v = eigh(torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
        >>> [round(x, 12) for x in w.tolist()], round(abs(float(v[0, 1] * v[1, 1])), 12)
        ([1.0, 3.0], 0.5)
    """
    if _on_host(g):
        evals, evecs = eigh(_host_copy(g), overwrite=True)
        return evals.to(g.device), evecs.to(g.device)
    dtype = str(g.dtype).removeprefix("torch.")
    fn = _syevd(dtype) if g.dtype in (torch.float32, torch.float64) else None
    n = g.shape[-1]
    if fn is None or not _blas_operand(g) or n == 0:
        return torch.linalg.eigh(g)
    np_dtype = np.float32 if g.dtype == torch.float32 else np.float64
    real = _real(dtype)
    a = _lapack_buffer(g, overwrite)   # the eigenvectors overwrite it, column by column
    w = np.empty(n, dtype=np_dtype)
    ints = {name: ctypes.c_int(v) for name, v in (("n", n), ("lda", n), ("lwork", -1), ("liwork", -1),
                                                   ("info", 0))}

    def call(work: np.ndarray, iwork: np.ndarray) -> None:
        fn(b"V", b"L", ctypes.byref(ints["n"]), a.ctypes.data_as(real), ctypes.byref(ints["lda"]),
           w.ctypes.data_as(real), work.ctypes.data_as(real), ctypes.byref(ints["lwork"]),
           iwork.ctypes.data_as(_INT), ctypes.byref(ints["liwork"]), ctypes.byref(ints["info"]))

    _run_with_workspace(call, ints, np_dtype, "syevd", n)
    return torch.from_numpy(w), torch.from_numpy(a)
