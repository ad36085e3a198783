"""The run folder's checkpoints: written in the background, in order, few, not serialised twice."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from egcmf_model.checkpoint import read_checkpoint
from egcmf_model.config import load_config
from fl_server import recorder as recorder_module
from fl_server.recorder import RunFolderWriteError, RunRecorder

CLASSES = ("background", "in_situ", "invasive")


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((4,), value), "n": torch.tensor(3)}


def _recorder(run: Path, keep: int = 3) -> RunRecorder:
    return RunRecorder(run, load_config("tiny"), CLASSES, keep)


def _line(dice: float) -> dict:
    return {"dice": dice, "miou": dice, "acc": dice, "loss": 1.0, "sites": {}}


def test_only_the_newest_round_checkpoints_stay_and_best_is_a_link(tmp_path: Path) -> None:
    rec = _recorder(tmp_path, keep=2)
    for rnd, dice in enumerate((0.1, 0.5, 0.3, 0.2), start=1):
        rec.record_round(rnd, _state(rnd), _line(dice))
    rec.finish(4)
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == [
        "best.pt", "final.pt", "round_003.pt", "round_004.pt"]
    best = read_checkpoint(tmp_path / "best.pt")
    assert best["round"] == 2
    assert torch.equal(best["model"]["w"], _state(2)["w"])
    assert (tmp_path / "final.pt").stat().st_ino == (tmp_path / "round_004.pt").stat().st_ino
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text()
            .splitlines()] == [1, 2, 3, 4]
    resumed = _recorder(tmp_path)
    assert resumed.last_round()[0] == 4
    assert resumed.best == {"round": 2, "dice": 0.5}


def test_checkpoints_are_written_off_the_rounds_path_in_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slow disk holds up no round: the round returns while its checkpoint is still being
    written, and its metrics line follows the checkpoint, never precedes it."""
    release = threading.Event()
    real = recorder_module.write_checkpoint

    def slow(*args, **kwargs) -> None:
        assert release.wait(30)
        real(*args, **kwargs)

    monkeypatch.setattr(recorder_module, "write_checkpoint", slow)
    rec = _recorder(tmp_path)
    rec.record_round(1, _state(1), _line(0.1))  # returns at once
    assert not (tmp_path / "round_001.pt").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    release.set()
    rec.flush()
    assert (tmp_path / "round_001.pt").exists()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_a_failed_checkpoint_write_stops_the_run_before_its_next_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk stops the run as soon as the write fails, at the latest before the next
    round's messages go out (``check_writes``), in words that say what to do."""
    def full_disk(*args, **kwargs) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recorder_module, "write_checkpoint", full_disk)
    rec = _recorder(tmp_path)

    def round_then_next() -> None:
        rec.record_round(1, _state(1), _line(0.1))  # returns unless the write failed at once
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # what the next round does before it sends
            rec.check_writes()
            time.sleep(0.01)

    with pytest.raises(RunFolderWriteError, match=r"could not write the run folder .*No space "
                                                  r"left on device.*continue with --resume"):
        round_then_next()
    assert not (tmp_path / "metrics.jsonl").exists()  # no line without its checkpoint


def test_a_write_cut_short_by_a_crash_leaves_nothing_behind(tmp_path: Path) -> None:
    """A checkpoint's temporary file left by a killed centre (up to 305 MB at the paper
    preset) goes when the run folder is opened again; the user's own files stay."""
    (tmp_path / ".round_003.pt.vdzbplal").write_bytes(b"partial")
    (tmp_path / ".best.pt.link").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / ".final.pt.bak").write_text("mine too")
    _recorder(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final.pt.bak", "notes.txt"]


def test_a_resume_drops_a_metrics_line_cut_short_and_names_a_damaged_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    metrics = tmp_path / "metrics.jsonl"
    good = [json.dumps({"round": r, **_line(0.1 * r)}) for r in (1, 2)]
    metrics.write_text("\n".join(good) + "\n" + good[1][:50])  # a crash while writing line 3
    rec = _recorder(tmp_path)
    with caplog.at_level("WARNING"):
        rec.reopen()
    assert metrics.read_text().splitlines() == good
    assert "dropping its last line, cut short" in caplog.text
    metrics.write_text(good[0][:50] + "\n" + good[1] + "\n")
    with pytest.raises(RunFolderWriteError, match=r"metrics.jsonl, line 1: not JSON"):
        rec.reopen()


def test_a_resume_loses_nothing_until_it_writes_a_round_of_its_own(tmp_path: Path) -> None:
    """A finished run resumed for more rounds keeps its summary and its last line until the
    resumed run checkpoints a round, and a line written again replaces that round's line."""
    rec = _recorder(tmp_path)
    for rnd in (1, 2):
        rec.record_round(rnd, _state(rnd), _line(0.1 * rnd))
    rec.finish(2)
    rec.write_summary()
    before = (tmp_path / "metrics.jsonl").read_text()
    resumed = _recorder(tmp_path)
    assert resumed.last_round()[0] == 2
    resumed.reopen()  # and then the resume stops: nothing was lost
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert json.loads((tmp_path / "summary.json").read_text())["rounds"] == 2
    resumed.record_line(2, _line(0.25))  # round 2's line, again (as round 3 brings it)
    resumed.save_round(3, _state(3))
    resumed.flush()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(x["round"], x["dice"]) for x in lines] == [(1, 0.1), (2, 0.25)]
    assert not (tmp_path / "summary.json").exists()  # round 3 is checkpointed: not complete


