#!/usr/bin/env bash
# int8 against fp32 for one checkpoint (issue 14, item 6), on a quiet machine (nothing else
# running: the speed ratio is only as good as the machine is idle).
#
#   CKPT=runs/demo-model/densehybrid_s0/checkpoints/final.pt scripts/measure_int8.sh
#
# For each size in SIZES: anomaly-seg export --int8 (OUT/demo_SIZE.json and its int8 sibling
# OUT/demo_SIZE-int8.json, calibrated on CAL like models/demo), then anomaly-seg bench with the
# int8 graph as --reference, so both graphs run in interleaved rounds of one process (the
# "plain ResNet-18 FCN (reference)" row of that report IS the int8 graph, and its
# "DH artifact / plain ResNet-18 FCN" ratio is t_fp32 / t_int8), at 1 onnxruntime thread and at
# onnxruntime's default; then anomaly-seg evaluate of both artifacts on TEST_PASTED (AP) and on
# plain CamVid test (closed mIoU). The last lines compare them with the targets: >= 1.8x
# faster at 720x1280, |delta AP| <= 1 point, mIoU drop <= 1 point. Steps whose output exists
# are skipped; delete OUT to start over.
set -euo pipefail

A=${ANOMALY_SEG:-.venv/bin/anomaly-seg}
PY=${PYTHON:-.venv/bin/python}
CKPT=${CKPT:-runs/demo-model/densehybrid_s0/checkpoints/final.pt}
CAL=${CAL:-data/camvid_val_pasted}
TEST_PASTED=${TEST_PASTED:-data/camvid_test_pasted}
CAMVID=${CAMVID:-data/CamVid}
OUT=${OUT:-runs/int8}
SIZES=${SIZES:-360x640 720x1280}
ITERATIONS=${ITERATIONS:-50}
LIMIT=${LIMIT:-}  # evaluate only the first N images (a smoke run), empty: all

if [ ! -f "$CKPT" ]; then
  echo "checkpoint $CKPT not found: set CKPT (scripts/build_demo_model.sh writes" \
    "runs/demo-model/densehybrid_s0/checkpoints/final.pt)" >&2
  exit 2
fi
limit=()
[ -n "$LIMIT" ] && limit=(--limit "$LIMIT")
mkdir -p "$OUT"
for size in $SIZES; do
  stem="$OUT/demo_$size"
  if [ ! -f "$stem-int8.json" ]; then
    echo "== export $size (fp32 and int8)" >&2
    $A export --checkpoint "$CKPT" --out "$stem" --size "$size" --formats onnx \
      --calibration-data "$CAL" --calibration-images 101 --int8 --no-progress
  fi
  for threads in 1 default; do
    if [ ! -f "$OUT/bench_${size}_threads_$threads/bench.json" ]; then
      echo "== bench $size, onnxruntime threads $threads" >&2
      thread_flag=()
      [ "$threads" = default ] || thread_flag=(--threads "$threads")
      $A bench --artifact "$stem.json" --reference "$stem-int8.onnx" --backends onnxruntime \
        --iterations "$ITERATIONS" "${thread_flag[@]}" \
        --out "$OUT/bench_${size}_threads_$threads" > /dev/null
    fi
  done
  for artifact in "$stem" "$stem-int8"; do
    name=$(basename "$artifact")
    for data in pasted plain; do
      folder="$OUT/eval/${name}_$data"
      [ -f "$folder/metrics.json" ] && continue
      echo "== evaluate $name on $data CamVid test" >&2
      source_data=$TEST_PASTED
      [ "$data" = plain ] && source_data=$CAMVID
      $A evaluate --artifact "$artifact.json" --data "$source_data" --out "$folder" \
        "${limit[@]}" --no-progress > /dev/null
    done
  done
done

"$PY" - "$OUT" $SIZES <<'PY'
import json
import sys
from pathlib import Path

out, sizes = Path(sys.argv[1]), sys.argv[2:]


def load(path):
    return json.loads(Path(path).read_text())


def points(value):
    return None if value is None else 100.0 * value


for size in sizes:
    stem = f'demo_{size}'
    print(f'== {size}')
    for threads in ('1', 'default'):
        ratio = load(out / f'bench_{size}_threads_{threads}' / 'bench.json')['ratios']['dh_vs_fcn']
        rows = load(out / f'bench_{size}_threads_{threads}' / 'bench.json')['graphs']['rows']
        print(f'  speed, onnxruntime threads {threads}: fp32 {rows["DH"]["median_ms"]:.1f} ms, '
              f'int8 {rows["fcn"]["median_ms"]:.1f} ms, fp32/int8 {ratio["value"]:.2f} '
              f'(p10-p90 {ratio["p10"]:.2f}-{ratio["p90"]:.2f}; target >= 1.8 at 720x1280)')
    pasted = {p: load(out / 'eval' / f'{stem}{p}_pasted' / 'metrics.json')['scores']['DH']
              for p in ('', '-int8')}
    for protocol in ('per_image', 'pooled'):
        fp32, int8 = (points(pasted[p][protocol]['ap']) for p in ('', '-int8'))
        print(f'  AP ({protocol}) on pasted CamVid test: fp32 {fp32:.2f}, int8 {int8:.2f}, '
              f'delta {int8 - fp32:+.2f} (target |delta| <= 1)')
    plain = {p: load(out / 'eval' / f'{stem}{p}_plain' / 'metrics.json')['closed_miou']
             for p in ('', '-int8')}
    if None in plain.values():
        print('  closed mIoU: not computed (the model and data classes differ)')
    else:
        fp32, int8 = points(plain['']), points(plain['-int8'])
        print(f'  closed mIoU on CamVid test: fp32 {fp32:.2f}, int8 {int8:.2f}, drop '
              f'{fp32 - int8:.2f} (target <= 1)')
    sidecar = load(out / f'{stem}-int8.json')
    figures = sidecar['parity']['onnxruntime']
    print(f'  export parity vs fp32: labels {figures["label_agreement"]:.2%}, masks at '
          f'{sidecar["parity"]["threshold_name"]} {figures["mask_agreement"]:.2%}, flagged '
          f'{figures["flagged_share"]:.3%} (fp32 {figures["reference_flagged_share"]:.3%})')
PY
