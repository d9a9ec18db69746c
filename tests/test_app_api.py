"""The app's public API, driven with ``gradio_client`` against the real app launched on localhost (MiniSuite)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gradio_client import Client

import studio
from studio.io import RECIPE_METADATA_KEY, Recipe, fingerprint, load_state_dict, merge_from_recipe, read_metadata


@pytest.fixture(scope="module")
def app_module(launched_app):
    return launched_app


@pytest.fixture(scope="module")
def client(app_module) -> Client:
    return Client(app_module.demo.local_url, verbose=False)


@pytest.fixture(scope="module")
def suite(app_module):
    return app_module.STUDIO.suite


def test_only_the_documented_endpoints_are_public(client: Client):
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert named == {"/merge", "/evaluate", "/spectrum", "/diagnose", "/methods", "/layers"}
    assert not client.view_api(print_info=False, return_format="dict")["unnamed_endpoints"]


def test_methods_and_layers(client: Client, suite):
    methods = client.predict(api_name="/methods")
    names = {m["name"] for m in methods}
    assert {"task_arithmetic", "ties"} <= names
    ta = next(m for m in methods if m["name"] == "task_arithmetic")
    assert ta["params"][0]["name"] == "alpha" and ta["params"][0]["high"] == 5.0
    layers = client.predict(api_name="/layers")
    assert layers and all(suite.base[k].dim() == 2 for k in layers)


def test_merge_returns_a_reproducible_safetensors_file(client: Client, suite):
    experts = suite.task_names[:3]
    summary, path = client.predict("task_arithmetic", experts, {"alpha": 0.4}, "none", "{}",
                                   {experts[0]: 2.0}, 0, api_name="/merge")
    assert set(summary["accuracy"]) == set(experts)
    for row in summary["accuracy"].values():
        assert 0.0 <= row["merged"] <= 100.0 and row["individual"] > 0
    weights = load_state_dict(path)
    assert weights.keys() == suite.base.keys()
    recipe = Recipe.from_text(read_metadata(path)[RECIPE_METADATA_KEY])
    assert recipe == Recipe.from_dict(summary["recipe"]) == Recipe.from_text(summary["recipe_yaml"])
    assert recipe.hparams == {"alpha": 0.4}
    assert recipe.preferences == {experts[0]: 2.0, experts[1]: 1.0, experts[2]: 1.0}
    # it records the weights it merged and made: a replay checks the suite's experts, and makes the same bits
    assert recipe.fingerprints == {"base": fingerprint(suite.base), "merged": fingerprint(weights),
                                   "experts": {n: fingerprint(suite.experts[n]) for n in experts},
                                   "settings": recipe.settings_fingerprint()}
    again = merge_from_recipe(recipe, suite.base, suite.experts)
    assert all(torch.equal(again[k], weights[k]) for k in weights)


def test_evaluate_returns_per_task_accuracies(client: Client, suite):
    experts = suite.task_names[:2]
    out = client.predict("task_arithmetic", experts, '{"alpha": 0.4}', api_name="/evaluate")
    assert out["split"] == "test" and set(out["tasks"]) == set(experts)
    accs = [out["tasks"][t]["merged"] for t in experts]
    assert out["avg_accuracy"] == pytest.approx(sum(accs) / len(accs))
    for t in experts:
        row = out["tasks"][t]
        assert row["normalized"] == pytest.approx(100 * row["merged"] / row["individual"])
    # Same settings through the library: same accuracies.
    from studio.evaluate import evaluate

    merged = studio.merge(suite.base, {n: suite.experts[n] for n in experts}, "task_arithmetic", alpha=0.4)
    ref = evaluate(suite, merged, tasks=experts, split="test", device="cpu")
    assert {t: out["tasks"][t]["merged"] for t in experts} == pytest.approx(ref.accuracy)


def test_spectrum_matches_a_local_svd(client: Client, suite):
    layer = client.predict(api_name="/layers")[0]
    experts = suite.task_names[:2]
    out = client.predict(layer, experts, "task_arithmetic", {"alpha": 1.0}, api_name="/spectrum")
    assert out["layer"] == layer and out["shape"] == list(suite.base[layer].shape)
    base = suite.base[layer].double()
    for t in experts:
        ref = torch.linalg.svdvals(suite.experts[t][layer].double() - base)
        assert torch.allclose(torch.tensor(out["tasks"][t], dtype=torch.float64), ref, rtol=1e-4, atol=1e-6)
    merged_ref = torch.linalg.svdvals(sum(suite.experts[t][layer].double() - base for t in experts))
    assert torch.allclose(torch.tensor(out["merged"], dtype=torch.float64), merged_ref, rtol=1e-4, atol=1e-6)
    tasks_only = client.predict(layer, api_name="/spectrum")
    assert set(tasks_only["tasks"]) == set(suite.task_names) and "merged" not in tasks_only
    # the merge's preferences and seed, as /merge takes them (the merged spectrum was always seed 0 and uniform)
    weighted = client.predict(layer, experts, "task_arithmetic", {"alpha": 1.0}, "none", "{}",
                              {experts[0]: 3, experts[1]: 1}, api_name="/spectrum")
    ref = torch.linalg.svdvals(sum(w * (suite.experts[t][layer].double() - base)
                                   for w, t in zip((1, 1 / 3), experts)))   # p_i / max p: 1 and 1/3
    assert torch.allclose(torch.tensor(weighted["merged"], dtype=torch.float64), ref, rtol=1e-4, atol=1e-6)
    dare = [client.predict(layer, experts, "dare", "{}", "none", "{}", "{}", seed, api_name="/spectrum")["merged"]
            for seed in (0, 7, 7)]
    assert dare[0] != dare[1] and dare[1] == dare[2]


@pytest.mark.parametrize("args, api, message", [
    (("no_such_method", ["@0"]), "/merge", "unknown merging method 'no_such_method'"),
    (("task_arithmetic", ["@0"], {"alpha": 42.0}), "/merge", "'alpha' = 42.0 is outside the allowed range [0, 5]"),
    (("task_arithmetic", []), "/merge", "no expert selected"),
    (("task_arithmetic", ["@0"], "{not json"), "/evaluate", "not valid JSON"),
    (("task_arithmetic", ["@0"], "{}", "none", "{}", "{}", 0, "train"), "/evaluate", "split must be"),
    (("visual.nope",), "/spectrum", "unknown layer 'visual.nope'"),
])
def test_invalid_requests_return_clear_errors(client: Client, suite, args, api, message):
    args = tuple([suite.task_names[0]] if a == ["@0"] else a for a in args)
    with pytest.raises(Exception) as info:
        client.predict(*args, api_name=api)
    assert message in str(info.value)


def test_methods_and_layers_answer_a_plain_post_while_the_queue_is_full(client: Client, app_module, suite,
                                                                         monkeypatch):
    """The two instant reads are not queued: a caller can still discover the API while merges fill the queue. The
    queued endpoints refuse direct REST calls, which would skip the queue's size and concurrency limits."""
    import threading

    import httpx

    gate = threading.Event()
    merge = app_module.STUDIO.merge
    monkeypatch.setattr(app_module.STUDIO, "merge", lambda *a, **k: gate.wait(60) and merge(*a, **k))
    monkeypatch.setattr(app_module.demo._queue, "max_size", 3)   # fill a small queue, not the app's 32 places
    queue = app_module.demo._queue
    jobs = [client.submit("task_arithmetic", [suite.task_names[0]], api_name="/merge") for _ in range(5)]
    try:
        # the client sends its submissions from threads of its own; those that reach the queue before the first merge
        # leaves it for the worker can all be refused, and the queue then keeps a place free: more are sent until it
        # is full (the test timed out once in a full run with five)
        deadline = time.monotonic() + 60
        while len(queue) < queue.max_size and time.monotonic() < deadline:
            time.sleep(0.5)
            if len(queue) < queue.max_size and len(jobs) < 12:
                jobs.append(client.submit("task_arithmetic", [suite.task_names[0]], api_name="/merge"))
        assert len(queue) == queue.max_size, len(queue)
        with pytest.raises(Exception, match="[Qq]ueue is full"):   # queued endpoints are refused now
            client.predict("visual.proj", api_name="/spectrum")
        posted = {}
        for api in ("methods", "layers"):
            r = httpx.post(f"{app_module.demo.local_url}gradio_api/run/{api}", json={"data": []}, timeout=30)
            assert r.status_code == 200, (api, r.text)
            posted[api] = r.json()["data"][0]
        assert {"tsv_m", "iso_cts", "svc"} <= {m["name"] for m in posted["methods"]}
        assert posted["layers"] == app_module.STUDIO.layer_keys()
        r = httpx.post(f"{app_module.demo.local_url}gradio_api/run/merge", timeout=30,
                       json={"data": ["task_arithmetic", [suite.task_names[0]]]})
        assert r.status_code == 404 and "join the queue" in r.text
    finally:
        gate.set()
        for job in jobs:
            with contextlib.suppress(Exception):
                job.result(timeout=120)


