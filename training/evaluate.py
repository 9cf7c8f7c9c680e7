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
    ConfusionMatrix,
    OpenSetConfusion,
    PerImageOOD,
    PooledOOD,
)

# The paper applies T = 2 to these scores only (methods.md §5).
TEMPERED_SCORES = ('OP', 'OPxMS', 'JSD')
OUTLIER_HEAD_SCORES = ('DH', 'OP', 'OPxMS')
METHOD_NAMES = {
    'closed_set': 'Closed set (stage 1)', 'densehybrid': 'DenseHybrid', 'oodhead': 'OODHead',
    'nflowjs': 'NFlowJS', 'nf_hybrid_js': 'NF-Hybrid-JS', 'nf_hybrid_ldlx': 'NF-Hybrid-LdLx',
    'nf_hybrid_ld': 'NF-Hybrid-Ld', 'nf_oodhead': 'NF-OODHead',
}
# Methods trained with real auxiliary negatives (the paper's "Aux. data" column).
AUX_DATA_METHODS = ('densehybrid', 'oodhead')
TEST_TOWNS = ('t5', 't6')
IGNORE = 255
PLOT_POINTS = 4000
# Histogram bits of the tau calibration (2**18 bins: 2e-3 relative width, 4 MiB each).
CALIBRATION_BITS = 18


def score_temperature(name: str, temperature: float) -> float | None:
    """The temperature a score is computed with: `temperature` for OP, OPxMS, JSD, else None."""
    return float(temperature) if name in TEMPERED_SCORES else None


def usable_scores(names: Iterable[str], has_outlier_head: bool) -> list[str]:
    """The scores a network can compute (DH, OP, OPxMS need the outlier head)."""
    return [n for n in names if has_outlier_head or n not in OUTLIER_HEAD_SCORES]


def parse_scores(text: str | Sequence[str]) -> list[str]:
    """'DH,OP,OPxMS' -> ['DH', 'OP', 'OPxMS'], each checked against training.scores."""
    from training.scores import SCORES
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
                          f'{",".join(usable_scores(("DH", "OP", "OPxMS", "JSD", "MSP"), False))}')
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

    facts = {'source': 'checkpoint', 'path': str(path), 'method': cfg.method,
             'step': int(ckpt['step']), 'num_classes': cfg.model.num_classes,
             'mapping': cfg.data.mapping, 'temperature': temperature, 'device': str(dev),
             'code_version': ckpt.get('code_version')}
    return predict, facts


