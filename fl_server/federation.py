"""The coordinating centre's round loop: train, aggregate, evaluate, record; resumable.

Flower's strategies do the sampling and the weighted averaging; this loop adds what a hospital
consortium needs around them: replies sorted by site before aggregation (bitwise-reproducible
sums), per-site metrics keyed by site name, a checkpoint per round and resume after a crash.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from egcmf_model.config import Config, load_config, to_yaml
from egcmf_model.engine import build_model, seed_everything
from egcmf_model.metrics import SegmentationMetrics

from .identity import SiteIdentity
from .recorder import RunRecorder
from .settings import FederationSettings
from .strategy import (
    StrategyOptions,
    make_strategy,
    restore_strategy_state,
    strategy_state,
)
from .validation import validate_updates

log = logging.getLogger(__name__)
REPLY_POLL = 0.2  # seconds between asking the SuperLink for replies


def strategy_options(settings: FederationSettings) -> StrategyOptions:
    s = settings
    return StrategyOptions(s.strategy, s.min_sites, s.proximal_mu, s.trim_fraction, s.krum_f,
                           s.server_lr, s.sites or s.min_sites, s.server_dp_noise,
                           s.server_dp_clip, s.server_dp_epsilon, s.server_dp_delta)


def seed_server(cfg: Config, simulation: bool) -> None:
    """Seed the initial model from the run's seed. Outside a simulation, server-side DP noise
    (Flower draws it from numpy's global generator) then comes from the OS's entropy, so
    nobody who knows the seed can replay it."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    if not simulation:
        np.random.seed()  # no argument: fresh entropy from the operating system


def run_federation(grid: Grid, settings: FederationSettings) -> dict[str, Any]:
    cfg = load_config(path=settings.config_file or None)
    classes = tuple(cfg.data.classes)
    seed_server(cfg, settings.simulation)
    model = build_model(cfg.model, classes)
    recorder = RunRecorder(Path(settings.run_dir), cfg, classes, settings.keep_checkpoints)
    start, payload = 0, None
    if settings.resume:
        start, payload = recorder.last_round()
        recorder.truncate_metrics(start)
        if payload is not None:
            model.load_state_dict(payload["model"])
            recorder.event("resume", f"resuming after round {start}")
            log.info("resuming after round %d", start)
    strategy = make_strategy(strategy_options(settings))
    if payload is not None:
        restore_strategy_state(strategy, payload.get("strategy_state", {}))
    arrays = ArrayRecord(model.state_dict())
    config_yaml = to_yaml(cfg)
    config = ConfigRecord({"egcmf-config": config_yaml,
                           "federation-id": federation_id(settings.run_dir, config_yaml)})
    if start == 0:  # the initial model on every site: the baseline that training must beat
        initial = _round_line([], _evaluate(grid, strategy, 0, arrays, config, settings,
                                            recorder), classes)
        initial.pop("train_s")
        recorder.initial = initial
        log.info("initial model  dice %.4f  miou %.4f  acc %.4f  loss %.4f", initial["dice"],
                 initial["miou"], initial["acc"], initial["loss"])
    seconds, done = {}, start
    for rnd in range(start + 1, settings.num_rounds + 1):
        began = time.perf_counter()
        try:
            arrays, line = run_round(grid, strategy, rnd, arrays, config, settings, recorder,
                                     classes)
        except PrivacyBudgetExhausted as exc:
            recorder.event("privacy", f"stopping before round {rnd}: {exc}", round=rnd)
            log.warning("server-side DP budget spent; stopping before round %d", rnd)
            break
        accountant = getattr(strategy, "accountant", None)
        if accountant is not None:  # server-side DP: the released model's cumulative epsilon
            line["server_epsilon"] = float(accountant.get_privacy_spent().epsilon)
        train_s = line.pop("train_s")
        model.load_state_dict(arrays.to_torch_state_dict())
        arrays = ArrayRecord(model.state_dict())  # back to the network's dtypes (int counters)
        state = {k: v.clone() for k, v in model.state_dict().items()}  # written in background
        recorder.record_round(rnd, state, line, strategy_state=strategy_state(strategy))
        done = rnd
        seconds[rnd] = {"round": round(time.perf_counter() - began, 3), "site_train": train_s}
        _log_round(rnd, settings.num_rounds, line)
    recorder.finish(done)
    return recorder.write_summary(strategy=settings.strategy, min_sites=settings.min_sites,
                                  round_seconds=seconds)


def federation_id(run_dir: str, config_yaml: str) -> str:
    """Names this federation at the sites (their FedBN layers), the same after a resume."""
    text = f"{Path(run_dir).resolve()}\n{config_yaml}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_round(grid: Grid, strategy: Strategy, rnd: int, arrays: ArrayRecord,
              config: ConfigRecord, settings: FederationSettings, recorder: RunRecorder,
              classes: tuple[str, ...]) -> tuple[ArrayRecord, dict[str, Any]]:
    """One round: local training, aggregation, then evaluation of the new global model."""
    messages = strategy.configure_train(rnd, arrays, config, grid)
    train = _replies(exchange(grid, messages, settings.timeout), rnd, "train", recorder,
                     settings)
    train, rejected = validate_updates(train, arrays, site_of, settings.max_update_ratio)
    for r in rejected:
        log.warning("round %d: update of site %s rejected: %s", rnd, r.site, r.reason)
        recorder.event("rejected", f"round {rnd}: update of site {r.site} rejected: {r.reason}",
                       round=rnd, site=r.site)
    new_arrays = None
    if len(train) >= settings.min_sites:
        new_arrays, _ = strategy.aggregate_train(rnd, train)
    if new_arrays is None:
        recorder.event("warning", f"round {rnd}: {len(train)} valid update(s), fewer than "
                       f"min-sites={settings.min_sites} or none aggregated; global model "
                       "unchanged", round=rnd)
        new_arrays = arrays
    evaluation = _evaluate(grid, strategy, rnd, new_arrays, config, settings, recorder)
    strategy.aggregate_evaluate(rnd, evaluation)
    return new_arrays, _round_line(train, evaluation, classes)


