"""The backbone side of a suite: open_clip model configs, the visual tower, preprocessing, heads, tokenizer.

A suite's architecture is an open_clip model config (``studio/model_configs/<name>.json`` for the embedded
MiniSuite, or any built-in open_clip name such as ``ViT-B-32`` for real CLIP pools). Models are always built with
``open_clip.create_model`` so state-dict keys are real CLIP keys
(``visual.transformer.resblocks.0.attn.in_proj_weight``, ``visual.proj``, ...). Only the image encoder is merged, as
in the papers; classification heads are fixed ``[C, D]`` matrices applied to the L2-normalised image embedding with a
fixed logit scale, like CLIP zero-shot heads.
"""

from __future__ import annotations

import copy
import json
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..schema import StudioError

MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"

# open_clip's default image normalisation (OPENAI_DATASET_MEAN / STD); MiniCLIP keeps it so a real CLIP pool and the
# MiniSuite share one preprocessing path.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_REGISTER_LOCK = threading.Lock()
_REGISTERED: set[str] = set()


class ArchitectureError(StudioError):
    """A state dict does not fit the suite's architecture (missing/unexpected keys or a wrong shape)."""


def register_model_configs(path: "str | Path" = MODEL_CONFIG_DIR) -> None:
    """Make the JSON model configs under ``path`` known to open_clip (``open_clip.add_model_config``), once.

    Example:
        >>> import open_clip
        >>> register_model_configs()
        >>> "MiniCLIP-ViT" in open_clip.list_models()
        True
    """
    import json

    import open_clip

    key = str(Path(path).resolve())
    with _REGISTER_LOCK:
        if key in _REGISTERED:
            return
        # open_clip keeps one registry per process, in which a later folder's config silently replaces an earlier
        # one of the same name: a suite would then build another suite's architecture, depending on what the
        # process loaded first. A name registered with other content is refused instead.
        for file in sorted(Path(path).glob("*.json")):
            try:
                config = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ArchitectureError(f"{file}: not a readable JSON model config ({exc})") from None
            if not isinstance(config, dict):
                raise ArchitectureError(f"{file}: a model config must be a JSON object, got {type(config).__name__}")
            known = open_clip.get_model_config(file.stem)
            if known is not None and known != config:
                raise ArchitectureError(
                    f"{file}: model {file.stem!r} is already known to open_clip with another config (this process "
                    f"registered it from another suite or from open_clip's own); open_clip has one registry per "
                    f"process, so give this architecture its own name (the file's and the manifest's 'model')")
        open_clip.add_model_config(Path(path))
        _REGISTERED.add(key)


def model_config(name: str) -> dict[str, Any]:
    """The open_clip config dict of model ``name`` (after registering the studio's configs)."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ArchitectureError(f"unknown open_clip model {name!r}; known: {open_clip.list_models()[:8]}...")
    return copy.deepcopy(cfg)


def create_clip(name: str, *, seed: int | None = None, device: "str | torch.device" = "cpu") -> nn.Module:
    """Build the full open_clip ``CLIP`` model ``name`` with random weights (seeded for reproducibility).

    Example:
        >>> m = create_clip("MiniCLIP-ViT", seed=0)
        >>> tuple(m.state_dict()["visual.proj"].shape)
        (128, 64)
    """
    import logging

    import open_clip

    register_model_configs()
    if seed is not None:
        torch.manual_seed(seed)
    # open_clip logs a warning when no pretrained weights are requested; random init is the point here.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=None, device=device)
    finally:
        logger.setLevel(level)
    return model


def visual_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The ``visual.*`` entries of a CLIP model's state dict, detached and cloned (float32, CPU)."""
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()
            if k.startswith("visual.")}


def check_architecture(reference: Mapping[str, Tensor], state_dict: Mapping[str, Tensor],
                       what: str = "state dict") -> None:
    """Raise :class:`ArchitectureError` naming missing/unexpected keys or the first mismatched shape.

    Example:
        >>> ref = {"visual.proj": torch.zeros(2, 2)}
        >>> check_architecture(ref, {"visual.proj": torch.zeros(2, 3)}, "expert")
        Traceback (most recent call last):
        ...
        studio.suite.model.ArchitectureError: expert key 'visual.proj' has shape (2, 3); the architecture expects (2, 2)
    """
    if not isinstance(state_dict, Mapping):
        raise ArchitectureError(f"{what} must be a mapping key -> Tensor, got {type(state_dict).__name__}")
    missing = [k for k in reference if k not in state_dict]
    unexpected = [k for k in state_dict if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[:3]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:3]}")
        raise ArchitectureError(f"{what} does not match the architecture: " + "; ".join(parts))
    for k, ref in reference.items():
        t = state_dict[k]
        if not isinstance(t, Tensor):
            raise ArchitectureError(f"{what} key {k!r} is a {type(t).__name__}, expected a torch.Tensor")
        if t.is_meta:
            raise ArchitectureError(f"{what} key {k!r} is a meta tensor (no data); load the weights first")
        if tuple(t.shape) != tuple(ref.shape):
            raise ArchitectureError(
                f"{what} key {k!r} has shape {tuple(t.shape)}; the architecture expects {tuple(ref.shape)}")
        if t.is_floating_point() != ref.is_floating_point():
            raise ArchitectureError(f"{what} key {k!r} has dtype {t.dtype}; the architecture expects a "
                                    f"{'floating-point' if ref.is_floating_point() else 'non-floating'} tensor "
                                    f"like its {ref.dtype}")


