"""The suite layer: committed MiniSuite assets, the build (miniature, same code path), data determinism,
Hub-layout loading offline, and error cases."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from studio.evaluate import evaluate, reference_accuracy
from studio.schema import StudioError
from studio.suite import (DEFAULT_SUITE_PATH, ArchitectureError, EmptySplitError, Suite, SuiteError,
                          UnknownTaskError, default_suite, load_suite)
from studio.suite.build import BuildConfig, build
from studio.suite.tasks import TASK_NAMES, TASKS, generate

from .conftest import hub_cache

ASSETS = Path(DEFAULT_SUITE_PATH)
needs_assets = pytest.mark.skipif(not (ASSETS / "manifest.json").is_file(), reason="MiniSuite assets not built")


# ------------------------------------------------------------------------------------------ committed assets
@needs_assets
def test_committed_suite_layout_and_sizes():
    suite = default_suite()
    assert suite is default_suite()  # cached in-process
    assert suite.task_names == list(TASK_NAMES)
    assert {t.group for t in suite.tasks} == {"digits and signs", "aerial", "dissimilar"}
    assert all(len(t.classes) == 10 for t in suite.tasks)
    # real open_clip CLIP keys, visual tower only, float32 in memory
    keys = set(suite.base)
    for k in ("visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.3.mlp.c_fc.weight",
              "visual.proj", "visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding"):
        assert k in keys
    assert all(k.startswith("visual.") for k in keys)
    assert all(v.dtype == torch.float32 for v in suite.base.values())
    assert set(suite.experts) == set(suite.task_names)
    for t in suite.task_names:
        assert set(suite.experts[t]) == keys
        h = suite.heads[t]
        assert h.shape == (10, 64)
        torch.testing.assert_close(h.norm(dim=1), torch.ones(10), atol=1e-4, rtol=0)
        for split, n in (("validation", suite.manifest["splits"]["validation"]["per_task"]),
                         ("test", suite.manifest["splits"]["test"]["per_task"])):
            images, labels = suite.split(t, split)
            assert images.dtype == torch.uint8 and images.shape == (n, 32, 32, 3)
            assert labels.dtype == torch.int64 and set(labels.tolist()) == set(range(10))
    weights = sum(f.stat().st_size for f in [ASSETS / "base.safetensors", ASSETS / "heads.safetensors",
                                              *(ASSETS / "experts").glob("*.safetensors")])
    assert weights <= 30 * 2**20, weights
    m = suite.manifest
    assert m["versions"]["torch"] and m["versions"]["open_clip"] and m["build"]["timings"]["total_s"] > 0
    assert len(suite.samples("signs", per_class=2)) == 20


@needs_assets
def test_committed_accuracies_match_manifest():
    """A sample of the manifest's numbers, re-measured on the stored weights and data (within 1 point)."""
    suite = default_suite()
    acc = suite.manifest["accuracy"]
    experts = reference_accuracy(suite, "expert", tasks=["digits", "textures"], split="test", device="cpu")
    zeroshot = reference_accuracy(suite, "zeroshot", tasks=["house_numbers", "landcover"], split="test", device="cpu")
    for t, v in experts.items():
        assert abs(v - acc["expert_own_task"][t]["test"]) <= 1.0
        assert abs(v - suite.expert_accuracy[t]) <= 1.0
    for t, v in zeroshot.items():
        assert abs(v - acc["zeroshot"][t]["test"]) <= 1.0


@needs_assets
def test_committed_test_split_regenerates_from_its_seed():
    """The stored data is what the seeded generator produces (tolerant to 1-ulp float differences across CPUs)."""
    suite = default_suite()
    seed = suite.manifest["build"]["config"]["seed"]
    for task in ("digits", "vehicles"):
        stored, labels = suite.split(task, "test")
        again, labels2 = generate(task, stored.shape[0], seed, "test")
        assert torch.equal(labels, labels2)
        diff = (stored.int() - again.int()).abs()
        assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 1e-3


