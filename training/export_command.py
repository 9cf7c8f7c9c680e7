"""`anomaly-seg export`: a checkpoint (or an untrained network) -> NAME.onnx, NAME.pt2, NAME.json.

`--formats onnx` leaves out NAME.pt2 (the torch and tensorrt backends' input): an ONNX
Runtime-only artifact, half the size, e.g. for a demo model committed to the repository.

The score, normalisation and argmax are inside the graph (training/export.py); the sidecar gets
named thresholds calibrated at the artifact's size (training/calibration.py): `tpr95` on
validation images with pasted negatives or on a labelled split (`--calibration-data`), `fpr1`
and `fpr0.1` on inlier validation pixels. Without data the thresholds are score quantiles of
synthetic road images, named `synthetic_q*` and flagged in the sidecar. `--all-scores` also
writes the sibling artifacts NAME-segmentation, NAME-OP, NAME-OPxMS, NAME-DH and NAME-JSD that
`anomaly-seg bench` times side by side. `--int8` also writes NAME-int8.onnx and NAME-int8.json:
the main score's graph statically quantised for ONNX Runtime on the CPU (QDQ, per-channel int8
weights, activation ranges from frames of the calibration data), checked against NAME.onnx and
with thresholds calibrated again on its own scores (training/quantize.py). Nothing heavy is
imported until `run`.
"""

import argparse
from pathlib import Path
from typing import Any

from anomaly_seg_node.artifact import LABEL_DTYPES, PAD_MODES, SCORE_RESOLUTIONS
from anomaly_seg_node.errors import ConfigError
from training.cli_types import size_arg
from training.score_info import TABLE_II_GRAPHS, is_tempered, needs_outlier_head

DEFAULT_SIZE = (720, 1280)  # StreetHazards' validation images
MIN_SIZE = 32  # pixels per side of an export
# Model formats (anomaly_seg_node.artifact.MODEL_FILE_KINDS; onnx is required).
FORMATS = ('onnx', 'pt2')
# Which parity block of the sidecar checks which format.
FORMAT_RUNTIMES = {'onnx': 'onnxruntime', 'pt2': 'torch_export'}
# training.quantize.DEFAULT_FRAMES and CHECK_FRAMES (not imported: --help stays light).
DEFAULT_INT8_FRAMES = 32
INT8_CHECK_FRAMES = 8


def parse_formats(text: str) -> tuple[str, ...]:
    """'onnx,pt2' -> ('onnx', 'pt2'); 'onnx' alone is an ONNX Runtime-only artifact."""
    requested = [part.strip() for part in text.split(',') if part.strip()]
    unknown = [kind for kind in requested if kind not in FORMATS]
    if unknown or 'onnx' not in requested:
        raise argparse.ArgumentTypeError(
            f'formats must be onnx or onnx,pt2 (every artifact ships NAME.onnx; pt2 is for the '
            f'torch and tensorrt backends), got {text!r}')
    return tuple(kind for kind in FORMATS if kind in requested)


