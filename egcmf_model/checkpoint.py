"""Checkpoints that carry their own configuration, written atomically."""

from __future__ import annotations

import dataclasses
import os
import pickle
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import Config, from_dict, to_dict
from .engine import build_model
from .network import EGCMF


def save_checkpoint(path: Path, model: torch.nn.Module, cfg: Config, classes: tuple[str, ...],
                    **extra: Any) -> None:
    """Write ``path`` via a temporary file and rename: a crash never leaves half a checkpoint."""
    write_checkpoint(path, model.state_dict(), cfg, classes, **extra)


def write_checkpoint(path: Path, state: Mapping[str, torch.Tensor], cfg: Config,
                     classes: tuple[str, ...], **extra: Any) -> None:
    """:func:`save_checkpoint` for a state dict."""
    payload = {"config": to_dict(cfg), "classes": list(classes),
               "model": {k: v.detach().cpu() for k, v in state.items()}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint's payload; with ``mmap``, its tensors are mapped from the file, not read
    (for a look at its configuration)."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such checkpoint")
    try:
        # weights_only: a checkpoint holds tensors and plain data, never objects to unpickle
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols
            payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a pickle of objects: a damaged file
            raise ValueError(f"{path}: not a readable checkpoint, or damaged") from exc
        raise ValueError(f"{path}: not an EGCMF-FL checkpoint: it holds objects other than "
                         "tensors and plain data, which are not loaded (unpickling them could "
                         "run code)") from exc
    except Exception as exc:  # torch raises several types for a damaged file
        raise ValueError(f"{path}: not a readable checkpoint, or damaged "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(payload, dict) or not {"config", "classes", "model"} <= set(payload):
        raise ValueError(f"{path}: not an EGCMF-FL checkpoint (no config/classes/model)")
    return payload


def load_model(path: Path, device: torch.device | str = "cpu"
               ) -> tuple[EGCMF, Config, tuple[str, ...], dict[str, Any]]:
    """Rebuild the network from a checkpoint alone: ``(model, config, classes, payload)``."""
    payload = read_checkpoint(path)
    cfg = from_dict(payload["config"], source=str(path))
    classes = tuple(payload["classes"])
    model = build_model(dataclasses.replace(cfg.model, weights=""), classes)  # weights are here
    model.load_state_dict(payload["model"])
    return model.to(device), cfg, classes, payload
