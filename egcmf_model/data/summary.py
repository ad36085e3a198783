"""`egcmf data-summary`: which ROIs each (virtual) site holds, and its pixels per class."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from .partition import dominant_label, partition
from .source import DataSource, RoiRecord, class_pixels

log = logging.getLogger(__name__)


def site_partition(
    source: DataSource, scheme: str, clients: int | None, seed: int, alpha: float
) -> dict[str, list[RoiRecord]]:
    """Partition the source's training pool (train + val ROIs) into sites."""
    pool = source.pool()
    labels = None
    if scheme == "dirichlet":
        labels = {
            r.roi_id: dominant_label(class_pixels(r, len(source.classes)), source.classes)
            for r in pool
        }
    if scheme != "institution" and clients is None:
        clients = len({r.site for r in pool})
    return partition(pool, scheme, clients, seed, alpha, labels)


def summarise(
    source: DataSource, scheme: str, clients: int | None, seed: int, alpha: float
) -> dict[str, Any]:
    """The JSON document `data-summary --json` prints."""
    sites = site_partition(source, scheme, clients, seed, alpha)
    doc: dict[str, Any] = {
        "dataset": source.dataset,
        "classes": list(source.classes),
        "sites": [{"name": name, **_describe(rs, source.classes)} for name, rs in sites.items()],
        "test": _describe(source.split("test"), source.classes),
    }
    if source.dataset == "bcss":
        recorded = any(r.upsampled is not None for r in source.records)
        doc["upsampled"] = [r.roi_id for r in source.records if r.upsampled] if recorded else None
        if doc["upsampled"]:
            log.warning("%d BCSS images are 20x scans upsampled to 0.25 µm/px: %s",
                        len(doc["upsampled"]), ", ".join(doc["upsampled"]))
    return doc


def _describe(records: Sequence[RoiRecord], classes: Sequence[str]) -> dict[str, Any]:
    total = np.zeros(len(classes), np.int64)
    for record in records:
        total += class_pixels(record, len(classes))
    return {"rois": [r.roi_id for r in records],
            "pixels": {name: int(n) for name, n in zip(classes, total, strict=True)}}
