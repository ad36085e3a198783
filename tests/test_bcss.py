from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from egcmf_model.cli import main
from egcmf_model.data import bcss
from egcmf_model.data.dataset import RoiDataset
from egcmf_model.data.io import DataError, write_png
from egcmf_model.data.source import open_bcss

# The complete table of SPEC "Data", row by row: code -> our class (None = ignored).
EXPECTED = {
    0: None, 1: "tumor", 2: "stroma", 3: "inflammatory", 4: "necrosis", 5: "other",
    6: "other", 7: None, 8: "other", 9: "other", 10: "inflammatory", 11: "inflammatory",
    12: "other", 13: "other", 14: "other", 15: None, 16: "other", 17: "other", 18: "other",
    19: "tumor", 20: "tumor", 21: "other",
}


def _shared_codes() -> dict[int, str]:
    tsv = Path(__file__).resolve().parents[2] / "shared" / "reference" / "bcss_gtruth_codes.tsv"
    if not tsv.exists():
        return {}
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:] if line.strip()]
    return {int(code): label for label, code in rows}


@pytest.mark.parametrize(("code", "expected"), sorted(EXPECTED.items()))
def test_every_code_maps_to_its_class(code: int, expected: str | None) -> None:
    mapped = int(bcss.map_codes(np.array([[code]], np.uint8))[0, 0])
    if expected is None:
        assert mapped == 255
    else:
        assert bcss.BCSS_CLASSES[mapped] == expected


def test_table_matches_the_published_code_names() -> None:
    published = _shared_codes() or {c: name for c, (name, _) in bcss.CODE_TABLE.items()}
    assert {c: name for c, (name, _) in bcss.CODE_TABLE.items()} == published
    assert bcss.CODE_TABLE[1] == ("tumor", 0)  # the bug other loaders have


def test_unknown_code_is_an_error_naming_the_file() -> None:
    with pytest.raises(DataError, match=r"m\.png.*\[22\]"):
        bcss.map_codes(np.array([[1, 22]], np.uint8), "m.png")


def test_institution_from_file_name() -> None:
    assert bcss.institution("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500") == "A1"
    with pytest.raises(DataError):
        bcss.institution("slide_01")


def _slide(root: Path, name: str, rng: np.random.Generator, side: int = 300,
           image_dir: str = "images") -> None:
    image = rng.integers(0, 256, (side, side, 3))
    codes = rng.integers(0, 22, (side, side))
    write_png(root / image_dir / f"{name}.png", image.clip(0, 255).astype(np.uint8))
    write_png(root / "masks" / f"{name}.png", codes.astype(np.uint8))


SLIDES = ["TCGA-A1-A0SK-DX1_xmin1_ymin2_MPP-0.2500", "TCGA-A2-A0CM-DX1_xmin3_ymin4_MPP-0.2500",
          "TCGA-A2-A0D0-DX1_xmin5_ymin6_MPP-0.2500", "TCGA-BH-A0B3-DX1_xmin7_ymin8_MPP-0.2500",
          "TCGA-OL-A5D6-DX1_xmin9_ymin1_MPP-0.2500", "TCGA-E2-A14N-DX1_xmin2_ymin3_MPP-0.2500"]


