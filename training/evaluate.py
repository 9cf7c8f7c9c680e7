"""The Table I row of a model on the StreetHazards test split (methods.md §2.5, §5, §6).

For each anomaly score: AP, FPR95 and AUROC under two protocols,
- per-image (DenseHybrid's StreetHazards protocol: metrics of every test image, averaged;
  images without anomaly pixels are skipped, as the dataset's creators do, and counted) and
- pooled (one curve over every pixel, in a fixed-size histogram: bounded memory),
plus closed mIoU (argmax over the K classes, anomaly and void ignored, both towns, full
resolution) and open-mIoU: pixels whose score exceeds tau become "anomaly", tau set at 95% TPR
(first ROC point with TPR > 0.95) on the *other* test town at half resolution (score bilinear,
labels nearest), the two towns' open-mIoU averaged weighted by image count. The thresholds come
from a pooled histogram (tau = a bin's lower edge, bins 4.9e-4 relative wide). Open-mIoU needs
the other town's tau first, so the test images are read twice.

Component metrics of SegmentMeIfYouCan (sIoU, PPV, mean F1; `metrics.ComponentMetrics`) of the
mask score > threshold at full resolution, without the benchmark's size filters (they are pixels
at its own images' resolution): for an artifact at its default threshold (the sidecar's
`default_threshold`, the node's); otherwise (a checkpoint, an artifact without a default) at the
open-mIoU threshold of each town (95% TPR on the other town), found in the second pass.

Images are processed one at a time at full resolution (720x1280 for StreetHazards), so memory
does not grow with the data set. Outputs in --out: metrics.json, table.md (the paper's column
order), pr_curves.png and roc_curves.png (pooled curves).

A checkpoint is evaluated with the eager network; an exported artifact (`--artifact NAME.json`)
through `anomaly_seg_node.backends`: each image is resized to the artifact's input size, and
its labels (nearest) and score (bilinear) are resized back to the label size, as the node does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
import json
import os
from pathlib import Path
import time
from typing import Any

import numpy as np

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.metrics import (
    DEFAULT_FPR_RULE,
    ComponentMetrics,
    ConfusionMatrix,
    OpenSetConfusion,
    PerImageOOD,
    PooledOOD,
)
from training.score_info import EVAL_SCORES, SCORES, is_tempered, needs_outlier_head

METHOD_NAMES = {
    'closed_set': 'Closed set (stage 1)', 'densehybrid': 'DenseHybrid', 'oodhead': 'OODHead',
    'nflowjs': 'NFlowJS', 'nf_hybrid_js': 'NF-Hybrid-JS', 'nf_hybrid_ldlx': 'NF-Hybrid-LdLx',
    'nf_hybrid_ld': 'NF-Hybrid-Ld', 'nf_oodhead': 'NF-OODHead',
}
# Methods trained with real auxiliary negatives (the paper's "Aux. data" column).
AUX_DATA_METHODS = ('densehybrid', 'oodhead')
TEST_TOWNS = ('t5', 't6')
# Fits that see every pixel of the image (anomaly_seg_node.imaging.RESIZE_MODES).
EVALUATE_RESIZE_MODES = ('letterbox', 'stretch')
IGNORE = 255
PLOT_POINTS = 4000
# Histogram bits of the tau calibration (2**18 bins: 2e-3 relative width, 4 MiB each).
CALIBRATION_BITS = 18


def score_temperature(name: str, temperature: float) -> float | None:
    """The temperature a score is computed with: `temperature` for the tempered scores (OP,
    OPxMS, JSD: training.score_info), else None (the score's default)."""
    return float(temperature) if is_tempered(name) else None


def usable_scores(names: Iterable[str], has_outlier_head: bool) -> list[str]:
    """The scores a network can compute (DH, OP, OPxMS need the outlier head)."""
    return [n for n in names if has_outlier_head or not needs_outlier_head(n)]


def parse_scores(text: str | Sequence[str]) -> list[str]:
    """'DH,OP,OPxMS' -> ['DH', 'OP', 'OPxMS'], each checked against training.score_info."""
    names = [s.strip() for s in text.split(',')] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise ConfigError('--scores needs at least one score, e.g. DH,OP,OPxMS,JSD')
    for n in names:
        if n not in SCORES:
            raise ConfigError(f'unknown score {n!r} in --scores; expected a comma-separated '
                              f'list of {", ".join(SCORES)}')
    if len(set(names)) != len(names):
        raise ConfigError(f'--scores names a score twice: {",".join(names)}')
    return names


# ---- predictors: image (uint8 HWC RGB) -> argmax labels and score maps at image size ------


Predictor = Callable[[np.ndarray], tuple[np.ndarray, dict[str, np.ndarray]]]


def checkpoint_predictor(path: str | os.PathLike, scores: Sequence[str], device: str = 'auto'
                         ) -> tuple[Predictor, dict[str, Any]]:
    """Predictor of a training checkpoint's segmenter, and facts about the model."""
    import torch

    from training import checkpoint as ckpt_io
    from training.scores import anomaly_score
    ckpt = ckpt_io.load_checkpoint(path)
    cfg = ckpt_io.checkpoint_config(ckpt)
    model = ckpt_io.build_segmenter(ckpt)
    missing = [s for s in scores if s not in usable_scores([s], model.has_outlier_head)]
    if missing:
        raise ConfigError(f'scores {",".join(missing)} need the outlier head, which the '
                          f'{cfg.method} model in {path} does not have; choose among '
                          f'{",".join(usable_scores(EVAL_SCORES, False))}')
    dev = torch.device(_device(device))
    model = model.to(dev).eval()
    temperature = cfg.eval.temperature

    @torch.no_grad()
    def predict(image: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        out = model(x.to(dev).float())
        logits, outlier = out['logits'], out.get('outlier_logits')
        maps = {name: anomaly_score(name, logits, outlier, score_temperature(name, temperature))
                [0].float().cpu().numpy() for name in scores}
        return logits[0].argmax(0).cpu().numpy().astype(np.int64), maps

    from training.data.registry import classes_of
    facts = {'source': 'checkpoint', 'path': str(path), 'method': cfg.method,
             'step': int(ckpt['step']), 'num_classes': cfg.model.num_classes,
             'dataset': cfg.data.dataset, 'mapping': cfg.data.mapping,
             'classes': classes_of(cfg.data.dataset, cfg.data.mapping)[0],
             'temperature': temperature, 'device': str(dev),
             'code_version': ckpt.get('code_version')}
    return predict, facts


def artifact_predictor(path: str | os.PathLike, scores: Sequence[str], device: str = 'auto',
                       backend: str = 'auto', resize_mode: str = 'letterbox'
                       ) -> tuple[Predictor, dict[str, Any]]:
    """Predictor of an exported artifact through anomaly_seg_node.backends (its one score).

    Each image is fitted to the artifact's input as the node does (`anomaly_seg_node.imaging`,
    `resize_mode`) and the outputs mapped back to the image's pixels.
    """
    from anomaly_seg_node import backends, imaging
    dev = _device(device)
    seg = backends.load(path, backend=backend, device=dev)
    sidecar = seg.sidecar
    name = sidecar.score.name
    if list(scores) != [name]:
        raise ConfigError(f'artifact {path} computes the score {name!r} only; pass --scores '
                          f'{name} (export one artifact per score with anomaly-seg export '
                          '--all-scores)')
    if resize_mode not in EVALUATE_RESIZE_MODES:
        raise ConfigError(f'evaluate fits images with --resize-mode letterbox or stretch, got '
                          f'{resize_mode!r}: crop_center never sees the outer pixels, which '
                          'the metrics would have to count')
    net_hw = tuple(seg.input_size)

    def predict(image: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        fit = imaging.plan_fit(image.shape[:2], net_hw, resize_mode)
        result = seg(imaging.fit_image(image, fit, sidecar.pad_rgb, sidecar.pad_mode))
        labels = imaging.unfit(result.labels[0].astype(np.int32), fit, 'nearest', 0)
        score = imaging.unfit(result.anomaly_score[0].astype(np.float32), fit, 'linear', 0.0)
        return labels.astype(np.int64), {name: score}

    facts = {'source': 'artifact', 'path': str(path), 'method': sidecar.method,
             'num_classes': len(sidecar.classes), 'classes': list(sidecar.classes),
             'backend': seg.backend, 'backend_reason': seg.reason, 'device': seg.device,
             'input_size': list(net_hw), 'resize_mode': resize_mode,
             'mapping': 'densehybrid12' if len(sidecar.classes) == 12 else 'creators13',
             'temperature': sidecar.score.temperature, 'thresholds': dict(sidecar.thresholds),
             'default_threshold': sidecar.default_threshold,
             'calibration': sidecar.training.get('calibration', {}).get('source')}
    return predict, facts


def _device(device: str) -> str:
    if device != 'auto':
        return device
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


# ---- evaluation -------------------------------------------------------------------------------


# The reference score every evaluation reports beside the model's: a fixed Gaussian bump at the
# image centre (sigma = a quarter of each side). It ignores the image; a score that does not beat
# it has learnt no more than "anomalies tend to be near the middle of the road".
CENTRE_PRIOR = 'centre_prior'
CENTRE_PRIOR_SIGMA = 0.25


def centre_prior(height: int, width: int) -> np.ndarray:
    """float32 [height, width]: exp(-((x - cx)^2 / 2 sx^2 + (y - cy)^2 / 2 sy^2))."""
    y = (np.arange(height, dtype=np.float32) + 0.5 - height / 2) / (CENTRE_PRIOR_SIGMA * height)
    x = (np.arange(width, dtype=np.float32) + 0.5 - width / 2) / (CENTRE_PRIOR_SIGMA * width)
    return np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)).astype(np.float32)


def _test_sets(data: Path, towns: Sequence[str] | None, facts: Mapping[str, Any],
               limit: int | None, labels: str | None = None
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """({group: (data set, images)}, facts about the data): the test split of `data` in groups
    (StreetHazards towns t5, t6; CamVid recordings such as Seq05VD) for open-mIoU's calibration
    on the other group; a labelled folder (`labels` names its convention) is one group."""
    from training.data.folder import folder_pairs
    from training.data.registry import classes_of, detect_layout
    layout = detect_layout(data)
    if folder_pairs(data) is not None:
        return _folder_set(data, facts, limit, labels)
    if labels is not None:
        raise ConfigError(f'--labels {labels} is for a folder of images/ and labels/ (or Road '
                          f'Anomaly frames/); {data} is a {layout} layout whose ids are known: '
                          'drop --labels')
    if layout == 'camvid':
        from training.data.camvid import CamVid
        groups = list(towns) if towns else CamVid(data, 'test').sequences
        sets = {g: CamVid(data, 'test', sequences=[g]) for g in groups}
        classes = classes_of('camvid')[0]
        ignored = 'CamVid void (id 11) pixels'
    else:
        from training.data.streethazards import SPLITS, StreetHazards
        mapping = facts.get('mapping') or 'densehybrid12'
        image_dir = data / SPLITS['test'][0] / 'images' / SPLITS['test'][1]
        if towns is None:
            towns = [t for t in TEST_TOWNS if (image_dir / t).is_dir()]
            if not towns:
                raise DataError(f'no test town folder ({", ".join(TEST_TOWNS)}) in {image_dir}; '
                                'pass the StreetHazards root that holds test/images/test/t5 and '
                                't6, or a CamVid-layout folder with test/ and testannot/')
        sets = {t: StreetHazards(data, 'test', mapping, towns=[t]) for t in towns}
        classes = classes_of('streethazards', mapping)[0]
        ignored = 'StreetHazards "other" (raw id 4) and void pixels'
    if limit is not None:
        if limit < 1:
            raise ConfigError(f'--limit must be positive, found {limit}')
        sized = {t: (ds, min(limit, len(ds))) for t, ds in sets.items()}
    else:
        sized = {t: (ds, len(ds)) for t, ds in sets.items()}
    model_classes = list(facts.get('classes') or classes)
    info = {'layout': layout, 'classes': classes, 'ignored': ignored,
            'class_metrics': model_classes == list(classes)}
    if not info['class_metrics']:
        info['class_metrics_note'] = (f'the model predicts {model_classes}, the data labels '
                                      f'{list(classes)}: closed and open mIoU are not computed')
    return sized, info


def _folder_set(data: Path, facts: Mapping[str, Any], limit: int | None, labels: str | None
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    from anomaly_seg_node.labels import LABEL_CONVENTIONS, label_spec
    from training.data.folder import LabelledFolder
    if labels is None:
        raise ConfigError(f'{data} is a folder of images and label maps: say what its ids mean '
                          f'with --labels ({", ".join(LABEL_CONVENTIONS)})')
    classes = list(facts.get('classes') or [])
    spec = label_spec(labels, classes)
    ds = LabelledFolder(data, spec, len(classes))
    if limit is not None and limit < 1:
        raise ConfigError(f'--limit must be positive, found {limit}')
    info = {'layout': 'folder', 'labels': labels, 'classes': classes,
            'ignored': f'pixels the {labels} convention ignores',
            'class_metrics': spec.has_classes}
    if not spec.has_classes:
        info['class_metrics_note'] = f'{spec.no_class_reason}: closed and open mIoU not computed'

    return {'all': (ds, min(limit, len(ds)) if limit is not None else len(ds))}, info


def _item(ds: Any, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    item = ds[i]
    image = item['image'].numpy().transpose(1, 2, 0)
    return image, item['label'].numpy(), item['ood'].numpy()


def _half(score: np.ndarray, ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score bilinear and labels nearest at 0.5 (as torch's interpolate, align_corners=False)."""
    import cv2
    h, w = ood.shape
    size = (max(1, w // 2), max(1, h // 2))
    return (cv2.resize(score, size, interpolation=cv2.INTER_LINEAR),
            cv2.resize(ood, size, interpolation=cv2.INTER_NEAREST))


class _FlagRates:
    """Share of inlier and anomaly pixels each named threshold flags (score > threshold)."""

    def __init__(self, thresholds: Mapping[str, float]) -> None:
        self.thresholds = dict(thresholds)
        self.counts = {name: [0, 0] for name in self.thresholds}  # inliers, anomalies flagged
        self.pixels = [0, 0]

    def update(self, score: np.ndarray, ood: np.ndarray) -> None:
        inlier, anomaly = ood == 0, ood == 1
        self.pixels[0] += int(np.count_nonzero(inlier))
        self.pixels[1] += int(np.count_nonzero(anomaly))
        for name, value in self.thresholds.items():
            flagged = score > value
            self.counts[name][0] += int(np.count_nonzero(flagged & inlier))
            self.counts[name][1] += int(np.count_nonzero(flagged & anomaly))

    def compute(self) -> dict[str, Any]:
        n_in, n_an = self.pixels
        return {name: {'value': value,
                       'inlier_flagged': self.counts[name][0] / n_in if n_in else None,
                       'anomaly_flagged': self.counts[name][1] / n_an if n_an else None}
                for name, value in self.thresholds.items()}


def default_threshold(facts: Mapping[str, Any]) -> dict[str, Any] | None:
    """{'name', 'value'} of the artifact's default threshold (the sidecar's default_threshold
    among its thresholds), None when there is none (a checkpoint)."""
    name = facts.get('default_threshold')
    thresholds = facts.get('thresholds') or {}
    if not isinstance(name, str) or name not in thresholds:
        return None
    return {'name': name, 'value': float(thresholds[name])}


def _finite(value: Any) -> Any:
    """NaN and inf as None (JSON has neither), inside dicts and lists too."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def run_evaluation(predict: Predictor, facts: dict[str, Any], data: str | os.PathLike,
                   scores: Sequence[str], out: str | os.PathLike,
                   towns: Sequence[str] | None = None, limit: int | None = None,
                   tpr: float = 0.95, fpr_rule: str = DEFAULT_FPR_RULE,
                   progress: bool = True, labels: str | None = None) -> dict[str, Any]:
    """Evaluate `predict` on the test split; write metrics.json, table.md and curve PNGs.

    Test data without anomaly pixels (plain CamVid) still gives the closed mIoU and, for an
    artifact (`facts['thresholds']`), the share of normal pixels each named threshold flags.
    Component metrics: at `default_threshold(facts)` when there is one, else at each town's
    open-mIoU threshold (module docstring).
    """
    from tqdm import tqdm
    start = time.time()
    data, out = Path(data), Path(out)
    k = int(facts['num_classes'])
    sets, data_info = _test_sets(data, towns, facts, limit, labels)
    class_metrics = data_info['class_metrics']
    n_total = sum(n for _, n in sets.values())
    curves = [*scores, CENTRE_PRIOR]
    per_image = {s: PerImageOOD(fpr_rule) for s in curves}
    pooled = {s: PooledOOD(fpr_rule) for s in curves}
    # calib[A]: half-resolution pixels of the towns that calibrate town A's tau (the other
    # towns; the town itself when it is the only one).
    calib = {t: {s: PooledOOD(fpr_rule, CALIBRATION_BITS) for s in scores} for t in sets}
    flags = {s: _FlagRates(facts.get('thresholds') or {}) for s in scores}
    fixed = default_threshold(facts)
    # no size filters: SegmentMeIfYouCan's are pixels at its own images' resolution
    components = {s: ComponentMetrics() for s in scores}
    closed = ConfusionMatrix(k, IGNORE)
    anomaly_pixels = evaluated_pixels = 0
    prior_cache: dict[tuple[int, int], np.ndarray] = {}
    bar = tqdm(total=2 * n_total, desc='evaluate', unit='img', disable=not progress)
    for town, (ds, n) in sets.items():
        for i in range(n):
            image, label, ood = _item(ds, i)
            pred, maps = predict(image)
            if class_metrics:
                closed.update(pred, label)
            anomaly_pixels += int(np.count_nonzero(ood == 1))
            evaluated_pixels += int(np.count_nonzero(ood <= 1))
            targets = [t for t in sets if t != town] or [town]
            if ood.shape not in prior_cache:
                prior_cache[ood.shape] = centre_prior(*ood.shape)
            maps = {**maps, CENTRE_PRIOR: prior_cache[ood.shape]}
            for s in curves:
                per_image[s].update(maps[s], ood)
                pooled[s].update(maps[s], ood)
            for s in scores:
                flags[s].update(maps[s], ood)
                if fixed is not None:
                    components[s].update(maps[s] > fixed['value'], ood)
                half = _half(maps[s], ood)
                for t in targets:
                    calib[t][s].update(*half)
            bar.update(1)
    has_anomalies = anomaly_pixels > 0
    open_sets: dict[str, dict[str, Any]] = {}
    taus: dict[str, dict[str, float]] = {}
    if has_anomalies and (class_metrics or fixed is None):
        taus = {t: {s: calib[t][s].threshold_at_tpr(tpr, strict=True) for s in scores}
                for t in sets}
        if class_metrics:
            open_sets = {t: {s: OpenSetConfusion(k, taus[t][s], IGNORE) for s in scores}
                         for t in sets}
        for town, (ds, n) in sets.items():
            for i in range(n):
                image, label, ood = _item(ds, i)
                pred, maps = predict(image)
                target = label.astype(np.int64)
                target[ood == 1] = k
                for s in scores:
                    if open_sets:
                        open_sets[town][s].update(pred, maps[s], target)
                    if fixed is None:
                        components[s].update(maps[s] > taus[town][s], ood)
                bar.update(1)
    bar.close()

    result_scores = {}
    for s in scores:
        entry: dict[str, Any] = {
            'temperature': (score_temperature(s, facts['temperature'])
                            if facts['source'] == 'checkpoint' else facts['temperature'])}
        if has_anomalies:
            entry.update(per_image=per_image[s].compute(), pooled=pooled[s].compute())
        if open_sets:
            per_town = {t: open_sets[t][s].compute() for t in sets}
            weights = {t: sets[t][1] for t in sets}
            entry['open_miou'] = float(sum(per_town[t]['open_miou'] * weights[t] for t in sets)
                                       / sum(weights.values()))
            entry['open_per_town'] = {
                t: {'open_miou': m['open_miou'], 'anomaly_iou': m['anomaly_iou'],
                    'tau': m['tau'], 'images': weights[t]} for t, m in per_town.items()}
        if has_anomalies:
            entry['components'] = _components_entry(components[s], fixed, {
                t: taus[t][s] for t in taus}, tpr)
        if flags[s].thresholds:
            entry['thresholds'] = flags[s].compute()
        result_scores[s] = entry
    closed_metrics = closed.compute() if class_metrics else None
    metrics: dict[str, Any] = {
        'model': facts, 'data': str(data), 'layout': data_info['layout'],
        'towns': {t: n for t, (_, n) in sets.items()},
        'images': n_total, 'scores': result_scores,
        'closed_miou': closed_metrics['miou'] if closed_metrics else None,
        'closed_iou': (dict(zip(data_info['classes'], closed_metrics['iou'], strict=True))
                       if closed_metrics else None),
        'anomaly_pixel_share': anomaly_pixels / max(evaluated_pixels, 1),
        'protocols': {
            'per_image': 'mean over test images of AP/FPR95/AUROC; images without anomaly '
                         'pixels are skipped (StreetHazards creators), counted in n_skipped',
            'pooled': 'one curve over all evaluated pixels (histogram, bounds in ap_bound etc.)',
            'fpr95_rule': fpr_rule,
            'open_miou': (f'tau at the first ROC point with TPR > {tpr} on the other test town '
                          'at half resolution; towns weighted by image count' if len(sets) > 1
                          else f'tau at the first ROC point with TPR > {tpr} at half resolution '
                          'on the same (only) town: optimistic'),
            'ignored': data_info['ignored'],
            'components': (
                'SegmentMeIfYouCan component metrics (sIoU, PPV, F1 averaged over sIoU/PPV '
                'thresholds 0.25..0.75) of the mask score > threshold, 8-connected, at full '
                'resolution, without size filters (min_pred_area = min_gt_area = 0; the '
                "benchmark's 500/100 px anomaly-track and 50/10 px obstacle-track filters are "
                "pixels at its own images' resolution); threshold: "
                + (f"the artifact's default threshold {fixed['name']!r} = {fixed['value']:.6g} "
                   '(sidecar default_threshold, as the node uses it)' if fixed is not None
                   else f'the open-mIoU threshold of each town (first ROC point with TPR > '
                        f'{tpr} on the other town; the only town on itself)')),
            CENTRE_PRIOR: 'reference score that ignores the image: a Gaussian bump at the '
                          f'image centre, sigma {CENTRE_PRIOR_SIGMA} of each side'},
        'seconds': round(time.time() - start, 2),
    }
    if has_anomalies:
        metrics['reference'] = {CENTRE_PRIOR: {'per_image': per_image[CENTRE_PRIOR].compute(),
                                               'pooled': pooled[CENTRE_PRIOR].compute()}}
    else:
        metrics['note'] = (f'the test images of {data} hold no anomaly pixel: AP, FPR95, AUROC '
                           'and open-mIoU need anomalies (anomaly-seg synth paste makes a set '
                           'with them); reported: closed mIoU and the share of normal pixels '
                           'each threshold flags')
    if not class_metrics:
        metrics['class_metrics_note'] = data_info['class_metrics_note']
    out.mkdir(parents=True, exist_ok=True)
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
    (out / 'table.md').write_text(markdown_table(metrics))
    if has_anomalies:
        plot_curves({s: pooled[s] for s in curves}, out)
    return metrics


def _components_entry(metric: ComponentMetrics, fixed: Mapping[str, Any] | None,
                      taus: Mapping[str, float], tpr: float) -> dict[str, Any]:
    """The component metrics of one score with the threshold they were measured at."""
    if fixed is not None:
        threshold = {'rule': 'default', 'name': fixed['name'], 'value': fixed['value']}
    else:
        threshold = {'rule': 'open_miou', 'name': f'tpr{100 * tpr:g}, other town',
                     'per_town': {t: float(v) for t, v in taus.items()}}
    return _finite({**metric.compute(), 'threshold': threshold})


def component_threshold_words(threshold: Mapping[str, Any]) -> str:
    """'fpr1 = -6.453' or 'tpr95, other town (t5 0.51, t6 0.49)'."""
    if 'value' in threshold:
        return f'{threshold["name"]} = {threshold["value"]:.4g}'
    towns = ', '.join(f'{t} {v:.4g}' for t, v in threshold.get('per_town', {}).items())
    return f'{threshold["name"]} ({towns})'


def markdown_table(metrics: dict[str, Any]) -> str:
    """Table I columns: Method | Aux. data | Anomaly score | AP | FPR95 | AUROC | closed mIoU |
    open IoU (x100), per-image protocol, with the centre-prior reference row; then the pooled
    protocol's AP/FPR95/AUROC; per-class IoU; the share of pixels each threshold flags."""
    method = metrics['model']['method']
    name = METHOD_NAMES.get(method, method)
    aux = '✓' if method in AUX_DATA_METHODS else '×'
    closed = _pct(metrics['closed_miou'])
    reference = metrics.get('reference', {}).get(CENTRE_PRIOR)
    lines = []
    if reference is not None:
        lines += [
            f'Per-image protocol ({metrics["images"]} test images, FPR95 rule '
            f'{metrics["protocols"]["fpr95_rule"]}, anomaly pixel share '
            f'{100 * metrics["anomaly_pixel_share"]:.2f}%)', '',
            '| Method | Aux. data | Anomaly score | AP | FPR95 | AUROC | closed mIoU | open IoU |',
            '|---|---|---|---|---|---|---|---|']
        for s, m in metrics['scores'].items():
            p = m['per_image']
            lines.append(f'| {name} | {aux} | {s} | {_pct(p["ap"])} | {_pct(p["fpr95"])} | '
                         f'{_pct(p["auroc"])} | {closed} | {_pct(m.get("open_miou"))} |')
        p = reference['per_image']
        lines.append(f'| reference | | centre prior | {_pct(p["ap"])} | {_pct(p["fpr95"])} | '
                     f'{_pct(p["auroc"])} | | |')
        lines += ['', 'Pooled protocol (one curve over all pixels)', '',
                  '| Method | Anomaly score | AP | FPR95 | AUROC |', '|---|---|---|---|---|']
        rows = [(name, s, m['pooled']) for s, m in metrics['scores'].items()]
        rows.append(('reference', 'centre prior', reference['pooled']))
        for who, s, p in rows:
            lines.append(f'| {who} | {s} | {_pct(p["ap"])} | {_pct(p["fpr95"])} | '
                         f'{_pct(p["auroc"])} |')
        lines.append('')
        lines += _component_table(name, metrics)
    else:
        lines += [f'{metrics["images"]} test images without anomaly pixels: {metrics["note"]}',
                  '', f'closed mIoU: {closed}', '']
    if metrics.get('closed_iou'):
        lines += ['Closed-set IoU per class', '', '| class | IoU |', '|---|---|']
        lines += [f'| {c} | {_pct(v)} |' for c, v in metrics['closed_iou'].items()]
        lines.append('')
    for s, m in metrics['scores'].items():
        if m.get('thresholds'):
            lines += [f'Pixels flagged (score > threshold), {s}', '',
                      '| threshold | value | normal pixels flagged | anomaly pixels flagged |',
                      '|---|---|---|---|']
            lines += [f'| {t} | {v["value"]:.4g} | {_pct(v["inlier_flagged"])} | '
                      f'{_pct(v["anomaly_flagged"])} |' for t, v in m['thresholds'].items()]
            lines.append('')
    if metrics.get('class_metrics_note'):
        lines += [f'Note: {metrics["class_metrics_note"]}', '']
    return '\n'.join(lines)


def _component_table(name: str, metrics: dict[str, Any]) -> list[str]:
    rows = [(s, m['components']) for s, m in metrics['scores'].items() if 'components' in m]
    if not rows:
        return []
    lines = ['Component metrics (SegmentMeIfYouCan) of the mask score > threshold, no size '
             'filters', '',
             '| Method | Anomaly score | threshold | sIoU | PPV | mean F1 | components '
             '(labelled / predicted) |', '|---|---|---|---|---|---|---|']
    for s, c in rows:
        lines.append(f'| {name} | {s} | {component_threshold_words(c["threshold"])} | '
                     f'{_pct(c["siou"])} | {_pct(c["ppv"])} | {_pct(c["f1_mean"])} | '
                     f'{c["n_gt"]} / {c["n_pred"]} |')
    return [*lines, '']


def _pct(value: float | None) -> str:
    return '' if value is None or not np.isfinite(value) else f'{100 * value:.2f}'


def plot_curves(pooled: dict[str, PooledOOD], out: Path) -> list[Path]:
    """pr_curves.png and roc_curves.png of the pooled curves, one line per score."""
    curves = {}
    for name, acc in pooled.items():
        curves[name] = {**acc.curve_points(PLOT_POINTS),
                        **{k: v for k, v in acc.compute().items() if k in ('ap', 'auroc')}}
    return plot_curve_points(curves, out)


def plot_curve_points(curves: Mapping[str, Mapping[str, Any]], out: Path,
                      title: str = 'Pooled') -> list[Path]:
    """pr_curves.png and roc_curves.png: per score name, its 'tpr', 'fpr', 'precision' points
    (highest score first, as `PooledOOD.curve_points`) and its 'ap' and 'auroc'."""
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    figures = {'pr': plt.subplots(figsize=(5, 4)), 'roc': plt.subplots(figsize=(5, 4))}
    for name, curve in curves.items():
        tpr, fpr = np.asarray(curve['tpr']), np.asarray(curve['fpr'])
        figures['pr'][1].plot(tpr, np.asarray(curve['precision']),
                              label=f'{name} (AP {100 * curve["ap"]:.1f})')
        figures['roc'][1].plot(np.r_[0, fpr], np.r_[0, tpr],
                               label=f'{name} (AUROC {100 * curve["auroc"]:.1f})')
    paths = []
    for kind, (fig, ax) in figures.items():
        if kind == 'pr':
            ax.set(xlabel='recall', ylabel='precision', title=f'{title} precision-recall')
        else:
            ax.plot([0, 1], [0, 1], color='grey', lw=0.5, ls='--')
            ax.axhline(0.95, color='grey', lw=0.5, ls=':')  # FPR95 is read here
            ax.set(xlabel='false positive rate', ylabel='true positive rate',
                   title=f'{title} ROC')
        ax.set(xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc='best', fontsize=8)
        fig.tight_layout()
        path = out / f'{kind}_curves.png'
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def evaluate(checkpoint: str | None, data: str, scores: str | Sequence[str], out: str,
             artifact: str | None = None, device: str = 'auto', backend: str = 'auto',
             towns: Sequence[str] | None = None, limit: int | None = None,
             fpr_rule: str = DEFAULT_FPR_RULE, progress: bool = True,
             resize_mode: str = 'letterbox', labels: str | None = None) -> dict[str, Any]:
    """`anomaly-seg evaluate`: a checkpoint or an artifact on the test split of `data`."""
    if (checkpoint is None) == (artifact is None):
        raise ConfigError('pass exactly one of --checkpoint CKPT and --artifact NAME.json')
    names = parse_scores(scores)
    if artifact is not None:
        predict, facts = artifact_predictor(artifact, names, device, backend, resize_mode)
    else:
        predict, facts = checkpoint_predictor(checkpoint, names, device)
    return run_evaluation(predict, facts, data, names, out, towns, limit, fpr_rule=fpr_rule,
                          progress=progress, labels=labels)
