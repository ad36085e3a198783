#!/usr/bin/env bash
# The main job and the runs its figures in bench/RESULTS.md come from, with the commands the
# README shows, each on an empty data cache of its own folder, one after another (CPU):
#   python sim/run.py --clients 5                        (peak memory and seconds, peak_rss.py)
#   python sim/run.py --clients 5 --rounds 14 --seed 0   (the README's "Reproduce" line: the same)
#   python sim/run.py --compare --clients 5 --budget steps
#   python sim/run.py --clients 5 --dp --epsilon 8
#   python sim/run.py --clients 5 --set model.norm=group --local-epochs 1
#                     (the same run without DP: its network's norm, its local epochs)
#   python sim/run.py --clients 4 --rounds 6 --local-epochs 6 [--fault inflate:1|dropout:1|
#                     reverse:1 [--norm-clip 0]]
# Prints the pooled Dice of each run (initial, final, best) and its seconds.
#   bash bench/main_job.sh                 # everything (about 30 minutes on 2 cores)
#   RUNS="main compare" bash bench/main_job.sh
set -euo pipefail
RUNS=${RUNS:-"main reproduce compare dp dp-none nofault inflate dropout reverse reverse-noclip"}
WORK=${WORK:-$(mktemp -d)}
export FLWR_TELEMETRY_ENABLED=0 EGCMF_CACHE="$WORK/cache"
HERE=$(cd "$(dirname "$0")" && pwd)
cd "$HERE/.."
echo "{\"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\", \"work\": \"$WORK\"}"

one() {  # $1: name; the rest: sim/run.py's flags
  local name=$1; shift
  local began=$SECONDS
  if [ "$name" = main ]; then
    python "$HERE/peak_rss.py" -- python sim/run.py "$@" --out "$WORK/$name" \
      > "$WORK/$name.log" 2>&1
  else
    python sim/run.py "$@" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  fi
  python - "$WORK/$name" "$name" $((SECONDS - began)) <<'PY'
import json, sys
from pathlib import Path
run, name, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
runs = [run] if (run / "summary.json").exists() else sorted(p for p in run.iterdir() if p.is_dir())
for r in runs:
    s = json.loads((r / "summary.json").read_text())
    final = (s.get("final") or {}).get("dice")
    print(json.dumps({"run": name if r == run else f"{name}/{r.name}", "seconds": seconds,
                      "initial": (s.get("initial") or {}).get("dice"), "final": final,
                      "best": s.get("best"), "epsilon": s.get("epsilon")}))
PY
}

for run in $RUNS; do
  case $run in
    main) one main --clients 5 ;;
    reproduce) one reproduce --clients 5 --rounds 14 --seed 0 ;;
    compare) one compare --compare --clients 5 --budget steps ;;
    dp) one dp --clients 5 --dp --epsilon 8 ;;
    dp-none) one dp-none --clients 5 --set model.norm=group --local-epochs 1 ;;
    nofault) one nofault --clients 4 --rounds 6 --local-epochs 6 ;;
    inflate) one inflate --clients 4 --rounds 6 --local-epochs 6 --fault inflate:1 ;;
    dropout) one dropout --clients 4 --rounds 6 --local-epochs 6 --fault dropout:1 ;;
    reverse) one reverse --clients 4 --rounds 6 --local-epochs 6 --fault reverse:1 ;;
    reverse-noclip) one reverse-noclip --clients 4 --rounds 6 --local-epochs 6 \
      --fault reverse:1 --norm-clip 0 ;;
    *) echo "unknown run $run" >&2; exit 2 ;;
  esac
done
