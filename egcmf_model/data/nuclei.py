"""Tissue layout and nuclei for the synthetic generator, in pixels of the 40x canvas.

``place_structures`` puts ducts, acini and nests side by side without overlap, ``rasterise``
turns them into the maps the stains are painted from, and ``nuclei_layer`` stamps nuclei of given
shapes, sizes and orientations at random positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

IN_SITU, INVASIVE, BENIGN, FAT = 1, 2, 3, 4  # structure kinds; 0 is stroma
LABEL_OF_KIND = {IN_SITU: 1, INVASIVE: 2, BENIGN: 0, FAT: 0}
# Radii: acini and small ducts of a lobule, lobular units filled by carcinoma in situ, invasive
# nests; all fit in the tiny preset's 64 µm field of view with their rim.
RADIUS_UM = {BENIGN: (10.0, 22.0), IN_SITU: (13.0, 25.0), INVASIVE: (7.0, 22.0),
             FAT: (15.0, 35.0)}
IRREGULARITY = {BENIGN: 0.06, IN_SITU: 0.08, INVASIVE: 0.25, FAT: 0.05}  # outline harmonics
AREA_PER_STRUCTURE_UM2 = 1600.0  # tissue area per structure, on average
GAP_UM = 4.0  # stroma between neighbouring structures, at least
FAT_SHARE = 0.1  # of the structures: adipocytes


@dataclass(frozen=True)
class Structure:
    kind: int  # IN_SITU, INVASIVE or BENIGN
    cy: float  # centre, canvas pixels
    cx: float
    radius: float  # mean radius, pixels
    harmonics: tuple[tuple[float, int, float], ...]  # (amplitude, frequency, phase) of the outline


def place_structures(rng: np.random.Generator, shape: tuple[int, int],
                     mix: tuple[float, float, float], px: Callable[[float], float]
                     ) -> list[Structure]:
    """Non-overlapping structures whose kinds follow ``mix`` (benign, in situ, invasive), with a
    few fat cells; centres may lie outside the canvas, so the border cuts structures as in a real
    ROI."""
    area_um2 = shape[0] * shape[1] / px(1.0) ** 2
    wanted = max(1, int(rng.poisson(area_um2 / AREA_PER_STRUCTURE_UM2)))
    placed: list[Structure] = []
    for _ in range(30 * wanted):
        if len(placed) == wanted:
            break
        kind = FAT if rng.random() < FAT_SHARE else int(rng.choice([BENIGN, IN_SITU, INVASIVE],
                                                                     p=mix))
        radius = px(float(rng.uniform(*RADIUS_UM[kind])))
        reach = radius * (1 + 3 * IRREGULARITY[kind])
        cy, cx = (rng.uniform(-0.3 * radius, n + 0.3 * radius) for n in shape)
        if any(np.hypot(cy - s.cy, cx - s.cx) < reach + s.radius * (1 + 3 * IRREGULARITY[s.kind])
               + px(GAP_UM) for s in placed):
            continue
        harmonics = tuple((float(rng.uniform(0, IRREGULARITY[kind])), k,
                           float(rng.uniform(0, 2 * np.pi))) for k in (2, 3, 5))
        placed.append(Structure(kind, float(cy), float(cx), radius, harmonics))
    return placed


def rasterise(structures: Sequence[Structure], shape: tuple[int, int], rim: float, lining: float
              ) -> dict[str, np.ndarray]:
    """Per-pixel maps: ``label`` (class ids), ``kind``, ``inside``, ``rim`` (myoepithelial layer
    of benign and in-situ structures), ``lining`` and ``lumen`` (benign), ``tumour`` (atypical
    epithelium), ``fat`` and ``tangent`` (orientation of the outline through each pixel)."""
    kind = np.zeros(shape, np.uint8)
    depth = np.zeros(shape, np.float32)  # distance inward from the outline
    tangent = np.zeros(shape, np.float32)
    for s in structures:
        reach = s.radius * np.prod([1 + amp for amp, _, _ in s.harmonics]) + 1
        y0, y1 = max(0, int(s.cy - reach)), min(shape[0], int(s.cy + reach) + 1)
        x0, x1 = max(0, int(s.cx - reach)), min(shape[1], int(s.cx + reach) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - s.cy, xx - s.cx
        theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
        outline = np.full(dist.shape, s.radius, np.float32)
        for amp, k, phase in s.harmonics:
            outline *= 1.0 + amp * np.sin(k * theta + phase)
        inside = dist < outline
        box = (slice(y0, y1), slice(x0, x1))
        kind[box][inside] = s.kind
        depth[box][inside] = (outline - dist)[inside]
        tangent[box][inside] = (theta + np.pi / 2)[inside]
    walled = (kind == IN_SITU) | (kind == BENIGN)
    wall = walled & (depth < rim)
    lining_mask = (kind == BENIGN) & (depth >= rim) & (depth < rim + lining)
    label = np.zeros(shape, np.uint8)
    for k, value in LABEL_OF_KIND.items():
        label[kind == k] = value
    return {
        "label": label,
        "kind": kind,
        "inside": (kind > 0) & (kind != FAT),
        "fat": kind == FAT,
        "rim": wall,
        "lining": lining_mask,
        "lumen": (kind == BENIGN) & (depth >= rim + lining),
        "tumour": ((kind == IN_SITU) & ~wall) | (kind == INVASIVE),
        "tangent": tangent,
    }


def _kernel(a: float, b: float, angle: float) -> np.ndarray:
    """Anti-aliased filled ellipse of semi-axes ``a`` (across) and ``b`` (along ``angle``)."""
    half = int(np.ceil(max(a, b))) + 1
    y, x = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    along = x * np.cos(angle) + y * np.sin(angle)
    across = -x * np.sin(angle) + y * np.cos(angle)
    r = np.hypot(across / a, along / b)
    return np.clip((1.0 - r) * min(a, b) + 0.5, 0.0, 1.0)


def _gaussian(sigma: float) -> np.ndarray:
    half = int(np.ceil(3 * sigma))
    y, x = np.mgrid[-half : half + 1, -half : half + 1]
    return np.exp(-(x**2 + y**2) / (2 * sigma**2))


def nuclei_layer(rng: np.random.Generator, density: np.ndarray,
                 shapes: Sequence[float | tuple[float, float]],
                 granular: np.ndarray | None = None, angle: np.ndarray | None = None
                 ) -> np.ndarray:
    """Haematoxylin of nuclei centred at random with per-pixel probability ``density``.

    Args:
        shapes: radii (round nuclei) or ``(a, b)`` semi-axes (elongated, along ``angle``); each
            nucleus takes one at random (pleomorphism).
        granular: per-pixel probability that a nucleus has granular chromatin and a nucleolus,
            detail finer than 1 µm, at the same haematoxylin mass as a smooth nucleus.
        angle: per-pixel orientation of elongated nuclei (radians).
    """
    ys, xs = np.nonzero(rng.random(density.shape) < density)
    n = len(ys)
    weight = rng.uniform(0.8, 1.1, n)
    form = rng.integers(len(shapes), size=n)
    grain = (rng.random(n) < granular[ys, xs]) if granular is not None else np.zeros(n, bool)
    turn = np.zeros(n) if angle is None else angle[ys, xs]
    texture = None
    if grain.any():  # chromatin granules of about 0.2 µm
        texture = ndimage.gaussian_filter(rng.normal(0, 1, density.shape), 0.8)
        texture /= texture.std() + 1e-9
    nucleolus = 0.9 * _gaussian(1.2)
    out = np.zeros(density.shape)
    for i in range(n):
        size = shapes[form[i]]
        a, b = (size, size) if np.isscalar(size) else size
        stamp = weight[i] * _kernel(a, b, float(turn[i]))
        if grain[i]:
            patch = _window(texture, ys[i], xs[i], stamp.shape[0] // 2)
            grainy = stamp * np.clip(1.0 + 1.2 * patch, 0.1, None)
            _add(grainy, nucleolus)
            stamp = grainy * (stamp.sum() / max(grainy.sum(), 1e-9))  # same haematoxylin mass
        _add_at(out, stamp, ys[i], xs[i])
    return out


def _window(field: np.ndarray, y: int, x: int, half: int) -> np.ndarray:
    """``(2 half + 1)^2`` patch of ``field`` centred at (y, x), edge-padded."""
    padded = np.pad(field[max(0, y - half) : y + half + 1, max(0, x - half) : x + half + 1],
                    [(max(0, half - y), max(0, y + half + 1 - field.shape[0])),
                     (max(0, half - x), max(0, x + half + 1 - field.shape[1]))], mode="edge")
    return padded


def _add(big: np.ndarray, small: np.ndarray) -> None:
    """Add ``small`` into the centre of ``big`` (both odd-sided, small no larger)."""
    o = (big.shape[0] - small.shape[0]) // 2
    if o >= 0:
        big[o : o + small.shape[0], o : o + small.shape[1]] += small


def _add_at(out: np.ndarray, stamp: np.ndarray, y: int, x: int) -> None:
    """Add ``stamp`` centred at (y, x), clipped at the borders of ``out``."""
    half = stamp.shape[0] // 2
    y0, x0 = y - half, x - half
    ys = slice(max(0, y0), min(out.shape[0], y0 + stamp.shape[0]))
    xs = slice(max(0, x0), min(out.shape[1], x0 + stamp.shape[1]))
    out[ys, xs] += stamp[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
