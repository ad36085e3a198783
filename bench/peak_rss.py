"""Peak resident memory and CPU time of a command and every process it starts (sampled).

    python bench/peak_rss.py -- python sim/run.py --clients 20 --rounds 2

Ray's workers, Flower's SuperNodes and ClientApps are separate processes, so the peak of the
whole tree, not of one process, is what must fit in the machine's memory. ``cpu_s`` is the
user + system time of every process of the tree, each as last seen (sampled every 0.25 s, so a
process that ends loses at most its last 0.25 s): on a shared machine the wall time grows with
the load, the CPU time much less.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


def tree_rss_kib(root: int, cpu: dict[int, float] | None = None) -> int:
    """Summed resident memory of ``root``'s tree; ``cpu`` collects each process's CPU seconds."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    ticks: dict[int, int] = {}
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
        ticks[pid] = int(stat[11]) + int(stat[12])  # utime + stime
        rss[pid] = next((int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("VmRSS:")), 0)
    total = 0
    for pid in rss:
        p = pid
        while p not in (0, 1) and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += rss[pid]
            if cpu is not None:
                cpu[pid] = ticks[pid] / TICKS
    return total


def main() -> None:
    command = sys.argv[sys.argv.index("--") + 1:] if "--" in sys.argv else sys.argv[1:]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak, cpu = 0, {}
    while proc.poll() is None:
        peak = max(peak, tree_rss_kib(proc.pid, cpu))
        time.sleep(0.25)
    print(json.dumps({"command": " ".join(command), "returncode": proc.returncode,
                      "peak_rss_gib": round(peak / 2**20, 2),
                      "seconds": round(time.perf_counter() - start, 1),
                      "cpu_s": round(sum(cpu.values()), 1)}))


if __name__ == "__main__":
    main()
