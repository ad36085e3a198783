"""What a site can learn about the centre: is it there, and is this site's run still running.

Until the site has answered a run's last round, a TLS handshake tells whether the centre is
there. Then the site asks the way its SuperNode does, through the Fleet API at the centre's
public address, with a request signed by the site's key (Flower's node authentication):
``get-run`` for the run and node its runner served. Flower answers the run while it runs,
refuses with error 2007 once it is finished, and does not know the run or node after the centre
restarted.
"""

from __future__ import annotations

import enum
import socket
import ssl
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.proto.node_pb2 import Node
from flwr.proto.run_pb2 import GetRunRequest
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supernode.fleet_http_client import FleetHttpClient
from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

from fl_common.address import Address


class RunState(enum.Enum):
    RUNNING = "running"
    FINISHED = "finished"
    UNKNOWN = "unknown"  # reachable, but the centre does not know this run or node (restarted)
    REACHABLE = "reachable"  # reachable; no run to ask about yet
    UNREACHABLE = "unreachable"


def tls_reachable(server: Address, ca: Path | None, timeout: float = 10.0) -> None:
    """Connect (and complete a TLS handshake when ``ca`` is given). Raises ``OSError`` when
    unreachable, ``PermissionError`` when the server's certificate is not ``ca``'s."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        if ca is None:
            return
        context = ssl.create_default_context(cafile=str(ca))
        try:
            with context.wrap_socket(sock, server_hostname=server.host):
                pass
        except ssl.SSLCertVerificationError as exc:
            raise PermissionError(f"its certificate is not signed by {ca} "
                                  f"({exc.verify_message})") from exc


class Centre:
    def __init__(self, server: Address, ca: Path | None, key: Path | None) -> None:
        self.server, self.ca = server, ca
        self.client = None
        if ca is not None and key is not None:
            private = load_ssh_private_key(key.read_bytes(), None)
            self.client = FleetHttpClient.from_server_address(
                str(server), insecure=False, root_certificates=ca.read_bytes(),
                interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                              NodeAuthHttpInterceptor(private, private.public_key())])

    def probe(self, status: dict[str, Any]) -> RunState:
        """Whether the centre answers; once this site has answered the last round of the run in
        ``status`` (the runner's), whether that run is finished."""
        if self.client is None or not status.get("final"):
            try:
                tls_reachable(self.server, self.ca, timeout=5.0)
            except OSError:
                return RunState.UNREACHABLE
            return RunState.REACHABLE
        request = GetRunRequest(node=Node(node_id=int(status["node_id"])),
                                run_id=int(status["run_id"]))
        try:
            self.client.GetRun(request)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code >= 500:
                return RunState.UNREACHABLE
            error = FlowerError.from_json(exc.response.text)
            if error is not None and error.code == ApiErrorCode.FLEET_RUN_STATUS_NOT_ALLOWED:
                return RunState.FINISHED  # Flower refuses get-run once a run has finished
            return RunState.UNKNOWN
        except httpx.HTTPError:
            return RunState.UNREACHABLE
        return RunState.RUNNING
