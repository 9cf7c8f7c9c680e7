"""Anomaly-detection and segmentation metrics, NumPy (OpenCV for connected components only;
methods.md §2.5 and §6).

Anomaly scores: higher = more anomalous. Anomaly labels: 1 = anomaly (the positive class),
0 = inlier, any other value (e.g. 2 for StreetHazards "other", 255 for void) is ignored.

- `ood_metrics`: exact AP, AUROC and FPR95 of one set of pixels; equal to scikit-learn's
  `average_precision_score`, `roc_auc_score` and the FPR of `roc_curve(drop_intermediate=False)`.
- `PerImageOOD`: the per-image protocol (mean over images; images without anomaly pixels, or with
  only anomaly pixels, are skipped and counted).
- `PooledOOD`: one curve over the whole data set, streamed through a fixed histogram (bounded
  memory), with per-run error bounds.
- `BinnedPerImageOOD`: the per-image protocol in linear time: each image's curve from its own
  histogram in `PooledOOD`'s binning (`frame_histogram`, shared with the pooled update), with
  the same error bounds per image (used by replay; evaluate keeps the exact `PerImageOOD`).
- `threshold_at_tpr`: the open-set threshold tau at a target TPR; `threshold_at_fpr`: the
  threshold at a target false-alarm rate on inlier pixels (both also on `PooledOOD`).
- `ConfusionMatrix` (closed mIoU) and `OpenSetConfusion` (open-mIoU, methods.md §2.5).
- `ComponentMetrics`: SegmentMeIfYouCan's component-level sIoU, PPV and mean F1 of a predicted
  anomaly mask (or of labelled objects); `BoxMetrics`: recall and precision of object boxes at
  IoU >= 0.5 against the boxes of the ground-truth components.
- `agreement_figures`: how closely a compiled graph's (labels, score) follow a reference's
  (export parity, engine verification).

Every result dict holds only floats, ints, strings and lists, so it serialises to JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any

import cv2
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


def _check_bits(bits: Any, who: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 10 <= bits <= 24:
        raise ConfigError(f'{who} bits must be an int in [10, 24] (2**bits bins), got '
                          f'{bits!r}; 20 gives a relative bin width of 4.9e-4 in 16 MiB')
    return bits


@dataclass(frozen=True)
class FrameHistogram:
    """The evaluated pixels of one image (or batch) in `PooledOOD`'s binning.

    counts: int64 `[2**bits, 2]`, (inlier, anomaly) pixels per bin; bins: the bin of every
    evaluated pixel (intp `[n]`); n_anomaly / n_pixels: anomaly and evaluated pixels.
    """

    counts: np.ndarray
    bins: np.ndarray
    bits: int
    n_anomaly: int
    n_pixels: int

    def occupied(self) -> np.ndarray:
        """The bins holding a pixel, ascending: a byte per bin marked and scanned, no sort."""
        seen = np.zeros(1 << self.bits, dtype=bool)
        seen[self.bins] = True
        return np.flatnonzero(seen)


def frame_histogram(scores: Any, labels: Any, bits: int = 20) -> FrameHistogram:
    """Bin the pixels labelled 0 or 1 of one image as `PooledOOD` does (float32 scores)."""
    _check_bits(bits, 'frame_histogram')
    kept, is_anomaly = _kept_pixels(scores, labels)
    with np.errstate(over='ignore'):  # beyond float32 -> inf, reported below
        values = np.add(kept, np.float32(0.0), dtype=np.float32)  # a copy; -0.0 -> +0.0
    if not np.isfinite(values).all():
        first = int(np.argmin(np.isfinite(values)))
        raise DataError(f'anomaly score {kept[first]} lies outside the float32 range; '
                        'PooledOOD bins float32 scores: rescale the scores')
    bins = _float32_bin(values, 32 - bits).astype(np.intp)
    counts = np.bincount((bins << 1) | is_anomaly, minlength=2 << bits).reshape(-1, 2)
    return FrameHistogram(counts=counts, bins=bins, bits=bits,
                          n_anomaly=int(np.count_nonzero(is_anomaly)), n_pixels=int(kept.size))


def _binned_metrics(tps: np.ndarray, fps: np.ndarray, strict: bool) -> dict[str, float]:
    """AP, AUROC, FPR95 of a binned curve and rigorous bounds on their distance to the exact
    metrics of the unbinned scores (see `PooledOOD`).

    tps, fps: int64 [G], cumulative anomaly and inlier counts of the occupied bins, highest
    score first; both classes present.
    """
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
    return {**result, 'ap_bound': float(ap_bound / n_anomaly),
            'auroc_bound': float(auroc_bound), 'fpr95_bound': float(fpr95_bound)}


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
        self.fpr_rule = fpr_rule
        self.bits = _check_bits(bits, 'PooledOOD')
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

    def update(self, scores: Any, labels: Any) -> FrameHistogram:
        """Add the pixels of one image (or batch) to the histogram; returns the image's own
        histogram (for `BinnedPerImageOOD.add`)."""
        histogram = frame_histogram(scores, labels, self.bits)
        self.add(histogram)
        return histogram

    def add(self, histogram: FrameHistogram) -> None:
        """Add an image binned by `frame_histogram` with this instance's bits."""
        if histogram.bits != self.bits:
            raise ConfigError(f'a histogram of {histogram.bits} bits cannot join PooledOOD of '
                              f'{self.bits} bits; bin with frame_histogram(..., bits='
                              f'{self.bits})')
        self._counts += histogram.counts
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
        tps, fps, _ = self._curve()
        metrics = _binned_metrics(tps, fps, _rule_is_strict(self.fpr_rule))
        return {'protocol': self.protocol,
                **{key: metrics[key] for key in ('ap', 'auroc', 'fpr95')},
                'fpr95_rule': self.fpr_rule, 'n_anomaly': int(tps[-1]),
                'n_inlier': int(fps[-1]), 'n_images': self.n_images, 'bins': 1 << self.bits,
                **{key: metrics[key] for key in ('ap_bound', 'auroc_bound', 'fpr95_bound')}}

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


