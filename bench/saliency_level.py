"""Does the key region land on the tumour? Grad-CAM read at each target decoder level.

    python bench/saliency_level.py --checkpoint runs/main/final.pt --data DIR [--split val test]

For every tile with tumour in the chosen splits: the share of the key-region window that is
tumour, with Grad-CAM read at decoder stride 8, 4 and 2 (``model.cam_stride``), against the
centred window (``mrcfm``), the mean over all windows (a random box) and the best window.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from egcmf_model.checkpoint import load_model
from egcmf_model.data.dataset import RoiDataset
from egcmf_model.data.source import open_sites
from egcmf_model.engine import INPUTS, forward
from egcmf_model.he_branch import CAM_STRIDES, level_index
from egcmf_model.saliency import centre_box, search_stride, window_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="folder of site folders")
    parser.add_argument("--split", nargs="+", default=["val", "test"])
    args = parser.parse_args()
    model, cfg, classes, _ = load_model(args.checkpoint)
    model.eval()
    source = open_sites(args.data)
    records = [r for split in args.split for r in source.split(split)]
    data = RoiDataset(records, classes, cfg.model.in_size)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in (*INPUTS, "mask")}
    tumour = ((batch["mask"] > 0) & (batch["mask"] != 255)).float()
    h, w = tumour.shape[-2:]
    window = window_size(h, w, cfg.model.window_frac)
    stride = search_stride(h, w, cfg.model.stride_frac)
    share = F.avg_pool2d(tumour[:, None], window, stride)[:, 0].flatten(1)  # per window
    keep = tumour.flatten(1).amax(dim=1) > 0

    def in_box(boxes: torch.Tensor) -> float:
        values = [tumour[i, y0:y1, x0:x1].mean() for i, (y0, x0, y1, x1)
                  in enumerate(boxes.tolist())]
        return float(torch.stack(values)[keep].mean())

    result = {"tiles": int(keep.sum()), "best window": float(share.amax(dim=1)[keep].mean()),
              "random window": float(share.mean(dim=1)[keep].mean()),
              "centre window": in_box(centre_box(len(tumour), (h, w), window, tumour.device))}
    branch = model.he_branch
    for cam_stride in CAM_STRIDES:
        branch.cam_level = level_index(cam_stride)
        with torch.no_grad():
            result[f"Grad-CAM stride {cam_stride}"] = in_box(forward(model, batch)["boxes"])
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