# ------------------------------------------------------------------------------------------ data generation
@pytest.mark.parametrize("task", TASK_NAMES)
def test_generation_is_deterministic_and_balanced(task):
    a, la = generate(task, 30, seed=5, split="validation")
    b, lb = generate(task, 30, seed=5, split="validation")
    assert a.dtype == torch.uint8 and a.shape == (30, 32, 32, 3)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert sorted(la.tolist()) == sorted([i % 10 for i in range(30)])  # balanced labels
    c, _ = generate(task, 30, seed=6, split="validation")
    d, _ = generate(task, 30, seed=5, split="test")
    assert not torch.equal(a, c) and not torch.equal(a, d)  # seeds and splits are independent streams
    assert int(a.max()) > int(a.min())  # not blank


def test_source_and_target_domains_differ():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    labels = torch.arange(10)
    src = TASKS["digits"].render(labels, g1, "source")
    tgt = TASKS["digits"].render(labels, g2, "target")
    # the pretraining digits are dark-on-light, the task's light-on-dark
    assert float(src.mean()) > 0.5 > float(tgt.mean())


# ------------------------------------------------------------------------------------------ miniature build
@pytest.fixture(scope="module")
def mini_suite(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "suite"
    cfg = BuildConfig(out=str(out), tasks=["digits", "signs"], seed=1, device="cpu", n_pretrain=48, n_train=48,
                      n_val=20, n_test=20, batch_size=16, pretrain_steps=3, steps=2, alphas=[0.5, 1.0])
    build(cfg, log=lambda msg: None)
    return out


def test_mini_build_writes_a_loadable_suite(mini_suite):
    files = {p.relative_to(mini_suite).as_posix() for p in mini_suite.rglob("*") if p.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    # as any other file written (safetensors' own writer made the weights owner-only)
    assert {p.stat().st_mode & 0o777 for p in mini_suite.rglob("*.safetensors")} == {0o666 & ~umask}
    assert {"manifest.json", "base.safetensors", "heads.safetensors", "text.safetensors",
            "experts/digits.safetensors", "experts/signs.safetensors", "data/digits.safetensors",
            "model_configs/MiniCLIP-ViT.json"} <= files
    stored = load_file(str(mini_suite / "experts" / "digits.safetensors"))
    assert all(v.dtype == torch.float16 and k.startswith("visual.") for k, v in stored.items())
    suite = load_suite(mini_suite)
    assert suite.task_names == ["digits", "signs"]
    m = suite.manifest
    assert m["model"]["name"] == "MiniCLIP-ViT" and m["build"]["config"]["steps"] == 2
    assert suite.split("signs", "validation")[0].shape == (20, 32, 32, 3)
    # the manifest's numbers are exactly what the public evaluation path measures on the stored suite
    res = evaluate(suite, suite.experts["signs"], split="test", device="cpu")
    assert res.accuracy["signs"] == pytest.approx(m["accuracy"]["expert_own_task"]["signs"]["test"], abs=0.01)
    assert res.accuracy["digits"] == pytest.approx(m["accuracy"]["expert_cross_task_test"]["signs"]["digits"],
                                                   abs=0.01)
    zs = evaluate(suite, suite.base, split="validation", device="cpu")
    assert zs.accuracy["digits"] == pytest.approx(m["accuracy"]["zeroshot"]["digits"]["val"], abs=0.01)
    assert m["accuracy"]["reference_merges"]["task_arithmetic"]["best_alpha"] in (0.5, 1.0)
    # the data files are exactly the seeded generator's output
    images, labels = generate("signs", 20, 1, "test")
    assert torch.equal(suite.split("signs", "test")[0], images) and torch.equal(suite.split("signs", "test")[1], labels)


def test_build_rejects_unknown_task(tmp_path):
    with pytest.raises(UnknownTaskError, match="mnist"):
        build(BuildConfig(out=str(tmp_path / "x"), tasks=["mnist"]), log=lambda m: None)


def test_build_suite_keeps_what_it_did_not_write_and_leaves_nothing_half_built(tmp_path, capsys):
    """An audit of build-suite: ``--out`` naming a project folder deleted its ``data/`` and replaced its README
    (exit 0); ``--out`` naming a file failed after the whole build and left a built suite in a hidden staging folder;
    ``--steps 0`` built experts equal to the base and ``--batch-size 0`` ended in a traceback. Now each is refused
    before any work, a failure leaves no staging folder, and a folder an earlier build wrote is rebuilt in place
    (files of other names kept). The manifest records a command that runs."""
    from studio.cli import main

    tiny = ["--tasks", "digits", "signs", "--device", "cpu", "--n-pretrain", "32", "--n-train", "32", "--n-val", "8",
            "--n-test", "8", "--pretrain-steps", "2", "--steps", "2", "--batch-size", "16", "--no-reference-merges"]
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "important.txt").write_text("keep")
    (project / "README.md").write_text("mine")
    (tmp_path / "afile").write_text("a file")
    for out, message in ((project, "holds ['README.md', 'data'], which the build would replace"),
                         (tmp_path / "afile", "afile is a file; give a folder"),
                         (tmp_path / "afile" / "sub", "afile is a file; give a folder")):
        assert main(["build-suite", "--out", str(out), *tiny]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (project / "data" / "important.txt").read_text() == "keep" and (project / "README.md").read_text() == "mine"
    for option in ("--steps", "--batch-size", "--n-val"):
        with pytest.raises(SystemExit):
            main(["build-suite", "--out", str(tmp_path / "new"), *tiny, option, "0"])
        assert f"argument {option}: 0 is below 1" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "project"]   # no staging folder, nothing built
    # a failure inside the build removes its staging folder
    with pytest.raises(RuntimeError, match="a failure inside the build"):
        def failing_log(msg: str) -> None:
            raise RuntimeError("a failure inside the build")
        build(BuildConfig(out=str(tmp_path / "new"), tasks=["digits"], device="cpu", n_pretrain=8, n_train=8,
                          n_val=4, n_test=4, batch_size=8, pretrain_steps=1, steps=1), log=failing_log)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "project"]
    # an earlier build's folder is rebuilt; a file of another name beside it is kept
    suite = tmp_path / "suite"
    assert main(["build-suite", "--out", str(suite), *tiny]) == 0
    (suite / "notes.txt").write_text("mine")
    assert main(["build-suite", "--out", str(suite), *tiny]) == 0
    assert (suite / "notes.txt").read_text() == "mine" and load_suite(suite).task_names == ["digits", "signs"]
    command = json.loads((suite / "manifest.json").read_text())["build"]["command"]
    assert command == "python -m studio.suite.build --out " + str(suite) + " " + " ".join(tiny)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------ hub layout, offline
