"""Merge Studio: merge fine-tuned CLIP experts, watch the spectra while you tune, evaluate per task, export.

Run ``python app.py [--suite FOLDER_OR_HUB_REPO]`` (or set ``MERGE_STUDIO_SUITE``); it serves on 127.0.0.1:7860
(``GRADIO_SERVER_PORT`` / ``GRADIO_SERVER_NAME`` override). This file only wires the UI: the logic lives in
:mod:`studio.ui` (controls from schemas, plots, sessions, the :class:`~studio.ui.backend.Studio` service).

Public API endpoints (``gradio_client``): ``/merge``, ``/evaluate``, ``/spectrum``, ``/methods``, ``/layers``.
"""

# ZeroGPU needs ``spaces`` imported before torch initialises CUDA; elsewhere the decorator is the identity.
try:
    import spaces  # type: ignore

    gpu = spaces.GPU(duration=120)
except ImportError:  # not on a Hugging Face Space
    def gpu(fn):
        return fn

import argparse
import atexit
import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import gradio as gr
import pandas as pd
from gradio import FileData

from studio import diagnostics as diag
from studio.io import Recipe, atomic_write
from studio.memory import keep_freed_memory
from studio.schema import StudioError, brief, json_safe
from studio.ui import plots
from studio.ui.backend import SEED_BOX_MAX, MergeRequest, Studio, stored_settings
from studio.ui.controls import (ControlSpec, auto_box_js, control_specs, depends_on_method, fit_to_controls,
                                follow_tasks_js, parse_json_object, post_scale_param, reset_js, shown_info,
                                sources_markdown, specs_by_tasks, store_js, sweep_defaults, use_best_js)
from studio.ui.session import (SessionStore, accuracy_rows, leaderboard_widths, remove_dead_runs, run_folder,
                                session_dir)

log = logging.getLogger("merge_studio")

SUITE_ENV = "MERGE_STUDIO_SUITE"
MAX_QUEUE = 32
#: How long a diagnostics update waits for its per-layer curves before it draws the layer's plots without them
#: (they follow when ready): MiniSuite's come within it, all four plots at once.
CURVES_WAIT_S = 1.0
#: a session dropped for room (its tab closed without an unload) leaves no exports behind: up to a model's size each
SESSIONS = SessionStore(max_sessions=256, on_evict=lambda session_hash: _drop_session_files(session_hash))
_API_DIRS: list[Path] = []
_API_KEEP = 16

# System fonts only: the Space (and offline installs) never wait on a web-font download.
# Soft's text colours fall below WCAG AA's 4.5:1 on its own fills: gray-400 help text on white (2.5:1), indigo-500
# labels on indigo-100 (3.6:1), the selected tab and white on the primary fills (4.3 and 4.5:1). One shade or two
# darker: gray-600 help text (7.6:1), indigo-700 labels, accents and fills (6.4:1 on indigo-100, 7.9:1 under white).
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                       font_mono=["ui-monospace", "monospace"]).set(
    body_text_color_subdued="*neutral_600", block_info_text_color="*neutral_600",
    block_label_text_color="*primary_700", block_title_text_color="*primary_700", color_accent="*primary_700",
    button_primary_background_fill="*primary_700", button_primary_background_fill_hover="*primary_600",
    checkbox_label_background_fill_selected="*primary_700", checkbox_background_color_selected="*primary_700",
    checkbox_border_color_selected="*primary_700")
# Focus: the Soft theme draws none on a checkbox, a radio or a range (0 pixels changed when one took the keyboard's
# focus). The plotly logo in each plot's toolbar is an unnamed link, a Tab stop in every plot: hidden.
CSS = """
.ms-status {min-height: 1.6em}
#pred-gallery .caption-label {white-space: normal; max-width: 100%; overflow-wrap: anywhere; font-size: 11px;
                              line-height: 1.25; padding: 1px 4px}
footer {display: none !important}
.gradio-container input[type=checkbox]:focus-visible, .gradio-container input[type=radio]:focus-visible,
.gradio-container input[type=range]:focus-visible {outline: 2px solid #1d4ed8; outline-offset: 2px}
.modebar-btn--logo, .plotlyjsicon {display: none !important}
"""
# Gradio's slider stores its value on "release": a pointer let go on the range, or its number box losing focus. A key
# on the range (arrows, Page Up / Down, Home, End) sends only "input", so the value shown would not be the one the
# diagnostics and the next merge use. The page releases a range moved since its last release when such a key comes
# up, or when focus leaves it first (Tab, or a click elsewhere, while the key is held), as a pointer would: the same
# one event per change (the page stores it, see _render_params; on every "input" as well, the diagnostics would run
# on each step of a held key).
HEAD = """<script>
(() => {
  const keys = new Set(["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End"]);
  const moved = new WeakSet();   // ranges whose value changed since their last release
  const isRange = (el) => el instanceof HTMLInputElement && el.type === "range";
  const release = (el) => {
    if (moved.has(el) && !el.disabled) el.dispatchEvent(new PointerEvent("pointerup", {bubbles: true, composed: true}));
  };
  document.addEventListener("input", (e) => { if (isRange(e.target)) moved.add(e.target); }, true);
  document.addEventListener("pointerup", (e) => { if (isRange(e.target)) moved.delete(e.target); }, true);
  document.addEventListener("keyup", (e) => { if (isRange(e.target) && keys.has(e.key)) release(e.target); }, true);
  document.addEventListener("focusout", (e) => { if (isRange(e.target)) release(e.target); }, true);
  // Enter in a slider's number box applies the value typed, as leaving the box does (Gradio reads it on blur only)
  document.addEventListener("keydown", (e) => {
    const el = e.target;
    if (e.key === "Enter" && el instanceof HTMLInputElement && el.type === "number"
        && (el.getAttribute("aria-label") || "").startsWith("number input for ")) {
      el.dispatchEvent(new FocusEvent("blur"));
    }
  }, true);
  // What Gradio's components take no attribute for, set on the elements as they appear: a tab's content is built
  // when the tab is first shown, a render builds its controls anew, plotly draws a plot again on each update.
  // The results of a merge, a sweep, a load and a report are announced (polite live regions); the diagnostics'
  // status is not: it changes on every step of a slider.
  const LIVE = ["run-status", "opt-status", "load-status", "report-status"];
  // a plot's text: its title and annotations (subplot titles, "best α = ..."), without plotly's markup
  const plain = (t) => String(t || "").replace(/<br\\s*\\/?>/gi, " · ").replace(/<[^>]*>/g, "").trim();
  const describe = (gd) => {
    const label = gd.closest(".block")?.querySelector("[data-testid=block-label]")?.textContent.trim() || "Plot";
    const layout = gd.layout || {};
    const texts = [plain(layout.title?.text ?? layout.title), ...(layout.annotations || []).map((a) => plain(a.text))];
    const series = [...new Set((gd.data || []).filter((t) => t.name && t.showlegend !== false).map((t) => t.name))];
    return `${label} plot` + (texts.some(Boolean) ? `: ${texts.filter(Boolean).join("; ")}` : "")
      + (series.length ? `. Series: ${series.join(", ")}.` : "");
  };
  // the drawing (plotly's first svg) is the image, named; its text layer (title, legend, ticks) is hidden, being
  // in the name. Not the plot's container: it holds the toolbar's buttons, which an image's children cannot be
  const name = (gd) => {
    const [drawing, ...layers] = gd.querySelectorAll(":scope svg.main-svg");
    if (!drawing) return;
    const text = describe(gd);
    if (drawing.getAttribute("aria-label") !== text) {
      drawing.setAttribute("role", "img");
      drawing.setAttribute("aria-label", text);
    }
    for (const layer of layers) if (!layer.hasAttribute("aria-hidden")) layer.setAttribute("aria-hidden", "true");
  };
  let queued = false;
  const mark = () => {
    queued = false;
    for (const id of LIVE) {
      const el = document.getElementById(id);
      if (el && el.getAttribute("aria-live") !== "polite") {
        el.setAttribute("role", "status");
        el.setAttribute("aria-live", "polite");
      }
    }
    const all = document.querySelector("#expert-pool input.select-all-checkbox");   // only a title otherwise
    if (all && !all.hasAttribute("aria-label")) all.setAttribute("aria-label", "Select all experts");
    for (const gd of document.querySelectorAll(".js-plotly-plot")) name(gd);
  };
  new MutationObserver(() => {
    if (!queued) { queued = true; requestAnimationFrame(mark); }
  }).observe(document.documentElement, {childList: true, subtree: true, characterData: true});
})();
</script>"""
#: Python's ``round(v)`` (half to even) as a browser function; anything but a finite number as it is.
ROUND_HALF_EVEN_JS = """(v) => {
  if (typeof v !== "number" || !Number.isFinite(v)) return v;
  const r = Math.round(v);   // half up
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}"""
#: The diagnostics plots' narrowest width: two to a row on a wide page, one on a narrow one.
PLOT_MIN_WIDTH = 420
# What every launch of the page takes (the app's main and the tests' served app).
LAUNCH_OPTIONS = {"theme": THEME, "css": CSS, "head": HEAD}


