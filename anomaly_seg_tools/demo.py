"""`anomaly-seg demo`: the newcomer's first run, end to end, on the embedded default.

Part of the command-line composition root (like cli.py): it wires the data generators
(training.synth, torch-free), the runtime's rosbag replay and the evaluation plots together,
importing them lazily.

Steps: a drive bag of real footage -- the committed CamVid sample (samples/camvid: 86 frames of
a Cambridge street) with the synthetic test anomalies pasted on the road (`synth paste`) ->
replay of the bag through the demo artifact (models/demo.json) on the CPU with ONNX Runtime,
writing into OUT the replay's metrics.json, summary.md, frames.jsonl, overlay.mp4 and
contact_sheet.png -> pr_curves.png and roc_curves.png, and the short table printed at the end.
`--synthetic` drives through the procedural street instead (and writes a small synthetic
StreetHazards set with a preview picture).

The table compares the artifact's score with chance (the anomaly pixel share), with a centre
prior (a fixed Gaussian bump that ignores the image; real drive only) and with the MSP baseline
of the same checkpoint. The runtime graph holds one score, so the baseline is measured once,
when the model is built: `--baseline MSP.json --card models/demo.card.json` replays the same
drive through the MSP export too and writes the model card that later runs print. Under the
table, the model's component figures on the drive at the replay's threshold (the sidecar
default): SegmentMeIfYouCan sIoU, PPV and mean F1 of the anomaly mask, and the recall and
precision of the anomaly objects' boxes (from the replay's metrics.json).
"""

import argparse
import json
from pathlib import Path
import sys
import time
from typing import Any

from anomaly_seg_node.errors import AnomalySegError

DEFAULT_ARTIFACT = Path(__file__).resolve().parents[1] / 'models' / 'demo.json'
DEFAULT_SAMPLE = Path(__file__).resolve().parents[1] / 'samples' / 'camvid'
# The demo's bar (issue 7): the anomaly AP on the drive is at least this many times chance.
CHANCE_FACTOR = 10.0
CARD_SCHEMA = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.cli_types import size_arg

    parser.add_argument('--out', type=Path, default=Path('out/demo'),
                        help='output folder (default out/demo); replaced on each run')
    parser.add_argument('--sample', type=Path, default=DEFAULT_SAMPLE,
                        help='CamVid-layout folder whose test/ frames make the real drive '
                             f'(default {DEFAULT_SAMPLE}: 86 frames of CamVid Seq05VD)')
    parser.add_argument('--synthetic', action='store_true',
                        help='drive through the procedural street instead of real footage')
    parser.add_argument('--frames', type=int, default=None,
                        help='frames of the drive (default: every sample frame; 150 with '
                             '--synthetic)')
    parser.add_argument('--size', type=size_arg(), default=(360, 640),
                        help='HxW of the synthetic drive and data set (default 360x640)')
    parser.add_argument('--artifact', type=Path, default=DEFAULT_ARTIFACT,
                        help=f'artifact sidecar to replay (default {DEFAULT_ARTIFACT})')
    parser.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    parser.add_argument('--baseline', type=Path, default=None, metavar='MSP.json',
                        help='also replay the drive through this artifact (the MSP export of '
                             'the same checkpoint) and compare it in the table')
    parser.add_argument('--card', type=Path, default=None, metavar='NAME.card.json',
                        help='with --baseline: write the comparison as the model card that '
                             'later runs of this artifact print (default: none written; '
                             'read from NAME.card.json beside the artifact)')
    parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def run(args: argparse.Namespace) -> dict[str, Any]:
    from anomaly_seg_node.errors import ConfigError

    if args.card is not None and args.baseline is None:
        raise ConfigError('--card needs --baseline MSP.json: the card records the baseline '
                          'measured on the same drive')
    start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {'out': str(out)}

    if args.synthetic:
        drive, bag_path, labels = _synthetic_drive(args, out, report)
    else:
        drive, bag_path, labels = _real_drive(args, out, report)

    artifact = Path(args.artifact)
    if not artifact.is_file():
        _say(f'[3/4] skipped: no demo artifact at {artifact}')
        report['replay'] = ('skipped: no artifact; train and export one (README "Quick start '
                            'without a data set"), then pass --artifact NAME.json')
        report['seconds'] = round(time.perf_counter() - start, 1)
        return report

    _say(f'[3/4] replay through {artifact} (onnxruntime, CPU)')
    replay = _replay(bag_path, artifact, out, labels, outputs=True,
                     progress=not args.no_progress)
    full = json.loads((out / 'metrics.json').read_text(encoding='utf-8'))
    rows = {f'{full["artifact"]["score"]} (this model)': _figures(full)}
    if 'folder' in report['bag']:
        rows['centre prior (ignores the image)'] = _centre_prior(Path(report['bag']['folder']))
    card_path = args.card or artifact.with_name(f'{artifact.stem}.card.json')
    baseline_note = None
    if args.baseline is not None:
        _say(f'      baseline: replay through {args.baseline}')
        base_out = out / 'baseline'
        _replay(bag_path, Path(args.baseline), base_out, labels, outputs=False,
                progress=not args.no_progress)
        base = json.loads((base_out / 'metrics.json').read_text(encoding='utf-8'))
        rows[f'{base["artifact"]["score"]} (same checkpoint)'] = _figures(base)
        if args.card is not None:
            card = {'schema': CARD_SCHEMA, 'artifact_sha256': _onnx_sha(artifact),
                    'drive': drive, 'rows': rows, 'created': time.strftime('%Y-%m-%d')}
            _write_json(Path(args.card), card)
            report['card'] = str(args.card)
    else:
        rows, baseline_note = _card_rows(card_path, artifact, drive, rows)

    _say('[4/4] PR and ROC curves')
    from training.evaluate import plot_curve_points

    pooled = full['metrics'].get('pooled', {})
    plots = []
    if 'curve' in pooled:
        curve = {**pooled['curve'], 'ap': pooled['ap'], 'auroc': pooled['auroc']}
        plots = [str(p) for p in plot_curve_points({full['artifact']['score']: curve}, out,
                                                   title='Demo drive, pooled')]
    share = full['metrics'].get('anomaly_pixel_share')
    main = next(iter(rows.values()))
    checks = _checks(main, rows, share)
    report['replay'] = replay
    report['table'] = {'rows': rows, 'anomaly_pixel_share': share, 'checks': checks}
    components = component_figures(full)
    if components is not None:
        report['table']['components'] = components
    if baseline_note:
        report['table']['note'] = baseline_note
    report['files'] = {'metrics': str(out / 'metrics.json'), 'summary': str(out / 'summary.md'),
                       'video': str(out / 'overlay.mp4'),
                       'contact_sheet': str(out / 'contact_sheet.png'), 'plots': plots}
    if 'preview' in report.get('dataset', {}):
        report['files']['preview'] = report['dataset']['preview']
    _write_json(out / 'metrics.json', {**full, 'demo': report['table']})
    summary = out / 'summary.md'
    _write_text(summary, render_table(report) + '\n' + summary.read_text(encoding='utf-8'))
    report['seconds'] = round(time.perf_counter() - start, 1)
    return report


