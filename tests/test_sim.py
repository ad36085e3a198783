"""`sim/run.py` on Flower's simulation engine (Ray), and its baselines, at the tiny preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from egcmf_model.checkpoint import load_model
from sim.run import main

COMMON = ["--clients", "2", "--rounds", "1", "--local-epochs", "1", "--variant", "unet"]


def _run(tmp: Path, synth_root: Path, name: str, *extra: str) -> Path:
    out = tmp / name
    assert main([*COMMON, "--data", str(synth_root), "--dataset", "synthetic",
                 "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, synth_root: Path) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("sim")
    return _run(tmp, synth_root, "a"), _run(tmp, synth_root, "b")


def test_run_folder_follows_the_contract(two_runs: tuple[Path, Path]) -> None:
    out = two_runs[0]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "summary.md", "curves.png",
                 "final.pt", "best.pt", "round_001.pt"):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1]
    assert set(lines[0]) == {"round", "dice", "miou", "acc", "loss", "sites"}
    assert set(lines[0]["sites"]) == {"client_00", "client_01"}  # names, never node ids
    for entry in lines[0]["sites"].values():
        assert {"dice", "miou", "acc", "loss", "num-examples", "train_loss"} <= set(entry)
        assert all(isinstance(v, int | float) for v in entry.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 1
    assert summary["final"]["round"] == 1
    initial = summary["initial"]  # the initial model on every site, before round 1
    assert {"dice", "miou", "acc", "loss"} <= set(initial)
    assert set(initial["sites"]) == {"client_00", "client_01"}
    assert "| initial |" in (out / "summary.md").read_text()
    _model, cfg, classes, _ = load_model(out / "final.pt")
    assert cfg.model.variant == "unet"
    assert classes == ("background", "in_situ", "invasive")


def test_same_seed_gives_identical_metrics(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()


def test_each_client_trains_on_its_own_partition_only(two_runs: tuple[Path, Path]) -> None:
    out = two_runs[0]
    partitions = json.loads((out / "partitions.json").read_text())["partitions"]
    sites = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["sites"]
    seen: set[str] = set()
    for part in partitions:
        ids = {r["roi_id"] for r in part["train"] + part["val"]}
        assert not ids & seen  # disjoint
        seen |= ids
        assert sites[part["site"]]["num-examples"] == len(part["train"])  # one tile per ROI
        assert sites[part["site"]]["val-examples"] == len(part["val"])


@pytest.mark.parametrize("mode", ["centralized", "local"])
def test_baseline_modes(tmp_path: Path, synth_root: Path, mode: str) -> None:
    out = _run(tmp_path, synth_root, mode, "--mode", mode, "--rounds", "2")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    if mode == "local":
        cross = summary["cross_site_dice"]
        assert set(cross) == set(lines[0]["sites"])
        assert all(len(v) == 2 for v in cross.values())
    else:
        assert (out / "final.pt").exists()
        assert set(lines[0]["sites"]) == {"client_00",
                                                                          "client_01"}


@pytest.mark.parametrize("budget", ["epochs", "steps", "examples"])
def test_centralized_budget_states_and_holds_what_it_equals(tmp_path: Path, synth_root: Path,
                                                            budget: str) -> None:
    from sim.report import budget_notes

    out = _run(tmp_path, synth_root, budget, "--mode", "centralized", "--budget", budget,
               "--local-epochs", "2")
    plan = json.loads((out / "summary.json").read_text())["budget"]
    sites = plan["site_steps_per_round"]
    parts = json.loads((out / "partitions.json").read_text())["partitions"]
    assert sites == {p["site"]: 2 * max(1, len(p["train"]) // 2) for p in parts}  # batch 2
    pooled = sum(len(p["train"]) for p in parts)
    assert plan["steps_per_round"] == {"epochs": 2 * (pooled // 2),
                                       "steps": round(sum(sites.values()) / len(sites)),
                                       "examples": sum(sites.values())}[budget]
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert line["train_steps"] == plan["steps_per_round"]  # what was held is what was run
    assert f"--budget {budget}" in budget_notes(plan)[1]


def test_partition_flags_reach_the_clients(tmp_path: Path, synth_root: Path) -> None:
    def institutions(out: Path) -> list[set[str]]:
        parts = json.loads((out / "partitions.json").read_text())["partitions"]
        return [{r["roi_id"].split("/")[0] for r in p["train"] + p["val"]} for p in parts]

    whole = _run(tmp_path, synth_root, "inst", "--mode", "centralized", "--clients", "3")
    mixed = _run(tmp_path, synth_root, "iid", "--mode", "centralized", "--partition", "iid",
                 "--clients", "3", "--seed", "3")
    assert all(len(s) == 1 for s in institutions(whole))  # one hospital per site
    assert any(len(s) > 1 for s in institutions(mixed))  # iid mixes hospitals
    assert "partition: iid" in (mixed / "config.yaml").read_text()


def test_bad_arguments_are_one_line_errors(tmp_path: Path, synth_root: Path, capsys) -> None:
    """Each refused in one line, and a new run refused before its first round leaves its
    folder as it found it, so that the corrected command runs there."""
    data = ["--data", str(synth_root), "--dataset", "synthetic"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, why in [(["--clients", "9", "--partition", "institution"], "institutions"),
                      (["--rounds", "0"], "--rounds must be at least 1, not 0"),
                      (["--clients", "0"], "--clients must be at least 1"),
                      (["--local-epochs", "-1"], "--local-epochs must be at least 1"),
                      (["--partition", "dirichlet", "--alpha", "-1"], "--alpha must be above 0"),
                      (["--fault", "foo:1", "--partition", "iid"], "use KIND:COUNT"),
                      (["--client-gpus", "64"], "GPU(s); this machine has"),  # hung in Flower
                      (["--client-gpus", "-1"], "--client-gpus must be above 0")]:
        for out in (tmp_path / "x", empty):
            assert main([*args, *data, "--out", str(out)]) == 2
            assert why in capsys.readouterr().err
            assert not (tmp_path / "x").exists()
            assert empty.is_dir()
            assert not any(empty.iterdir())


def test_each_site_gets_one_model_message_per_round(tmp_path: Path, synth_root: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Round r's one message to a site brings the global model of round r - 1 to evaluate and
    to train on; the last model gets one evaluation-only message. metrics.jsonl still has one
    line per round from 1, and summary.json the initial model's evaluation."""
    from fl_server import federation

    sent: list[tuple[str, int, bool, int]] = []
    exchange = federation.exchange

    def spy(grid, messages, timeout):
        messages = list(messages)
        for m in messages:
            config = m.content["config"]
            sent.append((m.metadata.message_type, int(config["server-round"]),
                         bool(config.get("evaluate")), m.metadata.dst_node_id))
            assert len(m.content["arrays"]) <= 64
        return exchange(grid, messages, timeout)

    monkeypatch.setattr(federation, "exchange", spy)
    out = _run(tmp_path, synth_root, "once", "--rounds", "3")
    nodes = {node for *_, node in sent}
    assert len(nodes) == 2
    for node in nodes:
        assert [s[:3] for s in sent if s[3] == node] == [
            ("train", 1, True), ("train", 2, True), ("train", 3, True), ("evaluate", 3, False)]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2, 3]
    assert all({"dice", "train_loss"} <= set(v) for x in lines for v in x["sites"].values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["round"] == 3
    assert summary["wire"] == "float16"  # the default
    assert set(summary["initial"]["sites"]) == {"client_00", "client_01"}


def test_simulation_workers_import_the_site_code_as_they_start() -> None:
    """The simulation's Ray workers import the ClientApp's modules when they start (while the
    centre builds its initial model), not when round 1's message arrives; a plain Ray worker
    does not. The simulation's own Ray is stopped afterwards."""
    import ray

    from sim.experiment import _ray_with_warm_workers

    def site_code_loaded() -> bool:  # sent to the worker by value: it imports nothing itself
        import sys
        return "fl_client.client_app" in sys.modules

    args = {"num_cpus": 1, "log_to_driver": False, "logging_level": "ERROR",
            "include_dashboard": False}
    with _ray_with_warm_workers(args):
        assert ray.get(ray.remote(site_code_loaded).remote())
    assert not ray.is_initialized()
    ray.init(**args)
    try:
        assert not ray.get(ray.remote(site_code_loaded).remote())
    finally:
        ray.shutdown()


def _ray_processes() -> set[int]:
    found = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"ray::" in cmd or b"raylet" in cmd or b"gcs_server" in cmd:
            found.add(int(proc.name))
    return found


def _interrupted(cmd: list[str], when: str, sig: int | None = None) -> tuple[int, list[str]]:
    """Run ``sim/run.py`` with ``cmd`` and, once a line of its output starts with ``when``,
    press Ctrl-C (SIGINT to its process group, as a terminal does) or send ``sig`` to the
    process alone (as ``kill PID`` does); its exit status and the lines it printed after."""
    import os
    import signal
    import subprocess
    import sys

    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "sim/run.py", *cmd], cwd=root, env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    for line in proc.stderr:
        if line.startswith(when):
            break
    if sig is None:
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, sig)
    rest = proc.communicate(timeout=60)[1].splitlines()
    return proc.returncode, rest


