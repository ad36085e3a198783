"""A run folder holds one run. A new run never writes into a folder that holds files; a resumed
run keeps the configuration and round settings it was started with, read from its newest
checkpoint: a flag given again must say the same, and only ``--rounds`` may grow.

Shared by ``fl-server start`` and ``sim/run.py``, which check before anything starts.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egcmf_model.checkpoint import read_checkpoint
from egcmf_model.config import Config, apply_overrides, from_dict, load_config, to_dict

from .recorder import ROUND_FILE, SUMMARY_FILE
from .settings import RUN_DEFINING, run_config_defaults, run_config_key

SETTINGS_FILE = "settings.json"  # the run-defining settings, written when a run starts
KEPT_IN_PLAN = "dp.planned_rounds"  # the DP plan stays the one the run started with


class RunFolderError(ValueError):
    """A run folder that this command may not use as asked."""


def check_new(run_dir: Path) -> None:
    """A new run needs an empty (or new) folder."""
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise RunFolderError(f"{run_dir} is not empty: it holds another run. Pass --resume to "
                             "continue that run, or choose a new folder")
    if run_dir.exists() and not run_dir.is_dir():
        raise RunFolderError(f"{run_dir} is a file, not a run folder")


def write_settings(run_dir: Path, settings: dict[str, Any], extra: dict[str, Any]) -> None:
    """Record the run-defining settings (kebab-case) and any command-specific ones."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SETTINGS_FILE).write_text(json.dumps({"settings": settings, **extra}, indent=1))


@dataclass(frozen=True)
class Reference:
    """What a resumed run keeps: its configuration, settings and command-specific values."""

    config: Config
    settings: dict[str, Any]
    extra: dict[str, Any]
    done: int  # the last completed round (0: none)


def reference(run_dir: Path) -> Reference:
    """The newest checkpoint's configuration and settings; before any round was completed,
    the ``config.yaml`` and settings the run was started with."""
    saved_path = run_dir / SETTINGS_FILE
    saved = json.loads(saved_path.read_text()) if saved_path.is_file() else {}
    rounds = sorted((int(m.group(1)), p) for p in run_dir.glob("round_*.pt")
                    if (m := ROUND_FILE.search(p.name)))
    if rounds:
        done, path = rounds[-1]
        payload = read_checkpoint(path)
        settings = payload.get("settings") or saved.get("settings", {})
        return Reference(from_dict(payload["config"], str(path)), dict(settings),
                         {k: v for k, v in saved.items() if k != "settings"}, done)
    config = run_dir / "config.yaml"
    if not config.is_file() or "settings" not in saved:
        raise RunFolderError(f"nothing to resume in {run_dir}: no checkpoint and no "
                             f"config.yaml and {SETTINGS_FILE} of a started run; start it "
                             "without --resume")
    return Reference(load_config(path=config), dict(saved["settings"]),
                     {k: v for k, v in saved.items() if k != "settings"}, 0)


def config_changes(old: Config, new: Config) -> list[str]:
    """``section.key: old -> new`` for every field that differs, the DP plan aside."""
    flat_old, flat_new = _flat(to_dict(old)), _flat(to_dict(new))
    return [f"{k}: {flat_old.get(k)!r} -> {flat_new.get(k)!r}"
            for k in sorted(set(flat_old) | set(flat_new))
            if k != KEPT_IN_PLAN and flat_old.get(k) != flat_new.get(k)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def merge_settings(ref: Reference, given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The resumed run's settings: the reference's, with ``given`` (kebab-case, only what the
    command line states) checked against them. Returns the settings and the refused changes."""
    merged = {**run_defining(run_config_defaults()), **ref.settings}
    changes = []
    server_dp = float(ref.settings.get("server-dp-noise", 0.0)) > 0
    for key, value in given.items():
        old = ref.settings.get(key)
        if old is None or value == old:
            merged[key] = value
        elif key == "num-rounds" and value > old:
            merged[key] = value  # more rounds: recorded by the ServerApp as an event
        elif key == "sites" and not server_dp:
            merged[key] = value  # hospitals may join; only server-side DP counts them
        else:
            changes.append(f"{key}: {old!r} -> {value!r}")
    return merged, changes


def refuse(run_dir: Path, changes: list[str], ref: Reference, settings: dict[str, Any]
           ) -> None:
    """Stop a resume that would change the run (every change named), or that has nothing
    left to do."""
    if changes:
        raise RunFolderError(
            f"--resume keeps the configuration of the run in {run_dir} (only --rounds may "
            f"grow); this command changes: {'; '.join(changes)}. Drop those flags to resume "
            "it as it was, or start a new run in another folder")
    summary = ended(run_dir, ref.done)
    if summary is not None and summary.get("stopped"):
        raise RunFolderError(f"nothing to resume: the run ended after round {ref.done}, as "
                             f"{summary['stopped']}; more rounds would need a new budget: "
                             "start a new run in another folder")
    if int(settings["num-rounds"]) <= ref.done and summary is not None:
        raise RunFolderError(f"nothing to resume: the run is complete (round {ref.done} of "
                             f"{settings['num-rounds']}); pass a larger --rounds to continue it")
    # its last round checkpointed, the run stopped before its final evaluation: a resume
    # runs that evaluation alone, and writes the last round's line, final.pt and the summary


def ended(run_dir: Path, done: int) -> dict[str, Any] | None:
    """The run's summary if it ended after round ``done``, its last checkpoint (the summary is
    written after the final evaluation; a round checkpointed later removes it); else None."""
    try:
        summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("rounds") == done else None


def run_defining(values: dict[str, Any]) -> dict[str, Any]:
    """The run-defining entries of a run config (kebab-case)."""
    keys = {run_config_key(name) for name in RUN_DEFINING}
    return {k: v for k, v in values.items() if k in keys}


def resumed(run_dir: Path, given: set[str], fresh: Callable[[], Config], overrides: list[str],
            stated: dict[str, Any]) -> tuple[Reference, dict[str, Any], list[str]]:
    """A resumed run: its newest checkpoint's reference (which holds its configuration), its
    settings, and every change that the command line asks for (which resuming refuses).

    ``given``: the options the command line states; ``fresh()``: the configuration they
    build from scratch, compared instead of ``overrides`` applied to the reference's when
    they name a preset or a config file; ``stated``: the run-defining settings stated."""
    ref = reference(run_dir)
    requested = fresh() if "preset" in given or "config" in given else apply_overrides(
        ref.config, overrides)
    settings, changes = merge_settings(ref, stated)
    return ref, settings, config_changes(ref.config, requested) + changes


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options that ``argv`` states, defaults left out."""
    probe = copy.deepcopy(parser)
    _suppress_defaults(probe)
    return set(vars(probe.parse_args(argv)))


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _suppress_defaults(child)
        elif action.dest != "help":
            action.default = argparse.SUPPRESS
    parser._defaults.clear()
