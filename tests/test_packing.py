"""The packed wire format: a few buffers that round-trip the network's state dict exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from egcmf_model.config import load_config
from egcmf_model.engine import build_model
from egcmf_model.packing import FLOAT, INT, Layout

CLASSES = ("background", "in_situ", "invasive")


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, CLASSES)
    model.train()(**{k: torch.rand(2, c, 64, 64) for k, c in
                     (("he", 3), ("ck56", 3), ("edge", 2))}, he_40x=torch.rand(2, 3, 256, 256))
    return model.state_dict()  # BatchNorm counters are now 1, running stats moved


def test_pack_round_trips_every_tensor_exactly() -> None:
    state = _state()
    layout = Layout.of(state)
    buffers = layout.pack(state)
    assert set(buffers) == {FLOAT, INT}
    assert buffers[FLOAT].dtype == torch.float32
    assert buffers[INT].dtype == torch.int64
    back = layout.unpack(buffers)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_layout_from_the_meta_device_matches_a_real_network() -> None:
    cfg = load_config("tiny").model
    with torch.device("meta"):
        meta = build_model(cfg, CLASSES)
    assert Layout.of(meta.state_dict()) == Layout.of(_state())


def test_float16_delta_keeps_small_updates_that_float16_weights_lose() -> None:
    state = _state()
    layout = Layout.of(state)
    update = {k: v + 1e-4 * v.abs().clamp(min=1e-3) if v.dtype.is_floating_point else v
              for k, v in state.items()}
    decoded = layout.unpack_delta(layout.pack_delta(update, state), state)
    plain = layout.unpack(layout.pack(update, torch.float16))
    name = next(k for k, v in state.items() if v.dtype.is_floating_point and v.numel() > 100)
    delta_err = (decoded[name] - update[name]).abs().max()
    plain_err = (plain[name] - update[name]).abs().max()
    assert delta_err < 1e-6 < plain_err
    assert decoded[name].dtype == torch.float32


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: {FLOAT: b[FLOAT]}, "wrong buffers"),
    (lambda b: {**b, FLOAT: b[FLOAT][:-1]}, "shape"),
    (lambda b: {**b, FLOAT: b[FLOAT].double().long()}, "not floating"),
    (lambda b: {**b, FLOAT: torch.cat([b[FLOAT][:-1], torch.tensor([float("nan")])])}, "NaN"),
])
def test_malformed_buffers_are_named(change, message) -> None:
    state = _state()
    layout = Layout.of(state)
    bad = change(layout.pack(state))
    assert message in layout.problem(bad)
    with pytest.raises(ValueError, match=message):
        layout.unpack(bad)


def test_layout_is_independent_of_weights() -> None:
    cfg = dataclasses.replace(load_config("tiny").model, variant="unet")
    a, b = (build_model(cfg, CLASSES).state_dict() for _ in range(2))
    assert Layout.of(a) == Layout.of(b)
