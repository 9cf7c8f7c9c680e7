"""Metrics against scikit-learn (the oracle) and hand-computed cases; torch-free."""

from hypothesis import given, settings
from hypothesis import strategies as st
import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    jaccard_score,
    roc_auc_score,
    roc_curve,
)

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.metrics import (
    AgreementShapeError,
    ConfusionMatrix,
    OpenSetConfusion,
    PerImageOOD,
    PooledOOD,
    agreement_figures,
    ood_metrics,
    open_set_prediction,
    threshold_at_fpr,
    threshold_at_tpr,
)


def oracle(scores, labels, strict=False):
    """sklearn AP, AUROC, FPR95 and its threshold on the pixels labelled 0 or 1."""
    scores, labels = np.ravel(scores), np.ravel(labels)
    keep = (labels == 0) | (labels == 1)
    s, y = scores[keep], labels[keep]
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    first = np.flatnonzero(tpr > 0.95 if strict else tpr >= 0.95)[0]
    return (average_precision_score(y, s), roc_auc_score(y, s), fpr[first], thresholds[first])


def assert_matches_oracle(scores, labels, fpr_rule='tpr>=0.95'):
    strict = fpr_rule == 'tpr>0.95'
    ap, auroc, fpr95, tau = oracle(scores, labels, strict)
    result = ood_metrics(scores, labels, fpr_rule)
    assert result['ap'] == pytest.approx(ap, abs=1e-9)
    assert result['auroc'] == pytest.approx(auroc, abs=1e-9)
    assert result['fpr95'] == pytest.approx(fpr95, abs=1e-9)
    assert result['fpr95_rule'] == fpr_rule
    assert threshold_at_tpr(scores, labels, strict=strict) == tau
    return result


@pytest.mark.parametrize('fpr_rule', ['tpr>=0.95', 'tpr>0.95'])
@pytest.mark.parametrize('size,seed', [(7, 0), (100, 1), (1000, 2), (20000, 3)])
def test_ood_metrics_equal_sklearn_on_random_scores(size, seed, fpr_rule):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size)
    labels[:2] = (0, 1)
    scores = rng.normal(size=size) + 1.5 * labels
    result = assert_matches_oracle(scores.astype(np.float32), labels, fpr_rule)
    assert result['n_anomaly'] + result['n_inlier'] == size


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ood_metrics_equal_sklearn_with_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 5000)
    scores = rng.choice([-1.0, 0.25, 3.0], size=5000) + (labels * rng.integers(0, 2, 5000))
    assert np.unique(scores).size <= 6
    for rule in ('tpr>=0.95', 'tpr>0.95'):
        assert_matches_oracle(scores, labels, rule)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(0, 2)), min_size=2, max_size=60))
def test_ood_metrics_equal_sklearn_property(pairs):
    scores = np.array([p[0] for p in pairs], dtype=np.float64) / 2
    labels = np.array([p[1] for p in pairs], dtype=np.uint8)
    if not ((labels == 0).any() and (labels == 1).any()):
        with pytest.raises(DataError):
            ood_metrics(scores, labels)
        return
    for rule in ('tpr>=0.95', 'tpr>0.95'):
        assert_matches_oracle(scores, labels, rule)


def test_all_tied_scores():
    labels = np.array([0, 1, 1, 0, 0, 1, 0, 0])
    result = assert_matches_oracle(np.full(8, 0.3), labels)
    assert result['auroc'] == 0.5
    assert result['ap'] == pytest.approx(3 / 8)
    assert result['fpr95'] == 1.0


def test_fpr95_rules_differ_on_exact_plateau():
    # 19 of 20 anomalies score above every inlier: TPR is exactly 0.95 at FPR 0; the last
    # anomaly (score 0) lies below half of the inliers (score 5)
    anomalies = np.r_[np.arange(10.0, 29.0), 0.0]
    inliers = np.r_[np.full(10, 5.0), np.full(10, -1.0)]
    scores = np.r_[anomalies, inliers]
    labels = np.r_[np.ones(20, int), np.zeros(20, int)]
    loose = assert_matches_oracle(scores, labels, 'tpr>=0.95')
    strict = assert_matches_oracle(scores, labels, 'tpr>0.95')
    assert loose['fpr95'] == 0.0
    assert strict['fpr95'] == 0.5
    assert threshold_at_tpr(scores, labels) == 10.0
    assert threshold_at_tpr(scores, labels, strict=True) == 0.0
    pooled = {rule: PooledOOD(rule) for rule in ('tpr>=0.95', 'tpr>0.95')}
    for accumulator in pooled.values():
        accumulator.update(scores, labels)
    assert pooled['tpr>=0.95'].compute()['fpr95'] == 0.0
    assert pooled['tpr>0.95'].compute()['fpr95'] == 0.5
    assert pooled['tpr>=0.95'].threshold_at_tpr() == 10.0
    assert pooled['tpr>=0.95'].threshold_at_tpr(strict=True) == 0.0