def sibling_stem(out: str | Path, score: str) -> Path:
    """models/NAME -> models/NAME-SCORE: the sibling artifact of one score."""
    out = Path(out)
    return out.with_name(f'{out.name}-{score}')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument('--checkpoint', metavar='CKPT',
                        help='training checkpoint (.pt written by anomaly-seg train)')
    source.add_argument('--random-init', action='store_true',
                        help='export an untrained network of the --config architecture (to '
                             'measure speed before any training)')
    parser.add_argument('--config', metavar='CFG',
                        help='training config YAML (required with --random-init; with '
                             '--checkpoint the stored config is used)')
    parser.add_argument('--out', required=True, metavar='models/NAME',
                        help='artifact stem: writes NAME.onnx, NAME.json and, unless '
                             '--formats onnx, NAME.pt2')
    parser.add_argument('--formats', type=parse_formats, default=FORMATS, metavar='onnx[,pt2]',
                        help='model files to write and check (default onnx,pt2); onnx alone '
                             'makes an ONNX Runtime-only artifact without NAME.pt2, which the '
                             'torch and tensorrt backends and build-engine then refuse')
    parser.add_argument('--score', default=None,
                        help='anomaly score inside the graph: DH, OP, OPxMS, JSD, MSP, '
                             "max_logit, energy or 'segmentation' (default DH with an outlier "
                             "head, else the config's first eval score)")
    parser.add_argument('--size', type=size_arg(MIN_SIZE), default=DEFAULT_SIZE, metavar='HxW',
                        help='static input size of the graph (default 720x1280, the '
                             'StreetHazards validation size)')
    parser.add_argument('--score-resolution', choices=SCORE_RESOLUTIONS, default='stride4',
                        help="where the graph computes the score: 'stride4' (default: on the "
                             "decoder's stride-4 logits, the score map then upsampled "
                             "bilinearly; DH costs 1.8%% over segmentation alone instead of "
                             "10%%, same AP) or 'input' (the paper: on the logits upsampled to "
                             'the input size)')
    parser.add_argument('--label-dtype', choices=LABEL_DTYPES, default='int32',
                        help="dtype of the labels output: 'int32' (default; what every release "
                             "reads) or 'uint8' (a quarter of the bytes to copy off a GPU; "
                             'needs a runtime of this version or later)')
    parser.add_argument('--label-resolution', choices=SCORE_RESOLUTIONS, default='input',
                        help="where the argmax is taken: 'input' (default: on the class logits "
                             "upsampled bilinearly) or 'stride4' (on the decoder's stride-4 "
                             'logits, the labels then upsampled by nearest neighbour: no '
                             'K-channel upsample, blockier class borders; needs '
                             '--score-resolution stride4)')
    parser.add_argument('--pad-mode', choices=PAD_MODES, default='reflect',
                        help="how the node fills letterbox bars when a camera's aspect ratio "
                             "differs from --size (written to the sidecar, used by the "
                             "thresholds' calibration): 'reflect' (default: the picture "
                             'mirrored at its edges; 1.8 mIoU points over a flat fill on 4:3 '
                             "CamVid frames in a 16:9 artifact) or 'constant' (the training "
                             "config's data.mean_fill colour)")
    parser.add_argument('--batch', type=int, default=1, metavar='K',
                        help='static batch of the graph (default 1)')
    parser.add_argument('--calibration-data', metavar='DIR',
                        help='labelled anomalies to calibrate on: a CamVid-layout folder from '
                             'anomaly-seg synth paste --split val (tpr95 on its anomalies, '
                             'fpr1/fpr0.1 on its normal pixels; the default threshold is then '
                             'fpr1), or a StreetHazards-layout folder whose test split labels '
                             'anomalies (raw id 14; fpr on its validation split, else its test '
                             'inliers). Default: the config data.root validation split with '
                             'pasted ADE20k negatives')
    parser.add_argument('--calibration-images', type=int, default=50, metavar='N',
                        help='at most N images per calibration split (default 50)')
    parser.add_argument('--synthetic-thresholds', action='store_true',
                        help='calibrate nothing: use score quantiles of synthetic road images '
                             '(implied by --random-init without --calibration-data)')
    parser.add_argument('--all-scores', action='store_true',
                        help='also write NAME-segmentation, NAME-OP, NAME-OPxMS, NAME-DH and '
                             'NAME-JSD (those the network supports) for anomaly-seg bench')
    parser.add_argument('--int8', action='store_true',
                        help='also write NAME-int8.onnx/.json: the main score graph statically '
                             'quantised (QDQ, int8 per-channel weights, uint8 activations '
                             'calibrated on frames of the calibration data) for onnxruntime on '
                             'the CPU, checked against NAME.onnx, thresholds recalibrated on '
                             'its own scores; the score head stays float')
    parser.add_argument('--int8-frames', type=int, default=None, metavar='N',
                        help=f'frames of the calibration data that set the int8 activation '
                             f'ranges (default {DEFAULT_INT8_FRAMES}); {INT8_CHECK_FRAMES} more '
                             'are held out for its parity check')
    parser.add_argument('--seed', type=int, default=0,
                        help='seed of the untrained weights and of the pasted negatives')
    parser.add_argument('--no-progress', action='store_true', help='hide progress bars')


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from anomaly_seg_node.artifact import read_sidecar
    from training import quantize
    from training import scores as score_module
    from training.calibration import ScoreMaps, calibrate_on_data, calibrate_synthetic
    from training.export import DeployModel, check_label_resolution, export_artifact

    try:
        formats = parse_formats(','.join(getattr(args, 'formats', FORMATS)))
    except argparse.ArgumentTypeError as error:
        raise ConfigError(str(error)) from None
    if isinstance(args.batch, bool) or args.batch < 1:
        raise ConfigError(f'--batch must be a positive integer, got {args.batch}')
    int8 = bool(getattr(args, 'int8', False))
    int8_frames = getattr(args, 'int8_frames', None)
    if int8_frames is not None and not int8:
        raise ConfigError('--int8-frames only applies with --int8; add --int8 or drop it')
    int8_frames = DEFAULT_INT8_FRAMES if int8_frames is None else int8_frames
    if int8 and int8_frames < 1:
        raise ConfigError(f'--int8-frames must be >= 1, got {int8_frames}')
    check_label_resolution(args.score or 'DH', args.score_resolution, args.label_resolution)
    cfg, segmenter, origin = _load_network(args)
    has_head = bool(getattr(segmenter, 'has_outlier_head', False))
    main_score = args.score or ('DH' if has_head else (cfg.eval.scores or ('MSP',))[0])
    _check_score(score_module, main_score, has_head)

    exports = [main_score]
    skipped = []
    if args.all_scores:
        for score in TABLE_II_GRAPHS:
            if score == main_score:
                continue
            if needs_outlier_head(score) and not has_head:
                skipped.append(f'{score} (needs the outlier head, which this network lacks)')
                continue
            exports.append(score)
    temperatures = {s: (cfg.eval.temperature if is_tempered(s) else None) for s in exports}

    size = tuple(args.size)
    notes = []
    resolution = args.score_resolution
    score_maps = ScoreMaps(segmenter, exports, temperatures, resolution)
    torch.manual_seed(args.seed)
    keep = int8_frames + INT8_CHECK_FRAMES if int8 else 0
    synthetic = args.calibration_data is None and (args.random_init or args.synthetic_thresholds)
    calibration_args: dict[str, Any] = {}
    if synthetic:
        calibration = calibrate_synthetic(score_maps, size, seed=args.seed + 1)
        why = ('--random-init: an untrained network' if args.random_init
               else '--synthetic-thresholds')
        notes.append(f'no calibration data ({why}): the thresholds are score quantiles of '
                     'synthetic road images (synthetic_q95, synthetic_q99, synthetic_q99.9), '
                     'not tpr95/fpr1/fpr0.1; re-export a trained checkpoint with data for those')
    else:
        calibration_args = dict(
            val_root=cfg.data.root, dataset=cfg.data.dataset,
            mapping=cfg.data.mapping, ade_root=cfg.negatives.ade_root,
            ade_crop=cfg.negatives.ade_crop, labelled_root=args.calibration_data,
            max_images=args.calibration_images, seed=args.seed, pad_rgb=cfg.data.mean_fill,
            pad_mode=args.pad_mode, progress=not args.no_progress)
        calibration = calibrate_on_data(score_maps, size, frames=keep, **calibration_args)

    from training.data.registry import classes_of
    classes, palette = classes_of(cfg.data.dataset, cfg.data.mapping)
    training_block = {'config': cfg.to_dict(), **origin, 'calibration': calibration.info}
    metadata = {
        'method': cfg.method,
        'classes': classes,
        'palette': [list(rgb) for rgb in palette],
        'pad_rgb': list(cfg.data.mean_fill),
        'pad_mode': args.pad_mode,
        'training': training_block,
    }
    out = Path(args.out)
    if out.suffix == '.json':
        out = out.with_suffix('')
    written: dict[str, str] = {}
    parity: dict[str, Any] = {}
    thresholds: dict[str, Any] = {}
    for score in exports:
        stem = out if score == main_score else sibling_stem(out, score)
        model = DeployModel(segmenter, score, temperatures.get(score), resolution,
                            args.label_dtype, args.label_resolution)
        score_thresholds = calibration.thresholds.get(score, {})
        sidecar = export_artifact(
            model, stem, size=size, batch=args.batch,
            calibration_images=calibration.parity_images, thresholds=score_thresholds,
            metadata={**metadata, 'default_threshold': (calibration.default_threshold
                                                         if score_thresholds else None)},
            seed=args.seed, formats=formats)
        written[score] = str(stem.with_suffix('.json'))
        thresholds[score] = dict(sidecar.thresholds)
        parity[score] = {FORMAT_RUNTIMES[kind]: {k: sidecar.parity[FORMAT_RUNTIMES[kind]][k]
                                                 for k in ('label_agreement', 'mask_agreement',
                                                           'score_diff_over_std')}
                         for kind in formats}
    int8_report = None
    if int8:
        int8_report = _export_int8(quantize, read_sidecar(written[main_score]), args, size,
                                   calibration, calibration_args, synthetic, int8_frames)
        if len(exports) > 1:
            notes.append(f'--int8 quantised the main score graph ({main_score}) only; the '
                         '--all-scores siblings stay fp32')
        if synthetic:
            notes.append('--int8 without calibration data: the activation ranges come from '
                         'synthetic road images, so the int8 parity says little about real '
                         'frames; re-export with --calibration-data for a deployable one')
    elif quantize.int8_stem(out).with_suffix('.json').is_file():
        stale = quantize.stale_int8(read_sidecar(written[main_score]))
        if stale:
            notes.append(stale)
    if 'pt2' not in formats:
        notes.append('--formats onnx: no NAME.pt2 was written, so the artifact runs in '
                     'onnxruntime only (backend auto picks it; torch, tensorrt and build-engine '
                     'refuse it); re-export with --formats onnx,pt2 for those')
    report: dict[str, Any] = {
        'artifact': written[main_score],
        'score': main_score,
        'size': f'{size[0]}x{size[1]}',
        'batch': args.batch,
        'score_resolution': resolution,
        'labels': {'dtype': args.label_dtype, 'resolution': args.label_resolution},
        'formats': list(formats),
        'source': origin['source'],
        'calibration': calibration.info.get('source'),
        'default_threshold': calibration.default_threshold,
        'thresholds': thresholds,
        'parity': parity,
        'artifacts': written,
    }
    if int8_report is not None:
        report['int8'] = int8_report
    if skipped:
        report['skipped'] = skipped
    if notes:
        report['notes'] = notes
    return report


