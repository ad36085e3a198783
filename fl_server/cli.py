"""`fl-server`: the coordinating centre's commands. Thin: parse, then call a library function.

    fl-server certs --out certs/ --hostnames fl.example.org
    fl-server certs --out certs/ --add-site plagh.pub
    fl-server start --certs certs/ --address 0.0.0.0:8000 --run-dir runs/fed1
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals do not phone home
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

from .settings import (
    ROUND_FLAGS,
    RUN_FREE_FLAGS,
    add_settings_arguments,
    check_keep_checkpoints,
    settings_from_args,
)

log = logging.getLogger("fl-server")
START_FLAGS = (*ROUND_FLAGS, "timeout")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fl-server", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _certs_parser(sub)

    p = sub.add_parser("start", help="run a federation: SuperLink, TLS, rounds, checkpoints")
    p.add_argument("--config", type=Path, help="EGCMF YAML config (default: the tiny preset)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "paper"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_settings_arguments(p, START_FLAGS)
    p.add_argument("--address", default="0.0.0.0:8000",
                   help="HOST:PORT where the sites connect; only the Fleet API is served there "
                        "(default: 0.0.0.0:8000; [::]:8000 for IPv6 and IPv4)")
    p.add_argument("--certs", type=Path, default=Path("certs"),
                   help="folder made by fl-server certs (default: certs)")
    p.add_argument("--run-dir", type=Path, help="default runs/federation-<time>")
    p.add_argument("--resume", action="store_true", help="continue after the last saved round")
    p.add_argument("--keep-norm-local", action="store_true",
                   help="FedBN: normalisation layers stay at each site")
    p.add_argument("--dp", action="store_true",
                   help="DP-SGD at every site: GroupNorm network, noise planned for --rounds. "
                        "Small sites learn little under DP from random weights: start the "
                        "encoders from public weights and keep them as they are with "
                        "--set model.weights=PATH --set dp.frozen=encoders")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no site authentication, no app signature (loopback only)")
    p.set_defaults(func=_start)
    return parser


def _certs_parser(sub: argparse._SubParsersAction) -> None:
    from .certs import DEMO_MAX_EXAMPLES

    p = sub.add_parser(
        "certs", help="make the CA, the server certificate and the app-signing key; add sites",
        description="Make the consortium CA, the SuperLink's certificate and the app-signing "
                    "key (--out), or register a hospital's public key (--add-site). Hospitals "
                    "make their own keys with fl-client keygen and send only NAME.pub.")
    p.add_argument("--out", type=Path, default=Path("certs"), help="default: certs")
    p.add_argument("--hostnames", default="", help="extra server names/IPs for the certificate")
    p.add_argument("--add-site", type=Path, action="append", default=[], metavar="NAME.pub",
                   help="register a hospital's public key as sites/NAME.pub (the CA is not "
                        "touched); repeat for several")
    p.add_argument("--max-examples", type=int, metavar="N",
                   help="with --add-site (required): the most training or validation tiles the "
                        "hospital's replies may claim, the size of its data set as the "
                        "consortium knows it; it bounds the weight of its updates. With --sites: "
                        f"default {DEMO_MAX_EXAMPLES}")
    p.add_argument("--name", help="with one --add-site: the site's name (default: file name)")
    p.add_argument("--sites", default="",
                   help="tests and demos only: also make these sites' private keys here "
                        "(comma-separated); in a real consortium each hospital runs "
                        "fl-client keygen")
    p.add_argument("--renew-app-signing", action="store_true",
                   help="replace the app-signing key, certified by the existing ca.key")
    p.add_argument("--force", action="store_true", help="overwrite existing keys (rotation)")
    p.set_defaults(func=_certs)


def _certs(args: argparse.Namespace) -> int:
    from .certs import DEMO_MAX_EXAMPLES, add_site, make_certificates, renew_app_signing

    if args.add_site:
        if args.sites or args.hostnames or args.renew_app_signing:
            raise ValueError("--add-site registers public keys only; run it on its own")
        if args.name and len(args.add_site) > 1:
            raise ValueError("--name goes with a single --add-site")
        if args.max_examples is None:
            raise ValueError("--add-site needs --max-examples N: the most training or "
                             "validation tiles this hospital's replies may claim (the size of "
                             "its data set as the consortium knows it)")
        for pub in args.add_site:
            target = add_site(args.out, pub, args.max_examples, args.name, force=args.force)
            log.info("registered %s with at most %d examples; fl-server start registers it "
                     "with the SuperLink", target, args.max_examples)
        return 0
    if args.renew_app_signing:
        files = renew_app_signing(args.out)
        log.info("wrote %s; the sites accept it with the ca.crt they hold", files[0])
        return 0
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    hosts = [h.strip() for h in args.hostnames.split(",") if h.strip()]
    files = make_certificates(args.out, sites, hosts, force=args.force,
                              max_examples=args.max_examples or DEMO_MAX_EXAMPLES)
    log.info("wrote %d files to %s; give every hospital ca.crt; keep ca.key offline "
             "(see certs/README.md)", len(files), args.out)
    return 0


def _start(args: argparse.Namespace) -> int:
    from fl_common.address import check_insecure, parse_address

    from .launcher import StartOptions, start_federation

    address = parse_address(args.address, "--address")
    if args.timeout <= 0:
        raise ValueError(f"--round-timeout must be positive, got {args.timeout:g}")
    check_keep_checkpoints(args.keep_checkpoints)
    if args.insecure:
        check_insecure(address, "hospital")
    elif not (args.certs / "server.key").exists():
        raise ValueError(f"no {args.certs / 'server.key'}: make certificates with "
                         "fl-server certs --out DIR, or pass --certs DIR")
    run_dir = args.run_dir or Path("runs") / time.strftime("federation-%Y%m%d-%H%M%S")
    config_file, settings = _run_folder(args, run_dir)
    run_config = {**settings, **settings_from_args(args, RUN_FREE_FLAGS),
                  "timeout": args.timeout, "run-dir": str(run_dir.resolve()),
                  "resume": args.resume, "config-file": str(config_file.resolve())}
    opts = StartOptions(run_dir=run_dir, address=address, run_config=run_config,
                        certs=None if args.insecure else args.certs)
    summary = start_federation(opts)
    best = summary.get("best") or {}
    dice = best.get("dice")
    log.info("done: %d rounds; best Dice %s in round %s; files in %s", summary["rounds"],
             "n/a" if dice is None else f"{dice:.4f}", best.get("round"), run_dir)
    return 0


def _run_folder(args: argparse.Namespace, run_dir: Path) -> tuple[Path, dict]:
    """The run's configuration and settings, written to ``run_dir``: a new run into an empty
    folder, a resumed one as its checkpoint says (flags given again must agree)."""
    from egcmf_model.config import load_config, to_yaml
    from egcmf_model.engine import checked_weights

    from .certs import site_caps
    from .runfolder import check_new, refuse, resumed, run_defining, write_settings
    dp = ["dp.enabled=true", "model.norm=group", f"dp.planned_rounds={args.num_rounds}"]
    overrides = [*args.overrides, *(dp if args.dp else []),
                 *(["train.keep_norm_local=true"] if args.keep_norm_local else [])]
    sites = 0 if args.insecure else len(site_caps(args.certs))  # every key with its cap
    flags = {**settings_from_args(args, ROUND_FLAGS), "sites": sites}
    if args.resume:
        stated = {k: v for k, v in run_defining(flags).items()
                  if k == "sites" or k.replace("-", "_") in args.given}
        ref, settings, changes = resumed(
            run_dir, args.given, lambda: load_config(args.preset, args.config, overrides),
            overrides, stated)
        refuse(run_dir, changes, ref, settings)
        cfg = ref.config
    else:
        check_new(run_dir)
        cfg = checked_weights(load_config(args.preset, args.config, overrides))
        settings = run_defining(flags)
    _check_protection(settings, sites)
    write_settings(run_dir, settings, {})
    config_file = run_dir / "config.yaml"
    config_file.write_text(to_yaml(cfg))
    return config_file, settings


def _check_protection(settings: dict, sites: int) -> None:
    from .strategy import protection_problem

    problem = protection_problem(settings["strategy"], sites or settings["min-sites"],
                                 settings["trim-fraction"], settings["krum-f"])
    if problem:
        raise ValueError(f"{problem}. Add sites, or choose another strategy or setting")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="fl-server: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        if args.command == "start":  # a resumed run checks the options stated again
            from .runfolder import given_options

            args.given = given_options(parser, argv)
        return args.func(args)
    except KeyboardInterrupt:
        log.info("stopped; every process this command started has been stopped")
        return 130
    except (ValueError, FileExistsError, RuntimeError, OSError) as exc:
        print(f"fl-server {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
