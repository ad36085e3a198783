#!/usr/bin/env bash
# The simulation at paper size, training skipped, against bare Flower's simulation moving the
# same number of float32 parameters, in one invocation (CPU):
#   ../shared/bench/flower_baseline.py --params P --clients N --rounds R
#   python sim/run.py --preset paper --set train.skip=true --clients N --rounds R
# Prints one JSON line per run and the ratio of the seconds per round (ours: every round and
# the final evaluation-only message, over R). By hand:
#   bash bench/sim_paper.sh            # 5 clients, 3 rounds, the default wire
#   CLIENTS=2 ROUNDS=2 bash bench/sim_paper.sh
#   WIRE=float32 bash bench/sim_paper.sh   # ours with --wire float32
set -euo pipefail
CLIENTS=${CLIENTS:-5}; ROUNDS=${ROUNDS:-3}; WIRE=${WIRE:-}
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/paper_common.sh" flower_baseline.py  # BASELINE, PARAMS, WORK
echo "{\"clients\": $CLIENTS, \"rounds\": $ROUNDS, \"params\": $PARAMS, \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"
# the sites train on nothing with train.skip; four small ROIs each give every site a validation ROI
egcmf synth --out "$WORK/data" --sites "$CLIENTS" --rois-per-site 4 --size 256 2>/dev/null
python "$HERE/peak_rss.py" -- python "$BASELINE" --params "$PARAMS" --clients "$CLIENTS" \
  --rounds "$ROUNDS" > "$WORK/baseline.txt" 2> "$WORK/baseline.log"
python "$HERE/peak_rss.py" -- python "$HERE/../sim/run.py" --preset paper --set train.skip=true \
  --clients "$CLIENTS" --rounds "$ROUNDS" --data "$WORK/data" --dataset synthetic \
  --partition institution ${WIRE:+--wire "$WIRE"} --out "$WORK/run" > "$WORK/ours.txt" \
  2> "$WORK/ours.log"
python - "$WORK" <<'PY'
import json, re, sys
from pathlib import Path
work = Path(sys.argv[1])
base_text = (work / "baseline.txt").read_text()
base = float(re.search(r"per_round_s=([\d.]+)", base_text).group(1))
base_rss = json.loads(base_text.strip().splitlines()[-1])["peak_rss_gib"]
summary = json.loads((work / "run" / "summary.json").read_text())
seconds = [v["round"] for v in summary["round_seconds"].values()]
ours = (sum(seconds) + summary["final_evaluation_seconds"]) / len(seconds)
ours_rss = json.loads((work / "ours.txt").read_text().strip().splitlines()[-1])["peak_rss_gib"]
print(json.dumps({"run": "baseline", "seconds_per_round": base, "peak_rss_gib": base_rss}))
print(json.dumps({"run": "ours", "wire": summary["wire"], "round_seconds": seconds,
                  "final_evaluation_seconds": summary["final_evaluation_seconds"],
                  "seconds_per_round": round(ours, 2), "peak_rss_gib": ours_rss}))
print(json.dumps({"ours_over_baseline": round(ours / base, 3),
                  "load_after": open("/proc/loadavg").read().split()[:3]}))
PY
rm -rf "$WORK"
