from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from egcmf_model.cli import main
from egcmf_model.data.dataset import RoiDataset
from egcmf_model.data.io import write_png
from egcmf_model.data.sites import check_site, load_site_meta
from egcmf_model.data.source import open_sites
from egcmf_model.data.synthetic import JITTER_UM, UM_PER_PX


@pytest.fixture
def site(synth_root: Path, tmp_path: Path) -> Path:
    """A private, valid copy of one synthetic site to break."""
    return Path(shutil.copytree(synth_root / "site_01", tmp_path / "site_01"))


def _roi(site: Path, i: int = 0) -> Path:
    return site / "rois" / f"roi_{i:04d}"


def _only(problems: list[str], start: str) -> str:
    assert len(problems) == 1, problems
    assert problems[0].startswith(start), problems
    return problems[0]


def test_valid_site_has_no_problem(site: Path) -> None:
    assert check_site(site) == []


def test_truncated_image(site: Path) -> None:
    path = _roi(site) / "he.png"
    path.write_bytes(path.read_bytes()[:400])
    assert "unreadable or truncated" in _only(check_site(site), "rois/roi_0000/he.png:")


def test_not_an_image(site: Path) -> None:
    (_roi(site) / "ck56.png").write_text("hello")
    _only(check_site(site), "rois/roi_0000/ck56.png:")


def test_wrong_channel_count(site: Path) -> None:
    Image.open(_roi(site) / "he.png").convert("L").save(_roi(site) / "he.png")
    assert "RGB" in _only(check_site(site), "rois/roi_0000/he.png:")
    Image.open(_roi(site, 1) / "mask.png").convert("RGB").save(_roi(site, 1) / "mask.png")
    assert any(p.startswith("rois/roi_0001/mask.png:") for p in check_site(site))


def test_sizes_differ_within_roi(site: Path) -> None:
    mask = np.zeros((128, 128), np.uint8)
    write_png(_roi(site) / "mask.png", mask)
    line = _only(check_site(site), "rois/roi_0000/")
    assert "sizes differ" in line
    assert "mask.png 128x128" in line


def test_unknown_labels(site: Path) -> None:
    mask = np.zeros((256, 256), np.uint8)
    mask[:5, :5] = 7
    mask[10:, :2] = 255  # the ignore value is allowed
    write_png(_roi(site) / "mask.png", mask)
    assert "[7]" in _only(check_site(site), "rois/roi_0000/mask.png:")


def test_missing_file(site: Path) -> None:
    (_roi(site, 2) / "ck56.png").unlink()
    assert "missing" in _only(check_site(site), "rois/roi_0002/ck56.png:")


def test_missing_and_malformed_site_yaml(site: Path) -> None:
    (site / "site.yaml").write_text("name: [unclosed")
    assert "malformed" in _only(check_site(site), str(site / "site.yaml"))
    (site / "site.yaml").write_text(yaml.safe_dump({"name": "x", "classes": ["a"]}))
    assert "um_per_px" in _only(check_site(site), str(site / "site.yaml"))
    (site / "site.yaml").unlink()
    assert "missing file" in _only(check_site(site), str(site / "site.yaml"))


def test_split_names_roi_that_does_not_exist(site: Path) -> None:
    meta = yaml.safe_load((site / "site.yaml").read_text())
    meta["splits"]["val"].append("roi_9999")
    (site / "site.yaml").write_text(yaml.safe_dump(meta))
    assert "roi_9999" in _only(check_site(site), "site.yaml:")


def test_unregistered_pair_reports_the_shift(site: Path) -> None:
    ck = np.asarray(Image.open(_roi(site) / "ck56.png"))
    write_png(_roi(site) / "ck56.png", np.roll(ck, (14, -12), axis=(0, 1)))  # ~5 % of 256
    line = _only(check_site(site), "rois/roi_0000/ck56.png:")
    assert "not registered" in line
    dy, dx = (int(v) for v in re.search(r"dy=([-+]\d+) dx=([-+]\d+)", line).groups())
    jitter = JITTER_UM / UM_PER_PX + 1  # the generator's own shift adds to ours
    assert abs(dy + 14) <= jitter
    assert abs(dx - 12) <= jitter


def test_every_problem_is_listed_and_cli_exits_nonzero(site: Path, capsys) -> None:
    (_roi(site, 0) / "he.png").unlink()
    (_roi(site, 1) / "mask.png").write_text("x")
    assert main(["check-site", str(site)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rois/roi_0000/he.png:")
    assert out[1].startswith("rois/roi_0001/mask.png:")


def test_cli_accepts_a_valid_site(site: Path, capsys) -> None:
    assert main(["check-site", str(site)]) == 0
    assert "OK" in capsys.readouterr().out


def test_loader_skips_bad_roi_with_a_warning(site: Path, caplog) -> None:
    meta = load_site_meta(site)
    broken = meta.splits["train"][1]
    path = meta.files(broken)["ck56"]
    path.write_bytes(path.read_bytes()[:300])  # header readable, pixels truncated
    records = open_sites(site).split("train")
    dataset = RoiDataset(records, meta.classes, in_size=64)
    with caplog.at_level(logging.WARNING):
        items = [dataset[i]["roi"] for i in range(len(dataset))]
    assert f"site_01/{broken}" not in items
    assert any(broken in r.message and "ck56.png" in r.message for r in caplog.records)


def test_loader_skips_missing_roi_at_start(site: Path, caplog) -> None:
    meta = load_site_meta(site)
    gone = meta.splits["train"][0]
    shutil.rmtree(meta.roi_dir(gone))
    with caplog.at_level(logging.WARNING):
        dataset = RoiDataset(open_sites(site).split("train"), meta.classes, in_size=64)
    assert len(dataset) == len(meta.splits["train"]) - 1
    assert any(gone in r.message for r in caplog.records)


def test_a_folder_of_sites_is_checked_site_by_site(synth_root: Path, tmp_path: Path,
                                                  capsys) -> None:
    root = Path(shutil.copytree(synth_root, tmp_path / "sites"))
    assert main(["check-site", str(root)]) == 0
    assert f"{root}: all 3 sites OK" in capsys.readouterr().out
    (_roi(root / "site_02", 1) / "mask.png").write_text("x")
    assert main(["check-site", str(root), "--no-registration"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["site_01: OK", "site_02: 1 problem(s)",
                                         captured.out.splitlines()[2], "site_03: OK"]
    assert captured.out.splitlines()[2].startswith("  rois/roi_0001/mask.png:")
    assert "site_02 not ready" in captured.err
    (_roi(root / "site_02", 1) / "mask.png").unlink()
    shutil.copy(_roi(root / "site_01", 1) / "mask.png", _roi(root / "site_02", 1) / "mask.png")
    (root / "site_03" / "site.yaml").unlink()  # a hospital left out without a word, before
    (root / "notes.txt").write_text("x")
    assert main(["check-site", str(root), "--no-registration"]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines() == ["site_01: OK", "site_02: OK",
                                         "site_03: not a site folder (no site.yaml)"]
    assert main(["check-site", str(root / "notes.txt")]) == 1
    assert "notes.txt: not a folder" in capsys.readouterr().err
    (root / "site_03").rename(root / ".site_03")  # hidden, yet a site the loaders read
    (root / ".site_03" / "site.yaml").write_bytes("name: Hôpital\n".encode("cp1252"))
    assert main(["check-site", str(root), "--no-registration"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ".site_03: 1 problem(s)"
    assert out[1].startswith("  ")
    assert "site.yaml: not UTF-8 text" in out[1]
