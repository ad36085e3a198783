"""End to end on 127.0.0.1: certificates, fl-server start, two fl-client sites, over TLS.

Real Flower SuperLink and SuperNodes in subprocesses; every process is stopped at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from egcmf_model.procs import free_port
from fl_server.certs import make_certificates

BIN = Path(sys.executable).parent
SERVER_ARGS = ["--min-sites", "2", "--set", "model.variant=unet", "--set", "train.epochs=1"]


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "EGCMF_CACHE": str(tmp / "cache")}


def _server(tmp: Path, port: int, rounds: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fl-server"), "start", "--rounds", str(rounds), "--address",
         f"127.0.0.1:{port}", "--certs", str(tmp / "certs"), "--run-dir", str(tmp / "run"),
         *SERVER_ARGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp))


def _client(tmp: Path, port: int, site: str, data: Path, certs: Path | None = None,
            max_wait: int = 60) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "fl-client"), "--site", site, "--server", f"127.0.0.1:{port}", "--data",
         str(data), "--certs", str(certs or tmp / "certs"), "--max-wait", str(max_wait),
         "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(tmp))


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


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"timed out after {timeout}s:\n{out}")
    return proc.returncode, out


def _stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _leftovers(marker: str) -> list[str]:
    result = subprocess.run(["pgrep", "-fa", marker], capture_output=True, text=True,
                            check=False)
    return [line for line in result.stdout.splitlines() if "pgrep" not in line]


@pytest.fixture
def federation(tmp_path: Path, synth_root: Path) -> Path:
    make_certificates(tmp_path / "certs", ["siteA", "siteB"])
    return tmp_path


def test_two_sites_over_tls_then_refusals(federation: Path, synth_root: Path) -> None:
    tmp, port = federation, free_port()
    server = _server(tmp, port, rounds=2)
    clients = _two_sites(tmp, port, synth_root, max_wait=15)
    # A site holding another CA's certificate, and a site whose key was never registered.
    other = tmp / "other"
    make_certificates(other, ["siteC"])
    rogue_ca = _client(tmp, port, "siteA", synth_root / "site_03", certs=_mixed(tmp, other))
    stranger = _client(tmp, port, "siteC", synth_root / "site_03", certs=_stranger(tmp, other))
    try:
        code, out = _finish(rogue_ca, 60)
        assert code == 4
        assert "not trusted" in out
        assert "Traceback" not in out
        code, out = _finish(stranger, 120)
        assert code == 5
        assert "not registered" in out
        assert "Traceback" not in out
        code, out = _finish(server, 600)
        assert code == 0, out
        assert "round 2/2" in out
        for client in clients:  # each site notices the end and stops its node by itself
            code, out = _finish(client, 90)
            assert code == 0, out
            assert "closed the federation" in out
    finally:
        _stop(server, *clients)
    run = tmp / "run"
    lines = _metrics(run)
    assert [x["round"] for x in lines] == [1, 2]
    assert all(set(x["sites"]) == {"siteA", "siteB"} for x in lines)
    for name in ("round_001.pt", "round_002.pt", "best.pt", "summary.json"):
        assert (run / name).exists(), name
    assert _leftovers(f"127.0.0.1:{port}") == []


def test_a_site_that_dies_rejoins_the_running_federation(federation: Path,
                                                        synth_root: Path) -> None:
    """siteB's fl-client is killed (SIGKILL) in round 2 and started again later; the server
    keeps running, leaves siteB out of what it missed, and siteB trains again afterwards."""
    tmp, port = federation, free_port()
    server = _server(tmp, port, 3, "--round-timeout", "300")
    site_a, site_b = _two_sites(tmp, port, synth_root, max_wait=60)
    events = tmp / "run" / "events.jsonl"
    try:
        deadline = time.monotonic() + 400
        _wait_until((tmp / "run" / "round_001.pt").exists, server, deadline)
        site_b.kill()
        site_b.communicate(timeout=30)
        _wait_until(lambda: events.exists() and "round 2 train" in events.read_text(), server,
                    deadline)
        site_b = _client(tmp, port, "siteB", synth_root / "site_02", max_wait=60)
        code, out = _finish(server, 600)
        assert code == 0, out
        code, out = _finish(site_b, 120)
        assert code == 0, out
    finally:
        _stop(server, site_a, site_b)
    lines = _metrics(tmp / "run")
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert "train_loss" not in lines[1]["sites"].get("siteB", {})  # missed round 2's training
    assert "train_loss" in lines[2]["sites"]["siteB"]  # back for round 3
    assert "failed" in events.read_text()
    assert _leftovers(f"127.0.0.1:{port}") == []


def _mixed(tmp: Path, other: Path) -> Path:
    """siteA's own key, but the CA certificate of another federation."""
    certs = tmp / "mixed"
    shutil.copytree(tmp / "certs" / "sites", certs / "sites")
    shutil.copy(other / "ca.crt", certs / "ca.crt")
    return certs


def _stranger(tmp: Path, other: Path) -> Path:
    """The right CA, but a site key the server never registered."""
    certs = tmp / "stranger"
    shutil.copytree(other / "sites", certs / "sites")
    shutil.copy(tmp / "certs" / "ca.crt", certs / "ca.crt")
    return certs


def test_resume_after_the_server_is_killed(federation: Path, synth_root: Path) -> None:
    tmp, port = federation, free_port()
    server = _server(tmp, port, rounds=3)
    clients = _two_sites(tmp, port, synth_root, max_wait=10)
    try:
        _wait_until((tmp / "run" / "round_001.pt").exists, server, time.monotonic() + 400)
        # `kill PID` (SIGTERM) in the middle of round 2. (A SIGKILL would leave Flower's SuperExec
        # waiting on a zombie SuperLink on machines whose PID 1 does not reap orphans.)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        _stop(*clients)
        deadline = time.monotonic() + 60
        while _leftovers(f"127.0.0.1:{port}"):
            assert time.monotonic() < deadline, _leftovers(f"127.0.0.1:{port}")
            time.sleep(0.5)
        done = len((tmp / "run" / "metrics.jsonl").read_text().splitlines())
        server = _server(tmp, port, 3, "--resume")
        clients = _two_sites(tmp, port, synth_root, max_wait=10)
        code, out = _finish(server, 600)
        assert code == 0, out
    finally:
        _stop(server, *clients)
    lines = _metrics(tmp / "run")
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert done >= 1
    events = (tmp / "run" / "events.jsonl").read_text()
    assert "resuming after round" in events

    # The same federation, uninterrupted, with the same seed: the same metrics, round by round.
    reference, port = tmp / "reference", free_port()
    shutil.copytree(tmp / "certs", reference / "certs")
    server = _server(reference, port, 3)
    clients = _two_sites(reference, port, synth_root, max_wait=10)
    try:
        code, out = _finish(server, 600)
        assert code == 0, out
    finally:
        _stop(server, *clients)
    assert (reference / "run" / "metrics.jsonl").read_text() == (
        tmp / "run" / "metrics.jsonl").read_text()
    resumed, whole = (json.loads((d / "run" / "summary.json").read_text())
                      for d in (tmp, reference))
    assert resumed["initial"] == whole["initial"]  # kept in the checkpoints across the crash
