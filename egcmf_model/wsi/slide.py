"""Opening whole-slide images and reading them at a physical resolution (µm per pixel).

OpenSlide reads the scanners' formats (Aperio SVS, Hamamatsu NDPI, Philips TIFF, generic tiled
TIFF, MIRAX, Leica SCN, DICOM); tiffslide is the fallback for TIFF-based files OpenSlide does not
open. Levels are always chosen by µm per pixel, never by level index: level 1 is 4x on one
scanner, 2x on another, and some files list their levels out of order.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..data.io import DataError

log = logging.getLogger(__name__)

LEVEL_TOLERANCE = 0.05  # a level up to 5 % coarser than asked for is still read (then resized)
CHUNK = 2048  # side of the pieces a large region is read in, at the level read
GLASS = 255  # what lies outside the scanned area: white, as on glass
UNSUPPORTED = {".kfb": "KFBio .kfb files cannot be read by OpenSlide; convert to TIFF first "
                       "(KFBIO's converter writes SVS or pyramidal TIFF)"}


class SlideError(DataError):
    """A slide cannot be opened or lacks what prediction needs; the message names the file."""


@dataclass
class Slide:
    """A whole-slide image; coordinates are level-0 pixels unless stated otherwise.

    Args:
        path: the file.
        handle: an ``openslide.OpenSlide`` or ``tiffslide.TiffSlide``.
        mpp: level-0 µm per pixel.
        mpp_source: where ``mpp`` came from (``metadata`` or ``--mpp``).
    """

    path: Path
    handle: Any
    mpp: float
    mpp_source: str
    reader: str
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0."""
        return tuple(self.handle.level_dimensions[0])

    @property
    def level_mpps(self) -> list[float]:
        return [self.mpp * float(d) for d in self.handle.level_downsamples]

    def level_for(self, mpp: float) -> int:
        """The coarsest level still at least as fine as ``mpp`` (within 5 %); level 0 if none."""
        fine = [(m, i) for i, m in enumerate(self.level_mpps) if m <= mpp * (1 + LEVEL_TOLERANCE)]
        return max(fine)[1] if fine else int(np.argmin(self.level_mpps))

    def size_at(self, mpp: float) -> tuple[int, int]:
        """``(height, width)`` of the whole slide at ``mpp``."""
        w, h = self.dimensions
        return math.ceil(h * self.mpp / mpp), math.ceil(w * self.mpp / mpp)

    def region(self, mpp: float, top: float, left: float, height: int, width: int) -> np.ndarray:
        """``(height, width, 3)`` uint8 RGB at ``mpp`` µm/px; ``top``/``left`` are pixels of the
        grid at ``mpp`` anchored at the slide's origin, fractions allowed (resampled).
        Outside the slide is white."""
        level = self.level_for(mpp)
        ratio = mpp / self.level_mpps[level]  # level pixels per output pixel
        box = (left * ratio, top * ratio, (left + width) * ratio, (top + height) * ratio)
        x0, y0 = math.floor(box[0]), math.floor(box[1])
        x1, y1 = math.ceil(box[2]), math.ceil(box[3])
        patch = self._read_level(level, x0, y0, x1 - x0, y1 - y0)
        if (x1 - x0, y1 - y0) == (width, height) and box[0] == x0 and box[1] == y0:
            return patch
        resample = Image.Resampling.BOX if ratio > 1 else Image.Resampling.BILINEAR
        image = Image.fromarray(patch).resize(
            (width, height), resample, box=(box[0] - x0, box[1] - y0, box[2] - x0, box[3] - y0))
        return np.asarray(image)

    def thumbnail(self, mpp: float) -> np.ndarray:
        """The whole slide at ``mpp``, read in pieces so that memory stays small."""
        height, width = self.size_at(mpp)
        out = np.empty((height, width, 3), np.uint8)
        ratio = mpp / self.level_mpps[self.level_for(mpp)]
        step = max(64, int(CHUNK / ratio))  # each piece reads about CHUNK x CHUNK level pixels
        for top in range(0, height, step):
            for left in range(0, width, step):
                h, w = min(step, height - top), min(step, width - left)
                out[top:top + h, left:left + w] = self.region(mpp, top, left, h, w)
        return out

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Level pixels ``[y, y+height) x [x, x+width)``; what lies outside the level is white."""
        out = np.full((height, width, 3), GLASS, np.uint8)
        lw, lh = self.handle.level_dimensions[level]
        ix0, iy0 = max(x, 0), max(y, 0)
        ix1, iy1 = min(x + width, lw), min(y + height, lh)
        if ix1 <= ix0 or iy1 <= iy0:
            return out
        down = float(self.handle.level_downsamples[level])
        location = (round(ix0 * down), round(iy0 * down))
        try:
            image = self.handle.read_region(location, level, (ix1 - ix0, iy1 - iy0))
        except Exception as exc:  # both readers raise their own types for damaged tiles
            raise SlideError(f"{self.path}: cannot read level {level} at {location} ({exc})") \
                from exc
        out[iy0 - y:iy1 - y, ix0 - x:ix1 - x] = _on_white(image)
        return out

    def metadata(self) -> dict[str, Any]:
        """What the report records about the slide."""
        keys = ("vendor", "objective-power", "comment")
        props = {k: self.properties.get(f"{self.reader}.{k}") for k in keys}
        return {"path": str(self.path), "reader": self.reader, "vendor": props["vendor"],
                "objective_power": props["objective-power"], "mpp": self.mpp,
                "mpp_source": self.mpp_source, "dimensions": list(self.dimensions),
                "levels": [{"dimensions": list(d), "mpp": round(m, 5)} for d, m in
                           zip(self.handle.level_dimensions, self.level_mpps, strict=True)]}

    def close(self) -> None:
        self.handle.close()


def _on_white(image: Image.Image) -> np.ndarray:
    """A PIL RGB or RGBA image as RGB uint8, transparent parts (no tissue scanned) white."""
    rgba = np.asarray(image.convert("RGBA"))
    if rgba[..., 3].min() == 255:
        return rgba[..., :3]
    rgba = rgba.astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    return (rgba[..., :3] * alpha + GLASS * (1.0 - alpha)).round().astype(np.uint8)


def open_slide(path: Path, mpp: float | None = None) -> Slide:
    """Open ``path`` with OpenSlide, else tiffslide; its level-0 µm/px from the metadata, else
    ``mpp``. Raises :class:`SlideError` (one line, naming the file) when it cannot."""
    path = Path(path)
    if path.suffix.lower() in UNSUPPORTED:
        raise SlideError(f"{path}: {UNSUPPORTED[path.suffix.lower()]}")
    if not path.is_file():
        raise SlideError(f"{path}: no such slide file")
    handle, reader = _open_handle(path)
    props = dict(handle.properties)
    found = _metadata_mpp(props, reader)
    if found is None and mpp is None:
        handle.close()
        raise SlideError(f"{path}: the slide has no microns-per-pixel in its metadata "
                         f"({reader}.mpp-x is missing); pass --mpp with its level-0 µm per "
                         "pixel, e.g. --mpp 0.25 for a 40x scan")
    if found is not None and mpp is not None and abs(found - mpp) > 1e-3 * found:
        log.warning("%s: its metadata says %.4f µm/px; --mpp %.4f applies only to slides "
                    "without one, so %.4f is used", path, found, mpp, found)
    chosen, source = (found, "metadata") if found is not None else (mpp, "--mpp")
    return Slide(path, handle, float(chosen), source, reader, props)


def _open_handle(path: Path) -> tuple[Any, str]:
    errors = []
    try:
        import openslide

        try:
            return openslide.OpenSlide(str(path)), "openslide"
        except openslide.OpenSlideError as exc:
            errors.append(f"OpenSlide: {exc or 'unsupported or damaged file'}")
    except ImportError as exc:  # openslide-bin missing: tiffslide still reads TIFF-based files
        errors.append(f"OpenSlide not available ({exc})")
    try:
        import tiffslide

        return tiffslide.TiffSlide(str(path)), "tiffslide"
    except Exception as exc:  # tiffslide raises tifffile's, zarr's and its own errors
        errors.append(f"tiffslide: {exc}")
    raise SlideError(f"{path}: not a readable slide ({'; '.join(errors)}); formats: SVS, NDPI, "
                     "Philips TIFF, generic tiled TIFF, MRXS, SCN, DICOM")


def _metadata_mpp(props: dict[str, str], reader: str) -> float | None:
    for key in (f"{reader}.mpp-x", "openslide.mpp-x", "tiffslide.mpp-x"):
        value = props.get(key)
        try:
            if value not in (None, "", "None") and float(value) > 0:
                return float(value)
        except ValueError:
            continue
    return None
