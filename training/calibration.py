"""Named anomaly thresholds of an artifact, calibrated at the artifact's input size.

- `tpr95`: the threshold at 95% TPR of the anomaly pixels, either of validation images with
  pasted ADE20k negatives (the training recipe's validation, methods.md §2.3) or of a labelled
  set (CamVid val frames with anomalies pasted by `synth paste`; or a StreetHazards-layout
  folder whose test split marks anomalies, raw id 14).
- `fpr1`, `fpr0.1`: at most 1% and 0.1% of the inlier validation pixels above the threshold.
  `fpr1` is the default threshold of a calibrated artifact: on a vehicle a mask that covers
  the road with false alarms is worse than a missed faint anomaly.
- Without data (an untrained model, speed measurements): `synthetic_q95`, `synthetic_q99`,
  `synthetic_q99.9`, score quantiles of synthetic road images. They say nothing about anomalies
  and are named so that nobody mistakes them for calibrated thresholds.

The runtime flags `score > threshold`. Images are fitted to the artifact's size first as the
node fits camera frames (`anomaly_seg_node.imaging`, letterbox; labels nearest, bars ignored),
because the graph only runs there.
Every score is computed from one forward pass of the segmenter per image; `score_maps` may
also be a graph in ONNX Runtime (training.quantize.OnnxScoreMaps), which is how an int8
artifact gets thresholds of its own scores on the same pixels. On request the scored frames
are kept (`frames`): the int8 export calibrates its activations on them.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from anomaly_seg_node import imaging
from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import IGNORE_ID
from anomaly_seg_node.metrics import PooledOOD
from training.export import SEGMENTATION, segmenter_scores

TPR = 0.95
FPR_THRESHOLDS = {'fpr1': 0.01, 'fpr0.1': 0.001}
SYNTHETIC_QUANTILES = {'synthetic_q95': 0.05, 'synthetic_q99': 0.01, 'synthetic_q99.9': 0.001}
SYNTHETIC_DEFAULT = 'synthetic_q99'
DEFAULT_THRESHOLD = 'fpr1'
# 2**18 bins: thresholds within 0.2% (relative) of the exact ones, 4 MiB per accumulator.
POOL_BITS = 18
# Labels of the pooled accumulators.
_INLIER, _ANOMALY, _IGNORED = 0, 1, 2


@dataclass
class Calibration:
    """Thresholds per score ({score: {name: value}}), the default name and what was used."""

    thresholds: dict[str, dict[str, float]]
    default_threshold: str | None
    info: dict[str, Any] = field(default_factory=dict)
    # A few calibration images at the artifact size, uint8 [M, H, W, 3], for the parity check.
    parity_images: np.ndarray | None = None
    # The frames kept for int8 calibration (`calibrate_on_data(frames=...)`), uint8
    # [M, H, W, 3] at the artifact size, as the graph saw them; None when none were asked for.
    frames: np.ndarray | None = None


class ScoreMaps:
    """segmenter + scores: uint8 RGB `[H, W, 3]` -> {score: float32 [H, W]}, one forward pass.

    The scores are computed as the deploy graph computes them (`segmenter_scores` at
    `resolution`), so the thresholds fit the exported artifact.
    """

    def __init__(self, segmenter: nn.Module, scores: Sequence[str],
                 temperatures: Mapping[str, float | None], resolution: str = 'input') -> None:
        self.segmenter = segmenter.eval()
        self.scores = [s for s in scores if s != SEGMENTATION]
        self.temperatures = dict(temperatures)
        self.resolution = resolution

    def __call__(self, image: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].float()
        with torch.inference_mode():
            _, maps = segmenter_scores(self.segmenter, x, self.scores, self.temperatures,
                                       self.resolution)
        return {s: score[0].numpy() for s, score in maps.items()}


def calibrate_synthetic(score_maps: ScoreMaps, size: tuple[int, int], count: int = 4,
                        seed: int = 1) -> Calibration:
    """Score quantiles of `count` synthetic road images: the fallback without data."""
    from anomaly_seg_node.check_images import road_like_images

    images = road_like_images(count, *size, seed=seed)
    pools = {s: PooledOOD(bits=POOL_BITS) for s in score_maps.scores}
    for image in images:
        for name, score in score_maps(image).items():
            pools[name].update(score, np.zeros(score.shape, np.uint8))
    thresholds = {s: {name: pool.threshold_at_fpr(rate)
                      for name, rate in SYNTHETIC_QUANTILES.items()}
                  for s, pool in pools.items()}
    info = {
        'source': 'synthetic road images (no calibration data)',
        'warning': 'not calibrated on data: synthetic_qXX = the XX-th percentile of the score '
                   'over synthetic road images, not a false-alarm or detection rate on real '
                   'images; re-export with data for tpr95, fpr1 and fpr0.1',
        'images': int(count),
        'pixels': int(count * size[0] * size[1]),
        'definitions': {name: f'at most {rate:g} of the synthetic pixels score above it'
                        for name, rate in SYNTHETIC_QUANTILES.items()},
    }
    return Calibration(thresholds, SYNTHETIC_DEFAULT if thresholds else None, info)


def calibrate_on_data(score_maps: ScoreMaps, size: tuple[int, int], *,
                      val_root: str | Path | None, mapping: str, dataset: str = 'streethazards',
                      ade_root: str | Path | None = None, ade_crop: int = 384,
                      labelled_root: str | Path | None = None, max_images: int = 50,
                      parity_images: int = 2, seed: int = 0,
                      pad_rgb: Sequence[int] = (0, 0, 0), pad_mode: str = imaging.DEFAULT_PAD_MODE,
                      progress: bool = True,
                      frames: int = 0) -> Calibration:
    """tpr95 on labelled anomalies (pasted negatives on val, or a labelled set), fpr1/fpr0.1
    on normal pixels; the default threshold is fpr1.

    `labelled_root`: a CamVid-layout folder from `synth paste` (its val split, else its test
    split, gives both: tpr95 on the pasted anomalies, fpr on the normal pixels) or a
    StreetHazards-layout folder (its test split's anomalies give tpr95, its validation split,
    else the test split's inliers, fpr). Without it, `val_root`'s validation split (of
    `dataset`) gives both, with negatives from `ade_root` pasted for tpr95. Images are fitted
    to the artifact size as the node fits camera frames (letterbox bars filled by `pad_mode`:
    mirrored, or `pad_rgb`).
    `frames`: keep that many of the frames scored for tpr95 (the labelled frames, or the
    validation frames with a negative pasted), evenly spread over them, in `Calibration.frames`.
    """
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ConfigError(f'the number of calibration images must be a positive integer, '
                          f'got {max_images!r}')
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 0:
        raise ConfigError(f'the number of frames to keep must be an integer >= 0, got '
                          f'{frames!r}')
    tpr_pools = {s: PooledOOD(bits=POOL_BITS) for s in score_maps.scores}
    fpr_pools = {s: PooledOOD(bits=POOL_BITS) for s in score_maps.scores}
    info: dict[str, Any] = {'size': list(size), 'max_images': max_images,
                            'resize_mode': 'letterbox', 'pad_mode': pad_mode}
    kept: list[np.ndarray] = []
    kept_frames: list[np.ndarray] = []
    fit = _Fitter(size, tuple(pad_rgb), imaging.check_pad_mode(pad_mode))

    if labelled_root is not None:
        test, fpr_split, what = _labelled_sets(labelled_root, mapping)
        info['data'] = what
        info['tpr95'] = f'anomaly pixels of {what}'
        spread = _spread(min(len(test), max_images), frames)
        for index, (image, ood) in enumerate(
                _items(test, fit, 'ood', max_images, progress, 'tpr95')):
            if index in spread:
                kept_frames.append(image)
            maps = score_maps(image)
            for s, score in maps.items():
                tpr_pools[s].update(score, ood)
                if fpr_split is None:
                    fpr_pools[s].update(score, ood)  # the inliers (0) of the labelled split
            _keep(kept, image, parity_images)
        if fpr_split is None:
            info['fpr'] = f'normal pixels of {what}'
        else:
            info['fpr'] = f'inlier pixels of the validation split of {labelled_root}'
            _add_inliers(score_maps, fpr_split, fit, max_images, progress, fpr_pools)
        info['images'] = {'tpr95': min(len(test), max_images),
                          'fpr': min(len(fpr_split or test), max_images)}
    else:
        if val_root is None:
            raise ConfigError('calibration needs data: pass --calibration-data DIR or a config '
                              'whose data.root holds the training data set')
        val = _dataset(val_root, 'val', dataset, mapping, 'data.root of the config')
        negatives = _ade_negatives(ade_root, ade_crop, size, seed)
        info['data'] = (f'the validation split of {val_root} with {len(negatives)} negatives of '
                        f'{ade_root} pasted')
        info['tpr95'] = (f'{len(negatives)} ADE20k-layout negatives of {ade_root} '
                         f'({negatives.crop}x{negatives.crop} crops, official mask rule) pasted '
                         f'into the validation split of {val_root}')
        info['fpr'] = f'inlier pixels of the validation split of {val_root}'
        rng = torch.Generator().manual_seed(seed)
        spread = _spread(min(len(val), max_images), frames)
        for index, (image, labels) in enumerate(
                _items(val, fit, 'label', max_images, progress, 'calibration')):
            inlier = np.where(labels != IGNORE_ID, _INLIER, _IGNORED).astype(np.uint8)
            for s, score in score_maps(image).items():
                fpr_pools[s].update(score, inlier)
            pasted_image, ood = _paste(image, labels, negatives, index, rng)
            if index in spread:
                kept_frames.append(pasted_image)
            for s, score in score_maps(pasted_image).items():
                tpr_pools[s].update(score, ood)
            _keep(kept, image, parity_images)
        info['images'] = {'tpr95': min(len(val), max_images), 'fpr': min(len(val), max_images)}

    thresholds: dict[str, dict[str, float]] = {}
    for s in score_maps.scores:
        thresholds[s] = {'tpr95': tpr_pools[s].threshold_at_tpr(TPR)}
        for name, rate in FPR_THRESHOLDS.items():
            thresholds[s][name] = fpr_pools[s].threshold_at_fpr(rate)
    info['pixels'] = {'anomaly': _count(tpr_pools, 1), 'inlier_fpr': _count(fpr_pools, 0)}
    info['definitions'] = {
        'tpr95': 'the lowest pooled bin edge at which >= 95% of the anomaly pixels score at or '
                 'above it',
        'fpr1': 'at most 1% of the inlier pixels score above it',
        'fpr0.1': 'at most 0.1% of the inlier pixels score above it',
    }
    info['default'] = (f'{DEFAULT_THRESHOLD}: a vehicle needs few false alarms; tpr95 flags '
                       'whatever it takes to catch 95% of the calibration anomalies')
    info['source'] = 'labelled split' if labelled_root is not None else 'pasted negatives'
    parity = np.stack(kept) if kept else None
    return Calibration(thresholds, DEFAULT_THRESHOLD if thresholds else None, info, parity,
                       np.stack(kept_frames) if kept_frames else None)


def _spread(count: int, wanted: int) -> set[int]:
    """`wanted` indices of `count`, evenly spread (all of them when count <= wanted)."""
    if wanted <= 0 or count <= 0:
        return set()
    return {int(i) for i in np.linspace(0, count - 1, min(count, wanted)).round()}


class _Fitter:
    """Images and label maps fitted to the artifact size by the node's rule (letterbox)."""

    def __init__(self, size: tuple[int, int], pad_rgb: tuple[int, ...], pad_mode: str) -> None:
        self.size = size
        self.pad_rgb = (int(pad_rgb[0]), int(pad_rgb[1]), int(pad_rgb[2]))
        self.pad_mode = pad_mode

    def __call__(self, image: np.ndarray, labels: np.ndarray, fill: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        fit = imaging.plan_fit(image.shape[:2], self.size, 'letterbox')
        return (imaging.fit_image(image, fit, self.pad_rgb, self.pad_mode),
                imaging.fit_labels(labels, fit, fill))


def _labelled_sets(root: str | Path, mapping: str) -> tuple[Any, Any, str]:
    """(set with anomalies, set of normal pixels or None, description) of --calibration-data."""
    from training.data.registry import detect_layout

    if detect_layout(root) == 'camvid' or (Path(root) / 'val').is_dir():
        split = 'val' if (Path(root) / 'val').is_dir() else 'test'
        data = _dataset(root, split, 'camvid', mapping, '--calibration-data')
        return data, None, f'the {split} split of {root}' + _paste_note(Path(root))
    test = _dataset(root, 'test', 'streethazards', mapping, '--calibration-data')
    return test, _optional_dataset(root, 'val', mapping), f'the test split of {root}'


def _paste_note(root: Path) -> str:
    """' (CamVid val, 101 frames, anomalies pasted by synth paste seed 0)' from paste.json."""
    try:
        manifest = json.loads((root / 'paste.json').read_text())
        return (f' (CamVid {manifest["split"]} frames of {manifest["source"]}: '
                f'{manifest["frames"]} frames, {manifest["objects"]} anomalies pasted by '
                f'anomaly-seg synth paste --seed {manifest["seed"]})')
    except (OSError, ValueError, KeyError, TypeError):
        return ''


def _count(pools: Mapping[str, PooledOOD], column: int) -> int:
    for pool in pools.values():  # every pool saw the same pixels
        return pool.pixel_counts[column]
    return 0


def _keep(kept: list[np.ndarray], image: np.ndarray, limit: int) -> None:
    if len(kept) < limit:
        kept.append(image)


def _dataset(root: str | Path, split: str, dataset: str, mapping: str, what: str) -> Any:
    from training.data.registry import open_split

    try:
        return open_split(dataset, root, split, mapping)
    except DataError as error:
        raise DataError(f'calibration data ({what}): {error}. Or pass --calibration-data DIR '
                        '(a CamVid folder from anomaly-seg synth paste, or a StreetHazards-'
                        'layout folder), or --synthetic-thresholds to skip calibration') from None


def _optional_dataset(root: str | Path, split: str, mapping: str) -> Any:
    from training.data.streethazards import SPLITS, StreetHazards

    top, sub, _ = SPLITS[split]
    if not (Path(root) / top / 'images' / sub).is_dir():
        return None
    return StreetHazards(root, split, mapping=mapping)


def _items(dataset: Any, fit: _Fitter, key: str, max_images: int, progress: bool,
           desc: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image uint8 [H, W, 3], dataset[key] uint8 [H, W]) fitted to the artifact size; padding
    is ignored (IGNORE_ID in labels, 2 in 'ood' masks)."""
    from tqdm import tqdm

    count = min(len(dataset), max_images)
    for index in tqdm(range(count), desc=desc, disable=not progress, leave=False):
        item = dataset[index]
        target = item[key].numpy()
        if key == 'label':  # train ids 0..K-1 and IGNORE_ID fit uint8
            target = target.astype(np.uint8)
        yield fit(item['image'].numpy().transpose(1, 2, 0), target,
                  IGNORE_ID if key == 'label' else _IGNORED)


def _add_inliers(score_maps: ScoreMaps, dataset: Any, fit: _Fitter, max_images: int,
                 progress: bool, pools: Mapping[str, PooledOOD]) -> None:
    for image, labels in _items(dataset, fit, 'label', max_images, progress, 'fpr'):
        inlier = np.where(labels != IGNORE_ID, _INLIER, _IGNORED).astype(np.uint8)
        for s, score in score_maps(image).items():
            pools[s].update(score, inlier)


def _ade_negatives(root: str | Path | None, crop: int, size: tuple[int, int],
                   seed: int) -> Any:
    from training.data.ade20k import MIN_RECT_SIDE, ADE20kNegatives

    if root is None or not Path(root).is_dir():
        raise DataError(
            f'tpr95 needs negatives to paste into the validation images, but the ADE20k root '
            f'{root} (negatives.ade_root of the config) does not exist; pass --calibration-data '
            'DIR (a StreetHazards-layout folder with a labelled test split), set '
            'negatives.ade_root, or make synthetic ones with anomaly-seg synth negatives')
    # The official recipe pastes 384-pixel crops into 768-pixel crops: at most half the side.
    side = min(int(crop), (min(size) // 2) // 8 * 8)
    if side <= MIN_RECT_SIDE:
        raise ConfigError(f'the artifact size {size[0]}x{size[1]} is too small to paste '
                          f'negatives (a crop of at most half the shorter side, {side} pixels, '
                          f'must exceed {MIN_RECT_SIDE}); use a larger --size')
    return ADE20kNegatives(root, crop=side, seed=seed)


def _paste(image: np.ndarray, labels: np.ndarray, negatives: Any, index: int,
           rng: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One ADE20k negative pasted into `image`; returns (image, ood labels 0/1/2)."""
    from training.negatives import paste_ade_negatives

    neg_image, neg_mask = negatives[index % len(negatives)]
    pasted = paste_ade_negatives(
        torch.from_numpy(image.transpose(2, 0, 1))[None].float(),
        torch.from_numpy(labels.astype(np.int64))[None], neg_image[None], neg_mask[None], rng)
    mixed = pasted.image[0].round().clamp(0, 255).to(torch.uint8).numpy().transpose(1, 2, 0)
    ood = np.where(pasted.ood_mask[0].numpy(), _ANOMALY,
                   np.where(pasted.labels[0].numpy() != IGNORE_ID, _INLIER, _IGNORED))
    return np.ascontiguousarray(mixed), ood.astype(np.uint8)
