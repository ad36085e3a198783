"""Checks on every site's update before aggregation: one broken or malicious site must not
wreck the shared model. A rejected update is left out of the round, with its reason.

Each reply is decoded once, here: its packed buffers are read without a copy (float32) or added
to the centre's float32 model (float16 updates), checked, and handed on to the strategy as
decoded arrays, which the strategy reads as they are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, Message

from egcmf_model.packing import FLOAT, kind
from fl_common.wire import all_finite, decoded_record, squared_distance, view

from .global_model import GlobalModel


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str


def decode_update(record: ArrayRecord, model: GlobalModel, wire: str
                  ) -> tuple[str | None, dict[str, np.ndarray], float]:
    """``(problem, weights, ||w_site - w_global||)`` of a reply's arrays: its buffers' names,
    sizes and dtypes must be the layout's (float ones in the ``wire`` dtype), its values finite.
    ``weights`` are the site's float32 weights (the problem says why there are none)."""
    expected = dict(model.layout.sizes)
    if set(record) != set(expected):
        missing, extra = sorted(set(expected) - set(record)), sorted(set(record) - set(expected))
        return (f"wrong arrays: {len(record)} sent, {len(expected)} expected (missing "
                f"{missing[:3]}, unexpected {extra[:3]})"), {}, 0.0
    weights, squares = {}, 0.0
    for name, size in expected.items():
        values = view(record[name])
        dtype = wire if kind(name) == FLOAT else "int64"
        if values.shape != (size,) or values.dtype != np.dtype(dtype):
            return (f"array {name}: shape {values.shape} {values.dtype}, expected ({size},) "
                    f"{dtype}"), {}, 0.0
        if kind(name) != FLOAT:
            weights[name] = values
            continue
        master = model.values[name]
        if wire == "float32":
            part = squared_distance(values, master)
            weights[name] = values
        else:  # the site's update: added to the centre's float32 weights
            update = values.astype(np.float32)
            part = squared_distance(update)
            weights[name] = np.add(update, master, out=update)
        if not math.isfinite(part) and not all_finite(values):  # a finite sum: all finite
            return f"array {name}: holds NaN or Inf", {}, 0.0
        squares += part
    return None, weights, squares**0.5


def validate_updates(replies: list[Message], model: GlobalModel, wire: str,
                     site_of: Callable[[Message], str], max_ratio: float
                     ) -> tuple[list[Message], list[Rejection]]:
    """Keep the replies whose arrays are well-formed and whose update norm ||w_site - w_global||
    is at most ``max_ratio`` times the median norm of the other sites' updates. The kept
    replies' arrays are replaced by their decoded float32 (and int64) buffers."""
    kept, rejected, norms = [], [], []
    for msg in replies:
        if "arrays" not in msg.content:
            rejected.append(Rejection(site_of(msg), "no arrays in the reply"))
            continue
        problem, weights, norm = decode_update(msg.content["arrays"], model, wire)
        if problem:
            rejected.append(Rejection(site_of(msg), problem))
            continue
        msg.content["arrays"] = decoded_record(weights)
        kept.append(msg)
        norms.append(norm)
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