def format_human(report: dict[str, Any]) -> str:
    lines = [f"exported {report['artifact']} (score {report['score']} at "
             f"{report['score_resolution']} resolution, {report['size']}, "
             f"batch {report['batch']}) from {report['source']}",
             f"formats: {', '.join(report['formats'])}"]
    for score, path in report['artifacts'].items():
        agree = report['parity'][score]
        figures = ', '.join(
            f"{runtime}: labels {fig['label_agreement']:.4%}, masks {fig['mask_agreement']:.4%}, "
            f"score diff {fig['score_diff_over_std']:.2g} std"
            for runtime, fig in agree.items())
        lines.append(f'  {score:<12} {path}  [{figures}]')
        if report['thresholds'][score]:
            values = ', '.join(f'{k}={v:.6g}' for k, v in report['thresholds'][score].items())
            lines.append(f'  {"":<12} thresholds: {values}')
    if report.get('int8'):
        int8 = report['int8']
        fig = int8['parity']
        lines.append(
            f"  {'int8':<12} {int8['artifact']}  [vs fp32: labels {fig['label_agreement']:.3%}, "
            f"masks {fig['mask_agreement']:.3%}, score error mean "
            f"{fig['mean_score_diff_over_std']:.2g} std, p99 "
            f"{fig['p99_score_diff_over_std']:.2g} std; {int8['calibration_frames']} "
            'calibration frames]')
        if int8['thresholds']:
            values = ', '.join(f'{k}={v:.6g}' for k, v in int8['thresholds'].items())
            lines.append(f'  {"":<12} thresholds: {values}')
    lines.append(f"calibration: {report['calibration']}; default threshold "
                 f"{report['default_threshold']}")
    for item in report.get('skipped', []):
        lines.append(f'skipped: {item}')
    for note in report.get('notes', []):
        lines.append(f'NOTE: {note}')
    return '\n'.join(lines)


