"""`fl-server`: the coordinating centre's commands. Thin: parse, then call a library function.

    fl-server certs --out certs/ --sites plagh,siteB --hostnames fl.example.org
    fl-server start --rounds 10 --min-sites 2 --certs certs/ --run-dir runs/fed1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals do not phone home

from .strategy import add_aggregation_arguments, aggregation_run_config

log = logging.getLogger("fl-server")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-server", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("certs", help="make the CA, the server certificate and site keys")
    p.add_argument("--out", type=Path, default=Path("certs"))
    p.add_argument("--sites", required=True, help="comma-separated site names, e.g. plagh,siteB")
    p.add_argument("--hostnames", default="", help="extra server names/IPs for the certificate")
    p.add_argument("--force", action="store_true", help="overwrite existing keys (rotation)")
    p.set_defaults(func=_certs)

    p = sub.add_parser("start", help="run a federation: SuperLink, TLS, rounds, checkpoints")
    p.add_argument("--config", type=Path, help="EGCMF YAML config (default: the tiny preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-sites", type=int, default=2)
    p.add_argument("--address", default="0.0.0.0:8000", help="HOST:PORT the sites connect to")
    p.add_argument("--certs", type=Path, default=Path("certs"))
    p.add_argument("--run-dir", type=Path, help="default runs/federation-<time>")
    add_aggregation_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue after the last saved round")
    p.add_argument("--round-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="how long a round waits for the sites' replies; a site that is still "
                        "busy then is left out of that round (a site that disconnects is "
                        "noticed within a minute)")
    p.add_argument("--keep-norm-local", action="store_true",
                   help="FedBN: normalisation layers stay at each site")
    p.add_argument("--dp", action="store_true",
                   help="DP-SGD at every site: GroupNorm network, noise planned for --rounds")
    p.add_argument("--insecure", action="store_true", help="no TLS, no site authentication")
    p.set_defaults(func=_start)
    return parser


def _certs(args: argparse.Namespace) -> int:
    from .certs import make_certificates

    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    hosts = [h.strip() for h in args.hostnames.split(",") if h.strip()]
    files = make_certificates(args.out, sites, hosts, force=args.force)
    log.info("wrote %d files to %s; give each site ca.crt and its sites/<name> pair "
             "(see certs/README.md)", len(files), args.out)
    return 0


def _start(args: argparse.Namespace) -> int:
    from egcmf_model.config import load_config, to_yaml

    from .launcher import StartOptions, start_federation

    host, _, port = args.address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--address {args.address!r} must be HOST:PORT")
    if args.round_timeout <= 0:
        raise ValueError(f"--round-timeout must be positive, got {args.round_timeout:g}")
    if args.insecure:
        log.warning("INSECURE: no TLS and no site authentication; weights cross the network "
                    "in clear text. Use only on a trusted test network.")
    elif not (args.certs / "server.key").exists():
        raise ValueError(f"no {args.certs / 'server.key'}: make certificates with "
                         "fl-server certs --sites a,b, or pass --certs DIR")
    run_dir = args.run_dir or Path("runs") / time.strftime("federation-%Y%m%d-%H%M%S")
    dp = ["dp.enabled=true", "model.norm=group", f"dp.planned_rounds={args.rounds}"]
    fedbn = ["train.keep_norm_local=true"] if args.keep_norm_local else []
    cfg = load_config(args.preset, args.config,
                      [*args.overrides, *(dp if args.dp else []), *fedbn])
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    opts = StartOptions(run_dir=run_dir, config_file=config_file, host=host, port=int(port),
                        certs=None if args.insecure else args.certs, insecure=args.insecure,
                        rounds=args.rounds, min_sites=args.min_sites, strategy=args.strategy,
                        resume=args.resume,
                        extra_run_config={**aggregation_run_config(args),
                                          "timeout": args.round_timeout})
    summary = start_federation(opts)
    best = summary.get("best") or {}
    log.info("done: %d rounds; best Dice %s in round %s; files in %s", summary["rounds"],
             best.get("dice"), best.get("round"), run_dir)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="fl-server: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.info("stopped; every process this command started has been stopped")
        return 130
    except (ValueError, FileExistsError, RuntimeError, OSError) as exc:
        print(f"fl-server {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
