"""From `sim/run.py` flags to a resolved configuration, a run, and its reports."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
from pathlib import Path
from typing import Any

from egcmf_model.config import Config, ConfigError, apply_overrides, load_config
from egcmf_model.data.io import DataError
from egcmf_model.data.source import DataSource, data_kind, open_source
from egcmf_model.engine import checked_weights
from fl_server.runfolder import check_new, refuse, resumed, run_defining, write_settings
from fl_server.settings import (
    AGGREGATION_FLAGS,
    ROUND_FLAGS,
    RUN_FREE_FLAGS,
    check_keep_checkpoints,
    run_config_key,
    settings_from_args,
)
from fl_server.strategy import protection_problem

from .experiment import SimSettings, run_federated
from .public import DP_BUILT_IN, built_in_synthetic, with_public_encoders
from .stopping import signals_to

log = logging.getLogger("sim")


# Flags that set a configuration field: field -> the flag's destination.
CONFIG_FLAGS = {"data.dataset": "dataset", "data.root": "data", "data.partition": "partition",
                "data.alpha": "alpha", "model.variant": "variant", "train.epochs": "local_epochs",
                "train.seed": "seed", "dp.epsilon": "epsilon", "dp.delta": "delta"}


def _overrides(args: argparse.Namespace, stated: set[str] | None) -> list[str]:
    """``--set`` and the configuration flags as overrides (only those ``stated``, if given)."""
    flags = {key: getattr(args, dest) for key, dest in CONFIG_FLAGS.items()
             if stated is None or dest in stated}
    if args.keep_norm_local:
        flags["train.keep_norm_local"] = True
    if args.dp:  # DP-SGD needs per-sample gradients: GroupNorm instead of BatchNorm
        flags.update({"dp.enabled": True, "model.norm": "group",
                      "dp.planned_rounds": args.num_rounds})
    return [*args.overrides, *(f"{k}={v}" for k, v in flags.items() if v is not None)]


def _states_frozen(args: argparse.Namespace) -> bool:
    """Whether the command line chooses ``dp.frozen`` itself (``--set dp.frozen=...``)."""
    return any(item.partition("=")[0].strip() == "dp.frozen" for item in args.overrides)


def configured(args: argparse.Namespace, stated: set[str] | None = None) -> Config:
    """Preset < what --dp changes on the built-in synthetic set (tiny preset) < --config <
    --set < flags."""
    overrides = _overrides(args, stated)
    cfg = load_config(args.preset, args.config, overrides)
    if (stated is None and args.data is not None and args.dataset is None
            and cfg.data.dataset == "synthetic"):  # a new run's --data, its kind said nowhere
        overrides.append(f"data.dataset={data_kind(args.data)}")
        cfg = load_config(args.preset, args.config, overrides)
    if cfg.dp.enabled and cfg.preset == "tiny" and built_in_synthetic(cfg):
        cfg = load_config(args.preset, args.config, overrides, defaults=DP_BUILT_IN)
    return cfg


def _fitted(args: argparse.Namespace, cfg: Config) -> Config:
    """``cfg`` fitted to its data (the data's classes; the H&E branch for data without
    CK5/6)."""
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    fixes = [f"data.classes=[{', '.join(source.classes)}]"]
    if args.variant is None and not source.has_ck56:
        fixes.append("model.variant=mrfm")  # the H&E branch, for data without CK5/6
    return apply_overrides(cfg, fixes)


def resolve(args: argparse.Namespace) -> tuple[Config, DataSource, SimSettings]:
    """Config, data source and run settings: a new run's from the flags, in an empty folder;
    a resumed run's from its checkpoint, with any flag stated again checked against it."""
    check_keep_checkpoints(args.keep_checkpoints)
    for flag, value in (("--clients", args.clients), ("--rounds", args.num_rounds),
                        ("--local-epochs", args.local_epochs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, not {value}")
    if args.client_gpus:
        _check_gpus(args.client_gpus)
    if args.alpha is not None and not args.alpha > 0:
        raise ValueError(f"--alpha must be above 0 (the Dirichlet concentration: the smaller, "
                         f"the more each site's classes are skewed), not {args.alpha:g}")
    flags = {**settings_from_args(args, ROUND_FLAGS)}
    extra = {"clients": args.clients, "fault": args.fault or ""}
    if args.resume:
        cfg, settings, extra = _resumed(args, flags, extra)
    else:
        check_new(args.out)
        cfg = configured(args)
        if cfg.dp.enabled and (args.compare or args.mode != "federated"):
            raise ValueError("--dp trains at the sites of a federation, each with its own "
                             "privacy budget; --compare and --mode centralized/local have no "
                             "such sites. Leave out --dp, or run the federation alone")
        cfg, settings = _fitted(args, cfg), run_defining(flags)
    problem = protection_problem(settings["strategy"], extra["clients"],
                                 settings["trim-fraction"], settings["krum-f"])
    if problem:
        raise ValueError(f"{problem}. Use more --clients, or another strategy or setting")
    if args.mode == "federated" and not args.compare and not args.resume:
        cfg = checked_weights(with_public_encoders(cfg, freeze=not _states_frozen(args)))
    if args.mode == "federated" and not args.compare:
        write_settings(args.out, settings, extra)
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    aggregation = {run_config_key(name) for name in AGGREGATION_FLAGS}
    run = SimSettings(out=args.out, clients=extra["clients"], rounds=settings["num-rounds"],
                      partition=cfg.data.partition, alpha=cfg.data.alpha,
                      strategy=settings["strategy"], seed=cfg.train.seed,
                      client_gpus=args.client_gpus, min_sites=settings["min-sites"],
                      fault=extra["fault"], resume=args.resume, budget=args.budget,
                      keep_checkpoints=args.keep_checkpoints,
                      server_options=(*((k, v) for k, v in settings.items()
                                        if k in aggregation),
                                      *settings_from_args(args, RUN_FREE_FLAGS).items()))
    return cfg, source, run


def _check_gpus(share: float) -> None:
    """Flower's simulation would hang with no client able to start; say so instead."""
    import torch

    gpus = torch.cuda.device_count()
    if not share > 0:
        raise ValueError(f"--client-gpus must be above 0 (a share of one GPU per site), "
                         f"not {share:g}; leave it out to simulate on the CPU")
    if share > gpus:
        have = f"{gpus} GPU(s)" if gpus else "no GPU that PyTorch can use"
        raise ValueError(f"--client-gpus {share:g} gives each virtual site {share:g} GPU(s); "
                         f"this machine has {have}. Leave it out to simulate on the CPU")


def _resumed(args: argparse.Namespace, flags: dict[str, Any], extra: dict[str, Any]
             ) -> tuple[Config, dict[str, Any], dict[str, Any]]:
    if args.mode != "federated" or args.compare:
        raise ValueError("--resume continues a federated run; the baselines start afresh")
    stated = getattr(args, "given", None)
    stated = set(vars(args)) if stated is None else stated
    ref, settings, changes = resumed(
        args.out, stated, lambda: with_public_encoders(_fitted(args, configured(args, stated)),
                                                       train=False,
                                                       freeze=not _states_frozen(args)),
        _overrides(args, stated),
        {k: v for k, v in run_defining(flags).items() if k.replace("-", "_") in stated})
    kept = {key: ref.extra.get(key, value) for key, value in extra.items()}
    changes += [f"{key}: {kept[key]!r} -> {value!r}" for key, value in extra.items()
                if key in stated and value != kept[key]]
    refuse(args.out, changes, ref, settings)
    return ref.config, settings, kept


def run_from_args(args: argparse.Namespace, default_out: Path) -> dict[str, Any]:
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out: the run folder to continue")
    args.out = args.out or default_out
    existed = args.out.exists()
    new = not args.resume and not (args.out.is_dir() and any(args.out.iterdir()))
    try:
        return _run(args)
    except (ConfigError, DataError, ValueError):
        if new:  # a run refused before its first round leaves its folder as it found it
            _clear_unstarted(args.out, existed)
        raise
    except KeyboardInterrupt:  # before a federated run's simulation, or in a baseline's
        if new and args.mode == "federated" and not args.compare:
            _clear_unstarted(args.out, existed)  # (a baseline's checkpoints may be in flight)
        raise


def _clear_unstarted(out: Path, existed: bool) -> None:
    """Remove what a new run wrote in ``out`` (empty or missing before it) when nothing of a
    round is there: no checkpoint, no metrics."""
    if not out.is_dir() or any(p.name == "metrics.jsonl" or p.suffix == ".pt"
                               for p in out.rglob("*")):
        return
    if not existed:
        shutil.rmtree(out)
        return
    for path in out.iterdir():
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def _run(args: argparse.Namespace) -> dict[str, Any]:
    cfg, source, settings = resolve(args)
    log.info("%s: %d clients, %d rounds, %s partition, variant %s, preset %s -> %s",
             args.mode if not args.compare else "compare", settings.clients, settings.rounds,
             settings.partition, cfg.model.variant, cfg.preset, settings.out)
    if cfg.dp.enabled:
        log.info("DP-SGD at every site: epsilon %g, delta %g over %d planned rounds; %d local "
                 "epoch(s), %s at %g, batch %d, %d orientation(s) of each tile", cfg.dp.epsilon,
                 cfg.dp.delta, cfg.dp.planned_rounds, cfg.train.epochs, cfg.dp.optimizer,
                 cfg.dp.step_size(), cfg.dp.batch_size, cfg.dp.augmentations)
    if args.compare:
        from .baselines import compare

        return compare(cfg, source, settings)
    result = run_mode(args.mode, cfg, source, settings)
    from .report import write_reports

    with signals_to(signal.SIG_IGN):  # a second: a complete run keeps its reports whole
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
