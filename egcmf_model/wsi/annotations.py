"""Annotation files: QuPath GeoJSON (read and write) and ASAP XML (read).

Coordinates are level-0 pixels of the slide (pixel corners), as both programs write them.
Class names are matched to the federation's classes ignoring case, and treating spaces, hyphens
and underscores alike ("In situ" is ``in_situ``); ``class_map`` renames first ("DCIS=in_situ").
"""

from __future__ import annotations

import json
import logging
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry
from shapely.geometry.polygon import orient

from ..data.io import DataError
from ..data.preview import PALETTE
from .polygons import polygonise, valid_parts

log = logging.getLogger(__name__)

ASAP_AREA_TYPES = {"polygon", "rectangle", "spline"}  # ASAP shapes that enclose an area


@dataclass(frozen=True)
class Annotation:
    """One annotated area: its class name as written in the file, and its geometry."""

    name: str
    geometry: BaseGeometry  # Polygon or MultiPolygon, level-0 pixels


def read_annotations(path: Path) -> list[Annotation]:
    """QuPath GeoJSON (FeatureCollection, list of features, or one feature) or ASAP XML."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the annotation file ({exc})") from exc
    if text.lstrip().startswith("<"):
        return _read_asap(path, text)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: neither GeoJSON nor ASAP XML ({exc})") from exc
    return _read_geojson(path, doc)


def _read_geojson(path: Path, doc: Any) -> list[Annotation]:
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features", [])
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    elif isinstance(doc, list):
        features = doc
    else:
        raise DataError(f"{path}: expected a GeoJSON FeatureCollection or a list of features")
    out, unclassified, not_areas = [], 0, 0
    for index, feature in enumerate(features):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise DataError(f"{path}: feature {index} has no geometry")
        name = _class_name(feature.get("properties") or {})
        try:
            geometry = shape(feature["geometry"])
        except Exception as exc:  # shapely raises several types for malformed coordinates
            raise DataError(f"{path}: feature {index}: malformed geometry ({exc})") from exc
        parts = valid_parts(geometry) if geometry.geom_type != "Polygon" or \
            not geometry.is_valid else [geometry]
        parts = [p for p in parts if p.area > 0]
        if not parts:
            not_areas += 1
        elif name is None:
            unclassified += 1
        else:
            out.append(Annotation(name, parts[0] if len(parts) == 1 else shapely.union_all(parts)))
    if unclassified or not_areas:
        log.warning("%s: skipped %d unclassified annotation(s) and %d without an area "
                    "(points, lines)", path, unclassified, not_areas)
    return out


def _class_name(properties: dict[str, Any]) -> str | None:
    cls = properties.get("classification")
    name = cls.get("name") or (cls.get("names") or [None])[0] if isinstance(cls, dict) else cls
    return str(name) if name else None


def _read_asap(path: Path, text: str) -> list[Annotation]:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise DataError(f"{path}: malformed ASAP XML ({exc})") from exc
    out = []
    for index, node in enumerate(root.iter("Annotation")):
        if node.get("Type", "").lower() not in ASAP_AREA_TYPES:
            continue
        points = sorted(node.iter("Coordinate"), key=lambda c: int(c.get("Order", 0)))
        try:
            xy = [(float(c.get("X")), float(c.get("Y"))) for c in points]
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: annotation {index} has a malformed coordinate") from exc
        group = node.get("PartOfGroup")
        if len(xy) < 3 or not group or group == "None":
            continue
        parts = valid_parts(Polygon(xy))
        if parts:
            out.append(Annotation(group, shapely.union_all(parts)))
    return out


def normalise_name(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


def parse_class_map(text: str) -> dict[str, str]:
    """``"Tumor=invasive,DCIS=in_situ"`` -> ``{"tumor": "invasive", "dcis": "in_situ"}``."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        source, sep, target = item.partition("=")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"--class-map item {item!r}: write NAME=CLASS, e.g. DCIS=in_situ")
        out[normalise_name(source)] = target.strip()
    return out


def match_classes(annotations: Sequence[Annotation], classes: Sequence[str],
                  class_map: dict[str, str], source: Path) -> list[tuple[int, BaseGeometry]]:
    """``(class id, geometry)`` per annotation; an unknown name is an error naming it."""
    ids = {normalise_name(c): i for i, c in enumerate(classes)}
    out, unknown = [], set()
    for ann in annotations:
        key = normalise_name(class_map.get(normalise_name(ann.name), ann.name))
        if key in ids:
            out.append((ids[key], ann.geometry))
        else:
            unknown.add(ann.name)
    if unknown:
        raise DataError(f"{source}: annotation class(es) {sorted(unknown)} match none of the "
                        f"classes {list(classes)}; map them with --class-map, e.g. "
                        f"--class-map '{sorted(unknown)[0]}={classes[-1]}'")
    return out


def class_colour(index: int) -> list[int]:
    return [int(v) for v in PALETTE[min(index, len(PALETTE) - 1)]]


def features(polygons: dict[int, list[Polygon]], classes: Sequence[str], mpp: float,
             namespace: str) -> list[dict[str, Any]]:
    """QuPath annotation features, one per polygon; ``mpp`` is µm per coordinate unit.
    ``namespace`` makes the feature ids stable for the same input."""
    out = []
    for value in sorted(polygons):
        for k, poly in enumerate(polygons[value]):
            poly = orient(poly, sign=1.0)  # exterior counter-clockwise, holes clockwise
            name = classes[value]
            out.append({
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{namespace}/{name}/{k}")),
                "geometry": mapping(poly),
                "properties": {
                    "objectType": "annotation",
                    "name": name,
                    "classification": {"name": name, "color": class_colour(value)},
                    "isLocked": False,
                    "measurements": {"Area µm^2": round(poly.area * mpp**2, 3)},
                },
            })
    return out


def write_geojson(path: Path, feature_list: list[dict[str, Any]]) -> Path:
    """A FeatureCollection QuPath opens by drag-and-drop (File > Import objects)."""
    doc = {"type": "FeatureCollection", "features": feature_list}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, ensure_ascii=False))
    return path


def write_mask_geojson(path: Path, labels: np.ndarray, classes: Sequence[str],
                       mpp: float) -> int:
    """:func:`write_label_geojson` for a label map in memory (an ROI), in its own pixels."""
    return write_label_geojson(path, lambda y, x, h, w: labels[y:y + h, x:x + w],
                               labels.shape[:2], classes, scale=1.0, mpp=mpp)


def write_label_geojson(path: Path, read: Callable[[int, int, int, int], np.ndarray],
                        shape: tuple[int, int], classes: Sequence[str], scale: float,
                        mpp: float) -> int:
    """Trace every non-background class (ids 1..K-1) of a label map read in blocks and write
    them as QuPath annotations; ``scale`` turns label pixels into level-0 pixels of ``mpp``
    µm. Returns the number of features."""
    traced = polygonise(read, shape, range(1, len(classes)))
    if scale != 1:
        traced = {v: [affinity.scale(p, scale, scale, origin=(0, 0)) for p in polys]
                  for v, polys in traced.items()}
    found = features(traced, classes, mpp, namespace=str(path.name))
    write_geojson(path, found)
    return len(found)
