"""The command line and recipes reproduce exactly what the library merges (real safetensors files, the CLI's own
argument parsing), including the per-method layer rules, the SVD mode and custom layer rules."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
from pathlib import Path

import pytest
import torch

import studio
from studio.cli import main
from studio.io import (RECIPE_METADATA_KEY, CheckpointError, Recipe, load_checkpoint, load_state_dict,
                       merge_from_recipe, read_metadata, save_merged, save_state_dict)
from studio.layers import LayerRule
from studio.schema import StudioError
from studio.suite import DEFAULT_SUITE_PATH, load_suite

from .conftest import clip_like_state_dict, make_experts


def _unsealed(path) -> dict[str, str]:
    """A TSV-C file's metadata without the fingerprint of its tensors, as 0.2.2 and earlier wrote it: a file whose
    tensors a test edits then reaches the structural checks, which a sealed one never passes (the fingerprint check
    comes first: test_a_compressed_file_whose_tensors_changed_is_refused)."""
    meta = read_metadata(path)
    header = json.loads(meta["merge_studio_tsv_c"])
    header.pop("fingerprint")
    header.pop("header_fingerprint")
    return {**meta, "merge_studio_tsv_c": json.dumps(header)}


@pytest.fixture()
def files(tmp_path):
    base = clip_like_state_dict(width=16)
    experts = make_experts(base, 3)
    save_state_dict(tmp_path / "base.safetensors", base)
    args = ["--base", str(tmp_path / "base.safetensors")]
    for name, sd in experts.items():
        save_state_dict(tmp_path / f"{name}.safetensors", sd)
        args += ["--expert", f"{name}={tmp_path / f'{name}.safetensors'}"]
    return tmp_path, base, experts, args


def _equal(a, b):
    assert sorted(a) == sorted(b)   # safetensors files list their tensors sorted by name
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method,extra,kwargs", [
    ("task_arithmetic", ["--calibrate", "svc"], {"calibrate": "svc"}),   # SVC's own rule skips embeddings
    ("ortho_merge", [], {}),                                              # so does Ortho-Merge's
    ("tsv_m", ["--svd-mode", "exact", "--set", "rank_fraction=0.2"], {"svd_mode": "exact", "rank_fraction": 0.2}),
    ("iso_c", ["--layer-rule", "all_matrices"], {"layer_rule": "all_matrices"}),
])
def test_cli_merge_equals_the_library_and_its_recipe_reproduces_it(files, method, extra, kwargs, capsys):
    tmp, base, experts, args = files
    out, recipe = tmp / "m.safetensors", tmp / "m.yaml"
    assert main(["merge", *args, "--method", method, *extra, "--device", "cpu", "--out", str(out),
                 "--recipe", str(recipe)]) == 0
    said = capsys.readouterr().out   # what it wrote, what it merged, how long it took
    assert re.search(rf"wrote .*m\.safetensors \(\d+ tensors; {method}( \+ \w+)? of {len(experts)} experts, merged in "
                     rf"[0-9.]+ s\) and the recipe .*m\.yaml", said), said
    want = studio.merge(base, experts, method, device="cpu", **kwargs)
    _equal(load_state_dict(out), want)
    for source in (recipe, out):   # the YAML and the recipe embedded in the exported file
        again = tmp / "again.safetensors"
        assert main(["recipe", str(source), *args, "--device", "cpu", "--out", str(again)]) == 0
        _equal(load_state_dict(again), want)


def test_a_custom_layer_rule_survives_the_recipe_round_trip(files):
    tmp, base, experts, _ = files
    rule = LayerRule(exclude=["mlp", "positional_embedding"], name="attention_only")   # a list is accepted
    want = studio.merge(base, experts, "iso_c", device="cpu", layer_rule=rule)
    recipe = Recipe(method="iso_c", experts=list(experts), layer_rule=rule, svd_mode="exact")
    assert recipe.layer_rule == {"name": "attention_only", "exclude": ["mlp", "positional_embedding"]}
    for text in (recipe.to_json(), recipe.to_yaml()):
        back = Recipe.from_text(text)
        assert back == recipe
        _equal(merge_from_recipe(back, base, experts, device="cpu"),
               studio.merge(base, experts, "iso_c", device="cpu", layer_rule=rule, svd_mode="exact"))
    default = studio.merge(base, experts, "iso_c", device="cpu")   # the rule took effect: the MLP is averaged
    key = "visual.transformer.resblocks.0"
    assert not torch.allclose(want[f"{key}.mlp.c_fc.weight"], default[f"{key}.mlp.c_fc.weight"])
    torch.testing.assert_close(want[f"{key}.attn.in_proj_weight"], default[f"{key}.attn.in_proj_weight"])
    # a preset passed as an object is stored by name
    assert Recipe(method="iso_c", layer_rule=studio.LayerRule()).layer_rule == "default"
    # recipes written before svd_mode was recorded reproduce with the default mode
    old = {k: v for k, v in Recipe(method="iso_c").to_dict().items() if k != "svd_mode"}
    assert Recipe.from_dict(old).svd_mode == "auto"
    save_merged(tmp / "custom.safetensors", want, recipe)
    assert Recipe.from_text(read_metadata(tmp / "custom.safetensors")[RECIPE_METADATA_KEY]) == recipe


def test_bad_layer_rules_are_clear_errors():
    with pytest.raises(StudioError, match=r"'\(mlp' is not a regular expression"):
        LayerRule(exclude=("(mlp",), name="broken")
    with pytest.raises(StudioError, match="exclude patterns must be strings"):
        LayerRule(exclude=(3,))
    with pytest.raises(StudioError, match="needs 'exclude'"):
        studio.merge(clip_like_state_dict(), make_experts(clip_like_state_dict(), 2), "iso_c",
                     layer_rule={"name": "x"})
    with pytest.raises(StudioError, match="unknown layer rule 'no_such_rule'"):
        studio.merge(clip_like_state_dict(), make_experts(clip_like_state_dict(), 2), "iso_c",
                     layer_rule="no_such_rule")


def test_a_recipe_layer_rule_with_one_pattern_as_text_is_that_pattern():
    """``exclude: mlp`` in a YAML recipe was split into the patterns 'm', 'l', 'p': almost no layer stayed a matrix."""
    rule = LayerRule.from_dict({"name": "no_mlp", "exclude": "mlp"})
    assert rule.exclude == ("mlp",)
    assert rule.is_matrix("visual.transformer.resblocks.0.attn.out_proj.weight", (12, 12))
    with pytest.raises(StudioError, match="exclude must be a regular expression or a list"):
        LayerRule(exclude=None)


def test_unreadable_safetensors_files_are_checkpoint_errors_naming_the_file(tmp_path, files, capsys):
    tmp, base, experts, args = files
    truncated = tmp / "truncated.safetensors"
    truncated.write_bytes((tmp / "task0.safetensors").read_bytes()[:200])
    empty = tmp / "empty.safetensors"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(CheckpointError, match=rf"{path.name}: not a readable safetensors file"):
            load_state_dict(path)
        with pytest.raises(CheckpointError, match=rf"{path.name}: not a readable safetensors file"):
            Recipe.from_file(path)
    with pytest.raises(CheckpointError, match="no such file"):
        read_metadata(tmp / "nope.safetensors")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp))} is a folder; give a safetensors file"):
        read_metadata(tmp)   # was "no such file"
    bad = [a if not a.startswith("task0=") else f"task0={truncated}" for a in args]
    assert main(["merge", *bad, "--method", "task_arithmetic", "--out", str(tmp / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "truncated.safetensors: not a readable safetensors file" in err[0]


def test_cli_bad_arguments_are_one_line_errors_and_write_nothing(files, capsys):
    tmp, base, experts, args = files
    out = tmp / "m.safetensors"
    cases = [
        (["--preferences", "{bad"], "--preferences '{bad' is not valid JSON"),
        (["--preferences", '"abc"'], "--preferences must be a JSON mapping"),
        (["--set", "alpha=[1"], "--set 'alpha=[1': the value is not valid YAML"),
        (["--expert", args[3]], "is given twice"),
        (["--expert", "=x.safetensors"], "non-empty name and source"),
        (["--cal-set", "alpha=0.5"], "--cal-set alpha=0.5 sets a calibration's hyperparameters, but no calibration"),
        (["--recipe", str(tmp / "no" / "such" / "dir" / "r.yaml"), "--out", str(tmp / "nodir.safetensors")], None),
        (["--out", str(tmp)], "cannot write"),
    ]
    for extra, message in cases:
        rc = main(["merge", *args, "--method", "task_arithmetic", "--out", str(out), *extra])
        err = capsys.readouterr().err.strip().splitlines()
        if message is None:   # a recipe in a new folder is fine: the folders are made
            assert rc == 0 and (tmp / "no" / "such" / "dir" / "r.yaml").is_file()
            continue
        assert rc == 2 and len(err) == 1 and message in err[0], (extra, err)
        assert not out.exists(), extra
    # --layer-rule takes a preset's name: argparse's usage and choices (the library's error offered a LayerRule or a
    # mapping, which a command line cannot give); compress too
    for cmd in (["merge", *args, "--method", "iso_c"], ["compress", *args]):
        with pytest.raises(SystemExit) as exit_:
            main([*cmd, "--layer-rule", "nope", "--out", str(out)])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--layer-rule: invalid choice: 'nope' (choose from 'all_matrices', " \
            "'default', 'skip_embeddings')" in err and not out.exists(), err
    # a recipe that cannot be written leaves no weights either (both files or neither)
    blocker = tmp / "blocker"
    blocker.write_text("a file where a folder is needed")
    rc = main(["merge", *args, "--method", "task_arithmetic", "--out", str(out),
               "--recipe", str(blocker / "r.yaml")])
    assert rc == 2 and "cannot write" in capsys.readouterr().err and not out.exists()
    # YAML 1.1 reads 1e-1 as text; --set takes it as the number
    assert main(["merge", *args, "--method", "task_arithmetic", "--set", "alpha=1e-1", "--out", str(out)]) == 0
    assert Recipe.from_file(out).hparams == {"alpha": 0.1}
    # the recipe holds the validated hyperparameters, schema defaults filled in (not the raw --set values)
    assert main(["merge", *args, "--method", "ties", "--set", "k=0.3", "--calibrate", "svc", "--out", str(out)]) == 0
    recipe = Recipe.from_file(out)
    assert recipe.hparams == {"k": 0.3, "topk_scope": "model", "merge_func": "sum", "alpha": 0.3}
    assert recipe.calibrate_hparams == {"alpha": None, "target_guard": True}


def test_recipes_check_their_fields():
    with pytest.raises(CheckpointError, match=r"recipe field 'experts' must be a list of expert names, got 'task0'"):
        Recipe.from_dict({"method": "ties", "experts": "task0"})
    with pytest.raises(CheckpointError, match=r"lists expert\(s\) \['task0'\] more than once"):
        Recipe.from_dict({"method": "ties", "experts": ["task0", "task0"]})
    for seed in ("1", 1.5, 2**64):
        with pytest.raises(CheckpointError, match="recipe field 'seed' must be an integer"):
            Recipe.from_dict({"method": "dare", "seed": seed})
    # the seeds a merge takes (a NumPy integer, an integral float), as the int a file records (an audit of the CLI)
    import numpy as np

    seeds = [Recipe(method="dare", seed=s).to_dict()["seed"] for s in (np.int64(3), 3.0)]
    assert seeds == [3, 3] and all(type(s) is int for s in seeds)
    with pytest.raises(CheckpointError, match="recipe field 'preferences' must be a mapping"):
        Recipe.from_dict({"method": "ties", "preferences": [1, 2]})
    with pytest.raises(CheckpointError, match="recipe field 'prefix' must be a non-empty tensor-name prefix"):
        Recipe.from_dict({"method": "ties", "prefix": ""})   # the CLI refuses --prefix '' too
    assert Recipe.from_dict({"method": "ties", "hparams": None, "experts": None}) == Recipe(method="ties")
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['1', 'zz'\]"):
        Recipe.from_dict({"method": "ties", 1: 2, "zz": 3})
    # a misspelt 'method' is named, not reported as a missing one (a first user's audit)
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['methd'\].*'method'.*\(and it has no 'method' "
                                              r"field\)$"):
        Recipe.from_dict({"methd": "ties"})


@pytest.mark.parametrize("kind", ["zip", "legacy", *(f"pickle{p}" for p in range(2, 6))])
def test_a_torch_save_file_under_a_safetensors_name_is_named_a_pickle(tmp_path, kind):
    """torch.save's output renamed to .safetensors was 'not a readable safetensors file (... header too large)'
    (a first user's audit), and so was a plain pickle of any protocol (an I/O audit); neither is unpickled."""
    import pickle

    path = tmp_path / "model.safetensors"
    marker = tmp_path / "unpickled"
    if kind.startswith("pickle"):   # a payload that would leave a file if it were ever unpickled
        payload = type("Payload", (), {"__reduce__": lambda self: (Path.touch, (marker,))})
        path.write_bytes(pickle.dumps(payload(), protocol=int(kind[-1])))
    else:
        torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=kind == "zip")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not safetensors but, by its first bytes, a "
                                              r"torch.save checkpoint or a Python pickle; pickles are not loaded"):
        load_state_dict(path)
    assert not marker.exists()
    path.write_bytes(b"\x00" * 64)   # not safetensors, not a pickle either
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_state_dict(path)


