#!/usr/bin/env bash
# Whole-slide prediction, by hand: a generated 40,000 x 40,000 px H&E/CK5/6 pair (written
# strip by strip, never held in memory) through `egcmf predict-wsi` with the tiny preset, and
# the paper preset on a smaller tissue region; tiles per second and peak memory of each run.
#   bash bench/wsi.sh                                   # CPU, everything in /tmp/wsi-bench
#   CKPT=runs/central/best.pt bash bench/wsi.sh         # a trained tiny checkpoint
#   DEVICE=cuda PAPER_SIZE=16384 bash bench/wsi.sh      # on a GPU
# Needs about 1.5 GB of free disk at WORK; the slides are deleted at the end (KEEP=1 keeps them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(dirname "$HERE")
WORK=${WORK:-/tmp/wsi-bench}; SIZE=${SIZE:-40000}; PAPER_SIZE=${PAPER_SIZE:-3584}
DEVICE=${DEVICE:-cpu}; BATCH=${BATCH:-16}; CKPT=${CKPT:-}
export PYTHONPATH="$ROOT" FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1 EGCMF_CACHE="$WORK/cache"
mkdir -p "$WORK"
df -h "$WORK" | tee "$WORK/disk.txt"
echo "== slides: $SIZE x $SIZE px pair"
python "$HERE/peak_rss.py" -- egcmf synth-slides --out "$WORK/slides" --size "$SIZE" \
  | tail -n 1 | tee "$WORK/synth.json"
du -sh "$WORK/slides" | tee -a "$WORK/disk.txt"
if [ -z "$CKPT" ]; then  # the README's centralised training, two epochs (throughput only)
  egcmf train --epochs 2 --out "$WORK/train" > /dev/null 2>&1
  CKPT="$WORK/train/best.pt"
fi
echo "== predict-wsi, tiny preset, $DEVICE"
python "$HERE/peak_rss.py" -- egcmf predict-wsi --checkpoint "$CKPT" --he "$WORK/slides/he.svs" \
  --ck56 "$WORK/slides/ck56.svs" --out "$WORK/pred" --batch-size "$BATCH" --device "$DEVICE" \
  2> "$WORK/predict.log" | tail -n 1 | tee "$WORK/predict.json"
echo "== predict-wsi, paper preset (untrained weights: speed only), $PAPER_SIZE px pair, $DEVICE"
python - "$WORK/paper.pt" <<'PY'
import sys
from pathlib import Path

import torch

from egcmf_model.checkpoint import save_checkpoint
from egcmf_model.config import load_config
from egcmf_model.engine import build_model

torch.manual_seed(0)
cfg = load_config("paper", None, [])
classes = ("background", "in_situ", "invasive")
save_checkpoint(Path(sys.argv[1]), build_model(cfg.model, classes), cfg, classes)
PY
egcmf synth-slides --out "$WORK/crop" --size "$PAPER_SIZE" --seed 1 > /dev/null
python "$HERE/peak_rss.py" -- egcmf predict-wsi --checkpoint "$WORK/paper.pt" \
  --he "$WORK/crop/he.svs" --ck56 "$WORK/crop/ck56.svs" --out "$WORK/pred-paper" \
  --batch-size 2 --device "$DEVICE" 2> "$WORK/predict-paper.log" | tail -n 1 \
  | tee "$WORK/predict-paper.json"
python - "$WORK" <<'PY'
import json, sys
from pathlib import Path
work = Path(sys.argv[1])
for name, run in (("tiny", "pred"), ("paper", "pred-paper")):
    report = json.loads((work / run / "report.json").read_text())
    rss = json.loads((work / f"predict{'' if name == 'tiny' else '-paper'}.json").read_text())
    print(json.dumps({"preset": name, "slide_px": report["slides"]["he"]["dimensions"],
                      "tiles": report["tiles"], "tiles_per_s": report["tiles_per_s"],
                      "time_s": report["time_s"], "peak_rss_gib": rss["peak_rss_gib"],
                      "registration_error_um": report["registration"]["error_um"],
                      "class_areas_mm2": report["class_areas_mm2"]}))
PY
ls -la "$WORK/pred" | tee -a "$WORK/disk.txt"
[ "${KEEP:-0}" = 1 ] || rm -rf "$WORK/slides" "$WORK/crop" "$WORK/pred" "$WORK/pred-paper"
