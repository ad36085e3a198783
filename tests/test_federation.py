"""End to end on this machine: the README's commands, fl-server start and fl-client sites over
TLS, and the trust boundary under attack.

Real Flower SuperLink and SuperNodes in subprocesses; every process is stopped at the end.
Training is skipped (``train.skip``) wherever it is not what a test is about.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fl_common.procs import free_port
from fl_server.certs import make_certificates

BIN = Path(sys.executable).parent
README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN = ["--set", "model.variant=unet", "--set", "train.epochs=1"]
SKIP = ["--set", "model.variant=unet", "--set", "train.skip=true"]


def _env(tmp: Path, state: str = "state") -> dict[str, str]:
    """A hospital's (or the centre's) environment. One CPU thread each: these tests put two
    or three sites, each training with all the machine's cores by default, on one 2-core
    machine, where the oversubscribed thread pools made a round take 20 to 90 s instead of 2."""
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "EGCMF_CACHE": str(tmp / "cache"),
            "EGCMF_STATE_DIR": str(tmp / state), "HOME": str(tmp / "home"),
            "OMP_NUM_THREADS": "1"}


def _server(tmp: Path, port: int, rounds: int, *extra: str, min_sites: int = 2,
            address: str = "127.0.0.1", certs: str = "certs") -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fl-server"), "start", "--rounds", str(rounds), "--min-sites",
         str(min_sites), "--address", f"{address}:{port}", "--certs", str(tmp / certs),
         "--run-dir", str(tmp / "run"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp))


def _client(tmp: Path, port: int, site: str, data: Path, certs: Path | None = None,
            max_wait: int = 60, host: str = "127.0.0.1") -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fl-client"), "--site", site, "--server", f"{host}:{port}", "--data",
         str(data), "--certs", str(certs or tmp / "certs"), "--max-wait", str(max_wait),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=_env(tmp, f"state-{site}-{certs.name if certs else 'certs'}"))


def _two_sites(tmp: Path, port: int, synth_root: Path, max_wait: int) -> list[subprocess.Popen]:
    return [_client(tmp, port, "siteA", synth_root / "site_01", max_wait=max_wait),
            _client(tmp, port, "siteB", synth_root / "site_02", max_wait=max_wait)]


def _wait_until(ready: Callable[[], bool], server: subprocess.Popen, deadline: float) -> None:
    """Poll ``ready`` while the server is still running, until ``deadline`` (monotonic)."""
    while not ready():
        assert time.monotonic() < deadline
        assert server.poll() is None
        time.sleep(0.2)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"timed out after {timeout}s:\n{out}")
    return proc.returncode, out


def _stop(*procs: subprocess.Popen) -> list[str]:
    """Stop ``procs``; what each printed that was not read yet."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    said = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):  # ValueError: its output was read
            proc.kill()
            out = None
        said.append(out or "")
    return said


def _leftovers(*markers: str) -> list[str]:
    found = []
    for marker in markers:
        result = subprocess.run(["pgrep", "-fa", marker], capture_output=True, text=True,
                                check=False)
        found += [line for line in result.stdout.splitlines() if "pgrep" not in line]
    return found


