from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from egcmf_model.data.io import read_mask, read_rgb
from egcmf_model.data.nuclei import BENIGN, IN_SITU, RADIUS_UM
from egcmf_model.data.preview import write_preview
from egcmf_model.data.sites import check_site, estimate_shift, find_sites, load_site_meta
from egcmf_model.data.source import open_sites
from egcmf_model.data.stain import dab_density, haematoxylin_density
from egcmf_model.data.synthetic import (
    JITTER_UM,
    UM_PER_PX,
    render_roi,
    site_style,
    split_ids,
    write_synthetic,
)
from egcmf_model.data.transforms import mask_to_10x, to_10x


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_files_wherever_written(tmp_path: Path) -> None:
    write_synthetic(tmp_path / "a", 2, 2, 64, seed=3)
    write_synthetic(tmp_path / "elsewhere" / "b", 2, 2, 64, seed=3)
    write_synthetic(tmp_path / "c", 2, 2, 64, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "elsewhere" / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_every_generated_site_is_a_valid_site_folder(synth_root: Path) -> None:
    sites = find_sites(synth_root)
    assert [s.name for s in sites] == ["site_01", "site_02", "site_03"]
    for site in sites:
        assert check_site(site) == []
        meta = load_site_meta(site)
        assert meta.splits["train"]
        assert meta.splits["val"]
        assert meta.classes == ("background", "in_situ", "invasive")


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6, 10])
def test_split_keeps_train_and_val_non_empty(k: int) -> None:
    splits = split_ids([f"r{i}" for i in range(k)])
    assert splits["train"]
    assert splits["val"]
    together = [roi for ids in splits.values() for roi in ids]
    assert sorted(together) == sorted(f"r{i}" for i in range(k))


def test_images_look_like_their_stains(synth_root: Path) -> None:
    meta = load_site_meta(synth_root / "site_01")
    files = meta.files(meta.splits["train"][0])
    he, ck, mask = read_rgb(files["he"]), read_rgb(files["ck56"]), read_mask(files["mask"])
    stroma = he[mask == 0].astype(float).mean(axis=0)
    assert stroma[0] > stroma[1]
    assert stroma[2] > stroma[1]
    nuclei = he[haematoxylin_density(he) > np.percentile(haematoxylin_density(he), 99)]
    assert nuclei.mean(axis=0)[2] > nuclei.mean(axis=0)[0]  # purple-blue nuclei
    brown = ck[dab_density(ck) > 0.05].astype(float).mean(axis=0)
    assert brown[0] > brown[2]  # DAB is brown: red over blue


def _band(region: np.ndarray) -> np.ndarray:
    return ndimage.binary_dilation(region, iterations=1) & ~ndimage.binary_erosion(region)


def test_ck56_rim_carries_the_in_situ_signal_that_he_lacks(synth_root: Path) -> None:
    """SPEC: DAB in the in-situ boundary band >= 3x that of invasive nests; H&E far less apart."""
    dab = {1: [], 2: []}
    hema = {1: [], 2: []}
    for record in open_sites(synth_root).records:
        he10 = to_10x(read_rgb(record.he)).astype(np.uint8)
        ck10 = to_10x(read_rgb(record.ck56)).astype(np.uint8)
        mask10 = mask_to_10x(record.labels())
        for cls in (1, 2):
            band = _band(mask10 == cls)
            dab[cls].extend(dab_density(ck10)[band])
            hema[cls].extend(haematoxylin_density(he10)[band])
    ck_ratio = np.mean(dab[1]) / np.mean(dab[2])
    he_ratio = np.mean(hema[1]) / np.mean(hema[2])
    assert ck_ratio >= 3.0
    assert max(he_ratio, 1 / he_ratio) < 1.5
    assert max(he_ratio, 1 / he_ratio) < ck_ratio / 3


def test_nuclear_detail_is_resolved_at_40x_only() -> None:
    """Invasive nuclei have granular chromatin and nucleoli: a 40x texture difference that
    averaging to 10x removes."""
    texture = {"40x": {1: [], 2: []}, "10x": {1: [], 2: []}}
    for roi in _rois(512, 6, mix=(0.0, 0.5, 0.5)):
        he, mask = roi["he"], roi["mask"]
        h40 = np.abs(ndimage.laplace(haematoxylin_density(he)))
        h10 = np.abs(ndimage.laplace(haematoxylin_density(to_10x(he).astype(np.uint8))))
        m10 = mask_to_10x(mask)
        for cls in (1, 2):
            texture["40x"][cls].extend(h40[mask == cls])
            texture["10x"][cls].extend(h10[m10 == cls])
    ratio = {k: np.mean(v[2]) / np.mean(v[1]) for k, v in texture.items()}
    assert ratio["40x"] > 1.3
    assert ratio["10x"] < ratio["40x"] - 0.2


def test_sites_differ_in_stain_and_class_mix(synth_root: Path) -> None:
    means, mixes = [], []
    for site in find_sites(synth_root):
        records = open_sites(site).records
        means.append(np.mean([read_rgb(r.he).reshape(-1, 3).mean(0) for r in records], axis=0))
        counts = sum(np.bincount(r.labels().ravel(), minlength=3) for r in records)
        mixes.append(counts[1] / max(1, counts[1] + counts[2]))
    assert np.ptp(np.array(means), axis=0).max() > 3.0
    assert np.ptp(mixes) > 0.1


