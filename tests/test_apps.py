"""The ClientApp driven with real Flower Messages: what it replies, and what it never sends."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from egcmf_model.config import apply_overrides, from_dict, load_config, to_yaml
from egcmf_model.engine import build_model
from egcmf_model.packing import INT, Layout
from fl_client.client_app import make_client_app
from fl_client.failures import INCOMPATIBLE, SITE_DATA
from fl_common.wire import model_record
from fl_server.federation import FederationSettings

pytestmark = pytest.mark.usefixtures("task_identity")


def _packed(state: dict[str, torch.Tensor], wire: str = "float32") -> ArrayRecord:
    """A model message's arrays, as the centre sends them."""
    return model_record(Layout.of(state).pack(state), wire)


def _weights(reply: Message, sent: Message) -> dict[str, torch.Tensor]:
    """The state dict a float32 training reply carries (the layout of the model sent)."""
    layout = _layout(sent)
    return layout.unpack({k: torch.from_numpy(v.numpy()) for k, v in
                          reply.content["arrays"].items()})


def _layout(msg: Message) -> Layout:
    cfg = from_dict(yaml.safe_load(str(msg.content["config"]["egcmf-config"])), "test")
    with torch.device("meta"):
        return Layout.of(build_model(cfg.model, tuple(cfg.data.classes)).state_dict())


def _sent(msg: Message) -> dict[str, torch.Tensor]:
    return _layout(msg).unpack({k: torch.from_numpy(v.numpy()).float() if k != INT else
                                torch.from_numpy(v.numpy())
                                for k, v in msg.content["arrays"].items()})


