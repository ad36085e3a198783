"""The network's weights as a few large buffers: how a model travels between centre and sites.

Flower moves every array of a message as its own object, and every 5 MiB chunk of an array as
another, each a signed HTTP request per hop: the paper preset's 762 tensors cost about 1,550
requests per model message. Packed, the floating-point tensors are laid end to end in a few
float buffers of about ``piece_bytes`` each (never splitting a tensor) and the integer ones
(BatchNorm's batch counters) in one integer buffer, in the order of the network's own
``state_dict``. Both sides build the same network, so both derive the same :class:`Layout` and
no layout travels. Element-wise strategies (FedAvg, median, trimmed mean, Krum) work on the
buffers unchanged, and validation still sees every value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

FLOAT, INT = "float", "int"  # kinds of buffer; float buffers are named "float.00", "float.01"…
# float32 bytes per float buffer (a larger tensor is alone in its own): 29 buffers at the paper
# preset; one buffer of 305 MB made FedMedian need 4.9 GiB at the centre with 5 sites (0.5 GiB
# with 16 MiB buffers), for 37 requests fewer per message (bench/wire_pieces.py)
PIECE_BYTES = 16 * 2**20
CHUNK = 1 << 20  # values per step when an update is taken: small temporaries stay in cache


@dataclass(frozen=True)
class Slot:
    """Where one tensor of the state dict lives in its buffer."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    buffer: str  # the buffer's name
    start: int
    stop: int


def kind(buffer: str) -> str:
    """FLOAT or INT, from a buffer's name."""
    return FLOAT if buffer.startswith(FLOAT) else INT


@dataclass(frozen=True)
class Layout:
    """The order, shapes and dtypes of a state dict, and the size of each buffer."""

    slots: tuple[Slot, ...]
    sizes: tuple[tuple[str, int], ...]  # (buffer, number of elements), in order

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], piece_bytes: int = PIECE_BYTES) -> Layout:
        """The layout of ``state`` (tensors may live on the meta device: nothing is read)."""
        per_piece = max(1, piece_bytes // 4)
        pieces: list[int] = [0]  # elements in each float buffer so far
        ints, slots = 0, []
        for name, tensor in state.items():
            if tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise TypeError(f"{name}: {tensor.dtype} tensors cannot be packed")
            n = tensor.numel()
            if not tensor.dtype.is_floating_point:
                slots.append(Slot(name, tuple(tensor.shape), tensor.dtype, INT, ints, ints + n))
                ints += n
                continue
            if pieces[-1] and pieces[-1] + n > per_piece:
                pieces.append(0)
            start = pieces[-1]
            pieces[-1] += n
            slots.append(Slot(name, tuple(tensor.shape), tensor.dtype,
                              f"{FLOAT}.{len(pieces) - 1:02d}", start, start + n))
        sizes = [(f"{FLOAT}.{i:02d}", n) for i, n in enumerate(pieces) if n]
        return cls(tuple(slots), tuple(sizes + ([(INT, ints)] if ints else [])))

    def pack(self, state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32,
             minus: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``state`` -> ``{"float.00": 1-D dtype, …, "int": 1-D int64}`` (on the CPU); with
        ``minus`` (buffers of this layout), the float buffers hold ``state - minus``, computed
        tensor by tensor in float32."""
        return {b: self.pack_buffer(state, b, dtype, minus) for b, _ in self.sizes}

    def pack_buffer(self, state: Mapping[str, torch.Tensor], buffer: str,
                    dtype: torch.dtype = torch.float32,
                    minus: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """One buffer of :meth:`pack` (to pack a model a buffer at a time)."""
        out = torch.empty(dict(self.sizes)[buffer],
                          dtype=dtype if kind(buffer) == FLOAT else torch.int64)
        for slot in self.slots:
            if slot.buffer != buffer:
                continue
            values = state[slot.name].detach().reshape(-1)
            if minus is None or buffer == INT:
                out[slot.start:slot.stop] = values
                continue
            reference = minus[buffer][slot.start:slot.stop]
            for start in range(0, len(values), CHUNK):
                part = slice(start, start + CHUNK)
                out[slot.start:slot.stop][part] = values[part].float() - reference[part]
        return out

    def unpack(self, buffers: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`pack`: tensors in the network's own shapes and dtypes, views of the
        buffers where the dtypes agree. Checks the buffers' structure, not their values."""
        problem = self.problem(buffers, values=False)
        if problem:
            raise ValueError(problem)
        return {s.name: buffers[s.buffer][s.start:s.stop].view(s.shape).to(s.dtype)
                for s in self.slots}

    def problem(self, buffers: Mapping[str, torch.Tensor], values: bool = True) -> str | None:
        """What is wrong with received ``buffers`` (names, sizes, dtypes, and with ``values``
        NaN/Inf); None if fine."""
        expected = dict(self.sizes)
        if set(buffers) != set(expected):
            missing = sorted(set(expected) - set(buffers))
            extra = sorted(set(buffers) - set(expected))
            return (f"wrong buffers: {len(buffers)} sent, {len(expected)} expected (missing "
                    f"{missing[:3]}, unexpected {extra[:3]})")
        for name, n in expected.items():
            got = buffers[name]
            if got.dim() != 1 or got.numel() != n:
                return f"buffer {name}: shape {tuple(got.shape)}, expected ({n},)"
            floating = got.dtype.is_floating_point
            if floating != (kind(name) == FLOAT):
                wanted = "floating" if kind(name) == FLOAT else "integer"
                return f"buffer {name}: dtype {got.dtype} is not {wanted}"
            if values and floating and not bool(torch.isfinite(got).all()):
                return f"buffer {name}: holds NaN or Inf"
        return None
