"""The centre's use of Flower's Control API, from Python, on the loopback address only.

Registering the sites' keys, submitting the signed run and following its status are HTTP calls
to the SuperLink's Control API through Flower's own client (what the ``flwr`` command uses),
instead of one ``flwr`` process per call. Status queries are retried with backoff: a failed
query is logged and tried again; only a Control API that stays unreachable is an error.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from flwr.cli.build import build_fab_from_files
from flwr.cli.run_utils import format_runs
from flwr.common.serde import fab_to_proto, run_from_proto, user_config_to_proto
from flwr.proto.control_pb2 import ListRunsRequest, RegisterNodeRequest, StartRunRequest
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import FlowerError
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fl_common.sitekeys import load_site_public_key

log = logging.getLogger("fl-server")
T = TypeVar("T")


def build_fab(pyproject: bytes) -> tuple[bytes, str]:
    """The Flower app bundle holding only ``pyproject.toml``, and its SHA-256 (hex)."""
    with warnings.catch_warnings():  # Flower's file filter uses a deprecated pathspec API
        warnings.simplefilter("ignore", DeprecationWarning)
        fab, _ = build_fab_from_files({"pyproject.toml": pyproject})
    return fab, hashlib.sha256(fab).hexdigest()


def _reason(exc: Exception) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        error = FlowerError.from_json(exc.response.text)
        return error.message if error else f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__


class Control:
    """A Control API client for the SuperLink at ``address`` (loopback)."""

    def __init__(self, address: str, ca: Path | None) -> None:
        self.client = ControlHttpClient.from_server_address(
            address, insecure=ca is None,
            root_certificates=None if ca is None else ca.read_bytes(),
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def close(self) -> None:
        self.client.close()

    def register_sites(self, keys: dict[str, Path]) -> dict[int, str]:
        """Register each site's public key; returns node id -> site name."""
        loaded = {site: load_site_public_key(path) for site, path in keys.items()}
        names = sorted(loaded)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if loaded[a] == loaded[b]:
                    raise ValueError(f"sites {a} and {b} have the same public key; every "
                                     "hospital needs its own (fl-client keygen)")
        nodes = {}
        for site in names:
            request = RegisterNodeRequest(public_key=public_key_to_bytes(loaded[site]),
                                          name=site)
            try:
                nodes[int(self.client.RegisterNode(request).node_id)] = site
            except httpx.HTTPError as exc:
                raise RuntimeError(f"registering site {site} failed: {_reason(exc)}") from exc
        return nodes

    def start_run(self, fab: bytes, fab_hash: str, run_config: dict[str, Any]) -> int:
        request = StartRunRequest(fab=fab_to_proto(Fab(fab_hash, fab, {})),
                                  override_config=user_config_to_proto(run_config))
        try:
            response = self.client.StartRun(request)
        except httpx.HTTPError as exc:
            raise RuntimeError(f"submitting the run failed: {_reason(exc)}") from exc
        if not response.HasField("run_id"):
            raise RuntimeError("submitting the run failed: the SuperLink returned no run id")
        return int(response.run_id)

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Flower's record of the run, as ``flwr ls --format json`` shows it."""
        response = self.client.ListRuns(ListRunsRequest(run_id=run_id))
        rows = format_runs([run_from_proto(p) for p in response.run_dict.values()],
                           response.now)
        if not rows:
            raise RuntimeError(f"the SuperLink does not know run {run_id}")
        row = rows[0]
        return {"run-id": str(row.run_id), "status": row.status_text, "elapsed": row.elapsed,
                "network-traffic": {
                    "inbound-bytes": row.network_traffic_inbound,
                    "outbound-bytes": row.network_traffic_outbound,
                    "total-bytes": row.network_traffic_inbound + row.network_traffic_outbound},
                "compute-time": {
                    "serverapp-seconds": row.compute_time_serverapp,
                    "clientapp-seconds": row.compute_time_clientapp,
                    "total-seconds": row.compute_time_serverapp + row.compute_time_clientapp}}


class Patient:
    """Calls that may fail for a while: each failure waits longer (up to ``max_delay``), and
    only ``patience`` seconds without a success raise."""

    def __init__(self, what: str, patience: float = 60.0, max_delay: float = 8.0) -> None:
        self.what, self.patience, self.max_delay = what, patience, max_delay
        self.last_success, self.delay = time.monotonic(), 0.0

    def call(self, fn: Callable[[], T]) -> T | None:
        """``fn()``, or None after a failure (retry later: see :attr:`delay`)."""
        try:
            result = fn()
        except (httpx.HTTPError, RuntimeError) as exc:
            waited = time.monotonic() - self.last_success
            if waited > self.patience:
                raise RuntimeError(f"{self.what} failed for {waited:.0f}s: "
                                   f"{_reason(exc)}") from exc
            self.delay = min(max(2 * self.delay, 0.5), self.max_delay)
            log.debug("%s failed (%s); retrying in %.1fs", self.what, _reason(exc), self.delay)
            return None
        self.last_success, self.delay = time.monotonic(), 0.0
        return result
