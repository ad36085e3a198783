"""Cut an annotated slide pair into a site folder that ``egcmf check-site`` accepts.

Annotated areas (QuPath GeoJSON or ASAP XML) are grouped where they touch; each group's bounding
box, tiled into pieces of at most ``roi_size`` px, becomes an ROI: H&E and registered CK5/6 at
40x (0.25 µm/px), and the annotations rasterised at 40x into ``mask.png`` (255 where nothing is
annotated, so an unlabelled pixel is never taught as background).
"""

from __future__ import annotations

import itertools
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import yaml
from shapely import affinity
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry

from ..data.io import IGNORE_INDEX, DataError, write_png
from ..data.sites import check_site
from ..data.synthetic import split_ids
from ..data.transforms import SCALE
from .annotations import match_classes, read_annotations
from .options import ExtractOptions
from .polygons import rasterise
from .registration import Registration, read_mapped, register_checked
from .slide import Slide, open_slide
from .tiling import HIGH_MPP
from .tissue import TISSUE_MPP, tissue_mask

log = logging.getLogger(__name__)


def extract_rois(he_path: Path, ck_path: Path | None, annotations: Path, out: Path,
                 options: ExtractOptions, name: str | None = None) -> dict[str, Any]:
    """Write the site folder ``out``; returns what was written and ``check-site``'s verdict."""
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out}: already exists and is not empty; choose a new folder")
    shapes = match_classes(read_annotations(annotations), options.classes, options.class_map,
                           annotations)
    if not shapes:
        raise DataError(f"{annotations}: no classified area annotation (polygons with a class)")
    he = open_slide(he_path, options.mpp)
    ck = open_slide(ck_path, options.mpp) if ck_path is not None else None
    reg = None
    if ck is not None:
        tissue = tissue_mask(he.thumbnail(TISSUE_MPP), TISSUE_MPP)
        reg = register_checked(he, ck, tissue, TISSUE_MPP, options.max_registration_error,
                               options.accept_registration)
    ids = []
    for box40 in roi_boxes([g for _, g in shapes], he.mpp / HIGH_MPP, options.roi_size):
        roi_id = f"roi_{len(ids):04d}"
        if _write_roi(out / "rois" / roi_id, he, ck, reg, shapes, box40):
            ids.append(roi_id)
    if not ids:
        raise DataError(f"{annotations}: the annotations cover no pixel of {he_path}")
    order = [ids[i] for i in np.random.default_rng(options.seed).permutation(len(ids))]
    splits = {k: sorted(v) for k, v in split_ids(order).items()}
    meta = {"name": name or out.name, "um_per_px": HIGH_MPP, "classes": list(options.classes),
            "modalities": ["he", "ck56"] if ck is not None else ["he"], "splits": splits}
    (out / "site.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    problems = check_site(out)
    for line in problems:
        log.warning("%s", line)
    return {"out": str(out), "rois": len(ids), "splits": {k: len(v) for k, v in splits.items()},
            "registration": reg.summary(options.max_registration_error) if reg else None,
            "problems": problems}


def roi_boxes(geometries: list[BaseGeometry], scale: float, roi_size: int
              ) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` on the 40x grid around each group of touching areas
    (level-0 coordinates times ``scale``), tiled into pieces of at most ``roi_size``."""
    merged = shapely.union_all(geometries)
    groups = getattr(merged, "geoms", [merged])
    boxes = []
    for group in sorted(groups, key=lambda g: (g.bounds[1], g.bounds[0])):
        minx, miny, maxx, maxy = (v * scale for v in group.bounds)
        top, left = (math.floor(v / SCALE) * SCALE for v in (miny, minx))
        bottom, right = (math.ceil(v / SCALE) * SCALE for v in (maxy, maxx))
        for y0, y1 in _pieces(top, bottom, roi_size):
            for x0, x1 in _pieces(left, right, roi_size):
                boxes.append((y0, x0, y1 - y0, x1 - x0))
    return boxes


def _pieces(start: int, end: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into equal pieces of at most ``size``, on whole 10x pixels."""
    n = math.ceil((end - start) / size)
    cuts = [start + round((end - start) * i / n / SCALE) * SCALE for i in range(n)] + [end]
    return list(itertools.pairwise(cuts))


def _write_roi(folder: Path, he: Slide, ck: Slide | None, reg: Registration | None,
               shapes: list[tuple[int, BaseGeometry]], box40: tuple[int, int, int, int]
               ) -> bool:
    """One ROI's PNGs; False (nothing written) when no annotated pixel falls in it."""
    top, left, height, width = box40
    scale = he.mpp / HIGH_MPP  # level-0 px -> 40x px
    window = box(left / scale, top / scale, (left + width) / scale, (top + height) / scale)
    local = [(value, affinity.affine_transform(g, [scale, 0, 0, scale, -left, -top]))
             for value, g in shapes if g.intersects(window)]
    mask = rasterise(local, (height, width), fill=IGNORE_INDEX)
    if (mask == IGNORE_INDEX).all():
        return False
    write_png(folder / "he.png", he.region(HIGH_MPP, top, left, height, width))
    if ck is not None and reg is not None:
        a, b = reg.affine_at((top + height / 2) * HIGH_MPP, (left + width / 2) * HIGH_MPP)
        write_png(folder / "ck56.png", read_mapped(ck, a, b, HIGH_MPP, top, left, height, width))
    write_png(folder / "mask.png", mask)
    return True
