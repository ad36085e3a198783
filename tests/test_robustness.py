"""Update validation on the server, one test per rule, and every kind of injected fault."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.exception import InconsistentMessageReplies
from flwr.serverapp.strategy import FedAvg

from egcmf_model.packing import INT, Layout
from fl_client.faults import FAULTS, inject_fault, misshape
from fl_common.wire import Decoded, model_record, reply_record
from fl_server.global_model import GlobalModel
from fl_server.strategy import STRATEGIES, StrategyOptions, make_strategy
from fl_server.validation import Scratch, UpdateRules, check_updates, evaluation_problem
from sim.run import main as sim_main

pytestmark = pytest.mark.usefixtures("task_identity")
RULES = UpdateRules(max_ratio=10.0, floor=0.01)
CAPS = dict.fromkeys(("a", "b", "c", "bad", "silent"), 4)


def _state(seed: int = 0, scale: float = 1.0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("conv.weight", torch.randn(4, 3, 3, 3, generator=g) * scale),
                        ("bn.running_mean", torch.zeros(4)),
                        ("bn.running_var", torch.ones(4)),
                        ("bn.num_batches_tracked", torch.tensor(3))])


def _near(base: OrderedDict, seed: int, step: float = 0.01) -> OrderedDict:
    """``base`` moved by a small random step: an honest site's update."""
    noise = _state(seed)
    return OrderedDict((k, v + step * noise[k].abs() if v.is_floating_point() else v)
                       for k, v in base.items())


LAYOUT = Layout.of(_state())
F0 = "float.00"


def _global(state: OrderedDict | None = None) -> GlobalModel:
    return GlobalModel.of_state(LAYOUT, state or _state(0))


def _train_metrics(**changes) -> dict:
    return {"train_loss": 0.5, "num-examples": 4, "train_s": 1.0, "epsilon": -1.0,
            "noise_multiplier": -1.0, "site-weight": 1, "steps": 2, **changes}


def _reply(site: str, state: OrderedDict | ArrayRecord, wire: str = "float32",
           **metrics) -> Message:
    """A site's training reply: ``state`` packed for the ``wire`` (float16: its update from
    the global model ``_state(0)`` as the centre sent it), or the arrays given."""
    reference = model_record(LAYOUT.pack(_state(0)), wire)  # what the centre sent
    arrays = state if isinstance(state, ArrayRecord) else reply_record(
        state, LAYOUT, {k: a.numpy() for k, a in reference.items()}, wire)
    content = RecordDict({"arrays": arrays,
                          "metrics": MetricRecord(_train_metrics(**metrics)),
                          "site": ConfigRecord({"name": site})})
    return Message(content=content, dst_node_id=1, message_type="train")


def _packed(state: OrderedDict, **changes: np.ndarray) -> ArrayRecord:
    buffers = {k: v.numpy() for k, v in LAYOUT.pack(state).items()}
    return ArrayRecord({k: Array(v) for k, v in {**buffers, **changes}.items()})


def _unpacked(msg: Message) -> dict[str, torch.Tensor]:
    """A kept reply's arrays (decoded buffers) as the network's state dict."""
    return LAYOUT.unpack({k: torch.from_numpy(np.array(a.numpy()))
                          for k, a in msg.content["arrays"].items()})


def _site(msg: Message) -> str:
    return str(msg.content["site"]["name"])


def _check(replies: list[Message], reference: OrderedDict | None = None,
           rules: UpdateRules = RULES, wire: str = "float32", scratch: Scratch | None = None):
    return check_updates(replies, _global(reference), wire, _site, CAPS, rules, 3,
                         scratch=scratch)


def _only_bad_rejected(bad: Message) -> str:
    base = _state(0)
    checked = _check([_reply("a", _near(base, 1)), _reply("b", _near(base, 2)), bad], base)
    assert [_site(m) for m in checked.kept] == ["a", "b"]
    assert [r.site for r in checked.rejected] == ["bad"]
    return checked.rejected[0].reason


def test_healthy_updates_pass() -> None:
    base = _state(0)
    checked = _check([_reply(s, _near(base, i)) for i, s in enumerate("abc", start=1)], base)
    assert len(checked.kept) == 3
    assert checked.rejected == []


def test_wrong_number_of_arrays() -> None:
    bad = _packed(_near(_state(0), 3))
    del bad[INT]
    assert "wrong arrays" in _only_bad_rejected(_reply("bad", bad))


def test_wrong_shape() -> None:
    values = LAYOUT.pack(_near(_state(0), 3))[F0].numpy()
    bad = _packed(_near(_state(0), 3), **{F0: np.append(values, 1.0)})
    assert "shape" in _only_bad_rejected(_reply("bad", bad))


def test_wrong_dtype() -> None:
    values = LAYOUT.pack(_near(_state(0), 3))[F0].numpy()
    bad = _packed(_near(_state(0), 3), **{F0: values.astype(np.float64)})
    assert "float64" in _only_bad_rejected(_reply("bad", bad))


