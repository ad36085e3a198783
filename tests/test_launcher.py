"""What `fl-server start` tolerates while it follows a run, and what checkpoints may hold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch

from egcmf_model.checkpoint import read_checkpoint
from fl_server.control import Patient
from fl_server.metrics_tail import MetricsTail


def test_a_half_written_metrics_line_waits_for_its_end(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = MetricsTail(path)
    assert tail.new_lines() == []  # no file yet
    line = json.dumps({"round": 1, "dice": 0.5, "sites": {}})
    path.write_text(line[:10])  # the ServerApp is still writing
    assert tail.new_lines() == []
    path.write_text(line + "\n")
    assert tail.new_lines() == [{"round": 1, "dice": 0.5, "sites": {}}]
    with path.open("a") as fh:
        fh.write("not json\n" + json.dumps({"round": 2}) + "\n")
    assert tail.new_lines() == [{"round": 2}]  # a broken line is skipped, not fatal
    assert tail.new_lines() == []


def test_a_rewritten_metrics_file_shows_the_replaced_round_once(tmp_path: Path) -> None:
    """A resumed run writes a round's line again, in a new file put in place of the old: the
    screen shows that round's new line (longer or shorter), not garbage and not the rest."""
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"round": r, "dice": 0.1 * r}) for r in (1, 2)]
    path.write_text("\n".join(lines) + "\n")
    tail = MetricsTail(path)
    assert [x["round"] for x in tail.new_lines()] == [1, 2]
    for again in ({"round": 2, "dice": 0.123456789, "sites": {"a": {}}}, {"round": 2}):
        (tmp_path / "new").write_text(lines[0] + "\n" + json.dumps(again) + "\n")
        os.replace(tmp_path / "new", path)
        assert tail.new_lines() == [again]
        assert tail.new_lines() == []


def test_failed_status_queries_are_retried_with_backoff_until_patience_runs_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr("fl_server.control.time.monotonic", lambda: clock[0])
    patient = Patient("asking for the run's status", patience=60.0)
    down = httpx.ConnectError("connection refused")

    def fail():
        raise down

    delays = []
    for _ in range(5):
        assert patient.call(fail) is None
        delays.append(patient.delay)
        clock[0] += 10.0
    assert delays == sorted(delays)
    assert delays[0] < delays[-1]
    assert patient.call(lambda: "running") == "running"  # one success resets it
    assert patient.delay == 0.0
    clock[0] += 61.0
    with pytest.raises(RuntimeError, match="failed for 61s"):
        patient.call(fail)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_checkpoint_holding_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    """Checkpoints load with weights_only=True: tensors and plain data only."""
    path = tmp_path / "round_001.pt"
    torch.save({"config": {}, "classes": [], "model": {}, "evil": Payload()}, path)
    with pytest.raises(ValueError, match="objects other than tensors and plain data") as err:
        read_checkpoint(path)
    assert "weights_only" not in str(err.value)  # never the advice to load it unsafely
    path.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not a readable checkpoint, or damaged"):
        read_checkpoint(path)
