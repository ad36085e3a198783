"""`fl-client`: a hospital's commands.

    fl-client keygen --site plagh --out certs/          # once: this site's key pair
    fl-client --site plagh --server fl.example.org:8000 --data data/plagh --certs certs/

``keygen`` makes the site's key pair here; only ``sites/<site>.pub`` goes to the centre.
Joining validates the site folder, checks the server's TLS certificate, then runs Flower's
SuperNode with the site's key and the site's own runner. Images and masks never leave here.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals do not phone home
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

log = logging.getLogger("fl-client")


def build_parser() -> argparse.ArgumentParser:
    from .options import JoinOptions

    d = JoinOptions(site="")
    p = argparse.ArgumentParser(
        prog="fl-client", description="Join a federation with this hospital's site folder.",
        epilog="Make the site's key first: fl-client keygen --site NAME --out certs/")
    p.add_argument("--site", required=True, help="this site's name in the federation")
    p.add_argument("--server", default=d.server, help="the centre's HOST:PORT (default: "
                                                      "%(default)s)")
    p.add_argument("--data", type=Path, default=d.data,
                   help="this site's site folder (default: %(default)s)")
    p.add_argument("--certs", type=Path, default=d.certs,
                   help="folder with ca.crt and sites/<site> (default: %(default)s)")
    p.add_argument("--state-dir", type=Path, default=d.state_dir,
                   help="where this site keeps its privacy ledger, FedBN layers and logs, "
                        "across runs; never a cache (default: %(default)s)")
    p.add_argument("--device", default=d.device, choices=("auto", "cuda", "cpu"))
    p.add_argument("--max-wait", type=float, default=d.max_wait,
                   help="seconds to keep trying while the centre is unreachable or restarting "
                        "(default: %(default)g)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS, no site key, no app signature (a server on 127.0.0.1 only)")
    p.add_argument("--dp", action="store_true", help="train with DP-SGD (Opacus) at this site")
    p.add_argument("--epsilon", type=float, default=d.epsilon,
                   help="this site's privacy budget (default: %(default)g)")
    p.add_argument("--delta", type=float, default=d.delta, help="(default: %(default)g)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def keygen_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-client keygen",
        description="Make this site's key pair: OUT/sites/NAME (private, mode 0600, stays "
                    "here) and OUT/sites/NAME.pub (send it to the coordinating centre).")
    p.add_argument("--site", required=True, help="this site's name in the federation")
    p.add_argument("--out", type=Path, default=Path("certs"), help="default: certs")
    p.add_argument("--force", action="store_true", help="replace an existing key pair")
    return p


def keygen(argv: list[str]) -> int:
    from fl_common.sitekeys import write_site_keypair

    args = keygen_parser().parse_args(argv)
    try:
        private, public = write_site_keypair(args.out / "sites", args.site, force=args.force)
    except (ValueError, FileExistsError, OSError) as exc:
        print(f"fl-client keygen: error: {exc}", file=sys.stderr)
        return 2
    log.info("wrote %s (keep it here) and %s: send %s to the coordinating centre, and put "
             "the centre's ca.crt in %s", private, public, public.name, args.out)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="fl-client: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)
    if argv[:1] == ["keygen"]:
        return keygen(argv[1:])
    from egcmf_model.config import budget_problem

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dp and (problem := budget_problem(args.epsilon, args.delta)):
        parser.error(problem)
    from .node import join
    from .options import JoinError, JoinOptions

    opts = JoinOptions(site=args.site, server=args.server, data=args.data, certs=args.certs,
                       state_dir=args.state_dir, device=args.device, max_wait=args.max_wait,
                       insecure=args.insecure, dp=args.dp, epsilon=args.epsilon,
                       delta=args.delta)
    try:
        join(opts)
    except KeyboardInterrupt:
        log.info("stopped; the SuperNode and the runner have been stopped")
        return 130
    except JoinError as exc:
        print(f"fl-client: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
