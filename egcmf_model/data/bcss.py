"""BCSS (Amgad et al., TCGA breast): H&E ROIs at 0.25 µm/px with 22-code masks.

Files: ``images/`` (or ``rgbs_colorNormalized/``) and ``masks/`` holding
``TCGA-<TSS>-<participant>-DX1_xmin<x>_ymin<y>_MPP-0.2500.png``. The TSS code (``name[5:7]``)
names the contributing hospital and gives the natural federated split.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .io import IGNORE_INDEX, DataError

log = logging.getLogger(__name__)

BCSS_CLASSES = ("tumor", "stroma", "inflammatory", "necrosis", "other")
TEST_INSTITUTIONS = ("OL", "LL", "E2", "EW", "GM", "S3")  # the published held-out institutions
IMAGE_DIRS = ("images", "rgbs_colorNormalized")
IGNORE = IGNORE_INDEX
UPSAMPLED_LIST = "scanned_20x.txt"  # optional: slides scanned at 20x, one per line

# Every ground-truth code of BCSS (gtruth_codes.tsv) -> our class id. Written out in full on
# purpose: a popular loader sends raw `tumor` (code 1) to "other"; the tests check each row.
CODE_TABLE: dict[int, tuple[str, int]] = {
    0: ("outside_roi", IGNORE),
    1: ("tumor", 0),
    2: ("stroma", 1),
    3: ("lymphocytic_infiltrate", 2),
    4: ("necrosis_or_debris", 3),
    5: ("glandular_secretions", 4),
    6: ("blood", 4),
    7: ("exclude", IGNORE),
    8: ("metaplasia_NOS", 4),
    9: ("fat", 4),
    10: ("plasma_cells", 2),
    11: ("other_immune_infiltrate", 2),
    12: ("mucoid_material", 4),
    13: ("normal_acinus_or_duct", 4),
    14: ("lymphatics", 4),
    15: ("undetermined", IGNORE),
    16: ("nerve", 4),
    17: ("skin_adnexa", 4),
    18: ("blood_vessel", 4),
    19: ("angioinvasion", 0),
    20: ("dcis", 0),
    21: ("other", 4),
}


def institution(name: str) -> str:
    """TSS code of a TCGA file name: ``TCGA-A1-A0SK-...`` -> ``A1``."""
    if not name.startswith("TCGA-") or len(name) < 8 or name[7] != "-":
        raise DataError(f"{name}: not a TCGA-<TSS>-... BCSS file name")
    return name[5:7]


def map_codes(raw: np.ndarray, path: Path | str = "mask") -> np.ndarray:
    """Raw BCSS codes ``(H, W)`` -> class ids with 255 for ignored pixels."""
    unknown = sorted(set(np.unique(raw).tolist()) - set(CODE_TABLE))
    if unknown:
        raise DataError(f"{path}: unknown BCSS label codes {unknown}; valid codes are 0-21")
    lut = np.full(256, IGNORE, np.uint8)
    for code, (_, cls) in CODE_TABLE.items():
        lut[code] = cls
    return lut[raw]


def find_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """``(stem, image, mask)`` for every BCSS image under ``root``, sorted by stem."""
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    if image_dir is None or not (root / "masks").is_dir():
        raise DataError(f"{root}: a BCSS folder needs masks/ and one of {', '.join(IMAGE_DIRS)}/")
    pairs = []
    for image in sorted(image_dir.glob("*.png")):
        mask = root / "masks" / image.name
        if not mask.exists():
            raise DataError(f"{mask}: missing mask for {image.relative_to(root)}")
        institution(image.stem)  # fail early on names that do not carry a TSS code
        pairs.append((image.stem, image, mask))
    if not pairs:
        raise DataError(f"{image_dir}: no PNG images")
    return pairs


def bcss_split(stems: list[str], val_fraction: float, seed: int) -> dict[str, str]:
    """Split by slide: test institutions -> test, a seeded share of the other slides -> val."""
    pool = [s for s in stems if institution(s) not in TEST_INSTITUTIONS]
    rng = np.random.default_rng(seed)
    n_val = round(val_fraction * len(pool)) if len(pool) > 1 else 0
    val = set(rng.permutation(pool)[:n_val].tolist())
    return {s: "test" if s not in pool else "val" if s in val else "train" for s in stems}


def upsampled_slides(root: Path) -> list[str] | None:
    """Slides scanned at 20x and upsampled to 0.25 µm/px, as listed in ``root/scanned_20x.txt``.

    BCSS stores every image at 0.25 µm/px, but 14 slides were scanned at 20x; the file names do
    not say which, and no image statistic tells a soft 40x scan from an upsampled 20x one
    reliably. List their TCGA slide ids (``TCGA-XX-XXXX``) or file stems, one per line, and every
    summary and log will name them. Returns ``None`` when the list is absent.
    """
    path = root / UPSAMPLED_LIST
    if not path.exists():
        return None
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return [line for line in lines if line]