def test_registration_jitter_is_small_but_present(synth_root: Path) -> None:
    shifts = []
    for record in open_sites(synth_root).records:
        he, ck = read_rgb(record.he), read_rgb(record.ck56)
        shifts.append(max(abs(s) for s in estimate_shift(he, ck)))
    assert max(shifts) <= JITTER_UM / UM_PER_PX + 0.5
    assert max(shifts) > 0


def test_preview_is_a_picture(synth_root: Path, tmp_path: Path) -> None:
    out = write_preview(synth_root, tmp_path / "preview.png")
    with Image.open(out) as image:
        assert image.mode == "RGB"
        assert image.size[0] > 500
        assert image.size[1] > 400


def _rois(side: int, count: int, mix: tuple[float, float, float] | None = None):
    for i in range(count):
        style = site_style(np.random.default_rng([11, i % 3]))
        if mix is not None:
            style = dataclasses.replace(style, mix=mix)
        yield render_roi(np.random.default_rng([11, i]), side, style)


def test_rim_alone_does_not_separate_in_situ_from_benign() -> None:
    """Benign acini wear the same DAB rim as in-situ lesions; only H&E morphology tells them
    apart (crowded atypical nuclei against a lumen lined by small nuclei)."""
    dab = {IN_SITU: [], BENIGN: []}
    hema = {IN_SITU: [], BENIGN: []}
    for roi in _rois(512, 8, mix=(0.5, 0.5, 0.0)):
        ck10, he10 = (to_10x(roi[k]).astype(np.uint8) for k in ("ck56", "he"))
        kind10 = mask_to_10x(roi["kind"])
        for kind in (IN_SITU, BENIGN):
            region = kind10 == kind
            dab[kind].extend(dab_density(ck10)[_band(region)])
            hema[kind].extend(haematoxylin_density(he10)[ndimage.binary_erosion(region, None, 4)])
    assert len(dab[IN_SITU]) > 200
    assert len(dab[BENIGN]) > 200
    rim_ratio = np.mean(dab[IN_SITU]) / np.mean(dab[BENIGN])
    assert 1 / 1.25 < rim_ratio < 1.25
    assert np.mean(hema[IN_SITU]) > 1.5 * np.mean(hema[BENIGN])


def test_structures_keep_their_size_in_um_whatever_the_roi_side() -> None:
    """A bigger ROI shows more tissue, not bigger lesions: sizes are in µm at 0.25 µm/px."""
    low, high = min(r for r, _ in RADIUS_UM.values()), max(r for _, r in RADIUS_UM.values())
    mean_radius = {}
    for side in (384, 768):
        radii = []
        for roi in _rois(side, 4):
            labels, _ = ndimage.label(roi["kind"] > 0)
            for index, piece in enumerate(ndimage.find_objects(labels), start=1):
                y, x = piece
                if y.start == 0 or x.start == 0 or y.stop == side or x.stop == side:
                    continue  # cut by the border
                area_um2 = (labels[piece] == index).sum() * UM_PER_PX**2
                radii.append(np.sqrt(area_um2 / np.pi))
        assert radii, side
        assert low * 0.7 < min(radii)
        assert max(radii) < high * 1.3
        mean_radius[side] = np.mean(radii)
    assert 0.75 < mean_radius[384] / mean_radius[768] < 1.33


def test_data_cache_is_keyed_by_the_generator_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from egcmf_model.config import DataConfig
    from egcmf_model.data import synthetic
    from egcmf_model.data.source import synthetic_cache

    cfg = DataConfig(synth_sites=1, synth_rois_per_site=2)
    first = synthetic_cache(cfg, 64)
    assert synthetic.generator_version() in first.name
    assert synthetic_cache(cfg, 64) == first  # reused while the generator is the same
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + 1)
    second = synthetic_cache(cfg, 64)
    assert second != first
    assert (second / "done").exists()
    assert (second / "site_01" / "site.yaml").exists()


def test_the_tiny_field_of_view_shows_a_duct_with_its_rim() -> None:
    """64 px at 10x = 64 µm: every acinus and in-situ duct fits in it with its rim, and many
    generated tiles show one whole."""
    from egcmf_model.config import load_config
    from egcmf_model.data.nuclei import IRREGULARITY

    field_um = load_config("tiny").model.in_size * 1.0  # 10x: 1 µm/px
    for kind in (IN_SITU, BENIGN):
        widest = 2 * RADIUS_UM[kind][1] * (1 + IRREGULARITY[kind]) ** 3
        assert widest < field_um, kind
    whole = rim = 0
    for roi in _rois(256, 40):
        walled = (roi["kind"] == IN_SITU) | (roi["kind"] == BENIGN)
        labels, _ = ndimage.label(walled)
        rim += walled.any()
        whole += any(y.start > 0 and x.start > 0 and y.stop < 256 and x.stop < 256
                     for y, x in ndimage.find_objects(labels))
    assert rim >= 20
    assert whole >= 4
