"""Checks on every site's update before aggregation: one broken or malicious site must not
wreck the shared model. A rejected update is left out of the round, with its reason."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str


def _delta_norm(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> float:
    total = 0.0
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = arrays[key].astype(np.float64) - ref
            total += float(np.vdot(diff, diff))
    return total**0.5


def structural_problem(arrays: dict[str, np.ndarray], reference: dict[str, np.ndarray]
                       ) -> str | None:
    """Wrong number or names of arrays, wrong shapes or dtypes, NaN or Inf; None if fine."""
    if set(arrays) != set(reference):
        missing, extra = sorted(set(reference) - set(arrays)), sorted(set(arrays) - set(reference))
        return (f"wrong arrays: {len(arrays)} sent, {len(reference)} expected "
                f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for key, ref in reference.items():
        got = arrays[key]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            return (f"array {key}: shape {got.shape} {got.dtype}, expected {ref.shape} "
                    f"{ref.dtype}")
        if np.issubdtype(got.dtype, np.floating) and not np.isfinite(got).all():
            return f"array {key}: holds NaN or Inf"
    return None


def validate_updates(replies: list[Message], reference: ArrayRecord, site_of,
                     max_ratio: float) -> tuple[list[Message], list[Rejection]]:
    """Keep the replies whose arrays are well-formed and whose update norm ||w_site - w_global||
    is at most ``max_ratio`` times the median norm of the other sites' updates."""
    ref = {k: v.numpy() for k, v in reference.items()}
    kept, rejected, norms = [], [], []
    for msg in replies:
        if "arrays" not in msg.content:
            rejected.append(Rejection(site_of(msg), "no arrays in the reply"))
            continue
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        problem = structural_problem(arrays, ref)
        if problem:
            rejected.append(Rejection(site_of(msg), problem))
            continue
        kept.append(msg)
        norms.append(_delta_norm(arrays, ref))
    final = []
    for i, msg in enumerate(kept):
        others = [n for j, n in enumerate(norms) if j != i]
        limit = max_ratio * float(np.median(others)) if others else float("inf")
        if others and norms[i] > limit and norms[i] > 0:
            median = limit / max_ratio
            rejected.append(Rejection(site_of(msg), f"update norm {norms[i]:.3g} is over "
                                      f"{max_ratio:g}x the median of the others ({median:.3g})"))
        else:
            final.append(msg)
    return final, rejected
