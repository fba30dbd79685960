#!/usr/bin/env bash
# Train the scene-tiny BlueLM-V model (issue 7) on one GPU and evaluate it.
#
#   scripts/train_scene_vlm.sh [OUT_DIR] [extra bluelm_ros.tools.vlm.train options...]
#
# About 7.5 minutes on one H100 (16 CPU cores): tokenizer ~2 s, 420 s of training
# (the learning-rate schedule ends at the deadline), held-out evaluation of 200 questions
# per type (~20 s), saving. Writes OUT_DIR/{config.json, model.safetensors,
# tokenizer.json, eval.json, eval_predictions.jsonl, train_log.jsonl, checkpoint.pt} and
# prints the per-type exact-match accuracy. Re-running with --resume continues from the
# checkpoint; add e.g. --time-limit 300 for a shorter run or --dry-run 10 for a CPU check.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$ROOT/runs/scene-tiny}
if [ $# -gt 0 ]; then shift; fi
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}

"$PY" -m bluelm_ros.tools.vlm.train --out "$OUT" --config scene-tiny \
  --time-limit 420 --batch-scenes 32 --questions extra --lr 2e-3 --warmup 200 \
  --min-lr-ratio 0.05 --weight-decay 0.05 --clip 1.0 --aux-weight 1.0 --seed 0 \
  --train-scale 0.3 1.0 --min-side 144 --eval-per-type 200 --eval-mode batched "$@"

"$PY" - "$OUT" <<'EOF'
import json, os, sys
r = json.load(open(os.path.join(sys.argv[1], 'eval.json')))
t = r.get('training', {})
print(json.dumps({'overall': round(r['overall'], 4), 'n': r['n'],
                  'per_type': {k: round(v['accuracy'], 4) for k, v in r['per_type'].items()},
                  'steps': t.get('steps'), 'train_seconds': t.get('train_seconds'),
                  'device': t.get('device'), 'eval': os.path.join(sys.argv[1], 'eval.json')}))
EOF
