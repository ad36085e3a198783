"""Following ``metrics.jsonl`` while the ServerApp writes it: whole lines only."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("fl-server")


class MetricsTail:
    """New complete lines of a JSON-lines file since the last call. A line still being written
    (no newline yet) waits for the next call; a complete line that is not JSON is reported once
    and skipped, never fatal. A file rewritten in place of the old one (a resumed run replaces
    a round's line) gives the lines from the first one that changed."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.inode = path, 0, None
        self.seen: list[bytes] = []  # the complete lines read so far

    def new_lines(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as fh:
                inode = os.fstat(fh.fileno()).st_ino
                if inode != self.inode or fh.seek(0, 2) < self.offset:
                    old, self.offset, self.seen, self.inode = self.seen, 0, [], inode
                else:
                    old = None
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        raw = complete.splitlines()
        self.seen += raw
        if old is not None:  # rewritten: what is new starts where it differs from before
            same = 0
            while same < min(len(old), len(raw)) and old[same] == raw[same]:
                same += 1
            raw = raw[same:]
        lines = []
        for line in raw:
            try:
                lines.append(json.loads(line))
            except ValueError:
                log.warning("%s: skipping a line that is not JSON: %r", self.path, line[:80])
        return lines
