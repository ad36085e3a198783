"""Shared fixtures: small data sets the tests create themselves (nothing is downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from egcmf_model.data.synthetic import write_synthetic

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three synthetic sites of five 256 px ROIs (64 px at 10x, the tiny preset)."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root, sites=3, rois_per_site=5, size=256, seed=7)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Generated caches go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("EGCMF_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def task_identity():
    """Flower's runtime sets the process's task identity before it calls an app or builds a
    Message; tests that do either without a runtime set it too."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._task_id = TaskIdentity._run_id = TaskIdentity._node_id = None


# Whole-slide fixtures: small SVS-like and generic TIFF pairs written with tifffile from the
# synthetic generator's ROIs (levels 2048, 512, 128 px; 0.25 µm/px), with a known CK5/6 offset
# (``pair["spec"].shift``, level-0 px).


@pytest.fixture(scope="session")
def svs_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Aperio-like SVS pair (JPEG tiles, ``MPP = 0.25`` in the description)."""
    from egcmf_model.wsi.options import SlidePairSpec
    from egcmf_model.wsi.synthetic import write_slide_pair

    spec = SlidePairSpec(size=2048, shift=(24, -36))
    return {**write_slide_pair(tmp_path_factory.mktemp("svs"), spec), "spec": spec}


@pytest.fixture(scope="session")
def tiff_pair(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generic pyramidal TIFF pair (MPP in the resolution tags), another seed and offset."""
    from egcmf_model.wsi.options import SlidePairSpec
    from egcmf_model.wsi.synthetic import write_slide_pair

    spec = SlidePairSpec(size=2048, shift=(-20, 14), fmt="tiff", seed=3)
    return {**write_slide_pair(tmp_path_factory.mktemp("tiff"), spec), "spec": spec}


@pytest.fixture(scope="session")
def varied_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained network whose output heads are re-scaled to centred, unit-variance
    features, so that its argmax changes from place to place and every class shows up (an
    untrained head predicts one class everywhere)."""
    import numpy as np
    import torch

    from egcmf_model.checkpoint import save_checkpoint
    from egcmf_model.config import load_config
    from egcmf_model.data.dataset import RoiDataset
    from egcmf_model.data.synthetic import render_roi, site_style
    from egcmf_model.engine import INPUTS, build_model

    classes = ("background", "in_situ", "invasive")
    torch.manual_seed(0)
    cfg = load_config("tiny", None, [])
    model = build_model(cfg.model, classes).eval()
    roi = render_roi(np.random.default_rng(0), 256, site_style(np.random.default_rng(1)))
    batch = RoiDataset([], classes, cfg.model.in_size).sample(roi, "fixture")
    heads = [m for m in model.modules()
             if isinstance(m, torch.nn.Conv2d) and m.out_channels == len(classes)]
    seen: dict = {}
    hooks = [h.register_forward_pre_hook(lambda m, a: seen.setdefault(m, a[0])) for h in heads]
    with torch.no_grad():
        model(**{k: batch[k][None] for k in INPUTS})
        for hook in hooks:
            hook.remove()
        weights = torch.Generator().manual_seed(1)
        for head in heads:
            feats = seen[head]
            w = torch.randn(head.weight.shape[:2], generator=weights)
            w /= feats.std((0, 2, 3)) + 1e-6
            head.weight.copy_(w[:, :, None, None])
            head.bias.copy_(-(w @ feats.mean((0, 2, 3))))
    path = tmp_path_factory.mktemp("ckpt") / "varied.pt"
    save_checkpoint(path, model, cfg, classes)
    return path
