"""Table V on synthetic paired data: every variant, several seeds, test Dice per lesion class.

    python bench/ablation.py --epochs 40 --seeds 0 1 2 --out runs/ablation             # CPU
    for s in 0 1 2; do python bench/ablation.py --epochs 40 --seeds $s --width 0.5 \\
        --device cuda --set train.num_workers=3 --out runs/ablation-w05 & done; wait    # GPU

Pooled training (``egcmf train``'s loop) on the synthetic sites' training split, best
validation checkpoint, evaluated on the held-out test split. Writes OUT/ablation.jsonl (one line
per run; runs already there are skipped, so an interrupted table resumes, and one process per
seed may share a folder) and prints a Markdown table of mean ± std with the data generator's
version. DataLoader workers (``--set train.num_workers=N``) do not change the results: each
tile's augmentation is drawn from (seed, epoch, tile).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from egcmf_model.checkpoint import load_model
from egcmf_model.config import VARIANTS, load_config
from egcmf_model.data.source import open_sites
from egcmf_model.data.synthetic import generator_version, write_synthetic
from egcmf_model.engine import evaluate, pick_device
from egcmf_model.losses import EGCMFLoss
from egcmf_model.trainer import fit, make_loader


def synthetic_data(target: Path, sites: int, rois: int) -> Path:
    """The ablation's data set, written once; several processes may race (one per seed)."""
    if not (target / "done").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        write_synthetic(tmp, sites, rois, 256, seed=0)
        (tmp / "done").write_text("")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def run(data: Path, variant: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    cfg = load_config("tiny", overrides=[
        f"model.variant={variant}", f"model.width={args.width}", f"train.seed={seed}",
        f"train.epochs={args.epochs}", f"train.device={args.device}", "data.dataset=sites",
        f"data.root={data}", *args.overrides])
    start = time.perf_counter()
    shutil.rmtree(out, ignore_errors=True)  # a cell that a stopped run left is trained again
    fit(cfg, out)
    device = pick_device(args.device)
    model, cfg, classes, _ = load_model(out / "best.pt", device)
    loader = make_loader(open_sites(data).split("test"), classes, cfg, train=False)
    result = evaluate(model, loader, classes, device, EGCMFLoss(cfg.loss.gamma))
    return {"variant": variant, "seed": seed, "epochs": args.epochs, "width": args.width,
            "device": str(device), "data": data.name, "dice": result["dice"],
            "acc": result["acc"], "miou": result["miou"],
            "in_situ": result["per_class"]["in_situ"]["dice"],
            "invasive": result["per_class"]["invasive"]["dice"],
            "seconds": round(time.perf_counter() - start, 1)}


def _mean_std(rows: list[dict], key: str) -> str:
    values = [r[key] if r[key] is not None else float("nan") for r in rows]
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(rows: list[dict]) -> str:
    lines = ["| variant | Dice | in situ Dice | invasive Dice | mIoU | seeds | s/run |",
             "|---|---|---|---|---|---|---|"]
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        if not sel:
            continue
        cells = " | ".join(_mean_std(sel, k) for k in ("dice", "in_situ", "invasive", "miou"))
        lines.append(f"| {variant} | {cells} | {len(sel)} | "
                     f"{np.mean([r['seconds'] for r in sel]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--width", type=float, default=0.125,
                        help="VGG16 channel multiplier (tiny: 0.125; the paper: 1.0)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--rois-per-site", type=int, default=12)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any other config override")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = synthetic_data(args.out / f"data_v{generator_version()}", args.sites,
                          args.rois_per_site)
    log = args.out / "ablation.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    done = {(r["variant"], r["seed"], r["width"], r["data"]) for r in rows}
    for seed in args.seeds:
        for variant in args.variants:
            if (variant, seed, args.width, data.name) in done:
                continue
            row = run(data, variant, seed, args, args.out / f"w{args.width}_{variant}_s{seed}")
            rows.append(row)
            with log.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    mine = [r for r in rows if r["width"] == args.width and r["data"] == data.name]
    print(f"data generator {generator_version()}, width {args.width}, {args.epochs} epochs")
    print(table(mine))


if __name__ == "__main__":
    main()
