"""Checks on every site's reply before it counts: one broken or malicious site must neither
wreck the shared model nor stop the round. A rejected reply is left out, with its reason.

Each rule is a small function over one part of a reply:

- :func:`record_problem` and :func:`metrics_problem`: exactly the records and metric keys of
  :mod:`fl_common.replies`, each value of its kind (what Flower's aggregation needs: one
  ArrayRecord, one MetricRecord, the same keys in every reply);
- :func:`examples_problem`: ``num-examples`` a positive integer no larger than what the centre
  knows of that site (its cap);
- :func:`dp_report_problem`: a site that reports an epsilon (DP-SGD) reports a positive noise
  multiplier;
- :func:`decode_update`: the packed buffers' names, sizes and dtypes, finite values, BatchNorm
  running variances that are not negative, weights within the float16 wire's range (float16),
  frozen weights unchanged (encoders under DP-SGD), and the update's norm per group of tensors;
- :func:`norm_limit` and :func:`site_weights`: the norm rule over a round's updates, and the
  norm-bounded averaging that clips each update to a multiple of the median norm.

Each reply is decoded once, here: its buffers are checked where they lie, without a copy; then
a float16 update is scaled (when clipped) and added to the centre's float32 model, a float32
buffer is used as it came (or clipped), into buffers the centre keeps from round to round
(:class:`Scratch`), and the result is handed on to the strategy as decoded arrays, which the
strategy reads as they are.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from egcmf_model.packing import FLOAT, Layout, Slot, kind
from fl_common.replies import (
    ARRAYS,
    CONFUSION,
    EVALUATE_METRICS,
    EVALUATE_RECORDS,
    EXAMPLES,
    FAILURE,
    METRICS,
    NOISE,
    SITE,
    SITE_WEIGHT,
    TRAIN_METRICS,
    TRAIN_RECORDS,
)
from fl_common.wire import (
    all_finite,
    decoded_record,
    largest_sum,
    squared_distance,
    to_float32,
    view,
)

from .global_model import FLOAT16_MAX, VARIANCE, GlobalModel, variance_slots

STATISTICS = ("running_mean", VARIANCE)  # BatchNorm's statistics, judged apart from weights
GROUPS = ("weights", "statistics")
COUNTS = frozenset({"steps"})  # metrics that are whole numbers (num-examples: its own check)


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
    return (records_problem(content, stage)
            or metrics_problem(content[METRICS], TRAIN_METRICS if stage == "train"
                               else EVALUATE_METRICS, num_classes)
            or (dp_report_problem(content[METRICS]) if stage == "train" else None))


def dp_report_problem(metrics: MetricRecord) -> str | None:
    """A site that reports an epsilon (it trains with DP-SGD) reports the positive, finite
    noise multiplier it trained with; anything else is a broken reply."""
    epsilon, sigma = metrics["epsilon"], metrics[NOISE]
    if isinstance(epsilon, float | int) and epsilon >= 0 and not (
            isinstance(sigma, float | int) and math.isfinite(sigma) and sigma > 0):
        return (f"metric {NOISE}: {sigma!r} from a site reporting epsilon {epsilon:g} "
                "(DP-SGD), which trains with a positive noise multiplier")
    return None


def records_problem(content: RecordDict, stage: str) -> str | None:
    """The reply's records (kinds and names) and the site's name record, its metrics left
    to :func:`metrics_problem` or :func:`evaluation_problem`."""
    kinds = _kinds(content)
    expected = {ARRAYS: "arrays", METRICS: "metrics", SITE: "config"}
    expected = {k: v for k, v in expected.items() if k in (TRAIN_RECORDS if stage == "train"
                                                           else EVALUATE_RECORDS)}
    if kinds != expected:
        return f"records {_listed(kinds)}, expected {_listed(expected)}"
    return _site_problem(content)


def failure_problem(content: RecordDict) -> str | None:
    """A training that failed after its evaluation: the failure's class and the site's name,
    nothing else."""
    kinds = _kinds(content)
    expected = {FAILURE: "config", SITE: "config"}
    if kinds != expected:
        return f"records {_listed(kinds)}, expected {_listed(expected)}"
    failure = content[FAILURE]
    if set(failure) != {"code", "reason"} or not isinstance(failure["reason"], str):
        return "the failure record must hold exactly a code and a reason"
    return _site_problem(content)


def metrics_problem(metrics: object, keys: frozenset[str], num_classes: int) -> str | None:
    """A MetricRecord with exactly ``keys``, each value of its kind, and a site weight of 1."""
    if not isinstance(metrics, MetricRecord):
        return "metrics are not a metric record"
    if set(metrics) != keys:
        return (f"metrics: missing {sorted(keys - set(metrics))}, unexpected "
                f"{sorted(set(metrics) - keys)} (does the site run another version of "
                "EGCMF-FL than the centre?)")
    for key, value in metrics.items():
        problem = (_counts_problem(value, num_classes**2) if key == CONFUSION
                   else _count_problem(value) if key in COUNTS else _scalar_problem(value))
        if problem:
            return f"metric {key}: {problem}"
    if metrics[SITE_WEIGHT] != 1:
        return f"metric {SITE_WEIGHT} is {metrics[SITE_WEIGHT]!r}, not 1"
    return None


def evaluation_problem(metrics: object, cap: int | None, num_classes: int,
                       pixels: int = 0) -> str | None:
    """An evaluation's metrics: the schema, a valid count of validation examples and, with
    ``pixels`` (labelled pixels per example), no more confusion counts than those examples
    hold, so that one site cannot outweigh the others in the pooled metrics."""
    problem = (metrics_problem(metrics, EVALUATE_METRICS, num_classes)
               or examples_problem(metrics[EXAMPLES], cap))  # type: ignore[index]
    if problem is None and pixels:
        counted, examples = sum(metrics[CONFUSION]), metrics[EXAMPLES]  # type: ignore[index]
        if counted > examples * pixels:
            problem = (f"{counted} pixels counted, more than the {examples} examples of "
                       f"{pixels} pixels hold")
    return problem


def _kinds(content: RecordDict) -> dict[str, str]:
    return {**dict.fromkeys(content.array_records, "arrays"),
            **dict.fromkeys(content.metric_records, "metrics"),
            **dict.fromkeys(content.config_records, "config")}


def _site_problem(content: RecordDict) -> str | None:
    site = content.config_records[SITE]
    if set(site) != {"name"} or not isinstance(site["name"], str):
        return "the site record must hold exactly the site's name"
    return None


def _listed(kinds: dict[str, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(kinds.items())) + "}"


def _scalar_problem(value: object) -> str | None:
    """A number (NaN allowed: an honest site evaluating a broken model reports one)."""
    return "a list where a number belongs" if isinstance(value, list) else None


def _count_problem(value: object) -> str | None:
    return None if isinstance(value, int) and value >= 0 else "not a count (an integer ≥ 0)"


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


def group_of(name: str) -> str:
    """``statistics`` (BatchNorm running means and variances) or ``weights``: each group has
    its own norm, since the statistics move far more than the weights in a round (a norm over
    both would be the statistics' alone, and would leave the weights unbounded)."""
    return "statistics" if name.endswith(STATISTICS) else "weights"


@cache
def _variances(layout: Layout) -> dict[str, tuple[tuple[int, int, str], ...]]:
    """Float buffer -> ``(start, stop, tensor name)`` of each BatchNorm running variance in it."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for slot in variance_slots(layout):
        out.setdefault(slot.buffer, []).append((slot.start, slot.stop, slot.name))
    return {k: tuple(v) for k, v in out.items()}


@cache
def _groups(layout: Layout) -> dict[str, tuple[tuple[int, int, str], ...]]:
    """Float buffer -> ``(start, stop, group)`` runs of neighbouring tensors of one group, so
    that each group's norm is summed over its own values (never as a difference of sums)."""
    out: dict[str, list[tuple[int, int, str]]] = {}
    for slot in layout.slots:
        if kind(slot.buffer) != FLOAT:
            continue
        runs, group = out.setdefault(slot.buffer, []), group_of(slot.name)
        if runs and runs[-1][2] == group and runs[-1][1] == slot.start:
            runs[-1] = (runs[-1][0], slot.stop, group)
        else:
            runs.append((slot.start, slot.stop, group))
    return {k: tuple(v) for k, v in out.items()}


def decode_update(record: ArrayRecord, model: GlobalModel, wire: str,
                  frozen: tuple[Slot, ...] = ()
                  ) -> tuple[str | None, dict[str, np.ndarray], dict[str, float]]:
    """``(problem, sent, norms)`` of a reply's arrays: its buffers' names, sizes and dtypes
    must be the layout's (float ones in the ``wire`` dtype), its values finite, the BatchNorm
    variances they give not negative, and (float16) the weights they give within what the
    float16 wire carries, so that no site can push the next global model out of its range.
    The ``frozen`` weights (encoders under DP-SGD) must come back exactly as they were sent.
    ``sent`` are the buffers as they came, without a copy (read them with
    :func:`site_weights`), ``norms`` the norm of each group of the update (``w_site -
    w_global``; in float16 the update as sent). The problem says why there are none."""
    expected = dict(model.layout.sizes)
    if set(record) != set(expected):
        missing, extra = sorted(set(expected) - set(record)), sorted(set(record) - set(expected))
        return (f"wrong arrays: {len(record)} sent, {len(expected)} expected (missing "
                f"{missing[:3]}, unexpected {extra[:3]})"), {}, {}
    variances, groups = _variances(model.layout), _groups(model.layout)
    sent, squares = {}, dict.fromkeys(GROUPS, 0.0)
    for name, size in expected.items():
        try:
            values = view(record[name])
        except ValueError as exc:  # not an array numpy can read
            return f"array {name}: {exc}", {}, {}
        dtype = wire if kind(name) == FLOAT else "int64"
        if values.shape != (size,) or values.dtype != np.dtype(dtype):
            return (f"array {name}: shape {values.shape} {values.dtype}, expected ({size},) "
                    f"{dtype}"), {}, {}
        sent[name] = values
        if kind(name) != FLOAT:
            continue
        master = model.values[name]
        parts = dict.fromkeys(GROUPS, 0.0)
        for start, stop, group in groups.get(name, ()):
            parts[group] += (squared_distance(values[start:stop]) if wire == "float16"
                             else squared_distance(values[start:stop], master[start:stop]))
        if not all(math.isfinite(p) for p in parts.values()):
            if not all_finite(values):
                return f"array {name}: holds NaN or Inf", {}, {}
            return f"array {name}: values too large for a norm (an overflow)", {}, {}
        if wire == "float16" and not largest_sum(values, master) <= FLOAT16_MAX:
            return (f"array {name}: the update takes a weight beyond what the float16 wire "
                    f"carries (65504); a federation that needs such weights runs with "
                    f"--wire float32"), {}, {}
        for slot in (f for f in frozen if f.buffer == name):
            part = values[slot.start:slot.stop]  # float16: an update; float32: the weights
            unchanged = (not part.any() if wire == "float16"
                         else np.array_equal(part, master[slot.start:slot.stop]))
            if not unchanged:
                return (f"array {name}: changes {slot.name}, which DP-SGD leaves as it is "
                        "(dp.frozen=encoders)"), {}, {}
        for start, stop, tensor in variances.get(name, ()):
            # the site's own variance: its float32 values, or what it received (the model as
            # sent in float16) plus its update; a site at 0 stays at 0, not a rounding below
            site = (values[start:stop] if wire == "float32"
                    else to_float32(view(model.wire(wire)[name])[start:stop])
                    + to_float32(values[start:stop]))
            if (site < 0).any():
                return f"array {tensor}: a negative variance ({float(site.min()):.3g})", {}, {}
        for g in GROUPS:
            squares[g] += parts[g]
    norms = {g: s**0.5 for g, s in squares.items()}
    if not all(math.isfinite(n) for n in norms.values()):
        return "the update's norm is not finite (values too large)", {}, {}
    return None, sent, norms


def norm_limit(norms: list[float], rules: UpdateRules) -> float:
    """The largest update norm the round accepts: ``max_ratio`` times the median of all the
    round's update norms (the site's own included), or of ``floor`` if that is larger. With
    one or two sites the median lies halfway to the largest norm, so nothing is rejected."""
    return rules.max_ratio * max(float(np.median(norms)), rules.floor) if norms else math.inf


class Scratch:
    """Float32 buffers for the sites' decoded weights, one per site slot and packed buffer,
    kept from round to round. A reused buffer's memory is already in place; a fresh one is
    faulted in page by page, which on a busy centre costs more than the arithmetic. A round's
    decoded replies are read only until its aggregation ends (every strategy aggregates into
    new arrays), so the next round may write over them."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[int, str], np.ndarray] = {}

    def buffer(self, slot: int, name: str, like: np.ndarray) -> np.ndarray:
        key = (slot, name)
        found = self._buffers.get(key)
        if found is None or found.shape != like.shape:
            found = self._buffers[key] = np.empty(like.shape, dtype=np.float32)
        return found


def site_weights(sent: dict[str, np.ndarray], model: GlobalModel, wire: str,
                 scales: dict[str, float], room: Callable[[str], np.ndarray] | None = None
                 ) -> dict[str, np.ndarray]:
    """The site's float32 weights from the buffers it ``sent``, each group's update scaled by
    ``scales[group]`` (at most 1; norm-bounded averaging): ``w_g + (w - w_g) * scale``, or
    ``w_g + u * scale`` for a float16 update ``u``; written into ``room(name)`` (a new buffer
    each without it), nothing where a float32 buffer arrives unscaled (its values are used as
    they came, bit for bit). The integer buffer (counters) as sent."""
    out = dict(sent)
    for name, runs in _groups(model.layout).items():
        master, values = model.values[name], sent[name]
        if wire == "float32" and all(scales[group] >= 1.0 for _, _, group in runs):
            continue
        site = np.empty_like(master) if room is None else room(name)
        if wire == "float16":
            to_float32(values, site)
        for start, stop, group in runs:
            part, scale = site[start:stop], np.float32(min(1.0, scales[group]))
            if wire == "float16":
                if scale < 1:
                    part *= scale
            elif scale >= 1:
                part[:] = values[start:stop]
            else:
                np.subtract(values[start:stop], master[start:stop], out=part)  # no temporaries
                part *= scale
                part += master[start:stop]
        if wire == "float16":
            site += master
        out[name] = site
    return out


@dataclass
class Checked:
    """A round's replies after the checks: those kept, those rejected and why, and (training)
    each kept site's update norm."""

    kept: list[Message]
    rejected: list[Rejection]
    norms: dict[str, dict[str, float]]  # site -> group -> norm of the update as sent


SiteOf = Callable[[Message], str]


def check_updates(replies: list[Message], model: GlobalModel, wire: str, site_of: SiteOf,
                  caps: dict[str, int], rules: UpdateRules, num_classes: int,
                  frozen: tuple[Slot, ...] = (), scratch: Scratch | None = None) -> Checked:
    """Training replies checked one by one, then the norm rule over the round, for each group
    of tensors; with ``rules.clip``, each group of each kept update is clipped to that multiple
    of the group's median norm (norm-bounded averaging). The kept replies' arrays are replaced
    by their decoded float32 (and int64) buffers, which lie in ``scratch`` when given (valid
    until its next round).

    The replies are decoded (and clipped) side by side, one per core: the sites wait for the
    next round meanwhile, and each reply's work reads only that reply and the centre's model."""
    names = [site_of(m) for m in replies]

    def check(msg: Message) -> tuple[str | None, dict[str, np.ndarray], dict[str, float]]:
        if names.count(site_of(msg)) > 1:
            return "more than one reply under this site's name", {}, {}
        try:
            problem = (record_problem(msg.content, "train", num_classes)
                       or examples_problem(msg.content[METRICS][EXAMPLES],
                                           caps.get(site_of(msg))))
            if problem is None:
                return decode_update(msg.content[ARRAYS], model, wire, frozen)
        except Exception as exc:  # whatever a reply holds, it never stops the round
            problem = f"unreadable reply ({type(exc).__name__}: {exc})"
        return problem, {}, {}

    with ThreadPoolExecutor(max_workers=_workers(len(replies))) as pool:
        results = list(pool.map(check, replies))  # in the replies' order
    kept, rejected, norms, sent = [], [], {}, {}
    for msg, (problem, weights, norm) in zip(replies, results, strict=True):
        site = site_of(msg)
        if problem:
            rejected.append(Rejection(site, problem))
        else:
            kept.append(msg)
            sent[site], norms[site] = weights, norm
    over = norm_rule(norms, rules)
    rejected += [Rejection(site, reason) for site, reason in over.items()]
    final = [msg for msg in kept if site_of(msg) not in over]
    norms = {site: n for site, n in norms.items() if site not in over}
    bounds = ({g: rules.clip * max(float(np.median([n[g] for n in norms.values()])),
                                   rules.floor) for g in GROUPS}
              if rules.clip > 0 and norms else {})
    scales = {site: {g: min(1.0, bounds[g] / n[g]) if bounds and n[g] > 0 else 1.0
                     for g in GROUPS} for site, n in norms.items()}
    def weights_of(slot: int, site: str) -> dict[str, np.ndarray]:
        room = None if scratch is None else (
            lambda name: scratch.buffer(slot, name, model.values[name]))
        return site_weights(sent[site], model, wire, scales[site], room)

    with ThreadPoolExecutor(max_workers=_workers(len(final))) as pool:
        weights = list(pool.map(weights_of, range(len(final)), [site_of(m) for m in final]))
    for msg, values in zip(final, weights, strict=True):
        msg.content[ARRAYS] = decoded_record(values)
    return Checked(final, rejected, norms)


def _workers(tasks: int) -> int:
    """Threads for ``tasks`` replies: at most one per core this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(tasks, cores or 1))


def norm_rule(norms: dict[str, dict[str, float]], rules: UpdateRules) -> dict[str, str]:
    """Site -> why its update is over the round's limit, for the sites whose update is."""
    limits = {g: norm_limit([n[g] for n in norms.values()], rules) for g in GROUPS}
    over = {}
    for site, norm in norms.items():
        for g in GROUPS:
            if not norm[g] <= limits[g]:  # NaN (an overflow) is over too
                over[site] = (f"update norm of the {g} {norm[g]:.3g} is over the limit "
                              f"{limits[g]:.3g} ({rules.max_ratio:g}x the median)")
                break
    return over