def test_keep_checkpoints_must_keep_one(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        _recorder(tmp_path, keep=0)


def test_a_sites_failure_and_a_rounds_warning_reach_the_screen_too(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """events.jsonl keeps every event; a failure or a warning is also logged, so a run whose
    sites all refuse does not look like a normal one on the screen."""
    rec = _recorder(tmp_path)
    with caplog.at_level("INFO"):
        rec.event("error", "round 1 train: site a failed: budget too small", round=1)
        rec.event("warning", "round 1: 0 valid update(s); global model unchanged", round=1)
        rec.event("resume", "resuming after round 3")
    assert [r.getMessage() for r in caplog.records] == [
        "round 1 train: site a failed: budget too small",
        "round 1: 0 valid update(s); global model unchanged"]
    assert all(r.levelname == "WARNING" for r in caplog.records)
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert kinds == ["error", "warning", "resume"]


def test_a_site_that_went_away_is_named_and_its_round_says_it_did_not_train(
        tmp_path: Path) -> None:
    """When a site's node dies mid-round, the SuperLink answers for it from its own node id:
    the event names the site the message went to. A round's line on the screen names the sites
    that only evaluated (a site that rejoined, or whose update was refused)."""
    from types import SimpleNamespace

    from fl_server.federation import _replies
    from fl_server.recorder import sites_of
    from fl_server.settings import FederationSettings

    rec = _recorder(tmp_path)
    gone = SimpleNamespace(has_error=lambda: True,
                           error=SimpleNamespace(reason="Node Unavailable"),
                           metadata=SimpleNamespace(src_node_id=1, reply_to_message_id="m2"))
    settings = FederationSettings(site_nodes=json.dumps({"42": "site_02", "7": "site_01"}))
    assert _replies([gone], {"m1": 7, "m2": 42}, 2, "train", rec, settings) == []
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["message"] == ("round 2 train: site site_02 (node 42) failed: Node "
                                    "Unavailable")
    line = {"sites": {"site_01": {"dice": 0.5, "steps": 14}, "site_02": {"dice": 0.4}}}
    assert sites_of(line) == "site_01, site_02 (site_02 did not train)"
    line["sites"]["site_02"]["steps"] = 14
    assert sites_of(line) == "site_01, site_02"


def test_a_site_cannot_forge_lines_on_the_centres_screen(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A site's own words (its error reason) reach events.jsonl and the screen with newlines
    and terminal escape codes written out, and cut to a bounded length: no forged round line,
    no hidden text."""
    from types import SimpleNamespace

    from fl_server.federation import _replies
    from fl_server.launcher import _show_events
    from fl_server.metrics_tail import MetricsTail
    from fl_server.settings import FederationSettings

    rec = _recorder(tmp_path)
    forged = "x\nfl-server: round 3/3  dice 0.9812  sites A, B\x1b[8m\r" + "y" * 5000
    bad = SimpleNamespace(has_error=lambda: True, error=SimpleNamespace(reason=forged),
                          metadata=SimpleNamespace(src_node_id=7, reply_to_message_id="m"))
    settings = FederationSettings(site_nodes=json.dumps({"7": "siteA"}))
    with caplog.at_level("INFO"):
        _replies([bad], {"m": 7}, 3, "train", rec, settings)
        _show_events(MetricsTail(tmp_path / "events.jsonl"))
    shown = [r.getMessage() for r in caplog.records]
    assert len(shown) == 2  # the recorder's own line, and fl-server start's
    for text in shown:
        assert not {"\n", "\x1b", "\r"} & set(text)
        assert "\\nfl-server: round 3/3" in text
        assert "\\x1b[8m" in text
        assert len(text) <= 400
