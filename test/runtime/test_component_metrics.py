"""Component-level metrics (SegmentMeIfYouCan) and box metrics: hand-made masks with known
answers, and a cross-check against a set-based implementation of the paper's formulas."""

from collections import deque
from fractions import Fraction
import json
import math

import numpy as np
import pytest

from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.metrics import (
    SIOU_PERCENTS,
    SMIYC_OBSTACLE_TRACK,
    BoxMetrics,
    ComponentMetrics,
)
from anomaly_seg_node.objects import ObjectParams, find_objects_with_ids

VOID = 255


def frame(height=10, width=12):
    return np.zeros((height, width), dtype=np.uint8), np.zeros((height, width), dtype=bool)


def one_frame(pred, gt, **kwargs):
    metrics = ComponentMetrics(**kwargs)
    per_frame = metrics.update(pred, gt)
    return per_frame, metrics.compute()


def taus_at_most(value):
    """How many of the 11 thresholds tau satisfy tau <= value."""
    return sum(Fraction(p, 100) <= value for p in SIOU_PERCENTS)


def test_split_object_one_gt_two_fragments():
    gt, pred = frame()
    gt[2:6, 2:8] = 1  # 24 pixels
    pred[2:6, 2:4] = True  # left fragment, 8 pixels
    pred[2:6, 6:10] = True  # right fragment: 8 on the object, 8 on inlier pixels
    per_frame, result = one_frame(pred, gt)
    # sIoU = |k & K^| / (|k| + |K^ on inliers|) = 16 / (24 + 8)
    assert per_frame['siou'] == [pytest.approx(0.5)]
    assert sorted(per_frame['ppv']) == [pytest.approx(0.5), pytest.approx(1.0)]
    assert result['siou'] == pytest.approx(0.5)
    assert result['ppv'] == pytest.approx(0.75)
    assert (result['n_gt'], result['n_pred']) == (1, 2)
    # TP for tau <= 0.5 (6 values); the right fragment (PPV 0.5) is a FP for tau > 0.5 (5)
    assert result['tp'] == [1] * 6 + [0] * 5
    assert result['fn'] == [0] * 6 + [1] * 5
    assert result['fp'] == [0] * 6 + [1] * 5
    assert result['f1_mean'] == pytest.approx(6 / 11)
    assert (result['f1_25'], result['f1_50'], result['f1_75']) == (1.0, 1.0, 0.0)


def test_one_blob_over_two_touching_objects_scores_both():
    gt, pred = frame()
    gt[2:6, 1:4] = 1  # A: 12 pixels
    gt[2:6, 5:8] = 1  # B: 12 pixels, one inlier column between them
    pred[2:6, 1:8] = True  # one blob of 28 pixels over both and the gap
    per_frame, result = one_frame(pred, gt)
    # sIoU(A) = 12 / |(A | K^) \ B| = 12 / 16: B's pixels do not count against A
    assert per_frame['siou'] == [pytest.approx(0.75)] * 2
    assert per_frame['ppv'] == [pytest.approx(24 / 28)]
    # sIoU of the blob: 24 / (28 + 0 missed object pixels)
    assert per_frame['siou_pred'] == [pytest.approx(24 / 28)]
    assert result['tp'] == [2] * 11  # sIoU 0.75 meets tau = 0.75 exactly
    assert result['fp'] == [0] * 11
    assert result['f1_mean'] == 1.0


def test_empty_frames():
    gt, pred = frame()
    _, result = one_frame(pred, gt)  # neither GT nor prediction
    assert (result['n_frames'], result['n_gt'], result['n_pred']) == (1, 0, 0)
    assert math.isnan(result['siou']) and math.isnan(result['ppv'])
    assert math.isnan(result['f1_mean'])
    assert result['n_frames_without_gt'] == 1

    pred[0:2, 0:2] = True
    pred[6:9, 6:9] = True
    per_frame, result = one_frame(pred, gt)  # no GT, two predicted components
    assert per_frame['ppv'] == [0.0, 0.0]
    assert result['fp'] == [2] * 11 and result['tp'] == [0] * 11
    assert result['ppv'] == 0.0 and math.isnan(result['siou'])
    assert result['f1_mean'] == 0.0

    metrics = ComponentMetrics()  # an empty frame adds nothing to a data set's figures
    gt2, pred2 = frame()
    gt2[2:6, 2:8] = 1
    pred2[2:6, 2:8] = True
    metrics.update(pred2, gt2)
    alone = metrics.compute()
    metrics.update(*frame()[::-1])
    both = metrics.compute()
    assert both['n_frames'] == 2 and both['n_frames_without_gt'] == 1
    for key in ('siou', 'ppv', 'f1_mean', 'tp', 'fn', 'fp'):
        assert both[key] == alone[key]