def test_nan_or_inf() -> None:
    bad = _near(_state(0), 3)
    bad["bn.running_mean"][1] = float("inf")
    assert "NaN or Inf" in _only_bad_rejected(_reply("bad", bad))


def test_a_negative_batchnorm_variance_is_rejected() -> None:
    """No honest BatchNorm has a negative running variance; an average of valid ones never
    does, so a model with one can only come from a bad update (it makes evaluation NaN)."""
    bad = _near(_state(0), 3)
    bad["bn.running_var"][2] = -0.5
    assert "negative variance" in _only_bad_rejected(_reply("bad", bad))


def test_norm_far_outside_the_others() -> None:
    base = _state(0)
    bad = OrderedDict((k, v + 1.0 if v.is_floating_point() else v) for k, v in base.items())
    assert "over the limit" in _only_bad_rejected(_reply("bad", bad))


def test_missing_arrays() -> None:
    msg = _reply("bad", _state(3))
    del msg.content["arrays"]
    checked = _check([msg])
    assert checked.kept == []
    assert "records" in checked.rejected[0].reason


def test_each_reply_is_checked_as_a_whole_and_dropped_alone() -> None:
    """Replies that Flower's aggregation cannot take (a second ArrayRecord, an extra or a
    missing metric key, a list where a number belongs), or that our round would misread (a
    MetricRecord under another name, a weight that is not 1) are each dropped with their
    reason; the good ones are aggregated by Flower's own FedAvg, which the first four make
    raise otherwise."""
    base = _state(0)
    good = [_reply("a", _near(base, 1)), _reply("b", _near(base, 2))]
    second_array = _reply("bad", _near(base, 3))
    second_array.content["more"] = ArrayRecord(_state(4))
    extra_key = _reply("bad", _near(base, 3), accuracy_boost=1.0)
    missing_key = _reply("bad", _near(base, 3))
    missing_key.content["metrics"] = MetricRecord(
        {k: v for k, v in _train_metrics().items() if k != "train_loss"})
    a_list = _reply("bad", _near(base, 3), train_loss=[0.1, 0.2])
    renamed = _reply("bad", _near(base, 3))
    renamed.content["scores"] = renamed.content.pop("metrics")
    heavier = _reply("bad", _near(base, 3), **{"site-weight": 1000})
    for bad in (second_array, extra_key, missing_key, a_list):
        with pytest.raises((InconsistentMessageReplies, TypeError)):
            FedAvg().aggregate_train(1, [*good, bad])  # what one such reply did before
    reasons = {name: _only_bad_rejected(bad) for name, bad in [
        ("second array", second_array), ("extra key", extra_key), ("missing key", missing_key),
        ("list", a_list), ("renamed", renamed), ("site weight", heavier)]}
    assert "records" in reasons["second array"]
    assert "unexpected ['accuracy_boost']" in reasons["extra key"]
    assert "missing ['train_loss']" in reasons["missing key"]
    assert "another version of EGCMF-FL" in reasons["missing key"]
    assert "a list where a number belongs" in reasons["list"]
    assert "records" in reasons["renamed"]
    assert "site-weight" in reasons["site weight"]
    arrays, _ = FedAvg().aggregate_train(1, _check([*good, extra_key], base).kept)
    assert arrays is not None


@pytest.mark.parametrize(("claim", "why"), [(10**9, "more than the 4"), (0, "not a positive"),
                                            (-3, "not a positive"), (2.5, "not a positive")])
def test_num_examples_is_a_positive_integer_within_the_sites_cap(claim, why: str) -> None:
    """A site's own claim is no bound: the centre caps it at what it knows of that site (the
    partition's tiles in a simulation, the cap registered with the site's key otherwise)."""
    base = _state(0)
    assert why in _only_bad_rejected(_reply("bad", _near(base, 3), **{"num-examples": claim}))
    assert not _check([_reply("a", _near(base, 1), **{"num-examples": 4})], base).rejected


@pytest.mark.parametrize("sigma", [float("nan"), float("inf"), 0.0, -1.0, -5.0])
def test_a_dp_site_reporting_an_impossible_noise_multiplier_is_rejected(sigma: float) -> None:
    """A site that reports an epsilon trains with DP-SGD, so with a positive, finite noise
    multiplier: any other value it reports is a broken reply, not a line of metrics.jsonl. A
    site without DP-SGD (epsilon -1) is not asked for one."""
    base = _state(0)
    dp = {"epsilon": 2.0, "noise_multiplier": sigma}
    assert "noise_multiplier" in _only_bad_rejected(_reply("bad", _near(base, 3), **dp))
    honest = [_reply("a", _near(base, 1), epsilon=2.0, noise_multiplier=0.8),
              _reply("b", _near(base, 2), epsilon=-1.0, noise_multiplier=sigma)]
    assert not _check(honest, base).rejected


