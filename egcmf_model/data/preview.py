"""Pictures a person can look at: class colours, overlays and the synthetic preview grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import IGNORE_INDEX, read_mask, read_rgb, write_png
from .sites import find_sites, load_site_meta

# One colour per class id (up to 8 classes); ignored pixels are grey.
PALETTE = np.array([[255, 255, 255], [0, 170, 60], [220, 30, 30], [40, 90, 230],
                    [240, 170, 0], [150, 60, 200], [0, 190, 200], [120, 80, 40]], np.uint8)
IGNORE_COLOUR = np.array([128, 128, 128], np.uint8)


def colourise(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` class ids -> ``(H, W, 3)`` uint8 colours."""
    out = PALETTE[np.minimum(mask, len(PALETTE) - 1)]
    out[mask == IGNORE_INDEX] = IGNORE_COLOUR
    return out


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend class colours over an image; background (class 0) stays untouched."""
    colours = colourise(mask).astype(np.float32)
    blend = np.where((mask > 0)[..., None], (1 - alpha) * rgb + alpha * colours, rgb)
    return blend.round().astype(np.uint8)


def write_preview(root: Path, out: Path, per_site: int = 3, thumb: int = 192) -> Path:
    """Grid: one row per site, for up to ``per_site`` ROIs the H&E, CK5/6 and mask overlay."""
    rows = []
    for site_dir in find_sites(root):
        meta = load_site_meta(site_dir)
        ids = [roi for ids in meta.splits.values() for roi in ids][:per_site]
        cells = []
        for roi in ids:
            files = meta.files(roi)
            he = read_rgb(files["he"])
            ck = read_rgb(files["ck56"]) if "ck56" in files else np.full_like(he, 255)
            shown = [he, ck, overlay(he, read_mask(files["mask"]))]
            cells.extend(_thumb(a, thumb) for a in shown)
        cells += [np.full((thumb, thumb, 3), 255, np.uint8)] * (3 * per_site - len(cells))
        rows.append(np.concatenate(_spaced(cells, axis=1), axis=1))
    write_png(out, np.concatenate(_spaced(rows, axis=0), axis=0))
    return out


def _thumb(array: np.ndarray, side: int) -> np.ndarray:
    idx = np.linspace(0, array.shape[0] - 1, side).round().astype(int)
    jdx = np.linspace(0, array.shape[1] - 1, side).round().astype(int)
    return array[idx][:, jdx]


def _spaced(arrays: list[np.ndarray], axis: int, gap: int = 4) -> list[np.ndarray]:
    out = []
    for i, a in enumerate(arrays):
        if i:
            shape = list(a.shape)
            shape[axis] = gap
            out.append(np.full(shape, 255, np.uint8))
        out.append(a)
    return out