def test_spectrum_refuses_merge_settings_without_a_method(client: Client):
    """Without a method /spectrum returns the task spectra alone; settings for a merge were silently ignored."""
    layer = client.predict(api_name="/layers")[0]
    for args, message in (((None, "", {"alpha": 1.0}), "hparams given without a method"),
                          ((None, "", "{}", "svc", '{"alpha": 0.5}'), "calibration_hparams and calibration given"),
                          ((None, "", "{}", "none", "{}", '{"digits": 2}', 3), "preferences and seed given")):
        with pytest.raises(Exception) as info:
            client.predict(layer, *args, api_name="/spectrum")
        assert message in str(info.value)
    assert "merged" not in client.predict(layer, None, "", "{}", "none", "{}", api_name="/spectrum")


def test_diagnose_is_the_clis_report_of_the_merge_named(client: Client, suite, tmp_path, capsys):
    """/diagnose answers what ``merge-studio diagnose --out`` writes for the same merge (the Task Arithmetic sum
    without a method), and refuses merge settings without a method and an unknown expert by name."""
    import json

    from studio.cli import main

    from .test_ui_backend import _close

    two = list(suite.task_names[:2])
    # Ortho-Merge: its own layer rule (the embeddings averaged) decides the layers reported, as in diagnose
    got = client.predict(two, "ortho_merge", {"tau": 0.5}, "svc", "{}", api_name="/diagnose")
    out = tmp_path / "d.json"
    assert main(["diagnose", "--suite", "MiniSuite", "--experts", ",".join(two), "--method", "ortho_merge", "--set",
                 "tau=0.5", "--calibrate", "svc", "--device", "cpu", "--out", str(out)]) == 0
    capsys.readouterr()
    _close(got, json.loads(out.read_text()))
    assert got["merge"]["recipe"]["calibrate"] == "svc" and "shown" not in got
    assert "visual.positional_embedding" not in got["layers"]["key"]
    got = client.predict(two, api_name="/diagnose")
    assert got["merge"] == {"task_arithmetic_sum": True} and got["tasks"] == two
    for args, message in (((two, "", {"alpha": 1.0}), "hparams given without a method: name the method whose "
                                                      "diagnostics they describe, or leave them out for the Task "
                                                      "Arithmetic sum's diagnostics"),
                          ((["digits", "nope"], "ties"), "unknown expert(s) ['nope']"),
                          ((two, 0), "method must be a method's name (see /methods), or empty for the Task "
                                     "Arithmetic sum's diagnostics, got 0")):   # 0 read as "no method" before
        with pytest.raises(Exception) as info:
            client.predict(*args, api_name="/diagnose")
        assert message in str(info.value)