def test_an_evaluation_reply_is_checked_too() -> None:
    def evaluation(site: str, **changes) -> Message:
        metrics = {"dice": 0.5, "miou": 0.4, "acc": 0.9, "loss": 0.3, "num-examples": 2,
                   "confusion": [1] * 9, "site-weight": 1, **changes}
        return Message(content=RecordDict({"metrics": MetricRecord(metrics),
                                           "site": ConfigRecord({"name": site})}),
                       dst_node_id=1, message_type="evaluate")

    replies = [evaluation("a"), evaluation("b", confusion=[1] * 4),
               evaluation("c", **{"num-examples": 50}), evaluation("bad", dice=[0.5]),
               evaluation("silent", loss=float("nan"))]  # an honest site, a broken model
    problems = {_site(m): evaluation_problem(m.content["metrics"], CAPS[_site(m)], 3)
                for m in replies}
    assert [site for site, problem in problems.items() if problem is None] == ["a", "silent"]
    reasons = {site: problem for site, problem in problems.items() if problem}
    assert "list of 9 counts" in reasons["b"]
    assert "more than the 4" in reasons["c"]
    assert "a list where a number belongs" in reasons["bad"]


def test_one_silent_site_cannot_get_an_honest_update_rejected() -> None:
    """The norm rule takes the median of all the round's updates, the site's own included:
    with the median of the others, a silent site (0) next to one honest site would make the
    honest update infinitely far above it."""
    base = _state(0)
    honest = _near(base, 1, step=0.5)
    for others in (["silent"], ["silent", "a"]):
        replies = [_reply("b", honest), *(_reply(s, base if s == "silent" else
                                                 _near(base, 2, step=0.5)) for s in others)]
        assert _check(replies, base).rejected == []


def test_with_two_sites_the_norm_rule_rejects_nothing() -> None:
    """As the README states: the median of two norms lies halfway to the larger, so an update
    10x the other's is never over 10x the median; robust strategies need more sites too."""
    base = _state(0)
    huge = OrderedDict((k, v + 1e3 if v.is_floating_point() else v) for k, v in base.items())
    assert _check([_reply("a", _near(base, 1)), _reply("bad", huge)], base).rejected == []
    assert _check([_reply("bad", huge)], base).rejected == []  # one site: never checked


def test_the_floor_keeps_a_round_of_tiny_updates_from_rejecting_a_normal_one() -> None:
    base = _state(0)
    tiny = [_reply(s, _near(base, i, step=1e-9)) for i, s in enumerate("ab", start=1)]
    normal = _reply("c", _near(base, 3, step=1e-3))
    assert _check([*tiny, normal], base, UpdateRules(10.0, floor=0.01)).rejected == []
    assert _check([*tiny, normal], base, UpdateRules(10.0, floor=0.0)).rejected


def test_weights_and_batchnorm_statistics_are_judged_apart() -> None:
    """BatchNorm statistics move far more in a round than the weights; with one norm over
    both, the weights could be stretched unseen. Each group has its own limit."""
    base = _state(0)

    def moved(seed: int, weights: float, stats: float) -> OrderedDict:
        out = _near(base, seed, step=weights)
        out["bn.running_mean"] = out["bn.running_mean"] + stats
        return out

    honest = [_reply(s, moved(i, 0.01, 5.0)) for i, s in enumerate("ab", start=1)]
    stretched = _reply("bad", moved(3, 0.5, 5.0))  # weights 50x, statistics honest
    checked = _check([*honest, stretched], base)
    assert [r.site for r in checked.rejected] == ["bad"]
    assert "of the weights" in checked.rejected[0].reason


def test_norm_bounded_averaging_clips_each_update_to_the_median() -> None:
    base = _state(0)
    replies = [_reply("a", _near(base, 1, 0.01)), _reply("b", _near(base, 2, 0.02)),
               _reply("c", _near(base, 3, 0.08))]
    checked = _check(replies, base, UpdateRules(10.0, floor=0.0, clip=1.0))
    median = sorted(n["weights"] for n in checked.norms.values())[1]
    for msg in checked.kept:
        sent = _unpacked(msg)
        step = (sent["conv.weight"] - base["conv.weight"]).double().norm().item()
        assert step <= median * (1 + 1e-5)
    kept = {_site(m): _unpacked(m) for m in checked.kept}
    torch.testing.assert_close(kept["a"]["conv.weight"],
                               _near(base, 1, 0.01)["conv.weight"])  # below the median: as sent