def test_missed_object_has_siou_zero():
    gt, pred = frame()
    gt[1:3, 1:3] = 1
    per_frame, result = one_frame(pred, gt)
    assert per_frame['siou'] == [0.0]
    assert result['fn'] == [1] * 11 and result['f1_mean'] == 0.0


def test_void_pixels_are_dropped_before_the_predicted_components():
    gt, pred = frame()
    gt[2:6, 1:4] = 1
    gt[:, 5] = VOID  # a void column
    pred[2:6, 1:4] = True
    pred[2:6, 4:8] = True  # bridges over the void column to inlier pixels right of it
    pred[8:10, 8:12] = True
    gt[8:10, 8:12] = VOID  # a prediction wholly on void is not a component
    per_frame, result = one_frame(pred, gt)
    # the void column splits the blob: an exact piece (cols 1..4, 16 px, 12 on the object)
    # and a false piece (cols 6..7, 8 px)
    assert per_frame['n_pred'] == 2
    assert sorted(per_frame['ppv']) == [0.0, pytest.approx(12 / 16)]
    assert per_frame['siou'] == [pytest.approx(12 / 16)]
    assert result['n_pred'] == 2


def test_size_filters_follow_the_benchmark():
    gt, pred = frame(20, 20)
    gt[2:12, 2:12] = 1  # 100 pixels
    gt[15:17, 15:17] = 1  # 4 pixels: ignored with min_gt_area 10
    pred[2:12, 2:12] = True
    pred[15:18, 15:18] = True  # 9 pixels, 4 on the small GT component
    pred[0, 18:20] = True  # 2 pixels: removed with min_pred_area 5
    per_frame, result = one_frame(pred, gt, min_pred_area=5, min_gt_area=10)
    assert result['n_gt_ignored'] == 1 and result['n_pred_removed'] == 1
    assert per_frame['siou'] == [1.0]
    # the 9-pixel prediction keeps only its 5 pixels outside the ignored component: all inlier
    assert sorted(per_frame['ppv']) == [0.0, 1.0]
    assert (result['n_gt'], result['n_pred']) == (1, 2)
    metrics = ComponentMetrics(**SMIYC_OBSTACLE_TRACK)
    assert (metrics.min_pred_area, metrics.min_gt_area) == (50, 10)


def test_update_instances_counts_a_merged_object_once():
    gt, _ = frame()
    gt[2:6, 2:8] = 1
    ids = np.zeros(gt.shape, dtype=np.int32)
    ids[2:6, 2:4] = 7  # one object of two fragments (as find_objects merges them)
    ids[2:6, 6:8] = 7
    ids[8:10, 0:2] = 3
    metrics = ComponentMetrics()
    per_frame = metrics.update_instances(ids, gt)
    assert per_frame['n_pred'] == 2
    assert sorted(per_frame['ppv']) == [0.0, 1.0]
    assert per_frame['siou'] == [pytest.approx(16 / 24)]
    mask_metrics = ComponentMetrics()
    assert mask_metrics.update(ids > 0, gt)['n_pred'] == 3  # the mask has three components


def test_objects_id_map_feeds_component_metrics():
    gt, _ = frame(12, 20)
    gt[3:7, 2:14] = 1
    score = np.zeros(gt.shape, dtype=np.float32)
    score[3:7, 2:6] = 5.0
    score[3:7, 8:14] = 5.0  # gap of 2 columns
    objects, ids = find_objects_with_ids(score, None, ObjectParams(threshold=1.0,
                                                                   merge_distance=2))
    assert len(objects) == 1
    per_frame = ComponentMetrics().update_instances(ids, gt)
    assert per_frame['n_pred'] == 1 and per_frame['ppv'] == [1.0]
    assert per_frame['siou'] == [pytest.approx(40 / 48)]


