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