def _message(kind: str, variant: str = "full", rnd: int = 1, *extra: str) -> Message:
    cfg = load_config("tiny", overrides=[f"model.variant={variant}", "train.epochs=1", *extra])
    torch.manual_seed(0)  # the same global model in every message
    model = build_model(cfg.model, tuple(cfg.data.classes))
    content = RecordDict({"arrays": _packed(model.state_dict()),
                          "config": ConfigRecord({"egcmf-config": to_yaml(cfg),
                                                  "server-round": rnd})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


@pytest.fixture
def site_context(synth_root: Path) -> Context:
    return _context({"site": "plagh", "data": str(synth_root / "site_01"), "device": "cpu"})


def _assert_only_weights_and_scalars(reply: Message, sent: Message) -> None:
    content = reply.content
    assert set(content.keys()) <= {"arrays", "metrics", "evaluation", "site"}
    assert dict(content["site"]) == {"name": "plagh"}
    metrics = {k: v for name in ("metrics", "evaluation") if name in content
               for k, v in content[name].items()}
    for key, value in metrics.items():
        assert isinstance(value, int | float) or key == "confusion", key
    if "arrays" in content:  # exactly the network's packed buffers, nothing shaped like an image
        assert {k: a.shape for k, a in content["arrays"].items()} == {
            k: (n,) for k, n in _layout(sent).sizes}
    text = json.dumps({"metrics": metrics, "site": dict(content["site"])})
    assert "roi_" not in text
    assert "/" not in text
    assert ".png" not in text


def test_train_reply_holds_weights_scalars_and_site_name_only(site_context: Context) -> None:
    app = make_client_app()
    reply = app(_message(MessageType.TRAIN), site_context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 3  # the three training ROIs of site_01
    assert np.isfinite(metrics["train_loss"])
    _assert_only_weights_and_scalars(reply, _message(MessageType.TRAIN))


def test_evaluate_reply_reports_the_papers_metrics(site_context: Context) -> None:
    reply = make_client_app()(_message(MessageType.EVALUATE), site_context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert {"dice", "miou", "acc", "loss", "num-examples", "confusion"} <= set(metrics.keys())
    assert len(metrics["confusion"]) == 9
    assert sum(metrics["confusion"]) == 64 * 64
    assert "arrays" not in reply.content
    _assert_only_weights_and_scalars(reply, _message(MessageType.EVALUATE))


def test_one_message_brings_the_evaluation_and_the_training(site_context: Context) -> None:
    """A training message with ``evaluate``: the site evaluates the model it received, before
    training on it, and replies with both; the evaluation is that of the received model."""
    msg = _message(MessageType.TRAIN, "unet")
    msg.content["config"]["evaluate"] = True
    reply = make_client_app()(msg, site_context)
    assert not reply.has_error(), reply.error
    alone = make_client_app()(_message(MessageType.EVALUATE, "unet"), site_context)
    assert dict(reply.content["evaluation"]) == dict(alone.content["metrics"])
    trained = make_client_app()(_message(MessageType.TRAIN, "unet"), site_context)
    assert dict(reply.content["metrics"]) | {"train_s": 0} == \
        dict(trained.content["metrics"]) | {"train_s": 0}
    assert all(np.array_equal(a.numpy(), trained.content["arrays"][k].numpy())
               for k, a in reply.content["arrays"].items())
    _assert_only_weights_and_scalars(reply, msg)


def test_the_float16_wire_sends_the_update_in_float16(site_context: Context) -> None:
    """The centre sends its model rounded to float16; the site trains from it and answers
    with w_site - w_received in float16."""
    msg = _message(MessageType.TRAIN, "unet")
    sent = msg.content["arrays"]
    msg.content["arrays"] = model_record({k: a.numpy() for k, a in sent.items()}, "float16")
    msg.content["config"]["wire"] = "float16"
    reply = make_client_app()(msg, site_context)
    assert not reply.has_error(), reply.error
    arrays = reply.content["arrays"]
    assert {a.dtype for k, a in arrays.items() if k != INT} == {"float16"}
    start = {k: a.numpy().astype(np.float32) for k, a in msg.content["arrays"].items()}
    update = {k: a.numpy().astype(np.float32) for k, a in arrays.items() if k != INT}
    assert all(np.abs(v).max() > 0 for v in update.values())  # it trained
    assert all(np.abs(v).max() < 1 for v in update.values())  # an update, not weights
    float32 = dict(site_context.node_config)
    msg.content["config"]["wire"] = "float32"
    weights = make_client_app()(msg, _context(float32)).content["arrays"]
    for k, v in update.items():  # the same training, as an update
        assert np.allclose(start[k] + v, weights[k].numpy(), atol=1e-3)


def test_training_is_deterministic_per_site_and_round(site_context: Context) -> None:
    app = make_client_app()
    a, b, c = (app(_message(MessageType.TRAIN, "unet", rnd), site_context).content["arrays"]
               for rnd in (1, 1, 2))
    first = next(iter(a.keys()))
    assert np.array_equal(a[first].numpy(), b[first].numpy())
    assert not np.array_equal(a[first].numpy(), c[first].numpy())


def test_the_site_builds_its_network_once_without_random_initialisation() -> None:
    """The runner answers every task with one app: the network is built once per model
    configuration, on the meta device (the random number generator is not touched), and takes
    each message's weights as they were decoded, without a copy."""
    from fl_client.model_io import Networks

    cfg = load_config("tiny", overrides=["model.variant=unet"]).model
    classes, cpu = ("background", "in_situ", "invasive"), torch.device("cpu")
    first, second = (build_model(cfg, classes).state_dict() for _ in range(2))
    networks = Networks()
    rng = torch.random.get_rng_state()
    model, got = networks.load(cfg, classes, _packed(first), cpu)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(model.state_dict()[k], first[k]) for k in first)
    name = next(k for k, v in first.items() if v.is_floating_point())
    slot = next(s for s in got.layout.slots if s.name == name)
    assert model.state_dict()[name].data_ptr() == \
        torch.from_numpy(got.buffers[slot.buffer]).data_ptr() + 4 * slot.start
    again, _ = networks.load(cfg, classes, _packed(second), cpu)
    assert again is model
    assert all(torch.equal(model.state_dict()[k], second[k]) for k in second)
    other = dataclasses.replace(cfg, variant="mrfm")
    assert networks.load(other, classes, _packed(build_model(other, classes).state_dict()),
                         cpu)[0] is not model


def test_site_with_other_classes_is_refused(synth_root: Path, site_context: Context) -> None:
    cfg = apply_overrides(load_config("tiny"), ["data.classes=[tumor, stroma]"])
    msg = _message(MessageType.EVALUATE)
    msg.content["config"]["egcmf-config"] = to_yaml(cfg)
    reply = make_client_app()(msg, site_context)
    assert reply.error.code == INCOMPATIBLE
    assert "does not fit this site" in reply.error.reason


def test_a_site_refuses_a_centre_of_another_version(site_context: Context,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """A site runs its own installed code: a centre of another version of EGCMF-FL gets an
    incompatible-federation failure, and the site's log says which version to install."""
    from fl_common import VERSION_KEY, package_version

    msg = _message(MessageType.EVALUATE)
    msg.content["config"][VERSION_KEY] = "0.0.1"
    reply = make_client_app()(msg, site_context)
    assert reply.error.code == INCOMPATIBLE
    assert "another version of EGCMF-FL" in reply.error.reason
    assert f"the centre runs EGCMF-FL 0.0.1 and this site {package_version()}" in caplog.text
    msg.content["config"][VERSION_KEY] = package_version()
    assert make_client_app()(msg, site_context).has_content()


def test_settings_come_from_run_config_with_defaults() -> None:
    settings = FederationSettings.from_run_config(
        {"num-rounds": 5, "resume": True}, {"run-dir": "/tmp/x", "num-rounds": 2})
    assert settings.num_rounds == 5
    assert settings.resume
    assert settings.run_dir == "/tmp/x"
    with pytest.raises(ValueError, match="run-dir"):
        FederationSettings.from_run_config({}, {})


def test_bench_skip_returns_the_weights_moved_by_a_seeded_step(site_context: Context) -> None:
    """train.skip: no training; every weight moves by a small random step, the same for the
    same site and round, so that a benchmark's messages differ as real updates do."""
    from fl_client.train import STAND_IN_SCALE

    msg = _message(MessageType.TRAIN, "unet")
    msg.content["config"]["egcmf-config"] = to_yaml(
        apply_overrides(load_config("tiny"), ["model.variant=unet", "train.skip=true"]))
    sent = _sent(msg)
    reply = make_client_app()(msg, site_context)
    back = _weights(reply, msg)
    floats = [k for k, v in sent.items() if v.is_floating_point()]
    steps = torch.cat([(back[k] - sent[k]).reshape(-1) for k in floats])
    assert 0.5 * STAND_IN_SCALE < float(steps.std()) < 2 * STAND_IN_SCALE
    assert all(torch.equal(sent[k], back[k]) for k in sent if k not in floats)
    again = _weights(make_client_app()(msg, site_context), msg)
    assert all(torch.equal(back[k], again[k]) for k in back)
    assert reply.content["metrics"]["train_s"] == 0.0


def test_fedbn_keeps_normalisation_layers_at_the_site(site_context: Context,
                                                      tmp_path: Path) -> None:
    from fl_client.fedbn import norm_state, restore_local_norms

    context = _context({**dict(site_context.node_config), "state-dir": str(tmp_path)})
    msg = _message(MessageType.TRAIN, "unet")
    msg.content["config"]["egcmf-config"] = to_yaml(apply_overrides(
        load_config("tiny"), ["model.variant=unet", "train.epochs=1",
                              "train.keep_norm_local=true"]))
    msg.content["config"]["federation-id"] = "fed1"
    reply = make_client_app()(msg, context)
    saved = tmp_path / "plagh" / "fedbn-fed1.pt"
    assert saved.exists()
    trained = _weights(reply, msg)
    local = torch.load(saved, weights_only=True)
    assert local
    assert all(torch.equal(local[k], trained[k]) for k in local)
    fresh = build_model(load_config("tiny", overrides=["model.variant=unet"]).model,
                        ("background", "in_situ", "invasive"))
    norms = {n for n, m in fresh.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert {k.rsplit(".", 1)[0] for k in local} == norms  # all norm layers, nothing else
    assert restore_local_norms(fresh, saved)
    state = norm_state(fresh)
    assert all(torch.equal(state[k], local[k]) for k in local)
    # Another federation (another run folder or config) does not inherit these layers: the site
    # trains exactly as a site with nothing on its disk.
    msg.content["config"]["federation-id"] = "fed2"
    make_client_app()(msg, context)
    empty = _context({**dict(site_context.node_config), "state-dir": str(tmp_path / "empty")})
    make_client_app()(msg, empty)
    other, clean = (torch.load(d / "plagh" / "fedbn-fed2.pt", weights_only=True)
                    for d in (tmp_path, tmp_path / "empty"))
    assert all(torch.equal(other[k], clean[k]) for k in clean)


def test_a_site_past_its_budget_refuses_to_train_and_still_evaluates(
        synth_root: Path, tmp_path: Path) -> None:
    from fl_client.client_app import PRIVACY_BUDGET_SPENT

    context = _context({"site": "plagh", "data": str(synth_root / "site_01"), "device": "cpu",
                        "state-dir": str(tmp_path), "dp": True, "dp-epsilon": 0.5})
    cfg = load_config("tiny", overrides=[
        "model.variant=unet", "model.norm=group", "train.epochs=1", "dp.enabled=true",
        "dp.noise_multiplier=1.0"])  # one step at noise 1 spends far more than epsilon 0.5
    model = build_model(cfg.model, tuple(cfg.data.classes))

    def message(kind: str) -> Message:
        content = RecordDict({"arrays": _packed(model.state_dict()), "config": ConfigRecord(
            {"egcmf-config": to_yaml(cfg), "server-round": 1})})
        return Message(content=content, dst_node_id=1, message_type=kind)

    reply = make_client_app()(message(MessageType.TRAIN), context)
    assert reply.has_error()
    assert reply.error.code == PRIVACY_BUDGET_SPENT
    assert "site plagh: privacy budget spent" in reply.error.reason
    assert not (tmp_path / "plagh" / "privacy.json").exists()  # nothing was spent
    reply = make_client_app()(message(MessageType.EVALUATE), context)
    assert not reply.has_error()
    assert 0 <= reply.content["metrics"]["dice"] <= 1
    both = message(MessageType.TRAIN)  # evaluation and training in one message
    both.content["config"]["evaluate"] = True
    reply = make_client_app()(both, context)
    assert not reply.has_error()
    assert 0 <= reply.content["evaluation"]["dice"] <= 1
    assert reply.content["failure"]["code"] == PRIVACY_BUDGET_SPENT
    assert "privacy budget spent" in reply.content["failure"]["reason"]
    assert "arrays" not in reply.content


def _dp_message(kind: str, *extra: str) -> Message:
    cfg = load_config("tiny", overrides=[
        "model.variant=unet", "model.norm=group", "train.epochs=1", "dp.enabled=true",
        "dp.noise_multiplier=1.0", "dp.epsilon=100", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model, tuple(cfg.data.classes))
    content = RecordDict({"arrays": _packed(model.state_dict()), "config": ConfigRecord(
        {"egcmf-config": to_yaml(cfg), "server-round": 1})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def test_only_a_simulation_replays_its_dp_noise(synth_root: Path, tmp_path: Path) -> None:
    """A curious centre knows the seed it sent; a deployed site's noise is still unknown to it.
    The same message twice: different weights from the deployment's app, identical ones from
    a simulation's."""
    def trained(app_defaults: dict | None, run: str) -> dict[str, torch.Tensor]:
        context = _context({"site": "plagh", "data": str(synth_root / "site_01"),
                            "device": "cpu", "state-dir": str(tmp_path / run)})
        msg = _dp_message(MessageType.TRAIN)
        reply = make_client_app(app_defaults)(msg, context)
        assert not reply.has_error(), reply.error
        return _weights(reply, msg)

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) for k in a)

    assert not same(trained(None, "deployed-1"), trained(None, "deployed-2"))
    simulated = {"simulation": True}
    assert same(trained(simulated, "sim-1"), trained(simulated, "sim-2"))


def _broken_site(synth_root: Path, tmp_path: Path, damage: str) -> Path:
    site = tmp_path / "plagh"
    shutil.copytree(synth_root / "site_01", site)
    if damage == "png":  # the only validation ROI: its H&E PNG cut short after the header
        png = site / "rois" / "roi_0003" / "he.png"
        png.write_bytes(png.read_bytes()[:200])
    else:
        (site / "site.yaml").write_text("name: [unclosed")
    return site


@pytest.mark.parametrize("damage", ["png", "site.yaml"])
def test_a_failure_reply_names_its_class_not_the_file(
        synth_root: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    """Flower would send the exception's text, with paths and ROI ids, to the centre; the
    reply holds only the class of failure, and the site's log the detail."""
    site = _broken_site(synth_root, tmp_path, damage)
    context = _context({"site": "plagh", "data": str(site), "device": "cpu"})
    with caplog.at_level(logging.WARNING):
        reply = make_client_app()(_message(MessageType.EVALUATE, "unet"), context)
    assert reply.has_error()
    assert reply.error.code == SITE_DATA
    assert reply.error.reason == ("site plagh: evaluation failed: the site's data could not be "
                                  "read; the details are in the site's log")
    for secret in (str(tmp_path), "roi_0003", ".png", "site.yaml", "/"):
        assert secret not in reply.error.reason
    bad_file = site / ("rois/roi_0003/he.png" if damage == "png" else "site.yaml")
    assert str(bad_file) in caplog.text


def test_an_inflating_site_claims_a_billion_examples(site_context: Context) -> None:
    """The ``inflate`` fault of a simulation: w_g - 9 (w_site - w_g) at ratio 10, 1e9 tiles."""
    from fl_client.faults import INFLATED_EXAMPLES

    msg = _message(MessageType.TRAIN, "unet")
    sent = _sent(msg)
    honest = _weights(make_client_app()(msg, site_context), msg)
    reply = make_client_app({"faults": {"plagh": "inflate"}, "max-update-ratio": 10.0})(
        msg, site_context)
    assert reply.content["metrics"]["num-examples"] == INFLATED_EXAMPLES
    back = _weights(reply, msg)
    name = next(k for k, v in sent.items() if v.is_floating_point())
    torch.testing.assert_close(back[name], sent[name] - 9.0 * (honest[name] - sent[name]))


def test_deleting_the_cache_does_not_reset_a_privacy_budget(
        synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger lives in the site's state folder (fl-client --state-dir, by default
    $EGCMF_STATE_DIR or ~/.local/state/egcmf-fl), never in a cache."""
    import shutil

    from egcmf_model.data.source import cache_dir
    from fl_client.state import default_state_dir

    cache, state = tmp_path / "cache", tmp_path / "state"
    monkeypatch.setenv("EGCMF_CACHE", str(cache))
    monkeypatch.setenv("EGCMF_STATE_DIR", str(state))
    cache.mkdir()
    context = _context({"site": "plagh", "data": str(synth_root / "site_01"), "device": "cpu",
                        "dp": True, "dp-epsilon": 50.0})  # no state-dir: the default
    cfg = load_config("tiny", overrides=[
        "model.variant=unet", "model.norm=group", "train.epochs=1", "dp.enabled=true",
        "dp.noise_multiplier=1.0"])
    model = build_model(cfg.model, tuple(cfg.data.classes))

    def train(rnd: int) -> float:
        content = RecordDict({"arrays": _packed(model.state_dict()), "config": ConfigRecord(
            {"egcmf-config": to_yaml(cfg), "server-round": rnd})})
        reply = make_client_app()(Message(content=content, dst_node_id=1,
                                          message_type=MessageType.TRAIN), context)
        assert not reply.has_error(), reply.error
        return reply.content["metrics"]["epsilon"]

    first = train(1)
    shutil.rmtree(cache)  # "clear the cache"
    second = train(2)
    assert second > first > 0  # the budget kept counting
    assert (state / "plagh" / "privacy.json").exists()
    monkeypatch.delenv("EGCMF_STATE_DIR")
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert default_state_dir() == Path.home() / ".local" / "state" / "egcmf-fl"
    assert cache_dir() not in default_state_dir().parents
