"""Model complexity as Table VI reports it: parameters, FLOPs and inference time."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig
from .engine import build_model, pick_device
from .he_branch import ZOOM
from .network import count_parameters

PAIRED = ("background", "in_situ", "invasive")


def dummy_inputs(cfg: ModelConfig, device: torch.device, batch: int = 1) -> dict[str, torch.Tensor]:
    h = cfg.in_size
    make = lambda c, s: torch.randn(batch, c, s, s, device=device)  # noqa: E731
    return {"he": make(3, h), "he_40x": make(3, ZOOM * h), "ck56": make(3, h), "edge": make(2, h)}


def profile(cfg: ModelConfig, device_name: str = "auto", runs: int = 3) -> dict[str, Any]:
    """``params`` (raw count), ``gflops`` (2 per multiply-add, torch.utils.flop_counter, batch 1),
    ``input`` ([C, H, W] of X_aim), ``infer_s`` (mean of ``runs`` after a warm-up), ``device``."""
    device = pick_device(device_name)
    model = build_model(cfg, PAIRED).to(device).eval()
    inputs = dummy_inputs(cfg, device)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            model(**inputs)
        times = []
        for _ in range(runs):
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            times.append(time.perf_counter() - start)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"params": count_parameters(model), "gflops": counter.get_total_flops() / 1e9,
            "input": [3, cfg.in_size, cfg.in_size], "infer_s": sum(times) / len(times),
            "device": name, "variant": cfg.variant}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
