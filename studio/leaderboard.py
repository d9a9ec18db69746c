"""Leaderboard: every registered merging method on a suite, alpha validated, accuracies on test.

    python -m studio.leaderboard [--suite assets/minisuite] [--out leaderboard.md] [--methods ...] [--json out.json]

Protocol (TSV / Iso-C papers): for a method with a global scale (a ``post_scale`` parameter, e.g. ``alpha``) the
scale is chosen on the **validation** split by average normalized accuracy over a grid
(:func:`studio.evaluate.alpha_sweep`);
methods without one use their default hyperparameters. Every calibration (``svc``, ``align_merge_b``, ...) is
listed applied on Task Arithmetic, as the SVC paper reports it. The chosen merge is evaluated on the **test**
split. Zero-shot and individual (each expert on its own task) rows are references.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .evaluate import EvalResult, alpha_sweep, evaluate, post_scale_param
from .schema import StudioError, json_safe

DEFAULT_ALPHAS = [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0]


@dataclass
class Row:
    """One leaderboard line."""

    label: str
    alpha: float | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    avg_accuracy: float = float("nan")
    avg_normalized: float = float("nan")
    seconds: float = 0.0
    error: str | None = None


def _grid_for(method: str, alphas: Sequence[float]) -> list[float]:
    """The sweep grid clipped to the method's declared range for its scale parameter; none of ``alphas`` in it is
    an error (the row fell back to the method's default, under a header saying it was chosen on validation)."""
    from .registry import get_method
    from .schema import HyperparameterError

    spec = get_method(method)
    p = next(p for p in spec.params if p.post_scale)
    lo = -math.inf if p.low is None else p.low
    hi = math.inf if p.high is None else p.high
    grid = [a for a in alphas if (lo < a if p.low_open else lo <= a) and a <= hi]
    if not grid:
        raise HyperparameterError(f"{method}: none of the scales {list(alphas)} is in its '{p.name}' range "
                                  f"{p.range_text()}; give --alphas in it")
    return grid


def _row(label: str, res: EvalResult, alpha: float | None, seconds: float) -> Row:
    return Row(label, alpha, dict(res.accuracy), res.avg_accuracy, res.avg_normalized, seconds)


def _runs(methods: Sequence[str] | None, calibrations: Sequence[str] | None) -> list[tuple[str, str, str | None]]:
    """The merge rows, ``(label, method, calibration)``: each method (default: every one registered), then Task
    Arithmetic with each calibration (default: every one registered)."""
    from .registry import CALIBRATIONS, METHODS, get_method

    get_method("task_arithmetic")  # imports every method module
    methods = list(METHODS) if methods is None else list(methods)
    calibrations = list(CALIBRATIONS) if calibrations is None else list(calibrations)
    return [(m, m, None) for m in methods] + [(f"task_arithmetic + {c}", "task_arithmetic", c) for c in calibrations]


def run(suite: Any, *, methods: Sequence[str] | None = None, calibrations: Sequence[str] | None = None,
        alphas: Sequence[float] = DEFAULT_ALPHAS, device: Any = None, log: Any = print) -> list[Row]:
    """Evaluate zero-shot, the individual experts and every method (see the module docstring)."""
    from .engine import merge

    rows: list[Row] = []
    zs = evaluate(suite, suite.base, split="test", device=device)
    rows.append(Row("Zero-shot", None, dict(zs.zeroshot_accuracy),
                    EvalResult._mean(zs.zeroshot_accuracy), zs.avg_normalized))
    indiv = dict(zs.expert_accuracy)
    rows.append(Row("Individual (experts)", None, indiv, EvalResult._mean(indiv), 100.0))
    for label, method, calibrate in _runs(methods, calibrations):
        t0 = time.perf_counter()
        try:
            extra = {"calibrate": calibrate} if calibrate else {}
            if post_scale_param(method) is not None:
                sweep = alpha_sweep(suite, method, _grid_for(method, alphas), split="validation", device=device,
                                    **extra)
                alpha = sweep.best_alpha
                merged = merge(suite.base, suite.experts, method, **{sweep.param: alpha}, **extra)
            else:
                alpha = None
                merged = merge(suite.base, suite.experts, method, **extra)
            res = evaluate(suite, merged, split="test", device=device)
            rows.append(_row(label, res, alpha, time.perf_counter() - t0))
            log(f"{label:32s} alpha={alpha!s:5s} avg acc {res.avg_accuracy:6.2f}  avg norm {res.avg_normalized:6.2f}"
                f"  ({time.perf_counter() - t0:.1f} s)")
        except StudioError as exc:
            rows.append(Row(label, error=str(exc), seconds=time.perf_counter() - t0))
            log(f"{label:32s} failed: {exc}")
    return rows


def to_markdown(suite: Any, rows: Sequence[Row], alphas: Sequence[float] | None = None) -> str:
    """The leaderboard as a markdown table (accuracies in %, test split); ``alphas``: the scales searched, named under
    the title (each method's grid keeps those in its range)."""
    tasks = list(suite.task_names)
    head = "| Method | scale | " + " | ".join(tasks) + " | Avg abs | Avg norm |"
    sep = "|" + "---|" * (len(tasks) + 4)
    searched = "" if alphas is None else f" (searched: {', '.join(f'{a:g}' for a in alphas)}, each in its range)"
    lines = [f"## {suite.name} leaderboard (test split, accuracy %)", "",
             f"scale: the method's global scale (alpha; lam for AlignMerge) chosen on the validation split by average "
             f"normalized accuracy{searched}; methods without one use their defaults.", "", head, sep]
    for r in rows:
        if r.error:
            lines.append(f"| {r.label} | - | " + " | ".join("-" for _ in tasks) + f" | failed: {r.error} | - |")
            continue
        alpha = "-" if r.alpha is None else f"{r.alpha:g}"
        cells = " | ".join(f"{r.accuracy.get(t, float('nan')):.1f}" for t in tasks)
        lines.append(f"| {r.label} | {alpha} | {cells} | {r.avg_accuracy:.2f} | {r.avg_normalized:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None, prog: str = "python -m studio.leaderboard") -> None:
    """Command-line entry point (``prog``: the command's name in its usage line)."""
    from .registry import UnknownMethodError, get_calibration, get_method
    from .suite import DEFAULT_SUITE_PATH, load_suite

    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0] + " Each row is merged and "
                                 "evaluated at every alpha: all rows take minutes on a laptop CPU.")
    ap.add_argument("--suite", default=str(DEFAULT_SUITE_PATH), help="suite folder or Hub repo id")
    ap.add_argument("--out", default="leaderboard.md", help="markdown file to write")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--methods", nargs="+", default=None, help="merging methods (default: all registered)")
    ap.add_argument("--calibrations", nargs="*", default=None, help="calibrations on Task Arithmetic (default: all)")
    ap.add_argument("--alphas", nargs="+", type=float, default=DEFAULT_ALPHAS,
                    help="the scales each row is validated at (default: %(default)s)")
    ap.add_argument("--device", default=None,
                    help="cpu or cuda (default: $MERGE_STUDIO_DEVICE, else CUDA when present)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch (0 = torch's default; 1 is faster on a busy shared CPU)")
    args = ap.parse_args(argv)
    if args.threads < 0:   # as the bench (it was taken as 0)
        ap.error(f"--threads must be 0 (torch's default) or a number of threads, got {args.threads}")
    try:   # every name before any row runs (a misspelt one became a failed row after minutes of the others)
        for name in args.methods or []:
            get_method(name)
        for name in args.calibrations or []:
            get_calibration(name)
    except UnknownMethodError as exc:
        ap.error(str(exc))
    bad = [a for a in args.alphas if not math.isfinite(a) or a < 0]
    if bad:   # each method's grid keeps the scales in its range: these would silently fall back to its default
        ap.error(f"--alphas: {bad} are not scales; give finite numbers >= 0")
    scaled = [m for _, m, _ in _runs(args.methods, args.calibrations) if post_scale_param(m) is not None]
    for name in dict.fromkeys(scaled):   # each row's grid, before any row runs
        try:
            _grid_for(name, args.alphas)
        except StudioError as exc:
            ap.error(f"--alphas: {exc}")
    from .io import atomic_write, check_writable, refuse_overwriting

    if args.json is not None and Path(args.json).resolve() == Path(args.out).resolve():
        raise StudioError(f"--out and --json are both {args.out}; give two file names")
    refuse_overwriting([args.out, args.json], suite=args.suite)   # before minutes of merges, not after
    for out in filter(None, (args.out, args.json)):   # and where they can be written (a failed write came last)
        check_writable(out)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    suite = load_suite(args.suite)
    rows = run(suite, methods=args.methods, calibrations=args.calibrations, alphas=args.alphas, device=args.device)
    text = to_markdown(suite, rows, args.alphas)
    with atomic_write(Path(args.out)) as tmp:   # never half-written; the JSON first, inside: both files or neither
        Path(tmp).write_text(text)
        if args.json:
            with atomic_write(Path(args.json)) as tmp_json:
                Path(tmp_json).write_text(json.dumps(json_safe([r.__dict__ for r in rows]), indent=2,
                                                     allow_nan=False))
    print(text)


if __name__ == "__main__":
    main()
