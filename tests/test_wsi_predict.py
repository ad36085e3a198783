"""`egcmf predict-wsi`, `extract-rois` and `predict`'s GeoJSON, and the README's slide commands."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import openslide
import pytest
import shapely
import tifffile
import yaml
from PIL import Image
from shapely import affinity
from shapely.geometry import shape

from egcmf_model.cli import main
from egcmf_model.data.io import read_mask, read_rgb
from egcmf_model.data.preview import PALETTE
from egcmf_model.data.sites import estimate_shift
from egcmf_model.wsi.polygons import rasterise
from egcmf_model.wsi.synthetic import BLOCK, SyntheticTissue
from egcmf_model.wsi.tiling import NOT_ANALYSED, RasterStore, StripBlender, gaussian_weight

CLASSES = ["background", "in_situ", "invasive"]
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory, svs_pair, varied_checkpoint) -> Path:
    out = tmp_path_factory.mktemp("wsi") / "pred"
    assert main(["predict-wsi", "--checkpoint", str(varied_checkpoint), "--he",
                 str(svs_pair["he"]), "--ck56", str(svs_pair["ck56"]), "--out", str(out)]) == 0
    return out


def test_prediction_geojson_is_what_qupath_imports(predicted: Path) -> None:
    doc = json.loads((predicted / "prediction.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    names = {f["properties"]["classification"]["name"] for f in doc["features"]}
    assert names == {"in_situ", "invasive"}  # the checkpoint's classes; background not traced
    for feature in doc["features"]:
        props, geometry = feature["properties"], feature["geometry"]
        assert props["objectType"] == "annotation"
        assert props["classification"]["color"] == PALETTE[CLASSES.index(props["name"])].tolist()
        assert geometry["type"] == "Polygon"
        for ring in geometry["coordinates"]:
            assert ring[0] == ring[-1]
            assert len(ring) >= 4
        polygon = shape(geometry)
        assert polygon.is_valid
        assert min(polygon.bounds) >= 0
        assert max(polygon.bounds) <= 2048  # level-0 pixels
        assert props["measurements"]["Area µm^2"] == pytest.approx(polygon.area * 0.25**2,
                                                                   abs=1e-3)


def test_label_tiff_opens_at_the_slides_mpp_and_matches_the_geojson(predicted: Path) -> None:
    slide = openslide.OpenSlide(predicted / "labels.tif")
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    assert slide.level_dimensions == ((2048, 2048), (512, 512), (128, 128))
    with tifffile.TiffFile(predicted / "labels.tif") as tif:
        level1 = tif.pages[1].asarray()  # 1 µm/px: the network's 10x grid
    assert set(np.unique(level1)) <= {0, 1, 2, NOT_ANALYSED}
    assert level1[0, 0] == NOT_ANALYSED  # glass in the corner: no tile ran there
    y, x = np.argwhere(level1 == 2)[0]
    colour = np.asarray(slide.read_region((int(x) * 4, int(y) * 4), 0, (1, 1)).convert("RGB"))
    assert colour[0, 0].tolist() == PALETTE[2].tolist()  # indexed colours, values stay ids
    doc = json.loads((predicted / "prediction.geojson").read_text())
    shapes = [(CLASSES.index(f["properties"]["name"]),
               affinity.scale(shape(f["geometry"]), 0.25, 0.25, origin=(0, 0)))
              for f in doc["features"]]
    drawn = rasterise(shapes, level1.shape, fill=0)
    analysed = level1 != NOT_ANALYSED
    assert (drawn[analysed] == level1[analysed]).mean() > 0.995
    probability = openslide.OpenSlide(predicted / "tumour_probability.tif")
    assert float(probability.properties["openslide.mpp-x"]) == pytest.approx(0.25)
    with tifffile.TiffFile(predicted / "tumour_probability.tif") as tif:
        tumour = tif.pages[1].asarray()
    assert tumour[np.isin(level1, [1, 2])].min() >= 127  # argmax is a tumour class: p >= 0.5
    assert tumour[level1 == 0].max() <= 171  # background is the largest: p0 >= 1/3


def test_report_records_slides_registration_tiles_and_areas(predicted: Path, svs_pair) -> None:
    report = json.loads((predicted / "report.json").read_text())
    assert report["slides"]["he"]["mpp"] == 0.25
    assert report["slides"]["he"]["vendor"] == "aperio"
    assert [lv["mpp"] for lv in report["slides"]["ck56"]["levels"]] == [0.25, 1.0, 4.0]
    reg = report["registration"]
    dy, dx = svs_pair["spec"].shift
    assert reg["flagged"] is False
    assert reg["translation_um"]["x"] == pytest.approx(dx * 0.25, abs=0.5)
    assert reg["translation_um"]["y"] == pytest.approx(dy * 0.25, abs=0.5)
    tiles = report["tiles"]
    assert 0 < tiles["run"] == tiles["with_tissue"] < tiles["grid"]
    assert 0.09 < report["tissue"]["area_mm2"] < 0.15  # the ellipse: about 0.118 mm²
    assert sum(report["class_areas_mm2"].values()) >= report["tissue"]["area_mm2"]
    assert set(report["time_s"]) >= {"tissue_s", "registration_s", "inference_s", "total_s"}
    assert report["tiles_per_s"] > 0
    with Image.open(predicted / "thumbnail.png") as image:
        assert image.size == (2048, 2048)  # 512 µm at 0.25 µm/px: level 0 itself


def test_strip_blender_equals_blending_the_whole_map(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tile, stride, height, width, k = 16, 12, 70, 53, 3
    tops, lefts = range(0, height - tile + stride, stride), range(0, width - tile + stride, stride)
    tiles = {(t, x): rng.dirichlet(np.ones(k), size=(tile, tile)).transpose(2, 0, 1)
             for t in tops for x in lefts if rng.random() < 0.7 and t != 24}  # a row skipped
    store = RasterStore(tmp_path / "map.raw", height, width, 2)
    blender = StripBlender(store, k, [1, 2], tile)
    acc = np.zeros((k, height + tile, width + tile))
    weight = np.zeros((height + tile, width + tile))
    for (t, x), p in sorted(tiles.items()):
        if t != blender.top:
            blender.advance(t)
        blender.add(x, p.astype(np.float32))
        acc[:, t:t + tile, x:x + tile] += p * gaussian_weight(tile)
        weight[t:t + tile, x:x + tile] += gaussian_weight(tile)
    blender.finish()
    acc, weight = acc[:, :height, :width], weight[:height, :width]
    labels = np.where(weight > 0, (acc / np.maximum(weight, 1e-12)).argmax(0), NOT_ANALYSED)
    stored = store.read_rows(range(height))
    assert (stored[..., 0] == labels).mean() > 0.999  # float32 vs float64 ties only
    tumour = (acc[1] + acc[2]) / np.maximum(weight, 1e-12)
    assert np.abs(stored[..., 1] - np.round(tumour * 255)).max() <= 1


def test_he_only_checkpoint_on_a_generic_tiff(tmp_path: Path, tiff_pair, capsys) -> None:
    import torch

    from egcmf_model.checkpoint import save_checkpoint
    from egcmf_model.config import load_config
    from egcmf_model.engine import build_model

    torch.manual_seed(0)
    cfg = load_config("tiny", None, ["model.variant=unet"])
    save_checkpoint(tmp_path / "unet.pt", build_model(cfg.model, tuple(CLASSES)), cfg,
                    tuple(CLASSES))
    out = tmp_path / "pred"
    assert main(["predict-wsi", "--checkpoint", str(tmp_path / "unet.pt"), "--he",
                 str(tiff_pair["he"]), "--out", str(out), "--overlap", "0"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["slides"]["he"]["vendor"] == "generic-tiff"
    assert report["slides"]["ck56"] is None
    assert report["registration"] is None
    assert report["network"]["stride_40x"] == report["network"]["tile_40x"]
    capsys.readouterr()


def test_edge_variant_without_ck56_is_a_one_line_error(svs_pair, varied_checkpoint, tmp_path,
                                                      capsys) -> None:
    assert main(["predict-wsi", "--checkpoint", str(varied_checkpoint), "--he",
                 str(svs_pair["he"]), "--out", str(tmp_path / "p")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--ck56" in line


def test_extract_rois_cuts_the_annotated_blocks_exactly(tmp_path: Path, svs_pair,
                                                        capsys) -> None:
    out = tmp_path / "site"
    assert main(["extract-rois", "--he", str(svs_pair["he"]), "--ck56", str(svs_pair["ck56"]),
                 "--annotations", str(svs_pair["annotations"]), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tissue = SyntheticTissue(svs_pair["spec"])
    assert summary["problems"] == []
    assert summary["rois"] == len(tissue.annotated_blocks()) == 5  # all fit in this slide
    assert summary["splits"] == {"train": 3, "val": 1, "test": 1}
    for k, (sy, sx) in enumerate(tissue.annotated_blocks()):  # ROIs in reading order
        roi = out / "rois" / f"roi_{k:04d}"
        truth = tissue.strip("mask", sy * BLOCK, BLOCK)[:, sx * BLOCK:(sx + 1) * BLOCK]
        assert np.array_equal(read_mask(roi / "mask.png"), truth)
        dy, dx = estimate_shift(read_rgb(roi / "he.png"), read_rgb(roi / "ck56.png"))
        assert max(abs(dy), abs(dx)) <= 1  # CK5/6 read through the registration
    assert main(["extract-rois", "--he", str(svs_pair["he"]), "--annotations",
                 str(svs_pair["annotations"]), "--out", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_extract_rois_unknown_class_names_it_and_the_flag(tmp_path: Path, svs_pair,
                                                          capsys) -> None:
    doc = json.loads(Path(svs_pair["annotations"]).read_text())
    for feature in doc["features"]:
        if feature["properties"]["name"] == "invasive":
            feature["properties"]["classification"]["name"] = "Tumor"
    renamed = tmp_path / "renamed.geojson"
    renamed.write_text(json.dumps(doc))
    args = ["extract-rois", "--he", str(svs_pair["he"]), "--annotations", str(renamed)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'Tumor'" in line
    assert "--class-map" in line
    assert main([*args, "--out", str(tmp_path / "b"), "--class-map", "tumor=invasive"]) == 0
    assert (tmp_path / "b" / "site.yaml").exists()


def test_predict_writes_the_rois_prediction_as_geojson(tmp_path: Path, synth_root: Path,
                                                       varied_checkpoint, capsys) -> None:
    roi = synth_root / "site_01" / "rois" / "roi_0000"
    out = tmp_path / "pred"
    assert main(["predict", "--checkpoint", str(varied_checkpoint), "--he", str(roi / "he.png"),
                 "--ck56", str(roi / "ck56.png"), "--out", str(out)]) == 0
    capsys.readouterr()
    mask = read_mask(out / "mask.png")
    doc = json.loads((out / "prediction.geojson").read_text())
    shapes = [(CLASSES.index(f["properties"]["name"]), shape(f["geometry"]))
              for f in doc["features"]]
    assert {v for v, _ in shapes} == set(np.unique(mask)) - {0}
    assert all(g.is_valid for _, g in shapes)
    assert (rasterise(shapes, mask.shape, fill=0) == mask).mean() > 0.999


def test_slide_libraries_stay_off_the_client_import_path() -> None:
    code = ("import sys, fl_client.client_app, egcmf_model.predict, egcmf_model.cli; "
            "print([m for m in ('openslide', 'tiffslide', 'tifffile', 'shapely', 'pyvips') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def _readme_block(title: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(f"## {title}"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory, varied_checkpoint) -> tuple[Path, list]:
    """The README's slide commands up to ``check-site``, verbatim, in a fresh folder with a
    checkpoint at ``runs/central/best.pt``; returns the folder and the remaining commands."""
    cwd = tmp_path_factory.mktemp("readme")
    (cwd / "runs" / "central").mkdir(parents=True)
    shutil.copy(varied_checkpoint, cwd / "runs" / "central" / "best.pt")
    commands = [shlex.split(c) for c in _readme_block("From slides")]
    assert [c[:2] for c in commands] == [["egcmf", "synth-slides"], ["egcmf", "predict-wsi"],
                                         ["egcmf", "extract-rois"], ["egcmf", "check-site"],
                                         ["python", "sim/run.py"]]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        for argv in commands[:4]:
            assert main(argv[1:]) == 0, argv
    return cwd, commands[4:]


def test_readme_slide_commands_run_verbatim(readme_run, capsys) -> None:
    cwd, _ = readme_run
    capsys.readouterr()
    assert shapely.from_geojson((cwd / "pred-wsi" / "prediction.geojson").read_text())
    assert json.loads((cwd / "pred-wsi" / "report.json").read_text())["registration"][
        "flagged"] is False
    assert (cwd / "sites" / "plagh" / "site.yaml").exists()


def test_a_simulation_runs_on_the_extracted_site_readme_command(readme_run, monkeypatch,
                                                                 capsys) -> None:
    from sim.run import main as sim_main

    cwd, [argv] = readme_run
    monkeypatch.chdir(cwd)
    assert sim_main(argv[2:]) == 0, argv
    capsys.readouterr()
    (run,) = [p for p in (cwd / "runs").iterdir() if p.name != "central"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds"] == 2


def test_extract_rois_from_asap_xml_he_only(tmp_path: Path, svs_pair, capsys) -> None:
    def polygon(group: str, points: list[tuple[int, int]]) -> str:
        coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>'
                         for i, (x, y) in enumerate(points))
        return (f'<Annotation Name="{group}" Type="Polygon" PartOfGroup="{group}">'
                f"<Coordinates>{coords}</Coordinates></Annotation>")

    square = [(600, 600), (900, 600), (900, 900), (600, 900)]
    triangle = [(1200, 1000), (1400, 1000), (1200, 1200)]
    xml = tmp_path / "asap.xml"
    xml.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations>'
                   f'{polygon("Invasive", square)}{polygon("in situ", triangle)}'
                   "</Annotations><AnnotationGroups/></ASAP_Annotations>")
    out = tmp_path / "site"
    assert main(["extract-rois", "--he", str(svs_pair["he"]), "--annotations", str(xml),
                 "--out", str(out), "--name", "asap_site"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rois"] == 2
    assert summary["registration"] is None
    assert summary["problems"] == []
    first = read_mask(out / "rois" / "roi_0000" / "mask.png")
    assert first.shape == (300, 300)
    assert (first == 2).all()
    second = read_mask(out / "rois" / "roi_0001" / "mask.png")
    assert second.shape == (200, 200)
    assert set(np.unique(second)) == {1, 255}  # outside the triangle: not annotated
    assert (second == 1).sum() == pytest.approx(200 * 200 / 2, rel=0.02)
    assert not (out / "rois" / "roi_0000" / "ck56.png").exists()
    meta = yaml.safe_load((out / "site.yaml").read_text())
    assert meta["modalities"] == ["he"]
    assert meta["name"] == "asap_site"