def test_a_group_within_its_bound_arrives_exactly_as_sent() -> None:
    """Norm-bounded averaging scales only the group that is over its bound: when a site's
    statistics are clipped, its weights (in the same buffer) reach the strategy bit for bit."""
    base = _state(0)

    def moved(stats: float) -> OrderedDict:
        out = OrderedDict(base)  # the same weights at every site, far from the centre's
        out["conv.weight"] = base["conv.weight"] * 1e-3
        out["bn.running_mean"] = out["bn.running_mean"] + stats
        return out

    replies = [_reply(s, moved(stats)) for s, stats in [("a", 0.1), ("b", 0.2), ("c", 3.0)]]
    checked = _check(replies, base, UpdateRules(100.0, floor=0.0, clip=1.0))
    kept = {_site(m): _unpacked(m) for m in checked.kept}
    assert kept["c"]["bn.running_mean"].norm() < 0.5  # c's statistics: clipped to the median
    for site in "abc":  # master + (w - master) * 1.0 would round some of them
        assert torch.equal(kept[site]["conv.weight"], moved(0.0)["conv.weight"])


def test_replies_checked_side_by_side_give_what_one_by_one_gives(monkeypatch) -> None:
    """Replies are decoded and clipped on several threads; the kept and rejected lists, their
    order, the norms and every decoded value are those of a check on one thread."""
    import fl_server.validation as validation

    base = _state(0)

    def replies() -> list[Message]:
        bad = _reply("bad", _near(base, 9))
        bad.content["arrays"][F0] = Array(np.zeros(3, dtype=np.float32))
        return [_reply(s, _near(base, i, 0.01 * i)) for i, s in enumerate("abcde", start=1)
                ] + [bad, _reply("far", _near(base, 7, 5.0))]

    def summary(workers: int):
        monkeypatch.setattr(validation, "_workers", lambda tasks: workers)
        checked = _check(replies(), base, UpdateRules(10.0, floor=0.0, clip=1.0))
        return ([_site(m) for m in checked.kept], [(r.site, r.reason) for r in checked.rejected],
                checked.norms, [_unpacked(m) for m in checked.kept])

    one, many = summary(1), summary(4)
    assert one[:3] == many[:3]
    assert [site for site, _ in one[1]] == ["bad", "far"]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(one[3], many[3], strict=True) for k in x)


def test_each_reply_is_decoded_once_and_the_strategy_reads_it_as_decoded() -> None:
    """Validation decodes a reply's buffers (float32: without a copy) and hands them to the
    strategy, which averages them without decoding the reply again."""
    base = _state(0)
    kept = _check([_reply("a", _near(base, 1)), _reply("b", _near(base, 2))], base,
                  UpdateRules(10.0, floor=0.01)).kept
    assert all(isinstance(a, Decoded) for m in kept for a in m.content["arrays"].values())
    assert all(not a.numpy().flags.owndata for m in kept for a in m.content["arrays"].values())
    for m in kept:
        m.content["arrays"].pop(INT)
    floats, _ = make_strategy(StrategyOptions(min_sites=2)).aggregate_train(1, kept)
    expected = (LAYOUT.pack(_near(base, 1))[F0] + LAYOUT.pack(_near(base, 2))[F0]) / 2
    assert np.allclose(floats[F0].numpy(), expected.numpy())


def test_float16_updates_are_added_to_the_centres_float32_model() -> None:
    """The float16 wire: a site trains from the global model rounded to float16 and sends
    w_site - w_received in float16; the centre adds it to its own float32 weights. An update
    far below float16's resolution of the weights survives, where float16 weights lose it."""
    rounded = LAYOUT.unpack({k: v.half().float() if k != INT else v
                             for k, v in LAYOUT.pack(_state(0)).items()})  # what sites get
    update = {k: 1e-5 * (1 + v.abs()) if v.is_floating_point() else torch.zeros_like(v)
              for k, v in rounded.items()}
    trained = OrderedDict((k, v + update[k]) for k, v in rounded.items())
    checked = _check([_reply(s, trained, "float16") for s in "ab"], wire="float16")
    assert not checked.rejected
    decoded = checked.kept[0].content["arrays"][F0].numpy()
    master = LAYOUT.pack(_state(0))[F0].numpy()
    expected = LAYOUT.pack(update)[F0].numpy()
    assert decoded.dtype == np.float32
    # kept to float32's resolution of the weights (the site trains in float32)
    assert np.abs((decoded - master) - expected).max() < 0.05 * np.abs(expected).max()
    as_float16 = LAYOUT.pack(trained)[F0].half().float().numpy()  # plain float16 weights
    lost = as_float16 - LAYOUT.pack(rounded)[F0].numpy()
    assert np.abs(lost - expected).max() > 0.5 * np.abs(expected).max()
    refused = _check([_reply("c", trained, "float32")], wire="float16")  # the wrong form
    assert "float32, expected" in refused.rejected[0].reason


