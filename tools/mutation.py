"""Mutation testing: apply each mutant of ``tools/mutants.py`` to a scratch copy of the working tree,
run the tests, and report which test killed it (or that none did).

    python tools/mutation.py                      # every mutant (3-5 hours on 2 cores)
    python tools/mutation.py L06 tsv5 c_dare      # some, by id
    python tools/mutation.py --list               # the mutants, without running them

Each mutant runs the doctests of the file it changes, then the core test files below with ``-x`` (stopping at the
first failure; the module's own files first, :data:`OWN`), in a copy of ``studio/``, ``tests/`` and ``assets/``, so
the working tree is never changed. A mutant of the page's code (:data:`PAGE`: the app and the browser functions of
its controls) runs the real app's browser tests after them (Chromium; 3 more minutes where the core files miss it).
The unchanged copy runs the core files first (``--no-baseline`` skips that), so that a test failing there is not
read as a kill. A mutant with a reason in ``tools/mutants.py`` is equivalent (no test can tell it from the code) and
is expected to survive; the script exits 1 if any other mutant survives. The parity tests against FusionBench and
mergekit run where those are installed (the ``crosscheck`` extra), as in the suite.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from mutants import MUTANTS  # noqa: E402

#: the test files every mutant runs against, the fast and the broad ones first
CORE = ["tests/test_lapack.py", "tests/test_methods_spectral.py", "tests/test_methods_sparse.py",
        "tests/test_methods_calibration.py", "tests/test_diagnostics.py", "tests/test_engine.py",
        "tests/test_contract.py", "tests/test_crosscheck_mergekit.py", "tests/test_crosscheck_fusionbench.py",
        "tests/test_io_cli.py", "tests/test_suite.py", "tests/test_ui_backend.py", "tests/test_ui_controls.py",
        "tests/test_app_api.py"]

#: the test files of a module, run first (right after its doctests): the core files in an order that reaches a kill
#: sooner (an I/O mutant ran the methods' files for minutes before test_io_cli.py), and a module's own file outside
#: them (the leaderboard's rows are in test_evaluate.py)
OWN = {"studio/io.py": ["tests/test_io_cli.py"], "studio/cli.py": ["tests/test_io_cli.py"],
       "studio/compress.py": ["tests/test_io_cli.py", "tests/test_methods_spectral.py"],
       "studio/ui/controls.py": ["tests/test_ui_controls.py", "tests/test_ui_backend.py"],
       "studio/ui/backend.py": ["tests/test_ui_backend.py", "tests/test_app_api.py"],
       "app.py": ["tests/test_app_api.py"], "studio/suite/build.py": ["tests/test_suite.py"],
       "studio/leaderboard.py": ["tests/test_io_cli.py", "tests/test_evaluate.py"],
       "studio/adapters.py": ["tests/test_adapters.py"], "studio/ui/session.py": ["tests/test_ui_session.py"]}

#: files whose code runs in the page: their mutants run the browser tests too (the whole file: its tests share one
#: page, in order)
PAGE = {"app.py": "tests/test_app_browser.py", "studio/ui/controls.py": "tests/test_app_browser.py"}


def _order(tree: Path, path: str) -> list[str]:
    """What a mutant of ``path`` runs: its doctests, the core files (its own first), then the browser tests for the
    page's code.

    Example:
        >>> _order(ROOT, "studio/cli.py")[:3]
        ['studio/cli.py', 'tests/test_io_cli.py', 'tests/test_lapack.py']
        >>> _order(ROOT, "app.py")[-1]
        'tests/test_app_browser.py'
    """
    own = OWN.get(path, [])
    core = [*own, *[t for t in CORE if t not in own]]
    return [path, *[t for t in core if (tree / t).exists()], *([PAGE[path]] if path in PAGE else [])]


def _copy_tree(dest: Path) -> None:
    for name in ("studio", "tests", "tools"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "app.py"):
        shutil.copy2(ROOT / name, dest / name)
    # a copy, not a link: the embedded suite is recognised by its path under the package's root
    shutil.copytree(ROOT / "assets", dest / "assets")


def _pytest(tree: Path, paths: list[str]) -> tuple[int, list[str], str]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *paths], cwd=tree, env=env, capture_output=True, text=True)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", run.stdout, re.M)
    last = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr.strip()[-200:]
    return run.returncode, failed, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ids", nargs="*", help="mutant ids (default: all)")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the unchanged copy")
    args = parser.parse_args(argv)
    known = {m[0] for m in MUTANTS}
    unknown = [i for i in args.ids if i not in known]
    if unknown:
        parser.error(f"unknown mutant ids {unknown}; --list shows them")
    chosen = [m for m in MUTANTS if not args.ids or m[0] in args.ids]
    if args.list:
        for mid, path, _, _, what, *equivalent in chosen:
            print(f"{mid:8} {path:32} {what}" + (f"  [equivalent: {equivalent[0]}]" if equivalent else ""))
        return 0
    with tempfile.TemporaryDirectory(prefix="mutation-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        print(f"{len(chosen)} mutants, tests in {tree}", flush=True)
        if not args.no_baseline:
            code, failed, last = _pytest(tree, [t for t in CORE if (tree / t).exists()])
            if code != 0:
                print(f"the unchanged copy fails ({failed[:3] or last}): fix that first", flush=True)
                return 2
        surprises = 0
        for mid, path, text, replacement, what, *equivalent in chosen:
            target = tree / path
            original = target.read_text()
            if original.count(text) != 1:
                print(f"{mid:8} STALE    its text occurs {original.count(text)} times in {path}: update "
                      f"tools/mutants.py", flush=True)
                surprises += 1
                continue
            target.write_text(original.replace(text, replacement))
            start = time.perf_counter()
            try:
                code, failed, last = _pytest(tree, _order(tree, path))
            finally:
                target.write_text(original)
            killed = code != 0 and bool(failed)
            if code != 0 and not failed:   # a collection error or a crash: report it, do not count it as a kill
                verdict = f"ERROR    {last}"
                surprises += 1
            elif killed:
                verdict = f"killed   by {failed[0]}" + ("  (listed as equivalent)" if equivalent else "")
            else:
                verdict = "survived" + (f" (equivalent: {equivalent[0]})" if equivalent else "  <- no test tells it")
                surprises += not equivalent
            print(f"{mid:8} {verdict}  [{time.perf_counter() - start:.0f} s] {what}", flush=True)
    print("every non-equivalent mutant was killed" if not surprises else f"{surprises} mutants need a look")
    return 1 if surprises else 0


if __name__ == "__main__":
    sys.exit(main())
