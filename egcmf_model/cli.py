"""`egcmf`: make and check data, train, evaluate, predict and profile the network.

JSON results are one line, the last on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .commands import add_model_commands
from .config import ConfigError, load_config
from .data.io import DataError
from .wsi.commands import add_wsi_commands

log = logging.getLogger("egcmf")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", help="tiny (CPU, tests) or paper (Table VI size)")
    p.add_argument("--config", type=Path, help="YAML file overriding the preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set model.width=0.25 (repeatable)")


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.preview import write_preview
    from .data.synthetic import write_synthetic

    if args.out.is_dir() and any(args.out.iterdir()):
        raise ValueError(f"{args.out} is not empty: give a new or empty folder, so that two "
                         "sets do not mix (or remove it to write the set again)")
    start = time.perf_counter()
    write_synthetic(args.out, args.sites, args.rois_per_site, args.size, args.seed)
    seconds = time.perf_counter() - start
    files = args.sites * args.rois_per_site * 3
    log.info("wrote %d sites, %d files in %.1fs (%.1f files/s) to %s",
             args.sites, files, seconds, files / max(seconds, 1e-9), args.out)
    if args.preview:
        log.info("preview: %s", write_preview(args.out, args.out / "preview.png"))
    return 0


def _cmd_check_site(args: argparse.Namespace) -> int:
    from .data.io import DataError
    from .data.sites import check_site, find_sites

    if not args.dir.is_dir():
        print(f"{args.dir}: not a folder; give a site folder (with site.yaml) or a folder of "
              "them", file=sys.stderr)
        return 1
    try:
        sites = find_sites(args.dir)
    except DataError:
        sites = [args.dir]  # check_site says what is missing
    if sites == [args.dir]:
        problems = check_site(args.dir, not args.no_registration)
        print("\n".join(problems) if problems else f"{args.dir}: OK")
        if problems:
            print(f"{args.dir}: {len(problems)} problem(s); fix them before this site joins",
                  file=sys.stderr)
        return 1 if problems else 0
    failed = []  # a folder of sites: each one's problems under its name
    for folder in sorted(d for d in args.dir.iterdir()  # what the loaders read, and the rest
                         if d in sites or (d.is_dir() and d.name[0] != ".")):
        if folder not in sites:  # it would stay out of the federation without a word
            print(f"{folder.name}: not a site folder (no site.yaml)")
            failed.append(folder.name)
            continue
        problems = check_site(folder, not args.no_registration)
        print(f"{folder.name}: {len(problems)} problem(s)" if problems else f"{folder.name}: OK")
        print("".join(f"  {line}\n".replace("\n", "\n  ").rstrip(" ") for line in problems),
              end="")
        failed += [folder.name] if problems else []
    if failed:
        print(f"{args.dir}: {', '.join(failed)} not ready; fix them before the sites join",
              file=sys.stderr)
        return 1
    print(f"{args.dir}: all {len(sites)} sites OK")
    return 0


def _cmd_data_summary(args: argparse.Namespace) -> int:
    from .data.source import open_source
    from .data.summary import summarise

    sets = [f"data.dataset={args.dataset}", f"data.root={args.data or ''}"]
    cfg = load_config(args.preset, args.config, [*args.overrides, *sets])
    source = open_source(cfg.data, 4 * cfg.model.in_size)
    doc = summarise(source, args.partition, args.clients, args.seed, args.alpha)
    if not args.json:
        for site in doc["sites"]:
            print(f"{site['name']:>12}  {len(site['rois']):4d} ROIs  {site['pixels']}")
        print(f"{'test':>12}  {len(doc['test']['rois']):4d} ROIs  {doc['test']['pixels']}")
    print(json.dumps(doc) if args.json else "")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egcmf", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic paired H&E/CK5/6 site folders")
    p.add_argument("--out", type=Path, required=True,
                   help="a new or empty folder")
    p.add_argument("--sites", type=int, default=5, help="hospitals (default %(default)s)")
    p.add_argument("--rois-per-site", type=int, default=6,
                   help="ROIs per hospital (default %(default)s; the main job's set has 12)")
    p.add_argument("--size", type=int, default=256,
                   help="side of the stored 40x ROI in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default %(default)s)")
    p.add_argument("--preview", action="store_true", help="also write OUT/preview.png")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("check-site", help="validate a site folder, or each in a folder of "
                       "sites, before it joins")
    p.add_argument("dir", type=Path, help="a site folder (with site.yaml) or a folder of them")
    p.add_argument("--no-registration", action="store_true", help="skip the H&E/CK5/6 check")
    p.set_defaults(func=_cmd_check_site)

    p = sub.add_parser("data-summary", help="ROIs and class pixels per (virtual) site")
    p.add_argument("--dataset", choices=("synthetic", "sites", "bcss"), default="synthetic",
                   help="what --data holds (default %(default)s)")
    p.add_argument("--data", type=Path, help="data folder (default: the cached synthetic set)")
    p.add_argument("--partition", choices=("iid", "dirichlet", "institution"),
                   default="institution", help="how the ROIs are split (default %(default)s)")
    p.add_argument("--clients", type=int, help="number of sites (default: one per institution)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="Dirichlet concentration (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="partition seed (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one line of JSON last")
    _config_args(p)
    p.set_defaults(func=_cmd_data_summary)
    add_model_commands(sub, _config_args)
    add_wsi_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"egcmf {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = (" (what was saved stays: continue with the same command and --resume)"
                 if args.command == "train" else "")
        print(f"egcmf {args.command}: stopped{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
