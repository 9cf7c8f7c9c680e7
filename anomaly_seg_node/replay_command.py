"""`anomaly-seg replay`: an artifact on a recorded drive, offline; metrics, latency, video.

Writes into --out: `metrics.json` (machine-readable) and `summary.md` (for people) first, as
soon as the pass over the bag ends, then, when asked, `overlay.mp4` and the rosbag2
`output_bag/` (the input's topics plus the node's outputs), and finally the two reports again
with the outputs listed. `frames.jsonl` holds one line per camera frame, written as it goes,
with the frame's anomaly objects (`objects.find_objects` at the replay's threshold, --objects-*
options). A broken bag, a missing topic or labels of another size stop the replay with a
message, after the results computed so far are written.

Heavy modules (OpenCV, rosbags, onnxruntime, torch) are imported inside `run`.
"""

import argparse
import json
import math
import os
from pathlib import Path
import sys
from typing import Any

from anomaly_seg_node.labels import LABEL_CONVENTIONS

LABEL_KINDS = tuple(LABEL_CONVENTIONS)
# anomaly_seg_node.imaging.RESIZE_MODES; repeated so that --help imports no OpenCV.
RESIZE_MODES = ('letterbox', 'crop_center', 'stretch')
# Anomaly objects (objects.ObjectParams), in pixels of the outputs (the camera frame). min_area:
# SegmentMeIfYouCan's smallest predicted component on its obstacle track; max: objects.
# DEFAULT_MAX_OBJECTS (repeated: --help imports no OpenCV).
OBJECT_DEFAULTS = {'margin': 16, 'merge': 4, 'min_area': 50, 'max': 32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--bag', required=True, type=Path,
                        help='rosbag2 folder (mcap or sqlite3), ROS 1 .bag file or .mcap file')
    parser.add_argument('--artifact', required=True, type=Path,
                        help='the sidecar NAME.json of an exported artifact')
    parser.add_argument('--image-topic', default=None,
                        help='sensor_msgs/Image or CompressedImage topic (default: found in '
                             'the bag, raw preferred over compressed)')
    parser.add_argument('--label-topic', default=None,
                        help='mono8 label topic matched to images by header stamp (default: a '
                             'topic named like "labels"; without one only latency is measured)')
    parser.add_argument('--labels', choices=LABEL_KINDS, default='streethazards',
                        help='what the label ids are: ' + '; '.join(
                            f'{kind}: {words}' for kind, words in LABEL_CONVENTIONS.items())
                        + ' (default: %(default)s)')
    parser.add_argument('--backend', default='auto',
                        choices=('auto', 'tensorrt', 'torch', 'onnxruntime'),
                        help='inference backend (default: %(default)s)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'),
                        help='device (default: %(default)s)')
    parser.add_argument('--precision', default='fp32', choices=('fp32', 'fp16'),
                        help='precision (fp16 needs cuda; default: %(default)s)')
    parser.add_argument('--resize-mode', choices=RESIZE_MODES, default='letterbox',
                        help="how frames are fitted to the artifact's input size when the "
                             'aspect ratios differ by more than 5%%, as the node parameter '
                             'resize_mode: letterbox keeps the aspect ratio and pads, '
                             'crop_center cuts the edges (void / NaN there), stretch distorts; '
                             'outputs and metrics stay at the camera size (default: '
                             '%(default)s)')
    parser.add_argument('--threshold', default=None,
                        help='anomaly threshold: a number or a sidecar threshold name (default: '
                             "the sidecar's default, else the export check's median score)")
    parser.add_argument('--rate', type=float, default=None,
                        help='replay against the bag timestamps at this speed (1.0 = real '
                             "time) with the node's newest-frame policy, reporting dropped "
                             'frames and end-to-end latency; default: every frame, as fast '
                             'as possible')
    parser.add_argument('--out', type=Path, default=None,
                        help='output folder (default: ./replay_BAGNAME)')
    parser.add_argument('--write-bag', action='store_true',
                        help='also write OUT/output_bag: the input topics plus the node outputs')
    parser.add_argument('--output-namespace', default='/anomaly_seg',
                        help='namespace of the output topics in --write-bag (default: '
                             '%(default)s)')
    parser.add_argument('--video', action='store_true',
                        help='also write OUT/overlay.mp4 (mp4v) of the overlay')
    parser.add_argument('--contact-sheet', action='store_true',
                        help='also write OUT/contact_sheet.png: evenly spaced frames with the '
                             'camera image, the semantic and anomaly overlay and the score heat '
                             'map with the labelled anomalies outlined')
    parser.add_argument('--max-frames', type=int, default=None,
                        help='stop after this many camera frames')
    parser.add_argument('--objects-drivable', default='', metavar='CLASSES',
                        help='anomaly objects only on (and --objects-margin around) these '
                             'comma-separated classes of the artifact, e.g. road (default: '
                             'none, no restriction)')
    parser.add_argument('--objects-margin', type=int, default=OBJECT_DEFAULTS['margin'],
                        metavar='PX',
                        help='pixels the drivable area is grown by, to keep the parts of an '
                             'object standing on it (default: %(default)s)')
    parser.add_argument('--objects-merge', type=int, default=OBJECT_DEFAULTS['merge'],
                        metavar='PX',
                        help='anomaly fragments at most this many pixels apart form one object '
                             '(0: 8-connected components only; default: %(default)s)')
    parser.add_argument('--objects-min-area', type=int, default=OBJECT_DEFAULTS['min_area'],
                        metavar='PX',
                        help='smallest object in pixels (default: %(default)s)')
    parser.add_argument('--objects-max', type=int, default=OBJECT_DEFAULTS['max'], metavar='N',
                        help='most objects per frame, the largest first (default: %(default)s)')
    parser.add_argument('--no-progress', action='store_true', help='hide the progress bar')


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from anomaly_seg_node import backends
    from anomaly_seg_node.artifact import read_sidecar, resolve_threshold
    from anomaly_seg_node.errors import BagError
    from anomaly_seg_node.objects import fpr_table_from_thresholds
    from anomaly_seg_node.pipeline import FramePipeline
    from anomaly_seg_node.replay import Replay
    from anomaly_seg_node.replay_outputs import BagSink, ContactSheetSink, VideoSink

    sidecar = read_sidecar(args.artifact)
    threshold, threshold_source = _threshold(sidecar, args.threshold, resolve_threshold)
    labels = _label_spec(args.labels, sidecar.classes)
    objects = object_params(args, sidecar.classes, threshold)
    fpr_table = fpr_table_from_thresholds(sidecar.thresholds)
    out = args.out if args.out is not None else Path(f'replay_{Path(args.bag).name}')
    out.mkdir(parents=True, exist_ok=True)
    segmenter = backends.load(sidecar, args.backend, args.device, args.precision)
    resize_mode = getattr(args, 'resize_mode', 'letterbox')

    def warn(message: str) -> None:
        tqdm.write(f'warning: {message}', file=sys.stderr)

    pipeline = FramePipeline(segmenter, sidecar.classes, sidecar.palette, sidecar.void_id,
                             threshold=threshold, resize_mode=resize_mode,
                             pad_rgb=sidecar.pad_rgb, pad_mode=sidecar.pad_mode,
                             on_warning=warn)
    sinks: dict[str, Any] = {}
    want = ['semantic_mask', 'anomaly_score', 'anomaly_mask']
    if args.video:
        sinks['video'] = VideoSink(out / 'overlay.mp4')
        want.append('overlay')
    if getattr(args, 'contact_sheet', False):
        sinks['contact_sheet'] = ContactSheetSink(out / 'contact_sheet.png')
        want.append('overlay')
    if args.write_bag:
        sinks['bag'] = BagSink(out / 'output_bag', namespace=args.output_namespace)
        want += ['semantic_color', 'overlay']
    artifact = {
        'sidecar': str(args.artifact), 'method': sidecar.method, 'score': sidecar.score.name,
        'input_size': list(sidecar.input_size), 'classes': list(sidecar.classes),
        'backend': getattr(segmenter, 'backend', args.backend),
        'device': getattr(segmenter, 'device', args.device),
        'precision': getattr(segmenter, 'precision', args.precision),
        'backend_reason': getattr(segmenter, 'reason', ''),
        'threshold': threshold, 'threshold_source': threshold_source,
        'threshold_name': _threshold_name(sidecar, args.threshold),
        'resize_mode': resize_mode, 'pad_mode': sidecar.pad_mode,
        'pad_rgb': list(sidecar.pad_rgb),
    }
    bar = tqdm(desc='replay', unit='frame', disable=args.no_progress)

    def progress(done: int, total: int | None) -> None:
        if total is not None and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    frames_path = out / 'frames.jsonl'
    error: BagError | None = None
    with open(frames_path, 'w', encoding='utf-8') as frames_file:
        def on_frame(record: dict[str, Any]) -> None:
            frames_file.write(json.dumps(_jsonable(record)) + '\n')

        replay = Replay(args.bag, pipeline, image_topic=args.image_topic,
                        label_topic=args.label_topic, labels=labels, rate=args.rate,
                        max_frames=args.max_frames, want=want, sinks=list(sinks.values()),
                        on_frame=on_frame, on_progress=progress, objects=objects,
                        fpr_table=fpr_table)
        try:
            replay.run()
        except BagError as caught:
            error = caught
        finally:
            bar.close()
    report = {**replay.report(), 'artifact': artifact, 'files': {'frames': str(frames_path)}}
    write_reports(out, report)  # first: nothing below can lose these results
    if sinks:
        report['outputs'] = {name: sink.close() for name, sink in sinks.items()}
        write_reports(out, report)
    if error is not None:
        raise BagError(f'{error} (partial results written to {out / "metrics.json"})')
    return summary(report, out)


