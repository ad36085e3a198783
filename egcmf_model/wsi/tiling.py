"""Overlapping tiles over the tissue, Gaussian blending, and the on-disk map they stream into.

Tiles are visited row by row. Their class probabilities, weighted by a Gaussian that favours each
tile's centre, are summed into a band of rows as tall as one tile; when the next row of tiles
starts lower, the rows above it can receive nothing more, so they are divided by their weights,
turned into labels and tumour probability, and written to a file. Memory holds one band, never
the slide.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HIGH_MPP = 0.25  # µm per pixel of the network's 40x input, as in site folders
LOW_MPP = HIGH_MPP * 4  # its 10x output (SCALE = 4)
PROBABILITY_SCALE = 255  # tumour probability is stored as uint8, 255 = 1.0
NOT_ANALYSED = 255  # label of pixels no tile reached (no tissue), as unannotated in masks


@dataclass(frozen=True)
class TileGrid:
    """Tile origins on a grid of ``height`` x ``width`` pixels (the 40x network grid)."""

    height: int
    width: int
    tile: int
    stride: int

    def origins(self, length: int) -> list[int]:
        return list(range(0, max(length - self.tile, 0) + self.stride, self.stride))

    def rows(self, keep: np.ndarray) -> Iterator[tuple[int, list[int]]]:
        """``(top, [left, ...])`` of the tiles ``keep[i, j]`` selects, top to bottom."""
        for i, top in enumerate(self.origins(self.height)):
            lefts = [left for j, left in enumerate(self.origins(self.width)) if keep[i, j]]
            if lefts:
                yield top, lefts

    def tissue_tiles(self, tissue: np.ndarray, scale: float) -> np.ndarray:
        """``(rows, cols)`` bool: tiles with any tissue; ``scale`` = mask px per grid px."""
        ys, xs = self.origins(self.height), self.origins(self.width)
        keep = np.zeros((len(ys), len(xs)), bool)
        for i, top in enumerate(ys):
            r0, r1 = int(top * scale), math.ceil((top + self.tile) * scale)
            band = tissue[r0:r1]
            for j, left in enumerate(xs):
                keep[i, j] = band[:, int(left * scale):math.ceil((left + self.tile) * scale)].any()
        return keep


def gaussian_weight(side: int) -> np.ndarray:
    """``(side, side)`` weights, 1 at the centre, exp(-2) at the middle of each edge."""
    g = np.exp(-0.5 * ((np.arange(side) + 0.5 - side / 2) / (side / 4)) ** 2)
    return np.outer(g, g).astype(np.float32)


class RasterStore:
    """A ``(height, width, channels)`` uint8 raster in a plain file, read and written by rows
    (no memory map: what is read is all that is held)."""

    def __init__(self, path: Path, height: int, width: int, channels: int) -> None:
        self.path, self.height, self.width, self.channels = path, height, width, channels
        self.row_bytes = width * channels
        with open(path, "wb") as f:
            f.truncate(height * self.row_bytes)
        self.fd = os.open(path, os.O_RDWR)

    def write_rows(self, top: int, rows: np.ndarray) -> None:
        os.pwrite(self.fd, np.ascontiguousarray(rows, np.uint8).tobytes(), top * self.row_bytes)

    def read_rows(self, indices: Sequence[int]) -> np.ndarray:
        """Rows at sorted, distinct ``indices``, as ``(len, width, channels)``."""
        out = np.empty((len(indices), self.width, self.channels), np.uint8)
        indices = np.asarray(indices)
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        for run, start in zip(np.split(indices, breaks), np.r_[0, breaks], strict=True):
            if len(run):
                data = os.pread(self.fd, len(run) * self.row_bytes, int(run[0]) * self.row_bytes)
                out[start:start + len(run)] = np.frombuffer(data, np.uint8).reshape(
                    len(run), self.width, self.channels)
        return out

    def close(self) -> None:
        os.close(self.fd)


class StripBlender:
    """Gaussian-weighted sum of tile probabilities over a band of ``tile`` rows.

    Args:
        store: where finished rows go: channel 0 the label (``NOT_ANALYSED`` where no tile
            reached), channel 1 tumour probability.
        classes: K; tumour: class ids summed into the tumour probability.
        tile: tile side on the store's grid.
    """

    def __init__(self, store: RasterStore, classes: int, tumour: Sequence[int], tile: int) -> None:
        self.store, self.tumour, self.tile = store, list(tumour), tile
        self.acc = np.zeros((classes, tile, store.width), np.float32)
        self.weight = np.zeros((tile, store.width), np.float32)
        self.kernel = gaussian_weight(tile)
        self.top = 0

    def add(self, left: int, probs: np.ndarray) -> None:
        """Add ``(K, tile, tile)`` probabilities of a tile at row ``self.top``, column ``left``."""
        w = min(self.tile, self.store.width - left)
        self.acc[:, :, left:left + w] += probs[:, :, :w] * self.kernel[:, :w]
        self.weight[:, left:left + w] += self.kernel[:, :w]

    def advance(self, top: int) -> None:
        """Rows above ``top`` are final: write them and move the band down."""
        top = min(top, self.store.height)
        done = min(top - self.top, self.tile)
        self._flush(done)
        self.acc = np.roll(self.acc, -done, axis=1)
        self.weight = np.roll(self.weight, -done, axis=0)
        self.acc[:, self.tile - done:] = 0
        self.weight[self.tile - done:] = 0
        for gap in range(self.top + done, top, self.tile):  # rows no tile reached
            n = min(self.tile, top - gap)
            rows = np.zeros((n, self.store.width, 2), np.uint8)
            rows[..., 0] = NOT_ANALYSED
            self.store.write_rows(gap, rows)
        self.top = top

    def finish(self) -> None:
        self.advance(self.store.height)

    def _flush(self, rows: int) -> None:
        rows = min(rows, self.store.height - self.top)
        if rows <= 0:
            return
        weight = self.weight[:rows]
        probs = self.acc[:, :rows] / np.maximum(weight, 1e-12)
        labels = probs.argmax(axis=0).astype(np.uint8)
        labels[weight == 0] = NOT_ANALYSED
        tumour = probs[self.tumour].sum(axis=0)
        scaled = np.clip(tumour * PROBABILITY_SCALE, 0, PROBABILITY_SCALE).round()
        self.store.write_rows(self.top, np.stack([labels, scaled.astype(np.uint8)], axis=-1))