def _export_int8(quantize: Any, main: Any, args: argparse.Namespace, size: tuple[int, int],
                 calibration: Any, calibration_args: dict[str, Any], synthetic: bool,
                 frames: int) -> dict[str, Any]:
    """NAME-int8 of the main artifact: frames from the calibration data (or synthetic road
    images), thresholds of its own scores on the same data."""
    from training.calibration import calibrate_on_data, calibrate_synthetic

    if synthetic:
        from anomaly_seg_node.check_images import road_like_images

        images = road_like_images(frames + INT8_CHECK_FRAMES, *size, seed=args.seed + 2)
        source = 'synthetic road images (no calibration data)'

        def recalibrate(score_maps: Any) -> Any:
            return calibrate_synthetic(score_maps, size, seed=args.seed + 1)
    else:
        images = calibration.frames
        source = (f"{0 if images is None else len(images)} frames evenly spread over "
                  f"{calibration.info.get('tpr95', 'the calibration data')}")

        def recalibrate(score_maps: Any) -> Any:
            return calibrate_on_data(score_maps, size, **calibration_args)
    if images is None or len(images) < 2:
        raise ConfigError(
            f'--int8 needs at least 2 calibration frames, the calibration data gave '
            f'{0 if images is None else len(images)}; give more (--calibration-images)')
    scored = main.score.name != 'segmentation'
    sidecar = quantize.export_int8(main, images, recalibrate if scored else None,
                                   frames_source=source)
    figures = sidecar.parity['onnxruntime']
    return {
        'artifact': str(Path(str(sidecar.source))),
        'calibration_frames': sidecar.quantization['calibration_frames'],
        'check_frames': sidecar.parity['images'],
        'thresholds': dict(sidecar.thresholds),
        'parity': {k: figures[k] for k in ('label_agreement', 'mask_agreement',
                                           'mean_score_diff_over_std',
                                           'p99_score_diff_over_std', 'flagged_share',
                                           'reference_flagged_share')},
    }


