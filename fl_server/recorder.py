"""The run folder: round checkpoints, best.pt, final.pt, metrics.jsonl, events.jsonl, summary.json.

``metrics.jsonl`` holds exactly one line per completed round (rounds from 1), with the
aggregated ``dice``, ``miou``, ``acc``, ``loss`` and ``sites``: per-site flat scalar objects keyed
by site name. A round's checkpoint is on disk before its metrics line is written, so a crash
between the two loses nothing: resume drops the lines it will write again and redoes them.

Checkpoints are written by one background thread, in the order they are asked for, so that a
round does not wait for 300 MB to reach the disk: the recorder keeps the state dict it is given
until it is written (pass tensors that nobody changes afterwards). Only the newest
``keep`` round checkpoints stay (resume needs the last one alone); ``best.pt`` and ``final.pt``
are hard links to a round's file (a copy where the file system has none), never a second
serialisation. A checkpoint's ``best`` is the best round known when it was written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from egcmf_model.checkpoint import read_checkpoint, write_checkpoint
from egcmf_model.config import Config
from egcmf_model.metrics import selection_score
from fl_common.files import atomic_write
from fl_common.text import printable

from .lines import latest
from .settings import DEFAULTS, check_keep_checkpoints

log = logging.getLogger(__name__)
ROUND_FILE = re.compile(r"round_(\d{3,})\.pt$")
SUMMARY_FILE = "summary.json"  # written when a run is complete
# the temporary names of a checkpoint being written (write_checkpoint) or linked (link), and
# of the metrics or summary being rewritten (atomic_write)
PARTIAL_FILE = re.compile(r"^\.((round_\d{3,}|best|final)\.pt\.([a-z0-9_]{8}|link)"
                          r"|(metrics\.jsonl|summary\.json)\.[a-z0-9_]{8}\.tmp)$")


class RunFolderWriteError(RuntimeError):
    """The run folder could not be written or read back; the message says what to do."""


def clean(value: Any) -> Any:
    """JSON-safe scalars: NaN and infinities become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


def sites_of(line: dict[str, Any]) -> str:
    """The sites of a metrics line, and those among them that did not train that round (they
    evaluated the round's model only: a site that rejoined, or whose update was refused)."""
    untrained = [site for site, values in line["sites"].items() if "steps" not in values]
    note = f" ({', '.join(untrained)} did not train)" if untrained else ""
    return ", ".join(line["sites"]) + note


def round_file(run_dir: Path, number: int) -> Path:
    return run_dir / f"round_{number:03d}.pt"


