"""Join a federation: check the site folder and the server, then run Flower's SuperNode.

Every failure a hospital's IT team meets is one line saying what to do, never a traceback:
an invalid site folder, an unreachable server (retried up to ``max_wait``), a server whose
certificate our CA did not sign (not retried), a site key the server has not registered.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from egcmf_model.data.sites import check_site, load_site_meta
from egcmf_model.data.source import cache_dir
from egcmf_model.procs import flower_env, flower_executable, free_port, supervised

log = logging.getLogger("fl-client")
NOT_REGISTERED = "Failed to activate SuperNode"
NOT_TRUSTED = "CERTIFICATE_VERIFY_FAILED"
LOST = "Giving up reconnection"  # the SuperNode logs this after --max-wait-time, then hangs


class JoinError(RuntimeError):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class JoinOptions:
    site: str
    server: str = "127.0.0.1:8000"
    data: Path = Path("data")
    certs: Path = Path("certs")
    device: str = "auto"
    max_wait: float = 300.0
    insecure: bool = False
    dp: bool = False  # DP-SGD at this site, with its own budget
    epsilon: float = 8.0
    delta: float = 1e-5


def join(opts: JoinOptions) -> None:
    host, port = _split(opts.server)
    _check_site(opts)
    if opts.insecure:
        log.warning("INSECURE: no TLS; the model's weights cross the network in clear text")
    else:
        for needed in (opts.certs / "ca.crt", opts.certs / "sites" / opts.site):
            if not needed.exists():
                raise JoinError(f"{needed} is missing: ask the coordinating centre for ca.crt "
                                f"and this site's key pair (fl-server certs)", 2)
    wait_for_server(host, port, None if opts.insecure else opts.certs / "ca.crt", opts.max_wait)
    _run_supernode(opts, host, port)


def _split(server: str) -> tuple[str, int]:
    host, _, port = server.rpartition(":")
    if not host or not port.isdigit():
        raise JoinError(f"--server {server!r} must be HOST:PORT", 2)
    return host.strip("[]"), int(port)


def _check_site(opts: JoinOptions) -> None:
    problems = check_site(opts.data)
    if problems:
        listing = "\n".join(f"  {line}" for line in problems)
        raise JoinError(f"site folder {opts.data} is not valid; not joining. Fix:\n{listing}", 1)
    name = load_site_meta(opts.data).name
    if name != opts.site:
        log.warning("site.yaml names the site %r; joining as %r (--site is the identity)",
                    name, opts.site)


def wait_for_server(host: str, port: int, ca: Path | None, max_wait: float) -> None:
    """Return once a (TLS) connection succeeds; retry while unreachable; fail fast on trust."""
    deadline, delay = time.monotonic() + max_wait, 1.0
    context = None
    if ca is not None:
        context = ssl.create_default_context(cafile=str(ca))
    while True:
        try:
            with socket.create_connection((host, port), timeout=10) as sock:
                if context is not None:
                    with context.wrap_socket(sock, server_hostname=host):
                        pass
            return
        except ssl.SSLCertVerificationError as exc:
            raise JoinError(f"the server {host}:{port} is not trusted: its certificate is not "
                            f"signed by {ca} ({exc.verify_message}); check --certs", 4) from exc
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise JoinError(f"the server {host}:{port} is unreachable after {max_wait:.0f}s "
                                f"({exc.strerror or exc}); is fl-server start running?", 3) \
                    from exc
            log.info("server %s:%d not reachable yet (%s); retrying", host, port,
                     exc.strerror or exc)
            time.sleep(delay)
            delay = min(delay * 1.5, 10.0)


def _run_supernode(opts: JoinOptions, host: str, port: int) -> None:
    """Run the SuperNode; while the server has not registered this site's key yet (it does so
    just after it starts), try again until ``max_wait`` has passed."""
    deadline = time.monotonic() + opts.max_wait
    while True:
        with supervised() as children:
            outcome = _watch(children, opts, host, port)
        if outcome != NOT_REGISTERED:
            return
        if time.monotonic() > deadline:
            raise JoinError(f"site {opts.site} is not registered at the server: the "
                            f"coordinating centre must register sites/{opts.site}.pub "
                            "(fl-server start registers the keys in its --certs)", 5)
        log.info("the server has not accepted site %s yet (its key is not registered yet, or "
                 "this site's previous connection has not timed out, up to a minute); retrying",
                 opts.site)
        time.sleep(3.0)


def _supernode_args(opts: JoinOptions, host: str, port: int) -> list[str]:
    state = cache_dir() / "sites"
    node_config = (f"site='{opts.site}' data='{opts.data.resolve()}' device='{opts.device}' "
                   f"state-dir='{state}'")
    if opts.dp:
        node_config += f" dp=true dp-epsilon={opts.epsilon!r} dp-delta={opts.delta!r}"
    args = [flower_executable("flower-supernode"), "--superlink", f"{host}:{port}",
            "--node-config", node_config, "--host", "127.0.0.1", "--port", str(free_port()),
            "--max-wait-time", str(opts.max_wait)]
    if opts.insecure:
        return [*args, "--insecure"]
    return [*args, "--root-certificates", str(opts.certs / "ca.crt"),
            "--auth-supernode-private-key", str(opts.certs / "sites" / opts.site)]


def _watch(children, opts: JoinOptions, host: str, port: int) -> str:
    """Follow one SuperNode's log until it ends; returns NOT_REGISTERED, LOST or "done"."""
    logs = cache_dir() / "logs"
    log_file = logs / f"supernode-{opts.site}-{os.getpid()}.log"
    proc = children.start("supernode", _supernode_args(opts, host, port), log_file,
                          flower_env())
    log.debug("SuperNode for site %s started; log %s", opts.site, log_file)
    seen, announced = log_file.stat().st_size if log_file.exists() else 0, False
    while True:
        text = log_file.read_text(errors="replace")[seen:] if log_file.exists() else ""
        if NOT_REGISTERED in text:
            return NOT_REGISTERED
        if NOT_TRUSTED in text:
            raise JoinError(f"the server {host}:{port} is not trusted by {opts.certs}/ca.crt", 4)
        if not announced and "SuperNode ID" in text:
            log.info("connected to %s:%d as site %s; waiting for rounds (log %s)", host, port,
                     opts.site, log_file)
            announced = True
        if announced and LOST in text:
            log.info("the server has closed the federation; stopping this site's node")
            return LOST
        if proc.poll() is not None:
            if proc.returncode:
                raise JoinError(f"the SuperNode stopped (code {proc.returncode}); see {log_file}",
                                6)
            return "done"
        time.sleep(0.5)
