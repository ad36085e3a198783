#!/usr/bin/env bash
# Seconds per round and bytes per site per round of a real federation over TLS on loopback,
# for the paper-sized model with training skipped (train.skip), and peak memory of the
# centre's and the sites' process trees; run twice in the same session: as shipped (only the
# Fleet API on the public address) and with Flower's plain SuperLink serving every API there
# (bench/no_front.py), to measure what the filter costs. By hand:
#   bash bench/federation_tls.sh 2      # sites
#   VARIANTS=front bash bench/federation_tls.sh 5
set -euo pipefail
SITES=${1:-2}; ROUNDS=${ROUNDS:-2}; VARIANTS=${VARIANTS:-"front no-front"}
WORK=$(mktemp -d); export FLWR_TELEMETRY_ENABLED=0 EGCMF_CACHE="$WORK/cache"
HERE=$(cd "$(dirname "$0")" && pwd)
names=$(seq -f "site%g" 1 "$SITES" | paste -sd, -)
egcmf synth --out "$WORK/data" --sites "$SITES" --rois-per-site 2 --size 64 2>/dev/null
fl-server certs --out "$WORK/certs" --sites "$names" 2>/dev/null

run() {  # $1: variant; one federation, one JSON line
  local out="$WORK/$1" port
  port=$(python -c "from fl_common.procs import free_port; print(free_port())")
  mkdir -p "$out"
  local server=(fl-server)
  [ "$1" = no-front ] && server=(python "$HERE/no_front.py")
  python "$HERE/peak_rss.py" -- "${server[@]}" start --preset paper --set train.skip=true \
    --rounds "$ROUNDS" --min-sites "$SITES" --address "127.0.0.1:$port" --certs "$WORK/certs" \
    --run-dir "$out/run" > "$out/server.json" 2> "$out/server.log" &
  for i in $(seq 1 "$SITES"); do
    EGCMF_STATE_DIR="$out/state$i" python "$HERE/peak_rss.py" -- fl-client --site "site$i" \
      --server "127.0.0.1:$port" --data "$WORK/data/site_0$i" --certs "$WORK/certs" \
      --max-wait 60 --device cpu > "$out/client$i.json" 2> "$out/client$i.log" &
  done
  wait
  python - "$out" "$1" "$SITES" "$ROUNDS" <<'PY'
import json, sys
from pathlib import Path
out, variant, sites, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
summary = json.loads((out / "run" / "summary.json").read_text())
traffic = summary["flower"]["network-traffic"]
clients = [json.loads((out / f"client{i}.json").read_text()) for i in range(1, sites + 1)]
seconds = [v["round"] for v in summary["round_seconds"].values()]
print(json.dumps({
    "variant": variant, "sites": sites, "rounds": rounds, "round_seconds": seconds,
    "mean_round_seconds": round(sum(seconds) / len(seconds), 2),
    "bytes_per_site_per_round": traffic["total-bytes"] / sites / rounds,
    "server_peak_rss_gib": json.loads((out / "server.json").read_text())["peak_rss_gib"],
    "client_peak_rss_gib": max(c["peak_rss_gib"] for c in clients)}))
PY
}

for variant in $VARIANTS; do run "$variant" | tee -a "$WORK/results.jsonl"; done
python - "$WORK/results.jsonl" <<'PY'
import json, sys
rows = {r["variant"]: r for r in map(json.loads, open(sys.argv[1]))}
if {"front", "no-front"} <= set(rows):
    ratio = rows["front"]["mean_round_seconds"] / rows["no-front"]["mean_round_seconds"]
    print(json.dumps({"front_over_no_front": round(ratio, 3)}))
PY
