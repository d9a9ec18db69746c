"""Command-line interface: ``merge-studio`` (or ``python -m studio``).

    merge-studio methods [--json]                      # every method with its hyperparameter schema
    merge-studio merge --suite assets/minisuite --method tsv_m --set alpha=1.0 --out merged.safetensors
    merge-studio merge --base base.safetensors --expert cars=cars.safetensors --expert dtd=dtd.safetensors \\
                       --method ties --set k=0.2 --calibrate svc --out merged.safetensors --recipe merged.yaml
    merge-studio recipe merged.yaml --out again.safetensors   # the suite or the --base/--expert sources it recorded
    merge-studio evaluate --suite assets/minisuite --weights merged.safetensors [--split test]
    merge-studio diagnose --suite MiniSuite --method tsv_m --out diagnostics.json   # or --weights merged.safetensors
    merge-studio bench [...]   merge-studio leaderboard [...]   merge-studio build-suite [...]
                                                       # their own options, e.g. bench --model ViT-L-14 --tasks 20
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple

import yaml

from . import __version__, adapters
from .io import (PICKLE_SUFFIXES, CheckpointError, Recipe, YamlLoader, atomic_write, check_fingerprints,
                 check_recipe_path, check_weights_path, check_writable, checkpoint_files, fingerprint, hub_spec,
                 input_fingerprints, is_hub_url, is_local_path, load_checkpoint, load_state_dict,
                 looks_like_safetensors, merge_from_recipe, path_errors, read_metadata, recipe_inputs,
                 refuse_overwriting, save_merged, save_state_dict, shown_path)
from .layers import RULES
from .memory import keep_freed_memory
from .registry import get_calibration, get_method, list_methods
from .schema import StudioError, brief, json_safe, validate_hparams


def methods_table(markdown: bool = True) -> str:
    """The docs table of every method and calibration, derived from the schemas (single source of truth)."""
    lines = ["| method | kind | hyperparameters (default, range) | paper |", "|---|---|---|---|"]
    for m in list_methods():
        params = "; ".join(
            f"`{p['name']}` = {p['auto'] if p['default'] is None and p['auto'] else p['default']}"
            + (f" in {p['range']}" if p.get("range") else "")   # as the errors write it
            + (f" of {p['choices']}" if p["choices"] else "")
            for p in m["params"]
        ) or "none"
        cells = [f"`{m['name']}`", m["kind"], params, m["paper"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # |T| must not split cells
    return "\n".join(lines) if markdown else json.dumps(list_methods(), indent=2)


def _parse_sets(items: list[str], option: str = "--set") -> dict[str, Any]:
    """``NAME=VALUE`` pairs; a value is read as YAML (``true``, ``0.3``, ``[1, 2]``) with YAML 1.2's numbers
    (:class:`studio.io.YamlLoader`: ``1e-1`` is a number, ``1:30`` text), and a YAML string that is a number in
    Python's syntax (``inf``) as that number.

    Example:
        >>> _parse_sets(["alpha=1e-1", "k=0.2", "merge_func=mean", "ties_consensus=true"])
        {'alpha': 0.1, 'k': 0.2, 'merge_func': 'mean', 'ties_consensus': True}
        >>> _parse_sets(["tau=inf", "alpha=-Infinity"])   # YAML's text, Python's numbers: the schema names the range
        {'tau': inf, 'alpha': -inf}
    """
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise StudioError(f"{option} expects NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        try:
            parsed = yaml.load(value, Loader=YamlLoader)
        except yaml.YAMLError as exc:
            raise StudioError(f"{option} {item!r}: the value is not valid YAML ({exc.problem or exc})") from None
        if isinstance(parsed, str):
            with contextlib.suppress(ValueError):
                parsed = float(parsed)
        if name.strip() in out:
            raise StudioError(f"{option} {item!r}: {name.strip()!r} was already set to {out[name.strip()]!r}; give "
                              f"each hyperparameter once")
        out[name.strip()] = parsed
    return out


def _parse_preferences(text: str | None) -> dict[str, float] | None:
    """``--preferences``: a JSON mapping expert name -> weight."""
    if text is None:
        return None
    repeated: list[str] = []

    def mapping(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        names = [name for name, _ in pairs]
        repeated.extend(sorted({n for n in names if names.count(n) > 1}))
        return dict(pairs)

    try:
        prefs = json.loads(text, object_pairs_hook=mapping)
    except json.JSONDecodeError as exc:
        raise StudioError(f"--preferences {text!r} is not valid JSON ({exc.msg}); expected e.g. '{{\"cars\": 2}}'") \
            from None
    except RecursionError:
        raise StudioError(f"--preferences {brief(text)} is nested too deeply; expected e.g. '{{\"cars\": 2}}'") \
            from None
    if not isinstance(prefs, dict):
        raise StudioError(f"--preferences must be a JSON mapping of expert names to weights, got {text!r}")
    if repeated:
        raise StudioError(f"--preferences names {repeated} more than once; give each expert's weight once")
    if not prefs:
        raise StudioError("--preferences {} names no expert; leave it out for uniform weights, or give some "
                          "experts' weights (the others get 0)")
    return prefs


class _Pool(NamedTuple):
    """What the pool options (and a replayed recipe) name: the base and the experts, the suite's source as a recipe
    records it (or None), for --base/--expert the checkpoints' sources as a recipe records them (see
    :func:`_load_sources`), which inputs the options chose over a replayed recipe's (expert names; None: the
    base), and the files each was read from (in the shape of ``sources``, for messages)."""

    base: dict
    experts: dict
    suite: str | None
    sources: dict | None
    replaced: frozenset
    files: dict
    everyone: tuple = ()   # a suite's task names, of which ``experts`` may be the recipe's (read alone)


def _load_pool(args: argparse.Namespace, recipe: Recipe | None = None) -> _Pool:
    """The checkpoints the pool options name (:class:`_Pool`).

    With a ``recipe`` (``merge-studio recipe``): its suite when no option names checkpoints, else its recorded
    source for the base and for each expert the options leave out, and its prefix."""
    if args.suite and (args.base or args.expert):
        raise StudioError("give either --suite, or --base and --expert checkpoints, not both")
    if args.prefix is not None and (args.suite or not args.prefix):
        raise StudioError("--prefix applies to --base and --expert checkpoints (a suite's are used whole) and must "
                          "not be empty")
    suite_source = args.suite
    recorded_suite = recipe is not None and recipe.suite and not (args.suite or args.base or args.expert)
    if recorded_suite:
        suite_source = recipe.suite
    if args.experts is not None and not suite_source:
        raise StudioError("--experts selects experts of a --suite; with --base/--expert, give only the experts to "
                          "merge")
    if suite_source:
        from .suite import load_suite

        with _noting(recorded_suite and "the suite the recipe recorded; give --suite, or --base and --expert, to "
                                        "read others"):
            suite = load_suite(suite_source)
        # a recipe's experts alone: an expert it did not merge is not read (nor its file's fault an error); one the
        # suite lacks is named with the suite's (the replay's message listed the ones read: "have ['digits']")
        lacking = [] if recipe is None else [e for e in recipe.experts if e not in suite.task_names]
        if lacking:
            raise StudioError(f"the recipe merges expert(s) {lacking} that the suite {suite.source} lacks; it has "
                              f"{suite.task_names}")
        wanted = ([t for t in suite.task_names if t in recipe.experts] if recipe is not None and recipe.experts
                  else suite.task_names)
        if args.experts is not None:
            wanted = [e.strip() for e in args.experts.split(",") if e.strip()]
            if not wanted:
                raise StudioError(f"--experts {args.experts!r} names no expert; give some of the suite's "
                                  f"{suite.task_names}, comma-separated")
            twice = sorted({e for e in wanted if wanted.count(e) > 1})
            if twice:
                raise StudioError(f"--experts names {twice} more than once; give each expert once")
        experts = suite.experts_named(wanted)   # only those (an expert left out is not read); names an unknown one
        replaced = frozenset() if recorded_suite else frozenset({None, *experts})
        return _Pool(suite.base, experts, suite.source, None, replaced, suite.weight_files, tuple(suite.task_names))
    given = _given_experts(args)
    prefix = args.prefix if recipe is None else recipe.prefix
    if recipe is not None and recipe.experts:
        unknown = [name for name in given if name not in recipe.experts]
        if unknown:
            raise StudioError(f"--expert {unknown[0]!r}: the recipe merges {recipe.experts}; name one of those")
    recorded = recipe.sources if recipe is not None else None
    if recorded:   # the recipe's own source for whatever the options leave out
        base = args.base or recorded["base"]
        sources = {name: given.get(name, source) for name, source in recorded["experts"].items()}
        from_recipe = {name for name in sources if name not in given} | (set() if args.base else {None})
    elif not args.base or not given:
        why = "" if recipe is None else " (the recipe records no suite and no checkpoint sources)" \
            if not recipe.suite else f" (the recipe merged the suite {recipe.suite}; checkpoints replace all of it)"
        raise StudioError(f"give either --suite, or --base and at least one --expert NAME=SOURCE{why}")
    else:
        base, sources, from_recipe = args.base, given, set()
    base_sd, experts, pinned = _load_sources(base, sources, prefix, from_recipe)
    return _Pool(base_sd, experts, None, pinned, frozenset({None, *experts} - from_recipe), pinned)


def _given_experts(args: argparse.Namespace) -> dict[str, str]:
    """The ``--expert NAME=SOURCE`` options as ``{name: source}``, in their order; a malformed or repeated one is
    refused, naming it."""
    given = {}
    for item in getattr(args, "expert", None) or []:
        name, source = item.split("=", 1) if "=" in item else ("", "")
        name = name.strip()
        if not name or not source:
            raise StudioError(f"--expert expects NAME=SOURCE with a non-empty name and source, got {item!r}")
        if name in given:
            raise StudioError(f"--expert {name!r} is given twice; each expert needs its own name")
        given[name] = source
    return given


@contextlib.contextmanager
def _noting(note: str | bool | None) -> Iterator[None]:
    """Append ``(note)`` to a :class:`StudioError` raised inside (no note: let it pass as it is), e.g. that the
    source at fault is one a recipe recorded, and which option reads another."""
    try:
        yield
    except StudioError as exc:
        if not note:
            raise
        raise type(exc)(f"{exc} ({note})") from exc


def _load_sources(base: str, experts: dict[str, str], prefix: str | None,
                  from_recipe: set[str | None] = frozenset()) -> tuple[dict, dict, dict]:
    """The base and the experts read from checkpoint sources, and the sources as a recipe records them
    (:func:`studio.io.load_checkpoint`: absolute paths, Hub repositories pinned to a commit). An expert may be a
    PEFT LoRA adapter of the base (:func:`studio.adapters.load_adapter`). An error names the base or the expert, and
    says so if a recipe recorded the source (``from_recipe``: expert names, None: the base)."""
    def load(name: str | None, source: str) -> tuple[dict, str]:
        try:
            found = adapters.adapter_files(source) if name is not None else None
            if found is not None:   # a PEFT LoRA adapter of the base
                return adapters.apply_adapter(found, base_sd, prefix=prefix)
            return load_checkpoint(source, prefix=prefix)
        except CheckpointError as exc:
            option = "--base" if name is None else f"--expert {name}=SOURCE"
            hint = f" (a source the recipe recorded; give {option} to read another)" if name in from_recipe else ""
            raise CheckpointError(f"{'the base' if name is None else f'expert {name!r}'}: {exc}{hint}") from exc

    base_sd, pinned = load(None, base)
    loaded, recorded = {}, {}
    for name, source in experts.items():
        loaded[name], recorded[name] = load(name, source)
    return base_sd, loaded, {"base": pinned, "experts": recorded}


def _merge_recipe(args: argparse.Namespace, pool: _Pool) -> Recipe:
    """The recipe of the merge the options describe (``merge``'s, also ``diagnose``'s)."""
    prefs = _parse_preferences(args.preferences)
    hparams, cal_hparams = _parse_sets(args.set), _parse_sets(args.cal_set, "--cal-set")
    if cal_hparams and args.calibrate is None:
        raise StudioError(f"--cal-set {' '.join(args.cal_set)} sets a calibration's hyperparameters, but no "
                          f"calibration was chosen; give --calibrate "
                          f"{' or '.join(m['name'] for m in list_methods() if m['kind'] == 'calibration')}")
    # the recipe stores the validated values, schema defaults filled in: it does not depend on the defaults of the
    # version that replays it (the merge validates them again, with the same result)
    hparams = validate_hparams(args.method, get_method(args.method).params, hparams)
    if args.calibrate is not None:
        cal_hparams = validate_hparams(args.calibrate, get_calibration(args.calibrate).params, cal_hparams)
    return Recipe(method=args.method, hparams=hparams, experts=list(pool.experts), calibrate=args.calibrate,
                  calibrate_hparams=cal_hparams, preferences=prefs, seed=args.seed or 0, layer_rule=args.layer_rule,
                  suite=pool.suite, studio_version=__version__, svd_mode=args.svd_mode, prefix=args.prefix,
                  sources=pool.sources)


def _check_weights_exist(weights: str) -> None:
    """Raise the source's own error for a ``--weights`` that names neither a local file or folder nor a Hub
    repository (a mistyped path), before a missing ``--suite`` or recipe is blamed for it; nothing is fetched."""
    if is_hub_url(weights) or Path(weights).expanduser().exists():
        return
    if hub_spec(weights) is None or is_local_path(weights):
        with _noting("--weights"):
            checkpoint_files(weights)   # raises: no such file or folder


def _embedded_recipe(weights: str, needed: bool = True) -> Recipe | None:
    """The recipe embedded in a merged file the CLI or the app exported (a local safetensors file under any name,
    or a folder whose weights are one such file), else None. One that cannot be read (a field of a newer version) is
    refused by name where it is ``needed``; elsewhere (the options name the suite or checkpoints, and the tasks) it
    is None, with a note: the file is weights all the same."""
    path = Path(weights)
    if is_hub_url(weights) or not (path.is_file() or path.is_dir()):
        return None
    try:
        if path.is_dir():   # a folder in the Hugging Face layout: its one weights file (shards carry no recipe)
            files = checkpoint_files(path)
            if len(files) != 1 or files[0][1] is not None:
                return None
            path = files[0][0]
        if not looks_like_safetensors(path):
            return None
    except (StudioError, OSError):   # not a file with metadata: the caller reads it as weights, or says why not
        return None
    # a safetensors file that cannot be read (truncated: "file not fully covered") is said first: a missing --suite
    # or --base would be blamed for it otherwise
    with _noting("--weights"):
        meta = read_metadata(path)
    try:
        return Recipe.from_metadata(meta, path)   # a recipe that is there but malformed is named, not taken for none
    except CheckpointError as exc:
        if needed:
            raise
        print(f"note: {exc}; the options name what it needs, so --weights is read as weights alone", file=sys.stderr)
        return None


def _check_report_path(out: str) -> None:
    """``diagnose --out`` writes JSON: refuse a weights file's name (``.safetensors``, a pickle checkpoint's suffix),
    and a file there that holds weights, which the report would replace (the overwrite guard spares only the files
    the command reads)."""
    path = Path(out)
    if path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES):
        raise StudioError(f"--out {out}: the diagnostics are written as JSON, and {path.suffix} names weights; give a "
                          f".json name (e.g. {path.with_suffix('.json').name})")
    with path_errors(path):
        holds_weights = path.is_file() and looks_like_safetensors(path)
    if holds_weights:
        raise StudioError(f"--out {out} holds safetensors weights, which the diagnostics' JSON would replace; give "
                          f"another file name")
    check_writable(path)


def _diagnose(args: argparse.Namespace) -> None:
    """``merge-studio diagnose``: :func:`studio.diagnostics.layer_curves`, Iso's ``sar_avg`` (per task, and
    pairwise between tasks) and every task-by-task heatmap over the whole model (:func:`studio.diagnostics.
    model_matrix`) of a merge the options describe, of a merged checkpoint, or of the Task Arithmetic sum; a summary
    on stdout, every number as JSON with ``--out``."""
    from . import diagnostics as diag
    from .engine import get_pool

    if args.weights and args.method:
        raise StudioError("give --method (a merge to compute) or --weights (a merged checkpoint), not both")
    if not args.method and (args.set or args.calibrate or args.cal_set or args.preferences
                             or args.seed is not None):
        raise StudioError("--set, --calibrate, --cal-set, --preferences and --seed describe a merge to compute: give "
                          "--method" + (" instead of --weights, which is diagnosed as it is" if args.weights else ""))
    curves = None if args.curves is None else [c.strip() for c in args.curves.split(",") if c.strip()]
    if curves == []:
        raise StudioError(f"--curves names no curve; choose from {list(diag.CURVES)}")
    unknown = sorted(set(curves or []) - set(diag.CURVES))
    if unknown:
        raise StudioError(f"--curves: unknown curve(s) {unknown}; choose from {list(diag.CURVES)}")
    if args.out:
        _check_report_path(args.out)
    if args.weights:
        _check_weights_exist(args.weights)
    embedded = (_embedded_recipe(args.weights, needed=not (args.suite or args.base or args.expert))
                if args.weights else None)   # read once
    recorded = None   # a merged file's own recipe: the suite or checkpoints it merged, unless the options name some
    if (embedded is not None and (embedded.suite or embedded.sources)
            and not (args.suite or args.base or args.expert or args.prefix)):
        recorded = embedded
    pool = _load_pool(args, recorded)
    prefix = recorded.prefix if recorded is not None else args.prefix   # the merge's tensors, and the weights'
    read = []   # every file of a local --weights (a folder's weights file, an index's shards), which --out must spare
    if args.weights and not is_hub_url(args.weights):
        with _noting("--weights"):
            read = [str(file) for file, _ in checkpoint_files(args.weights)] + [args.weights]
    refuse_overwriting([args.out], sources=pool.sources, suite=pool.suite,
                       inputs={"the merged checkpoint (--weights)": read} if read else None)
    if args.method:
        recipe = _merge_recipe(args, pool)
        merged = merge_from_recipe(recipe, pool.base, pool.experts, device=args.device)
        what: dict[str, Any] = {"recipe": recipe.to_dict()}
    elif args.weights:
        with _noting("--weights"):
            merged, source = load_checkpoint(args.weights, prefix=prefix)
        what = {"weights": source}
        merged_experts = list(embedded.experts) if embedded is not None and pool.suite and args.experts is None else []
        if merged_experts and set(merged_experts) < set(pool.everyone or pool.experts):   # some of the suite's
            pool = pool._replace(experts={n: pool.experts[n] for n in merged_experts})
            what["experts_from_its_recipe"] = merged_experts
        if embedded is not None and embedded.fingerprints:   # the weights it merged, where the same names are read
            absent = frozenset(embedded.fingerprints.get("experts", {})) - set(pool.experts)
            try:
                check_fingerprints(embedded.fingerprints, pool.base, pool.experts, skip=absent, sources=pool.files)
            except CheckpointError as exc:   # still diagnosable: said, as the diagnostics then compare other weights
                print(f"note: {exc}; the diagnostics compare the merged weights with these", file=sys.stderr)
    else:
        merged, what = None, {"task_arithmetic_sum": True}
    task_pool = get_pool(pool.base, pool.experts, device=args.device, svd_mode=args.svd_mode)
    # the layers: --layer-rule, else those the method treats as matrices, else the TSV/Iso default rule's
    rule = args.layer_rule or (get_method(args.method).extra.get("layer_rule") if args.method else None)
    # a merged checkpoint may also hold deltas (merged - base): the diagnostics tell which, as the library does
    is_delta = False if args.method else None
    hint = "" if prefix or pool.suite else "; give --prefix if its tensors sit under one"
    with _noting(args.weights and f"--weights {args.weights}: a merged checkpoint with the experts' keys and "
                                  f"shapes{hint}"):
        found = diag.report(task_pool, merged, layer_rule=rule, curves=curves, merged_is_delta=is_delta)
    report = {"merge": what, "suite": pool.suite, "sources": pool.sources, **found}
    if args.out:
        with atomic_write(Path(args.out)) as tmp:
            Path(tmp).write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    made = what.get("recipe", {})
    calibrated = f" + {made['calibrate']}" if made.get("calibrate") else ""
    merge = (made.get("method") and made["method"] + calibrated) \
        or (f"the weights {what['weights']}" if "weights" in what else "the Task Arithmetic sum")
    tasks, keys = report["tasks"], report["layers"]["key"]
    print(f"diagnostics of {merge}: {len(tasks)} expert{'s' * (len(tasks) != 1)}"
          + (" (those its recipe merged; --experts chooses others)" if "experts_from_its_recipe" in what else "")
          + f", {len(keys)} matrix layer{'s' * (len(keys) != 1)}")
    for t in report["unchanged_experts"]:
        print(f"note: expert {t!r} equals the base on every matrix layer diagnosed: its SAR, similarities and cosines "
              f"are undefined (null in --out), and the means over tasks leave it out", file=sys.stderr)
    for line in diag.report_summary(report):
        print(line)
    if args.out:
        print(f"wrote {args.out}")


def _replay_note(recipe: Recipe, made: dict) -> str:
    """Whether a replay made the bits ``recipe`` recorded, and if not, why: its settings edited since, other weights
    read, or the platform (nothing to say when it recorded no merge)."""
    recorded = recipe.fingerprints
    if not recorded or "merged" not in recorded:
        return ""
    if recorded["merged"] == made["merged"]:
        return "; the same bits as the merge the recipe recorded"
    why = "the recipe did not record all its inputs"
    if "settings" in recorded and recorded["settings"] != recipe.settings_fingerprint():
        why = "its settings were edited after it recorded that merge: the method, hyperparameters, calibration, " \
              "preferences, seed, layer rule, SVD mode, prefix or experts differ"
    elif "base" in recorded and set(recorded.get("experts", {})) == set(made["experts"]):
        if recorded["base"] != made["base"] or recorded["experts"] != made["experts"]:
            why = "from other weights, as the options say"   # the recorded ones the options left were checked
        elif recipe.studio_version != __version__:
            recorder = f"merge-studio {recipe.studio_version}" if recipe.studio_version else \
                "a version it did not record"
            why = f"from the same weights, recorded by {recorder} and replayed by {__version__}, whose methods may " \
                  f"round differently; the torch, BLAS and device also change a merge's last bits"
        else:
            why = "from the same weights: a merge's last bits change with the torch, BLAS and device"
    return f"; not the same bits as the merge the recipe recorded ({why})"


#: Subcommands that hand every argument to another module's ``main`` (its own options and --help).
_PASSTHROUGH = {"bench": ("studio.bench", "benchmark the engine"),
                "leaderboard": ("studio.leaderboard", "merge the suite with every method"),
                "build-suite": ("studio.suite.build", "rebuild the embedded MiniSuite")}


def _refuse_into_checkpoint_folders(args: argparse.Namespace, out: str) -> None:
    """Refuse weights written into a checkpoint folder that ``--base`` or an ``--expert`` names: the folder would
    then load as other weights (a ``model.safetensors`` there wins over its shards; a second ``.safetensors`` file
    makes it ambiguous), so the same command run again would merge the merge (an I/O audit). The recorded sources
    are the files a folder resolved to, which :func:`studio.io.refuse_overwriting` guards."""
    named = [("the base", getattr(args, "base", None))] + [
        (f"expert {name!r}", source) for name, source in _given_experts(args).items()]
    if not (out.endswith(".safetensors") or out.endswith(".safetensors.index.json")):
        return
    with path_errors(out):   # e.g. a loop of symbolic links
        path = Path(out).expanduser().resolve()
    for what, source in named:
        if source and not is_hub_url(source) and Path(source).expanduser().is_dir() \
                and Path(source).expanduser().resolve() == path.parent:
            raise StudioError(f"{out} would be a weights file in {source}, the checkpoint folder of {what}, which "
                              f"would then load as other weights; write the output to another folder")


def _note_kept_buffers(base: Mapping[str, Any], experts: Mapping[str, Mapping[str, Any]]) -> None:
    """Say on stderr which integer or boolean buffers an expert changed: they have no task vector, and the merge
    keeps the base's (:meth:`studio.pool.TaskPool.layer`), which a user would otherwise not learn."""
    import torch

    changed = [(key, name) for key, t in base.items() if not t.is_floating_point()
               for name, sd in experts.items() if not torch.equal(sd[key], t)]
    if changed:
        keys = sorted({key for key, _ in changed})
        key, name = changed[0]
        one = len(keys) == 1
        print(f"note: {len(keys)} integer or boolean buffer{'' if one else 's'} differ{'s' if one else ''} from the "
              f"base in some expert (e.g. {key!r} in {name!r}); {'it has' if one else 'they have'} no task vector, "
              f"and the merge keeps the base's", file=sys.stderr)


