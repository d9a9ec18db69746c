"""The eight procedural MiniSuite tasks, mirroring the 8-task CLIP suite of the merging papers.

Groups (as in the papers' suite): related digit/sign tasks (MNIST, SVHN, GTSRB), related aerial tasks (EuroSAT,
RESISC45) and dissimilar ones (DTD, Stanford Cars, SUN397). Each task draws 10 classes of 32x32 RGB images from a
deterministic, seeded torch generator, in two *domains*:

* ``"target"``: the task itself (train / validation / test splits);
* ``"source"``: the same classes with the same nuisances (pose, clutter, distractors, noise) rendered in a shifted
  *style*: another typeface and polarity for digits, other sign and land-cover palettes, grey-scale textures, black
  silhouettes on white for vehicles, desaturated colour-rotated scenes. A mixture of source-domain images of all
  tasks pretrains the backbone, which makes it a partial, "zero-shot"-like starting point on the target tasks, as
  CLIP is for the papers' datasets; fine-tuning then mostly has to adapt the style, not learn the task.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> imgs = TASKS["digits"].render(torch.arange(10), g, "target")
    >>> imgs.shape, imgs.dtype
    (torch.Size([10, 3, 32, 32]), torch.float32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .render import (TAU, add_noise, blur, box_dist, choice, circle_dist, col, coords, draw_glyphs, jitter_color,
                     paint, palette, rgb, rotate, soft, stroke, uniform, value_noise)

S = 32  # image side
DOMAINS = ("target", "source")
RenderFn = Callable[[Tensor, torch.Generator, str], Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """A procedural task: its classes, group, prompt templates (for zero-shot heads) and renderer."""

    name: str
    classes: tuple[str, ...]
    group: str
    description: str
    templates: tuple[str, ...]
    render: RenderFn


def _bg_noise(g: torch.Generator, n: int, lo: Tensor, hi: Tensor, res: int) -> Tensor:
    """Colour field between two per-sample colours ``lo, hi`` ([N,3]) along a smooth random field."""
    t = value_noise(g, n, res, S)
    return rgb(lo) * (1 - t) + rgb(hi) * t


def _finish(g: torch.Generator, img: Tensor, noise: tuple[float, float], blur_max: float = 0.0) -> Tensor:
    n = img.shape[0]
    if blur_max > 0:
        img = blur(img, uniform(g, n, 0.0, blur_max))
    return add_noise(g, img, uniform(g, n, *noise)).clamp(0, 1)


# --------------------------------------------------------------------------------------------------- digits group
DIGITS = tuple("0123456789")


def render_digits(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """MNIST-like: one light digit on a dark background, random affine pose and stroke weight."""
    n = labels.numel()
    chars = [DIGITS[i] for i in labels.tolist()]
    target = domain == "target"
    font = "a" if target else "b"
    mask = draw_glyphs(
        chars, font, S, height=uniform(g, n, 0.6, 0.8), cx=uniform(g, n, -0.12, 0.12),
        cy=uniform(g, n, -0.08, 0.08), theta=uniform(g, n, -0.15, 0.15), shear=uniform(g, n, -0.15, 0.15),
        aspect=uniform(g, n, 0.85, 1.1),
    )
    mask = stroke(mask, uniform(g, n, 0.25, 0.6))
    bg = torch.full((n, 3), 0.05) if target else jitter_color(g, torch.full((n, 3), 0.85), 0.1)
    fg = torch.full((n, 3), 0.95) if target else jitter_color(g, torch.full((n, 3), 0.1), 0.1)
    img = rgb(bg).expand(n, 3, S, S).clone()
    img = paint(img, mask, fg)
    return _finish(g, img, (0.0, 0.06), 0.5)


_VIVID = [(0.9, 0.2, 0.2), (0.2, 0.7, 0.3), (0.2, 0.35, 0.9), (0.95, 0.8, 0.2), (0.9, 0.5, 0.1),
          (0.6, 0.25, 0.75), (0.1, 0.75, 0.8), (0.95, 0.95, 0.95), (0.1, 0.1, 0.1), (0.55, 0.35, 0.2)]


def render_house_numbers(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """SVHN-like: a coloured digit on a cluttered coloured background, flanked by distractor digits."""
    n = labels.numel()
    target = domain == "target"
    font = "a" if target else "b"
    lo = jitter_color(g, palette(_VIVID, choice(g, n, len(_VIVID))), 0.15)
    hi = jitter_color(g, lo, 0.3)
    img = _bg_noise(g, n, lo, hi, 4)
    mean = (lo + hi) / 2
    # the digit colour is pushed away from the background so the task stays solvable
    fg = torch.where(mean.mean(1, keepdim=True) > 0.5, mean * 0.25, 0.6 + mean * 0.4)
    fg = jitter_color(g, fg, 0.1)
    height = uniform(g, n, 0.6, 0.75)
    cy = uniform(g, n, -0.08, 0.08)
    cx = uniform(g, n, -0.06, 0.06)
    # distractor digits at both sides (the label is the centred one, as in SVHN)
    gap = height * uniform(g, n, 1.8, 2.1)
    for side in (-1.0, 1.0):
        chars = [DIGITS[i] for i in choice(g, n, 10).tolist()]
        m = draw_glyphs(chars, font, S, height=height, cx=cx + side * gap, cy=cy, theta=torch.zeros(n))
        img = paint(img, stroke(m, torch.full((n,), 0.45)) * col(uniform(g, n, 0.5, 1.0)), fg)
    chars = [DIGITS[i] for i in labels.tolist()]
    m = draw_glyphs(chars, font, S, height=height, cx=cx, cy=cy, theta=uniform(g, n, -0.15, 0.15),
                    shear=uniform(g, n, -0.2, 0.2))
    img = paint(img, stroke(m, uniform(g, n, 0.3, 0.55)), fg)
    return _finish(g, img, (0.0, 0.05), 0.5)


SIGN_CLASSES = ("stop", "yield", "warning", "no parking", "speed limit 3", "speed limit 5", "turn left", "turn right",
                "ahead only", "priority road")


def render_signs(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """GTSRB-like: traffic signs (shape x colour x symbol) at varying size, light and background clutter."""
    n = labels.numel()
    target = domain == "target"
    x, y = coords(S)
    img = _bg_noise(g, n, jitter_color(g, torch.full((n, 3), 0.35), 0.3),
                    jitter_color(g, torch.full((n, 3), 0.6), 0.3), 3)
    r = uniform(g, n, 0.7, 0.9)
    cx, cy = uniform(g, n, -0.1, 0.1), uniform(g, n, -0.1, 0.1)
    theta = uniform(g, n, -0.15, 0.15)
    xr, yr = rotate(x, y, theta, cx, cy)
    xr, yr = xr / col(r), yr / col(r)  # unit sign frame
    red = torch.tensor([0.85, 0.1, 0.1]) if target else torch.tensor([0.6, 0.2, 0.3])
    blue = torch.tensor([0.1, 0.3, 0.85]) if target else torch.tensor([0.2, 0.2, 0.6])
    white, black = torch.tensor([0.97, 0.97, 0.97]), torch.tensor([0.05, 0.05, 0.05])
    yellow = torch.tensor([0.95, 0.8, 0.1]) if target else torch.tensor([0.8, 0.7, 0.4])
    px = 1.0 / (r * S / 2)  # one pixel in the unit sign frame, per sample

    def m(d: Tensor) -> Tensor:  # anti-aliased mask of a distance field in the unit frame
        return (0.5 - d / col(px)).clamp(0, 1)

    circle = torch.sqrt(xr ** 2 + yr ** 2) - 1.0
    octagon = torch.maximum(torch.maximum(xr.abs(), yr.abs()), (xr.abs() + yr.abs()) / math.sqrt(2)) - 0.95
    tri_up = torch.maximum(yr - 0.55, (xr.abs() * 1.732 - yr) / 2 - 0.55)
    tri_dn = torch.maximum(-yr - 0.55, (xr.abs() * 1.732 + yr) / 2 - 0.55)
    diamond = (xr.abs() + yr.abs()) / math.sqrt(2) * 1.25 - 0.9
    bar = torch.maximum(xr.abs() - 0.6, yr.abs() - 0.15)
    out = img.clone()
    labs = labels.tolist()

    def sel(k: int) -> Tensor:
        return torch.tensor([lab == k for lab in labs], dtype=torch.float32).view(-1, 1, 1)

    def glyph(ch: str, scale: float = 0.7) -> Tensor:
        return stroke(draw_glyphs([ch] * n, "a" if target else "b", S, height=r * scale, cx=cx, cy=cy,
                                  theta=theta), torch.full((n,), 0.4))

    layers: list[tuple[Tensor, Tensor]] = []  # (mask, colour) painted in order
    for k, (shape, rim, fill) in enumerate([
        (octagon, red, red), (tri_dn, red, white), (tri_up, red, white), (circle, red, blue), (circle, red, white),
        (circle, red, white), (circle, blue, blue), (circle, blue, blue), (circle, blue, blue),
        (diamond, white, yellow),
    ]):
        s = sel(k)
        layers.append((m(shape) * s, rim.expand(n, 3)))
        layers.append((m(shape + 0.2) * s, fill.expand(n, 3)))
    for mask, colour in layers:
        out = paint(out, mask, colour)
    slash = torch.maximum(((xr - yr) / math.sqrt(2)).abs() - 0.12, ((xr + yr) / math.sqrt(2)).abs() - 0.8)
    symbols = [(0, None, white), (2, "!", black), (3, "/", red), (4, "3", black), (5, "5", black),
               (6, "<", white), (7, ">", white), (8, "^", white)]
    for k, ch, colour in symbols:
        s = sel(k)
        if s.sum() == 0:
            continue
        mask = m(bar) if ch is None else m(slash) if ch == "/" else glyph(ch)
        out = paint(out, mask * s, colour.expand(n, 3))
    out = out * rgb(uniform(g, n, 0.7, 1.1).unsqueeze(1).expand(n, 3))
    return _finish(g, out, (0.0, 0.04), 0.4)


# --------------------------------------------------------------------------------------------------- aerial group
LANDCOVER_CLASSES = ("annual crop", "forest", "herbaceous vegetation", "highway", "industrial", "pasture",
                     "permanent crop", "residential", "river", "sea or lake")


def _land_palette(target: bool) -> dict[str, Tensor]:
    if target:
        return {"green": torch.tensor([0.25, 0.5, 0.2]), "dark": torch.tensor([0.1, 0.28, 0.12]),
                "light": torch.tensor([0.55, 0.7, 0.35]), "brown": torch.tensor([0.55, 0.42, 0.25]),
                "grey": torch.tensor([0.5, 0.5, 0.52]), "water": torch.tensor([0.12, 0.25, 0.5]),
                "roof": torch.tensor([0.75, 0.35, 0.25]), "white": torch.tensor([0.85, 0.85, 0.85])}
    # the pretraining "season": other hues and contrasts for the same land-cover semantics
    return {"green": torch.tensor([0.45, 0.5, 0.3]), "dark": torch.tensor([0.25, 0.3, 0.2]),
            "light": torch.tensor([0.7, 0.7, 0.5]), "brown": torch.tensor([0.6, 0.55, 0.45]),
            "grey": torch.tensor([0.62, 0.6, 0.6]), "water": torch.tensor([0.3, 0.4, 0.55]),
            "roof": torch.tensor([0.6, 0.5, 0.45]), "white": torch.tensor([0.9, 0.9, 0.85])}


def render_landcover(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """EuroSAT-like: land-cover textures seen from above (fields, forest, roads, roofs, water)."""
    n = labels.numel()
    target = domain == "target"
    P = _land_palette(target)
    x, y = coords(S)
    cj = 0.08

    def c(name: str) -> Tensor:
        return jitter_color(g, P[name].expand(n, 3), cj)

    theta = uniform(g, n, 0, TAU)
    xr, yr = rotate(x, y, theta)
    fine = value_noise(g, n, 16, S)
    mid = value_noise(g, n, 6, S)
    smooth = value_noise(g, n, 3, S)
    out = torch.zeros(n, 3, S, S)
    labs = labels
    for k in range(10):
        idx = (labs == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        m = idx.numel()
        gx, gy = xr[idx] if xr.shape[0] == n else xr, yr[idx] if yr.shape[0] == n else yr
        f, md, sm = fine[idx], mid[idx], smooth[idx]
        ci = {name: c(name)[idx] for name in P}
        if k == 0:  # annual crop: parallel strips of two field colours
            period = col(uniform(g, m, 0.25, 0.45))
            t = (torch.sin(gx / period * TAU) > 0).float().unsqueeze(1)
            img = rgb(ci["green"]) * t + rgb(ci["brown"]) * (1 - t) + (f - 0.5) * 0.1
        elif k == 1:  # forest: dark, clumpy canopy
            img = rgb(ci["dark"]) * (0.7 + 0.6 * md) + (f - 0.5) * 0.1
        elif k == 2:  # herbaceous: speckled light vegetation
            img = rgb(ci["light"]) * (0.75 + 0.5 * f) * (0.9 + 0.2 * sm)
        elif k == 3:  # highway: a straight grey road across vegetation
            img = rgb(ci["green"]) * (0.8 + 0.4 * md)
            off = col(uniform(g, m, -0.4, 0.4))
            img = paint(img, soft((gy - off).abs() - col(uniform(g, m, 0.08, 0.14)), S), ci["grey"])
            img = paint(img, soft((gy - off).abs() - 0.02, S) * 0.6, ci["white"])
        elif k == 4:  # industrial: large grey/white blocks
            img = rgb(ci["grey"]) * (0.85 + 0.3 * f)
            for _ in range(4):
                d = box_dist(gx, gy, uniform(g, m, -0.7, 0.7), uniform(g, m, -0.7, 0.7), uniform(g, m, 0.15, 0.35),
                             uniform(g, m, 0.1, 0.3))
                img = paint(img, soft(d, S), jitter_color(g, ci["white"], 0.1))
        elif k == 5:  # pasture: smooth, uniform grass
            img = rgb(ci["light"]) * 0.8 + rgb(ci["green"]) * 0.2 * (0.8 + 0.4 * sm)
        elif k == 6:  # permanent crop: regular rows of tree dots
            period = col(uniform(g, m, 0.22, 0.32))
            u, v = torch.remainder(gx / period, 1.0) - 0.5, torch.remainder(gy / period, 1.0) - 0.5
            dots = soft(torch.sqrt(u ** 2 + v ** 2) * period - period * 0.28, S)
            img = paint(rgb(ci["brown"]) * (0.9 + 0.2 * f), dots, ci["dark"])
        elif k == 7:  # residential: grid of roofs separated by streets
            period = col(uniform(g, m, 0.35, 0.5))
            u, v = torch.remainder(gx / period, 1.0) - 0.5, torch.remainder(gy / period, 1.0) - 0.5
            roofs = soft((torch.maximum(u.abs(), v.abs()) - 0.28) * period, S)
            img = paint(rgb(ci["grey"]) * (0.9 + 0.2 * f), roofs, ci["roof"])
        elif k == 8:  # river: a meandering water band through vegetation
            img = rgb(ci["green"]) * (0.8 + 0.4 * md)
            amp, ph = col(uniform(g, m, 0.15, 0.35)), col(uniform(g, m, 0, TAU))
            d = (gy - amp * torch.sin(gx * 2.5 + ph)).abs() - col(uniform(g, m, 0.12, 0.2))
            img = paint(img, soft(d, S), ci["water"])
        else:  # sea or lake: open water with faint ripples
            img = rgb(ci["water"]) * (0.85 + 0.3 * sm) + (f - 0.5) * 0.05
        out[idx] = img
    return _finish(g, out, (0.01, 0.06), 0.5)


SCENE_AERIAL_CLASSES = ("airport", "baseball diamond", "roundabout", "harbor", "parking lot", "bridge", "stadium",
                        "tennis court", "storage tanks", "railway")


def render_aerial_scenes(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """RESISC45-like: aerial scene layouts (runways, rings, piers, parking grids, tracks, tanks, rails)."""
    n = labels.numel()
    target = domain == "target"
    P = _land_palette(target)
    x, y = coords(S)
    cj = 0.08

    def c(name: str, m: int) -> Tensor:
        return jitter_color(g, P[name].expand(m, 3), cj)

    theta = uniform(g, n, 0, TAU)
    scale = uniform(g, n, 0.8, 1.2)
    xr, yr = rotate(x, y, theta, uniform(g, n, -0.15, 0.15), uniform(g, n, -0.15, 0.15))
    xr, yr = xr / col(scale), yr / col(scale)
    tex = value_noise(g, n, 8, S)
    out = torch.zeros(n, 3, S, S)
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        m = idx.numel()
        gx, gy, t = xr[idx], yr[idx], tex[idx]
        ground = rgb(c("green", m)) * (0.85 + 0.3 * t)
        if k == 0:  # airport: wide runway with dashed centre line and a plane
            img = paint(rgb(c("light", m)) * (0.85 + 0.3 * t), soft(gy.abs() - 0.25, S), c("grey", m))
            dash = soft(torch.maximum(gy.abs() - 0.03, (torch.remainder(gx * 3, 1.0) - 0.5).abs() - 0.25), S)
            img = paint(img, dash, c("white", m))
            px = col(uniform(g, m, -0.6, 0.6))
            plane = torch.minimum(box_dist(gx, gy, px, 0.55, 0.05, 0.25), box_dist(gx, gy, px, 0.55, 0.25, 0.05))
            img = paint(img, soft(plane, S), c("white", m))
        elif k == 1:  # baseball diamond: brown infield quarter on grass, white bases
            d = (gx.abs() + (gy - 0.2).abs()) - 0.6
            img = paint(ground, soft(d, S), c("brown", m))
            img = paint(img, soft((gx.abs() + (gy - 0.2).abs()) - 0.35, S), c("green", m))
            for bx, by in ((0.0, -0.4), (0.6, 0.2), (-0.6, 0.2), (0.0, 0.8)):
                img = paint(img, soft(box_dist(gx, gy, bx, by, 0.06, 0.06), S), c("white", m))
        elif k == 2:  # roundabout: a grey ring with a green island and four roads
            r = torch.sqrt(gx ** 2 + gy ** 2)
            roads = torch.minimum(gx.abs(), gy.abs()) - 0.1
            img = paint(ground, soft(roads, S), c("grey", m))
            img = paint(img, soft((r - 0.45).abs() - 0.12, S), c("grey", m))
            img = paint(img, soft(r - 0.3, S), c("dark", m))
        elif k == 3:  # harbor: water half with piers and boats
            img = paint(rgb(c("grey", m)) * (0.9 + 0.2 * t), soft(-gy, S), c("water", m))
            for px in (-0.6, -0.2, 0.2, 0.6):
                img = paint(img, soft(box_dist(gx, gy, px, 0.35, 0.05, 0.4), S), c("white", m))
            for _ in range(3):
                img = paint(img,
                            soft(box_dist(gx, gy, uniform(g, m, -0.8, 0.8), uniform(g, m, 0.3, 0.8), 0.05, 0.1), S),
                            jitter_color(g, torch.full((m, 3), 0.6), 0.35))
        elif k == 4:  # parking lot: rows of small coloured cars on asphalt
            img = rgb(c("grey", m)) * (0.9 + 0.2 * t)
            u, v = torch.remainder(gx / 0.25, 1.0) - 0.5, torch.remainder(gy / 0.4, 1.0) - 0.5
            cars = soft(torch.maximum(u.abs() - 0.3, v.abs() - 0.3) * 0.25, S)
            carcol = value_noise(g, m, 8, S, channels=3)
            img = img * (1 - cars.unsqueeze(1)) + carcol * cars.unsqueeze(1)
        elif k == 5:  # bridge: a road crossing a water band
            img = paint(ground, soft(gy.abs() - 0.35, S), c("water", m))
            img = paint(img, soft(gx.abs() - 0.12, S), c("grey", m))
            img = paint(img, soft((gx.abs() - 0.12).abs() - 0.02, S), c("white", m))
        elif k == 6:  # stadium: oval running track around a pitch
            e = torch.sqrt((gx / 0.85) ** 2 + (gy / 0.55) ** 2)
            img = paint(rgb(c("grey", m)) * (0.9 + 0.2 * t), soft((e - 1.0) * 0.6, S), c("roof", m))
            img = paint(img, soft((e - 0.75) * 0.6, S), c("green", m))
        elif k == 7:  # tennis court: rectangle with white lines
            court = box_dist(gx, gy, 0.0, 0.0, 0.45, 0.7)
            img = paint(ground, soft(court, S), c("water", m) * 0.5 + c("green", m) * 0.5)
            lines = torch.minimum(torch.minimum((court + 0.04).abs(), torch.maximum(gy.abs(), gx.abs() - 0.45)),
                                  torch.maximum(gx.abs(), gy.abs() - 0.45)) - 0.025
            img = paint(img, soft(lines, S), c("white", m))
        elif k == 8:  # storage tanks: white discs on bare ground
            img = rgb(c("brown", m)) * (0.85 + 0.3 * t)
            for cx0, cy0 in ((-0.45, -0.45), (0.45, -0.45), (-0.45, 0.45), (0.45, 0.45)):
                d = circle_dist(gx, gy, cx0, cy0, 0.3)
                img = paint(img, soft(d, S), c("white", m))
                img = paint(img, soft(d + 0.2, S) * 0.5, c("grey", m))
        else:  # railway: two rails with sleepers on a gravel bed
            img = paint(ground, soft(gy.abs() - 0.3, S), c("brown", m))
            ties = soft(torch.maximum(gy.abs() - 0.22, (torch.remainder(gx * 4, 1.0) - 0.5).abs() - 0.15), S)
            img = paint(img, ties, c("dark", m))
            img = paint(img, soft((gy.abs() - 0.12).abs() - 0.025, S), c("grey", m) * 0.4)
        out[idx] = img
    return _finish(g, out, (0.01, 0.06), 0.5)


# --------------------------------------------------------------------------------------------------- other group
TEXTURE_CLASSES = ("striped", "dotted", "chequered", "zigzagged", "grid", "wavy", "spiralled", "crosshatched",
                   "bubbly", "marbled")


def render_textures(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """DTD-like: procedural textures in random colour pairs, orientations and frequencies."""
    n = labels.numel()
    target = domain == "target"
    x, y = coords(S)
    theta = uniform(g, n, -0.3, 0.3)
    xr, yr = rotate(x, y, theta)
    freq = col(uniform(g, n, 2.0, 3.0))
    a = (xr * freq, yr * freq)
    tex = value_noise(g, n, 5, S)[:, 0]
    out = torch.zeros(n, S, S)
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        u, v, t = a[0][idx], a[1][idx], tex[idx]
        if k == 0:
            f = torch.sin(u * math.pi) * 2
        elif k == 1:
            du, dv = torch.remainder(u, 1.0) - 0.5, torch.remainder(v, 1.0) - 0.5
            f = (0.3 - torch.sqrt(du ** 2 + dv ** 2)) * 8
        elif k == 2:
            f = torch.sin(u * math.pi) * torch.sin(v * math.pi) * 4
        elif k == 3:
            tri = (torch.remainder(u, 1.0) - 0.5).abs() * 2
            f = torch.sin((v + tri * 0.8) * math.pi * 1.5) * 2
        elif k == 4:
            du, dv = (torch.remainder(u, 1.0) - 0.5).abs(), (torch.remainder(v, 1.0) - 0.5).abs()
            f = (torch.maximum(du, dv) - 0.38) * 12
        elif k == 5:
            f = torch.sin((v + 0.35 * torch.sin(u * math.pi)) * math.pi * 1.2) * 2
        elif k == 6:
            r = torch.sqrt(u ** 2 + v ** 2)
            f = torch.sin(torch.atan2(v, u) * 3 + r * math.pi * 2) * 2
        elif k == 7:
            d1 = (torch.remainder((u + v) * 0.7, 1.0) - 0.5).abs()
            d2 = (torch.remainder((u - v) * 0.7, 1.0) - 0.5).abs()
            f = (0.12 - torch.minimum(d1, d2)) * 12
        elif k == 8:
            m = idx.numel()
            f = torch.full_like(u, -1.0)
            xx, yy = x.expand(m, S, S), y.expand(m, S, S)
            for _ in range(6):
                d = circle_dist(xx, yy, uniform(g, m, -1, 1), uniform(g, m, -1, 1), uniform(g, m, 0.15, 0.4))
                f = torch.maximum(f, (0.06 - d.abs()) * 25)
        else:
            f = torch.sin((u + 2.5 * t) * math.pi) * 2
        out[idx] = f
    mask = torch.sigmoid(out * 2.5)
    if target:
        c1 = torch.rand(n, 3, generator=g)
        c2 = (c1 + 0.35 + torch.rand(n, 3, generator=g) * 0.3) % 1.0
    else:  # the pretraining textures are grey-scale
        v1 = uniform(g, n, 0.0, 0.3).unsqueeze(1).expand(n, 3)
        c1, c2 = v1, 1 - v1
    img = rgb(c1) * (1 - mask.unsqueeze(1)) + rgb(c2) * mask.unsqueeze(1)
    return _finish(g, img, (0.0, 0.05), 0.4)


VEHICLE_CLASSES = ("sedan", "hatchback", "pickup truck", "bus", "van", "semi truck", "sports car", "suv",
                   "motorcycle", "tractor")

# Side-view parts in a unit frame (x right = front, y down; ground at y = 0.5): boxes (cx, cy, hw, hh) and
# wheels (cx, r). Classes differ in proportions and part layout, like fine-grained car models.
_VEHICLES = {
    0: ([(0.0, 0.25, 0.8, 0.15), (-0.05, 0.02, 0.4, 0.12)], [(-0.5, 0.16), (0.5, 0.16)]),
    1: ([(0.0, 0.25, 0.6, 0.15), (-0.2, 0.0, 0.4, 0.14)], [(-0.38, 0.16), (0.38, 0.16)]),
    2: ([(0.0, 0.25, 0.85, 0.15), (0.3, -0.02, 0.25, 0.15), (-0.45, 0.06, 0.38, 0.04)], [(-0.55, 0.17), (0.55, 0.17)]),
    3: ([(0.0, 0.05, 0.9, 0.38)], [(-0.6, 0.15), (0.6, 0.15)]),
    4: ([(-0.1, 0.1, 0.6, 0.3), (0.55, 0.22, 0.15, 0.18)], [(-0.4, 0.16), (0.45, 0.16)]),
    5: ([(0.7, 0.1, 0.2, 0.28), (-0.25, -0.02, 0.7, 0.36)], [(-0.7, 0.14), (-0.4, 0.14), (0.65, 0.14)]),
    6: ([(0.0, 0.32, 0.85, 0.09), (-0.15, 0.18, 0.3, 0.07)], [(-0.55, 0.14), (0.55, 0.14)]),
    7: ([(0.0, 0.18, 0.75, 0.2), (-0.05, -0.1, 0.6, 0.14)], [(-0.48, 0.2), (0.48, 0.2)]),
    8: ([(0.0, 0.15, 0.35, 0.07), (-0.1, 0.0, 0.12, 0.15)], [(-0.45, 0.2), (0.45, 0.2)]),
    9: ([(0.15, 0.1, 0.35, 0.15), (-0.2, -0.15, 0.15, 0.22)], [(-0.4, 0.32), (0.55, 0.14)]),
}


def render_vehicles(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """Cars-like: side-view vehicle silhouettes, random colour, direction, position and road/sky background."""
    n = labels.numel()
    target = domain == "target"
    x, y = coords(S)
    scale = uniform(g, n, 0.9, 1.05)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    cx, cy = uniform(g, n, -0.08, 0.08), uniform(g, n, -0.1, 0.1)
    if target:  # coloured vehicles (darker than the scene) on a road under the sky
        sky = jitter_color(g, torch.tensor([0.65, 0.78, 0.92]).expand(n, 3), 0.15)
        road = jitter_color(g, torch.tensor([0.62, 0.62, 0.6]).expand(n, 3), 0.1)
        horizon = col(uniform(g, n, 0.2, 0.5))
        img = paint(rgb(sky).expand(n, 3, S, S).clone(), soft(horizon - y, S), road)
        body_col = torch.rand(n, 3, generator=g) * 0.5
    else:  # pretraining renders: black silhouettes on white
        img = torch.ones(n, 3, S, S) * 0.95
        body_col = torch.full((n, 3), 0.1)
    u = (x - col(cx)) / col(scale) * col(flip)
    v = (y - col(cy)) / col(scale)
    out = img
    for k, (boxes, wheels) in _VEHICLES.items():
        sel = (labels == k).float().view(-1, 1, 1)
        if sel.sum() == 0:
            continue
        d = torch.full_like(u, 10.0)
        for bx, by, hw, hh in boxes:
            d = torch.minimum(d, box_dist(u, v, bx, by, hw, hh))
        wd = torch.full_like(u, 10.0)
        for wx, r in wheels:
            wd = torch.minimum(wd, circle_dist(u, v, wx, 0.5 - r, r))
        out = paint(out, soft(d * col(scale), S) * sel, body_col)
        out = paint(out, soft(wd * col(scale), S) * sel, torch.full((n, 3), 0.08))
    return _finish(g, out, (0.0, 0.05), 0.4)


SCENE_CLASSES = ("beach", "forest path", "skyline", "mountains", "desert", "ocean", "meadow", "city at night",
                 "snowfield", "indoor room")


def render_scenes(labels: Tensor, g: torch.Generator, domain: str) -> Tensor:
    """SUN397-like: scene layouts (horizon, sky, ground, buildings, trees, mountains, rooms)."""
    n = labels.numel()
    target = domain == "target"
    x, y = coords(S)
    cj = 0.12
    # the pretraining scenes have another "photographic style": desaturated, with rotated colour channels
    sat = 1.0 if target else 0.5

    def c(rgb_: tuple[float, float, float], m: int) -> Tensor:
        base = torch.tensor(rgb_)
        base = base.mean() + (base - base.mean()) * sat
        return jitter_color(g, base.expand(m, 3), cj)

    out = torch.zeros(n, 3, S, S)
    hz = uniform(g, n, -0.3, 0.3)
    tex = value_noise(g, n, 8, S)
    for k in range(10):
        idx = (labels == k).nonzero().flatten()
        if idx.numel() == 0:
            continue
        m = idx.numel()
        h, t = col(hz[idx]), tex[idx]
        xx, yy = x.expand(m, S, S), y.expand(m, S, S)
        sky = rgb(c((0.55, 0.7, 0.95), m)) * (0.95 + 0.1 * t)
        if k == 0:  # beach: sky, thin sea band, sand
            img = paint(sky, soft(h - 0.1 - yy, S), c((0.15, 0.35, 0.7), m))
            img = paint(img, soft(h + 0.25 - yy + 0.1 * torch.sin(xx * 3), S), c((0.9, 0.8, 0.55), m))
        elif k == 1:  # forest path: dark green with trunks and a brown path
            img = rgb(c((0.15, 0.4, 0.15), m)) * (0.7 + 0.6 * t)
            for _ in range(4):
                img = paint(img, soft((xx - col(uniform(g, m, -0.9, 0.9))).abs() - 0.07, S), c((0.3, 0.2, 0.1), m))
            img = paint(img,
                        soft((xx.abs() - (yy - h) * 0.5).clamp(min=-1) * (yy > h).float() - 0.0 + (yy <= h).float(), S),
                        c((0.55, 0.45, 0.3), m))
        elif k in (2, 7):  # skyline by day / city at night
            night = k == 7
            img = rgb(c((0.05, 0.05, 0.15), m)) * (0.9 + 0.2 * t) if night else sky
            heights = [uniform(g, m, 0.0, 0.7) for _ in range(5)]
            bcol = c((0.1, 0.1, 0.12), m) if night else c((0.5, 0.5, 0.55), m)
            for j, hh in enumerate(heights):
                cxj = -0.8 + 0.4 * j
                img = paint(img, soft(box_dist(xx, yy, cxj, 1.0, 0.18, col(hh) + 0.3 - h.clamp(max=0)), S), bcol)
            if night:
                lit = (torch.rand(m, 1, 8, 8, generator=g) < 0.35).float()
                lit = torch.nn.functional.interpolate(lit, size=(S, S), mode="nearest")[:, 0]
                ok = ((torch.remainder((xx + 1) * 16, 4.0) < 2).float()
                      * (torch.remainder((yy + 1) * 16, 4.0) < 2).float())
                tallest = torch.stack(heights, 1).max(1).values.view(-1, 1, 1)
                inside = (img.mean(1) < 0.2).float() * (yy > 0.2 - tallest).float()
                img = paint(img, lit * ok * inside, c((0.95, 0.85, 0.3), m))
        elif k == 3:  # mountains: grey peaks with snow caps
            img = sky
            for j in range(3):
                px, ph = col(uniform(g, m, -0.8, 0.8)), col(uniform(g, m, -0.6, -0.1))
                peak = soft(ph + (xx - px).abs() * 1.2 - yy, S)
                img = paint(img, peak, c((0.45, 0.42, 0.45), m))
                img = paint(img, peak * soft(yy - ph - 0.18, S), c((0.95, 0.95, 0.97), m))
            img = paint(img, soft(h + 0.5 - yy, S), c((0.3, 0.45, 0.25), m))
        elif k == 4:  # desert: pale sky, orange dunes
            img = rgb(c((0.85, 0.85, 0.75), m))
            ph = col(uniform(g, m, 0, TAU))
            img = paint(img, soft(h - 0.05 * 0 + 0.12 * torch.sin(xx * 2.5 + ph) - yy, S), c((0.85, 0.55, 0.25), m))
            img = img * (0.9 + 0.2 * t)
        elif k == 5:  # ocean: sky over open water, straight horizon
            img = paint(sky, soft(h - yy, S), c((0.1, 0.25, 0.55), m) * 1.0)
            img = img * (0.95 + 0.1 * t)
        elif k == 6:  # meadow: sky over green field with flowers
            img = paint(sky, soft(h - yy, S), c((0.35, 0.65, 0.2), m))
            flowers = (torch.rand(m, S, S, generator=g) < 0.05).float() * (yy > h).float()
            img = paint(img, flowers, c((0.95, 0.9, 0.3), m))
        elif k == 8:  # snowfield: white ground under grey sky
            img = paint(rgb(c((0.7, 0.72, 0.75), m)), soft(h - yy, S), c((0.95, 0.95, 0.98), m))
            img = img * (0.93 + 0.1 * t)
        else:  # indoor room: walls, floor trapezoid, window
            img = rgb(c((0.85, 0.75, 0.6), m)) * (0.95 + 0.1 * t)
            floor = soft(h + 0.3 - yy, S)
            img = paint(img, floor, c((0.45, 0.3, 0.15), m))
            img = paint(img, soft(box_dist(xx, yy, col(uniform(g, m, -0.4, 0.4)), h - 0.3, 0.25, 0.2), S),
                        c((0.6, 0.8, 1.0), m))
            img = paint(img, soft((xx.abs() - 0.85).abs() - 0.03, S), c((0.5, 0.4, 0.3), m))
        out[idx] = img
    if not target:
        out = out[:, [2, 0, 1]]
    return _finish(g, out, (0.0, 0.05), 0.5)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("digits", DIGITS, "digits and signs", "MNIST-like: light hand-drawn-style digits on black",
                 ('a photo of the number: "{}".',), render_digits),
        TaskSpec("house_numbers", DIGITS, "digits and signs",
                 "SVHN-like: coloured house-number digits on clutter, with distractor digits",
                 ('a photo of the number: "{}".',), render_house_numbers),
        TaskSpec("signs", SIGN_CLASSES, "digits and signs", "GTSRB-like: traffic signs (shape, colour, symbol)",
                 ('a photo of a "{}" traffic sign.', 'a centered photo of a "{}" sign.'),
                 render_signs),
        TaskSpec("landcover", LANDCOVER_CLASSES, "aerial", "EuroSAT-like: land-cover textures from above",
                 ("a satellite photo of {}.", "satellite imagery of {}."), render_landcover),
        TaskSpec("aerial_scenes", SCENE_AERIAL_CLASSES, "aerial", "RESISC45-like: aerial scene layouts",
                 ("satellite imagery of {}.", "aerial imagery of {}."), render_aerial_scenes),
        TaskSpec("textures", TEXTURE_CLASSES, "dissimilar", "DTD-like: procedural textures",
                 ("a photo of a {} texture.", "a photo of a {} pattern."), render_textures),
        TaskSpec("vehicles", VEHICLE_CLASSES, "dissimilar", "Stanford-Cars-like: vehicle silhouettes",
                 ("a photo of a {}.", "a photo of a {}, a type of vehicle."), render_vehicles),
        TaskSpec("scenes", SCENE_CLASSES, "dissimilar", "SUN397-like: scene layouts",
                 ("a photo of a {}.", "a photo of the {}."), render_scenes),
    )
}
TASK_NAMES = tuple(TASKS)
SPLITS = {"train": 0, "validation": 1, "test": 2, "pretrain": 3}


def split_seed(seed: int, task: str, split: str) -> int:
    """Seed of one (task, split) stream: disjoint for every task, split and suite seed."""
    return (int(seed) * 1_000_003 + (TASK_NAMES.index(task) + 1) * 7919 + SPLITS[split] * 104_729) % (2**62)


def generate(task: str, n: int, seed: int, split: str, *, domain: str = "target",
             batch: int = 512) -> tuple[Tensor, Tensor]:
    """``n`` images of ``task`` (uint8 ``[n, 32, 32, 3]``) and balanced labels (int64 ``[n]``), deterministic.

    Example:
        >>> a, la = generate("signs", 20, seed=0, split="test")
        >>> b, lb = generate("signs", 20, seed=0, split="test")
        >>> bool((a == b).all()) and la.tolist() == lb.tolist()
        True
    """
    from .render import to_uint8

    spec = TASKS[task]
    g = torch.Generator().manual_seed(split_seed(seed, task, split))
    c = len(spec.classes)
    labels = (torch.arange(n) % c)[torch.randperm(n, generator=g)]
    chunks = [to_uint8(spec.render(labels[i:i + batch], g, domain)) for i in range(0, n, batch)]
    return (torch.cat(chunks) if chunks else torch.zeros(0, S, S, 3, dtype=torch.uint8)), labels