def test_other_label_values_are_ignored():
    rng = np.random.default_rng(5)
    labels = rng.choice(np.array([0, 1, 2, 255], dtype=np.uint8), size=(40, 50))
    scores = rng.random((40, 50)).astype(np.float32) + labels % 2
    kept = labels < 2
    full = assert_matches_oracle(scores, labels)
    assert full == ood_metrics(scores[kept], labels[kept])
    assert full['n_inlier'] + full['n_anomaly'] == kept.sum()


def test_nan_and_inf_scores_raise_with_count_and_first_index():
    scores = np.linspace(0.0, 1.0, 12).reshape(3, 4)
    labels = np.array([[0, 1, 0, 1]] * 3)
    scores[1, 2] = np.nan
    scores[2, 0] = np.inf
    with pytest.raises(DataError, match=r'2 of 12 .*NaN or inf \(first at flat index 6') as info:
        ood_metrics(scores, labels)
    assert isinstance(info.value, ValueError)
    for accumulator in (PerImageOOD(), PooledOOD()):
        with pytest.raises(DataError, match='NaN or inf'):
            accumulator.update(scores, labels)
    labels[1, 2] = labels[2, 0] = 255  # non-finite scores at ignored pixels are not evaluated
    assert_matches_oracle(np.nan_to_num(scores, posinf=0.0), labels)
    ood_metrics(scores, labels)


def test_missing_class_and_bad_input_raise_domain_errors():
    with pytest.raises(DataError, match='0 anomaly and 3 inlier'):
        ood_metrics([0.1, 0.2, 0.3], [0, 0, 0])
    with pytest.raises(DataError, match='2 anomaly and 0 inlier'):
        ood_metrics([0.1, 0.2, 0.3], [1, 1, 255])
    with pytest.raises(DataError, match='same shape'):
        ood_metrics(np.zeros(4), np.zeros(5, int))
    with pytest.raises(DataError, match='integers'):
        ood_metrics(np.zeros(4), np.zeros(4))
    with pytest.raises(ConfigError, match='unknown FPR95 rule'):
        ood_metrics([0.1, 0.2], [0, 1], fpr_rule='closest')
    with pytest.raises(ConfigError, match='TPR'):
        threshold_at_tpr([0.1, 0.2], [0, 1], tpr=1.0, strict=True)
    with pytest.raises(DataError, match='PooledOOD needs both'):
        PooledOOD().compute()
    with pytest.raises(ConfigError, match='bits'):
        PooledOOD(bits=30)


def test_per_image_protocol_skips_and_counts_images():
    rng = np.random.default_rng(11)
    per_image = PerImageOOD()
    expected = []
    for _ in range(3):
        labels = rng.integers(0, 2, (16, 16))
        scores = rng.normal(size=(16, 16)) + labels
        result = per_image.update(scores, labels)
        expected.append(ood_metrics(scores, labels))
        assert result['ap'] == expected[-1]['ap']
    assert per_image.update(rng.random((16, 16)), np.zeros((16, 16), int)) is None
    assert per_image.update(rng.random((16, 16)), np.full((16, 16), 255, np.uint8)) is None
    assert per_image.update(rng.random((16, 16)), np.ones((16, 16), int)) is None
    summary = per_image.compute()
    assert summary['protocol'] == 'per-image'
    assert (summary['n_images'], summary['n_skipped']) == (3, 3)
    assert (summary['n_no_anomaly'], summary['n_only_anomaly']) == (2, 1)
    for key in ('ap', 'auroc', 'fpr95'):
        assert summary[key] == pytest.approx(np.mean([e[key] for e in expected]), abs=1e-12)
    with pytest.raises(DataError, match='1 without anomalies, 0 with only'):
        empty = PerImageOOD()
        empty.update(np.zeros(3), np.zeros(3, int))
        empty.compute()