def format_human(report: dict[str, Any]) -> str:
    """What `make demo` prints: where things are and the short table."""
    lines = [f'anomaly-seg demo -> {report["out"]} ({report.get("seconds", 0):.0f} s)']
    if isinstance(report.get('replay'), str):
        return '\n'.join([*lines, report['replay']])
    lines += ['', render_table(report)]
    files = report['files']
    lines += ['files:'] + [f'  {key}: {value}' for key, value in files.items()]
    return '\n'.join(lines)


def render_table(report: dict[str, Any]) -> str:
    """The demo's markdown table: each score on the drive against chance and the bar."""
    table = report['table']
    replay = report['replay']
    bag = report['bag']
    lines = ['# anomaly-seg demo', '',
             f'{bag["frames"]} {bag["kind"]} frames of {bag["size"][0]}x{bag["size"][1]}; '
             f'inference {replay["latency_ms"]["infer"]["p50"]:.0f} ms per frame (p50, '
             'onnxruntime CPU).', '',
             '| score | per-image AP | pooled AP | FPR95 | AUROC | closed mIoU |',
             '|---|---:|---:|---:|---:|---:|']
    for name, fig in table['rows'].items():
        lines.append(f'| {name} | {_pct(fig.get("ap"))} | {_pct(fig.get("pooled_ap"))} | '
                     f'{_pct(fig.get("fpr95"))} | {_pct(fig.get("auroc"))} | '
                     f'{_pct(fig.get("miou"))} |')
    share = table['anomaly_pixel_share']
    lines.append(f'| chance (anomaly pixel share) | {_pct(share)} | {_pct(share)} | | 50.00 | |')
    lines.append('')
    if table.get('components'):
        lines += [component_line(table['components']), '']
    for check in table['checks']:
        lines.append(f'- {check["what"]}: {"yes" if check["met"] else "NO"} '
                     f'({check["detail"]})')
    if table.get('note'):
        lines.append(f'- {table["note"]}')
    return '\n'.join(lines) + '\n'


