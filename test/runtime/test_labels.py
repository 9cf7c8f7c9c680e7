"""Label conventions of `anomaly-seg replay --labels` (and evaluate): known targets per convention
on hand-made label arrays, the conventions that fit a histogram of ids, and the evaluator's
report and warnings for labels without class ids or without anomaly pixels.
"""

import numpy as np
import pytest

from anomaly_seg_node import replay_command
from anomaly_seg_node.errors import ConfigError, DataError
from anomaly_seg_node.labels import (
    CAMVID_CLASS_NAMES,
    IGNORE_ID,
    LABEL_CONVENTIONS,
    LabelSpec,
    class_names,
    fitting_conventions,
    label_spec,
)
from anomaly_seg_node.replay import FrameEvaluator
from anomaly_seg_node.replay import LabelSpec as ReplayLabelSpec

STREET = class_names()  # densehybrid12: 12 classes, road = 6, car = 9
CAMVID = list(CAMVID_CLASS_NAMES)  # 11 classes, road = 3
X = IGNORE_ID


def targets(kind, classes, raw):
    spec = label_spec(kind, classes)
    closed, anomaly, open_set = spec.targets(np.array([raw], dtype=np.uint8), len(classes))
    assert closed.dtype == anomaly.dtype == open_set.dtype == np.uint8
    return closed[0].tolist(), anomaly[0].tolist(), open_set[0].tolist()


@pytest.mark.parametrize('kind, classes, raw, closed, anomaly, open_set', [
    # anomaly 14, "other" 4 (not a densehybrid12 class), road 8, unknown 0, car 11, 255
    ('streethazards', STREET, [14, 4, 8, 0, 11, 255],
     [X, X, 6, X, 9, X], [1, X, 0, X, 0, X], [12, X, 6, X, 9, X]),
    # K = 12: ids 0..11 are classes, 12 the anomaly, 13 undefined
    ('train-ids', STREET, [0, 11, 12, 13, 255],
     [0, 11, X, X, X], [0, 0, 1, X, X], [0, 11, 12, X, X]),
    # a CamVid artifact: sky 0, road 3, bicyclist 10, void 11, anomaly 12, undefined 13
    ('camvid', CAMVID, [0, 3, 10, 11, 12, 13],
     [0, 3, 10, X, X, X], [0, 0, 0, X, 1, X], [0, 3, 10, X, 11, X]),
    # a StreetHazards artifact: road maps by name, sky has no class but stays an inlier
    ('camvid', STREET, [0, 3, 11, 12],
     [X, 6, X, X], [0, 0, X, 1], [X, 6, X, 12]),
    # an artifact without any CamVid class name: anomaly target only
    ('camvid', ['lane', 'kerb'], [0, 10, 11, 12],
     [X, X, X, X], [0, 0, X, 1], [X, X, X, 2]),
    ('binary', STREET, [0, 1, 255, 7], [X, X, X, X], [0, 1, X, X], [X, 12, X, X]),
    ('road-anomaly', STREET, [0, 1, 2, 255, 3],
     [X, X, X, X, X], [0, X, 1, X, X], [X, X, 12, X, X]),
])
def test_targets_of_each_convention(kind, classes, raw, closed, anomaly, open_set):
    assert targets(kind, classes, raw) == (closed, anomaly, open_set)


def test_specs_without_class_ids_say_so():
    for kind in ('binary', 'road-anomaly'):
        spec = label_spec(kind, STREET)
        assert not spec.has_classes and spec.convention == kind
        assert spec.no_class_reason == f'labels carry no class ids ({kind} convention)'
    camvid = label_spec('camvid', ['lane', 'kerb'])
    assert not camvid.has_classes
    assert 'none of the artifact classes' in camvid.no_class_reason
    assert 'anomaly metrics are not' in camvid.no_class_reason
    for kind, classes in (('streethazards', STREET), ('train-ids', STREET), ('camvid', CAMVID),
                          ('camvid', STREET)):
        spec = label_spec(kind, classes)
        assert spec.has_classes and spec.no_class_reason == ''


