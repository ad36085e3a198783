"""Centralised training as the paper: Adam, cosine annealing, batch 2; checkpoint and resume."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .checkpoint import load_model, save_checkpoint
from .config import Config
from .data.dataset import RoiDataset, collate_views
from .data.io import DataError
from .data.source import DataSource, RoiRecord, open_source
from .engine import (
    GpuSpeed,
    build_model,
    evaluate,
    pick_device,
    seed_everything,
    train_epoch,
)
from .losses import EGCMFLoss
from .metrics import selection_score

log = logging.getLogger(__name__)


def make_loader(records: Sequence[RoiRecord], classes: tuple[str, ...], cfg: Config, train: bool,
                generator: torch.Generator | None = None, views: int = 1) -> DataLoader:
    """DataLoader of :class:`RoiDataset` tiles; shuffled and augmented when ``train``.

    ``views`` > 1 (training only): each tile comes as that many orientations, one after the
    other in the batch, which then holds ``views`` rows per tile."""
    dataset = RoiDataset(records, classes, cfg.model.in_size, edge_kind=cfg.loss.edge_target,
                         edge_band=cfg.loss.edge_band, augment=train and cfg.data.augment,
                         stain_jitter=cfg.data.stain_jitter, seed=cfg.train.seed, views=views)
    if not len(dataset):
        raise DataError(f"no usable ROI for {'training' if train else 'evaluation'}")
    return DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=train,
                      generator=generator, num_workers=cfg.train.num_workers,
                      drop_last=train and len(dataset) > cfg.train.batch_size,
                      collate_fn=collate_views if dataset.views > 1 else None)


def open_data(cfg: Config) -> DataSource:
    """The configured data set, checking that the variant fits it (CK5/6 or H&E only)."""
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    from .network import needs_ck56

    if needs_ck56(cfg.model.variant) and not source.has_ck56:
        raise ValueError(f"variant {cfg.model.variant} needs CK5/6 images, which "
                         f"{source.dataset} data lacks; use --variant mrfm (the H&E branch)")
    return source


def fit(cfg: Config, out: Path, resume: bool = False, source: DataSource | None = None
        ) -> dict[str, Any]:
    """Train on the pooled train split, validate each epoch, keep ``last.pt`` and ``best.pt``.
    A folder that holds a run is continued with ``resume`` and never overwritten."""
    last = out / "last.pt"
    if resume and not last.exists():
        raise ValueError(f"nothing to resume in {out}: it holds no last.pt (leave out --resume "
                         "to start a run there)")
    held = [name for name in ("last.pt", "best.pt", "metrics.jsonl") if (out / name).exists()]
    if not resume and held:
        raise ValueError(f"{out} holds a training run ({', '.join(held)}): continue it with "
                         "--resume, or give another --out")
    source = source or open_data(cfg)
    device = pick_device(cfg.train.device)
    generator = seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model, source.classes).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                                 weight_decay=cfg.train.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.train.epochs)
                 if cfg.train.lr_schedule == "cosine" else None)
    train_loader = make_loader(source.split("train"), source.classes, cfg, True, generator)
    val_loader = make_loader(source.split("val"), source.classes, cfg, False)
    loss_fn = EGCMFLoss(cfg.loss.gamma)
    start, best = 0, float("-inf")
    if resume:
        start, best = _restore(last, model, optimizer, scheduler, generator, device)
        if start >= cfg.train.epochs:
            raise ValueError(f"{out} has trained {start} epochs, the run's --epochs "
                             f"{cfg.train.epochs}: nothing to do (give a larger --epochs to "
                             "train on)")
        log.info("resuming after epoch %d of %d (best val Dice %.4f)", start, cfg.train.epochs,
                 best)
    out.mkdir(parents=True, exist_ok=True)
    speed = GpuSpeed.of(cfg.train)  # bf16 autocast, channels-last, compile: on a GPU only
    for epoch in range(start + 1, cfg.train.epochs + 1):
        train_loader.dataset.set_epoch(epoch)
        stats = train_epoch(model, train_loader, optimizer, device, loss_fn,
                            progress=f"epoch {epoch}/{cfg.train.epochs}", speed=speed)
        if scheduler is not None:
            scheduler.step()
        val = evaluate(model, val_loader, source.classes, device, loss_fn, speed)
        line = {"epoch": epoch, "train_loss": stats["loss"], **_scalars(val)}
        with (out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        log.info("epoch %d  loss %.4f  val dice %.4f  miou %.4f  acc %.4f", epoch, stats["loss"],
                 val["dice"], val["miou"], val["acc"])
        score = selection_score(val["dice"])
        improved = score > best or epoch == 1
        best = max(best, score) if improved else best
        state = {"epoch": epoch, "best": best, "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler and scheduler.state_dict(),
                 "generator": generator.get_state(),
                 "metrics": line}
        save_checkpoint(out / "last.pt", model, cfg, source.classes, **state)
        if improved:
            save_checkpoint(out / "best.pt", model, cfg, source.classes, **state)
    return {"best_dice": best, "out": str(out)}


def _restore(path: Path, model, optimizer, scheduler, generator, device) -> tuple[int, float]:
    loaded, _, _, payload = load_model(path, device)
    model.load_state_dict(loaded.state_dict())
    optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    generator.set_state(payload["generator"])
    return int(payload["epoch"]), float(payload["best"])


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    keep = {k: metrics[k] for k in ("acc", "dice", "miou", "loss")}
    keep.update({f"dice_{name}": v["dice"] for name, v in metrics["per_class"].items()})
    return keep
