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


def _dihedral(array: np.ndarray) -> list[np.ndarray]:
    return [np.rot90(a, k, axes=(0, 1)) for a in (array, array[:, ::-1]) for k in range(4)]


def test_augmentation_is_identical_for_every_modality() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3, (8, 8)).astype(np.uint8)
    arrays = {"he": np.repeat(base[..., None], 3, 2), "ck56": np.repeat(base[..., None], 3, 2),
              "mask": base.copy()}
    seen = set()
    for seed in range(16):
        out = augment(arrays, np.random.default_rng(seed))
        assert np.array_equal(out["he"][..., 0], out["mask"])
        assert np.array_equal(out["ck56"][..., 1], out["mask"])
        matches = [i for i, d in enumerate(_dihedral(base)) if np.array_equal(d, out["mask"])]
        assert matches, "not a flip or a 90-degree rotation of the input"
        seen.add(matches[0])
    assert len(seen) >= 6  # the eight symmetries are all drawn, not the identity alone
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


def test_augmented_dataset_is_reproducible_and_worker_independent(synth_root: Path) -> None:
    source = open_sites(synth_root)
    make = lambda seed: RoiDataset(source.split("train"), source.classes, 64,  # noqa: E731
                                   augment=True, seed=seed)
    plain = RoiDataset(source.split("train"), source.classes, 64)
    a, b, other = make(3), make(3), make(4)
    n = len(a)
    forward_order = [a[i]["he"] for i in range(n)]
    backward_order = [b[i]["he"] for i in reversed(range(n))][::-1]  # as another worker might
    assert all(torch.equal(x, y) for x, y in zip(forward_order, backward_order, strict=True))
    assert sum(not torch.equal(x, plain[i]["he"]) for i, x in enumerate(forward_order)) > n // 2
    assert any(not torch.equal(x, other[i]["he"]) for i, x in enumerate(forward_order))
    a.set_epoch(1)
    assert any(not torch.equal(a[i]["he"], x) for i, x in enumerate(forward_order))
    item = a[0]  # images and masks move together
    assert torch.equal(item["mask"], torch.from_numpy(mask_to_10x(item["mask_40x"].numpy())))


def test_dataloader_workers_draw_the_same_augmentation_as_the_main_process(
    synth_root: Path,
) -> None:
    from egcmf_model.config import load_config
    from egcmf_model.trainer import make_loader

    source = open_sites(synth_root)
    cfg = load_config("tiny")

    def epoch(workers: int) -> list[torch.Tensor]:
        with_workers = load_config("tiny", overrides=[f"train.num_workers={workers}"])
        loader = make_loader(source.split("train"), source.classes, with_workers, True,
                             torch.Generator().manual_seed(5))
        loader.dataset.set_epoch(3)
        return [batch["he"] for batch in loader]

    assert cfg.data.augment
    alone, pooled = epoch(0), epoch(2)
    assert len(alone) == len(pooled)
    assert all(torch.equal(a, b) for a, b in zip(alone, pooled, strict=True))