class BinnedPerImageOOD:
    """The per-image protocol of `PerImageOOD` in linear time per image.

    Each image's AP, AUROC and FPR95 come from its own histogram in `PooledOOD`'s binning
    (`frame_histogram`: a bin count and a scan of the occupied bins, no sort), so they are
    the exact metrics of the image's scores rounded down to their bin. Error bound: per image,
    the rigorous bounds of `PooledOOD` (ap_bound, auroc_bound, fpr95_bound: adversarial order
    inside every bin); `compute()` reports their mean over the images, which bounds the
    distance of each mean metric to `PerImageOOD`'s. With bits=20 a bin spans 4.9e-4 of
    |score|; scores whose classes share no bin give the exact figures. Images are skipped and
    counted as in `PerImageOOD`.
    """

    protocol = 'per-image'

    def __init__(self, fpr_rule: str = DEFAULT_FPR_RULE, bits: int = 20) -> None:
        _rule_is_strict(fpr_rule)
        self.fpr_rule = fpr_rule
        self.bits = _check_bits(bits, 'BinnedPerImageOOD')
        self.n_no_anomaly = 0
        self.n_only_anomaly = 0
        # per image: ap, auroc, fpr95, ap_bound, auroc_bound, fpr95_bound
        self._per_image: list[tuple[float, ...]] = []

    def update(self, scores: Any, labels: Any) -> dict[str, Any] | None:
        """Add one image; returns its metrics and bounds, or None when it is skipped."""
        return self.add(frame_histogram(scores, labels, self.bits))

    def add(self, histogram: FrameHistogram) -> dict[str, Any] | None:
        """Add one image already binned (e.g. the histogram `PooledOOD.update` returns)."""
        if histogram.bits != self.bits:
            raise ConfigError(f'a histogram of {histogram.bits} bits given to '
                              f'BinnedPerImageOOD of {self.bits} bits; bin with '
                              f'frame_histogram(..., bits={self.bits})')
        if histogram.n_anomaly == 0:
            self.n_no_anomaly += 1
            return None
        if histogram.n_anomaly == histogram.n_pixels:
            self.n_only_anomaly += 1
            return None
        counts = histogram.counts[histogram.occupied()[::-1]]  # highest scores first
        tps = np.cumsum(counts[:, 1])
        fps = np.cumsum(counts[:, 0])
        result = _binned_metrics(tps, fps, _rule_is_strict(self.fpr_rule))
        self._per_image.append(tuple(result[key] for key in _BINNED_KEYS))
        return result

    def compute(self) -> dict[str, Any]:
        if not self._per_image:
            raise DataError(f'no image with both anomaly and inlier pixels was given '
                            f'({self.n_no_anomaly} without anomalies, {self.n_only_anomaly} with '
                            'only anomalies); the per-image protocol needs at least one')
        means = dict(zip(_BINNED_KEYS, np.mean(np.asarray(self._per_image), axis=0),
                         strict=True))
        return {'protocol': self.protocol,
                **{key: float(means[key]) for key in ('ap', 'auroc', 'fpr95')},
                'fpr95_rule': self.fpr_rule, 'n_images': len(self._per_image),
                'n_skipped': self.n_no_anomaly + self.n_only_anomaly,
                'n_no_anomaly': self.n_no_anomaly, 'n_only_anomaly': self.n_only_anomaly,
                'bins': 1 << self.bits,
                **{key: float(means[key]) for key in ('ap_bound', 'auroc_bound', 'fpr95_bound')}}