def test_save_state_dict_checks_entries_and_copies_tied_tensors(tmp_path):
    w = torch.ones(4)
    save_state_dict(tmp_path / "tied.safetensors", {"a": w, "b": w})   # tied weights: safetensors refuses them
    loaded = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w)
    with pytest.raises(CheckpointError, match=r"cannot save 'a' .*expected a tensor, got list"):
        save_state_dict(tmp_path / "x.safetensors", {"a": [1.0]})
    with pytest.raises(CheckpointError, match="keys must be strings"):
        save_state_dict(tmp_path / "x.safetensors", {1: w})
    with pytest.raises(CheckpointError, match=r"metadata \{'k': 1\}: safetensors metadata is a mapping of strings"):
        save_state_dict(tmp_path / "x.safetensors", {"a": w}, metadata={"k": 1})
    for bad, what in [(w.to_sparse(), "a torch.sparse_coo tensor"), (torch.empty(2, device="meta"), "a meta tensor"),
                      (torch.ones(2, dtype=torch.complex128), "dtype torch.complex128")]:
        with pytest.raises(CheckpointError, match=f"cannot save 'a' to .*x.safetensors: it is {what}"):
            save_state_dict(tmp_path / "x.safetensors", {"a": bad})
    assert not (tmp_path / "x.safetensors").exists()
    # no tensors: safetensors (0.8) wrote an unreadable header for them with empty metadata, and the save failed on it
    assert load_state_dict(save_state_dict(tmp_path / "empty.safetensors", {})) == {}
    assert read_metadata(save_state_dict(tmp_path / "empty.safetensors", {}, {"k": "v"})) == {"k": "v"}
    # a write that fails midway (the file-size limit stands in for a full disk) is named, and leaves neither the
    # file nor the folders made for it
    old_limit, old_signal = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, old_limit[1]))
        with pytest.raises(CheckpointError, match=r"cannot write .*new/sub/x\.safetensors: .*File too large"):
            save_state_dict(tmp_path / "new" / "sub" / "x.safetensors", {"a": torch.ones(1000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_signal)
    assert not (tmp_path / "new").exists()
    # the same weights and metadata make the same bytes: safetensors writes metadata in a hash map's order, which
    # changes from process to process; the header is sorted (6 entries: 1 in 720 orders is sorted by chance)
    meta = {k: f"value é {k}\n" for k in "fbdaec"}
    save_state_dict(tmp_path / "meta.safetensors", {"b": w, "a": w.half()}, meta)
    raw = (tmp_path / "meta.safetensors").read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    assert list(header["__metadata__"]) == sorted(meta) and read_metadata(tmp_path / "meta.safetensors") == meta
    assert torch.equal(load_state_dict(tmp_path / "meta.safetensors")["a"], w.half())
    # a FIFO (or a device such as /dev/null) is refused, not replaced by a regular file
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(CheckpointError, match=r"cannot write .*pipe: it is a device, FIFO or socket"):
        save_state_dict(tmp_path / "pipe", {"a": w})
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)
    with pytest.raises(CheckpointError, match=r"cannot write .*tied.safetensors/sub/x.safetensors: .*tied.safetensors "
                                              r"is a file, not a folder"):
        save_state_dict(tmp_path / "tied.safetensors" / "sub" / "x.safetensors", {"a": w})
    with pytest.raises(CheckpointError, match=r"nobody/x: revision must be a branch, tag or commit name \(a string\), "
                                              r"got 3"):
        load_state_dict("nobody/x", revision=3)
    # a link is written through: the target gets the new weights, the link stays a link
    save_state_dict(tmp_path / "target.safetensors", {"a": w})
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target.safetensors")
    save_state_dict(tmp_path / "link.safetensors", {"a": 2 * w})
    assert (tmp_path / "link.safetensors").is_symlink()
    assert torch.equal(load_state_dict(tmp_path / "target.safetensors")["a"], 2 * w)


def test_bench_leaderboard_and_build_suite_take_their_own_options(capsys):
    """``merge-studio bench --device cpu`` was refused by argparse (a REMAINDER cannot start with an option)."""
    for cmd, option in (("bench", "--device"), ("leaderboard", "--threads"), ("build-suite", "--out")):
        with pytest.raises(SystemExit) as exit_:
            main([cmd, "--help"])
        assert exit_.value.code == 0 and option in capsys.readouterr().out, cmd
    # a negative share of target-domain images was taken (and gave a negative count of them)
    with pytest.raises(SystemExit):
        main(["build-suite", "--pretrain-target-fraction", "-0.5"])
    assert "--pretrain-target-fraction: -0.5 is not a finite number >= 0" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ checkpoint sources
def test_checkpoints_load_from_files_folders_shards_and_the_hub_cache(tmp_path, offline_hub, capsys):
    """Every source the CLI and ``load_state_dict`` take: a file; a folder with ``model.safetensors``; a folder
    sharded by huggingface_hub's own ``save_torch_state_dict``; a folder with one open_clip-style file; a Hub repo
    (whole, at a revision, or one of its files) served offline from a cache in huggingface_hub's layout."""
    from huggingface_hub import save_torch_state_dict

    from .conftest import hub_cache

    base = clip_like_state_dict(width=16)
    experts = make_experts(base, 4)
    save_state_dict(tmp_path / "base.safetensors", base)
    (tmp_path / "single").mkdir()
    save_state_dict(tmp_path / "single" / "model.safetensors", experts["task0"])
    for name in ("task1", "task3"):
        (tmp_path / name).mkdir()
        save_torch_state_dict(experts[name], tmp_path / name, max_shard_size=4000)
    shards = sorted(p.name for p in (tmp_path / "task3").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "task3" / "model.safetensors.index.json").is_file()
    (tmp_path / "open_clip").mkdir()
    save_state_dict(tmp_path / "open_clip" / "open_clip_model.safetensors", experts["task2"])
    cache = tmp_path / "hf"
    hub_cache(tmp_path / "task3", cache, "studio-test/task3")

    sources = {"task0": tmp_path / "single", "task1": tmp_path / "task1", "task2": tmp_path / "open_clip",
               "task3": "studio-test/task3"}
    for name, source in sources.items():
        _equal(load_state_dict(source, cache_dir=cache), experts[name])
    _equal(load_state_dict("studio-test/task3@main", cache_dir=cache), experts["task3"])
    one = load_state_dict(f"studio-test/task3/{shards[0]}", cache_dir=cache)
    assert one and all(torch.equal(v, experts["task3"][k]) for k, v in one.items()) and len(one) < len(base)
    assert sorted(load_state_dict(tmp_path / "task1", prefix="visual.transformer.resblocks.1.")) == \
        sorted(k for k in base if k.startswith("visual.transformer.resblocks.1."))

    # the CLI takes the same sources (the Hub one through HF_HOME's cache, as a user's download leaves it)
    import huggingface_hub.constants as hub_constants

    args = ["--base", str(tmp_path / "base.safetensors")]
    args += [f"--expert={name}={source}" for name, source in sources.items()]
    out = tmp_path / "m.safetensors"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
        assert main(["merge", *args, "--method", "tsv_m", "--out", str(out)]) == 0, capsys.readouterr().err
    _equal(load_state_dict(out), studio.merge(base, experts, "tsv_m"))

    # --prefix: a base with a text tower, experts of the visual tower alone (as FusionBench's CLIP experts)
    visual = {name: {k: v for k, v in sd.items() if k.startswith("visual.")} for name, sd in experts.items()}
    for name in ("task0", "task1"):
        save_state_dict(tmp_path / f"visual_{name}.safetensors", visual[name])
    args = ["--base", str(tmp_path / "base.safetensors"), "--prefix", "visual."]
    args += [f"--expert={name}={tmp_path / f'visual_{name}.safetensors'}" for name in ("task0", "task1")]
    assert main(["merge", *args, "--method", "iso_c", "--out", str(out)]) == 0, capsys.readouterr().err
    base_visual = {k: v for k, v in base.items() if k.startswith("visual.")}
    _equal(load_state_dict(out), studio.merge(base_visual, {n: visual[n] for n in ("task0", "task1")}, "iso_c"))


@pytest.mark.parametrize("text, spec", [
    ("owner/name", ("owner/name", None, None)),
    ("owner/name@v1", ("owner/name", None, "v1")),
    ("owner/name/sub/w.safetensors@v1", ("owner/name", "sub/w.safetensors", "v1")),
    ("owner/name@refs/pr/1", ("owner/name", None, "refs/pr/1")),
    ("hf://owner/name", ("owner/name", None, None)),
    ("HF://owner/name@v1", ("owner/name", None, "v1")),   # URL schemes are case-insensitive
    ("hf://owner/name@v1/sub/w.safetensors", ("owner/name", "sub/w.safetensors", "v1")),
    ("hf://owner/name/w.safetensors", ("owner/name", "w.safetensors", None)),
    ("hf://owner/name@refs/pr/1/w.safetensors", ("owner/name", "w.safetensors", "refs/pr/1")),
    ("hf://owner/name@refs%2Fconvert%2Fparquet", ("owner/name", None, "refs/convert/parquet")),
    # not references: each was read as some other repository or file, or is a mistyped local path
    ("hf://owner", None), ("hf://owner/name/", None), ("hf://owner/name@v1/", None), ("hf://owner//name", None),
    ("hf://owner//sub/w.safetensors", None), ("hf:///x", None), ("hf://owner/name/x/../w.safetensors", None),
    ("hf://owner/name/w.safetensors@v1", None), ("owner/name.safetensors", None), ("owner/name/notes.txt", None),
    ("owner/name@", None), ("owner/name/../w.safetensors", None),
])
def test_hub_references_parse_in_both_forms_and_round_trip(text, spec):
    """``owner/name[/file][@rev]`` and huggingface_hub's URL form ``hf://owner/name[@rev][/file]``; what a recipe
    records (:func:`studio.io.hub_url`) reads back as the same reference."""
    from studio.io import hub_spec, hub_url

    assert hub_spec(text) == spec
    if spec is not None:
        assert hub_spec(hub_url(*spec)) == spec


def test_a_hub_checkpoint_fetches_only_the_files_it_reads(tmp_path, offline_hub, monkeypatch):
    """The calls to huggingface_hub (recorded on the way through; offline, they serve the cache): the weights file or
    the index first, then the shards the index lists, at the snapshot's commit; never a ``*`` pattern (which matches
    subfolders and variants too) and never a pickle."""
    import huggingface_hub
    from huggingface_hub import save_torch_state_dict

    from .conftest import hub_cache

    sd = clip_like_state_dict(width=16)
    (tmp_path / "sharded").mkdir()
    save_torch_state_dict(sd, tmp_path / "sharded", max_shard_size=4000)
    (tmp_path / "sharded" / "sub").mkdir()
    save_state_dict(tmp_path / "sharded" / "sub" / "model.safetensors", {"other": torch.zeros(1)})
    snapshot = hub_cache(tmp_path / "sharded", tmp_path / "hf", "studio-test/sharded")
    calls = []
    real = huggingface_hub.snapshot_download

    def recorded(*args, **kwargs):
        calls.append((kwargs["revision"], kwargs["allow_patterns"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorded)
    _equal(load_state_dict("studio-test/sharded", cache_dir=tmp_path / "hf"), sd)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert calls == [(None, ["model.safetensors", "model.safetensors.index.json"]), (snapshot.name, shards)]


def test_bad_checkpoint_sources_are_errors_naming_the_source(tmp_path, offline_hub, capsys, monkeypatch):
    from huggingface_hub import save_torch_state_dict

    from .conftest import hub_cache

    sd = clip_like_state_dict(width=16)
    two = tmp_path / "two"
    two.mkdir()
    save_state_dict(two / "a.safetensors", sd)
    save_state_dict(two / "b.safetensors", sd)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "sharded").mkdir()
    save_torch_state_dict(sd, tmp_path / "sharded", max_shard_size=4000)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    text = index.read_text()
    weight_map = json.loads(text)["weight_map"]
    first, second = sorted(set(weight_map.values()))[:2]
    hub_cache(pickled, tmp_path / "hf", "studio-test/pickled")
    monkeypatch.chdir(tmp_path)
    cases = [
        (two, r"two: expected model.safetensors, one \*.safetensors.index.json or a single .safetensors file; "
              r"found \['a.safetensors', 'b.safetensors'\]"),
        (pickled, r"found \['pytorch_model.bin'\] \(pickle files are not loaded"),
        (pickled / "pytorch_model.bin", "pickle checkpoints are not loaded"),
        (pickled / "MODEL.PT", "pickle checkpoints are not loaded"),
        (tmp_path / "typo" / "model.safetensors", r"typo/model.safetensors: no such file or folder \(from [^)]*\)$"),
        ("typo/model.safetensors", r"no such file or folder \(from .*\), and not a Hugging Face Hub repository"),
        # the first part is a local folder: a mistyped local path, never sent to the Hub
        ("sharded/nope", r"sharded/nope: no such file or folder \(from [^)]*\); read as a local path because a "
                         r"folder 'sharded' exists here: write hf://sharded/nope for the Hub repository of that name$"),
        ("sharded/nope/w.safetensors@v1", "write hf://sharded/nope@v1/w.safetensors for the Hub repository"),
        ("", "a checkpoint source is a path or a Hub repository name, got ''"),   # was the working folder
        (" ", "a checkpoint source is a path or a Hub repository name, got ' '"),
        ("~nosuchuser-0/m.safetensors", r"~nosuchuser-0/m.safetensors: cannot be read \(Could not determine home"),
        ("hf://studio-test", r"hf://studio-test: not a Hugging Face Hub reference hf://\[datasets/\]owner/name\[@revision\]"),
        ("hf://studio-test/x/m.safetensors@v1", "not a Hugging Face Hub reference"),   # the revision goes after name
        # hf:// is the Hub whatever local folders exist ('sharded/' does)
        ("hf://sharded/nope", r"^'hf://sharded/nope' cannot be fetched as a checkpoint from the Hugging Face Hub"),
        ("studio-test/not-cached", r"offline mode, HF_HUB_OFFLINE, is on and it is not in the local cache"),
        ("studio-test/not-cached/model.safetensors", "offline mode, HF_HUB_OFFLINE, is on"),
        # offline, a snapshot that lacks them may only lack them in the cache
        ("studio-test/pickled", r"the Hub repository 'studio-test/pickled' at main: neither model.safetensors nor "
                                r"model.safetensors.index.json is in the local cache, and offline mode"),
        (None, "a checkpoint source is a path or a Hub repository name, got None"),
    ]
    for source, message in cases:
        with pytest.raises(CheckpointError, match=message) as err:
            load_state_dict(source, cache_dir=tmp_path / "hf")
        assert "\n" not in str(err.value), source
    with pytest.raises(CheckpointError, match="names revision 'v1' but revision='v2'"):
        load_state_dict("studio-test/x@v1", revision="v2")
    with pytest.raises(CheckpointError, match="no tensor name starts with the prefix 'vision_model.'"):
        load_state_dict(two / "a.safetensors", prefix="vision_model.")
    for dtype in ("float16", torch.int8, torch.float8_e4m3fn):   # float8: the dtype at fault, not the file
        with pytest.raises(CheckpointError, match=r"dtype must be one of torch.float16, torch.bfloat16, torch.float32 "
                                                  rf"or torch.float64 .* got {re.escape(repr(dtype))}$"):
            load_state_dict(two / "a.safetensors", dtype=dtype)
    _equal(load_state_dict(index), sd)   # the index itself names the checkpoint
    _equal(load_state_dict(path=tmp_path / "sharded"), sd)   # the keyword of earlier versions
    repeated_meta = text.replace('"metadata": {', '"metadata": {"note": 1, "note": 2, ', 1)
    assert repeated_meta != text
    index.write_text(repeated_meta)   # only the weight_map's names must be unique
    _equal(load_state_dict(tmp_path / "sharded"), sd)
    index.write_text(text)
    partial = hub_cache(tmp_path / "sharded", tmp_path / "hf", "studio-test/partial")
    (partial / first).unlink()   # a download that stopped half-way: offline, say the cache lacks it
    with pytest.raises(CheckpointError, match=rf"'studio-test/partial' at main: 1 of the \d+ shards its index lists "
                                              rf"\(e.g. '{first}'\) are not in the local cache, and offline mode"):
        load_state_dict("studio-test/partial", cache_dir=tmp_path / "hf")
    from studio.io import hub_spec
    assert hub_spec("a/b@r1@r2") is None and hub_spec("a/b@refs/pr/1") == ("a/b", None, "refs/pr/1")
    # the URL form's order in the plain form would read the file as part of the revision
    with pytest.raises(CheckpointError, match=r"a/b@v1/m\.safetensors: reads as revision 'v1/m\.safetensors'; .*"
                                              r"\(a/b/m\.safetensors@v1\), in the URL form after it"):
        hub_spec("a/b@v1/m.safetensors")

    # each way a shard index can be wrong, named by the index or the shard (not wrapped as "not readable")
    wrong = [
        ({**weight_map, "extra_key": first}, rf"{first}: its shard index puts 1 tensor\(s\) in this file that it does "
                                             rf"not hold, e.g. 'extra_key'$"),
        ({**weight_map, "extra_key": "../elsewhere.safetensors"}, r"shard '../elsewhere.safetensors' \(holding 1 "
                                                                 r"tensor\(s\), e.g. 'extra_key'\) is outside"),
        ({**weight_map, "extra_key": "pytorch_model.bin"}, "pytorch_model.bin: pickle checkpoints are not loaded"),
    ]
    for mapping, message in wrong:
        index.write_text(json.dumps({"weight_map": mapping}))
        with pytest.raises(CheckpointError, match=message) as err:
            load_state_dict(tmp_path / "sharded")
        assert "not a readable" not in str(err.value)
    key = next(k for k, v in weight_map.items() if v == first)
    index.write_text(text.replace(f'"{key}": "{first}"', f'"{key}": "{first}", "{key}": "{second}"'))
    with pytest.raises(CheckpointError, match=rf"index.json: 'weight_map' lists '{key}' more than once"):
        load_state_dict(tmp_path / "sharded")
    save_state_dict(tmp_path / "sharded" / second, {**load_state_dict(tmp_path / "sharded" / second), key: sd[key]})
    index.write_text(text)   # a tensor in two shards, the index naming one
    with pytest.raises(CheckpointError, match=rf"tensor '{key}' is also in {first}; each tensor must be in one shard"):
        load_state_dict(tmp_path / "sharded")
    for bad in ("{", json.dumps({"metadata": {}}), json.dumps({"weight_map": {"a": 1}})):
        index.write_text(bad)
        with pytest.raises(CheckpointError, match="model.safetensors.index.json: .*weight_map"):
            load_state_dict(tmp_path / "sharded")
    index.write_text(text)
    (tmp_path / "sharded" / first).rename(tmp_path / "moved.safetensors")
    with pytest.raises(CheckpointError, match=rf"shard '{first}' \(holding \d+ tensor\(s\), e.g. '.+'\) is missing"):
        load_state_dict(tmp_path / "sharded")

    # the CLI: one line, nothing written
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--base", str(two / "a.safetensors"), "--expert", f"x={two}", "--method",
                 "task_arithmetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "two: expected model.safetensors" in err[0] and not out.exists()
    assert main(["merge", "--base", "studio-test/not-cached", "--expert", f"x={two / 'a.safetensors'}", "--method",
                 "task_arithmetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'studio-test/not-cached' is not a local path" in err[0] and not out.exists()
    assert main(["merge", "--suite", str(DEFAULT_SUITE_PATH), "--prefix", "visual.", "--method", "task_arithmetic",
                 "--out", str(out)]) == 2
    assert "--prefix applies to --base and --expert" in capsys.readouterr().err and not out.exists()


def test_the_recipe_keeps_the_prefix_and_its_replay_uses_it(files, capsys):
    """A merge under --prefix replayed without it merged every tensor (a different model, silently)."""
    tmp, base, experts, args = files
    out, recipe = tmp / "m.safetensors", tmp / "m.yaml"
    assert main(["merge", *args, "--prefix", "visual.transformer.", "--method", "tsv_m", "--out", str(out),
                 "--recipe", str(recipe)]) == 0
    merged = load_state_dict(out)
    assert merged and all(k.startswith("visual.transformer.") for k in merged)
    assert Recipe.from_file(recipe).prefix == Recipe.from_file(out).prefix == "visual.transformer."
    assert "prefix" not in Recipe(method="ties").to_dict()   # recipes without one: readable by earlier versions
    again = tmp / "again.safetensors"
    assert main(["recipe", str(recipe), *args, "--out", str(again)]) == 0
    _equal(load_state_dict(again), merged)
    _equal(merge_from_recipe(Recipe.from_file(out), base, experts), merged)   # the library applies it too
    assert main(["recipe", str(recipe), *args, "--prefix", "visual.", "--out", str(again)]) == 2
    assert "--prefix 'visual.' differs from the recipe's prefix 'visual.transformer.'" in capsys.readouterr().err


def test_a_recipe_of_checkpoints_records_their_sources_and_replays_from_them(tmp_path, offline_hub, monkeypatch,
                                                                          capsys):
    """``merge-studio recipe`` of a --base/--expert merge needs no options: local sources are recorded as absolute
    paths (the merge ran from another folder), Hub sources pinned to the commit they came from (``@v1`` and
    ``main`` moved on to other weights since); a recorded source that is gone is an error naming the expert."""
    import huggingface_hub.constants as hub_constants

    from .conftest import hub_cache

    base = clip_like_state_dict(width=16)
    experts = make_experts(base, 4)
    work = tmp_path / "work"
    work.mkdir()
    save_state_dict(work / "base.safetensors", base)
    (work / "t0").mkdir()
    save_state_dict(work / "t0" / "model.safetensors", experts["task0"])
    save_state_dict(work / "t1.safetensors", experts["task1"])
    cache = tmp_path / "hf"
    old, new = "1" * 40, "2" * 40
    for name in ("task2", "task3"):
        for commit, weights in ((old, experts[name]), (new, experts["task0"])):
            (tmp_path / "src").mkdir()
            save_state_dict(tmp_path / "src" / "model.safetensors", weights)
            repo = hub_cache(tmp_path / "src", cache, f"studio-test/{name}", commit).parent.parent
            (tmp_path / "src" / "model.safetensors").unlink()
            (tmp_path / "src").rmdir()
            (repo / "refs" / ("v1" if commit == old else "main")).write_text(commit)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    (repo / "refs" / "main").write_text(old)   # task3's main is still the old commit when the merge runs

    monkeypatch.chdir(work)
    args = ["--base", "base.safetensors", "--expert", "task0=t0", "--expert", "task1=./t1.safetensors",
            "--expert", "task2=studio-test/task2@v1", "--expert", "task3=studio-test/task3/model.safetensors"]
    assert main(["merge", *args, "--method", "tsv_m", "--out", "m.safetensors", "--recipe", "m.yaml"]) == 0, \
        capsys.readouterr().err
    want = studio.merge(base, experts, "tsv_m")
    _equal(load_state_dict("m.safetensors"), want)
    recipe = Recipe.from_file(work / "m.yaml")
    # the file a folder resolved to (a later model.safetensors beside the shards, or the output written into the
    # folder, would change what the folder means)
    assert recipe.sources == {"base": str(work / "base.safetensors"), "experts": {
        "task0": str(work / "t0" / "model.safetensors"), "task1": str(work / "t1.safetensors"),
        "task2": f"hf://studio-test/task2@{old}", "task3": f"hf://studio-test/task3@{old}/model.safetensors"}}
    assert Recipe.from_file(work / "m.safetensors") == recipe

    (repo / "refs" / "main").write_text(new)   # task3's main moves on: the pinned commit is replayed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "studio-test").mkdir()   # a local folder named like the Hub owner: hf:// still means the Hub
    for source in ("work/m.yaml", "work/m.safetensors"):
        assert main(["recipe", source, "--out", "again.safetensors"]) == 0, capsys.readouterr().err
        _equal(load_state_dict(tmp_path / "again.safetensors"), want)
    assert Recipe.from_file(tmp_path / "again.safetensors") == recipe
    # options choose other checkpoints: all of them, or some, the recipe's sources giving the rest
    swapped = {**experts, "task2": experts["task1"]}
    for extra, expected in (([f"--expert=task{i}=work/t1.safetensors" for i in range(4)] + ["--base", "work/t0"],
                             (experts["task0"], {f"task{i}": experts["task1"] for i in range(4)})),
                            (["--expert", "task2=work/t1.safetensors"], (base, swapped)),
                            (["--base", "work/base.safetensors"], (base, experts))):
        assert main(["recipe", "work/m.yaml", *extra, "--out", "other.safetensors"]) == 0, capsys.readouterr().err
        _equal(load_state_dict(tmp_path / "other.safetensors"), studio.merge(*expected, "tsv_m"))
        # the output records what it was merged from, so it replays to itself (it kept the recipe's sources)
        assert main(["recipe", "other.safetensors", "--out", "replayed.safetensors"]) == 0
        _equal(load_state_dict(tmp_path / "replayed.safetensors"), studio.merge(*expected, "tsv_m"))
    for extra, message in ((["--expert", "zzz=work/t1.safetensors"], "--expert 'zzz': the recipe merges ['task0', "),
                           (["--experts", "task0"], "the recipe names the experts it merges"),
                           (["--suite", str(DEFAULT_SUITE_PATH), "--base", "work/t0"], "not both"),
                           (["--expert", "task1=work/t1.safetensors"], "work/t1.safetensors is the checkpoint of "
                                                                       "expert 'task1', which this command reads")):
        out = "work/t1.safetensors" if "task1=" in extra[-1] else "x.safetensors"
        before = (work / "t1.safetensors").read_bytes()
        assert main(["recipe", "work/m.yaml", *extra, "--out", out]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.safetensors").exists() and (work / "t1.safetensors").read_bytes() == before

    (work / "t1.safetensors").unlink()
    assert main(["recipe", "work/m.yaml", "--out", "gone.safetensors"]) == 2
    err = capsys.readouterr().err
    assert f"expert 'task1': {work / 't1.safetensors'}: no such file or folder" in err, err
    assert "(a source the recipe recorded; give --expert task1=SOURCE to read another)" in err, err
    assert not (tmp_path / "gone.safetensors").exists()
    # a suite merge records the suite and no sources: the embedded one by its name, any other by its folder
    monkeypatch.chdir(DEFAULT_SUITE_PATH.parent)
    assert main(["merge", "--suite", DEFAULT_SUITE_PATH.name, "--experts", "digits,textures", "--method", "ties",
                 "--out", str(tmp_path / "s.safetensors")]) == 0
    suite_recipe = Recipe.from_file(tmp_path / "s.safetensors")
    assert suite_recipe.suite == "MiniSuite" and suite_recipe.sources is None
    monkeypatch.chdir(tmp_path)
    assert main(["recipe", "s.safetensors", "--out", "s2.safetensors"]) == 0
    _equal(load_state_dict("s2.safetensors"), load_state_dict("s.safetensors"))
    assert main(["recipe", "s.safetensors", "--base", "work/base.safetensors", "--out", "s3.safetensors"]) == 2
    assert "(the recipe merged the suite MiniSuite; checkpoints replace all of it)" in capsys.readouterr().err
    assert "sources" not in Recipe(method="ties").to_dict()


def test_a_symlinked_shard_index_replays_and_outputs_never_overwrite_inputs(tmp_path, capsys):
    """A shard index reached through a symbolic link (a Hub cache snapshot: links into ../blobs) was recorded as its
    target, which is neither named like an index nor beside its shards; merging onto a source is refused."""
    from huggingface_hub import save_torch_state_dict

    base = clip_like_state_dict(width=16)
    experts = make_experts(base, 2)
    save_state_dict(tmp_path / "base.safetensors", base)
    (tmp_path / "blobs").mkdir()
    (tmp_path / "snap").mkdir()
    save_torch_state_dict(experts["task0"], tmp_path / "blobs", max_shard_size=4000)
    for file in (tmp_path / "blobs").iterdir():
        (tmp_path / "snap" / file.name).symlink_to(file)
    save_state_dict(tmp_path / "t1.safetensors", experts["task1"])
    index = tmp_path / "snap" / "model.safetensors.index.json"
    args = ["--base", str(tmp_path / "base.safetensors"), "--expert", f"task0={index}",
            "--expert", f"task1={tmp_path / 't1.safetensors'}", "--method", "ties"]
    assert main(["merge", *args, "--out", str(tmp_path / "m.safetensors")]) == 0
    assert Recipe.from_file(tmp_path / "m.safetensors").sources["experts"]["task0"] == str(index)
    assert main(["recipe", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "r.safetensors")]) == 0
    _equal(load_state_dict(tmp_path / "r.safetensors"), studio.merge(base, experts, "ties"))
    shard = sorted((tmp_path / "snap").glob("*.safetensors"))[0]
    for cmd, out in (("merge", tmp_path / "base.safetensors"), ("merge", shard), ("compress", index)):
        before = out.read_bytes()
        extra = ["--method", "ties"] if cmd == "merge" else []
        assert main([cmd, *args[:6], *extra, "--out", str(out)]) == 2
        assert "which this command reads" in capsys.readouterr().err and out.read_bytes() == before, (cmd, out)


def test_no_command_writes_over_a_suite_file_the_recipe_the_packed_file_or_the_hub_cache(tmp_path, offline_hub,
                                                                                         monkeypatch, capsys):
    import shutil

    import huggingface_hub.constants as hub_constants

    suite = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, suite)
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    pool = ["--suite", str(suite), "--experts", "digits,textures"]
    assert main(["merge", *pool, "--method", "ties", "--out", str(tmp_path / "m.safetensors"),
                 "--recipe", str(tmp_path / "m.yaml")]) == 0
    assert main(["compress", *pool, "--out", str(tmp_path / "p.safetensors")]) == 0
    expert = next((suite / "experts").glob("*.safetensors"))
    cases = [
        (["merge", *pool, "--method", "ties", "--out", str(suite / "base.safetensors")], "is a file of the suite"),
        (["compress", *pool, "--out", str(expert)], "is a file of the suite"),
        (["merge", *pool, "--method", "ties", "--out", str(suite / "manifest.json")], "is a file of the suite"),
        (["recipe", str(tmp_path / "m.yaml"), "--out", str(tmp_path / "m.yaml")], "is the recipe"),
        (["reconstruct", str(tmp_path / "p.safetensors"), "--task", "digits", "--out", str(tmp_path / "p.safetensors")],
         "is the packed file"),
        (["reconstruct", str(tmp_path / "p.safetensors"), "--task", "digits", "--out", str(suite / "base.safetensors")],
         "is a file of the suite"),
        (["merge", *pool, "--method", "ties", "--out", str(cache / "models--a--b" / "snapshots" / "m.safetensors")],
         "is in the Hugging Face cache"),
    ]
    for argv, message in cases:
        out = Path(argv[argv.index("--out") + 1])
        before = out.read_bytes() if out.exists() else None
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        # the inputs were read: the fault is the output, not a source the packed file or recipe recorded
        assert f"{out} {message}" in err and "recorded" not in err, err
        assert (out.read_bytes() if out.exists() else None) == before, argv
    # a new file beside the suite's own is fine
    assert main(["merge", *pool, "--method", "ties", "--out", str(suite / "merged.safetensors")]) == 0
    # the embedded suite, recorded by its name, is protected as well (nothing is written if the check fails)
    import studio.cli

    monkeypatch.setattr(studio.cli, "save_merged", lambda *a, **k: pytest.fail("wrote over the embedded suite"))
    assert main(["merge", "--suite", str(DEFAULT_SUITE_PATH), "--experts", "digits,textures", "--method", "ties",
                 "--out", str(DEFAULT_SUITE_PATH / "base.safetensors")]) == 2
    assert "is a file of the suite MiniSuite" in capsys.readouterr().err


def test_recipes_check_their_sources():
    good = {"base": "/b", "experts": {"a": "/a", "b": "owner/b@" + "1" * 40}}
    assert Recipe(method="ties", experts=["b", "a"], sources=good).sources == good
    assert Recipe(method="ties", sources=good).experts == ["a", "b"]   # no list: the experts the sources name
    for bad in ("/b", {"base": "/b"}, {**good, "extra": 1}):
        with pytest.raises(CheckpointError, match="recipe field 'sources' must be a mapping"):
            Recipe(method="ties", experts=["a", "b"], sources=bad)
    # each entry at fault is named; an empty source read the working folder
    for bad, message in (({"base": 1, "experts": {}}, "'sources.base' must be a checkpoint source .* got 1"),
                         ({"base": "", "experts": {"a": "/a"}}, "'sources.base' must be a checkpoint source"),
                         ({"base": "/b", "experts": ["/a"]}, "'sources.experts' must map expert names"),
                         ({"base": "/b", "experts": {"a": None}}, r"'sources.experts.a' must be .* got None"),
                         ({"base": "/b", "experts": {"a": " "}}, r"'sources.experts.a' must be .* got ' '"),
                         ({"base": "/b", "experts": {1: "/a"}}, "keyed by expert names .* got 1")):
        with pytest.raises(CheckpointError, match=message):
            Recipe(method="ties", sources=bad)
    with pytest.raises(CheckpointError, match=r"names the experts \['a', 'b'\], but the recipe merges \['a'\]"):
        Recipe(method="ties", experts=["a"], sources=good)


# ------------------------------------------------------------------------------------------ TSV-C files
def test_compressed_experts_round_trip_through_a_file_and_the_cli(files, capsys):
    """``Compressed.save`` / ``load`` keep every factor and dense tensor bit for bit; ``merge-studio compress`` and
    ``reconstruct`` give what the library gives."""
    from studio.compress import Compressed, LowRank

    tmp, base, experts, args = files
    packed = studio.compress(base, experts, rank_fraction=0.5, layer_rule="default")
    again = Compressed.load(packed.save(tmp / "lib.safetensors"), base)
    assert list(again.tasks) == list(packed.tasks) and again.rank_fraction == 0.5
    assert again.layer_rule == packed.layer_rule and again.meta == packed.meta
    for name, sd in packed.tasks.items():
        assert list(again.tasks[name]) == list(sd)
        for key, v in sd.items():
            w = again.tasks[name][key]
            assert type(w) is type(v), (name, key)
            pairs = zip((v.U, v.S, v.Vh), (w.U, w.S, w.Vh)) if isinstance(v, LowRank) else [(v, w)]
            assert all(torch.equal(a, b) for a, b in pairs), (name, key)
    assert again.storage() == packed.storage()

    out = tmp / "packed.safetensors"
    assert main(["compress", *args, "--rank-fraction", "0.5", "--layer-rule", "default", "--out", str(out)]) == 0
    assert "3 experts, " in capsys.readouterr().out
    rebuilt = tmp / "rebuilt_task1.safetensors"   # not task1.safetensors: the expert itself
    assert main(["reconstruct", str(out), "--base", args[1], "--task", "task1", "--alpha", "0.7",
                 "--out", str(rebuilt)]) == 0
    _equal(load_state_dict(rebuilt), packed.reconstruct("task1", alpha=0.7))
    # compress records --prefix; reconstruct applies it to the base (it would otherwise write the whole base)
    assert main(["compress", *args, "--prefix", "visual.", "--out", str(out)]) == 0
    assert Compressed.read_meta(out)["prefix"] == "visual."
    assert main(["reconstruct", str(out), "--base", args[1], "--task", "task1", "--out", str(rebuilt)]) == 0
    visual = {k: v for k, v in base.items() if k.startswith("visual.")}
    want = studio.compress(visual, {n: {k: sd[k] for k in visual} for n, sd in experts.items()}).reconstruct("task1")
    _equal(load_state_dict(rebuilt), want)
    # compress also records its --base: reconstruct finds it without options, and says so when it has gone
    assert Compressed.read_meta(out)["base"] == str(tmp / "base.safetensors")
    assert main(["reconstruct", str(out), "--task", "task1", "--out", str(rebuilt)]) == 0
    _equal(load_state_dict(rebuilt), want)
    (tmp / "base.safetensors").rename(tmp / "moved.safetensors")
    assert main(["reconstruct", str(out), "--task", "task1", "--out", str(tmp / "r.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "base.safetensors: no such file or folder" in err and "the base compress recorded; give --suite or " \
        "--base" in err and not (tmp / "r.safetensors").exists(), err


def test_bad_compressed_files_and_reconstructions_are_clear_errors(files, capsys):
    from studio.compress import Compressed

    tmp, base, experts, args = files
    path = studio.compress(base, experts).save(tmp / "packed.safetensors")
    key = "visual.proj"
    cases = [
        ({k: v for k, v in base.items() if k != key}, rf"'{key}' is not a key of the base"),
        ({**base, key: torch.zeros(3, 3)}, rf"task 'task0', '{key}': factors U \(16, 2\), S \(2,\), Vh \(2, 6\) do "
                                           rf"not make the base's \(3, 3\)"),
        ({**base, "visual.ln_pre.bias": torch.zeros(3)}, r"'visual.ln_pre.bias': shape \(16,\), the base's is \(3,\)"),
    ]
    for wrong_base, message in cases:
        with pytest.raises(CheckpointError, match=message):
            Compressed.load(path, wrong_base)
    with pytest.raises(CheckpointError, match="not a TSV-C file written by Compressed.save"):
        Compressed.load(tmp / "base.safetensors", base)
    # a file that lost a task's entries (here the bias of task0) would rebuild the base's value there
    entries = load_state_dict(path)
    save_state_dict(tmp / "cut.safetensors", {k: v for k, v in entries.items() if not k.startswith(
        "0/visual.ln_pre.bias/")}, _unsealed(path))
    with pytest.raises(CheckpointError, match=r"cut.safetensors: task 'task0' has no entry for 'visual.ln_pre.bias', "
                                              r"which the other tasks have; the file is incomplete"):
        Compressed.load(tmp / "cut.safetensors", base)
    packed = Compressed.load(path, base)
    # a base with more tensors than the file (a full model for a tower's file) takes the task vectors where they are
    more = Compressed.load(path, {**base, "text.extra": torch.ones(2)}, check=False).reconstruct("task0")
    assert torch.equal(more["text.extra"], torch.ones(2))
    with pytest.raises(studio.HyperparameterError, match=r"reconstruct: task 'task0', '.*' is not finite in "
                                                         r"torch.float32 with alpha = 1e\+39"):
        packed.reconstruct("task0", alpha=1e39)
    _equal(packed.reconstruct("task0", alpha=torch.tensor(2.0)), packed.reconstruct("task0", alpha=2.0))
    _equal(packed.reconstruct("task0", alpha=torch.tensor(2)), packed.reconstruct("task0", alpha=2))   # was refused
    for alpha in (torch.tensor(True), 10**400):   # an int beyond float's range raised a bare OverflowError
        with pytest.raises(studio.HyperparameterError, match="alpha must be a finite number"):
            packed.reconstruct("task0", alpha=alpha)
    with pytest.raises(CheckpointError, match=r"the weights' file name must be text or a path, got 3$"):
        packed.save(3)
    out = tmp / "rebuilt.safetensors"
    for extra, message in ((["--task", "nope", "--base", args[1]], "unknown task 'nope'"),
                           (["--task", "task0", "--base", args[1], "--alpha", "nan"], "alpha must be a finite number"),
                           (["--task", "task0"], "give the base the experts were compressed against"),
                           (["--task", "task0", "--base", args[1], "--suite", "x"], "give either --suite or --base")):
        assert main(["reconstruct", str(path), *extra, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and not out.exists(), extra


def test_recipes_and_exports_refuse_what_would_half_write_or_mislead(files):
    """A recipe path that is a folder left the weights written without it; the same path for both left only the
    YAML; recipe hyperparameters named like merge's own arguments collided with them or were dropped; NumPy values
    could not be written; a YAML error spanned several lines."""
    import numpy as np

    tmp, base, experts, args = files
    merged = studio.merge(base, experts, "task_arithmetic")
    recipe = Recipe(method="task_arithmetic", hparams={"alpha": np.float64(0.3)}, experts=list(experts),
                    preferences={"task0": np.int64(2)})
    assert type(recipe.hparams["alpha"]) is float and type(recipe.preferences["task0"]) is int
    assert Recipe.from_text(recipe.to_yaml()) == recipe
    out = tmp / "w.safetensors"
    for recipe_path, message in ((tmp, "it is a folder"), (out, "would both be written to")):
        with pytest.raises(CheckpointError, match=message):
            save_merged(out, merged, recipe, recipe_path=recipe_path)
        assert not out.exists()
    with pytest.raises(CheckpointError, match="needs a studio.io.Recipe, got dict"):
        save_merged(out, merged, {"method": "task_arithmetic"})
    # a .json recipe is JSON (it was YAML under that name), anything else YAML
    save_merged(out, merged, recipe, recipe_path=tmp / "r.json")
    save_merged(out, merged, recipe, recipe_path=tmp / "r.yaml")
    assert Recipe.from_dict(json.loads((tmp / "r.json").read_text())) == recipe == Recipe.from_file(tmp / "r.yaml")
    assert not (tmp / "r.yaml").read_text().lstrip().startswith("{")
    with pytest.raises(CheckpointError, match=r"recipe field 'hparams.alpha' must be a number.*got \[0.1, 0.2\]"):
        Recipe(method="task_arithmetic", hparams={"alpha": [0.1, 0.2]})
    for hparams in ({"seed": 5}, {"base": 1}, {"device": "cpu"}, {"progress": 5}):
        with pytest.raises(StudioError, match="unknown hyperparameter"):
            merge_from_recipe(Recipe(method="task_arithmetic", hparams=hparams), base, experts)
    with pytest.raises(CheckpointError, match="experts must be a mapping of expert names to state dicts, got list"):
        merge_from_recipe(recipe, base, list(experts.values()))
    for text, message in (("method: [unclosed", r"recipe: not valid YAML/JSON at line 1, column 18: expected ',' "
                                                  r"or '\]', but got '<stream end>'"),
                          ("method: ties\nhparams: {k: 0.2\nexperts: [a]\n", r"at line 3, column 8: expected ',' or "
                           r"'}', but got ':' \(while parsing a flow mapping at line 2\)"),
                          ("[" * 100000, "not valid YAML"), (None, "a recipe is YAML or JSON text, got None")):
        with pytest.raises(CheckpointError, match=message) as err:
            Recipe.from_text(text)
        assert "\n" not in str(err.value) and len(str(err.value)) < 300
    with pytest.raises(CheckpointError, match="prefix must be text"):
        load_state_dict(tmp / "base.safetensors", prefix=5)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_state_dict(tmp / ("x" * 300))   # longer than a file name may be


def test_compressed_files_refuse_repeated_tasks_and_non_finite_factors(files):
    from studio.compress import Compressed

    tmp, base, experts, args = files
    packed = studio.compress(base, experts)
    packed.tasks["task0"]["visual.proj"].S[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"entry '0/visual.proj/S' is not a finite floating-point tensor"):
        Compressed.load(packed.save(tmp / "nan.safetensors"), base)
    packed = studio.compress(base, experts)
    path = packed.save(tmp / "p.safetensors")
    header = json.loads(read_metadata(path)["merge_studio_tsv_c"])
    header["tasks"] = ["task0", "task0", "task2"]
    save_state_dict(tmp / "dup.safetensors", load_state_dict(path), {"merge_studio_tsv_c": json.dumps(header)})
    with pytest.raises(CheckpointError, match="repeated task names"):
        Compressed.load(tmp / "dup.safetensors", base)
    with pytest.raises(CheckpointError, match="needs the base state dict"):
        Compressed.load(path, None)
    with pytest.raises(StudioError, match=r"unknown task \['task0'\]"):
        packed.task_vector(["task0"])


def test_what_a_fuzz_audit_of_the_io_found_is_refused_by_name(files, capsys):
    """From a fuzz audit of the I/O, recipes and CLI: YAML values a recipe cannot write back (a date, bytes, a set, a
    self-referencing list, a non-text key) made ``merge-studio recipe`` crash after its merge; a path the file
    system cannot look up (a symbolic link loop, too long a name, a NUL byte) raised Python's errors from the
    library, after the merge; deeply nested JSON raised RecursionError; a recipe's field error did not name its file;
    a malformed recipe embedded in a merged file was taken for none; a TSV-C header with a malformed task list
    loaded under invented names; one shard named two ways in an index was refused; ``--set k=1:30`` merged at 90."""
    from studio.compress import Compressed

    tmp, base, experts, args = files
    for text, field in (("studio_version: 2001-12-14", "studio_version"), ("suite: !!binary aGVsbG8=", "suite"),
                        ("hparams: {1: 2}", "hparams"), ("svd_mode: [1]", "svd_mode"),
                        ("layer_rule: {exclude: [!!set {a}]}", "layer_rule"),
                        ("layer_rule: {exclude: &a [*a]}", "layer_rule")):
        with pytest.raises(CheckpointError, match=f"recipe field '{field}'"):
            Recipe.from_text(f"method: task_arithmetic\n{text}\n")
    (tmp / "date.yaml").write_text("method: task_arithmetic\nstudio_version: 2001-12-14\n")
    assert main(["recipe", str(tmp / "date.yaml"), *args, "--out", str(tmp / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp / 'date.yaml'}: recipe field 'studio_version'" in err and "Traceback" not in err, err
    assert not (tmp / "o.safetensors").exists()

    (tmp / "loop.safetensors").symlink_to("loop.safetensors")
    long_name = tmp / ("a" * 300 + ".safetensors")
    for call, message in ((lambda: save_state_dict(tmp / "loop.safetensors", base), "a loop of symbolic links"),
                          (lambda: save_state_dict(str(tmp / "a\x00b.safetensors"), base), "cannot hold a NUL byte"),
                          (lambda: save_state_dict(long_name, base), "not a usable path"),
                          (lambda: read_metadata(long_name), "not a usable path"),
                          (lambda: Recipe.from_file(long_name), "not a usable path"),
                          (lambda: Compressed.load(long_name, base), "not a usable path")):
        with pytest.raises(CheckpointError, match=message):
            call()
    assert main(["merge", *args, "--method", "task_arithmetic", "--out", str(tmp / "loop.safetensors")]) == 2
    assert "a loop of symbolic links" in capsys.readouterr().err
    assert main(["merge", *args, "--method", "task_arithmetic", "--preferences", "[" * 5000 + "]" * 5000,
                 "--out", str(tmp / "p.safetensors")]) == 2
    assert "--preferences '[[[[[" in capsys.readouterr().err

    packed = studio.compress(base, experts)
    path = packed.save(tmp / "packed.safetensors")
    weights, header = load_state_dict(path), json.loads(read_metadata(path)["merge_studio_tsv_c"])
    for edit, message in (({"tasks": "ab"}, "'tasks' must be a list of task names"),
                          ({"tasks": [0, 1, 2]}, "'tasks' must be a list of task names"),
                          ({"rank_fraction": -3}, r"'rank_fraction' \(in \(0, 1\] or null\)")):
        save_state_dict(tmp / "edited.safetensors", weights, {"merge_studio_tsv_c": json.dumps({**header, **edit})})
        with pytest.raises(CheckpointError, match=message):
            Compressed.load(tmp / "edited.safetensors", base)
    save_state_dict(tmp / "deep.safetensors", weights, {"merge_studio_tsv_c": "[" * 5000 + "]" * 5000})
    with pytest.raises(CheckpointError, match="nested too deeply"):
        Compressed.load(tmp / "deep.safetensors", base)

    recipe = Recipe(method="task_arithmetic", experts=list(experts)).to_json().replace('"seed": 0', '"seed": 1.5')
    save_state_dict(tmp / "emb.safetensors", base, {RECIPE_METADATA_KEY: recipe})
    assert main(["evaluate", "--weights", str(tmp / "emb.safetensors"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"emb.safetensors: its '{RECIPE_METADATA_KEY}' metadata: recipe field 'seed'" in err, err

    folder = tmp / "sharded"
    folder.mkdir()
    save_state_dict(folder / "s1.safetensors", {k: base[k] for k in list(base)[:2]})
    save_state_dict(folder / "s2.safetensors", {k: base[k] for k in list(base)[2:]})
    weight_map = {k: ("./s1.safetensors" if i == 0 else "s1.safetensors") if i < 2 else "s2.safetensors"
                  for i, k in enumerate(base)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _equal(load_state_dict(folder), base)

    assert main(["merge", *args, "--method", "ties", "--set", "k=1:30", "--out", str(tmp / "t.safetensors")]) == 2
    assert "'1:30'" in capsys.readouterr().err


def test_a_recipe_written_as_yaml_reads_back_whatever_its_names_and_numbers(files, capsys):
    """Experts named like numbers (``1e3``, ``010``) were written bare by PyYAML's dumper, whose rules read them as
    text, and read back by the recipe's YAML 1.2 rules as 1000.0 and 8: the recipe could not be replayed (an audit of
    the CLI). ``010`` is YAML 1.2's 10, not YAML 1.1's octal 8 (``--set k=010`` merged with 8)."""
    tmp, base, experts, args = files
    names = ["1e3", "010", "0x1f", "1_0", "+1e3", "2E5", "true", "null", "1:30", "a"]
    recipe = Recipe(method="ties", hparams={"k": 1e-05, "alpha": 0.3}, experts=names,
                    preferences={n: 1.0 for n in names}, seed=3)
    (tmp / "n.yaml").write_text(recipe.to_yaml())
    again = Recipe.from_file(tmp / "n.yaml")
    assert again.experts == names and list(again.preferences) == names and again.hparams == recipe.hparams
    (tmp / "o.yaml").write_text("method: dare\nseed: 010\nhparams: {p: 0.5}\n")
    assert Recipe.from_file(tmp / "o.yaml").seed == 10
    # YAML 1.2's booleans: experts named no / on written by hand stay names (YAML 1.1 read them as False / True)
    (tmp / "b.yaml").write_text("method: ties\nexperts: [no, yes, On, OFF]\npreferences: {no: 1, OFF: 0.5}\n")
    assert Recipe.from_file(tmp / "b.yaml").experts == ["no", "yes", "On", "OFF"]
    assert Recipe.from_file(tmp / "b.yaml").preferences == {"no": 1.0, "OFF": 0.5}
    assert main(["merge", *args, "--method", "ties", "--set", "k=010", "--out", str(tmp / "t.safetensors")]) == 2
    assert "'k' = 10.0 is outside the allowed range" in capsys.readouterr().err   # read as 10, not 8
    assert main(["merge", *args, "--method", "dare", "--set", "p=0.5", "--out", str(tmp / "u.safetensors"),
                 "--recipe", str(tmp / "u.yaml")]) == 0
    assert Recipe.from_file(tmp / "u.yaml") == Recipe.from_file(tmp / "u.safetensors")
    # an expert the suite lacks is named with the suite's own (the message listed the ones read: ['digits'])
    (tmp / "lacking.yaml").write_text("method: task_arithmetic\nexperts: [digits, nope]\n")
    assert main(["recipe", str(tmp / "lacking.yaml"), "--suite", "MiniSuite", "--out", str(tmp / "v.safetensors")]) == 2
    assert "the recipe merges expert(s) ['nope'] that the suite MiniSuite lacks; it has ['digits', 'house_numbers'," \
           in capsys.readouterr().err


def test_recorded_suites_replay_by_name_and_say_when_they_are_gone(tmp_path, monkeypatch, capsys):
    """The embedded suite is recorded by its name, which any install resolves (the app's exports recorded that name
    before, and now replay); a recorded suite that is gone says so; a recipe without an expert list takes
    --experts and records them; a recipe cannot name both a suite and checkpoint sources."""
    import shutil

    from studio.suite import SuiteError, load_suite

    monkeypatch.chdir(tmp_path)
    assert load_suite("MiniSuite").root == DEFAULT_SUITE_PATH
    old_export = Recipe(method="ties", experts=["digits", "textures"], suite="MiniSuite")
    (tmp_path / "old.yaml").write_text(old_export.to_yaml())
    assert main(["recipe", "old.yaml", "--out", "a.safetensors"]) == 0
    suite = load_suite(DEFAULT_SUITE_PATH)
    _equal(load_state_dict("a.safetensors"),
           studio.merge(suite.base, {n: suite.experts[n] for n in ("digits", "textures")}, "ties"))

    everything = Recipe(method="task_arithmetic", suite="MiniSuite")   # no list: every expert of the suite
    (tmp_path / "all.yaml").write_text(everything.to_yaml())
    assert main(["recipe", "all.yaml", "--experts", "digits,textures", "--out", "b.safetensors"]) == 0
    assert Recipe.from_file(tmp_path / "b.safetensors").experts == ["digits", "textures"]

    copy = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, copy)
    assert main(["merge", "--suite", str(copy), "--experts", "digits", "--method", "ties", "--out", "c.safetensors",
                 "--recipe", "c.yaml"]) == 0
    assert main(["compress", "--suite", str(copy), "--experts", "digits", "--out", "p.safetensors"]) == 0
    assert Recipe.from_file(tmp_path / "c.yaml").suite == str(copy)
    shutil.rmtree(copy)
    for argv, hint in ((["recipe", "c.yaml", "--out", "d.safetensors"], "(the suite the recipe recorded; give --suite"),
                       (["reconstruct", "p.safetensors", "--task", "digits", "--out", "d.safetensors"],
                        "(the suite compress recorded; give --suite or --base")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"suite source '{copy}' is neither an existing folder" in err and hint in err, err
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "d.safetensors").exists()

    # a Path is never a Hub repository: no hint to write hf:// for it; text whose first folder exists gets one
    with pytest.raises(SuiteError) as info:
        load_suite(Path("nosuchowner/suite"))
    assert "hf://" not in str(info.value).split("(from")[1]
    (tmp_path / "owner").mkdir()
    with pytest.raises(SuiteError, match="write hf://owner/suite for the Hub repository of that name"):
        load_suite("owner/suite")

    sources = {"base": "/b", "experts": {"a": "/a"}}
    with pytest.raises(CheckpointError, match=r"names both a suite \('MiniSuite'\) and checkpoint 'sources'"):
        Recipe(method="ties", suite="MiniSuite", sources=sources)
    with pytest.raises(CheckpointError, match="'sources.experts' names no expert"):
        Recipe(method="ties", sources={"base": "/b", "experts": {}})


def test_fingerprints_identify_weights_wherever_they_are_stored(tmp_path):
    """The same weights have one fingerprint (in memory, in one file, in shards with their index, in any key
    order); one changed bit, name, dtype or shape changes it."""
    from studio.io import fingerprint, input_fingerprints, load_checkpoint

    base = clip_like_state_dict(width=16)
    want = fingerprint(base)
    assert want.startswith("sha256:") and len(want) == 7 + 64
    save_state_dict(tmp_path / "one.safetensors", base)
    (tmp_path / "sharded").mkdir()
    keys = sorted(base)
    halves = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for file, part in halves.items():
        save_state_dict(tmp_path / "sharded" / file, {k: base[k] for k in part})
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, part in halves.items() for k in part}}))
    assert fingerprint(load_state_dict(tmp_path / "one.safetensors")) == want
    assert fingerprint(load_checkpoint(tmp_path / "sharded")[0]) == want
    assert fingerprint(dict(reversed(list(base.items())))) == want
    key = "visual.proj"
    flipped = base[key].clone()
    flipped.view(torch.int32).view(-1)[7] ^= 1   # the last bit of one entry
    others = [{**base, key: flipped}, {**{k: v for k, v in base.items() if k != key}, "visual.proj2": base[key]},
              {**base, key: base[key].double()}, {**base, key: base[key].reshape(-1)},
              {**base, key: base[key].t().contiguous().t()}]   # same values, another layout: same fingerprint
    assert [fingerprint(sd) == want for sd in others] == [False, False, False, False, True]
    experts = make_experts(base, 3)
    assert input_fingerprints(base, experts) == {"base": want, "experts": {n: fingerprint(sd)
                                                                           for n, sd in experts.items()}}
    assert len({want, *input_fingerprints(base, experts)["experts"].values()}) == 4
    with pytest.raises(CheckpointError, match="key 'w': a state dict's values must be tensors, got 1.0"):
        fingerprint({"w": 1.0})
    for odd in (torch.zeros(2, 2).to_sparse(), torch.zeros(2, 2, device="meta")):
        with pytest.raises(CheckpointError, match="key 'w': a .* tensor on .* has no bytes to fingerprint"):
            fingerprint({"w": odd})
    z = torch.randn(3, dtype=torch.complex64)
    assert fingerprint({"z": z.conj()}) == fingerprint({"z": z.conj().resolve_conj()})


def test_a_replay_refuses_changed_weights_and_says_if_it_made_the_same_bits(files, capsys):
    """A recipe records the fingerprints of the weights it merged and made. Its replay refuses, before merging or
    writing anything, a recorded checkpoint whose weights changed (naming the expert and the file), merges weights
    the options choose, and says whether it made the recorded bits."""
    from studio.io import fingerprint

    tmp, base, experts, args = files
    out = tmp / "m.safetensors"
    assert main(["merge", *args, "--method", "ties", "--out", str(out), "--recipe", str(tmp / "m.yaml")]) == 0
    recipe = Recipe.from_file(out)
    assert recipe == Recipe.from_file(tmp / "m.yaml")
    assert recipe.fingerprints == {"base": fingerprint(base), "experts": {n: fingerprint(sd)
                                                                          for n, sd in experts.items()},
                                   "merged": fingerprint(load_state_dict(out)),
                                   "settings": recipe.settings_fingerprint()}
    capsys.readouterr()
    assert main(["recipe", str(out), "--out", str(tmp / "again.safetensors")]) == 0
    assert "; the same bits as the merge the recipe recorded)" in capsys.readouterr().out
    assert Recipe.from_file(tmp / "again.safetensors") == recipe

    changed = {**experts["task1"], "visual.proj": experts["task1"]["visual.proj"] * 1.001}
    save_state_dict(tmp / "task1.safetensors", changed)
    assert main(["recipe", str(out), "--out", str(tmp / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and not (tmp / "x.safetensors").exists(), err
    assert (f"the weights differ from those the recipe merged, so the merge would not be the same: expert 'task1' "
            f"({tmp / 'task1.safetensors'}): recorded {recipe.fingerprints['experts']['task1'][:19]}..., read "
            f"{fingerprint(changed)[:19]}... (the checkpoints the recipe recorded; give --base or --expert "
            f"NAME=SOURCE to merge other weights on purpose)") in err, err
    with pytest.raises(CheckpointError, match=r"expert 'task1' .*\(merge_from_recipe\(\.\.\., check=False\) merges "
                                              r"them anyway\)"):
        merge_from_recipe(recipe, base, {**experts, "task1": changed})
    lib = merge_from_recipe(recipe, base, {**experts, "task1": changed}, check=False)

    # an option names the changed file: merged on purpose, recorded, and said not to be the recorded merge
    assert main(["recipe", str(out), "--expert", f"task1={tmp / 'task1.safetensors'}",
                 "--out", str(tmp / "y.safetensors")]) == 0
    said = capsys.readouterr().out
    assert "; not the same bits as the merge the recipe recorded (from other weights, as the options say))" in said
    _equal(load_state_dict(tmp / "y.safetensors"), lib)
    again = Recipe.from_file(tmp / "y.safetensors")
    assert again.fingerprints["experts"]["task1"] == fingerprint(changed) and again.fingerprints["merged"] == \
        fingerprint(lib) and again.fingerprints["base"] == recipe.fingerprints["base"]
    assert main(["recipe", str(tmp / "y.safetensors"), "--out", str(tmp / "z.safetensors")]) == 0
    assert "the same bits" in capsys.readouterr().out

    # the same inputs and other bits: said to come from the environment, not from the weights
    recorded = Recipe.from_file(out)
    recorded.fingerprints["merged"] = "sha256:" + "0" * 64
    (tmp / "other_bits.yaml").write_text(recorded.to_yaml())
    assert main(["recipe", str(tmp / "other_bits.yaml"), "--expert", f"task1={tmp / 'task1.safetensors'}",
                 "--out", str(tmp / "w.safetensors")]) == 0
    assert "(from other weights, as the options say)" in capsys.readouterr().out
    save_state_dict(tmp / "task1.safetensors", experts["task1"])
    assert main(["recipe", str(tmp / "other_bits.yaml"), "--out", str(tmp / "w.safetensors")]) == 0
    same_weights = ("; not the same bits as the merge the recipe recorded (from the same weights: a merge's last "
                    "bits change with the torch, BLAS and device))")
    assert same_weights in capsys.readouterr().out
    # ... or from the version that recorded it, when another did (the review: a recipe of 0.1.0 blamed the platform)
    older = Recipe.from_dict({**recorded.to_dict(), "studio_version": "0.1.0"})
    (tmp / "older.yaml").write_text(older.to_yaml())
    assert main(["recipe", str(tmp / "older.yaml"), "--out", str(tmp / "w.safetensors")]) == 0
    assert f"(from the same weights, recorded by merge-studio 0.1.0 and replayed by {studio.__version__}, whose " \
           f"methods may round differently; the torch, BLAS and device also change a merge's last bits))" in \
           capsys.readouterr().out
    # options that name the very weights the recipe recorded read the same weights, and say so
    assert main(["recipe", str(tmp / "other_bits.yaml"), "--base", str(tmp / "base.safetensors"),
                 "--expert", f"task1={tmp / 'task1.safetensors'}", "--out", str(tmp / "w.safetensors")]) == 0
    assert same_weights in capsys.readouterr().out
    # an edited recipe (here its alpha) says so, rather than blaming the platform (found by the README audit)
    edited = Recipe.from_file(out)
    edited.hparams["alpha"] = 0.5
    (tmp / "edited.yaml").write_text(edited.to_yaml())
    assert main(["recipe", str(tmp / "edited.yaml"), "--out", str(tmp / "w.safetensors")]) == 0
    assert "; not the same bits as the merge the recipe recorded (its settings were edited after it recorded that " \
           "merge: the method, hyperparameters, calibration, preferences, seed, layer rule, SVD mode, prefix or " \
           "experts differ)" in capsys.readouterr().out
    assert Recipe.from_file(tmp / "w.safetensors").fingerprints["settings"] == edited.settings_fingerprint()
    # a recipe that records only its merge says it cannot tell why
    (tmp / "merged_only.yaml").write_text(Recipe.from_dict(
        {**recorded.to_dict(), "fingerprints": {"merged": "sha256:" + "0" * 64}}).to_yaml())
    assert main(["recipe", str(tmp / "merged_only.yaml"), "--out", str(tmp / "w.safetensors")]) == 0
    assert "(the recipe did not record all its inputs)" in capsys.readouterr().out
    # recipes without fingerprints (older versions, by hand) replay unchecked and say nothing of their bits
    unrecorded = Recipe.from_dict({k: v for k, v in recipe.to_dict().items() if k != "fingerprints"})
    (tmp / "old.yaml").write_text(unrecorded.to_yaml())
    assert main(["recipe", str(tmp / "old.yaml"), "--out", str(tmp / "v.safetensors")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp / 'v.safetensors'} ({len(base)} tensors)"


def test_a_suite_replay_checks_the_suite_and_keeps_the_recipes_experts(tmp_path, monkeypatch, capsys):
    """A replay of a merge of some of a suite's experts merges and records those experts (it recorded every expert
    of the suite before); a suite whose experts changed since is refused unless --suite names it."""
    import shutil

    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, copy)
    assert main(["merge", "--suite", str(copy), "--experts", "digits,textures", "--method", "task_arithmetic",
                 "--out", "a.safetensors"]) == 0
    assert main(["recipe", "a.safetensors", "--out", "b.safetensors"]) == 0
    assert Recipe.from_file(tmp_path / "b.safetensors").experts == ["digits", "textures"]
    assert main(["recipe", "b.safetensors", "--out", "c.safetensors"]) == 0
    _equal(load_state_dict("c.safetensors"), load_state_dict("a.safetensors"))
    assert "the same bits" in capsys.readouterr().out

    weights = next(p for p in copy.rglob("*.safetensors") if "textures" in str(p.relative_to(copy)))
    changed = {k: v + 0.01 if v.is_floating_point() else v for k, v in load_state_dict(weights).items()}
    save_state_dict(weights, changed)
    assert main(["recipe", "a.safetensors", "--out", "d.safetensors"]) == 2
    err = capsys.readouterr().err
    assert f"expert 'textures' ({copy / 'experts' / 'textures.safetensors'}): recorded sha256:" in err, err
    assert f"(the suite the recipe recorded, {copy}; give --suite, or --base and an --expert for each, to merge " \
        f"other weights on purpose)" in err, err
    assert "digits" not in err and not (tmp_path / "d.safetensors").exists()
    assert main(["recipe", "a.safetensors", "--suite", str(copy), "--out", "d.safetensors"]) == 0
    assert "(from other weights, as the options say)" in capsys.readouterr().out

    # a recorded expert the suite has lost is refused, not left out (and --experts cannot drop it); a recipe that
    # records experts' weights must list the experts it merges (an empty list, "every expert", would silently become
    # those recorded, or all the suite's)
    everything = Recipe.from_file(tmp_path / "c.safetensors").to_dict()
    with pytest.raises(CheckpointError, match=r"'fingerprints.experts' records \['digits', 'textures'\], but the "
                                              r"recipe lists no experts to merge; list them in 'experts'"):
        Recipe.from_dict({**everything, "experts": []})
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tasks"] = [t for t in manifest["tasks"] if t["name"] != "textures"]
    (copy / "manifest.json").write_text(json.dumps(manifest))
    for extra, message in (([], "the recipe merges expert(s) ['textures'] that the suite "),
                           (["--experts", "digits"], "names the experts it merges, ['digits', 'textures']; --experts "
                                                     "does not apply")):
        assert main(["recipe", "c.safetensors", *extra, "--out", "e.safetensors"]) == 2
        err = capsys.readouterr().err
        assert message in err and not (tmp_path / "e.safetensors").exists(), err
    from studio.io import check_fingerprints, input_fingerprints
    from studio.suite import load_suite

    suite = load_suite(DEFAULT_SUITE_PATH)
    recorded = input_fingerprints(suite.base, suite.experts)
    with pytest.raises(CheckpointError, match=r"expert 'textures': recorded sha256:[0-9a-f]{12}\.\.\., not among "
                                              r"the experts read \['digits'\]"):
        check_fingerprints(recorded, suite.base, {"digits": suite.experts["digits"]})


def test_recipes_check_their_fingerprints():
    digest = "sha256:" + "ab" * 32
    ok = Recipe(method="ties", experts=["a", "b"], fingerprints={"base": digest, "experts": {"a": digest}})
    assert Recipe.from_text(ok.to_yaml()) == ok and Recipe.from_text(ok.to_json()) == ok
    assert "fingerprints" not in Recipe(method="ties").to_dict()
    for given, message in (({}, "'fingerprints' must be a mapping with some of base, experts"),
                           ({"base": digest, "output": digest}, r"'fingerprints' has unknown part\(s\) \['output'\]; "
                                                                r"expected some of base, experts, merged and "
                                                                r"settings"),
                           ({"settings": "sha256:" + "0" * 63}, "'fingerprints.settings' must be a digest"),
                           ({"base": "sha256:" + "AB" * 32}, "'fingerprints.base' must be a digest, 'sha256:' and 64"),
                           ({"merged": digest[:-1]}, "'fingerprints.merged' must be a digest"),
                           ({"experts": ["a"]}, "'fingerprints.experts' must map expert names to digests"),
                           ({"experts": {"a": 3}}, "'fingerprints.experts.a' must be a digest"),
                           ({"experts": {"c": digest}}, "'fingerprints.experts' names 'c', which the recipe does not "
                                                        "merge; it merges \\['a', 'b'\\] \\(an expert removed from or "
                                                        "renamed in 'experts' must be removed from or renamed in "
                                                        "'fingerprints.experts' too\\)"),
                           ({"experts": {}}, "'fingerprints.experts' names no expert")):
        with pytest.raises(CheckpointError, match=message):
            Recipe(method="ties", experts=["a", "b"], fingerprints=given)


def test_reconstruct_takes_the_suites_half_precision_base_file(tmp_path, capsys):
    """MiniSuite stores float16 and loads float32; compress --suite recorded the float32 base, and reconstruct
    --base with the suite's own base file was refused as another base. Half-precision values are exact in float32,
    so both forms of the same weights now match (Compressed.load, base_fingerprint), and the result is the same."""
    from studio.suite import default_suite

    suite_dir = default_suite().root
    packed, out, again = (tmp_path / name for name in ("p.safetensors", "digits.safetensors", "again.safetensors"))
    assert main(["compress", "--suite", str(suite_dir), "--out", str(packed)]) == 0
    assert main(["reconstruct", str(packed), "--task", "digits", "--base", str(suite_dir / "base.safetensors"),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    assert main(["reconstruct", str(packed), "--task", "digits", "--out", str(again)]) == 0   # the recorded suite
    by_file, by_suite = load_state_dict(out), load_state_dict(again)
    assert by_file["visual.proj"].dtype == torch.float16 and by_suite["visual.proj"].dtype == torch.float32
    for k in by_suite:
        torch.testing.assert_close(by_file[k], by_suite[k].to(by_file[k].dtype), rtol=0, atol=0)


def test_compressed_experts_refuse_another_base(files, capsys):
    """TSV-C task vectors apply to the base they were compressed against: another base (other weights, or the same
    in another dtype) is refused unless asked for (check=False, reconstruct --any-base)."""
    from studio.compress import Compressed
    from studio.io import fingerprint

    tmp, base, experts, args = files
    path = studio.compress(base, experts).save(tmp / "packed.safetensors")
    half = {k: v.half() for k, v in base.items()}
    with pytest.raises(CheckpointError, match=r"packed.safetensors: the base given is not the one its experts were "
                                              r"compressed against \(recorded sha256:") as refused:
        Compressed.load(path, half)
    assert (refused.value.recorded, refused.value.given) == (fingerprint(base), fingerprint({k: v.float() for k, v
                                                                                            in half.items()}))
    assert Compressed.load(path, half, check=False).reconstruct("task0")["visual.proj"].dtype == torch.float16
    save_state_dict(tmp / "half.safetensors", half)
    out = tmp / "rebuilt.safetensors"
    assert main(["reconstruct", str(path), "--task", "task0", "--base", str(tmp / "half.safetensors"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the base read ({tmp / 'half.safetensors'}) is not the one its experts were compressed against " \
        f"(recorded sha256:" in err and "(give --any-base to apply them to it anyway)" in err and not out.exists(), err
    assert main(["reconstruct", str(path), "--task", "task0", "--base", str(tmp / "half.safetensors"), "--any-base",
                 "--out", str(out)]) == 0
    _equal(load_state_dict(out), Compressed.load(path, half, check=False).reconstruct("task0"))
    # a base without one of the compressed keys: that key is named (--any-base would not help)
    save_state_dict(tmp / "partial.safetensors", {k: v for k, v in base.items() if k != "visual.proj"})
    assert main(["reconstruct", str(path), "--task", "task0", "--base", str(tmp / "partial.safetensors"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "'visual.proj' is not a key of the base" in err and "--any-base" not in err, err
    # the base compress recorded, changed since: named, and said to have changed
    packed = tmp / "cli_packed.safetensors"
    assert main(["compress", *args, "--out", str(packed)]) == 0
    save_state_dict(tmp / "base.safetensors", {**base, "visual.proj": base["visual.proj"] + 1e-3})
    assert main(["reconstruct", str(packed), "--task", "task0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"the base read ({tmp / 'base.safetensors'}) is not the one" in err and "(the base compress recorded has " \
        "changed since; give --any-base to apply them to it anyway)" in err and len(err.strip().splitlines()) == 1, err


def test_diagnose_reports_the_library_diagnostics_of_a_merge_checkpoint_or_the_sum(files, capsys):
    """``merge-studio diagnose`` gives exactly what studio.diagnostics gives for the merge its options describe, a
    merged checkpoint, or the Task Arithmetic sum: per-layer curves, SAR_avg per task and between tasks; bad
    combinations are one-line errors that write nothing."""
    from studio import diagnostics as diag
    from studio.engine import get_pool

    tmp, base, experts, args = files
    pool = get_pool(base, experts, device="cpu")
    merged = studio.merge(base, experts, "ties", k=0.3, device="cpu")
    save_state_dict(tmp / "merged.safetensors", merged)
    for extra, target in ((["--method", "ties", "--set", "k=0.3"], merged),
                          (["--weights", str(tmp / "merged.safetensors")], merged), ([], None)):
        out = tmp / "diag.json"
        assert main(["diagnose", *args, *extra, "--device", "cpu", "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        want = diag.layer_curves(pool, target, merged_is_delta=None if target is None else False)
        assert report["layers"]["key"] == want["key"] and report["tasks"] == list(experts)
        for curve in diag.CURVES:
            assert report["layers"][curve] == pytest.approx(want[curve], rel=1e-6, abs=1e-9, nan_ok=True), curve
        sar = diag.sar_avg(pool, target, merged_is_delta=None if target is None else False)
        assert list(report["sar_avg"].values()) == pytest.approx(sar.tolist(), rel=1e-6)
        torch.testing.assert_close(torch.tensor(report["sar_avg_pairwise"]), diag.sar_avg(pool, pairwise=True))
        # every task-by-task heatmap over the model, of this merge where it depends on one
        txt = [m for m, spec in diag.METRICS.items() if spec.shape == "TxT"]
        assert list(report["model_matrices"]) == txt and set(report["model_matrix_help"]) == set(txt)
        for m in txt:
            uses = diag.METRICS[m].uses_merged and target is not None
            want_m = diag.model_matrix(pool, m, target if uses else None, merged_is_delta=False if uses else None)
            torch.testing.assert_close(torch.tensor(report["model_matrices"][m]), want_m, msg=m)
        cos = report["model_matrices"]["cosine"]
        top = max((cos[i][j], report["tasks"][i], report["tasks"][j]) for i in range(len(cos)) for j in range(i))
        said = capsys.readouterr().out
        assert f"{len(experts)} experts, {len(want['key'])} matrix layers" in said and "SAR_avg" in said, said
        assert f"task-vector cosine over the model's matrix layers: most aligned {top[1]}/{top[2]} {top[0]:.3f}" \
            in said, said
    assert report["merge"] == {"task_arithmetic_sum": True}
    assert main(["diagnose", *args, "--curves", "sti,energy"]) == 0
    assert "mean over layers: sti " in capsys.readouterr().out

    for extra, message in ((["--method", "ties", "--weights", str(tmp / "merged.safetensors")], "not both"),
                           (["--set", "k=0.3"], "describe a merge to compute: give --method"),
                           (["--curves", "sti,nope"], "--curves: unknown curve(s) ['nope']"),
                           (["--method", "ties", "--set", "k=7"], "'k' = 7.0 is outside the allowed range"),
                           (["--weights", str(tmp / "nope.safetensors")], "--weights")):
        (tmp / "bad.json").unlink(missing_ok=True)
        assert main(["diagnose", *args, *extra, "--out", str(tmp / "bad.json")]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1 and not (tmp / "bad.json").exists(), err
    assert main(["diagnose", *args, "--out", str(tmp / "task1.safetensors")]) == 2   # an input: and weights
    assert "the diagnostics are written as JSON" in capsys.readouterr().err

    # --out spares every file of a --weights folder or shard index (it wrote JSON over them)
    (tmp / "folder").mkdir()
    save_state_dict(tmp / "folder" / "model.safetensors", merged)
    keys = sorted(merged)
    for i, part in enumerate((keys[::2], keys[1::2])):
        save_state_dict(tmp / "folder" / f"shard{i}.safetensors", {k: merged[k] for k in part})
    (tmp / "folder" / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f"shard{i}.safetensors" for i, part in enumerate((keys[::2], keys[1::2])) for k in part}}))
    before = {p.name: p.read_bytes() for p in (tmp / "folder").iterdir()}
    read = "is the merged checkpoint (--weights), which this command reads"
    weights_name = "the diagnostics are written as JSON, and .safetensors names weights"
    for weights, target, message in (("folder", "folder/model.safetensors", weights_name),
                                     ("folder/model.safetensors.index.json", "folder/shard1.safetensors",
                                      weights_name),
                                     ("folder/model.safetensors.index.json", "folder/model.safetensors.index.json",
                                      read)):
        assert main(["diagnose", *args, "--weights", str(tmp / weights), "--out", str(tmp / target)]) == 2
        assert message in capsys.readouterr().err, (weights, target)
    assert {p.name: p.read_bytes() for p in (tmp / "folder").iterdir()} == before
    # a folder of shards alone given: its index is the file it resolves to (the report replaced it, and the folder
    # no longer loaded)
    (tmp / "folder" / "model.safetensors").unlink()
    before = {p.name: p.read_bytes() for p in (tmp / "folder").iterdir()}
    assert main(["diagnose", *args, "--weights", str(tmp / "folder"),
                 "--out", str(tmp / "folder" / "model.safetensors.index.json")]) == 2
    assert read in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp / "folder").iterdir()} == before
    # a file of merged deltas is told from a merged state, as the library does
    save_state_dict(tmp / "deltas.safetensors", {k: merged[k] - base[k] for k in merged})
    for weights in ("merged.safetensors", "deltas.safetensors"):
        assert main(["diagnose", *args, "--weights", str(tmp / weights), "--curves", "sar_mean,energy",
                     "--out", str(tmp / f"{weights}.json")]) == 0
    as_state, as_deltas = (json.loads((tmp / f"{w}.safetensors.json").read_text()) for w in ("merged", "deltas"))
    assert as_deltas["layers"]["sar_mean"] == pytest.approx(as_state["layers"]["sar_mean"], rel=1e-5)
    assert as_deltas["sar_avg"] == pytest.approx(as_state["sar_avg"], rel=1e-5)
    # a curve named twice is one curve; the layers are those the method treats as matrices unless --layer-rule says
    assert main(["diagnose", *args, "--curves", "sti, sti,energy", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {name: len(v) for name, v in report["layers"].items()} == {name: len(report["layers"]["key"])
                                                                      for name in ("key", "block", "sti", "energy")}
    for extra, embeddings in ((["--method", "ortho_merge"], False), (["--method", "tsv_m"], True),
                              (["--method", "ortho_merge", "--layer-rule", "default"], True)):
        assert main(["diagnose", *args, *extra, "--curves", "sti", "--out", str(out)]) == 0
        assert ("visual.positional_embedding" in json.loads(out.read_text())["layers"]["key"]) == embeddings, extra
    capsys.readouterr()
    for extra, message in ((["--curves", " , "], "--curves names no curve; choose from ['sti', "),
                           (["--seed", "0"], "describe a merge to compute: give --method"),
                           (["--weights", str(tmp / "merged.safetensors"), "--calibrate", "svc"],
                            "give --method instead of --weights, which is diagnosed as it is")):
        assert main(["diagnose", *args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert diag.layer_curves(pool, curves=["sti", "sti"])["sti"] == diag.layer_curves(pool, curves=["sti"])["sti"]


def test_diagnose_names_an_expert_equal_to_the_base_and_leaves_it_out(files, capsys):
    """An expert equal to the base (a checkpoint saved before fine-tuning) has no direction on any layer: its SAR_avg
    printed 0.000 and every mean over the tasks took its zeros, with no word of why. It is named now, its values are
    null in the JSON, and the means leave it out; with every expert so, the error names them, not an internal
    function. The JSON says what its SAR_avg keys are and each model matrix's k."""
    tmp, base, experts, args = files
    save_state_dict(tmp / "same.safetensors", base)
    out = tmp / "d.json"
    assert main(["diagnose", *args, "--expert", f"same={tmp / 'same.safetensors'}", "--method", "tsv_m",
                 "--device", "cpu", "--out", str(out)]) == 0
    said = capsys.readouterr()
    assert "note: expert 'same' equals the base on every matrix layer diagnosed" in said.err, said.err
    assert "same n/a" in said.out and "nan" not in said.out, said.out
    report = json.loads(out.read_text())
    assert report["unchanged_experts"] == ["same"] and report["sar_avg"]["same"] is None
    assert all(v is not None for t, v in report["sar_avg"].items() if t != "same")
    cosine = report["model_matrices"]["cosine"]
    assert all(v is None for v in cosine[-1]) and all(v is not None for row in cosine[:-1] for v in row[:-1])
    assert set(report["sar_avg_help"]) == {"sar_avg", "sar_avg_pairwise"}
    assert "k per layer: k = " in report["model_matrix_help"]["subspace_similarity"]
    assert all(v is not None for v in report["layers"]["sar_min"])   # the others' minimum

    only = ["--base", str(tmp / "base.safetensors"), "--expert", f"a={tmp / 'same.safetensors'}",
            "--expert", f"b={tmp / 'same.safetensors'}"]
    assert main(["diagnose", *only, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "every expert (a, b) equals the base on each matrix layer" in err, err
    # experts that changed only tensors no diagnostic measures (a prefix that keeps no matrix) were said to equal it
    save_state_dict(tmp / "bias.safetensors", {**base, "visual.ln_pre.bias": base["visual.ln_pre.bias"] + 1})
    biases = ["--base", str(tmp / "base.safetensors"), "--expert", f"a={tmp / 'bias.safetensors'}",
              "--expert", f"b={tmp / 'bias.safetensors'}", "--prefix", "visual.ln_pre."]
    assert main(["diagnose", *biases, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "the layer rule 'default' selects none of the pool's 2 tensors (visual.ln_pre.bias (16,), " in err, err


def test_diagnose_of_a_suite_does_not_suggest_a_prefix_it_refuses(tmp_path, capsys):
    from studio.suite import default_suite

    suite = default_suite()
    save_state_dict(tmp_path / "prefixed.safetensors", {f"vision_model.{k}": v for k, v in suite.base.items()})
    assert main(["diagnose", "--suite", "MiniSuite", "--weights", str(tmp_path / "prefixed.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the merged state/deltas lack" in err and "--prefix" not in err and len(err.strip().splitlines()) == 1, err


def test_weights_are_not_written_under_a_pickle_suffix_and_recipes_are_read_by_content(files, capsys):
    """``--out out.pt`` wrote a safetensors file that every reader then took for a pickle (refused), and a recipe
    embedded in a file without the .safetensors suffix was read as YAML ('not a readable UTF-8 recipe'); a broken
    YAML recipe's message lost its file and line to truncation (found by the README audit)."""
    tmp, base, experts, args = files
    for out in ("out.pt", "out.BIN", "out.ckpt"):
        assert main(["merge", *args, "--method", "ties", "--out", str(tmp / out)]) == 2
        assert f"cannot write {tmp / out}: it would be a safetensors file under a pickle checkpoint's suffix" \
               in capsys.readouterr().err and not (tmp / out).exists()
    with pytest.raises(CheckpointError, match=r"name it m\.safetensors"):
        save_state_dict(tmp / "m.pth", base)
    assert main(["merge", *args, "--method", "ties", "--out", str(tmp / "merged")]) == 0
    assert main(["recipe", str(tmp / "merged"), "--out", str(tmp / "again.safetensors")]) == 0
    assert "the same bits" in capsys.readouterr().out
    (tmp / "broken.yaml").write_text("method: ties\nhparams: {k: 0.2\nexperts: [a]\n")
    assert main(["recipe", str(tmp / "broken.yaml"), "--out", str(tmp / "x.safetensors")]) == 2
    assert f"{tmp / 'broken.yaml'}: not valid YAML/JSON at line 3, column 8: expected ',' or '}}', but got ':'" \
           in capsys.readouterr().err


def test_outputs_are_refused_before_the_work_where_they_cannot_be_written(files, capsys, monkeypatch):
    """An output in a folder that cannot be written (``/proc``) failed only at the write, after the merge (40 s on
    two ViT-B/32 experts; an audit of the CLI), for merge, recipe, compress and diagnose, as did an empty --recipe.
    Weights written under a shard index's name (``m.safetensors.index.json``) were read back as an index, whose error
    printed the whole file (9 MB on one line)."""
    from studio import cli

    tmp, base, experts, args = files
    assert main(["merge", *args, "--method", "ties", "--out", str(tmp / "m.safetensors"),
                 "--recipe", str(tmp / "m.yaml")]) == 0
    capsys.readouterr()

    def no_work(*a, **k):
        raise AssertionError("the work started")

    monkeypatch.setattr(cli, "_load_pool", no_work)
    for cmd in (["merge", *args, "--method", "ties", "--out", "/proc/m.safetensors"],
                ["merge", *args, "--method", "ties", "--out", str(tmp / "n.safetensors"), "--recipe", "/proc/r.yaml"],
                ["merge", *args, "--method", "ties", "--out", str(tmp / "n.safetensors"), "--recipe", ""],
                ["recipe", str(tmp / "m.yaml"), "--out", "/proc/m.safetensors"],
                ["compress", *args, "--out", "/proc/p.safetensors"]):
        assert main(cmd) == 2, cmd
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("/proc" in err or "recipe's file name is empty" in err), err
    monkeypatch.undo()
    assert main(["diagnose", *args, "--method", "ties", "--out", "/proc/d.json"]) == 2
    assert "cannot write /proc/d.json" in capsys.readouterr().err
    (tmp / "w.safetensors.index.json").write_bytes((tmp / "m.safetensors").read_bytes())   # weights, not an index
    with pytest.raises(CheckpointError, match="not a readable shard index") as info:
        load_state_dict(tmp / "w.safetensors.index.json")
    assert len(str(info.value)) < 1000, len(str(info.value))


def test_diagnose_of_a_merged_file_says_when_its_experts_changed_since(files, capsys):
    """A replay refuses experts that differ from those the merged file recorded; ``diagnose --weights`` compared the
    merge with them silently (an audit of the CLI). It says so, naming the expert, and still diagnoses."""
    tmp, base, experts, args = files
    assert main(["merge", *args, "--method", "ties", "--out", str(tmp / "m.safetensors")]) == 0
    assert main(["diagnose", "--weights", str(tmp / "m.safetensors")]) == 0
    assert "note: the weights differ" not in capsys.readouterr().err
    save_state_dict(tmp / "task1.safetensors", {k: v + 0.01 for k, v in experts["task1"].items()})
    assert main(["diagnose", "--weights", str(tmp / "m.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "note: the weights differ from those the recipe merged" in err and "expert 'task1'" in err and \
        "expert 'task0'" not in err and "the diagnostics compare the merged weights with these" in err, err


def test_a_merged_file_whose_recipe_is_unreadable_is_weights_where_the_options_say_the_rest(files, capsys):
    """A merged file whose embedded recipe has a field of a newer version was refused by evaluate --suite and
    diagnose --base/--expert, which need nothing of it (an audit of the CLI): a note, and the weights are read. Where
    the recipe is needed (no --suite, --tasks merged), it is still refused by name."""
    from safetensors.torch import save_file

    from studio.suite import load_suite

    tmp, base, experts, args = files
    suite_base = load_suite(DEFAULT_SUITE_PATH).base
    newer = json.dumps({"method": "task_arithmetic", "experts": ["digits"], "suite": "MiniSuite", "future": 1})
    save_file(suite_base, str(tmp / "new.safetensors"), metadata={RECIPE_METADATA_KEY: newer, "format": "pt"})
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(tmp / "new.safetensors"),
                 "--tasks", "digits"]) == 0
    assert "note:" in capsys.readouterr().err
    for extra in ([], ["--suite", "MiniSuite", "--tasks", "merged"]):
        assert main(["evaluate", "--weights", str(tmp / "new.safetensors"), *extra]) == 2
        assert "unknown field(s) ['future']" in capsys.readouterr().err
    save_file(base, str(tmp / "new2.safetensors"), metadata={RECIPE_METADATA_KEY: newer, "format": "pt"})
    assert main(["diagnose", *args, "--weights", str(tmp / "new2.safetensors")]) == 0
    assert "unknown field(s) ['future']" in capsys.readouterr().err


def test_cli_messages_name_the_option_at_fault(files, tmp_path, monkeypatch, capsys):
    """From the README audit: each message names the option (or environment variable) at fault in the CLI's terms,
    and says what to do; a leaderboard's names are checked before any row runs."""
    from studio import leaderboard

    tmp, base, experts, args = files
    out = str(tmp / "x.safetensors")
    for extra, message in (
            (["--method", "svc"], "unknown merging method 'svc' ('svc' is a calibration: apply it after a merging "
                                  "method, calibrate='svc', the CLI's --calibrate svc)"),
            (["--method", "ties", "--calibrate", "tsv_m"], "unknown calibration 'tsv_m' ('tsv_m' is a merging "
                                                            "method, not a calibration)"),
            (["--method", "ties", "--cal-set", "alpha=0.5"], "--cal-set alpha=0.5 sets a calibration's "
                                                             "hyperparameters, but no calibration was chosen; give "
                                                             "--calibrate align_merge_b or svc"),
            (["--method", "ties", "--set", "k=0.2", "--set", "k=0.3"], "--set 'k=0.3': 'k' was already set to 0.2; "
                                                                        "give each hyperparameter once")):
        assert main(["merge", *args, *extra, "--out", out]) == 2
        assert message in capsys.readouterr().err
    monkeypatch.setenv("MERGE_STUDIO_DEVICE", "gpu")
    assert main(["merge", *args, "--method", "ties", "--out", out]) == 2
    assert "device (MERGE_STUDIO_DEVICE in the environment) 'gpu' is not a valid torch device" in \
        capsys.readouterr().err
    monkeypatch.setenv("MERGE_STUDIO_DEVICE", "cpu")
    # evaluate names --weights, and says what a TSV-C file is
    assert main(["compress", "--suite", "MiniSuite", "--out", str(tmp_path / "packed.safetensors")]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(tmp_path / "packed.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --weights {tmp_path / 'packed.safetensors'}: state dict does not match the "
                          f"architecture") and "it is a TSV-C file of low-rank task vectors: build a task's model " \
                                                 "from it with merge-studio reconstruct" in err, err
    # a shard index is not a safetensors file itself: its architecture error stays (not a header error)
    from huggingface_hub import save_torch_state_dict

    (tmp_path / "shards").mkdir()
    save_torch_state_dict({"vision_model." + k: v for k, v in base.items()}, tmp_path / "shards",
                          max_shard_size=4000)
    index = tmp_path / "shards" / "model.safetensors.index.json"
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(index)]) == 2
    assert capsys.readouterr().err.startswith(f"error: --weights {index}: state dict does not match the architecture")
    # a merge of full checkpoints (a text tower beside the visual one): --prefix keeps the suite model's tensors
    suite_base = load_suite(DEFAULT_SUITE_PATH).base
    save_state_dict(tmp_path / "full.safetensors", {**suite_base, "text.w": torch.ones(2)})
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(tmp_path / "full.safetensors")]) == 2
    assert "1 unexpected key(s), e.g. ['text.w']; --prefix keeps only the tensors under a name's start (the suite's " \
           "model's are under visual.)" in capsys.readouterr().err
    # every tensor under the model's prefix (another model's, e.g. a ViT-B/32 on MiniSuite): no --prefix to suggest
    save_state_dict(tmp_path / "other.safetensors", {**suite_base, "visual.extra": torch.ones(2)})
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(tmp_path / "other.safetensors")]) == 2
    assert "--prefix" not in capsys.readouterr().err
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(tmp_path / "full.safetensors"),
                 "--prefix", "visual."]) == 0
    assert json.loads(capsys.readouterr().out)["avg_accuracy"] == pytest.approx(44.71, abs=0.01)   # the base
    for argv, message in ((["--methods", "tsv"], "unknown merging method 'tsv'"),
                          (["--calibrations", "svd"], "unknown calibration 'svd'")):
        with pytest.raises(SystemExit):
            leaderboard.main([*argv, "--out", str(tmp_path / "lb.md")], prog="merge-studio leaderboard")
        err = capsys.readouterr().err
        assert err.startswith("usage: merge-studio leaderboard") and message in err and \
            not (tmp_path / "lb.md").exists()


def test_ctrl_c_ends_a_command_without_a_traceback_or_a_half_written_file(tmp_path):
    """Ctrl-C printed a KeyboardInterrupt traceback; now one line and exit status 130 (outputs are written atomically,
    so nothing is half-written). A real process and signal, sent once the CLI runs (a leaderboard takes minutes)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "lb.md"
    # Ctrl-C as in a terminal: a process started in the background by a non-interactive shell (as CI may run the
    # suite) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from studio.cli import main; print('ready', flush=True); "
            f"sys.exit(main(['leaderboard', '--out', {str(out)!r}, '--threads', '1']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MERGE_STUDIO_DEVICE": "cpu"})
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (proc.returncode, err.strip().splitlines()[-1:]) == (130, ["interrupted"]), err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_diagnose_of_a_merged_file_takes_the_experts_its_recipe_merged(tmp_path, capsys):
    """A merge of 2 of MiniSuite's 8 experts was diagnosed against all 8 (SAR of tasks it never merged)."""
    merged = tmp_path / "two.safetensors"
    assert main(["merge", "--suite", "MiniSuite", "--experts", "digits,signs", "--method", "tsv_m",
                 "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--suite", "MiniSuite", "--weights", str(merged), "--curves", "sar_mean",
                 "--out", str(tmp_path / "d.json")]) == 0
    assert "2 experts (those its recipe merged; --experts chooses others)" in capsys.readouterr().out
    report = json.loads((tmp_path / "d.json").read_text())
    assert list(report["sar_avg"]) == ["digits", "signs"] and report["merge"]["experts_from_its_recipe"] == [
        "digits", "signs"]
    assert main(["diagnose", "--suite", "MiniSuite", "--weights", str(merged), "--curves", "sar_mean",
                 "--experts", "digits,signs,textures"]) == 0
    assert "3 experts, " in capsys.readouterr().out


def test_evaluate_of_a_merged_file_reads_the_suite_and_tasks_its_recipe_recorded(tmp_path, capsys):
    """evaluate needed --suite even for a file whose recipe names the suite, and could not keep to the merged tasks."""
    merged = tmp_path / "two.safetensors"
    assert main(["merge", "--suite", "MiniSuite", "--experts", "digits,signs", "--method", "task_arithmetic",
                 "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--weights", str(merged), "--tasks", "merged", "--device", "cpu"]) == 0
    two = json.loads(capsys.readouterr().out)
    assert list(two["accuracy"]) == ["digits", "signs"]
    assert main(["evaluate", "--suite", "MiniSuite", "--weights", str(merged), "--tasks", "signs,textures",
                 "--device", "cpu"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert list(other["accuracy"]) == ["signs", "textures"] and other["accuracy"]["signs"] == two["accuracy"]["signs"]
    plain = tmp_path / "plain.safetensors"   # weights without a recipe
    save_state_dict(plain, load_suite(DEFAULT_SUITE_PATH).base)
    for argv, message in (
            (["--weights", str(plain)], f"--suite is needed: --weights {plain} has no recipe that records one"),
            (["--suite", "MiniSuite", "--weights", str(plain), "--tasks", "merged"],
             f"--tasks merged: --weights {plain} has no recipe that names the experts it merged; name the tasks"),
            (["--weights", str(merged), "--tasks", " , "], "--tasks names no task; choose from ["),
            (["--weights", str(merged), "--tasks", "digit"], "unknown task 'digit'")):
        assert main(["evaluate", *argv, "--device", "cpu"]) == 2
        assert message in capsys.readouterr().err


def test_a_missing_weights_file_is_named_whatever_the_other_options(tmp_path, capsys, monkeypatch):
    """A mistyped --weights without --suite was blamed on the missing --suite or recipe (evaluate) or on --base
    (diagnose); only with --suite did the error say that the file does not exist (a first user's audit)."""
    monkeypatch.chdir(tmp_path)
    missing = "nofile.safetensors"
    for argv in (["evaluate", "--weights", missing], ["diagnose", "--weights", missing],
                 ["evaluate", "--weights", missing, "--suite", "MiniSuite"],
                 ["evaluate", "--weights", str(tmp_path / "models" / "cars.safetensors")]):
        assert main([*argv, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "no such file or folder" in err and "(--weights)" in err and "--suite is needed" not in err, err


def test_merged_files_under_any_name_are_found_and_what_cannot_be_read_back_is_refused(tmp_path, capsys):
    """A merged file named without .safetensors (or a folder holding it) was not recognised as one (evaluate asked
    for --suite, diagnose used all 8 experts); --recipe x.safetensors wrote YAML that replay read as weights; an empty
    or repeated --experts merged all experts or one."""
    merged = tmp_path / "merged_noext"
    assert main(["merge", "--suite", "MiniSuite", "--experts", "digits,textures", "--method", "task_arithmetic",
                 "--out", str(merged)]) == 0
    assert "task_arithmetic of 2 experts" in capsys.readouterr().out
    assert main(["evaluate", "--weights", str(merged), "--tasks", "merged", "--device", "cpu"]) == 0
    assert list(json.loads(capsys.readouterr().out)["accuracy"]) == ["digits", "textures"]
    (tmp_path / "hf").mkdir()
    os.link(merged, tmp_path / "hf" / "model.safetensors")
    assert main(["diagnose", "--weights", str(tmp_path / "hf"), "--curves", "sar_mean"]) == 0   # its recorded suite
    assert "2 experts (those its recipe merged" in capsys.readouterr().out
    for extra, message in (
            (["--experts", "digits", "--recipe", str(tmp_path / "r.safetensors")],
             "a recipe is written as YAML (JSON under a .json name), and a .safetensors name is read back as weights"),
            (["--experts", ""], "--experts '' names no expert; give some of the suite's ['digits', 'house_numbers'"),
            (["--experts", "digits,signs,digits"], "--experts names ['digits'] more than once"),
            (["--preferences", ""], "--preferences '' is not valid JSON"),   # was: uniform weights
            (["--preferences", "{}"], "--preferences {} names no expert; leave it out for uniform weights"),
            (["--preferences", '{"digits": 1, "digits": 2}'], "--preferences names ['digits'] more than once")):
        assert main(["merge", "--suite", "MiniSuite", "--method", "task_arithmetic", *extra,
                     "--out", str(tmp_path / "x.safetensors")]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "r.safetensors").exists()
    # a merge of checkpoints: diagnose --weights reads the base and experts its recipe recorded
    suite = load_suite(DEFAULT_SUITE_PATH)
    save_state_dict(tmp_path / "base.safetensors", suite.base)
    for name in ("digits", "signs"):
        save_state_dict(tmp_path / f"{name}.safetensors", suite.experts[name])
    assert main(["merge", "--base", str(tmp_path / "base.safetensors"), "--method", "tsv_m",
                 "--expert", f"digits={tmp_path / 'digits.safetensors'}",
                 "--expert", f"signs={tmp_path / 'signs.safetensors'}", "--out", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    assert main(["diagnose", "--weights", str(tmp_path / "ck"), "--curves", "sar_mean"]) == 0   # was: give --suite
    assert "2 experts, " in capsys.readouterr().out
    for out, message in (("", "the weights' file name is empty"),   # was "Device or resource busy", after the merge
                         (str(tmp_path / "hf"), f"cannot write {tmp_path / 'hf'}: it is a folder; give a file name")):
        assert main(["merge", "--suite", "MiniSuite", "--experts", "digits", "--method", "task_arithmetic",
                     "--out", out]) == 2
        assert message in capsys.readouterr().err


def test_leaderboard_refuses_its_suite_s_files_and_bad_scales_before_any_row_and_errors_are_one_line(tmp_path,
                                                                                                     capsys):
    import shutil

    suite = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, suite)
    manifest = (suite / "manifest.json").read_bytes()
    assert main(["leaderboard", "--suite", str(suite), "--methods", "weight_average", "--calibrations",
                 "--out", str(suite / "manifest.json")]) == 2
    assert "manifest.json is a file of the suite" in capsys.readouterr().err
    assert (suite / "manifest.json").read_bytes() == manifest
    assert main(["leaderboard", "--suite", str(tmp_path / "nosuch"), "--out", str(tmp_path / "lb.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: suite source") and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["leaderboard", "--alphas", "-1", "nan", "--out", str(tmp_path / "lb.md")])
    assert "--alphas: [-1.0, nan] are not scales" in capsys.readouterr().err
    # a weight-averaging row is quick: the board is written whole, its folder made
    assert main(["leaderboard", "--methods", "weight_average", "--calibrations", "--threads", "1",
                 "--out", str(tmp_path / "new" / "lb.md"), "--json", str(tmp_path / "lb.json")]) == 0
    assert "weight_average" in (tmp_path / "new" / "lb.md").read_text()
    assert [row["label"] for row in json.loads((tmp_path / "lb.json").read_text())] == [
        "Zero-shot", "Individual (experts)", "weight_average"]
    # an audit of the leaderboard: scales none of which a method accepts made its row the method's default, under a
    # header saying it was chosen on validation; an output that could not be written failed after every row, and a
    # --json that could not be written left --out replaced. Each is refused before any row now
    with pytest.raises(SystemExit):
        main(["leaderboard", "--methods", "iso_c", "--calibrations", "--alphas", "4", "--out", str(tmp_path / "x.md")])
    assert "--alphas: iso_c: none of the scales [4.0] is in its 'alpha' range [0, 3]" in capsys.readouterr().err
    # every method, by default, in a process of its own (where no method module was imported yet: the check saw none)
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "studio.leaderboard", "--alphas", "4", "--out", str(tmp_path / "x.md")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "--alphas: iso_c: none of the scales [4.0]" in run.stderr, run.stderr[-500:]
    with pytest.raises(SystemExit):
        main(["leaderboard", "--threads", "-3", "--out", str(tmp_path / "x.md")])
    assert "--threads must be 0 (torch's default) or a number of threads, got -3" in capsys.readouterr().err
    (tmp_path / "afile").write_text("a file")
    board = (tmp_path / "new" / "lb.md").read_text()
    for out, json_out, message in ((tmp_path / "new", None, "it is a folder"),
                                   (tmp_path / "new" / "lb.md", tmp_path / "afile" / "lb.json", "is a file, not a "
                                                                                                  "folder")):
        assert main(["leaderboard", "--methods", "weight_average", "--calibrations", "--threads", "1", "--out",
                     str(out), *(["--json", str(json_out)] if json_out else [])]) == 2
        said = capsys.readouterr()
        assert message in said.err and "weight_average" not in said.out, said   # no row ran (each prints a line)
    assert (tmp_path / "new" / "lb.md").read_text() == board


def test_load_dtype_converts_floating_tensors_and_keeps_the_others(tmp_path):
    """io03/io04: ``dtype=`` converts the floating-point tensors only; integer tensors (position ids, masks) keep
    theirs."""
    sd = {"w": torch.randn(3, 2), "ids": torch.arange(4), "mask": torch.tensor([True, False])}
    save_state_dict(tmp_path / "m.safetensors", sd)
    got = load_state_dict(tmp_path / "m.safetensors", dtype=torch.float16)
    assert {k: v.dtype for k, v in got.items()} == {"w": torch.float16, "ids": torch.int64, "mask": torch.bool}
    assert torch.equal(got["w"], sd["w"].half()) and torch.equal(got["ids"], sd["ids"])


def _both_layouts(folder: Path) -> tuple[dict, dict]:
    """A folder with model.safetensors and also a shard index with its shard, of other weights."""
    one, sharded = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    folder.mkdir()
    save_state_dict(folder / "model.safetensors", one)
    save_state_dict(folder / "model-00001-of-00001.safetensors", sharded)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
    return one, sharded


def test_model_safetensors_wins_over_a_shard_index_in_a_folder_and_on_the_hub(tmp_path, offline_hub):
    """io10/io13: as transformers resolves safetensors weights, a folder's or Hub repository's
    ``model.safetensors`` is read before ``model.safetensors.index.json`` when both are there."""
    from .conftest import hub_cache

    one, _ = _both_layouts(tmp_path / "both")
    sd, pinned = load_checkpoint(tmp_path / "both")
    assert torch.equal(sd["w"], one["w"]) and pinned.endswith("model.safetensors"), pinned
    hub_cache(tmp_path / "both", tmp_path / "hf", "studio-test/both")
    sd, pinned = load_checkpoint("studio-test/both", cache_dir=tmp_path / "hf")
    assert torch.equal(sd["w"], one["w"]), pinned


def test_the_settings_fingerprint_covers_every_setting_and_the_experts_order():
    """io34-io37: each field that decides the merged weights (svd_mode, prefix, seed, ... and the experts' order)
    changes :meth:`Recipe.settings_fingerprint`; the suite, version and sources do not."""
    r = Recipe(method="ties", hparams={"k": 0.2}, experts=["a", "b"])
    want = r.settings_fingerprint()
    edits = {"method": "task_arithmetic", "hparams": {"k": 0.3}, "experts": ["b", "a"], "calibrate": "svc",
             "calibrate_hparams": {"x": 1}, "preferences": {"a": 2.0}, "seed": 1, "layer_rule": "all_matrices",
             "svd_mode": "exact", "prefix": "visual."}
    for name, value in edits.items():
        assert Recipe(**{**r.__dict__, name: value}).settings_fingerprint() != want, name
    for name, value in {"suite": "MiniSuite", "studio_version": "0.0", "fingerprints": None}.items():
        assert Recipe(**{**r.__dict__, name: value}).settings_fingerprint() == want, name


def test_compressed_files_of_earlier_versions_accept_their_half_precision_base(tmp_path):
    """cp04: files written before base_fingerprint recorded the base in its own dtype (plain fingerprint); such a
    file still loads against that half-precision base, and still refuses another."""
    from studio.compress import Compressed
    from studio.io import fingerprint

    base = {k: v.half() for k, v in clip_like_state_dict(width=8).items()}
    experts = make_experts(base, 2)
    packed = studio.compress({k: v.float() for k, v in base.items()}, {n: {k: v.float() for k, v in sd.items()}
                                                                      for n, sd in experts.items()})
    packed.meta["base_fingerprint"] = fingerprint(base)   # as earlier versions recorded it
    path = packed.save(tmp_path / "old.safetensors")
    assert Compressed.load(path, base).tasks.keys() == packed.tasks.keys()
    other = {**base, "visual.proj": base["visual.proj"] + 1}
    with pytest.raises(CheckpointError, match="the base given is not the one"):
        Compressed.load(path, other)


def test_compressed_factors_of_mismatched_ranks_are_refused_at_load(tmp_path):
    """cp07: U [m, k], S [k], Vh [k, n] must agree on k; factors whose product has the base's shape but whose
    ranks disagree are refused when the file is read (naming the entry), not later by a matmul."""
    from studio.compress import Compressed

    base = clip_like_state_dict(width=16)
    path = studio.compress(base, make_experts(base, 2)).save(tmp_path / "packed.safetensors")
    entries = load_state_dict(path)
    vh = entries["0/visual.proj/Vh"]
    for name, value in (("0/visual.proj/Vh", torch.cat([vh, vh[:1]])),
                        ("0/visual.proj/U", entries["0/visual.proj/U"][:, :1].contiguous())):
        save_state_dict(tmp_path / "bad.safetensors", {**entries, name: value}, _unsealed(path))
        with pytest.raises(CheckpointError, match=r"task 'task0', 'visual.proj': factors U .* do not make the base's"):
            Compressed.load(tmp_path / "bad.safetensors", base)


def test_a_folder_with_two_shard_indexes_is_ambiguous(tmp_path):
    """io14/io15: a folder without model.safetensors and with two ``*.safetensors.index.json`` is refused (which
    one?), even when it also holds a single .safetensors file; neither the first index nor that file is read."""
    folder = tmp_path / "two"
    folder.mkdir()
    save_state_dict(folder / "shard.safetensors", {"w": torch.ones(2)})
    for name in ("a", "b"):
        (folder / f"{name}.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "shard.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"two: expected model.safetensors, one \*.safetensors.index.json or a "
                                              r"single .safetensors file; found \['a.safetensors.index.json', "
                                              r"'b.safetensors.index.json', 'shard.safetensors'\]"):
        load_state_dict(folder)


def test_recipe_inputs_follow_the_recipes_expert_order():
    """io46: a recipe's experts are merged in its order, not in the order the caller's mapping lists them."""
    from studio.io import recipe_inputs

    base = {"w": torch.zeros(2)}
    experts = {"a": {"w": torch.ones(2)}, "b": {"w": torch.full((2,), 2.0)}, "c": {"w": torch.full((2,), 3.0)}}
    _, chosen = recipe_inputs(Recipe(method="ties", experts=["c", "a"]), base, experts)
    assert list(chosen) == ["c", "a"]
    _, chosen = recipe_inputs(Recipe(method="ties"), base, experts)   # none listed: all, in the mapping's order
    assert list(chosen) == ["a", "b", "c"]


def test_merge_never_writes_its_recipe_over_a_shard_index_it_reads(files, capsys):
    """cl06: ``merge --recipe`` names an output like ``--out``: a recipe file name that is an input (here the base's
    shard index, a .json name the recipe check allows) is refused before anything is merged or written."""
    from huggingface_hub import save_torch_state_dict

    tmp, base, experts, args = files
    (tmp / "sharded").mkdir()
    save_torch_state_dict(base, tmp / "sharded", max_shard_size=4000)
    index = tmp / "sharded" / "model.safetensors.index.json"
    before = index.read_bytes()
    argv = ["merge", "--base", str(tmp / "sharded"), *args[2:], "--method", "task_arithmetic", "--device", "cpu",
            "--out", str(tmp / "m.safetensors"), "--recipe", str(index)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is the checkpoint of the base, which this command reads" in err, err
    assert index.read_bytes() == before and not (tmp / "m.safetensors").exists()


def test_an_empty_prefix_is_named_as_the_option_at_fault(files, capsys):
    """cl05: ``--prefix ''`` is refused as the option it is, before any checkpoint is read (not later as a recipe
    field the user never wrote)."""
    tmp, base, experts, args = files
    out = tmp / "m.safetensors"
    for cmd in (["merge", *args, "--method", "task_arithmetic", "--out", str(out)],
                ["compress", *args, "--out", str(out)]):
        assert main([*cmd, "--prefix", ""]) == 2, cmd
        err = capsys.readouterr().err
        assert "--prefix applies to --base and --expert checkpoints" in err and "must not be empty" in err, err
        assert not out.exists()


def test_merge_from_recipe_checks_recorded_experts_without_a_recorded_base():
    """io52: a recipe that records only its experts' fingerprints (any part may be left out) still has them
    checked: a changed expert is refused and named, the same weights merge."""
    from studio.io import fingerprint, merge_from_recipe

    base = clip_like_state_dict(width=8)
    experts = make_experts(base, 2)
    recorded = {n: fingerprint(sd) for n, sd in experts.items()}
    r = Recipe(method="task_arithmetic", experts=list(experts), fingerprints={"experts": recorded})
    merge_from_recipe(r, base, experts, device="cpu")
    changed = {**experts, "task1": {**experts["task1"], "visual.proj": experts["task1"]["visual.proj"] + 1}}
    with pytest.raises(CheckpointError, match=r"the weights differ .*expert 'task1': recorded sha256:"):
        merge_from_recipe(r, base, changed, device="cpu")
    merge_from_recipe(r, base, changed, check=False, device="cpu")


def test_a_fingerprint_tells_dtypes_whose_bytes_and_shape_are_the_same():
    """io28: the dtype is part of a fingerprint even where the bytes and the shape are identical (float32 vs
    int32, float16 vs bfloat16 reinterpretations of the same memory)."""
    from studio.io import fingerprint

    w = torch.randn(4, 3)
    h = w.half()
    assert fingerprint({"w": w}) != fingerprint({"w": w.view(torch.int32)})
    assert fingerprint({"w": h}) != fingerprint({"w": h.view(torch.bfloat16)})


def test_save_merged_refuses_one_file_named_two_ways(tmp_path, monkeypatch):
    """io43: the recipe and the weights named by different texts for the same file (relative and absolute) are
    refused before anything is written; comparing the texts would let the recipe's rename replace the weights."""
    monkeypatch.chdir(tmp_path)
    r = Recipe(method="ties", hparams={"k": 0.2}, experts=["a"])
    with pytest.raises(CheckpointError, match="the recipe and the weights would both be written to m.yaml"):
        save_merged("m.yaml", {"w": torch.ones(1)}, r, recipe_path=tmp_path / "m.yaml")
    assert not (tmp_path / "m.yaml").exists()


def test_explicit_nulls_in_a_recipe_take_the_fields_defaults():
    """io38: an explicit null takes the field's default, svd_mode included ("auto", not None)."""
    nulls = {"hparams": None, "experts": None, "calibrate_hparams": None, "seed": None, "studio_version": None,
             "svd_mode": None}
    r = Recipe.from_dict({"method": "ties", **nulls})
    assert r == Recipe(method="ties") and r.svd_mode == "auto"
    assert Recipe.from_text(json.dumps({"method": "ties", "svd_mode": None})).svd_mode == "auto"


def test_numbers_written_with_an_exponent_and_no_dot_are_numbers_in_recipes(files):
    """From a fuzz audit: ``Recipe.to_json`` writes 5e-05 as ``5e-05``, which YAML 1.1 (PyYAML's safe loader) reads as
    text, so a recipe embedded in an exported file with such a value failed its replay ('alpha' must be a number).
    JSON and YAML 1.2 read it as a number, and so do recipes now, exported or written by hand."""
    tmp, base, experts, _ = files
    recipe = Recipe(method="task_arithmetic", hparams={"alpha": 5e-05}, experts=list(experts),
                    preferences={name: w for name, w in zip(experts, (1e-06, 1.0, 3e2))})
    assert "5e-05" in recipe.to_json() and "1e-06" in recipe.to_json()
    assert Recipe.from_text(recipe.to_json()) == recipe == Recipe.from_text(recipe.to_yaml())
    save_merged(tmp / "m.safetensors", merge_from_recipe(recipe, base, experts), recipe)
    back = Recipe.from_file(tmp / "m.safetensors")
    assert back == recipe and isinstance(back.hparams["alpha"], float)
    _equal(merge_from_recipe(back, base, experts), merge_from_recipe(recipe, base, experts))
    by_hand = Recipe.from_text("method: ties\nhparams: {k: 2E-1, alpha: -1e+0}\nexperts: [a]\nseed: 1_0\n")
    assert by_hand.hparams == {"k": 0.2, "alpha": -1.0} and by_hand.seed == 10
    assert Recipe.from_text("method: ties\nhparams: {merge_func: e5}\n").hparams == {"merge_func": "e5"}


def test_merged_files_carry_the_format_metadata_transformers_requires(files):
    """io45: save_merged writes ``format: pt`` into the header metadata, besides the recipe; transformers'
    from_pretrained refuses a safetensors file whose metadata lacks it."""
    tmp, base, experts, args = files
    save_merged(tmp / "m.safetensors", base, Recipe(method="task_arithmetic", experts=list(experts)))
    assert main(["merge", *args, "--method", "task_arithmetic", "--device", "cpu", "--out",
                 str(tmp / "cli.safetensors")]) == 0
    for name in ("m.safetensors", "cli.safetensors"):
        meta = read_metadata(tmp / name)
        assert meta["format"] == "pt" and set(meta) == {"format", RECIPE_METADATA_KEY}, name


def test_evaluate_tasks_merged_names_experts_the_suite_has_no_task_for(tmp_path, capsys):
    """cl19: ``evaluate --tasks merged`` of a file whose recipe merged experts the suite lacks says so (the recipe's
    experts, the suite and its tasks), rather than an unknown-task error for a --tasks the user did not write."""
    weights = tmp_path / "w.safetensors"
    recipe = Recipe(method="task_arithmetic", experts=["digits", "cars"], suite="MiniSuite")
    save_merged(weights, load_suite(DEFAULT_SUITE_PATH).base, recipe)
    assert main(["evaluate", "--weights", str(weights), "--tasks", "merged", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--tasks merged: the recipe merged experts ['cars'] that the suite MiniSuite has no task for" in err, err


def test_a_replay_of_a_recipe_that_recorded_some_experts_says_so(files, capsys):
    """cl24: a recipe that recorded the base but only some experts (any part may be left out) and whose merge
    differs is said not to have recorded all its inputs, not to have been merged "from other weights, as the
    options say" (no option named any)."""
    tmp, base, experts, args = files
    out = tmp / "m.safetensors"
    assert main(["merge", *args, "--method", "task_arithmetic", "--device", "cpu", "--out", str(out)]) == 0
    recipe = Recipe.from_file(out)
    fp = recipe.fingerprints
    partial = {"base": fp["base"], "experts": {"task0": fp["experts"]["task0"]}, "merged": "sha256:" + "0" * 64}
    (tmp / "r.yaml").write_text(Recipe(**{**recipe.__dict__, "fingerprints": partial}).to_yaml())
    capsys.readouterr()
    assert main(["recipe", str(tmp / "r.yaml"), "--device", "cpu", "--out", str(tmp / "again.safetensors")]) == 0
    said = capsys.readouterr().out
    assert "; not the same bits as the merge the recipe recorded (the recipe did not record all its inputs))" in said, \
        said


@pytest.mark.parametrize("entry", ["2/b/dense", "\u00b2/b/dense"])
def test_a_compressed_entry_of_no_task_is_refused_by_name(tmp_path, entry):
    """An entry whose task index is past the file's task list (a stray or corrupt entry; cp10 of the mutation
    audit), or is a digit that is no ASCII number ('\u00b2' passed str.isdigit() and int() then raised a bare
    ValueError, a traceback from `merge-studio reconstruct`), is refused by name, not ignored."""
    from studio.compress import Compressed

    base = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    experts = {t: {"w": torch.randn(4, 4), "b": torch.randn(4)} for t in "xy"}
    path = studio.compress(base, experts).save(tmp_path / "p.safetensors")
    save_state_dict(tmp_path / "bad.safetensors", {**load_state_dict(path), entry: torch.zeros(4)},
                    _unsealed(path))
    with pytest.raises(CheckpointError, match=f"bad.safetensors: unexpected entry '{entry}'"):
        Compressed.load(tmp_path / "bad.safetensors", base)


def test_a_long_missing_path_is_named_whole(tmp_path):
    """io53: a path is shortened in a message only when absurdly long (over 2000 characters): a 1,300-character
    path (deep folders) is named whole, so that it can be found again."""
    source = tmp_path.joinpath(*["d" * 100] * 12, "m.safetensors")
    assert 1200 < len(str(source)) < 2000
    with pytest.raises(CheckpointError) as err:
        load_state_dict(str(source))
    assert f"{source}: no such file or folder" in str(err.value)


def test_a_packed_header_of_another_format_is_refused(tmp_path):
    """cp13: the TSV-C header must say its format ('merge-studio tsv-c ...'); a header of another format with the
    same fields is not read as one (by load, or by read_meta, which reconstruct trusts for the base to read)."""
    from studio.compress import Compressed

    base = {"w": torch.zeros(4, 4), "b": torch.zeros(4)}
    path = studio.compress(base, {t: {"w": torch.randn(4, 4), "b": torch.randn(4)} for t in "xy"}).save(
        tmp_path / "p.safetensors")
    meta = read_metadata(path)
    header = json.loads(meta["merge_studio_tsv_c"])
    assert header["format"].startswith("merge-studio tsv-c")
    foreign = json.dumps({**header, "format": "other-tool 1"})
    save_state_dict(tmp_path / "other.safetensors", load_state_dict(path), {**meta, "merge_studio_tsv_c": foreign})
    for read in (lambda p: Compressed.load(p, base), Compressed.read_meta):
        with pytest.raises(CheckpointError, match=r"other.safetensors: not a TSV-C file written by Compressed.save "
                                                  r"\(not its format\)"):
            read(tmp_path / "other.safetensors")


def test_a_hub_file_in_a_subfolder_is_pinned_to_its_commit(tmp_path, offline_hub):
    """io09: ``owner/name/sub/file.safetensors`` is recorded as ``hf://owner/name@<commit>/sub/file.safetensors``:
    the commit is the snapshot folder above the file's path in the repository, not the file's own folder."""
    from .conftest import hub_cache

    (tmp_path / "repo" / "sub").mkdir(parents=True)
    save_state_dict(tmp_path / "repo" / "sub" / "w.safetensors", {"w": torch.ones(2)})
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    hub_cache(tmp_path / "repo", tmp_path / "hf", "studio-test/nested", commit=commit)
    sd, pinned = load_checkpoint("studio-test/nested/sub/w.safetensors", cache_dir=tmp_path / "hf")
    assert torch.equal(sd["w"], torch.ones(2))
    assert pinned == f"hf://studio-test/nested@{commit}/sub/w.safetensors"


def test_a_recipe_file_whose_text_starts_with_spaces_and_a_brace_is_read_as_text(tmp_path):
    """io49: a file is taken for safetensors only if its 8-byte header length fits the file; an indented JSON
    recipe (8 spaces, then '{') is read as the recipe it is."""
    r = Recipe(method="ties", hparams={"k": 0.2}, experts=["a", "b"])
    (tmp_path / "r.json").write_text(" " * 8 + r.to_json())
    assert Recipe.from_file(tmp_path / "r.json") == r


def test_a_missing_checkpoint_of_a_merge_is_not_said_to_be_one_a_recipe_recorded(files, capsys):
    """cl12: the hint "a source the recipe recorded" is given only for sources a replayed recipe recorded, not for
    a plain merge's --base/--expert."""
    tmp, base, experts, args = files
    (tmp / "task1.safetensors").unlink()
    assert main(["merge", *args, "--method", "task_arithmetic", "--out", str(tmp / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "expert 'task1'" in err and "task1.safetensors" in err and "the recipe recorded" not in err, err


def test_a_closed_pipe_ends_a_command_with_exit_status_0(monkeypatch):
    """cl04: ``merge-studio ... | head``: a BrokenPipeError is the reader having what it wanted, exit status 0."""
    import studio.cli

    def closed(args):
        raise BrokenPipeError

    dups = []
    monkeypatch.setattr(studio.cli, "_run", closed)
    monkeypatch.setattr(studio.cli.os, "dup2", lambda *a: dups.append(a))
    assert main(["methods"]) == 0 and len(dups) == 1


def test_a_suite_with_an_expert_but_no_base_is_refused(files, capsys):
    """cl22: ``--suite`` with ``--expert`` (and no ``--base``) is refused, not merged from the suite with the
    --expert silently dropped."""
    tmp, base, experts, args = files
    out = tmp / "m.safetensors"
    assert main(["merge", "--suite", "MiniSuite", args[2], args[3], "--method", "task_arithmetic", "--device", "cpu",
                 "--out", str(out)]) == 2
    assert "give either --suite, or --base and --expert checkpoints, not both" in capsys.readouterr().err
    assert not out.exists()


def test_a_replay_names_a_recorded_base_that_is_gone_as_one_the_recipe_recorded(files, capsys):
    """cl28: a recipe's recorded base that no longer exists is said to be a source the recipe recorded, with the
    option that reads another (--base)."""
    tmp, base, experts, args = files
    out = tmp / "m.safetensors"
    assert main(["merge", *args, "--method", "task_arithmetic", "--device", "cpu", "--out", str(out)]) == 0
    (tmp / "base.safetensors").unlink()
    capsys.readouterr()
    assert main(["recipe", str(out), "--device", "cpu", "--out", str(tmp / "again.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the base: " in err and "(a source the recipe recorded; give --base to read another)" in err, err


def test_an_unknown_expert_is_named_with_the_suites_experts_in_the_suites_order(tmp_path, capsys):
    """As every other message and the app list them (they were sorted alphabetically here)."""
    order = list(load_suite(str(DEFAULT_SUITE_PATH)).experts)
    assert order != sorted(order)
    assert main(["merge", "--suite", str(DEFAULT_SUITE_PATH), "--experts", "digits,mnist", "--method", "ties",
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"unknown expert(s) ['mnist']; the suite has {order}" in err, err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("with_suite", [False, True])
def test_evaluate_says_when_the_weights_are_not_a_safetensors_file(tmp_path, capsys, with_suite):
    """A recipe passed as --weights was blamed on a missing --suite, and given one on a safetensors header "too
    large"; it is named for what it is, with the command that merges a recipe."""
    recipe = tmp_path / "merged.yaml"
    recipe.write_text("method: task_arithmetic\n")
    args = ["evaluate", "--weights", str(recipe)] + (["--suite", str(DEFAULT_SUITE_PATH)] if with_suite else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--weights {recipe} is not a safetensors file (a recipe: `merge-studio recipe {recipe} --out" in err, err


@pytest.mark.parametrize("signum,status,line", [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")])
def test_sigterm_and_ctrl_c_end_a_command_and_remove_its_staged_files(tmp_path, signum, status, line):
    """SIGTERM (kill, timeout, docker stop) ended the CLI at once and left a model-sized staged file beside the output
    (an I/O audit); it now ends it as Ctrl-C does: one line, exit status 143, nothing left in the output folder. A
    real process and signal; the process sends it to itself right after the weights' staged file is written, the
    moment the audit's kills found, so that the test does not depend on timing. Ctrl-C (SIGINT) too, in a command
    the CLI runs itself: the test of Ctrl-C above interrupts a leaderboard, which it hands to another module, and
    left the exit status 130 here untested (a mutant sample)."""
    import subprocess
    import sys

    out = tmp_path / "out"
    code = ("import os, signal, sys; import studio.io as io; write = io.save_file\n"
            "signal.signal(signal.SIGINT, signal.default_int_handler)   # as in a terminal (see the test above)\n"
            "def write_then_signal(*args, **kwargs):\n"
            f"    write(*args, **kwargs); os.kill(os.getpid(), signal.{signum})\n"
            "io.save_file = write_then_signal\n"
            "from studio.cli import main\n"
            f"sys.exit(main(['merge', '--suite', {str(DEFAULT_SUITE_PATH)!r}, '--method', 'task_arithmetic', "
            f"'--device', 'cpu', '--out', {str(out / 'm.safetensors')!r}, '--recipe', {str(out / 'm.yaml')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1:]) == (status, [line]), proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()   # the folder made for the output is gone too


def test_a_staged_file_a_killed_write_left_is_removed_by_the_next_write(tmp_path):
    """SIGKILL (the out-of-memory killer, a lost container) ends a write where nothing can clean up: its hidden staged
    file, and safetensors' own temporary file (``.tmpXXXXXX``), as large as the output, stayed beside it for good (an
    I/O audit). Both are now in a staging folder named for the output, this machine and the process, which the next
    write of that path removes, with a warning naming it. A real process killed by a real SIGKILL while safetensors
    writes; a staging folder of a process that still runs, and one from another machine, are kept."""
    import subprocess
    import sys

    import studio.io as io

    out = tmp_path / "m.safetensors"
    code = ("import os, signal, sys, threading, time, torch; import studio.io as io\n"
            "def kill_while_safetensors_writes():\n"
            "    while True:\n"
            f"        if any(n.startswith('.tmp') for d in os.listdir({str(tmp_path)!r}) if d.startswith('.m.') "
            f"for n in os.listdir(os.path.join({str(tmp_path)!r}, d))):\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n"
            "        time.sleep(0.0002)\n"
            "threading.Thread(target=kill_while_safetensors_writes, daemon=True).start()\n"
            f"io.save_state_dict({str(out)!r}, {{'w': torch.ones(25_000_000)}})\n"
            "sys.exit(3)   # written before the watcher saw safetensors' file: the test cannot tell what it meant to")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr)
    left = list(tmp_path.iterdir())   # the staging folder, safetensors' temporary file in it
    assert len(left) == 1 and left[0].name.startswith(f".m.safetensors.{io._HOST}-"), left
    assert any(p.name.startswith(".tmp") for p in left[0].iterdir()), list(left[0].iterdir())
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead_pid = left[0].name.split("-")[1]   # gone here; another machine's process of that id may still run
        other_host = "0" * 8 if io._HOST != "0" * 8 else "1" * 8
        running = tmp_path / f".m.safetensors.{io._HOST}-{sleeper.pid}-abcd1234.tmp"
        elsewhere = tmp_path / f".m.safetensors.{other_host}-{dead_pid}-abcd1234.tmp"
        for kept in (running, elsewhere):
            kept.mkdir()
            (kept / "m.safetensors").write_bytes(b"staged")
        with pytest.warns(UserWarning, match=re.escape(f"removed {left[0]}, the staged file of an interrupted write "
                                                       f"of {out} (its process is gone)")):
            save_state_dict(out, {"w": torch.zeros(3)})
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, running.name, elsewhere.name])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert load_state_dict(out)["w"].tolist() == [0.0, 0.0, 0.0]


def test_the_cli_says_in_one_line_that_it_removed_a_staged_file_left_before(tmp_path, capsys):
    """The CLI shows the library's warnings as its other messages, one ``warning: ...`` line on stderr, where Python's
    format named a line of studio/io.py and printed it: here the staging folder of an earlier, killed write of the
    same output, which this one removes."""
    import subprocess
    import sys

    import studio.io as io

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = tmp_path / f".m.safetensors.{io._HOST}-{gone.pid}-abcd1234.tmp"
    stale.mkdir()
    (stale / "m.safetensors").write_bytes(b"staged")
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--suite", str(DEFAULT_SUITE_PATH), "--method", "task_arithmetic", "--device", "cpu",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [f"warning: removed {stale}, the staged file of an interrupted write of {out} (its "
                                f"process is gone)"], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("interrupted", ["recipe", "weights"])
@pytest.mark.parametrize("old", [True, False])
def test_an_export_interrupted_at_either_rename_leaves_no_recipe_beside_other_weights(tmp_path, monkeypatch,
                                                                                       interrupted, old):
    """save_merged renamed the weights, then the recipe: an interruption between the two left new weights beside the
    recipe of an earlier export (an I/O audit). The recipe now goes first and is put back as it was if the weights'
    rename does not follow; the pair on disk is the old one, or none where there was none."""
    import studio.io as io

    weights, recipe_file = tmp_path / "m.safetensors", tmp_path / "m.yaml"
    first = Recipe(method="ties", hparams={"k": 0.2}, experts=["a"])
    if old:
        save_merged(weights, {"w": torch.zeros(2)}, first, recipe_path=recipe_file)
        before = (weights.read_bytes(), recipe_file.read_bytes())
    replace = os.replace

    def interrupt(src, dst):
        if Path(dst).name == Path(weights if interrupted == "weights" else recipe_file).name:
            raise KeyboardInterrupt
        replace(src, dst)

    monkeypatch.setattr(io.os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_merged(weights, {"w": torch.ones(2)}, Recipe(method="task_arithmetic", experts=["a"]),
                    recipe_path=recipe_file)
    monkeypatch.setattr(io.os, "replace", replace)
    if old:
        assert (weights.read_bytes(), recipe_file.read_bytes()) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "m.yaml"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_a_replaced_file_keeps_its_permissions_and_is_flushed_before_its_rename(tmp_path, monkeypatch):
    """Writing over a private (0600) export made it 0644, world-readable (an I/O audit); it keeps its mode now, and a
    new file gets 0666 less the umask. The staged file is flushed to the disk before it is renamed into place, so
    that after a crash of the system the name holds the old file or the whole new one."""
    import studio.io as io

    path = tmp_path / "m.safetensors"
    save_state_dict(path, {"w": torch.zeros(2)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~io._process_umask()
    path.chmod(0o600)
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(io.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                     fsync(fd))[1])
    monkeypatch.setattr(io.os, "replace", lambda src, dst: (events.append(("replace", str(src))), replace(src, dst))[1])
    save_state_dict(path, {"w": torch.ones(2)})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_state_dict(path)["w"].tolist() == [1.0, 1.0]
    staged = events[1][1]   # in a staging folder beside the file, which is gone
    assert events[:2] == [("fsync", staged), ("replace", staged)] and Path(staged).parent.parent == tmp_path, events
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_diagnose_out_refuses_a_weights_name_and_a_file_holding_weights(files, capsys):
    """``diagnose --out`` writes JSON: it replaced an expert's checkpoint the command did not read with it (an I/O
    audit). A weights file's name, or a file holding safetensors weights, is refused before anything runs."""
    tmp, base, experts, args = files
    other = tmp / "other.safetensors"
    save_state_dict(other, base)
    kept = other.read_bytes()
    for out, message in ((tmp / "d.safetensors", "the diagnostics are written as JSON, and .safetensors names "
                                                  "weights; give a .json name (e.g. d.json)"),
                         (tmp / "d.bin", "give a .json name (e.g. d.json)"),
                         (tmp / "d.json", None)):
        if message is None:   # a JSON name holding weights (renamed, or written there by mistake)
            out.write_bytes(kept)
            message = f"--out {out} holds safetensors weights, which the diagnostics' JSON would replace"
        assert main(["diagnose", *args, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert other.read_bytes() == kept and not (tmp / "d.safetensors").exists() and not (tmp / "d.bin").exists()
    assert main(["diagnose", *args, "--out", str(tmp / "fine.json")]) == 0 and (tmp / "fine.json").exists()


def test_a_truncated_weights_file_is_named_before_a_missing_suite(tmp_path, capsys):
    """``evaluate`` and ``diagnose --weights`` of a truncated safetensors file said --suite (or --base) was needed
    (an I/O audit): the file's own fault is said first, as with --suite."""
    cut = tmp_path / "m.safetensors"
    cut.write_bytes((DEFAULT_SUITE_PATH / "experts" / "digits.safetensors").read_bytes()[:800_000])
    for argv in (["evaluate", "--weights", str(cut)], ["diagnose", "--weights", str(cut)],
                 ["evaluate", "--weights", str(cut), "--suite", str(DEFAULT_SUITE_PATH)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {cut}: not a readable safetensors file") and "file not fully covered" in err, \
            (argv, err)


def test_a_recipes_schema_errors_name_the_recipe_before_any_weights_are_read(tmp_path, capsys, monkeypatch):
    """A recipe edited by hand with an unknown method or an out-of-range value was refused without naming the file,
    and only after its weights were read (an I/O audit)."""
    import studio.cli as cli

    def unread(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(cli, "_load_pool", unread)
    for text, message in (("method: super_merge", "unknown merging method 'super_merge'"),
                          ("method: ties\nhparams: {k: 7.0}", "ties: 'k' = 7.0 is outside the allowed range"),
                          ("method: ties\ncalibrate: svc\ncalibrate_hparams: {alpha: 0}", "svc: 'alpha' = 0")):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(text + "\nsuite: MiniSuite\n")
        assert main(["recipe", str(recipe), "--out", str(tmp_path / "o.safetensors")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.endswith(f"(recipe {recipe})"), err


def test_an_output_through_a_link_into_another_hugging_face_cache_is_refused(files, capsys):
    """From an I/O audit: ``--out`` through a snapshot's link into a Hugging Face cache other than the configured one
    replaced the blob that every revision holding it shares. It is refused before the merge."""
    tmp, base, experts, args = files
    cache = tmp / "other_cache" / "hub" / "models--org--a"
    (cache / "blobs").mkdir(parents=True)
    (cache / "snapshots" / "abc123").mkdir(parents=True)
    blob = cache / "blobs" / "0f1e2d"
    blob.write_bytes((tmp / "task0.safetensors").read_bytes())
    (cache / "snapshots" / "abc123" / "model.safetensors").symlink_to(blob)
    kept = blob.read_bytes()
    assert main(["merge", *args, "--method", "task_arithmetic", "--device", "cpu",
                 "--out", str(cache / "snapshots" / "abc123" / "model.safetensors")]) == 2
    assert "is a file of a Hugging Face cache" in capsys.readouterr().err and blob.read_bytes() == kept


def test_a_conversion_that_would_make_values_infinite_names_the_tensor(tmp_path):
    """``load_state_dict(dtype=torch.float16)`` turned 1e6 into inf without a word, and a merge then said the file
    held infinite values (an I/O audit). The conversion is refused, naming the tensor and the range."""
    path = tmp_path / "m.safetensors"
    save_state_dict(path, {"w": torch.tensor([1e6, 1.0]), "v": torch.ones(2)})
    assert load_state_dict(path, dtype=torch.bfloat16)["w"].isfinite().all()   # bfloat16 has float32's range
    with pytest.raises(CheckpointError, match=r"m.safetensors: tensor 'w' holds values up to 1e\+06 in magnitude, "
                                              r"beyond torch.float16's range \(largest 6.55e\+04\)"):
        load_state_dict(path, dtype=torch.float16)
    save_state_dict(path, {"w": torch.tensor([float("inf"), 1.0])})   # infinite already: left to the merge's check
    assert load_state_dict(path, dtype=torch.float16)["w"].isinf().any()


def test_unreadable_files_say_what_is_wrong_with_them(tmp_path):
    """From an I/O audit: a header length past the file's end read as "invalid UTF-8 in header", a file of zeros as
    "invalid JSON ... EOF", a link to nothing as "no such file or folder", a pickle given as a recipe as "not UTF-8",
    and a suite's truncated expert did not say which expert it was."""
    import shutil
    import struct

    from studio.suite import SuiteError

    cases = {"big.safetensors": struct.pack("<Q", 10**6) + b"{" + b" " * 5000, "zeros.safetensors": bytes(64)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(CheckpointError, match="its first 8 bytes give a header of 1,000,000 bytes, and the file "
                                              "holds 5,001 after them: truncated, or not a safetensors file"):
        load_state_dict(tmp_path / "big.safetensors")
    with pytest.raises(CheckpointError, match=r"its header's length is 0 \(a file of zeros\?\)"):
        load_state_dict(tmp_path / "zeros.safetensors")
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    (tmp_path / "gone.safetensors").symlink_to(tmp_path / "nothing.safetensors")
    for name in ("loop.safetensors", "gone.safetensors"):
        with pytest.raises(CheckpointError, match=r"a symbolic link to .*, which leads to no file \(a missing "
                                                  r"target, or a loop of links\)"):
            load_state_dict(str(tmp_path / name))
    (tmp_path / "folder").mkdir()   # a checkpoint folder whose only weights file is a link to nothing
    (tmp_path / "folder" / "open_clip_model.safetensors").symlink_to(tmp_path / "nothing.safetensors")
    with pytest.raises(CheckpointError, match=r"folder/open_clip_model.safetensors: not a readable safetensors file "
                                              r"\(a symbolic link to .*, which leads to no file"):
        load_checkpoint(tmp_path / "folder")
    torch.save({"w": torch.ones(1)}, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match=r"r.pt: a torch.save checkpoint or a Python pickle, not a recipe"):
        Recipe.from_file(tmp_path / "r.pt")
    suite = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, suite)
    digits = suite / "experts" / "digits.safetensors"
    digits.write_bytes(digits.read_bytes()[:800_000])
    with pytest.raises(SuiteError, match=r"^expert 'digits': .*digits.safetensors: not a readable safetensors file"):
        load_suite(suite).experts


def test_a_cached_repository_at_another_revision_offline_names_the_revisions_it_has(tmp_path, offline_hub):
    """From an I/O audit: a revision the local cache lacks, offline, gave huggingface_hub's own text ("Cannot find an
    appropriate cached snapshot folder ..."); it now says the repository is cached and at which revisions. And a
    shard index with an empty 'weight_map' says so."""
    from .conftest import hub_cache

    (tmp_path / "m").mkdir()
    save_state_dict(tmp_path / "m" / "model.safetensors", {"w": torch.ones(2)})
    cache = tmp_path / "hf"
    hub_cache(tmp_path / "m", cache, "org/a")
    assert load_state_dict("org/a", cache_dir=cache)["w"].tolist() == [1.0, 1.0]
    with pytest.raises(CheckpointError, match=r"^'org/a@nosuchrev': org/a is in the local cache, but not at revision "
                                              r"'nosuchrev' \(cached: main -> 0123456\), and offline mode"):
        load_state_dict("org/a@nosuchrev", cache_dir=cache)
    # a short hash is not resolved offline: it read as the abbreviation the message printed beside it (a suite audit)
    with pytest.raises(CheckpointError, match=r"\(cached: main -> 0123456\), and offline mode \(HF_HUB_OFFLINE\) is "
                                              r"on; offline, a commit is found by its full hash only: "
                                              r"0123456789abcdef0123456789abcdef01234567$"):
        load_state_dict("org/a@0123456", cache_dir=cache)
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"'weight_map' is empty: the index lists no tensor"):
        load_state_dict(tmp_path / "s")


def test_a_selection_of_a_suites_experts_reads_only_those(tmp_path, capsys):
    """``--experts`` read every expert of the suite first, so one unreadable expert it left out stopped the merge
    (an I/O audit), and a large suite held every expert in memory. Only the selected ones are read now."""
    import shutil

    from studio.suite import SuiteError

    suite = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, suite)
    digits = suite / "experts" / "digits.safetensors"
    digits.write_bytes(digits.read_bytes()[:800_000])
    out = tmp_path / "m.safetensors"
    argv = ["merge", "--suite", str(suite), "--method", "task_arithmetic", "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--experts", "signs,textures"]) == 0, capsys.readouterr().err
    assert Recipe.from_file(out).experts == ["signs", "textures"]
    loaded = load_suite(suite)
    assert list(loaded.experts_named(["textures", "signs"])) == ["textures", "signs"]
    assert sorted(loaded._experts) == ["signs", "textures"]   # the others were not read
    with pytest.raises(SuiteError, match=r"^expert 'digits': "):
        loaded.experts
    assert main([*argv, "--experts", "signs,digits"]) == 2
    assert "expert 'digits': " in capsys.readouterr().err


def test_merge_notes_integer_buffers_an_expert_changed(files, capsys):
    """A merge keeps the base's integer and boolean buffers (they have no task vector); an expert that changed one
    got no word of it (an I/O audit). The CLI now notes it on stderr, and says nothing where none changed."""
    tmp, base, experts, args = files
    base = {**base, "visual.step": torch.tensor([3]), "visual.mask": torch.tensor([True, False])}
    save_state_dict(tmp / "base.safetensors", base)
    for i, (name, sd) in enumerate(experts.items()):
        save_state_dict(tmp / f"{name}.safetensors", {**sd, "visual.step": torch.tensor([3 + (i == 2)]),
                                                      "visual.mask": base["visual.mask"]})
    assert main(["merge", *args, "--method", "ties", "--device", "cpu", "--out", str(tmp / "m.safetensors")]) == 0
    err = capsys.readouterr().err
    assert "note: 1 integer or boolean buffer differs from the base in some expert (e.g. 'visual.step' in 'task2'); " \
           "it has no task vector, and the merge keeps the base's" in err, err
    assert load_state_dict(tmp / "m.safetensors")["visual.step"].tolist() == [3]
    save_state_dict(tmp / "task2.safetensors", {**experts["task2"], "visual.step": torch.tensor([3]),
                                                "visual.mask": base["visual.mask"]})
    assert main(["merge", *args, "--method", "ties", "--device", "cpu", "--out", str(tmp / "m.safetensors")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_a_replay_refuses_a_model_safetensors_in_the_folder_of_a_sharded_checkpoint_it_recorded(files, capsys):
    """A recipe records a checkpoint folder as the file it resolved to, so the guard of the folders the options name
    did not see a replay's: ``recipe R --out FOLDER/model.safetensors`` wrote the merge where it then won over the
    shards the recipe recorded, and the folder loaded as the merge (an I/O audit). Refused now, before the merge;
    other weights beside the shards, which do not change what the folder loads as, are written, and so is a merge
    beside a checkpoint given as a single file (``base.safetensors`` and ``m.safetensors`` in one folder)."""
    tmp, base, experts, args = files
    folder = tmp / "t0"
    folder.mkdir()
    keys = sorted(experts["task0"])
    halves = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for file, part in halves.items():
        save_state_dict(folder / file, {k: experts["task0"][k] for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: file for file, part in halves.items() for k in part}}))
    args = [a.replace(str(tmp / "task0.safetensors"), str(folder)) for a in args]
    recipe = tmp / "m.yaml"
    assert main(["merge", *args, "--method", "task_arithmetic", "--device", "cpu", "--out", str(tmp / "m.safetensors"),
                 "--recipe", str(recipe)]) == 0
    capsys.readouterr()
    held = sorted(p.name for p in folder.iterdir())
    assert main(["recipe", str(recipe), "--device", "cpu", "--out", str(folder / "model.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"would be a weights file in {folder}, the checkpoint folder of expert 'task0' " \
           f"(model.safetensors.index.json), which would then load as other weights" in err, err
    assert sorted(p.name for p in folder.iterdir()) == held
    assert main(["recipe", str(recipe), "--device", "cpu", "--out", str(folder / "other.safetensors")]) == 0, \
        capsys.readouterr().err
    _equal(load_state_dict(folder), experts["task0"])   # the folder still loads as the expert


def test_weights_written_into_a_checkpoint_folder_an_option_names_are_refused(files, capsys):
    """A merge written into an expert's checkpoint folder changed what that folder loads as: a model.safetensors
    there wins over its shards, a second file makes it ambiguous, and the same command run again merged the merge
    (an I/O audit). Refused before anything is read; a recipe there, or weights beside the folder, are fine."""
    tmp, base, experts, args = files
    folder = tmp / "t0"
    folder.mkdir()
    (tmp / "task0.safetensors").rename(folder / "open_clip_model.safetensors")
    args = [a.replace(str(tmp / "task0.safetensors"), str(folder)) for a in args]
    merge = ["merge", *args, "--method", "task_arithmetic", "--device", "cpu"]
    for name in ("model.safetensors", "other.safetensors", "model.safetensors.index.json"):
        assert main([*merge, "--out", str(folder / name)]) == 2, name
        err = capsys.readouterr().err
        assert f"would be a weights file in {folder}, the checkpoint folder of expert 'task0', which would then " \
               f"load as other weights" in err, err
    assert main(["compress", *args, "--out", str(folder / "packed.safetensors")]) == 2
    assert "the checkpoint folder of expert 'task0'" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_model.safetensors"]
    assert main([*merge, "--out", str(tmp / "m.safetensors"), "--recipe", str(folder / "m.yaml")]) == 0
    capsys.readouterr()
    assert main(["recipe", str(folder / "m.yaml"), "--expert", f"task0={folder}",
                 "--out", str(folder / "again.safetensors")]) == 2
    assert "the checkpoint folder of expert 'task0'" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == ["m.yaml", "open_clip_model.safetensors"]


def test_a_compressed_file_whose_tensors_changed_is_refused(tmp_path):
    """A TSV-C file records its tensors' fingerprint: a byte changed on the disk, within a factor and still a finite
    number (which no structural check sees; a helper's audit moved a reconstruction by 141 so), an entry dropped or
    added, is refused by Compressed.load naming the file; a file written before the fingerprint loads as before."""
    from studio.compress import Compressed

    base = clip_like_state_dict(width=8)
    path = studio.compress(base, make_experts(base, 2)).save(tmp_path / "packed.safetensors")
    assert Compressed.load(path, base).tasks.keys() == {"task0", "task1"}
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    u = json.loads(raw[8:header])["0/visual.proj/U"]["data_offsets"]
    raw[header + u[0] + 2] ^= 0x01   # a low bit of one float32's mantissa: still a finite number
    (tmp_path / "flipped.safetensors").write_bytes(bytes(raw))
    entries = load_state_dict(path)
    save_state_dict(tmp_path / "fewer.safetensors", {k: v for k, v in entries.items() if not k.startswith("1/")},
                    read_metadata(path))
    for name in ("flipped", "fewer"):
        bad = tmp_path / f"{name}.safetensors"
        with pytest.raises(CheckpointError, match=rf"{name}.safetensors: its tensors are not the ones Compressed.save "
                                                  rf"wrote \(fingerprint sha256:\w{{16}}\.\.\. recorded, "
                                                  rf"sha256:\w{{16}}\.\.\. read\): the file was changed or damaged "
                                                  rf"after it was written"):
            Compressed.load(bad, base)
    # the header is sealed too: task names swapped (task1's expert rebuilt as task0), the base's fingerprint taken
    # out (another base then accepted), a rank fraction edited (an audit of TSV-C)
    header = json.loads(read_metadata(path)["merge_studio_tsv_c"])
    for edit in ({"tasks": ["task1", "task0"]}, {"meta": {**header["meta"], "base_fingerprint": None}},
                 {"rank_fraction": 0.25}):
        edited = {"merge_studio_tsv_c": json.dumps({**header, **edit})}
        save_state_dict(tmp_path / "edited.safetensors", entries, edited)
        with pytest.raises(CheckpointError, match=r"edited.safetensors: its header \(task names \['task\d', "
                                                  r"'task\d'\], rank fraction, layer rule, meta\) is not the one "
                                                  r"Compressed.save wrote: the file was changed or damaged after it "
                                                  r"was written"):
            Compressed.load(tmp_path / "edited.safetensors", base)
    save_state_dict(tmp_path / "old.safetensors", entries, _unsealed(path))   # as 0.2.2 wrote it
    old = Compressed.load(tmp_path / "old.safetensors", base)
    assert torch.equal(old.reconstruct("task1")["visual.proj"], Compressed.load(path, base).reconstruct("task1")
                       ["visual.proj"])


def test_a_replay_an_evaluation_and_a_diagnosis_of_a_subset_read_only_its_experts(tmp_path, capsys):
    """An expert a recipe did not merge stopped its replay, ``evaluate --tasks merged`` and ``diagnose --weights``
    when its file was missing (a suite audit); ``merge --experts`` on the same suite did not read it."""
    import shutil

    suite = tmp_path / "suite"
    shutil.copytree(DEFAULT_SUITE_PATH, suite)
    merged, recipe = tmp_path / "m.safetensors", tmp_path / "m.yaml"
    assert main(["merge", "--suite", str(suite), "--experts", "digits,signs", "--method", "task_arithmetic",
                 "--device", "cpu", "--out", str(merged), "--recipe", str(recipe)]) == 0
    (suite / "experts" / "textures.safetensors").unlink()
    capsys.readouterr()
    assert main(["recipe", str(recipe), "--out", str(tmp_path / "again.safetensors"), "--device", "cpu"]) == 0
    assert "the same bits as the merge the recipe recorded" in capsys.readouterr().out
    assert main(["evaluate", "--weights", str(merged), "--tasks", "merged", "--device", "cpu"]) == 0
    assert set(json.loads(capsys.readouterr().out)["accuracy"]) == {"digits", "signs"}
    out = tmp_path / "d.json"
    assert main(["diagnose", "--weights", str(merged), "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == ["digits", "signs"] and report["merge"]["experts_from_its_recipe"] == ["digits", "signs"]
    assert main(["evaluate", "--weights", str(merged), "--tasks", "textures", "--device", "cpu"]) == 2
    assert "textures.safetensors is missing" in capsys.readouterr().err


def test_a_recipe_key_given_twice_is_refused_with_its_lines(tmp_path, capsys):
    """PyYAML keeps a mapping's last value for a key given twice: a second ``method:`` line replayed another method,
    without a word where the recipe had no fingerprints (a suite audit). YAML and JSON alike."""
    for name, text, where in (
            ("twice.yaml", "method: task_arithmetic\nsuite: MiniSuite\nmethod: ties\n",
             "at line 3, column 1: found the key 'method' twice (first at line 1, column 1)"),
            ("twice.json", '{"method": "ties", "suite": "MiniSuite", "hparams": {"k": 0.2, "k": 0.3}}',
             "found the key 'k' twice (first at line 1, column 54)")):
        (tmp_path / name).write_text(text)
        assert main(["recipe", str(tmp_path / name), "--out", str(tmp_path / "m.safetensors")]) == 2
        err = capsys.readouterr().err
        assert f"{name}: not valid YAML/JSON" in err and where in err and not (tmp_path / "m.safetensors").exists()