def test_load_suite_from_hub_cache_offline(mini_suite, tmp_path, offline_hub, monkeypatch):
    cache = tmp_path / "hf"
    hub_cache(mini_suite, cache, "studio-test/mini-suite")
    suite = load_suite("studio-test/mini-suite", cache_dir=cache)
    assert suite.root.parent.name == "snapshots"
    assert suite.task_names == ["digits", "signs"]
    res = evaluate(suite, suite.experts["digits"], tasks=["digits"], split="test", device="cpu")
    assert res.normalized["digits"] == pytest.approx(100.0)
    assert load_suite("studio-test/mini-suite@main", cache_dir=cache).root == suite.root
    with pytest.raises(SuiteError, match="names revision 'main' but revision='v2'"):
        load_suite("studio-test/mini-suite@main", revision="v2", cache_dir=cache)
    with pytest.raises(SuiteError, match="neither an existing folder nor a Hub repo id"):
        load_suite("studio-test/mini-suite/experts/digits.safetensors", cache_dir=cache)
    monkeypatch.chdir(Path(DEFAULT_SUITE_PATH).parents[1])
    with pytest.raises(SuiteError, match="neither an existing folder nor a Hub repo id"):   # a typo, not a repo
        load_suite("assets/minisuit", cache_dir=cache)
    with pytest.raises(SuiteError, match="; the embedded suite is named 'MiniSuite'"):
        load_suite("minisuite", cache_dir=cache)
    with pytest.raises(SuiteError, match="HF_HUB_OFFLINE"):
        load_suite("studio-test/not-cached", cache_dir=cache)


