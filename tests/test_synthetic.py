from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from egcmf_model.data.io import read_mask, read_rgb
from egcmf_model.data.preview import write_preview
from egcmf_model.data.sites import check_site, estimate_shift, find_sites, load_site_meta
from egcmf_model.data.source import open_sites
from egcmf_model.data.stain import dab_density, haematoxylin_density
from egcmf_model.data.synthetic import split_ids, write_synthetic
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


def test_nuclear_detail_is_resolved_at_40x_only(synth_root: Path) -> None:
    """Invasive nuclei have pale centres: a 40x texture difference that 10x averaging removes."""
    contrast = {"40x": [], "10x": []}
    for record in open_sites(synth_root).records[:6]:
        he, mask = read_rgb(record.he), record.labels()
        h40 = np.abs(ndimage.laplace(haematoxylin_density(he)))
        h10 = np.abs(ndimage.laplace(haematoxylin_density(to_10x(he).astype(np.uint8))))
        m10 = mask_to_10x(mask)
        if (mask == 1).any() and (mask == 2).any():
            contrast["40x"].append(h40[mask == 2].mean() / h40[mask == 1].mean())
            contrast["10x"].append(h10[m10 == 2].mean() / h10[m10 == 1].mean())
    assert contrast["40x"], "fixture needs ROIs holding both lesion types"
    assert np.mean(contrast["40x"]) > np.mean(contrast["10x"])


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
    assert max(shifts) < 0.01 * 256
    assert max(shifts) > 0


def test_preview_is_a_picture(synth_root: Path, tmp_path: Path) -> None:
    out = write_preview(synth_root, tmp_path / "preview.png")
    with Image.open(out) as image:
        assert image.mode == "RGB"
        assert image.size[0] > 500
        assert image.size[1] > 400
