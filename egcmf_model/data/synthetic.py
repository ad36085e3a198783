"""Synthetic paired H&E / CK5/6 breast tissue at a physical scale, written as site folders.

Every size is in µm and drawn at the declared 0.25 µm/px (40x), whatever the ROI side: a larger
ROI shows more tissue, never larger cells. What each ROI carries, and why (SPEC "Data"):

- stroma: eosin-pink fibres with sparse spindle fibroblast nuclei and a few lymphocytes; fat cells;
- benign acini and ductules (background): a lumen lined by small regular nuclei, inside a rim of
  myoepithelial cells that is DAB-positive in CK5/6, exactly as strong as around in-situ lesions;
- in-situ lesions (class 1): the same rim around a duct filled with crowded large atypical nuclei;
- invasive nests (class 2): the same atypical cells, of overlapping sizes, irregular, no rim;
- 40x-only detail: most invasive nuclei (and a few in-situ ones) have granular chromatin and a
  nucleolus below 1 µm in scale, with the same haematoxylin mass as smooth nuclei, so the
  difference vanishes when the 40x image is averaged to 10x;
- per-site stain vectors, intensities and case mix (non-IID); CK5/6 shifted by up to 1 µm.

So H&E tells tumour from benign, the CK5/6 rim tells in situ from invasive, and neither alone
separates the three: in-situ lesions need H&E morphology and the rim. Everything is drawn from one
``numpy.random.Generator`` seeded by (seed, site, roi): the same arguments give byte-identical PNGs.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from .io import write_png
from .nuclei import Structure, nuclei_layer, place_structures, rasterise
from .stain import STAINS, render

log = logging.getLogger(__name__)

# Bump when the generated images change; the data cache is keyed by it and by the code's digest.
GENERATOR_VERSION = 2
PAIRED_CLASSES = ("background", "in_situ", "invasive")
UM_PER_PX = 0.25  # 40x
JITTER_UM = 1.0  # largest CK5/6 registration shift
RIM_UM = 3.0  # myoepithelial layer
LINING_UM = 7.0  # luminal epithelium of a benign acinus


def generator_version() -> str:
    """``GENERATOR_VERSION`` and a digest of the generator's code: any change to how images are
    drawn gives another version, so a data cache keyed by it is never stale."""
    digest = hashlib.sha256()
    for module in ("synthetic.py", "nuclei.py", "stain.py"):
        digest.update((Path(__file__).parent / module).read_bytes())
    return f"{GENERATOR_VERSION}.{digest.hexdigest()[:10]}"


def px(um: float) -> float:
    """µm -> pixels at 40x."""
    return um / UM_PER_PX


@dataclass(frozen=True)
class SiteStyle:
    """What differs between synthetic hospitals: stains, intensity and case mix."""

    he_stains: np.ndarray  # (3, 3) OD vectors of H, E, (unused) DAB for the H&E scanner
    ck_stains: np.ndarray  # (3, 3) OD vectors of H, (unused) E, DAB for the IHC scanner
    he_gain: float  # overall H&E stain intensity
    dab_gain: float  # DAB intensity of the IHC run
    mix: tuple[float, float, float]  # probabilities of benign, in-situ and invasive structures


def site_style(rng: np.random.Generator) -> SiteStyle:
    def shifted() -> np.ndarray:
        s = STAINS + rng.normal(0.0, 0.04, size=STAINS.shape)
        s = np.clip(s, 0.01, None)
        return s / np.linalg.norm(s, axis=1, keepdims=True)

    benign = float(rng.uniform(0.25, 0.4))
    in_situ = float(rng.uniform(0.2, 0.8)) * (1 - benign)
    return SiteStyle(he_stains=shifted(), ck_stains=shifted(),
                     he_gain=float(rng.uniform(0.8, 1.2)), dab_gain=float(rng.uniform(0.8, 1.2)),
                     mix=(benign, in_situ, 1 - benign - in_situ))


def render_roi(rng: np.random.Generator, side: int, style: SiteStyle) -> dict[str, np.ndarray]:
    """One ROI at 40x: ``he``, ``ck56`` ``(side, side, 3)`` uint8, ``mask`` ``(side, side)`` and
    ``kind`` (0 stroma, 1 in situ, 2 invasive, 3 benign; not written to disk)."""
    max_shift = max(1, min(round(px(JITTER_UM)), int(0.02 * side)))
    margin = max_shift + round(px(6.0))  # room for the shift and for nuclei centred outside
    shape = (side + 2 * margin, side + 2 * margin)
    structures = place_structures(rng, shape, style.mix, px)
    t = rasterise(structures, shape, rim=px(RIM_UM), lining=px(LINING_UM))
    he, ck, dab = _stains(rng, t, shape)
    he_rgb = render(style.he_gain * he, style.he_stains)
    ck[..., 2] = style.dab_gain * dab
    ck_rgb = render(ck, style.ck_stains)
    dy, dx = rng.integers(-max_shift, max_shift + 1, size=2)
    crop = lambda a, y=0, x=0: a[margin + y : margin + y + side, margin + x : margin + x + side]  # noqa: E731
    noise = lambda: rng.normal(0, 2.0, (side, side, 3))  # noqa: E731 - two identical draws
    return {"he": np.clip(crop(he_rgb) + noise(), 0, 255).round().astype(np.uint8),
            "ck56": np.clip(crop(ck_rgb, dy, dx) + noise(), 0, 255).round().astype(np.uint8),
            "mask": crop(t["label"]), "kind": crop(t["kind"])}


def _stains(rng: np.random.Generator, t: dict[str, np.ndarray], shape: tuple[int, int]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H&E and CK5/6 stain concentrations ``(H, W, 3)`` and the DAB layer, from the tissue map."""
    tumour, lining, rim = t["tumour"], t["lining"], t["rim"]
    stroma = ~t["inside"] & ~t["fat"]
    # Crowded atypical nuclei (radius 3.8-5.2 µm); granular chromatin mostly in invasive ones.
    granular_share = np.where(t["label"] == 2, 0.8, 0.15)
    atypical = nuclei_layer(rng, tumour * (1.0 / (np.pi * px(4.5) ** 2)),
                            [px(3.8), px(4.5), px(5.2)], granular=granular_share)
    benign = nuclei_layer(rng, lining * (0.6 / (np.pi * px(2.8) ** 2)), [px(2.6), px(3.0)])
    myo = nuclei_layer(rng, rim * (0.6 / (np.pi * px(1.3) * px(4.0))), [(px(1.3), px(4.0))],
                       angle=t["tangent"])
    fibre_angle = rng.uniform(0, np.pi) + 0.5 * _smooth_field(rng, shape, px(30.0))
    fibro = nuclei_layer(rng, stroma * (0.03 / (np.pi * px(0.9) * px(5.0))),
                         [(px(0.9), px(5.0)), (px(1.1), px(4.0))], angle=fibre_angle)
    lympho = nuclei_layer(rng, stroma * (0.01 / (np.pi * px(2.6) ** 2)), [px(2.6)])

    fibres = ndimage.gaussian_filter(rng.normal(0, 1, shape), (px(0.6), px(3.0)))
    fibres /= fibres.std() + 1e-6
    membrane = t["fat"] & ~ndimage.binary_erosion(t["fat"], iterations=round(px(0.8)))
    tissue = (~(t["fat"] & ~membrane) & ~t["lumen"]).astype(np.float32)
    hema = np.clip(atypical + benign + myo + 0.8 * fibro + 1.3 * lympho, 0, 1.6)
    hema = hema + 0.06 * (tumour | lining)  # slightly basophilic cytoplasm
    eosin = np.select([tumour, lining, rim], [0.28, 0.38, 0.42], 0.55 + 0.12 * fibres)
    he = np.stack([1.6 * hema * tissue, np.clip(eosin, 0, None) * tissue + 0.04 * t["lumen"],
                   np.zeros(shape)], -1)
    # CK5/6: a paler haematoxylin counterstain; DAB on the myoepithelial rim, faint in epithelium.
    dab = 1.5 * ndimage.gaussian_filter(rim.astype(np.float32), px(0.4)) + 0.04 * (tumour | lining)
    ck = np.stack([0.8 * hema * tissue, 0.04 * tissue, np.zeros(shape)], -1)
    return he, ck, dab


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """Unit-variance random field varying over about ``scale`` pixels (bilinear upsampling)."""
    coarse = rng.normal(0, 1, (int(shape[0] // scale) + 4, int(shape[1] // scale) + 4))
    fine = ndimage.zoom(coarse, scale, order=1, mode="nearest", grid_mode=False)
    return fine[: shape[0], : shape[1]]


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
            for key in ("he", "ck56", "mask"):
                write_png(out / name / "rois" / roi_id / f"{key}.png", roi[key])
        meta = {"name": name, "um_per_px": UM_PER_PX, "classes": list(PAIRED_CLASSES),
                "modalities": ["he", "ck56"], "splits": split_ids(ids)}
        (out / name / "site.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        log.info("wrote %s (%d ROIs, benign/in-situ/invasive mix %.2f/%.2f/%.2f)", name,
                 rois_per_site, *style.mix)
        paths.append(out / name)
    return paths


__all__ = ["GENERATOR_VERSION", "PAIRED_CLASSES", "UM_PER_PX", "SiteStyle", "Structure",
           "generator_version", "render_roi", "site_style", "split_ids", "write_synthetic"]
