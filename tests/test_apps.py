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
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from egcmf_model.config import apply_overrides, load_config, to_yaml
from egcmf_model.engine import build_model
from fl_client.client_app import make_client_app
from fl_client.failures import INCOMPATIBLE, SITE_DATA
from fl_server.federation import FederationSettings

KERNEL_MAX = 7  # largest convolution kernel in the network
pytestmark = pytest.mark.usefixtures("task_identity")


def _message(kind: str, variant: str = "full", rnd: int = 1) -> Message:
    cfg = load_config("tiny", overrides=[f"model.variant={variant}", "train.epochs=1"])
    torch.manual_seed(0)  # the same global model in every message
    model = build_model(cfg.model, tuple(cfg.data.classes))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"egcmf-config": to_yaml(cfg),
                                                  "server-round": rnd})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


@pytest.fixture
def site_context(synth_root: Path) -> Context:
    return _context({"site": "plagh", "data": str(synth_root / "site_01"), "device": "cpu"})


def _assert_only_weights_and_scalars(reply: Message) -> None:
    content = reply.content
    assert set(content.keys()) <= {"arrays", "metrics", "site"}
    assert dict(content["site"]) == {"name": "plagh"}
    for key, value in content["metrics"].items():
        assert isinstance(value, int | float) or key == "confusion", key
    if "arrays" in content:
        for name, array in content["arrays"].items():
            shape = array.shape
            # no image- or mask-like array: every weight is a vector or a small kernel stack
            assert len(shape) <= 4, name
            assert len(shape) < 2 or max(shape[2:], default=1) <= KERNEL_MAX, (name, shape)
    text = json.dumps({k: (v if k != "arrays" else None) for k, v in
                       [("metrics", dict(content["metrics"])), ("site", dict(content["site"]))]})
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
    _assert_only_weights_and_scalars(reply)


def test_evaluate_reply_reports_the_papers_metrics(site_context: Context) -> None:
    reply = make_client_app()(_message(MessageType.EVALUATE), site_context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert {"dice", "miou", "acc", "loss", "num-examples", "confusion"} <= set(metrics.keys())
    assert len(metrics["confusion"]) == 9
    assert sum(metrics["confusion"]) == 64 * 64
    assert "arrays" not in reply.content
    _assert_only_weights_and_scalars(reply)


def test_training_is_deterministic_per_site_and_round(site_context: Context) -> None:
    app = make_client_app()
    a = app(_message(MessageType.TRAIN, "unet"), site_context).content["arrays"]
    b = app(_message(MessageType.TRAIN, "unet"), site_context).content["arrays"]
    c = app(_message(MessageType.TRAIN, "unet", rnd=2), site_context).content["arrays"]
    first = next(iter(a.keys()))
    assert a.to_torch_state_dict()[first].equal(b.to_torch_state_dict()[first])
    assert not a.to_torch_state_dict()[first].equal(c.to_torch_state_dict()[first])


def test_the_site_builds_its_network_once_without_random_initialisation() -> None:
    """The runner answers every task with one app: the network is built once per model
    configuration, on the meta device (the random number generator is not touched), and takes
    each message's tensors as they are, without a copy."""
    from fl_client.client_app import Networks

    cfg = load_config("tiny", overrides=["model.variant=unet"]).model
    classes, cpu = ("background", "in_situ", "invasive"), torch.device("cpu")
    first, second = (build_model(cfg, classes).state_dict() for _ in range(2))
    networks = Networks()
    rng = torch.random.get_rng_state()
    model = networks.load(cfg, classes, first, cpu)
    assert torch.equal(torch.random.get_rng_state(), rng)
    name = next(k for k, v in first.items() if v.is_floating_point())
    assert model.state_dict()[name].data_ptr() == first[name].data_ptr()
    assert networks.load(cfg, classes, second, cpu) is model
    assert all(torch.equal(model.state_dict()[k], second[k]) for k in second)
    other = dataclasses.replace(cfg, variant="mrfm")
    assert networks.load(other, classes, build_model(other, classes).state_dict(), cpu) \
        is not model


def test_site_with_other_classes_is_refused(synth_root: Path, site_context: Context) -> None:
    cfg = apply_overrides(load_config("tiny"), ["data.classes=[tumor, stroma]"])
    msg = _message(MessageType.EVALUATE)
    msg.content["config"]["egcmf-config"] = to_yaml(cfg)
    reply = make_client_app()(msg, site_context)
    assert reply.error.code == INCOMPATIBLE
    assert "does not fit this site" in reply.error.reason


def test_settings_come_from_run_config_with_defaults() -> None:
    settings = FederationSettings.from_run_config(
        {"num-rounds": 5, "resume": True}, {"run-dir": "/tmp/x", "num-rounds": 2})
    assert settings.num_rounds == 5
    assert settings.resume
    assert settings.run_dir == "/tmp/x"
    with pytest.raises(ValueError, match="run-dir"):
        FederationSettings.from_run_config({}, {})


def test_bench_skip_returns_the_weights_untouched(site_context: Context) -> None:
    msg = _message(MessageType.TRAIN, "unet")
    msg.content["config"]["egcmf-config"] = to_yaml(
        apply_overrides(load_config("tiny"), ["model.variant=unet", "train.skip=true"]))
    sent = msg.content["arrays"].to_torch_state_dict()
    reply = make_client_app()(msg, site_context)
    back = reply.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(sent[k], back[k]) for k in sent)
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
    trained = reply.content["arrays"].to_torch_state_dict()
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
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
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


def _dp_message(kind: str, *extra: str) -> Message:
    cfg = load_config("tiny", overrides=[
        "model.variant=unet", "model.norm=group", "train.epochs=1", "dp.enabled=true",
        "dp.noise_multiplier=1.0", "dp.epsilon=100", *extra])
    torch.manual_seed(0)
    model = build_model(cfg.model, tuple(cfg.data.classes))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
        {"egcmf-config": to_yaml(cfg), "server-round": 1})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def test_only_a_simulation_replays_its_dp_noise(synth_root: Path, tmp_path: Path) -> None:
    """A curious centre knows the seed it sent; a deployed site's noise is still unknown to it.
    The same message twice: different weights from the deployment's app, identical ones from
    a simulation's."""
    def trained(app_defaults: dict | None, run: str) -> dict[str, torch.Tensor]:
        context = _context({"site": "plagh", "data": str(synth_root / "site_01"),
                            "device": "cpu", "state-dir": str(tmp_path / run)})
        reply = make_client_app(app_defaults)(_dp_message(MessageType.TRAIN), context)
        assert not reply.has_error(), reply.error
        return reply.content["arrays"].to_torch_state_dict()

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
    sent = msg.content["arrays"].to_torch_state_dict()
    honest = make_client_app()(msg, site_context).content["arrays"].to_torch_state_dict()
    reply = make_client_app({"faults": {"plagh": "inflate"}, "max-update-ratio": 10.0})(
        msg, site_context)
    assert reply.content["metrics"]["num-examples"] == INFLATED_EXAMPLES
    back = reply.content["arrays"].to_torch_state_dict()
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
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord(
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