def test_float16_updates_are_measured_and_clipped_as_sent() -> None:
    """Under the float16 wire an update's norm is that of the float16 update the site sent,
    and norm-bounded averaging scales that update before adding it to the centre's float32
    model: an update within its bound is added bit for bit, a longer one is scaled to the
    median norm."""
    base = _state(0)
    replies = [_reply(s, _near(base, i, step), "float16")
               for i, (s, step) in enumerate([("a", 0.01), ("b", 0.02), ("c", 0.08)], start=1)]
    updates = {_site(m): LAYOUT.unpack({k: torch.from_numpy(a.numpy().astype(
                   np.float32 if k == F0 else np.int64)) for k, a in m.content["arrays"].items()})
               for m in replies}  # as sent, before the check decodes them
    checked = _check(replies, base, UpdateRules(10.0, floor=0.0, clip=1.0), wire="float16")
    assert not checked.rejected
    norms = {s: n["weights"] for s, n in checked.norms.items()}
    for site, update in updates.items():
        assert norms[site] == pytest.approx(update["conv.weight"].double().norm().item(),
                                            rel=1e-12)
    median = sorted(norms.values())[1]
    kept = {_site(m): _unpacked(m) for m in checked.kept}
    assert torch.equal(kept["a"]["conv.weight"],
                       base["conv.weight"] + updates["a"]["conv.weight"])
    step = kept["c"]["conv.weight"] - base["conv.weight"]
    torch.testing.assert_close(step, updates["c"]["conv.weight"] * (median / norms["c"]),
                               rtol=1e-5, atol=1e-7)
    assert step.double().norm().item() == pytest.approx(median, rel=1e-5)


# each round's replies: site, step of its weights, step of its BatchNorm statistics (None: a
# reply with a NaN, rejected); the kept set changes, and some sites are clipped in one group only
ROUNDS_OF_REPLIES = [
    [("a", 0.01, 0.01), ("b", 0.02, 0.02), ("c", 0.08, 0.01)],
    [("a", 0.01, 0.05), ("bad", None, None), ("c", 0.02, 0.02)],
    [("b", 0.03, 0.01)],
    [("a", 0.01, 0.01), ("b", 0.02, 0.09), ("c", 0.08, 0.02), ("d", 0.015, 0.015)],
]


@pytest.mark.parametrize("wire", ["float32", "float16"])
def test_each_round_decodes_into_the_last_rounds_buffers_with_fresh_values(wire: str) -> None:
    """The centre decodes (and clips) the replies of every round into buffers it keeps: each
    round's weights are what fresh buffers would hold, whatever earlier rounds left in them
    (here NaN), while the kept replies come and go and norm-bounded averaging clips one group
    of a site or both; and a later round's buffers lie where earlier rounds' did."""
    scratch, rules, base = Scratch(), UpdateRules(10.0, floor=0.0, clip=1.0), _state(0)
    earlier: list[np.ndarray] = []  # every buffer the centre wrote the sites' weights into
    for rnd, plan in enumerate(ROUNDS_OF_REPLIES, start=1):
        def replies(plan=plan, rnd=rnd) -> list[Message]:
            out = []
            for i, (site, weights, statistics) in enumerate(plan):
                noise = _state(10 * rnd + i)
                state = OrderedDict((k, v + (statistics or 0.01 if k.startswith("bn.") else
                                             weights or 0.01) * noise[k].abs()
                                     if v.is_floating_point() else v) for k, v in base.items())
                if weights is None:
                    state["conv.weight"][0, 0, 0, 0] = float("nan")
                out.append(_reply(site, state, wire))
            return out
        fresh = {_site(m): _unpacked(m) for m in _check(replies(), base, rules, wire).kept}
        for buffer in earlier:
            buffer[:] = np.nan  # what a round leaves in its buffers never shows in the next
        checked = _check(replies(), base, rules, wire, scratch)
        assert sorted(fresh) == sorted(_site(m) for m in checked.kept)
        for msg in checked.kept:
            for key, value in _unpacked(msg).items():
                assert torch.equal(value, fresh[_site(msg)][key]), (rnd, _site(msg), key)
        decoded = [m.content["arrays"][F0].numpy() for m in checked.kept]
        written = [a for a in decoded if a.flags.writeable]  # not a reply's own bytes
        assert len({a.ctypes.data for a in written}) == len(written)  # one buffer per site
        if rnd == len(ROUNDS_OF_REPLIES):
            assert written
            assert all(any(np.shares_memory(a, b) for b in earlier) for a in written[:3])
        earlier += [a for a in written if not any(np.shares_memory(a, b) for b in earlier)]


