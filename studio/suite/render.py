"""Vectorised drawing primitives for the procedural MiniSuite tasks (torch only, no fonts, no files).

Every primitive works on a batch: coordinates are ``[1, S, S]`` grids in ``[-1, 1]`` (x to the right, y down),
per-sample parameters are ``[N]`` tensors, masks are ``[N, S, S]`` floats in ``[0, 1]`` with a one-pixel
anti-aliased edge, images are ``[N, 3, S, S]`` floats in ``[0, 1]``. All randomness comes from an explicit
``torch.Generator`` so a (seed, task, split) triple always produces the same bytes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Hand-coded bitmap glyphs (no system fonts: results must not depend on what is installed).
# FONT_A (5x7) renders the tasks; FONT_B (3x5, blockier) is the "other typeface" of the pretraining mixture.
_FONT_A = {
    "0": [".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."],
    "1": ["..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."],
    "2": [".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"],
    "3": ["#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."],
    "4": ["...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."],
    "5": ["#####", "#....", "####.", "....#", "....#", "#...#", ".###."],
    "6": ["..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."],
    "7": ["#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."],
    "8": [".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."],
    "9": [".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."],
    "!": ["..#..", "..#..", "..#..", "..#..", "..#..", ".....", "..#.."],
    "<": ["..#..", ".#...", "#####", ".#...", "..#..", ".....", "....."],
    ">": ["..#..", "...#.", "#####", "...#.", "..#..", ".....", "....."],
    "^": ["..#..", ".###.", "#.#.#", "..#..", "..#..", "..#..", "..#.."],
    "-": [".....", ".....", ".....", "#####", ".....", ".....", "....."],
}
_FONT_B = {
    "0": ["###", "#.#", "#.#", "#.#", "###"],
    "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"],
    "3": ["###", "..#", ".##", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"],
    "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"],
    "7": ["###", "..#", ".#.", ".#.", ".#."],
    "8": ["###", "#.#", "###", "#.#", "###"],
    "9": ["###", "#.#", "###", "..#", "###"],
    "!": [".#.", ".#.", ".#.", "...", ".#."],
    "<": [".#.", "#..", "###", "#..", ".#."],
    ">": [".#.", "..#", "###", "..#", ".#."],
    "^": [".#.", "###", ".#.", ".#.", ".#."],
    "-": ["...", "...", "###", "...", "..."],
}
FONTS = {"a": _FONT_A, "b": _FONT_B}
_GLYPH_CACHE: dict[tuple[str, str], Tensor] = {}


def glyph_bitmap(char: str, font: str = "a") -> Tensor:
    """A square float bitmap of ``char`` (glyph centred, zero border), the input of :func:`draw_glyphs`.

    Example:
        >>> glyph_bitmap("1").shape, float(glyph_bitmap("1").max())
        (torch.Size([9, 9]), 1.0)
    """
    key = (font, char)
    if key not in _GLYPH_CACHE:
        rows = FONTS[font][char]
        h, w = len(rows), len(rows[0])
        side = max(h, w) + 2
        bm = torch.zeros(side, side)
        top, left = (side - h) // 2, (side - w) // 2
        for r, row in enumerate(rows):
            for c, ch in enumerate(row):
                if ch == "#":
                    bm[top + r, left + c] = 1.0
        _GLYPH_CACHE[key] = bm
    return _GLYPH_CACHE[key]


def glyph_height_fraction(font: str) -> float:
    """Glyph height over the bitmap side (to size glyphs in output pixels)."""
    rows = FONTS[font]["0"]
    return len(rows) / (max(len(rows), len(rows[0])) + 2)


def coords(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``x, y`` of shape ``[1, S, S]`` in ``[-1, 1]``."""
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(u, u, indexing="ij")
    return x[None], y[None]


