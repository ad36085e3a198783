"""How a simulation that is stopped (Ctrl-C, SIGTERM, the terminal closing) says so."""

from __future__ import annotations

import signal
from pathlib import Path


def stop_line(out: Path | None, resumable: bool = True) -> str:
    """What a stopped run tells its user: where it stands and the command that goes on."""
    if out is None or not out.is_dir() or not any(out.iterdir()):
        return "sim/run.py: stopped before the run began; nothing was written"
    if not resumable:
        return (f"sim/run.py: stopped; what was written stays in {out}, but only a federated "
                "run can be resumed: run this one again with another --out")
    return (f"sim/run.py: stopped; the finished rounds stay in {out}: continue with "
            f"python sim/run.py --resume --out {out}")


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