def test_a_float16_update_that_would_leave_float16s_range_is_rejected() -> None:
    """Under the float16 wire a site cannot push a weight beyond 65504 (the next global model
    could then not be sent): such an update, finite in float16 itself, is rejected with its
    reason and the round goes on with the others."""
    centre = _state(0)
    centre["conv.weight"][0, 0, 0, 0] = 60000.0  # within float16's range
    pushed = _state(0)
    pushed["conv.weight"][0, 0, 0, 0] += 6000.0  # an update of 6000: 66000 at the centre
    replies = [_reply("a", _near(_state(0), 1), "float16"),
               _reply("b", _near(_state(0), 2), "float16"), _reply("bad", pushed, "float16")]
    checked = _check(replies, centre, wire="float16")
    assert [_site(m) for m in checked.kept] == ["a", "b"]
    assert [r.site for r in checked.rejected] == ["bad"]
    assert "beyond what the float16 wire carries" in checked.rejected[0].reason


@pytest.mark.parametrize("kind", ["nan", "shape", "scale"])
def test_each_corrupting_fault_is_rejected(kind: str) -> None:
    record = model_record(LAYOUT.pack(inject_fault(kind, _near(_state(0), 3))))
    assert _only_bad_rejected(_reply("bad", misshape(record) if kind == "shape" else record))


def test_dropout_fault_kills_the_site() -> None:
    with pytest.raises(RuntimeError, match="dropout"):
        inject_fault("dropout", _state(0))
    assert FAULTS == ("nan", "shape", "scale", "dropout", "inflate", "reverse")


def test_inflate_fault_passes_the_norm_rule_it_was_built_for() -> None:
    """The inflating site reverses its own update and stretches it to 0.9x the limit it expects
    (its own update norm standing in for the median): an attack the norm rule lets through
    whenever the sites' updates are alike, as they are in a federation. ``inflate`` then fails
    on the variances it makes negative (and on its claim); ``reverse`` raises them to 0 and
    passes every check, and norm-bounded averaging clips it to the median."""
    received = _state(0)

    def trained(seed: int) -> OrderedDict:  # weights and variances both move, as in training
        out = _near(received, seed)
        out["bn.running_var"] = out["bn.running_var"] + 0.5 + 0.1 * seed
        return out

    honest = trained(1)
    inflated = inject_fault("inflate", honest, received, max_update_ratio=10.0)
    for name in ("conv.weight", "bn.running_var"):
        torch.testing.assert_close(inflated[name], received[name] - 9.0 * (honest[name] -
                                                                           received[name]))
    assert torch.equal(inflated["bn.num_batches_tracked"], honest["bn.num_batches_tracked"])
    reversed_ = inject_fault("reverse", honest, received, max_update_ratio=10.0)
    torch.testing.assert_close(reversed_["conv.weight"], inflated["conv.weight"])
    assert (inflated["bn.running_var"] < 0).all()
    assert (reversed_["bn.running_var"] == 0).all()
    def others() -> list[Message]:
        return [_reply(s, trained(seed)) for s, seed in (("a", 5), ("b", 6))]

    checked = _check([*others(), _reply("bad", inflated)], received)
    assert "negative variance" in checked.rejected[0].reason
    checked = _check([*others(), _reply("bad", reversed_)], received,
                     UpdateRules(10.0, floor=0.01, clip=1.0))
    assert not checked.rejected
    assert [_site(m) for m in checked.kept] == ["a", "b", "bad"]
    clipped = _unpacked(checked.kept[2])["conv.weight"]
    assert (clipped - received["conv.weight"]).norm() < 0.2 * (
        reversed_["conv.weight"] - received["conv.weight"]).norm()
    with pytest.raises(ValueError, match="max update ratio"):
        inject_fault("inflate", honest)


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_is_flowers_own(name: str) -> None:
    strategy = make_strategy(StrategyOptions(name=name, min_sites=3))
    assert type(strategy).__module__.startswith("flwr.serverapp.strategy")
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy(StrategyOptions(name="fedsgd"))


