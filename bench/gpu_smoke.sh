#!/usr/bin/env bash
# GPU checks at the paper preset, by hand on a CUDA machine (needs torch and the model's own
# dependencies only: no Flower, no Opacus):
#   OUT=/tmp/gpu bash bench/gpu_smoke.sh                  # fusion + amp (about 6 minutes on an H100)
#   PARTS="profile train" OUT=/tmp/gpu bash bench/gpu_smoke.sh
# Parts (PARTS, space-separated, default "fusion amp"):
#   fusion   train step of `full` at 512 px (batch 2) against its four VGG-UNets, each option
#            alone and both: plain, bf16 autocast, channels-last; peak GPU memory of the `full`
#            step (Adam state included) is `peak_gpu_gib` (target <= 20 GiB, the paper's 24 GB card)
#   breakdown  where the `full` step's time goes (bench/fusion_breakdown.py): each variant's step,
#            each fusion part alone, some parts compiled, the profiler's kernel tables; then
#            the fusion overhead with cuDNN's autotuning on
#   compile  the fusion overhead with the fusion modules compiled (train.compile), bf16 and
#            channels-last, against the same options without (about 3 minutes)
#   amp      bf16 accuracy: the same training (12 epochs, seeds 0 and 1 side by side) in float32
#            and bf16 on synthetic data, and float32 twice more, test Dice (accurate when
#            within 0.005, read against the drift of two float32 trainings);
#            bench/amp_accuracy.py
#   profile  every variant's parameters, GFLOPs and inference time (Table VI)
#   ablation Table V at model.width=0.5 (bench/ablation.py, 40 epochs, seeds 0 1 2): one process
#            per variant, all at once; rows go to $OUT/ablation.jsonl as they finish
#   train    one epoch of `egcmf train --preset paper` on 2048 px synthetic ROIs (slow to make)
#   tests    the test suite's GPU tests (pytest -m gpu), where pytest is installed; the
#            compiled network's test compiles for minutes
# Every part writes JSON lines to $OUT; the log of the commands goes to $OUT/log.txt.
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
OUT="${OUT:-/tmp/gpu_smoke}"; PARTS="${PARTS:-fusion amp}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/gpu.txt"
for part in $PARTS; do
  case "$part" in
    fusion)
      for opts in "" "--amp bf16" "--channels-last" "--amp bf16 --channels-last"; do
        # shellcheck disable=SC2086
        python bench/fusion_overhead.py --preset paper --device cuda --steps 10 $opts \
          2>>"$OUT/log.txt" | tail -n 1 | tee -a "$OUT/fusion.jsonl"
      done ;;
    breakdown)
      timeout 200 python bench/fusion_breakdown.py --preset paper --device cuda --steps 8 \
        --amp bf16 --channels-last --cudnn-benchmark --profile "$OUT/profile_bf16_cl.txt" \
        --compile grad_cam ck56_branch.edfm.0 fusion.levels.3 fusion.levels.2 \
        2>>"$OUT/log.txt" | tee -a "$OUT/breakdown.jsonl"
      timeout 100 python bench/fusion_breakdown.py --preset paper --device cuda --steps 8 \
        --profile "$OUT/profile_fp32.txt" 2>>"$OUT/log.txt" | tee -a "$OUT/breakdown.jsonl"
      for opts in "--cudnn-benchmark" "--amp bf16 --channels-last --cudnn-benchmark"; do
        # shellcheck disable=SC2086
        timeout 80 python bench/fusion_overhead.py --preset paper --device cuda --steps 10 $opts \
          2>>"$OUT/log.txt" | tail -n 1 | tee -a "$OUT/fusion.jsonl"
      done ;;
    compile)
      timeout 220 python bench/fusion_overhead.py --preset paper --device cuda --steps 10 \
        --amp bf16 --channels-last --compile 2>>"$OUT/log.txt" | tail -n 1 | tee -a "$OUT/fusion.jsonl"
      timeout 60 python bench/fusion_overhead.py --preset paper --device cuda --steps 10 \
        --amp bf16 --channels-last 2>>"$OUT/log.txt" | tail -n 1 | tee -a "$OUT/fusion.jsonl" ;;
    amp)
      for seed in 0 1; do  # one process per seed, at once
        python bench/amp_accuracy.py --epochs 12 --control --seeds "$seed" --out "/tmp/amp_s$seed" \
          2>>"$OUT/log.txt" >"$OUT/amp_s$seed.jsonl" &
      done
      wait; cat "$OUT"/amp_s*.jsonl ;;
    ablation)
      for v in unet mrcfm mrfm mrfm+edm full; do
        python bench/ablation.py --epochs 40 --seeds 0 1 2 --width 0.5 --device cuda \
          --variants "$v" --out /tmp/ablation-w05 >>"$OUT/log.txt" 2>&1 &
      done
      while [ -n "$(jobs -r)" ]; do  # rows reach $OUT as they finish, also if time runs out
        sleep 10; cp /tmp/ablation-w05/ablation.jsonl "$OUT/" 2>/dev/null
      done
      cp /tmp/ablation-w05/ablation.jsonl "$OUT/" ;;
    profile)
      for v in unet mrcfm mrfm mrfm+edm full; do
        python -m egcmf_model.cli profile --preset paper --variant "$v" --runs 10 --json \
          2>>"$OUT/log.txt" | tail -n 1 | tee -a "$OUT/profile.jsonl"
      done ;;
    train)
      python -m egcmf_model.cli synth --out /tmp/synth2048 --sites 2 --rois-per-site 3 \
        --size 2048 2>>"$OUT/log.txt"
      python -m egcmf_model.cli train --preset paper --data /tmp/synth2048 --epochs 1 \
        --out /tmp/run_paper 2>&1 | grep -vE "it/s\]|s/it\]" | tail -n 30 | tee "$OUT/train.txt" ;;
    tests)
      python -m pytest -q -m gpu tests/test_training.py tests/test_determinism.py 2>&1 | tail -n 5 | tee "$OUT/tests.txt" ;;
    *) echo "unknown part $part (fusion, breakdown, compile, amp, ablation, profile, train, tests)" >&2; exit 2 ;;
  esac
done
