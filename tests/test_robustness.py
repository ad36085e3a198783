"""Update validation on the server, one test per rule, and every kind of injected fault."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from egcmf_model.packing import INT, Layout
from fl_client.faults import FAULTS, inject_fault, misshape
from fl_common.wire import Decoded, model_record, reply_record
from fl_server.global_model import GlobalModel
from fl_server.strategy import STRATEGIES, StrategyOptions, make_strategy
from fl_server.validation import validate_updates
from sim.run import main as sim_main

pytestmark = pytest.mark.usefixtures("task_identity")


def _state(seed: int = 0, scale: float = 1.0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("conv.weight", torch.randn(4, 3, 3, 3, generator=g) * scale),
                        ("bn.running_mean", torch.zeros(4)),
                        ("bn.num_batches_tracked", torch.tensor(3))])


LAYOUT = Layout.of(_state())
F0 = "float.00"


def _global() -> GlobalModel:
    return GlobalModel.of_state(LAYOUT, _state(0))


def _reply(site: str, state: OrderedDict | ArrayRecord, wire: str = "float32") -> Message:
    reference = model_record(LAYOUT.pack(_state(0)), wire)  # what the centre sent
    arrays = state if isinstance(state, ArrayRecord) else reply_record(
        state, LAYOUT, {k: a.numpy() for k, a in reference.items()}, wire)
    content = RecordDict({"arrays": arrays,
                          "metrics": MetricRecord({"num-examples": 4}),
                          "site": ConfigRecord({"name": site})})
    return Message(content=content, dst_node_id=1, message_type="train")


def _site(msg: Message) -> str:
    return str(msg.content["site"]["name"])


def _packed(state: OrderedDict, **changes: np.ndarray) -> ArrayRecord:
    buffers = {k: v.numpy() for k, v in LAYOUT.pack(state).items()}
    return ArrayRecord({k: Array(v) for k, v in {**buffers, **changes}.items()})


def _check(bad: OrderedDict | ArrayRecord) -> list[str]:
    replies = [_reply("a", _state(1)), _reply("b", _state(2)), _reply("bad", bad)]
    kept, rejected = validate_updates(replies, _global(), "float32", _site, max_ratio=10.0)
    assert [_site(m) for m in kept] == ["a", "b"]
    assert [r.site for r in rejected] == ["bad"]
    return [r.reason for r in rejected]


def test_healthy_updates_pass() -> None:
    replies = [_reply(s, _state(i)) for i, s in enumerate("abc", start=1)]
    kept, rejected = validate_updates(replies, _global(), "float32", _site, 10.0)
    assert len(kept) == 3
    assert rejected == []


def test_wrong_number_of_arrays() -> None:
    bad = _packed(_state(3))
    del bad[INT]
    assert "wrong arrays" in _check(bad)[0]


def test_wrong_shape() -> None:
    values = LAYOUT.pack(_state(3))[F0].numpy()
    assert "shape" in _check(_packed(_state(3), **{F0: np.append(values, 1.0)}))[0]


def test_wrong_dtype() -> None:
    values = LAYOUT.pack(_state(3))[F0].numpy()
    assert "float64" in _check(_packed(_state(3), **{F0: values.astype(np.float64)}))[0]


def test_nan_or_inf() -> None:
    bad = _state(3)
    bad["bn.running_mean"][1] = float("inf")
    assert "NaN or Inf" in _check(bad)[0]


def test_norm_far_outside_the_others() -> None:
    assert "median of the others" in _check(_state(3, scale=1e4))[0]


def test_missing_arrays() -> None:
    msg = _reply("bad", _state(3))
    del msg.content["arrays"]
    kept, rejected = validate_updates([msg], _global(), "float32", _site, 10.0)
    assert kept == []
    assert "no arrays" in rejected[0].reason


def test_each_reply_is_decoded_once_and_the_strategy_reads_it_as_decoded() -> None:
    """Validation decodes a reply's buffers (float32: without a copy) and hands them to the
    strategy, which averages them without decoding the reply again."""
    replies = [_reply("a", _state(1)), _reply("b", _state(2))]
    kept, _ = validate_updates(replies, _global(), "float32", _site, 10.0)
    assert all(isinstance(a, Decoded) for m in kept for a in m.content["arrays"].values())
    assert all(not a.numpy().flags.owndata for m in kept for a in m.content["arrays"].values())
    for m in kept:
        m.content["arrays"].pop(INT)
    floats, _ = make_strategy(StrategyOptions(min_sites=2)).aggregate_train(1, kept)
    expected = (LAYOUT.pack(_state(1))[F0] + LAYOUT.pack(_state(2))[F0]) / 2
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
    replies = [_reply(s, trained, "float16") for s in "ab"]
    kept, rejected = validate_updates(replies, _global(), "float16", _site, 10.0)
    assert not rejected
    decoded = kept[0].content["arrays"][F0].numpy()
    master = LAYOUT.pack(_state(0))[F0].numpy()
    expected = LAYOUT.pack(update)[F0].numpy()
    assert decoded.dtype == np.float32
    # kept to float32's resolution of the weights (the site trains in float32)
    assert np.abs((decoded - master) - expected).max() < 0.05 * np.abs(expected).max()
    as_float16 = LAYOUT.pack(trained)[F0].half().float().numpy()  # plain float16 weights
    lost = as_float16 - LAYOUT.pack(rounded)[F0].numpy()
    assert np.abs(lost - expected).max() > 0.5 * np.abs(expected).max()
    _, refused = validate_updates([_reply("c", trained, "float32")], _global(), "float16",
                                  _site, 10.0)  # the wrong form for this run
    assert "float32, expected" in refused[0].reason


@pytest.mark.parametrize("kind", ["nan", "shape", "scale"])
def test_each_corrupting_fault_is_rejected(kind: str) -> None:
    weights = LAYOUT.pack(_state(3))
    record = model_record(inject_fault(kind, weights))
    assert _check(misshape(record) if kind == "shape" else record)


def test_dropout_fault_kills_the_site() -> None:
    with pytest.raises(RuntimeError, match="dropout"):
        inject_fault("dropout", LAYOUT.pack(_state(0)))
    assert FAULTS == ("nan", "shape", "scale", "dropout", "inflate")


def test_inflate_fault_passes_the_norm_rule_it_was_built_for() -> None:
    """The inflating site reverses its own update and stretches it to 0.9x the limit it expects
    (its own update norm standing in for the others' median): an attack the norm rule lets
    through whenever the sites' updates are alike, as they are in a federation."""
    received = _state(0)
    honest = {k: v + 0.01 * _state(i)[k] if v.is_floating_point() else v
              for i, (k, v) in enumerate(received.items(), start=1)}
    sent = inject_fault("inflate", LAYOUT.pack(honest), LAYOUT.pack(received),
                        max_update_ratio=10.0)
    step = LAYOUT.pack(honest)[F0] - LAYOUT.pack(received)[F0]
    torch.testing.assert_close(sent[F0], LAYOUT.pack(received)[F0] - 9.0 * step)
    assert torch.equal(sent[INT], LAYOUT.pack(honest)[INT])
    others = [_reply(s, OrderedDict((k, v + 0.01 * _state(seed)[k]) if v.is_floating_point()
                                    else (k, v) for k, v in received.items()))
              for s, seed in (("a", 5), ("b", 6))]
    kept, rejected = validate_updates([*others, _reply("bad", model_record(sent))], _global(),
                                      "float32", _site, max_ratio=10.0)
    assert not rejected
    assert [_site(m) for m in kept] == ["a", "b", "bad"]
    with pytest.raises(ValueError, match="max update ratio"):
        inject_fault("inflate", LAYOUT.pack(honest))


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
