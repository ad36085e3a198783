"""The torch Dataset every trainer uses: tiles of ROIs with all inputs the network needs."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .io import IGNORE_INDEX, DataError, image_size, read_rgb
from .source import RoiRecord
from .transforms import (
    ORIENTATIONS,
    SCALE,
    augment,
    edge_input,
    edge_target,
    mask_to_10x,
    normalise_rgb,
    pad_to,
    tile_origins,
    to_10x,
)

log = logging.getLogger(__name__)


class RoiDataset(Dataset):
    """Tiles of ``4 * in_size`` px at 40x cut from each ROI, padded where an ROI is smaller.

    Each item holds, for a tile of 10x side H = ``in_size``:
    ``he`` (3, H, W), ``ck56`` (3, H, W), ``edge`` (2, H, W) grayscale + DAB density,
    ``mask`` (H, W) int64, ``edge_target`` (H, W) float, ``he_40x`` (3, 4H, 4W),
    ``mask_40x`` (4H, 4W) int64 and ``roi`` (the ROI id, for logs only).
    H&E-only data (``ck56`` absent) gets zero CK5/6 tensors. ROIs that cannot be read are skipped
    with a warning naming the file; the run goes on.

    Augmentation draws from a generator seeded by (``seed``, epoch, tile index): the same in any
    DataLoader worker and in any order of access; call :meth:`set_epoch` before each epoch.
    With ``augment`` and ``views`` > 1, an item holds that many distinct orientations of its
    tile, stacked along a first axis (batch them with :func:`collate_views`).
    """

    def __init__(
        self,
        records: Sequence[RoiRecord],
        classes: tuple[str, ...],
        in_size: int,
        *,
        edge_kind: str = "boundary",
        edge_band: int = 2,
        augment: bool = False,
        stain_jitter: float = 0.0,
        seed: int = 0,
        views: int = 1,
    ) -> None:
        self.classes, self.in_size, self.tile = classes, in_size, in_size * SCALE
        self.edge_kind, self.edge_band = edge_kind, edge_band
        self.augment, self.stain_jitter = augment, stain_jitter
        self.seed, self.epoch = seed, 0
        self.views = views if augment else 1  # orientations are augmentations
        sized = [(r, size) for r in records if (size := self._size(r)) is not None]
        self.records = [r for r, _ in sized]
        self.tiles = [
            (i, y, x)
            for i, (_, (height, width)) in enumerate(sized)
            for y in tile_origins(height, self.tile)
            for x in tile_origins(width, self.tile)
        ]
        self.bad: set[int] = set()

    def _size(self, record: RoiRecord) -> tuple[int, int] | None:
        """The ROI's (height, width) from its PNG headers; None (with a warning) if unusable."""
        files = [f for f in (record.he, record.ck56, record.mask) if f is not None]
        try:
            sizes = {image_size(f) for f in files}
        except DataError as exc:
            log.warning("skipping ROI %s: %s", record.roi_id, exc)
            return None
        if len(sizes) > 1:
            log.warning("skipping ROI %s: sizes of %s differ", record.roi_id,
                        ", ".join(str(f) for f in files))
            return None
        return sizes.pop()

    def __len__(self) -> int:
        return len(self.tiles)

    def set_epoch(self, epoch: int) -> None:
        """Draw another augmentation of every tile (the shuffling is the loader's)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        for offset in range(len(self.tiles)):  # a bad ROI hands over to the next good tile
            i = (index + offset) % len(self.tiles)
            if self.tiles[i][0] in self.bad:
                continue
            try:
                return self._load(i)
            except DataError as exc:
                log.warning("skipping ROI %s: %s", self.records[self.tiles[i][0]].roi_id, exc)
                self.bad.add(self.tiles[i][0])
        raise DataError("no readable ROI left in this data set")

    def _load(self, tile: int) -> dict[str, torch.Tensor | str]:
        i, y, x = self.tiles[tile]
        record, t = self.records[i], self.tile
        arrays = {"he": read_rgb(record.he), "mask": record.labels()}
        if record.ck56 is not None:
            arrays["ck56"] = read_rgb(record.ck56)
        # White for RGB, and 255 = IGNORE_INDEX for the mask: one pad value serves both.
        arrays = {k: pad_to(a[y : y + t, x : x + t], t, IGNORE_INDEX) for k, a in arrays.items()}
        if not self.augment:
            return self.sample(arrays, record.roi_id)
        rng = np.random.default_rng([self.seed, self.epoch, tile])
        if self.views == 1:
            return self.sample(augment(arrays, rng, self.stain_jitter), record.roi_id)
        first = int(rng.integers(ORIENTATIONS))  # distinct orientations, stacked (collate_views)
        views = [self.sample(augment(arrays, rng, self.stain_jitter,
                                     (first + view) % ORIENTATIONS), record.roi_id)
                 for view in range(self.views)]
        return {k: record.roi_id if k == "roi" else torch.stack([v[k] for v in views])
                for k in views[0]}

    def sample(self, arrays: dict[str, np.ndarray], roi_id: str) -> dict[str, torch.Tensor | str]:
        """Network inputs and targets from 40x ``he``, ``mask`` and optional ``ck56`` arrays."""
        he10 = to_10x(arrays["he"])
        mask10 = mask_to_10x(arrays["mask"])
        if "ck56" in arrays:
            ck10 = to_10x(arrays["ck56"])
            ck, edge = normalise_rgb(ck10), edge_input(ck10)
        else:
            ck = np.zeros((3, *mask10.shape), np.float32)
            edge = np.zeros((2, *mask10.shape), np.float32)
        target = edge_target(mask10, self.classes, self.edge_kind, self.edge_band)
        return {
            "he": torch.from_numpy(normalise_rgb(he10)),
            "ck56": torch.from_numpy(ck),
            "edge": torch.from_numpy(edge),
            "mask": torch.from_numpy(mask10.astype(np.int64)),
            "edge_target": torch.from_numpy(target),
            "he_40x": torch.from_numpy(normalise_rgb(arrays["he"])),
            "mask_40x": torch.from_numpy(arrays["mask"].astype(np.int64)),
            "roi": roi_id,
        }


def collate_views(items: list[dict[str, torch.Tensor | str]]
                  ) -> dict[str, torch.Tensor | list[str]]:
    """A batch of the stacked views of :class:`RoiDataset` (``views`` > 1) as one flat batch:
    the views of item i are rows ``i * views`` to ``(i + 1) * views - 1``."""
    batch = default_collate(items)
    views = batch["he"].shape[1]
    return {k: [roi for roi in v for _ in range(views)] if k == "roi" else v.flatten(0, 1)
            for k, v in batch.items()}
