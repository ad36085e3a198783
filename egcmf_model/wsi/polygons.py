"""Label masks to polygons and back, exactly enough that a round trip keeps areas within 1 %.

Coordinates are pixel corners: pixel ``(row, col)`` covers ``[col, col+1) x [row, row+1)``, as
QuPath and ASAP write them. Contours run through the pixel edges (marching squares at 0.5 on
the padded binary mask), so a polygon's area equals its pixel count up to half a pixel per
corner. Large label maps are traced block by block and the pieces that meet at block edges are
merged, so memory stays bounded by the block, not by the slide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon
from shapely.geometry.base import BaseGeometry
from skimage.draw import polygon as fill_polygon
from skimage.measure import find_contours

BLOCK = 2048  # side of the pieces a large label map is traced in
SIMPLIFY = 0.3  # px; drops the collinear points of pixel staircases, keeps every corner


def mask_polygons(mask: np.ndarray, origin: tuple[int, int] = (0, 0)) -> list[Polygon]:
    """Polygons (with holes) of the True pixels of ``mask`` ``(H, W)`` bool, in the coordinates
    of a larger image where ``mask[0, 0]`` is pixel ``origin`` ``(row, col)``."""
    padded = np.pad(mask, 1).astype(np.float32)
    shells, holes = [], []
    for contour in find_contours(padded, 0.5):
        # padded (row, col) of pixel centres -> (x, y) of pixel corners in the larger image
        xy = np.stack([contour[:, 1] - 0.5 + origin[1], contour[:, 0] - 0.5 + origin[0]], 1)
        ring = Polygon(xy)
        (shells if _signed_area(xy) > 0 else holes).append(ring)
    return _assemble(shells, holes)


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def _assemble(shells: list[Polygon], holes: list[Polygon]) -> list[Polygon]:
    """Give each hole to the smallest shell around it (an island in a hole has its own shell)."""
    if not shells:
        return []
    inner: list[list] = [[] for _ in shells]
    if holes:
        tree = shapely.STRtree(shells)
        areas = shapely.area(shells)
        points = shapely.points([h.exterior.coords[0] for h in holes])
        hole_idx, shell_idx = tree.query(points, predicate="within")
        best: dict[int, int] = {}
        for h, s in zip(hole_idx.tolist(), shell_idx.tolist(), strict=True):
            if h not in best or areas[s] < areas[best[h]]:
                best[h] = s
        for h, s in best.items():
            inner[s].append(holes[h].exterior.coords)
    out = []
    for shell, rings in zip(shells, inner, strict=True):
        out.extend(valid_parts(Polygon(shell.exterior.coords, rings)))
    return out


def valid_parts(geometry: BaseGeometry) -> list[Polygon]:
    """The polygonal parts of ``geometry``, repaired with ``make_valid`` if needed."""
    if not geometry.is_valid:
        geometry = shapely.make_valid(geometry)
    if isinstance(geometry, Polygon):
        return [geometry] if not geometry.is_empty else []
    parts = getattr(geometry, "geoms", [])
    return [p for g in parts for p in valid_parts(g)]


def polygonise(read: Callable[[int, int, int, int], np.ndarray], shape: tuple[int, int],
               values: Iterable[int], block: int = BLOCK) -> dict[int, list[Polygon]]:
    """Polygons per label value of a label map read in blocks.

    Args:
        read: ``read(top, left, height, width)`` -> ``(height, width)`` labels.
        shape: ``(H, W)`` of the whole map.
        values: the label values to trace.
        block: side of the blocks read at a time.

    Returns:
        ``{value: [Polygon, ...]}`` in pixel-corner coordinates of the map, simplified.
    """
    values = list(values)
    done: dict[int, list[Polygon]] = {v: [] for v in values}
    pending: dict[int, list[Polygon]] = {v: [] for v in values}
    height, width = shape
    for top in range(0, height, block):
        for left in range(0, width, block):
            bottom, right = min(top + block, height), min(left + block, width)
            # one pixel of the neighbours around the block, so its contours there are real
            y0, x0 = max(top - 1, 0), max(left - 1, 0)
            y1, x1 = min(bottom + 1, height), min(right + 1, width)
            labels = read(y0, x0, y1 - y0, x1 - x0)
            inner = (left if left > 0 else -1, top if top > 0 else -1,
                     right if right < width else -1, bottom if bottom < height else -1)
            for value in values:
                if not (labels == value).any():
                    continue
                for poly in mask_polygons(labels == value, (y0, x0)):
                    for part in valid_parts(shapely.clip_by_rect(poly, left, top, right,
                                                                  bottom)):
                        (pending if _touches(part, inner) else done)[value].append(part)
    for value, pieces in pending.items():
        if pieces:
            done[value].extend(valid_parts(shapely.unary_union(pieces)))
    return {v: [_simplify(p) for p in polys] for v, polys in done.items()}


def _touches(poly: Polygon, inner: Sequence[int]) -> bool:
    """Whether ``poly`` reaches one of the block's edges that are not the map's edges (-1)."""
    minx, miny, maxx, maxy = poly.bounds
    x0, y0, x1, y1 = inner
    return (x0 >= 0 and minx <= x0) or (y0 >= 0 and miny <= y0) or \
        (x1 >= 0 and maxx >= x1) or (y1 >= 0 and maxy >= y1)


def _simplify(poly: Polygon) -> Polygon:
    simple = poly.simplify(SIMPLIFY, preserve_topology=True)
    return simple if isinstance(simple, Polygon) and simple.is_valid else poly


def rasterise(shapes: Sequence[tuple[int, BaseGeometry]], shape: tuple[int, int],
              fill: int = 255) -> np.ndarray:
    """``(H, W)`` uint8: each pixel whose centre lies in a geometry gets its value, the rest
    ``fill``. Where geometries overlap, the smaller one wins (drawn last)."""
    out = np.full(shape, fill, np.uint8)
    for value, geometry in sorted(shapes, key=lambda s: -s[1].area):
        for poly in _polygons_of(geometry):
            _draw(out, poly, value)
    return out


def _polygons_of(geometry: BaseGeometry) -> list[Polygon]:
    if isinstance(geometry, Polygon):
        return [geometry]
    if isinstance(geometry, MultiPolygon) or hasattr(geometry, "geoms"):
        return [p for g in geometry.geoms for p in _polygons_of(g)]
    return []


def _draw(out: np.ndarray, poly: Polygon, value: int) -> None:
    minx, miny, maxx, maxy = poly.bounds
    r0, c0 = max(0, int(np.floor(miny))), max(0, int(np.floor(minx)))
    r1, c1 = min(out.shape[0], int(np.ceil(maxy)) + 1), min(out.shape[1], int(np.ceil(maxx)) + 1)
    if r1 <= r0 or c1 <= c0:
        return
    local = np.zeros((r1 - r0, c1 - c0), bool)
    for ring, inside in [(poly.exterior, True)] + [(r, False) for r in poly.interiors]:
        xy = np.asarray(ring.coords)
        # pixel (r, c) is in when its centre (c + 0.5, r + 0.5) is: shift corners to centres
        rr, cc = fill_polygon(xy[:, 1] - 0.5 - r0, xy[:, 0] - 0.5 - c0, local.shape)
        local[rr, cc] = inside
    out[r0:r1, c0:c1][local] = value
