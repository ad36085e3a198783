#!/usr/bin/env bash
# Seconds per round and bytes per site per round of a real federation over TLS on loopback,
# for the paper-sized model with training skipped (train.skip), and peak memory of the
# centre's and the sites' process trees. By hand:
#   bash bench/federation_tls.sh 2      # sites
#   bash bench/federation_tls.sh 5
set -euo pipefail
SITES=${1:-2}; ROUNDS=${ROUNDS:-2}; PORT=${PORT:-18400}
WORK=$(mktemp -d); export FLWR_TELEMETRY_ENABLED=0 EGCMF_CACHE="$WORK/cache"
HERE=$(cd "$(dirname "$0")" && pwd)
names=$(seq -f "site%g" 1 "$SITES" | paste -sd, -)
egcmf synth --out "$WORK/data" --sites "$SITES" --rois-per-site 2 --size 64 2>/dev/null
fl-server certs --out "$WORK/certs" --sites "$names" 2>/dev/null
python "$HERE/peak_rss.py" -- fl-server start --preset paper --set train.skip=true \
  --rounds "$ROUNDS" --min-sites "$SITES" --address "127.0.0.1:$PORT" --certs "$WORK/certs" \
  --run-dir "$WORK/run" > "$WORK/server.json" 2> "$WORK/server.log" &
server=$!
sleep 5
for i in $(seq 1 "$SITES"); do
  python "$HERE/peak_rss.py" -- fl-client --site "site$i" --server "127.0.0.1:$PORT" \
    --data "$WORK/data/site_0$i" --certs "$WORK/certs" --max-wait 20 --device cpu \
    > "$WORK/client$i.json" 2> "$WORK/client$i.log" &
done
wait
python - "$WORK" "$SITES" "$ROUNDS" <<'PY'
import json, sys
from pathlib import Path
work, sites, rounds = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
summary = json.loads((work / "run" / "summary.json").read_text())
traffic = summary["flower"]["network-traffic"]
clients = [json.loads((work / f"client{i}.json").read_text()) for i in range(1, sites + 1)]
print(json.dumps({
    "sites": sites, "rounds": rounds, "round_seconds": summary["round_seconds"],
    "bytes_per_site_per_round": traffic["total-bytes"] / sites / rounds,
    "server_peak_rss_gib": json.loads((work / "server.json").read_text())["peak_rss_gib"],
    "client_peak_rss_gib": max(c["peak_rss_gib"] for c in clients)}))
PY
