"""One view of every data set: a list of ROI records with their site and split (FLamby-style).

A record points at files; nothing is decoded until a Dataset asks. The same interface serves one
site, all sites pooled (the centralised baseline) or the virtual sites of a partition.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import DataConfig
from . import bcss
from .io import DataError, read_mask
from .sites import find_sites, load_site_meta
from .synthetic import generator_version, write_synthetic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoiRecord:
    roi_id: str  # unique in the data set: "<site>/<roi>" for site folders, the file stem for BCSS
    site: str  # hospital: site name, or TSS code for BCSS
    split: str  # train | val | test
    he: Path
    mask: Path
    ck56: Path | None = None
    bcss_codes: bool = False  # mask holds raw BCSS codes to be mapped to classes
    upsampled: bool | None = None  # BCSS: scanned at 20x and upsampled (None = not recorded)

    def labels(self) -> np.ndarray:
        """``(H, W) uint8`` class ids, 255 = ignore."""
        raw = read_mask(self.mask)
        return bcss.map_codes(raw, self.mask) if self.bcss_codes else raw


@dataclass(frozen=True)
class DataSource:
    dataset: str
    classes: tuple[str, ...]
    records: tuple[RoiRecord, ...]

    @property
    def has_ck56(self) -> bool:
        return all(r.ck56 is not None for r in self.records)

    def split(self, name: str) -> list[RoiRecord]:
        return [r for r in self.records if r.split == name]

    def pool(self) -> list[RoiRecord]:
        """Records available to sites for training and validation (everything but test)."""
        return [r for r in self.records if r.split != "test"]


def open_source(cfg: DataConfig, roi_side: int) -> DataSource:
    """Open the data set ``cfg`` describes; ``roi_side`` sizes the generated synthetic ROIs."""
    if cfg.dataset == "bcss":
        return open_bcss(_root(cfg), cfg.bcss_val_fraction, cfg.synth_seed)
    if cfg.dataset == "sites":
        return open_sites(_root(cfg))
    root = Path(cfg.root) if cfg.root else synthetic_cache(cfg, roi_side)
    return open_sites(root, dataset="synthetic")


def data_kind(root: Path) -> str:
    """What a data folder holds when nobody says: ``bcss`` for a folder with ``masks/`` (the
    BCSS release's layout), else ``sites`` (one site folder or a folder of them)."""
    return "bcss" if (root / "masks").is_dir() else "sites"


def _root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DataError(f"--dataset {cfg.dataset} needs --data DIR")
    return Path(cfg.root)


def open_sites(root: Path, dataset: str = "sites") -> DataSource:
    records, classes = [], None
    for site_dir in find_sites(root):
        meta = load_site_meta(site_dir)
        if classes is not None and meta.classes != classes:
            raise DataError(f"{site_dir / 'site.yaml'}: classes {list(meta.classes)} differ from "
                            f"the other sites' {list(classes)}")
        classes = meta.classes
        for split, ids in meta.splits.items():
            for roi in ids:
                files = meta.files(roi)
                records.append(RoiRecord(
                    roi_id=f"{meta.name}/{roi}", site=meta.name, split=split,
                    he=files["he"], mask=files["mask"], ck56=files.get("ck56"),
                ))
    return DataSource(dataset, tuple(classes or ()), tuple(records))


def open_bcss(root: Path, val_fraction: float = 0.2, seed: int = 0) -> DataSource:
    pairs = bcss.find_pairs(root)
    splits = bcss.bcss_split([stem for stem, _, _ in pairs], val_fraction, seed)
    listed = bcss.upsampled_slides(root)
    if listed is None:
        _say_unlisted(root)
    records = tuple(
        RoiRecord(roi_id=stem, site=bcss.institution(stem), split=splits[stem], he=image,
                  mask=mask, bcss_codes=True,
                  upsampled=None if listed is None else any(stem.startswith(s) for s in listed))
        for stem, image, mask in pairs
    )
    return DataSource("bcss", bcss.BCSS_CLASSES, records)


@functools.cache
def _say_unlisted(root: Path) -> None:
    """Warn once per folder, however often a command opens it, that the list is missing."""
    log.warning("%s: no %s; the BCSS slides scanned at 20x (upsampled to 0.25 µm/px) are not "
                "recorded", root, bcss.UPSAMPLED_LIST)


def cache_dir() -> Path:
    return Path(os.environ.get("EGCMF_CACHE", Path.home() / ".cache" / "egcmf"))


def synthetic_cache(cfg: DataConfig, roi_side: int) -> Path:
    """The seeded synthetic set for ``cfg``, generated once and reused; the folder's name holds
    the generator's version, so data drawn by other code is never read back."""
    key = (f"synthetic_v{generator_version()}_{cfg.synth_sites}x{cfg.synth_rois_per_site}_"
           f"{roi_side}px_seed{cfg.synth_seed}")
    target = cache_dir() / key
    if (target / "done").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("generating the synthetic data set once into %s", target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
    write_synthetic(tmp, cfg.synth_sites, cfg.synth_rois_per_site, roi_side, cfg.synth_seed)
    (tmp / "done").write_text("")
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def class_pixels(record: RoiRecord, n_classes: int) -> np.ndarray:
    """Pixels of each class in the stored mask, ignored pixels not counted."""
    labels = record.labels()
    return np.bincount(labels[labels != bcss.IGNORE].ravel(), minlength=n_classes)[:n_classes]
