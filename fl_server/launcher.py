"""`fl-server start`: Flower's SuperLink with TLS and site authentication, one federated run.

Steps: write the run's Flower home (its own ``config.toml``, never the user's), start
``flower-superlink``, register the sites' public keys, submit the app with ``flwr run``, print
one line per completed round (from ``metrics.jsonl``), and stop everything when the run ends.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from egcmf_model.procs import Children, flower_env, flower_executable, port_open, supervised

from .certs import site_public_keys

log = logging.getLogger("fl-server")
CONNECTION = "egcmf"


@dataclass(frozen=True)
class StartOptions:
    run_dir: Path
    config_file: Path  # resolved EGCMF config, written by the CLI
    host: str = "127.0.0.1"
    port: int = 8000
    certs: Path | None = Path("certs")
    insecure: bool = False
    rounds: int = 3
    min_sites: int = 2
    strategy: str = "fedavg"
    resume: bool = False
    startup_timeout: float = 60.0
    extra_run_config: dict | None = None  # strategy options and update validation


def start_federation(opts: StartOptions) -> dict:
    """Run one federation to its end; returns ``summary.json``. Raises on failure."""
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    home = _flower_home(opts)
    env = flower_env(FLWR_HOME=str(home))
    with supervised() as children:
        _start_superlink(children, opts, env)
        if not opts.insecure:
            _register_sites(opts, env)
        run_id = _submit(opts, env)
        log.info("run %s submitted; waiting for %d site(s)", run_id, opts.min_sites)
        return _follow(opts, env, run_id, children)


def _flower_home(opts: StartOptions) -> Path:
    home = opts.run_dir / ".flwr"
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
             f'address = "{opts.host}:{opts.port}"']
    if opts.insecure:
        lines.append("insecure = true")
    else:
        lines.append(f'root-certificates = "{(opts.certs / "ca.crt").resolve()}"')
    (home / "config.toml").write_text("\n".join(lines) + "\n")
    return home


def _start_superlink(children: Children, opts: StartOptions, env: dict[str, str]) -> None:
    probe = "127.0.0.1" if opts.host == "0.0.0.0" else opts.host  # where we can connect
    if port_open(probe, opts.port):
        raise RuntimeError(f"port {opts.port} on {opts.host} is already in use (another "
                           "fl-server, or one still stopping); choose --address HOST:PORT")
    args = [flower_executable("flower-superlink"), "--host", opts.host, "--port", str(opts.port),
            "--disable-runtime-dependency-installation"]
    if opts.insecure:
        args.append("--insecure")
    else:
        c = opts.certs
        args += ["--ssl-ca-certfile", str(c / "ca.crt"), "--ssl-certfile", str(c / "server.crt"),
                 "--ssl-keyfile", str(c / "server.key"), "--enable-supernode-auth"]
    proc = children.start("superlink", args, opts.run_dir / "superlink.log", env)
    deadline = time.monotonic() + opts.startup_timeout
    while not port_open(probe, opts.port):
        if proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited at start (code {proc.returncode}); "
                               f"see {opts.run_dir / 'superlink.log'}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the SuperLink did not open {opts.host}:{opts.port} in "
                               f"{opts.startup_timeout:.0f}s")
        time.sleep(0.3)
    log.info("SuperLink listening on %s:%d (%s)", opts.host, opts.port,
             "INSECURE, no TLS" if opts.insecure else "TLS, site authentication on")


def _flwr(args: list[str], env: dict[str, str], what: str) -> str:
    result = subprocess.run([flower_executable("flwr"), *args], env=env, capture_output=True,
                            text=True, check=False, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed: {(result.stderr or result.stdout).strip()[-800:]}")
    return result.stdout


def _register_sites(opts: StartOptions, env: dict[str, str]) -> None:
    keys = site_public_keys(opts.certs)
    if not keys:
        raise RuntimeError(f"no site public keys in {opts.certs / 'sites'}; make them with "
                           "fl-server certs --sites a,b")
    for site, pub in keys.items():
        _flwr(["supernode", "register", str(pub), CONNECTION, "--name", site], env,
              f"registering site {site}")
    log.info("registered %d site key(s): %s", len(keys), ", ".join(keys))


def _submit(opts: StartOptions, env: dict[str, str]) -> int:
    app = opts.run_dir / "app"
    app.mkdir(exist_ok=True)
    template = resources.files("fl_server.flwr_app") / "pyproject.toml"
    (app / "pyproject.toml").write_text(template.read_text())
    run_config = {"run-dir": str(opts.run_dir.resolve()), "num-rounds": opts.rounds,
                  "min-sites": opts.min_sites, "strategy": opts.strategy,
                  "resume": opts.resume, "config-file": str(opts.config_file.resolve()),
                  **(opts.extra_run_config or {})}
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in run_config.items())
    out = _flwr(["run", str(app), CONNECTION, "--run-config", overrides, "--format", "json"],
                env, "submitting the run")
    return int(json.loads(out)["run-id"])


def _follow(opts: StartOptions, env: dict[str, str], run_id: int, children: Children) -> dict:
    """Print each new round from metrics.jsonl until the run reaches a final status."""
    shown, metrics = 0, opts.run_dir / "metrics.jsonl"
    while True:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        for line in lines[shown:]:
            x = json.loads(line)
            log.info("round %d/%d  dice %s  sites %s", x["round"], opts.rounds,
                     "n/a" if x["dice"] is None else f"{x['dice']:.4f}", ", ".join(x["sites"]))
        shown = max(shown, len(lines))
        run = _run_info(env, run_id)
        status = str(run.get("status", ""))
        if status.startswith("finished"):
            break
        for name, proc in children.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} stopped unexpectedly (code {proc.returncode}); "
                                   f"see {opts.run_dir / (name + '.log')}")
        time.sleep(2.0)
    summary_path = opts.run_dir / "summary.json"
    if status != "finished:completed" or not summary_path.exists():
        raise RuntimeError(f"run {run_id} ended as {status}; see {opts.run_dir}/superlink.log")
    summary = json.loads(summary_path.read_text())
    summary["flower"] = {k: run.get(k) for k in ("run-id", "network-traffic", "compute-time",
                                                 "elapsed")}
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary


def _run_info(env: dict[str, str], run_id: int) -> dict:
    """Flower's record of the run: status, elapsed time, network traffic, compute time."""
    out = _flwr(["ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env,
                "asking the run's status")
    runs = json.loads(out).get("runs", [])
    return runs[0] if runs else {}

