"""Model set-up and one-epoch train / evaluate loops, shared by centralised and federated runs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import shutil
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import determinism
from .ck56_branch import EDFM
from .config import Config, ModelConfig, PrivacyConfig, TrainConfig
from .data.transforms import tumour_ids
from .fusion import FusionLevel
from .losses import EGCMFLoss
from .metrics import SegmentationMetrics
from .network import EGCMF
from .vgg_unet import VGGEncoder

log = logging.getLogger(__name__)
INPUTS = ("he", "he_40x", "ck56", "edge")


def pick_device(name: str = "auto") -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is visible; use cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed torch, numpy's legacy global and ``random`` (third-party code may use them);
    return a generator for data shuffling. ``deterministic`` also pins GPU kernels."""
    determinism.enable(deterministic)
    random.seed(seed)
    np.random.seed(seed)  # libraries outside our control read the global state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def build_model(cfg: ModelConfig, classes: Sequence[str]) -> EGCMF:
    """The network for ``classes``, its encoders from ``cfg.weights`` if set (see
    :func:`load_encoders`)."""
    model = EGCMF(cfg, len(classes), tumour_ids(tuple(classes)) or [len(classes) - 1])
    if cfg.weights:
        load_encoders(model, cfg.weights)
    return model


def encoders(model: nn.Module) -> dict[str, VGGEncoder]:
    """The network's VGG encoders by module name (four in the full network)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, VGGEncoder)}


def frozen_parameters(model: nn.Module, dp: PrivacyConfig) -> set[str]:
    """The names of the parameters that no site trains: the encoders' when DP-SGD runs with
    ``dp.frozen="encoders"``, none otherwise."""
    if not (dp.enabled and dp.frozen == "encoders"):
        return set()
    return {f"{name}.{param}" for name, module in encoders(model).items()
            for param, _ in module.named_parameters()}


def load_encoders(model: EGCMF, path: str) -> None:
    """Every encoder of ``model`` from the local file ``path``: a torchvision VGG16-BN state
    dict (the same weights in each encoder), or a checkpoint or state dict of this network
    (each encoder its own counterpart's weights, e.g. from a network trained on public data)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a missing or damaged file
        raise ValueError(f"model.weights {path}: not a readable weights file ({exc})") from exc
    found = encoders(model)
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        state, theirs = payload["model"], (payload.get("config") or {}).get("model") or {}
    elif isinstance(payload, dict) and any(str(k).startswith(f"{name}.") for name in found
                                           for k in payload):
        state, theirs = payload, {}
    elif isinstance(payload, dict) and any(str(k).startswith("features.") for k in payload):
        for module in found.values():
            module.load_vgg_state(payload, path)
        return
    else:
        raise ValueError(f"model.weights {path}: neither a VGG16-BN state dict (features.* "
                         "keys) nor a checkpoint or state dict of this network")
    differ = [f"model.{key}={theirs[key]} there, {getattr(model.cfg, key)} here"
              for key in ("variant", "width", "norm") if theirs.get(key, getattr(
                  model.cfg, key)) != getattr(model.cfg, key)]
    for name, module in found.items():
        own = {k.removeprefix(f"{name}."): v for k, v in state.items()
               if k.startswith(f"{name}.")}
        try:
            module.load_state_dict(own)
        except RuntimeError as exc:
            why = "; ".join(differ) or "another preset, width, variant or normalisation?"
            raise ValueError(f"model.weights {path}: its encoder {name} does not fit this "
                             f"network ({why}): {exc}") from exc


def checked_weights(cfg: Config) -> Config:
    """``cfg`` with ``model.weights``, if set, as an absolute path, once it loads into this
    network (a network on the meta device: no memory, no random values), so that a wrong
    file stops a run before it starts."""
    if not cfg.model.weights:
        return cfg
    path = str(Path(cfg.model.weights).expanduser().resolve())
    with torch.device("meta"):
        model = build_model(dataclasses.replace(cfg.model, weights=""),
                            tuple(cfg.data.classes) or ("background", "tumour"))
    with warnings.catch_warnings():  # loading into meta tensors checks shapes, copies nothing
        warnings.simplefilter("ignore", UserWarning)
        load_encoders(model, path)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=path))


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def forward(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return model(**{k: batch[k] for k in INPUTS})


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str,
                progress: tuple[float, float] | None, steps: int
                ) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step learning rate for ``steps`` steps spanning ``progress`` (fractions of the whole
    run): ``cosine`` decays from the configured rate at 0 to zero at 1; ``constant`` (or no
    ``progress``) keeps it."""
    if kind == "constant" or progress is None:
        return None
    start, end = progress

    def factor(step: int) -> float:
        where = start + (end - start) * min(step, steps) / max(steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(where, 0.0), 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


COMPILED = (EDFM, FusionLevel)  # the fusion modules: many small memory-bound operations
RECOMPILE_LIMIT = 32  # graphs of all eight fusion modules together: 8 per input shape,
# memory layout and precision, so four such combinations in one process


@dataclass(frozen=True)
class GpuSpeed:
    """Speed options that apply on a GPU only (``train.amp``, ``train.channels_last``,
    ``train.compile``)."""

    amp: str = "none"  # "bf16": autocast the forward pass and the loss to bfloat16
    channels_last: bool = False  # NHWC memory for the network and its inputs
    # the fusion modules compiled (torch.compile) for training, one graph per shape;
    # evaluation, whose last batch may be of any size, runs them uncompiled
    compile: bool = False

    @classmethod
    def of(cls, train: TrainConfig) -> GpuSpeed:
        """``train``'s options; no compiling under ``train.deterministic``, whose bitwise
        reproducibility is shown for the eager network alone."""
        return cls(train.amp, train.channels_last, train.compile and not train.deterministic)

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if device.type == "cuda" and self.amp == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def place(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` in the memory format to use on ``device``: channels-last where asked, on a
        GPU; otherwise the standard one, also for a model that an earlier call (an evaluation
        with other options, say) left channels-last. Its fusion modules compiled where asked,
        on a GPU; otherwise run eagerly, also where an earlier call compiled them."""
        layout = (torch.channels_last if device.type == "cuda" and self.channels_last
                  else torch.contiguous_format)
        compile_fusion(model, device.type == "cuda" and self.compile)
        return model.to(memory_format=layout)

    def batch(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
        batch = to_device(batch, device)
        if device.type == "cuda" and self.channels_last:
            return {k: v.contiguous(memory_format=torch.channels_last)
                    if torch.is_tensor(v) and v.dim() == 4 else v for k, v in batch.items()}
        return batch


def c_compiler() -> str | None:
    """The C compiler torch.compile would use for a GPU: ``$CC``, else clang, else gcc."""
    return os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc")


def compile_fusion(model: nn.Module, on: bool, backend: str | Callable = "inductor") -> None:
    """Compile the fusion modules of ``model`` in place (their weights and state dict keys stay
    as they are), or, with ``on`` false, run them eagerly again: under DP-SGD, Opacus needs
    every layer called as itself. Graphs already made are reused when compiled again."""
    if on:
        if backend == "inductor" and not c_compiler():
            raise ValueError("train.compile needs a C compiler on this machine (gcc or clang, "
                             "or one named by $CC), with which torch.compile builds its GPU "
                             "kernels' launchers: install one, or leave train.compile off")
        # all compiled modules share one cache and its limit
        config = torch._dynamo.config
        name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    for module in model.modules():
        if not isinstance(module, COMPILED):
            continue
        if on and module._compiled_call_impl is None:
            module.compile(dynamic=False, backend=backend)
        elif not on:
            module._compiled_call_impl = None


def train_epoch(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    loss_fn: EGCMFLoss,
    progress: str | None = None,
    on_empty: Callable[[], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    speed: GpuSpeed = GpuSpeed(),
    before_step: Callable[[], None] | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns the mean of each loss term, ``num-examples`` and
    ``steps`` (optimiser steps taken). ``scheduler`` steps after every optimiser step;
    ``before_step`` runs between the backward pass and the optimiser's step.

    Poisson sampling (DP-SGD) can draw an empty batch, which its loader yields as ``None``:
    ``on_empty`` runs in its place (the noise-only step), and the batch counts towards no mean.
    """
    speed.place(model, device).train()
    sums: dict[str, float] = {}
    seen = steps = 0
    # disable=None: no bar when stderr is not a terminal (CI logs, background runs)
    for batch in tqdm(loader, desc=progress, disable=True if progress is None else None,
                      leave=False):
        if batch is None:
            if on_empty is not None:
                on_empty()
            continue
        batch = speed.batch(batch, device)
        optimizer.zero_grad(set_to_none=True)
        with speed.autocast(device):
            loss, parts = loss_fn(forward(model, batch), batch)
        loss.backward()
        if before_step is not None:
            before_step()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        steps += 1
        n = batch["he"].shape[0]
        seen += n
        for key, value in parts.items():
            sums[key] = sums.get(key, 0.0) + value * n
    means = {key: value / max(seen, 1) for key, value in sums.items()}
    return {**means, "num-examples": seen, "steps": steps}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[dict[str, Any]],
    classes: Sequence[str],
    device: torch.device,
    loss_fn: EGCMFLoss,
    speed: GpuSpeed = GpuSpeed(),
) -> dict[str, Any]:
    """The paper's metrics on ``loader`` plus the mean loss and ``num-examples``."""
    dataclasses.replace(speed, compile=False).place(model, device).eval()
    metrics = SegmentationMetrics(classes)
    loss_sum, seen = 0.0, 0
    for batch in loader:
        batch = speed.batch(batch, device)
        with speed.autocast(device):
            out = forward(model, batch)
            loss_sum += loss_fn(out, batch)[1]["loss"] * batch["he"].shape[0]
        seen += batch["he"].shape[0]
        metrics.update(out["logits"], batch["mask"])
    return {**metrics.aggregate(), "loss": loss_sum / max(seen, 1), "num-examples": seen}
