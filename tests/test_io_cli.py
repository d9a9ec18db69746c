"""The command line and recipes reproduce exactly what the library merges (real safetensors files, the CLI's own
argument parsing), including the per-method layer rules, the SVD mode and custom layer rules."""

from __future__ import annotations

import pytest
import torch

import studio
from studio.cli import main
from studio.io import (RECIPE_METADATA_KEY, Recipe, load_state_dict, merge_from_recipe, read_metadata, save_merged,
                       save_state_dict)
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