def test_a_suite_in_a_dataset_repository_loads_and_is_recorded_as_one(mini_suite, tmp_path, offline_hub,
                                                                        monkeypatch, capsys):
    """Suites hold data, so they may live in a dataset repository: ``hf://datasets/owner/name`` (huggingface_hub's
    form) or ``repo_type="dataset"`` reads it, and its source is recorded in that form, pinned to the commit read,
    so that a recipe of a merge replays from it (it recorded the cache folder before)."""
    import huggingface_hub.constants as hub_constants

    from studio.cli import main
    from studio.io import Recipe, load_state_dict

    cache = tmp_path / "hf"
    commit = "3" * 40
    hub_cache(mini_suite, cache, "studio-test/mini-suite", commit, repo_type="dataset")
    pinned = f"hf://datasets/studio-test/mini-suite@{commit}"
    for source, kwargs in (("hf://datasets/studio-test/mini-suite", {}),
                           ("studio-test/mini-suite@main", {"repo_type": "dataset"}),
                           ("hf://datasets/studio-test/mini-suite@main", {"repo_type": "dataset"}),
                           (pinned, {})):
        suite = load_suite(source, cache_dir=cache, **kwargs)
        assert suite.source == pinned and suite.task_names == ["digits", "signs"], source
    with pytest.raises(SuiteError, match="HF_HUB_OFFLINE"):   # not a model repository of that name
        load_suite("hf://studio-test/mini-suite", cache_dir=cache)
    with pytest.raises(SuiteError, match=r"'hf://datasets/studio-test/mini-suite' is a dataset repository, but "
                                         r"repo_type='model' was also given"):
        load_suite("hf://datasets/studio-test/mini-suite", repo_type="model", cache_dir=cache)
    with pytest.raises(SuiteError, match="repo_type must be 'model' or 'dataset'"):
        load_suite("studio-test/mini-suite", repo_type="space", cache_dir=cache)

    # messages name the source as written, and suggest the dataset form
    with pytest.raises(SuiteError, match=r"^hf://datasets/studio-test/mini-suite@main: names revision 'main' but "
                                         r"revision='v1'"):
        load_suite("hf://datasets/studio-test/mini-suite@main", revision="v1", cache_dir=cache)
    (tmp_path / "studio-test").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SuiteError, match="write hf://datasets/studio-test/mini-suite for the Hub repository"):
        load_suite("studio-test/mini-suite", repo_type="dataset", cache_dir=cache)
    # a checkpoint in a dataset repository reads the same way, pinned in that form
    from studio.io import load_checkpoint

    state, pinned_file = load_checkpoint("hf://datasets/studio-test/mini-suite/base.safetensors", cache_dir=cache)
    assert pinned_file == f"hf://datasets/studio-test/mini-suite@{commit}/base.safetensors"
    assert all(torch.equal(state[k], suite.base[k]) for k in suite.base)
    again, _ = load_checkpoint(pinned_file, cache_dir=cache)
    assert again.keys() == state.keys()

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    assert main(["merge", "--suite", "hf://datasets/studio-test/mini-suite", "--method", "ties",
                 "--out", "m.safetensors"]) == 0, capsys.readouterr().err
    assert Recipe.from_file(tmp_path / "m.safetensors").suite == pinned
    assert main(["recipe", "m.safetensors", "--out", "again.safetensors"]) == 0, capsys.readouterr().err
    assert "the same bits" in capsys.readouterr().out
    again, first = load_state_dict("again.safetensors"), load_state_dict("m.safetensors")
    assert all(torch.equal(again[k], first[k]) for k in first)


