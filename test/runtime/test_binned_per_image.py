"""BinnedPerImageOOD, the replay's per-image protocol: each frame's curve from its own histogram
in PooledOOD's binning (no sort) equals the exact PerImageOOD within the stated bounds."""

import numpy as np
import pytest

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.metrics import (
    BinnedPerImageOOD,
    PerImageOOD,
    PooledOOD,
    frame_histogram,
    ood_metrics,
)

KEYS = ('ap', 'auroc', 'fpr95')


def _frame(name: str, rng: np.random.Generator, shape: tuple[int, int]
           ) -> tuple[np.ndarray, np.ndarray]:
    size = shape[0] * shape[1]
    labels = (rng.random(size) < rng.uniform(0.005, 0.2)).astype(np.uint8)
    n_anomaly = int(labels.sum())
    scores = np.empty(size)
    if name == 'dh_unbounded':  # DenseHybrid-like log-ratio, in [-50, 10]
        scores[labels == 0] = rng.normal(-22.0, 6.0, size - n_anomaly)
        scores[labels == 1] = rng.normal(-12.0, 6.0, n_anomaly)
        scores = np.clip(scores, -50.0, 10.0)
    elif name == 'unit_interval':  # probability-like, in [0, 1]
        scores[labels == 0] = rng.beta(1.0, 4.0, size - n_anomaly)
        scores[labels == 1] = rng.beta(2.0, 2.0, n_anomaly)
    elif name == 'near_zero':  # both classes over many decades around 0
        scores[labels == 0] = rng.normal(0.0, 1e-3, size - n_anomaly)
        scores[labels == 1] = rng.normal(5e-4, 1e-3, n_anomaly)
    elif name == 'heavy_ties':  # 4 distinct values: one score per bin, binning is exact
        scores = rng.choice([-4.0, 0.5, 2.5, 7.0], size) + 2.0 * labels * (rng.random(size) < .5)
    labels[rng.random(size) < 0.02] = 255  # void pixels
    return scores.reshape(shape).astype(np.float32), labels.reshape(shape)


@pytest.mark.parametrize('bits', [20, 12, 10])
@pytest.mark.parametrize('name', ['dh_unbounded', 'unit_interval', 'near_zero', 'heavy_ties'])
def test_binned_equals_exact_within_the_bound_on_random_frames(name: str, bits: int) -> None:
    rng = np.random.default_rng([bits, len(name)])
    exact, binned = PerImageOOD(), BinnedPerImageOOD(bits=bits)
    for _ in range(12):
        scores, labels = _frame(name, rng, (90, 160))
        want, got = exact.update(scores, labels), binned.update(scores, labels)
        for key in KEYS:  # each frame within its own bound
            assert abs(got[key] - want[key]) <= got[f'{key}_bound'] + 1e-12, key
        assert got['fpr95'] >= want['fpr95'] - 1e-12  # binning never lowers FPR95
    mean_exact, mean_binned = exact.compute(), binned.compute()
    for key in KEYS:  # the mean within the mean bound
        assert abs(mean_binned[key] - mean_exact[key]) <= mean_binned[f'{key}_bound'] + 1e-12
    if name == 'heavy_ties':
        for key in KEYS:
            assert mean_binned[key] == pytest.approx(mean_exact[key], abs=1e-12)
    elif bits == 20:  # the replay's binning: far below the worst case in practice
        assert abs(mean_binned['ap'] - mean_exact['ap']) < 1e-3
        assert abs(mean_binned['auroc'] - mean_exact['auroc']) < 1e-4
    assert mean_binned['bins'] == 1 << bits and mean_binned['n_images'] == 12


def test_the_bound_holds_for_adversarial_order_inside_one_bin() -> None:
    # anomalies above inliers, all within one bin: exact AP 1, binned 0.5
    scores = np.float32(1.0) + np.arange(20, dtype=np.float32) * np.float32(1e-6)
    labels = np.r_[np.zeros(10, int), np.ones(10, int)]
    result = BinnedPerImageOOD().update(scores, labels)
    exact = ood_metrics(scores, labels)
    assert exact['ap'] == 1.0 and result['ap'] == 0.5
    assert abs(result['ap'] - exact['ap']) <= result['ap_bound']
    assert abs(result['auroc'] - exact['auroc']) <= result['auroc_bound'] == 0.5
    assert result['fpr95'] - exact['fpr95'] == result['fpr95_bound'] == 1.0


def test_skipped_images_and_summary_match_the_exact_protocol() -> None:
    rng = np.random.default_rng(11)
    exact, binned = PerImageOOD(), BinnedPerImageOOD()
    frames = [(rng.normal(size=(16, 16)), rng.integers(0, 2, (16, 16))) for _ in range(3)]
    frames += [(rng.random((16, 16)), np.zeros((16, 16), int)),
               (rng.random((16, 16)), np.full((16, 16), 255, np.uint8)),
               (rng.random((16, 16)), np.ones((16, 16), int))]
    for scores, labels in frames:
        assert (exact.update(scores, labels) is None) == (binned.update(scores, labels) is None)
    want, got = exact.compute(), binned.compute()
    for key, value in want.items():
        if key in KEYS:
            assert abs(got[key] - value) <= got[f'{key}_bound'], key
        else:
            assert got[key] == value, key
    assert set(got) - set(want) == {'bins', 'ap_bound', 'auroc_bound', 'fpr95_bound'}
    with pytest.raises(DataError, match='1 without anomalies, 0 with only'):
        empty = BinnedPerImageOOD()
        empty.update(np.zeros(3), np.zeros(3, int))
        empty.compute()


def test_one_histogram_feeds_the_pooled_and_the_per_image_metrics() -> None:
    rng = np.random.default_rng(5)
    pooled, alone, shared = PooledOOD(bits=16), BinnedPerImageOOD(bits=16), BinnedPerImageOOD(
        bits=16)
    reference = PooledOOD(bits=16)
    for _ in range(4):
        scores, labels = _frame('dh_unbounded', rng, (40, 60))
        histogram = pooled.update(scores, labels)
        assert shared.add(histogram) == alone.update(scores, labels)
        reference.add(frame_histogram(scores, labels, bits=16))
    assert shared.compute() == alone.compute()
    assert pooled.compute() == reference.compute()
    with pytest.raises(ConfigError, match='histogram of 20 bits'):
        shared.add(frame_histogram(scores, labels))
    with pytest.raises(ConfigError, match='histogram of 20 bits cannot join PooledOOD of 16'):
        pooled.add(frame_histogram(scores, labels))
    with pytest.raises(ConfigError, match=r'bits must be an int in \[10, 24\]'):
        BinnedPerImageOOD(bits=25)


def test_a_frame_is_binned_without_sorting(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sort(*args: object, **kwargs: object) -> None:
        raise AssertionError('the binned per-image protocol sorts nothing')

    for name in ('argsort', 'sort', 'unique', 'lexsort', 'partition', 'argpartition'):
        monkeypatch.setattr(np, name, no_sort)
    scores, labels = _frame('unit_interval', np.random.default_rng(2), (30, 40))
    binned = BinnedPerImageOOD()
    assert binned.update(scores, labels)['ap'] > 0
    assert binned.compute()['n_images'] == 1
