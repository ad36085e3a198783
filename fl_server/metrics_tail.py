"""Following ``metrics.jsonl`` while the ServerApp writes it: whole lines only."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("fl-server")


class MetricsTail:
    """New complete lines of a JSON-lines file since the last call. A line still being written
    (no newline yet) waits for the next call; a complete line that is not JSON is reported once
    and skipped, never fatal."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def new_lines(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                if fh.seek(0, 2) < self.offset:  # rewritten shorter (a resume drops lines)
                    self.offset = 0
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        lines = []
        for raw in complete.splitlines():
            try:
                lines.append(json.loads(raw))
            except ValueError:
                log.warning("%s: skipping a line that is not JSON: %r", self.path, raw[:80])
        return lines
