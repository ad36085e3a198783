"""The centre's round loop against sites that misbehave: every reply goes through Flower's own
strategies on a stand-in Grid (the sites' replies are made here), so each outcome is exact."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from egcmf_model.config import PrivacyConfig, load_config
from egcmf_model.engine import build_model, encoders, frozen_parameters
from egcmf_model.packing import Layout
from fl_common.wire import model_record, reply_record, view
from fl_server.federation import Rounds, make_strategy, strategy_options
from fl_server.global_model import GlobalModel, slots_named
from fl_server.recorder import RunRecorder
from fl_server.settings import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")
CLASSES = ("background", "in_situ", "invasive")
Behaviour = Callable[[Message, str], Message]


def _global() -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict([("conv.weight", torch.randn(4, 3, 3, 3, generator=g)),
                        ("bn.running_mean", torch.zeros(4)), ("bn.running_var", torch.ones(4)),
                        ("bn.num_batches_tracked", torch.tensor(3))])


LAYOUT = Layout.of(_global())
EVALUATION = {"dice": 0.5, "miou": 0.4, "acc": 0.9, "loss": 0.3, "num-examples": 2,
              "confusion": [1] * 9, "site-weight": 1}


def received(msg: Message) -> OrderedDict:
    """The global model a message brings, as the network's state dict (float32)."""
    return OrderedDict(LAYOUT.unpack({k: torch.from_numpy(np.array(view(a), dtype=np.float32)
                                      if view(a).dtype == np.float16 else np.array(view(a)))
                                      for k, a in msg.content["arrays"].items()}))


def honest(msg: Message, site: str, *, keep: tuple[str, ...] = (), **metrics) -> Message:
    """A site that evaluates the model it receives (when asked) and trains (a small step of its
    own; the tensors ``keep`` as they came), and answers in the schema."""
    content = {"site": ConfigRecord({"name": site})}
    if msg.metadata.message_type == "evaluate":
        return Message(content=RecordDict({**content, "metrics": MetricRecord(EVALUATION)}),
                       reply_to=msg)
    start = received(msg)
    g = torch.Generator().manual_seed(sum(map(ord, site)))
    state = OrderedDict((k, v + 0.01 * torch.rand(v.shape, generator=g)
                         if v.is_floating_point() and k not in keep else v)
                        for k, v in start.items())
    train = {"train_loss": 0.5, "num-examples": 4, "train_s": 1.0, "epsilon": -1.0,
             "noise_multiplier": -1.0, "site-weight": 1, "steps": 2, **metrics}
    reference = {k: view(a) for k, a in msg.content["arrays"].items()}
    wire = "float16" if any(a.dtype == np.float16 for a in reference.values()) else "float32"
    content.update({"arrays": reply_record(state, LAYOUT, reference, wire),
                    "metrics": MetricRecord(train)})
    if msg.content["config"].get("evaluate"):
        content["evaluation"] = MetricRecord(EVALUATION)
    return Message(content=RecordDict(content), reply_to=msg)


class Grid:
    """Flower's Grid as a strategy and the round loop use it; node i is site ``site_<i>``."""

    def __init__(self, behaviours: list[Behaviour]) -> None:
        self.behaviours = dict(enumerate(behaviours, start=1))
        self.waiting: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.behaviours)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = str(i)
            node = msg.metadata.dst_node_id
            self.waiting.append(self.behaviours[node](msg, f"site_{node}"))
            ids.append(str(i))
        return ids

    def pull_messages(self, ids) -> list[Message]:
        replies, self.waiting = self.waiting, []
        return replies


def _rounds(tmp_path: Path, behaviours: list[Behaviour], **settings) -> Rounds:
    caps = {f"site_{i}": {"train": 4, "evaluate": 2} for i in range(1, len(behaviours) + 1)}
    settings.setdefault("wire", "float32")  # what these sites answer with, unless a test says
    s = FederationSettings(run_dir=str(tmp_path), sites=len(behaviours), simulation=True,
                           site_caps=json.dumps(caps), **settings)
    recorder = RunRecorder(tmp_path, load_config("tiny"), CLASSES)
    return Rounds(Grid(behaviours), s, make_strategy(strategy_options(s)), recorder, CLASSES,
                  ConfigRecord({"x": 1}), GlobalModel.of_state(LAYOUT, _global()), None)


