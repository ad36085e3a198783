"""Table V on synthetic paired data: every variant, several seeds, test Dice per lesion class.

    python bench/ablation.py --epochs 25 --seeds 0 1 2 --out runs/ablation

Writes OUT/ablation.jsonl (one line per run) and prints a Markdown table of mean ± std.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from egcmf_model.checkpoint import load_model
from egcmf_model.config import VARIANTS, load_config
from egcmf_model.data.source import open_sites
from egcmf_model.data.synthetic import write_synthetic
from egcmf_model.engine import evaluate, pick_device
from egcmf_model.losses import EGCMFLoss
from egcmf_model.trainer import fit, make_loader


def run(data: Path, variant: str, seed: int, epochs: int, out: Path) -> dict:
    cfg = load_config("tiny", overrides=[f"model.variant={variant}", f"train.seed={seed}",
                                         f"train.epochs={epochs}", "data.dataset=sites",
                                         f"data.root={data}"])
    start = time.perf_counter()
    fit(cfg, out)
    model, cfg, classes, _ = load_model(out / "best.pt")
    source = open_sites(data)
    loader = make_loader(source.split("test"), classes, cfg, train=False)
    result = evaluate(model, loader, classes, pick_device("cpu"), EGCMFLoss(cfg.loss.gamma))
    return {"variant": variant, "seed": seed, "epochs": epochs, "dice": result["dice"],
            "acc": result["acc"], "miou": result["miou"],
            "in_situ": result["per_class"]["in_situ"]["dice"],
            "invasive": result["per_class"]["invasive"]["dice"],
            "seconds": round(time.perf_counter() - start, 1)}


def _mean_std(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| variant | Dice | in situ Dice | invasive Dice | mIoU | s/run |",
             "|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        if not sel:
            continue
        cells = " | ".join(_mean_std(sel, k) for k in ("dice", "in_situ", "invasive", "miou"))
        lines.append(f"| {variant} | {cells} | {np.mean([r['seconds'] for r in sel]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rois-per-site", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = args.out / "data"
    if not data.exists():
        write_synthetic(data, args.sites, args.rois_per_site, 256, seed=0)
    rows = []
    for seed in args.seeds:
        for variant in VARIANTS:
            row = run(data, variant, seed, args.epochs, args.out / f"{variant}_s{seed}")
            rows.append(row)
            with (args.out / "ablation.jsonl").open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
