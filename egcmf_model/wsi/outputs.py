"""What whole-slide prediction leaves behind: the label and probability TIFFs, the QuPath
GeoJSON, a thumbnail with the prediction over the H&E, and the class areas."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.io import write_png
from ..data.preview import PALETTE, overlay
from .annotations import write_label_geojson
from .pyramid import level_shapes, write_pyramid
from .tiling import NOT_ANALYSED, PROBABILITY_SCALE, RasterStore

THUMBNAIL_SIDE = 2048  # longest side of thumbnail.png, about
ROWS = 1024  # rows of the map read at a time when counting areas


class PredictionMap:
    """The 10x map of labels and tumour probability, seen at any resolution of the slide.

    Args:
        store: channel 0 labels, channel 1 tumour probability (x255).
        mpp: µm per pixel of the store; slide_mpp, slide_shape: the H&E's level 0.
    """

    def __init__(self, store: RasterStore, mpp: float, slide_mpp: float,
                 slide_shape: tuple[int, int]) -> None:
        self.store, self.mpp = store, mpp
        self.slide_mpp, self.shapes = slide_mpp, level_shapes(*slide_shape)

    def sample(self, channel: int, mpp: float, top: int, height: int, width: int) -> np.ndarray:
        """``(height, width)`` of ``channel`` at ``mpp`` (nearest), rows from ``top``."""
        rows = np.minimum(((np.arange(top, top + height) + 0.5) * mpp / self.mpp).astype(int),
                          self.store.height - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * mpp / self.mpp).astype(int),
                          self.store.width - 1)
        unique, inverse = np.unique(rows, return_inverse=True)
        return self.store.read_rows(unique)[inverse][:, cols, channel]

    def write_tiff(self, path: Path, channel: int, description: str,
                   palette: np.ndarray | None = None) -> Path:
        """A pyramid with the H&E's level-0 size and µm per pixel, so it overlays the slide."""
        def strip(level: int, top: int, height: int) -> np.ndarray:
            mpp = self.slide_mpp * 4**level
            return self.sample(channel, mpp, top, height, self.shapes[level][1])

        return write_pyramid(path, strip, self.shapes, self.slide_mpp, 1, style="tiff",
                             compression="zlib", description=description, palette=palette)

    def write_geojson(self, path: Path, classes: Sequence[str]) -> int:
        def read(top: int, left: int, height: int, width: int) -> np.ndarray:
            return self.store.read_rows(range(top, top + height))[:, left:left + width, 0]

        return write_label_geojson(path, read, (self.store.height, self.store.width), classes,
                                   scale=self.mpp / self.slide_mpp, mpp=self.slide_mpp)

    def areas_mm2(self, classes: Sequence[str]) -> dict[str, float]:
        """Area of each class over the analysed tissue."""
        counts = np.zeros(256, np.int64)
        for top in range(0, self.store.height, ROWS):
            rows = range(top, min(top + ROWS, self.store.height))
            counts += np.bincount(self.store.read_rows(rows)[..., 0].ravel(), minlength=256)
        return {name: round(float(counts[i]) * self.mpp**2 / 1e6, 4)
                for i, name in enumerate(classes)}

    def write_thumbnail(self, path: Path, he: np.ndarray, mpp: float) -> Path:
        """``he`` (the H&E at ``mpp``) with the predicted classes over it."""
        labels = self.sample(0, mpp, 0, he.shape[0], he.shape[1])
        write_png(path, overlay(he, np.where(labels == NOT_ANALYSED, 0, labels)))
        return path


def label_palette() -> np.ndarray:
    """``(256, 3)`` colours of class ids (the ROI overlays' colours), unused ids black, pixels
    outside the analysed tissue white."""
    palette = np.zeros((256, 3), np.uint8)
    palette[:len(PALETTE)] = PALETTE
    palette[NOT_ANALYSED] = 255
    return palette


def label_description(classes: Sequence[str]) -> str:
    names = ", ".join(f"{i}={name}" for i, name in enumerate(classes))
    return f"EGCMF-FL predicted class ids: {names}, {NOT_ANALYSED}=not analysed (no tissue)"


def probability_description(classes: Sequence[str], tumour: Sequence[int]) -> str:
    names = "+".join(classes[i] for i in tumour)
    return f"EGCMF-FL tumour probability ({names}), {PROBABILITY_SCALE} = 1.0"

