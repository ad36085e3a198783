"""Pyramidal TIFF writing, streamed: each level is produced strip by strip and written tile by
tile, so no level is ever held whole in memory.

Levels are top-level pages (what OpenSlide and QuPath read). ``style="tiff"`` writes a generic
tiled TIFF whose resolution tags give µm per pixel (OpenSlide reports it as ``openslide.mpp-x``);
``style="svs"`` writes the Aperio layout (level 0, a thumbnail page, the other levels) with the
Aperio description that carries ``MPP``, as SVS scanners do.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tifffile

from .tiling import RasterStore

DOWNSAMPLE = 4  # between successive levels
SMALLEST = 256  # levels are added until the longest side is at most this
APERIO = "Aperio Image Library v12.0.15"
BIGTIFF_BYTES = 2**31  # above this (uncompressed) the file is written as BigTIFF

Strip = Callable[[int, int, int], np.ndarray]  # (level, top, height) -> (height, width[, C])


def level_shapes(height: int, width: int) -> list[tuple[int, int]]:
    """``(height, width)`` of every level, each a quarter of the one before."""
    shapes = [(height, width)]
    while max(shapes[-1]) > SMALLEST:
        h, w = shapes[-1]
        shapes.append((math.ceil(h / DOWNSAMPLE), math.ceil(w / DOWNSAMPLE)))
    return shapes


def write_pyramid(path: Path, strip: Strip, shapes: Sequence[tuple[int, int]],
                  mpp: float | None, channels: int, *, style: str = "tiff",
                  compression: str = "zlib",
                  quality: int = 90, tile: int = 512, description: str = "",
                  palette: np.ndarray | None = None,
                  thumbnail: Callable[[], np.ndarray] | None = None) -> Path:
    """Write ``path``: level ``k`` has ``shapes[k]`` and ``mpp * 4**k`` µm/px, its pixels from
    ``strip(k, top, height)``. ``channels`` is 1 (grey) or 3 (RGB); ``mpp=None`` records no
    resolution at all (as some scanners' exports). ``palette`` ``(256, 3)`` uint8 makes a
    one-channel image an indexed-colour one: viewers show the colours, the values stay ids.
    ``thumbnail`` gives the SVS thumbnail page (default: the smallest level)."""
    photometric = "rgb" if channels == 3 else "minisblack" if palette is None else "palette"
    args: dict = {"compression": compression, "photometric": photometric, "metadata": None}
    if palette is not None:
        args["colormap"] = palette.T.astype(np.uint16) * 257  # TIFF colour maps are 16-bit
    if compression == "jpeg":
        args["compressionargs"] = {"level": quality}
    h0, w0 = shapes[0]
    bigtiff = h0 * w0 * channels > BIGTIFF_BYTES
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=bigtiff) as tif:
        for level, (h, w) in enumerate(shapes):
            level_mpp = None if mpp is None else mpp * DOWNSAMPLE**level
            if style == "svs":
                text = f"{APERIO}\r\n{w0}x{h0} [0,0 {w}x{h}] ({tile}x{tile})"
                if level_mpp is not None:
                    text += f"|AppMag = {10 / level_mpp:g}|MPP = {level_mpp:g}"
                extra = {"description": text + (f"|{description}" if description else "")}
            elif level_mpp is not None:
                extra = {"resolution": (1e4 / level_mpp, 1e4 / level_mpp),
                         "resolutionunit": "CENTIMETER", "description": description}
            else:
                extra = {"description": description}
            shape = (h, w, 3) if channels == 3 else (h, w)
            tif.write(_tiles(strip, level, h, w, tile), shape=shape, dtype=np.uint8,
                      tile=(tile, tile), subfiletype=_subfiletype(style, level), **args, **extra)
            if style == "svs" and level == 0:  # Aperio's second page is a thumbnail strip image
                small = thumbnail() if thumbnail else strip(len(shapes) - 1, 0, shapes[-1][0])
                tif.write(small, **args, description=f"{APERIO}\r\n{w0}x{h0} -> "
                          f"{small.shape[1]}x{small.shape[0]}")
    return path


def _subfiletype(style: str, level: int) -> int:
    """1 marks a reduced-resolution page in generic TIFF; Aperio keeps 0 for its levels and
    uses 1 for the label image, which readers then stop at."""
    return 1 if level and style != "svs" else 0


def _tiles(strip: Strip, level: int, height: int, width: int, tile: int
           ) -> Iterator[np.ndarray]:
    """Tiles in row-major order, one strip of ``tile`` rows read at a time."""
    for top in range(0, height, tile):
        rows = strip(level, top, min(tile, height - top))
        for left in range(0, width, tile):
            yield np.ascontiguousarray(rows[:, left:left + tile])


class PooledLevels:
    """The strips of every level of an RGB pyramid whose level 0 comes from ``source(top,
    height)``: while level 0 is written, each of its strips is averaged 4 x 4 into a file
    that level 1 is then read from, and so on; one pass over level 0, little memory.
    Strips must be asked for in order, level by level, ``top`` and ``height`` multiples of 4
    (but for a level's last strip), as :func:`write_pyramid` does."""

    def __init__(self, source: Callable[[int, int], np.ndarray],
                 shapes: Sequence[tuple[int, int]], work: Path, fill: int = 255) -> None:
        self.source, self.shapes, self.fill = source, list(shapes), fill
        self.stores = [None] + [RasterStore(work / f"level{k}.raw", h, w, 3)
                                for k, (h, w) in enumerate(self.shapes) if k]

    def strip(self, level: int, top: int, height: int) -> np.ndarray:
        if level == 0:
            rows = self.source(top, height)
        else:
            rows = self.stores[level].read_rows(range(top, top + height))
        if level + 1 < len(self.shapes):
            self.stores[level + 1].write_rows(top // DOWNSAMPLE,
                                              self._pool(rows, self.shapes[level + 1][1]))
        return rows

    def _pool(self, rows: np.ndarray, width: int) -> np.ndarray:
        """4 x 4 means, edges padded with ``fill``: ``(h, w, 3)`` -> ``(ceil(h/4), width, 3)``."""
        h = math.ceil(rows.shape[0] / DOWNSAMPLE)
        padded = np.full((h * DOWNSAMPLE, width * DOWNSAMPLE, 3), self.fill, np.uint8)
        padded[:rows.shape[0], :rows.shape[1]] = rows[:, :width * DOWNSAMPLE]
        sums = padded.reshape(h, DOWNSAMPLE, width, DOWNSAMPLE, 3).sum(axis=(1, 3),
                                                                        dtype=np.uint16)
        return ((sums + DOWNSAMPLE**2 // 2) // DOWNSAMPLE**2).astype(np.uint8)

    def thumbnail(self) -> np.ndarray:
        """About the smallest level's size, subsampled from level 1 (ready once level 0 is)."""
        if len(self.stores) < 2:
            return self.source(0, self.shapes[0][0])
        step = DOWNSAMPLE ** (len(self.shapes) - 2)
        return self.stores[1].read_rows(range(0, self.shapes[1][0], step))[:, ::step]

    def close(self) -> None:
        for store in self.stores[1:]:
            store.close()