# ------------------------------------------------------------------------------------------ errors
def test_error_cases(mini_suite, tmp_path):
    suite = load_suite(mini_suite)
    with pytest.raises(UnknownTaskError, match="'mnist'.*digits"):
        suite.split("mnist", "test")
    with pytest.raises(EmptySplitError, match="'train'"):
        suite.split("digits", "train")
    sd = dict(suite.base)
    sd.pop("visual.proj")
    with pytest.raises(ArchitectureError, match="missing.*visual.proj"):
        suite.build_model(sd)
    sd = dict(suite.base, **{"visual.proj": torch.zeros(3, 3)})
    with pytest.raises(ArchitectureError, match=r"visual.proj.*\(3, 3\).*\(128, 64\)"):
        suite.build_model(sd)
    sd = dict(suite.base, **{"visual.extra": torch.zeros(1)})
    with pytest.raises(ArchitectureError, match="unexpected.*visual.extra"):
        suite.build_model(sd)
    assert issubclass(ArchitectureError, StudioError) and issubclass(EmptySplitError, StudioError)
    with pytest.raises(SuiteError, match="neither an existing folder"):
        load_suite(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SuiteError, match="manifest.json is missing"):
        load_suite(tmp_path / "empty")
    # an empty stored split
    copy = tmp_path / "copy"
    shutil.copytree(mini_suite, copy)
    save_file({"val_images": torch.zeros(0, 32, 32, 3, dtype=torch.uint8),
               "val_labels": torch.zeros(0, dtype=torch.int64),
               "test_images": torch.zeros(0, 32, 32, 3, dtype=torch.uint8),
               "test_labels": torch.zeros(0, dtype=torch.int64)}, str(copy / "data" / "signs.safetensors"))
    with pytest.raises(EmptySplitError, match="empty"):
        load_suite(copy).split("signs", "test")
    # images of another size, and labels outside the task's classes: clear errors, not a shape error in the model
    cases = ((torch.zeros(2, 17, 17, 3, dtype=torch.uint8), torch.zeros(2), r"\(2, 17, 17, 3\)"),
             (torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.tensor([0, 57]), r"labels \[57\] are outside its"))
    for images, labels, message in cases:
        labels = labels.to(torch.int64)
        save_file({"test_images": images, "test_labels": labels, "val_images": images.clone(),
                   "val_labels": labels.clone()}, str(copy / "data" / "signs.safetensors"))
        with pytest.raises(SuiteError, match=message):
            load_suite(copy).split("signs", "test")
    manifest = json.loads((mini_suite / "manifest.json").read_text())
    del manifest["tasks"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SuiteError, match="'tasks'"):
        Suite(copy)
    # malformed manifests and files are SuiteErrors that say where, not bare KeyError / TypeError / SafetensorError
    good = json.loads((mini_suite / "manifest.json").read_text())
    for change, message in (
            (lambda m: m["tasks"].append(dict(m["tasks"][0])), r"task name\(s\) \['digits'\] appear more than once"),
            (lambda m: m["tasks"][0].update(name="../digits"), "not usable as file names"),
            (lambda m: m["tasks"][0].pop("classes"), "lacks the field 'classes'"),
            (lambda m: m.update(tasks={"digits": {}}), "'tasks' must be a list"),
            (lambda m: m.update(logit_scale="abc"), "is malformed"),
            (lambda m: m.update(model={"width": 3}), "lacks the field 'name'")):
        manifest = json.loads(json.dumps(good))
        change(manifest)
        with pytest.raises(SuiteError, match=message):
            Suite(copy, manifest)
    (copy / "manifest.json").write_text("[1, 2]")
    with pytest.raises(SuiteError, match="must hold a JSON object"):
        Suite(copy)
    # not UTF-8, or nested too deeply: a traceback before (an audit of the CLI)
    for text, message in ((b"\xff\xfe{}", r"manifest\.json is not UTF-8 text \(invalid start byte at byte 0\)"),
                          (b"[" * 100_000 + b"]" * 100_000, r"manifest\.json: its JSON is nested too deeply")):
        (copy / "manifest.json").write_bytes(text)
        with pytest.raises(SuiteError, match=message):
            Suite(copy)
    shutil.rmtree(copy)
    shutil.copytree(mini_suite, copy)
    (copy / "experts" / "digits.safetensors").write_bytes(b"")
    with pytest.raises(SuiteError, match=r"digits\.safetensors: not a readable safetensors file"):
        load_suite(copy).experts


