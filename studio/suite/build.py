"""Build the MiniSuite from scratch, deterministically: ``python -m studio.suite.build --out assets/minisuite``.

The protocol follows the merging papers (Ilharco et al. 2023; TSV; Iso-C/CTS):

1. **Pretraining** ("CLIP"): the full MiniCLIP-ViT (image encoder + a tiny text tower) is trained from a seeded
   random init on a *shifted* mixture: source-domain renderings of all tasks' classes (other typeface, canonical
   pose, other palettes, no clutter; see :mod:`studio.suite.tasks`). The loss is CLIP's image-to-text cross-entropy
   against the class prompts of the image's task, so the text tower learns to produce zero-shot heads.
2. **Zero-shot heads**: ``open_clip.build_zero_shot_classifier`` turns each task's class names x prompt templates
   into a fixed ``[C, D]`` head (rows L2-normalised); the learned ``logit_scale`` is frozen with them.
3. **Experts**: for each task, only the image encoder is fine-tuned from the pretrained weights on the task's
   target-domain train split, with the task's head and the logit scale frozen.
4. Weights are stored in fp16 (``visual.*`` keys only for base and experts; the text tower separately); every
   reported number is measured on the stored weights and the stored uint8 evaluation data.

Everything is seeded (model init, data streams, batch order), runs on CPU or CUDA (``--device``), and the measured
accuracies, settings, timings and versions are written to ``manifest.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..io import save_state_dict
from .model import (CLIP_MEAN, CLIP_STD, MODEL_CONFIG_DIR, CharTokenizer, create_clip, head_logits, model_config,
                    preprocess, visual_state_dict)
from .tasks import TASK_NAMES, TASKS, generate

SUITE_NAME = "MiniSuite"
NOTES = [
    "Heads are CLIP-style zero-shot heads: a tiny text tower (2 layers, width 64, byte tokenizer) is trained jointly "
    "with the image encoder during pretraining (image-to-prompt cross-entropy over the image's task classes, one "
    "random template per class and step), then open_clip.build_zero_shot_classifier averages the templates per "
    "class. It costs about a third of a pretraining step (all class prompts are encoded every step) and nothing "
    "afterwards, and keeps the papers' setting: heads are fixed, shared by the base, every expert and every merge, "
    "and come from the pretrained model.",
    "Only visual.* weights are stored for base and experts (what is merged); the text tower is in text.safetensors.",
    "The pretraining mixture renders the same classes in a shifted style (other typeface and polarity, other "
    "palettes, grey-scale textures, silhouettes, desaturated scenes): the backbone is a partial zero-shot start.",
    "Weights are stored in fp16; every accuracy in this manifest is measured on the stored fp16 weights and the "
    "stored uint8 evaluation images through studio.evaluate.",
]
MODEL_NAME = "MiniCLIP-ViT"


@dataclass
class BuildConfig:
    """Every setting of a build (recorded in the manifest). Defaults produce the committed MiniSuite."""

    out: str = "assets/minisuite"
    tasks: list[str] = field(default_factory=lambda: list(TASK_NAMES))
    seed: int = 0
    device: str = "auto"
    threads: int = 1
    n_pretrain: int = 2500          # source-domain pretraining images per task
    pretrain_target_fraction: float = 0.0  # extra target-domain images in the pretraining mix (x n_pretrain)
    n_train: int = 4000             # target-domain fine-tuning images per task
    n_val: int = 200
    n_test: int = 300
    batch_size: int = 128
    pretrain_steps: int = 400
    pretrain_lr: float = 1e-3
    pretrain_wd: float = 0.05
    steps: int = 150                # fine-tuning steps per expert
    lr: float = 1e-3
    wd: float = 0.1
    warmup_fraction: float = 0.1
    alphas: list[float] = field(default_factory=lambda: [0.05] + [round(0.1 * i, 2) for i in range(1, 11)])
    reference_merges: bool = True


def _log(msg: str) -> None:
    print(f"[build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * p))


def _prompts(tasks: Sequence[str], context_length: int) -> tuple[list[str], Tensor, list[int]]:
    """All (task, class, template) prompts, the global class id of each, and each task's first global id."""
    texts, owner, offsets = [], [], []
    total = 0
    for t in tasks:
        spec = TASKS[t]
        offsets.append(total)
        base = total
        total += len(spec.classes)
        for c, name in enumerate(spec.classes):
            for tpl in spec.templates:
                texts.append(tpl.format(name))
                owner.append(base + c)
                if len(texts[-1].encode("utf-8")) > context_length - 2:
                    # a truncated prompt can lose the very word that tells two classes apart
                    raise ValueError(f"prompt {texts[-1]!r} of task {t!r} is longer than the text context "
                                     f"({context_length - 2} bytes); shorten the template or the class name")
    return texts, torch.tensor(owner), offsets