class _Terminated(BaseException):
    """SIGTERM, raised where the main thread runs (a BaseException: no ``except Exception`` on the way swallows it),
    so that :func:`studio.io.atomic_write` removes its staged file as it does on Ctrl-C."""


@contextlib.contextmanager
def _terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` while the block runs, where Python's default would end the process
    at once and leave a model-sized staged file in the output folder (in the hidden staging folder
    ``.NAME.HOST-PID-*.tmp/``, until the next write of that name). Only in the main thread, and only over the default
    handler (a caller's own handler is left alone)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise _Terminated()

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """Show the library's warnings as the CLI's other messages, one ``warning: ...`` line on stderr (e.g. a staged
    file that an interrupted write left and this one removed), where Python's format names a source line."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="merge-studio", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"merge-studio {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("methods", help="list methods and their hyperparameters")
    p.add_argument("--json", action="store_true", help="print the schemas as JSON instead of the table")

    def pool_args(p: argparse.ArgumentParser, replay: bool = False) -> None:
        p.add_argument("--suite", help="MiniSuite (the embedded suite), a suite folder or Hugging Face repo id, "
                                       "owner/name[@rev] or hf://owner/name[@rev], or hf://datasets/owner/name[@rev] "
                                       "for a dataset repository (base + experts)")
        p.add_argument("--experts", help="comma-separated subset of the suite's experts" + (
            " (only for a recipe that names none: a recipe merges the experts it names)" if replay else ""))
        p.add_argument("--base", help="base checkpoint: a safetensors file, a folder (model.safetensors, or "
                                      "shards with their index) or a Hub repo 'owner/name[/file.safetensors][@rev]' "
                                      "('hf://owner/name[@rev][/file.safetensors]': the Hub whatever local folders "
                                      "exist; hf://datasets/... for a dataset repository)")
        p.add_argument("--expert", action="append",
                       help="NAME=SOURCE of an expert checkpoint, any source --base takes, or a PEFT LoRA "
                            "adapter of the base (a folder or Hub repo with adapter_config.json) (repeat)")
        p.add_argument("--prefix", default=None,
                       help="keep only the tensors whose names start with this, in the base and every expert "
                            "(e.g. vision_model. for Hugging Face CLIP checkpoints)" + (
                                "; the recipe's own prefix applies (a different one is refused)" if replay else ""))
        p.add_argument("--device", default=None,
                       help="cpu, cuda, cuda:N or auto (the default: $MERGE_STUDIO_DEVICE, else CUDA when present)")

    def merge_args(p: argparse.ArgumentParser, required: bool = True,
                   layer_help: str = "(omitted: the method's and the calibration's own default rule, as "
                                     "studio.merge)") -> None:
        p.add_argument("--method", required=required, help="merging method (merge-studio methods lists them)")
        p.add_argument("--set", action="append", default=[], help="hyperparameter NAME=VALUE (repeat)")
        p.add_argument("--calibrate", default=None,
                       help="calibration applied after the method: svc or align_merge_b (default: none)")
        p.add_argument("--cal-set", action="append", default=[], help="calibration hyperparameter NAME=VALUE")
        p.add_argument("--preferences", default=None,
                       help='JSON mapping task -> weight, e.g. \'{"cars": 2, "dtd": 1}\'; a task it leaves out gets '
                            'weight 0 (as in studio.merge)')
        p.add_argument("--seed", type=int, default=0, help="seed of DARE's random masks (default 0)")
        p.add_argument("--layer-rule", default=None, choices=sorted(RULES),
                       help=f"which 2-D tensors get the spectral treatment: default, skip_embeddings or all_matrices "
                            f"{layer_help}")
        p.add_argument("--svd-mode", default="auto", choices=("auto", "exact"),
                       help="auto: top-k SVDs from the Gram matrix; exact: LAPACK's SVD everywhere, as the official "
                            "code")

    p = sub.add_parser("merge", help="merge experts and write safetensors (+ recipe)")
    pool_args(p)
    merge_args(p)
    p.add_argument("--out", required=True, help="the merged weights (.safetensors, with the recipe in its metadata)")
    p.add_argument("--recipe", help="also write the recipe (YAML) here")

    p = sub.add_parser("diagnose", help="spectral diagnostics of a merge (per layer and per task) as JSON, and a "
                                        "summary")
    pool_args(p)
    merge_args(p, required=False, layer_help="(omitted: the method's and the calibration's own default rule, as "
                                             "studio.merge); the layers reported are those it names, else those "
                                             "the method's own rule treats as matrices (the TSV/Iso rule without "
                                             "--method)")
    p.set_defaults(seed=None)   # so that a --seed without --method is noticed
    p.add_argument("--weights", help="diagnose this merged checkpoint (any source --base takes) instead of --method, "
                                     "against the suite or checkpoints its recipe recorded unless --suite or --base "
                                     "say; neither: the Task Arithmetic sum")
    p.add_argument("--curves", help="comma-separated per-layer curves (default: all of "
                                    "studio.diagnostics.CURVES)")
    p.add_argument("--out", help="write every number as JSON here")

    p = sub.add_parser("recipe", help="reproduce a merge from a recipe (YAML/JSON or an exported safetensors), from "
                                      "the suite or checkpoints it recorded unless --suite or --base/--expert say")
    p.add_argument("recipe", help="a recipe (YAML or JSON), or a file merge or the app exported")
    pool_args(p, replay=True)
    p.add_argument("--out", required=True, help="the merged weights (.safetensors)")

    p = sub.add_parser("compress", help="TSV-C: store each expert as low-rank task matrices (one safetensors file)")
    pool_args(p)
    p.add_argument("--rank-fraction", type=float, default=None,
                   help="fraction of each layer's components kept per task (default 1/T, as the TSV paper); one "
                        "that keeps none on every compressed layer is refused")
    p.add_argument("--layer-rule", default=None, choices=sorted(RULES),
                   help="which 2-D tensors are compressed (default all_matrices)")
    p.add_argument("--svd-mode", default="auto", choices=("auto", "exact"),
                   help="auto: top-k SVDs from the Gram matrix; exact: LAPACK's SVD, as the official code")
    p.add_argument("--out", required=True, help="the packed file (.safetensors) reconstruct reads")

    p = sub.add_parser("reconstruct", help="rebuild one expert from a compress file: base + alpha * its task vector")
    p.add_argument("packed", help="a file merge-studio compress wrote")
    p.add_argument("--task", required=True, help="the expert to rebuild")
    p.add_argument("--alpha", type=float, default=1.0, help="scale of the task vector (default 1.0: the expert)")
    p.add_argument("--suite", help="the suite whose base the experts were compressed against (default: the suite "
                                   "compress was given, if any)")
    p.add_argument("--base", help="or the base checkpoint (any source merge's --base takes; compress's --prefix is "
                                  "applied)")
    p.add_argument("--any-base", action="store_true",
                   help="apply the task vectors to a base other than the one they were compressed against (e.g. "
                        "the same weights rounded to another dtype); without it such a base is refused")
    p.add_argument("--out", required=True, help="the rebuilt expert (.safetensors)")

    p = sub.add_parser("evaluate", help="evaluate weights on a suite's tasks")
    p.add_argument("--suite", help="MiniSuite, a suite folder or Hub repo (as merge's --suite); default: the suite "
                                   "the recipe in --weights recorded (a file merge or the app exported)")
    p.add_argument("--weights", required=True, help="merged checkpoint: any source merge's --base takes")
    p.add_argument("--tasks", help="comma-separated tasks to evaluate (default: all of the suite's); 'merged': "
                                   "those whose experts the recipe in --weights merged")
    p.add_argument("--split", default="test", choices=("validation", "test"), help="default: test")
    p.add_argument("--prefix", default=None,
                   help="keep only the weights' tensors whose names start with this (e.g. visual. for a merge of "
                        "full CLIP checkpoints, whose text tower the suite's model does not have)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N or auto (the default: $MERGE_STUDIO_DEVICE, else CUDA when present)")

    for name, (_, help_) in _PASSTHROUGH.items():   # listed in --help; their options go to their own parsers
        p = sub.add_parser(name, help=help_, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in _PASSTHROUGH:
        # argparse's REMAINDER refuses a first argument that looks like an option ("bench --device cpu")
        keep_freed_memory()
        try:
            with _terminate_as_exception(), _warnings_as_lines():
                importlib.import_module(_PASSTHROUGH[argv[0]][0]).main(argv[1:], prog=f"merge-studio {argv[0]}")
        except _Terminated:
            print("terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except (StudioError, OSError) as exc:   # as the other subcommands: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        return 0
    args = ap.parse_args(argv)
    keep_freed_memory()   # a merge frees and reallocates model-sized blocks: reuse them (studio.memory)
    try:
        with _terminate_as_exception(), _warnings_as_lines():
            return _run(args)
    except _Terminated:   # kill, timeout, docker stop: the staged files are removed on the way out, as for Ctrl-C
        print("terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:   # `merge-studio evaluate ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when Python flushes
        return 0
    except (StudioError, OSError) as exc:   # bad input, or a file that cannot be read or written: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: no traceback (outputs are written atomically, so none is half-written)
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "methods":
        print(methods_table(markdown=not args.json))
    elif args.cmd == "merge":
        check_writable(check_weights_path(args.out))   # before anything is read (a Hub download) or merged
        _refuse_into_checkpoint_folders(args, args.out)
        if args.recipe is not None:
            check_writable(check_recipe_path(args.recipe))
        pool = _load_pool(args)
        recipe = _merge_recipe(args, pool)
        refuse_overwriting([args.out, args.recipe], sources=pool.sources, suite=pool.suite)
        started = time.perf_counter()
        merged = merge_from_recipe(recipe, pool.base, pool.experts, device=args.device)
        seconds = time.perf_counter() - started
        recipe = recipe.recording(input_fingerprints(*recipe_inputs(recipe, pool.base, pool.experts)),
                                  fingerprint(merged))
        save_merged(args.out, merged, recipe, recipe_path=args.recipe)   # both files or neither
        what = recipe.method + (f" + {recipe.calibrate}" if recipe.calibrate else "")
        count = len(recipe.experts or pool.experts)
        experts = f"{count} expert{'s' if count != 1 else ''}"
        print(f"wrote {args.out} ({len(merged)} tensors; {what} of {experts}, merged in {seconds:.1f} s)"
              + (f" and the recipe {args.recipe}" if args.recipe else ""))
        _note_kept_buffers(*recipe_inputs(recipe, pool.base, pool.experts))
    elif args.cmd == "recipe":
        check_writable(check_weights_path(args.out))   # refused before minutes of work, not at the write
        _refuse_into_checkpoint_folders(args, args.out)
        recipe = Recipe.from_file(args.recipe)
        with _noting(f"recipe {args.recipe}"):   # before the weights are read: which file holds the fault
            recipe.check_schema()
        if args.experts is not None and recipe.experts:
            raise StudioError(f"the recipe names the experts it merges, {recipe.experts}; --experts does not apply")
        if args.prefix is not None and args.prefix != recipe.prefix:
            raise StudioError(f"--prefix {args.prefix!r} differs from the recipe's prefix {recipe.prefix!r}; the "
                              f"recipe's is used, leave --prefix out")
        args.prefix = None   # the recipe's applies: to the checkpoints as they are read, and to a suite's tensors
        pool = _load_pool(args, recipe)
        refuse_overwriting([args.out], sources=pool.sources, suite=pool.suite,
                           inputs={"the recipe": args.recipe})
        base, experts = recipe_inputs(recipe, pool.base, pool.experts)
        # before the merge: the weights the recipe recorded must be those it merged (the options choose others)
        with _noting(f"the suite the recipe recorded, {pool.suite}; give --suite, or --base and an --expert for "
                     f"each, to merge other weights on purpose" if pool.suite else
                     "the checkpoints the recipe recorded; give --base or --expert NAME=SOURCE to merge other "
                     "weights on purpose"):
            inputs = check_fingerprints(recipe.fingerprints, base, experts, skip=pool.replaced, sources=pool.files)
        with _noting(f"merging recipe {args.recipe}"):   # its layer rule, preferences, SVD mode
            merged = merge_from_recipe(recipe, base, experts, check=False, device=args.device)
        made = fingerprint(merged)
        # the output records what it was merged from (options may have replaced the recipe's suite or sources)
        save_merged(args.out, merged, dataclasses.replace(recipe, suite=pool.suite, sources=pool.sources,
                                                          experts=list(experts)).recording(inputs, made))
        print(f"wrote {args.out} ({len(merged)} tensors{_replay_note(recipe, {**inputs, 'merged': made})})")
    elif args.cmd == "compress":
        from .compress import compress

        check_writable(check_weights_path(args.out))   # refused before minutes of work, not at the write
        _refuse_into_checkpoint_folders(args, args.out)
        pool = _load_pool(args)
        refuse_overwriting([args.out], sources=pool.sources, suite=pool.suite)
        packed = compress(pool.base, pool.experts, rank_fraction=args.rank_fraction, device=args.device,
                          layer_rule=args.layer_rule, svd_mode=args.svd_mode)
        # what reconstruct needs to find the same base
        packed.meta.update(prefix=args.prefix, suite=pool.suite, base=pool.sources["base"] if pool.sources else None)
        packed.save(args.out)
        size = packed.storage()
        print(f"wrote {args.out}: {len(pool.experts)} experts, {size['ratio']:.3f} of their dense task vectors' "
              f"numbers, {size['stored_bytes'] / 1e6:.2f} MB in float32 against {size['dense_bytes'] / 1e6:.2f} MB "
              f"in the base's dtypes ({size['bytes_ratio']:.3f}); base + all of them = "
              f"{size['model_multiple']:.2f} x the model's numbers")
    elif args.cmd == "reconstruct":
        from .compress import BaseMismatchError, Compressed
        from .suite import load_suite

        check_writable(check_weights_path(args.out))   # refused before minutes of work, not at the write
        saved = Compressed.read_meta(args.packed)
        recorded = not args.base and not args.suite
        if recorded:
            args.suite = saved.get("suite")
            args.base = None if args.suite else saved.get("base")
        if args.suite and args.base:
            raise StudioError("give either --suite or --base (the base the experts were compressed against), not both")
        if not (args.suite or args.base):
            raise StudioError("give the base the experts were compressed against: --suite or --base")
        with _noting(recorded and f"the {'suite' if args.suite else 'base'} compress recorded; give --suite or "
                                  f"--base to read another"):
            if args.suite:
                suite = load_suite(args.suite)
                base, read, file = suite.base, {"suite": suite.source}, suite.weight_files["base"]
            else:
                base, file = load_checkpoint(args.base, prefix=saved.get("prefix"))
                read = {"sources": {"base": file, "experts": {}}}
        refuse_overwriting([args.out], inputs={"the packed file": args.packed}, **read)
        try:   # keys and shapes first (their errors name the entry at fault), then the base compress read
            packed = Compressed.load(args.packed, base, check=not args.any_base)
        except BaseMismatchError as exc:   # named here with the file read and the option that applies
            since = f"the {'suite' if args.suite else 'base'} compress recorded has changed since; " if recorded else ""
            raise CheckpointError(f"{args.packed}: the base read ({shown_path(file)}) is not the one its experts were "
                                  f"compressed against (recorded {exc.recorded[:19]}..., read {exc.given[:19]}...), "
                                  f"so their task vectors would build other models ({since}give --any-base to apply "
                                  f"them to it anyway)") from None
        state_dict = packed.reconstruct(args.task, alpha=args.alpha)
        save_state_dict(args.out, state_dict)
        print(f"wrote {args.out} ({len(state_dict)} tensors)")
    elif args.cmd == "diagnose":
        _diagnose(args)
    elif args.cmd == "evaluate":
        from .evaluate import evaluate
        from .suite import load_suite
        from .suite.model import ArchitectureError

        _check_weights_exist(args.weights)
        tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
        recipe = _embedded_recipe(args.weights, needed=args.suite is None or tasks == ["merged"])
        suite_source = args.suite
        weights_path = Path(args.weights).expanduser()
        if (recipe is None and weights_path.is_file() and not looks_like_safetensors(weights_path)
                and not weights_path.name.endswith(".index.json")):   # (a shard index: weights too)
            # said first: a missing --suite would be blamed for it, and given one the header's size would be
            hint = (f" (a recipe: `merge-studio recipe {args.weights} --out merged.safetensors` merges it)"
                    if weights_path.suffix.lower() in (".yaml", ".yml", ".json") else "")
            raise StudioError(f"--weights {args.weights} is not a safetensors file{hint}")
        if suite_source is None:
            if recipe is None or not recipe.suite:
                raise StudioError(f"--suite is needed: --weights {args.weights} " + (
                    "records no suite (its recipe merged checkpoints)" if recipe is not None else
                    "has no recipe that records one (only files merge-studio merge, recipe or the app wrote do)"))
            suite_source = recipe.suite
        with _noting(args.suite is None and f"the suite the recipe in {args.weights} recorded; give --suite to "
                                             f"evaluate on another"):
            suite = load_suite(suite_source)
        if tasks == ["merged"]:
            if recipe is None or not recipe.experts:
                raise StudioError(f"--tasks merged: --weights {args.weights} has no recipe that names the experts "
                                  f"it merged; name the tasks")
            tasks = list(recipe.experts)
            missing = [t for t in tasks if t not in suite.task_names]
            if missing:
                raise StudioError(f"--tasks merged: the recipe merged experts {missing} that the suite "
                                  f"{suite_source} has no task for (its tasks: {list(suite.task_names)})")
        elif tasks == []:
            raise StudioError(f"--tasks names no task; choose from {list(suite.task_names)} or 'merged'")
        weights = load_state_dict(args.weights, prefix=args.prefix)
        try:
            result = evaluate(suite, weights, tasks=tasks, split=args.split, device=args.device)
        except ArchitectureError as exc:   # name the file, and what it is where it is not a model
            if not str(exc).startswith("state dict"):   # the suite's own base or an expert: named already
                raise
            from .compress import Compressed

            packed = False
            if not is_hub_url(args.weights) and Path(args.weights).is_file():
                with contextlib.suppress(CheckpointError):   # not one (e.g. a shard index: not even safetensors)
                    Compressed.read_meta(args.weights)
                    packed = True
            hint = "; it is a TSV-C file of low-rank task vectors: build a task's model from it with merge-studio " \
                   "reconstruct" if packed else ""
            # a prefix helps only where the file holds tensors outside the model's (a whole CLIP's text tower)
            tops = sorted({k.split(".", 1)[0] + "." for k in suite.base})
            if not packed and args.prefix is None and any(not k.startswith(tuple(tops)) for k in weights):
                hint = (f"; --prefix keeps only the tensors under a name's start (the suite's model's are under "
                        f"{' and '.join(tops)})")
            raise ArchitectureError(f"--weights {args.weights}: {exc}{hint}") from None
        out = result.to_dict() if hasattr(result, "to_dict") else result.__dict__
        print(json.dumps(json_safe(out), indent=2, default=str, allow_nan=False))   # NaN (e.g. NAI) -> null
    return 0


if __name__ == "__main__":
    sys.exit(main())
