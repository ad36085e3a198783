from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from egcmf_model.cli import main


def test_synth_command_writes_sites_and_preview(tmp_path: Path) -> None:
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--sites", "2", "--rois-per-site", "3",
                 "--size", "64", "--seed", "1", "--preview"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["preview.png", "site_01", "site_02"]
    assert len(list((out / "site_02" / "rois").iterdir())) == 3
    before = sorted(str(p) for p in out.rglob("*"))
    assert main(["synth", "--out", str(out), "--sites", "1", "--rois-per-site", "2",
                 "--size", "64"]) == 2  # a second set would have mixed with the first
    assert sorted(str(p) for p in out.rglob("*")) == before


def test_console_script_is_installed(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "egcmf_model.cli", "--help"],
                            capture_output=True, text=True, check=True)
    for command in ("synth", "check-site", "data-summary"):
        assert command in result.stdout


def _summary(capsys, *args: str) -> dict:
    assert main(["data-summary", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_data_summary_synthetic_partitions(synth_root: Path, capsys) -> None:
    doc = _summary(capsys, "--data", str(synth_root), "--partition", "institution")
    assert doc["classes"] == ["background", "in_situ", "invasive"]
    assert [s["name"] for s in doc["sites"]] == ["site_01", "site_02", "site_03"]
    assert len(doc["test"]["rois"]) == 3  # one test ROI per site of five
    pool = sorted(r for s in doc["sites"] for r in s["rois"])
    for scheme in ("iid", "dirichlet"):
        other = _summary(capsys, "--data", str(synth_root), "--partition", scheme,
                         "--clients", "4", "--alpha", "0.3", "--seed", "2")
        assert len(other["sites"]) == 4
        assert sorted(r for s in other["sites"] for r in s["rois"]) == pool
    total = sum(sum(s["pixels"].values()) for s in doc["sites"])
    assert total == len(pool) * 256 * 256  # synthetic masks have no ignored pixel


def test_data_summary_default_is_the_cached_synthetic_set(capsys) -> None:
    doc = _summary(capsys, "--set", "data.synth_sites=2", "--set", "data.synth_rois_per_site=2")
    assert [s["name"] for s in doc["sites"]] == ["site_01", "site_02"]


def test_errors_are_one_line_not_tracebacks(tmp_path: Path, capsys) -> None:
    assert main(["data-summary", "--dataset", "sites", "--data", str(tmp_path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "no site.yaml" in err
    assert "Traceback" not in err
    assert main(["data-summary", "--set", "model.nope=1"]) == 2
    assert "model.nope" in capsys.readouterr().err
