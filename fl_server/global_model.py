"""The centre's global model: the float32 master copy of the network's packed buffers.

Flower's strategies see the float buffers only (``floats``) and aggregate them element by
element; the integer buffer (BatchNorm's batch counters, which no strategy should average or
clip) of a new global model is the largest count any valid site reports. What goes to the sites
is :meth:`GlobalModel.wire`: the same buffers, or their float16 rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache, cached_property

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from egcmf_model.packing import FLOAT, INT, Layout, Slot, kind
from fl_common.wire import model_record, tensor, view

FLOAT16_MAX = float(np.finfo(np.float16).max)
FLOAT16_OVERFLOW = 65520.0  # the smallest magnitude that float16 rounds to infinity
VARIANCE = "running_var"  # BatchNorm's running variance: never negative in an honest model


@cache
def variance_slots(layout: Layout) -> tuple[Slot, ...]:
    """Where the BatchNorm running variances of ``layout`` live (all in float buffers)."""
    return tuple(s for s in layout.slots if kind(s.buffer) == FLOAT and s.name.endswith(VARIANCE))


def slots_named(layout: Layout, names: Iterable[str]) -> tuple[Slot, ...]:
    """The slots of the tensors ``names`` (state-dict names), in the layout's order."""
    wanted = set(names)
    return tuple(s for s in layout.slots if s.name in wanted)


@dataclass(frozen=True)
class GlobalModel:
    layout: Layout
    floats: ArrayRecord  # float32 float buffers: what the strategies aggregate
    ints: np.ndarray | None  # the integer buffer, None for a network without one

    @classmethod
    def of_state(cls, layout: Layout, state: Mapping[str, torch.Tensor]) -> GlobalModel:
        buffers = layout.pack(state)
        ints = buffers.pop(INT, None)
        return cls(layout, model_record(buffers), None if ints is None else ints.numpy())

    @classmethod
    def aggregated(cls, previous: GlobalModel, floats: ArrayRecord,
                   ints: list[np.ndarray]) -> GlobalModel:
        """The new global model from a strategy's float buffers (float32 kept as they are) and
        the valid replies' integer buffers."""
        record = ArrayRecord({k: a if a.dtype == "float32" else
                              Array(a.numpy().astype(np.float32)) for k, a in floats.items()})
        counters = previous.ints if not ints else np.maximum.reduce(ints)
        return cls(previous.layout, record, counters)

    def without_negative_variances(self) -> tuple[GlobalModel, int]:
        """This model with BatchNorm running variances below 0 raised to 0, and how many there
        were. An average of valid updates has none; server-side DP noise can make some (raising
        them is post-processing, which spends no privacy). Left negative, they would make every
        evaluation NaN and every site's next update fail validation."""
        variances = variance_slots(self.layout)
        count = sum(int((self.values[s.buffer][s.start:s.stop] < 0).sum()) for s in variances)
        if not count:
            return self, 0
        floats = {k: view(a).copy() for k, a in self.floats.items()}
        for s in variances:
            np.maximum(floats[s.buffer][s.start:s.stop], 0, out=floats[s.buffer][s.start:s.stop])
        return GlobalModel(self.layout, model_record(floats), self.ints), count

    def keeping(self, previous: GlobalModel, slots: tuple[Slot, ...]) -> GlobalModel:
        """This model with the values of ``slots`` (float weights) taken back from
        ``previous``: for weights no site trains (encoders frozen under DP-SGD), which
        server-side DP noise (and the rounding of an average) would otherwise move. Using
        ``previous``, which the sites already hold, is post-processing: no privacy spent."""
        if all(np.array_equal(self.values[s.buffer][s.start:s.stop],
                              previous.values[s.buffer][s.start:s.stop]) for s in slots):
            return self
        floats = {k: view(a).copy() for k, a in self.floats.items()}
        for s in slots:
            floats[s.buffer][s.start:s.stop] = previous.values[s.buffer][s.start:s.stop]
        return GlobalModel(self.layout, model_record(floats), self.ints)

    @cached_property
    def values(self) -> dict[str, np.ndarray]:
        """Every buffer, float32 and int64, without a copy (read-only)."""
        out = {k: view(a) for k, a in self.floats.items()}
        if self.ints is not None:
            out[INT] = self.ints
        return out

    def wire(self, dtype: str) -> ArrayRecord:
        """What the sites receive: the buffers, with the float ones in ``dtype``."""
        return self._float16 if dtype == "float16" else self._float32

    def state(self) -> dict[str, torch.Tensor]:
        """The network's state dict, sharing this model's memory (to be read, not changed)."""
        return self.layout.unpack({k: tensor(v) for k, v in self.values.items()})

    @cached_property
    def _float32(self) -> ArrayRecord:
        extra = {} if self.ints is None else {INT: Array(self.ints)}
        return ArrayRecord({**self.floats, **extra})

    @cached_property
    def _float16(self) -> ArrayRecord:
        largest = max((_largest(view(a)) for a in self.floats.values()), default=0.0)
        if not largest < FLOAT16_OVERFLOW:  # below it, a value rounds to at most 65504
            raise ValueError(f"the global model holds a value of {largest:.6g}, beyond what "
                             "the float16 wire can carry (65504): resume with --wire float32")
        return model_record(self.values, "float16")


def _largest(values: np.ndarray) -> float:
    """The largest magnitude in ``values``, without a copy of them."""
    if not values.size:
        return 0.0
    low, high = torch.aminmax(tensor(values))
    return max(-float(low), float(high))
