#!/usr/bin/env bash
# Train the shipped scene-tiny BlueLM-V model on this project's 2-core CPU, evaluate it.
#
#   scripts/train_scene_vlm.sh [OUT_DIR] [extra bluelm_ros.tools.vlm.train options...]
#
# One command reproduces the shipped weights (docs/scene-tiny-model.md) in under two
# hours on a 2-core CPU: 110 minutes of optimizer steps of 12 rendered scenes (+ their
# mirror images; the learning-rate schedule ends at the deadline, so a faster machine
# simply takes more steps; `--steps N` instead of the time limit repeats a run step for
# step), bf16 autocast on CPUs with bf16 units, seed 0, a validation learning curve every
# 300 steps, then the held-out evaluation (200 questions per type, fp32). Writes
# OUT_DIR/{config.json, model.safetensors, tokenizer.json, eval.json, eval_predictions.jsonl, train_log.jsonl,
# learning_curve.{json,png}, checkpoint.pt}. Interrupted? Run the same command again with
# --resume: it continues from the last checkpoint (saved every 2 minutes) on the same data.
# `--dry-run 10` checks the pipeline in under a minute.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/runs/scene-tiny}
if [ $# -gt 0 ]; then shift; fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

"$PY" -m bluelm_ros.tools.vlm.train --out "$OUT" --config scene-tiny \
  --time-limit 6600 --batch-scenes 12 --questions focus --lr 1.5e-3 --warmup 150 \
  --min-lr-ratio 0.05 --weight-decay 0.05 --clip 1.0 --aux-weight 1.0 --seed 0 \
  --train-scale 0.3 1.0 --min-side 144 --precision auto \
  --curve-every 300 --curve-per-type 20 --eval-per-type 200 --eval-mode batched "$@"

"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
r = json.load(open(os.path.join(sys.argv[1], 'eval.json')))
t = r.get('training', {})
print(json.dumps({'overall': round(r['overall'], 4), 'n': r['n'],
                  'per_type': {k: round(v['accuracy'], 4) for k, v in r['per_type'].items()},
                  'steps': t.get('steps'), 'train_seconds': t.get('train_seconds'),
                  'device': t.get('device'), 'eval': os.path.join(sys.argv[1], 'eval.json')}))
PYEOF
