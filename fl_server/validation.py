"""Checks on every site's reply before it counts: one broken or malicious site must neither
wreck the shared model nor stop the round. A rejected reply is left out, with its reason.

Each rule is a small function over one part of a reply, so that another wire format only
changes how a reply is unpacked:

- :func:`record_problem`: exactly the records and metric keys of :mod:`fl_common.replies`, each
  value of its kind (what Flower's aggregation needs: one ArrayRecord, one MetricRecord, the
  same keys in every reply);
- :func:`array_problem`: the arrays' names, shapes, dtypes, finite values, and BatchNorm running
  variances that are not negative;
- :func:`examples_problem`: ``num-examples`` a positive integer no larger than what the centre
  knows of that site (its cap);
- :func:`norm_limit` and :func:`bounded`: the norm rule over a round's updates, and the
  norm-bounded averaging that clips each update to the median norm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fl_common.replies import (
    ARRAYS,
    CONFUSION,
    EVALUATE_METRICS,
    EVALUATE_RECORDS,
    EXAMPLES,
    METRICS,
    SITE,
    SITE_WEIGHT,
    TRAIN_METRICS,
    TRAIN_RECORDS,
)

Arrays = dict[str, np.ndarray]
VARIANCE = "running_var"  # BatchNorm's running variance: never negative in an honest model


@dataclass(frozen=True)
class Rejection:
    site: str
    reason: str


@dataclass(frozen=True)
class UpdateRules:
    """How a round's updates are judged (the settings ``max-update-ratio``, ``norm-floor`` and
    ``norm-clip``)."""

    max_ratio: float
    floor: float = 0.0  # the norm rule never compares with a median below this norm
    clip: float = 0.0  # > 0: clip every update to this x the median norm before averaging


def record_problem(content: RecordDict, stage: str, num_classes: int) -> str | None:
    """The reply's records and metrics against the schema of a ``stage`` (train or evaluate)
    reply; None if they match."""
    train = stage == "train"
    kinds = {**dict.fromkeys(content.array_records, "arrays"),
             **dict.fromkeys(content.metric_records, "metrics"),
             **dict.fromkeys(content.config_records, "config")}
    expected = {ARRAYS: "arrays", METRICS: "metrics", SITE: "config"}
    expected = {k: v for k, v in expected.items() if k in (TRAIN_RECORDS if train
                                                           else EVALUATE_RECORDS)}
    if kinds != expected:
        return f"records {_listed(kinds)}, expected {_listed(expected)}"
    site = content.config_records[SITE]
    if set(site) != {"name"} or not isinstance(site["name"], str):
        return "the site record must hold exactly the site's name"
    metrics = content.metric_records[METRICS]
    keys = TRAIN_METRICS if train else EVALUATE_METRICS
    if set(metrics) != keys:
        return (f"metrics: missing {sorted(keys - set(metrics))}, unexpected "
                f"{sorted(set(metrics) - keys)}")
    for key, value in metrics.items():
        problem = (_counts_problem(value, num_classes**2) if key == CONFUSION
                   else _scalar_problem(value))
        if problem:
            return f"metric {key}: {problem}"
    if metrics[SITE_WEIGHT] != 1:
        return f"metric {SITE_WEIGHT} is {metrics[SITE_WEIGHT]!r}, not 1"
    return None


def _listed(kinds: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + "}"


def _scalar_problem(value: object) -> str | None:
    """A number (NaN allowed: an honest site evaluating a broken model reports one)."""
    return "a list where a number belongs" if isinstance(value, list) else None


def _counts_problem(value: object, length: int) -> str | None:
    if not isinstance(value, list) or len(value) != length:
        return f"expected a list of {length} counts"
    if not all(isinstance(v, int) and v >= 0 for v in value):
        return "counts must be non-negative integers"
    return None


def examples_problem(value: object, cap: int | None) -> str | None:
    """``num-examples`` must be a positive integer, and at most ``cap`` (None: no cap known)."""
    if not isinstance(value, int) or value < 1:
        return f"{EXAMPLES} {value!r} is not a positive integer"
    if cap is not None and value > cap:
        return f"{EXAMPLES} {value} is more than the {cap} this site holds"
    return None


def array_problem(arrays: Arrays, reference: Arrays) -> str | None:
    """Wrong number or names of arrays, wrong shapes or dtypes, NaN or Inf, a negative BatchNorm
    running variance; None if fine."""
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
        if key.endswith(VARIANCE) and (got < 0).any():
            return f"array {key}: a negative variance ({float(got.min()):.3g})"
    return None


STATISTICS = ("running_mean", VARIANCE)  # BatchNorm's statistics, judged apart from weights


def group_of(key: str) -> str:
    """``statistics`` (BatchNorm running means and variances) or ``weights``: each group has
    its own norm, since the statistics move far more than the weights in a round (a norm over
    both would be the statistics' alone, and would leave the weights unbounded)."""
    return "statistics" if key.endswith(STATISTICS) else "weights"


def without_negative_variances(arrays: ArrayRecord) -> tuple[ArrayRecord, int]:
    """The global model with BatchNorm running variances below 0 raised to 0, and how many
    there were. An average of valid updates has none; server-side DP noise can make some
    (raising them is post-processing, which spends no privacy). Left negative, they would make
    every evaluation NaN and every site's next update fail :func:`array_problem`."""
    state = {k: v.numpy() for k, v in arrays.items()}
    count = sum(int((v < 0).sum()) for k, v in state.items() if k.endswith(VARIANCE))
    if not count:
        return arrays, 0
    return ArrayRecord({k: Array(np.maximum(v, 0).astype(v.dtype) if k.endswith(VARIANCE)
                                 else v) for k, v in state.items()}), count


def update_norms(arrays: Arrays, reference: Arrays) -> dict[str, float]:
    """``||w_site - w_global||`` of each group over the floating-point arrays."""
    totals: dict[str, float] = {}
    for key, ref in reference.items():
        if np.issubdtype(ref.dtype, np.floating):
            diff = arrays[key].astype(np.float64) - ref
            group = group_of(key)
            totals[group] = totals.get(group, 0.0) + float(np.vdot(diff, diff))
    return {group: total**0.5 for group, total in totals.items()}


def norm_limit(norms: list[float], rules: UpdateRules) -> float:
    """The largest update norm the round accepts: ``max_ratio`` times the median of all the
    round's update norms (the site's own included), or of ``floor`` if that is larger. With
    one or two sites the median lies halfway to the largest norm, so nothing is rejected."""
    return rules.max_ratio * max(float(np.median(norms)), rules.floor) if norms else math.inf


def bounded(arrays: Arrays, reference: Arrays, norms: dict[str, float],
            bounds: dict[str, float]) -> Arrays:
    """Each group of the update scaled to its bound when it is longer:
    ``w_g + (w - w_g) * bound/norm``; integer arrays (counters) as sent."""
    scales = {g: min(1.0, bounds[g] / n) if n > 0 else 1.0 for g, n in norms.items()}
    out = {}
    for key, ref in reference.items():
        scale = scales.get(group_of(key), 1.0)
        if scale < 1.0 and np.issubdtype(ref.dtype, np.floating):
            out[key] = (ref + (arrays[key].astype(np.float64) - ref) * scale).astype(ref.dtype)
        else:
            out[key] = arrays[key]
    return out


@dataclass
class Checked:
    """A round's replies after the checks: those kept, those rejected and why, and (training)
    each kept site's update norm."""

    kept: list[Message]
    rejected: list[Rejection]
    norms: dict[str, dict[str, float]]  # site -> group -> norm of the update as sent


SiteOf = Callable[[Message], str]


def check_evaluations(replies: list[Message], site_of: SiteOf, caps: dict[str, int],
                      num_classes: int) -> Checked:
    """Evaluation replies with the expected records and metrics, and a valid count."""
    kept, rejected = [], []
    for msg in replies:
        problem = record_problem(msg.content, "evaluate", num_classes)
        if problem is None:
            problem = examples_problem(msg.content[METRICS][EXAMPLES], caps.get(site_of(msg)))
        if problem:
            rejected.append(Rejection(site_of(msg), problem))
        else:
            kept.append(msg)
    return Checked(kept, rejected, {})


def check_updates(replies: list[Message], reference: ArrayRecord, site_of: SiteOf,
                  caps: dict[str, int], rules: UpdateRules, num_classes: int) -> Checked:
    """Training replies checked one by one, then the norm rule over the round, for each group
    of arrays; with ``rules.clip``, each group of each kept update is clipped to that multiple
    of the group's median norm (norm-bounded averaging)."""
    ref = {k: v.numpy() for k, v in reference.items()}
    kept, rejected, norms, sent = [], [], {}, {}
    for msg in replies:
        site = site_of(msg)
        problem = record_problem(msg.content, "train", num_classes)
        if problem is None:
            problem = examples_problem(msg.content[METRICS][EXAMPLES], caps.get(site))
        if problem is None:
            sent[site] = {k: v.numpy() for k, v in msg.content[ARRAYS].items()}
            problem = array_problem(sent[site], ref)
        if problem:
            rejected.append(Rejection(site, problem))
        else:
            kept.append(msg)
            norms[site] = update_norms(sent[site], ref)
    over = norm_rule(norms, rules)
    rejected += [Rejection(site, reason) for site, reason in over.items()]
    final = [msg for msg in kept if site_of(msg) not in over]
    norms = {site: n for site, n in norms.items() if site not in over}
    if rules.clip > 0 and final:
        bounds = {g: rules.clip * max(float(np.median([n[g] for n in norms.values()])),
                                      rules.floor) for g in next(iter(norms.values()))}
        for msg in final:
            arrays = bounded(sent[site_of(msg)], ref, norms[site_of(msg)], bounds)
            msg.content[ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})
    return Checked(final, rejected, norms)


def norm_rule(norms: dict[str, dict[str, float]], rules: UpdateRules) -> dict[str, str]:
    """Site -> why its update is over the round's limit, for the sites whose update is."""
    groups = sorted({g for n in norms.values() for g in n})
    limits = {g: norm_limit([n[g] for n in norms.values()], rules) for g in groups}
    over = {}
    for site, norm in norms.items():
        for g in groups:
            if norm[g] > limits[g]:
                over[site] = (f"update norm of the {g} {norm[g]:.3g} is over the limit "
                              f"{limits[g]:.3g} ({rules.max_ratio:g}x the median)")
                break
    return over