def _check_score(score_module: Any, score: str, has_head: bool) -> None:
    if score == 'segmentation':
        return
    info = score_module.score_info(score)  # ConfigError naming the known scores
    if info.needs_outlier_head and not has_head:
        raise ConfigError(
            f'score {score} needs the outlier head, but this network has none (model.'
            'outlier_head is false); choose --score JSD, MSP, max_logit or energy')


def _load_network(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    """(config, segmenter in eval mode, where it came from) of --checkpoint or --random-init."""
    if args.random_init:
        if not args.config:
            raise ConfigError('--random-init needs --config training/configs/NAME.yaml to know '
                              'the architecture (classes, outlier head)')
        import torch

        from training.config import load_config
        from training.networks.swiftnet import SwiftNet

        cfg = load_config(args.config)
        torch.manual_seed(args.seed)
        segmenter = SwiftNet(cfg.model.num_classes, outlier_head=cfg.model.outlier_head,
                             pretrained=False).eval()
        return cfg, segmenter, {'source': f'random init (untrained, seed {args.seed}) of '
                                          f'{args.config}',
                                'untrained': True}
    from training.checkpoint import build_segmenter, checkpoint_config, load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    cfg = checkpoint_config(ckpt)
    if args.config:
        raise ConfigError('--config is only used with --random-init; a checkpoint exports '
                          'with the config stored in it (drop --config)')
    segmenter = build_segmenter(ckpt)
    origin = {'source': f'checkpoint {args.checkpoint} (step {ckpt.get("step")})',
              'checkpoint': str(args.checkpoint), 'step': ckpt.get('step'),
              'epoch': ckpt.get('epoch'),
              'checkpoint_code_version': ckpt.get('code_version', 'unknown'),
              'untrained': False}
    return cfg, segmenter, origin
