"""Flower's SuperLink, with only its Fleet API on the public address.

    python -m fl_server.superlink --public-address 0.0.0.0:8000 --ready-file F \\
        [flower-superlink options: --ssl-*, --enable-supernode-auth, ...]

This is ``flower-superlink`` itself (Flower's own argument parsing, app, lifespan and
SuperExec) served by one uvicorn server on two sockets: 127.0.0.1 on a port the system picks,
where the Control and Runtime APIs live for the centre's own use, and the public address, where
:class:`fl_server.front.FleetOnly` lets through the Fleet API alone. Both sockets use the same
TLS certificate (its SANs include 127.0.0.1). When the server is up, the loopback address is
written to ``--ready-file`` as JSON ``{"control": "127.0.0.1:PORT"}``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

import uvicorn

from fl_common.address import parse_address
from fl_common.files import atomic_write

from .front import FleetOnly

LOOPBACK = "127.0.0.1"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ``::`` accepts IPv4 too (dual stack)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6 and host == "::":
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """Writes the ready file once both sockets accept connections."""

    ready_file: Path
    internal_port: int

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            atomic_write(self.ready_file, json.dumps(
                {"control": f"{LOOPBACK}:{self.internal_port}"}).encode(), private=False)


def main(argv: list[str] | None = None) -> None:
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--public-address", required=True)
    ours.add_argument("--ready-file", type=Path, required=True)
    args, flower_args = ours.parse_known_args(sys.argv[1:] if argv is None else argv)
    public = parse_address(args.public_address, "--address")
    public_sock, internal_sock = bind(public.host, public.port), bind(LOOPBACK, 0)
    internal_port = internal_sock.getsockname()[1]

    # Flower's own parsing of its options, with the Runtime/Control address on loopback.
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    sys.argv = ["flower-superlink", *flower_args, "--host", LOOPBACK,
                "--port", str(internal_port)]
    config = _parse_superlink_lifespan_config()
    app = FleetOnly(create_app(config, SuperLinkLifespan), internal_port)
    server = _Server(uvicorn.Config(
        app=app, reload=False, access_log=True, workers=1,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile, ssl_certfile=config.ssl_certfile))
    server.ready_file, server.internal_port = args.ready_file, internal_port
    server.run(sockets=[internal_sock, public_sock])


if __name__ == "__main__":
    main()