def test_result_serialises_and_validates():
    gt, pred = frame()
    gt[1:3, 1:3] = 1
    pred[1:3, 1:3] = True
    _, result = one_frame(pred, gt)
    json.dumps(result, allow_nan=False)
    assert result['thresholds'] == [0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75]
    with pytest.raises(DataError, match='threshold the scores'):
        ComponentMetrics().update(pred.astype(np.float32), gt)
    with pytest.raises(DataError, match='same shape'):
        ComponentMetrics().update(pred[:, :5], gt)
    with pytest.raises(DataError, match='integers'):
        ComponentMetrics().update(pred, gt.astype(np.float32))
    with pytest.raises(DataError, match='>= 0'):
        ComponentMetrics().update_instances(np.full(gt.shape, -1), gt)
    with pytest.raises(DataError, match='no frame'):
        ComponentMetrics().compute()
    with pytest.raises(ConfigError, match='min_pred_area'):
        ComponentMetrics(min_pred_area=-1)


# --- an independent implementation of the paper's definitions, with sets -------------------

def components(pixels):
    """8-connected components of a set of (row, col) pixels, by breadth-first search."""
    left, found = set(pixels), []
    while left:
        seed = left.pop()
        queue, comp = deque([seed]), {seed}
        while queue:
            r, c = queue.popleft()
            for dr in (-1, 0, 1):
                for dc in (-1, 0, 1):
                    q = (r + dr, c + dc)
                    if q in left:
                        left.remove(q)
                        comp.add(q)
                        queue.append(q)
        found.append(comp)
    return found


def paper_frame(pred, gt, min_pred_area=0, min_gt_area=0):
    """sIoU of GT components, PPV and sIoU of predicted components, as Fractions."""
    cells = {(r, c) for r in range(gt.shape[0]) for c in range(gt.shape[1])}
    void = {z for z in cells if gt[z] not in (0, 1)}
    gt_comps = components({z for z in cells if gt[z] == 1})
    pred_comps = components({z for z in cells if pred[z] and z not in void})
    pred_comps = [k for k in pred_comps if len(k) >= min_pred_area]
    ignored = set().union(*[k for k in gt_comps if len(k) < min_gt_area])
    gt_comps = [k for k in gt_comps if len(k) >= min_gt_area]
    pred_comps = [k - ignored for k in pred_comps if k - ignored]
    siou = []
    for k in gt_comps:
        k_hat = set().union(*[p for p in pred_comps if p & k])
        others = set().union(*[o for o in gt_comps if o is not k])
        siou.append(Fraction(len(k & k_hat), len((k | k_hat) - others)))
    ppv, siou_pred = [], []
    for p in pred_comps:
        k_of = set().union(*[k for k in gt_comps if k & p])
        others = set().union(*[o for o in pred_comps if o is not p])
        ppv.append(Fraction(len(p & k_of), len(p)))
        siou_pred.append(Fraction(len(p & k_of), len((p | k_of) - others)))
    return siou, ppv, siou_pred


def random_frame(rng, height=18, width=22):
    gt = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.integers(0, 4)):
        r, c = rng.integers(0, height - 2), rng.integers(0, width - 2)
        gt[r:r + rng.integers(1, 7), c:c + rng.integers(1, 7)] = 1
    gt[rng.random((height, width)) < 0.03] = 1
    if rng.random() < 0.5:
        r, c = rng.integers(0, height), rng.integers(0, width)
        gt[r:r + rng.integers(1, 6), c:c + rng.integers(1, 8)] = VOID
    pred = np.roll(gt == 1, (rng.integers(-2, 3), rng.integers(-2, 3)), axis=(0, 1))
    pred ^= rng.random((height, width)) < 0.08
    for _ in range(rng.integers(0, 3)):
        r, c = rng.integers(0, height - 2), rng.integers(0, width - 2)
        pred[r:r + rng.integers(1, 5), c:c + rng.integers(1, 5)] = True
    return pred, gt