def uniform(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    """``[n]`` uniform samples in ``[lo, hi)``."""
    return torch.rand(n, generator=g) * (hi - lo) + lo


def choice(g: torch.Generator, n: int, k: int) -> Tensor:
    """``[n]`` integers uniform in ``[0, k)``."""
    return torch.randint(0, k, (n,), generator=g)


def col(v: Tensor) -> Tensor:
    """Per-sample scalars ``[N]`` -> ``[N, 1, 1]`` (broadcast against coordinate grids)."""
    return v.view(-1, 1, 1)


def rgb(v: Tensor) -> Tensor:
    """Per-sample colours ``[N, 3]`` -> ``[N, 3, 1, 1]``."""
    return v.view(-1, 3, 1, 1)


def soft(dist: Tensor, size: int, width: float = 1.0) -> Tensor:
    """Anti-aliased mask from a signed distance (negative inside, normalised units), edge ``width`` pixels."""
    return (0.5 - dist / (2.0 / size * width)).clamp(0.0, 1.0)


def rotate(x: Tensor, y: Tensor, theta: Tensor, cx: Tensor | float = 0.0,
           cy: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
    """Coordinates in a frame rotated by ``theta`` (radians) about ``(cx, cy)``; all per-sample ``[N]`` or scalars."""
    t = col(theta)
    cx = col(cx) if isinstance(cx, Tensor) else cx
    cy = col(cy) if isinstance(cy, Tensor) else cy
    dx, dy = x - cx, y - cy
    c, s = torch.cos(t), torch.sin(t)
    return dx * c + dy * s, -dx * s + dy * c


def box_dist(x: Tensor, y: Tensor, cx, cy, hw, hh) -> Tensor:
    """Signed distance (Chebyshev-style) to an axis-aligned box centred ``(cx, cy)`` with half sizes ``hw, hh``."""
    f = (lambda v: col(v) if isinstance(v, Tensor) else v)
    return torch.maximum((x - f(cx)).abs() - f(hw), (y - f(cy)).abs() - f(hh))


def circle_dist(x: Tensor, y: Tensor, cx, cy, r) -> Tensor:
    """Signed distance to a disc."""
    f = (lambda v: col(v) if isinstance(v, Tensor) else v)
    return torch.sqrt((x - f(cx)) ** 2 + (y - f(cy)) ** 2 + 1e-12) - f(r)


def paint(img: Tensor, mask: Tensor, color: Tensor) -> Tensor:
    """Composite ``color`` (``[N, 3]`` or ``[N, 3, S, S]``) over ``img`` where ``mask`` (``[N, S, S]``) is 1."""
    m = mask.unsqueeze(1)
    c = rgb(color) if color.dim() == 2 else color
    return img * (1 - m) + c * m


def value_noise(g: torch.Generator, n: int, res: int, size: int, channels: int = 1) -> Tensor:
    """Smooth random field ``[N, C, S, S]`` in ``[0, 1]``: a ``res x res`` lattice upsampled bicubically."""
    lattice = torch.rand(n, channels, res, res, generator=g)
    return F.interpolate(lattice, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def jitter_color(g: torch.Generator, base: Tensor, amount: float) -> Tensor:
    """``base`` colours ``[N, 3]`` plus uniform per-channel noise of +-``amount``, clipped to ``[0, 1]``."""
    return (base + (torch.rand(base.shape, generator=g) * 2 - 1) * amount).clamp(0, 1)


def palette(colors: list[tuple[float, float, float]], idx: Tensor) -> Tensor:
    """Rows of a small palette: ``idx`` ``[N]`` -> ``[N, 3]``."""
    return torch.tensor(colors, dtype=torch.float32)[idx]


def draw_glyphs(chars: list[str], font: str, size: int, *, height: Tensor, cx: Tensor, cy: Tensor,
                theta: Tensor, shear: Tensor | None = None, aspect: Tensor | None = None) -> Tensor:
    """Masks ``[N, S, S]`` of one glyph per sample, placed with an affine map (``grid_sample``, bilinear).

    ``height``: glyph height as a fraction of the image (0..1); ``cx, cy`` in ``[-1, 1]``; ``theta`` radians.
    """
    n = len(chars)
    bms = torch.stack([glyph_bitmap(c, font) for c in chars]).unsqueeze(1)  # [N,1,L,L]
    # Output -> input map: q = A^-1 (p - t), with the glyph's height in input units = 2 * glyph_height_fraction.
    # the glyph spans 2 * glyph_height_fraction input units and must span 2 * height output units
    s = height / glyph_height_fraction(font)
    c, si = torch.cos(theta), torch.sin(theta)
    sh = shear if shear is not None else torch.zeros(n)
    asp = aspect if aspect is not None else torch.ones(n)
    inv = torch.zeros(n, 2, 3)
    # rotation by -theta, then undo the scale (anisotropic for aspect), then shear in x.
    inv[:, 0, 0] = (c + sh * -si) / (s * asp)
    inv[:, 0, 1] = (si + sh * c) / (s * asp)
    inv[:, 1, 0] = -si / s
    inv[:, 1, 1] = c / s
    inv[:, 0, 2] = -(inv[:, 0, 0] * cx + inv[:, 0, 1] * cy)
    inv[:, 1, 2] = -(inv[:, 1, 0] * cx + inv[:, 1, 1] * cy)
    grid = F.affine_grid(inv, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(bms, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, 0]


def stroke(mask: Tensor, threshold: Tensor, gain: float = 6.0) -> Tensor:
    """Re-threshold a bilinear glyph mask: lower ``threshold`` (``[N]``) = bolder strokes."""
    return ((mask - col(threshold)) * gain + 0.5).clamp(0, 1)


def blur(img: Tensor, amount: Tensor) -> Tensor:
    """Per-sample mix between the image and a 3x3 box blur of it (``amount`` ``[N]`` in ``[0, 1]``)."""
    k = torch.full((img.shape[1], 1, 3, 3), 1.0 / 9.0)
    blurred = F.conv2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), k, groups=img.shape[1])
    a = amount.view(-1, 1, 1, 1)
    return img * (1 - a) + blurred * a


def add_noise(g: torch.Generator, img: Tensor, sigma: Tensor) -> Tensor:
    """Gaussian pixel noise with per-sample std ``sigma`` ``[N]``."""
    return img + torch.randn(img.shape, generator=g) * sigma.view(-1, 1, 1, 1)


def to_uint8(img: Tensor) -> Tensor:
    """``[N, 3, S, S]`` floats -> ``[N, S, S, 3]`` uint8 (round half up, clipped)."""
    return (img.clamp(0, 1) * 255 + 0.5).floor().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


TAU = 2 * math.pi
