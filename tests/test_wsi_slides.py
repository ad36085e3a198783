"""Slides, tissue, registration and annotation files (egcmf_model/wsi), on generated slides."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from shapely.geometry import Point, Polygon, shape

from egcmf_model.cli import main
from egcmf_model.data.io import DataError
from egcmf_model.wsi.annotations import (
    features,
    match_classes,
    parse_class_map,
    read_annotations,
    write_geojson,
)
from egcmf_model.wsi.extract import roi_boxes
from egcmf_model.wsi.options import SlidePairSpec
from egcmf_model.wsi.polygons import polygonise, rasterise
from egcmf_model.wsi.registration import register
from egcmf_model.wsi.slide import SlideError, open_slide
from egcmf_model.wsi.synthetic import write_slide_pair
from egcmf_model.wsi.tissue import TISSUE_MPP, tissue_mask

CLASSES = ("background", "in_situ", "invasive")


@pytest.mark.parametrize("kind", ["svs", "tiff"])
def test_fixtures_are_pyramids_openslide_reads(kind: str, svs_pair, tiff_pair) -> None:
    pair = svs_pair if kind == "svs" else tiff_pair
    slide = openslide.OpenSlide(pair["he"])
    assert slide.properties["openslide.vendor"] == ("aperio" if kind == "svs" else "generic-tiff")
    assert slide.level_dimensions == ((2048, 2048), (512, 512), (128, 128))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_levels_are_chosen_by_mpp_not_by_index(svs_pair, tmp_path: Path) -> None:
    slide = open_slide(svs_pair["he"])
    assert slide.level_mpps == pytest.approx([0.25, 1.0, 4.0])
    assert [slide.level_for(m) for m in (0.25, 0.5, 1.0, 1.04, 2.0, 4.0, 16.0)] == \
        [0, 0, 1, 1, 1, 2, 2]
    direct = np.asarray(slide.handle.read_region((512, 256), 1, (64, 48)).convert("RGB"))
    assert np.array_equal(slide.region(1.0, 64, 128, 48, 64), direct)  # level 1, no resampling
    # a 20x scan (0.5 µm/px): its level 1 is 2 µm/px, so 1 µm/px must come from level 0
    coarse = open_slide(write_slide_pair(tmp_path, SlidePairSpec(
        size=1024, mpp=0.5, annotated=0))["he"])
    assert coarse.level_mpps == pytest.approx([0.5, 2.0])
    assert coarse.level_for(1.0) == 0
    assert coarse.level_for(2.0) == 1
    assert coarse.size_at(1.0) == (512, 512)
    assert coarse.region(1.0, 10, 20, 30, 40).shape == (30, 40, 3)
    assert coarse.region(0.25, 0, 0, 16, 16).shape == (16, 16, 3)  # upsampled, not refused


def test_slide_without_mpp_is_refused_unless_given(tmp_path: Path, varied_checkpoint,
                                                   capsys) -> None:
    paths = write_slide_pair(tmp_path, SlidePairSpec(size=1024, fmt="tiff", write_mpp=False,
                                                     annotated=0))
    with pytest.raises(SlideError) as err:
        open_slide(paths["he"])
    message = str(err.value)
    assert str(paths["he"]) in message
    assert "--mpp" in message
    assert "mpp-x" in message
    assert "\n" not in message
    slide = open_slide(paths["he"], mpp=0.25)
    assert (slide.mpp, slide.mpp_source) == (0.25, "--mpp")
    assert main(["predict-wsi", "--checkpoint", str(varied_checkpoint), "--he",
                 str(paths["he"]), "--ck56", str(paths["ck56"]), "--out",
                 str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "--mpp" in err[0]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("scan.kfb", b"KFB\x00" * 64, "convert to TIFF first"),
    ("scan.svs", b"not a slide at all" * 64, "not a readable slide"),
    ("missing.svs", None, "no such slide file"),
], ids=["kfb", "garbage", "missing"])
def test_unreadable_slides_are_one_line_errors_naming_the_file(
        tmp_path: Path, name: str, content: bytes | None, expected: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SlideError) as err:
        open_slide(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_tissue_mask_finds_the_section_and_not_the_margins_or_dust(svs_pair) -> None:
    slide = open_slide(svs_pair["he"])
    mask = tissue_mask(slide.thumbnail(TISSUE_MPP), TISSUE_MPP)
    assert mask.shape == (128, 128)
    side = mask.shape[0]
    top, left = int(0.11 * side), int(0.07 * side)  # the ellipse leaves 12 % and 8 % of glass
    assert not mask[:top].any()
    assert not mask[-top:].any()
    assert not mask[:, :left].any()
    assert not mask[:, -left:].any()
    assert mask[side // 2 - 10:side // 2 + 10, side // 2 - 10:side // 2 + 10].all()
    r = 0.38 * side  # the ellipse of tissue (radii 0.38 and 0.418 of the side)
    assert mask.sum() == pytest.approx(np.pi * r * 1.1 * r, rel=0.05)  # fat holes filled


@pytest.mark.parametrize("kind", ["svs", "tiff"])
def test_registration_recovers_the_known_shift(kind: str, svs_pair, tiff_pair) -> None:
    pair = svs_pair if kind == "svs" else tiff_pair
    dy, dx = pair["spec"].shift
    he, ck = open_slide(pair["he"]), open_slide(pair["ck56"])
    reg = register(he, ck, tissue_mask(he.thumbnail(TISSUE_MPP), TISSUE_MPP), TISSUE_MPP)
    assert reg.measured >= 3
    assert reg.trusted == reg.measured
    assert not reg.flagged(5.0)
    for y, x in [(200.0, 200.0), (260.0, 300.0), (300.0, 180.0)]:  # µm, inside the tissue
        a, b = reg.affine_at(y, x)
        moved = (a @ [x, y] + b) / 0.25 - np.array([x, y]) / 0.25  # 40x px
        assert np.abs(moved - [dx, dy]).max() <= 2, moved


def test_a_pair_from_different_blocks_is_flagged(svs_pair, tmp_path: Path, varied_checkpoint,
                                                 capsys) -> None:
    other = write_slide_pair(tmp_path / "other", SlidePairSpec(size=2048, seed=11,
                                                               annotated=0))
    he, ck = open_slide(svs_pair["he"]), open_slide(other["ck56"])
    reg = register(he, ck, tissue_mask(he.thumbnail(TISSUE_MPP), TISSUE_MPP), TISSUE_MPP)
    assert reg.flagged(5.0), reg.summary(5.0)
    code = main(["predict-wsi", "--checkpoint", str(varied_checkpoint), "--he",
                 str(svs_pair["he"]), "--ck56", str(other["ck56"]), "--out", str(tmp_path / "p")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert "registration" in err
    assert "--accept-registration" in err
    assert not (tmp_path / "p" / "report.json").exists()


def test_geojson_round_trip_polygon_with_hole(tmp_path: Path) -> None:
    ring = Point(700, 600).buffer(400, quad_segs=64)
    polygon = Polygon(ring.exterior.coords, [Point(650, 560).buffer(150).exterior.coords])
    path = write_geojson(tmp_path / "a.geojson", features({2: [polygon]}, CLASSES, 0.25, "t"))
    (read,) = read_annotations(path)
    [(value, geometry)] = match_classes([read], CLASSES, {}, path)
    assert value == 2
    assert geometry.equals(polygon)
    mask = rasterise([(value, geometry)], (1200, 1400), fill=0)
    traced = polygonise(lambda y, x, h, w: mask[y:y + h, x:x + w], mask.shape, [2], block=512)[2]
    assert len(traced) == 1
    assert len(traced[0].interiors) == 1
    assert traced[0].area == pytest.approx(polygon.area, rel=0.01)
    assert traced[0].symmetric_difference(polygon).area < 0.01 * polygon.area


def test_annotation_files_qupath_and_asap(tmp_path: Path) -> None:
    square = [[[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]]
    hole = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    bare_list = [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square[0], hole]},
         "properties": {"classification": {"name": "In situ", "color": [0, 170, 60]}}},
        {"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": [
            [[[200, 0], [300, 0], [300, 100], [200, 0]]], [[[400, 0], [500, 0], [500, 50],
                                                             [400, 0]]]]},
         "properties": {"classification": {"name": "DCIS"}}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
         "properties": {"classification": {"name": "invasive"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": square},
         "properties": {}},  # no class: skipped
    ]
    path = tmp_path / "qupath.json"
    path.write_text(json.dumps(bare_list))
    found = read_annotations(path)
    assert [a.name for a in found] == ["In situ", "DCIS"]
    assert found[0].geometry.area == 100 * 100 - 20 * 20
    with pytest.raises(DataError, match=r"\['DCIS'\].*--class-map"):
        match_classes(found, CLASSES, {}, path)
    matched = match_classes(found, CLASSES, parse_class_map("dcis=in_situ"), path)
    assert [v for v, _ in matched] == [1, 1]
    for spelling in ("IN_SITU", "in-situ", "In Situ"):
        assert match_classes([found[0].__class__(spelling, found[0].geometry)], CLASSES, {},
                             path)[0][0] == 1
    asap = tmp_path / "asap.xml"
    asap.write_text(
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        '<Annotation Name="a" Type="Polygon" PartOfGroup="invasive"><Coordinates>'
        '<Coordinate Order="0" X="10" Y="10"/><Coordinate Order="2" X="50" Y="50"/>'
        '<Coordinate Order="1" X="50" Y="10"/><Coordinate Order="3" X="10" Y="50"/>'
        '</Coordinates></Annotation>'
        '<Annotation Name="b" Type="Dot" PartOfGroup="invasive"><Coordinates>'
        '<Coordinate Order="0" X="1" Y="1"/></Coordinates></Annotation>'
        '</Annotations></ASAP_Annotations>')
    (region,) = read_annotations(asap)
    assert region.name == "invasive"
    assert region.geometry.area == 1600
    assert shape(region.geometry.__geo_interface__).is_valid


def test_tiffslide_opens_what_openslide_does_not(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    path = tmp_path / "stripped.tif"  # OpenSlide reads tiled TIFF only
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    slide = open_slide(path)
    assert slide.reader == "tiffslide"
    assert slide.mpp == pytest.approx(0.5)
    assert np.array_equal(slide.region(0.5, 10, 20, 30, 40), rgb[10:40, 20:60])
    assert slide.region(0.5, 290, 390, 20, 20)[15, 15].tolist() == [255, 255, 255]  # outside


def test_large_annotations_are_cut_into_rois_of_at_most_roi_size() -> None:
    long_one = Polygon([(100, 50), (5100, 50), (5100, 350), (100, 350)])
    small = Point(9000, 9000).buffer(40)
    boxes = roi_boxes([long_one, small], 1.0, 2048)
    assert len(boxes) == 4
    *pieces, last = boxes
    assert all(h <= 2048 and w <= 2048 for _, _, h, w in boxes)
    assert all(v % 4 == 0 for b in boxes for v in b)  # whole 10x pixels
    assert pieces[0][:2] == (48, 100)
    assert pieces[-1][1] + pieces[-1][3] == 5100
    assert sum(w for _, _, _, w in pieces) == 5000
    assert last == (8960, 8960, 80, 80)