def test_labels_heads_scales_accuracies_and_configs_that_would_mislead_are_named(mini_suite, tmp_path):
    """2-D labels scored 3000 %, float or bool labels were cast, a negative logit_scale turned argmax into argmin, a
    head of the wrong width or with NaN failed inside torch or was blamed on an expert, a malformed accuracy block
    stopped the app with a TypeError, and a suite's model config that differs from a registered one of the same name
    was silently replaced by it (or replaced it, for the suites loaded after)."""
    from studio.evaluate import evaluate

    copy = tmp_path / "copy"
    shutil.copytree(mini_suite, copy)
    good = load_suite(copy).split("signs", "test")
    for labels, message in ((good[1][:, None], r"'test_labels' is torch.int64 \(\d+, 1\); expected integer class "
                                               r"indices \[N\]"),
                            (good[1].float(), "'test_labels' is torch.float32"),
                            (good[1] > 0, "'test_labels' is torch.bool")):
        save_file({"test_images": good[0], "test_labels": labels.contiguous(), "val_images": good[0].clone(),
                   "val_labels": good[1].clone()}, str(copy / "data" / "signs.safetensors"))
        with pytest.raises(SuiteError, match=message):
            load_suite(copy).split("signs", "test")
    shutil.rmtree(copy)
    shutil.copytree(mini_suite, copy)
    heads = load_suite(copy).heads
    narrow = torch.nn.functional.normalize(heads["signs"][:, :32], dim=1)
    unscaled = heads["signs"].clone()
    unscaled[3] = 0   # a zero row: its class never predicted; the whole head x 1e38 made the logits infinite
    for head, message in ((narrow, r"the head of task 'signs' is \(\d+, 32\); the model 'MiniCLIP-ViT' "
                                   r"embeds images in 64 dimensions"),
                          (heads["signs"] * float("nan"), "the head of task 'signs' contains NaN"),
                          (heads["signs"][0], "expected a floating-point \\[classes, embedding\\] matrix"),
                          (unscaled, r"heads.safetensors: row 3 of task 'signs''s head has norm 0; a head's rows are "
                                     r"L2-normalised"),
                          (heads["signs"] * 1e38, r"row 0 of task 'signs''s head has norm 1e\+38")):
        save_file({**heads, "signs": head.clone().contiguous()}, str(copy / "heads.safetensors"))
        with pytest.raises(SuiteError, match=message):
            suite = load_suite(copy)
            evaluate(suite, suite.base, tasks=["signs"], device="cpu")
    good_manifest = json.loads((mini_suite / "manifest.json").read_text())
    for change, message in (
            (lambda m: m.update(logit_scale=-15), "'logit_scale' must be a number > 0 within float32's range"),
            (lambda m: m.update(logit_scale=True), "'logit_scale' must be a number > 0 within float32's range"),
            (lambda m: m.update(logit_scale=1e39), r"within float32's range \(CLIP's exp\(t\), e.g. 100\), got 1e\+39"),
            (lambda m: m["tasks"][0].update(classes="0123456789"), "'classes' must be a list of class names")):
        manifest = json.loads(json.dumps(good_manifest))
        change(manifest)
        with pytest.raises(SuiteError, match=message):
            Suite(copy, manifest)
    manifest = json.loads(json.dumps(good_manifest))
    manifest["accuracy"]["expert_own_task"]["digits"] = 97
    with pytest.raises(SuiteError, match=r"'accuracy.expert_own_task.digits' must be an object such as"):
        Suite(copy, manifest).expert_accuracy
    manifest["accuracy"] = []
    with pytest.raises(SuiteError, match="'accuracy' must map 'zeroshot' to per-task values"):
        Suite(copy, manifest).zeroshot_accuracy
    for name, text, message in ((
            "wide", None, "model 'MiniCLIP-ViT' is already known to open_clip with another config"),
            ("broken", "{oops", "MiniCLIP-ViT.json: not a readable JSON model config")):
        other = tmp_path / name   # a folder of its own: each folder's configs are registered once per process
        shutil.copytree(mini_suite, other)
        config = json.loads((other / "model_configs" / "MiniCLIP-ViT.json").read_text())
        config["vision_cfg"]["width"] = 256
        (other / "model_configs" / "MiniCLIP-ViT.json").write_text(text or json.dumps(config))
        with pytest.raises(ArchitectureError, match=message):
            load_suite(other).tower
    assert load_suite(mini_suite).build_model(load_suite(mini_suite).base) is not None   # unaffected
    # an expert of another architecture is named with its file, not blamed on the weights evaluated
    arch = tmp_path / "arch"
    shutil.copytree(mini_suite, arch)
    expert = load_file(str(arch / "experts" / "signs.safetensors"))
    expert["visual.proj"] = expert["visual.proj"].T.contiguous()
    save_file(expert, str(arch / "experts" / "signs.safetensors"))
    suite = load_suite(arch)
    with pytest.raises(ArchitectureError, match=r"expert 'signs' \(.*experts/signs.safetensors\) key 'visual.proj'"):
        evaluate(suite, suite.base, tasks=["signs"], device="cpu")


