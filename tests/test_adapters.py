"""PEFT LoRA adapters as experts (``studio.adapters``): against ``peft``'s own ``merge_and_unload`` (the
``crosscheck`` extra pins ``peft`` 0.21.2), through the CLI and its recipes, from the Hub's cache, and
the errors that name what is wrong."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from studio import adapters
from studio.cli import main as cli
from studio.io import CheckpointError, load_state_dict

from .conftest import hub_cache, require_or_skip_module


def _need_peft() -> None:
    """``peft`` comes with the ``crosscheck`` extra (pinned): its tests skip without it locally, fail under CI."""
    require_or_skip_module(None if importlib.util.find_spec("peft") else "peft is not importable",
                           "pip install -e '.[crosscheck]'")


@pytest.fixture(scope="module")
def hf_lora(tmp_path_factory) -> Path:
    """A small ``transformers.CLIPVisionModel`` saved as the base, three LoRA adapters of it trained to random
    values by ``peft`` (each with other settings: rank and alpha patterns, rsLoRA, ``lora_bias``, trained biases,
    ``modules_to_save``), and ``peft``'s own ``merge_and_unload`` of each, saved as full weights."""
    _need_peft()
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("hf_lora")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)
    CLIPVisionModel(config).save_pretrained(root / "base")
    settings = {
        "cars": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"], rank_pattern={"fc1": 2},
                     alpha_pattern={"layers.1.mlp.fc1": 3}, bias="lora_only", modules_to_save=["post_layernorm"]),
        "dtd": dict(r=6, lora_alpha=4, use_rslora=True, target_modules=["k_proj", "out_proj", "fc2"]),
        "eurosat": dict(r=3, lora_alpha=6, target_modules=["q_proj", "fc1", "fc2"], lora_bias=True),
    }
    for i, (name, kwargs) in enumerate(settings.items()):
        torch.manual_seed(10 + i)
        model = get_peft_model(CLIPVisionModel.from_pretrained(root / "base"), LoraConfig(**kwargs))
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.05)
        model.save_pretrained(root / f"lora_{name}")
        merged = model.merge_and_unload().state_dict()
        save_file({k: v.contiguous() for k, v in merged.items()}, root / f"full_{name}.safetensors")
    return root


def _relative(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor) -> float:
    moved = float((theirs.double() - base.double()).norm())
    return float((ours.double() - theirs.double()).norm()) / moved if moved else float((ours != theirs).any())


def test_an_adapter_is_the_expert_peft_merges(hf_lora):
    """Every tensor as ``peft``'s ``merge_and_unload`` makes it, to float32's rounding of the sum: the adapted
    weights, the trained and the ``lora_bias`` biases, ``modules_to_save``; the rest the base's own bits."""
    base = load_state_dict(hf_lora / "base")
    for name in ("cars", "dtd", "eurosat"):
        ours, pinned = adapters.load_adapter(hf_lora / f"lora_{name}", base)
        theirs = load_state_dict(hf_lora / f"full_{name}.safetensors")
        assert pinned == str((hf_lora / f"lora_{name}").resolve()) and list(ours) == list(base)
        changed = [k for k in base if not torch.equal(theirs[k], base[k])]
        assert changed and [k for k in base if not torch.equal(ours[k], base[k])] == changed, name
        for k in base:
            assert ours[k].dtype == base[k].dtype and ours[k].shape == base[k].shape
            assert _relative(ours[k], theirs[k], base[k]) < 1e-6, (name, k)
    cars = adapters.load_adapter(hf_lora / "lora_cars", base)[0]
    assert not torch.equal(cars["post_layernorm.weight"], base["post_layernorm.weight"])   # modules_to_save
    assert not torch.equal(cars["encoder.layers.0.mlp.fc1.bias"], base["encoder.layers.0.mlp.fc1.bias"])


