"""`anomaly-seg evaluate`: the Table I row of a checkpoint (or an exported artifact) on the
StreetHazards test split: AP / FPR95 / AUROC per score (per-image and pooled protocols), closed
mIoU, open-mIoU, the SegmentMeIfYouCan component metrics (sIoU, PPV, mean F1) of the mask at a
named threshold, PR and ROC curves, metrics.json and a markdown table (training/evaluate.py).
"""

import argparse
from typing import Any

from anomaly_seg_node.metrics import DEFAULT_FPR_RULE, FPR_RULES

DEFAULT_SCORES = 'DH,OP,OPxMS'  # of a checkpoint; an artifact's default is its own score


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `anomaly-seg evaluate` (no torch import here)."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', metavar='CKPT', help='a checkpoint of anomaly-seg train')
    source.add_argument('--artifact', metavar='NAME.json',
                        help='an exported artifact, run through the deployment backends')
    parser.add_argument('--data', required=True,
                        help='test data: a StreetHazards root (test/images/test/t5, t6), a '
                             'CamVid-layout folder (test/ + testannot/, e.g. from anomaly-seg '
                             'synth paste; plain CamVid without anomalies gives closed mIoU and '
                             'the share of normal pixels each threshold flags), or a folder of '
                             'images/ + labels/ or frames/ (Road Anomaly) with --labels')
    parser.add_argument('--scores', default=None,
                        help='comma-separated anomaly scores: DH, OP, OPxMS, JSD, MSP, '
                        "max_logit, energy (default DH,OP,OPxMS; an artifact's own score)")
    parser.add_argument('--out', required=True, help='folder for metrics.json, table.md, PNGs')
    parser.add_argument('--device', default='auto', help='auto (cuda if present), cpu or cuda')
    parser.add_argument('--backend', default='auto',
                        help='artifact backend: auto, onnxruntime, torch or tensorrt')
    parser.add_argument('--towns', help='comma-separated test towns of StreetHazards (default '
                        't5,t6) or recordings of CamVid (default: all, e.g. 0001TP,Seq05VD)')
    parser.add_argument('--limit', type=int, help='evaluate only the first N images per town')
    parser.add_argument('--labels', default=None, metavar='CONVENTION',
                        help='what the label ids of a folder of images/ + labels/ (or Road '
                             "Anomaly's frames/) mean: binary (0 normal, 1 anomaly, 255 "
                             'ignored), road-anomaly (0 normal, 2 anomaly), camvid, '
                             'streethazards or train-ids; not needed for StreetHazards and '
                             'CamVid layouts')
    parser.add_argument('--resize-mode', choices=('letterbox', 'stretch'), default='letterbox',
                        help='how an --artifact sees images of another aspect ratio than its '
                             'input (as the node; default %(default)s)')
    parser.add_argument('--fpr-rule', default=DEFAULT_FPR_RULE, choices=FPR_RULES,
                        help="FPR95 rule ('tpr>0.95' is DenseHybrid's)")
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate; returns a summary (the full metrics are in OUT/metrics.json)."""
    from training.evaluate import evaluate
    towns = [t.strip() for t in args.towns.split(',') if t.strip()] if args.towns else None
    scores = args.scores
    if scores is None:
        scores = DEFAULT_SCORES
        if args.artifact is not None:
            from anomaly_seg_node.artifact import read_sidecar
            scores = read_sidecar(args.artifact).score.name
    metrics = evaluate(args.checkpoint, args.data, scores, args.out,
                       artifact=args.artifact, device=args.device, backend=args.backend,
                       towns=towns, limit=args.limit, fpr_rule=args.fpr_rule,
                       progress=not args.no_progress, resize_mode=args.resize_mode,
                       labels=args.labels)
    table = {s: _row(m) for s, m in metrics['scores'].items()}
    summary = {'method': metrics['model']['method'], 'images': metrics['images'],
               'closed_mIoU': _pct(metrics['closed_miou']), 'scores': table,
               'anomaly_pixel_share': round(metrics['anomaly_pixel_share'], 5),
               'out': args.out}
    if 'reference' in metrics:
        summary['reference'] = {'centre_prior': _row(metrics['reference']['centre_prior'])}
    for note in ('note', 'class_metrics_note'):
        if note in metrics:
            summary[note] = metrics[note]
    return summary


def _row(m: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    if 'per_image' in m:
        row.update(AP=_pct(m['per_image']['ap']), FPR95=_pct(m['per_image']['fpr95']),
                   AUROC=_pct(m['per_image']['auroc']), pooled_AP=_pct(m['pooled']['ap']))
    if m.get('open_miou') is not None:
        row['open_mIoU'] = _pct(m['open_miou'])
    if 'components' in m:
        from training.evaluate import component_threshold_words

        components = m['components']
        row.update(sIoU=_pct(components['siou']), PPV=_pct(components['ppv']),
                   mean_F1=_pct(components['f1_mean']),
                   component_threshold=component_threshold_words(components['threshold']))
    for name, t in m.get('thresholds', {}).items():
        row[f'{name}_normal_flagged'] = _pct(t['inlier_flagged'])
    return row


def _pct(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)
