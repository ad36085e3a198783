"""The coordinating centre's round loop: evaluate and train, aggregate, record; resumable.

Flower's strategies do the sampling and the weighted averaging; this loop adds what a hospital
consortium needs around them: the model sent once per round (:class:`Rounds`), packed, every
update validated, replies sorted by site before aggregation (bitwise-reproducible sums),
per-site metrics keyed by site name, a checkpoint per round and resume after a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.exception import (
    AggregationError,
    InconsistentMessageReplies,
    PrivacyBudgetExhausted,
)
from flwr.serverapp.strategy import Strategy

from egcmf_model.config import Config, load_config, to_yaml
from egcmf_model.engine import build_model, frozen_parameters, load_encoders, seed_everything
from egcmf_model.packing import INT, Layout, Slot
from fl_common import VERSION_KEY, package_version
from fl_common.replies import EVALUATION, FAILURE, METRICS, SITE
from fl_common.text import printable

from .global_model import GlobalModel, slots_named
from .identity import SiteIdentity
from .lines import evaluation_part, merge, training_part
from .recorder import RunRecorder, sites_of
from .settings import RUN_DEFINING, FederationSettings, run_config_key
from .strategy import (
    StrategyOptions,
    make_strategy,
    protection_problem,
    restore_strategy_state,
    strategy_state,
)
from .validation import (
    Rejection,
    Scratch,
    UpdateRules,
    check_updates,
    evaluation_problem,
    failure_problem,
    records_problem,
)

log = logging.getLogger(__name__)
REPLY_POLL = 0.2  # seconds between asking the SuperLink for replies


def strategy_options(settings: FederationSettings) -> StrategyOptions:
    s = settings
    return StrategyOptions(s.strategy, s.min_sites, s.proximal_mu, s.trim_fraction, s.krum_f,
                           s.server_lr, s.federation_size(), s.server_dp_noise,
                           s.server_dp_clip, s.server_dp_epsilon, s.server_dp_delta)


def update_rules(settings: FederationSettings) -> UpdateRules:
    """The norm rule's settings; no median clipping under server-side DP, whose fixed clipping
    bounds every update (a bound that depends on the other sites would break its accounting)."""
    clip = 0.0 if settings.server_dp_noise > 0 else settings.norm_clip
    return UpdateRules(settings.max_update_ratio, settings.norm_floor, clip)


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
    problem = protection_problem(settings.strategy, settings.federation_size(),
                                 settings.trim_fraction, settings.krum_f)
    if problem:
        raise ValueError(problem)
    # the initial model, from the run's seed; a resumed run's comes from its checkpoint, so
    # model.weights is read only for a run that has none yet
    network = build_model(dataclasses.replace(cfg.model, weights=""), classes)
    recorder = RunRecorder(Path(settings.run_dir), cfg, classes, settings.keep_checkpoints)
    recorder.settings, recorder.wire = saved_settings(settings), settings.wire
    start, payload = _resume(recorder, network, settings, cfg) if settings.resume else (0, None)
    if payload is None and cfg.model.weights:
        load_encoders(network, cfg.model.weights)
    strategy = make_strategy(strategy_options(settings))
    if payload is not None:
        restore_strategy_state(strategy, payload.get("strategy_state", {}))
    layout = Layout.of(network.state_dict())
    model = GlobalModel.of_state(layout, network.state_dict())
    frozen = slots_named(layout, frozen_parameters(network, cfg.dp))
    del network
    config_yaml = to_yaml(cfg)
    config = ConfigRecord({"egcmf-config": config_yaml, "wire": settings.wire,
                           VERSION_KEY: package_version(),
                           "federation-id": federation_id(settings.run_dir, config_yaml),
                           "num-rounds": settings.num_rounds})  # places rounds on the LR schedule
    rounds = Rounds(grid, settings, strategy, recorder, classes, config, model,
                    (payload or {}).get("pending"), cfg.model.in_size**2, frozen)
    seconds, done, stopped = {}, start, {}
    for rnd in range(start + 1, settings.num_rounds + 1):
        began = time.perf_counter()
        try:
            train_s = rounds.run(rnd)
        except PrivacyBudgetExhausted as exc:
            recorder.event("privacy", f"stopping before round {rnd}: {exc}", round=rnd)
            log.warning("server-side DP budget spent; stopping before round %d", rnd)
            stopped = {"stopped": f"the server-side DP budget was spent before round {rnd}"}
            break
        seconds[rnd] = {"round": round(time.perf_counter() - began, 3), "site_train": train_s}
        done = rnd
    began = time.perf_counter()
    rounds.final_evaluation(done)
    recorder.finish(done)
    return recorder.write_summary(strategy=settings.strategy, min_sites=settings.min_sites,
                                  wire=settings.wire, round_seconds=seconds,
                                  final_evaluation_seconds=round(time.perf_counter() - began, 3),
                                  **stopped)


def saved_settings(settings: FederationSettings) -> dict[str, Any]:
    """The settings a resumed run must keep (kebab-case), saved in every checkpoint."""
    return {run_config_key(name): getattr(settings, name) for name in RUN_DEFINING}


def _resume(recorder: RunRecorder, network: torch.nn.Module, settings: FederationSettings,
            cfg: Config) -> tuple[int, dict[str, Any] | None]:
    """The last checkpointed round and its checkpoint, loaded into ``network`` (0, None if
    none); a larger number of rounds than the checkpoint's is recorded."""
    start, payload = recorder.last_round()
    recorder.reopen()  # round `start`'s line comes again with the next round
    if payload is None:
        return 0, None
    network.load_state_dict(payload["model"])
    recorder.event("resume", f"resuming after round {start}")
    log.info("resuming after round %d", start)
    before = payload.get("wire")
    if before and before != settings.wire:
        recorder.event("wire", f"the model travels in {settings.wire} from round {start + 1}; "
                       f"rounds 1-{start} ran in {before}", previous=before, wire=settings.wire)
        log.warning("the wire changes at resume: %s until round %d, %s from now on", before,
                    start, settings.wire)
    planned = int(payload.get("settings", {}).get("num-rounds", settings.num_rounds))
    if settings.num_rounds > planned:
        plan = (f"; the DP plan keeps its {cfg.dp.planned_rounds} planned rounds"
                if cfg.dp.enabled else "")
        recorder.event("rounds", f"rounds raised from {planned} to {settings.num_rounds} at "
                       f"resume{plan}", previous=planned, rounds=settings.num_rounds)
    return start, payload


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
                 model: GlobalModel, pending: dict[str, Any] | None, pixels: int = 0,
                 frozen: tuple[Slot, ...] = ()) -> None:
        self.grid, self.settings, self.strategy = grid, settings, strategy
        self.recorder, self.classes, self.config = recorder, classes, config
        self.model = model
        self.pending = pending  # the training part of the newest round's line
        self.pixels = pixels  # labelled pixels per validation example (0: unknown)
        self.frozen = frozen  # weights no site trains (encoders frozen under DP-SGD)
        self.scratch = Scratch()  # the sites' decoded weights, reused from round to round

    def run(self, rnd: int) -> dict[str, float]:
        """Round ``rnd``; returns each site's training seconds."""
        self.recorder.check_writes()  # the last round's checkpoint may have failed by now
        config = ConfigRecord({**self.config, "evaluate": True})
        messages = self._with_model(self.strategy.configure_train(
            rnd, self.model.floats, config, self.grid))
        replies = self._replies(messages, rnd, "train")
        self._evaluated(rnd - 1, [(site_of(m), m.content.pop(EVALUATION)) for m in replies
                                  if EVALUATION in m.content and _claimed_name(m) is not None])
        failed = [m for m in replies if FAILURE in m.content]
        self._failures(rnd, failed)
        s = self.settings
        checked = check_updates([m for m in replies if FAILURE not in m.content], self.model,
                                s.wire, site_of, s.caps("train"), update_rules(s),
                                len(self.classes), self.frozen, self.scratch)
        self._rejected(rnd, "update", checked.rejected)
        training = training_part(checked.kept, site_of, checked.norms)
        self.model = self._aggregate(rnd, checked.kept, len(messages))
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
        good, rejected = [], []
        for msg in replies:
            problem = records_problem(msg.content, "evaluate")  # the metrics: _evaluated
            if problem:
                rejected.append(Rejection(site_of(msg), problem))
            else:
                good.append((site_of(msg), msg.content[METRICS]))
        self._rejected(done, "evaluation", rejected)
        self._evaluated(done, good)

    def _failures(self, rnd: int, failed: list[Message]) -> None:
        """Sites whose training failed after their evaluation: the class of failure logged."""
        for msg in failed:
            problem = failure_problem(msg.content)
            reason = (f"an unreadable failure reply ({problem})" if problem
                      else msg.content[FAILURE]["reason"])
            self.recorder.event("error", f"round {rnd} train: site {site_of(msg)} failed: "
                                f"{reason}", round=rnd)

    def _rejected(self, rnd: int, what: str, rejected: list[Rejection]) -> None:
        for r in rejected:  # the reason may quote the reply's own keys and values
            message = printable(f"round {rnd}: {what} of site {r.site} rejected: {r.reason}")
            log.warning("%s", message)
            self.recorder.event("rejected", message, round=rnd, site=printable(r.site))

    def _aggregate(self, rnd: int, updates: list[Message], sampled: int) -> GlobalModel:
        """The strategy's aggregate of the valid updates; the global model unchanged (logged)
        when there is none."""
        s = self.settings
        problem = protection_problem(s.strategy, len(updates), s.trim_fraction, s.krum_f)
        if problem and updates:
            log.warning("round %d: %s", rnd, problem)
            self.recorder.event("protection", f"round {rnd}: {problem}", round=rnd)
        ints = [m.content["arrays"].pop(INT).numpy() for m in updates
                if INT in m.content["arrays"]]
        floats = self._strategy_aggregate(rnd, updates, sampled)
        if floats is None:
            return self.model
        model = GlobalModel.aggregated(self.model, floats, ints)
        model, raised = model.without_negative_variances()
        if raised:
            log.info("round %d: %d BatchNorm running variance(s) below 0 after aggregation "
                     "raised to 0", rnd, raised)
        # a site that changes them is rejected (check_updates); server-side DP noise is not
        return model.keeping(self.model, self.frozen)

    def _strategy_aggregate(self, rnd: int, updates: list[Message], sampled: int) -> Any:
        """The strategy's float buffers for the round, or None (logged) when there are none;
        nothing a site sends raises out of here."""
        s, event = self.settings, self.recorder.event
        server_dp = s.server_dp_noise > 0
        if not server_dp and len(updates) < s.min_sites:
            event("warning", f"round {rnd}: {len(updates)} valid update(s), fewer than "
                  f"min-sites={s.min_sites}; global model unchanged", round=rnd)
            return None
        try:  # server-side DP: always called, so that Flower settles the round's privacy event
            floats, _ = self.strategy.aggregate_train(rnd, updates)
        except (InconsistentMessageReplies, AggregationError) as exc:
            event("warning", f"round {rnd}: aggregation failed ({exc}); global model "
                  "unchanged", round=rnd)
            return None
        except ZeroDivisionError:  # Flower 1.42's server-side clipping of an update of norm 0
            event("warning", f"round {rnd}: a site sent the global model back unchanged, "
                  "which Flower's server-side DP clipping cannot divide by; round skipped: "
                  "global model unchanged, no privacy spent", round=rnd)
            return None
        if floats is None and server_dp:
            message = (f"round {rnd}: {len(updates)} valid update(s) of the {sampled} sites "
                       "sampled; server-side DP averages only complete rounds, so Flower "
                       "skipped this round's aggregation: global model unchanged, no privacy "
                       "spent")
            log.warning(message)
            event("server-dp-skipped", message, round=rnd, valid=len(updates), sampled=sampled)
        elif floats is None:
            event("warning", f"round {rnd}: nothing aggregated; global model unchanged",
                  round=rnd)
        return floats

    def _evaluated(self, number: int, evaluations: list[tuple[str, Any]]) -> None:
        """Record the evaluation of the global model of round ``number`` (0: the initial);
        evaluations that fail the checks are left out."""
        if number < 0:
            return
        caps, good, rejected = self.settings.caps("evaluate"), [], []
        for site, metrics in evaluations:
            problem = evaluation_problem(metrics, caps.get(site), len(self.classes),
                                         self.pixels)
            if problem:
                rejected.append(Rejection(site, problem))
            else:
                good.append((site, metrics))
        self._rejected(max(number, 0), "evaluation", rejected)
        evaluation = evaluation_part(good, self.classes)
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
        replies, sent_to = exchange(self.grid, messages, self.settings.timeout)
        return _replies(replies, sent_to, rnd, stage, self.recorder, self.settings)


