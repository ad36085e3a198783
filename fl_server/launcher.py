"""`fl-server start`: the SuperLink behind its Fleet-only public address, one signed run.

Steps: start our SuperLink (:mod:`fl_server.superlink`: Flower's, with only the Fleet API on
``--address``), register the hospitals' public keys through the Control API on loopback (the
SuperLink answers with the node id of each key), submit the app with its run configuration (the
node id -> site map included) signed by the consortium's app-signing key, print one line per
completed round, and stop everything when the run ends. The run's Flower home (``.flwr`` in the
run folder) points the ``flwr`` command at the loopback Control API, for the centre's own use.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from fl_common.address import Address
from fl_common.appsign import SIGNATURE_KEY, SIGNER_KEY, load_signing_key, sign_run
from fl_common.files import atomic_write
from fl_common.procs import Children, flower_env, port_open, supervised
from fl_common.text import printable

from .certs import APP_SIGNING, renew_app_signing, site_caps, site_public_keys
from .control import Control, Patient, build_fab
from .metrics_tail import MetricsTail
from .recorder import sites_of
from .settings import run_config_defaults

log = logging.getLogger("fl-server")
ROUTINE_EVENTS = ("resume", "wire", "rounds")  # events.jsonl kinds shown as information
CONNECTION = "egcmf"
POLL_SECONDS = 1.0
SUPEREXEC_POLL = 0.2  # seconds; Flower's default is 1


@dataclass(frozen=True)
class StartOptions:
    run_dir: Path
    address: Address
    run_config: dict[str, Any]  # settings as run-config entries (kebab-case)
    certs: Path | None  # the folder made by fl-server certs; None: --insecure
    startup_timeout: float = 60.0
    status_patience: float = 60.0  # seconds the run's status may stay unknown

    @property
    def insecure(self) -> bool:
        return self.certs is None


def start_federation(opts: StartOptions) -> dict:
    """Run one federation to its end; returns ``summary.json``. Raises on failure."""
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    with supervised() as children:
        control_address = _start_superlink(children, opts)
        _write_flower_home(opts, control_address)
        control = Control(control_address, None if opts.insecure else opts.certs / "ca.crt")
        try:
            nodes, caps = ({}, {}) if opts.insecure else _register(control, opts)
            run_id = _submit(control, opts, nodes, caps)
            log.info("run %s submitted; waiting for %d site(s)", run_id,
                     opts.run_config["min-sites"])
            return _follow(control, opts, run_id, children)
        finally:
            control.close()


def _start_superlink(children: Children, opts: StartOptions) -> str:
    """Start the SuperLink; returns its loopback (Control API) address once it is up."""
    probe = "127.0.0.1" if opts.address.host in ("0.0.0.0", "::") else opts.address.host
    if port_open(probe, opts.address.port):
        raise RuntimeError(f"port {opts.address.port} on {opts.address.host} is already in use "
                           "(another fl-server, or one still stopping); choose --address")
    ready = opts.run_dir / ".superlink-ready.json"
    ready.unlink(missing_ok=True)
    args = [sys.executable, "-m", "fl_server.superlink", "--public-address", str(opts.address),
            "--ready-file", str(ready), "--disable-runtime-dependency-installation"]
    if opts.insecure:
        args.append("--insecure")
    else:
        c = opts.certs
        args += ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
                 "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
    log_file = opts.run_dir / "superlink.log"
    # Flower's SuperExec starts the ServerApp once it sees the run (it looks every second, unless
    # told otherwise); Flower's files (the app it installs for the ServerApp, an id it keeps even
    # with telemetry off) go to the run folder's .flwr/, never the user's home
    proc = children.start("superlink", args, log_file,
                          flower_env(FLWR_SUPEREXEC_TASK_POLL_INTERVAL=str(SUPEREXEC_POLL),
                                     FLWR_HOME=str((opts.run_dir / ".flwr").resolve())))
    deadline = time.monotonic() + opts.startup_timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited at start (code {proc.returncode}); "
                               f"see {log_file}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SuperLink did not start in {opts.startup_timeout:.0f}s; "
                               f"see {log_file}")
        time.sleep(0.2)
    control = json.loads(ready.read_text())["control"]
    ready.unlink()  # read once: the run folder keeps only what describes the run
    log.info("SuperLink listening on %s: Fleet API only (%s); Control API on %s",
             opts.address, "INSECURE, no TLS" if opts.insecure else
             "TLS, site authentication on", control)
    return control


def _write_flower_home(opts: StartOptions, control: str) -> None:
    """``FLWR_HOME=<run>/.flwr flwr ls`` reaches this run's Control API (loopback only)."""
    home = opts.run_dir / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{control}"']
    if opts.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{(opts.certs / "ca.crt").resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def _register(control: Control, opts: StartOptions) -> tuple[dict[int, str], dict[str, int]]:
    """Register the sites' keys: node id -> site, and site -> its registered example cap."""
    keys = site_public_keys(opts.certs)
    if not keys:
        raise RuntimeError(f"no site public keys in {opts.certs / 'sites'}: each hospital makes "
                           "its key with fl-client keygen and sends NAME.pub; add it with "
                           "fl-server certs --add-site NAME.pub")
    if len(keys) < opts.run_config["min-sites"]:
        raise RuntimeError(f"{len(keys)} site key(s) in {opts.certs / 'sites'} but --min-sites "
                           f"{opts.run_config['min-sites']}: the run could never start; add the "
                           "hospitals' keys (fl-server certs --add-site) or lower --min-sites")
    caps = site_caps(opts.certs)
    nodes = control.register_sites(keys)
    log.info("registered %d site key(s): %s", len(nodes), ", ".join(sorted(nodes.values())))
    return nodes, caps


def app_pyproject() -> bytes:
    """The app definition submitted with the run: components from the template, and a config
    table with every setting's one default (Flower only accepts overrides of declared keys)."""
    template = (resources.files("fl_server.flwr_app") / "pyproject.toml").read_text()
    table = {**run_config_defaults(), SIGNATURE_KEY: "", SIGNER_KEY: ""}
    lines = ["", "[tool.flwr.app.config]", *(f"{k} = {_toml(v)}" for k, v in table.items())]
    return (template.rstrip("\n") + "\n" + "\n".join(lines) + "\n").encode()


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _submit(control: Control, opts: StartOptions, nodes: dict[int, str],
            caps: dict[str, int]) -> int:
    """Submit the signed run; its configuration carries the node id -> site map and each
    site's example cap (for both its training and its validation replies)."""
    run_config = {**opts.run_config, "site-nodes": json.dumps(
        {str(k): v for k, v in sorted(nodes.items())}), "site-caps": json.dumps(
        {site: {"train": cap, "evaluate": cap} for site, cap in sorted(caps.items())})}
    fab, fab_hash = build_fab(app_pyproject())
    if not opts.insecure:
        run_config.update(signature(opts.certs, fab_hash, run_config))
    return control.start_run(fab, fab_hash, run_config)


def signature(certs: Path, fab_hash: str, run_config: dict[str, Any]) -> dict[str, str]:
    """The run's signature entries. A folder made before app signing existed gets its key
    here, certified by its ``ca.key``, so that such a folder still needs nothing new."""
    key, cert = certs / f"{APP_SIGNING}.key", certs / f"{APP_SIGNING}.crt"
    if not key.exists() or not cert.exists():
        if not (certs / "ca.key").exists():
            raise RuntimeError(f"no {key}: the sites run only runs signed by the consortium; "
                               f"make the app-signing key where ca.key is kept with fl-server "
                               f"certs --out DIR --renew-app-signing, and copy it to {certs}")
        renew_app_signing(certs)
        log.info("made the consortium's app-signing key %s, certified by %s", key,
                 certs / "ca.key")
    return sign_run(load_signing_key(key.read_bytes()), cert.read_bytes(), fab_hash, run_config)


def _follow(control: Control, opts: StartOptions, run_id: int, children: Children) -> dict:
    """Print each new round from metrics.jsonl until the run reaches a final status."""
    tail = MetricsTail(opts.run_dir / "metrics.jsonl")
    events = MetricsTail(opts.run_dir / "events.jsonl")
    status = Patient(f"asking the SuperLink for run {run_id}'s status", opts.status_patience)
    rounds = opts.run_config["num-rounds"]
    while True:
        _show_events(events)
        _show(tail, rounds)
        run = status.call(lambda: control.run_info(run_id))
        if run is not None and str(run.get("status", "")).startswith("finished"):
            break
        for name, proc in children.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} stopped unexpectedly (code {proc.returncode}); "
                                   f"see {opts.run_dir / (name + '.log')}")
        time.sleep(max(POLL_SECONDS, status.delay))
    _show_events(events)
    _show(tail, rounds)
    summary_path = opts.run_dir / "summary.json"
    if run["status"] != "finished:completed" or not summary_path.exists():
        raise RuntimeError(f"run {run_id} ended as {run['status']}; see "
                           f"{opts.run_dir / 'superlink.log'}")
    summary = json.loads(summary_path.read_text())
    summary["flower"] = {k: run.get(k) for k in ("run-id", "network-traffic", "compute-time",
                                                 "elapsed")}
    atomic_write(summary_path, json.dumps(summary, indent=2).encode(), private=False)
    return summary


def _show(tail: MetricsTail, rounds: int) -> None:
    for x in tail.new_lines():
        log.info("round %d/%d  dice %s  sites %s", x["round"], rounds,
                 "n/a" if x["dice"] is None else f"{x['dice']:.4f}", sites_of(x))


def _show_events(tail: MetricsTail) -> None:
    """What the run's events.jsonl says, as it happens: a site that failed or was rejected, a
    round that left the model unchanged (warnings), a resume (information)."""
    for event in tail.new_lines():
        level = logging.INFO if event.get("kind") in ROUTINE_EVENTS else logging.WARNING
        log.log(level, "%s", printable(str(event.get("message", event))))
