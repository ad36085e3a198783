from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from egcmf_model.data.dataset import RoiDataset
from egcmf_model.data.source import open_sites
from egcmf_model.data.synthetic import write_synthetic
from egcmf_model.data.transforms import augment, edge_target, mask_to_10x, tile_origins, to_10x


def test_item_holds_every_input_the_network_needs(synth_root: Path) -> None:
    source = open_sites(synth_root)
    item = RoiDataset(source.split("train"), source.classes, in_size=64)[0]
    assert item["he"].shape == (3, 64, 64)
    assert item["ck56"].shape == (3, 64, 64)
    assert item["edge"].shape == (2, 64, 64)
    assert item["mask"].shape == (64, 64)
    assert item["mask"].dtype == torch.int64
    assert item["edge_target"].shape == (64, 64)
    assert item["he_40x"].shape == (3, 256, 256)
    assert item["mask_40x"].shape == (256, 256)
    assert torch.equal(item["mask"], torch.from_numpy(mask_to_10x(item["mask_40x"].numpy())))
    assert item["edge"][1].max() > 0.5  # DAB channel sees the brown rim
    assert item["roi"].startswith("site_")


def test_small_roi_is_padded_not_rejected(tmp_path: Path) -> None:
    write_synthetic(tmp_path, 1, 2, 96, seed=0)  # 96 px at 40x < the 256 px tile
    source = open_sites(tmp_path)
    item = RoiDataset(source.records, source.classes, in_size=64)[0]
    assert item["he"].shape == (3, 64, 64)
    assert (item["mask_40x"][96:, :] == 255).all()
    assert (item["mask_40x"][:96, :96] != 255).all()


def test_large_roi_is_tiled(tmp_path: Path) -> None:
    write_synthetic(tmp_path, 1, 2, 384, seed=0)
    source = open_sites(tmp_path)
    assert len(RoiDataset(source.records, source.classes, in_size=64)) == 2 * 4
    assert tile_origins(384, 256) == [0, 128]
    assert tile_origins(512, 256) == [0, 256]


def test_augmentation_is_identical_for_every_modality() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, (8, 8)).astype(np.uint8)
    arrays = {"he": np.repeat(base[..., None], 3, 2), "ck56": np.repeat(base[..., None], 3, 2),
              "mask": base.copy()}
    for seed in range(8):
        out = augment(arrays, np.random.default_rng(seed))
        assert np.array_equal(out["he"][..., 0], out["mask"])
        assert np.array_equal(out["ck56"][..., 1], out["mask"])


def test_stain_jitter_changes_colour_not_geometry() -> None:
    rng = np.random.default_rng(0)
    he = rng.integers(60, 250, (16, 16, 3)).astype(np.uint8)
    out = augment({"he": he, "mask": np.zeros((16, 16), np.uint8)}, rng, stain_jitter=0.2)
    assert out["he"].shape == he.shape
    assert not np.array_equal(out["he"], he)


def test_edge_target_is_a_band_around_tumour() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[5:15, 5:15] = 1
    band = edge_target(mask, ("background", "in_situ", "invasive"), "boundary", 1)
    assert band[4, 10] == 1
    assert band[5, 10] == 1
    assert band[10, 10] == 0
    assert band[0, 0] == 0
    full = edge_target(mask, ("background", "in_situ", "invasive"), "mask", 1)
    assert full.sum() == 100


def test_downsampling_keeps_the_majority_label_and_averages_colour() -> None:
    mask = np.zeros((8, 8), np.uint8)
    mask[:3, :4] = 2  # 12 of 16 pixels in the first block
    assert mask_to_10x(mask).tolist() == [[2, 0], [0, 0]]
    rgb = np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3)
    assert np.allclose(to_10x(rgb)[0, 0], rgb[:4, :4].reshape(-1, 3).mean(0))


def test_augmented_dataset_is_reproducible(synth_root: Path) -> None:
    source = open_sites(synth_root)
    make = lambda: RoiDataset(source.split("train"), source.classes, 64, augment=True, seed=3)  # noqa: E731
    a, b = make(), make()
    for i in range(3):
        assert torch.equal(a[i]["he"], b[i]["he"])
