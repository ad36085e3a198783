"""`fl-client --site NAME`: join a federation with this hospital's site folder.

    fl-client --site plagh --server fl.example.org:8000 --data /data/plagh --certs certs/

Validates the site folder first, checks the server's TLS certificate, then runs Flower's
SuperNode with the site's key. Images and masks never leave this machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # hospitals do not phone home

log = logging.getLogger("fl-client")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fl-client", description=__doc__.splitlines()[0])
    p.add_argument("--site", required=True, help="this site's name in the federation")
    p.add_argument("--server", default="127.0.0.1:8000", help="the SuperLink's HOST:PORT")
    p.add_argument("--data", type=Path, default=Path("data"), help="this site's site folder")
    p.add_argument("--certs", type=Path, default=Path("certs"),
                   help="folder with ca.crt and sites/<site>")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--max-wait", type=float, default=300.0,
                   help="seconds to keep retrying while the server is unreachable")
    p.add_argument("--insecure", action="store_true", help="no TLS (test networks only)")
    p.add_argument("--dp", action="store_true", help="train with DP-SGD (Opacus) at this site")
    p.add_argument("--epsilon", type=float, default=8.0, help="this site's privacy budget")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="fl-client: %(message)s", stream=sys.stderr)
    from .node import JoinError, JoinOptions, join

    opts = JoinOptions(site=args.site, server=args.server, data=args.data, certs=args.certs,
                       device=args.device, max_wait=args.max_wait, insecure=args.insecure,
                       dp=args.dp, epsilon=args.epsilon, delta=args.delta)
    try:
        join(opts)
    except KeyboardInterrupt:
        log.info("stopped; the SuperNode and its apps have been stopped")
        return 130
    except JoinError as exc:
        print(f"fl-client: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
