"""How big the float buffers of a packed model should be: Flower's cost of one model message,
and the centre's memory when it aggregates, for several buffer sizes.

    python bench/wire_pieces.py --preset paper --pieces-mib 0 16 64 128 --sites 5

``0`` is one float buffer for the whole model. For each size, with the paper preset's layout
(built on the meta device) and random weights: the arrays and 5 MiB chunks of one message
(each a signed HTTP request per hop), the seconds to build the message's ArrayRecord, to hash
it into Flower objects, to rebuild it from those objects (what a receiver does) and to decode
it to numpy, and the seconds and peak extra memory of Flower's FedAvg and FedMedian over
``--sites`` replies. Prints one JSON line per size.
"""

from __future__ import annotations

import argparse
import json
import time
import tracemalloc

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg, FedMedian
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from egcmf_model.config import load_config
from egcmf_model.engine import build_model
from egcmf_model.packing import Layout


def timed(work):
    start = time.perf_counter()
    result = work()
    return result, round(time.perf_counter() - start, 3)


def peak(work):
    """Seconds and peak memory (GiB) that numpy allocates while ``work`` runs."""
    tracemalloc.start()
    try:
        result, seconds = timed(work)
        return result, seconds, round(tracemalloc.get_traced_memory()[1] / 2**30, 2)
    finally:
        tracemalloc.stop()


def record_of(buffers: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in buffers.items()})


def one_size(layout: Layout, sites: int, rng: np.random.Generator) -> dict:
    buffers = {b: rng.standard_normal(n, dtype=np.float32) if b != "int"
               else np.zeros(n, np.int64) for b, n in layout.sizes}
    record, build_s = timed(lambda: record_of(buffers))
    objects, hash_s = timed(lambda: get_all_nested_objects(record))
    contents = {oid: obj.deflate() for oid, obj in objects.items()}
    rebuilt, inflate_s = timed(lambda: inflate_object_from_contents(
        record.object_id, contents, keep_object_contents=True))
    _, decode_s = timed(lambda: {k: v.numpy() for k, v in rebuilt.items()})
    replies = []
    for i in range(sites):
        content = RecordDict({"arrays": record_of({k: v + i for k, v in buffers.items()}),
                              "metrics": MetricRecord({"num-examples": 1})})
        replies.append(Message(content=content, dst_node_id=1, message_type="train"))
    strategies = {}
    for name, strategy in (("fedavg", FedAvg()), ("fedmedian", FedMedian())):
        _, seconds, gib = peak(lambda s=strategy: s.aggregate_train(1, replies))
        strategies[name] = {"s": seconds, "peak_gib": gib}
    chunks = sum(type(o).__name__ == "ArrayChunk" for o in objects.values())
    return {"float_buffers": len(layout.sizes) - 1, "arrays": len(record), "chunks": chunks,
            "build_s": build_s, "hash_s": hash_s, "inflate_s": inflate_s,
            "decode_s": decode_s, **strategies}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=("tiny", "paper"))
    p.add_argument("--pieces-mib", type=int, nargs="+", default=[0, 16, 64, 128])
    p.add_argument("--sites", type=int, default=5)
    args = p.parse_args()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    cfg = load_config(args.preset).model
    with torch.device("meta"):
        state = build_model(cfg, ("background", "in_situ", "invasive")).state_dict()
    for mib in args.pieces_mib:
        layout = Layout.of(state, mib * 2**20 if mib else 2**62)
        result = one_size(layout, args.sites, np.random.default_rng(0))
        print(json.dumps({"piece_mib": mib or "whole", **result}), flush=True)


if __name__ == "__main__":
    main()
