"""What a site pays before it can work on a message: importing the ClientApp, and per message
reading the configuration and building the network with the received weights.

    python bench/site_setup.py --preset paper --messages 3

Evaluation messages with ``train.skip`` (the site then evaluates nothing), so the time of each
call is the set-up alone. Prints one JSON line: the import time in a fresh process (best of
``--imports``), and the seconds of each message answered by one app in one process (the site's
runner keeps its app between tasks; the first call builds the network, the next reuse it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORT = "import time; t = time.perf_counter(); import fl_client.client_app; " \
         "print(time.perf_counter() - t)"


def import_seconds(runs: int) -> float:
    return min(float(subprocess.run([sys.executable, "-c", IMPORT], capture_output=True,
                                    text=True, check=True).stdout) for _ in range(runs))


def message_seconds(preset: str, messages: int) -> list[float]:
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from egcmf_model.config import load_config, to_yaml
    from egcmf_model.data.synthetic import write_synthetic
    from egcmf_model.engine import build_model
    from egcmf_model.packing import Layout
    from fl_client.client_app import make_client_app
    from fl_common.wire import model_record

    cfg = load_config(preset, overrides=["train.skip=true"])
    state = build_model(cfg.model, tuple(cfg.data.classes)).state_dict()
    record = model_record(Layout.of(state).pack(state))  # what the centre sends
    data = Path(tempfile.mkdtemp()) / "synth"
    write_synthetic(data, sites=1, rois_per_site=3, size=64, seed=0)
    app = make_client_app()
    context = Context(run_id=1, node_id=1, node_config={"data": str(data / "site_01"),
                                                        "device": "cpu"},
                      state=RecordDict(), run_config={})
    times = []
    for rnd in range(1, messages + 1):
        content = RecordDict({"arrays": record, "config": ConfigRecord(
            {"egcmf-config": to_yaml(cfg), "server-round": rnd})})
        msg = Message(content=content, dst_node_id=1, message_type=MessageType.EVALUATE)
        start = time.perf_counter()
        reply = app(msg, context)
        times.append(round(time.perf_counter() - start, 3))
        assert not reply.has_error(), reply.error
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=("tiny", "paper"))
    p.add_argument("--messages", type=int, default=3)
    p.add_argument("--imports", type=int, default=3)
    args = p.parse_args()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    print(json.dumps({"preset": args.preset, "import_s": round(import_seconds(args.imports), 3),
                      "message_s": message_seconds(args.preset, args.messages)}))


if __name__ == "__main__":
    main()