def _distribution(name, rng, size):
    labels = (rng.random(size) < 0.1).astype(np.uint8)
    n_anomaly = int(labels.sum())
    scores = np.empty(size)
    if name == 'dh_unbounded':  # DenseHybrid-like log-ratio, in [-50, 10]
        scores[labels == 0] = rng.normal(-22.0, 6.0, size - n_anomaly)
        scores[labels == 1] = rng.normal(-8.0, 5.0, n_anomaly)
        scores = np.clip(scores, -50.0, 10.0)
    elif name == 'unit_interval':  # probability-like, in [0, 1]
        scores[labels == 0] = rng.beta(1.0, 6.0, size - n_anomaly)
        scores[labels == 1] = rng.beta(3.0, 2.0, n_anomaly)
    elif name == 'near_zero':  # both classes spread over many decades around 0
        scores[labels == 0] = rng.normal(0.0, 1e-3, size - n_anomaly)
        scores[labels == 1] = rng.normal(5e-4, 1e-3, n_anomaly)
    elif name == 'heavy_ties':  # 3 distinct values: binning must be exact
        scores = rng.choice([-4.0, 0.5, 7.0], size) + 2.0 * labels * (rng.random(size) < 0.5)
    labels[rng.random(size) < 0.02] = 255  # void pixels
    return scores.astype(np.float32), labels


@pytest.mark.parametrize('name', ['dh_unbounded', 'unit_interval', 'near_zero', 'heavy_ties'])
def test_pooled_matches_exact_within_bound(name):
    rng = np.random.default_rng(len(name))
    scores, labels = _distribution(name, rng, 200_000)
    pooled = PooledOOD()
    for image_scores, image_labels in zip(np.split(scores, 8), np.split(labels, 8), strict=True):
        pooled.update(image_scores.reshape(100, -1), image_labels.reshape(100, -1))
    result = pooled.compute()
    ap, auroc, fpr95, tau = oracle(scores, labels)
    assert result['protocol'] == 'pooled' and result['n_images'] == 8
    assert abs(result['ap'] - ap) <= min(1e-3, result['ap_bound'] + 1e-12)
    assert abs(result['auroc'] - auroc) <= min(1e-4, result['auroc_bound'] + 1e-12)
    assert 0.0 <= result['fpr95'] - fpr95 <= result['fpr95_bound'] + 1e-12
    pooled_tau = pooled.threshold_at_tpr()
    assert pooled_tau <= tau and abs(pooled_tau - tau) <= 1e-3 * abs(tau) + 1e-30
    kept = labels < 2
    assert (scores[kept & (labels == 1)] >= pooled_tau).mean() >= 0.95
    if name == 'heavy_ties':  # one distinct score per bin: the binned curve is the exact one
        for key, value in zip(('ap', 'auroc', 'fpr95'), (ap, auroc, fpr95), strict=True):
            assert result[key] == pytest.approx(value, abs=1e-12)
    else:
        assert result['fpr95_bound'] < 1e-3


def test_pooled_bound_holds_for_adversarial_order_inside_one_bin():
    # anomalies above inliers, all within one bin (relative width 4.9e-4): exact AP 1, binned 0.5
    scores = np.float32(1.0) + np.arange(20, dtype=np.float32) * np.float32(1e-6)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    pooled = PooledOOD()
    pooled.update(scores, labels)
    result = pooled.compute()
    exact = ood_metrics(scores, labels)
    assert exact['ap'] == 1.0 and result['ap'] == 0.5
    assert abs(result['ap'] - exact['ap']) <= result['ap_bound']
    assert abs(result['auroc'] - exact['auroc']) <= result['auroc_bound'] == 0.5
    assert result['fpr95'] - exact['fpr95'] == result['fpr95_bound'] == 1.0


def test_pooled_state_does_not_grow_with_pixels():
    rng = np.random.default_rng(3)
    pooled = PooledOOD()

    def state_bytes():
        return sum(v.nbytes for v in vars(pooled).values() if isinstance(v, np.ndarray))

    before = (pooled.state_nbytes, state_bytes())
    assert before[0] == 2 * 8 * 2**20
    for size in (10, 10_000, 300_000):
        pooled.update(rng.normal(size=size), rng.integers(0, 2, size))
        assert (pooled.state_nbytes, state_bytes()) == before
    assert pooled.compute()['n_anomaly'] + pooled.compute()['n_inlier'] == 310_010


