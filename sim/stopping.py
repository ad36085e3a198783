"""How a simulation that is stopped (Ctrl-C, SIGTERM, the terminal closing) says so."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


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


@contextlib.contextmanager
def signals_to(handler: Callable[[int, Any], Any] | signal.Handlers) -> Iterator[None]:
    """The stop signals go to ``handler`` while the block runs, then back to where they went;
    outside the main thread, where Python handles no signal, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, previous in before.items():
            signal.signal(sig, previous)