def test_an_adapter_finds_its_modules_under_the_bases_prefix_and_leaves_out_other_towers(hf_lora):
    """The same expert from a base whose names carry a prefix (``vision_model.``, a whole model's checkpoint); a
    base read under a prefix leaves out the adapter's tensors for tensors it does not hold, which without a prefix
    are refused by name."""
    base = load_state_dict(hf_lora / "base")
    plain = adapters.load_adapter(hf_lora / "lora_cars", base)[0]
    prefixed = adapters.load_adapter(hf_lora / "lora_cars", {f"vision_model.{k}": v for k, v in base.items()})[0]
    assert all(torch.equal(prefixed[f"vision_model.{k}"], v) for k, v in plain.items())
    fewer = {k: v for k, v in base.items() if not k.startswith("encoder.layers.1.")}   # one layer less
    with pytest.raises(CheckpointError, match=r"'base_model\.model\.encoder\.layers\.1\..*the base does not hold"):
        adapters.load_adapter(hf_lora / "lora_cars", fewer)
    part = adapters.load_adapter(hf_lora / "lora_cars", fewer, prefix="encoder.layers.0.")[0]
    assert all(torch.equal(part[k], plain[k]) for k in fewer)


def test_the_cli_merges_adapters_as_their_full_weights_and_replays_them(hf_lora, tmp_path):
    """``merge --expert NAME=ADAPTER_FOLDER``: the merge of ``peft``'s full weights (to float32 rounding), a recipe
    that records the adapters' folders and replays the same bytes."""
    names = ("cars", "dtd", "eurosat")
    lora = [arg for n in names for arg in ("--expert", f"{n}={hf_lora / f'lora_{n}'}")]
    full = [arg for n in names for arg in ("--expert", f"{n}={hf_lora / f'full_{n}.safetensors'}")]
    for method in ("iso_c", "ties"):
        common = ["merge", "--base", str(hf_lora / "base"), "--method", method]
        assert cli([*common, *lora, "--out", str(tmp_path / f"{method}_lora.safetensors"),
                    "--recipe", str(tmp_path / f"{method}.yaml")]) == 0
        assert cli([*common, *full, "--out", str(tmp_path / f"{method}_full.safetensors")]) == 0
        base = load_state_dict(hf_lora / "base")
        ours = load_state_dict(tmp_path / f"{method}_lora.safetensors")
        theirs = load_state_dict(tmp_path / f"{method}_full.safetensors")
        assert max(_relative(ours[k], theirs[k], base[k]) for k in base) < 1e-5, method
    recipe = (tmp_path / "iso_c.yaml").read_text()
    assert str((hf_lora / "lora_dtd").resolve()) in recipe
    assert cli(["recipe", str(tmp_path / "iso_c.yaml"), "--out", str(tmp_path / "again.safetensors")]) == 0
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "iso_c_lora.safetensors").read_bytes()


