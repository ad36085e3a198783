"""A round's line of ``metrics.jsonl`` from the sites' replies: the training part (loss,
examples, epsilon per site) and the evaluation part (the paper's metrics of the global model,
pooled over every site's validation pixels, and per site). The two parts of a round's line
arrive one round apart: a site evaluates a global model when it receives it, before training
on it for the next round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Message, MetricRecord

from egcmf_model.metrics import SegmentationMetrics
from fl_common.replies import NOISE


def training_part(train: list[Message], site_of: Callable[[Message], str],
                  norms: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """``{"sites": {site: {train_loss, steps, num-examples[, epsilon, noise_multiplier]
    [, update_norm]}}, "train_s": {site: s}}``; ``epsilon`` and ``noise_multiplier`` as a site
    training with DP-SGD reports them; ``update_norm``: the norm of the weights' update as the
    site sent it (before any clipping), from ``norms``."""
    sites: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}  # wall-clock, so kept out of the reproducible metrics line
    for msg in train:
        m, site = msg.content["metrics"], site_of(msg)
        sites[site] = {"train_loss": float(m["train_loss"]), "steps": int(m["steps"]),
                       "num-examples": int(m["num-examples"])}
        timings[site] = round(float(m["train_s"]), 3)
        if float(m.get("epsilon", -1.0)) >= 0:  # sites training with DP-SGD
            sites[site]["epsilon"] = float(m["epsilon"])
            sites[site][NOISE] = float(m[NOISE])
        if "weights" in (norms or {}).get(site, {}):
            sites[site]["update_norm"] = round(norms[site]["weights"], 6)
    return {"sites": dict(sorted(sites.items())), "train_s": dict(sorted(timings.items()))}


def latest(lines: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Each site's newest value of ``key`` over metrics lines, for the sites that reported it
    (a site that did not train in the last round keeps its earlier value)."""
    return {site: v[key] for line in lines for site, v in line["sites"].items() if key in v}


def evaluation_part(evaluations: list[tuple[str, MetricRecord]], classes: tuple[str, ...]
                    ) -> dict[str, Any]:
    """Pooled ``dice``, ``miou``, ``acc``, ``loss`` and each site's own, from ``(site,
    metrics)`` pairs of the sites that evaluated the model."""
    sites: dict[str, dict[str, Any]] = {}
    pooled = SegmentationMetrics(classes)
    loss_sum, n_sum, k = 0.0, 0, len(classes)
    for site, m in evaluations:
        sites[site] = {key: float(m[key]) for key in ("dice", "miou", "acc", "loss")}
        sites[site]["val-examples"] = int(m["num-examples"])
        pooled.confusion += np.asarray(m["confusion"], np.int64).reshape(k, k)
        loss_sum += float(m["loss"]) * int(m["num-examples"])
        n_sum += int(m["num-examples"])
    agg = pooled.aggregate()
    return {"dice": agg["dice"], "miou": agg["miou"], "acc": agg["acc"],
            "loss": loss_sum / n_sum if n_sum else float("nan"),
            "sites": dict(sorted(sites.items()))}


def merge(training: dict[str, Any] | None, evaluation: dict[str, Any]) -> dict[str, Any]:
    """A round's line: the evaluation of its global model, each site's training entries added
    (``training`` is None for the initial model, which nobody trained)."""
    line = {k: v for k, v in evaluation.items() if k != "sites"}
    sites = {site: dict(v) for site, v in evaluation["sites"].items()}
    for key, value in (training or {}).items():
        if key == "sites":
            for site, entry in value.items():
                sites.setdefault(site, {}).update(entry)
        elif key != "train_s":
            line[key] = value  # server_epsilon
    line["sites"] = dict(sorted(sites.items()))
    return line