def link(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (atomically replaced)."""
    tmp = target.with_name(f".{target.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links on this file system: a byte copy, still no re-serialising
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


class RunRecorder:
    def __init__(self, run_dir: Path, cfg: Config, classes: tuple[str, ...],
                 keep: int = DEFAULTS.keep_checkpoints) -> None:
        check_keep_checkpoints(keep)
        self.dir, self.cfg, self.classes, self.keep = run_dir, cfg, classes, keep
        self.dir.mkdir(parents=True, exist_ok=True)
        self.best: dict[str, Any] | None = None
        self.initial: dict[str, Any] | None = None  # the initial model's evaluation (round 0)
        self.settings: dict[str, Any] = {}  # the settings a resume must keep (in checkpoints)
        self.wire = ""  # the wire the checkpoints' rounds ran with (a resume may change it)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
        self._queued: list[Future] = []
        self._failed = False  # a write failed: nothing queued after it is written
        for partial in self.dir.glob(".*"):  # a write cut short by a crash: never read
            if PARTIAL_FILE.match(partial.name):
                partial.unlink(missing_ok=True)

    def event(self, kind: str, message: str, **fields: Any) -> None:
        """One line of events.jsonl; a site's failure and a round's warning also go to the
        screen (the other kinds are logged where they arise, or are routine)."""
        message = printable(message)  # it may quote a site's own words
        if kind in ("error", "warning"):
            log.warning("%s", message)
        line = {"time": round(time.time(), 3), "kind": kind, "message": message, **fields}
        with (self.dir / "events.jsonl").open("a") as fh:
            fh.write(json.dumps(clean(line)) + "\n")

    def last_round(self) -> tuple[int, dict[str, Any] | None]:
        """The newest checkpointed round and its payload (0, None if none)."""
        rounds = self._round_files()
        if not rounds:
            return 0, None
        number, path = rounds[-1]
        payload = read_checkpoint(path)
        self.best = payload.get("best")
        self.initial = payload.get("initial")
        return number, payload

    def save_round(self, number: int, state: Mapping[str, torch.Tensor], **extra: Any) -> None:
        """Queue ``round_NNN.pt``: the global model after round ``number``, with what resume
        needs (``extra``); older round checkpoints beyond ``keep`` go once it is written."""
        payload = {"round": number, "best": self.best, "initial": clean(self.initial),
                   "settings": self.settings, "wire": self.wire, **extra}
        self._queue(self._write_round, number, state, payload)

    def record_line(self, number: int, line: dict[str, Any]) -> None:
        """Queue the metrics line of the global model of round ``number`` (its checkpoint is
        written first); ``best.pt`` follows it when its ``dice`` is the best so far."""
        self._queue(self._append_line, number, line, self._improves(number, line))

    def record_round(self, number: int, state: Mapping[str, torch.Tensor],
                     line: dict[str, Any], **extra: Any) -> None:
        """A round whose model and metrics are known together: checkpoint, then its line."""
        improved = self._improves(number, line)
        self.save_round(number, state, metrics=clean(line), **extra)
        self._queue(self._append_line, number, line, improved)

    def finish(self, number: int) -> None:
        """``final.pt``: the global model of the last round ``number``."""
        if number > 0:
            self._queue(link, round_file(self.dir, number), self.dir / "final.pt")
        self.flush()

    def flush(self) -> None:
        """Wait until every queued write is on disk; raises what a write raised."""
        for future in self._queued:
            future.result()
        self._queued = []

    def reopen(self) -> None:
        """A resume: a last metrics line that a crash cut short goes (the resumed run writes
        that round's line again). Nothing else changes until the resumed run writes a line or a
        checkpoint of its own, so a resume that stops early loses nothing."""
        self.flush()
        lines, cut_short = self._read_metrics(partial_end=True)
        if cut_short:
            self._rewrite_metrics(lines)

    def metrics(self) -> list[dict[str, Any]]:
        """The lines of ``metrics.jsonl``."""
        return self._read_metrics()[0]

    def _read_metrics(self, partial_end: bool = False) -> tuple[list[dict[str, Any]], bool]:
        """The lines, and whether the last was cut short by a crash (dropped when
        ``partial_end``; an error naming the line otherwise, as for any damaged line)."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return [], False
        raw = [x for x in path.read_text().splitlines() if x.strip()]
        lines = []
        for number, text in enumerate(raw, 1):
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as exc:
                if partial_end and number == len(raw):
                    log.warning("%s: dropping its last line, cut short (%s)", path, exc)
                    return lines, True
                raise RunFolderWriteError(f"{path}, line {number}: not JSON ({exc}); mend or "
                                          "remove that line") from exc
        return lines, False

    def _rewrite_metrics(self, lines: list[dict[str, Any]]) -> None:
        atomic_write(self.dir / "metrics.jsonl",
                     "".join(json.dumps(x) + "\n" for x in lines).encode(), private=False)

    def write_summary(self, **extra: Any) -> dict[str, Any]:
        self.flush()
        lines = self.metrics()
        if self.best is None and lines:  # runs that did not checkpoint every round
            top = max(lines, key=lambda x: selection_score(x["dice"]))
            self.best = {"round": top["round"], "dice": top["dice"]}
        epsilon = latest(lines, "epsilon")
        summary = {"rounds": len(lines), "final": lines[-1] if lines else None,
                   "best": self.best, "classes": list(self.classes), **extra}
        if self.initial is not None:
            summary["initial"] = self.initial
        if epsilon:
            summary["epsilon"] = epsilon
        atomic_write(self.dir / SUMMARY_FILE, json.dumps(clean(summary), indent=2).encode(),
                     private=False)
        return summary

    def _improves(self, number: int, line: dict[str, Any]) -> bool:
        """Whether round ``number`` is the best so far (an undefined Dice counts as perfect:
        no tumour in the truth and none predicted)."""
        score = selection_score(line.get("dice"))
        improved = self.best is None or score > selection_score(self.best["dice"])
        if improved:
            self.best = {"round": number, "dice": clean(line.get("dice"))}
        return improved

    def check_writes(self) -> None:
        """Raise what a write that has finished by now raised: called before a round's
        messages go out, so that a failed checkpoint stops the run a round early, not late (a
        write still running is checked at the next call, or at the end)."""
        for future in [f for f in self._queued if f.done()]:
            future.result()
            self._queued.remove(future)

    def _queue(self, work: Callable[..., None], *args: Any) -> None:
        self.check_writes()
        self._queued.append(self._writer.submit(self._in_order, work, *args))

    def _in_order(self, work: Callable[..., None], *args: Any) -> None:
        if self._failed:
            raise RuntimeError("not written: an earlier write of the run folder failed")
        try:
            work(*args)
        except OSError as exc:
            self._failed = True
            raise RunFolderWriteError(
                f"could not write the run folder {self.dir}: {exc}. The run stops here; "
                "what was written before stays. Free the space (or mend the folder) and "
                "continue with --resume") from exc
        except BaseException:
            self._failed = True
            raise

    def _write_round(self, number: int, state: Mapping[str, torch.Tensor],
                     payload: dict[str, Any]) -> None:
        write_checkpoint(round_file(self.dir, number), state, self.cfg, self.classes, **payload)
        (self.dir / SUMMARY_FILE).unlink(missing_ok=True)  # a new round: no longer complete
        for old, path in self._round_files():
            if old <= number - self.keep:
                path.unlink(missing_ok=True)

    def _append_line(self, number: int, line: dict[str, Any], improved: bool) -> None:
        """Round ``number``'s line; one that a resumed run writes again replaces the earlier
        line of that round (and of any later one)."""
        if improved:
            link(round_file(self.dir, number), self.dir / "best.pt")
        new = clean({"round": number, **line})
        earlier = self.metrics()
        if any(x["round"] >= number for x in earlier):  # in one step: no moment without it
            self._rewrite_metrics([*(x for x in earlier if x["round"] < number), new])
            return
        with (self.dir / "metrics.jsonl").open("a") as fh:
            fh.write(json.dumps(new) + "\n")

    def _round_files(self) -> list[tuple[int, Path]]:
        return sorted((int(m.group(1)), p) for p in self.dir.glob("round_*.pt")
                      if (m := ROUND_FILE.search(p.name)))