def object_params(args: argparse.Namespace, classes: Any, threshold: float) -> Any:
    """The replay's ObjectParams from the --objects-* options (class names -> label ids)."""
    from anomaly_seg_node.errors import ConfigError
    from anomaly_seg_node.objects import ObjectParams

    classes = list(classes)
    names = [n.strip() for n in str(getattr(args, 'objects_drivable', '') or '').split(',')
             if n.strip()]
    unknown = [n for n in names if n not in classes]
    if unknown:
        raise ConfigError(f'--objects-drivable names {unknown}, which are not classes of the '
                          f'artifact; choose among {", ".join(classes)}')

    def option(name: str) -> Any:
        return getattr(args, f'objects_{name}', OBJECT_DEFAULTS[name])

    for name, low in (('margin', 0), ('merge', 0), ('min_area', 1), ('max', 1)):
        value = option(name)
        if value < low:
            raise ConfigError(f'--objects-{name.replace("_", "-")} must be >= {low}, got {value}')
    return ObjectParams(threshold=threshold,
                        drivable_ids=tuple(classes.index(n) for n in names),
                        drivable_margin=option('margin'), merge_distance=option('merge'),
                        min_area_px=option('min_area'), max_objects=option('max'))


def _threshold_name(sidecar: Any, value: str | None) -> str | None:
    """The sidecar name of the replay's threshold (None for a number or no threshold)."""
    name = value if value is not None else sidecar.default_threshold
    return name if isinstance(name, str) and name in sidecar.thresholds else None


