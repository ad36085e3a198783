"""The coordinating centre's round loop: evaluate and train, aggregate, record; resumable.

Flower's strategies do the sampling and the weighted averaging; this loop adds what a hospital
consortium needs around them: the model sent once per round (:class:`Rounds`), packed, every
update validated, replies sorted by site before aggregation (bitwise-reproducible sums),
per-site metrics keyed by site name, a checkpoint per round and resume after a crash.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import Strategy

from egcmf_model.config import Config, load_config, to_yaml
from egcmf_model.engine import build_model, seed_everything
from egcmf_model.packing import INT, Layout

from .global_model import GlobalModel
from .identity import SiteIdentity
from .lines import evaluation_part, merge, training_part
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
    network = build_model(cfg.model, classes)  # the initial model, from the run's seed
    recorder = RunRecorder(Path(settings.run_dir), cfg, classes, settings.keep_checkpoints)
    start, payload = 0, None
    if settings.resume:
        start, payload = recorder.last_round()
        recorder.truncate_metrics(start - 1)  # round `start`'s line comes with the next round
        if payload is not None:
            network.load_state_dict(payload["model"])
            recorder.event("resume", f"resuming after round {start}")
            log.info("resuming after round %d", start)
    strategy = make_strategy(strategy_options(settings))
    if payload is not None:
        restore_strategy_state(strategy, payload.get("strategy_state", {}))
    model = GlobalModel.of_state(Layout.of(network.state_dict()), network.state_dict())
    del network
    config_yaml = to_yaml(cfg)
    config = ConfigRecord({"egcmf-config": config_yaml, "wire": settings.wire,
                           "federation-id": federation_id(settings.run_dir, config_yaml)})
    rounds = Rounds(grid, settings, strategy, recorder, classes, config, model,
                    (payload or {}).get("pending"))
    seconds, done = {}, start
    for rnd in range(start + 1, settings.num_rounds + 1):
        began = time.perf_counter()
        try:
            train_s = rounds.run(rnd)
        except PrivacyBudgetExhausted as exc:
            recorder.event("privacy", f"stopping before round {rnd}: {exc}", round=rnd)
            log.warning("server-side DP budget spent; stopping before round %d", rnd)
            break
        seconds[rnd] = {"round": round(time.perf_counter() - began, 3), "site_train": train_s}
        done = rnd
    began = time.perf_counter()
    rounds.final_evaluation(done)
    recorder.finish(done)
    return recorder.write_summary(strategy=settings.strategy, min_sites=settings.min_sites,
                                  wire=settings.wire, round_seconds=seconds,
                                  final_evaluation_seconds=round(time.perf_counter() - began, 3))


def federation_id(run_dir: str, config_yaml: str) -> str:
    """Names this federation at the sites (their FedBN layers), the same after a resume."""
    text = f"{Path(run_dir).resolve()}\n{config_yaml}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Rounds:
    """The rounds of one run. Round r sends the global model of round r - 1 once to each site,
    which evaluates it and then trains on it; its reply brings both. The evaluation completes
    the metrics line of round r - 1 (the initial model's for r = 1), the training makes the
    global model of round r. The last model gets an evaluation-only message."""

    def __init__(self, grid: Grid, settings: FederationSettings, strategy: Strategy,
                 recorder: RunRecorder, classes: tuple[str, ...], config: ConfigRecord,
                 model: GlobalModel, pending: dict[str, Any] | None) -> None:
        self.grid, self.settings, self.strategy = grid, settings, strategy
        self.recorder, self.classes, self.config = recorder, classes, config
        self.model = model
        self.pending = pending  # the training part of the newest round's line

    def run(self, rnd: int) -> dict[str, float]:
        """Round ``rnd``; returns each site's training seconds."""
        config = ConfigRecord({**self.config, "evaluate": True})
        messages = self._with_model(self.strategy.configure_train(
            rnd, self.model.floats, config, self.grid))
        replies = self._replies(messages, rnd, "train")
        self._evaluated(rnd - 1, [(site_of(m), m.content.pop("evaluation"))
                                  for m in replies if "evaluation" in m.content])
        for msg in [m for m in replies if "failure" in m.content]:
            self.recorder.event("error", f"round {rnd} train: site {site_of(msg)} failed: "
                                f"{msg.content['failure']['reason']}", round=rnd)
        train = self._validated(rnd, [m for m in replies if "failure" not in m.content])
        training = training_part(train, site_of)
        self.model = self._aggregate(rnd, train)
        accountant = getattr(self.strategy, "accountant", None)
        if accountant is not None:  # server-side DP: the released model's cumulative epsilon
            training["server_epsilon"] = float(accountant.get_privacy_spent().epsilon)
        self.pending = {k: v for k, v in training.items() if k != "train_s"}
        self.recorder.save_round(rnd, self.model.state(), pending=self.pending,
                                 strategy_state=strategy_state(self.strategy))
        return training["train_s"]

    def final_evaluation(self, done: int) -> None:
        """The global model of round ``done`` (the last) evaluated on every site."""
        config = ConfigRecord({**self.config, "final-evaluation": True})
        messages = self._with_model(self.strategy.configure_evaluate(
            done, self.model.floats, config, self.grid))
        replies = self._replies(messages, done, "evaluate")
        self._evaluated(done, [(site_of(m), m.content["metrics"]) for m in replies])

    def _validated(self, rnd: int, train: list[Message]) -> list[Message]:
        """The replies whose update passes validation (decoded); the others logged."""
        s = self.settings
        train, rejected = validate_updates(train, self.model, s.wire, site_of, s.max_update_ratio)
        for r in rejected:
            log.warning("round %d: update of site %s rejected: %s", rnd, r.site, r.reason)
            self.recorder.event("rejected", f"round {rnd}: update of site {r.site} rejected: "
                                f"{r.reason}", round=rnd, site=r.site)
        return train

    def _aggregate(self, rnd: int, train: list[Message]) -> GlobalModel:
        """The validated updates aggregated by the strategy (the global model unchanged when
        fewer than ``min_sites`` are valid)."""
        s = self.settings
        ints = [m.content["arrays"].pop(INT).numpy() for m in train
                if INT in m.content["arrays"]]
        floats = None
        if len(train) >= s.min_sites:
            floats, _ = self.strategy.aggregate_train(rnd, train)
        if floats is None:
            self.recorder.event("warning", f"round {rnd}: {len(train)} valid update(s), fewer "
                                f"than min-sites={s.min_sites} or none aggregated; global model "
                                "unchanged", round=rnd)
            return self.model
        return GlobalModel.aggregated(self.model, floats, ints)

    def _evaluated(self, number: int, evaluations: list[tuple[str, Any]]) -> None:
        """Record the evaluation of the global model of round ``number`` (0: the initial)."""
        if number < 0:
            return
        evaluation = evaluation_part(evaluations, self.classes)
        if number == 0:
            self.recorder.initial = evaluation
            log.info("initial model  dice %.4f  miou %.4f  acc %.4f  loss %.4f",
                     evaluation["dice"], evaluation["miou"], evaluation["acc"],
                     evaluation["loss"])
            return
        line = merge(self.pending, evaluation)
        self.recorder.record_line(number, line)
        _log_round(number, self.settings.num_rounds, line)

    def _with_model(self, messages: Iterable[Message]) -> list[Message]:
        """The strategy's messages carrying the model in the wire's form."""
        messages = list(messages)
        for msg in messages:
            msg.content["arrays"] = self.model.wire(self.settings.wire)
        return messages

    def _replies(self, messages: list[Message], rnd: int, stage: str) -> list[Message]:
        return _replies(exchange(self.grid, messages, self.settings.timeout), rnd, stage,
                        self.recorder, self.settings)


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


def _log_round(rnd: int, total: int, line: dict[str, Any]) -> None:
    log.info("round %d/%d  dice %.4f  miou %.4f  acc %.4f  loss %.4f  sites %s", rnd, total,
             line["dice"], line["miou"], line["acc"], line["loss"], ", ".join(line["sites"]))