def test_pooled_signed_zero_and_extremes_are_ordered():
    # -0.0 and 0.0 tie; below 1.2e-38 (subnormal) bins are absolute, 5.7e-42 wide
    scores = np.array([-0.0, 0.0, -3e38, 3e38, -1e-37, 1e-37, -1.0, 1.0], dtype=np.float32)
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    pooled = PooledOOD()
    pooled.update(scores, labels)
    exact = ood_metrics(scores, labels)
    result = pooled.compute()
    for key in ('ap', 'auroc', 'fpr95'):
        assert result[key] == pytest.approx(exact[key], abs=1e-12)
    with pytest.raises(DataError, match='float32 range'):
        pooled.update(np.array([1e39, 0.0]), np.array([1, 0]))


@pytest.mark.parametrize('seed', [0, 1])
def test_confusion_matrix_equals_sklearn(seed):
    rng = np.random.default_rng(seed)
    k = 5
    confusion = ConfusionMatrix(k)
    targets, preds = [], []
    for _ in range(3):
        target = rng.integers(0, k - 1, (20, 30)).astype(np.uint8)  # class 4 never in target
        target[rng.random((20, 30)) < 0.1] = 255
        pred = rng.integers(0, k - 1, (20, 30))  # nor in prediction: its IoU is NaN
        confusion.update(pred, target)
        targets.append(target.ravel())
        preds.append(pred.ravel())
    target, pred = np.concatenate(targets), np.concatenate(preds)
    keep = target != 255
    expected = confusion_matrix(target[keep], pred[keep], labels=range(k))
    np.testing.assert_array_equal(confusion.matrix, expected)
    result = confusion.compute()
    iou = jaccard_score(target[keep], pred[keep], labels=range(k - 1), average=None)
    np.testing.assert_allclose(result['iou'][:k - 1], iou, atol=1e-12)
    assert np.isnan(result['iou'][k - 1])
    assert result['miou'] == pytest.approx(iou.mean(), abs=1e-12)
    assert result['pixel_accuracy'] == pytest.approx(accuracy_score(target[keep], pred[keep]))
    assert result['n_pixels'] == keep.sum()


def test_confusion_matrix_rejects_bad_ids():
    confusion = ConfusionMatrix(3)
    with pytest.raises(DataError, match=r'target labels .* found \[3, 7\]; map void'):
        confusion.update(np.zeros(4, int), np.array([0, 3, 7, 255]))
    with pytest.raises(DataError, match=r'predicted labels .* found \[-1\]'):
        confusion.update(np.array([0, -1, 0, 0]), np.array([0, 1, 2, 255]))
    with pytest.raises(DataError, match='integer'):
        confusion.update(np.zeros(4), np.zeros(4, int))
    with pytest.raises(ConfigError, match='ignore_index 2'):
        ConfusionMatrix(3, ignore_index=2)
    with pytest.raises(DataError, match='no counted pixel'):
        confusion.compute()


def test_open_set_iou_hand_made_three_classes():
    # K = 3 inlier classes, anomaly = 3, void = 255; tau = 5 flags indices 1, 4, 7 (and void 9)
    target = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3, 255])
    pred = np.array([0, 0, 1, 1, 1, 2, 0, 2, 0, 1])
    scores = np.array([0, 9, 0, 0, 9, 0, 0, 9, 0, 9], dtype=np.float32)
    open_set = OpenSetConfusion(3, tau=5.0)
    open_set.update(pred, scores, target)
    result = open_set.compute()
    # class 0: TP 1, FN 2 (one predicted anomaly, one predicted 1), FP 2 (a 2 and an anomaly)
    # class 1: TP 1, FN 1 (predicted anomaly), FP 1; class 2: TP 1, FN 1, FP 0 (its anomaly
    # pixel was flagged); anomaly: TP 1, FN 1 (predicted 0), FP 2 (inliers flagged)
    assert result['iou'] == pytest.approx([1 / 5, 1 / 3, 1 / 2])
    assert result['open_miou'] == pytest.approx(31 / 90)
    assert result['anomaly_iou'] == pytest.approx(1 / 4)
    assert result['n_pixels'] == 9 and result['tau'] == 5.0
    assert open_set.matrix.shape == (4, 4)


def test_open_set_prediction_flags_strictly_above_tau():
    pred = np.array([[0, 1], [2, 1]])
    scores = np.array([[0.5, 0.7], [0.2, 0.9]])
    np.testing.assert_array_equal(open_set_prediction(pred, scores, 0.7, 3), [[0, 1], [2, 3]])
    with pytest.raises(DataError, match='NaN or inf'):
        open_set_prediction(pred, np.array([[0.5, np.nan], [0.2, 0.9]]), 0.7, 3)
    with pytest.raises(DataError, match=r'found \[3\]'):
        open_set_prediction(np.array([[0, 3], [2, 1]]), scores, 0.7, 3)