def exchange(grid: Grid, messages: Iterable[Message], timeout: float
             ) -> tuple[list[Message], dict[str, int]]:
    """Flower's ``send_and_receive``, asking for replies every ``REPLY_POLL`` seconds (Flower's
    own asks every 3 s, which a round would wait for twice). Also returns the node each message
    went to, by message id: an error that the SuperLink answers for a node that went away comes
    from the SuperLink's own node id, not the site's."""
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    sent_to = {mid: msg.metadata.dst_node_id for mid, msg in zip(ids, messages, strict=True)}
    waiting, deadline, replies = set(ids), time.monotonic() + timeout, []
    while waiting and time.monotonic() < deadline:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {msg.metadata.reply_to_message_id for msg in got}
        if waiting:
            time.sleep(REPLY_POLL)
    return replies, sent_to


def site_of(msg: Message) -> str:
    """The site's name as its reply states it (``node-<id>`` if it states none);
    :func:`_replies` keeps only replies whose name is the one registered with their node's key
    (deployment)."""
    name = _claimed_name(msg)
    return name if name is not None else f"node-{msg.metadata.src_node_id}"


def _claimed_name(msg: Message) -> str | None:
    record = msg.content.config_records.get(SITE)
    name = record.get("name") if record is not None else None
    return name if isinstance(name, str) else None


