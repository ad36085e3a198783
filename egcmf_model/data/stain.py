"""Stain optics: Beer-Lambert rendering and HED colour deconvolution.

The stain vectors are Ruifrok & Johnston's, the same that ``skimage.color.rgb2hed`` uses, so a
synthetic slide rendered here deconvolves back into the concentrations it was made from.
"""

from __future__ import annotations

import numpy as np
from skimage.color import hed2rgb, rgb2hed

# Optical-density vectors of haematoxylin, eosin and DAB (rows), as in skimage.color.
STAINS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
STAINS = STAINS / np.linalg.norm(STAINS, axis=1, keepdims=True)


def render(concentrations: np.ndarray, stains: np.ndarray = STAINS) -> np.ndarray:
    """Beer-Lambert: ``(H, W, 3)`` stain optical densities -> ``(H, W, 3)`` uint8 RGB."""
    od = concentrations @ stains  # (H, W, 3 channels)
    return np.clip(255.0 * np.exp(-od), 0, 255).round().astype(np.uint8)


def deconvolve(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> ``(H, W, 3)`` float32 H, E, DAB densities (rgb2hed)."""
    return rgb2hed(rgb).astype(np.float32)


def dab_density(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` DAB optical density of an RGB image, clipped at 0."""
    return np.clip(deconvolve(rgb)[..., 2], 0, None)


def haematoxylin_density(rgb: np.ndarray) -> np.ndarray:
    """``(H, W)`` haematoxylin optical density of an RGB image, clipped at 0."""
    return np.clip(deconvolve(rgb)[..., 0], 0, None)


def jitter_hed(rgb: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """HED stain augmentation: scale and shift each stain density by ~N(1, sigma), N(0, sigma)."""
    hed = rgb2hed(rgb)
    alpha = rng.normal(1.0, sigma, size=3)
    beta = rng.normal(0.0, sigma * 0.05, size=3)
    out = hed2rgb(hed * alpha + beta)
    return np.clip(out * 255.0, 0, 255).round().astype(np.uint8)