def load_studio(source: "str | None" = None) -> Studio:
    """Load the suite once: ``source`` (a folder or hub repo id), else ``$MERGE_STUDIO_SUITE``, else MiniSuite."""
    from studio.suite import default_suite, load_suite

    source = source or os.environ.get(SUITE_ENV) or None
    suite = load_suite(source) if source else default_suite()
    return Studio(suite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Merge Studio: merge fine-tuned CLIP experts, inspect, evaluate.")
    parser.add_argument("--suite", default=None,
                        help=f"suite folder or Hub repository, owner/name or hf://[datasets/]owner/name (default: "
                             f"${SUITE_ENV} or MiniSuite)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--share", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1: concurrent sessions and the live diagnostics "
                             "already run in parallel, and more threads per op oversubscribe a small CPU; measured "
                             "5x faster diagnostics on a busy 2-core machine). 0 keeps torch's default.")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker threads a CPU merge spreads its layers over, one BLAS thread each "
                             "(default: the number of cores, at most 8; see studio.parallel)")
    return parser


# The command line is read only when run as a script (importing the module, e.g. in tests, never parses argv).
_ARGS = build_parser().parse_args() if __name__ == "__main__" else None
if _ARGS is not None:
    keep_freed_memory()   # the app merges again on every slider move: reuse freed memory (studio.memory)
try:
    STUDIO: Studio = load_studio(_ARGS.suite if _ARGS is not None else None)
except StudioError as _exc:
    if _ARGS is None:   # imported: the caller sees the error itself
        raise
    print(f"error: {_exc}", file=sys.stderr)   # a bad --suite is one line, as the CLI's errors (not a traceback)
    raise SystemExit(2) from None


def _upload_root() -> Path:
    return Path(gr.utils.get_upload_folder())


#: This process's folder for the files it exports (the sessions' and the API's), under Gradio's upload folder:
#: removed at exit, and at a later app's start where this process ended without that (SIGTERM, a crash). The folders
#: of the sessions and API calls it serves are removed as they end, as before.
_RUN = run_folder(_upload_root() / "merge_studio")


def _drop_session_files(session_hash: "str | None") -> None:
    shutil.rmtree(session_dir(_RUN, session_hash, create=False), ignore_errors=True)


def _discard_exports(files: Mapping[str, str], session_hash: "str | None") -> None:
    """Remove the files a merge job exported (weights, recipe) where it ends without a run that offers them: a Stop,
    a closed page or a failure after the export (a Stop there left 350 MB of ViT-B/32 weights until the page closed;
    a concurrency audit). A path the session offers stays (two merges of one method in one second export under one
    name)."""
    sess = SESSIONS.find(session_hash)
    offered = set() if sess is None else set(sess.files.values())
    for path in files.values():
        if path not in offered:
            Path(path).unlink(missing_ok=True)


def _close_session(session_hash: "str | None") -> None:
    """A page closed (``demo.unload``): its session is forgotten, its files removed, and a job of it still running
    stops at its next step (:func:`_reporter`)."""
    sess = SESSIONS.drop(session_hash)
    if sess is not None:
        with sess.lock:
            sess.stop_requested = True
    _drop_session_files(session_hash)


def _remove_exports(sess: Any, keep: Iterable[str] = ()) -> None:
    """Remove the merged weights and recipe ``sess`` last exported (those of the run the page shows), but for the
    paths in ``keep``."""
    kept = set(keep)
    for kind in ("weights", "recipe"):
        path = sess.files.pop(kind, None)
        if path and path not in kept:
            Path(path).unlink(missing_ok=True)


remove_dead_runs(_RUN.parent)
atexit.register(shutil.rmtree, _RUN, True)


class _Cancelled(StudioError):
    """The user pressed Stop."""


def _user_error(exc: BaseException, what: str, upload: Any = None) -> gr.Error:
    """A readable ``gr.Error`` for anything that went wrong in a handler (the app keeps running). ``upload``: a file
    the user uploaded, named in the message by its name, not by the server's upload folder."""
    if isinstance(exc, gr.Error):
        return exc
    text = str(exc) if upload is None else str(exc).replace(str(upload), Path(upload).name)
    if isinstance(exc, StudioError):
        # shown until closed (duration None): after Gradio's 10 s the status line kept a bare "Error" badge only
        return gr.Error(text, title=f"{what}: invalid request", duration=None)
    log.exception("%s failed", what)
    return gr.Error(f"{type(exc).__name__}: {text}", title=f"{what} failed", duration=None)


def _page_settings(state: Any, name: "str | None", what: str) -> dict[str, Any]:
    """What the page stored for ``name`` (:func:`~studio.ui.backend.stored_settings`), for a render of the controls:
    a state that is not one (only a direct call of the render's endpoint sends it) is refused by name, as a merge
    refuses it, not with Gradio's generic error."""
    try:
        return stored_settings(state, name, what)
    except StudioError as exc:
        raise gr.Error(str(exc), title="invalid request", duration=None) from None


# --------------------------------------------------------------------------------------------- GPU work (queued)
def _reporter(session_hash: "str | None", progress: Any) -> "Callable[[float, str], None]":
    """A job's progress callback: it raises :class:`_Cancelled` at the job's next step once the session's Stop was
    clicked (Gradio's cancel leaves a running worker thread to finish, holding the queue's "gpu" slot), or its page
    closed (:func:`_close_session`: a job nobody would see held the app's merge slot to its end)."""
    sess = None if session_hash is None else SESSIONS.find(session_hash)   # the job's session, closed or not

    def report(frac: float, msg: str) -> None:
        if sess is not None and sess.stop_requested:
            raise _Cancelled("stopped by the user")
        if progress is not None:
            progress(frac, desc=msg)

    return report


@gpu
def merge_and_evaluate(req: MergeRequest, folder: str, session_hash: "str | None" = None,
                       progress: Any = None, gallery_per_task: int = 3) -> dict[str, Any]:
    """Merge, evaluate on the merged tasks' test splits, export, predict the gallery: one queued GPU job.

    Returns only plain data (paths, numbers, small images), so it also works where ZeroGPU runs it in a worker.
    """
    report = _reporter(session_hash, progress)
    t0 = time.perf_counter()
    merged = STUDIO.merge(req, progress=lambda f, m: report(0.5 * f, m))
    t_merge = time.perf_counter() - t0
    report(0.5, "evaluating on the test splits")
    result = STUDIO.evaluate(merged, req.experts, "test")
    table = STUDIO.accuracy_table(result)
    t_eval = time.perf_counter() - t0 - t_merge
    report(0.85, "exporting safetensors + recipe")
    files = STUDIO.export(merged, req, folder)
    try:
        report(0.93, "predicting sample images")
        gallery = STUDIO.gallery(merged, req.experts, per_task=gallery_per_task) if gallery_per_task else []
        report(1.0, "done")
        # the recipe as exported (with the fingerprints of the weights it merged and made), for the summary and runs
        recipe = Recipe.from_file(files["recipe"]).to_dict()
    except BaseException:
        _discard_exports(files, session_hash)
        raise
    return {"table": table, "files": files, "recipe": recipe, "gallery": gallery, "merge_s": t_merge, "eval_s": t_eval,
            "avg_accuracy": result.avg_accuracy, "avg_normalized": result.avg_normalized,
            "total_s": time.perf_counter() - t0}


@gpu
def merge_and_score(req: MergeRequest, split: str = "test") -> dict[str, Any]:
    """Merge and evaluate only (the /evaluate endpoint): per-task table and averages, plain data."""
    merged = STUDIO.merge(req)
    result = STUDIO.evaluate(merged, req.experts, split)
    return {"split": split, "tasks": STUDIO.accuracy_table(result), "avg_accuracy": result.avg_accuracy,
            "avg_normalized": result.avg_normalized, "avg_nai": result.avg_nai, "avg_kl": result.avg_kl}


@gpu
def sweep_alpha(req: MergeRequest, alphas: list[float], progress: Any = None,
                session_hash: "str | None" = None) -> dict[str, Any]:
    """Validation sweep of the method's global scale (see :meth:`Studio.optimise_alpha`); a Stop of the session
    ends it before its next alpha."""
    return STUDIO.optimise_alpha(req, alphas, split="validation", progress=_reporter(session_hash, progress))


# --------------------------------------------------------------------------------------------- public API
def _api_folder() -> Path:
    folder = _RUN / "api" / uuid.uuid4().hex[:12]
    folder.mkdir(parents=True, exist_ok=True)
    _API_DIRS.append(folder)
    while len(_API_DIRS) > _API_KEEP:
        shutil.rmtree(_API_DIRS.pop(0), ignore_errors=True)
    return folder


