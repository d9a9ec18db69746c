"""The command line and recipes reproduce exactly what the library merges (real safetensors files, the CLI's own
argument parsing), including the per-method layer rules, the SVD mode and custom layer rules."""

from __future__ import annotations

import pytest
import torch

import studio
from studio.cli import main
from studio.io import (RECIPE_METADATA_KEY, CheckpointError, Recipe, load_state_dict, merge_from_recipe,
                       read_metadata, save_merged, save_state_dict)
from studio.layers import LayerRule
from studio.schema import StudioError

from .conftest import clip_like_state_dict, make_experts


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
def test_cli_merge_equals_the_library_and_its_recipe_reproduces_it(files, method, extra, kwargs):
    tmp, base, experts, args = files
    out, recipe = tmp / "m.safetensors", tmp / "m.yaml"
    assert main(["merge", *args, "--method", method, *extra, "--device", "cpu", "--out", str(out),
                 "--recipe", str(recipe)]) == 0
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
        (["--expert", "=x.safetensors"], "non-empty name and path"),
        (["--cal-set", "alpha=0.5"], "calibrate_hparams were given but no calibration was chosen"),
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
    with pytest.raises(CheckpointError, match="recipe field 'seed' must be an integer"):
        Recipe.from_dict({"method": "dare", "seed": "1"})
    with pytest.raises(CheckpointError, match="recipe field 'preferences' must be a mapping"):
        Recipe.from_dict({"method": "ties", "preferences": [1, 2]})
    assert Recipe.from_dict({"method": "ties", "hparams": None, "experts": None}) == Recipe(method="ties")
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) \['1', 'zz'\]"):
        Recipe.from_dict({"method": "ties", 1: 2, "zz": 3})


def test_save_state_dict_checks_entries_and_copies_tied_tensors(tmp_path):
    w = torch.ones(4)
    save_state_dict(tmp_path / "tied.safetensors", {"a": w, "b": w})   # tied weights: safetensors refuses them
    loaded = load_state_dict(tmp_path / "tied.safetensors")
    assert torch.equal(loaded["a"], w) and torch.equal(loaded["b"], w)
    with pytest.raises(CheckpointError, match=r"cannot save 'a' .*expected a tensor, got list"):
        save_state_dict(tmp_path / "x.safetensors", {"a": [1.0]})
    with pytest.raises(CheckpointError, match="keys must be strings"):
        save_state_dict(tmp_path / "x.safetensors", {1: w})
    # a failed write leaves neither the file nor the folders made for it
    with pytest.raises(TypeError):
        save_state_dict(tmp_path / "new" / "sub" / "x.safetensors", {"a": w}, metadata={"k": 1})   # not a str
    assert not (tmp_path / "new").exists()
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