def _adapter(folder: Path, config: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / adapters.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({f"base_model.model.{k}": v.clone().contiguous() for k, v in tensors.items()},
              folder / adapters.ADAPTER_WEIGHTS)
    return folder


def test_the_scaling_the_patterns_and_fan_in_fan_out_by_hand(tmp_path):
    """``W0 + alpha / r * B A`` (rsLoRA: ``/ sqrt(r)``); a pattern matches a module's name or its end after a dot,
    the first in the file's order; ``fan_in_fan_out`` (GPT-2's ``Conv1D``, weights ``[in, out]``) transposes."""
    torch.manual_seed(0)
    base = {"h.0.attn.w.weight": torch.randn(5, 3), "h.1.attn.w.weight": torch.randn(5, 3),
            "h.0.mlp.weight": torch.randn(3, 5)}
    A, B = torch.randn(2, 3), torch.randn(5, 2)
    lora = {"h.0.attn.w.lora_A.weight": A, "h.0.attn.w.lora_B.weight": B,
            "h.1.attn.w.lora_A.weight": A, "h.1.attn.w.lora_B.weight": B}
    expert = adapters.load_adapter(_adapter(tmp_path / "a", {"r": 2, "lora_alpha": 3, "alpha_pattern": {
        "1.attn.w": 8, "attn.w": 5}}, lora), base)[0]
    for layer, alpha in ((0, 5), (1, 8)):   # "1.attn.w" does not end h.0's name after a dot; "attn.w" does
        want = base[f"h.{layer}.attn.w.weight"].double() + alpha / 2 * (B.double() @ A.double())
        assert torch.equal(expert[f"h.{layer}.attn.w.weight"], want.float())
    rs = adapters.load_adapter(_adapter(tmp_path / "b", {"r": 2, "lora_alpha": 3, "use_rslora": True}, lora), base)[0]
    want = base["h.0.attn.w.weight"].double() + 3 / math.sqrt(2) * (B.double() @ A.double())
    assert torch.equal(rs["h.0.attn.w.weight"], want.float())
    conv = adapters.load_adapter(_adapter(tmp_path / "c", {"r": 2, "lora_alpha": 2, "fan_in_fan_out": True}, {
        "h.0.mlp.lora_A.weight": A, "h.0.mlp.lora_B.weight": B}), base)[0]
    assert torch.equal(conv["h.0.mlp.weight"], (base["h.0.mlp.weight"].double() + (B.double() @ A.double()).T).float())


@pytest.mark.parametrize("config, tensors, message", [
    ({"peft_type": "IA3", "r": 2, "lora_alpha": 2}, {}, r"peft_type is 'IA3'; only LoRA"),
    ({"r": 2, "lora_alpha": 2, "use_dora": True}, {}, r"use_dora is set"),
    ({"r": 0, "lora_alpha": 2}, {}, r"r must be a positive integer \(a rank\), got 0"),
    ({"r": 2, "lora_alpha": 2}, {"fc.lora_A.weight": torch.ones(2, 3), "fc.lora_B.weight": torch.ones(4, 2)},
     r"lora_B\.weight @ lora_A\.weight has shape \(4, 3\), but the base's 'fc\.weight' is \(2, 3\)"),
    ({"r": 3, "lora_alpha": 2}, {"fc.lora_A.weight": torch.ones(2, 3), "fc.lora_B.weight": torch.ones(2, 2)},
     r"module 'fc' has rank 2 tensors, but its settings give r = 3"),
    ({"r": 2, "lora_alpha": 2}, {"fc.lora_A.weight": torch.ones(2, 3)}, r"module 'fc' has \['lora_A\.weight'\]"),
    ({"r": 2, "lora_alpha": 2}, {"fc.lora_magnitude_vector": torch.ones(2)},
     r"'base_model\.model\.fc\.lora_magn.*DoRA"),
    ({"r": 2, "lora_alpha": 2}, {"head.lora_A.weight": torch.ones(2, 3), "head.lora_B.weight": torch.ones(2, 2)},
     r"'base_model\.model\.head\.lora_A\.weight' is for 'head\.weight', which the base does not hold"),
])
def test_bad_adapters_are_refused_by_name(tmp_path, config, tensors, message):
    base = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
    folder = _adapter(tmp_path / "adapter", config, tensors or {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=message):
        adapters.load_adapter(folder, base)


FC = {"fc.lora_A.weight": torch.ones(2, 3), "fc.lora_B.weight": torch.ones(2, 2)}


@pytest.mark.parametrize("config, tensors, message", [
    # a pattern's value was read with float(): "x" raised a bare ValueError, -4 and "4" merged, NaN made NaN weights
    *[({"alpha_pattern": {"fc": value}}, FC, rf"alpha_pattern\['fc'\] must be a positive finite number, got {shown}")
      for value, shown in (("x", "'x'"), (None, "None"), (-4, "-4"), ("4", "'4'"), (float("nan"), "nan"))],
    ({"rank_pattern": {"fc": 1.5}}, FC, r"rank_pattern\['fc'\] must be a positive integer \(a rank\), got 1.5"),
    # a key is a regular expression to peft: a bad one raised a bare re.error
    ({"alpha_pattern": {"[": 1}}, FC, r"alpha_pattern key '\[' is not a regular expression \(unterminated"),
    ({"lora_alpha": float("inf")}, FC, r"lora_alpha must be a positive finite number, got inf"),
    ({"lora_alpha": 10**400}, FC, r"lora_alpha must be a positive finite number, got 1000"),
    # flags were read by truth: "no" turned rsLoRA on, "false" turned the weights into the wrong model's
    ({"use_rslora": "no"}, FC, r"use_rslora must be true or false, got 'no'"),
    ({"fan_in_fan_out": "false"}, FC, r"fan_in_fan_out must be true or false, got 'false'"),
    ({"use_dora": 0}, FC, r"use_dora must be true or false, got 0"),
    ({}, {**FC, "fc.lora_A.weight": torch.full((2, 3), float("nan"))},
     r"adapter_model.safetensors: tensor 'base_model\.model\.fc\.lora_A\.weight' holds NaN or infinite values"),
    # integer factors were cast and applied (peft never writes them), an integer bias replaced a float one
    ({}, {**FC, "fc.lora_B.weight": torch.ones(2, 2, dtype=torch.int32)},
     r"tensor 'base_model\.model\.fc\.lora_B\.weight' is torch.int32; a LoRA factor is floating-point"),
    ({}, {**FC, "fc.bias": torch.ones(2, dtype=torch.int64)},
     r"tensor 'base_model\.model\.fc\.bias' is torch.int64, but the base's 'fc\.bias' it replaces is torch.float32"),
])
def test_bad_adapter_settings_and_values_are_refused_by_name(tmp_path, config, tensors, message):
    base = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
    folder = _adapter(tmp_path / "adapter", {"r": 2, "lora_alpha": 2, **config}, tensors)
    with pytest.raises(CheckpointError, match=message):
        adapters.load_adapter(folder, base)
    assert adapters.load_adapter(_adapter(tmp_path / "good", {"r": 2, "lora_alpha": 2, "use_rslora": False,
                                                              "fan_in_fan_out": None}, FC), base)[0]


def test_load_adapter_checks_its_arguments(tmp_path):
    folder = _adapter(tmp_path / "a", {"r": 2, "lora_alpha": 2}, FC)
    with pytest.raises(CheckpointError, match=r"the base an adapter applies to must be a state dict .* got None"):
        adapters.load_adapter(folder, None)
    with pytest.raises(CheckpointError, match=r"prefix must be text .* got 3"):
        adapters.load_adapter(folder, {"fc.weight": torch.zeros(2, 3)}, prefix=3)


def test_an_adapted_weight_beyond_a_half_precision_bases_range_is_refused_with_its_size(tmp_path):
    """The sum is formed in float64 and rounded once to the base's dtype: where that would make it infinite, the
    error names the tensor, how large it is and the dtype's largest value (as a checkpoint's conversion does)."""
    base = {"fc.weight": torch.zeros(2, 3, dtype=torch.float16), "fc.bias": torch.zeros(2, dtype=torch.float16)}
    folder = _adapter(tmp_path / "a", {"r": 2, "lora_alpha": 2},
                      {"fc.lora_A.weight": torch.full((2, 3), 300.0), "fc.lora_B.weight": torch.full((2, 2), 300.0)})
    with pytest.raises(CheckpointError, match=r"the adapted 'fc\.weight' holds values up to 1\.8e\+05 in magnitude, "
                                              r"beyond torch\.float16's range \(largest 6\.55e\+04\), the base's"):
        adapters.load_adapter(folder, base)
    assert adapters.load_adapter(folder, {k: v.bfloat16() for k, v in base.items()})[0]["fc.weight"].isfinite().all()


def test_an_adapter_folder_without_weights_and_a_non_adapter_are_named(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / adapters.ADAPTER_CONFIG).write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds adapter_config\.json but not adapter_model\.safetensors"):
        adapters.load_adapter(tmp_path / "a", {})
    save_file({"w": torch.zeros(1)}, tmp_path / "w.safetensors")
    assert adapters.adapter_files(tmp_path / "w.safetensors") is None
    with pytest.raises(CheckpointError, match=r"not a PEFT adapter"):
        adapters.load_adapter(tmp_path / "w.safetensors", {"w": torch.zeros(1)})
    # settings nested too deeply to read: a traceback before (an audit of the CLI)
    save_file({"w": torch.zeros(1)}, tmp_path / "a" / adapters.ADAPTER_WEIGHTS)
    (tmp_path / "a" / adapters.ADAPTER_CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: its JSON is nested too deeply to read"):
        adapters.load_adapter(tmp_path / "a", {"w": torch.zeros(1)})


def test_an_adapter_from_the_hub_cache_is_pinned_to_its_commit(tmp_path, offline_hub, monkeypatch):
    """A Hub repository holding an adapter, read from huggingface_hub's cache offline (``HF_HUB_OFFLINE``, the
    layout a download leaves), recorded as ``hf://owner/name@<commit>``; the CLI's merge reads it as an expert."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    torch.manual_seed(0)
    base = {"fc.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)}
    A, B = torch.randn(1, 3), torch.randn(4, 1)
    src = _adapter(tmp_path / "src", {"r": 1, "lora_alpha": 1}, {"fc.lora_A.weight": A, "fc.lora_B.weight": B})
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache(src, cache, "someone/fc-lora", commit)
    expert, pinned = adapters.load_adapter("someone/fc-lora", base)
    assert pinned == f"hf://someone/fc-lora@{commit}"
    assert torch.equal(expert["fc.weight"], (base["fc.weight"].double() + B.double() @ A.double()).float())
    assert adapters.adapter_files("someone/other") is None   # not cached: load_checkpoint says why
    save_file(base, tmp_path / "base.safetensors")
    save_file({"fc.weight": base["fc.weight"] * 2, "fc.bias": base["fc.bias"]}, tmp_path / "twice.safetensors")
    assert cli(["merge", "--base", str(tmp_path / "base.safetensors"), "--expert", "lora=someone/fc-lora",
                "--expert", f"twice={tmp_path / 'twice.safetensors'}", "--method", "task_arithmetic",
                "--set", "alpha=1", "--out", str(tmp_path / "m.safetensors")]) == 0
    merged = load_state_dict(tmp_path / "m.safetensors")
    assert torch.allclose(merged["fc.weight"], expert["fc.weight"] + base["fc.weight"], atol=1e-6)


def test_adapters_merge_the_same_on_their_base_and_on_a_zero_one(hf_lora):
    """An adapter's expert is ``round(W0 + B A)``: a low-rank task matrix plus the weights' float32 rounding, which
    the spectral methods' rank rules leave out (docs/ENGINE.md, "Null spaces"). The merge's delta on the real base
    is then the merge of the same adapters on a zero base (measured: 3.6e-7 to 2.9e-6 of its size); TSV-M's
    ``svd_mode="exact"``, the official loop, whitens the rounding directions in (three other adapters of this model
    merged 0.83 apart)."""
    import studio

    base = load_state_dict(hf_lora / "base")
    zero = {k: torch.zeros_like(v) for k, v in base.items()}
    names = ("cars", "dtd", "eurosat")

    def delta(on: dict, method: str) -> dict:
        merged = studio.merge(on, {n: adapters.load_adapter(hf_lora / f"lora_{n}", on)[0] for n in names}, method)
        return {k: merged[k].double() - on[k].double() for k in on}

    for method in ("iso_c", "iso_cts", "tsv_m", "align_merge_o"):
        a, b = delta(base, method), delta(zero, method)
        # the matrices (cars' trained biases and post_layernorm replace the base's: absolute values, not deltas)
        worst = max(float((a[k] - b[k]).norm() / b[k].norm()) for k in base if b[k].dim() == 2 and b[k].any())
        assert worst < 1e-5, (method, worst)


def test_a_suite_expert_may_be_an_adapter_folder(tmp_path):
    """``experts/<task>/`` holding an adapter in place of ``experts/<task>.safetensors``: the suite reads it as the
    expert it makes of the suite's base, names it as that expert's source, and merges and evaluates it; the CLI's
    merge of the suite takes it too. MiniSuite's digits expert is replaced by a rank-4 adapter (its own top-4
    singular directions of each attention output and MLP layer)."""
    import shutil

    import studio
    from studio.evaluate import evaluate
    from studio.suite import SuiteError, default_suite, load_suite

    mini = default_suite()
    root = tmp_path / "lora_suite"
    shutil.copytree(mini.root, root)
    (root / "experts" / "digits.safetensors").unlink()
    base, digits = mini.base, mini.experts["digits"]
    tensors, want = {}, dict(base)
    for key in base:
        if key.endswith(("attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")):
            U, S, Vh = torch.linalg.svd((digits[key] - base[key]).double(), full_matrices=False)
            module = key[len("visual."):-len(".weight")]
            tensors[f"{module}.lora_B.weight"] = (U[:, :4] * S[:4]).float()
            tensors[f"{module}.lora_A.weight"] = Vh[:4].float()
            delta = tensors[f"{module}.lora_B.weight"].double() @ tensors[f"{module}.lora_A.weight"].double()
            want[key] = (base[key].double() + delta * 2 / 4).float()
    _adapter(root / "experts" / "digits", {"r": 4, "lora_alpha": 2}, tensors)
    suite = load_suite(root)
    assert suite.weight_files["experts"]["digits"] == str(root / "experts" / "digits")
    got = suite.experts["digits"]
    assert list(got) == list(base) and all(torch.equal(got[k], want[k]) for k in base)
    assert torch.equal(suite.experts["signs"]["visual.proj"], mini.experts["signs"]["visual.proj"])
    merged = studio.merge(suite.base, suite.experts, "iso_c")
    result = evaluate(suite, merged, tasks=["digits", "signs"], split="test")
    assert set(result.accuracy) == {"digits", "signs"} and all(0 <= a <= 100 for a in result.accuracy.values())
    assert cli(["merge", "--suite", str(root), "--method", "task_arithmetic", "--out",
                str(tmp_path / "m.safetensors")]) == 0
    (root / "experts" / "digits" / adapters.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4,
                                                                                    "lora_alpha": 2, "use_dora": True}))
    with pytest.raises(SuiteError, match=r"expert 'digits': .*use_dora is set"):
        load_suite(root).experts_named(["digits"])


def test_a_head_trained_in_full_outside_the_base_is_left_out_with_a_warning(tmp_path):
    """``modules_to_save=["classifier"]`` (an image-classification LoRA): the head is not part of the encoder that is
    merged, so it is left out, named in a warning; the LoRA layers still apply."""
    base = {"fc.weight": torch.zeros(2, 3)}
    folder = _adapter(tmp_path / "a", {"r": 1, "lora_alpha": 1}, {
        "fc.lora_A.weight": torch.ones(1, 3), "fc.lora_B.weight": torch.ones(2, 1),
        "classifier.weight": torch.ones(10, 2)})
    with pytest.warns(UserWarning, match=r"left out 1 tensor.*'classifier\.weight'"):
        expert, _ = adapters.load_adapter(folder, base)
    assert list(expert) == ["fc.weight"] and expert["fc.weight"].eq(1).all()


def test_an_open_clip_adapter_is_read_and_one_of_multihead_attention_refused(tmp_path):
    """MiniSuite's open_clip tower with ``peft``: LoRA on ``out_proj``, ``c_fc`` and ``c_proj`` (``Linear`` layers)
    gives the expert ``peft`` merges, matched to the suite's ``visual.`` names; LoRA on ``attn`` (peft's
    ``MultiheadAttention``) is refused by name: ``peft`` 0.21.2 adds its ``out_proj`` delta twice, in its merge and in
    its forward pass (huggingface/peft#3774), which is measured here too."""
    _need_peft()
    import copy

    from peft import LoraConfig, get_peft_model

    from studio.suite import default_suite

    suite = default_suite()
    for name, targets in (("linear", ["out_proj", "c_fc", "c_proj"]), ("mha", ["attn"])):
        torch.manual_seed(0)
        model = get_peft_model(suite.build_model(suite.base), LoraConfig(r=2, lora_alpha=4, target_modules=targets))
        with torch.no_grad():
            for _, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.05)
        model.save_pretrained(tmp_path / name)
        theirs = {f"visual.{k}": v for k, v in copy.deepcopy(model).merge_and_unload().state_dict().items()}
        if name == "linear":
            ours = adapters.load_adapter(tmp_path / name, suite.base)[0]
            assert [k for k in ours if not torch.equal(ours[k], suite.base[k])] == \
                [k for k in theirs if not torch.equal(theirs[k], suite.base[k])]
            assert max(_relative(ours[k], theirs[k], suite.base[k]) for k in ours) < 1e-6
            continue
        with pytest.raises(CheckpointError, match=r"attn\.base_layer\.out_proj' is part of a LoRA of "
                                                  r"nn\.MultiheadAttention.*twice.*records 0\.\d+"):
            adapters.load_adapter(tmp_path / name, suite.base)
        attn = model.base_model.model.transformer.resblocks[0].attn
        out = attn.base_layer.out_proj
        once = out.get_delta_weight("default")
        key = "visual.transformer.resblocks.0.attn.out_proj.weight"
        assert torch.allclose(theirs[key] - suite.base[key], 2 * once, atol=1e-6), \
            "peft's merge now adds out_proj's delta once (huggingface/peft#3774 fixed?): its adapters could be read"


def test_an_adapter_of_one_tower_is_placed_under_one_prefix_and_refused_where_two_fit(tmp_path):
    """An adapter's module names are relative to the part of the model PEFT wrapped: one of open_clip's visual
    tower reads ``transformer.resblocks...``, the text tower's own names in a whole-model checkpoint. Where the
    towers have one width (ViT-S-32) it was applied to the text tower, changing nothing of the visual one (an I/O
    audit); where they differ it was refused as "for another model". The adapter is placed as one now: under the one
    prefix where the base holds every module with the adapter's shapes, refused (naming them) where several do."""
    torch.manual_seed(0)
    A0, B0, A1, B1 = torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 3), torch.randn(5, 2)
    lora = {"transformer.l0.lora_A.weight": A0, "transformer.l0.lora_B.weight": B0,
            "transformer.l1.lora_A.weight": A1, "transformer.l1.lora_B.weight": B1}
    folder = _adapter(tmp_path / "visual", {"r": 2, "lora_alpha": 2}, lora)
    one_width = {f"{p}transformer.l{i}.weight": torch.zeros(rows, 3) for p in ("", "visual.")
                 for i, rows in ((0, 4), (1, 5))}
    with pytest.raises(CheckpointError, match=r"the adapter's 2 LoRA modules fit the base under each of '' and "
                                              r"'visual\.'.*read the base under the prefix of the part it was trained"):
        adapters.load_adapter(folder, one_width)
    visual = adapters.load_adapter(folder, {k: v for k, v in one_width.items() if k.startswith("visual.")},
                                   prefix="visual.")[0]   # read under its prefix, as the CLI's --prefix visual.
    assert torch.equal(visual["visual.transformer.l0.weight"], (B0.double() @ A0.double()).float())
    two_widths = {**one_width, "transformer.l0.weight": torch.zeros(6, 3), "transformer.l1.weight": torch.zeros(6, 3)}
    expert = adapters.load_adapter(folder, two_widths)[0]   # only the visual tower holds the adapter's shapes
    assert torch.equal(expert["visual.transformer.l1.weight"], (B1.double() @ A1.double()).float())
    assert all(torch.equal(expert[k], two_widths[k]) for k in ("transformer.l0.weight", "transformer.l1.weight"))
    # an adapter of the whole model names both towers: the names as they are are its only placement
    whole = _adapter(tmp_path / "whole", {"r": 2, "lora_alpha": 2}, {
        **lora, "visual.transformer.l0.lora_A.weight": A0, "visual.transformer.l0.lora_B.weight": B0})
    expert = adapters.load_adapter(whole, one_width)[0]
    assert all(not torch.equal(expert[k], one_width[k]) for k in ("transformer.l0.weight", "transformer.l1.weight",
                                                                  "visual.transformer.l0.weight"))
    assert torch.equal(expert["visual.transformer.l1.weight"], one_width["visual.transformer.l1.weight"])


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_an_adapter_initialised_by_changing_the_base_is_refused(tmp_path, init):
    """PiSSA, OLoRA and CorDA subtract the initial factors' product from the base weights, LoftQ quantises them:
    such an adapter is relative to that changed base, and applied to the original one it gave an expert 0.32 from
    the fine-tuned model, which had moved 0.13 (an I/O audit). peft converts them to a plain LoRA on saving
    (``init_lora_weights: true``), which is read; the initialisations that leave the base alone are read too."""
    base = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=rf"init_lora_weights is '{init}', which changes the base's weights"):
        adapters.load_adapter(_adapter(tmp_path / init, {"r": 2, "lora_alpha": 2, "init_lora_weights": init}, FC), base)
    for kept in (True, False, "gaussian", "eva"):
        folder = _adapter(tmp_path / f"kept_{kept}", {"r": 2, "lora_alpha": 2, "init_lora_weights": kept}, FC)
        assert torch.equal(adapters.load_adapter(folder, base)[0]["fc.weight"], torch.full((2, 3), 2.0))