def component_figures(full: dict[str, Any]) -> dict[str, Any] | None:
    """The demo's component figures from the replay's metrics.json (None without them): the
    mask's sIoU, PPV and mean F1 and the objects' box recall, precision and count per frame."""
    components = full.get('metrics', {}).get('components')
    if not components:
        return None
    mask, boxes = components.get('mask', {}), components.get('boxes', {})
    return {'threshold': components.get('threshold'),
            'threshold_name': full.get('artifact', {}).get('threshold_name'),
            'siou': mask.get('siou'), 'ppv': mask.get('ppv'), 'f1_mean': mask.get('f1_mean'),
            'iou_threshold': boxes.get('iou_threshold'), 'recall': boxes.get('recall'),
            'precision': boxes.get('precision'),
            'objects_per_frame': boxes.get('objects_per_frame')}


def component_line(figures: dict[str, Any]) -> str:
    """'components at the default threshold (fpr1 = -6.453): sIoU ..., objects: ...'."""
    threshold = figures.get('threshold')
    value = f'{threshold:.4g}' if isinstance(threshold, (int, float)) else 'n/a'
    where = (f'the default threshold ({figures["threshold_name"]} = {value})'
             if figures.get('threshold_name') else f'the threshold {value}')
    per_frame = figures.get('objects_per_frame')
    count = f'{per_frame:.2f}' if isinstance(per_frame, (int, float)) else 'n/a'
    iou = figures.get('iou_threshold') or 0.5
    return (f'Components at {where}: sIoU {_pct_or_na(figures.get("siou"))}, PPV '
            f'{_pct_or_na(figures.get("ppv"))}, mean F1 {_pct_or_na(figures.get("f1_mean"))}; '
            f'objects: recall {_pct_or_na(figures.get("recall"))}, precision '
            f'{_pct_or_na(figures.get("precision"))} at box IoU ≥ {iou:g}, {count} per frame.')


def _real_drive(args: argparse.Namespace, out: Path, report: dict[str, Any]
                ) -> tuple[dict[str, Any], Path, str]:
    """Anomalies pasted into the sample's frames: a CamVid-layout folder and a drive bag."""
    from training.synth.paste import write_pasted

    sample = Path(args.sample)
    _say(f'[1/4] real drive: anomalies pasted into the frames of {sample}')
    pasted = write_pasted(sample, out / 'drive', split='test', seed=args.seed,
                          limit=args.frames, bag=out / 'drive_bag', overwrite=True,
                          progress=not args.no_progress)
    size = _frame_size(out / 'drive' / 'test')
    report['bag'] = {'path': pasted['bag']['out'], 'kind': 'real (CamVid, anomalies pasted)',
                     'folder': pasted['out'], 'frames': pasted['frames'], 'size': list(size),
                     'seed': args.seed, 'objects': pasted['objects'],
                     'seconds': pasted['seconds']}
    _say('[2/4] (the synthetic street: anomaly-seg demo --synthetic)')
    drive = {'sample': sample.name, 'frames': pasted['frames'], 'seed': args.seed}
    return drive, Path(pasted['bag']['out']), 'camvid'


def _synthetic_drive(args: argparse.Namespace, out: Path, report: dict[str, Any]
                     ) -> tuple[dict[str, Any], Path, str]:
    """The procedural street: a drive bag and a small StreetHazards set with its preview."""
    from training.synth import render_preview, write_bag, write_dataset

    frames = args.frames if args.frames is not None else 150
    _say(f'[1/4] synthetic drive: {frames} frames of {args.size[0]}x{args.size[1]}')
    bag = write_bag(out / 'drive_bag', frames=frames, size=args.size, storage='mcap',
                    encoding='rgb8', compressed=True, seed=args.seed, overwrite=True,
                    progress=not args.no_progress)
    drive = {'frames': frames, 'size': list(args.size), 'seed': args.seed}
    report['bag'] = {'path': bag['out'], 'kind': 'synthetic', **drive, 'seconds': bag['seconds']}
    _say('[2/4] synthetic StreetHazards set and preview')
    data = write_dataset(out / 'dataset', train=6, val=2, test=4, size=args.size,
                         seed=args.seed, overwrite=True, progress=False)
    preview = render_preview(out / 'dataset', out / 'preview.png', n=4)
    report['dataset'] = {'path': data['out'], 'preview': str(preview)}
    return drive, Path(bag['out']), 'streethazards'


def _frame_size(folder: Path) -> tuple[int, int]:
    import cv2

    first = min(folder.iterdir())
    image = cv2.imread(str(first), cv2.IMREAD_UNCHANGED)
    return int(image.shape[0]), int(image.shape[1])


