"""The network's weights as a few large buffers: how a model travels between centre and sites.

Flower moves every array of a message as its own object, and every 5 MiB chunk of an array as
another, each a signed HTTP request per hop: the paper preset's 762 tensors cost about 1,550
requests per model message. Packed, the floating-point tensors are laid end to end in one float
buffer and the integer ones (BatchNorm's batch counters) in one integer buffer, in the order of
the network's own ``state_dict``. Both sides build the same network, so both derive the same
:class:`Layout` and no layout travels. Element-wise strategies (FedAvg, median, trimmed mean,
Krum) work on the buffers unchanged, and validation still sees every value.

A float buffer may also travel as float16 *differences* from a reference model the receiver
holds (:meth:`Layout.pack_delta`): plain float16 weights lose updates smaller than about 2⁻¹¹
of a weight's size, differences keep them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

FLOAT, INT = "float", "int"  # buffer names in a packed model


@dataclass(frozen=True)
class Slot:
    """Where one tensor of the state dict lives in its buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffer: str  # FLOAT or INT
    start: int
    stop: int


@dataclass(frozen=True)
class Layout:
    """The order, shapes and dtypes of a state dict, and the size of each buffer."""

    slots: tuple[Slot, ...]
    sizes: tuple[tuple[str, int], ...]  # (buffer, number of elements)

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Layout:
        """The layout of ``state`` (tensors may live on the meta device: nothing is read)."""
        offsets = {FLOAT: 0, INT: 0}
        slots = []
        for name, tensor in state.items():
            if tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise TypeError(f"{name}: {tensor.dtype} tensors cannot be packed")
            buffer = FLOAT if tensor.dtype.is_floating_point else INT
            start = offsets[buffer]
            offsets[buffer] = start + tensor.numel()
            slots.append(Slot(name, tuple(tensor.shape), tensor.dtype, buffer, start,
                              offsets[buffer]))
        return cls(tuple(slots), tuple((b, n) for b, n in offsets.items() if n))

    def pack(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32
             ) -> dict[str, torch.Tensor]:
        """``state`` -> ``{"float": 1-D dtype, "int": 1-D int64}`` (buffers on the CPU)."""
        buffers = {b: torch.empty(n, dtype=dtype if b == FLOAT else torch.int64)
                   for b, n in self.sizes}
        for slot in self.slots:
            buffers[slot.buffer][slot.start:slot.stop] = state[slot.name].detach().reshape(-1)
        return buffers

    def unpack(self, buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack`: tensors in the network's own dtypes and shapes."""
        problem = self.problem(buffers)
        if problem:
            raise ValueError(problem)
        return {s.name: buffers[s.buffer][s.start:s.stop].view(s.shape).to(s.dtype)
                for s in self.slots}

    def pack_delta(self, state: Mapping[str, torch.Tensor],
                   reference: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16
                   ) -> dict[str, torch.Tensor]:
        """Floats as ``state - reference`` in ``dtype``; integers as they are."""
        diff = {s.name: (state[s.name].detach().float() - reference[s.name].detach().float())
                if s.buffer == FLOAT else state[s.name] for s in self.slots}
        return self.pack(diff, dtype)

    def unpack_delta(self, buffers: Mapping[str, torch.Tensor],
                     reference: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack_delta`, in float32 arithmetic."""
        diff = self.unpack({b: t.float() if b == FLOAT else t for b, t in buffers.items()})
        return {s.name: (reference[s.name].float() + diff[s.name]).to(s.dtype)
                if s.buffer == FLOAT else diff[s.name] for s in self.slots}

    def problem(self, buffers: Mapping[str, torch.Tensor]) -> str | None:
        """What is wrong with received ``buffers`` (names, sizes, dtypes, NaN/Inf); None if fine."""
        expected = dict(self.sizes)
        if set(buffers) != set(expected):
            return (f"wrong buffers: got {sorted(buffers)}, expected {sorted(expected)}")
        for name, n in expected.items():
            got = buffers[name]
            if got.dim() != 1 or got.numel() != n:
                return f"buffer {name}: shape {tuple(got.shape)}, expected ({n},)"
            floating = got.dtype.is_floating_point
            if floating != (name == FLOAT):
                kind = "floating" if name == FLOAT else "integer"
                return f"buffer {name}: dtype {got.dtype} is not {kind}"
            if floating and not bool(torch.isfinite(got).all()):
                return f"buffer {name}: holds NaN or Inf"
        return None