def test_a_merge_that_fails_after_validation_leaves_no_folder(client: Client, app_module, suite):
    """tsv_m's rank check runs inside the merge (it depends on each layer's size): the API's export folder was
    made before and stayed, empty, among the 16 kept."""
    root = app_module._RUN / "api"
    before = set(root.iterdir()) if root.exists() else set()
    kept = list(app_module._API_DIRS)
    with pytest.raises(Exception) as info:
        client.predict("tsv_m", list(suite.task_names), {"rank_fraction": 1.0}, api_name="/merge")
    assert "exceeds the layer" in str(info.value)
    assert (set(root.iterdir()) if root.exists() else set()) == before and app_module._API_DIRS == kept


def test_the_app_keeps_serving_after_errors(client: Client, suite):
    with pytest.raises(Exception):
        client.predict("task_arithmetic", [], api_name="/merge")
    out = client.predict(client.predict(api_name="/layers")[0], [suite.task_names[0]], api_name="/spectrum")
    assert list(out["tasks"]) == [suite.task_names[0]]


def test_stop_interrupts_a_running_merge(app_module, suite, tmp_path):
    """The Stop button sets the session's flag; the queued job checks it at every progress step and stops."""
    req = app_module.STUDIO.request("task_arithmetic", {}, suite.task_names[:2])
    app_module.SESSIONS.get("stop-test").stop_requested = True
    with pytest.raises(app_module._Cancelled):
        app_module.merge_and_evaluate(req, str(tmp_path), "stop-test")
    assert not list(tmp_path.iterdir())  # nothing exported
    app_module.SESSIONS.drop("stop-test")


