"""The arithmetic of one paper-size update, on one core: what a site does to send it and what
the centre does to check, clip and add it, for each wire. Prints one JSON line per wire.

    python bench/update_arithmetic.py            # paper preset, 3 repeats, best of them
    python bench/update_arithmetic.py --preset tiny --repeats 1

The centre's figure is ``check_updates`` over two replies (the longer one is clipped to the
median, as norm-bounded averaging does with two sites), divided by two; the site's is
``reply_record`` of its trained network. Run it on an idle machine: it measures arithmetic and
memory traffic, not a federation.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fl_server.validation as validation
from egcmf_model.config import load_config
from egcmf_model.engine import build_model
from egcmf_model.packing import Layout
from fl_client.train import stand_in_update
from fl_common.wire import model_record, reply_record
from fl_server.global_model import GlobalModel

METRICS = {"train_loss": 0.5, "num-examples": 4, "train_s": 1.0, "epsilon": -1.0,
           "noise_multiplier": -1.0, "site-weight": 1, "steps": 2}


def best_of(repeats: int, work) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(wire: str, cfg, state: dict, layout: Layout, centre: GlobalModel,
            repeats: int) -> dict[str, float]:
    """Seconds of a site's reply and of the centre's work per update, for one wire."""
    sent = model_record(layout.pack(state), wire)  # what the sites receive
    reference = {k: a.numpy() for k, a in sent.items()}
    trained = []
    for seed, scale in ((1, 1e-4), (2, 3e-4)):  # two sites, the second moves further
        site = build_model(cfg.model, cfg.data.classes)
        site.load_state_dict(state)
        stand_in_update(site, seed, scale)
        trained.append(site.state_dict())
    site_s = best_of(repeats, lambda: reply_record(trained[0], layout, reference, wire))
    times = []
    for _ in range(repeats):
        messages = [Message(content=RecordDict({
            "arrays": reply_record(s, layout, reference, wire),
            "metrics": MetricRecord(METRICS),
            "site": ConfigRecord({"name": name})}), dst_node_id=1, message_type="train")
            for name, s in zip(("a", "b"), trained, strict=True)]
        start = time.perf_counter()
        checked = validation.check_updates(
            messages, centre, wire, lambda m: str(m.content["site"]["name"]),
            {"a": 4, "b": 4}, validation.UpdateRules(10.0, floor=0.0, clip=1.0), 3)
        times.append(time.perf_counter() - start)
        assert not checked.rejected, checked.rejected
    return {"site_reply_s": round(site_s, 3),
            "centre_check_per_update_s": round(min(times) / 2, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", help="model preset (default: paper)")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many (default: 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as in a run
    validation._workers = lambda tasks: 1  # one core: the cost of the arithmetic itself
    cfg = load_config(args.preset)
    torch.manual_seed(0)
    state = build_model(cfg.model, cfg.data.classes).state_dict()
    layout = Layout.of(state)
    centre = GlobalModel.of_state(layout, state)
    for wire in ("float32", "float16"):
        print(json.dumps({"preset": args.preset, "wire": wire,
                          "parameters": sum(v.numel() for v in state.values()),
                          **measure(wire, cfg, state, layout, centre, args.repeats),
                          "cores": len(os.sched_getaffinity(0))}), flush=True)


if __name__ == "__main__":
    main()
