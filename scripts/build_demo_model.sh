#!/usr/bin/env bash
# Rebuilds models/demo.{onnx,json,card.json} from nothing with the project's own commands
# (`make demo-model`; about 1 h 40 min on 2 CPU cores). Every step is seeded; a step whose output
# exists is skipped, so an interrupted build continues where it stopped (training resumes from
# its newest checkpoint). CPU results repeat bitwise only at the same thread count, so each
# training step runs at the thread count the shipped model was made with (STAGE1_THREADS=2,
# OODHEAD_THREADS=1; override them to trade exactness for speed).
#
#   synthetic data (seed 0; 1200 training stills) and negatives (seed 1; half of the surfaces in
#   plain materials, so that the outlier head cannot get by on "saturated pattern = outlier")
#   -> stage 1: closed-set SwiftNet-RN18 from scratch, 3200 steps, one cosine schedule
#   -> OODHead fine-tuning (L_cls + 1 * L_d with pasted negatives), 800 steps, seed 0
#   -> export DH (score at stride 4) at 360x640, ONNX only (47 MB), thresholds calibrated on the
#      validation split with pasted negatives; export MSP of the same checkpoint (not committed)
#   -> the demo drive replayed through both: models/demo.card.json records the MSP baseline
#   -> README's pictures from that replay: docs/demo_contact_sheet.jpg (3/4 size, JPEG 85) and
#      docs/demo_pr_curves.png
set -euo pipefail

A=${ANOMALY_SEG:-.venv/bin/anomaly-seg}
PY=${PYTHON:-.venv/bin/python}
RUNS=${RUNS:-runs/demo-model}
MODELS=${MODELS:-models}
DOCS=${DOCS:-docs}
STAGE1_THREADS=${STAGE1_THREADS:-2}
OODHEAD_THREADS=${OODHEAD_THREADS:-1}
# config overrides shared by the training runs
TRAIN="data.root=$RUNS/data/synth data.crop_size=[192,384] data.num_workers=1 \
train.batch_size=8 train.amp=false"

step() { echo "== $*" >&2; }
# The highest step_NNNNNNN.pt of a run folder (0 when none): a finished step is not redone.
newest_step() {
  local newest=0 ckpt n
  for ckpt in "$1"/checkpoints/step_*.pt; do
    [ -e "$ckpt" ] || continue
    n=$(basename "$ckpt" .pt); n=$((10#${n#step_}))
    [ "$n" -gt "$newest" ] && newest=$n
  done
  echo "$newest"
}
resume_flag() { [ -d "$1/checkpoints" ] && echo '--resume auto'; true; }

if [ ! -f "$RUNS/data/synth/synth.json" ]; then
  step 'synthetic StreetHazards set'
  $A synth dataset --out "$RUNS/data/synth" --train 1200 --val 40 --test 80 --size 360x640 \
    --seed 0 --overwrite
fi
if [ ! -f "$RUNS/data/negatives/synth.json" ]; then
  step 'synthetic ADE20k-layout negatives'
  $A synth negatives --out "$RUNS/data/negatives" --n 200 --seed 1 --material-share 0.5 \
    --overwrite
fi
if [ "$(newest_step "$RUNS/stage1")" -lt 3200 ]; then
  step 'stage 1: 3200 steps'
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$STAGE1_THREADS $A train --config training/configs/closed_set.yaml \
    --out "$RUNS/stage1" --no-progress $(resume_flag "$RUNS/stage1") $TRAIN \
    model.pretrained=false optim.encoder_lr=4e-4 train.max_steps=3200 train.checkpoint_every=200
fi
if [ "$(newest_step "$RUNS/oodhead")" -lt 800 ]; then
  step 'OODHead: 800 steps'
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$OODHEAD_THREADS $A train --config training/configs/oodhead.yaml \
    --out "$RUNS/oodhead" --no-progress $(resume_flag "$RUNS/oodhead") $TRAIN \
    negatives.ade_root="$RUNS/data/negatives" negatives.ade_crop=128 \
    model.init_checkpoint="$RUNS/stage1/checkpoints/final.pt" optim.lr=1e-4 \
    optim.encoder_lr=2.5e-5 train.max_steps=800 train.checkpoint_every=100 train.seed=0
fi
step 'export'
$A export --checkpoint "$RUNS/oodhead/checkpoints/final.pt" --out "$MODELS/demo" \
  --size 360x640 --formats onnx --no-progress
$A export --checkpoint "$RUNS/oodhead/checkpoints/final.pt" --out "$RUNS/demo-MSP" \
  --score MSP --size 360x640 --formats onnx --no-progress
step 'the demo drive through both: model card'
$A demo --artifact "$MODELS/demo.json" --baseline "$RUNS/demo-MSP.json" \
  --card "$MODELS/demo.card.json" --out "$RUNS/demo" --no-progress
step 'README pictures'
"$PY" - "$RUNS/demo" "$DOCS" <<'PY'
import shutil
import sys

import cv2

demo, docs = sys.argv[1:]
sheet = cv2.imread(f'{demo}/contact_sheet.png')
sheet = cv2.resize(sheet, None, fx=0.75, fy=0.75, interpolation=cv2.INTER_AREA)
cv2.imwrite(f'{docs}/demo_contact_sheet.jpg', sheet, [cv2.IMWRITE_JPEG_QUALITY, 85])
shutil.copyfile(f'{demo}/pr_curves.png', f'{docs}/demo_pr_curves.png')
PY
