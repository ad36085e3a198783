"""Join a federation: check the site folder and the server, then run the SuperNode and our runner.

Every failure a hospital's IT team meets is one line saying what to do, never a traceback:
an invalid site folder, an unreachable server (retried up to ``max_wait``), a server whose
certificate our CA did not sign (not retried), a site key the server has not registered.

Flower's SuperNode (``--isolation process``) talks to the centre; :mod:`fl_client.runner`
answers its tasks. This module supervises both and decides when the site's work is over, from
the run's state, never from a log line: the federation is over once this site has answered the
last round and the centre's run is finished (Flower's Fleet API says so) or the centre is gone.
Anything else (a centre that restarts, with ``fl-server start --resume``, a new SuperLink and a
new run) is waited for, up to ``max_wait`` seconds after the last contact with the centre.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
from pathlib import Path

from egcmf_model.data.sites import check_site, load_site_meta
from fl_common.address import Address, check_insecure, parse_address
from fl_common.files import atomic_write, private_dir
from fl_common.localtls import LOOPBACK, write_local_identity
from fl_common.procs import Children, flower_env, flower_executable, free_port, supervised

from .centre import Centre, RunState, tls_reachable
from .options import JoinError, JoinOptions
from .runner import NOT_TRUSTED, read_status
from .state import SiteLock, site_state_dir

log = logging.getLogger("fl-client")
PORT_TAKEN = "address already in use"  # the node's local port: another process holds it
CONNECTED = "SuperNode ID"
POLL, PROBE_EVERY, RESTART_DELAY = 0.5, 3.0, 1.0
SAY_AGAIN = 30.0  # seconds between two "not reachable yet" lines


def join(opts: JoinOptions) -> None:
    try:
        server = parse_address(opts.server, "--server")
    except ValueError as exc:
        raise JoinError(str(exc), 2) from exc
    _check_site(opts)
    if opts.insecure:
        try:
            check_insecure(server, "centre")
        except ValueError as exc:
            raise JoinError(str(exc), 2) from exc
    else:
        if not opts.key.exists():
            raise JoinError(f"{opts.key} is missing: make this site's key with fl-client "
                            f"keygen --site {opts.site} --out {opts.certs}, send "
                            f"sites/{opts.site}.pub to the coordinating centre, and put "
                            "the centre's ca.crt beside it", 2)
        if not (opts.certs / "ca.crt").exists():
            raise JoinError(f"{opts.certs / 'ca.crt'} is missing: ask the coordinating centre "
                            f"for its ca.crt (public; fl-server certs made it) and put it in "
                            f"{opts.certs}", 2)
    try:
        state = site_state_dir(opts.state_dir, opts.site)
        lock = SiteLock(state, opts.site)
    except ValueError as exc:
        raise JoinError(str(exc), 2) from exc
    try:
        wait_for_server(server, opts.ca, opts.max_wait)
        with supervised() as children:
            Session(opts, server, state, children).run()
    finally:
        lock.release()


def _check_site(opts: JoinOptions) -> None:
    problems = check_site(opts.data)
    if problems:
        listing = "\n".join(f"  {line}" for line in problems)
        raise JoinError(f"site folder {opts.data} is not valid; not joining. Fix:\n{listing}", 1)
    name = load_site_meta(opts.data).name
    if name != opts.site:
        log.warning("site.yaml names the site %r; joining as %r (--site is the identity)",
                    name, opts.site)


def wait_for_server(server: Address, ca: Path | None, max_wait: float) -> None:
    """Return once a (TLS) connection succeeds; retry while unreachable; fail fast on trust."""
    deadline, delay, said = time.monotonic() + max_wait, 0.5, -SAY_AGAIN
    while True:
        try:
            tls_reachable(server, ca)
            return
        except PermissionError as exc:
            raise JoinError(f"the server {server} is not trusted: {exc}; check --certs", 4) \
                from exc
        except OSError as exc:
            if time.monotonic() + delay > deadline:
                raise JoinError(f"the server {server} is unreachable after {max_wait:.0f}s "
                                f"({exc.strerror or exc}); is fl-server start running?", 3) \
                    from exc
            if time.monotonic() - said >= SAY_AGAIN:  # once, then every SAY_AGAIN seconds
                said = time.monotonic()
                log.info("server %s not reachable yet (%s); retrying for up to %.0fs more",
                         server, exc.strerror or exc, deadline - said)
            time.sleep(delay)
            delay = min(delay * 1.5, 10.0)


class Session:
    """The SuperNode and the runner of one ``fl-client``, until the federation is over."""

    def __init__(self, opts: JoinOptions, server: Address, state: Path,
                 children: Children) -> None:
        self.opts, self.server, self.children = opts, server, children
        self.logs = private_dir(state / "logs", "--state-dir")
        # Flower's own files (it keeps an id there even with telemetry off), never in the home
        self.env = flower_env(FLWR_HOME=str(private_dir(state / "flwr", "--state-dir")))
        runtime = private_dir(state / "runtime", "--state-dir")
        self.secret, self.status_file = runtime / "secret", runtime / "status.json"
        atomic_write(self.secret, secrets.token_bytes(32), private=True)  # new every start
        self.local_cert, self.local_key = write_local_identity(runtime)  # new every start
        self.status_file.unlink(missing_ok=True)
        self.port, self.starts = free_port(), 0
        self.node_config = {"site": opts.site, "data": str(opts.data.resolve()),
                            "device": opts.device, "state-dir": str(opts.state_dir.resolve())}
        if opts.dp:
            self.node_config.update({"dp": True, "dp-epsilon": opts.epsilon,
                                     "dp-delta": opts.delta})
        self.centre = Centre(server, opts.ca, None if opts.insecure else opts.key)

    def run(self) -> None:
        try:
            self.runner, self.supernode = self._start_runner(), self._start_supernode()
            self.last_contact = self.last_probe = self.unaccepted_since = time.monotonic()
            self.connected, self.announced = False, False
            while not self._step():
                time.sleep(POLL)
        finally:  # the runtime secrets serve this start alone (the children hold them now)
            for path in (self.secret, self.local_cert, self.local_key, self.status_file):
                path.unlink(missing_ok=True)

    def _step(self) -> bool:
        """One look at the node, the runner and the centre; True once the federation is over."""
        self._read_node_log()
        if self.runner.poll() is not None:
            raise JoinError(f"the site's runner stopped (code {self.runner.returncode}); see "
                            "the lines above", 6)
        now = time.monotonic()
        if now - self.last_probe >= PROBE_EVERY:
            self.last_probe = now
            if self._federation_over(now):
                return True
        if now - self.last_contact > self.opts.max_wait:
            raise JoinError(f"no contact with the centre {self.server} for "
                            f"{now - self.last_contact:.0f}s (--max-wait "
                            f"{self.opts.max_wait:.0f}); stopping. Start fl-client again when "
                            "the centre is back", 3)
        if self.supernode.poll() is not None:
            self._restart_node(now)
        return False

    def _read_node_log(self) -> None:
        text = self.log_file.read_text(errors="replace")[self.seen:] \
            if self.log_file.exists() else ""
        self.seen += len(text)
        if NOT_TRUSTED in text:
            raise JoinError(f"the server {self.server} is not trusted by {self.opts.ca}", 4)
        if PORT_TAKEN in text:
            raise JoinError(f"{LOOPBACK}:{self.port}, the port between this site's node and its "
                            "runner, is held by another process (another user's, or an "
                            "fl-client still running); this site's node cannot start. Stop "
                            "that process, or start fl-client again (it picks a new port)", 6)
        if CONNECTED in text:
            self.connected, self.announced = True, False
            log.info("connected to %s as site %s; waiting for rounds (log %s)", self.server,
                     self.opts.site, self.log_file)

    def _federation_over(self, now: float) -> bool:
        """Over once this site answered the last round and the run is finished or the centre
        gone; any answer from the centre counts as contact."""
        status = read_status(self.status_file)
        state = self.centre.probe(status)
        if state is not RunState.UNREACHABLE:
            self.last_contact = now
        if status.get("final") and state in (RunState.FINISHED, RunState.UNREACHABLE):
            log.info("the centre has closed the federation (run %s done); stopping this "
                     "site's node", status["run_id"])
            return True
        return False

    def _restart_node(self, now: float) -> None:
        """The SuperNode stopped: the centre restarted (it no longer knows the node), or the key
        is not accepted yet (registration comes just after the centre starts)."""
        if self.connected:
            log.info("the centre no longer knows this node (it restarted?); reconnecting")
            self.unaccepted_since = now
        elif now - self.unaccepted_since > self.opts.max_wait:
            raise JoinError(f"site {self.opts.site} is not registered at the server: the "
                            f"coordinating centre must add sites/{self.opts.site}.pub "
                            "(fl-server certs --add-site) and restart", 5)
        elif not self.announced:
            log.info("the server has not accepted site %s yet (its key is not registered yet, "
                     "or this site's previous connection has not timed out, up to a minute); "
                     "retrying", self.opts.site)
            self.announced = True
        self.connected = False
        time.sleep(RESTART_DELAY)
        self.supernode = self._start_supernode()

    def _start_runner(self):
        args = [sys.executable, "-m", "fl_client.runner", "--runtime", f"{LOOPBACK}:{self.port}",
                "--runtime-cert", str(self.local_cert),
                "--secret-file", str(self.secret), "--status-file", str(self.status_file),
                "--node-config", json.dumps(self.node_config)]
        if self.opts.ca is not None:
            args += ["--ca", str(self.opts.ca)]
        return self.children.start("runner", args, None, self.env)

    def _start_supernode(self):
        args = [flower_executable("flower-supernode"), "--superlink", str(self.server),
                "--isolation", "process", "--superexec-auth-secret-file", str(self.secret),
                "--host", LOOPBACK, "--port", str(self.port),
                "--ssl-certfile", str(self.local_cert), "--ssl-keyfile", str(self.local_key),
                "--ssl-ca-certfile", str(self.local_cert)]
        if self.opts.insecure:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.opts.ca),
                     "--auth-supernode-private-key", str(self.opts.key)]
        self.starts += 1
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_file, self.seen = self.logs / f"supernode-{stamp}-{self.starts}.log", 0
        return self.children.start("supernode", args, self.log_file, self.env)
