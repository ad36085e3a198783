"""Registration of the CK5/6 slide onto the H&E slide, and reading CK5/6 through it.

Serial sections are moved and turned on the glass, and stretch a little. Two steps, in µm so
that slides of different resolutions pair up:

1. **Rigid, whole slide.** ORB features on the haematoxylin density of both slides (the
   counterstain both share), matched and fitted by RANSAC (scikit-image); phase correlation of
   the two views if too few features agree.
2. **Per tile.** The slide is cut into cells (256 µm, more on large slides); in each cell with
   tissue, phase correlation of the haematoxylin at 1 µm/px (as ``egcmf check-site`` does for
   an ROI) measures what the rigid fit left. Each cell keeps its own correction; cells without
   a trustworthy measurement take the median.

The estimated error is how much a cell's correction disagrees with its neighbours' (a smooth
deformation agrees, a failed match does not), as the 90th percentile over cells, in µm.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.feature import ORB, match_descriptors
from skimage.measure import ransac
from skimage.registration import phase_cross_correlation
from skimage.transform import AffineTransform, EuclideanTransform, warp

from ..data.stain import haematoxylin_density
from .slide import Slide, SlideError

log = logging.getLogger(__name__)

MATCH_SIDE = 1024  # longest side, in pixels, of the views features are matched on
MATCH_MPP = 2.0  # µm/px at least: finer, single nuclei are noise that H&E and CK5/6 do not share
MIN_INLIERS = 8  # fewer RANSAC inliers than this: fall back to phase correlation
REFINE_MPP = 1.0  # µm per pixel of the per-cell phase correlation
CELL_UM = 256.0  # side of a refinement cell (larger on large slides)
MAX_CELLS = 48  # cells per side at most
MIN_TISSUE = 0.25  # a cell is measured when at least this share of it is tissue
MIN_TRUSTED = 0.5  # fewer trusted cells than this share of the measured ones: flagged


@dataclass(frozen=True)
class Registration:
    """H&E µm ``p`` -> CK5/6 µm ``A @ p + b + correction[cell(p)]``."""

    matrix: np.ndarray  # (3, 3) rigid transform in µm, H&E -> CK5/6
    method: str  # "features" or "phase-correlation"
    inliers: int
    cell_um: float
    corrections: np.ndarray  # (rows, cols, 2) x, y in µm, per cell
    measured: int  # cells with enough tissue to measure
    trusted: int  # cells whose measurement was kept
    error_um: float

    def affine_at(self, y_um: float, x_um: float) -> tuple[np.ndarray, np.ndarray]:
        """``(A, b)`` of the mapping at H&E point ``(y_um, x_um)``, its cell's correction in."""
        rows, cols = self.corrections.shape[:2]
        r = min(max(int(y_um // self.cell_um), 0), rows - 1)
        c = min(max(int(x_um // self.cell_um), 0), cols - 1)
        return self.matrix[:2, :2], self.matrix[:2, 2] + self.corrections[r, c]

    def flagged(self, max_error_um: float) -> bool:
        return self.error_um > max_error_um or self.trusted < MIN_TRUSTED * max(self.measured, 1)

    def summary(self, max_error_um: float) -> dict[str, Any]:
        a, b = self.matrix[:2, :2], self.matrix[:2, 2]
        return {"method": self.method, "inliers": self.inliers,
                "rotation_deg": round(math.degrees(math.atan2(a[1, 0], a[0, 0])), 4),
                "translation_um": {"x": round(float(b[0]), 3), "y": round(float(b[1]), 3)},
                "cell_um": self.cell_um, "cells_measured": self.measured,
                "cells_trusted": self.trusted, "error_um": round(self.error_um, 3),
                "max_error_um": max_error_um, "flagged": self.flagged(max_error_um)}


def register(he: Slide, ck: Slide, tissue: np.ndarray, tissue_mpp: float) -> Registration:
    """Register ``ck`` onto ``he``; ``tissue`` is the H&E tissue mask at ``tissue_mpp``."""
    matrix, method, inliers = _rigid(he, ck)
    extent = max(he.size_at(1.0))  # µm
    cell = max(CELL_UM, extent / MAX_CELLS)
    rows, cols = (math.ceil(s / cell) for s in he.size_at(1.0))
    found = np.full((rows, cols, 2), np.nan)
    measured = 0
    for r in range(rows):
        for c in range(cols):
            if _tissue_share(tissue, tissue_mpp, r * cell, c * cell, cell) < MIN_TISSUE:
                continue
            measured += 1
            found[r, c] = _cell_residual(he, ck, matrix, r * cell, c * cell, cell)
    matrix, found = _refit(matrix, found, cell)
    corrections, trusted, error = _smooth_corrections(found)
    return Registration(matrix, method, inliers, cell, corrections, measured, trusted, error)


def _refit(matrix: np.ndarray, found: np.ndarray, cell: float) -> tuple[np.ndarray, np.ndarray]:
    """The rigid fit redone on the cells' measurements (far more precise than thumbnail
    features), and what each cell leaves of it."""
    ok = ~np.isnan(found[..., 0])
    if ok.sum() < 3:
        return matrix, found
    rows, cols = np.nonzero(ok)
    src = np.stack([(cols + 0.5) * cell, (rows + 0.5) * cell], axis=1)  # cell centres (x, y)
    dst = src @ matrix[:2, :2].T + matrix[:2, 2] + found[ok]
    refit = _rigid_fit(src, dst)
    moved = found.copy()
    moved[ok] = dst - (src @ refit[:2, :2].T + refit[:2, 2])
    return refit, moved


def _rigid_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation and translation taking ``src`` to ``dst`` (``(N, 2)`` x, y)."""
    a, b = src - src.mean(0), dst - dst.mean(0)
    angle = math.atan2(float(np.sum(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0])),
                       float(np.sum(a * b)))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    out = np.eye(3)
    out[:2, :2] = rotation
    out[:2, 2] = dst.mean(0) - rotation @ src.mean(0)
    return out


def register_checked(he: Slide, ck: Slide, tissue: np.ndarray, tissue_mpp: float,
                     max_error_um: float, accept: bool) -> Registration:
    """:func:`register`, logged; a flagged pair raises :class:`SlideError` unless ``accept``."""
    reg = register(he, ck, tissue, tissue_mpp)
    s = reg.summary(max_error_um)
    log.info("registration: %s, rotation %.2f°, shift x %.1f y %.1f µm, estimated error %.2f µm",
             s["method"], s["rotation_deg"], s["translation_um"]["x"], s["translation_um"]["y"],
             s["error_um"])
    if s["flagged"]:
        message = (f"{ck.path}: registration to {he.path} is doubtful (estimated error "
                   f"{reg.error_um:.1f} µm, limit {max_error_um:g} µm; {reg.trusted} of "
                   f"{reg.measured} tissue cells agree)")
        if not accept:
            raise SlideError(message + "; check that both slides are of the same block, or "
                             "pass --accept-registration to go on anyway")
        log.warning("%s; going on (--accept-registration)", message)
    return reg


def _features_image(rgb: np.ndarray, smooth: float = 0.0) -> np.ndarray:
    """Haematoxylin density scaled to about [0, 1]: what H&E and CK5/6 share."""
    density = haematoxylin_density(rgb)
    if smooth:
        density = ndimage.gaussian_filter(density, smooth)
    scale = np.percentile(density, 99.5)
    return np.clip(density / scale, 0, 1) if scale > 0 else density


def _rigid(he: Slide, ck: Slide) -> tuple[np.ndarray, str, int]:
    extent = max(max(s.size_at(1.0)) for s in (he, ck))
    mpp = max(he.mpp, ck.mpp, MATCH_MPP, extent / MATCH_SIDE)
    a, b = (_features_image(s.thumbnail(mpp), smooth=1.0) for s in (he, ck))
    try:
        with warnings.catch_warnings():  # a failed fit is expected here and handled below
            warnings.simplefilter("ignore")
            model, inliers = _match(a, b, mpp)
    except RuntimeError as exc:  # ORB finds no keypoints on an empty or flat view
        log.debug("feature matching failed: %s", exc)
        model, inliers = None, 0
    if model and inliers >= MIN_INLIERS:
        return model.params, "features", inliers
    size = (max(a.shape[0], b.shape[0]), max(a.shape[1], b.shape[1]))
    shift, _, _ = phase_cross_correlation(_pad(a, size), _pad(b, size), upsample_factor=4,
                                          normalization=None)
    matrix = np.eye(3)
    matrix[:2, 2] = -shift[::-1] * mpp  # (x, y) µm
    return matrix, "phase-correlation", inliers


def _match(a: np.ndarray, b: np.ndarray, mpp: float) -> tuple[Any, int]:
    points, descriptors = [], []
    for image in (a, b):
        orb = ORB(n_keypoints=600, n_scales=4, fast_threshold=0.05)
        orb.detect_and_extract(image)
        points.append(orb.keypoints[:, ::-1] * mpp)  # (x, y) µm
        descriptors.append(orb.descriptors)
    pairs = match_descriptors(*descriptors, cross_check=True, max_ratio=0.9)
    if len(pairs) < MIN_INLIERS:
        return None, 0
    src, dst = points[0][pairs[:, 0]], points[1][pairs[:, 1]]
    model, inliers = ransac((src, dst), EuclideanTransform, min_samples=3,
                            residual_threshold=3 * mpp, max_trials=2000, rng=0)
    return (model, int(inliers.sum())) if model and inliers is not None else (None, 0)


def _pad(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.pad(image, [(0, size[0] - image.shape[0]), (0, size[1] - image.shape[1])])


def _tissue_share(tissue: np.ndarray, mpp: float, top: float, left: float, side: float) -> float:
    r0, c0 = int(top / mpp), int(left / mpp)
    r1, c1 = max(int((top + side) / mpp), r0 + 1), max(int((left + side) / mpp), c0 + 1)
    cut = tissue[r0:r1, c0:c1]
    return float(cut.mean()) if cut.size else 0.0


def _cell_residual(he: Slide, ck: Slide, matrix: np.ndarray, top: float, left: float,
                   side: float) -> np.ndarray:
    """What the rigid fit leaves in one cell, as a CK5/6 correction ``(x, y)`` in µm."""
    n = round(side / REFINE_MPP)
    a = _features_image(he.region(REFINE_MPP, top / REFINE_MPP, left / REFINE_MPP, n, n))
    b = _features_image(read_mapped(ck, matrix[:2, :2], matrix[:2, 2], REFINE_MPP,
                                    top / REFINE_MPP, left / REFINE_MPP, n, n))
    shift, _, _ = phase_cross_correlation(a, b, upsample_factor=10, normalization=None)
    if np.abs(shift).max() > n / 4:  # no agreement within the cell: not trusted
        return np.full(2, np.nan)
    # H&E(p) = CKmapped(p - shift): the CK point of p moves by -A @ shift
    return -(matrix[:2, :2] @ shift[::-1]) * REFINE_MPP


def _smooth_corrections(found: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Reject cells that disagree with the rest; fill them (and unmeasured cells) with the
    median; the error is the 90th percentile of each trusted cell's distance to the median
    of its trusted neighbours."""
    ok = ~np.isnan(found[..., 0])
    if not ok.any():
        return np.zeros_like(found), 0, float("inf")
    median = np.median(found[ok], axis=0)
    distance = np.linalg.norm(found - median, axis=-1)
    spread = 1.4826 * np.median(distance[ok])
    ok &= distance <= max(3 * spread, 2.0 * REFINE_MPP)
    corrections = np.where(ok[..., None], found, median)
    errors = []
    for r, c in zip(*np.nonzero(ok), strict=True):
        near = ok[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2].copy()
        values = corrections[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2][near]
        reference = np.median(values, axis=0) if near.sum() > 1 else median
        errors.append(float(np.linalg.norm(corrections[r, c] - reference)))
    return corrections, int(ok.sum()), float(np.percentile(errors, 90))


def read_mapped(slide: Slide, a: np.ndarray, b: np.ndarray, mpp: float, top: float,
                left: float, height: int, width: int) -> np.ndarray:
    """``(height, width, 3)`` of ``slide`` at ``mpp`` through ``q = a @ p + b`` (µm): output
    pixel ``(r, c)`` shows the slide at ``a @ ((left + c, top + r) * mpp) + b``."""
    linear = a - np.eye(2)
    if np.abs(linear).max() * max(height, width) < 0.05:  # a translation, to 1/20 pixel
        oy, ox = b[1] / mpp, b[0] / mpp
        return slide.region(mpp, top + oy, left + ox, height, width)
    grid = AffineTransform(matrix=np.vstack([np.hstack([a, (a @ [left, top] + b / mpp)[:, None]]),
                                             [0, 0, 1]]))
    corners = grid(np.array([[0, 0], [width, 0], [0, height], [width, height]], float))
    x0, y0 = np.floor(corners.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(corners.max(axis=0)).astype(int) + 1
    patch = slide.region(mpp, y0, x0, y1 - y0, x1 - x0)
    shifted = grid + AffineTransform(translation=(-x0, -y0))  # output (c, r) -> patch (x, y)
    out = warp(patch, shifted, output_shape=(height, width), order=1, cval=1.0)
    return (out * 255).round().astype(np.uint8)
