"""Whole-slide prediction: tissue, registration, overlapping tiles through the network, outputs.

The network reads 40x (0.25 µm/px) tiles of ``4 * in_size`` px, exactly as during training
(``RoiDataset.sample`` builds its inputs), whatever the scanner's resolution: each slide is read
at the level its µm per pixel makes best and resampled. Its 10x output is blended into a map of
1 µm/px on disk, from which every output is written.
"""

from __future__ import annotations

import json
import logging
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..data.dataset import RoiDataset
from ..data.io import IGNORE_INDEX, DataError
from ..data.transforms import SCALE, tumour_ids
from ..engine import INPUTS
from ..network import EGCMF, needs_ck56
from .options import WsiOptions
from .outputs import (
    THUMBNAIL_SIDE,
    PredictionMap,
    label_description,
    label_palette,
    probability_description,
)
from .registration import Registration, read_mapped, register_checked
from .slide import Slide, open_slide
from .tiling import HIGH_MPP, LOW_MPP, RasterStore, StripBlender, TileGrid
from .tissue import TISSUE_MPP, tissue_mask

log = logging.getLogger(__name__)


def predict_wsi(model: EGCMF, classes: tuple[str, ...], he_path: Path, ck_path: Path | None,
                out: Path, device: torch.device, options: WsiOptions,
                checkpoint: str = "") -> dict[str, Any]:
    """Predict a slide (pair) into ``out``; returns the report (also ``out/report.json``)."""
    start = time.perf_counter()
    he, ck = open_pair(model, he_path, ck_path, options.mpp)
    slides = {"he": he.metadata(), "ck56": ck.metadata() if ck else None}
    try:
        tissue = tissue_mask(he.thumbnail(TISSUE_MPP), TISSUE_MPP)
        times = {"tissue_s": time.perf_counter() - start}
        reg = None if ck is None else register_checked(
            he, ck, tissue, TISSUE_MPP, options.max_registration_error,
            options.accept_registration)
        times["registration_s"] = time.perf_counter() - start - times["tissue_s"]
        grid, tiles = _grid(model, he, tissue, options.overlap)
        out.mkdir(parents=True, exist_ok=True)
        n_run, outputs, areas = _predict_map(model, classes, he, ck, reg, grid, tiles, out,
                                             device, options, times)
    finally:
        for slide in (he, ck):
            if slide is not None:
                slide.close()
    times["total_s"] = time.perf_counter() - start
    report = {
        "slides": slides,
        "checkpoint": checkpoint, "variant": model.cfg.variant, "classes": list(classes),
        "network": {"tile_40x": grid.tile, "stride_40x": grid.stride, "input_10x":
                    model.cfg.in_size, "mpp_40x": HIGH_MPP, "mpp_10x": LOW_MPP},
        "options": asdict(options),
        "tissue": {"area_mm2": round(float(tissue.sum()) * TISSUE_MPP**2 / 1e6, 4),
                   "mpp": TISSUE_MPP},
        "class_areas_mm2": areas,
        "registration": reg.summary(options.max_registration_error) if reg else None,
        "tiles": {"grid": int(tiles.size), "with_tissue": int(tiles.sum()), "run": n_run},
        "time_s": {k: round(v, 2) for k, v in times.items()},
        "tiles_per_s": round(n_run / max(times["inference_s"], 1e-9), 3),
        "outputs": outputs,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _predict_map(model: EGCMF, classes: tuple[str, ...], he: Slide, ck: Slide | None,
                 reg: Registration | None, grid: TileGrid, tiles: np.ndarray, out: Path,
                 device: torch.device, options: WsiOptions, times: dict[str, float]
                 ) -> tuple[int, dict[str, Any], dict[str, float]]:
    """Tiles into the on-disk map, then the map into the outputs; ``(tiles, files, areas)``."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as work:
        store = RasterStore(Path(work) / "map.raw", *he.size_at(LOW_MPP), 2)
        tumour = tumour_ids(classes) or [len(classes) - 1]
        blender = StripBlender(store, len(classes), tumour, model.cfg.in_size)
        t0 = time.perf_counter()
        n_run = _run_tiles(model, classes, he, ck, reg, grid, tiles, blender, device, options)
        times["inference_s"] = time.perf_counter() - t0
        result = PredictionMap(store, LOW_MPP, he.mpp, he.dimensions[::-1])
        outputs = _write_outputs(result, out, classes, tumour, he)
        areas = result.areas_mm2(classes)
        store.close()
        times["writing_s"] = time.perf_counter() - t0 - times["inference_s"]
    return n_run, outputs, areas


def open_pair(model: EGCMF, he_path: Path, ck_path: Path | None, mpp: float | None
              ) -> tuple[Slide, Slide | None]:
    """The H&E slide and, when the checkpoint's variant reads it, the CK5/6 slide."""
    if ck_path is None and needs_ck56(model.cfg.variant):
        raise DataError(f"this checkpoint's variant {model.cfg.variant} needs --ck56 (the "
                        "registered CK5/6 slide of the same block)")
    he = open_slide(he_path, mpp)
    if ck_path is not None and not needs_ck56(model.cfg.variant):
        log.info("variant %s reads H&E only; %s is not used", model.cfg.variant, ck_path)
        ck_path = None
    ck = open_slide(ck_path, mpp) if ck_path is not None else None
    for slide in (he, ck):
        if slide is not None and slide.mpp > HIGH_MPP * 1.05:
            log.warning("%s is scanned at %.3f µm/px; the network reads %.2f µm/px, so it is "
                        "upsampled and fine detail is missing", slide.path, slide.mpp, HIGH_MPP)
    return he, ck


def _grid(model: EGCMF, he: Slide, tissue: np.ndarray, overlap: float
          ) -> tuple[TileGrid, np.ndarray]:
    if not 0 <= overlap < 1:
        raise ValueError(f"--overlap {overlap}: must be at least 0 and below 1")
    tile = model.cfg.in_size * SCALE
    stride = max(SCALE, round(tile * (1 - overlap) / SCALE) * SCALE)  # whole 10x pixels
    grid = TileGrid(*he.size_at(HIGH_MPP), tile=tile, stride=stride)
    return grid, grid.tissue_tiles(tissue, HIGH_MPP / TISSUE_MPP)


def _run_tiles(model: EGCMF, classes: tuple[str, ...], he: Slide, ck: Slide | None,
               reg: Registration | None, grid: TileGrid, tiles: np.ndarray,
               blender: StripBlender, device: torch.device, options: WsiOptions) -> int:
    """Every tissue tile through the network, blended in row order; returns the tile count."""
    sampler = RoiDataset([], classes, model.cfg.in_size)
    model.eval()
    done = 0
    batches = _prefetch(_batches(sampler, he, ck, reg, grid, tiles, options.batch_size))
    with tqdm(total=int(tiles.sum()), unit="tile", desc="predict-wsi", disable=None) as bar:
        for origins, batch in batches:
            with torch.no_grad():
                out = model(**{k: batch[k].to(device) for k in INPUTS})
            probs = out["logits"].softmax(1).float().cpu().numpy()  # (B, K, H, W) at 10x
            for (top, left), p in zip(origins, probs, strict=True):
                if top // SCALE != blender.top:
                    blender.advance(top // SCALE)
                blender.add(left // SCALE, p)
            done += len(origins)
            bar.update(len(origins))
    blender.finish()
    return done


def _batches(sampler: RoiDataset, he: Slide, ck: Slide | None, reg: Registration | None,
             grid: TileGrid, tiles: np.ndarray, size: int
             ) -> Iterator[tuple[list[tuple[int, int]], dict[str, torch.Tensor]]]:
    """Network inputs of ``size`` tiles at a time, in row order."""
    origins = [(top, left) for top, lefts in grid.rows(tiles) for left in lefts]
    t = grid.tile
    for i in range(0, len(origins), size):
        chunk, samples = origins[i:i + size], []
        for top, left in chunk:
            arrays = {"he": he.region(HIGH_MPP, top, left, t, t),
                      "mask": np.full((t, t), IGNORE_INDEX, np.uint8)}
            if ck is not None and reg is not None:
                a, b = reg.affine_at((top + t / 2) * HIGH_MPP, (left + t / 2) * HIGH_MPP)
                arrays["ck56"] = read_mapped(ck, a, b, HIGH_MPP, top, left, t, t)
            samples.append(sampler.sample(arrays, "slide"))
        yield chunk, {k: torch.stack([s[k] for s in samples]) for k in INPUTS}


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Produce ``items`` in a thread, ``depth`` ahead: slide reading overlaps the network."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    end = object()

    def fill() -> None:
        try:
            for item in items:
                buffer.put(item)
            buffer.put(end)
        except BaseException as exc:  # re-raised in the consumer, with its traceback
            buffer.put(exc)

    threading.Thread(target=fill, daemon=True).start()
    while (item := buffer.get()) is not end:
        if isinstance(item, BaseException):
            raise item
        yield item


def _write_outputs(result: PredictionMap, out: Path, classes: tuple[str, ...],
                   tumour: list[int], he: Slide) -> dict[str, Any]:
    labels = result.write_tiff(out / "labels.tif", 0, label_description(classes),
                               palette=label_palette())
    prob = result.write_tiff(out / "tumour_probability.tif", 1,
                             probability_description(classes, tumour))
    features = result.write_geojson(out / "prediction.geojson", classes)
    mpp = max(he.mpp, max(he.size_at(1.0)) / THUMBNAIL_SIDE)  # about THUMBNAIL_SIDE px
    thumbnail = result.write_thumbnail(out / "thumbnail.png", he.thumbnail(mpp), mpp)
    return {"labels": labels.name, "tumour_probability": prob.name,
            "geojson": "prediction.geojson", "features": features,
            "thumbnail": thumbnail.name}
