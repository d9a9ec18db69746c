"""Shared fixtures: small CLIP-shaped state dicts with the real open_clip key layout."""

from __future__ import annotations

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Pools default to CUDA where present; the tests compare against CPU tensors, so they merge on the CPU unless they
# ask for CUDA explicitly (the CUDA parity tests do).
os.environ.setdefault("MERGE_STUDIO_DEVICE", "cpu")


def require_or_skip_module(missing: str | None, install: str) -> None:
    """For a test module whose dependency is not part of the quickstart install (Chromium, the ``crosscheck`` extra):
    ``missing`` says what is missing (None: nothing). Locally the module then skips; under ``CI=true``, where
    ``.ci/run`` installs it with ``install``, that is a failure."""
    if missing is None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError(f"CI=true but {missing}: {install} (as .ci/run does)")
    pytest.skip(f"{missing} ({install})", allow_module_level=True)


def worst_error(base: dict[str, torch.Tensor], ours: dict[str, torch.Tensor],
                theirs: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest per-tensor ``||ours - theirs|| / ||theirs - base||`` over ``base``'s keys, in float64, and the tensor
    where it occurs: the measure of the parity tests against independent implementations."""
    errors = {k: float((ours[k].double() - theirs[k].double()).norm()
                       / (theirs[k].double() - b.double()).norm().clamp_min(1e-30)) for k, b in base.items()}
    key = max(errors, key=errors.get)
    return errors[key], key


def clip_like_state_dict(width: int = 12, layers: int = 2, tokens: int = 5, out_dim: int = 6, seed: int = 0,
                         dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A tiny visual tower with open_clip's keys: 2-D matrices, 1-D norms/biases, a 4-D conv and embeddings."""
    g = torch.Generator().manual_seed(seed)
    sd = {
        "visual.class_embedding": torch.randn(width, generator=g),
        "visual.positional_embedding": torch.randn(tokens, width, generator=g),
        "visual.conv1.weight": torch.randn(width, 3, 2, 2, generator=g),
        "visual.ln_pre.weight": torch.ones(width),
        "visual.ln_pre.bias": torch.zeros(width),
        "visual.proj": torch.randn(width, out_dim, generator=g),
        "text_projection": torch.randn(out_dim, out_dim, generator=g),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd[p + "attn.in_proj_weight"] = torch.randn(3 * width, width, generator=g)
        sd[p + "attn.in_proj_bias"] = torch.randn(3 * width, generator=g)
        sd[p + "attn.out_proj.weight"] = torch.randn(width, width, generator=g)
        sd[p + "ln_1.weight"] = torch.ones(width)
        sd[p + "mlp.c_fc.weight"] = torch.randn(4 * width, width, generator=g)
        sd[p + "mlp.c_proj.weight"] = torch.randn(width, 4 * width, generator=g)
    return {k: v.to(dtype) for k, v in sd.items()}


def make_experts(base: dict[str, torch.Tensor], n: int, scale: float = 0.05, seed: int = 1,
                 shared: float = 0.5) -> dict[str, dict[str, torch.Tensor]]:
    """Experts = base + (shared low-rank component + task-specific low-rank component + small noise)."""
    g = torch.Generator().manual_seed(seed)
    common = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
    experts = {}
    for t in range(n):
        sd = {}
        for k, v in base.items():
            if v.dim() == 2:
                m, nn_ = v.shape
                r = max(1, min(m, nn_) // 3)
                low = torch.randn(m, r, generator=g) @ torch.randn(r, nn_, generator=g) / r
                delta = shared * common[k] * 0.3 + low + 0.1 * torch.randn(v.shape, generator=g)
            else:
                delta = shared * common[k] + torch.randn(v.shape, generator=g)
            sd[k] = (v.float() + scale * delta).to(v.dtype)
        experts[f"task{t}"] = sd
    return experts


@pytest.fixture
def clip_pool():
    base = clip_like_state_dict()
    return base, make_experts(base, 4)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs (restored after): on the shared 2-core CI box, OpenMP threads
    of concurrent processes oversubscribe the CPU and small SVD/QR calls get ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launched_app(one_torch_thread):
    """The real ``app`` module with its ``demo`` served on a free localhost port for the module's tests."""
    import app

    app.demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=_free_port(), quiet=True,
                    **app.LAUNCH_OPTIONS)
    yield app
    app.demo.close()


def hub_cache(src, cache, repo_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567",
              repo_type: str = "model"):
    """Copy the folder ``src`` into huggingface_hub's cache layout, ``models--owner--name/{refs/main,
    snapshots/<commit>/...}`` (``datasets--...`` for a dataset repository), as a download would leave it (called
    again: another commit, now ``main``); returns the snapshot folder."""
    import shutil
    from pathlib import Path

    repo = Path(cache) / (f"{repo_type}s--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(src, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


@pytest.fixture()
def offline_hub(monkeypatch):
    """huggingface_hub in offline mode (it reads HF_HUB_OFFLINE when imported, so both are set)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
