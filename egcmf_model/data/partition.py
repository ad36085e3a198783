"""Split a training pool of ROIs into virtual sites for simulation.

Schemes: ``iid`` (shuffled equal shares), ``dirichlet`` (label skew: each class's ROIs spread over
sites by Dir(alpha) proportions) and ``institution`` (whole hospitals per site). Every scheme is
deterministic for a seed, the sites are disjoint and together they cover the pool.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from .source import RoiRecord

SCHEMES = ("iid", "dirichlet", "institution")


def partition(
    pool: Sequence[RoiRecord],
    scheme: str,
    clients: int | None,
    seed: int,
    alpha: float = 0.5,
    labels: dict[str, int] | None = None,
) -> dict[str, list[RoiRecord]]:
    """Site name -> its records. ``labels`` (ROI id -> dominant class) drives ``dirichlet``.

    ``institution`` with ``clients=None`` gives one site per institution, named after it.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown partition {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if not pool:
        raise ValueError("the training pool is empty: nothing to partition")
    if scheme == "institution":
        return _by_institution(pool, clients)
    n = clients or 1
    if n > len(pool):
        raise ValueError(f"{n} sites but only {len(pool)} ROIs in the pool; use fewer --clients")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(pool))
        groups = [[pool[i] for i in part] for part in np.array_split(order, n)]
    else:
        if labels is None:
            raise ValueError("dirichlet partition needs the dominant label of every ROI")
        groups = _dirichlet(pool, labels, n, alpha, rng)
    return {f"client_{i:02d}": sorted(g, key=_key) for i, g in enumerate(groups)}


def _key(record: RoiRecord) -> str:
    return record.roi_id


def _by_institution(pool: Sequence[RoiRecord], clients: int | None) -> dict[str, list[RoiRecord]]:
    by_site: dict[str, list[RoiRecord]] = defaultdict(list)
    for record in pool:
        by_site[record.site].append(record)
    if clients is None or clients == len(by_site):  # one site per institution, by its name
        return {site: sorted(rs, key=_key) for site, rs in sorted(by_site.items())}
    if clients > len(by_site):
        raise ValueError(f"{clients} sites but only {len(by_site)} institutions; whole "
                         "institutions cannot be split, use fewer --clients or another partition")
    groups: list[list[RoiRecord]] = [[] for _ in range(clients)]
    # Largest institutions first, each to the currently smallest site: balanced and stable.
    for _site, records in sorted(by_site.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        smallest = min(range(clients), key=lambda i: (len(groups[i]), i))
        groups[smallest].extend(records)
    return {f"client_{i:02d}": sorted(g, key=_key) for i, g in enumerate(groups)}


def _dirichlet(
    pool: Sequence[RoiRecord],
    labels: dict[str, int],
    n: int,
    alpha: float,
    rng: np.random.Generator,
    attempts: int = 100,
) -> list[list[RoiRecord]]:
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, record in enumerate(pool):
        by_class[labels[record.roi_id]].append(i)
    for _ in range(attempts):
        groups: list[list[int]] = [[] for _ in range(n)]
        for cls in sorted(by_class):
            members = rng.permutation(by_class[cls])
            shares = rng.dirichlet(np.full(n, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(int)
            for g, part in zip(groups, np.split(members, cuts), strict=True):
                g.extend(part.tolist())
        if min(len(g) for g in groups) > 0:
            break
    else:  # tiny pools: move one ROI from the largest site to each empty one
        for g in groups:
            if not g:
                g.append(max(groups, key=len).pop())
    return [[pool[i] for i in g] for g in groups]


def dominant_label(pixels: np.ndarray, classes: Sequence[str]) -> int:
    """Class with most pixels, not counting ``background`` unless it is all there is."""
    counts = np.asarray(pixels, dtype=np.int64).copy()
    if "background" in classes and counts.sum() > counts[classes.index("background")]:
        counts[classes.index("background")] = -1
    return int(np.argmax(counts))