def _no_leftovers(tmp: Path, port: int, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while _leftovers(str(tmp), f":{port} "):
        assert time.monotonic() < deadline, _leftovers(str(tmp), f":{port} ")
        time.sleep(0.5)


@pytest.fixture
def federation(tmp_path: Path) -> Path:
    make_certificates(tmp_path / "certs", ["siteA", "siteB"])
    return tmp_path


# -- the README, as written ----------------------------------------------------------------


def readme_commands() -> list[str]:
    """The commands of README's federation section, in order, continuation lines joined."""
    text = README.read_text()
    section = text.split("## Run a federation across hospitals", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(" ".join(line.split()))
    return commands


def _as_written(command: str, port: int, site: str) -> list[str]:
    """Host names and ports substituted (the certificate's SANs are tested apart), and the
    site's name for the second hospital."""
    command = command.replace("fl.example.org:8000", f"127.0.0.1:{port}")
    command = command.replace("0.0.0.0:8000", f"0.0.0.0:{port}")
    command = command.replace("fl.example.org", "localhost").replace("plagh", site)
    return shlex.split(command)


@pytest.mark.timeout(600)  # room for the server's own limit and the sites' last words
def test_the_readmes_federation_runs_as_written(tmp_path: Path, synth_root: Path) -> None:
    commands = readme_commands()
    kinds = [" ".join(c.split()[:2]) for c in commands]
    assert kinds == ["fl-server certs", "fl-client keygen", "fl-server certs", "fl-server start",
                     "egcmf check-site", "fl-client --site"], commands
    certs, keygen, add_site, start, check, join = commands
    port, centre, sites = free_port(), tmp_path / "centre", ("plagh", "siteB")
    centre.mkdir()

    def run(cmd: str, cwd: Path, site: str = "plagh") -> None:
        done = subprocess.run(_as_written(cmd, port, site), cwd=cwd, env=_env(cwd),
                              capture_output=True, text=True, check=False, timeout=120)
        assert done.returncode == 0, done.stderr

    run(certs, centre)
    for site, data in zip(sites, ("site_01", "site_02"), strict=True):
        hospital = tmp_path / site
        shutil.copytree(synth_root / data, hospital / "data" / site)
        hospital.mkdir(exist_ok=True)
        run(keygen, hospital, site)
        shutil.copy(hospital / "certs" / "sites" / f"{site}.pub", centre / f"{site}.pub")
        shutil.copy(centre / "certs" / "ca.crt", hospital / "certs" / "ca.crt")
        run(add_site, centre, site)
        run(check, hospital, site)
    # the centre holds the hospitals' public keys and their caps, never a private key
    assert not [p for p in (centre / "certs" / "sites").iterdir()
                if p.suffix not in (".pub", ".json")]

    server = subprocess.Popen(_as_written(start, port, "plagh"), cwd=centre, env=_env(centre),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    clients = [subprocess.Popen(_as_written(join, port, site), cwd=tmp_path / site,
                                env=_env(tmp_path / site), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for site in sites]
    try:
        try:  # about 80 s alone on a 2-core machine, over 120 s in the whole suite
            code, out = _finish(server, 240)
        except pytest.fail.Exception as failed:
            pytest.fail(f"{failed}\nthe sites said:\n" + "\n".join(_stop(*clients)))
        assert code == 0, out
        assert re.search(r"run \d+ submitted", out)
        assert "round 2/2" in out
        for client in clients:  # each site learns the end from the run and stops its node
            code, out = _finish(client, 30)
            assert code == 0, out
            assert "closed the federation" in out
            assert "signed by" in out
            # one model message per round (evaluate the model received, then train on it),
            # and one evaluation-only message for the last model
            assert re.findall(r"round (\d+): (.+?) answered", out) == [
                ("1", "evaluate and train"), ("2", "evaluate and train"),
                ("2", "final evaluation (the last round's model)")]
    finally:
        _stop(server, *clients)
    for site in sites:  # the runtime secrets served that start alone; the lock stays, unheld
        runtime = tmp_path / site / "state" / site / "runtime"
        assert sorted(p.name for p in runtime.iterdir()) == [], runtime
        assert not (tmp_path / site / "home" / ".flwr").exists()  # Flower's files: in the state
    assert not (centre / "home" / ".flwr").exists()
    run_dir = centre / "runs" / "check"
    assert [x["round"] for x in _metrics(run_dir)] == [1, 2]
    assert all(set(x["sites"]) == set(sites) for x in _metrics(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flower"]["network-traffic"]["total-bytes"] > 0
    _no_leftovers(tmp_path, port)


# -- the trust boundary under attack ---------------------------------------------------------


def _flwr(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env={**os.environ, "FLWR_HOME": str(home),
                                                           "FLWR_TELEMETRY_ENABLED": "0"},
                          capture_output=True, text=True, check=False, timeout=60)


def _flwr_home(home: Path, address: str, ca: Path) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "c"\n\n[superlink.c]\naddress = "{address}"\n'
        f'root-certificates = "{ca}"\n')
    return home


def _fleet_register(port: int, outsider: Path) -> None:
    """Flower's own Fleet register-node, signed with the outsider's key: refused."""
    import httpx
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.proto.fleet_pb2 import RegisterNodeFleetRequest
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes
    from flwr.supernode.fleet_http_client import FleetHttpClient
    from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

    key = load_ssh_private_key((outsider / "sites" / "siteC").read_bytes(), None)
    ca = (outsider / "ca.crt").read_bytes()
    with FleetHttpClient.from_server_address(
            f"127.0.0.1:{port}", insecure=False, root_certificates=ca,
            interceptors=[NodeAuthHttpInterceptor(key, key.public_key())]) as client, \
            pytest.raises(httpx.HTTPStatusError):
        client.RegisterNode(RegisterNodeFleetRequest(
            public_key=public_key_to_bytes(key.public_key())))


def test_an_outsider_at_the_public_address_can_do_nothing(federation: Path,
                                                           synth_root: Path) -> None:
    """Holding only ca.crt and a key of its own, an outsider cannot register, list, submit or
    stop anything at the public address ([::]: IPv6 and IPv4), and its SuperNode is refused."""
    tmp, port = federation, free_port()
    server = _server(tmp, port, 1, *SKIP, address="[::]")
    outsider = tmp / "outsider"
    make_certificates(tmp / "other", ["siteC"])  # another consortium's CA and a key
    shutil.copytree(tmp / "other" / "sites", outsider / "sites")
    shutil.copy(tmp / "certs" / "ca.crt", outsider / "ca.crt")
    mixed = tmp / "mixed"  # siteA's own key, but another federation's CA certificate
    shutil.copytree(tmp / "certs" / "sites", mixed / "sites")
    shutil.copy(tmp / "other" / "ca.crt", mixed / "ca.crt")
    try:
        _wait_until(lambda: (tmp / "run" / ".flwr" / "config.toml").exists(), server,
                    time.monotonic() + 60)
        stranger = _client(tmp, port, "siteC", synth_root / "site_03", certs=outsider,
                           max_wait=8, host="[::1]")
        rogue_ca = _client(tmp, port, "siteA", synth_root / "site_01", certs=mixed)
        centre = tmp / "run" / ".flwr"  # the centre's own view, on its loopback
        _wait_until(lambda: bool(json.loads(_flwr(centre, "ls", "--format", "json").stdout)
                                 .get("runs")), server, time.monotonic() + 30)
        run_id = json.loads(_flwr(centre, "ls", "--format", "json").stdout)["runs"][0]["run-id"]
        app = tmp / "evil-app"
        app.mkdir()
        (app / "pyproject.toml").write_text(
            (Path(__file__).parents[1] / "fl_server" / "flwr_app" / "pyproject.toml").read_text())
        attempts = {"[::1]": [("supernode", "register", str(outsider / "sites" / "siteC.pub")),
                              ("ls",), ("run", str(app)), ("stop", run_id)],
                    "127.0.0.1": [("supernode", "register",
                                   str(outsider / "sites" / "siteC.pub"))]}
        for host, tries in attempts.items():
            home = _flwr_home(outsider / host.strip("[]"), f"{host}:{port}", outsider / "ca.crt")
            for attempt in tries:
                result = _flwr(home, *attempt)
                assert result.returncode != 0, (attempt, result.stdout)
                assert "Not Found" in result.stdout + result.stderr, (attempt, result.stdout)
        _fleet_register(port, outsider)
        runs = json.loads(_flwr(centre, "ls", "--format", "json").stdout)["runs"]
        assert [r["run-id"] for r in runs] == [run_id]  # nothing submitted, nothing stopped
        assert runs[0]["status"] == "running"
        nodes = json.loads(_flwr(centre, "supernode", "ls", "--format", "json").stdout)
        assert len(nodes["nodes"]) == 2  # the two registered sites; no key added
        code, out = _finish(rogue_ca, 60)
        assert code == 4
        assert "not trusted" in out
        assert "Traceback" not in out
        code, out = _finish(stranger, 60)
        assert code == 5
        assert "not registered" in out
        assert "Traceback" not in out
        assert server.poll() is None
    finally:
        _stop(server)
    log = (tmp / "run" / "superlink.log").read_text()
    assert "public address: refused POST /v1/control/register-node" in log
    _no_leftovers(tmp, port)


def test_a_site_claiming_another_sites_name_is_rejected(federation: Path,
                                                        synth_root: Path) -> None:
    """siteB's key, siteA's name: every reply is rejected and logged with both names, and the
    real siteA's metrics are its own."""
    tmp, port = federation, free_port()
    liar_certs = tmp / "liar"
    (liar_certs / "sites").mkdir(parents=True)
    shutil.copy(tmp / "certs" / "ca.crt", liar_certs / "ca.crt")
    shutil.copy(tmp / "certs" / "sites" / "siteB", liar_certs / "sites" / "siteA")
    liar_data = tmp / "liar-data"  # more validation ROIs than the real siteA has
    shutil.copytree(synth_root / "site_03", liar_data)
    meta = (liar_data / "site.yaml").read_text()
    (liar_data / "site.yaml").write_text(meta.replace("train:", "train_unused:", 1)
                                         .replace("val:", "train:", 1)
                                         .replace("train_unused:", "val:", 1))
    server = _server(tmp, port, 1, *SKIP)
    real = _client(tmp, port, "siteA", synth_root / "site_01")
    liar = _client(tmp, port, "siteA", liar_data, certs=liar_certs)
    try:
        code, out = _finish(server, 120)
        assert code == 0, out
    finally:
        _stop(server, real, liar)
    identity = [e for e in _events(tmp / "run") if e["kind"] == "identity"]
    assert identity, _events(tmp / "run")
    assert all(e["registered"] == "siteB" and e["claimed"] == "siteA" for e in identity)
    assert "registered as site siteB but its reply claims to be site siteA" in \
        identity[0]["message"]
    assert {e["message"].split(":")[0] for e in identity} >= {"round 1 train",
                                                              "round 1 evaluate"}
    line = _metrics(tmp / "run")[0]
    assert set(line["sites"]) == {"siteA"}
    real_val = len(re.findall(r"roi_", (synth_root / "site_01" / "site.yaml").read_text()
                              .split("val:", 1)[1].split("test:", 1)[0]))
    assert line["sites"]["siteA"]["val-examples"] == real_val
    _no_leftovers(tmp, port)


def test_an_app_signed_by_another_key_is_refused_at_the_site(federation: Path,
                                                             synth_root: Path) -> None:
    """The centre signs with a key the consortium CA did not certify: the site runs nothing of
    that run, and its log says why."""
    tmp, port = federation, free_port()
    make_certificates(tmp / "other")
    for name in ("app-signing.crt", "app-signing.key"):
        shutil.copy(tmp / "other" / name, tmp / "certs" / name)
    server = _server(tmp, port, 1, *SKIP, min_sites=1)
    site = _client(tmp, port, "siteA", synth_root / "site_01", max_wait=15)
    try:
        code, out = _finish(server, 120)
        assert code == 0, out  # the centre's run ends; no site answered it
        code, out = _finish(site, 60)
        assert code == 3  # never answered a last round: waits --max-wait for the centre, then 3
        assert "no contact with the centre" in out
        assert re.search(r"site refuses run \d+: the app was signed by a key that the "
                         r"consortium CA did not certify", out), out
        assert "answering its tasks" not in out
    finally:
        _stop(server, site)
    assert not (tmp / "run" / "metrics.jsonl").exists() or all(
        not x["sites"] for x in _metrics(tmp / "run"))
    errors = [e["message"] for e in _events(tmp / "run") if e["kind"] == "error"]
    assert errors
    assert all("site refuses run" in m for m in errors)
    _no_leftovers(tmp, port)


# -- faults ------------------------------------------------------------------------------------


def test_a_site_that_dies_rejoins_the_running_federation(federation: Path,
                                                        synth_root: Path) -> None:
    """siteB's fl-client is killed (SIGKILL) in round 2 and started again later; the server
    keeps running, leaves siteB out of what it missed, and siteB trains again afterwards."""
    tmp, port = federation, free_port()
    server = _server(tmp, port, 3, *SKIP, "--round-timeout", "300")
    site_a, site_b = _two_sites(tmp, port, synth_root, max_wait=60)
    try:
        deadline = time.monotonic() + 130
        _wait_until((tmp / "run" / "round_001.pt").exists, server, deadline)
        site_b.kill()
        site_b.communicate(timeout=30)
        _wait_until(lambda: any("round 2 train" in e["message"] for e in _events(tmp / "run")),
                    server, deadline)
        site_b = _client(tmp, port, "siteB", synth_root / "site_02", max_wait=60)
        code, centre_out = _finish(server, max(10.0, deadline - time.monotonic()))
        assert code == 0, centre_out
        code, out = _finish(site_b, 30)
        assert code == 0, out
    finally:
        _stop(server, site_a, site_b)
    lines = _metrics(tmp / "run")
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert "train_loss" not in lines[1]["sites"].get("siteB", {})  # missed round 2's training
    assert "train_loss" in lines[2]["sites"]["siteB"]  # back for round 3
    # named by its site, in events.jsonl and on the centre's screen
    failed = re.compile(r"round 2 train: site siteB \(node \d+\) failed")
    assert any(failed.match(e["message"]) for e in _events(tmp / "run"))
    assert failed.search(centre_out), centre_out
    _no_leftovers(tmp, port)


def test_sites_wait_through_a_server_restart_and_the_resumed_run_matches(
        federation: Path, synth_root: Path) -> None:
    """The server is stopped (SIGTERM) in round 2 and started again with --resume on the same
    address; the same two fl-client processes reconnect by themselves and finish the run, and
    its metrics equal those of an uninterrupted federation with the same seed (run alongside)."""
    tmp, port = federation, free_port()
    reference, ref_port = tmp / "reference", free_port()
    shutil.copytree(tmp / "certs", reference / "certs")
    uninterrupted = _server(reference, ref_port, 2, *TRAIN)
    server = _server(tmp, port, 2, *TRAIN)
    clients = [*_two_sites(tmp, port, synth_root, max_wait=60),
               *_two_sites(reference, ref_port, synth_root, max_wait=30)]
    try:
        _wait_until((tmp / "run" / "round_001.pt").exists, server, time.monotonic() + 100)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        stopped_after = sorted(p.name for p in (tmp / "run").glob("round_*.pt"))
        server = _server(tmp, port, 2, *TRAIN, "--resume")
        for proc in (server, uninterrupted):
            code, out = _finish(proc, 120)
            assert code == 0, out
        for client in clients[:2]:
            code, out = _finish(client, 30)
            assert code == 0, out
            assert "closed the federation" in out
    finally:
        _stop(server, uninterrupted, *clients)
    assert stopped_after  # round 1's model saved (its metrics line comes with round 2)
    assert [x["round"] for x in _metrics(tmp / "run")] == [1, 2]
    assert any("resuming after round" in e["message"] for e in _events(tmp / "run"))
    assert (reference / "run" / "metrics.jsonl").read_text() == (
        tmp / "run" / "metrics.jsonl").read_text()
    resumed, whole = (json.loads((d / "run" / "summary.json").read_text())
                      for d in (tmp, reference))
    assert resumed["initial"] == whole["initial"]  # kept in the checkpoints across the crash
    _no_leftovers(tmp, port)