def test_what_a_suite_audit_found_misleading_is_named(mini_suite, tmp_path):
    """An audit of suites: an expert that is not evaluated stopped an evaluation of another task; a manifest's
    ``model.image_size`` other than the model's failed inside open_clip (or blamed the data), and a ``model`` object
    without it refused every split; 0-d images raised a bare IndexError, one image [H, W, 3] was counted as H
    images; a task entry that is no object, a name that is no text and an empty source were read as something else;
    an adapter folder without its config was reported as a missing file."""
    copy = tmp_path / "copy"
    shutil.copytree(mini_suite, copy)
    (copy / "experts" / "signs.safetensors").unlink()
    suite = load_suite(copy)
    assert evaluate(suite, suite.base, tasks=["digits"], device="cpu").accuracy["digits"] >= 0
    with pytest.raises(SuiteError, match=r"expert 'signs': file .*signs.safetensors is missing"):
        evaluate(suite, suite.base, tasks=["signs"], device="cpu")
    (copy / "experts" / "signs").mkdir()
    with pytest.raises(SuiteError, match=r"expert 'signs': .*experts/signs is a folder without adapter_config.json"):
        load_suite(copy).experts_named(["signs"])

    good = json.loads((mini_suite / "manifest.json").read_text())
    images, labels = load_suite(mini_suite).split("digits", "test")
    for change, data, message in (
            # the data at the manifest's size, not the model's: open_clip's "size of tensor a (65)" before
            (lambda m: m["model"].update(image_size=64), images.repeat_interleave(2, 1).repeat_interleave(2, 2),
             r"manifest.json: 'model.image_size' is 64, but the model 'MiniCLIP-ViT' takes 32 x 32 images"),
            # only the manifest wrong: "the model expects [N, 64, 64, 3]" blamed the data
            (lambda m: m["model"].update(image_size=64), images,
             r"manifest.json: 'model.image_size' is 64, but the model 'MiniCLIP-ViT' takes 32 x 32 images"),
            (lambda m: None, torch.tensor(3, dtype=torch.uint8),
             r"digits.safetensors: 'test_images' is torch.uint8 \(\); expected uint8 images \[N, H, W, 3\]"),
            (lambda m: None, images[0], r"'test_images' is torch.uint8 \(32, 32, 3\); expected uint8 images")):
        manifest = json.loads(json.dumps(good))
        change(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
        save_file({"test_images": data.contiguous(), "test_labels": labels, "val_images": images.clone(),
                   "val_labels": labels.clone()}, str(copy / "data" / "digits.safetensors"))
        with pytest.raises(SuiteError, match=message):
            suite = load_suite(copy)
            evaluate(suite, suite.base, tasks=["digits"], device="cpu")
    save_file({"test_images": images, "test_labels": labels, "val_images": images.clone(),
               "val_labels": labels.clone()}, str(copy / "data" / "digits.safetensors"))
    manifest = json.loads(json.dumps(good))
    manifest["model"].pop("image_size")   # the model's own size
    assert Suite(copy, manifest).split("digits")[0].shape == images.shape

    for change, message in (
            (lambda m: m["tasks"].__setitem__(1, "signs"), r"'tasks\[1\]' must be an object with 'name' and "
                                                           r"'classes', got 'signs'"),
            (lambda m: m.update(name=None), r"'name' must be the suite's name \(text\), got None"),
            (lambda m: m.update(name=["a"]), r"'name' must be the suite's name \(text\), got \['a'\]")):
        manifest = json.loads(json.dumps(good))
        change(manifest)
        with pytest.raises(SuiteError, match=message):
            Suite(copy, manifest)
    for empty in ("", "  "):   # Path("") is the current folder
        with pytest.raises(SuiteError, match="the suite source is empty"):
            load_suite(empty)