_BINNED_KEYS = ('ap', 'auroc', 'fpr95', 'ap_bound', 'auroc_bound', 'fpr95_bound')


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


# Parity of an exported graph with eager torch (issue 5 §1): what `anomaly-seg export` requires
# of each format; the fp32 TensorRT engine check (build_engine.REQUIREMENTS) derives its bounds
# from these.
MIN_LABEL_AGREEMENT = 0.999
MIN_MASK_AGREEMENT = 0.995
MAX_DIFF_OVER_STD = 1e-3


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


# Component-level metrics of SegmentMeIfYouCan: sIoU thresholds tau = 0.25, 0.30, ..., 0.75, in
# percent so that `sIoU >= tau` is decided exactly in integers (100 * inter >= pct * union).
SIOU_PERCENTS = tuple(range(25, 80, 5))
# The benchmark's size filters (pixels, at its image resolution): predicted components smaller
# than min_pred_area are removed, ground-truth components smaller than min_gt_area ignored.
SMIYC_ANOMALY_TRACK = {'min_pred_area': 500, 'min_gt_area': 100}
SMIYC_OBSTACLE_TRACK = {'min_pred_area': 50, 'min_gt_area': 10}


def _check_area(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f'{name} must be an int >= 0 (pixels; 0 keeps every component), got '
                          f'{value!r}; SegmentMeIfYouCan uses {SMIYC_ANOMALY_TRACK} (anomaly '
                          f'track) and {SMIYC_OBSTACLE_TRACK} (obstacle track)')
    return int(value)


