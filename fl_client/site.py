"""Where a ClientApp finds its data: a hospital's site folder, or a simulation partition."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egcmf_model.data.source import RoiRecord, open_sites

log = logging.getLogger(__name__)


class IncompatibleFederation(ValueError):
    """The federation's configuration or model does not fit this site."""


@dataclass(frozen=True)
class SiteData:
    name: str
    classes: tuple[str, ...]
    train: list[RoiRecord]
    val: list[RoiRecord]


def resolve_site(node_config: dict[str, Any], defaults: dict[str, Any]) -> SiteData:
    """Deployment: ``node_config`` names ``site`` and ``data`` (a site folder).
    Simulation: ``node_config['partition-id']`` indexes the partition file in ``defaults``."""
    if "partition-id" in node_config and "partitions" in defaults:
        return _from_partition(Path(defaults["partitions"]), int(node_config["partition-id"]))
    if "data" not in node_config:
        raise ValueError("this SuperNode has no data: start it with --node-config "
                         "\"site='NAME' data='/path/to/site'\" (fl-client does this)")
    source = open_sites(Path(str(node_config["data"])))
    name = str(node_config.get("site") or source.records[0].site)
    return SiteData(name, source.classes, source.split("train"), source.split("val"))


def _from_partition(path: Path, partition: int) -> SiteData:
    doc = json.loads(path.read_text())
    part = doc["partitions"][partition]
    records = {split: [RoiRecord(**_paths(r)) for r in part[split]] for split in ("train", "val")}
    return SiteData(part["site"], tuple(doc["classes"]), records["train"], records["val"])


def _paths(record: dict[str, Any]) -> dict[str, Any]:
    return {k: Path(v) if k in ("he", "mask", "ck56") and v is not None else v
            for k, v in record.items()}