# ---- threshold_at_fpr (false-alarm-rate thresholds of the sidecar: fpr1, fpr0.1) -----------


def test_threshold_at_fpr_hand_made():
    scores = np.arange(100, dtype=np.float64)  # 0..99
    assert threshold_at_fpr(scores, 0.01) == 98.0  # only 99 lies above: 1 of 100 = 1%
    assert threshold_at_fpr(scores, 0.05) == 94.0  # 95..99 above
    assert threshold_at_fpr(scores, 0.001) == 99.0  # nothing may lie above
    assert threshold_at_fpr(scores, 0.29) == 70.0  # 0.29 * 100 rounds to 29, not 28
    assert threshold_at_fpr(scores.reshape(10, 10)[::-1], 0.01) == 98.0  # any shape or order
    # ties at tau stay unflagged: the achieved rate may be lower than asked
    assert threshold_at_fpr(np.full(100, 5.0), 0.01) == 5.0
    tied = np.r_[np.zeros(90), np.full(10, 3.0)]
    assert threshold_at_fpr(tied, 0.05) == 3.0 and (tied > 3.0).mean() == 0.0


@pytest.mark.parametrize('seed', [0, 1, 2])
@pytest.mark.parametrize('fpr', [0.01, 0.001, 0.2])
def test_threshold_at_fpr_is_the_lowest_threshold_within_the_rate(seed, fpr):
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=5000).round(2)  # with ties
    tau = threshold_at_fpr(scores, fpr)
    assert np.mean(scores > tau) <= fpr
    lower = scores[scores < tau]
    if lower.size:  # the next lower score value flags too many
        assert np.mean(scores > lower.max()) > fpr
    # sklearn's ROC: at the thresholds of roc_curve, FPR = share of inliers >= threshold
    labels = np.r_[np.zeros(scores.size, int), 1]
    fpr_curve, _, thresholds = roc_curve(labels, np.r_[scores, 1e9], drop_intermediate=False)
    above_tau = thresholds > tau
    assert fpr_curve[above_tau].max() <= fpr


def test_threshold_at_fpr_rejects_bad_input():
    with pytest.raises(ConfigError, match=r'\(0, 1\)'):
        threshold_at_fpr(np.arange(10.0), 0.0)
    with pytest.raises(ConfigError, match=r'\(0, 1\)'):
        threshold_at_fpr(np.arange(10.0), 1.5)
    with pytest.raises(DataError, match='empty'):
        threshold_at_fpr(np.array([]), 0.01)
    with pytest.raises(DataError, match='1 of 3 inlier scores are NaN'):
        threshold_at_fpr(np.array([0.0, np.nan, 1.0]), 0.01)
    with pytest.raises(DataError, match='no inlier'):
        PooledOOD().threshold_at_fpr(0.01)


@pytest.mark.parametrize('name', ['dh_unbounded', 'unit_interval', 'heavy_ties'])
@pytest.mark.parametrize('fpr', [0.01, 0.001])
def test_pooled_threshold_at_fpr_is_within_one_bin_of_exact(name, fpr):
    rng = np.random.default_rng(7)
    scores, labels = _distribution(name, rng, 100_000)
    pooled = PooledOOD()
    for image_scores, image_labels in zip(np.split(scores, 4), np.split(labels, 4), strict=True):
        pooled.update(image_scores, image_labels)
    inlier = scores[labels == 0]
    exact = threshold_at_fpr(inlier, fpr)
    tau = pooled.threshold_at_fpr(fpr)
    assert np.mean(inlier > tau) <= fpr  # the promised rate holds on the added pixels
    assert exact <= tau <= exact + 2.0**-11 * abs(exact) + 1e-30  # bits=20: 2**-11 relative
    if name == 'heavy_ties':  # the bins hold single values: the upper edge is the next float
        assert np.mean(inlier > tau) == np.mean(inlier > exact)


def test_pooled_threshold_at_fpr_uses_inliers_of_images_without_anomalies():
    pooled = PooledOOD()
    pooled.update(np.arange(100, dtype=np.float32), np.zeros(100, int))
    tau = pooled.threshold_at_fpr(0.01)
    assert 98.0 <= tau <= 98.0 * (1 + 2.0**-11)
    pooled.update(np.array([1.0, 2.0, 3.0]), np.array([1, 1, 255]))
    assert pooled.pixel_counts == (100, 2)
    top = PooledOOD()
    top.update(np.array([np.finfo(np.float32).max] * 3, dtype=np.float32), np.zeros(3, int))
    assert np.isfinite(top.threshold_at_fpr(0.01))


