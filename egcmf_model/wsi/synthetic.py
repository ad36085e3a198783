"""Synthetic slide pairs: serial H&E and CK5/6 sections as SVS or generic pyramidal TIFF.

The tissue is an ellipse of the synthetic generator's ROIs (``egcmf synth``'s images, blocks of
256 px at 40x) on white glass, with a speck of dust in a margin. The CK5/6 slide is the same
tissue moved by a known ``shift``, so that registration can be checked against the truth. Each
block's CK5/6 is first registered to its H&E (the generator jitters pairs slightly, like serial
sections), so the only H&E/CK5/6 offset of the pair is ``shift``. Slides are written strip by
strip: a 40,000 px slide never sits in memory. ``annotations.geojson`` holds the expert labels
of a few blocks, every pixel of each labelled, as a pathologist's QuPath export would.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from ..data.sites import estimate_shift
from ..data.synthetic import PAIRED_CLASSES, render_roi, site_style
from .annotations import features, write_geojson
from .options import SlidePairSpec
from .polygons import mask_polygons
from .pyramid import PooledLevels, level_shapes, write_pyramid

BLOCK = 256  # side of one synthetic ROI at 40x, as in the default synthetic set
POOL = 8  # distinct blocks; the tissue repeats them in a seeded pattern
GLASS = np.array([244, 244, 242], np.uint8)
MARGIN = 0.12  # blank glass around the tissue ellipse, as a fraction of the side


class SyntheticTissue:
    """Pixels of the synthetic pair at any level, computed on demand."""

    def __init__(self, spec: SlidePairSpec) -> None:
        self.spec = spec
        style = site_style(np.random.default_rng([spec.seed, 0]))
        self.blocks = [_aligned_block(np.random.default_rng([spec.seed, 0, i + 1]), style)
                       for i in range(POOL)]
        slots = math.ceil(spec.size / BLOCK)
        self.layout = np.random.default_rng([spec.seed, 1]).integers(0, POOL, (slots, slots))
        self.shapes = level_shapes(spec.size, spec.size)

    def strip(self, kind: str, top: int, height: int) -> np.ndarray:
        """Level-0 rows ``[top, top+height)`` of ``kind`` (he, ck56, mask)."""
        dy, dx = self.spec.shift if kind == "ck56" else (0, 0)
        return self._compose(kind, top - dy, -dx, height, self.spec.size)

    def _compose(self, kind: str, top: int, left: int, height: int, width: int) -> np.ndarray:
        """Level-0 pixels of the aligned pair; glass (or label 0) outside the ellipse."""
        channels = () if kind == "mask" else (3,)
        out = np.zeros((height, width, *channels), np.uint8)
        slots = self.layout.shape[0]
        for sy in range(max(top // BLOCK, 0), min(-(-(top + height) // BLOCK), slots)):
            for sx in range(max(left // BLOCK, 0), min(-(-(left + width) // BLOCK), slots)):
                y0, x0 = sy * BLOCK, sx * BLOCK
                a, b = max(y0, top), min(y0 + BLOCK, top + height)
                c, d = max(x0, left), min(x0 + BLOCK, left + width)
                block = self.blocks[self.layout[sy, sx]][kind]
                out[a - top:b - top, c - left:d - left] = block[a - y0:b - y0, c - x0:d - x0]
        glass = ~self._inside(top, left, height, width)
        out[glass] = 0 if kind == "mask" else GLASS
        if kind != "mask":
            self._dust(out, top, left)
        return out

    def _inside(self, top: int, left: int, height: int, width: int) -> np.ndarray:
        size, r = self.spec.size, (0.5 - MARGIN) * self.spec.size
        yy = (np.arange(top, top + height)[:, None] + 0.5 - size / 2) / r
        xx = (np.arange(left, left + width)[None, :] + 0.5 - size / 2) / (1.1 * r)
        return yy**2 + xx**2 < 1.0

    def _dust(self, out: np.ndarray, top: int, left: int) -> None:
        """A dark speck of 8 px (2 µm) in the top-left margin: not tissue."""
        y, x = int(0.05 * self.spec.size) - top, int(0.05 * self.spec.size) - left
        out[max(y, 0):max(y + 8, 0), max(x, 0):max(x + 8, 0)] = (90, 60, 110)

    def annotated_blocks(self) -> list[tuple[int, int]]:
        """Slots labelled in the annotations: inside the tissue, none touching another."""
        slots = self.layout.shape[0]
        inside = [(sy, sx) for sy in range(0, slots, 2) for sx in range(0, slots, 2)
                  if self._inside(sy * BLOCK, sx * BLOCK, BLOCK, BLOCK).all()]
        rng = np.random.default_rng([self.spec.seed, 2])
        picked = rng.permutation(len(inside))[:self.spec.annotated]
        return sorted(inside[i] for i in picked)


def _aligned_block(rng: np.random.Generator, style) -> dict[str, np.ndarray]:
    """One synthetic ROI cut to ``BLOCK`` px with its CK5/6 registered to its H&E."""
    margin = 4  # more than the generator's jitter at this size
    roi = render_roi(rng, BLOCK + 2 * margin, style)
    dy, dx = (round(v) for v in estimate_shift(roi["he"], roi["ck56"]))
    cut = slice(margin, margin + BLOCK)
    return {"he": roi["he"][cut, cut], "mask": roi["mask"][cut, cut],
            "ck56": roi["ck56"][margin - dy:margin - dy + BLOCK, margin - dx:margin - dx + BLOCK]}


def write_slide_pair(out: Path, spec: SlidePairSpec) -> dict[str, Path]:
    """Write ``he.<fmt>``, ``ck56.<fmt>`` and ``annotations.geojson`` into ``out``."""
    if spec.size < 4 * BLOCK:
        raise ValueError(f"--size {spec.size}: must be at least {4 * BLOCK} px")
    tissue = SyntheticTissue(spec)
    suffix = "svs" if spec.fmt == "svs" else "tif"
    paths = {}
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("he", "ck56"):
        with tempfile.TemporaryDirectory(dir=out, prefix=".levels-") as work:
            levels = PooledLevels(lambda t, h, k=kind: tissue.strip(k, t, h), tissue.shapes,
                                  Path(work), fill=int(GLASS[0]))
            paths[kind] = write_pyramid(
                out / f"{kind}.{suffix}", levels.strip, tissue.shapes,
                spec.mpp if spec.write_mpp else None, 3, style=spec.fmt, compression="jpeg",
                tile=BLOCK, description="synthetic slide (egcmf synth-slides)",
                thumbnail=levels.thumbnail)
            levels.close()
    paths["annotations"] = write_geojson(out / "annotations.geojson", _labels(tissue))
    return paths


def _labels(tissue: SyntheticTissue) -> list[dict]:
    """Every class region of each annotated block, as QuPath annotations."""
    traced: dict[int, list] = {v: [] for v in range(len(PAIRED_CLASSES))}
    for sy, sx in tissue.annotated_blocks():
        mask = tissue.strip("mask", sy * BLOCK, BLOCK)[:, sx * BLOCK:(sx + 1) * BLOCK]
        for value in traced:
            traced[value] += mask_polygons(mask == value, (sy * BLOCK, sx * BLOCK))
    return features(traced, PAIRED_CLASSES, tissue.spec.mpp, namespace="synthetic")
