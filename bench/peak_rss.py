"""Peak resident memory of a command and every process it starts (summed, sampled).

    python bench/peak_rss.py -- python sim/run.py --clients 20 --rounds 2

Ray's workers, Flower's SuperNodes and ClientApps are separate processes, so the peak of the
whole tree, not of one process, is what must fit in the machine's memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def tree_rss_kib(root: int) -> int:
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parents[pid] = int(stat[1])
        rss[pid] = next((int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("VmRSS:")), 0)
    total = 0
    for pid in rss:
        p = pid
        while p not in (0, 1) and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += rss[pid]
    return total


def main() -> None:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid))
        time.sleep(0.5)
    print(json.dumps({"command": " ".join(command), "returncode": proc.returncode,
                      "peak_rss_gib": round(peak / 2**20, 2),
                      "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
