"""FLamby-style baselines, with the very functions a hospital's ClientApp calls.

``centralized``: one model on the pooled training ROIs of every site. ``local``: one model per
site on its own ROIs, for exactly the local epochs (and optimiser steps) it takes in the
federation. Both run the federation's learning-rate schedule, are evaluated on every site's
validation split after each "round", and write the same run files as a federation
(``metrics.jsonl``, ``summary.json``, ``final.pt``).

What the centralized model's budget equals, per round (``--budget``): ``epochs`` (FLamby) the
local epochs over the pooled data; ``steps`` as many optimiser steps as one site takes (the
mean site): the global model's trajectory is that long in a federation; ``examples`` as many
training examples as all sites see together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from egcmf_model.checkpoint import save_checkpoint
from egcmf_model.config import Config, to_yaml
from egcmf_model.data.source import DataSource, RoiRecord
from egcmf_model.engine import build_model, pick_device, seed_everything
from egcmf_model.metrics import SegmentationMetrics
from egcmf_model.trainer import make_loader
from fl_client.train import local_evaluate, local_train, round_progress, round_seed
from fl_server.recorder import RunRecorder

from .experiment import SimSettings, virtual_sites, write_partitions

log = logging.getLogger("sim")
Sites = dict[str, dict[str, list[RoiRecord]]]


def _evaluate_on_sites(model, sites: Sites, classes, cfg: Config, device) -> dict[str, Any]:
    """Per-site metrics of one model on every site's validation split, and their pooled totals."""
    pooled, per_site, loss, n = SegmentationMetrics(classes), {}, 0.0, 0
    k = len(classes)
    for name, split in sites.items():
        m = local_evaluate(model, split["val"], classes, cfg, device)
        pooled.confusion += np.asarray(m.pop("confusion")).reshape(k, k)
        loss += m["loss"] * m["num-examples"]
        n += m["num-examples"]
        per_site[name] = {**m, "val-examples": m.pop("num-examples")}
    agg = pooled.aggregate()
    return {"dice": agg["dice"], "miou": agg["miou"], "acc": agg["acc"], "loss": loss / max(n, 1),
            "sites": per_site}


def _start(cfg: Config, source: DataSource, s: SimSettings) -> tuple[Sites, RunRecorder, Any]:
    sites = virtual_sites(source, s)
    s.out.mkdir(parents=True, exist_ok=True)
    (s.out / "config.yaml").write_text(to_yaml(cfg))
    write_partitions(s.out / "partitions.json", source.classes, sites)
    device = pick_device("cpu" if not s.client_gpus else "auto")
    return sites, RunRecorder(s.out, cfg, source.classes, s.keep_checkpoints), device


def site_steps(sites: Sites, classes: tuple[str, ...], cfg: Config) -> dict[str, int]:
    """Optimiser steps each site takes in a round: local epochs x batches per epoch."""
    return {name: cfg.train.epochs * len(make_loader(split["train"], classes, cfg, train=True))
            for name, split in sites.items()}


def budget(kind: str, sites: Sites, classes: tuple[str, ...], cfg: Config) -> dict[str, Any]:
    """What the centralized model holds equal to the federation, and its optimiser steps per
    round, for summary.json and comparison.md."""
    per_site = site_steps(sites, classes, cfg)
    pooled = [r for split in sites.values() for r in split["train"]]
    steps = {"epochs": cfg.train.epochs * len(make_loader(pooled, classes, cfg, train=True)),
             "steps": round(float(np.mean(list(per_site.values())))),
             "examples": sum(per_site.values())}[kind]
    batch = cfg.train.batch_size
    return {"held_equal": kind, "steps_per_round": steps, "examples_per_round": steps * batch,
            "site_steps_per_round": per_site,
            "site_examples_per_round": sum(per_site.values()) * batch}


def run_centralized(cfg: Config, source: DataSource, s: SimSettings) -> dict[str, Any]:
    sites, recorder, device = _start(cfg, source, s)
    pooled = [r for split in sites.values() for r in split["train"]]
    plan = budget(s.budget, sites, source.classes, cfg)
    log.info("centralized: %s held equal, %d optimiser steps per round (each site: %s)",
             s.budget, plan["steps_per_round"], plan["site_steps_per_round"])
    steps = None if s.budget == "epochs" else plan["steps_per_round"]
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    model = build_model(cfg.model, source.classes).to(device)
    for rnd in range(1, s.rounds + 1):
        train = local_train(model, pooled, source.classes, cfg, device,
                            round_seed(cfg.train.seed, rnd, "pooled"),
                            progress=round_progress(rnd, s.rounds), steps=steps)
        line = _evaluate_on_sites(model, sites, source.classes, cfg, device)
        line.update(train_loss=train["train_loss"], train_steps=train["steps"])
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        recorder.record_round(rnd, state, line)  # written in the background: a copy
        log.info("centralized round %d/%d  dice %.4f", rnd, s.rounds, line["dice"])
    recorder.finish(s.rounds)
    return recorder.write_summary(mode="centralized", budget=plan)


def run_local(cfg: Config, source: DataSource, s: SimSettings) -> dict[str, Any]:
    """Each site alone; each round's line gives every site its own model on its own split."""
    sites, recorder, device = _start(cfg, source, s)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    models = {name: build_model(cfg.model, source.classes).to(device) for name in sites}
    for rnd in range(1, s.rounds + 1):
        own: Sites = {}
        for name, model in models.items():
            local_train(model, sites[name]["train"], source.classes, cfg, device,
                        round_seed(cfg.train.seed, rnd, name),
                        progress=round_progress(rnd, s.rounds))
            own[name] = _evaluate_on_sites(model, {name: sites[name]}, source.classes, cfg,
                                           device)["sites"][name]
        line = {"dice": float(np.mean([v["dice"] for v in own.values()])),
                "miou": float(np.mean([v["miou"] for v in own.values()])),
                "acc": float(np.mean([v["acc"] for v in own.values()])),
                "loss": float(np.mean([v["loss"] for v in own.values()])), "sites": own}
        with (s.out / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(line | {"round": rnd}) + "\n")
        log.info("local round %d/%d  mean own-site dice %.4f", rnd, s.rounds, line["dice"])
    cross = {name: {k: v["dice"] for k, v in _evaluate_on_sites(
        model, sites, source.classes, cfg, device)["sites"].items()}
        for name, model in models.items()}
    for name, model in models.items():
        save_checkpoint(s.out / f"final_{name}.pt", model, cfg, source.classes)
    return recorder.write_summary(mode="local", cross_site_dice=cross)


def compare(cfg: Config, source: DataSource, s: SimSettings) -> dict[str, Any]:
    """All three modes with one seed into OUT/<mode>/, then comparison.md and comparison.png."""
    from .driver import run_mode
    from .report import write_comparison, write_reports

    results = {}
    for mode in ("federated", "centralized", "local"):
        sub = dataclasses.replace(s, out=Path(s.out) / mode, compare_dir=Path(s.out))
        results[mode] = run_mode(mode, cfg, source, sub)
        write_reports(sub.out, results[mode], mode)
    write_comparison(Path(s.out), results)
    return results
