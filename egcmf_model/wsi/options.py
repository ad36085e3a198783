"""Settings of the slide commands, one home for each default (the CLI reads them from here)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WsiOptions:
    """``egcmf predict-wsi``."""

    mpp: float | None = None  # level-0 µm/px for slides whose metadata has none
    overlap: float = 0.25  # share of a tile that its neighbour overlaps
    batch_size: int = 8  # tiles per forward pass
    max_registration_error: float = 5.0  # µm; a pair estimated worse is refused
    accept_registration: bool = False  # predict with a flagged registration anyway


@dataclass(frozen=True)
class ExtractOptions:
    """``egcmf extract-rois``."""

    classes: tuple[str, ...] = ("background", "in_situ", "invasive")  # ids in this order
    class_map: dict[str, str] = field(default_factory=dict)  # annotation name -> class
    roi_size: int = 2048  # largest ROI side in 40x px (the paper preset's tile)
    seed: int = 0  # seeds the train/val/test split
    mpp: float | None = None  # level-0 µm/px for slides whose metadata has none
    max_registration_error: float = 5.0  # µm; a pair estimated worse is refused
    accept_registration: bool = False  # cut ROIs from a flagged registration anyway


@dataclass(frozen=True)
class SlidePairSpec:
    """``egcmf synth-slides``: a synthetic slide pair with a known CK5/6 offset."""

    size: int = 4096  # side of level 0 in pixels
    shift: tuple[int, int] = (24, -36)  # (dy, dx) of the CK5/6 section in level-0 px
    mpp: float = 0.25  # µm per level-0 pixel
    write_mpp: bool = True  # False writes no MPP at all (prediction must refuse the slide)
    fmt: str = "svs"  # svs (Aperio layout) or tiff (generic pyramidal TIFF)
    annotated: int = 6  # blocks labelled in annotations.geojson
    seed: int = 0
