"""Anomaly objects from score maps: hand-made maps with known objects, the merge rule against
a brute-force grouping, the confidence mapping and the overlay drawing."""

import itertools
import math

import numpy as np
import pytest

from anomaly_seg_node.errors import ArtifactError, ConfigError, DataError
from anomaly_seg_node.objects import (
    AnomalyObject,
    ObjectParams,
    draw_objects,
    find_objects,
    find_objects_with_ids,
    fpr_table_from_thresholds,
    object_confidence,
)

ROAD, BUILDING = 0, 5


def scores(height=20, width=30):
    return np.zeros((height, width), dtype=np.float32)


def test_threshold_is_strict_and_boxes_are_exact():
    score = scores()
    score[5:9, 10:15] = 3.0  # rows 5..8, cols 10..14
    score[5, 15] = 2.0  # at the threshold: not anomalous (score > threshold)
    score[12:15, 2:4] = 2.5  # an L shape: a 3 x 2 block and one more pixel
    score[14, 4] = 2.5
    objects = find_objects(score, None, ObjectParams(threshold=2.0))
    assert [o.box for o in objects] == [(10, 5, 5, 4), (2, 12, 3, 3)]
    block, shape_l = objects
    assert (block.area, block.mean_score, block.max_score) == (20, 3.0, 3.0)
    assert (block.centroid_x, block.centroid_y) == (12.0, 6.5)
    assert shape_l.area == 7
    assert shape_l.centroid_x == pytest.approx((2 * 3 + 3 * 3 + 4) / 7)
    assert shape_l.centroid_y == pytest.approx((12 * 2 + 13 * 2 + 14 * 3) / 7)
    assert isinstance(block, AnomalyObject) and block.to_dict()['width'] == 5


def test_mean_and_max_score_of_an_object():
    score = scores()
    score[2:4, 2:4] = [[3.0, 4.0], [5.0, 8.0]]
    (obj,) = find_objects(score, None, ObjectParams(threshold=1.0))
    assert (obj.mean_score, obj.max_score, obj.area) == (5.0, 8.0, 4)


def test_nan_scores_never_belong_to_objects():
    score = np.full((10, 10), np.nan, dtype=np.float32)
    assert find_objects(score, None, ObjectParams(threshold=-1e30)) == []
    score = scores(10, 10)
    score[2:6, 2:6] = 4.0
    score[2:6, 4] = np.nan  # the unseen column splits the square
    objects = find_objects(score, None, ObjectParams(threshold=1.0))
    assert [o.box for o in objects] == [(2, 2, 2, 4), (5, 2, 1, 4)]
    assert all(math.isfinite(o.mean_score) for o in objects)


def test_drivable_restriction_and_margin():
    score, labels = scores(), np.full((20, 30), BUILDING, dtype=np.uint8)
    labels[10:] = ROAD
    score[6:14, 5:9] = 4.0  # an object standing on the road edge: rows 6..13
    score[1:4, 20:25] = 4.0  # off the road
    plain = find_objects(score, labels, ObjectParams(threshold=1.0))
    assert len(plain) == 2
    on_road = find_objects(score, labels, ObjectParams(threshold=1.0, drivable_ids=(ROAD,)))
    assert [o.box for o in on_road] == [(5, 10, 4, 4)]  # rows 10..13 only
    margin = find_objects(score, labels, ObjectParams(threshold=1.0, drivable_ids=(ROAD,),
                                                      drivable_margin=2))
    assert [o.box for o in margin] == [(5, 8, 4, 6)]  # rows 8..13: two rows above the road
    wide = ObjectParams(threshold=1.0, drivable_ids=(ROAD,), drivable_margin=4)
    assert [o.box for o in find_objects(score, labels, wide)] == [(5, 6, 4, 8)]
    as_int32 = find_objects(score, labels.astype(np.int32), wide)
    assert as_int32 == find_objects(score, labels, wide)


