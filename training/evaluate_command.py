"""`anomaly-seg evaluate`: the Table I row of a checkpoint (or an exported artifact) on the
StreetHazards test split: AP / FPR95 / AUROC per score (per-image and pooled protocols), closed
mIoU, open-mIoU, PR and ROC curves, metrics.json and a markdown table (training/evaluate.py).
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
                        help='StreetHazards root (holds test/images/test/t5, t6)')
    parser.add_argument('--scores', default=None,
                        help='comma-separated anomaly scores: DH, OP, OPxMS, JSD, MSP, '
                        "max_logit, energy (default DH,OP,OPxMS; an artifact's own score)")
    parser.add_argument('--out', required=True, help='folder for metrics.json, table.md, PNGs')
    parser.add_argument('--device', default='auto', help='auto (cuda if present), cpu or cuda')
    parser.add_argument('--backend', default='auto',
                        help='artifact backend: auto, onnxruntime, torch or tensorrt')
    parser.add_argument('--towns', help='comma-separated test towns (default: t5,t6)')
    parser.add_argument('--limit', type=int, help='evaluate only the first N images per town')
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
                       progress=not args.no_progress)
    table = {s: {'AP': round(100 * m['per_image']['ap'], 2),
                 'FPR95': round(100 * m['per_image']['fpr95'], 2),
                 'AUROC': round(100 * m['per_image']['auroc'], 2),
                 'open_mIoU': round(100 * m['open_miou'], 2),
                 'pooled_AP': round(100 * m['pooled']['ap'], 2)}
             for s, m in metrics['scores'].items()}
    return {'method': metrics['model']['method'], 'images': metrics['images'],
            'closed_mIoU': round(100 * metrics['closed_miou'], 2), 'scores': table,
            'anomaly_pixel_share': round(metrics['anomaly_pixel_share'], 5),
            'out': args.out}