@pytest.mark.parametrize('min_pred_area,min_gt_area', [(0, 0), (3, 4)])
def test_agrees_with_the_papers_formulas_on_random_masks(min_pred_area, min_gt_area):
    rng = np.random.default_rng(min_pred_area * 10 + min_gt_area)
    metrics = ComponentMetrics(min_pred_area=min_pred_area, min_gt_area=min_gt_area)
    all_siou, all_ppv, all_siou_pred = [], [], []
    for _ in range(40):
        pred, gt = random_frame(rng)
        siou, ppv, siou_pred = paper_frame(pred, gt, min_pred_area, min_gt_area)
        got = metrics.update(pred, gt)
        assert sorted(got['siou']) == pytest.approx(sorted(float(v) for v in siou), abs=1e-12)
        assert sorted(got['ppv']) == pytest.approx(sorted(float(v) for v in ppv), abs=1e-12)
        assert sorted(got['siou_pred']) == pytest.approx(sorted(float(v) for v in siou_pred),
                                                         abs=1e-12)
        all_siou += siou
        all_ppv += ppv
        all_siou_pred += siou_pred
    result = metrics.compute()
    f1 = []
    for i, pct in enumerate(SIOU_PERCENTS):
        tau = Fraction(pct, 100)
        tp = sum(v >= tau for v in all_siou)
        fn = len(all_siou) - tp
        fp = sum(v < tau for v in all_ppv)
        assert (result['tp'][i], result['fn'][i], result['fp'][i]) == (tp, fn, fp)
        f1.append(Fraction(2 * tp, 2 * tp + fn + fp))
    assert result['f1_mean'] == pytest.approx(float(sum(f1) / len(f1)), abs=1e-12)
    assert result['siou'] == pytest.approx(float(sum(all_siou) / len(all_siou)), abs=1e-12)
    assert result['ppv'] == pytest.approx(float(sum(all_ppv) / len(all_ppv)), abs=1e-12)
    assert result['siou_pred'] == pytest.approx(
        float(sum(all_siou_pred) / len(all_siou_pred)), abs=1e-12)
    assert (result['n_gt'], result['n_pred']) == (len(all_siou), len(all_ppv))
    assert 0 < result['tp'][0] < result['n_gt']  # the random frames are neither trivial case


# --- boxes -----------------------------------------------------------------------------------

def test_box_metrics_known_answers():
    gt = np.zeros((40, 60), dtype=np.uint8)
    gt[5:15, 5:15] = 1  # box (5, 5, 10, 10)
    gt[20:30, 30:50] = 1  # box (30, 20, 20, 10)
    gt[0:10, 40:60] = VOID
    gt[35:37, 2:4] = 1  # 4 pixels: an ignored box with min_gt_area 10
    boxes = [
        (5, 5, 10, 10),  # exact: TP
        (6, 6, 10, 10),  # duplicate of the first object (IoU 0.68): FP, one-to-one
        (30, 20, 8, 10),  # IoU 0.4 with the second object: FP, and that object is a FN
        (42, 1, 10, 6),  # wholly on void: not counted
        (2, 35, 2, 2),  # matches the ignored small component: not counted
    ]
    metrics = BoxMetrics(min_gt_area=10)
    assert metrics.update(boxes, gt) == {'tp': 1, 'fp': 2, 'fn': 1, 'n_gt': 2, 'n_pred': 5}
    metrics.update([], np.zeros((40, 60), dtype=np.uint8))  # an empty frame
    result = metrics.compute()
    assert (result['recall'], result['precision']) == (0.5, pytest.approx(1 / 3))
    assert result['n_pred_ignored'] == 2 and result['n_gt_ignored'] == 1
    assert result['objects_per_frame'] == 2.5 and result['false_positives_per_frame'] == 1.0
    json.dumps(result, allow_nan=False)


def test_box_matching_prefers_the_highest_iou_and_takes_objects():
    gt = np.zeros((30, 30), dtype=np.uint8)
    gt[5:15, 5:15] = 1
    worse, better = (5, 5, 10, 12), (5, 5, 10, 10)
    metrics = BoxMetrics()
    assert metrics.update([worse, better], gt)['tp'] == 1
    objects, _ = find_objects_with_ids(gt.astype(np.float32), None, ObjectParams(threshold=0.5))
    assert BoxMetrics().update(objects, gt) == {'tp': 1, 'fp': 0, 'fn': 0, 'n_gt': 1,
                                                'n_pred': 1}
    with pytest.raises(DataError, match='positive width'):
        BoxMetrics().update([(1, 1, 0, 3)], gt)
    with pytest.raises(ConfigError, match='iou_threshold'):
        BoxMetrics(iou_threshold=0.0)
    no_gt = BoxMetrics()
    no_gt.update([], np.zeros((5, 5), dtype=np.uint8))
    assert math.isnan(no_gt.compute()['recall'])