def test_drivable_margin_is_square_and_reaches_beyond_the_score_box():
    score, labels = scores(), np.full((20, 30), BUILDING, dtype=np.uint8)
    labels[15, 25] = ROAD  # a single road pixel, far from the mask's bounding box
    score[12, 22] = 4.0  # 3 rows and 3 columns away: inside a margin of 3 (square)
    params = ObjectParams(threshold=1.0, drivable_ids=(ROAD,), drivable_margin=3)
    assert [o.box for o in find_objects(score, labels, params)] == [(22, 12, 1, 1)]
    near = ObjectParams(threshold=1.0, drivable_ids=(ROAD,), drivable_margin=2)
    assert find_objects(score, labels, near) == []


def test_merge_distance_counts_background_pixels_between_fragments():
    score = scores()
    score[4:8, 0:3] = 4.0
    score[4:8, 6:9] = 4.0  # three background columns (3, 4, 5) between them
    for k, expected in [(0, 2), (2, 2), (3, 1), (9, 1)]:
        objects = find_objects(score, None, ObjectParams(threshold=1.0, merge_distance=k))
        assert len(objects) == expected, k
    (merged,) = find_objects(score, None, ObjectParams(threshold=1.0, merge_distance=3))
    assert merged.box == (0, 4, 9, 4)
    assert merged.area == 24  # the original pixels: the gap is not part of the object
    assert merged.centroid_x == pytest.approx(4.0)


def test_merge_is_chebyshev_and_transitive():
    score = scores()
    score[0, 0] = score[3, 3] = 4.0  # diagonal: max(|dx|, |dy|) - 1 = 2 background pixels
    assert len(find_objects(score, None, ObjectParams(threshold=1.0, merge_distance=1))) == 2
    assert len(find_objects(score, None, ObjectParams(threshold=1.0, merge_distance=2))) == 1
    chain = scores()
    chain[10, [0, 4, 8, 12]] = 4.0  # neighbours 3 apart, ends 11 apart
    (obj,) = find_objects(chain, None, ObjectParams(threshold=1.0, merge_distance=3))
    assert (obj.box, obj.area) == ((0, 10, 13, 1), 4)


def brute_force_groups(mask, k):
    """Fragments (8-connected, by union-find over pixels) merged when their Chebyshev gap is
    at most k, by comparing every pixel pair: a frozenset of frozensets of pixels."""
    pixels = list(zip(*np.nonzero(mask), strict=True))
    parent = {p: p for p in pixels}

    def find(p):
        while parent[p] != p:
            parent[p] = parent[parent[p]]
            p = parent[p]
        return p

    for a, b in itertools.combinations(pixels, 2):
        if max(abs(a[0] - b[0]), abs(a[1] - b[1])) - 1 <= k:
            parent[find(a)] = find(b)
    groups = {}
    for p in pixels:
        groups.setdefault(find(p), set()).add(p)
    return frozenset(frozenset(g) for g in groups.values())


@pytest.mark.parametrize('seed', range(6))
def test_merge_agrees_with_a_brute_force_grouping(seed):
    rng = np.random.default_rng(seed)
    score = rng.random((14, 17)).astype(np.float32)
    score[rng.random(score.shape) < 0.2] = np.nan
    k = int(rng.integers(0, 4))
    params = ObjectParams(threshold=0.9, merge_distance=k, max_objects=1000)
    objects, ids = find_objects_with_ids(score, None, params)
    found = frozenset(frozenset(zip(*np.nonzero(ids == i + 1), strict=True))
                      for i in range(len(objects)))
    assert found == brute_force_groups(score > 0.9, k)
    for i, obj in enumerate(objects):
        rows, cols = np.nonzero(ids == i + 1)
        assert obj.box == (cols.min(), rows.min(), cols.max() - cols.min() + 1,
                           rows.max() - rows.min() + 1)
        assert obj.area == rows.size
        assert obj.max_score == pytest.approx(float(score[rows, cols].max()))
    assert [o.area for o in objects] == sorted((o.area for o in objects), reverse=True)


