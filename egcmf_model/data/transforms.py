"""Array transforms shared by the Dataset and prediction: resampling, edge inputs, augmentation."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..config import ORIENTATIONS
from .io import IGNORE_INDEX
from .stain import dab_density, jitter_hed

SCALE = 4  # 40x (0.25 µm/px) -> 10x (1.0 µm/px)
DAB_GAIN = 10.0  # rgb2hed DAB densities are ~0-0.2; scaled to ~0-2 for the network
TUMOUR_CLASSES = ("in_situ", "invasive", "tumor")


def to_10x(rgb40: np.ndarray) -> np.ndarray:
    """Area-average ``(4H, 4W, 3)`` -> ``(H, W, 3)`` float32 in [0, 255]."""
    h, w = rgb40.shape[0] // SCALE, rgb40.shape[1] // SCALE
    return rgb40[: h * SCALE, : w * SCALE].reshape(h, SCALE, w, SCALE, -1).mean(axis=(1, 3),
                                                                                   dtype=np.float32)


def mask_to_10x(mask40: np.ndarray) -> np.ndarray:
    """Majority label of each 4x4 block: ``(4H, 4W)`` -> ``(H, W)`` uint8."""
    h, w = mask40.shape[0] // SCALE, mask40.shape[1] // SCALE
    blocks = mask40[: h * SCALE, : w * SCALE].reshape(h, SCALE, w, SCALE).transpose(0, 2, 1, 3)
    flat = blocks.reshape(h * w, SCALE * SCALE).astype(np.int64)
    counts = np.zeros((h * w, 256), np.int32)
    np.add.at(counts, (np.arange(h * w)[:, None], flat), 1)
    return counts.argmax(axis=1).astype(np.uint8).reshape(h, w)


def edge_input(ck_rgb10: np.ndarray) -> np.ndarray:
    """``X_edge``: ``(H, W, 3)`` CK5/6 RGB -> ``(2, H, W)`` grayscale and DAB optical density."""
    rgb = np.clip(ck_rgb10, 0, 255).astype(np.uint8)
    gray = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0
    return np.stack([gray, DAB_GAIN * dab_density(rgb)]).astype(np.float32)


def normalise_rgb(rgb: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` in [0, 255] -> ``(3, H, W)`` float32 centred around 0."""
    return ((np.asarray(rgb, np.float32) / 255.0 - 0.5) / 0.25).transpose(2, 0, 1).copy()


def tumour_ids(classes: tuple[str, ...]) -> list[int]:
    return [i for i, name in enumerate(classes) if name in TUMOUR_CLASSES]


def edge_target(mask10: np.ndarray, classes: tuple[str, ...], kind: str, band: int) -> np.ndarray:
    """``(H, W)`` float32: the tumour boundary band (``boundary``) or the tumour mask (``mask``)."""
    tumour = np.isin(mask10, tumour_ids(classes))
    if kind == "mask":
        return tumour.astype(np.float32)
    grown = ndimage.binary_dilation(tumour, iterations=band)
    shrunk = ndimage.binary_erosion(tumour, iterations=band, border_value=1)
    return (grown & ~shrunk).astype(np.float32)


def tile_origins(length: int, tile: int) -> list[int]:
    """Tile starts covering ``length``; the last tile ends at the border (overlap, no padding)."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile), length - tile]


def pad_to(array: np.ndarray, side: int, value: int) -> np.ndarray:
    """Pad the first two axes at the bottom/right up to ``side`` (never crops)."""
    ph, pw = max(0, side - array.shape[0]), max(0, side - array.shape[1])
    if not ph and not pw:
        return array
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad, constant_values=value)


def augment(
    arrays: dict[str, np.ndarray], rng: np.random.Generator, stain_jitter: float = 0.0,
    orientation: int | None = None,
) -> dict[str, np.ndarray]:
    """The same flip and 90-degree rotation for every array; optional HED jitter of RGB stains.

    ``orientation`` (0 to 7) picks the rotation and flip; None draws them from ``rng``."""
    if orientation is None:
        k, flip = int(rng.integers(4)), bool(rng.random() < 0.5)
    else:
        k, flip = orientation % 4, orientation // 4 % 2 == 1
    out = {}
    for key, array in arrays.items():
        array = np.rot90(array, k, axes=(0, 1))
        out[key] = np.ascontiguousarray(array[:, ::-1] if flip else array)
    if stain_jitter > 0:
        for key in ("he", "ck56"):
            if key in out:
                out[key] = jitter_hed(out[key], rng, stain_jitter)
    return out


__all__ = ["IGNORE_INDEX", "ORIENTATIONS", "SCALE", "augment", "edge_input", "edge_target",
           "mask_to_10x", "normalise_rgb", "pad_to", "tile_origins", "to_10x", "tumour_ids"]