def _evaluate(grid: Grid, strategy: Strategy, rnd: int, arrays: ArrayRecord,
              config: ConfigRecord, settings: FederationSettings, recorder: RunRecorder
              ) -> list[Message]:
    """The global model ``arrays`` evaluated on the sites' validation splits."""
    return _replies(exchange(grid, strategy.configure_evaluate(rnd, arrays, config, grid),
                             settings.timeout), rnd, "evaluate", recorder, settings)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
    """Flower's ``send_and_receive``, asking for replies every ``REPLY_POLL`` seconds (Flower's
    own asks every 3 s, which a round would wait for twice)."""
    waiting = set(grid.push_messages(messages))
    deadline, replies = time.monotonic() + timeout, []
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {msg.metadata.reply_to_message_id for msg in got}
        if waiting:
            time.sleep(REPLY_POLL)
    return replies


def site_of(msg: Message) -> str:
    """The site's name as its reply states it; :func:`_replies` keeps only replies whose name
    is the one registered with their node's key (deployment)."""
    if "site" in msg.content:
        return str(msg.content["site"]["name"])
    return f"node-{msg.metadata.src_node_id}"


def _replies(replies: Any, rnd: int, stage: str, recorder: RunRecorder,
             settings: FederationSettings) -> list[Message]:
    """Successful replies from sites that are who they say, sorted by site name; failures and
    impostors go to events.jsonl."""
    identity, good = SiteIdentity(settings.node_sites()), []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():
            recorder.event("error", f"round {rnd} {stage}: {identity.describe(node)} failed: "
                           f"{msg.error.reason}", round=rnd)
            continue
        problem = identity.check(node, site_of(msg) if "site" in msg.content else None)
        if problem is None:
            good.append(msg)
            continue
        log.warning("round %d %s: %s", rnd, stage, problem.message)
        recorder.event("identity", f"round {rnd} {stage}: {problem.message}", round=rnd,
                       node=node, registered=problem.registered, claimed=problem.claimed)
    return sorted(good, key=site_of)


def _round_line(train: list[Message], evaluation: list[Message], classes: tuple[str, ...]
                ) -> dict[str, Any]:
    sites: dict[str, dict[str, Any]] = {}
    timings: dict[str, float] = {}  # wall-clock, so kept out of the reproducible metrics line
    for msg in train:
        m = msg.content["metrics"]
        entry = sites.setdefault(site_of(msg), {})
        entry.update({"train_loss": float(m["train_loss"]), "num-examples": int(m["num-examples"])})
        timings[site_of(msg)] = round(float(m["train_s"]), 3)
        if float(m.get("epsilon", -1.0)) >= 0:  # sites training with DP-SGD
            entry["epsilon"] = float(m["epsilon"])
    pooled = SegmentationMetrics(classes)
    loss_sum, n_sum = 0.0, 0
    for msg in evaluation:
        m = msg.content["metrics"]
        entry = sites.setdefault(site_of(msg), {})
        entry.update({k: float(m[k]) for k in ("dice", "miou", "acc", "loss")})
        entry["val-examples"] = int(m["num-examples"])
        k = len(classes)
        pooled.confusion += np.asarray(m["confusion"], np.int64).reshape(k, k)
        loss_sum += float(m["loss"]) * int(m["num-examples"])
        n_sum += int(m["num-examples"])
    agg = pooled.aggregate()
    return {"dice": agg["dice"], "miou": agg["miou"], "acc": agg["acc"],
            "loss": loss_sum / n_sum if n_sum else float("nan"),
            "sites": dict(sorted(sites.items())), "train_s": dict(sorted(timings.items()))}


def _log_round(rnd: int, total: int, line: dict[str, Any]) -> None:
    log.info("round %d/%d  dice %.4f  miou %.4f  acc %.4f  loss %.4f  sites %s", rnd, total,
             line["dice"], line["miou"], line["acc"], line["loss"], ", ".join(line["sites"]))

