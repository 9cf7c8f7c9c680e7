"""Anomaly-detection and segmentation metrics, NumPy only (methods.md §2.5 and §6).

Anomaly scores: higher = more anomalous. Anomaly labels: 1 = anomaly (the positive class),
0 = inlier, any other value (e.g. 2 for StreetHazards "other", 255 for void) is ignored.

- `ood_metrics`: exact AP, AUROC and FPR95 of one set of pixels; equal to scikit-learn's
  `average_precision_score`, `roc_auc_score` and the FPR of `roc_curve(drop_intermediate=False)`.
- `PerImageOOD`: the per-image protocol (mean over images; images without anomaly pixels, or with
  only anomaly pixels, are skipped and counted).
- `PooledOOD`: one curve over the whole data set, streamed through a fixed histogram (bounded
  memory), with per-run error bounds.
- `threshold_at_tpr`: the open-set threshold tau at a target TPR; `threshold_at_fpr`: the
  threshold at a target false-alarm rate on inlier pixels (both also on `PooledOOD`).
- `ConfusionMatrix` (closed mIoU) and `OpenSetConfusion` (open-mIoU, methods.md §2.5).
- `agreement_figures`: how closely a compiled graph's (labels, score) follow a reference's
  (export parity, engine verification).

Every result dict holds only floats, ints, strings and lists, so it serialises to JSON.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from anomaly_seg_node.errors import ConfigError, DataError

# 'tpr>=0.95': first ROC point with TPR >= 0.95 (Fishyscapes, SMIYC; this project's default).
# 'tpr>0.95': first ROC point with TPR strictly above 0.95 (DenseHybrid's evaluation code).
FPR_RULES = ('tpr>=0.95', 'tpr>0.95')
DEFAULT_FPR_RULE = 'tpr>=0.95'
FPR_TPR = 0.95

_SIGN = np.uint32(0x80000000)


def _rule_is_strict(fpr_rule: str) -> bool:
    if fpr_rule not in FPR_RULES:
        raise ConfigError(f'unknown FPR95 rule {fpr_rule!r}; expected one of {FPR_RULES} '
                          "('tpr>0.95' is DenseHybrid's rule)")
    return fpr_rule == 'tpr>0.95'


def _check_tpr(tpr: float, strict: bool) -> None:
    if not 0.0 < tpr <= 1.0 or (strict and tpr >= 1.0):
        raise ConfigError(f'target TPR must lie in (0, 1] (in (0, 1) with strict=True), got {tpr}')


def _kept_pixels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flattened scores and anomaly flags of the pixels labelled 0 or 1, scores finite."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise DataError(f'anomaly scores and labels must have the same shape, got {scores.shape} '
                        f'and {labels.shape}; resize the score map to the label map '
                        '(bilinear) before evaluating')
    if scores.dtype.kind not in 'fiu':
        raise DataError(f'anomaly scores must be a real-valued array, got dtype {scores.dtype}')
    if labels.dtype.kind not in 'iub':
        raise DataError(f'anomaly labels must be integers (1 anomaly, 0 inlier, other values '
                        f'ignored), got dtype {labels.dtype}; cast them with .astype(np.uint8)')
    flat_scores = scores.reshape(-1)
    flat_labels = labels.reshape(-1)
    is_anomaly = flat_labels == 1
    keep = is_anomaly | (flat_labels == 0)
    kept = flat_scores[keep]
    if kept.dtype.kind == 'f':
        finite = np.isfinite(kept)
        if not finite.all():
            bad = int(kept.size - np.count_nonzero(finite))
            first = int(np.flatnonzero(keep)[np.argmin(finite)])
            raise DataError(
                f'{bad} of {kept.size} evaluated anomaly scores are NaN or inf (first at flat '
                f'index {first}: {flat_scores[first]}); expected finite scores: fix the score '
                'computation (e.g. use log_softmax for log-probabilities) or label those '
                'pixels with an ignored value')
    return kept, is_anomaly[keep]


def _tie_groups(scores: np.ndarray, is_anomaly: np.ndarray) -> tuple[np.ndarray, ...]:
    """Cumulative (tps, fps) and the score at each distinct score, highest score first."""
    order = np.argsort(scores, kind='stable')[::-1]
    sorted_scores = scores[order]
    # index of the last (lowest-ranked) element of every run of equal scores
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    tps = np.cumsum(is_anomaly[order], dtype=np.int64)[ends]
    fps = ends.astype(np.int64) + 1 - tps
    return tps, fps, sorted_scores[ends]


def _require_both_classes(n_anomaly: int, n_inlier: int, what: str) -> None:
    if n_anomaly == 0 or n_inlier == 0:
        raise DataError(f'{what} needs both anomaly (label 1) and inlier (label 0) pixels, found '
                        f'{n_anomaly} anomaly and {n_inlier} inlier pixels; AP, AUROC and FPR95 '
                        'are undefined without both (the per-image protocol skips such images)')


def _first_point(tps: np.ndarray, tpr: float, strict: bool) -> int:
    """Index of the first ROC point with TPR >= tpr (> tpr when strict)."""
    curve_tpr = tps / tps[-1]
    return int(np.searchsorted(curve_tpr, tpr, side='right' if strict else 'left'))


def _curve_metrics(tps: np.ndarray, fps: np.ndarray, strict: bool) -> dict[str, float]:
    """AP (step-wise, as sklearn), AUROC (trapezoidal) and FPR95 from cumulative counts.

    tps, fps: int64 [G], cumulative anomaly and inlier counts at G thresholds, highest first.
    """
    n_anomaly = float(tps[-1])
    n_inlier = float(fps[-1])
    pos = np.diff(tps, prepend=0).astype(np.float64)
    neg = np.diff(fps, prepend=0).astype(np.float64)
    tps_f = tps.astype(np.float64)
    precision = tps_f / (tps_f + fps)
    ap = np.sum(pos * precision) / n_anomaly
    # trapezoid between consecutive ROC points: width neg / N, mean height (tps + tps_prev) / 2P
    auroc = np.sum(neg * (2.0 * tps_f - pos)) / (2.0 * n_anomaly * n_inlier)
    fpr95 = fps[_first_point(tps, FPR_TPR, strict)] / n_inlier
    return {'ap': float(ap), 'auroc': float(auroc), 'fpr95': float(fpr95)}


def ood_metrics(scores: Any, labels: Any, fpr_rule: str = DEFAULT_FPR_RULE) -> dict[str, Any]:
    """Exact AP, AUROC and FPR95 of anomaly `scores` against `labels` (same shape).

    Equal (to float rounding) to sklearn `average_precision_score`, `roc_auc_score` and the FPR
    at the first point of `roc_curve(..., drop_intermediate=False)` that meets `fpr_rule`, ties
    included. Raises DataError for NaN/inf scores at evaluated pixels and when the pixels lack
    anomalies or inliers. Memory and time O(n log n): for a whole data set use `PooledOOD`.
    """
    strict = _rule_is_strict(fpr_rule)
    kept, is_anomaly = _kept_pixels(scores, labels)
    n_anomaly = int(np.count_nonzero(is_anomaly))
    _require_both_classes(n_anomaly, kept.size - n_anomaly, 'ood_metrics')
    tps, fps, _ = _tie_groups(kept.astype(np.float64), is_anomaly)
    return {**_curve_metrics(tps, fps, strict), 'fpr95_rule': fpr_rule,
            'n_anomaly': n_anomaly, 'n_inlier': int(kept.size - n_anomaly)}


def threshold_at_tpr(scores: Any, labels: Any, tpr: float = FPR_TPR,
                     strict: bool = False) -> float:
    """The score threshold tau of the first ROC point with TPR >= `tpr` (> `tpr` if `strict`).

    tau is a score value: `score >= tau` flags the calibration anomalies at that TPR. The open-set
    rule of methods.md §2.5 (and `OpenSetConfusion`) flags `score > tau`, as DenseHybrid does
    with sklearn's thresholds; the two differ only on pixels tied at exactly tau. DenseHybrid
    calibrates with `strict=True` on the other test town at half resolution.
    """
    _check_tpr(tpr, strict)
    kept, is_anomaly = _kept_pixels(scores, labels)
    n_anomaly = int(np.count_nonzero(is_anomaly))
    _require_both_classes(n_anomaly, kept.size - n_anomaly, 'threshold_at_tpr')
    tps, _, thresholds = _tie_groups(kept.astype(np.float64), is_anomaly)
    return float(thresholds[_first_point(tps, tpr, strict)])


def _check_fpr(fpr: float) -> None:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float, np.floating)) \
            or not 0.0 < fpr < 1.0:
        raise ConfigError(f'target false-alarm rate must lie in (0, 1), e.g. 0.01 for 1%, '
                          f'got {fpr!r}')


def _allowed_false_alarms(fpr: float, n_inlier: int) -> int:
    """m = floor(fpr * n), robust to float rounding (0.29 * 100 is 28.999999999999996)."""
    return int(np.floor(round(fpr * n_inlier, 9)))


def threshold_at_fpr(scores: Any, fpr: float) -> float:
    """The lowest threshold tau that flags at most `fpr` of the inlier `scores` (score > tau).

    `scores` (any shape) are the scores of inlier pixels only, e.g. the known-class pixels of a
    validation set. tau is the (m+1)-th largest score, m = floor(fpr * n): at most m scores lie
    strictly above it, and any lower threshold would flag more than m (ties at tau stay
    unflagged, so the achieved rate can be lower than `fpr`). The runtime flags `score > tau`,
    as `OpenSetConfusion` does. O(n) with np.partition; for a whole data set use
    `PooledOOD.threshold_at_fpr`.
    """
    _check_fpr(fpr)
    values = np.asarray(scores)
    if values.dtype.kind not in 'fiu':
        raise DataError(f'inlier scores must be a real-valued array, got dtype {values.dtype}')
    flat = values.reshape(-1).astype(np.float64)
    if flat.size == 0:
        raise DataError('threshold_at_fpr needs inlier scores, got an empty array; pass the '
                        'scores of the validation pixels of known classes')
    finite = np.isfinite(flat)
    if not finite.all():
        first = int(np.argmin(finite))
        raise DataError(f'{int(flat.size - np.count_nonzero(finite))} of {flat.size} inlier '
                        f'scores are NaN or inf (first at flat index {first}: {flat[first]}); '
                        'expected finite scores')
    kth = flat.size - 1 - _allowed_false_alarms(fpr, flat.size)  # ascending position of tau
    return float(np.partition(flat, kth)[kth])


class PerImageOOD:
    """Per-image protocol: AP, AUROC and FPR95 per image, averaged over images.

    Images without anomaly pixels (or without any evaluated pixel) and images with only anomaly
    pixels are skipped and counted, as the StreetHazards creators do (methods.md §6).
    """

    protocol = 'per-image'

    def __init__(self, fpr_rule: str = DEFAULT_FPR_RULE) -> None:
        _rule_is_strict(fpr_rule)
        self.fpr_rule = fpr_rule
        self.n_no_anomaly = 0
        self.n_only_anomaly = 0
        self._per_image: list[tuple[float, float, float]] = []

    def update(self, scores: Any, labels: Any) -> dict[str, Any] | None:
        """Add one image; returns its metrics, or None when it is skipped."""
        kept, is_anomaly = _kept_pixels(scores, labels)
        n_anomaly = int(np.count_nonzero(is_anomaly))
        if n_anomaly == 0:
            self.n_no_anomaly += 1
            return None
        if n_anomaly == kept.size:
            self.n_only_anomaly += 1
            return None
        tps, fps, _ = _tie_groups(kept.astype(np.float64), is_anomaly)
        result = _curve_metrics(tps, fps, _rule_is_strict(self.fpr_rule))
        self._per_image.append((result['ap'], result['auroc'], result['fpr95']))
        return result

    def compute(self) -> dict[str, Any]:
        if not self._per_image:
            raise DataError(f'no image with both anomaly and inlier pixels was given '
                            f'({self.n_no_anomaly} without anomalies, {self.n_only_anomaly} with '
                            'only anomalies); the per-image protocol needs at least one')
        ap, auroc, fpr95 = np.mean(np.asarray(self._per_image), axis=0)
        return {'protocol': self.protocol, 'ap': float(ap), 'auroc': float(auroc),
                'fpr95': float(fpr95), 'fpr95_rule': self.fpr_rule,
                'n_images': len(self._per_image),
                'n_skipped': self.n_no_anomaly + self.n_only_anomaly,
                'n_no_anomaly': self.n_no_anomaly, 'n_only_anomaly': self.n_only_anomaly}


def _float32_bin(values: np.ndarray, shift: int) -> np.ndarray:
    """Order-preserving bin index of float32 values: the top (32 - shift) bits of a uint32 key."""
    bits = values.view(np.uint32)
    # negative floats: flip all bits; others: set the sign bit -> unsigned order = float order
    flip = (values.view(np.int32) >> 31).view(np.uint32) | _SIGN
    return (bits ^ flip) >> np.uint32(shift)


def _bin_lower_edge(index: int, shift: int) -> float:
    """The smallest float32 value that falls into bin `index`."""
    key = np.uint32(index << shift)
    bits = key & ~_SIGN if key & _SIGN else ~key
    return float(np.asarray(bits, dtype=np.uint32).view(np.float32))


class PooledOOD:
    """Pooled protocol: one ROC/PR curve over all pixels of a data set, in bounded memory.

    Each score is cast to float32 and counted in one of 2**bits bins of a fixed, monotone
    binning that needs no score range up front: the top `bits` bits of the float32's
    order-preserving uint32 pattern (sign, 8 exponent bits, bits - 9 mantissa bits). A bin spans
    a relative score width of 2**-(bits - 9) (bits=20: 4.9e-4 of |score|); below 1.2e-38
    (subnormal floats) bins are absolute, 2**-(bits + 117) wide; -0.0 counts as +0.0.
    State: two int64 counts per bin (bits=20: 16 MiB), independent of the number of pixels.

    Error bound: the binned metrics are the exact metrics of the scores rounded down to their
    bin, so they differ from exact ones only through pixels that share a bin. `compute()` returns
    rigorous per-run bounds on |binned - exact| (exact = `ood_metrics` on all pixels):
    auroc_bound = sum_b pos_b neg_b / (2 P N); fpr95_bound = neg_b* / N for the bin b* where
    TPR crosses 0.95 (the binned FPR95 is never below the exact one); ap_bound = sum_b pos_b / P
    * max deviation of the binned precision from any precision a positive in bin b can have.
    These worst cases assume adversarial order inside a bin (a bin holding one distinct score,
    as with heavily tied scores, adds no error but still counts in the bounds). For scores whose
    class densities are smooth at the bin scale the actual error is far smaller; measured on 1e6
    pixels of unbounded DenseHybrid-like scores in [-50, 10], of scores in [0, 1] and of scores
    spread around 0: AP <= 7e-5 (tested: < 1e-3, i.e. 0.1 AP points), AUROC <= 1e-7, FPR95 <=
    2e-4; exact with heavy ties. Scores crowded near a large offset (e.g. max softmax near 1)
    lose resolution: pass 1 - p rather than p.
    """

    protocol = 'pooled'

    def __init__(self, fpr_rule: str = DEFAULT_FPR_RULE, bits: int = 20) -> None:
        _rule_is_strict(fpr_rule)
        if not isinstance(bits, int) or not 10 <= bits <= 24:
            raise ConfigError(f'PooledOOD bits must be an int in [10, 24] (2**bits bins), got '
                              f'{bits!r}; 20 gives a relative bin width of 4.9e-4 in 16 MiB')
        self.fpr_rule = fpr_rule
        self.bits = bits
        self._shift = 32 - bits
        # counts[b] = (inlier, anomaly) pixels whose score falls in bin b
        self._counts = np.zeros((1 << bits, 2), dtype=np.int64)
        self.n_images = 0

    @property
    def state_nbytes(self) -> int:
        """Bytes of accumulated state; constant over updates."""
        return int(self._counts.nbytes)

    @property
    def pixel_counts(self) -> tuple[int, int]:
        """(inlier, anomaly) pixels added so far."""
        inlier, anomaly = self._counts.sum(axis=0)
        return int(inlier), int(anomaly)

    def update(self, scores: Any, labels: Any) -> None:
        """Add the pixels of one image (or batch) to the histogram."""
        kept, is_anomaly = _kept_pixels(scores, labels)
        with np.errstate(over='ignore'):  # beyond float32 -> inf, reported below
            values = np.add(kept, np.float32(0.0), dtype=np.float32)  # a copy; -0.0 -> +0.0
        if not np.isfinite(values).all():
            first = int(np.argmin(np.isfinite(values)))
            raise DataError(f'anomaly score {kept[first]} lies outside the float32 range; '
                            'PooledOOD bins float32 scores: rescale the scores')
        index = (_float32_bin(values, self._shift).astype(np.intp) << 1) | is_anomaly
        self._counts += np.bincount(index, minlength=self._counts.size).reshape(-1, 2)
        self.n_images += 1

    def _curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        occupied = np.flatnonzero(self._counts.any(axis=1))[::-1]  # highest scores first
        counts = self._counts[occupied]
        tps = np.cumsum(counts[:, 1])
        fps = np.cumsum(counts[:, 0])
        _require_both_classes(int(tps[-1]) if tps.size else 0, int(fps[-1]) if fps.size else 0,
                              'PooledOOD')
        return tps, fps, occupied

    def curve_points(self, max_points: int | None = None) -> dict[str, np.ndarray]:
        """Points of the pooled ROC and PR curves, one per occupied bin, highest score first.

        'tpr' (= recall), 'fpr' and 'precision' (float64 `[P]`) of flagging every bin at or
        above the point's. `max_points` keeps that many evenly spaced points (for plots); the
        first and last point are always kept.
        """
        if max_points is not None and (not isinstance(max_points, int) or max_points < 2):
            raise ConfigError(f'max_points must be an int >= 2 (or None for all points), got '
                              f'{max_points!r}')
        tps, fps, _ = self._curve()
        if max_points is not None and tps.size > max_points:
            pick = np.unique(np.linspace(0, tps.size - 1, max_points).round().astype(np.intp))
            tps, fps = tps[pick], fps[pick]
        n_anomaly, n_inlier = float(self._counts[:, 1].sum()), float(self._counts[:, 0].sum())
        tp, fp = tps.astype(np.float64), fps.astype(np.float64)
        return {'tpr': tp / n_anomaly, 'fpr': fp / n_inlier,
                'precision': tp / np.maximum(tp + fp, 1.0)}

    def compute(self) -> dict[str, Any]:
        strict = _rule_is_strict(self.fpr_rule)
        tps, fps, _ = self._curve()
        result = _curve_metrics(tps, fps, strict)
        n_anomaly, n_inlier = float(tps[-1]), float(fps[-1])
        pos = np.diff(tps, prepend=0).astype(np.float64)
        neg = np.diff(fps, prepend=0).astype(np.float64)
        has_pos = pos > 0
        tp = tps[has_pos].astype(np.float64)
        fp = fps[has_pos].astype(np.float64)
        tp0, fp0 = tp - pos[has_pos], fp - neg[has_pos]
        binned = tp / (tp + fp)
        # precision of the k-th anomaly of a bin after j of its inliers is (tp0+k)/(tp0+fp0+k+j):
        # largest at k = all, j = 0; smallest at k = 1, j = all
        highest = tp / (tp + fp0)
        lowest = (tp0 + 1.0) / (tp0 + fp + 1.0)
        ap_bound = np.sum(pos[has_pos] * np.maximum(highest - binned, binned - lowest))
        auroc_bound = np.sum(pos * neg) / (2.0 * n_anomaly * n_inlier)
        fpr95_bound = neg[_first_point(tps, FPR_TPR, strict)] / n_inlier
        return {'protocol': self.protocol, **result, 'fpr95_rule': self.fpr_rule,
                'n_anomaly': int(tps[-1]), 'n_inlier': int(fps[-1]),
                'n_images': self.n_images, 'bins': 1 << self.bits,
                'ap_bound': float(ap_bound / n_anomaly), 'auroc_bound': float(auroc_bound),
                'fpr95_bound': float(fpr95_bound)}

    def threshold_at_tpr(self, tpr: float = FPR_TPR, strict: bool = False) -> float:
        """Lower edge tau of the bin where the pooled TPR first reaches `tpr` (> `tpr` if strict).

        `score >= tau` flags exactly the counted bins at and above it, so the achieved TPR is
        the binned one; see `threshold_at_tpr` for the `>` rule of the open-set prediction.
        """
        _check_tpr(tpr, strict)
        tps, _, occupied = self._curve()
        return _bin_lower_edge(int(occupied[_first_point(tps, tpr, strict)]), self._shift)

    def threshold_at_fpr(self, fpr: float) -> float:
        """Upper edge tau of the bin holding the (m+1)-th largest inlier score, m = floor(fpr n).

        Uses the inlier pixels (label 0) only, so images without anomalies may be added. The
        bins above tau hold at most m inliers and `score > tau` flags no score of tau's bin, so
        the achieved false-alarm rate on the added pixels is at most `fpr`; tau lies at most
        one bin (relative width 2**-(bits - 9)) above the exact `threshold_at_fpr`.
        """
        _check_fpr(fpr)
        inlier = self._counts[:, 0]
        occupied = np.flatnonzero(inlier)[::-1]  # highest scores first
        if occupied.size == 0:
            raise DataError('PooledOOD holds no inlier (label 0) pixel; threshold_at_fpr needs '
                            'the scores of inlier validation pixels')
        above = np.cumsum(inlier[occupied])
        m = _allowed_false_alarms(fpr, int(above[-1]))
        index = int(occupied[int(np.searchsorted(above, m, side='right'))])
        if index + 1 >= 1 << self.bits:
            return float(np.finfo(np.float32).max)
        return min(_bin_lower_edge(index + 1, self._shift), float(np.finfo(np.float32).max))


def _int_array(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype.kind not in 'iu':
        raise DataError(f'{name} must be an integer array of class ids, got dtype {array.dtype}')
    return array


def _check_ids(ids: np.ndarray, num_classes: int, name: str, fix: str) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
        bad = np.unique(ids[(ids < 0) | (ids >= num_classes)])
        raise DataError(f'{name} must hold ids in [0, {num_classes}), found {bad[:10].tolist()}'
                        f'{" ..." if bad.size > 10 else ""}; {fix}')


class ConfusionMatrix:
    """Streaming confusion matrix over K classes: per-class IoU, closed mIoU, pixel accuracy.

    Rows are ground truth, columns predictions. Target pixels equal to `ignore_index` are
    skipped; any other target id outside [0, K) is an error (map anomaly and void to the ignore
    id first, as the closed mIoU of methods.md §2.5 ignores them).
    """

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f'num_classes must be a positive int, got {num_classes!r}')
        if 0 <= ignore_index < num_classes:
            raise ConfigError(f'ignore_index {ignore_index} is a class id in [0, {num_classes}); '
                              'use an id outside the classes, e.g. 255')
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> None:
        """Add one prediction map and its target map (same shape, integer class ids)."""
        pred = _int_array(pred, 'predicted labels')
        target = _int_array(target, 'target labels')
        if pred.shape != target.shape:
            raise DataError(f'prediction and target must have the same shape, got {pred.shape} '
                            f'and {target.shape}; resize the prediction with nearest neighbour')
        keep = target != self.ignore_index
        t = target[keep].astype(np.int64)
        p = pred[keep].astype(np.int64)
        k = self.num_classes
        _check_ids(t, k, 'target labels',
                   f'map void, "other" and anomaly pixels to ignore_index {self.ignore_index}')
        _check_ids(p, k, 'predicted labels', 'predict one of the trained classes')
        self.matrix += np.bincount(t * k + p, minlength=k * k).reshape(k, k)

    def iou(self) -> np.ndarray:
        """Per-class IoU = TP / (TP + FP + FN); NaN for a class in neither target nor pred."""
        tp = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(axis=0) + self.matrix.sum(axis=1) - tp
        with np.errstate(invalid='ignore', divide='ignore'):
            return np.where(union > 0, tp / union, np.nan)

    def compute(self) -> dict[str, Any]:
        n_pixels = int(self.matrix.sum())
        if n_pixels == 0:
            raise DataError('ConfusionMatrix has no counted pixel: every target pixel was '
                            f'ignore_index {self.ignore_index} or nothing was added')
        iou = self.iou()
        return {'miou': float(np.nanmean(iou)), 'iou': [float(v) for v in iou],
                'pixel_accuracy': float(np.trace(self.matrix) / n_pixels), 'n_pixels': n_pixels}


def open_set_prediction(pred: Any, scores: Any, tau: float, num_classes: int) -> np.ndarray:
    """The open-set label map: argmax labels `pred`, except label K where `score > tau`."""
    pred = _int_array(pred, 'predicted labels')
    scores = np.asarray(scores)
    if pred.shape != scores.shape:
        raise DataError(f'predicted labels and anomaly scores must have the same shape, got '
                        f'{pred.shape} and {scores.shape}')
    if scores.dtype.kind == 'f' and not np.isfinite(scores).all():
        finite = np.isfinite(scores).reshape(-1)
        raise DataError(f'{finite.size - np.count_nonzero(finite)} anomaly scores are NaN or '
                        f'inf (first at flat index {int(np.argmin(finite))}); expected finite '
                        'scores for the open-set prediction')
    if not np.isfinite(tau):
        raise ConfigError(f'open-set threshold tau must be finite, got {tau}')
    _check_ids(pred, num_classes, 'predicted labels', 'predict one of the trained classes')
    open_pred = pred.astype(np.int64)
    open_pred[scores > tau] = num_classes
    return open_pred


class OpenSetConfusion:
    """Open-set IoU over K inlier classes plus the anomaly label K (methods.md §2.5).

    Inlier pixels predicted anomaly are false negatives of their class; anomaly pixels predicted
    as class k are false positives of k. open-mIoU = nanmean of the K inlier IoUs; the anomaly
    IoU is reported separately. Targets: 0..K-1 inliers, K anomaly, `ignore_index` ignored.
    """

    def __init__(self, num_classes: int, tau: float, ignore_index: int = 255) -> None:
        if not np.isfinite(tau):
            raise ConfigError(f'open-set threshold tau must be finite, got {tau}')
        self.num_classes = num_classes
        self.tau = float(tau)
        self._confusion = ConfusionMatrix(num_classes + 1, ignore_index)

    @property
    def matrix(self) -> np.ndarray:
        """[K+1, K+1] counts, rows ground truth, columns open-set prediction; K = anomaly."""
        return self._confusion.matrix

    def update(self, pred: Any, scores: Any, target: Any) -> None:
        """Add one image: argmax labels, anomaly scores and open-set targets (same shape)."""
        self._confusion.update(open_set_prediction(pred, scores, self.tau, self.num_classes),
                               target)

    def compute(self) -> dict[str, Any]:
        closed = self._confusion.compute()
        iou = np.asarray(closed['iou'])
        return {'open_miou': float(np.nanmean(iou[:-1])), 'iou': closed['iou'][:-1],
                'anomaly_iou': closed['iou'][-1], 'tau': self.tau,
                'n_pixels': closed['n_pixels']}


class AgreementShapeError(ValueError):
    """The outputs compared by `agreement_figures` differ in shape or hold no pixels."""


def agreement_figures(reference: tuple[Any, Any], candidate: tuple[Any, Any],
                      threshold: float) -> dict[str, float]:
    """Agreement of a candidate's (labels, score) `[N, H, W]` with the reference's.

    Label and anomaly-mask (score > threshold) agreement are pixel fractions; the score error is
    absolute and in units of the reference score's standard deviation (max and mean over
    pixels; 0 for a constant reference matched exactly, inf when it is missed); a NaN/inf score
    of the candidate counts as an infinite error and in `nonfinite_fraction`.
    Raises `AgreementShapeError` when the shapes differ or there is no pixel.
    """
    ref_labels, ref_score = (np.asarray(a) for a in reference)
    labels, score = (np.asarray(a) for a in candidate)
    if labels.shape != ref_labels.shape or score.shape != ref_score.shape \
            or labels.shape != score.shape:
        raise AgreementShapeError(
            f'labels {list(labels.shape)} and scores {list(score.shape)} against reference '
            f'labels {list(ref_labels.shape)} and scores {list(ref_score.shape)}')
    if labels.size == 0:
        raise AgreementShapeError('no pixels to compare')
    ref64 = ref_score.astype(np.float64)
    score64 = score.astype(np.float64)
    finite = np.isfinite(score64)
    diff = np.where(finite, np.abs(score64 - ref64), np.inf)
    std = float(np.std(ref64))
    max_diff = float(np.max(diff))
    mean_diff = float(np.mean(diff))
    return {
        'pixels': float(labels.size),
        'label_agreement': float(np.mean(labels == ref_labels)),
        'mask_agreement': float(np.mean((score64 > threshold) == (ref64 > threshold))),
        'max_score_diff': max_diff,
        'mean_score_diff': mean_diff,
        'score_std': std,
        'score_diff_over_std': _over_std(max_diff, std),
        'mean_score_diff_over_std': _over_std(mean_diff, std),
        'nonfinite_fraction': float(1.0 - np.mean(finite)),
    }


def _over_std(value: float, std: float) -> float:
    if std > 0:
        return value / std
    return 0.0 if value == 0 else math.inf
