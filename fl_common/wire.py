"""How the model crosses the wire: its packed buffers (:mod:`egcmf_model.packing`) as Flower
arrays, in float32 or float16.

``float32``: every message carries the weights themselves.

``float16``: half the bytes each way. The centre sends its global model rounded to float16, so a
site starts from weights within 2⁻¹¹ (relative) of the centre's; the site answers with its
update, ``w_site − w_received``, in float16; the centre adds the update to its own float32
model. Updates far smaller than float16's resolution of a weight add up at the centre, where
plain float16 weights would lose them. The dtype of each float buffer says which form it has;
the integer buffer always travels as it is.

Both sides agree on the layout because both build the same network; nothing else travels.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

from egcmf_model.packing import FLOAT, Layout, kind

from . import WIRE_DTYPES

__all__ = ["WIRE_DTYPES", "Decoded", "decoded_record", "model_record", "received",
           "reply_record", "view"]
CHUNK = 1 << 20  # elements per step when a norm or a check runs over a buffer


def model_record(buffers: Mapping[str, torch.Tensor | np.ndarray], dtype: str = "float32"
                 ) -> ArrayRecord:
    """The packed model as Flower arrays: float buffers in ``dtype``, the integer one as is."""
    record = ArrayRecord()
    for name, buf in buffers.items():
        values = buf.detach().cpu().numpy() if torch.is_tensor(buf) else np.asarray(buf)
        if kind(name) == FLOAT and values.dtype != np.dtype(dtype):
            values = tensor(values).to(getattr(torch, dtype)).numpy()
        record[name] = to_array(values)
    return record


def to_array(values: np.ndarray) -> Array:
    """A Flower array holding ``values`` (1-D), serialised as ``np.save`` would, in one copy."""
    values = np.ascontiguousarray(values)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join((header.getvalue(), memoryview(values).cast("B")))
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY,
                 data=data)


def received(record: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """A message's model at a site: its buffers as they came (float32 or float16), their
    structure checked against the layout (the centre validated the values). float32 ones are
    writable copies the site owns; float16 ones read-only (the site's update is taken
    against them)."""
    buffers = {name: view(array) if array.dtype == "float16" else array.numpy()
               for name, array in record.items()}
    problem = layout.problem({k: tensor(v) for k, v in buffers.items()}, values=False)
    if problem:
        raise ValueError(f"the centre's model does not fit this site's network: {problem}")
    return buffers


def as_float32(buffers: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Writable float32 tensors of ``buffers`` (the same memory where they already are)."""
    return {k: torch.from_numpy(v if v.dtype == np.float32 else to_float32(v))
            if kind(k) == FLOAT else torch.from_numpy(v) for k, v in buffers.items()}


def reply_record(state: Mapping[str, torch.Tensor], layout: Layout,
                 reference: Mapping[str, np.ndarray], dtype: str) -> ArrayRecord:
    """A site's trained network (``state``) for the wire: its packed weights (float32), or
    their difference from the ``reference`` buffers it received (float16)."""
    minus = None if dtype == "float32" else {
        k: tensor(v) for k, v in reference.items() if kind(k) == FLOAT}
    record = ArrayRecord()
    for name, _ in layout.sizes:  # a buffer at a time: one buffer's copy in memory at once
        values = layout.pack_buffer(state, name, getattr(torch, dtype), minus)
        record[name] = to_array(values.numpy())
    return record


# numpy parses array headers with ast.literal_eval, which CPython 3.11 can fail from several
# threads at once ("SystemError: AST constructor recursion depth mismatch", cpython #106905);
# the centre reads replies from one thread per core, so headers are parsed one at a time
_HEADERS = threading.Lock()


def view(array: Array) -> np.ndarray:
    """The values of a Flower array without a copy (read-only)."""
    if array.stype != SType.NUMPY:
        raise ValueError(f"unsupported array serialisation {array.stype!r}")
    data = memoryview(array.data)
    stream = _Reader(data)
    major, _ = np.lib.format.read_magic(stream)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    with _HEADERS:
        shape, fortran, dtype = read_header(stream)
    if fortran or dtype.hasobject:
        raise ValueError("unsupported array layout")
    count = math.prod(shape)
    if count < 0 or count * dtype.itemsize > len(data) - stream.offset:
        raise ValueError(f"the header declares {count} values; the array holds fewer")
    return np.frombuffer(data, dtype=dtype, count=count, offset=stream.offset).reshape(shape)


class _Reader:
    """The file-like object numpy's header reader needs, over a memoryview."""

    def __init__(self, data: memoryview) -> None:
        self.data, self.offset = data, 0

    def read(self, n: int) -> bytes:
        chunk = bytes(self.data[self.offset:self.offset + n])
        self.offset += len(chunk)
        return chunk


class Decoded(Array):
    """A Flower array whose values are already decoded: strategies read them as they are,
    without decoding the reply a second time."""

    def __init__(self, values: np.ndarray) -> None:
        super().__init__(dtype=str(values.dtype), shape=tuple(values.shape),
                         stype=SType.NUMPY, data=b"")
        self.__dict__["_values"] = values

    def numpy(self) -> np.ndarray:
        return self.__dict__["_values"]


def decoded_record(values: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of :class:`Decoded` arrays (Flower's constructor would re-create them)."""
    record = ArrayRecord()
    for name, array in values.items():
        record[name] = Decoded(array)
    return record


def squared_distance(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """``||a - b||²`` (``||a||²`` without ``b``) in float64, a chunk at a time through one
    reused float64 buffer: no float64 copy of the model, no full-size temporary, and no float32
    overflow or rounding (finite float32 values above 1.8e19 would square to inf)."""
    return sum((float(torch.dot(d, d)) for d in _chunks(a, b, torch.float64, torch.Tensor.sub_)),
               0.0)


def largest_sum(a: np.ndarray, b: np.ndarray) -> float:
    """``max |a + b|`` in float32 (``a`` float16 or float32), a chunk at a time through one
    reused buffer: no model-sized temporary."""
    largest = 0.0
    for s in _chunks(a, b, torch.float32, torch.Tensor.add_):
        low, high = torch.aminmax(s)
        largest = max(largest, -float(low), float(high))
    return largest


def _chunks(a: np.ndarray, b: np.ndarray | None, dtype: torch.dtype,
            combine: Callable[[torch.Tensor, torch.Tensor], Any]) -> Iterator[torch.Tensor]:
    """``a`` a chunk at a time in ``dtype``, each combined in place with the same chunk of
    ``b`` (when given), all through one reused buffer (each chunk is valid until the next)."""
    x, y = tensor(a), None if b is None else tensor(b)
    buffer = torch.empty(min(CHUNK, x.numel()), dtype=dtype)
    for start in range(0, x.numel(), CHUNK):
        stop = min(start + CHUNK, x.numel())
        chunk = buffer[:stop - start]
        chunk.copy_(x[start:stop])
        if y is not None:
            combine(chunk, y[start:stop])
        yield chunk


def to_float32(values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``values`` in float32: a new copy, or written into ``out`` (float16 converts with the
    CPU's vector instructions, twice as fast as numpy's conversion)."""
    if out is not None:
        torch.from_numpy(out).copy_(tensor(values))
        return out
    return tensor(values).float().numpy() if values.dtype == np.float16 else \
        values.astype(np.float32)


def all_finite(a: np.ndarray) -> bool:
    return all(np.isfinite(a[start:start + CHUNK]).all() for start in range(0, a.size, CHUNK))


def tensor(values: np.ndarray) -> torch.Tensor:
    """A tensor sharing ``values``' memory, also when it is read-only (for writing it out)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)