@pytest.fixture
def bcss_root(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name in SLIDES:
        _slide(tmp_path, name, rng)
    return tmp_path


def test_loader_pairs_files_and_splits_by_institution(bcss_root: Path) -> None:
    source = open_bcss(bcss_root, val_fraction=0.25, seed=0)
    assert source.classes == bcss.BCSS_CLASSES
    assert not source.has_ck56
    assert {r.site for r in source.split("test")} == {"OL", "E2"}
    assert len(source.split("val")) == 1
    assert len(source.split("train")) == 3
    assert open_bcss(bcss_root, 0.25, 0) == source


def test_colour_normalised_folder_is_accepted(tmp_path: Path) -> None:
    _slide(tmp_path, SLIDES[0], np.random.default_rng(1), image_dir="rgbs_colorNormalized")
    assert len(open_bcss(tmp_path).records) == 1


def test_missing_mask_is_named(bcss_root: Path) -> None:
    (bcss_root / "masks" / f"{SLIDES[2]}.png").unlink()
    with pytest.raises(DataError, match=SLIDES[2]):
        open_bcss(bcss_root)


def test_tiles_cover_the_slide_and_map_codes(bcss_root: Path) -> None:
    source = open_bcss(bcss_root)
    dataset = RoiDataset(source.split("test")[:1], source.classes, in_size=32)  # 128 px tiles
    assert len(dataset) == 9  # 300 px -> tiles at 0, 128, 172 on each axis
    item = dataset[0]
    assert item["he"].shape == (3, 32, 32)
    assert item["he_40x"].shape == (3, 128, 128)
    assert set(item["mask_40x"].unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert float(item["ck56"].abs().sum()) == 0.0  # BCSS has no CK5/6


def test_upsampled_slides_are_recorded_from_the_list(bcss_root: Path) -> None:
    assert all(r.upsampled is None for r in open_bcss(bcss_root).records)
    (bcss_root / bcss.UPSAMPLED_LIST).write_text("# 20x scans\nTCGA-A2-A0CM  # slide id\n")
    flagged = [r.roi_id for r in open_bcss(bcss_root).records if r.upsampled]
    assert flagged == [SLIDES[1]]


def test_data_summary_bcss_contract(bcss_root: Path, capsys) -> None:
    args = ["data-summary", "--dataset", "bcss", "--data", str(bcss_root),
            "--partition", "institution", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["dataset"] == "bcss"
    assert doc["classes"] == list(bcss.BCSS_CLASSES)
    assert [s["name"] for s in doc["sites"]] == ["A1", "A2", "BH"]
    a2 = next(s for s in doc["sites"] if s["name"] == "A2")
    assert sorted(a2["rois"]) == sorted(SLIDES[1:3])
    expected = np.zeros(5, int)
    for name in SLIDES[1:3]:
        raw = np.asarray(__import__("PIL.Image").Image.open(bcss_root / "masks" / f"{name}.png"))
        mapped = bcss.map_codes(raw)
        expected += np.bincount(mapped[mapped != 255], minlength=5)[:5]
    assert a2["pixels"] == dict(zip(bcss.BCSS_CLASSES, expected.tolist(), strict=True))
    assert sorted(doc["test"]["rois"]) == sorted([SLIDES[4], SLIDES[5]])
    assert doc["upsampled"] is None  # no list given: said so, not guessed


def test_a_simulation_on_a_bcss_folder_needs_no_dataset_flag(bcss_root: Path, tmp_path: Path,
                                                            caplog) -> None:
    """``sim/run.py --data BCSS/`` knows the folder by its masks/, as ``egcmf`` does, and says
    once that the list of 20x slides is missing."""
    import logging

    from sim.run import main as sim_main

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert sim_main(["--data", str(bcss_root), "--partition", "iid", "--clients", "2",
                         "--rounds", "1", "--local-epochs", "1", "--variant", "unet",
                         "--out", str(out)]) == 0
    assert "dataset: bcss" in (out / "config.yaml").read_text()
    assert sum(bcss.UPSAMPLED_LIST in r.getMessage() for r in caplog.records) == 1
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert set(line["sites"]) == {"client_00", "client_01"}


def test_the_folders_kind_is_guessed_only_where_nothing_states_it(bcss_root: Path,
                                                                   tmp_path: Path) -> None:
    from sim.driver import configured
    from sim.run import build_parser

    def kind(*argv: str) -> str:
        return configured(build_parser().parse_args(list(argv))).data.dataset

    config, sites = tmp_path / "exp.yaml", tmp_path / "sites"
    config.write_text("data:\n  dataset: sites\n")
    sites.mkdir()
    assert kind("--data", str(bcss_root)) == "bcss"
    assert kind("--data", str(sites)) == "sites"
    assert kind("--data", str(bcss_root), "--set", "data.dataset=sites") == "sites"
    assert kind("--data", str(bcss_root), "--config", str(config)) == "sites"
    assert kind("--data", str(sites), "--dataset", "bcss") == "bcss"
    assert kind() == "synthetic"
