"""Synthetic paired H&E / CK5/6 breast tissue, written as ordinary site folders.

What each ROI carries, and why (SPEC "Data"):

- stroma: eosin-pink with sparse elongated nuclei and fibre texture, a few white fat spaces;
- in-situ lesions (class 1): packed tumour nuclei inside a rim of myoepithelial cells; the rim is
  strongly DAB-positive in CK5/6 but in H&E only a faint, stroma-like line of flat nuclei;
- invasive nests (class 2): the same tumour cells, of overlapping sizes, with no rim;
- 40x-only detail: invasive nuclei are vesicular (dark ring, pale centre), in-situ nuclei solid,
  with the same haematoxylin mass, so the difference vanishes when the 40x image is averaged to 10x;
- per-site stain vectors and intensities, and per-site in-situ/invasive mix (non-IID);
- CK5/6 translated by a small random shift (< 1 % of the side) to mimic serial-section registration.

Everything is drawn from one ``numpy.random.Generator`` seeded by (seed, site, roi), so the same
arguments give byte-identical PNGs whatever the output folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from .io import write_png
from .stain import STAINS, render

log = logging.getLogger(__name__)

PAIRED_CLASSES = ("background", "in_situ", "invasive")
JITTER_FRACTION = 0.008  # registration shift stays below 1 % of the ROI side


@dataclass(frozen=True)
class SiteStyle:
    """What differs between synthetic hospitals: stains, intensity and case mix."""

    he_stains: np.ndarray  # (3, 3) OD vectors of H, E, (unused) DAB for the H&E scanner
    ck_stains: np.ndarray  # (3, 3) OD vectors of H, (unused) E, DAB for the IHC scanner
    he_gain: float  # overall H&E stain intensity
    dab_gain: float  # DAB intensity of the IHC run
    p_in_situ: float  # probability that a lesion is in situ rather than invasive


@dataclass(frozen=True)
class Lesion:
    cy: float
    cx: float
    radius: float
    harmonics: tuple[tuple[float, int, float], ...]  # (amplitude, frequency, phase) of the outline
    label: int


def site_style(rng: np.random.Generator) -> SiteStyle:
    def shifted() -> np.ndarray:
        s = STAINS + rng.normal(0.0, 0.04, size=STAINS.shape)
        s = np.clip(s, 0.01, None)
        return s / np.linalg.norm(s, axis=1, keepdims=True)

    return SiteStyle(
        he_stains=shifted(),
        ck_stains=shifted(),
        he_gain=float(rng.uniform(0.75, 1.25)),
        dab_gain=float(rng.uniform(0.8, 1.2)),
        p_in_situ=float(rng.beta(1.2, 1.2)),
    )


def make_lesions(rng: np.random.Generator, side: int, p_in_situ: float) -> list[Lesion]:
    """Place 2-5 lesions with overlapping size ranges; labels follow the site's mix."""
    lesions = []
    for _ in range(int(rng.integers(2, 6))):
        label = 1 if rng.random() < p_in_situ else 2
        irregular = 0.10 if label == 1 else 0.16
        harmonics = tuple(
            (float(rng.uniform(0, irregular)), int(k), float(rng.uniform(0, 2 * np.pi)))
            for k in (2, 3, 5)
        )
        lesions.append(Lesion(
            cy=float(rng.uniform(0.1, 0.9) * side),
            cx=float(rng.uniform(0.1, 0.9) * side),
            radius=float(rng.uniform(0.07, 0.15) * side),
            harmonics=harmonics,
            label=label,
        ))
    return lesions