def _round(tmp_path: Path, behaviours: list[Behaviour], **settings):
    """Round 1 with these sites: whether the global model changed, the round's training part
    of its line, the events, and the strategy."""
    rounds = _rounds(tmp_path, behaviours, **settings)
    rounds.run(1)
    rounds.recorder.flush()
    path = tmp_path / "events.jsonl"
    events = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    changed = not torch.equal(rounds.model.state()["conv.weight"], _global()["conv.weight"])
    return changed, rounds.pending, events, rounds.strategy


def test_a_malformed_reply_is_dropped_and_the_round_goes_on(tmp_path: Path) -> None:
    """One site's extra metric key used to make Flower's aggregation raise and end the
    ServerApp; now that reply alone is left out, with its reason in events.jsonl."""
    def extra_key(msg: Message, site: str) -> Message:
        return honest(msg, site, bonus=1.0)

    changed, line, events, _ = _round(tmp_path, [honest, honest, extra_key])
    assert changed
    assert "site_3" not in line["sites"]  # its update did not count
    assert {"site_1", "site_2"} == set(line["sites"])
    (rejected,) = [e for e in events if e["kind"] == "rejected"]
    assert rejected["site"] == "site_3"
    assert "unexpected ['bonus']" in rejected["message"]


def test_a_site_claiming_more_examples_than_it_holds_is_left_out(tmp_path: Path) -> None:
    def billion(msg: Message, site: str) -> Message:
        return honest(msg, site, **{"num-examples": 10**9})

    changed, line, events, _ = _round(tmp_path, [honest, honest, billion])
    assert changed
    assert "more than the 4 this site holds" in events[0]["message"]
    assert "site_3" not in line["sites"]


def test_server_side_dp_logs_a_round_flower_skips(tmp_path: Path) -> None:
    """Flower's server-side DP averages only complete rounds: with one update rejected it
    skips the aggregation, which the centre records as such; no privacy is spent."""
    def nan(msg: Message, site: str) -> Message:
        reply = honest(msg, site)
        if "arrays" not in reply.content:  # evaluation
            return reply
        state = received(msg)
        state["conv.weight"][0, 0, 0, 0] = float("nan")
        reply.content["arrays"] = model_record(LAYOUT.pack(state))
        return reply

    dp = {"server_dp_noise": 1.0, "server_dp_clip": 1.0, "min_sites": 2}
    changed, _, events, strategy = _round(tmp_path / "skipped", [honest, honest, nan], **dp)
    assert not changed
    (skipped,) = [e for e in events if e["kind"] == "server-dp-skipped"]
    assert (skipped["valid"], skipped["sampled"]) == (2, 3)
    assert strategy.accountant.num_releases == 0
    changed, _, events, strategy = _round(tmp_path / "complete", [honest] * 3, **dp)
    assert changed  # three sites, min-sites 2: all three sampled, counted and released
    assert strategy.accountant.num_releases == 1
    assert strategy.accountant.config.population_size == 3


def test_too_few_updates_for_the_robust_strategy_is_logged(tmp_path: Path) -> None:
    def malformed(msg: Message, site: str) -> Message:
        return honest(msg, site, bonus=1.0)

    changed, _, events, _ = _round(tmp_path, [honest] * 3 + [malformed] * 2,
                                   strategy="krum", krum_f=1)
    assert changed
    (warning,) = [e for e in events if e["kind"] == "protection"]
    assert "krum with --krum-f 1 needs at least 5 sites" in warning["message"]


def test_an_unchanged_model_under_server_side_dp_does_not_end_the_run(tmp_path: Path) -> None:
    """Flower 1.42's server-side clipping divides by the update's norm: a site that sends the
    model back unchanged made the ServerApp raise ZeroDivisionError. The round is skipped and
    logged instead."""
    def unchanged(msg: Message, site: str) -> Message:
        reply = honest(msg, site)
        if "arrays" in reply.content:
            reply.content["arrays"] = msg.content["arrays"]
        return reply

    dp = {"server_dp_noise": 1.0, "server_dp_clip": 1.0}
    changed, _, events, strategy = _round(tmp_path, [honest, unchanged], **dp)
    assert not changed
    assert any("sent the global model back unchanged" in e["message"] for e in events)
    assert strategy.accountant.num_releases == 0