@pytest.mark.parametrize("kind", ["dropout", "nan"])
def test_simulation_survives_a_faulty_site(kind: str, tmp_path: Path, synth_root: Path) -> None:
    out = tmp_path / kind
    assert sim_main(["--clients", "3", "--rounds", "2", "--local-epochs", "1", "--variant",
                     "unet", "--data", str(synth_root), "--dataset", "synthetic", "--fault",
                     f"{kind}:1", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert all(np.isfinite(x["dice"]) and np.isfinite(x["loss"]) for x in lines)
    events = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    expected = "error" if kind == "dropout" else "rejected"
    assert sum(e["kind"] == expected for e in events) >= 2  # every round
    for x in lines:  # the faulty site's update never counted
        assert len([s for s, v in x["sites"].items() if "train_loss" in v]) == 2
    if kind == "dropout":  # "the details are in the site's log": the run folder's sites.log
        log = (out / "sites.log").read_text()
        assert re.search(r'ERROR site "\w+": training failed: simulated site failure', log)
        assert "Traceback (most recent call last)" in log


def test_a_simulation_names_the_unreadable_png_a_site_skips(tmp_path: Path, synth_root: Path,
                                                           caplog) -> None:
    """A virtual site skips a truncated PNG and goes on, as a real site does; the researcher
    sees the file named on the console once, not once per round, and in the run's sites.log."""
    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    broken = sorted(data.glob("*/rois/*/he.png"))[0]
    broken.write_bytes(broken.read_bytes()[:300])
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert sim_main(["--clients", "2", "--rounds", "2", "--local-epochs", "1", "--variant",
                         "unet", "--data", str(data), "--dataset", "synthetic",
                         "--out", str(out)]) == 0
    named = [r.getMessage() for r in caplog.records if str(broken) in r.getMessage()]
    assert len(named) == 1, named
    assert "truncated" in named[0]
    roi = f"{broken.parts[-4]}/{broken.parts[-2]}"
    assert named[0].startswith("site client_0")
    assert f": skipping ROI {roi}: " in named[0]
    assert str(broken) in (out / "sites.log").read_text()
    assert any(str(out / "sites.log") in r.getMessage() for r in caplog.records)


def test_fedadam_moments_survive_a_checkpoint(tmp_path: Path) -> None:
    from fl_server.strategy import restore_strategy_state, strategy_state

    a = make_strategy(StrategyOptions(name="fedadam"))
    a.m_t = {"w": np.ones(3)}
    a.v_t = {"w": np.full(3, 2.0)}
    torch.save({"strategy_state": strategy_state(a)}, tmp_path / "round_001.pt")
    b = make_strategy(StrategyOptions(name="fedadam"))
    restore_strategy_state(b, torch.load(tmp_path / "round_001.pt",
                                         weights_only=True)["strategy_state"])
    assert np.array_equal(b.m_t["w"], a.m_t["w"])
    assert np.array_equal(b.v_t["w"], a.v_t["w"])
    assert strategy_state(make_strategy(StrategyOptions(name="fedavg"))) == {}


def test_a_finite_but_huge_statistic_is_rejected_alone() -> None:
    """Finite float32 values above 1.8e19 square to inf in float32: the norms are summed in
    float64, so only the site that sends them is left out, and the median stays a number."""
    base = _state(0)
    evil = _near(base, 9)
    evil["bn.running_mean"] = torch.full((4,), 1e20)
    honest = [_reply(s, _near(base, i)) for i, s in enumerate("abcd", start=1)]
    checked = _check([*honest, _reply("x", evil)], base, UpdateRules(10.0, 0.01, 1.0))
    assert [_site(m) for m in checked.kept] == ["a", "b", "c", "d"]
    assert [r.site for r in checked.rejected] == ["x"]


def test_the_weights_norm_is_exact_when_the_statistics_move_far_more() -> None:
    base = _state(0)
    moved = _near(base, 1, step=0.01)
    moved["bn.running_mean"] = moved["bn.running_mean"] + 300.0
    (norms,) = _check([_reply("a", moved)], base).norms.values()
    true = (moved["conv.weight"] - base["conv.weight"]).double().norm().item()
    assert norms["weights"] == pytest.approx(true, rel=1e-6)
    assert norms["statistics"] == pytest.approx(600.0, rel=1e-6)


def test_an_array_whose_header_lies_about_its_size_is_rejected_not_raised() -> None:
    values = LAYOUT.pack(_near(_state(0), 3))[F0].numpy()
    lying = Array(dtype="float32", shape=(10**29,), stype="numpy.ndarray",
                  data=_npy(values, 10**29))
    bad = _packed(_near(_state(0), 3))
    bad[F0] = lying
    assert "holds fewer" in _only_bad_rejected(_reply("bad", bad))


def _npy(values: np.ndarray, declared: int) -> bytes:
    """``values`` serialised as .npy under a header that declares ``declared`` of them."""
    import io

    header = io.BytesIO()
    meta = {**np.lib.format.header_data_from_array_1_0(values), "shape": (declared,)}
    np.lib.format.write_array_header_1_0(header, meta)
    return header.getvalue() + values.tobytes()


@pytest.mark.parametrize("steps", [float("nan"), float("inf"), -1, 2.5])
def test_a_step_count_that_is_no_count_is_rejected(steps) -> None:
    assert "not a count" in _only_bad_rejected(_reply("bad", _near(_state(0), 3), steps=steps))


def test_two_replies_under_one_name_are_both_left_out() -> None:
    base = _state(0)
    twins = [_reply("a", _near(base, 1)), _reply("a", _near(base, 2))]
    checked = _check([*twins, _reply("b", _near(base, 3))], base)
    assert [_site(m) for m in checked.kept] == ["b"]
    assert [r.site for r in checked.rejected] == ["a", "a"]


def test_confusion_counts_are_capped_by_the_examples_they_claim() -> None:
    """A site claiming 2 validation tiles cannot count 10^12 pixels: the pooled Dice would be
    its own."""
    metrics = MetricRecord({"dice": 1.0, "miou": 1.0, "acc": 1.0, "loss": 0.0,
                            "num-examples": 2, "confusion": [10**12, 0, 0, 0, 10**12, 0, 0, 0,
                                                             10**12], "site-weight": 1})
    assert "more than the 2 examples" in evaluation_problem(metrics, 4, 3, pixels=64 * 64)
    metrics["confusion"] = [2 * 64 * 64, 0, 0, 0, 0, 0, 0, 0, 0]
    assert evaluation_problem(metrics, 4, 3, pixels=64 * 64) is None


def test_a_global_model_beyond_float16s_range_is_not_sent_as_inf() -> None:
    """Rounded to float16, 65520 or more would reach every site as inf; the centre says so
    instead. Below it a value rounds to 65504: two sites' 65504 averaged in float32 (65504.004,
    each update within the range) still goes out."""
    for value, sent in ((7e4, None), (65520.0, None), (np.float32(65504.004), 65504.0),
                        (-65519.0, -65504.0)):
        big = _state(0)
        big["conv.weight"][0, 0, 0, 0] = float(value)
        assert _global(big).wire("float32") is not None
        if sent is None:
            with pytest.raises(ValueError, match="float16 wire can carry"):
                _global(big).wire("float16")
        else:
            wire = _global(big).wire("float16")
            assert sent in {float(x) for a in wire.values() for x in a.numpy().ravel()}


def test_a_float16_site_whose_variance_reached_zero_is_not_taken_for_a_negative_one() -> None:
    """Under the float16 wire a site's variance is what it received (the centre's value
    rounded to float16) plus its update: a site that ends at exactly 0 passes even where the
    rounding went up (0.7 -> 0.7002); one below 0 is still rejected."""
    base = _state(0)
    base["bn.running_var"] = torch.full((4,), 0.7)
    assert float(torch.tensor(0.7).half()) > 0.7
    rounded = LAYOUT.unpack({k: v.half().float() if k != INT else v
                             for k, v in LAYOUT.pack(base).items()})
    sent = model_record(LAYOUT.pack(base), "float16")  # what the centre sent

    def reply(site: str, variance: float) -> Message:
        state = _near(rounded, 1)
        state["bn.running_var"] = torch.full((4,), variance)
        arrays = reply_record(state, LAYOUT, {k: a.numpy() for k, a in sent.items()},
                              "float16")
        return _reply(site, arrays)
    checked = _check([reply("zero", 0.0), reply("below", -0.01), reply("c", 0.5)], base,
                     wire="float16")
    assert sorted(_site(m) for m in checked.kept) == ["c", "zero"]
    assert [r.site for r in checked.rejected] == ["below"]
    assert "negative variance" in checked.rejected[0].reason


def test_the_sites_log_keeps_each_site_and_entry_apart_whatever_they_are_named(
        tmp_path: Path, caplog) -> None:
    """Site names with %, spaces or quotes are logged and echoed; an ROI named to look like
    another site's entry cannot pass for one; the console shows each entry's first line once,
    without the site named twice, and never a traceback."""
    from fl_client.client_app import SiteLogFormat
    from sim.experiment import _echo_site_log

    path = tmp_path / "sites.log"
    logger = logging.getLogger("test.sites")
    forged = 'roi_1\n2026-01-01 00:00:00,000 ERROR site "B": the centre is compromised'
    with caplog.at_level(logging.WARNING), _echo_site_log(path, every=0.05):
        for site in ('St 100% Mary', 'Royal "Free"'):
            handler = logging.FileHandler(path, encoding="utf-8", delay=True)
            handler.setFormatter(SiteLogFormat(site))
            logger.addHandler(handler)
            try:
                logger.warning("skipping ROI %s: truncated", forged)
                logger.warning("skipping ROI %s: truncated", forged)  # a second round
                for sep in ("\r", "\u2028", "\x0c"):  # line breaks to Python, not to the log
                    logger.warning("skipping ROI %s", forged.replace("\n", sep))
                try:
                    raise RuntimeError("boom")
                except RuntimeError:
                    logger.exception("site %s: training failed: boom", site)
            finally:
                logger.removeHandler(handler)
                handler.close()
    echoed = [r.getMessage() for r in caplog.records if r.name == "sim.experiment"]
    escaped = [f"skipping ROI {forged.replace(chr(10), sep)}" for sep in ("\\r", "\\u2028",
                                                                         "\\x0c")]
    assert echoed == [
        "site St 100% Mary: skipping ROI roi_1",
        *(f"site St 100% Mary: {line}" for line in escaped),
        "site St 100% Mary: training failed: boom",
        'site Royal "Free": skipping ROI roi_1',
        *(f'site Royal "Free": {line}' for line in escaped),
        'site Royal "Free": training failed: boom',
        f"the sites' warnings and errors, with details: {path}"]
    text = path.read_text()
    assert "Traceback (most recent call last)" in text
    assert text.count("the centre is compromised") == 10