def _rasterise(lesions: list[Lesion], shape: tuple[int, int], rim: float) -> tuple[np.ndarray, ...]:
    """Label map (rim included in in-situ lesions) and the rim mask, on a ``shape`` canvas."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    labels = np.zeros(shape, np.uint8)
    rim_mask = np.zeros(shape, bool)
    for les in lesions:
        dy, dx = yy - les.cy, xx - les.cx
        theta = np.arctan2(dy, dx)
        outline = np.full(shape, les.radius, np.float32)
        for amp, k, phase in les.harmonics:
            outline *= 1.0 + amp * np.sin(k * theta + phase)
        dist = np.hypot(dy, dx)
        inside = dist < outline
        labels[inside] = les.label
        rim_mask &= ~inside  # a later lesion overwrites an earlier rim
        if les.label == 1:
            ring = inside & (dist >= outline - rim)
            rim_mask |= ring
    return labels, rim_mask


def _nuclei(rng: np.random.Generator, density: np.ndarray, sigma: float, ring: bool) -> np.ndarray:
    """Haematoxylin from Poisson nuclei: solid blobs, or vesicular rings of the same mass."""
    impulses = (rng.random(density.shape) < density).astype(np.float32)
    impulses *= rng.uniform(0.7, 1.3, size=density.shape).astype(np.float32)
    def blob(s: float) -> np.ndarray:  # unit-peak Gaussian nuclei of width s
        return ndimage.gaussian_filter(impulses, s) * 2 * np.pi * s**2

    if not ring:
        return blob(sigma)
    # Dark rim, pale centre; divided by its mass (1.5 - 0.9 * 0.45**2) to match a solid nucleus.
    return np.clip(1.5 * blob(sigma) - 0.9 * blob(0.45 * sigma), 0, None) / 1.3177


def render_roi(rng: np.random.Generator, side: int, style: SiteStyle) -> dict[str, np.ndarray]:
    """One ROI at 40x: ``he`` and ``ck56`` ``(side, side, 3)`` uint8, ``mask`` ``(side, side)``."""
    scale = side / 256.0
    max_shift = int(JITTER_FRACTION * side)
    margin = max_shift + 1
    canvas = (side + 2 * margin, side + 2 * margin)
    lesions = make_lesions(rng, canvas[0], style.p_in_situ)
    labels, rim = _rasterise(lesions, canvas, rim=max(2.0, 0.02 * side))
    tumour = labels > 0
    sigma = 1.6 * scale
    area = np.pi * (2.2 * sigma) ** 2
    # Nuclear densities per pixel: packed in tumour, sparse in stroma, a line along the rim.
    solid = _nuclei(rng, np.where(labels == 1, 0.6 / area, 0.06 / area), sigma, ring=False)
    vesicular = _nuclei(rng, np.where(labels == 2, 0.6 / area, 0.0), sigma, ring=True)
    myo = _nuclei(rng, rim * (0.25 / area), 0.8 * sigma, ring=False)
    hema = np.clip(solid + vesicular, 0, 2.2)

    fibres = ndimage.gaussian_filter(rng.normal(0, 1, canvas), (2 * scale, 8 * scale))
    blobs = ndimage.gaussian_filter(rng.normal(0, 1, canvas), 10 * scale)
    fat = blobs > 1.8 * blobs.std()
    fat &= ~ndimage.binary_dilation(tumour, iterations=max(1, int(6 * scale)))
    tissue = (~fat).astype(np.float32)
    eosin = tissue * np.where(tumour, 0.30, 0.55 + 0.12 * fibres / (fibres.std() + 1e-6))

    he = np.stack([(hema + 0.5 * myo) * tissue, np.clip(eosin, 0, None), np.zeros(canvas)], -1)
    he_rgb = render(style.he_gain * 1.4 * he, style.he_stains)
    # CK5/6: a paler haematoxylin counterstain; DAB on the myoepithelial rim, faint elsewhere.
    dab = ndimage.gaussian_filter(rim.astype(np.float32), 0.8 * scale) * 1.6 + myo * 0.5
    dab += 0.04 * tumour
    ck = np.stack([0.55 * (hema + 0.9 * myo) * tissue, 0.03 * tissue, style.dab_gain * dab], -1)
    ck_rgb = render(1.4 * ck, style.ck_stains)

    shift = rng.integers(-max_shift, max_shift + 1, size=2)
    he_rgb = _crop(he_rgb, margin, margin, side)
    ck_rgb = _crop(ck_rgb, margin + shift[0], margin + shift[1], side)
    noise = lambda: rng.normal(0, 2.0, (side, side, 3))  # noqa: E731 - two identical draws
    return {
        "he": np.clip(he_rgb + noise(), 0, 255).round().astype(np.uint8),
        "ck56": np.clip(ck_rgb + noise(), 0, 255).round().astype(np.uint8),
        "mask": _crop(labels, margin, margin, side),
    }


def _crop(array: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    return array[top : top + side, left : left + side]


def split_ids(ids: list[str]) -> dict[str, list[str]]:
    """60/20/20-style split; with two or more ROIs both train and val get at least one."""
    k = len(ids)
    n_test = k // 5
    n_val = max(1, round(0.2 * k)) if k >= 2 else 0
    n_train = k - n_val - n_test
    return {"train": ids[:n_train], "val": ids[n_train : n_train + n_val],
            "test": ids[n_train + n_val :]}


def write_synthetic(out: Path, sites: int, rois_per_site: int, size: int, seed: int) -> list[Path]:
    """Write ``sites`` site folders under ``out``; returns their paths."""
    if size < 32 or size % 4:
        raise ValueError(f"--size {size}: the 40x side must be a multiple of 4 and at least 32")
    paths = []
    for s in range(sites):
        name = f"site_{s + 1:02d}"
        style = site_style(np.random.default_rng([seed, s]))
        ids = [f"roi_{r:04d}" for r in range(rois_per_site)]
        for r, roi_id in enumerate(ids):
            roi = render_roi(np.random.default_rng([seed, s, r + 1]), size, style)
            for key, array in roi.items():
                write_png(out / name / "rois" / roi_id / f"{key}.png", array)
        meta = {"name": name, "um_per_px": 0.25, "classes": list(PAIRED_CLASSES),
                "modalities": ["he", "ck56"], "splits": split_ids(ids)}
        (out / name / "site.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        log.info("wrote %s (%d ROIs, in-situ share %.2f)", name, rois_per_site, style.p_in_situ)
        paths.append(out / name)
    return paths
