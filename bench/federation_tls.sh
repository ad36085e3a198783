#!/usr/bin/env bash
# A real federation over TLS on loopback, for the paper-sized model with training skipped
# (train.skip), against bare Flower moving the same bytes, in one invocation:
#   baseline  ../shared/bench/flower_deploy_baseline.py --arrays 50 (bare Flower, numpy arrays,
#             the same TLS and site authentication; its other settings are its defaults)
#   float32   fl-server start / fl-client as shipped, with --wire float32
#   float16   the same with --wire float16 (the default)
#   no-front  float32 with Flower's plain SuperLink serving every API (bench/no_front.py)
# Prints one JSON line per variant: seconds of each round, seconds per round (ours: the final
# evaluation-only message included), bytes per site per round and in model copies (Flower's
# counters), peak memory of the centre's and of one site's process tree; then the ratios.
#   bash bench/federation_tls.sh 2
#   ROUNDS=2 VARIANTS="float32 no-front" bash bench/federation_tls.sh 5
# Every process gets one CPU thread (OMP_NUM_THREADS, unless set): the centre and all the
# sites share this one machine, where each would otherwise run as many PyTorch threads as it
# has cores, and the oversubscribed pools slow every round; bare Flower's numpy runs one.
set -euo pipefail
SITES=${1:-2}; ROUNDS=${ROUNDS:-5}; VARIANTS=${VARIANTS:-"baseline float32 float16"}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
source "$HERE/paper_common.sh" flower_deploy_baseline.py  # BASELINE, PARAMS, WORK
names=$(seq -f "site%g" 1 "$SITES" | paste -sd, -)
# 256 px ROIs: at 64 px the registration check at the site can misread the 1 µm jitter
egcmf synth --out "$WORK/data" --sites "$SITES" --rois-per-site 2 --size 256 2>/dev/null
fl-server certs --out "$WORK/certs" --sites "$names" 2>/dev/null
echo "{\"sites\": $SITES, \"rounds\": $ROUNDS, \"params\": $PARAMS, \"threads\": $OMP_NUM_THREADS, \"load\": \"$(cut -d' ' -f1-3 /proc/loadavg)\"}"

baseline() {
  python "$BASELINE" --certs "$WORK/certs" --sites "$SITES" --arrays 50 \
    > "$WORK/baseline.json" 2> "$WORK/baseline.log"
  python - "$WORK/baseline.json" "$SITES" "$PARAMS" <<'PY'
import json, sys
doc = json.loads(open(sys.argv[1]).read().splitlines()[-1])
sites, params = int(sys.argv[2]), float(sys.argv[3])
seconds, rounds = doc["round_seconds"], len(doc["round_seconds"])
per_site = doc["network_traffic"]["total-bytes"] / sites / rounds
print(json.dumps({"variant": "baseline", "arrays": doc["arrays"], "rounds": rounds,
                  "round_seconds": seconds,
                  "seconds_per_round": round(sum(seconds) / rounds, 2),
                  "bytes_per_site_per_round": round(per_site),
                  "model_copies_per_site_per_round": round(per_site / (4 * params), 3)}))
PY
}

ours() {  # $1: variant; one federation, one JSON line
  local out="$WORK/$1" port wire=float32
  port=$(python -c "from fl_common.procs import free_port; print(free_port())")
  mkdir -p "$out"
  local server=(fl-server)
  [ "$1" = no-front ] && server=(python "$HERE/no_front.py")
  [ "$1" = float16 ] && wire=float16
  python "$HERE/peak_rss.py" -- "${server[@]}" start --preset paper --set train.skip=true \
    --wire "$wire" --rounds "$ROUNDS" --min-sites "$SITES" --address "127.0.0.1:$port" \
    --certs "$WORK/certs" --run-dir "$out/run" > "$out/server.json" 2> "$out/server.log" &
  for i in $(seq 1 "$SITES"); do
    EGCMF_STATE_DIR="$out/state$i" python "$HERE/peak_rss.py" -- fl-client --site "site$i" \
      --server "127.0.0.1:$port" --data "$WORK/data/site_0$i" --certs "$WORK/certs" \
      --max-wait 60 --device cpu > "$out/client$i.json" 2> "$out/client$i.log" &
  done
  wait
  python - "$out" "$1" "$SITES" "$ROUNDS" "$PARAMS" <<'PY'
import json, sys
from pathlib import Path
out, variant, sites, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
params = float(sys.argv[5])
summary = json.loads((out / "run" / "summary.json").read_text())
traffic = summary["flower"]["network-traffic"]
clients = [json.loads((out / f"client{i}.json").read_text()) for i in range(1, sites + 1)]
seconds = [v["round"] for v in summary["round_seconds"].values()]
final = summary["final_evaluation_seconds"]
per_site = traffic["total-bytes"] / sites / rounds
print(json.dumps({
    "variant": variant, "wire": summary["wire"], "rounds": rounds, "round_seconds": seconds,
    "final_evaluation_seconds": final,
    "seconds_per_round": round((sum(seconds) + final) / rounds, 2),
    "bytes_per_site_per_round": round(per_site),
    "model_copies_per_site_per_round": round(per_site / (4 * params), 3),
    "server_peak_rss_gib": json.loads((out / "server.json").read_text())["peak_rss_gib"],
    "client_peak_rss_gib": max(c["peak_rss_gib"] for c in clients)}))
PY
}

for variant in $VARIANTS; do
  if [ "$variant" = baseline ]; then baseline; else ours "$variant"; fi | tee -a "$WORK/results.jsonl"
done
python - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = {r["variant"]: r for r in map(json.loads, open(sys.argv[1]))}
ratios = {}
if "baseline" in rows:
    for name in ("float32", "float16", "no-front"):
        if name in rows:
            ratios[f"{name}_over_baseline_seconds"] = round(
                rows[name]["seconds_per_round"] / rows["baseline"]["seconds_per_round"], 3)
            ratios[f"{name}_over_baseline_bytes"] = round(
                rows[name]["bytes_per_site_per_round"]
                / rows["baseline"]["bytes_per_site_per_round"], 3)
if {"float32", "no-front"} <= set(rows):
    ratios["front_over_no_front"] = round(
        rows["float32"]["seconds_per_round"] / rows["no-front"]["seconds_per_round"], 3)
print(json.dumps({**ratios, "load_after": open("/proc/loadavg").read().split()[:3]}))
PY
rm -rf "$WORK"
