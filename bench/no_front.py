"""`fl-server start` with Flower's plain SuperLink on the public address: every API exposed.

The design before the Fleet-only filter, kept here only to measure what the filter costs
(`bench/federation_tls.sh` runs both in the same session). Never use it for a federation.

    python bench/no_front.py start --certs certs --address 127.0.0.1:18400 ...   # fl-server's flags
"""

from __future__ import annotations

import sys
import time

from fl_common.procs import Children, flower_env, flower_executable, port_open
from fl_server import launcher
from fl_server.cli import main


def plain_superlink(children: Children, opts: launcher.StartOptions) -> str:
    c, address = opts.certs, opts.address
    args = [flower_executable("flower-superlink"), "--host", address.host, "--port",
            str(address.port), "--disable-runtime-dependency-installation",
            "--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
            "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
    proc = children.start("superlink", args, opts.run_dir / "superlink.log", flower_env())
    while not port_open("127.0.0.1", address.port):
        if proc.poll() is not None:
            raise RuntimeError("the SuperLink exited at start")
        time.sleep(0.2)
    return f"127.0.0.1:{address.port}"


if __name__ == "__main__":
    launcher._start_superlink = plain_superlink
    sys.exit(main(sys.argv[1:]))
