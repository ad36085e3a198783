"""Is bf16 autocast accurate? Test Dice of float32 and bf16, on a GPU.

    python bench/amp_accuracy.py --epochs 15 --seeds 0 1 --out /tmp/amp

For each seed, trains the ``full`` network on pooled synthetic data (5 sites x 10 ROIs of
256 px, as bench/ablation.py) with ``train.amp=none`` and with ``train.amp=bf16``, and scores
the best checkpoints on the held-out test ROIs: the float32-trained one evaluated in float32
and under bf16 autocast (the same weights: what bf16 changes in inference), the bf16-trained
one in float32 (what it changes in training, plus the drift of any two trainings on a GPU).
``--control`` also trains float32 twice more with the same seed: how far two float32 trainings
drift apart on this machine, against which the bf16 training's difference is read.
Prints one JSON line per seed and a last line with the mean differences; the option counts as
accurate when they are within 0.005.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from egcmf_model.checkpoint import load_model
from egcmf_model.config import load_config
from egcmf_model.data.source import open_sites
from egcmf_model.data.synthetic import write_synthetic
from egcmf_model.engine import GpuSpeed, evaluate, pick_device
from egcmf_model.losses import EGCMFLoss
from egcmf_model.trainer import fit, make_loader


def trained(data: Path, preset: str, amp: str, seed: int, epochs: int, out: Path) -> float:
    """Trains; returns the seconds it took."""
    cfg = load_config(preset, overrides=[
        "model.variant=full", f"train.amp={amp}", f"train.seed={seed}",
        f"train.epochs={epochs}", "data.dataset=sites", f"data.root={data}"])
    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)  # each training starts afresh, also on a rerun
    fit(cfg, out)
    return round(time.perf_counter() - start, 1)


def test_dice(data: Path, checkpoint: Path, amp: str) -> float:
    device = pick_device("auto")
    model, cfg, classes, _ = load_model(checkpoint, device)
    loader = make_loader(open_sites(data).split("test"), classes, cfg, train=False)
    return float(evaluate(model, loader, classes, device, EGCMFLoss(cfg.loss.gamma),
                          GpuSpeed(amp=amp))["dice"])


def one_seed(data: Path, preset: str, seed: int, epochs: int, out: Path, control: bool
             ) -> dict:
    seconds = {amp: trained(data, preset, amp, seed, epochs, out / f"{amp}_s{seed}")
               for amp in ("none", "bf16")}
    again = {}
    if control:
        for run in ("a", "b"):
            trained(data, preset, "none", seed, epochs, out / f"none_s{seed}_{run}")
        again = {"float32_again": [test_dice(data, out / f"none_s{seed}_{run}" / "best.pt",
                                             "none") for run in ("a", "b")]}
    return {"seed": seed, "epochs": epochs, "train_s": seconds, **again,
            "float32": test_dice(data, out / f"none_s{seed}" / "best.pt", "none"),
            "float32_evaluated_in_bf16": test_dice(data, out / f"none_s{seed}" / "best.pt",
                                                   "bf16"),
            "bf16": test_dice(data, out / f"bf16_s{seed}" / "best.pt", "none")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/amp"))
    p.add_argument("--preset", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--control", action="store_true",
                   help="also train float32 twice more per seed (the drift of two trainings)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = args.out / "data"
    if not data.exists():
        write_synthetic(data, 5, 10, 256, seed=0)
    rows = []
    for seed in args.seeds:
        rows.append(one_seed(data, args.preset, seed, args.epochs, args.out, args.control))
        print(json.dumps(rows[-1]), flush=True)

    def mean_difference(key: str) -> float:
        return round(float(np.mean([r[key] - r["float32"] for r in rows])), 4)

    print(json.dumps({"test_dice_float32": round(float(np.mean([r["float32"] for r in rows])), 4),
                      "inference_bf16_minus_float32": mean_difference(
                          "float32_evaluated_in_bf16"),
                      "training_bf16_minus_float32": mean_difference("bf16")}))


if __name__ == "__main__":
    main()
