"""One home for the round settings: the CLIs, the app's run config and the ServerApp agree."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path

from fl_server.cli import START_FLAGS
from fl_server.cli import build_parser as server_parser
from fl_server.launcher import app_pyproject
from fl_server.settings import (
    DEFAULTS,
    ROUND_FLAGS,
    FederationSettings,
    run_config_defaults,
)
from fl_server.strategy import StrategyOptions

ROOT = Path(__file__).resolve().parents[1]


def _sim_parser():
    sys.path.insert(0, str(ROOT))
    try:
        from sim.run import build_parser
    finally:
        sys.path.remove(str(ROOT))
    return build_parser()


def test_both_commands_take_their_defaults_from_the_settings() -> None:
    start = server_parser().parse_args(["start"])
    for name in START_FLAGS:
        assert getattr(start, name) == getattr(DEFAULTS, name), name
    sim = _sim_parser().parse_args([])
    for name in ROUND_FLAGS:
        assert getattr(sim, name) == getattr(DEFAULTS, name), name


def test_the_submitted_app_declares_every_setting_with_its_default() -> None:
    table = tomllib.loads(app_pyproject().decode())["tool"]["flwr"]["app"]["config"]
    assert {k: table[k] for k in run_config_defaults()} == run_config_defaults()
    read_back = FederationSettings.from_run_config({**table, "run-dir": "/srv/run"}, {})
    assert dataclasses.replace(read_back, run_dir="") == DEFAULTS
    assert StrategyOptions().krum_f == DEFAULTS.krum_f


def test_no_second_copy_of_the_defaults_in_a_pyproject() -> None:
    assert "[tool.flwr.app" not in (ROOT / "pyproject.toml").read_text()
    template = tomllib.loads((ROOT / "fl_server" / "flwr_app" / "pyproject.toml").read_text())
    assert "config" not in template["tool"]["flwr"]["app"]  # written from the settings


def test_both_commands_refuse_to_keep_no_checkpoint(tmp_path: Path, capsys) -> None:
    from fl_server.cli import main as server_main

    sys.path.insert(0, str(ROOT))
    try:
        from sim.run import main as sim_main
    finally:
        sys.path.remove(str(ROOT))
    assert server_main(["start", "--keep-checkpoints", "0", "--insecure", "--address",
                        "127.0.0.1:1", "--run-dir", str(tmp_path / "a")]) == 2
    assert sim_main(["--keep-checkpoints", "0", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("--keep-checkpoints must be at least 1") == 2
