"""PNG reading and writing with errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IGNORE_INDEX = 255  # mask value excluded from losses and metrics


class DataError(ValueError):
    """A data file is missing, unreadable or inconsistent; the message starts with its path."""


def read_rgb(path: Path) -> np.ndarray:
    """Read an 8-bit RGB PNG as ``(H, W, 3) uint8``; RGBA and grey are errors that say so."""
    image = _open(path)
    if image.mode != "RGB":
        raise DataError(f"{path}: expected an RGB image, got mode {image.mode} "
                        f"({len(image.getbands())} channel(s)); convert it to 8-bit RGB")
    return np.asarray(image, dtype=np.uint8)


def read_mask(path: Path) -> np.ndarray:
    """Read a single-channel 8-bit label PNG (``L``, or ``P`` indices) as ``(H, W) uint8``."""
    image = _open(path)
    if image.mode not in ("L", "P"):
        raise DataError(f"{path}: a mask must be a single-channel 8-bit PNG of class ids, "
                        f"got mode {image.mode} ({len(image.getbands())} channel(s))")
    return np.asarray(image, dtype=np.uint8)


def image_size(path: Path) -> tuple[int, int]:
    """``(height, width)`` from the PNG header alone, without decoding pixels."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing file") from exc
    except (OSError, SyntaxError) as exc:
        raise DataError(f"{path}: unreadable image ({exc})") from exc
    return height, width


def write_png(path: Path, array: np.ndarray) -> None:
    """Write ``(H, W)`` or ``(H, W, 3)`` uint8 as PNG; no timestamps, so bytes are reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path, format="PNG")


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later in training
            return image.copy() if image.mode in ("RGB", "L", "P") else image
    except FileNotFoundError as exc:
        raise DataError(f"{path}: missing file") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from exc