def _replies(replies: Any, sent_to: dict[str, int], rnd: int, stage: str,
             recorder: RunRecorder, settings: FederationSettings) -> list[Message]:
    """Successful replies from sites that are who they say, one per name, sorted by site name;
    failures, impostors and names claimed twice go to events.jsonl."""
    identity, good = SiteIdentity(settings.node_sites()), []
    for msg in replies:
        node = msg.metadata.src_node_id
        if msg.has_error():  # named by the node the message went to
            node = sent_to.get(msg.metadata.reply_to_message_id, node)
            recorder.event("error", f"round {rnd} {stage}: {identity.describe(node)} failed: "
                           f"{msg.error.reason}", round=rnd)
            continue
        problem = identity.check(node, _claimed_name(msg))
        if problem is None:
            good.append(msg)
            continue
        log.warning("round %d %s: %s", rnd, stage, printable(problem.message))
        recorder.event("identity", f"round {rnd} {stage}: {problem.message}", round=rnd,
                       node=node, registered=problem.registered, claimed=problem.claimed)
    names = [site_of(m) for m in good]  # twice only where names are not registered
    for msg in [m for m in good if names.count(site_of(m)) > 1]:
        message = (f"round {rnd} {stage}: more than one reply under the name "
                   f"{site_of(msg)!r}; all of them are left out")
        log.warning("%s", printable(message))
        recorder.event("identity", message, round=rnd, node=msg.metadata.src_node_id)
    return sorted([m for m in good if names.count(site_of(m)) == 1], key=site_of)


def _log_round(rnd: int, total: int, line: dict[str, Any]) -> None:
    log.info("round %d/%d  dice %.4f  miou %.4f  acc %.4f  loss %.4f  sites %s", rnd, total,
             line["dice"], line["miou"], line["acc"], line["loss"], sites_of(line))