def api_merge(method: str, experts: list[str], hparams: "dict | str" = "{}", calibration: str = "none",
              calibration_hparams: "dict | str" = "{}", preferences: "dict | str" = "{}",
              seed: int = 0) -> tuple[dict, FileData]:
    """Merge the chosen experts; returns a summary (recipe, per-task test accuracy) and the safetensors file.

    Args:
        method: a merging method name (see /methods), e.g. "task_arithmetic".
        experts: task names of the experts to merge (at least one).
        hparams: the method's hyperparameters as a JSON object, e.g. {"alpha": 0.3}; omitted ones use defaults.
        calibration: "none" or a calibration name ("svc", "align_merge_b").
        calibration_hparams: the calibration's hyperparameters as a JSON object.
        preferences: per-task non-negative weights as a JSON object, e.g. {"mnist": 2}; {} = uniform. As with the
            app's sliders, a task not named keeps weight 1 (studio.merge gives it 0): name every task to target one,
            e.g. {"mnist": 1, "svhn": 0}.
        seed: random seed for stochastic methods.
    """
    try:
        req = STUDIO.request(method, hparams, experts, calibration, calibration_hparams, preferences, seed)
        folder = _api_folder()
        try:
            out = merge_and_evaluate(req, str(folder), gallery_per_task=0)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)   # a failed merge leaves no empty folder among the kept 16
            with contextlib.suppress(ValueError):
                _API_DIRS.remove(folder)
            raise
    except Exception as exc:  # noqa: BLE001 - every failure becomes a readable client error
        raise _user_error(exc, "merge") from None
    summary = {"recipe": out["recipe"], "accuracy": out["table"],
               "avg_accuracy": out["avg_accuracy"], "avg_normalized": out["avg_normalized"],
               "seconds": round(out["total_s"], 3), "recipe_yaml": Path(out["files"]["recipe"]).read_text()}
    return summary, FileData(path=out["files"]["weights"], orig_name=Path(out["files"]["weights"]).name)


def api_evaluate(method: str, experts: list[str], hparams: "dict | str" = "{}", calibration: str = "none",
                 calibration_hparams: "dict | str" = "{}", preferences: "dict | str" = "{}", seed: int = 0,
                 split: str = "test") -> dict:
    """Merge and evaluate; returns per-task accuracy (merged, zero-shot, individual, normalized) and averages.

    Args:
        method: a merging method name (see /methods).
        experts: task names of the experts to merge.
        hparams: the method's hyperparameters as a JSON object.
        calibration: "none" or a calibration name.
        calibration_hparams: the calibration's hyperparameters as a JSON object.
        preferences: per-task weights as a JSON object ({} = uniform; a task not named keeps weight 1).
        seed: random seed for stochastic methods.
        split: "test" or "validation".
    """
    try:
        if split not in ("test", "validation"):
            raise StudioError(f"split must be 'test' or 'validation', got {split!r}")
        req = STUDIO.request(method, hparams, experts, calibration, calibration_hparams, preferences, seed)
        out = merge_and_score(req, split)
    except Exception as exc:  # noqa: BLE001
        raise _user_error(exc, "evaluate") from None
    return {**out, "recipe": req.recipe(STUDIO.suite_source).to_dict()}


def _api_request(experts: Any, method: str, hparams: Any, calibration: str, calibration_hparams: Any,
                 preferences: Any, seed: Any, what: str, alone: str) -> "tuple[list[str], MergeRequest | None]":
    """The experts (default: every expert of the suite) and the merge (None without ``method``) an endpoint was
    asked for, which gives the merge's ``what`` if a method is named, else ``alone``."""
    experts = STUDIO.check_expert_names(experts) or STUDIO.task_names
    if method is not None and not isinstance(method, str):   # 0, False or [] read as "no method" before
        raise StudioError(f"method must be a method's name (see /methods), or empty for {alone}, got {brief(method)}")
    if not method:   # the settings of a merge that is not asked for would be ignored: say so instead
        given = [name for name, value in (("hparams", hparams), ("calibration_hparams", calibration_hparams),
                                          ("preferences", preferences)) if parse_json_object(value, name)]
        given += ["calibration"] if calibration not in (None, "", "none") else []
        given += ["seed"] if seed not in (None, 0) else []
        if given:
            raise StudioError(f"{' and '.join(given)} given without a method: name the method whose {what} they "
                              f"describe, or leave them out for {alone}")
    req = (STUDIO.request(method, hparams, experts, calibration, calibration_hparams, preferences, seed)
           if method else None)
    return experts, req


def api_spectrum(layer: str, experts: "list[str] | None" = None, method: str = "", hparams: "dict | str" = "{}",
                 calibration: str = "none", calibration_hparams: "dict | str" = "{}",
                 preferences: "dict | str" = "{}", seed: int = 0) -> dict:
    """Singular values of every task matrix at ``layer`` and, when ``method`` is given, of the merged delta.

    Args:
        layer: a matrix layer key (see /layers), e.g. "visual.transformer.resblocks.0.attn.in_proj_weight".
        experts: task names (default: every expert of the suite).
        method: optional merging method; its merged delta's spectrum is returned as "merged".
        hparams: the method's hyperparameters as a JSON object.
        calibration: "none" or a calibration name.
        calibration_hparams: the calibration's hyperparameters as a JSON object.
        preferences: per-task weights of the merge as a JSON object, as in /merge (a task not named keeps weight 1).
        seed: the merge's random seed (DARE's masks), as in /merge.
    """
    try:
        experts, req = _api_request(experts, method, hparams, calibration, calibration_hparams, preferences, seed,
                                    "merged spectrum", "the task spectra alone")
        return STUDIO.spectrum(layer, experts=experts, req=req)
    except Exception as exc:  # noqa: BLE001
        raise _user_error(exc, "spectrum") from None


def api_diagnose(experts: "list[str] | None" = None, method: str = "", hparams: "dict | str" = "{}",
                 calibration: str = "none", calibration_hparams: "dict | str" = "{}",
                 preferences: "dict | str" = "{}", seed: int = 0) -> dict:
    """Every whole-model diagnostic of a merge, as ``merge-studio diagnose --out`` writes it (null where a value is
    undefined): per-layer curves, SAR_avg per task and between tasks, every task-by-task heatmap over the model.

    Args:
        experts: task names (default: every expert of the suite).
        method: the merging method; without one, the Task Arithmetic sum's diagnostics (as ``diagnose`` without
            ``--method``).
        hparams: the method's hyperparameters as a JSON object.
        calibration: "none" or a calibration name.
        calibration_hparams: the calibration's hyperparameters as a JSON object.
        preferences: per-task weights of the merge as a JSON object, as in /merge (a task not named keeps weight 1).
        seed: the merge's random seed (DARE's masks), as in /merge.
    """
    try:
        experts, req = _api_request(experts, method, hparams, calibration, calibration_hparams, preferences, seed,
                                    "diagnostics", "the Task Arithmetic sum's diagnostics")
        return json_safe(STUDIO.report(req, pool_experts=experts))
    except Exception as exc:  # noqa: BLE001
        raise _user_error(exc, "diagnose") from None


def api_methods() -> list[dict]:
    """Every merging method and calibration with its hyperparameter schema (name, type, default, range, help)."""
    return STUDIO.methods() + STUDIO.calibrations()


def api_layers() -> list[str]:
    """The matrix layer keys that /spectrum accepts, in state-dict order."""
    return STUDIO.layer_keys()


# --------------------------------------------------------------------------------------------- UI helpers
def _make_control(spec: ControlSpec, current: Any, prefix: str, owner: str = "") -> list[gr.components.Component]:
    """One schema-driven control (+ its "auto" checkbox). ``current``: stored value, None = auto, ... = unset.
    ``owner``: a calibration's name, put before its controls' labels (SVC's and the method's would both read
    "alpha")."""
    key = f"{prefix}-{spec.name}"
    info = shown_info(spec.info)
    label = f"{owner} · {spec.label}" if owner else spec.label
    if spec.kind == "checkbox":
        return [gr.Checkbox(value=spec.value if current is ... else bool(current), label=label, info=info,
                            key=key, preserved_by_key=None, interactive=True)]
    if spec.kind == "dropdown":
        return [gr.Dropdown(choices=list(spec.choices or ()), value=spec.value if current is ... else current,
                            label=label, info=info, key=key, preserved_by_key=None, interactive=True)]
    auto = spec.auto_label is not None and (current is ... or current is None)
    value = spec.value if current is ... or current is None else current
    # buttons=[]: no ↺ of Gradio's own. It resets to the value its browser component was first created with, and
    # the browser reuses a component across renders: after a method switch, TSV-M's 0.125 for Task Arithmetic's alpha
    # (or 1.5 for Ortho-Merge's integer k). _render_params gives the controls one "Reset to defaults" instead.
    slider = gr.Slider(spec.minimum, spec.maximum, value=value, step=spec.step, label=label, info=info,
                       key=key, preserved_by_key=None, interactive=not auto, buttons=[])
    if spec.auto_label is None:
        return [slider]
    # a calibration's box is named as its slider: TSV-M's and SVC's would both read "auto (...)" to a screen reader
    box = gr.Checkbox(value=auto, label=f"{owner} · {spec.auto_label}" if owner else spec.auto_label,
                      key=f"{key}-auto", preserved_by_key=None, container=False, interactive=True)
    # ticked: the greyed slider shows the automatic value again, which the merge now uses (it kept the last manual one);
    # in the page, as every event of the controls (see _render_params)
    box.input(None, box, slider, js=auto_box_js(spec))
    return [slider, box]


def _triggers(comps: list[gr.components.Component]) -> list:
    # Sliders: on release (the live-preview contract); checkboxes / dropdowns: on user input.
    return [c.release if isinstance(c, gr.Slider) else c.input for c in comps]


