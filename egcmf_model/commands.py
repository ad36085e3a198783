"""`egcmf train | evaluate | predict | profile`: argument parsing over library functions."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from .config import apply_overrides, load_config

DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: auto, a GPU where there is one)"


def add_model_commands(sub: argparse._SubParsersAction, config_args) -> None:
    p = sub.add_parser("train", help="centralised training (Adam, cosine LR, batch 2)")
    _data_args(p)
    p.add_argument("--variant", choices=("unet", "mrcfm", "mrfm", "mrfm+edm", "full"),
                   help="default: full with CK5/6 data, mrfm (the H&E branch) without")
    p.add_argument("--epochs", type=int,
                   help="epochs to train (default: the preset's, 7 for tiny; with --resume, "
                        "the run's own)")
    p.add_argument("--seed", type=int, help="default: the preset's, 0")
    p.add_argument("--out", type=Path, help="run folder (default runs/train-<time>); a folder "
                   "that holds a run is continued with --resume, never overwritten")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in OUT from its last.pt, to its own --epochs")
    config_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="the paper's metrics for a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    _data_args(p)
    p.add_argument("--split", choices=("val", "test", "train"), default="val",
                   help="default %(default)s")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict", help="segment one ROI: mask, overlay, heatmap, key region")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--he", type=Path, required=True, help="H&E at 40x (PNG)")
    p.add_argument("--ck56", type=Path, help="registered CK5/6 at 40x (edge variants)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=_predict)

    p = sub.add_parser("profile", help="parameters, GFLOPs and inference time (Table VI)")
    p.add_argument("--variant", choices=("unet", "mrcfm", "mrfm", "mrfm+edm", "full"))
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--runs", type=int, default=3, help="timed inference runs after a warm-up")
    p.add_argument("--json", action="store_true")
    config_args(p)
    p.set_defaults(func=_profile)


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="site folder, folder of sites, or BCSS folder "
                   "(default: the cached synthetic set)")
    p.add_argument("--dataset", choices=("synthetic", "sites", "bcss"),
                   help="default: bcss for a folder with masks/, else sites")


def _data_sets(args: argparse.Namespace) -> list[str]:
    if args.data is None:
        return [f"data.dataset={args.dataset or 'synthetic'}"]
    from .data.source import data_kind

    kind = args.dataset or data_kind(args.data)
    return [f"data.dataset={kind}", f"data.root={args.data}"]


def _train(args: argparse.Namespace) -> int:
    from .data.source import open_source
    from .trainer import fit

    sets = _data_sets(args)
    out = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    epochs = args.epochs
    if args.resume and epochs is None and (out / "last.pt").exists():
        from .checkpoint import read_checkpoint  # the run goes on to the epochs it set out with
        epochs = read_checkpoint(out / "last.pt", mmap=True)["config"]["train"]["epochs"]
    sets += [f"train.{k}={v}" for k, v in (("epochs", epochs), ("seed", args.seed))
             if v is not None]
    cfg = load_config(args.preset, args.config, [*args.overrides, *sets])
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    variant = args.variant or ("full" if source.has_ck56 else "mrfm")
    cfg = apply_overrides(cfg, [f"model.variant={variant}"])
    print(json.dumps(fit(cfg, out, args.resume, source)))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .data.source import open_source
    from .engine import evaluate, pick_device
    from .losses import EGCMFLoss
    from .trainer import make_loader

    device = pick_device(args.device)
    model, cfg, classes, _ = load_model(args.checkpoint, device)
    cfg = apply_overrides(cfg, _data_sets(args))
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    if source.classes != classes:
        raise ValueError(f"data classes {list(source.classes)} differ from the checkpoint's "
                         f"{list(classes)}")
    loader = make_loader(source.split(args.split), classes, cfg, train=False)
    result = evaluate(model, loader, classes, device, EGCMFLoss(cfg.loss.gamma))
    doc = {k: result[k] for k in ("acc", "dice", "miou", "per_class", "confusion")}
    if args.json:
        print(json.dumps(doc))
    else:
        print(format_table(doc, args.split, result["num-examples"]))
    return 0


def format_table(doc: dict[str, Any], split: str, n: int) -> str:
    pct = lambda v: "  n/a " if v is None else f"{100 * v:6.2f}"  # noqa: E731
    lines = [f"split {split}, {n} tiles", f"Acc(%) {pct(doc['acc'])}   Dice(%) {pct(doc['dice'])}"
             f"   mIoU(%) {pct(doc['miou'])}", "", f"{'class':<14}{'Dice(%)':>8}{'IoU(%)':>8}"]
    lines += [f"{name:<14}{pct(v['dice']):>8}{pct(v['iou']):>8}"
              for name, v in doc["per_class"].items()]
    lines += ["", "confusion (rows: truth, columns: prediction)"]
    lines += ["  ".join(f"{c:>10}" for c in row) for row in doc["confusion"]]
    return "\n".join(lines)


def _predict(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .engine import pick_device
    from .predict import predict_files

    device = pick_device(args.device)
    model, _, classes, _ = load_model(args.checkpoint, device)
    region = predict_files(model, classes, args.he, args.ck56, args.out, device)
    print(json.dumps({"out": str(args.out), "box_10x": region["box_10x"],
                      "box_40x": region["box_40x"]}))
    return 0


def _profile(args: argparse.Namespace) -> int:
    from .profile import profile

    sets = [f"model.variant={args.variant}"] if args.variant else []
    cfg = load_config(args.preset, args.config, [*args.overrides, *sets])
    doc = profile(cfg.model, args.device, args.runs)
    if not args.json:
        print(f"{cfg.preset}/{doc['variant']}: {doc['params'] / 1e6:.2f} M parameters, "
              f"{doc['gflops']:.1f} GFLOPs at {doc['input']}, {doc['infer_s']:.4f} s on "
              f"{doc['device']}")
    print(json.dumps(doc) if args.json else "")
    return 0