def test_min_area_in_pixels_and_in_fraction_of_the_frame():
    score = scores(100, 100)
    score[10:12, 10:15] = 4.0  # 10 pixels
    score[50:53, 50:53] = 4.0  # 9 pixels
    areas = [o.area for o in find_objects(score, None, ObjectParams(threshold=1.0))]
    assert areas == [10, 9]
    by_px = find_objects(score, None, ObjectParams(threshold=1.0, min_area_px=10))
    assert [o.area for o in by_px] == [10]
    by_fraction = ObjectParams(threshold=1.0, min_area_fraction=0.001)  # 10 of 10000 pixels
    assert by_fraction.min_area(100, 100) == 10
    assert [o.area for o in find_objects(score, None, by_fraction)] == [10]
    assert find_objects(score, None, ObjectParams(threshold=1.0, min_area_px=11)) == []


def test_max_objects_keeps_the_largest():
    score = scores(20, 60)
    for i, area in enumerate([3, 5, 1, 4, 2]):
        score[2, i * 10:i * 10 + area] = 4.0
    objects = find_objects(score, None, ObjectParams(threshold=1.0, max_objects=3))
    assert [o.area for o in objects] == [5, 4, 3]
    assert [o.x for o in objects] == [10, 30, 0]
    ties = scores(20, 60)
    ties[15, 0:2] = ties[2, 40:42] = ties[2, 10:12] = 4.0
    first = find_objects(ties, None, ObjectParams(threshold=1.0, max_objects=2))
    assert [(o.x, o.y) for o in first] == [(10, 2), (40, 2)]  # ties: top-most, then left-most


def test_confidence_is_monotone_in_the_score():
    params = ObjectParams(threshold=2.0, confidence_scale=0.5)
    values = np.linspace(2.0, 8.0, 61)
    logistic = [object_confidence(v, params) for v in values]
    assert logistic[0] == 0.5
    assert object_confidence(2.5, params) == pytest.approx(1 / (1 + math.exp(-1)))
    assert all(b > a for a, b in itertools.pairwise(logistic[:20]))
    assert all(0.0 <= c <= 1.0 for c in logistic)
    table = {3.0: 0.01, 5.0: 0.001, 7.0: 0.0001}
    calibrated = [object_confidence(v, params, table) for v in values]
    assert all(b >= a for a, b in itertools.pairwise(calibrated))
    assert object_confidence(2.0, params, table) == pytest.approx(0.99)  # clamped below
    assert object_confidence(3.0, params, table) == pytest.approx(0.99)
    assert object_confidence(4.0, params, table) == pytest.approx(1 - 10 ** -2.5)  # log-linear
    assert object_confidence(5.0, params, table) == pytest.approx(0.999)
    assert object_confidence(99.0, params, table) == pytest.approx(0.9999)  # clamped above


def test_objects_carry_the_confidence_of_their_peak():
    score = scores()
    score[2:4, 2:4] = 3.0
    score[10:14, 10:14] = 2.5
    score[10, 10] = 6.0
    table = {3.0: 0.01, 5.0: 0.001}
    params = ObjectParams(threshold=2.0)
    objects = find_objects(score, None, params, table)
    assert [o.confidence for o in objects] == [pytest.approx(0.999), pytest.approx(0.99)]
    fallback = find_objects(score, None, params)
    assert [o.confidence for o in fallback] == [
        pytest.approx(object_confidence(6.0, params)), pytest.approx(object_confidence(3.0,
                                                                                       params))]


def test_fpr_table_from_sidecar_thresholds():
    thresholds = {'tpr95': -1.0, 'fpr1': 2.0, 'fpr0.1': 4.5}
    assert fpr_table_from_thresholds(thresholds) == {2.0: 0.01, 4.5: 0.001}
    assert fpr_table_from_thresholds({'tpr95': -1.0, 'fpr1': 2.0}) is None
    assert fpr_table_from_thresholds({'fpr1': 2.0, 'fpr0.1': 2.0}) is None  # tied scores
    with pytest.raises(ArtifactError, match='lower'):
        fpr_table_from_thresholds({'fpr1': 4.0, 'fpr0.1': 2.0})