# ---- agreement_figures (export parity, engine verification) ----------------------------------

def _agreement_outputs():
    labels = np.arange(20, dtype=np.int32).reshape(1, 4, 5) % 3
    score = np.arange(20, dtype=np.float32).reshape(1, 4, 5)
    return labels, score


def test_agreement_figures_known_answer():
    labels, score = _agreement_outputs()
    labels2, score2 = labels.copy(), score.copy()
    labels2[0, 0, :2] += 1  # 2 of 20 pixels change class
    score2[0, 1, 4] += 1.0  # pixel 9: 9 -> 10 crosses the threshold 9.5
    score2[0, 2, 0] -= 0.5  # pixel 10: 10 -> 9.5 is not above 9.5 either
    figures = agreement_figures((labels, score), (labels2, score2), threshold=9.5)
    std = np.sqrt((20**2 - 1) / 12)  # std of 0..19
    assert figures['pixels'] == 20
    assert figures['label_agreement'] == pytest.approx(18 / 20)
    assert figures['mask_agreement'] == pytest.approx(18 / 20)
    assert figures['max_score_diff'] == pytest.approx(1.0)
    assert figures['mean_score_diff'] == pytest.approx(1.5 / 20)
    assert figures['score_std'] == pytest.approx(std)
    assert figures['score_diff_over_std'] == pytest.approx(1.0 / std)
    assert figures['mean_score_diff_over_std'] == pytest.approx(1.5 / 20 / std)
    assert figures['nonfinite_fraction'] == 0.0
    assert all(type(value) is float for value in figures.values())


def test_agreement_figures_identical_and_constant():
    labels, score = _agreement_outputs()
    same = agreement_figures((labels, score), (labels, score), threshold=0.0)
    assert same['label_agreement'] == 1.0 and same['mask_agreement'] == 1.0
    assert same['max_score_diff'] == 0.0 and same['score_diff_over_std'] == 0.0
    zero = np.zeros_like(score)
    assert agreement_figures((labels, zero), (labels, zero), 0.0)['score_diff_over_std'] == 0.0
    off = agreement_figures((labels, zero), (labels, zero + 0.25), 0.0)
    assert off['score_diff_over_std'] == np.inf and off['mean_score_diff_over_std'] == np.inf
    assert off['mask_agreement'] == 0.0 and off['max_score_diff'] == 0.25


def test_agreement_figures_nonfinite_candidate_scores():
    labels, score = _agreement_outputs()
    broken = score.copy()
    broken[0, 3, 3] = np.nan
    broken[0, 0, 0] = np.inf
    figures = agreement_figures((labels, score), (labels, broken), threshold=9.5)
    assert figures['nonfinite_fraction'] == pytest.approx(2 / 20)
    assert figures['max_score_diff'] == np.inf and figures['score_diff_over_std'] == np.inf
    assert figures['mean_score_diff'] == np.inf


def test_agreement_figures_refuse_mismatched_or_empty_outputs():
    labels, score = _agreement_outputs()
    with pytest.raises(AgreementShapeError, match=r'labels \[1, 4, 4\].*reference labels'):
        agreement_figures((labels, score), (labels[..., :4], score[..., :4]), 0.0)
    with pytest.raises(ValueError, match='scores'):
        agreement_figures((labels, score), (labels, score[..., :4]), 0.0)
    empty = np.zeros((0, 4, 5), np.float32)
    with pytest.raises(AgreementShapeError, match='no pixels'):
        agreement_figures((empty, empty), (empty, empty), 0.0)


def test_pooled_curve_points_known_answer():
    acc = PooledOOD()
    acc.update(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    points = acc.curve_points()
    # highest score first: 0.8 (anomaly), 0.4 (inlier), 0.35 (anomaly), 0.1 (inlier)
    np.testing.assert_allclose(points['tpr'], [0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(points['fpr'], [0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(points['precision'], [1.0, 0.5, 2 / 3, 0.5])
    ends = acc.curve_points(max_points=2)
    np.testing.assert_allclose(ends['tpr'], [0.5, 1.0])
    np.testing.assert_allclose(ends['fpr'], [0.0, 1.0])
    assert acc.curve_points(max_points=10)['tpr'].size == 4
    with pytest.raises(ConfigError, match='max_points'):
        acc.curve_points(max_points=1)