def test_ctrl_c_stops_a_simulation_in_one_line_and_resume_finishes_it(tmp_path: Path,
                                                                        synth_root: Path) -> None:
    """Ctrl-C used to print Flower's tracebacks and leave the process hanging on its threads.
    It now stops at once with one line saying how to go on, leaves no Ray process behind, and
    --resume finishes the run."""
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    before = _ray_processes()
    data = ["--data", str(synth_root), "--dataset", "synthetic"]
    # the centre is running once it has evaluated the initial model
    code, rest = _interrupted([*COMMON, "--rounds", "6", *data, "--out", str(out)],
                              when="initial model")
    assert code == 130, rest
    assert not any("Traceback" in line for line in rest), rest
    assert rest[-1] == (f"sim/run.py: stopped; the finished rounds stay in {out}: continue with "
                        f"python sim/run.py --resume --out {out}")
    deadline = time.monotonic() + 20
    while _ray_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _ray_processes() - before
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    resumed = subprocess.run([sys.executable, "sim/run.py", "--resume", "--out", str(out)],
                             cwd=Path(__file__).resolve().parents[1], env=env,
                             capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    rounds = [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_before_a_run_or_in_a_baseline_says_what_is_left(
        tmp_path: Path, synth_root: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """Stopped before its simulation began (settings written, Ray not started): nothing is
    left, so the same command runs again in the same folder. SIGTERM stops a simulation as
    Ctrl-C does. In a baseline, which cannot be resumed, the line says so."""
    import signal

    from sim import driver

    def interrupted(*_args: object) -> None:
        raise KeyboardInterrupt

    data = ["--data", str(synth_root), "--dataset", "synthetic"]
    early = tmp_path / "early"
    with monkeypatch.context() as patch:
        patch.setattr(driver, "run_federated", interrupted)
        assert main([*COMMON, *data, "--out", str(early)]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == ("sim/run.py: stopped before the run "
                                                       "began; nothing was written")
    assert not early.exists()
    term = tmp_path / "term"  # kill PID, once Ray has set its own handler for SIGTERM
    code, rest = _interrupted([*COMMON, "--rounds", "6", *data, "--out", str(term)],
                              when="initial model", sig=signal.SIGTERM)
    assert code == 143, rest
    assert rest[-1].startswith(f"sim/run.py: stopped; the finished rounds stay in {term}")
    central = tmp_path / "central"
    code, rest = _interrupted([*COMMON, "--rounds", "40", "--mode", "centralized", *data,
                               "--out", str(central)], when="centralized round 1/")
    assert code == 130, rest
    assert rest[-1] == (f"sim/run.py: stopped; what was written stays in {central}, but only a "
                        "federated run can be resumed: run this one again with another --out")
    assert not any("Traceback" in line for line in rest), rest
