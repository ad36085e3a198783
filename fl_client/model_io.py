"""The global model in and out of a site: its network built once, the received weights put in
without a copy, the trained weights packed for the wire (:mod:`fl_common.wire`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord

from egcmf_model.config import ModelConfig
from egcmf_model.engine import build_model
from egcmf_model.network import EGCMF
from egcmf_model.packing import Layout
from fl_common.wire import as_float32, received, reply_record


@dataclass(frozen=True)
class Received:
    """The global model as a message brought it: the buffers as they came (float32 or
    float16; the site's float16 update is taken against them) and their layout."""

    layout: Layout
    buffers: dict[str, np.ndarray]

    def weights(self) -> dict[str, torch.Tensor]:
        """The packed weights in float32 (a copy: training changes the network's own)."""
        return {k: v.clone() for k, v in as_float32(self.buffers).items()}


class Networks:
    """The site's network, kept from one message to the next in a process that answers many
    (the site's runner): built once per model configuration, on the meta device (no random
    initialisation), and given each message's weights without a copy."""

    def __init__(self) -> None:
        self.key: tuple[ModelConfig, tuple[str, ...]] | None = None
        self.model: EGCMF | None = None
        self.layout: Layout | None = None

    def build(self, cfg: ModelConfig, classes: tuple[str, ...]) -> tuple[EGCMF, Layout]:
        """The network of ``cfg`` for ``classes`` (weights not loaded yet) and its layout."""
        key = (dataclasses.replace(cfg, weights=""), classes)  # the weights come in messages
        if self.model is None or self.layout is None or key != self.key:
            self.forget()
            with torch.device("meta"):
                self.model = build_model(key[0], classes)
            self.key, self.layout = key, Layout.of(self.model.state_dict())
        return self.model, self.layout

    def load(self, cfg: ModelConfig, classes: tuple[str, ...], record: ArrayRecord,
             device: torch.device) -> tuple[EGCMF, Received]:
        """The network holding the weights of ``record`` (a model message's arrays)."""
        model, layout = self.build(cfg, classes)
        got = Received(layout, received(record, layout))
        model.load_state_dict(layout.unpack(as_float32(got.buffers)), assign=True)
        return model.to(device), got

    def release(self) -> None:
        """Let the weights go between messages (the network's structure stays built)."""
        if self.model is not None:
            self.model.to("meta")

    def forget(self) -> None:
        """Drop the network (after a failure: it may hold a half-done step's state)."""
        self.key = self.model = self.layout = None


def reply_arrays(state: dict[str, torch.Tensor], got: Received, wire: str) -> ArrayRecord:
    """The site's network (``state``) for the wire: its weights (float32), or its update from
    the weights received (float16)."""
    return reply_record(state, got.layout, got.buffers, wire)
