"""Seeded random inputs through the public API: the invariants every call must keep, whatever the input.

A fuzz audit of `studio.merge`, `studio.compress` and recipes (about 50,000 random cases) found a recipe that could
not be replayed (``5e-05`` read back as text) and diagnostics that raised torch's error on an integer buffer. These
tests keep its invariants over a few hundred seeded cases of every kind it drew: CLIP-like keys, 1-D to 4-D shapes
(``2 x 2``, ``1 x n``), every float dtype and integer buffers, 1-6 experts of mixed scales that are zero, low rank,
identical, opposite or collinear, every method and calibration with random in-range hyperparameters, preferences,
layer rules and both SVD modes. A case either merges or raises a :class:`studio.StudioError`; a merge keeps the base's
keys, shapes and dtypes, is finite for moderate inputs, gives the same bits again (warm and on a fresh pool), and
leaves its inputs as they were. A failure names its case (``case 1234``): ``_case(1234)`` rebuilds it.
"""

from __future__ import annotations

import random

import pytest
import torch

import studio
from studio import diagnostics as D
from studio.io import Recipe

KEYS = ("visual.transformer.resblocks.{i}.attn.in_proj_weight", "visual.transformer.resblocks.{i}.attn.in_proj_bias",
        "visual.transformer.resblocks.{i}.mlp.c_fc.weight", "visual.transformer.resblocks.{i}.ln_1.weight",
        "text_projection", "positional_embedding", "visual.class_embedding", "visual.conv1.weight", "visual.proj",
        "token_embedding.weight", "logit_scale", "w{i}")
SPECS = {m["name"]: m for m in studio.list_methods() if m["kind"] == "merge"}
CALIBRATIONS = {m["name"]: m for m in studio.list_methods() if m["kind"] == "calibration"}
CHUNKS, PER_CHUNK = 8, 40


def _shape(rng: random.Random) -> tuple[int, ...]:
    r, d = rng.random(), lambda lo, hi: rng.randint(lo, hi)
    if r < 0.15:
        return (d(1, 40),)
    if r < 0.75:
        m = d(2, 40)
        return (m, m) if rng.random() < 0.2 else (m, d(2, 40))
    if r < 0.82:
        return (2, 2)
    if r < 0.88:
        return (1, d(2, 20)) if rng.random() < 0.5 else (d(2, 20), 1)
    if r < 0.94:
        return (d(1, 4), d(1, 6), d(1, 6))
    return (d(1, 4), 3, d(1, 3), d(1, 3))


