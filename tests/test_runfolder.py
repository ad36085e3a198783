"""Run folders are never silently mixed, and commands refuse settings that cannot protect:
`fl-server start` (its federation replaced by a recorder of what it would submit) and
`sim/run.py`, both stopped before anything starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from egcmf_model.config import load_config
from egcmf_model.engine import build_model
from fl_common.procs import free_port
from fl_server.certs import make_certificates
from fl_server.cli import main as server_main
from fl_server.recorder import RunRecorder
from sim.run import main as sim_main


@pytest.fixture
def started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Certificates for three sites; every fl-server start records its run config instead of
    running a federation."""
    make_certificates(tmp_path / "certs", ["siteA", "siteB", "siteC"])
    runs: list[dict] = []

    def record(opts):
        runs.append(dict(opts.run_config))
        return {"rounds": 0}

    monkeypatch.setattr("fl_server.launcher.start_federation", record)
    return runs


def _start(tmp: Path, *flags: str) -> int:
    return server_main(["start", "--certs", str(tmp / "certs"), "--address",
                        f"127.0.0.1:{free_port()}", "--run-dir", str(tmp / "run"), *flags])


def _checkpoint(run: Path, done: int) -> None:
    """What the ServerApp leaves after round ``done``: the checkpoint with the configuration
    and settings the run was started with."""
    cfg = load_config(path=run / "config.yaml")
    recorder = RunRecorder(run, cfg, tuple(cfg.data.classes))
    recorder.settings = json.loads((run / "settings.json").read_text())["settings"]
    model = build_model(cfg.model, tuple(cfg.data.classes))
    recorder.record_round(done, model.state_dict(), {"dice": 0.1, "sites": {}})
    recorder.flush()


def test_fl_server_start_refuses_a_non_empty_run_folder(tmp_path: Path, started: list,
                                                        capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"round": 1}\n')
    assert _start(tmp_path) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]
    assert started == []


def test_fl_server_start_passes_the_number_of_registered_sites(tmp_path: Path,
                                                               started: list) -> None:
    """Flower's server-side DP accounting needs the number of sites sampled in a round: the
    registered hospitals (3), not --min-sites (2)."""
    assert _start(tmp_path, "--min-sites", "2", "--server-dp-noise", "1.0") == 0
    assert started[0]["sites"] == 3
    assert started[0]["min-sites"] == 2


def test_fl_server_start_passes_the_wire_and_the_checkpoints_kept(tmp_path: Path,
                                                                  started: list) -> None:
    """Neither defines the run (a resume may change them), but both must reach the ServerApp;
    the defaults when not given."""
    assert _start(tmp_path, "--wire", "float32", "--keep-checkpoints", "5") == 0
    assert (started[0]["wire"], started[0]["keep-checkpoints"]) == ("float32", 5)
    (tmp_path / "again").mkdir()
    assert server_main(["start", "--certs", str(tmp_path / "certs"), "--address",
                        f"127.0.0.1:{free_port()}", "--run-dir", str(tmp_path / "again" / "r")
                        ]) == 0
    assert (started[1]["wire"], started[1]["keep-checkpoints"]) == ("float16", 3)


def test_resume_keeps_the_checkpoints_configuration(tmp_path: Path, started: list,
                                                    capsys) -> None:
    """--resume reads the configuration and settings of the newest checkpoint: flags stated
    again must agree, only --rounds may grow; the DP plan stays as planned."""
    assert _start(tmp_path, "--rounds", "4", "--dp", "--set", "model.variant=unet",
                  "--strategy", "fedprox") == 0
    _checkpoint(tmp_path / "run", done=2)
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert _start(tmp_path, "--resume", "--set", "model.variant=full", "--strategy",
                  "fedavg", "--rounds", "3") == 2
    err = capsys.readouterr().err
    for change in ("model.variant: 'unet' -> 'full'", "strategy: 'fedprox' -> 'fedavg'",
                   "num-rounds: 4 -> 3"):
        assert change in err
    assert (tmp_path / "run" / "config.yaml").read_text() == config
    assert len(started) == 1
    assert _start(tmp_path, "--resume") == 0  # nothing stated: the checkpoint's run
    assert (started[-1]["num-rounds"], started[-1]["strategy"]) == (4, "fedprox")
    assert _start(tmp_path, "--resume", "--rounds", "8", "--dp", "--strategy", "fedprox") == 0
    assert started[-1]["num-rounds"] == 8
    resumed = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resumed["dp"]["planned_rounds"] == 4  # the DP plan keeps its rounds
    assert resumed["model"]["variant"] == "unet"
    assert torch.load(tmp_path / "run" / "round_002.pt", weights_only=True)["settings"][
        "strategy"] == "fedprox"


