"""pytest plugin: run the test suite with CUDA replaced by a CPU-backed stand-in (:mod:`fakecuda`).

Every non-CPU branch of the library runs (whole-layer blocks, streamed order statistics, the batches of CUDA
eigenproblems (:class:`studio._cusolver.Batcher`, each batch solved by torch's CPU solver), their host copies
(``studio._lapack.BATCHED_EIGH_MAX = 0``) and torch's solvers (and ``HOST_EIGH_MAX = 0``), CUDA generators, resident
device copies, a spectral merge's CUDA worker threads, without streams), and any op that meets a CPU tensor with a
"CUDA" one raises as real CUDA would. It finds device bugs without a GPU; it says nothing about cuSOLVER's numerics
or speed.

    PYTHONPATH=tools/fakecuda .venv/bin/python -m pytest -p fakecuda_plugin -p no:cacheprovider \\
        --deselect tests/test_app_browser.py
"""

import fakecuda


def pytest_configure(config):
    fakecuda.install()
    import studio  # noqa: F401  (imported after the patches)
    fakecuda.patch_studio()
    fakecuda.patch_optim()


def pytest_sessionfinish(session, exitstatus):
    fakecuda.report()