@pytest.mark.parametrize('table,match', [
    ({2.0: 0.01}, 'at least two'),
    ({2.0: 0.01, 3.0: 0.0}, 'false-alarm rate in'),
    ({2.0: 0.01, float('nan'): 0.001}, 'finite score'),
    ({2.0: 0.001, 3.0: 0.01}, 'lower'),
    ([(2.0, 0.01)], 'must map'),
])
def test_fpr_table_is_checked(table, match):
    with pytest.raises(ConfigError, match=match):
        find_objects(scores(), None, ObjectParams(threshold=1.0), table)


@pytest.mark.parametrize('changes,match', [
    ({'threshold': math.nan}, 'finite'),
    ({'threshold': True}, 'finite'),
    ({'drivable_ids': (256,)}, '0..255'),
    ({'drivable_ids': 0}, 'sequence'),
    ({'drivable_margin': -1}, 'drivable_margin'),
    ({'merge_distance': 1.5}, 'merge_distance'),
    ({'min_area_px': 0}, 'min_area_px'),
    ({'min_area_fraction': 1.0}, 'min_area_fraction'),
    ({'max_objects': 0}, 'max_objects'),
    ({'confidence_scale': 0.0}, 'confidence_scale'),
])
def test_params_are_validated(changes, match):
    with pytest.raises(ConfigError, match=match):
        ObjectParams(**{'threshold': 1.0, **changes})


def test_inputs_are_validated():
    params = ObjectParams(threshold=1.0, drivable_ids=[3, 0, 3])
    assert params.drivable_ids == (0, 3)
    with pytest.raises(ConfigError, match='semantic labels'):
        find_objects(scores(), None, params)
    with pytest.raises(DataError, match='shape'):
        find_objects(scores(), np.zeros((5, 5), dtype=np.uint8), params)
    with pytest.raises(DataError, match='float'):
        find_objects(np.zeros((5, 5), dtype=np.uint8), None, ObjectParams(threshold=1.0))
    assert find_objects(scores(), None, ObjectParams(threshold=1.0)) == []


def test_id_map_holds_exactly_the_reported_objects():
    score = scores()
    score[2:5, 2:5] = 4.0
    score[10, 20] = 4.0  # dropped by min_area_px
    score[12:14, 12:18] = 4.0
    objects, ids = find_objects_with_ids(score, None, ObjectParams(threshold=1.0,
                                                                   min_area_px=2))
    assert ids.dtype == np.int32 and ids.shape == score.shape
    assert [int(np.count_nonzero(ids == i + 1)) for i in range(len(objects))] == [12, 9]
    assert np.count_nonzero(ids) == 21 and ids[10, 20] == 0
    assert find_objects(score, None, ObjectParams(threshold=1.0, min_area_px=2)) == objects


def test_draw_objects_in_place_and_scaled():
    score = scores()
    score[5:9, 10:15] = 4.0
    objects = find_objects(score, None, ObjectParams(threshold=1.0))
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    out = draw_objects(image, objects, color=(255, 0, 0), thickness=1, show_confidence=False)
    assert out is image
    assert (image[5, 10:15] == (255, 0, 0)).all() and (image[8, 10:15] == (255, 0, 0)).all()
    assert (image[6:8, 11:14] == 0).all()  # inside the box stays untouched
    assert image[4].sum() == 0 and image[:, 15].sum() == 0
    big = np.zeros((40, 60, 3), dtype=np.uint8)
    draw_objects(big, objects, color=(0, 255, 0), thickness=1, source_hw=(20, 30),
                 show_confidence=False)
    rows, cols = np.nonzero(big[:, :, 1])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (10, 17, 20, 29)
    labelled = np.zeros((60, 90, 3), dtype=np.uint8)
    draw_objects(labelled, objects, source_hw=(20, 30))  # the confidence text draws too
    assert labelled.any()
    with pytest.raises(DataError, match='contiguous'):
        draw_objects(np.zeros((20, 30, 3), dtype=np.uint8)[:, ::2], objects)
    with pytest.raises(DataError, match='uint8'):
        draw_objects(np.zeros((20, 30), dtype=np.uint8), objects)