def _render_params(schema: dict, stored: dict, prefix: str, state: gr.JSON, owner: str, num_tasks: int,
                   largest_rank: "int | None", tasks: gr.JSON, max_tasks: int,
                   base_method: "str | None" = None, calibration: bool = False,
                   use_best: "tuple[gr.Button, gr.JSON] | None" = None) -> None:
    """The controls of ``owner``'s schema; a calibration's (after ``base_method``) are labelled with its name. A
    stored value the range for ``num_tasks`` leaves out is shown at its nearest end, as it is merged
    (:meth:`Studio.fitted`). Where a range depends on the number of tasks, the page follows a new number of experts
    selected itself (``follow_tasks_js``): ``tasks`` holds it as ``{"T": n}`` (at most ``max_tasks``), a copy this
    render alone listens to. ``use_best``: the "Use best" button and the sweep's result it sets (a method's)."""
    specs = control_specs(schema, num_tasks=num_tasks or None, largest_rank=largest_rank, base_method=base_method)
    stored = fit_to_controls(schema, stored, num_tasks or None, largest_rank)
    if not specs:
        gr.Markdown("*No hyperparameters.*", key=f"{prefix}-none")
        return
    comps: list = []
    shown: dict[str, gr.components.Component] = {}
    for spec in specs:
        made = _make_control(spec, stored.get(spec.name, ...), prefix, owner if calibration else "")
        shown[spec.name] = made[0]
        comps.extend(made)
    scale = post_scale_param(schema)
    if use_best is not None and scale is not None and scale["name"] in shown:
        # in the page, as the controls' stores (use_best_js); the button's only listener, as a render's listener on
        # a component outside it takes the place of the others
        button, best = use_best
        button.click(None, [best, state], [shown[scale["name"]], state], js=use_best_js(owner, scale["name"]))
    reset = gr.Button(f"Reset {owner} to defaults", size="sm", variant="secondary", key=f"{prefix}-reset")
    # The controls' events run in the page (no round trip): the stored values change in the order the user set them,
    # before a click that follows reads them. Stored on the server, two quick changes reached it out of order now
    # and then (their requests travel apart: four key presses stored 4.85, then 4.9, over the shown 4.85), a click
    # could overtake a store, and a render of the controls could replace the function a store was sent to.
    # The controls and the stored values in one event: the state keeps one writer per event.
    follow = follow_tasks_js(schema, owner, max_tasks, largest_rank=largest_rank, base_method=base_method)
    # with the ranges and "auto" starts of the selection at hand, which may be another than at the render
    reset.click(None, state if follow is None else [tasks, state], [*comps, state],
                js=reset_js(specs, owner, follow))
    sources = sources_markdown(specs)
    if sources:   # folded: with them, each help text ran to ten lines
        with gr.Accordion(f"{owner}: where the defaults come from", open=False, key=f"{prefix}-sources"):
            gr.Markdown(sources, key=f"{prefix}-sources-text")
    # An integer slider's box may hold what its range does not show (6.5, shown at 7): the store sets it to the value
    # stored, so that the box, the range and the merge agree (store_js). A number typed beyond a slider's end is
    # stored as typed, before Gradio shows the end in the box; the request takes the end (Studio.fitted). An emptied
    # box shows the value stored as the range shows it: with the ranges of the selection at hand, which a new one sets
    # in the page (below)
    by_tasks = None if follow is None else specs_by_tasks(schema, max_tasks, largest_rank=largest_rank,
                                                          base_method=base_method)
    gr.on(_triggers(comps), None, inputs=[state, *comps] if follow is None else [tasks, state, *comps],
          outputs=[state, *comps], js=store_js(specs, owner, by_tasks), trigger_mode="multiple")
    # A new expert selection sets the ranges that depend on T, and fits the stored values to them, in the page: a
    # render from the server would put back the values the page held when it was asked for (a value typed into
    # another slider's box in the meantime was lost), and a server write of the stored values could do the same.
    # On a copy of the number for this render alone: in Gradio 6.31 a listener a render adds to an event of a
    # component outside it takes the place of every other listener of that event (on the expert selection's
    # change, follow_experts stopped; with the method's and the calibration's on one event, one of them)
    if follow is not None:
        tasks.change(None, [tasks, state, *comps], [state, *comps], trigger_mode="multiple",
                     js=f"(tasks, ...rest) => ({follow})(tasks.T, ...rest)")


#: What a stopped job says, where its results would have gone.
STOPPED = {"merge": "Merge stopped.", "optimise": "Optimisation stopped."}
#: The status line a stopped job leaves: the merge's line, the sweep's (in italics).
STOPPED_LINE = {"merge": STOPPED["merge"], "optimise": f"*{STOPPED['optimise']}*"}


@contextlib.contextmanager
def _job(sess: Any, kind: str):
    """Mark ``sess`` as running a ``kind`` job (a :data:`STOPPED` key) while the block runs (a job a Stop left
    running, which ends later, does not clear the mark of the one after it)."""
    mark = (kind, object())
    sess.job = mark
    try:
        yield
    finally:
        if sess.job is mark:
            sess.job = None


def _arm(request: gr.Request, kind: str) -> None:
    """The click that starts a ``kind`` job (a :data:`STOPPED` key), at once (unqueued): a Stop pressed from now on
    keeps the job it starts from starting (:func:`_stopped_since_click`), and says so at once (the job waits in the
    queue meanwhile: ``waiting``)."""
    sess = SESSIONS.get(request.session_hash)
    with sess.lock:
        sess.armed = sess.stops
        sess.waiting.add(kind)


def _stopped_since_click(sess: Any, kind: str) -> bool:
    """Whether Stop was pressed since the click that queued the ``kind`` job about to start; if not, the job starts
    with the session's stop flag cleared (a Stop before the click stopped an earlier job) and leaves ``waiting``."""
    with sess.lock:
        if sess.stops != sess.armed:
            return True
        sess.stop_requested = False
        sess.waiting.discard(kind)
        return False


def _count(n: int, noun: str) -> str:
    """``1 task``, ``8 tasks``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _edge_note(res: dict[str, Any]) -> str:
    """A sweep's best value at an end of its range may not be the best: say so, and which way to widen it."""
    alphas, best = res["alphas"], res["best_alpha"]
    if len(alphas) < 2 or best not in (alphas[0], alphas[-1]):
        return ""
    side, where = ("lower", "below") if best == alphas[0] else ("upper", "above")
    return (f" It is the sweep's {side} end: the best {res['param']} may lie {where} it; widen the range and run "
            "it again.")


def _method_markdown(studio: Studio, method: str) -> str:
    if not method:
        return ""
    s = studio.schema(method)
    more = f" · needs ≥ {s['min_experts']} experts" if s.get("min_experts", 1) > 1 else ""
    return f"**{s['name']}**: {s['summary']}  \n<small>{s['paper']}{more}</small>"


def _accuracy_outputs(table: dict[str, dict[str, Any]]) -> tuple[pd.DataFrame, Any, Any]:
    header, rows = accuracy_rows(table)
    return (pd.DataFrame(rows, columns=header), *plots.accuracy_figures(table))


def _optimise_setup(studio: Studio, method: str) -> tuple[str, bool, "float | None", "float | None", str]:
    """Label/state of the Optimise button, the default sweep interval and the label of "Use best" for ``method``
    (its scale by name: AlignMerge's is ``lam``)."""
    schema = studio.schema(method) if method else {"params": []}
    scale, span = post_scale_param(schema), sweep_defaults(schema)
    if scale is None or span is None:
        return "Optimise α (this method has no global scale)", False, None, None, "Use best α"
    return f"Optimise {scale['name']}", True, span[0], span[1], f"Use best {scale['name']}"


def _leaderboard_frame(sess, studio: Studio) -> gr.Dataframe:
    """The session's leaderboard, each column at least as wide as its name: Gradio sizes a column by its cells, and
    a task's ("house_numbers") above two-digit accuracies was cut into five lines."""
    header, rows = sess.leaderboard(pool=studio.task_names)   # "all 8" only for the whole suite
    return gr.Dataframe(pd.DataFrame(rows, columns=header), column_widths=leaderboard_widths(header))


