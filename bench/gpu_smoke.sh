#!/usr/bin/env bash
# GPU smoke run at the paper preset, by hand on a CUDA machine (no install needed):
#   OUT=/tmp/gpu bash bench/gpu_smoke.sh
# Profiles every variant (Table VI), times train steps of `full` against its four VGG-UNets,
# and trains one epoch of `full` on 2048 px synthetic ROIs to show the whole path runs on CUDA.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
OUT="${OUT:-/tmp/gpu_smoke}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
for v in unet mrcfm mrfm mrfm+edm full; do
  python -m egcmf_model.cli profile --preset paper --variant "$v" --runs 10 --json 2>>"$OUT/log.txt" \
    | tail -n 1 | tee -a "$OUT/profile.jsonl"
done
python bench/fusion_overhead.py --preset paper --device cuda --steps 10 | tee "$OUT/overhead.jsonl"
python bench/fusion_overhead.py --preset paper --size 256 --device cuda --steps 10 \
  | tee -a "$OUT/overhead.jsonl"
python -m egcmf_model.cli synth --out /tmp/synth2048 --sites 2 --rois-per-site 3 --size 2048 \
  2>>"$OUT/log.txt"
python -m egcmf_model.cli train --preset paper --data /tmp/synth2048 --epochs 1 \
  --out /tmp/run_paper 2>&1 | grep -vE "it/s\]|s/it\]" | tail -n 30 | tee "$OUT/train.txt"