def test_an_adapter_of_the_whole_model_on_a_base_read_under_a_prefix_leaves_the_other_parts_out(tmp_path):
    """An adapter of a whole open_clip model names both towers' modules (``visual.transformer.l1``,
    ``transformer.l0``); with the base read under ``visual.`` the text module matched the visual weight of its name
    by the end of it where the towers have one width, and changed it. Now an adapter that names modules under the
    base's prefix is read by its names alone, the other parts' left out."""
    torch.manual_seed(1)
    A0, B0, A1, B1 = torch.randn(2, 3), torch.randn(4, 2), torch.randn(2, 3), torch.randn(4, 2)
    folder = _adapter(tmp_path / "whole", {"r": 2, "lora_alpha": 2}, {
        "visual.transformer.l1.lora_A.weight": A1, "visual.transformer.l1.lora_B.weight": B1,
        "transformer.l0.lora_A.weight": A0, "transformer.l0.lora_B.weight": B0})
    base = {f"visual.transformer.l{i}.weight": torch.zeros(4, 3) for i in range(2)}
    expert = adapters.load_adapter(folder, base, prefix="visual.")[0]
    assert torch.equal(expert["visual.transformer.l1.weight"], (B1.double() @ A1.double()).float())
    assert torch.equal(expert["visual.transformer.l0.weight"], base["visual.transformer.l0.weight"])