# --------------------------------------------------------------------------------------------- the app
def build_demo(studio: Studio) -> gr.Blocks:
    """Build the Blocks app around one loaded :class:`Studio` (the suite is never reloaded per event)."""
    colors = plots.TaskColors(studio.task_names)
    # the per-layer curves of the diagnostics updates (two at once: their concurrency_limit)
    curves_pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="curves")
    methods = [m["name"] for m in studio.methods()]
    default_method = studio.default_method()
    calibrations = ["none", *(c["name"] for c in studio.calibrations())]
    layer_keys = studio.layer_keys()
    metrics = studio.metric_names()
    expert_choices = studio.expert_choices()  # manifest values only: building the page never evaluates

    with gr.Blocks(title="Merge Studio", delete_cache=(1800, 3600)) as demo:
        gr.Markdown(f"## Merge Studio\nSuite **{studio.suite_name}**: {len(studio.task_names)} task experts. "
                    "Pick experts and a method, watch the spectra while you tune, then merge, evaluate and export.")
        # The controls' values, held in the page (hidden), which stores them itself (see _render_params): each
        # event that reads them gets them as the page holds them when it is sent
        hp_state = gr.JSON({}, visible="hidden")     # {method: {param: value | None (auto)}}
        cal_state = gr.JSON({}, visible="hidden")    # {calibration: {param: value}}
        pref_state = gr.JSON({}, visible="hidden")   # {task: weight}
        # the number of experts selected, copied by the page for the method's and the calibration's controls, which
        # follow it in the page (see _render_params)
        hp_tasks = gr.JSON({"T": len(studio.task_names)}, visible="hidden")
        cal_tasks = gr.JSON({"T": len(studio.task_names)}, visible="hidden")
        hp_reload = gr.State(0)    # changed to re-render the method controls from hp_state
        cal_reload = gr.State(0)   # likewise for the calibration's controls
        pref_reload = gr.State(0)  # and for the preference sliders (a new expert selection)
        best_alpha = gr.JSON(None, visible="hidden")   # the last sweep's {method, param, value}, for "Use best"

        with gr.Row(equal_height=False):
            # ----------------------------------------------------------------- setup panel
            with gr.Column(scale=1, min_width=330):
                experts_cb = gr.CheckboxGroup(expert_choices, value=list(studio.task_names), label="Expert pool",
                                              info="each expert's own test accuracy on its task", show_select_all=True,
                                              elem_id="expert-pool")
                method_dd = gr.Dropdown(methods, value=default_method, label="Merging method")
                method_md = gr.Markdown(_method_markdown(studio, default_method))
                with gr.Group():
                    # Each user event here has one listener, which the others follow through a reload mark (a
                    # state's change is sent to its listeners one by one): the page sends an event again to all its
                    # listeners when one that was busy ends (Gradio's "always_last"), and with the render, the
                    # diagnostics and two updates on the method's change, two busy ones took turns without end
                    # (the controls rendered again every 0.3 s, a value typed into them lost)
                    @gr.render(inputs=[method_dd, experts_cb, hp_state], triggers=[hp_reload.change, demo.load])
                    def method_controls(method: str, experts: list, hp: dict):
                        if method:
                            _render_params(studio.schema(method), _page_settings(hp, method, "method"), f"hp-{method}",
                                           hp_state, method, len(experts or []), studio.largest_rank(method),
                                           hp_tasks, len(studio.task_names), use_best=(apply_btn, best_alpha))

                calibration_dd = gr.Dropdown(calibrations, value="none", label="Calibration",
                                             info="applied after the base method on every matrix layer")

                # the method too: a calibration's automatic start may depend on it (SVC's alpha: 1.0 after TSV-M;
                # on_method renders it again then, and only then)
                with gr.Group():   # one block, as the method's: a slider's "auto" box sat apart from it
                    @gr.render(inputs=[calibration_dd, experts_cb, cal_state, method_dd],
                               triggers=[cal_reload.change, demo.load])
                    def calibration_controls(calibration: str, experts: list, cal: dict, method: str):
                        if calibration and calibration != "none":
                            _render_params(studio.schema(calibration, "calibration"),
                                           _page_settings(cal, calibration, "calibration"),
                                           f"cal-{calibration}", cal_state,
                                           calibration, len(experts or []),
                                           studio.largest_rank(calibration, "calibration"), cal_tasks,
                                           len(studio.task_names), method, calibration=True)

                calibration_dd.change(time.monotonic_ns, None, cal_reload, show_progress="hidden",
                                      api_visibility="private")

                followed = gr.State(None)   # the expert selection follow_experts last followed

                def follow_experts(experts: list, done: Any):
                    """The preference sliders and the diagnostics follow a new selection through ``pref_reload``
                    (a fresh value, not a counter); the controls whose range depends on the number of tasks follow
                    it in the page (see _render_params). An earlier run may already have seen the last selection,
                    whose weights are then not rendered twice (a weight moved between two renders would be lost with
                    the first)."""
                    selection = list(experts or [])
                    if selection == done:
                        return gr.skip(), gr.skip()
                    return time.monotonic_ns(), selection

                experts_cb.change(follow_experts, [experts_cb, followed], [pref_reload, followed],
                                  show_progress="hidden", api_visibility="private", trigger_mode="always_last")
                experts_cb.input(None, experts_cb, [hp_tasks, cal_tasks],
                                 js="(names) => [{T: (names || []).length}, {T: (names || []).length}]",
                                 trigger_mode="multiple")

                with gr.Accordion("Task preferences", open=False, elem_id="pref-sliders"):
                    gr.Markdown("<small>Relative weight of each task: drives the calibration's preference weighting "
                                "(without calibration each task matrix is scaled by its weight over the largest). "
                                "Equal = uniform.</small>")

                    @gr.render(inputs=[experts_cb, pref_state], triggers=[pref_reload.change, demo.load])
                    def preference_sliders(experts: list, prefs: dict):
                        names = [t for t in studio.task_names if t in (experts or [])]
                        prefs = _page_settings(prefs, None, "preference")
                        if not names:
                            gr.Markdown("*Select experts first.*", key="pref-none")
                            return
                        # interactive=True: components created in a render are not inferred to be inputs.
                        # buttons=[]: Gradio's own ↺ resets to the value its browser component was first created
                        # with, which the browser reuses across renders (see _make_control); "Equal weights" below
                        specs = [ControlSpec(t, "slider", t, 1.0, minimum=0.0, maximum=1.0, step=0.05) for t in names]
                        sliders = [gr.Slider(s.minimum, s.maximum, value=prefs.get(s.name, s.value),
                                             step=s.step, label=s.label, key=f"pref-{s.name}", preserved_by_key=None,
                                             interactive=True, buttons=[])
                                   for s in specs]

                        # in the page, as the method's controls (see _render_params); the weights of the tasks not
                        # shown are kept, for when they are selected again
                        gr.on([s.release for s in sliders], None, inputs=[pref_state, *sliders],
                              outputs=[pref_state, *sliders], js=store_js(specs, None), trigger_mode="multiple")
                        equal = gr.Button("Equal weights", size="sm", variant="secondary", key="pref-equal")
                        # every task's weight equal, those not shown too (dropped: 1 when shown again)
                        equal.click(None, None, [*sliders, pref_state], js=reset_js(specs, None))

                # held as a JavaScript number: exact up to 2^53 - 1
                seed_nb = gr.Number(0, precision=0, label="Seed (stochastic methods)", minimum=0,
                                    maximum=SEED_BOX_MAX, elem_id="seed-box")
                # the box shows the seed merged: Gradio rounds its number for the server alone (half to even, as
                # Python's round), and the box kept 2.7 while the merge took 3
                for done in (seed_nb.blur, seed_nb.submit):
                    done(None, seed_nb, seed_nb, js=ROUND_HALF_EVEN_JS, show_progress="hidden")
                with gr.Row():
                    merge_btn = gr.Button("Merge & evaluate", variant="primary", scale=3)
                    stop_btn = gr.Button("Stop", variant="stop", scale=1)

            # ----------------------------------------------------------------- main area
            with gr.Column(scale=3):
                with gr.Tabs() as tabs:
                    with gr.Tab("Diagnostics", id="diag") as diag_tab:
                        with gr.Row():
                            layer_dd = gr.Dropdown(layer_keys, value=studio.default_layer(), label="Layer", scale=3)
                            # wide enough for its longest name ("subspace_similarity" was cut at 1500 px)
                            metric_dd = gr.Dropdown(metrics, value=studio.default_metric(), label="Interference metric",
                                                    scale=2, min_width=240)
                            scope_radio = gr.Radio([("this layer", "layer"), ("whole model", "model")], value="layer",
                                                   label="Heatmap over", scale=1, elem_id="heatmap-scope")
                        diag_md = gr.Markdown("", elem_classes="ms-status", elem_id="diag-status")
                        # min_width: on a narrow page (640 px, a 1280 px screen at 200 % zoom) the plots wrap one to
                        # a row; two to a row, each 290 px wide, their labels overlapped and their titles were cut
                        with gr.Row():
                            spectrum_plot = gr.Plot(label="Spectrum", elem_id="spectrum-plot", min_width=PLOT_MIN_WIDTH)
                            energy_plot = gr.Plot(label="Cumulative energy", elem_id="energy-plot",
                                                  min_width=PLOT_MIN_WIDTH)
                        with gr.Row():
                            with gr.Column(min_width=PLOT_MIN_WIDTH):
                                heatmap_plot = gr.Plot(label="Interference", elem_id="heatmap-plot",
                                                       min_width=PLOT_MIN_WIDTH)
                                metric_md = gr.Markdown("")
                            curves_plot = gr.Plot(label="Per-layer curves", elem_id="curves-plot",
                                                  min_width=PLOT_MIN_WIDTH)
                        # the numbers: the plots' data and every whole-model diagnostic, as `diagnose --out` writes
                        # them, with their summary in words
                        with gr.Row(equal_height=True):
                            report_btn = gr.Button("Whole-model report", scale=1, elem_id="make-report")
                            report_dl = gr.DownloadButton("Report and plotted data (.json)", interactive=False,
                                                          scale=1, size="md", elem_id="dl-report")
                        report_md = gr.Markdown("", elem_id="report-status")
                    with gr.Tab("Results", id="results") as results_tab:
                        run_md = gr.Markdown("Press **Merge & evaluate** to merge the selected experts.",
                                             elem_id="run-status")
                        # its columns before a merge too (an empty table showed the headers "1 | 2 | 3")
                        acc_df = gr.Dataframe(pd.DataFrame(columns=accuracy_rows({})[0]),
                                              label="Per-task test accuracy", interactive=False, elem_id="acc-table")
                        with gr.Row():
                            acc_plot = gr.Plot(label="Accuracy", elem_id="acc-plot")
                            norm_plot = gr.Plot(label="Normalized accuracy", elem_id="norm-plot")
                        gallery = gr.Gallery(label="Sample test images · merged model's predictions "
                                                   "(✓ correct, ✗ wrong)", columns=6, height=420, object_fit="contain",
                                             elem_id="pred-gallery")
                        with gr.Row():
                            weights_dl = gr.DownloadButton("Merged weights (.safetensors)", interactive=False,
                                                           size="md", elem_id="dl-weights")
                            recipe_dl = gr.DownloadButton("Recipe (.yaml)", interactive=False, size="md",
                                                          elem_id="dl-recipe")
                            csv_dl = gr.DownloadButton("Leaderboard (.csv)", interactive=False, size="md",
                                                       elem_id="dl-csv")
                        recipe_code = gr.Code(label="Recipe (reproduces these weights with "
                                                    "studio.io.merge_from_recipe)", language="yaml",
                                              interactive=False, show_line_numbers=False)
                        leaderboard = gr.Dataframe(label="Session leaderboard (runs over the same experts together, "
                                                         "best average normalized accuracy first)",
                                                   interactive=False, wrap=True, elem_id="leaderboard")
                        # the settings of a run, or of a recipe (a file this page exported, or the library's), back
                        # into the setup panel, to merge again or tune from
                        with gr.Row(equal_height=True):
                            run_dd = gr.Dropdown([], value=None, label="Run of this session", scale=3,
                                                 elem_id="run-pick", interactive=True)
                            load_run_btn = gr.Button("Load its settings", interactive=False, scale=1,
                                                     elem_id="load-run")
                            remove_run_btn = gr.Button("Remove it", interactive=False, scale=1, variant="secondary",
                                                       elem_id="remove-run")
                            recipe_up = gr.UploadButton("Load a recipe (.yaml, .json, .safetensors)", scale=1,
                                                        file_types=[".yaml", ".yml", ".json", ".safetensors"],
                                                        elem_id="load-recipe")
                        load_md = gr.Markdown("", elem_id="load-status")
                    with gr.Tab("Optimise", id="optimise") as optimise_tab:
                        gr.Markdown("Sweep the method's global scale α on the **validation** split and pick the value "
                                    "that maximises the preference-weighted normalized accuracy Σ p_i·acc_i/ind_i "
                                    "(task preferences from the setup panel; uniform = the average normalized "
                                    "accuracy of the TSV/Iso validation protocol).")
                        opt_label, opt_active, opt_lo, opt_hi, apply_label = _optimise_setup(studio, default_method)
                        with gr.Row():
                            alpha_lo = gr.Number(opt_lo if opt_lo is not None else 0.1, label="α from")
                            alpha_hi = gr.Number(opt_hi if opt_hi is not None else 1.5, label="α to")
                            # buttons=[]: Gradio's ↺ would be named "Reset to default value" alone, as the others
                            alpha_n = gr.Slider(3, 25, value=9, step=1, label="number of α values", buttons=[])
                        with gr.Row():
                            optimise_btn = gr.Button(opt_label, variant="primary", interactive=opt_active)
                            apply_btn = gr.Button(apply_label, interactive=False)
                        opt_md = gr.Markdown("", elem_id="opt-status")
                        alpha_plot = gr.Plot(label="Accuracy vs α", elem_id="alpha-plot")

        # ------------------------------------------------------------------------------- handlers
        def _ui_request(method, hp, experts, calibration, cal, prefs, seed=0) -> MergeRequest:
            return studio.request_from_state(method, hp, experts, calibration, cal, prefs, int(seed or 0))

        def on_method(method: str, calibration: str):
            """The method's description and sweep; its controls rendered again (``hp_reload``), and the calibration's
            where their automatic start depends on the method (``cal_reload``)."""
            label, active, lo, hi, apply_label = _optimise_setup(studio, method)
            follows = calibration not in (None, "", "none") and depends_on_method(
                studio.schema(calibration, "calibration"))
            # the last sweep was of another method: its curve, best value and "Use best α" go with it
            return (_method_markdown(studio, method), gr.Button(interactive=active, value=label),
                    gr.skip() if lo is None else lo, gr.skip() if hi is None else hi,
                    None, "", None, gr.Button(interactive=False, value=apply_label), time.monotonic_ns(),
                    time.monotonic_ns() if follows else gr.skip())

        # a plot drawn while its tab was hidden took Plotly's default 700 px in a narrower box (legends, the colour bar
        # and the curves' right end cut off until the window was resized): a tab shown lays its plots out again
        for tab in (diag_tab, results_tab, optimise_tab):
            tab.select(None, js="() => { setTimeout(() => window.dispatchEvent(new Event('resize')), 50); }")
        # a sweep over other experts: its best value does not apply to these (it did, at one click of "Use best")
        experts_cb.change(lambda: (None, "", None, gr.Button(interactive=False)), None,
                          [alpha_plot, opt_md, best_alpha, apply_btn], api_visibility="private",
                          show_progress="hidden")

        method_dd.change(on_method, [method_dd, calibration_dd],
                         [method_md, optimise_btn, alpha_lo, alpha_hi, alpha_plot, opt_md, best_alpha, apply_btn,
                          hp_reload, cal_reload], api_visibility="private", show_progress="hidden")

        def _shown_request(method, hp, experts, calibration, cal, prefs,
                           seed) -> "tuple[MergeRequest | None, str | None]":
            """The merge the diagnostics show, or, for settings the method refuses (e.g. a value out of its range),
            None and why: the plots and the report then show the task side against the Task Arithmetic sum."""
            try:
                return _ui_request(method, hp, experts, calibration, cal, prefs, seed), None   # the seed: DARE's masks
            except StudioError as exc:
                return None, str(exc)

        def _curves_figure(c: dict, layer: str):
            return (plots.layer_curves_figure(c["keys"], c["sti"], c["entropy"], c["sar"], colors,
                                              merged_entropy=c["merged_entropy"], selected=layer,
                                              sar_reference=c["sar_reference"], sar_avg=c.get("sar_avg"))
                    if c else plots.empty_figure("no per-layer curves", height=600))

        def update_diagnostics(method, hp, experts, calibration, cal, prefs, layer, metric, scope="layer", seed=0):
            """The four plots of the settings, the layer's three first: the per-layer curves (every layer's merged
            delta decomposed again after a structural change: 6.6-7.2 s on 8 ViT-B/32 experts, the layer's plots
            2.7-4.0 s) follow when ready, the status line saying so in between; where they are ready within
            CURVES_WAIT_S (MiniSuite) all four come at once."""
            t0 = time.perf_counter()
            experts = list(experts or [])
            if not experts:
                msg = "Select at least one expert to see diagnostics."
                empty = plots.empty_figure(msg)
                yield empty, empty, empty, plots.empty_figure(msg, height=600), f"⚠️ {msg}", ""
                return
            req, why = _shown_request(method, hp, experts, calibration, cal, prefs, seed)
            note = "" if why is None else f" · ⚠️ merged delta unavailable: {why}"
            try:
                d = studio.diagnostics(req, layer, metric, pool_experts=experts, heatmap=scope or "layer",
                                       curves=False)
            except Exception as exc:  # noqa: BLE001 - a live preview reports, it never pops errors
                log.exception("diagnostics failed")
                msg = f"diagnostics failed: {exc}"
                empty = plots.empty_figure(msg)
                yield empty, empty, empty, plots.empty_figure(msg, height=600), f"⚠️ {msg}", ""
                return
            curves_job = curves_pool.submit(studio.curves, req, pool_experts=experts)
            spec = plots.spectrum_figure(d.spectra, d.merged_spectrum, colors, layer=layer)
            energy = plots.energy_figure(d.energy, d.merged_energy, colors, layer=layer)
            info = d.metric_info
            cols = [f"σ{j + 1}" for j in range(d.interference.shape[1])] if info["shape"] == "TxK" else d.tasks
            heat = plots.heatmap_figure(d.interference, d.tasks, cols, metric=metric, value_range=info["range"],
                                        signed=info["signed"], center=info["center"], scope=d.heatmap_scope)
            # the heatmap takes each metric's default k: say which (Fig. 1's 5 for the subspace similarity, ...)
            k_note = "" if info["k_help"] == "k is not used" else f" Shown at the default: {info['k_help']}."
            metric_text = f"<small>**{metric}**: {info['description']}{k_note} [{info['paper']}]</small>"
            # which merge the plots show: under load they lag the controls, and the line says how far
            shown = f"{req.method} ({studio.describe(req)})" if req is not None else method
            layers = f"`{layer}` {tuple(studio.suite.base[layer].shape)}"
            first = (spec, energy, heat)
            try:
                try:
                    c = curves_job.result(timeout=CURVES_WAIT_S)
                except concurrent.futures.TimeoutError:
                    # the layer's plots now; the line starts otherwise than the final one (which the tests wait for)
                    yield (*first, gr.skip(), f"Per-layer curves of {shown} in progress… · {layers} drawn in "
                           f"{time.perf_counter() - t0:.2f} s{note}", metric_text)
                    first = (gr.skip(),) * 3
                    c = curves_job.result()
            except Exception as exc:  # noqa: BLE001 - the layer's plots stay
                log.error("per-layer curves failed", exc_info=exc)
                msg = f"per-layer curves failed: {exc}"
                yield *first, plots.empty_figure(msg, height=600), f"⚠️ {msg}{note}", metric_text
                return
            merged_top = d.merged_spectrum is not None and len(d.merged_spectrum)
            top = f"{float(d.merged_spectrum[0]):.4g}" if merged_top else "n/a"
            status = (f"{shown} · {layers} · {_count(len(experts), 'task')} · merged σ₁ = {top} · updated in "
                      f"{time.perf_counter() - t0:.2f} s{note}")
            yield (*first, _curves_figure(c, layer), status, metric_text)

        diag_inputs = [method_dd, hp_state, experts_cb, calibration_dd, cal_state, pref_state, layer_dd, metric_dd,
                       scope_radio, seed_nb]
        # the method, the calibration and the experts through their reload marks (see method_controls)
        gr.on([demo.load, hp_state.change, cal_state.change, pref_state.change, hp_reload.change, cal_reload.change,
               pref_reload.change, layer_dd.change, metric_dd.change, scope_radio.change, seed_nb.change],
              update_diagnostics, inputs=diag_inputs,
              outputs=[spectrum_plot, energy_plot, heatmap_plot, curves_plot, diag_md, metric_md],
              trigger_mode="always_last", show_progress="hidden", concurrency_id="diagnostics", concurrency_limit=2,
              api_visibility="private")

        def make_report(method, hp, experts, calibration, cal, prefs, layer, metric, scope, seed,
                        request: gr.Request, progress=gr.Progress()):
            """The whole-model report of the current settings and the plots' data (:meth:`Studio.report`), as a
            JSON file to download and its summary in words."""
            t0 = time.perf_counter()
            experts = list(experts or [])
            try:
                if not experts:
                    raise StudioError("no expert selected: pick at least one task expert to report on")
                req, why = _shown_request(method, hp, experts, calibration, cal, prefs, seed)   # as the plots
                shown = studio.diagnostics(req, layer, metric, pool_experts=experts, heatmap=scope or "layer")
                rep = studio.report(req, shown, pool_experts=experts, why=why,
                                    progress=lambda frac, msg: progress(frac, desc=msg))
                stem = f"diagnostics_{req.method if req is not None else 'task_arithmetic_sum'}"
                path = session_dir(_RUN, request.session_hash) / \
                    f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}_{uuid.uuid4().hex[:6]}.json"
                with atomic_write(path) as tmp:
                    Path(tmp).write_text(json.dumps(json_safe(rep), indent=1, allow_nan=False))
            except Exception as exc:  # noqa: BLE001
                raise _user_error(exc, "report") from None
            merge = (f"{req.method} ({studio.describe(req)})" if req is not None
                     else f"the Task Arithmetic sum (the method cannot merge them: {why})")
            lines = "\n".join(f"- {line}" for line in diag.report_summary(rep))
            md = (f"Report of {merge} on {_count(len(rep['tasks']), 'expert')}, "
                  f"{_count(len(rep['layers']['key']), 'matrix layer')}, with the plots' data (`shown`), made in "
                  f"{time.perf_counter() - t0:.2f} s:\n\n{lines}")
            return md, gr.DownloadButton(value=str(path), interactive=True)

        # the last report goes first (at once, unqueued): one that fails then leaves no other settings' report up
        report_btn.click(lambda: ("", gr.DownloadButton(value=None, interactive=False)), None, [report_md, report_dl],
                         trigger_mode="once", queue=False, show_progress="hidden", api_visibility="private").then(
            make_report, inputs=diag_inputs, outputs=[report_md, report_dl], concurrency_id="diagnostics",
            concurrency_limit=2, api_visibility="private", show_progress_on=[report_md])

        def run_merge(method, hp, experts, calibration, cal, prefs, seed, request: gr.Request,
                      progress=gr.Progress()):
            sess = SESSIONS.get(request.session_hash)
            if _stopped_since_click(sess, "merge"):   # while the job waited in the queue
                gr.Warning(STOPPED["merge"])
                return (gr.skip(),) * 14
            try:
                with _job(sess, "merge"):
                    req = _ui_request(method, hp, experts, calibration, cal, prefs, seed)
                    folder = session_dir(_RUN, request.session_hash)
                    progress(0.0, desc="merging")
                    out = merge_and_evaluate(req, str(folder), request.session_hash, progress)
                    try:
                        table = out["table"]
                        frame, acc_fig, norm_fig = _accuracy_outputs(table)
                        recipe_text = Path(out["files"]["recipe"]).read_text()
                        csv_path = Path(out["files"]["weights"]).parent / "leaderboard.csv"
                        # The run is recorded unless Stop came first (request_stop takes the lock too): Stop has said
                        # "Merge stopped." on the page by then, and a run recorded after it would be one the page never
                        # showed (its number skipped, a row in the leaderboard and its CSV). From here the job is done,
                        # and a Stop finds none to stop
                        with sess.lock:
                            if sess.stop_requested:
                                raise _Cancelled("stopped by the user")
                            record = sess.add_run(method=req.method, settings=studio.describe(req), experts=req.experts,
                                                  accuracy={t: r["merged"] for t, r in table.items()},
                                                  normalized={t: r["normalized"] for t, r in table.items()
                                                              if r["normalized"] is not None},
                                                  seconds=out["total_s"], recipe=out["recipe"])
                            sess.job = None
                        csv_path.write_text(sess.leaderboard_csv(pool=studio.task_names))
                        # the last run's weights and recipe go: the page offers this run's only (two merges in one
                        # second may export under one name)
                        _remove_exports(sess, keep=out["files"].values())
                        sess.files.update(out["files"], csv=str(csv_path))
                    except BaseException:
                        # a Stop or a closed page after the export, or a failure: no run offers its files
                        _discard_exports(out["files"], request.session_hash)
                        raise
            except _Cancelled:
                if SESSIONS.find(request.session_hash) is not sess:   # the page closed: the export made its folder
                    _drop_session_files(request.session_hash)
                gr.Warning(STOPPED["merge"])
                return (gr.skip(),) * 14
            except Exception as exc:  # noqa: BLE001
                raise _user_error(exc, "merge") from None
            status = (f"Run **#{record.run}** · {req.method} ({record.settings}) on "
                      f"{_count(len(req.experts), 'expert')} · average accuracy **{record.avg_accuracy:.1f}%** "
                      f"(normalized {record.avg_normalized:.1f}%) · merge {out['merge_s']:.2f} s + evaluation "
                      f"{out['eval_s']:.2f} s")
            return (status, frame, acc_fig, norm_fig, out["gallery"], _leaderboard_frame(sess, studio),
                    gr.DownloadButton(value=out["files"]["weights"], interactive=True),
                    gr.DownloadButton(value=out["files"]["recipe"], interactive=True),
                    gr.DownloadButton(value=str(csv_path), interactive=True), recipe_text, gr.Tabs(selected="results"),
                    gr.Dropdown(choices=sess.run_choices(), value=record.run), gr.Button(interactive=True),
                    gr.Button(interactive=True))

        def settled(button: gr.Button, kind: str, status: gr.Markdown):
            """The first step of a click on ``button`` (:func:`_arm`); the job follows on its success and reads its
            inputs, the values the page holds, then (the page stores every control's change itself, and the server
            writes none of them: no step need wait for one). A second click while the job is pending is dropped by
            the page (``once``); the job does not start once Stop was pressed since the click. The last job's
            "stopped" line in the job's ``status`` goes (it stayed under the new job's progress until its end)."""
            def arm(shown: Any, request: gr.Request):
                _arm(request, kind)
                return "" if shown == STOPPED_LINE[kind] else gr.skip()

            return button.click(arm, status, status, trigger_mode="once", show_progress="hidden",
                                api_visibility="private", queue=False)

        settled(merge_btn, "merge", run_md).success(
            run_merge, inputs=[method_dd, hp_state, experts_cb, calibration_dd, cal_state, pref_state, seed_nb],
            outputs=[run_md, acc_df, acc_plot, norm_plot, gallery, leaderboard, weights_dl, recipe_dl, csv_dl,
                     recipe_code, tabs, run_dd, load_run_btn, remove_run_btn],
            concurrency_id="gpu", concurrency_limit=1, api_visibility="private", show_progress_on=[run_md])

        def run_optimise(method, hp, experts, calibration, cal, prefs, seed, lo, hi, n, request: gr.Request,
                         progress=gr.Progress()):
            sess = SESSIONS.get(request.session_hash)
            if _stopped_since_click(sess, "optimise"):   # while the job waited in the queue
                gr.Warning(STOPPED["optimise"])
                return gr.skip(), STOPPED_LINE["optimise"], gr.skip(), gr.skip()
            try:
                with _job(sess, "optimise"):
                    req = _ui_request(method, hp, experts, calibration, cal, prefs, seed)
                    alphas = studio.alpha_grid(req.method, lo, hi, int(n))
                    res = sweep_alpha(req, alphas, progress, request.session_hash)
            except _Cancelled:
                gr.Warning(STOPPED["optimise"])
                return gr.skip(), STOPPED_LINE["optimise"], gr.skip(), gr.skip()
            except Exception as exc:  # noqa: BLE001
                raise _user_error(exc, "optimise") from None
            fig = plots.alpha_curve_figure(res["alphas"], res["objective"], res["per_task"], colors,
                                           best=res["best_alpha"])
            md = (f"Best for {req.method}: **{res['param']} = {res['best_alpha']:g}**, preference-weighted validation "
                  f"normalized accuracy **{res['best_objective']:.1f}%** (weights " +
                  ", ".join(f"{k} {v:.3g}" for k, v in res["weights"].items()) + ")." + _edge_note(res))
            best = {"method": req.method, "param": res["param"], "value": res["best_alpha"]}
            return fig, md, best, gr.Button(interactive=True)

        settled(optimise_btn, "optimise", opt_md).success(
            run_optimise, inputs=[method_dd, hp_state, experts_cb, calibration_dd, cal_state, pref_state, seed_nb,
                                  alpha_lo, alpha_hi, alpha_n],
            outputs=[alpha_plot, opt_md, best_alpha, apply_btn], concurrency_id="gpu", concurrency_limit=1,
            api_visibility="private", show_progress_on=[opt_md])

        # "Use best": in the page, with the method's controls (see _render_params)

        def load_settings(recipe: Any, what: str, hp: Any, cal: Any, prefs: Any):
            """The setup panel set to ``recipe``'s merge (:meth:`Studio.settings_from_recipe`): the method, the
            experts, the calibration and the seed where the method draws from it, and the stored values, which the
            controls are rendered again from. The server writes the stored values here, as one user action; the
            selection's change finds the preference sliders already following it (``followed``)."""
            try:
                got = studio.settings_from_recipe(recipe, hp, cal, prefs)
            except Exception as exc:  # noqa: BLE001
                raise _user_error(exc, "load settings") from None
            req = got.request
            experts, tasks, now = list(req.experts), {"T": len(req.experts)}, time.monotonic_ns()
            text = (f"Loaded {what}: **{req.method}** ({studio.describe(req)}) on "
                    f"{_count(len(experts), 'expert')}, into the setup panel; **Merge & evaluate** merges it."
                    + "".join(f"  \n⚠️ {note}" for note in got.notes))
            seed = gr.skip() if req.drawn_seed is None else req.drawn_seed   # the box is left as it is for the others
            return (req.method, experts, req.calibrate or "none", seed, got.hp_state, got.cal_state, got.pref_state,
                    tasks, tasks, now, now, now, experts, text)

        loaded = [method_dd, experts_cb, calibration_dd, seed_nb, hp_state, cal_state, pref_state, hp_tasks, cal_tasks,
                  hp_reload, cal_reload, pref_reload, followed, load_md]

        def picked(sess: Any, run: Any, what: str) -> Any:
            """The session's run ``run`` picked in the list, for ``what`` (an error's title)."""
            record = sess.run_record(run)
            if record is None:
                raise gr.Error(f"no run {run!r} in this session: pick one of the list", title=what, duration=None)
            return record

        def load_run(run: Any, hp: Any, cal: Any, prefs: Any, request: gr.Request):
            record = picked(SESSIONS.get(request.session_hash), run, "load settings")
            return load_settings(record.recipe, f"run #{record.run}'s settings", hp, cal, prefs)

        def remove_run(run: Any, request: gr.Request):
            """Take a run off the session's leaderboard and its CSV (the runs after it keep their numbers). The run
            the results show (the last one made) takes its results, downloads and exported files along."""
            sess = SESSIONS.get(request.session_hash)
            with sess.lock:   # as a merge records its run
                record = sess.remove_run(picked(sess, run, "remove run").run)
                frame, choices = _leaderboard_frame(sess, studio), sess.run_choices()
                csv = sess.files.get("csv")
                if csv and Path(csv).parent.is_dir():
                    Path(csv).write_text(sess.leaderboard_csv(pool=studio.task_names))
                shown = record.run == sess.made
                if shown:
                    _remove_exports(sess)
            left = bool(choices)
            said = f"Removed run #{record.run} ({record.method}, {record.settings}) from the leaderboard and its CSV."
            gone = [gr.DownloadButton(value=None, interactive=False) for _ in range(2)]   # its weights and recipe
            results = ((f"Run #{record.run} was removed. Press **Merge & evaluate** to merge the selected experts.",
                        pd.DataFrame(columns=accuracy_rows({})[0]), None, None, None, *gone, "")
                       if shown else (gr.skip(),) * 8)
            return (frame, gr.Dropdown(choices=choices, value=choices[0][1] if left else None),
                    gr.Button(interactive=left), gr.Button(interactive=left),
                    gr.DownloadButton(value=csv, interactive=left) if csv else gr.skip(), said, *results)

        remove_run_btn.click(remove_run, run_dd, [leaderboard, run_dd, load_run_btn, remove_run_btn, csv_dl, load_md,
                                                  run_md, acc_df, acc_plot, norm_plot, gallery, weights_dl, recipe_dl,
                                                  recipe_code],
                             api_visibility="private", show_progress="hidden")
        load_run_btn.click(load_run, [run_dd, hp_state, cal_state, pref_state], loaded, api_visibility="private",
                           show_progress="hidden")

        def load_recipe(path: Any, hp: Any, cal: Any, prefs: Any):
            try:
                recipe = Recipe.from_file(path)
            except Exception as exc:  # noqa: BLE001
                raise _user_error(exc, "load settings", upload=path) from None
            return load_settings(recipe, f"the recipe {Path(path).name}", hp, cal, prefs)

        recipe_up.upload(load_recipe, [recipe_up, hp_state, cal_state, pref_state], loaded, api_visibility="private",
                         show_progress="hidden")

        def request_stop(request: gr.Request):
            """Stop the session's job at its next step, where it says so itself (shown here at once too); a job
            that waits in the queue starts only to stop (said here at once too). Gradio's cancel is not used: after
            it Gradio's page often marked the job's status line "Error", for a moment or for good (5 of 6 sweeps and
            1 of 6 merges stopped while they ran, in Chromium; also a merge stopped while it waited), and the job ran
            on to its next step all the same."""
            sess = SESSIONS.get(request.session_hash)
            with sess.lock:   # a merge records its run under it, unless Stop came first
                sess.stop_requested = True
                sess.stops += 1
                kinds = {sess.job[0]} if sess.job else set()
                kinds.update(sess.waiting)
                sess.waiting.clear()   # each of them starts only to stop
            return (STOPPED_LINE["merge"] if "merge" in kinds else gr.skip(),
                    STOPPED_LINE["optimise"] if "optimise" in kinds else gr.skip())

        stop_btn.click(request_stop, None, [run_md, opt_md], api_visibility="private", queue=False)

        def on_unload(request: gr.Request):
            _close_session(request.session_hash)

        demo.unload(on_unload)

        def expert_labels():
            # Suites whose manifest lacks the experts' accuracy get it measured once (cached), after the page is up.
            return gr.CheckboxGroup(choices=studio.expert_choices(compute=True))

        if len(dict(studio.individual_accuracy())) < len(studio.task_names):
            demo.load(expert_labels, None, experts_cb, api_visibility="private", show_progress="hidden",
                      concurrency_id="expert_labels", concurrency_limit=1)

        # Public, documented API (plain JSON in and out; the merge also returns the safetensors file).
        gr.api(api_merge, api_name="merge", concurrency_id="gpu", concurrency_limit=1)
        gr.api(api_evaluate, api_name="evaluate", concurrency_id="gpu", concurrency_limit=1)
        gr.api(api_spectrum, api_name="spectrum", concurrency_id="diagnostics", concurrency_limit=2)
        gr.api(api_diagnose, api_name="diagnose", concurrency_id="diagnostics", concurrency_limit=2)
        gr.api(api_methods, api_name="methods", queue=False)   # instant reads: answered even when the queue is full
        gr.api(api_layers, api_name="layers", queue=False)

    # api_open=False: the queued endpoints (merges, evaluations, spectra) are reached through the queue only, so its
    # size and concurrency limits hold for every caller (Gradio opens direct REST calls off Spaces by default)
    demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=2, api_open=False)
    return demo


demo = build_demo(STUDIO)


def main(args: argparse.Namespace) -> None:
    """Serve the app: ``python app.py [--suite SOURCE] [--host H] [--port P] [--share] [--threads N] [--workers N]``."""
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from studio.parallel import set_workers

    set_workers(args.workers)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, prevent_thread_lock=True,
                **LAUNCH_OPTIONS)
    # Warm the caches (default merge, spectra, evaluation references) once the server is up: the page is usable
    # meanwhile, and the first diagnostics / merge then hit the caches.
    threading.Thread(target=STUDIO.warm, daemon=True, name="merge-studio-warmup").start()
    demo.block_thread()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(_ARGS)
