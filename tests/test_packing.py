"""The packed wire format: a few buffers that round-trip the network's state dict exactly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from egcmf_model.config import load_config
from egcmf_model.engine import build_model
from egcmf_model.packing import INT, PIECE_BYTES, Layout

CLASSES = ("background", "in_situ", "invasive")
F0 = "float.00"


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(load_config("tiny").model, CLASSES)
    model.train()(**{k: torch.rand(2, c, 64, 64) for k, c in
                     (("he", 3), ("ck56", 3), ("edge", 2))}, he_40x=torch.rand(2, 3, 256, 256))
    return model.state_dict()  # BatchNorm counters are now 1, running stats moved


def test_pack_round_trips_every_tensor_exactly(state: dict[str, torch.Tensor]) -> None:
    layout = Layout.of(state)
    buffers = layout.pack(state)
    assert set(buffers) == {F0, INT}  # the tiny network fits one float buffer
    assert buffers[F0].dtype == torch.float32
    assert buffers[INT].dtype == torch.int64
    back = layout.unpack(buffers)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name


def test_layout_from_the_meta_device_matches_a_real_network(state: dict[str, torch.Tensor]
                                                            ) -> None:
    cfg = load_config("tiny").model
    with torch.device("meta"):
        meta = build_model(cfg, CLASSES)
    assert Layout.of(meta.state_dict()) == Layout.of(state)


def test_a_paper_model_message_has_at_most_64_arrays() -> None:
    """Flower moves each array as its own object (and each 5 MiB chunk as another): the
    paper preset's 762 tensors travel as a few buffers. Built on the meta device."""
    for variant in ("unet", "full"):
        cfg = dataclasses.replace(load_config("paper").model, variant=variant)
        with torch.device("meta"):
            state = build_model(cfg, CLASSES).state_dict()
        layout = Layout.of(state)
        assert len(layout.sizes) <= 64, (variant, len(layout.sizes))
        assert len(state) > 10 * len(layout.sizes)
        biggest = max(4 * n for name, n in layout.sizes if name != INT)
        largest_tensor = max(4 * t.numel() for t in state.values())
        assert biggest <= max(PIECE_BYTES, largest_tensor)


def test_buffers_hold_whole_tensors_in_order(state: dict[str, torch.Tensor]) -> None:
    layout = Layout.of(state, piece_bytes=40_000)
    assert len(layout.sizes) > 3
    names = [s.buffer for s in layout.slots if s.buffer != INT]
    assert names == sorted(names)  # state-dict order, buffer after buffer
    for slot in layout.slots:
        assert slot.stop - slot.start == state[slot.name].numel()
    back = layout.unpack(layout.pack(state))
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.parametrize(("change", "message"), [
    (lambda b: {F0: b[F0]}, "wrong buffers"),
    (lambda b: {**b, F0: b[F0][:-1]}, "shape"),
    (lambda b: {**b, F0: b[F0].double().long()}, "not floating"),
    (lambda b: {**b, F0: torch.cat([b[F0][:-1], torch.tensor([float("nan")])])}, "NaN"),
])
def test_malformed_buffers_are_named(change, message, state: dict[str, torch.Tensor]) -> None:
    layout = Layout.of(state)
    bad = change(layout.pack(state))
    assert message in layout.problem(bad)
    if message == "NaN":  # values are for the receiver to check; unpack checks the structure
        assert layout.problem(bad, values=False) is None
    else:
        with pytest.raises(ValueError, match=message):
            layout.unpack(bad)


def test_layout_is_independent_of_weights() -> None:
    cfg = dataclasses.replace(load_config("tiny").model, variant="unet")
    a, b = (build_model(cfg, CLASSES).state_dict() for _ in range(2))
    assert Layout.of(a) == Layout.of(b)