def _stopping_at(step: str, stop, seen: "list | None" = None):
    """A progress callback that calls ``stop()`` as the job reports ``step`` (the user's Stop, or the page closing,
    landing while that step runs); the steps reported go to ``seen``."""
    def progress(frac, desc=""):
        if seen is not None:
            seen.append(desc)
        if desc.startswith(step):
            stop()
    return progress


def test_a_stop_after_the_export_leaves_no_exported_file(app_module, suite, tmp_path):
    """A Stop after the weights and recipe are written (here while the gallery is predicted) ended the job with its
    files left in the session's folder, offered by no run until the page closed (350 MB of ViT-B/32 weights per
    Stop; a concurrency audit)."""
    req = app_module.STUDIO.request("task_arithmetic", {}, suite.task_names[:2])
    sess = app_module.SESSIONS.get("stop-late")

    def stop():
        sess.stop_requested = True

    try:
        with pytest.raises(app_module._Cancelled):
            app_module.merge_and_evaluate(req, str(tmp_path), "stop-late", _stopping_at("predicting", stop))
        assert not list(tmp_path.iterdir())
    finally:
        app_module.SESSIONS.drop("stop-late")


def _handlers(app_module) -> dict:
    fns = app_module.demo.fns.values() if isinstance(app_module.demo.fns, dict) else app_module.demo.fns
    return {f.fn.__name__: f.fn for f in fns if f.fn is not None}


@pytest.mark.parametrize("how, step", [("stop", "done"), ("close", "evaluating"), ("close", "exporting")])
def test_a_merge_stopped_or_closed_as_it_ends_leaves_no_file(app_module, suite, how, step):
    """The page's merge (``run_merge``): a Stop after the job's last step, as the run would be recorded, ended it
    with the exported files left (a concurrency audit); closing the page while it ran let it run to the end,
    holding the app's merge slot for a result nobody would see, and its export made the session's folder again
    after the close had removed it. Now both stop the job, and neither leaves a file or the folder: a close while
    the job evaluates stops it before its export, one as the export starts removes what the export made."""
    import gradio as gr

    handlers = _handlers(app_module)
    hash_ = f"late-{how}"
    request = gr.Request(session_hash=hash_)
    folder = app_module.session_dir(app_module._RUN, hash_, create=False)
    closed, seen = [], []

    def stop():
        if how == "stop":
            handlers["request_stop"](request)
        elif not closed:
            closed.append(True)
            handlers["on_unload"](request)   # demo.unload's

    try:
        app_module._arm(request, "merge")
        out = handlers["run_merge"]("task_arithmetic", {"task_arithmetic": {"alpha": 0.3}}, suite.task_names[:2],
                                    "none", {}, {}, 0, request, _stopping_at(step, stop, seen))
        assert all(value is gr.skip() or isinstance(value, type(gr.skip())) for value in out)   # no results
        if how == "stop":
            sess = app_module.SESSIONS.get(hash_)
            assert not sess.runs and not sess.files and not list(folder.iterdir())
        else:
            assert closed and not folder.exists() and hash_ not in app_module.SESSIONS
            assert not any(desc.startswith("predicting") for desc in seen), seen   # stopped at its next step
    finally:
        handlers["on_unload"](request)