def test_unknown_ids_are_counted_per_convention():
    counts = np.bincount(np.array([0, 0, 1, 2, 3, 7, 7, 7, 255], dtype=np.uint8), minlength=256)
    assert label_spec('binary', STREET).unknown_ids(counts) == {2: 1, 3: 1, 7: 3}
    assert label_spec('road-anomaly', STREET).unknown_ids(counts) == {3: 1, 7: 3}
    assert label_spec('streethazards', STREET).unknown_ids(counts) == {0: 2}
    assert label_spec('camvid', CAMVID).unknown_ids(counts) == {}
    assert label_spec('train-ids', STREET).unknown_ids(counts) == {}
    direct = LabelSpec(lut=np.full(256, X, dtype=np.uint8), anomaly_ids=(1,), name='mine')
    assert direct.unknown_ids(counts) == {}  # no known_ids: every id is expected
    assert direct.no_class_reason == 'the mine labels map to no artifact class'


@pytest.mark.parametrize('ids, fits', [
    ([0, 1, 255], ['binary']),
    ([0, 2, 255, 1], ['road-anomaly']),
    (list(range(1, 15)), ['streethazards']),
    (list(range(13)), ['train-ids', 'camvid']),  # 12 is K of train ids and CamVid's anomaly
    (list(range(12)), []),  # CamVid without an anomaly pixel
])
def test_fitting_conventions(ids, fits):
    counts = np.bincount(np.array(ids, dtype=np.uint8), minlength=256)
    assert fitting_conventions(counts, STREET) == fits


def test_unknown_convention_and_unmatched_names_are_errors():
    with pytest.raises(ConfigError, match="unknown label convention 'cityscapes'.*binary"):
        label_spec('cityscapes', STREET)
    with pytest.raises(DataError, match='none of the artifact classes'):
        label_spec('streethazards', ['lane', 'kerb'])  # and no inlier: nothing to evaluate


def test_replay_offers_every_convention_and_keeps_the_old_import():
    assert replay_command.LABEL_KINDS == tuple(LABEL_CONVENTIONS) == (
        'streethazards', 'train-ids', 'camvid', 'binary', 'road-anomaly')
    assert ReplayLabelSpec is LabelSpec


def test_evaluator_reports_no_class_metrics_for_binary_labels():
    spec = label_spec('binary', STREET)
    evaluator = FrameEvaluator(STREET, spec, threshold=0.5)
    raw = np.array([[0, 0, 1, 1], [0, 255, 1, 0]], dtype=np.uint8)
    score = np.array([[0.1, 0.2, 0.9, 0.8], [0.3, 0.99, 0.7, 0.4]], dtype=np.float32)
    semantic = np.full(raw.shape, 6, dtype=np.int64)
    figures, anomaly = evaluator.update(semantic, score, raw)
    assert anomaly.tolist() == [[0, 0, 1, 1], [0, X, 1, 0]]
    assert figures == {'n_anomaly_pixels': 3, 'ap': 1.0, 'auroc': 1.0, 'fpr95': 0.0}
    result = evaluator.compute()
    reason = 'labels carry no class ids (binary convention)'
    assert result['closed'] == {'error': reason} and result['open_set'] == {'error': reason}
    assert result['pooled']['ap'] == 1.0 and result['anomaly_pixel_share'] == 3 / 7
    assert result['convention'] == 'binary'
    assert result['label_ids'] == {0: 4, 1: 3, 255: 1} and result['unknown_label_ids'] == {}
    assert evaluator.warnings() == []


def test_evaluator_warns_without_anomaly_pixels_and_names_the_fitting_convention():
    evaluator = FrameEvaluator(STREET, label_spec('streethazards', STREET), threshold=0.5)
    raw = np.array([[0, 0, 1, 8], [0, 1, 8, 8]], dtype=np.uint8)  # binary labels
    for _ in range(2):
        evaluator.update(np.zeros(raw.shape, np.int64), np.zeros(raw.shape, np.float32), raw)
    no_anomaly, unknown = evaluator.warnings()
    assert no_anomaly == (
        'no anomaly pixel in the 2 labelled frames with --labels streethazards (anomaly id 14); '
        'label ids seen (id: pixels): 0: 6, 1: 4, 8: 6. no --labels convention has anomaly '
        'pixels and only ids it defines here')
    assert unknown == ('6 labelled pixels (37.50%) hold ids that --labels streethazards does '
                       'not define; they were ignored (id: pixels): 0: 6')
    binary_only = FrameEvaluator(STREET, label_spec('streethazards', STREET), threshold=0.5)
    binary_only.update(np.zeros((1, 4), np.int64), np.zeros((1, 4), np.float32),
                       np.array([[0, 0, 1, 255]], dtype=np.uint8))
    assert binary_only.warnings()[0].endswith(
        'label ids seen (id: pixels): 0: 2, 1: 1, 255: 1. --labels binary would fit these ids')