def _task_vector(rng: random.Random, g: torch.Generator, shape: tuple[int, ...], previous: list[torch.Tensor]):
    scale = 10 ** rng.uniform(-6, 1)
    kind = rng.choice(["gauss"] * 4 + ["zero", "lowrank", "same", "opposite", "collinear"])
    if kind in ("same", "opposite", "collinear") and previous:
        factor = {"same": 1.0, "opposite": -1.0, "collinear": rng.uniform(1e-3, 3)}[kind]
        return factor * previous[-1]
    if kind == "zero":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "lowrank" and len(shape) == 2:
        r = rng.randint(1, max(1, min(shape) // 2))
        return scale * torch.randn(shape[0], r, generator=g, dtype=torch.float64) @ \
            torch.randn(r, shape[1], generator=g, dtype=torch.float64)
    return scale * torch.randn(shape, generator=g, dtype=torch.float64)


def _hparams(rng: random.Random, params: list[dict]) -> dict:
    out = {}
    for p in params:
        if rng.random() < 0.4:   # the default (or the method's automatic value)
            continue
        if p["type"] == "bool":
            out[p["name"]] = rng.random() < 0.5
        elif p["choices"]:
            out[p["name"]] = rng.choice(list(p["choices"]))
        else:
            low = p["low"] if p["low"] is not None else -10.0
            high = p["high"] if p["high"] is not None else 10.0
            if p["type"] == "int":
                out[p["name"]] = rng.randint(int(low) + bool(p["low_open"]), int(min(high, low + 64)))
            else:
                value = rng.choice([low, high, rng.uniform(low, high), rng.uniform(low, min(high, low + 0.1)),
                                    low + (high - low) * 10.0 ** -rng.randint(5, 7)])   # e.g. 5e-05
                out[p["name"]] = value if not (p["low_open"] and value == low) else (low + high) / 2
    return out


def _case(case: int) -> dict:
    """The inputs and keyword arguments of one case, from its number alone."""
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    dtype = rng.choice([torch.float32] * 3 + [torch.float16, torch.bfloat16, torch.float64])
    names = rng.sample(["digits", "cars", "dtd", "svhn", "t0", "t1", "Ä"], rng.randint(1, 6))
    base, experts = {}, {n: {} for n in names}
    for _ in range(rng.randint(1, 4)):
        key = rng.choice(KEYS).format(i=rng.randint(0, 3))
        shape = _shape(rng)
        b = rng.choice([0.0, 0.02, 1.0, 10.0]) * torch.randn(shape, generator=g, dtype=torch.float64)
        base[key] = b.to(dtype)
        previous: list[torch.Tensor] = []
        for n in names:
            previous.append(_task_vector(rng, g, shape, previous))
            experts[n][key] = (b + previous[-1]).to(dtype)
    if rng.random() < 0.3:   # an integer or bool buffer (BatchNorm's num_batches_tracked, an attention mask)
        key, buffer = rng.choice([("num_batches_tracked", torch.tensor(7)), ("attn_mask", torch.ones(3, 3).bool()),
                                  ("position_ids", torch.arange(12).reshape(3, 4))])
        base[key] = buffer
        for n in names:
            experts[n][key] = buffer.clone()
    method = rng.choice(sorted(SPECS))
    calibrate = rng.choice([None, None, *sorted(CALIBRATIONS)])
    kwargs = dict(_hparams(rng, SPECS[method]["params"]), calibrate=calibrate,
                  svd_mode=rng.choice(["auto", "exact"]), seed=rng.randint(0, 99),
                  layer_rule=rng.choice([None, None, "default", "skip_embeddings", "all_matrices"]))
    if calibrate:
        kwargs["calibrate_hparams"] = _hparams(rng, CALIBRATIONS[calibrate]["params"])
    if rng.random() < 0.3:
        weights = lambda: rng.choice([0.0, 1.0, rng.uniform(0, 5), 10.0 ** -rng.randint(5, 7)])   # noqa: E731
        kwargs["preferences"] = {n: weights() for n in names}
    return {"base": base, "experts": experts, "method": method, "kwargs": kwargs}


def _clone(sd: dict) -> dict:
    return {k: v.clone() for k, v in sd.items()}


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                                                     b.view(-1).view(torch.uint8) if b.numel() else b)


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_merges_either_refuse_clearly_or_keep_every_invariant(chunk):
    """40 cases per chunk (see the module's docstring for the invariants)."""
    merged_count = 0
    for case in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        c = _case(case)
        base, experts, method, kwargs = c["base"], c["experts"], c["method"], c["kwargs"]
        before = (_clone(base), {n: _clone(sd) for n, sd in experts.items()})
        where = f"case {case}: {method} {kwargs}"
        try:
            merged = studio.merge(base, experts, method, **kwargs)
        except studio.StudioError as exc:
            assert str(exc), where
            continue
        except Exception as exc:   # noqa: BLE001 -- the invariant under test
            pytest.fail(f"{where}: {type(exc).__name__} instead of a StudioError: {exc}")
        merged_count += 1
        assert list(merged) == list(base), where
        for key, t in merged.items():
            assert (t.shape, t.dtype) == (base[key].shape, base[key].dtype), f"{where}: {key}"
        if base[next(iter(base))].dtype == torch.float32 and all(
                float((sd[k].double() - base[k].double()).abs().max()) <= 100
                for sd in experts.values() for k in base if base[k].is_floating_point()):
            assert all(bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point()), where
        again = studio.merge(base, experts, method, **kwargs)
        studio.engine.clear_pools()
        fresh = studio.merge(base, experts, method, **kwargs)
        for key in base:
            assert _same_bits(merged[key], again[key]) and _same_bits(merged[key], fresh[key]), f"{where}: {key}"
        for key in base:
            assert _same_bits(base[key], before[0][key]), f"{where}: the base's {key} changed"
            for n in experts:
                assert _same_bits(experts[n][key], before[1][n][key]), f"{where}: expert {n}'s {key} changed"
        options = ("calibrate", "svd_mode", "seed", "layer_rule", "calibrate_hparams", "preferences")
        recipe = Recipe(method=method, hparams={k: v for k, v in kwargs.items() if k not in options},
                        experts=list(experts), calibrate=kwargs["calibrate"],
                        calibrate_hparams=kwargs.get("calibrate_hparams") or {}, preferences=kwargs.get("preferences"),
                        seed=kwargs["seed"], layer_rule=kwargs["layer_rule"], svd_mode=kwargs["svd_mode"])
        for text in (recipe.to_json(), recipe.to_yaml()):
            assert Recipe.from_text(text) == recipe, f"{where}: {text}"
        rng = random.Random(-case)   # one heatmap of the app on a random key, against the merge
        key, metric, against = rng.choice(sorted(base)), rng.choice(sorted(D.METRICS)), rng.choice([merged, None])
        try:   # against the merge, or (None) the task-matrix sum, as the app's first view
            heat = D.interference_matrix(studio.get_pool(base, experts), key, metric, merged=against)
        except studio.StudioError:
            continue
        except Exception as exc:   # noqa: BLE001
            pytest.fail(f"{where}: {metric} on {key}: {type(exc).__name__} instead of a StudioError: {exc}")
        assert base[key].is_floating_point(), f"{where}: {metric} of the {base[key].dtype} buffer {key}: {heat}"
        # xi and SAI are NaN by definition where a task is absent from a subspace (their docstrings)
        finite = torch.isfinite(heat) | (heat.isnan() if metric in ("xi", "sai") else False)
        assert heat.shape[0] == len(experts) and bool(finite.all()), f"{where}: {metric} on {key}: {heat}"
    assert merged_count >= PER_CHUNK // 4   # most cases merge: the invariants are exercised, not only refusals


@pytest.mark.parametrize("chunk", range(2))
def test_random_compressions_either_refuse_clearly_or_load_back_to_the_same_bits(chunk, tmp_path):
    """TSV-C on the same random pools: ``studio.compress`` either packs them or raises a StudioError; a packed file
    loads back against its base and reconstructs every task to the bits of the in-memory result, in the base's keys,
    shapes and dtypes, and refuses another base."""
    packed_count = 0
    for case in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        c = _case(case)
        base, experts = c["base"], c["experts"]
        rng = random.Random(case)
        fraction = rng.choice([None, rng.uniform(0.01, 1.0), 1.0])
        where = f"case {case}: compress(rank_fraction={fraction}, {c['kwargs']['svd_mode']})"
        try:
            packed = studio.compress(base, experts, rank_fraction=fraction, svd_mode=c["kwargs"]["svd_mode"])
        except studio.StudioError:
            continue
        except Exception as exc:   # noqa: BLE001 -- the invariant under test
            pytest.fail(f"{where}: {type(exc).__name__} instead of a StudioError: {exc}")
        packed_count += 1
        again = studio.Compressed.load(packed.save(tmp_path / f"{case}.safetensors"), base)
        for task in experts:
            direct, loaded = packed.reconstruct(task), again.reconstruct(task)
            assert list(loaded) == list(base), where
            for key in base:
                assert (loaded[key].shape, loaded[key].dtype) == (base[key].shape, base[key].dtype), f"{where}: {key}"
                assert _same_bits(loaded[key], direct[key]), f"{where}: {task} {key}"
        other = {k: (v + 1 if v.is_floating_point() else v) for k, v in base.items()}
        with pytest.raises(studio.StudioError):
            studio.Compressed.load(tmp_path / f"{case}.safetensors", other)
    assert packed_count >= PER_CHUNK // 4