def test_stop_interrupts_a_running_sweep(app_module, suite):
    """The same flag ends an alpha sweep before its next alpha (Gradio's cancel alone left it running)."""
    req = app_module.STUDIO.request("task_arithmetic", {}, suite.task_names[:2])
    app_module.SESSIONS.get("stop-sweep").stop_requested = True
    with pytest.raises(app_module._Cancelled):
        app_module.sweep_alpha(req, [0.1, 0.2, 0.3], None, "stop-sweep")
    app_module.SESSIONS.drop("stop-sweep")
    assert len(app_module.sweep_alpha(req, [0.1, 0.2], None, "another-session")["objective"]) == 2
    app_module.SESSIONS.drop("another-session")


def test_a_job_that_never_started_leaves_no_waiting_kind_after_the_next_one_starts(app_module):
    """A click whose job never ran (the queue refused it, the page closed) must not leave its kind waiting once the
    next job of that kind starts: a later Stop would say "Merge stopped." over a finished run's status."""
    request = type("Request", (), {"session_hash": "stale-wait"})()
    sess = app_module.SESSIONS.get("stale-wait")
    app_module._arm(request, "merge")   # its job never started
    app_module._arm(request, "merge")   # the next click's job starts
    assert not app_module._stopped_since_click(sess, "merge")
    assert "merge" not in sess.waiting
    app_module._arm(request, "optimise")
    assert sess.waiting == {"optimise"}
    app_module.SESSIONS.drop("stale-wait")


def test_the_render_endpoints_refuse_a_malformed_state_by_name(client: Client, suite):
    """Gradio makes an endpoint of each ``gr.render`` (``/apply``: the method's controls, ``/apply_1``: the
    calibration's, ``/apply_2``: the preference sliders). Called directly with a state the page never sends, they
    raised Python's errors, which reached the caller as Gradio's "has raised an exception" and nothing more."""
    two = list(suite.task_names[:2])
    for args, api, message in (
            (("tsv_m", two, {"tsv_m": "garbage"}), "/apply",
             "the method settings stored for 'tsv_m' must be a JSON object of param -> value, got 'garbage'"),
            (("svc", two, {"svc": [1, 2]}, "tsv_m"), "/apply_1",
             "the calibration settings stored for 'svc' must be a JSON object of param -> value, got [1, 2]"),
            ((two, [3]), "/apply_2", "the stored preference settings must be a JSON object, got [3]")):
        with pytest.raises(Exception) as info:
            client.predict(*args, api_name=api)
        assert message in str(info.value), (api, str(info.value))


def test_the_apps_exports_are_removed_at_exit_and_a_killed_apps_by_the_next_start(tmp_path):
    """Each app process exports under a folder of its own (``run-<pid>-...`` in Gradio's upload folder): removed at
    its exit, and by the next app's start where the process was killed first. The API's merges were left there by
    every stopped app (their weights behind a SIGTERM, up to a model's size each; 257 folders on this machine)."""
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[1]
    export = ("import sys, app; f = app._RUN / 'api' / 'x'; f.mkdir(parents=True); "
              "(f / 'model.safetensors').write_bytes(b'0'); print(app._RUN, flush=True); sys.stdin.read()")
    killed = subprocess.Popen([sys.executable, "-c", export], cwd=root, env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        first = Path(killed.stdout.readline().strip())
        assert (first / "api" / "x" / "model.safetensors").is_file()
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    assert first.is_dir()   # nothing ran at its end
    ended = "import app; f = app._RUN / 'sessions' / 's'; f.mkdir(parents=True); print(app._RUN)"
    done = subprocess.run([sys.executable, "-c", ended], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not first.exists() and not Path(done.stdout.strip()).exists() and first.parent.is_dir()


@pytest.mark.parametrize("best, says", [(0.1, "lower end"), (0.5, None), (0.9, "upper end")])
def test_a_sweeps_best_value_at_an_end_says_so(app_module, best, says):
    note = app_module._edge_note({"alphas": [0.1, 0.5, 0.9], "best_alpha": best, "param": "alpha"})
    assert (says in note) if says else note == ""


def test_counts_in_the_status_lines_agree_with_their_number(app_module):
    assert [app_module._count(n, "task") for n in (0, 1, 2)] == ["0 tasks", "1 task", "2 tasks"]