def _threshold(sidecar: Any, value: str | None, resolve: Any) -> tuple[float, str]:
    if value is not None:
        return resolve(sidecar, value), f'--threshold {value}'
    if sidecar.default_threshold is not None:
        return resolve(sidecar), f'sidecar default {sidecar.default_threshold!r}'
    parity = sidecar.parity.get('threshold') if isinstance(sidecar.parity, dict) else None
    if isinstance(parity, (int, float)) and math.isfinite(parity):
        return float(parity), ('no calibrated threshold in the sidecar: the median score of '
                               'the export check (pass --threshold to choose)')
    return 0.0, 'no threshold in the sidecar: 0.0 (pass --threshold to choose)'


def _label_spec(kind: str, classes: Any) -> Any:
    from anomaly_seg_node.labels import label_spec

    return label_spec(kind, classes)


def summary(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """The short result printed by the command."""
    frames = report['frames']
    result: dict[str, Any] = {
        'out': str(out),
        'mode': report['mode'],
        'frames': {k: frames[k] for k in ('read', 'processed', 'dropped', 'rejected',
                                          'with_labels')},
    }
    latency = report['latency_ms']
    result['latency_ms'] = {stage: {k: latency[stage][k] for k in ('mean', 'p50', 'p99')}
                            for stage in ('decode', 'infer', 'process', 'end_to_end')
                            if latency.get(stage, {}).get('count')}
    if 'live' in report:
        result['live'] = {k: v for k, v in report['live'].items() if v is not None}
    metrics = report.get('metrics', {})
    if 'skipped' in metrics:
        result['metrics'] = metrics['skipped']
    else:
        headline = {}
        for section, keys in (('per_image', ('ap', 'auroc', 'fpr95')),
                              ('pooled', ('ap', 'auroc', 'fpr95')),
                              ('closed', ('miou',)), ('open_set', ('open_miou',))):
            block = metrics.get(section, {})
            for key in keys:
                if key in block:
                    headline[f'{section}.{key}'] = block[key]
        if metrics.get('anomaly_pixel_share') is not None:
            headline['anomaly_pixel_share'] = metrics['anomaly_pixel_share']
        headline.update(component_headline(metrics.get('components', {})))
        result['metrics'] = headline
    if 'objects' in report:
        objects = report['objects']
        result['objects'] = {'per_frame': objects['per_frame'], 'max': objects['max'],
                             'frames_with_objects': objects['frames_with_objects']}
    if 'growth_mb' in report.get('memory', {}):
        result['memory_growth_mb'] = report['memory']['growth_mb']
    if report.get('warnings'):
        result['warnings'] = list(report['warnings'])
    return result


COMPONENT_HEADLINE = (('mask', ('siou', 'ppv', 'f1_mean')),
                      ('objects', ('siou', 'ppv', 'f1_mean')),
                      ('boxes', ('recall', 'precision', 'objects_per_frame')))


def component_headline(components: dict[str, Any]) -> dict[str, Any]:
    """'components.mask.siou' etc.: the component figures of the printed summary."""
    headline: dict[str, Any] = {}
    if not components:
        return headline
    headline['components.threshold'] = components.get('threshold')
    for part, keys in COMPONENT_HEADLINE:
        block = components.get(part, {})
        if 'error' in block:
            headline[f'components.{part}'] = block['error']
        for key in keys:
            if key in block:
                headline[f'components.{part}.{key}'] = block[key]
    return headline


def write_reports(out: Path, report: dict[str, Any]) -> None:
    """metrics.json and summary.md, each replaced atomically."""
    _atomic_text(out / 'metrics.json', json.dumps(_jsonable(report), indent=2) + '\n')
    _atomic_text(out / 'summary.md', render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    bag, frames, art = report['bag'], report['frames'], report.get('artifact', {})
    lines = ['# anomaly-seg replay', '']
    if report.get('error'):
        lines += ['**Stopped early:** ' + report['error'], '']
    lines += [f'- bag: `{bag["path"]}` ({bag.get("kind")})',
              f'- image topic: `{bag.get("image_topic")}` ({bag.get("image_kind")}), label '
              f'topic: `{bag.get("label_topic")}`',
              f'- artifact: `{art.get("sidecar")}` ({art.get("method")}, score '
              f'{art.get("score")}, input {art.get("input_size")}), backend '
              f'{art.get("backend")} on {art.get("device")} {art.get("precision")}',
              f'- threshold: {_fmt(art.get("threshold"))} ({art.get("threshold_source")})',
              f'- resize mode: {art.get("resize_mode", "letterbox")} (bars: '
              f'{art.get("pad_mode", "constant")})',
              f'- mode: {report["mode"]}',
              f'- frames: {frames["read"]} read, {frames["processed"]} processed, '
              f'{frames["dropped"]} dropped, {frames["rejected"]} rejected; '
              f'{frames["with_labels"]} with labels', '']
    if bag.get('note'):
        lines += [f'Note: {bag["note"]}', '']
    for warning in report.get('warnings', []):
        lines += [f'Warning: {warning}', '']
    lines += ['## Latency (ms)', '', '| stage | count | mean | p50 | p90 | p99 | max |',
              '|---|---|---|---|---|---|---|']
    for stage, stats in report['latency_ms'].items():
        if stats.get('count'):
            lines.append(f'| {stage} | {stats["count"]} | ' + ' | '.join(
                _fmt(stats[k]) for k in ('mean', 'p50', 'p90', 'p99', 'max')) + ' |')
    lines.append('')
    if 'live' in report:
        lines += ['## Live replay', '']
        lines += [f'- {key}: {_fmt(value)}' for key, value in report['live'].items()]
        lines.append('')
    if report.get('memory'):
        lines += ['## Memory (RSS, MiB)', '']
        lines += [f'- {key}: {_fmt(value)}' for key, value in report['memory'].items()]
        lines.append('')
    metrics = report.get('metrics', {})
    lines += ['## Metrics', '']
    if 'skipped' in metrics:
        lines += [f'Skipped: {metrics["skipped"]}', '']
    else:
        lines += [f'{metrics.get("frames", 0)} labelled frames, labels: {metrics.get("labels")}, '
                  f'anomaly pixel share (the AP of chance): '
                  f'{_fmt(metrics.get("anomaly_pixel_share"))}', '']
        if metrics.get('unseen_pixels'):
            lines += [f'{metrics["unseen_pixels"]} pixels the model never saw (resize mode '
                      f'{art.get("resize_mode")}) are left out of the metrics.', '']
        lines += ['| protocol | AP | AUROC | FPR95 |', '|---|---|---|---|']
        for section in ('per_image', 'pooled'):
            block = metrics.get(section, {})
            if 'error' in block:
                lines.append(f'| {section} | {block["error"]} | | |')
            else:
                lines.append(f'| {section} | ' + ' | '.join(
                    _fmt(block.get(k)) for k in ('ap', 'auroc', 'fpr95')) + ' |')
        closed, open_set = metrics.get('closed', {}), metrics.get('open_set', {})
        lines += ['', f'- closed mIoU: {_fmt(closed.get("miou", closed.get("error")))}',
                  f'- open-mIoU: {_fmt(open_set.get("open_miou", open_set.get("error")))} '
                  f'(threshold {_fmt(metrics.get("threshold"))})', '']
        lines += _component_lines(metrics.get('components', {}))
    if 'objects' in report:
        lines += _object_lines(report['objects'])
    if report.get('outputs'):
        lines += ['## Outputs', '']
        for name, info in report['outputs'].items():
            where = info.get('path') or 'not written'
            error = f' — {info["error"]}' if info.get('error') else ''
            lines.append(f'- {name}: `{where}`{error}')
        lines.append('')
    return '\n'.join(lines)


def _component_lines(components: dict[str, Any]) -> list[str]:
    if not components:
        return []
    lines = [f'### Components at the threshold {_fmt(components.get("threshold"))}', '',
             '| what | sIoU | PPV | mean F1 | F1 at 0.5 | labelled components | predicted |',
             '|---|---|---|---|---|---|---|']
    names = {'mask': 'mask: score > threshold (SegmentMeIfYouCan)',
             'objects': 'anomaly objects (as published)'}
    for part, name in names.items():
        block = components.get(part)
        if block is None:
            continue
        if 'error' in block:
            lines.append(f'| {name} | {block["error"]} | | | | | |')
            continue
        lines.append(f'| {name} | ' + ' | '.join(
            _fmt(block.get(k)) for k in ('siou', 'ppv', 'f1_mean', 'f1_50', 'n_gt', 'n_pred'))
            + ' |')
    boxes = components.get('boxes')
    if boxes is not None:
        if 'error' in boxes:
            lines += ['', f'- object boxes: {boxes["error"]}']
        else:
            lines += ['', f'- object boxes at IoU >= {_fmt(boxes.get("iou_threshold"))}: recall '
                          f'{_fmt(boxes.get("recall"))}, precision {_fmt(boxes.get("precision"))}'
                          f' ({boxes.get("tp")} matched, {boxes.get("fp")} false, '
                          f'{boxes.get("fn")} missed of {boxes.get("n_gt")} labelled), '
                          f'{_fmt(boxes.get("objects_per_frame"))} objects and '
                          f'{_fmt(boxes.get("false_positives_per_frame"))} false ones per '
                          'frame']
    lines += ['', f'{components.get("protocol", "")}', '']
    return lines


def _object_lines(objects: dict[str, Any]) -> list[str]:
    params = objects.get('params') or {}
    drivable = (f'{", ".join(params["drivable_classes"])} (margin {params["drivable_margin"]} px)'
                if params.get('drivable_classes') else 'none (no restriction)')
    return ['## Anomaly objects', '',
            f'- {objects["total"]} objects in {objects["frames"]} frames: '
            f'{_fmt(objects.get("per_frame"))} per frame, at most {objects["max"]}; '
            f'{objects["frames_with_objects"]} frames with objects',
            f'- threshold {_fmt(params.get("threshold"))}; drivable classes: {drivable}; '
            f'fragments within {params.get("merge_distance")} px merged; at least '
            f'{params.get("min_area_px")} px; at most {params.get("max_objects")} per frame',
            f'- confidence: {params.get("confidence")}', '']


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f'{value:.4g}'
    return str(value)


def _jsonable(value: Any) -> Any:
    """NaN and inf become null (JSON has neither); numpy scalars become Python numbers."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f'.{path.name}.tmp')
    tmp.write_text(text, encoding='utf-8')
    os.replace(tmp, path)