def _class_embeddings(model: nn.Module, tokens: Tensor, owner: Tensor, num: int) -> Tensor:
    """Differentiable version of ``build_zero_shot_classifier``: mean of normalised template embeddings per class,
    re-normalised. Returns ``[num_classes_total, D]``."""
    emb = model.encode_text(tokens, normalize=True)
    summed = torch.zeros(num, emb.shape[1], device=emb.device).index_add(0, owner, emb)
    return F.normalize(summed, dim=-1)


def _round16(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Round to fp16 and back: every measurement is made on exactly the stored weights."""
    return {k: v.to(torch.float16).to(torch.float32) for k, v in sd.items()}


def _minibatches(n: int, batch_size: int, steps: int, lr: float, warmup_fraction: float,
                 g: torch.Generator) -> Iterator[tuple[int, Tensor, float]]:
    """``(step, indices, learning rate)`` for ``steps`` steps: shuffled epochs drawn from ``g`` (a new permutation
    when the current one runs out) and a warmup + cosine schedule peaking at ``lr``."""
    order, pos = torch.randperm(n, generator=g), 0
    warm = max(1, int(warmup_fraction * steps))
    for step in range(steps):
        if pos + batch_size > order.numel():
            order, pos = torch.randperm(n, generator=g), 0
        yield step, order[pos:pos + batch_size], lr * _cosine(step, steps, warm)
        pos += batch_size


def pretrain(cfg: BuildConfig, data: dict[str, tuple[Tensor, Tensor]], device: torch.device,
             log: Callable[[str], None] = _log) -> tuple[nn.Module, dict[str, Any]]:
    """Stage 1: CLIP-style pretraining of image and text towers on the shifted mixture."""
    model = create_clip(MODEL_NAME, seed=cfg.seed).to(device).train()
    tok = CharTokenizer(model_config(MODEL_NAME)["text_cfg"]["context_length"])
    texts, owner, offsets = _prompts(cfg.tasks, tok.context_length)
    tokens, owner = tok(texts).to(device), owner.to(device)
    # one random template per class per step (CLIP sees one caption per image, not template averages); the final
    # heads average all templates (build_zero_shot_classifier)
    by_class = [torch.nonzero(owner == c).flatten() for c in range(int(owner.max()) + 1)]
    num_classes = int(owner.max()) + 1
    images = torch.cat([data[t][0] for t in cfg.tasks])
    labels = torch.cat([data[t][1] + offsets[i] for i, t in enumerate(cfg.tasks)])
    task_of = torch.cat([torch.full((data[t][1].numel(),), i) for i, t in enumerate(cfg.tasks)])
    # which global classes each task's images compete over (its own head only, as in zero-shot evaluation)
    allowed = torch.zeros(len(cfg.tasks), num_classes, dtype=torch.bool)
    for i, t in enumerate(cfg.tasks):
        allowed[i, offsets[i]:offsets[i] + len(TASKS[t].classes)] = True
    allowed = allowed.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.pretrain_wd)
    g = torch.Generator().manual_seed(cfg.seed * 31 + 1)
    g_tpl = torch.Generator().manual_seed(cfg.seed * 31 + 2)
    losses = []
    for step, idx, lr in _minibatches(images.shape[0], cfg.batch_size, cfg.pretrain_steps, cfg.pretrain_lr,
                                      cfg.warmup_fraction, g):
        for group in opt.param_groups:
            group["lr"] = lr
        x = preprocess(images[idx], device)
        y, tid = labels[idx].to(device), task_of[idx].to(device)
        z = F.normalize(model.encode_image(x), dim=-1)
        pick = torch.stack([ids[int(torch.randint(0, ids.numel(), (1,), generator=g_tpl))] for ids in by_class])
        heads = _class_embeddings(model, tokens[pick], owner[pick], num_classes)
        logits = model.logit_scale.exp().clamp(max=100.0) * z @ heads.T
        logits = logits.masked_fill(~allowed[tid], float("-inf"))
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step == cfg.pretrain_steps - 1:
            log(f"pretrain step {step + 1}/{cfg.pretrain_steps} loss {sum(losses[-50:]) / len(losses[-50:]):.3f}")
    model.eval()
    return model, {"final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}


def zero_shot_heads(model: nn.Module, tasks: Sequence[str], device: torch.device) -> dict[str, Tensor]:
    """Stage 2: ``open_clip.build_zero_shot_classifier`` per task -> ``[C, D]`` heads (float32, CPU)."""
    from open_clip import build_zero_shot_classifier

    tok = CharTokenizer(model_config(MODEL_NAME)["text_cfg"]["context_length"])
    heads = {}
    with torch.no_grad():
        for t in tasks:
            spec = TASKS[t]
            w = build_zero_shot_classifier(model, tok, list(spec.classes), list(spec.templates),
                                           num_classes_per_batch=None, device=device)
            heads[t] = w.T.contiguous().float().cpu()
    return heads


def finetune(cfg: BuildConfig, base: dict[str, Tensor], head: Tensor, logit_scale: float,
             train: tuple[Tensor, Tensor], device: torch.device, seed: int,
             log: Callable[[str], None] = _log, name: str = "") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Stage 3: fine-tune only the image encoder on one task with its head and the logit scale frozen."""
    clip = create_clip(MODEL_NAME, seed=seed)
    visual = clip.visual
    visual.load_state_dict({k[len("visual."):]: v for k, v in base.items()})
    visual = visual.to(device).train()
    head = head.to(device)
    opt = torch.optim.AdamW(visual.parameters(), lr=cfg.lr, weight_decay=cfg.wd)
    images, labels = train
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _, idx, lr in _minibatches(images.shape[0], cfg.batch_size, cfg.steps, cfg.lr, cfg.warmup_fraction, g):
        for group in opt.param_groups:
            group["lr"] = lr
        logits = head_logits(visual(preprocess(images[idx], device)), head, logit_scale)
        loss = F.cross_entropy(logits, labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = sum(losses[-20:]) / max(1, len(losses[-20:]))
    log(f"expert {name}: {cfg.steps} steps, final loss {final:.3f}")
    return {f"visual.{k}": v.detach().float().cpu() for k, v in visual.state_dict().items()}, {"final_loss": final}


@torch.no_grad()
def _accuracy(sd: dict[str, Tensor], head: Tensor, logit_scale: float, data: tuple[Tensor, Tensor],
              device: torch.device, limit: int) -> float:
    """Accuracy (%) of an image encoder on the first ``limit`` images of ``data`` (build progress logs only)."""
    visual = create_clip(MODEL_NAME, seed=0).visual
    visual.load_state_dict({k[len("visual."):]: v for k, v in sd.items()})
    visual = visual.to(device).eval()
    x, y = data[0][:limit], data[1][:limit]
    pred = head_logits(visual(preprocess(x, device)), head.to(device), logit_scale).argmax(-1).cpu()
    return 100.0 * float((pred == y).float().mean())


def readme(manifest: dict[str, Any]) -> str:
    """A short model card for the suite folder (also what a Hub repository of the suite shows)."""
    acc = manifest.get("accuracy", {})
    lines = [f"# {manifest['name']}", "", manifest.get("description", ""), "",
             f"Architecture: open_clip `{manifest['model']['name']}` (config in `model_configs/`); only the image "
             f"encoder (`visual.*`) is stored for the base and the experts. Rebuild: `{manifest['build']['command']}`.",
             "", "| task | group | classes | zero-shot (test) | expert (test) |", "|---|---|---|---|---|"]
    for t in manifest["tasks"]:
        zs = acc.get("zeroshot", {}).get(t["name"], {}).get("test", float("nan"))
        ex = acc.get("expert_own_task", {}).get(t["name"], {}).get("test", float("nan"))
        lines.append(f"| {t['name']} | {t['group']} | {len(t['classes'])} | {zs:.1f} | {ex:.1f} |")
    lines += ["", "Notes:", ""] + [f"- {n}" for n in manifest.get("notes", [])]
    return "\n".join(lines) + "\n"


_OUTPUTS = ("manifest.json", "README.md", "base.safetensors", "heads.safetensors", "text.safetensors", "experts",
            "data", "model_configs")


def _check_out(out: Path) -> None:
    """Refuse, before any work, an ``--out`` the build would fail to publish into or would destroy: a file, or a
    folder holding files of the names the build writes (``data/``, ``README.md``, ...) that no earlier build wrote
    (no suite manifest with a ``build`` record): publishing replaces them. Other files in the folder are kept."""
    from ..io import file_in_the_way
    from .core import SuiteError

    blocking = file_in_the_way(out, itself=True)
    if blocking is not None:
        raise SuiteError(f"--out {out}: {blocking} is a file; give a folder (new, empty or an earlier build's)")
    if not out.is_dir():
        return
    present = [name for name in _OUTPUTS if (out / name).exists()]
    if not present:
        return
    try:
        earlier = "build" in json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError, TypeError):
        earlier = False
    if not earlier:
        raise SuiteError(f"--out {out} holds {present}, which the build would replace, and is not a suite an earlier "
                         f"build wrote (no manifest.json with its build record); give a new or empty folder")


def _clear(out: Path) -> None:
    """Remove a previous build's files (only those this command writes)."""
    for name in _OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _publish(work: Path, out: Path) -> None:
    """Move a finished build from ``work`` into ``out``: readers of ``out`` never see a half-written suite
    (only the few renames at the very end)."""
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    for name in _OUTPUTS:
        if (work / name).exists():
            (work / name).rename(out / name)
    shutil.rmtree(work, ignore_errors=True)


def _sizes(out: Path) -> dict[str, int]:
    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    weights = sum(size(out / n) for n in ("base.safetensors", "heads.safetensors", "experts"))
    return {"weights_bytes": weights, "text_tower_bytes": size(out / "text.safetensors"),
            "data_bytes": size(out / "data")}


def build(cfg: BuildConfig, log: Callable[[str], None] = _log, command: str | None = None) -> dict[str, Any]:
    """Run the whole build into ``cfg.out`` and return the manifest (also written to ``manifest.json``, with
    ``command``, the command line that reproduces it, default ``python -m studio.suite.build`` and this process's
    arguments). ``cfg.out`` is checked first (:func:`_check_out`); a failed build leaves no staging folder."""
    import open_clip

    from ..pool import resolve_device

    t_start = time.perf_counter()
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        from .core import UnknownTaskError
        raise UnknownTaskError(f"unknown task(s) {unknown}; available: {list(TASK_NAMES)}")
    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cfg.threads > 0:
        # Tiny matrices: on a shared CPU, thread synchronisation costs more than it saves (measured 4x slower with 2).
        torch.set_num_threads(cfg.threads)
    final = Path(cfg.out)
    _check_out(final)
    # build next to the destination, publish at the end (the app may be reading the current suite meanwhile)
    out = final.parent / f".{final.name}.building"
    if out.exists():
        shutil.rmtree(out)
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        from .core import SuiteError
        raise SuiteError(f"--out {final}: cannot write in {final.parent} ({exc.strerror or exc})") from None
    timings: dict[str, float] = {}
    published = False
    try:
        # ---------------------------------------------------------------- data (deterministic, seeded per split)
        t0 = time.perf_counter()
        pre_data, train_data = {}, {}
        (out / "data").mkdir()
        for t in cfg.tasks:
            src_x, src_y = generate(t, cfg.n_pretrain, cfg.seed, "pretrain", domain="source")
            n_tgt = int(round(cfg.pretrain_target_fraction * cfg.n_pretrain))
            if n_tgt:
                tx, ty = generate(t, n_tgt, cfg.seed + 7, "pretrain", domain="target")
                src_x, src_y = torch.cat([src_x, tx]), torch.cat([src_y, ty])
            pre_data[t] = (src_x, src_y)
            train_data[t] = generate(t, cfg.n_train, cfg.seed, "train")
            vx, vy = generate(t, cfg.n_val, cfg.seed, "validation")
            sx, sy = generate(t, cfg.n_test, cfg.seed, "test")
            save_state_dict(out / "data" / f"{t}.safetensors",
                            {"val_images": vx, "val_labels": vy, "test_images": sx, "test_labels": sy},
                            metadata={"task": t, "layout": "NHWC uint8"})
        timings["data_s"] = time.perf_counter() - t0
        log(f"data generated in {timings['data_s']:.1f} s")

        # ---------------------------------------------------------------- pretraining + zero-shot heads
        t0 = time.perf_counter()
        model, pre_info = pretrain(cfg, pre_data, device, log)
        heads = zero_shot_heads(model, cfg.tasks, device)
        logit_scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
        full = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        base = _round16(visual_state_dict(model))
        text = {k: v for k, v in full.items() if not k.startswith("visual.")}
        timings["pretrain_s"] = time.perf_counter() - t0
        log(f"pretraining done in {timings['pretrain_s']:.1f} s (logit scale {logit_scale:.2f})")
        log("zero-shot (train split, quick look): " + ", ".join(
            f"{t} {_accuracy(base, heads[t], logit_scale, train_data[t], device, 500):.1f}" for t in cfg.tasks))
        del model

        # ---------------------------------------------------------------- experts
        t0 = time.perf_counter()
        experts, ft_info = {}, {}
        for i, t in enumerate(cfg.tasks):
            sd, info = finetune(cfg, base, heads[t], logit_scale, train_data[t], device,
                                seed=cfg.seed * 1000 + 100 + i, log=log, name=t)
            experts[t], ft_info[t] = _round16(sd), info
            train_acc = _accuracy(experts[t], heads[t], logit_scale, train_data[t], device, 500)
            log(f"expert {t}: train-split accuracy {train_acc:.1f}")
        timings["finetune_s"] = time.perf_counter() - t0

        # ---------------------------------------------------------------- write
        (out / "experts").mkdir()
        (out / "model_configs").mkdir()
        shutil.copy(MODEL_CONFIG_DIR / f"{MODEL_NAME}.json", out / "model_configs" / f"{MODEL_NAME}.json")
        meta = {"model": MODEL_NAME, "suite": SUITE_NAME}
        # studio.io's writer: the usual file permissions (safetensors' save_file creates them owner-only)
        save_state_dict(out / "base.safetensors", {k: v.half() for k, v in base.items()}, metadata=meta)
        for t, sd in experts.items():
            save_state_dict(out / "experts" / f"{t}.safetensors", {k: v.half() for k, v in sd.items()},
                            metadata={**meta, "task": t})
        save_state_dict(out / "heads.safetensors", heads, metadata={**meta, "logit_scale": repr(logit_scale)})
        save_state_dict(out / "text.safetensors", {k: v.half() for k, v in text.items()}, metadata=meta)
        manifest: dict[str, Any] = {
            "name": SUITE_NAME,
            "description": "Embedded offline expert pool: one pretrained MiniCLIP-ViT, one expert per procedural "
                           "task fine-tuned with the task's zero-shot head frozen (the merging papers' protocol).",
            "model": {"name": MODEL_NAME, "config": model_config(MODEL_NAME), "library": "open_clip",
                      "merged_part": "visual", "image_size": 32,
                      "preprocess": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}},
            "logit_scale": logit_scale,
            "heads": {"kind": "zero-shot (open_clip.build_zero_shot_classifier over the tiny text tower)",
                      "normalized_rows": True},
            "tasks": [{"name": t, "classes": list(TASKS[t].classes), "group": TASKS[t].group,
                       "description": TASKS[t].description, "templates": list(TASKS[t].templates)}
                      for t in cfg.tasks],
            "splits": {"train": {"per_task": cfg.n_train, "stored": False, "domain": "target"},
                       "validation": {"per_task": cfg.n_val, "stored": True},
                       "test": {"per_task": cfg.n_test, "stored": True},
                       "pretrain": {"per_task": cfg.n_pretrain, "stored": False, "domain": "source",
                                    "target_fraction": cfg.pretrain_target_fraction}},
            "build": {"config": asdict(cfg), "device": str(device), "threads": torch.get_num_threads(),
                      "pretrain": pre_info, "finetune": ft_info,
                      "command": command or "python -m studio.suite.build " + " ".join(sys.argv[1:])},
            "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                         "python": platform.python_version()},
            "notes": NOTES,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))

        # ---------------------------------------------------------------- measure on the stored suite
        t0 = time.perf_counter()
        manifest["accuracy"] = measure(out, cfg, device, log)
        timings["evaluate_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - t_start
        manifest["build"]["timings"] = {k: round(v, 1) for k, v in timings.items()}
        manifest["sizes"] = _sizes(out)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (out / "README.md").write_text(readme(manifest))
        _publish(out, final)
        published = True
        log(f"build finished in {timings['total_s']:.1f} s -> {final}")
        return manifest
    finally:
        torch.set_num_threads(threads_before)
        if not published:   # a failure or Ctrl-C: no half-built suite left beside the destination
            shutil.rmtree(out, ignore_errors=True)


def measure(out: Path, cfg: BuildConfig, device: torch.device, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Accuracies of the stored suite through the public evaluation path (what tests and the app will see)."""
    from ..evaluate import evaluate, reference_accuracy
    from .core import Suite

    suite = Suite(out)
    acc: dict[str, Any] = {"zeroshot": {}, "expert_own_task": {}, "expert_cross_task_test": {}}
    for split in ("validation", "test"):
        key = "val" if split == "validation" else "test"
        for t, v in reference_accuracy(suite, "zeroshot", split=split, device=device).items():
            acc["zeroshot"].setdefault(t, {})[key] = round(v, 2)
        for t, v in reference_accuracy(suite, "expert", split=split, device=device).items():
            acc["expert_own_task"].setdefault(t, {})[key] = round(v, 2)
    for t in suite.task_names:
        res = evaluate(suite, suite.experts[t], split="test", device=device)
        acc["expert_cross_task_test"][t] = {k: round(v, 2) for k, v in res.accuracy.items()}
    zs = [acc["zeroshot"][t]["test"] for t in suite.task_names]
    ex = [acc["expert_own_task"][t]["test"] for t in suite.task_names]
    acc["zeroshot_avg_test"] = round(sum(zs) / len(zs), 2)
    acc["expert_avg_test"] = round(sum(ex) / len(ex), 2)
    log(f"zero-shot avg {acc['zeroshot_avg_test']:.2f}  experts avg {acc['expert_avg_test']:.2f}")
    log("zero-shot " + ", ".join(f"{t} {acc['zeroshot'][t]['test']:.1f}" for t in suite.task_names))
    log("experts   " + ", ".join(f"{t} {acc['expert_own_task'][t]['test']:.1f}" for t in suite.task_names))
    if cfg.reference_merges and len(suite.task_names) > 1:
        try:
            acc["reference_merges"] = _reference_merges(suite, cfg, device, log)
        except Exception as exc:  # the method modules are developed independently; never lose a build to them
            acc["reference_merges"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"reference merges skipped: {exc}")
    return acc


def _reference_merges(suite: Any, cfg: BuildConfig, device: torch.device, log: Callable[[str], None]) -> dict:
    """Task Arithmetic with alpha chosen on validation, and weight averaging, on test (a sanity reference)."""
    from ..engine import merge
    from ..evaluate import alpha_sweep, evaluate

    refs = {}
    sweep = alpha_sweep(suite, "task_arithmetic", cfg.alphas, split="validation", device=device)
    test = evaluate(suite, merge(suite.base, suite.experts, "task_arithmetic", alpha=sweep.best_alpha),
                    split="test", device=device)
    refs["task_arithmetic"] = {"best_alpha": sweep.best_alpha, "validation_curve": sweep.curve,
                               "test_accuracy": {k: round(v, 2) for k, v in test.accuracy.items()},
                               "test_avg_accuracy": round(test.avg_accuracy, 2),
                               "test_avg_normalized": round(test.avg_normalized, 2)}
    wa = evaluate(suite, merge(suite.base, suite.experts, "weight_average"), split="test", device=device)
    refs["weight_average"] = {"test_avg_accuracy": round(wa.avg_accuracy, 2),
                              "test_avg_normalized": round(wa.avg_normalized, 2)}
    log(f"task arithmetic (alpha {sweep.best_alpha} on validation): test avg {test.avg_accuracy:.2f}, "
        f"normalized {test.avg_normalized:.2f}; weight average {wa.avg_accuracy:.2f}")
    return refs


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m studio.suite.build") -> BuildConfig:
    d = BuildConfig()
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])

    def at_least(low: int) -> Callable[[str], int]:
        def parse(text: str) -> int:
            value = int(text)
            if value < low:
                raise argparse.ArgumentTypeError(f"{value} is below {low}")
            return value
        parse.__name__ = "integer"
        return parse

    def finite(above_zero: bool) -> Callable[[str], float]:
        def parse(text: str) -> float:
            value = float(text)
            if not ((value > 0 if above_zero else value >= 0) and math.isfinite(value)):
                raise argparse.ArgumentTypeError(f"{text} is not a finite number {'>' if above_zero else '>='} 0")
            return value
        parse.__name__ = "number"
        return parse

    positive, non_negative = finite(True), finite(False)

    ap.add_argument("--out", default=d.out, help="output folder: new, empty or an earlier build's (whose files are "
                                                 "replaced; files of other names are kept)")
    ap.add_argument("--tasks", nargs="+", default=d.tasks, choices=list(TASK_NAMES), metavar="TASK",
                    help=f"tasks to build (default: all of {list(TASK_NAMES)})")
    ap.add_argument("--seed", type=int, default=d.seed, help="seed of the data, the base and the fine-tuning")
    ap.add_argument("--device", default=d.device, help="cpu, cuda or auto (default)")
    ap.add_argument("--threads", type=int, default=d.threads, help="CPU threads (0 = torch default)")
    # every count at least 1 (0 fine-tuning steps made experts equal to the base; 0 images failed after the build)
    ap.add_argument("--steps", type=at_least(1), default=d.steps, help="fine-tuning steps per expert")
    ap.add_argument("--pretrain-steps", type=at_least(0), default=d.pretrain_steps,
                    help="steps that train the base model (the pretrained backbone) on every task's source domain")
    ap.add_argument("--batch-size", type=at_least(1), default=d.batch_size, help="images per step, in both stages")
    ap.add_argument("--lr", type=positive, default=d.lr, help="fine-tuning learning rate")
    ap.add_argument("--pretrain-lr", type=positive, default=d.pretrain_lr, help="the base model's learning rate")
    ap.add_argument("--n-pretrain", type=at_least(1), default=d.n_pretrain,
                    help="source-domain images per task that train the base model (not stored)")
    ap.add_argument("--pretrain-target-fraction", type=non_negative, default=d.pretrain_target_fraction,
                    help="target-domain images added to the base model's training, as a fraction of --n-pretrain")
    ap.add_argument("--n-train", type=at_least(1), default=d.n_train, help="target-domain images per task that "
                                                                           "fine-tune its expert")
    ap.add_argument("--n-val", type=at_least(1), default=d.n_val, help="validation images per task (stored)")
    ap.add_argument("--n-test", type=at_least(1), default=d.n_test, help="test images per task (stored)")
    ap.add_argument("--no-reference-merges", dest="reference_merges", action="store_false",
                    help="skip the Task Arithmetic alpha sweep recorded in the manifest")
    a = ap.parse_args(argv)
    return BuildConfig(out=a.out, tasks=list(a.tasks), seed=a.seed, device=a.device, threads=a.threads,
                       n_pretrain=a.n_pretrain, pretrain_target_fraction=a.pretrain_target_fraction,
                       n_train=a.n_train, n_val=a.n_val, n_test=a.n_test, batch_size=a.batch_size,
                       pretrain_steps=a.pretrain_steps, pretrain_lr=a.pretrain_lr, steps=a.steps, lr=a.lr,
                       reference_merges=a.reference_merges)


def main(argv: Sequence[str] | None = None, prog: str = "python -m studio.suite.build") -> None:
    """Command-line entry point (``prog``: the command's name in its usage line). The manifest records the command
    as ``python -m studio.suite.build`` with these arguments, which runs however the build was started."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    build(parse_args(args, prog), command=shlex.join(["python", "-m", "studio.suite.build", *args]))


if __name__ == "__main__":
    main()
