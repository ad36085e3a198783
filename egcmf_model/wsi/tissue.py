"""Tissue detection on a low-resolution view of the slide: Otsu on saturation, cleaned up.

Glass is bright and grey (saturation near 0); stained tissue is coloured. Otsu's threshold on
the saturation channel separates the two; it is bounded so that a slide covered in tissue is not
split into "pale" and "dark" tissue, and so that a blank slide stays blank. Specks smaller than
``min_area_um2`` (dust, debris) are dropped and holes smaller than it (fat, lumina) are filled.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

TISSUE_MPP = 4.0  # µm per pixel of the view tissue is detected on (about a 2.5x objective)
SATURATION_RANGE = (0.05, 0.15)  # Otsu's threshold is clipped to this range
MIN_AREA_UM2 = 10_000.0  # a tissue piece or hole smaller than 0.01 mm² is dropped or filled


def tissue_mask(rgb: np.ndarray, mpp: float, min_area_um2: float = MIN_AREA_UM2) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB at ``mpp`` µm/px -> ``(H, W)`` bool, True where tissue is."""
    saturation = rgb2hsv(rgb)[..., 1]
    values = saturation.ravel()[::max(1, saturation.size // 1_000_000)]  # a subsample suffices
    threshold = threshold_otsu(values) if np.ptp(values) > 0 else SATURATION_RANGE[1]
    mask = saturation > np.clip(threshold, *SATURATION_RANGE)
    mask &= rgb.min(axis=-1) < 250  # pure white is glass whatever its hue noise says
    min_px = max(1, round(min_area_um2 / mpp**2))
    mask = _drop_small(mask, min_px)
    return ~_drop_small(~mask, min_px)  # fills holes


def _drop_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    """``mask`` without its connected pieces of at most ``min_px`` pixels."""
    labels, _ = ndimage.label(mask)
    keep = np.bincount(labels.ravel()) > min_px
    keep[0] = False
    return keep[labels]