def test_fl_server_start_refuses_a_strategy_too_few_sites_can_serve(
        tmp_path: Path, started: list, capsys) -> None:
    for flags, needs in ((["--strategy", "krum", "--krum-f", "1"], "at least 5 sites"),
                         (["--strategy", "trimmed-mean"], "at least 5 sites"),
                         (["--strategy", "trimmed-mean", "--trim-fraction", "0.5"],
                          "below 0.5")):
        assert _start(tmp_path, *flags) == 2
        assert needs in capsys.readouterr().err
    assert _start(tmp_path, "--strategy", "trimmed-mean", "--trim-fraction", "0.34") == 0
    assert started[0]["trim-fraction"] == 0.34


def _sim(synth_root: Path, out: Path, *flags: str) -> int:
    return sim_main(["--data", str(synth_root), "--dataset", "synthetic", "--out", str(out),
                     *flags])


def test_sim_refuses_a_non_empty_folder_and_changes_on_resume(tmp_path: Path, synth_root: Path,
                                                              capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _sim(synth_root, out, "--clients", "2") == 2
    assert "is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert _sim(synth_root, tmp_path / "none", "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    (out / "notes.txt").unlink()  # a run started, then stopped before its first round
    (out / "config.yaml").write_text(yaml.safe_dump(yaml.safe_load(_config(synth_root))))
    (out / "settings.json").write_text(json.dumps(
        {"settings": {"num-rounds": 2, "strategy": "fedavg"}, "clients": 2, "fault": ""}))
    assert _sim(synth_root, out, "--resume", "--clients", "3", "--seed", "5",
                "--local-epochs", "4") == 2
    err = capsys.readouterr().err
    for change in ("clients: 2 -> 3", "train.seed: 0 -> 5", "train.epochs: 1 -> 4"):
        assert change in err


def _config(synth_root: Path) -> str:
    from egcmf_model.config import to_yaml

    return to_yaml(load_config(overrides=[f"data.root={synth_root}", "train.epochs=1",
                                          "model.variant=unet"]))


@pytest.mark.parametrize(("flags", "needs"), [
    (["--strategy", "krum", "--clients", "4"], "needs at least 5 sites (n >= 2f + 3)"),
    (["--strategy", "trimmed-mean", "--clients", "3"], "it needs at least 5 sites"),
    (["--strategy", "fedmedian", "--clients", "2"], "only from 3 sites")])
def test_sim_refuses_a_strategy_too_few_sites_can_serve(tmp_path: Path, synth_root: Path,
                                                        capsys, flags, needs) -> None:
    assert _sim(synth_root, tmp_path / "run", *flags) == 2
    assert needs in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resuming_a_complete_run_with_another_setting_names_the_change(tmp_path: Path) -> None:
    """A finished run asked to resume with a changed flag is refused for that change, named;
    asked as it was, it is refused as complete, with what to do instead."""
    from fl_server.runfolder import Reference, RunFolderError, refuse

    done = Reference(load_config(), {"num-rounds": 2}, {}, done=2)
    (tmp_path / "summary.json").write_text('{"rounds": 2}')  # written as the run ended
    with pytest.raises(RunFolderError, match=r"this command changes: clients: 2 -> 3"):
        refuse(tmp_path, ["clients: 2 -> 3"], done, {"num-rounds": 2})
    with pytest.raises(RunFolderError, match=r"the run is complete .*larger --rounds"):
        refuse(tmp_path, [], done, {"num-rounds": 2})
    refuse(tmp_path, [], done, {"num-rounds": 3})  # more rounds: resumed
    (tmp_path / "summary.json").write_text(json.dumps(  # it stopped on its DP budget
        {"rounds": 2, "stopped": "the server-side DP budget was spent before round 3"}))
    with pytest.raises(RunFolderError, match=r"ended after round 2, as the server-side DP "
                                             r"budget was spent before round 3"):
        refuse(tmp_path, [], done, {"num-rounds": 5})


def test_a_run_stopped_in_its_final_evaluation_resumes_to_its_end(tmp_path: Path,
                                                                  synth_root: Path) -> None:
    """The last round's line comes with the final evaluation (one round late): a centre that
    stopped during it leaves the last checkpoint and no summary. ``--resume`` then runs that
    evaluation alone and writes the same last line, final.pt and the summary."""
    out = tmp_path / "run"
    flags = ("--clients", "2", "--rounds", "2", "--variant", "unet", "--local-epochs", "1")
    assert _sim(synth_root, out, *flags) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n")  # as the centre left it
    for name in ("summary.json", "final.pt"):
        (out / name).unlink()
    assert _sim(synth_root, out, "--resume") == 0
    again = (out / "metrics.jsonl").read_text().splitlines()
    assert len(again) == 2
    assert again[0] == lines[0]
    assert json.loads(again[1])["dice"] == json.loads(lines[1])["dice"]
    assert json.loads(again[1])["sites"] == json.loads(lines[1])["sites"]
    assert (out / "final.pt").stat().st_ino == (out / "round_002.pt").stat().st_ino
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


def test_a_resume_that_changes_the_wire_says_so(tmp_path: Path, synth_root: Path) -> None:
    """The wire may change at a resume (it does not define the run), but never silently: the
    checkpoint says which wire its rounds ran with, and the change is an event."""
    out = tmp_path / "run"
    assert _sim(synth_root, out, "--clients", "2", "--rounds", "1", "--wire", "float32",
                "--variant", "unet", "--local-epochs", "1") == 0
    assert torch.load(out / "round_001.pt", weights_only=True)["wire"] == "float32"
    assert _sim(synth_root, out, "--resume", "--rounds", "2") == 0  # the default: float16
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    changed = [e for e in events if e["kind"] == "wire"]
    assert [(e["previous"], e["wire"]) for e in changed] == [("float32", "float16")]
    assert "rounds 1-1 ran in float32" in changed[0]["message"]
    assert json.loads((out / "summary.json").read_text())["wire"] == "float16"


def test_fl_server_start_checks_model_weights_before_anything_is_written(
        tmp_path: Path, started: list, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing or unfitting model.weights stops fl-server start with the file named and an
    empty run folder (so the same command, corrected, can run); a good one is kept as an
    absolute path, since the ServerApp runs in another directory."""
    monkeypatch.chdir(tmp_path)
    assert _start(tmp_path, "--set", "model.weights=nope.pt") == 2
    assert "model.weights" in capsys.readouterr().err
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    torch.save({"features.0.weight": torch.zeros(5, 3, 3, 3)}, tmp_path / "vgg.pth")
    assert _start(tmp_path, "--set", "model.weights=vgg.pth") == 2  # width 0.125: 8 filters
    assert "features.0.weight is (5, 3, 3, 3) there" in capsys.readouterr().err
    cfg = load_config(overrides=["model.norm=group"])
    torch.save(build_model(cfg.model, ("background", "tumour")).state_dict(), tmp_path / "w.pt")
    assert _start(tmp_path, "--dp", "--set", "model.weights=w.pt",
                  "--set", "dp.frozen=encoders") == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["weights"] == str(tmp_path / "w.pt")
    assert started[-1]["run-dir"] == str((tmp_path / "run").resolve())
