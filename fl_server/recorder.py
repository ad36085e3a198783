"""The run folder: a checkpoint per round, best.pt, metrics.jsonl, events.jsonl, summary.json.

``metrics.jsonl`` holds exactly one line per completed round (rounds from 1), with the
aggregated ``dice``, ``miou``, ``acc``, ``loss`` and ``sites``: per-site flat scalar objects keyed
by site name. A round's checkpoint is written before its metrics line, so a crash between the
two loses nothing: resume drops lines newer than the last checkpoint and redoes that round.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch

from egcmf_model.checkpoint import read_checkpoint, save_checkpoint
from egcmf_model.config import Config
from egcmf_model.metrics import selection_score

ROUND_FILE = re.compile(r"round_(\d{3,})\.pt$")


def clean(value: Any) -> Any:
    """JSON-safe scalars: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


class RunRecorder:
    def __init__(self, run_dir: Path, cfg: Config, classes: tuple[str, ...]) -> None:
        self.dir, self.cfg, self.classes = run_dir, cfg, classes
        self.dir.mkdir(parents=True, exist_ok=True)
        self.best: dict[str, Any] | None = None
        self.initial: dict[str, Any] | None = None  # the initial model's evaluation (round 0)
        self.settings: dict[str, Any] = {}  # the settings a resume must keep (in checkpoints)

    def event(self, kind: str, message: str, **fields: Any) -> None:
        line = {"time": round(time.time(), 3), "kind": kind, "message": message, **fields}
        with (self.dir / "events.jsonl").open("a") as fh:
            fh.write(json.dumps(clean(line)) + "\n")

    def last_round(self) -> tuple[int, dict[str, Any] | None]:
        """The newest completed round on disk and its checkpoint payload (0, None if none)."""
        rounds = sorted((int(m.group(1)), p) for p in self.dir.glob("round_*.pt")
                        if (m := ROUND_FILE.search(p.name)))
        if not rounds:
            return 0, None
        number, path = rounds[-1]
        payload = read_checkpoint(path)
        self.best = payload.get("best")
        self.initial = payload.get("initial")
        self._truncate_metrics(number)
        return number, payload

    def record_round(self, number: int, model: torch.nn.Module, line: dict[str, Any],
                     strategy_state: dict[str, Any] | None = None) -> None:
        """Checkpoint the global model, keep the best by ``dice``, then append the metrics line."""
        score = selection_score(line.get("dice"))
        improved = self.best is None or score > selection_score(self.best["dice"])
        if improved:
            self.best = {"round": number, "dice": clean(line.get("dice"))}
        state = {"round": number, "metrics": clean(line), "best": self.best,
                 "initial": clean(self.initial), "strategy_state": strategy_state or {},
                 "settings": self.settings}
        save_checkpoint(self.dir / f"round_{number:03d}.pt", model, self.cfg, self.classes, **state)
        if improved:
            save_checkpoint(self.dir / "best.pt", model, self.cfg, self.classes, **state)
        with (self.dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(clean({"round": number, **line})) + "\n")

    def metrics(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]

    def write_summary(self, **extra: Any) -> dict[str, Any]:
        lines = self.metrics()
        if self.best is None and lines:  # runs that did not checkpoint every round
            top = max(lines, key=lambda x: selection_score(x["dice"]))
            self.best = {"round": top["round"], "dice": top["dice"]}
        epsilon = {site: v["epsilon"] for line in lines for site, v in line["sites"].items()
                   if "epsilon" in v}  # the latest value of each site wins
        summary = {"rounds": len(lines), "final": lines[-1] if lines else None,
                   "best": self.best, "classes": list(self.classes), **extra}
        if self.initial is not None:
            summary["initial"] = self.initial
        if epsilon:
            summary["epsilon"] = epsilon
        (self.dir / "summary.json").write_text(json.dumps(clean(summary), indent=2))
        return summary

    def _truncate_metrics(self, number: int) -> None:
        kept = [line for line in self.metrics() if line["round"] <= number]
        (self.dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in kept))