def _gt_labels(gt_labels: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    gt = np.asarray(gt_labels)
    if gt.dtype.kind not in 'iub':
        raise DataError(f'anomaly labels must be integers (1 anomaly, 0 inlier, other values '
                        f'ignored), got dtype {gt.dtype}; cast them with .astype(np.uint8)')
    if gt.ndim != 2 or gt.shape != shape:
        raise DataError(f'{what} and anomaly labels must be [H, W] maps of the same shape, got '
                        f'{list(shape)} and {list(gt.shape)}; resize the prediction to the '
                        'label map with nearest neighbour')
    return gt


def _components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """8-connected components of a bool [H, W] mask: (count + 1, int32 [H, W] ids, 0 = none)."""
    return cv2.connectedComponents(np.ascontiguousarray(mask).view(np.uint8), connectivity=8,
                                   ltype=cv2.CV_32S)


class ComponentMetrics:
    """Component-level metrics of SegmentMeIfYouCan, streamed over frames.

    Definitions: Chan et al., "SegmentMeIfYouCan: A Benchmark for Anomaly Segmentation",
    NeurIPS 2021 Datasets and Benchmarks, section 4 (component-level metrics), with the details
    of the official code (github.com/SegmentMeIfYouCan/road-anomaly-benchmark,
    road_anomaly_benchmark/metrics/instance_segmentation.py: `default_instancer`,
    `segment_metrics`, `MetricSegment.aggregate`), which this class follows:

    - Ground truth: 1 = anomaly, 0 = inlier, anything else ignored (the benchmark's void 255;
      here every value but 0 and 1, as `PooledOOD` does). GT components are the 8-connected
      components of the label-1 pixels; those smaller than `min_gt_area` pixels are ignored
      (their pixels leave the evaluated region).
    - Prediction: predicted pixels on ignored labels are dropped *before* the predicted
      components (8-connected) are formed; components smaller than `min_pred_area` pixels are
      then removed. Everything below is counted inside the evaluated region only (labels 0/1,
      outside ignored GT components).
    - sIoU of a GT component k, with K^(k) the union of the predicted components that
      intersect k and A(k) the pixels of the other GT components:
      sIoU(k) = |k & K^(k)| / |(k | K^(k)) \\ A(k)|. Predicted pixels that belong to another
      GT component do not count against k, so one blob over two touching objects scores both.
      A missed component has sIoU 0. Equal to |k & K^(k)| / (|k| + |K^(k) on inlier pixels|).
    - PPV of a predicted component k^: the share of its pixels on any GT component,
      PPV(k^) = |k^ & K(k^)| / |k^|; the fragments of one object each keep a high PPV.
    - Per tau in {0.25, 0.30, ..., 0.75}: TP = GT components with sIoU >= tau, FN = the
      others, FP = predicted components with PPV < tau, summed over all frames;
      F1(tau) = 2 TP / (2 TP + FN + FP); `f1_mean` averages F1 over the 11 values of tau.
      (The paper's FP uses PPV, as the SegmentMeIfYouCan code does; the older
      adynathos/road-anomaly-benchmark code counted predicted sIoU < tau instead. The official
      code's tau grid np.linspace holds 0.6000000000000001; tau is exact here.)
    - `siou` is the mean sIoU over all GT components of all frames, `ppv` the mean PPV over
      all predicted components, `siou_pred` the mean sIoU of predicted components (the same
      formula with the roles swapped, reported by the benchmark as sIoU_pred).
    - Frames: a frame without GT components adds its predicted components as false positives
      (PPV 0); a frame with neither adds nothing but the frame count. Means over no component
      and F1 without any component are NaN.

    `update(pred_mask, gt_labels)` takes the thresholded mask (score > tau) as the benchmark
    does; `update_instances(pred_ids, gt_labels)` takes predicted components already labelled
    (e.g. `objects.find_objects_with_ids`, whose merged objects are not 8-connected) and skips
    the labelling. State: a few counters, independent of the number of frames.
    """

    protocol = 'components'

    def __init__(self, min_pred_area: int = 0, min_gt_area: int = 0) -> None:
        self.min_pred_area = _check_area(min_pred_area, 'min_pred_area')
        self.min_gt_area = _check_area(min_gt_area, 'min_gt_area')
        n = len(SIOU_PERCENTS)
        self.tp = np.zeros(n, dtype=np.int64)
        self.fn = np.zeros(n, dtype=np.int64)
        self.fp = np.zeros(n, dtype=np.int64)
        self.n_frames = 0
        self.n_frames_without_gt = 0
        self.n_gt = 0
        self.n_pred = 0
        self.n_gt_ignored = 0
        self.n_pred_removed = 0
        self._sums = {'siou': 0.0, 'ppv': 0.0, 'siou_pred': 0.0}

    def update(self, pred_mask: Any, gt_labels: Any) -> dict[str, Any]:
        """Add one frame: predicted mask (bool or integers, nonzero = anomaly) and labels.

        Returns the frame's figures: component counts and the per-component sIoU and PPV.
        """
        pred = np.asarray(pred_mask)
        if pred.dtype.kind not in 'biu':
            raise DataError(f'the predicted anomaly mask must be bool or integers (nonzero = '
                            f'anomaly), got dtype {pred.dtype}; threshold the scores first '
                            '(score > threshold)')
        gt = _gt_labels(gt_labels, pred.shape, 'the predicted mask')
        evaluated = (gt == 0) | (gt == 1)
        n_ids, pred_ids = _components((pred != 0) & evaluated)
        return self._add(pred_ids, n_ids, gt, evaluated)

    def update_instances(self, pred_ids: Any, gt_labels: Any) -> dict[str, Any]:
        """Add one frame whose predicted components are given: int [H, W], 0 = none, k > 0 =
        component k (any ids; pixels on ignored labels are dropped, ids are not relabelled)."""
        ids = np.asarray(pred_ids)
        if ids.dtype.kind not in 'iu':
            raise DataError(f'predicted component ids must be integers (0 = none), got dtype '
                            f'{ids.dtype}; pass the id map of find_objects_with_ids')
        gt = _gt_labels(gt_labels, ids.shape, 'the predicted component ids')
        if ids.size and ids.min() < 0:
            raise DataError(f'predicted component ids must be >= 0 (0 = none), found '
                            f'{int(ids.min())}')
        evaluated = (gt == 0) | (gt == 1)
        kept = (ids != 0) & evaluated
        compact = np.zeros(ids.shape, dtype=np.int64)
        unique, inverse = np.unique(ids[kept], return_inverse=True)
        compact[kept] = inverse.reshape(-1) + 1
        return self._add(compact, unique.size + 1, gt, evaluated)

    def _add(self, pred_ids: np.ndarray, n_ids: int, gt: np.ndarray,
             evaluated: np.ndarray) -> dict[str, Any]:
        """pred_ids: int [H, W] in 0..n_ids-1, already 0 on ignored pixels."""
        n_gt_ids, gt_ids = _components(gt == 1)
        gt_size = np.bincount(gt_ids.reshape(-1), minlength=n_gt_ids)
        small_gt = gt_size < self.min_gt_area
        small_gt[0] = False
        pred_size = np.bincount(pred_ids.reshape(-1), minlength=n_ids)
        removed = pred_size < self.min_pred_area
        removed[0] = False
        if removed.any():
            pred_ids = np.where(removed[pred_ids], 0, pred_ids)
        # pixels of the evaluated region (labels 0/1 outside the ignored small GT components)
        # that lie on a GT or a predicted component; inlier pixels predicted as none add nothing
        counted = evaluated & ((gt_ids > 0) | (pred_ids > 0))
        if small_gt.any():
            counted &= ~small_gt[gt_ids]
        g = gt_ids[counted].astype(np.int64)
        p = pred_ids[counted].astype(np.int64)
        # contingency[i, j]: pixels of GT component i (0 = inlier) and predicted j (0 = none)
        codes, counts = np.unique(g * n_ids + p, return_counts=True)
        gi, pj = np.divmod(codes, n_ids)
        size_g = np.bincount(gi, counts, minlength=n_gt_ids).astype(np.int64)
        size_p = np.bincount(pj, counts, minlength=n_ids).astype(np.int64)
        on_inlier = np.bincount(pj[gi == 0], counts[gi == 0], minlength=n_ids).astype(np.int64)
        missed = np.bincount(gi[pj == 0], counts[pj == 0], minlength=n_gt_ids).astype(np.int64)
        both = (gi > 0) & (pj > 0)
        gb, pb, cb = gi[both], pj[both], counts[both]
        inter_g = np.bincount(gb, cb, minlength=n_gt_ids).astype(np.int64)
        union_g = size_g + np.bincount(gb, on_inlier[pb], minlength=n_gt_ids).astype(np.int64)
        inter_p = np.bincount(pb, cb, minlength=n_ids).astype(np.int64)
        union_p = size_p + np.bincount(pb, missed[gb], minlength=n_ids).astype(np.int64)
        gt_kept = np.flatnonzero(size_g[1:]) + 1  # small components are gone from the region
        pred_kept = np.flatnonzero(size_p[1:]) + 1
        inter_g, union_g = inter_g[gt_kept], union_g[gt_kept]
        inter_p, size_kept, union_p = inter_p[pred_kept], size_p[pred_kept], union_p[pred_kept]
        pct = np.asarray(SIOU_PERCENTS, dtype=np.int64)[:, None]
        tp = np.count_nonzero(100 * inter_g >= pct * union_g, axis=1)
        self.tp += tp
        self.fn += gt_kept.size - tp
        self.fp += np.count_nonzero(100 * inter_p < pct * size_kept, axis=1)
        siou = inter_g / union_g
        ppv = inter_p / size_kept
        siou_pred = inter_p / union_p
        self._sums['siou'] += float(siou.sum())
        self._sums['ppv'] += float(ppv.sum())
        self._sums['siou_pred'] += float(siou_pred.sum())
        self.n_frames += 1
        self.n_frames_without_gt += int(gt_kept.size == 0)
        self.n_gt += int(gt_kept.size)
        self.n_pred += int(pred_kept.size)
        self.n_gt_ignored += int(np.count_nonzero(small_gt))
        self.n_pred_removed += int(np.count_nonzero(removed))
        return {'n_gt': int(gt_kept.size), 'n_pred': int(pred_kept.size),
                'siou': siou.tolist(), 'ppv': ppv.tolist(), 'siou_pred': siou_pred.tolist()}

    def compute(self) -> dict[str, Any]:
        if self.n_frames == 0:
            raise DataError('ComponentMetrics holds no frame; add frames with update() first')
        with np.errstate(invalid='ignore', divide='ignore'):
            f1 = np.where(2 * self.tp + self.fn + self.fp > 0,
                          2 * self.tp / (2 * self.tp + self.fn + self.fp), np.nan)
        by_tau = {p: i for i, p in enumerate(SIOU_PERCENTS)}
        return {
            'protocol': self.protocol,
            'siou': _mean(self._sums['siou'], self.n_gt),
            'ppv': _mean(self._sums['ppv'], self.n_pred),
            'siou_pred': _mean(self._sums['siou_pred'], self.n_pred),
            'f1_mean': float(np.mean(f1)),
            'f1_25': float(f1[by_tau[25]]), 'f1_50': float(f1[by_tau[50]]),
            'f1_75': float(f1[by_tau[75]]),
            'thresholds': [p / 100 for p in SIOU_PERCENTS], 'f1': [float(v) for v in f1],
            'tp': self.tp.tolist(), 'fn': self.fn.tolist(), 'fp': self.fp.tolist(),
            'n_frames': self.n_frames, 'n_frames_without_gt': self.n_frames_without_gt,
            'n_gt': self.n_gt, 'n_pred': self.n_pred, 'n_gt_ignored': self.n_gt_ignored,
            'n_pred_removed': self.n_pred_removed, 'min_pred_area': self.min_pred_area,
            'min_gt_area': self.min_gt_area,
        }


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def _as_box(box: Any) -> tuple[int, int, int, int]:
    values = getattr(box, 'box', box)
    try:
        x, y, w, h = (int(v) for v in values)
    except (TypeError, ValueError):
        raise DataError(f'a predicted box must be (x, y, width, height) in pixels or have a '
                        f'.box attribute (AnomalyObject), got {box!r}') from None
    if w <= 0 or h <= 0:
        raise DataError(f'a predicted box must have a positive width and height, got {box!r}')
    return x, y, w, h


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes a [P, 4] and b [G, 4] (x, y, w, h; half-open pixel ranges): [P, G]."""
    ax1, ay1 = a[:, None, 0] + a[:, None, 2], a[:, None, 1] + a[:, None, 3]
    bx1, by1 = b[None, :, 0] + b[None, :, 2], b[None, :, 1] + b[None, :, 3]
    iw = np.clip(np.minimum(ax1, bx1) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(ay1, by1) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = (iw * ih).astype(np.float64)
    union = (a[:, None, 2] * a[:, None, 3] + b[None, :, 2] * b[None, :, 3]).astype(np.float64)
    return inter / (union - inter)


def _component_boxes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boxes (x, y, w, h; int64 [N, 4]) and areas (int64 [N]) of the 8-connected components of
    a bool [H, W] mask. Statistics over the mask pixels: OpenCV's own statistics pass is
    several times slower than its labelling on large maps (OpenCV 5.1)."""
    n, ids = _components(mask)
    points = cv2.findNonZero(mask.view(np.uint8))
    if points is None:
        return np.zeros((0, 4), dtype=np.int64), np.zeros(0, dtype=np.int64)
    points = points.reshape(-1, 2).astype(np.int64)
    xs, ys = points[:, 0], points[:, 1]
    group = ids[ys, xs].astype(np.intp)
    low = np.full((2, n), np.iinfo(np.int64).max, dtype=np.int64)
    high = np.full((2, n), -1, dtype=np.int64)
    for axis, values in enumerate((xs, ys)):
        np.minimum.at(low[axis], group, values)
        np.maximum.at(high[axis], group, values)
    boxes = np.stack([low[0], low[1], high[0] - low[0] + 1, high[1] - low[1] + 1], axis=1)
    return boxes[1:], np.bincount(group, minlength=n)[1:].astype(np.int64)


class BoxMetrics:
    """Object detection figures of boxes: recall and precision at box IoU >= `iou_threshold`.

    Ground-truth boxes are the bounding boxes of the 8-connected components of the label-1
    pixels (1 anomaly, 0 inlier, other values ignored, as `ComponentMetrics`); components
    smaller than `min_gt_area` pixels are ignored boxes. Matching is one-to-one and greedy by
    IoU: all (prediction, GT) pairs with IoU >= `iou_threshold`, highest IoU first (ties: lower
    prediction index, then lower GT index), each box matched at most once; with a threshold of
    0.5 or more a box rarely has two candidates, and greedy equals an optimal matching then.
    A matched prediction is a TP, an unmatched GT box a FN. An unmatched prediction is a FP,
    unless it overlaps an ignored GT box at the threshold or more than `max_ignored_fraction`
    of its box lies on ignored labels (the box analogue of the benchmark dropping predictions
    on void); those are counted in `n_pred_ignored` only. This project's definition:
    SegmentMeIfYouCan scores components, not boxes.
    """

    protocol = 'boxes'

    def __init__(self, iou_threshold: float = 0.5, min_gt_area: int = 0,
                 max_ignored_fraction: float = 0.5) -> None:
        if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) \
                or not 0.0 < iou_threshold <= 1.0:
            raise ConfigError(f'iou_threshold must be in (0, 1], e.g. 0.5, got {iou_threshold!r}')
        if isinstance(max_ignored_fraction, bool) \
                or not isinstance(max_ignored_fraction, (int, float)) \
                or not 0.0 <= max_ignored_fraction <= 1.0:
            raise ConfigError(f'max_ignored_fraction must be in [0, 1] (1 counts every box), got '
                              f'{max_ignored_fraction!r}')
        self.iou_threshold = float(iou_threshold)
        self.min_gt_area = _check_area(min_gt_area, 'min_gt_area')
        self.max_ignored_fraction = float(max_ignored_fraction)
        self.tp = self.fp = self.fn = 0
        self.n_frames = self.n_boxes = self.n_pred_ignored = self.n_gt_ignored = 0

    def update(self, pred_boxes: Any, gt_labels: Any) -> dict[str, int]:
        """Add one frame: predicted boxes (AnomalyObjects or (x, y, w, h), in pixels of the
        label map) and its anomaly labels [H, W]. Returns the frame's tp, fp and fn."""
        gt = np.asarray(gt_labels)
        if gt.ndim != 2:
            raise DataError(f'anomaly labels must be an [H, W] map, got shape {list(gt.shape)}')
        gt = _gt_labels(gt, gt.shape, 'the anomaly labels')
        boxes = np.array([_as_box(b) for b in pred_boxes], dtype=np.int64).reshape(-1, 4)
        gt_boxes, areas = _component_boxes(gt == 1)
        small = areas < self.min_gt_area
        kept, ignored = gt_boxes[~small], gt_boxes[small]
        iou = _box_iou(boxes, kept)
        matched_pred = np.zeros(len(boxes), dtype=bool)
        matched_gt = np.zeros(len(kept), dtype=bool)
        pi, gi = np.nonzero(iou >= self.iou_threshold)
        for k in np.lexsort((gi, pi, -iou[pi, gi])).tolist():
            if not matched_pred[pi[k]] and not matched_gt[gi[k]]:
                matched_pred[pi[k]] = matched_gt[gi[k]] = True
        unmatched = ~matched_pred
        if ignored.size:
            unmatched &= ~(_box_iou(boxes, ignored) >= self.iou_threshold).any(axis=1)
        if boxes.size:
            unmatched &= self._ignored_share(boxes, gt) <= self.max_ignored_fraction
        tp, fp = int(matched_pred.sum()), int(unmatched.sum())
        fn = int(len(kept) - matched_gt.sum())
        self.tp += tp
        self.fp += fp
        self.fn += fn
        self.n_frames += 1
        self.n_boxes += len(boxes)
        self.n_pred_ignored += len(boxes) - tp - fp
        self.n_gt_ignored += int(small.sum())
        return {'tp': tp, 'fp': fp, 'fn': fn, 'n_gt': len(kept), 'n_pred': len(boxes)}

    @staticmethod
    def _ignored_share(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
        """Share of each box's pixels (clipped to the map) on ignored labels: float64 [P]."""
        height, width = gt.shape
        shares = np.ones(len(boxes))  # a box wholly outside the map counts as ignored
        for i, (x, y, w, h) in enumerate(boxes.tolist()):
            window = gt[max(y, 0):min(y + h, height), max(x, 0):min(x + w, width)]
            if window.size:
                shares[i] = 1.0 - np.count_nonzero((window == 0) | (window == 1)) / window.size
        return shares

    def compute(self) -> dict[str, Any]:
        if self.n_frames == 0:
            raise DataError('BoxMetrics holds no frame; add frames with update() first')
        n_gt = self.tp + self.fn
        return {
            'protocol': self.protocol, 'iou_threshold': self.iou_threshold,
            'recall': _mean(self.tp, n_gt), 'precision': _mean(self.tp, self.tp + self.fp),
            'f1': _mean(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            'tp': self.tp, 'fp': self.fp, 'fn': self.fn, 'n_gt': n_gt,
            'n_gt_ignored': self.n_gt_ignored, 'n_boxes': self.n_boxes,
            'n_pred_ignored': self.n_pred_ignored, 'n_frames': self.n_frames,
            'objects_per_frame': self.n_boxes / self.n_frames,
            'false_positives_per_frame': self.fp / self.n_frames,
        }