class VisualTower:
    """Builds eval-mode copies of one architecture's open_clip image encoder and loads ``visual.*`` state dicts.

    One template module is created once; :meth:`build` deep-copies it (cheap) so callers may keep several models.
    """

    def __init__(self, model_name: str):
        self.model_name = model_name
        clip = create_clip(model_name, seed=0)
        self._template = clip.visual.eval()
        self.reference = {f"visual.{k}": v for k, v in self._template.state_dict().items()}
        self.image_size = int(model_config(model_name)["vision_cfg"].get("image_size", 224))

    def build(self, state_dict: Mapping[str, Tensor], *, device: "str | torch.device" = "cpu") -> nn.Module:
        """A fresh eval-mode visual tower with ``state_dict`` (keys prefixed ``visual.``) loaded."""
        module = copy.deepcopy(self._template)
        self.load(module, state_dict)
        return module.to(device).eval()

    def load(self, module: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
        """Load ``state_dict`` into an existing tower in place (after the architecture check)."""
        check_architecture(self.reference, state_dict)
        inner = {k[len("visual."):]: v.to(torch.float32) for k, v in state_dict.items()}
        module.load_state_dict(inner, strict=True)
        return module


def preprocess(images: Tensor, device: "str | torch.device | None" = None) -> Tensor:
    """uint8 ``[N, H, W, 3]`` images -> normalised float ``[N, 3, H, W]`` (open_clip's mean/std).

    Example:
        >>> preprocess(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape
        torch.Size([2, 3, 32, 32])
    """
    x = images.to(device) if device is not None else images
    x = x.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def head_logits(embeddings: Tensor, head: Tensor, logit_scale: float) -> Tensor:
    """CLIP zero-shot classification: ``logit_scale * normalize(f(x)) @ head.T`` with ``head`` ``[C, D]``.

    Example:
        >>> head_logits(torch.tensor([[3.0, 4.0]]), torch.eye(2), 10.0).tolist()
        [[6.0, 8.0]]
        >>> head_logits(torch.tensor([[3e38, 4e38 / 3]]), torch.eye(2), 10.0).round().tolist()   # norm beyond float32
        [[9.0, 4.0]]
    """
    norm = embeddings.norm(dim=-1, keepdim=True)
    big = torch.isinf(norm) & torch.isfinite(embeddings).all(dim=-1, keepdim=True)
    if bool(big.any()):   # finite embeddings whose norm leaves float32 (1e30 each) scored as zeros: class 0 for all
        top = embeddings.abs().amax(dim=-1, keepdim=True)
        embeddings = torch.where(big, embeddings / top, embeddings)
        norm = torch.where(big, embeddings.norm(dim=-1, keepdim=True), norm)
    z = embeddings / norm.clamp_min(1e-12)
    return logit_scale * z @ head.to(z.dtype).T


class CharTokenizer:
    """A byte-level tokenizer for MiniCLIP's tiny text tower (vocab 256), usable with
    ``open_clip.build_zero_shot_classifier``.

    ids: 0 = padding, 1..253 = lower-cased bytes, 254 = start-of-text, 255 = end-of-text. open_clip's text tower pools
    at the argmax token id, which is the end-of-text token, as with the real BPE tokenizer.

    Example:
        >>> CharTokenizer(8)(["ab"]).tolist()
        [[254, 97, 98, 255, 0, 0, 0, 0]]
    """

    SOT, EOT = 254, 255

    def __init__(self, context_length: int = 32):
        self.context_length = context_length

    def __call__(self, texts: "str | Sequence[str]", context_length: int | None = None) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        n = context_length or self.context_length
        out = torch.zeros(len(texts), n, dtype=torch.long)
        for i, text in enumerate(texts):
            body = [min(max(b, 1), 253) for b in text.lower().encode("utf-8")][: n - 2]
            ids = [self.SOT, *body, self.EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def dump_config(name: str) -> str:
    """The model config of ``name`` as pretty JSON (what a suite ships in ``model_configs/``)."""
    return json.dumps(model_config(name), indent=4)
