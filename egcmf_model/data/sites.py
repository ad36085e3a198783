"""Site folders: what a hospital prepares, and the validator that checks it before it joins.

Layout::

    <site>/site.yaml                      name, um_per_px, classes, modalities, splits
    <site>/rois/<roi_id>/he.png           H&E, RGB, 40x
    <site>/rois/<roi_id>/ck56.png         CK5/6, RGB, 40x, registered to he.png
    <site>/rois/<roi_id>/mask.png         class ids, single channel; 255 = ignore
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from skimage.registration import phase_cross_correlation

from .io import IGNORE_INDEX, DataError, read_mask, read_rgb
from .stain import haematoxylin_density

SPLITS = ("train", "val", "test")
MAX_SHIFT_FRACTION = 0.03  # H&E/CK5/6 shifts above 3 % of the ROI side are reported
REGISTRATION_SIDE = 512  # images are averaged down to about this side before phase correlation


@dataclass(frozen=True)
class SiteMeta:
    root: Path
    name: str
    um_per_px: float
    classes: tuple[str, ...]
    modalities: tuple[str, ...]
    splits: dict[str, tuple[str, ...]]

    @property
    def has_ck56(self) -> bool:
        return "ck56" in self.modalities

    def roi_dir(self, roi_id: str) -> Path:
        return self.root / "rois" / roi_id

    def files(self, roi_id: str) -> dict[str, Path]:
        names = [*self.modalities, "mask"]
        return {key: self.roi_dir(roi_id) / f"{key}.png" for key in names}


def load_site_meta(root: Path) -> SiteMeta:
    """Parse ``root/site.yaml``; raise :class:`DataError` naming the file and the key."""
    path = root / "site.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing file (every site folder needs a site.yaml)") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: malformed YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: must be a mapping with name, um_per_px, classes, splits")
    for key in ("name", "um_per_px", "classes", "splits"):
        if key not in data:
            raise DataError(f"{path}: missing key {key!r}")
    classes, splits = data["classes"], data["splits"]
    modalities = data.get("modalities", ["he", "ck56"])
    if not isinstance(data["name"], str) or not data["name"]:
        raise DataError(f"{path}: 'name' must be a non-empty string")
    if not isinstance(data["um_per_px"], int | float) or data["um_per_px"] <= 0:
        raise DataError(f"{path}: 'um_per_px' must be a positive number")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: 'classes' must be a list of class names")
    if len(classes) >= IGNORE_INDEX:
        raise DataError(f"{path}: at most {IGNORE_INDEX} classes (255 is the ignore label)")
    if not isinstance(modalities, list) or "he" not in modalities or not set(modalities) <= {
        "he", "ck56"}:
        raise DataError(f"{path}: 'modalities' must be [he] or [he, ck56]")
    if not isinstance(splits, dict) or not set(splits) <= set(SPLITS):
        raise DataError(f"{path}: 'splits' must map some of {', '.join(SPLITS)} to ROI id lists")
    for split, ids in splits.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DataError(f"{path}: splits.{split} must be a list of ROI ids")
    return SiteMeta(
        root=root, name=data["name"], um_per_px=float(data["um_per_px"]),
        classes=tuple(classes), modalities=tuple(modalities),
        splits={s: tuple(splits.get(s) or ()) for s in SPLITS},
    )


def find_sites(root: Path) -> list[Path]:
    """``root`` itself if it is a site folder, else its sub-folders that are, sorted by name."""
    if (root / "site.yaml").exists():
        return [root]
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    sites = sorted(p for p in root.iterdir() if (p / "site.yaml").exists())
    if not sites:
        raise DataError(f"{root}: no site.yaml here nor in any sub-folder; "
                        "create one with `egcmf synth --out DIR` or see README 'Site folders'")
    return sites


def estimate_shift(he: np.ndarray, ck56: np.ndarray) -> tuple[float, float]:
    """``(dy, dx)`` px registering CK5/6 onto H&E, by phase correlation of haematoxylin."""
    factor = max(1, max(he.shape[:2]) // REGISTRATION_SIDE)
    a, b = (_block_mean(haematoxylin_density(x), factor) for x in (he, ck56))
    shift, _, _ = phase_cross_correlation(a, b, normalization=None)
    return float(shift[0] * factor), float(shift[1] * factor)


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    h, w = (s // factor * factor for s in image.shape)
    return image[:h, :w].reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))


def check_roi(meta: SiteMeta, roi_id: str, registration: bool = True) -> list[str]:
    """Every problem of one ROI, each line starting with its path relative to the site."""
    problems: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for key, path in meta.files(roi_id).items():
        rel = path.relative_to(meta.root)
        try:
            arrays[key] = read_mask(path) if key == "mask" else read_rgb(path)
        except DataError as exc:
            problems.append(f"{rel}: {str(exc).split(': ', 1)[1]}")
    sizes = {k: a.shape[:2] for k, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{k}.png {h}x{w}" for k, (h, w) in sizes.items())
        problems.append(f"rois/{roi_id}/: image sizes differ ({listing}); all must match")
    if "mask" in arrays:
        values = np.unique(arrays["mask"])
        bad = [int(v) for v in values if v >= len(meta.classes) and v != IGNORE_INDEX]
        if bad:
            problems.append(f"rois/{roi_id}/mask.png: label values {bad} are not classes "
                            f"0..{len(meta.classes) - 1} ({', '.join(meta.classes)}) or 255")
    if registration and "he" in arrays and "ck56" in arrays and len(set(sizes.values())) == 1:
        dy, dx = estimate_shift(arrays["he"], arrays["ck56"])
        side = min(sizes["he"])
        if max(abs(dy), abs(dx)) > MAX_SHIFT_FRACTION * side:
            problems.append(f"rois/{roi_id}/ck56.png: not registered to he.png: estimated shift "
                            f"dy={dy:+.0f} dx={dx:+.0f} px exceeds {MAX_SHIFT_FRACTION:.0%} of "
                            f"the {side}px side; re-register the pair")
    return problems


def check_site(root: Path, registration: bool = True) -> list[str]:
    """Validate a site folder; returns every problem found (empty list = valid)."""
    try:
        meta = load_site_meta(root)
    except DataError as exc:
        return [str(exc)]
    problems = []
    listed = [roi for split in SPLITS for roi in meta.splits[split]]
    if not listed:
        problems.append(f"{root / 'site.yaml'}: the splits list no ROI at all")
    seen: set[str] = set()
    for roi_id in listed:
        if roi_id in seen:
            problems.append(f"site.yaml: ROI {roi_id!r} is listed in more than one split")
            continue
        seen.add(roi_id)
        if not meta.roi_dir(roi_id).is_dir():
            problems.append(f"site.yaml: ROI {roi_id!r} is in the splits but rois/{roi_id}/ "
                            "does not exist")
            continue
        problems.extend(check_roi(meta, roi_id, registration))
    return problems