def artifact_predictor(path: str | os.PathLike, scores: Sequence[str], device: str = 'auto',
                       backend: str = 'auto') -> tuple[Predictor, dict[str, Any]]:
    """Predictor of an exported artifact through anomaly_seg_node.backends (its one score)."""
    import cv2

    from anomaly_seg_node import backends
    dev = _device(device)
    seg = backends.load(path, backend=backend, device=dev)
    name = seg.sidecar.score.name
    if list(scores) != [name]:
        raise ConfigError(f'artifact {path} computes the score {name!r} only; pass --scores '
                          f'{name} (export one artifact per score with anomaly-seg export '
                          '--all-scores)')
    h, w = seg.input_size

    def predict(image: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        size = image.shape[1], image.shape[0]
        frame = image if image.shape[:2] == (h, w) else cv2.resize(
            image, (w, h), interpolation=cv2.INTER_LINEAR)
        result = seg(frame)
        labels, score = result.labels[0], result.anomaly_score[0]
        if labels.shape != image.shape[:2]:
            labels = cv2.resize(labels.astype(np.int32), size, interpolation=cv2.INTER_NEAREST)
            score = cv2.resize(score.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
        return labels.astype(np.int64), {name: score.astype(np.float32)}

    method = seg.sidecar.method
    facts = {'source': 'artifact', 'path': str(path), 'method': method,
             'num_classes': len(seg.sidecar.classes), 'backend': seg.backend,
             'backend_reason': seg.reason, 'device': seg.device, 'input_size': [h, w],
             'mapping': 'densehybrid12' if len(seg.sidecar.classes) == 12 else 'creators13',
             'temperature': seg.sidecar.score.temperature}
    return predict, facts


def _device(device: str) -> str:
    if device != 'auto':
        return device
    import torch
    return 'cuda' if torch.cuda.is_available() else 'cpu'


# ---- evaluation -------------------------------------------------------------------------------


def _test_towns(data: Path, towns: Sequence[str] | None, mapping: str, limit: int | None
                ) -> dict[str, Any]:
    from training.data.streethazards import SPLITS, StreetHazards
    image_dir = data / SPLITS['test'][0] / 'images' / SPLITS['test'][1]
    if towns is None:
        towns = [t for t in TEST_TOWNS if (image_dir / t).is_dir()]
        if not towns:
            raise DataError(f'no test town folder ({", ".join(TEST_TOWNS)}) in {image_dir}; pass '
                            'the StreetHazards root that holds test/images/test/t5 and t6')
    sets = {t: StreetHazards(data, 'test', mapping, towns=[t]) for t in towns}
    if limit is not None:
        if limit < 1:
            raise ConfigError(f'--limit must be positive, found {limit}')
        return {t: (ds, min(limit, len(ds))) for t, ds in sets.items()}
    return {t: (ds, len(ds)) for t, ds in sets.items()}


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


def run_evaluation(predict: Predictor, facts: dict[str, Any], data: str | os.PathLike,
                   scores: Sequence[str], out: str | os.PathLike,
                   towns: Sequence[str] | None = None, limit: int | None = None,
                   tpr: float = 0.95, fpr_rule: str = DEFAULT_FPR_RULE,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate `predict` on the test split; write metrics.json, table.md and curve PNGs."""
    from tqdm import tqdm
    start = time.time()
    data, out = Path(data), Path(out)
    k = int(facts['num_classes'])
    sets = _test_towns(data, towns, facts['mapping'], limit)
    n_total = sum(n for _, n in sets.values())
    per_image = {s: PerImageOOD(fpr_rule) for s in scores}
    pooled = {s: PooledOOD(fpr_rule) for s in scores}
    # calib[A]: half-resolution pixels of the towns that calibrate town A's tau (the other
    # towns; the town itself when it is the only one).
    calib = {t: {s: PooledOOD(fpr_rule, CALIBRATION_BITS) for s in scores} for t in sets}
    closed = ConfusionMatrix(k, IGNORE)
    anomaly_pixels = evaluated_pixels = 0
    bar = tqdm(total=2 * n_total, desc='evaluate', unit='img', disable=not progress)
    for town, (ds, n) in sets.items():
        for i in range(n):
            image, label, ood = _item(ds, i)
            pred, maps = predict(image)
            closed.update(pred, label)
            anomaly_pixels += int(np.count_nonzero(ood == 1))
            evaluated_pixels += int(np.count_nonzero(ood <= 1))
            targets = [t for t in sets if t != town] or [town]
            for s in scores:
                per_image[s].update(maps[s], ood)
                pooled[s].update(maps[s], ood)
                half = _half(maps[s], ood)
                for t in targets:
                    calib[t][s].update(*half)
            bar.update(1)
    if anomaly_pixels == 0:
        raise DataError(f'the test images of {data} hold no anomaly pixel (raw id 14); AP and '
                        'FPR95 need anomalies: pass a StreetHazards test split')
    taus = {t: {s: calib[t][s].threshold_at_tpr(tpr, strict=True) for s in scores}
            for t in sets}
    open_sets = {t: {s: OpenSetConfusion(k, taus[t][s], IGNORE) for s in scores} for t in sets}
    for town, (ds, n) in sets.items():
        for i in range(n):
            image, label, ood = _item(ds, i)
            pred, maps = predict(image)
            target = label.astype(np.int64)
            target[ood == 1] = k
            for s in scores:
                open_sets[town][s].update(pred, maps[s], target)
            bar.update(1)
    bar.close()

    closed_metrics = closed.compute()
    result_scores = {}
    for s in scores:
        per_town = {t: open_sets[t][s].compute() for t in sets}
        weights = {t: sets[t][1] for t in sets}
        open_miou = sum(per_town[t]['open_miou'] * weights[t] for t in sets) / sum(
            weights.values())
        result_scores[s] = {
            'per_image': per_image[s].compute(), 'pooled': pooled[s].compute(),
            'open_miou': float(open_miou),
            'open_per_town': {t: {'open_miou': m['open_miou'], 'anomaly_iou': m['anomaly_iou'],
                                  'tau': m['tau'], 'images': weights[t]}
                              for t, m in per_town.items()},
            'temperature': (score_temperature(s, facts['temperature'])
                            if facts['source'] == 'checkpoint' else facts['temperature'])}
    from anomaly_seg_node.labels import class_names
    metrics = {
        'model': facts, 'data': str(data), 'towns': {t: n for t, (_, n) in sets.items()},
        'images': n_total, 'scores': result_scores,
        'closed_miou': closed_metrics['miou'],
        'closed_iou': dict(zip(class_names(facts['mapping']), closed_metrics['iou'],
                               strict=True)),
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
            'ignored': 'StreetHazards "other" (raw id 4) and void pixels'},
        'seconds': round(time.time() - start, 2),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / 'metrics.json').write_text(json.dumps(metrics, indent=2) + '\n')
    (out / 'table.md').write_text(markdown_table(metrics))
    plot_curves({s: pooled[s] for s in scores}, out)
    return metrics


def markdown_table(metrics: dict[str, Any]) -> str:
    """Table I columns: Method | Aux. data | Anomaly score | AP | FPR95 | AUROC | closed mIoU |
    open IoU (x100), per-image protocol; then the pooled protocol's AP/FPR95/AUROC.
    """
    method = metrics['model']['method']
    name = METHOD_NAMES.get(method, method)
    aux = '✓' if method in AUX_DATA_METHODS else '×'
    closed = 100 * metrics['closed_miou']
    lines = [
        f'Per-image protocol ({metrics["images"]} test images, FPR95 rule '
        f'{metrics["protocols"]["fpr95_rule"]}, anomaly pixel share '
        f'{100 * metrics["anomaly_pixel_share"]:.2f}%)', '',
        '| Method | Aux. data | Anomaly score | AP | FPR95 | AUROC | closed mIoU | open IoU |',
        '|---|---|---|---|---|---|---|---|',
    ]
    for s, m in metrics['scores'].items():
        p = m['per_image']
        lines.append(f'| {name} | {aux} | {s} | {100 * p["ap"]:.2f} | {100 * p["fpr95"]:.2f} | '
                     f'{100 * p["auroc"]:.2f} | {closed:.2f} | {100 * m["open_miou"]:.2f} |')
    lines += ['', 'Pooled protocol (one curve over all pixels)', '',
              '| Method | Anomaly score | AP | FPR95 | AUROC |', '|---|---|---|---|---|']
    for s, m in metrics['scores'].items():
        p = m['pooled']
        lines.append(f'| {name} | {s} | {100 * p["ap"]:.2f} | {100 * p["fpr95"]:.2f} | '
                     f'{100 * p["auroc"]:.2f} |')
    return '\n'.join(lines) + '\n'


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
             fpr_rule: str = DEFAULT_FPR_RULE, progress: bool = True) -> dict[str, Any]:
    """`anomaly-seg evaluate`: a checkpoint or an artifact on the test split of `data`."""
    if (checkpoint is None) == (artifact is None):
        raise ConfigError('pass exactly one of --checkpoint CKPT and --artifact NAME.json')
    names = parse_scores(scores)
    if artifact is not None:
        predict, facts = artifact_predictor(artifact, names, device, backend)
    else:
        predict, facts = checkpoint_predictor(checkpoint, names, device)
    return run_evaluation(predict, facts, data, names, out, towns, limit, fpr_rule=fpr_rule,
                          progress=progress)