def test_server_side_dp_noise_never_leaves_a_negative_variance(tmp_path: Path) -> None:
    """Noise on BatchNorm running variances can push them below 0, which makes every
    evaluation NaN and every next update invalid; the centre raises them to 0 (post-processing,
    no privacy spent)."""
    np.random.seed(0)
    dp = {"server_dp_noise": 10.0, "server_dp_clip": 1.0}
    rounds = _rounds(tmp_path, [honest, honest], **dp)
    rounds.run(1)
    rounds.recorder.flush()
    variance = rounds.model.state()["bn.running_var"]
    assert (variance >= 0).all()
    assert (variance == 0).any()  # the noise did push some below 0


def test_frozen_encoders_stay_as_they_are_whatever_the_round_does(tmp_path: Path) -> None:
    """Encoders frozen under DP-SGD (public weights): a site that sends them changed is
    rejected, named in events.jsonl, on either wire; server-side DP noise does not move them
    either (the centre takes them back from the model it sent). The rest still moves."""
    frozen = slots_named(LAYOUT, ["conv.weight"])  # here conv stands for the encoders

    def frozen_kept(msg: Message, site: str) -> Message:
        return honest(msg, site, keep=("conv.weight",))

    for wire in ("float32", "float16"):
        rounds = _rounds(tmp_path / wire, [frozen_kept, frozen_kept, honest], wire=wire)
        rounds.frozen = frozen
        rounds.run(1)
        rounds.recorder.flush()
        events = [json.loads(x) for x in (tmp_path / wire / "events.jsonl").read_text()
                  .splitlines()]
        assert [(e["kind"], e["site"]) for e in events] == [("rejected", "site_3")], wire
        assert "changes conv.weight, which DP-SGD leaves as it is" in events[0]["message"]
        assert set(rounds.pending["sites"]) == {"site_1", "site_2"}
        assert torch.equal(rounds.model.state()["conv.weight"], _global()["conv.weight"])
        assert not torch.equal(rounds.model.state()["bn.running_mean"],
                               _global()["bn.running_mean"])

    np.random.seed(0)
    dp = _rounds(tmp_path / "dp", [frozen_kept, frozen_kept], server_dp_noise=1.0,
                 server_dp_clip=1.0)
    dp.frozen = frozen
    dp.run(1)
    assert torch.equal(dp.model.state()["conv.weight"], _global()["conv.weight"])
    assert not torch.equal(dp.model.state()["bn.running_mean"], _global()["bn.running_mean"])


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_the_frozen_weights_of_a_network_are_its_encoders_parameters(norm: str) -> None:
    cfg = load_config("tiny", overrides=[f"model.norm={norm}"])
    network = build_model(cfg.model, CLASSES)
    frozen = PrivacyConfig(enabled=True, frozen="encoders")
    slots = slots_named(Layout.of(network.state_dict()), frozen_parameters(network, frozen))
    assert sum(s.stop - s.start for s in slots) == sum(
        p.numel() for m in encoders(network).values() for p in m.parameters())
    assert all(s.dtype.is_floating_point for s in slots)  # never BatchNorm's counters
    assert 0 < len(slots) < len(list(network.parameters()))
    assert frozen_parameters(network, PrivacyConfig(enabled=True)) == set()
    assert frozen_parameters(network, PrivacyConfig(frozen="encoders")) == set()  # no DP-SGD


def test_replies_built_to_crash_the_round_are_left_out_one_by_one(tmp_path: Path) -> None:
    """A second reply under another site's name (simulation and --insecure take names as
    stated), a step count that is NaN, an evaluation that counts more pixels than its tiles
    hold: each is logged and left out, and the honest sites' round completes."""
    def twin(msg: Message, site: str) -> Message:
        return honest(msg, "site_1")

    def nan_steps(msg: Message, site: str) -> Message:
        return honest(msg, site, steps=float("nan"))

    def inflated_evaluation(msg: Message, site: str) -> Message:
        reply = honest(msg, site)
        reply.content["evaluation"]["confusion"] = [10**12] * 9
        return reply

    rounds = _rounds(tmp_path, [honest, honest, honest, twin, nan_steps, inflated_evaluation])
    rounds.pixels = 64 * 64
    rounds.run(1)
    rounds.recorder.flush()
    events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert not torch.equal(rounds.model.state()["conv.weight"], _global()["conv.weight"])
    assert set(rounds.pending["sites"]) == {"site_2", "site_3", "site_6"}
    assert sum("more than one reply under the name 'site_1'" in e["message"]
               for e in events) == 2
    assert any("site_5" in e["message"] and "not a count" in e["message"] for e in events)
    assert any("site_6" in e["message"] and "pixels counted" in e["message"] for e in events)
    assert "site_6" not in rounds.recorder.initial["sites"]
