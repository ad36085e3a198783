from __future__ import annotations

from pathlib import Path

import pytest

from egcmf_model.data.partition import dominant_label, partition
from egcmf_model.data.source import RoiRecord


def _pool(n: int = 40, sites: int = 4) -> list[RoiRecord]:
    return [RoiRecord(roi_id=f"s{i % sites}/roi_{i:03d}", site=f"s{i % sites}", split="train",
                      he=Path("he.png"), mask=Path("mask.png")) for i in range(n)]


def _labels(pool: list[RoiRecord]) -> dict[str, int]:
    return {r.roi_id: i % 3 for i, r in enumerate(pool)}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "institution"])
@pytest.mark.parametrize("clients", [None, 2, 4])
def test_sites_are_disjoint_cover_the_pool_and_are_deterministic(scheme, clients) -> None:
    pool = _pool()
    a = partition(pool, scheme, clients, seed=1, alpha=0.3, labels=_labels(pool))
    b = partition(pool, scheme, clients, seed=1, alpha=0.3, labels=_labels(pool))
    assert a == b
    ids = [r.roi_id for rs in a.values() for r in rs]
    assert sorted(ids) == sorted(r.roi_id for r in pool)
    assert len(ids) == len(set(ids))
    assert all(a.values())
    if clients:
        assert len(a) == clients


def test_seed_changes_iid_and_dirichlet() -> None:
    pool = _pool()
    for scheme in ("iid", "dirichlet"):
        a = partition(pool, scheme, 4, seed=1, labels=_labels(pool))
        b = partition(pool, scheme, 4, seed=2, labels=_labels(pool))
        assert a != b


def test_institution_keeps_hospitals_whole() -> None:
    sites = partition(_pool(), "institution", None, seed=0)
    assert list(sites) == ["s0", "s1", "s2", "s3"]
    merged = partition(_pool(), "institution", 2, seed=0)
    for records in merged.values():
        for inst in {r.site for r in records}:
            assert sum(r.site == inst for r in records) == 10  # all of it, never a part
    with pytest.raises(ValueError, match="institutions"):
        partition(_pool(), "institution", 5, seed=0)


def test_dirichlet_small_alpha_skews_labels() -> None:
    pool = _pool(n=300)
    labels = _labels(pool)
    sites = partition(pool, "dirichlet", 3, seed=0, alpha=0.1, labels=labels)
    shares = []
    for records in sites.values():
        counts = [sum(labels[r.roi_id] == c for r in records) for c in range(3)]
        shares.append(max(counts) / sum(counts))
    assert max(shares) > 0.6  # iid would give about 1/3


def test_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="fewer --clients"):
        partition(_pool(4), "iid", 5, seed=0)
    with pytest.raises(ValueError, match="unknown partition"):
        partition(_pool(), "random", 2, seed=0)
    with pytest.raises(ValueError, match="dominant label"):
        partition(_pool(), "dirichlet", 2, seed=0)


def test_dominant_label_ignores_background() -> None:
    classes = ("background", "in_situ", "invasive")
    assert dominant_label([1000, 3, 5], classes) == 2
    assert dominant_label([1000, 0, 0], classes) == 0
    assert dominant_label([10, 30, 5], ("tumor", "stroma", "other")) == 1
