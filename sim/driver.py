"""From `sim/run.py` flags to a resolved configuration, a run, and its reports."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from egcmf_model.config import Config, apply_overrides, load_config
from egcmf_model.data.source import DataSource, open_source
from fl_server.settings import SERVER_FLAGS, check_keep_checkpoints, settings_from_args

from .experiment import SimSettings, run_federated

log = logging.getLogger("sim")


def resolve(args: argparse.Namespace) -> tuple[Config, DataSource, SimSettings]:
    """Config (preset < --config < --set < flags), the data source and the run settings."""
    check_keep_checkpoints(args.keep_checkpoints)
    flags = {"data.dataset": args.dataset, "data.root": args.data,
             "data.partition": args.partition, "data.alpha": args.alpha,
             "model.variant": args.variant, "train.epochs": args.local_epochs,
             "train.seed": args.seed, "dp.epsilon": args.epsilon, "dp.delta": args.delta}
    if args.keep_norm_local:
        flags["train.keep_norm_local"] = True
    if args.dp:  # DP-SGD needs per-sample gradients: GroupNorm instead of BatchNorm
        flags.update({"dp.enabled": True, "model.norm": "group",
                      "dp.planned_rounds": args.num_rounds})
    sets = [f"{k}={v}" for k, v in flags.items() if v is not None]
    cfg = load_config(args.preset, args.config, [*args.overrides, *sets])
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    fixes = [f"data.classes=[{', '.join(source.classes)}]"]
    if args.variant is None and not source.has_ck56:
        fixes.append("model.variant=mrfm")  # the H&E branch, for data without CK5/6
    cfg = apply_overrides(cfg, fixes)
    settings = SimSettings(out=args.out, clients=args.clients, rounds=args.num_rounds,
                           partition=cfg.data.partition, alpha=cfg.data.alpha,
                           strategy=args.strategy, seed=cfg.train.seed,
                           client_gpus=args.client_gpus, min_sites=args.min_sites,
                           fault=args.fault or "",
                           keep_checkpoints=args.keep_checkpoints,
                           server_options=tuple(settings_from_args(args, SERVER_FLAGS).items()))
    return cfg, source, settings


def run_from_args(args: argparse.Namespace, default_out: Path) -> dict[str, Any]:
    args.out = args.out or default_out
    cfg, source, settings = resolve(args)
    log.info("%s: %d clients, %d rounds, %s partition, variant %s, preset %s -> %s",
             args.mode if not args.compare else "compare", settings.clients, settings.rounds,
             settings.partition, cfg.model.variant, cfg.preset, settings.out)
    if args.compare:
        from .baselines import compare

        return compare(cfg, source, settings)
    result = run_mode(args.mode, cfg, source, settings)
    from .report import write_reports

    write_reports(settings.out, result, args.mode)
    print((settings.out / "summary.md").read_text())
    log.info("run folder: %s", settings.out)
    return result


def run_mode(mode: str, cfg: Config, source: DataSource, settings: SimSettings
             ) -> dict[str, Any]:
    if mode == "federated":
        return run_federated(cfg, source, settings)
    from .baselines import run_centralized, run_local

    return (run_centralized if mode == "centralized" else run_local)(cfg, source, settings)