def _centre_prior(folder: Path) -> dict[str, float | None]:
    """The centre-prior reference on a pasted drive folder (training.evaluate.centre_prior)."""
    import numpy as np

    from anomaly_seg_node.labels import label_spec
    from anomaly_seg_node.metrics import BinnedPerImageOOD, PooledOOD
    from training.data.camvid_layout import index_split
    from training.data.image_io import read_label_png
    from training.evaluate import centre_prior

    spec = label_spec('camvid', [])
    # The replay's protocols, so that the rows of the table compare alike.
    per_image, pooled = BinnedPerImageOOD(), PooledOOD()
    for _, label_path in index_split(folder, 'test'):
        _, anomaly, _ = spec.targets(read_label_png(label_path), 0)
        ood = np.where(anomaly == spec.ignore, np.uint8(2), anomaly)
        per_image.add(pooled.update(centre_prior(*ood.shape), ood))
    try:
        p, q = per_image.compute(), pooled.compute()
    except AnomalySegError:
        return {'ap': None, 'fpr95': None, 'auroc': None, 'pooled_ap': None, 'miou': None}
    return {'ap': p['ap'], 'fpr95': p['fpr95'], 'auroc': p['auroc'], 'pooled_ap': q['ap'],
            'miou': None}


def _replay(bag: Path, artifact: Path, out: Path, labels: str, outputs: bool,
            progress: bool) -> dict[str, Any]:
    from anomaly_seg_node import replay_command

    parser = argparse.ArgumentParser()
    replay_command.add_arguments(parser)
    argv = ['--bag', str(bag), '--artifact', str(artifact), '--out', str(out),
            '--backend', 'onnxruntime', '--device', 'cpu', '--labels', labels]
    if outputs:
        argv += ['--video', '--contact-sheet']
    if not progress:
        argv.append('--no-progress')
    return replay_command.run(parser.parse_args(argv))


def _figures(report: dict[str, Any]) -> dict[str, float | None]:
    metrics = report['metrics']
    per_image, pooled = metrics.get('per_image', {}), metrics.get('pooled', {})
    return {'ap': per_image.get('ap'), 'fpr95': per_image.get('fpr95'),
            'auroc': per_image.get('auroc'), 'pooled_ap': pooled.get('ap'),
            'miou': metrics.get('closed', {}).get('miou')}


def _card_rows(card_path: Path, artifact: Path, drive: dict[str, Any],
               rows: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """This run's row plus the card's baseline rows when the card matches this artifact and
    drive; else a note saying why no baseline is shown."""
    if not card_path.is_file():
        return rows, f'no model card at {card_path}: no baseline row'
    try:
        card = json.loads(card_path.read_text(encoding='utf-8'))
        matches = (card['schema'] == CARD_SCHEMA and card['drive'] == drive
                   and card['artifact_sha256'] == _onnx_sha(artifact))
        recorded = list(card['rows'].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return rows, f'model card {card_path} unreadable ({error}): no baseline row'
    if not matches:
        return rows, (f'model card {card_path} is for another artifact or drive (--frames, '
                      '--size, --seed): no baseline row')
    for name, figures in recorded[1:]:
        if name not in rows:  # the centre prior is measured by every run
            rows[f'{name}, measured at build'] = figures
    return rows, f'baseline rows from {card_path} (same drive, measured when the model was built)'


def _checks(main: dict[str, Any], rows: dict[str, Any],
            share: float | None) -> list[dict[str, Any]]:
    checks = []
    if main.get('ap') is not None and share:
        checks.append({'what': f'per-image AP >= {CHANCE_FACTOR:g} x anomaly pixel share',
                       'met': main['ap'] >= CHANCE_FACTOR * share,
                       'detail': f'{_pct(main["ap"])} vs {_pct(CHANCE_FACTOR * share)}, '
                                 f'{main["ap"] / share:.1f}x chance'})
    for name, figures in list(rows.items())[1:]:
        if main.get('ap') is not None and figures.get('ap') is not None:
            checks.append({'what': f'per-image AP above {name}',
                           'met': main['ap'] > figures['ap'],
                           'detail': f'{_pct(main["ap"])} vs {_pct(figures["ap"])}'})
        if main.get('fpr95') is not None and figures.get('fpr95') is not None:
            checks.append({'what': f'FPR95 below {name}',
                           'met': main['fpr95'] < figures['fpr95'],
                           'detail': f'{_pct(main["fpr95"])} vs {_pct(figures["fpr95"])}'})
    return checks


def _onnx_sha(sidecar_path: Path) -> str:
    from anomaly_seg_node.artifact import read_sidecar

    return read_sidecar(sidecar_path).files['onnx'].sha256


def _write_json(path: Path, document: dict[str, Any]) -> None:
    _write_text(path, json.dumps(document, indent=2) + '\n')


def _write_text(path: Path, text: str) -> None:
    from anomaly_seg_node.artifact import atomic_write_bytes

    atomic_write_bytes(path, text.encode('utf-8'))


def _pct(value: float | None) -> str:
    return '' if value is None else f'{100 * value:.2f}'


def _pct_or_na(value: float | None) -> str:
    return 'n/a' if value is None else f'{100 * value:.2f}'


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
