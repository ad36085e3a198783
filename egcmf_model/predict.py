"""Segment one ROI of any size: tile at the network's size, stitch, write pictures and the box."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps

from .data.dataset import RoiDataset
from .data.io import IGNORE_INDEX, DataError, read_rgb, write_png
from .data.preview import overlay
from .data.sites import MAX_SHIFT_FRACTION, estimate_shift
from .data.transforms import SCALE, tile_origins
from .engine import INPUTS
from .network import EGCMF

log = logging.getLogger(__name__)


def predict_arrays(model: EGCMF, classes: tuple[str, ...], he: np.ndarray,
                   ck56: np.ndarray | None, device: torch.device) -> dict[str, Any]:
    """``he``/``ck56`` ``(H, W, 3)`` 40x -> labels ``(H, W)``, saliency ``(H, W)``, boxes."""
    if ck56 is not None and ck56.shape != he.shape:
        raise DataError(f"H&E is {he.shape[0]}x{he.shape[1]} but CK5/6 is "
                        f"{ck56.shape[0]}x{ck56.shape[1]}; the pair must have the same size")
    tile = model.cfg.in_size * SCALE
    he_p = _pad_white(he, tile)
    ck_p = None if ck56 is None else _pad_white(ck56, tile)
    sampler = RoiDataset([], classes, model.cfg.in_size)
    h10, w10 = he_p.shape[0] // SCALE, he_p.shape[1] // SCALE
    logits = torch.zeros(len(classes), h10, w10)
    cam, votes, boxes = torch.zeros(h10, w10), torch.zeros(h10, w10), []
    model.eval()
    for y in tile_origins(he_p.shape[0], tile):
        for x in tile_origins(he_p.shape[1], tile):
            arrays = {"he": he_p[y:y + tile, x:x + tile],
                      "mask": np.full((tile, tile), IGNORE_INDEX, np.uint8)}
            if ck_p is not None:
                arrays["ck56"] = ck_p[y:y + tile, x:x + tile]
            batch = sampler.sample(arrays, "predict")
            with torch.no_grad():
                out = model(**{k: batch[k][None].to(device) for k in INPUTS})
            ys, xs = slice(y // SCALE, (y + tile) // SCALE), slice(x // SCALE, (x + tile) // SCALE)
            logits[:, ys, xs] += out["logits"][0].softmax(0).cpu()
            cam[ys, xs] += out["cam"][0].cpu()
            votes[ys, xs] += 1
            if "boxes" in out:
                b = out["boxes"][0].tolist()
                box10 = [b[0] + y // SCALE, b[1] + x // SCALE, b[2] + y // SCALE, b[3] + x // SCALE]
                boxes.append({"tile_40x": [y, x], "box_10x": box10,
                              "box_40x": [v * SCALE for v in box10],
                              "saliency": float(out["cam"][0, b[0]:b[2], b[1]:b[3]].mean())})
    probs = F.interpolate((logits / votes)[None], scale_factor=SCALE, mode="bilinear")[0]
    saliency = F.interpolate((cam / votes)[None, None], scale_factor=SCALE, mode="bilinear")[0, 0]
    h, w = he.shape[:2]
    return {"labels": probs.argmax(0)[:h, :w].numpy().astype(np.uint8),
            "saliency": saliency[:h, :w].clamp(0, 1).numpy(), "boxes": boxes}


def _pad_white(image: np.ndarray, tile: int) -> np.ndarray:
    """Pad bottom/right with white to at least one tile and a whole number of 10x pixels."""
    h = max(tile, -(-image.shape[0] // SCALE) * SCALE)
    w = max(tile, -(-image.shape[1] // SCALE) * SCALE)
    return np.pad(image, [(0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0)],
                  constant_values=255)


def predict_files(model: EGCMF, classes: tuple[str, ...], he_path: Path, ck_path: Path | None,
                  out: Path, device: torch.device) -> dict[str, Any]:
    """Write ``mask.png``, ``overlay.png``, ``heatmap.png``, ``region.json`` and
    ``prediction.geojson`` (QuPath annotations in the ROI's pixels) into ``out``."""
    he = read_rgb(he_path)
    ck = read_rgb(ck_path) if ck_path is not None else None
    if ck is None and model.cfg.variant in ("mrfm+edm", "full"):
        raise DataError(f"this checkpoint's variant {model.cfg.variant} needs --ck56")
    if ck is not None and ck.shape == he.shape:
        dy, dx = estimate_shift(he, ck)
        if max(abs(dy), abs(dx)) > MAX_SHIFT_FRACTION * min(he.shape[:2]):
            log.warning("%s looks unregistered to %s (shift dy=%+.0f dx=%+.0f px); predicting "
                        "anyway", ck_path, he_path, dy, dx)
    result = predict_arrays(model, classes, he, ck, device)
    out.mkdir(parents=True, exist_ok=True)
    write_png(out / "mask.png", result["labels"])
    write_png(out / "overlay.png", overlay(he, result["labels"]))
    heat = colormaps["jet"](result["saliency"])[..., :3] * 255
    write_png(out / "heatmap.png", (0.55 * he + 0.45 * heat).round().astype(np.uint8))
    best = max(result["boxes"], key=lambda b: b["saliency"], default=None)
    region = {"box_10x": best and best["box_10x"], "box_40x": best and best["box_40x"],
              "order": "y0, x0, y1, x1 (end-exclusive)", "tiles": result["boxes"],
              "classes": list(classes)}
    (out / "region.json").write_text(json.dumps(region, indent=2))
    from .wsi.annotations import write_mask_geojson  # shapely is loaded only here
    from .wsi.tiling import HIGH_MPP

    write_mask_geojson(out / "prediction.geojson", result["labels"], classes, mpp=HIGH_MPP)
    return region
