"""Simulate a federation of hospitals on Flower's simulation engine, reproducibly.

    python sim/run.py --clients 5            # built-in synthetic data, tiny preset
    python sim/run.py --dataset bcss --data BCSS/ --partition institution --clients 4
    python sim/run.py --compare              # federated vs centralized vs local

Every flag maps to one configuration field; --config FILE gives a YAML file that flags override.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path

from sim.stopping import signals_to, stop_line  # light: a stop answers at once

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals do not phone home
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")  # a stopped simulation starts no new Ray
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # quiets a Ray FutureWarning


def build_parser() -> argparse.ArgumentParser:
    from fl_server.settings import ROUND_FLAGS, add_settings_arguments

    p = argparse.ArgumentParser(prog="sim/run.py", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=5, help="virtual hospitals (default 5)")
    p.add_argument("--local-epochs", type=int,
                   help="epochs per round at each site (default: the preset's, 7 for tiny; "
                        "1 under --dp on the built-in synthetic set)")
    p.add_argument("--dataset", choices=("synthetic", "sites", "bcss"),
                   help="what --data holds (default: bcss for a folder with masks/, else "
                        "sites; without --data, synthetic: the built-in set)")
    p.add_argument("--data", type=Path, help="data folder (default: generated synthetic set)")
    p.add_argument("--partition", choices=("iid", "dirichlet", "institution"),
                   help="how the pooled training ROIs are split into --clients sites "
                        "(default: institution, whole hospitals per site)")
    p.add_argument("--alpha", type=float,
                   help="Dirichlet concentration of --partition dirichlet: the smaller, the "
                        "more skewed each site's classes (default 0.5)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "paper"),
                   help="network size and training recipe (default: tiny, for CPUs; paper: "
                        "the paper's network, for a GPU)")
    p.add_argument("--variant", choices=("unet", "mrcfm", "mrfm", "mrfm+edm", "full"),
                   help="network variant (default: full with CK5/6 data, mrfm, the H&E "
                        "branch, without)")
    add_settings_arguments(p, ROUND_FLAGS)
    p.add_argument("--keep-norm-local", action="store_true",
                   help="FedBN: normalisation layers stay at each site")
    p.add_argument("--dp", action="store_true",
                   help="DP-SGD at every site (Opacus; GroupNorm network); see --epsilon. "
                        "On the built-in synthetic set (tiny preset): 1 local epoch, "
                        "dp.optimizer=sgd (lr 0.2) and dp.augmentations=8 (unless chosen with "
                        "--set, --local-epochs or --config), and the encoders come from a "
                        "network trained without "
                        "DP on public synthetic data (once, then cached; --set "
                        "dp.public_epochs=0: none), which DP-SGD leaves as they are")
    p.add_argument("--epsilon", type=float, help="each site's privacy budget (default 8)")
    p.add_argument("--delta", type=float, help="DP delta (default 1e-5)")
    p.add_argument("--fault", metavar="KIND:COUNT",
                   help="COUNT sites (chosen by the seed) misbehave every round: "
                        "nan, shape, scale (x1e6), dropout, inflate (a poisoned update at "
                        "0.9x the norm limit, claiming 1e9 examples) or reverse (the same "
                        "update with valid BatchNorm variances, claiming the site's true "
                        "number of examples)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the partition, the network's initialisation, shuffling, "
                        "augmentation and simulated DP noise (default 0)")
    p.add_argument("--out", type=Path, help="run folder (default runs/<timestamp>); a new run "
                                            "needs an empty or new folder")
    p.add_argument("--resume", action="store_true",
                   help="continue the federated run in --out after its last checkpoint, with "
                        "its configuration (only --rounds may grow)")
    p.add_argument("--config", type=Path,
                   help="YAML configuration (a run folder's config.yaml, say); --set and the "
                        "flags above override it")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="one configuration field, e.g. --set train.lr=0.001; repeatable")
    p.add_argument("--client-gpus", type=float, default=0.0,
                   help="share of a GPU each simulated site takes (default 0: CPU only)")
    p.add_argument("--mode", choices=("federated", "centralized", "local"), default="federated",
                   help="federated (default), centralized (one model on the pooled data) or "
                        "local (each site alone)")
    p.add_argument("--compare", action="store_true", help="run all three modes, compare them")
    p.add_argument("--budget", choices=("epochs", "steps", "examples"), default="epochs",
                   help="what the centralized model holds equal to the federation: the local "
                        "epochs over the pooled data (default), one site's optimiser steps, or "
                        "the examples all sites see")
    p.add_argument("-v", "--verbose", action="store_true", help="show Flower and Ray logs")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    received = [signal.SIGINT]

    def interrupt(signum: int, _frame: object) -> None:  # SIGTERM, SIGHUP: as Ctrl-C
        received[0] = signum
        raise KeyboardInterrupt

    try:
        with signals_to(interrupt):
            return _main(parser, args, argv)
    except KeyboardInterrupt:  # a federated simulation says so itself, and ends at once
        resumable = args.mode == "federated" and not args.compare
        with contextlib.suppress(OSError):  # nobody may read it any more
            print(stop_line(args.out, resumable), file=sys.stderr)
        return 128 + received[0]


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace,
          argv: list[str] | None) -> int:
    _quiet_logging(args.verbose)
    from fl_server.runfolder import given_options

    args.given = given_options(parser, argv)  # a resumed run checks the flags stated again
    from egcmf_model.config import ConfigError
    from egcmf_model.data.io import DataError
    from sim.driver import run_from_args

    try:
        run_from_args(args, default_out=Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    except (ConfigError, DataError, ValueError) as exc:
        print(f"sim/run.py: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _quiet_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if not verbose:
        for name in ("flwr", "ray", "alembic", "egcmf_model.data.synthetic"):
            logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
